"""Every private Flax attribute layerlock uses, behind one door.

Two things the NNX backend needs have no public Flax API: a module's attributes in the
order they were defined (what ``depth`` counts), and keeping a held layer in inference
mode through a later ``model.train()``. Each function here checks the layout it relies on
first; on a layout it does not know (a future Flax) it raises
:class:`~layerlock.BackendError` naming the installed version and the safe fallback, before
anything changes.

The layouts (Flax 0.12):

- a module's ``_pytree__nodes``: a mapping (or sequence) whose keys are attribute names in
  definition order. ``nnx.jit`` and ``nnx.merge`` rebuild ``vars(module)`` in sorted order;
  this keeps the order the user wrote. Without it, ``vars(module)`` order is used. Flax's
  own bookkeeping attributes start with ``_pytree__`` and are left out.
- ``nnx.Module.set_attributes(self, *filters, raise_if_not_found=True, **attributes)``
  (later versions add keyword-only arguments such as ``graph=None``; they pass through):
  what ``train()`` / ``eval()`` call. :func:`install_mode_hold` wraps it, once, at the first
  hold, so that held layers stay in inference mode.

>>> from flax import nnx
>>> class Net(nnx.Module):
...     def __init__(self):
...         self.head = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
...         self.body = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
>>> net = nnx.merge(*nnx.split(Net()))   # vars(net) is sorted now
>>> [name for name, _ in attributes(net)]
['head', 'body']
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax
from flax import nnx

from ..errors import BackendError

NODES = "_pytree__nodes"      # a module's attribute names in definition order
BOOKKEEPING = "_pytree__"     # prefix of flax's own attributes on a module
_MISSING = object()
_KNOWN = "Safe fallback: install a Flax version that docs/compat.md lists as passing"
ORDER_FALLBACK = (_KNOWN + ", or train without layerlock through an nnx filter of your own: "
                  "nnx.Optimizer(model, tx, wrt=<filter>) and nnx.grad(..., argnums=nnx.DiffState(0, <filter>)).")
HOLD_FALLBACK = (_KNOWN + ", or apply with bn='trainable' (and frozen_mode=None): that holds no layer and patches "
                 "nothing, and BatchNorm layers then keep training (set use_running_average=True yourself "
                 "after each model.train() to fix their statistics).")
_P = inspect.Parameter


def _refuse(detail: str, fallback: str) -> BackendError:
    version = getattr(flax, "__version__", "(version unknown)")
    return BackendError(f"layerlock does not know this layout of Flax {version}: {detail}. "
                        f"Nothing was changed. {fallback}")


def attributes(module: nnx.Module) -> list[tuple[str, Any]]:
    """``(name, value)`` for each attribute of an ``nnx.Module``, in definition order, flax's
    own bookkeeping left out."""
    attrs = vars(module)
    nodes = getattr(module, NODES, _MISSING)
    if nodes is _MISSING:
        order = list(attrs)
    else:
        if isinstance(nodes, (str, bytes)) or not isinstance(nodes, (Mapping, Sequence)):
            raise _refuse(f"{type(module).__name__}.{NODES} is a {type(nodes).__name__}, expected a mapping "
                          "or sequence of attribute names in definition order", ORDER_FALLBACK)
        order = [k for k in nodes if k in attrs]
        listed = set(order)
        order += [k for k in attrs if k not in listed]
    if not all(isinstance(k, str) for k in order):
        raise _refuse(f"{type(module).__name__} has attribute names that are not strings "
                      f"({', '.join(repr(k) for k in order if not isinstance(k, str))[:60]})", ORDER_FALLBACK)
    return [(k, attrs[k]) for k in order if not k.startswith(BOOKKEEPING)]


def _check_set_attributes(method: Any) -> None:
    """Refuse a ``set_attributes`` whose calls the wrapper could not pass on unchanged:
    ``(self, *filters, <keyword-only arguments with defaults, raise_if_not_found among
    them>, **attributes)``."""
    if not callable(method):
        raise _refuse(f"nnx.Module.set_attributes is {'missing' if method is _MISSING else 'not a method'}",
                      HOLD_FALLBACK)
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        signature = None
    params = list(signature.parameters.values()) if signature else []
    keyword = {p.name: p for p in params[2:-1]}
    if not (len(params) >= 4 and params[0].kind is _P.POSITIONAL_OR_KEYWORD
            and params[1].kind is _P.VAR_POSITIONAL and params[-1].kind is _P.VAR_KEYWORD
            and "raise_if_not_found" in keyword
            and all(p.kind is _P.KEYWORD_ONLY and p.default is not _P.empty for p in keyword.values())):
        raise _refuse(f"nnx.Module.set_attributes has the signature {signature or '(unknown)'}, expected "
                      "(self, *filters, raise_if_not_found=True, **attributes)", HOLD_FALLBACK)


def install_mode_hold(mode: str) -> None:
    """Wrap ``nnx.Module.set_attributes`` (once; call it at the first hold, before changing
    anything) so that ``train()`` / ``eval()`` leave every module carrying the attribute
    ``mode`` (``((flag, value before the hold), ...)``) in inference mode, and record the
    asked-for value there instead: that is what releasing the hold restores."""
    original: Any = getattr(nnx.Module, "set_attributes", _MISSING)
    if getattr(original, "_layerlock", False):
        return
    _check_set_attributes(original)

    @functools.wraps(original)
    def set_attributes(self: nnx.Module, *filters: Any, raise_if_not_found: bool = True, **attributes: Any) -> None:
        held = {}
        for _, module in nnx.iter_modules(self):
            record = getattr(module, mode, None)
            if record is not None:  # the user's new value becomes what release restores
                held[id(module)] = (module, dict(record))
        original(self, *filters, raise_if_not_found=raise_if_not_found, **attributes)
        for module, record in held.values():
            for f in record:
                record[f] = getattr(module, f)
                setattr(module, f, True)
            setattr(module, mode, tuple(record.items()))

    set_attributes._layerlock = True  # type: ignore[attr-defined]
    nnx.Module.set_attributes = set_attributes  # type: ignore[method-assign]
