"""Keras under tf.distribute.MirroredStrategy on two logical CPU devices, and Keras 3 on JAX
under keras.distribution.DataParallel on two host devices (each in a subprocess)."""

import json
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


DATAPARALLEL = ["variables_are_replicated", "frozen_body_bit_identical", "head_trains", "fit_keeps_layouts",
                "apply_keeps_layouts", "unfrozen_body_trains", "unfreeze_keeps_layouts", "optimizer_keeps_layouts",
                "scheduler_frozen_epoch_bit_identical", "scheduler_unfrozen_epoch_trains", "scheduler_keeps_layouts"]


@pytest.fixture(scope="module")
def dataparallel(tmp_path_factory):
    """tests/keras_dataparallel_worker.py on KERAS_BACKEND=jax with 2 host devices (in a subprocess)."""
    pytest.importorskip("jax")
    worker = Path(__file__).with_name("keras_dataparallel_worker.py")
    out = tmp_path_factory.mktemp("dataparallel") / "out.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(worker.parent.parent)}
    proc = subprocess.run([sys.executable, str(worker), str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["devices"] == 2
    return data["checks"]


@pytest.mark.parametrize("check", DATAPARALLEL)
def test_freeze_unfreeze_and_a_scheduler_under_jax_dataparallel_keep_layouts_and_train_the_trainable_set(
        dataparallel, check):
    assert check in dataparallel, f"{check} did not run: {sorted(dataparallel)}"
    assert dataparallel[check]["ok"], dataparallel[check]
