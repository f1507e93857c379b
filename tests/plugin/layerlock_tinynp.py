"""The layerlock backend for tinynp, written from docs/backends.md alone, as a third-party
plugin would be: it imports tinynp inside its methods only, and its entry point is

    [project.entry-points."layerlock.backends"]
    tinynp = "layerlock_tinynp:TinyBackend"

A model is a tinynp Module, or a plain list of Modules (its blocks are the entries).
"""

from __future__ import annotations

from layerlock.results import State
from layerlock.tree import build


class TinyBackend:
    name, module, param_level = "tinynp", "tinynp", True
    holds = "any"  # a held module runs in inference mode with everything under it

    def owns(self, model):
        import tinynp  # only asked while tinynp is imported: free

        if isinstance(model, list):
            return bool(model) and all(isinstance(m, tinynp.Module) for m in model)
        return isinstance(model, tinynp.Module)

    def _walk(self, model):
        def children(layer):
            return [(str(i), m) for i, m in enumerate(layer)] if isinstance(layer, list) else layer.named_children()

        def params(layer):
            return [] if isinstance(layer, list) else [
                (name, t, t.data.size, t.trainable) for name, t in layer.named_tensors()]

        def describe(layer):
            import tinynp

            return type(layer).__name__, isinstance(layer, tinynp.BatchNorm2d), bool(getattr(layer, "inference", False))

        return build(model, children, params, describe)

    def tree(self, model):
        return self._walk(model).tree

    def apply(self, model, plan):
        walk = self._walk(model)
        tensors = dict(zip(walk.tree.param_paths, walk.tensors))
        layers = dict(zip(walk.tree.layer_paths, walk.layers))
        for path, trainable in zip(plan.paths, plan.trainable_after):
            tensors[path].trainable = trainable
            if not trainable:
                tensors[path].grad = None  # no stale gradient for an optimizer to apply
        for layer in plan.layers:
            layers[layer.path].inference = layer.held_after

    def read(self, model):
        walk = self._walk(model)
        return State(self.name,
                     {path: t.trainable for path, t in zip(walk.tree.param_paths, walk.tensors)},
                     {path: {"held": layer.inference} for path, layer in zip(walk.tree.layer_paths, walk.layers)
                      if not isinstance(layer, list)})

    def write(self, model, state):
        walk = self._walk(model)
        for path, t in zip(walk.tree.param_paths, walk.tensors):
            t.trainable = state.params[path]
        for path, layer in zip(walk.tree.layer_paths, walk.layers):
            if path in state.layers:
                layer.inference = state.layers[path]["held"]

    def weights(self, model):
        walk, seen = self._walk(model), set()
        for path, t in zip(walk.tree.param_paths, walk.tensors):
            if id(t) not in seen:
                seen.add(id(t))
                yield path, t.trainable, t.data.tobytes()
