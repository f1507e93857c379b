"""Resolve a spec against a model's tree into a :class:`Plan` (pure Python, no framework).

Every selection in layerlock goes through here: specs, and the patterns that helpers take
(``param_groups(lr_mult=...)``), so they share one meaning and one set of errors.

>>> import layerlock as ll
>>> from layerlock.tree import Node, Param
>>> root = Node("", "Net", children=[
...     Node("body", "Linear", params=[Param("body.weight", 6, True, 1)]),
...     Node("head", "Linear", params=[Param("head.weight", 2, True, 2)])])
>>> resolve(root, ll.freeze(depth=1)).frozen
('body.weight',)
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Literal, TypeVar

from . import families
from .errors import LayerlockWarning, NoMatchError, SpecError
from .results import LayerPlan, Plan, RowPlan, state_name
from .spec import ROW_FORMS, Rule, Spec, matcher
from .tree import Node, RowAxis, Tree

BN_POLICIES: tuple[str, ...] = ("follow", "trainable", "frozen")
FROZEN_MODES: tuple[str | None, ...] = (None, "eval")
# What a backend can hold in inference mode: any layer, norm layers only, nothing
# (its ``holds`` attribute; the registry validates the same values).
HOLDS: tuple[str, ...] = ("any", "norm", "none")
BnPolicy = Literal["follow", "trainable", "frozen"]
_GLOB = frozenset("*?[")
_T = TypeVar("_T")


def check_options(spec: object, bn: object, frozen_mode: object) -> None:
    """Reject a non-Spec, an unknown ``bn`` policy or ``frozen_mode`` with a clear SpecError."""
    if not isinstance(spec, Spec):
        raise SpecError(f"spec must be a layerlock.Spec such as ll.freeze('backbone'); received "
                        f"{spec!r} ({type(spec).__name__}). Use ll.Spec.from_dict(...) for a mapping.")
    if bn not in BN_POLICIES:
        raise SpecError(f"bn must be one of {BN_POLICIES}; received {bn!r}")
    if frozen_mode not in FROZEN_MODES:
        raise SpecError(f"frozen_mode must be one of {FROZEN_MODES}; received {frozen_mode!r}")


def _index(paths: list[str], names: list[str] | None) -> dict[str, int]:
    """Position of each path, then of each alternative name no path already has."""
    index = {p: i for i, p in enumerate(paths)}
    for i, name in enumerate(names or ()):
        index.setdefault(name, i)
    return index


def _either(match: Callable[[str], bool], names: tuple[str, str]) -> bool:
    """Whether ``match`` accepts a (path, alternative name) pair."""
    path, name = names
    return match(path) or (name != path and match(name))


def _suggest(word: str, candidates: Iterable[str]) -> list[str]:
    import difflib  # only on the error path

    pool = set(candidates)
    if word.startswith("*."):  # a suffix glob: compare against the short names too
        pool |= {"*." + c.rpartition(".")[2] for c in pool}
    return difflib.get_close_matches(word.removeprefix("re:"), sorted(pool), n=3, cutoff=0.6)


class _Resolver:
    """Which rule last selected each layer (``node_rule``) and each parameter occurrence
    (``param_rule``) of one tree; -1 where none did. ``counted`` holds the blocks ``depth``
    counted where they are not the children of the layer it was given (a transparent one)."""

    def __init__(self, tree: Tree, strict: bool, backend: str = "") -> None:
        self.tree, self.strict, self.backend = tree, strict, backend
        self.node_rule = [-1] * len(tree.layer_paths)
        self.param_rule = [-1] * len(tree.param_paths)
        self.counted: dict[str, tuple[str, ...]] = {}

    @functools.cached_property
    def layer_index(self) -> dict[str, int]:
        return _index(self.tree.layer_paths, self.tree.layer_names)

    @functools.cached_property
    def param_index(self) -> dict[str, int]:
        return _index(self.tree.param_paths, self.tree.param_names)

    def fail(self, exc: SpecError) -> None:
        if self.strict:
            raise exc
        warnings.warn(str(exc), LayerlockWarning, stacklevel=5)

    def mark(self, i: int, r: int) -> int:
        """Select layer i and its subtree for rule r; return where the subtree ends."""
        end = self.tree.end[i]
        self.node_rule[i:end] = [r] * (end - i)
        return end

    def apply_rule(self, r: int, rule: Rule, label: str) -> None:
        if rule.selects_all:
            self.mark(0, r)
            return
        for pattern in rule.patterns:
            if not self.select_pattern(r, pattern):
                self.no_match(label, pattern)
        for kind in rule.kind:
            self.select_kind(r, kind, label)
        if rule.depth is not None:
            self.select_depth(r, rule, label)

    def select_pattern(self, r: int, pattern: str) -> bool:
        """Mark what ``pattern`` matches: a layer with its subtree, or a parameter."""
        tree, hit = self.tree, False
        if not pattern.startswith("re:") and _GLOB.isdisjoint(pattern):  # a plain path: look it up
            i = self.layer_index.get(pattern)
            if i is not None:
                self.mark(i, r)
                hit = True
            o = self.param_index.get(pattern)
            if o is not None:
                self.param_rule[o] = r
                hit = True
            return hit
        match = matcher(pattern)
        if tree.layer_names is None or tree.param_names is None:
            return self.mark_matching(r, match, tree.layer_paths, tree.param_paths)
        return self.mark_matching(r, functools.partial(_either, match), list(zip(tree.layer_paths, tree.layer_names)),
                                  list(zip(tree.param_paths, tree.param_names)))

    def mark_matching(self, r: int, match: Callable[[_T], bool], layers: Sequence[_T], params: Sequence[_T]) -> bool:
        """Mark each layer (with its subtree) and parameter whose entry in ``layers`` /
        ``params`` (a path, or a path and its alternative name) ``match`` accepts."""
        first, param_rule, hit = self.tree.first, self.param_rule, False
        i, n = 0, len(layers)
        while i < n:  # pre-order: a matched layer's subtree is skipped, it is all selected
            if match(layers[i]):
                i, hit = self.mark(i, r), True
                continue
            for o in range(first[i], first[i + 1]):
                if match(params[o]):
                    param_rule[o], hit = r, True
            i += 1
        return hit

    def no_match(self, label: str, pattern: str) -> None:
        tree = self.tree
        hint = _suggest(pattern, [p for p in self.layer_index if p] + list(self.param_index))
        kinds = sorted({k for k in tree.kinds if matcher(pattern)(k)})
        extra = f"; it names a layer kind: use kind={kinds[0]!r}" if kinds else ""
        self.fail(NoMatchError(
            f"{label}: pattern {pattern!r} matches no layer or parameter"
            + (f"; closest paths: {', '.join(hint)}" if hint else "") + extra
            + " (patterns are globs over full dotted paths, or 're:' + a regex)",
            pattern=pattern, suggestions=hint))

    def select_kind(self, r: int, kind: str, label: str) -> None:
        family = families.is_family(kind)
        match = families.matcher(kind, self.backend) if family else matcher(kind)
        skipped = families.outside(kind) if family else None
        skip = families.matcher(skipped, self.backend) if skipped else None
        kinds, end, hit, i = self.tree.kinds, self.tree.end, False, 0
        while i < len(kinds):
            if match(kinds[i]):
                i, hit = self.mark(i, r), True
            elif skip is not None and skip(kinds[i]):
                i = end[i]  # e.g. the projections inside an attention layer are not its dense layers
            else:
                i += 1
        if hit:
            return
        if family:
            present = ", ".join(list(dict.fromkeys(kinds))[:8])
            self.fail(NoMatchError(
                f"{label}: kind {kind!r} matches no layer; in {self.backend or 'this tree'} it is the classes "
                f"{', '.join(families.names(families.check(kind), self.backend))}; this model's layer kinds: "
                f"{present}", pattern=kind, suggestions=[]))
            return
        hint = _suggest(kind, set(kinds))
        other = families.family_of(kind) if _GLOB.isdisjoint(kind) else None
        self.fail(NoMatchError(f"{label}: kind {kind!r} matches no layer class"
                               + (f"; closest kinds: {', '.join(hint)}" if hint else "")
                               + (f"; {kind!r} is a {other} layer of some framework: kind='family:{other}' "
                                  f"selects {other} layers in every framework" if other else ""),
                               pattern=kind, suggestions=hint))

    def container(self, where: str, label: str) -> tuple[int, list[int]] | None:
        """The layer whose children are the blocks of layer ``where`` ('' is the model: layer
        ``tree.root``) and those children, or None (reported) if ``where`` is absent."""
        i = self.layer_index.get(where) if where else self.tree.root
        if i is None:
            hint = _suggest(where, [p for p, j in self.layer_index.items() if self.tree.end[j] > j + 1])
            self.fail(NoMatchError(f"{label}: within={where!r} is not a layer path"
                                   + (f"; closest containers: {', '.join(hint)}" if hint else ""),
                                   pattern=where, suggestions=hint))
            return None
        return self.tree.blocks(i)

    def select_depth(self, r: int, rule: Rule, label: str) -> None:
        assert rule.depth is not None
        where = rule.within or ""
        found = self.container(where, label)
        if found is None:
            return
        i, children = found
        paths, transparent = self.tree.layer_paths, i != (self.layer_index[where] if where else self.tree.root)
        if transparent:
            self.counted[paths[i]] = tuple(paths[c] for c in children)
        if abs(rule.depth) > len(children):
            names = ", ".join(paths[c] for c in children[:5])
            inside = f", the entries of {paths[i]!r}," if transparent else ""
            self.fail(SpecError(
                f"{label}: depth={rule.depth} but {where or 'the model'!s} has {len(children)} blocks{inside} "
                f"({names}{', ...' if len(children) > 5 else ''}); accepted: -{len(children)} to {len(children)}"))
        for child in children[: rule.depth]:
            self.mark(child, r)

    def decide(self, rules: Sequence[Rule], labels: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Apply the rules; for each occurrence, the last rule that selected it or one of its
        layers (-1 for none), and the tied groups (occurrences of one parameter). A tied
        parameter is decided by the last rule that selected any of its paths."""
        tree = self.tree
        keys = tree.param_keys
        groups: list[list[int]] = []
        if len(set(keys)) != len(keys):
            positions: dict[Hashable, list[int]] = {}
            for o, key in enumerate(keys):
                positions.setdefault(key, []).append(o)
            groups = [os for os in positions.values() if len(os) > 1]
        self.selected_by: dict[int, set[int]] = {o: set() for os in groups for o in os}
        self.row_selected: dict[int, list[int]] = {}  # a rows= rule -> the occurrences it selects
        # The tensors whose rows can be decided (a tied one also under its first occurrence)
        # where a rule decides rows; else only those trainable in part now, which keep theirs.
        if any(rule.rows is not None for rule in rules):
            self.rows = dict(tree.all_rows())
        else:
            self.rows = {o: info for o, info in tree.rows.items() if info.trainable is not None}
        for r, rule in enumerate(rules):
            if rule.rows is not None:
                self.row_selected[r] = self.selection(r, rule, labels[r])
                for o in self.row_selected[r]:
                    if o in self.selected_by:
                        self.selected_by[o].add(r)
                continue
            self.apply_rule(r, rule, labels[r])
            for o, selected in self.selected_by.items():
                if r in (self.param_rule[o], self.node_rule[tree.owner[o]]):
                    selected.add(r)
        node_rule = self.node_rule
        decided = [r if r > (nr := node_rule[i]) else nr for r, i in zip(self.param_rule, tree.owner)]
        for os in groups:
            last = max(decided[o] for o in os)
            for o in os:
                decided[o] = last
        return decided, groups

    def selection(self, r: int, rule: Rule, label: str) -> list[int]:
        """The occurrences ``rule`` selects, leaving every other rule's marks as they are."""
        kept = self.node_rule, self.param_rule
        self.node_rule, self.param_rule = [-1] * len(kept[0]), [-1] * len(kept[1])
        try:
            self.apply_rule(r, rule, label)
            node_rule = self.node_rule
            return [o for o, (pr, i) in enumerate(zip(self.param_rule, self.tree.owner)) if r in (pr, node_rule[i])]
        finally:
            self.node_rule, self.param_rule = kept


