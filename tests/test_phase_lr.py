"""A phase's ``lr`` has one meaning in the torch loop, Lightning and the Hugging Face Trainer:
what the phase makes trainable trains at ``lr``, what was already training keeps its own rate,
under an LR schedule the new parameters follow the schedule's factor from their base rate
``lr``, and without ``lr`` they take the optimizer's base rate. ``param_groups`` rates are
checked the same way: one SGD step moves each parameter by its rate times its gradient.

The models are float64, so that an SGD step's movement divided by the gradient gives the rate
to well within the 1e-5 tolerance."""

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.torch as llt  # noqa: E402

BASE, PHASE_LR = 1e-2, 1e-3
RTOL = 1e-5


def schedule(lr=PHASE_LR, at=1):
    return ll.Schedule({0: ll.freeze("body"), at: ll.unfreeze()}, lr={at: lr} if lr is not None else None)


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.double()

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.body(x)))
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_moves_scale(moved, reference, expected):
    """Each parameter's movement is ``expected[layer]`` times the reference run's (SGD: rate x grad)."""
    for name, delta in moved.items():
        factor = expected[name.split(".")[0]]
        assert delta.abs().max() > 0, name
        torch.testing.assert_close(delta, factor * reference[name], rtol=RTOL, atol=0, msg=name)


EXPECTED = {"body": PHASE_LR / BASE, "head": 1.0}


# -- the torch loop --------------------------------------------------------------------------------

def loop_step_after_the_change(lr, *, build="all", epochs=2):
    """Train ``epochs`` epochs of one fixed batch under ``schedule(lr)``; the last epoch's movement."""
    model = Net()
    x, y = batch()
    if build == "trainable":  # the optimizer built from the first phase's trainable parameters
        ll.apply(model, ll.freeze("body"))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=BASE)
    elif build == "named":  # every parameter, named (torch keeps their names in the groups)
        optimizer = torch.optim.SGD(llt.param_groups(model, BASE), lr=BASE)
    else:  # the usual torch idiom: every parameter
        optimizer = torch.optim.SGD(model.parameters(), lr=BASE)
    freezer = llt.FreezeScheduler(schedule(lr), model, optimizer, log=None)
    for epoch in range(epochs):
        freezer.step(epoch)
        before = values(model)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {n: p - before[n] for n, p in values(model).items()}


@pytest.mark.parametrize("build", ["all", "named", "trainable"])
def test_torch_loop_phase_lr_is_the_rate_of_what_the_phase_unfreezes(build):
    assert_moves_scale(loop_step_after_the_change(PHASE_LR, build=build),
                       loop_step_after_the_change(None, build=build), EXPECTED)


def test_a_phase_lr_moves_what_it_unfreezes_to_a_group_of_its_own_with_its_state_and_names():
    model = Net()
    optimizer = torch.optim.SGD(llt.param_groups(model, BASE), lr=BASE, momentum=0.9)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # every parameter has momentum now
    momentum = optimizer.state[model.body.weight]["momentum_buffer"].clone()
    freezer = llt.FreezeScheduler(schedule(), model, optimizer, log=None)
    freezer.step(0)
    assert optimizer.param_groups[0]["param_names"] == ["body.weight", "body.bias", "head.weight", "head.bias"]
    freezer.step(1)
    assert optimizer.param_groups[0]["param_names"] == ["head.weight", "head.bias"]
    assert optimizer.param_groups[1]["param_names"] == ["body.weight", "body.bias"]
    assert optimizer.param_groups[1]["lr"] == PHASE_LR
    assert torch.equal(optimizer.state[model.body.weight]["momentum_buffer"], momentum)
    optimizer.load_state_dict(optimizer.state_dict())  # names and tensors still line up


def test_without_a_phase_lr_what_the_optimizer_holds_keeps_its_group():
    model = Net()
    optimizer = torch.optim.SGD(llt.param_groups(model, BASE, lr_mult={"body": 0.5}), lr=BASE)
    freezer = llt.FreezeScheduler(schedule(None), model, optimizer, log=None)
    freezer.step(0)
    freezer.step(1)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("lr_mult[body]", BASE * 0.5), ("default", BASE)]


