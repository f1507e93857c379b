"""``layerlock.jax.check`` for JAX pytrees (Equinox modules, Flax linen param dicts, dicts
and lists of arrays): a pytree holds no trainable flag, so the check takes the spec and the
optax state and finds a state that covers leaves the spec freezes: the transformation was
initialised on the whole tree (``optax.adamw(...).init(params)``) rather than built with
``layerlock.jax.optimizer``, so it computes updates for the frozen leaves and weight decay
or momentum moves them when the updates are applied, even with zero gradients.

A state leaf belongs to the parameter leaf whose path its own path ends with
(``0.mu.backbone.kernel`` to ``backbone.kernel``) and whose shape it has; a step count
belongs to none. A transformation that keeps no state per leaf (``optax.sgd`` without
momentum) shows nothing of which leaves it updates: that is reported as not checked.

>>> import jax.numpy as jnp, optax, layerlock as ll
>>> params = {"backbone": {"kernel": jnp.ones((4, 8))}, "head": {"kernel": jnp.ones((8, 2))}}
>>> report = check_state(params, ll.freeze("backbone"), optax.adamw(1e-3).init(params))
>>> report.kinds, report.findings[0].paths, report.findings[0].bytes
(('optimizer-updates-frozen',), ('backbone.kernel',), 256)
>>> import layerlock.jax as llj
>>> tx = llj.optimizer(optax.adamw(1e-3), params, ll.freeze("backbone"))
>>> bool(check_state(params, ll.freeze("backbone"), tx.init(params)))
False
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ..backends import pytree
from ..errors import SpecError
from ..resolver import resolve
from ..results import Finding, Plan, Report
from ..spec import Spec

__all__ = ["check_state"]


def check_state(tree: Any, spec: Spec | Plan, opt_state: Any, *, strict: bool = True) -> Report:
    """What :func:`layerlock.check` reports, for a pytree trained with optax: ``tree`` the
    parameters (or the whole Equinox model), ``spec`` what is frozen, ``opt_state`` the
    state of the transformation that trains them. Reads, changes nothing. For a ``bn``
    policy other than ``"follow"``, pass the plan instead of the spec:
    ``layerlock.jax.plan(tree, spec, bn="frozen")``."""
    if isinstance(spec, Plan):
        plan = spec
    elif isinstance(spec, Spec):
        plan = resolve(pytree.tree(tree), spec, strict=strict, backend="jax", holds="none")
    else:
        raise SpecError(f"expected a layerlock Spec such as ll.freeze('encoder') (or the Plan of one); "
                        f"received {type(spec).__name__}")
    leaves = {pytree.path_of(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
              if pytree.is_array(leaf)}
    frozen = {path for path, trainable in zip(plan.paths, plan.trainable_after) if not trainable}
    held: dict[str, int] = {}  # parameter path -> bytes of its state leaves
    for keys, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        owner = _owner(pytree.path_of(keys), leaves, np.shape(leaf))
        if owner is not None:
            held[owner] = held.get(owner, 0) + int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    if not held:
        return Report((), "jax", ("which leaves the transformation updates (its state holds nothing per leaf, "
                                  "as optax.sgd without momentum; build it with layerlock.jax.optimizer(tx, tree, "
                                  "spec) so frozen leaves get a zero update)",))
    covered = [path for path in plan.paths if path in frozen and path in held]  # in tree order
    if not covered:
        return Report((), "jax")
    return Report((Finding(
        "optimizer-updates-frozen",
        f"the optimizer state holds moments for {len(covered)} leaves the spec freezes: the transformation "
        "computes updates for them, so weight decay and momentum move them when the updates are applied, even "
        "with zero gradients, and their moments take memory",
        "build the transformation with layerlock.jax.optimizer(tx, tree, spec) and init it again (frozen leaves "
        "get a zero update and no state); layerlock.jax.carry_state(new_state, old_state) keeps the moments of "
        "the leaves that stay trainable",
        tuple(covered), scalars=sum(int(np.prod(np.shape(leaves[p]))) for p in covered),
        bytes=sum(held[p] for p in covered)),), "jax")


def _owner(path: str, leaves: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    """The parameter leaf a state leaf belongs to: the longest leaf path its own path ends
    with, if the shapes agree."""
    parts = path.split(".")
    for i in range(len(parts)):
        owner = ".".join(parts[i:])
        if owner in leaves:
            return owner if np.shape(leaves[owner]) == shape else None
    return None
