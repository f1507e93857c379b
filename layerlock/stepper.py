"""The runtime that walks a model through a :class:`~layerlock.Schedule`: one routine
(:class:`PhaseStepper`) that the torch, Keras, Lightning, Hugging Face and JAX schedulers
adapt, the plain-loop scheduler they share (:class:`LoopScheduler`), the check they run
when training starts (:func:`warn_check`), the ``log=`` option they all take
(:func:`log_option`) and the check of a saved state before a resume
(:func:`check_saved_state`, :func:`structure_digest`).

>>> import torch, layerlock as ll
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
>>> stepper = PhaseStepper(ll.Schedule({0: ll.freeze("0"), 2: ll.unfreeze()}))
>>> stepper.step(net, 0).phase, stepper.step(net, 1)
(0, None)
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ._format import count
from .errors import LayerlockError, LayerlockWarning, SpecError
from .operations import apply, check, plan
from .resolver import BnPolicy, check_options
from .results import Plan, Report
from .schedule import MetricSchedule, Phase, Schedule
from .spec import Spec


class Transition(NamedTuple):
    """A phase change: the epoch (or step) it happened at, the index of the phase it entered,
    the applied plan and the one-line log."""

    at: int
    phase: int
    plan: Plan
    message: str


class PhaseStepper:
    """The one routine that walks a model through a :class:`Schedule`; the torch, Keras,
    Lightning, Hugging Face and JAX schedulers are thin adapters around it.

    ``step(model, at, sync)`` applies the cumulative spec when ``at`` enters a new phase,
    then calls ``sync(phase, plan)`` (the framework's optimizer housekeeping, which returns
    a note for the log) and returns the :class:`Transition`; otherwise it returns None.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> stepper = PhaseStepper(ll.Schedule({0: ll.freeze("0"), 2: ll.unfreeze()}))
    >>> [p.trainable_scalars for p in stepper.check(net)]   # each phase planned, nothing changed
    [3, 9]
    >>> print(stepper.step(net, 0).message)
    layerlock: epoch 0: phase 1/2 Spec(freeze('0')): +0 / -6 trainable scalars, 3 trainable (33.3%)
    >>> stepper.step(net, 1) is None
    True
    """

    def __init__(self, schedule: Schedule | MetricSchedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, unit: str = "epoch", owner: str = "FreezeScheduler") -> None:
        if not isinstance(schedule, (Schedule, MetricSchedule)):
            raise SpecError(f"{owner} needs a layerlock.Schedule such as ll.gradual(3), or a layerlock.MetricSchedule; "
                            f"received {schedule!r} ({type(schedule).__name__})")
        check_options(Spec(), bn, frozen_mode)
        self.given, self.unit, self.phase = schedule, unit, -1
        self.tracker = PlateauTracker(schedule, owner, unit) if isinstance(schedule, MetricSchedule) else None
        self.reason = ""  # why the phase about to begin begins (a metric schedule's verdict)
        self.kept: Any = None  # restore_best: the framework's copy of the phase's best epoch
        self.options: dict[str, Any] = {"strict": strict, "bn": bn, "frozen_mode": frozen_mode}

    @property
    def schedule(self) -> Schedule:
        """The schedule in force: the given one, or the phases of a metric schedule begun so far."""
        return self.given if isinstance(self.given, Schedule) else self.tracker.schedule()  # type: ignore[union-attr]

    @property
    def phase_count(self) -> int:
        return len(self.given.phases if isinstance(self.given, Schedule) else self.given.specs)

    @property
    def planned(self) -> Schedule:
        """Every phase as a Schedule: the given one, or a metric schedule's phases one epoch
        apart (what :meth:`check` plans and :func:`warn_check` counts)."""
        given = self.given
        return given if isinstance(given, Schedule) else given.schedule(list(range(self.phase_count)))

    def check(self, model: Any) -> list[Plan]:
        """Plan every phase on ``model`` (changing nothing), so a pattern that matches
        nothing fails before training starts, not at epoch 7; the plans, one per phase."""
        every = self.planned
        return [plan(model, every.spec_at(phase.epoch), **self.options) for phase in every.phases]

    def observe(self, at: int, metrics: Mapping[str, Any], keep: Callable[[], Any] | None = None,
                restore: Callable[[Any], None] | None = None) -> Verdict | None:
        """A metric schedule's verdict on the metrics at the end of ``at`` (the next phase, if
        they end this one, begins at ``at + 1``); None for a plain schedule. With
        ``restore_best``, ``keep()`` copies what the framework restores (weights, optimizer,
        LR scheduler) at each best of a phase that has a next one, held in :attr:`kept`, and
        ``restore(kept)`` puts it back when the phase ends."""
        if self.tracker is None:
            return None
        keeping = keep is not None and self.tracker.rule.restore_best and self.tracker.phase < self.phase_count - 1
        verdict = self.tracker.observe(at, metrics)
        if verdict.reason:
            self.reason = verdict.reason
        if keeping:
            if verdict.best:
                self.kept = keep()  # type: ignore[misc]
            if verdict.reason:
                if self.kept is not None and restore is not None:
                    restore(self.kept)
                    self.reason += "; best epoch restored"
                self.kept = None
        return verdict

    def step(self, model: Any, at: int, sync: Callable[[Phase, Plan], str] | None = None) -> Transition | None:
        """Bring ``model`` to the phase in force at ``at``; the transition, or None."""
        schedule = self.schedule
        index = schedule.phase_index(at)
        if index == self.phase or index < 0:
            return None
        result = apply(model, schedule.spec_at(at), **self.options)
        phase = schedule.phases[index]
        note = sync(phase, result) if sync is not None else ""
        self.phase = index
        change = [result.scalars(k) - result.scalars(k, after=False) for k in range(len(result.paths))]
        gained, lost = sum(d for d in change if d > 0), -sum(d for d in change if d < 0)
        total = result.trainable_scalars + result.frozen_scalars
        share = 100 * result.trainable_scalars / total if total else 0.0
        reason, self.reason = self.reason, ""
        message = (f"layerlock: {self.unit} {at}: {reason + ': ' if reason else ''}phase {index + 1}/"
                   f"{self.phase_count} {phase.spec!r}: +{count(gained)} / -{count(lost)} trainable scalars, "
                   f"{count(result.trainable_scalars)} trainable ({share:.1f}%)" + (f"; {note}" if note else ""))
        return Transition(at, index, result, message)

    def state_dict(self) -> dict[str, Any]:
        """The phase in force, the schedule and, for a metric schedule, its tracker's state."""
        state = {"phase": self.phase, "schedule": self.given.to_dict()}
        if self.tracker is not None:
            state["plateau"] = self.tracker.state_dict()
            if self.reason:  # decided, not begun yet: the next phase's log line still says why
                state["reason"] = self.reason
        return state

    def load(self, state: Mapping[str, Any]) -> None:
        """Take a metric schedule's tracker state from a saved ``state`` (checked already by
        :func:`check_saved_state`), so that :meth:`replay` knows when each phase began."""
        if self.tracker is not None:
            self.tracker.load_state_dict(state.get("plateau", {}))
            self.reason = state.get("reason", "")

    def replay(self, model: Any, phase: int, sync: Callable[[Phase, Plan], str] | None = None) -> None:
        """Step silently through the phases up to index ``phase``, as the interrupted run
        did, so a resumed run has the same trainable set and optimizer layout before its
        optimizer state is loaded."""
        pending = self.reason  # a decided phase that has not begun keeps its reason
        for p in self.schedule.phases[: phase + 1]:
            self.step(model, p.epoch, sync)
        self.reason = pending


