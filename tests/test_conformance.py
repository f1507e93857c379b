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
    """Three Linear layers in each framework's Sequential; {name: (model, plan function)}."""
    out = {}
    if _found("torch"):
        from torch import nn

        out["torch"] = (nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1)), ll.plan)
    if _found("jax", "flax"):
        from flax import nnx

        r = nnx.Rngs(0)
        out["flax"] = (nnx.Sequential(nnx.Linear(2, 3, rngs=r), nnx.Linear(3, 3, rngs=r), nnx.Linear(3, 1, rngs=r)),
                       ll.plan)
    if _found("jax", "equinox", "optax"):
        import equinox as eqx
        import jax
        import layerlock.jax as llj

        k = jax.random.split(jax.random.key(0), 3)
        out["equinox"] = (eqx.nn.Sequential([eqx.nn.Linear(2, 3, key=k[0]), eqx.nn.Linear(3, 3, key=k[1]),
                                             eqx.nn.Linear(3, 1, key=k[2])]), llj.plan)
    return out


def test_sequential_depth_needs_within_layers_in_nnx_and_equinox():
    """torch's Sequential has the blocks as children (``0``, ``1``, ...); nnx.Sequential and
    eqx.nn.Sequential have one child, ``layers``, with the blocks under it (``layers.0``)."""
    seqs = _sequentials()
    if "torch" not in seqs or len(seqs) < 2:
        pytest.skip("needs torch and flax or equinox")
    torch_model, _ = seqs.pop("torch")
    reference = ll.plan(torch_model, ll.freeze(depth=2))
    assert frozen_layers(reference) == ["0", "1"]
    for name, (model, plan) in seqs.items():
        same = plan(model, ll.freeze(depth=2, within="layers"))
        assert frozen_layers(same) == ["layers.0", "layers.1"], name
        assert same.frozen_scalars == reference.frozen_scalars, name
        with pytest.raises(ll.SpecError, match="has 1 blocks"):  # the root's only block is `layers`
            plan(model, ll.freeze(depth=2))
        assert plan(model, ll.freeze(depth=1)).trainable == ()  # depth=1 is everything
