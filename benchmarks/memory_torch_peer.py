"""titans-pytorch's NeuralMemory, forward + backward, for benchmarks/memory.py. No jax here.

    .venv-torch/bin/python benchmarks/memory_torch_peer.py --spec '{"dim": 64, "heads": 4,
        "dim_head": 16, "depth": 2, "expansion": 4, "chunk": 16, "batch": 2, "seq_len": 1024}'

Prints one JSON object: the median and best seconds of `runs` timed calls after `warmup` calls,
each `out, _ = mem(x); out.sum().backward()` on x [batch, seq_len, dim] (requires_grad), with the
module's gradients cleared in between, the parameter count and the package version.

`anchor`: "chunk" passes batch_size = chunk to NeuralMemory, so the memory weights are committed
every `chunk` tokens (the gradient anchor of Titans sec. 3.2 and of Chimera's op); "sequence"
leaves batch_size None, titans-pytorch's default, where every chunk's gradient is taken at the
initial weights (one parallel pass; chunk only sets the gate granularity).
The memory model is the package's default: MemoryMLP(depth, expansion) inside ResidualNorm
(x + LN(f(x))), per-head learned initial weights, momentum, per-chunk decay and momentum gates.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

DEFAULTS = dict(dim=64, heads=4, dim_head=16, depth=2, expansion=4, chunk=16, batch=2, seq_len=1024,
                anchor="chunk", runs=3, warmup=1, threads=None, seed=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="JSON object of the keys in DEFAULTS")
    cfg = dict(DEFAULTS)
    unknown = set(json.loads(ap.parse_args(argv).spec)) - set(DEFAULTS)
    if unknown:
        raise SystemExit(f"unknown keys {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
    cfg.update(json.loads(ap.parse_args(argv).spec))
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])

    import titans_pytorch
    from importlib.metadata import version
    from titans_pytorch import NeuralMemory

    mem = NeuralMemory(dim=cfg["dim"], chunk_size=cfg["chunk"], heads=cfg["heads"], dim_head=cfg["dim_head"],
                       batch_size=cfg["chunk"] if cfg["anchor"] == "chunk" else None,
                       default_model_kwargs=dict(depth=cfg["depth"], expansion_factor=float(cfg["expansion"])))
    x = torch.randn(cfg["batch"], cfg["seq_len"], cfg["dim"], requires_grad=True)

    def step():
        mem.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = mem(x)
        out.sum().backward()

    for _ in range(cfg["warmup"]):
        step()
    times = []
    for _ in range(cfg["runs"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(median_s=statistics.median(times), best_s=min(times),
                          params=sum(p.numel() for p in mem.parameters()),
                          version=version("titans-pytorch"), torch=torch.__version__,
                          threads=torch.get_num_threads(), module=titans_pytorch.__name__)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
