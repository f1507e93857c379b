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
- some rows trainable (``rows=``: an ``Embedding``'s entries, a ``Dense`` layer's output
  units, :func:`row_axes`) -> the variable stays ``trainable`` (the optimizer holds it) and
  carries its rows (``_layerlock_rows``); every Keras 3 optimizer's ``apply`` is wrapped
  (once, at the first such variable, :func:`.keras_internals.install_row_apply`) to zero the
  frozen rows' gradients and put the frozen rows back after the stock step, so they stay
  bit-identical under any optimizer, weight decay included. Nothing is saved differently:
  ``model.save`` writes the plain model, which loads without layerlock (the rows are not
  saved; apply the spec again after loading).
- compiled model -> the optimizer tracks exactly ``model.trainable_variables`` (slots of
  variables that stay trainable kept, new ones created, frozen ones parked on the side,
  see :func:`.keras_internals.sync_variables`) and the cached train/test/predict
  functions are rebuilt, so the next step of ``fit`` or ``train_on_batch`` trains the new
  set, also when ``apply`` runs in a callback during ``fit``.

Paths walk ``model.layers`` (recursing into nested models and into layers that hold
layers); a variable's path is its layer's path plus the variable's short name.

Legacy tf_keras (:class:`TfKerasBackend`) freezes whole layers only (a TF variable has no
``trainable`` setter): rules that split a layer raise ``SpecError``. tf_keras fixes the
flags at ``compile()``; ``apply`` refreshes that record (the part of ``compile`` that reads
flags) and keeps the optimizer object and its state.

Every private Keras attribute this needs is read and written in :mod:`.keras_internals`,
which checks each layout first and refuses one it does not know before anything changes.

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
import weakref
from collections.abc import Hashable, Iterator
from typing import Any

from ..errors import BackendError, SpecError
from ..results import Plan, State
from ..tree import RowAxis, Tree, Walk, build
from . import keras_internals as internals

HOLD = "_layerlock_held"
RATE = "_layerlock_rate"
DROPOUTS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "AlphaDropout")


def short_name(variable: Any) -> str:
    """A variable's name without scopes: Keras 3 names are already short; tf.Variable names
    carry scopes and ``:0``."""
    return str(variable.name).rpartition("/")[2].partition(":")[0]


def row_axes(layer: Any) -> dict[str, int]:
    """The variables of a Keras 3 ``layer`` whose rows ``rows=`` decides, and the axis of those
    rows: an ``Embedding``'s entries (``embeddings``, axis 0), a ``Dense`` layer's output units
    (``kernel`` is (in, out): axis 1; ``bias``: axis 0). Quantized layers have none.

    >>> import keras
    >>> row_axes(keras.layers.Dense(3)), row_axes(keras.layers.Embedding(10, 2))
    ({'kernel': 1, 'bias': 0}, {'embeddings': 0})
    >>> row_axes(keras.layers.LayerNormalization())
    {}
    """
    import sys

    layers = sys.modules["keras"].layers
    if getattr(layer, "quantization_mode", None):
        return {}
    if isinstance(layer, layers.Embedding):
        return {"embeddings": 0}
    if isinstance(layer, layers.Dense):
        return {"kernel": 1, "bias": 0}
    return {}


def _numel(variable: Any) -> int:
    numel = 1
    for d in variable.shape:
        numel *= int(d)
    return numel


def _deduplicated(names: list[str]) -> list[str]:
    """``a, a, b`` -> ``a, a_1, b``: paths must be unique where Keras names are not."""
    used: dict[str, int] = {}
    out = []
    for name in names:
        n = used[name] = used.get(name, -1) + 1
        out.append(name if n == 0 else f"{name}_{n}")
    return out


