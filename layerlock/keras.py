"""Keras helpers: ``import layerlock.keras`` (this imports keras).

:func:`sync_optimizer` brings the optimizer of a custom training loop in step after an
``apply``, like its torch namesake. :class:`FreezeScheduler` is a Keras callback that
applies a :class:`~layerlock.Schedule` at the start of each epoch of ``fit``; the very next
step trains the new set, and the optimizer keeps its state for variables that stay trainable.

>>> import keras, layerlock as ll, layerlock.keras as llk
>>> callback = llk.FreezeScheduler(ll.gradual(3), log=None)   # model.fit(..., callbacks=[callback])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import keras

from .backends import get_backend
from .backends.keras import KerasBackend, TfKerasBackend, compiled_optimizer, short_name
from .backends.keras_internals import strategy_scope, sync_variables
from .errors import LayerlockError
from .resolver import BnPolicy
from .results import Plan
from .schedule import Phase, Schedule
from .stepper import PhaseStepper, log_option, warn_check

__all__ = ["FreezeScheduler", "KerasBackend", "TfKerasBackend", "structure_fingerprint", "sync_optimizer"]


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


def structure_fingerprint(model: Any) -> str:
    """SHA-256 of the variable paths and shapes: equal for models of the same structure
    (what :meth:`FreezeScheduler.load_state_dict` checks, like its torch namesake).

    >>> import keras
    >>> def net():
    ...     return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fc")])
    >>> structure_fingerprint(net()) == structure_fingerprint(net())
    True
    """
    backend = get_backend(model)
    digest = hashlib.sha256()
    for path, _, variable in backend.unique_variables(backend.walk(model)):
        digest.update(f"{path}:{tuple(int(d) for d in variable.shape)};".encode())
    return digest.hexdigest()


class FreezeScheduler(keras.callbacks.Callback):  # type: ignore[misc]
    """Apply ``schedule`` at epoch begin inside ``fit``.

    Every phase is checked against the model at ``on_train_begin``, so a pattern that
    matches nothing fails before the first step. A phase's ``lr`` sets the optimizer's
    learning rate from that epoch on (Keras optimizers have one rate for all variables).
    ``log`` receives the one-line message of each transition (default ``print``; None:
    silent). When training starts (after the first epoch's phase is applied) the set-up is
    checked once with :func:`layerlock.check`; what it finds comes as one
    :class:`~layerlock.LayerlockWarning` with the report's table.

    Resuming: ``fit(initial_epoch=e)`` applies the cumulative spec for epoch ``e`` by itself.
    ``state_dict()`` / ``load_state_dict(state)`` carry the phase across processes, as in
    the torch and NNX loop schedulers: on restart, ``set_model(model)`` (the model loaded
    from the checkpoint) and ``load_state_dict(saved)`` bring the model to the saved phase
    (its trainable set and the phase's learning rate) before ``fit(..., initial_epoch=
    saved["epoch"] + 1)``. A state saved for another schedule or another model structure
    raises :class:`~layerlock.LayerlockError` before anything changes.

    >>> import keras, layerlock as ll
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="body"),
    ...                           keras.layers.Dense(1, name="head")])
    >>> callback = FreezeScheduler(ll.Schedule({0: ll.freeze("body"), 2: ll.unfreeze()}), log=None)
    >>> callback.set_model(model)
    >>> saved = {**callback.state_dict(), "epoch": 1, "phase": 0}   # as saved after epoch 1
    >>> callback.load_state_dict(saved)
    >>> ll.plan(model, ll.Spec()).trainable
    ('head.kernel', 'head.bias')

    ``verbose=`` (the old name of ``log``) works for one more release, with a
    ``DeprecationWarning``; ``verbose=0`` is ``log=None``.
    """

    def __init__(self, schedule: Schedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = print,
                 verbose: int | bool | None = None) -> None:
        super().__init__()
        self.stepper = PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode)
        self.schedule = schedule
        self.log = log_option("layerlock.keras.FreezeScheduler", log, verbose)
        self.epoch = -1
        self._checked = False

    @property
    def phase(self) -> int:
        """Index of the phase in force (-1 before the first)."""
        return self.stepper.phase

    def on_train_begin(self, logs: Any = None) -> None:
        self.stepper.check(self.model)
        self.stepper.phase = -1  # fit(initial_epoch=e) re-applies the cumulative spec for e

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch
        change = self.stepper.step(self.model, epoch, self._sync)
        if not self._checked:
            self._checked = True
            warn_check(self.model, bn=self.stepper.options["bn"], schedule=self.schedule)
        if change is not None and self.log is not None:
            self.log(change.message)

    def _sync(self, phase: Phase, plan: Plan) -> str:
        # apply() already brought the optimizer's slots in step; a Keras optimizer has one
        # learning rate, so a phase's lr becomes the rate from here on.
        lr = self.schedule.lr_at(phase.epoch)
        optimizer = compiled_optimizer(self.model)
        if lr is None or optimizer is None:
            return ""
        optimizer.learning_rate = lr
        return f"lr {lr:g}"

    # -- resuming -------------------------------------------------------------------------

    def _bound_model(self, what: str) -> Any:
        model = self.model  # None until fit (or the user) calls set_model
        if model is None:
            raise LayerlockError(f"FreezeScheduler.{what}() needs the model: call callback.set_model(model) "
                                 "first (fit does it for its callbacks)")
        return model

    def state_dict(self) -> dict[str, Any]:
        """The epoch last begun, the phase in force, the schedule and the model's structure."""
        model = self._bound_model("state_dict")
        return {"epoch": self.epoch, "phase": self.stepper.phase, "schedule": self.schedule.to_dict(),
                "structure": structure_fingerprint(model)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Bring the model to the saved phase (trainable set, optimizer slots, the phase's
        learning rate), as ``fit(initial_epoch=e)`` would; refuse, before anything changes,
        a state of another schedule or another model structure."""
        model = self._bound_model("load_state_dict")
        missing = {"epoch", "phase", "schedule", "structure"} - set(state)
        if missing:
            raise LayerlockError(f"this is not a FreezeScheduler state: it lacks {sorted(missing)}; "
                                 "pass what FreezeScheduler.state_dict() returned")
        if structure_fingerprint(model) != state["structure"]:
            raise LayerlockError("this FreezeScheduler state was saved for a model of another structure "
                                 "(variable paths or shapes differ); load it into the same architecture")
        if Schedule.from_dict(state["schedule"]) != self.schedule:
            raise LayerlockError("this FreezeScheduler state was saved with a different schedule")
        self.stepper.check(model)
        self.stepper.replay(model, state["phase"], self._sync)
        self.epoch = state["epoch"]
