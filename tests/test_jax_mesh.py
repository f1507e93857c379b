"""layerlock on a JAX mesh of 4 host devices (2 "data" x 2 "model") with Flax NNX shardings.

The scenario runs in a subprocess (``tests/jax_mesh_worker.py``), since
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is imported.
For ``optax.adam`` and ``optax.inject_hyperparams(optax.adam)`` (synced with ``lr=``) it checks:
``ll.apply`` keeps every parameter's sharding; ``nnx.Optimizer(..., wrt=layerlock.flax.trainable)``
has state only for trainable parameters, each leaf with its parameter's sharding; a jitted
sharded step trains exactly the trainable set (frozen weights bit-identical); after
``ll.apply(unfreeze())`` + ``sync_optimizer`` the kept moments are bit-identical, every state
leaf (new ones included) has its parameter's sharding, and the next steps train everything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax.nnx")
pytest.importorskip("optax")

WORKER = Path(__file__).with_name("jax_mesh_worker.py")
CHECKS = ["model_is_sharded", "apply_keeps_shardings", "optimizer_state_frozen_phase",
          "frozen_phase_trains_trainable_set", "optimizer_state_after_frozen_steps", "unfreeze_keeps_shardings",
          "sync_adds_body", "optimizer_state_after_sync", "sync_keeps_moments", "unfrozen_phase_trains_everything",
          "optimizer_state_after_unfrozen_steps"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "out.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "error" not in data, data["error"]
    assert data["devices"] == 4
    return data


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("optimizer", ["adam", "inject_hyperparams(adam), sync with lr="])
def test_a_schedule_on_a_sharded_nnx_model_keeps_shardings_and_trains_the_trainable_set(result, optimizer, check):
    name = ("inject_" if optimizer.startswith("inject") else "") + check
    assert name in result["checks"], f"{name} did not run: {sorted(result['checks'])}"
    entry = result["checks"][name]
    assert entry["ok"], entry
