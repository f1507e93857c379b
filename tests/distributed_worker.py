"""Runs in each rank of the multi-process DDP tests (loopback gloo); reports through a queue."""

import os
import socket
import traceback
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import layerlock as ll
import layerlock.torch as llt
from layerlock.backends import torch_internals as internals

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
    given = ddp
    ddp, plan = llt.rewrap(ddp, ll.unfreeze("0"))
    out["rewrap"] = {"synced": train(given, inner, 2, rank), "moved": not torch.equal(w, inner[0].weight),
                     "changed": list(plan.changed), "same_wrapper": ddp is given}

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


def serve(run, rank, world, port, queue):
    """One rank: join the loopback gloo group, put ``run(rank)``'s result (or its crash) on the queue."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, run(rank)))
    except Exception:
        queue.put((rank, {"crash": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


def main(rank, world, port, queue):
    serve(scenarios, rank, world, port, queue)


# -- FreezeScheduler carrying a schedule through DDP (tests/test_distributed_schedule_torch.py) --

def body_head():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(16, 2)))


def schedule():
    return ll.Schedule({0: ll.freeze("body"), 2: ll.unfreeze()}, lr={2: 1e-3})


def load(path, model, freezer, optimizer):
    """Resume from ``path``: the model, then the freezer (it replays the phases), then the optimizer."""
    saved = torch.load(path, weights_only=False)
    model.load_state_dict(saved["model"])
    freezer.load_state_dict(saved["freezer"])
    optimizer.load_state_dict(saved["optimizer"])


def scheduled(rank, epochs, *, count_bytes=False, resume=None, compiled=False):
    """Train body -> head in DDP under ``schedule()`` for ``epochs`` x 2 steps with the
    scheduler alone handling the wrapper; per epoch: ranks in sync, body unchanged, the
    wrapper and (count_bytes, through a comm hook registered once) the gradient bytes
    all-reduced per step; ``compiled`` trains through ``torch.compile(ddp)``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    inner = body_head()
    ddp = DDP(inner)
    model = torch.compile(ddp) if compiled else ddp
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    freezer = llt.FreezeScheduler(schedule(), model, opt, log=None)
    if resume is not None:
        load(resume, inner, freezer, opt)
    body0 = torch.cat([p.detach().flatten() for p in inner.body.parameters()]).clone()
    sent = {"bytes": 0}

    def counting(state, bucket):
        state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    if count_bytes:
        ddp.register_comm_hook(sent, counting)  # the rebuilt reducers keep it
    log = []
    for epoch in epochs:
        freezer.step(epoch)
        sent["bytes"] = 0
        for step in range(2):
            g = torch.Generator().manual_seed(1000 * rank + 10 * epoch + step)
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()  # the wrapper given: rebuilt in place
            opt.step()
        body = torch.cat([p.detach().flatten() for p in inner.body.parameters()])
        log.append({"epoch": epoch, "synced": in_sync(inner), "body_same": torch.equal(body, body0),
                    "same_wrapper": freezer.model is model and ddp.module is inner,
                    "bytes_per_step": sent["bytes"] / 2, "tracked": internals.ddp_tracked_count(ddp)})
    return {"log": log, "final": flat(inner), "freezer": freezer,
            "optimizer": opt, "inner": inner}


