"""End-to-end runs of the train loop on tiny configs: learning, exact resume, signals,
non-finite stops, corrupt checkpoints, and clear errors for bad input."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train.loop as loop_mod
from train.cli import load_config
from train.config import ConfigError, apply_overrides
from train.loop import NonFiniteError, run

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.d_model=64", "model.mixers.attn.num_heads=2", "model.mixers.swa.num_heads=2",
         "model.mixers.swa.window=16", "data.seq_len=64", "data.batch_size=4", "optimizer.warmup_steps=2",
         "optimizer.lr=3e-3", "train.eval_batches=2", "train.log_every=1", "train.eval_every=0",
         "runtime.mesh_data=1"]


def small(*extra):
    return apply_overrides(load_config("tiny"), SMALL + list(extra))


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


def test_tiny_run_learns_and_leaves_a_run_dir(tmp_path):
    summary = run(small("train.steps=40", "train.checkpoint_every=20"), tmp_path)
    losses = train_losses(tmp_path)
    assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 1.5
    ev = summary["eval"]
    assert ev["loss"] < 5.0 and ev["bits_per_byte"] < 7.0  # uniform bytes: 5.55 nats, 8 bits/byte
    for name in ("config.json", "metrics.jsonl", "train.log", "summary.json", "tokenizer_byte.json"):
        assert (tmp_path / name).exists(), name
    assert any((tmp_path / "tb").iterdir())
    assert json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"] == 256
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]


def run_killed_after(cfg, run_dir, monkeypatch, step: int) -> None:
    """Run `cfg` in run_dir and die right after logging train step `step`, as a kill would."""
    class Killed(Exception):
        pass

    original = loop_mod.RunLogger.write

    def write_then_die(self, kind, at, metrics):
        original(self, kind, at, metrics)
        if kind == "train" and at == step:
            raise Killed()

    monkeypatch.setattr(loop_mod.RunLogger, "write", write_then_die)
    with pytest.raises(Killed):
        run(cfg, run_dir)
    monkeypatch.setattr(loop_mod.RunLogger, "write", original)


@pytest.mark.slow  # the default tier's: test_shards.py::test_a_killed_run_on_shards_resumes_on_the_same_rows
def test_resume_follows_the_uninterrupted_trajectory(tmp_path, monkeypatch):
    cfg = small("train.steps=12", "train.checkpoint_every=5", "optimizer.warmup_steps=0")
    run(cfg, tmp_path / "straight")
    run_killed_after(cfg, tmp_path / "split", monkeypatch, 7)  # the last checkpoint is step 5
    run(cfg, tmp_path / "split")
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))  # each step once
    for s in range(1, 13):
        assert a[s] == b[s], (s, a[s], b[s])  # exactly, not approximately


@pytest.mark.slow  # the default tier's SIGTERM case: test_run_dir.py::test_concurrent_start_...
def test_sigterm_saves_and_the_restart_resumes(tmp_path):
    args = [sys.executable, "-m", "train", "--run-dir", str(tmp_path), *SMALL, "train.steps=400",
            "train.checkpoint_every=1000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "[train 5/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 75  # stopped before the last step: resumable, not finished
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and saved[0] >= 5
    done = subprocess.run(args[:-2] + [f"train.steps={saved[0] + 3}", "train.checkpoint_every=1000"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from checkpoint step {saved[0]}" in done.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop_mod.make_train_step

    def poisoned(*a, **kw):
        step = real(*a, **kw)

        def wrapped(state, batch):
            if int(state["step"]) == 4:  # the fifth update sees a NaN input row
                batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
            return step(state, batch)
        return wrapped

    monkeypatch.setattr(loop_mod, "make_train_step", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 5: .*not finite.*Last good checkpoint: step 3"):
        run(small("train.steps=10", "train.checkpoint_every=3"), tmp_path)
    monkeypatch.setattr(loop_mod, "make_train_step", real)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3]


@pytest.mark.slow  # the default tier's corrupt cases: test_run_dir.py
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    run(small("train.steps=6", "train.checkpoint_every=3"), tmp_path)
    latest = tmp_path / "checkpoints" / "6" / "state"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    run(small("train.steps=8", "train.checkpoint_every=3"), tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert "checkpoint step 6" in log and "cannot be used" in log and "resumed from checkpoint step 3" in log
    assert sorted(train_losses(tmp_path))[-1] == 8
    # only the unreadable step was set aside (it was written again); step 3 stays
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["6"]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6, 8]


def test_resume_with_another_model_is_refused(tmp_path):
    run(small("train.steps=2"), tmp_path)
    with pytest.raises(ConfigError, match="model.d_model"):
        run(small("train.steps=4", "model.d_model=128"), tmp_path)


def test_bad_data_path_is_a_clear_error(tmp_path):
    cfg = small("data.source=files", f"data.paths={tmp_path / 'nope.txt'}")
    with pytest.raises(ConfigError, match="data.paths"):
        run(cfg, tmp_path / "run")


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    a = run(small("train.steps=3", "train.grad_accum=1"), tmp_path / "a")
    b = run(small("train.steps=3", "train.grad_accum=2"), tmp_path / "b")
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    np.testing.assert_allclose([la[s] for s in (1, 2, 3)], [lb[s] for s in (1, 2, 3)], rtol=2e-5)
    np.testing.assert_allclose(a["eval"]["loss"], b["eval"]["loss"], rtol=2e-5)


def test_cli_reports_config_errors_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "train", "model.d_modle=3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "did you mean 'd_model'" in r.stderr and "Traceback" not in r.stderr
