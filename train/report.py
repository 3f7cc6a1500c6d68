"""The report of a sweep: one table and the figures that answer what the sweep asked.

    python -m train.report SWEEP_DIR

(run by `python -m train.sweep` at its end) reads SWEEP_DIR/sweep.json, records/<run>.json and
each run's metrics.jsonl and eval/suite-*.json, and writes into SWEEP_DIR/report/:

    results.csv     one row per point: its labels, status, mixers, params (total and by part),
                    training FLOPs/token, decode-state bytes, final loss / bits per byte /
                    accuracy, every suite metric
    results.md      the same as one Markdown table (aggregate suite metrics and bits/byte per
                    length; per-cell and per-layer metrics, names with "@", only in the CSV)
    recall_vs_full_share.png  each recall metric against the share of full-attention layers, one
                    line per group (the labels other than ratio and seed), mean over seeds with
                    the min-max range; with no ratio axis, one bar per group the same way
    lm_vs_full_share.png      final validation loss and bits per byte the same way
    mqar_by_difficulty.png    MQAR recall per (kv pairs, sequence length) cell of the mqar suite,
                              the same way (harder and longer than trained included)
    loss_curves.png           training loss against step, one panel per group
    niah_heatmap.png          needle accuracy over context length x needle depth (niah suite)
    loss_by_position.png      loss by position bucket at each evaluated length (length suite)
    attention_by_layer.png    per attention layer: the sink rate (first-token share), the
                              learned sink's share where there is one, and the entropy, one
                              line per group (diagnostics suite)

Figures are drawn only when their data exist. Numbers in the tables are those of the records,
unchanged.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path

from train.logger import read_json

__all__ = ["collect", "write_report", "main"]

STATE_LENGTH = "4096"  # decode-state column of the table (all lengths are in the CSV)


def _group_key(labels: dict) -> str:
    """The labels that define a line in the figures: all but ratio and seed."""
    parts = [f"{k}={v}" for k, v in labels.items() if k not in ("ratio", "seed")]
    return ", ".join(parts) or "all"


def _mixers(stats: dict | None) -> str:
    """The mixer kinds of the model's layers, e.g. "gdn+attention"."""
    if not stats:
        return ""
    return "+".join(dict.fromkeys(stats.get("mixer_kinds", {}).values()))


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per point of the sweep: its labels joined with its run's record (flat dict)."""
    sweep_dir = Path(sweep_dir)
    manifest = read_json(sweep_dir / "sweep.json")
    if manifest is None:
        from train.config import ConfigError
        raise ConfigError(f"{sweep_dir} is not a sweep directory: no readable sweep.json")
    rows = []
    for pt in manifest["points"]:
        rec = read_json(sweep_dir / "records" / f"{pt['run']}.json") or {"status": "not run"}
        row = {"point": pt["name"], **pt["labels"], **pt.get("extra", {}), "run": pt["run"],
               "status": rec.get("status"), "error": rec.get("error")}
        stats = rec.get("stats")
        if stats:
            row["mixers"] = _mixers(stats)
            row["params"] = stats["params"]
            for part, n in stats["params_by_part"].items():
                row[f"params/{part}"] = n
            row["flops_per_token"] = stats["flops_per_token"]
            for length, b in stats["state_bytes"].items():
                row[f"state_bytes@{length}"] = b
        for k, v in (rec.get("final") or {}).items():
            row[f"final/{k}"] = v
        for summary in (rec.get("suites") or {}).values():
            row.update(summary)
        for k in ("train_s", "eval_s", "wall_s", "overhead_s"):
            if rec.get(k) is not None:
                row[k] = rec[k]
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return cols


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def _table_metric(name: str) -> bool:
    """Suite metrics shown in results.md: the aggregates (no "@"), plus bits/byte at each length
    of the length suite; per-cell and per-layer metrics stay in the CSV."""
    suite = name.split("/")[0]
    if suite not in ("mqar", "niah", "length", "diagnostics"):
        return False
    return "@" not in name or name.startswith("length/bpb@")


