"""``ll.check`` for Flax NNX: an ``nnx.Optimizer`` whose ``wrt`` selects frozen parameters
(it updates them), optimizer state held for frozen parameters, trainable parameters the
optimizer does not track, parameters trainable in some rows only (``rows=``) that the optimizer
would train whole, and frozen BatchNorm layers whose statistics still move.

Which parameters the optimizer tracks is read off its state: each state leaf belongs to
the parameter whose path its own path ends with (``0.mu.backbone.kernel`` to
``backbone.kernel``), and the state the optimizer's transformation would build for what
its ``wrt`` selects now is traced with ``jax.eval_shape`` (nothing is allocated), so a
transformation that keeps no state for some parameters (``optax.sgd``, ``optax.masked``)
is not mistaken for one that lost them.

>>> import optax, layerlock as ll
>>> from flax import nnx
>>> net = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
>>> _ = ll.apply(net, ll.freeze("layers.0"))
>>> [f.kind for f in check(net, nnx.Optimizer(net, optax.adam(1e-3), wrt=nnx.Param))]
['optimizer-updates-frozen', 'frozen-optimizer-state']
>>> check(net)
['the optimizer (pass optimizer= to ll.check)']
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from ..backends.flax import MODE, parameters, trained_rows, trains, walk
from ..backends.pytree import path_of
from ..results import Finding

NO_OPTIMIZER = "the optimizer (pass optimizer= to ll.check)"
_TRAINABLE_FIX = ("wrt=layerlock.flax.trainable, and gradients with nnx.grad(loss_fn, "
                  "argnums=nnx.DiffState(0, layerlock.flax.trainable))")


def check(model: nnx.Module, optimizer: Any = None, *, scheduler: Any = None, bn: str = "follow",
          schedule: Any = None) -> list[Finding | str]:
    """The findings of :func:`layerlock.check` for an NNX model and its ``nnx.Optimizer``
    (reads, changes nothing); without one, a note that the optimizer was not checked.
    ``scheduler`` and ``schedule`` have no NNX meaning (optax schedules live inside the
    transformation)."""
    found: list[Finding | str] = []
    if bn != "trainable":
        found += _norm_findings(model)
    if optimizer is None:
        found.append(NO_OPTIMIZER)
    elif not isinstance(optimizer, nnx.Optimizer):
        found.append(f"the optimizer (ll.check reads an nnx.Optimizer; received {type(optimizer).__name__})")
    else:
        found += _optimizer_findings(model, optimizer)
    return found


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(dotted path, leaf)`` of a pytree of nnx Variables or arrays."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [(path_of(keys), leaf) for keys, leaf in flat]


def _owner(path: str, shapes: dict[str, tuple[int, ...]], shape: tuple[int, ...]) -> str | None:
    """The parameter an optimizer-state leaf belongs to: the longest parameter path its own
    path ends with, of the same shape (a step count belongs to none)."""
    parts = path.split(".")
    for i in range(len(parts)):
        owner = ".".join(parts[i:])
        if owner in shapes:
            return owner if shapes[owner] == shape else None
    return None


def _shape(leaf: Any) -> tuple[int, ...]:
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    return tuple(np.shape(value))


def _nbytes(leaf: Any) -> int:
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    return int(np.prod(np.shape(value))) * int(np.dtype(value.dtype).itemsize)


def _optimizer_findings(model: nnx.Module, optimizer: nnx.Optimizer[Any]) -> list[Finding | str]:
    by_path = parameters(model)
    params: dict[int, tuple[str, nnx.Variable[Any]]] = {}  # each parameter once, under its first path
    for path, var in by_path.items():
        params.setdefault(id(var), (path, var))
    shapes = {path: tuple(np.shape(var.get_value())) for path, var in by_path.items()}

    def owners(tree: Any) -> dict[int, list[Any]]:
        """parameter id -> the leaves of an optimizer state that belong to it"""
        out: dict[int, list[Any]] = {}
        for path, leaf in _leaves(tree):
            owner = _owner(path, shapes, _shape(leaf))
            if owner is not None:
                out.setdefault(id(by_path[owner]), []).append(leaf)
        return out

    selected_state = nnx.state(model, optimizer.wrt)
    selected = {id(var) for _, var in _leaves(selected_state)}
    held = owners(optimizer.opt_state)
    out: list[Finding | str] = []
    try:
        wanted: set[int] | None = set(owners(jax.eval_shape(optimizer.tx.init, selected_state)))
    except Exception as exc:  # a transformation whose init cannot be traced
        wanted = None
        out.append(f"which parameters the optimizer state lacks (tracing its transformation's init failed: "
                   f"{type(exc).__name__})")

    def rows(ids: list[int]) -> tuple[tuple[str, ...], int]:
        return tuple(params[i][0] for i in ids), sum(int(np.prod(np.shape(params[i][1].get_value()))) for i in ids)

    frozen = [i for i, (_, var) in params.items() if not trains(var)]
    updated = [i for i in frozen if i in selected]
    if updated:
        paths, scalars = rows(updated)
        out.append(Finding(
            "optimizer-updates-frozen",
            f"the optimizer's wrt filter selects {len(updated)} frozen parameters: optimizer.update moves them "
            "whenever the gradients include them (nnx.grad(loss_fn)(model) differentiates every nnx.Param), "
            "weight decay and momentum even when their gradient is zero, and it fails when the gradients leave "
            "them out",
            f"build the optimizer with {_TRAINABLE_FIX}", paths, scalars=scalars))
    kept = [i for i in frozen if held.get(i)]
    if kept:
        stale = wanted is not None and any(i not in wanted for i in kept)
        out.append(Finding(
            "frozen-optimizer-state",
            f"the optimizer keeps state (momentum, Adam moments) for {len(kept)} frozen parameters: memory "
            "held for parameters that do not train"
            + ("; its wrt filter no longer selects them, so the next optimizer.update fails on a state of "
               "the old layout" if stale else ""),
            "with wrt=layerlock.flax.trainable, layerlock.flax.sync_optimizer(optimizer, model) after each "
            "ll.apply drops it (and keeps the state of what stays trainable); or build the optimizer after "
            "the last ll.apply",
            rows(kept)[0], bytes=sum(_nbytes(leaf) for i in kept for leaf in held[i])))
    trainable = [i for i, (_, var) in params.items() if trains(var)]
    unselected = [i for i in trainable if i not in selected]
    stateless = [i for i in trainable if i in selected and wanted is not None and i in wanted and not held.get(i)]
    if unselected or stateless:
        effects = [f"{len(unselected)} its wrt filter does not select (they never change)"] * bool(unselected) + [
            f"{len(stateless)} it has no state for (the next optimizer.update fails on a state of the old "
            "layout)"] * bool(stateless)
        paths, scalars = rows([i for i in trainable if i in unselected or i in stateless])  # model order
        out.append(Finding(
            "not-in-optimizer",
            f"{len(paths)} trainable parameters are not tracked by the optimizer (it keeps the state it was "
            "built with; unfreezing later does not add them): " + " and ".join(effects),
            "after ll.apply, call layerlock.flax.sync_optimizer(optimizer, model), with the optimizer built "
            f"with {_TRAINABLE_FIX}", paths, scalars=scalars))
    out += _row_findings(params, selected, optimizer)
    return out


def _row_findings(params: dict[int, tuple[str, Any]], selected: set[int], optimizer: Any) -> list[Finding]:
    """Parameters trainable in some rows only (``rows=``) that the optimizer would train
    whole: it was not built with ``layerlock.flax.train_rows``, or over other rows."""
    told = getattr(optimizer.tx, "rows", None)  # a layerlock.jax.RowTransformation's {path: (rows, axis)}
    told = told if isinstance(told, dict) else {}
    whole = [i for i, (path, var) in params.items() if i in selected and (rows := trained_rows(var)) is not None
             and (told.get(path) or (None,))[0] != rows]
    if not whole:
        return []
    paths = tuple(params[i][0] for i in whole)
    return [Finding(
        "rows-trained-whole",
        f"{len(paths)} parameters train in some rows only (rows=), but the optimizer "
        + ("was not built with layerlock.flax.train_rows, so it trains them whole" if not told else
           "was built over other rows (layerlock.flax.sync_optimizer was not called after ll.apply)"),
        "build it as nnx.Optimizer(model, layerlock.flax.train_rows(tx, model), wrt=layerlock.flax.trainable), and "
        "call layerlock.flax.sync_optimizer(optimizer, model) after each ll.apply",
        paths, scalars=sum(int(np.prod(np.shape(params[i][1].get_value()))) for i in whole))]


def _norm_findings(model: nnx.Module) -> list[Finding]:
    """BatchNorm layers whose weights are all frozen but whose running statistics move:
    ``use_running_average`` is off now (set by hand under layerlock's hold), or nothing
    holds the layer, so the next ``model.train()`` turns it off."""
    w = walk(model)
    moving = [w.tree.layer_paths[i] for i in w.tree.frozen_norms()
              if getattr(w.layers[i], "use_running_average", True) is False or getattr(w.layers[i], MODE, None) is None]
    if not moving:
        return []
    return [Finding(
        "norm-statistics-move",
        "these BatchNorm layers have all their weights frozen but update their running mean and variance in "
        "every training step: use_running_average is False, or nothing holds them, so model.train() sets it "
        "to False (a frozen nnx.Param does not stop them)",
        "freeze them with ll.apply(model, spec) (bn='follow' or 'frozen' holds them with "
        "use_running_average=True through model.train()); under the hold, model.train() puts back a flag set "
        "by hand; or pass bn='trainable' to ll.check if the statistics should adapt",
        tuple(moving))]
