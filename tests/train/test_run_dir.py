"""The run directory under faults and mistakes (issue 15): incompatible vs corrupt checkpoints,
bit rot, malformed data state, non-finite updates, one writer at a time, nothing written before
a run is valid, failed saves, logs that hold each step once, exit codes and one-line errors."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax
import pytest

import train.loop as loop_mod
from train.artifacts import load_run
from train.cli import load_config, main as train_main
from train.config import ConfigError, apply_overrides
from train.errors import CheckpointError
from train.loop import NonFiniteError, run
from train.run_lock import RunDirBusy, RunLock

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.d_model=32", "model.num_layers=2", "model.pattern=swa,swa", "model.mixers.attn.num_heads=2", "model.mixers.swa.num_heads=2",
         "model.mixers.swa.window=16", "data.seq_len=32", "data.batch_size=2", "optimizer.warmup_steps=0",
         "train.eval_batches=1", "train.log_every=1", "train.eval_every=0", "runtime.mesh_data=1"]


def small(*extra):
    return apply_overrides(load_config("tiny"), SMALL + list(extra))


def steps_in(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def biggest_data_file(step_dir: Path) -> Path:
    return max((f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in str(f)),
               key=lambda f: f.stat().st_size)


def flip_bytes(path: Path, at: float = 0.5, n: int = 4) -> None:
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    path.write_bytes(b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run with checkpoints at 3 and 6; tests copy it before breaking it."""
    path = tmp_path_factory.mktemp("trained") / "run"
    run(small("train.steps=6", "train.checkpoint_every=3"), path)
    return path


@pytest.fixture
def copy_of(trained, tmp_path):
    import shutil
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# ----------------------------------------------------------------------------- 1. restore

def test_incompatible_checkpoint_is_an_error_that_moves_nothing(copy_of):
    (copy_of / "config.json").unlink()  # the config.json check cannot catch it any more
    for _ in range(2):  # and the next identical command does not start over either
        with pytest.raises(ConfigError, match=r"holds another model.*params/embed/embedding/value shape "
                                              r"\(256, 32\) in the checkpoint vs \(256, 64\) now"):
            run(small("train.steps=8", "model.d_model=64"), copy_of)
        assert steps_in(copy_of) == [3, 6] and not (copy_of / "corrupt_checkpoints").exists()
        assert not (copy_of / "config.json").exists()


def test_every_checkpoint_unreadable_stops_until_the_user_asks_to_start_over(copy_of, capsys):
    for step in (3, 6):
        (copy_of / "checkpoints" / str(step) / "state" / "_METADATA").write_text("garbage")
    config_before = (copy_of / "config.json").read_text() if (copy_of / "config.json").exists() else None
    args = ["--run-dir", str(copy_of), *SMALL, "train.steps=8", "train.checkpoint_every=3"]
    for _ in range(2):
        assert train_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("checkpoint error: no checkpoint in") and "nothing was moved" in err[-1]
        assert "--from-scratch" in err[-1] and "Traceback" not in "\n".join(err)
        assert steps_in(copy_of) == [3, 6]
    assert ((copy_of / "config.json").read_text() if config_before else None) == config_before
    assert train_main(["--from-scratch", *args]) == 0
    assert sorted(p.name.split("-")[0] for p in (copy_of / "corrupt_checkpoints").iterdir()) == ["3", "6"]
    assert steps_in(copy_of) == [3, 6, 8]
    assert "resumed" not in (copy_of / "train.log").read_text().split("step 8")[-1]


def test_malformed_data_state_falls_back_to_the_previous_checkpoint(copy_of):
    data_file = copy_of / "checkpoints" / "6" / "data" / "metadata"
    state = json.loads(data_file.read_text())
    state["grain"] = {"nonsense": 1}
    data_file.write_text(json.dumps(state))
    run(small("train.steps=7", "train.checkpoint_every=3"), copy_of)
    log = (copy_of / "train.log").read_text()
    assert "checkpoint step 6" in log and "data iterator state" in log and "resumed from checkpoint step 3" in log


def test_other_data_is_incompatible_not_corrupt(copy_of):
    with pytest.raises(ConfigError, match="train.seed|seed"):
        run(small("train.steps=8", "train.seed=1"), copy_of)
    assert steps_in(copy_of) == [3, 6] and not (copy_of / "corrupt_checkpoints").exists()


# ----------------------------------------------------------------------------- 5. bit rot

