"""Results JSON -> ``docs/benchmarks.md`` (tables, targets) and PNG plots.

``python -m benchmarks.report`` regenerates the docs from the committed results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .overhead import growth
from .rows import SIZES as ROW_SIZES

SUITE_TITLES = {"torch": "PyTorch", "keras-tf": "Keras 3 on TensorFlow", "keras-torch": "Keras 3 on torch",
                "keras-jax": "Keras 3 on JAX", "jax": "JAX (Flax NNX)", "equinox": "JAX (Equinox, optax)"}
SHORT_TITLES = {**SUITE_TITLES, "jax": "JAX", "equinox": "Equinox"}   # for the targets table
HAND_SUITES = ("torch", "keras-tf", "keras-torch", "keras-jax", "equinox")  # with a hand-freeze mode
JAX_SUITES = ("jax", "equinox")    # layerlock's step is a JAX filter / partition
OPT_SUITES = ("keras-jax", "jax", "equinox")   # optimizer-state target, shown even when not run
MODE_TITLES = {"full": "full training", "layerlock": "layerlock freeze", "hand": "hand freeze",
               "limit": "limit", "layerlock_eval": "layerlock frozen_mode='eval'",
               "features": "features (Keras)", "mask": "optax mask only (JAX)",
               "hand_mask": "hand-written optax mask (Equinox)"}
RATIO_ORDER = ["layerlock/hand", "frozen/full", "frozen/limit", "eval/frozen", "frozen/features",
               "mask/layerlock", "mask/hand mask", "opt-state layerlock/full", "trainable/all params"]
BYTE_RATIOS = ("opt-state layerlock/full", "trainable/all params")
OPT_SLACK = 0.01   # optimizer-state share allowed over the trainable share (step counters)
LINEAR = 1.2       # µs per tensor at 100k over 1k that still counts as linear
MEM_SLACK = 0.01   # RSS noise allowed when comparing peaks (1%)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}" if seconds >= 0.01 else f"{1e3 * seconds:.2f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _share(value: float | None) -> str:
    """A byte ratio, which can be far below 0.01."""
    return "n/a" if value is None else f"{value:.4g}"


def table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- sections --------------------------------------------------------------------------

def step_table(suite: str, data: dict[str, Any], memory: dict[str, Any]) -> str:
    rows = []
    opt = any("opt_state_bytes" in m for e in data["cases"].values() for m in e["modes"].values())
    for case, entry in data["cases"].items():
        full = entry["modes"]["full"]["median"]
        for mode, m in entry["modes"].items():
            mem = memory.get(case, {}).get(mode, {})
            peak = m.get("peak_mem_mb") or mem.get("peak_rss_mb")
            rows.append([case if mode == "full" else "", MODE_TITLES[mode], _ms(m["median"]),
                         _ms(m["iqr"]), _x(m["median"] / full),
                         f"{peak:.0f}" if peak else "–",
                         f"{mem['train_increment_mb']:.0f}" if "train_increment_mb" in mem else "–"]
                        + ([f"{m['opt_state_bytes'] / 1024:.1f}" if "opt_state_bytes" in m else "–"] if opt else []))
    mem_head = "peak MB (CUDA)" if any("peak_mem_mb" in m for e in data["cases"].values()
                                       for m in e["modes"].values()) else "peak RSS MB"
    return table(["model", "mode", "median ms", "IQR ms", "÷ full", mem_head, "RSS growth in steps MB"]
                 + (["optimizer state KiB"] if opt else []), rows)


def ratio_table(data: dict[str, Any]) -> str:
    names = sorted({k for e in data["cases"].values() for k in e["ratios"]}, key=RATIO_ORDER.index)
    rows = []
    for case, e in data["cases"].items():
        size = ", ".join(f"{k}={v}" for k, v in e["size"].items())
        rows.append([case, f"{e['params'] / 1e6:.2f}M", size]
                    + [(_share if n in BYTE_RATIOS else _x)(e["ratios"].get(n)) for n in names])
    return table(["model", "params", "size"] + names, rows)


def apply_table(apply: dict[str, Any]) -> str:
    rows = []
    for suite, data in apply.items():
        if "error" in data:
            continue
        for name, e in data["models"].items():
            c, u = e["calls"], e["us_per_tensor"]
            rows.append([name, SUITE_TITLES[suite], e["tensors"], _ms(c["layerlock_plan"]["median"]),
                         _ms(c["layerlock_apply"]["median"]), _ms(c["hand"]["median"]),
                         _ms(c["lightning"]["median"]) if "lightning" in c else "–",
                         f"{u['layerlock_apply']:.1f}", f"{u['hand']:.1f}",
                         _x(e["plan/hand"]), _x(e["apply/hand"]), _x(e.get("apply/lightning"))]
                        + ([_ms(c["hand_compile"]["median"])] if "hand_compile" in c else ["–"]))
    return table(["model", "backend", "tensors", "plan ms", "apply ms", "hand ms", "Lightning ms",
                  "apply µs/tensor", "hand µs/tensor", "plan ÷ hand", "apply ÷ hand", "apply ÷ Lightning",
                  "hand + compile ms"], rows)


# --- targets ---------------------------------------------------------------------------

def _ratios(results: dict[str, Any], suite: str, name: str, cases: tuple[str, ...] = ()) -> list[float]:
    data = results["steps"].get(suite, {})
    return [e["ratios"][name] for c, e in data.get("cases", {}).items()
            if name in e["ratios"] and (not cases or c in cases)]


def _span(values: list[float]) -> str:
    if not values:
        return "not run"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f} – {hi:.2f}"


def _verdict(ok: bool | None, miss: str) -> str:
    return "not measured" if ok is None else ("met" if ok else f"**missed**: {miss}")


def targets(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for suite in HAND_SUITES:
        v = _ratios(results, suite, "layerlock/hand")
        ok = None if not v else all(0.97 <= x <= 1.03 for x in v)
        rows.append([f"layerlock ÷ hand step time = 1.00 ± 0.03 ({SUITE_TITLES[suite]})", _span(v),
                     _verdict(ok, "outside 0.97–1.03 for " + ", ".join(
                         c for c, e in results["steps"].get(suite, {}).get("cases", {}).items()
                         if not 0.97 <= e["ratios"]["layerlock/hand"] <= 1.03))])
    for suite in SUITE_TITLES:
        bound = 1.02 if suite in ("torch", *JAX_SUITES) else 1.05
        v = _ratios(results, suite, "frozen/limit")
        ok = None if not v else max(v) <= bound
        name = "layerlock ÷ limit" if suite in JAX_SUITES else "frozen ÷ limit"
        rows.append([f"{name} ≤ {bound} ({SHORT_TITLES[suite]})", _span(v),
                     _verdict(ok, f"worst {max(v or [0]):.2f}")])
    rows += [opt_state_target(results, suite) for suite in SUITE_TITLES
             if suite in OPT_SUITES or _ratios(results, suite, "opt-state layerlock/full")]
    tapply = results["apply"].get("torch", {})
    models = tapply.get("models", {})
    for call, bound in (("apply", 2.0), ("plan", 1.5)):
        x = [e[f"{call}/hand"] for e in models.values()]
        rows.append([f"{call} ≤ {bound:g}× the hand loop (torch: 1k-100k tensors, BERT-base)", _span(x),
                     _verdict(None if not x else max(x) <= bound, f"{max(x or [0]):.2f}× at worst")])
    g = growth(models, "layerlock_apply") if models else None
    h = growth(models, "hand") if models else None
    rows.append([f"apply linear from 1k to 100k tensors (µs/tensor at 100k ÷ at 1k ≤ {LINEAR})",
                 "n/a" if g is None else f"{g:.2f} (hand loop {h:.2f})",
                 _verdict(None if g is None else g <= LINEAR, f"per-tensor cost grows {g or 0:.2f}×")])
    added = results["import"].get("added_ms")
    rows.append(["`import layerlock` adds ≤ 20 ms", "n/a" if added is None else f"{added:.1f} ms",
                 _verdict(None if added is None else added <= 20, f"{added or 0:.1f} ms")])
    v = _ratios(results, "torch", "eval/frozen", ("transformer",))
    rows.append(["frozen_mode='eval' ≤ 0.5× frozen train-mode step (torch Transformer)", _span(v),
                 _verdict(None if not v else max(v) <= 0.5, f"{max(v or [0]):.2f}×")])
    for suites, mode, bound in ((("torch",), "layerlock", 1.01), (("torch",), "layerlock:optimizer", 1.01),
                                (("keras-tf", "keras-torch", "keras-jax"), "layerlock", 1.03),
                                (("jax",), "groups", 1.02), (("jax",), "per_leaf", 1.02),
                                (("jax",), "groups:optimizer", 1.02), (("jax",), "per_leaf:optimizer", 1.02)):
        v = [r for s in suites if (r := results.get("rates", {}).get(s, {}).get("ratios", {}).get(mode))]
        rows.append([f"per-parameter rates ({', '.join(suites)}: {RATE_MODES[mode]}) ≤ {bound}× its baseline",
                     "not run" if not v else " / ".join(f"{x:.3f}" for x in v),
                     _verdict(None if not v else max(v) <= bound, f"{max(v or [0]):.3f}×")])
    tr = results.get("rows", {}).get("torch", {}).get("ratios", {})
    for name, key, bound in (("torch rows step time ≤ 1.05× PEFT trainable_token_indices", "layerlock/peft", 1.05),
                             (f"torch rows peak memory ≤ PEFT's (peak over setup ÷ PEFT's, {MEM_SLACK:.0%} noise "
                              "allowed)", "peak layerlock/peft", 1 + MEM_SLACK)):
        v = tr.get(key)
        rows.append([name, "not run" if v is None else f"{v:.3f}",
                     _verdict(None if v is None else v <= bound, f"{v or 0:.3f}×")])
    rows += distributed_targets(results.get("distributed", {}))
    mem = memory_ratios(results)
    worse = [f"{k} {r:.3f}×" for k, r in mem.items() if r > 1 + MEM_SLACK]
    rows.append([f"peak memory, layerlock ≤ hand (peak ÷ hand, {MEM_SLACK:.0%} noise allowed)",
                 _span(list(mem.values())), _verdict(None if not mem else not worse, ", ".join(worse))])
    return rows


def opt_state_target(results: dict[str, Any], suite: str = "jax") -> list[str]:
    """The layerlock step's optimizer state is the full one's times the trainable share of
    the parameter bytes (adamw keeps two moments per trainable leaf, Keras SGD one momentum,
    none per frozen one)."""
    cases = results["steps"].get(suite, {}).get("cases", {})
    got = {c: (e["ratios"]["opt-state layerlock/full"], e["ratios"]["trainable/all params"])
           for c, e in cases.items() if "opt-state layerlock/full" in e["ratios"]}
    over = [c for c, (o, t) in got.items() if o > t * (1 + OPT_SLACK)]
    return [f"optimizer-state bytes, layerlock ÷ full ≤ trainable ÷ all parameter bytes "
            f"(+{OPT_SLACK:.0%}, {SHORT_TITLES[suite]})",
            "; ".join(f"{c} {_share(o)} (trainable share {_share(t)})" for c, (o, t) in got.items()) or "not run",
            _verdict(None if not got else not over, "state for frozen leaves in " + ", ".join(over))]


def frozen_vs_torch(results: dict[str, Any], suite: str = "jax") -> str:
    """One line under a JAX suite's tables: frozen ÷ full there and in the torch rows."""
    torch = results["steps"].get("torch", {}).get("cases", {})
    jax = results["steps"].get(suite, {}).get("cases", {})
    pairs = [f"{c} {_x(e['ratios'].get('frozen/full'))} (PyTorch {_x(torch[c]['ratios'].get('frozen/full'))})"
             for c, e in jax.items() if c in torch]
    return (f"frozen ÷ full, {SHORT_TITLES[suite]} against the PyTorch rows of the same model: "
            + ", ".join(pairs) + ".") if pairs else ""


