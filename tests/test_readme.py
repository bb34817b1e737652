"""The README's Python snippets run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_starts_with_the_setup_and_test_commands():
    lines = README.read_text().splitlines()
    assert lines[1].endswith("eventful demo")
    assert lines[2].endswith("python -m pytest -q")


def test_readme_states_the_demo_length_the_command_has():
    from eventful.cli import DEMO_FRAMES

    text = README.read_text()
    assert text.count(f"first {DEMO_FRAMES} frames") == 2  # the first lines and the demo section


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
    exec(compile(SNIPPETS[index], f"README snippet {index}", "exec"), {})