def loop_rates(lr, optimizer_lr, steps=6, at=2):
    """Group rates after each step of a loop whose LambdaLR (stepped per step) is passed to the
    FreezeScheduler; the optimizer holds the first phase's trainable parameters."""
    model = Net()
    ll.apply(model, ll.freeze("body"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, **({} if optimizer_lr is None else {"lr": optimizer_lr}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    freezer = llt.FreezeScheduler(schedule(lr, at=at), model, optimizer, scheduler=scheduler, log=None)
    x, y = batch()
    seen = []
    for step in range(steps):
        freezer.step(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        seen.append([(g["lr"], g["initial_lr"]) for g in optimizer.param_groups])
    return optimizer, seen


def test_torch_loop_new_group_follows_a_lambda_lr_from_the_phase_lr():
    _, seen = loop_rates(PHASE_LR, BASE)
    for step, groups in enumerate(seen):
        (lr0, initial0), *ours = groups
        factor = lr0 / initial0
        assert math.isclose(factor, 1.0 / (2 + step), rel_tol=1e-12)
        assert len(ours) == (1 if step >= 2 else 0)
        for lr, initial in ours:
            assert math.isclose(initial, PHASE_LR, rel_tol=1e-12)
            assert math.isclose(lr, PHASE_LR * factor, rel_tol=1e-12), step


@pytest.mark.parametrize("optimizer_lr", [BASE, None], ids=["given", "torch-default"])
def test_torch_loop_without_phase_lr_new_parameters_take_the_optimizers_base_rate(optimizer_lr):
    optimizer, seen = loop_rates(None, optimizer_lr)
    base = optimizer.defaults["lr"]
    assert base == (optimizer_lr or 1e-3)  # torch's SGD default
    for groups in seen[2:]:
        (lr0, initial0), (lr, initial) = groups
        assert math.isclose(initial, base, rel_tol=1e-12) and math.isclose(lr, base * lr0 / initial0, rel_tol=1e-12)


def test_torch_loop_without_a_scheduler_new_parameters_take_the_optimizers_default_lr():
    model = Net()
    ll.apply(model, ll.freeze("body"))
    optimizer = torch.optim.SGD(llt.param_groups(model, 5e-3))  # the head at 5e-3, torch's default 1e-3
    freezer = llt.FreezeScheduler(schedule(None), model, optimizer, log=None)
    freezer.step(0), freezer.step(1)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-3, optimizer.defaults["lr"]] == [5e-3, 1e-3]


def loop_run(epochs, interrupt_at=None):
    """Momentum SGD over every parameter with a LambdaLR; optionally interrupted and resumed."""
    def fresh():
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=BASE, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 ** e)
        return model, optimizer, scheduler, llt.FreezeScheduler(schedule(at=2), model, optimizer,
                                                                scheduler=scheduler, log=None)

    model, optimizer, scheduler, freezer = fresh()
    x, y = batch()
    for epoch in range(epochs):
        if epoch == interrupt_at:
            saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "freezer": freezer.state_dict()}
            model, optimizer, scheduler, freezer = fresh()
            model.load_state_dict(saved["model"])
            freezer.load_state_dict(saved["freezer"])  # before the optimizer: replays the phases
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        freezer.step(epoch)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    return values(model), [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups]


def test_torch_loop_resume_after_the_phase_change_is_bit_identical():
    straight, rates = loop_run(5)
    resumed, resumed_rates = loop_run(5, interrupt_at=3)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    assert rates == resumed_rates and rates[1] == (PHASE_LR * 0.5 ** 5, PHASE_LR)


# -- Lightning -------------------------------------------------------------------------------------

def lightning():
    return pytest.importorskip("lightning.pytorch")


def lightning_run(lr, *, epochs=2, scheduler=None, tmp_path=None):
    pl = lightning()
    from layerlock.lightning import FreezeScheduler

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()
            self.moved, self.rates = None, []

        def training_step(self, data, _):
            return self.net(*data)["loss"]

        def on_train_batch_start(self, *_):
            self.before = values(self.net)
            self.rates.append([(g["lr"], g.get("initial_lr")) for g in self.optimizers().param_groups])

        def on_train_batch_end(self, *_):
            self.moved = {n: p - self.before[n] for n, p in values(self.net).items()}

        def configure_optimizers(self):  # the usual Lightning idiom: every parameter, at BASE
            optimizer = torch.optim.SGD(self.parameters(), lr=BASE)
            if scheduler is None:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": scheduler(optimizer)}

    x, y = batch()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    module = Module()
    net_schedule = ll.Schedule({0: ll.freeze("net.body"), 1: ll.unfreeze()}, lr={1: lr} if lr else None)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", precision="64-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[FreezeScheduler(net_schedule, log=None)], default_root_dir=tmp_path)
    trainer.fit(module, data)
    return module


