"""Freezing for JAX pytrees: Equinox modules, Flax linen param dicts, plain dicts and lists
of arrays. ``import layerlock.jax`` imports jax and optax. A pytree holds no trainable
flag, so these functions take the spec and return values: a bool mask, a partition, or an
optax transformation that leaves frozen leaves exactly where they are.

Masks say their polarity in their name, because optax uses both: :func:`trainable_mask`
is True where a leaf trains (``eqx.partition``'s filter, ``optax.masked``'s mask) and
:func:`frozen_mask` is True where it is frozen (``optax.freeze(mask)``,
``optax.transforms.selective_transform(freeze_mask=...)``). They are plain pytrees of
Python bools, the type those functions take, so a mask cannot carry its polarity itself:
pick it by name, and give layerlock the spec, never a mask (a mask passed where a spec
goes is refused, naming both).

Paths are the dict keys, attribute names (Equinox fields) and list indices from the root,
joined with ``.`` (``params.Dense_0.kernel``, ``layers.1.weight``). Every container is a
layer, so ``depth`` counts the root's entries. A layer's kind is an Equinox module's class
name; for a dict entry named the way Flax linen names submodules (``Dense_0``), the name
without its ``_<n>`` suffix (``Dense``); otherwise the container type (``dict``, ``list``).
Every array leaf starts trainable; leaves that are not arrays (an Equinox module's
activation function) are never trainable. Layers of kind ``BatchNorm`` (Equinox's
``eqx.nn.BatchNorm``, linen's ``BatchNorm_<n>``) are the norm layers that ``bn=`` governs.

>>> import jax.numpy as jnp, layerlock as ll, layerlock.jax as llj
>>> params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
>>> llj.trainable_mask(params, ll.freeze(kind="Dense").unfreeze("Dense_1"))
{'Dense_0': {'bias': False, 'kernel': False}, 'Dense_1': {'kernel': True}}
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .backends import pytree
from .diagnostics.pytree import check_state as check
from .errors import SpecError
from .resolver import BnPolicy, check_options, resolve
from .results import Plan
from .spec import Spec

__all__ = ["trainable_mask", "frozen_mask", "partition", "combine", "optimizer", "carry_state", "plan", "check"]

def plan(tree: Any, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow",
         frozen_mode: str | None = None) -> Plan:
    """The :class:`~layerlock.Plan` of ``spec`` on a pytree (every array starts trainable).

    ``bn`` means what it means in :func:`layerlock.plan`: ``"frozen"`` freezes every norm
    layer's own leaves (kind ``BatchNorm``), ``"trainable"`` keeps them training whatever the
    rules say. A pytree has no inference mode to hold, so ``plan.held`` is always empty and
    ``frozen_mode="eval"`` raises :class:`~layerlock.SpecError`.

    >>> import jax.numpy as jnp, layerlock as ll
    >>> plan({"a": jnp.ones(3), "b": jnp.ones(2)}, ll.freeze("a")).frozen
    ('a',)
    >>> linen = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "BatchNorm_0": {"scale": jnp.ones(2)}}
    >>> plan(linen, ll.unfreeze(), bn="frozen").frozen
    ('BatchNorm_0.scale',)
    """
    _refuse_mask(spec)
    check_options(spec, bn, frozen_mode)
    if frozen_mode == "eval":
        raise SpecError("frozen_mode='eval' holds frozen subtrees in inference mode, but a pytree has no "
                        "inference-mode flag for layerlock to set: run the frozen part in inference mode "
                        "yourself (inference=True when calling an Equinox model, use_running_average=True / "
                        "deterministic=True in linen's apply). Accepted here: frozen_mode=None")
    return resolve(pytree.tree(tree), spec, strict=strict, bn=bn, backend="jax", holds="none")


def _refuse_mask(spec: Any) -> None:
    """A bool pytree where a spec goes is a mask: say which way layerlock's masks point."""
    if isinstance(spec, Spec):
        return
    leaves = jax.tree.leaves(spec)
    if leaves and all(isinstance(x, (bool, np.bool_)) or (pytree.is_array(x) and x.dtype == bool) for x in leaves):
        raise SpecError("received a bool mask where a layerlock Spec goes; layerlock.jax functions take the spec "
                        "(such as ll.freeze('encoder')) and make the masks: trainable_mask (True = trainable, for "
                        "eqx.partition / optax.masked) and frozen_mask (True = frozen, for optax.freeze / "
                        "selective_transform(freeze_mask=...))")
    raise SpecError(f"expected a layerlock Spec such as ll.freeze('encoder'); received {type(spec).__name__}")


def _decisions(tree: Any, spec: Spec, strict: bool, bn: BnPolicy = "follow") -> dict[str, bool]:
    result = plan(tree, spec, strict=strict, bn=bn)
    return dict(zip(result.paths, result.trainable_after))


