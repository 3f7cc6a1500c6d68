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

Everything but the carried state is computed for all chunks at once as batched matmuls; the
triangular systems are solved by `lax.linalg.triangular_solve` (forward substitution, batched:
never matrix powers, whose products lose accuracy as the chunk grows). The only sequential part
is a `lax.scan` over chunks doing one [K, K] x [K, V] matmul per chunk (S = M S + D), then the
outputs are again batched matmuls. A is well conditioned only for unit-norm keys and beta in
(0, 2) (api.py normalises q and k by default): then I + A has unit diagonal and
|A_ij| <= beta_i, and the solve stays accurate at C = 64.

Gradients come from JAX's autodiff (the solve has a transpose rule; the scan saves one state per
chunk, never per token). Everything is float32; outputs are cast back to q.dtype. Masked
exponents are set to -inf before exp, so no inf/NaN reaches the backward pass.

Dimension letters: B batch, H heads, n chunks, C chunk length, K key dim, V value dim.
Working layout: head-major chunks [B, H, n, C, D].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.chunked_linear_attention.xla import chunk_cumsum, doc_masks
from pallas_kernels.delta_rule import common

F32 = common.F32


def delta_rule(q, k, v, beta, log_decay, initial_state, segment_ids, *, scale: float,
               chunk_size: int):
    """Same contract as `reference.delta_rule` (see api.py)."""
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
    tinv = unit_lower_inverse(a)
    u_tilde = jnp.einsum("bhnij,bhnjv->bhniv", tinv * bc[..., None, :], vc)
    w = jnp.einsum("bhnij,bhnjk->bhnik", tinv * (bc * jnp.exp(gc) * reach)[..., None, :], kc)

    g_last = gc[..., -1:]  # [B, H, n, 1]
    k_end = kc * (jnp.exp(g_last - gc) * masks.to_end[:, None])[..., None]
    carry = jnp.exp(g_last[..., 0]) * masks.carry[:, None]  # [B, H, n]

    def step(s, xs):
        w_n, ut_n, ke_n, a_n = xs
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


@jax.custom_vjp
def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], by forward substitution
    (`triangular_solve` against the identity). Its own VJP, because autodiff through the solve
    runs two more solves, about 7x slower on CPU than the two matmuls below:
        T = (I + a)^-1,  dT -> da = -strict_lower(T^T dT T^T)."""
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    return lax.linalg.triangular_solve(eye + a, eye, left_side=True, lower=True, unit_diagonal=True)


def _inverse_fwd(a):
    t = unit_lower_inverse(a)
    return t, t


def _inverse_bwd(t, dt):
    tt = jnp.swapaxes(t, -1, -2)
    da = -jnp.einsum("...ij,...jk,...kl->...il", tt, dt, tt)
    return (jnp.tril(da, -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)
