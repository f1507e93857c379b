"""Per-parameter learning rates in optax and Flax NNX mean what they mean in torch:
``param_groups`` rates (``lr_mult``, ``layer_decay``, ``weight_decay``, ``no_decay``) move each
leaf by its rate, and a Schedule phase's ``lr`` is the rate of what the phase makes trainable
while what was already training keeps its rate and its moments.

A step's movement is measured as the update the optimizer returns (``nnx.Optimizer.update``,
``tx.update``), which is what it adds to the weights: a float32 weight near 0.5 minus itself
after a step of 1e-4 is only good to about 1e-3, too coarse for rtol 1e-5."""

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.flax as llf  # noqa: E402
import layerlock.jax as llj  # noqa: E402

BASE, PHASE_LR = 1e-2, 1e-3
RTOL = 1e-5
EXPECTED = {"body": PHASE_LR / BASE, "head": 1.0}


def schedule(lr=PHASE_LR, at=1):
    return ll.Schedule({0: ll.freeze("body"), at: ll.unfreeze()}, lr=None if lr is None else {at: lr})


class Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


X = np.random.default_rng(0).normal(size=(5, 3))
Y = np.random.default_rng(1).normal(size=(5, 2))


def loss_fn(model, x=X, y=Y):
    return jnp.mean((model(jnp.asarray(x, jnp.float32)) - jnp.asarray(y, jnp.float32)) ** 2)


def grads_of(model):
    return nnx.grad(loss_fn, argnums=nnx.DiffState(0, llf.trainable))(model)


@nnx.jit
def jit_step(model, optimizer):
    optimizer.update(model, grads_of(model))


def by_path(state):
    return {".".join(map(str, k)): np.array(v) for k, v in nnx.to_flat_state(state)}


def weights(model):
    return by_path(nnx.state(model, nnx.Param))


def nnx_step(model, optimizer):
    """One real step; the update it applied, by path (checked to be what moved the weights)."""
    before, grads = weights(model), grads_of(model)
    updates = by_path(optimizer.update(model, grads))
    after = weights(model)
    for path in before:
        assert after[path].tobytes() == (before[path] + updates.get(path, np.float32(-0.0))).tobytes(), path
    return updates, by_path(grads)


def assert_moves_scale(delta, reference, expected):
    for path, d in delta.items():
        assert np.abs(d).max() > 0, path
        np.testing.assert_allclose(d, expected[path.split(".")[0]] * reference[path], rtol=RTOL, atol=0, err_msg=path)


def sgd(lr=BASE):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)


# -- THE measurement: NNX FreezeScheduler ---------------------------------------------------------

def nnx_step_after_the_change(lr, logs=None):
    """One real SGD step after the phase change, from the same weights; the movement."""
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, sgd(), wrt=llf.trainable)
    freezer = llf.FreezeScheduler(schedule(lr), model, optimizer, log=None if logs is None else logs.append)
    freezer.step(0)
    freezer.step(1)
    return nnx_step(model, optimizer)[0]


def test_nnx_phase_lr_trains_what_it_unfreezes_at_lr_and_the_rest_at_its_own_rate():
    logs = []
    assert_moves_scale(nnx_step_after_the_change(PHASE_LR, logs=logs), nnx_step_after_the_change(None), EXPECTED)
    assert logs[-1].endswith("; optimizer +2 tensors at lr 0.001")


def test_nnx_phase_lr_is_relative_to_a_multi_transform_group_rate():
    groups = lambda model: llf.param_groups(model, BASE, lr_mult={"head": 2.0})  # noqa: E731
    runs = {}
    for lr in (PHASE_LR, None):
        model = Net(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, llj.multi_transform(optax.sgd, groups(model)), wrt=llf.trainable)
        freezer = llf.FreezeScheduler(schedule(lr), model, optimizer, log=None)
        freezer.step(0), freezer.step(1)
        runs[lr] = nnx_step(model, optimizer)
    (with_lr, grads), (without, _) = runs[PHASE_LR], runs[None]
    for path, delta in with_lr.items():   # the body at the phase lr, the head at its group's rate
        rate = PHASE_LR if path.startswith("body") else 2 * BASE
        np.testing.assert_allclose(delta, -rate * grads[path], rtol=RTOL, err_msg=path)
        rate = BASE if path.startswith("body") else 2 * BASE   # without lr: each at its group's rate
        np.testing.assert_allclose(without[path], -rate * grads[path], rtol=RTOL, err_msg=path)


