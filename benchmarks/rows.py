"""Training only some rows of a table: the 64 new token rows of a 32000 x 256 embedding
(``ll.freeze().unfreeze("emb", rows="31936:")``), against the whole table trained.

Model: Embedding(32000, 256) -> mean over tokens -> Linear / Dense(256, 16); one batch of
32 x 128 token ids in which every 16th position is a new id; cross-entropy; AdamW (lr 1e-3,
weight decay 0.01). Only the table trains in every mode (the head is frozen, as PEFT leaves it).

- torch: *full* (the whole table), *peft* (``TrainableTokensConfig(target_modules=["emb"],
  token_indices=new_ids)`` and ``get_peft_model``; skipped, with the reason, without peft),
  *mask* (the whole table with a gradient hook multiplying by a 0/1 row mask and no weight
  decay, the hand-made version) and *layerlock* (``ll.apply`` with ``rows=``, the optimizer
  built afterwards from the parameters that require a gradient); AdamW ``foreach=True``;
- Keras (``keras-tf``, ``keras-torch``, ``keras-jax``): *full* (the head's ``trainable = False``)
  and *layerlock* (``ll.apply``, then ``compile`` with a stock AdamW and ``train_on_batch``);
- ``jax`` (Flax NNX): *full* (a path filter on the table, ``optax.adamw``) and *layerlock*
  (``layerlock.flax.train_rows(optax.adamw(...), model)``, ``wrt=layerlock.flax.trainable``).

Each mode is a fresh model; modes are timed round-robin by ``measure.interleave``. Per mode,
after training: the bytes of the optimizer state's arrays (ndim > 0) and the trainable
scalars. :func:`probe` builds one mode in a fresh process (the worker) and trains it
:data:`PROBE_STEPS` steps: its peak RSS minus the RSS after building model and optimizer.
Everything runs on the CPU (the parent hides any GPU), so RSS is the memory figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .measure import current_rss_mb, interleave, peak_rss_mb, ratio

LR, WD, CLASSES, EVERY = 1e-3, 0.01, 16, 16   # every 16th token position is a new id
SIZES = {False: {"vocab": 32000, "dim": 256, "new": 64, "batch": 32, "seq": 128},
         True: {"vocab": 4000, "dim": 64, "new": 16, "batch": 8, "seq": 32}}
MODES = {"torch": ("full", "peft", "mask", "layerlock"), "keras-tf": ("full", "layerlock"),
         "keras-torch": ("full", "layerlock"), "keras-jax": ("full", "layerlock"), "jax": ("full", "layerlock")}
SUITES = tuple(MODES)
RATIOS = {"torch": (("layerlock", "peft"), ("layerlock", "full"), ("mask", "peft"), ("full", "peft"))}
BASELINE = {"torch": "peft"}   # what the table's "÷ baseline" divides by (default: full)
PROBE_STEPS = 3
Step = Callable[[], Any]


@dataclass
class Mode:
    step: Step
    state_bytes: Callable[[], int]   # the optimizer state's array bytes, read after training
    trainable: int                   # trainable scalars


def spec(s: dict[str, int]) -> Any:
    import layerlock as ll
    return ll.freeze().unfreeze("emb", rows=f"{s['vocab'] - s['new']}:")


def tokens(s: dict[str, int]) -> tuple[Any, Any]:
    """One seeded batch of token ids (int32) in which new ids occur, and labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, s["vocab"], (s["batch"], s["seq"]))
    x[:, ::EVERY] = rng.integers(s["vocab"] - s["new"], s["vocab"], x[:, ::EVERY].shape)
    return x.astype(np.int32), rng.integers(0, CLASSES, s["batch"])


def torch_mode(mode: str, s: dict[str, int]) -> Mode:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import layerlock as ll

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(s["vocab"], s["dim"]), nn.Linear(s["dim"], CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(x).mean(1))

    torch.manual_seed(0)
    net = Net()
    model: nn.Module = net   # PEFT wraps it
    x, y = (torch.from_numpy(a).long() for a in tokens(s))
    new_ids = list(range(s["vocab"] - s["new"], s["vocab"]))
    wd = WD
    if mode == "layerlock":
        ll.apply(model, spec(s))
    elif mode == "peft":
        from peft import TrainableTokensConfig, get_peft_model
        model.requires_grad_(False)
        model = get_peft_model(model, TrainableTokensConfig(target_modules=["emb"], token_indices=new_ids))
    else:
        model.requires_grad_(False)
        net.emb.weight.requires_grad_(True)
    if mode == "mask":  # by hand: zero the frozen rows' gradient; weight decay would move them
        keep = torch.zeros(s["vocab"], 1)
        keep[new_ids] = 1
        net.emb.weight.register_hook(lambda g: g * keep)
        wd = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=wd, foreach=True)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def state_bytes() -> int:
        return sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())

    return Mode(step, state_bytes, sum(p.numel() for p in params))


