"""ll.check on torch: each finding is built for real, training is shown to go wrong, and
check names it; clean set-ups give an empty report. The DDP finding is in
test_distributed_torch.py, the compile finding in test_compile_torch.py."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.torch as llt  # noqa: E402


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def steps(model, optimizer, n=3, scheduler=None):
    model.train()
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 4, generator=g)),
                                    torch.randint(0, 2, (16,), generator=g)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_clean_setup_has_no_findings():
    model = net()
    ll.apply(model, ll.freeze("0"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps(model, optimizer)
    report = ll.check(model, optimizer)
    assert not report and report.kinds == () and "no freezing problems" in str(report)


def test_unfrozen_after_the_optimizer_was_built_never_trains_and_check_names_it():
    model = net()
    ll.apply(model, ll.freeze("0"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=0.01)
    ll.apply(model, ll.unfreeze("0"))  # forgot sync_optimizer
    before = snapshot(model)
    steps(model, optimizer)
    assert torch.equal(before["0.weight"], model[0].weight)  # gets gradients, never moves
    report = ll.check(model, optimizer)
    assert report.kinds == ("not-in-optimizer",)
    assert report.findings[0].paths == ("0.weight", "0.bias") and report.findings[0].scalars == 40
    assert "sync_optimizer" in str(report)
    llt.sync_optimizer(optimizer, model)
    assert not ll.check(model, optimizer)
    steps(model, optimizer)
    assert not torch.equal(before["0.weight"], model[0].weight)


def test_frozen_parameters_with_optimizer_state_are_counted_in_bytes():
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    steps(model, optimizer, 1)
    ll.apply(model, ll.freeze("0"))
    kept = sum(v.numel() * v.element_size() for p in model[0].parameters()
               for v in optimizer.state[p].values() if torch.is_tensor(v))
    assert kept > 0  # the moments of frozen weights stay allocated
    report = ll.check(model, optimizer)
    assert report.kinds == ("frozen-optimizer-state",)
    assert report.findings[0].paths == ("0.weight", "0.bias") and report.findings[0].bytes == kept


def test_batchnorm_frozen_by_hand_keeps_moving_its_statistics_and_check_names_it():
    model = net()
    model[1].requires_grad_(False)  # the usual hand freeze
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mean = model[1].running_mean.clone()
    steps(model, optimizer)
    assert not torch.equal(mean, model[1].running_mean)  # "frozen", yet it moved
    report = ll.check(model, optimizer)
    assert report.kinds == ("norm-statistics-move",) and report.findings[0].paths == ("1",)
    assert not ll.check(model, optimizer, bn="trainable")  # said to be intended
    ll.apply(model, ll.freeze("1"))  # the fix: held in eval mode through model.train()
    mean = model[1].running_mean.clone()
    steps(model, optimizer)
    assert torch.equal(mean, model[1].running_mean) and not ll.check(model, optimizer)


def test_a_scheduler_that_misses_a_group_leaves_its_rate_fixed_and_check_names_it():
    model = net()
    ll.apply(model, ll.freeze("0"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)  # as Hugging Face's
    ll.apply(model, ll.unfreeze("0"))
    optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 0.1, "name": "unfrozen"})  # by hand
    try:
        steps(model, optimizer, 2, scheduler)
        assert optimizer.param_groups[0]["lr"] == 0.025 and optimizer.param_groups[1]["lr"] == 0.1  # not scheduled
    except ValueError as exc:  # newer torch zips strictly: the first scheduler.step() fails mid-training
        assert "shorter" in str(exc)
    report = ll.check(model, optimizer, scheduler=scheduler)
    assert report.kinds == ("scheduler-missing-groups",) and report.findings[0].paths == ("unfrozen",)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, 1)  # scales every group's rate: nothing to report
    del step_lr.base_lrs[1:]
    assert not ll.check(model, optimizer, scheduler=step_lr)


def test_reentrant_checkpointing_over_frozen_embeddings_trains_nothing_inside_and_check_names_it():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()  # as in transformers before 5, or with a custom input path
    ll.apply(model, ll.freeze("bert.embeddings"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train():
        before = snapshot(model)
        model.train()
        ids = torch.randint(1, 64, (8, 8), generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids[:, 0] % 2).loss.backward()
        optimizer.step()
        return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}

    with pytest.warns(UserWarning):  # torch's own warning, easy to miss in a long log
        moved = train()
    assert not any(n.startswith("bert.encoder.") for n in moved)  # the whole encoder is starved
    report = ll.check(model, optimizer)
    assert report.kinds == ("reentrant-checkpoint-no-grad",)
    assert set(report.findings[0].paths) == {n for n, p in model.named_parameters()
                                             if n.startswith("bert.encoder.") and p.requires_grad}
    model.enable_input_require_grads()  # the fix the report gives
    assert not ll.check(model, optimizer)
    assert any(n.startswith("bert.encoder.") for n in train())


def test_without_an_optimizer_the_report_says_the_optimizer_was_not_checked():
    model = net()
    optimizer = torch.optim.SGD(model[3].parameters(), lr=0.1)  # a problem only the optimizer shows
    assert ll.check(model, optimizer).kinds == ("not-in-optimizer",)
    report = ll.check(model)
    assert not report and report.not_checked == ("the optimizer (pass optimizer= to ll.check)",)
    assert str(report) == ("layerlock.check: no freezing problems found in what was checked\n"
                           "not checked: the optimizer (pass optimizer= to ll.check)")
    model[1].requires_grad_(False)  # findings and the note together
    report = ll.check(model)
    assert report.kinds == ("norm-statistics-move",) and str(report).endswith(
        "not checked: the optimizer (pass optimizer= to ll.check)")
    assert report.to_dict()["not_checked"] == ["the optimizer (pass optimizer= to ll.check)"]


def test_check_changes_nothing_and_refuses_a_bad_bn_policy():
    model = net()
    optimizer = torch.optim.SGD(model[3].parameters(), lr=0.1)
    state = ll.snapshot(model)
    groups = [list(g["params"]) for g in optimizer.param_groups]
    ll.check(model, optimizer)
    assert ll.snapshot(model) == state and [list(g["params"]) for g in optimizer.param_groups] == groups
    with pytest.raises(ll.SpecError, match="bn must be one of"):
        ll.check(model, bn="frozn")


def test_freeze_schedulers_warn_once_with_the_report_when_training_starts():
    import warnings

    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    steps(model, optimizer, 1)  # a warm start: the optimizer has state for what phase 1 freezes
    scheduler = llt.FreezeScheduler(ll.Schedule({0: ll.freeze("0"), 2: ll.unfreeze()}), model, optimizer, log=None)
    with pytest.warns(ll.LayerlockWarning, match="frozen-optimizer-state") as caught:
        scheduler.step(0)
    assert len([w for w in caught if "layerlock.check" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step(1)  # once
