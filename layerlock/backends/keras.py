"""Keras backend: a plan becomes layer and variable ``trainable`` flags, then the compiled
model is brought in step (optimizer slots, cached train functions).

Translation table (Keras 3 on TensorFlow, torch and JAX):

- parameter trainable/frozen -> ``variable.trainable`` (set for every parameter, last)
- layer flag -> ``layer.trainable`` = "something beneath it trains"; set parents first,
  because Keras cascades a layer's flag to its sublayers and variables
- BatchNorm held <-> ``layer.trainable = False`` (Keras runs it in inference mode then)
- ``frozen_mode="eval"`` hold -> the layer attribute ``_layerlock_held`` plus
  ``trainable = False`` (BatchNorm beneath stops updating its statistics). Keras has no
  per-layer inference switch, so the Dropout layers in a held subtree get ``rate = 0``
  (the rate is kept in ``_layerlock_rate`` and put back on release).
- compiled model -> the optimizer tracks exactly ``model.trainable_variables`` (slots of
  variables that stay trainable kept, new ones created, frozen ones parked on the side,
  see :func:`_sync_variables`) and the cached train/test/predict functions are rebuilt, so
  the next step of ``fit`` or ``train_on_batch`` trains the new set, also when ``apply``
  runs in a callback during ``fit``.

Paths walk ``model.layers`` (recursing into nested models and into layers that hold
layers); a variable's path is its layer's path plus the variable's short name.

Legacy tf_keras (:class:`TfKerasBackend`) freezes whole layers only (a TF variable has no
``trainable`` setter): rules that split a layer raise ``SpecError``. tf_keras fixes the
flags at ``compile()``; ``apply`` refreshes that record (``_reset_compile_cache``, the part
of ``compile`` that reads flags) and keeps the optimizer object and its state.

>>> import keras, layerlock as ll
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="body"),
...                           keras.layers.Dense(1, name="head")])
>>> ll.apply(model, ll.freeze(depth=1)).frozen
('body.kernel', 'body.bias')
>>> [v.name for v in model.trainable_weights]
['kernel', 'bias']
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, SpecError
from ..results import Plan, State
from ..tree import Node, Param

HOLD = "_layerlock_held"
RATE = "_layerlock_rate"
DROPOUTS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "AlphaDropout")
PARKED = "_layerlock_parked"


@dataclass
class _Index:
    """A model walked once: its Node tree and the objects behind the paths."""

    root: Node
    layers: dict[str, Any] = field(default_factory=dict)      # layer path -> layer
    variables: dict[str, Any] = field(default_factory=dict)   # parameter path -> variable
    order: list[tuple[Node, Any]] = field(default_factory=list)  # pre-order, shared layers repeated


def _short_name(variable: Any) -> str:
    # Keras 3 names are already short; tf.Variable names carry scopes and ':0'.
    return str(variable.name).rpartition("/")[2].partition(":")[0]


def _is_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _layout(optimizer: Any) -> tuple[str, str] | None:
    """(built flag, variable-key -> index dict) of a Keras 3 or tf_keras optimizer."""
    if hasattr(optimizer, "_trainable_variables_indices"):
        return "built", "_trainable_variables_indices"
    if hasattr(optimizer, "_index_dict"):
        return "_built", "_index_dict"
    return None  # legacy tf_keras optimizers create slots lazily for any variable


def _sync_variables(optimizer: Any, variables: list[Any], scope: Any = None) -> list[Any] | None:
    """Make a built Keras optimizer track exactly ``variables`` (in that order); the
    model-level :func:`layerlock.keras.sync_optimizer` and ``apply`` call it.

    Slots of variables it already tracks are kept as they are (the same objects, so Adam
    moments and ``iterations`` are untouched); variables it does not know get fresh slots
    from the optimizer's own ``build``; slots of variables dropped from the list are parked
    (taken out of ``optimizer.variables``, kept on the side) and come back if the variable
    is unfrozen again. Returns the variables it newly tracks, or None when nothing changed.
    An unbuilt optimizer is left alone: Keras builds it on the first step, on the variables
    trainable then.

    >>> import keras
    >>> a, b = keras.Variable(1.0), keras.Variable(2.0)
    >>> opt = keras.optimizers.Adam(); opt.build([a])
    >>> _sync_variables(opt, [a, b]) == [b], len(opt.variables)
    (True, 6)
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # LossScaleOptimizer: the slots live in the wrapped optimizer
        changed = _sync_variables(inner, variables, scope)
        if getattr(optimizer, "built", False) and hasattr(optimizer, "_trainable_variables_indices"):
            optimizer._trainable_variables = list(variables)
            optimizer._trainable_variables_indices = {optimizer._var_key(v): i for i, v in enumerate(variables)}
        return changed
    layout = _layout(optimizer)
    if layout is None or not getattr(optimizer, layout[0], False):
        return None
    built_attr, index_attr = layout
    key = optimizer._var_key
    old_index: dict[Any, int] = dict(getattr(optimizer, index_attr))
    old_order = sorted(old_index, key=old_index.__getitem__)
    keys = [key(v) for v in variables]
    if keys == old_order:
        return None
    parked: dict[Any, dict[str, Any]] = optimizer.__dict__.get(PARKED, {})
    fresh = [v for v, k in zip(variables, keys) if k not in old_index and k not in parked]

    # Learn which attributes hold one slot per variable by building the optimizer on the
    # new variables only; everything else that build touched is put back afterwards.
    saved = dict(optimizer.__dict__)
    n_vars = len(optimizer._variables)
    setattr(optimizer, built_attr, False)
    if index_attr == "_trainable_variables_indices":
        optimizer._trainable_variables_indices = {}
    try:
        with scope or nullcontext(), _name_scope(optimizer):
            optimizer.build(fresh)
    except Exception as exc:
        with _untracked(optimizer):
            for attr, value in saved.items():
                if optimizer.__dict__.get(attr) is not value:
                    setattr(optimizer, attr, value)
            _set_variables(optimizer, list(saved["_variables"])[:n_vars])
        raise BackendError(f"could not add optimizer slots for {len(fresh)} newly trainable variables to "
                           f"{type(optimizer).__name__}: {exc}") from exc
    with _untracked(optimizer):
        probe = dict(optimizer.__dict__)
        slot_attrs = [a for a, v in probe.items()
                      if a in saved and v is not saved[a] and a != "_trainable_variables" and _is_seq(v) and len(v) == len(fresh)
                      and _is_seq(saved[a]) and len(saved[a]) == len(old_order)]
        current = list(optimizer._variables[:n_vars])
        for attr, value in probe.items():
            if attr in saved and value is not saved[attr]:
                setattr(optimizer, attr, saved[attr])

        fresh_at = {key(v): i for i, v in enumerate(fresh)}
        merged: dict[str, list[Any]] = {a: [] for a in slot_attrs}
        for k in keys:
            for a in slot_attrs:
                if k in old_index:
                    merged[a].append(saved[a][old_index[k]])
                elif k in parked:
                    merged[a].append(parked[k].get(a))
                else:
                    merged[a].append(probe[a][fresh_at[k]])
        kept = set(keys)
        parked = {k: v for k, v in parked.items() if k not in kept}
        for k in old_order:
            if k not in kept:
                parked[k] = {a: saved[a][old_index[k]] for a in slot_attrs}
        slot_ids = {id(s) for a in slot_attrs for s in saved[a] if s is not None}
        slot_ids |= {id(s) for slots in parked.values() for s in slots.values() if s is not None}
        # Non-slot variables first, then the slots interleaved per variable, which is the order
        # a fresh build on `variables` gives: checkpoints store optimizer variables by position.
        # Variables build made besides the slots (a second step counter, ...) are dropped.
        base = [v for v in current if id(v) not in slot_ids]
        ordered = [s for i in range(len(keys)) for a in slot_attrs if (s := merged[a][i]) is not None]
        _set_variables(optimizer, base + ordered)
        for a in slot_attrs:
            setattr(optimizer, a, merged[a])
        setattr(optimizer, index_attr, {k: i for i, k in enumerate(keys)})
        if index_attr == "_trainable_variables_indices":
            optimizer._trainable_variables = list(variables)
        setattr(optimizer, built_attr, True)
    object.__setattr__(optimizer, PARKED, parked)  # not tracked: parked slots are not checkpointed
    return [v for v, k in zip(variables, keys) if k not in old_index]


