"""One 2-process Lightning run on CPU (gloo, 127.0.0.1) with a freeze schedule; each rank
writes what it saw to ``OUT/rank<r>.json``. Run by tests/test_distributed_lightning.py:

    python tests/lightning_ddp_worker.py STRATEGY[,STRATEGY...] OUT

Several strategies run one after the other in the same processes (``ddp`` variants share
the process group), which saves starting Python, torch and Lightning again. The strategy
``resume`` is a kill and a ``ckpt_path`` resume under ``ddp`` (see :func:`resume`);
``model_parallel`` is Lightning's ``ModelParallelStrategy`` with FSDP2 ``fully_shard`` in
``configure_model`` (see :class:`Sharded`).
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

import layerlock as ll
from layerlock.backends.distributed import check_ddp
from layerlock.backends.torch_internals import ddp_tracked_count
from layerlock.backends.wrappers import ddp_of
from layerlock.lightning import FreezeScheduler

SCHEDULE = ll.Schedule({0: ll.freeze("backbone"), 1: ll.unfreeze("backbone"), 2: ll.freeze("head")})
EPOCHS = 3
# For the resume: phase 2 (epoch 1, where the run is killed) freezes the head, which phase 3 trains again.
RESUME_SCHEDULE = ll.Schedule({0: ll.freeze("backbone"), 1: ll.unfreeze("backbone").freeze("head"),
                               2: ll.unfreeze("head")})
SAVED_STEP = 3  # 2 steps per epoch per rank: step 3 is the first of epoch 1; step 4 dies before it steps


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


class StepData(Module):
    """Each rank's batch is drawn from (rank, global step), not read from the loader: Lightning
    resumes a plain DataLoader inside an epoch at the right step but from the epoch's first
    batch, and this keeps the data of every step the same through a restart."""

    def training_step(self, batch, _):
        g = torch.Generator().manual_seed(100 * self.global_rank + self.trainer.global_step)
        x, y = torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g)
        return super().training_step((x, y), _)


class Sharded(Module):
    """FSDP2: the backbone and the root are sharded with ``fully_shard`` over the strategy's
    data-parallel mesh; the forward runs through the root so its hooks gather the head."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.backbone, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def digests(module):
    """Per parameter, a digest of its full value (FSDP2 shards are gathered: on every rank)."""
    return {n: hashlib.sha256((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().tobytes())
            .hexdigest() for n, p in module.named_parameters()}


class Record(pl.Callback):
    """Per epoch: parameter digests at start and end, and what the DDP wrapper tracks."""

    def __init__(self, out=None):
        self.out, self.epochs, self.first, self.start = out and Path(out), [], None, None

    def on_train_epoch_start(self, trainer, module):  # runs after FreezeScheduler's (callback order)
        self.start = digests(module)

    def on_train_epoch_end(self, trainer, module):
        ddp = ddp_of(trainer.strategy.model)
        trainable = {n: p.requires_grad for n, p in module.named_parameters()}
        try:
            check_ddp(trainer.strategy.model, trainable.items())
            guard = "ok"
        except ll.DistributedFreezeError as exc:
            guard = str(exc)
        self.epochs.append({"start": self.start, "end": digests(module), "trainable": trainable,
                            "ddp": ddp is not None, "wrapper": id(trainer.strategy.model),
                            "tracked": None if ddp is None else ddp_tracked_count(ddp),
                            "find_unused": None if ddp is None else ddp.find_unused_parameters,
                            "guard": guard})
        self.start = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.start is None:  # a fit resumed inside an epoch does not start that epoch again
            self.start = digests(module)
        if self.first is None:  # the wrapper in force at the first step this fit runs
            ddp = ddp_of(trainer.strategy.model)
            self.first = {"epoch": trainer.current_epoch, "batch": batch_idx, "params": digests(module),
                          "trainable": {n: p.requires_grad for n, p in module.named_parameters()},
                          "tracked": None if ddp is None else ddp_tracked_count(ddp)}

    def on_train_end(self, trainer, module):
        if self.out is None:
            return
        self.out.mkdir(exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"world": trainer.world_size, "epochs": self.epochs}))


def loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)  # Lightning shards it: 2 steps per rank


def trainer(strategy, callbacks, **kw):
    return pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy=strategy, callbacks=callbacks,
                      enable_progress_bar=False, logger=False, enable_model_summary=False, num_sanity_val_steps=0,
                      **{"enable_checkpointing": False, **kw})


def main(strategy, out):
    if strategy == "resume":
        return resume(out)
    module = Module()
    if strategy == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy, module = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), Sharded()
    record = Record(Path(out) / ("model_parallel" if isinstance(module, Sharded) else strategy))
    trainer(strategy, [FreezeScheduler(SCHEDULE, log=None), record]).fit(module, loader())


class Killed(Exception):
    """What kills the interrupted run."""


class Kill(pl.Callback):
    """Die in the step after ``SAVED_STEP`` (its checkpoint written), after backward and
    before the optimizer steps, on every rank: a crash in the middle of a step."""

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == SAVED_STEP:
            raise Killed(f"killed in step {SAVED_STEP + 1}")


