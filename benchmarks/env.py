"""What the results were measured on: machine, versions, device, threads."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions, read from metadata so that no framework gets imported here."""
    tf = _version("tensorflow") or _version("tensorflow-cpu")
    return {"python": platform.python_version(), "torch": _version("torch"), "tensorflow": tf,
            "keras": _version("keras"), "transformers": _version("transformers"),
            "jax": _version("jax"), "flax": _version("flax"), "optax": _version("optax"),
            "equinox": _version("equinox"),
            "layerlock": _version("layerlock")}


def load_avg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "load_avg_start": load_avg()}


def pick_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return cpu_model()


def quiet_frameworks() -> None:
    """Keep TensorFlow's start-up chatter out of the progress bar."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
