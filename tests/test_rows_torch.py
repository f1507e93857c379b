"""``rows=`` in PyTorch: only the chosen rows of a table train, the others stay bit-identical
under every optimizer, and checkpoints keep the plain model's keys (issue 21)."""

import pytest

torch = pytest.importorskip("torch")

import layerlock as ll  # noqa: E402
from torch import nn  # noqa: E402

OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
}
NEW = "90:"  # rows 90..99 of a 100-row table: the "new tokens"


class Net(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(100, 8), nn.Linear(8, 100)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def train(model, optimizer, steps=3):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 100, (16, 6), generator=g), torch.randint(0, 100, (16,), generator=g)
    x[:, 0] = torch.randint(90, 100, (16,), generator=g)  # every batch uses new tokens
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_frozen_rows_are_bit_identical_and_the_chosen_rows_train(name, tied):
    model = Net(tied)
    before = model.emb.weight.detach().clone()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    train(model, OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad]))
    after = model.state_dict()["emb.weight"]
    assert torch.equal(after[:90], before[:90])
    assert not torch.equal(after[90:], before[90:])


def test_gradient_zeroing_by_hand_fails_the_same_test():
    model = Net()
    before = model.emb.weight.detach().clone()
    ll.apply(model, ll.freeze().unfreeze("emb"))
    keep = torch.zeros(100, 1)
    keep[90:] = 1
    model.emb.weight.register_hook(lambda g: g * keep)
    train(model, OPTIMIZERS["adamw-foreach"]([model.emb.weight]))
    assert not torch.equal(model.emb.weight[:90], before[:90])  # weight decay moved the "frozen" rows


def test_param_groups_and_a_phase_lr_give_the_trainable_rows_their_rate():
    import layerlock.torch as llt

    model = Net()
    before = model.emb.weight.detach().clone()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW).unfreeze("head"))
    groups = llt.param_groups(model, 1e-2, lr_mult={"emb": 0.5}, weight_decay=0.1, no_decay=["*.bias"])
    assert [(g["name"], [n for n, _ in g["params"]]) for g in groups] == [
        ("lr_mult[emb]", ["emb.weight_layerlock_rows"]), ("default", ["head.weight"]), ("no_decay", ["head.bias"])]
    train(model, torch.optim.AdamW(groups))
    after = model.state_dict()["emb.weight"]
    assert torch.equal(after[:90], before[:90]) and not torch.equal(after[90:], before[90:])

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = llt.FreezeScheduler(ll.Schedule({0: ll.freeze("emb"), 1: ll.unfreeze("emb", rows=NEW)}, lr={1: 1e-4}),
                                  model, optimizer, log=None)
    freezer.step(0)
    train(model, optimizer)
    middle = model.state_dict()["emb.weight"].clone()
    freezer.step(1)
    assert optimizer.param_groups[-1]["lr"] == 1e-4
    assert [p.shape for p in optimizer.param_groups[-1]["params"]] == [(10, 8)]
    train(model, optimizer)
    end = model.state_dict()["emb.weight"]
    assert torch.equal(end[:90], middle[:90]) and 0 < (end[90:] - middle[90:]).abs().max() < 1e-5


def test_optimizer_state_is_held_for_the_trainable_rows_only():
    model = Net()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    optimizer = OPTIMIZERS["adamw-foreach"]([p for p in model.parameters() if p.requires_grad])
    train(model, optimizer, steps=1)
    shapes = {tuple(s["exp_avg"].shape) for s in optimizer.state.values()}
    assert shapes == {(10, 8)}


def test_state_dict_keys_and_shapes_are_the_plain_models_and_load_into_it():
    model, plain = Net(), Net()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    train(model, OPTIMIZERS["adamw-fused"]([p for p in model.parameters() if p.requires_grad]))
    state = model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)  # strict
    x = torch.randint(0, 100, (4, 6))
    assert torch.equal(plain(x), model(x))
    model.load_state_dict(Net().state_dict())  # a plain checkpoint loads back in, rows included
    assert torch.equal(model(x), Net()(x))


def test_restore_and_frozen_put_the_rows_back_exactly():
    model = Net()
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    state = ll.snapshot(model)
    with ll.frozen(model, ll.unfreeze()):
        assert model.emb.weight.requires_grad and ll.plan(model, ll.Spec()).partial == ()
    assert ll.plan(model, ll.Spec()).partial == ("emb.weight",)
    ll.apply(model, ll.freeze())
    ll.restore(model, state)
    assert ll.plan(model, ll.Spec()).rows[0].after == tuple(range(90, 100))
    assert ll.State.from_dict(state.to_dict()) == state


def test_plan_and_summary_count_the_trainable_rows():
    model = Net()
    plan = ll.plan(model, ll.freeze().unfreeze("emb", rows=NEW))
    assert plan.partial == ("emb.weight",) and plan.trainable_scalars == 80
    assert "rows 90: of 100" in str(plan)
    ll.apply(model, ll.freeze().unfreeze("emb", rows=NEW))
    assert ll.summary(model).trainable_scalars == 80


