"""ll.check on Keras: each finding is built for real, training is shown to go wrong, and check
names it; clean set-ups give an empty report. Runs on any Keras backend (KERAS_BACKEND); the
stale train function is a TensorFlow finding, and tf_keras has its own cases."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")

import layerlock as ll  # noqa: E402
import layerlock.keras as llk  # noqa: E402

on_tensorflow = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                   reason="Keras 3 fixes the trained set in a traced train function on TensorFlow only")
X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = np.random.default_rng(1).normal(size=(32, 1)).astype("float32")


def net(keras=keras):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="body"),
                             keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="head")])


def compiled(optimizer=None):
    model = net()
    model.compile(optimizer or keras.optimizers.SGD(0.1), "mse")
    return model


def fit(model, **kwargs):
    model.fit(X, Y, batch_size=8, verbose=0, shuffle=False, **kwargs)


def value(variable):
    return np.array(keras.ops.convert_to_numpy(variable))


def test_clean_setups_have_no_findings():
    model = compiled(keras.optimizers.Adam(0.01))
    assert not ll.check(model)  # compiled, optimizer not built yet
    ll.apply(model, ll.freeze("body"))
    fit(model)
    ll.apply(model, ll.unfreeze("body"))
    fit(model)
    ll.apply(model, ll.freeze("bn"))
    report = ll.check(model)
    assert not report and report.kinds == () and "no freezing problems" in str(report)


def unfrozen_by_hand_after_fit():
    model = compiled()
    model.get_layer("body").trainable = False
    fit(model)
    model.get_layer("body").trainable = True  # by hand: Keras neither extends the optimizer nor retraces
    return model


def test_an_optimizer_that_cannot_be_read_is_reported_as_not_checked():
    model = net()  # not compiled, no optimizer given
    report = ll.check(model)
    assert not report and report.not_checked == ("the optimizer (compile the model, or pass optimizer= to ll.check)",)
    assert str(report).startswith("layerlock.check: no freezing problems found in what was checked\nnot checked: ")
    model = compiled(keras.optimizers.Adam(0.01))  # compiled, the optimizer not built until the first step
    assert "not built yet" in ll.check(model).not_checked[0]
    fit(model)
    report = ll.check(model)
    assert report.not_checked == () and str(report) == "layerlock.check: no freezing problems found"


def test_unfrozen_by_hand_after_fit_is_not_in_the_optimizer_and_never_trains():
    model = unfrozen_by_hand_after_fit()
    kernel = value(model.get_layer("body").kernel)
    if keras.backend.backend() == "tensorflow":
        fit(model)
        assert np.array_equal(kernel, value(model.get_layer("body").kernel))  # silently never trains
    else:
        with pytest.raises(ValueError):  # torch: "Unknown variable"; JAX: optimizer variables 1:1
            fit(unfrozen_by_hand_after_fit())  # (a failed JAX fit leaves its model unusable)
    report = ll.check(model)
    found = report.findings[report.kinds.index("not-in-optimizer")]
    assert found.paths == ("body.kernel", "body.bias") and found.scalars == 20
    assert "sync_optimizer" in found.fix and "not-in-optimizer" in str(report)

    ll.apply(model, ll.Spec())  # what the fix says: bring the compiled model in step
    assert not ll.check(model)
    fit(model)
    assert not np.array_equal(kernel, value(model.get_layer("body").kernel))


@on_tensorflow
def test_frozen_by_hand_after_fit_still_trains_through_the_stale_train_function():
    model = compiled()  # SGD without momentum: no slots, so only the train function is stale
    fit(model)
    model.get_layer("body").trainable = False
    kernel = value(model.get_layer("body").kernel)
    fit(model)
    assert not np.array_equal(kernel, value(model.get_layer("body").kernel))  # "frozen", yet it trains
    report = ll.check(model)
    assert report.kinds == ("stale-train-function",)
    assert report.findings[0].paths == ("body.kernel", "body.bias") and report.findings[0].scalars == 20

    ll.apply(model, ll.Spec())
    assert not ll.check(model)
    kernel = value(model.get_layer("body").kernel)
    fit(model)
    assert np.array_equal(kernel, value(model.get_layer("body").kernel))


def test_frozen_variables_with_optimizer_slots_are_counted_in_bytes():
    model = net()
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)  # a custom loop's optimizer
    model.get_layer("body").trainable = False
    variables = model.trainable_variables
    optimizer.apply([keras.ops.ones(v.shape) for v in variables], variables)  # trains without body
    assert len(optimizer.variables) == 2 + 2 * 6  # yet Adam keeps body's two moments each
    report = ll.check(model, optimizer)
    assert report.kinds == ("frozen-optimizer-state",)
    assert report.findings[0].paths == ("body.kernel", "body.bias") and report.findings[0].bytes == 2 * 20 * 4

    llk.sync_optimizer(optimizer, model)
    assert not ll.check(model, optimizer) and len(optimizer.variables) == 2 + 2 * 4


def test_batchnorm_with_frozen_weights_but_its_flag_on_keeps_moving_its_statistics():
    model = compiled()
    bn = model.get_layer("bn")
    bn.gamma.trainable = bn.beta.trainable = False  # frozen variable by variable
    mean, gamma = value(bn.moving_mean), value(bn.gamma)
    fit(model)
    assert np.array_equal(gamma, value(bn.gamma)) and not np.array_equal(mean, value(bn.moving_mean))
    report = ll.check(model)
    assert report.kinds == ("norm-statistics-move",) and report.findings[0].paths == ("bn",)
    assert not ll.check(model, bn="trainable")  # statistics that adapt on purpose

    ll.apply(model, ll.freeze("bn"))
    assert not ll.check(model)
    mean = value(bn.moving_mean)
    fit(model)
    assert np.array_equal(mean, value(bn.moving_mean))


def test_batchnorm_frozen_with_its_layer_flag_runs_in_inference_mode_and_is_not_reported():
    model = net()
    model.get_layer("bn").trainable = False  # Keras 3: BatchNormalization updates only when trainable
    model.compile(keras.optimizers.SGD(0.1), "mse")
    mean = value(model.get_layer("bn").moving_mean)
    fit(model)
    assert np.array_equal(mean, value(model.get_layer("bn").moving_mean))
    assert not ll.check(model)


def test_freeze_scheduler_warns_once_with_the_report_when_training_starts():
    model = compiled()
    bn = model.get_layer("bn")
    bn.gamma.trainable = bn.beta.trainable = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, epochs=3, callbacks=[llk.FreezeScheduler(ll.Schedule({1: ll.freeze("body")}), log=None)])
    found = [str(w.message) for w in caught if issubclass(w.category, ll.LayerlockWarning)]
    assert len(found) == 1 and "norm-statistics-move" in found[0] and "layerlock.check" in found[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(compiled(), epochs=2, callbacks=[llk.FreezeScheduler(ll.gradual(2), log=None)])
    assert not [w for w in caught if issubclass(w.category, ll.LayerlockWarning)]


# -- tf_keras: the flags recorded at compile() --------------------------------------------------------
@pytest.fixture
def tf_keras():
    return pytest.importorskip("tf_keras")


def test_tf_keras_frozen_by_hand_after_compile_still_trains_and_check_names_it(tf_keras):
    model = net(tf_keras)
    model.compile(tf_keras.optimizers.SGD(0.1), "mse")
    model.get_layer("body").trainable = False  # tf_keras fit puts the compile-time flags back
    kernel = model.get_layer("body").kernel.numpy()
    fit(model)
    assert not np.array_equal(kernel, model.get_layer("body").kernel.numpy())
    report = ll.check(model)  # tf_keras SGD keeps a momentum slot per variable even at momentum 0
    assert report.kinds == ("stale-train-function", "frozen-optimizer-state")
    assert report.findings[0].paths == ("body.kernel", "body.bias")

    ll.apply(model, ll.Spec())
    assert not ll.check(model)
    kernel = model.get_layer("body").kernel.numpy()
    fit(model)
    assert np.array_equal(kernel, model.get_layer("body").kernel.numpy())


def test_tf_keras_batchnorm_switched_on_inside_a_frozen_parent_moves_its_statistics(tf_keras):
    inner = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(4, name="body"),
                                 tf_keras.layers.BatchNormalization(name="bn")], name="inner")
    model = tf_keras.Sequential([tf_keras.Input((4,)), inner, tf_keras.layers.Dense(1, name="head")])
    inner.trainable = False
    inner.get_layer("bn").trainable = True  # its weights stay hidden by the frozen parent
    model.compile(tf_keras.optimizers.SGD(0.1), "mse")
    bn = inner.get_layer("bn")
    mean = bn.moving_mean.numpy()
    fit(model)
    assert not np.array_equal(mean, bn.moving_mean.numpy())
    assert ll.check(model).kinds == ("norm-statistics-move",) and ll.check(model).findings[0].paths == ("inner.bn",)

    ll.apply(model, ll.freeze("inner"))
    assert not ll.check(model)
    mean = bn.moving_mean.numpy()
    fit(model)
    assert np.array_equal(mean, bn.moving_mean.numpy())


def test_tf_keras_optimizers_that_cannot_be_read_are_reported_as_not_checked(tf_keras):
    model = net(tf_keras)
    model.compile(tf_keras.optimizers.SGD(0.1), "mse")
    assert "not built yet" in ll.check(model).not_checked[0]
    fit(model)
    assert ll.check(model).not_checked == ()
    model = net(tf_keras)
    model.compile(tf_keras.optimizers.legacy.SGD(0.1), "mse")
    fit(model)
    report = ll.check(model)
    assert not report and "legacy tf_keras optimizer" in report.not_checked[0]