class KerasBackend:
    """Keras 3 (TensorFlow, torch and JAX Keras backends)."""

    name = "keras"
    module = "keras"
    param_level = True
    rows = True  # rows= can decide an Embedding's entries and a Dense layer's output units

    def __init__(self) -> None:
        self._last: tuple[weakref.ref[Any], Walk] | None = None  # the walk of the last tree(), for apply()

    # -- where Keras 3 and tf_keras differ ------------------------------------------------------
    def _keras(self) -> Any:
        return importlib.import_module(self.module)

    def _own_params(self, layer: Any) -> list[Any]:
        """Variables the layer itself declares trainable-capable (not its sublayers'); a
        BatchNorm's moving statistics are not among them."""
        seen: set[int] = set()
        return [v for v in internals.own_variables(layer) if not (id(v) in seen or seen.add(id(v)))]

    def _set_variable(self, variable: Any, trainable: bool) -> None:
        variable.trainable = trainable
        if not trainable:
            internals.clear_torch_grad(variable)  # no stale gradient buffer on a frozen weight

    def _check_layer_level(self, walk: Walk, after: dict[Hashable, bool], target: dict[Hashable, bool]) -> None:
        """Keras 3 flags each variable on its own: any layout of the plan can be set."""

    def _before_change(self, model: Any) -> None:
        # JAX fit keeps the live values outside the variables between steps; put them back
        # before the trainable/non-trainable split changes (the next step re-reads them).
        sync = getattr(model, "jax_state_sync", None)
        if sync is not None:
            sync()  # a no-op outside fit

    def _refresh(self, model: Any, changed: bool) -> None:
        """Make the next step of fit / train_on_batch use the new flags."""
        if sync_model_optimizer(model) or changed:
            internals.rebuild_step_functions(model)

    # -- protocol -----------------------------------------------------------------------------
    def owns(self, model: Any) -> bool:
        return isinstance(model, self._keras().layers.Layer)

    def tree(self, model: Any) -> Tree:
        walk = self.walk(model)
        try:
            self._last = (weakref.ref(model), walk)  # ll.apply() calls tree() then apply(): walk once
        except TypeError:
            self._last = None
        return walk.tree

    def apply(self, model: Any, plan: Plan) -> None:
        last, self._last = self._last, None
        walk = last[1] if last is not None and last[0]() is model and tuple(last[1].tree.param_paths) == plan.paths \
            else self.walk(model)
        variables = dict(zip(walk.tree.param_paths, walk.tensors))
        missing = [path for path in plan.paths if path not in variables]
        if missing:
            raise BackendError(f"the plan names parameters this model lacks ({', '.join(missing[:5])}); "
                               "make the plan with ll.plan() on this very model")
        after = {id(variables[path]): a for path, a in zip(plan.paths, plan.trainable_after)}
        axes = {id(walk.tensors[o]): info for o, info in walk.tree.rows.items()}
        rows: dict[Hashable, tuple[int, ...] | None] = {}
        for k, part in plan.rows.items():
            variable = variables[plan.paths[k]]
            if part.after is not None:
                if id(variable) not in axes:
                    raise BackendError(f"the plan gives {plan.paths[k]} trainable rows, and this model's variable "
                                       "there has no rows to decide; make the plan with ll.plan() on this very model")
                after[id(variable)] = True  # Keras trains it; the optimizer step keeps its frozen rows
            rows[id(variable)] = part.after
        layers = dict(zip(walk.tree.layer_paths, walk.layers))
        held = {id(layers[lp.path]): lp.held_after for lp in plan.layers if lp.path in layers}
        self._commit(model, walk, after, held, {}, rows)

    def read(self, model: Any) -> State:
        return self._state(model, self.walk(model))

    def write(self, model: Any, state: State) -> None:
        walk = self.walk(model)
        tree = walk.tree
        after = {id(v): state.params[path] for path, v in zip(tree.param_paths, walk.tensors) if path in state.params}
        rows: dict[Hashable, tuple[int, ...] | None] = {}
        for o, (path, v) in enumerate(zip(tree.param_paths, walk.tensors)):
            if path not in state.params:
                continue
            given = state.rows.get(path)
            if given is not None:
                info = tree.rows.get(o)
                if info is None or not given or not all(0 <= i < info.length for i in given):
                    where = "has no rows to decide" if info is None else f"has {info.length} rows"
                    raise SpecError(f"the State gives {path} the trainable rows {list(given)[:8]}, and the "
                                    f"model's variable there {where}; take the State with ll.snapshot() of this model")
                after[id(v)] = True
                rows[id(v)] = tuple(sorted(set(given)))
            else:
                rows[id(v)] = None
        flags: dict[Hashable, bool] = {}
        held: dict[Hashable, bool] = {}
        for path, layer in zip(tree.layer_paths, walk.layers):
            recorded = state.layers.get(path)
            if recorded is not None:
                flags[id(layer)] = recorded.get("trainable", bool(layer.trainable))
                held[id(layer)] = recorded.get("held", False)
        self._commit(model, walk, after, held, flags, rows)

    def weights(self, model: Any) -> Iterator[tuple[str, bool, bytes]]:
        import numpy as np

        for path, trainable, variable in self.unique_variables(self.walk(model)):
            yield path, trainable, np.asarray(variable.numpy()).tobytes()

    # -- the walk -------------------------------------------------------------------------------
    def walk(self, model: Any) -> Walk:
        """The model walked once: its tree, and the layer and variable behind each entry.

        Layers are ``model.layers`` (recursing into nested models and into layers that hold
        layers), so ``depth=N`` means ``model.layers[:N]``; weighted layers a model tracks
        elsewhere come after them. Names that repeat get ``_1``, ``_2``.
        """
        keras = self._keras()
        norm_types = (keras.layers.BatchNormalization,)
        trainable_ids = {id(v) for v in model.trainable_weights}

        def children(layer: Any) -> list[tuple[str, Any]]:
            if isinstance(layer, keras.Model):
                out = list(layer.layers)
                seen = {id(x) for x in out}
                out += [x for x in internals.sublayers(layer) if id(x) not in seen and x.weights]
            else:
                out = internals.sublayers(layer)
            return list(zip(_deduplicated([x.name for x in out]), out))

        def params(layer: Any) -> list[tuple[str, Any, int, bool]]:
            variables = self._own_params(layer)
            return [(name, v, _numel(v), id(v) in trainable_ids)
                    for name, v in zip(_deduplicated([short_name(v) for v in variables]), variables)]

        def describe(layer: Any) -> tuple[str, bool, bool]:
            norm = isinstance(layer, norm_types)
            return type(layer).__name__, norm, bool(layer.__dict__.get(HOLD, False)) or (norm and not layer.trainable)

        walk = build(model, children, params, describe)
        if self.rows:
            tree = walk.tree
            for o, variable in enumerate(walk.tensors):
                axis = row_axes(walk.layers[tree.owner[o]]).get(tree.param_paths[o].rpartition(".")[2])
                if axis is not None and len(variable.shape) > axis:
                    current = internals.variable_rows(variable)
                    tree.rows[o] = RowAxis(tuple(int(d) for d in variable.shape), axis, current)
                    if current is not None:
                        tree.trainable[o] = False  # trainable in part: its rows say which
        return walk

    @staticmethod
    def unique_variables(walk: Walk) -> list[tuple[str, bool, Any]]:
        """``(path, trainable, variable)`` for each variable once, under its first path."""
        seen: set[Hashable] = set()
        tree = walk.tree
        return [(tree.param_paths[o], tree.trainable[o], walk.tensors[o]) for o, key in enumerate(tree.param_keys)
                if not (key in seen or seen.add(key))]

    def _state(self, model: Any, walk: Walk) -> State:
        """The flags now, read from the objects the walk found."""
        trainable_ids = {id(v) for v in model.trainable_weights}
        tree = walk.tree
        rows = {path: list(r) for path, v in zip(tree.param_paths, walk.tensors)
                if (r := internals.variable_rows(v)) is not None}
        return State(
            self.name,
            {path: id(v) in trainable_ids and path not in rows for path, v in zip(tree.param_paths, walk.tensors)},
            {path: {"trainable": bool(layer.trainable), "held": bool(layer.__dict__.get(HOLD, False))}
             for path, layer in zip(tree.layer_paths, walk.layers)},
            rows)

    # -- the commit -----------------------------------------------------------------------------
    def _commit(self, model: Any, walk: Walk, after: dict[Hashable, bool],
                held: dict[Hashable, bool], forced: dict[Hashable, bool],
                rows: dict[Hashable, tuple[int, ...] | None]) -> None:
        """Set layer flags (parents first), holds, variable flags and trainable rows; check
        the result against ``model.trainable_weights`` (rolling back on a mismatch); then
        bring the compiled model in step. ``after`` holds Keras' flags (a variable trainable
        in part is trainable there), ``rows`` the variables' rows (None: whole), ``forced``
        layer flags given outright (restore)."""
        target = self._layer_flags(walk, after, held, forced)
        self._check_layer_level(walk, after, target)
        internals.check_model(model, next(iter(walk.tensors), None))
        if any(r is not None for r in rows.values()):
            internals.check_row_apply()
        previous = self._state(model, walk)
        trainable_ids = {id(v) for v in model.trainable_weights}
        flags_before: dict[Hashable, bool] = {id(v): id(v) in trainable_ids for v in walk.tensors}
        rows_before: dict[Hashable, tuple[int, ...] | None] = {id(v): internals.variable_rows(v) for v in walk.tensors}
        self._before_change(model)
        tree = walk.tree
        try:
            self._set(walk, target, held, after)
            self._set_rows(walk, rows)
            self._verify(model, walk, after)
        except BaseException:
            self._set(walk, {id(layer): previous.layers[path]["trainable"] for path, layer in zip(tree.layer_paths, walk.layers)},
                      {id(layer): previous.layers[path]["held"] for path, layer in zip(tree.layer_paths, walk.layers)},
                      flags_before)
            self._set_rows(walk, rows_before)
            raise
        self._refresh(model, self._state(model, walk) != previous)

    def _set(self, walk: Walk, target: dict[Hashable, bool], held: dict[Hashable, bool],
             after: dict[Hashable, bool]) -> None:
        for norm, layer in zip(walk.tree.norm, walk.layers):
            key = id(layer)
            if key in target:
                layer.trainable = target[key]  # cascades down; descendants come later and win
            if key in held:
                if held[key] and not norm:
                    object.__setattr__(layer, HOLD, True)
                elif HOLD in layer.__dict__:
                    object.__delattr__(layer, HOLD)
        for variable in walk.tensors:
            if id(variable) in after:
                self._set_variable(variable, after[id(variable)])
        self._hold_dropout(walk)

    def _set_rows(self, walk: Walk, rows: dict[Hashable, tuple[int, ...] | None]) -> None:
        """Give the variables in ``rows`` their trainable rows (None: whole again); the
        optimizer step is wrapped at the first variable that gets some."""
        axes = {id(walk.tensors[o]): info.axis for o, info in walk.tree.rows.items()}
        for variable in walk.tensors:
            key = id(variable)
            if key in rows and rows[key] != internals.variable_rows(variable):
                if rows[key] is not None:
                    internals.install_row_apply()
                internals.set_variable_rows(variable, rows[key], axes.get(key, 0))

    def _hold_dropout(self, walk: Walk) -> None:
        """Dropout is off (rate 0) exactly inside held subtrees; the rate comes back on release."""
        pairs = list(zip(walk.tree.layer_paths, walk.layers))
        held = [path + "." for path, layer in pairs if layer.__dict__.get(HOLD)]
        for path, layer in pairs:
            if type(layer).__name__ not in DROPOUTS:
                continue
            inside = any((path + ".").startswith(h) for h in held)
            saved = layer.__dict__.get(RATE)
            if inside and saved is None:
                object.__setattr__(layer, RATE, layer.rate)
                layer.rate = 0.0
            elif not inside and saved is not None:
                layer.rate = saved
                object.__delattr__(layer, RATE)

    def _layer_flags(self, walk: Walk, after: dict[Hashable, bool], held: dict[Hashable, bool],
                     forced: dict[Hashable, bool]) -> dict[Hashable, bool]:
        """A layer is trainable when a weight beneath it trains; a held layer (BatchNorm in
        inference mode, frozen_mode hold) is not; a layer without weights follows its parent."""
        tree = walk.tree
        states = [after.get(key, on) for key, on in zip(tree.param_keys, tree.trainable)]
        out: dict[Hashable, bool] = {}
        parents: list[tuple[int, bool]] = [(len(tree.layer_paths), bool(walk.layers[0].trainable))]  # (end, flag)
        for i, layer in enumerate(walk.layers):
            while parents[-1][0] <= i:
                parents.pop()
            key, beneath = id(layer), states[tree.first[i]:tree.first[tree.end[i]]]
            if key in forced:
                flag = forced[key]
            elif tree.norm[i]:
                flag = not held.get(key, tree.held[i])
            elif held.get(key):
                flag = False
            else:
                flag = any(beneath) if beneath else parents[-1][1]
            out[key] = flag
            parents.append((tree.end[i], flag))
        return out

    def _verify(self, model: Any, walk: Walk, after: dict[Hashable, bool]) -> None:
        actual = {id(v) for v in model.trainable_weights}
        known = {id(v) for v in walk.tensors}
        wrong = [path for path, v in zip(walk.tree.param_paths, walk.tensors)
                 if (id(v) in actual) != after.get(id(v), id(v) in actual)]
        stray = [short_name(v) for v in model.trainable_weights if id(v) not in known]
        if wrong or stray:
            raise BackendError(
                "after setting the flags, model.trainable_weights does not match the plan"
                + (f"; differs for {', '.join(wrong[:5])}" if wrong else "")
                + (f"; trainable variables outside the layer tree: {', '.join(stray[:5])}" if stray else "")
                + ". The flags were put back as they were.")


