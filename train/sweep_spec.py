"""Sweep specifications: a small TOML (or Python) file -> the list of points to run.

A spec names a base config, the axes to vary and the evaluations to run on every point:

    name = "hybrid_ratio"            # optional; default: the file's name
    base = "mqar"                    # a preset, a .py file or a config.json (as `python -m train --config`)
    overrides = ["train.steps=300"]  # applied to the base before the axes (key.path=value)
    evals = ["mqar"]                 # suites of `python -m train.eval --suite`, run after training
    seeds = [0, 1]                   # shorthand for an axis "seed" over train.seed

    [ratio]                          # shorthand: an axis "ratio" of patterns for a fixed depth
    layers = 8                       # model.num_layers of every point
    linear = "lin"                   # mixer name of the linear layers
    full = "attn"                    # mixer name of the full-attention layers
    values = ["1:0", "6:1", "3:1", "1:1", "0:1"]   # linear:full
    place = "last"                   # optional: full layers end each group ("first": start it)

    [[axis]]                         # an axis over one field ...
    name = "mixer"                   # optional; default: the field's last part
    field = "model.mixers.lin.kind"
    values = ["gdn", "gla", "hgrn2"]

    [[axis]]                         # ... or over labelled sets of overrides
    name = "width"
    values = { small = ["model.d_model=64"], large = ["model.d_model=128", "model.mixers.attn.num_heads=4"] }

Points are the product of the axes: seeds vary slowest, then the [[axis]] entries in the order
written, then the ratio fastest, so a sweep cut short has whole ratio curves of its first seed. A `.py` spec defines a
dict `SWEEP` with the same keys (or a function `sweep()` returning one), for specs that are
easier to compute than to write.

The ratio shorthand spreads f = round(layers * full / (linear + full)) full-attention layers
evenly: each ends one of f equal groups, so 3:1 over 8 layers is lin lin lin attn lin lin lin
attn, as the hybrid-linear-attention study schedules them (repeat([Lin] * r + [Full])); when full
layers are the majority, the linear ones start equal groups instead (1:2 over 6: lin attn attn
lin attn attn). The pattern is shortened to its period when it repeats, so the
stack scans over repeated periods (one compile for any depth).

Points whose resolved configs are the same (the all-attention point of every linear mixer, say:
mixers that no layer uses do not count) share one run directory, named by their labels with
"any" where they differ (ratio-0to1_mixer-any_seed-0).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.config import Config, ConfigError, apply_overrides, to_dict

__all__ = ["Point", "SweepSpec", "load_spec", "ratio_pattern", "parse_ratio", "expand", "config_hash"]

_SPEC_KEYS = {"name", "base", "overrides", "evals", "seeds", "ratio", "axis"}


@dataclass(frozen=True)
class Axis:
    name: str
    labels: tuple[str, ...]
    overrides: tuple[tuple[str, ...], ...]  # one override list per label
    extra: tuple[dict, ...] = ()  # per label: more labels (the ratio's full_share)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: str
    overrides: tuple[str, ...] = ()
    evals: tuple[str, ...] = ()
    axes: tuple[Axis, ...] = ()
    source: str = ""  # the spec file


@dataclass
class Point:
    """One point of the sweep: its axis labels, the overrides that make it, and its run."""
    labels: dict[str, str]  # axis name -> label
    overrides: list[str]
    cfg: Config | None = None
    run: str = ""  # run directory name under SWEEP_DIR/runs (shared by points with the same config)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. full_share of a ratio point

    @property
    def name(self) -> str:
        return point_name(self.labels)


def point_name(labels: dict[str, Any]) -> str:
    """A directory-safe name: mixer-gdn_ratio-3to1_seed-0."""
    parts = []
    for k, v in labels.items():
        text = f"{k}-{v}".replace(":", "to")
        parts.append(re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-"))
    return "_".join(parts) or "base"


def parse_ratio(text: str, where: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m or (int(m[1]) == 0 and int(m[2]) == 0):
        raise ConfigError(f"{where}: {text!r} is not a linear:full ratio like '3:1', '1:0' or '0:1'")
    return int(m[1]), int(m[2])


def _round(x: float) -> int:
    return int(x + 0.5)  # halves up (Python's round() goes to even)


def ratio_pattern(layers: int, linear: str, full: str, ratio: tuple[int, int],
                  place: str = "last") -> tuple[str, ...]:
    """The layer names of `layers` layers at linear:full `ratio`, full layers spread evenly and
    each ending its group (place="last") or starting it (place="first": the same stack
    reversed); cut to the shortest period that repeats to the whole stack."""
    lin, ful = ratio
    f = _round(layers * ful / (lin + ful))
    if ful and not f:
        f = 1  # a nonzero share never rounds to no attention at all
    if lin and f == layers:
        f = layers - 1
    if f <= layers - f:  # the full layers are the fewer: each ends one of f equal groups
        full_at = {_round((k + 1) * layers / f) - 1 for k in range(f)}
    else:  # the linear layers are the fewer: each starts one of l equal groups
        n_lin = layers - f
        lin_at = {_round(k * layers / n_lin) for k in range(n_lin)}
        full_at = set(range(layers)) - lin_at
    names = tuple(full if i in full_at else linear for i in range(layers))
    if place == "first":
        names = names[::-1]
    for p in range(1, layers + 1):
        if layers % p == 0 and names == names[:p] * (layers // p):
            return names[:p]
    return names


def _as_list(value, where: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"{where}: expected a list, got {value!r}")


def _override_text(fieldname: str, value) -> str:
    if isinstance(value, (list, tuple)):
        return f"{fieldname}={','.join(str(v) for v in value)}"
    if isinstance(value, (dict, bool)) or value is None:
        return f"{fieldname}={json.dumps(value)}"
    return f"{fieldname}={value}"


def _axis(raw: dict, where: str) -> Axis:
    unknown = set(raw) - {"name", "field", "values"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; an axis has name, field and values")
    if "values" not in raw:
        raise ConfigError(f"{where}: an axis needs values (a list, with field; or label -> overrides)")
    values = raw["values"]
    if "field" in raw:
        fieldname = str(raw["field"])
        vals = _as_list(values, f"{where}.values")
        name = raw.get("name", fieldname.rsplit(".", 1)[-1])
        labels = tuple(",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in vals)
        return Axis(name, labels, tuple((_override_text(fieldname, v),) for v in vals))
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: without field, values must map labels to lists of key.path=value overrides")
    if "name" not in raw:
        raise ConfigError(f"{where}: an axis of override sets needs a name")
    overrides = []
    for label, items in values.items():
        items = [items] if isinstance(items, str) else _as_list(items, f"{where}.values.{label}")
        overrides.append(tuple(str(i) for i in items))
    return Axis(str(raw["name"]), tuple(str(k) for k in values), tuple(overrides))


def _ratio_axis(raw: dict, where: str) -> Axis:
    need, optional = {"layers", "linear", "full", "values"}, {"place"}
    if not need <= set(raw) <= need | optional:
        raise ConfigError(f"{where}: the ratio shorthand takes {sorted(need)} and optionally place, got {sorted(raw)}")
    place = raw.get("place", "last")
    if place not in ("last", "first"):
        raise ConfigError(f"{where}.place={place!r} is not accepted; choose 'last' (full attention ends each "
                          "group, the study's layout) or 'first'")
    layers = raw["layers"]
    if not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"{where}.layers must be an int >= 1, got {layers!r}")
    labels, overrides, extra = [], [], []
    full = str(raw["full"])
    for v in _as_list(raw["values"], f"{where}.values"):
        r = parse_ratio(v, f"{where}.values")
        pattern = ratio_pattern(layers, str(raw["linear"]), full, r, place)
        labels.append(f"{r[0]}:{r[1]}")
        overrides.append((f"model.pattern={','.join(pattern)}", f"model.num_layers={layers}"))
        extra.append({"full_share": pattern.count(full) / len(pattern)})
    return Axis("ratio", tuple(labels), tuple(overrides), tuple(extra))


def spec_from_dict(raw: dict, *, default_name: str, source: str = "") -> SweepSpec:
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{source or 'sweep spec'}: unknown keys {sorted(unknown)}; accepted: {sorted(_SPEC_KEYS)}")
    if "base" not in raw:
        raise ConfigError(f"{source or 'sweep spec'}: needs base = a preset, .py or config.json")
    where = source or "spec"
    axes = []
    for i, a in enumerate(_as_list(raw.get("axis", []), f"{where}: axis")):
        if not isinstance(a, dict):
            raise ConfigError(f"{where}: axis[{i}] must be a table with name, field, values")
        axes.append(_axis(a, f"{where}: axis[{i}]"))
    if "ratio" in raw:  # after the axes: each mixer's whole ratio curve comes before the next mixer
        axes.append(_ratio_axis(raw["ratio"], f"{where}: ratio"))
    if "seeds" in raw:
        seeds = _as_list(raw["seeds"], f"{where}: seeds")
        axes.append(Axis("seed", tuple(str(s) for s in seeds), tuple((f"train.seed={s}",) for s in seeds)))
    names = [a.name for a in axes]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{where}: axis names must differ, {sorted(dup)} repeats (give each axis a name)")
    for a in axes:
        if len(set(a.labels)) != len(a.labels):
            raise ConfigError(f"{where}: axis {a.name!r} repeats a value: {list(a.labels)}")
    return SweepSpec(name=str(raw.get("name", default_name)), base=str(raw["base"]),
                     overrides=tuple(str(o) for o in _as_list(raw.get("overrides", []), f"{where}: overrides")),
                     evals=tuple(str(e) for e in _as_list(raw.get("evals", []), f"{where}: evals")),
                     axes=tuple(axes), source=source)


def load_spec(path: str | Path) -> SweepSpec:
    """Read a .toml or .py sweep spec; ConfigError naming the file and the key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep spec (a .toml or .py file)")
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    elif path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"chimera_sweep_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        raw = module.sweep() if hasattr(module, "sweep") else getattr(module, "SWEEP", None)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a .py spec defines a dict SWEEP (or sweep() returning one)")
    else:
        raise ConfigError(f"{path}: a sweep spec is a .toml or .py file")
    return spec_from_dict(raw, default_name=path.stem, source=str(path))


