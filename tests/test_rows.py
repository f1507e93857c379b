"""``rows=``: a rule decides some rows of the tensors it selects (issue 21). The core, on
framework-free trees; the frameworks' row mechanisms are tested in their own files."""

import pytest

import layerlock as ll
from layerlock.resolver import resolve
from layerlock.tree import Node, Param, RowAxis, Tree


def tree(partial=None):
    root = Node("", "Net", children=[
        Node("emb", "Embedding", params=[Param("emb.weight", 40, True, 0)]),
        Node("fc", "Linear", params=[Param("fc.weight", 8, True, 1), Param("fc.bias", 2, True, 2)]),
        Node("ln", "LayerNorm", params=[Param("ln.weight", 4, True, 3)])])
    t = Tree.of(root)
    t.rows = {0: RowAxis((10, 4), 0, partial), 1: RowAxis((2, 4), 0), 2: RowAxis((2,), 0)}
    if partial is not None:
        t.trainable[0] = False
    return t


@pytest.mark.parametrize("rows", ["64:", ":32000", "10:20", [3, 7], "-4:", "::1"])
def test_rows_round_trip_through_dict_json_and_yaml(rows, tmp_path):
    spec = ll.freeze("model.embed_tokens").unfreeze("model.embed_tokens", rows=rows)
    assert ll.Spec.from_dict(spec.to_dict()) == spec == ll.Spec.from_json(spec.to_json())
    pytest.importorskip("yaml")
    spec.save(tmp_path / "spec.yaml")
    assert ll.Spec.load(tmp_path / "spec.yaml") == spec


@pytest.mark.parametrize("rows, says", [("::2", "step of 2"), ("5:3", "empty slice"), ("a:b", "slice string"),
                                        (3, "rows=[3]"), ([], "no index"), (["1"], "not integers"), (True, "received")])
def test_a_malformed_rows_value_is_refused_naming_the_accepted_forms(rows, says):
    with pytest.raises(ll.SpecError, match="list of row indices") as exc:
        ll.unfreeze("emb", rows=rows)
    assert says in str(exc.value)


def test_later_rules_win_per_row_and_a_later_whole_tensor_rule_wins_over_rows():
    plan = resolve(tree(), ll.freeze().unfreeze("emb", rows="6:").freeze("emb", rows=[9]))
    assert plan.rows[0].after == (6, 7, 8) and not plan.trainable_after[0]
    assert plan.partial == ("emb.weight",) and plan.trainable_scalars == 12  # 3 rows x 4
    assert plan.frozen_scalars == 54 - 12
    assert "rows 6:9 of 10" in str(plan) and "#2 freeze('emb', rows=[9])" in str(plan)
    whole = resolve(tree(), ll.freeze().unfreeze("emb", rows="6:").unfreeze("emb"))
    assert whole.partial == () and whole.trainable == ("emb.weight",)


def test_all_rows_unfrozen_is_the_whole_tensor_trainable():
    plan = resolve(tree(), ll.freeze().unfreeze("fc", rows=":"))
    assert plan.trainable == ("fc.weight", "fc.bias") and plan.partial == ()


def test_a_tensor_trainable_in_part_keeps_its_rows_until_a_rule_decides_it():
    plan = resolve(tree(partial=(8, 9)), ll.freeze("fc"))
    assert plan.partial == ("emb.weight",) and "emb.weight" not in plan.changed
    more = resolve(tree(partial=(8, 9)), ll.unfreeze("emb", rows=[7]))
    assert more.rows[0].before == (8, 9) and more.rows[0].after == (7, 8, 9) and more.changed == ("emb.weight",)
    assert "rows 8: of 10 -> rows 7: of 10" in str(more)


@pytest.mark.parametrize("spec, says", [
    (ll.unfreeze("ln", rows=[0]), "ln.weight (4 scalars) has no such axis"),
    (ll.unfreeze("emb", rows="20:"), "selects no row of emb.weight (shape (10, 4), 10 rows on axis 0)"),
    (ll.unfreeze("emb", rows=[10]), "row 10 is out of range for emb.weight (shape (10, 4)")])
def test_rows_a_tensor_cannot_take_are_refused_naming_its_shape(spec, says):
    with pytest.raises(ll.SpecError, match="list of row indices|no such axis") as exc:
        resolve(tree(), spec)
    assert says in str(exc.value)


def test_summary_counts_a_tensor_trainable_in_part_by_its_rows():
    from layerlock.results import Summary

    s = Summary.of(tree(partial=(8, 9)))
    assert s.trainable_scalars == 8 + 10 + 4 and s.frozen_scalars == 32
