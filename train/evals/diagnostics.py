"""The `diagnostics` eval suite: attention sinks, attention entropy and activation size per layer.

    python -m train.eval RUN_DIR --suite diagnostics
    record = run(load_run(RUN_DIR))                   # train.artifacts.LoadedRun

On the run's eval batches (`train.data.make_eval_batches`, train.eval_batches of them), per layer:

* attention layers (mixer kind "attention": attn, swa and any mixer declared with that kind,
  with any of its score options), per query head: the sink rate (mean attention share on the
  first token of the query's document: softmax's probability, a sigmoid weight over the query's
  total weight), the attention entropy in nats, and with learned sinks the share the sink
  logit takes, averaged over the queries that are neither padding nor their document's first
  token (those see only themselves: mass 1, entropy 0). Heads with different windows
  (head_windows) are measured with their own windows. The math is in
  train/evals/attention_stats.py and forms no [T, T] array.
* every layer: max |x| of the residual stream after the layer ("max_activation") and of what the
  layer added to it ("max_update"), over non-padding tokens.

Record: results = {"batches": n, "layers": [{"layer", "mixer" (its name in the pattern), "kind"
(its config kind), "sink_rate" [per head] or None, "entropy" [per head] or None,
"max_activation", "max_update", and for attention layers "queries" (queries averaged over) and
"entropy_method" ("lse", or "blocked_softcap" / "blocked_sigmoid" for soft-capped logits and
sigmoid scores), and for layers with learned sinks "learned_sink_rate" [per head]}]}; summary (`summarize`):
diagnostics/sink_rate_mean, sink_rate_max, entropy_mean, max_activation, and per layer L
diagnostics/sink_rate@L, entropy@L (head means; attention layers), learned_sink_rate@L (layers
with learned sinks) and max_activation@L.

The model is run layer by layer (scanned periods sliced out of the stacked params, one jitted
function for all batches); each attention layer's q and k, after qk-norm and RoPE, are read
through `nnx.capture` of the `sow` in layers/attention/mixer.py, which is a no-op in training.
The training loop calls `make_diagnostics` every train.diagnostics_every steps.
"""
from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.sharding import RESIDUAL, constrain
from layers.attention.mixer import window_groups
from train.config import AttentionConfig, ModelConfig
from train.evals import attention_stats

SUITE = "diagnostics"
_F32 = jnp.float32


def layer_blocks(model) -> list:
    """Every residual block of `model` (models.LM) in layer order, each with its own params:
    the scanned periods' stacked params are sliced per period (inside jit, slices of the traced
    params), so the layers can run one by one instead of under `lax.scan`."""
    stack, blocks = model.stack, []
    if stack.scanned is not None:
        period_def, stacked = nnx.split(stack.scanned)
        for i in range(stack.num_scanned):
            blocks += list(nnx.merge(period_def, jax.tree.map(lambda a: a[i], stacked)).blocks)
    for period in stack.loop:
        blocks += list(period.blocks)
    return blocks


def attention_configs(cfg: ModelConfig) -> list[AttentionConfig | None]:
    """Per layer: its AttentionConfig when its mixer is softmax attention, else None."""
    return [m if isinstance(m, AttentionConfig) else None for m in map(cfg.mixer, cfg.layer_names())]


def make_batch_stats(graphdef, cfg: ModelConfig, *, implementation: str | None = None) -> Callable:
    """Jitted `stats(params, batch) -> [per layer dict]` of sums over one batch (adding up across
    batches): attention layers give head_sums' sink_sum [H], entropy_sum [H], queries; every
    layer gives max_activation and max_update (scalars).

    graphdef: of the model split as nnx.split(model, nnx.Param); batch: dict of int [B, T]
    arrays with inputs, segment_ids, positions. implementation: of attention_with_lse.
    """
    attn = attention_configs(cfg)

    def stats(params, batch):
        model = nnx.merge(graphdef, params)
        seg, pos = batch["segment_ids"], batch["positions"]
        tokens = (seg != 0)[..., None]
        x = constrain(model.embed(batch["inputs"]), RESIDUAL)
        out = []
        for block, acfg in zip(layer_blocks(model), attn, strict=True):
            rec = {}
            if acfg is None:
                y, _ = block(x, positions=pos, segment_ids=seg)
            else:
                (y, _), inter = nnx.capture(block, nnx.Intermediate)(x, positions=pos, segment_ids=seg)
                q, k = inter["mixer"]["qk"][0]
                rec = attention_stats.head_sums(_layer_stats(
                    block.mixer.score_options(), q, k, seg, pos, implementation))
            rec["max_activation"] = jnp.where(tokens, jnp.abs(y.astype(_F32)), 0.0).max()
            rec["max_update"] = jnp.where(tokens, jnp.abs(y.astype(_F32) - x.astype(_F32)), 0.0).max()
            out.append(rec)
            x = y
        # Replicated (a few numbers per layer), so that every process of a multi-host run can
        # read them whole.
        return jax.tree.map(lambda a: constrain(a, (None,) * a.ndim), out)

    return jax.jit(stats)


