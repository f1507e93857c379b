"""Real-fit scenarios for the Keras backend, shared by the in-process TensorFlow tests and a
subprocess per other Keras backend (``KERAS_BACKEND=torch python tests/keras_scenarios.py``).

Each scenario trains a small nested model (a Sequential holding a Functional model holding
Dense + BatchNormalization) and asserts which variables moved, bit for bit. Run as a script
it runs every scenario and prints ``PASS name`` / ``FAIL name: error`` lines.
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import layerlock as ll  # noqa: E402
from layerlock.backends.keras import KerasBackend  # noqa: E402

BASE = {"base.dense.kernel", "base.dense.bias", "base.bn.gamma", "base.bn.beta",
        "base.bn.moving_mean", "base.bn.moving_variance"}
HEAD = {"head.kernel", "head.bias"}


def nested_model(base_trainable: bool = True) -> keras.Model:
    """A Sequential holding a Functional model holding layers."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, name="dense")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    base = keras.Model(inp, h, name="base")
    base.trainable = base_trainable
    model = keras.Sequential([keras.Input((6,)), base, keras.layers.Dense(2, name="head")], name="net")
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")


def fit(model: keras.Model, epochs: int = 1, callbacks: list | None = None) -> None:
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks)


def all_weights(model: keras.Model) -> dict[str, object]:
    """Every weight by layerlock path, BatchNorm moving statistics included."""
    out = {}
    walk = KerasBackend().walk(model)
    for path, layer in dict(zip(walk.tree.layer_paths, walk.layers)).items():
        for v in layer._trainable_variables + layer._non_trainable_variables:
            out[f"{path}.{v.name}" if path else v.name] = v
    return out


def values(model: keras.Model) -> dict[str, np.ndarray]:
    return {k: np.array(keras.ops.convert_to_numpy(v)) for k, v in all_weights(model).items()}


def moved(model: keras.Model, before: dict[str, np.ndarray]) -> set[str]:
    now = values(model)
    return {k for k in before if not np.array_equal(before[k], now[k])}


def check_trainable_set(model: keras.Model, plan: ll.Plan) -> None:
    weights = all_weights(model)
    assert {id(weights[p]) for p in plan.trainable} == {id(v) for v in model.trainable_weights}


# -- scenarios: freeze / unfreeze x before fit / between fits / in a callback ----------------------
def freeze_before_fit() -> None:
    model = nested_model()
    check_trainable_set(model, ll.apply(model, ll.freeze("base")))
    before = values(model)
    fit(model)
    assert moved(model, before) == HEAD, moved(model, before)


def unfreeze_before_fit() -> None:
    model = nested_model(base_trainable=False)
    check_trainable_set(model, ll.apply(model, ll.unfreeze("base")))
    before = values(model)
    fit(model)
    assert moved(model, before) == BASE | HEAD, moved(model, before)


def freeze_between_fits() -> None:
    model = nested_model()
    fit(model)
    check_trainable_set(model, ll.apply(model, ll.freeze("base")))
    before = values(model)
    fit(model)
    x, y = data()
    model.train_on_batch(x[:8], y[:8])
    assert moved(model, before) == HEAD, moved(model, before)


def unfreeze_between_fits() -> None:
    """Unfreezing keeps the Adam state of what stays trainable and gives the new variables
    fresh slots; no slots exist for frozen variables."""
    model = nested_model()
    ll.apply(model, ll.freeze("base"))
    fit(model)
    opt = model.optimizer
    assert len(opt.variables) == 2 + 2 * len(HEAD)  # iterations, learning rate, m and v of the head
    head = all_weights(model)["head.kernel"]
    slots = (opt._momentums[opt._get_variable_index(head)], opt._velocities[opt._get_variable_index(head)])
    kept = [np.array(keras.ops.convert_to_numpy(s)) for s in slots]
    steps = int(keras.ops.convert_to_numpy(opt.iterations))
    check_trainable_set(model, ll.apply(model, ll.unfreeze()))
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == steps
    assert opt._momentums[opt._get_variable_index(head)] is slots[0]
    assert all(np.array_equal(k, keras.ops.convert_to_numpy(s)) for k, s in zip(kept, slots))
    assert len(opt.variables) == 2 + 2 * len(model.trainable_weights)
    before = values(model)
    fit(model)
    assert moved(model, before) == BASE | HEAD, moved(model, before)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == steps + 4


class ApplyAt(keras.callbacks.Callback):
    """Applies a spec when an epoch begins, recording the weights just before and after."""

    def __init__(self, epoch: int, spec: ll.Spec) -> None:
        super().__init__()
        self.epoch, self.spec = epoch, spec

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == self.epoch:
            self.before = values(self.model)
            check_trainable_set(self.model, ll.apply(self.model, self.spec))


def unfreeze_in_callback() -> None:
    model = nested_model()
    ll.apply(model, ll.freeze("base"))
    start = values(model)
    cb = ApplyAt(1, ll.unfreeze())
    fit(model, epochs=2, callbacks=[cb])
    assert moved(model, start) - moved(model, cb.before) == set()
    assert {k for k in start if not np.array_equal(start[k], cb.before[k])} == HEAD  # epoch 0
    assert moved(model, cb.before) == BASE | HEAD, moved(model, cb.before)           # epoch 1


def freeze_in_callback() -> None:
    model = nested_model()
    cb = ApplyAt(1, ll.freeze("base"))
    start = values(model)
    fit(model, epochs=2, callbacks=[cb])
    assert {k for k in start if not np.array_equal(start[k], cb.before[k])} == BASE | HEAD  # epoch 0
    assert moved(model, cb.before) == HEAD, moved(model, cb.before)                         # epoch 1


# -- BatchNorm policies ----------------------------------------------------------------------------
def bn_trainable_keeps_batchnorm_training() -> None:
    model = nested_model()
    plan = ll.apply(model, ll.freeze("base"), bn="trainable")
    check_trainable_set(model, plan)
    before = values(model)
    fit(model)
    assert moved(model, before) == BASE - {"base.dense.kernel", "base.dense.bias"} | HEAD


def bn_frozen_freezes_every_batchnorm() -> None:
    model = nested_model()
    plan = ll.apply(model, ll.unfreeze(), bn="frozen")
    check_trainable_set(model, plan)
    assert plan.held == ("base.bn",)
    before = values(model)
    fit(model)
    assert moved(model, before) == {"base.dense.kernel", "base.dense.bias"} | HEAD


def restore_brings_back_training_set() -> None:
    model = nested_model()
    fit(model)
    state = ll.snapshot(model)
    with ll.frozen(model, ll.freeze("base")):
        before = values(model)
        fit(model)
        assert moved(model, before) == HEAD
    assert ll.snapshot(model) == state
    before = values(model)
    fit(model)
    assert moved(model, before) == BASE | HEAD


SCENARIOS = {f.__name__: f for f in (
    freeze_before_fit, unfreeze_before_fit, freeze_between_fits, unfreeze_between_fits,
    freeze_in_callback, unfreeze_in_callback, bn_trainable_keeps_batchnorm_training,
    bn_frozen_freezes_every_batchnorm, restore_brings_back_training_set)}


def main() -> int:
    failed = 0
    print(f"keras {keras.__version__} backend={keras.backend.backend()}", flush=True)
    for name, scenario in SCENARIOS.items():
        try:
            scenario()
            print(f"PASS {name}", flush=True)
        except Exception as exc:  # report every scenario, then fail
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
