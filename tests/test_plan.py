"""Resolving specs against framework-free trees: selectors, rule order, strictness, bn policies."""

import dataclasses
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

import layerlock as ll
from layerlock.resolver import blocks, resolve
from layerlock.tree import Node, Param

from .fake import FakeModel, resnetish


def frozen_layers(plan):
    return sorted({p.rpartition(".")[0] for p in plan.frozen})


def tree():
    return resnetish().node()


def test_pattern_on_a_layer_selects_its_whole_subtree():
    plan = resolve(tree(), ll.freeze("backbone"))
    assert frozen_layers(plan) == [f"backbone.layer{i}.{m}" for i in range(1, 5) for m in ("bn", "conv")]


def test_later_rule_wins():
    plan = resolve(tree(), ll.freeze("backbone").unfreeze("backbone.layer4"))
    assert "backbone.layer4.conv.weight" in plan.trainable
    assert "backbone.layer3.conv.weight" in plan.frozen
    entry = next(p for p in plan.params if p.path == "backbone.layer4.conv.weight")
    assert entry.rule == 1 and plan.describe(entry.rule) == "#1 unfreeze('backbone.layer4')"


def test_unselected_parameters_keep_their_state():
    model = resnetish()
    model.trainable["head.bias"] = False
    plan = resolve(model.node(), ll.freeze("stem"))
    entry = next(p for p in plan.params if p.path == "head.bias")
    assert entry.trainable_after is False and entry.rule is None


@pytest.mark.parametrize("depth, blocks", [(1, ["stem"]), (2, ["stem", "backbone"]), (-1, ["stem", "backbone"]),
                                           (-3, []), (0, []), (3, ["stem", "backbone", "head"])])
def test_depth_has_the_meaning_of_python_slicing(depth, blocks):
    plan = resolve(tree(), ll.freeze(depth=depth))
    assert list(dict.fromkeys(p.split(".")[0] for p in plan.frozen)) == blocks


def test_depth_within_a_container_counts_its_children():
    plan = resolve(tree(), ll.freeze(depth=-1, within="backbone"))
    assert frozen_layers(plan) == [f"backbone.layer{i}.{m}" for i in range(1, 4) for m in ("bn", "conv")]


def test_depth_beyond_the_blocks_is_a_spec_error_or_a_warning():
    with pytest.raises(ll.SpecError, match="depth=5 but the model has 3 blocks"):
        resolve(tree(), ll.freeze(depth=5))
    with pytest.warns(ll.LayerlockWarning, match="depth=-4"):
        plan = resolve(tree(), ll.freeze(depth=-4), strict=False)
    assert plan.frozen == ()


def test_kind_globs_match_class_names():
    plan = resolve(tree(), ll.freeze(kind="Batch*"))
    assert frozen_layers(plan) == ["backbone.layer1.bn", "backbone.layer2.bn", "backbone.layer3.bn",
                                   "backbone.layer4.bn", "stem.bn"]


def test_parameter_patterns_select_single_parameters():
    plan = resolve(tree(), ll.freeze().unfreeze("*.bias"))
    assert all(p.endswith(".bias") for p in plan.trainable) and len(plan.trainable) == 10


def test_selectors_in_one_rule_combine_as_a_union():
    plan = resolve(tree(), ll.freeze("head", kind="Stem"))
    assert sorted({p.split(".")[0] for p in plan.frozen}) == ["head", "stem"]


def test_regex_patterns():
    plan = resolve(tree(), ll.freeze("re:backbone\\.layer[12]"))
    assert {p.split(".")[1] for p in plan.frozen} == {"layer1", "layer2"}


def test_typo_raises_no_match_error_with_closest_paths():
    with pytest.raises(ll.NoMatchError) as info:
        resolve(tree(), ll.freeze("backbone.layr4"))
    assert info.value.pattern == "backbone.layr4"
    assert info.value.suggestions[0] == "backbone.layer4"
    assert "backbone.layer4" in str(info.value)


