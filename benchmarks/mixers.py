"""Every mixer side by side on CPU: speed per FLOP against attention, activation memory, compile.

    python benchmarks/mixers.py                                  # every table (~20 min on 2 cores)
    python benchmarks/mixers.py --tables speed --bursts 5
    python benchmarks/mixers.py --tables memory --lengths 1024,2048,4096,8192
    python benchmarks/mixers.py --tables compile --depths 4,12,24

Mixers (--mixers, comma separated; each is the mixer of a preset, at d_model 256):
  attn     full causal attention (configs/tiny.py's `attn`: 4 q / 2 kv heads of 64)
  swa      sliding-window attention, window 64 (tiny's `swa`)
  gla      configs/gla_hybrid.py's `gla`       gdn     configs/gdn_hybrid.py's `gdn`
  deltanet gdn's settings as kind deltanet     moba    configs/moba_hybrid.py's `moba`
  nsa      configs/nsa_hybrid.py's `nsa`       memory  configs/titans_hybrid.py's `memory`

Tables (--tables):
  speed    the mixer alone, forward + backward (gradients of its parameters and of x), jitted,
           B8xT256 and B1xT2048, interleaved with attention (A, B, A, B bursts, median of the
           per-burst ratios): ms, GFLOP/s by the mixer's own `flops_per_token`, % of the
           hardware peak (train/hardware.py) and speed per FLOP relative to attention.
  memory   activation memory per layer: XLA's temp bytes of the compiled train step (AdamW,
           fp32, B1) of a model whose every layer is the mixer, at 2 and 4 layers; the
           difference over 2 is one layer's share (embedding, loss and optimizer cancel).
  compile  seconds to lower + compile the tiny hybrid's train step at --depths layers with
           `model.scan` on (periods stacked and scanned) and off (a loop of layers).

Every table prints the CPU, the load before and after, and the date. No asserts.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import interleaved, ms, print_rows, ratio, table  # noqa: E402  (benchmarks/timing.py; first)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import layers  # noqa: E402,F401  (registers the mixers)
import models  # noqa: E402
from layers.registry import LayerContext, build_mixer, mixer_class  # noqa: E402
from train.config import ModelConfig, RuntimeConfig  # noqa: E402
from train.metrics import peak_flops  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.step import init_state, make_train_step  # noqa: E402
from train_step import OPTIMIZER, VOCAB, make_batch  # noqa: E402  (benchmarks/train_step.py)

F32 = jnp.float32
D_MODEL = 256
SOURCES = {"attn": ("tiny", "attn"), "swa": ("tiny", "swa"), "gla": ("gla_hybrid", "gla"),
           "gdn": ("gdn_hybrid", "gdn"), "deltanet": ("gdn_hybrid", "gdn"),
           "moba": ("moba_hybrid", "moba"), "nsa": ("nsa_hybrid", "nsa"),
           "memory": ("titans_hybrid", "memory")}
TABLES = ("speed", "memory", "compile")


def mixer_config(name: str):
    preset, key = SOURCES[name]
    cfg = importlib.import_module(f"configs.{preset}").config().model.mixers[key]
    if name == "deltanet":  # GDN's settings without the decay: the kind of DeltaNet
        from layers.linear_attention.deltanet import DeltaNetConfig
        fields = {f.name for f in dataclasses.fields(DeltaNetConfig)}
        cfg = DeltaNetConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields and k != "kind"})
    return cfg


def speed_table(args) -> None:
    peak, how = peak_flops(F32)
    with table(f"speed: mixer fwd+bwd alone, d={D_MODEL}, relative to attn", args.bursts, args.calls):
        print(f"peak: {how}")
        body = []
        for b, t in ((8, 256), (1, 2048)):
            ctx = LayerContext(d_model=D_MODEL, dtype=F32, runtime=RuntimeConfig(), init_std=0.02, out_std=0.02)
            x = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, D_MODEL)), F32)
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            seg = jnp.ones((b, t), jnp.int32)
            calls, flops = {}, {}
            for name in ["attn"] + [m for m in args.mixers if m != "attn"]:
                cfg = mixer_config(name)
                graphdef, state = nnx.split(build_mixer(cfg, ctx, rngs=nnx.Rngs(params=0)))

                def loss(state, x, graphdef=graphdef):
                    y, _ = nnx.merge(graphdef, state)(x, positions=pos, segment_ids=seg)
                    return jnp.sum(y * y)

                compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
                calls[name] = lambda c=compiled, s=state: c(s, x)
                flops[name] = mixer_class(cfg).flops_per_token(cfg, D_MODEL, t)
            times = interleaved(calls, args.bursts, args.calls)
            for name in calls:
                gflops = b * t * flops[name] / (ms(times, name) / 1e3) / 1e9
                body.append([f"B{b}xT{t}", name, f"{flops[name] / 1e6:.2f}", f"{ms(times, name):.1f}",
                             f"{gflops:.1f}", f"{gflops * 1e9 / peak:.0%}",
                             f"{ratio(times, 'attn', name, flops[name] / flops['attn']):.2f}"])
        print_rows(["shape", "mixer", "MFLOP/token", "ms", "GFLOP/s", "% of peak", "per FLOP / attn"], body)


def _train_step(mc: ModelConfig, b: int, t: int, runtime: RuntimeConfig | None = None):
    """(the jitted train step lowered for B x T, its state, its batch) for `mc`."""
    model = models.build(mc, runtime or RuntimeConfig(), seed=0)
    tx, schedule = make_optimizer(OPTIMIZER, 10)
    graphdef, state = init_state(model, tx, 0)
    step = make_train_step(graphdef, tx, schedule, z_loss=mc.z_loss)
    batch = make_batch(b, t, 0)
    return step.lower(state, batch)


def _pure(name: str, layers_: int) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, num_layers=layers_, pattern=(name,),
                       mixers={name: mixer_config(name)})


def memory_table(args) -> None:
    mib = 2.0 ** 20
    with table("memory: activation memory per layer, XLA temp bytes of the train step, B1, fp32",
               args.bursts, args.calls):
        body = []
        for name in args.mixers:
            cells = [name]
            for t in args.lengths:
                temp = {}
                for n in (2, 4):
                    stats = _train_step(_pure(name, n), 1, t).compile().memory_analysis()
                    temp[n] = stats.temp_size_in_bytes
                cells.append(f"{(temp[4] - temp[2]) / 2 / mib:.0f}")
            body.append(cells)
            print(f"  {name}: " + " ".join(cells[1:]) + " MiB", flush=True)
        print_rows(["mixer"] + [f"T={t} MiB/layer" for t in args.lengths], body)


def compile_table(args) -> None:
    from configs.tiny import config
    base = dataclasses.replace(config().model, vocab_size=VOCAB)
    with table("compile: lower + compile seconds of the tiny hybrid's train step, B8xT256",
               args.bursts, args.calls):
        body = []
        for depth in args.depths:
            cells = [str(depth)]
            for scan in (True, False):
                mc = dataclasses.replace(base, num_layers=depth, scan=scan)
                t0 = time.perf_counter()
                lowered = _train_step(mc, 8, 256)
                lower_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                lowered.compile()
                cells += [f"{lower_s:.1f}", f"{time.perf_counter() - t0:.1f}"]
            body.append(cells)
        print_rows(["layers", "scan: lower s", "scan: compile s", "loop: lower s", "loop: compile s"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma separated, of {TABLES}")
    ap.add_argument("--mixers", default=",".join(SOURCES), help=f"comma separated, of {list(SOURCES)}")
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="memory table: sequence lengths")
    ap.add_argument("--depths", default="4,12,24", help="compile table: layer counts")
    ap.add_argument("--bursts", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2, help="calls per burst; the fastest is kept")
    args = ap.parse_args()
    args.mixers = args.mixers.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.depths = [int(x) for x in args.depths.split(",")]
    for what, chosen, known in (("--tables", args.tables.split(","), TABLES), ("--mixers", args.mixers, SOURCES)):
        for name in chosen:
            if name not in known:
                raise SystemExit(f"{what}: unknown {name!r}; known: {list(known)}")
    for name in args.tables.split(","):
        globals()[f"{name}_table"](args)


if __name__ == "__main__":
    main()
