"""The transfer-learning demo behind ``layerlock demo``.

Pretrain a small CNN on the *source* classes; phase 1 freezes its conv base and trains a
new head on different *target* classes until the loss on held-out target images stops
improving; phase 2 then unfreezes the top block and fine-tunes it at a lower learning rate
for the rest of the budget. Two baselines get the same budget: the same head on a frozen
*random* base, and the whole model trained from scratch. The same two specs and the same
metric schedule, defined once in :mod:`.config`, drive PyTorch, Keras and Flax NNX, whose
models name their layers identically.

>>> FRAMEWORKS
('torch', 'keras', 'flax')
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import LayerlockError
from .config import DEFAULT, FRAMEWORKS, QUICK, REQUIRES, transfer_schedule


def installed() -> list[str]:
    """Frameworks whose modules are all importable here, found without importing them.

    >>> set(installed()) <= set(FRAMEWORKS)
    True
    """
    return [f for f in FRAMEWORKS if all(importlib.util.find_spec(m) is not None for m in REQUIRES[f])]


def run(frameworks: list[str], *, quick: bool = False, out: str | Path = "layerlock-demo",
        progress: bool = True, echo: Any = print) -> dict[str, Any]:
    """Run the demo for each framework; write ``summary.json``, ``summary.txt`` and
    ``curves.png`` to ``out``; return the paths and the summary table."""
    from . import report
    from .data import split

    cfg = QUICK if quick else DEFAULT
    missing = [f for f in frameworks if f not in installed()]
    if missing:
        raise LayerlockError(f"the demo needs {', '.join(missing)}, which is not installed here; "
                             f"installed: {', '.join(installed()) or 'none'} "
                             "(pip install 'layerlock[torch]', 'layerlock[tensorflow]' or 'layerlock[jax]')")
    # OpenMP threads that spin while they wait make torch 10-30x slower on a busy machine
    # (measured: 480 ms instead of 16 ms per step); sleeping costs little when it is idle.
    # It only counts if set before torch is imported, which the runners do lazily.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = split("source", cfg.source_per_class, cfg.test_per_class // 2, seed=cfg.seed)
    target = split("target", cfg.target_per_class, cfg.test_per_class, seed=cfg.seed + 1,
                   val_per_class=cfg.val_per_class)
    schedule = transfer_schedule(cfg)
    if echo:
        rule = schedule.rule
        echo(f"layerlock demo: source {len(source.y)} images / {source.classes} classes, target "
             f"{len(target.y)} training + {len(target.y_val)} validation images / {target.classes} classes, "
             f"{len(target.y_test)} test images ({'quick' if quick else 'default'} run; phase 1 spec "
             f"{schedule.specs[0]!r} until {rule.monitor} has not improved for {rule.patience} epoch(s) "
             f"({rule.min_epochs} to {rule.max_epochs} epochs), then phase 2 {schedule.specs[1]!r} at lr "
             f"{schedule.lr[1]:g} for the rest of {cfg.frozen_epochs + cfg.finetune_epochs} epochs)")
    runs: dict[str, report.Recorder] = {}
    seconds: dict[str, float] = {}
    for name in frameworks:
        start = time.perf_counter()
        module = importlib.import_module(f"{__name__}.{name}_run")
        rec = report.Recorder(name, echo=echo, progress=progress)
        module.run(cfg, source, target, rec)
        runs[name] = rec
        seconds[name] = time.perf_counter() - start
    table = report.summary_table(runs)
    config = {**asdict(cfg), "quick": quick, "frameworks": frameworks, "seconds": seconds,
              "specs": {"frozen": schedule.specs[0].to_dict(), "fine-tune": schedule.specs[1].to_dict()},
              "schedule": schedule.to_dict(),
              "python": sys.version.split()[0]}
    report.write_json(runs, config, out / "summary.json")
    (out / "summary.txt").write_text(table + "\n")
    report.plot(runs, out / "curves.png")
    return {"table": table, "json": out / "summary.json", "png": out / "curves.png", "seconds": seconds}
