"""One suite for every installed backend: the same spec has the same meaning.

The cases live in :mod:`layerlock.testing`, the kit plugins run too: each backend builds the
reference model (``layerlock.testing.LAYOUT``: same layer names and shapes) and trains it
for real, and every plan is compared, layer by layer, with the plan of the same spec on the
layout (the parameter short names differ: ``weight``/``kernel``/``scale``/``gamma``). The
backends: PyTorch, Keras, Flax NNX (``ll.plan`` / ``ll.apply``) and Equinox (a pytree:
``layerlock.jax.plan`` and ``layerlock.jax.optimizer``, no inference-mode hold).
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

import layerlock as ll
from layerlock.testing import BackendConformance, frozen_layers
from layerlock.tree import Tree


class TestTorch(BackendConformance):
    def make(self):
        pytest.importorskip("torch")
        import torch
        from torch import nn
        from collections import OrderedDict

        torch.manual_seed(0)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
                                                      relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                                      flat=nn.Flatten()))
                self.body = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), fc2=nn.Linear(8, 8)))
                self.head = nn.Linear(8, 3)

            def forward(self, x):
                return self.head(self.body(self.stem(x)))

        return Net()

    def train(self, steps=3):
        import torch

        model = self.model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def layer_values(self):
        """Parameters and buffers (running statistics: a held BatchNorm keeps them fixed)."""
        out = {}
        for name, t in self.model.state_dict().items():
            layer = name.rpartition(".")[0]
            out.setdefault(layer, []).append(t.detach().clone().numpy().tobytes())
        return out


class TestKeras(BackendConformance):
    def make(self):
        if not (_found("keras") and importlib.util.find_spec("layerlock.backends.keras")):
            pytest.skip("needs keras")
        import keras

        keras.utils.set_random_seed(0)
        stem = keras.Sequential([keras.layers.Conv2D(4, 3, name="conv"), keras.layers.BatchNormalization(name="bn"),
                                 keras.layers.ReLU(name="relu"), keras.layers.GlobalAveragePooling2D(name="pool")],
                                name="stem")
        body = keras.Sequential([keras.layers.Dense(8, name="fc1"), keras.layers.Dense(8, name="fc2")], name="body")
        # Sequential: its `layers` has no InputLayer, so depth counts the same blocks as torch
        # (a Functional model's `layers` starts with its InputLayer, and depth=N means layers[:N]).
        model = keras.Sequential([keras.Input((6, 6, 3)), stem, body, keras.layers.Dense(3, name="head")])
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.01),
                      loss="sparse_categorical_crossentropy")
        return model

    def train(self, steps=3):
        import numpy as np

        rng = np.random.default_rng(0)
        x = rng.normal(size=(8 * steps, 6, 6, 3)).astype("float32")
        y = rng.integers(0, 3, size=(8 * steps,))
        self.model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)

    def layer_values(self):
        """Every weight of each leaf layer, moving statistics included."""
        out = {}
        for path in Tree.of(ll.backends.get_backend(self.model).tree(self.model)).layer_paths:
            layer = self._layer(path)
            if layer is not None and layer.weights and not layer._layers:
                out[path] = [v.numpy().tobytes() for v in layer.weights]
        return out

    def _layer(self, path):
        layer = self.model
        for name in path.split(".") if path else []:
            layer = layer.get_layer(name)
        return layer


class TestNnx(BackendConformance):
    """Flax NNX: the same blocks as attributes of small modules (an ``nnx.Sequential`` would
    put every block under ``layers.<i>``); relu and pooling are plain functions in ``__call__``."""

    def make(self):
        if not _found("jax", "flax", "optax"):
            pytest.skip("needs jax, flax and optax")
        import jax.numpy as jnp
        from flax import nnx

        class Stem(nnx.Module):
            def __init__(self, rngs):
                self.conv = nnx.Conv(3, 4, (3, 3), padding="VALID", rngs=rngs)
                self.bn = nnx.BatchNorm(4, rngs=rngs)

            def __call__(self, x):
                return jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2))

        class Body(nnx.Module):
            def __init__(self, rngs):
                self.fc1 = nnx.Linear(4, 8, rngs=rngs)
                self.fc2 = nnx.Linear(8, 8, rngs=rngs)

            def __call__(self, x):
                return self.fc2(self.fc1(x))

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.stem = Stem(rngs)
                self.body = Body(rngs)
                self.head = nnx.Linear(8, 3, rngs=rngs)

            def __call__(self, x):
                return self.head(self.body(self.stem(x)))

        return Net(nnx.Rngs(0))

    def train(self, steps=3):
        import numpy as np
        import optax
        from flax import nnx
        import layerlock.flax as llf

        model = self.model
        opt = nnx.Optimizer(model, optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9)),
                            wrt=llf.trainable)

        def loss(m, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        rng = np.random.default_rng(0)
        model.train()  # held layers stay in inference mode
        for _ in range(steps):
            x, y = rng.normal(size=(8, 6, 6, 3)).astype("float32"), rng.integers(0, 3, size=(8,))
            opt.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, llf.trainable))(model, x, y))

    def layer_values(self):
        import numpy as np
        from flax import nnx

        out = {}
        for path in Tree.of(ll.backends.get_backend(self.model).tree(self.model)).layer_paths:
            node = self.model
            for name in path.split(".") if path else []:
                node = getattr(node, name)
            # parameters and batch statistics, like torch's state_dict: a held BatchNorm keeps both
            # (by name: an nnx update may reorder a module's __dict__)
            values = sorted((k, np.asarray(v.get_value()).tobytes()) for k, v in vars(node).items()
                            if isinstance(v, nnx.Variable))
            if values:
                out[path] = values
        return out


class TestEquinox(BackendConformance):
    """Equinox: a pytree, so ``layerlock.jax.plan`` and ``layerlock.jax.optimizer``; built
    with ``eqx.nn.make_with_state`` so BatchNorm's state lives in ``eqx.nn.State``, not in
    the model's leaves. A pytree holds no inference mode: nothing is ever held, and it has
    no flags to snapshot or fingerprint."""

    holds = "none"
    stateful = False

    def make(self):
        if not _found("jax", "equinox", "optax"):
            pytest.skip("needs jax, equinox and optax")
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        class Stem(eqx.Module):
            conv: eqx.nn.Conv2d
            bn: eqx.nn.BatchNorm

            def __init__(self, key):
                self.conv = eqx.nn.Conv2d(3, 4, 3, key=key)
                self.bn = eqx.nn.BatchNorm(4, "batch", mode="batch")

            def __call__(self, x, state):
                x, state = self.bn(self.conv(x), state)
                return jnp.mean(jax.nn.relu(x), axis=(1, 2)), state

        class Body(eqx.Module):
            fc1: eqx.nn.Linear
            fc2: eqx.nn.Linear

            def __init__(self, key):
                k1, k2 = jax.random.split(key)
                self.fc1, self.fc2 = eqx.nn.Linear(4, 8, key=k1), eqx.nn.Linear(8, 8, key=k2)

            def __call__(self, x):
                return self.fc2(self.fc1(x))

        class Net(eqx.Module):
            stem: Stem
            body: Body
            head: eqx.nn.Linear

            def __init__(self, key):
                k = jax.random.split(key, 3)
                self.stem, self.body, self.head = Stem(k[0]), Body(k[1]), eqx.nn.Linear(8, 3, key=k[2])

            def __call__(self, x, state):
                x, state = self.stem(x, state)
                return self.head(self.body(x)), state

        model, self.state = eqx.nn.make_with_state(Net)(jax.random.key(0))
        self.spec = ll.unfreeze()
        return model

    def plan(self, spec, **options):
        import layerlock.jax as llj

        return llj.plan(self.model, spec, **options)

    def apply(self, spec, **options):
        result = self.plan(spec, **options)
        self.spec = spec
        return result

    def train(self, steps=3):
        import equinox as eqx
        import jax
        import numpy as np
        import optax
        import layerlock.jax as llj

        tx = llj.optimizer(optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.9)),
                           self.model, self.spec)
        opt_state = tx.init(eqx.filter(self.model, eqx.is_array))

        def loss(model, state, x, y):
            logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

        rng = np.random.default_rng(0)
        for _ in range(steps):
            x, y = rng.normal(size=(8, 3, 6, 6)).astype("float32"), rng.integers(0, 3, size=(8,))
            (_, self.state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(self.model, self.state, x, y)
            updates, opt_state = tx.update(grads, opt_state, eqx.filter(self.model, eqx.is_array))
            self.model = eqx.apply_updates(self.model, updates)

    def layer_values(self):
        import equinox as eqx
        import jax
        import numpy as np

        out = {}
        leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(self.model, eqx.is_array))[0]
        for keys, leaf in leaves:
            path = ".".join(str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k)))) for k in keys)
            out.setdefault(path.rpartition(".")[0], []).append(np.asarray(leaf).tobytes())
        return out


@functools.lru_cache(maxsize=None)
def _found(*names):
    return all(importlib.util.find_spec(n) for n in names)


def _sequentials():
    """``Sequential(Linear(4, 8), BatchNorm(8), relu, Linear(8, 8), Linear(8, 2))`` in each
    framework (146 scalars, 18 in the last Linear); {name: (model, plan function)}. torch's
    and Keras's have the entries as children; nnx.Sequential and eqx.nn.Sequential have one
    child, ``layers``, with the entries under it."""
    out = {}
    if _found("torch"):
        from torch import nn

        out["torch"] = (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                                      nn.Linear(8, 2)), ll.plan)
    if _found("keras"):
        import keras

        out["keras"] = (keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                          keras.layers.Activation("relu"), keras.layers.Dense(8),
                                          keras.layers.Dense(2)]), ll.plan)
    if _found("jax", "flax"):
        from flax import nnx

        r = nnx.Rngs(0)
        out["flax"] = (nnx.Sequential(nnx.Linear(4, 8, rngs=r), nnx.BatchNorm(8, rngs=r), nnx.relu,
                                      nnx.Linear(8, 8, rngs=r), nnx.Linear(8, 2, rngs=r)), ll.plan)
    if _found("jax", "equinox", "optax"):
        import equinox as eqx
        import jax
        import layerlock.jax as llj

        k = jax.random.split(jax.random.key(0), 3)
        out["equinox"] = (eqx.nn.Sequential([eqx.nn.Linear(4, 8, key=k[0]), eqx.nn.BatchNorm(8, "batch", mode="batch"),
                                             eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(8, 8, key=k[1]),
                                             eqx.nn.Linear(8, 2, key=k[2])]), llj.plan)
    return out


def _mlps():
    """Three Linears (4 -> 8 -> 8 -> 2) held in one list attribute, activations applied in the
    forward pass: a torch module whose only child is a ModuleList, eqx.nn.MLP (its ``layers``
    tuple; the activations are not children) and an NNX module whose only child is a list."""
    out = {}
    if _found("torch"):
        from torch import nn

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)])

        out["torch"] = (MLP(), ll.plan)
    if _found("jax", "flax"):
        from flax import nnx

        class NnxMLP(nnx.Module):
            def __init__(self, rngs):
                self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs),
                                        nnx.Linear(8, 2, rngs=rngs)])

        out["flax"] = (NnxMLP(nnx.Rngs(0)), ll.plan)
    if _found("jax", "equinox", "optax"):
        import equinox as eqx
        import jax
        import layerlock.jax as llj

        out["equinox"] = (eqx.nn.MLP(4, 2, 8, depth=2, key=jax.random.key(0)), llj.plan)
    return out


def _same_everywhere(models, spec):
    """{framework: (frozen scalars, trainable scalars)} of ``spec`` on each model."""
    return {name: (plan(model, spec).frozen_scalars, plan(model, spec).trainable_scalars)
            for name, (model, plan) in models.items()}


@pytest.mark.parametrize("depth", range(-5, 6))
def test_depth_counts_a_sequentials_entries_in_every_framework(depth):
    """``ll.freeze(depth=-1)`` on the 5-entry Sequential trains only the last Linear (18 of 146
    scalars) in torch, Keras, NNX and Equinox: the entries of ``layers`` are the blocks."""
    seqs = _sequentials()
    if len(seqs) < 2:
        pytest.skip("needs two frameworks")
    frozen = sum([40, 16, 0, 72, 18][:depth])  # Linear, BatchNorm, relu, Linear, Linear
    assert set(_same_everywhere(seqs, ll.freeze(depth=depth)).values()) == {(frozen, 146 - frozen)}


@pytest.mark.parametrize("depth, frozen", [(-1, 112), (1, 40), (2, 112), (-2, 40), (3, 130)])
def test_depth_counts_an_mlps_layers_in_every_framework(depth, frozen):
    mlps = _mlps()
    if len(mlps) < 2:
        pytest.skip("needs two frameworks")
    assert set(_same_everywhere(mlps, ll.freeze(depth=depth)).values()) == {(frozen, 130 - frozen)}


def test_within_layers_still_counts_the_list_and_the_transparent_layer_counts_the_same():
    seqs = _sequentials()
    for name in ("flax", "equinox"):
        if name not in seqs:
            continue
        model, plan = seqs[name]
        same = plan(model, ll.freeze(depth=2, within="layers"))
        assert frozen_layers(same) == ["layers.0", "layers.1"], name
        assert same.frozen == plan(model, ll.freeze(depth=2)).frozen, name


def test_depth_past_the_blocks_raises_naming_the_blocks_it_counted():
    for name, (model, plan) in _sequentials().items():
        if name in ("torch", "keras"):
            counted = "has 5 blocks \\("  # the model's children
        else:
            counted = r"has 5 blocks, the entries of 'layers', \(layers\.0, layers\.1, layers\.2, layers\.3, layers\.4\)"
        with pytest.raises(ll.SpecError, match=counted + ".*accepted: -5 to 5"):
            plan(model, ll.freeze(depth=6))
        with pytest.warns(ll.LayerlockWarning, match="has 5 blocks"):
            assert plan(model, ll.freeze(depth=-6), strict=False).frozen == ()


def test_the_plan_says_which_blocks_depth_counted_where_they_are_a_lists_entries():
    for name, (model, plan) in _sequentials().items():
        p = plan(model, ll.freeze(depth=-1))
        if name in ("torch", "keras"):  # the blocks are the model's children: nothing to say
            assert p.blocks == {} and "depth counted" not in str(p) and "blocks" not in p.to_dict()
            continue
        paths = tuple(f"layers.{i}" for i in range(5))
        assert p.blocks == {"layers": paths} and p.to_dict()["blocks"] == {"layers": list(paths)}
        assert "depth counted the 5 blocks of 'layers': layers.0, layers.1, layers.2, layers.3, layers.4" in str(p)
        assert plan(model, ll.freeze("layers.0")).blocks == {}  # no depth rule, no note


def _family_models():
    """Embedding(10, 4), Conv1d(4 -> 4, k=3), BatchNorm(4), LayerNorm(4), Dropout, Linear(4 -> 2)
    in each framework (the same scalars in each layer); {name: (model, plan function)}."""
    out = {}
    if _found("torch"):
        from torch import nn

        out["torch"] = (nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4), nn.LayerNorm(4),
                                      nn.Dropout(0.1), nn.Linear(4, 2)), ll.plan)
    if _found("keras"):
        import keras

        L = keras.layers
        out["keras"] = (keras.Sequential([keras.Input((6,), dtype="int32"), L.Embedding(10, 4), L.Conv1D(4, 3),
                                          L.BatchNormalization(), L.LayerNormalization(), L.Dropout(0.1),
                                          L.Dense(2)]), ll.plan)
    if _found("jax", "flax"):
        from flax import nnx

        r = nnx.Rngs(0)
        out["flax"] = (nnx.Sequential(nnx.Embed(10, 4, rngs=r), nnx.Conv(4, 4, (3,), rngs=r), nnx.BatchNorm(4, rngs=r),
                                      nnx.LayerNorm(4, rngs=r), nnx.Dropout(0.1), nnx.Linear(4, 2, rngs=r)), ll.plan)
    if _found("jax", "equinox", "optax"):
        import equinox as eqx
        import jax
        import layerlock.jax as llj

        k = jax.random.split(jax.random.key(0), 3)
        out["equinox"] = (eqx.nn.Sequential([eqx.nn.Embedding(10, 4, key=k[0]), eqx.nn.Conv1d(4, 4, 3, key=k[1]),
                                             eqx.nn.BatchNorm(4, "batch", mode="batch"), eqx.nn.LayerNorm(4),
                                             eqx.nn.Dropout(0.1), eqx.nn.Linear(4, 2, key=k[2])]), llj.plan)
    return out


def _matched_blocks(model, family):
    """Which of the model's blocks (by position) family ``family`` selects a layer in."""
    from layerlock import families
    from layerlock.resolver import blocks

    if type(model).__module__.startswith("equinox"):
        from layerlock.backends import pytree

        tree, backend = pytree.tree(model), "jax"
    else:
        b = ll.backends.get_backend(model)
        tree, backend = Tree.of(b.tree(model)), b.name
    match, index = families.matcher("family:" + family, backend), {p: i for i, p in enumerate(tree.layer_paths)}
    out = []
    for n, path in enumerate(blocks(tree)):
        i = index[path]
        if any(match(kind) for kind in tree.kinds[i:tree.end[i]]):
            out.append(n)
    return out


