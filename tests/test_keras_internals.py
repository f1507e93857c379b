"""Keras internals behind one door: every private Keras / TensorFlow / tf_keras attribute
layerlock uses lives in layerlock/backends/keras_internals.py, and a layout it does not know
makes ``apply`` refuse before anything changes."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")

import layerlock as ll  # noqa: E402
import layerlock.keras as llk  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "layerlock"
DOOR = PACKAGE / "backends" / "keras_internals.py"
# Modules that handle Keras models: they may use no private Keras attribute at all.
KERAS_FACING = [PACKAGE / "backends" / "keras.py", PACKAGE / "keras.py", PACKAGE / "demo" / "keras_run.py"]
# Everything behind the door. Adding a name here is a decision: give it a layout check.
BEHIND_THE_DOOR = {
    "_flatten_layers", "_trainable_variables", "_trainable_weights", "_value",                # layers, variables
    "_variables", "_trainable_variables_indices", "_var_key", "_tracker", "_built", "_index_dict",  # optimizers
    "keras.src.utils.tracking",
    "_distribute_strategy", "_is_compiled", "_compiled_trainable_state", "_reset_compile_cache",  # models
}
PRIVATE_NAME = re.compile(r"_(?!_|layerlock)\w+")  # not dunders, not layerlock's own marks
PRIVATE_MODULE = re.compile(r"((tf_)?keras\.src|tensorflow\.python)(\.\w+)*")


def private_uses(path: Path) -> set[str]:
    """Private names a module uses on objects other than itself: ``x._name`` (x not self or
    cls), a private name as a string (``getattr(x, "_name")``, a layout table) and private
    framework modules (``keras.src...``), imported or named."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and PRIVATE_NAME.fullmatch(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if PRIVATE_NAME.fullmatch(node.value) or PRIVATE_MODULE.fullmatch(node.value):
                found.add(node.value)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n for n in names if PRIVATE_MODULE.fullmatch(n)}
    return found


def test_the_door_uses_exactly_the_listed_private_names():
    assert private_uses(DOOR) == BEHIND_THE_DOOR


@pytest.mark.parametrize("path", KERAS_FACING, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_keras_facing_modules_use_no_private_keras_attribute(path):
    assert private_uses(path) == set()


def test_no_other_module_uses_a_name_behind_the_door():
    leaks = {str(p.relative_to(PACKAGE)): used for p in PACKAGE.rglob("*.py") if p != DOOR
             and (used := private_uses(p) & BEHIND_THE_DOOR)}
    assert leaks == {}


# -- a layout layerlock does not know ------------------------------------------------------------
def trained_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="body"),
                              keras.layers.Dense(1, name="head")])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 4)), rng.normal(size=(16, 1)), verbose=0)  # builds optimizer and train function
    return model


def future_keras(optimizer, change):
    """Optimizer layouts a future Keras might have."""
    if change == "variables-not-a-list":
        return {"_variables": tuple(optimizer._variables)}
    if change == "no-index":
        return {"_trainable_variables_indices": None}
    return {"_tracker": object()}


@pytest.mark.parametrize("change", ["variables-not-a-list", "no-index", "tracker-without-config"])
def test_unknown_optimizer_layout_refuses_before_touching_flags_optimizer_or_train_function(monkeypatch, change):
    model = trained_model()
    optimizer = model.optimizer
    for name, value in future_keras(optimizer, change).items():
        if value is None:
            monkeypatch.delitem(optimizer.__dict__, name)
        else:
            monkeypatch.setitem(optimizer.__dict__, name, value)
    state, train_function = ll.snapshot(model), model.train_function
    slots = [(id(v), np.array(v.numpy())) for v in optimizer.variables]

    with pytest.raises(ll.BackendError) as info:
        ll.apply(model, ll.freeze("body"))
    message = str(info.value)
    assert f"Keras {keras.__version__}" in message and "Nothing was changed" in message
    assert "model.compile(" in message and "train function" in message and "Adam moments" in message
    assert ll.snapshot(model) == state and model.train_function is train_function
    assert [(id(v), v.numpy().tolist()) for v in optimizer.variables] == [(i, a.tolist()) for i, a in slots]

    model.get_layer("body").trainable = False
    with pytest.raises(ll.BackendError, match="does not know this layout"):
        llk.sync_optimizer(optimizer, model)  # the custom-loop door refuses the same way
    assert [id(v) for v in optimizer.variables] == [i for i, _ in slots]

    monkeypatch.undo()  # the known layout: the same call goes through
    assert ll.apply(model, ll.freeze("body")).frozen == ("body.kernel", "body.bias")
    assert model.train_function is not train_function


def test_the_safe_fallback_in_the_message_works():
    model = trained_model()
    model.optimizer.__dict__["_variables"] = tuple(model.optimizer._variables)
    with pytest.raises(ll.BackendError):
        ll.apply(model, ll.freeze("body"))
    model.compile(keras.optimizers.Adam(0.01), "mse")  # what the message says: a new optimizer, then apply
    ll.apply(model, ll.freeze("body"))
    kernel = model.get_layer("body").kernel.numpy().copy()
    model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
    assert np.array_equal(kernel, model.get_layer("body").kernel.numpy())


def test_an_optimizer_of_no_known_kind_is_named():
    model = trained_model()
    with pytest.raises(ll.BackendError, match="optimizers in step; received builtins.object"):
        llk.sync_optimizer(object(), model)