def test_flipped_bytes_are_caught_by_train_and_by_readers(copy_of, capsys):
    flip_bytes(biggest_data_file(copy_of / "checkpoints" / "6"))
    tmp = copy_of / "checkpoints" / "9.orbax-checkpoint-tmp"  # as a save in progress (or killed) leaves
    (tmp / "state").mkdir(parents=True)
    # readers: the newest readable step, and a one-line error for the corrupt one
    assert load_run(copy_of).step == 3
    with pytest.raises(CheckpointError, match="step 6 .*fingerprint mismatch"):
        load_run(copy_of, step=6)
    from train.eval import main as eval_main
    from train.export import main as export_main
    from train.generate import main as generate_main
    for cli in (lambda: eval_main([str(copy_of), "--step", "6"]),
                lambda: export_main([str(copy_of), "--step", "6"]),
                lambda: generate_main([str(copy_of), "--step", "6", "--prompt", "a", "--max-tokens", "2"])):
        assert cli() == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "fingerprint mismatch" in err, err
    assert steps_in(copy_of) == [3, 6] and tmp.exists()  # readers move and clean nothing
    # a refused or finished start moves nothing, not even the corrupt step
    assert run(small("train.steps=3", "train.checkpoint_every=3"), copy_of)["already_finished"]
    assert not (copy_of / "corrupt_checkpoints").exists()
    # train: falls back to 3, sets 6 aside (it writes step 6 again)
    run(small("train.steps=6", "train.checkpoint_every=3"), copy_of)
    assert "resumed from checkpoint step 3" in (copy_of / "train.log").read_text()
    assert [p.name.split("-")[0] for p in (copy_of / "corrupt_checkpoints").iterdir()] == ["6"]
    assert load_run(copy_of).step == 6
    assert not tmp.exists()  # the writer, holding the lock, removed what a killed save left


def test_a_failure_of_the_reader_is_not_corruption(copy_of, monkeypatch):
    """Out of memory (or a denied permission) while restoring says so and skips nothing."""
    import orbax.checkpoint as ocp

    def oom(self, *a, **k):
        raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", oom)
    with pytest.raises(CheckpointError, match="step 6 .*cannot be read now.*RESOURCE_EXHAUSTED.*nothing was moved"):
        load_run(copy_of)


def test_checkpoints_from_before_fingerprints_restore_unverified(copy_of):
    import shutil
    shutil.rmtree(copy_of / "checkpoints" / "6" / "meta")
    assert load_run(copy_of).step == 6


# ----------------------------------------------------------------------------- 2. non-finite

