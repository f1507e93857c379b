"""Schedules: which spec holds from which epoch, as a serialisable value; or, for a
:class:`MetricSchedule`, which spec comes next once a monitored metric stops improving.

A schedule is cumulative: at epoch ``e`` the model is in the state that applying every phase
up to ``e`` in order gives, which is the same as applying the concatenation of their specs.
That is what makes resuming in the middle of a schedule exact. These are pure values; the
runtime that walks a model through them is :mod:`layerlock.stepper`.

>>> import layerlock as ll
>>> s = ll.Schedule({0: ll.freeze("backbone"), 3: ll.unfreeze("backbone.layer4")}, lr={3: 1e-4})
>>> s.spec_at(5)
Spec(freeze('backbone'), unfreeze('backbone.layer4'))
>>> ll.Schedule.from_dict(s.to_dict()) == s
True
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SpecError
from .spec import Spec, dump_data, freeze, load_data, unfreeze


@dataclass(frozen=True)
class Phase:
    """From ``epoch`` on, ``spec`` applies; ``lr`` (optional) is the learning rate for the
    parameters this phase makes trainable."""

    epoch: int
    spec: Spec
    lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.epoch, int) or isinstance(self.epoch, bool) or self.epoch < 0:
            raise SpecError(f"a phase epoch must be an int >= 0; received {self.epoch!r}")
        if not isinstance(self.spec, Spec):
            raise SpecError(f"phase at epoch {self.epoch}: spec must be a layerlock.Spec such as "
                            f"ll.unfreeze('head'); received {self.spec!r} ({type(self.spec).__name__})")
        if self.lr is not None and (not isinstance(self.lr, numbers.Real) or isinstance(self.lr, bool)
                                    or not self.lr > 0):
            raise SpecError(f"phase at epoch {self.epoch}: lr must be a number > 0; received {self.lr!r}")


class _Stored:
    """JSON and file forms of a schedule value, from its ``to_dict`` / ``from_dict``."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict())  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls: Any, text: str) -> Any:
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"{cls.__name__} JSON could not be parsed: {exc}") from None

    @classmethod
    def load(cls: Any, path: str | Path) -> Any:
        """Read one from ``.json`` or ``.yaml``/``.yml``."""
        return cls.from_dict(load_data(path))

    def save(self, path: str | Path) -> None:
        dump_data(self.to_dict(), path)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Schedule(_Stored):
    """Phases keyed by the epoch they start at; see the module docstring.

    >>> Schedule({0: freeze(depth=-1), 2: unfreeze()}).phase_index(1)
    0
    """

    phases: tuple[Phase, ...]

    def __init__(self, phases: Mapping[int, Spec] | Iterable[Phase], *,
                 lr: Mapping[int, float] | None = None) -> None:
        if isinstance(phases, Mapping):
            lrs = dict(lr or {})
            unknown = sorted(set(lrs) - set(phases), key=str)
            if unknown:
                raise SpecError(f"lr given for epochs {unknown} that start no phase; phases start at "
                                f"{sorted(phases, key=str)}")
            items = [Phase(e, s, lrs.get(e)) for e, s in phases.items()]
        elif isinstance(phases, Iterable) and not isinstance(phases, (str, bytes)):
            items = list(phases)
            if not all(isinstance(p, Phase) for p in items):
                raise SpecError(f"Schedule takes {{epoch: Spec}} or Phase values; received {items!r}")
        else:
            raise SpecError(f"Schedule takes a mapping {{epoch: Spec}}; received {phases!r}")
        if not items:
            raise SpecError("a schedule needs at least one phase, e.g. {0: ll.freeze('backbone')}")
        epochs = [p.epoch for p in items]
        if len(set(epochs)) != len(epochs):
            raise SpecError(f"two phases start at the same epoch: {sorted(epochs)}")
        object.__setattr__(self, "phases", tuple(sorted(items, key=lambda p: p.epoch)))

    def phase_index(self, epoch: int) -> int:
        """Index of the phase in force at ``epoch`` (-1 before the first phase)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise SpecError(f"epoch must be an int >= 0; received {epoch!r}")
        return sum(1 for p in self.phases if p.epoch <= epoch) - 1

    def spec_at(self, epoch: int) -> Spec:
        """The cumulative spec in force at ``epoch``: every phase so far, in order."""
        return sum((p.spec for p in self.phases[: self.phase_index(epoch) + 1]), Spec())

    def lr_at(self, epoch: int) -> float | None:
        """The ``lr`` of the latest phase up to ``epoch`` that sets one (None if none does).

        >>> Schedule({0: freeze(), 2: unfreeze("a"), 4: unfreeze()}, lr={2: 0.1}).lr_at(5)
        0.1
        """
        return next((p.lr for p in reversed(self.phases[: self.phase_index(epoch) + 1]) if p.lr is not None), None)

    def to_dict(self) -> dict[str, Any]:
        return {"phases": [{"epoch": p.epoch, "spec": p.spec.to_dict(), **({"lr": p.lr} if p.lr else {})}
                           for p in self.phases]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`; raises :class:`SpecError` naming the bad field."""
        if not isinstance(data, Mapping) or set(data) != {"phases"} or not isinstance(data["phases"], list):
            raise SpecError(f"a schedule dict is {{'phases': [{{'epoch': int, 'spec': {{...}}, 'lr'?: float}}]}}; "
                            f"received {data!r}")
        phases = []
        for i, item in enumerate(data["phases"]):
            if not isinstance(item, Mapping) or not {"epoch", "spec"} <= set(item) <= {"epoch", "spec", "lr"}:
                raise SpecError(f"phases[{i}] needs keys 'epoch' and 'spec' (and optional 'lr'); received {item!r}")
            try:
                phases.append(Phase(item["epoch"], Spec.from_dict(item["spec"]), item.get("lr")))
            except SpecError as exc:
                raise SpecError(f"phases[{i}]: {exc}") from None
        return cls(phases)



