"""The Lightning callback runs a MetricSchedule: the recorded metric table (tests/metric_table.py)
fed through a real Trainer on CPU gives the table's phases; a missing monitor names the keys
there are; restore_best puts back the best epoch; a ``ckpt_path`` resume continues bit for bit;
and 2 gloo processes logging different values take the same decisions."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock as ll  # noqa: E402
from layerlock.lightning import FreezeScheduler  # noqa: E402
from layerlock.stepper import PlateauTracker  # noqa: E402
from tests import metric_table  # noqa: E402
from tests.lightning_ddp_worker import MetricModule  # noqa: E402

EPOCHS = len(metric_table.VALUES)


class Net(MetricModule):
    """body -> head; the validation logs the table's val_loss of the epoch."""

    def value(self):
        return metric_table.VALUES[self.current_epoch]

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.95)}


class Record(pl.Callback):
    """Per epoch (after the FreezeScheduler's hooks): the phase, parameters and momentum at
    its start and end, and which parameters were trainable."""

    def __init__(self, freezer):
        self.freezer, self.epochs = freezer, []

    def on_train_epoch_start(self, trainer, module):
        self.epochs.append({"epoch": trainer.current_epoch, "phase": self.freezer.loop.phase,
                            "start": params(module), "start_momentum": momentum(trainer, module),
                            "trainable": {n for n, p in module.named_parameters() if p.requires_grad}})

    def on_validation_start(self, trainer, module):
        if not trainer.sanity_checking:  # what the epoch trained, before any restore_best
            self.epochs[-1]["trained"] = params(module)

    def on_train_epoch_end(self, trainer, module):
        self.epochs[-1].update(end=params(module), end_momentum=momentum(trainer, module))


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def momentum(trainer, module):
    state = trainer.optimizers[0].state
    return {n: state[p]["momentum_buffer"].clone() for n, p in module.named_parameters()
            if "momentum_buffer" in state.get(p, {})}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def loader(n=16):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit(callbacks, tmp_path, epochs=EPOCHS, module=None, **kw):
    module = module or Net()
    kw = {"enable_checkpointing": False, **kw}
    ckpt_path = kw.pop("ckpt_path", None)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)
    trainer.fit(module, loader(), loader(4), ckpt_path=ckpt_path)
    return module


def run(tmp_path, schedule=None, **kw):
    lines = []
    freezer = FreezeScheduler(schedule or metric_table.schedule("body", "head"), log=lines.append)
    record = Record(freezer)
    module = fit([freezer, record], tmp_path, **kw)
    return freezer, record.epochs, lines, module


def test_the_phase_1_spec_matches_the_body_paths():
    plan = ll.plan(Net(), ll.freeze().unfreeze("body.*"))
    assert set(plan.trainable) == {"body.weight", "body.bias"}


def test_the_metric_table_gives_its_phases_and_frozen_weights_stay_bit_identical(tmp_path):
    freezer, epochs, lines, _ = run(tmp_path)
    assert [e["phase"] for e in epochs] == metric_table.PHASES
    assert freezer.loop.stepper.tracker.starts == metric_table.STARTS
    head, body = {"head.weight", "head.bias"}, {"body.weight", "body.bias"}
    assert [e["trainable"] for e in epochs] == [head] * 4 + [head | body] * 6
    for e in epochs:
        moved = {n for n in e["start"] if not torch.equal(e["start"][n], e["end"][n])}
        assert moved == e["trainable"], e["epoch"]  # frozen: bit-identical; trainable: trained
    assert [line.split(":")[1].strip() for line in lines] == ["epoch 0", "epoch 4", "epoch 7"]
    assert lines[1].startswith("layerlock: epoch 4: val_loss did not improve by 0.01 on 0.8 (epoch 1) for 2 epochs")
    assert lines[2].startswith("layerlock: epoch 7: val_loss did not improve by 0.01 on 0.7 (epoch 4) for 2 epochs")


