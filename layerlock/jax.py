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

Per-parameter learning rates mean what they mean in torch and Keras: :func:`param_groups`
gives the groups of :func:`layerlock.rates` (``lr_mult``, ``layer_decay``, ``no_decay``) and
:func:`multi_transform` makes them one optax transformation. Rates that change during
training without losing moments (a :class:`~layerlock.Schedule` phase's ``lr``) are per-leaf
multipliers: :func:`scale_by_rates`, chained after the optimizer, with
:func:`set_multipliers` and :func:`base_rates` to set them.

Some rows of a leaf (``rows=``: a linen ``Embed_<n>``'s ``embedding`` entries, a linen
``Dense_<n>``'s output units, an Equinox ``Embedding`` / ``Linear``'s rows): :func:`optimizer`
trains only those rows, through :func:`train_rows`, which wraps a whole optax chain so that
its state covers those rows only and the other rows stay bit-identical. A per-leaf mask
cannot say rows, so :func:`trainable_mask`, :func:`frozen_mask` and :func:`partition` refuse
such a spec.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .backends import pytree
from .diagnostics.pytree import check_state as check
from .errors import SpecError
from .rate_table import check_rate, rates
from .resolver import BnPolicy, check_options, resolve
from .results import Plan
from .spec import Spec

__all__ = ["trainable_mask", "frozen_mask", "partition", "combine", "optimizer", "carry_state", "plan", "check",
           "param_groups", "multi_transform", "GroupedTransformation", "scale_by_rates", "RatesState",
           "set_multipliers", "base_rates", "train_rows", "RowTransformation"]

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


def trainable_mask(tree: Any, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow") -> Any:
    """A pytree of bools shaped like ``tree``: **True where the leaf trains** (the
    ``filter_spec`` of ``eqx.partition``, the ``mask`` of ``optax.masked``). For optax's
    ``freeze`` / ``selective_transform``, which take True = frozen, use :func:`frozen_mask`.

    >>> import jax.numpy as jnp, layerlock as ll
    >>> trainable_mask([jnp.ones(2), jnp.ones(3)], ll.freeze("0"))
    [False, True]
    """
    result = plan(tree, spec, strict=strict, bn=bn)
    if result.partial:
        raise SpecError(f"this spec trains some rows only of {', '.join(result.partial[:3])} (rows=), which a "
                        "per-leaf mask cannot say: trainable_mask, frozen_mask and partition would train or freeze "
                        "the whole leaf. Use layerlock.jax.optimizer(tx, tree, spec), which trains those rows only, "
                        "or layerlock.jax.train_rows(tx, {path: (rows, axis)})")
    decided = dict(zip(result.paths, result.trainable_after))
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
    eqx.is_array)``); leaves are matched by path. A leaf the spec trains in some rows only
    (``rows=``) goes through :func:`train_rows`: ``tx`` sees and keeps state for those rows,
    the others stay bit-identical.

    >>> import jax.numpy as jnp, optax, layerlock as ll
    >>> params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    >>> tx = optimizer(optax.adam(0.1), params, ll.freeze("a"))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["a"].tolist()   # -0.0: adding it leaves every value bit-identical
    [-0.0, -0.0, -0.0]
    >>> linen = {"Embed_0": {"embedding": jnp.ones((4, 2))}}
    >>> tx = optimizer(optax.sgd(0.5), linen, ll.freeze().unfreeze("Embed_0", rows="2:"))
    >>> tx.update(linen, tx.init(linen), linen)[0]["Embed_0"]["embedding"][:, 0].tolist()
    [-0.0, -0.0, -0.5, -0.5]
    """
    result = plan(tree, spec, strict=strict, bn=bn)
    layout = pytree.tree(tree)
    decided = dict(zip(result.paths, result.trainable_after))
    parts = {result.paths[k]: (part.after, layout.rows[k].axis) for k, part in result.rows.items()
             if part.after is not None}
    decided.update(dict.fromkeys(parts, True))
    if parts:
        tx = train_rows(tx, parts)

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


# Per-parameter learning rates.

FROZEN_LABEL = "layerlock:frozen"  # multi_transform's label for the leaves in no group
_INJECT = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _leaf_path(keys: tuple[Any, ...]) -> str:
    """The dotted path of a leaf with an nnx Variable's own ``.value`` step dropped: an
    ``nnx.Optimizer`` inits its transformation with Variables and updates it with arrays."""
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return pytree.path_of(keys)


def _lookup(keys: tuple[Any, ...], table: Mapping[str, Any]) -> str | None:
    """The path under which ``table`` knows the leaf at ``keys``: its full path (an Equinox
    field may be named ``value``), else the path without an nnx Variable's ``.value``."""
    for path in (pytree.path_of(keys), _leaf_path(keys)):
        if path in table:
            return path
    return None


