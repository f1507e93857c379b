"""Lightning callback that applies a freeze :class:`~layerlock.Schedule` during ``fit``.

``import layerlock.lightning`` imports Lightning (``lightning`` or ``pytorch_lightning``).

>>> import layerlock as ll
>>> from layerlock.lightning import FreezeScheduler
>>> callback = FreezeScheduler(ll.gradual(4))   # trainer = Trainer(callbacks=[callback])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .backends.wrappers import ddp_of
from .errors import DistributedFreezeError
from .operations import plan as plan_of
from .resolver import BnPolicy
from .schedule import Schedule
from .stepper import PhaseStepper, check_saved_state, log_option
from .torch import FreezeScheduler as _LoopScheduler

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
    from lightning.pytorch.utilities import rank_zero_info
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy  # type: ignore[no-redef,assignment]
    from pytorch_lightning.utilities import rank_zero_info  # type: ignore[no-redef]

__all__ = ["FreezeScheduler"]


class FreezeScheduler(Callback):
    """Apply ``schedule`` at the start of each training epoch, keeping the first optimizer
    (and its LR scheduler) in sync; phases are checked against the model in ``setup``.
    ``log`` receives the one-line message of each transition; the default,
    ``rank_zero_info``, logs it once (on rank 0) through Lightning's logger; None: silent.
    Its state goes into Lightning checkpoints, and resuming replays the phases before
    Lightning restores the optimizer, so the param groups match; a checkpoint of another
    schedule or model structure is refused (:meth:`load_state_dict`) before either.

    ``verbose=`` (the old name of ``log``) works for one more release, with a
    ``DeprecationWarning``; ``verbose=False`` is ``log=None``.

    Under ``strategy="ddp"``, ``"ddp_find_unused_parameters_true"`` or ``"ddp_spawn"``, each
    phase change that changes the trainable set applies the phase to the LightningModule
    and builds the strategy's ``DistributedDataParallel`` again in place, with its own
    arguments (as :class:`layerlock.torch.FreezeScheduler` does), so
    DDP's reducer all-reduces exactly the trainable parameters and the ranks stay
    identical. FSDP and DeepSpeed, which fix the trainable set when they wrap, are refused
    in ``setup`` with :class:`~layerlock.DistributedFreezeError` when the schedule changes it.
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
            _refuse_fixed_wrappers(trainer.strategy, self.schedule, pl_module, self.options)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # The strategy has wrapped the module by now, and no step has run yet.
        assert self.loop is not None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        scheduler = None if optimizer is None else next(
            (c.scheduler for c in trainer.lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) is optimizer),
            None)
        wrapper = trainer.strategy.model
        if wrapper is not pl_module:
            ddp = ddp_of(wrapper)
            if ddp is None or ddp.module is not pl_module:
                raise DistributedFreezeError(
                    f"{type(trainer.strategy).__name__} wraps the LightningModule in a {type(wrapper).__name__}, "
                    "which layerlock cannot rebuild at a phase change. Use strategy=\"ddp\" (or \"ddp_spawn\").")
            # Phases go to the module inside DDP; a changed trainable set rebuilds the wrapper.
            self.loop = _LoopScheduler(self.schedule, wrapper, None, log=self._log, **self.options)
        self.loop.optimizer, self.loop.scheduler = optimizer, scheduler
        if self._resume is not None:
            self.loop.load_state_dict(self._resume)  # before Lightning restores the optimizer
            self._resume = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        assert self.loop is not None
        self.loop.step(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state for Lightning's checkpoint: epoch, phase, schedule, the
        model's structure (see ``layerlock.torch.FreezeScheduler.state_dict``)."""
        return self.loop.state_dict() if self.loop is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the state of a checkpoint (``fit(ckpt_path=...)`` calls this after ``setup``,
        before the strategy builds the optimizer); the phases are replayed in ``on_fit_start``.
        A state of another schedule, or of a model of another structure, is refused here with
        :class:`~layerlock.LayerlockError`, before any phase is applied and before Lightning
        restores the optimizer and the loops.

        >>> import layerlock as ll
        >>> callback = FreezeScheduler(ll.gradual(2), log=None)
        >>> callback.load_state_dict({"epoch": 1, "phase": 0, "schedule": ll.gradual(3).to_dict()})
        Traceback (most recent call last):
        ...
        layerlock.errors.LayerlockError: this FreezeScheduler state was saved with another schedule, ...
        """
        state = dict(state_dict) or None
        if state is not None:  # before setup (no model yet) the structure is checked in on_fit_start
            check_saved_state(state, self.schedule, None if self.loop is None else self.loop.structure())
        self._resume = state


def _refuse_fixed_wrappers(strategy: Any, schedule: Schedule, module: Any, options: dict[str, Any]) -> None:
    """Refuse, before anything is wrapped, a strategy whose wrapper fixes the trainable set
    (FSDP1 flattens parameters, DeepSpeed builds its engine) when the schedule changes it."""
    if not isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        return
    start = {n for n, p in module.named_parameters() if p.requires_grad}
    for phase in schedule.phases:
        trainable = set(plan_of(module, schedule.spec_at(phase.epoch), **options).trainable)
        if trainable != start:
            raise DistributedFreezeError(
                f"{type(strategy).__name__} fixes the trainable set when it wraps the model, and this schedule "
                f"changes it at epoch {phase.epoch} ({phase.spec!r}). Use strategy=\"ddp\" (or \"ddp_spawn\"), "
                "whose wrapper layerlock rebuilds at each phase change; to shard, ModelParallelStrategy with "
                "torch.distributed.fsdp.fully_shard (FSDP2) in configure_model, which takes the changes; or apply "
                "one fixed spec before fit.")