def test_lightning_phase_lr_is_the_rate_of_what_the_phase_unfreezes(tmp_path):
    with_lr, without = lightning_run(PHASE_LR, tmp_path=tmp_path), lightning_run(None, tmp_path=tmp_path)
    assert_moves_scale(with_lr.moved, without.moved, EXPECTED)


@pytest.mark.parametrize("lr", [PHASE_LR, None], ids=["phase-lr", "no-lr"])
def test_lightning_new_group_follows_a_linear_lr_from_its_base_rate(tmp_path, lr):
    def linear(optimizer):
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.25, total_iters=4)

    module = lightning_run(lr, epochs=4, scheduler=linear, tmp_path=tmp_path)
    base = lr or BASE  # the optimizer's base rate
    assert len(module.rates) == 4  # one batch per epoch
    for epoch, groups in enumerate(module.rates):
        (lr0, initial0), *ours = groups
        factor = 1.0 - 0.75 * epoch / 4  # LinearLR steps at the end of each epoch
        assert math.isclose(lr0 / initial0, factor, rel_tol=1e-12)
        # the optimizer holds every parameter: a phase lr moves the body to a group of its own,
        # and without one the body stays in its group, at the base rate times the factor
        assert len(ours) == (1 if epoch >= 1 and lr else 0)
        for rate, initial in ours:
            assert math.isclose(initial, base, rel_tol=1e-12)
            assert math.isclose(rate, base * factor, rel_tol=1e-12), epoch


# -- the Hugging Face Trainer ----------------------------------------------------------------------

def transformers():
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


def hf_run(lr, tmp_path, *, lr_scheduler_type="constant", max_steps=3, optimizer="trainer"):
    tf = transformers()
    from layerlock.transformers import FreezeScheduler

    x, y = batch(8)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    class Probe(tf.TrainerCallback):
        def __init__(self):
            self.moved, self.rates = {}, []

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            self.before = values(model)
            self.rates.append((state.global_step, [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups]))

        def on_step_end(self, args, state, control, model=None, **kw):
            self.moved[state.global_step - 1] = {n: p - self.before[n] for n, p in values(model).items()}

    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, optim="sgd",
        learning_rate=BASE, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type=lr_scheduler_type,
        warmup_steps=0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        seed=0)
    probe, model = Probe(), Net()
    # the Trainer's own SGD (optim="sgd"), or one passed in over every parameter, named
    given = (None, None)
    if optimizer == "param_groups":
        given = (torch.optim.SGD(llt.param_groups(model, BASE), lr=BASE), None)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Data(), optimizers=given,
                         callbacks=[FreezeScheduler(schedule(lr), log=None), probe])
    trainer.train()
    sgd = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(sgd) is torch.optim.SGD and (given[0] is None or sgd is given[0])
    if optimizer == "param_groups":  # names and tensors still line up, in every group
        named = dict(model.named_parameters())
        assert all([named[n] for n in g["param_names"]] == g["params"] for g in sgd.param_groups)
    return probe


@pytest.mark.parametrize("optimizer", ["trainer", "param_groups"])
def test_hugging_face_phase_lr_is_the_rate_of_what_the_phase_unfreezes(tmp_path, optimizer):
    with_lr, without = hf_run(PHASE_LR, tmp_path, optimizer=optimizer), hf_run(None, tmp_path, optimizer=optimizer)
    assert_moves_scale(with_lr.moved[2], without.moved[2], EXPECTED)  # epoch 1 starts at step 2


