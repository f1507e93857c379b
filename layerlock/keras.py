"""Keras helpers: ``import layerlock.keras`` (this imports keras).

:func:`sync_optimizer` brings the optimizer of a custom training loop in step after an
``apply``, like its torch namesake. :class:`FreezeScheduler` is a Keras callback that
applies a :class:`~layerlock.Schedule` at the start of each epoch of ``fit``; the very next
step trains the new set, and the optimizer keeps its state for variables that stay trainable.

>>> import keras, layerlock as ll, layerlock.keras as llk
>>> callback = llk.FreezeScheduler(ll.gradual(3), verbose=0)   # model.fit(..., callbacks=[callback])
"""

from __future__ import annotations

from typing import Any

import keras

from .backends import get_backend
from .backends.keras import KerasBackend, TfKerasBackend, short_name
from .backends.keras_internals import strategy_scope, sync_variables
from .resolver import BnPolicy
from .results import Plan
from .schedule import Phase, Schedule
from .stepper import PhaseStepper, warn_check

__all__ = ["FreezeScheduler", "KerasBackend", "TfKerasBackend", "sync_optimizer"]


def sync_optimizer(optimizer: Any, model: Any) -> list[str]:
    """Make a built optimizer track exactly ``model.trainable_variables``, keeping the state
    (Adam moments, ``iterations``) of every variable it already tracks; return the paths
    of the variables it added. For ``fit`` you never need it: ``ll.apply`` syncs the
    compiled model's own optimizer. In a custom loop, call it after each ``apply``, or
    ``optimizer.apply_gradients`` fails on the newly trainable variables ("Unknown variable").
    An optimizer layout layerlock does not know (a future Keras) raises
    :class:`~layerlock.BackendError` before anything changes.

    >>> import keras, layerlock as ll
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fc")])
    >>> _ = ll.apply(model, ll.freeze("fc.bias"))
    >>> opt = keras.optimizers.SGD(); opt.build(model.trainable_variables)
    >>> _ = ll.apply(model, ll.unfreeze())
    >>> sync_optimizer(opt, model), sync_optimizer(opt, model)
    (['fc.bias'], [])
    """
    added = sync_variables(optimizer, model.trainable_variables, strategy_scope(model)) or []
    if not added:
        return []
    paths = {id(v): path for path, _, v in get_backend(model).unique_variables(get_backend(model).walk(model))}
    return [paths.get(id(v), short_name(v)) for v in added]


class FreezeScheduler(keras.callbacks.Callback):  # type: ignore[misc]
    """Apply ``schedule`` at epoch begin inside ``fit``.

    Every phase is checked against the model at ``on_train_begin``, so a pattern that
    matches nothing fails before the first step. A phase's ``lr`` sets the optimizer's
    learning rate from that epoch on (Keras optimizers have one rate for all variables).
    Resuming with ``fit(initial_epoch=e)`` applies the cumulative spec for epoch ``e``.
    ``verbose=1`` prints a one-line log at each transition. When training starts (after the
    first epoch's phase is applied) the set-up is checked once with :func:`layerlock.check`;
    what it finds comes as one :class:`~layerlock.LayerlockWarning` with the report's table.
    """

    def __init__(self, schedule: Schedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, verbose: int = 1) -> None:
        super().__init__()
        self.stepper = PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode)
        self.schedule = schedule
        self.verbose = verbose
        self._checked = False

    def on_train_begin(self, logs: Any = None) -> None:
        self.stepper.check(self.model)
        self.stepper.phase = -1  # fit(initial_epoch=e) re-applies the cumulative spec for e

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        change = self.stepper.step(self.model, epoch, self._sync)
        if not self._checked:
            self._checked = True
            warn_check(self.model, bn=self.stepper.options["bn"], schedule=self.schedule)
        if change is not None and self.verbose:
            print(change.message)

    def _sync(self, phase: Phase, plan: Plan) -> str:
        # apply() already brought the optimizer's slots in step; a Keras optimizer has one
        # learning rate, so a phase's lr becomes the rate from here on.
        lr = self.schedule.lr_at(phase.epoch)
        if lr is None:
            return ""
        self.model.optimizer.learning_rate = lr
        return f"lr {lr:g}"
