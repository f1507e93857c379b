"""The framework-neutral view of a model that backends build and the core reads.

A :class:`Node` is a layer/module with its full path, class name and direct parameters.
Tied parameters share one ``key`` (their identity), and so do layers reachable under two
paths, so the core can give each one a single decision.

>>> from layerlock.tree import Node, Param
>>> root = Node("", "Net", children=[Node("head", "Linear", params=[Param("head.bias", 3, True, 1)])])
>>> [p.path for p in root.parameters()]
['head.bias']
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from ._format import count, table


@dataclass(eq=False, slots=True)
class Param:
    """One parameter occurrence: its path, size, current trainable flag and identity."""

    path: str
    numel: int
    trainable: bool
    key: Hashable


@dataclass(eq=False, slots=True)
class Node:
    """A layer: ``path`` ('' for the root), ``kind`` (class name), direct ``params``,
    ``children`` in the framework's order, ``norm`` (a BatchNorm-like layer that the ``bn``
    policy governs) and ``held`` (currently held in inference mode by layerlock)."""

    path: str
    kind: str
    params: list[Param] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    norm: bool = False
    held: bool = False
    key: Hashable = None

    def walk(self) -> Iterator[Node]:
        """Every node of the subtree, pre-order (parents before children)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def parameters(self) -> Iterator[Param]:
        """Every parameter occurrence of the subtree, in order (tied ones more than once)."""
        for node in self.walk():
            yield from node.params

    def unique_parameters(self) -> Iterator[Param]:
        """Each parameter once, under its first path (``named_parameters`` order)."""
        seen: set[Hashable] = set()
        for p in self.parameters():
            if p.key not in seen:
                seen.add(p.key)
                yield p


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
    """Per top-level block: trainable / frozen tensors and scalars. ``str()`` is a table.

    >>> from layerlock.tree import Node, Param
    >>> s = Summary.of(Node("", "Net", children=[Node("fc", "Linear", params=[Param("fc.w", 6, False, 0)])]))
    >>> s.frozen_scalars, s.trainable_scalars
    (6, 0)
    """

    rows: tuple[BlockRow, ...]

    @classmethod
    def of(cls, root: Node) -> Summary:
        seen: set[Hashable] = set()
        rows = []
        blocks: list[tuple[str, str, list[Param], bool]] = []
        if root.params:
            blocks.append(("(root)", root.kind, list(root.params), root.held))
        for child in root.children:
            held = any(n.held for n in child.walk())
            blocks.append((child.path, child.kind, list(child.parameters()), held))
        for name, kind, params, held in blocks:
            fresh = [p for p in params if p.key not in seen]
            seen.update(p.key for p in fresh)
            tr = [p for p in fresh if p.trainable]
            fr = [p for p in fresh if not p.trainable]
            rows.append(BlockRow(name, kind, len(tr), sum(p.numel for p in tr), len(fr),
                                 sum(p.numel for p in fr), held))
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
