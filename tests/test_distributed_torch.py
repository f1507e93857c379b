"""DDP on two real processes over loopback gloo: never a silent desync."""

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from . import distributed_worker  # noqa: E402


@pytest.fixture(scope="module")
def ranks():
    return distributed_worker.run_ranks(distributed_worker.main, timeout=60)


def both(ranks, scenario):
    return [ranks[r][scenario] for r in (0, 1)]


def test_freezing_before_wrapping_keeps_ranks_in_sync_and_frozen_weights_fixed(ranks):
    assert all(r["synced"] and r["frozen_same"] for r in both(ranks, "freeze_before_wrap"))


def test_freezing_after_wrapping_is_refused_with_what_to_do_and_changes_nothing(ranks):
    for r in both(ranks, "freeze_after_wrap"):
        assert "find_unused_parameters=False" in r["error"] and "rewrap" in r["error"] and r["unchanged"]
    for r in both(ranks, "freeze_after_wrap_static_graph"):
        assert "static_graph=True" in r["error"]


def test_freezing_after_wrapping_with_find_unused_parameters_is_safe(ranks):
    assert all(r["synced"] and r["frozen_same"] for r in both(ranks, "freeze_after_wrap_find_unused"))


def test_unfreezing_after_wrapping_is_refused_instead_of_drifting_apart(ranks):
    for r in both(ranks, "unfreeze_after_wrap"):
        assert "drift apart" in r["error"] and r["unchanged"]


def test_rewrap_unfreezes_with_gradients_all_reduced(ranks):
    for r in both(ranks, "rewrap"):
        assert r["synced"] and r["moved"] and r["changed"] == ["0.weight", "0.bias"]
        assert r["same_wrapper"]  # rebuilt in place: a reference kept to the old wrapper trains the new set


def test_check_ranks_raises_when_ranks_applied_different_plans(ranks):
    assert all("ranks disagree" in r["error"] for r in both(ranks, "check_ranks_disagree"))
    a, b = both(ranks, "check_ranks_agree")
    assert a["digest"] == b["digest"]


def test_fsdp2_mixes_frozen_and_trainable_parameters_in_one_unit(ranks):
    for r in both(ranks, "fsdp2"):
        assert r["synced"] and r["frozen_same"] and r["state_dict_keys"]


def test_fsdp2_accepts_changes_after_sharding_without_desync(ranks):
    for r in both(ranks, "fsdp2"):
        assert r["after_shard_synced"] and r["after_shard_moved"] and r["after_shard_frozen_same"]


def test_fsdp1_refuses_changes_after_wrapping(ranks):
    for r in both(ranks, "fsdp1"):
        if "skipped" in r:
            pytest.skip(r["skipped"])
        assert "FullyShardedDataParallel" in r["error"]


def test_check_names_a_wrapper_built_with_another_trainable_set_and_the_ranks_really_drift(ranks):
    for r in both(ranks, "check_stale_ddp"):
        assert r["clean_before"] and not r["synced"]
        assert r["kinds"] == ["stale-distributed-wrapper"]
