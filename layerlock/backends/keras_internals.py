"""Every private Keras, TensorFlow and tf_keras attribute layerlock uses, behind one door.

Bringing a compiled model in step with new trainable flags has no public Keras API: the
optimizer's per-variable slots and the cached train function are internals. Each function
here relies on the layouts below and checks them before reading or writing; on a layout it
does not know (a future Keras) it raises :class:`~layerlock.BackendError` naming the
installed version and the safe fallback. :func:`check_model` checks everything ``apply``
will touch before anything changes, and :func:`sync_variables` checks a whole optimizer
before it edits it, so a refusal never leaves a model or an optimizer half-changed.

The layouts (Keras 3, tf_keras 2):

- layers: ``_flatten_layers(include_self=False, recursive=False)`` gives the direct
  sublayers; a layer's own weights are ``_trainable_variables`` (Keras 3) or
  ``_trainable_weights`` (tf_keras) lists.
- a built Keras 3 optimizer: ``_variables`` (all its variables; its ``_tracker`` holds the
  same list), ``_trainable_variables`` and ``_trainable_variables_indices``
  (``_var_key(v)`` -> position); each slot kind is a list aligned with those positions.
  ``keras.src.utils.tracking.DotNotTrackScope`` turns its attribute tracking off.
- a built tf_keras optimizer: ``_built``, ``_variables``, ``_index_dict``, ``_var_key``. A
  legacy one (``tf_keras.optimizers.legacy``) makes slots on demand: nothing to keep.
- models: Keras 3 on TensorFlow keeps its tf.distribute strategy in ``_distribute_strategy``;
  tf_keras trains with the layer flags recorded at ``compile()`` (``_is_compiled``,
  ``_compiled_trainable_state``, refreshed by ``_reset_compile_cache``).
- the torch Keras backend keeps a variable's ``torch.nn.Parameter`` in ``_value``.
- resuming (:func:`fit_callbacks`, :func:`backup_files`, :func:`attach_record`): ``fit``
  builds a ``keras.callbacks.CallbackList`` whose ``set_model`` calls each callback's
  ``set_model`` before any ``on_train_begin``; ``BackupAndRestore`` loads
  ``_weights_path`` (then ``_prev_weights_path``, on an ``OSError``); ``save_weights``
  walks the model's attributes and writes a layer's ``save_own_variables`` store to the
  HDF5 group ``<attribute>/vars``. A Keras that stops doing so writes no record, and the
  resume is refused (:data:`RECORD`), never silently wrong.
- per-variable rates (:func:`upgrade`): a Keras 3 optimizer's ``apply`` runs
  ``_backend_apply_gradients``, which calls ``_apply_weight_decay(variables)`` (reading
  ``weight_decay`` and ``learning_rate``, through ``_get_current_learning_rate``, and
  ``_use_weight_decay``) and then ``_backend_update_step(grads, variables, learning_rate)``;
  that reaches ``update_step(gradient, variable, learning_rate)`` per variable, or on the
  torch backend a fused ``_parallel_update_step`` over all of them. ``_learning_rate`` holds
  the float rate's variable or the schedule. :data:`STEP_OWNERS` names the Keras classes
  that may define each of these; any other definition is refused.
- some rows of a variable trainable (:func:`install_row_apply`): every Keras 3 optimizer's
  step goes through ``keras.src.optimizers.base_optimizer.BaseOptimizer.apply(grads,
  trainable_variables=None)``, with the variables ``_trainable_variables`` when none are
  passed: ``fit`` on TensorFlow and torch calls it, JAX's ``stateless_apply`` calls
  ``self.apply(grads)`` inside a ``StatelessScope``, a ``LossScaleOptimizer`` calls its inner
  optimizer's.

keras and tf_keras are only read from ``sys.modules`` or imported inside functions.

>>> import keras
>>> a, b = keras.Variable(1.0), keras.Variable(2.0)
>>> opt = keras.optimizers.Adam(); opt.build([a])
>>> sync_variables(opt, [a, b]) == [b], len(opt.variables)
(True, 6)
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

from ..errors import BackendError

PARKED = "_layerlock_parked"
_MISSING = object()
_COST = ("Compiling again rebuilds the train function (one retrace), and a new optimizer starts over: "
         "its iterations and slots (such as Adam moments) are lost.")
RECOMPILE = ("Safe fallback: compile the model again with a new optimizer, model.compile(optimizer=..., loss=...), "
             "then ll.apply before the next fit (in a custom loop: build a new optimizer on "
             "model.trainable_variables after ll.apply). " + _COST)
BY_HAND = ("Safe fallback: set layer.trainable by hand, then compile the model again with a new optimizer, "
           "model.compile(optimizer=..., loss=...). " + _COST)


class _Layout(NamedTuple):
    """Where a built optimizer keeps its built flag and its variable-key -> position index."""

    built_flag: str
    index_attr: str


KERAS3 = _Layout("built", "_trainable_variables_indices")
TF_KERAS = _Layout("_built", "_index_dict")


# -- the checks ---------------------------------------------------------------------------------
def _family(obj: Any) -> str:
    """'keras' or 'tf_keras': the framework that defines ``obj``'s class ('' for neither)."""
    for cls in type(obj).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in ("keras", "tf_keras"):
            return root
    return ""


def _refuse(obj: Any, detail: str, fallback: str) -> BackendError:
    family = _family(obj) or "keras"
    version = getattr(sys.modules.get(family), "__version__", "(version unknown)")
    name = "Keras" if family == "keras" else "tf_keras"
    return BackendError(f"layerlock does not know this layout of {name} {version}: {detail}. "
                        f"Nothing was changed. {fallback}")


