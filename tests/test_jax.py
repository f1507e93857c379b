"""JAX: the Flax NNX backend (real nnx.jit training steps) and the functional pytree API
(Equinox, linen-style param dicts) with optax. Tiny models, CPU, a few steps each."""

import copy

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.flax as llf  # noqa: E402
import layerlock.jax as llj  # noqa: E402


class Net(nnx.Module):
    def __init__(self, rngs):
        self.backbone = nnx.Sequential(nnx.Conv(1, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs))
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.backbone(x)).mean((1, 2))
        return self.head(self.drop(x))


def batch(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (8, 6, 6, 1)), jax.random.normal(k2, (8, 2))


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, llf.trainable))(model)
    optimizer.update(model, grads)
    return loss


def values(tree):
    return [np.asarray(x).copy() for x in jax.tree.leaves(tree)]


def array_leaves(state):
    return [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]


@pytest.fixture
def net():
    model = Net(nnx.Rngs(0))
    model.train()
    return model


def test_frozen_backbone_is_bit_identical_after_jitted_adamw_and_bn_stats_stay(net):
    plan = ll.apply(net, ll.freeze("backbone"))
    assert plan.held == ("backbone.layers.1",)
    opt = nnx.Optimizer(net, optax.adamw(1e-2, weight_decay=0.5), wrt=llf.trainable)
    frozen, stats = ll.fingerprint(net, "frozen"), values(nnx.state(net.backbone, nnx.BatchStat))
    head = values(nnx.state(net.head))
    for step in range(3):
        train_step(net, opt, *batch(step))
    assert ll.fingerprint(net, "frozen") == frozen
    assert all(np.array_equal(a, b) for a, b in zip(values(nnx.state(net.backbone, nnx.BatchStat)), stats))
    assert not any(np.array_equal(a, b) for a, b in zip(values(nnx.state(net.head)), head))
    # the optimizer holds Adam moments for the head only (kernel and bias, mu and nu)
    assert len(array_leaves(opt.opt_state)) == 4


def test_unfreeze_between_jitted_steps_trains_backbone_and_keeps_adam_state(net):
    ll.apply(net, ll.freeze("backbone"))
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=llf.trainable)
    train_step(net, opt, *batch(0))
    kept = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(opt.opt_state))}
    ll.apply(net, ll.unfreeze())
    assert not net.backbone.layers[1].use_running_average  # hold released to the train() mode
    added = llf.sync_optimizer(opt, net)
    assert added == ["backbone.layers.0.kernel", "backbone.layers.0.bias",
                     "backbone.layers.1.scale", "backbone.layers.1.bias"]
    now = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(opt.opt_state))}
    assert kept and all(np.array_equal(now[k], v) for k, v in kept.items())  # moments and count kept
    before = ll.fingerprint(net.backbone, "all")
    train_step(net, opt, *batch(1))
    assert ll.fingerprint(net.backbone, "all") != before
    assert int(opt.step[...]) == 2


def test_freezing_after_a_step_shrinks_the_optimizer_and_stops_the_weights(net):
    opt = nnx.Optimizer(net, optax.adamw(1e-2, weight_decay=0.5), wrt=llf.trainable)
    train_step(net, opt, *batch(0))
    ll.apply(net, ll.freeze("head"))
    assert llf.sync_optimizer(opt, net) == []
    assert len(array_leaves(opt.opt_state)) == 8  # backbone conv + bn params, mu and nu
    head = ll.fingerprint(net.head, "all")
    train_step(net, opt, *batch(1))
    assert ll.fingerprint(net.head, "all") == head


