"""Test-wide set-up. Runs before jax is imported anywhere in the test session."""
import os

# 8 simulated CPU devices for sharding tests (DESIGN.md, Testing); must precede `import jax`.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain reads absl flags; outside absl.app.run they count as unparsed and raise.
flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture
def trains_briefly(tmp_path):
    """A check that a tiny byte-level model learns: `trains_briefly(overrides, steps)` trains the
    `tiny` preset with `overrides` (key=value strings, on top of a d_model-32, seq-32, batch-4,
    constant lr 1e-2 run) in tmp_path, asserts finite losses whose last two average at least
    0.3 below the first two and a finite eval loss, and returns the run's train.log text (for
    checking which implementation each layer logged)."""
    import json

    import numpy as np

    from train.cli import load_config
    from train.config import apply_overrides
    from train.loop import run

    def check(overrides: list[str], steps: int) -> str:
        cfg = apply_overrides(load_config("tiny"), [
            "model.d_model=32", "data.seq_len=32", "data.batch_size=4", f"train.steps={steps}",
            "optimizer.warmup_steps=0", "optimizer.lr=1e-2", "optimizer.schedule=constant",
            "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
            f"train.checkpoint_every={steps}", "runtime.mesh_data=1", *overrides])
        summary = run(cfg, tmp_path)
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])]
        assert len(losses) == steps and np.isfinite(losses).all()
        assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
        assert np.isfinite(summary["eval"]["loss"])
        return (tmp_path / "train.log").read_text()

    return check


@pytest.fixture
def largest_intermediate():
    """`largest_intermediate(jaxpr) -> int`: elements of the largest value any equation of
    `jaxpr` defines, sub-jaxprs (loops, conds, custom rules) included; for checking that a
    blocked path never forms a T x T array."""
    import math

    def largest(jaxpr) -> int:
        out = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                out = max(out, math.prod(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        out = max(out, largest(sub))
        return out

    return largest
