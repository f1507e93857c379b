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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .backends.distributed import rebuild_for, refuse_empty_phases, refuse_unrebuildable
from .backends.hf_internals import calling_trainer
from .backends.torch_internals import check_scheduler, extend_scheduler, wrap_state_dict
from .backends.wrappers import ddp_of, unwrap_prepared
from .diagnostics.torch import untracked
from .errors import DistributedFreezeError, LayerlockError, SpecError
from .resolver import BnPolicy
from .results import Plan
from .schedule import Phase, Schedule
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

    >>> import layerlock as ll
    >>> FreezeScheduler(ll.gradual(3), unit="step").unit
    'step'
    """

    def __init__(self, schedule: Schedule, *, unit: str = "epoch", strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = print) -> None:
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

    # -- Trainer events -------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # The first phase, before the Trainer builds its optimizer. A schedule that does not
        # fit the model is reported by on_train_begin, where train() raises it.
        try:
            self.stepper.check(model)
        except LayerlockError:
            return
        self.stepper.step(model, 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        self._ddp = self._wrapper(args, self.stepper.check(model))
        self._model, self._args = model, args
        self._optimizer, self._scheduler = unwrap_prepared(optimizer), unwrap_prepared(lr_scheduler)
        if len(self.schedule.phases) > 1 and self._scheduler is not None:
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
            self.stepper.replay(model, saved["phase"], self._sync)
            self._restore(saved)
            self._advance(state, self._at(state))
        self._install_hooks()
        warn_check(model, self._optimizer, self._scheduler, bn=self.stepper.options["bn"], schedule=self.schedule)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.unit == "epoch":
            self._advance(state, self._at(state))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.unit == "step":
            self._advance(state, state.global_step)

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
            refuse_empty_phases(self.schedule, plans)
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
        last = {**groups[n - 1], _KEY: {"phase": self.stepper.phase, "groups": folded,
                                        "schedule": self.schedule.to_dict()}}
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