def _describe(state: Any) -> str:
    """The types of an optimizer state's parts, for messages."""
    if type(state) is tuple:  # optax.chain's state; a NamedTuple state is named by its type
        return "(" + ", ".join(type(s).__name__ for s in state) + ")"
    return type(state).__name__


def param_groups(tree: Any, lr: float, *, lr_mult: Mapping[str, float] | None = None,
                 weight_decay: float | None = None, no_decay: str | Sequence[str] = (),
                 layer_decay: float | None = None, within: str | None = None,
                 strict: bool = True) -> list[dict[str, Any]]:
    """The rates of :func:`layerlock.rates` for a pytree as groups
    ``[{"name", "lr", "weight_decay"?, "params": [leaf paths]}]``, for :func:`multi_transform`;
    the arguments mean what they mean in ``layerlock.torch.param_groups`` (``layer_decay``
    counts the blocks ``ll.freeze(depth=...)`` counts). Every array leaf gets a group: give
    the trainable part (``partition(params, spec)[0]``) to leave the frozen ones out, and
    :func:`multi_transform` keeps leaves in no group where they are.

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
    >>> [(g["name"], g["lr"], g["params"]) for g in param_groups(params, 1.0, layer_decay=0.5)]
    [('block0', 0.5, ['Dense_0.kernel']), ('block1', 1.0, ['Dense_1.kernel'])]
    """
    table = rates(pytree.tree(tree), lr, lr_mult=lr_mult, weight_decay=weight_decay, no_decay=no_decay,
                  layer_decay=layer_decay, within=within, strict=strict)
    return [{**{k: v for k, v in group.items() if k != "paths"}, "params": list(group["paths"])}
            for group in table.groups]


class GroupedTransformation(optax.GradientTransformationExtraArgs):
    """An optax transformation that says the learning rate it gives each leaf: ``rates``
    (path -> lr; a leaf in no group has none and does not move). :func:`multi_transform`
    returns one and :func:`base_rates` reads it; otherwise it is an ordinary
    ``optax.GradientTransformationExtraArgs``.

    >>> t = GroupedTransformation(*optax.sgd(0.1), rates={"w": 0.1})
    >>> t.rates, isinstance(t, optax.GradientTransformation)
    ({'w': 0.1}, True)
    """

    rates: dict[str, float]

    def __new__(cls, init: Any, update: Any, rates: Mapping[str, float] | None = None) -> GroupedTransformation:
        self = super().__new__(cls, init, update)
        self.rates = dict(rates or {})  # an attribute, not a field: the tuple stays (init, update), hashable
        return self


