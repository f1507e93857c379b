"""ll.check on Flax NNX: each finding is built for real, a training step is shown to go wrong,
and check names it; a clean set-up gives an empty report, and what was not inspected (no
optimizer) is reported as not checked."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.flax as llf  # noqa: E402
from layerlock.backends.flax import FROZEN, parameters  # noqa: E402

BACKBONE = ("backbone.layers.0.kernel", "backbone.layers.0.bias", "backbone.layers.1.scale", "backbone.layers.1.bias")


class Net(nnx.Module):
    def __init__(self, rngs):
        self.backbone = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs))
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.backbone(x)))


def net():
    return Net(nnx.Rngs(0))


def step(model, optimizer, wrt=llf.trainable, seed=0):
    """One training step as the NNX docs write it: gradients w.r.t. ``wrt``, then update."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x, y = jax.random.normal(k1, (16, 4)), jax.random.normal(k2, (16, 2))
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)


def values(model):
    return {p: np.array(v.get_value()) for p, v in parameters(model).items()}


def moved(before, model):
    return {p for p, v in parameters(model).items() if not np.array_equal(before[p], v.get_value())}


def test_a_clean_setup_has_no_findings():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=llf.trainable)
    model.train()
    step(model, optimizer)
    report = ll.check(model, optimizer)
    assert not report and report.kinds == () and report.not_checked == ()
    assert str(report) == "layerlock.check: no freezing problems found"


def test_an_optimizer_over_every_param_moves_the_frozen_backbone_and_check_names_it():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)  # the classic NNX mistake
    model.train()
    before = values(model)
    step(model, optimizer, wrt=nnx.Param)
    assert set(BACKBONE) <= moved(before, model)  # "frozen", yet it trains
    with pytest.raises(ValueError):  # and with gradients for the trainable part only, update fails
        step(model, optimizer, wrt=llf.trainable)
    report = ll.check(model, optimizer)
    assert report.kinds == ("optimizer-updates-frozen", "frozen-optimizer-state")
    found = report.findings[0]
    assert found.paths == BACKBONE and found.scalars == 56 and "layerlock.flax.trainable" in found.fix

    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=llf.trainable)  # the fix
    assert not ll.check(model, optimizer)
    before = values(model)
    step(model, optimizer)
    assert moved(before, model) == {"head.kernel", "head.bias"}


def test_frozen_parameters_with_optimizer_state_are_counted_in_bytes():
    model = net()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=llf.trainable)
    model.train()
    step(model, optimizer)
    ll.apply(model, ll.freeze("backbone"))  # forgot sync_optimizer: the moments stay, of the old layout
    with pytest.raises(ValueError):
        step(model, optimizer)
    report = ll.check(model, optimizer)
    assert report.kinds == ("frozen-optimizer-state",)
    found = report.findings[0]
    assert found.paths == BACKBONE and found.bytes == 2 * 56 * 4  # mu and nu, float32
    assert "fails" in found.problem and "sync_optimizer" in found.fix

    llf.sync_optimizer(optimizer, model)
    assert not ll.check(model, optimizer)
    before = values(model)
    step(model, optimizer)
    assert moved(before, model) == {"head.kernel", "head.bias"}


def test_unfrozen_without_sync_is_not_in_the_optimizer_and_its_update_fails():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=llf.trainable)
    model.train()
    step(model, optimizer)
    ll.apply(model, ll.unfreeze())  # forgot layerlock.flax.sync_optimizer
    with pytest.raises(ValueError):  # Adam has no moments for the backbone
        step(model, optimizer)
    report = ll.check(model, optimizer)
    assert report.kinds == ("not-in-optimizer",)
    found = report.findings[0]
    assert found.paths == BACKBONE and found.scalars == 56 and "sync_optimizer" in found.fix

    llf.sync_optimizer(optimizer, model)
    assert not ll.check(model, optimizer)
    before = values(model)
    step(model, optimizer)
    assert set(BACKBONE) <= moved(before, model)


