"""The Flax NNX half of the demo: ``nnx.jit`` training steps, an ``nnx.Optimizer`` over
``layerlock.flax.trainable``, and a ``layerlock.flax.FreezeScheduler`` that begins each
transfer phase (and syncs the optimizer) when the validation loss says so.

The model names its layers as the torch and Keras models do (``base.block1.conv``, ...,
``pool``, ``head``), as module attributes rather than a list, so the specs of
:mod:`layerlock.demo.config` select the same layers unchanged. Each phase compiles its
training step once (``nnx.jit`` retraces when ``ll.apply`` changes the trainable set); the
model classes and the optax transformations are made once, so that a baseline with phase 1's
layout reuses its compiled step. XLA sizes its CPU thread pool itself (``Config.threads`` is
not applied). Nothing here imports jax until :func:`run` is called.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from ..operations import apply
from .config import FROZEN_BASE, Config, transfer_epochs, transfer_schedule
from .data import Split
from .report import Phase, Recorder, paired
from .torch_run import WIDTHS, run_transfer


def build(classes: int, *, seed: int) -> Any:
    """The demo CNN with the torch model's layer names: ``base`` (``block1..3`` of ``conv``
    and ``bn``, ReLU and max-pool applied in between), ``pool``, ``head``."""
    return _demo_class()(classes, make_rngs(seed))


def make_rngs(seed: int) -> Any:
    """``nnx.Rngs`` on an ``rbg`` key: its random bits come from one XLA op, which compiles
    fast, where the default threefry key compiles a hash per kernel shape on first use
    (measured: 2 s instead of 7 s of CPU to initialise the demo CNN)."""
    import jax
    from flax import nnx

    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.cache
def _demo_class() -> Any:
    """The model classes, defined once: ``nnx.jit`` keys its cache on the module classes, so
    classes made anew for each model would compile every step function again."""
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, width: int, out: int, rngs: nnx.Rngs) -> None:
            self.conv = nnx.Conv(width, out, (3, 3), padding="SAME", rngs=rngs)
            self.bn = nnx.BatchNorm(out, momentum=0.9, epsilon=1e-5, rngs=rngs)  # torch's defaults

        def __call__(self, x: Any) -> Any:
            x = nnx.relu(self.bn(self.conv(x)))
            return nnx.max_pool(x, (2, 2), strides=(2, 2))

    class Base(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            # Named attributes, not a list: "base.block3" is a path here as in torch and Keras.
            self.block1 = Block(3, WIDTHS[0], rngs)
            self.block2 = Block(WIDTHS[0], WIDTHS[1], rngs)
            self.block3 = Block(WIDTHS[1], WIDTHS[2], rngs)

        def __call__(self, x: Any) -> Any:
            return self.block3(self.block2(self.block1(x)))

    class Pool(nnx.Module):  # global average pooling: a layer without parameters, like torch's
        def __call__(self, x: Any) -> Any:
            return jnp.mean(x, axis=(1, 2))

    class Demo(nnx.Module):
        def __init__(self, classes: int, rngs: nnx.Rngs) -> None:
            self.base = Base(rngs)
            self.pool = Pool()
            self.head = nnx.Linear(WIDTHS[-1], classes, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.head(self.pool(self.base(x)))

    return Demo


def trainable(model: Any) -> int:
    """Scalars the optimizer trains: those of the parameters layerlock leaves trainable."""
    import jax
    from flax import nnx

    import layerlock.flax as llf

    return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(model, llf.trainable)))


def optimizer(model: Any, lr: float) -> Any:
    """Adam over the parameters layerlock leaves trainable, its rate a hyperparameter in the
    optimizer state, which the freeze scheduler reads to give phase 2's block its own rate."""
    from flax import nnx

    import layerlock.flax as llf

    return nnx.Optimizer(model, _adam(lr), wrt=llf.trainable)


@functools.cache
def _adam(lr: float) -> Any:
    """One optax transformation per rate: ``nnx.jit`` keys its cache on it too, so the
    random-base baseline reuses phase 1's compiled step."""
    import optax

    return optax.inject_hyperparams(optax.adam)(learning_rate=lr)


