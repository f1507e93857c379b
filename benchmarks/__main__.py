"""``python -m benchmarks [--quick] [--device cpu|cuda|auto] [--only torch,keras-jax,equinox,...]``

Each framework runs in its own subprocess (``benchmarks.worker``); this process only
orchestrates, shows progress, writes the JSON and regenerates the docs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import env, overhead, report, rows
from .worker import KERAS_SUITES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STEP_SUITES = ("torch", "keras-tf", "keras-torch", "keras-jax", "jax", "equinox")
SECTIONS = (*STEP_SUITES, "apply", "rates", "rows", "trainer", "distributed", "import")
OTHER_SECTIONS = ("apply", "rates", "rows", "trainer", "distributed", "import")   # not per-suite step tables
RATE_SUITES = ("torch", "keras-tf", "keras-torch", "keras-jax", "jax")
# Memory probes are one subprocess per (model, mode); --quick keeps one model's worth.
QUICK_PROBES = {"torch": ("cnn",)}
IMPORT_REPS = {True: 10, False: 40}


def worker_env(suite: str, device: str) -> dict[str, str]:
    """Environment of a worker: its Keras backend, and the device it may see."""
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Passive OpenMP waiting: on a shared machine, spinning threads make 2-thread steps
    # stall for seconds whenever another process holds a core.
    e.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if suite in KERAS_SUITES:
        e["KERAS_BACKEND"] = KERAS_SUITES[suite]
    if suite in ("keras-jax", "jax", "equinox") and device == "cpu":
        e["JAX_PLATFORMS"] = "cpu"
    if device == "cpu":
        e["CUDA_VISIBLE_DEVICES"] = ""  # Keras on torch would otherwise take a GPU by itself
    return e


def run_worker(task: str, suite: str, extra: list[str], args: argparse.Namespace,
               device: str) -> dict[str, Any]:
    """Run one worker task; its result, or ``{"error": ...}`` so that the rest still runs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "benchmarks.worker", task, suite, *extra, str(out),
               "--device", device, "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        if args.reps:
            cmd += ["--reps", str(args.reps)]
        proc = subprocess.run(cmd, env=worker_env(suite, device), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=None if task == "steps" else subprocess.PIPE,
                              text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout or "")[-2000:]
            return {"error": f"{task} {suite} failed (exit {proc.returncode}): {tail.strip()}"}
        return json.loads(out.read_text())


def suite_device(suite: str, device: str) -> str:
    # tensorflow-cpu has no GPU: Keras on TensorFlow always runs on the CPU here.
    return "cpu" if suite == "keras-tf" else device


def framework_missing(suite: str) -> str | None:
    """Why a suite cannot run here (e.g. no TensorFlow on the GPU machine), or None."""
    import importlib.util

    needs = {"torch": ["torch"], "keras-tf": ["keras", "tensorflow"], "keras-torch": ["keras", "torch"],
             "keras-jax": ["keras", "jax"], "jax": ["jax", "flax", "optax"],
             "equinox": ["jax", "equinox", "optax"], "trainer": ["torch", "transformers", "accelerate"],
             "distributed": ["torch"]}  # its Lightning and Trainer parts say so themselves when missing
    missing = [m for m in needs[suite] if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def probes(suites: list[str], steps: dict[str, Any], args: argparse.Namespace, device: str,
           bar: Any) -> dict[str, Any]:
    """Peak RSS of a subprocess per (model, mode), two at a time (memory, not speed)."""
    jobs = []
    for suite in suites:
        cases = steps.get(suite, {}).get("cases", {})
        for case in cases:
            if args.quick and case not in QUICK_PROBES.get(suite, ()):
                continue
            for mode in cases[case]["modes"]:
                jobs.append((suite, case, mode))
    out: dict[str, Any] = {}
    bar.total += len(jobs)
    bar.refresh()

    def one(job: tuple[str, str, str]) -> None:
        suite, case, mode = job
        result = run_worker("probe", suite, [case, mode], args, suite_device(suite, device))
        out.setdefault(suite, {}).setdefault(case, {})[mode] = result
        bar.set_postfix_str(f"memory {suite} {case} {mode}")
        bar.update()

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, jobs))
    return out


def rows_probes(found: dict[str, Any], args: argparse.Namespace, bar: Any) -> None:
    """The memory probe of every mode timed, one fresh process each, two at a time; into
    each suite's results (``rows.add_memory``)."""
    jobs = [(suite, mode) for suite, data in found.items() for mode in data.get("modes", {})]
    out: dict[str, dict[str, Any]] = {suite: {} for suite, _ in jobs}
    bar.total += len(jobs)
    bar.refresh()

    def one(job: tuple[str, str]) -> None:
        suite, mode = job
        out[suite][mode] = run_worker("rows", suite, [mode], args, "cpu")
        bar.set_postfix_str(f"rows memory {suite} {mode}")
        bar.update()

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, jobs))
    for suite, memory in out.items():
        rows.add_memory(found[suite], memory)