def _set_variables(optimizer: Any, variables: list[Any]) -> None:
    # A new list, not an in-place edit: TF's tracked lists refuse to be checkpointed after a
    # deletion. Keras 3's tracker keeps its own reference to the list, so it is updated too.
    optimizer._variables = variables
    tracker = getattr(optimizer, "_tracker", None)
    if tracker is not None and "variables" in getattr(tracker, "config", {}):
        tracker.config["variables"] = (tracker.config["variables"][0], optimizer._variables)
        tracker.stored_ids["variables"] = {id(v) for v in variables}


def _untracked(optimizer: Any) -> Any:
    # Keras 3 optimizers add every variable assigned to an attribute to their variable
    # list; this code keeps that list itself.
    if hasattr(optimizer, "_tracker"):
        from keras.src.utils.tracking import DotNotTrackScope

        return DotNotTrackScope()
    return nullcontext()


def _name_scope(optimizer: Any) -> Any:
    # Keras 3 builds optimizers inside a name scope so slot paths read "adam/...".
    if hasattr(optimizer, "_trainable_variables_indices"):
        import keras

        return keras.name_scope(optimizer.name, caller=optimizer)
    return nullcontext()


class KerasBackend:
    """Keras 3 (TensorFlow, torch and JAX Keras backends)."""

    name = "keras"
    module = "keras"
    param_level = True

    # -- where Keras 3 and tf_keras differ ------------------------------------------------------
    def _keras(self) -> Any:
        return importlib.import_module(self.module)

    def _own_params(self, layer: Any) -> list[Any]:
        """Variables the layer itself declares trainable-capable (not its sublayers'); a
        BatchNorm's moving statistics are not among them."""
        seen: set[int] = set()
        return [v for v in layer._trainable_variables if not (id(v) in seen or seen.add(id(v)))]

    def _set_variable(self, variable: Any, trainable: bool) -> None:
        variable.trainable = trainable
        value = getattr(variable, "_value", None)
        if not trainable and getattr(value, "grad", None) is not None:
            value.grad = None  # torch Keras backend: no stale gradient buffer on a frozen weight

    def _check_layer_level(self, index: _Index, after: dict[Hashable, bool],
                           target: dict[Hashable, bool]) -> None:
        """Keras 3 flags each variable on its own: any layout of the plan can be set."""

    def _before_change(self, model: Any) -> None:
        # JAX fit keeps the live values outside the variables between steps; put them back
        # before the trainable/non-trainable split changes (the next step re-reads them).
        sync = getattr(model, "jax_state_sync", None)
        if sync is not None and getattr(model, "_jax_state", None):
            sync()

    def _refresh(self, model: Any, changed: bool) -> None:
        """Make the next step of fit / train_on_batch use the new flags."""
        changed |= _sync_model_optimizer(model)
        if not changed:
            return
        if getattr(model, "train_function", None) is not None:
            # fit() reads self.train_function at each step, so the rebuilt function takes over
            # at the next step, from a callback too (None would break a running fit).
            model.make_train_function(force=True)
        for attr in ("test_function", "predict_function"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)  # rebuilt on their next use

    # -- protocol -----------------------------------------------------------------------------
    def owns(self, model: Any) -> bool:
        return isinstance(model, self._keras().layers.Layer)

    def tree(self, model: Any) -> Node:
        return self._index(model).root

    def apply(self, model: Any, plan: Plan) -> None:
        index = self._index(model)
        missing = [path for path in plan.paths if path not in index.variables]
        if missing:
            raise BackendError(f"the plan names parameters this model lacks ({', '.join(missing[:5])}); "
                               "make the plan with ll.plan() on this very model")
        after = {id(index.variables[path]): a for path, a in zip(plan.paths, plan.trainable_after)}
        held = {id(index.layers[lp.path]): lp.held_after for lp in plan.layers if lp.path in index.layers}
        self._commit(model, index, after, held, {})

    def read(self, model: Any) -> State:
        index = self._index(model)
        return State(
            self.name,
            {p.path: p.trainable for p in index.root.parameters()},
            {node.path: {"trainable": bool(layer.trainable), "held": bool(layer.__dict__.get(HOLD, False))}
             for node, layer in index.order})

    def write(self, model: Any, state: State) -> None:
        index = self._index(model)
        after = {id(v): state.params[path] for path, v in index.variables.items() if path in state.params}
        flags: dict[Hashable, bool] = {}
        held: dict[Hashable, bool] = {}
        for node, layer in index.order:
            recorded = state.layers.get(node.path)
            if recorded is not None:
                flags[node.key] = recorded.get("trainable", bool(layer.trainable))
                held[node.key] = recorded.get("held", False)
        self._commit(model, index, after, held, flags)

    def weights(self, model: Any) -> Iterator[tuple[str, bool, bytes]]:
        import numpy as np

        index = self._index(model)
        for p in index.root.unique_parameters():
            yield p.path, p.trainable, np.asarray(index.variables[p.path].numpy()).tobytes()

    # -- the walk and the commit ----------------------------------------------------------------
    def _index(self, model: Any) -> _Index:
        keras = self._keras()
        norm_types = (keras.layers.BatchNormalization,)
        trainable_ids = {id(v) for v in model.trainable_weights}
        index = _Index(Node("", type(model).__name__))

        def children(layer: Any) -> list[Any]:
            if isinstance(layer, keras.Model):
                # depth=N must mean model.layers[:N]; weighted layers tracked elsewhere come last.
                out = list(layer.layers)
                seen = {id(x) for x in out}
                return out + [x for x in layer._flatten_layers(include_self=False, recursive=False)
                              if id(x) not in seen and x.weights]
            return list(layer._flatten_layers(include_self=False, recursive=False))

        def build(path: str, layer: Any) -> Node:
            prefix = path + "." if path else ""
            norm = isinstance(layer, norm_types)
            node = Node(path, type(layer).__name__, norm=norm, key=id(layer),
                        held=bool(layer.__dict__.get(HOLD, False)) or (norm and not layer.trainable))
            index.layers.setdefault(path, layer)
            index.order.append((node, layer))
            used: dict[str, int] = {}
            for variable in self._own_params(layer):
                short = _short_name(variable)
                n = used[short] = used.get(short, -1) + 1
                vpath = prefix + (short if n == 0 else f"{short}_{n}")
                index.variables[vpath] = variable
                numel = 1
                for d in variable.shape:
                    numel *= int(d)
                node.params.append(Param(vpath, numel, id(variable) in trainable_ids, id(variable)))
            used = {}
            for child in children(layer):
                n = used[child.name] = used.get(child.name, -1) + 1
                node.children.append(build(prefix + (child.name if n == 0 else f"{child.name}_{n}"), child))
            return node

        index.root = build("", model)
        return index

    def _commit(self, model: Any, index: _Index, after: dict[Hashable, bool],
                held: dict[Hashable, bool], forced: dict[Hashable, bool]) -> None:
        """Set layer flags (parents first), holds and variable flags; check the result
        against ``model.trainable_weights`` (rolling back on a mismatch); then bring the
        compiled model in step. ``forced`` gives layer flags outright (restore)."""
        target = self._layer_flags(index, after, held, forced)
        self._check_layer_level(index, after, target)
        previous = self.read(model)
        self._before_change(model)
        try:
            self._set(index, target, held, after)
            self._verify(model, index, after)
        except BaseException:
            self._set(index, {n.key: s["trainable"] for n, _ in index.order
                              if (s := previous.layers.get(n.path)) is not None},
                      {n.key: s["held"] for n, _ in index.order if (s := previous.layers.get(n.path)) is not None},
                      {id(v): previous.params[p] for p, v in index.variables.items()})
            raise
        self._refresh(model, self.read(model) != previous)

    def _set(self, index: _Index, target: dict[Hashable, bool], held: dict[Hashable, bool],
             after: dict[Hashable, bool]) -> None:
        for node, layer in index.order:
            if node.key in target:
                layer.trainable = target[node.key]  # cascades down; descendants come later and win
            if node.key in held:
                if held[node.key] and not node.norm:
                    object.__setattr__(layer, HOLD, True)
                elif HOLD in layer.__dict__:
                    object.__delattr__(layer, HOLD)
        for variable in index.variables.values():
            if id(variable) in after:
                self._set_variable(variable, after[id(variable)])
        self._hold_dropout(index)

    def _hold_dropout(self, index: _Index) -> None:
        """Dropout is off (rate 0) exactly inside held subtrees; the rate comes back on release."""
        held = [node.path + "." for node, layer in index.order if layer.__dict__.get(HOLD)]
        for node, layer in index.order:
            if type(layer).__name__ not in DROPOUTS:
                continue
            inside = any((node.path + ".").startswith(h) for h in held)
            saved = layer.__dict__.get(RATE)
            if inside and saved is None:
                object.__setattr__(layer, RATE, layer.rate)
                layer.rate = 0.0
            elif not inside and saved is not None:
                layer.rate = saved
                object.__delattr__(layer, RATE)

    def _layer_flags(self, index: _Index, after: dict[Hashable, bool], held: dict[Hashable, bool],
                     forced: dict[Hashable, bool]) -> dict[Hashable, bool]:
        """A layer is trainable when a weight beneath it trains; a held layer (BatchNorm in
        inference mode, frozen_mode hold) is not; a layer without weights follows its parent."""
        out: dict[Hashable, bool] = {}

        def visit(node: Node, parent: bool) -> None:
            states = [after.get(p.key, p.trainable) for p in node.parameters()]
            if node.key in forced:
                flag = forced[node.key]
            elif node.norm:
                flag = not held.get(node.key, node.held)
            elif held.get(node.key):
                flag = False
            else:
                flag = any(states) if states else parent
            out[node.key] = flag
            for child in node.children:
                visit(child, flag)

        visit(index.root, bool(index.order[0][1].trainable))
        return out

    def _verify(self, model: Any, index: _Index, after: dict[Hashable, bool]) -> None:
        actual = {id(v) for v in model.trainable_weights}
        known = {id(v) for v in index.variables.values()}
        wrong = [path for path, v in index.variables.items() if (id(v) in actual) != after.get(id(v), id(v) in actual)]
        stray = [_short_name(v) for v in model.trainable_weights if id(v) not in known]
        if wrong or stray:
            raise BackendError(
                "after setting the flags, model.trainable_weights does not match the plan"
                + (f"; differs for {', '.join(wrong[:5])}" if wrong else "")
                + (f"; trainable variables outside the layer tree: {', '.join(stray[:5])}" if stray else "")
                + ". The flags were put back as they were.")


