"""The delta rule in chunked WY/UT form, pure JAX, for any XLA backend (the CPU default).

Per (batch row, head) and chunk of C tokens, with G the chunk-local inclusive cumsum of the log
decays (every exponent below is <= 0) and S0 the state entering the chunk, the C steps of

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T

unroll as follows (DeltaNet's WY representation, anchors_kernels.md 1.3, with GDN's gates and
this project's document masks). The "new values" u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t)
satisfy the unit lower-triangular system

    (I + A) U = diag(beta) V - diag(beta exp(G) reach) K S0,
    A_ij = beta_i exp(G_i - G_j) (k_i . k_j)   for j < i in the same document, else 0,

so with W = (I + A)^-1 diag(beta exp(G) reach) K and U~ = (I + A)^-1 diag(beta) V:

    U      = U~ - W S0
    O_i    = scale [ reach_i exp(G_i) q_i S0 + sum_{j <= i, same doc} exp(G_i - G_j) (q_i . k_j) U_j ]
    S_next = carry exp(G_C) S0 + sum_{j in the last doc} exp(G_C - G_j) k_j U_j^T
           = M S0 + D,   M = carry exp(G_C) I - K_end^T W,   D = K_end^T U~

(reach / carry / same / last doc: the document masks of chunked linear attention, xla.py.)

Everything but the carried state is computed for all chunks at once as batched matmuls. The
triangular systems are solved through T = (I + A)^-1, formed by blocked forward substitution
(`unit_lower_inverse`: 16 x 16 diagonal blocks by a substitution loop, merged by matmuls; never
matrix powers, whose products lose accuracy as the chunk grows, and never
`lax.linalg.triangular_solve`, which XLA:CPU runs as a slow per-matrix loop). The only
sequential part is a `lax.scan` over chunks doing two small matmuls per chunk (correct U with
the running state, then S = carry S + K_end^T U), then the outputs are again batched matmuls.
A is well conditioned only for unit-norm keys and beta in (0, 2) (api.py normalises q and k by
default): then I + A has unit diagonal and |A_ij| <= beta_i, and the substitution stays accurate
at C = 64.

Gradients come from JAX's autodiff, except through the triangular solve, whose VJP is two
matmuls (`unit_lower_solve`). As chunked linear attention's, the op is rematerialised: the
backward pass keeps its inputs and the state entering each chunk, and recomputes the rest
(the WY matrices included: the inverse is a small part of the time, and keeping T, W, U~
and U would cost several C x K arrays per token). Everything is
float32; outputs are cast back to q.dtype. Masked exponents are set to -inf before exp, so no
inf/NaN reaches the backward pass.

Dimension letters: B batch, H heads, n chunks, C chunk length, K key dim, V value dim.
Working layout: head-major chunks [B, H, n, C, D].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.chunked_linear_attention.xla import STATES, chunk_cumsum, doc_masks, remat_states
from pallas_kernels.delta_rule import common

F32 = common.F32


def delta_rule(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale: float,
               chunk_size: int):
    """Same contract as `reference.delta_rule` (see api.py)."""
    core = functools.partial(_forward, scale=scale, chunk_size=chunk_size)
    return remat_states(core)(q, k, v, beta, log_decay, initial_state, segment_ids)


def _forward(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale: float, chunk_size: int):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, max(16, 1 << (t - 1).bit_length()))  # no 64-chunk for a 5-token call
    p = common.prepare(q, k, v, beta, log_decay, segment_ids, c)
    n = p.q.shape[1] // c

    def chunks(x):  # [B, Tp, H, D] -> [B, H, n, C, D] float32
        x = x.astype(F32).reshape(b, n, c, h, -1)
        return jnp.transpose(x, (0, 3, 1, 2, 4))

    qc = chunks(p.q) * scale
    kc, vc = chunks(common.expand_kv(p.k, h)), chunks(common.expand_kv(p.v, h))
    bc = chunks(p.beta[..., None])[..., 0]  # [B, H, n, C]
    gc = chunk_cumsum(chunks(p.g[..., None]))[..., 0]  # [B, H, n, C], <= 0, decreasing
    masks = doc_masks(p.doc.reshape(b, n, c))
    same = masks.same[:, None]  # [B, 1, n, C, C], j <= i

    # Decay between positions i >= j of one document, exp(G_i - G_j); zero elsewhere.
    decay = jnp.exp(jnp.where(same, gc[..., :, None] - gc[..., None, :], -jnp.inf))
    strict = decay * (1.0 - jnp.eye(c, dtype=F32))  # j < i
    a = bc[..., None] * jnp.einsum("bhnik,bhnjk->bhnij", kc, kc) * strict
    reach = masks.reach[:, None]  # [B, 1, n, C]
    # U~ = T diag(beta) V and W = T diag(beta exp(G) reach) K, T = (I + A)^-1: one solve
    # against both right-hand sides side by side.
    rhs = jnp.concatenate([vc * bc[..., None], kc * (bc * jnp.exp(gc) * reach)[..., None]], axis=-1)
    u_tilde, w = jnp.split(unit_lower_solve(a, rhs), [dv], axis=-1)

    g_last = gc[..., -1:]  # [B, H, n, 1]
    k_end = kc * (jnp.exp(g_last - gc) * masks.to_end[:, None])[..., None]
    carry = jnp.exp(g_last[..., 0]) * masks.carry[:, None]  # [B, H, n]

    def step(s, xs):
        w_n, ut_n, ke_n, a_n = xs
        s = checkpoint_name(s, STATES)
        u_n = ut_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s)
        return a_n[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", ke_n, u_n), (s, u_n)

    to_scan = lambda x: jnp.moveaxis(x, 2, 0)
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    # unroll: the body is one small matmul, and the loop overhead of XLA:CPU was half the time.
    s_final, (s_prev, u) = lax.scan(step, s0, tuple(map(to_scan, (w, u_tilde, k_end, carry))), unroll=4)
    s_prev = jnp.moveaxis(s_prev, 0, 2)  # [B, H, n, K, V]
    u = jnp.moveaxis(u, 0, 2)
    q_inter = qc * (jnp.exp(gc) * reach)[..., None]
    scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * decay
    o = (jnp.einsum("bhnik,bhnkv->bhniv", q_inter, s_prev)
         + jnp.einsum("bhnij,bhnjv->bhniv", scores, u))
    o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(b, n * c, h, dv)
    return common.finish(o.astype(q.dtype), p.valid), s_final


INVERSE_BLOCK = 16  # diagonal blocks of (I + A) inverted by substitution, then merged by matmuls


@jax.custom_vjp
def unit_lower_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """X = (I + a)^-1 rhs for strictly lower-triangular a [..., C, C] and rhs [..., C, D].

    The forward forms T = (I + a)^-1 (`unit_lower_inverse`), then one matmul. Its own VJP,
    from (I + a) X = rhs, is two matmuls of the forward's size:
        d rhs = T^T dX,   da = -strict_lower(d rhs X^T);
    autodiff through T would instead form dT = dX rhs^T and -T^T dT T^T, two more
    [C, C] x [C, C] matmuls per chunk (1.0-1.4x slower fwd+bwd of the whole op)."""
    return _solve_fwd(a, rhs)[0]


def _solve_fwd(a, rhs):
    t = unit_lower_inverse(a)
    x = jnp.einsum("...ij,...jd->...id", t, rhs)
    return x, (t, x)


def _solve_bwd(res, dx):
    t, x = res
    drhs = jnp.einsum("...ji,...jd->...id", t, dx)
    return jnp.tril(-jnp.einsum("...id,...jd->...ij", drhs, x), -1), drhs


unit_lower_solve.defvjp(_solve_fwd, _solve_bwd)


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], C a power of two.

    Blocked forward substitution, with no `triangular_solve`: XLA:CPU runs a batched solve of
    many small matrices as a slow per-matrix loop, which degrades badly when other processes
    share the cores (benchmarks/delta_solve.py: 2.8-7x slower than this at [8, 4, 4, 64, 64],
    4-6x at [8, 4, 32, 64, 64], on a 2-core machine at load 5-7). The C / b diagonal blocks
    of b = INVERSE_BLOCK rows are inverted together by a b-step substitution loop
    (`_substitution_inverse`); then pairs of neighbouring inverses are merged into the inverse
    of the twice larger diagonal block with two matmuls (`_merge_pairs`) until one block covers
    the chunk. Every step is exact arithmetic on the triangular factors (no matrix powers), so
    it is as accurate as the solve (relative error ~4e-7 at C = 64, beta up to 2). Not meant
    for autodiff (it would run the substitution loop backwards): `unit_lower_solve` has the
    VJP."""
    c = a.shape[-1]
    t = _substitution_inverse(_diagonal_blocks(a, min(INVERSE_BLOCK, c)))
    while t.shape[-1] < c:
        t = _merge_pairs(t, _diagonal_blocks(a, 2 * t.shape[-1]))
    return t[..., 0, :, :]


