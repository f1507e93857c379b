"""The plain values layerlock returns: :class:`Plan` (with its per-parameter and per-layer
entries), :class:`State` and :class:`Summary`. No framework, no model: just data and tables.

>>> from layerlock.results import ParamPlan
>>> ParamPlan("fc.weight", 6, trainable_before=True, trainable_after=False, rule=0).path
'fc.weight'
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._format import count, table
from .errors import SpecError
from .spec import Spec
from .tree import Node, Tree


class ParamPlan(NamedTuple):
    """The decision for one parameter: whether it is trainable before and after applying,
    the deciding ``rule`` (index into the spec's rules, ``"bn"`` for the bn policy, or None
    when no rule selects it), the other paths of a tied parameter (``aliases``) and those of
    its paths the deciding rule did not select, which its decision carries along (``carried``)."""

    path: str
    numel: int
    trainable_before: bool
    trainable_after: bool
    rule: int | str | None
    aliases: tuple[str, ...] = ()
    carried: tuple[str, ...] = ()


class RowPlan(NamedTuple):
    """A tensor trainable in part (``rows=``), before or after applying: its number of rows
    and the trainable rows before and after (None: the whole tensor follows its flag)."""

    length: int
    before: tuple[int, ...] | None
    after: tuple[int, ...] | None


def row_text(rows: tuple[int, ...], length: int) -> str:
    """Rows as a user writes them: a slice where they are one run, else the indices.

    >>> row_text((64, 65, 66), 67), row_text((1, 5), 8), row_text(tuple(range(9)), 20)
    ('rows 64: of 67', 'rows [1, 5] of 8', 'rows :9 of 20')
    """
    if rows == tuple(range(rows[0], rows[-1] + 1)):
        start, stop = ("" if rows[0] == 0 else rows[0]), ("" if rows[-1] + 1 == length else rows[-1] + 1)
        return f"rows {start}:{stop} of {length}"
    shown = list(rows) if len(rows) <= 8 else [*rows[:3], "...", rows[-1]]
    return f"rows [{', '.join(map(str, shown))}] of {length}"


class LayerPlan(NamedTuple):
    """A layer whose inference-mode hold is decided: whether layerlock holds it in inference
    mode before and after applying, and why (``"bn"`` policy or ``"frozen_mode"``)."""

    path: str
    kind: str
    held_before: bool
    held_after: bool
    reason: str


@dataclass(frozen=True)
class Plan:
    """What applying a spec does to a model. ``str(plan)`` is a readable table.

    The decisions are stored as columns, one entry per parameter (each tied parameter once,
    under its first path): ``paths``, ``numels``, ``trainable_before``, ``trainable_after``
    and ``rules``; ``aliases`` maps a row to a tied parameter's other paths, and ``carried``
    to those of its paths (the first included) that the deciding rule did not select: the
    decision covers them too. ``params`` gives the same rows as :class:`ParamPlan` entries.
    ``blocks`` is set where ``depth`` counted the entries of a list rather than the children
    of the layer it was given (``nnx.Sequential``'s ``layers``): the list's path -> the block
    paths counted. ``rows`` maps a row to a :class:`RowPlan` where the tensor is trainable in
    part (``rows=``) before or after; its ``trainable_after`` is then False (the tensor as a
    whole is not trainable) and the scalar counts count its rows.

    >>> import layerlock as ll
    >>> p = Plan(ll.freeze(), ("w", "b"), (4, 2), (True, True), (False, True), (0, None))
    >>> p.frozen, p.changed, p.trainable_scalars, p.params[0].rule
    (('w',), ('w',), 2, 0)
    """

    spec: Spec
    paths: tuple[str, ...]
    numels: tuple[int, ...]
    trainable_before: tuple[bool, ...]
    trainable_after: tuple[bool, ...]
    rules: tuple[int | str | None, ...]
    aliases: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    layers: tuple[LayerPlan, ...] = ()
    bn: str = "follow"
    frozen_mode: str | None = None
    backend: str = ""
    carried: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    blocks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rows: Mapping[int, RowPlan] = field(default_factory=dict)

    @functools.cached_property
    def params(self) -> tuple[ParamPlan, ...]:
        """The decision for each parameter, as :class:`ParamPlan` rows."""
        aliases, carried = self.aliases, self.carried
        return tuple(ParamPlan(*row, aliases.get(i, ()), carried.get(i, ())) for i, row in enumerate(zip(
            self.paths, self.numels, self.trainable_before, self.trainable_after, self.rules)))

    @property
    def frozen(self) -> tuple[str, ...]:
        """Paths of the parameters frozen after applying."""
        return tuple(p for p, a in zip(self.paths, self.trainable_after) if not a)

    @property
    def trainable(self) -> tuple[str, ...]:
        """Paths of the parameters trainable after applying."""
        return tuple(p for p, a in zip(self.paths, self.trainable_after) if a)

    @property
    def partial(self) -> tuple[str, ...]:
        """Paths of the parameters trainable in part (some rows) after applying."""
        return tuple(self.paths[k] for k, r in self.rows.items() if r.after is not None)

    @property
    def changed(self) -> tuple[str, ...]:
        """Paths of the parameters whose trainable flag (or trainable rows) the plan changes."""
        rows = self.rows
        return tuple(p for k, (p, b, a) in enumerate(zip(self.paths, self.trainable_before, self.trainable_after))
                     if b != a or (k in rows and rows[k].before != rows[k].after))

    @property
    def gained(self) -> tuple[str, ...]:
        """Paths of the parameters that train after applying (whole or some rows) and did
        not at all before: what a phase's ``lr`` applies to."""
        return tuple(p for k, p in enumerate(self.paths) if self.scalars(k) and not self.scalars(k, after=False))

    @property
    def frozen_scalars(self) -> int:
        return sum(self.numels) - self.trainable_scalars

    @property
    def trainable_scalars(self) -> int:
        return sum(self.scalars(k) for k in range(len(self.paths)))

    def scalars(self, row: int, after: bool = True) -> int:
        """The trainable scalars of parameter ``row`` after (or before) applying: all, none,
        or those of its trainable rows."""
        part = self.rows.get(row)
        rows = None if part is None else part.after if after else part.before
        if rows is not None:
            return self.numels[row] // part.length * len(rows)  # type: ignore[union-attr]
        return self.numels[row] if (self.trainable_after if after else self.trainable_before)[row] else 0

    @property
    def held(self) -> tuple[str, ...]:
        """Paths of the layers held in inference mode after applying."""
        return tuple(layer.path for layer in self.layers if layer.held_after)

    def describe(self, rule: int | str | None) -> str:
        """Human-readable name of a deciding rule."""
        if rule is None:
            return "(no rule: unchanged)"
        if isinstance(rule, int):
            return f"#{rule} {self.spec.rules[rule]!r}"
        return f"bn={self.bn!r}"

    def tied_note(self, row: int) -> str:
        """Which paths of tied parameter ``row`` the deciding rule reached, and which other
        paths its decision carried along (empty when it reached them all).

        >>> import layerlock as ll
        >>> p = Plan(ll.freeze("head"), ("embed.w",), (4,), (True,), (False,), (0,),
        ...          aliases={0: ("head.w",)}, carried={0: ("embed.w",)})
        >>> p.tied_note(0)
        "embed.w is tied: frozen by #0 freeze('head') through head.w; also frozen: embed.w"
        """
        carried = self.carried.get(row, ())
        if not carried:
            return ""
        through = [p for p in (self.paths[row], *self.aliases.get(row, ())) if p not in carried]
        part = self.rows.get(row)
        verb = ("unfrozen" if self.trainable_after[row] else
                f"given trainable {self.state(row)}" if part is not None and part.after else "frozen")
        return (f"{self.paths[row]} is tied: {verb} by {self.describe(self.rules[row])} through "
                f"{', '.join(through)}; also {verb}: {', '.join(carried)}")

    def blocks_note(self) -> list[str]:
        """One line per list whose entries ``depth`` counted (empty where it counted children).

        >>> import layerlock as ll
        >>> p = Plan(ll.freeze(depth=1), (), (), (), (), (), blocks={"layers": ("layers.0", "layers.1")})
        >>> p.blocks_note()
        ["depth counted the 2 blocks of 'layers': layers.0, layers.1"]
        """
        out = []
        for where, paths in self.blocks.items():
            shown = list(paths) if len(paths) <= 6 else [*paths[:3], "...", paths[-1]]
            out.append(f"depth counted the {len(paths)} block{'s' * (len(paths) != 1)} of {where!r}: "
                       + ", ".join(shown))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for scripts and the command line."""
        out: dict[str, Any] = {
            "backend": self.backend,
            "spec": self.spec.to_dict(),
            "bn": self.bn,
            "frozen_mode": self.frozen_mode,
            "params": [
                {"path": p.path, "numel": p.numel, "trainable_before": p.trainable_before,
                 "trainable_after": p.trainable_after, "rule": p.rule, "aliases": list(p.aliases),
                 "carried": list(p.carried)}
                for p in self.params
            ],
            "layers": [
                {"path": lp.path, "kind": lp.kind, "held_before": lp.held_before,
                 "held_after": lp.held_after, "reason": lp.reason}
                for lp in self.layers
            ],
            "frozen_scalars": self.frozen_scalars,
            "trainable_scalars": self.trainable_scalars,
        }
        if self.rows:
            out["rows"] = {self.paths[k]: {"rows": r.length, "trainable_before": r.before and list(r.before),
                                           "trainable_after": r.after and list(r.after)} for k, r in self.rows.items()}
        if self.blocks:
            out["blocks"] = {where: list(paths) for where, paths in self.blocks.items()}
        return out

    def state(self, row: int, after: bool = True) -> str:
        """How trainable parameter ``row`` is after (or before) applying: ``trainable``,
        ``frozen`` or, for a tensor trainable in part, its trainable rows."""
        part = self.rows.get(row)
        rows = None if part is None else part.after if after else part.before
        if rows is not None:
            return row_text(rows, part.length)  # type: ignore[union-attr]
        return state_name((self.trainable_after if after else self.trainable_before)[row])

    def __str__(self) -> str:
        rows: list[list[Any]] = []
        for k, p in enumerate(self.params):
            parent, _, name = p.path.rpartition(".")
            if p.aliases:  # a tied parameter shows all its paths
                name += f" (= {', '.join(p.aliases)})"
            key = (parent, self.state(k, after=False), self.state(k), p.rule, p.aliases, p.carried)
            if rows and rows[-1][-1] == key:
                rows[-1][0].append(name)
                rows[-1][1] += p.numel
                continue
            rows.append([[name], p.numel, key[1], key[2], p.rule, key])
        body = []
        for names, numel, before, after, rule, (parent, *_, carried) in rows:
            leaf = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
            change = f"{before} -> {after}" if before != after else after
            decided = self.describe(rule) + (" (tied: see below)" if carried else "")
            body.append((f"{parent}.{leaf}" if parent else leaf, count(numel), change, decided))
        text = [f"layerlock plan ({self.backend or 'tree'}; bn={self.bn!r}, frozen_mode={self.frozen_mode!r})",
                table(("parameter", "scalars", "trainable", "decided by"), body, right=(1,))]
        text += [self.tied_note(i) for i in self.carried]
        text += self.blocks_note()
        moved = [lp for lp in self.layers if lp.held_before != lp.held_after]
        if moved:
            text.append("inference mode: " + ", ".join(
                f"{lp.path} {'held' if lp.held_after else 'released'} ({lp.reason})" for lp in moved))
        n_changed = len(self.changed)
        partial = len(self.partial)
        text.append(f"frozen {count(self.frozen_scalars)} scalars in {len(self.frozen) - partial} tensors; "
                    f"trainable {count(self.trainable_scalars)} in {len(self.trainable)}"
                    + (f" whole tensors and {partial} in part (rows)" if partial else "")
                    + f"; {n_changed} tensor{'s' if n_changed != 1 else ''} change")
        return "\n".join(text)


def state_name(trainable: bool) -> str:
    """'trainable' or 'frozen', as the plan table writes it."""
    return "trainable" if trainable else "frozen"


@dataclass(frozen=True)
class State:
    """The trainable state of a model: each parameter's flag (by path) and each layer's
    backend-specific flags (for example ``held`` and ``training`` in PyTorch).

    >>> s = State("torch", {"fc.weight": False}, {"fc": {"held": False}})
    >>> State.from_dict(s.to_dict()) == s
    True
    """

    backend: str
    params: Mapping[str, bool]
    layers: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)
    rows: Mapping[str, list[int]] = field(default_factory=dict)  # tensors trainable in part: their rows

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        out = {"backend": self.backend, "params": dict(self.params),
               "layers": {k: dict(v) for k, v in self.layers.items()}}
        if self.rows:
            out["rows"] = {k: list(v) for k, v in self.rows.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> State:
        if not isinstance(data, Mapping) or set(data) - {"backend", "params", "layers", "rows"}:
            raise SpecError(f"a State dict has keys 'backend', 'params', 'layers' (and 'rows'); received {data!r}")
        params, layers = data.get("params", {}), data.get("layers", {})
        if not isinstance(data.get("backend"), str):
            raise SpecError(f"State 'backend' must be a string; received {data.get('backend')!r}")
        if not isinstance(params, Mapping) or not all(isinstance(v, bool) for v in params.values()):
            raise SpecError("State 'params' must map parameter paths to booleans")
        if not isinstance(layers, Mapping) or not all(
                isinstance(v, Mapping) and all(isinstance(b, bool) for b in v.values()) for v in layers.values()):
            raise SpecError("State 'layers' must map layer paths to {flag: bool} mappings")
        rows = data.get("rows", {})
        if not isinstance(rows, Mapping) or not all(
                isinstance(v, list) and all(isinstance(i, int) for i in v) for v in rows.values()):
            raise SpecError("State 'rows' must map parameter paths to lists of row indices")
        return cls(data["backend"], dict(params), {k: dict(v) for k, v in layers.items()},
                   {k: list(v) for k, v in rows.items()})


@dataclass(frozen=True)
class BlockRow:
    """Trainable and frozen counts for one top-level block."""

    block: str
    kind: str
    trainable_tensors: int
    trainable_scalars: int
    frozen_tensors: int
    frozen_scalars: int
    inference: bool


@dataclass(frozen=True)
class Summary:
    """Per top-level block: trainable / frozen tensors and scalars. ``str()`` is a table. A
    tensor trainable in some rows counts as a trainable tensor, its scalars on both sides.

    >>> from layerlock.tree import Node, Param
    >>> s = Summary.of(Node("", "Net", children=[Node("fc", "Linear", params=[Param("fc.w", 6, False, 0)])]))
    >>> s.frozen_scalars, s.trainable_scalars
    (6, 0)
    """

    rows: tuple[BlockRow, ...]

    @classmethod
    def of(cls, root: Node | Tree) -> Summary:
        tree = Tree.of(root)
        # one row per block depth counts (tree.blocks of tree.root), and a "(root)" row for
        # the parameters outside them (the model's own, or a wrapper's such as a prompt encoder)
        blocks: list[tuple[int, Sequence[int], bool]] = [
            (j, range(tree.first[j], tree.first[tree.end[j]]), any(tree.held[j:tree.end[j]]))
            for j in tree.blocks(tree.root)[1]]
        inside = {o for _, r, _ in blocks for o in r}
        rest = [o for o in range(len(tree.param_paths)) if o not in inside]
        if rest:
            blocks.insert(0, (0, rest, tree.held[0]))
        seen: set[Hashable] = set()
        rows = []
        for j, occurrences, held in blocks:
            counts = [0, 0, 0, 0]  # frozen tensors, frozen scalars, trainable tensors, trainable scalars
            for o in occurrences:
                if tree.param_keys[o] not in seen:
                    seen.add(tree.param_keys[o])
                    part = tree.rows[o] if o in tree.rows and tree.rows[o].trainable is not None else None
                    if part is None:
                        counts[2 * tree.trainable[o]] += 1
                        counts[2 * tree.trainable[o] + 1] += tree.numels[o]
                        continue  # a tensor trainable in part: its rows on each side, itself as trainable
                    on = tree.numels[o] // part.length * len(part.trainable)  # type: ignore[arg-type]
                    counts[1:4] = [counts[1] + tree.numels[o] - on, counts[2] + 1, counts[3] + on]
            name = tree.layer_paths[j] if j else "(root)"
            rows.append(BlockRow(name, tree.kinds[j], counts[2], counts[3], counts[0], counts[1], held))
        return cls(tuple(rows))

    @property
    def trainable_scalars(self) -> int:
        return sum(r.trainable_scalars for r in self.rows)

    @property
    def frozen_scalars(self) -> int:
        return sum(r.frozen_scalars for r in self.rows)

    def __str__(self) -> str:
        body = [
            (r.block, r.kind, count(r.trainable_scalars), r.trainable_tensors,
             count(r.frozen_scalars), r.frozen_tensors, "inference" if r.inference else "")
            for r in self.rows
        ]
        total = self.trainable_scalars + self.frozen_scalars
        share = f"{100 * self.trainable_scalars / total:.1f}%" if total else "n/a"
        body.append(("total", "", count(self.trainable_scalars), sum(r.trainable_tensors for r in self.rows),
                      count(self.frozen_scalars), sum(r.frozen_tensors for r in self.rows), ""))
        head = ("block", "kind", "trainable", "tensors", "frozen", "tensors", "mode")
        return table(head, body, right=(2, 3, 4, 5)) + f"\ntrainable: {share} of {count(total)} scalars"


@dataclass(frozen=True)
class Finding:
    """One freezing problem :func:`layerlock.check` found in a set-up: ``kind`` (a short id,
    e.g. ``"not-in-optimizer"``), what goes wrong (``problem``), the ``fix``, the ``paths``
    concerned and, where it applies, the trainable ``scalars`` or the ``bytes`` at stake.

    >>> Finding("not-in-optimizer", "never trained", "add them", ("fc.bias",), scalars=3).paths
    ('fc.bias',)
    """

    kind: str
    problem: str
    fix: str
    paths: tuple[str, ...] = ()
    scalars: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "problem": self.problem, "fix": self.fix, "paths": list(self.paths),
                "scalars": self.scalars, "bytes": self.bytes}


@dataclass(frozen=True)
class Report:
    """What :func:`layerlock.check` found; empty (and false) for a clean set-up.
    ``str(report)`` is a table with each problem and its fix.

    >>> r = Report((Finding("not-in-optimizer", "never trained", "add them", ("fc.bias",), scalars=3),))
    >>> bool(r), r.kinds, bool(Report(()))
    (True, ('not-in-optimizer',), False)
    """

    findings: tuple[Finding, ...]
    backend: str = ""
    not_checked: tuple[str, ...] = ()

    @classmethod
    def of(cls, found: Iterable[Finding | str], backend: str = "") -> Report:
        """The report of what a :class:`~layerlock.backends.Check` returned: each ``str``
        is something it could not inspect (``not_checked``), the rest its findings.

        >>> r = Report.of([Finding("not-in-optimizer", "never trained", "add them"), "the optimizer"])
        >>> r.kinds, r.not_checked
        (('not-in-optimizer',), ('the optimizer',))
        """
        items = list(found)
        return cls(tuple(f for f in items if not isinstance(f, str)), backend,
                   tuple(f for f in items if isinstance(f, str)))

    def __bool__(self) -> bool:
        return bool(self.findings)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(f.kind for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "findings": [f.to_dict() for f in self.findings],
                "not_checked": list(self.not_checked)}

    def __str__(self) -> str:
        unchecked = [f"not checked: {what}" for what in self.not_checked]
        if not self.findings:
            clean = "layerlock.check: no freezing problems found" + (" in what was checked" if unchecked else "")
            return "\n".join([clean, *unchecked])
        rows, notes = [], []
        for i, f in enumerate(self.findings, 1):
            shown = ", ".join(f.paths[:3]) + (f", ... ({len(f.paths)} in all)" if len(f.paths) > 3 else "")
            cost = ", ".join(x for x in (f"{count(f.scalars)} scalars" if f.scalars else "",
                                         f"{count(f.bytes)} bytes" if f.bytes else "") if x)
            rows.append((i, f.kind, shown or "-", cost or "-"))
            notes.append(f"{i}. {f.problem}\n   fix: {f.fix}")
        head = f"layerlock.check: {len(self.findings)} freezing problem{'s' * (len(self.findings) > 1)}"
        return "\n".join([head, table(("#", "problem", "where", "at stake"), rows), "", *notes, *unchecked])
