"""Equinox models and the JAX pytree modes (``layerlock.jax``). Every model is a
``backbone`` plus a ``head``, built with ``eqx.nn.make_with_state`` (BatchNorm statistics
live in ``eqx.nn.State``), and every mode is one ``jax.jit`` training step (forward,
cross-entropy, gradient, adamw with weight decay) that takes the same arguments: the
differentiated arrays, the other arrays, the optimizer state, the BatchNorm state, the
batch and a dropout key. The modes differ only in what is differentiated and updated:

- ``full``: every array leaf trains.
- ``layerlock``: ``layerlock.jax.partition(arrays, ll.freeze("backbone"))``, the fast step
  of ``docs/jax.md``: the gradient is taken for the trainable partition only and
  ``tx.init(trainable)`` holds moments for it only.
- ``hand``: the same step with Equinox's own frozen-layer pattern, no layerlock: a
  hand-written filter spec (``False`` everywhere, ``eqx.tree_at`` sets the head's arrays to
  ``True``) and ``eqx.partition``.
- ``mask``: "optax mask only": the gradient spans every leaf and the optimizer is
  ``layerlock.jax.optimizer(adamw, arrays, spec)`` (frozen leaves: no update, no state), as
  a ``train_state``-style step would use it.
- ``hand_mask``: the same full-gradient step with a hand-written label tree and
  ``optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()}, labels)``.
- ``limit``: the lowest-cost version: ``jax.lax.stop_gradient`` on the backbone's output
  and only the head's arrays differentiated and in the optimizer.

A pytree holds no hold: ``layerlock.jax`` leaves BatchNorm to the user (``docs/spec.md``),
so every frozen mode sets the backbone's BatchNorm layers to ``inference=True`` by hand, and
the frozen modes run the same forward. JAX dispatches asynchronously: a step returns at
once and ``sync`` waits for the last one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import layerlock as ll
import layerlock.jax as llj

from .measure import SIZES, Step, image_arrays, sequence_arrays

BACKBONE = "backbone"
MODES = ("full", "layerlock", "hand", "mask", "hand_mask", "limit")
LR, WEIGHT_DECAY = 1e-3, 1e-2   # as in jax_cases (not imported from there: that needs flax)
_LAST: list[Any] = [None]  # the newest step's loss, for sync()


@dataclass(frozen=True)
class Case:
    """A model to benchmark: ``build(size, key)`` returns a ``Backboned`` module."""

    name: str
    build: Callable[[dict, Any], "Backboned"]
    batch: Callable[[dict], tuple[jax.Array, jax.Array]]
    full: dict
    quick: dict

    def size(self, quick: bool) -> dict:
        return self.quick if quick else self.full


# --- models ----------------------------------------------------------------------------

class Backboned(eqx.Module):
    """``backbone`` then ``head`` on one example; ``pool`` turns the backbone's output into
    features; ``cut`` stops the gradient between the two (the ``limit`` mode)."""

    backbone: eqx.nn.Sequential
    head: eqx.nn.Linear
    pool: Callable[[jax.Array], jax.Array] = eqx.field(static=True)

    def __call__(self, x: jax.Array, state: eqx.nn.State, *, key: Any,
                 cut: bool = False) -> tuple[jax.Array, eqx.nn.State]:
        h, state = self.backbone(x, state, key=key)
        h = self.pool(h)
        return self.head(jax.lax.stop_gradient(h) if cut else h), state


def _max_pool(x: jax.Array) -> jax.Array:  # CHW, 2x2 windows, stride 2
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


def build_cnn(s: dict, key: Any) -> Backboned:
    """The torch ``cnn`` case (CHW per example): 4 stages of 2 conv-BN-ReLU, max-pool,
    global mean."""
    layers: list[Any] = []
    c_in = 3
    keys = iter(jax.random.split(key, 2 * len(s["channels"]) + 1))
    for c in s["channels"]:
        for _ in range(2):
            layers += [eqx.nn.Conv2d(c_in, c, 3, padding=1, use_bias=False, key=next(keys)),
                       eqx.nn.BatchNorm(c, axis_name="batch", momentum=0.9, mode="batch"),
                       eqx.nn.Lambda(jax.nn.relu)]
            c_in = c
        layers.append(eqx.nn.Lambda(_max_pool))
    return Backboned(eqx.nn.Sequential(layers), eqx.nn.Linear(c_in, 10, key=next(keys)),
                     lambda h: h.mean(axis=(1, 2)))


class EncoderLayer(eqx.Module):
    """Post-norm like ``torch.nn.TransformerEncoderLayer`` (ReLU, dropout 0.1, biases)."""

    attn: eqx.nn.MultiheadAttention
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, d: int, heads: int, key: Any):
        k1, k2, k3 = jax.random.split(key, 3)
        self.attn = eqx.nn.MultiheadAttention(heads, d, use_query_bias=True, use_key_bias=True,
                                              use_value_bias=True, use_output_bias=True,
                                              dropout_p=0.1, key=k1)
        self.norm1, self.norm2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
        self.linear1, self.linear2 = eqx.nn.Linear(d, 4 * d, key=k2), eqx.nn.Linear(4 * d, d, key=k3)
        self.dropout = eqx.nn.Dropout(0.1)

    def __call__(self, x: jax.Array, *, key: Any) -> jax.Array:  # (seq, d)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        x = jax.vmap(self.norm1)(x + self.dropout(self.attn(x, x, x, key=k1), key=k2))
        h = self.dropout(jax.nn.relu(jax.vmap(self.linear1)(x)), key=k3)
        return jax.vmap(self.norm2)(x + self.dropout(jax.vmap(self.linear2)(h), key=k4))


def build_transformer(s: dict, key: Any) -> Backboned:
    *keys, head = jax.random.split(key, s["layers"] + 1)
    encoder = eqx.nn.Sequential([EncoderLayer(s["d"], s["heads"], k) for k in keys])
    return Backboned(encoder, eqx.nn.Linear(s["d"], 10, key=head), lambda h: h.mean(axis=0))


def image_batch(s: dict) -> tuple[jax.Array, jax.Array]:
    return tuple(map(jnp.asarray, image_arrays(s, channels_last=False)))  # type: ignore[return-value]


def sequence_batch(s: dict) -> tuple[jax.Array, jax.Array]:
    return tuple(map(jnp.asarray, sequence_arrays(s)))  # type: ignore[return-value]


CASES = {c.name: c for c in [
    Case("cnn", build_cnn, image_batch,
         **SIZES["cnn"]),
    Case("transformer", build_transformer, sequence_batch,
         **SIZES["transformer"]),
]}


# --- modes -----------------------------------------------------------------------------

def hold_batchnorm(module: Any) -> Any:
    """What an Equinox user writes: the backbone's BatchNorm on its running statistics
    (``eqx.nn.inference_mode`` would also turn off the backbone's dropout)."""
    def is_bn(m: Any) -> bool:
        return isinstance(m, eqx.nn.BatchNorm)

    return jax.tree.map(lambda m: eqx.tree_at(lambda b: b.inference, m, True) if is_bn(m) else m,
                        module, is_leaf=is_bn)


def hand_filter(model: Backboned) -> Any:
    """Equinox's frozen-layer pattern: False everywhere, True for the head's arrays."""
    spec = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(lambda m: m.head, spec, replace=jax.tree.map(eqx.is_array, model.head))


def hand_labels(arrays: Any) -> Any:
    """The label tree of ``optax.multi_transform``, by hand: ``head`` trains."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "trainable" if getattr(path[0], "name", None) == "head" else "frozen", arrays)


def _adamw() -> optax.GradientTransformation:
    return optax.adamw(LR, weight_decay=WEIGHT_DECAY)


def _nothing(tree: Any) -> Any:
    """A tree shaped like ``tree`` with no arrays: the frozen part of a full-gradient step."""
    return jax.tree.map(lambda _: None, tree)


def make_step(case: Case, mode: str, quick: bool, device: str) -> tuple[Step, Any]:
    """A fresh model in ``mode`` and its jitted training step; the step also carries
    ``opt_state_bytes`` and ``param_bytes`` (all / trainable) for the results."""
    s = case.size(quick)
    model, bn_state = eqx.nn.make_with_state(case.build)(s, jax.random.key(0))
    x, y = case.batch(s)
    spec = ll.freeze(BACKBONE)
    if mode != "full":
        model = eqx.tree_at(lambda m: m.backbone, model, hold_batchnorm(model.backbone))
    arrays, static = eqx.partition(model, eqx.is_array)
    tx = _adamw()
    if mode == "full":
        train, frozen = arrays, _nothing(arrays)
    elif mode == "layerlock":
        train, frozen = llj.partition(arrays, spec)
    elif mode in ("hand", "limit"):
        train, rest = eqx.partition(model, hand_filter(model))
        frozen, static = eqx.partition(rest, eqx.is_array)
    elif mode == "mask":
        train, frozen = arrays, _nothing(arrays)
        tx = llj.optimizer(_adamw(), arrays, spec)
    elif mode == "hand_mask":
        train, frozen = arrays, _nothing(arrays)
        labels = hand_labels(arrays)  # a module is callable: pass the tree through a function
        tx = optax.multi_transform({"trainable": _adamw(), "frozen": optax.set_to_zero()}, lambda _: labels)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    cut = mode == "limit"
    opt_state = tx.init(train)

    @jax.jit
    def train_step(train: Any, frozen: Any, opt_state: Any, bn_state: Any, x: jax.Array, y: jax.Array,
                   key: Any) -> tuple[Any, Any, Any, Any, jax.Array]:
        key, sub = jax.random.split(key)

        def loss_fn(train: Any) -> tuple[jax.Array, Any]:
            m = eqx.combine(train, frozen, static)
            forward = jax.vmap(lambda xi, k, st: m(xi, st, key=k, cut=cut), axis_name="batch",
                               in_axes=(0, 0, None), out_axes=(0, None))
            logits, new_state = forward(x, jax.random.split(sub, x.shape[0]), bn_state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, new_state, key, loss

    carry = {"train": train, "opt": opt_state, "bn": bn_state, "key": jax.random.key(1)}

    def step() -> None:
        carry["train"], carry["opt"], carry["bn"], carry["key"], _LAST[0] = train_step(
            carry["train"], frozen, carry["opt"], carry["bn"], x, y, carry["key"])

    trainable = train if mode not in ("mask", "hand_mask") else llj.partition(arrays, spec)[0]
    step.opt_state_bytes = tree_bytes(opt_state)  # type: ignore[attr-defined]
    step.param_bytes = {"all": tree_bytes(arrays), "trainable": tree_bytes(trainable)}  # type: ignore[attr-defined]
    return step, model


def tree_bytes(tree: Any) -> int:
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def mode_info(step: Step, model: Any) -> dict[str, Any]:
    """Per-mode figures besides the time: optimizer-state and parameter bytes."""
    return {"opt_state_bytes": step.opt_state_bytes, "param_bytes": step.param_bytes}  # type: ignore[attr-defined]


def describe(model: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    return {"params": int(sum(leaf.size for leaf in leaves)), "tensors": len(leaves)}


def sync(device: str) -> Callable[[], None]:
    """Wait for the newest step: every step depends on the previous one's state."""
    return lambda: jax.block_until_ready(_LAST[0])
