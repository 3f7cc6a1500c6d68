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
  moba_q64, nsa_q64  moba / nsa with per-query-block routing (route_block_q = 64)

Tables (--tables):
  speed    the mixer alone, forward + backward (gradients of its parameters and of x), jitted,
           B8xT256 and B1xT2048, interleaved with attention (A, B, A, B bursts, median of the
           per-burst ratios): ms, GFLOP/s by the mixer's own `flops_per_token`, % of the
           hardware peak (train/hardware.py) and speed per FLOP relative to attention.
  train    the train step (AdamW, fp32, B8xT256) of a 4-layer model whose every layer is the
           mixer, all mixers interleaved: tokens/s, % of the hardware peak (MFU), tokens/s and
           FLOP/s relative to attn's model, compile seconds.
  memory   activation memory per layer: XLA's temp bytes of the compiled train step (AdamW,
           fp32, B1) of a model whose every layer is the mixer, at 2 and 4 layers; the
           difference over 2 is one layer's share (embedding, loss and optimizer cancel).
  compile  seconds to lower + compile the tiny hybrid's train step at --depths layers with
           `model.scan` on (periods stacked and scanned) and off (a loop of layers).

Every table prints the CPU, the load before and after, and the date; with more than one table
a summary per mixer follows. No asserts.
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

import layers.catalog  # noqa: E402,F401  (registers the mixers)
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
           "moba_q64": ("moba_hybrid", "moba"), "nsa_q64": ("nsa_hybrid", "nsa"),
           "memory": ("titans_hybrid", "memory")}
# Variants: (the preset mixer's fields replaced). *_q64: per-query-block routing, 64 queries
# share a choice (route_block_q; token routing is the faithful default).
VARIANTS = {"moba_q64": {"route_block_q": 64}, "nsa_q64": {"route_block_q": 64}}
TABLES = ("speed", "train", "memory", "compile")


def mixer_config(name: str):
    preset, key = SOURCES[name]
    cfg = importlib.import_module(f"configs.{preset}").config().model.mixers[key]
    if name == "deltanet":  # GDN's settings without the decay: the kind of DeltaNet
        from layers.linear_attention.deltanet import DeltaNetConfig
        fields = {f.name for f in dataclasses.fields(DeltaNetConfig)}
        cfg = DeltaNetConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields and k != "kind"})
    return dataclasses.replace(cfg, **VARIANTS.get(name, {}))


def mixer_grad(cfg, b: int, t: int, d: int = D_MODEL):
    """(a call of the compiled fwd+bwd of mixer `cfg` alone, gradients of its parameters and of
    x [B, T, d], one document per row; the mixer's training FLOPs per token)."""
    ctx = LayerContext(d_model=d, dtype=F32, runtime=RuntimeConfig(), init_std=0.02, out_std=0.02)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, d)), F32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    graphdef, state = nnx.split(build_mixer(cfg, ctx, rngs=nnx.Rngs(params=0)))

    def loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x, positions=pos, segment_ids=seg)
        return jnp.sum(y * y)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
    return (lambda: compiled(state, x)), mixer_class(cfg).flops_per_token(cfg, d, t)


def speed_table(args) -> None:
    peak, how = peak_flops(F32)
    with table(f"speed: mixer fwd+bwd alone, d={D_MODEL}, relative to attn", args.bursts, args.calls):
        print(f"peak: {how}")
        body = []
        for b, t in ((8, 256), (1, 2048)):
            calls, flops = {}, {}
            for name in ["attn"] + [m for m in args.mixers if m != "attn"]:
                calls[name], flops[name] = mixer_grad(mixer_config(name), b, t)
            times = interleaved(calls, args.bursts, args.calls)
            for name in calls:
                gflops = b * t * flops[name] / (ms(times, name) / 1e3) / 1e9
                args.summary.setdefault(name, {})[f"per FLOP / attn B{b}xT{t}"] = \
                    f"{ratio(times, 'attn', name, flops[name] / flops['attn']):.2f}"
                body.append([f"B{b}xT{t}", name, f"{flops[name] / 1e6:.2f}", f"{ms(times, name):.1f}",
                             f"{gflops:.1f}", f"{gflops * 1e9 / peak:.0%}",
                             f"{ratio(times, 'attn', name, flops[name] / flops['attn']):.2f}"])
        print_rows(["shape", "mixer", "MFLOP/token", "ms", "GFLOP/s", "% of peak", "per FLOP / attn"], body)


def train_table(args) -> None:
    b, t, layers_ = 8, 256, 4
    peak, how = peak_flops(F32)
    with table(f"train: train step of {layers_}-layer single-mixer models, B{b}xT{t}, fp32, AdamW, d={D_MODEL}",
               args.bursts, args.calls):
        print(f"peak: {how}")
        calls, flops, compile_s = {}, {}, {}
        for name in ["attn"] + [m for m in args.mixers if m != "attn"]:
            mc = _pure(name, layers_)
            lowered, state, batch = _train_step(mc, b, t, with_inputs=True)
            t0 = time.perf_counter()
            compiled = lowered.compile()
            compile_s[name] = time.perf_counter() - t0
            holder = {"state": state}

            def call(compiled=compiled, holder=holder, batch=batch):
                holder["state"], metrics = compiled(holder["state"], batch)
                return metrics
            calls[name] = call
            flops[name] = sum(models.flops_per_token(mc, t).values())
        times = interleaved(calls, args.bursts, args.calls)
        body = []
        for name in calls:
            tps = b * t / (ms(times, name) / 1e3)
            row = {"tok/s": f"{tps:.0f}", "MFU (hw)": f"{tps * flops[name] / peak:.0%}",
                   "tok/s / attn": f"{ratio(times, 'attn', name):.2f}",
                   "FLOP/s / attn": f"{ratio(times, 'attn', name, flops[name] / flops['attn']):.2f}",
                   "compile s": f"{compile_s[name]:.1f}"}
            args.summary.setdefault(name, {}).update({f"train {k}": v for k, v in row.items()})
            body.append([name, f"{flops[name] / 1e6:.1f}"] + list(row.values()))
        print_rows(["mixer", "MFLOP/token"] + list(row), body)


