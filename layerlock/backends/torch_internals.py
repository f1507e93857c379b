"""Every private PyTorch attribute layerlock uses, behind one door.

Each function relies on a layout below, checks it before reading or writing, and on a layout
it does not know (a future torch) raises :class:`~layerlock.BackendError` naming the installed
version and the safe fallback, before anything changes.

The layouts (torch 2.7 to 2.13):

- a module keeps its own parameters and submodules in the dicts ``_parameters`` and
  ``_modules`` (read directly: the walk over them is most of the cost of ``ll.apply``);
- BatchNorm*, SyncBatchNorm and InstanceNorm* share the base class
  ``torch.nn.modules.batchnorm._NormBase``;
- ``torch.compile(model)`` returns an ``OptimizedModule`` holding the model in ``_orig_mod``;
  ``module.compile()`` compiles in place and sets ``_compiled_call_impl``;
- dynamo's recompile limit is ``torch._dynamo.config.recompile_limit`` (older:
  ``cache_size_limit``);
- DistributedDataParallel counts the parameters its reducer was built with in
  ``_get_ddp_logging_data()["num_parameter_tensors"]``;
- LR schedulers keep per-group lists ``base_lrs``, ``_last_lr`` (and ``min_lrs`` for
  ReduceLROnPlateau); ``LambdaLR`` / ``MultiplicativeLR`` keep one callable per group in
  ``lr_lambdas``; a scheduler's ``state_dict`` is a method that an instance attribute can
  shadow.

torch is imported by the backend that uses this module; nothing here imports it at import time.

>>> import torch
>>> net = torch.nn.Linear(1, 1)
>>> sorted(own_parameters(net)), compiled_inner(torch.compile(net)) is net
(['bias', 'weight'], True)
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

from ..errors import BackendError, LayerlockError


def _refuse(detail: str, fallback: str) -> BackendError:
    version = getattr(sys.modules.get("torch"), "__version__", "(version unknown)")
    return BackendError(f"layerlock does not know this layout of PyTorch {version}: {detail}. Nothing was "
                        f"changed. Safe fallback: {fallback}")


# -- modules --------------------------------------------------------------------------------------
def _own(module: Any, attr: str) -> dict[str, Any]:
    entries = module.__dict__.get(attr)
    if not isinstance(entries, dict):
        raise _refuse(f"{type(module).__name__} has no {attr} dict",
                      "set requires_grad by hand on model.named_parameters().")
    return entries


def own_parameters(module: Any) -> dict[str, Any]:
    """The module's own parameters by name (None entries included, as torch keeps them)."""
    return _own(module, "_parameters")


def own_modules(module: Any) -> dict[str, Any]:
    """The module's direct submodules by name (None entries included)."""
    return _own(module, "_modules")


def readers(root: Any) -> tuple[Callable[[Any], dict[str, Any]], Callable[[Any], dict[str, Any]]]:
    """Fast readers of a module's own parameters and submodules for a walk from ``root``,
    after checking the layout on ``root`` (every module of one torch has the same): C-level
    attribute getters, since the walk calls them for every module of the model."""
    own_parameters(root), own_modules(root)
    return operator.attrgetter("_parameters"), operator.attrgetter("_modules")


def grad_hooks(tensor: Any) -> list[Any]:
    """The gradient hooks registered on ``tensor`` with ``register_hook`` (kept in its
    ``_backward_hooks`` dict), in order; [] where it has none."""
    hooks = getattr(tensor, "_backward_hooks", None)
    return list(hooks.values()) if isinstance(hooks, dict) else []


def norm_types() -> tuple[type, ...]:
    """The classes of the norm layers with running statistics (BatchNorm*, SyncBatchNorm,
    InstanceNorm*); the public classes if the shared base class is gone."""
    from torch import nn

    base = getattr(nn.modules.batchnorm, "_NormBase", None)
    if isinstance(base, type) and issubclass(nn.BatchNorm2d, base):
        return (base,)
    return (nn.modules.batchnorm._BatchNorm if hasattr(nn.modules.batchnorm, "_BatchNorm") else nn.BatchNorm2d,
            nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
            nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


# -- compile ----------------------------------------------------------------------------------------
def compiled_inner(model: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule``), else None."""
    if type(model).__name__ != "OptimizedModule":
        return None
    inner = getattr(model, "_orig_mod", None)
    if inner is None:
        raise _refuse("an OptimizedModule without _orig_mod",
                      "pass the model you compiled (the module before torch.compile) to layerlock.")
    return inner


def compiled_in_place(module: Any) -> bool:
    """True for a module compiled with ``module.compile()``."""
    return getattr(module, "_compiled_call_impl", None) is not None


def recompile_limit() -> int:
    """How many graphs dynamo compiles for one frame before it runs eager for good."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    raise _refuse("torch._dynamo.config has neither recompile_limit nor cache_size_limit",
                  "check the recompile limit of your torch version by hand.")


