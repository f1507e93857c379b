"""Metric-driven phases in the plain torch loop and the Flax NNX loop (issue 22):
``step(epoch, metrics=...)`` fed the recorded sequence of tests/metric_table.py gives its
phases; restore_best brings back the phase's best epoch; a resumed run continues with the same
phase, wait count and best value; two processes take the same decision."""

from collections import OrderedDict

import pytest

import layerlock as ll

from . import metric_table

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock.torch as llt  # noqa: E402


def torch_net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(body=nn.Linear(4, 8), act=nn.ReLU(), head=nn.Linear(8, 2)))


def torch_epoch(model, optimizer, epoch, steps=2):
    g = torch.Generator().manual_seed(epoch)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_torch(schedule, epochs=range(10), model=None, optimizer=None, freezer=None, seen=None):
    model = model or torch_net()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    freezer = freezer or llt.FreezeScheduler(schedule, model, optimizer, log=None)
    seen = [] if seen is None else seen
    for epoch in epochs:
        freezer.step(epoch, metrics={metric_table.MONITOR: metric_table.VALUES[epoch - 1]} if epoch else None)
        seen.append((freezer.phase, weights(model)))
        torch_epoch(model, optimizer, epoch)
    return model, optimizer, freezer, seen


def test_the_recorded_sequence_gives_the_table_phases_in_a_torch_loop():
    messages = []
    model = torch_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    freezer = llt.FreezeScheduler(metric_table.schedule("body", "head"), model, optimizer, log=messages.append)
    _, _, freezer, seen = run_torch(None, model=model, optimizer=optimizer, freezer=freezer)
    assert [phase for phase, _ in seen] == metric_table.PHASES
    assert freezer.stepper.tracker.starts == metric_table.STARTS
    body = [w["body.weight"] for _, w in seen[:5]]   # frozen in epochs 0-3: bit-identical up to epoch 4's start
    assert all(torch.equal(body[0], b) for b in body) and not torch.equal(seen[5][1]["body.weight"], body[0])
    assert messages[1].startswith("layerlock: epoch 4: val_loss did not improve by 0.01 on 0.8 (epoch 1) for 2 epochs: "
                                  "phase 2/3")


def test_restore_best_brings_back_the_best_epoch_before_the_next_phase():
    schedule = metric_table.schedule("body", "head", restore_best=True)
    messages = []
    model = torch_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    freezer = llt.FreezeScheduler(schedule, model, optimizer, scheduler=scheduler, log=messages.append)
    seen, momentum, rates = [], {}, {}
    for epoch in range(6):
        freezer.step(epoch, metrics={metric_table.MONITOR: metric_table.VALUES[epoch - 1]} if epoch else None)
        seen.append(weights(model))
        momentum[epoch] = optimizer.state_dict()["state"][2]["momentum_buffer"].clone() if epoch else None
        rates[epoch] = scheduler.last_epoch
        torch_epoch(model, optimizer, epoch)
        scheduler.step()
    # the best epoch of phase 0 is epoch 1 (0.8): its end is what step(2) saw; phase 1 starts from it
    assert all(torch.equal(seen[4][k], seen[2][k]) for k in seen[2])
    assert torch.equal(momentum[4], momentum[2]) and rates[4] == rates[2]
    assert "best epoch restored" in messages[1]


def test_a_resumed_torch_loop_continues_with_the_same_phase_wait_and_best(tmp_path):
    schedule = metric_table.schedule("body", "head")
    whole, _, whole_freezer, _ = run_torch(schedule)
    model, optimizer, freezer, _ = run_torch(schedule, epochs=range(6))   # stopped after epoch 5, in phase 1
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "freezer": freezer.state_dict()},
               tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt")
    model = torch_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    freezer = llt.FreezeScheduler(schedule, model, optimizer, log=None)
    freezer.load_state_dict(saved["freezer"])
    optimizer.load_state_dict(saved["optimizer"])
    model.load_state_dict(saved["model"])
    assert freezer.phase == 1 and freezer.stepper.tracker.state_dict() == {"starts": [0, 4], "best": 0.7, "best_epoch": 4,
                                                                           "wait": 0, "epochs": 1}
    _, _, freezer, seen = run_torch(schedule, epochs=range(6, 10), model=model, optimizer=optimizer, freezer=freezer)
    assert [p for p, _ in seen] == metric_table.PHASES[6:]
    assert freezer.stepper.tracker.state_dict() == whole_freezer.stepper.tracker.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))
    other = ll.MetricSchedule(schedule.specs, monitor="val_loss", patience=3)
    with pytest.raises(ll.LayerlockError, match="another schedule"):
        llt.FreezeScheduler(other, torch_net(), log=None).load_state_dict(saved["freezer"])


