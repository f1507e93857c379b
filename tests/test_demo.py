"""`layerlock demo --quick` in a subprocess: transfer beats both baselines in every installed
framework (torch, Keras, Flax NNX), and every framework trains the same number of scalars in
each phase; the docs build with mkdocs --strict, and every code example in them runs."""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerlock.demo import installed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not installed():
        pytest.skip("the demo needs torch, keras or flax")
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "layerlock.cli", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
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
