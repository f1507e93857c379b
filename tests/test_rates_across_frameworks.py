"""One architecture written in torch, Keras and Flax NNX gets the same rate table from the
same ``param_groups`` arguments, and one SGD step through each framework's optimizer moves
every parameter by its rate times its gradient. The steps run in float64: a float32 weight
near 0.5 rounds a step of 1e-5 to within 1e-3 of itself, too coarse for rtol 1e-5."""

import os

import numpy as np
import pytest

import layerlock as ll

ARGS = {"lr": 1e-2, "layer_decay": 0.5, "within": "blocks", "lr_mult": {"head": 3.0},
        "weight_decay": 0.1, "no_decay": "*bias"}
# stem -> blocks (two Linear/Dense) -> head, in model order: (kernel, bias) per layer
# (the top block, the head, gets lr * 3; each block below it half the one above)
EXPECTED = [(0.00125, 0.1, "block0"), (0.00125, 0.0, "block0/no_decay"),
            (0.0025, 0.1, "block1"), (0.0025, 0.0, "block1/no_decay"),
            (0.005, 0.1, "block2"), (0.005, 0.0, "block2/no_decay"),
            (0.03, 0.1, "block3/lr_mult[head]"), (0.03, 0.0, "block3/lr_mult[head]/no_decay")]


def torch_model(dtype=None):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.stem = torch.nn.Linear(3, 4)   # registration order is model order: stem, blocks, head
    net.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    net.head = torch.nn.Linear(4, 2)
    return net.to(dtype) if dtype else net


def keras_model(dtype=None):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    dense = lambda name: keras.layers.Dense(4 if name != "head" else 2, name=name, dtype=dtype)  # noqa: E731
    blocks = keras.Sequential([dense("b0"), dense("b1")], name="blocks")
    return keras.Sequential([keras.Input((3,)), dense("stem"), blocks, dense("head")])


def nnx_model(dtype=None):
    nnx = pytest.importorskip("flax.nnx")
    import jax.numpy as jnp

    def linear(i, o, rngs):
        return nnx.Linear(i, o, rngs=rngs, **({"param_dtype": jnp.float64, "dtype": jnp.float64} if dtype else {}))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = linear(3, 4, rngs)
            self.blocks = nnx.Sequential(linear(4, 4, rngs), linear(4, 4, rngs))
            self.head = linear(4, 2, rngs)

        def __call__(self, x):
            return self.head(self.blocks(self.stem(x)))

    return Net(nnx.Rngs(0))


BUILDERS = {"torch": torch_model, "keras": keras_model, "nnx": nnx_model}


@pytest.mark.parametrize("framework", BUILDERS)
def test_the_same_architecture_gets_the_same_rate_table(framework):
    table = ll.rates(BUILDERS[framework](), **ARGS)
    got = [(round(lr, 12), wd, name) for lr, wd, name in zip(table.lrs, table.weight_decays, table.names)]
    assert got == [(round(lr, 12), wd, name) for lr, wd, name in EXPECTED]


def test_layer_decay_counts_the_blocks_depth_counts_in_every_framework():
    for build in BUILDERS.values():
        model = build()
        frozen = ll.plan(model, ll.freeze(depth=1, within="blocks")).frozen
        table = ll.rates(model, **ARGS)
        assert {table.lr[p] for p in frozen} == {0.0025}   # the first of the blocks is block1


X = np.random.default_rng(0).normal(size=(5, 3))
Y = np.random.default_rng(1).normal(size=(5, 2))


def sgd_moves_torch():
    import torch
    import layerlock.torch as llt

    net = torch_model(torch.float64)
    groups = llt.param_groups(net, **{k: v for k, v in ARGS.items() if k not in ("weight_decay", "no_decay")})
    opt = torch.optim.SGD(groups, lr=ARGS["lr"])
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    out = net.head(net.blocks(net.stem(torch.from_numpy(X))))
    ((out - torch.from_numpy(Y)) ** 2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    return [((before[n] - p.detach()).numpy(), grads[n].numpy()) for n, p in net.named_parameters()]


def sgd_moves_keras():
    import keras
    import layerlock.keras as llk

    model = keras_model("float64")
    groups = llk.param_groups(model, **{k: v for k, v in ARGS.items() if k not in ("weight_decay", "no_decay")})
    opt = llk.with_rates(keras.optimizers.SGD(ARGS["lr"]), groups)
    variables = model.trainable_variables
    before = [np.array(v.numpy()) for v in variables]
    import tensorflow as tf
    with tf.GradientTape() as tape:
        loss = keras.ops.mean((model(X) - Y) ** 2)
    grads = tape.gradient(loss, variables)
    opt.apply(grads, variables)
    return [(b - v.numpy(), np.array(g)) for b, v, g in zip(before, variables, grads)]


def sgd_moves_nnx():
    import jax
    import optax
    from flax import nnx
    import layerlock.flax as llf
    import layerlock.jax as llj

    with jax.enable_x64(True):
        model = nnx_model("float64")
        groups = llf.param_groups(model, **{k: v for k, v in ARGS.items() if k not in ("weight_decay", "no_decay")})
        opt = nnx.Optimizer(model, llj.multi_transform(optax.sgd, groups), wrt=llf.trainable)
        before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
        grads = nnx.grad(lambda m: ((m(X) - Y) ** 2).mean())(model)
        opt.update(model, grads)
        after = nnx.state(model, nnx.Param)
    flat = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    return list(zip([b - a for b, a in zip(flat(before), flat(after))], flat(grads)))


@pytest.mark.parametrize("framework", ["torch", "keras", "nnx"])
def test_one_sgd_step_moves_each_parameter_by_its_rate_times_its_gradient(framework):
    if framework == "keras" and (os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow"):
        pytest.skip("the Keras step here takes TensorFlow's gradient tape")
    moves = {"torch": sgd_moves_torch, "keras": sgd_moves_keras, "nnx": sgd_moves_nnx}[framework]()
    rates = [lr for lr, _, _ in EXPECTED]
    if framework == "nnx":
        # nnx.state sorts keys: blocks, head, stem; and bias before kernel
        order = [(2, 3), (4, 5), (6, 7), (0, 1)]
        rates = [rates[j] for pair in order for j in (pair[1], pair[0])]
    assert len(moves) == len(rates)
    for (delta, grad), rate in zip(moves, rates):
        np.testing.assert_allclose(delta, rate * grad, rtol=1e-5, atol=1e-9)