def test_every_pattern_of_a_rule_must_match_in_strict_mode():
    with pytest.raises(ll.NoMatchError, match="'bakbone'"):
        resolve(tree(), ll.freeze("backbone", "bakbone"))


def test_kind_typo_and_unknown_within_suggest():
    with pytest.raises(ll.NoMatchError, match="BatchNorm"):
        resolve(tree(), ll.freeze(kind="BatchNrm"))
    with pytest.raises(ll.NoMatchError, match="closest containers: backbone"):
        resolve(tree(), ll.freeze(depth=1, within="backbon"))


def test_strict_false_turns_no_match_into_a_warning():
    with pytest.warns(ll.LayerlockWarning, match="nothing"):
        plan = resolve(tree(), ll.freeze("nothing").freeze("head"), strict=False)
    assert frozen_layers(plan) == ["head"]


def test_bn_follow_holds_frozen_norm_layers_in_inference_mode():
    plan = resolve(tree(), ll.freeze("backbone").unfreeze("backbone.layer4"))
    assert sorted(plan.held) == ["backbone.layer1.bn", "backbone.layer2.bn", "backbone.layer3.bn"]


def test_bn_trainable_keeps_norm_layers_training():
    plan = resolve(tree(), ll.freeze(), bn="trainable")
    assert set(plan.trainable) == {p.path for n in tree().walk() if n.norm for p in n.params}
    assert plan.held == ()


def test_bn_frozen_freezes_every_norm_layer():
    plan = resolve(tree(), ll.unfreeze(), bn="frozen")
    assert frozen_layers(plan) == ["backbone.layer1.bn", "backbone.layer2.bn", "backbone.layer3.bn",
                                   "backbone.layer4.bn", "stem.bn"]
    assert len(plan.held) == 5
    assert {p.rule for p in plan.params if not p.trainable_after} == {"bn"}


def test_frozen_mode_eval_holds_the_topmost_fully_frozen_subtrees():
    plan = resolve(tree(), ll.freeze("stem", "backbone").unfreeze("backbone.layer4.bn"), frozen_mode="eval")
    held = {lp.path: lp.reason for lp in plan.layers if lp.held_after}
    assert held["stem"] == "frozen_mode" and "backbone" not in held
    assert held["backbone.layer4.conv"] == "frozen_mode"
    assert "backbone.layer1" in held and "backbone.layer1.bn" in held


def test_unknown_options_are_spec_errors():
    with pytest.raises(ll.SpecError, match="bn must be one of"):
        resolve(tree(), ll.freeze(), bn="freeze")
    with pytest.raises(ll.SpecError, match="frozen_mode"):
        resolve(tree(), ll.freeze(), frozen_mode="inference")
    with pytest.raises(ll.SpecError, match="must be a layerlock.Spec"):
        resolve(tree(), {"rules": []})


def tied_tree():
    shared = Param("embed.weight", 12, True, "E")
    return Node("", "LM", children=[
        Node("embed", "Embedding", params=[shared], key="embed"),
        Node("body", "Linear", params=[Param("body.weight", 4, True, "B")], key="body"),
        Node("lm_head", "Linear", params=[Param("lm_head.weight", 12, True, "E")], key="lm_head")])


def test_tied_parameters_are_one_parameter_with_one_decision():
    plan = resolve(tied_tree(), ll.freeze("lm_head"))
    assert plan.frozen == ("embed.weight",)
    assert plan.params[0].aliases == ("lm_head.weight",)
    assert plan.frozen_scalars == 12
    assert "embed.weight (= lm_head.weight)" in str(plan)


def test_rules_that_disagree_about_a_tied_parameter_are_reported():
    with pytest.raises(ll.SpecError, match="embed.weight = lm_head.weight"):
        resolve(tied_tree(), ll.freeze("embed").unfreeze("lm_head"))
    with pytest.warns(ll.LayerlockWarning, match="disagree"):
        plan = resolve(tied_tree(), ll.freeze("embed").unfreeze("lm_head"), strict=False)
    assert plan.trainable[0] == "embed.weight"  # the later rule


