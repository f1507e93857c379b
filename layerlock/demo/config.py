"""What every framework's half of the demo shares: the two specs, the run sizes, and the
frameworks with the modules each needs.

>>> FINE_TUNE
Spec(freeze('base'), unfreeze('base.block3'))
>>> QUICK.target_per_class < DEFAULT.target_per_class
True
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..spec import freeze

# The one spec of each phase, used unchanged by every framework.
FROZEN_BASE = freeze("base")
FINE_TUNE = FROZEN_BASE.unfreeze("base.block3")

# Each framework's runner (``<name>_run.py``) and the top-level modules it imports.
REQUIRES = {"torch": ("torch",), "keras": ("keras",), "flax": ("jax", "flax", "optax")}
FRAMEWORKS = tuple(REQUIRES)


@dataclass(frozen=True)
class Config:
    """Sizes, epochs and learning rates of a run (Adam everywhere)."""

    source_per_class: int = 250
    target_per_class: int = 40
    test_per_class: int = 150
    pretrain_epochs: int = 5
    frozen_epochs: int = 8
    finetune_epochs: int = 4
    batch: int = 32
    lr: float = 2e-3           # pretraining, and the scratch baseline
    head_lr: float = 1e-2      # phase 1 and the random-base baseline: only the head trains
    finetune_lr: float = 3e-4  # phase 2
    finetune_bn: str = "frozen"  # phase 2 keeps every BatchNorm in inference mode (Keras guide)
    speed_pairs: int = 25      # interleaved frozen/full steps timed for the speed claim
    seed: int = 0
    threads: int = 2


DEFAULT = Config()
QUICK = replace(DEFAULT, source_per_class=150, target_per_class=32, test_per_class=100,
                pretrain_epochs=3, frozen_epochs=4, finetune_epochs=2, speed_pairs=15)
