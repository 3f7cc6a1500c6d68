"""Pallas Mosaic (TPU) kernel bodies and `pallas_call` builders of chunked linear attention.

The algorithm, grid, residuals and block rules are described in tpu.py; this module holds the
three kernels (forward; backward dq by a forward sweep; backward dk, dv, dS0 by a reverse sweep)
and the in-chunk helpers they share. Everything here works on one (batch, query head, chunk)
grid point; the host-side layout work (head-major transposes, chunk-local cumsums, relative
document numbers) is in tpu.py.

Per grid point a kernel sees (C = chunk, K / V = head dims, all decays fp32):
  q, k, do: [C, K] / [C, V] in the compute dtype `cd` (bfloat16 or float32),
  gate: "none": nothing; "scalar": the chunk-local inclusive cumsum G as a row [1, C];
        "channel": G as [C, K],
  doc: [1, C] float32 document number relative to the document of the previous chunk's last
       token (0: the carried state reaches this token), an exact small integer,
  a [K, V] float32 state carried across the sequential chunk axis in a VMEM scratch buffer.

Mosaic-friendly choices: only 2-D arrays; matmuls are NN, NT (`x @ y.T` as dot_general) or an
fp32 `.T` followed by NN (the pattern of jax's TPU flash attention); rows / columns / scalars
are extracted with masked sums over an iota instead of unaligned slices; a column is made
from a row by a masked lane-sum over a [N, N] identity mask, so no [N, 1] array has to come
from HBM (a trailing dim of 1 is padded to 128 lanes there); every exponent is <= 0 (masked
entries are clamped with min(., 0) before the exp, so nothing overflows into inf * 0).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
SUB = 16  # sub-chunk of the per-channel intra-chunk terms: exact [SUB, K] work per token there

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


# ----------------------------------------------------------------------------- small helpers

def _precision(a):
    # fp32 operands: ask Mosaic for a full fp32 contraction rather than leave it to its default
    return lax.Precision.HIGHEST if a.dtype == F32 else None


def _dot(a, b):
    """a [M, N] @ b [N, P] -> fp32 [M, P] (operands already in the compute dtype)."""
    return lax.dot_general(a, b, _NN, precision=_precision(a), preferred_element_type=F32)


def _dot_nt(a, b):
    """a [M, N] @ b[P, N].T -> fp32 [M, P]."""
    return lax.dot_general(a, b, _NT, precision=_precision(a), preferred_element_type=F32)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _row(x, i):
    """Row i (static or traced) of x [R, L] as [1, L]: a masked sublane sum, no unaligned slice."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def _col(x, j):
    """Column j of x [R, L] as [R, 1]: a masked lane sum."""
    return jnp.sum(jnp.where(_iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def _row_to_col(r):
    """[1, N] -> [N, 1] without a transpose: the diagonal of the row broadcast to [N, N]."""
    n = r.shape[1]
    eye = _iota((n, n), 0) == _iota((n, n), 1)
    return jnp.sum(jnp.where(eye, r, 0.0), axis=1, keepdims=True)


def _exp_le0(x):
    """exp(min(x, 0)): decays of masked-out (anti-causal) pairs would overflow otherwise."""
    return jnp.exp(jnp.minimum(x, 0.0))


class _Docs:
    """Document masks of one chunk from the relative document numbers `dr` [1, C] (see top).

    pair [C, C] (or its transpose): key j reaches query i (j <= i, same document);
    reach [C, 1]: the carried state reaches token i; to_end [C, 1]: token j reaches the chunk's
    end state; survive [1, 1]: the carried state survives the chunk (no reset inside).
    Masks that broadcast are float 0/1 multipliers (no boolean broadcasts inside Mosaic).
    """

    def __init__(self, dr, transposed: bool):
        c = dr.shape[1]
        dc = _row_to_col(dr)
        rows, cols = _iota((c, c), 0), _iota((c, c), 1)
        causal = (rows <= cols) if transposed else (rows >= cols)
        self.pair = causal & (dc == dr)
        last = _col(dr, c - 1)                                  # [1, 1]
        self.reach = jnp.where(dc == 0.0, 1.0, 0.0)             # [C, 1]
        self.to_end = jnp.where(dc == last, 1.0, 0.0)           # [C, 1]
        self.survive = jnp.where(last == 0.0, 1.0, 0.0)         # [1, 1]


class _Gates:
    """Decay factors of one chunk, fp32; None means 1 (no decay).

    q_dec: exp(G_i) ([C, 1] scalar, [C, K] channel) scales the query against the carried state;
    k_end: exp(G_L - G_j) scales key j into the chunk's end state;
    s_dec: exp(G_L) ([1, 1] or [K, 1]) decays the carried state over the chunk;
    pair: scalar only, [C, C] exp(G_i - G_j) (clamped at 0 above the diagonal), or its
    transpose; g: channel only, G [C, K] for the sub-chunked intra terms.
    """

    def __init__(self, mode: str, gate_ref, c: int, transposed: bool = False):
        self.mode = mode
        self.q_dec = self.k_end = self.s_dec = self.pair = self.g = None
        if mode == "scalar":
            gr = gate_ref[...]                                  # [1, C]
            gc = _row_to_col(gr)                                # [C, 1]
            gl = _col(gr, c - 1)                                # [1, 1]
            self.q_dec = jnp.exp(gc)
            self.k_end = jnp.exp(gl - gc)
            self.s_dec = jnp.exp(gl)
            self.pair = _exp_le0(gr - gc) if transposed else _exp_le0(gc - gr)
        elif mode == "channel":
            g = gate_ref[...]                                   # [C, K]
            gl = _row(g, c - 1)                                 # [1, K]
            self.g = g
            self.q_dec = jnp.exp(g)
            self.k_end = jnp.exp(gl - g)
            self.s_dec = _row_to_col(jnp.exp(gl))               # [K, 1]


def _mul(x, f):
    return x if f is None else x * f


# ------------------------------------------------------------------------ per-channel intra terms
# G decreases along the chunk (g <= 0), so exp(G_i - G_j) <= 1 for j <= i, but the factors
# exp(G_i) and exp(-G_j) of a matmul form can each overflow. Split the chunk into SUB-token
# sub-chunks: a pair of tokens in different sub-chunks goes through a matmul against a
# reference gate G_r between them (both factors have exponents <= 0); a pair inside one
# sub-chunk is computed exactly, one token at a time ([SUB, K] elementwise work per token).

def _intra_scores_channel(q, k, g, cd):
    """A [C, C] fp32, A[i, j] = sum_k q_ik k_jk exp(g_ik - g_jk) for j <= i, from q, k, g
    fp32 [C, K]. Entries above the diagonal are finite junk or 0 (the caller masks them)."""
    c = q.shape[0]
    cols = _iota((SUB, c), 1)
    blocks = []
    for i0 in range(0, c, SUB):
        q_b, g_b = q[i0:i0 + SUB], g[i0:i0 + SUB]
        a = jnp.zeros((SUB, c), F32)
        if i0:
            ref = _row(g, i0)  # G at the sub-chunk's first token: G_j >= ref >= G_i, j < i0 <= i
            a = _dot_nt((q_b * jnp.exp(g_b - ref)).astype(cd), (k * _exp_le0(ref - g)).astype(cd))
            a = jnp.where(cols < i0, a, 0.0)
        k_b = k[i0:i0 + SUB]

        def body(jj, a, q_b=q_b, g_b=g_b, k_b=k_b, i0=i0):
            s = jnp.sum(q_b * _row(k_b, jj) * _exp_le0(g_b - _row(g_b, jj)), axis=1, keepdims=True)
            return a + jnp.where(cols == i0 + jj, s, 0.0)

        blocks.append(lax.fori_loop(0, SUB, body, a))
    return jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


def _intra_rows_channel(p, x, g, cd, *, lower: bool):
    """Gated row mixing, fp32 [C, K]:
        lower: out_r = sum_{c <= r} p_rc x_c exp(g_r - g_c)   (dq: p = dL/dA, x = k)
        upper: out_r = sum_{c >= r} p_rc x_c exp(g_c - g_r)   (dk: p = (dL/dA).T, x = q)
    p [C, C] fp32 is already zero outside its triangle; x, g fp32 [C, K]."""
    c = p.shape[0]
    sgn = 1.0 if lower else -1.0
    cols = _iota((SUB, c), 1)
    blocks = []
    for r0 in range(0, c, SUB):
        p_b, g_b, x_b = p[r0:r0 + SUB], g[r0:r0 + SUB], x[r0:r0 + SUB]
        out = jnp.zeros((SUB, x.shape[1]), F32)
        far = (r0 > 0) if lower else (r0 + SUB < c)
        if far:
            # reference gate between this sub-chunk and the far tokens: its first token (lower)
            # or last token (upper)
            ref = _row(g, r0 if lower else r0 + SUB - 1)
            keep = (cols < r0) if lower else (cols >= r0 + SUB)
            xs = (x * _exp_le0(sgn * (ref - g))).astype(cd)
            out = jnp.exp(sgn * (g_b - ref)) * _dot(jnp.where(keep, p_b, 0.0).astype(cd), xs)

        def body(jj, out, p_b=p_b, g_b=g_b, x_b=x_b, r0=r0):
            w = _col(p_b, r0 + jj)                                   # [SUB, 1]
            return out + w * _row(x_b, jj) * _exp_le0(sgn * (g_b - _row(g_b, jj)))

        blocks.append(lax.fori_loop(0, SUB, body, out))
    return jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


# ----------------------------------------------------------------------------- kernels

def _state_update(s, gates: _Gates, docs: _Docs, k, v, cd):
    """S after the chunk: survive * exp(G_L) S + sum_j to_end_j (k_j exp(G_L - G_j)) v_j^T."""
    kd = _mul(k.astype(F32), gates.k_end) * docs.to_end
    return docs.survive * _mul(s, gates.s_dec) + _dot(kd.T.astype(cd), v)


def _forward_kernel(*refs, mode, scale, n_chunks):
    """refs: q [C,K], k [C,K], v [C,V], (gate), doc [1,C], s0 [K,V] -> o [C,V], sT [K,V];
    scratch: state [K,V] fp32."""
    q_ref, k_ref, v_ref, *refs = refs
    gate_ref = refs.pop(0) if mode != "none" else None
    doc_ref, s0_ref, o_ref, st_ref, s_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    cd = q.dtype
    c = q.shape[0]
    docs = _Docs(doc_ref[...], transposed=False)
    gates = _Gates(mode, gate_ref, c)
    s = s_scr[...]
    if mode == "channel":
        a = _intra_scores_channel(q.astype(F32) * scale, k.astype(F32), gates.g, cd)
    else:
        a = _mul(_dot_nt(q, k) * scale, gates.pair)
    a = jnp.where(docs.pair, a, 0.0)
    q_dec = _mul(q.astype(F32), gates.q_dec) * docs.reach
    o = _dot(a.astype(cd), v) + scale * _dot(q_dec.astype(cd), s.astype(cd))
    o_ref[...] = o.astype(o_ref.dtype)
    s_new = _state_update(s, gates, docs, k, v, cd)
    s_scr[...] = s_new

    @pl.when(n == n_chunks - 1)
    def _():
        st_ref[...] = s_new


def _dq_kernel(*refs, mode, scale, n_chunks):
    """Forward sweep. refs: k [C,K], v [C,V], (gate), doc [1,C], s0 [K,V], do [C,V]
    -> dq [C,K] fp32; scratch: state [K,V] fp32 (recomputed, as in the forward kernel).

    dq_i = scale (sum_{j<=i, same doc} (dO_i . v_j) k_j exp(G_i - G_j)
                  + reach_i exp(G_i) S dO_i)."""
    k_ref, v_ref, *refs = refs
    gate_ref = refs.pop(0) if mode != "none" else None
    doc_ref, s0_ref, do_ref, dq_ref, s_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    cd = k.dtype
    c = k.shape[0]
    docs = _Docs(doc_ref[...], transposed=False)
    gates = _Gates(mode, gate_ref, c)
    s = s_scr[...]
    p = jnp.where(docs.pair, _dot_nt(do, v) * scale, 0.0)               # dL/dA [C, C]
    inter = _mul(_dot_nt(do, s.astype(cd)) * (scale * docs.reach), gates.q_dec)
    if mode == "channel":
        intra = _intra_rows_channel(p, k.astype(F32), gates.g, cd, lower=True)
    else:
        intra = _dot(_mul(p, gates.pair).astype(cd), k)
    dq_ref[...] = inter + intra
    s_scr[...] = _state_update(s, gates, docs, k, v, cd)


def _dkdv_kernel(*refs, mode, scale, n_chunks):
    """Reverse sweep (chunk n_chunks-1-n at grid step n). refs: q [C,K], k [C,K], v [C,V],
    (gate), doc [1,C], do [C,V], dsT [K,V] -> dk [C,K], dv [C,V] fp32 (per query head),
    ds0 [K,V]; scratch: dS [K,V] fp32, the gradient of the state after this chunk.

    dv_j = sum_{i>=j} A_ij dO_i + to_end_j (k_j exp(G_L - G_j)) dS
    dk_j = sum_{i>=j} P_ij q_i exp(G_i - G_j) + to_end_j exp(G_L - G_j) (dS v_j)
    dS_before = survive exp(G_L) dS + scale sum_i reach_i (q_i exp(G_i))^T dO_i
    with A = scale q k^T (decayed, masked) and P = scale dO v^T (masked)."""
    q_ref, k_ref, v_ref, *refs = refs
    gate_ref = refs.pop(0) if mode != "none" else None
    doc_ref, do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, ds_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dst_ref[...]

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    cd = q.dtype
    c = q.shape[0]
    docs = _Docs(doc_ref[...], transposed=True)                      # pair[j, i]
    gates = _Gates(mode, gate_ref, c, transposed=True)
    ds = ds_scr[...]
    ds_cd = ds.astype(cd)
    pt = jnp.where(docs.pair, _dot_nt(v, do) * scale, 0.0)             # P^T [C(j), C(i)]
    if mode == "channel":
        qf = q.astype(F32)
        at = _intra_scores_channel(qf * scale, k.astype(F32), gates.g, cd).T
        dk_intra = _intra_rows_channel(pt, qf, gates.g, cd, lower=False)
    else:
        at = _mul(_dot_nt(k, q) * scale, gates.pair)                    # A^T [C(j), C(i)]
        dk_intra = _dot(_mul(pt, gates.pair).astype(cd), q)
    at = jnp.where(docs.pair, at, 0.0)
    k_end = _mul(docs.to_end, gates.k_end)                             # [C, 1] or [C, K]
    dv = _dot(at.astype(cd), do) + _dot((k.astype(F32) * k_end).astype(cd), ds_cd)
    dk = dk_intra + k_end * _dot_nt(v, ds_cd)
    dk_ref[...] = dk
    dv_ref[...] = dv
    q_dec = _mul(q.astype(F32), gates.q_dec) * docs.reach
    ds_new = docs.survive * _mul(ds, gates.s_dec) + scale * _dot(q_dec.T.astype(cd), do)
    ds_scr[...] = ds_new

    @pl.when(n == n_chunks - 1)
    def _():
        ds0_ref[...] = ds_new


# ----------------------------------------------------------------------------- pallas_call builders

def _compiler_params():
    params = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    # batch and head programs are independent (megacore may split them); chunks are a
    # sequential loop carrying the state in scratch
    return params(dimension_semantics=("parallel", "parallel", "arbitrary"))


class _Specs:
    """BlockSpecs over the grid (B, H, n_chunks); `reverse` walks the chunks last to first."""

    def __init__(self, c, n_chunks, group, reverse):
        self.c, self.group = c, group
        self.chunk = (lambda n: n_chunks - 1 - n) if reverse else (lambda n: n)

    def q(self, d):        # [B, H, Tp, d] arrays of the query heads
        return pl.BlockSpec((None, None, self.c, d), lambda b, h, n: (b, h, self.chunk(n), 0))

    def kv(self, d):       # [B, G, Tp, d] arrays of the kv heads: head h reads h // group
        # (lax.div: `//` on a traced int lowers through `sign`, which Mosaic lowering only
        # accepts once it knows the TPU generation)
        return pl.BlockSpec((None, None, self.c, d),
                            lambda b, h, n: (b, lax.div(h, self.group), self.chunk(n), 0))

    def state(self, dk, dv):  # [B, H, K, V], one block per (b, h), resident across chunks
        return pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))

    def doc(self):         # [B, n_chunks, 1, C]
        return pl.BlockSpec((None, None, 1, self.c), lambda b, h, n: (b, self.chunk(n), 0, 0))

    def gate(self, mode, dk):
        if mode == "scalar":   # [B, H, n_chunks, 1, C]
            return [pl.BlockSpec((None, None, None, 1, self.c),
                                 lambda b, h, n: (b, h, self.chunk(n), 0, 0))]
        if mode == "channel":  # [B, H, Tp, K]
            return [self.q(dk)]
        return []