@pytest.mark.parametrize("spec, says", [(ll.unfreeze("emb", rows="100:"), "shape (100, 8)"),
                                        (ll.freeze("head.bias").unfreeze("*.bias", rows=[200]), "out of range")])
def test_rows_a_tensor_cannot_take_are_refused_and_nothing_changes(spec, says):
    model = Net()
    with pytest.raises(ll.SpecError, match="list of row indices") as exc:
        ll.apply(model, spec)
    assert says in str(exc.value)
    assert all(p.requires_grad for p in model.parameters()) and ll.plan(model, ll.Spec()).partial == ()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_tied_hugging_face_head_trains_the_same_new_rows_through_both_uses(checkpointing):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=90,
                                                                 n_positions=16))
    model.resize_token_embeddings(100)
    if checkpointing:  # the blocks run forward twice: the rows' write must not upset what autograd saved
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    before = model.transformer.wte.weight.detach().clone()
    plan = ll.apply(model, ll.freeze().unfreeze("transformer.wte", "lm_head", rows="90:"))
    assert [p.path for p in plan.params if p.aliases] == ["transformer.wte.weight"]  # the decision shows once
    optimizer = OPTIMIZERS["adamw-fused"]([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 90, (4, 8))  # old tokens only: the new rows learn through the tied head alone
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    after = model.state_dict()["transformer.wte.weight"]
    assert torch.equal(after[:90], before[:90]) and not torch.equal(after[90:], before[90:])
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bert_mlm_head_tied_to_the_table_trains_the_new_rows_and_their_output_bias_entries(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=90, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(config)
    model.resize_token_embeddings(100, mean_resizing=False)
    table, bias = model.bert.embeddings.word_embeddings.weight, model.cls.predictions.bias
    before, bias_before = table.detach().clone(), bias.detach().clone()
    plan = ll.apply(model, ll.freeze().unfreeze("bert.embeddings.word_embeddings", "cls.predictions.decoder",
                                                "cls.predictions.bias", rows="90:"))
    assert plan.partial == ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias")  # each once
    assert plan.trainable_scalars == 10 * 16 + 10
    optimizer = OPTIMIZERS["adamw-fused"]([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 90, (4, 8))  # old tokens only: the new rows learn through the tied head
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    state = model.state_dict()
    after, bias_after = state["bert.embeddings.word_embeddings.weight"], state["cls.predictions.bias"]
    assert torch.equal(after[:90], before[:90]) and (after[90:] != before[90:]).any(1).all()
    assert torch.equal(bias_after[:90], bias_before[:90]) and (bias_after[90:] != bias_before[90:]).all()
    assert model.cls.predictions.decoder.weight is table and model.cls.predictions.decoder.bias is bias
    model.save_pretrained(tmp_path)
    plain = transformers.BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(plain.cls.predictions.decoder.weight, after) and torch.equal(plain.cls.predictions.bias, bias_after)


def test_new_token_rows_train_in_the_trainer_and_reload_in_plain_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=90, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    model.resize_token_embeddings(100)  # 10 new tokens, tied to the output head
    before = model.transformer.wte.weight.detach().clone()
    ll.apply(model, ll.freeze().unfreeze("transformer.wte", "lm_head", rows="90:"))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=1, per_device_train_batch_size=4,
                                          learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=Data()).train()
    model.save_pretrained(tmp_path / "saved")
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "saved")
    table = plain.transformer.wte.weight.detach()
    assert torch.equal(table[:90], before[:90]) and not torch.equal(table[90:], before[90:])
    assert torch.equal(table, model.state_dict()["transformer.wte.weight"])
    assert plain.lm_head.weight is plain.transformer.wte.weight  # still tied


def test_check_names_a_hand_made_row_freeze_that_weight_decay_still_moves():
    model = Net()
    keep = torch.zeros(100, 1)
    keep[90:] = 1
    model.emb.weight.register_hook(lambda g: g * keep)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    found = [f for f in ll.check(model, optimizer).findings if f.kind == "hooked-row-freeze"]
    assert len(found) == 1 and found[0].paths == ("emb.weight",) and found[0].scalars == 90 * 8
    assert "zeroes 90 of the 100 rows" in found[0].problem and "0.001 of its value per step" in found[0].problem
    assert "rows=" in found[0].fix
    quiet = torch.optim.SGD(model.parameters(), lr=0.1)  # no decay, no momentum: the hook does hold them
    assert not [f for f in ll.check(model, quiet).findings if f.kind == "hooked-row-freeze"]


def test_rows_train_under_ddp_with_ranks_in_sync_and_a_sharded_table_is_refused():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from . import distributed_worker

    results = distributed_worker.run_ranks(distributed_worker.rows_main, timeout=120)
    for out in results.values():
        assert out["log"] == [{"ranks_same": True, "old_same": True, "new_same": True, "same_wrapper": True},
                              {"ranks_same": True, "old_same": True, "new_same": False, "same_wrapper": True}]
        assert "DTensor" in out["sharded_error"] and "shape (100, 8)" in out["sharded_error"]
        assert out["sharded_unchanged"]
