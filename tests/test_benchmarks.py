"""The benchmark code runs on a tiny grid and writes valid results and docs.
Nothing here asserts a timing: benchmarks measure and report, tests check plumbing."""

import json

import pytest

from benchmarks import measure, report


def test_interleave_gives_every_mode_its_samples_and_summary():
    calls = []
    steps = {m: (lambda m=m: calls.append(m)) for m in ("full", "layerlock", "hand")}
    out = measure.interleave(steps, reps=3, warmup=1, target_s=0.0)
    assert set(out) == set(steps)
    assert all(len(r["samples_s"]) == 3 and r["q1"] <= r["median"] <= r["q3"] for r in out.values())
    assert set(measure.ratios(out)) == {"layerlock/hand", "frozen/full"}


def test_cli_rejects_an_unknown_section():
    from benchmarks.__main__ import parse

    with pytest.raises(SystemExit):
        parse(["--only", "torch,mxnet"])


def test_jax_is_a_step_suite_of_the_full_run():
    from benchmarks.__main__ import SECTIONS, parse

    assert "jax" in SECTIONS and parse(["--only", "jax"]).only == ["jax"]


def test_every_backend_is_a_step_suite_of_the_full_run():
    from benchmarks.__main__ import STEP_SUITES, parse
    from benchmarks.report import SUITE_TITLES
    from benchmarks.worker import SUITES

    every = ("torch", "keras-tf", "keras-torch", "keras-jax", "jax", "equinox")
    assert set(STEP_SUITES) == set(SUITES) == set(SUITE_TITLES) == set(every)
    assert parse(["--only", "keras-jax,equinox"]).only == ["keras-jax", "equinox"]
    assert set(every) <= set(parse([]).only)


def _results(steps: dict) -> dict:
    return {"meta": {"date": "now", "quick": True, "device": "cpu", "device_name": "test cpu",
                     "machine": {"cores": 2, "load_avg_start": None}, "versions": {"python": "3"},
                     "threads": 1, "omp_wait_policy": "PASSIVE", "load_avg_end": None},
            "steps": steps, "memory": {}, "import": {}, "apply": {}}


