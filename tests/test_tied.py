"""Tied tensors (one tensor under several paths): a rule that reaches one through some of its
paths only decides it under all of them, and layerlock says so in the plan and in a warning."""

import os
import warnings

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import layerlock as ll  # noqa: E402
from layerlock.resolver import resolve  # noqa: E402
from layerlock.tree import Node, Param  # noqa: E402

T5_TIED = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def t5(transformers):
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                   tie_word_embeddings=True, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def gpt2(transformers):
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tied_warnings(call, *args, **kwargs):
    """What ``call`` returns and the texts of the tied-tensor warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)
    return result, [str(w.message) for w in caught
                    if issubclass(w.category, ll.LayerlockWarning) and "tied tensor" in str(w.message)]


def test_the_models_tie_what_the_tests_assume(transformers):
    groups = {}
    for name, p in t5(transformers).named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    assert [tuple(g) for g in groups.values() if len(g) > 1] == [T5_TIED]
    model = gpt2(transformers)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_freezing_t5_encoder_warns_that_it_also_freezes_the_shared_embedding_and_lm_head(transformers):
    plan, texts = tied_warnings(ll.plan, t5(transformers), ll.freeze("encoder"))
    assert len(texts) == 1
    assert ("shared.weight is tied: frozen by #0 freeze('encoder') through encoder.embed_tokens.weight; "
            "also frozen: shared.weight, decoder.embed_tokens.weight, lm_head.weight") in texts[0]
    assert "shared.weight" in plan.frozen and plan.aliases[plan.paths.index("shared.weight")] == T5_TIED[1:]


def test_the_plan_table_and_dict_show_what_the_decision_carried_along(transformers):
    plan, _ = tied_warnings(ll.plan, t5(transformers), ll.freeze("encoder"))
    row = plan.paths.index("shared.weight")
    assert plan.carried == {row: ("shared.weight", "decoder.embed_tokens.weight", "lm_head.weight")}
    assert plan.params[row].carried == plan.carried[row] and plan.params[row].aliases == T5_TIED[1:]
    text = str(plan)
    assert "#0 freeze('encoder') (tied: see below)" in text
    assert "shared.weight is tied: frozen by #0 freeze('encoder') through encoder.embed_tokens.weight" in text
    entry = plan.to_dict()["params"][row]
    assert entry["carried"] == ["shared.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    assert entry["aliases"] == list(T5_TIED[1:])


@pytest.mark.parametrize("spec", [ll.freeze(), ll.freeze("shared", "encoder", "decoder", "lm_head"),
                                  ll.freeze("encoder").freeze(*T5_TIED)], ids=["all", "all-paths", "last-rule"])
def test_no_warning_when_the_deciding_rule_selects_every_path(transformers, spec):
    plan, texts = tied_warnings(ll.plan, t5(transformers), spec)
    assert texts == [] and plan.carried == {} and "shared.weight" in plan.frozen
    assert "tied" not in str(plan).replace("(= ", "")


def test_no_warning_when_the_decision_changes_nothing(transformers):
    model = gpt2(transformers)
    _, texts = tied_warnings(ll.apply, model, ll.freeze("transformer"))
    assert len(texts) == 1
    plan, texts = tied_warnings(ll.apply, model, ll.freeze("transformer"))  # idempotent: already frozen
    assert texts == [] and plan.carried  # the plan still shows it


def test_gpt2_plan_and_apply_each_warn_once_naming_the_lm_head(transformers):
    model = gpt2(transformers)
    for call in (ll.plan, ll.apply):
        _, texts = tied_warnings(call, model, ll.freeze("transformer"))
        assert len(texts) == 1 and "also frozen: lm_head.weight" in texts[0]
    _, texts = tied_warnings(ll.plan, model, ll.freeze().unfreeze("lm_head"))
    assert "unfrozen by #1 unfreeze('lm_head') through lm_head.weight; also unfrozen: transformer.wte.weight" in texts[0]


def test_the_warning_points_at_the_callers_line(transformers):
    with pytest.warns(ll.LayerlockWarning, match="tied tensor") as record:
        ll.plan(gpt2(transformers), ll.freeze("transformer"))
    assert record[0].filename == __file__


def test_rules_that_disagree_about_the_gpt2_lm_head_still_raise(transformers):
    with pytest.raises(ll.SpecError, match="transformer.wte.weight = lm_head.weight"):
        ll.plan(gpt2(transformers), ll.freeze("transformer").unfreeze("lm_head"))


def test_frozen_tied_lm_head_is_bit_identical_after_adamw_with_weight_decay(transformers):
    import torch

    torch.manual_seed(0)
    model = gpt2(transformers)
    with pytest.warns(ll.LayerlockWarning, match="also frozen: lm_head.weight"):
        ll.apply(model, ll.freeze("transformer.wte"))  # the blocks keep training
    assert not model.lm_head.weight.requires_grad
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # holds the frozen one too
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert model.lm_head.weight.grad is None
    assert torch.equal(model.lm_head.weight, before["transformer.wte.weight"])
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before["transformer.h.0.mlp.c_fc.weight"])


def test_one_warning_lists_every_tied_tensor_a_rule_reached_partly():
    def tied(name, key):
        return Node(name, "Linear", params=[Param(f"{name}.w", 4, True, key), Param(f"{name}.b", 2, True, key + "b")],
                    key=name)

    root = Node("", "Net", children=[Node("a", "Block", children=[tied("a.x", "X")]),
                                     Node("b", "Block", children=[tied("b.x", "X")])])
    plan, texts = tied_warnings(resolve, root, ll.freeze("a"))
    assert len(texts) == 1 and "also frozen: b.x.w" in texts[0] and "also frozen: b.x.b" in texts[0]
    assert plan.frozen == ("a.x.w", "a.x.b")


def test_a_keras_layer_shared_by_two_submodels_is_said_out_loud_too():
    keras = pytest.importorskip("keras")
    shared = keras.layers.Dense(4, name="shared")

    def branch(name):
        inputs = keras.Input((4,))
        return keras.Model(inputs, shared(inputs), name=name)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, branch("b")(branch("a")(inputs)))
    plan, texts = tied_warnings(ll.plan, model, ll.freeze("a"))
    assert len(texts) == 1 and "also frozen: b.shared.kernel" in texts[0]
    assert plan.frozen == ("a.shared.kernel", "a.shared.bias")