def test_nnx_new_parameters_follow_the_schedule_factor_from_their_phase_lr():
    factor = lambda count: 0.5 ** count  # noqa: E731
    model = Net(nnx.Rngs(0))
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lambda count: BASE * factor(count))
    optimizer = nnx.Optimizer(model, tx, wrt=llf.trainable)
    freezer = llf.FreezeScheduler(schedule(at=2), model, optimizer, log=None)
    for step in range(4):
        freezer.step(step)
        updates, grads = nnx_step(model, optimizer)
        assert sorted(updates) == (sorted(grads) if step >= 2 else ["head.bias", "head.kernel"])
        for path, u in updates.items():
            rate = (PHASE_LR if path.startswith("body") else BASE) * factor(step)
            np.testing.assert_allclose(u, -rate * grads[path], rtol=RTOL, err_msg=path)


def nnx_run(epochs, interrupt_at=None):
    """Adam under a phase lr, jitted steps; optionally interrupted and resumed."""
    def fresh():
        model = Net(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=BASE), wrt=llf.trainable)
        return model, optimizer, llf.FreezeScheduler(schedule(at=2), model, optimizer, log=None)

    model, optimizer, freezer = fresh()
    for epoch in range(epochs):
        if epoch == interrupt_at:
            saved = nnx.state(model), nnx.state(optimizer), freezer.state_dict()
            model, optimizer, freezer = fresh()
            freezer.load_state_dict(saved[2])    # before the optimizer: replays the phases
            assert jax.tree.structure(nnx.state(optimizer)) == jax.tree.structure(saved[1])
            nnx.update(model, saved[0])
            nnx.update(optimizer, saved[1])
        freezer.step(epoch)
        jit_step(model, optimizer)
        jit_step(model, optimizer)
    return weights(model)


@pytest.mark.parametrize("interrupt_at", [1, 3], ids=["before-the-change", "after-the-change"])
def test_a_resumed_nnx_run_with_a_phase_lr_ends_bit_identical(interrupt_at):
    straight, resumed = nnx_run(4), nnx_run(4, interrupt_at=interrupt_at)
    assert all(straight[k].tobytes() == resumed[k].tobytes() for k in straight)


# -- the same measurement in a plain optax loop ---------------------------------------------------

def pytree_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"body": {"w": jax.random.normal(k1, (3, 4)), "b": jnp.zeros(4)},
            "head": {"w": jax.random.normal(k2, (4, 2)), "b": jnp.zeros(2)}}


def pytree_loss(params, x=X, y=Y):
    h = jnp.tanh(x @ params["body"]["w"] + params["body"]["b"])
    return jnp.mean((h @ params["head"]["w"] + params["head"]["b"] - y) ** 2)


def flat(tree):
    """Leaf path -> array, paths as layerlock names them."""
    def name(keys):
        return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)

    return {name(keys): np.asarray(v) for keys, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def pytree_update_after_the_change(lr, route):
    """A plain optax loop: phase 1 trains the head, phase 2 everything (at ``lr`` for the body)."""
    params = pytree_params()
    spec = ll.freeze("body")
    head, _ = llj.partition(params, spec)
    if route == "scale_by_rates":
        tx = optax.chain(sgd(), llj.scale_by_rates())
        state = tx.init(head)
        state = llj.carry_state(tx.init(params), state)     # phase 2: the body joins
        if lr is not None:
            base = llj.base_rates(tx, params)
            state = llj.set_multipliers(state, {p: lr / base[p] for p in ("body.w", "body.b")})
    else:   # a group per phase: the head's group from phase 1, the body's added at phase 2
        groups = llj.param_groups(head, BASE)
        state = llj.multi_transform(optax.sgd, groups).init(params)
        groups.append({"name": "phase2", "lr": lr or BASE, "params": ["body.w", "body.b"]})
        tx = llj.multi_transform(optax.sgd, groups)
        state = llj.carry_state(tx.init(params), state)
    grads = jax.grad(pytree_loss)(params)
    updates, _ = tx.update(grads, state, params)
    return flat(updates)


@pytest.mark.parametrize("route", ["scale_by_rates", "multi_transform"])
def test_plain_optax_loop_phase_lr_trains_what_it_unfreezes_at_lr(route):
    assert_moves_scale(pytree_update_after_the_change(PHASE_LR, route),
                       pytree_update_after_the_change(None, route), EXPECTED)


# -- param_groups / multi_transform ---------------------------------------------------------------

def linen_params():
    keys = jax.random.split(jax.random.key(1), 3)
    sizes = [(3, 4), (4, 4), (4, 2)]
    return {"params": {f"Dense_{i}": {"kernel": jax.random.normal(k, s), "bias": jnp.full(s[1], 0.5)}
                       for i, (k, s) in enumerate(zip(keys, sizes))}}


def equinox_mlp():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, width_size=4, depth=2, key=jax.random.key(2))
    return eqx.filter(model, eqx.is_array), "layers"


