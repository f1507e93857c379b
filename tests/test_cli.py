"""The `layerlock` command: plan and summary on real models, inline specs, and errors that
are one line with exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import layerlock as ll
from layerlock.cli import main, parse_rules

FACTORIES = textwrap.dedent("""
    import torch

    def net():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2))

    def not_a_model():
        return {"weights": [1, 2]}

    def broken():
        raise RuntimeError("weights missing")
""")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding `cli_models.py` (factories) and `net.pt` (a torch.save'd model)."""
    torch = pytest.importorskip("torch")
    (tmp_path / "cli_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cli_models", raising=False)
    import cli_models

    torch.save(cli_models.net(), tmp_path / "net.pt")
    torch.save(cli_models.net().state_dict(), tmp_path / "weights.pt")
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_on_a_factory_prints_the_plan_table(workdir, capsys):
    code, out, err = run(capsys, "plan", "cli_models:net", "--spec", "freeze:depth=2; unfreeze:*.bias")
    assert code == 0, err
    assert "layerlock plan (torch" in out
    assert "0.weight" in out and "trainable -> frozen" in out and "#1 unfreeze('*.bias')" in out


def test_plan_json_is_plan_to_dict(workdir, capsys):
    code, out, _ = run(capsys, "plan", "cli_models:net", "--spec", "freeze", "--bn", "trainable", "--json")
    data = json.loads(out)
    assert code == 0 and data["backend"] == "torch" and data["bn"] == "trainable"
    trainable = {p["path"] for p in data["params"] if p["trainable_after"]}
    assert trainable == {"1.weight", "1.bias"}  # only the BatchNorm, by the bn policy


def test_plan_reads_a_spec_file_and_changes_nothing(workdir, capsys):
    ll.freeze(kind="BatchNorm*").save(workdir / "spec.json")
    code, out, _ = run(capsys, "plan", "cli_models:net", "--spec", "spec.json", "--frozen-mode", "eval")
    assert code == 0 and "1.{weight,bias}" in out and "frozen_mode='eval'" in out


def test_no_strict_turns_a_typo_into_a_warning(workdir, capsys):
    with pytest.warns(ll.LayerlockWarning, match="backbone"):
        code, out, _ = run(capsys, "plan", "cli_models:net", "--spec", "freeze:backbone", "--no-strict")
    assert code == 0 and "(no rule: unchanged)" in out


def test_summary_of_a_torch_saved_model_with_trust(workdir, capsys):
    code, out, err = run(capsys, "summary", "net.pt", "--trust")
    assert code == 0, err
    assert "BatchNorm2d" in out and "trainable: 100.0%" in out
    code, out, _ = run(capsys, "summary", "net.pt", "--trust", "--json")
    assert code == 0 and json.loads(out)["frozen_scalars"] == 0


def test_plan_of_a_keras_file(tmp_path, capsys):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="body"),
                              keras.layers.Dense(1, name="head")])
    model.save(tmp_path / "m.keras")
    code, out, err = run(capsys, "plan", str(tmp_path / "m.keras"), "--spec", "freeze:body")
    assert code == 0, err
    assert "body.{kernel,bias}" in out and "trainable -> frozen" in out


