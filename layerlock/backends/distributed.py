"""Guards for distributed torch wrappers: a trainable set that DistributedDataParallel's
reducer or FSDP1's flat parameters, both fixed at wrap time, cannot serve is refused with
:class:`~layerlock.DistributedFreezeError` before anything changes; and the arguments to
build the DDP wrapper again in place (what ``layerlock.torch.rewrap`` does).

>>> import torch
>>> check_ddp(torch.nn.Linear(1, 1), [("weight", False)])   # nothing wrapped: nothing to guard
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..errors import DistributedFreezeError
from ..results import Plan
from ..schedule import Schedule
from . import get_backend
from . import torch_internals as internals
from .wrappers import ddp_of, unwrap

FIX = ("Use `model, plan = layerlock.torch.rewrap(model, spec)` (applies the spec to the inner module "
       "and wraps it again with the same DDP arguments; the optimizer keeps working), or apply the "
       "spec before wrapping.")


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
    expected = internals.ddp_tracked_count(ddp)
    expected = len(current) if expected is None else expected
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
    if untracked:
        raise DistributedFreezeError(
            f"DistributedDataParallel was built when {untracked[0]!r}"
            f"{f' and {len(untracked) - 1} more' if len(untracked) > 1 else ''} did not require grad, so "
            f"their gradients would never be all-reduced and the ranks would drift apart silently. {FIX}")
    if frozen and (not ddp.find_unused_parameters or ddp.static_graph):
        raise DistributedFreezeError(
            f"freezing {frozen[0]!r}{f' and {len(frozen) - 1} more' if len(frozen) > 1 else ''} inside "
            f"DistributedDataParallel(find_unused_parameters={ddp.find_unused_parameters}, "
            f"static_graph={ddp.static_graph}) makes the next iteration fail (\"Expected to have finished "
            f"reduction...\"). {FIX} Or wrap with find_unused_parameters=True (freezing only).")


_DDP_ARGUMENTS = ("device_ids", "output_device", "dim", "process_group", "find_unused_parameters",
                  "gradient_as_bucket_view", "static_graph", "mixed_precision", "skip_all_reduce_unused_params",
                  "forward_sync_buffers")


def ddp_arguments(ddp: nn.parallel.DistributedDataParallel) -> dict[str, Any]:
    """The constructor arguments a DDP wrapper keeps, to build an equal one."""
    accepted = inspect.signature(type(ddp).__init__).parameters
    out = {name: getattr(ddp, name) for name in _DDP_ARGUMENTS if name in accepted and hasattr(ddp, name)}
    if "forward_sync_buffers" not in out:
        out["broadcast_buffers"] = ddp.broadcast_buffers
    out["bucket_cap_mb"] = ddp.bucket_bytes_cap / (1024 * 1024)
    return out


# What nn.Module.__init__ resets that belongs to the user of the wrapper: its hooks.
_MODULE_HOOKS = tuple(name for name in vars(nn.Module()) if "hook" in name)


def rebuild_ddp(ddp: nn.parallel.DistributedDataParallel) -> nn.parallel.DistributedDataParallel:
    """Build ``ddp`` again, in place and with its own arguments, so that its reducer tracks
    exactly the parameters that require grad now. The object stays the same, so every
    reference to it (the training loop's, a Trainer's ``model_wrapped``, Lightning's
    ``strategy.model``, Accelerate's) keeps working; its hooks and train/eval mode are kept.
    Its comm hooks are registered again on the new reducer. Like a new wrapper, it
    broadcasts rank 0's module state. Call it on every rank.
    """
    kept = {name: getattr(ddp, name) for name in _MODULE_HOOKS}
    comm_hooks = internals.ddp_comm_hooks(ddp)
    training = ddp.training
    ddp.__dict__.pop("_layerlock_reducer_params", None)  # check_ddp's record of the old reducer
    type(ddp).__init__(ddp, ddp.module, **ddp_arguments(ddp))
    ddp.__dict__.update(kept)
    for hook, state in comm_hooks[len(internals.ddp_comm_hooks(ddp)):]:  # the constructor registers its own first
        ddp.register_comm_hook(state, hook)
    ddp.training = training  # not ddp.train(): that would reach the module's held norm layers
    return ddp


def refuse_unrebuildable(model: nn.Module) -> None:
    """Refuse, before anything changes, a DDP model that a FreezeScheduler could not rebuild
    (``static_graph=True``, a DDP subclass); any other model passes.

    >>> refuse_unrebuildable(nn.Linear(1, 1))
    """
    ddp = ddp_of(model)
    if ddp is None:
        return
    if ddp.static_graph:
        raise DistributedFreezeError(
            "FreezeScheduler rebuilds the DDP wrapper at each phase change, and a schedule changes the graph; "
            "received DistributedDataParallel(static_graph=True). Wrap it with static_graph=False (the "
            "default) and pass that to FreezeScheduler.")
    if type(ddp) is not nn.parallel.DistributedDataParallel:
        raise DistributedFreezeError(
            f"FreezeScheduler rebuilds the DDP wrapper at each phase change and cannot rebuild a "
            f"{type(ddp).__name__} (a subclass of DistributedDataParallel with its own constructor). "
            "Wrap the module in nn.parallel.DistributedDataParallel itself.")


def refuse_empty_phases(schedule: Schedule, plans: list[Plan]) -> None:
    """DDP cannot wrap a module with nothing to train: refuse such a phase of ``schedule``
    (``plans``: its phases' plans) before training.

    >>> import layerlock as ll
    >>> from layerlock.results import Plan
    >>> refuse_empty_phases(ll.Schedule({0: ll.freeze("a")}), [Plan(ll.freeze("a"), ("b",), (1,), (True,), (True,), (None,))])
    """
    for phase, planned in zip(schedule.phases, plans):
        if not planned.trainable_scalars:
            raise DistributedFreezeError(
                f"phase at epoch {phase.epoch} ({phase.spec!r}) leaves nothing trainable, and "
                "DistributedDataParallel cannot wrap a module without a parameter that requires grad. "
                "Keep at least one parameter trainable in every phase.")


def rebuild_for(ddp: nn.parallel.DistributedDataParallel | None, plan: Plan) -> None:
    """After a phase changed the trainable set of the module inside ``ddp``: check that every
    rank reached the same set, then rebuild the wrapper in place for it (:func:`rebuild_ddp`);
    nothing for no wrapper or a plan that changes no flag or rows.

    >>> import layerlock as ll
    >>> from layerlock.results import Plan
    >>> rebuild_for(None, Plan(ll.freeze(), ("w",), (1,), (True,), (False,), (0,)))
    """
    if ddp is not None and plan.changed:
        check_ranks(ddp.module, ddp.process_group)  # the ranks agree before DDP broadcasts anything
        rebuild_ddp(ddp)


def check_ranks(model: nn.Module, group: Any = None) -> str:
    """All-gather a fingerprint of the trainable set (and inference holds) and raise
    :class:`~layerlock.DistributedFreezeError` unless every rank has the same; call it on
    every rank after applying. Returns the fingerprint.
    """
    import torch.distributed as dist

    state = get_backend(model).read(model)
    digest = hashlib.sha256(repr(sorted(state.params.items())).encode()
                            + repr(sorted((k, v["held"]) for k, v in state.layers.items())).encode()
                            + repr(sorted(state.rows.items())).encode()).hexdigest()
    if not (dist.is_available() and dist.is_initialized()):
        return digest
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, digest, group=group)
    if len(set(gathered)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, d in enumerate(gathered):
            groups.setdefault(d, []).append(rank)
        raise DistributedFreezeError(
            "ranks disagree on the trainable set: " + "; ".join(f"ranks {r} have {d[:12]}" for d, r in groups.items())
            + ". Apply the same spec, with the same options, on every rank.")
    return digest