def test_a_later_rule_on_one_path_of_a_tied_parameter_decides_it_without_conflict():
    plan = resolve(tied_tree(), ll.unfreeze().freeze("embed"))  # "everything but the embeddings"
    assert plan.frozen == ("embed.weight",)
    plan = resolve(tied_tree(), ll.freeze("embed").unfreeze())
    assert plan.frozen == ()


def test_layer_only_backends_refuse_plans_that_split_a_layer():
    with pytest.raises(ll.SpecError, match="whole layers only.*'head'"):
        resolve(tree(), ll.freeze().unfreeze("head.bias"), param_level=False)


def test_plan_and_summary_print_readable_tables(fake_backend):
    model = resnetish()
    plan = ll.apply(model, ll.freeze("backbone").unfreeze("*.bias"))
    text = str(plan)
    assert "backbone.layer1.conv.weight" in text and "trainable -> frozen" in text
    assert "#0 freeze('backbone')" in text and "frozen 40 scalars" in text
    summary = str(ll.summary(model))
    assert "backbone" in summary and "40" in summary and "total" in summary
    assert plan.to_dict()["frozen_scalars"] == 40


def test_plan_is_a_dry_run(fake_backend):
    model = resnetish()
    before = ll.snapshot(model)
    ll.plan(model, ll.freeze())
    assert ll.snapshot(model) == before


def test_failed_apply_changes_nothing(fake_backend):
    model = resnetish()
    before = ll.snapshot(model)
    with pytest.raises(ll.NoMatchError):
        ll.apply(model, ll.freeze("backbone").freeze("typo"))
    assert ll.snapshot(model) == before


def test_apply_is_idempotent(fake_backend):
    model = resnetish()
    spec = ll.freeze("backbone").unfreeze("*.bias")
    ll.apply(model, spec)
    again = ll.apply(model, spec)
    assert again.changed == () and all(lp.held_before == lp.held_after for lp in again.layers)


def test_frozen_context_restores_exactly_even_on_error(fake_backend):
    model = resnetish()
    ll.apply(model, ll.freeze("stem"))
    before = ll.snapshot(model)
    with pytest.raises(RuntimeError):
        with ll.frozen(model, ll.freeze("backbone")) as plan:
            assert model.trainable["backbone.layer1.conv.weight"] is False and plan.changed
            raise RuntimeError
    assert ll.snapshot(model) == before


def test_state_round_trips_through_a_dict_and_checks_paths(fake_backend):
    model = resnetish()
    state = ll.snapshot(model)
    assert ll.State.from_dict(state.to_dict()) == state
    other = FakeModel({"x": ("Linear", {"w": 1}, {})})
    with pytest.raises(ll.LayerlockError, match="does not fit"):
        ll.restore(other, state)
    with pytest.raises(ll.SpecError):
        ll.State.from_dict({"backend": "fake", "params": {"a": "yes"}})


def test_fingerprint_covers_the_selected_weights(fake_backend):
    model = resnetish()
    ll.apply(model, ll.freeze("backbone"))
    frozen_print, trainable_print = ll.fingerprint(model), ll.fingerprint(model, "trainable")
    model.values["head.weight"] = b"changed"
    assert ll.fingerprint(model) == frozen_print
    assert ll.fingerprint(model, "trainable") != trainable_print
    with pytest.raises(ll.SpecError, match="which"):
        ll.fingerprint(model, "some")


def test_unknown_models_raise_backend_error_naming_type_and_backends():
    with pytest.raises(ll.BackendError, match="builtins.dict.*installed backends: keras"):
        ll.apply({}, ll.freeze())


def test_plugins_missing_methods_are_refused_by_name():
    import layerlock.backends as lb

    class Half:
        name, module = "half", "sys"

    with pytest.raises(ll.BackendError, match="'half'.*does not implement"):
        lb.register(Half())


