"""PyTorch backend: a plan becomes ``requires_grad`` flags, ``grad = None`` for frozen
parameters, and an inference-mode hold on frozen BatchNorm layers.

Translation table:

- parameter trainable/frozen -> ``p.requires_grad``; frozen also -> ``p.grad = None``
- layer held -> the module attribute ``_layerlock_held`` and ``module.eval()``
- the tree: ``named_modules()`` / ``named_parameters()`` paths of the unwrapped model
  (:mod:`.wrappers` looks through DDP, DataParallel, FSDP1 and ``torch.compile``), so users
  write the same patterns with or without a wrapper; a wrapper whose reducer cannot serve
  the new set is refused by :mod:`.distributed` before anything changes.

A PEFT model (a ``PeftModel``, or tuner layers injected into a model) keeps its real paths in
plans (``base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight``), and
a spec written for the base model selects the same weights: ``bert.encoder.layer.0`` (with the
adapters inside it), ``bert.encoder.layer.0.attention.self.query.weight`` (the base layer's),
``classifier.weight`` (the trained copy under ``modules_to_save``), ``depth`` and ``within``
counted in the base model. Adapters keep their own names: ``*lora_*`` selects every LoRA
tensor and ``*.modules_to_save.*`` every trained copy, so LoRA fine-tuning is
``ll.freeze().unfreeze("*lora_*", "*.modules_to_save.*")``.

The hold: a held module carries the plain attribute ``_layerlock_held = True`` and, from
the first hold on, ``torch.nn.Module.train`` is wrapped, so ``model.train()`` leaves held
modules (and what is under them) in eval mode. Nothing runs per forward, no module is replaced, and a
pickled model loads without layerlock (the flag is then inert).

>>> import torch, layerlock as ll
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
>>> _ = ll.apply(net, ll.freeze(depth=2))
>>> net.train().training, net[1].training
(True, False)
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import BackendError
from ..results import Plan, State
from ..tree import RowAxis, Tree
from . import torch_internals as internals
from . import torch_rows
from .distributed import check_ddp
from .wrappers import peft_names, unwrap

HOLD = "_layerlock_held"  # the same attribute name as in the Keras backend


def is_held(module: nn.Module) -> bool:
    """True for a module layerlock holds in inference mode."""
    return bool(module.__dict__.get(HOLD, False))


def _hold(module: nn.Module) -> None:
    """Hold ``module`` in eval mode, through later ``train()`` calls."""
    _install_train_hold()
    module.__dict__[HOLD] = True


def _install_train_hold() -> None:
    """Wrap ``nn.Module.train`` (once, at the first hold) so that held modules stay in eval mode."""
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


def _numel(p: torch.Tensor) -> int:
    return 0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel()


_ROW_AXES: dict[type, Mapping[str, int] | None] = {}  # module class -> its row axes (None: no rows)


class TorchBackend:
    """The PyTorch backend (``torch.nn.Module``)."""

    name = "torch"
    module = "torch"
    param_level = True

    def __init__(self) -> None:
        # model -> (its Tree, the tensor of each parameter occurrence), from the last tree()
        self._walks: weakref.WeakKeyDictionary[nn.Module, tuple[Tree, list[nn.Parameter]]] = (
            weakref.WeakKeyDictionary())

    def owns(self, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def tree(self, model: nn.Module) -> Tree:
        # The walk fills the flat arrays directly rather than going through tree.build: it
        # is most of the cost of ll.apply on a large model, and the same walk through
        # build()'s three callbacks per module took 1.4x as long on the 100k-tensor synthetic
        # model of benchmarks/torch_cases.py (median of 7, torch 2.13, 2 CPU cores).
        tree = Tree()
        layer_paths, kinds, layer_keys, norms, held = tree.layer_paths, tree.kinds, tree.layer_keys, tree.norm, tree.held
        end, first, param_paths, numels = tree.end, tree.first, tree.param_paths, tree.numels
        trainable, param_keys, owner = tree.trainable, tree.param_keys, tree.owner
        norm_types = internals.norm_types()
        tensors: list[nn.Parameter] = []
        parameter = nn.Parameter
        rows = tree.rows
        axes_of = _ROW_AXES
        now: list[tuple[Mapping[str, int], int, int, int]] = []   # (axes, prefix length, first, end)
        later: list[tuple[Mapping[str, int], int, int, int]] = []

        def fill(modules: list[tuple[Mapping[str, int], int, int, int]], paths: list[str]) -> None:
            current, sharded = torch_rows.current, torch_rows.sharding_check()
            for axes, cut, start, stop in modules:
                for o in range(start, stop):
                    p, axis = tensors[o], axes.get(paths[o][cut:])
                    if axis is not None and p.dim() > axis:
                        rows[o] = RowAxis(tuple(p.shape), axis, current(p), sharded and sharded(p))

        def build(path: str, module: nn.Module) -> None:
            i = len(layer_paths)
            layer_paths.append(path)
            kind = type(module)
            kinds.append(kind.__name__)
            layer_keys.append(id(module))
            norms.append(isinstance(module, norm_types))
            held.append(module.__dict__.get(HOLD, False))
            end.append(0)
            first.append(len(param_paths))
            prefix = path + "." if path else ""
            params = own_parameters(module)
            axes = axes_of.get(kind, False)
            if axes is False:  # first module of its class: the class decides (torch_rows.row_axes)
                axes = axes_of[kind] = torch_rows.row_axes(module) or None
            part = axes is not None and len(params) > len(axes)  # more than its own: some rows may train here
            start = len(param_paths)
            for n, p in params.items():
                if p is not None:
                    if part and torch_rows.is_rows(p):
                        continue  # the trainable part of a table: decided through the table
                    param_paths.append(prefix + n)
                    numels.append(p.numel() if type(p) is parameter else _numel(p))
                    trainable.append(p.requires_grad)
                    param_keys.append(id(p))
                    owner.append(i)
                    tensors.append(p)
            if axes is not None:  # its tensors' rows: now where some train, else when a rule decides rows
                (now if part else later).append((axes, len(prefix), start, len(param_paths)))
            for n, m in own_modules(module).items():
                if m is not None:
                    build(prefix + n, m)
            end[i] = len(layer_paths)

        root = unwrap(model)
        own_parameters, own_modules = internals.readers(root)
        build("", root)
        first.append(len(param_paths))
        fill(now, param_paths)
        if later:
            paths = list(param_paths)  # the module's own names, before PEFT's are replaced
            tree.rows_later = lambda: fill(later, paths)
        if "peft" in sys.modules and hasattr(root, "peft_config"):  # PEFT sets peft_config on what it wraps
            peft_names(root, tree)
        self._walks[root] = (tree, tensors)  # ll.apply() calls tree() then apply(): walk the model once
        return tree

    def apply(self, model: nn.Module, plan: Plan) -> None:
        root = unwrap(model)
        tree, tensors = self._walks.pop(root, (None, None))
        if tree is None or tuple(tree.param_paths) != plan.paths:  # not this walk's plan, or tied tensors
            by_path = dict(root.named_parameters(remove_duplicate=False))
            missing = [path for path in plan.paths if path not in by_path]
            if missing:
                raise BackendError(f"the plan names parameters this model lacks ({', '.join(missing[:5])}); "
                                   "make the plan with ll.plan() on this very model")
            tensors = [by_path[path] for path in plan.paths]
        check_ddp(model, zip(plan.paths, plan.trainable_after), tree.kinds if tree is not None else None)
        for k, part in plan.rows.items():  # a tensor trainable in part before: whole again first
            if part.after != part.before and part.before is not None:
                torch_rows.remove(tensors[k])
        for p, after in zip(tensors, plan.trainable_after):
            if p.requires_grad != after:
                p.requires_grad_(after)
            if not after and p.grad is not None:
                p.grad = None  # no stale gradient, momentum step or weight decay can move it
        for k, part in plan.rows.items():  # then the tensors trainable in part after
            if part.after is not None and part.after != part.before:
                torch_rows.install(root, tensors[k], part.after)
        for layer in sorted(plan.layers, key=lambda lp: lp.path.count(".")):  # parents first
            module = root.get_submodule(layer.path)
            if layer.held_after:
                _hold(module)
                module.eval()
            elif module.__dict__.pop(HOLD, False):
                parent = root.get_submodule(layer.path.rpartition(".")[0])
                module.train(parent.training)

    def read(self, model: nn.Module) -> State:
        root = unwrap(model)
        params = [(n, p) for n, p in root.named_parameters() if not torch_rows.is_rows(p)]
        return State(
            self.name,
            {n: p.requires_grad for n, p in params},
            {n: {"held": is_held(m), "training": m.training} for n, m in root.named_modules()},
            {n: list(rows) for n, p in params if (rows := torch_rows.current(p)) is not None})

    def write(self, model: nn.Module, state: State) -> None:
        root = unwrap(model)
        check_ddp(model, state.params.items())
        for n, p in [(n, p) for n, p in root.named_parameters() if not torch_rows.is_rows(p)]:
            if torch_rows.current(p) != (tuple(state.rows[n]) if n in state.rows else None):
                torch_rows.remove(p)
                if n in state.rows:
                    torch_rows.install(root, p, state.rows[n])
            p.requires_grad_(state.params[n])
            if not state.params[n]:
                p.grad = None
        for n, m in root.named_modules():
            flags = state.layers.get(n)
            if flags is None:
                continue
            if flags.get("held"):
                _hold(m)
            else:
                m.__dict__.pop(HOLD, None)
            m.training = flags.get("training", m.training)

    def weights(self, model: nn.Module) -> Iterator[tuple[str, bool, bytes]]:
        for n, p in unwrap(model).named_parameters():
            if torch_rows.is_rows(p):
                continue  # its values are the table's, written in by merge()
            torch_rows.merge(p)
            yield n, p.requires_grad, bytes(p.detach().to("cpu", copy=True).contiguous().untyped_storage())
