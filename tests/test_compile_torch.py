"""torch.compile: after ll.apply the compiled model trains like eager mode."""

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.torch as llt  # noqa: E402


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def train(model, forward, apply_at):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    frozen_before = None
    for step in range(6):
        if step in apply_at:
            ll.apply(forward, apply_at[step])
            frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        optimizer.step()
    frozen_same = all(torch.equal(v, dict(model.named_parameters())[n]) for n, v in frozen_before.items())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, frozen_same


def test_compiled_model_after_apply_trains_like_eager():
    schedule = {2: ll.freeze("0"), 4: ll.unfreeze("0").freeze("2")}
    eager_model = make()
    eager, _ = train(eager_model, eager_model, schedule)
    model = make()
    compiled, frozen_same = train(model, torch.compile(model, backend="aot_eager"), schedule)
    assert frozen_same
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6)


def test_schedule_beyond_the_recompile_limit_warns_before_training():
    model = make()
    compiled = torch.compile(model, backend="eager")
    with pytest.warns(ll.LayerlockWarning, match="recompile_limit"):  # at the first step, before training
        llt.FreezeScheduler(ll.Schedule({e: ll.freeze() for e in range(12)}), compiled, None, log=None).step(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llt.FreezeScheduler(ll.gradual(3), compiled, None, log=None).step(0)
        llt.FreezeScheduler(ll.Schedule({e: ll.freeze() for e in range(12)}), model, None, log=None).step(0)


def test_reentrant_checkpoint_after_a_frozen_input_loses_gradients_and_the_documented_fix_works():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.ModuleDict(dict(embed=nn.Linear(4, 4), block=nn.Linear(4, 4), head=nn.Linear(4, 1)))
    ll.apply(model, ll.freeze("embed"))
    x = torch.randn(2, 4)
    for reentrant, expect_grad in ((True, False), (False, True)):
        model["block"].weight.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = checkpoint(model["block"], model["embed"](x), use_reentrant=reentrant)
            model["head"](h).sum().backward()
        assert (model["block"].weight.grad is not None) is expect_grad
