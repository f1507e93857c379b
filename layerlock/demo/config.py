"""What every framework's half of the demo shares: the two specs, the metric schedule that
moves from one to the other, the run sizes, and the frameworks with the modules each needs.

>>> FINE_TUNE
Spec(freeze('base'), unfreeze('base.block3'))
>>> QUICK.target_per_class < DEFAULT.target_per_class
True
>>> s = transfer_schedule(QUICK)
>>> s.rule.monitor, s.rule.max_epochs, s.lr
('val_loss', 4, (None, 0.0003))
>>> s.schedule([0, 3])
Schedule(phases=(Phase(epoch=0, spec=Spec(freeze('base'))...), Phase(epoch=3, spec=Spec(freeze('base'), unfreeze('base.block3')), lr=0.0003)))
>>> [planned_epochs(QUICK, phase, start) for phase, start in ((0, 0), (1, 3))]
[4, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..schedule import MetricSchedule
from ..spec import freeze

# The one spec of each phase, used unchanged by every framework.
FROZEN_BASE = freeze("base")
FINE_TUNE = FROZEN_BASE.unfreeze("base.block3")
# The two transfer phases, in order: the names the recorder, the table and the tests use.
TRANSFER = ("frozen", "fine-tune")
# What the metric schedule watches: the loss on the validation images held out of the
# target training data (never the test set), as Keras names it with validation data.
MONITOR = "val_loss"

# Each framework's runner (``<name>_run.py``) and the top-level modules it imports.
REQUIRES = {"torch": ("torch",), "keras": ("keras",), "flax": ("jax", "flax", "optax")}
FRAMEWORKS = tuple(REQUIRES)


@dataclass(frozen=True)
class Config:
    """Sizes, epochs and learning rates of a run (Adam everywhere)."""

    source_per_class: int = 250
    target_per_class: int = 40
    val_per_class: int = 8     # target images held out of training: the monitored validation loss
    test_per_class: int = 150
    pretrain_epochs: int = 5
    frozen_epochs: int = 8     # at most; the frozen phase ends earlier when val_loss stops improving
    finetune_epochs: int = 4   # at least: the fine-tune phase gets every epoch the frozen phase left
    min_frozen_epochs: int = 2
    patience: int = 1          # epochs without a better val_loss that end the frozen phase,
    min_delta: float = 0.05    # better meaning lower by more than this: the head's gains have slowed
    batch: int = 32
    lr: float = 2e-3           # pretraining, and the scratch baseline
    head_lr: float = 1e-2      # phase 1 and the random-base baseline: only the head trains
    finetune_lr: float = 3e-4  # phase 2
    finetune_bn: str = "frozen"  # every BatchNorm in inference mode (Keras guide); in phase 1 all are frozen anyway
    speed_pairs: int = 25      # interleaved frozen/full steps timed for the speed claim
    seed: int = 0
    threads: int = 2


DEFAULT = Config()
QUICK = replace(DEFAULT, source_per_class=150, target_per_class=32, test_per_class=100,
                pretrain_epochs=3, frozen_epochs=4, finetune_epochs=2, speed_pairs=15)


def transfer_schedule(cfg: Config) -> MetricSchedule:
    """The transfer phases as one :class:`~layerlock.MetricSchedule`, the same for every
    framework: :data:`FROZEN_BASE` until ``val_loss`` has not improved by more than
    ``cfg.min_delta`` for ``cfg.patience`` epochs (after ``cfg.min_frozen_epochs``, at most ``cfg.frozen_epochs``), then
    :data:`FINE_TUNE`, whose newly trainable block trains at ``cfg.finetune_lr`` (the head
    keeps its rate), for the rest of :func:`transfer_epochs`."""
    return MetricSchedule([FROZEN_BASE, FINE_TUNE], monitor=MONITOR, mode="min", patience=cfg.patience,
                          min_delta=cfg.min_delta, min_epochs=cfg.min_frozen_epochs, max_epochs=cfg.frozen_epochs,
                          lr={1: cfg.finetune_lr})


def transfer_epochs(cfg: Config) -> int:
    """The transfer's budget, both phases together (the scratch baseline's too).

    >>> transfer_epochs(QUICK)
    6
    """
    return cfg.frozen_epochs + cfg.finetune_epochs


def planned_epochs(cfg: Config, phase: int, start: int) -> int:
    """The most epochs transfer phase ``phase`` (0 or 1) can run when it begins at epoch
    ``start``: the frozen phase's ``max_epochs``, then what is left of the budget."""
    return cfg.frozen_epochs if phase == 0 else transfer_epochs(cfg) - start
