"""Recording, tracing and reporting a demo run: the per-epoch trace with a progress bar,
the summary table, the JSON summary and the PNG of training curves; and a stderr free of
TensorFlow's start-up lines, for the demo and the ``layerlock`` command (:func:`import_keras`).

>>> rec = Recorder("torch", echo=None, progress=False)
>>> ph = rec.phase("frozen", "target", epochs=1, steps=2, trainable=260)
>>> ph.step(0.002, 0.004, 1.2); ph.step(0.004, 0.008, 1.0)
>>> ph.epoch(loss=1.1, acc=0.5, test_acc=0.6)
>>> ph.close(); round(ph.step_ms, 1), round(ph.cpu_ms, 1), ph.final_test_acc
(3.0, 6.0, 0.6)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from .._format import count, table

# What each phase is, for the table and the docs.
PHASES = {
    "pretrain": "whole model on the source classes",
    "frozen": "phase 1: conv base frozen, new head on the target classes, until val_loss stops improving",
    "fine-tune": "phase 2: top block unfrozen at a lower learning rate, for the rest of the budget",
    "random-base": "baseline: same head on a frozen, randomly initialised base",
    "scratch": "baseline: whole model from random init, same epochs as phases 1+2",
}


@dataclass
class Epoch:
    epoch: int
    loss: float
    acc: float
    test_acc: float
    step_ms: float
    cpu_ms: float
    trainable: int
    val_loss: float | None = None  # on the held-out validation images, where the phase has them


@dataclass
class Phase:
    """One training phase: its epochs and the step times of every step."""

    framework: str
    name: str
    data: str
    epochs_planned: int
    trainable: int
    start: int = 0  # the epoch (from 0, of its loop or fit) at which the phase began
    epochs: list[Epoch] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    _pending: list[float] = field(default_factory=list, repr=False)
    _pending_cpu: list[float] = field(default_factory=list, repr=False)
    _bar: Any = field(default=None, repr=False)
    _echo: Callable[[str], None] | None = field(default=None, repr=False)

    def step(self, seconds: float, cpu: float, loss: float | None = None) -> None:
        """Record one optimizer step (wall and process CPU seconds); advance the progress bar."""
        self._pending.append(seconds)
        self._pending_cpu.append(cpu)
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def epoch(self, *, loss: float, acc: float, test_acc: float, val_loss: float | None = None) -> None:
        """Close an epoch: store its metrics and the median step time, print the trace line."""
        self.step_times.extend(self._pending)
        self.cpu_times.extend(self._pending_cpu)
        ms, cpu = _median_ms(self._pending), _median_ms(self._pending_cpu)
        self._pending, self._pending_cpu = [], []
        e = Epoch(len(self.epochs) + 1, float(loss), float(acc), float(test_acc), ms, cpu, self.trainable,
                  None if val_loss is None else float(val_loss))
        self.epochs.append(e)
        val = "" if e.val_loss is None else f"  val loss {e.val_loss:6.3f}"
        line = (f"{self.framework:<6} {self.name:<11} epoch {e.epoch:>2}/{self.epochs_planned:<2}  "
                f"loss {e.loss:6.3f}  acc {e.acc:5.3f}{val}  test acc {e.test_acc:5.3f}  "
                f"trainable {count(self.trainable):>7}  step {ms:6.2f} ms (cpu {cpu:6.2f} ms)")
        if self._echo is not None:
            if self._bar is not None:
                self._bar.write(line)  # keeps the bar below the trace
            else:
                self._echo(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def step_ms(self) -> float:
        """Median wall time of a step over the phase, in ms (robust to the first, traced step)."""
        return _median_ms(self.step_times)

    @property
    def cpu_ms(self) -> float:
        """Median process CPU time of a step, in ms: the work a step costs, which other
        programs on a shared machine disturb far less than the wall time."""
        return _median_ms(self.cpu_times)

    @property
    def final_test_acc(self) -> float:
        return self.epochs[-1].test_acc if self.epochs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"framework": self.framework, "phase": self.name, "data": self.data,
                "what": PHASES.get(self.name, ""), "start_epoch": self.start, "epochs": [asdict(e) for e in self.epochs],
                "trainable": self.trainable, "steps": len(self.step_times), "step_ms": self.step_ms,
                "cpu_ms": self.cpu_ms,
                "final_loss": self.epochs[-1].loss if self.epochs else None,
                "final_acc": self.epochs[-1].acc if self.epochs else None,
                "final_test_acc": self.final_test_acc}


def _median_ms(seconds: list[float]) -> float:
    return 1000 * statistics.median(seconds) if seconds else float("nan")


def paired(frozen_step: Callable[[], object], full_step: Callable[[], object], pairs: int) -> dict[str, float]:
    """Time ``pairs`` alternating training steps of a frozen-base and a fully trainable model
    on the same batch. Alternating means that load from other programs hits both alike, so
    their ratio holds on a busy machine where per-phase timings drift.

    >>> r = paired(lambda: None, lambda: sum(range(20000)), pairs=5)
    >>> r["frozen_ms"] < r["full_ms"], r["pairs"]
    (True, 5)
    """
    import time

    frozen_step(), full_step()  # warm-up: traced or compiled functions are built here
    times: dict[str, list[float]] = {"frozen": [], "full": []}
    for _ in range(pairs):
        for name, step in (("frozen", frozen_step), ("full", full_step)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {"frozen_ms": _median_ms(times["frozen"]), "full_ms": _median_ms(times["full"]), "pairs": pairs}


class Recorder:
    """Collects the phases of one framework's run, its paired speed measurement, and the
    transfer's phase starts and transition lines (what the freeze scheduler logged).

    >>> rec = Recorder("torch", echo=None, progress=False)
    >>> rec.log("layerlock: epoch 3: phase 2/2 ...")
    >>> rec.starts = {"frozen": 0, "fine-tune": 3}
    >>> rec.transitions, rec.starts["fine-tune"]
    (['layerlock: epoch 3: phase 2/2 ...'], 3)
    """

    def __init__(self, framework: str, *, echo: Callable[[str], None] | None = print,
                 progress: bool = True) -> None:
        self.framework, self.echo, self.progress = framework, echo, progress
        self.phases: list[Phase] = []
        self.speed: dict[str, float] = {}
        self.starts: dict[str, int] = {}  # transfer phase -> the epoch it began (the scheduler's tracker.starts)
        self.transitions: list[str] = []

    def log(self, message: str) -> None:
        """A freeze scheduler's ``log=``: keep the transition line and print it with the trace."""
        self.transitions.append(message)
        if self.echo is not None:
            if self.progress:
                from tqdm.auto import tqdm

                tqdm.write(message)  # above the progress bar
            else:
                self.echo(message)

    def phase(self, name: str, data: str, *, epochs: int, steps: int, trainable: int, start: int = 0) -> Phase:
        """Start a phase of at most ``epochs`` epochs of ``steps`` steps each, begun at epoch
        ``start`` of its loop."""
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs * steps, desc=f"{self.framework} {name}", unit="step",
                       leave=False, dynamic_ncols=True)
        ph = Phase(self.framework, name, data, epochs, trainable, start, _bar=bar, _echo=self.echo)
        self.phases.append(ph)
        return ph

    def get(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def verdict(rec: Recorder) -> dict[str, Any]:
    """The two claims the demo makes, with the numbers behind them."""
    frozen, fine, scratch, rand = (rec.get(n) for n in ("frozen", "fine-tune", "scratch", "random-base"))
    return {
        "transfer_test_acc": fine.final_test_acc,
        "frozen_test_acc": frozen.final_test_acc,
        "scratch_test_acc": scratch.final_test_acc,
        "random_base_test_acc": rand.final_test_acc,
        "transfer_beats_scratch": fine.final_test_acc > scratch.final_test_acc,
        "frozen_head_beats_random_base": frozen.final_test_acc > rand.final_test_acc,
        "frozen_step_ms": frozen.step_ms,
        "full_step_ms": scratch.step_ms,
        "frozen_cpu_ms": frozen.cpu_ms,
        "full_cpu_ms": scratch.cpu_ms,
        "frozen_speedup": scratch.step_ms / frozen.step_ms,
        "frozen_cpu_speedup": scratch.cpu_ms / frozen.cpu_ms,
        "paired_frozen_ms": rec.speed.get("frozen_ms"),
        "paired_full_ms": rec.speed.get("full_ms"),
        "paired_speedup": rec.speed["full_ms"] / rec.speed["frozen_ms"] if rec.speed else None,
        "frozen_faster": rec.speed["frozen_ms"] < rec.speed["full_ms"] if rec.speed else frozen.step_ms < scratch.step_ms,
        "frozen_trainable": frozen.trainable,
        "full_trainable": scratch.trainable,
        "frozen_epochs": len(frozen.epochs),
        "finetune_epochs": len(fine.epochs),
        "phase_starts": dict(rec.starts),
    }


def summary_table(runs: dict[str, Recorder]) -> str:
    """One row per framework and phase, then one verdict line per framework."""
    rows = []
    for rec in runs.values():
        for p in rec.phases:
            rows.append((rec.framework, p.name, p.data, len(p.epochs), count(p.trainable),
                         f"{p.step_ms:.2f}", f"{p.cpu_ms:.2f}", f"{p.epochs[-1].loss:.3f}", f"{p.epochs[-1].acc:.3f}",
                         f"{p.final_test_acc:.3f}"))
    text = [table(("framework", "phase", "data", "epochs", "trainable", "step ms", "cpu ms", "loss",
                   "train acc", "test acc"), rows, right=(3, 4, 5, 6, 7, 8, 9))]
    for rec in runs.values():
        v = verdict(rec)
        text.append(
            f"{rec.framework}: transfer {v['transfer_test_acc']:.3f} vs scratch {v['scratch_test_acc']:.3f} "
            f"({'better' if v['transfer_beats_scratch'] else 'NOT better'}); frozen head "
            f"{v['frozen_test_acc']:.3f} vs same head on a random base {v['random_base_test_acc']:.3f}; "
            f"frozen step {v['frozen_step_ms']:.2f} ms vs full {v['full_step_ms']:.2f} ms in training, "
            f"{v['paired_frozen_ms']:.2f} vs {v['paired_full_ms']:.2f} ms interleaved "
            f"({v['paired_speedup']:.1f}x faster), training {count(v['frozen_trainable'])} of "
            f"{count(v['full_trainable'])} scalars; frozen for {v['frozen_epochs']} epochs, then fine-tune for "
            f"{v['finetune_epochs']} ({reason(rec)})")
    text.append(agreement_line(runs))
    return "\n".join(text)


def reason(rec: Recorder) -> str:
    """Why the fine-tune phase began: the start of the scheduler's line for it.

    >>> rec = Recorder("torch", echo=None, progress=False)
    >>> rec.log("layerlock: epoch 3: val_loss did not improve on 0.5 (epoch 1) for 1 epoch: phase 2/2 ...")
    >>> rec.starts = {"frozen": 0, "fine-tune": 3}
    >>> reason(rec)
    'val_loss did not improve on 0.5 (epoch 1) for 1 epoch'
    """
    start = rec.starts.get("fine-tune")
    for line in rec.transitions:
        head = f"epoch {start}: "
        if start is not None and head in line:
            return line.split(head, 1)[1].split(": phase", 1)[0]
    return "no transition logged"


def trainable_by_phase(runs: dict[str, Recorder]) -> dict[str, dict[str, int]]:
    """``{phase: {framework: trainable scalars}}``, phases in run order.

    >>> a, b = Recorder("torch", echo=None, progress=False), Recorder("flax", echo=None, progress=False)
    >>> _ = a.phase("frozen", "target", epochs=1, steps=1, trainable=260)
    >>> _ = b.phase("frozen", "target", epochs=1, steps=1, trainable=260)
    >>> trainable_by_phase({"torch": a, "flax": b})
    {'frozen': {'torch': 260, 'flax': 260}}
    """
    out: dict[str, dict[str, int]] = {}
    for rec in runs.values():
        for p in rec.phases:
            out.setdefault(p.name, {})[rec.framework] = p.trainable
    return out


def agreement_line(runs: dict[str, Recorder]) -> str:
    """Whether every framework trained the same number of scalars in each phase (the same
    spec on the same architecture must select the same parameters), with the counts.

    >>> a, b = Recorder("torch", echo=None, progress=False), Recorder("flax", echo=None, progress=False)
    >>> _ = a.phase("frozen", "target", epochs=1, steps=1, trainable=260)
    >>> _ = b.phase("frozen", "target", epochs=1, steps=1, trainable=260)
    >>> agreement_line({"torch": a, "flax": b})
    'same trainable scalars in torch and flax, phase by phase: frozen 260'
    >>> _ = b.phase("scratch", "target", epochs=1, steps=1, trainable=9)
    >>> agreement_line({"torch": a, "flax": b})
    'trainable scalars DIFFER between frameworks: scratch torch -, flax 9; the same in frozen 260'
    """
    phases = trainable_by_phase(runs)
    names = [rec.framework for rec in runs.values()]
    same = {p: next(iter(c.values())) for p, c in phases.items() if len(c) == len(names) and len(set(c.values())) == 1}
    counts = " / ".join(f"{p} {count(n)}" for p, n in same.items())
    if len(same) == len(phases):
        if len(names) == 1:
            return f"trainable scalars in {names[0]}, phase by phase: {counts}"
        return f"same trainable scalars in {', '.join(names[:-1])} and {names[-1]}, phase by phase: {counts}"
    differ = "; ".join(f"{p} " + ", ".join(f"{f} {count(c[f]) if f in c else '-'}" for f in names)
                       for p, c in phases.items() if p not in same)
    return f"trainable scalars DIFFER between frameworks: {differ}" + (f"; the same in {counts}" if same else "")


def write_json(runs: dict[str, Recorder], config: dict[str, Any], path: Path) -> None:
    phases = trainable_by_phase(runs)
    data = {"config": config,
            "trainable": {"same": all(len(set(c.values())) == 1 and len(c) == len(runs) for c in phases.values()),
                          "phases": phases, "line": agreement_line(runs)},
            "runs": {name: {"phases": [p.to_dict() for p in rec.phases], "verdict": verdict(rec),
                            "phase_starts": dict(rec.starts), "transitions": list(rec.transitions)}
                     for name, rec in runs.items()}}
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot(runs: dict[str, Recorder], path: Path) -> None:
    """Test accuracy and training loss per epoch of each target phase (the transfer phases
    end to end, a dotted line at each epoch where one began, the monitored validation loss
    dashed) and the median step time of each phase (one scale for all), one row per framework."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 3, figsize=(14, 3.6 * len(runs)), squeeze=False)
    colours = {"frozen": "C0", "fine-tune": "C2", "random-base": "C7", "scratch": "C3", "pretrain": "C1"}
    for row, rec in zip(axes, runs.values()):
        acc_ax, loss_ax, time_ax = row
        for p in rec.phases:
            if p.data != "target":
                continue
            xs = [p.start + e.epoch for e in p.epochs]  # epochs counted from 1 along the transfer run
            acc_ax.plot(xs, [e.test_acc for e in p.epochs], "o-", color=colours[p.name], label=p.name)
            loss_ax.plot(xs, [e.loss for e in p.epochs], "o-", color=colours[p.name], label=p.name)
            if p.name in rec.starts and any(e.val_loss is not None for e in p.epochs):  # what the schedule watched
                loss_ax.plot(xs, [e.val_loss for e in p.epochs], "s--", color=colours[p.name], alpha=0.6,
                             markersize=4, label="val_loss (monitored)" if p.name == "frozen" else None)
        for name, start in rec.starts.items():  # where each transfer phase began, between two epochs
            for ax in (acc_ax, loss_ax):
                ax.axvline(start + 0.5, color=colours[name], linestyle=":", linewidth=1.5)
                ax.annotate(f"{name} from epoch {start + 1}", (start + 0.5, 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -3), textcoords="offset points", va="top", fontsize=7, color=colours[name],
                            rotation=90)
        acc_ax.set(title=f"{rec.framework}: target test accuracy", xlabel="epoch", ylim=(0, 1.02))
        loss_ax.set(title=f"{rec.framework}: target loss (training; validation dashed)", xlabel="epoch")
        acc_ax.legend(fontsize=8, loc="lower right")
        loss_ax.legend(fontsize=7, loc="best")
        names = [p.name for p in rec.phases]
        time_ax.bar(names, [p.step_ms for p in rec.phases], color=[colours[n] for n in names])
        time_ax.set(title=f"{rec.framework}: median wall time per step (ms)")
        time_ax.tick_params(axis="x", labelsize=8)
    slowest = max((p.step_ms for rec in runs.values() for p in rec.phases if p.step_ms == p.step_ms), default=0)
    for row in axes:  # one time scale for every framework, so that the rows compare at a glance
        row[2].set_ylim(0, 1.1 * slowest or None)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# TensorFlow's start-up lines. TF_CPP_MIN_LOG_LEVEL=2 stops its C++ info and warning lines but
# keeps its errors; it cannot stop the lines written before TensorFlow's logging starts
# (TensorFlow 2.21 prints "oneDNN custom operations are on" twice that way).
STARTUP = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|Could not find cuda drivers on your machine")


def import_keras() -> ModuleType:
    """``import keras`` for a program whose stderr a person reads (the demo, the command
    line; the library never calls this). While Keras and TensorFlow load, file descriptor 2
    (where C++ writes too) goes to a temporary file; then the :data:`STARTUP` lines are dropped
    and everything else is written back. oneDNN stays on: numerics do not change.
    ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything, unfiltered (say, for a crash while
    TensorFlow loads, which the temporary file would swallow).

    >>> import_keras().__name__
    'keras'
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return importlib.import_module("keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            return importlib.import_module("keras")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not STARTUP.search(line)))
