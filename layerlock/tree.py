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
