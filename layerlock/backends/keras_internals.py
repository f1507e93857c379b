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

keras and tf_keras are only read from ``sys.modules`` or imported inside functions.

>>> import keras
>>> a, b = keras.Variable(1.0), keras.Variable(2.0)
>>> opt = keras.optimizers.Adam(); opt.build([a])
>>> sync_variables(opt, [a, b]) == [b], len(opt.variables)
(True, 6)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
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
