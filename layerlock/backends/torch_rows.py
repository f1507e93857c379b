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
>>> install(emb, emb, "weight", (8, 9), axis=0)
>>> sorted(emb.state_dict()), current(emb.weight)
(['weight'], (8, 9))
>>> remove(emb.weight); current(emb.weight) is None, sorted(emb.state_dict())
(True, ['weight'])
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

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
    """One table with trainable rows: its holders (tied modules), name, axis and hooks. The
    hooks reach it through ``functools.partial``, so a deep copy of the model gets its own."""

    def __init__(self, holders: list[nn.Module], name: str, axis: int) -> None:
        self.holders, self.name, self.axis = holders, name, axis
        self.depth, self.saved, self.handles = 0, None, []  # saved: the Parameter while swapped

    def parts(self) -> tuple[nn.Parameter, nn.Parameter, torch.Tensor]:
        holder = self.holders[0]
        own = internals.own_parameters(holder)
        return own[self.name], own[self.name + "_layerlock_rows"], holder.get_buffer(self.name + "_layerlock_index")

    def write(self) -> None:
        """Write the rows into the table, always (fused optimizers do not bump ``_version``)
        and through ``.data`` (a repeated write must not invalidate what autograd saved)."""
        weight, rows, index = self.parts()
        weight.data.index_copy_(self.axis, index, rows.data.to(weight.dtype))


INSTALLED = "_layerlock_row_state"  # on a table with trainable rows: its _Installed
ROWS = "_layerlock_is_rows"      # on a <name>_layerlock_rows Parameter


def is_rows(p: Any) -> bool:
    """True for a ``<name>_layerlock_rows`` Parameter this module registered (not a model weight)."""
    return getattr(p, ROWS, False) is True


def current(weight: Any) -> tuple[int, ...] | None:
    """The trainable rows of ``weight`` (None: the whole tensor follows its flag)."""
    found = getattr(weight, INSTALLED, None)
    if found is None:
        return None
    return tuple(found.holders[0].get_buffer(found.name + "_layerlock_index").tolist())


def install(root: nn.Module, module: nn.Module, name: str, rows: Sequence[int], axis: int) -> None:
    """Make rows ``rows`` (along ``axis``) of ``module.<name>`` the only trainable part; every
    module under ``root`` that holds the same Parameter (tied weights) is a holder."""
    weight = internals.own_parameters(module)[name]
    remove(weight)
    holders = [m for m in root.modules() if internals.own_parameters(m).get(name) is weight]
    index = torch.tensor(sorted(rows), dtype=torch.long, device=weight.device)
    weight.requires_grad_(False)
    weight.grad = None
    part = nn.Parameter(weight.detach().index_select(axis, index).clone())
    setattr(part, ROWS, True)
    found = _Installed(holders, name, axis)
    hook = functools.partial
    for m in holders:
        m.register_parameter(name + "_layerlock_rows", part)
        m.register_buffer(name + "_layerlock_index", index, persistent=False)
        found.handles += [m.register_state_dict_pre_hook(hook(_before_save, found)),
                          m.register_state_dict_post_hook(hook(_after_save, found)),
                          m.register_load_state_dict_pre_hook(hook(_before_load, found))]
    for m in dict.fromkeys([root, *holders]):
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
    for m in found.holders:
        delattr(m, found.name + "_layerlock_rows")
        delattr(m, found.name + "_layerlock_index")


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
        for m in found.holders:
            internals.own_parameters(m)[found.name] = swapped


def _swap_out(found: _Installed, module: nn.Module, args: Any, out: Any) -> None:
    found.depth -= 1
    if found.depth == 0 and found.saved is not None:
        for m in found.holders:
            internals.own_parameters(m)[found.name] = found.saved
        found.saved = None


def _before_save(found: _Installed, module: nn.Module, prefix: str, keep_vars: bool) -> None:
    if found.saved is None:
        found.write()


def _after_save(found: _Installed, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                local_metadata: Any) -> None:
    state_dict.pop(prefix + found.name + "_layerlock_rows", None)


def _before_load(found: _Installed, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    full = state_dict.get(prefix + found.name)
    if full is not None and prefix + found.name + "_layerlock_rows" not in state_dict:
        index = module.get_buffer(found.name + "_layerlock_index")
        state_dict[prefix + found.name + "_layerlock_rows"] = full.index_select(found.axis, index.to(full.device))
