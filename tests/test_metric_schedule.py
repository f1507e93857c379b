"""MetricSchedule and Plateau (issue 22): the values, their bad inputs, and the verdicts a
recorded metric sequence gives, without any framework."""

import math

import pytest

import layerlock as ll
from layerlock.stepper import PhaseStepper, PlateauTracker

from . import metric_table


def test_a_metric_schedule_round_trips_through_dict_json_and_yaml(tmp_path):
    s = ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="val_acc", mode="max", patience=1,
                          min_delta=0.5, min_epochs=2, max_epochs=4, restore_best=True, lr={1: 1e-4})
    assert ll.MetricSchedule.from_dict(s.to_dict()) == s
    assert ll.MetricSchedule.from_json(s.to_json()) == s
    s.save(tmp_path / "s.yaml")
    assert ll.MetricSchedule.load(tmp_path / "s.yaml") == s
    assert s.to_dict()["rule"] == {"monitor": "val_acc", "mode": "max", "patience": 1, "min_delta": 0.5,
                                   "min_epochs": 2, "max_epochs": 4, "restore_best": True}
    assert ll.MetricSchedule([ll.freeze()], ll.Plateau("loss")) == ll.MetricSchedule([ll.freeze()], monitor="loss")


@pytest.mark.parametrize("kwargs, says", [
    ({"mode": "lowest"}, "mode must be 'min'"),
    ({"patience": -1}, "patience must be an int >= 0"),
    ({"min_epochs": 3, "max_epochs": 2}, "max_epochs (2) is below min_epochs (3)"),
    ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
    ({"monitor": ""}, "monitor must be the name of a metric"),
    ({"restore_best": "yes"}, "restore_best must be True or False"),
])
def test_bad_rules_are_refused_with_what_was_received(kwargs, says):
    with pytest.raises(ll.SpecError, match="received|below") as exc:
        ll.MetricSchedule([ll.freeze()], **{"monitor": "loss", **kwargs})
    assert says in str(exc.value)


def test_bad_schedules_are_refused():
    with pytest.raises(ll.SpecError, match="list of specs"):
        ll.MetricSchedule(ll.freeze(), monitor="loss")
    with pytest.raises(ll.SpecError, match="lr given for phases \\[2\\]"):
        ll.MetricSchedule([ll.freeze(), ll.unfreeze()], monitor="loss", lr={2: 0.1})
    with pytest.raises(ll.SpecError, match="unknown keys \\['wait'\\]"):
        ll.MetricSchedule.from_dict({"phases": [{"spec": ll.freeze().to_dict()}], "rule": {"monitor": "x", "wait": 1}})


def test_the_recorded_sequence_gives_the_phases_of_the_table():
    tracker = PlateauTracker(metric_table.schedule("body", "head"))
    phases = []
    for epoch, value in enumerate(metric_table.VALUES):
        phases.append(tracker.schedule().phase_index(epoch))
        tracker.observe(epoch, {metric_table.MONITOR: value})
    assert phases == metric_table.PHASES and tracker.starts == metric_table.STARTS


def test_min_and_max_epochs_bound_each_phase_and_mode_max_looks_up():
    tracker = PlateauTracker(ll.MetricSchedule([ll.freeze(), ll.unfreeze(), ll.unfreeze()], monitor="acc",
                                               mode="max", patience=0, min_epochs=2, max_epochs=3))
    reasons = [tracker.observe(e, {"acc": v}).reason for e, v in enumerate([0.5, 0.4, 0.3, 0.6, 0.7, 0.8, 0.9])]
    assert tracker.starts == [0, 2, 5]
    assert reasons[1] == "acc did not improve on 0.5 (epoch 0) for 1 epoch"   # patience 0, after min_epochs 2
    assert reasons[4] == "the phase ran its max_epochs=3"


def test_a_nan_metric_counts_as_no_improvement_with_a_warning():
    tracker = PlateauTracker(ll.MetricSchedule([ll.freeze(), ll.unfreeze()], monitor="loss", patience=1))
    tracker.observe(0, {"loss": 1.0})
    with pytest.warns(ll.LayerlockWarning, match="loss = nan at epoch 1 is not finite"):
        verdict = tracker.observe(1, {"loss": math.nan})
    assert verdict.reason and tracker.starts == [0, 2]


def test_a_missing_monitor_names_the_metrics_there_are():
    tracker = PlateauTracker(ll.MetricSchedule([ll.freeze()], monitor="val_loss"))
    with pytest.raises(ll.SpecError, match=r"monitors 'val_loss', which the metrics do not have; they have \['loss'\]"):
        tracker.observe(0, {"loss": 1.0})


def test_the_stepper_logs_why_a_phase_began_and_its_state_resumes():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential()
    net.add_module("body", torch.nn.Linear(2, 2))
    net.add_module("head", torch.nn.Linear(2, 1))
    stepper = PhaseStepper(ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="loss", patience=1))
    assert [p.trainable_scalars for p in stepper.check(net)] == [3, 9]
    stepper.step(net, 0)
    stepper.observe(0, {"loss": 1.0})
    stepper.observe(1, {"loss": 1.0})
    change = stepper.step(net, 2)
    assert change.message.startswith("layerlock: epoch 2: loss did not improve on 1 (epoch 0) for 1 epoch: "
                                     "phase 2/2 Spec(unfreeze()): +6 / -0 trainable scalars")
    again = PhaseStepper(stepper.given)
    again.load(stepper.state_dict())
    again.replay(net, stepper.phase)
    assert again.phase == 1 and again.schedule == stepper.schedule


def test_min_and_max_epochs_may_differ_per_phase():
    s = ll.MetricSchedule([ll.freeze(), ll.unfreeze("a"), ll.unfreeze()], monitor="loss", patience=5,
                          min_epochs=[0, 1, 0], max_epochs=[2, 3, None])
    assert ll.MetricSchedule.from_dict(s.to_dict()) == s and s.to_dict()["rule"]["max_epochs"] == [2, 3, None]
    tracker = PlateauTracker(s)
    for epoch in range(8):
        tracker.observe(epoch, {"loss": 1.0 - 0.1 * epoch})   # always improving: max_epochs ends each phase
    assert tracker.starts == [0, 2, 5]
    with pytest.raises(ll.SpecError, match="max_epochs gives 2 values and the schedule has 3 phases"):
        ll.MetricSchedule(s.specs, monitor="loss", max_epochs=[2, 3])
    with pytest.raises(ll.SpecError, match=r"max_epochs \(1\) is below min_epochs \(2\) for phase 1"):
        ll.Plateau("loss", min_epochs=[0, 2], max_epochs=[2, 1])