def _attr(obj: Any, name: str, kind: type | None, fallback: str = RECOMPILE) -> Any:
    """``obj.<name>``, present and an instance of ``kind`` (a method when ``kind`` is None)."""
    value = getattr(obj, name, _MISSING)
    if value is _MISSING or not (callable(value) if kind is None else isinstance(value, kind)):
        expected = "a method" if kind is None else f"a {kind.__name__}"
        found = "missing" if value is _MISSING else f"a {type(value).__name__}"
        raise _refuse(obj, f"{type(obj).__name__}.{name} is {found}, expected {expected}", fallback)
    return value


def _layout(optimizer: Any) -> _Layout | None:
    """The checked layout of a built optimizer that updates a fixed list of variables; None
    when there is nothing to keep in step (not built yet, or a legacy tf_keras optimizer)."""
    keras, tf_keras = sys.modules.get("keras"), sys.modules.get("tf_keras")
    family = _family(optimizer)
    if family == "keras" and keras is not None and isinstance(optimizer, keras.optimizers.Optimizer):
        return _keras3_layout(optimizer) if _attr(optimizer, "built", bool) else None
    if family == "tf_keras" and tf_keras is not None:
        if isinstance(optimizer, tf_keras.optimizers.legacy.Optimizer):
            return None
        if isinstance(optimizer, tf_keras.optimizers.Optimizer):
            built = getattr(optimizer, "_built", False)  # set by the first build
            if not isinstance(built, bool):
                raise _refuse(optimizer, f"{type(optimizer).__name__}._built is a {type(built).__name__}, "
                                         "expected a bool", RECOMPILE)
            if built:
                _attr(optimizer, "_index_dict", dict)
                _attr(optimizer, "_variables", list)
                _attr(optimizer, "_var_key", None)
            return TF_KERAS if built else None
    raise BackendError(f"layerlock keeps Keras 3 and tf_keras optimizers in step; received "
                       f"{type(optimizer).__module__}.{type(optimizer).__name__}")


def _keras3_layout(optimizer: Any) -> _Layout:
    index = _attr(optimizer, "_trainable_variables_indices", dict)
    listed = _attr(optimizer, "_trainable_variables", Sequence)  # a tuple wrapper on TensorFlow
    variables = _attr(optimizer, "_variables", list)
    _attr(optimizer, "_var_key", None)
    tracker = _attr(optimizer, "_tracker", object)
    config = getattr(tracker, "config", None)
    if (not isinstance(config, dict) or not isinstance(config.get("variables"), tuple)
            or len(config["variables"]) != 2 or config["variables"][1] is not variables
            or not isinstance(getattr(tracker, "stored_ids", None), dict) or len(listed) != len(index)):
        raise _refuse(optimizer, f"{type(optimizer).__name__}._trainable_variables, ._trainable_variables_indices, "
                                 "._variables and ._tracker.config['variables'] do not describe the same "
                                 "variables", RECOMPILE)
    if not callable(getattr(sys.modules.get("keras.src.utils.tracking"), "DotNotTrackScope", None)):
        raise _refuse(optimizer, "keras.src.utils.tracking.DotNotTrackScope is missing", RECOMPILE)
    return KERAS3


def check_optimizer(optimizer: Any) -> None:
    """Refuse an optimizer (and the one it wraps) whose layout :func:`sync_variables` does not know.

    >>> import keras
    >>> check_optimizer(keras.optimizers.SGD())
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # a LossScaleOptimizer: the slots live in the wrapped optimizer
        check_optimizer(inner)
        if _family(optimizer) != "keras":
            return  # tf_keras keeps no variable list in the wrapper
    _layout(optimizer)


def check_model(model: Any, variable: Any = None) -> None:
    """Refuse, before anything changes, a model whose compiled parts ``apply`` would bring
    in step through a layout this module does not know: its optimizer (fallback: compile
    with a new one, then apply), its cached train functions, its tf.distribute strategy,
    tf_keras' compile record, or (torch Keras backend) the torch tensor of ``variable``, one
    of its weights (fallback: set the flags by hand, then compile).

    >>> import keras
    >>> check_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not isinstance(optimizer, str):
        check_optimizer(optimizer)
    if _family(model) == "tf_keras":
        if _attr(model, "_is_compiled", bool, BY_HAND):
            _attr(model, "_compiled_trainable_state", Mapping, BY_HAND)
            _attr(model, "_reset_compile_cache", None, BY_HAND)
            _attr(model, "train_function", object, BY_HAND)
            _attr(model, "make_train_function", None, BY_HAND)
        return
    import keras

    if getattr(model, "compiled", False):
        for name in ("train_function", "test_function", "predict_function"):
            _attr(model, name, object, BY_HAND)
        _attr(model, "make_train_function", None, BY_HAND)
    backend = keras.backend.backend()
    if backend == "tensorflow" and hasattr(model, "distribute_strategy"):
        _attr(model, "_distribute_strategy", object, BY_HAND)
    if backend == "torch" and variable is not None:
        _attr(variable, "_value", object, BY_HAND)


# -- the layer tree -----------------------------------------------------------------------------
def sublayers(layer: Any) -> list[Any]:
    """The layers ``layer`` holds directly (Keras 3 and tf_keras).

    >>> import keras
    >>> [type(x).__name__ for x in sublayers(keras.Sequential([keras.layers.Dense(1)]))]
    ['Dense']
    """
    return list(_attr(layer, "_flatten_layers", None, BY_HAND)(include_self=False, recursive=False))


def own_variables(layer: Any) -> list[Any]:
    """The weights a Keras 3 layer declares itself (not its sublayers'), trainable or frozen
    now; a BatchNorm's moving statistics are not among them.

    >>> import keras
    >>> layer = keras.layers.Dense(1); layer.build((None, 2))
    >>> [v.name for v in own_variables(layer)]
    ['kernel', 'bias']
    """
    return _attr(layer, "_trainable_variables", list, BY_HAND)


