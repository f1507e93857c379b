"""One 2-process Lightning run on CPU (gloo, 127.0.0.1) with a freeze schedule; each rank
writes what it saw to ``OUT/rank<r>.json``. Run by tests/test_distributed_lightning.py:

    python tests/lightning_ddp_worker.py STRATEGY[,STRATEGY...] OUT

Several strategies run one after the other in the same processes (``ddp`` variants share
the process group), which saves starting Python, torch and Lightning again.
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


def digests(module):
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in module.named_parameters()}


class Record(pl.Callback):
    """Per epoch: parameter digests at start and end, and what the DDP wrapper tracks."""

    def __init__(self, out):
        self.out, self.epochs = Path(out), []

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

    def on_train_end(self, trainer, module):
        self.out.mkdir(exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"world": trainer.world_size, "epochs": self.epochs}))


def main(strategy, out):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # Lightning shards it: 2 steps per rank
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy=strategy,
                         callbacks=[FreezeScheduler(SCHEDULE, log=None), Record(Path(out) / strategy)],
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Module(), loader)


if __name__ == "__main__":
    for name in sys.argv[1].split(","):
        main(name, sys.argv[2])