# -- DistributedDataParallel -----------------------------------------------------------------------
def ddp_tracked_count(ddp: Any) -> int | None:
    """How many parameters DDP's reducer was built with (None when DDP does not say)."""
    logging_data = getattr(ddp, "_get_ddp_logging_data", None)
    if not callable(logging_data):
        return None
    count = logging_data().get("num_parameter_tensors")
    return count if isinstance(count, int) else None


def ddp_comm_hooks(ddp: Any) -> list[tuple[Any, Any]]:
    """The (hook, state) pairs registered on a DDP wrapper, in order (DDP keeps this list to
    re-register them when it rebuilds its own buckets); [] where DDP does not keep it."""
    hooks = getattr(ddp, "_comm_hooks", [])
    return list(hooks) if isinstance(hooks, list) else []


# -- LR schedulers ----------------------------------------------------------------------------------
# Schedulers whose per-group lists layerlock knows how to extend to a new param group.
_LIST_ATTRS = ("base_lrs", "_last_lr", "min_lrs")


def _extendable() -> tuple[type, ...]:
    from torch.optim import lr_scheduler as S

    return (S.LambdaLR, S.MultiplicativeLR, S.StepLR, S.MultiStepLR, S.ExponentialLR,
            S.CosineAnnealingLR, S.LinearLR, S.ConstantLR, S.PolynomialLR, S.ReduceLROnPlateau)


def check_scheduler(scheduler: Any) -> None:
    """Refuse, with :class:`~layerlock.LayerlockError`, an LR scheduler that
    :func:`extend_scheduler` cannot keep consistent with a new param group."""
    supported = _extendable()
    if not isinstance(scheduler, supported):
        names = ", ".join(s.__name__ for s in supported)
        raise LayerlockError(
            f"sync_optimizer cannot keep a {type(scheduler).__name__} consistent with a new param group "
            f"(it keeps per-group values it cannot extend); supported: {names}. Create that scheduler "
            "after the last unfreeze, or pass scheduler=None and rebuild it yourself.")
    if not isinstance(getattr(scheduler, "base_lrs", None), list):
        raise _refuse(f"{type(scheduler).__name__} has no list base_lrs",
                      "create the LR scheduler after the last unfreeze.")


def extend_scheduler(scheduler: Any, group: dict[str, Any]) -> None:
    """Make ``scheduler`` drive ``group`` (just added to its optimizer) from the group's base
    rate ``initial_lr`` (set here from its ``lr`` when absent), like the others."""
    from torch.optim import lr_scheduler as S

    base = group.get("initial_lr")
    if base is None:
        base = group["lr"]
        if isinstance(scheduler, S.LambdaLR):  # closed form: lr = base * lambda(epoch)
            factor = scheduler.lr_lambdas[-1](scheduler.last_epoch)
            base = base / factor if factor else base
        group["initial_lr"] = base
    for attr in _LIST_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, list):
            values.append({"base_lrs": base, "_last_lr": group["lr"]}.get(attr, values[-1]))
    if isinstance(scheduler, (S.LambdaLR, S.MultiplicativeLR)):
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[-1])


def wrap_state_dict(scheduler: Any, fold: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Make ``scheduler.state_dict()`` return ``fold(<its usual state dict>)`` (once per
    scheduler). The wrapper lives on the instance, which torch's schedulers save with their
    ``__dict__``: ``fold`` must drop the ``"state_dict"`` entry."""
    if "state_dict" in vars(scheduler):
        return
    plain = scheduler.state_dict
    if not callable(plain):
        raise _refuse(f"{type(scheduler).__name__}.state_dict is not a method",
                      "run each phase as its own trainer.train().")

    def state_dict() -> dict[str, Any]:
        return fold(plain())

    scheduler.state_dict = state_dict
