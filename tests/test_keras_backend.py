"""The Keras backend: paths, flags checked against model.trainable_weights, and real fits on
Keras 3 with TensorFlow (in process), torch and JAX (one subprocess each), and tf_keras.

tf_keras is not in the default test environment; to run its tests::

    python -m venv /tmp/tfk && /tmp/tfk/bin/pip install -c constraints.txt -e '.[dev]' tensorflow-cpu 'tf_keras~=2.21.0'
    /tmp/tfk/bin/python -m pytest tests/test_keras_backend.py -k tf_keras
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")

import layerlock as ll  # noqa: E402
from layerlock.backends import get_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import keras_scenarios as scenarios  # noqa: E402

SCRIPT = Path(__file__).with_name("keras_scenarios.py")
ROOT = Path(__file__).resolve().parent.parent
on_tensorflow = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                   reason="in-process fits run on the TensorFlow Keras backend")


def functional(name: str, units: int = 3) -> keras.Model:
    inp = keras.Input((4,))
    h = keras.layers.Dense(units, name="d")(inp)
    return keras.Model(inp, keras.layers.BatchNormalization(name="bn")(h), name=name)


# -- paths, depth, kinds ----------------------------------------------------------------------------
def test_paths_walk_nested_models_and_duplicate_inner_names_stay_distinct():
    inp = keras.Input((4,))
    a, b = functional("a"), functional("b")
    model = keras.Model(inp, keras.layers.Concatenate(name="cat")([a(inp), b(inp)]), name="net")
    paths = [p.path for p in ll.plan(model, ll.freeze()).params]
    assert paths == ["a.d.kernel", "a.d.bias", "a.bn.gamma", "a.bn.beta",
                     "b.d.kernel", "b.d.bias", "b.bn.gamma", "b.bn.beta"]
    assert ll.plan(model, ll.freeze("a")).frozen == tuple(paths[:4])


def test_depth_means_exactly_model_layers_prefix():
    model = keras.Sequential([keras.Input((4,)), functional("base"), keras.layers.Dense(2, name="mid"),
                              keras.layers.Dense(1, name="head")])
    for depth in (1, 2, -1):
        frozen = {p.rpartition(".")[0].partition(".")[0] for p in ll.plan(model, ll.freeze(depth=depth)).frozen}
        assert frozen == {layer.name for layer in model.layers[:depth]}
    base = model.layers[0]  # a Functional model lists its InputLayer first; depth counts it
    assert isinstance(base.layers[0], keras.layers.InputLayer)
    assert ll.plan(model, ll.freeze(depth=2, within="base")).frozen == ("base.d.kernel", "base.d.bias")


def test_kind_matches_keras_class_names_and_batchnorm_statistics_are_not_parameters():
    model = keras.Sequential([keras.Input((4,)), functional("base"), keras.layers.Dense(1, name="head")])
    plan = ll.plan(model, ll.freeze(kind="BatchNorm*"))
    assert plan.frozen == ("base.bn.gamma", "base.bn.beta")
    assert plan.held == ("base.bn",)
    assert not any("moving" in p.path for p in plan.params)
    tree = get_backend(model).tree(model)
    assert [tree.kinds[i] for i in tree.children(0)] == ["Functional", "Dense"]


def test_layer_shared_by_two_submodels_is_one_parameter_under_two_paths():
    shared = keras.layers.Dense(2, name="shared")
    subs = []
    for name in ("left", "right"):
        inp = keras.Input((2,))
        subs.append(keras.Model(inp, shared(inp), name=name))
    inp = keras.Input((2,))
    model = keras.Model(inp, keras.layers.Add(name="add")([s(inp) for s in subs]))
    plan = ll.plan(model, ll.freeze("left"))
    assert plan.frozen == ("left.shared.kernel", "left.shared.bias")
    assert plan.params[0].aliases == ("right.shared.kernel",)


def test_parameter_level_rules_set_exactly_model_trainable_weights():
    model = keras.Sequential([keras.Input((4,)), functional("base"), keras.layers.Dense(1, name="head")])
    plan = ll.apply(model, ll.freeze().unfreeze("*.bias"))
    assert plan.trainable == ("base.d.bias", "head.bias")
    scenarios.check_trainable_set(model, plan)
    assert model.trainable and model.layers[0].get_layer("bn").trainable is False  # held BatchNorm


def test_final_flags_do_not_depend_on_previous_parent_flags():
    model = keras.Sequential([keras.Input((4,)), functional("base"), keras.layers.Dense(1, name="head")])
    model.trainable = False
    model.layers[0].get_layer("d").kernel.trainable = True  # a flag Keras would ignore (root is off)
    plan = ll.apply(model, ll.unfreeze("base.d").freeze("base.d.kernel"))
    scenarios.check_trainable_set(model, plan)
    assert [v.name for v in model.trainable_weights] == ["bias"]
    again = ll.apply(model, ll.unfreeze("base.d").freeze("base.d.kernel"))
    assert again.changed == ()


def test_snapshot_restore_round_trips_flags_and_holds():
    model = keras.Sequential([keras.Input((4,)), functional("base"), keras.layers.Dropout(0.5, name="drop"),
                              keras.layers.Dense(1, name="head")])
    state = ll.snapshot(model)
    plan = ll.apply(model, ll.freeze("base"), frozen_mode="eval")
    assert set(plan.held) == {"base", "base.bn"}  # frozen_mode hold, and the bn policy
    tree = get_backend(model).tree(model)
    assert tree.held[tree.children(0)[0]]
    assert ll.State.from_dict(ll.snapshot(model).to_dict()) == ll.snapshot(model)
    ll.restore(model, state)
    assert ll.snapshot(model) == state
    assert len(model.trainable_weights) == 6


def test_failed_apply_changes_nothing():
    model = keras.Sequential([keras.Input((4,)), functional("base"), keras.layers.Dense(1, name="head")])
    state = ll.snapshot(model)
    with pytest.raises(ll.NoMatchError, match="bsae"):
        ll.apply(model, ll.freeze("base").freeze("bsae"))
    assert ll.snapshot(model) == state


def test_backend_detection_and_fingerprint_of_frozen_weights():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="a"), keras.layers.Dense(1, name="b")])
    assert get_backend(model).name == "keras"
    ll.apply(model, ll.freeze("a"))
    fp = ll.fingerprint(model, "frozen")
    model.compile("sgd", "mse")
    model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
    assert ll.fingerprint(model, "frozen") == fp


# -- real fits: freeze / unfreeze x before fit / between fits / in a callback ------------------------
@on_tensorflow
@pytest.mark.parametrize("scenario", list(scenarios.SCENARIOS))
def test_fit_trains_exactly_the_applied_set_on_tensorflow(scenario):
    scenarios.SCENARIOS[scenario]()


def test_unfreeze_between_fits_trains_new_layer_and_keeps_adam_state():
    scenarios.unfreeze_between_fits()


@on_tensorflow
def test_mobilenet_v2_frozen_base_keeps_weights_and_batchnorm_statistics():
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35)
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.GlobalAveragePooling2D(name="pool"),
                              keras.layers.Dense(3, name="head")])
    plan = ll.apply(model, ll.freeze("mobilenetv2_0.35_32"))
    scenarios.check_trainable_set(model, plan)
    assert plan.trainable == ("head.kernel", "head.bias")
    assert len(plan.held) == sum(isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers)
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [np.array(v.numpy()) for v in model.weights]
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    model.fit(x, np.arange(8) % 3, batch_size=4, epochs=1, verbose=0)
    changed = [v.path for v, b in zip(model.weights, before) if not np.array_equal(b, v.numpy())]
    assert changed == [w.path for w in model.layers[-1].weights]  # moving statistics included
    assert len(model.optimizer.variables) == 2 + 2 * 2  # no Adam slots for the frozen base


# -- other Keras backends, one subprocess each ---------------------------------------------------------
def _run_scenarios(keras_backend: str) -> str:
    env = dict(os.environ, KERAS_BACKEND=keras_backend, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert text.count("PASS ") == len(scenarios.SCENARIOS), text
    return text


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_fit_trains_exactly_the_applied_set_on_torch_keras_backend():
    assert "backend=torch" in _run_scenarios("torch")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_fit_trains_exactly_the_applied_set_on_jax_keras_backend():
    assert "backend=jax" in _run_scenarios("jax")


# -- legacy tf_keras ------------------------------------------------------------------------------------
@pytest.fixture
def tf_keras():
    return pytest.importorskip("tf_keras")


def _tf_keras_model(tfk):
    inp = tfk.Input((6,))
    h = tfk.layers.BatchNormalization(name="bn")(tfk.layers.Dense(8, name="dense")(inp))
    model = tfk.Sequential([tfk.Input((6,)), tfk.Model(inp, h, name="base"), tfk.layers.Dense(2, name="head")])
    model.compile(tfk.optimizers.Adam(0.01), "mse")
    return model


def test_tf_keras_rejects_parameter_level_rules_with_spec_error(tf_keras):
    model = _tf_keras_model(tf_keras)
    assert get_backend(model).name == "tf_keras"
    with pytest.raises(ll.SpecError, match="whole layers"):
        ll.apply(model, ll.freeze().unfreeze("*.bias"))
    assert len(model.trainable_weights) == 6


@pytest.mark.parametrize("when", ["before_fit", "between_fits", "callback"])
def test_tf_keras_fit_trains_exactly_the_applied_set(tf_keras, when):
    model = _tf_keras_model(tf_keras)
    x, y = scenarios.data()
    values = lambda: [w.numpy().copy() for w in model.weights]  # noqa: E731
    moved = lambda before: {w.name.partition(":")[0] for w, b in zip(model.weights, before)  # noqa: E731
                            if not np.array_equal(w.numpy(), b)}
    head = {"head/kernel", "head/bias"}
    if when == "before_fit":
        ll.apply(model, ll.freeze("base"))
    else:
        model.fit(x, y, verbose=0)
    marks = {}

    class At(tf_keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                marks["before"] = values()
                ll.apply(self.model, ll.freeze("base"))

    if when == "between_fits":
        ll.apply(model, ll.freeze("base"))
    before = values()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[At()] if when == "callback" else [])
    assert moved(marks.get("before", before)) == head
    steps = int(model.optimizer.iterations.numpy())
    ll.apply(model, ll.unfreeze())  # new Adam slots; no KeyError
    before = values()
    model.fit(x, y, verbose=0)
    assert len(moved(before)) == 8 and int(model.optimizer.iterations.numpy()) == steps + 1  # one batch of 32


def test_frozen_mode_eval_turns_dropout_off_in_held_subtrees_only_and_restore_brings_it_back():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="dense"),
                             keras.layers.Dropout(0.5, name="drop")], name="base")
    model = keras.Sequential([keras.Input((8,)), base, keras.layers.Dropout(0.5, name="top_drop"),
                              keras.layers.Dense(2, name="head")])
    x = np.ones((4, 8), "float32")
    state = ll.snapshot(model)
    plan = ll.apply(model, ll.freeze("base"), frozen_mode="eval")
    assert plan.held == ("base",)
    assert base.get_layer("drop").rate == 0.0 and model.get_layer("top_drop").rate == 0.5
    features = keras.Model(base.inputs, base.outputs)
    np.testing.assert_array_equal(features(x, training=True), features(x, training=True))
    ll.restore(model, state)
    assert base.get_layer("drop").rate == 0.5
    assert not np.array_equal(features(x, training=True), features(x, training=True))


def test_apply_walks_the_model_once(monkeypatch):
    model = keras.Sequential([keras.Input((4,)), functional("base"), keras.layers.Dense(1, name="head")])
    model.compile("sgd", "mse")
    backend = get_backend(model)
    calls = []
    walk = type(backend).walk
    monkeypatch.setattr(type(backend), "walk", lambda self, m: calls.append(1) or walk(self, m))
    ll.apply(model, ll.freeze("base"))
    assert len(calls) == 1