def config_hash(cfg: Config) -> str:
    """Identity of what a run computes and trains on: the config without its name and without
    mixer configs that no layer uses (12 hex digits)."""
    d = to_dict(cfg)
    d.pop("name", None)
    used = set(cfg.model.layer_names())
    d["model"]["mixers"] = {k: v for k, v in d["model"]["mixers"].items() if k in used}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def expand(spec: SweepSpec, load_config) -> list[Point]:
    """Every point of the sweep with its resolved config and run name (ConfigError naming the
    point on an invalid combination). `load_config(base) -> Config` reads the base."""
    base = load_config(spec.base)
    try:
        base = apply_overrides(base, list(spec.overrides))
    except ConfigError as e:
        raise ConfigError(f"{spec.source or spec.name}: overrides: {e}") from None
    points, runs = [], {}
    # Seeds vary slowest: a sweep cut short has every point of the first seed, not every seed
    # of the first points. Labels and overrides keep the spec's axis order.
    order = sorted(range(len(spec.axes)), key=lambda i: spec.axes[i].name != "seed")
    for picked in itertools.product(*[range(len(spec.axes[i].labels)) for i in order]):
        combo = [picked[order.index(i)] for i in range(len(spec.axes))]
        labels, overrides = {}, []
        for a, i in zip(spec.axes, combo):
            labels[a.name] = a.labels[i]
            overrides += a.overrides[i]
        extra = {k: v for a, i in zip(spec.axes, combo) if a.extra for k, v in a.extra[i].items()}
        p = Point(labels=labels, overrides=overrides, extra=extra)
        try:
            cfg = apply_overrides(base, overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep point {p.name}: {e}") from None
        p.cfg = cfg
        runs.setdefault(config_hash(cfg), []).append(p)
        points.append(p)
    for shared in runs.values():
        # A run several points share is named by their labels, "any" where they differ:
        # ratio-0to1_mixer-any_seed-0 for the all-attention point of every linear mixer.
        labels = {k: (v if all(q.labels[k] == v for q in shared) else "any") for k, v in shared[0].labels.items()}
        for q in shared:
            q.run = point_name(labels)
            q.cfg = dataclasses.replace(q.cfg, name=f"{spec.name}-{q.run}")
    return points