def random_like(tree, seed=3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def rate_of(groups, key="lr"):
    return {p: g.get(key, 0.0) for g in groups for p in g["params"]}


TREES = {"linen": lambda: (linen_params(), "params"), "equinox": equinox_mlp}


@pytest.mark.parametrize("kind", TREES)
def test_one_sgd_step_moves_each_leaf_by_its_rate_times_its_gradient(kind):
    params, within = TREES[kind]()
    top = f"{within}.2" if kind == "equinox" else f"{within}.Dense_2"
    groups = llj.param_groups(params, BASE, layer_decay=0.5, within=within, lr_mult={top: 3.0})
    tx = llj.multi_transform(optax.sgd, groups)
    grads = random_like(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    rates, g, u = rate_of(groups), flat(grads), flat(updates)
    assert set(rates) == set(u) and len(set(rates.values())) == 3
    for path in u:
        np.testing.assert_allclose(u[path], -rates[path] * g[path], rtol=RTOL, err_msg=path)


@pytest.mark.parametrize("kind", TREES)
def test_layer_decay_blocks_are_the_blocks_freeze_depth_counts(kind):
    params, within = TREES[kind]()
    rates = rate_of(llj.param_groups(params, 1.0, layer_decay=0.5, within=within))
    below, block_rates = set(), []
    for k in range(1, 4):
        frozen = set(llj.plan(params, ll.freeze(depth=k, within=within)).frozen)
        block = frozen - below
        assert block and len({rates[p] for p in block}) == 1, (k, block)
        block_rates.append(rates[next(iter(block))])
        below = frozen
    assert block_rates[1] / block_rates[0] == block_rates[2] / block_rates[1] == 2.0   # each block 1/0.5 the one below


def test_adamw_groups_get_their_rate_and_weight_decay_and_no_decay_leaves_none():
    params = linen_params()
    groups = llj.param_groups(params, BASE, weight_decay=0.1, no_decay="*bias", lr_mult={"params.Dense_2": 3.0})
    tx = llj.multi_transform(optax.adamw, groups)
    grads = random_like(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    rates, decays, g, p, u = rate_of(groups), rate_of(groups, "weight_decay"), flat(grads), flat(params), flat(updates)
    assert {decays[k] for k in u if k.endswith("bias")} == {0.0} and {decays[k] for k in u if k.endswith("kernel")} == {0.1}
    for k in u:   # AdamW's first step: -lr * (g / (|g| + eps) + wd * p)
        np.testing.assert_allclose(u[k], -rates[k] * (g[k] / (np.abs(g[k]) + 1e-8) + decays[k] * p[k]), rtol=RTOL,
                                   err_msg=k)


def sgd_momentum_with_decay(lr, weight_decay=0.0):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=0.9))


@pytest.mark.parametrize("rated", [False, True], ids=["multi_transform", "with-scale_by_rates"])
def test_frozen_leaves_are_bit_identical_after_momentum_and_weight_decay_steps(rated):
    params = linen_params()
    spec = ll.freeze("params.Dense_0")
    trainable, _ = llj.partition(params, spec)
    tx = llj.multi_transform(sgd_momentum_with_decay, llj.param_groups(trainable, BASE, weight_decay=0.5,
                                                                       layer_decay=0.5, within="params"))
    tx = optax.chain(tx, llj.scale_by_rates()) if rated else tx
    state = tx.init(params)
    if rated:
        state = llj.set_multipliers(state, {"params.Dense_0.kernel": 0.5, "params.Dense_1.kernel": 0.5})

    @jax.jit
    def step(params, state, seed):
        updates, state = tx.update(random_like(params, seed), state, params)
        return optax.apply_updates(params, updates), state

    new = params
    for seed in range(3):
        new, state = step(new, state, seed)
    before, after = flat(params), flat(new)
    for path in before:
        assert (before[path].tobytes() == after[path].tobytes()) == path.startswith("params.Dense_0"), path


def test_nnx_optimizer_from_flax_param_groups_moves_each_parameter_by_its_rate():
    model = Net(nnx.Rngs(0))
    groups = llf.param_groups(model, BASE, layer_decay=0.5)
    optimizer = nnx.Optimizer(model, llj.multi_transform(optax.sgd, groups), wrt=llf.trainable)
    updates, grads = nnx_step(model, optimizer)
    assert rate_of(groups) == {"body.kernel": BASE / 2, "body.bias": BASE / 2, "head.kernel": BASE, "head.bias": BASE}
    for path, u in updates.items():
        np.testing.assert_allclose(u, -rate_of(groups)[path] * grads[path], rtol=RTOL, err_msg=path)


def test_flax_param_groups_cover_frozen_parameters_and_list_a_shared_one_under_each_path():
    model = Net(nnx.Rngs(0))
    ll.apply(model, ll.freeze("body"))
    assert [p for g in llf.param_groups(model, BASE) for p in g["params"]] == [
        "body.kernel", "body.bias", "head.kernel", "head.bias"]
    shared = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    model = nnx.Sequential(shared, shared)
    assert llf.param_groups(model, BASE)[0]["params"] == [
        "layers.0.kernel", "layers.1.kernel", "layers.0.bias", "layers.1.bias"]


# -- moments kept ---------------------------------------------------------------------------------

def adam_state(optimizer, part, path):
    """The Adam mu / nu leaf of ``path`` in an inject_hyperparams(adam) state (chained or not)."""
    state = optimizer.opt_state
    state = state[0] if type(state) is tuple else state   # chained with scale_by_rates
    node = getattr(state.inner_state[0], part)
    for key in path.split("."):
        node = node[key]
    return np.array(node[...])


def test_a_sync_that_adds_parameters_at_a_new_lr_keeps_the_moments_of_the_others():
    model = Net(nnx.Rngs(0))
    ll.apply(model, ll.freeze("body"))
    optimizer = nnx.Optimizer(model, optax.inject_hyperparams(optax.adam)(learning_rate=BASE), wrt=llf.trainable)
    for _ in range(2):
        optimizer.update(model, grads_of(model))
    kept = {(part, p): adam_state(optimizer, part, p) for part in ("mu", "nu") for p in ("head.kernel", "head.bias")}
    count = int(optimizer.opt_state.count[...])
    ll.apply(model, ll.unfreeze("body.kernel"))
    assert llf.sync_optimizer(optimizer, model, lr=PHASE_LR) == ["body.kernel"]    # chains scale_by_rates
    ll.apply(model, ll.unfreeze())
    assert llf.sync_optimizer(optimizer, model, lr=PHASE_LR / 10) == ["body.bias"]
    for (part, p), value in kept.items():
        assert adam_state(optimizer, part, p).tobytes() == value.tobytes(), (part, p)
    assert int(optimizer.opt_state[0].count[...]) == count
    assert not adam_state(optimizer, "mu", "body.kernel").any()
    multipliers = {p: float(m[...]) for p, m in optimizer.opt_state[1].multipliers.items()}
    assert multipliers == pytest.approx({"head.kernel": 1.0, "head.bias": 1.0, "body.kernel": 0.1, "body.bias": 0.01})
    optimizer.update(model, grads_of(model))   # and it steps


# -- bad input changes nothing --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1e-3}, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"lr": float("inf")}, "lr must be a finite number > 0"),
    ({"lr": BASE, "layer_decay": 0.0}, "layer_decay must be a number in \\(0, 1\\]"),
    ({"lr": BASE, "layer_decay": 1.5}, "layer_decay must be a number in \\(0, 1\\]"),
    ({"lr": BASE, "lr_mult": {"body": -1.0}}, "lr_mult\\['body'\\] must be a finite number >= 0"),
], ids=["negative", "nan", "inf", "decay-0", "decay-1.5", "negative-mult"])
@pytest.mark.parametrize("framework", ["jax", "flax"])
def test_bad_rates_are_refused(framework, kwargs, message):
    tree = pytree_params() if framework == "jax" else Net(nnx.Rngs(0))
    with pytest.raises(ll.SpecError, match=message):
        (llj if framework == "jax" else llf).param_groups(tree, **kwargs)