def merge(old: dict[str, Any], new: dict[str, Any], sections: list[str]) -> dict[str, Any]:
    """The earlier results with the sections just measured replaced; each section keeps
    the date it was measured on (``meta.measured``)."""
    measured = old["meta"].setdefault("measured", {})
    # the 1-minute load average at the start and end of this partial run, per section, so
    # that the report can flag a section measured on a busier machine than the first run
    loads = old["meta"].setdefault("load_avg_by_section", {})
    start, end = new["meta"].get("machine", {}).get("load_avg_start"), new["meta"].get("load_avg_end")
    for section in sections:
        loads[section] = [v[0] if v else None for v in (start, end)]
        if section in OTHER_SECTIONS:
            old[section] = new[section]
        else:
            old["steps"][section] = new["steps"][section]
            old["memory"][section] = new["memory"].get(section, old["memory"].get(section, {}))
        measured[section] = new["meta"]["date"]
        old["meta"]["elapsed_s"].update({k: v for k, v in new["meta"]["elapsed_s"].items() if k != "total"})
    old["meta"]["versions"] = new["meta"]["versions"]
    return old


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced grid (a few minutes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per framework")
    p.add_argument("--reps", type=int, default=0, help="repetitions per mode (default by grid)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode RSS probes")
    p.add_argument("--out", type=Path, default=None, help="results JSON path")
    p.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                   help="regenerate docs/benchmarks.md (default: on for the full grid)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"--only accepts {','.join(SECTIONS)}; received {','.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> Path:
    from tqdm import tqdm

    env.quiet_frameworks()
    args = parse(argv)
    device = env.pick_device(args.device)
    results: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
                 "device": device, "device_name": env.device_name(device), "machine": env.machine(),
                 "versions": env.versions(), "threads": args.threads,
                 "omp_wait_policy": worker_env("torch", device)["OMP_WAIT_POLICY"]},
        "steps": {}, "memory": {}, "apply": {}, "rates": {}, "rows": {}, "trainer": {}, "distributed": {}, "import": {},
        "skipped": {}}
    suites = [s for s in STEP_SUITES if s in args.only]
    elapsed = results["meta"]["elapsed_s"] = {}
    clock = time.perf_counter()

    def lap(task: str) -> None:
        nonlocal clock
        elapsed[task] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    with tqdm(total=len(suites) + ("apply" in args.only) * 2 + ("rates" in args.only) * len(RATE_SUITES)
              + ("rows" in args.only) * len(rows.SUITES)
              + ("trainer" in args.only) + ("distributed" in args.only) + ("import" in args.only),
              desc="benchmarks", unit="task") as bar:
        def each_suite(task: str, names: tuple[str, ...] | list[str], on: str | None = None) -> None:
            for suite in names:
                bar.set_postfix_str(f"{task} {suite}")
                why = framework_missing(suite)
                results[task][suite] = {"error": why} if why else run_worker(
                    task, suite, [], args, on or suite_device(suite, device))
                lap(f"{task} {suite}")
                bar.update()

        each_suite("steps", suites)
        if "apply" in args.only:
            for suite in ("torch", "keras-tf" if not framework_missing("keras-tf") else "keras-torch"):
                bar.set_postfix_str(f"apply {suite}")
                results["apply"][suite] = run_worker("apply", suite, [], args, "cpu")
                lap(f"apply {suite}")
                bar.update()
        if "rates" in args.only:
            each_suite("rates", RATE_SUITES)
        if "rows" in args.only:
            each_suite("rows", rows.SUITES, "cpu")  # on the CPU, where RSS is the memory figure
            if not args.no_memory:
                rows_probes(results["rows"], args, bar)
                lap("rows memory probes")
        if "trainer" in args.only:
            bar.set_postfix_str("Hugging Face Trainer")
            why = framework_missing("trainer")
            results["trainer"] = {"error": why} if why else run_worker("trainer", "torch", [], args, "cpu")
            lap("trainer")
            bar.update()
        if "distributed" in args.only:
            bar.set_postfix_str("2 processes: DDP loop, Lightning, Trainer")
            why = framework_missing("distributed")
            results["distributed"] = {"error": why} if why else run_worker("distributed", "torch", [], args, "cpu")
            lap("distributed")
            bar.update()
        if "import" in args.only:
            bar.set_postfix_str("import time")
            results["import"] = overhead.import_time(IMPORT_REPS[args.quick])
            lap("import")
            bar.update()
        if device == "cpu" and not args.no_memory:
            results["memory"] = probes(suites, results["steps"], args, device, bar)
            lap("memory probes")
    elapsed["total"] = round(sum(elapsed.values()), 1)
    results["meta"]["load_avg_end"] = env.load_avg()
    out = args.out or RESULTS / f"{'quick-' if args.quick else ''}{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and set(args.only) != set(SECTIONS):
        results = merge(json.loads(out.read_text()), results, args.only)
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")
    if args.docs if args.docs is not None else not args.quick:
        print(f"docs: {report.write(RESULTS, ROOT / 'docs')}")
    for line in report.console(results):
        print(line)
    return out


if __name__ == "__main__":
    main()
