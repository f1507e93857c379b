"""Keras internals behind one door (layerlock/backends/keras_internals.py; the scan is
tests/test_doors.py): a layout it does not know makes ``apply`` refuse before anything changes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")

import layerlock as ll  # noqa: E402
import layerlock.keras as llk  # noqa: E402

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
