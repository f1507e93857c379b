"""What runs inside one subprocess: the step-time suite of one backend, one memory probe,
or the apply-overhead suite. One framework per process (``KERAS_BACKEND`` is read once at
import), and a probe's peak RSS is then its own.

    python -m benchmarks.worker steps SUITE OUT.json [--quick] [--device D] [--threads N]

SUITE is torch, keras-tf, keras-torch, keras-jax, jax (Flax NNX) or equinox (Equinox
modules through ``layerlock.jax``).
    python -m benchmarks.worker probe SUITE CASE MODE OUT.json [--quick] ...
    python -m benchmarks.worker apply SUITE OUT.json [--quick] ...
    python -m benchmarks.worker rates SUITE OUT.json [--quick] ...   (per-parameter learning rates)
    python -m benchmarks.worker rows SUITE [MODE] OUT.json [--quick] ...   (rows= : every mode
        timed; with MODE, that mode's memory probe)
    python -m benchmarks.worker distributed torch OUT.json [--quick]  (2 processes, gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import ModuleType
from typing import Any

from . import env
from .measure import MODES, current_rss_mb, interleave, peak_rss_mb, ratios

KERAS_SUITES = {"keras-tf": "tensorflow", "keras-torch": "torch", "keras-jax": "jax"}
SUITES = ("torch", *KERAS_SUITES, "jax", "equinox")
TORCH_ALLOCATOR = ("torch", "keras-torch")   # the suites whose CUDA peak torch can read
REPS = {True: 5, False: 15}       # repetitions per mode, --quick and full
PROBE_STEPS = 3


def cases_module(suite: str) -> ModuleType:
    """The cases module of a suite; Keras suites require KERAS_BACKEND set by the parent."""
    if suite == "torch":
        from . import torch_cases
        return torch_cases
    if suite == "jax":
        from . import jax_cases
        return jax_cases
    if suite == "equinox":
        from . import equinox_cases
        return equinox_cases
    expected = KERAS_SUITES[suite]
    if os.environ.get("KERAS_BACKEND") != expected:
        raise SystemExit(f"suite {suite} needs KERAS_BACKEND={expected}; "
                         f"received {os.environ.get('KERAS_BACKEND')!r}")
    from . import keras_cases
    return keras_cases


def set_threads(threads: int) -> dict[str, Any]:
    """Pin intra-op threads (the reference figures use 2) and report what was set."""
    out: dict[str, Any] = {}
    if "torch" in sys.modules:
        import torch
        torch.set_num_threads(threads)
        out["torch"] = torch.get_num_threads()
    if "tensorflow" in sys.modules:
        import tensorflow as tf
        tf.get_logger().setLevel("ERROR")  # retracing notes: each mode is its own model
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            out["tensorflow"] = threads
        except RuntimeError:  # TensorFlow ran already in this process (a test's worker run in-process)
            out["tensorflow"] = tf.config.threading.get_intra_op_parallelism_threads() or "TensorFlow's default"
    if "jax" in sys.modules:
        out["jax"] = "XLA default (every core)"  # XLA's CPU client has no thread-count setting
    return out


def byte_ratios(info: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Optimizer-state bytes of the frozen step over the full one, and what it should be:
    the trainable share of the parameter bytes (adam keeps two moments per trainable leaf)."""
    full, frozen = info.get("full"), info.get("layerlock")
    if not full or not frozen or not full["opt_state_bytes"]:
        return {}
    return {"opt-state layerlock/full": frozen["opt_state_bytes"] / full["opt_state_bytes"],
            "trainable/all params": frozen["param_bytes"]["trainable"] / frozen["param_bytes"]["all"]}


