"""Models nobody here wrote, used the way the classic tutorials freeze them."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import layerlock as ll  # noqa: E402


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def torch_step(model, optimizer, **inputs):
    model.train()
    optimizer.zero_grad()
    model(**inputs).loss.backward()
    optimizer.step()


def test_bert_bottom_layers_and_embeddings_stay_bit_identical_under_adamw(transformers):
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    plan = ll.apply(model, ll.freeze("bert.embeddings").freeze(depth=2, within="bert.encoder.layer"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in plan.frozen}
    assert frozen and all(n.startswith(("bert.embeddings", "bert.encoder.layer.0.", "bert.encoder.layer.1."))
                          for n in frozen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        torch_step(model, optimizer, input_ids=ids, labels=torch.tensor([0, 1, 0, 1]))
    params = dict(model.named_parameters())
    assert all(torch.equal(v, params[n]) for n, v in frozen.items())
    assert not torch.equal(params["classifier.weight"], torch.zeros_like(params["classifier.weight"]))


def test_gpt2_tied_head_is_decided_once_and_contradictions_are_reported(transformers):
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    plan = ll.plan(model, ll.unfreeze().freeze("transformer.wte"))
    entry = next(e for e in plan.params if e.path == "transformer.wte.weight")
    assert entry.aliases == ("lm_head.weight",) and not entry.trainable_after
    with pytest.raises(ll.SpecError, match="transformer.wte.weight = lm_head.weight"):
        ll.plan(model, ll.freeze("transformer").unfreeze("lm_head"))


def test_hf_resnet_frozen_backbone_keeps_batchnorm_statistics(transformers):
    import torch

    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = transformers.ResNetForImageClassification(config)
    ll.apply(model, ll.freeze("resnet"))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    torch_step(model, optimizer, pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 0]))
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in buffers.items())


def test_keras_transfer_learning_guide_fine_tunes_with_batchnorm_in_inference_mode():
    keras = pytest.importorskip("keras")
    import numpy as np

    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35)
    model = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, name="head")])
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32"), np.array([0, 1] * 4)
    ll.apply(model, ll.freeze(base.name))                     # phase 1: base frozen, new head trains
    model.fit(x, y, epochs=1, verbose=0)
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    stats = [w.numpy().copy() for layer in norms for w in layer.weights]  # gamma, beta and statistics
    kernel = base.get_layer("Conv_1").kernel.numpy().copy()  # the top conv: the bottom ones get ~0 gradient
    model.optimizer.learning_rate = 1e-5
    ll.apply(model, ll.unfreeze(), bn="frozen")               # phase 2: fine-tune, BatchNorm stays put
    model.fit(x, y, epochs=1, verbose=0)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(stats, (w for layer in norms for w in layer.weights)))
    assert not np.array_equal(kernel, base.get_layer("Conv_1").kernel.numpy())
    assert len(model.trainable_weights) == len(base.trainable_weights) + 2