def keras_mode(mode: str, s: dict[str, int]) -> Mode:
    import keras
    import numpy as np

    import layerlock as ll

    from .keras_cases import jit_compile

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((s["seq"],), dtype="int32"),
                              keras.layers.Embedding(s["vocab"], s["dim"], name="emb"),
                              keras.layers.GlobalAveragePooling1D(name="pool"),
                              keras.layers.Dense(CLASSES, name="head")], name="rows")
    x, y = tokens(s)
    if mode == "layerlock":
        trainable = ll.apply(model, spec(s)).trainable_scalars
    else:
        model.get_layer("head").trainable = False
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    optimizer = keras.optimizers.AdamW(LR, weight_decay=WD)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile())

    def state_bytes() -> int:
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in optimizer.variables if len(v.shape))

    return Mode(lambda: model.train_on_batch(x, y), state_bytes, trainable)


def nnx_mode(mode: str, s: dict[str, int]) -> Mode:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import layerlock as ll
    import layerlock.flax as llf

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.emb = nnx.Embed(s["vocab"], s["dim"], rngs=rngs)
            self.head = nnx.Linear(s["dim"], CLASSES, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.head(self.emb(x).mean(1))

    def table_only(path: tuple[Any, ...], value: Any) -> bool:   # the hand-written filter of *full*
        return isinstance(value, nnx.Param) and bool(path) and path[0] == "emb"

    model = Net(nnx.Rngs(0))
    x, y = (jnp.asarray(a) for a in tokens(s))
    tx = optax.adamw(LR, weight_decay=WD)
    if mode == "layerlock":
        trainable = ll.apply(model, spec(s)).trainable_scalars
        wrt: Any = llf.trainable
        tx = llf.train_rows(tx, model)
    else:
        wrt, trainable = table_only, s["vocab"] * s["dim"]
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)

    @nnx.jit
    def train_step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
        def loss_fn(model: Any) -> Any:
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    def step() -> None:
        jax.block_until_ready(train_step(model, optimizer, x, y))

    def state_bytes() -> int:
        leaves = jax.tree_util.tree_leaves(nnx.state(optimizer, nnx.OptState))
        return int(sum(np.asarray(leaf).nbytes for leaf in leaves if np.ndim(leaf)))

    return Mode(step, state_bytes, trainable)


BUILDERS = {"torch": torch_mode, "keras-tf": keras_mode, "keras-torch": keras_mode, "keras-jax": keras_mode,
            "jax": nnx_mode}


def missing(mode: str) -> str | None:
    """Why a mode cannot run here, or None."""
    if mode != "peft":
        return None
    try:
        import peft  # noqa: F401
    except ImportError as e:
        return f"peft not importable: {e}"
    return None


def baseline(suite: str, modes: dict[str, Any]) -> str:
    base = BASELINE.get(suite, "full")
    return base if base in modes else "full"


def run(suite: str, quick: bool, reps: int) -> dict[str, Any]:
    """Every mode of ``suite`` timed round-robin, with its optimizer-state bytes and
    trainable scalars; the ratios of :data:`RATIOS` (default: layerlock/full)."""
    s = SIZES[quick]
    skipped = {m: why for m in MODES[suite] if (why := missing(m))}
    built = {m: BUILDERS[suite](m, s) for m in MODES[suite] if m not in skipped}
    modes = interleave({m: b.step for m, b in built.items()}, reps=reps)
    for m, b in built.items():
        modes[m].update(opt_state_bytes=b.state_bytes(), trainable_scalars=b.trainable)
    pairs = RATIOS.get(suite, (("layerlock", "full"),))
    return {"size": s, "modes": modes, "skipped": skipped, "baseline": baseline(suite, modes),
            "ratios": {f"{a}/{b}": r for a, b in pairs if (r := ratio(modes, a, b)) is not None}}


def probe(suite: str, mode: str, quick: bool) -> dict[str, Any]:
    """Peak RSS of building one mode and training it a few steps, over the RSS after building."""
    if why := missing(mode):
        return {"error": why}
    built = BUILDERS[suite](mode, SIZES[quick])
    after_build = current_rss_mb()
    for _ in range(PROBE_STEPS):
        built.step()
    peak = peak_rss_mb()
    return {"peak_rss_mb": peak, "rss_after_build_mb": after_build, "train_increment_mb": peak - after_build}


def add_memory(data: dict[str, Any], memory: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The probes of a suite's modes, and layerlock's peak over the baseline's (``peak layerlock/BASE``)."""
    data["memory"] = memory
    base = data["baseline"]
    a, b = (memory.get(m, {}).get("train_increment_mb") for m in ("layerlock", base))
    if a is not None and b:
        data["ratios"][f"peak layerlock/{base}"] = a / b
    return data
