"""Each linear-attention mixer in a 3:1 hybrid with softmax attention trains through the real
loop (`train.loop.run`) on CPU: the loss is finite and goes down.

Tiny on purpose (d_model 32, one scanned period of 4 layers, 32-token rows, a few steps at a
high learning rate): what is checked is that every mixer's forward and backward compile inside
the scanned stack and the optimizer moves the loss, not how well it learns. The op runs with
the default implementation, as a user's run would.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from train.cli import load_config
from train.config import apply_overrides
from train.loop import run

STEPS = 8
SMALL = {  # per-mixer widths that fit d_model = 32
    "linear": ["model.mixers.linear.num_heads=2"],
    "retention": ["model.mixers.retention.num_heads=2"],
    "lightning": ["model.mixers.lightning.num_heads=2"],
    "ssd": ["model.mixers.ssd.head_dim=16", "model.mixers.ssd.state_dim=16"],
    "gla": ["model.mixers.gla.num_heads=2", "model.mixers.gla.conv_size=4"],
    "hgrn2": ["model.mixers.hgrn2.num_heads=2"],
    "mlstm": ["model.mixers.mlstm.num_heads=2"],
    "deltanet": ["model.mixers.deltanet.num_heads=2"],
    "gdn": ["model.mixers.gdn.num_heads=2"],
}
# One in the default run: Gated DeltaNet (conv, delta rule, gates), whose gdn_hybrid preset's test
# is in the slow tier; the rest in the slow tier: each run costs ~10-20 s of compiles.
DEFAULT_RUN = ("gdn",)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])]


@pytest.mark.parametrize("kind", [k if k in DEFAULT_RUN else pytest.param(k, marks=pytest.mark.slow) for k in SMALL])
def test_three_to_one_hybrid_trains(kind, tmp_path):
    cfg = apply_overrides(load_config("tiny"), [
        f"model.pattern={kind},{kind},{kind},attn", "model.num_layers=4", "model.d_model=32",
        "model.mixers.attn.num_heads=2", "model.mixers.attn.num_kv_heads=1", *SMALL[kind],
        "data.seq_len=32", "data.batch_size=4", f"train.steps={STEPS}", "optimizer.warmup_steps=0",
        "optimizer.lr=1e-2", "optimizer.schedule=constant", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=1", f"train.checkpoint_every={STEPS}", "runtime.mesh_data=1",
        "runtime.linear_attention_chunk=16"])
    summary = run(cfg, tmp_path)
    losses = _losses(tmp_path)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
    assert np.isfinite(summary["eval"]["loss"])
    log = (tmp_path / "train.log").read_text()
    op = "delta rule" if kind in ("deltanet", "gdn") else "chunked linear attention"
    assert f"{op} impl=auto" in log  # describe() reached the start-up log
