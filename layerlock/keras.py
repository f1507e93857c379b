"""Keras helpers: ``import layerlock.keras`` (this imports keras).

:class:`FreezeScheduler` is a Keras callback that applies a :class:`~layerlock.Schedule`
at the start of each epoch of ``fit``; the very next step trains the new set, and the
optimizer keeps its state for variables that stay trainable.

>>> import keras, layerlock as ll, layerlock.keras as llk
>>> callback = llk.FreezeScheduler(ll.gradual(3), verbose=0)   # model.fit(..., callbacks=[callback])
"""

from __future__ import annotations

from typing import Any

import keras

from .backends.keras import KerasBackend, TfKerasBackend, sync_optimizer
from .errors import SpecError
from .operations import apply
from .resolver import BnPolicy
from .schedule import Schedule, transition

__all__ = ["FreezeScheduler", "KerasBackend", "TfKerasBackend", "sync_optimizer"]


class FreezeScheduler(keras.callbacks.Callback):  # type: ignore[misc]
    """Apply ``schedule`` at epoch begin inside ``fit``.

    Every phase is checked against the model at ``on_train_begin``, so a pattern that
    matches nothing fails before the first step. A phase's ``lr`` sets the optimizer's
    learning rate from that epoch on (Keras optimizers have one rate for all variables).
    Resuming with ``fit(initial_epoch=e)`` applies the cumulative spec for epoch ``e``.
    ``verbose=1`` prints a one-line log at each transition.
    """

    def __init__(self, schedule: Schedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, verbose: int = 1) -> None:
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise SpecError(f"FreezeScheduler needs a layerlock.Schedule; received {type(schedule).__name__}")
        self.schedule = schedule
        self.options: dict[str, Any] = {"strict": strict, "bn": bn, "frozen_mode": frozen_mode}
        self.verbose = verbose
        self.phase = -1

    def on_train_begin(self, logs: Any = None) -> None:
        self.schedule.check(self.model, **self.options)
        self.phase = -1

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        index = self.schedule.phase_index(epoch)
        if index == self.phase or index < 0:
            return
        result = apply(self.model, self.schedule.spec_at(epoch), **self.options)
        lr = next((p.lr for p in reversed(self.schedule.phases[: index + 1]) if p.lr is not None), None)
        if lr is not None:
            self.model.optimizer.learning_rate = lr
        self.phase = index
        if self.verbose:
            print(transition(epoch, index, self.schedule, result, f"lr {lr:g}" if lr is not None else ""))
