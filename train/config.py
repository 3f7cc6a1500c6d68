"""Typed, frozen experiment configuration.

A `Config` is six sections: `model` (what the network computes, including one config per
token mixer in `model.mixers`), `data`, `optimizer`, `train` (the loop), and `runtime` (how it is
computed: dtype, remat, op implementations, block sizes). Architecture never depends on runtime.

Configs are plain frozen dataclasses. `from_dict` / `to_dict` convert to and from JSON-able dicts
(mixer configs carry a `kind` tag), and `apply_overrides` applies `key.path=value` strings from the
command line. Every error names the field and what is accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

# The base types and the mixer configs live on the floors that use them (layers/config.py,
# layers/<family>/config.py, models/config.py); they are re-exported here, the run's one
# config namespace.
from layers.attention.config import AttentionConfig
from layers.config import (DEFAULT_MIXERS, MIXER_CONFIG_KINDS, ConfigError, HeadsConfig,
                           MixerConfig, RuntimeConfig, check_literals, register_mixer_config,
                           suggest)
from models.config import ModelConfig

__all__ = [
    "ConfigError", "MixerConfig", "AttentionConfig", "ModelConfig", "DataConfig", "MQARConfig",
    "OptimizerConfig", "TrainConfig", "RuntimeConfig", "Config", "register_mixer_config", "HeadsConfig",
    "check_literals",
    "from_dict", "to_dict", "apply_overrides", "read_config_json",
]


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall (Zoology): key/value pairs, then queries of those keys.

    Tokens: keys are drawn from [1, vocab/2), values from [vocab/2, vocab); 0 pads. Each query
    key appears after the pairs at a gap drawn from a power law (exponent `power_a`), and the
    model must predict its value: loss and accuracy count only those answer positions.
    """
    vocab_size: int = 8192
    num_kv_pairs: int = 8
    power_a: float = 0.01
    num_train_examples: int = 100_000
    num_eval_examples: int = 1_000


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are packed into [batch, seq_len] rows.

    source:
      stdlib  the Python standard library's own .py files (no download), split by file
      mqar    synthetic multi-query associative recall (see MQARConfig)
      files   local .txt / .jsonl files or directories in `paths` (JSONL: field `text_key`)
      tfds    `tfds.data_source(tfds_name)` (array_record), feature `text_key`
      shards  directories made by `python -m train.prepare_data`, in `paths`, streamed by grain
              (train.data.shards): nothing is tokenized or held in memory at start-up, each
              host reads only the rows of its own devices, `workers` worker processes
    paths belongs to sources files and shards, tfds_name and tfds_data_dir to source tfds,
      mixture, eval_paths and workers to source shards; setting one with another source is an
      error (it would be silently ignored).
    mixture: one weight per shard directory in `paths` (a row comes from directory i with
      probability w_i / sum w); empty = in proportion to their training tokens.
    eval_paths: shard directories read whole as the validation data, instead of the held-out
      validation split of each directory in `paths`.
    tokenizer: "byte" (256 ids), or a path to a local tokenizer.json (HF tokenizers) or a
      SentencePiece .model file.
    """
    source: Literal["stdlib", "mqar", "files", "tfds", "shards"] = "stdlib"
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step (split over train.grad_accum micro-steps)
    tokenizer: str = "byte"
    paths: tuple[str, ...] = ()
    text_key: str = "text"
    # stdlib / files: share held out for validation, by file hash (or, when that leaves a split
    # empty, e.g. one document, the last share of every document's tokens)
    val_fraction: float = 0.05
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    mixture: tuple[float, ...] = ()
    eval_paths: tuple[str, ...] = ()
    workers: int = 0  # grain worker processes reading shards (0: a reader thread in this process)
    mqar: MQARConfig = field(default_factory=MQARConfig)

    def check(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.source == "files" and not self.paths:
            raise ConfigError("data.source='files' needs data.paths (files or directories)")
        if self.source == "shards" and not self.paths:
            raise ConfigError("data.source='shards' needs data.paths (directories made by python -m "
                              "train.prepare_data)")
        if self.source == "tfds" and not self.tfds_name:
            raise ConfigError("data.source='tfds' needs data.tfds_name")
        for name, sources in (("paths", ("files", "shards")), ("tfds_name", ("tfds",)), ("tfds_data_dir", ("tfds",)),
                              ("mixture", ("shards",)), ("eval_paths", ("shards",)), ("workers", ("shards",))):
            if getattr(self, name) and self.source not in sources:
                raise ConfigError(f"data.{name} is set but data.source={self.source!r}; "
                                  f"add data.source={sources[0]} (or drop data.{name})")
        if self.mixture and (len(self.mixture) != len(self.paths) or not all(
                math.isfinite(w) and w >= 0 for w in self.mixture) or not sum(self.mixture) > 0):
            raise ConfigError(f"data.mixture={list(self.mixture)} must hold one finite weight >= 0 per directory "
                              f"of data.paths ({len(self.paths)}), not all zero")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.source == "mqar":
            m = self.mqar
            need = 2 * m.num_kv_pairs + 2 * m.num_kv_pairs
            if self.seq_len < need:
                raise ConfigError(f"data.seq_len={self.seq_len} is too short for "
                                  f"data.mqar.num_kv_pairs={m.num_kv_pairs}; need >= {need}")
            if m.vocab_size < 4 * m.num_kv_pairs:
                raise ConfigError(f"data.mqar.vocab_size={m.vocab_size} must be >= "
                                  f"4 * num_kv_pairs = {4 * m.num_kv_pairs}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then `schedule`: cosine to min_lr_ratio * lr, warmup-stable-decay
    (constant, then a linear decay over the last `decay_fraction` of training), or constant."""
    lr: float = 3e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    # Linear warmup steps. A value above train.steps (a short run of a preset) is accepted: the
    # warmup then lasts train.steps // 10 steps instead (train.optim.effective_warmup).
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # global-norm clipping; None disables

    def check(self) -> None:
        check_literals(self, "optimizer")
        finite = math.isfinite
        for name, ok, accepted in (
            ("lr", finite(self.lr) and self.lr > 0, "finite and > 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("decay_fraction", 0 < self.decay_fraction <= 1, "in (0, 1]"),
            ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
            ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
            ("eps", finite(self.eps) and self.eps > 0, "finite and > 0"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "finite and >= 0"),
            ("grad_clip", self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip > 0),
             "finite and > 0, or None"),
        ):
            if not ok:
                raise ConfigError(f"optimizer.{name} must be {accepted}, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    grad_accum: int = 1  # micro-batches per step; data.batch_size must divide evenly
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 8
    # Attention diagnostics (sink rate, entropy, largest activation; train/evals/diagnostics.py)
    # on the eval batches every this many steps, logged to metrics.jsonl and TensorBoard; 0: off.
    diagnostics_every: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # Warm start: a Hugging Face checkpoint directory (safetensors) of an importable architecture whose weights
    # initialise the model when the run has no checkpoint yet (train/hf/).
    init_from: str | None = None

    def check(self, batch_size: int) -> None:
        for name in ("steps", "grad_accum", "log_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "diagnostics_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum={self.grad_accum} must divide data.batch_size={batch_size}")


@dataclass(frozen=True)
class Config:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        self.model.check()
        self.data.check()
        self.train.check(self.data.batch_size)
        self.optimizer.check()
        self.runtime.check()
        for name in dict.fromkeys(self.model.pattern):
            self.model.mixer(name).check_runtime(self.runtime, f"model.mixers.{name}")


# ----------------------------------------------------------------------------- conversion

_ACCEPTS = {int: "an int", float: "a float", str: "a string", bool: "a bool (true/false)", type(None): "null"}


def _accepts(tp) -> str:
    """What values of type `tp` look like, for error messages: "an int", "one of [...]", ..."""
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return _ACCEPTS.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check / coerce a JSON-like `value` to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError:
                pass
        accepts = " or ".join(_accepts(a) for a in args)
        if typing.get_origin(args[0]) is Literal:
            raise ConfigError(f"{where}: {value!r} is not accepted; choose {accepts}")
        raise ConfigError(f"{where}: expected {accepts}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not accepted; choose one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_convert(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.get_origin(Mapping[str, int])):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, MixerConfig):
        if isinstance(value, MixerConfig):
            return value
        if not isinstance(value, Mapping) or "kind" not in value:
            raise ConfigError(f"{where}: a mixer config needs a 'kind' among {sorted(MIXER_CONFIG_KINDS)}")
        kind = value["kind"]
        if kind not in MIXER_CONFIG_KINDS:
            raise ConfigError(f"{where}.kind={kind!r} is not registered; known kinds: "
                              f"{sorted(MIXER_CONFIG_KINDS)}{suggest(kind, MIXER_CONFIG_KINDS)}")
        return from_dict(MIXER_CONFIG_KINDS[kind], {k: v for k, v in value.items() if k != "kind"}, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def from_dict(cls, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) mapping, checking every key and type."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}{suggest(key, fields)}; "
                              f"accepted: {sorted(fields)}")
        kwargs[key] = _convert(value, fields[key][1], path)
    return cls(**kwargs)


def read_config_json(path) -> "Config":
    """The Config saved in a JSON file (a run's config.json); ConfigError naming the file when
    it is missing, not JSON, or holds an invalid config."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                          "fix or remove it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of config sections, got {type(data).__name__}")
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(obj: Any) -> Any:
    """JSON-able nested dict; mixer configs carry their `kind`."""
    if isinstance(obj, MixerConfig):
        return {"kind": obj.kind, **{f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _parse_literal(text: str) -> Any:
    """Command-line values: JSON when it parses (numbers, true/false, null, lists), else a string."""
    if text in ("None", "none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_in_dict(d: dict, cls: type, keys: list[str], raw: str, where: str) -> None:
    """Set keys[...] of `d` (the to_dict form of a `cls`) from the command-line text `raw`,
    checking the key and converting the value with the field's type."""
    key, rest = keys[0], keys[1:]
    path = f"{where}.{key}" if where else key
    fields = _fields(cls)
    if key not in fields:
        raise ConfigError(f"unknown config key {path!r}{suggest(key, fields)}; accepted: {sorted(fields)}")
    tp = fields[key][1]
    if not rest:
        d[key] = to_dict(_convert(_parse_literal(raw), tp, path))
        return
    if dataclasses.is_dataclass(tp):
        _set_in_dict(d[key], tp, rest, raw, path)
        return
    if key != "mixers" or cls is not ModelConfig:
        raise ConfigError(f"{path!r} has no fields; set it directly: {path}=...")
    name, rest = rest[0], rest[1:]  # model.mixers.<name>[.<field>]
    mixers, mpath = d[key], f"{path}.{name}"
    if not rest or rest == ["kind"]:
        # A whole mixer (JSON with a kind) or a kind: declares the name, or replaces its config
        # by that kind's defaults when the kind changes. Built-in names stay defined either way.
        value = _parse_literal(raw) if not rest else {"kind": raw}
        if not rest and not isinstance(value, Mapping):
            raise ConfigError(f"{mpath}: set a field of the mixer ({mpath}.window=256), its kind "
                              f"({mpath}.kind=attention) or the whole mixer as JSON with a kind")
        current = mixers.get(name) or (to_dict(DEFAULT_MIXERS[name]) if name in DEFAULT_MIXERS else None)
        if rest and current is not None and current["kind"] == raw:
            mixers[name] = current
            return
        mixers[name] = to_dict(_convert(value, MixerConfig, mpath))
        return
    if name not in mixers:
        if name not in DEFAULT_MIXERS:
            known = set(mixers) | set(DEFAULT_MIXERS)
            raise ConfigError(f"{mpath}: no mixer named {name!r}; declare it first with "
                              f"{mpath}.kind=KIND (kinds: {sorted(MIXER_CONFIG_KINDS)}), or use one of "
                              f"{sorted(known)}{suggest(name, known)}")
        mixers[name] = to_dict(DEFAULT_MIXERS[name])
    _set_in_dict(mixers[name], MIXER_CONFIG_KINDS[mixers[name]["kind"]], rest, raw, mpath)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b.c=value` strings in order, then build and validate the result once (so that
    cross-section checks, like grad_accum dividing batch_size, see every override)."""
    d = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_in_dict(d, Config, keys, raw.strip(), "")
    return from_dict(Config, d)

