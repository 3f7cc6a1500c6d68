"""The jitted train and eval steps, written over a functional state.

TrainState is a plain dict pytree so that orbax saves and restores it as is:
    params     nnx.State of the model's nnx.Param leaves (float32)
    opt_state  optax state
    step       int32 scalar: optimizer steps taken
    rng        uint32[2] key; folded with the step for any stochastic layer
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from layers.sharding import constrain
from models import lm_loss

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def init_state(model, tx: optax.GradientTransformation, seed: int) -> tuple[Any, dict]:
    """Split the model into (graphdef, TrainState)."""
    graphdef, params = nnx.split(model, nnx.Param)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(seed)}
    return graphdef, state


def _forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    return logits


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum: int = 1, z_loss: float = 0.0, state_shardings=None) -> Callable:
    """Returns jitted `step(state, batch) -> (state, metrics)`.

    state_shardings: the state's shardings (a pytree like the state), pinned on the output so
    the new state keeps the layout of the old one. Without it XLA's sharding propagation may
    hand back a param in another layout (e.g. a replicated scale split over "tensor"), and the
    next step recompiles for the new input layout.

    batch: dict of [B, T] arrays (BATCH_KEYS). With grad_accum = A the batch is cut into A
    micro-batches of B / A rows, scanned over, and their gradients summed; every micro-batch
    loss is divided by the token count of the whole batch, so the result equals one big batch.
    Micro-batch i takes rows i, i + A, i + 2A, ...: with the batch split by rows over devices,
    each device then holds its own share of every micro-batch and no rows move.
    A step whose loss, gradient norm or new parameters are not finite leaves params and
    optimizer state unchanged and reports `finite = False` (the loop then stops the run). The
    params are checked because finite gradients can still give a broken update (a NaN learning
    rate, eps = 0 with a zero second moment, an overflow).
    """
    def micro_loss(params, micro, normalizer):
        logits = _forward(graphdef, params, micro)
        return lm_loss(logits, micro["targets"], micro["loss_mask"], z_loss, normalizer)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state, batch):
        params = state["params"]
        normalizer = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        if grad_accum == 1:
            (loss, aux), grads = grad_fn(params, batch, normalizer)
        else:
            micro = jax.tree.map(lambda a: constrain(
                a.reshape(a.shape[0] // grad_accum, grad_accum, *a.shape[1:]).swapaxes(0, 1), (None, "batch")), batch)
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(carry, mb):
                g_acc, l_acc, a_acc = carry
                (l, a), g = grad_fn(params, mb, normalizer)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, a_acc, a)), None

            z = jnp.zeros((), jnp.float32)
            aux0 = {"ce_sum": z, "tokens": z, "correct": z}
            (grads, loss, aux), _ = jax.lax.scan(body, (zeros, z, aux0), micro)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(new_params)]))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + finite.astype(jnp.int32), "rng": state["rng"]}
        tokens = jnp.maximum(aux["tokens"], 1.0)
        metrics = {"loss": loss, "ce": aux["ce_sum"] / tokens, "accuracy": aux["correct"] / tokens,
                   "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": aux["tokens"],
                   "finite": finite}
        return new_state, metrics

    def pinned_step(state, batch):
        new_state, metrics = step(state, batch)
        if state_shardings is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        return new_state, metrics

    return jax.jit(pinned_step, donate_argnums=(0,))


def make_eval_step(graphdef) -> Callable:
    """Returns jitted `eval_step(params, batch, token_bytes) -> sums` with ce_sum, tokens,
    correct and bytes (UTF-8 bytes of the target tokens, for bits per byte)."""
    def eval_step(params, batch, token_bytes):
        logits = _forward(graphdef, params, batch)
        _, aux = lm_loss(logits, batch["targets"], batch["loss_mask"])
        mask = batch["loss_mask"].astype(jnp.float32)
        aux["bytes"] = (token_bytes[batch["targets"]].astype(jnp.float32) * mask).sum()
        return aux
    return jax.jit(eval_step)
