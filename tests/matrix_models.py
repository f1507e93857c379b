"""The architectures, selectors and per-framework runner of the conformance matrix
(``tests/test_matrix.py``).

The same three architectures are built in every framework, each with its own idiom:

- ``mlp``: Linear -> BatchNorm -> relu -> Linear -> Linear, as the framework's Sequential
  (146 scalars);
- ``cnn``: conv -> batchnorm -> relu -> conv -> max-pool -> flatten -> dense, as the
  framework's Sequential (319 scalars);
- ``transformer``: embedding, a container of two blocks (layernorm, multi-head
  self-attention, layernorm, Linear -> gelu -> dropout -> Linear), a final layernorm and a
  dense head, as a model with four top-level children ``embed``, ``blocks``, ``norm``,
  ``head`` (1386 scalars). The blocks sit in one container in every framework (torch
  ``ModuleList``, a nested ``keras.Sequential``, ``nnx.Sequential``, ``eqx.nn.Sequential``,
  a linen module of two blocks), so ``model.layers[:N]`` names the same four blocks everywhere.

A model's **blocks** are what its user indexes as ``model.layers[:N]``, read from the
framework itself (never from layerlock): torch ``named_children()``, Keras ``model.layers``,
the entries of ``model.layers`` of an ``nnx.Sequential`` / ``eqx.nn.Sequential``, the
attributes of a module in definition order, and the top-level keys of a linen param dict.

Plans read only a model's structure and shapes, so the weights are zeros: Keras layers get
zeros initialisers, and the NNX and Equinox models are built under ``jax.eval_shape`` and
given numpy zeros (drawing random weights costs JAX a compilation per shape; built for real, the plans
are the same).

Run as a script, it computes every cell of one framework and prints them as JSON on a line
starting with ``MATRIX-JSON``; ``KERAS_BACKEND`` picks the Keras backend, so each Keras
backend runs in its own process::

    KERAS_BACKEND=jax python tests/matrix_models.py keras
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, Callable, NamedTuple

if __name__ == "__main__":  # run as a script from anywhere: import the checkout's layerlock
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import layerlock as ll  # noqa: E402

MARKER = "MATRIX-JSON "
ARCHS = ("mlp", "cnn", "transformer")
# pytrees (layerlock.jax.plan) hold nothing in inference mode and take no frozen_mode="eval"
PYTREES = ("equinox", "linen")

# sizes shared by every framework
V, D, H, F, T = 10, 8, 2, 16, 5          # vocabulary, width, heads, MLP width, sequence length


class Selector(NamedTuple):
    """One column of the matrix: a spec (built lazily: building may raise) and plan options."""

    name: str
    spec: Callable[[], Any]
    bn: str = "follow"
    frozen_mode: str | None = None
    strict: bool = True
    depth: int | None = None  # the depth its spec uses, if any

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strict": self.strict}
        if self.bn != "follow":
            out["bn"] = self.bn
        if self.frozen_mode is not None:
            out["frozen_mode"] = self.frozen_mode
        return out


def _depth(n: int) -> Selector:
    return Selector(f"depth={n}", lambda: ll.freeze(depth=n), depth=n)


def _family(name: str, strict: bool = True) -> Selector:
    return Selector(f"family:{name}", lambda: ll.freeze(kind=f"family:{name}"), strict=strict)


SELECTORS: tuple[Selector, ...] = (
    # depth: model.layers[:N]; 8 is past the blocks of every architecture (SpecError everywhere)
    *(_depth(n) for n in (1, 2, 3, -1, -2, -3, 8)),
    # layer families: one meaning in every framework
    *(_family(name) for name in ("dense", "conv", "norm", "batchnorm", "layernorm", "embedding", "attention")),
    # Dropout has no parameters, so a param dict (linen) has no entry for it: matched by
    # strict=False everywhere, and the "matched nothing" warning compared where dropout
    # layers exist as layers (not in linen)
    _family("dropout", strict=False),
    # class-name globs the names table in docs/spec.md lists as portable
    Selector("kind=BatchNorm*", lambda: ll.freeze(kind="BatchNorm*")),
    Selector("kind=Conv*", lambda: ll.freeze(kind="Conv*")),
    # the bn policy, on top of a freeze spec
    Selector("bn=follow+depth=2", lambda: ll.freeze(depth=2), bn="follow", depth=2),
    Selector("bn=trainable+depth=2", lambda: ll.freeze(depth=2), bn="trainable", depth=2),
    Selector("bn=trainable+freeze-all", lambda: ll.freeze(), bn="trainable"),
    Selector("bn=frozen+depth=1", lambda: ll.freeze(depth=1), bn="frozen", depth=1),
    Selector("bn=frozen+unfreeze-all", lambda: ll.unfreeze(), bn="frozen"),
    # frozen_mode="eval": fully frozen subtrees also held in inference mode
    Selector("frozen_mode=eval+depth=2", lambda: ll.freeze(depth=2), frozen_mode="eval", depth=2),
    Selector("frozen_mode=eval+depth=-1", lambda: ll.freeze(depth=-1), frozen_mode="eval", depth=-1),
    # the portable parameter regexes of docs/spec.md's names table
    Selector("re:bitfit", lambda: ll.freeze().unfreeze(r"re:.*\.(bias|beta)")),
    Selector("re:all-but-shifts", lambda: ll.freeze(r"re:.*\.(weight|kernel|gamma|scale)")),
)
SELECTOR_BY_NAME = {s.name: s for s in SELECTORS}
assert len(SELECTOR_BY_NAME) == len(SELECTORS)


# -- reading a plan per block -----------------------------------------------------------------------
def _under(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def summarize(plan: Any, blocks: list[str]) -> dict[str, Any]:
    """Trainable scalars and, per block in order, ``[state, held]``: state is ``frozen``,
    ``trainable``, ``mixed`` or ``empty`` (no parameters); held is whether the plan holds the
    block, or a layer inside it, in inference mode."""
    held = set(plan.held)
    rows = []
    for block in blocks:
        after = [a for p, a in zip(plan.paths, plan.trainable_after) if _under(p, block)]
        state = ("empty" if not after else "trainable" if all(after) else "frozen" if not any(after) else "mixed")
        rows.append([state, "" in held or any(_under(h, block) for h in held)])
    return {"trainable": plan.trainable_scalars, "frozen": plan.frozen_scalars, "blocks": rows}


def run_cell(plan_fn: Callable[..., Any], model: Any, blocks: list[str], selector: Selector) -> dict[str, Any]:
    """The summarised plan of one selector, or the error class it raised (with its message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = summarize(plan_fn(model, selector.spec(), **selector.options()), blocks)
        except Exception as exc:  # noqa: BLE001 - the error is the cell's result
            result = {"error": type(exc).__name__, "message": str(exc).splitlines()[0][:300] if str(exc) else ""}
    if not selector.strict:
        result["warned"] = any(issubclass(w.category, ll.LayerlockWarning) for w in caught)
    return result


# -- the models -------------------------------------------------------------------------------------
def build_torch(arch: str) -> tuple[Any, list[str]]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    elif arch == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    else:
        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ln1 = nn.LayerNorm(D)
                self.attn = nn.MultiheadAttention(D, H, batch_first=True)
                self.ln2 = nn.LayerNorm(D)
                self.fc1, self.act, self.drop, self.fc2 = nn.Linear(D, F), nn.GELU(), nn.Dropout(0.1), nn.Linear(F, D)

            def forward(self, x):
                h = self.ln1(x)
                x = x + self.attn(h, h, h, need_weights=False)[0]
                return x + self.fc2(self.drop(self.act(self.fc1(self.ln2(x)))))

        class Transformer(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(V, D)
                self.blocks = nn.ModuleList([Block(), Block()])
                self.norm = nn.LayerNorm(D)
                self.head = nn.Linear(D, V)

            def forward(self, tokens):
                x = self.embed(tokens)
                for block in self.blocks:
                    x = block(x)
                return self.head(self.norm(x))

        model = Transformer()
    return model, [name for name, _ in model.named_children()]


def build_keras(arch: str) -> tuple[Any, list[str]]:
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    L = keras.layers
    Z = {"kernel_initializer": "zeros"}  # random initialisers cost a compile per shape on JAX
    if arch == "mlp":
        model = keras.Sequential([keras.Input((4,)), L.Dense(8, name="fc1", **Z), L.BatchNormalization(name="bn"),
                                  L.ReLU(name="relu"), L.Dense(8, name="fc2", **Z), L.Dense(2, name="head", **Z)],
                                 name="mlp")
    elif arch == "cnn":
        model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="conv1", **Z),
                                  L.BatchNormalization(name="bn"), L.ReLU(name="relu"), L.Conv2D(4, 3, name="conv2", **Z),
                                  L.MaxPooling2D(2, name="pool"), L.Flatten(name="flat"), L.Dense(3, name="head", **Z)],
                                 name="cnn")
    else:
        class Block(keras.layers.Layer):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.ln1 = L.LayerNormalization(name="ln1")
                self.attn = L.MultiHeadAttention(H, D // H, name="attn", **Z)
                self.ln2 = L.LayerNormalization(name="ln2")
                self.fc1, self.act = L.Dense(F, name="fc1", **Z), L.Activation("gelu", name="act")
                self.drop, self.fc2 = L.Dropout(0.1, name="drop"), L.Dense(D, name="fc2", **Z)

            def call(self, x, training=None):
                h = self.ln1(x)
                x = x + self.attn(h, h, training=training)
                return x + self.fc2(self.drop(self.act(self.fc1(self.ln2(x))), training=training))

        blocks = keras.Sequential([Block(name="block0"), Block(name="block1")], name="blocks")
        model = keras.Sequential([keras.Input((T,), dtype="int32"), L.Embedding(V, D, name="embed", embeddings_initializer="zeros"), blocks,
                                  L.LayerNormalization(name="norm"), L.Dense(V, name="head", **Z)], name="transformer")
        model(np.zeros((1, T), "int32"))
    return model, [layer.name for layer in model.layers]


def _zeros(tree: Any) -> Any:
    """``tree`` with every abstract array (``jax.eval_shape``'s ShapeDtypeStruct) made a numpy
    array of zeros: a plan reads only structure and shapes, and drawing random weights would
    cost a JAX compilation per shape (most of this file's runtime)."""
    import jax
    import numpy as np

    def leaf(x: Any) -> Any:
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # an nnx.Rngs key
            return jax.random.key(0)
        return np.zeros(x.shape, x.dtype)

    return jax.tree.map(leaf, tree)


def build_nnx(arch: str) -> tuple[Any, list[str]]:
    from flax import nnx

    graph, state = nnx.split(nnx.eval_shape(lambda: _nnx_model(arch)))
    model = nnx.merge(graph, _zeros(state))
    if arch == "transformer":
        return model, ["embed", "blocks", "norm", "head"]
    return model, [f"layers.{i}" for i in range(len(model.layers))]


def _nnx_model(arch: str) -> Any:
    import functools

    from flax import nnx

    r = nnx.Rngs(0)
    if arch == "mlp":
        model = nnx.Sequential(nnx.Linear(4, 8, rngs=r), nnx.BatchNorm(8, rngs=r), nnx.relu,
                               nnx.Linear(8, 8, rngs=r), nnx.Linear(8, 2, rngs=r))
    elif arch == "cnn":
        model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), padding="VALID", rngs=r), nnx.BatchNorm(4, rngs=r), nnx.relu,
                               nnx.Conv(4, 4, (3, 3), padding="VALID", rngs=r),
                               functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2)),
                               lambda x: x.reshape(x.shape[0], -1), nnx.Linear(16, 3, rngs=r))
    else:
        class Block(nnx.Module):
            def __init__(self, rngs: nnx.Rngs) -> None:
                self.ln1 = nnx.LayerNorm(D, rngs=rngs)
                self.attn = nnx.MultiHeadAttention(num_heads=H, in_features=D, qkv_features=D, out_features=D,
                                                   decode=False, rngs=rngs)
                self.ln2 = nnx.LayerNorm(D, rngs=rngs)
                self.fc1, self.drop = nnx.Linear(D, F, rngs=rngs), nnx.Dropout(0.1, rngs=rngs)
                self.fc2 = nnx.Linear(F, D, rngs=rngs)

            def __call__(self, x):
                x = x + self.attn(self.ln1(x))
                return x + self.fc2(self.drop(nnx.gelu(self.fc1(self.ln2(x)))))

        class Transformer(nnx.Module):
            def __init__(self, rngs: nnx.Rngs) -> None:
                self.embed = nnx.Embed(V, D, rngs=rngs)
                self.blocks = nnx.Sequential(Block(rngs), Block(rngs))
                self.norm = nnx.LayerNorm(D, rngs=rngs)
                self.head = nnx.Linear(D, V, rngs=rngs)

            def __call__(self, tokens):
                return self.head(self.norm(self.blocks(self.embed(tokens))))

        model = Transformer(r)
    return model


