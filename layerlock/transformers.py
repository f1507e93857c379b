"""Hugging Face ``Trainer`` callback that applies a freeze :class:`~layerlock.Schedule`.

``import layerlock.transformers`` imports transformers (and torch).

>>> import layerlock as ll
>>> from layerlock.transformers import FreezeScheduler
>>> callback = FreezeScheduler(ll.Schedule({0: ll.freeze("bert"), 1: ll.unfreeze()}))
>>> # trainer = Trainer(model, args, train_dataset=..., callbacks=[callback])

The ``Trainer`` builds its optimizer once, from the parameters that require grad, and its
LR scheduler knows only the groups it was built with. This callback:

- checks every phase against the model when the ``Trainer`` is built and again when
  training begins (a pattern that matches nothing raises :class:`~layerlock.NoMatchError`);
- applies the first phase when the ``Trainer`` is built, so its optimizer holds only what
  that phase trains (pass the callback to ``Trainer(callbacks=[...])``);
- at each later phase, adds the newly trainable parameters to the Trainer's optimizer
  (through Accelerate's wrapper) as new groups that follow the Trainer's LR schedule, split
  into weight-decay and no-decay groups like the Trainer's own;
- logs one line per transition, also into ``trainer.state.log_history``;
- keeps its groups in the Trainer's checkpoints, so ``trainer.train(resume_from_checkpoint=...)``
  resumes into the same phase with the same optimizer and scheduler state;
- under several processes (``torchrun``, ``accelerate launch``), rebuilds the Trainer's
  ``DistributedDataParallel`` wrapper in place at each change of the trainable set, so its
  reducer all-reduces exactly the trainable parameters and the ranks stay identical.

A phase's ``lr`` is a base rate like ``TrainingArguments.learning_rate``: its groups run at
``lr`` times the schedule's current factor (warm-up, linear or cosine decay, constant),
exactly as the Trainer's groups run at ``learning_rate`` times that factor. Without ``lr``
the new groups take ``learning_rate``.

With a :class:`~layerlock.MetricSchedule` the phases advance on an evaluation metric: at each
of the Trainer's evaluations during ``train()`` (``on_evaluate``) the monitored metric is
observed, and when the :class:`~layerlock.Plateau` rule ends the phase the next one begins at
the next epoch (``unit="epoch"``) or the next optimizer step (``unit="step"``). The monitor is
named as ``TrainingArguments.metric_for_best_model`` is: ``"loss"`` reads the Trainer's
``"eval_loss"`` (a name without the ``"eval_"`` prefix gets it), ``"eval_loss"`` reads it
as is. Training needs evaluations: ``eval_strategy="epoch"`` or ``"steps"`` and an
``eval_dataset``, else ``train()`` raises :class:`~layerlock.SpecError` before the first step.

>>> schedule = ll.MetricSchedule([ll.freeze("bert"), ll.unfreeze()], monitor="loss", patience=2)
>>> FreezeScheduler(schedule).stepper.tracker.rule.monitor
'loss'
>>> # args = TrainingArguments(..., eval_strategy="epoch"); Trainer(model, args, train_dataset=...,
>>> #     eval_dataset=..., callbacks=[FreezeScheduler(schedule)]).train()
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .backends.distributed import rebuild_for, refuse_empty_phases, refuse_unrebuildable
from .backends.hf_internals import calling_trainer
from .backends.torch_internals import check_scheduler, extend_scheduler, wrap_state_dict
from .backends.wrappers import ddp_of, unwrap_prepared
from .diagnostics.torch import untracked
from .errors import DistributedFreezeError, LayerlockError, LayerlockWarning, SpecError
from .resolver import BnPolicy
from .results import Plan
from .schedule import MetricSchedule, Phase, Schedule
from .stepper import PhaseStepper, log_option, warn_check
from .torch import scheduled_settings, take_out

__all__ = ["FreezeScheduler"]

UNITS = ("epoch", "step")
_KEY = "layerlock"  # where the callback's groups travel inside the Trainer's optimizer / scheduler state


class FreezeScheduler(TrainerCallback):
    """Apply ``schedule`` during ``Trainer.train()``: phases start at epochs
    (``unit="epoch"``, at the start of that epoch) or at global optimizer steps
    (``unit="step"``, for runs measured in ``max_steps``). ``log`` receives the one-line
    message of each transition on the main process (None: only ``log_history``).

    ``schedule`` may be a :class:`~layerlock.MetricSchedule`: its phases end at the Trainer's
    evaluations (``eval_strategy="epoch"`` or ``"steps"``), and the next one begins at the next
    epoch or step (``unit``); with ``unit="step"``, ``patience``, ``min_epochs`` and
    ``max_epochs`` count evaluations. The tracker's phase starts, best value and wait count
    travel in the Trainer's checkpoints with the phase. With ``restore_best``, copies of the
    weights, optimizer and LR scheduler state are kept in memory at each best evaluation of
    the phase and put back when the phase ends, before the next phase is applied.

    >>> import layerlock as ll
    >>> FreezeScheduler(ll.gradual(3), unit="step").unit
    'step'
    >>> s = ll.MetricSchedule([ll.freeze("bert"), ll.unfreeze()], monitor="eval_loss", patience=1)
    >>> FreezeScheduler(s, unit="step").stepper.phase_count
    2
    """

    def __init__(self, schedule: Schedule | MetricSchedule, *, unit: str = "epoch", strict: bool = True,
                 bn: BnPolicy = "follow", frozen_mode: str | None = None,
                 log: Callable[[str], None] | None = print) -> None:
        if unit not in UNITS:
            raise SpecError(f"unit must be one of {UNITS}; received {unit!r}")
        self.stepper = PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode, unit=unit)
        self.schedule, self.unit = schedule, unit
        self.log = log_option("layerlock.transformers.FreezeScheduler", log)
        self._model: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None
        self._base_groups = 0  # the Trainer's own groups come first; the callback's follow
        self._args: Any = None
        self._ddp: torch.nn.parallel.DistributedDataParallel | None = None  # the Trainer's, under several processes
        self._training = False  # evaluations outside train() (trainer.evaluate()) decide nothing

    # -- Trainer events -------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # The first phase, before the Trainer builds its optimizer. A schedule that does not
        # fit the model, or a metric schedule without evaluations, is reported by
        # on_train_begin, where train() raises it; the model is left as it is.
        try:
            self._refuse_no_evaluation(args)
            self.stepper.check(model)
        except LayerlockError:
            return
        self.stepper.step(model, 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        self._refuse_no_evaluation(args)
        self._ddp = self._wrapper(args, self.stepper.check(model))
        self._model, self._args, self.stepper.kept = model, args, None
        self._optimizer, self._scheduler = unwrap_prepared(optimizer), unwrap_prepared(lr_scheduler)
        if self.stepper.phase_count > 1 and self._scheduler is not None:
            check_scheduler(self._scheduler)  # refuse before the first step, not at a transition
        groups = self._optimizer.param_groups
        saved = groups[-1].pop(_KEY, None)
        self._base_groups = len(groups)
        if saved is None:  # a fresh run: the phase in force now, logged
            self.stepper.phase = -1
            self._advance(state, self._at(state))
            if not self._optimizer.state:
                # What a phase froze has no optimizer state yet: leave it out of the Trainer's
                # groups, so it joins at its phase's rate when a later phase unfreezes it.
                take_out(self._optimizer, lambda p: not p.requires_grad)
        else:
            if saved.get("schedule", self.schedule.to_dict()) != self.schedule.to_dict():  # 0.2 saved none
                raise LayerlockError(
                    "this checkpoint was saved by a FreezeScheduler with another schedule "
                    f"({saved.get('schedule')!r}); received {self.schedule.to_dict()!r}. Resume with the schedule "
                    "that wrote it, or start a new run without resume_from_checkpoint.")
            self.stepper.load(saved)  # a metric schedule's phase starts, best value, wait count
            self.stepper.replay(model, saved["phase"], self._sync)
            self._restore(saved)
            self._warn_best_not_kept()
            self._advance(state, self._at(state))
        self._install_hooks()
        self._training = True
        warn_check(model, self._optimizer, self._scheduler, bn=self.stepper.options["bn"],
                   schedule=self.stepper.planned)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training, self.stepper.kept = False, None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.unit == "epoch":
            self._advance(state, self._at(state))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.unit == "step":
            self._advance(state, state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Mapping[str, Any] | None = None,
                    **kwargs: Any) -> None:
        """A metric schedule's decision point. The Trainer's evaluation loop gathers the
        losses and predictions of every process before computing ``metrics``, so under
        several processes (DDP under ``torchrun``) every rank reads the same value and takes
        the same decision: no further reduction is needed."""
        tracker = self.stepper.tracker
        if tracker is None or not self._training or state.global_step == 0:
            return  # a plain schedule; trainer.evaluate() outside train(); eval_on_start
        if tracker.phase > self.stepper.phase:
            return  # the next phase is decided and begins at the next epoch: nothing more to judge
        self.stepper.observe(self._decided_at(state), {tracker.rule.monitor: self._monitored(metrics)},
                             self._keep_best, self._restore_best)

    def _refuse_no_evaluation(self, args: Any) -> None:
        """A metric schedule decides at evaluations: refuse a run that has none."""
        if self.stepper.tracker is None:
            return
        strategy = getattr(args, "eval_strategy", getattr(args, "evaluation_strategy", None))  # 4.40: evaluation_
        strategy = getattr(strategy, "value", strategy)
        trainer = calling_trainer(Trainer)
        dataset = getattr(trainer, "eval_dataset", ...) if trainer is not None else ...
        if strategy in (None, "no") or dataset is None:
            got = f"eval_strategy={strategy!r}" + (", no eval_dataset" if dataset is None else "")
            raise SpecError(
                f"FreezeScheduler: this MetricSchedule moves on when {self.stepper.tracker.rule.monitor!r} stops "
                f"improving, which it reads at the Trainer's evaluations, and this run has none ({got}). Set "
                "TrainingArguments(eval_strategy='epoch') (or 'steps' with eval_steps=...) and pass the Trainer an "
                "eval_dataset; or give a plain layerlock.Schedule.")

    def _monitored(self, metrics: Mapping[str, Any] | None) -> Any:
        """The monitored value in the Trainer's ``metrics``, named as ``metric_for_best_model``
        is: a name without the ``eval_`` prefix gets it (``"loss"`` reads ``"eval_loss"``)."""
        assert self.stepper.tracker is not None
        monitor = self.stepper.tracker.rule.monitor
        metrics = metrics if isinstance(metrics, Mapping) else {}
        prefixed = monitor if monitor.startswith("eval_") else f"eval_{monitor}"
        for name in (prefixed, monitor):
            if name in metrics:
                return metrics[name]
        tried = repr(prefixed) if prefixed == monitor else f"{prefixed!r} (or {monitor!r})"
        raise SpecError(f"FreezeScheduler: the schedule monitors {monitor!r}, read as {tried} in the Trainer's "
                        f"evaluation metrics, which have {sorted(map(str, metrics))}. Give the MetricSchedule one of "
                        "them as monitor= (with or without the 'eval_' prefix), or return it from compute_metrics.")

    def _decided_at(self, state: Any) -> int:
        """The epoch (or step) an evaluation closes: the next phase begins at the one after."""
        if self.unit == "step":
            return max(state.global_step - 1, 0)
        return max(math.ceil((state.epoch or 0) - 1e-9) - 1, 0)

    def _keep_best(self) -> dict[str, Any]:
        """Copies of the weights, the optimizer's state and settings and the LR scheduler's
        state, taken around the hooks that fold the callback's groups for checkpoints."""
        optimizer = self._optimizer
        assert optimizer is not None and self._model is not None
        kept: dict[str, Any] = {"model": copy.deepcopy(self._model.state_dict()),
                                "groups": [], "state": []}
        for group in optimizer.param_groups:
            kept["groups"].append(copy.deepcopy({k: v for k, v in group.items() if k != "params"}))
            kept["state"].append([copy.deepcopy(optimizer.state.get(p)) for p in group["params"]])
        if self._scheduler is not None:
            kept["scheduler"] = copy.deepcopy({k: v for k, v in vars(self._scheduler).items()
                                               if k not in ("optimizer", "lr_lambdas", "state_dict")})
        return kept

    def _restore_best(self, kept: Mapping[str, Any]) -> None:
        """Put back what :meth:`_keep_best` kept (the phase's groups have not changed since)."""
        optimizer = self._optimizer
        assert optimizer is not None and self._model is not None
        self._model.load_state_dict(kept["model"])
        for group, settings, states in zip(optimizer.param_groups, kept["groups"], kept["state"]):
            group.update(settings)
            for p, saved in zip(group["params"], states):
                if saved is None:
                    optimizer.state.pop(p, None)
                else:
                    optimizer.state[p] = saved
        if self._scheduler is not None and "scheduler" in kept:
            vars(self._scheduler).update(kept["scheduler"])

    def _warn_best_not_kept(self) -> None:
        tracker = self.stepper.tracker
        if tracker is not None and tracker.rule.restore_best and tracker.best is not None:
            warnings.warn(
                "FreezeScheduler: restore_best keeps the best evaluation's weights in memory, not in the "
                f"checkpoint: this resumed run has no copy of the phase's best so far ({tracker.rule.monitor} = "
                f"{tracker.best:.6g}); if the phase ends before a better evaluation, it ends without restoring",
                LayerlockWarning, stacklevel=2)

    def _wrapper(self, args: Any, plans: list[Plan]) -> torch.nn.parallel.DistributedDataParallel | None:
        """Under several processes, the DistributedDataParallel wrapper the Trainer trains
        through (``trainer.model_wrapped``), which each change of the trainable set rebuilds
        in place. Under any other wrapper (FSDP, DeepSpeed), built with the first phase's
        trainable set, a schedule that unfreezes more later is refused: those gradients would
        not be averaged across ranks."""
        if getattr(args, "world_size", 1) <= 1 or len({frozenset(p.trainable) for p in plans}) < 2:
            return None
        wrapped = getattr(calling_trainer(Trainer), "model_wrapped", None)
        ddp = ddp_of(wrapped) if wrapped is not None else None
        if ddp is not None:
            refuse_unrebuildable(ddp)
            refuse_empty_phases(self.stepper.planned, plans)
            return ddp
        later = {n for p in plans[1:] for n in p.trainable} - set(plans[0].trainable)
        if later:
            raise DistributedFreezeError(
                f"this schedule unfreezes {len(later)} tensors after its first phase (e.g. {min(later)}), and with "
                f"{args.world_size} processes the Trainer trains through "
                f"{type(wrapped).__name__ if wrapped is not None else 'a wrapper layerlock cannot find'}, built with "
                "the first phase's trainable set: their gradients would not be averaged across ranks. Use "
                "DistributedDataParallel (torchrun or accelerate launch without an FSDP or DeepSpeed config), "
                "which layerlock rebuilds at each phase change; or run each phase as its own trainer.train().")
        return None

    # -- phases ---------------------------------------------------------------------------

    def _at(self, state: Any) -> int:
        return math.floor((state.epoch or 0) + 1e-9) if self.unit == "epoch" else state.global_step

    def _advance(self, state: Any, at: int) -> None:
        change = self.stepper.step(self._model, at, self._sync)
        if change is None:
            return
        state.log_history.append({"epoch": state.epoch, "step": state.global_step, _KEY: change.message})
        if self.log is not None and state.is_world_process_zero:
            self.log(change.message)

    def _sync(self, phase: Phase, plan: Plan) -> str:
        """Rebuild the DDP wrapper for the new trainable set; add the newly trainable
        parameters as the Trainer would group them, following its schedule from the phase's
        base rate."""
        rebuild_for(self._ddp, plan)
        optimizer = self._optimizer
        if optimizer is None:
            return ""
        new = untracked(optimizer, self._model.named_parameters())
        if not new:
            return ""
        decay = set(Trainer.get_decay_parameter_names(None, self._model))  # the Trainer's own rule
        base = phase.lr if phase.lr is not None else self._args.learning_rate
        settings = scheduled_settings(optimizer, base)
        named = any("param_names" in g for g in optimizer.param_groups)  # then every group must be named
        for weight_decay, pairs in ((self._args.weight_decay, [(n, p) for n, p in new if n in decay]),
                                    (0.0, [(n, p) for n, p in new if n not in decay])):
            if pairs:
                optimizer.add_param_group({"params": pairs if named else [p for _, p in pairs],
                                           "weight_decay": weight_decay, **settings})
                if self._scheduler is not None:
                    extend_scheduler(self._scheduler, optimizer.param_groups[-1])
        return f"optimizer +{len(new)} tensors at base lr {base:g}"

    # -- checkpoints ----------------------------------------------------------------------

    def _install_hooks(self) -> None:
        """Fold the callback's groups into the last of the Trainer's groups when the Trainer
        saves the optimizer (and the matching per-group lists of the scheduler), so the
        checkpoint loads into the optimizer a resumed Trainer builds; ``_restore`` unfolds."""
        optimizer, scheduler = self._optimizer, self._scheduler
        assert optimizer is not None
        if getattr(optimizer, "_layerlock_fold", None) is not self:
            optimizer.register_state_dict_post_hook(self._fold_optimizer)
            optimizer._layerlock_fold = self  # type: ignore[attr-defined]
        if scheduler is not None:
            wrap_state_dict(scheduler, self._fold_scheduler)

    def _fold_optimizer(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        n = self._base_groups
        groups, states = state_dict["param_groups"], dict(state_dict["state"])
        folded = []
        for group in groups[n:]:
            folded.append({**{k: v for k, v in group.items() if k != "params"},
                           "state": [states.pop(i, None) for i in group["params"]]})
        # the phase, the schedule and a metric schedule's tracker state (PhaseStepper.state_dict)
        last = {**groups[n - 1], _KEY: {**self.stepper.state_dict(), "groups": folded}}
        return {"state": states, "param_groups": [*groups[: n - 1], last]}

    def _fold_scheduler(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict.pop("state_dict", None)  # schedulers save their __dict__, which now holds the wrapper
        n, tails = self._base_groups, {}
        for name, values in list(state_dict.items()):
            if isinstance(values, list) and len(values) > n and name != _KEY:
                state_dict[name], tails[name] = values[:n], values[n:]
        state_dict[_KEY] = tails
        return state_dict

    def _restore(self, saved: Mapping[str, Any]) -> None:
        """Give the groups the replay rebuilt the state and settings they had when saved."""
        assert self._optimizer is not None
        live = self._optimizer.param_groups[self._base_groups:]
        if [len(g["params"]) for g in live] != [len(g["state"]) for g in saved["groups"]]:
            raise LayerlockError(
                "this checkpoint's layerlock optimizer groups do not match the ones replaying its schedule "
                f"gives ({[len(g['state']) for g in saved['groups']]} vs {[len(g['params']) for g in live]} "
                "tensors): resume with the same model, schedule and callback options")
        for group, old in zip(live, saved["groups"]):
            group.update({k: v for k, v in old.items() if k != "state"})
            for p, state in zip(group["params"], old["state"]):
                if state is not None:
                    self._optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and k != "step" else v
                                                for k, v in state.items()}
        tails = vars(self._scheduler).pop(_KEY, None) if self._scheduler is not None else None
        for name, tail in (tails or {}).items():
            if name != "lr_lambdas":  # the replay appended the callables; their saved state is {}
                getattr(self._scheduler, name)[self._base_groups:] = tail