def warn_check(model: Any, optimizer: Any = None, scheduler: Any = None, *, bn: BnPolicy = "follow",
               schedule: Schedule | None = None) -> Report:
    """Run :func:`layerlock.check` on a training set-up and warn once, with its table, when
    it finds something: what the freeze schedulers and callbacks do when training starts.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Linear(2, 1)
    >>> bool(warn_check(net, torch.optim.SGD(net.parameters(), lr=0.1)))
    False
    """
    report = check(model, optimizer, scheduler=scheduler, bn=bn, schedule=schedule)
    if report:
        warnings.warn(str(report), LayerlockWarning, stacklevel=3)
    return report


def log_option(owner: str, log: Any, verbose: Any = None, *, default: Any = print) -> Callable[[str], None] | None:
    """The ``log`` a freeze scheduler uses: a callable that takes the one-line message of
    each transition, or None for silence. ``verbose`` is the deprecated spelling some
    callbacks had (``verbose=0`` is ``log=None``, a true value is ``default``); it warns
    with a :class:`DeprecationWarning`, and giving it together with ``log`` is refused.

    >>> log_option("FreezeScheduler", None) is None
    True
    >>> log_option("FreezeScheduler", 0)
    Traceback (most recent call last):
    ...
    layerlock.errors.SpecError: FreezeScheduler: log must be a callable that takes the message (print, logging.info) or None for silence; received 0 (int)
    """
    if verbose is not None:
        if log is not default:
            raise SpecError(f"{owner}: give log= or the deprecated verbose=, not both; received log={log!r} and "
                            f"verbose={verbose!r}. Keep log= (None for silence).")
        warnings.warn(f"{owner}(verbose=...) is deprecated and goes in the next release: pass "
                      f"log=None for verbose=0, or a callable that takes the message (default "
                      f"{getattr(default, '__name__', default)}).", DeprecationWarning, stacklevel=3)
        return default if verbose else None
    if log is not None and not callable(log):
        raise SpecError(f"{owner}: log must be a callable that takes the message (print, logging.info) or None "
                        f"for silence; received {log!r} ({type(log).__name__})")
    return log  # type: ignore[no-any-return]


