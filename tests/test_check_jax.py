"""The check for JAX pytrees (``layerlock.diagnostics.pytree.check_state``, exposed as
``layerlock.jax.check``): an optax state initialised on the whole tree is shown to move the
frozen leaves, and the check names it; ``ll.check`` on a pytree, or on what is no model,
refuses with a message that names what it received and where to go."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.jax as llj  # noqa: E402
from layerlock.diagnostics.pytree import check_state  # noqa: E402

SPEC = ll.freeze("backbone")


def params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"backbone": {"kernel": jax.random.normal(k1, (4, 8)), "bias": jnp.zeros(8)},
            "head": {"kernel": jax.random.normal(k2, (8, 2)), "bias": jnp.zeros(2)}}


def loss(p, x, y):
    return jnp.mean((jax.nn.relu(x @ p["backbone"]["kernel"] + p["backbone"]["bias"]) @ p["head"]["kernel"]
                     + p["head"]["bias"] - y) ** 2)


def train(p, tx, state, n=3, frozen=True):
    """Steps where the frozen leaves get zero gradients (stop_gradient, or a mask on the
    gradients), as in a hand-made freeze."""
    trainable = llj.trainable_mask(p, SPEC)
    for i in range(n):
        k1, k2 = jax.random.split(jax.random.key(i))
        grads = jax.grad(loss)(p, jax.random.normal(k1, (16, 4)), jax.random.normal(k2, (16, 2)))
        if frozen:
            grads = jax.tree.map(lambda g, keep: g if keep else jnp.zeros_like(g), grads, trainable)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    return p, state


def same(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_weight_decay_from_a_state_over_the_whole_tree_moves_the_frozen_leaves_and_check_names_it():
    p = params()
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(p)  # on the full tree, not layerlock.jax.optimizer
    after, _ = train(p, tx, state)
    assert not same(p["backbone"], after["backbone"])  # zero gradients, yet the frozen leaves shrink
    report = check_state(p, SPEC, state)
    assert report.kinds == ("optimizer-updates-frozen",) and report.backend == "jax"
    found = report.findings[0]
    assert found.paths == ("backbone.kernel", "backbone.bias")  # in the tree's order
    assert found.scalars == 40 and found.bytes == 2 * 40 * 4  # mu and nu, float32
    assert "layerlock.jax.optimizer" in found.fix

    tx = llj.optimizer(optax.adamw(1e-2, weight_decay=0.1), p, SPEC)  # the fix
    state = tx.init(p)
    assert not check_state(p, SPEC, state) and check_state(p, SPEC, state).not_checked == ()
    after, _ = train(p, tx, state, frozen=False)
    assert same(p["backbone"], after["backbone"]) and not same(p["head"], after["head"])


def test_momentum_from_before_the_freeze_keeps_moving_the_frozen_leaves_and_check_names_it():
    p = params()
    tx = optax.sgd(0.1, momentum=0.9)
    p, state = train(p, tx, tx.init(p), n=2, frozen=False)  # phase 1 trains everything
    after, _ = train(p, tx, state)  # phase 2 freezes the backbone with zero gradients only
    assert not same(p["backbone"], after["backbone"])
    report = check_state(p, SPEC, state)
    assert report.kinds == ("optimizer-updates-frozen",) and report.findings[0].bytes == 40 * 4  # the trace

    new = llj.optimizer(optax.sgd(0.1, momentum=0.9), p, SPEC)
    kept = llj.carry_state(new.init(p), state)
    assert not check_state(p, SPEC, kept)


def test_an_equinox_model_is_checked_by_its_field_paths():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    spec = ll.freeze("layers.0")
    state = optax.adam(1e-3).init(eqx.filter(model, eqx.is_array))
    found = check_state(model, spec, state).findings[0]
    assert found.paths == ("layers.0.weight", "layers.0.bias") and found.bytes == 2 * 12 * 4
    tx = llj.optimizer(optax.adam(1e-3), model, spec)
    assert not check_state(model, spec, tx.init(eqx.filter(model, eqx.is_array)))


def test_a_stateless_transformation_is_reported_as_not_checked():
    p = params()
    tx = optax.sgd(0.1)
    after, _ = train(p, tx, tx.init(p), frozen=False)  # it moves whatever it gets a gradient for
    assert not same(p["backbone"], after["backbone"])
    report = check_state(p, SPEC, tx.init(p))
    assert not report and report.not_checked and "which leaves the transformation updates" in report.not_checked[0]
    assert str(report).startswith("layerlock.check: no freezing problems found in what was checked\nnot checked: ")


def test_check_state_takes_the_plan_of_another_bn_policy():
    p = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
    state = optax.adam(0.1).init(p)
    assert not check_state(p, ll.unfreeze(), state)
    found = check_state(p, llj.plan(p, ll.unfreeze(), bn="frozen"), state).findings[0]
    assert found.paths == ("BatchNorm_0.scale", "BatchNorm_0.bias")


def test_check_state_takes_a_spec_and_is_strict_by_default():
    p = params()
    with pytest.raises(ll.SpecError, match="received dict"):
        check_state(p, {"backbone": False}, optax.adam(0.1).init(p))
    with pytest.raises(ll.NoMatchError):
        check_state(p, ll.freeze("backbnoe"), optax.adam(0.1).init(p))
    with pytest.warns(UserWarning):
        assert not check_state(p, ll.freeze("backbnoe"), optax.adam(0.1).init(p), strict=False)


@pytest.mark.parametrize("tree", [params(), [jnp.ones(2)], (jnp.ones(2),)], ids=["dict", "list", "tuple"])
def test_ll_check_on_a_pytree_points_to_the_pytree_check(tree):
    with pytest.raises(ll.BackendError, match=r"layerlock\.jax\.check\(tree, spec, opt_state\)") as caught:
        ll.check(tree)
    assert "received" in str(caught.value)


def test_ll_check_on_an_equinox_model_points_to_the_pytree_check():
    eqx = pytest.importorskip("equinox")
    with pytest.raises(ll.BackendError, match=r"(?s)equinox.*layerlock\.jax\.check"):
        ll.check(eqx.nn.Linear(2, 2, key=jax.random.key(0)))


@pytest.mark.parametrize("thing", ["resnet50", 3, object()], ids=["str", "int", "object"])
def test_ll_check_on_what_is_no_model_names_what_it_received(thing):
    with pytest.raises(ll.BackendError, match="received") as caught:
        ll.check(thing)
    message = str(caught.value)
    assert type(thing).__qualname__ in message and "layerlock.jax.check" not in message
