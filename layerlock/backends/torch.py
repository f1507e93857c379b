"""PyTorch backend: a plan becomes ``requires_grad`` flags, ``grad = None`` for frozen
parameters, and an inference-mode hold on frozen BatchNorm layers.

Paths are ``named_modules()`` / ``named_parameters()`` paths of the unwrapped model
(``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers are looked
through), so users write the same patterns with or without a wrapper.

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
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import BackendError, DistributedFreezeError
from ..results import Finding, Plan, State
from ..tree import Tree

HOLD = "_layerlock_held"  # the same attribute name as in the Keras backend
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel")


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


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / ``torch.compile`` wrappers.

    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> unwrap(torch.nn.DataParallel(net)) is net
    True
    """
    while type(model).__name__ in _WRAPPERS:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def ddp_of(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper in ``model``'s wrapper chain, if any."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def _reducer_params(ddp: nn.parallel.DistributedDataParallel, params: dict[str, nn.Parameter],
                    ignored: set[str]) -> set[int]:
    """Identities of the parameters DDP's reducer was built with.

    The reducer does not expose them; it counts them. Layerlock records the set the first
    time it meets the wrapper, after checking that the count still matches (so nobody
    changed ``requires_grad`` since wrapping).
    """
    cached = ddp.__dict__.get("_layerlock_reducer_params")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    current = {id(p) for n, p in params.items() if p.requires_grad and n not in ignored}
    expected = ddp._get_ddp_logging_data().get("num_parameter_tensors", len(current))
    if len(current) != expected:
        raise DistributedFreezeError(
            f"requires_grad changed after this model was wrapped in DistributedDataParallel (its reducer "
            f"tracks {expected} parameters, {len(current)} require grad now), so layerlock cannot tell which "
            "gradients are all-reduced. Use layerlock.torch.rewrap(model, spec) or apply specs before wrapping.")
    ddp.__dict__["_layerlock_reducer_params"] = current
    return current


def check_ddp(model: nn.Module, decisions: Iterable[tuple[str, bool]], kinds: Iterable[str] | None = None) -> None:
    """Refuse a trainable set that DDP's reducer, built at wrap time, cannot serve.

    Measured (torch 2.13, gloo): freezing a parameter DDP tracks works only with
    ``find_unused_parameters=True`` and no ``static_graph`` (else the next iteration
    fails); making trainable a parameter DDP does not track raises nothing but its
    gradients are never all-reduced, so the ranks drift apart silently.
    ``decisions`` yields (path, trainable); it is only read for a wrapped model. ``kinds``,
    the class names of the modules under the wrappers, saves a walk when the caller has them.
    """
    if ddp_of(model) is None and "torch.distributed.fsdp" not in sys.modules:
        return  # nothing wrapped: the common case costs one attribute walk
    if kinds is None:
        kinds = (type(m).__name__ for m in unwrap(model).modules())
    fsdp1 = type(model).__name__ == "FullyShardedDataParallel" or "FullyShardedDataParallel" in kinds
    if not fsdp1 and ddp_of(model) is None:
        return
    trainable = dict(decisions)
    if fsdp1 and any(p.requires_grad != trainable[n] for n, p in unwrap(model).named_parameters()):
        raise DistributedFreezeError(
            "this model holds FSDP1 FullyShardedDataParallel units, which flatten parameters at wrap time; "
            "changing requires_grad afterwards is not supported. Apply the spec before wrapping (with "
            "use_orig_params=True to mix frozen and trainable parameters in one unit), or shard with FSDP2 "
            "torch.distributed.fsdp.fully_shard, which accepts changes after sharding.")
    ddp = ddp_of(model)
    if ddp is None:
        return
    ignored = set(getattr(ddp, "parameters_to_ignore", ()))
    params = dict(ddp.module.named_parameters())
    tracked = _reducer_params(ddp, params, ignored)
    untracked = [n for n, on in trainable.items() if on and id(params[n]) not in tracked and n not in ignored]
    frozen = [n for n, on in trainable.items() if not on and id(params[n]) in tracked]
    fix = ("Use `model, plan = layerlock.torch.rewrap(model, spec)` (applies the spec to the inner module "
           "and wraps it again with the same DDP arguments; the optimizer keeps working), or apply the "
           "spec before wrapping.")
    if untracked:
        raise DistributedFreezeError(
            f"DistributedDataParallel was built when {untracked[0]!r}"
            f"{f' and {len(untracked) - 1} more' if len(untracked) > 1 else ''} did not require grad, so "
            f"their gradients would never be all-reduced and the ranks would drift apart silently. {fix}")
    if frozen and (not ddp.find_unused_parameters or ddp.static_graph):
        raise DistributedFreezeError(
            f"freezing {frozen[0]!r}{f' and {len(frozen) - 1} more' if len(frozen) > 1 else ''} inside "
            f"DistributedDataParallel(find_unused_parameters={ddp.find_unused_parameters}, "
            f"static_graph={ddp.static_graph}) makes the next iteration fail (\"Expected to have finished "
            f"reduction...\"). {fix} Or wrap with find_unused_parameters=True (freezing only).")


