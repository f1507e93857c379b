"""Specs are immutable values: builders, validation and dict/JSON/YAML round-trips."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import layerlock as ll
from layerlock.spec import Rule, matcher


def test_builders_append_rules_in_order():
    spec = ll.freeze("backbone").unfreeze("backbone.layer4")
    assert [r.action for r in spec] == ["freeze", "unfreeze"]
    assert spec.rules[1].patterns == ("backbone.layer4",)


def test_specs_are_immutable_hashable_and_comparable():
    a, b = ll.freeze("x", depth=2), ll.freeze("x", depth=2)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ll.unfreeze("x", depth=2)
    with pytest.raises(AttributeError):
        a.rules = ()  # type: ignore[misc]
    base = ll.freeze("x")
    base.unfreeze("y")
    assert base == ll.freeze("x")


def test_slash_is_read_as_dot():
    assert ll.freeze("backbone/layer4").rules[0].patterns == ("backbone.layer4",)
    assert matcher(ll.freeze("re:a/b").rules[0].patterns[0])("a.b")
    assert not matcher(ll.freeze("re:a/b").rules[0].patterns[0])("axb")


def test_glob_star_crosses_dots_and_regex_must_fullmatch():
    assert matcher("backbone*")("backbone.layer1.conv.weight")
    assert matcher("*.bias")("a.b.c.bias")
    assert matcher("blocks.1*")("blocks.10")
    assert not matcher("blocks.1")("blocks.10")
    assert matcher("re:layer[0-3]")("layer2") and not matcher("re:layer[0-3]")("layer2.conv")


def test_lists_of_patterns_are_flattened():
    assert ll.freeze(["a", "b"], "c").rules[0].patterns == ("a", "b", "c")


@pytest.mark.parametrize("spec", [
    ll.freeze("backbone").unfreeze("backbone.layer4"),
    ll.freeze(depth=-3),
    ll.freeze(depth=8, within="encoder.layer"),
    ll.unfreeze("*.bias"),
    ll.freeze(kind="BatchNorm*"),
    ll.unfreeze(),
    ll.freeze("re:.*\\.(weight|bias)", kind=["Linear", "Conv*"], depth=1),
    ll.Spec(),
    ll.freeze(kind="family:dense").unfreeze(kind=["family:norm", "LayerNorm*"]),
], ids=["later-wins", "negative-depth", "within", "bitfit", "kind", "everything", "union", "empty", "family"])
def test_round_trips_through_dict_json_yaml_and_files(spec, tmp_path):
    assert ll.Spec.from_dict(spec.to_dict()) == spec
    assert ll.Spec.from_json(spec.to_json()) == spec
    assert ll.Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for name in ("s.json", "s.yaml", "s.yml"):
        spec.save(tmp_path / name)
        assert ll.Spec.load(tmp_path / name) == spec


def test_yaml_written_by_hand_loads(tmp_path):
    (tmp_path / "exp.yaml").write_text(
        "rules:\n  - {action: freeze, patterns: backbone}\n  - {action: unfreeze, depth: -1, within: backbone}\n")
    assert ll.Spec.load(tmp_path / "exp.yaml") == ll.freeze("backbone").unfreeze(depth=-1, within="backbone")


@pytest.mark.parametrize("build, field", [
    (lambda: ll.freeze(depth=1.5), "depth"),
    (lambda: ll.freeze(depth="2"), "depth"),
    (lambda: ll.freeze(depth=True), "depth"),
    (lambda: ll.freeze(""), "empty pattern"),
    (lambda: ll.freeze("  "), "empty pattern"),
    (lambda: ll.freeze(3), "patterns"),
    (lambda: ll.freeze("re:(unclosed"), "regular expression"),
    (lambda: ll.freeze("re:"), "regular expression"),
    (lambda: ll.freeze(kind=5), "kind"),
    (lambda: ll.freeze(kind="family:linear"), "unknown layer family 'family:linear'; accepted: family:dense, "),
    (lambda: ll.freeze(kind="family:"), "unknown layer family"),
    (lambda: ll.freeze("family:dense"), "is a layer family, and patterns match paths; write kind='family:dense'"),
    (lambda: ll.freeze("a", within="encoder"), "needs depth"),
    (lambda: ll.freeze(depth=2, within=""), "within"),
    (lambda: Rule("thaw"), "action"),
    (lambda: ll.Spec([1]), "Rule"),
], ids=["float-depth", "str-depth", "bool-depth", "empty", "blank", "int-pattern", "bad-regex",
        "empty-regex", "int-kind", "unknown-family", "empty-family", "family-as-pattern", "within-without-depth", "empty-within", "bad-action", "not-a-rule"])
def test_malformed_input_raises_spec_error_naming_the_field(build, field):
    with pytest.raises(ll.SpecError, match=field):
        build()


def test_families_keep_their_plain_string_in_dicts_and_json():
    spec = ll.freeze(kind="family:attention")
    assert spec.to_dict()["rules"][0] == {"action": "freeze", "kind": ["family:attention"]}
    assert json.loads(spec.to_json())["rules"][0]["kind"] == ["family:attention"]
    with pytest.raises(ll.SpecError, match="rules\\[0\\]: unknown layer family 'family:Dense'.*family:dropout"):
        ll.Spec.from_dict({"rules": [{"action": "freeze", "kind": "family:Dense"}]})


# Real class names of each framework, and the one top-level family each belongs to.
CLASSES = {
    "torch": {"dense": ["Linear", "LazyLinear", "NonDynamicallyQuantizableLinear", "Conv1D"],
              "conv": ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "LazyConv2d"],
              "norm": ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "GroupNorm",
                       "InstanceNorm2d", "RMSNorm", "LlamaRMSNorm", "T5LayerNorm"],
              "embedding": ["Embedding", "EmbeddingBag", "OPTLearnedPositionalEmbedding"],
              "attention": ["MultiheadAttention", "BertSelfAttention", "BertAttention", "GPT2Attention",
                            "LlamaAttention"],
              "dropout": ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"],
              None: ["ReLU", "Sequential", "ModuleList", "BertSelfOutput", "BertEmbeddings", "Conv2D", "Dense",
                     "Bilinear", "Identity", "GPT2Block"]},
    "keras": {"dense": ["Dense", "EinsumDense"],
              "conv": ["Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
                       "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D"],
              "norm": ["BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization",
                       "UnitNormalization"],
              "embedding": ["Embedding"],
              "attention": ["MultiHeadAttention", "GroupQueryAttention", "GroupedQueryAttention", "Attention",
                            "AdditiveAttention"],
              "dropout": ["Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
                          "AlphaDropout"],
              None: ["Activation", "Sequential", "Functional", "Flatten", "Linear", "Conv2d", "GaussianNoise",
                     "SpectralNormalization"]},
    "flax": {"dense": ["Linear", "LinearGeneral", "Einsum"], "conv": ["Conv", "ConvTranspose"],
             "norm": ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm"], "embedding": ["Embed"],
             "attention": ["MultiHeadAttention"], "dropout": ["Dropout"], None: ["Sequential", "List", "Dense"]},
    "jax": {"dense": ["Linear", "Dense", "DenseGeneral"],
            "conv": ["Conv", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose", "ConvTranspose2d"],
            "norm": ["BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm"], "embedding": ["Embedding", "Embed"],
            "attention": ["MultiheadAttention", "MultiHeadDotProductAttention", "SelfAttention"],
            "dropout": ["Dropout"], None: ["Sequential", "MLP", "Lambda", "tuple", "dict", "StateIndex"]},
}
TOP = ("dense", "conv", "norm", "embedding", "attention", "dropout")


@pytest.mark.parametrize("backend", list(CLASSES) + ["tf_keras"])
def test_each_class_name_is_in_exactly_one_family_per_framework(backend):
    from layerlock import families

    for family, names in CLASSES["keras" if backend == "tf_keras" else backend].items():
        for name in names:
            found = [f for f in TOP if families.matcher(f"family:{f}", backend)(name)]
            assert found == ([family] if family else []), (backend, name)


def test_norm_holds_batchnorm_and_layernorm_and_only_those_are_subfamilies():
    from layerlock import families

    for backend in ("torch", "keras", "flax", "jax"):
        norm = families.matcher("family:norm", backend)
        for sub in ("batchnorm", "layernorm"):
            assert all(norm(n) for n in CLASSES[backend]["norm"]
                       if families.matcher(f"family:{sub}", backend)(n))
    assert families.matcher("family:batchnorm", "torch")("SyncBatchNorm")
    assert not families.matcher("family:batchnorm", "torch")("LayerNorm")
    assert families.matcher("family:layernorm", "keras")("LayerNormalization")


def test_a_backend_not_in_the_table_gets_the_names_no_framework_disputes():
    from layerlock import families

    dense, conv = families.matcher("family:dense", "tinynp"), families.matcher("family:conv", "tinynp")
    assert dense("Linear") and dense("Dense") and conv("Conv2d") and conv("Conv")
    assert not dense("Conv1D") and not conv("Conv1D")  # torch: GPT-2's dense; Keras: a convolution


@pytest.mark.parametrize("data, field", [
    ({"rules": [{"action": "freeze", "patern": ["x"]}]}, "patern"),
    ({"rulez": []}, "rulez"),
    ({"rules": "freeze"}, "rules"),
    ({"rules": [["freeze"]]}, "rules\\[0\\]"),
    ({"rules": [{"patterns": ["x"]}]}, "action"),
    ({"version": 2, "rules": []}, "version"),
    ([], "mapping"),
], ids=["unknown-rule-key", "unknown-spec-key", "rules-not-list", "rule-not-mapping", "no-action",
        "bad-version", "not-mapping"])
def test_malformed_dicts_raise_spec_error(data, field):
    with pytest.raises(ll.SpecError, match=field):
        ll.Spec.from_dict(data)


def test_bad_json_and_files_raise_spec_error(tmp_path):
    with pytest.raises(ll.SpecError, match="JSON"):
        ll.Spec.from_json("{nope")
    with pytest.raises(ll.SpecError, match="cannot read"):
        ll.Spec.load(tmp_path / "missing.json")
    (tmp_path / "spec.toml").write_text("")
    with pytest.raises(ll.SpecError, match="format"):
        ll.Spec.load(tmp_path / "spec.toml")


patterns = st.sampled_from(["a", "b.c", "*.bias", "re:x\\d", "backbone/layer4", "l*"])
rules = st.builds(
    Rule,
    st.sampled_from(["freeze", "unfreeze"]),
    patterns=st.lists(patterns, max_size=3).map(tuple),
    depth=st.none() | st.integers(-5, 5),
    kind=st.lists(st.sampled_from(["Linear", "BatchNorm*"]), max_size=2).map(tuple),
)
specs = st.lists(rules, max_size=5).map(lambda rs: ll.Spec(tuple(rs)))


@given(specs)
def test_from_dict_inverts_to_dict(spec):
    assert ll.Spec.from_dict(spec.to_dict()) == spec
    assert ll.Spec.from_json(spec.to_json()) == spec


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["action", "patterns", "depth", "within", "kind", "rules", "version", "x"]),
        children, max_size=4),
    max_leaves=12)


@settings(max_examples=300)
@given(json_values | st.fixed_dictionaries({"rules": st.lists(json_values, max_size=3)}))
def test_random_malformed_dicts_only_ever_raise_spec_error(data):
    try:
        spec = ll.Spec.from_dict(data)
    except ll.SpecError:
        return
    assert ll.Spec.from_dict(spec.to_dict()) == spec


def test_the_docs_names_table_lists_what_each_family_matches():
    import re
    from pathlib import Path

    from layerlock import families

    page = (Path(__file__).resolve().parent.parent / "docs" / "spec.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `family:(\w+)` \| (.*) \|$", page, re.M)}
    assert list(rows) == list(families.NAMES)
    for name, cells in rows.items():
        for column, cell in zip(families.FRAMEWORKS, cells.split(" | ")):
            prefix = "batchnorm, layernorm and " if name in families.INCLUDES else ""
            assert cell == prefix + ", ".join(f"`{g}`" for g in families.TABLE[name][column]), (name, column)
