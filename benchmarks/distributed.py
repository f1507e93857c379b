"""Freeze schedules under several processes: 2 ranks on this machine (gloo, 127.0.0.1, CPU,
one intra-op thread each), started torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment); each part runs in its own pair of processes.

- ``loop``: a plain loop with ``DistributedDataParallel``. Layerlock: one wrapper built with
  everything trainable and ``layerlock.torch.FreezeScheduler`` (it rebuilds the wrapper in
  place at each phase change). Hand: ``requires_grad_(False)`` on the body before wrapping a
  new ``DistributedDataParallel``, and a new wrapper again at the phase change. Step time per
  phase (frozen, then everything trainable), the two modes interleaved in one run; and the
  gradient bytes all-reduced per step (a counting comm hook, on a third, untimed model).
- ``lightning``: ``strategy="ddp"``; ``layerlock.lightning.FreezeScheduler`` against the
  backbone frozen by hand before ``fit``, fits interleaved; bytes through a comm hook
  registered on ``trainer.strategy.model`` (untimed fits).
- ``trainer``: the Hugging Face Trainer (``ddp_backend="gloo"``, ``use_cpu=True``) with a small
  ``BertForSequenceClassification``; ``layerlock.transformers.FreezeScheduler`` against the
  encoder frozen by hand before the Trainer is built, runs interleaved; bytes likewise.

    python -m benchmarks.distributed PART OUT.json [--quick]      # one rank (environment set)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

PARTS = ("loop", "lightning", "trainer")
WORLD = 2
TIMEOUT_S = {True: 240, False: 600}
# Sizes: a step of tens of ms on one thread per rank; bigger in the full grid.
LOOP = {True: {"width": 256, "body": 4, "head": 2, "batch": 32, "reps": 6, "target_s": 0.1},
        False: {"width": 512, "body": 6, "head": 2, "batch": 64, "reps": 36, "target_s": 0.2}}
LIGHTNING = {True: {"width": 256, "body": 4, "head": 2, "batch": 32, "steps": 10, "reps": 1},
             False: {"width": 512, "body": 6, "head": 2, "batch": 64, "steps": 40, "reps": 6}}
TRAINER = {True: {"hidden": 64, "layers": 2, "seq": 32, "batch": 8, "steps": 10, "reps": 1},
           False: {"hidden": 128, "layers": 2, "seq": 32, "batch": 16, "steps": 30, "reps": 6}}
SKIP = 3          # first steps of a fit or Trainer run left out of its median (warm-up)
COUNT_STEPS = 4   # steps of the untimed runs that count bytes
COUNTED = {True: ("layerlock", "full"), False: ("layerlock", "hand", "full")}   # their modes


# --- parent: start the ranks ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NEEDS = {"loop": ("torch",), "lightning": ("torch", "lightning"), "trainer": ("torch", "transformers", "accelerate")}


def launch(part: str, quick: bool) -> dict[str, Any]:
    """Run ``part`` on 2 processes; rank 0's result (with rank 1's bytes for a check)."""
    import importlib.util

    missing = [m for m in NEEDS[part] if importlib.util.find_spec(m) is None]
    if missing:
        return {"error": f"{', '.join(missing)} not installed"}
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        port, procs = _free_port(), []
        for rank in range(WORLD):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                   "LOCAL_WORLD_SIZE": str(WORLD), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                   "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "TORCHELASTIC_RUN_ID": f"layerlock-bench-{port}", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
            cmd = [sys.executable, "-m", "benchmarks.distributed", part, str(Path(tmp) / f"rank{rank}.json")]
            procs.append(subprocess.Popen(cmd + (["--quick"] if quick else []), cwd=root, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        deadline, logs = time.monotonic() + TIMEOUT_S[quick], []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                return {"error": f"{part}: timed out after {TIMEOUT_S[quick]} s"}
        outs = [Path(tmp) / f"rank{r}.json" for r in range(WORLD)]
        if any(p.returncode for p in procs) or not all(o.exists() for o in outs):
            tail = b"\n".join(logs).decode(errors="replace")[-2000:]
            return {"error": f"{part} failed (exit {[p.returncode for p in procs]}): {tail.strip()}"}
        first, second = (json.loads(o.read_text()) for o in outs)
    first["rank1_bytes"] = second.get("bytes")
    return first


def run(quick: bool) -> dict[str, Any]:
    """Every part, one after the other; a part that fails is recorded and the rest still run."""
    out: dict[str, Any] = {}
    for part in PARTS:
        start = time.perf_counter()
        out[part] = launch(part, quick)
        out[part]["elapsed_s"] = round(time.perf_counter() - start, 1)
    return out


# --- shared by the ranks ---------------------------------------------------------------

def _summary(samples: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "q1": q[0], "q3": q[2], "iqr": q[2] - q[0],
            "n": len(samples), "samples_s": samples}


def _compare(samples: dict[str, list[float]], a: str = "layerlock", b: str = "hand") -> dict[str, Any]:
    """Both modes' summaries, the ratio of medians, and the median of the per-repetition ratios."""
    out = {m: _summary(s) for m, s in samples.items() if m in (a, b)}
    out["ratio"] = out[a]["median"] / out[b]["median"]
    out["paired_ratio"] = statistics.median(x / y for x, y in zip(samples[a], samples[b]))
    return out


