"""The cost of per-parameter learning rates: layer-wise decay (0.75 per encoder layer) on
the transformer case, against the plain optimizer in the same run.

- torch: ``param_groups(..., layer_decay=...)`` against the same groups built by hand
  (AdamW; the target is 1.01x), the whole step and ``optimizer.step()`` alone, and a single
  group for reference;
- Keras (``keras-tf``, ``keras-torch``, ``keras-jax``): AdamW through
  ``layerlock.keras.with_rates`` against plain AdamW (target 1.03x);
- ``jax`` (Flax NNX, optax): AdamW in ``layerlock.jax.multi_transform`` over the groups, and
  one AdamW chained with ``layerlock.jax.scale_by_rates(groups, lr=...)`` (per-leaf
  multipliers, what a phase ``lr`` uses too), against plain AdamW (target 1.02x), the whole step and the jitted optimizer
  update alone.

Each mode is a fresh model; modes are timed round-robin by ``measure.interleave``.
"""

from __future__ import annotations

from typing import Any, Callable

from .measure import interleave, ratio

LR, DECAY, WD = 1e-3, 0.75, 0.01
Step = Callable[[], Any]


def torch_steps(quick: bool) -> tuple[dict[str, Step], Callable[[], None]]:
    import torch
    import torch.nn.functional as F

    import layerlock.torch as llt

    from .torch_cases import CASES

    case = CASES["transformer"]
    s = case.size(quick)

    def make(mode: str) -> Step:
        torch.manual_seed(0)
        model = case.build(s)
        x, y = case.batch(s, "cpu")
        mode, _, only = mode.partition(":")
        if mode == "layerlock":
            groups: Any = llt.param_groups(model, LR, layer_decay=DECAY, within="backbone.layers")
        elif mode == "hand":  # what people write: one group per encoder layer, by name
            n = len(model.backbone.layers)
            groups = [{"params": list(model.backbone.layers[i].parameters()), "lr": LR * DECAY ** (n - i)}
                      for i in range(n)] + [{"params": list(model.head.parameters()), "lr": LR}]
        else:
            groups = model.parameters()
        opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD)
        if only:  # the optimizer step alone, on fixed gradients: where groups could cost anything
            F.cross_entropy(case.head(model, case.features(model, x)), y).backward()
            return opt.step

        def step() -> None:
            F.cross_entropy(case.head(model, case.features(model, x)), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    return {m: make(m) for m in ("plain", "hand", "layerlock", "hand:optimizer", "layerlock:optimizer")}, lambda: None


def keras_steps(quick: bool) -> tuple[dict[str, Step], Callable[[], None]]:
    import keras

    import layerlock.keras as llk

    from .keras_cases import BACKBONE, CASES, jit_compile, sync

    case = CASES["transformer"]
    s = case.size(quick)

    def make(mode: str) -> Step:
        keras.utils.set_random_seed(0)
        model = case.build(s)
        x, y = case.batch(s)
        optimizer = keras.optimizers.AdamW(LR, weight_decay=WD)
        if mode == "layerlock":
            model.build((None, *x.shape[1:]))
            llk.with_rates(optimizer, llk.param_groups(model, LR, layer_decay=DECAY, within=BACKBONE))
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile())
        return lambda: model.train_on_batch(x, y)

    return {m: make(m) for m in ("plain", "layerlock")}, sync("cpu")


def nnx_steps(quick: bool) -> tuple[dict[str, Step], Callable[[], None]]:
    import jax
    import optax
    from flax import nnx

    import layerlock.flax as llf
    import layerlock.jax as llj

    from .jax_cases import BACKBONE, CASES, sync

    case = CASES["transformer"]
    s = case.size(quick)

    def make(mode: str) -> Step:
        model = case.build(s, nnx.Rngs(params=0, dropout=1))
        model.train()  # dropout on, as in the step suite
        x, y = case.batch(s)
        mode, _, only = mode.partition(":")
        tx = optax.adamw(LR, weight_decay=WD)
        groups = llf.param_groups(model, LR, layer_decay=DECAY, within=BACKBONE)
        if mode == "groups":
            tx = llj.multi_transform(lambda lr: optax.adamw(lr, weight_decay=WD), groups)
        elif mode == "per_leaf":
            tx = optax.chain(tx, llj.scale_by_rates(groups, lr=LR))
        if only:  # the optimizer update alone, on fixed gradients
            params = nnx.state(model, nnx.Param)
            state = [tx.init(params)]
            grads = jax.tree.map(lambda p: p * 1e-3, params)

            @jax.jit
            def update(params: Any, state: Any, grads: Any) -> Any:
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            def apply() -> None:
                nonlocal params
                params, state[0] = update(params, state[0], grads)
                jax.block_until_ready(params)
            return apply
        optimizer = nnx.Optimizer(model, tx, wrt=llf.trainable)

        @nnx.jit
        def train_step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
            def loss_fn(model: Any) -> Any:
                return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

            loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, llf.trainable))(model)
            optimizer.update(model, grads)
            return loss

        last: list[Any] = [None]

        def step() -> None:
            last[0] = train_step(model, optimizer, x, y)
            jax.block_until_ready(last[0])
        return step

    modes = ("plain", "groups", "per_leaf")
    return {m: make(m) for m in (*modes, *(f"{m}:optimizer" for m in modes))}, sync("cpu")


SUITES = {"torch": torch_steps, "keras-tf": keras_steps, "keras-torch": keras_steps, "keras-jax": keras_steps,
          "jax": nnx_steps}
BASELINE = {"torch": "hand"}   # what each suite's layerlock modes are compared with (default: plain)


def run(suite: str, quick: bool, reps: int) -> dict[str, Any]:
    """Every mode of ``suite`` timed round-robin; each mode's time over its baseline's (a
    ``mode:optimizer`` one over ``baseline:optimizer``)."""
    steps, sync = SUITES[suite](quick)
    modes = interleave(steps, reps=reps, sync=sync)
    base = BASELINE.get(suite, "plain")

    def baseline(mode: str) -> str:
        return f"{base}:optimizer" if mode.endswith(":optimizer") else base

    return {"modes": modes, "baseline": base,
            "ratios": {m: ratio(modes, m, baseline(m)) for m in modes if m not in (base, baseline(m))}}
