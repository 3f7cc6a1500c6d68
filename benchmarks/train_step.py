"""Training-step throughput of Chimera, side by side with the same LM in PyTorch eager.

    python benchmarks/train_step.py                       # default shapes, fp32 (~5 min on 2 cores)
    python benchmarks/train_step.py --quick               # tiny B8xT256 only, a few steps (~1 min)
    python benchmarks/train_step.py --dtypes float32,bfloat16 --json runs/bench.json
    python benchmarks/train_step.py --shapes tiny:8x256,attn256:1x2048 --steps 20

For every shape (model preset x batch x sequence length) and compute dtype this measures, for
Chimera's real train step (`train.step.make_train_step`, AdamW from `train.optim`, on one fixed
batch of random bytes):

* compile time: `lower(...).compile()` of the jitted step, in seconds;
* tokens/s: B*T / the median wall time of --steps timed steps after --warmup steps. Every step
  blocks until its result is ready: queueing several jitted steps and blocking once lets them
  run concurrently and fight over the 2 cores (perf_anchor.md, "timing pitfall");
* FLOPs/token from `models.flops_per_token` (fwd + bwd, attention counted over the keys a query
  actually sees), and MFU = tokens/s * FLOPs/token / peak, the peak being
  `train.metrics.peak_flops(dtype)` (a datasheet figure on GPU/TPU; on CPU the best square
  matmul, n=1024 and n=2048, measured before and after the shapes, the best of all used: on a
  shared 2-core machine one measurement can be low; all printed).

Then it runs `benchmarks/torch_peer.py` under `.venv-torch/bin/python` (made by
`bash scripts/setup_torch.sh`) for the same shape, dtype, optimizer, data and initial weights
(Chimera's are handed over in an .npz), one process after the other, never concurrently. The
peer's tokens/s gets the same FLOPs/token and the same peak, so the two MFU columns compare
directly. "loss d first/last" is |Chimera - torch| of the loss at the first step (same weights,
same batch: it checks that the two models are the same function) and at the last one (after
warmup + steps AdamW updates, where float32 rounding has drifted apart a little).

On a GPU/TPU (jax's default backend is not cpu) the default is instead the `gpt125m` preset with
its own runtime (remat) in bfloat16 at its B32xT1024, Chimera only (the peer is CPU torch).

Shapes are NAME:BxT with NAME one of MODELS below. --json PATH writes every row and the setup.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
from train.config import AttentionConfig, ModelConfig, OptimizerConfig, RuntimeConfig  # noqa: E402
from train.metrics import measure_matmul_peak, peak_flops  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.step import init_state, make_train_step  # noqa: E402

VOCAB = 256  # byte tokenizer
# The peer's optimizer, used for Chimera too so that the loss trajectories are comparable.
OPTIMIZER = OptimizerConfig(lr=3e-4, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8,
                            weight_decay=0.1, grad_clip=1.0)


def _tiny():
    from configs.tiny import config
    cfg = config()
    return dataclasses.replace(cfg.model, vocab_size=VOCAB), RuntimeConfig(), OPTIMIZER


def _attn256():
    """perf_anchor.md's model: d256, 4 layers, full causal MHA 4 x 64 (SwiGLU 704 here, not 683)."""
    mc = ModelConfig(vocab_size=VOCAB, d_model=256, num_layers=4, pattern=("attn",),
                     mixers={"attn": AttentionConfig(num_heads=4)})
    return mc, RuntimeConfig(), OPTIMIZER


def _d512():
    """tiny's 3:1 sliding-window(64) / full GQA hybrid, scaled to d512, 8 layers, 8 q / 4 kv heads."""
    mc = ModelConfig(vocab_size=VOCAB, d_model=512, num_layers=8, pattern=("swa", "swa", "swa", "attn"),
                     mixers={"attn": AttentionConfig(num_heads=8, num_kv_heads=4),
                             "swa": AttentionConfig(num_heads=8, num_kv_heads=4, window=64)})
    return mc, RuntimeConfig(), OPTIMIZER


def _gpt125m():
    from configs.gpt125m import config
    cfg = config()
    return dataclasses.replace(cfg.model, vocab_size=VOCAB), cfg.runtime, cfg.optimizer