def select(root: Node | Tree, patterns: Sequence[str], *, strict: bool = True, what: str = "pattern") -> list[int]:
    """For each parameter occurrence of ``root``, the index of the last of ``patterns`` that
    selects it (-1 for none), with a spec's meaning: a layer path selects its subtree, the
    later pattern wins, and a pattern that matches nothing raises :class:`NoMatchError`
    (a warning with ``strict=False``). ``what`` names the patterns in errors.

    >>> from layerlock.tree import Node, Param
    >>> root = Node("", "Net", children=[Node("fc", "Linear", params=[Param("fc.bias", 1, True, 0)])])
    >>> select(root, ["fc", "*.bias"]), select(root, ["*.bias", "fc"])
    ([1], [1])
    """
    rules = [Rule("freeze", patterns=(p,)) for p in patterns]
    return _Resolver(Tree.of(root), strict).decide(rules, [what] * len(rules))[0]


def blocks(root: Node | Tree, within: str | None = None, *, strict: bool = True) -> list[str]:
    """Paths of the blocks ``depth`` counts: the children of ``within`` (or of the model),
    or the entries of its list where it is transparent (see :meth:`Tree.blocks`).

    >>> from layerlock.tree import Node
    >>> blocks(Node("", "Net", children=[Node("a", "Linear"), Node("b", "Linear")]))
    ['a', 'b']
    >>> blocks(Node("", "MLP", children=[Node("layers", "list", children=[Node("layers.0", "Linear")])]))
    ['layers.0']
    """
    tree = Tree.of(root)
    found = _Resolver(tree, strict).container(within or "", f"within={within!r}")
    return [tree.layer_paths[c] for c in (found[1] if found else ())]