def test_trainable_flag_survives_split_merge_and_the_filter_selects_exactly_it(net):
    ll.apply(net, ll.freeze("backbone").unfreeze("*.bias"))
    graphdef, state = nnx.split(net)
    copy = nnx.merge(graphdef, state)
    paths = sorted(".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(copy, llf.trainable)))
    assert paths == sorted(ll.plan(net, ll.Spec()).trainable)
    assert paths == ["backbone.layers.0.bias", "backbone.layers.1.bias", "head.bias", "head.kernel"]


def test_held_batchnorm_stays_in_inference_mode_through_train_and_restore_is_exact(net):
    state = ll.snapshot(net)
    with ll.frozen(net, ll.freeze("backbone"), frozen_mode="eval"):
        net.train()
        assert net.backbone.layers[1].use_running_average
        net.eval()
        net.train()
        assert net.backbone.layers[1].use_running_average and not net.drop.deterministic
    assert ll.snapshot(net) == state
    assert not net.backbone.layers[1].use_running_average


def test_bn_policies_set_use_running_average(net):
    ll.apply(net, ll.freeze(), bn="trainable")
    assert llf.is_trainable(net.backbone.layers[1].scale) and not net.backbone.layers[1].use_running_average
    ll.apply(net, ll.unfreeze(), bn="frozen")
    assert not llf.is_trainable(net.backbone.layers[1].scale) and net.backbone.layers[1].use_running_average


def test_depth_counts_the_items_of_a_list_of_layers(net):
    assert ll.plan(net, ll.freeze(depth=1, within="backbone.layers")).frozen == (
        "backbone.layers.0.kernel", "backbone.layers.0.bias")
    assert ll.plan(net, ll.freeze(depth=1)).frozen == ll.plan(net, ll.freeze("backbone")).frozen


def test_a_pattern_matching_nothing_raises_and_changes_nothing(net):
    state = ll.snapshot(net)
    with pytest.raises(ll.NoMatchError, match="backbone"):
        ll.apply(net, ll.freeze("backbone").unfreeze("bakcbone.layers.0"))
    assert ll.snapshot(net) == state


def test_freeze_scheduler_moves_an_nnx_model_through_phases(net):
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=llf.trainable)
    logs = []
    fs = llf.FreezeScheduler(ll.Schedule({0: ll.freeze("backbone"), 1: ll.unfreeze()}), net, opt, log=logs.append)
    fs.step(0)
    train_step(net, opt, *batch(0))
    fs.step(1)
    train_step(net, opt, *batch(1))
    assert fs.phase == 1 and "optimizer +4 tensors" in logs[-1]


# The functional API: Equinox modules and linen-style param dicts.

def linen_params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"params": {"Dense_0": {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jnp.zeros(4)},
                       "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.full(4, -0.0)},  # signed zeros
                       "Dense_1": {"kernel": jax.random.normal(k[1], (4, 1)), "bias": jnp.zeros(1)}}}


def test_linen_dict_frozen_leaves_are_bit_identical_under_adamw_and_have_no_state():
    params = linen_params()
    spec = ll.freeze(depth=2, within="params")
    tx = llj.optimizer(optax.adamw(1e-2, weight_decay=0.5), params, spec)
    state = tx.init(params)
    assert len(array_leaves(state)) == 4  # Dense_1 kernel and bias, mu and nu

    @jax.jit
    def step(params, state, x):
        grads = jax.grad(lambda p: jnp.sum((x @ p["params"]["Dense_0"]["kernel"] @ p["params"]["Dense_1"]["kernel"]
                                            + p["params"]["BatchNorm_0"]["bias"].sum()) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new = params
    for i in range(3):
        new, state = step(new, state, jax.random.normal(jax.random.key(i), (5, 3)))
    new, state = step.__wrapped__(new, state, jnp.ones((5, 3)))  # eagerly too: XLA may fold x + 0 under jit
    trainable = llj.trainable_mask(params, spec)
    for old, now, keep in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(trainable)):
        assert keep or np.asarray(old).tobytes() == np.asarray(now).tobytes()  # bits, so -0.0 stays -0.0
    assert not np.array_equal(params["params"]["Dense_1"]["kernel"], new["params"]["Dense_1"]["kernel"])


def test_linen_kinds_come_from_the_module_names():
    assert llj.plan(linen_params(), ll.freeze(kind="Dense")).frozen == (
        "params.Dense_0.kernel", "params.Dense_0.bias", "params.Dense_1.kernel", "params.Dense_1.bias")


def test_linen_families_read_the_module_names():
    assert llj.plan(linen_params(), ll.freeze(kind="family:dense")).frozen == llj.plan(
        linen_params(), ll.freeze(kind="Dense")).frozen
    assert llj.plan(linen_params(), ll.freeze(kind="family:norm")).frozen == (
        "params.BatchNorm_0.scale", "params.BatchNorm_0.bias")


def test_a_function_in_an_nnx_sequential_is_a_block_without_parameters():
    r = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=r), nnx.relu, nnx.Linear(3, 3, rngs=r), nnx.Linear(3, 1, rngs=r))
    tree = ll.backends.get_backend(model).tree(model)
    assert tree.layer_paths == ["", "layers", "layers.0", "layers.1", "layers.2", "layers.3"]
    assert ll.plan(model, ll.freeze(depth=2)).frozen == ("layers.0.kernel", "layers.0.bias")  # Linear, relu
    assert ll.plan(model, ll.freeze(depth=-1)).trainable == ("layers.3.kernel", "layers.3.bias")
    assert ll.plan(model, ll.freeze(depth=4)).trainable == ()


