"""The PyTorch backend under real training: frozen means frozen, with every optimizer."""

import copy
import subprocess
import sys
import textwrap
import io

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock as ll  # noqa: E402
from layerlock.backends import get_backend  # noqa: E402


class Net(nn.Module):
    """backbone (conv, bn, conv, bn) + head, like a small transfer-learning CNN."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.backbone(x))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def train(model, optimizer, steps=3, zero_grad_to_none=True):
    model.train()
    for i in range(steps):
        x, y = batch(i)
        optimizer.zero_grad(set_to_none=zero_grad_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_frozen_weights_are_bit_identical_after_training(make_optimizer):
    model = make_net()
    ll.apply(model, ll.freeze("backbone"))
    before = tensors(model)
    train(model, make_optimizer(model.parameters()))
    after = tensors(model)
    for key, value in before.items():
        if key.startswith("backbone"):  # weights and BatchNorm running statistics
            assert torch.equal(value, after[key]), key
    assert not torch.equal(before["head.weight"], after["head.weight"])


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_freeze_mid_training_with_stale_gradients_and_momentum_moves_nothing(make_optimizer):
    model = make_net()
    optimizer = make_optimizer(model.parameters())
    train(model, optimizer, steps=2, zero_grad_to_none=False)  # momentum + grads left in place
    ll.apply(model, ll.freeze("backbone"))
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    before = tensors(model)
    train(model, optimizer, steps=3, zero_grad_to_none=False)
    after = tensors(model)
    for key in before:
        if key.startswith("backbone"):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.bias"], after["head.bias"])


def test_batchnorm_statistics_stay_fixed_through_model_train():
    model = make_net()
    ll.apply(model, ll.freeze("backbone"))
    model.train()
    bn = model.backbone[1]
    assert not bn.training and model.training and model.head.training
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with torch.no_grad():
        model(batch()[0] * 5 + 3)
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))


def test_unfreezing_releases_the_batchnorm_hold():
    model = make_net()
    ll.apply(model, ll.freeze("backbone"))
    ll.apply(model, ll.unfreeze("backbone.1"))
    model.train()
    assert model.backbone[1].training and not model.backbone[4].training


def test_restore_releases_holds_and_flags_exactly():
    model = make_net().train()
    state = ll.snapshot(model)
    ll.apply(model, ll.freeze("backbone"), frozen_mode="eval")
    assert not model.train().backbone.training
    ll.restore(model, state)
    assert ll.snapshot(model) == state and model.train().backbone[1].training
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bn, frozen_bn", [("follow", True), ("trainable", False), ("frozen", True)])
def test_bn_policies(bn, frozen_bn):
    model = make_net()
    ll.apply(model, ll.freeze("backbone") if bn != "frozen" else ll.unfreeze(), bn=bn)
    model.train()
    for bn_layer in (model.backbone[1], model.backbone[4]):
        assert bn_layer.weight.requires_grad is (not frozen_bn)
        assert bn_layer.training is (not frozen_bn)
    assert model.backbone[0].weight.requires_grad is (bn == "frozen")


def test_sync_batchnorm_is_held_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    ll.apply(model, ll.freeze(kind="SyncBatchNorm"))
    assert not model.train()[1].training


def test_frozen_mode_eval_turns_off_dropout_in_frozen_blocks_only():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.Dropout(0.5), nn.Linear(4, 2))
    ll.apply(model, ll.freeze(depth=1), frozen_mode="eval")
    model.train()
    assert not model[0].training and not model[0][1].training and model[1].training


def test_bitfit_trains_only_biases():
    model = make_net()
    plan = ll.apply(model, ll.freeze().unfreeze("*.bias"))
    assert set(plan.trainable) == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    before = tensors(model)
    train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01))
    after = tensors(model)
    for name, _ in model.named_parameters():
        assert torch.equal(before[name], after[name]) != name.endswith(".bias"), name


def test_typo_gets_a_suggestion_and_changes_nothing():
    model = make_net()
    state = ll.snapshot(model)
    with pytest.raises(ll.NoMatchError, match="closest paths: head") as info:
        ll.apply(model, ll.freeze("backbone").freeze("haed"))
    assert "head" in info.value.suggestions
    assert ll.snapshot(model) == state


def test_paths_match_named_parameters_and_depth_counts_named_children():
    model = make_net()
    plan = ll.plan(model, ll.freeze(depth=1))
    assert [p.path for p in plan.params] == [n for n, _ in model.named_parameters()]
    assert set(plan.frozen) == {n for n, _ in model.named_parameters() if n.startswith("backbone")}
    assert ll.plan(model, ll.freeze(depth=-3, within="backbone")).frozen == (
        "backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias",
        "backbone.3.weight", "backbone.3.bias", "backbone.4.weight", "backbone.4.bias")


def test_wrapped_models_use_the_same_paths():
    model = make_net()
    compiled = torch.compile(model)
    parallel = nn.DataParallel(model)
    spec = ll.freeze("backbone")
    assert ll.plan(compiled, spec).frozen == ll.plan(parallel, spec).frozen == ll.plan(model, spec).frozen
    ll.apply(compiled, spec)
    assert not model.backbone[0].weight.requires_grad


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight
        self.alias = self.body  # one module under two paths


def test_tied_weights_are_one_parameter_with_one_decision():
    model = TiedLM()
    plan = ll.apply(model, ll.freeze("lm_head"))
    assert plan.frozen == ("embed.weight",) and plan.params[0].aliases == ("lm_head.weight",)
    assert not model.embed.weight.requires_grad
    assert ll.plan(TiedLM(), ll.freeze("alias")).frozen == ("body.weight", "body.bias")
    with pytest.raises(ll.SpecError, match="rules disagree"):
        ll.apply(model, ll.freeze("embed").unfreeze("lm_head"))


def test_held_models_survive_deepcopy_save_and_state_dict_loading():
    model = make_net()
    ll.apply(model, ll.freeze("backbone"))
    keys = list(model.state_dict())
    clone = copy.deepcopy(model)
    assert not clone.train().backbone[1].training and clone.train().head.training
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not loaded.train().backbone[1].training
    assert list(loaded.state_dict()) == keys
    fresh = make_net(seed=3)
    fresh.load_state_dict(model.state_dict())
    ll.apply(fresh, ll.freeze("backbone"))
    assert list(fresh.state_dict()) == keys
    assert type(model.backbone[1]) is nn.BatchNorm2d  # nothing was replaced


def test_fingerprint_of_frozen_weights_is_stable_through_training():
    model = make_net()
    ll.apply(model, ll.freeze("backbone"))
    frozen, trainable = ll.fingerprint(model), ll.fingerprint(model, "trainable")
    train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01))
    assert ll.fingerprint(model) == frozen and ll.fingerprint(model, "trainable") != trainable


def test_apply_never_changes_values_and_is_idempotent():
    model = make_net()
    before = tensors(model)
    spec = ll.freeze("backbone").unfreeze("*.bias")
    ll.apply(model, spec, frozen_mode="eval")
    assert ll.apply(model, spec, frozen_mode="eval").changed == ()
    assert all(torch.equal(v, tensors(model)[k]) for k, v in before.items())


def test_module_train_is_wrapped_only_once_something_is_held():
    code = textwrap.dedent("""
        import torch, layerlock as ll
        original = torch.nn.Module.train
        net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        ll.apply(net, ll.freeze("0")); ll.summary(net); ll.snapshot(net)
        untouched = torch.nn.Module.train is original
        ll.apply(net, ll.freeze())   # holds the frozen BatchNorm
        print(untouched, torch.nn.Module.train is original, net.train()[1].training)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"], out.stdout + out.stderr


def test_a_plan_made_for_another_model_is_refused_before_anything_changes():
    small, big = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    foreign = ll.plan(big, ll.freeze())
    with pytest.raises(ll.BackendError, match="lacks \\(1.weight, 1.bias\\)"):
        get_backend(small).apply(small, foreign)
    assert all(p.requires_grad for p in small.parameters())
