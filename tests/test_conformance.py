"""One suite for every installed backend: the same spec has the same meaning.

Each backend builds the same model (same layer names and shapes) and trains it for real;
the parameter short names differ (``weight``/``kernel``), so meanings are compared per layer.
"""

from __future__ import annotations

import importlib.util

import pytest

import layerlock as ll

SPECS = {
    "prefix": ll.freeze("stem"),
    "nested": ll.freeze("body.fc1"),
    "later-wins": ll.freeze("stem", "body").unfreeze("body.fc2"),
    "depth": ll.freeze(depth=2),
    "negative-depth": ll.freeze(depth=-1),
    "within": ll.freeze(depth=1, within="body"),
    "kind": ll.freeze(kind=["Conv*", "BatchNorm*"]),
    # BatchNorm's shift is `bias` in torch and `beta` in Keras: one regex serves both.
    "bitfit": ll.freeze().unfreeze("re:.*\\.(bias|beta)"),
    "regex": ll.freeze("re:(stem|body)\\..*"),
    "everything": ll.freeze(),
}


class TorchModels:
    name = "torch"

    def __init__(self):
        import torch
        from torch import nn
        from collections import OrderedDict

        self.torch, self.nn = torch, nn
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

        self.model = Net()

    def train(self, steps=3):
        torch, model = self.torch, self.model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            self.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def layer_values(self):
        out = {}
        for name, t in self.model.state_dict().items():
            layer = name.rpartition(".")[0]
            out.setdefault(layer, []).append(t.detach().clone().numpy().tobytes())
        return out


class KerasModels:
    name = "keras"

    def __init__(self):
        import keras

        self.keras = keras
        keras.utils.set_random_seed(0)
        stem = keras.Sequential([keras.layers.Conv2D(4, 3, name="conv"), keras.layers.BatchNormalization(name="bn"),
                                 keras.layers.ReLU(name="relu"), keras.layers.GlobalAveragePooling2D(name="pool")],
                                name="stem")
        body = keras.Sequential([keras.layers.Dense(8, name="fc1"), keras.layers.Dense(8, name="fc2")], name="body")
        # Sequential: its `layers` has no InputLayer, so depth counts the same blocks as torch
        # (a Functional model's `layers` starts with its InputLayer, and depth=N means layers[:N]).
        self.model = keras.Sequential([keras.Input((6, 6, 3)), stem, body, keras.layers.Dense(3, name="head")])
        self.model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.01),
                           loss="sparse_categorical_crossentropy")

    def train(self, steps=3):
        import numpy as np

        rng = np.random.default_rng(0)
        x = rng.normal(size=(8 * steps, 6, 6, 3)).astype("float32")
        y = rng.integers(0, 3, size=(8 * steps,))
        self.model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)

    def layer_values(self):
        out = {}
        tree = ll.backends.get_backend(self.model).tree(self.model)
        for node in tree.walk():
            layer = self._layer(node.path)
            if layer is not None and layer.weights and not layer._layers:
                out[node.path] = [v.numpy().tobytes() for v in layer.weights]
        return out

    def _layer(self, path):
        layer = self.model
        for name in path.split(".") if path else []:
            layer = layer.get_layer(name)
        return layer


def _available():
    out = []
    if importlib.util.find_spec("torch"):
        out.append(TorchModels)
    if importlib.util.find_spec("keras") and importlib.util.find_spec("layerlock.backends.keras"):
        out.append(KerasModels)
    return out


@pytest.fixture(params=_available(), ids=lambda c: c.name)
def models(request):
    return request.param


def frozen_layers(plan):
    return sorted({p.rpartition(".")[0] for p in plan.frozen})


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_same_spec_same_frozen_layers_and_scalars_in_every_backend(spec):
    plans = {cls.name: ll.plan(cls().model, spec) for cls in _available()}
    reference = plans["torch"]
    for name, plan in plans.items():
        assert frozen_layers(plan) == frozen_layers(reference), name
        assert plan.frozen_scalars == reference.frozen_scalars, name
        assert sorted(plan.held) == sorted(reference.held), name


@pytest.mark.parametrize("spec", [SPECS["later-wins"], SPECS["depth"], SPECS["bitfit"]],
                         ids=["later-wins", "depth", "bitfit"])
def test_training_moves_exactly_the_trainable_layers(models, spec):
    m = models()
    plan = ll.apply(m.model, spec)
    before = m.layer_values()
    m.train()
    after = m.layer_values()
    moved = sorted(layer for layer in before if before[layer] != after[layer])
    expected = sorted({p.rpartition(".")[0] for p in plan.trainable})
    assert moved == expected
    assert ll.fingerprint(m.model) == ll.fingerprint(m.model)  # stable


def test_typo_in_a_pattern_is_the_same_error_everywhere(models):
    m = models()
    with pytest.raises(ll.NoMatchError) as info:
        ll.apply(m.model, ll.freeze("body.fc3"))
    assert "body.fc1" in info.value.suggestions or "body.fc2" in info.value.suggestions


def test_snapshot_restore_is_exact_everywhere(models):
    m = models()
    state = ll.snapshot(m.model)
    ll.apply(m.model, ll.freeze("stem").unfreeze("*.bias"))
    assert ll.snapshot(m.model) != state
    ll.restore(m.model, state)
    assert ll.snapshot(m.model) == state
