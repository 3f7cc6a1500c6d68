"""Decoder-only language model and its loss.

tokens [B, T] -> embed -> Stack (pattern of mixers, each block with a SwiGLU MLP) -> RMSNorm ->
tied (E^T) or untied head -> logits [B, T, V] in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from layers.linear import Dense, Embed
from layers.mlp import SwiGLU
from layers.norm import RMSNorm
from layers.registry import LayerContext, mixer_class
from layers.sharding import RESIDUAL, constrain
from layers.config import RuntimeConfig
from models.config import ModelConfig
from models.stack import Stack


def resolve_dtype(runtime: RuntimeConfig, platform: str | None = None):
    """"auto" is bfloat16 on accelerators and float32 on CPU (DESIGN.md, Numerics)."""
    if runtime.compute_dtype == "auto":
        platform = platform or jax.default_backend()
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return jnp.dtype(runtime.compute_dtype)


class LM(nnx.Module):
    def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before building")
        self.cfg = cfg
        dtype = resolve_dtype(runtime)
        self.dtype = dtype
        # Projections into the residual stream get std / sqrt(2 * layers) (GPT-2), so the
        # residual variance does not grow with depth at initialisation.
        ctx = LayerContext(d_model=cfg.d_model, dtype=dtype, runtime=runtime, init_std=cfg.init_std,
                           out_std=cfg.init_std / math.sqrt(2 * cfg.num_layers), norm_eps=cfg.norm_eps)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, dtype=dtype, rngs=rngs)
        self.stack = Stack(cfg, ctx, rngs=rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else Dense(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), std=cfg.init_std, dtype=dtype, rngs=rngs)

    def __call__(self, tokens, *, positions, segment_ids, cache=None):
        """tokens, positions, segment_ids: [B, T] int32 -> (logits [B, T, V] float32, cache)."""
        x = constrain(self.embed(tokens), RESIDUAL)
        x, cache = self.stack(x, positions=positions, segment_ids=segment_ids, cache=cache)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "seq", "act_vocab")), cache

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return self.stack.init_cache(batch, max_len, dtype or self.dtype)

    def layers(self):
        """The blocks in layer order (scanned periods expanded), for start-up logging."""
        return self.stack.periods()


def lm_loss(logits, targets, loss_mask, z_loss: float = 0.0, normalizer=None):
    """Next-token cross-entropy over loss_mask, plus z_loss * logsumexp^2 (PaLM), divided by
    `normalizer` (default: the number of masked tokens in this batch).

    Passing the token count of the whole batch as `normalizer` makes the losses of
    micro-batches sum to the full-batch loss exactly, so gradient accumulation is exact.

    logits [B, T, V] float32; targets [B, T] int; loss_mask [B, T] float.
    Returns (loss, aux) with aux sums over masked positions: ce_sum, tokens, correct.
    """
    mask = loss_mask.astype(jnp.float32)
    ntok = mask.sum()
    norm = jnp.maximum(ntok, 1.0) if normalizer is None else normalizer
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ce_sum = (ce * mask).sum()
    loss = ce_sum
    if z_loss:
        lse = jax.nn.logsumexp(logits, axis=-1)
        loss = loss + z_loss * ((lse ** 2) * mask).sum()
    correct = ((jnp.argmax(logits, -1) == targets) * mask).sum()
    return loss / norm, {"ce_sum": ce_sum, "tokens": ntok, "correct": correct}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward), split by mixer name, "mlp" and "head".

    Attention-like mixers count only the keys a causal query sees (causal halving), as MaxText
    and PaLM do. The embedding lookup is free; the output head is a d x V matmul.
    """
    out: dict[str, float] = {}
    for name in cfg.layer_names():
        mc = cfg.mixer(name)
        out[name] = out.get(name, 0.0) + mixer_class(mc).flops_per_token(mc, cfg.d_model, seq_len)
    out["mlp"] = cfg.num_layers * SwiGLU.flops_per_token(cfg.d_model, cfg.hidden)
    out["head"] = 6.0 * cfg.d_model * cfg.vocab_size
    return out


def build(cfg: ModelConfig, runtime: RuntimeConfig | None = None, *, seed: int = 0) -> LM:
    """The LM of `cfg`, computed as `runtime` says (default RuntimeConfig()), params from `seed`."""
    return LM(cfg, runtime or RuntimeConfig(), rngs=nnx.Rngs(params=seed))
