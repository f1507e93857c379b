"""layerlock.torch.FreezeScheduler carries a schedule through DDP by itself: two real
processes over loopback gloo, the wrapper rebuilt in place at each phase change, resumed in
new processes."""

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from . import distributed_worker  # noqa: E402


def spawn(job, tmp):
    """Run ``job`` on 2 spawned ranks."""
    return distributed_worker.run_ranks(distributed_worker.schedule_main, job, str(tmp))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp-schedule")


@pytest.fixture(scope="module")
def ranks(tmp):
    return spawn("train", tmp)


@pytest.fixture(scope="module")
def resumed(ranks, tmp):
    return spawn("resume", tmp)  # after `ranks`, which saved the checkpoint and the reference


def both(results, scenario):
    return [results[r][scenario] for r in (0, 1)]


def test_ranks_stay_bit_identical_through_every_phase(ranks):
    for r in both(ranks, "schedule"):
        assert [e["synced"] for e in r["log"]] == [True] * 4


def test_body_is_bit_identical_while_frozen_and_trains_once_unfrozen(ranks):
    for r in both(ranks, "schedule"):
        assert [e["body_same"] for e in r["log"]] == [True, True, False, False]


def test_the_wrapper_given_is_rebuilt_in_place_at_each_phase_change(ranks):
    for r in both(ranks, "schedule"):
        assert all(e["same_wrapper"] for e in r["log"])  # the loop trains through the wrapper it made
        assert [e["tracked"] for e in r["log"]] == [r["head_tensors"]] * 2 + [r["all_tensors"]] * 2


def test_the_reducer_covers_only_the_trainable_parameters_in_the_frozen_phase(ranks):
    for r in both(ranks, "schedule"):
        frozen, full = r["log"][0], r["log"][3]
        assert (frozen["tracked"], full["tracked"]) == (r["head_tensors"], r["all_tensors"])
        ratio = frozen["bytes_per_step"] / full["bytes_per_step"]
        print(f"bytes all-reduced per step: frozen {frozen['bytes_per_step']:.0f}, full "
              f"{full['bytes_per_step']:.0f}, ratio {ratio:.4f}, trainable share {r['trainable_share']:.4f}")
        assert ratio == pytest.approx(r["trainable_share"], rel=1e-6)


def test_a_run_stopped_in_the_second_phase_resumes_bit_identical_in_new_processes(resumed):
    for r in both(resumed, "resume"):
        assert r["equal"] and r["synced"] and r["phase"] == 1 and r["tracked"] == 6


def test_a_static_graph_wrapper_is_refused_at_construction_and_nothing_changes(ranks):
    for r in both(ranks, "static_graph"):
        assert r["error"] and "static_graph=True" in r["error"] and "static_graph=False" in r["error"]
        assert r["unchanged"]


def test_ranks_that_reach_a_phase_with_different_trainable_sets_are_refused_on_every_rank(ranks):
    for r in both(ranks, "ranks_disagree"):
        assert r["error"] and "ranks disagree" in r["error"]


def test_a_phase_with_nothing_trainable_is_refused_with_what_to_do(ranks):
    for r in both(ranks, "other_refusals"):
        assert "at least one parameter" in r["nothing_trainable"] and r["unchanged"]


def test_a_compiled_ddp_model_recompiles_for_each_phase_and_matches_eager_training(ranks):
    for r in both(ranks, "compiled"):
        assert [(e["synced"], e["body_same"], e["same_wrapper"]) for e in r["log"]] == [(True, True, True)] * 2 + [
            (True, False, True)]
        assert [e["tracked"] for e in r["log"]] == [2, 2, 6]
        assert r["eager_diff"] < 1e-5  # compiled kernels round differently from eager ones


@pytest.mark.parametrize("other", ["schedule", "structure"])
def test_a_loop_state_of_another_schedule_or_model_is_refused_before_anything_changes(other):
    import layerlock as ll
    import layerlock.torch as llt

    schedule = ll.Schedule({0: ll.freeze("0"), 1: ll.unfreeze()})
    saved = llt.FreezeScheduler(schedule, distributed_worker.make(), None, log=None)
    saved.step(1)
    net = distributed_worker.make()
    if other == "schedule":
        schedule, message = ll.Schedule({0: ll.freeze("2"), 1: ll.unfreeze()}), "another schedule.*Schedule.from_dict"
    else:
        net.append(torch.nn.Linear(2, 2))
        message = "another structure.*paths or shapes differ"
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    freezer = llt.FreezeScheduler(schedule, net, optimizer, log=None)
    groups = [list(g["params"]) for g in optimizer.param_groups]
    with pytest.raises(ll.LayerlockError, match=message):
        freezer.load_state_dict(saved.state_dict())
    assert freezer.phase == -1 and all(p.requires_grad for p in net.parameters())  # no phase applied
    assert [list(g["params"]) for g in optimizer.param_groups] == groups and not optimizer.state  # untouched
