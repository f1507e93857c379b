"""Specs: immutable, ordered freeze/unfreeze rules that serialise to dict, JSON and YAML.

>>> import layerlock as ll
>>> spec = ll.freeze("backbone").unfreeze("backbone.layer4")
>>> ll.Spec.from_dict(spec.to_dict()) == spec
True
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import families
from .errors import SpecError

Action = Literal["freeze", "unfreeze"]
ACTIONS: tuple[str, ...] = ("freeze", "unfreeze")
RULE_KEYS: tuple[str, ...] = ("action", "patterns", "depth", "within", "kind", "rows")
SPEC_KEYS: tuple[str, ...] = ("version", "rules")
VERSION = 1

Patterns = str | Iterable[str]
Rows = str | Iterable[int]
ROW_FORMS = ('a slice string with step 1 ("64:", ":32000", "10:20") or a list of row indices ([3, 7]); '
             "rows are the first axis of an embedding table and the output units of a dense layer")
_SLICE = re.compile(r"(-?\d+)?:(-?\d+)?(?::(-?\d+)?)?")


def _rows(value: object) -> str | tuple[int, ...] | None:
    """``rows=`` in its one stored form: ``"start:stop"`` or sorted unique indices.

    >>> _rows(" 64 : "), _rows([7, 3, 7]), _rows(None)
    ('64:', (3, 7), None)
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpecError(f"rows must be {ROW_FORMS}; received {value!r}")
    if isinstance(value, str):
        found = _SLICE.fullmatch(value.replace(" ", ""))
        if found is None:
            raise SpecError(f"rows must be {ROW_FORMS}; received {value!r}")
        start, stop, step = found.groups()
        if step not in (None, "1"):
            raise SpecError(f"rows={value!r} has a step of {step}; only a step of 1 is accepted: {ROW_FORMS}")
        if start is not None and stop is not None and int(start) >= 0 and int(stop) >= 0 and int(start) >= int(stop):
            raise SpecError(f"rows={value!r} is an empty slice (start {start} >= stop {stop}): {ROW_FORMS}")
        return f"{start or ''}:{stop or ''}"
    if isinstance(value, int):
        raise SpecError(f"rows={value!r} is a single number; write rows=[{value}] for that row: {ROW_FORMS}")
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = list(value)
        bad = [i for i in items if not isinstance(i, int) or isinstance(i, bool)]
        if bad or not items:
            raise SpecError(f"rows must be {ROW_FORMS}; received {value!r}"
                            + (f" (not integers: {bad[:3]})" if bad else " (no index)"))
        return tuple(sorted(set(items)))
    raise SpecError(f"rows must be {ROW_FORMS}; received {value!r} ({type(value).__name__})")


def _strings(value: object, field_name: str) -> tuple[str, ...]:
    """Read a string or a list of strings, rejecting anything else by name."""
    items: Iterable[object]
    if isinstance(value, str):
        items = (value,)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise SpecError(
            f"{field_name} must be a string or a list of strings; received {value!r} "
            f"({type(value).__name__})"
        )
    out: list[str] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_strings(item, field_name))
            continue
        if not isinstance(item, str):
            raise SpecError(
                f"{field_name} must hold strings; received {item!r} ({type(item).__name__})"
            )
        if not item.strip():
            raise SpecError(f"{field_name} must not hold an empty pattern; received {item!r}")
        out.append(item.strip())
    return tuple(out)


def _normalise(pattern: str) -> str:
    """Read ``/`` as ``.`` (a literal dot inside a regex)."""
    if pattern.startswith("re:"):
        return pattern.replace("/", r"\.")
    return pattern.replace("/", ".")


@functools.lru_cache(maxsize=4096)
def matcher(pattern: str) -> Callable[[str], bool]:
    r"""Compile a glob (``*`` crosses ``.``) or ``re:`` pattern into a full-match predicate.

    >>> matcher("*.bias")("head.bias"), matcher("re:block\\.[0-2]")("block.3")
    (True, False)
    """
    if pattern.startswith("re:"):
        source = pattern[3:]
        if not source:
            raise SpecError("a 're:' pattern needs a regular expression after the prefix")
        try:
            compiled = re.compile(source)
        except re.error as exc:
            raise SpecError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
    else:
        compiled = re.compile(fnmatch.translate(pattern))
    return lambda path: compiled.fullmatch(path) is not None


