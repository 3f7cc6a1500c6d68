"""Sweeps: spec parsing and the ratio shorthand, shards, the runner's skip / retry / failure /
interrupt behaviour, and the report's numbers and figures."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.cli import load_config
from train.config import ConfigError
from train.report import _by_share, collect, write_report
from train.sweep import main as sweep_main, parse_shard, shard_runs
from train.sweep_spec import expand, load_spec, parse_ratio, ratio_pattern

ROOT = Path(__file__).resolve().parents[2]

# A 2-layer MQAR model small enough that a point costs its compile and little else.
SMALL = ["train.steps=4", "train.eval_every=0", "train.log_every=2", "train.checkpoint_every=2",
         "data.batch_size=8", "model.d_model=32", "model.mixers.attn.num_heads=1", "data.seq_len=32",
         "data.mqar.vocab_size=64", "data.mqar.num_kv_pairs=4", "data.mqar.num_train_examples=64",
         "data.mqar.num_eval_examples=16", "train.eval_batches=1"]


def _spec(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("layers, ratio, expected", [
    (8, "1:0", "L"), (8, "6:1", "LLLLLLLF"), (8, "3:1", "LLLF"), (8, "1:1", "LF"), (8, "0:1", "F"),
    (12, "6:1", "LLLLLF"), (12, "3:1", "LLLF"), (12, "1:1", "LF"), (7, "6:1", "LLLLLLF"), (6, "1:2", "LFF"),
])
def test_ratio_pattern_spreads_full_layers_evenly(layers, ratio, expected):
    got = ratio_pattern(layers, "L", "F", parse_ratio(ratio, "x"))
    assert "".join(got) == expected
    full = (expected * (layers // len(expected))).count("F")
    lin, ful = map(int, ratio.split(":"))
    assert full == round(layers * ful / (lin + ful))  # the share asked for, rounded


def test_ratio_pattern_can_put_full_attention_first():
    assert "".join(ratio_pattern(8, "L", "F", (3, 1), "first")) == "FLLL"
    assert "".join(ratio_pattern(2, "L", "F", (1, 1), "first")) == "FL"
    assert "".join(ratio_pattern(8, "L", "F", (6, 1), "first")) == "FLLLLLLL"


def test_spec_expands_axes_seeds_and_shares_identical_runs(tmp_path):
    spec = load_spec(_spec(tmp_path, f"""
base = "mqar"
overrides = {json.dumps(SMALL)}
evals = ["mqar"]
seeds = [0, 1]
[ratio]
layers = 4
linear = "lin"
full = "attn"
values = ["1:0", "3:1", "0:1"]
[[axis]]
name = "mixer"
field = "model.mixers.lin.kind"
values = ["gla", "gdn"]
"""))
    points = expand(spec, load_config)
    assert len(points) == 3 * 2 * 2
    p = next(p for p in points if p.labels == {"mixer": "gdn", "ratio": "3:1", "seed": "1"})
    assert p.cfg.model.layer_names() == ("lin", "lin", "lin", "attn") and p.cfg.model.mixer("lin").kind == "gdn"
    assert p.cfg.train.seed == 1 and p.extra == {"full_share": 0.25} and p.cfg.train.steps == 4
    # all-attention points of both mixers are one run; the others are distinct
    shared = {p.run for p in points if p.labels["ratio"] == "0:1"}
    assert shared == {"mixer-any_ratio-0to1_seed-0", "mixer-any_ratio-0to1_seed-1"}
    assert [q.labels["seed"] for q in points] == ["0"] * 6 + ["1"] * 6  # seeds vary slowest
    assert [q.labels["ratio"] for q in points[:3]] == ["1:0", "3:1", "0:1"]  # the ratio fastest
    assert len({p.run for p in points}) == 10


def test_py_spec_and_labelled_override_sets(tmp_path):
    path = _spec(tmp_path, f"""
SWEEP = dict(base="mqar", overrides={SMALL!r},
             axis=[dict(name="width", values={{"narrow": ["model.d_model=32"],
                                                "wide": ["model.d_model=64", "model.mixers.attn.num_heads=2"]}}),
                   dict(field="optimizer.lr", values=[1e-3, 3e-3])])
