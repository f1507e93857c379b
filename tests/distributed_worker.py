"""Runs in each rank of the multi-process DDP tests (loopback gloo); reports through a queue."""

import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

import layerlock as ll
import layerlock.torch as llt

DDP = nn.parallel.DistributedDataParallel


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def flat(model):
    """All parameters as one tensor (FSDP2 shards are gathered first)."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).flatten()
                      for p in model.parameters()])


def in_sync(model):
    mine = flat(model)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(torch.equal(every[0], other) for other in every[1:])


def train(forward, model, steps, rank, start=0):
    """SGD with momentum and weight decay on rank-specific data; True if in sync after every step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=0.1)
    synced = True
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        synced &= in_sync(model)
    return synced


def refused(fn):
    try:
        fn()
    except ll.DistributedFreezeError as exc:
        return str(exc)
    return None


def scenarios(rank):
    out = {}

    inner = make()
    ll.apply(inner, ll.freeze("0"))
    w = inner[0].weight.detach().clone()
    ddp = DDP(inner)
    out["freeze_before_wrap"] = {"synced": train(ddp, inner, 3, rank), "frozen_same": torch.equal(w, inner[0].weight)}

    inner = make()
    ddp = DDP(inner)
    out["freeze_after_wrap"] = {"error": refused(lambda: ll.apply(ddp, ll.freeze("0"))),
                                "unchanged": all(p.requires_grad for p in inner.parameters())}

    inner = make()
    ddp = DDP(inner, find_unused_parameters=True, static_graph=True)
    out["freeze_after_wrap_static_graph"] = {"error": refused(lambda: ll.apply(ddp, ll.freeze("0")))}

    inner = make()
    ddp = DDP(inner, find_unused_parameters=True)
    synced = train(ddp, inner, 1, rank)
    ll.apply(ddp, ll.freeze("0"))
    w = inner[0].weight.detach().clone()
    synced &= train(ddp, inner, 2, rank, start=1)
    out["freeze_after_wrap_find_unused"] = {"synced": synced, "frozen_same": torch.equal(w, inner[0].weight)}

    inner = make()
    ll.apply(inner, ll.freeze("0"))
    ddp = DDP(inner)
    out["unfreeze_after_wrap"] = {"error": refused(lambda: ll.apply(ddp, ll.unfreeze("0"))),
                                  "unchanged": not inner[0].weight.requires_grad}
    w = inner[0].weight.detach().clone()
    ddp, plan = llt.rewrap(ddp, ll.unfreeze("0"))
    out["rewrap"] = {"synced": train(ddp, inner, 2, rank), "moved": not torch.equal(w, inner[0].weight),
                     "changed": list(plan.changed)}

    inner = make()
    ll.apply(inner, ll.freeze("0") if rank == 0 else ll.freeze("2"))
    out["check_ranks_disagree"] = {"error": refused(lambda: llt.check_ranks(inner))}
    ll.apply(inner, ll.unfreeze().freeze("4"))
    out["check_ranks_agree"] = {"digest": llt.check_ranks(inner)}

    inner = make()
    ll.apply(inner, ll.freeze("0"))
    ddp = DDP(inner)
    inner[0].requires_grad_(True)  # unfrozen by hand after wrapping: never all-reduced
    out["check_stale_ddp"] = {"clean_before": not ll.check(make()), "synced": train(ddp, inner, 2, rank),
                              "kinds": list(ll.check(ddp).kinds)}

    out["fsdp2"] = fsdp2(rank)
    out["fsdp1"] = fsdp1()
    return out


def fsdp2(rank):
    """Mixed frozen/trainable parameters in one fully_shard unit, then changes after sharding."""
    from torch.distributed.fsdp import fully_shard

    model = make()
    ll.apply(model, ll.freeze("0.weight"))  # 0.weight frozen, 0.bias trainable: one unit
    fully_shard(model[0])
    fully_shard(model)
    w0 = model[0].weight.full_tensor().clone()
    full_keys = list(model.state_dict())
    synced = train(model, model, 2, rank)
    result = {"synced": synced, "frozen_same": torch.equal(w0, model[0].weight.full_tensor()),
              "state_dict_keys": full_keys == [n for n in make().state_dict()]}
    ll.apply(model, ll.unfreeze("0").freeze("4"))
    w4 = model[4].weight.full_tensor().clone()
    result["after_shard_synced"] = train(model, model, 2, rank, start=2)
    result["after_shard_moved"] = not torch.equal(w0, model[0].weight.full_tensor())
    result["after_shard_frozen_same"] = torch.equal(w4, model[4].weight.full_tensor())
    return result


def fsdp1():
    """FSDP1 flattens parameters at wrap time: changes afterwards are refused."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(make(), use_orig_params=True, device_id=torch.device("cpu"))
    except Exception as exc:  # FSDP1 may be absent or need a GPU
        return {"skipped": f"{type(exc).__name__}: {exc}"[:200]}
    return {"error": refused(lambda: ll.apply(model, ll.freeze("0")))}


def main(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, scenarios(rank)))
    except Exception:
        queue.put((rank, {"crash": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()