@pytest.mark.parametrize("framework", ["jax", "flax"])
def test_a_multiplier_pattern_that_matches_nothing_raises_no_match(framework):
    tree = pytree_params() if framework == "jax" else Net(nnx.Rngs(0))
    module = llj if framework == "jax" else llf
    with pytest.raises(ll.NoMatchError, match="lr_mult.*'bodyy'"):
        module.param_groups(tree, BASE, lr_mult={"bodyy": 0.1})
    with pytest.warns(ll.LayerlockWarning):
        module.param_groups(tree, BASE, lr_mult={"bodyy": 0.1}, strict=False)


@pytest.mark.parametrize("groups, message", [
    ([{"name": "a", "lr": -1.0, "params": ["body.w"]}], "groups\\[0\\]\\['lr'\\] must be a finite number > 0"),
    ([{"name": "a", "lr": 1.0, "params": ["body.w"]}, {"name": "b", "lr": 1.0, "params": ["body.w"]}],
     "'body.w' is in group 'a' already"),
    ([{"name": "a", "lr": 1.0, "params": ["body.w"]}, {"name": "a", "lr": 1.0, "params": []}], "'name' must be"),
    ([{"name": "a", "lr": 1.0, "weight_decay": 0.1, "params": ["body.w"]}], "refused .*optax.adamw"),
    ([{"name": "a", "lr": 1.0}], "must be a dict with 'name', 'lr' and 'params'"),
], ids=["negative-lr", "two-groups", "same-name", "weight-decay-sgd", "no-params"])
def test_bad_groups_are_refused(groups, message):
    with pytest.raises(ll.SpecError, match=message):
        llj.multi_transform(optax.sgd, groups)