def _layer_stats(options: dict, q, k, seg, pos, implementation) -> dict:
    """attention_stats of one attention layer with its score options (the mixer's
    `score_options()`: score, sigmoid_bias, sinks, logit_softcap, kv_head_windows), one call
    per distinct window of its kv heads, the per-head results put back in head order."""
    heads, parts = [], []
    for w, kv, qh in window_groups(options["kv_head_windows"], q.shape[2]):
        qh = np.array(qh)
        sinks = None if options["sinks"] is None else options["sinks"][qh]
        parts.append(attention_stats.attention_stats(
            q[:, :, qh], k[:, :, np.array(kv)], seg, pos, window=w,
            logit_softcap=options["logit_softcap"], score=options["score"],
            sigmoid_bias=options["sigmoid_bias"], sinks=sinks, implementation=implementation))
        heads.append(qh)
    if len(parts) == 1:
        return parts[0]
    back = np.argsort(np.concatenate(heads))  # head order from group order
    return {key: (parts[0][key] if key == "mask" else
                  jnp.concatenate([p[key] for p in parts], axis=-1)[..., back])
            for key in parts[0]}


def make_diagnostics(graphdef, cfg: ModelConfig, *, implementation: str | None = None) -> Callable:
    """`diagnose(params, batches) -> (results, summary)`: the statistics over all `batches`
    (one compilation for batches of one shape), as `run` reports them."""
    stats = make_batch_stats(graphdef, cfg, implementation=implementation)

    def diagnose(params, batches):
        totals = None
        for batch in batches:
            got = jax.device_get(stats(params, batch))
            totals = got if totals is None else [_add(a, b) for a, b in zip(totals, got)]
        results = _results(cfg, totals)
        return results, summarize(results)

    return diagnose


def _add(a: dict, b: dict) -> dict:
    return {k: np.maximum(a[k], b[k]) if k.startswith("max_") else a[k] + b[k] for k in a}


def _finite(v) -> float | None:
    """A float for JSON, or None for what could not be measured (NaN, inf)."""
    v = float(v)
    return v if np.isfinite(v) else None


def _results(cfg: ModelConfig, totals: list[dict]) -> list[dict]:
    """One JSON-able record per layer from the summed statistics (see the module docstring)."""
    out = []
    for i, (name, acfg, t) in enumerate(zip(cfg.layer_names(), attention_configs(cfg), totals)):
        rec = {"layer": i, "mixer": name, "kind": cfg.mixer(name).kind, "sink_rate": None, "entropy": None}
        if acfg is not None:
            n = float(t["queries"])
            if n > 0:
                rec["sink_rate"] = [_finite(v / n) for v in t["sink_sum"]]
                rec["entropy"] = [_finite(v / n) for v in t["entropy_sum"]]
                if "learned_sink_sum" in t:
                    rec["learned_sink_rate"] = [_finite(v / n) for v in t["learned_sink_sum"]]
            rec["queries"] = int(n)
            # Without a soft-cap the entropy comes from the lse and attention with v = k; with
            # one, from a second blocked pass (neither forms [T, T]).
            rec["entropy_method"] = ("blocked_sigmoid" if acfg.score == "sigmoid" else
                                     "lse" if acfg.logit_softcap is None else "blocked_softcap")
        rec["max_activation"] = _finite(t["max_activation"])
        rec["max_update"] = _finite(t["max_update"])
        out.append(rec)
    return out


def summarize(results: list[dict]) -> dict[str, float]:
    """Flat scalars: means over attention layers (each layer weighs the same, heads averaged),
    the largest head sink rate, the largest activation, and per layer L:
    sink_rate@L / entropy@L (head means, attention layers) and max_activation@L (every layer)."""
    out: dict[str, float] = {}
    measured = lambda r, key: r[key] is not None and None not in r[key]
    sink = [r for r in results if measured(r, "sink_rate")]
    ent = [r for r in results if measured(r, "entropy")]
    act = [r for r in results if r["max_activation"] is not None]
    if sink:
        out[f"{SUITE}/sink_rate_mean"] = float(np.mean([np.mean(r["sink_rate"]) for r in sink]))
        out[f"{SUITE}/sink_rate_max"] = float(max(max(r["sink_rate"]) for r in sink))
    if ent:
        out[f"{SUITE}/entropy_mean"] = float(np.mean([np.mean(r["entropy"]) for r in ent]))
    if act:
        out[f"{SUITE}/max_activation"] = float(max(r["max_activation"] for r in act))
    for r in sink:
        out[f"{SUITE}/sink_rate@L{r['layer']}"] = float(np.mean(r["sink_rate"]))
    for r in results:
        if r.get("learned_sink_rate") and None not in r["learned_sink_rate"]:
            out[f"{SUITE}/learned_sink_rate@L{r['layer']}"] = float(np.mean(r["learned_sink_rate"]))
    for r in ent:
        out[f"{SUITE}/entropy@L{r['layer']}"] = float(np.mean(r["entropy"]))
    for r in act:
        out[f"{SUITE}/max_activation@L{r['layer']}"] = r["max_activation"]
    return out


def run(loaded, *, seed: int = 0) -> dict:
    """The suite on a loaded run (train.artifacts.LoadedRun): its eval batches, one device.

    seed: recorded only; the batches and the statistics are deterministic.
    Returns {"suite", "step", "seed", "elapsed_s", "results", "summary"} with results =
    {"batches": n, "layers": [one record per layer, see the module docstring]} and summary the
    flat scalars of `summarize`.
    """
    from train.data import make_eval_batches  # data loading: only when the suite runs
    from train.evals.common import make_record, text_data

    t0 = time.perf_counter()
    cfg = loaded.cfg
    data = cfg.data if cfg.data.source == "mqar" else text_data(cfg, loaded.run_dir)
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in make_eval_batches(data, cfg.train.eval_batches)]
    graphdef, params = nnx.split(loaded.model, nnx.Param)
    layers, summary = make_diagnostics(graphdef, cfg.model)(params, batches)
    return make_record(SUITE, loaded, seed, t0, {"batches": len(batches), "layers": layers}, summary)