@pytest.mark.parametrize("lr", [PHASE_LR, None], ids=["phase-lr", "no-lr"])
def test_hugging_face_new_groups_follow_the_linear_schedule_from_their_base_rate(tmp_path, lr):
    total = 6
    probe = hf_run(lr, tmp_path, lr_scheduler_type="linear", max_steps=total)
    base = lr or BASE  # the Trainer's learning_rate
    assert [step for step, _ in probe.rates] == list(range(total))
    for step, groups in probe.rates:
        factor = (total - step) / total
        trainer_groups, ours = groups[:2], groups[2:]
        for rate, initial in trainer_groups:
            assert initial == BASE and math.isclose(rate, BASE * factor, rel_tol=1e-12)
        assert len(ours) == (2 if step >= 2 else 0)  # weight-decay and no-decay groups, as the Trainer's
        for rate, initial in ours:
            assert math.isclose(initial, base, rel_tol=1e-12)
            assert math.isclose(rate, base * factor, rel_tol=1e-12), step


# -- param_groups and ll.rates ---------------------------------------------------------------------

def sgd_step(model, groups):
    """One plain SGD step on ``groups``: each parameter's movement (before - after) and gradient."""
    optimizer = torch.optim.SGD(groups)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model(x).square().sum().backward()
    before, grads = values(model), {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    after = values(model)
    return {n: (before[n] - after[n], grads[n]) for n in before}


def sequential(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2)).double()


