"""Pre-norm residual block and one period of the layer pattern."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import layers.catalog  # noqa: F401  (registers every mixer of layers/)
from layers.mlp import SwiGLU
from layers.norm import RMSNorm
from layers.registry import LayerContext, build_mixer
from layers.sharding import RESIDUAL, constrain, param
from models.config import ModelConfig
from models.titans import mac, mag, mal  # noqa: F401  (register the Titans mixers)


class Block(nnx.Module):
    """x + branch(mixer, x), then x + branch(mlp, x); branch(f, x) = s * norm'(f(norm(x))). x: [B, T, d].

    norm' (`ModelConfig.post_norm`, "hybrid-norm" / sandwich norm) is an RMSNorm on the branch's
    output and s (`ModelConfig.layer_scale`, LayerScale: Touvron et al. 2021, CaiT) a learnable
    per-channel vector [d] initialised to layer_scale; each is the identity when off, and its
    params (mixer_post_norm / mlp_post_norm, mixer_scale / mlp_scale) exist only when on, so a
    plain pre-norm block's param tree is the same as before they existed. With both, the scale
    multiplies the normed output.

    model.mlp_hidden=0 leaves the MLP branch out (mlp_norm, mlp and their options are None):
    x + branch(mixer, x) alone, as Mamba2's blocks.
    """

    def __init__(self, name: str, cfg: ModelConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.name = name
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(cfg.mixer(name), ctx, rngs=rngs)
        has_mlp = cfg.hidden > 0
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if has_mlp else None
        self.mlp = (SwiGLU(cfg.d_model, cfg.hidden, std=ctx.init_std, out_std=ctx.out_std, dtype=ctx.dtype, rngs=rngs)
                    if has_mlp else None)
        if cfg.post_norm:
            self.mixer_post_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            if has_mlp:
                self.mlp_post_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.layer_scale is not None:
            self.mixer_scale = param(jnp.full((cfg.d_model,), cfg.layer_scale, jnp.float32), ("norm",))
            if has_mlp:
                self.mlp_scale = param(jnp.full((cfg.d_model,), cfg.layer_scale, jnp.float32), ("norm",))

    def _branch_out(self, y, x, which: str):
        """The output y of branch `which` ("mixer" / "mlp") as it is added to x."""
        post_norm = getattr(self, f"{which}_post_norm", None)
        if post_norm is not None:
            y = post_norm(y)
        y = y.astype(x.dtype)
        scale = getattr(self, f"{which}_scale", None)
        if scale is not None:
            y = y * scale[...].astype(x.dtype)
        return y

    def __call__(self, x, *, positions, segment_ids, cache=None):
        y, cache = self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids, cache=cache)
        x = constrain(x + self._branch_out(y, x, "mixer"), RESIDUAL)
        if self.mlp is not None:
            x = constrain(x + self._branch_out(self.mlp(self.mlp_norm(x)), x, "mlp"), RESIDUAL)
        return x, cache


class Period(nnx.Module):
    """The blocks of one period of `ModelConfig.pattern` (or a prefix of it, for the remainder)."""

    def __init__(self, names: tuple[str, ...], cfg: ModelConfig, ctx: LayerContext, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(n, cfg, ctx, rngs=rngs) for n in names])

    def __call__(self, x, *, positions, segment_ids, cache=None):
        """cache: None, or a tuple with one mixer cache per block."""
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions=positions, segment_ids=segment_ids,
                         cache=None if cache is None else cache[i])
            new_caches.append(c)
        return x, (None if cache is None else tuple(new_caches))

    def init_cache(self, batch: int, max_len: int, dtype) -> tuple:
        return tuple(b.mixer.init_cache(batch, max_len, dtype) for b in self.blocks)