def own_weights(layer: Any) -> list[Any]:
    """:func:`own_variables` for a tf_keras layer."""
    return _attr(layer, "_trainable_weights", list, BY_HAND)


def clear_torch_grad(variable: Any) -> None:
    """Drop the gradient buffer of a variable on the torch Keras backend (checked by
    :func:`check_model`), so nothing can step a frozen weight through a stale gradient."""
    value = getattr(variable, "_value", None)
    if value is not None and getattr(value, "grad", None) is not None:
        value.grad = None


# -- the compiled model ---------------------------------------------------------------------------
def strategy_scope(model: Any) -> Any:
    """The tf.distribute strategy scope a Keras 3 model on TensorFlow was built under (new
    optimizer slots must be created there), or None.

    >>> import keras
    >>> strategy_scope(keras.layers.Dense(1)) is None
    True
    """
    strategy = getattr(model, "_distribute_strategy", None)
    return strategy.scope() if strategy is not None else None


def rebuild_step_functions(model: Any) -> None:
    """Make the next step of a compiled Keras 3 model use the current flags. fit() reads
    ``model.train_function`` at each step, so a rebuilt one takes over at the next step, from
    a callback too (None would break a running fit); the others are rebuilt on next use."""
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    for name in ("test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def reset_compile_record(model: Any) -> None:
    """Make a compiled tf_keras model train with its current flags: refresh the record
    ``compile()`` keeps (the part of compile that reads flags), so loss, metrics and the
    optimizer stay as they are, and rebuild a train function that exists."""
    running = model.train_function is not None
    model._reset_compile_cache()
    if running:
        model.make_train_function(force=True)


def compiled_trainable(model: Any) -> set[int] | None:
    """ids of the weights a compiled tf_keras model's next ``fit`` trains: tf_keras puts the
    layer flags recorded at ``compile()`` back for the duration of fit. None when it is not
    compiled (then fit refuses to run)."""
    if not _attr(model, "_is_compiled", bool, BY_HAND):
        return None
    flags = _attr(model, "_compiled_trainable_state", Mapping, BY_HAND)

    def walk(layer: Any) -> Iterator[int]:
        if flags.get(layer, layer.trainable):
            yield from map(id, own_weights(layer))
            for sub in sublayers(layer):
                yield from walk(sub)

    return set(walk(model))


def trained_by_fit(model: Any, variables: list[Any]) -> list[bool] | None:
    """For each of ``variables``, whether the next ``fit`` / ``train_on_batch`` updates it,
    where the compiled model fixed that set earlier; None where fit reads
    ``model.trainable_variables`` afresh (JAX and torch Keras backends, ``run_eagerly``, no
    train function yet).

    tf_keras trains with the flags recorded at ``compile()``. Keras 3 on TensorFlow traces
    ``model.trainable_variables`` into the train function once and keeps no record of them;
    the optimizer, built on that same set at the first fit (and kept in step by ``apply``),
    stands for it.

    >>> import keras
    >>> trained_by_fit(keras.layers.Dense(1), []) is None
    True
    """
    if _family(model) == "tf_keras":
        trained = compiled_trainable(model)
        return None if trained is None else [id(v) in trained for v in variables]
    import keras

    optimizer = getattr(model, "optimizer", None)
    if (keras.backend.backend() != "tensorflow" or getattr(model, "train_function", None) is None
            or model.run_eagerly or optimizer is None):
        return None
    held = held_slots(optimizer, variables)
    return None if held is None else [h is not None for h in held]


# -- the optimizer --------------------------------------------------------------------------------
def _is_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _innermost(optimizer: Any) -> Any:
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def held_slots(optimizer: Any, variables: list[Any]) -> list[list[Any] | None] | None:
    """For each of ``variables``, the slot variables a built optimizer keeps for it ([] when
    it updates it without state), or None when it does not update it; None for an optimizer
    without a fixed variable list (not built yet, or a legacy tf_keras one). Slots that
    :func:`sync_variables` parked for frozen variables are out of the optimizer, not counted.

    >>> import keras
    >>> a, b = keras.Variable([1.0, 2.0]), keras.Variable(3.0)
    >>> opt = keras.optimizers.Adam(); opt.build([a])
    >>> [None if s is None else [tuple(v.shape) for v in s] for s in held_slots(opt, [a, b])]
    [[(2,), (2,)], None]
    """
    check_optimizer(optimizer)
    optimizer = _innermost(optimizer)
    layout = _layout(optimizer)
    if layout is None:
        return None
    index: dict[Any, int] = getattr(optimizer, layout.index_attr)
    own = {id(v) for v in optimizer._variables}
    # a slot kind is a list with one entry (a variable of the optimizer's own, or None) per position
    kinds = [v for a, v in vars(optimizer).items() if a not in ("_variables", "_trainable_variables")
             and _is_seq(v) and len(v) == len(index) and all(s is None or id(s) in own for s in v)]
    positions = [index.get(optimizer._var_key(v)) for v in variables]
    return [None if i is None else [kind[i] for kind in kinds if kind[i] is not None] for i in positions]


def sync_variables(optimizer: Any, variables: list[Any], scope: Any = None) -> list[Any] | None:
    """Make a built Keras optimizer track exactly ``variables`` (in that order); the
    model-level :func:`layerlock.keras.sync_optimizer` and ``apply`` call it. The whole
    layout is checked first (:func:`check_optimizer`), so an unknown one changes nothing.

    Slots of variables it already tracks are kept as they are (the same objects, so Adam
    moments and ``iterations`` are untouched); variables it does not know get fresh slots
    from the optimizer's own ``build``; slots of variables dropped from the list are parked
    (taken out of ``optimizer.variables``, kept on the side) and come back if the variable
    is unfrozen again. Returns the variables it newly tracks, or None when nothing changed.
    An unbuilt optimizer is left alone: Keras builds it on the first step, on the variables
    trainable then.

    >>> import keras
    >>> a = keras.Variable(1.0)
    >>> opt = keras.optimizers.SGD(); opt.build([a])
    >>> sync_variables(opt, [a]) is None
    True
    """
    check_optimizer(optimizer)
    return _sync(optimizer, variables, scope)


def _sync(optimizer: Any, variables: list[Any], scope: Any) -> list[Any] | None:
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:  # LossScaleOptimizer: the slots live in the wrapped optimizer
        changed = _sync(inner, variables, scope)
        if _family(optimizer) == "keras" and _layout(optimizer) is KERAS3:
            optimizer._trainable_variables = list(variables)
            optimizer._trainable_variables_indices = {optimizer._var_key(v): i for i, v in enumerate(variables)}
        return changed
    layout = _layout(optimizer)
    if layout is None:
        return None
    key = optimizer._var_key
    old_index: dict[Any, int] = dict(getattr(optimizer, layout.index_attr))
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
    setattr(optimizer, layout.built_flag, False)
    if layout is KERAS3:
        optimizer._trainable_variables_indices = {}
    try:
        with scope or nullcontext(), _name_scope(optimizer, layout):
            optimizer.build(fresh)
    except Exception as exc:
        with _untracked(layout):
            for attr, value in saved.items():
                if optimizer.__dict__.get(attr) is not value:
                    setattr(optimizer, attr, value)
            _set_variables(optimizer, layout, list(saved["_variables"])[:n_vars])
        raise BackendError(f"could not add optimizer slots for {len(fresh)} newly trainable variables to "
                           f"{type(optimizer).__name__}: {exc}") from exc
    with _untracked(layout):
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
        _set_variables(optimizer, layout, base + ordered)
        for a in slot_attrs:
            setattr(optimizer, a, merged[a])
        setattr(optimizer, layout.index_attr, {k: i for i, k in enumerate(keys)})
        if layout is KERAS3:
            optimizer._trainable_variables = list(variables)
        setattr(optimizer, layout.built_flag, True)
    object.__setattr__(optimizer, PARKED, parked)  # not tracked: parked slots are not checkpointed
    return [v for v, k in zip(variables, keys) if k not in old_index]


def _set_variables(optimizer: Any, layout: _Layout, variables: list[Any]) -> None:
    # A new list, not an in-place edit: TF's tracked lists refuse to be checkpointed after a
    # deletion. Keras 3's tracker keeps its own reference to the list, so it is updated too.
    optimizer._variables = variables
    if layout is KERAS3:
        tracker = optimizer._tracker
        tracker.config["variables"] = (tracker.config["variables"][0], optimizer._variables)
        tracker.stored_ids["variables"] = {id(v) for v in variables}


def _untracked(layout: _Layout) -> Any:
    # Keras 3 optimizers add every variable assigned to an attribute to their variable
    # list; this code keeps that list itself.
    if layout is KERAS3:
        from keras.src.utils.tracking import DotNotTrackScope

        return DotNotTrackScope()
    return nullcontext()


def _name_scope(optimizer: Any, layout: _Layout) -> Any:
    # Keras 3 builds optimizers inside a name scope so slot paths read "adam/...".
    if layout is KERAS3:
        import keras

        return keras.name_scope(optimizer.name, caller=optimizer)
    return nullcontext()


# -- resuming through BackupAndRestore ----------------------------------------------------------
RECORD = "layerlock_freeze_scheduler"  # the model attribute, and the weights-file group, of the record
_RECORD_CLASS: list[type] = []
NO_BACKUP = ("Safe fallback: checkpoint with ModelCheckpoint, save FreezeScheduler.state_dict() next to it, and "
             "on restart call load_state_dict(saved) before loading the weights (see its docstring)")


def fit_callbacks(callback: Any) -> list[Any] | None:
    """The callbacks of the ``fit`` calling ``callback.set_model``: those of the
    ``keras.callbacks.CallbackList`` on the call stack that holds ``callback``; None when
    no such list calls (``set_model`` called by hand).

    >>> import keras
    >>> fit_callbacks(keras.callbacks.Callback()) is None
    True
    """
    keras = sys.modules["keras"]
    frame = inspect.currentframe()
    try:
        for _ in range(4):  # this function <- the callback's set_model <- CallbackList.set_model
            frame = frame.f_back if frame is not None else None
            owner = frame.f_locals.get("self") if frame is not None else None
            if isinstance(owner, keras.callbacks.CallbackList):
                callbacks = _attr(owner, "callbacks", list, NO_BACKUP)
                return callbacks if any(c is callback for c in callbacks) else None
        return None
    finally:
        del frame


def backup_files(backup: Any) -> list[str]:
    """The weights files a ``keras.callbacks.BackupAndRestore`` restores from, in the order it tries them.

    >>> import keras
    >>> [p.rsplit("/", 1)[-1] for p in backup_files(keras.callbacks.BackupAndRestore("/tmp/b"))]
    ['latest.weights.h5', 'latest.weights.h5.bkp']
    """
    return [_attr(backup, "_weights_path", str, NO_BACKUP), _attr(backup, "_prev_weights_path", str, NO_BACKUP)]


def attach_record(model: Any, state: Callable[[], Mapping[str, Any]]) -> None:
    """Make every weights file saved from ``model`` carry ``state()`` (JSON) as :data:`RECORD`:
    an untracked layer at ``model.<RECORD>`` whose ``save_own_variables`` writes it (it is no
    sublayer of the model, and loads nothing); :func:`detach_record` takes it off."""
    if not _RECORD_CLASS:
        import numpy as np

        keras = sys.modules["keras"]

        class LayerlockRecord(keras.layers.Layer):  # type: ignore[misc,name-defined]
            def save_own_variables(self, store: Any) -> None:
                store["state"] = np.frombuffer(json.dumps(self.layerlock_state()).encode(), dtype=np.uint8)

            def load_own_variables(self, store: Any) -> None:
                pass  # read before anything loads, by read_record

        _RECORD_CLASS.append(LayerlockRecord)
    record = _RECORD_CLASS[0](name=RECORD)
    object.__setattr__(record, "layerlock_state", state)
    object.__setattr__(model, RECORD, record)  # untracked: not a sublayer, not in model.layers


def detach_record(model: Any) -> None:
    """Take the record :func:`attach_record` put on ``model`` off it."""
    vars(model).pop(RECORD, None)


def read_record(path: str) -> dict[str, Any] | None:
    """The record (:func:`attach_record`) in the weights file ``path``; None when it holds
    none; ``OSError`` when it cannot be read."""
    import h5py

    with h5py.File(path, "r") as f:
        data = f.get(f"{RECORD}/vars/state")
        state: dict[str, Any] | None = None if data is None else json.loads(bytes(data[()]).decode())
    return state


# -- per-variable learning rates ------------------------------------------------------------------
RATES = "_layerlock_rates"     # on a rated optimizer: variable.path -> (multiplier, weight decay or None)
_LOOKUP = "_layerlock_lookup"  # _var_key(variable) -> the same, rebuilt when a variable is missing
_FACTOR = "_layerlock_factor"  # the multiplier of the weight-decay group being applied
_DEFAULT = (1.0, None)
_RATED: dict[type, type] = {}

# The update path with_rates relies on, method by method: which Keras 3 classes may define it
# (by name, defined in keras itself). Another definition (a subclass's override, a future
# Keras) is a path layerlock has not read, and is refused.
STEP_OWNERS = {
    "apply": {"BaseOptimizer"},
    "_backend_apply_gradients": {"BaseOptimizer", "JaxOptimizer"},
    "_backend_update_step": {"BaseOptimizer", "TFOptimizer", "TorchParallelOptimizer", "Nadam"},
    "_apply_weight_decay": {"BaseOptimizer", "TFOptimizer", "TorchOptimizer", "Muon"},
    "_use_weight_decay": {"BaseOptimizer"},
    "_get_current_learning_rate": {"BaseOptimizer"},
    "learning_rate": {"BaseOptimizer"},
}
# The torch backend's fused steps (``_parallel_update_step``) that keep no state of their own
# per call, so one call per rate group is the same update. torch's Nadam advances its
# ``u_product`` in each call: it takes Keras' per-variable path instead.
FUSED = {"SGD", "Adam", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Lion"}
_ARITY = {"update_step": 3, "_backend_update_step": 3, "_parallel_update_step": 3, "_apply_weight_decay": 1,
          "_use_weight_decay": 1, "_get_current_learning_rate": 0}
ACCEPTED = ("layerlock.keras.with_rates takes a Keras 3 optimizer (keras.optimizers.SGD, Adam, AdamW, ..., or a "
            "LossScaleOptimizer around one), also a subclass that overrides update_step and no private step")


def _owner(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def _positional(function: Any) -> int | None:
    """How many arguments after ``self`` a method takes by position (None: any number)."""
    import inspect

    params = list(inspect.signature(function).parameters.values())[1:]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _update_path(cls: type) -> type | None:
    """Check the update path of an optimizer class; return the fused step to go around
    (torch's Nadam), or None. Raises :class:`BackendError` naming the part it does not know."""
    def refuse(detail: str) -> BackendError:
        version = getattr(sys.modules.get("keras"), "__version__", "(version unknown)")
        return BackendError(f"layerlock cannot give per-variable learning rates to {cls.__module__}.{cls.__qualname__} "
                            f"(Keras {version}): {detail}. Nothing was changed. {ACCEPTED}.")

    for name, allowed in STEP_OWNERS.items():
        owner = _owner(cls, name)
        if owner is None or owner.__module__.partition(".")[0] != "keras" or owner.__name__ not in allowed:
            where = "nowhere" if owner is None else f"in {owner.__module__}.{owner.__qualname__}"
            raise refuse(f"its {name} is defined {where}, where layerlock knows {', '.join(sorted(allowed))} "
                         "of Keras")
    for name, n in _ARITY.items():
        method = getattr(cls, name, None)
        if method is not None and _positional(method) not in (n, None):
            raise refuse(f"its {name} takes {_positional(method)} arguments, expected {n}")
    step, fused = _owner(cls, "_backend_update_step"), _owner(cls, "_parallel_update_step")
    plain = _owner(cls, "update_step")
    if step is not None and step.__name__ == "TorchParallelOptimizer":
        if fused is None or fused.__module__.partition(".")[0] != "keras":
            raise refuse("its fused torch step (_parallel_update_step) is missing or not Keras' own")
        if fused.__name__ in FUSED:
            return None
        after = cls.__mro__[cls.__mro__.index(step) + 1:]
        nxt = next((c for c in after if "_backend_update_step" in vars(c)), None)
        if nxt is None or nxt.__name__ not in ("BaseOptimizer", "Nadam") or plain is None \
                or plain.__name__ == "BaseOptimizer":
            raise refuse(f"its fused torch step ({fused.__qualname__}) is not one layerlock knows, and there is no "
                         "per-variable update_step to take instead")
        return step
    if plain is None or plain.__name__ == "BaseOptimizer":
        raise refuse("it has no update_step")
    return None


def _public_name(cls: type) -> str:
    """The public keras.optimizers name of a Keras class (torch's fused Adam is ``Adam``); for
    a class of another package, its full name."""
    keras = sys.modules["keras"]
    if cls.__module__.partition(".")[0] == "keras":
        for c in cls.__mro__:
            if getattr(keras.optimizers, c.__name__, None) is c:
                return c.__name__
    return f"[{cls.__module__}.{cls.__qualname__}]"


def rated_class(cls: type) -> type:
    """The cached subclass of an optimizer class that applies a rate per variable (checked,
    created and registered for Keras serialisation as ``layerlock>Rated<Name>`` on first use).

    >>> import keras
    >>> rated_class(keras.optimizers.SGD).__name__
    'RatedSGD'
    """
    if issubclass(cls, RatedOptimizer):
        return cls
    rated = _RATED.get(cls)
    if rated is None:
        around = _update_path(cls)
        name = f"Rated{_public_name(cls)}"
        rated = type(name, (RatedOptimizer, cls), {"__module__": __name__, "__qualname__": name,
                                                    "layerlock_base": cls, "layerlock_around": around})
        sys.modules["keras"].saving.register_keras_serializable(package="layerlock", name=name)(rated)
        _RATED[cls] = rated
    return rated


def register_rated_classes() -> None:
    """Register a rated class for every public ``keras.optimizers`` optimizer layerlock can
    rate, so that ``keras.models.load_model`` finds the rated optimizers a model was saved with."""
    keras = sys.modules["keras"]
    for name in dir(keras.optimizers):
        cls = getattr(keras.optimizers, name)
        public = isinstance(cls, type) and issubclass(cls, keras.optimizers.Optimizer)
        if public and cls is not keras.optimizers.Optimizer:
            try:
                rated_class(cls)
            except BackendError:
                pass  # LossScaleOptimizer (its inner one is rated), MultiOptimizer


def rated_target(optimizer: Any) -> Any:
    """The optimizer that would carry per-variable rates for ``optimizer`` (the one a
    ``LossScaleOptimizer`` wraps), checked; :class:`BackendError` naming the type when it
    cannot. Changes nothing.

    >>> import keras
    >>> inner = keras.optimizers.SGD()
    >>> rated_target(keras.optimizers.LossScaleOptimizer(inner)) is inner
    True
    """
    keras = sys.modules.get("keras")
    if keras is None or _family(optimizer) != "keras" or not isinstance(optimizer, keras.optimizers.Optimizer):
        hint = " (keras.optimizers.get(name) makes one from a name)" if isinstance(optimizer, str) else ""
        raise BackendError(f"{ACCEPTED}; received {type(optimizer).__module__}.{type(optimizer).__qualname__}{hint}")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return rated_target(_attr(optimizer, "inner_optimizer", object))
    rated_class(type(optimizer))
    base_rate(optimizer)
    return optimizer


def upgrade(optimizer: Any) -> Any:
    """Make ``optimizer`` (or the one a LossScaleOptimizer wraps) apply a rate per variable, in
    place: its class becomes :func:`rated_class` of its own, so slots, ``iterations`` and every
    reference to it stay as they are. Returns the optimizer that carries the rates.

    >>> import keras
    >>> opt = keras.optimizers.Adam()
    >>> upgrade(opt) is opt, type(opt).__name__
    (True, 'RatedAdam')
    """
    target = rated_target(optimizer)
    rated = rated_class(type(target))
    if type(target) is not rated:
        try:
            object.__setattr__(target, "__class__", rated)
        except TypeError as exc:
            raise BackendError(f"could not give {type(target).__qualname__} per-variable rates: {exc}. "
                               f"Nothing was changed.") from exc
    return target


def base_rate(optimizer: Any) -> float:
    """The rate a variable without a rate of its own trains at, the one multipliers are
    relative to: the optimizer's ``learning_rate`` now, or a schedule's rate at step 0.

    >>> import keras
    >>> base_rate(keras.optimizers.SGD(0.5))
    0.5
    """
    keras = sys.modules["keras"]
    optimizer = _innermost(optimizer)
    rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        value, what = rate(0), f"its learning-rate schedule {type(rate).__name__} at step 0"
    elif isinstance(rate, keras.Variable):
        value, what = rate, "its learning_rate"
    else:
        raise BackendError(f"{type(optimizer).__qualname__} has a learning_rate of type {type(rate).__name__}; "
                           "per-variable rates are relative to a float learning_rate or a "
                           "keras.optimizers.schedules.LearningRateSchedule. Nothing was changed.")
    value = float(keras.ops.convert_to_numpy(value))
    if not value > 0:
        raise BackendError(f"{type(optimizer).__qualname__}: {what} is {value:g}, and per-variable rates are "
                           "multiples of it; give the optimizer a rate > 0 there. Nothing was changed.")
    return value


def multiplier(rate: float, base: float) -> float:
    """``rate / base``, where 1.0 means the base rate: a rate equal to the base up to the
    float32 rounding of the optimizer's learning_rate (2**-23) is the base rate.

    >>> multiplier(0.1, 0.10000000149011612), multiplier(0.05, 0.1)
    (1.0, 0.5)
    """
    factor = rate / base
    return 1.0 if abs(factor - 1.0) <= 2.0 ** -23 else factor


def rates_of(optimizer: Any) -> dict[str, tuple[float, float | None]]:
    """``variable.path -> (multiplier, weight decay or None)`` of the variables with a rate of
    their own (the others train at the base rate with the optimizer's weight decay)."""
    return dict(_innermost(optimizer).__dict__.get(RATES, {}))


def set_rates(optimizer: Any, multipliers: Mapping[str, float],
              decays: Mapping[str, float | None] | None = None) -> bool:
    """Give variables (by ``variable.path``) a rate multiplier and, where ``decays`` names them,
    a weight decay (None: the optimizer's own); other entries stay. ``optimizer`` is one
    :func:`upgrade` returned. True when something changed: a train function traced before
    must then be rebuilt, since rates are read when it is traced."""
    table: dict[str, tuple[float, float | None]] = dict(optimizer.__dict__.get(RATES, {}))
    before, decays = dict(table), dict(decays or {})
    for path in set(multipliers) | set(decays):
        old = table.get(path, _DEFAULT)
        entry = (float(multipliers.get(path, old[0])), decays[path] if path in decays else old[1])
        if entry == _DEFAULT:
            table.pop(path, None)
        else:
            table[path] = entry
    object.__setattr__(optimizer, RATES, table)
    object.__setattr__(optimizer, _LOOKUP, None)
    return table != before


class RatedOptimizer:
    """Mixed in before a Keras 3 optimizer's own class (see :func:`rated_class`): each
    variable trains at its multiplier times the optimizer's learning rate (so a schedule's
    factor applies to every rate), and decoupled weight decay uses the variable's rate.

    The rate reaches Keras' public per-variable surface, ``update_step(gradient, variable,
    learning_rate)``; torch's fused steps run once per group of variables with one rate. The
    multipliers are Python floats, read when a train function is traced.
    """

    layerlock_base: type = object
    layerlock_around: type | None = None

    def _layerlock_entry(self, variable: Any) -> tuple[float, float | None]:
        key = self._var_key(variable)  # type: ignore[attr-defined]
        lookup = self.__dict__.get(_LOOKUP)
        if lookup is None or key not in lookup:
            table = self.__dict__.get(RATES, {})
            lookup = {self._var_key(v): table.get(v.path, _DEFAULT)  # type: ignore[attr-defined]
                      for v in self._trainable_variables}  # type: ignore[attr-defined]
            lookup.setdefault(key, table.get(getattr(variable, "path", None), _DEFAULT))
            object.__setattr__(self, _LOOKUP, lookup)
        return lookup[key]  # type: ignore[no-any-return]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> Any:
        factor = self._layerlock_entry(variable)[0]
        return super().update_step(gradient, variable,  # type: ignore[misc]
                                   learning_rate if factor == 1.0 else learning_rate * factor)

    def _backend_update_step(self, grads: Any, trainable_variables: Any, learning_rate: Any) -> Any:
        around = type(self).layerlock_around
        step: Any = super() if around is None else super(around, self)
        return step._backend_update_step(grads, trainable_variables, learning_rate)

    def _parallel_update_step(self, grads: Any, variables: Any, learning_rate: Any) -> None:
        groups: dict[float, tuple[list[Any], list[Any]]] = {}
        for grad, variable in zip(grads, variables):
            pair = groups.setdefault(self._layerlock_entry(variable)[0], ([], []))
            pair[0].append(grad)
            pair[1].append(variable)
        for factor, (sub_grads, sub_variables) in groups.items():
            super()._parallel_update_step(sub_grads, sub_variables,  # type: ignore[misc]
                                          learning_rate if factor == 1.0 else learning_rate * factor)

    def _apply_weight_decay(self, variables: Any) -> None:
        if not self.__dict__.get(RATES):
            return super()._apply_weight_decay(variables)  # type: ignore[misc,no-any-return]
        own = self.weight_decay  # type: ignore[attr-defined]
        groups: dict[tuple[float, float | None], list[Any]] = {}
        for variable in variables:
            factor, decay = self._layerlock_entry(variable)
            if (own if decay is None else decay):
                groups.setdefault((factor, decay), []).append(variable)
        for (factor, decay), group in groups.items():
            # Keras' decay reads the optimizer's weight_decay and learning_rate: both are the
            # group's while it runs (one replica thread at a time under tf.distribute).
            object.__setattr__(self, _FACTOR, factor)
            object.__setattr__(self, "weight_decay", own if decay is None else decay)
            try:
                super()._apply_weight_decay(group)  # type: ignore[misc]
            finally:
                object.__setattr__(self, _FACTOR, None)
                object.__setattr__(self, "weight_decay", own)
        return None

    def _use_weight_decay(self, variable: Any) -> bool:
        decay = self._layerlock_entry(variable)[1]
        return super()._use_weight_decay(variable) if decay is None else decay > 0  # type: ignore[misc]

    def _get_current_learning_rate(self) -> Any:
        rate = super()._get_current_learning_rate()  # type: ignore[misc]
        factor = self.__dict__.get(_FACTOR)
        return rate if factor is None or factor == 1.0 else rate * factor

    def get_config(self) -> dict[str, Any]:
        """The optimizer's config plus ``layerlock_rates`` (variable path -> learning rate, for
        the variables with a rate of their own; under a schedule, the rate at step 0) and
        ``layerlock_weight_decay`` (variable path -> weight decay)."""
        config: dict[str, Any] = super().get_config()  # type: ignore[misc]
        base, table = base_rate(self), self.__dict__.get(RATES, {})
        config["layerlock_rates"] = {p: m * base for p, (m, _) in table.items() if m != 1.0}
        config["layerlock_weight_decay"] = {p: d for p, (_, d) in table.items() if d is not None}
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], custom_objects: Any = None) -> Any:
        """Build the optimizer class this one rates from ``config``, then give it the rates."""
        config = dict(config)
        rates = dict(config.pop("layerlock_rates", None) or {})
        decays = dict(config.pop("layerlock_weight_decay", None) or {})
        optimizer = cls.layerlock_base.from_config(config, custom_objects=custom_objects)  # type: ignore[attr-defined]
        target = upgrade(optimizer)
        base = base_rate(target)
        set_rates(target, {p: multiplier(float(r), base) for p, r in rates.items()}, decays)
        return optimizer


# -- some rows of a variable trainable (rows=) ----------------------------------------------------
ROWS = "_layerlock_rows"  # on a keras.Variable trainable in part: (rows, axis, boolean mask)
_ROW_APPLY = "_layerlock_row_apply"  # on BaseOptimizer.apply once it is wrapped


def variable_rows(variable: Any) -> tuple[int, ...] | None:
    """The trainable rows of ``variable`` (None: the whole variable follows its flag).

    >>> import keras
    >>> v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
    >>> set_variable_rows(v, (1,), 0); variable_rows(v)
    (1,)
    >>> set_variable_rows(v, None, 0); variable_rows(v) is None
    True
    """
    found = getattr(variable, "__dict__", {}).get(ROWS)
    return None if found is None else found[0]


def set_variable_rows(variable: Any, rows: Sequence[int] | None, axis: int) -> None:
    """Make rows ``rows`` (along ``axis``) of ``variable`` the only part the optimizer moves
    (None: the whole variable again). The variable itself stays ``trainable``; the step
    :func:`install_row_apply` wraps reads the rows when a train function is traced."""
    if rows is None:
        variable.__dict__.pop(ROWS, None)
        _WITH_ROWS.pop(id(variable), None)
        return
    import numpy as np

    shape = tuple(int(d) for d in variable.shape)
    mask = np.zeros(shape[axis], dtype=bool)
    mask[list(rows)] = True
    object.__setattr__(variable, ROWS, (tuple(sorted(rows)), axis,
                                        mask.reshape([shape[axis] if d == axis else 1 for d in range(len(shape))])))
    key = id(variable)
    _WITH_ROWS[key] = weakref.ref(variable, lambda _: _WITH_ROWS.pop(key, None))


# The variables that carry rows now (by id; a weak reference each): while there are none, the
# wrapped optimizer step takes the stock path without looking at its variables.
_WITH_ROWS: dict[int, Any] = {}


def _base_optimizer() -> type:
    """Keras 3's BaseOptimizer, whose ``apply`` every optimizer step runs through; refused
    (:class:`BackendError`) where its layout is not the one :func:`install_row_apply` knows."""
    keras = sys.modules["keras"]
    base: type | None = next((c for c in keras.optimizers.Optimizer.__mro__ if c.__name__ == "BaseOptimizer"
                              and c.__module__ == "keras.src.optimizers.base_optimizer"), None)
    apply = None if base is None else vars(base).get("apply")
    if base is None or not callable(apply) or _positional(getattr(apply, "__wrapped__", apply)) != 2:
        version = getattr(keras, "__version__", "(version unknown)")
        raise BackendError(f"layerlock does not know this layout of Keras {version}: rows= needs "
                           "keras.src.optimizers.base_optimizer.BaseOptimizer.apply(grads, trainable_variables). "
                           "Nothing was changed. Safe fallback: train the whole variable (no rows=), or freeze it.")
    return base


def check_row_apply() -> None:
    """Refuse, before anything changes, a Keras whose optimizer step :func:`install_row_apply`
    cannot wrap.

    >>> import keras
    >>> check_row_apply()
    """
    _base_optimizer()


def install_row_apply() -> None:
    """Wrap ``BaseOptimizer.apply`` (once, at the first rows= install) so that every Keras 3
    optimizer, compiled now or later, in ``fit`` or in a custom loop, moves only the
    trainable rows of the variables that have them (:func:`set_variable_rows`): their
    frozen rows' gradients are zeroed (the optimizer's state and a global-norm clip see the
    trainable rows only), the variable is kept, the stock step runs (weight decay, EMA,
    accumulation, clipping as they are), and the frozen rows are put back with
    ``where(mask, new, old)``: bit-identical by construction. Variables without rows take
    the stock step unchanged. The rows are read when a train function is traced, so a change
    needs a rebuilt one (the Keras backend rebuilds the compiled model's).

    >>> import keras
    >>> install_row_apply()
    >>> v = keras.Variable([[1.0], [2.0]]); set_variable_rows(v, (1,), 0)
    >>> keras.optimizers.SGD(1.0).apply([keras.ops.ones((2, 1))], [v])
    >>> keras.ops.convert_to_numpy(v).ravel().tolist()
    [1.0, 1.0]
    """
    base = _base_optimizer()
    original = vars(base)["apply"]
    if getattr(original, _ROW_APPLY, False):
        return
    keras = sys.modules["keras"]

    @functools.wraps(original)
    def apply(self: Any, grads: Any, trainable_variables: Any = None) -> Any:
        if not _WITH_ROWS:
            return original(self, grads, trainable_variables)  # no variable has rows: the stock step
        if trainable_variables is not None and not _is_seq(trainable_variables):
            trainable_variables = list(trainable_variables)  # a generator: read it once
        variables = getattr(self, "_trainable_variables", None) if trainable_variables is None else trainable_variables
        parts = [(i, v, found[2]) for i, v in enumerate(variables or ())
                 if (found := getattr(v, "__dict__", {}).get(ROWS)) is not None]
        if not parts:
            return original(self, grads, trainable_variables)  # the stock step, arguments as given
        grads = list(grads)
        ops = keras.ops
        kept = []
        for i, variable, mask in parts:  # the frozen rows are put back below whatever the stock step does
            if i < len(grads) and grads[i] is not None:
                grads[i] = ops.where(mask, grads[i], ops.zeros_like(grads[i]))
            kept.append((variable, mask, ops.copy(variable.value)))
        out = original(self, grads, trainable_variables)
        for variable, mask, old in kept:
            variable.assign(ops.where(mask, variable.value, old))
        return out

    setattr(apply, _ROW_APPLY, True)
    base.apply = apply  # type: ignore[attr-defined]
