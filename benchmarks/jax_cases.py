"""Flax NNX models and the four JAX modes. Every model is a ``backbone`` plus a ``head``
and every mode is one ``nnx.jit`` training step (forward, cross-entropy, gradient, adamw
with weight decay), so the modes differ only in what is differentiated and updated:

- ``full``: every parameter trains (``wrt=nnx.Param``).
- ``layerlock``: ``ll.apply(model, ll.freeze("backbone"))``, then the documented step:
  ``nnx.Optimizer(..., wrt=layerlock.flax.trainable)`` and
  ``nnx.value_and_grad(..., argnums=nnx.DiffState(0, layerlock.flax.trainable))``.
- ``mask``: "optax mask only": the same ``ll.apply`` (so the same BatchNorm hold and the
  same forward), but the gradient spans every parameter and the optimizer is an
  ``optax.multi_transform`` whose backbone branch is ``optax.set_to_zero`` (no update, no
  state), as a linen ``train_state``-style step would do it (what ``layerlock.jax.optimizer``
  builds for a pytree).
- ``limit``: no layerlock: the backbone's BatchNorm layers set to
  ``use_running_average=True`` by hand and a hand-written path filter (``head`` params
  only) for the gradient and the optimizer.

JAX dispatches asynchronously: a step returns at once and ``sync`` waits for the last one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import layerlock as ll
import layerlock.flax as llf

from .measure import SIZES, Step, image_arrays, sequence_arrays

BACKBONE = "backbone"
MODES = ("full", "layerlock", "mask", "limit")
LR, WEIGHT_DECAY = 1e-3, 1e-2
_LAST: list[Any] = [None]  # the newest step's loss, for sync()


@dataclass(frozen=True)
class Case:
    """A model to benchmark: ``build(size, rngs)`` returns a ``Backboned`` module."""

    name: str
    build: Callable[[dict, nnx.Rngs], nnx.Module]
    batch: Callable[[dict], tuple[jax.Array, jax.Array]]
    full: dict
    quick: dict

    def size(self, quick: bool) -> dict:
        return self.quick if quick else self.full


# --- models ----------------------------------------------------------------------------

class Backboned(nnx.Module):
    """``backbone`` then ``head``; ``pool`` turns the backbone's output into features."""

    def __init__(self, backbone: nnx.Module, head: nnx.Module, pool: Callable[[jax.Array], jax.Array]):
        self.backbone, self.head, self.pool = backbone, head, pool

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.pool(self.backbone(x)))


def build_cnn(s: dict, rngs: nnx.Rngs) -> nnx.Module:
    """The torch ``cnn`` case in NHWC: 4 stages of 2 conv-BN-ReLU, max-pool, global mean."""
    layers: list[Any] = []
    c_in = 3
    for c in s["channels"]:
        for _ in range(2):
            layers += [nnx.Conv(c_in, c, (3, 3), padding="SAME", use_bias=False, rngs=rngs),
                       nnx.BatchNorm(c, momentum=0.9, rngs=rngs), nnx.relu]
            c_in = c
        layers.append(lambda x: nnx.max_pool(x, (2, 2), (2, 2)))
    return Backboned(nnx.Sequential(*layers), nnx.Linear(c_in, 10, rngs=rngs),
                     lambda h: h.mean(axis=(1, 2)))


class EncoderLayer(nnx.Module):
    """Post-norm like ``torch.nn.TransformerEncoderLayer`` (ReLU, dropout 0.1)."""

    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(heads, d, d, dropout_rate=0.1, decode=False, rngs=rngs)
        self.norm1, self.norm2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.linear1, self.linear2 = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm1(x + self.dropout(self.attn(x)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(nnx.relu(self.linear1(x))))))


def build_transformer(s: dict, rngs: nnx.Rngs) -> nnx.Module:
    encoder = nnx.Sequential(*[EncoderLayer(s["d"], s["heads"], rngs) for _ in range(s["layers"])])
    return Backboned(encoder, nnx.Linear(s["d"], 10, rngs=rngs), lambda h: h.mean(axis=1))


