import json

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
    ("optimizer.warmup_steps=100000", "optimizer.warmup_steps"),
    ("steps", "must look like key.path=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config("tiny"), [override])


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


def test_cli_config_sources(tmp_path):
    cfg, run_dir = parse_args(["--config", "tiny", "train.steps=3", "optimizer.warmup_steps=1"])
    assert cfg.train.steps == 3 and str(run_dir) == "runs/tiny"
    py = tmp_path / "mine.py"
    py.write_text("from train.config import Config\ndef config():\n    return Config(name='mine')\n")
    assert load_config(str(py)).name == "mine"
    js = tmp_path / "config.json"
    js.write_text(json.dumps(to_dict(cfg)))
    assert load_config(str(js)) == cfg
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tiyn")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.py"))