class LoopScheduler:
    """What a freeze scheduler for a plain training loop does in every framework: call
    ``step(epoch)`` at the start of each epoch; on a phase change it applies the spec, calls
    the framework's ``_sync(phase, plan)`` (optimizer housekeeping, a note for the log) and
    logs one line. Every phase is checked when it is built, and at the first ``step`` the
    set-up is checked with :func:`layerlock.check` (a warning with the report if it finds
    something). ``state_dict`` /
    ``load_state_dict`` resume: call ``load_state_dict`` before restoring the optimizer, it
    replays the phases so the optimizer has the interrupted run's layout.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> loop = LoopScheduler(ll.Schedule({0: ll.freeze("0"), 2: ll.unfreeze()}), net, log=None)
    >>> _ = loop.step(0); net[0].weight.requires_grad, loop.phase
    (False, 0)
    """

    def __init__(self, schedule: Schedule | MetricSchedule, model: Any, *, strict: bool = True,
                 bn: BnPolicy = "follow", frozen_mode: str | None = None,
                 log: Callable[[str], None] | None = print) -> None:
        self.stepper = PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode,
                                    owner=f"{type(self).__module__}.{type(self).__name__}")
        self.schedule, self.model = schedule, model
        self.log = log_option(f"{type(self).__module__}.{type(self).__name__}", log)
        self.epoch = -1
        self._refuse(self.stepper.check(model))
        self._checked = False
        self.observed = -1  # the last epoch whose metrics a metric schedule has judged

    def _refuse(self, plans: list[Plan]) -> None:
        """Refuse, before anything changes, phases this loop cannot carry out; ``plans`` are
        the phases' plans on the model (none is refused here)."""

    @property
    def phase(self) -> int:
        """Index of the phase in force (-1 before the first)."""
        return self.stepper.phase

    def step(self, epoch: int, metrics: Mapping[str, Any] | None = None) -> Plan | None:
        """Bring the model to the phase in force at ``epoch``; return the plan on a change.
        With a :class:`~layerlock.MetricSchedule`, ``metrics`` are the previous epoch's (its
        validation loss, say): the verdict on them decides whether a new phase begins now."""
        tracker = self.stepper.tracker
        if tracker is not None and 0 < epoch and self.observed < epoch - 1:
            if metrics is None:
                raise SpecError(f"{type(self).__name__}: this schedule moves on when {tracker.rule.monitor!r} stops "
                                f"improving, so step({epoch}, metrics={{...}}) needs the metrics of epoch {epoch - 1}, "
                                f"such as metrics={{'{tracker.rule.monitor}': value}} (or call end_epoch({epoch - 1}, "
                                "metrics) when the epoch ends)")
            self.end_epoch(epoch - 1, metrics)
        self.epoch = epoch
        change = self.stepper.step(self.model, epoch, self._sync)
        if not self._checked:  # the set-up as training starts: the first phase and its optimizer
            self._checked = True
            warn_check(self.model, getattr(self, "optimizer", None), getattr(self, "scheduler", None),
                       bn=self.stepper.options["bn"], schedule=self.stepper.planned)
        if change is None:
            return None
        if self.log is not None:
            self.log(change.message)
        return change.plan

    def _sync(self, phase: Phase, plan: Plan) -> str:
        return ""

    def end_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """A :class:`~layerlock.MetricSchedule`'s verdict on the metrics at the end of
        ``epoch`` (what ``step(epoch + 1, metrics=...)`` does first; a plain schedule ignores
        them): the mean over the processes decides, and a phase it ends is followed by the next
        at ``step(epoch + 1)``. With ``restore_best``, the phase's best epoch is kept
        (:meth:`_keep_best`) and brought back when the phase ends (:meth:`_restore_best`)."""
        tracker = self.stepper.tracker
        if tracker is None or epoch <= self.observed:
            return
        self.observed = epoch
        self.stepper.observe(epoch, {tracker.rule.monitor: self._reduce(tracker.value(metrics))},
                             self._keep_best, self._restore_best)

    def _reduce(self, value: float) -> float:
        """The monitored value every process decides on (one process: ``value``)."""
        return value

    def _keep_best(self) -> Any:
        """A copy of what ``restore_best`` brings back (weights, optimizer, LR scheduler)."""
        raise SpecError(f"{type(self).__name__} cannot restore the best epoch (restore_best=True)")

    def _restore_best(self, kept: Any) -> None:
        """Put back what :meth:`_keep_best` kept."""

    def structure(self) -> str | None:
        """The model's :func:`structure_digest`, which the state records and ``load_state_dict``
        compares; None where the framework's scheduler does not record one.

        >>> import torch, layerlock as ll
        >>> LoopScheduler(ll.Schedule({0: ll.freeze("weight")}), torch.nn.Linear(1, 1), log=None).structure() is None
        True
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """The epoch last begun, the phase in force, the schedule and, where the framework's
        scheduler records it, the model's structure (:func:`structure_digest`)."""
        state = {"epoch": self.epoch, **self.stepper.state_dict()}
        if self.stepper.tracker is not None:
            state["observed"] = self.observed
            if self.stepper.kept is not None:  # restore_best after a resume needs the phase's best epoch
                state["best_state"] = self.stepper.kept
        structure = self.structure()
        if structure is not None:
            state["structure"] = structure
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the phase, replaying the phases so the optimizer matches the saved run. A
        state saved with another schedule, or for a model of another structure, is refused
        with :class:`~layerlock.LayerlockError` before anything changes.

        >>> import torch, layerlock as ll
        >>> loop = LoopScheduler(ll.Schedule({0: ll.freeze("0")}), torch.nn.Sequential(torch.nn.Linear(2, 1)))
        >>> state = {**loop.state_dict(), "schedule": ll.Schedule({0: ll.freeze()}).to_dict()}
        >>> loop.load_state_dict(state)
        Traceback (most recent call last):
        ...
        layerlock.errors.LayerlockError: this FreezeScheduler state was saved with another schedule, ...
        """
        check_saved_state(state, self.schedule, self.structure())
        self.stepper.load(state)
        self.stepper.replay(self.model, state["phase"], self._sync)
        self.epoch = state["epoch"]
        self.observed, self.stepper.kept = state.get("observed", self.epoch - 1), state.get("best_state")


def check_saved_state(state: Any, schedule: Schedule | MetricSchedule, structure: str | None = None) -> None:
    """Refuse with :class:`~layerlock.LayerlockError`, changing nothing, a freeze scheduler
    ``state`` that was not saved with ``schedule`` (or, given the model's
    :func:`structure_digest`, for a model of this ``structure``; a state that records no
    structure, as those of layerlock 0.2's NNX scheduler, is not compared).

    >>> import layerlock as ll
    >>> state = {"epoch": 3, "phase": 1, "schedule": ll.gradual(2).to_dict(),
    ...          "structure": structure_digest([("w", (3,))])}
    >>> check_saved_state(state, ll.gradual(2))
    >>> check_saved_state(state, ll.gradual(2), structure_digest([("w", (2,))]))
    Traceback (most recent call last):
    ...
    layerlock.errors.LayerlockError: this FreezeScheduler state was saved for a model of another structure ...
    """
    keys = {"epoch", "phase", "schedule"}
    if not isinstance(state, Mapping) or not keys <= set(state):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise LayerlockError(f"this is not a FreezeScheduler state: received {got}; a state has the keys "
                             f"{sorted(keys)} (what FreezeScheduler.state_dict() returns)")
    saved_as = state.get("structure", structure)  # a state from before structures were recorded: unchecked
    if structure is not None and saved_as != structure:
        raise LayerlockError(
            "this FreezeScheduler state was saved for a model of another structure (parameter paths or "
            f"shapes differ): saved {str(saved_as)[:12]}, this model {structure[:12]}. Load it into the "
            "architecture it was saved from. Nothing was changed.")
    try:
        saved = type(schedule).from_dict(state["schedule"])
    except SpecError as exc:
        raise LayerlockError(f"this FreezeScheduler state holds no readable {type(schedule).__name__}: {exc}") from None
    if saved != schedule:
        raise LayerlockError(f"this FreezeScheduler state was saved with another schedule, {saved!r}; this "
                             f"scheduler runs {schedule!r}. Resume with a FreezeScheduler built with "
                             "the saved schedule (layerlock.Schedule.from_dict(state['schedule'])). "
                             "Nothing was changed.")
    phase, count = state["phase"], len(schedule.phases if isinstance(schedule, Schedule) else schedule.specs)
    if not isinstance(phase, int) or not -1 <= phase < count:
        raise LayerlockError(f"this FreezeScheduler state's phase is {phase!r}; its schedule has phases "
                             f"0 to {count - 1} (-1: before the first)")
    if isinstance(schedule, MetricSchedule):
        plateau = state.get("plateau")
        starts = plateau.get("starts") if isinstance(plateau, Mapping) else None
        if not isinstance(starts, list) or not len(starts) - 2 <= phase <= len(starts) - 1:
            raise LayerlockError(f"this FreezeScheduler state's phase {phase!r} does not fit its metric schedule's "
                                 f"phase starts {starts!r}: the phase in force is the last begun (or the one before, "
                                 "saved between a verdict and the next epoch)")


def structure_digest(shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """SHA-256 of ``(path, shape)`` pairs, in order: equal for models of the same structure.
    What freeze scheduler states record, so a state saved for another model is refused;
    ``layerlock.torch.structure_fingerprint`` and ``layerlock.keras.structure_fingerprint``
    give it their models' parameters.

    >>> structure_digest([("fc.weight", (1, 2))]) == structure_digest([("fc.weight", [1, 2])])
    True
    >>> structure_digest([("fc.weight", (1, 2))]) == structure_digest([("fc.weight", (2, 1))])
    False
    """
    digest = hashlib.sha256()
    for path, shape in shapes:
        digest.update(f"{path}:{tuple(int(d) for d in shape)};".encode())
    return digest.hexdigest()


class Verdict(NamedTuple):
    """What one epoch's metric said (:meth:`PlateauTracker.observe`): whether it was the
    phase's best so far, and, when it ends the phase, why (else ``""``)."""

    best: bool
    reason: str


class PlateauTracker:
    """The runtime of a :class:`~layerlock.MetricSchedule`: fed the metrics at the end of
    each epoch, it decides when the next phase begins (the epoch after); :meth:`schedule` is
    the plain Schedule of the phases begun so far. ``state_dict`` / ``load_state_dict`` carry
    the phase, its start epochs, best value and wait count through a restart.

    >>> import layerlock as ll
    >>> t = PlateauTracker(ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="loss", patience=1))
    >>> [t.observe(e, {"loss": v}).reason for e, v in enumerate([1.0, 0.5, 0.6])]
    ['', '', 'loss did not improve on 0.5 (epoch 1) for 1 epoch']
    >>> t.starts, t.schedule().phase_index(3)
    ([0, 3], 1)
    """

    def __init__(self, schedule: MetricSchedule, owner: str = "FreezeScheduler", unit: str = "epoch") -> None:
        self.metric_schedule, self.rule, self.owner, self.unit = schedule, schedule.rule, owner, unit
        self.starts = [0]
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.epochs = 0  # epochs observed in this phase

    @property
    def phase(self) -> int:
        return len(self.starts) - 1

    def schedule(self) -> Schedule:
        return self.metric_schedule.schedule(self.starts)

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The monitored metric in ``metrics`` as a float; SpecError naming the keys there are."""
        monitor = self.rule.monitor
        if not isinstance(metrics, Mapping) or monitor not in metrics:
            keys = sorted(map(str, metrics)) if isinstance(metrics, Mapping) else type(metrics).__name__
            raise SpecError(f"{self.owner}: the schedule monitors {monitor!r}, which the metrics do not have; they "
                            f"have {keys}. Give Plateau(monitor=...) one of them, or log {monitor!r}.")
        try:
            return float(metrics[monitor])
        except (TypeError, ValueError):
            raise SpecError(f"{self.owner}: metric {monitor!r} must be a number; received "
                            f"{metrics[monitor]!r}") from None

    def observe(self, epoch: int, metrics: Mapping[str, Any]) -> Verdict:
        """Record epoch ``epoch``'s metrics; when they end the phase, the next one begins at
        ``epoch + 1``. In the last phase it only keeps the best value."""
        value, rule = self.value(metrics), self.rule
        if not math.isfinite(value):
            warnings.warn(f"{self.owner}: {rule.monitor} = {value} at epoch {epoch} is not finite; counted as no "
                          "improvement", LayerlockWarning, stacklevel=3)
        self.epochs += 1
        best = rule.improved(value, self.best)
        if best:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        if self.phase == len(self.metric_schedule.specs) - 1:
            return Verdict(best, "")
        reason, (least, most) = "", rule.bounds(self.phase)
        if most is not None and self.epochs >= most:
            reason = f"the phase ran its max_epochs={most}"
        elif not best and self.wait >= rule.patience and self.epochs >= least:
            by = f" by {rule.min_delta:g}" if rule.min_delta else ""
            on = "no finite value yet" if self.best is None else f"{self.best:.6g} ({self.unit} {self.best_epoch})"
            counted = "epoch" if self.unit == "epoch" else "evaluation"
            reason = f"{rule.monitor} did not improve{by} on {on} for {self.wait} {counted}{'s' * (self.wait != 1)}"
        if reason:
            self.starts.append(epoch + 1)
            self._reset()
        return Verdict(best, reason)

    def state_dict(self) -> dict[str, Any]:
        return {"starts": list(self.starts), "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "epochs": self.epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        starts = state.get("starts") if isinstance(state, Mapping) else None
        if not (isinstance(starts, list) and 1 <= len(starts) <= len(self.metric_schedule.specs)
                and all(isinstance(e, int) for e in starts)):
            raise LayerlockError(f"this metric schedule state has no readable phase starts: received {state!r}")
        self.starts = list(starts)
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.wait, self.epochs = int(state.get("wait", 0)), int(state.get("epochs", 0))
