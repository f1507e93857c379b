"""The public operations on a model: plan, apply and summary; snapshot, restore, the
temporary :func:`frozen` block and fingerprints. Each finds the model's backend, lets the
pure resolver decide, and hands the decision to the backend.

>>> import torch, layerlock as ll
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
>>> state = ll.snapshot(net)
>>> with ll.frozen(net, ll.freeze("0")):
...     net[0].weight.requires_grad
False
>>> ll.snapshot(net) == state
True
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .backends import Backend, get_backend, get_check
from .errors import BackendError, LayerlockError, SpecError
from .resolver import BnPolicy, check_options, resolve
from .results import Plan, Report, State, Summary
from .spec import Spec, freeze

WHICH = ("frozen", "trainable", "all")


def plan(model: Any, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow",
         frozen_mode: str | None = None) -> Plan:
    """Dry run: what :func:`apply` would do to ``model``; changes nothing.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> ll.plan(net, ll.freeze(depth=1)).frozen
    ('0.weight', '0.bias')
    """
    return _resolve_model(model, spec, strict, bn, frozen_mode)[1]


def apply(model: Any, spec: Spec, *, strict: bool = True, bn: BnPolicy = "follow",
          frozen_mode: str | None = None) -> Plan:
    """Apply ``spec`` to ``model`` and return the :class:`Plan` as the report.

    The whole plan is validated before the model is touched; applying never changes a
    weight's value and is idempotent.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> ll.apply(net, ll.freeze("0")).changed
    ('0.weight', '0.bias')
    >>> net[0].weight.requires_grad
    False
    """
    backend, result = _resolve_model(model, spec, strict, bn, frozen_mode)
    backend.apply(model, result)
    return result


def _resolve_model(model: Any, spec: Spec, strict: bool, bn: BnPolicy,
                   frozen_mode: str | None) -> tuple[Backend, Plan]:
    """The model's backend and the plan of ``spec`` on it (options validated before any walk)."""
    check_options(spec, bn, frozen_mode)
    backend = get_backend(model)
    # A plan allocates a few objects per tensor; the cyclic collections they would trigger
    # walk the whole model again and again. Only the walk and the resolution run paused.
    enabled = gc.isenabled()
    gc.disable()
    try:
        root = backend.tree(model)
        return backend, resolve(root, spec, strict=strict, bn=bn, frozen_mode=frozen_mode,
                                param_level=backend.param_level, backend=backend.name,
                                holds=getattr(backend, "holds", "any"))
    finally:
        if enabled:
            gc.enable()


def summary(model: Any) -> Summary:
    """Trainable and frozen counts per top-level block; ``print()`` it for a table.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> ll.summary(net).trainable_scalars
    9
    """
    return Summary.of(get_backend(model).tree(model))


def snapshot(model: Any) -> State:
    """Record which parameters are trainable and which layers are held in inference mode.

    >>> import torch, layerlock as ll
    >>> ll.snapshot(torch.nn.Linear(2, 1)).params
    {'weight': True, 'bias': True}
    """
    return get_backend(model).read(model)


def restore(model: Any, state: State) -> None:
    """Put back exactly the state that :func:`snapshot` recorded.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Linear(2, 1); s = ll.snapshot(net)
    >>> _ = ll.apply(net, ll.freeze()); ll.restore(net, s); net.weight.requires_grad
    True
    """
    if not isinstance(state, State):
        raise SpecError(f"restore() takes a State from ll.snapshot(); received {type(state).__name__}")
    backend = get_backend(model)
    current = backend.read(model)
    if state.backend != backend.name:
        raise LayerlockError(f"this State was taken by the {state.backend!r} backend; the model is "
                             f"handled by {backend.name!r}")
    missing = sorted(set(current.params) - set(state.params))
    extra = sorted(set(state.params) - set(current.params))
    if missing or extra:
        raise LayerlockError(
            "the State does not fit this model: "
            + (f"the model has parameters it lacks ({', '.join(missing[:5])}) " if missing else "")
            + (f"it has parameters the model lacks ({', '.join(extra[:5])})" if extra else ""))
    backend.write(model, state)


