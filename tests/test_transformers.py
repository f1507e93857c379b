"""The Hugging Face Trainer callback drives a real Trainer.train() of a tiny BERT on CPU."""

import math

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")

import layerlock as ll  # noqa: E402
from layerlock.transformers import FreezeScheduler  # noqa: E402

from .trainer_ddp_worker import Data, bert  # noqa: E402  (the 2-process tests train the same BERT)

LR, HEAD_LR, WARMUP = 1e-2, 3e-3, 2
STEPS_PER_EPOCH = 4  # 32 examples, batch 8
TOP = ll.unfreeze("bert.encoder.layer.2", "bert.encoder.layer.3")
SCHEDULE = ll.Schedule({0: ll.freeze("bert"), 1: TOP, 2: ll.unfreeze()}, lr={1: HEAD_LR})
STEP_SCHEDULE = ll.Schedule({0: ll.freeze("bert"), 4: TOP, 8: ll.unfreeze()}, lr={4: HEAD_LR})


class Probe(transformers.TrainerCallback):
    """Records, per epoch, which tensors moved, and each step's group learning rates."""

    def __init__(self):
        self.moved, self.lrs, self.before = [], [], None

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self.moved.append({n for n, p in model.named_parameters() if not torch.equal(self.before[n], p)})

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs.append((state.global_step, [(g["lr"], len(g["params"])) for g in optimizer.param_groups]))


def trainer(model, tmp_path, callbacks, *, epochs=3, max_steps=-1, save=False, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=LR, weight_decay=0.1, warmup_steps=WARMUP, lr_scheduler_type=kw.pop("lr_scheduler_type", "linear"),
        save_strategy="steps" if save else "no", save_steps=kw.pop("save_steps", 2), report_to=[], use_cpu=True,
        seed=0, disable_tqdm=True, logging_strategy="no", **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=callbacks)


def names(model, *prefixes):
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def factor(step, total=12):
    return step / WARMUP if step < WARMUP else max(0.0, (total - step) / (total - WARMUP))


@pytest.mark.parametrize("unit, schedule", [("epoch", SCHEDULE), ("step", STEP_SCHEDULE)])
def test_trainer_schedule_freezes_unfreezes_and_follows_the_lr_schedule(tmp_path, unit, schedule):
    model, probe, lines = bert(), Probe(), []
    kwargs = {"max_steps": 12} if unit == "step" else {}
    t = trainer(model, tmp_path, [FreezeScheduler(schedule, unit=unit, log=lines.append), probe], **kwargs)
    t.train()

    head, top = names(model, "classifier"), names(model, "bert.encoder.layer.2.", "bert.encoder.layer.3.")
    assert probe.moved[0] == head  # everything else bit-identical in phase 1
    assert probe.moved[1] == head | top  # the top two blocks join at epoch / step 4
    assert probe.moved[2] == names(model, "")  # then all

    for step, groups in probe.lrs:
        trainer_groups, ours = groups[:2], groups[2:]
        assert [n for _, n in trainer_groups] == [1, 1]  # classifier weight (decay), bias (no decay)
        for lr, _ in trainer_groups:
            assert math.isclose(lr, LR * factor(step), rel_tol=1e-9, abs_tol=1e-15)
        expected = [] if step < 4 else [HEAD_LR] * 2 if step < 8 else [HEAD_LR] * 2 + [LR] * 2
        assert len(ours) == len(expected)
        for (lr, _), base in zip(ours, expected):
            assert math.isclose(lr, base * factor(step), rel_tol=1e-9, abs_tol=1e-15)

    transitions = [e for e in t.state.log_history if "layerlock" in e]
    assert [e["step"] for e in transitions] == [0, 4, 8]
    assert transitions[1]["layerlock"] == lines[1] and f"{unit} 4" in lines[1] if unit == "step" else "epoch 1" in lines[1]
    assert len(lines) == 3


