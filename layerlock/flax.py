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

Some rows only (``ll.unfreeze("emb", rows="90:")``: an ``nnx.Embed``'s entries, an
``nnx.Linear``'s output units): :data:`trainable` selects the table, and :func:`train_rows`
wraps the optimizer's whole chain so that it moves those rows only and keeps state for them
only; every other row stays bit-identical::

    optimizer = nnx.Optimizer(model, layerlock.flax.train_rows(optax.adamw(1e-3), model), wrt=layerlock.flax.trainable)

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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx.training.optimizer import to_opt_state

from .backends.flax import TRAINABLE, NnxBackend, is_trainable, parameters, walk
from .errors import SpecError
from .jax import (GroupedTransformation, RatesState, RowTransformation, base_rates, scale_by_rates,
                  set_multipliers)
from .rate_table import check_rate, rates
from .resolver import BnPolicy
from .results import Plan, row_text
from .schedule import MetricSchedule, Phase, Schedule
from .stepper import LoopScheduler, structure_digest

__all__ = ["trainable", "is_trainable", "param_groups", "train_rows", "sync_optimizer", "FreezeScheduler",
           "NnxBackend"]

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


def _model_rows(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """Each parameter trainable in part, under every path of it: ``(its rows, their axis)``."""
    tree = walk(model).tree
    return {tree.param_paths[o]: (info.trainable, info.axis) for o, info in tree.rows.items()
            if info.trainable is not None}


def train_rows(tx: optax.GradientTransformation, model: nnx.Module) -> RowTransformation:
    """``tx`` (the WHOLE chain: ``optax.adamw``'s weight decay is inside it) made to move only
    the trainable rows of ``model``'s parameters that a spec trains in part (``rows=``), with
    optimizer state for those rows only; every other row gets an update of exactly ``-0.0``
    and stays bit-identical. Other parameters go through ``tx`` whole. Build the optimizer with
    it and ``wrt=layerlock.flax.trainable`` (which selects the tables trained in part). The
    rows are read now; after an ``ll.apply`` that changes them,
    :func:`sync_optimizer` builds it again over the new rows (keeping the state of the rows
    that stay). See ``layerlock.jax.train_rows`` for the mechanism.

    >>> import optax, layerlock as ll
    >>> from flax import nnx
    >>> emb = nnx.Embed(100, 8, rngs=nnx.Rngs(0))
    >>> _ = ll.apply(emb, ll.freeze().unfreeze(rows="90:"))
    >>> opt = nnx.Optimizer(emb, train_rows(optax.adam(1e-3), emb), wrt=trainable)
    >>> opt.opt_state[0].mu["embedding"].shape
    (10, 8)
    """
    if not isinstance(model, nnx.Module):
        raise SpecError(f"layerlock.flax.train_rows(tx, model) takes an nnx.Module as model; received "
                        f"{type(model).__name__}. For a pytree, use layerlock.jax.train_rows(tx, rows)")
    if isinstance(tx, RowTransformation):
        tx = tx.inner
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise SpecError(f"layerlock.flax.train_rows: tx must be an optax transformation such as optax.adamw(1e-3); "
                        f"received {type(tx).__name__}")
    # Every path of a shared table is listed; nnx.state names it under one of them.
    return RowTransformation(tx, _model_rows(model), strict=False)


def _inner(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return tx.inner if isinstance(tx, RowTransformation) else tx


def _multiplied(state: Any) -> set[str] | None:
    """The paths a state's ``scale_by_rates`` part has multipliers for; None without one."""
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, RatesState))
             if isinstance(x, RatesState)]
    return set().union(*(x.multipliers for x in found)) if found else None