def multi_transform(make: Callable[..., optax.GradientTransformation],
                    groups: Sequence[Mapping[str, Any]]) -> GroupedTransformation:
    """``optax.multi_transform`` with ``make(lr)`` for each group (``make(lr,
    weight_decay=...)`` for a group that has one), leaves labelled by path, and updates of
    -0.0 for leaves in no group, which stay bit-identical (weight decay included) and get no
    optimizer state. ``make`` is an optax constructor (``optax.adamw``,
    ``functools.partial(optax.sgd, momentum=0.9)``); ``groups`` come from :func:`param_groups`
    or ``layerlock.flax.param_groups``. Init it with the params pytree, its Equinox array part
    (``eqx.filter(model, eqx.is_array)``), or use it in an ``nnx.Optimizer``. Each group keeps
    its own step count: a schedule built into ``make`` runs per group; to scale every group
    by one schedule, chain it: ``optax.chain(tx, optax.scale_by_schedule(factor))``.

    >>> import jax.numpy as jnp, optax
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    >>> tx = multi_transform(optax.sgd, [{"name": "slow", "lr": 0.5, "params": ["a"]},
    ...                                  {"name": "fast", "lr": 2.0, "params": ["b"]}])
    >>> updates, _ = tx.update(params, tx.init(params), params)   # gradients of 1
    >>> {k: v.tolist() for k, v in updates.items()}
    {'a': [-0.5, -0.5], 'b': [-2.0, -2.0], 'c': [-0.0, -0.0]}
    """
    if not callable(make):
        raise SpecError(f"multi_transform: make must be an optax constructor such as optax.adamw (called as "
                        f"make(lr)); received {make!r}")
    if isinstance(groups, (str, Mapping)) or not isinstance(groups, Sequence):
        raise SpecError(f"multi_transform: groups must be a list of dicts, as layerlock.jax.param_groups makes; "
                        f"received {type(groups).__name__}")
    label_of: dict[str, str] = {}
    lr_of: dict[str, float] = {}
    transforms: dict[str, optax.GradientTransformation] = {}
    for i, group in enumerate(groups):
        where = f"multi_transform: groups[{i}]"
        if not isinstance(group, Mapping) or not {"name", "lr", "params"} <= set(group) <= {
                "name", "lr", "weight_decay", "params"}:
            raise SpecError(f"{where} must be a dict with 'name', 'lr' and 'params' (and optional 'weight_decay'), "
                            f"as layerlock.jax.param_groups makes; received {group!r:.100}")
        name, paths = group["name"], group["params"]
        if not isinstance(name, str) or name in transforms or name == FROZEN_LABEL:
            raise SpecError(f"{where}: 'name' must be a string that no other group has (nor {FROZEN_LABEL!r}); "
                            f"received {name!r}")
        lr = check_rate(group["lr"], f"{where}['lr']")
        extra = {} if group.get("weight_decay") is None else {
            "weight_decay": check_rate(group["weight_decay"], f"{where}['weight_decay']", zero=True)}
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise SpecError(f"{where}['params'] must be a list of leaf paths such as 'params.Dense_0.kernel'; "
                            f"received {paths!r:.100}")
        for path in paths:
            if path in label_of:
                raise SpecError(f"{where}: {path!r} is in group {label_of[path]!r} already; a leaf has one rate")
            label_of[path], lr_of[path] = name, lr
        try:
            transforms[name] = make(lr, **extra)
        except TypeError as exc:
            if not extra:
                raise
            raise SpecError(f"{where} has a weight_decay, so it calls make(lr, weight_decay=...), which {make!r} "
                            f"refused ({exc}). Use a constructor that takes it (optax.adamw), or give the groups "
                            "no weight_decay") from None
    transforms[FROZEN_LABEL] = _identity_update()

    def labels(params: Any) -> Any:
        def label(keys: tuple[Any, ...], _: Any) -> str:
            path = _lookup(keys, label_of)
            return FROZEN_LABEL if path is None else label_of[path]

        out = jax.tree_util.tree_map_with_path(label, params)
        given = jax.tree.leaves(out)
        if label_of and given and all(x == FROZEN_LABEL for x in given):
            leaves = [pytree.path_of(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            raise SpecError(f"multi_transform: none of this tree's leaves ({', '.join(leaves[:4])}, ...) is in a "
                            f"group (they name {', '.join(list(label_of)[:4])}, ...): build the groups from the "
                            "pytree you train")
        return out

    inner = optax.multi_transform(transforms, labels)
    return GroupedTransformation(inner.init, inner.update, lr_of)


class RatesState(NamedTuple):
    """The state of :func:`scale_by_rates`: each leaf's rate multiplier, a float32 scalar,
    by leaf path."""

    multipliers: dict[str, Any]


def scale_by_rates(groups: Sequence[Mapping[str, Any]] | None = None, *,
                   lr: float | None = None) -> optax.GradientTransformation:
    """Multiply each leaf's update by a multiplier of its own (1.0 at init), so that rates
    can change per leaf during training without touching the optimizer's moments. Chain it
    after the optimizer, ``optax.chain(tx, scale_by_rates())``: a leaf with multiplier 0.1
    trains at a tenth of ``tx``'s rate, and follows ``tx``'s schedule. Set multipliers with
    :func:`set_multipliers`; across a change of the trainable set, carry the state over with
    :func:`carry_state` as any other.

    With ``groups`` (from :func:`param_groups`) and ``lr``, the rate ``tx`` was built with,
    each leaf starts at its group's ``lr`` over ``lr``: the groups' rates through one ``tx``,
    cheaper than :func:`multi_transform`'s one ``tx`` per group (weight decay stays ``tx``'s).

    >>> import jax.numpy as jnp, optax
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> tx = optax.chain(optax.sgd(1.0), scale_by_rates())
    >>> state = set_multipliers(tx.init(params), {"a": 0.25})
    >>> {k: v.tolist() for k, v in tx.update(params, state, params)[0].items()}
    {'a': [-0.25, -0.25], 'b': [-1.0, -1.0]}
    >>> tx = optax.chain(optax.sgd(1.0), scale_by_rates([{"name": "a", "lr": 0.5, "params": ["a"]}], lr=1.0))
    >>> tx.update(params, tx.init(params), params)[0]["a"].tolist()
    [-0.5, -0.5]
    """
    start: dict[str, float] = {}
    if groups is not None:
        base = check_rate(lr, "scale_by_rates: lr (the rate the chained optimizer was built with)")
        for i, group in enumerate(groups):
            rate = check_rate(group.get("lr") if isinstance(group, Mapping) else None, f"scale_by_rates: groups[{i}]['lr']")
            start.update((str(path), rate / base) for path in group["params"])

    def init(params: Any) -> RatesState:
        multipliers: dict[str, Any] = {}
        for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
            path = _leaf_path(keys)
            if path in multipliers:
                raise SpecError(f"scale_by_rates: two leaves have the path {path!r}; it keys each leaf's multiplier "
                                "by path, so it takes pytrees of dicts, lists and Equinox modules")
            multipliers[path] = jnp.asarray(start.get(path, 1.0), jnp.float32)
        return RatesState(multipliers)

    def update(updates: Any, state: RatesState, params: Any = None) -> tuple[Any, RatesState]:
        def scale(keys: tuple[Any, ...], u: Any) -> Any:
            path = _leaf_path(keys)
            if path not in state.multipliers:
                raise SpecError(f"scale_by_rates: its state has no multiplier for {path!r}: it was made for another "
                                "tree. After a change of the trainable set, carry it over: "
                                "carry_state(tx.init(new_tree), state)")
            return (u * state.multipliers[path]).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init, update)


def _rates_states(state: Any) -> list[RatesState]:
    def is_rates(x: Any) -> bool:
        return isinstance(x, RatesState)

    return [x for x in jax.tree.leaves(state, is_leaf=is_rates) if is_rates(x)]


def set_multipliers(state: Any, multipliers: Mapping[str, float]) -> Any:
    """``state`` (an optax state with a :func:`scale_by_rates` part) with the multiplier of
    each leaf path in ``multipliers`` set; other leaves keep theirs. A multiplier is a
    finite number >= 0; a path the state lacks raises :class:`~layerlock.SpecError`, and
    nothing changes.

    >>> import jax.numpy as jnp
    >>> state = scale_by_rates().init({"a": jnp.ones(2)})
    >>> float(set_multipliers(state, {"a": 0.5}).multipliers["a"])
    0.5
    """
    wanted = {p: check_rate(f, f"set_multipliers: the multiplier of {p!r}", zero=True)
              for p, f in dict(multipliers).items()}
    found = _rates_states(state)
    if not found:
        raise SpecError(f"set_multipliers: this optimizer state ({_describe(state)}) has no scale_by_rates part: "
                        "chain it after the optimizer, optax.chain(tx, layerlock.jax.scale_by_rates()), and init that")
    known = set().union(*(x.multipliers for x in found))
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise SpecError(f"set_multipliers: the state has no leaf {', '.join(map(repr, unknown[:5]))}; its leaves: "
                        f"{', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''}")

    def replace(x: Any) -> Any:
        if not isinstance(x, RatesState):
            return x
        return RatesState({p: jnp.asarray(wanted[p], jnp.float32) if p in wanted else m
                           for p, m in x.multipliers.items()})

    return jax.tree.map(replace, state, is_leaf=lambda x: isinstance(x, RatesState))


def base_rates(tx: optax.GradientTransformation, params: Any, *, state: Any = None) -> dict[str, float]:
    """The learning rate ``tx`` gives each leaf of ``params``, before any
    :func:`scale_by_rates` multiplier: what a phase's ``lr`` is measured against. Read from
    a :class:`GroupedTransformation` (:func:`multi_transform`: the leaf's group; leaves in no
    group are left out), else from the ``learning_rate`` of the one
    ``optax.inject_hyperparams`` state in ``tx.init(params)``: its value at step 0 (a
    schedule's first value). ``state``: that init, if you have it. A rate that cannot be
    read raises :class:`~layerlock.SpecError` saying how to build one that can.

    >>> import jax.numpy as jnp, optax
    >>> base_rates(optax.inject_hyperparams(optax.adam)(learning_rate=0.5), {"w": jnp.ones(2)})
    {'w': 0.5}
    """
    if isinstance(tx, RowTransformation):  # its state is its inner chain's, for fewer rows: same rates
        return base_rates(tx.inner, params, state=state)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if isinstance(tx, GroupedTransformation):
        found_in = ((keys, _lookup(keys, tx.rates)) for keys, _ in flat)
        return {_leaf_path(keys): tx.rates[hit] for keys, hit in found_in if hit is not None}
    state = tx.init(params) if state is None else state
    injected = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _INJECT))
                if isinstance(s, _INJECT) and "learning_rate" in s.hyperparams]
    if len(injected) != 1:
        raise SpecError(
            f"cannot read the learning rate of this optax transformation: its state ({_describe(state)}) has "
            f"{len(injected) or 'no'} optax.inject_hyperparams part{'s' if len(injected) > 1 else ''} with a "
            "learning_rate, and one is needed. Build it with optax.inject_hyperparams(optax.adam)(learning_rate=1e-3) "
            "(a schedule works there too), or with layerlock.jax.multi_transform(optax.adam, groups)")
    base = float(np.asarray(injected[0].hyperparams["learning_rate"]))
    if not (math.isfinite(base) and base > 0):
        raise SpecError(f"the optimizer's learning rate at step 0 is {base:g}, and a rate relative to it is undefined "
                        "(a warmup from 0?). Give inject_hyperparams a rate > 0 and chain the warmup as a factor: "
                        "optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), "
                        "optax.scale_by_schedule(warmup))")
    return dict.fromkeys((_leaf_path(keys) for keys, _ in flat), base)