def _sync_model_optimizer(model: Any) -> bool:
    """Bring a compiled model's optimizer to its trainable variables; True if it changed."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or isinstance(optimizer, str):
        return False
    return _sync_variables(optimizer, model.trainable_variables, _strategy_scope(model)) is not None


def _strategy_scope(model: Any) -> Any:
    # New optimizer slots must be created under the tf.distribute strategy the model uses.
    strategy = getattr(model, "_distribute_strategy", None)
    return strategy.scope() if strategy is not None else None


class TfKerasBackend(KerasBackend):
    """Legacy tf_keras (Keras 2): whole layers only, since a TF variable's ``trainable`` is
    fixed; a plan that splits a layer, or that freezes a layer's own weights while a
    sublayer trains, raises :class:`~layerlock.SpecError` before anything changes."""

    name = "tf_keras"
    module = "tf_keras"
    param_level = False

    def _own_params(self, layer: Any) -> list[Any]:
        seen: set[int] = set()
        return [v for v in layer._trainable_weights if not (id(v) in seen or seen.add(id(v)))]

    def _set_variable(self, variable: Any, trainable: bool) -> None:
        """A TF variable's flag cannot change; its layer's flag decides."""

    def _check_layer_level(self, index: _Index, after: dict[Hashable, bool],
                           target: dict[Hashable, bool]) -> None:
        # In tf_keras a frozen layer hides every weight beneath it, so a layer whose own
        # weights are frozen cannot hold a sublayer that trains.
        for node, _ in index.order:
            for p in node.params:
                if after.get(p.key, p.trainable) != target[node.key]:
                    raise SpecError(
                        f"tf_keras cannot make {p.path!r} {'trainable' if after[p.key] else 'frozen'} while "
                        f"layer {node.path or '(root)'!r} is {'trainable' if target[node.key] else 'frozen'} "
                        "(tf_keras freezes whole layers, and a frozen layer hides its sublayers' weights). "
                        "Select whole layers, or use Keras 3 for parameter-level rules.")

    def _before_change(self, model: Any) -> None:
        pass

    def _refresh(self, model: Any, changed: bool) -> None:
        changed |= _sync_model_optimizer(model)
        if not changed or not getattr(model, "_is_compiled", False):
            return
        running = model.train_function is not None
        # tf_keras trains with the flags recorded at compile(); refresh that record (the part
        # of compile that reads flags) instead of recompiling, so loss, metrics and the
        # optimizer stay as they are.
        model._reset_compile_cache()
        if running:
            model.make_train_function(force=True)

    def weights(self, model: Any) -> Iterator[tuple[str, bool, bytes]]:
        index = self._index(model)
        for p in index.root.unique_parameters():
            yield p.path, p.trainable, index.variables[p.path].numpy().tobytes()