class Stack(nn.Module):
    """A module whose only child is a ModuleList: depth counts the list's entries."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)])
        self.double()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("kwargs", [
    {"lr_mult": {"*.bias": 0.5, "2": 3.0}},
    {"layer_decay": 0.5},
    {"layer_decay": 0.5, "lr_mult": {"0": 0.1}},
], ids=["lr_mult", "layer_decay", "both"])
def test_one_sgd_step_moves_each_parameter_by_its_group_rate_times_its_gradient(kwargs):
    model = sequential()
    table = ll.rates(model, 0.1, **kwargs)
    groups = llt.param_groups(model, 0.1, **kwargs)
    assert [(g["name"], g["lr"], [n for n, _ in g["params"]]) for g in groups] == \
           [(g["name"], g["lr"], g["paths"]) for g in table.groups]
    steps = sgd_step(model, groups)
    for name, (delta, grad) in steps.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(delta, table.lr[name] * grad, rtol=RTOL, atol=0, msg=name)


def test_layer_decay_rates_are_the_expected_powers():
    table = ll.rates(sequential(), 0.1, layer_decay=0.5, lr_mult={"*.bias": 2.0})
    # blocks are the Sequential's children, Tanh (block 1) included: 0.1 * 0.5 ** (3 - block)
    assert table.lr == pytest.approx({"0.weight": 0.0125, "0.bias": 0.025, "2.weight": 0.05, "2.bias": 0.1,
                                      "3.weight": 0.1, "3.bias": 0.2})


@pytest.mark.parametrize("make, n", [(sequential, 4), (Stack, 3)], ids=["Sequential", "ModuleList-only-child"])
def test_layer_decay_counts_the_blocks_that_freeze_depth_counts(make, n):
    model = make()
    table = ll.rates(model, 1.0, layer_decay=0.5)
    top = max(table.blocks)
    for path, block in zip(table.paths, table.blocks):
        assert table.lr[path] == pytest.approx(0.5 ** (top - block))
    assert top == n - 1  # Sequential: 4 children (Tanh has no parameters); Stack: the 3 list entries
    for k in range(1, n):
        frozen = set(ll.plan(model, ll.freeze(depth=k)).frozen)
        assert frozen == {p for p, b in zip(table.paths, table.blocks) if b < k}, k
    steps = sgd_step(model, llt.param_groups(model, 1.0, layer_decay=0.5))
    for name, (delta, grad) in steps.items():
        torch.testing.assert_close(delta, table.lr[name] * grad, rtol=RTOL, atol=0, msg=name)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr": -1e-3}, ll.SpecError, "lr must be a finite number > 0; received -0.001"),
    ({"lr": 0.0}, ll.SpecError, "lr must be"),
    ({"lr": float("nan")}, ll.SpecError, "lr must be.*nan"),
    ({"lr": float("inf")}, ll.SpecError, "lr must be.*inf"),
    ({"layer_decay": 0}, ll.SpecError, "layer_decay must be a number in \\(0, 1\\]; received 0"),
    ({"layer_decay": 1.5}, ll.SpecError, "layer_decay.*1.5"),
    ({"layer_decay": float("nan")}, ll.SpecError, "layer_decay"),
    ({"lr_mult": {"head": -1.0}}, ll.SpecError, "lr_mult\\['head'\\] must be a finite number >= 0"),
    ({"lr_mult": {"head": float("inf")}}, ll.SpecError, "lr_mult"),
    ({"lr_mult": {"bodyy": 0.1}}, ll.NoMatchError, "lr_mult: pattern 'bodyy' matches no layer"),
    ({"weight_decay": -0.1}, ll.SpecError, "weight_decay must be"),
], ids=["negative-lr", "zero-lr", "nan-lr", "inf-lr", "layer_decay-0", "layer_decay-1.5", "layer_decay-nan",
        "negative-lr_mult", "inf-lr_mult", "lr_mult-no-match", "negative-weight_decay"])
def test_bad_rates_raise_and_build_nothing(kwargs, error, match):
    model = Net()
    ll.apply(model, ll.freeze("body"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    kwargs = {"lr": 1e-3, **kwargs}
    for build in (llt.param_groups, ll.rates):
        with pytest.raises(error, match=match) as caught:
            build(model, **kwargs)
        if error is ll.NoMatchError:
            assert "body" in caught.value.suggestions
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# -- layer-wise decay on a tiny BERT in the Trainer (the docs recipe) -------------------------------

def test_layer_wise_decay_on_a_tiny_bert_in_the_trainer(tmp_path):
    tf = transformers()
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = tf.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (16, 8), generator=g)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": (ids[i, 0] > 50).long()}

    class Probe(tf.TrainerCallback):
        def __init__(self):
            self.rates = []

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            self.rates.append((state.global_step, {g["name"]: g["lr"] for g in optimizer.param_groups}))

    lr, decay, total = 1e-3, 0.5, 4
    rate_args = dict(layer_decay=decay, within="bert.encoder.layer", weight_decay=0.01,
                     no_decay=["*bias", "*LayerNorm*"])
    table = ll.rates(model, lr, **rate_args)
    optimizer = torch.optim.AdamW(llt.param_groups(model, lr, **rate_args))
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=total, per_device_train_batch_size=4,
                                lr_scheduler_type="linear", warmup_steps=0, report_to=[], use_cpu=True,
                                save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    probe = Probe()
    before = values(model)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(optimizer, None),
                         callbacks=[probe])
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer  # the Trainer stepped ours (through Accelerate's wrapper)

    groups = {g["name"]: g for g in optimizer.param_groups}
    # blocks: embeddings 0, encoder layers 1..2, pooler and classifier 3 (the top, at lr)
    for k, layer in ((2, 0), (1, 1)):
        names = {n for n, _ in model.named_parameters() if n.startswith(f"bert.encoder.layer.{layer}.")}
        for name in (f"block{3 - k}", f"block{3 - k}/no_decay"):
            assert groups[name]["initial_lr"] == pytest.approx(lr * decay ** k)
            held = {n for n, p in model.named_parameters() if any(p is q for q in groups[name]["params"])}
            assert held and held <= names, name
    assert groups["block3"]["initial_lr"] == lr and groups["block0"]["initial_lr"] == pytest.approx(lr * decay ** 3)
    assert groups["block1"]["weight_decay"] == 0.01 and groups["block1/no_decay"]["weight_decay"] == 0.0
    by_group = {g["name"]: g["lr"] for g in table.groups}
    assert [step for step, _ in probe.rates] == list(range(total))
    for step, rates in probe.rates + [(total, {g["name"]: g["lr"] for g in optimizer.param_groups})]:
        factor = (total - step) / total
        assert rates.keys() == by_group.keys()
        for name, rate in rates.items():
            assert math.isclose(rate, by_group[name] * factor, rel_tol=1e-9, abs_tol=1e-15), (step, name)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("bert.encoder."))