def test_unfrozen_outside_a_fixed_wrt_filter_never_changes_and_check_names_it():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
    ll.apply(model, ll.unfreeze())
    model.train()
    before = values(model)
    step(model, optimizer)  # gradients for everything; the optimizer updates what its wrt selects
    assert moved(before, model) == {"head.kernel", "head.bias"}  # the unfrozen backbone never changes
    report = ll.check(model, optimizer)
    assert report.kinds == ("not-in-optimizer",)
    assert report.findings[0].paths == BACKBONE and "does not select" in report.findings[0].problem


def test_a_stateless_optimizer_that_selects_the_unfrozen_parameters_is_clean():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=llf.trainable)
    ll.apply(model, ll.unfreeze())  # sgd keeps no state: the next update trains the backbone
    model.train()
    before = values(model)
    step(model, optimizer)
    assert set(BACKBONE) <= moved(before, model)
    assert not ll.check(model, optimizer)


def bn_steps(model, optimizer, n=2):
    """Training steps that, like an nnx.jit loop after one model.train(), call no train()."""
    for i in range(n):
        step(model, optimizer, seed=i)


def test_a_frozen_batchnorm_set_to_batch_statistics_by_hand_keeps_moving_and_check_names_it():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=llf.trainable)
    bn = model.backbone.layers[1]
    model.train()
    bn.use_running_average = False  # by hand, under layerlock's hold
    mean = np.array(bn.mean.get_value())
    bn_steps(model, optimizer)
    assert not np.array_equal(mean, bn.mean.get_value())  # "frozen", yet its statistics move
    report = ll.check(model, optimizer)
    assert report.kinds == ("norm-statistics-move",) and report.findings[0].paths == ("backbone.layers.1",)
    assert not ll.check(model, optimizer, bn="trainable")  # statistics that adapt on purpose

    model.train()  # the hold puts the flag back
    assert not ll.check(model, optimizer)
    mean = np.array(bn.mean.get_value())
    bn_steps(model, optimizer)
    assert np.array_equal(mean, bn.mean.get_value())


def test_a_batchnorm_frozen_by_flags_without_the_hold_moves_after_train_and_check_names_it():
    model = net()
    bn = model.backbone.layers[1]
    for var in (bn.scale, bn.bias):
        var.set_metadata(**{FROZEN: True})  # the trainable flag set by hand: no hold
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=llf.trainable)
    model.eval()
    assert ll.check(model, optimizer).kinds == ("norm-statistics-move",)  # train() will switch it on
    model.train()
    mean, scale = np.array(bn.mean.get_value()), np.array(bn.scale.get_value())
    bn_steps(model, optimizer)
    assert np.array_equal(scale, bn.scale.get_value()) and not np.array_equal(mean, bn.mean.get_value())
    assert ll.check(model, optimizer).findings[0].paths == ("backbone.layers.1",)

    ll.apply(model, ll.freeze("backbone.layers.1"))  # the fix: frozen and held
    model.train()
    assert not ll.check(model, optimizer)
    mean = np.array(bn.mean.get_value())
    bn_steps(model, optimizer)
    assert np.array_equal(mean, bn.mean.get_value())


def test_without_an_optimizer_the_report_says_what_was_not_checked():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    report = ll.check(model)
    assert not report and report.not_checked == ("the optimizer (pass optimizer= to ll.check)",)
    text = str(report)
    assert "no freezing problems found in what was checked" in text
    assert "not checked: the optimizer (pass optimizer= to ll.check)" in text
    tx = optax.adam(1e-2)  # a transformation holds no parameters: nothing to compare
    assert ll.check(model, tx).not_checked == ("the optimizer (ll.check reads an nnx.Optimizer; received "
                                               "GradientTransformationExtraArgs)",)


def test_check_changes_nothing():
    model = net()
    ll.apply(model, ll.freeze("backbone"))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    state = ll.snapshot(model)
    opt_state = jax.tree.map(np.array, nnx.state(optimizer))
    weights = values(model)
    assert ll.check(model, optimizer)
    assert ll.snapshot(model) == state and moved(weights, model) == set()
    assert jax.tree.all(jax.tree.map(np.array_equal, opt_state, jax.tree.map(np.array, nnx.state(optimizer))))
