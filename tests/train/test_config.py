import json
from pathlib import Path
import re

import pytest

from train.cli import load_config, parse_args, preset_names
from train.config import (AttentionConfig, Config, ConfigError, DataConfig, ModelConfig, apply_overrides,
                          from_dict, to_dict)


def test_every_preset_loads_and_round_trips_through_json():
    assert {"tiny", "gpt125m", "mqar"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        again = from_dict(Config, json.loads(json.dumps(to_dict(cfg))))
        assert again == cfg


def test_overrides_apply_and_parse_types():
    cfg = apply_overrides(load_config("tiny"), [
        "train.steps=7", "optimizer.warmup_steps=2", "model.pattern=swa,attn", "model.mixers.swa.window=16",
        "optimizer.grad_clip=None", "model.tie_embeddings=false", "optimizer.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.model.pattern == ("swa", "attn")
    assert cfg.model.mixers["swa"].window == 16 and cfg.optimizer.grad_clip is None
    assert cfg.model.tie_embeddings is False and cfg.optimizer.lr == 1e-3


@pytest.mark.parametrize("override, message", [
    ("model.d_modle=3", "did you mean 'd_model'"),
    ("trian.steps=3", "did you mean 'train'"),
    ("train.steps=ten", "train.steps: expected an int"),
    ("data.source=web", "choose one of"),
    ("model.mixers.attn.num_heads=3", "does not divide model.d_model"),
    ("model.mixers.attn.num_kv_heads=3", "must divide"),
    ("model.pattern=swa,linformer", "mixer 'linformer', which is not defined"),
    ("model.mixers.nope.window=3", "no mixer named 'nope'"),
    ("train.grad_accum=3", "must divide data.batch_size"),
    ("runtime.attention_block_q=100", "power of two"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps must be >= 0"),
    ("steps", "must look like key.path=value"),
    ("model.pattern=swa,swa,swa,swa,swa,attn", "model.pattern has 6 mixers .* model.num_layers=4"),
    ("model.mixers.wide.kind=atention", "kind='atention' is not registered.*did you mean 'attention'"),
    ("model.mixers.wide.window=8", "declare it first with model.mixers.wide.kind=KIND"),
    ("model.mixers.wide=7", "the whole mixer as JSON with a kind"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config("tiny"), [override])


@pytest.mark.parametrize("field, value", [
    ("lr", "NaN"), ("lr", "Infinity"), ("lr", "0"), ("lr", "-1"),
    ("b1", "1.0"), ("b1", "-0.1"), ("b2", "1.0"),
    ("eps", "0"), ("eps", "NaN"),
    ("weight_decay", "-1"), ("weight_decay", "NaN"),
    ("grad_clip", "0"), ("grad_clip", "inf"), ("grad_clip", "Infinity"),
    ("min_lr_ratio", "1.5"), ("decay_fraction", "0"), ("warmup_steps", "-1"),
])
def test_bad_optimizer_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^optimizer\.{field} must be "):
        apply_overrides(load_config("tiny"), [f"optimizer.{field}={value}"])


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_bad_train_steps_name_train_steps(steps):
    with pytest.raises(ConfigError, match=rf"^train\.steps must be >= 1, got {steps}$"):
        apply_overrides(load_config("tiny"), [f"train.steps={steps}"])


def test_short_run_of_a_preset_keeps_its_longer_warmup():
    cfg = apply_overrides(load_config("tiny"), ["train.steps=20"])
    assert cfg.optimizer.warmup_steps > cfg.train.steps


@pytest.mark.parametrize("overrides, message", [
    (["data.paths=a.txt"], "data.paths is set but data.source='stdlib'; add data.source=files (or drop data.paths)"),
    (["data.source=mqar", "data.paths=a.txt"], "data.paths is set but data.source='mqar'"),
    (["data.tfds_name=imdb_reviews"],
     "data.tfds_name is set but data.source='stdlib'; add data.source=tfds (or drop data.tfds_name)"),
    (["data.source=files", "data.paths=a.txt", "data.tfds_data_dir=/tmp"], "data.tfds_data_dir is set but data.source='files'"),
])
def test_data_fields_of_another_source_are_refused(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        apply_overrides(load_config("tiny"), overrides)


@pytest.mark.parametrize("override, message", [
    ("runtime.attention_impl=flash",
     "runtime.attention_impl: 'flash' is not accepted; choose one of ['xla', 'reference', 'gpu', 'tpu', 'block_sparse'] or null"),
    ("model.vocab_size=x", "model.vocab_size: expected an int or null, got 'x'"),
    ("optimizer.grad_clip=abc", "optimizer.grad_clip: expected a float or null, got 'abc'"),
])
def test_union_errors_list_what_each_arm_accepts(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        apply_overrides(load_config("tiny"), [override])


def test_mixer_names_are_declared_on_the_command_line():
    cfg = apply_overrides(load_config("tiny"), [
        "model.mixers.swa_wide.kind=attention", "model.mixers.swa_wide.window=1024",
        'model.mixers.g2={"kind": "gla", "num_heads": 2}', "model.pattern=swa_wide,g2,swa,attn"])
    m = cfg.model
    assert m.mixer("swa_wide") == AttentionConfig(window=1024)
    assert m.mixer("g2").kind == "gla" and m.mixer("g2").num_heads == 2
    # the preset's own and the built-in names are still there
    assert m.mixer("swa").window == 64 and m.mixer("attn").num_kv_heads == 2 and m.mixer("gdn").kind == "gdn"
    # the same kind keeps the fields; another kind starts from that kind's defaults
    same = apply_overrides(cfg, ["model.mixers.swa.kind=attention"])
    assert same.model.mixer("swa").window == 64
    other = apply_overrides(cfg, ["model.mixers.swa.kind=gdn", "model.mixers.swa.num_heads=2"])
    assert other.model.mixer("swa").kind == "gdn" and other.model.mixer("swa").num_heads == 2
    again = from_dict(Config, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def test_pattern_longer_than_the_depth_is_refused_in_presets_too():
    with pytest.raises(ConfigError, match="model.pattern has 3 mixers"):
        ModelConfig(num_layers=2, pattern=("gla", "gla", "attn")).check()


def test_from_dict_rejects_unknown_kind_and_keys():
    with pytest.raises(ConfigError, match="kind='nope' is not registered"):
        from_dict(ModelConfig, {"mixers": {"x": {"kind": "nope"}}})
    with pytest.raises(ConfigError, match="unknown config key 'data.seqlen'"):
        from_dict(Config, {"data": {"seqlen": 3}})


def test_mixer_lookup_and_layer_names():
    m = ModelConfig(num_layers=5, pattern=("swa", "swa", "attn"),
                    mixers={"wide": AttentionConfig(window=512)})
    assert m.layer_names() == ("swa", "swa", "attn", "swa", "swa")
    assert m.mixer("wide").window == 512 and m.mixer("attn").window is None
    assert m.hidden % 64 == 0


def test_data_checks():
    with pytest.raises(ConfigError, match="data.paths"):
        Config(data=DataConfig(source="files"))
    with pytest.raises(ConfigError, match="tfds_name"):
        Config(data=DataConfig(source="tfds"))
    with pytest.raises(ConfigError, match="data.paths is set"):
        Config(data=DataConfig(paths=("a.txt",)))


def test_cli_config_sources(tmp_path):
    cfg, run_dir, from_scratch = parse_args(["--config", "tiny", "train.steps=3", "optimizer.warmup_steps=1"])
    assert cfg.train.steps == 3 and str(run_dir) == "runs/tiny" and not from_scratch
    py = tmp_path / "mine.py"
    py.write_text("from train.config import Config\ndef config():\n    return Config(name='mine')\n")
    assert load_config(str(py)).name == "mine"
    js = tmp_path / "config.json"
    js.write_text(json.dumps(to_dict(cfg)))
    assert load_config(str(js)) == cfg
    # a run's own config.json continues that run: its directory is the default --run-dir
    assert parse_args(["--config", str(js)])[1] == Path("runs/tiny")  # not a run directory (yet)
    (tmp_path / "checkpoints").mkdir()
    assert parse_args(["--config", str(js)])[1] == tmp_path
    assert parse_args(["--config", str(js), "--run-dir", "elsewhere"])[1] == Path("elsewhere")
    bad = tmp_path / "bad" / "config.json"
    bad.parent.mkdir()
    bad.write_text('{"train": {"steps": 3,}}')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON \(line 1, column 23"):
        load_config(str(bad))
    bad.write_text('[1, 2]')
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tiyn")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.py"))
