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

from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class RowAxis(NamedTuple):
    """A parameter whose rows a spec can decide (``rows=``): its ``shape`` in the framework's
    storage, the ``axis`` of its rows there (an embedding table's entries, a dense layer's
    output units), and the rows trainable now when only some are (None: the whole tensor
    follows its trainable flag); ``refused`` says why its rows cannot be decided where the
    framework stores it so (a tensor sharded across processes).

    >>> RowAxis((16, 4), 1).length
    4
    """

    shape: tuple[int, ...]
    axis: int
    trainable: tuple[int, ...] | None = None
    refused: str | None = None

    @property
    def length(self) -> int:
        """How many rows the tensor has."""
        return self.shape[self.axis]


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


@dataclass(eq=False, slots=True)
class Tree:
    """A model as flat pre-order arrays: what the resolver reads.

    Layer ``i`` has ``layer_paths[i]``, ``kinds[i]``, ``layer_keys[i]``, ``norm[i]`` and
    ``held[i]``; its subtree is layers ``[i, end[i])``; its own parameters are the entries
    ``[first[i], first[i + 1])`` of the parameter arrays (``param_paths``, ``numels``,
    ``trainable``, ``param_keys``, ``owner``), its subtree's ``[first[i], first[end[i]])``.
    ``first`` ends with one extra entry, the number of parameter occurrences.

    A wrapped model may also give each layer and parameter one alternative name
    (``layer_names``, ``param_names``: the entry's own path where it has none), and
    ``root``, the layer that ``depth`` and ``within`` count from: the torch backend names a
    PEFT model's weights as its base model does and makes the base model the root, so a
    spec written for the base model selects the same weights after wrapping. ``rows`` maps a
    parameter occurrence to its :class:`RowAxis` where a backend can decide single rows (an
    embedding table's entries, a dense layer's output units); :meth:`all_rows` completes it
    where a backend fills it lazily.
    :func:`build` walks a framework's model into one, and :meth:`of` flattens a
    :class:`Node` tree. ``end[i]`` is exclusive: layer ``i``'s subtree is ``range(i, end[i])``.

    >>> t = Tree.of(Node("", "Net", children=[Node("fc", "Linear", params=[Param("fc.w", 6, True, 0)])]))
    >>> t.layer_paths, t.end, t.first, t.owner
    (['', 'fc'], [2, 2], [0, 0, 1], [1])
    """

    layer_paths: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    layer_keys: list[Hashable] = field(default_factory=list)
    norm: list[bool] = field(default_factory=list)
    held: list[bool] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=list)
    param_paths: list[str] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    trainable: list[bool] = field(default_factory=list)
    param_keys: list[Hashable] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    layer_names: list[str] | None = None
    param_names: list[str] | None = None
    root: int = 0
    rows: dict[int, RowAxis] = field(default_factory=dict)
    rows_later: Callable[[], None] | None = None

    def all_rows(self) -> dict[int, RowAxis]:
        """``rows`` complete: a backend may fill it at once for the tensors trainable in part
        only, and leave the others to ``rows_later``, which this runs (once).

        >>> tree = Tree()
        >>> tree.rows_later = lambda: tree.rows.update({0: RowAxis((4, 2), 0)})
        >>> tree.all_rows()
        {0: RowAxis(shape=(4, 2), axis=0, trainable=None, refused=None)}
        """
        if self.rows_later is not None:
            fill, self.rows_later = self.rows_later, None
            fill()
        return self.rows

    @classmethod
    def of(cls, root: Node | Tree) -> Tree:
        """The flat form of a :class:`Node` tree (a Tree is returned as it is)."""
        if isinstance(root, Tree):
            return root
        tree = cls()

        def visit(node: Node) -> None:
            i = len(tree.layer_paths)
            tree.layer_paths.append(node.path)
            tree.kinds.append(node.kind)
            tree.layer_keys.append(node.key if node.key is not None else id(node))
            tree.norm.append(node.norm)
            tree.held.append(node.held)
            tree.end.append(0)
            tree.first.append(len(tree.param_paths))
            for p in node.params:
                tree.param_paths.append(p.path)
                tree.numels.append(p.numel)
                tree.trainable.append(p.trainable)
                tree.param_keys.append(p.key)
                tree.owner.append(i)
            for child in node.children:
                visit(child)
            tree.end[i] = len(tree.layer_paths)

        visit(root)
        tree.first.append(len(tree.param_paths))
        return tree

    def children(self, i: int) -> list[int]:
        """Indices of layer ``i``'s direct children, in order."""
        out, j = [], i + 1
        while j < self.end[i]:
            out.append(j)
            j = self.end[j]
        return out

    def frozen_norms(self) -> list[int]:
        """Norm layers (each once, under its first path) with parameters of their own, all
        frozen: the layers whose running statistics ``ll.check`` asks about.

        >>> Tree.of(Node("", "Net", children=[Node("bn", "BatchNorm", norm=True,
        ...     params=[Param("bn.scale", 3, False, 1)])])).frozen_norms()
        [1]
        """
        seen: set[Hashable] = set()
        out = []
        for i, key in enumerate(self.layer_keys):
            own = self.trainable[self.first[i]:self.first[i + 1]]
            if self.norm[i] and own and not any(own) and key not in seen:
                seen.add(key)
                out.append(i)
        return out

    def is_list(self, i: int, children: list[int]) -> bool:
        """Layer ``i`` is a list of layers: no parameters of its own, and ``children`` named
        ``0``, ``1``, ... in order (torch ModuleList / Sequential, nnx.List, a pytree list or tuple)."""
        if not children or self.first[i + 1] > self.first[i]:
            return False
        paths = self.layer_paths
        return all(paths[c].rpartition(".")[2] == str(n) for n, c in enumerate(children))

    def blocks(self, i: int) -> tuple[int, list[int]]:
        """The blocks of layer ``i`` (what ``depth`` counts): the layer whose children they
        are, and those children.

        A layer is transparent for depth when it has no parameters of its own and one child,
        a list of layers (:meth:`is_list`): its blocks are that list's entries. So
        ``nnx.Sequential`` / ``eqx.nn.Sequential`` (child ``layers``), ``eqx.nn.MLP`` and a torch
        module whose only child is a ModuleList count their layers as torch's Sequential does.
        This repeats while the container found is transparent, or is a one-entry list whose
        entry is. A list among other children stays one block.

        >>> t = Tree.of(Node("", "MLP", children=[Node("layers", "list", children=[
        ...     Node("layers.0", "Linear"), Node("layers.1", "Linear")])]))
        >>> t.blocks(0)
        (1, [2, 3])
        """
        children = self.children(i)
        while len(children) == 1 and self.first[i + 1] == self.first[i]:
            only = children[0]
            inner = self.children(only)
            if self.is_list(only, inner):
                i, children = only, inner
            elif self.is_list(i, children) and len(inner) == 1 and self.first[only + 1] == self.first[only] \
                    and self.is_list(inner[0], self.children(inner[0])):
                i, children = only, inner  # a one-entry list whose entry is transparent: step into it
            else:
                break
        return i, children


