"""Turn a Hugging Face model directory into a Chimera config that warm-starts from its weights.

    python -m train.import_hf HF_DIR --out CONFIG.json [key.path=value ...]
    python -m train --config CONFIG.json --run-dir runs/ft

The config's model section comes from HF_DIR/config.json (train/hf/: llama, mistral,
ministral, qwen2, qwen3, gpt_oss, deepseek_v3, xlstm, qwen3_next, bamba), `train.init_from` is HF_DIR (the train loop loads its safetensors
into the fresh model when the run has no checkpoint yet, via `train.hf.import_params`), and
`data.tokenizer` is the directory's tokenizer: "byte" for a Chimera byte-tokenizer export
(tokenizer_byte.json), else its tokenizer.json (HF tokenizers) or tokenizer.model
(SentencePiece). Everything else is Config's defaults, changed by the key.path=value overrides
(e.g. data.source=files data.paths=corpus/ train.steps=2000 optimizer.lr=3e-4).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

from train.config import Config, ConfigError, DataConfig, TrainConfig, apply_overrides, to_dict
from train.hf import model_config_from_hf


def tokenizer_spec(hf_dir: Path) -> str | None:
    """data.tokenizer for the tokenizer files in hf_dir, or None when there are none."""
    if (hf_dir / "tokenizer_byte.json").is_file():
        return "byte"
    for name in ("tokenizer.json", "tokenizer.model"):
        if (hf_dir / name).is_file():
            return str(hf_dir / name)
    return None


def import_config(hf_dir: str | Path, overrides: Iterable[str] = ()) -> Config:
    """The Config that trains the model of hf_dir from its weights (see the module docstring)."""
    hf_dir = Path(hf_dir).absolute()
    model = model_config_from_hf(hf_dir)
    tok = tokenizer_spec(hf_dir)
    data = DataConfig() if tok is None else DataConfig(tokenizer=tok)
    cfg = Config(name=hf_dir.name, model=model, data=data, train=TrainConfig(init_from=str(hf_dir)))
    return apply_overrides(cfg, list(overrides))


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.import_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="the Chimera config JSON to write")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="any config field")
    # intermixed: overrides may come after --out as well as before it
    args = p.parse_intermixed_args(None if argv is None else list(argv))
    try:
        cfg = import_config(args.hf_dir, args.overrides)
    except ConfigError as e:
        print(f"import error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    m = cfg.model
    print(f"wrote {out}: d_model={m.d_model}, {m.num_layers} layers, pattern {'/'.join(m.pattern)}, "
          f"vocab {m.vocab_size}, tokenizer {cfg.data.tokenizer}, init_from {cfg.train.init_from}")
    if tokenizer_spec(Path(args.hf_dir)) is None:
        print(f"note: {args.hf_dir} has no tokenizer file; data.tokenizer is {cfg.data.tokenizer!r}",
              file=sys.stderr)
    print(f"train it: python -m train --config {out} --run-dir runs/{cfg.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
