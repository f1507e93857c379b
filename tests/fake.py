"""A framework-free model and backend, for core tests (and an example of the protocol)."""

from __future__ import annotations

from layerlock.results import State
from layerlock.tree import Node, Param


class FakeModel:
    """A nested dict model: {"name": (kind, {param: numel}, children-dict)}."""

    def __init__(self, spec: dict, norm_kinds=("BatchNorm",)):
        self.spec, self.norm_kinds = spec, norm_kinds
        self.trainable: dict[str, bool] = {}
        self.held: dict[str, bool] = {}
        self.values: dict[str, bytes] = {}

        def walk(prefix: str, children: dict) -> None:
            for name, (kind, params, sub) in children.items():
                path = prefix + name
                self.held[path] = False
                for p, _ in params.items():
                    self.trainable[f"{path}.{p}"] = True
                    self.values[f"{path}.{p}"] = f"{path}.{p}".encode()
                walk(path + ".", sub)

        walk("", spec)

    def node(self) -> Node:
        def build(path: str, kind: str, params: dict, children: dict) -> Node:
            prefix = path + "." if path else ""
            return Node(path, kind,
                        params=[Param(prefix + n, k, self.trainable[prefix + n], prefix + n) for n, k in params.items()],
                        children=[build(prefix + n, *v) for n, v in children.items()],
                        norm=kind in self.norm_kinds, held=self.held.get(path, False), key=path)

        return build("", "FakeNet", {}, self.spec)


class FakeBackend:
    name = "fake"
    module = "layerlock"
    param_level = True

    def owns(self, model):
        return isinstance(model, FakeModel)

    def tree(self, model):
        return model.node()

    def apply(self, model, plan):
        for p in plan.params:
            model.trainable[p.path] = p.trainable_after
        for layer in plan.layers:
            model.held[layer.path] = layer.held_after

    def read(self, model):
        return State(self.name, dict(model.trainable), {k: {"held": v} for k, v in model.held.items()})

    def write(self, model, state):
        model.trainable.update(state.params)
        model.held.update({k: v["held"] for k, v in state.layers.items()})

    def weights(self, model):
        for path, trainable in model.trainable.items():
            yield path, trainable, model.values[path]


def resnetish() -> FakeModel:
    """stem(conv, bn) · backbone(layer1..layer4, each conv+bn) · head(fc)."""
    block = lambda: ("Block", {}, {"conv": ("Conv2d", {"weight": 9, "bias": 1}, {}),  # noqa: E731
                                   "bn": ("BatchNorm", {"weight": 1, "bias": 1}, {})})
    return FakeModel({
        "stem": ("Stem", {}, {"conv": ("Conv2d", {"weight": 27}, {}), "bn": ("BatchNorm", {"weight": 3, "bias": 3}, {})}),
        "backbone": ("Backbone", {}, {f"layer{i}": block() for i in range(1, 5)}),
        "head": ("Linear", {"weight": 10, "bias": 2}, {}),
    })
