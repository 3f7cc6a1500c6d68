"""The README's two commands are what CI and a newcomer run; keep them and .ci/run in step."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in first_block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_the_two_commands():
    cmds = readme_commands()
    assert cmds == ["bash scripts/setup.sh && .venv/bin/python -m train",
                    "bash scripts/setup.sh && bash scripts/setup_torch.sh && .venv/bin/python -m pytest"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


@pytest.mark.slow
def test_the_data_sections_three_commands_run(tmp_path):
    """README "Data": a folder of text -> tokenizer -> shards -> a run, exactly as written (with
    a tiny vocabulary and a few steps, so that it takes seconds)."""
    import os
    import subprocess
    import sys
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Data\n"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    cmds = [line.split() for line in block.splitlines() if line.strip()]
    assert [c[2] for c in cmds] == ["train.train_tokenizer", "train.prepare_data", "train"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(sorted((Path(os.__file__).parent / "json").glob("*.py"))):
        (corpus / f"{i}.txt").write_text(path.read_text())
    small = {"--vocab-size": "300"}
    extra = [["model.d_model=64", "model.mixers.attn.num_heads=2", "model.mixers.swa.num_heads=2", "data.seq_len=64",
              "train.steps=3", "train.eval_batches=1"]]
    for cmd, more in zip(cmds, [[], [], *extra]):
        cmd = [sys.executable if c == ".venv/bin/python" else small.get(cmd[i - 1], c) for i, c in enumerate(cmd)]
        done = subprocess.run(cmd + more, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (cmd, done.stderr[-3000:])
    assert "done: step 3" in done.stdout + done.stderr
