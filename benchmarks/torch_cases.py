"""PyTorch models and the five freezing modes. Every model is a backbone plus a small
head; ``features`` runs the backbone and ``head`` the rest, so the ``no_grad`` limit is the
same computation with the backbone outside autograd."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import layerlock as ll

from .measure import SIZES, Step


@dataclass(frozen=True)
class Case:
    """A model to benchmark: how to build it and a batch, at full and quick size."""

    name: str
    backbone: str                      # module path of the part that gets frozen
    build: Callable[[dict], nn.Module]
    batch: Callable[[dict, str], tuple[torch.Tensor, torch.Tensor]]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    full: dict
    quick: dict

    def size(self, quick: bool) -> dict:
        return self.quick if quick else self.full


# --- models ----------------------------------------------------------------------------

class Backboned(nn.Module):
    """``backbone`` then ``head``, the layout users freeze most often."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head


def build_cnn(s: dict) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 3
    for c in s["channels"]:
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Backboned(nn.Sequential(*layers), nn.Linear(c_in, 10))


def build_transformer(s: dict) -> nn.Module:
    layer = nn.TransformerEncoderLayer(s["d"], s["heads"], 4 * s["d"], dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, s["layers"], enable_nested_tensor=False)
    return Backboned(encoder, nn.Linear(s["d"], 10))


def build_bert(s: dict) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], intermediate_size=4 * s["d"],
                        max_position_embeddings=s["seq"], num_labels=10)
    return BertForSequenceClassification(config)


def build_resnet(s: dict) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=s["channels"][0], hidden_sizes=list(s["channels"]),
                          depths=list(s["depths"]), layer_type="basic", num_labels=10)
    return ResNetForImageClassification(config)


def image_batch(s: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["batch"], 3, s["hw"], s["hw"], generator=g)
    return x.to(device), torch.randint(0, 10, (s["batch"],), generator=g).to(device)


def sequence_batch(s: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["batch"], s["seq"], s["d"], generator=g)
    return x.to(device), torch.randint(0, 10, (s["batch"],), generator=g).to(device)


def token_batch(s: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g)
    return x.to(device), torch.randint(0, 10, (s["batch"],), generator=g).to(device)


CASES = {c.name: c for c in [
    Case("cnn", "backbone", build_cnn, image_batch,
         lambda m, x: m.backbone(x), lambda m, f: m.head(f),
         **SIZES["cnn"]),
    Case("transformer", "backbone", build_transformer, sequence_batch,
         lambda m, x: m.backbone(x), lambda m, f: m.head(f.mean(1)),
         **SIZES["transformer"]),
    Case("hf-bert", "bert", build_bert, token_batch,
         lambda m, x: m.bert(input_ids=x).pooler_output, lambda m, f: m.classifier(m.dropout(f)),
         full={"vocab": 8192, "d": 256, "heads": 4, "layers": 4, "seq": 128, "batch": 16},
         quick={"vocab": 2048, "d": 128, "heads": 4, "layers": 2, "seq": 64, "batch": 8}),
    Case("hf-resnet", "resnet", build_resnet, image_batch,
         lambda m, x: m.resnet(x).pooler_output, lambda m, f: m.classifier(f),
         full={"channels": (64, 128, 256, 512), "depths": (1, 1, 1, 1), "batch": 32, "hw": 64},
         quick={"channels": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "batch": 16, "hw": 32}),
]}


# --- modes -----------------------------------------------------------------------------

def hand_freeze(model: nn.Module, backbone: str) -> None:
    """What people write without layerlock: flags off, then BatchNorm back to eval
    after every ``model.train()`` (here once: the benchmark calls train() once)."""
    for p in model.get_submodule(backbone).parameters():
        p.requires_grad_(False)
    model.train()
    for m in model.get_submodule(backbone).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def make_step(case: Case, mode: str, quick: bool, device: str) -> tuple[Step, nn.Module]:
    """A fresh model in ``mode`` and its training step (forward, backward, SGD update)."""
    s = case.size(quick)
    torch.manual_seed(0)
    model = case.build(s).to(device)
    x, y = case.batch(s, device)
    spec = ll.freeze(case.backbone)
    if mode == "layerlock":
        ll.apply(model, spec)
    elif mode == "layerlock_eval":
        ll.apply(model, spec, frozen_mode="eval")
    model.train()  # layerlock's hold keeps its frozen parts in eval through this call
    if mode in ("hand", "limit"):
        hand_freeze(model, case.backbone)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        if mode == "limit":
            with torch.no_grad():
                feats = case.features(model, x)
        else:
            feats = case.features(model, x)
        F.cross_entropy(case.head(model, feats), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def describe(model: nn.Module) -> dict[str, Any]:
    return {"params": sum(p.numel() for p in model.parameters()),
            "tensors": sum(1 for _ in model.parameters())}


# --- apply overhead --------------------------------------------------------------------

def synthetic(n_tensors: int) -> nn.Module:
    """``n_tensors`` parameter tensors: blocks of two tiny Linear layers under ``backbone``
    and a head. Built with bare Parameters, since 50k default inits would dominate."""
    def linear() -> nn.Module:
        m = nn.Module()
        m.weight = nn.Parameter(torch.zeros(2, 2))
        m.bias = nn.Parameter(torch.zeros(2))
        return m

    blocks = nn.ModuleList()
    for _ in range(max(1, (n_tensors - 2) // 4)):
        block = nn.Module()
        block.fc1, block.fc2 = linear(), linear()
        blocks.append(block)
    return Backboned(blocks, linear())


def hand_loop(model: nn.Module, pattern: str) -> None:
    """The hand-written equivalent of ``ll.apply(model, ll.freeze(pattern))``."""
    for name, p in model.named_parameters():
        if fnmatch.fnmatchcase(name, pattern + ".*"):
            p.requires_grad_(False)


def unfreeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def sync(device: str):
    """What ends a timed region: CUDA runs asynchronously, the CPU does not."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)
