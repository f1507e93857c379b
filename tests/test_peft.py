"""PEFT models: plans show the real paths, and specs written for the base model select the
same weights after get_peft_model."""

import re

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import layerlock as ll  # noqa: E402
import layerlock.torch as lt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecations inside peft

CONFIG = dict(vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
              intermediate_size=32, max_position_embeddings=32)


def bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG))


def lora(model):
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    return peft.get_peft_model(model, config)


def base_name(path):
    """The base model's name for a PeftModel parameter path."""
    path = path.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return path.replace(".modules_to_save.default.", ".")


def decided(plan, rename=lambda path: path):
    """{path: trainable after} for the parameters some rule of the plan decided."""
    return {rename(p): after for p, after, rule in zip(plan.paths, plan.trainable_after, plan.rules)
            if rule is not None}


SPECS = {
    "layer": ll.freeze("bert.encoder.layer.0"),
    "layers": ll.freeze("bert").unfreeze("bert.encoder.layer.2", "bert.encoder.layer.3"),
    "param": ll.freeze().unfreeze("bert.encoder.layer.0.attention.self.query.weight"),
    "head param": ll.freeze().unfreeze("classifier.weight"),
    "head layer": ll.freeze().unfreeze("classifier"),
    "glob": ll.freeze("*.query.weight").unfreeze("bert.encoder.layer.*.attention.self.value"),
    "regex": ll.freeze(r"re:bert\.encoder\.layer\.[01]\..*").unfreeze(r"re:.*\.query\.bias"),
    "kind": ll.freeze(kind="Linear").unfreeze(kind="LayerNorm"),
    "depth": ll.freeze(depth=1),
    "negative depth": ll.freeze(depth=-1),
    "within": ll.freeze(depth=3, within="bert.encoder.layer"),
}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_base_model_spec_selects_the_same_weights_after_wrapping(spec):
    model = bert()
    before = decided(ll.plan(model, spec))
    assert before
    pm = lora(model)
    plan = ll.plan(pm, spec)
    assert plan.paths == tuple(n for n, _ in pm.named_parameters())
    after = {n: t for n, t in decided(plan, base_name).items() if n in before}
    assert after == before


def test_every_base_weight_has_its_base_name_once():
    model = bert()
    names = [n for n, _ in model.named_parameters()]
    pm = lora(model)
    mapped = [base_name(n) for n, _ in pm.named_parameters() if "lora_" not in n and "original_module" not in n]
    assert sorted(mapped) == sorted(names)


def test_full_real_paths_match_too():
    pm = lora(bert())
    real = ll.plan(pm, ll.freeze().unfreeze("base_model.model.bert.encoder.layer.0",
                                             "base_model.model.classifier.original_module.weight"))
    short = ll.plan(pm, ll.freeze().unfreeze("bert.encoder.layer.0", "classifier.original_module.weight"))
    assert real.trainable == short.trainable
    assert "base_model.model.classifier.original_module.weight" in real.trainable


def test_layer_path_selects_the_adapters_inside_it():
    pm = lora(bert())
    trainable = ll.plan(pm, ll.freeze().unfreeze("bert.encoder.layer.0.attention.self.query")).trainable
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query."
    assert trainable == (prefix + "base_layer.weight", prefix + "base_layer.bias",
                         prefix + "lora_A.default.weight", prefix + "lora_B.default.weight")


def test_parameter_path_selects_the_base_layer_weight_and_the_trained_head_copy():
    pm = lora(bert())
    plan = ll.plan(pm, ll.freeze().unfreeze("bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"))
    assert plan.trainable == ("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight",
                              "base_model.model.classifier.modules_to_save.default.weight")