# ---- properties -----------------------------------------------------------------------------

paths = ["stem", "stem.conv", "backbone", "backbone.layer2", "backbone.layer4.bn", "head", "*.bias",
         "*.weight", "re:backbone\\.layer[13].*"]
rule_strategy = st.builds(
    lambda action, pats, depth: ll.Spec().freeze(*pats, depth=depth) if action == "freeze"
    else ll.Spec().unfreeze(*pats, depth=depth),
    st.sampled_from(["freeze", "unfreeze"]), st.lists(st.sampled_from(paths), max_size=2),
    st.none() | st.integers(-3, 3))
spec_strategy = st.lists(rule_strategy, max_size=6).map(lambda specs: sum(specs, ll.Spec()))


@given(spec_strategy, st.sampled_from(["follow", "trainable", "frozen"]))
def test_resolution_is_deterministic_and_the_last_selecting_rule_decides(spec, bn):
    first, second = resolve(tree(), spec, bn=bn), resolve(tree(), spec, bn=bn)
    assert first == second
    for entry in first.params:
        if isinstance(entry.rule, int):
            assert entry.trainable_after == (spec.rules[entry.rule].action == "unfreeze")
            for later in spec.rules[entry.rule + 1:]:
                single = resolve(tree(), ll.Spec((later,)), strict=False)
                assert not any(p.path == entry.path and p.rule == 0 for p in single.params)


@given(spec_strategy, spec_strategy)
def test_restore_of_snapshot_is_exact(first, second):
    import layerlock.backends as lb

    from .fake import FakeBackend

    lb.register(FakeBackend())
    try:
        model = resnetish()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ll.apply(model, first, strict=False)
            state = ll.snapshot(model)
            ll.apply(model, second, strict=False, frozen_mode="eval")
        ll.restore(model, state)
        assert ll.snapshot(model) == state
    finally:
        lb.unregister("fake")


def test_the_gc_pause_covers_the_walk_and_the_resolution_but_not_the_backend(fake_backend):
    import gc

    seen = {}
    tree, apply = fake_backend.tree, fake_backend.apply
    fake_backend.tree = lambda model: (seen.setdefault("tree", gc.isenabled()), tree(model))[1]
    fake_backend.apply = lambda model, plan: (seen.setdefault("apply", gc.isenabled()), apply(model, plan))
    ll.apply(resnetish(), ll.freeze("backbone"))
    assert seen == {"tree": False, "apply": True} and gc.isenabled()


# --- depth over lists of layers: one rule for every framework --------------------------------

def lin(path, n=6):
    return Node(path, "Linear", params=[Param(f"{path}.weight", n, True, path)])


def entries(path, k, kind="List"):
    """A list of ``k`` Linear layers at ``path`` (children ``path.0`` ... ``path.k-1``)."""
    prefix = f"{path}." if path else ""
    return Node(path, kind, children=[lin(f"{prefix}{i}") for i in range(k)])


def test_a_layer_whose_only_child_is_a_list_counts_the_lists_entries():
    root = Node("", "Sequential", children=[entries("layers", 4)])  # nnx.Sequential, eqx.nn.MLP, ...
    plan = resolve(root, ll.freeze(depth=-1))
    assert frozen_layers(plan) == ["layers.0", "layers.1", "layers.2"]
    assert plan.blocks == {"layers": ("layers.0", "layers.1", "layers.2", "layers.3")}
    assert blocks(root) == ["layers.0", "layers.1", "layers.2", "layers.3"]


def test_a_list_among_other_children_stays_one_block():
    root = Node("", "Net", children=[entries("layers", 4), lin("head")])
    plan = resolve(root, ll.freeze(depth=1))
    assert frozen_layers(plan) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert plan.blocks == {} and blocks(root) == ["layers", "head"]


