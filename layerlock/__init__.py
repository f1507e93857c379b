"""layerlock: one API to freeze and unfreeze layers in PyTorch, Keras and JAX.

>>> import layerlock as ll
>>> spec = ll.freeze("backbone").unfreeze("backbone.layer4")   # the later rule wins
>>> ll.Spec.from_json(spec.to_json()) == spec
True

Importing layerlock imports no framework, and its own modules load on first use (so
``import layerlock`` stays cheap); a backend loads when it first meets a model of its
framework. ``layerlock.torch``, ``layerlock.keras``, ``layerlock.lightning``, ``layerlock.flax``
(Flax NNX) and ``layerlock.jax`` (masks and optax for pytrees) hold the training helpers.
"""

from __future__ import annotations

import importlib

from .errors import (BackendError, DistributedFreezeError, LayerlockError, LayerlockWarning,
                     NoMatchError, SpecError)

__version__ = "0.1.0"

# The public API: name -> the module that defines it (loaded on first access).
_API = {
    # specs
    "Spec": "spec", "Rule": "spec", "freeze": "spec", "unfreeze": "spec",
    # using specs
    "plan": "operations", "apply": "operations", "summary": "operations",
    "snapshot": "operations", "restore": "operations", "frozen": "operations", "fingerprint": "operations",
    "check": "operations",
    # learning rates
    "rates": "rate_table", "Rates": "rate_table",
    # schedules
    "Schedule": "schedule", "Phase": "schedule", "gradual": "schedule", "MetricSchedule": "schedule",
    "Plateau": "schedule",
    # reports and values
    "Plan": "results", "ParamPlan": "results", "LayerPlan": "results", "Summary": "results", "State": "results",
    "Report": "results", "Finding": "results",
}
_ERRORS = ["LayerlockError", "SpecError", "NoMatchError", "BackendError", "DistributedFreezeError",
           "LayerlockWarning"]
_SUBMODULES = ("torch", "keras", "lightning", "flax", "jax", "backends")

__all__ = [*_API, *_ERRORS, "__version__"]

TYPE_CHECKING = False  # not `from typing import ...`: importing typing alone costs ~6 ms
if TYPE_CHECKING:
    from typing import Any

    from .operations import apply, check, fingerprint, frozen, plan, restore, snapshot, summary
    from .rate_table import Rates, rates
    from .results import Finding, LayerPlan, ParamPlan, Plan, Report, State, Summary
    from .schedule import MetricSchedule, Phase, Plateau, Schedule, gradual
    from .spec import Rule, Spec, freeze, unfreeze


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # `ll.torch` etc. import their framework only when asked for
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'layerlock' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])
