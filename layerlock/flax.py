"""Flax NNX helpers: ``import layerlock.flax`` (this imports flax and jax).

:data:`trainable` is the nnx filter for the parameters layerlock leaves trainable; use it
wherever NNX takes a ``wrt`` filter, so the gradient and the optimizer cover exactly them::

    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=layerlock.flax.trainable)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, layerlock.flax.trainable))(model)

After a later ``ll.apply``, the next ``nnx.jit`` step retraces with the new set by itself;
the one line to add is ``layerlock.flax.sync_optimizer(optimizer, model)``, which fits the
optimizer state to the new set and keeps the state of parameters that stay trainable.

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

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from .backends.flax import TRAINABLE, NnxBackend, is_trainable, parameters
from .errors import SpecError
from .resolver import BnPolicy
from .results import Plan
from .schedule import Phase, Schedule
from .stepper import LoopScheduler

__all__ = ["trainable", "is_trainable", "sync_optimizer", "FreezeScheduler", "NnxBackend"]

trainable = TRAINABLE


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


def sync_optimizer(optimizer: nnx.Optimizer, model: nnx.Module) -> list[str]:
    """Fit ``optimizer``'s state to the parameters its ``wrt`` filter selects now, keeping
    the state (Adam moments, step counts) of every parameter it already tracked; return the
    paths of the parameters it added. Call it after each ``ll.apply`` that changes the
    trainable set, before the next ``optimizer.update`` (which otherwise fails on a state
    of the old shape).

    >>> import optax, layerlock as ll
    >>> from flax import nnx
    >>> net = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> _ = ll.apply(net, ll.freeze("bias"))
    >>> opt = nnx.Optimizer(net, optax.adam(1e-3), wrt=trainable)
    >>> _ = ll.apply(net, ll.unfreeze())
    >>> sync_optimizer(opt, net), sync_optimizer(opt, net)
    (['bias'], [])
    """
    if not isinstance(optimizer, nnx.Optimizer):
        raise SpecError(f"sync_optimizer takes an nnx.Optimizer; received {type(optimizer).__name__}")
    from flax.nnx.training.optimizer import to_opt_state

    params = nnx.state(model, optimizer.wrt)
    wanted = [keys for keys, _ in _leaves(params)]
    old = dict(_leaves(optimizer.opt_state))
    # A parameter is tracked when some state leaf ends with its path (mu.<path>, nu.<path>, ...).
    suffixes = {keys[i:] for keys in old for i in range(len(keys))}
    new = {".".join(keys) for keys in wanted if keys not in suffixes}
    added = [path for path in parameters(model) if path in new]  # in model order
    wanted_set = set(wanted)
    dropped = any(np.ndim(var.get_value()) > 0 and not any(keys[i:] in wanted_set for i in range(len(keys)))
                  for keys, var in old.items())
    if not added and not dropped:
        return []
    fresh = to_opt_state(optimizer.tx.init(params))
    for keys, var in _leaves(fresh):
        kept = old.get(keys)
        if kept is not None and np.shape(kept.get_value()) == np.shape(var.get_value()):
            var.set_value(kept.get_value())
    optimizer.opt_state = nnx.data(fresh)
    return added


class FreezeScheduler(LoopScheduler):
    """Apply a :class:`~layerlock.Schedule` in an NNX training loop: call ``step(epoch)`` at
    the start of each epoch; on a phase change it applies the spec, syncs the optimizer (so
    the next ``nnx.jit`` step trains the new set) and logs one line. A schedule whose phases
    set ``lr`` is refused with :class:`~layerlock.SpecError` when the scheduler is built: an
    ``nnx.Optimizer``'s rates live inside its optax transformation, which this scheduler
    does not change (the message says what works). To resume, call ``load_state_dict``
    before restoring the optimizer state (``nnx.update(optimizer, saved)``): it replays the
    phases, so the state has the saved layout.

    >>> import optax, layerlock as ll
    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    >>> opt = nnx.Optimizer(net, optax.sgd(0.1), wrt=trainable)
    >>> fs = FreezeScheduler(ll.Schedule({0: ll.freeze("layers.0"), 2: ll.unfreeze()}), net, opt, log=None)
    >>> _ = fs.step(0); is_trainable(net.layers[0].kernel)
    False
    """

    def __init__(self, schedule: Schedule, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
                 strict: bool = True, bn: BnPolicy = "follow", frozen_mode: str | None = None,
                 log: Callable[[str], None] | None = print) -> None:
        _refuse_phase_lr(schedule)
        super().__init__(schedule, model, strict=strict, bn=bn, frozen_mode=frozen_mode, log=log)
        self.optimizer = optimizer

    def _sync(self, phase: Phase, plan: Plan) -> str:
        if self.optimizer is None:
            return ""
        added = sync_optimizer(self.optimizer, self.model)
        return f"optimizer +{len(added)} tensors" if added else ""


def _refuse_phase_lr(schedule: Any) -> None:
    """A phase's ``lr`` would be ignored here; say so before training rather than train at
    the wrong rate without a sound."""
    with_lr = [p for p in getattr(schedule, "phases", ()) if p.lr is not None]
    if with_lr:
        given = ", ".join(f"epoch {p.epoch}: lr={p.lr:g}" for p in with_lr)
        raise SpecError(
            f"layerlock.flax.FreezeScheduler: this schedule sets a phase lr ({given}), which is not supported by "
            "this optimizer: an nnx.Optimizer's learning rate lives inside its optax transformation, which the "
            "scheduler does not change. Drop lr from the schedule and either build the transformation with "
            "optax.inject_hyperparams and set optimizer.opt_state.hyperparams['learning_rate'] at the phase change, "
            "or give each phase's parameters their own optimizer (optax.multi_transform with one label per phase).")
