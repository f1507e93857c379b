"""``rows=`` in Keras 3: only the chosen rows of an Embedding table (or output units of a Dense
layer) train under ``fit``, the others stay bit-identical under SGD with momentum, Adam and
AdamW's weight decay, and ``model.save`` writes a plain model that loads without layerlock
(issue 21). The file runs on TensorFlow and, in subprocesses, on the torch and JAX Keras
backends (Keras picks its backend at import)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
import numpy as np  # noqa: E402

import layerlock as ll  # noqa: E402
from layerlock.backends import keras_internals  # noqa: E402

BACKEND = keras.backend.backend()
NEW = "90:"  # rows 90..99 of a 100-row table: the "new tokens"
OPTIMIZERS = {
    "sgd-momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "loss-scale-adamw": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW(1e-2, weight_decay=0.1)),
    "adamw-accumulating": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1, gradient_accumulation_steps=2),
}


def net(optimizer=None, norm=False):
    """Embedding(100, 8) -> mean over tokens -> (LayerNorm) -> Dense(4); compiled with ``optimizer``."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,), dtype="int32"), keras.layers.Embedding(100, 8, name="emb"),
              keras.layers.GlobalAveragePooling1D(name="pool")]
    layers += [keras.layers.LayerNormalization(name="norm")] * norm + [keras.layers.Dense(4, name="head")]
    model = keras.Sequential(layers, name="net")
    if optimizer is not None:
        model.compile(optimizer, "mse")
    return model


def data(n=32):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 100, (n, 6)).astype("int32")
    x[:, 0] = rng.integers(90, 100, n)  # every example uses new tokens
    return x, rng.normal(size=(n, 4)).astype("float32")


def fit(model, epochs=1):
    x, y = data()
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0)


def value(variable):
    return np.array(keras.ops.convert_to_numpy(variable))


def table(model):
    return value(model.get_layer("emb").embeddings)


def same(a, b):
    """Bit-identical (bytes), not merely close."""
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def all_moved(a, b, axis):
    """Every row (``axis`` 0) or column (``axis`` 1) of ``a`` differs somewhere from ``b``'s."""
    changed = a != b
    if changed.ndim == 1:
        return bool(changed.all())
    return bool((changed.any(axis=1) if axis == 0 else changed.any(axis=0)).all())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_frozen_rows_are_bit_identical_and_the_chosen_rows_train(name):
    model = net(OPTIMIZERS[name]())
    before, head = table(model), value(model.get_layer("head").kernel)
    plan = ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    assert plan.partial == ("emb.embeddings",) and plan.trainable_scalars == 80
    assert model.get_layer("emb").embeddings in model.trainable_variables  # the optimizer holds it
    fit(model)
    after = table(model)
    assert same(after[:90], before[:90])
    assert all_moved(after[90:], before[90:], 0)
    assert same(value(model.get_layer("head").kernel), head)


def test_dense_output_units_train_alone_with_their_bias_entries_also_when_compiled_after_apply():
    model = net()
    head = model.get_layer("head")
    kernel, bias, emb = value(head.kernel), value(head.bias), table(model)
    plan = ll.apply(model, ll.freeze().unfreeze("head", rows=[1, 3]))
    assert set(plan.partial) == {"head.kernel", "head.bias"} and "rows [1, 3] of 4" in str(plan)
    model.compile(keras.optimizers.AdamW(1e-2, weight_decay=0.1), "mse")  # an optimizer made after apply
    fit(model)
    frozen, trained = [0, 2], [1, 3]
    assert same(value(head.kernel)[:, frozen], kernel[:, frozen]) and same(value(head.bias)[frozen], bias[frozen])
    assert all_moved(value(head.kernel)[:, trained], kernel[:, trained], 1)
    assert all_moved(value(head.bias)[trained], bias[trained], 0)
    assert same(table(model), emb)


