"""PyTorch internals behind one door (layerlock/backends/torch_internals.py; the scan is
tests/test_doors.py): a layout it does not know makes layerlock refuse, naming the version
and the safe fallback, before anything changes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import layerlock as ll  # noqa: E402
import layerlock.torch as llt  # noqa: E402
from layerlock.backends import torch_internals  # noqa: E402


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))


def test_a_module_without_its_parameter_dict_is_refused_before_anything_changes(monkeypatch):
    model = net()
    state = ll.snapshot(model)
    monkeypatch.delitem(model.__dict__, "_parameters")  # a future torch that keeps them elsewhere
    with pytest.raises(ll.BackendError) as info:
        ll.apply(model, ll.freeze("0"))
    message = str(info.value)
    assert f"PyTorch {torch.__version__}" in message and "Nothing was changed" in message
    assert "requires_grad by hand" in message
    monkeypatch.undo()
    assert ll.snapshot(model) == state


def test_norm_layers_are_found_without_the_private_base_class(monkeypatch):
    monkeypatch.delattr(torch.nn.modules.batchnorm, "_NormBase")
    assert ll.plan(net(), ll.freeze("1")).held == ("1",)


def test_an_unknown_recompile_limit_is_refused(monkeypatch):
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        monkeypatch.setattr(torch._dynamo.config, name, None, raising=False)
    model = net()
    model.compile()
    with pytest.raises(ll.BackendError, match="recompile limit of your torch version by hand"):
        ll.check(model, schedule=ll.gradual(2))


def test_a_scheduler_without_per_group_rates_is_refused_before_the_optimizer_changes():
    model = net()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    del scheduler.base_lrs  # a future torch that keeps them elsewhere
    with pytest.raises(ll.BackendError, match="create the LR scheduler after the last unfreeze"):
        llt.sync_optimizer(opt, model, scheduler=scheduler)
    assert len(opt.param_groups) == 1


def test_the_door_reads_what_the_backend_needs():
    model = net()
    assert list(torch_internals.own_parameters(model[0])) == ["weight", "bias"]
    assert list(torch_internals.own_modules(model)) == ["0", "1", "2"]
    assert torch_internals.compiled_inner(torch.compile(model)) is model
    assert torch_internals.compiled_inner(model) is None
