"""A MetricSchedule inside Keras ``fit``: the recorded metric sequence (tests/metric_table.py)
fed as ``logs["val_loss"]`` walks the model through the same phases as in every framework,
with real AdamW steps; a missing monitor fails at the first epoch end; ``restore_best`` puts
the best epoch's weights and optimizer state back before the next phase; a run killed in
phase 1 and resumed through ``keras.callbacks.BackupAndRestore`` continues with the same
phase, wait count and best value and ends bit-identical to the uninterrupted run."""

import os
import warnings

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")
import numpy as np  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.keras as llk  # noqa: E402

from . import metric_table  # noqa: E402

EPOCHS = len(metric_table.VALUES)


class Kill(Exception):
    pass


def build():
    keras.utils.set_random_seed(0)
    lr = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=4, decay_rate=0.8)  # a function of iterations
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
                              keras.layers.Dense(2, name="head")], name="net")
    model.compile(keras.optimizers.AdamW(lr), "mse")
    return model


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")


def weights(model):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}


def slots(optimizer):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in optimizer.variables}


class Feed(keras.callbacks.Callback):
    """Before the FreezeScheduler: puts the recorded val_loss into logs, and keeps the
    weights and optimizer variables each epoch ended with (before the scheduler sees it)."""

    def __init__(self):
        super().__init__()
        self.ended = {}

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = metric_table.VALUES[epoch]
        self.ended[epoch] = (weights(self.model), slots(self.model.optimizer))


class Probe(keras.callbacks.Callback):
    """After the FreezeScheduler: the phase in force and the weights as each epoch begins
    (the phase applied), the weights as it ends, and the tracker's state after each verdict."""

    def __init__(self, scheduler, kill=None):
        super().__init__()
        self.scheduler, self.kill = scheduler, kill
        self.phases, self.begun, self.slots, self.done, self.tracked, self.states = {}, {}, {}, {}, {}, {}
        self.first_state = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.first_state is None:
            self.first_state = self.scheduler.stepper.tracker.state_dict()
        self.phases[epoch] = self.scheduler.phase
        self.begun[epoch], self.slots[epoch] = weights(self.model), slots(self.model.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.kill:
            raise Kill()

    def on_epoch_end(self, epoch, logs=None):
        self.done[epoch] = weights(self.model)
        self.tracked[epoch] = self.scheduler.stepper.tracker.state_dict()
        self.states[epoch] = self.scheduler.state_dict()


def fit(schedule, *, model=None, backup=None, kill=None, log=None, epochs=EPOCHS):
    """One fit with [Feed, FreezeScheduler, (BackupAndRestore), Probe]; (model, feed, scheduler, probe)."""
    model = model or build()
    feed, scheduler = Feed(), llk.FreezeScheduler(schedule, log=log)
    probe = Probe(scheduler, kill)
    backups = [] if backup is None else [keras.callbacks.BackupAndRestore(str(backup))]
    try:
        model.fit(*data(), batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[feed, scheduler, *backups, probe])
    except Kill:
        pass
    return model, feed, scheduler, probe


@pytest.fixture(scope="module")
def whole():
    """The uninterrupted runs, without and with restore_best: restore_best -> (fit(...), messages)."""
    runs = {}
    for restore_best in (False, True):
        messages = []
        runs[restore_best] = (fit(metric_table.schedule("body", "head", restore_best=restore_best),
                                  log=messages.append), messages)
    return runs


def test_the_recorded_metric_sequence_gives_the_table_phases_and_frozen_weights_stay_put(whole):
    (model, feed, scheduler, probe), messages = whole[False]
    assert [probe.phases[e] for e in range(EPOCHS)] == metric_table.PHASES
    assert scheduler.stepper.tracker.starts == metric_table.STARTS
    assert scheduler.stepper.schedule.phase_index(EPOCHS - 1) == 2
    body = ("net/body/kernel", "net/body/bias")
    for epoch, phase in enumerate(metric_table.PHASES):
        moved = {p for p in probe.begun[epoch] if not np.array_equal(probe.begun[epoch][p], probe.done[epoch][p])}
        # phase 0 freezes the body: bit-identical through its real AdamW steps; the head trains throughout
        assert moved == ({"net/head/kernel", "net/head/bias"} | (set(body) if phase > 0 else set())), epoch
    # each transition is logged with the values that decided it
    assert len(messages) == 3
    assert messages[1].startswith("layerlock: epoch 4: val_loss did not improve by 0.01 on 0.8 (epoch 1) for 2 "
                                  "epochs: phase 2/3 Spec(unfreeze('body.*')): +40 / -0"), messages[1]
    assert messages[2].startswith("layerlock: epoch 7: val_loss did not improve by 0.01 on 0.7 (epoch 4) for 2 "
                                  "epochs: phase 3/3"), messages[2]


def test_a_monitor_logs_lack_fails_at_the_first_epoch_end_naming_the_keys_it_has():
    model = build()
    scheduler = llk.FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    begun = []
    counter = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: begun.append(epoch))
    with pytest.raises(ll.SpecError, match=r"monitors 'val_loss', which the metrics do not have; they have \['loss'\]"):
        model.fit(*data(), batch_size=8, epochs=3, verbose=0, callbacks=[counter, scheduler])
    assert begun == [0]  # raised at the end of epoch 0


