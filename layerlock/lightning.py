"""Lightning callback that applies a freeze :class:`~layerlock.Schedule` during ``fit``.

``import layerlock.lightning`` imports Lightning (``lightning`` or ``pytorch_lightning``).

>>> import layerlock as ll
>>> from layerlock.lightning import FreezeScheduler
>>> callback = FreezeScheduler(ll.gradual(4))   # trainer = Trainer(callbacks=[callback])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .resolver import BnPolicy
from .schedule import Schedule
from .stepper import PhaseStepper, log_option
from .torch import FreezeScheduler as _LoopScheduler

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities import rank_zero_info
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    from pytorch_lightning.utilities import rank_zero_info  # type: ignore[no-redef]

__all__ = ["FreezeScheduler"]


class FreezeScheduler(Callback):
    """Apply ``schedule`` at the start of each training epoch, keeping the first optimizer
    (and its LR scheduler) in sync; phases are checked against the model in ``setup``.
    ``log`` receives the one-line message of each transition; the default,
    ``rank_zero_info``, logs it once (on rank 0) through Lightning's logger; None: silent.
    Its state goes into Lightning checkpoints, and resuming replays the phases before
    Lightning restores the optimizer, so the param groups match.

    ``verbose=`` (the old name of ``log``) works for one more release, with a
    ``DeprecationWarning``; ``verbose=False`` is ``log=None``.
    """

    def __init__(self, schedule: Schedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = rank_zero_info,
                 verbose: bool | None = None) -> None:
        PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode)  # bad input fails here
        self.schedule = schedule
        self.options: dict[str, Any] = {"strict": strict, "bn": bn, "frozen_mode": frozen_mode}
        # Not self.log: the Trainer sets every callback's ``log`` to the module's metric logger.
        self._log = log_option("layerlock.lightning.FreezeScheduler", log, verbose, default=rank_zero_info)
        self.loop: _LoopScheduler | None = None
        self._resume: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.loop = _LoopScheduler(self.schedule, pl_module, None, log=self._log, **self.options)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        assert self.loop is not None
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            self.loop.optimizer = optimizer
            self.loop.scheduler = next((c.scheduler for c in trainer.lr_scheduler_configs
                                        if getattr(c.scheduler, "optimizer", None) is optimizer), None)
        if self._resume is not None:
            self.loop.load_state_dict(self._resume)
            self._resume = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        assert self.loop is not None
        self.loop.step(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict() if self.loop is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) or None