def test_the_model_that_is_a_list_counts_its_children_as_before():
    root = entries("", 3, kind="Sequential")  # torch's nn.Sequential
    plan = resolve(root, ll.freeze(depth=2))
    assert frozen_layers(plan) == ["0", "1"] and plan.blocks == {}


@pytest.mark.parametrize("root", [
    Node("", "Net", params=[Param("scale", 1, True, "s")], children=[entries("layers", 3)]),   # own parameters
    Node("", "Net", children=[Node("body", "Block", children=[lin("body.a"), lin("body.b")])]),  # not 0, 1, ...
    Node("", "Net", children=[Node("layers", "List", children=[lin("layers.0"), lin("layers.2")])]),  # a gap
    Node("", "Net", children=[Node("layers", "List", params=[Param("layers.w", 2, True, "w")],
                                   children=[lin("layers.0")])]),                               # the list has weights
], ids=["own-parameters", "named-children", "index-gap", "list-with-parameters"])
def test_only_a_parameterless_layer_over_a_parameterless_list_is_transparent(root):
    assert blocks(root) == [c.path for c in root.children]
    assert resolve(root, ll.freeze(depth=1)).blocks == {}


def test_transparency_repeats_through_nested_lists_and_one_entry_lists():
    nested = Node("", "Sequential", children=[entries("0", 3, kind="Sequential")])  # Sequential(Sequential(...))
    assert blocks(nested) == ["0.0", "0.1", "0.2"]
    deep = Node("", "Net", children=[Node("blocks", "List", children=[                # [nnx.Sequential(...)]
        Node("blocks.0", "Sequential", children=[entries("blocks.0.layers", 2)])])])
    assert blocks(deep) == ["blocks.0.layers.0", "blocks.0.layers.1"]
    plan = resolve(deep, ll.freeze(depth=1))
    assert frozen_layers(plan) == ["blocks.0.layers.0"]
    assert plan.blocks == {"blocks.0.layers": ("blocks.0.layers.0", "blocks.0.layers.1")}


def test_within_a_transparent_layer_counts_its_lists_entries_and_within_the_list_still_works():
    root = Node("", "Net", children=[Node("encoder", "Encoder", children=[entries("encoder.layer", 4)]), lin("head")])
    by_encoder = resolve(root, ll.freeze(depth=-1, within="encoder"))   # BertEncoder: its only child is `layer`
    by_list = resolve(root, ll.freeze(depth=-1, within="encoder.layer"))
    assert by_encoder.frozen == by_list.frozen == ("encoder.layer.0.weight", "encoder.layer.1.weight",
                                                   "encoder.layer.2.weight")
    assert by_encoder.blocks == {"encoder.layer": tuple(f"encoder.layer.{i}" for i in range(4))}
    assert by_list.blocks == {}
    assert blocks(root, "encoder") == blocks(root, "encoder.layer")


def test_depth_past_a_lists_entries_names_the_entries_and_the_range():
    root = Node("", "MLP", children=[entries("layers", 3)])
    with pytest.raises(ll.SpecError, match=r"depth=4 but the model has 3 blocks, the entries of 'layers', "
                                           r"\(layers\.0, layers\.1, layers\.2\); accepted: -3 to 3"):
        resolve(root, ll.freeze(depth=4))


def test_the_plan_prints_the_blocks_depth_counted_only_where_it_counted_a_lists_entries():
    root = Node("", "Sequential", children=[entries("layers", 8)])
    plan = resolve(root, ll.freeze(depth=-1))
    assert "depth counted the 8 blocks of 'layers': layers.0, layers.1, layers.2, ..., layers.7" in str(plan)
    assert plan.to_dict()["blocks"] == {"layers": [f"layers.{i}" for i in range(8)]}
    plain = resolve(tree(), ll.freeze(depth=-1))
    assert "depth counted" not in str(plain) and "blocks" not in plain.to_dict()
    note = "depth counted the 8 blocks of 'layers': layers.0, layers.1, layers.2, ..., layers.7\n"
    assert str(plan).replace(note, "") == str(dataclasses.replace(plan, blocks={}))  # one line more, nothing else


