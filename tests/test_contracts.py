"""Same name, same contract: the helpers that exist per framework module take the same
arguments and return the same kind of thing (``docs/helpers.md`` has the table). Each
framework module is compared only where its framework is installed."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest

import layerlock as ll

MODULES = {"torch": "torch", "keras": "keras", "flax": "flax", "jax": "optax", "lightning": "lightning",
           "transformers": "transformers"}
PARAM_GROUPS = ("torch", "keras", "flax", "jax")
SYNC_OPTIMIZER = ("torch", "keras", "flax")
FREEZE_SCHEDULER = ("torch", "keras", "flax", "lightning", "transformers")
LOOP_OWNS_RESUMING = ("torch", "keras", "flax")  # Lightning and the Trainer resume through their checkpoints
SCHEDULER_OPTIONS = {"strict": True, "bn": "follow", "frozen_mode": None, "log": print}


def helpers(name):
    if importlib.util.find_spec(MODULES[name]) is None:
        pytest.skip(f"{MODULES[name]} is not installed")
    return importlib.import_module(f"layerlock.{name}")


def parameters(function):
    return list(inspect.signature(function).parameters.values())


@pytest.mark.parametrize("name", SYNC_OPTIMIZER)
def test_sync_optimizer_takes_optimizer_and_model_then_keywords_only_and_returns_paths(name):
    params = parameters(helpers(name).sync_optimizer)
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert [(p.name, p.kind) for p in params[:2]] == [("optimizer", positional), ("model", positional)]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:]), params
    assert inspect.signature(helpers(name).sync_optimizer).return_annotation == "list[str]"


@pytest.mark.parametrize("name", PARAM_GROUPS)
def test_param_groups_take_the_same_arguments_as_ll_rates(name):
    """``param_groups`` is built from ``ll.rates``: the same names, kinds and defaults after the
    model (``tree`` in layerlock.jax), which comes first."""
    groups, table = parameters(helpers(name).param_groups), parameters(ll.rates)
    def described(params):
        return sorted((p.name, p.kind, repr(p.default)) for p in params[1:])

    assert described(groups) == described(table)
    assert groups[0].name == ("tree" if name == "jax" else "model")


@pytest.mark.parametrize("name", FREEZE_SCHEDULER)
def test_freeze_scheduler_takes_the_schedule_first_and_the_same_keyword_options(name):
    module = helpers(name)
    params = {p.name: p for p in parameters(module.FreezeScheduler)}
    assert next(iter(params)) == "schedule"
    defaults = {**SCHEDULER_OPTIONS, **({"log": module.rank_zero_info} if name == "lightning" else {})}
    for option, default in defaults.items():
        assert option in params, f"layerlock.{name}.FreezeScheduler lacks {option}="
        assert params[option].kind is inspect.Parameter.KEYWORD_ONLY, (name, option)
        assert params[option].default is default or params[option].default == default, (name, option)


@pytest.mark.parametrize("name", LOOP_OWNS_RESUMING)
def test_loop_schedulers_have_resumable_state(name):
    scheduler = helpers(name).FreezeScheduler
    for method in ("state_dict", "load_state_dict"):
        assert callable(getattr(scheduler, method, None)), f"layerlock.{name}.FreezeScheduler lacks {method}()"
    assert [p.name for p in parameters(scheduler.load_state_dict)] == ["self", "state"]


def test_torch_sync_optimizer_refuses_lr_and_scheduler_by_position():
    llt = helpers("torch")
    import torch

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([net.weight], lr=0.1)
    with pytest.raises(TypeError):
        llt.sync_optimizer(opt, net, 0.01)
    assert llt.sync_optimizer(opt, net, lr=0.01) == ["bias"] and opt.param_groups[-1]["lr"] == 0.01


@pytest.mark.parametrize("name", ["torch", "flax"])
def test_loop_schedulers_refuse_a_log_that_is_not_callable(name):
    module = helpers(name)
    with pytest.raises(ll.SpecError, match="log must be a callable"):
        if name == "torch":
            import torch

            module.FreezeScheduler(ll.gradual(1), torch.nn.Linear(2, 1), log=0)
        else:
            from flax import nnx

            module.FreezeScheduler(ll.gradual(1), nnx.Linear(2, 1, rngs=nnx.Rngs(0)), log=0)


def test_the_transformers_callback_refuses_a_log_that_is_not_callable():
    module = helpers("transformers")
    with pytest.raises(ll.SpecError, match="log must be a callable"):
        module.FreezeScheduler(ll.gradual(1), log=False)


def test_the_nnx_scheduler_refuses_a_phase_lr_it_cannot_apply():
    """Every integration applies a phase's lr (tests/test_phase_lr.py, test_keras_rates.py,
    test_jax_rates.py); with no optimizer to apply it to, NNX's scheduler says so when built."""
    if importlib.util.find_spec("flax") is None:
        pytest.skip("flax is not installed")
    from flax import nnx

    llf = importlib.import_module("layerlock.flax")
    with pytest.raises(ll.SpecError, match="not supported by this optimizer"):
        llf.FreezeScheduler(ll.gradual(2, lr=1e-3), nnx.Linear(2, 1, rngs=nnx.Rngs(0)), log=None)
