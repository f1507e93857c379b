import os

import pytest

import layerlock.backends as lb

from .fake import FakeBackend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Scripts that run in their own processes (the mesh one builds 4 host devices at import): never collected.
collect_ignore = ["jax_mesh_worker.py", "trainer_ddp_worker.py", "keras_backends.py"]


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (longer variants of what ``make test`` covers) run under ``make test-all``."""
    if os.environ.get("LAYERLOCK_TEST_ALL") == "1":
        return
    skip = pytest.mark.skip(reason="a longer variant: make test-all runs it (LAYERLOCK_TEST_ALL=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_backend():
    backend = lb.register(FakeBackend())
    yield backend
    lb.unregister("fake")