""", "s.py")
    points = expand(load_spec(path), load_config)
    assert [p.name for p in points] == ["width-narrow_lr-0.001", "width-narrow_lr-0.003",
                                        "width-wide_lr-0.001", "width-wide_lr-0.003"]
    assert points[3].cfg.model.d_model == 64 and points[3].cfg.optimizer.lr == 3e-3


@pytest.mark.parametrize("text, message", [
    ('base = "mqar"\nbogus = 1', r"unknown keys \['bogus'\]"),
    ('overrides = []', "needs base"),
    ('base = "mqar"\n[ratio]\nlayers = 4\nlinear = "gla"\nfull = "attn"\nvalues = ["3-1"]', "not a linear:full ratio"),
    ('base = "mqar"\n[[axis]]\nfield = "train.seed"\nvalues = [1]\n[[axis]]\nfield = "train.seed"\nvalues = [2]',
     "axis names must differ"),
    ('base = "mqar"\n[[axis]]\nfield = "model.d_modle"\nvalues = [64]', "sweep point d-modle-64: unknown config key"),
    ('base = "mqar"\n[[axis]]\nfield = "model.num_layers"\nvalues = [1]\n[[axis]]\nfield = "model.pattern"\n'
     'values = [["attn", "attn"]]', "model.pattern has 2 mixers"),
    ('base = [', "not valid TOML"),
    ('base = "mqar"\n[ratio]\nlayers = 4\nlinear = "gla"\nfull = "attn"\nvalues = ["3:1"]\nplace = "middle"',
     "place='middle' is not accepted"),
])
def test_bad_specs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        expand(load_spec(_spec(tmp_path, text)), load_config)


def test_unknown_eval_suite_is_refused_before_anything_runs(tmp_path, capsys):
    spec = _spec(tmp_path, 'base = "mqar"\nevals = ["mqar", "recall"]\n')
    assert sweep_main([str(spec), "--out", str(tmp_path / "sw")]) == 2
    assert "evals: --suite: unknown suite 'recall'; accepted: mqar, niah, length, diagnostics" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_shards_cover_every_run_exactly_once(tmp_path):
    spec = load_spec(_spec(tmp_path, f'base = "mqar"\noverrides = {json.dumps(SMALL)}\nseeds = [0, 1, 2, 3, 4]\n'
                                     '[[axis]]\nfield = "optimizer.lr"\nvalues = [1e-3, 2e-3, 3e-3]'))
    points = expand(spec, load_config)
    runs = [p.run for p in points]
    for n in (1, 2, 3, 4, 7, 20):
        shards = [shard_runs(points, (i, n)) for i in range(n)]
        flat = [r for s in shards for r in s]
        assert sorted(flat) == sorted(runs) and len(flat) == len(set(flat))
    with pytest.raises(ConfigError, match="I/N with 0 <= I < N"):
        parse_shard("4/4")


def _fake_sweep(tmp_path: Path) -> Path:
    """A sweep directory as the runner leaves it, with made-up records and metrics."""
    out = tmp_path / "sweep"
    points, recs = [], {}
    for mixer in ("gla", "gdn"):
        for ratio, share in (("1:0", 0.0), ("1:1", 0.5), ("0:1", 1.0)):
            for seed in (0, 1):
                labels = {"ratio": ratio, "mixer": mixer, "seed": str(seed)}
                run = f"r{ratio.replace(':', '')}-{mixer if share < 1 else 'any'}-{seed}"
                points.append({"name": f"{ratio}-{mixer}-{seed}", "labels": labels, "extra": {"full_share": share},
                               "run": run, "overrides": []})
                acc = share * 0.8 + (0.1 if mixer == "gdn" and share < 1 else 0) + 0.01 * seed
                recs[run] = {"run": run, "status": "done", "final": {"loss": 2.0 - acc, "accuracy": acc},
                             "stats": {"params": 1000 + seed, "params_by_part": {"mixer:lin": 600, "mlp": 400 + seed},
                                       "mixer_kinds": {"lin": mixer}, "flops_per_token": 5e6,
                                       "state_bytes": {"4096": 77}},
                             "suites": {"mqar": {"mqar/acc_mean": acc, "mqar/acc@kv4_T32": acc / 2}}}
    recs["r10-gla-1"] = {"run": "r10-gla-1", "status": "failed", "error": "config error: boom"}
    (out / "records").mkdir(parents=True)
    for run, rec in recs.items():
        (out / "records" / f"{run}.json").write_text(json.dumps(rec))
        (out / "runs" / run).mkdir(parents=True)
        (out / "runs" / run / "metrics.jsonl").write_text(
            "".join(json.dumps({"kind": "train", "step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3)))
    ev = out / "runs" / "r11-gdn-0" / "eval"  # suite records with grids, as the suites write them
    ev.mkdir()
    grid = [{"task": "needle", "context_len": n, "depth": d, "correct": 1, "trials": 4}
            for n in (64, 128) for d in (0.0, 0.5, 1.0)]
    (ev / "suite-niah-step3.json").write_text(json.dumps({"suite": "niah", "results": {"grid": grid}}))
    lengths = [{"factor": f, "seq_len": 32 * f, "buckets": [{"start": 0, "end": 16 * f, "loss": 2.0},
                                                           {"start": 16 * f, "end": 32 * f, "loss": 1.5}]}
               for f in (1, 2)]
    (ev / "suite-length-step3.json").write_text(json.dumps({"suite": "length", "results": {"lengths": lengths}}))
    (out / "sweep.json").write_text(json.dumps({"name": "fake", "base": "mqar", "overrides": [], "evals": ["mqar"],
                                                "axes": [{"name": "ratio"}, {"name": "mixer"}, {"name": "seed"}],
                                                "points": points}))
    return out


def test_report_numbers_equal_the_records_and_figures_hold_the_series(tmp_path):
    out = _fake_sweep(tmp_path)
    written = write_report(out)
    names = {w.name for w in written}
    assert {"results.csv", "results.md", "recall_vs_full_share.png", "lm_vs_full_share.png", "loss_curves.png",
            "mqar_by_difficulty.png", "niah_heatmap.png", "loss_by_position.png"} <= names
    for w in written:
        if w.suffix == ".png":
            assert w.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and w.stat().st_size > 10_000
    import csv
    rows = list(csv.DictReader((out / "report" / "results.csv").open()))
    assert len(rows) == 12
    for row in rows:
        rec = json.loads((out / "records" / f"{row['run']}.json").read_text())
        assert row["status"] == rec["status"]
        if rec["status"] == "done":
            assert float(row["mqar/acc_mean"]) == rec["suites"]["mqar"]["mqar/acc_mean"]
            assert float(row["final/loss"]) == rec["final"]["loss"]
            assert int(row["params"]) == rec["stats"]["params"] and row["mixers"] == rec["stats"]["mixer_kinds"]["lin"]
    md = (out / "report" / "results.md").read_text()
    assert "mqar/acc_mean" in md and "acc@kv4" not in md 
    assert "1:0-gla-1: failed: config error: boom" in md
    # the recall figure's series: one line per mixer, mean over seeds, failed points left out
    rows = collect(out)
    manifest = json.loads((out / "sweep.json").read_text())
    for r, pt in zip(rows, manifest["points"]):
        r["_labels"] = list(pt["labels"])
    series = _by_share(rows, "mqar/acc_mean")
    assert set(series) == {"mixer=gla", "mixer=gdn"}
    gdn = {x: (mean, lo, hi) for x, mean, lo, hi in series["mixer=gdn"]}
    assert gdn[0.5] == pytest.approx((0.505, 0.5, 0.51))
    gla = {x: mean for x, mean, *_ in series["mixer=gla"]}
    assert gla[0.0] == pytest.approx(0.0)  # only seed 0: seed 1 failed


def _run_sweep(args, **kw):
    return subprocess.run([sys.executable, "-m", "train.sweep", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, **kw)


def test_sweep_end_to_end_skips_done_runs_and_records_a_failing_one(tmp_path, capsys):
    """The runner in this process (each point still trains in its own process, as always)."""
    spec = _spec(tmp_path, f"""
