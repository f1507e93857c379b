"""The README's JAX example runs as written (the docs pages run in test_demo)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_jax_example_runs(capsys):
    pytest.importorskip("flax")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "flax" in b]
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