def test_an_nnx_module_whose_only_child_is_a_sequential_counts_its_layers(net):
    assert ll.plan(net, ll.freeze(depth=1, within="backbone")).frozen == (
        "backbone.layers.0.kernel", "backbone.layers.0.bias")


def test_depth_on_a_pytree_list_counts_its_functions_as_entries():
    eqx = pytest.importorskip("equinox")
    k = jax.random.split(jax.random.key(0), 2)
    model = {"layers": [eqx.nn.Linear(2, 3, key=k[0]), jax.nn.relu, eqx.nn.Linear(3, 1, key=k[1])]}
    plan = llj.plan(model, ll.freeze(depth=2))
    assert plan.frozen == ("layers.0.weight", "layers.0.bias") and plan.blocks == {
        "layers": ("layers.0", "layers.1", "layers.2")}
    assert llj.plan(model, ll.freeze(depth=-1)).trainable == ("layers.2.weight", "layers.2.bias")


def test_depth_on_an_equinox_mlp_counts_its_layers():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(2, 1, 8, depth=2, key=jax.random.key(0))
    assert llj.plan(model, ll.freeze(depth=1)).frozen == ("layers.0.weight", "layers.0.bias")
    assert llj.plan(model, ll.freeze(depth=-1)).trainable == ("layers.2.weight", "layers.2.bias")
    with pytest.raises(ll.SpecError, match="has 3 blocks, the entries of 'layers'"):
        llj.plan(model, ll.freeze(depth=4))


def test_equinox_mlp_trains_only_the_last_layer_and_partition_combines_back():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(2, 1, 8, depth=2, key=jax.random.key(0))
    spec = ll.freeze("layers").unfreeze("layers.2")
    tx = llj.optimizer(optax.adamw(1e-2, weight_decay=0.5), model, spec)
    state = tx.init(eqx.filter(model, eqx.is_array))
    assert len(array_leaves(state)) == 4

    @eqx.filter_jit
    def step(model, state, x, y):
        grads = eqx.filter_grad(lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2))(model)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state

    x, y = batch(0)[1], jnp.ones((8, 1))
    new = model
    for _ in range(3):
        new, state = step(new, state, x, y)
    assert np.array_equal(new.layers[0].weight, model.layers[0].weight)
    assert np.array_equal(new.layers[1].bias, model.layers[1].bias)
    assert not np.array_equal(new.layers[2].weight, model.layers[2].weight)
    trainable, frozen = llj.partition(model, spec)
    assert trainable.layers[0].weight is None and frozen.layers[2].weight is None
    assert eqx.tree_equal(llj.combine(trainable, frozen), model)
    assert eqx.tree_equal(eqx.combine(*eqx.partition(model, llj.trainable_mask(model, spec))), model)


@pytest.mark.parametrize("bad, message", [
    (jnp.ones(3), "received an array of shape \\(3,\\)"),
    ("weights", "received str"),
    ({"w": jnp.ones(2), "lr": "fast"}, "leaf 'lr' is a str"),
    ({"w": None}, "holds no arrays"),
])
def test_a_non_pytree_of_arrays_is_refused_with_what_was_received(bad, message):
    with pytest.raises(ll.BackendError, match=message):
        llj.trainable_mask(bad, ll.freeze())


def test_a_pattern_matching_no_leaf_raises_no_match():
    with pytest.raises(ll.NoMatchError, match="Dense_9"):
        llj.trainable_mask(linen_params(), ll.freeze("params.Dense_9"))


def test_a_pytree_is_not_a_model_for_apply():
    with pytest.raises(ll.BackendError, match="flax.nnx.Module"):
        ll.apply({"w": jnp.ones(2)}, ll.freeze())