def resolve(root: Node | Tree, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow",
            frozen_mode: str | None = None, param_level: bool = True, backend: str = "",
            holds: str = "any") -> Plan:
    """Decide every parameter of the tree ``root`` under ``spec``; touches nothing.

    ``param_level=False`` is for backends that can only freeze whole layers: a plan that
    splits a layer's parameters then raises :class:`SpecError`. ``holds`` is what the
    backend can hold in inference mode (one of :data:`HOLDS`): with ``"norm"`` or ``"none"``
    ``frozen_mode="eval"`` raises :class:`SpecError`, and with ``"none"`` the plan holds no
    layer (the ``bn`` policy still decides norm layers' trainable flags).

    >>> from layerlock.tree import Node, Param
    >>> import layerlock as ll
    >>> root = Node("", "Net", params=[Param("w", 4, True, 0), Param("b", 2, True, 1)])
    >>> resolve(root, ll.freeze().unfreeze("b")).trainable
    ('b',)
    """
    check_options(spec, bn, frozen_mode)
    _check_holds(holds, frozen_mode, backend)
    tree = Tree.of(root)
    res = _Resolver(tree, strict, backend)
    decided, groups = res.decide(spec.rules, [f"rule #{r} {rule!r}" for r, rule in enumerate(spec.rules)])
    for os in groups:
        _check_tied(res, spec, os)
        if os[0] not in res.rows and (info := next((res.rows[o] for o in os if o in res.rows), None)):
            res.rows[os[0]] = info  # a tied tensor's rows are decided where one of its holders has them
    actions = [rule.action == "unfreeze" for rule in spec.rules]
    after = [actions[r] if r >= 0 else t for r, t in zip(decided, tree.trainable)]
    rules: list[int | str | None] = [r if r >= 0 else None for r in decided]
    if bn != "follow":  # the policy overrides the rules for every norm layer's own parameters
        first = tree.first
        for i in [i for i, norm in enumerate(tree.norm) if norm]:
            for o in range(first[i], first[i + 1]):
                after[o], rules[o] = bn == "trainable", "bn"
    partial = _decide_rows(res, spec, decided, after, rules, groups) if res.row_selected or res.rows else {}
    if not param_level:
        _check_whole_layers(tree, after, backend)
    layers = tuple(_layer_plans(res, bn, frozen_mode, after, spec)) if holds != "none" else ()
    paths, numels, before = tree.param_paths, tree.numels, tree.trainable
    aliases: dict[int, tuple[str, ...]] = {}
    carried: dict[int, tuple[str, ...]] = {}
    if groups:  # a tied parameter is one row, under its first path
        secondary = {o for os in groups for o in os[1:]}
        rows = [o for o in range(len(paths)) if o not in secondary]
        row_of = {o: k for k, o in enumerate(rows)}
        aliases = {row_of[os[0]]: tuple(paths[o] for o in os[1:]) for os in groups}
        carried = {row_of[os[0]]: missed for os in groups if (missed := _carried(res, os, rules[os[0]]))}
        paths, numels, before = [paths[o] for o in rows], [numels[o] for o in rows], [before[o] for o in rows]
        after, rules = [after[o] for o in rows], [rules[o] for o in rows]
    row_plans = {}
    if res.rows:  # the tensors trainable in part, before or after, by their plan row
        row_of_occurrence = row_of if groups else {o: o for o in res.rows}
        row_plans = {row_of_occurrence[o]: RowPlan(info.length, info.trainable, partial.get(o))
                     for o, info in res.rows.items()
                     if o in row_of_occurrence and (info.trainable is not None or o in partial)}
    plan = Plan(spec, tuple(paths), tuple(numels), tuple(before), tuple(after), tuple(rules), aliases,
                layers, bn, frozen_mode, backend, carried, res.counted, row_plans)
    notes = [plan.tied_note(k) for k in carried if before[k] != after[k]]
    if notes:
        warnings.warn(
            "a rule reached a tied tensor through some of its paths only; its decision covers the "
            "other paths too:\n  " + "\n  ".join(notes)
            + "\nTo decide the paths apart, untie the weights (e.g. tie_word_embeddings=False); to keep the "
            "tie, say so with a last rule that names all its paths.", LayerlockWarning, stacklevel=_outside())
    return plan


