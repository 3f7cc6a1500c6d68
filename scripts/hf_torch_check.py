"""Run a Hugging Face export through transformers (PyTorch, CPU, float32, eager attention).

    .venv-torch/bin/python scripts/hf_torch_check.py EXPORT_DIR IN.npz OUT.npz [EXPORT_DIR IN.npz OUT.npz ...]

Runs under .venv-torch (scripts/setup_torch.sh), never under .venv: it needs only torch,
transformers and numpy. Several triples share one start-up (importing torch and transformers
takes seconds). For each triple:

    IN.npz    tokens int [B, T] (positions 0..T-1, no padding), and any more `tokens<suffix>`
              batches (other lengths); optional `text`: a string; optional `prompt` int [n]
              with `new_tokens` (a count)
    OUT.npz   logits<suffix> float32 [B, T, V] from AutoModelForCausalLM for each tokens<suffix>;
              `architecture` (the class name); when IN has `text` and the export has
              tokenizer_config.json, `text_ids` int [n]: AutoTokenizer's ids for it (no special
              tokens); when IN has `prompt`, `generated` int [new_tokens]: greedy generation
              through the model's own decode cache (`generate`, do_sample=False)

tests/train/test_hf.py, tests/train/test_hf_hybrids.py and scripts/verify_hf_export.py compare these
with Chimera's own forward, decode and tokenizer.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def check(export_dir: Path, inp: Path, out: Path) -> None:
    data = np.load(inp)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    result = {"architecture": np.array(type(model).__name__)}
    with torch.no_grad():
        for key in data.files:
            if key.startswith("tokens"):
                tokens = torch.from_numpy(data[key].astype(np.int64))
                result["logits" + key[len("tokens"):]] = model(input_ids=tokens).logits.float().numpy()
        if "prompt" in data:
            n = int(data["new_tokens"])
            prompt = torch.from_numpy(data["prompt"].astype(np.int64))[None]
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            result["generated"] = gen[0, prompt.shape[1]:].numpy()
    if "text" in data and (export_dir / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(export_dir)
        result["text_ids"] = np.asarray(tok(str(data["text"]), add_special_tokens=False)["input_ids"], np.int64)
    np.savez(out, **result)


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 3:
        print(__doc__, file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for i in range(0, len(argv), 3):
        check(Path(argv[i]), Path(argv[i + 1]), Path(argv[i + 2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
