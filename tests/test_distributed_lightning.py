"""The Lightning callback carries a freeze schedule through DDP: real 2-process runs on CPU
(gloo, 127.0.0.1) of tests/lightning_ddp_worker.py, one per strategy, run side by side; and
a ``ddp`` run killed inside its second phase and resumed with ``fit(ckpt_path=...)``."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pl = pytest.importorskip("lightning.pytorch")
torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import layerlock as ll  # noqa: E402
from layerlock.lightning import FreezeScheduler  # noqa: E402

WORKER = Path(__file__).parent / "lightning_ddp_worker.py"
STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "ddp_spawn")
SHARDED = ("model_parallel",)  # ModelParallelStrategy with FSDP2 fully_shard: no wrapper to rebuild
BACKBONE = {"backbone.0.weight", "backbone.0.bias"}
HEAD = {"head.weight", "head.bias"}
TIMEOUT = 120  # seconds for all the runs together; they take about 35 s on 2 cores (the resume about 1 s of it)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """strategy -> [rank 0's record, rank 1's record]; the runs go side by side, each under a timeout."""
    root = Path(__file__).resolve().parent.parent
    started = {}
    for group in ("ddp,ddp_find_unused_parameters_true,model_parallel,resume", "ddp_spawn"):  # one pair of processes per group
        out = tmp_path_factory.mktemp("runs")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}
        for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
            env.pop(key, None)
        started[group] = (out, subprocess.Popen([sys.executable, str(WORKER), group, str(out)], cwd=root, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                start_new_session=True))
    deadline, results = time.monotonic() + TIMEOUT, {}
    for group, (out, proc) in started.items():
        try:
            log, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own group: it and the ranks it started
            log, _ = proc.communicate()
        for strategy in group.split(","):  # "resume" writes OUT/resume/rank<r>.json too
            records = [out / strategy / f"rank{r}.json" for r in range(2)]
            results[strategy] = (proc.returncode, log.decode(errors="replace")[-3000:],
                                 [json.loads(f.read_text()) if f.exists() else None for f in records])
    return results


def epochs_of(runs, strategy):
    code, log, records = runs[strategy]
    assert code == 0 and None not in records, log
    assert [r["world"] for r in records] == [2, 2]
    return strategy, [r["epochs"] for r in records]


@pytest.fixture(params=STRATEGIES + SHARDED)
def ranks(request, runs):
    return epochs_of(runs, request.param)


@pytest.fixture(params=STRATEGIES)
def ddp_ranks(request, runs):
    return epochs_of(runs, request.param)


def test_every_phase_trains_and_the_ranks_stay_bit_identical(ranks):
    _, (rank0, rank1) = ranks
    assert len(rank0) == len(rank1) == 3
    for epoch0, epoch1 in zip(rank0, rank1):
        assert epoch0["start"] == epoch1["start"] and epoch0["end"] == epoch1["end"]  # every parameter


def test_frozen_weights_are_bit_identical_while_frozen_and_train_once_unfrozen(ranks):
    _, (epochs, _) = ranks
    moved = [{n for n in e["start"] if e["start"][n] != e["end"][n]} for e in epochs]
    assert moved == [HEAD, BACKBONE | HEAD, BACKBONE]  # freeze backbone; unfreeze it; freeze head
    assert [{n for n, on in e["trainable"].items() if on} for e in epochs] == moved


def test_the_ddp_wrapper_in_force_tracks_exactly_the_trainable_set(ddp_ranks):
    strategy, (epochs, _) = ddp_ranks
    assert all(e["ddp"] for e in epochs)
    assert [e["find_unused"] for e in epochs] == [strategy == "ddp_find_unused_parameters_true"] * 3
    assert [e["tracked"] for e in epochs] == [2, 4, 2]  # frozen tensors are out of the reducer
    assert [e["guard"] for e in epochs] == ["ok"] * 3  # layerlock's own DDP guard agrees
    assert len({e["wrapper"] for e in epochs}) == 1  # Lightning's own wrapper, rebuilt in place


@pytest.fixture
def resumed(runs):
    """variant ("control": no layerlock; "layerlock": RESUME_SCHEDULE) -> the two ranks' records
    of the uninterrupted run, the killed one and the resumed one."""
    code, log, records = runs["resume"]
    assert code == 0 and None not in records, log
    return {variant: [r[variant] for r in records] for variant in ("control", "layerlock")}


def test_the_control_without_layerlock_resumes_bit_identical(resumed):
    # Calibration: Lightning's own kill-and-resume inside an epoch, same model, data and kill.
    for rank in resumed["control"]:
        assert rank["died"] == "killed in step 4"
        assert rank["final"] == rank["reference"]["epochs"][-1]["end"]


def test_a_run_killed_inside_phase_2_resumes_with_ckpt_path_bit_identical(resumed):
    rank0, rank1 = resumed["layerlock"]
    for rank in (rank0, rank1):
        assert rank["died"] == "killed in step 4"  # after the step-3 checkpoint, before step 4's optimizer step
        assert (rank["resumed"]["first"]["epoch"], rank["resumed"]["first"]["batch"]) == (1, 1)  # inside phase 2
        assert rank["final"] == rank["reference"]["epochs"][-1]["end"]  # every parameter, bit for bit
    assert rank0["final"] == rank1["final"]  # the ranks too
    assert [e["end"] for e in rank0["resumed"]["epochs"]] == [e["end"] for e in rank1["resumed"]["epochs"]]


def test_frozen_weights_never_move_before_or_after_the_restart(resumed):
    rank = resumed["layerlock"][0]
    before, after = rank["killed"]["epochs"], rank["resumed"]["epochs"]
    moved = [{n for n in e["start"] if e["start"][n] != e["end"][n]} for e in before + after]
    assert moved == [HEAD, BACKBONE, BACKBONE | HEAD]  # epoch 0; epoch 1 (restart inside it); epoch 2
    restored = rank["resumed"]["first"]["params"]
    assert {n: restored[n] for n in HEAD} == {n: before[0]["end"][n] for n in HEAD}  # head frozen across the kill
    assert {n: after[0]["end"][n] for n in HEAD} == {n: before[0]["end"][n] for n in HEAD}


def test_the_wrapper_in_force_after_the_resume_tracks_the_saved_phase(resumed):
    for rank in resumed["layerlock"]:
        first = rank["resumed"]["first"]  # the first step after the restart
        assert {n for n, on in first["trainable"].items() if on} == BACKBONE  # phase 2 replayed
        assert first["tracked"] == 2  # the wrapper Lightning built for 4 tensors, rebuilt for the backbone's 2
        assert [(e["tracked"], e["guard"]) for e in rank["resumed"]["epochs"]] == [(2, "ok"), (4, "ok")]
        assert len({e["wrapper"] for e in rank["resumed"]["epochs"]}) == 1


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_a_strategy_that_fixes_the_trainable_set_is_refused_in_setup(strategy):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    cls = {"fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}[strategy]
    module = pl.LightningModule()
    module.backbone, module.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    trainer = SimpleNamespace(strategy=cls.__new__(cls))  # setup reads only the strategy's type
    callback = FreezeScheduler(ll.Schedule({0: ll.freeze("backbone"), 1: ll.unfreeze()}), log=None)
    with pytest.raises(ll.DistributedFreezeError, match='strategy="ddp"'):
        callback.setup(trainer, module, "fit")
    assert all(p.requires_grad for p in module.parameters())  # nothing changed
