"""Pallas Mosaic (TPU) kernel bodies and `pallas_call` builders of the (gated) delta rule.

The algorithm, grids, residuals and block rules are described in tpu.py; this module holds the
two kernels (the chunk sweep, which either writes outputs and the final state or, for the
backward, the state entering every chunk; and the reverse gradient sweep) and the in-chunk math
they share. Everything here works on one (batch, query head, chunk) grid point.

Per grid point a kernel sees (C = chunk, K / V = head dims):
  q, k: [C, K], v, do: [C, V] in the compute dtype `cd` (bfloat16 or float32);
  beta, gate, doc: [1, C] float32 rows: the write strength, the chunk-local inclusive cumsum G of
    the log decay (<= 0, decreasing) and the document number relative to the document of the
    previous chunk's last token (0: the carried state reaches this token), an exact small integer;
  a [K, V] float32 state (or its gradient) carried across the sequential chunk axis in VMEM.

Mosaic-friendly choices (as in chunked_linear_attention/tpu_kernels.py): only 2-D arrays;
matmuls are NN, NT, or an fp32 `.T` followed by NN; scalars and columns come from masked sums
over an iota, never from unaligned slices; a row becomes a column (and back) by a masked sum
over an [N, N] identity mask, so no [N, 1] array is read from HBM; every exponent is <= 0.
The triangular algebra (A, its inverse T and every product with T) is float32 whatever the
input dtype: T's entries are not small, and bfloat16 rounding there is amplified by the
recurrence. The [C, K] x [K, V] products with the state use the compute dtype, as fla does.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
BLOCK = 16  # diagonal blocks of the triangular inverse: solved row by row, then merged

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


# ----------------------------------------------------------------------------- small helpers

def _dot(a, b, cd=None):
    """a [M, N] @ b [N, P] -> fp32 [M, P]; operands cast to `cd` first when given. fp32
    operands ask Mosaic for a full fp32 contraction instead of its default bf16 passes."""
    if cd is not None:
        a, b = a.astype(cd), b.astype(cd)
    prec = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(a, b, _NN, precision=prec, preferred_element_type=F32)


def _dot_nt(a, b, cd=None):
    """a [M, N] @ b [P, N].T -> fp32 [M, P]."""
    if cd is not None:
        a, b = a.astype(cd), b.astype(cd)
    prec = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(a, b, _NT, precision=prec, preferred_element_type=F32)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _eye(n):
    return _iota((n, n), 0) == _iota((n, n), 1)


def _col(x, j):
    """Column j of x [R, L] as [R, 1]: a masked lane sum."""
    return jnp.sum(jnp.where(_iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def _row_to_col(r):
    """[1, N] -> [N, 1] without a transpose: the diagonal of the row broadcast to [N, N]."""
    return jnp.sum(jnp.where(_eye(r.shape[1]), r, 0.0), axis=1, keepdims=True)


def _col_to_row(c):
    """[N, 1] -> [1, N], the mirror of `_row_to_col`."""
    return jnp.sum(jnp.where(_eye(c.shape[0]), c, 0.0), axis=0, keepdims=True)


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _exp_le0(x):
    """exp(min(x, 0)): decays of masked-out (anti-causal) pairs would overflow otherwise."""
    return jnp.exp(jnp.minimum(x, 0.0))


def unit_lower_inverse(a):
    """T = (I + a)^{-1} for a strictly lower triangular fp32 a [C, C] (C a multiple of BLOCK or
    smaller), by substitution, never by matrix powers.

    1. The BLOCK x BLOCK diagonal blocks are inverted together by forward substitution: at step
       r, row r of every block is e_r - sum_{j < r} a_rj T_j, whose rows j are already final.
       The rows are selected by masks (one [C, C] matmul per step), not by dynamic indexing.
    2. Block rows are merged in order: T_r = D_r (E_r - N_r T), where D is the block-diagonal
       inverse of step 1 and N the part of a below the diagonal blocks; block rows < r of T are
       final when block row r is formed ([[A, 0], [C, B]]^{-1} = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]
       applied one block row at a time).
    Well conditioned for unit-norm keys and beta in (0, 2) (the mixers' range, see api.py).
    """
    c = a.shape[0]
    blk = min(c, BLOCK)
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)
    eye = jnp.where(rows == cols, 1.0, 0.0)
    # block numbers by compares and adds only (no vector integer division in the kernel)
    row_block, col_block = jnp.zeros_like(rows), jnp.zeros_like(cols)
    for start in range(blk, c, blk):
        row_block = row_block + jnp.where(rows >= start, 1, 0)
        col_block = col_block + jnp.where(cols >= start, 1, 0)
    same_block = row_block == col_block
    a_diag = jnp.where(same_block, a, 0.0)
    local_row = rows - blk * row_block

    def substitute(r, t):
        return jnp.where(local_row == r, eye - _dot(a_diag, t), t)

    d = lax.fori_loop(1, blk, substitute, eye)
    if c == blk:
        return d
    below = jnp.where(same_block, 0.0, a)  # strictly below the diagonal blocks
    t = d
    for rb in range(1, c // blk):
        merged = d - _dot(d, _dot(below, t))
        t = jnp.where(row_block == rb, merged, t)
    return t


# ----------------------------------------------------------------------------- chunk math

def chunk_forward(q, k, v, beta, gate, doc, s):
    """Forward quantities of one chunk (see tpu.py for the formulas); all [.] fp32 unless noted.

    q, k [C, K], v [C, V] in the compute dtype; beta, gate, doc [1, C] fp32 rows; s [K, V] fp32
    the state entering the chunk. Returns a namespace with the masks (strict: j < i,
    incl: j <= i, both within one document), the decays (gam [C, C] = exp(G_i - G_j), exponent
    clamped at 0; eg [C, 1] = reach exp(G); ke [C, 1] = to_end exp(G_L - G_j); s_dec [1, 1]),
    the beta column bc, ahat = masked k k^T gam, a = bc ahat, t = (I + a)^{-1}, kb, vb, w, u."""
    c = q.shape[0]
    cd = q.dtype
    x = SimpleNamespace()
    rows, cols = _iota((c, c), 0), _iota((c, c), 1)
    dc = _row_to_col(doc)
    same = dc == doc
    x.strict = (rows > cols) & same
    x.incl = (rows >= cols) & same
    last = _col(doc, c - 1)                                    # [1, 1]
    reach = jnp.where(dc == 0.0, 1.0, 0.0)                     # carried state reaches token i
    to_end = jnp.where(dc == last, 1.0, 0.0)                   # token j is in the last document
    survive = jnp.where(last == 0.0, 1.0, 0.0)                 # no reset inside the chunk
    x.bc = _row_to_col(beta)
    gc = _row_to_col(gate)
    gl = _col(gate, c - 1)
    x.gam = _exp_le0(gc - gate)
    x.eg = jnp.exp(gc) * reach
    x.ke = jnp.exp(gl - gc) * to_end
    x.s_dec = survive * jnp.exp(gl)
    x.kf, x.vf = k.astype(F32), v.astype(F32)
    x.ahat = jnp.where(x.strict, _dot_nt(k, k) * x.gam, 0.0)
    x.a = x.bc * x.ahat
    x.t = unit_lower_inverse(x.a)
    x.kb = x.kf * (x.bc * x.eg)
    x.vb = x.vf * x.bc
    x.w = _dot(x.t, x.kb)                                      # fp32 triangular products
    x.u = _dot(x.t, x.vb) - _dot(x.w, s, cd)                   # new values U~ - W S
    return x


def _state_after(x, s, cd):
    """S after the chunk: survive exp(G_L) S + sum_j to_end_j exp(G_L - G_j) k_j u_j^T."""
    return x.s_dec * s + _dot((x.kf * x.ke).T, x.u, cd)


# ----------------------------------------------------------------------------- kernels

def _forward_kernel(q_ref, k_ref, v_ref, beta_ref, gate_ref, doc_ref, s0_ref, *refs, scale,
                    n_chunks, states):
    """Chunk sweep. states=False: refs -> o [C,V], sT [K,V]; states=True: -> the state entering
    this chunk [K,V] (the backward's recompute; outputs are skipped). Scratch: state [K,V]."""
    n = pl.program_id(2)
    s_scr = refs[-1]

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    cd = q.dtype
    s = s_scr[...]
    x = chunk_forward(q, k, v, beta_ref[...], gate_ref[...], doc_ref[...], s)
    s_new = _state_after(x, s, cd)
    s_scr[...] = s_new
    if states:
        refs[0][...] = s
        return
    o_ref, st_ref = refs[0], refs[1]
    p = jnp.where(x.incl, _dot_nt(q, k) * x.gam, 0.0)
    o = _dot(p, x.u, cd) + _dot(q.astype(F32) * x.eg, s, cd)
    o_ref[...] = (scale * o).astype(o_ref.dtype)

    @pl.when(n == n_chunks - 1)
    def _():
        st_ref[...] = s_new


def _backward_kernel(q_ref, k_ref, v_ref, beta_ref, gate_ref, doc_ref, s_ref, do_ref, dst_ref,
                     dq_ref, dk_ref, dv_ref, dbeta_ref, dgate_ref, ds0_ref, ds_scr, *, scale,
                     n_chunks):
    """Reverse sweep (chunk n_chunks-1-n at grid step n). refs: q, k, v, beta, gate, doc, the
    state S entering the chunk [K,V], do [C,V], dsT [K,V] -> dq [C,K], dk [C,K], dv [C,V]
    (fp32, per query head), dbeta [1,C], dG [1,C] (gradient w.r.t. the chunk-local cumsum),
    ds0 [K,V]; scratch: dS [K,V] fp32, the gradient of the state after this chunk."""
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dst_ref[...]

    q, k, do = q_ref[...], k_ref[...], do_ref[...]
    cd = q.dtype
    c = q.shape[0]
    s, ds = s_ref[...], ds_scr[...]
    x = chunk_forward(q, k, v_ref[...], beta_ref[...], gate_ref[...], doc_ref[...], s)
    qf = q.astype(F32)
    ke = x.kf * x.ke

    # outputs o = scale (P U + Qr S), P = incl * (q k^T) * gam, Qr = eg * q; state S' = ... + ke^T U
    p = jnp.where(x.incl, _dot_nt(q, k) * x.gam, 0.0)
    du = scale * _dot(p.T, do, cd) + _dot(ke, ds, cd)                      # dL/dU [C, V]
    dp = jnp.where(x.incl, scale * _dot_nt(do, x.u, cd), 0.0)              # dL/dP
    dq_inter = scale * x.eg * _dot_nt(do, s, cd)                           # via Qr S
    dq = dq_inter + _dot(dp * x.gam, k, cd)
    dke = _dot_nt(x.u, ds, cd)                                             # dL/d(ke) [C, K]
    dk = _dot((dp * x.gam).T, q, cd) + x.ke * dke

    # through U = T vb - W S, W = T kb, T = (I + A)^{-1}: dA = -T^T dT T^T on A's support
    dw = -_dot_nt(du, s, cd)
    dt = _dot_nt(dw, x.kb) + _dot_nt(du, x.vb)
    t_t = x.t.T
    dkb = _dot(t_t, dw)
    dvb = _dot(t_t, du)
    da = jnp.where(x.strict, -_dot(_dot(t_t, dt), t_t), 0.0)
    z = da * x.bc * x.gam                                                  # dL/d(k k^T)
    dk = dk + _dot(z, k, cd) + _dot(z.T, k, cd) + (x.bc * x.eg) * dkb
    dv = x.bc * dvb

    dbeta = _rowsum(da * x.ahat) + _rowsum(dkb * x.kf) * x.eg + _rowsum(dvb * x.vf)
    # G enters through exp(G_i - G_j) in A and P (+ at i, - at j), exp(G_i) in Qr and kb,
    # exp(G_L - G_j) in ke and exp(G_L) in the state decay
    pair = da * x.a + dp * p
    rke = _rowsum(dke * ke)
    dgate = (_col_to_row(_rowsum(pair) + _rowsum(dq_inter * qf) + _rowsum(dkb * x.kb) - rke)
             - jnp.sum(pair, axis=0, keepdims=True))
    state_term = x.s_dec * jnp.sum(_rowsum(ds * s), axis=0, keepdims=True)      # [1, 1]
    at_end = jnp.sum(rke, axis=0, keepdims=True) + state_term
    dgate = dgate + jnp.where(_iota((1, c), 1) == c - 1, at_end, 0.0)

    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv
    dbeta_ref[...] = _col_to_row(dbeta)
    dgate_ref[...] = dgate
    ds_new = (x.s_dec * ds + scale * _dot((qf * x.eg).T, do, cd) - _dot(x.w.T, du, cd))
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
        # (lax.div: `//` on a traced int lowers through `sign`, which Mosaic rejects)
        return pl.BlockSpec((None, None, self.c, d),
                            lambda b, h, n: (b, lax.div(h, self.group), self.chunk(n), 0))

    def row(self):         # [B, H, n_chunks, 1, C] per-token scalars of the query heads
        return pl.BlockSpec((None, None, None, 1, self.c),
                            lambda b, h, n: (b, h, self.chunk(n), 0, 0))

    def doc(self):         # [B, n_chunks, 1, C]
        return pl.BlockSpec((None, None, 1, self.c), lambda b, h, n: (b, self.chunk(n), 0, 0))

    def state(self, dk, dv):  # [B, H, K, V], one block per (b, h), resident across chunks
        return pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, 0, 0))

    def chunk_state(self, dk, dv):  # [B, H, n_chunks, K, V], one block per chunk
        return pl.BlockSpec((None, None, None, dk, dv),
                            lambda b, h, n: (b, h, self.chunk(n), 0, 0))


