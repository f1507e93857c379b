"""Per-variable learning rates in Keras 3: ``layerlock.keras.param_groups`` / ``with_rates``,
``sync_optimizer(lr=)`` and a phase's ``lr`` in ``FreezeScheduler`` mean what they mean in
torch. What a phase makes trainable trains at its ``lr``, what was already training keeps its
own rate, without ``lr`` new variables take the optimizer's base rate, and under a schedule
every rate follows the schedule's factor. The file runs on TensorFlow and, in subprocesses,
on the torch and JAX Keras backends (Keras picks its backend at import).

Steps are measured from zero weights where the test can (a float32 step from zero is exact
to float32 rounding of the rate times the gradient), and with large gradients otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
import numpy as np  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.keras as llk  # noqa: E402
from layerlock.backends import keras_internals  # noqa: E402
from layerlock.backends.keras import KerasBackend  # noqa: E402

BASE, PHASE_LR = 1e-2, 1e-3
BACKEND = keras.backend.backend()


def net(optimizer=None, blocks=("body", "head")):
    """Dense layers in a row, named; compiled with ``optimizer`` (default SGD at BASE)."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(2 if name == blocks[-1] else 4, name=name) for name in blocks]
    model = keras.Sequential([keras.Input((3,)), *layers], name="net")
    model.compile(optimizer or keras.optimizers.SGD(BASE), "mse")
    return model


def data(n=8):
    rng = np.random.default_rng(0)  # targets far from the outputs: large gradients, steps well above rounding
    return rng.normal(size=(n, 3)).astype("float32"), (10 + rng.normal(size=(n, 2))).astype("float32")


def variables(model):
    """layerlock path -> variable."""
    backend = KerasBackend()
    return {path: v for path, _, v in backend.unique_variables(backend.walk(model))}


def weights(model):
    return {path: np.array(keras.ops.convert_to_numpy(v)) for path, v in variables(model).items()}


def zero(model):
    for v in model.weights:
        v.assign(np.zeros(tuple(v.shape), "float32"))


def step(optimizer, model, grads):
    """One optimizer step with given gradients (no tape: the same on every backend)."""
    trainable = model.trainable_variables
    path = {id(v): p for p, v in variables(model).items()}
    optimizer.apply([keras.ops.convert_to_tensor(grads[path[id(v)]]) for v in trainable], trainable)


def gradients(model, seed=1):
    rng = np.random.default_rng(seed)
    return {p: rng.normal(size=tuple(v.shape)).astype("float32") for p, v in variables(model).items()}


