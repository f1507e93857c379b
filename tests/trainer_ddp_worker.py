"""Runs in each rank of tests/test_distributed_transformers.py, started by torchrun (2 CPU
processes, gloo on 127.0.0.1): a Hugging Face Trainer with layerlock's FreezeScheduler.

``python -m torch.distributed.run --nproc_per_node=2 ... trainer_ddp_worker.py JOB OUT``
writes ``OUT/JOB-RANK.pt`` (what each rank saw) and, for ``train``, ``OUT/epoch/checkpoint-6``.
"""

import os
import sys

import torch
import torch.distributed as dist
import transformers

import layerlock as ll
from layerlock.backends.torch_internals import ddp_tracked_count
from layerlock.transformers import FreezeScheduler

LR, TOP_LR = 1e-2, 3e-3
TOP = ll.unfreeze("bert.encoder.layer.2", "bert.encoder.layer.3")
SCHEDULES = {"epoch": ll.Schedule({0: ll.freeze("bert"), 1: TOP, 2: ll.unfreeze()}, lr={1: TOP_LR}),
             "step": ll.Schedule({0: ll.freeze("bert"), 4: TOP, 8: ll.unfreeze()}, lr={4: TOP_LR})}
STOP = 6  # the step of the checkpoint resumed from: inside the second phase


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


class Data(torch.utils.data.Dataset):
    """``n`` examples; the 64 of the 2-process runs are 4 steps of 8 per rank and epoch,
    different examples on each rank."""

    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 32).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def in_sync(model):
    mine = flat(model)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(torch.equal(every[0], other) for other in every[1:])


class Probe(transformers.TrainerCallback):
    """Per epoch: what moved, whether the ranks agree, what the DDP wrapper all-reduces; per
    step: every group's learning rate."""

    def __init__(self):
        self.trainer, self.epochs, self.lrs, self.before = None, [], [], None

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.start_synced = in_sync(model)

    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        self.lrs.append((state.global_step, [(g["lr"], len(g["params"])) for g in optimizer.param_groups]))

    def on_epoch_end(self, args, state, control, model=None, **kw):
        wrapper = self.trainer.model_wrapped
        self.epochs.append({
            "moved": sorted(n for n, p in model.named_parameters() if not torch.equal(self.before[n], p)),
            "synced": self.start_synced and in_sync(model), "wrapper": id(wrapper), "ddp": type(wrapper).__name__,
            "tracked": ddp_tracked_count(wrapper), "trainable": sum(p.requires_grad for p in model.parameters())})


def run(unit, out, *, resume=None):
    model, probe = bert(seed=5 if resume else 0), Probe()  # a resumed run gets everything from the checkpoint
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, unit), num_train_epochs=3, max_steps=12 if unit == "step" else -1,
        per_device_train_batch_size=8, learning_rate=LR, weight_decay=0.1, warmup_steps=2,
        lr_scheduler_type="linear", save_strategy="steps" if unit == "epoch" else "no", save_steps=STOP,
        report_to=[], use_cpu=True, ddp_backend="gloo", seed=0, disable_tqdm=True, logging_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(64),
                                   callbacks=[FreezeScheduler(SCHEDULES[unit], unit=unit, log=None), probe])
    probe.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return {"epochs": probe.epochs, "lrs": probe.lrs, "final": flat(model),
            "names": [n for n, _ in model.named_parameters()],
            "transitions": [e["step"] for e in trainer.state.log_history if "layerlock" in e],
            "groups": [(g["lr"], g["weight_decay"], len(g["params"])) for g in trainer.optimizer.param_groups]}


def main(job, out):
    rank = int(os.environ["RANK"])
    if job == "train":
        result = {unit: run(unit, out) for unit in ("epoch", "step")}
    else:
        result = {"epoch": run("epoch", out, resume=os.path.join(out, "epoch", f"checkpoint-{STOP}"))}
    torch.save(result, os.path.join(out, f"{job}-{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