MODELS = {"tiny": _tiny, "attn256": _attn256, "d512": _d512, "gpt125m": _gpt125m}
CPU_SHAPES = "tiny:8x256,tiny:2x1024,tiny:1x2048,attn256:8x256,attn256:1x2048,d512:8x256"
ACCEL_SHAPES = "gpt125m:32x1024"
QUICK_SHAPES = "tiny:8x256"


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        try:
            name, bt = item.split(":")
            b, t = (int(x) for x in bt.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not NAME:BxT (e.g. tiny:8x256)") from None
        if name not in MODELS:
            raise SystemExit(f"--shapes: unknown model {name!r}; known: {sorted(MODELS)}")
        out.append((name, b, t))
    return out


def make_batch(b: int, t: int, seed: int) -> dict:
    """One fixed batch of random bytes; torch_peer.py draws exactly the same one."""
    data = np.random.default_rng(seed).integers(0, VOCAB, (b, t + 1))
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    return {"inputs": jnp.asarray(data[:, :-1], jnp.int32), "targets": jnp.asarray(data[:, 1:], jnp.int32),
            "loss_mask": jnp.ones((b, t), jnp.float32), "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.asarray(pos)}


def model_blocks(model) -> list:
    """The model's Blocks in layer order, each with its own weights (scanned periods sliced)."""
    stack, blocks = model.stack, []
    if stack.scanned is not None:
        period_def, stacked = nnx.split(stack.scanned)
        for i in range(stack.num_scanned):
            blocks += list(nnx.merge(period_def, jax.tree.map(lambda a, i=i: a[i], stacked)).blocks)
    for period in stack.loop:
        blocks += list(period.blocks)
    return blocks


def export_npz(model, path: str) -> None:
    """Initial weights for torch_peer.py --init-npz (kernels as Chimera stores them, [d_in, d_out])."""
    arrays = {"embed": model.embed.embedding[...], "final_norm": model.final_norm.scale[...]}
    for i, blk in enumerate(model_blocks(model)):
        p = f"layers.{i}."
        arrays[p + "mixer_norm"] = blk.mixer_norm.scale[...]
        arrays[p + "mlp_norm"] = blk.mlp_norm.scale[...]
        for name, dense in (("q", blk.mixer.q_proj), ("k", blk.mixer.k_proj), ("v", blk.mixer.v_proj),
                            ("o", blk.mixer.o_proj), ("gate", blk.mlp.gate), ("up", blk.mlp.up),
                            ("down", blk.mlp.down)):
            arrays[p + name] = dense.kernel[...]
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})


def torch_spec(mc: ModelConfig) -> tuple[dict | None, str]:
    """torch_peer.py's model arguments for `mc`, or (None, why) when the peer cannot express it."""
    mixers = [mc.mixer(n) for n in mc.layer_names()]
    if not all(type(m) is AttentionConfig for m in mixers):
        return None, "the peer has softmax attention only"
    if any(m.qk_norm or m.logit_softcap for m in mixers) or not mc.tie_embeddings or mc.z_loss:
        return None, "the peer has no qk_norm / softcap / untied head / z-loss"
    heads = {(m.num_heads, m.kv_heads, m.dim_per_head(mc.d_model), m.rope_theta) for m in mixers}
    if len(heads) > 1:
        return None, "the peer needs the same heads in every layer"
    (h, kvh, hd, theta), = heads
    return dict(vocab=mc.vocab_size, d_model=mc.d_model, layers=mc.num_layers, heads=h, kv_heads=kvh,
                head_dim=hd, hidden=mc.hidden, windows=",".join(str(m.window or 0) for m in mixers),
                norm_eps=mc.norm_eps, rope_theta=theta, init_std=mc.init_std), ""


def measure_peak(dtype: str, on_cpu: bool) -> tuple[float, str]:
    """`train.metrics.peak_flops`; on CPU also an n=2048 matmul, keeping the better figure.

    A measured CPU peak is only as good as the quietest of its repetitions: on a shared 2-core
    machine one measurement can come out far too low, and MFU then reads above 100%.
    """
    peak, source = peak_flops(jnp.dtype(dtype))
    if on_cpu:
        big = measure_matmul_peak(jnp.dtype(dtype), n=2048, reps=5)
        if big > peak:
            peak, source = big, source.replace("matmul", "n=2048 matmul")
    return peak, source


