"""Flax internals behind one door (layerlock/backends/flax_internals.py; the private-name
scan is tests/test_doors.py): the door is also the only module that patches a Flax class, and
a layout it does not know makes ``apply`` refuse, naming the version and the safe fallback,
before anything changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytest.importorskip("jax")
flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import layerlock as ll  # noqa: E402
import layerlock.flax as llf  # noqa: E402

from .test_doors import DOORS, private_uses  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "layerlock"
DOOR = PACKAGE / "backends" / "flax_internals.py"
FLAX_FACING = [PACKAGE / "backends" / "flax.py", PACKAGE / "flax.py"]  # modules that handle Flax models
PATCHED = {"nnx.Module.set_attributes"}  # the mode hold


def _dotted(node: ast.AST) -> str:
    return f"{_dotted(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")


def patches(path: Path) -> set[str]:
    """Attributes of flax objects a module assigns (``nnx.Module.x = ...``, ``setattr(nnx.X, "x", ...)``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) > 1:
            name = node.args[1].value if isinstance(node.args[1], ast.Constant) else "?"
            targets = [ast.Attribute(value=node.args[0], attr=str(name))]
        for target in targets:
            if isinstance(target, ast.Attribute) and _dotted(target).split(".")[0] in ("nnx", "flax"):
                found.add(_dotted(target))
    return found


def test_the_door_holds_the_private_names_and_the_one_patch():
    assert private_uses(DOOR) == DOORS[DOOR] == {"_pytree__nodes", "_pytree__"}
    assert patches(DOOR) == PATCHED


@pytest.mark.parametrize("path", FLAX_FACING, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_flax_facing_modules_use_no_private_flax_name_and_patch_nothing(path):
    assert private_uses(path) == set()
    assert patches(path) == set()


def test_no_other_module_patches_a_flax_class():
    assert {str(p.relative_to(PACKAGE)): found for p in PACKAGE.rglob("*.py") if p != DOOR
            and (found := patches(p))} == {}


# -- a layout layerlock does not know ------------------------------------------------------------
def net():
    return nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))


def a_future_set_attributes(self, *filters, **attributes):  # no raise_if_not_found
    raise AssertionError("never called")


@pytest.mark.parametrize("change", ["other-signature", "not-a-method"])
def test_an_unknown_set_attributes_refuses_a_hold_before_anything_changes(monkeypatch, change):
    model = net()
    future = a_future_set_attributes if change == "other-signature" else None
    monkeypatch.setattr(nnx.Module, "set_attributes", future)
    state = ll.snapshot(model)

    with pytest.raises(ll.BackendError) as info:
        ll.apply(model, ll.freeze("layers.1"))     # a frozen BatchNorm is held
    message = str(info.value)
    assert f"Flax {flax.__version__}" in message and "set_attributes" in message
    assert "Nothing was changed" in message and "bn='trainable'" in message
    assert ll.snapshot(model) == state and llf.is_trainable(model.layers[1].scale)
    assert not model.layers[1].use_running_average
    assert nnx.Module.set_attributes is future  # not wrapped

    # the fallback in the message: no hold, so nothing to patch
    assert ll.apply(model, ll.freeze("layers.0"), bn="trainable").frozen == ("layers.0.kernel", "layers.0.bias")


def test_an_unknown_definition_order_refuses_before_anything_changes(monkeypatch):
    model = net()
    state = ll.snapshot(model)
    monkeypatch.setitem(vars(model), "_pytree__nodes", frozenset({"layers"}))  # flax 0.11: a set, no order

    with pytest.raises(ll.BackendError) as info:
        ll.apply(model, ll.freeze(depth=1, within="layers"))
    message = str(info.value)
    assert f"Flax {flax.__version__}" in message and "frozenset" in message and "Nothing was changed" in message
    monkeypatch.undo()
    assert ll.snapshot(model) == state


def test_the_known_layout_holds_through_train():
    model = net()
    ll.apply(model, ll.freeze("layers.1"))
    model.train()
    assert model.layers[1].use_running_average
    ll.apply(model, ll.unfreeze())
    assert not model.layers[1].use_running_average