def _numel(p: torch.Tensor) -> int:
    return 0 if isinstance(p, nn.parameter.UninitializedParameter) else p.numel()


def _peft_names(root: nn.Module, tree: Tree) -> None:
    """Give a PEFT model's layers and parameters the names its base model gives them, and
    make the base model the tree's root (what ``depth`` and ``within`` count from).

    The names drop the path down to the base model (``base_model.model.``), a tuner layer's
    ``base_layer`` (``query.base_layer.weight`` is ``query.weight``) and a
    ``ModulesToSaveWrapper``'s ``modules_to_save.<active adapter>`` (the trained copy of
    ``classifier.weight``; ``classifier.original_module.weight`` keeps its own name).
    Walks in the order of ``tree()``.
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
        param_names.extend(prefix + n for n, p in module._parameters.items() if p is not None)
        if isinstance(module, BaseTunerLayer):
            renamed = {"base_layer": name}
        saved = module.active_adapters if isinstance(module, ModulesToSaveWrapper) else ()
        for n, m in module._modules.items():
            if m is not None:
                visit(m, renamed.get(n, prefix + n), {a: name for a in saved} if n == "modules_to_save" else {})

    visit(root, "", {})
    tree.layer_names, tree.param_names = layer_names, param_names


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
        # The flat arrays are filled directly (no Node objects): this walk is most of the
        # cost of ll.apply on a large model.
        tree = Tree()
        layer_paths, kinds, layer_keys, norms, held = tree.layer_paths, tree.kinds, tree.layer_keys, tree.norm, tree.held
        end, first, param_paths, numels = tree.end, tree.first, tree.param_paths, tree.numels
        trainable, param_keys, owner = tree.trainable, tree.param_keys, tree.owner
        norm_type = nn.modules.batchnorm._NormBase  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        tensors: list[nn.Parameter] = []
        parameter = nn.Parameter

        def build(path: str, module: nn.Module) -> None:
            i = len(layer_paths)
            layer_paths.append(path)
            kinds.append(type(module).__name__)
            layer_keys.append(id(module))
            norms.append(isinstance(module, norm_type))
            held.append(module.__dict__.get(HOLD, False))
            end.append(0)
            first.append(len(param_paths))
            prefix = path + "." if path else ""
            for n, p in module._parameters.items():
                if p is not None:
                    name = prefix + n
                    param_paths.append(name)
                    numels.append(p.numel() if type(p) is parameter else _numel(p))
                    trainable.append(p.requires_grad)
                    param_keys.append(id(p))
                    owner.append(i)
                    tensors.append(p)
            for n, m in module._modules.items():
                if m is not None:
                    build(prefix + n, m)
            end[i] = len(layer_paths)

        root = unwrap(model)
        build("", root)
        first.append(len(param_paths))
        if "peft" in sys.modules and hasattr(root, "peft_config"):  # PEFT sets peft_config on what it wraps
            _peft_names(root, tree)
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
        for p, after in zip(tensors, plan.trainable_after):
            if p.requires_grad != after:
                p.requires_grad_(after)
            if not after and p.grad is not None:
                p.grad = None  # no stale gradient, momentum step or weight decay can move it
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
        return State(
            self.name,
            {n: p.requires_grad for n, p in root.named_parameters()},
            {n: {"held": m.__dict__.get(HOLD, False), "training": m.training} for n, m in root.named_modules()})

    def write(self, model: nn.Module, state: State) -> None:
        root = unwrap(model)
        check_ddp(model, state.params.items())
        for n, p in root.named_parameters():
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
            yield n, p.requires_grad, bytes(p.detach().to("cpu", copy=True).contiguous().untyped_storage())

    def check(self, model: nn.Module, optimizer: Any = None, *, scheduler: Any = None, bn: str = "follow",
              schedule: Any = None) -> list[Finding]:
        """The findings of :func:`layerlock.check` for a torch model (reads, changes nothing)."""
        root = unwrap(model)
        named = list(root.named_parameters())
        found = [f for f in (_wrapper_finding(model, named), _reentrant_finding(root), _compile_finding(model, schedule))
                 if f is not None]
        if bn != "trainable":
            found += _norm_findings(root)
        if optimizer is not None:
            found += _optimizer_findings(unwrap_prepared(optimizer), named, unwrap_prepared(scheduler))
        return found


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


# Schedulers that multiply every group's current rate (they also reach a group added later);
# the others compute each rate from per-group lists and leave an added group's rate alone.
_SCALES_EVERY_GROUP = ("StepLR", "MultiStepLR", "ExponentialLR", "ConstantLR", "LinearLR", "PolynomialLR")


def _optimizer_findings(optimizer: Any, named: list[tuple[str, nn.Parameter]], scheduler: Any) -> list[Finding]:
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [(n, p) for n, p in named if p.requires_grad and id(p) not in held]
    out = []
    if missing:
        out.append(Finding(
            "not-in-optimizer",
            f"{len(missing)} trainable tensors are not in the optimizer: they get gradients but never change "
            "(an optimizer keeps the parameters it was built with; unfreezing later does not add them)",
            "after ll.apply, call layerlock.torch.sync_optimizer(optimizer, model, lr=..., scheduler=...), "
            "or build the optimizer after the last unfreeze",
            tuple(n for n, _ in missing), scalars=sum(p.numel() for _, p in missing)))
    by_id = {id(p): n for n, p in named}
    kept = [(by_id[id(p)], state) for p, state in optimizer.state.items()
            if id(p) in by_id and not p.requires_grad and state]
    if kept:
        size = sum(v.numel() * v.element_size() for _, state in kept for v in state.values() if torch.is_tensor(v))
        out.append(Finding(
            "frozen-optimizer-state",
            f"the optimizer keeps state (momentum, Adam moments) for {len(kept)} frozen tensors: memory held "
            "for parameters that cannot move",
            "if they stay frozen, drop it: `for p in frozen: optimizer.state.pop(p, None)`, or build the "
            "optimizer from the trainable parameters only (it is kept on purpose if you unfreeze them later)",
            tuple(n for n, _ in kept), bytes=size))
    base_lrs = getattr(scheduler, "base_lrs", None) if scheduler is not None else None
    if (isinstance(base_lrs, list) and len(base_lrs) < len(optimizer.param_groups)
            and type(scheduler).__name__ not in _SCALES_EVERY_GROUP):
        extra = [g.get("name", f"group {i}") for i, g in enumerate(optimizer.param_groups) if i >= len(base_lrs)]
        out.append(Finding(
            "scheduler-missing-groups",
            f"the LR scheduler {type(scheduler).__name__} knows {len(base_lrs)} of the optimizer's "
            f"{len(optimizer.param_groups)} param groups: the others keep a fixed learning rate (older torch) "
            "or its next step() raises (torch that zips per-group lists strictly)",
            "add groups with layerlock.torch.sync_optimizer(optimizer, model, scheduler=scheduler), or build "
            "the scheduler after the last group is added", tuple(map(str, extra))))
    return out


def _norm_findings(root: nn.Module) -> list[Finding]:
    """Norm layers whose weights are all frozen but whose running statistics will still move:
    not held by layerlock and in training mode now (or once ``model.train()`` runs)."""
    norm_type = nn.modules.batchnorm._NormBase
    moving = [n for n, m in root.named_modules()
              if isinstance(m, norm_type) and m.track_running_stats and not m.__dict__.get(HOLD, False)
              and any(True for _ in m.parameters(recurse=False))
              and not any(p.requires_grad for p in m.parameters(recurse=False))
              and (m.training or not root.training)]
    if not moving:
        return []
    return [Finding(
        "norm-statistics-move",
        "these norm layers have all their weights frozen but will update their running mean and "
        "variance in every training step (requires_grad does not stop them), so the frozen part's outputs drift",
        "freeze them with ll.apply(model, spec) (bn='follow' or 'frozen' holds them in eval mode through "
        "model.train()), or pass bn='trainable' to ll.check if the statistics should adapt",
        tuple(moving))]


def _reentrant_finding(root: nn.Module) -> Finding | None:
    """Hugging Face-style reentrant activation checkpointing (modules with
    ``gradient_checkpointing = True`` and a ``use_reentrant=True`` checkpoint function) whose
    first segment's input cannot require grad: nothing before it trains and no forward hook
    makes the embeddings' output require grad. Every segment's output then does not require
    grad, and the trainable parameters inside the segments get no gradient."""
    layers = [(n, m) for n, m in root.named_modules() if getattr(m, "gradient_checkpointing", False) is True
              and isinstance(getattr(m, "_gradient_checkpointing_func", None), functools.partial)]
    # the segments are the innermost such modules (an encoder that holds the flag runs its layers as segments)
    layers = [(n, m) for n, m in layers if not any(o.startswith(n + "." if n else "") and o != n for o, _ in layers)]
    reentrant = [(n, m) for n, m in layers if m._gradient_checkpointing_func.keywords.get("use_reentrant", True)]
    if not reentrant or getattr(root, "_require_grads_hooks", None) or getattr(root, "_require_grads_hook", None):
        return None
    first = reentrant[0][0]
    inside = {id(p) for _, m in reentrant for p in m.parameters()}
    upstream = []  # parameters that run before the first segment, in registration order
    for n, p in root.named_parameters():
        if n.startswith(first + "."):
            break
        if id(p) not in inside:
            upstream.append(p)
    if any(p.requires_grad for p in upstream):
        return None
    starved = [n for n, p in root.named_parameters() if p.requires_grad and id(p) in inside]
    if not starved:
        return None
    return Finding(
        "reentrant-checkpoint-no-grad",
        f"reentrant activation checkpointing over {len(reentrant)} segments whose inputs do not require grad "
        f"(everything before {first!r} is frozen): their {len(starved)} trainable tensors get no gradient and never train",
        "call model.enable_input_require_grads(), or checkpoint with use_reentrant=False: "
        "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})",
        tuple(starved), scalars=sum(p.numel() for n, p in root.named_parameters() if n in set(starved)))


def _wrapper_finding(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> Finding | None:
    """A DDP or FSDP1 wrapper built with another trainable set than the current one."""
    try:
        check_ddp(model, [(n, p.requires_grad) for n, p in named])
    except DistributedFreezeError as exc:
        return Finding("stale-distributed-wrapper", str(exc).split(". ")[0],
                       "rebuild the wrapper after freezing: layerlock.torch.rewrap(model, spec), or apply "
                       "the spec before wrapping")
    return None


def _compile_finding(model: nn.Module, schedule: Any) -> Finding | None:
    """A ``torch.compile``d model whose schedule has more trainable sets than dynamo
    recompiles for (past the limit it falls back to eager for good)."""
    if schedule is None or not (type(model).__name__ == "OptimizedModule" or any(
            getattr(m, "_compiled_call_impl", None) is not None for m in unwrap(model).modules())):
        return None
    import torch._dynamo

    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    if len(schedule.phases) + 1 <= limit:
        return None
    return Finding(
        "compile-recompile-limit",
        f"the schedule has {len(schedule.phases)} phases on a torch.compile'd model: each new trainable set "
        f"recompiles, and past torch._dynamo.config.recompile_limit={limit} dynamo runs eager for good",
        f"raise it first: torch._dynamo.config.recompile_limit = {len(schedule.phases) + 2}")