@dataclass(frozen=True)
class Rule:
    """One ordered step of a spec: freeze or unfreeze what its selectors pick.

    Selectors (``patterns``, ``depth`` with optional ``within``, ``kind``) combine as a
    union; a rule with no selector picks everything. A ``kind`` is a class-name glob or a
    layer family (``"family:dense"``, :mod:`layerlock.families`). ``rows`` narrows the
    decision to those rows of each selected parameter (see :data:`ROW_FORMS`).

    >>> Rule("freeze", patterns=("backbone",))
    freeze('backbone')
    """

    action: Action
    patterns: tuple[str, ...] = ()
    depth: int | None = None
    within: str | None = None
    kind: tuple[str, ...] = field(default=())
    rows: str | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise SpecError(f"action must be one of {ACTIONS}; received {self.action!r}")
        patterns = tuple(_normalise(p) for p in _strings(self.patterns, "patterns"))
        for p in patterns:
            if families.is_family(p):
                raise SpecError(f"{p!r} is a layer family, and patterns match paths; write kind={p!r}")
            matcher(p)  # a bad regex fails here, before any model is touched
        object.__setattr__(self, "patterns", patterns)
        kinds = _strings(self.kind, "kind")
        for k in kinds:
            if families.is_family(k):
                families.check(k)  # an unknown family fails here, listing the families
        object.__setattr__(self, "kind", kinds)
        if self.depth is not None and (not isinstance(self.depth, int) or isinstance(self.depth, bool)):
            raise SpecError(
                f"depth must be an int (like a slice bound: 2 means layers[:2], -1 means "
                f"layers[:-1]); received {self.depth!r} ({type(self.depth).__name__})"
            )
        if self.within is not None:
            if self.depth is None:
                raise SpecError(f"within={self.within!r} needs depth=N (it names the container whose children are counted)")
            if not isinstance(self.within, str) or not self.within.strip():
                raise SpecError(f"within must be a non-empty layer path; received {self.within!r}")
            object.__setattr__(self, "within", _normalise(self.within.strip()))
        object.__setattr__(self, "rows", _rows(self.rows))

    @property
    def selects_all(self) -> bool:
        """True when the rule has no selector and so picks every parameter."""
        return not self.patterns and self.depth is None and not self.kind

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; default fields are left out.

        >>> Rule("unfreeze", patterns=("*.bias",)).to_dict()
        {'action': 'unfreeze', 'patterns': ['*.bias']}
        """
        out: dict[str, Any] = {"action": self.action}
        if self.patterns:
            out["patterns"] = list(self.patterns)
        if self.depth is not None:
            out["depth"] = self.depth
        if self.within is not None:
            out["within"] = self.within
        if self.kind:
            out["kind"] = list(self.kind)
        if self.rows is not None:
            out["rows"] = self.rows if isinstance(self.rows, str) else list(self.rows)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """Inverse of :meth:`to_dict`; raises :class:`SpecError` on anything malformed.

        >>> Rule.from_dict({"action": "freeze", "depth": 2})
        freeze(depth=2)
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a rule must be a mapping with keys {RULE_KEYS}; received {data!r}")
        unknown = sorted(str(k) for k in data if k not in RULE_KEYS)
        if unknown:
            raise SpecError(f"unknown rule key(s) {unknown}; accepted keys are {RULE_KEYS}")
        if "action" not in data:
            raise SpecError(f"a rule needs 'action' (one of {ACTIONS}); received {dict(data)!r}")
        return cls(
            data["action"],
            patterns=data.get("patterns", ()),
            depth=data.get("depth"),
            within=data.get("within"),
            kind=data.get("kind", ()),
            rows=data.get("rows"),
        )

    def __repr__(self) -> str:
        args = [repr(p) for p in self.patterns]
        if self.depth is not None:
            args.append(f"depth={self.depth}")
        if self.within is not None:
            args.append(f"within={self.within!r}")
        if self.kind:
            args.append(f"kind={self.kind[0]!r}" if len(self.kind) == 1 else f"kind={list(self.kind)!r}")
        if self.rows is not None:
            args.append(f"rows={self.rows!r}" if isinstance(self.rows, str) else f"rows={list(self.rows)!r}")
        return f"{self.action}({', '.join(args)})"