def _mlp(width: int, body: int, head: int) -> Any:
    """``body`` and ``head`` blocks of Linear + ReLU; the head ends in 10 classes."""
    from collections import OrderedDict

    import torch
    from torch import nn

    torch.manual_seed(0)
    blocks = [m for _ in range(body) for m in (nn.Linear(width, width), nn.ReLU())]
    tops = [m for _ in range(head - 1) for m in (nn.Linear(width, width), nn.ReLU())] + [nn.Linear(width, 10)]
    return nn.Sequential(OrderedDict(backbone=nn.Sequential(*blocks), head=nn.Sequential(*tops)))


class Counter:
    """A DDP comm hook that counts the gradient bytes it all-reduces."""

    def __init__(self) -> None:
        self.bytes = 0

    def hook(self, state: Any, bucket: Any) -> Any:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    def register(self, ddp: Any) -> None:
        ddp.register_comm_hook(None, lambda _, bucket: self.hook(None, bucket))


def _shares(model: Any) -> dict[str, int]:
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "all": sum(p.numel() for p in params)}


# --- part: plain loop with DDP -------------------------------------------------------------

def loop_part(quick: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch import nn

    import layerlock as ll
    import layerlock.torch as llt

    DDP = nn.parallel.DistributedDataParallel
    s = LOOP[quick]
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(s["batch"], s["width"], generator=g), torch.randint(0, 10, (s["batch"],), generator=g)
    schedule = ll.Schedule({0: ll.freeze("backbone"), 1: ll.unfreeze()})

    def trainer(ddp: Any) -> tuple[Callable[[], None], Any]:
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        return step, opt

    class Layerlock:
        """One wrapper, everything trainable; the scheduler rebuilds it at each phase."""

        def __init__(self, counter: Counter | None = None) -> None:
            self.ddp = DDP(_mlp(s["width"], s["body"], s["head"]))
            if counter is not None:
                counter.register(self.ddp)
            self.step, opt = trainer(self.ddp)
            self.freezer = llt.FreezeScheduler(schedule, self.ddp, opt, log=None)

        def phase(self, epoch: int) -> None:
            self.freezer.step(epoch)

    class Hand:
        """What people write: requires_grad_(False) before wrapping; a new wrapper at the change."""

        def __init__(self) -> None:
            self.model = _mlp(s["width"], s["body"], s["head"])
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

        def phase(self, epoch: int) -> None:
            self.model.backbone.requires_grad_(epoch > 0)
            ddp = DDP(self.model)  # the frozen parameters' grad stays None: SGD skips them

            def step() -> None:
                self.opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(ddp(x), y).backward()
                self.opt.step()
            self.step = step

    # "control": a second hand-written model, timed like the others: its ratio to "hand" is the
    # noise floor of this run (the same code measured twice).
    modes: dict[str, Any] = {"layerlock": Layerlock(), "hand": Hand(), "control": Hand()}
    counter = Counter()
    counted = Layerlock(counter)

    def steps(step: Callable[[], None], n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - start

    out: dict[str, Any] = {"size": {k: s[k] for k in ("width", "body", "head", "batch")}, "phases": {},
                           "transition_s": {}, "bytes": {}}
    for epoch, name in ((0, "frozen"), (1, "full")):
        for mode, m in modes.items():
            start = time.perf_counter()
            m.phase(epoch)
            out["transition_s"].setdefault(mode, []).append(time.perf_counter() - start)
        counted.phase(epoch)
        counter.bytes = 0
        steps(counted.step, COUNT_STEPS)
        out["bytes"][name] = {"per_step": counter.bytes / COUNT_STEPS, **_shares(counted.ddp.module)}
        for m in modes.values():  # warm-up, then steps per sample agreed by every rank
            steps(m.step, 2)
        one = [max(steps(m.step, 2) / 2, 1e-4) for m in modes.values()]
        inner = [max(1, round(s["target_s"] / min(one)))]
        dist.broadcast_object_list(inner, src=0)
        samples: dict[str, list[float]] = {m: [] for m in modes}
        names = list(modes)
        for r in range(s["reps"]):
            for mode in _rotation(names, r):
                samples[mode].append(steps(modes[mode].step, inner[0]) / inner[0])
        out["phases"][name] = {"inner": inner[0], **_compare(samples),
                               "control/hand": _compare(samples, "control")["paired_ratio"]}
    frozen, full = out["bytes"]["frozen"], out["bytes"]["full"]
    out["bytes_ratio"] = frozen["per_step"] / full["per_step"]
    out["trainable_share"] = frozen["trainable"] / frozen["all"]
    return out


# --- runs with per-step times (Lightning, Trainer) -------------------------------------------

def _rotation(names: list[str], r: int) -> list[str]:
    """Repetition ``r``'s order: rotated, and reversed every other cycle, so each mode runs
    first, last and after each other mode alike."""
    order = names[r % len(names):] + names[:r % len(names)]
    return order if (r // len(names)) % 2 == 0 else order[::-1]


def _interleaved(run: Callable[[str], list[float]], reps: int, quick: bool) -> dict[str, Any]:
    """``run(mode)`` -> its step times, for layerlock, hand and control (hand again: the
    noise floor); a first round warms up and is dropped (quick: one run of control); a
    run's sample is the median of its steps after the first ``SKIP``."""
    names = ["layerlock", "hand", "control"]
    samples: dict[str, list[float]] = {m: [] for m in names}
    for mode in names if not quick else ["control"]:
        run(mode)
    for r in range(reps):
        for mode in _rotation(names, r):
            samples[mode].append(statistics.median(run(mode)[SKIP:]))
    return {**_compare(samples), "control/hand": _compare(samples, "control")["paired_ratio"], "skip": SKIP}


def lightning_part(quick: bool) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from torch import nn

    import layerlock as ll
    from layerlock.backends.wrappers import ddp_of
    from layerlock.lightning import FreezeScheduler

    s = LIGHTNING[quick]
    # A later phase past the run's end: Lightning wraps everything trainable and the
    # callback rebuilds the wrapper in place at epoch 0, what a real schedule does.
    schedule = ll.Schedule({0: ll.freeze("backbone"), 100: ll.unfreeze()})

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            net = _mlp(s["width"], s["body"], s["head"])
            self.backbone, self.head = net.backbone, net.head

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            self.marks.append(time.perf_counter())

        def on_train_end(self, *args: Any) -> None:
            self.marks.append(time.perf_counter())

    class Count(pl.Callback):
        def __init__(self) -> None:
            self.counter, self.shares = Counter(), {}

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.counter.register(ddp_of(trainer.strategy.model))  # kept by a rebuild in place

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self.shares = _shares(module)

    g = torch.Generator().manual_seed(0)
    n = s["steps"] * s["batch"] * 2
    data = torch.utils.data.TensorDataset(torch.randn(n, s["width"], generator=g),
                                          torch.randint(0, 10, (n,), generator=g))

    def fit(mode: str, steps: int, *extra: Any) -> Any:
        module = Module()
        callbacks: list[Any] = list(extra)
        if mode in ("hand", "control"):
            module.backbone.requires_grad_(False)
        elif mode == "layerlock":
            callbacks.insert(0, FreezeScheduler(schedule, log=None))
        trainer = pl.Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", devices=WORLD, strategy="ddp",
                             callbacks=callbacks, enable_progress_bar=False, logger=False,
                             enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=s["batch"]))
        return callbacks

    def timed(mode: str) -> list[float]:
        timer = fit(mode, s["steps"], Timer())[-1]
        return [b - a for a, b in zip(timer.marks, timer.marks[1:])]

    out: dict[str, Any] = {"size": {k: s[k] for k in ("width", "body", "head", "batch", "steps")},
                           "frozen": _interleaved(timed, s["reps"], quick), "bytes": {}}
    for mode in COUNTED[quick]:
        count = fit(mode, COUNT_STEPS, Count())[-1]
        out["bytes"][mode] = {"per_step": count.counter.bytes / COUNT_STEPS, **count.shares}
    _byte_ratios(out)
    return out


def _byte_ratios(out: dict[str, Any]) -> None:
    b = out["bytes"]
    out["bytes_ratio"] = b["layerlock"]["per_step"] / b["full"]["per_step"]
    if "hand" in b:
        out["bytes_layerlock/hand"] = b["layerlock"]["per_step"] / b["hand"]["per_step"]
    out["trainable_share"] = b["layerlock"]["trainable"] / b["layerlock"]["all"]


# --- part: Hugging Face Trainer ------------------------------------------------------------

def trainer_schedule(steps: int) -> Any:
    """The encoder frozen, then an unfreezing phase after the run's last step: the callback
    carries a multi-phase schedule through the Trainer's DDP wrapper, and the run times its
    frozen phase."""
    import layerlock as ll

    return ll.Schedule({0: ll.freeze("bert"), steps + 100: ll.unfreeze()})


def trainer_part(quick: bool) -> dict[str, Any]:
    import torch
    import transformers

    from layerlock.backends.wrappers import ddp_of
    from layerlock.transformers import FreezeScheduler

    from .overhead import step_timer, token_data

    transformers.logging.set_verbosity_error()
    s = TRAINER[quick]

    class Count(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.counter, self.trainer, self.shares, self.on = Counter(), None, {}, False

        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if not self.on:  # the Trainer has wrapped the model by its first step
                self.counter.register(ddp_of(self.trainer.model_wrapped))
                self.on, self.shares = True, _shares(model)

    def train(mode: str, steps: int, extra: Any) -> Any:
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=1000, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                         num_attention_heads=4, intermediate_size=2 * s["hidden"],
                                         max_position_embeddings=s["seq"])
        model = transformers.BertForSequenceClassification(config)
        callbacks = [extra]
        if mode in ("hand", "control"):
            model.bert.requires_grad_(False)
        elif mode == "layerlock":
            callbacks.insert(0, FreezeScheduler(trainer_schedule(steps), unit="step", log=None))
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=s["batch"],
            learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo",
            disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=token_data(steps * s["batch"] * WORLD, s["seq"]),
                                      callbacks=callbacks)
        extra.trainer = trainer
        trainer.train()
        return extra

    def timed(mode: str) -> list[float]:
        timer = train(mode, s["steps"], step_timer())
        return [b - a for a, b in zip(timer.marks, timer.marks[1:])]

    out: dict[str, Any] = {"size": dict(s), "multi_phase": True,
                           "frozen": _interleaved(timed, s["reps"], quick), "bytes": {}}
    for mode in COUNTED[quick]:
        count = train(mode, COUNT_STEPS, Count())
        out["bytes"][mode] = {"per_step": count.counter.bytes / COUNT_STEPS, **count.shares}
    _byte_ratios(out)
    return out


# --- one rank ------------------------------------------------------------------------------

def rank_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed")
    p.add_argument("part", choices=PARTS)
    p.add_argument("out")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.part == "loop":
        dist.init_process_group("gloo")
    result = {"loop": loop_part, "lightning": lightning_part, "trainer": trainer_part}[args.part](args.quick)
    result["world"] = WORLD
    Path(args.out).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # not the interpreter's teardown of wrappers whose process group is gone


if __name__ == "__main__":
    rank_main()
