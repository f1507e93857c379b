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
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, SpecError
from ..results import Finding, Plan, State
from ..tree import Node, Param
from . import keras_internals as internals

HOLD = "_layerlock_held"
RATE = "_layerlock_rate"
DROPOUTS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "AlphaDropout")


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
        return [v for v in internals.own_variables(layer) if not (id(v) in seen or seen.add(id(v)))]

    def _set_variable(self, variable: Any, trainable: bool) -> None:
        variable.trainable = trainable
        if not trainable:
            internals.clear_torch_grad(variable)  # no stale gradient buffer on a frozen weight

    def _check_layer_level(self, index: _Index, after: dict[Hashable, bool],
                           target: dict[Hashable, bool]) -> None:
        """Keras 3 flags each variable on its own: any layout of the plan can be set."""

    def _before_change(self, model: Any) -> None:
        # JAX fit keeps the live values outside the variables between steps; put them back
        # before the trainable/non-trainable split changes (the next step re-reads them).
        sync = getattr(model, "jax_state_sync", None)
        if sync is not None:
            sync()  # a no-op outside fit

    def _refresh(self, model: Any, changed: bool) -> None:
        """Make the next step of fit / train_on_batch use the new flags."""
        if _sync_model_optimizer(model) or changed:
            internals.rebuild_step_functions(model)

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

    def check(self, model: Any, optimizer: Any = None, *, scheduler: Any = None, bn: str = "follow",
              schedule: Any = None) -> list[Finding]:
        """The findings of :func:`layerlock.check` for a Keras model (reads, changes nothing).
        ``optimizer`` defaults to the compiled model's; ``scheduler`` and ``schedule`` have no
        Keras meaning."""
        index = self._index(model)
        params = list(index.root.unique_parameters())
        variables = [index.variables[p.path] for p in params]
        found = [f for f in [_stale_finding(model, params, variables)] if f is not None]
        if bn != "trainable":
            found += _norm_findings(index)
        optimizer = _compiled_optimizer(model) if optimizer is None else optimizer
        if optimizer is not None:
            found += _optimizer_findings(internals.held_slots(optimizer, variables), params)
        return found

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
                return out + [x for x in internals.sublayers(layer) if id(x) not in seen and x.weights]
            return internals.sublayers(layer)

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
        internals.check_model(model, next(iter(index.variables.values()), None))
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


def _compiled_optimizer(model: Any) -> Any:
    optimizer = getattr(model, "optimizer", None)
    return None if isinstance(optimizer, str) else optimizer


def _sync_model_optimizer(model: Any) -> bool:
    """Bring a compiled model's optimizer to its trainable variables; True if it changed."""
    optimizer = _compiled_optimizer(model)
    if optimizer is None:
        return False
    return internals.sync_variables(optimizer, model.trainable_variables, internals.strategy_scope(model)) is not None


def _stale_finding(model: Any, params: list[Param], variables: list[Any]) -> Finding | None:
    """A compiled model whose next fit trains another set than its trainable variables: Keras
    3 on TensorFlow traces the set into the train function at the first fit, tf_keras
    records it at compile(); neither looks at ``trainable`` again by itself."""
    trained = internals.trained_by_fit(model, variables)
    if trained is None:
        return None
    never = [p for p, t in zip(params, trained) if p.trainable and not t]
    still = [p for p, t in zip(params, trained) if t and not p.trainable]
    if not never and not still:
        return None
    effects = [f"{len(never)} trainable tensors never train"] * bool(never) + [
        f"{len(still)} frozen tensors still train"] * bool(still)
    return Finding(
        "stale-train-function",
        "fit trains the set the trainable flags gave when Keras fixed it (Keras 3 on TensorFlow: when it "
        "traced the train function; tf_keras: at compile()), not the current one: "
        + " and ".join(effects),
        "ll.apply(model, spec) brings a compiled model in step (after flags set by hand, ll.apply(model, "
        "ll.Spec()) does it): it rebuilds the train function and syncs the optimizer, keeping its state; "
        "or compile again (a new optimizer starts over)",
        tuple(p.path for p in never + still), scalars=sum(p.numel for p in never + still))