# Some rows of a leaf.


def _row_index(path: str, value: Any, who: str) -> tuple[tuple[int, ...], int]:
    """``(indices, axis)`` of one :func:`train_rows` entry, checked: non-negative ints, sorted
    and unique (range is checked against the leaf's shape at init)."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise SpecError(f"{who}: rows[{path!r}] must be (row indices, axis), such as ([3, 7], 0) or "
                        f"(range(90, 100), 0); received {value!r:.80}")
    index, axis = value
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis < 0:
        raise SpecError(f"{who}: rows[{path!r}]: the axis must be an int >= 0 (0: an embedding table's entries, "
                        f"1: a linen Dense kernel's output units); received {axis!r}")
    try:
        items = np.asarray(list(index))
    except TypeError:
        items = np.asarray(index)
    if items.ndim != 1 or items.size == 0 or not (np.issubdtype(items.dtype, np.integer)
                                                  and not np.issubdtype(items.dtype, np.bool_)):
        raise SpecError(f"{who}: rows[{path!r}]: the row indices must be a non-empty 1-D list of ints; "
                        f"received {index!r:.80}")
    if items.min() < 0:
        raise SpecError(f"{who}: rows[{path!r}]: row indices must be >= 0; received {int(items.min())}")
    return tuple(int(i) for i in sorted(set(items.tolist()))), int(axis)


class RowTransformation(optax.GradientTransformationExtraArgs):
    """An optax transformation that trains some rows of some leaves only (:func:`train_rows`
    makes one): ``inner`` is the wrapped chain, ``rows`` each such leaf's path and
    ``(sorted row indices, axis)``. Its state is ``inner``'s state for the gathered rows.

    >>> t = train_rows(optax.sgd(0.1), {"emb": ([2, 1], 0)})
    >>> t.rows, isinstance(t, optax.GradientTransformation)
    ({'emb': ((1, 2), 0)}, True)
    """

    inner: optax.GradientTransformation
    rows: dict[str, tuple[tuple[int, ...], int]]
    strict: bool

    def __new__(cls, inner: optax.GradientTransformation, rows: Mapping[str, tuple[tuple[int, ...], int]],
                strict: bool = True) -> RowTransformation:
        table = dict(rows)

        def init(params: Any) -> Any:
            return inner.init(_gather(params, table, strict))

        def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
            small, state = _update(inner, _gather(updates, table), state,
                                   None if params is None else _gather(params, table), **extra)
            return _expand(small, updates, table), state

        self = super().__new__(cls, init, update)
        self.inner, self.rows, self.strict = inner, table, strict  # attributes: the tuple stays (init, update)
        return self

    def with_rows(self, rows: Mapping[str, tuple[tuple[int, ...], int]]) -> RowTransformation:
        """The same inner chain over other rows (its state must be made again: ``init``)."""
        return RowTransformation(self.inner, rows, self.strict)


def _update(tx: optax.GradientTransformation, updates: Any, state: Any, params: Any, **extra: Any) -> tuple[Any, Any]:
    if extra and isinstance(tx, optax.GradientTransformationExtraArgs):
        return tx.update(updates, state, params, **extra)
    return tx.update(updates, state, params)


def _leaf_rows(keys: tuple[Any, ...], x: Any, table: Mapping[str, tuple[tuple[int, ...], int]]
               ) -> tuple[str, tuple[int, ...], int] | None:
    path = _lookup(keys, table)
    if path is None:
        return None
    index, axis = table[path]
    shape = np.shape(x)
    if axis >= len(shape) or index[-1] >= shape[axis]:
        where = (f"axis {axis} of shape {shape}" if axis < len(shape)
                 else f"a leaf of shape {shape}, without axis {axis}")
        raise SpecError(f"train_rows: rows[{path!r}] names row {index[-1]} on {where}: it was built for another "
                        "tree, or the axis is wrong (0: an embedding's entries; 1: a linen Dense kernel's output "
                        "units)")
    return path, index, axis


def _gather(tree: Any, table: Mapping[str, tuple[tuple[int, ...], int]], strict: bool = False) -> Any:
    """``tree`` with each leaf that ``table`` names cut to its rows."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out, seen = [], set()
    for keys, x in flat:
        found = _leaf_rows(keys, x, table) if x is not None else None
        if found is None:
            out.append(x)
            continue
        path, index, axis = found
        seen.add(path)
        out.append(jnp.take(x, np.asarray(index, np.int32), axis=axis))
    if strict and set(table) - seen:
        leaves = [_leaf_path(keys) for keys, _ in flat]
        raise SpecError(f"train_rows: no leaf of this tree has the path {', '.join(sorted(set(table) - seen)[:4])}; "
                        f"its leaves: {', '.join(leaves[:6])}{', ...' if len(leaves) > 6 else ''}")
    return jax.tree_util.tree_unflatten(treedef, out)


