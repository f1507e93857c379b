"""The PyTorch half of the demo: plain training loops, ``layerlock.torch`` helpers.

Nothing here imports torch until :func:`run` is called.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..operations import apply
from .config import FROZEN_BASE, TRANSFER, Config, planned_epochs, transfer_epochs, transfer_schedule
from .data import Split
from .report import Phase, Recorder, paired

WIDTHS = (16, 32, 64)


def build(classes: int) -> Any:
    """The demo CNN: ``base`` (three conv/BatchNorm/ReLU/max-pool blocks), ``pool``, ``head``;
    the same layer names as the Keras model."""
    from collections import OrderedDict

    from torch import nn

    blocks, width = OrderedDict(), 3
    for i, w in enumerate(WIDTHS, 1):
        blocks[f"block{i}"] = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(width, w, 3, padding=1), bn=nn.BatchNorm2d(w), relu=nn.ReLU(),
            pool=nn.MaxPool2d(2)))
        width = w
    return nn.Sequential(OrderedDict(
        base=nn.Sequential(blocks),
        pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        head=nn.Linear(width, classes)))


def trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def val_loss(model: Any, data: Split) -> float:
    """Mean cross-entropy on the held-out validation images (what the metric schedule watches)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(torch.from_numpy(data.x_val)), torch.from_numpy(data.y_val)))


def epoch(model: Any, optimizer: Any, data: Split, cfg: Config, phase: Phase, gen: Any) -> dict[str, float]:
    """One epoch of the plain loop; each step's wall time (forward, backward, optimizer) goes
    to ``phase``; returns the epoch's validation metrics (none without validation images)."""
    import torch
    import torch.nn.functional as F

    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    xt, yt = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    model.train()  # frozen BatchNorm layers stay in inference mode (layerlock holds them)
    order = torch.randperm(len(y), generator=gen)
    losses, hits = [], 0
    for i in range(0, len(y), cfg.batch):
        idx = order[i:i + cfg.batch]
        start, cpu = time.perf_counter(), time.process_time()
        logits = model(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        phase.step(time.perf_counter() - start, time.process_time() - cpu, loss.item())
        losses.append(loss.item() * len(idx))
        hits += int((logits.argmax(1) == y[idx]).sum())
    metrics = {"val_loss": val_loss(model, data)} if len(data.y_val) else {}
    phase.epoch(loss=sum(losses) / len(y), acc=hits / len(y), test_acc=accuracy(model, xt, yt),
                val_loss=metrics.get("val_loss"))
    return metrics


def train(model: Any, optimizer: Any, data: Split, epochs: int, cfg: Config, phase: Phase) -> None:
    """``epochs`` epochs of the plain loop in one phase."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        epoch(model, optimizer, data, cfg, phase, gen)
    phase.close()


def run_transfer(scheduler: Any, rec: Recorder, cfg: Any, *, steps: int, trainable: Callable[[], int],
                 epoch: Callable[[Phase], Any]) -> None:
    """Both transfer phases in one loop (this module's and Flax's): ``scheduler`` (the framework's loop
    ``FreezeScheduler`` on :func:`~.config.transfer_schedule`) takes the previous epoch's
    validation loss at each ``step``, and each phase is recorded on its own; ``epoch(phase)``
    trains one epoch and returns its metrics."""
    phase, metrics = None, None
    for at in range(transfer_epochs(cfg)):
        scheduler.step(at, metrics=metrics)  # the previous epoch's val_loss decides the phase of this one
        if phase is None or phase.name != TRANSFER[scheduler.phase]:
            if phase is not None:
                phase.close()
            phase = rec.phase(TRANSFER[scheduler.phase], "target", epochs=planned_epochs(cfg, scheduler.phase, at),
                              steps=steps, trainable=trainable(), start=at)
        metrics = epoch(phase)
    assert phase is not None
    phase.close()
    rec.starts = dict(zip(TRANSFER, scheduler.stepper.tracker.starts))


def transfer(model: Any, optimizer: Any, data: Split, cfg: Config, rec: Recorder) -> None:
    """Both transfer phases in one loop: a :class:`layerlock.torch.FreezeScheduler` on
    :func:`~.config.transfer_schedule` takes each epoch's validation loss and begins the
    fine-tune phase (top block into the optimizer at ``finetune_lr``, the head's Adam state
    and rate kept) at the epoch after the loss stopped improving; each phase is recorded on
    its own."""
    import torch

    import layerlock.torch as llt

    scheduler = llt.FreezeScheduler(transfer_schedule(cfg), model, optimizer,
                                    bn=cfg.finetune_bn, log=rec.log)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(cfg.seed)
    run_transfer(scheduler, rec, cfg, steps=steps(data, cfg), trainable=lambda: trainable(model),
                 epoch=lambda phase: epoch(model, optimizer, data, cfg, phase, gen))


def step_fn(model: Any, optimizer: Any, data: Split, cfg: Config) -> Any:
    """One training step on a fixed batch, for the paired speed measurement."""
    import torch
    import torch.nn.functional as F

    x, y = torch.from_numpy(data.x[:cfg.batch]), torch.from_numpy(data.y[:cfg.batch])

    def step() -> None:
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def steps(data: Split, cfg: Config) -> int:
    return -(-len(data.y) // cfg.batch)


def run(cfg: Config, source: Split, target: Split, rec: Recorder) -> None:
    """Pretrain, phase 1, phase 2, then the two baselines, recording each phase."""
    import torch
    from torch import nn

    import layerlock.torch as llt

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build(source.classes)
    train(model, torch.optim.Adam(model.parameters(), lr=cfg.lr), source, cfg.pretrain_epochs, cfg,
          rec.phase("pretrain", "source", epochs=cfg.pretrain_epochs, steps=steps(source, cfg),
                    trainable=trainable(model)))

    # Phases 1 and 2: a new head for the target classes; the scheduler freezes the pretrained
    # base at epoch 0 (requires_grad off, BatchNorm statistics held), and unfreezes the top
    # block once val_loss stops improving. The optimizer starts with the head only.
    torch.manual_seed(cfg.seed + 1)
    model.head = nn.Linear(model.head.in_features, target.classes)
    transfer(model, torch.optim.Adam(model.head.parameters(), lr=cfg.head_lr), target, cfg, rec)

    # Baseline 1: the same head, same budget, on a randomly initialised frozen base.
    torch.manual_seed(cfg.seed + 1)
    random_base = build(target.classes)
    apply(random_base, FROZEN_BASE)
    head_only = torch.optim.Adam(llt.param_groups(random_base, lr=cfg.head_lr))
    train(random_base, head_only, target,
          cfg.frozen_epochs, cfg, rec.phase("random-base", "target", epochs=cfg.frozen_epochs,
                                             steps=steps(target, cfg), trainable=trainable(random_base)))

    # Baseline 2: the whole model from scratch for as many epochs as phases 1 and 2 together.
    torch.manual_seed(cfg.seed + 1)
    scratch = build(target.classes)
    epochs = transfer_epochs(cfg)
    everything = torch.optim.Adam(scratch.parameters(), lr=cfg.lr)
    train(scratch, everything, target, epochs, cfg,
          rec.phase("scratch", "target", epochs=epochs, steps=steps(target, cfg), trainable=trainable(scratch)))

    # The speed claim: the same architecture frozen as in phase 1 against fully trainable.
    rec.speed = paired(step_fn(random_base, head_only, target, cfg), step_fn(scratch, everything, target, cfg),
                       cfg.speed_pairs)
