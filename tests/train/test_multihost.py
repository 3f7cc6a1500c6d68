"""A real multi-process run: two CPU processes of two devices each, joined by
jax.distributed.initialize (gloo collectives), train under a data x fsdp mesh that spans both,
write collective checkpoints, and match a single process with the same mesh over 4 devices."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.cli import load_config
from train.config import apply_overrides
from train.loop import run

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["model.d_model=64", "model.mixers.attn.num_heads=2", "model.mixers.swa.num_heads=2",
        "model.mixers.swa.window=16", "data.seq_len=64", "data.batch_size=8", "optimizer.warmup_steps=0",
        "optimizer.lr=3e-3", "train.steps=3", "train.checkpoint_every=2", "train.eval_batches=1",
        "train.log_every=1", "train.eval_every=0", "runtime.mesh_data=2", "runtime.mesh_fsdp=2"]


def losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(run_dir: Path, args: list[str]) -> list[subprocess.Popen]:
    """`python -m train` as processes 0 and 1 of a two-process CPU run (2 devices each, gloo)."""
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "train", "--run-dir", str(run_dir), "runtime.distributed=true", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("source", ["stdlib", "shards"])
def test_two_processes_train_like_one(tmp_path, source):
    """With shards each process reads only its own rows of every batch: the losses match the
    single process only if the two halves make up the same global batches."""
    args = list(ARGS)
    if source == "shards":  # a mixture of two shard sets, read by one worker process per host
        from train.prepare_data import prepare
        prepare(tmp_path / "a")
        prepare(tmp_path / "b", record_tokens=1000)
        args += ["data.source=shards", f"data.paths={tmp_path / 'a'},{tmp_path / 'b'}", "data.mixture=0.7,0.3",
                 "data.workers=1"]
    procs = two_processes(tmp_path / "multi", args)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    log = (tmp_path / "multi" / "train.log").read_text()
    assert "2 process(es), mesh data=2 x fsdp=2 x tensor=1" in log
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]

    run(apply_overrides(load_config("tiny"), args), tmp_path / "single")  # 4 of this process's 8 devices
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"), rtol=2e-5)
    if source == "shards":  # per-source token counts summed over the two processes
        for d in ("multi", "single"):
            last = [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-2]
            assert last["kind"] == "train" and last["tokens/a"] + last["tokens/b"] == 3 * 8 * 64, last


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_with_a_checkpoint(tmp_path):
    """SIGTERM reaches only process 1 (as a node-local preemption would): both processes agree at
    the next log step, save one collective checkpoint and exit 75."""
    import signal
    args = [a for a in ARGS if not a.startswith(("train.steps", "train.checkpoint_every"))]
    args += ["train.steps=400", "train.checkpoint_every=1000"]
    procs = two_processes(tmp_path / "run", args)
    for line in procs[0].stdout:
        if "[train 5/" in line:
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs[1][-2000:]
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 5 <= saved[0] < 400
    assert f"saving checkpoint at step {saved[0]}" in (tmp_path / "run" / "train.log").read_text()
