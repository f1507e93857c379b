"""Flax NNX helpers: ``import layerlock.flax`` (this imports flax, jax and optax).

:data:`trainable` is the nnx filter for the parameters layerlock leaves trainable; use it
wherever NNX takes a ``wrt`` filter, so the gradient and the optimizer cover exactly them::

    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=layerlock.flax.trainable)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, layerlock.flax.trainable))(model)

After a later ``ll.apply``, the next ``nnx.jit`` step retraces with the new set by itself;
the one line to add is ``layerlock.flax.sync_optimizer(optimizer, model)``, which fits the
optimizer state to the new set and keeps the state of parameters that stay trainable.

Per-parameter rates mean what they mean in torch and Keras: :func:`param_groups` with
``layerlock.jax.multi_transform``::

    groups = layerlock.flax.param_groups(model, 1e-3, layer_decay=0.75)
    optimizer = nnx.Optimizer(model, layerlock.jax.multi_transform(optax.adamw, groups), wrt=layerlock.flax.trainable)

A phase's ``lr`` (``sync_optimizer(..., lr=)``, a Schedule's ``lr`` in :class:`FreezeScheduler`)
is the rate of the parameters it adds; the others keep theirs and their moments.

>>> import optax, layerlock as ll, layerlock.flax as llf
>>> from flax import nnx
>>> net = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
>>> _ = ll.apply(net, ll.freeze("layers.0"))
>>> opt = nnx.Optimizer(net, optax.adam(1e-3), wrt=llf.trainable)
>>> _ = ll.apply(net, ll.unfreeze())
>>> llf.sync_optimizer(opt, net)
['layers.0.kernel', 'layers.0.bias']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from flax.nnx.training.optimizer import to_opt_state

from .backends.flax import TRAINABLE, NnxBackend, is_trainable, parameters, walk
from .errors import SpecError
from .jax import GroupedTransformation, RatesState, base_rates, scale_by_rates, set_multipliers
from .rate_table import check_rate, rates
from .resolver import BnPolicy
from .results import Plan
from .schedule import Phase, Schedule
from .stepper import LoopScheduler, structure_digest

__all__ = ["trainable", "is_trainable", "param_groups", "sync_optimizer", "FreezeScheduler", "NnxBackend"]

trainable = TRAINABLE

_HOW = ("Build it with optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), or with "
        "layerlock.jax.multi_transform(optax.adam, layerlock.flax.param_groups(model, 1e-3))")


def _keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A jax key path as plain strings (the Variable's own ``.value`` step dropped)."""
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        out.append(str(name))
    return tuple(out[:-1] if out and out[-1] == "value" else out)


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [(_keys(path), leaf) for path, leaf in flat]


def param_groups(model: nnx.Module, lr: float, *, lr_mult: Mapping[str, float] | None = None,
                 weight_decay: float | None = None, no_decay: str | Sequence[str] = (),
                 layer_decay: float | None = None, within: str | None = None,
                 strict: bool = True) -> list[dict[str, Any]]:
    """Groups ``[{"name", "lr", "weight_decay"?, "params": [paths]}]`` with the rates of
    :func:`layerlock.rates`, for ``layerlock.jax.multi_transform``; the arguments mean what
    they mean in ``layerlock.torch.param_groups``. Every ``nnx.Param`` gets a group, frozen
    ones too: the optimizer's ``wrt=layerlock.flax.trainable`` decides what trains, and a
    parameter that a later phase unfreezes trains at its rate here (or the phase's ``lr``).
    A shared parameter is listed under each of its paths.

    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    >>> [(g["name"], g["lr"], g["params"]) for g in param_groups(net, 1.0, layer_decay=0.5)]
    [('block0', 0.5, ['layers.0.kernel', 'layers.0.bias']), ('block1', 1.0, ['layers.1.kernel', 'layers.1.bias'])]
    """
    tree = walk(model).tree
    table = rates(dataclasses.replace(tree, trainable=[True] * len(tree.trainable)), lr, lr_mult=lr_mult,
                  weight_decay=weight_decay, no_decay=no_decay, layer_decay=layer_decay, within=within, strict=strict)
    key_of = dict(zip(tree.param_paths, tree.param_keys))
    paths_of: dict[Any, list[str]] = {}
    for path, key in key_of.items():
        paths_of.setdefault(key, []).append(path)
    return [{**{k: v for k, v in group.items() if k != "paths"},
             "params": [p for first in group["paths"] for p in paths_of[key_of[first]]]} for group in table.groups]


def _multiplied(state: Any) -> set[str] | None:
    """The paths a state's ``scale_by_rates`` part has multipliers for; None without one."""
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, RatesState))
             if isinstance(x, RatesState)]
    return set().union(*(x.multipliers for x in found)) if found else None


