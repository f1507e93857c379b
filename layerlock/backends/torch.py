"""PyTorch backend: a plan becomes ``requires_grad`` flags, ``grad = None`` for frozen
parameters, and an inference-mode hold on frozen BatchNorm layers.

Paths are ``named_modules()`` / ``named_parameters()`` paths of the unwrapped model
(``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers are looked
through), so users write the same patterns with or without a wrapper.

The hold: a held module carries the plain attribute ``_layerlock_eval = True`` and
``torch.nn.Module.train`` is wrapped once, so ``model.train()`` leaves held modules (and
what is under them) in eval mode. Nothing runs per forward, no module is replaced, and a
pickled model loads without layerlock (the flag is then inert).

>>> import torch, layerlock as ll
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
>>> _ = ll.apply(net, ll.freeze(depth=2))
>>> net.train().training, net[1].training
(True, False)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import DistributedFreezeError
from ..plan import Plan
from ..state import State
from ..tree import Node, Param

HOLD = "_layerlock_eval"
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel")


def _install_train_hold() -> None:
    """Wrap ``nn.Module.train`` once so that held modules stay in eval mode."""
    original = nn.Module.train
    if getattr(original, "_layerlock", False):
        return

    @functools.wraps(original)
    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        if mode is True and self.__dict__.get(HOLD, False):
            mode = False
        return original(self, mode)

    train._layerlock = True  # type: ignore[attr-defined]
    nn.Module.train = train  # type: ignore[method-assign]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / ``torch.compile`` wrappers.

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> unwrap(torch.nn.DataParallel(net)) is net
    True
    """
    while type(model).__name__ in _WRAPPERS:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel) or (
        isinstance(getattr(model, "_orig_mod", None), nn.parallel.DistributedDataParallel))


def _numel(p: torch.Tensor) -> int:
    try:
        return p.numel()
    except (RuntimeError, ValueError):  # an uninitialised lazy parameter
        return 0


class TorchBackend:
    """The PyTorch backend (``torch.nn.Module``)."""

    name = "torch"
    module = "torch"
    param_level = True

    def __init__(self) -> None:
        _install_train_hold()

    def owns(self, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def tree(self, model: nn.Module) -> Node:
        norm = nn.modules.batchnorm._NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm*

        def build(path: str, module: nn.Module) -> Node:
            prefix = path + "." if path else ""
            return Node(
                path, type(module).__name__,
                params=[Param(prefix + n, _numel(p), p.requires_grad, id(p))
                        for n, p in module._parameters.items() if p is not None],
                children=[build(prefix + n, m) for n, m in module._modules.items() if m is not None],
                norm=isinstance(module, norm), held=module.__dict__.get(HOLD, False), key=id(module))

        return build("", unwrap(model))

    def apply(self, model: nn.Module, plan: Plan) -> None:
        root = unwrap(model)
        params = dict(root.named_parameters())
        if plan.changed and _is_ddp(model):
            raise DistributedFreezeError(
                f"this plan changes requires_grad of {len(plan.changed)} parameters of a model already "
                "wrapped in DistributedDataParallel, whose reducer fixed its gradient set at wrap time "
                "(the change would fail or silently desync the ranks). Apply the spec to the inner "
                "model before wrapping it in DDP, then wrap again.")
        for entry in plan.params:
            p = params[entry.path]
            if p.requires_grad != entry.after:
                p.requires_grad_(entry.after)
            if not entry.after:
                p.grad = None  # no stale gradient, momentum step or weight decay can move it
        for layer in sorted(plan.layers, key=lambda lp: lp.path.count(".")):  # parents first
            module = root.get_submodule(layer.path)
            if layer.after:
                module.__dict__[HOLD] = True
                module.eval()
            elif module.__dict__.pop(HOLD, False):
                parent = root.get_submodule(layer.path.rpartition(".")[0])
                module.train(parent.training)

    def read(self, model: nn.Module) -> State:
        root = unwrap(model)
        return State(
            self.name,
            {n: p.requires_grad for n, p in root.named_parameters()},
            {n: {"held": m.__dict__.get(HOLD, False), "training": m.training} for n, m in root.named_modules()})

    def write(self, model: nn.Module, state: State) -> None:
        root = unwrap(model)
        changed = [n for n, p in root.named_parameters() if p.requires_grad != state.params[n]]
        if changed and _is_ddp(model):
            raise DistributedFreezeError(
                f"restoring would change requires_grad of {len(changed)} parameters of a model wrapped "
                "in DistributedDataParallel; restore the inner model before wrapping it.")
        for n, p in root.named_parameters():
            p.requires_grad_(state.params[n])
            if not state.params[n]:
                p.grad = None
        for n, m in root.named_modules():
            flags = state.layers.get(n)
            if flags is None:
                continue
            if flags.get("held"):
                m.__dict__[HOLD] = True
            else:
                m.__dict__.pop(HOLD, None)
            m.training = flags.get("training", m.training)

    def weights(self, model: nn.Module) -> Iterator[tuple[str, bool, bytes]]:
        for n, p in unwrap(model).named_parameters():
            yield n, p.requires_grad, bytes(p.detach().to("cpu", copy=True).contiguous().untyped_storage())