def _decide_rows(res: _Resolver, spec: Spec, decided: list[int], after: list[bool], rules: list[int | str | None],
                 groups: list[list[int]]) -> dict[int, tuple[int, ...]]:
    """Apply the ``rows=`` rules, in order, to what each selects where no later whole-tensor
    rule decides it; ``after`` and ``rules`` are updated in place. Returns the partially
    trainable occurrences (a tied parameter under its first one) and their trainable rows."""
    tree = res.tree
    first = {o: os[0] for os in groups for o in os}
    state: dict[int, set[int]] = {}
    for r, selected in res.row_selected.items():
        rule = spec.rules[r]
        label = f"rule #{r} {rule!r}"
        for o in dict.fromkeys(first.get(o, o) for o in selected):
            if decided[o] > r:
                continue  # a later rule decides the whole tensor
            info = res.rows.get(o)
            if info is None:
                raise SpecError(
                    f"{label}: rows= decides the entries of an embedding table or the output units of a dense "
                    f"layer, and {tree.param_paths[o]} ({tree.numels[o]} scalars) has no such axis that the "
                    f"{res.backend or 'given'} backend can decide. Narrow the rule's patterns to such tensors.")
            if info.refused:
                raise SpecError(
                    f"{label}: rows= cannot decide {tree.param_paths[o]} (shape {info.shape}): it is {info.refused}, "
                    "and rows train in a tensor each process holds whole. Accepted: rows of an unsharded tensor "
                    "(DistributedDataParallel replicates it; or leave its module out of the sharding), or the "
                    "whole tensor without rows=.")
            chosen = _row_set(rule.rows, info, tree.param_paths[o], label)  # type: ignore[arg-type]
            if o not in state:
                whole = set(range(info.length)) if after[o] else set()
                state[o] = set(info.trainable) if decided[o] < 0 and info.trainable is not None else whole
            state[o] = state[o] | chosen if rule.action == "unfreeze" else state[o] - chosen
            rules[o] = r
    partial = {o: info.trainable for o, info in res.rows.items()
               if info.trainable is not None and decided[o] < 0 and o not in state}  # untouched: kept
    for o, on in state.items():
        after[o] = len(on) == res.rows[o].length
        if on and not after[o]:
            partial[o] = tuple(sorted(on))
    return partial