def test_tiny_torch_grid_writes_json_and_docs(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from benchmarks import overhead, worker

    steps_json = tmp_path / "steps.json"
    worker.main(["steps", "torch", str(steps_json), "--quick", "--reps", "2", "--warmup", "1",
                 "--threads", "1", "--cases", "cnn"])
    steps = json.loads(steps_json.read_text())
    modes = steps["cases"]["cnn"]["modes"]
    assert set(modes) == set(measure.MODES)
    assert all(len(m["samples_s"]) == 2 for m in modes.values())

    results = {
        "meta": {"date": "now", "quick": True, "device": "cpu", "device_name": "test cpu",
                 "machine": {"cores": 2, "load_avg_start": None}, "versions": {"python": "3"},
                 "threads": 1, "omp_wait_policy": "PASSIVE", "load_avg_end": None},
        "steps": {"torch": steps, "keras-tf": {"error": "tensorflow not installed"}},
        "memory": {}, "import": {},
        "apply": {"torch": overhead.run("torch", True, sizes=(100, 1_000), real=False)},
    }
    (tmp_path / "cpu.json").write_text(json.dumps(results))
    docs = report.write(tmp_path, tmp_path / "docs")
    text = docs.read_text()
    assert "## CPU" in text and "No GPU figures have been measured yet" in text
    assert "Not run: tensorflow not installed" in text
    assert (tmp_path / "docs" / "img" / "bench-cpu-steps.png").stat().st_size > 0
    assert (tmp_path / "docs" / "img" / "bench-cpu-apply.png").stat().st_size > 0


def test_a_partial_run_replaces_only_its_sections():
    from benchmarks.__main__ import merge

    old = {"meta": {"date": "d1", "versions": {}, "elapsed_s": {"steps torch": 80}},
           "steps": {"torch": {"cases": 1}}, "memory": {"torch": {}}, "apply": {"torch": "old"}, "import": {"x": 1}}
    new = {"meta": {"date": "d2", "versions": {"torch": "2"}, "elapsed_s": {"apply torch": 20, "total": 20}},
           "steps": {}, "memory": {}, "apply": {"torch": "new"}, "import": {}}
    out = merge(old, new, ["apply"])
    assert out["apply"] == {"torch": "new"} and out["steps"] == {"torch": {"cases": 1}} and out["import"] == {"x": 1}
    assert out["meta"]["measured"] == {"apply": "d2"} and out["meta"]["elapsed_s"] == {"steps torch": 80, "apply torch": 20}


def test_tiny_jax_grid_records_modes_ratios_and_optimizer_bytes(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    from benchmarks import jax_cases, worker

    steps_json = tmp_path / "steps.json"
    worker.main(["steps", "jax", str(steps_json), "--quick", "--reps", "2", "--warmup", "1",
                 "--cases", "transformer"])
    steps = json.loads(steps_json.read_text())
    case = steps["cases"]["transformer"]
    assert set(case["modes"]) == set(jax_cases.MODES)
    assert all(len(m["samples_s"]) == 2 for m in case["modes"].values())
    assert {"frozen/full", "frozen/limit", "mask/layerlock", "opt-state layerlock/full"} <= set(case["ratios"])
    # adamw: two moments per trainable leaf, none for frozen leaves (plumbing, not timing)
    full, frozen = case["modes"]["full"], case["modes"]["layerlock"]
    assert frozen["param_bytes"]["trainable"] < frozen["param_bytes"]["all"] == full["param_bytes"]["all"]
    assert 2 * frozen["param_bytes"]["trainable"] <= frozen["opt_state_bytes"] < 2 * frozen["param_bytes"]["trainable"] + 64
    assert case["modes"]["mask"]["opt_state_bytes"] == case["modes"]["limit"]["opt_state_bytes"] == frozen["opt_state_bytes"]

    results = {
        "meta": {"date": "now", "quick": True, "device": "cpu", "device_name": "test cpu",
                 "machine": {"cores": 2, "load_avg_start": None}, "versions": {"python": "3"},
                 "threads": 1, "omp_wait_policy": "PASSIVE", "load_avg_end": None},
        "steps": {"jax": steps}, "memory": {}, "import": {}, "apply": {},
    }
    (tmp_path / "cpu.json").write_text(json.dumps(results))
    text = report.write(tmp_path, tmp_path / "docs").read_text()
    assert "### Step time: JAX (Flax NNX)" in text and "optax mask only" in text
    assert "layerlock ÷ limit ≤ 1.02 (JAX)" in text and "optimizer-state bytes, layerlock ÷ full" in text


def test_a_partial_run_of_new_suites_keeps_the_other_suites_rows():
    from benchmarks.__main__ import merge

    old = {"meta": {"date": "d1", "versions": {}, "elapsed_s": {}},
           "steps": {"torch": {"cases": 1}, "jax": {"cases": 2}}, "memory": {"torch": {"cnn": {}}},
           "apply": {}, "import": {}}
    new = {"meta": {"date": "d2", "versions": {}, "elapsed_s": {"steps equinox": 5, "total": 5},
                    "machine": {"load_avg_start": [1.5, 1, 1]}, "load_avg_end": [4.5, 2, 1]},
           "steps": {"keras-jax": {"cases": 3}, "equinox": {"cases": 4}}, "memory": {"equinox": {"cnn": {}}},
           "apply": {}, "import": {}}
    out = merge(old, new, ["keras-jax", "equinox"])
    assert out["steps"] == {"torch": {"cases": 1}, "jax": {"cases": 2}, "keras-jax": {"cases": 3},
                            "equinox": {"cases": 4}}
    assert out["memory"] == {"torch": {"cnn": {}}, "keras-jax": {}, "equinox": {"cnn": {}}}
    # a section measured on a busier machine says so in the report
    assert out["meta"]["load_avg_by_section"] == {"keras-jax": [1.5, 4.5], "equinox": [1.5, 4.5]}


@pytest.mark.slow  # a longer variant: the torch and JAX grids run in make test
def test_tiny_keras_jax_grid_runs_in_its_own_process_and_renders(tmp_path):
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    pytest.importorskip("matplotlib")
    import subprocess
    import sys

    from benchmarks.__main__ import ROOT, worker_env

    steps_json = tmp_path / "steps.json"
    subprocess.run([sys.executable, "-m", "benchmarks.worker", "steps", "keras-jax", str(steps_json), "--quick",
                    "--reps", "2", "--warmup", "1", "--threads", "1", "--cases", "cnn"],
                   env=worker_env("keras-jax", "cpu"), cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    steps = json.loads(steps_json.read_text())
    case = steps["cases"]["cnn"]
    assert set(case["modes"]) == {"full", "layerlock", "hand", "limit", "layerlock_eval", "features"}
    assert all(len(m["samples_s"]) == 2 for m in case["modes"].values())
    assert {"layerlock/hand", "frozen/limit", "opt-state layerlock/full"} <= set(case["ratios"])
    # SGD momentum: one buffer per trainable variable, plus the iteration counter
    frozen = case["modes"]["layerlock"]
    assert frozen["param_bytes"]["trainable"] < frozen["param_bytes"]["all"]
    assert frozen["param_bytes"]["trainable"] <= frozen["opt_state_bytes"] < frozen["param_bytes"]["trainable"] + 64
    assert case["modes"]["hand"]["opt_state_bytes"] == frozen["opt_state_bytes"]

    (tmp_path / "cpu.json").write_text(json.dumps(_results({"keras-jax": steps})))
    text = report.write(tmp_path, tmp_path / "docs").read_text()
    assert "### Step time: Keras 3 on JAX" in text
    assert "layerlock ÷ hand step time = 1.00 ± 0.03 (Keras 3 on JAX)" in text
    assert "(+1%, Keras 3 on JAX)" in text


@pytest.mark.slow  # a longer variant: the torch and JAX grids run in make test
def test_tiny_equinox_grid_records_modes_ratios_and_optimizer_bytes(tmp_path):
    pytest.importorskip("equinox")
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    from benchmarks import equinox_cases, worker

    steps_json = tmp_path / "steps.json"
    worker.main(["steps", "equinox", str(steps_json), "--quick", "--reps", "2", "--warmup", "1",
                 "--cases", "cnn"])
    steps = json.loads(steps_json.read_text())
    case = steps["cases"]["cnn"]
    assert set(case["modes"]) == set(equinox_cases.MODES)
    assert all(len(m["samples_s"]) == 2 for m in case["modes"].values())
    assert {"layerlock/hand", "frozen/limit", "mask/layerlock", "mask/hand mask",
            "opt-state layerlock/full"} <= set(case["ratios"])
    # adamw: two moments per trainable leaf, none for frozen leaves, in every frozen mode
    frozen = case["modes"]["layerlock"]
    assert frozen["param_bytes"]["trainable"] < frozen["param_bytes"]["all"] == case["modes"]["full"]["param_bytes"]["all"]
    assert 2 * frozen["param_bytes"]["trainable"] <= frozen["opt_state_bytes"] < 2 * frozen["param_bytes"]["trainable"] + 64
    assert len({case["modes"][m]["opt_state_bytes"] for m in equinox_cases.MODES if m != "full"}) == 1

    (tmp_path / "cpu.json").write_text(json.dumps(_results({"equinox": steps})))
    text = report.write(tmp_path, tmp_path / "docs").read_text()
    assert "### Step time: JAX (Equinox, optax)" in text and "hand-written optax mask" in text
    assert "layerlock ÷ hand step time = 1.00 ± 0.03 (JAX (Equinox, optax))" in text
    assert "layerlock ÷ limit ≤ 1.02 (Equinox)" in text and "(+1%, Equinox)" in text


def test_a_missing_jax_is_reported_not_run(monkeypatch):
    import importlib.util

    from benchmarks import __main__ as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flax" else real(name, *a))
    assert cli.framework_missing("jax") == "flax not installed"


def test_distributed_is_a_section_of_the_full_run():
    from benchmarks.__main__ import OTHER_SECTIONS, SECTIONS, parse

    assert "distributed" in SECTIONS and "distributed" in OTHER_SECTIONS
    assert parse(["--only", "distributed"]).only == ["distributed"]


def _comparison(a: float, b: float) -> dict:
    return {"layerlock": {"median": a}, "hand": {"median": b}, "ratio": a / b, "paired_ratio": a / b,
            "control/hand": 1.0}


@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # no step suites to plot
def test_the_distributed_section_renders_ratios_bytes_and_targets(tmp_path):
    pytest.importorskip("matplotlib")
    shares = {"bytes_ratio": 0.25, "trainable_share": 0.25}
    dist = {"loop": {"size": {"width": 8, "body": 2, "head": 2, "batch": 4}, **shares,
                     "phases": {"frozen": _comparison(0.0101, 0.0100), "full": _comparison(0.02, 0.019)},
                     "transition_s": {"layerlock": [0.01, 0.02], "hand": [0.01, 0.02]}},
            "lightning": {"frozen": {**_comparison(0.01, 0.01), "skip": 3}, **shares, "bytes_layerlock/hand": 1.0},
            "trainer": {"error": "transformers not installed"}}
    (tmp_path / "cpu.json").write_text(json.dumps({**_results({}), "distributed": dist}))
    text = report.write(tmp_path, tmp_path / "docs").read_text()
    assert "### Distributed: 2 processes (gloo, CPU)" in text and "**1.010×**" in text
    assert "plain loop, `DistributedDataParallel`: layerlock ÷ hand step time ≤ 1.03 (paired) | frozen 1.010 / full 1.053" \
        " | **missed**: 1.053×" in text
    assert "Hugging Face Trainer: layerlock ÷ hand step time ≤ 1.03 (paired) | not run | not measured" in text
    assert "loop 0.25 (share 0.25); lightning 0.25 (share 0.25) | met" in text
    assert "Hugging Face Trainer: not run: transformers not installed" in text


@pytest.mark.slow
def test_the_distributed_loop_part_runs_on_two_processes_in_quick_mode():
    pytest.importorskip("torch")
    from benchmarks import distributed

    out = distributed.launch("loop", quick=True)  # two ranks over gloo, about 10 s
    assert "error" not in out, out.get("error")
    for phase in ("frozen", "full"):
        c = out["phases"][phase]
        assert len(c["layerlock"]["samples_s"]) == len(c["hand"]["samples_s"]) == distributed.LOOP[True]["reps"]
        assert c["ratio"] > 0 and c["paired_ratio"] > 0 and c["control/hand"] > 0
    # the frozen phase all-reduces exactly the trainable gradients, on both ranks alike
    assert out["bytes_ratio"] == pytest.approx(out["trainable_share"], rel=1e-9) and out["trainable_share"] < 1
    assert out["rank1_bytes"] == out["bytes"]


def test_rows_is_a_section_of_the_full_run_and_a_partial_run_replaces_it_alone():
    from benchmarks.__main__ import OTHER_SECTIONS, SECTIONS, merge, parse

    assert "rows" in SECTIONS and "rows" in OTHER_SECTIONS and parse(["--only", "rows"]).only == ["rows"]
    old = {"meta": {"date": "d1", "versions": {}, "elapsed_s": {}}, "steps": {"torch": {"cases": 1}},
           "memory": {}, "apply": {}, "rates": {"torch": "old"}, "import": {}}   # written before rows existed
    new = {"meta": {"date": "d2", "versions": {}, "elapsed_s": {"rows torch": 9, "total": 9}},
           "steps": {}, "memory": {}, "apply": {}, "rates": {}, "rows": {"torch": "new"}, "import": {}}
    out = merge(old, new, ["rows"])
    assert out["rows"] == {"torch": "new"} and out["rates"] == {"torch": "old"}
    assert out["steps"] == {"torch": {"cases": 1}}
    assert out["meta"]["measured"] == {"rows": "d2"}


@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # no step suites to plot
def test_quick_rows_section_records_modes_optimizer_bytes_and_renders_its_targets(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from benchmarks import __main__ as cli
    from benchmarks import rows, worker

    monkeypatch.setattr(rows, "SUITES", ("torch",))   # one suite's worth: the others run alike
    out = cli.main(["--only", "rows", "--quick", "--reps", "2", "--threads", "1", "--no-memory", "--no-docs",
                    "--out", str(tmp_path / "quick.json")])
    data = json.loads(out.read_text())["rows"]["torch"]
    peft = rows.missing("peft") is None
    assert list(data["modes"]) == [m for m in rows.MODES["torch"] if peft or m != "peft"]
    assert data["baseline"] == ("peft" if peft else "full") and ("peft" in data["skipped"]) is not peft
    assert all(len(m["samples_s"]) == 2 for m in data["modes"].values())
    # AdamW: two float32 moments per trainable scalar; only the new rows train with layerlock and PEFT
    s, modes = rows.SIZES[True], data["modes"]
    assert modes["layerlock"]["trainable_scalars"] == s["new"] * s["dim"]
    assert modes["layerlock"]["opt_state_bytes"] == 8 * s["new"] * s["dim"]
    assert modes["full"]["opt_state_bytes"] == modes["mask"]["opt_state_bytes"] == 8 * s["vocab"] * s["dim"]
    if peft:
        assert modes["peft"]["opt_state_bytes"] == modes["layerlock"]["opt_state_bytes"]
        assert {"layerlock/peft", "layerlock/full", "mask/peft", "full/peft"} == set(data["ratios"])

    # the memory probe of one mode (plumbing: in this process, its peak is this process's)
    probe_json = tmp_path / "probe.json"
    worker.main(["rows", "torch", "layerlock", str(probe_json), "--quick", "--threads", "1"])
    assert {"peak_rss_mb", "rss_after_build_mb", "train_increment_mb"} <= set(json.loads(probe_json.read_text()))
    base = data["baseline"]
    rows.add_memory(data, {"layerlock": {"train_increment_mb": 9.0}, base: {"train_increment_mb": 10.0}})
    assert data["ratios"][f"peak layerlock/{base}"] == pytest.approx(0.9)

    results = {**_results({}), "rows": {"torch": data, "jax": {"error": "flax not installed"}}}
    (tmp_path / "cpu.json").write_text(json.dumps(results))
    text = report.write(tmp_path, tmp_path / "docs").read_text()
    assert "### Rows: 16 new rows of a 4000 x 64 table" in text and "| torch | layerlock `rows=` |" in text
    assert "| jax | not run | flax not installed |" in text
    step, memory = "torch rows step time ≤ 1.05× PEFT trainable_token_indices", "torch rows peak memory ≤ PEFT's"
    if peft:
        assert f"{step} | {data['ratios']['layerlock/peft']:.3f} |" in text
        assert "| 0.900 | met |" in text and memory in text
    else:
        assert f"{step} | not run | not measured |" in text
