"""``ll.rates``: the framework-free rate table every ``param_groups`` is built from."""

import math

import pytest

import layerlock as ll
from layerlock.tree import Node, Param


def mlp(n: int = 3) -> Node:
    """``n`` blocks of weight + bias, then nothing: what ``depth`` counts are the blocks."""
    return Node("", "Net", children=[
        Node(f"b{i}", "Linear", params=[Param(f"b{i}.w", 4, True, 2 * i), Param(f"b{i}.bias", 2, True, 2 * i + 1)])
        for i in range(n)])


def test_layer_decay_gives_the_top_block_lr_and_each_block_below_a_factor_more():
    r = ll.rates(mlp(), 1.0, layer_decay=0.5)
    assert r.lr == {"b0.w": 0.25, "b0.bias": 0.25, "b1.w": 0.5, "b1.bias": 0.5, "b2.w": 1.0, "b2.bias": 1.0}
    assert [g["name"] for g in r.groups] == ["block0", "block1", "block2"]


def test_layer_decay_counts_the_blocks_depth_counts():
    """A transparent container around a list: depth counts the list's entries, and so does
    layer_decay (the same model written as nnx.Sequential / eqx.nn.MLP / a ModuleList)."""
    inner = mlp(3)
    root = Node("", "MLP", children=[Node("layers", "list", children=[
        Node(f"layers.{i}", "Linear", params=[Param(f"layers.{i}.w", 4, True, i)]) for i in range(3)])])
    from layerlock.resolver import resolve
    assert resolve(root, ll.freeze(depth=2)).frozen == ("layers.0.w", "layers.1.w")
    assert list(ll.rates(root, 1.0, layer_decay=0.5).lr.values()) == [0.25, 0.5, 1.0]
    assert list(ll.rates(inner, 1.0, layer_decay=0.5).lrs)[::2] == [0.25, 0.5, 1.0]


def test_lr_mult_last_match_wins_and_selects_subtrees_like_a_spec():
    r = ll.rates(mlp(), 0.1, lr_mult={"b*": 0.5, "b2": 10})
    assert r.lr["b0.w"] == 0.05 and math.isclose(r.lr["b2.bias"], 1.0)
    assert r.names[0] == "lr_mult[b*]" and r.names[-1] == "lr_mult[b2]"


def test_weight_decay_and_no_decay_split_the_groups():
    r = ll.rates(mlp(2), 1.0, weight_decay=0.1, no_decay="*bias")
    assert r.weight_decay == {"b0.w": 0.1, "b0.bias": 0.0, "b1.w": 0.1, "b1.bias": 0.0}
    assert [g["name"] for g in r.groups] == ["default", "no_decay"]
    assert r.groups[1] == {"name": "no_decay", "lr": 1.0, "weight_decay": 0.0, "paths": ["b0.bias", "b1.bias"]}


def test_frozen_parameters_get_no_row_and_tied_ones_one():
    root = Node("", "Net", children=[Node("a", "Linear", params=[Param("a.w", 4, False, 0)]),
                                     Node("b", "Linear", params=[Param("b.w", 4, True, 1)]),
                                     Node("c", "Linear", params=[Param("c.w", 4, True, 1)])])
    assert ll.rates(root, 1.0).paths == ("b.w",)


def test_the_table_prints_one_row_per_parameter():
    text = str(ll.rates(mlp(2), 1e-3, layer_decay=0.5, weight_decay=0.01, no_decay="*bias"))
    assert text.splitlines()[0] == "rates: 4 trainable parameters in 4 groups, base lr 0.001"
    assert "b0.bias    block0/no_decay  0.0005  0" in text
    assert ll.rates(mlp(1), 1.0).to_dict()["b0.w"] == {"group": "default", "lr": 1.0, "weight_decay": None}


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "lr must be a finite number > 0; received -1.0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0; received nan"),
    ({"lr": float("inf")}, "lr must be a finite number > 0; received inf"),
    ({"lr": True}, "lr must be a finite number > 0; received True"),
    ({"lr": 1.0, "lr_mult": {"b0": -2}}, "lr_mult['b0'] must be a finite number >= 0; received -2"),
    ({"lr": 1.0, "lr_mult": {"b0": float("nan")}}, "lr_mult['b0'] must be a finite number >= 0; received nan"),
    ({"lr": 1.0, "layer_decay": 0}, "layer_decay must be a number in (0, 1]; received 0"),
    ({"lr": 1.0, "layer_decay": 1.5}, "layer_decay must be a number in (0, 1]; received 1.5"),
    ({"lr": 1.0, "weight_decay": -0.1}, "weight_decay must be a finite number >= 0; received -0.1"),
])
def test_bad_rates_raise_spec_errors_naming_what_was_received(kwargs, message):
    with pytest.raises(ll.SpecError) as e:
        ll.rates(mlp(), **kwargs)
    assert str(e.value) == message


def test_a_multiplier_pattern_that_matches_nothing_names_the_closest_paths():
    with pytest.raises(ll.NoMatchError) as e:
        ll.rates(mlp(), 1.0, lr_mult={"b9.w": 2})
    assert e.value.pattern == "b9.w" and "b0.w" in e.value.suggestions
    with pytest.warns(ll.LayerlockWarning):
        assert ll.rates(mlp(), 1.0, lr_mult={"b9.w": 2}, strict=False).lr["b0.w"] == 1.0
