"""The framework-free core type-checks under mypy --strict."""

import subprocess
import sys
from pathlib import Path

import pytest

CORE = ["__init__.py", "_format.py", "errors.py", "spec.py", "families.py", "tree.py", "results.py", "resolver.py", "operations.py", "rate_table.py", "schedule.py", "stepper.py", "testing.py"]


def test_core_passes_mypy_strict(tmp_path):
    pytest.importorskip("mypy")
    package = Path(__file__).resolve().parent.parent / "layerlock"
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path),
                          *(str(package / f) for f in CORE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