def cuda_peak(device: str, suite: str) -> tuple[Any, Any] | None:
    """(reset, read MB) of torch's CUDA allocator peak, or None off the GPU and where
    torch does not allocate (JAX keeps its own pool)."""
    if device != "cuda" or suite not in TORCH_ALLOCATOR:
        return None
    import torch
    return (torch.cuda.reset_peak_memory_stats,
            lambda: torch.cuda.max_memory_allocated() / 2**20)


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Every case of the suite, all five modes interleaved; one progress bar."""
    from tqdm import tqdm

    mod = cases_module(args.suite)
    threads = set_threads(args.threads)
    names = [c for c in mod.CASES if not args.cases or c in args.cases]
    modes_ = getattr(mod, "MODES", MODES)
    reps = args.reps or REPS[args.quick]
    results: dict[str, Any] = {}
    with tqdm(total=len(names) * len(modes_) * reps, desc=args.suite, unit="sample",
              leave=False, file=sys.stderr) as bar:
        for name in names:
            case = mod.CASES[name]
            bar.set_postfix_str(name)
            built = {m: mod.make_step(case, m, args.quick, args.device) for m in modes_}
            steps = {m: built[m][0] for m in modes_}
            modes = interleave(steps, reps=reps, warmup=args.warmup, sync=mod.sync(args.device),
                               on_sample=bar.update, peak=cuda_peak(args.device, args.suite))
            results[name] = {"size": dict(case.size(args.quick)), **mod.describe(built["full"][1]),
                             "modes": modes, "ratios": ratios(modes)}
            if hasattr(mod, "mode_info"):  # JAX, Keras: optimizer-state and parameter bytes per mode
                info = {m: mod.mode_info(*built[m]) for m in modes_}
                for m in modes_:
                    modes[m].update(info[m])
                results[name]["ratios"].update(byte_ratios(info))
            del built, steps
    return {"suite": args.suite, "threads": threads, "reps": reps, "cases": results}


def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of building one model in one mode and training it a few steps."""
    mod = cases_module(args.suite)
    set_threads(args.threads)
    before_build = current_rss_mb()
    step, _ = mod.make_step(mod.CASES[args.case], args.mode, args.quick, args.device)
    after_build = current_rss_mb()
    for _ in range(PROBE_STEPS):
        step()
    mod.sync(args.device)()
    peak = peak_rss_mb()
    return {"peak_rss_mb": peak, "rss_before_build_mb": before_build,
            "rss_after_build_mb": after_build, "train_increment_mb": peak - after_build}


def run_apply(args: argparse.Namespace) -> dict[str, Any]:
    from . import overhead
    set_threads(args.threads)
    return overhead.run(args.suite, args.quick)


def run_rates(args: argparse.Namespace) -> dict[str, Any]:
    from . import rates
    set_threads(args.threads)
    return rates.run(args.suite, args.quick, args.reps or REPS[args.quick])


def run_rows(args: argparse.Namespace) -> dict[str, Any]:
    from . import rows
    cases_module(args.suite)  # imports the framework (and checks KERAS_BACKEND), so that threads reach it
    threads = set_threads(args.threads)
    if args.mode:
        return rows.probe(args.suite, args.mode, args.quick)
    return {"suite": args.suite, "threads": threads, **rows.run(args.suite, args.quick, args.reps or REPS[args.quick])}


def run_trainer(args: argparse.Namespace) -> dict[str, Any]:
    from . import overhead
    set_threads(args.threads)
    return overhead.run_trainer(args.quick)


def run_distributed(args: argparse.Namespace) -> dict[str, Any]:
    from . import distributed
    return distributed.run(args.quick)  # the ranks are processes of their own, one thread each


def main(argv: list[str] | None = None) -> None:
    env.quiet_frameworks()
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    p.add_argument("task", choices=("steps", "probe", "apply", "trainer", "rates", "rows", "distributed"))
    p.add_argument("suite", choices=SUITES)
    p.add_argument("rest", nargs="+", help="[CASE MODE] OUT.json (probe), [MODE] OUT.json (rows)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cases", nargs="*", default=None)
    args = p.parse_args(argv)
    *extra, out = args.rest
    if args.task == "probe":
        args.case, args.mode = extra
    if args.task == "rows":
        args.mode = extra[0] if extra else None
    result = {"steps": run_steps, "probe": run_probe, "apply": run_apply, "trainer": run_trainer,
              "rates": run_rates, "rows": run_rows, "distributed": run_distributed}[args.task](args)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
