import os

import pytest

import layerlock.backends as lb

from .fake import FakeBackend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# A script run in its own process (it needs 4 host devices, set before jax starts): never imported here.
collect_ignore = ["jax_mesh_worker.py"]


@pytest.fixture
def fake_backend():
    backend = lb.register(FakeBackend())
    yield backend
    lb.unregister("fake")