def _markdown(rows: list[dict], axes: list[str]) -> str:
    suite_cols = [c for c in _columns(rows) if _table_metric(c)]
    cols = (["point", "status", "mixers"] + [a for a in axes if a not in ("point",)] +
            ["params", "flops_per_token", f"state_bytes@{STATE_LENGTH}", "final/loss", "final/bits_per_byte",
             "final/accuracy"] + suite_cols)
    cols = [c for c in dict.fromkeys(cols) if any(c in r for r in rows)]
    out = io.StringIO()
    out.write("| " + " | ".join(cols) + " |\n")
    out.write("|" + "---|" * len(cols) + "\n")
    for r in rows:
        out.write("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |\n")
    failed = [r for r in rows if r.get("status") not in ("done",)]
    if failed:
        out.write("\nNot done:\n\n")
        for r in failed:
            out.write(f"- {r['point']}: {r.get('status')}{': ' + r['error'] if r.get('error') else ''}\n")
    return out.getvalue()


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> None:
    """PNG written whole or not at all (sweep shards may write the report at the same time)."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _recall_metrics(rows: list[dict]) -> list[str]:
    keys = _columns(rows)
    return [k for k in keys if k.split("/")[0] in ("mqar", "niah") and "@" not in k
            and any(isinstance(r.get(k), (int, float)) for r in rows)]


def _by_share(rows, metric):
    """{group: [(full_share, mean, lo, hi), ...]} over seeds."""
    groups: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        v = r.get(metric)
        if r.get("status") != "done" or not isinstance(v, (int, float)) or "full_share" not in r:
            continue
        groups.setdefault(_group_key({k: r[k] for k in r["_labels"]}), {}).setdefault(r["full_share"], []).append(v)
    return {g: [(x, sum(vs) / len(vs), min(vs), max(vs)) for x, vs in sorted(d.items())] for g, d in groups.items()}


def _metric_panels(plt, rows, metrics, title, ylabels, path, per_row: int = 5, unit_range: bool = False) -> Path | None:
    """One panel per metric: against the full-attention share (one line per group) when the
    sweep has a ratio axis, else one bar per point."""
    if not metrics:
        return None
    n = len(metrics)
    ncols, nrows = min(n, per_row), math.ceil(n / per_row)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.0 * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    has_share = any("full_share" in r for r in rows)
    for ax, metric in zip(axes.flat, metrics):
        if has_share:
            for g, pts in _by_share(rows, metric).items():
                xs = [p[0] for p in pts]
                ax.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                            marker="o", capsize=3, label=g)
            ticks = {r["full_share"]: r.get("ratio", "") for r in rows if "full_share" in r}
            ax.set_xticks(sorted(ticks), [f"{x:.2f}\n{ticks[x]}" for x in sorted(ticks)], fontsize=8)
            ax.set_xlabel("share of full-attention layers (linear:full)")
            ax.set_xlim(-0.05, 1.05)
        else:  # one bar per group: the mean over seeds, the whiskers their range
            groups: dict[str, list[float]] = {}
            for r in rows:
                if r.get("status") == "done" and isinstance(r.get(metric), (int, float)):
                    groups.setdefault(_group_key({k: r[k] for k in r["_labels"]}), []).append(r[metric])
            names = list(groups)
            means = [sum(v) / len(v) for v in groups.values()]
            err = [[m - min(v) for m, v in zip(means, groups.values())],
                   [max(v) - m for m, v in zip(means, groups.values())]]
            ax.bar(range(len(names)), means, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabels.get(metric, metric))
        if unit_range:  # accuracies: the same 0-1 scale in every panel
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if has_share and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title + ("" if has_share else " (mean over seeds; whiskers: their range)"))
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def _mqar_cells(rows: list[dict]) -> list[str]:
    """mqar/acc@kv<k>_T<t> metrics, ordered by sequence length then kv pairs."""
    import re
    cells = []
    for k in _columns(rows):
        m = re.fullmatch(r"mqar/acc@kv(\d+)_T(\d+)", k)
        if m:
            cells.append((int(m[2]), int(m[1]), k))
    return [k for *_, k in sorted(cells)]


def _loss_curves(plt, sweep_dir: Path, rows, path) -> Path | None:
    """Training loss against step: with a ratio axis one panel per group, else one panel."""
    curves: dict[str, list] = {}
    share = any("full_share" in r for r in rows)
    for r in rows:
        metrics = sweep_dir / "runs" / r["run"] / "metrics.jsonl"
        if not metrics.is_file():
            continue
        steps, losses = [], []
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "train" and isinstance(rec.get("loss"), (int, float)):
                steps.append(rec["step"])
                losses.append(rec["loss"])
        if steps:
            if share:  # a panel per group, a line per ratio and seed
                label = ", ".join(f"{k}={r[k]}" for k in r["_labels"] if k in ("ratio", "seed")) or r["point"]
                panel = _group_key({k: r[k] for k in r["_labels"]})
            else:  # one panel, a line per point
                label, panel = r["point"], "every point"
            curves.setdefault(panel, []).append((label, steps, losses))
    if not curves:
        return None
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n if n > 1 else 7.5, 4.5), squeeze=False, sharey=True)
    for ax, (g, cs) in zip(axes[0], curves.items()):
        for label, steps, losses in cs:
            ax.plot(steps, losses, label=label, lw=1.2)
        ax.set_title(g)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training loss")
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def _suite_record(sweep_dir: Path, run: str, suite: str):
    files = sorted((sweep_dir / "runs" / run / "eval").glob(f"suite-{suite}-step*.json"),
                   key=lambda p: int(p.stem.rsplit("step", 1)[1]) if p.stem.rsplit("step", 1)[1].isdigit() else -1)
    return read_json(files[-1]) if files else None


def _niah_heatmap(plt, sweep_dir: Path, rows, path) -> Path | None:
    """Per run with a niah record: accuracy over (context length, depth) of the needle task
    (passkey / phonebook too when present), one panel each."""
    panels = []
    for r in rows:
        rec = _suite_record(sweep_dir, r["run"], "niah")
        if rec and r["run"] not in [p[0] for p in panels]:
            panels.append((r["run"], rec))
    if not panels:
        return None
    n = len(panels)
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 1.5, 3.0 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    im = None
    for k, (ax, (run, rec)) in enumerate(zip(axes.flat, panels)):
        cells = [c for c in rec["results"]["grid"] if c["task"] == "needle"] or rec["results"]["grid"]
        lengths = sorted({c["context_len"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = [[math.nan] * len(lengths) for _ in depths]
        for c in cells:
            grid[depths.index(c["depth"])][lengths.index(c["context_len"])] = c["correct"] / max(c["trials"], 1)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        if k % cols == 0:
            ax.set_ylabel("needle depth")
        if k + cols >= n:
            ax.set_xlabel("context length (tokens)")
        ax.set_title(run, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, label="retrieval accuracy (fraction of trials)", shrink=0.8)
    fig.suptitle("Needle in a haystack (held-out text): exact greedy retrieval of the needle")
    _save(plt, fig, path)
    return path


def _loss_by_position(plt, sweep_dir: Path, rows, path) -> Path | None:
    """One panel per evaluated length (1x, 2x, 4x the training length), one line per run: the
    held-out loss in each position bucket of the length suite."""
    series = []
    for r in rows:
        rec = _suite_record(sweep_dir, r["run"], "length")
        if rec and r["run"] not in [s[0] for s in series]:
            series.append((r["run"], {e["factor"]: e for e in rec["results"].get("lengths", [])}))
    if not series:
        return None
    factors = sorted({f for _, by in series for f in by})
    fig, axes = plt.subplots(1, len(factors), figsize=(5.0 * len(factors) + 3.0, 4.5), squeeze=False, sharey=True)
    for ax, factor in zip(axes[0], factors):
        for i, (run, by) in enumerate(series):
            entry = by.get(factor)
            if entry is None:
                continue
            xs = [b["start"] for b in entry["buckets"]] + [entry["buckets"][-1]["end"]]
            ys = [b["loss"] for b in entry["buckets"]]
            ax.step(xs, ys + ys[-1:], where="post", color=f"C{i % 10}", ls="-" if i < 10 else "--",
                    lw=1.2, label=run if factor == factors[0] else None)
        ax.set_title(f"{factor}x the training length (T={entry['seq_len'] if entry else '?'})")
        ax.set_xlabel("position in the document (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    fig.legend(loc="center right", fontsize=7)
    fig.suptitle("Loss by position (length extrapolation)")
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / (5.0 * len(factors) + 3.0), 1))
    _save(plt, fig, path)
    return path


def _attention_by_layer(plt, rows, path) -> Path | None:
    """diagnostics/{sink_rate,learned_sink_rate,entropy}@L<i> against the layer, one line per
    group (mean over seeds), one panel per statistic present."""
    import re
    stats = [("sink_rate", "first-token share (sink rate)"),
             ("learned_sink_rate", "learned sink's share"), ("entropy", "attention entropy (nats)")]
    panels = []
    for name, label in stats:
        lines: dict[str, dict[int, list[float]]] = {}
        for r in rows:
            if r.get("status") != "done":
                continue
            for k, v in r.items():
                m = re.fullmatch(rf"diagnostics/{name}@L(\d+)", k)
                if m and isinstance(v, (int, float)):
                    lines.setdefault(_group_key({k2: r[k2] for k2 in r["_labels"]}), {}) \
                        .setdefault(int(m[1]), []).append(v)
        if lines:
            panels.append((name, label, lines))
    if not panels:
        return None
    colour = {g: f"C{i}" for i, g in enumerate(sorted({g for *_, lines in panels for g in lines}))}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, label, lines) in zip(axes.flat, panels):
        for g, by_layer in sorted(lines.items()):
            xs = sorted(by_layer)
            ax.plot(xs, [sum(by_layer[x]) / len(by_layer[x]) for x in xs], marker="o", color=colour[g], label=g)
        ax.set_xlabel("layer")
        ax.set_xticks(sorted({x for by in lines.values() for x in by}))
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)  # shares and entropies are >= 0; the top follows the data
        ax.set_title(f"diagnostics/{name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Attention by layer on the validation batches (head means; mean over seeds)")
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def write_report(sweep_dir: str | Path) -> list[Path]:
    """Write report/results.csv, results.md and the figures; returns the files written."""
    from train.logger import write_atomic
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    manifest = read_json(sweep_dir / "sweep.json")
    axes = [a["name"] for a in manifest.get("axes", [])]
    for r, pt in zip(rows, manifest["points"]):
        r["_labels"] = list(pt["labels"])
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(public))
    writer.writeheader()
    writer.writerows(public)
    write_atomic(out / "results.csv", buf.getvalue())
    done = sum(r.get("status") == "done" for r in rows)
    md = (f"# Sweep {manifest['name']}\n\nBase `{manifest['base']}`, overrides `{' '.join(manifest['overrides'])}`; "
          f"{done} of {len(rows)} points done. Columns: params (trainable), flops_per_token (training, "
          f"forward + backward), state_bytes@{STATE_LENGTH} (decode state of one sequence after {STATE_LENGTH} "
          "tokens), final/* (the run's last validation eval), then each suite's metrics.\n\n" + _markdown(public, axes))
    write_atomic(out / "results.md", md)
    written = [out / "results.csv", out / "results.md"]
    plt = _plt()
    recall = _recall_metrics(rows)
    ylabels = {m: "accuracy (fraction correct)" for m in recall}
    ylabels.update({"final/loss": "validation loss (nats/token)", "final/bits_per_byte": "bits per byte"})
    lm = [m for m in ("final/loss", "final/bits_per_byte") if any(isinstance(r.get(m), (int, float)) for r in rows)]
    cells = _mqar_cells(rows)
    share = any("full_share" in r for r in rows)
    ylabels.update({c: "recall accuracy on the answers" for c in cells})
    for made in (
        _metric_panels(plt, rows, recall, "Recall" + (" against the hybrid ratio" if share else ""), ylabels, out / "recall_vs_full_share.png",
                       unit_range=True),
        _metric_panels(plt, rows, lm, "Language modelling" + (" against the hybrid ratio" if share else ""), ylabels, out / "lm_vs_full_share.png"),
        _metric_panels(plt, rows, cells, "MQAR recall by difficulty (kv pairs, sequence length)", ylabels,
                       out / "mqar_by_difficulty.png", per_row=4, unit_range=True),
        _loss_curves(plt, sweep_dir, rows, out / "loss_curves.png"),
        _niah_heatmap(plt, sweep_dir, rows, out / "niah_heatmap.png"),
        _loss_by_position(plt, sweep_dir, rows, out / "loss_by_position.png"),
        _attention_by_layer(plt, rows, out / "attention_by_layer.png"),
    ):
        if made is not None:
            written.append(made)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from train.config import ConfigError
    try:
        written = write_report(args.sweep_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