def forward(q, k, v, beta, gate, doc, s0, *, scale, chunk, interpret, states=False):
    """q [B,H,Tp,K], k [B,G,Tp,K], v [B,G,Tp,V] (compute dtype), beta, gate [B,H,n,1,C] f32,
    doc [B,n,1,C] f32, s0 [B,H,K,V] f32 -> (o [B,H,Tp,V] compute dtype, sT [B,H,K,V] f32), or
    with states=True the state entering every chunk [B,H,n,K,V] f32."""
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    n_chunks, group = tp // chunk, h // k.shape[1]
    sp = _Specs(chunk, n_chunks, group, reverse=False)
    kernel = functools.partial(_forward_kernel, scale=scale, n_chunks=n_chunks, states=states)
    if states:
        out_specs = [sp.chunk_state(dk, dv)]
        out_shape = [jax.ShapeDtypeStruct((b, h, n_chunks, dk, dv), F32)]
    else:
        out_specs = [sp.q(dv), sp.state(dk, dv)]
        out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype),
                     jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    out = pl.pallas_call(
        kernel, grid=(b, h, n_chunks),
        in_specs=[sp.q(dk), sp.kv(dk), sp.kv(dv), sp.row(), sp.row(), sp.doc(),
                  sp.state(dk, dv)],
        out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_compiler_params(), interpret=interpret,
    )(q, k, v, beta, gate, doc, s0)
    return out[0] if states else tuple(out)