def _train_step(mc: ModelConfig, b: int, t: int, runtime: RuntimeConfig | None = None,
                with_inputs: bool = False):
    """The jitted train step lowered for B x T for `mc` (with its state and batch if asked)."""
    model = models.build(mc, runtime or RuntimeConfig(), seed=0)
    tx, schedule = make_optimizer(OPTIMIZER, 1000)
    graphdef, state = init_state(model, tx, 0)
    step = make_train_step(graphdef, tx, schedule, z_loss=mc.z_loss)
    batch = make_batch(b, t, 0)
    lowered = step.lower(state, batch)
    return (lowered, state, batch) if with_inputs else lowered


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
                args.summary.setdefault(name, {})[f"MiB/layer T={t}"] = cells[-1]
            body.append(cells)
            print(f"  {name}: " + " ".join(cells[1:]) + " MiB", flush=True)
        print_rows(["mixer"] + [f"T={t} MiB/layer" for t in args.lengths], body)


def compile_table(args, repeats: int = 3) -> None:
    """Build, lower and compile seconds of the tiny hybrid's train step, `model.scan` on and off.

    Each (depth, scan) is measured `repeats` times, the two modes alternating first and second,
    after a warm-up compile (imports and one-time caches do not land on the first row). Columns:
      build s      models.build + optimizer init, the first time that shape is built in this
                   process (the scanned stack's `nnx.vmap` init runs op by op, and each new
                   number of periods compiles its ops again; later builds hit the cache)
      lower s      tracing + lowering the jitted step to StableHLO (fastest of the repeats)
      compile s    XLA compile of the lowered step: fastest and median of the repeats, and the
                   process CPU seconds of the fastest (all compiler threads; less sensitive to
                   other load on a shared machine than wall time)
      HLO instrs   instructions of the optimized module, fused computations included, and its
                   while loops (with scan on: the period loop forward and backward, plus the
                   attention kernels' own loops, each compiled once however deep the model)
    """
    import re
    import statistics

    from configs.tiny import config
    base = dataclasses.replace(config().model, vocab_size=VOCAB)
    batch = make_batch(8, 256, 0)

    def measure(mc: ModelConfig) -> dict:
        t0 = time.perf_counter()
        model = models.build(mc, RuntimeConfig(), seed=0)
        tx, schedule = make_optimizer(OPTIMIZER, 1000)
        graphdef, state = init_state(model, tx, 0)
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        lowered = make_train_step(graphdef, tx, schedule, z_loss=mc.z_loss).lower(state, batch)
        t2 = time.perf_counter()
        c0 = time.process_time()
        compiled = lowered.compile()
        t3, c3 = time.perf_counter(), time.process_time()
        return {"build": t1 - t0, "lower": t2 - t1, "compile": t3 - t2, "cpu": c3 - c0, "compiled": compiled}

    def count(compiled) -> tuple[int, int]:
        text = compiled.as_text()
        return (len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", text, re.M)), len(re.findall(r"\bwhile\(", text)))

    measure(dataclasses.replace(base, num_layers=len(base.pattern), scan=False))  # warm-up
    with table(f"compile: build, lower and compile seconds of the tiny hybrid's train step, B8xT256, "
               f"min of {repeats} (modes alternating)", args.bursts, args.calls):
        body = []
        for depth in args.depths:
            runs: dict[bool, list[dict]] = {True: [], False: []}
            for r in range(repeats):
                for scan in ((True, False) if r % 2 == 0 else (False, True)):
                    runs[scan].append(measure(dataclasses.replace(base, num_layers=depth, scan=scan)))
            for scan in (True, False):
                rs = runs[scan]
                best = min(rs, key=lambda m: m["compile"])
                instrs, whiles = count(best["compiled"])
                body.append([str(depth), "on" if scan else "off", f"{rs[0]['build']:.2f}",
                             f"{min(m['lower'] for m in rs):.2f}", f"{best['compile']:.2f}",
                             f"{statistics.median(m['compile'] for m in rs):.2f}", f"{best['cpu']:.2f}",
                             str(instrs), str(whiles)])
                print("  " + " ".join(body[-1]), flush=True)
        print_rows(["layers", "scan", "build s", "lower s", "compile s", "compile s (median)",
                    "compile CPU s", "HLO instrs", "while loops"], body)


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
    args.summary = {}
    chosen = args.tables.split(",")
    for name in chosen:
        globals()[f"{name}_table"](args)
    if len([c for c in chosen if c != "compile"]) > 1:
        cols = list(dict.fromkeys(k for row in args.summary.values() for k in row))
        print("\n## summary per mixer (the tables above)")
        print_rows(["mixer"] + cols, [[m] + [row.get(c, "-") for c in cols] for m, row in args.summary.items()])


if __name__ == "__main__":
    main()
