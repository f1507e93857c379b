"""A Keras test file's runs on the torch and JAX Keras backends: Keras picks its backend at
import, so each is a process of its own. A file ends with

    from .keras_backends import other_backends, test_the_same_tests_pass_on_the_torch_and_jax_keras_backends

(last, so that the collecting test runs after the file's own)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

OTHER_BACKENDS = "test_the_same_tests_pass_on_the_torch_and_jax_keras_backends"


def _backend():
    import keras

    return keras.backend.backend()


@pytest.fixture(scope="module", autouse=True)
def other_backends(request):
    """Start the file's runs on the torch and JAX Keras backends as its TensorFlow run begins,
    so that they run beside its tests; the last test collects them. One thread each: three
    processes share the cores."""
    runs = {}
    if _backend() == "tensorflow" and any(item.name == OTHER_BACKENDS for item in request.session.items):
        for backend in ("torch", "jax"):
            if importlib.util.find_spec(backend) is not None:
                env = {**os.environ, "KERAS_BACKEND": backend, "OMP_NUM_THREADS": "1",
                       "PYTHONPATH": str(Path(__file__).parent.parent)}
                runs[backend] = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                  str(request.path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True, env=env)
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.communicate()


def test_the_same_tests_pass_on_the_torch_and_jax_keras_backends(other_backends):
    if _backend() != "tensorflow":
        pytest.skip("already running on another Keras backend")
    if not other_backends:
        pytest.skip("neither torch nor jax is installed")
    for backend, run in other_backends.items():
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, f"KERAS_BACKEND={backend}:\n{out[-4000:]}"