def image_batch(s: dict) -> tuple[jax.Array, jax.Array]:
    return tuple(map(jnp.asarray, image_arrays(s)))  # type: ignore[return-value]


def sequence_batch(s: dict) -> tuple[jax.Array, jax.Array]:
    return tuple(map(jnp.asarray, sequence_arrays(s)))  # type: ignore[return-value]


CASES = {c.name: c for c in [
    Case("cnn", build_cnn, image_batch,
         **SIZES["cnn"]),
    Case("transformer", build_transformer, sequence_batch,
         **SIZES["transformer"]),
]}


# --- modes -----------------------------------------------------------------------------

def head_only(path: tuple[Any, ...], value: Any) -> bool:
    """The hand-written filter of the ``limit`` mode: parameters under ``head``."""
    return isinstance(value, nnx.Param) and bool(path) and path[0] == "head"


def hold_batchnorm(module: nnx.Module) -> None:
    """What people write without layerlock: BatchNorm on its running statistics."""
    for _, m in nnx.iter_modules(module):
        if isinstance(m, nnx.BatchNorm):
            m.use_running_average = True


def mask_optimizer() -> optax.GradientTransformation:
    """adamw for the head, ``optax.set_to_zero`` (no update, no state) for the backbone,
    over a tree spanning every parameter: "optax mask only"."""
    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if _key(path[0]) == BACKBONE else "trainable", params)

    return optax.multi_transform({"trainable": _adamw(), "frozen": optax.set_to_zero()}, labels)


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _adamw() -> optax.GradientTransformation:
    return optax.adamw(LR, weight_decay=WEIGHT_DECAY)


def make_step(case: Case, mode: str, quick: bool, device: str) -> tuple[Step, nnx.Module]:
    """A fresh model in ``mode`` and its jitted training step; the step also carries
    ``opt_state_bytes`` and ``param_bytes`` (all / trainable) for the results."""
    s = case.size(quick)
    model = case.build(s, nnx.Rngs(params=0, dropout=1))
    x, y = case.batch(s)
    wrt: Any = nnx.Param
    tx = _adamw()
    if mode in ("layerlock", "mask"):
        ll.apply(model, ll.freeze(BACKBONE))
    if mode == "layerlock":
        wrt = llf.trainable
    elif mode == "mask":
        tx = mask_optimizer()
    elif mode == "limit":
        wrt = head_only
    model.train()  # layerlock's hold keeps its BatchNorm on running averages through this
    if mode == "limit":
        hold_batchnorm(model.backbone)  # by hand, after train(), which would undo it
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)

    @nnx.jit
    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        def loss_fn(model: nnx.Module) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    def step() -> None:
        _LAST[0] = train_step(model, optimizer, x, y)

    step.opt_state_bytes = tree_bytes(nnx.state(optimizer, nnx.OptState))  # type: ignore[attr-defined]
    step.param_bytes = {"all": tree_bytes(nnx.state(model, nnx.Param)),  # type: ignore[attr-defined]
                        "trainable": tree_bytes(nnx.state(model, wrt if mode != "mask" else llf.trainable))}
    return step, model


def tree_bytes(tree: Any) -> int:
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def mode_info(step: Step, model: nnx.Module) -> dict[str, Any]:
    """Per-mode figures besides the time: optimizer-state and parameter bytes."""
    return {"opt_state_bytes": step.opt_state_bytes, "param_bytes": step.param_bytes}  # type: ignore[attr-defined]


def describe(model: nnx.Module) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return {"params": int(sum(leaf.size for leaf in leaves)), "tensors": len(leaves)}


def sync(device: str) -> Callable[[], None]:
    """Wait for the newest step: every step depends on the previous one's state."""
    return lambda: jax.block_until_ready(_LAST[0])