# --- layer families -------------------------------------------------------------------------

def kinds_tree(*kinds):
    return Node("", "Net", children=[Node(f"l{i}", k, params=[Param(f"l{i}.w", 2, True, i)])
                                     for i, k in enumerate(kinds)])


def test_a_family_reads_the_backends_class_names():
    root = kinds_tree("Conv1D", "Linear", "Dense", "Conv2d", "Conv2D")
    assert frozen_layers(resolve(root, ll.freeze(kind="family:dense"), backend="torch")) == ["l0", "l1"]
    assert frozen_layers(resolve(root, ll.freeze(kind="family:conv"), backend="torch")) == ["l3"]
    assert frozen_layers(resolve(root, ll.freeze(kind="family:dense"), backend="keras")) == ["l2"]
    assert frozen_layers(resolve(root, ll.freeze(kind="family:conv"), backend="tf_keras")) == ["l0", "l4"]


def test_norm_is_batchnorm_and_layernorm_and_the_other_norms():
    root = kinds_tree("BatchNorm2d", "LayerNorm", "GroupNorm", "LlamaRMSNorm", "Linear")
    assert frozen_layers(resolve(root, ll.freeze(kind="family:norm"), backend="torch")) == ["l0", "l1", "l2", "l3"]
    assert frozen_layers(resolve(root, ll.freeze(kind="family:batchnorm"), backend="torch")) == ["l0"]
    assert frozen_layers(resolve(root, ll.freeze(kind="family:layernorm"), backend="torch")) == ["l1"]


def test_a_family_selects_the_whole_layer_and_class_globs_still_work():
    root = Node("", "Net", children=[
        Node("attn", "BertAttention", children=[lin("attn.query"), Node("attn.ln", "LayerNorm", params=[
            Param("attn.ln.weight", 4, True, "ln")])]), lin("head")])
    plan = resolve(root, ll.freeze(kind="family:attention"), backend="torch")
    assert plan.frozen == ("attn.query.weight", "attn.ln.weight")
    assert resolve(root, ll.freeze(kind="Bert*"), backend="torch").frozen == plan.frozen
    assert resolve(root, ll.freeze(kind=["family:dense", "LayerNorm"]), backend="torch").trainable == (
        "attn.query.weight",)  # dense stops at attention layers (next test)


def test_the_dense_family_stops_at_attention_layers():
    """An attention layer's projections are parts of it: torch's MultiheadAttention keeps
    them as raw tensors, so only "dense outside attention" means the same everywhere."""
    root = Node("", "Net", children=[
        Node("attn", "BertAttention", children=[lin("attn.query")]), lin("head")])
    assert resolve(root, ll.freeze(kind="family:dense"), backend="torch").frozen == ("head.weight",)
    assert resolve(root, ll.freeze(kind=["family:dense", "family:attention"]), backend="torch").trainable == ()


def test_a_family_that_matches_nothing_names_what_it_matches_here():
    with pytest.raises(ll.NoMatchError, match=r"kind 'family:embedding' matches no layer; in torch it is the "
                                              r"classes Embedding, EmbeddingBag, \*Embedding; this model's layer "
                                              r"kinds: Net, Linear") as exc:
        resolve(kinds_tree("Linear"), ll.freeze(kind="family:embedding"), backend="torch")
    assert exc.value.pattern == "family:embedding"
    with pytest.warns(ll.LayerlockWarning, match="family:embedding"):
        assert resolve(kinds_tree("Linear"), ll.freeze(kind="family:embedding"), strict=False).frozen == ()


def test_a_class_name_of_another_framework_points_to_the_family():
    with pytest.raises(ll.NoMatchError, match="kind='family:dense' selects dense layers in every framework"):
        resolve(kinds_tree("Linear"), ll.freeze(kind="Dense"), backend="torch")
