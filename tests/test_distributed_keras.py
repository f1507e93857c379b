"""Keras under tf.distribute.MirroredStrategy on two logical CPU devices (in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_freeze_and_unfreeze_between_fits_under_mirrored_strategy():
    pytest.importorskip("tensorflow")
    script = Path(__file__).with_name("tf_distribute_scenarios.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert out.returncode == 0 and len(lines) == 2, out.stdout + out.stderr[-3000:]