def build_equinox(arch: str) -> tuple[Any, list[str]]:
    import equinox as eqx

    model = _zeros(eqx.filter_eval_shape(_equinox_model, arch))
    if arch == "transformer":
        return model, ["embed", "blocks", "norm", "head"]
    return model, [f"layers.{i}" for i in range(len(model.layers))]


def _equinox_model(arch: str) -> Any:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    k = iter(jax.random.split(jax.random.key(0), 16))
    nn = eqx.nn
    if arch == "mlp":
        model = nn.Sequential([nn.Linear(4, 8, key=next(k)), nn.BatchNorm(8, "batch", mode="batch"), nn.Lambda(jax.nn.relu),
                               nn.Linear(8, 8, key=next(k)), nn.Linear(8, 2, key=next(k))])
    elif arch == "cnn":
        model = nn.Sequential([nn.Conv2d(3, 4, 3, key=next(k)), nn.BatchNorm(4, "batch", mode="batch"), nn.Lambda(jax.nn.relu),
                               nn.Conv2d(4, 4, 3, key=next(k)), nn.MaxPool2d(2, 2), nn.Lambda(jnp.ravel),
                               nn.Linear(16, 3, key=next(k))])
    else:
        class Block(eqx.Module):
            ln1: nn.LayerNorm
            attn: nn.MultiheadAttention
            ln2: nn.LayerNorm
            fc1: nn.Linear
            drop: nn.Dropout
            fc2: nn.Linear

            def __init__(self, key: Any) -> None:
                k1, k2, k3 = jax.random.split(key, 3)
                self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
                self.attn = nn.MultiheadAttention(H, D, use_query_bias=True, use_key_bias=True,
                                                  use_value_bias=True, use_output_bias=True, key=k1)
                self.fc1, self.drop, self.fc2 = nn.Linear(D, F, key=k2), nn.Dropout(0.1), nn.Linear(F, D, key=k3)

            def __call__(self, x, *, key=None):
                h = jax.vmap(self.ln1)(x)
                x = x + self.attn(h, h, h)
                h = jax.vmap(self.fc1)(jax.vmap(self.ln2)(x))
                return x + jax.vmap(self.fc2)(self.drop(jax.nn.gelu(h), key=key, inference=key is None))

        class Transformer(eqx.Module):
            embed: nn.Embedding
            blocks: nn.Sequential
            norm: nn.LayerNorm
            head: nn.Linear

            def __init__(self, key: Any) -> None:
                k1, k2, k3, k4 = jax.random.split(key, 4)
                self.embed = nn.Embedding(V, D, key=k1)
                self.blocks = nn.Sequential([Block(k2), Block(k3)])
                self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, V, key=k4)

            def __call__(self, tokens):
                x = self.blocks(jax.vmap(self.embed)(tokens))
                return jax.vmap(self.head)(jax.vmap(self.norm)(x))

        model = Transformer(next(k))
    return model