@functools.cache
def steps_fns() -> tuple[Any, Any, Any]:
    """The jitted training step, accuracy and mean loss; built once, cached by nnx.jit per model layout."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import layerlock.flax as llf

    @nnx.jit
    def train_step(model: Any, opt: Any, x: Any, y: Any) -> tuple[Any, Any]:
        def loss_fn(model: Any) -> tuple[Any, Any]:
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        # Gradients for the trainable parameters only: nothing flows back into a frozen base.
        grad = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, llf.trainable), has_aux=True)
        (loss, logits), grads = grad(model)
        opt.update(model, grads)
        return loss, jnp.sum(jnp.argmax(logits, -1) == y)

    @nnx.jit
    def hits(model: Any, x: Any, y: Any) -> Any:
        return jnp.sum(jnp.argmax(model(x), -1) == y)

    @nnx.jit
    def mean_loss(model: Any, x: Any, y: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    return train_step, hits, mean_loss


def nhwc(x: Any) -> Any:
    return x.transpose(0, 2, 3, 1)


def accuracy(model: Any, x: Any, y: Any) -> float:
    _, hits, _ = steps_fns()
    model.eval()  # held BatchNorm layers are in inference mode either way
    return float(hits(model, x, y)) / len(y)


def epoch(model: Any, opt: Any, data: Split, cfg: Config, phase: Phase, rng: Any) -> dict[str, float]:
    """One epoch of the plain loop; each step's wall time (forward, backward, optimizer,
    waited for) goes to ``phase``; returns the epoch's validation metrics (none without
    validation images). An epoch's last, short batch is filled up with the epoch's first
    images, so that every step has one shape and the step compiles once per phase, not twice."""
    import numpy as np

    train_step, _, mean_loss = steps_fns()
    x, y = nhwc(data.x), data.y.astype(np.int32)
    model.train()  # frozen BatchNorm layers stay in inference mode (layerlock holds them)
    order = rng.permutation(len(y))
    short = -len(order) % cfg.batch
    order = np.concatenate([order, order[:short]])
    total, hits = 0.0, 0
    for i in range(0, len(order), cfg.batch):
        idx = order[i:i + cfg.batch]
        start, cpu = time.perf_counter(), time.process_time()
        loss, right = train_step(model, opt, x[idx], y[idx])
        loss = float(loss)  # waits for the step
        phase.step(time.perf_counter() - start, time.process_time() - cpu, loss)
        total += loss * len(idx)
        hits += int(right)
    test_acc = accuracy(model, nhwc(data.x_test), data.y_test.astype(np.int32))  # model.eval() from here
    metrics = {"val_loss": float(mean_loss(model, nhwc(data.x_val), data.y_val.astype(np.int32)))} \
        if len(data.y_val) else {}
    phase.epoch(loss=total / len(order), acc=hits / len(order), test_acc=test_acc, val_loss=metrics.get("val_loss"))
    return metrics


def train(model: Any, opt: Any, data: Split, epochs: int, cfg: Config, phase: Phase) -> None:
    """``epochs`` epochs of the plain loop in one phase."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    for _ in range(epochs):
        epoch(model, opt, data, cfg, phase, rng)
    phase.close()


def transfer(model: Any, opt: Any, data: Split, cfg: Config, rec: Recorder) -> None:
    """Both transfer phases in one loop: a :class:`layerlock.flax.FreezeScheduler` on
    :func:`~.config.transfer_schedule` takes each epoch's validation loss and begins the
    fine-tune phase (top block into the optimizer at ``finetune_lr``, the head's Adam state
    and rate kept; the next ``nnx.jit`` step retraces once) at the epoch after the loss
    stopped improving; each phase is recorded on its own."""
    import numpy as np

    import layerlock.flax as llf

    scheduler = llf.FreezeScheduler(transfer_schedule(cfg), model, opt,
                                    bn=cfg.finetune_bn, log=rec.log)  # type: ignore[arg-type]
    rng = np.random.default_rng(cfg.seed)
    run_transfer(scheduler, rec, cfg, steps=steps(data, cfg), trainable=lambda: trainable(model),
                 epoch=lambda phase: epoch(model, opt, data, cfg, phase, rng))


def step_fn(model: Any, opt: Any, data: Split, cfg: Config) -> Any:
    """One training step on a fixed batch, for the paired speed measurement."""
    import numpy as np

    train_step, _, _ = steps_fns()
    x, y = nhwc(data.x[:cfg.batch]), data.y[:cfg.batch].astype(np.int32)
    model.train()  # once: an nnx train() walks every module, which would cost more than the step

    def step() -> None:
        train_step(model, opt, x, y)[0].block_until_ready()
    return step


def steps(data: Split, cfg: Config) -> int:
    return -(-len(data.y) // cfg.batch)


def run(cfg: Config, source: Split, target: Split, rec: Recorder) -> None:
    """Pretrain, phase 1, phase 2, then the two baselines, recording each phase."""
    from flax import nnx

    model = build(source.classes, seed=cfg.seed)
    opt = optimizer(model, cfg.lr)
    train(model, opt, source, cfg.pretrain_epochs, cfg,
          rec.phase("pretrain", "source", epochs=cfg.pretrain_epochs, steps=steps(source, cfg),
                    trainable=trainable(model)))

    # Phases 1 and 2: a new head for the target classes on the pretrained base. The scheduler
    # freezes the base at epoch 0 (layerlock_frozen metadata, BatchNorm statistics held; the
    # optimizer drops the base's state, its wrt filter now covers the head only) and unfreezes
    # the top block once val_loss stops improving.
    model.head = nnx.Linear(model.head.in_features, target.classes, rngs=make_rngs(cfg.seed + 1))
    transfer(model, optimizer(model, cfg.head_lr), target, cfg, rec)

    # Baseline 1: the same head, same budget, on a randomly initialised frozen base.
    random_base = build(target.classes, seed=cfg.seed + 1)
    apply(random_base, FROZEN_BASE)
    head_only = optimizer(random_base, cfg.head_lr)
    train(random_base, head_only, target, cfg.frozen_epochs, cfg,
          rec.phase("random-base", "target", epochs=cfg.frozen_epochs, steps=steps(target, cfg),
                    trainable=trainable(random_base)))

    # Baseline 2: the whole model from scratch for as many epochs as phases 1 and 2 together.
    scratch = build(target.classes, seed=cfg.seed + 1)
    epochs = transfer_epochs(cfg)
    everything = optimizer(scratch, cfg.lr)
    train(scratch, everything, target, epochs, cfg,
          rec.phase("scratch", "target", epochs=epochs, steps=steps(target, cfg), trainable=trainable(scratch)))

    # The speed claim: the same architecture frozen as in phase 1 against fully trainable.
    rec.speed = paired(step_fn(random_base, head_only, target, cfg), step_fn(scratch, everything, target, cfg),
                       cfg.speed_pairs)
