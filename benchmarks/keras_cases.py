"""Keras 3 models and the five freezing modes, for whichever backend ``KERAS_BACKEND``
names (the parent process sets it; one backend per process).

Keras has no ``no_grad``. The ``limit`` is its closest honest equivalent: the same layers
in the same modes, hand-frozen, with ``keras.ops.stop_gradient`` between backbone and head,
so no gradient can flow into the backbone. A sixth, Keras-only mode ``features`` is what a
user caching backbone features would run, without the cache: the backbone alone in
inference mode (``predict_on_batch``, so no dropout) and a head-only model trained on its
output, two dispatches per step. On TensorFlow and torch every model compiles with
``jit_compile=False``, so that every mode (and both backends) run the same graph without
XLA. On JAX, ``jit_compile=False`` would run every op eagerly, which no Keras-on-JAX user
does: there every model compiles with ``jit_compile=True`` (the JAX backend's default), so
each mode is one XLA-compiled ``train_on_batch``, retraced after every recompile.

Every step carries the bytes of its optimizer's variables (SGD momentum: one buffer per
trainable variable, plus the iteration counter) and of the trainable
variables before and after freezing, read after it has trained (Keras builds the optimizer
on the first step).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

import layerlock as ll

from .measure import SIZES, Step, image_arrays, sequence_arrays

BACKBONE = "backbone"
MODES = ("full", "layerlock", "hand", "limit", "layerlock_eval", "features")


@dataclass(frozen=True)
class Case:
    """A model to benchmark: ``build(size)`` returns ``backbone -> head`` as one model."""

    name: str
    build: Callable[[dict], keras.Model]
    batch: Callable[[dict], tuple[np.ndarray, np.ndarray]]
    full: dict
    quick: dict

    def size(self, quick: bool) -> dict:
        return self.quick if quick else self.full


def _wrap(backbone: keras.Model, head: keras.Layer, shape: tuple[int, ...]) -> keras.Model:
    inputs = keras.Input(shape)
    return keras.Model(inputs, head(backbone(inputs)), name="net")


def build_cnn(s: dict) -> keras.Model:
    layers: list[Any] = [keras.Input((s["hw"], s["hw"], 3))]
    for c in s["channels"]:
        for _ in range(2):
            layers += [keras.layers.Conv2D(c, 3, padding="same", use_bias=False),
                       keras.layers.BatchNormalization(), keras.layers.ReLU()]
        layers.append(keras.layers.MaxPooling2D())
    layers.append(keras.layers.GlobalAveragePooling2D())
    backbone = keras.Sequential(layers, name=BACKBONE)
    return _wrap(backbone, keras.layers.Dense(10, name="head"), (s["hw"], s["hw"], 3))


def build_transformer(s: dict) -> keras.Model:
    """Post-norm encoder layers like ``torch.nn.TransformerEncoderLayer``."""
    d, L = s["d"], keras.layers
    inputs = x = keras.Input((s["seq"], d))
    for _ in range(s["layers"]):
        attn = L.MultiHeadAttention(s["heads"], d // s["heads"], dropout=0.1)(x, x)
        x = L.LayerNormalization()(x + L.Dropout(0.1)(attn))
        ff = L.Dense(d)(L.Dropout(0.1)(L.Dense(4 * d, activation="relu")(x)))
        x = L.LayerNormalization()(x + L.Dropout(0.1)(ff))
    backbone = keras.Model(inputs, x, name=BACKBONE)
    head = keras.Sequential([L.GlobalAveragePooling1D(), L.Dense(10)], name="head")
    return _wrap(backbone, head, (s["seq"], d))


def build_mobilenet(s: dict) -> keras.Model:
    shape = (s["hw"], s["hw"], 3)
    backbone = keras.applications.MobileNetV2(input_shape=shape, alpha=s["alpha"], include_top=False,
                                              weights=None, pooling="avg", name=BACKBONE)
    return _wrap(backbone, keras.layers.Dense(10, name="head"), shape)


image_batch, sequence_batch = image_arrays, sequence_arrays


CASES = {c.name: c for c in [
    Case("cnn", build_cnn, image_batch,
         **SIZES["cnn"]),
    Case("transformer", build_transformer, sequence_batch,
         **SIZES["transformer"]),
    Case("mobilenetv2", build_mobilenet, image_batch,
         full={"alpha": 1.0, "batch": 16, "hw": 96},
         quick={"alpha": 0.35, "batch": 8, "hw": 32}),
]}


def jit_compile() -> bool:
    """XLA on JAX only (its eager mode runs op by op); see the module docstring."""
    return keras.backend.backend() == "jax"


def compile_(model: keras.Model) -> keras.Model:
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile())
    return model


def make_step(case: Case, mode: str, quick: bool, device: str) -> tuple[Step, keras.Model]:
    """A fresh compiled model in ``mode`` and its training step (``train_on_batch``)."""
    s = case.size(quick)
    keras.utils.set_random_seed(0)
    model = case.build(s)
    x, y = case.batch(s)
    spec = ll.freeze(BACKBONE)
    all_bytes = variable_bytes(model.trainable_weights)
    if mode in ("hand", "limit", "features"):
        model.get_layer(BACKBONE).trainable = False  # by hand: flag, then (re)compile
    compile_(model)
    if mode == "layerlock":
        ll.apply(model, spec)          # on the compiled model, as users do mid-training
    elif mode == "layerlock_eval":
        ll.apply(model, spec, frozen_mode="eval")
    if mode == "limit":
        model = compile_(_cut(model))
    if mode == "features":
        step, trained = _features_step(model, x, y)
    else:
        trained = model

        def step() -> Any:
            return model.train_on_batch(x, y)
    step.trained = trained  # type: ignore[attr-defined]  # the model whose optimizer steps
    step.all_bytes = all_bytes  # type: ignore[attr-defined]
    return step, model


class StopGradient(keras.layers.Layer):
    def call(self, x: Any) -> Any:
        return keras.ops.stop_gradient(x)


def _cut(model: keras.Model) -> keras.Model:
    """The same backbone and head, with the gradient stopped between them."""
    inputs = keras.Input(model.inputs[0].shape[1:])
    features = StopGradient()(model.get_layer(BACKBONE)(inputs))
    return keras.Model(inputs, model.get_layer("head")(features), name="cut")


def _features_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[Step, keras.Model]:
    """Backbone alone in inference mode, then a head-only model trained on its output."""
    backbone = model.get_layer(BACKBONE)
    backbone.compile(jit_compile=jit_compile())
    features = backbone.predict_on_batch(x)
    head = compile_(keras.Sequential([keras.Input(features.shape[1:]), model.get_layer("head")]))

    def step() -> Any:
        return head.train_on_batch(backbone.predict_on_batch(x), y)
    return step, head


def variable_bytes(variables: list[Any]) -> int:
    return int(sum(np.prod(v.shape, dtype=np.int64) * np.dtype(v.dtype).itemsize for v in variables))


def mode_info(step: Step, model: keras.Model) -> dict[str, Any]:
    """Optimizer-state and parameter bytes of a mode, once it has trained."""
    trained = step.trained  # type: ignore[attr-defined]
    return {"opt_state_bytes": variable_bytes(trained.optimizer.variables),
            "param_bytes": {"all": step.all_bytes,  # type: ignore[attr-defined]
                            "trainable": variable_bytes(trained.trainable_weights)}}


def describe(model: keras.Model) -> dict[str, Any]:
    return {"params": int(model.count_params()), "tensors": len(model.weights)}


def sync(device: str) -> Callable[[], None]:
    # train_on_batch returns its logs as NumPy values: each step already waits for the device.
    return lambda: None


# --- apply overhead --------------------------------------------------------------------

def layer_paths(model: keras.Model, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, layer) for every layer, recursing into nested models, like layerlock's paths."""
    out = []
    for layer in model.layers:
        path = prefix + layer.name
        out.append((path, layer))
        if hasattr(layer, "layers"):
            out += layer_paths(layer, path + ".")
    return out


def hand_loop(model: keras.Model, pattern: str) -> None:
    """The hand-written equivalent of ``ll.apply(model, ll.freeze(pattern))``: every layer
    whose path matches gets ``trainable = False`` (a user then recompiles)."""
    for path, layer in layer_paths(model):
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + ".*"):
            layer.trainable = False


def unfreeze_all(model: keras.Model) -> None:
    for _, layer in layer_paths(model):
        layer.trainable = True