def _row_set(rows: str | tuple[int, ...], info: RowAxis, path: str, label: str) -> set[int]:
    """The row indices ``rows`` names in a tensor of ``info``'s shape; SpecError out of range."""
    where = f"{path} (shape {info.shape}, {info.length} rows on axis {info.axis})"
    if isinstance(rows, str):
        start, stop = (int(b) if b else None for b in rows.split(":"))
        picked = range(info.length)[slice(start, stop)]
        if not picked:
            raise SpecError(f"{label}: rows={rows!r} selects no row of {where}; {ROW_FORMS}")
        return set(picked)
    out = set()
    for i in rows:
        if not -info.length <= i < info.length:
            raise SpecError(f"{label}: row {i} is out of range for {where}; {ROW_FORMS}")
        out.add(i % info.length)
    return out


def _check_holds(holds: str, frozen_mode: str | None, backend: str) -> None:
    """Refuse what the backend cannot hold: ``frozen_mode="eval"`` needs ``holds="any"``.

    >>> _check_holds("norm", "eval", "tinygrad")
    Traceback (most recent call last):
    ...
    layerlock.errors.SpecError: frozen_mode='eval' holds frozen subtrees in inference mode, but the tinygrad backend ...
    """
    if holds not in HOLDS:
        raise SpecError(f"holds must be one of {HOLDS}; received {holds!r}")
    if frozen_mode == "eval" and holds != "any":
        can = "only norm layers (holds='norm')" if holds == "norm" else "no layer (holds='none')"
        raise SpecError(f"frozen_mode='eval' holds frozen subtrees in inference mode, but the {backend or 'unknown'} "
                        f"backend can hold {can}; accepted with this backend: frozen_mode=None")


