"""Flax NNX backend: a plan becomes Variable metadata on each ``nnx.Param`` and an
inference-mode hold (``use_running_average`` / ``deterministic``) on held layers.

Paths are the module graph's attribute names and list indices joined with ``.``
(``encoder.layers.0.attn.query.kernel``), children in definition order; a list or dict of modules is a layer of kind
``List`` / ``Dict``, so ``ll.freeze(depth=2, within="layers")`` means ``layers[:2]``.

The trainable flag: a frozen ``nnx.Param`` carries the metadata ``layerlock_frozen=True``
(``var.get_metadata("layerlock_frozen")``). Metadata is part of the Variable, so it survives
``nnx.split`` / ``nnx.merge``, and ``nnx.jit`` keys its cache on it: the next jitted step
after an ``apply`` retraces with the new set. :data:`TRAINABLE` is the nnx filter that
selects exactly the trainable parameters (``layerlock.flax.trainable``).

The hold: a held layer carries the attribute ``_layerlock_held = True``; every ``BatchNorm``
and ``Dropout`` under a held layer is set to ``use_running_average=True`` /
``deterministic=True`` and remembers its own previous value in ``_layerlock_mode``, which
is put back on release. From the first hold on, ``nnx.Module.set_attributes`` (what
``model.train()`` / ``model.eval()`` call) is wrapped so that held layers stay in inference
mode; the value the user asked for is what release restores.

>>> from flax import nnx
>>> import layerlock as ll
>>> net = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
>>> ll.apply(net, ll.freeze("layers.1")).frozen
('layers.1.scale', 'layers.1.bias')
>>> net.train(); net.layers[1].use_running_average
True
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
from flax import nnx

from ..errors import BackendError
from ..results import Plan, State
from ..tree import Tree

FROZEN = "layerlock_frozen"   # Variable metadata key: True on a frozen nnx.Param
HOLD = "_layerlock_held"      # module attribute: layerlock holds this subtree in inference mode
MODE = "_layerlock_mode"      # module attribute: ((flag, value before the hold), ...)
MODE_FLAGS = ("use_running_average", "deterministic")  # what nnx's train()/eval() switch


def is_trainable(variable: Any) -> bool:
    """True for an ``nnx.Param`` that layerlock has not frozen."""
    return isinstance(variable, nnx.Param) and not variable.get_metadata().get(FROZEN, False)


def TRAINABLE(path: tuple[Any, ...], value: Any) -> bool:  # noqa: N802 - an nnx filter, used like nnx.Param
    """nnx filter: the trainable parameters (``nnx.Optimizer(model, tx, wrt=TRAINABLE)``)."""
    return is_trainable(value)


def _items(node: Any) -> list[tuple[str, Any]] | None:
    """The named children of a graph node in attribute order, or None for a leaf."""
    if isinstance(node, nnx.Module):
        # nnx.jit and nnx.merge rewrite a module's __dict__ in sorted order; the private
        # ``_pytree__nodes`` mapping keeps the definition order (flax 0.12), so use it when present.
        attrs = vars(node)
        order = [k for k in getattr(node, "_pytree__nodes", ()) if k in attrs]
        order += [k for k in attrs if k not in set(order)]
        return [(k, attrs[k]) for k in order if not k.startswith("_pytree__")]
    if isinstance(node, (list, tuple, nnx.List)):
        return [(str(i), v) for i, v in enumerate(node)]
    if isinstance(node, (dict, nnx.Dict)):
        return [(str(k), v) for k, v in node.items()]
    return None


def _contains_graph(node: Any) -> bool:
    items = _items(node)
    return items is not None and any(
        isinstance(v, (nnx.Module, nnx.Variable)) or _contains_graph(v) for _, v in items)


def walk(model: Any) -> Iterator[tuple[str, Any, list[tuple[str, nnx.Variable]]]]:
    """(path, layer, its own ``nnx.Param`` variables) for each layer, pre-order; the layers
    are the modules and the lists / dicts that hold modules or variables."""
    stack: set[int] = set()

    def visit(path: str, node: Any) -> Iterator[tuple[str, Any, list[tuple[str, nnx.Variable]]]]:
        if id(node) in stack:  # a module that (indirectly) contains itself
            return
        stack.add(id(node))
        prefix = path + "." if path else ""
        items = _items(node) or []
        params = [(prefix + k, v) for k, v in items if isinstance(v, nnx.Param)]
        yield path, node, params
        for k, v in items:
            if isinstance(v, nnx.Module) or (not isinstance(v, nnx.Variable) and _contains_graph(v)):
                yield from visit(prefix + k, v)
        stack.discard(id(node))

    yield from visit("", model)


def _modes(module: Any) -> list[str]:
    return [f for f in MODE_FLAGS if isinstance(getattr(module, f, None), bool)]


def _reconcile(model: Any) -> None:
    """Put every layer's inference flags in line with the holds: layers under a held layer
    run in inference mode and remember their own value; the others get it back."""
    def visit(node: Any, held: bool) -> None:
        held = held or bool(getattr(node, HOLD, False))
        if isinstance(node, nnx.Module):
            record = getattr(node, MODE, None)
            if held and record is None and _modes(node):
                setattr(node, MODE, tuple((f, getattr(node, f)) for f in _modes(node)))
                for f in _modes(node):
                    setattr(node, f, True)
            elif not held and record is not None:
                for f, value in record:
                    setattr(node, f, value)
                delattr(node, MODE)
        for _, child in _items(node) or ():
            if isinstance(child, nnx.Module) or _contains_graph(child):
                visit(child, held)

    visit(model, False)


def _install_mode_hold() -> None:
    """Wrap ``nnx.Module.set_attributes`` (once, at the first hold) so that ``train()`` /
    ``eval()`` leave held layers in inference mode and record the asked-for value instead."""
    original = nnx.Module.set_attributes
    if getattr(original, "_layerlock", False):
        return

    @functools.wraps(original)
    def set_attributes(self: nnx.Module, *filters: Any, raise_if_not_found: bool = True, **attributes: Any) -> None:
        held = {}
        for _, module in nnx.iter_modules(self):
            record = getattr(module, MODE, None)
            if record is not None:  # the user's new value becomes what release restores
                held[id(module)] = (module, dict(record))
        original(self, *filters, raise_if_not_found=raise_if_not_found, **attributes)
        for module, record in held.values():
            for f in record:
                record[f] = getattr(module, f)
                setattr(module, f, True)
            setattr(module, MODE, tuple(record.items()))

    set_attributes._layerlock = True  # type: ignore[attr-defined]
    nnx.Module.set_attributes = set_attributes  # type: ignore[method-assign]


def _at(model: Any, path: str) -> Any:
    node = model
    for part in path.split(".") if path else ():
        node = node[int(part)] if isinstance(node, (list, tuple, nnx.List)) else (
            node[part] if isinstance(node, (dict, nnx.Dict)) else getattr(node, part))
    return node


class NnxBackend:
    """The Flax NNX backend (``flax.nnx.Module``)."""

    name = "flax"
    module = "flax.nnx"
    param_level = True

    def owns(self, model: Any) -> bool:
        return isinstance(model, nnx.Module)

    def tree(self, model: nnx.Module) -> Tree:
        tree = Tree()
        for path, node, params in walk(model):
            i = len(tree.layer_paths)
            tree.layer_paths.append(path)
            tree.kinds.append(type(node).__name__)
            tree.layer_keys.append(id(node))
            tree.norm.append(isinstance(node, nnx.BatchNorm))
            tree.held.append(bool(getattr(node, HOLD, False)))
            tree.first.append(len(tree.param_paths))
            tree.end.append(0)
            for p, var in params:
                tree.param_paths.append(p)
                tree.numels.append(int(np.prod(var.get_value().shape)))
                tree.trainable.append(is_trainable(var))
                tree.param_keys.append(id(var))
                tree.owner.append(i)
        # end[i]: the first layer after i's subtree (paths are pre-order, so a prefix scan works)
        paths = tree.layer_paths
        for i, path in enumerate(paths):
            j = i + 1
            while j < len(paths) and (not path or paths[j].startswith(path + ".")):
                j += 1
            tree.end[i] = j
        tree.first.append(len(tree.param_paths))
        return tree

    def _params(self, model: nnx.Module) -> dict[str, nnx.Variable]:
        out: dict[str, nnx.Variable] = {}
        for _, _, params in walk(model):
            for p, v in params:
                out.setdefault(p, v)
        return out

    def apply(self, model: nnx.Module, plan: Plan) -> None:
        params = self._params(model)
        missing = [p for p in plan.paths if p not in params]
        if missing:
            raise BackendError(f"the plan names parameters this model lacks ({', '.join(missing[:5])}); "
                               "make the plan with ll.plan() on this very model")
        for path, after in zip(plan.paths, plan.trainable_after):
            var = params[path]
            if is_trainable(var) != after:
                var.set_metadata(**{FROZEN: not after})
        if plan.layers:
            for layer in plan.layers:
                node = _at(model, layer.path)
                if layer.held_after:
                    _install_mode_hold()
                    setattr(node, HOLD, True)
                elif getattr(node, HOLD, False):
                    delattr(node, HOLD)
            _reconcile(model)

    def read(self, model: nnx.Module) -> State:
        layers = {}
        for path, node, _ in walk(model):
            flags = {"held": bool(getattr(node, HOLD, False))}
            flags.update({f: getattr(node, f) for f in _modes(node)})
            flags.update({f"before_hold.{f}": v for f, v in getattr(node, MODE, ())})
            layers[path] = flags
        return State(self.name, {p: is_trainable(v) for p, v in self._params(model).items()}, layers)

    def write(self, model: nnx.Module, state: State) -> None:
        for path, var in self._params(model).items():
            if is_trainable(var) != state.params[path]:
                var.set_metadata(**{FROZEN: not state.params[path]})
        for path, node, _ in walk(model):
            flags = state.layers.get(path)
            if flags is None:
                continue
            if flags.get("held"):
                _install_mode_hold()
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
        seen: set[int] = set()
        for path, var in self._params(model).items():
            if id(var) not in seen:
                seen.add(id(var))
                yield path, is_trainable(var), np.ascontiguousarray(np.asarray(var.get_value())).tobytes()