@pytest.mark.parametrize("argv, message", [
    (["plan", "missing.keras", "--spec", "freeze"], "not found"),
    (["summary", "missing.pt"], "not found"),
    (["plan", "cli_models:nope", "--spec", "freeze"], "has no attribute 'nope'"),
    (["plan", "no_such_module:net", "--spec", "freeze"], "cannot import 'no_such_module'"),
    (["plan", "cli_models:broken", "--spec", "freeze"], "raised RuntimeError: weights missing"),
    (["plan", "cli_models:not_a_model", "--spec", "freeze"], "no layerlock backend handles a builtins.dict"),
    (["plan", "cli_models:net", "--spec", "freez:0"], "action must be freeze or unfreeze"),
    (["plan", "cli_models:net", "--spec", "freeze:depth=two"], "depth must be an int"),
    (["plan", "cli_models:net", "--spec", "freeze:depth=9"], "depth=9 but the model has 4 blocks"),
    (["plan", "cli_models:net", "--spec", "missing.yaml"], "cannot read 'missing.yaml'"),
    (["plan", "cli_models:net", "--spec", "{not json"], "could not be parsed"),
    (["plan", "cli_models:net", "--spec", "freeze:3.wieght"], "closest paths: 3.weight"),
    (["plan", "cli_models:net", "--spec", "freeze", "--bn", "sometimes"], "invalid choice: 'sometimes'"),
    (["plan", "cli_models:net", "--spec", "freeze", "--config", "{}"], "--config applies only to transformers:"),
    (["summary", "net.pt", "--trust", "--config", "{}"], "received MODEL 'net.pt'"),
    (["plan", "cli_models:net"], "required: --spec"),
    (["summary", "net.pt"], "pass --trust"),
    (["summary", "weights.pt", "--trust"], "holds a dict (a state_dict or checkpoint?)"),
    (["summary", "."], "is a directory"),
    ([], "required"),
])
def test_each_error_is_one_line_and_exit_2(workdir, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("layerlock: error: ")
    assert message in err
    assert "Traceback" not in err


def test_inline_rules_cover_every_selector():
    spec = parse_rules("freeze:backbone; unfreeze:backbone.layer4; freeze:depth=2; unfreeze:*.bias; "
                       "freeze:kind=BatchNorm*, kind=LayerNorm; unfreeze:depth=-2, within=encoder.layer; freeze")
    assert spec == (ll.freeze("backbone").unfreeze("backbone.layer4").freeze(depth=2).unfreeze("*.bias")
                    .freeze(kind=["BatchNorm*", "LayerNorm"]).unfreeze(depth=-2, within="encoder.layer")
                    .freeze())


def test_inline_regex_keeps_its_commas():
    assert parse_rules(r"unfreeze:re:layer\.[0-9]{1,2}\.bias, head") == ll.unfreeze(r"re:layer\.[0-9]{1,2}\.bias", "head")


def test_version_and_a_light_import():
    code = ("import sys, layerlock.cli; "
            "assert not {'torch', 'keras', 'tensorflow', 'jax', 'transformers'} & set(sys.modules), sorted(sys.modules); "
            "sys.exit(layerlock.cli.main(['--version']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"layerlock {ll.__version__}"


# -- transformers:ModelClass, built from a config on the meta device ------------------------------
BERT = "transformers:BertForSequenceClassification"
SMALL = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128, "num_labels": 3}


@pytest.fixture
def hf(monkeypatch):
    """transformers, with HF_HUB_OFFLINE (which the command sets) restored afterwards."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return pytest.importorskip("transformers")


def test_plan_of_a_transformers_config_matches_the_real_model(hf, capsys):
    spec = "freeze; unfreeze:bert.encoder.layer.3, classifier"
    real = ll.plan(hf.BertForSequenceClassification(hf.BertConfig(**SMALL)), parse_rules(spec))
    code, out, err = run(capsys, "plan", BERT, "--config", json.dumps(SMALL), "--spec", spec, "--json")
    assert code == 0, err
    assert json.loads(out) == real.to_dict()
    code, out, _ = run(capsys, "plan", BERT, "--config", json.dumps(SMALL), "--spec", spec)
    assert code == 0 and out.rstrip().endswith(str(real).rstrip().splitlines()[-1])
    assert f"frozen {real.frozen_scalars:,} scalars" in out and f"trainable {real.trainable_scalars:,} in" in out


def test_a_7b_architecture_plans_on_the_meta_device_without_weights(hf, capsys):
    from layerlock.cli import load_model

    model = load_model("transformers:LlamaForCausalLM", config='{"hidden_size": 4096, "num_hidden_layers": 32}')
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 6_000_000_000
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    code, out, err = run(capsys, "summary", "transformers:LlamaForCausalLM", "--json")
    assert code == 0, err
    assert json.loads(out)["trainable_scalars"] == 6_738_415_616  # the default config is Llama 2 7B


def test_an_auto_class_takes_the_model_type_and_a_config_file_is_taken_as_is(hf, tmp_path, capsys):
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}
    code, out, err = run(capsys, "plan", "transformers:AutoModelForCausalLM", "--config", json.dumps(config),
                         "--spec", "freeze; unfreeze:transformer.h.1")
    assert code == 0, err
    assert "transformer.h.1.attn" in out and "transformer.h.2" not in out
    hf.BertConfig(**SMALL).save_pretrained(tmp_path)
    code, out, err = run(capsys, "summary", "transformers:BertModel", "--config", str(tmp_path))
    assert code == 0, err
    assert f"{sum(p.numel() for p in hf.BertModel(hf.BertConfig(**SMALL)).parameters()):,}" in out


@pytest.mark.parametrize("argv, message", [
    (["plan", BERT, "--config", '{"num_hidden_layers": 4}', "--spec", "freeze:bert.encoder.layer.4"],
     "pattern 'bert.encoder.layer.4' matches no layer or parameter; closest paths: bert.encoder.layer.3"),
    (["plan", "transformers:BertForSequenceClasification", "--spec", "freeze"],
     "no model class 'BertForSequenceClasification' (MODEL transformers:BertForSequenceClasification); "
     "closest: BertForSequenceClassification"),
    (["summary", "transformers:BertConfig"], "is not a model class"),
    (["plan", BERT, "--config", '{"num_hiden_layers": 4}', "--spec", "freeze"],
     "--config key 'num_hiden_layers' is not a BertConfig key; closest: num_hidden_layers"),
    (["plan", BERT, "--config", '{"zzz": 1}', "--spec", "freeze"], "BertConfig keys: add_cross_attention,"),
    (["plan", BERT, "--config", '{"num_hidden_layers": "four"}', "--spec", "freeze"], "expected int, got str"),
    (["plan", BERT, "--config", "{num_hidden_layers: 4}", "--spec", "freeze"], "--config is not valid JSON"),
    (["plan", BERT, "--config", "missing.json", "--spec", "freeze"], "neither a JSON object nor a config.json"),
    (["plan", BERT, "--config", '{"model_type": "gpt2"}', "--spec", "freeze"], "takes model_type 'bert'"),
    (["summary", "transformers:AutoModel"], 'needs "model_type" in --config'),
    (["summary", "transformers:AutoModel", "--config", '{"model_type": "lama"}'], "closest: llama"),
])
def test_transformers_errors_are_one_line_and_exit_2(hf, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("layerlock: error: ")
    assert message in err
