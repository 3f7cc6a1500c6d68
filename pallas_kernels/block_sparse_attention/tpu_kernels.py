"""Pallas Mosaic (TPU) kernel bodies and `pallas_call` builders of block-sparse attention.

Grids, block rules, residuals and numerics are described in tpu.py; this module holds the three
kernels (forward, dq, dkv), the score / visibility math they share, and the BlockSpecs. Each
grid step handles one (query block, key block) pair named by the scalar-prefetched lists.

Per grid step a kernel sees (bq / bk block sizes, D / Dv head dims, cd the compute dtype):
  q [bq, D], k [bk, D], v [bk, Dv], o / do [bq, Dv] in cd;
  query-major kernels (forward, dq): query segment ids as a lane-replicated column [bq, 128],
    key segment ids as a sublane-replicated row [8, bk], the block's pattern [bq, bk] int32;
  key-major kernel (dkv): the transposed forms ([bk, 128] key column, [8, bq] query row,
    pattern [bk, bq]), so that every product is NN or NT and no tile is ever transposed;
  with cfg.positions, positions (q_pos, kv_pos) in the same layouts as the segment ids;
  per-query statistics (lse, Delta) as rows: [1, bq] in dq (read as a column through a 1-D
    load), sublane-replicated [8, bq] in dkv.
Softmax state (running max m, sum l) is kept lane-replicated [bq, 128] in VMEM scratch and
widened to [bq, bk] / [bq, Dv] by lane tiling (`_widen`); a row becomes a column with
`row[:, None]` of a 1-D load. These are the idioms jax's own TPU attention kernels (splash)
rely on, chosen for that reason: this code has only been lowered, never compiled, for a TPU.

The scalar-prefetched lists are flat vectors (SMEM pads the minor dims of 2-D arrays) in the
smallest integer type their static bounds allow (int8 / int16 / int32: SMEM holds 1 MiB):
blocks, counts, mask ids (FULL = -1 or a pattern index) and the pattern to fetch (the mask id
for partial slots; for full and padding slots the last partial pattern before it, so that the
pattern buffer's block index does not move and its copy is skipped). Every read converts to
int32 (`_i32`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
LANES, SUBLANES = 128, 8

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Config:
    """Static options of one call (hashable: a custom_vjp nondiff argument)."""
    block_q: int
    block_k: int
    heads: int            # H query heads
    kv_heads: int         # K kv heads (H % K == 0)
    layout_rows: int      # Bl in {1, B}
    layout_heads: int     # Hl in {1, H}
    scale: float
    softcap: float | None
    sigmoid: bool
    sigmoid_bias: float
    has_sinks: bool
    interpret: bool | pltpu.InterpretParams
    # The attention op's mask on top of the layout (pallas_kernels/attention/pallas.py): key j
    # visible to query i only if 0 <= pos_q[i] - pos_k[j] < window (no bound for None); the
    # positions come in the segment ids' layouts.
    positions: bool = False
    window: int | None = None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


# ----------------------------------------------------------------------------- in-kernel math

def _i32(x):
    return x.astype(jnp.int32)


def _dot(a, b, dims):
    """fp32-accumulated product; fp32 operands ask for a full fp32 contraction."""
    prec = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def _widen(x, n: int):
    """Lane-replicated [R, 128] -> [R, n] (n a multiple of 128) by lane tiling."""
    return x if n == LANES else jnp.tile(x, (1, n // LANES))


def _scores(a, b, cfg: Config):
    """(scaled, capped scores, tanh of the cap or None) of a @ b.T, fp32."""
    s = _dot(a, b, _NT) * cfg.scale
    if cfg.softcap is None:
        return s, None
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _score_grad(p, dp, t, cfg: Config, delta=None):
    """dL/d(raw scaled score) from dL/dp: softmax ds = p (dp - Delta), sigmoid
    ds = dp p (1 - p); then through the soft-cap c tanh(s / c): times (1 - tanh^2)."""
    ds = p * (dp - delta) if not cfg.sigmoid else dp * p * (1.0 - p)
    return ds if t is None else ds * (1.0 - t * t)


def _in_window(dist, cfg: Config):
    """dist = pos_q - pos_k: visible by position iff 0 <= dist (< cfg.window)."""
    ok = dist >= 0
    return ok if cfg.window is None else ok & (dist < cfg.window)


def _visible_qk(r, pattern: bool, cfg: Config):
    """[bq, bk] visibility, query-major: same nonzero segment, the pattern when `pattern`, and
    with cfg.positions the position mask."""
    bk = cfg.block_k
    ks = r["kv_seg"][0:1, :]                                # [1, bk]
    vis = (_widen(r["q_seg"][...], bk) == ks) & (ks != 0)
    if pattern:
        vis = vis & (r["pattern"][...] != 0)
    if cfg.positions:
        vis = vis & _in_window(_widen(r["q_pos"][...], bk) - r["kv_pos"][0:1, :], cfg)
    return vis


def _visible_kq(r, pattern: bool, cfg: Config):
    """[bk, bq] visibility, key-major (the transpose of `_visible_qk`)."""
    bq = cfg.block_q
    qs = r["q_seg"][0:1, :]                                 # [1, bq]
    vis = (_widen(r["kv_seg"][...], bq) == qs) & (qs != 0)
    if pattern:
        vis = vis & (r["pattern"][...] != 0)
    if cfg.positions:
        vis = vis & _in_window(r["q_pos"][0:1, :] - _widen(r["kv_pos"][...], bq), cfg)
    return vis


def _slot_branches(run, mask_id, body):
    """Calls body(pattern=False) for a listed full block and body(pattern=True) for a listed
    partial one: full blocks skip the pattern load and its `and`."""
    full = mask_id < 0

    @pl.when(run & full)
    def _():
        body(False)

    @pl.when(run & jnp.logical_not(full))
    def _():
        body(True)


# ----------------------------------------------------------------------------- list indexing

class _Lists:
    """Flat offsets into the [Bl, Hl, n, S] lists for grid coordinates (row b, head h, block i):
    a shared layout (Bl = 1 / Hl = 1) maps every row / head to 0."""

    def __init__(self, cfg: Config, n: int, slots: int):
        self.cfg, self.n, self.slots = cfg, n, slots

    def row(self, b, h, i):
        lb = b if self.cfg.layout_rows > 1 else 0
        lh = h if self.cfg.layout_heads > 1 else 0
        return (lb * self.cfg.layout_heads + lh) * self.n + i

    def slot(self, b, h, i, s):
        return self.row(b, h, i) * self.slots + s


# ----------------------------------------------------------------------------- kernels

def _forward_kernel(blocks_ref, counts_ref, ids_ref, fetch_ref, *refs, cfg: Config, names,
                    lists: _Lists):
    """Grid (B, H, nq, S): online softmax (or a sum of sigmoid weights) of query block i over
    slot s of its list. refs: q, k, v, q_seg column, kv_seg row, pattern, [sinks] -> o, [lse
    [bq, 128]]; scratch: acc [bq, Dv], m, l [bq, 128] (softmax only)."""
    del blocks_ref, fetch_ref  # used by the index maps
    r = dict(zip(names, refs))
    b, h, i, s = (pl.program_id(a) for a in range(4))
    bk, dv = cfg.block_k, r["o"].shape[-1]
    acc_ref = r["acc"]

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if not cfg.sigmoid:
            if cfg.has_sinks:  # the sink joins the sum with exp(sink - m) = 1 at m = sink
                r["m"][...] = jnp.full_like(r["m"], r["sinks"][0, h])
                r["l"][...] = jnp.ones_like(r["l"])
            else:
                r["m"][...] = jnp.full_like(r["m"], -jnp.inf)
                r["l"][...] = jnp.zeros_like(r["l"])

    def body(pattern: bool):
        q, k, v = r["q"][...], r["k"][...], r["v"][...]
        sc, _ = _scores(q, k, cfg)
        vis = _visible_qk(r, pattern, cfg)
        if cfg.sigmoid:
            p = jnp.where(vis, _sigmoid(sc + cfg.sigmoid_bias), 0.0)
            acc_ref[...] += _dot(p.astype(v.dtype), v, _NN)
            return
        m_prev, l_prev = r["m"][...], r["l"][...]
        m_cur = jnp.max(jnp.where(vis, sc, -jnp.inf), axis=1, keepdims=True)   # [bq, 1]
        m_next = jnp.maximum(m_prev, m_cur)                                      # [bq, 128]
        # a row with nothing visible yet keeps m = -inf: shift by 0 instead (no inf - inf)
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.where(vis, jnp.exp(sc - _widen(m_safe, bk)), 0.0)
        alpha = jnp.exp(m_prev - m_safe)                                         # 0 at -inf
        r["l"][...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        r["m"][...] = m_next
        acc_ref[...] = _widen(alpha, dv) * acc_ref[...] + _dot(p.astype(v.dtype), v, _NN)

    _slot_branches(s < _i32(counts_ref[lists.row(b, h, i)]),
                   _i32(ids_ref[lists.slot(b, h, i, s)]), body)

    @pl.when(s == pl.num_programs(3) - 1)
    def _():
        if cfg.sigmoid:
            r["o"][...] = acc_ref[...].astype(r["o"].dtype)
            return
        m, l = r["m"][...], r["l"][...]
        inv = jnp.where(l > 0.0, 1.0 / l, 0.0)
        r["o"][...] = (acc_ref[...] * _widen(inv, dv)).astype(r["o"].dtype)
        r["lse"][...] = jnp.where(l > 0.0, m + jnp.log(l), -jnp.inf)


def _dq_kernel(blocks_ref, counts_ref, ids_ref, fetch_ref, *refs, cfg: Config, names,
               lists: _Lists):
    """Grid (B, H, nq, S), the forward's walk. refs: q, k, v, do, q_seg column, kv_seg row,
    pattern, [lse, delta rows [1, bq]] -> dq [bq, D]; scratch: dq accumulator [bq, D] fp32."""
    del blocks_ref, fetch_ref
    r = dict(zip(names, refs))
    b, h, i, s = (pl.program_id(a) for a in range(4))
    acc_ref = r["acc"]

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def body(pattern: bool):
        q, k, v, do = r["q"][...], r["k"][...], r["v"][...], r["do"][...]
        sc, t = _scores(q, k, cfg)
        vis = _visible_qk(r, pattern, cfg)
        delta = None
        if cfg.sigmoid:
            p = jnp.where(vis, _sigmoid(sc + cfg.sigmoid_bias), 0.0)
        else:
            lse = r["lse"][0][:, None]                                           # [bq, 1]
            delta = r["delta"][0][:, None]
            p = jnp.where(vis, jnp.exp(sc - lse), 0.0)
        dp = _dot(do, v, _NT)                                                    # [bq, bk]
        ds = _score_grad(p, dp, t, cfg, delta)
        acc_ref[...] += _dot(ds.astype(k.dtype), k, _NN)

    _slot_branches(s < _i32(counts_ref[lists.row(b, h, i)]),
                   _i32(ids_ref[lists.slot(b, h, i, s)]), body)

    @pl.when(s == pl.num_programs(3) - 1)
    def _():
        r["dq"][...] = (cfg.scale * acc_ref[...]).astype(r["dq"].dtype)


def _dkv_kernel(blocks_ref, counts_ref, ids_ref, fetch_ref, *refs, cfg: Config, names,
                lists: _Lists):
    """Grid (B, K, nk, G * Sq): key block j of kv head kh walks, for each query head h of its
    group (g = t // Sq), the query blocks that list it (slot t % Sq of the key-major list).
    Scores are formed key-major, [bk, bq] = k q^T. refs: q, k, v, do, kv_seg column, q_seg
    row, pattern^T, [lse, delta rows [8, bq]] -> dk [bk, D], dv [bk, Dv]; scratch: fp32
    accumulators."""
    del blocks_ref, fetch_ref
    r = dict(zip(names, refs))
    b, kh, j, t = (pl.program_id(a) for a in range(4))
    sq = lists.slots
    h = kh * cfg.group + lax.div(t, sq)
    s = lax.rem(t, sq)
    dk_acc, dv_acc = r["dk_acc"], r["dv_acc"]

    @pl.when(t == 0)
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    def body(pattern: bool):
        q, k, v, do = r["q"][...], r["k"][...], r["v"][...], r["do"][...]
        sc, tc = _scores(k, q, cfg)                                              # [bk, bq]
        vis = _visible_kq(r, pattern, cfg)
        delta = None
        if cfg.sigmoid:
            p = jnp.where(vis, _sigmoid(sc + cfg.sigmoid_bias), 0.0)
        else:
            lse = r["lse"][0:1, :]                                               # [1, bq]
            delta = r["delta"][0:1, :]
            p = jnp.where(vis, jnp.exp(sc - lse), 0.0)
        dv_acc[...] += _dot(p.astype(do.dtype), do, _NN)
        dp = _dot(v, do, _NT)                                                    # [bk, bq]
        ds = _score_grad(p, dp, tc, cfg, delta)
        dk_acc[...] += _dot(ds.astype(q.dtype), q, _NN)

    _slot_branches(s < _i32(counts_ref[lists.row(b, h, j)]),
                   _i32(ids_ref[lists.slot(b, h, j, s)]), body)

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        r["dk"][...] = (cfg.scale * dk_acc[...]).astype(r["dk"].dtype)
        r["dv"][...] = dv_acc[...].astype(r["dv"].dtype)


# ----------------------------------------------------------------------------- pallas_call builders

def _compiler_params():
    params = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    # rows, heads and blocks own disjoint outputs (megacore may split them); the slot axis
    # accumulates into VMEM scratch and must run in order on one core
    return params(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def fetch_ids(mask_ids):
    """Flat int32 mask ids -> the pattern index each slot's pattern buffer holds: its own id
    for a partial slot, else the last partial id before it (0 before the first), so that full
    and padding slots never trigger a pattern copy."""
    pos = jnp.arange(mask_ids.shape[0], dtype=jnp.int32)
    last = lax.cummax(jnp.where(mask_ids >= 0, pos, -1), axis=0)
    return jnp.where(last >= 0, mask_ids[jnp.maximum(last, 0)], 0).astype(mask_ids.dtype)


def _call(kernel, cfg: Config, grid, lists: _Lists, prefetch, inputs, outputs, scratch, name):
    """pallas_call with scalar prefetch and named refs. inputs / outputs: (name, array or
    ShapeDtypeStruct, BlockSpec), inputs with array None dropped; scratch: (name, shape). The
    kernel gets cfg=, names= (inputs, outputs, scratch in order) and lists=."""
    inputs = [x for x in inputs if x[1] is not None]
    names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs) + tuple(
        n for n, _ in scratch)
    out = pl.pallas_call(
        functools.partial(kernel, cfg=cfg, names=names, lists=lists),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=grid,
            in_specs=[sp for _, _, sp in inputs], out_specs=[sp for _, _, sp in outputs],
            scratch_shapes=[pltpu.VMEM(shape, F32) for _, shape in scratch]),
        out_shape=[a for _, a, _ in outputs],
        compiler_params=_compiler_params(), interpret=cfg.interpret, name=name,
    )(*prefetch, *[a for _, a, _ in inputs])
    return tuple(out)


def _query_major(cfg: Config, lists: _Lists):
    """BlockSpec factory of the forward / dq grid (B, H, nq, S); index maps get the grid
    coordinates then the prefetched (blocks, counts, ids, fetch)."""
    grp = cfg.group

    def kv_block(b, h, i, s, blocks, counts, ids, fetch):
        return _i32(blocks[lists.slot(b, h, i, s)])

    def tile(n, d, kv):           # [B, heads, T, d] -> [n, d] at the query / listed key block
        if kv:
            return pl.BlockSpec((None, None, n, d), lambda b, h, i, s, *pf: (
                b, lax.div(h, grp) if grp > 1 else h, kv_block(b, h, i, s, *pf), 0))
        return pl.BlockSpec((None, None, n, d), lambda b, h, i, s, *pf: (b, h, i, 0))

    return dict(
        q=lambda d: tile(cfg.block_q, d, False),
        kv=lambda d: tile(cfg.block_k, d, True),
        q_col=pl.BlockSpec((None, cfg.block_q, LANES), lambda b, h, i, s, *pf: (b, i, 0)),
        kv_row=pl.BlockSpec((None, SUBLANES, cfg.block_k),
                            lambda b, h, i, s, *pf: (b, 0, kv_block(b, h, i, s, *pf))),
        pattern=pl.BlockSpec((None, cfg.block_q, cfg.block_k),
                             lambda b, h, i, s, bl, c, ids, fetch: (
                                 _i32(fetch[lists.slot(b, h, i, s)]), 0, 0)),
        stat_row=pl.BlockSpec((None, None, 1, cfg.block_q),
                              lambda b, h, i, s, *pf: (b, h, 0, i)),
        lse_col=pl.BlockSpec((None, None, cfg.block_q, LANES),
                             lambda b, h, i, s, *pf: (b, h, i, 0)),
    )


def _sinks_spec(h):
    return pl.BlockSpec((SUBLANES, h), lambda *_: (0, 0), memory_space=pltpu.SMEM)


def forward(q, k, v, q_col, kv_row, patterns, sinks, prefetch, *, slots: int, cfg: Config,
            pos=(None, None)):
    """q [B,H,Tqp,D], k [B,K,Tkp,D], v [B,K,Tkp,Dv] (compute dtype), q_col int32 [B,Tqp,128],
    kv_row int32 [B,8,Tkp], patterns int32 [P,bq,bk], sinks None | fp32 [8,H], prefetch: the
    flat query-major lists (blocks, counts, ids, fetch) -> (o [B,H,Tqp,Dv] in q.dtype,
    lse fp32 [B,H,Tqp,128] lane-replicated, None for sigmoid). pos: (query positions like
    q_col, key positions like kv_row) with cfg.positions, else Nones."""
    b, h, tqp, d = q.shape
    dv, bq = v.shape[-1], cfg.block_q
    nq = tqp // bq
    lists = _Lists(cfg, nq, slots)
    sp = _query_major(cfg, lists)
    inputs = [("q", q, sp["q"](d)), ("k", k, sp["kv"](d)), ("v", v, sp["kv"](dv)),
              ("q_seg", q_col, sp["q_col"]), ("kv_seg", kv_row, sp["kv_row"]),
              ("q_pos", pos[0], sp["q_col"]), ("kv_pos", pos[1], sp["kv_row"]),
              ("pattern", patterns, sp["pattern"]),
              ("sinks", sinks, None if sinks is None else _sinks_spec(h))]
    outputs = [("o", jax.ShapeDtypeStruct((b, h, tqp, dv), q.dtype), sp["q"](dv))]
    scratch = [("acc", (bq, dv))]
    if not cfg.sigmoid:
        outputs.append(("lse", jax.ShapeDtypeStruct((b, h, tqp, LANES), F32), sp["lse_col"]))
        scratch += [("m", (bq, LANES)), ("l", (bq, LANES))]
    out = _call(_forward_kernel, cfg, (b, h, nq, slots), lists, prefetch, inputs, outputs,
                scratch, "block_sparse_attention_fwd")
    return out[0], (None if cfg.sigmoid else out[1])


def dq(q, k, v, do, q_col, kv_row, patterns, lse_rows, delta_rows, prefetch, *, slots: int,
       cfg: Config, pos=(None, None)):
    """-> dq [B,H,Tqp,D] in q.dtype. lse_rows / delta_rows fp32 [B,H,1,Tqp] (None for
    sigmoid); other arguments as in `forward` (slots: S, the list width)."""
    b, h, tqp, d = q.shape
    dv, bq = v.shape[-1], cfg.block_q
    nq = tqp // bq
    lists = _Lists(cfg, nq, slots)
    sp = _query_major(cfg, lists)
    inputs = [("q", q, sp["q"](d)), ("k", k, sp["kv"](d)), ("v", v, sp["kv"](dv)),
              ("do", do, sp["q"](dv)), ("q_seg", q_col, sp["q_col"]),
              ("kv_seg", kv_row, sp["kv_row"]), ("q_pos", pos[0], sp["q_col"]),
              ("kv_pos", pos[1], sp["kv_row"]), ("pattern", patterns, sp["pattern"]),
              ("lse", lse_rows, sp["stat_row"]), ("delta", delta_rows, sp["stat_row"])]
    outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), sp["q"](d))]
    (out,) = _call(_dq_kernel, cfg, (b, h, nq, slots), lists, prefetch, inputs, outputs,
                   [("acc", (bq, d))], "block_sparse_attention_dq")
    return out


def dkv(q, k, v, do, kv_col, q_row, patterns_t, lse_rows, delta_rows, prefetch, *, slots: int,
        cfg: Config, pos=(None, None)):
    """-> (dk [B,K,Tkp,D], dv [B,K,Tkp,Dv]) in k.dtype / v.dtype, summed over each GQA group.
    kv_col int32 [B,Tkp,128], q_row int32 [B,8,Tqp], patterns_t int32 [P,bk,bq], prefetch:
    the flat key-major lists (q_blocks, q_counts, q_ids, fetch); slots: Sq. pos: (key
    positions like kv_col, query positions like q_row) with cfg.positions."""
    b, h, tqp, d = q.shape
    kvh, tkp, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, grp = cfg.block_q, cfg.block_k, cfg.group
    nk, sq = tkp // bk, slots
    lists = _Lists(cfg, nk, sq)

    def head(kh, t):
        return kh * grp + lax.div(t, sq)

    def q_block(b, kh, j, t, blocks, counts, ids, fetch):
        return _i32(blocks[lists.slot(b, head(kh, t), j, lax.rem(t, sq))])

    def q_tile(dd):
        return pl.BlockSpec((None, None, bq, dd), lambda b, kh, j, t, *pf: (
            b, head(kh, t), q_block(b, kh, j, t, *pf), 0))

    def k_tile(dd):
        return pl.BlockSpec((None, None, bk, dd), lambda b, kh, j, t, *pf: (b, kh, j, 0))

    stat = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, kh, j, t, *pf: (
        b, head(kh, t), 0, q_block(b, kh, j, t, *pf)))
    k_col = pl.BlockSpec((None, bk, LANES), lambda b, kh, j, t, *pf: (b, j, 0))
    q_row_spec = pl.BlockSpec((None, SUBLANES, bq), lambda b, kh, j, t, *pf: (
        b, 0, q_block(b, kh, j, t, *pf)))
    inputs = [
        ("q", q, q_tile(d)), ("k", k, k_tile(d)), ("v", v, k_tile(dv)), ("do", do, q_tile(dv)),
        ("kv_seg", kv_col, k_col), ("q_seg", q_row, q_row_spec),
        ("kv_pos", pos[0], k_col), ("q_pos", pos[1], q_row_spec),
        ("pattern", patterns_t, pl.BlockSpec((None, bk, bq), lambda b, kh, j, t, bl, c, i, f: (
            _i32(f[lists.slot(b, head(kh, t), j, lax.rem(t, sq))]), 0, 0))),
        ("lse", lse_rows, stat), ("delta", delta_rows, stat)]
    outputs = [("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), k_tile(d)),
               ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), k_tile(dv))]
    return _call(_dkv_kernel, cfg, (b, kvh, nk, grp * sq), lists, prefetch, inputs, outputs,
                 [("dk_acc", (bk, d)), ("dv_acc", (bk, dv))], "block_sparse_attention_dkv")
