"""Test-time memory (Titans / Miras): the configuration, the memory function, the attentional
biases and the argument checks shared by every implementation.

The op, per (batch row, head), with memory weights M (a pytree), momentum S (same structure),
gradient anchor A (the weights at the start of the token's chunk) and per-token gates theta_t
(learning rate), eta_t (momentum), alpha_t (decay):

    u_t = grad_M l(M; k_t, v_t) at M = A          ("undecayed", Titans Eqs 13-16)
                                 or M = lam_{A->t} A  ("decayed": Miras delta family / GDN)
    S_t = eta_t S_{t-1} - theta_t u_t             (plain GD: S_t = -theta_t u_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t             (retention "none": alpha_t = 0)
    o_t = M_t(q_t)  ("after_write")   or   A(q_t)  ("chunk_lagged")

Retentions that constrain the weights (Miras sec. 5.3) keep the recurrence above on a state M and
use the weights phi(M) wherever the memory is applied (gradient point and reads), per layer:

    "lq_norm" (Moneta)     phi(M) = M / ||M||_q^(q-2)          (entrywise q-norm of the matrix)
    "kl_softmax" (Memora)  phi(M) = sqrt(d_in) softmax(M) over d_in: M holds logits, and the
                           gradient step on them is Memora's mirror step
                           W_t = c softmax((1 - alpha_t) log W_{t-1} - theta_t u_t)
                           (the log-normaliser of log W is a constant per column, which the
                           softmax removes; c = sqrt(d_in) keeps x W of unit x at unit scale).

The gradient u_t is taken with respect to the weights phi(M) and applied to M. "none" and
"decay" have phi = identity, so M is the weights.

lam_{A->t} is the product of (1 - alpha_j) over the tokens j of the chunk up to t (inclusive).
With chunk_size b = 1, A = M_{t-1}: "decayed" is then exactly the gated delta rule's order
(decay, then a gradient step on the decayed memory), "undecayed" is Titans' (gradient on the
memory before this token's decay; Miras calls it a "cold start").

Chunks lie on the row's grid: tokens [n b, (n + 1) b) share the anchor M_{n b - 1}. Documents
(segment_ids, 0 = padding): where a new document starts, M is reset to the initial weights W0
and S to zero before the token, and that token's anchor is W0 until the next grid boundary (a
document that starts mid-chunk has a short first chunk, so it equals the same document run
alone only if it starts on the grid). Padding tokens neither write, decay nor move the
momentum, and output zeros.

Dimension letters: B batch, T time, H heads, K key/query dim, V value dim, E MLP hidden dim
(expansion * K), C chunk length (b), n number of chunks.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import pallas_wrappers as pw

F32 = jnp.float32
LN_EPS = 1e-5  # eps of the memory's (parameter-free) LayerNorm

ARCHS = ("linear", "mlp")
ACTIVATIONS = ("gelu", "silu")
BIASES = ("dot", "l2", "lp", "huber")
RETENTIONS = ("none", "decay", "lq_norm", "kl_softmax")
RETENTIONS_LATER = ("elastic_net",)  # Miras retention gates, not yet
DECAY_GRANULARITIES = ("head",)
GATE_GRANULARITIES = ("token", "chunk")
ALGORITHMS = ("gd", "gd_momentum")
GRADIENT_POINTS = ("undecayed", "decayed")
READ_MODES = ("after_write", "chunk_lagged")


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """What the memory computes (the Miras design axes). Defaults are Titans' LMM (sec. 3).

    arch: "linear" (M(x) = x W, one [K, V] matrix) or "mlp" (depth layers, hidden E =
      expansion * K, `activation` between layers, no biases).
    depth: MLP layers, >= 2 (only for arch "mlp"; a 1-layer MLP is arch "linear").
    expansion: MLP hidden width as a multiple of K (only for arch "mlp").
    activation: "gelu" (exact) or "silu" (only for arch "mlp").
    residual: M(x) = x + f(x) (TTT, Miras); needs K == V.
    layernorm: f(x) -> LN(f(x)), a LayerNorm over V without parameters (the mixer owns any
      scale), as TTT's x + LN(f(x)).
    bias: the attentional bias l(M; k, v) with prediction p = M(k), residual r = p - v:
      "dot"   -<p, v>                              (Hebbian: linear attention family)
      "l2"    1/2 |r|^2                            (delta rule, Titans; the 1/2 makes
                                                    theta equal the delta rule's beta)
      "lp"    1/p sum_i (r_i^2 + eps)^(p/2)        (Miras l_p, smoothed so that sign and |.|
                                                    stay differentiable; p = 2 is l2 + const)
      "huber" sum_i huber_delta(r_i)               (coordinate-wise Huber, delta_t given per
                                                    token and head: 1/2 r^2 if |r| <= delta,
                                                    else delta (|r| - delta / 2))
    p, eps: exponent (>= 1) and smoothing (> 0) of the "lp" bias (eps also smooths the
      lq_norm retention's norm, so that M = 0 stays finite).
    retention: "none"; "decay" (weight decay alpha_t per token; Titans Eqs 13-14); "lq_norm"
      (decay, and the weights phi(M) = M / ||M||_q^(q-2): Moneta); "kl_softmax" (decay on the
      logits M, weights phi(M) = sqrt(d_in) softmax over d_in: Memora). See the module docstring.
    q: exponent (>= 1) of the "lq_norm" retention (Moneta's shipped q = 4).
    decay_granularity: "head" (one alpha per token and head). Per-channel decay is future work.
    gate_granularity: "token" (theta, alpha, eta as given, per token: Titans' experiments) or
      "chunk" (each takes, for the whole chunk, its value at the chunk's first token, i.e. the
      token that set the gradient anchor: Titans sec. 3.2's per-chunk option, made causal so
      the after-write read of token t never depends on later tokens). delta stays per token.
    algorithm: "gd" or "gd_momentum" (eta_t per token and head; Titans Eq 10).
    gradient_at: "undecayed" (Titans: the gradient is taken on the anchor before the decays
      of the chunk) or "decayed" (the anchor times the chunk's decay up to and including the
      token: the gated delta rule's order at chunk_size 1). Same thing without decay.
    chunk_size: b, the gradient anchor: every gradient of a chunk of b tokens is taken at the
      weights entering the chunk (Titans sec. 3.2, TTT's mini-batch). b = 1 is exact online GD.
      Changes the function, not only the speed (TNT).
    read: "after_write" (o_t = M_t(q_t), inclusive of token t) or "chunk_lagged" (o_t =
      A(q_t), the chunk's anchor, as titans-pytorch).
    """
    arch: str = "mlp"
    depth: int = 2
    expansion: int = 4
    activation: str = "gelu"
    residual: bool = False
    layernorm: bool = False
    bias: str = "l2"
    p: float = 3.0
    eps: float = 1e-6
    retention: str = "decay"
    q: float = 4.0
    decay_granularity: str = "head"
    gate_granularity: str = "token"
    algorithm: str = "gd_momentum"
    gradient_at: str = "undecayed"
    chunk_size: int = 16
    read: str = "after_write"

    def __post_init__(self):
        _choice("arch", self.arch, ARCHS)
        if self.arch == "mlp":
            if not isinstance(self.depth, int) or self.depth < 2:
                raise ValueError(f"depth must be an int >= 2 for arch 'mlp' (arch 'linear' is "
                                 f"the 1-layer memory); got {self.depth!r}")
            if not isinstance(self.expansion, int) or self.expansion < 1:
                raise ValueError(f"expansion must be an int >= 1; got {self.expansion!r}")
            _choice("activation", self.activation, ACTIVATIONS)
        _choice("bias", self.bias, BIASES)
        if not self.p >= 1:
            raise ValueError(f"p must be >= 1 (the l_p bias); got {self.p!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 (smoothing of the l_p bias); got {self.eps!r}")
        if self.retention in RETENTIONS_LATER:
            raise ValueError(f"retention {self.retention!r} is not implemented yet; accepted: "
                             f"{list(RETENTIONS)}")
        _choice("retention", self.retention, RETENTIONS)
        if not self.q >= 1:
            raise ValueError(f"q must be >= 1 (the l_q retention); got {self.q!r}")
        if self.decay_granularity == "channel":
            raise ValueError("decay_granularity 'channel' is not implemented yet; accepted: "
                             f"{list(DECAY_GRANULARITIES)}")
        _choice("decay_granularity", self.decay_granularity, DECAY_GRANULARITIES)
        _choice("gate_granularity", self.gate_granularity, GATE_GRANULARITIES)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("gradient_at", self.gradient_at, GRADIENT_POINTS)
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1; got {self.chunk_size!r}")
        _choice("read", self.read, READ_MODES)

    @property
    def decay(self) -> bool:
        """Whether the op takes alpha (every retention but "none" decays M)."""
        return self.retention != "none"

    @property
    def mapped(self) -> bool:
        """Whether the weights are a map phi(M) of the state (lq_norm, kl_softmax)."""
        return self.retention in ("lq_norm", "kl_softmax")

    @property
    def momentum(self) -> bool:
        return self.algorithm == "gd_momentum"


def _choice(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}; got {value!r}")


class MemoryState(NamedTuple):
    """Memory state M and momentum, tuples of float32 arrays [B, H, d_in, d_out] (one per layer;
    momentum is () for plain GD). M is the weights, except with the lq_norm / kl_softmax
    retentions, where the weights are `weights_of(spec, M)`."""
    weights: tuple
    momentum: tuple


# ----------------------------------------------------------------------------- the memory

def layer_shapes(spec: MemorySpec, dk: int, dv: int) -> tuple[tuple[int, int], ...]:
    """(d_in, d_out) of each weight matrix: linear [(K, V)]; mlp [(K, E), (E, E)..., (E, V)]."""
    if spec.arch == "linear":
        return ((dk, dv),)
    e = spec.expansion * dk
    return ((dk, e),) + ((e, e),) * (spec.depth - 2) + ((e, dv),)


def init_weights(spec: MemorySpec, key: jax.Array, heads: int, dk: int, dv: int,
                 std: float = 0.02) -> tuple:
    """Initial weights W0 per head, N(0, std^2) (TTT's init): tuple of float32 [H, d_in, d_out]."""
    keys = jax.random.split(key, len(layer_shapes(spec, dk, dv)))
    return tuple(std * jax.random.normal(kk, (heads, *shape), F32)
                 for kk, shape in zip(keys, layer_shapes(spec, dk, dv)))


def weights_of(spec: MemorySpec, state: tuple) -> tuple:
    """The weights phi(M) of a memory state (module docstring), per layer; leaves [..., d_in,
    d_out]. Identity unless the retention maps the state."""
    if spec.retention == "lq_norm":
        # ||M||_q^(q-2) = (sum |M|^q + eps)^((q-2)/q); the eps keeps M = 0 finite (and its grad).
        norm = lambda m: (jnp.sum((m * m + spec.eps) ** (0.5 * spec.q), axis=(-2, -1),
                                  keepdims=True)) ** ((spec.q - 2.0) / spec.q)
        return tuple(m / norm(m) for m in state)
    if spec.retention == "kl_softmax":
        return tuple(m.shape[-2] ** 0.5 * jax.nn.softmax(m, axis=-2) for m in state)
    return tuple(state)


def activation(spec: MemorySpec):
    """The MLP memory's activation between layers (exact GELU or SiLU)."""
    return jax.nn.silu if spec.activation == "silu" else (lambda z: jax.nn.gelu(z, approximate=False))


def hidden(spec: MemorySpec, weights: tuple, x: jax.Array) -> jax.Array:
    """f(x) before residual and norm, one head: weights tuple of [d_in, d_out], x [..., K] ->
    [..., V]."""
    act = activation(spec)
    z = x @ weights[0]
    for w in weights[1:]:
        z = act(z) @ w
    return z


def readout(spec: MemorySpec, x: jax.Array, z: jax.Array) -> jax.Array:
    """M(x) from f(x) = z: [x +] [LN](z). x [..., K], z [..., V]."""
    if spec.layernorm:
        mu = jnp.mean(z, axis=-1, keepdims=True)
        zc = z - mu
        z = zc * jax.lax.rsqrt(jnp.mean(zc * zc, axis=-1, keepdims=True) + LN_EPS)
    return x + z if spec.residual else z


def apply(spec: MemorySpec, weights: tuple, x: jax.Array) -> jax.Array:
    """M(x) for one head: weights tuple of [d_in, d_out], x [..., K] -> [..., V]."""
    return readout(spec, x, hidden(spec, weights, x))


def bias_loss(spec: MemorySpec, pred: jax.Array, v: jax.Array, delta: jax.Array | None) -> jax.Array:
    """The attentional bias of one token summed over V: pred, v [V], delta scalar or None."""
    if spec.bias == "dot":
        return -jnp.sum(pred * v)
    r = pred - v
    if spec.bias == "l2":
        return 0.5 * jnp.sum(r * r)
    if spec.bias == "lp":
        return jnp.sum((r * r + spec.eps) ** (0.5 * spec.p)) / spec.p
    small = jnp.abs(r) <= delta  # huber; where() keeps the unused branch's gradient out
    return jnp.sum(jnp.where(small, 0.5 * r * r, delta * (jnp.abs(r) - 0.5 * delta)))


def token_loss(spec: MemorySpec, weights: tuple, k: jax.Array, v: jax.Array, delta) -> jax.Array:
    """l(W; k, v) for one head and token, of the weights W (not the state): k [K], v [V] ->
    scalar."""
    return bias_loss(spec, apply(spec, weights, k), v, delta)


# ----------------------------------------------------------------------------- arguments

def check(spec: MemorySpec, q, k, v, theta, alpha, eta, delta, initial_weights, initial_state,
          segment_ids) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or gates do not fit `spec`."""
    if not isinstance(spec, MemorySpec):
        raise ValueError(f"spec must be a MemorySpec; got {type(spec).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, H, K]; got shape {q.shape}")
    b, t, h, dk = q.shape
    if t == 0:
        raise ValueError(f"empty sequence: q {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must be [B, T, H, K] = {list(q.shape)} (no shared kv heads); got "
                         f"{list(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {(b, t, h)}; got {list(v.shape)}")
    dv = v.shape[3]
    if spec.residual and dk != dv:
        raise ValueError(f"residual memory needs K == V; got K={dk}, V={dv}")
    gates = (("theta", theta, True), ("alpha", alpha, spec.decay), ("eta", eta, spec.momentum),
             ("delta", delta, spec.bias == "huber"))
    why = {"alpha": "retention 'decay'", "eta": "algorithm 'gd_momentum'", "delta": "bias 'huber'",
           "theta": "every memory"}
    for name, x, needed in gates:
        if needed and x is None:
            raise ValueError(f"{name} [B, T, H] is required by {why[name]}")
        if not needed and x is not None:
            raise ValueError(f"{name} must be None unless {why[name]}; spec has "
                             f"retention={spec.retention!r}, algorithm={spec.algorithm!r}, "
                             f"bias={spec.bias!r}")
        if x is not None and (x.shape != (b, t, h) or not jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(f"{name} must be floating [B, T, H] = {[b, t, h]}; got "
                             f"{x.dtype}{list(x.shape)}")
    shapes = layer_shapes(spec, dk, dv)
    if not isinstance(initial_weights, (tuple, list)) or len(initial_weights) != len(shapes):
        raise ValueError(f"initial_weights must be a tuple of {len(shapes)} arrays [H, d_in, "
                         f"d_out] = {[(h, *s) for s in shapes]}")
    for i, (w, s) in enumerate(zip(initial_weights, shapes)):
        if w.shape != (h, *s):
            raise ValueError(f"initial_weights[{i}] must be [H, d_in, d_out] = {[h, *s]}; got "
                             f"{list(w.shape)}")
    if initial_state is not None:
        n_mom = len(shapes) if spec.momentum else 0
        if (not isinstance(initial_state, MemoryState) or len(initial_state.weights) != len(shapes)
                or len(initial_state.momentum) != n_mom):
            raise ValueError(f"initial_state must be a MemoryState of {len(shapes)} weights and "
                             f"{n_mom} momenta [B, H, d_in, d_out]")
        for i, (w, s) in enumerate(zip(initial_state.weights + initial_state.momentum, shapes * 2)):
            if w.shape != (b, h, *s):
                raise ValueError(f"initial_state leaf {i} must be [B, H, d_in, d_out] = "
                                 f"{[b, h, *s]}; got {list(w.shape)}")
    pw.check_segment_ids(segment_ids, b, t)


def resets(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T]: token t starts a new document (memory reset to W0 before it)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return (segment_ids != prev) & (segment_ids != 0)


def anchor_tokens(spec: MemorySpec, t: int, segment_ids: jax.Array | None) -> jax.Array:
    """int32 [B or 1, T]: the index of the token that set each token's gradient anchor, i.e. the
    later of its chunk's first token (on the row's grid) and its document's first token."""
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    grid = idx - idx % spec.chunk_size
    if segment_ids is None:
        return grid
    doc_start = jax.lax.cummax(jnp.where(resets(segment_ids), idx, 0), axis=1)
    return jnp.maximum(grid, doc_start)


def hold_gates(spec: MemorySpec, gates: tuple, segment_ids: jax.Array | None) -> tuple:
    """Gate granularity: gates (theta, alpha, eta; [B, T, H] or None) as given for "token"; for
    "chunk", each token takes the value at its anchor token (`anchor_tokens`). A padding token
    may take a padding token's value: it writes nothing either way."""
    if spec.gate_granularity == "token":
        return tuple(gates)
    some = next(g for g in gates if g is not None)
    src = jnp.broadcast_to(anchor_tokens(spec, some.shape[1], segment_ids), some.shape[:2])
    return tuple(None if g is None else jnp.take_along_axis(g, src[..., None], axis=1)
                 for g in gates)


def start_state(spec: MemorySpec, initial_weights: tuple, initial_state: MemoryState | None,
                batch: int) -> MemoryState:
    """The float32 state entering every row: `initial_state`, else W0 broadcast and zero momentum."""
    if initial_state is not None:
        return jax.tree.map(lambda x: x.astype(F32), initial_state)
    w = tuple(jnp.broadcast_to(x.astype(F32), (batch, *x.shape)) for x in initial_weights)
    return MemoryState(w, tuple(jnp.zeros_like(x) for x in w) if spec.momentum else ())