def resume(out):
    """For ``control`` (no layerlock, all trainable) and ``layerlock`` (RESUME_SCHEDULE): a run
    of EPOCHS uninterrupted; a run that saves a checkpoint every step and is killed in
    epoch 1; a fresh module, trainer and callbacks resumed with ``fit(ckpt_path=...)`` from
    the step-SAVED_STEP checkpoint. Writes ``OUT/resume/rank<r>.json``."""
    record, rank = {}, 0
    for variant in ("control", "layerlock"):
        def callbacks(*more):
            schedule = [FreezeScheduler(RESUME_SCHEDULE, log=None)] if variant == "layerlock" else []
            return [*schedule, Record(), *more]

        runs = {}
        reference = callbacks()
        first = StepData()
        trainer("ddp", reference).fit(first, loader())
        ckpt_dir = Path(out) / "resume" / variant
        saver = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1,
                                             save_top_k=-1)
        killed, module = callbacks(Kill(), saver), StepData()
        try:
            trainer("ddp", killed, enable_checkpointing=True).fit(module, loader())
            died = None
        except Killed as exc:
            died = str(exc)
        resumed, module = callbacks(), StepData()
        run = trainer("ddp", resumed)
        run.fit(module, loader(), ckpt_path=str(ckpt_dir / f"step={SAVED_STEP}.ckpt"))
        rank = run.global_rank
        for name, cbs in (("reference", reference), ("killed", killed), ("resumed", resumed)):
            rec = next(c for c in cbs if isinstance(c, Record))
            runs[name] = {"epochs": rec.epochs, "first": rec.first}
        runs["died"], runs["final"] = died, digests(module)
        runs["values"] = [{n: p.detach().flatten().tolist() for n, p in m.named_parameters()} for m in (first, module)]
        runs["ddp"] = {"wrapper_tracked": ddp_tracked_count(ddp_of(run.strategy.model))}
        record[variant] = runs
    (Path(out) / "resume").mkdir(parents=True, exist_ok=True)
    (Path(out) / "resume" / f"rank{rank}.json").write_text(json.dumps(record))


# For ``metric``: the val_loss each rank logs (no sync_dist), epoch by epoch. Alone, rank 0
# would begin phase 1 at epoch 4 and phase 2 at 7, rank 1 phase 1 at 7; their mean begins
# phase 1 at 7 (tests/test_metric_schedule_lightning.py works this out again).
METRIC_VALUES = ([1.0, 0.8, 0.80, 0.80, 0.7, 0.70, 0.70, 0.5, 0.4, 0.3],
                 [1.0, 0.8, 0.76, 0.80, 0.7, 0.74, 0.72, 0.5, 0.4, 0.3])


class MetricModule(pl.LightningModule):
    """A body -> head module whose validation logs ``METRIC_VALUES[rank][epoch]`` as val_loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), y)

    def validation_step(self, batch, _):
        pass

    def value(self):
        return METRIC_VALUES[self.global_rank][self.current_epoch]  # this rank's own value

    def on_validation_epoch_end(self):
        self.log("val_loss", self.value())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


class PhaseRecord(pl.Callback):
    """Per epoch, the phase in force and the parameter digests at its end."""

    def __init__(self, freezer):
        self.freezer, self.phases, self.ends = freezer, [], []

    def on_train_epoch_start(self, trainer, module):  # after the FreezeScheduler's (callback order)
        self.phases.append(self.freezer.loop.phase)

    def on_train_epoch_end(self, trainer, module):
        self.ends.append(digests(module))


def metric(out):
    """A metric schedule (tests/metric_table.schedule on body/head) under ``ddp`` for 10 epochs,
    each rank logging its own val_loss; writes ``OUT/metric/rank<r>.json``: the phase of every
    epoch, the phase starts, the parameter digests at each epoch end and the log lines."""
    from tests import metric_table

    lines = []
    freezer = FreezeScheduler(metric_table.schedule("body", "head"), log=lines.append)
    record = PhaseRecord(freezer)
    data = torch.utils.data.TensorDataset(torch.ones(4, 4), torch.zeros(4, dtype=torch.long))
    run = pl.Trainer(max_epochs=len(METRIC_VALUES[0]), accelerator="cpu", devices=2, strategy="ddp",
                     callbacks=[freezer, record], enable_progress_bar=False, logger=False,
                     enable_model_summary=False, enable_checkpointing=False)  # with the sanity check
    run.fit(MetricModule(), loader(), torch.utils.data.DataLoader(data, batch_size=2))
    (Path(out) / "metric").mkdir(parents=True, exist_ok=True)
    (Path(out) / "metric" / f"rank{run.global_rank}.json").write_text(json.dumps(
        {"world": run.world_size, "phases": record.phases, "starts": freezer.loop.stepper.tracker.starts,
         "ends": record.ends, "lines": lines}))


if __name__ == "__main__":
    for name in sys.argv[1].split(","):
        metric(sys.argv[2]) if name == "metric" else main(name, sys.argv[2])
