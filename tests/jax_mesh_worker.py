"""A layerlock schedule on a 2x2 JAX mesh of host devices, with Flax NNX shardings.

Run by ``tests/test_jax_mesh.py`` in a fresh process, since the device count must be set
before jax is imported::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python tests/jax_mesh_worker.py OUT.json

The model follows Flax's NNX sharding guide: kernels annotated with ``nnx.with_partitioning``
(sharded over "model"), created under ``nnx.jit`` with ``nnx.get_partition_spec`` and
``jax.lax.with_sharding_constraint``; the batch is sharded over "data". Each check writes
what it measured to the JSON file (``{"checks": {name: {"ok": bool, ...}}}``); the test
asserts on it.
"""

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import layerlock as ll
import layerlock.flax as llf

RESULT: dict = {"devices": jax.device_count(), "checks": {}}


def record(name, ok, **details):
    RESULT["checks"][name] = {"ok": bool(ok), **details}


class Net(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.body = nnx.Linear(8, 16, rngs=rngs, kernel_init=nnx.with_partitioning(init, (None, "model")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)))
        self.head = nnx.Linear(16, 4, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("model", None)),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


def flat(state):
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def value(v):
    return v.get_value() if isinstance(v, nnx.Variable) else v


def params(model):
    return {p: value(v) for p, v in flat(nnx.state(model, nnx.Param)).items()}


def shardings(model):
    return {p: v.sharding for p, v in params(model).items()}


def host(model):
    return {p: np.asarray(v) for p, v in params(model).items()}


def state_leaves(optimizer):
    """Optimizer-state array leaves by dotted path (e.g. ``0.mu.body.kernel``)."""
    return {p: value(v) for p, v in flat(nnx.state(optimizer, nnx.OptState)).items()}


def param_of(path, names):
    """The parameter a state leaf belongs to (longest parameter path it ends with), or None."""
    hits = [n for n in names if path == n or path.endswith("." + n)]
    return max(hits, key=len) if hits else None


def check_state(tag, optimizer, model):
    """Every per-parameter state leaf: belongs to a trainable parameter, has its sharding,
    and lives on every device its parameter lives on. Frozen ones have none."""
    trainable = set(flat(nnx.state(model, llf.trainable)))
    params_ = params(model)
    sh = {p: v.sharding for p, v in params_.items()}
    leaves = state_leaves(optimizer)
    tracked, bad = set(), []
    for path, leaf in leaves.items():
        owner = param_of(path, sh)
        if owner is None:  # count, learning_rate, ...: scalars of no parameter, on the whole mesh
            if leaf.sharding.device_set != set(mesh.devices.flat):
                bad.append(f"{path}: on {len(leaf.sharding.device_set)} of {mesh.devices.size} devices")
            continue
        if owner not in trainable:
            bad.append(f"{path}: state for frozen {owner}")
        elif leaf.shape != params_[owner].shape:  # a per-parameter scalar (scale_by_rates' multiplier)
            if leaf.sharding.device_set != sh[owner].device_set:
                bad.append(f"{path}: scalar on {len(leaf.sharding.device_set)} devices, not its parameter's")
        else:
            tracked.add(owner)
            if not leaf.sharding.is_equivalent_to(sh[owner], leaf.ndim):
                bad.append(f"{path}: {leaf.sharding} != {sh[owner]}")
    missing = sorted(trainable - tracked)
    record(tag, not bad and not missing and tracked == trainable, bad=bad, missing=missing,
           tracked=sorted(tracked), trainable=sorted(trainable))
    return leaves


# Auto axes, as in Flax's NNX sharding guide: XLA propagates the shardings through the step
# (with Explicit axes, the head's contraction over "model" needs an out_sharding in nnx.Linear).
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
X = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
Y = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
data_sharding = NamedSharding(mesh, P("data", None))


@nnx.jit
def create():
    model = Net(nnx.Rngs(0))
    state = nnx.state(model)
    pspecs = nnx.get_partition_spec(state)
    nnx.update(model, jax.lax.with_sharding_constraint(state, pspecs))
    return model


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, x, y):
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, llf.trainable))(model, x, y)
    optimizer.update(model, grads)


def train(model, optimizer, steps=3):
    x, y = jax.device_put(X, data_sharding), jax.device_put(Y, data_sharding)
    for _ in range(steps):
        train_step(model, optimizer, x, y)


def check_trained(tag, before, model, expected_sh, should_move):
    after = host(model)
    frozen_moved = [p for p in before if p not in should_move and after[p].tobytes() != before[p].tobytes()]
    still = [p for p in should_move if np.array_equal(after[p], before[p])]
    changed = [p for p, s in shardings(model).items() if s != expected_sh[p]]
    record(tag, not frozen_moved and not still and not changed,
           frozen_moved=frozen_moved, not_moved=still, sharding_changed=changed)


def scenario(inject):
    tag = "inject_" if inject else ""
    with jax.set_mesh(mesh):
        model = create()
        sh0 = shardings(model)
        RESULT[tag + "shardings"] = {p: str(s.spec) for p, s in sh0.items()}
        sharded = [p for p, s in sh0.items() if "model" in str(s.spec)]
        record(tag + "model_is_sharded", set(sharded) == {"body.kernel", "body.bias", "head.kernel"},
               sharded=sharded)

        before = host(model)
        ll.apply(model, ll.freeze("body"))
        changed = [p for p, s in shardings(model).items() if s != sh0[p]]
        same = all(host(model)[p].tobytes() == before[p].tobytes() for p in before)
        record(tag + "apply_keeps_shardings", not changed and same, changed=changed)

        tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2) if inject else optax.adam(1e-2)
        optimizer = nnx.Optimizer(model, tx, wrt=llf.trainable)
        check_state(tag + "optimizer_state_frozen_phase", optimizer, model)

        before = host(model)
        train(model, optimizer)
        check_trained(tag + "frozen_phase_trains_trainable_set", before, model, sh0, {"head.kernel", "head.bias"})
        check_state(tag + "optimizer_state_after_frozen_steps", optimizer, model)
        moments = {p: np.asarray(v) for p, v in state_leaves(optimizer).items() if param_of(p, sh0)}

        ll.apply(model, ll.unfreeze())
        changed = [p for p, s in shardings(model).items() if s != sh0[p]]
        record(tag + "unfreeze_keeps_shardings", not changed, changed=changed)
        added = llf.sync_optimizer(optimizer, model, lr=1e-3) if inject else llf.sync_optimizer(optimizer, model)
        record(tag + "sync_adds_body", sorted(added) == ["body.bias", "body.kernel"], added=added)
        leaves = check_state(tag + "optimizer_state_after_sync", optimizer, model)
        # the moments of what stayed trainable are kept; with lr=, the state moves one level
        # down (opt_state.X becomes opt_state.0.X, scale_by_rates chained after the optimizer)
        lost = []
        for p, m in moments.items():
            tail = p.removeprefix("opt_state.")
            hit = [q for q in leaves if q in (p, f"opt_state.0.{tail}")]
            if len(hit) != 1 or np.asarray(leaves[hit[0]]).tobytes() != m.tobytes():
                lost.append(p)
        record(tag + "sync_keeps_moments", not lost and bool(moments), lost=lost, kept=len(moments))

        before = host(model)
        train(model, optimizer)
        check_trained(tag + "unfrozen_phase_trains_everything", before, model, sh0, set(before))
        check_state(tag + "optimizer_state_after_unfrozen_steps", optimizer, model)


def main(out):
    try:
        scenario(inject=False)
        scenario(inject=True)
    except Exception:
        RESULT["error"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(RESULT, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
