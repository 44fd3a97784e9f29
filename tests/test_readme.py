"""The README's Python examples run as written (each in a fresh namespace, in a scratch directory)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _title(block: str) -> str:
    text = README.read_text()
    heading = [h for h in re.findall(r"^#+ (.+)$", text[:text.index(block)], flags=re.M)]
    return heading[-1] if heading else "top"


@pytest.mark.parametrize("block", BLOCKS, ids=[_title(b) for b in BLOCKS])
def test_readme_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})


def test_readme_has_the_examples():
    assert {"Using it", "In your own training loop", "With the Hugging Face Trainer"} <= {_title(b) for b in BLOCKS}
