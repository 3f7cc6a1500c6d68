"""Test-time memory in chunk-parallel form, pure JAX, for any XLA backend.

Per (batch row, head) and chunk of C = b tokens, every gradient of the chunk is taken at the
same anchor, so the per-token gradients u_i are computed in parallel. Momentum and decay are
then linear recurrences with per-token coefficients; unrolled over the chunk, with
lam_t = 1 - alpha_t and everything counted from the chunk entry (or from the token's document
start, where W0 and zero momentum replace the carried state):

    S_s = P_s S_0 - sum_{i<=s} (P_s / P_i) theta_i u_i,            P_s = prod_{j<=s} eta_j
    M_t = L_t M_0 + f_t S_0 - sum_{i<=t} G_{t,i} theta_i u_i,      L_t = prod_{j<=t} lam_j
    f_t = sum_{s<=t} Adec_{t,s} P_s,   G = Adec @ Bmom,   Adec_{t,s} = valid_s L_t / L_s,
    Bmom_{s,i} = P_s / P_i

(padding has theta = 0, lam = eta = 1, and valid_s = 0 because a padding step must not add the
momentum S_s to M).

plain GD: G = Adec, f = 0 (Titans Eq 16, and the f / G matrices of fla's naive Titans).
All ratios are exponentials of segment sums of log gates taken inside the chunk (exponents
<= 0, no cumsum differences, so a gate of 0 gives -inf and exp 0, never inf - inf).

Dual form (every memory whose weights are its state, i.e. all retentions but lq_norm and
kl_softmax): the gradient of any bias with respect to layer l of the memory is an outer product,
u_i = a_i^T d_i, with a_i the layer's input and d_i = dl/dz_i the gradient at its output, both
at the token's gradient point (TTT's observation for linear and MLP memories). So reading the
chunk's per-token weights at input b_t of layer l needs no per-token W:

    z_t = L_t b_t A + f_t b_t S_0 - sum_{i<=t} G_{t,i} theta_i (b_t . a_i) d_i,   b_{t+1} = act(z_t)

layer by layer from b = q_t, and o_t = readout(q_t, z_t of the last layer). a_i and d_i come
from one batched forward of the chunk's keys at the anchors and its vjp with respect to each
layer's pre-activation, so the bias, activation, residual and LayerNorm need no hand-written
derivative. Cost per chunk and layer: two [C, C] products, no [C, d_in, d_out] tensor.

Materialised form (`dual=False`; the only one for lq_norm / kl_softmax, whose weights are a
non-linear map of the state): per-token gradients by `jax.vmap(jax.grad(l))` at the anchor and
the per-token states M_t of the chunk formed explicitly ([C, ...] per layer, per row and head,
inside the scan body only), then o_t = M(q_t; phi(M_t)). It costs C times the memory's size
per (row, head) in activations, and is the check of the dual form.

A `lax.scan` over chunks carries (M, S) in float32; its body is rematerialised
(`jax.checkpoint`), so the backward pass stores one state per chunk, never per token.
In the dual form, a token's anchor is W0 only where its document starts inside its chunk; the
chunk body multiplies by W0 (besides the carried state, selecting per token) only in chunks that
have such a token (`lax.cond` per chunk, and one scan without any W0 product when no row has
one): the W0 products were 5 of the body's 16 [C, d] x [d, d'] matmuls per chunk.
Dimension letters as in common.py; working layout chunk-major [n, B, H, C, ...].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.neural_memory import common

F32 = common.F32


def neural_memory(spec: common.MemorySpec, q, k, v, theta, alpha=None, eta=None, delta=None, *,
                  initial_weights, initial_state=None, segment_ids=None, dual: bool | None = None):
    """Same contract as `reference.neural_memory`. dual: the dual form (the default where it
    applies: every retention but lq_norm / kl_softmax, whose weights are a non-linear map of
    the state); False materialises per-token weights by `vmap(grad)` (any memory; the check
    of the dual form)."""
    common.check(spec, q, k, v, theta, alpha, eta, delta, initial_weights, initial_state,
                 segment_ids)
    theta, alpha, eta = common.hold_gates(spec, (theta, alpha, eta), segment_ids)
    dual = not spec.mapped if dual is None else dual
    if dual and spec.mapped:
        raise ValueError(f"dual=True needs weights equal to the state; retention "
                         f"{spec.retention!r} maps them (use dual=False or None)")
    b, t, h, _ = q.shape
    c = spec.chunk_size
    tp = -(-t // c) * c
    n = tp // c

    if segment_ids is None:
        valid, doc = jnp.ones((b, t), bool), jnp.zeros((b, t), jnp.int32)
    else:
        valid = segment_ids != 0
        doc = jnp.cumsum(common.resets(segment_ids).astype(jnp.int32), axis=1)
    # Padding tokens become identity steps: theta = 0 (no write), log(1 - alpha) = 0 (no
    # decay), log(eta) = 0 (momentum kept), and delta = 1 (any finite threshold).
    gate = lambda x, off: jnp.where(valid[..., None], x.astype(F32), off)
    theta_ = gate(theta, 0.0)
    log_lam = gate(jnp.log1p(-alpha.astype(F32)), 0.0) if spec.decay else jnp.zeros((b, t, h), F32)
    log_eta = gate(jnp.log(eta.astype(F32)), 0.0) if spec.momentum else jnp.zeros((b, t, h), F32)
    delta_ = jnp.zeros((b, t, h), F32) if delta is None else gate(delta, 1.0)

    # Pad T to whole chunks with padding tokens (identity steps) in the last token's document.
    pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
    doc = jnp.pad(doc, [(0, 0), (0, tp - t)], mode="edge")

    def chunks(x):  # [B, Tp, H, ...] -> [n, B, H, C, ...]
        x = pad(x).reshape(b, n, c, h, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)

    qc, kc, vc = (chunks(x.astype(F32)) for x in (q, k, v))
    th, ll, le, dl = (chunks(x) for x in (theta_, log_lam, log_eta, delta_))  # [n, B, H, C]

    # Document masks per chunk: same[i, j] (j <= i, same document); reach[t] (the carried
    # state reaches t: no document starts between the chunk entry and t).
    docc = jnp.moveaxis(doc.reshape(b, n, c), 1, 0)[:, :, None]  # [n, B, 1, C]
    entry = jnp.concatenate([jnp.zeros((1, b), jnp.int32), docc[:-1, :, 0, -1]])[:, :, None, None]
    reach = docc == entry  # [n, B, 1, C]
    tril = jnp.tril(jnp.ones((c, c), bool))
    same = (docc[..., :, None] == docc[..., None, :]) & tril  # [n, B, 1, C, C]

    # L_t / L_s, with the columns of padding tokens zeroed: a padding step adds no momentum
    # to M (in the sums over s below), while its gates leave every product unchanged.
    validc = chunks(jnp.broadcast_to(valid[..., None], (b, t, h)))  # [n, B, H, C]
    adec = jnp.exp(segsum(ll, same)) * validc[..., None, :]  # [n, B, H, C, C]
    lam_in = jnp.exp(jnp.sum(jnp.where(same, ll[..., None, :], 0.0), -1))  # [n, B, H, C], L_t
    if spec.momentum:
        bmom = jnp.exp(segsum(le, same))  # P_s / P_i
        p_in = jnp.exp(jnp.sum(jnp.where(same, le[..., None, :], 0.0), -1)) * reach  # P_s
        gmat = jnp.einsum("...ts,...si->...ti", adec, bmom)
        f = jnp.einsum("...ts,...s->...t", adec, p_in)
    else:
        bmom = p_in = f = None
        gmat = adec
    coefs = dict(q=qc, k=kc, v=vc, theta=th, delta=dl, reach=jnp.broadcast_to(reach, th.shape),
                 lam_in=lam_in, g=gmat, f=f, bmom=bmom, p_in=p_in)

    w0 = tuple(x.astype(F32) for x in initial_weights)
    state = common.start_state(spec, initial_weights, initial_state, b)
    if dual:
        if spec.read == "after_write":  # layer 1's G o (q . k): independent of the state
            coefs["gq"] = gmat * jnp.einsum("...td,...id->...ti", qc, kc)
        # Rematerialised per chunk: the backward pass stores one state per chunk (measured
        # faster on XLA:CPU than saving the body's dots or all of its residuals as well).
        fast = jax.checkpoint(lambda carry, xs: _dual_chunk(spec, w0, carry, xs, carried_only=True))
        slow = jax.checkpoint(lambda carry, xs: _dual_chunk(spec, w0, carry, xs, carried_only=False))
        scan = lambda body: lambda carry, xs: lax.scan(body, carry, xs)
        if segment_ids is None:  # every token reaches the carried state
            final, o = scan(fast)(state, coefs)
        else:
            # Only a chunk with a document start inside it needs W0 products: one branch for
            # rows without any (one scan of the fast body), else a choice per chunk.
            mixed = lambda carry, xs: lax.cond(jnp.all(xs["reach"]), fast, slow, carry, xs)
            final, o = lax.cond(jnp.all(coefs["reach"]), scan(fast), scan(mixed), state, coefs)
    else:
        step = jax.checkpoint(lambda carry, xs: _materialized_chunk(spec, w0, carry, xs))
        final, o = lax.scan(step, state, coefs)  # o [n, B, H, C, V]
    o = jnp.moveaxis(o, 0, 1)  # [B, n, H, C, V]
    o = jnp.moveaxis(o, 2, 3).reshape(b, tp, h, -1)[:, :t]
    return jnp.where(valid[..., None, None], o, 0.0).astype(q.dtype), final


def segsum(x: jax.Array, same: jax.Array) -> jax.Array:
    """x [..., C] (log gates), same [..., C, C] -> [..., C, C]: sum_{s < j <= t} x_j at [t, s]
    where `same` (s <= t in one document), else -inf. Each entry sums only its own terms
    (masked cumsum, as Mamba2's stable segsum): no difference of two cumsums, so -inf gates
    stay -inf and nothing cancels."""
    c = x.shape[-1]
    strict = jnp.tril(jnp.ones((c, c), bool), -1)  # [t, s]: s < t
    terms = jnp.where(strict, x[..., :, None], 0.0)  # [t, s] = x_t for t > s
    return jnp.where(same, jnp.cumsum(terms, axis=-2), -jnp.inf)


def _scale(c, x):
    """c [B, H, C] times x [B, H, C, ...]."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) * x


def _anchor_pass(spec, matmul, xs, z0):
    """The keys through the memory at their gradient point and the vjp of the bias: per layer
    the input a_i [..., C, d_in] and d_i = dl/dz_i [..., C, d_out] (tokens are independent).
    matmul(x, i): x [..., C, d_in] times each token's anchor of layer i; z0 = matmul(k, 0)."""
    k, lam = xs["k"], xs["lam_in"]
    act = common.activation(spec)
    depth = spec.depth if spec.arch == "mlp" else 1

    def forward(eps):  # eps added to each layer's pre-activation z
        a, inputs = k, []
        for i in range(depth):
            inputs.append(a)
            z = z0 if i == 0 else matmul(a, i)
            if spec.gradient_at == "decayed":
                z = _scale(lam, z)
            a = z + eps[i]
            if i < depth - 1:
                a = act(a)
        loss = common.bias_loss(spec, common.readout(spec, k, a), xs["v"], xs["delta"][..., None])
        return loss, tuple(inputs)

    zeros = tuple(jnp.zeros(k.shape[:-1] + (d_out,), F32) for d_out in _widths(spec, k, xs["v"]))
    _, vjp, inputs = jax.vjp(forward, zeros, has_aux=True)
    (d,) = vjp(jnp.ones((), F32))
    return inputs, d


def _widths(spec, k, v):
    """d_out of every layer."""
    return tuple(s[1] for s in common.layer_shapes(spec, k.shape[-1], v.shape[-1]))


def _read(spec, matmul, xs, inputs, td, z0, momentum=None):
    """o [..., C, V] of the chunk's tokens (after_write: their weights after their own write, in
    dual form; chunk_lagged: their anchor). matmul as in `_anchor_pass`; inputs, td: per layer
    a_i and theta_i d_i; z0 = matmul(q, 0); momentum(x, i): x times the carried momentum of
    layer i, or None where the read has no momentum term (plain GD)."""
    q = xs["q"]
    act = common.activation(spec)
    depth = len(inputs)
    b_ = q
    for i in range(depth):
        z = z0 if i == 0 else matmul(b_, i)
        if spec.read == "after_write":
            gram = xs["gq"] if i == 0 and "gq" in xs else \
                xs["g"] * jnp.einsum("...td,...id->...ti", b_, inputs[i])
            z = _scale(xs["lam_in"], z) - jnp.einsum("...ti,...iv->...tv", gram, td[i])
            if momentum is not None:
                z = z + _scale(xs["f"], momentum(b_, i))
        b_ = act(z) if i < depth - 1 else z
    return common.readout(spec, q, b_)


def _dual_chunk(spec, w0, state, xs, carried_only):
    """One chunk of a memory whose weights are its state (phi = identity), any depth, in dual
    form: (M_0, S_0) -> o [B, H, C, V] without per-token weights.

    Every layer's gradient is an outer product, u_i = a_i^T d_i (a_i the layer's input, d_i =
    dl/dz_i its output's gradient, both at the token's gradient point), so reading layer l of
    W_t = L_t A + f_t S_0 - sum_i G_{t,i} theta_i a_i^T d_i at input b_t is
    L_t b_t A + f_t b_t S_0 - sum_i G_{t,i} theta_i (b_t . a_i) d_i: [C, C] matrices per layer.
    a_i, d_i come from one batched forward at the anchors and its vjp w.r.t. each layer's
    pre-activation (any bias, residual, LayerNorm, activation: autodiff does the chain rule).

    carried_only: every token of the chunk reaches the carried state (no document starts
    inside it: xs["reach"] all true), so the anchor is M_0 for all and W0 is never multiplied.
    Else each product with the anchor is taken with both M_0 and W0 and selected per token."""
    reach = xs["reach"]
    r = reach[..., None]  # [B, H, C, 1]: the token's anchor is the carried state, else W0
    depth = len(w0)
    carried = lambda x, i: jnp.einsum("bhci,bhio->bhco", x, state.weights[i])
    if carried_only:
        matmul = carried
    else:
        def matmul(x, i):  # x has C rows, or 2C (the keys, then the queries)
            rows = jnp.concatenate([r] * (x.shape[-2] // r.shape[-2]), axis=-2)
            return jnp.where(rows, carried(x, i), jnp.einsum("bhci,hio->bhco", x, w0[i]))
    # Keys and queries meet the anchor's first layer in one matmul of 2C rows (and one for its
    # weight gradient in the backward pass).
    c = xs["k"].shape[-2]
    z0 = matmul(jnp.concatenate([xs["k"], xs["q"]], axis=-2), 0)
    inputs, d = _anchor_pass(spec, matmul, xs, z0[..., :c, :])
    td = tuple(_scale(xs["theta"], x) for x in d)
    momentum = None
    if spec.momentum and spec.read == "after_write":
        momentum = lambda x, i: jnp.einsum("bhci,bhio->bhco", x, state.momentum[i])
    o = _read(spec, matmul, xs, inputs, td, z0[..., c:, :], momentum)

    # The state after the chunk's last token (padded tail tokens are identity steps).
    last = lambda coef, i: jnp.einsum("bhc,bhcd,bhco->bhdo", coef[..., -1, :], inputs[i], td[i])
    lam = xs["lam_in"]
    m_end, s_end = [], []
    for i in range(depth):
        m_entry = state.weights[i]
        if not carried_only:
            m_entry = jnp.where(reach[..., -1, None, None], m_entry, w0[i])
        m = lam[..., -1, None, None] * m_entry - last(xs["g"], i)
        if spec.momentum:
            s0 = state.momentum[i]
            m = m + xs["f"][..., -1, None, None] * s0
            s_end.append(xs["p_in"][..., -1, None, None] * s0 - last(xs["bmom"], i))
        m_end.append(m)
    return common.MemoryState(tuple(m_end), tuple(s_end)), o


def _materialized_chunk(spec, w0, state, xs):
    """One chunk of any memory by per-token gradients (`vmap(grad)`) and per-token weights
    W_t [B, H, C, ...]: (M_0, S_0) -> o [B, H, C, V]."""
    th, reach, lam = xs["theta"], xs["reach"], xs["lam_in"]
    anchor = tuple(jnp.where(reach.reshape(reach.shape + (1, 1)), m[:, :, None], w[:, None])
                   for m, w in zip(state.weights, w0))  # [B, H, C, d_in, d_out]
    point = anchor if spec.gradient_at == "undecayed" else tuple(_scale(lam, a) for a in anchor)
    point = common.weights_of(spec, point)
    grad = jax.grad(lambda wt, kt, vt, dt: common.token_loss(spec, wt, kt, vt, dt))
    u = jax.vmap(jax.vmap(jax.vmap(grad)))(point, xs["k"], xs["v"], xs["delta"])
    tu = tuple(_scale(th, x) for x in u)

    def written(coef, tree):  # sum_i coef[.., t, i] tu_i -> [B, H, C, ...]
        return tuple(jnp.einsum("bhti,bhi...->bht...", coef, x) for x in tree)

    wt = tuple(_scale(lam, a) - d for a, d in zip(anchor, written(xs["g"], tu)))
    if spec.momentum:
        wt = tuple(x + _scale(xs["f"], s[:, :, None]) for x, s in zip(wt, state.momentum))
    read = jax.vmap(jax.vmap(jax.vmap(lambda w_, x: common.apply(spec, w_, x))))
    o = read(common.weights_of(spec, wt if spec.read == "after_write" else anchor), xs["q"])

    m_end = tuple(x[:, :, -1] for x in wt)
    s_end = ()
    if spec.momentum:
        last = lambda x: x[..., -1:, :]
        s_end = tuple(xs["p_in"][..., -1, None, None] * s - d[:, :, 0]
                      for s, d in zip(state.momentum, written(last(xs["bmom"]), tu)))
    return common.MemoryState(m_end, s_end), o
