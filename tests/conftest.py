import os

import pytest

import layerlock.backends as lb

from .fake import FakeBackend

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def fake_backend():
    backend = lb.register(FakeBackend())
    yield backend
    lb.unregister("fake")