@contextmanager
def frozen(model: Any, spec: Spec | None = None, *, strict: bool = True, bn: BnPolicy = "follow",
           frozen_mode: str | None = None) -> Iterator[Plan]:
    """Apply ``spec`` (default: freeze everything) for the ``with`` block, then restore the
    exact previous state, even on error.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Linear(2, 1)
    >>> with ll.frozen(net) as plan:
    ...     len(plan.frozen)
    2
    >>> net.weight.requires_grad
    True
    """
    state = snapshot(model)
    result = apply(model, freeze() if spec is None else spec, strict=strict, bn=bn, frozen_mode=frozen_mode)
    try:
        yield result
    finally:
        restore(model, state)


def check(model: Any, optimizer: Any = None, *, scheduler: Any = None, bn: BnPolicy = "follow",
          schedule: Any = None) -> Report:
    """Look for the silent freezing bugs in a training set-up and report each with its fix;
    changes nothing. What is looked for depends on the framework (see ``docs/check.md``):
    trainable parameters the ``optimizer`` does not hold (they never train), frozen ones it
    keeps state for or still updates, norm layers whose weights are all frozen but whose
    statistics still move (unless ``bn="trainable"`` says that is intended), reentrant
    activation checkpointing over frozen inputs, distributed wrappers or compiled models that
    do not match the trainable set, an LR ``scheduler`` that does not cover every optimizer
    group, and a ``schedule`` with more trainable sets than ``torch.compile`` recompiles for.
    What could not be inspected (no optimizer given, a backend without checks) is listed in
    ``Report.not_checked``, never passed off as clean. A JAX pytree holds no flags:
    ``layerlock.jax.check(tree, spec, opt_state)`` checks its optimizer state.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> opt = torch.optim.SGD(net[1].parameters(), lr=0.1)
    >>> ll.check(net, opt).kinds
    ('not-in-optimizer',)
    >>> ll.check(net).not_checked
    ('the optimizer (pass optimizer= to ll.check)',)
    """
    check_options(Spec(), bn, None)
    try:
        backend = get_backend(model)
    except BackendError as exc:
        if not _is_pytree(model):
            raise
        raise BackendError(f"{exc} A JAX pytree (a dict, list or Equinox module of arrays) holds no trainable "
                           "flags for ll.check to read: check its optax state against the spec with "
                           "layerlock.jax.check(tree, spec, opt_state).") from None
    finder = get_check(backend)
    if finder is None:
        return Report((), backend.name, (f"everything: the {backend.name} backend has no checks",))
    return Report.of(finder(model, optimizer, scheduler=scheduler, bn=bn, schedule=schedule), backend.name)


def _is_pytree(model: Any) -> bool:
    """A container that JAX code trains as a pytree: a dict, list or tuple, or a dataclass
    instance (an Equinox module), told apart without importing jax."""
    if isinstance(model, (Mapping, list, tuple)):
        return True
    return dataclasses.is_dataclass(model) and not isinstance(model, type)


def fingerprint(model: Any, which: str = "frozen") -> str:
    """SHA-256 over the paths and bytes of the ``frozen``, ``trainable`` or ``all``
    parameters; equal fingerprints mean bit-identical weights.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Linear(2, 1)
    >>> ll.fingerprint(net, "all") == ll.fingerprint(net, "all")
    True
    """
    if which not in WHICH:
        raise SpecError(f"which must be one of {WHICH}; received {which!r}")
    digest = hashlib.sha256()
    for path, trainable, data in get_backend(model).weights(model):
        if which == "all" or trainable == (which == "trainable"):
            digest.update(path.encode() + b"\0")
            digest.update(data)
    return digest.hexdigest()