def test_a_loop_that_passes_no_metrics_is_told_what_to_pass():
    freezer = llt.FreezeScheduler(metric_table.schedule("body", "head"), torch_net(), log=None)
    freezer.step(0)
    with pytest.raises(ll.SpecError, match=r"step\(1, metrics=\{\.\.\.\}\) needs the metrics of epoch 0"):
        freezer.step(1)
    with pytest.raises(ll.SpecError, match=r"they have \['loss'\]"):
        freezer.step(1, metrics={"loss": 1.0})


def test_two_processes_take_the_same_decision_on_the_mean_metric():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from layerlock.stepper import PlateauTracker

    from . import distributed_worker

    results = distributed_worker.run_ranks(distributed_worker.metric_main, timeout=120)
    expected = PlateauTracker(metric_table.schedule("body", "head"))
    phases = []
    for epoch, value in enumerate(distributed_worker.metric_mean()):
        phases.append(expected.schedule().phase_index(epoch))
        expected.observe(epoch, {"val_loss": value})
    assert results[0]["phases"] == results[1]["phases"] == phases == [0] * 8 + [1, 1]
    # neither rank alone: rank 0's own sequence moves on at epochs 4 and 7, rank 1's never
    assert all(r["in_sync"] for r in results.values())


flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import layerlock.flax as llf  # noqa: E402


class NnxNet(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.body, self.head = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.body(x)))


def nnx_epoch(model, optimizer, epoch):
    import jax
    import numpy as np
    import optax

    rng = np.random.default_rng(epoch)
    x, y = rng.standard_normal((8, 4), dtype=np.float32), rng.integers(0, 2, 8)

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, llf.trainable))(model)
    optimizer.update(model, grads)
    jax.block_until_ready(model.head.kernel.get_value())


def nnx_weights(model):
    import numpy as np

    return {k: np.array(v.get_value()) for k, v in llf.parameters(model).items()}


@pytest.mark.parametrize("restore_best", [False, True], ids=["plain", "restore-best"])
def test_the_recorded_sequence_gives_the_table_phases_in_an_nnx_loop(restore_best):
    import numpy as np
    import optax

    model = NnxNet()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=llf.trainable)
    freezer = llf.FreezeScheduler(metric_table.schedule("body", "head", restore_best=restore_best), model, optimizer,
                                  log=None)
    phases, seen = [], []
    for epoch in range(10):
        freezer.step(epoch, metrics={metric_table.MONITOR: metric_table.VALUES[epoch - 1]} if epoch else None)
        phases.append(freezer.phase)
        seen.append(nnx_weights(model))
        nnx_epoch(model, optimizer, epoch)
    assert phases == metric_table.PHASES and freezer.stepper.tracker.starts == metric_table.STARTS
    assert all(np.array_equal(seen[0]["body.kernel"], w["body.kernel"]) for w in seen[:5])
    if restore_best:  # phase 1 starts from the end of epoch 1, the best of phase 0
        assert all(np.array_equal(seen[4][k], seen[2][k]) for k in seen[2])
    else:
        assert not np.array_equal(seen[4]["head.kernel"], seen[2]["head.kernel"])


def test_a_resumed_nnx_loop_with_restore_best_ends_as_the_uninterrupted_one():
    import pickle

    import numpy as np
    import optax
    from flax import serialization

    schedule = metric_table.schedule("body", "head", restore_best=True)

    def start():
        model = NnxNet()
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=llf.trainable)
        return model, optimizer, llf.FreezeScheduler(schedule, model, optimizer, log=None)

    def run(model, optimizer, freezer, epochs):
        for epoch in epochs:
            freezer.step(epoch, metrics={metric_table.MONITOR: metric_table.VALUES[epoch - 1]} if epoch else None)
            nnx_epoch(model, optimizer, epoch)

    whole = start()
    run(*whole, range(10))
    model, optimizer, freezer = start()
    run(model, optimizer, freezer, range(6))  # stopped after epoch 5: phase 1, its best epoch (4) kept
    saved = pickle.dumps({"model": serialization.to_bytes(nnx.to_pure_dict(nnx.state(model))),
                          "optimizer": pickle.dumps(nnx.to_pure_dict(nnx.state(optimizer))),
                          "freezer": freezer.state_dict()})
    loaded = pickle.loads(saved)
    model, optimizer, freezer = start()
    freezer.load_state_dict(loaded["freezer"])  # replays phase 1: the optimizer takes the body in
    for node, pure in ((optimizer, pickle.loads(loaded["optimizer"])),
                       (model, serialization.from_bytes(nnx.to_pure_dict(nnx.state(model)), loaded["model"]))):
        state = nnx.state(node)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(node, state)
    run(model, optimizer, freezer, range(6, 10))  # epoch 6 ends phase 1: the kept epoch 4 comes back
    assert freezer.stepper.tracker.state_dict() == whole[2].stepper.tracker.state_dict()
    assert all(np.array_equal(a, b) for a, b in zip(nnx_weights(model).values(), nnx_weights(whole[0]).values()))