def build_linen(arch: str) -> tuple[Any, list[str]]:
    """A linen model's ``init(...)["params"]``: the dict a linen user freezes. It has an entry
    only for layers with parameters (no relu, pool, flatten or dropout)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if arch == "mlp":
        model, x = nn.Sequential([nn.Dense(8), nn.BatchNorm(use_running_average=True), nn.relu,
                                  nn.Dense(8), nn.Dense(2)]), jnp.zeros((1, 4))
    elif arch == "cnn":
        model = nn.Sequential([nn.Conv(4, (3, 3), padding="VALID"), nn.BatchNorm(use_running_average=True), nn.relu,
                               nn.Conv(4, (3, 3), padding="VALID"), lambda x: nn.max_pool(x, (2, 2), (2, 2)),
                               lambda x: x.reshape(x.shape[0], -1), nn.Dense(3)])
        x = jnp.zeros((1, 8, 8, 3))
    else:
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = nn.LayerNorm()(x)
                x = x + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D)(h)
                h = nn.gelu(nn.Dense(F)(nn.LayerNorm()(x)))
                return x + nn.Dense(D)(nn.Dropout(0.1, deterministic=True)(h))

        class Blocks(nn.Module):
            # the container of the blocks (an nn.Sequential built inside a compact method
            # would hand its layers to the parent scope: Block_0, Block_1 at the top)
            @nn.compact
            def __call__(self, x):
                for _ in range(2):
                    x = Block()(x)                           # Block_0, Block_1
                return x

        class Transformer(nn.Module):
            @nn.compact
            def __call__(self, tokens):
                x = Blocks()(nn.Embed(V, D)(tokens))         # Embed_0, Blocks_0
                return nn.Dense(V)(nn.LayerNorm()(x))        # LayerNorm_0, Dense_0

        model, x = Transformer(), jnp.zeros((1, T), jnp.int32)
    # initialised for real: jax.eval_shape (like any jax.tree.map) returns dicts with sorted
    # keys, and a param dict's blocks are its keys in definition order
    params = model.init(jax.random.key(0), x)["params"]
    return params, list(params)


BUILDERS = {"torch": build_torch, "keras": build_keras, "nnx": build_nnx, "equinox": build_equinox,
            "linen": build_linen}


def plan_function(framework: str) -> Callable[..., Any]:
    if framework in PYTREES:
        import layerlock.jax as llj

        return llj.plan
    return ll.plan


def run_all(framework: str) -> dict[str, dict[str, Any]]:
    """Every cell of one framework: ``{arch: {"blocks": [...], "cells": {selector: result}}}``;
    each model is built once. A model that fails to build reports ``build_error``."""
    plan_fn = plan_function(framework)
    out: dict[str, dict[str, Any]] = {}
    for arch in ARCHS:
        try:
            model, blocks = BUILDERS[framework](arch)
        except Exception as exc:  # noqa: BLE001 - reported by every cell of the architecture
            out[arch] = {"build_error": f"{type(exc).__name__}: {exc}"}
            continue
        out[arch] = {"blocks": blocks, "cells": {s.name: run_cell(plan_fn, model, blocks, s) for s in SELECTORS}}
    return out


if __name__ == "__main__":
    print(MARKER + json.dumps(run_all(sys.argv[1])), flush=True)