def _with_rates(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with ``scale_by_rates`` chained after it, still saying its rates if it did."""
    chained = optax.chain(tx, scale_by_rates())
    if isinstance(tx, GroupedTransformation):
        return GroupedTransformation(chained.init, chained.update, tx.rates)
    return chained


def _fit(optimizer: nnx.Optimizer[Any], model: nnx.Module, *, lr: float | None, owner: str, given: str,
         rated: bool = False) -> list[str]:
    """Fit the optimizer state to the ``wrt`` selection (see :func:`sync_optimizer`); with
    ``lr``, the added parameters' multipliers make them train at ``lr``. ``rated``: make
    the optimizer able to take a later ``lr`` (chain ``scale_by_rates``, check its rate is
    readable) even if nothing is added. Every refusal comes before anything changes."""
    params = nnx.state(model, optimizer.wrt)
    wanted = [keys for keys, _ in _leaves(params)]
    wanted_set, dotted = set(wanted), {".".join(keys) for keys in wanted}
    old = dict(_leaves(optimizer.opt_state))
    multiplied = _multiplied(optimizer.opt_state)
    # A parameter is tracked when some state leaf ends with its path (mu.<path>, nu.<path>, ...)
    # or, once scale_by_rates is chained, when it has a multiplier.
    suffixes = {keys[i:] for keys in old for i in range(len(keys))}
    new = {".".join(keys) for keys in wanted if keys not in suffixes} - (multiplied or set())
    added = [path for path in parameters(model) if path in new]  # in model order
    dropped = bool(multiplied and multiplied - dotted) or any(
        np.ndim(var.get_value()) > 0 and not any(keys[i:] in wanted_set for i in range(len(keys)))
        for keys, var in old.items())
    wrap = (rated or (lr is not None and bool(added))) and multiplied is None
    if not added and not dropped and not rated:
        return []
    if isinstance(optimizer.tx, GroupedTransformation):
        lost = sorted(p for p in new if p not in optimizer.tx.rates)
        if lost:
            raise SpecError(f"{owner}: {', '.join(lost[:5])} {'is' if len(lost) == 1 else 'are'} in no group of this "
                            "optimizer's layerlock.jax.multi_transform, which would never move "
                            f"{'it' if len(lost) == 1 else 'them'}. Build the groups with "
                            "layerlock.flax.param_groups(model, ...), which gives every parameter a group, frozen "
                            "ones included. Nothing was changed.")
    tx = _with_rates(optimizer.tx) if wrap else optimizer.tx
    raw = tx.init(params)
    if wrap and lr is not None and added and not any(
            keys[i:] in wanted_set for keys, _ in _leaves(raw[0]) for i in range(len(keys))):
        raise SpecError(f"{owner}: layerlock cannot tell which parameters this optimizer already trains: its state "
                        f"has no entry per parameter (optax.sgd without momentum), so {given} could not go to the "
                        "new ones only. Chain layerlock.jax.scale_by_rates() after its transformation when you build "
                        "it (nnx.Optimizer(model, optax.chain(tx, layerlock.jax.scale_by_rates()), "
                        "wrt=layerlock.flax.trainable)), or apply the schedule with layerlock.flax.FreezeScheduler, "
                        "which does that when it is built. Nothing was changed.")
    if rated or (lr is not None and added):
        try:
            bases = base_rates(tx, params, state=raw)
        except SpecError as exc:
            raise SpecError(f"{owner}: {given}, which is not supported by this optimizer: layerlock gives a phase "
                            f"lr as a multiple of the optimizer's own learning rate, so it must read that. {exc}. "
                            "Nothing was changed.") from None
        if lr is not None and added:
            raw = set_multipliers(raw, {path: lr / bases[path] for path in new})
    if not added and not dropped and not wrap:
        return []
    fresh = to_opt_state(raw)
    prefix = ("0",) if wrap else ()  # optax.chain's state is a tuple: the old state is its first part
    for keys, var in _leaves(fresh):
        kept = old.get(keys[len(prefix):]) if keys[:len(prefix)] == prefix else None
        if kept is not None and np.shape(kept.get_value()) == np.shape(var.get_value()):
            var.set_value(kept.get_value())
    if wrap:
        optimizer.tx = tx
    optimizer.opt_state = nnx.data(fresh)
    return added


def sync_optimizer(optimizer: nnx.Optimizer[Any], model: nnx.Module, *, lr: float | None = None) -> list[str]:
    """Fit ``optimizer``'s state to the parameters its ``wrt`` filter selects now, keeping
    the state (Adam moments, step counts) of every parameter it already tracked; return the
    paths of the parameters it added. Call it after each ``ll.apply`` that changes the
    trainable set, before the next ``optimizer.update`` (which otherwise fails on a state
    of the old shape).

    With ``lr``, the added parameters train at ``lr`` and the others keep their rate: the
    first time, ``layerlock.jax.scale_by_rates()`` is chained after ``optimizer.tx`` (the
    state carried over), and each added parameter gets the multiplier ``lr / base``, where
    ``base`` is the optimizer's own rate (``layerlock.jax.base_rates``: an
    ``optax.inject_hyperparams`` learning rate, or a ``layerlock.jax.multi_transform``
    group's). Under a schedule, they follow its factor from ``lr``. An optimizer whose rate
    cannot be read is refused with :class:`~layerlock.SpecError` before anything changes.
    Without ``lr``, added parameters train at the optimizer's rate for them.

    >>> import optax, layerlock as ll
    >>> from flax import nnx
    >>> net = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> _ = ll.apply(net, ll.freeze("bias"))
    >>> opt = nnx.Optimizer(net, optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), wrt=trainable)
    >>> _ = ll.apply(net, ll.unfreeze())
    >>> sync_optimizer(opt, net, lr=1e-3), sync_optimizer(opt, net)
    (['bias'], [])
    >>> round(float(opt.opt_state[1].multipliers["bias"][...]), 6)   # bias: 1e-3 / 1e-2
    0.1
    """
    if not isinstance(optimizer, nnx.Optimizer):
        raise SpecError(f"sync_optimizer takes an nnx.Optimizer; received {type(optimizer).__name__}")
    if lr is not None:
        lr = check_rate(lr, "sync_optimizer: lr")
    return _fit(optimizer, model, lr=lr, owner="layerlock.flax.sync_optimizer", given=f"lr={lr:g}" if lr else "")


class FreezeScheduler(LoopScheduler):
    """Apply a :class:`~layerlock.Schedule` in an NNX training loop: call ``step(epoch)`` at
    the start of each epoch; on a phase change it applies the spec, syncs the optimizer (so
    the next ``nnx.jit`` step trains the new set) and logs one line.

    A phase's ``lr`` is the rate of what that phase makes trainable; what was already
    training keeps its rate and its moments, and under a learning-rate schedule the new
    parameters follow the schedule's factor from ``lr`` (see :func:`sync_optimizer`). For
    that, a schedule that sets an ``lr`` chains ``layerlock.jax.scale_by_rates()`` after the
    optimizer's transformation when the scheduler is built (the state carried over), and
    an optimizer whose own rate cannot be read (build it with
    ``optax.inject_hyperparams(optax.adam)(learning_rate=...)`` or
    ``layerlock.jax.multi_transform``) is refused with :class:`~layerlock.SpecError` then,
    before anything changes. To resume, build the optimizer and the scheduler as before,
    then call ``load_state_dict`` before restoring the optimizer state (``nnx.update(optimizer,
    saved)``): it replays the phases, so the state has the saved layout. A state of another
    schedule, or of a model whose ``nnx.Param`` paths or shapes differ, is refused with
    :class:`~layerlock.LayerlockError` before anything changes.

    >>> import optax, layerlock as ll
    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    >>> opt = nnx.Optimizer(net, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), wrt=trainable)
    >>> schedule = ll.Schedule({0: ll.freeze("layers.0"), 2: ll.unfreeze()}, lr={2: 0.01})
    >>> fs = FreezeScheduler(schedule, net, opt)
    >>> _ = fs.step(0)
    layerlock: epoch 0: phase 1/2 Spec(freeze('layers.0')): +0 / -6 trainable scalars, 3 trainable (33.3%)
    >>> _ = fs.step(2)
    layerlock: epoch 2: phase 2/2 Spec(unfreeze()): +6 / -0 trainable scalars, 9 trainable (100.0%); optimizer +2 tensors at lr 0.01
    """

    def __init__(self, schedule: Schedule, model: nnx.Module, optimizer: nnx.Optimizer[Any] | None = None, *,
                 strict: bool = True, bn: BnPolicy = "follow", frozen_mode: str | None = None,
                 log: Callable[[str], None] | None = print) -> None:
        with_lr = [p for p in getattr(schedule, "phases", ()) if p.lr is not None]
        owner = "layerlock.flax.FreezeScheduler"
        given = "this schedule sets a phase lr (" + ", ".join(f"epoch {p.epoch}: lr={p.lr:g}" for p in with_lr) + ")"
        if with_lr and optimizer is None:
            raise SpecError(f"{owner}: {given}, which is not supported by this optimizer: none was given "
                            "(optimizer=None), so nothing could train at that rate. Pass the nnx.Optimizer, or drop "
                            "lr from the schedule.")
        if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
            raise SpecError(f"{owner} takes an nnx.Optimizer; received {type(optimizer).__name__}")
        super().__init__(schedule, model, strict=strict, bn=bn, frozen_mode=frozen_mode, log=log)
        self.optimizer = optimizer
        if with_lr:  # every phase checked: now make the optimizer able to take their lr
            _fit(optimizer, model, lr=None, owner=owner, given=given, rated=True)  # type: ignore[arg-type]

    def structure(self) -> str:
        return structure_digest((path, np.shape(var.get_value())) for path, var in parameters(self.model).items())

    def _sync(self, phase: Phase, plan: Plan) -> str:
        if self.optimizer is None:
            return ""
        added = sync_optimizer(self.optimizer, self.model, lr=phase.lr)
        if not added:
            return ""
        return f"optimizer +{len(added)} tensors" + (f" at lr {phase.lr:g}" if phase.lr is not None else "")