def bench_chimera(mc: ModelConfig, runtime: RuntimeConfig, opt: OptimizerConfig, b: int, t: int,
                  steps: int, warmup: int, seed: int, npz: str | None) -> dict:
    model = models.build(mc, runtime, seed=seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if npz:
        export_npz(model, npz)
    tx, schedule = make_optimizer(opt, steps + warmup)
    graphdef, state = init_state(model, tx, seed)
    del model
    step = make_train_step(graphdef, tx, schedule, z_loss=mc.z_loss)
    batch = make_batch(b, t, seed)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    timed = times[warmup:]
    return {"params": n_params, "compile_s": compile_s, "first_step_s": times[0],
            "step_s_median": statistics.median(timed), "tokens_per_s": b * t / statistics.median(timed),
            "tokens_per_s_best": b * t / min(timed), "step_s": timed, "losses": losses}


def bench_torch(python: Path, spec: dict, timeout: float, omp_passive: bool) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if omp_passive else None
    try:
        proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "torch_peer.py"), "--spec", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"torch_peer.py took longer than {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"torch_peer.py exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = ["shape", "dtype", "load", "params", "MFLOP/tok", "compile s", "Chimera tok/s", "MFU",
            "torch tok/s", "torch MFU", "Chimera/torch", "loss d first/last"]
    body = []
    for r in rows:
        body.append([r["shape"], r["dtype"], f"{r['load_1min']:.1f}", f"{r['params'] / 1e6:.2f}M", f"{r['flops_per_token'] / 1e6:.1f}",
                     f"{r['compile_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['mfu']:.0%}",
                     _fmt(r.get("torch_tokens_per_s"), ".0f"), _fmt(r.get("torch_mfu"), ".0%"),
                     _fmt(r.get("ratio"), ".2f"),
                     "-" if r.get("loss0_diff") is None else f"{r['loss0_diff']:.0e} / {r['loss_last_diff']:.0e}"])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i > 1 else c.ljust(w)
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in body:
        print(line(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SHAPES}, 1 warm-up + 3 steps")
    ap.add_argument("--shapes", help=f"NAME:BxT,... (default on CPU: {CPU_SHAPES}; on GPU/TPU: {ACCEL_SHAPES})")
    ap.add_argument("--dtypes", help="compute dtypes (default: float32 on CPU, bfloat16 on GPU/TPU)")
    ap.add_argument("--steps", type=int, help="timed steps per measurement (default 8; --quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps after compilation (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--torch-python", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    ap.add_argument("--torch-omp-passive", action="store_true",
                    help="run the peer with OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads spin while "
                         "waiting, which collapses its throughput (up to 5x) when other processes share "
                         "the cores; XLA's thread pool degrades far less. Default: torch's defaults")
    ap.add_argument("--json", help="write the rows and the setup to this path")
    args = ap.parse_args()

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else CPU_SHAPES if on_cpu else ACCEL_SHAPES))
    dtypes = (args.dtypes or ("float32" if on_cpu else "bfloat16")).split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise SystemExit(f"--dtypes: {d!r} is not float32 or bfloat16")
    steps = args.steps or (3 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else 1

    torch_py = Path(args.torch_python)
    torch_note = ""
    if args.no_torch:
        torch_note = "torch peer skipped (--no-torch)"
    elif not on_cpu:
        torch_note = f"torch peer skipped: it is CPU torch and jax runs on {backend}"
    elif not torch_py.exists():
        torch_note = (f"torch peer skipped: {torch_py} is missing; run `bash scripts/setup_torch.sh` "
                      "to create .venv-torch")
    run_torch = not torch_note

    load0 = os.getloadavg()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {backend} ({dev.device_kind}), {len(jax.devices())} device(s); "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(f"{len(shapes)} shape(s) x {dtypes}, {warmup} warm-up + {steps} timed steps each, "
          f"blocking on every step")
    peaks = {}
    for d in dtypes:
        peaks[d] = measure_peak(d, on_cpu)
        print(f"MFU peak {d}: {peaks[d][0] / 1e9:.0f} GFLOP/s ({peaks[d][1]})")
    if torch_note:
        print(torch_note)

    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, b, t in shapes:
            mc, runtime, opt = MODELS[name]()
            flops = sum(models.flops_per_token(mc, t).values())
            spec, why = torch_spec(mc)
            for d in dtypes:
                shape = f"{name} B{b}xT{t}"
                load = os.getloadavg()[0]
                print(f"-- {shape} {d} (load {load:.1f}): chimera ...", end="", flush=True)
                npz = os.path.join(tmp, "init.npz") if run_torch and spec else None
                rt = dataclasses.replace(runtime, compute_dtype=d)
                res = bench_chimera(mc, rt, opt, b, t, steps, warmup, args.seed, npz)
                peak = peaks[d][0]
                row = {"shape": shape, "model": name, "batch": b, "seq_len": t, "dtype": d, "load_1min": load,
                       "params": res["params"], "flops_per_token": flops, **res,
                       "mfu": res["tokens_per_s"] * flops / peak, "peak_flops": peak}
                print(f" {res['tokens_per_s']:.0f} tok/s (compile {res['compile_s']:.1f} s)", end="", flush=True)
                if run_torch and spec:
                    print("; torch ...", end="", flush=True)
                    peer = bench_torch(torch_py, dict(spec, batch=b, seq_len=t, steps=steps, warmup=warmup,
                                                      seed=args.seed, dtype=d, init_npz=npz,
                                                      lr=opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                                      weight_decay=opt.weight_decay,
                                                      grad_clip=opt.grad_clip or 0.0),
                                       timeout=900, omp_passive=args.torch_omp_passive)
                    row["torch"] = peer
                    if "skipped" in peer:
                        print(" skipped", end="")
                    elif "error" in peer:
                        print(f" failed: {peer['error']}", end="")
                    else:
                        tps = peer["tokens_per_s"]
                        row.update(torch_tokens_per_s=tps, torch_mfu=tps * flops / peak,
                                   ratio=res["tokens_per_s"] / tps,
                                   loss0_diff=abs(res["losses"][0] - peer["losses"][0]),
                                   loss_last_diff=abs(res["losses"][-1] - peer["losses"][-1]))
                        if peer["params"] != res["params"]:
                            row["warning"] = f"param counts differ: chimera {res['params']}, torch {peer['params']}"
                        print(f" {tps:.0f} tok/s", end="")
                elif run_torch:
                    row["torch"] = {"error": f"not run: {why}"}
                print()
                rows.append(row)
    load1 = os.getloadavg()
    wall = time.perf_counter() - t_start
    if on_cpu:  # measure again; a measurement disturbed by other processes is low, keep the best
        for d in dtypes:
            again = measure_peak(d, on_cpu)
            print(f"MFU peak {d} measured again: {again[0] / 1e9:.0f} GFLOP/s")
            if again[0] > peaks[d][0]:
                peaks[d] = (again[0], again[1] + ", best of start and end")
        for r in rows:
            peak = peaks[r["dtype"]][0]
            r["peak_flops"] = peak
            r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
            if "torch_tokens_per_s" in r:
                r["torch_mfu"] = r["torch_tokens_per_s"] * r["flops_per_token"] / peak

    print()
    print_table(rows)
    print()
    print(f"tok/s: median of {steps} steps after {warmup} warm-up. MFU against "
          + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, (p, _) in peaks.items())
          + " (the same peak for both columns); FLOPs/token counts causal attention over visible keys only.")
    print("compile s: lower + compile of the jitted train step (torch eager has none). load: 1-min load "
          f"average before the row ({os.cpu_count()} CPUs; this benchmark itself adds up to about 2).")
    masking = next((r["torch"]["masking"] for r in rows if "masking" in r.get("torch", {})), None)
    if run_torch:
        print(f"torch: {'OMP_WAIT_POLICY=PASSIVE' if args.torch_omp_passive else 'default OpenMP settings'}; "
              "F.scaled_dot_product_attention; full layers is_causal=True, sliding-window layers an "
              "explicit boolean band mask (SDPA has no window argument, so it does not skip the masked blocks).")
        for r in rows:
            peer = r.get("torch", {})
            for note in (r.get("warning"), peer.get("error"), peer.get("skipped")):
                if note:
                    print(f"  {r['shape']} {r['dtype']}: {note}")
    elif torch_note:
        print(torch_note)
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} (1 min); wall {wall:.0f} s")

    if args.json:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "jax": jax.__version__, "backend": backend, "device": dev.device_kind,
                "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                "dtypes": dtypes, "steps": steps, "warmup": warmup, "seed": args.seed,
                "peaks": {d: {"flops": p, "source": s} for d, (p, s) in peaks.items()},
                "load_average_before": load0, "load_average_after": load1, "wall_s": wall,
                "torch_note": torch_note or None, "torch_masking_example": masking,
                "torch_omp_wait_policy": "PASSIVE" if args.torch_omp_passive else "default"}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"setup": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
