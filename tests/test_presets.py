"""Every preset in configs/ builds and trains one step on CPU (batch and length shrunk)."""
import pytest

from train.cli import load_config, preset_names
from train.config import apply_overrides
from train.loop import run


# The bigger presets, and those whose mixers other tests train (the hybrids: tests/models/
# test_linear_hybrids.py; the attention variants: tests/layers/; tiny: every test of
# tests/train/test_loop.py starts from it; mqar: tests/train/test_sweep.py's sweep trains it), are the
# slow extras.
SLOW = ("tiny", "mqar", "gpt125m", "gated_attn", "sigmoid_attn", "mla", "gdn_hybrid", "hgrn2_hybrid", "gla_hybrid", "moba_hybrid", "nsa_hybrid", "titans_hybrid", "titans", "moneta", "yaad",
        "memora", "ttt_linear", "ttt_mlp", "titans_mac", "titans_mag", "titans_mal")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in preset_names()])
def test_preset_trains_one_step(name, tmp_path):
    cfg = apply_overrides(load_config(name), [
        "train.steps=1", "optimizer.warmup_steps=0", "data.batch_size=2", "data.seq_len=64",
        "train.eval_batches=1", "train.grad_accum=1", "runtime.mesh_data=1"])
    summary = run(cfg, tmp_path)
    assert summary["step"] == 1 and summary["eval"]["loss"] > 0