def _diagonal_blocks(a: jax.Array, size: int) -> jax.Array:
    """[..., C, C] -> its C / size diagonal blocks [..., C / size, size, size]."""
    c = a.shape[-1]
    return jnp.stack([a[..., i:i + size, i:i + size] for i in range(0, c, size)], axis=-3)


def _substitution_inverse(a: jax.Array) -> jax.Array:
    """(I + a)^-1 for strictly lower-triangular a [..., b, b] by forward substitution, one row
    per step for all matrices at once: row i of T is e_i - a_i T (a_i is zero from column i
    on, so it reads only the rows of T already final)."""
    b = a.shape[-1]
    eye = jnp.eye(b, dtype=a.dtype)

    def row(i, t):
        t_i = lax.dynamic_index_in_dim(eye, i, 0, keepdims=False) - jnp.einsum(
            "...j,...jk->...k", lax.dynamic_index_in_dim(a, i, -2, keepdims=False), t)
        return lax.dynamic_update_index_in_dim(t, t_i, i, -2)

    return lax.fori_loop(1, b, row, jnp.broadcast_to(eye, a.shape))


def _merge_pairs(t: jax.Array, a: jax.Array) -> jax.Array:
    """Inverses of diagonal blocks of size s, t [..., 2p, s, s], and the diagonal blocks of
    size 2s of the strictly lower matrix, a [..., p, 2s, 2s] -> inverses of those blocks:

        [[I + A11, 0], [A21, I + A22]]^-1 = [[T1, 0], [-T2 A21 T1, T2]]."""
    s = t.shape[-1]
    t1, t2 = t[..., 0::2, :, :], t[..., 1::2, :, :]
    t21 = -jnp.einsum("...ij,...jk->...ik", t2, a[..., s:, :s] @ t1)
    top = jnp.concatenate([t1, jnp.zeros_like(t1)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([t21, t2], axis=-1)], axis=-2)
