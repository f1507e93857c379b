"""`layerlock demo --quick` in a subprocess: transfer beats both baselines in every installed
framework (torch, Keras, Flax NNX), every framework trains the same number of scalars in
each phase, and one metric schedule ends the frozen phase on the validation loss; the docs build with mkdocs --strict, and every code example in them runs."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerlock.demo import installed

from tests.test_quiet import TF_LINES, clean_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not installed():
        pytest.skip("the demo needs torch, keras or flax")
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "layerlock.cli", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=240, env=clean_env())  # no TF_CPP_MIN_LOG_LEVEL
    assert result.returncode == 0, result.stderr[-3000:]
    assert not TF_LINES.search(result.stderr), result.stderr[-3000:]  # TensorFlow's start-up lines stay off stderr
    summary = json.loads((out / "summary.json").read_text())
    print(result.stdout[-3000:])  # the table and the timings, shown with pytest -s
    return out, summary, result.stdout


def test_demo_runs_every_installed_framework_and_writes_its_outputs(demo):
    out, summary, stdout = demo
    assert sorted(summary["runs"]) == sorted(installed())
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "summary.txt").read_text().strip() in stdout
    for name, run in summary["runs"].items():
        phases = [p["phase"] for p in run["phases"]]
        assert phases == ["pretrain", "frozen", "fine-tune", "random-base", "scratch"], name
        for p in run["phases"]:
            assert len(p["epochs"]) >= 2 and all(e["step_ms"] > 0 for e in p["epochs"])


def test_the_flax_run_is_part_of_the_demo_when_jax_is_installed(demo):
    if not all(importlib.util.find_spec(m) for m in ("jax", "flax", "optax")):
        pytest.skip("jax, flax and optax are not all installed")
    assert "flax" in installed() and "flax" in demo[1]["runs"]


def test_every_framework_trains_the_same_scalars_in_each_phase(demo):
    _, summary, stdout = demo
    runs = summary["runs"]
    phases = summary["trainable"]["phases"]
    assert list(phases) == ["pretrain", "frozen", "fine-tune", "random-base", "scratch"]
    for name, counts in phases.items():
        # The same spec on the same architecture selects the same parameters everywhere.
        assert counts == {f: next(iter(counts.values())) for f in runs}, (name, counts)
        for f, run in runs.items():
            assert counts[f] == next(p["trainable"] for p in run["phases"] if p["phase"] == name)
    assert summary["trainable"]["same"] is True
    # phase 1 trains the new head, phase 2 also the top block's conv (bn="frozen" holds its BatchNorm)
    assert (phases["frozen"][next(iter(runs))], phases["fine-tune"][next(iter(runs))]) == (260, 260 + 18_496)
    line = summary["trainable"]["line"]
    assert line in stdout
    if len(runs) > 1:
        assert line.startswith("same trainable scalars in ") and all(f in line for f in runs), line
        assert "frozen 260 / fine-tune 18,756" in line, line


def test_transfer_beats_training_from_scratch_and_the_random_base(demo):
    for name, run in demo[1]["runs"].items():
        v = run["verdict"]
        # Seeded data and models: the margins are ~0.4 on every run we have seen.
        assert v["transfer_test_acc"] > v["scratch_test_acc"] + 0.15, (name, v)
        assert v["frozen_test_acc"] > v["random_base_test_acc"] + 0.15, (name, v)


def test_the_frozen_phase_trains_a_small_fraction_and_steps_faster(demo):
    for name, run in demo[1]["runs"].items():
        v = run["verdict"]
        phases = {p["phase"]: p for p in run["phases"]}
        # What makes the frozen step cheaper, exactly: no backward pass or update for the base.
        assert v["frozen_trainable"] * 50 < v["full_trainable"], (name, v)
        assert phases["frozen"]["trainable"] < phases["fine-tune"]["trainable"] < phases["scratch"]["trainable"]
        # Timings are reported, not asserted: other programs on a CI machine can skew them.
        print(f"{name}: frozen {v['paired_frozen_ms']:.2f} ms vs full {v['paired_full_ms']:.2f} ms per step")


def test_the_frozen_phase_ends_on_the_validation_loss_and_fine_tune_gets_the_rest(demo):
    import layerlock as ll
    from layerlock.demo.config import QUICK, TRANSFER, transfer_schedule
    from layerlock.stepper import PlateauTracker

    _, summary, stdout = demo
    given = ll.MetricSchedule.from_dict(summary["config"]["schedule"])
    assert given == transfer_schedule(QUICK)  # one spec, written once, for every framework
    assert (given.rule.monitor, given.rule.max_epochs, given.lr) == ("val_loss", QUICK.frozen_epochs,
                                                                    (None, QUICK.finetune_lr))
    total = QUICK.frozen_epochs + QUICK.finetune_epochs
    for name, run in summary["runs"].items():
        phases = {p["phase"]: p for p in run["phases"]}
        starts = run["phase_starts"]
        assert list(starts) == list(TRANSFER) and starts["frozen"] == 0, (name, starts)
        frozen, fine = phases["frozen"], phases["fine-tune"]
        # Each phase is recorded from the epoch the scheduler began it, within the one budget.
        assert (frozen["start_epoch"], fine["start_epoch"]) == (0, starts["fine-tune"]), name
        assert QUICK.min_frozen_epochs <= len(frozen["epochs"]) == starts["fine-tune"] <= QUICK.frozen_epochs
        assert len(fine["epochs"]) == total - starts["fine-tune"] >= QUICK.finetune_epochs, name
        assert run["verdict"]["phase_starts"] == starts
        # The recorded validation losses, fed to the rule again, end the frozen phase at the same epoch.
        tracker = PlateauTracker(given)
        for e, epoch in enumerate(frozen["epochs"] + fine["epochs"]):
            assert epoch["val_loss"] is not None and epoch["val_loss"] > 0, (name, epoch)
            tracker.observe(e, {"val_loss": epoch["val_loss"]})
        assert tracker.starts == [starts["frozen"], starts["fine-tune"]], (name, tracker.starts, starts)
        # The scheduler's own line for the change, with what decided it, is in the trace and the summary.
        line = next(t for t in run["transitions"] if t.startswith(f"layerlock: epoch {starts['fine-tune']}: "))
        assert "phase 2/2" in line and line in stdout, line
        assert "did not improve" in line or "max_epochs" in line, line


def test_the_validation_images_are_held_out_of_training_and_apart_from_the_test_set():
    from layerlock.demo.data import split

    s = split("target", 6, 5, seed=3, val_per_class=2)
    assert (len(s.y), len(s.y_val), len(s.y_test)) == (24, 8, 20)
    assert sorted(s.y_val.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    train, val, test = ({x.tobytes() for x in xs} for xs in (s.x, s.x_val, s.x_test))
    assert not (train & val) and not (train & test) and not (val & test)
    whole = split("target", 8, 5, seed=3)  # the same draw: the validation images are carved out of it
    assert train | val == {x.tobytes() for x in whole.x}


def test_curves_mark_where_each_transfer_phase_began(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from layerlock.demo import report

    runs = {}
    for framework, switch in (("torch", 3), ("flax", 2)):
        rec = report.Recorder(framework, echo=None, progress=False)
        for name, start, epochs in (("frozen", 0, switch), ("fine-tune", switch, 5 - switch), ("scratch", 0, 5)):
            ph = rec.phase(name, "target", epochs=epochs, steps=1, trainable=10, start=start)
            for _ in range(epochs):
                ph.step(0.01, 0.01)
                ph.epoch(loss=1.0, acc=0.5, test_acc=0.5, val_loss=1.1 if name != "scratch" else None)
        rec.starts = {"frozen": 0, "fine-tune": switch}
        runs[framework] = rec
    marks: list[float] = []
    real = Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda self, x=0, *a, **k: marks.append(x) or real(self, x, *a, **k))
    report.plot(runs, tmp_path / "curves.png")
    # on the accuracy and the loss panel of each framework: its two phase starts, between two epochs
    assert sorted(marks) == sorted([0.5, 3.5] * 2 + [0.5, 2.5] * 2)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_demo_rejects_a_framework_that_is_missing(monkeypatch, capsys):
    from layerlock import cli, demo as demo_module

    monkeypatch.setattr(demo_module, "installed", lambda: [])
    assert cli.main(["demo", "--backend", "torch", "--out", "unused"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_docs_build_with_mkdocs_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    shutil.rmtree(tmp_path / "site")


DOC_PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_examples_run(page, capsys):
    """`>>>` examples pass as doctests; every other ```python block runs, in page order."""
    path = ROOT / "docs" / page
    text = path.read_text()
    for framework in ("torch", "keras", "transformers", "flax", "equinox"):
        if re.search(rf"^(>>> )?(import|from) {framework}\b", text, re.M):
            pytest.importorskip(framework)
    if "init_process_group" in text:
        # A process group's threads can hang in the DDP destructor once the test's namespace
        # is freed: run the page in its own process, which exits without running destructors.
        code = f"import os, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
               f"import test_demo as t; t.run_page({str(path)!r}); os._exit(0)"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    else:
        run_page(str(path))


def run_page(path: str) -> None:
    """Doctest the page, then run its other python blocks in order in one namespace."""
    failures, _ = doctest.testfile(path, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert failures == 0
    namespace: dict[str, object] = {"__name__": f"docs_{Path(path).stem}"}
    for block in re.findall(r"```python\n(.*?)```", Path(path).read_text(), re.S):
        if ">>>" not in block:
            exec(compile(block, path, "exec"), namespace)
