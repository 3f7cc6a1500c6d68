"""The plumbing every linear-attention mixer shares: the base class, projections, norms, caches.

Every mixer in this package is the same shape (fla's layers are the model):

    x [B, T, d] --projections--> (optional short conv) --> q, k, v, log decay (, beta)  (`features`)
                --chunked_linear_attention or delta_rule--> o [B, T, H, V']           (this base class)
                --norm / gate / output projection--> y [B, T, d]                      (`readout`)

A subclass writes only its own math: `features` and `readout`, plus its width bookkeeping. This
base class runs the op with the runtime's implementation and chunk size
(`runtime.linear_attention_impl` and `runtime.linear_attention_chunk` govern both ops), handles
the decode cache, the short convolution's cache and document boundaries, and gives the one-line
description.

The recurrence of the chunked linear-attention op (`pallas_kernels.chunked_linear_attention`),
per head (H heads, key dim K, value dim V'):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * q_t S_t

Delta-rule mixers (deltanet, gdn: `setup_op(..., delta_rule=True)`, and `features` returns
`OpInputs.beta`) run `pallas_kernels.delta_rule` instead, which L2-normalises q and k itself:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = scale * q_t S_t

Normaliser trick (`append_ones`): a mixer that needs n_t = sum_s decay * k_s (vanilla linear
attention's q.sum k, mLSTM's normaliser state) appends a column of ones to v; the op then
returns q_t . n_t (times scale) as the last output channel, and the state carries n_t as its
last column, so decode and document resets need nothing extra.

Decode cache (`init_cache`):
    state     float32 [B, H, K, V'], the recurrent state after the last token seen
    segment   int32 [B], segment id of the last token seen; a new chunk whose first token has
              another nonzero id starts a new document, so the state is zeroed first (the op
              itself resets at later tokens of the chunk)
    conv      the short convolution's history (layers/conv.py), when the mixer has one
A call with T == 1 uses the op's `decode_step`; T > 1 (prefill, or chunks of tokens added to a
filled cache) uses the chunked op with `initial_state`.

Numerics: projections, q/k/v and outputs in the compute dtype (ctx.dtype); gates, decays and
the state in float32 (DESIGN.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from layers.conv import CausalConv1d
from layers.linear import Dense
from layers.registry import LayerContext
from layers.sharding import constrain, param
from pallas_kernels.chunked_linear_attention.api import chunked_linear_attention, decode_step
from pallas_kernels.chunked_linear_attention.xla import STATES
from pallas_kernels.delta_rule import api as delta_api
from layers.config import RuntimeConfig
from layers.linear_attention.config import qkv_widths

F32 = jnp.float32
HEADS = ("batch", "seq", "act_heads", None)  # logical axes of [B, T, H, D] activations


class OpInputs(NamedTuple):
    """What `features` hands to the op: q [B, T, H, K], k [B, T, G, K], v [B, T, G, V'] in the
    compute dtype (G divides H: kv head h // (H // G) serves query head h), log_decay None,
    [B, T, H] or [B, T, H, K] float32 (<= 0). beta: None (chunked linear attention), or the
    delta rule's write strength [B, T, H] float32 in (0, 1] (or (0, 2)); then log_decay is None
    or [B, T, H] and the op is `delta_rule`."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    log_decay: jax.Array | None
    beta: jax.Array | None = None


# ----------------------------------------------------------------------------- small helpers

def dense_in(d_in: int, d_out: int, ctx: LayerContext, rngs: nnx.Rngs, axes=("embed", "heads")) -> Dense:
    """A projection out of the residual stream (std ctx.init_std)."""
    return Dense(d_in, d_out, axes=axes, std=ctx.init_std, dtype=ctx.dtype, rngs=rngs)


def dense_out(d_in: int, ctx: LayerContext, rngs: nnx.Rngs) -> Dense:
    """The projection back into the residual stream (std ctx.out_std)."""
    return Dense(d_in, ctx.d_model, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, H * D] -> [B, T, H, D], pinned to the heads layout."""
    b, t, w = x.shape
    return constrain(x.reshape(b, t, heads, w // heads), HEADS)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, H, D] -> [B, T, H * D]."""
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)


def append_ones(v: jax.Array) -> jax.Array:
    """[..., V] -> [..., V + 1]: the op then also returns the normaliser q . n as channel V."""
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def rms(x: jax.Array, eps: float) -> jax.Array:
    """Parameter-free RMS normalisation over the last dim (float32 statistics, x.dtype out)."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class MergedHeadsNorm(nnx.Module):
    """RMSNorm over the merged heads [B, T, H * V] (or over each of `groups` equal slices of
    it), with a learned scale. The scale's dim is named "heads", not "norm": it multiplies an
    activation split over heads, and a replicated scale would come back from the train step
    split over "tensor" by XLA's sharding propagation, which changes the state's layout and
    recompiles the step."""

    def __init__(self, width: int, *, eps: float, groups: int = 1):
        self.scale = param(jnp.ones((width,), F32), ("heads",))
        self.eps, self.groups = eps, groups

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        y = rms(x.reshape(*lead, self.groups, -1), self.eps).reshape(x.shape)
        return (y.astype(F32) * self.scale[...]).astype(x.dtype)


def constant_log_decay(log_gamma: jax.Array, batch: int, t: int) -> jax.Array:
    """A fixed per-head log decay [H] broadcast to the op's [B, T, H] (float32)."""
    return jnp.broadcast_to(log_gamma.astype(F32), (batch, t, log_gamma.shape[0]))


def chunk_flops(heads: int, dk: int, dv: int, seq_len: int, chunk: int | None = None) -> float:
    """Forward FLOPs per token of the chunked op (2 per multiply-add), as the chunked
    implementations compute it: per head, a full C x C block of scores (2 C K) applied to the
    values (2 C V), plus reading (2 K V) and writing (2 K V) the carried [K, V] state.
    C = min(chunk, seq_len); the chunk is the runtime default (RuntimeConfig) because FLOP
    counts are computed from the architecture alone."""
    c = min(chunk or RuntimeConfig().linear_attention_chunk, seq_len)
    return heads * (2.0 * c * (dk + dv) + 4.0 * dk * dv)


def delta_chunk_flops(heads: int, dk: int, dv: int, seq_len: int, chunk: int | None = None) -> float:
    """Forward FLOPs per token of the chunked delta rule (the WY/UT form of fla's
    chunk_gated_delta_rule), per head and chunk of C tokens, divided by C:
        A = tril(diag(beta) K K^T)                      2 C^2 K
        W = (I + A)^-1 diag(beta) K, U = ... V           C^2 (K + V)   (triangular solves)
        new values U - W S                              2 C K V        (state read)
        scores Q K^T, applied to the new values         2 C^2 K + 2 C^2 V
        Q S (inter-chunk output), S += K^T U'           4 C K V        (state read, write)
    = C (5 K + 3 V) + 6 K V per token; decays and L2 norms (O(C^2 + K)) are left out.
    C = min(chunk, seq_len), chunk the runtime default, as in `chunk_flops`."""
    c = min(chunk or RuntimeConfig().linear_attention_chunk, seq_len)
    return heads * (c * (5.0 * dk + 3.0 * dv) + 6.0 * dk * dv)


def qkv_training_flops(cfg, d_model: int, seq_len: int, *, gate_width: int = 0,
                       value_extra: int = 0, extra: float = 0.0, delta_rule: bool = False) -> float:
    """`training_flops` of a mixer built with `setup_qkv`: q/k/v projections (through the
    conv), `gate_width` more output channels out of the residual stream, the op (the delta rule
    when `delta_rule`) on a state with `value_extra` appended value channels, and `extra`
    forward FLOPs."""
    h = cfg.num_heads
    dk, dv = qkv_widths(cfg, d_model)
    conv_ch = h * (2 * dk + dv)
    op = (delta_chunk_flops if delta_rule else chunk_flops)(h, dk, dv + value_extra, seq_len)
    return training_flops(d_model, conv_ch + gate_width, h * dv, op,
                          conv=2.0 * cfg.conv_size * conv_ch, extra=extra)


# ----------------------------------------------------------------------------- Mamba2 decay

def mamba2_decay_params(key: jax.Array, heads: int, cfg) -> tuple[nnx.Param, nnx.Param]:
    """Mamba2's per-head decay parameters (A_log, dt_bias), initialised as mamba_ssm: A = exp(A_log)
    uniform in [cfg.a_init_min, cfg.a_init_max], dt = softplus(dt_bias) log-uniform in
    [cfg.dt_min, cfg.dt_max], floored at cfg.dt_init_floor. Used by ssd and gdn."""
    key_a, key_dt = jax.random.split(key)
    a = jax.random.uniform(key_a, (heads,), F32, cfg.a_init_min, cfg.a_init_max)
    dt = jnp.exp(jax.random.uniform(key_dt, (heads,), F32, math.log(cfg.dt_min), math.log(cfg.dt_max)))
    dt = jnp.maximum(dt, cfg.dt_init_floor)
    return param(jnp.log(a), ("heads",)), param(dt + jnp.log(-jnp.expm1(-dt)), ("heads",))  # softplus^-1


def mamba2_log_decay(dt_raw: jax.Array, a_log: jax.Array, dt_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """dt_raw [B, T, H] (x W_dt) -> (dt = softplus(dt_raw + dt_bias), g = -exp(A_log) * dt <= 0),
    both float32 [B, T, H]."""
    dt = jax.nn.softplus(dt_raw.astype(F32) + dt_bias)
    return dt, -jnp.exp(a_log) * dt


def training_flops(d_model: int, proj_out: int, proj_in: int, op: float, conv: float = 0.0,
                   extra: float = 0.0) -> float:
    """Forward + backward (3x forward) FLOPs per token: projections d_model -> proj_out and
    proj_in -> d_model, the op, the short conv and any `extra` forward FLOPs."""
    return 3.0 * (2.0 * d_model * proj_out + 2.0 * proj_in * d_model + op + conv + extra)


# ----------------------------------------------------------------------------- the base class

OP_OUTPUT = "linear_op_output"  # saved so that the recomputation need not run the op again
_SAVE_DOTS_AND_STATES = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(STATES, OP_OUTPUT))


class LinearAttentionMixer(nnx.Module):
    """Base of every mixer on the chunked linear-attention op (see the module docstring).

    A subclass's __init__ builds its projections, then calls `self.setup_op(...)` with the
    state shape, the op's q/k scale and the channels of its short convolution. It implements

        features(x, *, positions, segment_ids, conv) -> (OpInputs, aux)
            `conv(u, activation=None)` applies the short causal convolution and then
            `activation` (None or "silu"; both only when conv_size > 0, u unchanged otherwise)
            to u [B, T, C] with C = conv_channels, keeping documents apart and the decode cache
            up to date; call it at most once. Pass the activation rather than applying it
            after: fused, the backward pass keeps only u.
        readout(o, aux) -> y [B, T, d]
            o [B, T, H, V'] is the op's output (zero at padding tokens); aux is what features
            returned alongside.
        describe_math() -> str   (the first part of `describe`)
    """

    def setup_op(self, ctx: LayerContext, *, heads: int, key_dim: int, value_dim: int,
                 scale: float | None, conv_size: int = 0, conv_channels: int = 0,
                 conv_bias: bool = False, delta_rule: bool = False, rngs: nnx.Rngs) -> None:
        """heads/key_dim/value_dim: the op's state [H, K, V'] (V' includes an appended ones
        column); scale: multiplies q (None: 1/sqrt(K)); delta_rule: the op is
        `pallas_kernels.delta_rule` (then `features` must return OpInputs.beta)."""
        self.runtime = ctx.runtime
        self.delta_rule = delta_rule
        self.state_shape = (heads, key_dim, value_dim)
        self.scale = 1.0 / math.sqrt(key_dim) if scale is None else float(scale)
        self.conv = (CausalConv1d(conv_channels, conv_size, bias=conv_bias, dtype=ctx.dtype, rngs=rngs)
                     if conv_size else None)

    def setup_qkv(self, cfg, ctx: LayerContext, rngs: nnx.Rngs) -> int:
        """The q, k, v projections of the mixers whose front half is plain q/k/v (linear,
        retention, lightning, gla): sets heads, dk, dv, q_proj, k_proj, v_proj from
        cfg.num_heads / expand_k / expand_v. Returns the short conv's channel count."""
        d, h = ctx.d_model, cfg.num_heads
        self.heads = h
        self.dk, self.dv = qkv_widths(cfg, d)
        self.q_proj = dense_in(d, h * self.dk, ctx, rngs)
        self.k_proj = dense_in(d, h * self.dk, ctx, rngs)
        self.v_proj = dense_in(d, h * self.dv, ctx, rngs)
        return h * (2 * self.dk + self.dv)

    def project_qkv(self, x: jax.Array, conv: Callable[[jax.Array], jax.Array]):
        """x [B, T, d] -> q, k [B, T, H, K], v [B, T, H, V], through the short conv + SiLU
        when the mixer has one (one conv over the concatenated projections, as fla does)."""
        h, dk = self.heads, self.dk
        qkv = conv(jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1), "silu")
        q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], axis=-1)
        return split_heads(q, h), split_heads(k, h), split_heads(v, h)

    # -- the mixer interface

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache).

        Training (no cache) runs rematerialised: the backward pass keeps the outputs of the
        projections (matmuls without batch dims) and the op's per-chunk states, and recomputes
        the elementwise work between them (conv, activations, norms, gates, casts); the op's
        output is kept too, so only the op's own backward recomputes its intra-chunk part:
        cheap, memory-bound work, where keeping it cost a linear layer more
        activation memory than a full-attention layer (benchmarks/mixers.py --tables memory)."""
        if cache is None:
            run = lambda m, x: m._apply(x, positions, segment_ids, None)
            return nnx.remat(run, policy=_SAVE_DOTS_AND_STATES)(self, x)
        return self._apply(x, positions, segment_ids, cache)

    def _apply(self, x, positions, segment_ids, cache):
        new_conv: dict[str, Any] = {}

        def conv(u: jax.Array, activation: str | None = None) -> jax.Array:
            if self.conv is None:
                return u
            y, c = self.conv(u, segment_ids, None if cache is None else cache["conv"], activation)
            new_conv["cache"] = c
            return y

        ins, aux = self.features(x, positions=positions, segment_ids=segment_ids, conv=conv)
        if (ins.beta is not None) != self.delta_rule:
            raise TypeError(f"{type(self).__name__}.features must return OpInputs.beta exactly when "
                            f"setup_op(delta_rule=True) (delta_rule={self.delta_rule})")
        if cache is None:
            o, _ = self._op(ins, segment_ids, None)
            return self.readout(checkpoint_name(o, OP_OUTPUT), aux), None
        o, state = self._cached(ins, segment_ids, cache)
        new_cache = {"state": state, "segment": segment_ids[:, -1].astype(jnp.int32)}
        if self.conv is not None:
            new_cache["conv"] = new_conv["cache"]
        return self.readout(o, aux), new_cache

    def _cached(self, ins: OpInputs, segment_ids: jax.Array, cache: dict):
        """The op continued from the cached state (zeroed where the first token starts a new
        document). T == 1 is one recurrence step; longer inputs use the chunked op."""
        first = segment_ids[:, 0]
        starts = (first != cache["segment"]) & (first != 0)
        state = jnp.where(starts[:, None, None, None], 0.0, cache["state"].astype(F32))
        if ins.q.shape[1] == 1:
            g = None if ins.log_decay is None else ins.log_decay[:, 0]
            if ins.beta is None:
                o, new = decode_step(ins.q[:, 0], ins.k[:, 0], ins.v[:, 0], g, state, scale=self.scale)
            else:
                o, new = delta_api.decode_step(ins.q[:, 0], ins.k[:, 0], ins.v[:, 0], ins.beta[:, 0], g,
                                               state, scale=self.scale)
            valid = first != 0  # a padding token neither writes nor decays the state
            state = jnp.where(valid[:, None, None, None], new, state)
            o = jnp.where(valid[:, None, None], o, 0).astype(o.dtype)[:, None]
            return o, state
        return self._op(ins, segment_ids, state)

    def _op(self, ins: OpInputs, segment_ids: jax.Array, initial_state: jax.Array | None):
        """The chunked op over the whole input: the delta rule when ins.beta is given, else
        chunked linear attention; runtime.linear_attention_impl / _chunk choose how."""
        rt = self.runtime
        opts = dict(initial_state=initial_state, segment_ids=segment_ids, scale=self.scale,
                    chunk_size=rt.linear_attention_chunk, implementation=rt.linear_attention_impl)
        if ins.beta is None:
            return chunked_linear_attention(ins.q, ins.k, ins.v, ins.log_decay, **opts)
        return delta_api.delta_rule(ins.q, ins.k, ins.v, ins.beta, ins.log_decay, **opts)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """A fixed-size cache whatever max_len is: the recurrent state (float32), the last
        segment id, and the short convolution's history (in `dtype`)."""
        del max_len
        cache = {"state": jnp.zeros((batch, *self.state_shape), F32),
                 "segment": jnp.zeros((batch,), jnp.int32)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_cache(batch, dtype)
        return cache

    def describe(self) -> str:
        h, k, v = self.state_shape
        conv = f", conv={self.conv.width}" if self.conv is not None else ""
        op = "delta rule" if self.delta_rule else "chunked linear attention"
        return (f"{self.describe_math()}, state H={h} K={k} V={v}{conv}, {op} "
                f"impl={self.runtime.linear_attention_impl or 'auto'} chunk={self.runtime.linear_attention_chunk}")

    # -- what subclasses provide

    def features(self, x, *, positions, segment_ids, conv: Callable[..., jax.Array]):
        raise NotImplementedError

    def readout(self, o: jax.Array, aux) -> jax.Array:
        raise NotImplementedError

    def describe_math(self) -> str:
        raise NotImplementedError
