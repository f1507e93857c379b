"""Training workflow in PyTorch: param groups, optimizer sync, schedules and exact resume."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.torch as llt  # noqa: E402


def blocks_net(seed=0, n=4):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)) for _ in range(n)], nn.Linear(6, 3))


def data(epoch, step):
    g = torch.Generator().manual_seed(1000 * epoch + step)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def run_epoch(model, optimizer, epoch, steps=2):
    model.train()
    for step in range(steps):
        x, y = data(epoch, step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def snapshot_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved_blocks(before, after):
    return sorted({n.split(".")[0] for n in before if not torch.equal(before[n], after[n])})


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def test_param_groups_cover_only_trainable_parameters_and_apply_discriminative_rates(bert):
    ll.apply(bert, ll.freeze("bert.embeddings"))
    groups = llt.param_groups(bert, 1e-3, lr_mult={"bert.encoder": 0.1, "bert.encoder.layer.3": 0.5})
    names = {n for g in groups for n, _ in g["params"]}
    assert names == {n for n, p in bert.named_parameters() if p.requires_grad}
    lr_of = {n: g["lr"] for g in groups for n, _ in g["params"]}
    assert lr_of["bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(1e-4)
    assert lr_of["bert.encoder.layer.3.output.dense.weight"] == pytest.approx(5e-4)  # last match wins
    assert lr_of["classifier.weight"] == pytest.approx(1e-3)
    ll.apply(bert, ll.unfreeze())


def test_no_decay_and_layer_decay_follow_blocks_like_beit(bert):
    groups = llt.param_groups(bert, 1.0, weight_decay=0.05, no_decay=["*.bias", "*LayerNorm*"],
                              layer_decay=0.5, within="bert.encoder.layer")
    by_name = {n: g for g in groups for n, _ in g["params"]}
    assert by_name["classifier.weight"]["lr"] == 1.0                      # top: after the container
    assert by_name["bert.encoder.layer.3.output.dense.weight"]["lr"] == 0.5
    assert by_name["bert.encoder.layer.0.output.dense.weight"]["lr"] == 0.5 ** 4
    assert by_name["bert.embeddings.word_embeddings.weight"]["lr"] == 0.5 ** 5  # bottom: before it
    assert by_name["bert.encoder.layer.0.output.dense.bias"]["weight_decay"] == 0.0
    assert by_name["bert.encoder.layer.0.output.LayerNorm.weight"]["weight_decay"] == 0.0
    assert by_name["bert.encoder.layer.0.output.dense.weight"]["weight_decay"] == 0.05
    optimizer = torch.optim.AdamW(groups)
    assert [g["name"] for g in optimizer.state_dict()["param_groups"]] == [g["name"] for g in groups]
    assert len(set(g["name"] for g in groups)) == len(groups)


def test_param_groups_reject_bad_input():
    with pytest.raises(ll.SpecError, match="layer_decay"):
        llt.param_groups(blocks_net(), 0.1, layer_decay=1.5)
    with pytest.raises(ll.SpecError, match="lr must be"):
        llt.param_groups(blocks_net(), -1)
    with pytest.raises(ll.NoMatchError, match="within='encoder' is not a layer path"):
        llt.param_groups(blocks_net(), 0.1, layer_decay=0.5, within="encoder")


def test_param_groups_refuse_a_pattern_that_matches_nothing_and_suggest_the_closest_path(bert):
    with pytest.raises(ll.NoMatchError, match="lr_mult: pattern 'bret.encoder' matches no layer") as caught:
        llt.param_groups(bert, 0.1, lr_mult={"bret.encoder": 0.1})
    assert caught.value.pattern == "bret.encoder" and "bert.encoder" in caught.value.suggestions
    with pytest.raises(ll.NoMatchError, match="no_decay: pattern"):
        llt.param_groups(bert, 0.1, weight_decay=0.01, no_decay=["*.bais"])
    with pytest.raises(ll.NoMatchError, match="use kind='LayerNorm'"):
        llt.param_groups(bert, 0.1, lr_mult={"LayerNorm": 0.1})


def test_param_groups_strict_false_warns_and_ignores_the_pattern():
    net = blocks_net()
    with pytest.warns(ll.LayerlockWarning, match="lr_mult: pattern 'bakbone\\*'"):
        groups = llt.param_groups(net, 0.1, lr_mult={"bakbone*": 0.1}, strict=False)
    assert [(g["name"], g["lr"]) for g in groups] == [("default", 0.1)]


def test_param_group_patterns_mean_what_they_mean_in_a_spec():
    net = blocks_net()  # 0..3: Sequential(Linear, LayerNorm); 4: Linear
    # a layer path selects its subtree; the later pattern wins, also over a parameter pattern
    groups = llt.param_groups(net, 1.0, lr_mult={"*.bias": 0.5, "0": 0.1, "re:[12]\\.0": 0.2})
    lr_of = {n: g["lr"] for g in groups for n, _ in g["params"]}
    assert lr_of["0.0.weight"] == lr_of["0.0.bias"] == lr_of["0.1.bias"] == 0.1
    assert lr_of["1.0.weight"] == lr_of["1.0.bias"] == lr_of["2.0.bias"] == 0.2
    assert lr_of["1.1.bias"] == lr_of["4.bias"] == 0.5 and lr_of["4.weight"] == 1.0
    spec = ll.freeze("*.bias").freeze("0").freeze("re:[12]\\.0")  # the same patterns as spec rules
    factor = {None: 1.0, 0: 0.5, 1: 0.1, 2: 0.2}
    assert {p.path: factor[p.rule] for p in ll.plan(net, spec).params} == lr_of


def test_sync_optimizer_after_unfreeze_makes_unfrozen_weights_move_and_keeps_state():
    model = blocks_net()
    ll.apply(model, ll.freeze(depth=-1))
    optimizer = torch.optim.AdamW(llt.param_groups(model, 0.01), weight_decay=0.1)
    run_epoch(model, optimizer, 0)
    head_state = {k: v.clone() for k, v in optimizer.state[model[4].weight].items()}
    ll.apply(model, ll.unfreeze("3"))
    added = llt.sync_optimizer(optimizer, model, lr=0.001)
    assert added == ["3.0.weight", "3.0.bias", "3.1.weight", "3.1.bias"]
    assert llt.sync_optimizer(optimizer, model) == []  # never twice
    assert all(torch.equal(v, optimizer.state[model[4].weight][k]) for k, v in head_state.items())
    assert optimizer.param_groups[-1]["lr"] == 0.001
    before = snapshot_values(model)
    run_epoch(model, optimizer, 1)
    assert moved_blocks(before, snapshot_values(model)) == ["3", "4"]


def test_frozen_parameters_keep_optimizer_state_but_do_not_move():
    model = blocks_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    run_epoch(model, optimizer, 0)
    ll.apply(model, ll.freeze("0"))
    assert llt.sync_optimizer(optimizer, model) == []
    before = snapshot_values(model)
    run_epoch(model, optimizer, 1)
    assert "0" not in moved_blocks(before, snapshot_values(model))
    assert "momentum_buffer" in optimizer.state[model[0][0].weight]


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e),
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
], ids=["LambdaLR", "StepLR"])
def test_sync_optimizer_keeps_lr_schedulers_consistent(make):
    model = blocks_net()
    ll.apply(model, ll.freeze(depth=-1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = make(optimizer)
    run_epoch(model, optimizer, 0)
    scheduler.step()
    ll.apply(model, ll.unfreeze())
    llt.sync_optimizer(optimizer, model, lr=0.02, scheduler=scheduler)
    assert len(scheduler.base_lrs) == len(optimizer.param_groups)
    run_epoch(model, optimizer, 1)
    scheduler.step()
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.01)  # one more halving


def test_sync_optimizer_refuses_schedulers_it_cannot_extend_and_changes_nothing():
    model = blocks_net()
    ll.apply(model, ll.freeze(depth=-1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    ll.apply(model, ll.unfreeze())
    with pytest.raises(ll.LayerlockError, match="OneCycleLR.*supported: LambdaLR"):
        llt.sync_optimizer(optimizer, model, scheduler=scheduler)
    assert len(optimizer.param_groups) == 1


def test_gradual_schedule_moves_one_more_block_each_epoch(capsys):
    model = blocks_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = ll.gradual(5, every=1)
    freezer = llt.FreezeScheduler(schedule, model, optimizer)
    moved = []
    for epoch in range(5):
        freezer.step(epoch)
        before = snapshot_values(model)
        run_epoch(model, optimizer, epoch)
        moved.append(moved_blocks(before, snapshot_values(model)))
    assert moved == [["4"], ["3", "4"], ["2", "3", "4"], ["1", "2", "3", "4"], ["0", "1", "2", "3", "4"]]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[1].startswith("layerlock: epoch 1: phase 2/5")


def test_gradual_within_a_container_with_a_head():
    schedule = ll.gradual(2, within="body", head="head", lr=1e-3, lr_decay=0.5)
    assert [p.epoch for p in schedule.phases] == [0, 1, 2, 3]
    assert [p.lr for p in schedule.phases] == [1e-3, 5e-4, 2.5e-4, 1.25e-4]
    model = nn.Sequential()
    model.add_module("stem", nn.Linear(2, 2))
    model.add_module("body", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    model.add_module("head", nn.Linear(2, 2))
    trainable = []
    for epoch in range(4):
        ll.apply(model, schedule.spec_at(epoch))
        trainable.append(sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}))
    assert trainable == [["head"], ["body.1", "head"], ["body.0", "body.1", "head"],
                         ["body.0", "body.1", "head", "stem"]]


def test_freeze_scheduler_uses_phase_lr_for_new_groups():
    model = blocks_net()
    ll.apply(model, ll.freeze(depth=-1))
    optimizer = torch.optim.SGD(llt.param_groups(model, 0.1), lr=0.1)
    schedule = ll.Schedule({0: ll.freeze(depth=-1), 1: ll.unfreeze("3")}, lr={1: 0.01})
    freezer = llt.FreezeScheduler(schedule, model, optimizer, log=None)
    freezer.step(0)
    assert len(optimizer.param_groups) == 1
    freezer.step(1)
    assert optimizer.param_groups[-1]["lr"] == 0.01 and len(optimizer.param_groups) == 2


def _resumable_run(schedule, epochs, interrupt_at=None):
    def fresh():
        model = blocks_net(seed=0)
        ll.apply(model, schedule.spec_at(0))
        optimizer = torch.optim.AdamW(llt.param_groups(model, 0.01, no_decay=["*.bias"], weight_decay=0.1))
        return model, optimizer, llt.FreezeScheduler(schedule, model, optimizer, log=None)

    model, optimizer, freezer = fresh()
    for epoch in range(epochs):
        if epoch == interrupt_at:
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "freezer": freezer.state_dict()}
            model, optimizer, freezer = fresh()
            model.load_state_dict(checkpoint["model"])
            freezer.load_state_dict(checkpoint["freezer"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        freezer.step(epoch)
        run_epoch(model, optimizer, epoch)
    return snapshot_values(model)


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_run():
    schedule = ll.gradual(5, lr=0.01, lr_decay=0.5)
    straight = _resumable_run(schedule, 5)
    resumed = _resumable_run(schedule, 5, interrupt_at=3)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_resume_into_another_structure_is_refused():
    schedule = ll.gradual(3)
    freezer = llt.FreezeScheduler(schedule, blocks_net(n=2), None, log=None)
    other = llt.FreezeScheduler(schedule, blocks_net(n=2, seed=1), None, log=None)
    other.load_state_dict(freezer.state_dict())  # same structure: fine
    with pytest.raises(ll.LayerlockError, match="another structure"):
        llt.FreezeScheduler(ll.gradual(2), blocks_net(n=1), None, log=None).load_state_dict(freezer.state_dict())


def test_bad_schedules_fail_clearly_before_training():
    with pytest.raises(ll.SpecError, match="epoch must be an int >= 0"):
        ll.Schedule({-1: ll.freeze()})
    with pytest.raises(ll.SpecError, match="must be a layerlock.Spec"):
        ll.Schedule({0: "freeze backbone"})
    with pytest.raises(ll.SpecError, match="lr given for epochs \\[5\\]"):
        ll.Schedule({0: ll.freeze()}, lr={5: 0.1})
    model = blocks_net()
    schedule = ll.Schedule({0: ll.freeze(depth=-1), 7: ll.unfreeze("backbone.layer4")})
    with pytest.raises(ll.NoMatchError, match="backbone.layer4"):
        llt.FreezeScheduler(schedule, model, None)
    assert all(p.requires_grad for p in model.parameters())


def test_schedules_round_trip_through_dict_json_and_yaml(tmp_path):
    schedule = ll.gradual(3, within="encoder.layer", head="classifier", lr=1e-3, lr_decay=0.8)
    assert ll.Schedule.from_dict(schedule.to_dict()) == schedule
    assert ll.Schedule.from_json(schedule.to_json()) == schedule
    schedule.save(tmp_path / "schedule.yaml")
    assert ll.Schedule.load(tmp_path / "schedule.yaml") == schedule
    with pytest.raises(ll.SpecError, match="phases\\[0\\]"):
        ll.Schedule.from_dict({"phases": [{"epoch": 0}]})
