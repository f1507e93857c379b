"""Training workflow in Keras: the FreezeScheduler callback and resuming a schedule."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
import numpy as np  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.keras as llk  # noqa: E402


def blocks_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,))] + [keras.layers.Dense(6, name=f"b{i}") for i in range(4)]
                             + [keras.layers.Dense(3, name="head")])
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, size=(32,))


class Moves(keras.callbacks.Callback):
    """Records which layers' weights changed in each epoch."""

    def __init__(self):
        super().__init__()
        self.history = []

    def on_epoch_begin(self, epoch, logs=None):
        self.before = {l.name: [w.numpy().copy() for w in l.weights] for l in self.model.layers}

    def on_epoch_end(self, epoch, logs=None):
        self.history.append(sorted(l.name for l in self.model.layers
                                   if any(not np.array_equal(a, w.numpy()) for a, w in zip(self.before[l.name], l.weights))))


def test_gradual_schedule_in_fit_moves_one_more_block_each_epoch(capsys):
    model = blocks_model()
    moves = Moves()
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=5, verbose=0, shuffle=False,
              callbacks=[llk.FreezeScheduler(ll.gradual(5, lr=1e-2, lr_decay=0.5)), moves])
    assert moves.history == [["head"], ["b3", "head"], ["b2", "b3", "head"], ["b1", "b2", "b3", "head"],
                             ["b0", "b1", "b2", "b3", "head"]]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[2].startswith("layerlock: epoch 2: phase 3/5") and "lr 0.0025" in lines[2]
    # each block trains at its phase's rate; the optimizer's own rate (the head's) is unchanged
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(1e-2)
    assert block_rates(model.optimizer) == pytest.approx(
        {f"b{i}/{n}": 1e-2 * 0.5 ** (4 - i) for i in range(4) for n in ("kernel", "bias")})


def block_rates(optimizer):
    """Variable path (without the model's name) -> the rate layerlock gave it."""
    return {p.split("/", 1)[1]: r for p, r in optimizer.get_config()["layerlock_rates"].items()}


def test_schedule_with_a_typo_fails_before_the_first_step():
    model = blocks_model()
    before = [w.numpy().copy() for w in model.weights]
    x, y = data()
    with pytest.raises(ll.NoMatchError, match="b3"):
        model.fit(x, y, epochs=2, verbose=0,
                  callbacks=[llk.FreezeScheduler(ll.Schedule({0: ll.freeze(depth=-1), 1: ll.unfreeze("b33")}))])
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))


def test_resuming_with_initial_epoch_matches_an_uninterrupted_run(tmp_path):
    x, y = data()
    schedule = ll.gradual(5)
    straight = blocks_model()
    straight.fit(x, y, batch_size=8, epochs=4, verbose=0, shuffle=False,
                 callbacks=[llk.FreezeScheduler(schedule, log=None)])
    first = blocks_model()
    first.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[llk.FreezeScheduler(schedule, log=None)])
    first.save(tmp_path / "mid.keras")
    resumed = keras.models.load_model(tmp_path / "mid.keras")
    resumed.fit(x, y, batch_size=8, epochs=4, initial_epoch=2, verbose=0, shuffle=False,
                callbacks=[llk.FreezeScheduler(schedule, log=None)])
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_resuming_from_state_dict_brings_the_phase_back_before_fit_and_matches_an_uninterrupted_run(tmp_path):
    import json

    x, y = data()
    schedule = ll.gradual(5, lr=1e-2, lr_decay=0.5)
    straight = blocks_model()
    straight.fit(x, y, batch_size=8, epochs=4, verbose=0, shuffle=False,
                 callbacks=[llk.FreezeScheduler(schedule, log=None)])
    first, callback = blocks_model(), llk.FreezeScheduler(schedule, log=None)
    first.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[callback])
    first.save(tmp_path / "mid.keras")
    saved = json.loads(json.dumps(callback.state_dict()))            # travels as JSON next to the checkpoint
    assert (saved["epoch"], saved["phase"]) == (1, 1)

    resumed = keras.models.load_model(tmp_path / "mid.keras")
    callback = llk.FreezeScheduler(schedule, log=None)
    callback.set_model(resumed)
    callback.load_state_dict(saved)
    assert ll.plan(resumed, ll.Spec()).trainable == ll.plan(first, ll.Spec()).trainable  # the phase, before fit
    resumed.fit(x, y, batch_size=8, epochs=4, initial_epoch=saved["epoch"] + 1, verbose=0, shuffle=False,
                callbacks=[callback])
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_load_state_dict_gives_the_replayed_phases_rates_like_initial_epoch():
    schedule = ll.gradual(3, lr=1e-2, lr_decay=0.5)
    model = blocks_model()
    callback = llk.FreezeScheduler(schedule, log=None)
    callback.set_model(model)
    callback.load_state_dict({**callback.state_dict(), "epoch": 2, "phase": 2})
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(1e-2)
    assert block_rates(model.optimizer) == pytest.approx(
        {"b3/kernel": 5e-3, "b3/bias": 5e-3, "b2/kernel": 2.5e-3, "b2/bias": 2.5e-3})
    assert callback.phase == 2


