"""JAX pytrees as a layerlock tree: Equinox modules, Flax linen param dicts, plain dicts and
lists of arrays. A pytree holds no trainable flag, so this module only translates: a pytree
to a :class:`~layerlock.tree.Tree` (every array leaf trainable), and a jax key path to the
dotted path of that tree (what ``layerlock.jax`` matches leaves by).

Paths are the dict keys, attribute names (Equinox fields) and list indices from the root,
joined with ``.``. Every container is a layer, and so is a function in a list or tuple (a
layer without parameters, like torch's ``ReLU`` in a ``Sequential``: a list's entries are
``0``, ``1``, ... with none missing, which is what ``depth`` counts). A layer's kind is an
Equinox module's class name; for a dict entry named the way Flax linen names submodules
(``Dense_0``), the name without its ``_<n>`` suffix; otherwise the type. Each array occurrence is its own
parameter (jax maps every leaf on its own, even one object reached twice). Leaves that are
not arrays are refused, except an Equinox module's (an activation function, a static
setting), which are never trainable.

>>> import jax, jax.numpy as jnp
>>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "head": [jnp.zeros(3)]}
>>> t = tree(params)
>>> t.layer_paths, t.kinds, t.param_paths
(['', 'Dense_0', 'head'], ['dict', 'Dense', 'list'], ['Dense_0.kernel', 'head.0'])
>>> [path_of(keys) for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
['Dense_0.kernel', 'head.0']
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from ..errors import BackendError
from ..tree import RowAxis, Tree, Walk, build

__all__ = ["tree", "path_of", "is_array"]

_ACCEPTED = "an Equinox module, a Flax linen param dict, or a dict / list / tuple of arrays"
_LINEN_NAME = re.compile(r"(.+)_\d+")


class _Entry(NamedTuple):
    """A layer of the walk: a linen layer's kind comes from its name, and a refused leaf is
    named by its full path, so the container travels with both."""

    path: str
    name: str
    node: Any


def is_array(x: Any) -> bool:
    """True for a leaf layerlock decides: a jax or numpy array."""
    return isinstance(x, (jax.Array, np.ndarray))


def _is_module(x: Any) -> bool:
    # An Equinox module is a dataclass registered as a pytree; checked without importing equinox.
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _is_container(x: Any) -> bool:
    return isinstance(x, (Mapping, list, tuple)) or _is_module(x)


def _items(node: Any) -> list[tuple[str, Any]]:
    """The named entries of a container, in the pytree's order."""
    if isinstance(node, Mapping):
        return [(str(k), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(node)]
    if not _is_module(node) or type(node).__name__ == "StateIndex":  # a function entry; BatchNorm state
        return []
    # Static fields (an Equinox conv's kernel_size) are configuration, not leaves.
    return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)
            if hasattr(node, f.name) and not f.metadata.get("static", False)]


def _children(entry: _Entry) -> Iterator[tuple[str, _Entry]]:
    # A generator: tree.build walks each child before asking for the next, so the first
    # leaf refused is the first in pre-order.
    prefix = entry.path + "." if entry.path else ""
    entries = isinstance(entry.node, (list, tuple))
    for k, v in _items(entry.node):
        if _is_container(v) or (entries and callable(v) and not isinstance(v, type) and not is_array(v)):
            yield k, _Entry(prefix + k, k, v)
        elif v is not None and not is_array(v) and not _is_module(entry.node) and not callable(v):
            raise BackendError(f"leaf {prefix + k!r} is a {type(v).__name__} ({v!r:.40}), not an array; "
                               f"layerlock.jax takes {_ACCEPTED}. Convert it with jnp.asarray or drop it")


def _params(entry: _Entry) -> list[tuple[str, Any, int, bool]]:
    return [(k, v, int(np.prod(v.shape)), True) for k, v in _items(entry.node) if is_array(v)]


# The norm layers of a pytree, by kind: what the ``bn`` policy governs (layers with running
# statistics; Equinox keeps those in eqx.nn.State, linen in the batch_stats collection).
NORM_KINDS = frozenset({"BatchNorm"})


def _describe(entry: _Entry) -> tuple[str, bool, bool]:
    node = entry.node
    if _is_module(node):
        kind = type(node).__name__
    else:
        match = _LINEN_NAME.fullmatch(entry.name) if isinstance(node, Mapping) else None
        kind = match.group(1) if match else type(node).__name__
    return kind, kind in NORM_KINDS, False


def tree(pytree: Any) -> Tree:
    """The pytree as a layerlock :class:`~layerlock.tree.Tree`; refuses what is not a pytree
    of arrays, naming what it received.

    >>> tree({"w": jax.numpy.ones(2)}).param_paths
    ['w']
    """
    if not _is_container(pytree):
        what = f"an array of shape {tuple(pytree.shape)}" if is_array(pytree) else type(pytree).__name__
        raise BackendError(f"layerlock.jax takes {_ACCEPTED}; received {what}. Wrap a single array in a "
                           "dict ({'w': array}); pass a flax.nnx.Module to ll.apply instead")
    counter = itertools.count()  # a fresh key per leaf: jax maps each occurrence on its own
    walk = build(_Entry("", "", pytree), _children, _params, _describe, key=lambda _: next(counter))
    if not walk.tree.param_paths:
        raise BackendError(f"this {type(pytree).__name__} holds no arrays; layerlock.jax takes {_ACCEPTED}")
    _fill_rows(walk)
    return walk.tree


def row_axes(kind: str, module: bool) -> dict[str, int]:
    """The leaves of a layer of ``kind`` whose rows ``rows=`` decides, and their row axis: a
    Flax linen ``Embed_<n>`` dict's ``embedding`` (entries), a linen ``Dense_<n>`` dict's
    ``kernel`` (in, out: its output units are the columns) and ``bias``; an Equinox
    ``Embedding``'s ``weight``, an Equinox ``Linear``'s ``weight`` (out, in) and ``bias``.
    ``module``: the layer is an Equinox module (not a dict).

    >>> row_axes("Dense", module=False), row_axes("Linear", module=True), row_axes("Linear", module=False)
    ({'kernel': 1, 'bias': 0}, {'weight': 0, 'bias': 0}, {})
    """
    if module:
        return {"Embedding": {"weight": 0}, "Linear": {"weight": 0, "bias": 0}}.get(kind, {})
    return {"Embed": {"embedding": 0}, "Dense": {"kernel": 1, "bias": 0}}.get(kind, {})


def _fill_rows(walk: Walk) -> None:
    tree = walk.tree
    for i, entry in enumerate(walk.layers):
        axes = row_axes(tree.kinds[i], _is_module(entry.node))
        if not axes:
            continue
        prefix = entry.path + "." if entry.path else ""
        for o in range(tree.first[i], tree.first[i + 1]):
            axis = axes.get(tree.param_paths[o][len(prefix):])
            shape = tuple(walk.tensors[o].shape)
            if axis is not None and len(shape) > axis and shape[axis] > 0:
                tree.rows[o] = RowAxis(shape, axis)


def path_of(keys: tuple[Any, ...]) -> str:
    """The dotted path of a jax key path (``DictKey``, ``GetAttrKey``, ``SequenceKey``),
    as :func:`tree` names the leaf.

    >>> path_of((jax.tree_util.DictKey("layers"), jax.tree_util.SequenceKey(1)))
    'layers.1'
    """
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)