def memory_ratios(results: dict[str, Any]) -> dict[str, float]:
    """layerlock ÷ hand peak memory per (suite, model): CUDA peak on GPU, else peak RSS."""
    out = {}
    for suite, data in results["steps"].items():
        for case, e in data.get("cases", {}).items():
            modes = e["modes"]
            if "peak_mem_mb" in modes.get("hand", {}):
                a, b = modes["layerlock"]["peak_mem_mb"], modes["hand"]["peak_mem_mb"]
            else:
                probe = results["memory"].get(suite, {}).get(case, {})
                if "peak_rss_mb" not in probe.get("layerlock", {}) or "peak_rss_mb" not in probe.get("hand", {}):
                    continue
                a, b = probe["layerlock"]["peak_rss_mb"], probe["hand"]["peak_rss_mb"]
            if b:
                out[f"{suite}/{case}"] = a / b
    return out


# --- plots -----------------------------------------------------------------------------

def plot_steps(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = [s for s in SUITE_TITLES if "cases" in results["steps"].get(s, {})]
    cols = min(3, max(1, len(suites)))
    rows = max(1, -(-len(suites) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(suites):]:
        ax.set_visible(False)
    widest = flat[0], 0  # the legend goes where most modes are drawn
    for ax, suite in zip(flat, suites):
        cases = results["steps"][suite]["cases"]
        modes = list(next(iter(cases.values()))["modes"])
        widest = max(widest, (ax, len(modes)), key=lambda w: w[1])
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            xs, ys, errs = [], [], []
            for j, e in enumerate(cases.values()):
                full = e["modes"]["full"]["median"]
                m = e["modes"][mode]
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(m["median"] / full)
                errs.append([(m["median"] - m["q1"]) / full, (m["q3"] - m["median"]) / full])
            ax.bar(xs, ys, width, yerr=list(zip(*errs)), label=MODE_TITLES[mode], capsize=2)
        ax.set_xticks(range(len(cases)), list(cases), rotation=15)
        ax.set_title(SUITE_TITLES[suite])
        ax.set_ylabel("step time ÷ full training (median, IQR bars)")
        ax.axhline(1, color="grey", lw=0.5)
    widest[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_apply(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {k: v for k, v in results["apply"].get("torch", {}).get("models", {}).items()
              if k.startswith("synthetic")}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    n = [e["tensors"] for e in models.values()]
    for call, label in (("layerlock_plan", "ll.plan"), ("layerlock_apply", "ll.apply"), ("hand", "hand loop")):
        ax.plot(n, [e["us_per_tensor"][call] for e in models.values()], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("parameter tensors")
    ax.set_ylabel("µs per tensor (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("apply overhead, synthetic torch models")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- document --------------------------------------------------------------------------

def _when(section: str, date: str, meta: dict[str, Any]) -> str:
    """When a section of a partial run was measured, with its load average if recorded."""
    loads = [x for x in meta.get("load_avg_by_section", {}).get(section, ()) if x is not None]
    return f"{section} on {date}" + (f", load average {_load(loads)}" if loads else "")


def section(results: dict[str, Any], img: str) -> list[str]:
    """Everything measured on one device."""
    meta = results["meta"]
    measured = meta.get("measured", {})
    dates = "; ".join(_when(k, v, meta) for k, v in measured.items() if v != meta["date"])
    out = [f"Measured {meta['date']}{f' ({dates})' if dates else ''} on **{meta['device_name']}** ({meta['device']}); "
           f"{meta['machine']['cores']} cores, {meta['threads']} intra-op threads per framework, "
           f"OMP_WAIT_POLICY={meta['omp_wait_policy']}; load average "
           f"{_load(meta['machine']['load_avg_start'])} at the start, {_load(meta.get('load_avg_end'))} at the end. "
           "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".", ""]
    out += ["### Targets", "", table(["target", "measured", "status"], targets(results)), ""]
    for suite, title in SUITE_TITLES.items():
        data = results["steps"].get(suite)
        out += [f"### Step time: {title}", ""]
        if not data or "cases" not in data:
            reason = (data or {}).get("error", "not run (not selected)")
            out += [f"Not run: {reason.splitlines()[0] if reason else 'unknown'}", ""]
            continue
        out += [ratio_table(data), "", step_table(suite, data, results["memory"].get(suite, {})), ""]
        if suite in JAX_SUITES and (line := frozen_vs_torch(results, suite)):
            out += [line, ""]
    out += [f"![step time per mode]({img}-steps.png)", ""]
    if results["apply"]:
        models = results["apply"].get("torch", {}).get("models", {})
        g, h = growth(models, "layerlock_apply"), growth(models, "hand")
        out += ["### Apply overhead", "", apply_table(results["apply"]), "",
                f"Growth of the cost per tensor from 1k to 100k tensors (1.00 is linear): `ll.apply` "
                f"{'n/a' if g is None else f'{g:.2f}×'}, the hand loop {'n/a' if h is None else f'{h:.2f}×'} "
                "in the same run.", "",
                f"![apply overhead]({img}-apply.png)", ""]
    if results.get("rates"):
        out += ["### Per-parameter learning rates", ""] + rates_section(results["rates"])
    if results.get("rows"):
        out += rows_section(results["rows"])
    if trainer := results.get("trainer"):
        out += ["### Hugging Face Trainer callback", ""] + trainer_section(trainer)
    if dist := results.get("distributed"):
        out += ["### Distributed: 2 processes (gloo, CPU)", ""] + distributed_section(dist)
    imp = results["import"]
    if imp:
        c = imp["commands"]
        out += ["### Import time", "", table(["command", "median ms", "IQR ms", "runs"], [
            [f"`python -c \"{k}\"`", _ms(v["median"]), _ms(v["iqr"]), v["n"]] for k, v in c.items()]),
            "", f"`import layerlock` adds **{imp['added_ms']:.1f} ms** (difference of medians).", ""]
    return out


def trainer_section(data: dict[str, Any]) -> list[str]:
    """Time per Trainer step with the callback and with the same schedule written by hand."""
    if "modes" not in data:
        return [f"Not run: {data.get('error', 'unknown').splitlines()[0]}", ""]
    titles = {"hand": "hand-written callback", "layerlock": "`layerlock.transformers.FreezeScheduler`"}
    rows = [[titles[m], _ms(v["median_step_s"]), _ms(v["mean_step_s"]),
             " / ".join(_ms(t) for t in v["transition_steps_s"])] for m, v in data["modes"].items()]
    return [f"{data['model']}; {data['steps']} steps with phase changes at steps "
            f"{' and '.join(map(str, data['transitions']))}; median of {data['reps']} interleaved runs per step.", "",
            table(["callback", "median step ms", "mean step ms", "transition steps ms"], rows), "",
            f"layerlock ÷ hand: **{data['step/hand']:.2f}×** per step (median), "
            f"{data['mean step/hand']:.2f}× on the mean that includes the two transitions.", ""]


RATE_MODES = {"plain": "plain optimizer, one rate", "hand": "param groups built by hand",
              "layerlock": "layerlock rates", "hand:optimizer": "hand-built groups, `optimizer.step()` alone",
              "layerlock:optimizer": "layerlock groups, `optimizer.step()` alone", "groups": "`layerlock.jax.multi_transform` over the groups",
              "per_leaf": "`optax.chain(tx, layerlock.jax.scale_by_rates(groups, lr=...))`",
              "plain:optimizer": "plain optimizer, update alone",
              "groups:optimizer": "`multi_transform`, update alone", "per_leaf:optimizer": "`scale_by_rates`, update alone"}


def rates_section(rates: dict[str, Any]) -> list[str]:
    """Step time with layer-wise decay rates, per suite, over the suite's baseline."""
    rows = []
    for suite, data in rates.items():
        if "modes" not in data:
            rows.append([suite, "not run", data.get("error", "unknown").splitlines()[0], ""])
            continue
        for mode, v in data["modes"].items():
            r = data["ratios"].get(mode)
            rows.append([suite, RATE_MODES.get(mode, mode), _ms(v["median"]),
                         "baseline" if r is None else _x(r)])
    return ["Transformer case, AdamW, layer-wise decay 0.75 per encoder layer (one rate per layer); "
            "each mode against its suite's baseline (torch: the same groups built by hand; "
            "elsewhere: the plain optimizer), modes interleaved in one run. The optimizer is a few percent "
            "of a whole step, so the whole-step ratios are mostly the machine's run-to-run noise; the "
            "`alone` rows time the optimizer by itself on fixed gradients.", "",
            table(["suite", "mode", "median step ms", "÷ baseline"], rows), ""]


ROW_MODES = {"full": "whole table trained", "peft": "PEFT `trainable_token_indices`",
             "mask": "whole table, gradient row mask by hand (no weight decay)", "layerlock": "layerlock `rows=`"}


def rows_section(data: dict[str, Any]) -> list[str]:
    """Training only the new rows of a table: time, peak memory and optimizer state per mode."""
    s = next((d["size"] for d in data.values() if "size" in d), ROW_SIZES[False])
    rows = []
    for suite, d in data.items():
        if "modes" not in d:
            rows.append([suite, "not run", d.get("error", "unknown").splitlines()[0]] + [""] * 5)
            continue
        modes, mem, base = d["modes"], d.get("memory", {}), d["baseline"]
        for mode, v in modes.items():
            peak, b = (mem.get(m, {}).get("train_increment_mb") for m in (mode, base))
            rows.append([suite, ROW_MODES[mode], _ms(v["median"]),
                         "baseline" if mode == base else _x(v["median"] / modes[base]["median"]),
                         "–" if peak is None else f"{peak:.1f}",
                         "baseline" if mode == base else _x(peak / b if peak is not None and b else None),
                         f"{v['opt_state_bytes']:,}", f"{v['trainable_scalars']:,}"])
        rows += [[suite, ROW_MODES[m], "not run", why.splitlines()[0]] + [""] * 4 for m, why in d["skipped"].items()]
    return [f"### Rows: {s['new']} new rows of a {s['vocab']} x {s['dim']} table", "",
            f"`ll.freeze().unfreeze(\"emb\", rows=\"{s['vocab'] - s['new']}:\")` on Embedding → mean over tokens → "
            f"Linear/Dense({s['dim']}, 16), batch {s['batch']} × {s['seq']} token ids (every 16th a new one), "
            "cross-entropy, AdamW (lr 1e-3, weight decay 0.01), only the table trained in every mode, on the CPU. "
            "Baseline: PEFT's `TrainableTokensConfig` in torch, the whole table elsewhere; modes interleaved "
            "in one process. Peak memory: a fresh process per mode, peak RSS over 3 steps minus the RSS after "
            "building model and optimizer. Optimizer state: bytes of its arrays after training (Keras keeps the "
            "whole table's state: its stock optimizer steps the table and layerlock restores the frozen rows).", "",
            table(["suite", "mode", "median step ms", "÷ baseline", "peak over setup MB", "÷ baseline",
                   "optimizer-state bytes", "trainable scalars"], rows), ""]


DIST_TITLES = {"loop": "plain loop, `DistributedDataParallel`", "lightning": "Lightning `strategy=\"ddp\"`",
               "trainer": "Hugging Face Trainer"}
DIST_HAND = {"loop": "hand re-wrap (`requires_grad_(False)`, then a new `DistributedDataParallel` at the change)",
             "lightning": "backbone `requires_grad_(False)` before `fit`, no callback",
             "trainer": "encoder `requires_grad_(False)` before the Trainer, no callback"}
DIST_BOUND = 1.03    # layerlock ÷ hand step time
BYTES_SLACK = 0.01   # bytes ratio allowed off the trainable share


def _dist_rows(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(part, phase, comparison) for every step-time comparison measured."""
    rows = []
    for part in DIST_TITLES:
        d = data.get(part, {})
        if "phases" in d:
            rows += [(part, phase, c) for phase, c in d["phases"].items()]
        elif "frozen" in d:
            rows.append((part, "frozen", d["frozen"]))
    return rows


def distributed_section(data: dict[str, Any]) -> list[str]:
    """Step time of layerlock's schedule over the hand-written equivalent, under 2 processes,
    and the gradient bytes all-reduced per step against the trainable share."""
    if "error" in data:
        return [f"Not run: {data['error'].splitlines()[0]}", ""]
    rows = []
    for part, phase, c in _dist_rows(data):
        d = data[part]
        bytes_ratio = d.get("bytes_ratio") if phase == "frozen" else None
        rows.append([DIST_TITLES[part], phase, _ms(c["layerlock"]["median"]), _ms(c["hand"]["median"]),
                     f"**{c['paired_ratio']:.3f}×**", f"{c['ratio']:.3f}×",
                     f"{c['control/hand']:.3f}×" if "control/hand" in c else "–",
                     "–" if bytes_ratio is None else _share(bytes_ratio),
                     "–" if bytes_ratio is None else _share(d.get("trainable_share"))])
    errors = [f"- {DIST_TITLES[p]}: not run: {data[p]['error'].splitlines()[0]}" for p in DIST_TITLES
              if "error" in data.get(p, {})]
    loop, light, hf = data.get("loop", {}), data.get("lightning", {}), data.get("trainer", {})
    sizes = []
    if "size" in loop:
        z = loop["size"]
        sizes.append(f"the loop and Lightning train an MLP ({z['body']} Linear({z['width']}, {z['width']}) + ReLU "
                     f"blocks as the backbone, {z['head']} Linear layers as the head, batch {z['batch']} per rank, "
                     "SGD with momentum)")
    if "size" in hf:
        z = hf["size"]
        sizes.append(f"the Trainer a `BertForSequenceClassification` (hidden {z['hidden']}, {z['layers']} layers, "
                     f"sequence {z['seq']}, batch {z['batch']} per rank, {z['steps']} steps per run)")
    text = [
        "Two processes on this machine (gloo over 127.0.0.1, one intra-op thread each), started "
        "torchrun-style; " + "; ".join(sizes) + ". Layerlock: the loop builds one wrapper with "
        "everything trainable and `layerlock.torch.FreezeScheduler` (schedule: backbone frozen, then "
        "everything) rebuilds it in place at each phase change; Lightning runs "
        "`layerlock.lightning.FreezeScheduler` with the backbone frozen at epoch 0 (a later phase "
        "unfreezes it, so Lightning wraps everything trainable and the callback rebuilds the wrapper); "
        f"the Trainer runs `layerlock.transformers.FreezeScheduler` with "
        f"{'a frozen phase then a later unfreezing one' if hf.get('multi_phase') else 'one frozen phase'} "
        "(`ll.freeze(\"bert\")`). Hand: " + "; ".join(f"{DIST_TITLES[p].split(',')[0]}: {DIST_HAND[p]}"
                                                       for p in DIST_TITLES) + ".", "",
        "Three modes are timed, interleaved: layerlock, hand, and *control*, the hand-written one "
        "again as a model of its own, whose ratio to hand is the noise floor of the run. Loop: in each "
        "phase the modes take turns in a rotating order, a sample is the mean of enough steps to "
        "last a fixed time, on rank 0. Lightning and Trainer: whole runs take turns (a first round "
        "is dropped), a run's sample is the median of its step times after the first "
        f"{light.get('frozen', hf.get('frozen', {})).get('skip', 3)}. The headline ratio is the median of the per-repetition ratios "
        "(*paired*: each layerlock sample against the hand sample next to it, which cancels the "
        "machine's drift); the ratio of the medians is shown beside it. Bytes: gradient bytes all-reduced per step through a counting DDP "
        "comm hook (registered once; a rebuild in place keeps it) on untimed runs, frozen phase ÷ "
        "everything trainable, against the trainable share of the parameters.", "",
        table(["setting", "phase", "layerlock median ms", "hand median ms", "layerlock ÷ hand (paired)",
               "ratio of medians", "control ÷ hand (noise floor)", "bytes frozen ÷ full", "trainable share"],
              rows), ""]
    extra = []
    if "transition_s" in loop:
        t = loop["transition_s"]
        extra.append("Phase change in the loop (rank 0): FreezeScheduler "
                     + " / ".join(_ms(x) for x in t["layerlock"]) + " ms, hand re-wrap "
                     + " / ".join(_ms(x) for x in t["hand"]) + " ms (into the frozen phase / into the full one).")
    for part, d in (("lightning", light), ("trainer", hf)):
        if "bytes_layerlock/hand" in d:
            extra.append(f"{DIST_TITLES[part]}: bytes all-reduced per step, layerlock ÷ hand-frozen "
                         f"{d['bytes_layerlock/hand']:.4g}.")
    return text + ([" ".join(extra), ""] if extra else []) + (errors + [""] if errors else [])


def distributed_targets(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    comparisons = _dist_rows(data) if "error" not in data else []
    for part in DIST_TITLES:
        got = [(phase, c["paired_ratio"]) for p, phase, c in comparisons if p == part]
        worst = max((r for _, r in got), default=0.0)
        rows.append([f"2 processes, {DIST_TITLES[part]}: layerlock ÷ hand step time ≤ {DIST_BOUND} (paired)",
                     " / ".join(f"{phase} {r:.3f}" for phase, r in got) or "not run",
                     _verdict(None if not got else worst <= DIST_BOUND, f"{worst:.3f}×")])
    shares = {p: (data[p]["bytes_ratio"], data[p]["trainable_share"]) for p in DIST_TITLES
              if "bytes_ratio" in data.get(p, {})}
    off = [p for p, (b, t) in shares.items() if abs(b - t) > BYTES_SLACK * t]
    rows.append([f"2 processes: gradient bytes all-reduced per step, frozen ÷ full = trainable share "
                 f"(±{BYTES_SLACK:.0%})",
                 "; ".join(f"{p} {_share(b)} (share {_share(t)})" for p, (b, t) in shares.items()) or "not run",
                 _verdict(None if not shares else not off, "off for " + ", ".join(off))])
    return rows


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{v:.1f}" for v in values)


INTRO = """# Benchmarks

Generated by `python -m benchmarks` (`make bench`) from `benchmarks/results/*.json`; do not
edit by hand: `python -m benchmarks.report` rewrites this page. `make bench-quick` runs a
reduced grid and writes `benchmarks/results/quick-<device>.json` without touching this page.

## What is measured

- **Step time** of one training step (forward, loss, backward, SGD with momentum) for each
  backend, each model and five modes, **interleaved**: every repetition times each mode once,
  in a rotating order, so that a slow patch of the machine hits all modes alike. A sample is
  the mean of enough back-to-back steps to last about 50 ms; the tables give the median and
  interquartile range (IQR) of the samples, the JSON keeps every sample.
  - *full training*: nothing frozen.
  - *layerlock freeze*: `ll.apply(model, ll.freeze("backbone"))` (Keras: on the compiled model).
  - *hand freeze*: PyTorch `requires_grad_(False)` on the backbone and its BatchNorm layers
    put back in `eval()` after `model.train()`; Keras `backbone.trainable = False`, then `compile`.
  - *limit*: PyTorch runs the hand-frozen backbone under `torch.no_grad()`. Keras has no
    `no_grad`; its limit is the closest honest equivalent: the same hand-frozen layers in the same
    modes with `keras.ops.stop_gradient` between backbone and head.
  - Keras on JAX runs the same modes and models; there each model compiles with
    `jit_compile=True` (the JAX backend's default; its eager mode would run op by op), so a
    step is one XLA-compiled `train_on_batch`, retraced after every recompile. Keras suites
    also record the bytes of the optimizer's variables per mode (SGD momentum: one buffer per
    trainable variable, plus the iteration counter).
  - *frozen_mode='eval'*: `ll.apply(model, spec, frozen_mode="eval")`.
  - *features* (Keras only): what caching backbone features would cost without the cache:
    `backbone.predict_on_batch` (inference mode, no dropout) and a head-only model's
    `train_on_batch` on the result, two dispatches per step.
- **Step time, JAX (Flax NNX)**: one `nnx.jit` step (forward, cross-entropy,
  `nnx.value_and_grad`, `optax.adamw` with weight decay) in four modes, interleaved the same way
  (JAX dispatches asynchronously; a sample ends by waiting for its last step):
  - *full training*: `nnx.Optimizer(model, tx, wrt=nnx.Param)`, gradients for every parameter.
  - *layerlock freeze*: `ll.apply(model, ll.freeze("backbone"))`, then the documented step:
    `wrt=layerlock.flax.trainable` for the optimizer and
    `argnums=nnx.DiffState(0, layerlock.flax.trainable)` for the gradient.
  - *optax mask only*: the same `ll.apply` (same BatchNorm hold, same forward), but the gradient
    spans every parameter and `optax.multi_transform` sends the backbone to `optax.set_to_zero`
    (no update, no state), what a `train_state`-style step with `layerlock.jax.optimizer` does.
  - *limit*: no layerlock: the backbone's BatchNorm set to `use_running_average=True` by hand
    and a hand-written path filter (`head` parameters only) for the gradient and the optimizer.
  - *optimizer state*: the bytes of `nnx.state(optimizer, nnx.OptState)` per mode; with adamw
    it should be two moments per trainable parameter and nothing for frozen ones.
- **Step time, JAX (Equinox, optax)**: the same models as Equinox modules
  (`eqx.nn.make_with_state`, BatchNorm statistics in `eqx.nn.State`), one `jax.jit` step
  (forward under `jax.vmap`, cross-entropy, `jax.value_and_grad`, `optax.adamw` with weight
  decay) with the same arguments in six modes. `layerlock.jax` holds nothing in a pytree, so
  every frozen mode puts the backbone's BatchNorm layers in `inference=True` by hand and all
  frozen modes run the same forward:
  - *full training*: every array leaf is differentiated and in the optimizer.
  - *layerlock freeze*: `layerlock.jax.partition(arrays, ll.freeze("backbone"))`, the fast
    step of [the JAX guide](jax.md): the gradient of the trainable partition only, and
    `tx.init(trainable)`.
  - *hand freeze*: the same step with Equinox's frozen-layer pattern, no layerlock: a
    hand-written filter spec (`False` everywhere, `eqx.tree_at` puts `True` on the head's
    arrays) and `eqx.partition`.
  - *optax mask only*: the gradient spans every leaf and the optimizer is
    `layerlock.jax.optimizer(adamw, arrays, spec)` (frozen leaves: no update, no state).
  - *hand-written optax mask*: the same full-gradient step with a hand-written label tree
    and `optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()}, labels)`.
  - *limit*: the lowest-cost version: `jax.lax.stop_gradient` on the backbone's output and
    only the head's arrays differentiated and in the optimizer.
  - *optimizer state*: the bytes of the optax state per mode.
- **Peak memory**: on CPU the peak RSS (`ru_maxrss`) of a fresh subprocess per (model, mode)
  that builds the model and trains 3 steps; "RSS growth in steps" is that peak minus the RSS
  after building, which isolates what training adds. On GPU, `torch.cuda.max_memory_allocated`
  (PyTorch and Keras on torch; JAX keeps its own pool, so its suites have no GPU peak).
- **Apply overhead**: `ll.plan` and `ll.apply` against a hand-written loop
  (`named_parameters()` + `fnmatchcase` + `requires_grad_(False)`; Keras: the layer walk +
  `fnmatchcase` + `layer.trainable = False`) on synthetic torch models with 1k, 10k and 100k
  parameter tensors (blocks of two tiny Linear layers), BERT-base (built on the meta device)
  and MobileNetV2 (224×224, compiled, after one step). Each timed call starts from an
  all-trainable model.
- **Hugging Face Trainer callback**: the time of each `Trainer` step (from one `on_step_begin`
  to the next, so every callback's work is in it) of a small BERT classifier under a
  three-phase schedule by step (head only, then the top two blocks, then everything), with
  `layerlock.transformers.FreezeScheduler` and with a hand-written callback that does the same
  transitions (`requires_grad_`, then `add_param_group` for a weight-decay and a no-decay
  group as the Trainer splits them, and extending the scheduler's lists), runs interleaved.
  Both train the same parameters in the same optimizer groups at every step.
- **Distributed (2 processes)**: `python -m benchmarks --only distributed` starts two ranks
  (gloo over 127.0.0.1, CPU) for a plain DDP loop, Lightning `strategy="ddp"` and the Hugging
  Face Trainer: layerlock's scheduler against the same freeze written by hand, interleaved,
  and the gradient bytes all-reduced per step against the trainable share (details under the
  section's table).
- **Import time**: `python -c "import layerlock"` against `python -c pass`, interleaved.

Models. PyTorch: a CNN with BatchNorm (4 stages of 2 conv-BN-ReLU), `nn.TransformerEncoder`
(post-norm, dropout 0.1) with a linear head on the mean token, Hugging Face
`BertForSequenceClassification` and `ResNetForImageClassification` from small configs (random
weights, nothing downloaded). Keras: the same CNN and encoder written in Keras layers, and
`keras.applications.MobileNetV2(weights=None)`. Keras models compile with
`jit_compile=False` on TensorFlow and torch, so every mode and both backends run without XLA,
and with `jit_compile=True` on JAX. JAX: the same CNN (NHWC) and a post-norm encoder
(`nnx.MultiHeadAttention`, ReLU feed-forward, dropout 0.1) written in Flax NNX, each a
`backbone` and a linear `head`, compiled by XLA (`nnx.jit`); and the same two in Equinox
(CHW per example, `eqx.nn.MultiheadAttention` with biases), compiled by `jax.jit`.

## The `frozen_mode="eval"` trade-off

`ll.apply(model, spec, frozen_mode="eval")` also holds every fully frozen subtree in
inference mode, through later `model.train()` calls; `ll.restore` releases it. In PyTorch
that turns off dropout in the frozen part, fixes BatchNorm statistics, and lets
`nn.TransformerEncoderLayer` take its fused inference fast path, since no weight in it needs
a gradient. The trade-off: the frozen part no longer applies dropout, so its features
are the deterministic ones (usually what you want from a frozen feature extractor, but not
the same regularisation as before). Keras has no per-layer inference switch: a held
subtree's BatchNorm layers are frozen (so Keras runs them in inference mode) and its Dropout
layers get `rate = 0` until the hold is released.
"""


def write(results_dir: Path, docs: Path) -> Path:
    """Regenerate ``docs/benchmarks.md`` and its plots from the full-grid results."""
    img_dir = docs / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    text = [INTRO]
    for device, title in (("cpu", "CPU"), ("cuda", "GPU")):
        path = results_dir / f"{device}.json"
        if not path.exists():
            text += [f"## {title}", "", f"No {title} figures have been measured yet"
                     + (": no GPU machine was available. On a machine with CUDA, `make bench` picks "
                        "the GPU by itself and adds this section." if device == "cuda" else "."), ""]
            continue
        results = json.loads(path.read_text())
        plot_steps(results, img_dir / f"bench-{device}-steps.png")
        if results["apply"]:
            plot_apply(results, img_dir / f"bench-{device}-apply.png")
        text += [f"## {title}", ""] + section(results, f"img/bench-{device}") + notes(results)
    out = docs / "benchmarks.md"
    out.write_text("\n".join(text).rstrip() + "\n")
    return out


APPLY_PROFILE = (
    "Where `ll.apply`'s time goes (cProfile, synthetic torch model of 100k tensors). Before "
    "version 0.2, `apply` was 2.5-3.1x the hand loop: the torch backend built a `Node` object "
    "per module and a `Param` per tensor (about 45% of the time), the resolver flattened that "
    "tree again into lists (15%), the plan made a `ParamPlan` per tensor (15%), and when the "
    "garbage collector resumed it scanned those 100k survivors once (a 64 ms gen-0 pass). Now "
    "the torch backend fills the flat `Tree` arrays the resolver reads in one walk, the plan "
    "stores columns (its `ParamPlan` rows are made only when asked for), a plain path in a "
    "pattern is a dictionary lookup, and a selected subtree is skipped rather than matched "
    "again. What remains is the walk itself, about the cost of `named_parameters()`, plus a "
    "few list operations per tensor; strict checks, tied-parameter decisions, BatchNorm modes "
    "and the report are kept. On Keras, `apply` also syncs the optimizer and rebuilds the "
    "train function, which any correct hand-written freeze must do too (the `hand + compile` "
    "column).")


def notes(results: dict[str, Any]) -> list[str]:
    """Observations that follow from the numbers: contention and where apply's time goes."""
    meta, items = results["meta"], list(results["meta"].get("notes", []))
    loads = [v[0] for v in (meta["machine"].get("load_avg_start"), meta.get("load_avg_end")) if v]
    loads += [v for pair in meta.get("load_avg_by_section", {}).values() for v in pair if v is not None]
    cores = meta["machine"].get("cores") or 1
    if loads and max(loads) > cores:
        spread = [m["iqr"] / m["median"] for d in results["steps"].values()
                  for e in d.get("cases", {}).values() for m in e["modes"].values()]
        items.append(
            f"The machine was shared with other engineers' test runs during this measurement "
            f"(1-minute load average up to {max(loads):.1f} on {cores} cores). Absolute times are "
            f"inflated and noisy (median IQR {100 * _median(spread):.0f}% of the step time); the "
            "ratios come from interleaved samples, so drift cancels, but a ±3% target cannot be "
            "resolved where the IQR is wider than that. Rerun `make bench` on a quiet machine "
            "for tighter figures.")
    if results["apply"]:
        items.append(APPLY_PROFILE)
    if elapsed := meta.get("elapsed_s"):
        items.append("Run time per part (s): " + ", ".join(f"{k} {v}" for k, v in elapsed.items()) + ".")
    return (["### Notes", ""] + [f"- {n}" for n in items] + [""]) if items else []


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else 0.0


def console(results: dict[str, Any]) -> list[str]:
    """A short summary for the terminal: the targets table."""
    return [f"{t}: {m} ({s})" for t, m, s in targets(results)]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print(write(root / "benchmarks" / "results", root / "docs"))