def test_adapter_and_copy_patterns_select_exactly_those_tensors():
    pm = lora(bert())
    names = [n for n, _ in pm.named_parameters()]
    adapters = ll.plan(pm, ll.freeze().unfreeze("*lora_*")).trainable
    copies = ll.plan(pm, ll.freeze().unfreeze("*.modules_to_save.*")).trainable
    assert adapters == tuple(n for n in names if re.search(r"\.lora_[AB]\.default\.", n))
    assert len(adapters) == 4 * 2 * 2  # 4 blocks, query and value, A and B
    assert copies == ("base_model.model.classifier.modules_to_save.default.weight",
                      "base_model.model.classifier.modules_to_save.default.bias")


def test_recipe_is_what_peft_itself_trains():
    pm = lora(bert())
    peft_trainable = tuple(n for n, p in pm.named_parameters() if p.requires_grad)
    assert ll.apply(pm, ll.freeze().unfreeze("*lora_*", "*.modules_to_save.*")).trainable == peft_trainable


def test_depth_and_within_count_the_base_model():
    pm = lora(bert())
    assert set(decided(ll.plan(pm, ll.freeze(depth=1)))) == {n for n, _ in pm.named_parameters()
                                                             if n.startswith("base_model.model.bert.")}
    with pytest.raises(ll.SpecError, match="has 3 blocks"):
        ll.plan(pm, ll.freeze(depth=4))
    with pytest.raises(ll.SpecError, match="has 4 blocks"):
        ll.plan(pm, ll.freeze(depth=5, within="bert.encoder.layer"))


def test_adapters_injected_without_peft_model_get_base_names():
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["query"]), bert())
    plan = ll.plan(model, ll.freeze().unfreeze("bert.encoder.layer.0.attention.self.query.weight"))
    assert plan.trainable == ("bert.encoder.layer.0.attention.self.query.base_layer.weight",)


def test_typo_raises_no_match_with_base_names_suggested():
    pm = lora(bert())
    with pytest.raises(ll.NoMatchError) as err:
        ll.plan(pm, ll.freeze("bert.encoder.layer.0.attention.self.qeury.weight"))
    assert "bert.encoder.layer.0.attention.self.query.weight" in err.value.suggestions


def test_summary_snapshot_and_restore_work():
    pm = lora(bert())
    state = ll.snapshot(pm)
    ll.apply(pm, ll.freeze())
    assert ll.summary(pm).trainable_scalars == 0
    ll.restore(pm, state)
    assert [p.requires_grad for p in pm.parameters()] == [state.params[n] for n, _ in pm.named_parameters()]


def test_lora_recipe_trains_adapters_then_top_blocks_and_nothing_else():
    pm = lora(bert())
    ll.apply(pm, ll.freeze().unfreeze("*lora_*", "*.modules_to_save.*"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 100, (8, 12))
    y = torch.randint(0, 2, (8,))
    start = {n: p.detach().clone() for n, p in pm.named_parameters()}

    def train(steps):
        pm.train()
        for _ in range(steps):
            opt.zero_grad()
            pm(input_ids=x, labels=y).loss.backward()
            opt.step()
        return {n: p.detach().clone() for n, p in pm.named_parameters()}

    def moved(a, b):
        return {n for n in a if not torch.equal(a[n], b[n])}

    top = ("base_model.model.bert.encoder.layer.2.", "base_model.model.bert.encoder.layer.3.")
    adapters = {n for n in start if "lora_" in n or ".modules_to_save." in n}
    top_base = {n for n in start if n.startswith(top) and n not in adapters}
    phase1 = train(3)
    assert moved(start, phase1) == adapters

    ll.apply(pm, ll.freeze().unfreeze("*lora_*", "*.modules_to_save.*")
             .unfreeze("bert.encoder.layer.2", "bert.encoder.layer.3"))
    added = lt.sync_optimizer(opt, pm, lr=1e-2)
    assert set(added) == top_base
    phase2 = train(3)
    assert moved(phase1, phase2) == adapters | top_base
    assert moved(start, phase2) == adapters | top_base  # embeddings, blocks 0-1, original head: bit-identical
