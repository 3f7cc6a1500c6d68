"""The Titans / Miras test-time memory mixer, kind "memory" (config: layers/memory/config.py).

Per head h (H heads, key = value width D), from x_t [d]:

    q_t, k_t, v_t = SiLU(causal depthwise conv_4(x_t [W_q, W_k, W_v]))      (Titans sec. 4.4)
    q_t, k_t <- q_t / |q_t|, k_t / |k_t|                                    (L2 norm, float32)
    theta_t = max_lr * sigmoid(x_t w_theta + b_theta)                       inner learning rate
    alpha_t = max_decay * sigmoid(x_t w_alpha + b_alpha)     in [0, max_decay], decay (retention)
    eta_t   = min_m + (1 - min_m) * sigmoid(x_t w_eta + b_eta)   in (min_m, 1), momentum
    delta_t = softplus(x_t w_delta + b_delta)                   Huber threshold (bias "huber")
    o_t     = neural_memory(q, k, v, theta, alpha, eta, delta; W0)          (the op: M_t(q_t))
    y_t     = W_o [ gate(x_t W_g) * RMSNorm_head(o_t) ]

The memory M (linear, or an MLP of `depth` layers), its attentional bias, retention, algorithm,
gradient anchor b and read mode are the MemorySpec in the config; the op
(pallas_kernels/neural_memory) writes every token into M by one gradient step of the bias,
taken at the chunk's anchor, with momentum and decay, and reads it. W0, the memory every
document starts from, is outer-learned: one nnx.Param per memory layer [H, d_in, d_out]
(N(0, 1 / d_in) by default, cfg.w0_std to fix it). With the lq_norm / kl_softmax retentions it
is the initial state (kl_softmax: logits), whose weights the op derives. With
gate_granularity "chunk" the op holds each chunk's first-token theta / alpha / eta for the
chunk (the decode cache holds them too).

Paper-faithful (Titans sec. 3-4): q/k/v projections, short depthwise convs and SiLU, L2-normalised
q/k, data-dependent per-token gates theta, alpha, eta of x_t, an outer-learned W0, a norm and a
gate before the output projection. Choices the paper leaves open: the gates are sigmoids of one
bias-carrying linear map per head (Titans gives no parametrisation; titans-pytorch uses
sigmoid(Linear)); theta is bounded by max_lr = 0.01 (titans-pytorch's bound: the b stale
gradients of a chunk add up, see MemoryConfig.max_lr); alpha <= 0.999 and eta >= 1e-3 keep the
op's log-space gates finite; the initial biases give theta 0.005, alpha 0.018, eta 0.88; W0 is
LeCun-normal per layer, std 1 logits for kl_softmax (TTT: N(0, 0.02^2), which leaves a non-residual MLP memory without
gradient); the Huber delta is a softplus (Miras: "learned,
input-dependent", no form given); one conv over the concatenated q/k/v channels (fla's layout,
no conv bias); the output norm is per-head RMSNorm and the gate a swish (Gated DeltaNet's,
Titans says only "a linear gate"); key and value heads have equal width (the residual memory
needs it).

Decode cache (`init_cache`): the short conv's history plus `decode.MemoryCache` (weights,
momentum, the chunk's anchor, the in-chunk decay product, the row position, the last segment
id and the held chunk gates), so decoding takes exactly the gradient steps training took. A
call with a cache steps token by token (layers/memory/decode.py), except that a multi-token
call starting on the chunk grid (a prefill into a fresh cache) runs its whole chunks through
the chunk-parallel op and steps only the remainder (`decode.prefill`).

The op runs with implementation=None (the best available: xla, then reference); describe()
says so. Numerics: projections in the compute dtype; gates, q/k norms, memory and state float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers.conv import CausalConv1d
from layers.linear import Dense
from layers.memory import decode
from layers.norm import RMSNorm
from layers.registry import LayerContext, register_mixer
from layers.sharding import param
from pallas_kernels.neural_memory.api import neural_memory
from pallas_kernels.neural_memory.common import init_weights, layer_shapes
from layers.memory.config import MemoryConfig

F32 = jnp.float32
L2_EPS = 1e-6  # q / |q| as q * rsqrt(|q|^2 + eps): finite at q = 0 (padding, zero conv output)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x [..., D] -> float32 x / |x| (NaN-safe)."""
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