@pytest.mark.parametrize("family, frozen, positions", [
    ("dense", 10, [5]), ("conv", 52, [1]), ("norm", 16, [2, 3]), ("batchnorm", 8, [2]), ("layernorm", 8, [3]),
    ("embedding", 40, [0]), ("dropout", 0, [4])])
def test_a_family_selects_the_same_layers_in_every_framework(family, frozen, positions):
    models = _family_models()
    if len(models) < 2:
        pytest.skip("needs two frameworks")
    for name, (model, plan) in models.items():
        assert _matched_blocks(model, family) == positions, name
        assert plan(model, ll.freeze(kind=f"family:{family}")).frozen_scalars == frozen, name


def test_the_attention_family_selects_each_frameworks_attention_layer():
    """One attention layer (model size 4, one head, biases): 80 scalars in every framework.
    (``family:dense`` also reaches the projections inside it where the framework builds them
    from dense layers: Keras, NNX and Equinox do; torch's MultiheadAttention keeps its input
    projection as a parameter of its own.)"""
    layers = {}
    if _found("torch"):
        from torch import nn

        layers["torch"] = (nn.Sequential(nn.MultiheadAttention(4, 1), nn.Linear(4, 2)), ll.plan)
    if _found("keras"):
        import keras

        x = keras.Input((3, 4))
        y = keras.layers.Dense(2)(keras.layers.MultiHeadAttention(1, 4)(x, x))
        layers["keras"] = (keras.Model(x, y), ll.plan)
    if _found("jax", "flax"):
        from flax import nnx

        r = nnx.Rngs(0)
        layers["flax"] = (nnx.Sequential(nnx.MultiHeadAttention(1, 4, qkv_features=4, decode=False, rngs=r),
                                         nnx.Linear(4, 2, rngs=r)), ll.plan)
    if _found("jax", "equinox", "optax"):
        import equinox as eqx
        import jax
        import layerlock.jax as llj

        k = jax.random.split(jax.random.key(0), 2)
        layers["equinox"] = (eqx.nn.Sequential([eqx.nn.MultiheadAttention(1, 4, use_query_bias=True, use_key_bias=True,
                                                                          use_value_bias=True, use_output_bias=True,
                                                                          key=k[0]),
                                                eqx.nn.Linear(4, 2, key=k[1])]), llj.plan)
    if len(layers) < 2:
        pytest.skip("needs two frameworks")
    assert set(_same_everywhere(layers, ll.freeze(kind="family:attention")).values()) == {(80, 10)}


def test_layer_decay_counts_the_blocks_depth_counts():
    """``layerlock.torch.param_groups(layer_decay=...)`` reads the blocks through the same rule:
    a module whose only child is a ModuleList decays per entry, as depth counts them."""
    pytest.importorskip("torch")
    import layerlock.torch as llt

    model, _ = _mlps()["torch"]
    groups = llt.param_groups(model, 1.0, layer_decay=0.5)
    assert [(g["lr"], len(g["params"])) for g in groups] == [(0.25, 2), (0.5, 2), (1.0, 2)]