def _check_whole_layers(tree: Tree, after: list[bool], backend: str) -> None:
    first = tree.first
    for i, path in enumerate(tree.layer_paths):
        states = after[first[i]:first[i + 1]]
        if len(set(states)) > 1:
            raise SpecError(
                f"this backend ({backend or 'unknown'}) freezes whole layers only, but the plan splits layer "
                f"{path!r}: " + ", ".join(f"{tree.param_paths[o].rpartition('.')[2]} {state_name(after[o])}"
                                          for o in range(first[i], first[i + 1]))
                + ". Select the layer, not single parameters.")


def _check_tied(res: _Resolver, spec: Spec, occurrences: list[int]) -> None:
    """Report rules that disagree about a tied parameter. Rules selecting all its paths
    treat it as one tensor; a disagreement is two paths whose last rules of their own (after
    the last shared one) ask for different things, as in freeze("transformer") then
    unfreeze("lm_head") when lm_head.weight is the embedding matrix."""
    selected_by, paths = res.selected_by, res.tree.param_paths
    shared = set.intersection(*(selected_by[o] for o in occurrences))
    last_shared = max(shared, default=-1)
    own = {o: max((r for r in selected_by[o] - shared if r > last_shared), default=-1) for o in occurrences}
    if len({spec.rules[r].action for r in own.values() if r >= 0}) > 1:
        res.fail(SpecError(
            f"tied parameter {' = '.join(paths[o] for o in occurrences)} is one tensor, but the rules "
            "disagree: " + "; ".join(f"{paths[o]} <- #{r} {spec.rules[r]!r}" for o, r in own.items() if r >= 0)
            + ". Add a last rule that names all its paths to decide it."))


def _outside() -> int:
    """The ``stacklevel`` that points a warning raised by our caller at the first frame
    outside layerlock: the user's ``ll.plan`` / ``ll.apply`` call, however it got here."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("layerlock."):
        frame, level = frame.f_back, level + 1
    return level


def _carried(res: _Resolver, occurrences: list[int], rule: int | str | None) -> tuple[str, ...]:
    """The paths of a tied parameter that its deciding ``rule`` did not select: the decision
    carries them along (freeze("encoder") freezes T5's shared embedding under every path)."""
    if not isinstance(rule, int):  # no rule, or the bn policy: nothing is carried by a rule
        return ()
    return tuple(res.tree.param_paths[o] for o in occurrences if rule not in res.selected_by[o])


def _layer_plans(res: _Resolver, bn: str, frozen_mode: str | None, after: list[bool],
                 spec: Spec) -> list[LayerPlan]:
    """Which layers are held in inference mode: frozen norm layers (by the bn policy) and,
    with ``frozen_mode='eval'``, the topmost fully frozen subtrees. ``after`` is the
    trainable-after flag of each parameter occurrence."""
    tree = res.tree
    first, end, norm, held_now = tree.first, tree.end, tree.norm, tree.held
    trainable_upto = [0]  # prefix sums over occurrences, for "is this subtree all frozen?"
    if frozen_mode == "eval":
        candidates: Iterable[int] = range(len(norm))
        for trainable in after:
            trainable_upto.append(trainable_upto[-1] + trainable)
    else:
        candidates = [i for i, (n, h) in enumerate(zip(norm, held_now)) if n or h]

    out: dict[Hashable, LayerPlan] = {}
    for i in candidates:
        key = tree.layer_keys[i]
        if key in out:
            continue
        held: bool | None = None
        reason = "bn"
        if norm[i]:
            if bn != "follow":
                held = bn == "frozen"
            elif first[i + 1] > first[i]:
                held = not any(after[first[i]:first[i + 1]])
            elif res.node_rule[i] >= 0:
                held = spec.rules[res.node_rule[i]].action == "freeze"
            else:
                held = held_now[i]
        if frozen_mode == "eval" and i > 0 and not held:
            a, b = first[i], first[end[i]]
            parent_held = any(k in out and out[k].held_after for k in _ancestors(res, i))
            if b > a and trainable_upto[b] == trainable_upto[a] and not parent_held:
                held, reason = True, "frozen_mode"
        if held is None and held_now[i]:
            held, reason = False, "frozen_mode"
        if held is not None:
            out[key] = LayerPlan(tree.layer_paths[i], tree.kinds[i], held_now[i], held, reason)
    return list(out.values())


def _ancestors(res: _Resolver, i: int) -> Iterable[Hashable]:
    path = res.tree.layer_paths[i]
    while path:
        path = path.rpartition(".")[0]
        j = res.layer_index.get(path)
        if j is not None:
            yield res.tree.layer_keys[j]
