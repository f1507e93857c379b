"""Resolve a spec against a model's tree into a :class:`Plan` (pure Python, no framework).

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
import warnings
from collections.abc import Hashable, Iterable
from typing import Literal

from .errors import LayerlockWarning, NoMatchError, SpecError
from .results import LayerPlan, ParamPlan, Plan, state_name
from .spec import Rule, Spec, matcher
from .tree import Node, Param

BN_POLICIES: tuple[str, ...] = ("follow", "trainable", "frozen")
FROZEN_MODES: tuple[str | None, ...] = (None, "eval")
BnPolicy = Literal["follow", "trainable", "frozen"]


def check_options(spec: object, bn: object, frozen_mode: object) -> None:
    """Reject a non-Spec, an unknown ``bn`` policy or ``frozen_mode`` with a clear SpecError."""
    if not isinstance(spec, Spec):
        raise SpecError(f"spec must be a layerlock.Spec such as ll.freeze('backbone'); received "
                        f"{spec!r} ({type(spec).__name__}). Use ll.Spec.from_dict(...) for a mapping.")
    if bn not in BN_POLICIES:
        raise SpecError(f"bn must be one of {BN_POLICIES}; received {bn!r}")
    if frozen_mode not in FROZEN_MODES:
        raise SpecError(f"frozen_mode must be one of {FROZEN_MODES}; received {frozen_mode!r}")


def _suggest(word: str, candidates: Iterable[str]) -> list[str]:
    import difflib  # only on the error path

    pool = set(candidates)
    if word.startswith("*."):  # a suffix glob: compare against the short names too
        pool |= {"*." + c.rpartition(".")[2] for c in pool}
    return difflib.get_close_matches(word.removeprefix("re:"), sorted(pool), n=3, cutoff=0.6)


class _Resolver:
    """Resolution state for one (tree, spec) pair. Nodes are kept pre-order, so the
    subtree of node i is the index range [i, end[i])."""

    def __init__(self, root: Node, strict: bool) -> None:
        self.strict = strict
        self.nodes: list[Node] = []
        self.end: list[int] = []
        self.owner: list[int] = []
        self.occurrences: list[Param] = []
        self.first_occ: list[int] = []  # node i's subtree holds occurrences [first_occ[i], first_occ[end[i]])

        nodes, end, owner, occurrences, first_occ = self.nodes, self.end, self.owner, self.occurrences, self.first_occ

        def visit(node: Node) -> None:
            i = len(nodes)
            nodes.append(node)
            end.append(0)
            first_occ.append(len(occurrences))
            if node.params:
                occurrences.extend(node.params)
                owner.extend([i] * len(node.params))
            for child in node.children:
                visit(child)
            end[i] = len(nodes)

        visit(root)
        self.first_occ.append(len(self.occurrences))
        self.node_rule = [-1] * len(self.nodes)
        self.param_rule = [-1] * len(self.occurrences)

    @functools.cached_property
    def by_path(self) -> dict[str, int]:
        return {n.path: i for i, n in enumerate(self.nodes)}

    def fail(self, exc: SpecError) -> None:
        if self.strict:
            raise exc
        warnings.warn(str(exc), LayerlockWarning, stacklevel=4)

    def mark(self, i: int, rule: int) -> int:
        """Select node i and its subtree; return where the subtree ends."""
        end = self.end[i]
        self.node_rule[i:end] = [rule] * (end - i)
        return end

    def apply_rule(self, r: int, rule: Rule) -> None:
        if rule.selects_all:
            self.mark(0, r)
            return
        for pattern in rule.patterns:
            match, hit, skip = matcher(pattern), False, 0
            for i, node in enumerate(self.nodes):
                if i < skip:
                    continue
                if match(node.path):
                    skip, hit = self.mark(i, r), True
            for o, p in enumerate(self.occurrences):
                if match(p.path):
                    self.param_rule[o], hit = r, True
            if not hit:
                paths = [n.path for n in self.nodes if n.path] + [p.path for p in self.occurrences]
                hint = _suggest(pattern, paths)
                kinds = sorted({n.kind for n in self.nodes if matcher(pattern)(n.kind)})
                extra = f"; it names a layer kind: use kind={kinds[0]!r}" if kinds else ""
                self.fail(NoMatchError(
                    f"rule #{r} {rule!r}: pattern {pattern!r} matches no layer or parameter"
                    + (f"; closest paths: {', '.join(hint)}" if hint else "") + extra
                    + " (patterns are globs over full dotted paths, or 're:' + a regex)",
                    pattern=pattern, suggestions=hint))
        for kind in rule.kind:
            match, hit, skip = matcher(kind), False, 0
            for i, node in enumerate(self.nodes):
                if i >= skip and match(node.kind):
                    skip, hit = self.mark(i, r), True
            if not hit:
                hint = _suggest(kind, {n.kind for n in self.nodes})
                self.fail(NoMatchError(
                    f"rule #{r} {rule!r}: kind {kind!r} matches no layer class"
                    + (f"; closest kinds: {', '.join(hint)}" if hint else ""),
                    pattern=kind, suggestions=hint))
        if rule.depth is not None:
            self.apply_depth(r, rule)

    def apply_depth(self, r: int, rule: Rule) -> None:
        assert rule.depth is not None
        where = rule.within or ""
        if where not in self.by_path:
            hint = _suggest(where, [n.path for n in self.nodes if n.children])
            exc = NoMatchError(f"rule #{r} {rule!r}: within={where!r} is not a layer path"
                               + (f"; closest containers: {', '.join(hint)}" if hint else ""),
                               pattern=where, suggestions=hint)
            self.fail(exc)
            return
        container = self.by_path[where]
        children = []  # indices of the container's children: each subtree ends where the next begins
        j = container + 1
        while j < self.end[container]:
            children.append(j)
            j = self.end[j]
        if abs(rule.depth) > len(children):
            self.fail(SpecError(
                f"rule #{r} {rule!r}: depth={rule.depth} but {where or 'the model'!s} has "
                f"{len(children)} blocks ({', '.join(self.nodes[c].path for c in children[:5])}"
                f"{', ...' if len(children) > 5 else ''}); accepted: -{len(children)} to {len(children)}"))
        for child in children[: rule.depth]:
            self.mark(child, r)


def resolve(root: Node, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow",
            frozen_mode: str | None = None, param_level: bool = True, backend: str = "") -> Plan:
    """Decide every parameter of the tree ``root`` under ``spec``; touches nothing.

    ``param_level=False`` is for backends that can only freeze whole layers: a plan that
    splits a layer's parameters then raises :class:`SpecError`.

    >>> from layerlock.tree import Node, Param
    >>> import layerlock as ll
    >>> root = Node("", "Net", params=[Param("w", 4, True, 0), Param("b", 2, True, 1)])
    >>> resolve(root, ll.freeze().unfreeze("b")).trainable
    ('b',)
    """
    check_options(spec, bn, frozen_mode)
    res = _Resolver(root, strict)
    occ = res.occurrences
    # A tied parameter (one key, several paths) needs every rule that selects each path.
    positions: dict[Hashable, list[int]] = {}
    for o, p in enumerate(occ):
        positions.setdefault(p.key, []).append(o)
    tied = {key: os for key, os in positions.items() if len(os) > 1}
    selected_by: dict[int, set[int]] = {o: set() for os in tied.values() for o in os}
    for r, spec_rule in enumerate(spec.rules):
        res.apply_rule(r, spec_rule)
        for o, rules in selected_by.items():
            if r in (res.param_rule[o], res.node_rule[res.owner[o]]):
                rules.add(r)

    # Each occurrence is decided by the latest rule that selected it or one of its layers;
    # a tied parameter by the latest rule that selected any of its paths.
    node_rule = res.node_rule
    decided = [max(r, node_rule[i]) for r, i in zip(res.param_rule, res.owner)]
    aliases: dict[int, tuple[str, ...]] = {}
    for os in tied.values():
        _check_tied(res, spec, os, selected_by)
        last = max(decided[o] for o in os)
        for o in os:
            decided[o] = last
        aliases[os[0]] = tuple(occ[o].path for o in os[1:])
    actions = [rule.action == "unfreeze" for rule in spec.rules]
    after = [actions[r] if r >= 0 else p.trainable for r, p in zip(decided, occ)]
    rule_of: list[int | str | None] = [r if r >= 0 else None for r in decided]
    if bn != "follow":  # the policy overrides the rules for every norm layer's parameters
        for i, node in enumerate(res.nodes):
            if node.norm:
                for o in range(res.first_occ[i], res.first_occ[i] + len(node.params)):
                    after[o], rule_of[o] = bn == "trainable", "bn"
    secondary = {o for os in tied.values() for o in os[1:]}
    params = tuple(ParamPlan(p.path, p.numel, p.trainable, after[o], rule_of[o], aliases.get(o, ()))
                   for o, p in enumerate(occ) if o not in secondary)

    if not param_level:
        for i, node in enumerate(res.nodes):
            first = res.first_occ[i]
            states = after[first:first + len(node.params)]
            if len(set(states)) > 1:
                raise SpecError(
                    f"this backend ({backend or 'unknown'}) freezes whole layers only, but the plan "
                    f"splits layer {node.path!r}: " + ", ".join(
                        f"{q.path.rpartition('.')[2]} {state_name(a)}" for q, a in zip(node.params, states))
                    + ". Select the layer, not single parameters.")

    layers = _layer_plans(res, bn, frozen_mode, after, spec)
    return Plan(spec, params, tuple(layers), bn, frozen_mode, backend)


def _check_tied(res: _Resolver, spec: Spec, occurrences: list[int], selected_by: dict[int, set[int]]) -> None:
    """Report rules that disagree about a tied parameter. Rules selecting all its paths
    treat it as one tensor; a disagreement is two paths whose last rules of their own (after
    the last shared one) ask for different things, as in freeze("transformer") then
    unfreeze("lm_head") when lm_head.weight is the embedding matrix."""
    shared = set.intersection(*(selected_by[o] for o in occurrences))
    last_shared = max(shared, default=-1)
    own = {o: max((r for r in selected_by[o] - shared if r > last_shared), default=-1) for o in occurrences}
    if len({spec.rules[r].action for r in own.values() if r >= 0}) > 1:
        res.fail(SpecError(
            f"tied parameter {' = '.join(res.occurrences[o].path for o in occurrences)} is one tensor, but "
            "the rules disagree: " + "; ".join(f"{res.occurrences[o].path} <- #{r} {spec.rules[r]!r}"
                                                for o, r in own.items() if r >= 0)
            + ". Add a last rule that names all its paths to decide it."))


def _layer_plans(res: _Resolver, bn: str, frozen_mode: str | None, after: list[bool],
                 spec: Spec) -> list[LayerPlan]:
    """Which layers are held in inference mode: frozen norm layers (by the bn policy) and,
    with ``frozen_mode='eval'``, the topmost fully frozen subtrees. ``after`` is the
    trainable-after flag of each parameter occurrence."""
    nodes, first_occ = res.nodes, res.first_occ
    trainable_upto = [0]  # prefix sums over occurrences, for "is this subtree all frozen?"
    if frozen_mode == "eval":
        for trainable in after:
            trainable_upto.append(trainable_upto[-1] + trainable)

    out: dict[Hashable, LayerPlan] = {}
    for i, node in enumerate(nodes):
        if not (node.norm or node.held or frozen_mode):
            continue
        key = node.key if node.key is not None else id(node)
        if key in out:
            continue
        held: bool | None = None
        reason = "bn"
        if node.norm:
            if bn != "follow":
                held = bn == "frozen"
            elif node.params:
                held = not any(after[first_occ[i]:first_occ[i] + len(node.params)])
            elif res.node_rule[i] >= 0:
                held = spec.rules[res.node_rule[i]].action == "freeze"
            else:
                held = node.held
        if frozen_mode == "eval" and i > 0 and not held:
            a, b = first_occ[i], first_occ[res.end[i]]
            parent_held = any(k in out and out[k].held_after for k in _ancestors(res, i))
            if b > a and trainable_upto[b] == trainable_upto[a] and not parent_held:
                held, reason = True, "frozen_mode"
        if held is None and node.held:
            held, reason = False, "frozen_mode"
        if held is not None:
            out[key] = LayerPlan(node.path, node.kind, node.held, held, reason)
    return list(out.values())


def _ancestors(res: _Resolver, i: int) -> Iterable[Hashable]:
    path = res.nodes[i].path
    while path:
        path = path.rpartition(".")[0]
        j = res.by_path.get(path)
        if j is not None:
            node = res.nodes[j]
            yield node.key if node.key is not None else id(node)