class Epoch(keras.callbacks.Callback):
    """Records the weights when epoch ``at`` begins (after the callbacks before it) and ends."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            self.before = weights(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            self.after = weights(self.model)

    def moved(self):
        return {p: self.after[p] - self.before[p] for p in self.before}


# -- the measurement: a phase's lr in fit ----------------------------------------------------------
def test_a_phase_lr_trains_what_the_phase_unfreezes_at_that_rate_and_leaves_the_head_at_its_own(capsys):
    """Two runs from the same weights, one step per epoch: in the second epoch both take their
    step from identical weights, so the same gradients, and an SGD step is rate x gradient."""
    x, y = data()
    moves = {}
    for lr in (PHASE_LR, None):
        model, epoch = net(), Epoch(1)
        schedule = ll.Schedule({0: ll.freeze("body"), 1: ll.unfreeze()}, lr=None if lr is None else {1: lr})
        model.fit(x, y, batch_size=len(x), epochs=2, verbose=0, shuffle=False,
                  callbacks=[llk.FreezeScheduler(schedule), epoch])
        moves[lr] = epoch.moved()
        assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(BASE)
    for path in moves[None]:
        ratio = np.abs(moves[PHASE_LR][path]).sum() / np.abs(moves[None][path]).sum()
        expected = PHASE_LR / BASE if path.startswith("body") else 1.0
        assert ratio == pytest.approx(expected, rel=1e-3), path
    assert capsys.readouterr().out.splitlines()[1].endswith("; optimizer +2 variables at lr 0.001")


def test_what_was_already_training_keeps_its_rate_and_a_phase_without_lr_gives_the_base_rate():
    model = net(blocks=("body", "mid", "top", "head"))
    schedule = ll.Schedule({0: ll.freeze(depth=-1), 1: ll.unfreeze("top"), 2: ll.unfreeze("mid"),
                            3: ll.unfreeze()}, lr={1: 1e-3, 2: 1e-4})
    lines = []
    callback = llk.FreezeScheduler(schedule, log=lines.append)
    callback.set_model(model)  # what fit does at each epoch, without the steps
    callback.on_train_begin()
    for epoch in range(4):
        callback.on_epoch_begin(epoch)
    rates = model.optimizer.get_config()["layerlock_rates"]
    assert rates == pytest.approx({"net/top/kernel": 1e-3, "net/top/bias": 1e-3,
                                   "net/mid/kernel": 1e-4, "net/mid/bias": 1e-4})  # body and head: the base rate
    assert lines[1].endswith("; optimizer +2 variables at lr 0.001")
    assert "optimizer" not in lines[3]  # no lr: nothing to change

    resumed = net(blocks=("body", "mid", "top", "head"))  # a new process would load it; the replay gives the rates
    again = llk.FreezeScheduler(schedule, log=None)
    again.set_model(resumed)
    again.load_state_dict({**callback.state_dict(), "epoch": 2, "phase": 2})
    assert resumed.optimizer.get_config()["layerlock_rates"] == pytest.approx({
        "net/top/kernel": 1e-3, "net/top/bias": 1e-3, "net/mid/kernel": 1e-4, "net/mid/bias": 1e-4})


def test_without_a_phase_lr_a_variable_keeps_the_rate_with_rates_gave_it():
    model = net()
    llk.with_rates(model.optimizer, llk.param_groups(model, BASE, lr_mult={"body": 0.5}))
    for lr, rate in ((None, 0.5 * BASE), (PHASE_LR, PHASE_LR)):
        callback = llk.FreezeScheduler(ll.Schedule({0: ll.freeze("body"), 1: ll.unfreeze()},
                                                   lr=None if lr is None else {1: lr}), log=None)
        callback.set_model(model)
        callback.on_train_begin()
        callback.on_epoch_begin(0)
        callback.on_epoch_begin(1)
        assert model.optimizer.get_config()["layerlock_rates"] == pytest.approx(
            {"net/body/kernel": rate, "net/body/bias": rate})


# -- param_groups / with_rates ----------------------------------------------------------------------
def test_one_sgd_step_moves_each_variable_by_exactly_its_rate_times_its_gradient():
    model = net(blocks=("body", "mid", "head"))
    zero(model)
    groups = llk.param_groups(model, BASE, layer_decay=0.5, lr_mult={"head.bias": 3.0})
    optimizer = llk.with_rates(keras.optimizers.SGD(BASE), groups)
    grads = gradients(model)
    step(optimizer, model, grads)
    rate = {path: g["lr"] for g in groups for path, _ in g["params"]}
    assert rate == pytest.approx({"body.kernel": 2.5e-3, "body.bias": 2.5e-3, "mid.kernel": 5e-3, "mid.bias": 5e-3,
                                  "head.kernel": 1e-2, "head.bias": 3e-2})
    for path, value in weights(model).items():
        np.testing.assert_allclose(-value, rate[path] * grads[path], rtol=1e-5, err_msg=path)


def test_layer_decay_counts_the_blocks_freeze_depth_counts():
    model = net(blocks=("body", "mid", "top", "head"))
    groups = llk.param_groups(model, BASE, layer_decay=0.5)
    assert [g["name"] for g in groups] == ["block0", "block1", "block2", "block3"]
    for depth in range(1, 4):
        below = {path for g in groups[:depth] for path, _ in g["params"]}
        assert set(ll.plan(model, ll.freeze(depth=depth)).frozen) == below


def test_a_schedule_scales_every_rate_by_its_factor_from_step_0():
    model = net()
    zero(model)
    schedule = keras.optimizers.schedules.ExponentialDecay(BASE, decay_steps=1, decay_rate=0.5)
    optimizer = llk.with_rates(keras.optimizers.SGD(schedule), llk.param_groups(model, BASE, lr_mult={"body": 0.1}))
    grads = gradients(model)
    step(optimizer, model, grads)
    step(optimizer, model, grads)  # rates r, then r / 2
    for path, value in weights(model).items():
        rate = BASE * (0.1 if path.startswith("body") else 1.0)
        np.testing.assert_allclose(-value, 1.5 * rate * grads[path], rtol=1e-5, err_msg=path)


def test_adamw_decays_each_variable_by_its_rate_and_no_decay_variables_not_at_all():
    model = net()
    for v in model.weights:
        v.assign(np.full(tuple(v.shape), 0.5, "float32"))
    groups = llk.param_groups(model, BASE, lr_mult={"head": 4.0}, weight_decay=0.1, no_decay="*bias")
    optimizer = llk.with_rates(keras.optimizers.AdamW(BASE, weight_decay=0.9), groups)
    before = weights(model)
    step(optimizer, model, {p: np.zeros_like(w) for p, w in before.items()})  # Adam moves nothing: decay alone
    after = weights(model)
    for g in groups:
        for path, _ in g["params"]:
            if g["weight_decay"] == 0.0:
                assert np.array_equal(after[path], before[path]), path
            else:
                np.testing.assert_allclose(after[path], before[path] * (1 - g["lr"] * 0.1), rtol=1e-6, err_msg=path)

    # groups without a weight_decay: the optimizer's own, with its exclusions, at the variable's rate
    model = net()
    for v in model.weights:
        v.assign(np.full(tuple(v.shape), 0.5, "float32"))
    optimizer = keras.optimizers.AdamW(BASE, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    llk.with_rates(optimizer, llk.param_groups(model, BASE, lr_mult={"head": 4.0}))
    step(optimizer, model, {p: np.zeros_like(w) for p, w in before.items()})
    for path, value in weights(model).items():
        shrink = 0.0 if path.endswith("bias") else BASE * (4.0 if path.startswith("head") else 1.0) * 0.1
        np.testing.assert_allclose(value, 0.5 * (1 - shrink), rtol=1e-6, err_msg=path)


def test_frozen_variables_are_bit_identical_after_real_fit_steps_with_adam():
    x, y = data(32)
    model = net(keras.optimizers.Adam(BASE), blocks=("body", "mid", "head"))
    llk.with_rates(model.optimizer, llk.param_groups(model, BASE, lr_mult={"mid": 0.1}))
    schedule = ll.Schedule({0: ll.freeze().unfreeze("head"), 1: ll.unfreeze("mid")}, lr={1: PHASE_LR})
    before = weights(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[llk.FreezeScheduler(schedule, log=None)])
    after = weights(model)
    assert [p for p in before if not np.array_equal(before[p], after[p])] == ["mid.kernel", "mid.bias",
                                                                              "head.kernel", "head.bias"]


def test_adam_keeps_its_moments_through_with_rates_and_a_phase_change():
    x, y = data()
    model = net(keras.optimizers.Adam(BASE))
    ll.apply(model, ll.freeze("body"))
    model.fit(x, y, batch_size=4, verbose=0)
    optimizer = model.optimizer
    head = variables(model)["head.kernel"]

    def moments():
        i = optimizer._get_variable_index(head)
        return optimizer._momentums[i], optimizer._velocities[i]

    slots = moments()
    values = [np.array(keras.ops.convert_to_numpy(s)) for s in slots]
    steps = int(keras.ops.convert_to_numpy(optimizer.iterations))
    assert llk.with_rates(optimizer) is optimizer and model.optimizer is optimizer
    assert all(a is b for a, b in zip(moments(), slots))
    callback = llk.FreezeScheduler(ll.Schedule({0: ll.unfreeze()}, lr={0: PHASE_LR}), log=None)
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    assert all(a is b for a, b in zip(moments(), slots))
    assert all(np.array_equal(v, keras.ops.convert_to_numpy(s)) for v, s in zip(values, slots))
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == steps
    assert optimizer.get_config()["layerlock_rates"] == pytest.approx({"net/body/kernel": PHASE_LR,
                                                                       "net/body/bias": PHASE_LR})


def test_nadam_advances_its_state_once_per_step_under_rates():
    """torch's fused Nadam keeps state per call; rated, it takes Keras' per-variable step."""
    moved = []
    for rated in (False, True):
        model = net()
        optimizer = keras.optimizers.Nadam(BASE)
        if rated:
            llk.with_rates(optimizer, llk.param_groups(model, BASE, lr_mult={"body": 0.5}))
        for _ in range(2):
            step(optimizer, model, gradients(model))
        moved.append((weights(model), float(keras.ops.convert_to_numpy(optimizer._u_product))))
    (plain, u_plain), (rated, u_rated) = moved
    assert u_rated == pytest.approx(u_plain, rel=1e-6)
    for path in ("head.kernel", "head.bias"):  # the base rate: the same steps as without rates
        np.testing.assert_allclose(rated[path], plain[path], rtol=1e-5, atol=1e-6)


def test_a_loss_scale_optimizer_rates_the_optimizer_it_wraps():
    inner = keras.optimizers.SGD(BASE)
    outer = keras.optimizers.LossScaleOptimizer(inner)
    model = net(outer)
    assert llk.with_rates(outer, llk.param_groups(model, BASE, lr_mult={"body": 0.5})) is outer
    assert type(outer) is keras.optimizers.LossScaleOptimizer and type(inner).__name__ == "RatedSGD"
    assert inner.get_config()["layerlock_rates"] == pytest.approx({"net/body/kernel": 5e-3, "net/body/bias": 5e-3})


# -- sync_optimizer ---------------------------------------------------------------------------------
def test_sync_optimizer_trains_the_variables_it_adds_at_lr_and_the_others_at_theirs():
    model = net()
    ll.apply(model, ll.freeze("body"))
    optimizer = keras.optimizers.SGD(BASE)
    optimizer.build(model.trainable_variables)
    ll.apply(model, ll.unfreeze())
    assert llk.sync_optimizer(optimizer, model, lr=PHASE_LR) == ["body.kernel", "body.bias"]
    assert llk.sync_optimizer(optimizer, model, lr=PHASE_LR) == []
    zero(model)
    grads = gradients(model)
    step(optimizer, model, grads)
    for path, value in weights(model).items():
        rate = PHASE_LR if path.startswith("body") else BASE
        np.testing.assert_allclose(-value, rate * grads[path], rtol=1e-5, err_msg=path)


# -- serialisation ----------------------------------------------------------------------------------
LOAD = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import keras
import layerlock.keras
model = keras.models.load_model(sys.argv[1])
optimizer = model.optimizer
print(json.dumps({"class": type(optimizer).__name__, "rates": optimizer.get_config()["layerlock_rates"],
                  "decays": optimizer.get_config()["layerlock_weight_decay"],
                  "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations))}))
"""