def test_a_non_finite_update_is_never_applied_or_saved(tmp_path, monkeypatch):
    """Finite loss and gradients, but the update breaks the params (what lr=NaN or eps=0 with
    untied embeddings did): the step is not applied and no checkpoint holds it."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    real = loop_mod.make_optimizer

    def poisoned(cfg, steps):  # the 4th update is NaN
        tx, schedule = real(cfg, steps)

        def update(updates, state, params=None):
            count, inner = state
            new, inner = tx.update(updates, inner, params)
            scale = jnp.where(count == 3, jnp.float32(jnp.nan), jnp.float32(1.0))
            return jax.tree.map(lambda u: u * scale, new), (count + 1, inner)

        return optax.GradientTransformation(lambda p: (jnp.zeros((), jnp.int32), tx.init(p)), update), schedule

    monkeypatch.setattr(loop_mod, "make_optimizer", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 4: the update made the parameters non-finite.*"
                                             r"Last good checkpoint: step 3"):
        run(small("train.steps=6", "train.checkpoint_every=3"), tmp_path)
    assert steps_in(tmp_path) == [3]
    saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "3" / "state")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved["params"]))


# ----------------------------------------------------------------------------- 3. one writer

def test_a_held_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match=rf"being trained by pid {os.getpid()} on host {socket.gethostname()}"):
            run(small("train.steps=2"), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
    # a holder that died without releasing: the file names it, but no process holds the flock
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "earlier"}))
    run(small("train.steps=2"), tmp_path / "run")
    assert "previous holder (pid 999999 on host gone" in (tmp_path / "run" / "train.log").read_text()


def test_concurrent_start_readers_beside_a_running_job_and_sigterm(tmp_path):
    """Two trainers started together: one trains, the other is refused naming the holder. A reader
    loads checkpoints while the job is writing them. SIGTERM: exit 75, resumable."""
    args = [sys.executable, "-m", "train", "--run-dir", str(tmp_path), *SMALL, "train.steps=100000",
            "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    loser = next(p for p in procs if p.poll() is not None)
    a = next(p for p in procs if p is not loser)
    err = loser.stderr.read()
    assert loser.returncode == 2 and f"being trained by pid {a.pid}" in err, err[-2000:]
    for line in a.stderr:
        if "[train 20/" in line:
            break
    loaded = [load_run(tmp_path).step for _ in range(5)]  # checkpoints come and go meanwhile
    assert all(s >= 2 for s in loaded)
    a.send_signal(signal.SIGTERM)
    a.communicate(timeout=120)
    assert a.returncode == 75
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: each step once


# ----------------------------------------------------------------------------- 4. nothing written

def test_a_refused_start_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    new = tmp_path / "new"

    def build_must_not_run(*a, **k):
        raise AssertionError("the data is checked before the model is built")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_mod.models, "build", build_must_not_run)
        with pytest.raises(ConfigError, match="data.paths"):
            run(small("data.source=files", f"data.paths={empty}"), new)
    assert not new.exists()
    (empty / "a.txt").write_text("some text to train on " * 40)
    run(small("data.source=files", f"data.paths={empty}", "train.steps=2"), new)  # the corrected command
    before = (new / "config.json").read_bytes()
    for bad in (["runtime.mesh_data=3"], ["train.seed=1"]):
        with pytest.raises(ConfigError):
            run(small("data.source=files", f"data.paths={empty}", "train.steps=4", *bad), new)
        assert (new / "config.json").read_bytes() == before


def test_finished_and_shorter_reruns_touch_nothing(copy_of):
    before = {p: p.stat().st_mtime_ns for p in copy_of.rglob("*") if p.is_file()}
    assert run(small("train.steps=6", "train.checkpoint_every=3"), copy_of)["already_finished"]
    with pytest.raises(ConfigError, match=r"already trained to step 6, past train.steps=4"):
        run(small("train.steps=4", "train.checkpoint_every=3"), copy_of)
    after = {p: p.stat().st_mtime_ns for p in copy_of.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: t for p, t in before.items() if p.name != ".lock"}


# ----------------------------------------------------------------------------- 6. failed saves

def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_good_step(copy_of):
    """`ulimit -f` makes every write past 100 kB fail as a full disk does (EFBIG instead of
    ENOSPC; Python ignores SIGXFSZ): the small logs still go through, the checkpoint's data
    files do not."""
    args = ["bash", "-c", 'ulimit -f 97 && exec "$@"', "_", sys.executable, "-m", "train", "--run-dir",
            str(copy_of), *SMALL, "train.steps=12", "train.checkpoint_every=3"]
    r = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 60, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("training stopped: saving checkpoint step 9") and "File too large" in last, last
    assert "Last good checkpoint: step 6" in last
    assert steps_in(copy_of) == [3, 6]
    assert not [p for p in (copy_of / "checkpoints").iterdir() if "tmp" in p.name]
    assert load_run(copy_of).step == 6


# ----------------------------------------------------------------------------- 8. logs

def test_resume_logs_each_step_once_in_metrics_and_tensorboard(copy_of):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with open(copy_of / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # a write cut short by a kill
    run(small("train.steps=9", "train.checkpoint_every=3"), copy_of)  # resumes at 6
    assert run(small("train.steps=9", "train.checkpoint_every=3"), copy_of)["already_finished"]
    recs = [json.loads(line) for line in (copy_of / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 10))
    ea = EventAccumulator(str(copy_of / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 10))
    log = (copy_of / "train.log").read_text()
    assert "train.steps changed from 6 to 9" in log and "learning rate at step 6 moves from" in log


def test_eval_labels_survive_a_terminal(tmp_path):
    """rich would read "[eval 5/10]" as markup and print nothing of it."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from train.logger import RunLogger
    logger = RunLogger(tmp_path, 10, 0, tensorboard=False)
    out = io.StringIO()
    logger.progress = Progress(console=Console(file=out, force_terminal=True, width=200))
    logger.console_line("eval", 5, {"loss": 1.5}, ("loss",))
    logger.close()
    assert "[eval 5/10] loss=1.5" in out.getvalue()


# ----------------------------------------------------------------------------- 7. one-line errors

def test_one_line_errors_for_broken_run_files(copy_of, capsys):
    from train.eval import main as eval_main
    (copy_of / "tokenizer_byte.json").unlink()
    assert eval_main([str(copy_of)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no tokenizer file" in err and "data.tokenizer=" not in err.split(":")[0]
    (copy_of / "config.json").write_text('{"model": ')
    for cli, args in ((eval_main, [str(copy_of)]), (train_main, ["--run-dir", str(copy_of), *SMALL])):
        assert cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("fix or remove it") and "config.json is not valid JSON (line 1" in err, err
        assert len(err.splitlines()) == 1
