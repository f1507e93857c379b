"""PyTorch training helpers: optimizer param groups, optimizer sync after unfreezing, and a
freeze scheduler for plain loops. ``import layerlock.torch`` imports torch.

>>> import torch, layerlock as ll, layerlock.torch as llt
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
>>> _ = ll.apply(net, ll.freeze("0"))
>>> opt = torch.optim.SGD(llt.param_groups(net, lr=0.1), momentum=0.9)
>>> _ = ll.apply(net, ll.unfreeze("0"))
>>> llt.sync_optimizer(opt, net, lr=0.01)
['0.weight', '0.bias']
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

from .backends import torch_rows
from .backends.distributed import check_ranks, rebuild_ddp, rebuild_for, refuse_empty_phases, refuse_unrebuildable
from .backends.torch import TorchBackend
from .backends.torch_internals import check_scheduler, extend_scheduler
from .backends.wrappers import ddp_of, unwrap, unwrap_prepared
from .diagnostics.torch import untracked
from .errors import DistributedFreezeError, SpecError
from .operations import apply
from .rate_table import rates
from .resolver import BnPolicy
from .results import Plan
from .schedule import MetricSchedule, Phase, Schedule
from .spec import Spec
from .stepper import LoopScheduler, PhaseStepper, Transition, structure_digest

__all__ = ["param_groups", "sync_optimizer", "FreezeScheduler", "structure_fingerprint", "rewrap",
           "check_ranks", "unwrap", "TorchBackend"]


def param_groups(model: torch.nn.Module, lr: float, *, lr_mult: Mapping[str, float] | None = None,
                 weight_decay: float | None = None, no_decay: str | Sequence[str] = (),
                 layer_decay: float | None = None, within: str | None = None,
                 strict: bool = True) -> list[dict[str, Any]]:
    """Optimizer param groups for the trainable parameters only, named for resuming, with
    the rates of :func:`layerlock.rates` (``ll.rates(model, lr, ...)`` shows them as a table).

    ``lr_mult={pattern: factor}``: discriminative rates, the last matching pattern wins.
    ``no_decay``: patterns whose parameters get ``weight_decay=0`` (biases, norms).
    ``layer_decay=0.75``: the top block gets ``lr`` and each block k below it ``lr * 0.75**k``
    (BEiT/timm), blocks counted as ``ll.freeze(depth=...)`` counts them; with ``within``,
    that container's blocks, with what comes before it at the bottom and after it on top.
    A pattern that matches nothing raises :class:`~layerlock.NoMatchError` (``strict=False``:
    a warning).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> [(g["name"], g["lr"]) for g in param_groups(net, 1.0, layer_decay=0.5)]
    [('block0', 0.5), ('block1', 1.0)]
    """
    table = rates(model, lr, lr_mult=lr_mult, weight_decay=weight_decay, no_decay=no_decay,
                  layer_decay=layer_decay, within=within, strict=strict)
    tensors = dict(unwrap(model).named_parameters(remove_duplicate=False))
    return [{**{k: v for k, v in group.items() if k != "paths"},
             "params": [torch_rows.trainable_part(name, tensors[name]) for name in group["paths"]]}
            for group in table.groups]


def sync_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, lr: float | None = None,
                   scheduler: Any = None) -> list[str]:
    """Add the model's trainable parameters that the optimizer lacks (matched by identity)
    as one new param group (at ``lr``, else the optimizer's default), keeping all existing
    state; return their paths.

    Parameters that are frozen now stay in the optimizer with their state but cannot move,
    since their ``grad`` is None. A given LR ``scheduler`` is extended to the new group, or
    refused with :class:`LayerlockError` when it cannot be. Accelerate's wrappers (from
    ``accelerator.prepare``) are read through to the optimizer and scheduler they hold.

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD([net.weight], lr=0.1)
    >>> sync_optimizer(opt, net), sync_optimizer(opt, net)
    (['bias'], [])
    """
    return _add_untracked(optimizer, model, {} if lr is None else {"lr": lr}, scheduler)


def _add_untracked(optimizer: Any, model: torch.nn.Module, settings: dict[str, Any], scheduler: Any) -> list[str]:
    """``sync_optimizer`` with the new group's ``settings`` (``lr``, ``initial_lr``) given."""
    optimizer, scheduler = unwrap_prepared(optimizer), unwrap_prepared(scheduler)
    new = untracked(optimizer, unwrap(model).named_parameters())
    if not new:
        return []
    named = any("param_names" in g for g in optimizer.param_groups)
    group: dict[str, Any] = {"params": new if named else [p for _, p in new],
                             "name": f"layerlock-sync-{len(optimizer.param_groups)}", **settings}
    if scheduler is not None:
        check_scheduler(scheduler)  # refuse before touching the optimizer
    optimizer.add_param_group(group)
    if scheduler is not None:
        extend_scheduler(scheduler, optimizer.param_groups[-1])
    return [n for n, _ in new]