def test_load_state_dict_refuses_another_schedule_or_structure_before_anything_changes():
    model = blocks_model()
    callback = llk.FreezeScheduler(ll.gradual(3), log=None)
    with pytest.raises(ll.LayerlockError, match="set_model"):
        callback.state_dict()
    callback.set_model(model)
    saved = {**callback.state_dict(), "epoch": 0, "phase": 0}
    state = ll.snapshot(model)
    other = llk.FreezeScheduler(ll.gradual(2), log=None)
    other.set_model(model)
    with pytest.raises(ll.LayerlockError, match="another schedule"):
        other.load_state_dict(saved)
    wider = keras.Sequential([keras.Input((6,)), keras.layers.Dense(7, name="b0"), keras.layers.Dense(3, name="head")])
    elsewhere = llk.FreezeScheduler(ll.gradual(3), log=None)
    elsewhere.set_model(wider)
    with pytest.raises(ll.LayerlockError, match="another structure"):
        elsewhere.load_state_dict(saved)
    with pytest.raises(ll.LayerlockError, match="not a FreezeScheduler state"):
        callback.load_state_dict({"epoch": 0})
    assert ll.snapshot(model) == state


def test_verbose_still_works_for_one_release_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="log=None"):
        assert llk.FreezeScheduler(ll.gradual(2), verbose=0).log is None
    with pytest.warns(DeprecationWarning):
        assert llk.FreezeScheduler(ll.gradual(2), verbose=1).log is print
    with pytest.raises(ll.SpecError, match="not both"):
        llk.FreezeScheduler(ll.gradual(2), log=None, verbose=0)
    with pytest.raises(ll.SpecError, match="log must be a callable"):
        llk.FreezeScheduler(ll.gradual(2), log=0)


def test_the_same_schedule_tests_pass_on_the_torch_keras_backend():
    """Run this file again with KERAS_BACKEND=torch (Keras picks its backend at import)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("already running on another Keras backend")
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not torch_keras_backend"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_sync_optimizer_in_a_custom_loop_adds_unfrozen_variables_and_keeps_adam_state():
    model = blocks_model()
    ll.apply(model, ll.freeze().unfreeze("head"))
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)

    def step():  # a custom loop's update, with a constant gradient (backend-neutral)
        variables = model.trainable_variables
        optimizer.apply([keras.ops.ones(v.shape, v.dtype) for v in variables], variables)

    step()
    moments = {id(v): np.array(optimizer.variables[i].numpy()) for i, v in enumerate(optimizer.variables)}
    ll.apply(model, ll.freeze().unfreeze("head", "b3"))
    assert llk.sync_optimizer(optimizer, model) == ["b3.kernel", "b3.bias"]
    assert llk.sync_optimizer(optimizer, model) == []
    kept = [v for v in optimizer.variables if id(v) in moments]
    assert kept and all(np.array_equal(moments[id(v)], v.numpy()) for v in kept)  # same slots, same state
    frozen = [w.numpy().copy() for w in model.get_layer("b0").weights]
    b3 = [w.numpy().copy() for w in model.get_layer("b3").weights]
    step()
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(frozen, model.get_layer("b0").weights))
    assert all(not np.array_equal(a, w.numpy()) for a, w in zip(b3, model.get_layer("b3").weights))
    assert int(optimizer.iterations.numpy()) == 2