def test_model_save_and_load_model_in_a_fresh_process_restore_the_rates(tmp_path):
    x, y = data()
    model = net(keras.optimizers.AdamW(BASE))
    llk.with_rates(model.optimizer, llk.param_groups(model, BASE, lr_mult={"head": 2.0}, weight_decay=0.01,
                                                     no_decay="*bias"))
    model.fit(x, y, batch_size=4, verbose=0)
    model.save(tmp_path / "m.keras")
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "m.keras")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    config = model.optimizer.get_config()
    assert loaded["class"] == "RatedAdamW" and loaded["iterations"] == 2
    assert loaded["rates"] == pytest.approx(config["layerlock_rates"])
    assert loaded["rates"] == pytest.approx({"net/head/kernel": 2 * BASE, "net/head/bias": 2 * BASE})
    assert loaded["decays"] == config["layerlock_weight_decay"] == {
        "net/body/kernel": 0.01, "net/body/bias": 0.0, "net/head/kernel": 0.01, "net/head/bias": 0.0}


# -- refusals ---------------------------------------------------------------------------------------
class OwnStep(keras.optimizers.SGD):
    """An optimizer whose update path layerlock has not read."""

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        return super()._backend_update_step(grads, trainable_variables, learning_rate)


def not_keras3():
    yield "adam"
    yield object()
    if BACKEND == "jax":
        import optax

        yield optax.sgd(0.1)
    if BACKEND == "tensorflow":
        tf_keras = pytest.importorskip("tf_keras")
        yield tf_keras.optimizers.SGD(0.1)


