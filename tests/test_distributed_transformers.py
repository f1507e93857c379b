"""The Hugging Face Trainer under torchrun (2 CPU processes, gloo on 127.0.0.1) carries a
multi-phase schedule: layerlock rebuilds the Trainer's DDP wrapper in place at each phase
change. The ranks run tests/trainer_ddp_worker.py."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from . import trainer_ddp_worker as worker  # noqa: E402
from .distributed_worker import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def torchrun(job, out, timeout=180):
    """``torchrun --nproc_per_node=2 trainer_ddp_worker.py job out``; each rank's results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", worker.__file__, job, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(out / f"{job}-{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer-ddp")


@pytest.fixture(scope="module")
def ranks(out):
    return torchrun("train", out)


@pytest.fixture(scope="module")
def resumed(ranks, out):
    return torchrun("resume", out)  # from the checkpoint the epoch run of `ranks` wrote at step 6


def names(run, *prefixes):
    return sorted(n for n in run["names"] if n.startswith(prefixes))


def factor(step, total=12, warmup=2):
    return step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))


UNITS = ("epoch", "step")


@pytest.mark.parametrize("unit", UNITS)
def test_every_phase_trains_its_set_with_the_ranks_bit_identical(ranks, unit):
    for run in (r[unit] for r in ranks):
        head, top = names(run, "classifier"), names(run, "bert.encoder.layer.2.", "bert.encoder.layer.3.")
        assert [e["moved"] for e in run["epochs"]] == [head, sorted(head + top), sorted(run["names"])]
        assert [e["synced"] for e in run["epochs"]] == [True] * 3  # at the start and end of every phase
        assert run["transitions"] == [0, 4, 8]
    assert torch.equal(ranks[0][unit]["final"], ranks[1][unit]["final"])


@pytest.mark.parametrize("unit", UNITS)
def test_the_trainers_own_ddp_wrapper_is_rebuilt_for_each_trainable_set(ranks, unit):
    for run in (r[unit] for r in ranks):
        assert {e["ddp"] for e in run["epochs"]} == {"DistributedDataParallel"}
        assert len({e["wrapper"] for e in run["epochs"]}) == 1  # the Trainer's model_wrapped, in place
        assert [e["tracked"] for e in run["epochs"]] == [e["trainable"] for e in run["epochs"]] == [2, 34, 73]


@pytest.mark.parametrize("unit", UNITS)
def test_unfrozen_layers_follow_the_trainers_lr_schedule(ranks, unit):
    for step, groups in ranks[0][unit]["lrs"]:
        expected = [worker.LR] * 2 + ([] if step < 4 else [worker.TOP_LR] * 2) + ([] if step < 8 else [worker.LR] * 2)
        assert len(groups) == len(expected)
        for (lr, _), base in zip(groups, expected):
            assert math.isclose(lr, base * factor(step), rel_tol=1e-9, abs_tol=1e-15)


def test_resuming_a_checkpoint_of_the_second_phase_in_new_processes_is_bit_identical(ranks, resumed):
    for rank in (0, 1):
        straight, again = ranks[rank]["epoch"], resumed[rank]["epoch"]
        assert torch.equal(straight["final"], again["final"])
        assert straight["groups"] == again["groups"]
        assert [e["synced"] for e in again["epochs"]] == [True, True]  # the rest of epoch 1, then epoch 2
        assert [e["tracked"] for e in again["epochs"]] == [34, 73]  # the replay rebuilt the wrapper
