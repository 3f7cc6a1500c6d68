"""Training-step throughput of Chimera, interleaved with the same LM in PyTorch eager.

    python benchmarks/train_step.py                       # default shapes, fp32 (~5 min on 2 cores)
    python benchmarks/train_step.py --quick               # tiny B8xT256 only, 2 bursts (~1 min)
    python benchmarks/train_step.py --dtypes float32,bfloat16 --json runs/bench.json
    python benchmarks/train_step.py --shapes tiny:8x256,attn256:1x2048 --bursts 9

For every shape (model preset x batch x sequence length) and compute dtype this measures
Chimera's real train step (`train.step.make_train_step`, AdamW from `train.optim`, one fixed
batch of random bytes) and `benchmarks/torch_peer.py` (the same model, optimizer, data and
initial weights, under `.venv-torch/bin/python`, made by `bash scripts/setup_torch.sh`)
INTERLEAVED: the peer is a server process (`torch_peer.py --serve`) and the two sides take turns,
--burst-steps steps of Chimera, then as many of torch, --bursts times, each step blocking until
its result is ready. A burst keeps its fastest step (the least disturbed); tokens/s is B*T over
the median of those, and Chimera/torch is the median over bursts of the per-burst ratio. On a
shared machine the load changes from second to second: measured one after the other, the two
sides would each get a different machine; interleaved, they get nearly the same one.

* compile s: `lower(...).compile()` of the jitted step;
* FLOPs/token from `models.flops_per_token` (fwd + bwd, attention counted over the keys a query
  actually sees: causal halving, at most W keys in a window-W layer), the same for both sides;
* MFU = tokens/s * FLOPs/token / the hardware's peak (`train.metrics.peak_flops`, the training
  loop's definition: a datasheet figure on GPU/TPU; on CPU cores x clock x FMA width from
  train/hardware.py, printed with its derivation); beside it, the fraction of XLA's own fp32
  matmul speed (best n=2048 matmul measured before and after the shapes), which is what a
  model made only of large matmuls could reach through XLA on this machine;
* loss d first/last: |Chimera - torch| of the loss at the first step (same weights, same batch:
  it checks that both sides compute the same function) and at the last one (after every step
  of both sides, where float32 rounding has drifted apart a little).

The peer runs with OMP_WAIT_POLICY=PASSIVE (--torch-omp-active for torch's default): otherwise
its OpenMP threads spin while Chimera's burst runs and take Chimera's cores.

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

from timing import cpu_model  # noqa: E402  (benchmarks/timing.py; first: it sets the host allocator)
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


def xla_matmul(dtype: str) -> float:
    """XLA's best n=2048 square matmul FLOP/s in `dtype` (a disturbed measurement is low)."""
    return max(measure_matmul_peak(jnp.dtype(dtype), n=2048, reps=5),
               measure_matmul_peak(jnp.dtype(dtype), n=1024, reps=5))