def test_groups_made_for_another_tree_are_refused_at_init():
    tx = llj.multi_transform(optax.sgd, llj.param_groups(linen_params(), BASE))
    with pytest.raises(ll.SpecError, match="none of this tree's leaves.*build the groups from the pytree you train"):
        tx.init(pytree_params())


def test_set_multipliers_refuses_unknown_paths_and_states_without_rates():
    params = pytree_params()
    state = optax.chain(sgd(), llj.scale_by_rates()).init(params)
    with pytest.raises(ll.SpecError, match="no leaf 'body.x'; its leaves: body.b, body.w"):
        llj.set_multipliers(state, {"body.x": 0.1})
    with pytest.raises(ll.SpecError, match="no scale_by_rates part"):
        llj.set_multipliers(sgd().init(params), {"body.w": 0.1})
    with pytest.raises(ll.SpecError, match="must be a finite number >= 0"):
        llj.set_multipliers(state, {"body.w": float("nan")})


def snapshot(model, optimizer):
    """What a refusal must leave alone: the transformation, the state and the trainable flags."""
    return (optimizer.tx, jax.tree.structure(optimizer.opt_state),
            [np.array(x) for x in jax.tree.leaves(optimizer.opt_state)],
            [(k, llf.is_trainable(v)) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))])


def assert_unchanged(model, optimizer, before):
    tx, structure, leaves, flags = snapshot(model, optimizer)
    assert tx is before[0] and structure == before[1] and flags == before[3]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(leaves, before[2]))