def trainable_mask(tree: Any, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow") -> Any:
    """A pytree of bools shaped like ``tree``: **True where the leaf trains** (the
    ``filter_spec`` of ``eqx.partition``, the ``mask`` of ``optax.masked``). For optax's
    ``freeze`` / ``selective_transform``, which take True = frozen, use :func:`frozen_mask`.

    >>> import jax.numpy as jnp, layerlock as ll
    >>> trainable_mask([jnp.ones(2), jnp.ones(3)], ll.freeze("0"))
    [False, True]
    """
    decided = _decisions(tree, spec, strict, bn)
    return jax.tree_util.tree_map_with_path(lambda k, x: decided.get(pytree.path_of(k), False), tree)


def frozen_mask(tree: Any, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow") -> Any:
    """A pytree of bools shaped like ``tree``: **True where the leaf is frozen** (the
    ``mask`` of ``optax.freeze``, the ``freeze_mask`` of
    ``optax.transforms.selective_transform``): the exact inverse of :func:`trainable_mask`.
    Leaves that are not arrays (an Equinox activation) are never trainable, so True here.

    >>> import jax.numpy as jnp, optax, layerlock as ll
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> frozen_mask(params, ll.freeze("a"))
    {'a': True, 'b': False}
    >>> tx = optax.transforms.selective_transform(optax.adamw(0.1), freeze_mask=frozen_mask(params, ll.freeze("a")))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["a"].tolist()   # frozen: not moved, weight decay included
    [1.0, 1.0]
    """
    return jax.tree.map(lambda keep: not keep, trainable_mask(tree, spec, strict=strict, bn=bn))


def mask(tree: Any, spec: Spec, *, strict: bool = True) -> Any:
    """Deprecated: the old name of :func:`trainable_mask` (True = trainable); it goes in the
    next release. Use :func:`frozen_mask` where optax wants True = frozen."""
    warnings.warn("layerlock.jax.mask is deprecated and goes in the next release: use layerlock.jax.trainable_mask "
                  "(the same mask, True = trainable), or frozen_mask (True = frozen) for optax.freeze / "
                  "selective_transform(freeze_mask=...)", DeprecationWarning, stacklevel=2)
    return trainable_mask(tree, spec, strict=strict)


def partition(tree: Any, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow") -> tuple[Any, Any]:
    """``(trainable, frozen)``: two pytrees shaped like ``tree``, each with None where the
    other has the leaf (Equinox style); :func:`combine` puts them back together.

    >>> import jax.numpy as jnp, layerlock as ll
    >>> train, frozen = partition({"a": jnp.ones(1), "b": jnp.zeros(1)}, ll.freeze("a"))
    >>> train["a"] is None, frozen["b"] is None
    (True, True)
    """
    m = trainable_mask(tree, spec, strict=strict, bn=bn)
    return (jax.tree.map(lambda x, keep: x if keep else None, tree, m),
            jax.tree.map(lambda x, keep: None if keep else x, tree, m))


def combine(*trees: Any) -> Any:
    """Merge pytrees that have None where another has the leaf (inverse of :func:`partition`).

    >>> combine({"a": None, "b": 2}, {"a": 1, "b": None})
    {'a': 1, 'b': 2}
    """
    def pick(*leaves: Any) -> Any:
        return next((x for x in leaves if x is not None), None)

    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)


def optimizer(tx: optax.GradientTransformation, tree: Any, spec: Spec, *,
              strict: bool = True, bn: BnPolicy = "follow") -> optax.GradientTransformation:
    """``tx`` for the trainable leaves and a zero update for the frozen ones, so frozen
    leaves stay bit-identical (weight decay included) and get no optimizer state (no Adam
    moments). Init it with the same pytree, or its array part (``eqx.filter(model,
    eqx.is_array)``); leaves are matched by path.

    >>> import jax.numpy as jnp, optax, layerlock as ll
    >>> params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    >>> tx = optimizer(optax.adam(0.1), params, ll.freeze("a"))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["a"].tolist()   # -0.0: adding it leaves every value bit-identical
    [-0.0, -0.0, -0.0]
    """
    decided = _decisions(tree, spec, strict, bn)

    def labels(params: Any) -> Any:
        def label(keys: tuple[Any, ...], _: Any) -> str:
            path = pytree.path_of(keys)
            if path not in decided:
                raise SpecError(f"this layerlock.jax.optimizer was built for a tree without the leaf {path!r}; "
                                "build it with the pytree you train")
            return "trainable" if decided[path] else "frozen"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"trainable": tx, "frozen": _identity_update()}, labels)


def _identity_update() -> optax.GradientTransformation:
    """Updates of -0.0, not optax.set_to_zero's +0.0: ``apply_updates`` adds them, and
    ``x + -0.0`` is ``x`` bit for bit for every x (``-0.0 + 0.0`` would be ``+0.0``)."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates))


def carry_state(new_state: Any, old_state: Any) -> Any:
    """``new_state`` (an optimizer state made by ``tx.init`` for a new trainable set) with
    every leaf that ``old_state`` has at the same path and shape carried over: the moments
    of the leaves that stayed trainable, and the step count. Use it at a phase change.

    >>> import jax.numpy as jnp, optax, layerlock as ll
    >>> tx = optax.adam(0.1)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> head, _ = partition(params, ll.freeze("a"))
    >>> state = tx.init(head)
    >>> _, state = tx.update({"a": None, "b": jnp.ones(3)}, state, head)
    >>> state = carry_state(tx.init(params), state)     # phase 2: "a" joins, "b" keeps its moments
    >>> state[0].mu["b"].tolist(), state[0].mu["a"].tolist(), int(state[0].count)
    ([0.1..., 0.1..., 0.1...], [0.0, 0.0], 1)
    """
    old = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(old_state)[0]}

    def carry(path: tuple[Any, ...], leaf: Any) -> Any:
        kept = old.get(path)
        return kept if kept is not None and np.shape(kept) == np.shape(leaf) else leaf

    return jax.tree_util.tree_map_with_path(carry, new_state)
