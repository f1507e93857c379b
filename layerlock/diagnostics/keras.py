"""``ll.check`` for Keras: a train function fixed with another trainable set (Keras 3 on
TensorFlow, tf_keras at compile), BatchNormalization with frozen weights whose flag keeps its
statistics moving, trainable variables the optimizer does not update, frozen ones it keeps
slots for.

>>> import keras
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fc")])
>>> check(model)
['the optimizer (compile the model, or pass optimizer= to ll.check)']
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

from ..backends import get_backend
from ..backends import keras_internals as internals
from ..backends.keras import compiled_optimizer
from ..results import Finding
from ..tree import Walk


class Weight(NamedTuple):
    """One variable of the model, once: its path, flag and size."""

    path: str
    trainable: bool
    numel: int


def check(model: Any, optimizer: Any = None, *, scheduler: Any = None, bn: str = "follow",
          schedule: Any = None) -> list[Finding | str]:
    """The findings of :func:`layerlock.check` for a Keras model (reads, changes nothing).
    ``optimizer`` defaults to the compiled model's; without one, or while it has no list of
    the variables it updates, a note says the optimizer was not checked. ``scheduler`` and
    ``schedule`` have no Keras meaning."""
    backend = get_backend(model)
    walk = backend.walk(model)
    tree = walk.tree
    unique = backend.unique_variables(walk)
    sizes = {tree.param_paths[o]: tree.numels[o] for o in range(len(tree.param_paths))}
    # a variable trainable in some rows (rows=) is one the optimizer updates
    params = [Weight(path, trainable or internals.variable_rows(v) is not None, sizes[path])
              for path, trainable, v in unique]
    variables = [v for _, _, v in unique]
    found = [f for f in [_stale_finding(model, params, variables)] if f is not None]
    if bn != "trainable":
        found += _norm_findings(walk)
    optimizer = compiled_optimizer(model) if optimizer is None else optimizer
    if optimizer is None:
        return [*found, "the optimizer (compile the model, or pass optimizer= to ll.check)"]
    held = internals.held_slots(optimizer, variables)
    if held is None:
        return [*found, _unlisted(optimizer)]
    return [*found, *_optimizer_findings(held, params)]


def _unlisted(optimizer: Any) -> str:
    """Why an optimizer's variables could not be checked: it has no fixed list of them."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's slots live inside
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and isinstance(inner, tf_keras.optimizers.legacy.Optimizer):
        return "the optimizer's variables (a legacy tf_keras optimizer keeps no list of the variables it updates)"
    return ("the optimizer's variables (it is not built yet: Keras builds it on the variables trainable at the "
            "first step; check again after it)")


def _stale_finding(model: Any, params: list[Weight], variables: list[Any]) -> Finding | None:
    """A compiled model whose next fit trains another set than its trainable variables: Keras
    3 on TensorFlow traces the set into the train function at the first fit, tf_keras
    records it at compile(); neither looks at ``trainable`` again by itself."""
    trained = internals.trained_by_fit(model, variables)
    if trained is None:
        return None
    never = [p for p, t in zip(params, trained) if p.trainable and not t]
    still = [p for p, t in zip(params, trained) if t and not p.trainable]
    if not never and not still:
        return None
    effects = [f"{len(never)} trainable tensors never train"] * bool(never) + [
        f"{len(still)} frozen tensors still train"] * bool(still)
    return Finding(
        "stale-train-function",
        "fit trains the set the trainable flags gave when Keras fixed it (Keras 3 on TensorFlow: when it "
        "traced the train function; tf_keras: at compile()), not the current one: "
        + " and ".join(effects),
        "ll.apply(model, spec) brings a compiled model in step (after flags set by hand, ll.apply(model, "
        "ll.Spec()) does it): it rebuilds the train function and syncs the optimizer, keeping its state; "
        "or compile again (a new optimizer starts over)",
        tuple(p.path for p in never + still), scalars=sum(p.numel for p in never + still))


def _norm_findings(walk: Walk) -> list[Finding]:
    """BatchNormalization layers whose weights are all frozen while the layer flag is on: fit
    runs such a layer in training mode, so its moving statistics still move. Keras 3 and
    tf_keras run a layer whose ``trainable`` is False in inference mode whatever ``training``
    says, so this takes flags that disagree: variable flags in Keras 3
    (``bn.gamma.trainable = False``), or in tf_keras a layer switched back on inside a frozen
    parent (whose flag hides its weights)."""
    moving = [walk.tree.layer_paths[i] for i in walk.tree.frozen_norms() if walk.layers[i].trainable]
    if not moving:
        return []
    return [Finding(
        "norm-statistics-move",
        "these BatchNormalization layers have all their weights frozen but their layer flag on, so fit runs "
        "them in training mode and their moving mean and variance change at every step",
        "freeze them with ll.apply(model, spec) (bn='follow' or 'frozen' sets layer.trainable = False, which "
        "Keras runs in inference mode), or pass bn='trainable' to ll.check if the statistics should adapt",
        tuple(moving))]


def _optimizer_findings(held: list[list[Any] | None], params: list[Weight]) -> list[Finding]:
    """Trainable variables a built optimizer does not update, frozen ones it keeps slots for."""
    out = []
    missing = [p for p, slots in zip(params, held) if p.trainable and slots is None]
    if missing:
        out.append(Finding(
            "not-in-optimizer",
            f"{len(missing)} trainable tensors are not in the optimizer (it updates the variables it was built "
            "with; unfreezing later does not add them): fit leaves them as they are (Keras 3 on TensorFlow) or "
            "fails with 'Unknown variable'",
            "ll.apply(model, spec) syncs a compiled model's optimizer, keeping its state; in a custom loop call "
            "layerlock.keras.sync_optimizer(optimizer, model); or compile again (a new optimizer starts over)",
            tuple(p.path for p in missing), scalars=sum(p.numel for p in missing)))
    kept = [(p, slots) for p, slots in zip(params, held) if not p.trainable and slots]
    if kept:
        out.append(Finding(
            "frozen-optimizer-state",
            f"the optimizer keeps slots (momentum, Adam moments) for {len(kept)} frozen tensors: memory and "
            "checkpoint space for variables that do not train",
            "ll.apply(model, spec), or layerlock.keras.sync_optimizer(optimizer, model) in a custom loop, takes "
            "them out of the optimizer and its checkpoints (layerlock keeps them aside in case they are "
            "unfrozen); to free the memory, build a new optimizer",
            tuple(p.path for p, _ in kept), bytes=sum(_nbytes(s) for _, slots in kept for s in slots)))
    return out


def _nbytes(variable: Any) -> int:
    import numpy as np

    numel = math.prod(int(d) for d in variable.shape)
    dtype = variable.dtype  # a name in Keras 3, a tf.DType in tf_keras
    return numel * np.dtype(getattr(dtype, "as_numpy_dtype", dtype)).itemsize
