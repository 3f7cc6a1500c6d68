"""MQAR recall on CPU: Titans' LMM (mixer "memory") against Hebbian linear attention (mixer
"linear") and Gated DeltaNet at equal recurrent state per layer, with the LMM's decay and
momentum ablated.

    .venv/bin/python benchmarks/memory_recall.py              # 1500 steps each, ~20-30 min
    .venv/bin/python benchmarks/memory_recall.py --quick      # 300 steps each (all on the plateau)
    .venv/bin/python benchmarks/memory_recall.py --models lmm_linear,linear --json out.json
    .venv/bin/python benchmarks/memory_recall.py --models lmm,lmm_no_momentum,lmm_no_decay  # MLP memory

Every model is the same 2-layer LM (d_model 64, both layers the mixer under test, SwiGLU MLPs,
tied embedding), trained by `train.loop.run` on the synthetic MQAR task (`configs/mqar.py`'s
data at vocab 256, 8 kv pairs, seq 64, batch 16 by default) with the same optimizer (AdamW
3e-3, cosine), seed, data order and step count. MQAR learning sits on a plateau (loss ~log 128)
for several hundred steps before recall sets in, hence 1500 steps. Reported: recall accuracy on
the answer positions of the eval split (the loop's final eval, 256 examples; chance is 1/128,
and a model that only learns "one of the 8 values seen in this row" scores ~1/8), the eval
loss, the training loss of the last step, parameters, and wall time (the whole `run`: compile,
training, eval; the load average before the run is printed, since other processes share the
2 cores). A run whose loss turns NaN is reported as diverged (train.loop's NonFiniteError),
not hidden.

Recurrent state per layer (floats per sequence, what a decode step carries; the short conv's
3-token history is the same for all and left out):
  memory  H heads x the memory's weights (linear: K x V; MLP: K x E + E x V, E = expansion K),
          plus as many momentum floats with gd_momentum (inner-loop optimizer state, printed
          separately; the match is made on the weights);
  linear  H heads x K x (V + 1): the K x V sum of phi(k) v^T and the K normaliser sum of phi(k);
  gdn     H heads x K x V.
With d_model 64: the linear LMM one 64 x 64 head = 4096; the MLP LMM 4 heads of 16 with
expansion 2 = 4 x (16 x 32 + 32 x 16) = 4096; linear attention 64 x 65 = 4160; GDN 4096.

All mixers get the short causal conv (width 4) on q/k/v, so the comparison is the write rule
and not the token shift the conv provides. The LMM's settings (LMM_LINEAR below) differ from
the mixer's text defaults in the inner learning-rate bound (max_lr 1, a full delta step, vs
0.01), the anchor (b = 1 vs 16) and W0 (~0 vs LeCun normal); see benchmarks/README.md for the
trials that led there.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from train.config import (Config, DataConfig, ModelConfig, MQARConfig, OptimizerConfig,  # noqa: E402
                          RuntimeConfig, TrainConfig)
from train.linear_attention_config import GDNConfig, LinearAttnConfig  # noqa: E402
from train.loop import NonFiniteError, run  # noqa: E402
from train.memory_config import MemoryConfig  # noqa: E402

D_MODEL = 64
# The Titans LMM that recalls: a linear memory of one 64 x 64 head (the state of the linear
# attention below), l2 bias, per-token decay, plain GD, gradient anchor b = 1, max_lr 1 (a full
# delta-rule step at theta = 1), and W0 ~ 0 (w0_std 1e-4: the memory starts empty, as GDN's state
# does). With the mixer's default LeCun-normal W0 every read starts as noise of norm ~1 against
# values of norm ~0.2, and the same model stayed on the value-prior plateau (see the README).
LMM_LINEAR = MemoryConfig(num_heads=1, head_dim=64, arch="linear", chunk_size=1, max_lr=1.0,
                          algorithm="gd", conv_size=4, w0_std=1e-4)
# The MLP memory at the same state (4 heads, 16 -> 32 -> 16), chunk 4, max_lr 0.1: it stayed on
# the plateau or diverged (README); kept for the record and for further work.
LMM = MemoryConfig(num_heads=4, head_dim=16, arch="mlp", depth=2, expansion=2, chunk_size=4,
                   max_lr=0.1, conv_size=4)
MODELS = {
    "lmm_linear": ("Titans LMM, linear memory (gd, decay)", LMM_LINEAR),
    "lmm_linear_no_decay": ("LMM linear, decay off (retention none)",
                            dataclasses.replace(LMM_LINEAR, retention="none")),
    "lmm_linear_momentum": ("LMM linear, momentum on (gd_momentum)",
                            dataclasses.replace(LMM_LINEAR, algorithm="gd_momentum")),
    "lmm": ("Titans LMM (MLP, momentum + decay)", LMM),
    "lmm_no_momentum": ("LMM MLP, momentum off (gd)", dataclasses.replace(LMM, algorithm="gd")),
    "lmm_no_decay": ("LMM MLP, decay off (retention none)", dataclasses.replace(LMM, retention="none")),
    "linear": ("linear attention (Hebbian, elu+1)",
               LinearAttnConfig(num_heads=1, expand_k=1.0, expand_v=1.0, conv_size=4)),
    # a delta-rule reference at the same state (64 x 64)
    "gdn": ("Gated DeltaNet (reference)", GDNConfig(num_heads=1, expand_k=1.0, expand_v=1.0)),
}
DEFAULT_MODELS = ("lmm_linear", "lmm_linear_no_decay", "lmm_linear_momentum", "linear", "gdn")


def state_floats(mixer, d_model: int) -> tuple[int, int]:
    """(memory floats, momentum floats) per layer and sequence: see the module docstring."""
    if isinstance(mixer, MemoryConfig):
        from pallas_kernels.neural_memory.common import layer_shapes
        hd = mixer.dim_per_head(d_model)
        w = mixer.num_heads * sum(a * b for a, b in layer_shapes(mixer.spec(), hd, hd))
        return w, (w if mixer.algorithm == "gd_momentum" else 0)
    k = d_model * mixer.expand_k / mixer.num_heads
    v = d_model * mixer.expand_v / mixer.num_heads
    return int(mixer.num_heads * k * (v + int(getattr(mixer, "normalize", False)))), 0


def make_config(name: str, mixer, *, steps: int, pairs: int, seq_len: int, batch: int, lr: float,
                seed: int) -> Config:
    return Config(
        name=f"memory_recall_{name}",
        model=ModelConfig(d_model=D_MODEL, num_layers=2, pattern=("mix",), mixers={"mix": mixer}),
        data=DataConfig(source="mqar", seq_len=seq_len, batch_size=batch,
                        mqar=MQARConfig(vocab_size=256, num_kv_pairs=pairs, num_eval_examples=256)),
        optimizer=OptimizerConfig(lr=lr, warmup_steps=min(50, steps // 5), weight_decay=0.1),
        train=TrainConfig(steps=steps, seed=seed, log_every=10, eval_every=0, eval_batches=256 // batch,
                          checkpoint_every=10 * steps, async_checkpoints=False),
        runtime=RuntimeConfig(mesh_data=1),
    )


def train_one(cfg: Config, log_path: Path) -> dict:
    """train.loop.run in a scratch directory; its log goes to log_path, not the console."""
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "a") as log, \
            contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        t0 = time.perf_counter()
        summary = run(cfg, Path(tmp) / cfg.name)
        wall = time.perf_counter() - t0
        losses = [json.loads(line) for line in (Path(tmp) / cfg.name / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if r.get("split", r.get("kind")) == "train" and "loss" in r]
    return dict(summary=summary, wall=wall, final_loss=train_losses[-1] if train_losses else math.nan)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 steps (the LMM is still on its plateau)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--steps", type=int, default=None, help="default 1500 (quick: 300)")
    ap.add_argument("--pairs", type=int, default=8, help="MQAR kv pairs")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="train logs go here (default: a temp file, path printed)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    steps = args.steps or (300 if args.quick else 1500)
    pairs = args.pairs
    log_path = Path(args.log or tempfile.mkstemp(prefix="memory_recall_", suffix=".log")[1])
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {list(MODELS)}")

    print(f"MQAR: vocab 256, {pairs} kv pairs, seq {args.seq_len}, batch {args.batch}, {steps} steps, "
          f"lr {args.lr}, d_model {D_MODEL}, 2 layers; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; train logs: {log_path}", flush=True)
    rows = []
    for m in names:
        label, mixer = MODELS[m]
        cfg = make_config(m, mixer, steps=steps, pairs=pairs, seq_len=args.seq_len, batch=args.batch,
                          lr=args.lr, seed=args.seed)
        mem, mom = state_floats(mixer, D_MODEL)
        load = os.getloadavg()[0]
        try:
            r = train_one(cfg, log_path)
        except NonFiniteError as e:  # a diverged inner loop is a result, not a crash
            row = dict(model=m, label=label, state=mem, momentum=mom, params=None, accuracy=None,
                       eval_loss=None, final_loss=None, wall=None, load=load, diverged=str(e).split(";")[0])
            rows.append(row)
            print(f"  {m}: {row['diverged']}", flush=True)
            continue
        ev = r["summary"]["eval"]
        row = dict(model=m, label=label, state=mem, momentum=mom, params=r["summary"]["params"],
                   accuracy=ev["accuracy"], eval_loss=ev["loss"], final_loss=r["final_loss"],
                   wall=r["wall"], load=load)
        rows.append(row)
        print(f"  done {m}: acc {row['accuracy']:.3f}, {row['wall']:.0f} s", flush=True)

    head = (f"| {'model':<38} | state/layer | momentum | params | MQAR acc | eval loss | final train loss "
            f"| wall s | load |")
    print()
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        if r.get("diverged"):
            print(f"| {r['label']:<38} | {r['state']:>11} | {r['momentum']:>8} | {r['diverged']} |")
            continue
        print(f"| {r['label']:<38} | {r['state']:>11} | {r['momentum']:>8} | {r['params']:>6} | "
              f"{r['accuracy']:>8.3f} | {r['eval_loss']:>9.3f} | {r['final_loss']:>16.3f} | {r['wall']:>6.0f} "
              f"| {r['load']:>4.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