def _norm_findings(index: _Index) -> list[Finding]:
    """BatchNormalization layers whose weights are all frozen while the layer flag is on: fit
    runs such a layer in training mode, so its moving statistics still move. Keras 3 and
    tf_keras run a layer whose ``trainable`` is False in inference mode whatever ``training``
    says, so this takes flags that disagree: variable flags in Keras 3
    (``bn.gamma.trainable = False``), or in tf_keras a layer switched back on inside a frozen
    parent (whose flag hides its weights)."""
    seen: set[int] = set()
    moving = []
    for node, layer in index.order:
        if (node.norm and node.params and layer.trainable and not any(p.trainable for p in node.params)
                and id(layer) not in seen):
            seen.add(id(layer))
            moving.append(node.path)
    if not moving:
        return []
    return [Finding(
        "norm-statistics-move",
        "these BatchNormalization layers have all their weights frozen but their layer flag on, so fit runs "
        "them in training mode and their moving mean and variance change at every step",
        "freeze them with ll.apply(model, spec) (bn='follow' or 'frozen' sets layer.trainable = False, which "
        "Keras runs in inference mode), or pass bn='trainable' to ll.check if the statistics should adapt",
        tuple(moving))]


def _optimizer_findings(held: list[list[Any] | None] | None, params: list[Param]) -> list[Finding]:
    """Trainable variables a built optimizer does not update, frozen ones it keeps slots for."""
    if held is None:
        return []
    out = []
    missing = [p for p, slots in zip(params, held) if p.trainable and slots is None]
    if missing:
        out.append(Finding(
            "not-in-optimizer",
            f"{len(missing)} trainable tensors are not in the optimizer (it updates the variables it was built "
            "with; unfreezing later does not add them): fit leaves them as they are (Keras 3 on TensorFlow) or "
            "fails with 'Unknown variable'",
            "ll.apply(model, spec) syncs a compiled model's optimizer, keeping its state; in a custom loop call "
            "layerlock.keras.sync_optimizer(optimizer, model); or compile again (a new optimizer starts over)",
            tuple(p.path for p in missing), scalars=sum(p.numel for p in missing)))
    kept = [(p, slots) for p, slots in zip(params, held) if not p.trainable and slots]
    if kept:
        out.append(Finding(
            "frozen-optimizer-state",
            f"the optimizer keeps slots (momentum, Adam moments) for {len(kept)} frozen tensors: memory and "
            "checkpoint space for variables that do not train",
            "ll.apply(model, spec), or layerlock.keras.sync_optimizer(optimizer, model) in a custom loop, takes "
            "them out of the optimizer and its checkpoints (layerlock keeps them aside in case they are "
            "unfrozen); to free the memory, build a new optimizer",
            tuple(p.path for p, _ in kept), bytes=sum(_nbytes(s) for _, slots in kept for s in slots)))
    return out


def _nbytes(variable: Any) -> int:
    import numpy as np

    numel = 1
    for d in variable.shape:
        numel *= int(d)
    dtype = variable.dtype  # a name in Keras 3, a tf.DType in tf_keras
    return numel * np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).itemsize


class TfKerasBackend(KerasBackend):
    """Legacy tf_keras (Keras 2): whole layers only, since a TF variable's ``trainable`` is
    fixed; a plan that splits a layer, or that freezes a layer's own weights while a
    sublayer trains, raises :class:`~layerlock.SpecError` before anything changes."""

    name = "tf_keras"
    module = "tf_keras"
    param_level = False

    def _own_params(self, layer: Any) -> list[Any]:
        seen: set[int] = set()
        return [v for v in internals.own_weights(layer) if not (id(v) in seen or seen.add(id(v)))]

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
        # tf_keras trains with the flags recorded at compile(); refresh that record when it
        # differs from the flags now, also after a change by hand.
        changed |= _sync_model_optimizer(model)
        recorded = internals.compiled_trainable(model)
        if recorded is not None and (changed or recorded != {id(v) for v in model.trainable_weights}):
            internals.reset_compile_record(model)

    def weights(self, model: Any) -> Iterator[tuple[str, bool, bytes]]:
        index = self._index(model)
        for p in index.root.unique_parameters():
            yield p.path, p.trainable, index.variables[p.path].numpy().tobytes()