def _expand(small: Any, like: Any, table: Mapping[str, tuple[tuple[int, ...], int]]) -> Any:
    """The updates of the gathered rows at full shape, -0.0 in every other row. A gather
    from ``[updates; -0.0]`` with an inverse index, not a scatter into zeros: XLA fuses the
    gather into ``apply_updates``, and the scatter was 2-4x slower with donated buffers.
    -0.0, not 0.0: ``p + -0.0`` is ``p`` bit for bit for every ``p``, ``-0.0`` included."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    small_leaves = treedef.flatten_up_to(small)  # type: ignore[attr-defined]
    out = []
    for (keys, g), u in zip(flat, small_leaves):
        found = _leaf_rows(keys, g, table) if g is not None and u is not None else None
        if found is None:
            out.append(u)
            continue
        _, index, axis = found
        inverse = np.full(g.shape[axis], len(index), dtype=np.int32)
        inverse[list(index)] = np.arange(len(index), dtype=np.int32)
        pad = list(np.shape(u))
        pad[axis] = 1
        padded = jnp.concatenate([u.astype(g.dtype), jnp.full(pad, -0.0, g.dtype)], axis=axis)
        out.append(jnp.take(padded, inverse, axis=axis))
    return jax.tree_util.tree_unflatten(treedef, out)


def train_rows(tx: optax.GradientTransformation,
               rows: Mapping[str, tuple[Sequence[int], int]]) -> RowTransformation:
    """``tx`` run on some rows only of the leaves ``rows`` names (leaf path -> ``(row
    indices, axis)``): their gradients and values are cut to those rows before ``tx``, so
    its state (momentum, Adam moments) holds those rows only, and its updates come back at
    full shape with exactly ``-0.0`` in every other row, which ``optax.apply_updates``
    leaves bit-identical. Wrap the WHOLE chain (``optax.adamw``'s weight decay is inside it:
    zeroing the frozen rows' gradients before it would still decay them). Other leaves go
    through ``tx`` whole. Paths are :func:`plan`'s (``Embed_0.embedding``); the axis is 0 for
    an embedding's entries and 1 for a linen Dense kernel's output units (its columns).
    Indices are concrete (shapes are static under ``jax.jit``). :func:`optimizer` builds this
    from a spec's ``rows=``; ``layerlock.flax.train_rows`` from an NNX model.

    >>> import jax.numpy as jnp, optax
    >>> params = {"emb": jnp.ones((4, 2)), "b": jnp.ones(2)}
    >>> tx = train_rows(optax.adamw(0.1, weight_decay=0.5), {"emb": ([3], 0)})
    >>> state = tx.init(params)
    >>> state[0].mu["emb"].shape            # moments for row 3 only
    (1, 2)
    >>> updates, _ = tx.update(params, state, params)
    >>> [round(u, 3) for u in updates["emb"][:, 0].tolist()]   # adam's step and the decay, row 3 only
    [-0.0, -0.0, -0.0, -0.15]
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise SpecError(f"train_rows: tx must be an optax transformation such as optax.adamw(1e-3); "
                        f"received {type(tx).__name__}")
    if not isinstance(rows, Mapping) or not all(isinstance(p, str) for p in rows):
        raise SpecError(f"train_rows: rows must map leaf paths to (row indices, axis), such as "
                        f"{{'Embed_0.embedding': (range(90, 100), 0)}}; received {type(rows).__name__}")
    return RowTransformation(tx, {p: _row_index(p, v, "train_rows") for p, v in rows.items()})