class NoValidation(pl.LightningModule):
    """No validation: the table's value is logged by the training steps, decided at the epoch's end."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def training_step(self, batch, _):
        self.log("val_loss", metric_table.VALUES[self.current_epoch], on_step=False, on_epoch=True)
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_without_validation_the_decision_is_taken_at_the_train_epoch_end(tmp_path):
    freezer = FreezeScheduler(metric_table.schedule("body", "head"), log=None)
    record = Record(freezer)
    pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", callbacks=[freezer, record], logger=False,
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               default_root_dir=tmp_path).fit(NoValidation(), loader())
    assert [e["phase"] for e in record.epochs] == metric_table.PHASES
    assert freezer.loop.stepper.tracker.starts == metric_table.STARTS


def test_a_missing_monitor_names_the_keys_callback_metrics_has(tmp_path):
    schedule = ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="val_acc", patience=1)
    with pytest.raises(ll.SpecError, match=r"'val_acc'.*callback_metrics.*\['val_loss'\]"):
        run(tmp_path, schedule, epochs=2)


def test_restore_best_puts_back_the_best_epoch_before_the_next_phase(tmp_path):
    _, epochs, lines, _ = run(tmp_path, metric_table.schedule("body", "head", restore_best=True))
    assert [e["phase"] for e in epochs] == metric_table.PHASES
    for start, best in ((4, 1), (7, 4)):  # phase 0's best epoch is 1 (0.8), phase 1's is 4 (0.7)
        assert same(epochs[start]["start"], epochs[best]["end"])  # weights, bit for bit
        assert same(epochs[start]["start_momentum"], epochs[best]["end_momentum"])  # optimizer state
        assert not same(epochs[start]["start"], epochs[start - 1]["trained"])  # what was trained since is gone
    assert "; best epoch restored: phase 2/3" in lines[1] and "; best epoch restored: phase 3/3" in lines[2]


@pytest.mark.parametrize("saved", [3, 5])  # 3: phase 1 decided, begins at the resume; 5: inside phase 1
def test_a_run_resumed_from_a_checkpoint_continues_bit_identical(tmp_path, saved):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    whole = FreezeScheduler(metric_table.schedule("body", "head", restore_best=True), log=None)
    reference = fit([whole, ckpt], tmp_path, enable_checkpointing=True)
    lines = []
    resumed_freezer = FreezeScheduler(metric_table.schedule("body", "head", restore_best=True), log=lines.append)
    record = Record(resumed_freezer)
    resumed = fit([resumed_freezer, record], tmp_path, ckpt_path=str(tmp_path / f"epoch={saved}.ckpt"))
    assert [e["epoch"] for e in record.epochs] == list(range(saved + 1, EPOCHS))
    assert [e["phase"] for e in record.epochs] == metric_table.PHASES[saved + 1:]
    assert resumed_freezer.loop.stepper.tracker.state_dict() == whole.loop.stepper.tracker.state_dict()
    assert same(params(resumed), params(reference))
    if saved == 3:  # the transition decided before the save begins after the resume, with its reason
        assert lines[0].startswith("layerlock: epoch 4: val_loss did not improve")


# 2 processes -----------------------------------------------------------------------------

WORKER = Path(__file__).parent / "lightning_ddp_worker.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def starts_of(values):
    tracker = PlateauTracker(metric_table.schedule("body", "head"))
    for epoch, value in enumerate(values):
        tracker.observe(epoch, {"val_loss": value})
    return tracker.starts


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_logging_different_values_take_the_same_decisions(tmp_path):
    from tests.lightning_ddp_worker import METRIC_VALUES

    f32 = [[float(torch.tensor(v)) for v in rank] for rank in METRIC_VALUES]  # as self.log stores them
    mean = [(a + b) / 2 for a, b in zip(*f32)]
    assert starts_of(f32[0]) != starts_of(f32[1])  # deciding alone, the ranks would part at epoch 4
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, str(WORKER), "metric", str(tmp_path)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's group: it and the rank it started
        log, _ = proc.communicate()
    files = [tmp_path / "metric" / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 and all(f.exists() for f in files), log.decode(errors="replace")[-3000:]
    rank0, rank1 = (json.loads(f.read_text()) for f in files)
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["starts"] == rank1["starts"] == starts_of(mean) == [0, 7]  # decided on the mean
    assert rank0["phases"] == rank1["phases"] == [0] * 7 + [1] * 3
    assert rank0["ends"] == rank1["ends"]  # every parameter, every epoch, bit for bit
    assert rank0["lines"] == rank1["lines"]
