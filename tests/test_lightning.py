"""The Lightning callback drives a real Trainer on CPU through a gradual schedule."""

import pytest

pl = pytest.importorskip("lightning.pytorch")
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock as ll  # noqa: E402
from layerlock.lightning import FreezeScheduler  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        self.history = []

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_epoch_start(self):
        self.before = {n: p.detach().clone() for n, p in self.named_parameters()}

    def on_train_epoch_end(self):
        self.history.append(sorted({n.split(".")[1] for n, p in self.named_parameters()
                                    if not torch.equal(self.before[n], p)}))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.9)}


def loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def trainer(epochs, callbacks, **kw):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def test_lightning_callback_on_a_container(tmp_path):
    module = Module()
    callback = FreezeScheduler(ll.Schedule({0: ll.freeze("net").unfreeze("net.2"), 1: ll.unfreeze("net.1"),
                                            2: ll.unfreeze()}))
    trainer(3, [callback], default_root_dir=tmp_path, enable_checkpointing=False).fit(module, loader())
    assert module.history == [["2"], ["1", "2"], ["0", "1", "2"]]


def test_lightning_resume_replays_phases_before_the_optimizer_is_restored(tmp_path):
    schedule = ll.Schedule({0: ll.freeze("net").unfreeze("net.2"), 1: ll.unfreeze("net.1"), 2: ll.unfreeze()})
    first = Module()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(2, [FreezeScheduler(schedule), ckpt], default_root_dir=tmp_path).fit(first, loader())
    resumed = Module()
    trainer(3, [FreezeScheduler(schedule)], default_root_dir=tmp_path, enable_checkpointing=False).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.history == [["0", "1", "2"]]


def test_lightning_callback_fails_in_setup_on_a_typo(tmp_path):
    callback = FreezeScheduler(ll.Schedule({0: ll.freeze("nett")}))
    with pytest.raises(ll.NoMatchError, match="net"):
        trainer(1, [callback], default_root_dir=tmp_path, enable_checkpointing=False).fit(Module(), loader())


def test_lightning_log_receives_each_transition(tmp_path):
    lines = []
    schedule = ll.Schedule({0: ll.freeze("net").unfreeze("net.2"), 1: ll.unfreeze()})
    trainer(2, [FreezeScheduler(schedule, log=lines.append)], default_root_dir=tmp_path,
            enable_checkpointing=False).fit(Module(), loader())
    assert [line.split(":")[1].strip() for line in lines] == ["epoch 0", "epoch 1"]


def test_lightning_verbose_still_works_for_one_release_with_a_deprecation_warning():
    from layerlock.lightning import rank_zero_info

    assert FreezeScheduler(ll.gradual(2))._log is rank_zero_info
    with pytest.warns(DeprecationWarning, match="log=None"):
        assert FreezeScheduler(ll.gradual(2), verbose=False)._log is None
    with pytest.warns(DeprecationWarning):
        assert FreezeScheduler(ll.gradual(2), verbose=True)._log is rank_zero_info
    with pytest.raises(ll.SpecError, match="not both"):
        FreezeScheduler(ll.gradual(2), log=print, verbose=True)


@pytest.mark.parametrize("other", ["schedule", "structure"])
def test_lightning_refuses_a_checkpoint_of_another_schedule_or_model_before_restoring_the_optimizer(tmp_path, other):
    schedule = ll.Schedule({0: ll.freeze("net").unfreeze("net.2"), 1: ll.unfreeze()})
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(1, [FreezeScheduler(schedule, log=None), ckpt], default_root_dir=tmp_path).fit(Module(), loader())
    module = Module()
    if other == "schedule":
        schedule, message = ll.Schedule({0: ll.freeze("net.0"), 1: ll.unfreeze()}), "another schedule"
    else:  # same paths and shapes but one more layer: Lightning itself loads the rest (strict_loading=False)
        module.net.append(nn.Linear(2, 2))
        module.strict_loading, message = False, "another structure"
    fit = trainer(2, [FreezeScheduler(schedule, log=None)], default_root_dir=tmp_path, enable_checkpointing=False)
    with pytest.raises(ll.LayerlockError, match=message):
        fit.fit(module, loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert fit.optimizers == [] and fit.global_step == 0  # the strategy had built no optimizer; no loop restored
    assert all(p.requires_grad for p in module.parameters())  # no phase applied