def take_out(optimizer: torch.optim.Optimizer, drop: Callable[[torch.Tensor], bool]) -> None:
    """Remove the parameters ``drop`` selects from ``optimizer``'s groups (their state stays,
    keyed by the tensor), so that the next sync adds them as a group of their own.

    >>> net = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> take_out(opt, lambda p: p is net.bias); len(opt.param_groups[0]["params"])
    1
    """
    for group in optimizer.param_groups:
        keep = [not drop(p) for p in group["params"]]
        for key in ("params", "param_names"):  # torch keeps named params' names alongside
            if key in group:
                group[key] = [x for x, k in zip(group[key], keep) if k]


def scheduled_settings(optimizer: torch.optim.Optimizer, base: float) -> dict[str, float]:
    """The settings of a new group whose base rate is ``base`` under an LR scheduler: it
    starts at ``base`` times the factor the scheduler gives the existing groups now.

    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> opt.param_groups[0].update(initial_lr=0.2)
    >>> scheduled_settings(opt, 0.01)
    {'lr': 0.005, 'initial_lr': 0.01}
    """
    first = next((g for g in optimizer.param_groups if g.get("initial_lr")), None)
    factor = first["lr"] / first["initial_lr"] if first is not None else 1.0
    return {"lr": base * factor, "initial_lr": base}


