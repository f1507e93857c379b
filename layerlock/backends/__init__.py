"""Backends: the protocol, the registry and lazy detection.

A backend is considered only when its framework is already in ``sys.modules``, so finding
one imports nothing the user has not imported; the answer is cached by ``type(model)``.
Keras is tried before torch, because on the torch Keras backend a Keras layer is also a
``torch.nn.Module``. Third parties register a backend class under the entry-point group
``layerlock.backends``::

    [project.entry-points."layerlock.backends"]
    mxnet = "layerlock_mxnet:MXNetBackend"

>>> import layerlock.backends as lb
>>> lb.get_backend(object())
Traceback (most recent call last):
...
layerlock.errors.BackendError: no layerlock backend handles a builtins.object; ...
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from ..errors import BackendError
from ..results import Finding, Plan, State
from ..tree import Tree

ENTRY_POINT_GROUP = "layerlock.backends"
REQUIRED = ("name", "module", "param_level", "owns", "tree", "apply", "read", "write", "weights")


@runtime_checkable
class Backend(Protocol):
    """What a backend implements. Import the framework inside the methods, not at the top
    of the module, so that loading the backend stays free.

    - ``name``: short name shown in reports (``"torch"``).
    - ``module``: the ``sys.modules`` key whose presence means the backend may apply.
    - ``param_level``: True when single parameters can be frozen (not just whole layers).
    - ``owns(model)``: True for models this backend handles.
    - ``tree(model)``: the model as a :class:`~layerlock.tree.Node` tree, or as the flat
      :class:`~layerlock.tree.Tree` the resolver reads (faster for large models).
    - ``apply(model, plan)``: set the flags and modes the plan decides.
    - ``read(model)`` / ``write(model, state)``: snapshot and restore a :class:`State`.
    - ``weights(model)``: ``(path, trainable, bytes)`` for each unique parameter.
    - optional ``check(model, optimizer, *, scheduler, bn, schedule)``: the list of
      :class:`~layerlock.results.Finding` that :func:`layerlock.check` reports.
    """

    name: str
    module: str
    param_level: bool

    def owns(self, model: Any) -> bool: ...
    def tree(self, model: Any) -> Tree: ...
    def apply(self, model: Any, plan: Plan) -> None: ...
    def read(self, model: Any) -> State: ...
    def write(self, model: Any, state: State) -> None: ...
    def weights(self, model: Any) -> Iterable[tuple[str, bool, bytes]]: ...


class Check(Protocol):
    """What :func:`layerlock.check` calls for a backend: read the set-up, change nothing,
    return the problems found as :class:`~layerlock.Finding` values. A backend provides one
    as its optional ``check`` method; the built-in backends' live in ``layerlock.diagnostics``."""

    def __call__(self, model: Any, optimizer: Any = None, *, scheduler: Any = None, bn: str = "follow",
                 schedule: Any = None) -> list[Finding]: ...


# backend name -> "module:function" of its diagnostics (loaded on the first ll.check).
_CHECKS: dict[str, str] = {
    "torch": "layerlock.diagnostics.torch:check",
    "keras": "layerlock.diagnostics.keras:check",
    "tf_keras": "layerlock.diagnostics.keras:check",
}


def get_check(backend: Backend) -> Check | None:
    """The diagnostics of ``backend``: its own ``check`` method, else the built-in ones for
    its name, else None (:func:`layerlock.check` then reports it as not checked).

    >>> import torch, layerlock.backends as lb
    >>> lb.get_check(lb.get_backend(torch.nn.Linear(1, 1))).__module__
    'layerlock.diagnostics.torch'
    """
    member = getattr(backend, "check", None)
    if callable(member):
        return member  # type: ignore[no-any-return]
    target = _CHECKS.get(backend.name)
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]


