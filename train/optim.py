"""AdamW with warmup + cosine / warmup-stable-decay / constant schedules and global-norm clipping."""
from __future__ import annotations

import jax
import optax

from train.config import OptimizerConfig


def effective_warmup(cfg: OptimizerConfig, total_steps: int) -> int:
    """The warmup length the schedule uses: cfg.warmup_steps, or total_steps // 10 when
    warmup_steps exceeds the run (a short run of a preset)."""
    return cfg.warmup_steps if cfg.warmup_steps <= total_steps else total_steps // 10


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to cfg.lr over effective_warmup(cfg, total_steps) steps, then:

    cosine    cosine decay to min_lr_ratio * lr at total_steps
    wsd       constant lr, then linear decay to min_lr_ratio * lr over the last
              decay_fraction of total_steps (warmup-stable-decay, MiniCPM)
    constant  lr
    """
    warm = effective_warmup(cfg, total_steps)
    rest = max(total_steps - warm, 1)
    end = cfg.lr * cfg.min_lr_ratio
    warmup = optax.linear_schedule(0.0, cfg.lr, warm) if warm else None
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = max(int(round(total_steps * cfg.decay_fraction)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, decay)], [stable])
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup is None:
        return after
    return optax.join_schedules([warmup, after], [warm])


def _decay_mask(params):
    """Weight decay on matrices only (kernels and embeddings), never on norm scales.

    Decided by name rather than ndim because scanned layers stack norm scales into 2-D arrays.
    """
    def is_matrix(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", last))
        return str(name) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    chain = []
    if cfg.grad_clip is not None:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*chain), schedule