def _with_rates(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with ``scale_by_rates`` chained after it, still saying its rates if it did (and
    training the same rows: inside a :class:`RowTransformation`, so its state keeps its layout)."""
    if isinstance(tx, RowTransformation):
        return RowTransformation(_with_rates(tx.inner), tx.rows, tx.strict)
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
    rows_now, tx_rows = _model_rows(model), _inner(optimizer.tx)
    rows_before = optimizer.tx.rows if isinstance(optimizer.tx, RowTransformation) else {}
    moved = rows_now != rows_before
    if moved and not isinstance(optimizer.tx, RowTransformation):
        parts = ", ".join(f"{p} ({row_text(r, np.shape(parameters(model)[p].get_value())[a])})"
                          for p, (r, a) in list(rows_now.items())[:3])
        raise SpecError(f"{owner}: the model now trains some rows only of {parts} (rows=), but this optimizer was "
                        "not built with layerlock.flax.train_rows, so it would train the whole tensor. Build it as "
                        "nnx.Optimizer(model, layerlock.flax.train_rows(tx, model), wrt=layerlock.flax.trainable). "
                        "Nothing was changed.")
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
    if not added and not dropped and not rated and not moved:
        return []
    if isinstance(tx_rows, GroupedTransformation):
        lost = sorted(p for p in new if p not in tx_rows.rates)
        if lost:
            raise SpecError(f"{owner}: {', '.join(lost[:5])} {'is' if len(lost) == 1 else 'are'} in no group of this "
                            "optimizer's layerlock.jax.multi_transform, which would never move "
                            f"{'it' if len(lost) == 1 else 'them'}. Build the groups with "
                            "layerlock.flax.param_groups(model, ...), which gives every parameter a group, frozen "
                            "ones included. Nothing was changed.")
    tx = optimizer.tx.with_rows(rows_now) if moved else optimizer.tx  # type: ignore[attr-defined]
    tx = _with_rates(tx) if wrap else tx
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
    if not added and not dropped and not wrap and not moved:
        return []
    fresh = to_opt_state(raw)
    prefix = ("0",) if wrap else ()  # optax.chain's state is a tuple: the old state is its first part
    shapes = {path: np.shape(var.get_value()) for path, var in parameters(model).items()}
    for keys, var in _leaves(fresh):
        kept = old.get(keys[len(prefix):]) if keys[:len(prefix)] == prefix else None
        if kept is None:
            continue
        if np.shape(kept.get_value()) == np.shape(var.get_value()) and not _row_leaf(keys, rows_before, rows_now):
            var.set_value(kept.get_value())
        elif (found := _row_leaf(keys, rows_before, rows_now)) is not None:
            var.set_value(_carry_rows(kept.get_value(), var.get_value(), *found, rows_before, rows_now, shapes))
    if wrap or moved:
        optimizer.tx = tx
    optimizer.opt_state = nnx.data(fresh)
    return added


def _row_leaf(keys: tuple[str, ...], before: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[str, int] | None:
    """The parameter path of a state leaf (``mu.emb.embedding`` -> ``emb.embedding``) and its
    row axis, where that parameter's rows change; else None."""
    for i in range(len(keys)):
        path = ".".join(keys[i:])
        if path in before or path in now:
            if before.get(path) == now.get(path):
                return None
            return path, (now.get(path) or before[path])[1]
    return None


def _carry_rows(old: Any, fresh: Any, path: str, axis: int, before: Mapping[str, Any], now: Mapping[str, Any],
                shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """``fresh`` (a state leaf for ``path``'s new rows) with the values ``old`` (the leaf for
    its old rows) has for the rows in both: a row that stays keeps its moments."""
    if np.ndim(old) <= axis or np.ndim(fresh) <= axis:  # not per row (a multiplier): kept as it is
        return old if np.shape(old) == np.shape(fresh) else fresh
    length = shapes[path][axis]
    old_rows = before[path][0] if path in before else tuple(range(length))
    new_rows = now[path][0] if path in now else tuple(range(length))
    if np.ndim(old) != np.ndim(fresh) or np.shape(old)[axis] != len(old_rows) or \
            np.shape(fresh)[axis] != len(new_rows):
        return fresh
    at_old = {r: i for i, r in enumerate(old_rows)}
    pairs = [(j, at_old[r]) for j, r in enumerate(new_rows) if r in at_old]
    if not pairs:
        return fresh
    to, frm = (np.asarray(x, np.int32) for x in zip(*pairs))
    where = (slice(None),) * axis + (to,)
    return jnp.asarray(fresh).at[where].set(jnp.take(jnp.asarray(old), frm, axis=axis))


def sync_optimizer(optimizer: nnx.Optimizer[Any], model: nnx.Module, *, lr: float | None = None) -> list[str]:
    """Fit ``optimizer``'s state to the parameters its ``wrt`` filter selects now, keeping
    the state (Adam moments, step counts) of every parameter it already tracked; return the
    paths of the parameters it added. Call it after each ``ll.apply`` that changes the
    trainable set, before the next ``optimizer.update`` (which otherwise fails on a state
    of the old shape).

    Rows (``rows=``): when an ``ll.apply`` changes which rows of a parameter train, an
    optimizer built with :func:`train_rows` is built again over the new rows (a row that stays
    keeps its moments); any other optimizer is refused with :class:`~layerlock.SpecError`
    (it would train the whole tensor), before anything changes.

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

    def __init__(self, schedule: Schedule | MetricSchedule, model: nnx.Module,
                 optimizer: nnx.Optimizer[Any] | None = None, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = print) -> None:
        every = schedule.schedule(list(range(len(schedule.specs)))) if isinstance(schedule, MetricSchedule) else schedule
        with_lr = [p for p in getattr(every, "phases", ()) if p.lr is not None]
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

    def _reduce(self, value: float) -> float:
        """The mean of the monitored value over JAX processes (one process: ``value``)."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils

        return float(np.mean(multihost_utils.process_allgather(np.float64(value))))

    def _keep_best(self) -> Any:
        # numpy copies of the pure state: a jitted step that donates its buffers cannot free
        # them, and the scheduler's state_dict() (which carries them) pickles.
        def kept(node: Any) -> Any:
            return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(node)))
        return kept(self.model), None if self.optimizer is None else kept(self.optimizer)

    def _restore_best(self, kept: Any) -> None:
        for node, pure in zip((self.model, self.optimizer), kept):
            if pure is not None:
                state = nnx.state(node)
                nnx.replace_by_pure_dict(state, pure)
                nnx.update(node, state)

    def _sync(self, phase: Phase, plan: Plan) -> str:
        if self.optimizer is None:
            return ""
        added = sync_optimizer(self.optimizer, self.model, lr=phase.lr)
        if not added:
            return ""
        return f"optimizer +{len(added)} tensors" + (f" at lr {phase.lr:g}" if phase.lr is not None else "")
