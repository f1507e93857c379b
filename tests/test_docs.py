"""The JAX page's and the README's JAX code blocks run as written, each page's blocks in
order in one namespace (a later block may use what an earlier one made)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path, containing: str = "") -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if containing in b]


@pytest.mark.parametrize("blocks", [python_blocks(ROOT / "docs" / "jax.md"), python_blocks(ROOT / "README.md", "flax")],
                         ids=["docs/jax.md", "README.md"])
def test_jax_examples_run(blocks, capsys):
    pytest.importorskip("flax")
    if any("equinox" in b for b in blocks):
        pytest.importorskip("equinox")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "<docs>", "exec"), namespace)