class Peer:
    """torch_peer.py --serve in a subprocess: `run(n)` -> (step seconds, losses) of n steps."""

    def __init__(self, python: Path, spec: dict, omp_passive: bool):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if omp_passive else None
        self.proc = subprocess.Popen([str(python), str(ROOT / "benchmarks" / "torch_peer.py"), "--serve",
                                      "--spec", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read().strip().splitlines()[-5:]
                raise RuntimeError(f"torch_peer.py exited {self.proc.wait()}: " + " | ".join(err))
            if line.startswith("{"):
                return json.loads(line)

    def run(self, n: int) -> tuple[list[float], list[float]]:
        self.proc.stdin.write(json.dumps({"steps": n}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["step_s"], out["losses"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def chimera_step(mc: ModelConfig, runtime: RuntimeConfig, opt: OptimizerConfig, b: int, t: int,
                 total_steps: int, seed: int, npz: str | None):
    """(run(n) -> (step seconds, losses), params, compile seconds) for Chimera's train step."""
    model = models.build(mc, runtime, seed=seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if npz:
        export_npz(model, npz)
    tx, schedule = make_optimizer(opt, total_steps)
    graphdef, state = init_state(model, tx, seed)
    del model
    step = make_train_step(graphdef, tx, schedule, z_loss=mc.z_loss)
    batch = make_batch(b, t, seed)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run(n: int) -> tuple[list[float], list[float]]:
        times, losses = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
        return times, losses
    return run, n_params, compile_s


def bench_shape(mc, runtime, opt, b, t, args, npz, peer_spec, torch_py) -> dict:
    """Warm-up, then --bursts bursts of --burst-steps steps, Chimera and (if peer_spec) torch in turn."""
    k, bursts = args.burst_steps, args.bursts
    total = args.warmup + bursts * k
    run_c, n_params, compile_s = chimera_step(mc, runtime, opt, b, t, total, args.seed, npz)
    res = {"params": n_params, "compile_s": compile_s}
    peer = None
    if peer_spec is not None:
        try:
            peer = Peer(torch_py, peer_spec, omp_passive=not args.torch_omp_active)
        except RuntimeError as err:
            res["torch"] = {"error": str(err)}
        else:
            res["torch"] = peer.info
            if "skipped" in peer.info:
                peer.close()
                peer = None
    try:
        c_times, c_losses = run_c(args.warmup)
        res["first_step_s"] = c_times[0] if c_times else None
        p_losses, c_best, p_best = [], [], []
        if peer:
            p_losses += peer.run(args.warmup)[1]
        for _ in range(bursts):
            times, losses = run_c(k)
            c_best.append(min(times))
            c_losses += losses
            if peer:
                times, losses = peer.run(k)
                p_best.append(min(times))
                p_losses += losses
    except RuntimeError as err:  # the peer died mid-run: report it, keep Chimera's figures
        res["torch"] = {"error": str(err)}
        p_best = []
    finally:
        if peer:
            peer.close()
    tokens = b * t
    res.update(step_s=c_best, losses=c_losses, tokens_per_s=tokens / statistics.median(c_best))
    if p_best:
        res.update(torch_step_s=p_best, torch_losses=p_losses,
                   torch_tokens_per_s=tokens / statistics.median(p_best),
                   ratio=statistics.median(p / c for p, c in zip(p_best, c_best)),
                   loss0_diff=abs(c_losses[0] - p_losses[0]), loss_last_diff=abs(c_losses[-1] - p_losses[-1]))
        if res["torch"]["params"] != n_params:
            res["warning"] = f"param counts differ: chimera {n_params}, torch {res['torch']['params']}"
    return res


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = ["shape", "dtype", "load", "params", "MFLOP/tok", "compile s", "Chimera tok/s", "MFU (hw)",
            "of XLA mm", "torch tok/s", "torch MFU", "Chimera/torch", "loss d first/last"]
    body = []
    for r in rows:
        body.append([r["shape"], r["dtype"], f"{r['load_1min']:.1f}", f"{r['params'] / 1e6:.2f}M",
                     f"{r['flops_per_token'] / 1e6:.1f}", f"{r['compile_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['mfu']:.0%}", _fmt(r.get("of_xla_matmul"), ".0%"),
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
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_SHAPES}, 2 bursts")
    ap.add_argument("--shapes", help=f"NAME:BxT,... (default on CPU: {CPU_SHAPES}; on GPU/TPU: {ACCEL_SHAPES})")
    ap.add_argument("--dtypes", help="compute dtypes (default: float32 on CPU, bfloat16 on GPU/TPU)")
    ap.add_argument("--bursts", type=int, help="bursts per side (default 5; --quick 2)")
    ap.add_argument("--burst-steps", type=int, default=2, help="steps per burst (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--torch-python", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    ap.add_argument("--torch-omp-active", action="store_true",
                    help="run the peer with torch's default OpenMP wait policy (its idle threads spin "
                         "and take the cores from Chimera's bursts). Default: OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--json", help="write the rows and the setup to this path")
    args = ap.parse_args()

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else CPU_SHAPES if on_cpu else ACCEL_SHAPES))
    dtypes = (args.dtypes or ("float32" if on_cpu else "bfloat16")).split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise SystemExit(f"--dtypes: {d!r} is not float32 or bfloat16")
    args.bursts = args.bursts or (2 if args.quick else 5)

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
          f"{cpu_model()}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(f"{len(shapes)} shape(s) x {dtypes}, {args.warmup} warm-up step(s), then {args.bursts} bursts of "
          f"{args.burst_steps} steps per side, interleaved, blocking on every step")
    peaks = {d: peak_flops(jnp.dtype(d)) for d in dtypes}
    xla_mm = {d: xla_matmul(d) for d in dtypes} if on_cpu else {}
    for d in dtypes:
        print(f"MFU peak {d}: {peaks[d][1]}")
        if d in xla_mm:
            print(f"XLA {d} matmul (n=1024/2048, best of 5): {xla_mm[d] / 1e9:.0f} GFLOP/s "
                  f"= {xla_mm[d] / peaks[d][0]:.0%} of the hardware peak")
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
                print(f"-- {shape} {d} (load {load:.1f}) ...", end="", flush=True)
                npz = os.path.join(tmp, "init.npz") if run_torch and spec else None
                peer_spec = None
                if npz:
                    peer_spec = dict(spec, batch=b, seq_len=t, seed=args.seed, dtype=d, init_npz=npz,
                                     lr=opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                     weight_decay=opt.weight_decay, grad_clip=opt.grad_clip or 0.0)
                rt = dataclasses.replace(runtime, compute_dtype=d)
                res = bench_shape(mc, rt, opt, b, t, args, npz, peer_spec, torch_py)
                if run_torch and not spec:
                    res["torch"] = {"error": f"not run: {why}"}
                peak = peaks[d][0]
                row = {"shape": shape, "model": name, "batch": b, "seq_len": t, "dtype": d, "load_1min": load,
                       "flops_per_token": flops, **res, "mfu": res["tokens_per_s"] * flops / peak,
                       "peak_flops": peak}
                if "torch_tokens_per_s" in row:
                    row["torch_mfu"] = row["torch_tokens_per_s"] * flops / peak
                print(f" chimera {res['tokens_per_s']:.0f} tok/s (compile {res['compile_s']:.1f} s)"
                      + (f", torch {row['torch_tokens_per_s']:.0f} tok/s" if "torch_tokens_per_s" in row else ""),
                      flush=True)
                rows.append(row)
    load1 = os.getloadavg()
    wall = time.perf_counter() - t_start
    for d in list(xla_mm):  # again: a measurement disturbed by other processes is low, keep the best
        xla_mm[d] = max(xla_mm[d], xla_matmul(d))
    for r in rows:
        if r["dtype"] in xla_mm:
            r["of_xla_matmul"] = r["tokens_per_s"] * r["flops_per_token"] / xla_mm[r["dtype"]]

    print()
    print_table(rows)
    print()
    print(f"tok/s: B*T over the median of the bursts' fastest steps; Chimera/torch: median of the "
          f"per-burst ratios. MFU (hw): against the hardware peak ("
          + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, (p, _) in peaks.items()) + "), both columns. "
          "of XLA mm: against XLA's best square matmul ("
          + ", ".join(f"{d} {x / 1e9:.0f} GFLOP/s" for d, x in xla_mm.items()) + ", before and after). "
          "FLOPs/token count causal attention over visible keys only.")
    print("compile s: lower + compile of the jitted train step (torch eager has none). load: 1-min load "
          f"average before the row ({os.cpu_count()} CPUs; this benchmark itself adds up to about 2).")
    masking = next((r["torch"]["masking"] for r in rows if "masking" in r.get("torch", {})), None)
    if run_torch:
        print(f"torch: {'default OpenMP settings' if args.torch_omp_active else 'OMP_WAIT_POLICY=PASSIVE'}; "
              "F.scaled_dot_product_attention; full layers is_causal=True, sliding-window layers chunked "
              "local attention (blocks of max(W, 64): skips the key blocks outside the window).")
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
                "jax": jax.__version__, "backend": backend, "device": dev.device_kind, "cpu": cpu_model(),
                "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                "dtypes": dtypes, "bursts": args.bursts, "burst_steps": args.burst_steps,
                "warmup": args.warmup, "seed": args.seed,
                "peaks": {d: {"flops": p, "source": s} for d, (p, s) in peaks.items()},
                "xla_matmul_flops": xla_mm,
                "load_average_before": load0, "load_average_after": load1, "wall_s": wall,
                "torch_note": torch_note or None, "torch_masking_example": masking,
                "torch_omp_wait_policy": "default" if args.torch_omp_active else "PASSIVE"}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"setup": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