def test_an_optimizer_that_cannot_carry_rates_is_refused_before_anything_changes():
    model = net()
    groups = llk.param_groups(model, BASE, lr_mult={"body": 0.5})
    for optimizer in not_keras3():
        with pytest.raises(ll.BackendError, match=f"takes a Keras 3 optimizer.*received .*{type(optimizer).__name__}"):
            llk.with_rates(optimizer, groups)
    optimizer = OwnStep(BASE)
    with pytest.raises(ll.BackendError, match="OwnStep.*_backend_update_step.*Nothing was changed"):
        llk.with_rates(optimizer, groups)
    assert type(optimizer) is OwnStep and not keras_internals.rates_of(optimizer)
    with pytest.raises(ll.BackendError, match="learning-rate schedule PolynomialDecay at step 0 is 0"):
        llk.with_rates(keras.optimizers.SGD(keras.optimizers.schedules.PolynomialDecay(0.0, 10, 1.0)), groups)

    optimizer = keras.optimizers.SGD(BASE)
    kind = type(optimizer)
    with pytest.raises(ll.SpecError, match=r"groups\[0\]\['lr'\]"):
        llk.with_rates(optimizer, [{"lr": -1.0, "params": groups[0]["params"]}])
    with pytest.raises(ll.SpecError, match="more than one group"):
        llk.with_rates(optimizer, groups + groups)
    assert type(optimizer) is kind and not keras_internals.rates_of(optimizer)


