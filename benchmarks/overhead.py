"""Apply overhead (``ll.plan`` / ``ll.apply`` against a hand-written fnmatch loop and,
for torch, Lightning's ``BaseFinetuning.freeze``) and import time. Each timed call starts from the same all-trainable model: an untimed reset
runs between calls, because applying a spec to an already frozen model does less work."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from .measure import summarize

SYNTHETIC = (1_000, 10_000, 100_000)
REPS = {True: 5, False: 15}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(model: Any, timed: dict[str, Callable[[], Any]], reset: Callable[[], Any],
            reps: int) -> dict[str, Any]:
    """Interleave the timed calls, resetting the model before each; per-call stats."""
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for r in range(reps + 1):  # the first round warms caches and is dropped
        for name, fn in timed.items():
            reset()
            t = _timed(fn)
            if r:
                samples[name].append(t)
    return {name: {"samples_s": s, **summarize(s)} for name, s in samples.items()}


def torch_models(sizes: tuple[int, ...], real: bool) -> Iterator[tuple[str, Any, str]]:
    """(name, model, backbone pattern): synthetic sizes, then real architectures built on
    the meta device (shapes without memory, so bert-base costs nothing to build). One at a
    time: a process holding the other models would slow every walk alike."""
    import torch

    from .torch_cases import synthetic

    if real:  # imported first, so every row pays what a Hugging Face user's process pays
        from transformers import BertConfig, BertForSequenceClassification
    for n in sizes:
        yield f"synthetic-{n // 1000}k" if n >= 1000 else f"synthetic-{n}", synthetic(n), "backbone"
    if real:
        with torch.device("meta"):  # a device mode: it must not stay active while timing
            bert = BertForSequenceClassification(BertConfig())
        yield "bert-base", bert, "bert"


def run_torch(quick: bool, sizes: tuple[int, ...] = SYNTHETIC, real: bool = True) -> dict[str, Any]:
    import layerlock as ll

    from .torch_cases import hand_loop, unfreeze_all

    results = {}
    for name, model, pattern in torch_models(sizes, real):
        spec = ll.freeze(pattern)
        n = sum(1 for _ in model.parameters())
        reps = max(3, REPS[quick] // (3 if n > 50_000 else 1))
        timed = {
            "layerlock_plan": lambda: ll.plan(model, spec),
            "layerlock_apply": lambda: ll.apply(model, spec),
            "hand": lambda: hand_loop(model, pattern),
        }
        lightning = lightning_freeze()
        if lightning is not None:
            timed["lightning"] = lambda: lightning(model.get_submodule(pattern))
        stats = compare(model, timed, lambda: unfreeze_all(model), reps)
        results[name] = {"tensors": n, "calls": stats}
    return results


def lightning_freeze() -> Callable[[Any], None] | None:
    """Lightning's ``BaseFinetuning.freeze`` (its BatchNorm layers keep training, as with
    ``bn='trainable'``), or None when Lightning is not installed."""
    try:
        from lightning.pytorch.callbacks import BaseFinetuning
    except ImportError:
        return None
    return lambda module: BaseFinetuning.freeze(module, train_bn=True)


def run_keras(quick: bool) -> dict[str, Any]:
    import keras

    import layerlock as ll

    from .keras_cases import BACKBONE, build_mobilenet, compile_, hand_loop, image_batch

    size = {"alpha": 1.0, "batch": 2, "hw": 224}
    model = compile_(build_mobilenet(size))
    model.train_on_batch(*image_batch(size))  # apply mid-training: the optimizer is built
    spec = ll.freeze(BACKBONE)

    def hand_and_compile() -> None:
        hand_loop(model, BACKBONE)
        compile_(model)

    stats = compare(model, {
        "layerlock_plan": lambda: ll.plan(model, spec),
        "layerlock_apply": lambda: ll.apply(model, spec),
        "hand": lambda: hand_loop(model, BACKBONE),
        "hand_compile": hand_and_compile,
    }, lambda: ll.apply(model, ll.unfreeze()), REPS[quick])
    layers = sum(1 for _ in model.get_layer(BACKBONE).layers)
    return {"mobilenetv2": {"tensors": len(model.weights), "layers": layers, "calls": stats,
                            "keras_backend": keras.backend.backend()}}


def run(suite: str, quick: bool, **torch_options: Any) -> dict[str, Any]:
    """Apply overhead on the torch models, or on MobileNetV2 for a Keras suite."""
    models = run_torch(quick, **torch_options) if suite == "torch" else run_keras(quick)
    for entry in models.values():
        calls = entry["calls"]
        entry["us_per_tensor"] = {k: 1e6 * v["median"] / entry["tensors"] for k, v in calls.items()}
        entry["apply/hand"] = calls["layerlock_apply"]["median"] / calls["hand"]["median"]
        entry["plan/hand"] = calls["layerlock_plan"]["median"] / calls["hand"]["median"]
        if "lightning" in calls:
            entry["apply/lightning"] = calls["layerlock_apply"]["median"] / calls["lightning"]["median"]
    return {"suite": suite, "models": models}


def growth(models: dict[str, Any], call: str) -> float | None:
    """µs per tensor at 100k over µs per tensor at 1k: 1.0 is linear."""
    small, big = models.get("synthetic-1k"), models.get("synthetic-100k")
    if not small or not big:
        return None
    return big["us_per_tensor"][call] / small["us_per_tensor"][call]


def import_time(reps: int) -> dict[str, Any]:
    """Wall time of ``python -c pass`` and ``python -c 'import layerlock'``, interleaved."""
    commands = {"pass": "pass", "import layerlock": "import layerlock"}
    samples: dict[str, list[float]] = {k: [] for k in commands}
    for r in range(reps + 1):
        for name, code in commands.items():
            t = _timed(lambda: subprocess.run([sys.executable, "-c", code], check=True))
            if r:
                samples[name].append(t)
    stats = {k: {"samples_s": s, **summarize(s)} for k, s in samples.items()}
    added = stats["import layerlock"]["median"] - stats["pass"]["median"]
    return {"commands": stats, "added_ms": 1e3 * added}