def _gate_args(mode, gate):
    return [] if mode == "none" else [gate]


def forward(q, k, v, gate, doc, s0, *, mode, scale, chunk, interpret):
    """q [B,H,Tp,K], k [B,G,Tp,K], v [B,G,Tp,V] (compute dtype), gate per mode, doc
    [B,n,1,C] f32, s0 [B,H,K,V] f32 -> o [B,H,Tp,V] (compute dtype), sT [B,H,K,V] f32."""
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    n_chunks, group = tp // chunk, h // k.shape[1]
    sp = _Specs(chunk, n_chunks, group, reverse=False)
    kernel = functools.partial(_forward_kernel, mode=mode, scale=scale, n_chunks=n_chunks)
    return pl.pallas_call(
        kernel, grid=(b, h, n_chunks),
        in_specs=[sp.q(dk), sp.kv(dk), sp.kv(dv), *sp.gate(mode, dk), sp.doc(),
                  sp.state(dk, dv)],
        out_specs=[sp.q(dv), sp.state(dk, dv)],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_compiler_params(), interpret=interpret,
    )(q, k, v, *_gate_args(mode, gate), doc, s0)


def backward_dq(k, v, gate, doc, s0, do, *, heads, mode, scale, chunk, interpret):
    """-> dq [B,H,Tp,K] f32 (gradient w.r.t. the unscaled q)."""
    b, g, tp, dk = k.shape
    dv = v.shape[-1]
    n_chunks, group = tp // chunk, heads // g
    sp = _Specs(chunk, n_chunks, group, reverse=False)
    kernel = functools.partial(_dq_kernel, mode=mode, scale=scale, n_chunks=n_chunks)
    return pl.pallas_call(
        kernel, grid=(b, heads, n_chunks),
        in_specs=[sp.kv(dk), sp.kv(dv), *sp.gate(mode, dk), sp.doc(),
                  sp.state(dk, dv), sp.q(dv)],
        out_specs=sp.q(dk),
        out_shape=jax.ShapeDtypeStruct((b, heads, tp, dk), F32),
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_compiler_params(), interpret=interpret,
    )(k, v, *_gate_args(mode, gate), doc, s0, do)


def backward_dkdv(q, k, v, gate, doc, do, dst, *, mode, scale, chunk, interpret):
    """-> dk [B,H,Tp,K], dv [B,H,Tp,V] f32 per query head (the caller sums each kv group),
    ds0 [B,H,K,V] f32."""
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    n_chunks, group = tp // chunk, h // k.shape[1]
    sp = _Specs(chunk, n_chunks, group, reverse=True)
    kernel = functools.partial(_dkdv_kernel, mode=mode, scale=scale, n_chunks=n_chunks)
    return pl.pallas_call(
        kernel, grid=(b, h, n_chunks),
        in_specs=[sp.q(dk), sp.kv(dk), sp.kv(dv), *sp.gate(mode, dk), sp.doc(),
                  sp.q(dv), sp.state(dk, dv)],
        out_specs=[sp.q(dk), sp.q(dv), sp.state(dk, dv)],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dk), F32),
                   jax.ShapeDtypeStruct((b, h, tp, dv), F32),
                   jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_compiler_params(), interpret=interpret,
    )(q, k, v, *_gate_args(mode, gate), doc, do, dst)
