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
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ._format import count
from .errors import LayerlockError, LayerlockWarning, SpecError
from .operations import apply, check, plan
from .resolver import BnPolicy, check_options
from .results import Plan, Report
from .schedule import Phase, Schedule
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

    def __init__(self, schedule: Schedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, unit: str = "epoch", owner: str = "FreezeScheduler") -> None:
        if not isinstance(schedule, Schedule):
            raise SpecError(f"{owner} needs a layerlock.Schedule such as ll.gradual(3); received "
                            f"{schedule!r} ({type(schedule).__name__})")
        check_options(Spec(), bn, frozen_mode)
        self.schedule, self.unit, self.phase = schedule, unit, -1
        self.options: dict[str, Any] = {"strict": strict, "bn": bn, "frozen_mode": frozen_mode}

    def check(self, model: Any) -> list[Plan]:
        """Plan every phase on ``model`` (changing nothing), so a pattern that matches
        nothing fails before training starts, not at epoch 7; the plans, one per phase."""
        return [plan(model, self.schedule.spec_at(phase.epoch), **self.options) for phase in self.schedule.phases]

    def step(self, model: Any, at: int, sync: Callable[[Phase, Plan], str] | None = None) -> Transition | None:
        """Bring ``model`` to the phase in force at ``at``; the transition, or None."""
        index = self.schedule.phase_index(at)
        if index == self.phase or index < 0:
            return None
        result = apply(model, self.schedule.spec_at(at), **self.options)
        phase = self.schedule.phases[index]
        note = sync(phase, result) if sync is not None else ""
        self.phase = index
        change = [result.scalars(k) - result.scalars(k, after=False) for k in range(len(result.paths))]
        gained, lost = sum(d for d in change if d > 0), -sum(d for d in change if d < 0)
        total = result.trainable_scalars + result.frozen_scalars
        share = 100 * result.trainable_scalars / total if total else 0.0
        message = (f"layerlock: {self.unit} {at}: phase {index + 1}/{len(self.schedule.phases)} "
                   f"{phase.spec!r}: +{count(gained)} / -{count(lost)} trainable scalars, "
                   f"{count(result.trainable_scalars)} trainable ({share:.1f}%)" + (f"; {note}" if note else ""))
        return Transition(at, index, result, message)

    def replay(self, model: Any, phase: int, sync: Callable[[Phase, Plan], str] | None = None) -> None:
        """Step silently through the phases up to index ``phase``, as the interrupted run
        did, so a resumed run has the same trainable set and optimizer layout before its
        optimizer state is loaded."""
        for p in self.schedule.phases[: phase + 1]:
            self.step(model, p.epoch, sync)


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

    def __init__(self, schedule: Schedule, model: Any, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = print) -> None:
        self.stepper = PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode)
        self.schedule, self.model = schedule, model
        self.log = log_option(f"{type(self).__module__}.{type(self).__name__}", log)
        self.epoch = -1
        self._refuse(self.stepper.check(model))
        self._checked = False

    def _refuse(self, plans: list[Plan]) -> None:
        """Refuse, before anything changes, phases this loop cannot carry out; ``plans`` are
        the phases' plans on the model (none is refused here)."""

    @property
    def phase(self) -> int:
        """Index of the phase in force (-1 before the first)."""
        return self.stepper.phase

    def step(self, epoch: int) -> Plan | None:
        """Bring the model to the phase in force at ``epoch``; return the plan on a change."""
        self.epoch = epoch
        change = self.stepper.step(self.model, epoch, self._sync)
        if not self._checked:  # the set-up as training starts: the first phase and its optimizer
            self._checked = True
            warn_check(self.model, getattr(self, "optimizer", None), getattr(self, "scheduler", None),
                       bn=self.stepper.options["bn"], schedule=self.schedule)
        if change is None:
            return None
        if self.log is not None:
            self.log(change.message)
        return change.plan

    def _sync(self, phase: Phase, plan: Plan) -> str:
        return ""

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
        state = {"epoch": self.epoch, "phase": self.phase, "schedule": self.schedule.to_dict()}
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
        self.stepper.replay(self.model, state["phase"], self._sync)
        self.epoch = state["epoch"]


def check_saved_state(state: Any, schedule: Schedule, structure: str | None = None) -> None:
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
        saved = Schedule.from_dict(state["schedule"])
    except SpecError as exc:
        raise LayerlockError(f"this FreezeScheduler state holds no readable schedule: {exc}") from None
    if saved != schedule:
        raise LayerlockError(f"this FreezeScheduler state was saved with another schedule, {saved!r}; this "
                             f"scheduler runs {schedule!r}. Resume with a FreezeScheduler built with "
                             "the saved schedule (layerlock.Schedule.from_dict(state['schedule'])). "
                             "Nothing was changed.")
    phase = state["phase"]
    if not isinstance(phase, int) or not -1 <= phase < len(schedule.phases):
        raise LayerlockError(f"this FreezeScheduler state's phase is {phase!r}; its schedule has phases "
                             f"0 to {len(schedule.phases) - 1} (-1: before the first)")


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
