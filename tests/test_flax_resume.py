"""Flax NNX: a loop stopped inside a later phase, saved as a user saves it (``nnx.state`` of
the model and the optimizer, serialised to bytes, and ``FreezeScheduler.state_dict()``), then
resumed into fresh objects, ends bit-identical to an uninterrupted run; a state of another
schedule or model structure is refused before anything changes. Tiny models, CPU."""

import json
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
serialization = pytest.importorskip("flax.serialization")

import jax.numpy as jnp  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.flax as llf  # noqa: E402

STEPS = 2  # per epoch; the run is stopped after the first step of ``stop``


class Net(nnx.Module):
    def __init__(self, rngs, width=4):
        self.body = nnx.Linear(3, width, rngs=rngs)
        self.head = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


def train_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, llf.trainable))(model)
    optimizer.update(model, grads)


def batch(step):
    k1, k2 = jax.random.split(jax.random.key(step))
    return jax.random.normal(k1, (8, 3)), jax.random.normal(k2, (8, 2))


def params(model):
    return {path: np.asarray(var.get_value()).copy() for path, var in llf.parameters(model).items()}


def start(schedule, tx, width=4):
    model = Net(nnx.Rngs(0), width)
    optimizer = nnx.Optimizer(model, tx(), wrt=llf.trainable)
    return model, optimizer, llf.FreezeScheduler(schedule, model, optimizer, log=None)


def run(model, optimizer, freezer, steps, moved):
    """Train ``steps`` (global step numbers), stepping the schedule at each epoch's first
    step; ``moved`` gets, per step, the parameters that changed."""
    for step in steps:
        if step % STEPS == 0:
            freezer.step(step // STEPS)
        before = params(model)
        train_step(model, optimizer, *batch(step))
        after = params(model)
        moved.append({p for p in before if before[p].tobytes() != after[p].tobytes()})


def save(model, optimizer, freezer):
    """What a user writes to disk: bytes of the model and optimizer states and JSON of the schedule's."""
    return (serialization.to_bytes(nnx.to_pure_dict(nnx.state(model))),
            pickle.dumps(nnx.to_pure_dict(nnx.state(optimizer))), json.dumps(freezer.state_dict()))


def restore(model, optimizer, freezer, saved):
    """In the documented order: the schedule first (replays its phases), then the states."""
    model_bytes, optimizer_bytes, freezer_json = saved
    freezer.load_state_dict(json.loads(freezer_json))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), model_bytes))
    nnx.update(model, state)
    state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(state, pickle.loads(optimizer_bytes))
    nnx.update(optimizer, state)


BODY, HEAD = {"body.kernel", "body.bias"}, {"head.kernel", "head.bias"}
CASES = {
    # Phase 2 (epoch 1, where the run stops) freezes the head, which phase 3 trains again.
    "adamw": (ll.Schedule({0: ll.freeze("body"), 1: ll.unfreeze("body").freeze("head"), 2: ll.unfreeze("head")}),
              lambda: optax.adamw(1e-2, weight_decay=0.1), 3, 1,
              [HEAD] * 2 + [BODY] * 2 + [BODY | HEAD] * 2),
    # The phase rate lives in the optimizer state (scale_by_rates' multipliers).
    "phase lr": (ll.Schedule({0: ll.freeze("body"), 2: ll.unfreeze()}, lr={2: 1e-3}),
                 lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), 4, 2,
                 [HEAD] * 4 + [BODY | HEAD] * 4),
}


@pytest.mark.parametrize("case", CASES)
def test_an_nnx_run_stopped_inside_a_later_phase_resumes_bit_identical_from_saved_bytes(case):
    schedule, tx, epochs, stop, expected = CASES[case]
    steps, cut = range(epochs * STEPS), stop * STEPS + 1  # stopped after the first step of epoch ``stop``
    reference, moved_reference = start(schedule, tx), []
    run(*reference, steps, moved_reference)

    first, moved = start(schedule, tx), []
    run(*first, steps[:cut], moved)
    saved = save(*first)
    del first

    model, optimizer, freezer = start(schedule, tx)  # fresh objects, same seed
    restore(model, optimizer, freezer, saved)
    assert freezer.phase == schedule.phase_index(stop)
    run(model, optimizer, freezer, steps[cut:], moved)

    final, want = params(model), params(reference[0])
    assert all(final[p].tobytes() == want[p].tobytes() for p in want)  # bit for bit
    assert moved == moved_reference == expected  # frozen weights never move, before or after the restart


def phase_applied(model):
    return {p: llf.is_trainable(v) for p, v in llf.parameters(model).items()}


@pytest.mark.parametrize("other", ["schedule", "structure"])
def test_an_nnx_state_of_another_schedule_or_model_is_refused_before_anything_changes(other):
    schedule, tx, _, _, _ = CASES["phase lr"]
    first = start(schedule, tx)
    first[2].step(2)
    state = first[2].state_dict()
    if other == "schedule":
        model, optimizer, freezer = start(ll.Schedule({0: ll.freeze("head"), 2: ll.unfreeze()}, lr={2: 1e-3}), tx)
        message = "saved with another schedule.*Schedule.from_dict"
    else:
        model, optimizer, freezer = start(schedule, tx, width=5)
        message = "another structure.*paths or shapes differ"
    trainable, opt_state = phase_applied(model), pickle.dumps(nnx.to_pure_dict(nnx.state(optimizer)))
    with pytest.raises(ll.LayerlockError, match=message):
        freezer.load_state_dict(state)
    assert freezer.phase == -1 and phase_applied(model) == trainable  # no phase applied
    assert pickle.dumps(nnx.to_pure_dict(nnx.state(optimizer))) == opt_state  # optimizer untouched
