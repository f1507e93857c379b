"""``rows=`` in JAX (issue 21): an NNX model under ``nnx.jit`` and a plain optax loop train only
the chosen rows (an embedding's entries, a dense layer's output units), the other rows stay
bit-identical under every optimizer, and the optimizer state holds the chosen rows only."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.flax as llf  # noqa: E402
import layerlock.jax as llj  # noqa: E402

OPTIMIZERS = {
    "sgd-momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}
NEW = "90:"  # rows 90..99 of a 100-row table: the "new tokens"


class Net(nnx.Module):
    def __init__(self):
        self.emb = nnx.Embed(100, 8, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(8, 5, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(self.emb(x).mean(1))


def batch():
    rng = np.random.RandomState(1)
    x = rng.randint(0, 100, (16, 6))
    x[:, 0] = 90 + np.arange(16) % 10  # every batch uses every new token
    return jnp.asarray(x), jnp.asarray(rng.randint(0, 5, 16))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def step(model, optimizer, x, y):
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, llf.trainable))(model, x, y)
    optimizer.update(model, grads)


def train(model, optimizer, steps=3):
    x, y = batch()
    for _ in range(steps):
        step(model, optimizer, x, y)


def raw(a):
    return np.asarray(a).tobytes()


def table_state_shapes(optimizer, name):
    return {leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(
        nnx.state(optimizer, nnx.optimizer.OptState)))[0] if name in jax.tree_util.keystr(path) and leaf.ndim}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nnx_frozen_rows_are_bit_identical_the_new_rows_train_and_state_is_theirs(name):
    model = Net()
    before = np.asarray(model.emb.embedding[...])
    plan = ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    assert plan.partial == ("emb.embedding",)
    optimizer = nnx.Optimizer(model, llf.train_rows(OPTIMIZERS[name](), model), wrt=llf.trainable)
    train(model, optimizer)
    after = np.asarray(model.emb.embedding[...])
    assert raw(after[:90]) == raw(before[:90])
    assert (after[90:] != before[90:]).all(axis=1).all()
    assert table_state_shapes(optimizer, "embedding") == {(10, 8)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nnx_dense_output_units_are_kernel_columns(name):
    model = Net()
    kernel, bias = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])
    model.head.bias[...] = jnp.arange(5.0) - 2  # nonzero: weight decay would move it
    bias = np.asarray(model.head.bias[...])
    ll.apply(model, ll.freeze().unfreeze("head", rows=[1, 3]))
    optimizer = nnx.Optimizer(model, llf.train_rows(OPTIMIZERS[name](), model), wrt=llf.trainable)
    train(model, optimizer)
    k, b = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])
    frozen = [0, 2, 4]
    assert raw(k[:, frozen]) == raw(kernel[:, frozen]) and raw(b[frozen]) == raw(bias[frozen])
    assert (k[:, [1, 3]] != kernel[:, [1, 3]]).all() and (b[[1, 3]] != bias[[1, 3]]).all()
    assert table_state_shapes(optimizer, "kernel") == {(8, 2)} and table_state_shapes(optimizer, "bias") == {(2,)}


def test_plain_gradient_zeroing_fails_under_adamw():
    model = Net()
    before = np.asarray(model.emb.embedding[...])
    keep = jnp.zeros((100, 1)).at[90:].set(1.0)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)

    @nnx.jit
    def zeroed(model, optimizer, x, y):
        grads = nnx.grad(loss_fn)(model, x, y)
        grads["emb"]["embedding"][...] = grads["emb"]["embedding"][...] * keep
        optimizer.update(model, grads)

    x, y = batch()
    for _ in range(3):
        zeroed(model, optimizer, x, y)
    assert raw(np.asarray(model.emb.embedding[...])[:90]) != raw(before[:90])  # weight decay moved them


def test_snapshot_restore_and_frozen_keep_the_rows():
    model = Net()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    state = ll.snapshot(model)
    assert state.rows == {"emb.embedding": list(range(90, 100))}
    with ll.frozen(model, ll.unfreeze()):
        assert ll.plan(model, ll.Spec()).partial == ()
    assert ll.plan(model, ll.Spec()).partial == ("emb.embedding",)
    ll.apply(model, ll.freeze())
    ll.restore(model, state)
    assert ll.plan(model, ll.Spec()).rows[0].after == tuple(range(90, 100))
    assert ll.State.from_dict(state.to_dict()) == state
    assert nnx.merge(*nnx.split(model)).emb.embedding.get_metadata()["layerlock_rows"] == tuple(range(90, 100))
    bad = ll.State.from_dict({**state.to_dict(), "rows": {"emb.embedding": [100]}})
    with pytest.raises(ll.SpecError, match="it has 100 rows on axis 0"):
        ll.restore(model, bad)
    assert ll.snapshot(model) == state


@pytest.mark.parametrize("spec, says", [(ll.unfreeze("emb", rows="100:"), "shape (100, 8)"),
                                        (ll.freeze().unfreeze("head", rows=[5]), "out of range"),
                                        (ll.freeze().unfreeze("emb", rows=[3]).freeze("head", rows=[-6]),
                                         "row -6 is out of range")])
def test_rows_a_tensor_cannot_take_are_refused_and_nothing_changes(spec, says):
    model = Net()
    with pytest.raises(ll.SpecError) as exc:
        ll.apply(model, spec)
    assert says in str(exc.value)
    assert ll.snapshot(model) == ll.snapshot(Net())


def test_rows_on_a_tensor_without_a_row_axis_are_refused():
    model = nnx.Sequential(nnx.Embed(10, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ll.SpecError, match=r"layers.1.scale \(4 scalars\) has no such axis that the flax backend"):
        ll.apply(model, ll.unfreeze(rows=[0]))
    assert ll.plan(model, ll.Spec()).partial == () and ll.plan(model, ll.Spec()).frozen == ()


def test_sync_optimizer_refuses_new_rows_for_an_optimizer_without_train_rows():
    model = Net()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=llf.trainable)
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    layout = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(optimizer, nnx.optimizer.OptState)))
    with pytest.raises(ll.SpecError, match=r"emb.embedding \(rows 90: of 100\).*layerlock.flax.train_rows"):
        llf.sync_optimizer(optimizer, model)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(optimizer, nnx.optimizer.OptState))) == layout


def test_check_reports_an_optimizer_that_would_train_the_rows_whole():
    model = Net()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    plain = nnx.Optimizer(model, optax.adam(1e-2), wrt=llf.trainable)
    assert [f.kind for f in ll.check(model, plain).findings] == ["rows-trained-whole"]
    wrapped = nnx.Optimizer(model, llf.train_rows(optax.adam(1e-2), model), wrt=llf.trainable)
    assert not ll.check(model, wrapped).findings


def test_sync_optimizer_rebuilds_train_rows_over_new_rows_keeping_the_moments_of_rows_that_stay():
    model = Net()
    ll.apply(model, ll.freeze().unfreeze("emb", rows="95:"))
    optimizer = nnx.Optimizer(model, llf.train_rows(optax.adam(1e-2), model), wrt=llf.trainable)
    train(model, optimizer, steps=1)
    mu = np.asarray(optimizer.opt_state[0].mu["emb"]["embedding"][...])
    ll.apply(model, ll.unfreeze("emb", rows="90:95"))
    assert llf.sync_optimizer(optimizer, model) == []
    assert optimizer.tx.rows == {"emb.embedding": (tuple(range(90, 100)), 0)}
    now = np.asarray(optimizer.opt_state[0].mu["emb"]["embedding"][...])
    assert now.shape == (10, 8) and raw(now[5:]) == raw(mu) and not now[:5].any()
    before = np.asarray(model.emb.embedding[...])
    train(model, optimizer, steps=2)
    after = np.asarray(model.emb.embedding[...])
    assert raw(after[:90]) == raw(before[:90]) and (after[90:] != before[90:]).all()


def test_a_plain_optax_loop_on_a_linen_params_dict():
    rng = np.random.RandomState(0)
    params = {"Embed_0": {"embedding": jnp.asarray(rng.randn(100, 8), jnp.float32)},
              "Dense_0": {"kernel": jnp.asarray(rng.randn(8, 5), jnp.float32), "bias": jnp.arange(5.0) - 2}}
    spec = ll.freeze().unfreeze("Embed_0", rows=NEW).unfreeze("Dense_0", rows=[1, 3])
    tx = llj.optimizer(optax.adamw(1e-2, weight_decay=0.1), params, spec)
    state = tx.init(params)
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
              if x.ndim}
    assert set(shapes.values()) == {(10, 8), (8, 2), (2,)}

    def loss(p, x, y):
        h = p["Embed_0"]["embedding"][x].mean(1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    @jax.jit
    def update(p, s, x, y):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    new, x, y = params, *batch()
    for _ in range(3):
        new, state = update(new, state, x, y)
    e0, e1 = np.asarray(params["Embed_0"]["embedding"]), np.asarray(new["Embed_0"]["embedding"])
    k0, k1 = np.asarray(params["Dense_0"]["kernel"]), np.asarray(new["Dense_0"]["kernel"])
    assert raw(e1[:90]) == raw(e0[:90]) and (e1[90:] != e0[90:]).all()
    assert raw(k1[:, [0, 2, 4]]) == raw(k0[:, [0, 2, 4]]) and (k1[:, [1, 3]] != k0[:, [1, 3]]).all()
    assert raw(np.asarray(new["Dense_0"]["bias"])[[0, 2, 4]]) == raw(np.asarray(params["Dense_0"]["bias"])[[0, 2, 4]])


def test_pytree_rows_need_a_known_axis_and_masks_refuse_rows():
    params = {"emb": jnp.ones((10, 4)), "Embed_0": {"embedding": jnp.ones((10, 4))}}
    with pytest.raises(ll.SpecError, match="emb .*has no such axis that the jax backend can decide"):
        llj.optimizer(optax.adam(1e-2), params, ll.unfreeze("emb", rows=[1]))
    with pytest.raises(ll.SpecError, match="per-leaf mask cannot say"):
        llj.trainable_mask(params, ll.freeze().unfreeze("Embed_0", rows=[1]))


@pytest.mark.parametrize("rows, says", [({"e": ([1], -1)}, "axis must be an int >= 0"),
                                        ({"e": ([], 0)}, "non-empty 1-D list of ints"),
                                        ({"e": [1, 2, 3]}, "must be \\(row indices, axis\\)"),
                                        ({"x": ([1], 0)}, "no leaf of this tree has the path x"),
                                        ({"e": ([10], 0)}, "names row 10 on axis 0 of shape \\(10, 4\\)")])
def test_train_rows_refuses_bad_rows_naming_the_accepted_form(rows, says):
    params = {"e": jnp.ones((10, 4))}
    with pytest.raises(ll.SpecError, match=says):
        llj.train_rows(optax.sgd(0.1), rows).init(params)
