"""Snapshot, restore, temporary freezing and fingerprints of a model's trainable state.

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

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import LayerlockError, SpecError
from .planning import BnPolicy, Plan, apply
from .spec import Spec, freeze

WHICH = ("frozen", "trainable", "all")


@dataclass(frozen=True)
class State:
    """The trainable state of a model: each parameter's flag (by path) and each layer's
    backend-specific flags (for example ``held`` and ``training`` in PyTorch).

    >>> s = State("torch", {"fc.weight": False}, {"fc": {"held": False}})
    >>> State.from_dict(s.to_dict()) == s
    True
    """

    backend: str
    params: Mapping[str, bool]
    layers: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "params": dict(self.params),
                "layers": {k: dict(v) for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> State:
        if not isinstance(data, Mapping) or set(data) - {"backend", "params", "layers"}:
            raise SpecError(f"a State dict has keys 'backend', 'params', 'layers'; received {data!r}")
        params, layers = data.get("params", {}), data.get("layers", {})
        if not isinstance(data.get("backend"), str):
            raise SpecError(f"State 'backend' must be a string; received {data.get('backend')!r}")
        if not isinstance(params, Mapping) or not all(isinstance(v, bool) for v in params.values()):
            raise SpecError("State 'params' must map parameter paths to booleans")
        if not isinstance(layers, Mapping) or not all(
                isinstance(v, Mapping) and all(isinstance(b, bool) for b in v.values()) for v in layers.values()):
            raise SpecError("State 'layers' must map layer paths to {flag: bool} mappings")
        return cls(data["backend"], dict(params), {k: dict(v) for k, v in layers.items()})


def snapshot(model: Any) -> State:
    """Record which parameters are trainable and which layers are held in inference mode.

    >>> import torch, layerlock as ll
    >>> ll.snapshot(torch.nn.Linear(2, 1)).params
    {'weight': True, 'bias': True}
    """
    from .backends import get_backend

    return get_backend(model).read(model)


def restore(model: Any, state: State) -> None:
    """Put back exactly the state that :func:`snapshot` recorded.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Linear(2, 1); s = ll.snapshot(net)
    >>> _ = ll.apply(net, ll.freeze()); ll.restore(net, s); net.weight.requires_grad
    True
    """
    from .backends import get_backend

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


def fingerprint(model: Any, which: str = "frozen") -> str:
    """SHA-256 over the paths and bytes of the ``frozen``, ``trainable`` or ``all``
    parameters; equal fingerprints mean bit-identical weights.

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Linear(2, 1)
    >>> ll.fingerprint(net, "all") == ll.fingerprint(net, "all")
    True
    """
    import hashlib

    from .backends import get_backend

    if which not in WHICH:
        raise SpecError(f"which must be one of {WHICH}; received {which!r}")
    digest = hashlib.sha256()
    for path, trainable, data in get_backend(model).weights(model):
        if which == "all" or trainable == (which == "trainable"):
            digest.update(path.encode() + b"\0")
            digest.update(data)
    return digest.hexdigest()