def gradual(blocks: int, *, every: int = 1, within: str | None = None, head: str | Sequence[str] = (),
            start: int = 0, lr: float | None = None, lr_decay: float = 1.0) -> Schedule:
    """ULMFiT-style gradual unfreezing over ``blocks`` blocks (children of ``within``, or of
    the model): everything starts frozen except the head (``head`` patterns; without
    ``within``, the model's top block), then one more block from the top is unfrozen every
    ``every`` epochs. With ``within``, a last phase unfreezes the whole model. Phase k's
    newly trainable parameters get ``lr * lr_decay**k`` when ``lr`` is given.

    >>> s = gradual(3, every=2)
    >>> [p.epoch for p in s.phases], s.phases[1].spec
    ([0, 2, 4], Spec(unfreeze(), freeze(depth=-2)))
    """
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        raise SpecError(f"blocks must be an int >= 1 (how many blocks to unfreeze one by one); received {blocks!r}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise SpecError(f"every must be an int >= 1 (epochs per phase); received {every!r}")
    heads = (head,) if isinstance(head, str) else tuple(head)
    first = 0 if within is not None or heads else 1  # without a container, the top block is the head
    specs = []
    for k in range(first, blocks + 1):
        if within is None:
            spec = unfreeze().freeze(depth=-k) if k else freeze()
        else:
            spec = freeze().unfreeze(within).freeze(depth=-k, within=within) if k else freeze()
        specs.append(spec.unfreeze(*heads) if heads else spec)
    if within is not None:
        specs.append(unfreeze())
    phases = [Phase(start + i * every, spec, None if lr is None else lr * lr_decay ** i)
              for i, spec in enumerate(specs)]
    return Schedule(phases)


MODES: tuple[str, ...] = ("min", "max")


def _count(value: Any, what: str, *, low: int = 0, none: bool = False) -> int | None:
    """``value`` as an int >= ``low`` (None allowed with ``none``); else SpecError."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise SpecError(f"{what} must be an int >= {low}{' or None' if none else ''}; received {value!r}")
    return int(value)


def _per_phase(value: Any, what: str, *, low: int, none: bool) -> Any:
    """One count for every phase, or a tuple of one per phase."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise SpecError(f"{what} must be an int or a non-empty list of them, one per phase; received {value!r}")
        return tuple(_count(v, f"{what}[{i}]", low=low, none=none) for i, v in enumerate(value))
    return _count(value, what, low=low, none=none)


@dataclass(frozen=True)
class Plateau:
    """When a :class:`MetricSchedule` moves on: its phase ends once ``monitor`` has not
    improved (by more than ``min_delta``, downwards for ``mode="min"``, upwards for
    ``"max"``) for ``patience`` epochs in a row, and not before the phase has run
    ``min_epochs`` epochs; it ends after ``max_epochs`` epochs whatever the metric does. Each
    of the two is one number for every phase or a list with one per phase (``None`` in
    ``max_epochs``: no bound for that phase).
    Each phase is judged on its own: its best value and wait count start afresh.
    ``restore_best``: at a transition, bring back the weights, optimizer and LR scheduler
    state of the phase's best epoch before the next phase starts. A metric that is NaN or
    infinite counts as no improvement (with a warning).

    >>> Plateau("val_loss", patience=2)
    Plateau(monitor='val_loss', mode='min', patience=2, min_delta=0.0, min_epochs=0, max_epochs=None, restore_best=False)
    """

    monitor: str
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    min_epochs: int | tuple[int, ...] = 0
    max_epochs: int | tuple[int | None, ...] | None = None
    restore_best: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise SpecError(f"monitor must be the name of a metric, such as 'val_loss'; received {self.monitor!r}")
        if self.mode not in MODES:
            raise SpecError(f"mode must be 'min' (lower is better, a loss) or 'max' (an accuracy); "
                            f"received {self.mode!r}")
        object.__setattr__(self, "patience", _count(self.patience, "patience"))
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, numbers.Real) \
                or not math.isfinite(self.min_delta) or self.min_delta < 0:
            raise SpecError(f"min_delta must be a finite number >= 0; received {self.min_delta!r}")
        object.__setattr__(self, "min_delta", float(self.min_delta))
        object.__setattr__(self, "min_epochs", _per_phase(self.min_epochs, "min_epochs", low=0, none=False))
        object.__setattr__(self, "max_epochs", _per_phase(self.max_epochs, "max_epochs", low=1, none=True))
        lengths = {len(v) for v in (self.min_epochs, self.max_epochs) if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise SpecError(f"min_epochs and max_epochs give {' and '.join(map(str, sorted(lengths)))} phases; give "
                            "one value per phase in each, or one number")
        for phase in range(max(lengths, default=1)):
            low, high = self.bounds(phase)
            if high is not None and high < low:
                where = f" for phase {phase}" if lengths else ""
                raise SpecError(f"max_epochs ({high}) is below min_epochs ({low}){where}: the phase could never "
                                "end on its metric")
        if not isinstance(self.restore_best, bool):
            raise SpecError(f"restore_best must be True or False; received {self.restore_best!r}")

    def bounds(self, phase: int) -> tuple[int, int | None]:
        """``(min_epochs, max_epochs)`` of phase ``phase``.

        >>> Plateau("loss", min_epochs=1, max_epochs=[3, None]).bounds(1)
        (1, None)
        """
        def of(value: Any) -> Any:
            return value[min(phase, len(value) - 1)] if isinstance(value, tuple) else value
        return of(self.min_epochs), of(self.max_epochs)

    def improved(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta`` (any finite value beats None).

        >>> Plateau("acc", mode="max", min_delta=0.1).improved(0.55, 0.5)
        False
        """
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


@dataclass(frozen=True)
class MetricSchedule(_Stored):
    """Phases that begin when a metric stops improving: ``specs`` in order, the first from
    the start, each next one from the epoch after the :class:`Plateau` rule ends the phase
    before; the last phase trains on. ``lr={phase index: rate}`` is each phase's ``lr``, as
    a :class:`Schedule`'s (the rate of what that phase makes trainable). Serialisable like a
    Schedule; :meth:`schedule` gives the plain Schedule of the phases begun so far. Given a
    :class:`Schedule` (``ll.gradual(4)``), it takes its phases in order with their ``lr``.

    >>> s = MetricSchedule([freeze("body"), unfreeze()], monitor="val_loss", patience=2, lr={1: 1e-4})
    >>> s.schedule([0, 5])
    Schedule(phases=(Phase(epoch=0, spec=Spec(freeze('body')), lr=None), Phase(epoch=5, spec=Spec(unfreeze()), lr=0.0001)))
    >>> MetricSchedule.from_dict(s.to_dict()) == s
    True
    >>> len(MetricSchedule(gradual(3, lr=1e-3), monitor="val_loss").specs)
    3
    """

    specs: tuple[Spec, ...]
    rule: Plateau
    lr: tuple[float | None, ...]

    def __init__(self, specs: Sequence[Spec] | Schedule, rule: Plateau | None = None, *,
                 lr: Mapping[int, float] | None = None, **plateau: Any) -> None:
        if isinstance(specs, Schedule):  # its phases in order, with their lr: ll.gradual(...) on a metric
            if lr is not None:
                raise SpecError("give lr= or a Schedule whose phases carry their lr, not both")
            lr = {i: p.lr for i, p in enumerate(specs.phases) if p.lr is not None}
            specs = [p.spec for p in specs.phases]
        if isinstance(specs, (str, bytes, Spec, Mapping)) or not isinstance(specs, Iterable):
            raise SpecError(f"MetricSchedule takes a list of specs, one per phase, such as [ll.freeze('body'), "
                            f"ll.unfreeze()]; received {specs!r}")
        items = tuple(specs)
        if not items or not all(isinstance(s, Spec) for s in items):
            raise SpecError(f"MetricSchedule needs at least one phase, each a layerlock.Spec; received {items!r}")
        if rule is None:
            rule = Plateau(**plateau)
        elif plateau:
            raise SpecError(f"give the rule as a Plateau or as its fields ({', '.join(sorted(plateau))}), not both")
        if not isinstance(rule, Plateau):
            raise SpecError(f"rule must be a layerlock.Plateau; received {rule!r}")
        for what in ("min_epochs", "max_epochs"):
            value = getattr(rule, what)
            if isinstance(value, tuple) and len(value) != len(items):
                raise SpecError(f"{what} gives {len(value)} values and the schedule has {len(items)} phases; give "
                                "one per phase, or one number for all")
        lrs = dict(lr or {})
        unknown = sorted(set(lrs) - set(range(len(items))), key=str)
        if unknown:
            raise SpecError(f"lr given for phases {unknown}; the phases are numbered 0 to {len(items) - 1}")
        phases = [Phase(i, s, lrs.get(i)) for i, s in enumerate(items)]  # checks each lr
        object.__setattr__(self, "specs", items)
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "lr", tuple(p.lr for p in phases))

    def schedule(self, starts: Sequence[int]) -> Schedule:
        """The plain :class:`Schedule` of the phases begun at ``starts`` (phase k from epoch
        ``starts[k]``; the first from 0).

        >>> MetricSchedule([freeze()], monitor="loss").schedule([0]).phase_index(9)
        0
        """
        if not 1 <= len(starts) <= len(self.specs):
            raise SpecError(f"this schedule has {len(self.specs)} phases; received {len(starts)} start epochs")
        return Schedule([Phase(e, s, lr) for e, s, lr in zip(starts, self.specs, self.lr)])

    def to_dict(self) -> dict[str, Any]:
        rule = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.rule).items()
                if v != _RULE_DEFAULTS.get(k, object())}
        return {"phases": [{"spec": s.to_dict(), **({"lr": lr} if lr else {})} for s, lr in zip(self.specs, self.lr)],
                "rule": rule}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricSchedule:
        """Inverse of :meth:`to_dict`; raises :class:`SpecError` naming the bad field."""
        shape = "{'phases': [{'spec': {...}, 'lr'?: float}], 'rule': {'monitor': str, ...}}"
        if not isinstance(data, Mapping) or set(data) != {"phases", "rule"} or not isinstance(data["phases"], list) \
                or not isinstance(data["rule"], Mapping):
            raise SpecError(f"a metric schedule dict is {shape}; received {data!r}")
        fields = {f.name for f in dataclasses.fields(Plateau)}
        if set(data["rule"]) - fields:
            raise SpecError(f"rule has unknown keys {sorted(set(data['rule']) - fields)}; it takes {sorted(fields)}")
        specs, lrs = [], {}
        for i, item in enumerate(data["phases"]):
            if not isinstance(item, Mapping) or not {"spec"} <= set(item) <= {"spec", "lr"}:
                raise SpecError(f"phases[{i}] needs the key 'spec' (and optional 'lr'); received {item!r}")
            try:
                specs.append(Spec.from_dict(item["spec"]))
            except SpecError as exc:
                raise SpecError(f"phases[{i}]: {exc}") from None
            if item.get("lr") is not None:
                lrs[i] = item["lr"]
        return cls(specs, Plateau(**data["rule"]), lr=lrs)



_RULE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Plateau) if f.name != "monitor"}
