"""The README's two commands are what CI and a newcomer run; keep them and .ci/run in step."""
import re
from pathlib import Path

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