def test_a_resumed_nnx_schedule_ends_bit_identical_to_an_uninterrupted_run():
    schedule = ll.Schedule({0: ll.freeze("backbone"), 1: ll.unfreeze("backbone")})

    def start():
        model = Net(nnx.Rngs(0))
        model.train()
        opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=llf.trainable)
        return model, opt, llf.FreezeScheduler(schedule, model, opt, log=None)

    def epoch(model, opt, fs, e):
        fs.step(e)
        for s in range(2):
            train_step(model, opt, *batch(10 * e + s))

    model, opt, fs = start()
    for e in range(3):
        epoch(model, opt, fs, e)
    uninterrupted = values(nnx.state(model, nnx.Param))

    model, opt, fs = start()
    epoch(model, opt, fs, 0)            # interrupted inside the frozen phase
    saved = copy.deepcopy((nnx.state(model), nnx.state(opt), fs.state_dict()))  # the checkpoint

    model, opt, fs = start()            # a fresh process: same code, then the checkpoint
    fs.load_state_dict(saved[2])
    assert fs.phase == 0 and not llf.is_trainable(model.backbone.layers[0].kernel)  # before any state loads
    nnx.update(model, saved[0])
    nnx.update(opt, saved[1])
    for e in (1, 2):
        epoch(model, opt, fs, e)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(uninterrupted, values(nnx.state(model, nnx.Param))))


