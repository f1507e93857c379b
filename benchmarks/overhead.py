"""Apply overhead (``ll.plan`` / ``ll.apply`` against a hand-written fnmatch loop and,
for torch, Lightning's ``BaseFinetuning.freeze``), the Hugging Face Trainer callback's
time per step, and import time. Each timed call starts from the same all-trainable model: an untimed reset
runs between calls, because applying a spec to an already frozen model does less work."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
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


TRAINER_STEPS = {True: 24, False: 60}   # three phases of equal length
TRAINER_REPS = {True: 2, False: 6}


def token_data(n: int, seq: int) -> Any:
    """``n`` random token sequences of length ``seq`` (vocabulary 1000) with a parity label:
    a dataset for the Trainer benchmarks."""
    import torch

    class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(1, 1000, (n, seq), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}

    return Data()


def step_timer() -> Any:
    """A ``TrainerCallback`` whose ``marks`` are the times each step began, then the end."""
    import transformers

    class Timer(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.marks.append(time.perf_counter())

    return Timer()


def run_trainer(quick: bool) -> dict[str, Any]:
    """Time per ``Trainer`` step of a small BERT under a three-phase unfreezing schedule by
    step, with ``layerlock.transformers.FreezeScheduler`` and with a hand-written callback
    doing the same transitions (``requires_grad`` + ``add_param_group`` + the scheduler's
    lists), interleaved. Both runs train the same parameters at every step."""
    import torch
    import transformers

    import layerlock as ll
    from layerlock.transformers import FreezeScheduler

    transformers.logging.set_verbosity_error()
    steps, batch, lr = TRAINER_STEPS[quick], 8, 1e-3
    third = steps // 3
    blocks = ("bert.encoder.layer.2.", "bert.encoder.layer.3.")
    schedule = ll.Schedule({0: ll.freeze("bert"), third: ll.unfreeze(*(b[:-1] for b in blocks)),
                            2 * third: ll.unfreeze()})

    class Hand(transformers.TrainerCallback):
        """The same schedule written by hand, as a Trainer user would without layerlock, with
        the same optimizer layout (new weight-decay and no-decay groups at each phase)."""

        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                          lr_scheduler: Any = None, **kwargs: Any) -> None:
            if state.global_step not in (third, 2 * third):
                return
            prefixes = blocks if state.global_step == third else ("",)
            new = [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes) and not p.requires_grad]
            decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
            for _, p in new:
                p.requires_grad_(True)
            for weight_decay, params in ((args.weight_decay, [p for n, p in new if n in decay]),
                                         (0.0, [p for n, p in new if n not in decay])):
                optimizer.add_param_group({"params": params, "weight_decay": weight_decay, "initial_lr": lr,
                                           "lr": lr * lr_scheduler.lr_lambdas[0](lr_scheduler.last_epoch)})
                lr_scheduler.base_lrs.append(lr)
                lr_scheduler.lr_lambdas.append(lr_scheduler.lr_lambdas[0])

    def run(mode: str) -> list[float]:
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=32)
        model = transformers.BertForSequenceClassification(config)
        timer = step_timer()
        if mode == "hand":
            for n, p in model.named_parameters():
                p.requires_grad_(not n.startswith("bert."))
            callbacks: list[Any] = [timer, Hand()]
        else:
            callbacks = [timer, FreezeScheduler(schedule, unit="step", log=None)]
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
            warmup_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            logging_strategy="no", dataloader_num_workers=0)
        transformers.Trainer(model=model, args=args, train_dataset=token_data(steps * batch, 16),
                             callbacks=callbacks).train()
        return [b - a for a, b in zip(timer.marks, timer.marks[1:])]

    samples: dict[str, list[list[float]]] = {"hand": [], "layerlock": []}
    for r in range(TRAINER_REPS[quick] + 1):  # the first round warms up and is dropped
        for mode in (("hand", "layerlock") if r % 2 else ("layerlock", "hand")):
            times = run(mode)
            if r:
                samples[mode].append(times)
    out: dict[str, Any] = {"steps": steps, "transitions": [third, 2 * third], "reps": TRAINER_REPS[quick],
                           "model": "BertForSequenceClassification, hidden 64, 4 layers, sequence 16, batch 8", "modes": {}}
    for mode, runs in samples.items():
        per_step = [statistics.median(run[s] for run in runs) for s in range(steps)]
        out["modes"][mode] = {"median_step_s": statistics.median(per_step), "mean_step_s": statistics.mean(per_step),
                              "transition_steps_s": [per_step[third], per_step[2 * third]]}
    a, b = out["modes"]["layerlock"], out["modes"]["hand"]
    out["step/hand"] = a["median_step_s"] / b["median_step_s"]
    out["mean step/hand"] = a["mean_step_s"] / b["mean_step_s"]
    return out
