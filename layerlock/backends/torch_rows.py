"""Some rows of a torch parameter trainable (``rows=``), the rest bit-identical.

The table stays the module's frozen Parameter (``requires_grad=False``, never a ``.grad``,
so no optimizer, momentum or weight decay touches it). The trainable rows are a small
Parameter registered next to it as ``<name>_layerlock_rows`` (optimizer state for those rows only),
and their indices a non-persistent buffer ``<name>_layerlock_index`` (it moves with ``.to()``).

While the model runs forward (the root and every module holding the table are hooked), each
holder sees ``_Rows.apply(table, rows, index)`` in place of the Parameter: the same storage,
with the rows written in just before, whose gradient goes to the rows only. Tied holders (an
output head tied to the input table) share that one node, so both uses train the same rows.

``state_dict()`` has the plain model's keys: ``<name>_layerlock_rows`` is dropped and the table holds
the effective values; ``load_state_dict`` of a plain checkpoint fills the rows from it.

>>> import torch
>>> emb = torch.nn.Embedding(10, 2)
>>> install(emb, emb.weight, (8, 9))
>>> sorted(emb.state_dict()), current(emb.weight)
(['weight'], (8, 9))
>>> remove(emb.weight); current(emb.weight) is None, sorted(emb.state_dict())
(True, ['weight'])
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..errors import BackendError
from . import torch_internals as internals


class _Rows(torch.autograd.Function):
    """Identity on the (up to date) table; its gradient goes to the rows only."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.axis = axis
        return weight.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return None, grad.index_select(ctx.axis, index), None, None


class _Installed:
    """One table with trainable rows: where it is held (``(module, name)``, several for tied
    modules), its axis and hooks. The hooks reach it through ``functools.partial``, so a deep
    copy of the model gets its own."""

    def __init__(self, places: list[tuple[nn.Module, str]], axis: int) -> None:
        self.places, self.axis = places, axis
        self.depth, self.saved, self.handles = 0, None, []  # saved: the Parameter while swapped

    def parts(self) -> tuple[nn.Parameter, nn.Parameter, torch.Tensor]:
        holder, name = self.places[0]
        own = internals.own_parameters(holder)
        return own[name], own[name + "_layerlock_rows"], holder.get_buffer(name + "_layerlock_index")

    def write(self) -> None:
        """Write the rows into the table, always (fused optimizers do not bump ``_version``)
        and through ``.data`` (a repeated write must not invalidate what autograd saved)."""
        weight, rows, index = self.parts()
        weight.data.index_copy_(self.axis, index, rows.data.to(weight.dtype))


INSTALLED = "_layerlock_row_state"  # on a table with trainable rows: its _Installed
ROWS = "_layerlock_is_rows"      # on a <name>_layerlock_rows Parameter


def row_axes(module: nn.Module) -> Mapping[str, int]:
    """The parameters of ``module`` whose rows ``rows=`` decides, and the axis of those rows:
    an embedding table's entries, a dense layer's output units (and their biases).

    >>> dict(row_axes(torch.nn.Linear(2, 3))), dict(row_axes(torch.nn.LayerNorm(3)))
    ({'weight': 0, 'bias': 0}, {})
    """
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return _TABLE
    if isinstance(module, nn.Linear):
        return _DENSE
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return _CONV1D  # GPT-2's dense layer keeps its weight as (in, out)
    return {}


_TABLE, _DENSE, _CONV1D = MappingProxyType({"weight": 0}), MappingProxyType({"weight": 0, "bias": 0}), \
    MappingProxyType({"weight": 1, "bias": 0})


def is_rows(p: Any) -> bool:
    """True for a ``<name>_layerlock_rows`` Parameter this module registered (not a model weight)."""
    return getattr(p, ROWS, False) is True


def current(weight: Any) -> tuple[int, ...] | None:
    """The trainable rows of ``weight`` (None: the whole tensor follows its flag)."""
    found = getattr(weight, INSTALLED, None)
    return None if found is None else tuple(found.parts()[2].tolist())


def trainable_part(path: str, weight: nn.Parameter) -> tuple[str, nn.Parameter]:
    """The named Parameter an optimizer trains for ``weight`` at ``path``: its
    ``<path>_layerlock_rows`` when only some rows train, else ``(path, weight)``."""
    found = getattr(weight, INSTALLED, None)
    return (path, weight) if found is None else (path + "_layerlock_rows", found.parts()[1])