def test_two_variables_with_one_variable_path_are_named():
    def part():
        inp = keras.Input((3,))
        return keras.Model(inp, keras.layers.Dense(3, name="fc")(inp))

    first, second = part(), part()
    inp = keras.Input((3,))
    model = keras.Model(inp, second(first(inp)))
    assert first.weights[0].path == second.weights[0].path  # both "fc/kernel"
    with pytest.raises(ll.BackendError, match="'fc/kernel' is the path of .*fc.kernel and .*fc.kernel"):
        llk.param_groups(model, BASE)


def test_a_schedule_with_lr_and_an_optimizer_that_cannot_honour_it_raise_spec_error_before_anything_changes():
    x, y = data()
    model = net(OwnStep(BASE))
    before = weights(model)
    callback = llk.FreezeScheduler(ll.Schedule({0: ll.freeze("body"), 1: ll.unfreeze()}, lr={1: PHASE_LR}), log=None)
    with pytest.raises(ll.SpecError, match="phases an lr.*OwnStep"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    assert type(model.optimizer) is OwnStep
    assert all(np.array_equal(before[p], w) for p, w in weights(model).items())
    assert ll.plan(model, ll.Spec()).frozen == ()
    callback = llk.FreezeScheduler(ll.Schedule({0: ll.freeze("body")}), log=None)  # without lr it goes ahead
    callback.set_model(model)
    callback.on_train_begin()
    assert type(model.optimizer) is OwnStep


from .keras_backends import other_backends, test_the_same_tests_pass_on_the_torch_and_jax_keras_backends  # noqa: E402, F401