# name -> (sys.modules key, "module:Class"); order matters: Keras before torch.
_BUILTIN: dict[str, tuple[str, str]] = {
    "keras": ("keras", "layerlock.backends.keras:KerasBackend"),
    "tf_keras": ("tf_keras", "layerlock.backends.keras:TfKerasBackend"),
    "torch": ("torch", "layerlock.backends.torch:TorchBackend"),
    "flax": ("flax.nnx", "layerlock.backends.flax:NnxBackend"),
}
_registered: list[Backend] = []
_loaded: dict[str, Backend] = {}
_by_type: dict[type, Backend] = {}
_plugins: dict[str, Any] | None = None  # entry-point name -> entry point, read once


def _load(target: str, origin: str) -> Backend:
    module_name, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module_name), attr)
    return validate(obj() if isinstance(obj, type) else obj, origin)


def validate(backend: Any, origin: str = "") -> Backend:
    """Check that ``backend`` implements the protocol; the error names the plugin."""
    missing = [a for a in REQUIRED if not hasattr(backend, a)]
    if missing:
        raise BackendError(f"backend {origin or backend!r} does not implement {missing}; "
                           f"a backend needs {REQUIRED} (see layerlock.backends.Backend)")
    return backend  # type: ignore[no-any-return]


def register(backend: Backend) -> Backend:
    """Register a backend instance ahead of the built-in ones (for code and tests).

    >>> import layerlock.backends as lb
    >>> class Toy:
    ...     name, module, param_level = "toy", "builtins", True
    ...     def owns(self, model): return False
    ...     tree = apply = read = write = weights = None
    >>> lb.register(Toy()).name; lb.unregister("toy")
    'toy'
    """
    validate(backend, getattr(backend, "name", ""))
    unregister(backend.name)
    _registered.insert(0, backend)
    _by_type.clear()
    return backend


def unregister(name: str) -> None:
    """Remove a backend registered with :func:`register`."""
    _registered[:] = [b for b in _registered if b.name != name]
    _by_type.clear()


def _entry_points() -> dict[str, Any]:
    global _plugins
    if _plugins is None:
        from importlib.metadata import entry_points

        _plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _plugins


def _candidates() -> Iterable[Backend]:
    """Backends whose framework is imported, in priority order; nothing new is imported
    except the backend modules themselves."""
    yield from (b for b in _registered if b.module in sys.modules)
    for name, (module, target) in _BUILTIN.items():
        if module in sys.modules:
            if name not in _loaded:
                _loaded[name] = _load(target, name)
            yield _loaded[name]
    for name, ep in _entry_points().items():
        if name not in _loaded:
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not hide the built-in backends
                raise BackendError(f"backend plugin {name!r} ({ep.value}) failed to load: {exc}") from exc
            _loaded[name] = validate(obj() if isinstance(obj, type) else obj, f"{name} ({ep.value})")
        if _loaded[name].module in sys.modules:
            yield _loaded[name]


def get_backend(model: Any) -> Backend:
    """The backend that handles ``model``; raises :class:`BackendError` if none does.

    >>> import torch, layerlock.backends as lb
    >>> lb.get_backend(torch.nn.Linear(1, 1)).name
    'torch'
    """
    cls = type(model)
    cached = _by_type.get(cls)
    if cached is not None:
        return cached
    for backend in _candidates():
        if backend.owns(model):
            _by_type[cls] = backend
            return backend
    state = ", ".join(
        f"{name} ({'imported' if module in sys.modules else module + ' not imported'})"
        for name, (module, _) in _BUILTIN.items())
    extra = [b.name for b in _registered] + list(_entry_points())
    raise BackendError(
        f"no layerlock backend handles a {cls.__module__}.{cls.__qualname__}; installed backends: "
        f"{state}{'; ' + ', '.join(extra) if extra else ''}. Pass a torch.nn.Module, a keras "
        f"Model/Layer or a flax.nnx.Module, or register a backend under the entry-point group {ENTRY_POINT_GROUP!r}.")