class StopAt(transformers.TrainerCallback):
    """Interrupts a run after ``step`` (its checkpoint is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = state.global_step == self.step


@pytest.mark.parametrize("unit, schedule, stop", [("epoch", SCHEDULE, 6), ("epoch", SCHEDULE, 4), ("step", STEP_SCHEDULE, 6)])
def test_resume_after_a_transition_equals_an_uninterrupted_run(tmp_path, unit, schedule, stop):
    straight = bert()
    a = trainer(straight, tmp_path / "a", [FreezeScheduler(schedule, unit=unit, log=None)])
    a.train()

    # interrupted mid-epoch 1 (after the first transition), or at the end of epoch 0 (before it)
    trainer(bert(), tmp_path / "b", [FreezeScheduler(schedule, unit=unit, log=None), StopAt(stop)],
            save=True, save_steps=stop).train()
    resumed = bert(seed=5)  # other initial weights: everything must come from the checkpoint
    b = trainer(resumed, tmp_path / "b", [FreezeScheduler(schedule, unit=unit, log=None)])
    b.train(resume_from_checkpoint=str(tmp_path / "b" / f"checkpoint-{stop}"))

    for (n, x), (_, y) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(x, y), n
    layout = [[(g["lr"], g["weight_decay"], len(g["params"])) for g in t.optimizer.param_groups] for t in (a, b)]
    assert layout[0] == layout[1] and len(layout[0]) == 6
    transitions = [e["step"] for e in b.state.log_history if "layerlock" in e]
    assert transitions == [0, 4, 8]


def test_a_checkpoint_written_under_another_schedule_is_refused_before_any_phase_is_replayed(tmp_path):
    trainer(bert(), tmp_path, [FreezeScheduler(SCHEDULE, log=None), StopAt(6)], save=True, save_steps=6).train()
    other = ll.Schedule({0: ll.freeze("bert"), 2: ll.unfreeze()})  # the same first phase: the Trainer loads it
    model = bert()
    t = trainer(model, tmp_path, [FreezeScheduler(other, log=None)])
    with pytest.raises(ll.LayerlockError, match="another schedule"):
        t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert names(model, "") - {n for n, p in model.named_parameters() if not p.requires_grad} == names(model, "classifier")


def test_a_pattern_that_matches_nothing_fails_when_training_begins(tmp_path):
    t = trainer(bert(), tmp_path, [FreezeScheduler(ll.Schedule({0: ll.freeze("bert"), 1: ll.unfreeze("bert.encoder.layer.9")}))])
    with pytest.raises(ll.NoMatchError, match="bert.encoder.layer.9"):
        t.train()


def test_an_unsupported_scheduler_is_refused_naming_the_supported_ones(tmp_path):
    model = bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=12)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, report_to=[], use_cpu=True,
                                          per_device_train_batch_size=8, save_strategy="no")
    t = transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(optimizer, scheduler),
                             callbacks=[FreezeScheduler(SCHEDULE, log=None)])
    before = model.classifier.weight.detach().clone()
    with pytest.raises(ll.LayerlockError, match="OneCycleLR.*supported: LambdaLR"):
        t.train()
    assert torch.equal(before, model.classifier.weight)


@pytest.mark.parametrize("kind", ["cosine", "constant_with_warmup", "constant"])
def test_new_groups_follow_every_trainer_schedule(tmp_path, kind):
    probe = Probe()
    trainer(bert(), tmp_path, [FreezeScheduler(SCHEDULE, log=None), probe], lr_scheduler_type=kind).train()
    for step, groups in probe.lrs:
        factor_now = groups[0][0] / LR
        bases = [] if step < 4 else [HEAD_LR] * 2 if step < 8 else [HEAD_LR] * 2 + [LR] * 2
        assert len(groups) == 2 + len(bases)
        for (lr, _), base in zip(groups[2:], bases):
            assert math.isclose(lr, base * factor_now, rel_tol=1e-9, abs_tol=1e-15), (step, kind)


def test_accelerate_prepare_is_read_through(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    import layerlock.torch as llt

    model = bert()
    before = ll.plan(model, ll.freeze("bert").unfreeze("*.layer.3.*"))
    accelerator = accelerate.Accelerator(cpu=True)
    _ = ll.apply(model, ll.freeze("bert"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    prepared, opt, sched = accelerator.prepare(model, optimizer, scheduler)
    assert type(opt).__name__ == "AcceleratedOptimizer" and type(sched).__name__ == "AcceleratedScheduler"
    after = ll.plan(prepared, ll.freeze("bert").unfreeze("*.layer.3.*"))
    assert after.paths == before.paths and after.trainable == before.trainable

    def step():
        data = Data()
        loss = prepared(input_ids=data.ids[:8], labels=data.labels[:8]).loss
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()

    step()
    _ = ll.apply(prepared, ll.unfreeze("bert.encoder.layer.3"))
    top = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("bert.encoder.layer.3.")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("bert.embeddings.")}
    added = llt.sync_optimizer(opt, prepared, lr=1e-3, scheduler=sched)
    assert added == sorted(top, key=list(top).index)
    assert len(optimizer.param_groups) == 2 and len(scheduler.base_lrs) == 2  # the real ones
    step()
    assert all(not torch.equal(p, top[n]) for n, p in model.named_parameters() if n in top)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_lora_adapters_train_and_the_top_blocks_join_after_one_epoch(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
    # written against the base model's paths; the adapters and the head copy by their patterns
    schedule = ll.Schedule({0: ll.freeze().unfreeze("*lora_*", "*.modules_to_save.*"), 1: TOP})
    probe = Probe()
    trainer(model, tmp_path, [FreezeScheduler(schedule, log=None), probe], epochs=2).train()

    adapters = {n for n, _ in model.named_parameters() if "lora_" in n or ".modules_to_save." in n}
    top = {n for n, _ in model.named_parameters()
           if n.startswith(("base_model.model.bert.encoder.layer.2.", "base_model.model.bert.encoder.layer.3."))}
    assert probe.moved[0] == adapters  # the base model and classifier.original_module bit-identical
    assert probe.moved[1] == adapters | top


def test_several_processes_without_a_ddp_wrapper_refuse_a_schedule_that_unfreezes_later(tmp_path):
    """Outside a DDP Trainer (FSDP, DeepSpeed, or no Trainer to read the wrapper from), what
    joins later would not be all-reduced: refused before anything changes. The DDP case is
    tests/test_distributed_transformers.py."""
    from types import SimpleNamespace

    model = bert()
    callback = FreezeScheduler(SCHEDULE, log=None)
    state = transformers.TrainerState()
    with pytest.raises(ll.DistributedFreezeError, match="2 processes.*DistributedDataParallel"):
        callback.on_train_begin(SimpleNamespace(world_size=2), state, None, model=model,
                                optimizer=torch.optim.AdamW(model.parameters()), lr_scheduler=None)
    assert all(p.requires_grad for p in model.parameters())  # refused before changing anything
    freeze_only = FreezeScheduler(ll.Schedule({0: ll.freeze("bert.embeddings"), 1: ll.freeze("bert")}), log=None)
    plans = freeze_only.stepper.check(model)
    assert freeze_only._wrapper(SimpleNamespace(world_size=2), plans) is None  # nothing joins later: allowed
