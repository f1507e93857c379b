"""Lightning callback that applies a freeze :class:`~layerlock.Schedule` (or a
:class:`~layerlock.MetricSchedule`, whose phases begin when a logged metric stops
improving) during ``fit``.

``import layerlock.lightning`` imports Lightning (``lightning`` or ``pytorch_lightning``).

>>> import layerlock as ll
>>> from layerlock.lightning import FreezeScheduler
>>> callback = FreezeScheduler(ll.gradual(4))   # trainer = Trainer(callbacks=[callback])
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from .backends.wrappers import ddp_of
from .errors import DistributedFreezeError, SpecError
from .operations import plan as plan_of
from .resolver import BnPolicy
from .schedule import MetricSchedule, Schedule
from .stepper import PhaseStepper, check_saved_state, log_option
from .torch import FreezeScheduler as _LoopScheduler

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
    from lightning.pytorch.utilities import rank_zero_info
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy  # type: ignore[no-redef,assignment]
    from pytorch_lightning.utilities import rank_zero_info  # type: ignore[no-redef]
    from pytorch_lightning.utilities.model_helpers import is_overridden  # type: ignore[no-redef]

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

    A :class:`~layerlock.MetricSchedule` is decided on ``trainer.callback_metrics[monitor]``
    once per training epoch, where Lightning's ``EarlyStopping`` looks: at the end of the
    validation that closes the epoch (``on_validation_end``, not the sanity check), or at
    ``on_train_epoch_end`` when the module has no validation (an epoch whose validation
    was skipped, as with ``check_val_every_n_epoch=2``, is not counted). The next phase
    begins at the next epoch, and its log line starts with the metric values that decided
    it. Under several processes the value is averaged over the ranks
    (``trainer.strategy.reduce``) first, so every rank takes the same decision. With
    ``restore_best=True`` the phase's best epoch (the module's weights, the optimizers' and
    LR schedulers' states, copies kept in memory) is put back when the phase ends, before
    the next one is applied. A monitor that ``callback_metrics`` lacks raises
    :class:`~layerlock.SpecError` naming the keys it has. The decision's state (phase
    starts, best value, wait count and, with ``restore_best``, the kept copy of the best
    epoch, so such a checkpoint holds the weights and optimizer state twice) goes into the
    checkpoint, so ``fit(ckpt_path=...)`` continues where the interrupted run was::

        schedule = ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="val_loss", patience=2)
        trainer = Trainer(callbacks=[FreezeScheduler(schedule)])   # validation_step logs "val_loss"

    Under ``strategy="ddp"``, ``"ddp_find_unused_parameters_true"`` or ``"ddp_spawn"``, each
    phase change that changes the trainable set applies the phase to the LightningModule
    and builds the strategy's ``DistributedDataParallel`` again in place, with its own
    arguments (as :class:`layerlock.torch.FreezeScheduler` does), so
    DDP's reducer all-reduces exactly the trainable parameters and the ranks stay
    identical. FSDP and DeepSpeed, which fix the trainable set when they wrap, are refused
    in ``setup`` with :class:`~layerlock.DistributedFreezeError` when the schedule changes it.

    >>> import layerlock as ll
    >>> schedule = ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="val_loss", patience=2)
    >>> FreezeScheduler(schedule, log=None).schedule.rule.monitor
    'val_loss'
    """

    def __init__(self, schedule: Schedule | MetricSchedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = rank_zero_info,
                 verbose: bool | None = None) -> None:
        PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode,
                     owner="layerlock.lightning.FreezeScheduler")  # bad input fails here
        self.schedule = schedule
        self.options: dict[str, Any] = {"strict": strict, "bn": bn, "frozen_mode": frozen_mode}
        # Not self.log: the Trainer sets every callback's ``log`` to the module's metric logger.
        self._log = log_option("layerlock.lightning.FreezeScheduler", log, verbose, default=rank_zero_info)
        self.loop: _Loop | None = None
        self._resume: dict[str, Any] | None = None
        self._decided = self._validated = -1  # the last epochs decided on and validated

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.loop = _Loop(self.schedule, pl_module, trainer, log=self._log, **self.options)
            _refuse_fixed_wrappers(trainer.strategy, self.loop.stepper.planned, pl_module, self.options)
            self._decided = self._validated = -1

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
            self.loop = _Loop(self.schedule, wrapper, trainer, log=self._log, **self.options)
        self.loop.optimizer, self.loop.scheduler = optimizer, scheduler
        if self._resume is not None:
            self.loop.load_state_dict(self._resume)  # before Lightning restores the optimizer
            self._resume = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        assert self.loop is not None
        self.loop.step(trainer.current_epoch)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._deciding(trainer):
            return
        self._validated = trainer.current_epoch
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # the validation that closes the epoch
            self._decide(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._deciding(trainer) or self._decided == trainer.current_epoch:
            return
        validates = is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0
        if self._validated == trainer.current_epoch or not validates:
            self._decide(trainer)

    def _deciding(self, trainer: Any) -> bool:
        """Whether a metric schedule is fitted now (not in a sanity check or ``validate``)."""
        return (self.loop is not None and self.loop.stepper.tracker is not None and not trainer.sanity_checking
                and trainer.state.fn == "fit")

    def _decide(self, trainer: Any) -> None:
        """The verdict on this epoch's ``callback_metrics`` (see :class:`_Loop`)."""
        assert self.loop is not None and self.loop.stepper.tracker is not None
        epoch, metrics = trainer.current_epoch, trainer.callback_metrics
        monitor = self.loop.stepper.tracker.rule.monitor
        if monitor not in metrics:
            raise SpecError(
                f"layerlock.lightning.FreezeScheduler: the schedule monitors {monitor!r}, which "
                f"trainer.callback_metrics does not have at the end of epoch {epoch}; it has "
                f"{sorted(map(str, metrics))}. Log it (self.log({monitor!r}, value) in validation_step) "
                "or give the MetricSchedule one of those as monitor=. Nothing was changed.")
        self._decided = epoch
        self.loop.end_epoch(epoch, {monitor: metrics[monitor]})

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state for Lightning's checkpoint: epoch, phase, schedule, the
        model's structure (see ``layerlock.torch.FreezeScheduler.state_dict``) and, for a
        :class:`~layerlock.MetricSchedule`, its phase starts, best value and wait count."""
        if self.loop is None:
            return {}
        return self.loop.state_dict()

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


class _Loop(_LoopScheduler):
    """The torch scheduler as the callback drives it: a metric schedule's verdict is taken
    at the end of an epoch (``end_epoch``, on the value averaged over the ranks), and the
    phase it decides begins at the next epoch's :meth:`step`; ``restore_best`` keeps and
    puts back the LightningModule's, optimizers' and LR schedulers' states."""

    def __init__(self, schedule: Schedule | MetricSchedule, model: Any, trainer: Any, **options: Any) -> None:
        super().__init__(schedule, model, None, **options)  # type: ignore[arg-type]
        self.trainer = trainer

    def _reduce(self, value: float) -> float:
        strategy = self.trainer.strategy
        device = strategy.root_device
        tensor = torch.tensor(value, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        return float(strategy.reduce(tensor, reduce_op="mean"))

    def _keep_best(self) -> Any:
        trainer = self.trainer
        return (copy.deepcopy(trainer.lightning_module.state_dict()),
                [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
                [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs])

    def _restore_best(self, kept: Any) -> None:
        module, optimizers, schedulers = kept
        trainer = self.trainer
        trainer.lightning_module.load_state_dict(module)
        for optimizer, state in zip(trainer.optimizers, optimizers):
            optimizer.load_state_dict(state)
        for config, state in zip(trainer.lr_scheduler_configs, schedulers):
            config.scheduler.load_state_dict(state)


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