def compiled_optimizer(model: Any) -> Any:
    """The optimizer a compiled model trains with, or None."""
    optimizer = getattr(model, "optimizer", None)
    return None if isinstance(optimizer, str) else optimizer


def sync_model_optimizer(model: Any) -> bool:
    """Bring a compiled model's optimizer to its trainable variables; True if it changed."""
    optimizer = compiled_optimizer(model)
    if optimizer is None:
        return False
    return internals.sync_variables(optimizer, model.trainable_variables, internals.strategy_scope(model)) is not None


class TfKerasBackend(KerasBackend):
    """Legacy tf_keras (Keras 2): whole layers only, since a TF variable's ``trainable`` is
    fixed; a plan that splits a layer, or that freezes a layer's own weights while a
    sublayer trains, raises :class:`~layerlock.SpecError` before anything changes."""

    name = "tf_keras"
    module = "tf_keras"
    param_level = False
    rows = False  # rows= needs Keras 3's optimizer step

    def _own_params(self, layer: Any) -> list[Any]:
        seen: set[int] = set()
        return [v for v in internals.own_weights(layer) if not (id(v) in seen or seen.add(id(v)))]

    def _set_variable(self, variable: Any, trainable: bool) -> None:
        """A TF variable's flag cannot change; its layer's flag decides."""

    def _check_layer_level(self, walk: Walk, after: dict[Hashable, bool], target: dict[Hashable, bool]) -> None:
        # In tf_keras a frozen layer hides every weight beneath it, so a layer whose own
        # weights are frozen cannot hold a sublayer that trains.
        tree = walk.tree
        for o, (key, layer) in enumerate(zip(tree.param_keys, tree.owner)):
            flag = target[id(walk.layers[layer])]
            if after.get(key, tree.trainable[o]) != flag:
                raise SpecError(
                    f"tf_keras cannot make {tree.param_paths[o]!r} {'trainable' if after[key] else 'frozen'} "
                    f"while layer {tree.layer_paths[layer] or '(root)'!r} is {'trainable' if flag else 'frozen'} "
                    "(tf_keras freezes whole layers, and a frozen layer hides its sublayers' weights). "
                    "Select whole layers, or use Keras 3 for parameter-level rules.")

    def _before_change(self, model: Any) -> None:
        pass

    def _refresh(self, model: Any, changed: bool) -> None:
        # tf_keras trains with the flags recorded at compile(); refresh that record when it
        # differs from the flags now, also after a change by hand.
        changed |= sync_model_optimizer(model)
        recorded = internals.compiled_trainable(model)
        if recorded is not None and (changed or recorded != {id(v) for v in model.trainable_weights}):
            internals.reset_compile_record(model)

