"""The learning rate each parameter gets under ``param_groups``-style arguments, with one
meaning in every framework: :func:`rates` returns a :class:`Rates` table, and each
framework's ``param_groups`` (``layerlock.torch``, ``.keras``, ``.flax``, ``.jax``) is built
from it. No framework is imported here.

- ``lr_mult={pattern: factor}``: the parameters a pattern selects (as a spec's pattern
  does: a layer path selects its subtree) get ``factor`` times the rate; the last matching
  pattern wins.
- ``layer_decay=d``: the top block gets ``lr`` and the block ``k`` below it ``lr * d**k``.
  Blocks are what ``ll.freeze(depth=...)`` counts (the model's children, or the entries of
  its layer list); with ``within``, that container's blocks, with what comes before it at the
  bottom and what comes after it on top.
- ``weight_decay`` / ``no_decay``: the decay of every group, and patterns whose parameters
  get ``0.0`` (biases, norms).

>>> from layerlock.tree import Node, Param
>>> net = Node("", "Net", children=[Node("a", "Linear", params=[Param("a.w", 4, True, 0)]),
...                                 Node("b", "Linear", params=[Param("b.w", 2, True, 1)])])
>>> rates(net, 1.0, layer_decay=0.5).lr
{'a.w': 0.5, 'b.w': 1.0}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._format import table
from .errors import SpecError
from .resolver import blocks, select
from .tree import Node, Tree


@dataclass(frozen=True)
class Rates:
    """The rate table: one row per trainable parameter (a tied one once, under its first
    path), in model order. ``str(rates)`` is a readable table; ``groups`` gives the rows
    grouped as an optimizer's param groups.

    >>> r = Rates(1.0, ("a.w", "b.w"), (0.5, 1.0), (None, None), ("block0", "block1"), (0, 1))
    >>> r.lr["a.w"], [g["name"] for g in r.groups]
    (0.5, ['block0', 'block1'])
    """

    base: float
    paths: tuple[str, ...]
    lrs: tuple[float, ...]
    weight_decays: tuple[float | None, ...]
    names: tuple[str, ...]
    blocks: tuple[int | None, ...]

    @property
    def lr(self) -> dict[str, float]:
        """Path -> learning rate."""
        return dict(zip(self.paths, self.lrs))

    @property
    def weight_decay(self) -> dict[str, float | None]:
        """Path -> weight decay (None: the optimizer's own)."""
        return dict(zip(self.paths, self.weight_decays))

    @property
    def groups(self) -> list[dict[str, Any]]:
        """``[{"name", "lr", "weight_decay"?, "paths"}]`` in order of first appearance; a group
        has a ``weight_decay`` entry only where one was given."""
        out: dict[str, dict[str, Any]] = {}
        for path, lr, decay, name in zip(self.paths, self.lrs, self.weight_decays, self.names):
            if name not in out:
                out[name] = {"name": name, "lr": lr, **({} if decay is None else {"weight_decay": decay}),
                             "paths": []}
            out[name]["paths"].append(path)
        return list(out.values())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Path -> ``{"group", "lr", "weight_decay"}``, for logs and configs."""
        return {p: {"group": n, "lr": lr, "weight_decay": wd}
                for p, lr, wd, n in zip(self.paths, self.lrs, self.weight_decays, self.names)}

    def __str__(self) -> str:
        rows = [(p, n, f"{lr:.6g}", "(optimizer's)" if wd is None else f"{wd:g}")
                for p, lr, wd, n in zip(self.paths, self.lrs, self.weight_decays, self.names)]
        return (f"rates: {len(self.paths)} trainable parameters in {len(self.groups)} groups, base lr {self.base:g}\n"
                + table(["parameter", "group", "lr", "weight_decay"], rows, right=(2,)))


def check_rate(value: Any, what: str, *, zero: bool = False) -> float:
    """``value`` as a float if it is a finite number > 0 (>= 0 with ``zero``); else SpecError.

    >>> check_rate(0.1, "lr")
    0.1
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and (float(value) >= 0 if zero else float(value) > 0):
        return float(value)
    raise SpecError(f"{what} must be a finite number {'>= 0' if zero else '> 0'}; received {value!r}")


def _block_ids(tree: Tree, within: str | None, strict: bool) -> tuple[list[int], int]:
    """The block number of each parameter occurrence (0 = bottom) and the top number.

    Without ``within``, blocks are what ``depth`` counts in the model. With it, parameters
    before the container are block 0, its blocks are 1..n, and parameters after it are n+1.
    """
    paths = blocks(tree, within, strict=strict)
    ids = select(tree, paths, strict=strict, what=f"layer_decay block of {within or 'the model'}")
    if within is None:
        return [max(i, 0) for i in ids], max(len(paths) - 1, 0)
    out, seen_container = [], False
    for i in ids:
        seen_container |= i >= 0
        out.append(i + 1 if i >= 0 else len(paths) + 1 if seen_container else 0)
    return out, len(paths) + 1


def rates(model: Any, lr: float, *, lr_mult: Mapping[str, float] | None = None,
          layer_decay: float | None = None, within: str | None = None, weight_decay: float | None = None,
          no_decay: str | Sequence[str] = (), strict: bool = True) -> Rates:
    """The learning rate (and weight decay) each trainable parameter of ``model`` gets; see
    the module's docstring for the arguments. ``model`` is any model a backend handles (or a
    :class:`~layerlock.tree.Node` / ``Tree``). A pattern that matches nothing raises
    :class:`~layerlock.NoMatchError` with the closest paths (``strict=False``: a warning).

    >>> import torch, layerlock as ll
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> ll.rates(net, 1e-3, lr_mult={"1": 10}).lr["1.weight"]
    0.01
    """
    base = check_rate(lr, "lr")
    mults = {p: check_rate(f, f"lr_mult[{p!r}]", zero=True) for p, f in dict(lr_mult or {}).items()}
    if layer_decay is not None and not (isinstance(layer_decay, numbers.Real) and not isinstance(layer_decay, bool)
                                        and 0 < float(layer_decay) <= 1):
        raise SpecError(f"layer_decay must be a number in (0, 1]; received {layer_decay!r}")
    if weight_decay is not None:
        weight_decay = check_rate(weight_decay, "weight_decay", zero=True)
    no_decay = (no_decay,) if isinstance(no_decay, str) else tuple(no_decay)
    if isinstance(model, (Node, Tree)):
        tree = Tree.of(model)
    else:
        from .backends import get_backend
        tree = Tree.of(get_backend(model).tree(model))
    patterns = list(mults)
    mult_of = select(tree, patterns, strict=strict, what="lr_mult")
    decay_of = select(tree, no_decay, strict=strict, what="no_decay")
    block_of, top = _block_ids(tree, within, strict) if layer_decay is not None else (None, 0)
    rows: list[tuple[str, float, float | None, str, int | None]] = []
    seen: set[Any] = set()
    for o, path in enumerate(tree.param_paths):
        part = tree.rows.get(o)
        if not (tree.trainable[o] or (part is not None and part.trainable)) or tree.param_keys[o] in seen:
            continue  # frozen whole; a tensor trainable in part (rows=) has a rate
        seen.add(tree.param_keys[o])
        i, block = mult_of[o], None if block_of is None else block_of[o]
        mult = mults[patterns[i]] if i >= 0 else 1.0
        if block is not None:
            mult *= float(layer_decay) ** (top - block)
        decay = 0.0 if decay_of[o] >= 0 else weight_decay
        label = [f"block{block}" if block is not None else "", f"lr_mult[{patterns[i]}]" if i >= 0 else "",
                 "no_decay" if decay == 0.0 and weight_decay else ""]
        rows.append((path, base * mult, decay, "/".join(x for x in label if x) or "default", block))
    return Rates(base, *map(tuple, zip(*rows)) if rows else ((),) * 5)
