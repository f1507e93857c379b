"""Keras on tf.distribute.MirroredStrategy over two logical CPU devices (run as a script in
its own process: logical devices must be configured before TensorFlow starts)."""

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import layerlock as ll  # noqa: E402


def build(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="body"),
                                  keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2, name="head")])
        model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def values(model):
    return {f"{l.name}.{w.name}": w.numpy().copy() for l in model.layers for w in l.weights}


def moved(before, after):
    return sorted(k for k in before if not np.array_equal(before[k], after[k]))


def fit(model):
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 2)).astype("float32"),
              batch_size=8, epochs=1, verbose=0, shuffle=False)


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    results = {}
    for where in ("outside", "inside"):
        model = build(strategy)
        fit(model)
        scope = strategy.scope if where == "inside" else contextlib.nullcontext
        with scope():
            ll.apply(model, ll.freeze("body", "bn"))
        before = values(model)
        fit(model)
        m1 = moved(before, values(model))
        iterations = int(model.optimizer.iterations.numpy())
        with scope():
            ll.apply(model, ll.unfreeze())
        before = values(model)
        fit(model)
        m2 = moved(before, values(model))
        results[where] = (m1, m2, int(model.optimizer.iterations.numpy()) - iterations)
    expect_freeze = ["head.bias", "head.kernel"]
    expect_unfreeze = sorted(["body.kernel", "body.bias", "bn.gamma", "bn.beta", "bn.moving_mean",
                              "bn.moving_variance", "head.kernel", "head.bias"])
    ok = True
    for where, (m1, m2, steps) in results.items():
        good = m1 == expect_freeze and m2 == expect_unfreeze and steps == 4
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} apply {where} scope: frozen fit moved {m1}; "
              f"after unfreeze moved {m2}; optimizer steps +{steps}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
