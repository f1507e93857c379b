"""A MetricSchedule drives the Hugging Face Trainer callback (issue 22): real Trainer.train()
runs of a tiny body/head model on CPU, fed the recorded metric sequence of
tests/metric_table.py at the Trainer's evaluations."""

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")

import layerlock as ll  # noqa: E402
from layerlock.transformers import FreezeScheduler  # noqa: E402

from . import metric_table  # noqa: E402

STEPS_PER_EPOCH = 4  # 32 examples, batch 8
EPOCHS = len(metric_table.VALUES)


class Tiny(torch.nn.Module):
    """A body and a head; the Trainer takes any module whose forward returns a loss."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x, labels=None):
        logits = self.head(self.body(x))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self, n=32, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.labels = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.labels[i]}


class Feed(transformers.TrainerCallback):
    """Placed before the FreezeScheduler: overwrites the evaluation's metrics (the dict the
    Trainer hands every callback) with the recorded sequence, one value per evaluation."""

    def __init__(self, every_steps=None):
        self.every_steps = every_steps

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        k = round(state.epoch) - 1 if self.every_steps is None else state.global_step // self.every_steps - 1
        metrics["eval_" + metric_table.MONITOR] = metric_table.VALUES[k]


class Probe(transformers.TrainerCallback):
    """Placed after the FreezeScheduler: the phase in force and the weights at each epoch's
    (or step's) start, the weights and optimizer state at each epoch's end, the tracker's
    state after each evaluation."""

    def __init__(self, callback):
        self.callback = callback
        self.phases, self.step_phases, self.begin, self.end, self.evals = [], [], [], [], []
        self.step_weights, self.resumed_with = [], None

    def on_train_begin(self, args, state, control, **kw):
        self.resumed_with = (self.callback.stepper.phase, self.callback.stepper.tracker.state_dict())

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        self.phases.append(self.callback.stepper.phase)
        self.begin.append(self._snapshot(model, optimizer, lr_scheduler))

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        self.end.append(self._snapshot(model, optimizer, lr_scheduler))

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.step_phases.append(self.callback.stepper.phase)
        self.step_weights.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_evaluate(self, args, state, control, **kw):
        self.evals.append(self.callback.stepper.tracker.state_dict())

    @staticmethod
    def _snapshot(model, optimizer, scheduler):
        head = model.head.weight
        moments = {k: v.clone() for k, v in optimizer.state.get(head, {}).items() if torch.is_tensor(v)}
        return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "head_state": moments,
                "lr_step": scheduler.scheduler.last_epoch if hasattr(scheduler, "scheduler") else scheduler.last_epoch}


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = state.global_step == self.step


def trainer(model, tmp_path, callbacks, *, eval_strategy="epoch", save_strategy="no", **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=kw.pop("epochs", EPOCHS), per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=1e-2, weight_decay=0.1, warmup_steps=2, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no", eval_strategy=eval_strategy,
        save_strategy=save_strategy, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Data(),
                                eval_dataset=None if eval_strategy == "no" else Data(16, seed=2), callbacks=callbacks)


def same(a, b, prefix=""):
    return all(torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))


def body(weights):
    return {n: w for n, w in weights.items() if n.startswith("body.")}


def test_the_schedule_paths_match_the_model():
    plans = FreezeScheduler(metric_table.schedule("body", "head"), log=None).stepper.check(Tiny())
    assert [p.trainable for p in plans[:2]] == [("head.weight", "head.bias"),
                                                 tuple(n for n, _ in Tiny().named_parameters())]


def test_the_recorded_metrics_give_the_table_s_phases_epoch_by_epoch(tmp_path):
    lines = []
    callback = FreezeScheduler(metric_table.schedule("body", "head"), log=lines.append)
    probe = Probe(callback)
    t = trainer(Tiny(), tmp_path, [Feed(), callback, probe])
    t.train()

    assert probe.phases == metric_table.PHASES
    assert callback.stepper.tracker.starts == metric_table.STARTS
    assert probe.evals[1]["best"] == 0.8  # the callback read the fed value, not the real loss
    for e in range(EPOCHS):  # the body is bit-identical while phase 0 freezes it, then moves
        still = same(body(probe.begin[e]["weights"]), body(probe.end[e]["weights"]))
        assert still == (metric_table.PHASES[e] == 0), e
        assert not same(probe.begin[e]["weights"], probe.end[e]["weights"], "head.")

    transitions = [e for e in t.state.log_history if "layerlock" in e]
    assert [e["step"] for e in transitions] == [s * STEPS_PER_EPOCH for s in metric_table.STARTS]
    assert [e["epoch"] for e in transitions] == [0, 4.0, 7.0]
    assert [e["layerlock"] for e in transitions] == lines
    assert lines[1].startswith("layerlock: epoch 4: val_loss did not improve by 0.01 on 0.8 (epoch 1) for 2 epochs: "
                               "phase 2/3")
    assert "on 0.7 (epoch 4) for 2 epochs: phase 3/3" in lines[2]


def test_step_evaluations_decide_and_the_next_phase_starts_at_the_next_step(tmp_path):
    callback = FreezeScheduler(metric_table.schedule("body", "head"), unit="step", log=None)
    probe = Probe(callback)
    t = trainer(Tiny(), tmp_path, [Feed(every_steps=2), callback, probe], eval_strategy="steps", eval_steps=2,
                max_steps=2 * EPOCHS)
    t.train()

    # evaluation k follows step 2k+2: the table's phase 1 begins after evaluation 3 (step 8),
    # phase 2 after evaluation 6 (step 14)
    assert callback.stepper.tracker.starts == [0, 8, 14]
    assert probe.step_phases == [0] * 8 + [1] * 6 + [2] * 6
    assert same(body(probe.step_weights[0]), body(probe.step_weights[8]))
    assert not same(body(probe.step_weights[8]), body(probe.step_weights[9]))
    assert [e["step"] for e in t.state.log_history if "layerlock" in e] == [0, 8, 14]


def test_without_evaluations_training_is_refused_before_the_first_step(tmp_path):
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(model, tmp_path, [FreezeScheduler(metric_table.schedule("body", "head"), log=None)],
                eval_strategy="no")
    with pytest.raises(ll.SpecError, match="eval_strategy='no'.*eval_strategy='epoch'.*eval_dataset"):
        t.train()
    assert t.state.global_step == 0
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen either
    assert same(before, dict(model.named_parameters()))


def test_a_missing_monitor_names_the_metrics_the_evaluation_has(tmp_path):
    schedule = ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="accuracy", patience=1)
    t = trainer(Tiny(), tmp_path, [FreezeScheduler(schedule, log=None)], epochs=1)
    with pytest.raises(ll.SpecError, match=r"monitors 'accuracy', read as 'eval_accuracy' \(or 'accuracy'\).*"
                                           r"have \['epoch', 'eval_loss', "):
        t.train()


def test_the_monitor_is_named_as_metric_for_best_model_is():
    def read(monitor, metrics):
        schedule = ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor=monitor)
        return FreezeScheduler(schedule, log=None)._monitored(metrics)

    assert read("loss", {"eval_loss": 0.5, "loss": 9.0}) == 0.5  # the Trainer's convention: eval_ is added
    assert read("eval_loss", {"eval_loss": 0.5}) == 0.5
    assert read("val_loss", {"val_loss": 0.25}) == 0.25  # a key the metrics have as is
    with pytest.raises(ll.SpecError, match=r"'eval_los'.*have \['eval_loss'\]"):
        read("eval_los", {"eval_loss": 0.5})


def test_restore_best_brings_back_the_best_evaluation_before_the_next_phase(tmp_path):
    lines = []
    callback = FreezeScheduler(metric_table.schedule("body", "head", restore_best=True), log=lines.append)
    probe = Probe(callback)
    trainer(Tiny(), tmp_path, [Feed(), callback, probe]).train()

    assert probe.phases == metric_table.PHASES
    # phase 0's best evaluation is epoch 1 (0.8); phase 1's is epoch 4 (0.7: 0.69 is not better by 0.01)
    for start, best in ((4, 1), (7, 4)):
        begin, kept, last = probe.begin[start], probe.end[best], probe.end[start - 1]
        assert same(begin["weights"], kept["weights"]) and not same(begin["weights"], last["weights"], "head.")
        assert begin["head_state"].keys() == kept["head_state"].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(begin["head_state"][k], kept["head_state"][k]) for k in kept["head_state"])
        assert begin["lr_step"] == kept["lr_step"] == last["lr_step"] - 2 * STEPS_PER_EPOCH  # the LR schedule too
    assert probe.begin[4]["lr_step"] == 2 * STEPS_PER_EPOCH
    assert "(epoch 1) for 2 epochs; best epoch restored: phase 2/3" in lines[1]
    assert "(epoch 4) for 2 epochs; best epoch restored: phase 3/3" in lines[2]


@pytest.mark.parametrize("stop, save", [(22, "steps"), (24, "epoch")])
def test_resume_continues_with_the_same_phase_wait_count_and_best_value(tmp_path, stop, save):
    """Interrupted in phase 1: mid-epoch 5 (a step checkpoint), or at the end of epoch 5 (an
    epoch checkpoint, written after that epoch's evaluation: wait count 1)."""
    straight, callback = Tiny(), FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    probe = Probe(callback)
    a = trainer(straight, tmp_path / "a", [Feed(), callback, probe])
    a.train()

    first = FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    trainer(Tiny(), tmp_path / "b", [Feed(), first, StopAt(stop)], save_strategy=save, save_steps=stop).train()
    resumed, again = Tiny(seed=5), FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    resumed_probe = Probe(again)
    b = trainer(resumed, tmp_path / "b", [Feed(), again, resumed_probe])
    b.train(resume_from_checkpoint=str(tmp_path / "b" / f"checkpoint-{stop}"))

    phase, tracker = resumed_probe.resumed_with
    evaluated = stop // STEPS_PER_EPOCH  # epochs evaluated before the checkpoint
    assert phase == 1 and tracker == probe.evals[evaluated - 1]
    assert tracker == {"starts": [0, 4], "best": 0.7, "best_epoch": 4, "wait": evaluated - 5,
                       "epochs": evaluated - 4}
    assert again.stepper.tracker.state_dict() == callback.stepper.tracker.state_dict()
    for (n, x), (_, y) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(x, y), n
    layout = [[(g["lr"], g["weight_decay"], len(g["params"])) for g in t.optimizer.param_groups] for t in (a, b)]
    assert layout[0] == layout[1]
    assert [e["step"] for e in b.state.log_history if "layerlock" in e] == [0, 16, 28]


def test_a_resumed_restore_best_run_warns_that_the_kept_copy_was_not_in_the_checkpoint(tmp_path):
    schedule = metric_table.schedule("body", "head", restore_best=True)
    trainer(Tiny(), tmp_path, [Feed(), FreezeScheduler(schedule, log=None), StopAt(22)], save_strategy="steps",
            save_steps=22).train()
    callback = FreezeScheduler(schedule, log=None)
    t = trainer(Tiny(), tmp_path, [Feed(), callback])
    with pytest.warns(ll.LayerlockWarning, match=r"not in the checkpoint.*val_loss = 0.7\b"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-22"))
    assert callback.stepper.tracker.starts == metric_table.STARTS  # the decisions go on as before