@register_mixer(MemoryConfig)
class NeuralMemory(nnx.Module):
    def __init__(self, cfg: MemoryConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.cfg, self.spec = cfg, cfg.spec()
        d, h = ctx.d_model, cfg.num_heads
        hd = cfg.dim_per_head(d)
        self.heads, self.dk = h, hd
        dense = lambda n, std=ctx.init_std, axes=("embed", "heads"): Dense(
            d, n, axes=axes, std=std, dtype=ctx.dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = dense(h * hd), dense(h * hd), dense(h * hd)
        self.conv = (CausalConv1d(3 * h * hd, cfg.conv_size, bias=False, dtype=ctx.dtype, rngs=rngs)
                     if cfg.conv_size else None)
        self.gate_names = ["theta"] + (["alpha"] if self.spec.decay else []) + \
            (["eta"] if self.spec.momentum else []) + (["delta"] if self.spec.bias == "huber" else [])
        init = {"theta": cfg.lr_bias_init, "alpha": cfg.decay_bias_init, "eta": cfg.momentum_bias_init,
                "delta": 0.0}
        self.gate_proj = dense(len(self.gate_names) * h)  # all gate logits from one projection
        self.gate_bias = param(jnp.repeat(jnp.array([init[n] for n in self.gate_names], F32), h),
                               ("heads",))
        w0 = init_weights(self.spec, rngs.params(), h, hd, hd, std=1.0)  # N(0, 1), then per layer:
        w0 = [w * (cfg.w0_std if cfg.w0_std is not None else self.default_w0_std(w.shape[1])) for w in w0]
        self.w0 = nnx.List([param(w, ("heads", None, None)) for w in w0])
        self.o_norm = RMSNorm(hd, eps=ctx.norm_eps) if cfg.output_norm else None
        self.g_proj = dense(h * hd) if cfg.output_gate != "none" else None
        self.o_proj = Dense(h * hd, d, axes=("heads", "embed"), std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)

    def default_w0_std(self, d_in: int) -> float:
        """LeCun normal (1 / sqrt(d_in)); 1 for kl_softmax, whose W0 holds logits: logits of
        std 1 / sqrt(d_in) make every column of softmax(W0) nearly uniform, so every unit of f
        is nearly the same and a LayerNorm readout divides by ~sqrt(eps) (first gradient norm
        600 in the memora preset, 3.7 with std 1)."""
        return 1.0 if self.spec.retention == "kl_softmax" else d_in ** -0.5

    # -- pieces

    def gates(self, x: jax.Array) -> dict:
        """x [B, T, d] -> {name: float32 [B, T, H]} for theta and whichever of alpha, eta, delta
        the spec uses (see the module docstring for the maps)."""
        c = self.cfg
        z = self.gate_proj(x).astype(F32) + self.gate_bias[...]
        z = z.reshape(*x.shape[:2], len(self.gate_names), self.heads)
        out = {}
        for i, n in enumerate(self.gate_names):
            zi = z[:, :, i]
            if n == "theta":
                out[n] = c.max_lr * jax.nn.sigmoid(zi)
            elif n == "alpha":
                out[n] = c.max_decay * jax.nn.sigmoid(zi)
            elif n == "eta":
                out[n] = c.min_momentum + (1.0 - c.min_momentum) * jax.nn.sigmoid(zi)
            else:
                out[n] = jax.nn.softplus(zi)
        return out

    def features(self, x, segment_ids, conv_cache):
        """x [B, T, d] -> (q, k float32 unit [B, T, H, D], v [B, T, H, D], gates, conv cache)."""
        b, t, _ = x.shape
        h, hd = self.heads, self.dk
        qkv = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        new_conv = None
        if self.conv is not None:
            qkv, new_conv = self.conv(qkv, segment_ids, conv_cache, "silu")
        q, k, v = (y.reshape(b, t, h, hd) for y in jnp.split(qkv, 3, axis=-1))
        return l2_normalize(q), l2_normalize(k), v, self.gates(x), new_conv

    def initial_weights(self) -> tuple:
        return tuple(w[...] for w in self.w0)

    def readout(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """o [B, T, H, D] -> y [B, T, d]: per-head RMSNorm, output gate, W_o."""
        b, t = o.shape[:2]
        o = o.astype(x.dtype)
        if self.o_norm is not None:
            o = self.o_norm(o)
        o = o.reshape(b, t, -1)
        if self.g_proj is not None:
            g = self.g_proj(x).astype(F32)
            g = jax.nn.sigmoid(g) if self.cfg.output_gate == "sigmoid" else jax.nn.silu(g)
            o = (o.astype(F32) * g).astype(x.dtype)
        return self.o_proj(o)

    # -- the mixer interface

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array, cache=None):
        """x [B, T, d]; positions, segment_ids [B, T] int32 -> (y [B, T, d], cache)."""
        del positions  # the memory is position-free; the chunk grid counts row positions
        q, k, v, g, new_conv = self.features(x, segment_ids, None if cache is None else cache.get("conv"))
        args = (q, k, v, g["theta"], g.get("alpha"), g.get("eta"), g.get("delta"))
        if cache is None:
            o, _ = neural_memory(self.spec, *args, initial_weights=self.initial_weights(),
                                 segment_ids=segment_ids, implementation=None)
            return self.readout(o, x), None
        o, mem = decode.prefill(self.spec, self.initial_weights(), cache["memory"], *args, segment_ids,
                                parallel=functools.partial(neural_memory, implementation=None))
        new_cache = {"memory": mem}
        if self.conv is not None:
            new_cache["conv"] = new_conv
        return self.readout(o, x), new_cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """Fixed size whatever max_len is: the memory state (decode.MemoryCache, float32) and
        the short conv's history (in `dtype`)."""
        del max_len
        cache = {"memory": decode.init_cache(self.spec, batch, self.heads, self.dk, self.dk)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_cache(batch, dtype)
        return cache

    @staticmethod
    def flops_per_token(cfg: MemoryConfig, d_model: int, seq_len: int) -> float:
        """Training FLOPs (3x forward): projections (q, k, v, gates, output gate, W_o), the conv,
        and per head a forward, a gradient and a read of the memory (~3 x 2 x its parameters)
        plus writing it (2 x its parameters); norms and activations left out, and so is the
        chunked form's in-chunk [C, C] work (the dual form's q.k products per layer)."""
        h = cfg.num_heads
        hd = cfg.dim_per_head(d_model)
        spec = cfg.spec()
        n_gates = 1 + spec.decay + spec.momentum + (spec.bias == "huber")
        proj_out = 3 * h * hd + n_gates * h + (h * hd if cfg.output_gate != "none" else 0)
        mem = sum(a * b for a, b in layer_shapes(spec, hd, hd))
        op = h * 8.0 * mem
        conv = 2.0 * cfg.conv_size * 3 * h * hd
        return 3.0 * (2.0 * d_model * proj_out + 2.0 * h * hd * d_model + op + conv)

    def describe(self) -> str:
        s, c = self.spec, self.cfg
        arch = "linear" if s.arch == "linear" else f"mlp depth={s.depth} x{s.expansion} {s.activation}"
        extra = "".join([" residual" if s.residual else "", " ln" if s.layernorm else ""])
        conv = f", conv={c.conv_size}" if c.conv_size else ""
        return (f"neural memory H={self.heads} D={self.dk} {arch}{extra}, bias={s.bias}, "
                f"retention={s.retention}, {s.algorithm}, gradient_at={s.gradient_at}, chunk={s.chunk_size}, "
                f"read={s.read}, gates per {c.gate_granularity}{conv}, output_gate={c.output_gate}, "
                f"neural_memory impl=auto")