def test_rows_given_after_the_train_function_was_traced_take_effect_at_the_next_fit():
    model = net(keras.optimizers.AdamW(1e-2, weight_decay=0.1))
    fit(model)  # traces the train function on the whole table (TF and JAX cache it)
    before = table(model)
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    fit(model)
    after = table(model)
    assert same(after[:90], before[:90]) and all_moved(after[90:], before[90:], 0)


class Tables(keras.callbacks.Callback):
    """The table at the start of each epoch and at the end of training."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(table(self.model))

    def on_train_end(self, logs=None):
        self.seen.append(table(self.model))


def test_a_freeze_scheduler_phase_gives_rows_during_fit_and_the_next_phase_trains_the_whole_table():
    import layerlock.keras as llk

    model = net(keras.optimizers.AdamW(1e-2, weight_decay=0.1))
    schedule = ll.Schedule({0: ll.freeze().unfreeze("emb", rows=NEW), 1: ll.unfreeze()})
    tables = Tables()  # after the scheduler: it sees each phase applied
    x, y = data()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[llk.FreezeScheduler(schedule, log=None), tables])
    start, middle, end = tables.seen
    assert same(middle[:90], start[:90]) and all_moved(middle[90:], start[90:], 0)
    assert all_moved(end[:90], middle[:90], 0)


def test_a_phase_lr_is_the_rate_of_the_rows_it_makes_trainable():
    import layerlock.keras as llk

    model = net(keras.optimizers.SGD(0.1))
    schedule = ll.Schedule({0: ll.freeze("emb"), 1: ll.unfreeze("emb", rows=NEW)}, lr={1: 1e-4})
    tables = Tables()
    x, y = data()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[llk.FreezeScheduler(schedule, log=None), tables])
    start, middle, end = tables.seen
    assert same(middle, start) and same(end[:90], start[:90])
    step = np.abs(end[90:] - middle[90:]).max()
    assert 0 < step < 1e-5  # at the optimizer's rate, 0.1, they move by about 5e-3


def test_an_optimizer_made_after_apply_in_a_custom_loop_keeps_the_frozen_rows():
    model = net()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    before = table(model)
    optimizer = keras.optimizers.AdamW(1e-2, weight_decay=0.1)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = [keras.ops.convert_to_tensor(rng.normal(size=tuple(v.shape)).astype("float32")) for v in variables]
        optimizer.apply(grads, variables)
    after = table(model)
    assert same(after[:90], before[:90]) and all_moved(after[90:], before[90:], 0)


def test_gradient_zeroing_by_hand_fails_under_adamw_weight_decay():
    """What layerlock does not do: zero the frozen rows' gradients and let the stock step run.
    AdamW's decoupled weight decay moves every row of a trainable variable, gradient or not."""
    model = net(keras.optimizers.AdamW(1e-2, weight_decay=0.1))
    model.get_layer("head").trainable = False
    before = table(model)
    keep = np.zeros((100, 1), dtype=bool)
    keep[90:] = True
    optimizer = model.optimizer
    stock = type(optimizer).apply

    def zeroing(self, grads, trainable_variables=None):
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        grads = [g if v.path != "emb/embeddings" else keras.ops.where(keep, g, keras.ops.zeros_like(g))
                 for g, v in zip(grads, variables)]
        return stock(self, grads, trainable_variables)

    object.__setattr__(optimizer, "apply", types.MethodType(zeroing, optimizer))
    fit(model)
    after = table(model)
    assert all_moved(after[:90], before[:90], 0)  # weight decay moved every "frozen" row


def test_plan_summary_snapshot_and_check_show_the_rows():
    model = net(keras.optimizers.Adam(1e-2))
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    fit(model)  # the optimizer is built: ll.check looks at its variables
    plan = ll.plan(model, ll.Spec())
    assert plan.partial == ("emb.embeddings",) and plan.rows[0].before == tuple(range(90, 100))
    assert plan.trainable_before[0] is False and "rows 90: of 100" in str(plan)
    assert ll.summary(model).trainable_scalars == 80
    state = ll.snapshot(model)
    assert state.rows == {"emb.embeddings": list(range(90, 100))} and state.params["emb.embeddings"] is False
    report = ll.check(model)
    assert not report.findings and not report.not_checked, report


