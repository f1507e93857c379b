"""What the user's torch model is inside its wrappers: DistributedDataParallel,
DataParallel, FSDP1, ``torch.compile``, Accelerate's prepared optimizer and scheduler, and
the names a PEFT model gives its base model's weights.

>>> import torch
>>> net = torch.nn.Linear(1, 1)
>>> unwrap(torch.nn.DataParallel(net)) is net
True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..tree import Tree
from . import torch_internals as internals

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / FSDP1 / ``torch.compile`` wrappers.

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> unwrap(torch.compile(net)) is net
    True
    """
    while type(model).__name__ in _WRAPPERS:
        inner = internals.compiled_inner(model)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def ddp_of(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper in ``model``'s wrapper chain, if any.

    >>> import torch
    >>> ddp_of(torch.nn.Linear(1, 1)) is None
    True
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = internals.compiled_inner(model)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def unwrap_prepared(obj: Any) -> Any:
    """The torch optimizer or LR scheduler inside an Accelerate ``AcceleratedOptimizer`` /
    ``AcceleratedScheduler`` (what ``accelerator.prepare`` returns); anything else as it is.

    >>> import torch
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    >>> unwrap_prepared(opt) is opt
    True
    """
    name = type(obj).__name__
    if name == "AcceleratedOptimizer":
        return obj.optimizer
    if name == "AcceleratedScheduler":
        return obj.scheduler
    return obj


def peft_names(root: nn.Module, tree: Tree) -> None:
    """Give a PEFT model's layers and parameters the names its base model gives them, and
    make the base model the tree's root (what ``depth`` and ``within`` count from).

    The names drop the path down to the base model (``base_model.model.``), a tuner layer's
    ``base_layer`` (``query.base_layer.weight`` is ``query.weight``) and a
    ``ModulesToSaveWrapper``'s ``modules_to_save.<active adapter>`` (the trained copy of
    ``classifier.weight``; ``classifier.original_module.weight`` keeps its own name).
    Walks in the order of the torch backend's tree.
    """
    import peft  # the caller found it in sys.modules
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    inner = root
    while isinstance(inner, (peft.PeftModel, peft.PeftMixedModel, BaseTuner)):
        inner = inner.model if isinstance(inner, BaseTuner) else inner.base_model
    layer_names: list[str] = []
    param_names: list[str] = []

    def visit(module: nn.Module, name: str, renamed: dict[str, str]) -> None:
        if module is inner:
            tree.root, name = len(layer_names), ""
        layer_names.append(name)
        prefix = name + "." if name else ""
        param_names.extend(prefix + n for n, p in internals.own_parameters(module).items() if p is not None)
        if isinstance(module, BaseTunerLayer):
            renamed = {"base_layer": name}
        saved = module.active_adapters if isinstance(module, ModulesToSaveWrapper) else ()
        for n, m in internals.own_modules(module).items():
            if m is not None:
                visit(m, renamed.get(n, prefix + n), {a: name for a in saved} if n == "modules_to_save" else {})

    visit(root, "", {})
    tree.layer_names, tree.param_names = layer_names, param_names
