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
        parse(["--only", "torch,jax"])


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