def sharding_check() -> Callable[[Any], str | None] | None:
    """A function that says why the rows of a tensor cannot be decided (a DTensor, from
    ``fully_shard`` or tensor parallelism, is split across processes) or None for a tensor
    each process holds whole; None where no DTensor can exist (not imported).

    >>> sharding_check() is None or sharding_check()(torch.zeros(1)) is None
    True
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None:
        return None
    kind = dtensor.DTensor

    def sharded(p: Any) -> str | None:
        if isinstance(p, kind):
            return f"a DTensor placed as {tuple(map(str, p.placements))} on a mesh of {p.device_mesh.size()} processes"
        return None
    return sharded


def install(root: nn.Module, weight: nn.Parameter, rows: Sequence[int]) -> None:
    """Make rows ``rows`` of ``weight`` the only trainable part. Every module under ``root``
    that holds it (tied weights, under any name) is a holder; the axis is the one its
    holders' :func:`row_axes` give."""
    remove(weight)
    places = [(m, n) for m in root.modules() for n, p in internals.own_parameters(m).items() if p is weight]
    axes = {row_axes(m)[n] for m, n in places if n in row_axes(m)}
    if len(axes) != 1:
        raise BackendError(f"rows= needs one row axis for the tensor of shape {tuple(weight.shape)} held at "
                           f"{[type(m).__name__ + '.' + n for m, n in places]}; its holders give {sorted(axes)}")
    (axis,) = axes
    index = torch.tensor(sorted(rows), dtype=torch.long, device=weight.device)
    weight.requires_grad_(False)
    weight.grad = None
    part = nn.Parameter(weight.detach().index_select(axis, index).clone())
    setattr(part, ROWS, True)
    found = _Installed(places, axis)
    hook = functools.partial
    for m, n in places:
        m.register_parameter(n + "_layerlock_rows", part)
        m.register_buffer(n + "_layerlock_index", index, persistent=False)
        found.handles += [m.register_state_dict_pre_hook(hook(_before_save, found)),
                          m.register_state_dict_post_hook(hook(_after_save, found, n)),
                          m.register_load_state_dict_pre_hook(hook(_before_load, found, n))]
    for m in dict.fromkeys([root, *(m for m, _ in places)]):
        found.handles += [m.register_forward_pre_hook(hook(_swap_in, found)),
                          m.register_forward_hook(hook(_swap_out, found), always_call=True)]
    setattr(weight, INSTALLED, found)


def remove(weight: nn.Parameter) -> None:
    """Write the rows back and make ``weight`` a plain (frozen) Parameter again."""
    found = weight.__dict__.pop(INSTALLED, None)
    if found is None:
        return
    found.write()
    for handle in found.handles:
        handle.remove()
    for m, n in found.places:
        delattr(m, n + "_layerlock_rows")
        delattr(m, n + "_layerlock_index")


def merge(weight: Any) -> None:
    """Bring ``weight``'s table up to date with its rows (before reading its bytes)."""
    found = getattr(weight, INSTALLED, None)
    if found is not None:
        found.write()


def _swap_in(found: _Installed, module: nn.Module, args: Any) -> None:
    found.depth += 1
    if found.depth > 1:
        return  # an enclosing hooked forward has swapped already
    found.write()
    weight, rows, index = found.parts()
    if torch.is_grad_enabled() and rows.requires_grad:
        found.saved = weight
        swapped = _Rows.apply(weight, rows, index, found.axis)  # one node: every use's gradient adds up
        for m, n in found.places:
            internals.own_parameters(m)[n] = swapped


def _swap_out(found: _Installed, module: nn.Module, args: Any, out: Any) -> None:
    found.depth -= 1
    if found.depth == 0 and found.saved is not None:
        for m, n in found.places:
            internals.own_parameters(m)[n] = found.saved
        found.saved = None


def _before_save(found: _Installed, module: nn.Module, prefix: str, keep_vars: bool) -> None:
    if found.saved is None:
        found.write()


def _after_save(found: _Installed, name: str, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                local_metadata: Any) -> None:
    state_dict.pop(prefix + name + "_layerlock_rows", None)


def _before_load(found: _Installed, name: str, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                 *args: Any) -> None:
    full = state_dict.get(prefix + name)
    if full is not None and prefix + name + "_layerlock_rows" not in state_dict:
        index = module.get_buffer(name + "_layerlock_index")
        state_dict[prefix + name + "_layerlock_rows"] = full.index_select(found.axis, index.to(full.device))