@pytest.mark.parametrize("tx, message", [
    (optax.adam(BASE), "no optax.inject_hyperparams part.*inject_hyperparams\\(optax.adam\\)\\(learning_rate=1e-3\\)"
                       ".*multi_transform"),
    (optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(0.0, BASE, 10)),
     "learning rate at step 0 is 0.*warmup"),
], ids=["plain-adam", "warmup-from-0"])
def test_a_phase_lr_with_an_optimizer_whose_rate_cannot_be_read_is_refused_before_anything_changes(tx, message):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=llf.trainable)
    before = snapshot(model, optimizer)
    with pytest.raises(ll.SpecError, match="layerlock.flax.FreezeScheduler: this schedule sets a phase lr "
                                           "\\(epoch 1: lr=0.001\\), which is not supported by this optimizer.*"
                                           + message):
        llf.FreezeScheduler(schedule(), model, optimizer, log=None)
    assert_unchanged(model, optimizer, before)
    ll.apply(model, ll.freeze("body"))
    optimizer = nnx.Optimizer(model, tx, wrt=llf.trainable)
    ll.apply(model, ll.unfreeze())
    before = snapshot(model, optimizer)
    with pytest.raises(ll.SpecError, match="layerlock.flax.sync_optimizer: lr=0.001, which is not supported"):
        llf.sync_optimizer(optimizer, model, lr=PHASE_LR)
    assert_unchanged(model, optimizer, before)


def test_a_direct_sync_with_lr_on_a_stateless_optimizer_is_refused_before_anything_changes():
    model = Net(nnx.Rngs(0))
    ll.apply(model, ll.freeze("body"))
    optimizer = nnx.Optimizer(model, sgd(), wrt=llf.trainable)   # no state per parameter: who is new?
    ll.apply(model, ll.unfreeze())
    before = snapshot(model, optimizer)
    with pytest.raises(ll.SpecError, match="cannot tell which parameters this optimizer already trains.*"
                                           "scale_by_rates.*FreezeScheduler"):
        llf.sync_optimizer(optimizer, model, lr=PHASE_LR)
    assert_unchanged(model, optimizer, before)
    with pytest.raises(ll.SpecError, match="lr must be a finite number > 0"):
        llf.sync_optimizer(optimizer, model, lr=-1.0)
    assert_unchanged(model, optimizer, before)


def test_a_stateless_optimizer_built_with_scale_by_rates_takes_a_direct_phase_lr():
    model = Net(nnx.Rngs(0))
    ll.apply(model, ll.freeze("body"))
    optimizer = nnx.Optimizer(model, optax.chain(sgd(), llj.scale_by_rates()), wrt=llf.trainable)
    ll.apply(model, ll.unfreeze())
    assert llf.sync_optimizer(optimizer, model, lr=PHASE_LR) == ["body.kernel", "body.bias"]
    assert float(optimizer.opt_state[1].multipliers["body.kernel"][...]) == pytest.approx(0.1)
    assert float(optimizer.opt_state[1].multipliers["head.kernel"][...]) == 1.0


def test_a_phase_lr_without_an_optimizer_is_refused():
    with pytest.raises(ll.SpecError, match="none was given \\(optimizer=None\\)"):
        llf.FreezeScheduler(schedule(), Net(nnx.Rngs(0)), log=None)


def test_a_parameter_in_no_group_of_a_multi_transform_is_refused_when_added():
    model = Net(nnx.Rngs(0))
    ll.apply(model, ll.freeze("body"))
    groups = [g for g in llf.param_groups(model, BASE, layer_decay=0.5) if g["name"] == "block1"]  # the head only
    optimizer = nnx.Optimizer(model, llj.multi_transform(optax.adam, groups), wrt=llf.trainable)
    ll.apply(model, ll.unfreeze())
    before = snapshot(model, optimizer)
    with pytest.raises(ll.SpecError, match="body.bias, body.kernel are in no group.*never move them"):
        llf.sync_optimizer(optimizer, model)
    assert_unchanged(model, optimizer, before)


@pytest.mark.parametrize("kind", TREES)
def test_scale_by_rates_from_groups_moves_each_leaf_by_its_group_rate_through_one_optimizer(kind):
    params, within = TREES[kind]()
    groups = llj.param_groups(params, BASE, layer_decay=0.5, within=within)
    tx = optax.chain(optax.sgd(BASE), llj.scale_by_rates(groups, lr=BASE))
    grads = random_like(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    rates, g, u = rate_of(groups), flat(grads), flat(updates)
    for path in u:
        np.testing.assert_allclose(u[path], -rates[path] * g[path], rtol=RTOL, err_msg=path)
    with pytest.raises(ll.SpecError, match="scale_by_rates: lr .* received None"):
        llj.scale_by_rates(groups)
