"""Token-by-token test-time memory: the definition every other implementation is tested against.

    if token t starts a document:        M = W0, S = 0
    if t starts a document or t % b == 0: A = M, lam = 1            (a new gradient anchor)
    if token t is padding (segment 0):   o_t = 0, nothing changes
    else:
        lam = lam (1 - alpha_t)
        u_t = jax.grad(l)(phi(A or lam A); k_t, v_t)  (gradient_at "undecayed" / "decayed")
        S = eta_t S - theta_t u_t                      (plain GD: S = -theta_t u_t)
        M = (1 - alpha_t) M + S
        o_t = phi(M)(q_t)  or  phi(A)(q_t)             (read "after_write" / "chunk_lagged")

(phi: common.weights_of, the identity but for the lq_norm / kl_softmax retentions.)

One `lax.scan` step per token, float32, the gradient by `jax.grad` of the bias loss through
the memory function (any architecture and bias), vmapped over batch rows and heads. Autodiff
through the scan stores the whole memory per token: only for tests and short sequences.
See common.py for the contract; dimension letters as there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.neural_memory import common

F32 = common.F32


def neural_memory(spec: common.MemorySpec, q, k, v, theta, alpha=None, eta=None, delta=None, *,
                  initial_weights, initial_state=None, segment_ids=None):
    """q, k [B,T,H,K], v [B,T,H,V], gates [B,T,H] (the ones `spec` uses, else None):
    theta >= 0 (learning rate), alpha in [0, 1) (decay), eta in (0, 1] (momentum), delta > 0
    (Huber threshold); initial_weights W0: tuple of [H, d_in, d_out] (the memory every document
    starts from); initial_state: None (W0, zero momentum) or common.MemoryState [B, H, ...]
    (the state entering each row); segment_ids None | int [B, T]
    -> (o [B,T,H,V] in q.dtype, final common.MemoryState float32).

    The gate ranges matter to the chunked form, which works with log(1 - alpha) and log(eta):
    alpha = 1 or eta = 0 give -inf there (forward fine, gradient not finite)."""
    common.check(spec, q, k, v, theta, alpha, eta, delta, initial_weights, initial_state,
                 segment_ids)
    theta, alpha, eta = common.hold_gates(spec, (theta, alpha, eta), segment_ids)
    b, t, h, _ = q.shape
    zeros = jnp.zeros((b, t, h), F32)
    alpha = zeros if alpha is None else alpha.astype(F32)
    eta = zeros if eta is None else eta.astype(F32)
    delta = zeros if delta is None else delta.astype(F32)
    if segment_ids is None:
        valid, reset = jnp.ones((b, t), bool), jnp.zeros((b, t), bool)
    else:
        valid, reset = segment_ids != 0, common.resets(segment_ids)
    chunk_start = jnp.arange(t) % spec.chunk_size == 0
    w0 = tuple(x.astype(F32) for x in initial_weights)  # [H, d_in, d_out]
    state = common.start_state(spec, initial_weights, initial_state, b)

    def scan_step(carry, xs):
        (m, s), anchor, lam = carry
        q_t, k_t, v_t, th, al, et, de, valid_t, reset_t, start_t = xs
        o_t, m, s, anchor, lam = token_step(spec, w0, m, s, anchor, lam, q_t, k_t, v_t, th, al,
                                            et, de, valid_t, reset_t, start_t)
        return ((m, s), anchor, lam), o_t

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = tuple(map(time_major, (q.astype(F32), k.astype(F32), v.astype(F32), theta.astype(F32),
                                alpha, eta, delta, valid, reset))) + (chunk_start,)
    carry = ((state.weights, state.momentum), state.weights, jnp.ones((b, h), F32))
    ((m, s), _, _), o = jax.lax.scan(scan_step, carry, xs)
    return time_major(o).astype(q.dtype), common.MemoryState(m, s)


def token_step(spec: common.MemorySpec, w0: tuple, m, s, anchor, lam, q, k, v, theta, alpha, eta,
               delta, valid, reset, start):
    """One token of every row, the definition shared with decode (layers/memory/decode.py).

    m, s, anchor: weights, momentum and the chunk's anchor, tuples of float32 [B, H, d_in, d_out];
    lam [B, H]: product of (1 - alpha) over the chunk so far; q, k [B, H, K], v [B, H, V] and
    theta, alpha, eta, delta [B, H] float32 (zeros for gates `spec` does not use); valid (not
    padding), reset (a document starts here), start (a chunk starts here) bool [B]; w0 tuple of
    [H, d_in, d_out]. Returns (o [B, H, V] float32, zero at padding, m, s, anchor, lam after it).
    """
    m = select_rows(reset, tuple(jnp.broadcast_to(x.astype(F32), y.shape) for x, y in zip(w0, m)), m)
    s = select_rows(reset, jax.tree.map(jnp.zeros_like, s), s)
    new = reset | start
    anchor = select_rows(new, m, anchor)
    lam = jnp.where(new[:, None], 1.0, lam)

    lam_t = lam * (1.0 - alpha)
    point = anchor if spec.gradient_at == "undecayed" else tuple(scale(lam_t, a) for a in anchor)
    # d l / d weights for every (row, head): weights [B, H, ...], k [B, H, K], v [B, H, V].
    point = common.weights_of(spec, point)
    grad = jax.grad(lambda w, k_, v_, d_: common.token_loss(spec, w, k_, v_, d_))
    u = jax.vmap(jax.vmap(grad))(point, k, v, delta)
    if spec.momentum:
        s_new = tuple(scale(eta, x) - scale(theta, g) for x, g in zip(s, u))
        step = s_new
    else:
        s_new, step = s, tuple(-scale(theta, g) for g in u)
    m_new = tuple(scale(1.0 - alpha, x) + d for x, d in zip(m, step))

    read = jax.vmap(jax.vmap(lambda w, x: common.apply(spec, w, x)))
    o = read(common.weights_of(spec, m_new if spec.read == "after_write" else anchor), q)
    m, s = select_rows(valid, m_new, m), select_rows(valid, s_new, s)
    lam = jnp.where(valid[:, None], lam_t, lam)
    return jnp.where(valid[:, None, None], o, 0.0), m, s, anchor, lam


def select_rows(c, x, y):
    """c [B] or [B, H] selects between the pytrees x and y of [B, H, ...] leaves."""
    return jax.tree.map(lambda a, z: jnp.where(c.reshape(c.shape + (1,) * (a.ndim - c.ndim)), a, z),
                        x, y)


def scale(c, x):
    """c [B, H] times x [B, H, ...]."""
    return c.reshape(c.shape + (1,) * (x.ndim - 2)) * x
