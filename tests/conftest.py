import os

import pytest

import layerlock.backends as lb

from .fake import FakeBackend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Scripts that run in their own processes (the mesh one builds 4 host devices at import): never collected.
collect_ignore = ["jax_mesh_worker.py", "trainer_ddp_worker.py"]


@pytest.fixture
def fake_backend():
    backend = lb.register(FakeBackend())
    yield backend
    lb.unregister("fake")