def structure_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the parameter paths and shapes: equal for models of the same structure.

    >>> import torch
    >>> structure_fingerprint(torch.nn.Linear(2, 1)) == structure_fingerprint(torch.nn.Linear(2, 1))
    True
    """
    return structure_digest((n, p.shape) for n, p in unwrap(model).named_parameters())


def rewrap(model: torch.nn.Module, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow",
           frozen_mode: str | None = None) -> tuple[torch.nn.Module, Plan]:
    """Apply ``spec`` to the module inside a DistributedDataParallel wrapper and build the
    wrapper again, in place and with the same arguments, so DDP's reducer sees the new
    trainable set. Call it on every rank. The wrapper returned is the one given (every
    reference to it stays valid) and the parameters stay the same objects, so optimizers
    keep working. :class:`FreezeScheduler` does this by itself at each phase change.

    ``model, plan = layerlock.torch.rewrap(model, ll.unfreeze("backbone.layer4"))``
    """
    ddp = ddp_of(model)
    if ddp is None:
        raise DistributedFreezeError(f"rewrap() takes a DistributedDataParallel model; received "
                                     f"{type(model).__name__}. Use ll.apply() for unwrapped models.")
    result = apply(ddp.module, spec, strict=strict, bn=bn, frozen_mode=frozen_mode)
    rebuild_ddp(ddp)
    return model, result


class _InsideDDP(PhaseStepper):
    """A :class:`PhaseStepper` that applies each phase to the module inside the DDP wrapper it
    is given: the wrapper's reducer cannot take the change, and the scheduler's sync then
    wraps the module again."""

    def step(self, model: Any, at: int, sync: Callable[[Phase, Plan], str] | None = None) -> Transition | None:
        ddp = ddp_of(model)
        return super().step(model if ddp is None else ddp.module, at, sync)


class FreezeScheduler(LoopScheduler):
    """Apply a :class:`~layerlock.Schedule` in a plain PyTorch loop: call ``step(epoch)`` at
    the start of each epoch; on a phase change it applies the spec, adds newly trainable
    parameters to the optimizer (at the phase's ``lr``) and logs one line.

    A phase's ``lr`` is the rate of what it makes trainable, which moves to a new group (with
    its optimizer state) where the optimizer already holds it; what was already training keeps
    its rate. Without ``lr``, parameters the optimizer lacks join at its default ``lr`` and the
    ones it holds keep their group's. With a ``scheduler`` the rate is a base rate: the new
    group runs at it times the factor the existing groups follow.

    Every phase is checked against the model when the scheduler is built, so a pattern that
    matches nothing fails before training starts. To resume, call ``load_state_dict`` before
    ``optimizer.load_state_dict``: it replays the phases so the optimizer has the same
    param groups as the interrupted run.

    Given a ``DistributedDataParallel`` model, each phase change applies the spec to the
    module inside and builds the wrapper again in place, with its own arguments
    (:func:`rewrap`), so the reducer all-reduces exactly the new trainable set (frozen
    parameters are out of backward and of the all-reduce). The wrapper and the parameters
    stay the same objects, so the training loop, the optimizer and its state keep working.
    Every rank must call ``step`` with the same epoch; at each change the ranks' trainable
    sets are compared (:func:`check_ranks`); comm hooks are carried over, and a
    ``torch.compile(DistributedDataParallel(net))`` recompiles for the new set. A wrapper
    built with ``static_graph=True`` or a DDP subclass is refused here with
    :class:`~layerlock.DistributedFreezeError`::

        model = DistributedDataParallel(net)
        freezer = FreezeScheduler(schedule, model, optimizer)
        for epoch in range(epochs):
            freezer.step(epoch)                      # on every rank, with the same epoch
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> fs = FreezeScheduler(ll.Schedule({0: ll.freeze("0"), 2: ll.unfreeze()}), net, opt, log=None)
    >>> _ = fs.step(0); net[0].weight.requires_grad, fs.model is net
    (False, True)
    """

    model: torch.nn.Module
    """The model given, wrappers included: the one to train through."""

    def __init__(self, schedule: Schedule | MetricSchedule, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None,
                 *, scheduler: Any = None, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = print) -> None:
        refuse_unrebuildable(model)
        super().__init__(schedule, model, strict=strict, bn=bn, frozen_mode=frozen_mode, log=log)
        self.optimizer, self.scheduler = optimizer, scheduler
        if ddp_of(model) is not None:
            self.stepper = _InsideDDP(schedule, **self.stepper.options)

    def _refuse(self, plans: list[Plan]) -> None:
        if ddp_of(self.model) is not None:
            refuse_empty_phases(self.stepper.planned, plans)

    def _reduce(self, value: float) -> float:
        """The mean of the monitored value over the processes (the DDP wrapper's group, else
        the default one), so every rank takes the same decision; ``value`` on one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return value
        ddp = ddp_of(self.model)
        group = None if ddp is None else ddp.process_group
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=group)
        return float(total.item()) / dist.get_world_size(group)

    def _keep_best(self) -> Any:
        optimizer, scheduler = unwrap_prepared(self.optimizer), unwrap_prepared(self.scheduler)
        return copy.deepcopy((self._module.state_dict(), None if optimizer is None else optimizer.state_dict(),
                              None if scheduler is None else scheduler.state_dict()))

    def _restore_best(self, kept: Any) -> None:
        weights, optimizer_state, scheduler_state = kept
        self._module.load_state_dict(weights)
        if optimizer_state is not None:
            unwrap_prepared(self.optimizer).load_state_dict(optimizer_state)
        if scheduler_state is not None:
            unwrap_prepared(self.scheduler).load_state_dict(scheduler_state)

    @property
    def _module(self) -> torch.nn.Module:
        """The user's model inside any wrapper: what the phases are applied to."""
        return unwrap(self.model)

    def _sync(self, phase: Phase, plan: Plan) -> str:
        rebuild_for(ddp_of(self.model), plan)
        if self.optimizer is None:
            return ""
        optimizer = unwrap_prepared(self.optimizer)
        if phase.lr is not None:
            # What this phase makes trainable trains at its lr, also where the optimizer already
            # holds it (built from model.parameters()): it moves, with its state, to the new group.
            tensors = dict(self._module.named_parameters(remove_duplicate=False))
            ids = {id(tensors[path]) for path in plan.gained}
            take_out(optimizer, lambda p: id(p) in ids)
        # The phase's lr (else the optimizer's default) is a base rate under an LR scheduler.
        settings: dict[str, Any] = {} if phase.lr is None else {"lr": phase.lr}
        if self.scheduler is not None:
            settings = scheduled_settings(optimizer, phase.lr if phase.lr is not None else optimizer.defaults["lr"])
        added = _add_untracked(optimizer, self._module, settings, self.scheduler)
        if not added:
            return ""
        return f"optimizer +{len(added)} tensors" + (f" at lr {phase.lr:g}" if phase.lr is not None else "")

    def structure(self) -> str:
        return structure_fingerprint(self._module)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the phase (replaying phases so optimizer groups match the saved run; under
        DDP the wrapper is rebuilt for the saved phase's trainable set). A state of another
        schedule or model structure is refused with :class:`~layerlock.LayerlockError` before
        anything changes."""
        super().load_state_dict(state)
