"""The JAX page's and the README's JAX code blocks run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path, containing: str = "") -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if containing in b]


@pytest.mark.parametrize("block", python_blocks(ROOT / "docs" / "jax.md") + python_blocks(ROOT / "README.md", "flax"))
def test_jax_examples_run(block, capsys):
    pytest.importorskip("flax")
    if "equinox" in block:
        pytest.importorskip("equinox")
    exec(compile(block, "<docs>", "exec"), {})