def test_a_pytree_schedule_keeps_moments_across_a_phase_change_and_resumes_exactly():
    schedule = ll.Schedule({0: ll.freeze().unfreeze("head"), 2: ll.unfreeze("body")})
    tx = optax.adamw(1e-2, weight_decay=0.1)
    k1, k2 = jax.random.split(jax.random.key(0))
    start = {"body": {"w": jax.random.normal(k1, (3, 4))}, "head": {"w": jax.random.normal(k2, (4, 1))}}

    @jax.jit
    def step(trainable, frozen, state, x):
        def loss(trainable):
            p = llj.combine(trainable, frozen)
            return jnp.mean((x @ p["body"]["w"] @ p["head"]["w"]) ** 2)
        updates, state = tx.update(jax.grad(loss)(trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    def run(params, state, epochs, phase=-1):
        moments = {}
        for e in epochs:
            index = schedule.phase_index(e)
            if index != phase:  # a phase change: new partition, state carried over
                trainable, frozen = llj.partition(params, schedule.spec_at(e))
                fresh = tx.init(trainable)
                state = fresh if state is None else llj.carry_state(fresh, state)
                phase = index
                moments[e] = np.asarray(state[0].mu["head"]["w"]).copy()
            for s in range(2):
                trainable, state = step(trainable, frozen, state, jnp.ones((5, 3)) * (e + s + 1))
            params = llj.combine(trainable, frozen)
            moments[f"end{e}"] = np.asarray(state[0].mu["head"]["w"]).copy()
        return params, state, moments

    params, state, moments = run(start, None, range(4))
    assert np.array_equal(moments[2], moments["end1"])          # head's Adam moments kept at the change
    assert int(state[0].count) == 8                              # one step count throughout
    first, _, _ = run(start, None, range(2))
    assert np.array_equal(first["body"]["w"], start["body"]["w"])  # frozen in phase 1, bit-identical
    assert not np.array_equal(params["body"]["w"], start["body"]["w"])  # trains after the change

    saved_params, saved_state, _ = run(start, None, range(3))    # interrupted after epoch 2 (phase 2)
    resumed, _, _ = run(saved_params, saved_state, [3], phase=-1)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(values(resumed), values(params)))


def test_equinox_static_fields_and_batchnorm_state_are_not_parameters():
    eqx = pytest.importorskip("equinox")
    conv = eqx.nn.Conv2d(3, 4, 3, key=jax.random.key(0))            # kernel_size etc. are static fields
    assert llj.plan(conv, ll.freeze()).frozen == ("weight", "bias")
    bn = eqx.nn.BatchNorm(4, "batch", mode="batch")                  # without make_with_state: StateIndex
    assert llj.plan(bn, ll.freeze()).frozen == ("weight", "bias")


# Masks whose polarity is in their name; plan's bn / frozen_mode; phase lr in NNX.

def test_frozen_mask_is_the_inverse_of_trainable_mask_and_plugs_into_optax_freeze():
    params = linen_params()
    spec = ll.freeze(depth=2, within="params")
    trainable, frozen = llj.trainable_mask(params, spec), llj.frozen_mask(params, spec)
    assert jax.tree.leaves(frozen) == [not t for t in jax.tree.leaves(trainable)]
    for tx in (optax.transforms.selective_transform(optax.adamw(1e-2, weight_decay=0.5), freeze_mask=frozen),
               optax.chain(optax.transforms.freeze(frozen), optax.sgd(0.1))):
        state = tx.init(params)
        grads = jax.tree.map(jnp.ones_like, params)
        new = optax.apply_updates(params, tx.update(grads, state, params)[0])
        for old, now, is_frozen in zip(jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(frozen)):
            assert np.array_equal(old, now) == is_frozen  # frozen leaves stay, trainable ones move


def test_the_old_mask_name_warns_and_still_returns_the_trainable_mask():
    params = linen_params()
    with pytest.warns(DeprecationWarning, match="trainable_mask"):
        old = llj.mask(params, ll.freeze("params.Dense_0"))
    assert old == llj.trainable_mask(params, ll.freeze("params.Dense_0"))


@pytest.mark.parametrize("which", ["trainable_mask", "frozen_mask"])
def test_a_mask_given_where_the_spec_goes_is_refused_naming_both_polarities(which):
    params = linen_params()
    mask = getattr(llj, which)(params, ll.freeze("params.Dense_0"))
    for call in (lambda: llj.partition(params, mask), lambda: llj.optimizer(optax.sgd(0.1), params, mask),
                 lambda: llj.plan(params, mask)):
        with pytest.raises(ll.SpecError, match="bool mask.*trainable_mask \\(True = trainable.*frozen_mask \\(True = frozen"):
            call()


def test_pytree_plan_bn_policies_decide_batchnorm_leaves_and_hold_nothing():
    params = linen_params()
    norm = ("params.BatchNorm_0.scale", "params.BatchNorm_0.bias")
    assert llj.plan(params, ll.unfreeze(), bn="frozen").frozen == norm
    assert llj.plan(params, ll.freeze(), bn="trainable").trainable == norm
    assert llj.plan(params, ll.freeze("params"), bn="follow").held == ()  # a pytree has no inference mode
    assert llj.frozen_mask(params, ll.unfreeze(), bn="frozen")["params"]["BatchNorm_0"] == {"bias": True, "scale": True}
    with pytest.raises(ll.SpecError, match="bn must be one of"):
        llj.plan(params, ll.freeze(), bn="eval")


def test_pytree_bn_frozen_freezes_an_equinox_batchnorm():
    eqx = pytest.importorskip("equinox")
    k1, k2 = jax.random.split(jax.random.key(0))
    model = eqx.nn.Sequential([eqx.nn.Linear(2, 4, key=k1), eqx.nn.BatchNorm(4, "batch", mode="batch"), eqx.nn.Linear(4, 1, key=k2)])
    assert llj.plan(model, ll.unfreeze(), bn="frozen").frozen == ("layers.1.weight", "layers.1.bias")


def test_pytree_frozen_mode_eval_is_refused_saying_what_to_do():
    with pytest.raises(ll.SpecError, match="no inference-mode flag.*inference=True.*use_running_average"):
        llj.plan(linen_params(), ll.freeze(), frozen_mode="eval")


def test_nnx_freeze_scheduler_refuses_a_phase_lr_when_it_cannot_read_the_optimizers_rate(net):
    opt = nnx.Optimizer(net, optax.adam(1e-2), wrt=llf.trainable)
    schedule = ll.Schedule({0: ll.freeze("backbone"), 1: ll.unfreeze()}, lr={1: 1e-4})
    with pytest.raises(ll.SpecError, match="layerlock.flax.FreezeScheduler.*epoch 1: lr=0.0001.*not supported by "
                                           "this optimizer.*inject_hyperparams.*multi_transform"):
        llf.FreezeScheduler(schedule, net, opt, log=None)
    assert llf.is_trainable(net.backbone.layers[0].kernel)  # refused before anything changed