base = "mqar"
overrides = {json.dumps(SMALL)}
evals = ["mqar"]
[[axis]]
name = "data"
values = {{ ok = [], broken = ["data.mqar.num_train_examples=0"] }}
""")
    out = tmp_path / "sw"
    assert sweep_main([str(spec), "--out", str(out)]) == 3, capsys.readouterr()
    ok = json.loads((out / "records" / "data-ok.json").read_text())
    bad = json.loads((out / "records" / "data-broken.json").read_text())
    assert ok["status"] == "done" and ok["final"]["loss"] > 0 and ok["stats"]["params"] > 0
    assert ok["overhead_s"] < ok["wall_s"] and ok["evals"] == ["mqar"]
    suite_file = json.loads((out / "runs" / "data-ok" / "eval" / "suite-mqar-step4.json").read_text())
    assert ok["suites"]["mqar"] == suite_file["summary"] and "mqar/acc_mean" in ok["suites"]["mqar"]
    assert bad["status"] == "failed" and bad["exit_code"] != 0 and bad["error"]
    assert (out / "runs" / "data-ok" / "checkpoints").is_dir() and (out / "report" / "results.md").is_file()
    capsys.readouterr()
    assert sweep_main([str(spec), "--out", str(out), "--no-report"]) == 3
    assert "data-ok: done before, skipped" in capsys.readouterr().out
    assert json.loads((out / "records" / "data-ok.json").read_text()) == ok  # untouched
    assert sweep_main([str(spec), "--out", str(out), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "done" in listing and "failed" in listing


@pytest.mark.slow
def test_interrupted_sweep_resumes_with_no_point_lost_or_repeated(tmp_path):
    long = [o for o in SMALL if not o.startswith("train.steps")] + ["train.steps=400", "train.checkpoint_every=5"]
    spec = _spec(tmp_path, f'base = "mqar"\noverrides = {json.dumps(long)}\nseeds = [0, 1]\n')
    out = tmp_path / "sw"
    proc = subprocess.Popen([sys.executable, "-m", "train.sweep", str(spec), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = out / "runs" / "seed-0" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stdout + stderr
    rec = json.loads((out / "records" / "seed-0.json").read_text())
    assert rec["status"] == "interrupted" and rec["exit_code"] == 75
    assert not (out / "records" / "seed-1.json").exists()  # the sweep stopped after the interrupted point
    again = _run_sweep([str(spec), "--out", str(out)])
    assert again.returncode == 0, again.stdout + again.stderr
    for run in ("seed-0", "seed-1"):
        assert json.loads((out / "records" / f"{run}.json").read_text())["status"] == "done"
        steps = [json.loads(line)["step"] for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert len(steps) == len(set(steps)) and steps[-1] == 400
    assert "resumed from checkpoint" in (out / "runs" / "seed-0" / "train.log").read_text()