def test_restore_and_frozen_put_the_rows_back_exactly():
    model = net(keras.optimizers.AdamW(1e-2, weight_decay=0.1))
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    state = ll.snapshot(model)
    before = table(model)
    with ll.frozen(model, ll.unfreeze("emb")):  # the whole table again: its frozen rows train
        assert ll.plan(model, ll.Spec()).partial == () and keras_internals.variable_rows(
            model.get_layer("emb").embeddings) is None
        fit(model)
        assert all_moved(table(model)[:90], before[:90], 0)
    assert ll.snapshot(model) == state and ll.plan(model, ll.Spec()).partial == ("emb.embeddings",)
    ll.apply(model, ll.freeze())
    assert ll.plan(model, ll.Spec()).partial == ()
    ll.restore(model, state)
    assert ll.plan(model, ll.Spec()).rows[0] == (100, tuple(range(90, 100)), tuple(range(90, 100)))
    assert ll.State.from_dict(state.to_dict()) == state
    middle = table(model)
    fit(model)
    after = table(model)
    assert same(after[:90], middle[:90]) and all_moved(after[90:], middle[90:], 0)


@pytest.mark.parametrize("spec, says", [
    (ll.unfreeze("emb", rows="100:"), "shape (100, 8)"),
    (ll.freeze().unfreeze("emb", rows=[100]), "out of range"),
    (ll.freeze().unfreeze("norm.gamma", rows=[0]), "no such axis"),
], ids=["slice-past-the-end", "index-out-of-range", "layer-norm-gamma"])
def test_rows_a_variable_cannot_take_are_refused_and_nothing_changes(spec, says):
    model = net(keras.optimizers.Adam(1e-2), norm=True)
    state = ll.snapshot(model)
    with pytest.raises(ll.SpecError, match=re.escape(says)):
        ll.apply(model, spec)
    assert ll.snapshot(model) == state and not state.rows
    assert not any(keras_internals.variable_rows(v) is not None for v in model.weights)


def test_a_state_with_rows_the_model_cannot_take_is_refused_and_nothing_changes():
    model = net(keras.optimizers.Adam(1e-2))
    state = ll.snapshot(model)
    bad = ll.State(state.backend, {**state.params, "emb.embeddings": False}, state.layers,
                   {"emb.embeddings": [100]})
    with pytest.raises(ll.SpecError, match="has 100 rows"):
        ll.restore(model, bad)
    assert ll.snapshot(model) == state


LOAD = """
import json, sys
import keras
import numpy as np
model = keras.models.load_model(sys.argv[1])
print(json.dumps({"layerlock": "layerlock" in sys.modules, "optimizer": type(model.optimizer).__name__,
                  "weights": [np.asarray(keras.ops.convert_to_numpy(v)).tobytes().hex() for v in model.weights]}))
"""


def test_model_save_writes_a_plain_model_that_loads_without_layerlock(tmp_path):
    model = net(keras.optimizers.AdamW(1e-2, weight_decay=0.1))
    ll.apply(model, ll.freeze().unfreeze("emb", "head", rows="2:"))
    fit(model)
    model.save(tmp_path / "m.keras")
    weights = [value(v).tobytes().hex() for v in model.weights]
    plain = keras.models.load_model(tmp_path / "m.keras")  # stock Keras: nothing of layerlock is in the file
    assert type(plain.optimizer).__name__ == "AdamW" and [value(v).tobytes().hex() for v in plain.weights] == weights
    assert all(keras_internals.variable_rows(v) is None for v in plain.weights)
    if BACKEND != "tensorflow":
        return  # a process without layerlock: once (each costs a Keras import)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no layerlock on the path
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "m.keras")], capture_output=True, text=True,
                         env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"layerlock": False, "optimizer": "AdamW", "weights": weights}


from .keras_backends import other_backends, test_the_same_tests_pass_on_the_torch_and_jax_keras_backends  # noqa: E402, F401
