"""The Keras half of the demo: ``model.fit`` on compiled models, frozen with ``ll.apply`` or
a :class:`layerlock.keras.FreezeScheduler` during ``fit``.

Keras runs on its default backend (TensorFlow unless ``KERAS_BACKEND`` says otherwise).
Nothing here imports Keras until :func:`run` is called.
"""

from __future__ import annotations

import time
from typing import Any

from ..operations import apply
from .config import FROZEN_BASE, TRANSFER, Config, planned_epochs, transfer_epochs, transfer_schedule
from .data import SIZE, Split
from .report import Phase, Recorder, import_keras, paired
from .torch_run import WIDTHS


def _limit_threads(n: int) -> None:
    keras = import_keras()  # the demo's first Keras import: without TensorFlow's start-up lines

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:  # only possible before TensorFlow runs its first op
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
    elif keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(n)


def build(classes: int, base: Any = None) -> Any:
    """The demo CNN with the torch model's layer names: ``base`` (blocks ``block1..3`` of
    ``conv``/``bn``/``relu``/``pool``), ``pool``, ``head``; reuses ``base`` when given."""
    import keras
    from keras import layers

    if base is None:
        blocks = [keras.Sequential([
            layers.Conv2D(w, 3, padding="same", name="conv"),
            layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn"),  # torch's defaults
            layers.ReLU(name="relu"), layers.MaxPooling2D(2, name="pool")], name=f"block{i}")
            for i, w in enumerate(WIDTHS, 1)]
        base = keras.Sequential([keras.Input((SIZE, SIZE, 3)), *blocks], name="base")
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), base, layers.GlobalAveragePooling2D(name="pool"),
                             layers.Dense(classes, name="head")], name="demo")


def compile_(model: Any, lr: float) -> Any:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def trainable(model: Any) -> int:
    return sum(int(v.numpy().size) for v in model.trainable_weights)


def nhwc(x: Any) -> Any:
    return x.transpose(0, 2, 3, 1)


def test_accuracy(model: Any, data: Split) -> float:
    import keras

    logits = keras.ops.convert_to_numpy(model(nhwc(data.x_test), training=False))
    return float((logits.argmax(1) == data.y_test).mean())


def fit(model: Any, data: Split, cfg: Config, rec: Recorder, name: str, epochs: int,
        scheduler: Any = None) -> None:
    """One ``model.fit`` of ``epochs`` epochs, with a callback feeding the trace: phase
    ``name``, or with a metric ``scheduler`` (a FreezeScheduler callback, placed first so the
    trainable set is in place and ``val_loss`` judged when the trace runs) the transfer
    phases, each recorded from the epoch the scheduler began it. Validation data, where
    ``data`` has any, gives ``logs`` its ``val_loss``; the test accuracy is measured apart."""
    import keras

    class Trace(keras.callbacks.Callback):
        phase: Phase | None = None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            now = name if scheduler is None else TRANSFER[scheduler.phase]
            if self.phase is None or self.phase.name != now:  # a new phase: its trainable set is in place by now
                if self.phase is not None:
                    self.phase.close()
                planned = epochs if scheduler is None else planned_epochs(cfg, scheduler.phase, epoch)
                self.phase = rec.phase(now, "target" if now != "pretrain" else "source", epochs=planned,
                                       steps=steps(data, cfg), trainable=trainable(self.model), start=epoch)

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            loss = float((logs or {}).get("loss", float("nan")))  # also waits for the step to end
            assert self.phase is not None
            self.phase.step(time.perf_counter() - self.start[0], time.process_time() - self.start[1], loss)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            assert self.phase is not None
            self.phase.epoch(loss=logs["loss"], acc=logs["accuracy"], test_acc=test_accuracy(self.model, data),
                             val_loss=logs.get("val_loss"))

        def on_train_end(self, logs: Any = None) -> None:
            if self.phase is not None:
                self.phase.close()

    validation = (nhwc(data.x_val), data.y_val) if len(data.y_val) else None
    model.fit(nhwc(data.x), data.y, batch_size=cfg.batch, epochs=epochs, shuffle=True, verbose=0,
              validation_data=validation, callbacks=[*([scheduler] if scheduler is not None else []), Trace()])


def step_fn(model: Any, data: Split, cfg: Config) -> Any:
    x, y = nhwc(data.x[:cfg.batch]), data.y[:cfg.batch]
    return lambda: model.train_on_batch(x, y)


def steps(data: Split, cfg: Config) -> int:
    return -(-len(data.y) // cfg.batch)


def run(cfg: Config, source: Split, target: Split, rec: Recorder) -> None:
    """Pretrain, phases 1 and 2 in one ``fit`` driven by a FreezeScheduler, then the two
    baselines, recording each phase."""
    _limit_threads(cfg.threads)
    import keras

    import layerlock.keras as llk

    keras.utils.set_random_seed(cfg.seed)
    model = compile_(build(source.classes), cfg.lr)
    fit(model, source, cfg, rec, "pretrain", cfg.pretrain_epochs)

    # A new head for the target classes on the pretrained base. The scheduler applies phase 1
    # (base frozen) at epoch 0 and, at the epoch after val_loss stopped improving, phase 2
    # (top block unfrozen, at the lower rate) in the same fit: layerlock brings the compiled
    # model and its optimizer in step, no recompile, and the head's Adam state and rate carry
    # over. bn="frozen" keeps every BatchNorm in inference mode.
    keras.utils.set_random_seed(cfg.seed + 1)
    model = compile_(build(target.classes, base=model.get_layer("base")), cfg.head_lr)
    scheduler = llk.FreezeScheduler(transfer_schedule(cfg), bn=cfg.finetune_bn, log=rec.log)  # type: ignore[arg-type]
    fit(model, target, cfg, rec, "frozen", transfer_epochs(cfg), scheduler)
    rec.starts = dict(zip(TRANSFER, scheduler.stepper.tracker.starts))  # type: ignore[union-attr]

    # Baseline 1: the same head, same budget, on a randomly initialised frozen base, frozen
    # with ll.apply after compile.
    keras.utils.set_random_seed(cfg.seed + 1)
    random_base = compile_(build(target.classes), cfg.head_lr)
    apply(random_base, FROZEN_BASE)
    fit(random_base, target, cfg, rec, "random-base", cfg.frozen_epochs)

    # Baseline 2: the whole model from scratch for as many epochs as phases 1 and 2 together.
    keras.utils.set_random_seed(cfg.seed + 1)
    scratch = compile_(build(target.classes), cfg.lr)
    fit(scratch, target, cfg, rec, "scratch", transfer_epochs(cfg))

    rec.speed = paired(step_fn(random_base, target, cfg), step_fn(scratch, target, cfg), cfg.speed_pairs)
