"""The shards loader (data.source=shards): tokens/s with 0, 1 and 2 grain workers against what
the tiny and gpt125m train steps consume, and its memory as the corpus grows.

    .venv/bin/python benchmarks/data_loader.py                       # 10 MB, 100 MB, 1 GB corpora
    .venv/bin/python benchmarks/data_loader.py --sizes-mb 10,100 --no-train   # quicker

Corpora are synthetic but realistic: copies of the stdlib corpus (each copy's documents renamed,
so every copy is new text to the split and the hash), written as JSONL files and prepared once
with `python -m train.prepare_data` (byte tokenizer) under --workdir, which is kept for reruns.
Each measurement runs in a fresh process: the loader reads --batches batches after 5 warm-up
batches; memory is that process's peak RSS (VmHWM) and, with workers, the largest worker's.
Loader configurations are interleaved, round by round, and the table gives the median round.
Train-step consumption is the tokens/s the training CLI logs for a short run of each preset on
this machine (gpt125m with data.batch_size=2: its per-token cost does not depend on the batch);
an H100's is computed from its bf16 peak at 40% MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"tiny": (256, 8), "gpt125m": (1024, 32)}  # (seq_len, batch_size) of the presets


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_read(directory: str, workers: int, seq_len: int, batch_size: int, batches: int) -> dict:
    """In a fresh process: read batches from the shards, report tokens/s and peak memory."""
    from train.config import DataConfig
    from train.data import make_train_iterator
    cfg = DataConfig(source="shards", paths=(directory,), seq_len=seq_len, batch_size=batch_size, workers=workers)
    it = make_train_iterator(cfg, seed=0)
    for _ in range(5):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    it.close()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tokens_per_s": batches * seq_len * batch_size / dt, "rss_mb": _peak_rss_mb(), "worker_rss_mb": kids}


def make_corpus(workdir: Path, size_mb: int) -> Path:
    """JSONL copies of the stdlib corpus up to size_mb, prepared into shards; both kept."""
    out = workdir / f"shards-{size_mb}mb"
    if (out / "metadata.json").is_file():
        return out
    from train.data.stdlib_source import stdlib_texts
    texts = stdlib_texts()
    src = workdir / f"text-{size_mb}mb"
    src.mkdir(parents=True, exist_ok=True)
    written, copy = 0, 0
    while written < size_mb * 2**20:
        with open(src / f"part-{copy:04d}.jsonl", "w") as f:
            for key, text in texts:
                line = json.dumps({"text": f"# copy {copy} of {key}\n{text}"}) + "\n"
                f.write(line)
                written += len(line)
                if written >= size_mb * 2**20:
                    break
        copy += 1
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "train.prepare_data", "--source", "files", "--paths", str(src),
                    "--out", str(out), "--workers", "2"], cwd=ROOT, check=True)
    print(f"prepared {size_mb} MB of text in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def run_child(directory: Path, workers: int, shape: str, batches: int) -> dict:
    seq_len, batch_size = SHAPES[shape]
    out = subprocess.run([sys.executable, __file__, "--child", str(directory), str(workers), str(seq_len),
                          str(batch_size), str(batches)], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_tokens_per_s(preset: str, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "train", "--config", preset, "--run-dir", tmp, "train.eval_every=0",
                        "train.eval_batches=1", "train.checkpoint_every=100000", *extra],
                       cwd=ROOT, check=True, capture_output=True)
        recs = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in recs if r["kind"] == "train" and "tokens_per_s" in r)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        d, w, t, b, n = sys.argv[2:7]
        print(json.dumps(child_read(d, int(w), int(t), int(b), int(n))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="10,100,1000")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "chimera-loader-bench"))
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-train", action="store_true", help="skip measuring the train steps")
    args = p.parse_args()
    from train.hardware import cpu_info
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    workdir = Path(args.workdir)
    dirs = {s: make_corpus(workdir, s) for s in sizes}
    load0 = os.getloadavg()

    speed_dir = dirs[sizes[min(1, len(sizes) - 1)]]
    rows: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):  # interleaved: every configuration once per round
        for shape in SHAPES:
            for w in (0, 1, 2):
                rows.setdefault((shape, w), []).append(run_child(speed_dir, w, shape, args.batches))
    mem = {s: run_child(d, 0, "gpt125m", args.batches) for s, d in dirs.items()}
    mem2 = {s: run_child(d, 2, "gpt125m", args.batches) for s, d in dirs.items()}
    consume = {}
    if not args.no_train:
        consume["tiny"] = train_tokens_per_s("tiny", ["train.steps=40"])
        consume["gpt125m"] = train_tokens_per_s("gpt125m", ["train.steps=4", "train.log_every=1", "data.batch_size=2",
                                                            "optimizer.warmup_steps=1"])
    # H100: 989 TFLOP/s dense bf16 at 40% MFU over 6 N + attention FLOPs per token (N = 125.1M)
    h100 = {"gpt125m": 989e12 * 0.4 / (6 * 125.1e6 + 12 * 12 * 1024 * 64 * 3)}

    info = cpu_info()
    print(f"\nCPU: {info.describe() if info else os.cpu_count()}; load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"\nLoader tokens/s (median of {args.rounds} interleaved rounds, {args.batches} batches each, "
          f"shards of {speed_dir.name}):\n")
    print("| shape (seq x batch) | 0 workers | 1 worker | 2 workers | train step consumes | 0 workers / step |")
    print("|---|---|---|---|---|---|")
    for shape, (t, b) in SHAPES.items():
        speeds = [statistics.median(r["tokens_per_s"] for r in rows[(shape, w)]) for w in (0, 1, 2)]
        use = consume.get(shape)
        use_s = f"{use:,.0f} (this CPU)" if use else "-"
        ratio = f"{speeds[0] / use:,.0f}x" if use else "-"
        if shape in h100:
            use_s += f"; H100 at 40% MFU: {h100[shape]:,.0f}"
            ratio += f"; {speeds[0] / h100[shape]:.2f}x"
        print(f"| {shape} ({t} x {b}) | " + " | ".join(f"{x:,.0f}" for x in speeds) + f" | {use_s} | {ratio} |")
    print("\nLoader memory as the corpus grows (gpt125m shape, peak RSS of the reading process):\n")
    print("| corpus text | shards | tokens | 0 workers: RSS MB | 2 workers: RSS MB (main / largest worker) |")
    print("|---|---|---|---|---|")
    for s, d in dirs.items():
        meta = json.loads((d / "metadata.json").read_text())
        nbytes = sum(f.stat().st_size for f in d.glob("*.array_record"))
        tokens = sum(v["tokens"] for v in meta["splits"].values())
        print(f"| {s:,} MB | {nbytes / 2**20:,.0f} MB | {tokens:,} | {mem[s]['rss_mb']:.0f} | "
              f"{mem2[s]['rss_mb']:.0f} / {mem2[s]['worker_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