def test_restore_best_starts_each_next_phase_from_the_best_epochs_weights_and_optimizer_state(whole):
    (model, feed, scheduler, probe), messages = whole[True]
    assert [probe.phases[e] for e in range(EPOCHS)] == metric_table.PHASES
    iterations = model.optimizer.iterations.path
    for best, start, steps in [(1, 4, 8), (4, 7, 12)]:  # phase 0's best: epoch 1 (0.8); phase 1's: epoch 4 (0.7)
        kept_weights, kept_slots = feed.ended[best]
        assert probe.begun[start].keys() == kept_weights.keys()
        assert all(np.array_equal(probe.begun[start][p], kept_weights[p]) for p in kept_weights), start
        assert not all(np.array_equal(feed.ended[start - 1][0][p], kept_weights[p]) for p in kept_weights)
        # the optimizer's variables (moments, iterations: the LR schedule's position) are the best epoch's;
        # the phase change then added the newly trainable body's moments (phase 0 froze it)
        assert set(kept_slots) <= set(probe.slots[start]) and (start == 7 or set(kept_slots) < set(probe.slots[start]))
        assert all(np.array_equal(probe.slots[start][p], kept_slots[p]) for p in kept_slots), start
        assert int(probe.slots[start][iterations]) == int(kept_slots[iterations]) == steps
        assert int(feed.ended[start - 1][1][iterations]) == steps + 4 * (start - 1 - best)
    assert "; best epoch restored: phase 2/3" in messages[1] and "; best epoch restored: phase 3/3" in messages[2]


@pytest.mark.parametrize(("restore_best", "kill"), [(False, (6, 1)), (True, (5, 1))],
                         ids=["killed-in-epoch-6", "restore-best-killed-after-the-best-epoch"])
def test_a_run_killed_in_phase_1_resumes_through_backup_and_restore_with_the_same_tracker_and_result(
        tmp_path, whole, restore_best, kill):
    schedule = metric_table.schedule("body", "head", restore_best=restore_best)
    (reference, _, _, uninterrupted), _ = whole[restore_best]
    _, _, killed_scheduler, killed = fit(schedule, backup=tmp_path / "run", kill=kill)
    assert killed_scheduler.phase == 1 and max(killed.done) == kill[0] - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ll.LayerlockWarning)  # no restore_best warning: resumed right after it
        resumed, _, scheduler, probe = fit(schedule, backup=tmp_path / "run")
    assert min(probe.phases) == kill[0]  # BackupAndRestore resumed after the last completed epoch
    # the same phase, wait count and best value as the uninterrupted run at that point
    assert probe.first_state == uninterrupted.tracked[kill[0] - 1]
    assert probe.first_state["wait"] == (1 if kill[0] == 6 else 0) and probe.first_state["best"] == 0.7
    assert [probe.phases[e] for e in range(kill[0], EPOCHS)] == metric_table.PHASES[kill[0]:]
    assert scheduler.stepper.tracker.state_dict() == uninterrupted.tracked[EPOCHS - 1]
    final, expected = weights(resumed), weights(reference)
    assert all(np.array_equal(final[p], expected[p]) for p in expected)


