"""Check Hugging Face exports against transformers: logits and greedy generation, side by side.

    .venv/bin/python scripts/verify_hf_export.py EXPORT_DIR [EXPORT_DIR ...] [--seq 80] [--new-tokens 32]

For each directory written by `python -m train.export RUN --format hf`: our model (rebuilt from
chimera_config.json and the HF tensors, i.e. through the import) and transformers'
AutoModelForCausalLM (in .venv-torch, scripts/hf_torch_check.py; no custom code) run the same
random tokens (a batch of two rows of --seq tokens and one row of 37, a length no chunk divides)
and generate --new-tokens greedily from the same 8-token prompt, each through its own decode
cache. Prints one row per export: the architecture, the largest logit difference (absolute and
relative to the largest logit) and whether the generations are identical. Exit status 1 when a
difference exceeds 1e-4 relative or a generation differs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", help="export directories (train.export --format hf)")
    p.add_argument("--seq", type=int, default=80, help="tokens per row of the main batch (default 80, >= 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate (default 32)")
    p.add_argument("--torch-python", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    args = p.parse_args(argv)
    import jax.numpy as jnp

    from train.export import load_exported
    from train.generate import Decoder
    from train.sampling import SamplingSettings

    rng = np.random.default_rng(0)
    tmp = tempfile.TemporaryDirectory(prefix="verify_hf_")
    work = Path(tmp.name)
    models, inputs, cli = {}, {}, []
    for i, d in enumerate(map(Path, args.exports)):
        cfg, model = load_exported(d)
        v = cfg.model.vocab_size
        batch = {"tokens": rng.integers(0, v, (2, args.seq)).astype(np.int32),
                 "tokens2": rng.integers(0, v, (1, 37)).astype(np.int32),  # a length no chunk divides
                 "prompt": rng.integers(0, v, 8).astype(np.int32), "new_tokens": args.new_tokens}
        np.savez(work / f"{i}-in.npz", **batch)
        models[i], inputs[i] = model, batch
        cli += [str(d), str(work / f"{i}-in.npz"), str(work / f"{i}-out.npz")]
    proc = subprocess.run([args.torch_python, str(ROOT / "scripts" / "hf_torch_check.py"), *cli],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 2
    ok = True
    print(f"{'export':<48} {'architecture':<24} {'max |dlogit|':>12} {'relative':>9}  greedy {args.new_tokens}")
    for i, d in enumerate(args.exports):
        model, batch = models[i], inputs[i]
        theirs = np.load(work / f"{i}-out.npz")
        worst, rel = 0.0, 0.0
        for key in ("tokens", "tokens2"):
            toks = jnp.asarray(batch[key])
            pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
            ours = np.asarray(model(toks, positions=pos, segment_ids=jnp.ones_like(pos))[0])
            diff = float(np.abs(ours - theirs["logits" + key[len("tokens"):]]).max())
            worst, rel = max(worst, diff), max(rel, diff / float(np.abs(ours).max()))
        gen = np.concatenate(list(Decoder(model, SamplingSettings(temperature=0.0)).generate(
            batch["prompt"], args.new_tokens)))
        same = bool(np.array_equal(gen, theirs["generated"]))
        ok &= same and rel <= 1e-4
        print(f"{str(d)[-48:]:<48} {str(theirs['architecture']):<24} {worst:>12.2e} {rel:>9.1e}  "
              f"{'identical' if same else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
