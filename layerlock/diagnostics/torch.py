"""``ll.check`` for PyTorch: parameters the optimizer never trains, frozen ones it keeps
state for, norm statistics that still move, reentrant checkpointing over frozen inputs,
stale DDP/FSDP1 wrappers, the compile recompile limit and LR schedulers that miss groups.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
>>> [f.kind for f in check(net, torch.optim.SGD(net[1].parameters(), lr=0.1))]
['not-in-optimizer']
>>> check(net)
['the optimizer (pass optimizer= to ll.check)']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..backends import hf_internals as hf
from ..backends import torch_internals as internals
from ..backends.distributed import check_ddp
from ..backends.torch import is_held
from ..backends.wrappers import unwrap, unwrap_prepared
from ..errors import DistributedFreezeError
from ..results import Finding


def check(model: nn.Module, optimizer: Any = None, *, scheduler: Any = None, bn: str = "follow",
          schedule: Any = None) -> list[Finding | str]:
    """The findings of :func:`layerlock.check` for a torch model (reads, changes nothing);
    without an ``optimizer``, a note that it was not checked."""
    root = unwrap(model)
    named = list(root.named_parameters())
    found = [f for f in (_wrapper_finding(model, named), _reentrant_finding(root), _compile_finding(model, schedule))
             if f is not None]
    if bn != "trainable":
        found += _norm_findings(root)
    if optimizer is None:
        return [*found, NO_OPTIMIZER]
    return [*found, *_optimizer_findings(unwrap_prepared(optimizer), named, unwrap_prepared(scheduler))]


NO_OPTIMIZER = "the optimizer (pass optimizer= to ll.check)"
# Schedulers that multiply every group's current rate (they also reach a group added later);
# the others compute each rate from per-group lists and leave an added group's rate alone.
_SCALES_EVERY_GROUP = ("StepLR", "MultiStepLR", "ExponentialLR", "ConstantLR", "LinearLR", "PolynomialLR")


def untracked(optimizer: Any, named: Iterable[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """The trainable ``(path, parameter)`` pairs that ``optimizer`` does not hold (by
    identity): they get gradients but never change.

    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> [n for n, _ in untracked(torch.optim.SGD([net.weight], lr=0.1), net.named_parameters())]
    ['bias']
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [(n, p) for n, p in named if p.requires_grad and id(p) not in held]


def _optimizer_findings(optimizer: Any, named: list[tuple[str, nn.Parameter]], scheduler: Any) -> list[Finding]:
    missing = untracked(optimizer, named)
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
    out += _hooked_row_findings(optimizer, by_id)
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


def _hooked_row_findings(optimizer: Any, by_id: dict[int, str]) -> list[Finding]:
    """A gradient hook that zeroes rows (the hand-made row freeze: axolotl's ranges, the
    textual-inversion scripts) does not keep those rows fixed under weight decay, nor once
    momentum or Adam moments hold values for them. Found by running the hooks on a gradient
    of ones and looking for rows that come back zero."""
    out = []
    for group in optimizer.param_groups:
        decay, lr = float(group.get("weight_decay", 0) or 0), float(group.get("lr", 0) or 0)
        for p in group["params"]:
            hooks = internals.grad_hooks(p)
            if not hooks or p.dim() < 1 or id(p) not in by_id:
                continue
            probe = torch.ones_like(p)
            with torch.no_grad():
                for hook in hooks:
                    changed = hook(probe)
                    probe = probe if changed is None else changed
            zeroed = int((probe.reshape(p.shape[0], -1) == 0).all(dim=1).sum())
            moving = bool(optimizer.state.get(p)) and any(
                torch.is_tensor(v) and v.dim() and bool(v.reshape(p.shape[0], -1)[
                    (probe.reshape(p.shape[0], -1) == 0).all(dim=1)].abs().sum()) for v in optimizer.state[p].values())
            if not zeroed or not (decay or moving):
                continue
            why = [f"weight_decay={decay:g} at lr={lr:g} shrinks each of them by {lr * decay:.3g} of its value per "
                   "step" if decay else "", "the optimizer's momentum / moments for them are not zero, so they keep "
                   "stepping" if moving else ""]
            out.append(Finding(
                "hooked-row-freeze",
                f"a gradient hook zeroes {zeroed} of the {p.shape[0]} rows of {by_id[id(p)]}, but the optimizer still "
                f"moves those rows: {'; '.join(w for w in why if w)}",
                "train only the other rows with layerlock: ll.apply(model, ll.freeze().unfreeze(path, rows=...)) "
                "(the frozen rows stay bit-identical, the optimizer holds state for the trainable rows only)",
                (by_id[id(p)],), scalars=p.numel() // p.shape[0] * zeroed))
    return out


def _norm_findings(root: nn.Module) -> list[Finding]:
    """Norm layers whose weights are all frozen but whose running statistics will still move:
    not held by layerlock and in training mode now (or once ``model.train()`` runs)."""
    norm_type = internals.norm_types()
    moving = [n for n, m in root.named_modules()
              if isinstance(m, norm_type) and m.track_running_stats and not is_held(m)
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
    flags = [(n, m, hf.checkpointed(m)) for n, m in root.named_modules()]
    layers = [(n, m, reentrant) for n, m, reentrant in flags if reentrant is not None]
    # the segments are the innermost such modules (an encoder that holds the flag runs its layers as segments)
    layers = [(n, m, r) for n, m, r in layers if not any(o.startswith(n + "." if n else "") and o != n for o, _, _ in layers)]
    reentrant = [(n, m) for n, m, r in layers if r]
    if not reentrant or hf.input_grads_forced(root):
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
            internals.compiled_in_place(m) for m in unwrap(model).modules())):
        return None
    limit = internals.recompile_limit()
    if len(schedule.phases) + 1 <= limit:
        return None
    return Finding(
        "compile-recompile-limit",
        f"the schedule has {len(schedule.phases)} phases on a torch.compile'd model: each new trainable set "
        f"recompiles, and past torch._dynamo.config.recompile_limit={limit} dynamo runs eager for good",
        f"raise it first: torch._dynamo.config.recompile_limit = {len(schedule.phases) + 2}")
