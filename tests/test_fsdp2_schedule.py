"""layerlock.torch.FreezeScheduler carries a multi-phase schedule through FSDP2
(``torch.distributed.fsdp.fully_shard`` per block and at the root): two real processes over
loopback gloo, DTensor parameters in the optimizer, resumed in new processes."""

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.fsdp")

from . import distributed_worker  # noqa: E402

BODY = ["body.0.bias", "body.0.weight", "body.2.bias", "body.2.weight"]
HEAD = ["head.bias", "head.weight"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2-schedule")


@pytest.fixture(scope="module")
def ranks(tmp):
    return distributed_worker.run_ranks(distributed_worker.fsdp2_schedule_main, "train", str(tmp), timeout=120)


@pytest.fixture(scope="module")
def resumed(ranks, tmp):  # after `ranks`, which saved the checkpoint and the reference
    return distributed_worker.run_ranks(distributed_worker.fsdp2_schedule_main, "resume", str(tmp), timeout=120)


def logs(results, scenario="schedule"):
    return [results[r][scenario]["log"] for r in (0, 1)]


def test_every_phase_trains_with_ranks_bit_identical_after_each_epoch(ranks):
    for log in logs(ranks):
        assert [e["phase"] for e in log] == [0, 0, 1, 1, 2, 2]
        assert all(e["synced"] and e["dtensor_params"] for e in log)


def test_frozen_parameters_stay_bit_identical_and_trainable_ones_move(ranks):
    for log in logs(ranks):
        assert [e["body_same"] for e in log] == [True, True, False, False, False, False]
        assert [e["head_same"] for e in log] == [False, False, False, False, True, True]


def test_frozen_parameters_are_out_of_backward_and_of_the_reduce_scatter(ranks):
    for r in (0, 1):
        s = ranks[r]["schedule"]
        sizes = [e["bytes_per_step"] for e in s["log"]]
        assert all(e["grads_only_trainable"] for e in s["log"])  # frozen .grad stays None, trainable get one
        assert sizes == [e["trainable_bytes"] for e in s["log"]]  # even sizes: no padding
        assert sizes == [s["head_bytes"]] * 2 + [s["all_bytes"]] * 2 + [s["all_bytes"] - s["head_bytes"]] * 2
        print(f"bytes reduce-scattered per step: {sizes}; frozen ÷ full {sizes[0] / sizes[2]:.4f}, "
              f"trainable share {s['head_bytes'] / s['all_bytes']:.4f}")


def test_the_unfrozen_body_trains_in_a_new_group_at_the_phase_lr(ranks):
    for log in logs(ranks):
        assert log[0]["groups"] == [(None, 0.1, sorted(BODY + HEAD))]
        assert log[2]["groups"] == log[5]["groups"] == [(None, 0.1, HEAD), ("layerlock-sync-1", 1e-3, BODY)]


def test_state_dict_keys_are_the_unsharded_models_in_every_phase(ranks):
    for log in logs(ranks):
        assert all(e["state_dict_keys"] for e in log)


def test_a_run_stopped_in_the_second_phase_resumes_bit_identical_in_new_processes(resumed):
    for r in (0, 1):
        out = resumed[r]["resume"]
        assert out["equal"] and out["phase"] == 2 and all(e["synced"] for e in out["log"])
        assert [e["phase"] for e in out["log"]] == [1, 2, 2]
        assert out["log"][0]["groups"] == [(None, 0.1, HEAD), ("layerlock-sync-1", 1e-3, BODY)]
