"""layerlock: one API to freeze and unfreeze layers in PyTorch and Keras.

>>> import layerlock as ll
>>> spec = ll.freeze("backbone").unfreeze("backbone.layer4")   # the later rule wins
>>> ll.Spec.from_json(spec.to_json()) == spec
True

Importing layerlock imports no framework; a backend loads when it first meets a model
of its framework. ``layerlock.torch`` and ``layerlock.keras`` hold the training helpers.
"""

from __future__ import annotations

from typing import Any

from .errors import (BackendError, DistributedFreezeError, LayerlockError, LayerlockWarning,
                     NoMatchError, SpecError)
from .plan import LayerPlan, ParamPlan, Plan, apply, plan, summary
from .schedule import Phase, Schedule, gradual
from .spec import Rule, Spec, freeze, unfreeze
from .state import State, fingerprint, frozen, restore, snapshot
from .tree import Summary

__version__ = "0.1.0"

__all__ = [
    # specs
    "Spec", "Rule", "freeze", "unfreeze",
    # using specs
    "plan", "apply", "summary", "snapshot", "restore", "frozen", "fingerprint",
    # schedules
    "Schedule", "Phase", "gradual",
    # reports and values
    "Plan", "ParamPlan", "LayerPlan", "Summary", "State",
    # errors
    "LayerlockError", "SpecError", "NoMatchError", "BackendError", "DistributedFreezeError",
    "LayerlockWarning",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # `ll.torch` / `ll.keras` load the framework helpers only when asked for.
    if name in ("torch", "keras"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'layerlock' has no attribute {name!r}")
