"""Backends: the protocol, the registry and lazy detection.

A backend is considered only when its framework is already in ``sys.modules``, so finding
one imports nothing the user has not imported; the answer is cached by ``type(model)``,
except for generic containers (``list``, ``dict``, ... : any type of ``builtins`` or
``collections``), whose backends are asked again for each model. Keras is tried before
torch, because on the torch Keras backend a Keras layer is also a ``torch.nn.Module``.
Third parties register a backend class under the entry-point group ``layerlock.backends``
(``docs/backends.md`` is the author's guide; ``layerlock.testing`` the conformance kit)::

    [project.entry-points."layerlock.backends"]
    mxnet = "layerlock_mxnet:MXNetBackend"

>>> import layerlock.backends as lb
>>> lb.get_backend(object())
Traceback (most recent call last):
...
layerlock.errors.BackendError: no layerlock backend handles a builtins.object (received <object object at ...>); ...
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
# Which layers a backend can hold in inference mode (its optional ``holds`` attribute).
HOLDS = ("any", "norm", "none")
# Types whose instances may belong to different backends: detection is not cached for them.
_GENERIC_MODULES = frozenset({"builtins", "collections"})


@runtime_checkable
class Backend(Protocol):
    """What a backend implements (``docs/backends.md`` says the same, with an example).

    - ``name``: short name shown in reports and errors (``"torch"``).
    - ``module``: the ``sys.modules`` key whose presence means the backend may apply;
      ``owns`` is asked only while it is imported, so detection imports nothing.
    - ``param_level``: True when single parameters can be frozen; False when only whole
      layers can (a plan that splits a layer's parameters then raises ``SpecError``).
    - ``owns(model)``: True for the models this backend handles. The answer is cached by
      ``type(model)`` (except for ``builtins`` / ``collections`` types), so it must depend on
      the type alone for any other type.
    - ``tree(model)``: the model as a :class:`~layerlock.tree.Tree`, built with
      :func:`layerlock.tree.build` from the framework's "children of a layer" and "parameters
      of a layer" (``build(...).tree``; ``Tree.of(node)`` flattens a hand-made
      :class:`~layerlock.tree.Node` tree). ``Tree.end`` is exclusive: layer ``i``'s subtree is
      ``range(i, end[i])``. ``Node.norm`` and ``Node.held`` are bools (a norm layer; held in
      inference mode now), and ``Node.parameters()`` is a generator.
    - ``apply(model, plan)``: set each parameter's trainable flag (``plan.paths``,
      ``plan.trainable_after``) and each listed layer's inference-mode hold
      (``plan.layers``: ``LayerPlan.path``, ``held_after``).
    - ``read(model)`` / ``write(model, state)``: snapshot and restore a
      :class:`~layerlock.results.State` exactly: ``State(name, params, layers)``, with
      ``params`` each parameter path's trainable flag and ``layers`` each layer path's own
      flags (``{"held": True}``, ...). Holds live in ``layers``: a backend that leaves it
      empty loses them on restore.
    - ``weights(model)``: ``(path, trainable, bytes)`` for each unique parameter
      (:func:`layerlock.fingerprint`).
    - optional ``check``, a :class:`Check`: ``check(model, optimizer, *, scheduler, bn,
      schedule)`` returns :class:`~layerlock.results.Finding` values (``kind``,
      ``problem``, ``fix``, ``paths``, ``scalars``, ``bytes``) and, for what it could not
      inspect, strings (``"the optimizer (pass optimizer= to ll.check)"``). Without it
      :func:`layerlock.check` reports the model as not checked, never as clean.
    - optional ``holds``, one of :data:`HOLDS`: which layers the backend can hold in
      inference mode. ``"any"`` (the default): norm layers and, for ``frozen_mode="eval"``,
      any frozen subtree; ``"norm"``: only norm layers, so ``frozen_mode="eval"`` raises
      ``SpecError`` before anything changes; ``"none"``: no layer, so plans hold nothing
      (the ``bn`` policy still decides norm layers' trainable flags) and
      ``frozen_mode="eval"`` raises ``SpecError``.

    Importing the framework: a plugin's module is imported (through its entry point) for
    every model the built-in backends decline, so it imports its framework inside the
    methods, never at module top; ``owns`` runs only while ``module`` is imported, so an
    import there costs nothing. The built-in backends' modules are loaded only once their
    framework is in ``sys.modules``, so they import it at the top.
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
    """What :func:`layerlock.check` calls for a backend: read the set-up, change nothing, and
    return an iterable of what it found: a :class:`~layerlock.Finding` for each problem, and
    a ``str`` for each thing it could not inspect (``"the optimizer (pass optimizer= to
    ll.check)"``), which the report lists as "not checked: ..." so that it never passes for
    clean. A backend provides one as its optional ``check`` method; the built-in backends'
    live in ``layerlock.diagnostics``."""

    def __call__(self, model: Any, optimizer: Any = None, *, scheduler: Any = None, bn: str = "follow",
                 schedule: Any = None) -> Iterable[Finding | str]: ...


# backend name -> "module:function" of its diagnostics (loaded on the first ll.check).
_CHECKS: dict[str, str] = {
    "torch": "layerlock.diagnostics.torch:check",
    "keras": "layerlock.diagnostics.keras:check",
    "tf_keras": "layerlock.diagnostics.keras:check",
    "flax": "layerlock.diagnostics.flax:check",
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
    """Check that ``backend`` implements the protocol; the error names the plugin.

    >>> class Half:
    ...     name, module, param_level, holds = "half", "builtins", True, "some"
    ...     owns = tree = apply = read = write = weights = None
    >>> validate(Half(), "half")
    Traceback (most recent call last):
    ...
    layerlock.errors.BackendError: backend 'half' has holds='some'; accepted: 'any' (the default), 'norm', 'none'
    """
    who = origin or repr(backend)
    missing = [a for a in REQUIRED if not hasattr(backend, a)]
    if missing:
        raise BackendError(f"backend {who!r} does not implement {missing}; "
                           f"a backend needs {REQUIRED} (see layerlock.backends.Backend)")
    holds = getattr(backend, "holds", "any")
    if holds not in HOLDS:
        raise BackendError(f"backend {who!r} has holds={holds!r}; accepted: 'any' (the default), 'norm', 'none'")
    check = getattr(backend, "check", None)
    if check is not None and not callable(check):
        raise BackendError(f"backend {who!r} has a check that is not callable ({check!r}); accepted: a "
                           "method check(model, optimizer, *, scheduler, bn, schedule) returning Findings")
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
            # A list of one framework's layers and a list of numbers share a type: only
            # a type of the model's own is safe to remember.
            if cls.__module__ not in _GENERIC_MODULES:
                _by_type[cls] = backend
            return backend
    raise _unowned(model)


def _unowned(model: Any) -> BackendError:
    """The error for a model no backend owns: what was received, every backend and its
    state, and what would be accepted."""
    import reprlib  # only on the error path

    cls = type(model)
    short = reprlib.Repr()
    short.maxother, short.maxstring = 80, 40
    try:
        received = short.repr(model)
    except Exception:  # a repr that fails must not hide the real error
        received = f"a {cls.__qualname__} object"
    builtin = ", ".join(f"{name} ({'imported' if module in sys.modules else module + ' not imported'})"
                        for name, (module, _) in _BUILTIN.items())
    others = [(b.name, b.module) for b in _registered]
    others += [(name, _loaded[name].module if name in _loaded else "") for name in _entry_points()]
    other = ", ".join(f"{name} ({'imported' if module in sys.modules else (module or '?') + ' not imported'})"
                      for name, module in others)
    accepted = "a torch.nn.Module, a keras Model/Layer" + (", a flax.nnx.Module" if others else " or a flax.nnx.Module")
    if others:
        accepted += " or a model of the " + ", ".join(name for name, _ in others) + \
            f" backend{'s' if len(others) > 1 else ''}"
    return BackendError(
        f"no layerlock backend handles a {cls.__module__}.{cls.__qualname__} (received {received}); "
        f"installed backends: {builtin}; registered and plugin backends: {other or 'none'}. "
        f"Pass {accepted}; or add a backend with layerlock.backends.register(...) or under the "
        f"entry-point group {ENTRY_POINT_GROUP!r} (see docs/backends.md).")