def test_restore_best_warns_when_a_run_resumes_past_the_best_epoch(whole):
    (_, _, _, probe), _ = whole[True]
    scheduler = llk.FreezeScheduler(metric_table.schedule("body", "head", restore_best=True), log=None)
    scheduler.set_model(build())
    with pytest.warns(ll.LayerlockWarning, match=r"resumes after it \(epoch 4, resumed after epoch 5\)"):
        scheduler.load_state_dict(probe.states[5])  # the end of epoch 5; the phase's best was epoch 4


def test_a_backup_before_a_metric_schedule_is_refused_before_anything_changes(tmp_path):
    model = build()
    before = weights(model)
    scheduler = llk.FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    with pytest.raises(ll.SpecError, match=r"must come before keras.callbacks.BackupAndRestore"):
        model.fit(*data(), epochs=1, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "b")), scheduler])
    assert all(v.trainable for v in model.weights) and weights(model).keys() == before.keys()
    assert all(np.array_equal(weights(model)[p], before[p]) for p in before)


def test_state_dict_carries_the_tracker_and_load_state_dict_brings_it_back(whole):
    (_, _, _, probe), _ = whole[False]
    saved = probe.states[5]
    assert saved["plateau"] == probe.tracked[5] == {"starts": [0, 4], "best": 0.7, "best_epoch": 4, "wait": 1,
                                                    "epochs": 2}
    assert saved["phase"] == 1 and saved["epoch"] == 5
    again = llk.FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    again.set_model(build())
    again.load_state_dict(saved)
    assert again.stepper.tracker.state_dict() == saved["plateau"] and again.phase == 1
    assert ll.plan(again.model, ll.Spec()).trainable == ("body.kernel", "body.bias", "head.kernel", "head.bias")


def test_a_phase_lr_is_the_rate_of_what_the_phase_makes_trainable():
    model = build()
    model.optimizer.build(model.trainable_variables)
    messages = []
    scheduler = llk.FreezeScheduler(metric_table.schedule("body", "head", lr={1: 0.003}), log=messages.append)
    scheduler.set_model(model)
    scheduler.on_train_begin()
    for epoch in range(4):  # what fit does, with the table's values
        scheduler.on_epoch_begin(epoch)
        scheduler.on_epoch_end(epoch, {"loss": 1.0, "val_loss": metric_table.VALUES[epoch]})
    scheduler.on_epoch_begin(4)
    assert type(model.optimizer).__name__ == "RatedAdamW" and messages[-1].endswith("optimizer +2 variables at lr 0.003")
    rates = model.optimizer.get_config()["layerlock_rates"]
    assert rates["net/body/kernel"] == pytest.approx(0.003) and rates["net/body/bias"] == pytest.approx(0.003)
    assert "net/head/kernel" not in rates


def test_a_phase_lr_with_an_optimizer_that_cannot_carry_rates_fails_when_training_begins():
    class Odd(keras.optimizers.Adam):
        def _backend_update_step(self, grads, trainable_variables, learning_rate):  # a step layerlock has not read
            return super()._backend_update_step(grads, trainable_variables, learning_rate)

    model = build()
    model.compile(Odd(0.01), "mse")
    scheduler = llk.FreezeScheduler(metric_table.schedule("body", "head", lr={1: 0.003}), log=None)
    scheduler.set_model(model)
    with pytest.raises(ll.SpecError, match="cannot train variables at rates of their own"):
        scheduler.on_train_begin()
    assert type(model.optimizer) is Odd


def test_a_state_without_readable_tracker_state_is_refused_before_the_model_changes(whole):
    (_, _, _, probe), _ = whole[False]
    scheduler = llk.FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    model = build()
    scheduler.set_model(model)
    with pytest.raises(ll.LayerlockError, match="does not fit its metric schedule.s phase starts"):
        scheduler.load_state_dict({**probe.states[5], "plateau": {"starts": "0,4"}})
    assert all(v.trainable for v in model.weights) and scheduler.phase == -1