def _rule(action: Action, patterns: tuple[Patterns, ...], depth: int | None, within: str | None,
          kind: Patterns | None, rows: Rows | None = None) -> Rule:
    return Rule(action, patterns=tuple(patterns), depth=depth, within=within, kind=kind or (),  # type: ignore[arg-type]
                rows=rows)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Spec:
    """An immutable, ordered list of rules; for each parameter the last rule that selects
    it decides, and parameters no rule selects keep their current state.

    >>> spec = Spec().freeze("backbone").unfreeze("*.bias")
    >>> spec
    Spec(freeze('backbone'), unfreeze('*.bias'))
    >>> len(spec), hash(spec) == hash(Spec.from_json(spec.to_json()))
    (2, True)
    """

    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        rules = tuple(self.rules) if isinstance(self.rules, (list, tuple)) else self.rules
        if not isinstance(rules, tuple) or not all(isinstance(r, Rule) for r in rules):
            raise SpecError(f"Spec(rules=...) takes a sequence of Rule; received {self.rules!r}")
        object.__setattr__(self, "rules", rules)

    def freeze(self, *patterns: Patterns, depth: int | None = None, within: str | None = None,
               kind: Patterns | None = None, rows: Rows | None = None) -> Spec:
        """Return a new spec with a freeze rule appended.

        >>> Spec().freeze(depth=-3)
        Spec(freeze(depth=-3))
        """
        return Spec((*self.rules, _rule("freeze", patterns, depth, within, kind, rows)))

    def unfreeze(self, *patterns: Patterns, depth: int | None = None, within: str | None = None,
                 kind: Patterns | None = None, rows: Rows | None = None) -> Spec:
        """Return a new spec with an unfreeze rule appended.

        >>> Spec().unfreeze("head")
        Spec(unfreeze('head'))
        """
        return Spec((*self.rules, _rule("unfreeze", patterns, depth, within, kind, rows)))

    def __add__(self, other: Spec) -> Spec:
        if not isinstance(other, Spec):
            return NotImplemented
        return Spec(self.rules + other.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"Spec({', '.join(map(repr, self.rules))})"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, stable for JSON and YAML.

        >>> freeze("a").to_dict()
        {'version': 1, 'rules': [{'action': 'freeze', 'patterns': ['a']}]}
        """
        return {"version": VERSION, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Spec:
        """Inverse of :meth:`to_dict`; raises :class:`SpecError` naming the bad field.

        >>> Spec.from_dict({"rules": [{"action": "unfreeze"}]})
        Spec(unfreeze())
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a mapping with keys {SPEC_KEYS}; received {data!r}")
        unknown = sorted(str(k) for k in data if k not in SPEC_KEYS)
        if unknown:
            raise SpecError(f"unknown spec key(s) {unknown}; accepted keys are {SPEC_KEYS}")
        version = data.get("version", VERSION)
        if version != VERSION:
            raise SpecError(f"spec version must be {VERSION}; received {version!r}")
        rules = data.get("rules", [])
        if not isinstance(rules, (list, tuple)):
            raise SpecError(f"'rules' must be a list of rule mappings; received {rules!r}")
        out = []
        for i, r in enumerate(rules):
            try:
                out.append(Rule.from_dict(r))
            except SpecError as exc:
                raise SpecError(f"rules[{i}]: {exc}") from None
        return cls(tuple(out))

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict`.

        >>> Spec.from_json(freeze(kind="BatchNorm*").to_json())
        Spec(freeze(kind='BatchNorm*'))
        """
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        """Parse JSON text written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"spec JSON could not be parsed: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        """Read a spec from a ``.json`` file, or ``.yaml``/``.yml`` when PyYAML is installed.

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "spec.json")
        >>> freeze("a").save(p); Spec.load(p)
        Spec(freeze('a'))
        """
        return cls.from_dict(load_data(path))

    def save(self, path: str | Path) -> None:
        """Write the spec to ``.json`` or ``.yaml``/``.yml`` (chosen by the suffix)."""
        dump_data(self.to_dict(), path)


def load_data(path: str | Path) -> Any:
    """Read JSON or YAML data from a file, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        yaml = _yaml()
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{str(path)!r} is not valid YAML: {exc}") from None
    if path.suffix.lower() != ".json":
        raise SpecError(f"cannot tell the format of {str(path)!r}: use a .json, .yaml or .yml file")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SpecError(f"{str(path)!r} is not valid JSON: {exc}") from None


def dump_data(data: Any, path: str | Path) -> None:
    """Write data as JSON or YAML, chosen by the file's suffix."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        path.write_text(_yaml().safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")


def _yaml() -> Any:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise SpecError("YAML needs PyYAML: pip install 'layerlock[yaml]' (or use a .json file)") from None
    return yaml


def freeze(*patterns: Patterns, depth: int | None = None, within: str | None = None,
           kind: Patterns | None = None, rows: Rows | None = None) -> Spec:
    """A spec that freezes what the selectors pick (everything when none is given).

    >>> freeze("backbone", depth=2)
    Spec(freeze('backbone', depth=2))
    """
    return Spec().freeze(*patterns, depth=depth, within=within, kind=kind, rows=rows)


def unfreeze(*patterns: Patterns, depth: int | None = None, within: str | None = None,
             kind: Patterns | None = None, rows: Rows | None = None) -> Spec:
    """A spec that unfreezes what the selectors pick (everything when none is given).

    >>> unfreeze("*.bias")
    Spec(unfreeze('*.bias'))
    >>> unfreeze("embed_tokens", rows="32000:")     # only the new token rows of the table
    Spec(unfreeze('embed_tokens', rows='32000:'))
    """
    return Spec().unfreeze(*patterns, depth=depth, within=within, kind=kind, rows=rows)
