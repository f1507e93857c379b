"""Flax NNX backend: a plan becomes Variable metadata on each ``nnx.Param`` and an
inference-mode hold (``use_running_average`` / ``deterministic``) on held layers.

Paths are the module graph's attribute names and list indices joined with ``.``
(``encoder.layers.0.attn.query.kernel``), children in definition order; a list or dict of modules is a layer of kind
``List`` / ``Dict``. A function in a list of layers (``nnx.relu`` in an ``nnx.Sequential``) is a
layer without parameters too, so the list's entries are ``0``, ``1``, ... with none missing and
``depth`` counts them as torch counts a ``Sequential``'s (``ll.freeze(depth=-1)`` trains the last).

The trainable flag: a frozen ``nnx.Param`` carries the metadata ``layerlock_frozen=True``
(``var.get_metadata("layerlock_frozen")``). Metadata is part of the Variable, so it survives
``nnx.split`` / ``nnx.merge``, and ``nnx.jit`` keys its cache on it: the next jitted step
after an ``apply`` retraces with the new set. :data:`TRAINABLE` is the nnx filter that
selects exactly the trainable parameters (``layerlock.flax.trainable``).

Rows (``rows=``): a parameter trainable in some rows only (an ``nnx.Embed``'s entries, an
``nnx.Linear``'s output units: the kernel's columns and the bias's entries) is frozen as a
whole (``layerlock_frozen=True``) and carries its trainable rows as the metadata
``layerlock_rows`` (a tuple of row indices). :data:`TRAINABLE` selects it too, so the
gradient covers it; ``layerlock.flax.train_rows`` makes the optimizer move those rows only.

The hold: a held layer carries the attribute ``_layerlock_held = True``; every ``BatchNorm``
and ``Dropout`` under a held layer is set to ``use_running_average=True`` /
``deterministic=True`` and remembers its own previous value in ``_layerlock_mode``, which
is put back on release. From the first hold on, ``nnx.Module.set_attributes`` (what
``model.train()`` / ``model.eval()`` call) is wrapped so that held layers stay in inference
mode; the value the user asked for is what release restores. (Both the definition order of a
module's attributes and that wrapper rely on Flax internals: :mod:`layerlock.backends.flax_internals`.)

>>> from flax import nnx
>>> import layerlock as ll
>>> net = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
>>> ll.apply(net, ll.freeze("layers.1")).frozen
('layers.1.scale', 'layers.1.bias')
>>> net.train(); net.layers[1].use_running_average
True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from flax import nnx

from ..errors import BackendError, SpecError
from ..results import Plan, State
from ..tree import RowAxis, Tree, Walk, build
from .flax_internals import attributes, install_mode_hold

FROZEN = "layerlock_frozen"   # Variable metadata key: True on a frozen nnx.Param
ROWS = "layerlock_rows"       # Variable metadata key: the trainable rows of a param trainable in part
HOLD = "_layerlock_held"      # module attribute: layerlock holds this subtree in inference mode
MODE = "_layerlock_mode"      # module attribute: ((flag, value before the hold), ...)
MODE_FLAGS = ("use_running_average", "deterministic")  # what nnx's train()/eval() switch


def is_trainable(variable: Any) -> bool:
    """True for an ``nnx.Param`` that layerlock has not frozen."""
    return isinstance(variable, nnx.Param) and not variable.get_metadata().get(FROZEN, False)


def trained_rows(variable: Any) -> tuple[int, ...] | None:
    """The trainable rows of an ``nnx.Param`` trainable in part (``rows=``), else None."""
    if not isinstance(variable, nnx.Param):
        return None
    rows = variable.get_metadata().get(ROWS)
    return None if rows is None else tuple(rows)


def trains(variable: Any) -> bool:
    """True for an ``nnx.Param`` that trains at all: trainable, or trainable in some rows."""
    return is_trainable(variable) or trained_rows(variable) is not None


def TRAINABLE(path: tuple[Any, ...], value: Any) -> bool:  # noqa: N802 - an nnx filter, used like nnx.Param
    """nnx filter: the parameters that train, in part (``rows=``) included
    (``nnx.Optimizer(model, tx, wrt=TRAINABLE)``)."""
    return trains(value)


def row_axes(module: Any) -> dict[str, int]:
    """The parameters of ``module`` whose rows ``rows=`` decides, and the axis of those rows:
    an ``nnx.Embed``'s entries, an ``nnx.Linear``'s output units (its kernel is (in, out)).

    >>> from flax import nnx
    >>> row_axes(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), row_axes(nnx.Embed(4, 2, rngs=nnx.Rngs(0)))
    ({'kernel': 1, 'bias': 0}, {'embedding': 0})
    """
    if isinstance(module, nnx.Embed):
        return {"embedding": 0}
    if isinstance(module, nnx.Linear):
        return {"kernel": 1, "bias": 0}
    return {}


def _fill_rows(w: Walk) -> None:
    """Fill ``w.tree.rows`` for the parameters whose rows a spec can decide."""
    tree = w.tree
    for i, layer in enumerate(w.layers):
        axes = row_axes(layer)
        if not axes:
            continue
        prefix = tree.layer_paths[i] + "." if tree.layer_paths[i] else ""
        for o in range(tree.first[i], tree.first[i + 1]):
            axis = axes.get(tree.param_paths[o][len(prefix):])
            shape = tuple(np.shape(w.tensors[o].get_value()))
            if axis is not None and len(shape) > axis:
                tree.rows[o] = RowAxis(shape, axis, trained_rows(w.tensors[o]))


def _items(node: Any) -> list[tuple[str, Any]] | None:
    """The named children of a graph node in definition order, or None for a leaf."""
    if isinstance(node, nnx.Module):
        return attributes(node)
    if isinstance(node, (list, tuple, nnx.List)):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, (dict, nnx.Dict)):
        return [(str(k), v) for k, v in node.items()]
    return None


def _contains_graph(node: Any) -> bool:
    items = _items(node)
    return items is not None and any(
        isinstance(v, (nnx.Module, nnx.Variable)) or _contains_graph(v) for _, v in items)


def _is_layer(value: Any) -> bool:
    return isinstance(value, nnx.Module) or (not isinstance(value, nnx.Variable) and _contains_graph(value))


def _describe(node: Any) -> tuple[str, bool, bool]:
    return type(node).__name__, isinstance(node, nnx.BatchNorm), bool(getattr(node, HOLD, False))


def walk(model: nnx.Module) -> Walk:
    """The model walked once: its :class:`~layerlock.tree.Tree`, the layers (the modules and
    the lists / dicts that hold modules or variables) and their own ``nnx.Param`` variables.

    >>> from flax import nnx
    >>> w = walk(nnx.Sequential(nnx.Linear(2, 1, rngs=nnx.Rngs(0))))
    >>> w.tree.layer_paths, w.tree.param_paths
    (['', 'layers', 'layers.0'], ['layers.0.kernel', 'layers.0.bias'])
    """
    on_path: set[int] = set()  # the layers being walked: a module that contains itself is not entered again

    def children(node: Any) -> Iterator[tuple[str, Any]]:
        # A generator: tree.build walks each child before asking for the next one.
        on_path.add(id(node))
        entries = isinstance(node, (list, tuple, nnx.List))  # its functions are entries too: see above
        yield from [(k, v) for k, v in _items(node) or () if id(v) not in on_path
                    and (_is_layer(v) or (entries and callable(v) and not isinstance(v, (nnx.Variable, type))))]
        on_path.discard(id(node))

    def params(node: Any) -> list[tuple[str, nnx.Variable, int, bool]]:
        return [(k, v, int(np.prod(v.get_value().shape)), is_trainable(v))
                for k, v in _items(node) or () if isinstance(v, nnx.Param)]

    w = build(model, children, params, _describe)
    _fill_rows(w)
    return w


def parameters(model: nnx.Module) -> dict[str, nnx.Variable]:
    """The model's ``nnx.Param`` variables by path, in model order (a shared one under each
    of its paths).

    >>> from flax import nnx
    >>> list(parameters(nnx.Linear(2, 1, rngs=nnx.Rngs(0))))
    ['kernel', 'bias']
    """
    w = walk(model)
    return dict(zip(w.tree.param_paths, w.tensors))


def _modes(module: Any) -> list[str]:
    return [f for f in MODE_FLAGS if isinstance(getattr(module, f, None), bool)]


def _reconcile(w: Walk) -> None:
    """Put every layer's inference flags in line with the holds: layers under a held layer
    run in inference mode and remember their own value; the others get it back."""
    held_until = 0  # layers before this index are under a held layer
    for i, node in enumerate(w.layers):
        if i >= held_until and getattr(node, HOLD, False):
            held_until = w.tree.end[i]
        if not isinstance(node, nnx.Module):
            continue
        record = getattr(node, MODE, None)
        if i < held_until and record is None and _modes(node):
            setattr(node, MODE, tuple((f, getattr(node, f)) for f in _modes(node)))
            for f in _modes(node):
                setattr(node, f, True)
        elif i >= held_until and record is not None:
            for f, value in record:
                setattr(node, f, value)
            delattr(node, MODE)


class NnxBackend:
    """The Flax NNX backend (``flax.nnx.Module``)."""

    name = "flax"
    module = "flax.nnx"
    param_level = True

    def owns(self, model: Any) -> bool:
        return isinstance(model, nnx.Module)

    def tree(self, model: nnx.Module) -> Tree:
        return walk(model).tree

    def apply(self, model: nnx.Module, plan: Plan) -> None:
        w = walk(model)
        params = dict(zip(w.tree.param_paths, w.tensors))
        layers = dict(zip(w.tree.layer_paths, w.layers))
        missing = [p for p in plan.paths if p not in params] + [x.path for x in plan.layers if x.path not in layers]
        if missing:
            raise BackendError(f"the plan names parameters this model lacks ({', '.join(missing[:5])}); "
                               "make the plan with ll.plan() on this very model")
        if any(x.held_after for x in plan.layers):
            install_mode_hold(MODE)  # checks flax's layout before anything changes
        for k, (path, after) in enumerate(zip(plan.paths, plan.trainable_after)):
            var = params[path]
            if is_trainable(var) != after:
                var.set_metadata(**{FROZEN: not after})
            part = plan.rows.get(k)
            rows = None if part is None else part.after
            if trained_rows(var) != rows:
                var.set_metadata(**{ROWS: rows})
        if plan.layers:
            for layer in plan.layers:
                node = layers[layer.path]
                if layer.held_after:
                    setattr(node, HOLD, True)
                elif getattr(node, HOLD, False):
                    delattr(node, HOLD)
            _reconcile(w)

    def read(self, model: nnx.Module) -> State:
        w = walk(model)
        layers = {}
        for path, node in zip(w.tree.layer_paths, w.layers):
            flags = {"held": bool(getattr(node, HOLD, False))}
            flags.update({f: getattr(node, f) for f in _modes(node)})
            flags.update({f"before_hold.{f}": v for f, v in getattr(node, MODE, ())})
            layers[path] = flags
        pairs = list(zip(w.tree.param_paths, w.tensors))
        return State(self.name, {p: is_trainable(v) for p, v in pairs}, layers,
                     {p: list(rows) for p, v in pairs if (rows := trained_rows(v)) is not None})

    def write(self, model: nnx.Module, state: State) -> None:
        w = walk(model)
        nodes = list(zip(w.tree.layer_paths, w.layers))
        axes = {w.tree.param_paths[o]: info for o, info in w.tree.rows.items()}
        for path, given in state.rows.items():  # refused before anything changes
            info = axes.get(path)
            if info is None or not given or not all(0 <= i < info.length for i in given):
                raise SpecError(f"this State gives {path} the trainable rows {given[:5]}, but "
                                + ("it has no rows a spec can decide" if info is None else
                                   f"it has {info.length} rows on axis {info.axis}")
                                + ": take the State with ll.snapshot() on this model")
        if any(state.layers.get(path, {}).get("held") for path, _ in nodes):
            install_mode_hold(MODE)  # checks flax's layout before anything changes
        for path, var in zip(w.tree.param_paths, w.tensors):
            if is_trainable(var) != state.params[path]:
                var.set_metadata(**{FROZEN: not state.params[path]})
            wanted = tuple(state.rows[path]) if path in state.rows else None
            if trained_rows(var) != wanted:
                var.set_metadata(**{ROWS: wanted})
        for path, node in nodes:
            flags = state.layers.get(path)
            if flags is None:
                continue
            if flags.get("held"):
                setattr(node, HOLD, True)
            elif getattr(node, HOLD, False):
                delattr(node, HOLD)
            for f in _modes(node):
                setattr(node, f, flags.get(f, getattr(node, f)))
            record = tuple((f, flags[f"before_hold.{f}"]) for f in MODE_FLAGS if f"before_hold.{f}" in flags)
            if record:
                setattr(node, MODE, record)
            elif getattr(node, MODE, None) is not None:
                delattr(node, MODE)

    def weights(self, model: nnx.Module) -> Iterator[tuple[str, bool, bytes]]:
        w = walk(model)
        seen: set[int] = set()
        for path, var in zip(w.tree.param_paths, w.tensors):
            if id(var) not in seen:
                seen.add(id(var))
                yield path, is_trainable(var), np.ascontiguousarray(np.asarray(var.get_value())).tobytes()