def schedule_scenarios(rank, tmp):
    out = {}
    run = scheduled(rank, range(4), count_bytes=True)
    inner = run["inner"]
    trainable = sum(p.numel() for p in inner.head.parameters())
    out["schedule"] = {"log": run["log"],
                       "trainable_share": trainable / sum(p.numel() for p in inner.parameters()),
                       "head_tensors": len(list(inner.head.parameters())),
                       "all_tensors": len(list(inner.parameters()))}

    reference = scheduled(rank, range(4))
    torch.save(reference["final"], os.path.join(tmp, f"uninterrupted{rank}.pt"))
    stopped = scheduled(rank, range(3))  # stopped after epoch 2, in the second phase
    torch.save({"model": stopped["inner"].state_dict(), "optimizer": stopped["optimizer"].state_dict(),
                "freezer": stopped["freezer"].state_dict()}, os.path.join(tmp, f"checkpoint{rank}.pt"))
    compiled = scheduled(rank, range(3), compiled=True)
    out["compiled"] = {"log": compiled["log"], "eager_diff": (compiled["final"] - stopped["final"]).abs().max().item()}

    inner = make()
    ddp = DDP(inner, static_graph=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    error = refused(lambda: llt.FreezeScheduler(schedule_small(), ddp, opt, log=None))
    out["static_graph"] = {"error": error, "unchanged": all(p.requires_grad for p in inner.parameters())
                           and len(opt.param_groups) == 1 and ddp.module is inner}
    ddp = DDP(make())
    out["other_refusals"] = {
        "nothing_trainable": refused(lambda: llt.FreezeScheduler(ll.Schedule({0: ll.freeze()}), ddp, None, log=None)),
        "unchanged": all(p.requires_grad for p in ddp.parameters())}

    inner = body_head()
    ddp = DDP(inner)
    freezer = llt.FreezeScheduler(schedule(), ddp, None, log=None)
    if rank == 1:
        inner.head.bias.requires_grad_(False)  # this rank's trainable set differs from rank 0's
    out["ranks_disagree"] = {"error": refused(lambda: freezer.step(0))}
    return out


def schedule_small():
    return ll.Schedule({0: ll.freeze("0"), 1: ll.unfreeze()})


def resume_scenarios(rank, tmp):
    run = scheduled(rank, [3], resume=os.path.join(tmp, f"checkpoint{rank}.pt"))
    reference = torch.load(os.path.join(tmp, f"uninterrupted{rank}.pt"))
    return {"resume": {"equal": torch.equal(run["final"], reference), "synced": run["log"][-1]["synced"],
                       "phase": run["freezer"].phase, "tracked": run["log"][-1]["tracked"]}}


def schedule_main(rank, world, port, queue, job, tmp):
    """Entry point of the schedule tests: ``job`` is "train" (first processes) or "resume"."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        queue.put((rank, (schedule_scenarios if job == "train" else resume_scenarios)(rank, tmp)))
    except Exception:
        queue.put((rank, {"crash": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, *args, world=2, timeout=90):
    """Run ``target(rank, world, port, queue, *args)`` on ``world`` spawned processes over
    loopback; their results by rank. Each ends by itself or is killed after the timeouts."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    for out in results.values():
        assert "crash" not in out, out.get("crash")
    return results


# -- FreezeScheduler carrying a schedule through FSDP2 fully_shard (tests/test_fsdp2_schedule.py) --

def fsdp2_schedule():
    """Freeze the body, unfreeze it at a phase lr, then freeze the head."""
    return ll.Schedule({0: ll.freeze("body"), 2: ll.unfreeze(), 4: ll.freeze("head")}, lr={2: 1e-3})


def sharded_body_head():
    """``body_head()`` sharded per block and at the root (even sizes: no padding, so the
    bytes reduce-scattered are exactly the trainable gradients' bytes)."""
    from torch.distributed.fsdp import fully_shard

    model = body_head()
    for block in (model.body[0], model.body[2], model.head):
        fully_shard(block)
    fully_shard(model)
    return model


def fsdp2_scheduled(rank, epochs, *, resume=None):
    """Train ``sharded_body_head()`` under ``fsdp2_schedule()`` for ``epochs`` x 2 steps with
    the loop FreezeScheduler; per epoch: ranks in sync (full tensors), which parts moved,
    gradient bytes reduce-scattered per step (``dist.reduce_scatter_single``, FSDP2's
    collective, counted), frozen gradients None, the optimizer's groups, state_dict keys."""
    model = sharded_body_head()
    keys = list(body_head().state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    freezer = llt.FreezeScheduler(fsdp2_schedule(), model, opt, log=None)
    if resume is not None:
        load(resume, model, freezer, opt)
    sent = {"bytes": 0}
    real = dist.reduce_scatter_single

    def counting(output, input, *args, **kwargs):
        sent["bytes"] += input.numel() * input.element_size()
        return real(output, input, *args, **kwargs)

    def part(name):
        return torch.cat([p.full_tensor().flatten() for p in getattr(model, name).parameters()])

    names = {id(p): n for n, p in model.named_parameters()}
    log = []
    dist.reduce_scatter_single = counting
    try:
        for epoch in epochs:
            freezer.step(epoch)
            before = {n: part(n) for n in ("body", "head")}
            sent["bytes"], grads_ok = 0, True
            for step in range(2):
                g = torch.Generator().manual_seed(1000 * rank + 10 * epoch + step)
                x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                grads_ok &= all((p.grad is None) != p.requires_grad for p in model.parameters())
                opt.step()
            log.append({
                "epoch": epoch, "phase": freezer.phase, "synced": in_sync(model),
                **{f"{n}_same": torch.equal(before[n], part(n)) for n in before},
                "bytes_per_step": sent["bytes"] / 2, "grads_only_trainable": grads_ok,
                "trainable_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                "groups": [(g.get("name"), g["lr"], sorted(names[id(p)] for p in g["params"]))
                           for g in opt.param_groups],
                "dtensor_params": all(hasattr(p, "full_tensor") for p in model.parameters()),
                "state_dict_keys": list(model.state_dict()) == keys})
    finally:
        dist.reduce_scatter_single = real
    return {"log": log, "final": flat(model), "freezer": freezer, "optimizer": opt, "model": model}


def fsdp2_schedule_scenarios(rank, tmp):
    run = fsdp2_scheduled(rank, range(6))
    torch.save(run["final"], os.path.join(tmp, f"fsdp2-uninterrupted{rank}.pt"))
    stopped = fsdp2_scheduled(rank, range(3))  # stopped after epoch 2, in the second phase
    torch.save({"model": stopped["model"].state_dict(), "optimizer": stopped["optimizer"].state_dict(),
                "freezer": stopped["freezer"].state_dict()}, os.path.join(tmp, f"fsdp2-checkpoint{rank}.pt"))
    model = body_head()
    return {"schedule": {"log": run["log"], "all_bytes": sum(p.numel() * 4 for p in model.parameters()),
                         "head_bytes": sum(p.numel() * 4 for p in model.head.parameters())}}


def fsdp2_resume_scenarios(rank, tmp):
    run = fsdp2_scheduled(rank, range(3, 6), resume=os.path.join(tmp, f"fsdp2-checkpoint{rank}.pt"))
    reference = torch.load(os.path.join(tmp, f"fsdp2-uninterrupted{rank}.pt"))
    return {"resume": {"equal": torch.equal(run["final"], reference), "log": run["log"],
                       "phase": run["freezer"].phase}}


def fsdp2_schedule_main(rank, world, port, queue, job, tmp):
    """Entry point of the FSDP2 schedule tests: ``job`` is "train" (first processes) or "resume"."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        job_fn = fsdp2_schedule_scenarios if job == "train" else fsdp2_resume_scenarios
        queue.put((rank, job_fn(rank, tmp)))
    except Exception:
        queue.put((rank, {"crash": traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


# -- rows= under DDP, and refused on FSDP2-sharded tables (tests/test_rows_torch.py) --

def rows_net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(emb=nn.Embedding(100, 8), pool=nn.Flatten(), head=nn.Linear(24, 2)))


def rows_scenarios(rank):
    """Phase 0 trains the head, phase 1 also the new rows 90: of the table, through DDP."""
    model = rows_net()
    table = model.emb.weight.detach().clone()
    ddp = DDP(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    freezer = llt.FreezeScheduler(ll.Schedule({0: ll.freeze("emb"), 1: ll.unfreeze("emb", rows="90:")}),
                                  ddp, optimizer, log=None)
    log = []
    for epoch in range(2):
        freezer.step(epoch)
        for step in range(2):
            g = torch.Generator().manual_seed(100 * rank + 10 * epoch + step)
            x, y = torch.randint(0, 100, (8, 3), generator=g), torch.randint(0, 2, (8,), generator=g)
            x[:, 0] = torch.randint(90, 100, (8,), generator=g)
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        now = model.state_dict()["emb.weight"]
        every = [torch.zeros_like(now) for _ in range(dist.get_world_size())]
        dist.all_gather(every, now)
        log.append({"ranks_same": all(torch.equal(every[0], t) for t in every[1:]) and in_sync(model),
                    "old_same": torch.equal(now[:90], table[:90]), "new_same": torch.equal(now[90:], table[90:]),
                    "same_wrapper": freezer.model is ddp})
    from torch.distributed.fsdp import fully_shard

    sharded = rows_net()
    fully_shard(sharded.emb)
    fully_shard(sharded)
    try:
        ll.apply(sharded, ll.freeze().unfreeze("emb", rows="90:"))
        error = None
    except ll.SpecError as exc:
        error = str(exc)
    return {"log": log, "sharded_error": error,
            "sharded_unchanged": all(p.requires_grad for p in sharded.parameters())}


def rows_main(rank, world, port, queue):
    serve(rows_scenarios, rank, world, port, queue)


# -- a metric schedule under DDP: the ranks decide on the mean metric (tests/test_metric_schedule_loops.py) --

def metric_values(rank):
    """Rank 0 reports the recorded sequence, rank 1 one that keeps improving (by 0.012 an
    epoch, more than min_delta): alone, each rank would move on at other epochs."""
    from . import metric_table

    return metric_table.VALUES if rank == 0 else [1.0 - 0.012 * e for e in range(len(metric_table.VALUES))]


def metric_mean():
    return [(a + b) / 2 for a, b in zip(metric_values(0), metric_values(1))]


def metric_scenarios(rank):
    from . import metric_table

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(body=nn.Linear(4, 8), act=nn.ReLU(), head=nn.Linear(8, 2)))
    ddp = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    freezer = llt.FreezeScheduler(metric_table.schedule("body", "head"), ddp, optimizer, log=None)
    values, phases, synced = metric_values(rank), [], True
    for epoch in range(len(values)):
        freezer.step(epoch, metrics={"val_loss": values[epoch - 1]} if epoch else None)
        phases.append(freezer.phase)
        synced &= train(ddp, model, 2, rank, start=10 * epoch)
    return {"phases": phases, "in_sync": synced}


def metric_main(rank, world, port, queue):
    serve(metric_scenarios, rank, world, port, queue)