@dataclass(eq=False, slots=True)
class Walk:
    """A model walked once: its :class:`Tree` and, in the tree's order, the framework object
    behind each layer (``layers[i]``) and each parameter occurrence (``tensors[o]``)."""

    tree: Tree
    layers: list[Any]
    tensors: list[Any]


def _plain(layer: Any) -> tuple[str, bool, bool]:
    return type(layer).__name__, False, False


def build(root: Any, children: Callable[[Any], Iterable[tuple[str, Any]]],
          params: Callable[[Any], Iterable[tuple[str, Any, int, bool]]],
          describe: Callable[[Any], tuple[str, bool, bool]] = _plain,
          key: Callable[[Any], Hashable] = id) -> Walk:
    """The one tree builder: walk ``root`` pre-order through a framework's two questions.

    - ``children(layer)``: ``(name, sublayer)`` pairs in the framework's order;
    - ``params(layer)``: ``(name, tensor, numel, trainable)`` for the layer's own parameters;
    - ``describe(layer)``: ``(kind, norm, held)`` (default: class name, False, False);
    - ``key(tensor)``: a parameter's identity (default ``id``: the same tensor reached under two
      paths is one tied parameter). A layer's identity is always ``id(layer)``.

    Paths are the names joined with ``.`` from the root ('' is the root).

    >>> walk = build({"fc": {"w": [1.0, 2.0]}},
    ...              lambda d: [(k, v) for k, v in d.items() if isinstance(v, dict)],
    ...              lambda d: [(k, v, len(v), True) for k, v in d.items() if isinstance(v, list)])
    >>> walk.tree.layer_paths, walk.tree.param_paths, walk.tree.end
    (['', 'fc'], ['fc.w'], [2, 2])
    """
    tree = Tree()
    layers: list[Any] = []
    tensors: list[Any] = []
    layer_paths, kinds, layer_keys, norms, held = tree.layer_paths, tree.kinds, tree.layer_keys, tree.norm, tree.held
    end, first, param_paths, numels = tree.end, tree.first, tree.param_paths, tree.numels
    trainable, param_keys, owner = tree.trainable, tree.param_keys, tree.owner

    def visit(path: str, layer: Any) -> None:
        i = len(layer_paths)
        kind, norm, hold = describe(layer)
        layer_paths.append(path)
        kinds.append(kind)
        layer_keys.append(id(layer))
        norms.append(norm)
        held.append(hold)
        end.append(0)
        first.append(len(param_paths))
        layers.append(layer)
        prefix = path + "." if path else ""
        for name, tensor, numel, on in params(layer):
            param_paths.append(prefix + name)
            numels.append(numel)
            trainable.append(on)
            param_keys.append(key(tensor))
            owner.append(i)
            tensors.append(tensor)
        for name, child in children(layer):
            visit(prefix + name, child)
        end[i] = len(layer_paths)

    visit("", root)
    first.append(len(param_paths))
    return Walk(tree, layers, tensors)