def backward(q, k, v, beta, gate, doc, states, do, dst, *, scale, chunk, interpret):
    """-> dq [B,H,Tp,K], dk [B,H,Tp,K], dv [B,H,Tp,V] f32 per query head (the caller sums each
    kv group), dbeta, dG [B,H,n,1,C] f32, ds0 [B,H,K,V] f32."""
    b, h, tp, dk = q.shape
    dv = v.shape[-1]
    n_chunks, group = tp // chunk, h // k.shape[1]
    sp = _Specs(chunk, n_chunks, group, reverse=True)
    kernel = functools.partial(_backward_kernel, scale=scale, n_chunks=n_chunks)
    rows = jax.ShapeDtypeStruct((b, h, n_chunks, 1, chunk), F32)
    return pl.pallas_call(
        kernel, grid=(b, h, n_chunks),
        in_specs=[sp.q(dk), sp.kv(dk), sp.kv(dv), sp.row(), sp.row(), sp.doc(),
                  sp.chunk_state(dk, dv), sp.q(dv), sp.state(dk, dv)],
        out_specs=[sp.q(dk), sp.q(dk), sp.q(dv), sp.row(), sp.row(), sp.state(dk, dv)],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dk), F32),
                   jax.ShapeDtypeStruct((b, h, tp, dk), F32),
                   jax.ShapeDtypeStruct((b, h, tp, dv), F32), rows, rows,
                   jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        scratch_shapes=[pltpu.VMEM((dk, dv), F32)],
        compiler_params=_compiler_params(), interpret=interpret,
    )(q, k, v, beta, gate, doc, states, do, dst)
