"""The conformance matrix: one spec means the same thing in every framework (issue 18, item 3).

Every cell is architecture x selector x framework, a named case such as
``test_matrix[mlp-depth=-1-keras-jax]``. The architectures and selectors are in
:mod:`tests.matrix_models`; the frameworks are torch, Keras on its TensorFlow, torch and JAX
backends (one subprocess per Keras backend, since ``KERAS_BACKEND`` is read when keras is
imported; each computes all its cells at once), Flax NNX (``ll.plan``), Equinox and Flax
linen param dicts (``layerlock.jax.plan``). Plans only, no training; each model is built once
per process.

Each cell asserts the trainable scalar count and, per block (what the user indexes as
``model.layers[:N]``), whether it is all frozen, all trainable or mixed and whether it is held
in inference mode. The expected values (:data:`EXPECTED`) are the PyTorch plan written out,
so the torch cells check the reference itself and the family cells state the contract before
the families exist; a failure also shows what torch gives. Written per block as a string, one
letter a block: ``F`` frozen, ``T`` trainable, ``M`` mixed, ``_`` no parameters (relu, pool,
flatten), and ``h`` after a held block: ``"FFh_TT"``.

What a framework cannot show is not compared, never silently:
- pytrees hold nothing in inference mode: expected unheld, and ``frozen_mode="eval"`` raises
  ``SpecError``;
- a linen param dict has no entry for a layer without parameters, so its blocks are the
  weighted ones: parameter-free blocks are dropped from the expectation, and a ``depth`` that
  counts past one of them selects other layers there (skipped, with the reason);
- ``family:dropout`` runs with ``strict=False`` everywhere: dropout layers have no
  parameters, so the family legitimately matches nothing in a linen param dict; whether it
  matched (no "matches nothing" warning) is compared wherever dropout layers are layers.
:data:`KNOWN` lists the cells a framework's own naming makes differ, each with its reason.
No spec uses ``within=``: none is needed on the torch models.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .matrix_models import ARCHS, MARKER, PYTREES, SELECTOR_BY_NAME, SELECTORS, run_all

KERAS_BACKENDS = ("tensorflow", "torch", "jax")
FRAMEWORKS = ("torch", *(f"keras-{b}" for b in KERAS_BACKENDS), "nnx", "equinox", "linen")
NEEDS = {"torch": ("torch",), "keras-tensorflow": ("keras", "tensorflow"), "keras-torch": ("keras", "torch"),
         "keras-jax": ("keras", "jax"), "nnx": ("jax", "flax"), "equinox": ("jax", "equinox", "optax"),
         "linen": ("jax", "flax", "optax")}

# The PyTorch plan of each cell: (trainable scalars, per-block pattern[, warned]) or the
# error it raises. Scalars: mlp 146 (Linear 40, BatchNorm 16, relu, Linear 72, Linear 18);
# cnn 319 (conv 112, bn 8, relu, conv 148, pool, flatten, Linear 51); transformer 1386
# (embed 80, blocks 2 x 600 = LayerNorm 16 + attention 288 + LayerNorm 16 + Linear 144 +
# Linear 136, norm 16, head 90). `family:dense` is the dense layers outside attention, so
# attention stays trainable under it: the only reading every framework can agree on, since
# each builds attention differently (torch keeps q/k/v as raw tensors beside a dense out_proj;
# Keras, NNX and Equinox use four dense sublayers; linen's are named query/key/value/out, so a
# param dict cannot tell they are dense); docs/spec.md defines the family that way.
EXPECTED: dict[str, dict[str, Any]] = {
    "mlp": {
        "depth=1": (106, "FT_TT"), "depth=2": (90, "FFh_TT"), "depth=3": (90, "FFh_TT"),
        "depth=-1": (18, "FFh_FT"), "depth=-2": (90, "FFh_TT"), "depth=-3": (90, "FFh_TT"), "depth=8": "SpecError",
        "family:dense": (16, "FT_FF"), "family:conv": "NoMatchError", "family:norm": (130, "TFh_TT"),
        "family:batchnorm": (130, "TFh_TT"), "family:layernorm": "NoMatchError", "family:embedding": "NoMatchError",
        "family:attention": "NoMatchError", "family:dropout": (146, "TT_TT", True),
        "kind=BatchNorm*": (130, "TFh_TT"), "kind=Conv*": "NoMatchError",
        "bn=follow+depth=2": (90, "FFh_TT"), "bn=trainable+depth=2": (106, "FT_TT"),
        "bn=trainable+freeze-all": (16, "FT_FF"), "bn=frozen+depth=1": (90, "FFh_TT"),
        "bn=frozen+unfreeze-all": (130, "TFh_TT"),
        "frozen_mode=eval+depth=2": (90, "FhFh_TT"), "frozen_mode=eval+depth=-1": (18, "FhFh_FhT"),
        "re:bitfit": (26, "MM_MM"), "re:all-but-shifts": (26, "MM_MM"),
    },
    "cnn": {
        "depth=1": (207, "FT_T__T"), "depth=2": (199, "FFh_T__T"), "depth=3": (199, "FFh_T__T"),
        "depth=-1": (51, "FFh_F__T"), "depth=-2": (51, "FFh_F__T"), "depth=-3": (51, "FFh_F__T"),
        "depth=8": "SpecError",
        "family:dense": (268, "TT_T__F"), "family:conv": (59, "FT_F__T"), "family:norm": (311, "TFh_T__T"),
        "family:batchnorm": (311, "TFh_T__T"), "family:layernorm": "NoMatchError",
        "family:embedding": "NoMatchError", "family:attention": "NoMatchError", "family:dropout": (319, "TT_T__T", True),
        "kind=BatchNorm*": (311, "TFh_T__T"), "kind=Conv*": (59, "FT_F__T"),
        "bn=follow+depth=2": (199, "FFh_T__T"), "bn=trainable+depth=2": (207, "FT_T__T"),
        "bn=trainable+freeze-all": (8, "FT_F__F"), "bn=frozen+depth=1": (199, "FFh_T__T"),
        "bn=frozen+unfreeze-all": (311, "TFh_T__T"),
        "frozen_mode=eval+depth=2": (199, "FhFh_T__T"), "frozen_mode=eval+depth=-1": (51, "FhFh_Fh__T"),
        "re:bitfit": (15, "MM_M__M"), "re:all-but-shifts": (15, "MM_M__M"),
    },
    "transformer": {
        "depth=1": (1306, "FTTT"), "depth=2": (106, "FFTT"), "depth=3": (90, "FFFT"),
        "depth=-1": (90, "FFFT"), "depth=-2": (106, "FFTT"), "depth=-3": (1306, "FTTT"), "depth=8": "SpecError",
        "family:dense": (736, "TMTF"), "family:conv": "NoMatchError", "family:norm": (1306, "TMFT"),
        "family:batchnorm": "NoMatchError", "family:layernorm": (1306, "TMFT"), "family:embedding": (1306, "FTTT"),
        "family:attention": (810, "TMTT"), "family:dropout": (1386, "TTTT", False),
        "kind=BatchNorm*": "NoMatchError", "kind=Conv*": "NoMatchError",
        "bn=follow+depth=2": (106, "FFTT"), "bn=trainable+depth=2": (106, "FFTT"),
        "bn=trainable+freeze-all": (0, "FFFF"), "bn=frozen+depth=1": (1306, "FTTT"),
        "bn=frozen+unfreeze-all": (1386, "TTTT"),
        "frozen_mode=eval+depth=2": (106, "FhFhTT"), "frozen_mode=eval+depth=-1": (90, "FhFhFhT"),
        # every shift trainable: 2 x (LayerNorm 8 + attention 32 + LayerNorm 8 + 16 + 8) + 8 + 10
        "re:bitfit": (162, "FMMM"), "re:all-but-shifts": (162, "FMMM"),
    },
}

# Cells a framework's own naming makes differ from the reference: (framework, arch, selector)
# -> why. They run as strict xfails, so a cell that starts to agree is reported.
_LINEN_SEQUENTIAL = ("a linen nn.Sequential names its param-dict entries layers_<i>: no class name "
                     "reaches the dict (and BatchNorm's scale/bias look like LayerNorm's), so no kind, "
                     "family or bn policy can find its layers")
_LINEN_KIND_CELLS = {
    "mlp": ("family:dense", "family:norm", "family:batchnorm", "kind=BatchNorm*", "bn=trainable+depth=2",
            "bn=trainable+freeze-all", "bn=frozen+depth=1", "bn=frozen+unfreeze-all"),
    "cnn": ("family:dense", "family:conv", "family:norm", "family:batchnorm", "kind=BatchNorm*", "kind=Conv*",
            "bn=trainable+depth=2", "bn=trainable+freeze-all", "bn=frozen+depth=1", "bn=frozen+unfreeze-all"),
}
_TORCH_MHA = ("torch's nn.MultiheadAttention keeps its q/k/v projection as in_proj_weight / in_proj_bias, "
              "which the names-table regexes (short name weight / bias) do not match")
_EMBEDDING_NAME = ("the embedding table's short name is embeddings (Keras) / embedding (NNX, linen), not in "
                   "re:.*\\.(weight|kernel|gamma|scale); torch and Equinox call it weight")
KNOWN: dict[tuple[str, str, str], str] = {
    **{("linen", arch, sel): _LINEN_SEQUENTIAL for arch, sels in _LINEN_KIND_CELLS.items() for sel in sels},
    ("torch", "transformer", "re:bitfit"): _TORCH_MHA,
    ("torch", "transformer", "re:all-but-shifts"): _TORCH_MHA,
    **{(fw, "transformer", "re:all-but-shifts"): _EMBEDDING_NAME
       for fw in ("keras-tensorflow", "keras-torch", "keras-jax", "nnx", "linen")},
}

CELLS = [(arch, sel.name, fw) for arch in ARCHS for sel in SELECTORS for fw in FRAMEWORKS]
assert set(EXPECTED) == set(ARCHS) and all(set(EXPECTED[a]) == set(SELECTOR_BY_NAME) for a in ARCHS)
assert all(cell[1:] in {(a, s) for a in ARCHS for s in SELECTOR_BY_NAME} for cell in KNOWN)


# -- computing the cells, once per framework ---------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _installed(framework: str) -> bool:
    return all(importlib.util.find_spec(name) for name in NEEDS[framework])


@functools.lru_cache(maxsize=None)
def _keras_processes() -> dict[str, subprocess.Popen]:
    """All three Keras backends start at once, so they run while the in-process cells do."""
    root = Path(__file__).resolve().parent.parent
    out = {}
    for backend in KERAS_BACKENDS:
        if _installed(f"keras-{backend}"):
            env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
            out[backend] = subprocess.Popen([sys.executable, str(root / "tests" / "matrix_models.py"), "keras"],
                                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)
    return out


@functools.lru_cache(maxsize=None)
def _results(framework: str) -> dict[str, Any]:
    """``{arch: {"blocks": ..., "cells": ...}}``, or ``{"error": why}`` when a Keras run failed."""
    if not framework.startswith("keras-"):
        return run_all(framework)
    proc = _keras_processes()[framework.removeprefix("keras-")]
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        return {"error": f"KERAS_BACKEND={framework.removeprefix('keras-')} tests/matrix_models.py keras exited "
                         f"{proc.returncode}:\n{stderr[-3000:]}"}
    return json.loads(lines[-1].removeprefix(MARKER))


@pytest.fixture(scope="module")
def keras_started():
    _keras_processes()
    yield
    for proc in _keras_processes().values():  # a failed run leaves nothing behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- what each framework must show ------------------------------------------------------------------
def _blocks(pattern: str) -> list[list[Any]]:
    states = {"F": "frozen", "T": "trainable", "M": "mixed", "_": "empty"}
    return [[states[s], h == "h"] for s, h in re.findall(r"([FTM_])(h?)", pattern)]


def _linen_counts_the_same(arch: str, depth: int) -> bool:
    """Whether ``depth`` selects the same weighted blocks when only those are counted (a linen
    param dict) as when every block is (``model.layers[:depth]``)."""
    every_block = _blocks(EXPECTED[arch]["depth=1"][1])
    everything = range(len(every_block))
    weighted = [i for i in everything if every_block[i][0] != "empty"]
    if abs(depth) > len(everything) or abs(depth) > len(weighted):
        return abs(depth) > len(everything) and abs(depth) > len(weighted)  # both raise SpecError
    return [i for i in everything[:depth] if i in weighted] == weighted[:depth]


def expectation(framework: str, arch: str, selector: str) -> dict[str, Any]:
    """The cell's expected result in the form :func:`tests.matrix_models.summarize` gives."""
    sel = SELECTOR_BY_NAME[selector]
    ref = EXPECTED[arch][selector]
    if framework in PYTREES and sel.frozen_mode == "eval":
        return {"error": "SpecError"}
    if isinstance(ref, str):
        expected: dict[str, Any] = {"error": ref}
    else:
        trainable, pattern, *warned = ref
        blocks = _blocks(pattern)
        if framework in PYTREES:
            blocks = [[state, False] for state, _ in blocks]
        if framework == "linen":
            blocks = [b for b in blocks if b[0] != "empty"]
        expected = {"trainable": trainable, "blocks": blocks}
        if warned and framework != "linen":
            expected["warned"] = warned[0]
    return expected


def _shown(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"raises {result['error']}" + (f" ({result['message']})" if result.get("message") else "")
    letters = {"frozen": "F", "trainable": "T", "mixed": "M", "empty": "_"}
    pattern = "".join(letters[s] + ("h" if h else "") for s, h in result["blocks"])
    extra = f", warned={result['warned']}" if "warned" in result else ""
    return f"trainable {result['trainable']}, blocks {pattern}{extra}"


def _compared(result: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k in expected}


def _case(arch: str, selector: str, framework: str) -> Any:
    known = KNOWN.get((framework, arch, selector))
    return pytest.param(arch, selector, framework, id=f"{arch}-{selector}-{framework}",
                        marks=[pytest.mark.xfail(reason=known, strict=True)] if known else [])


@pytest.mark.parametrize(("arch", "selector", "framework"), [_case(*cell) for cell in CELLS])
def test_matrix(arch, selector, framework, keras_started):
    if not _installed(framework):
        pytest.skip(f"{framework} needs {', '.join(NEEDS[framework])}")
    sel = SELECTOR_BY_NAME[selector]
    if framework == "linen" and sel.depth is not None and not _linen_counts_the_same(arch, sel.depth):
        pytest.skip(f"a linen param dict has entries for weighted layers only, so depth={sel.depth} counts "
                    "other blocks than model.layers[:N] there")
    results = _results(framework)
    assert "error" not in results, results.get("error")
    per_arch = results[arch]
    assert "build_error" not in per_arch, f"{framework} {arch} did not build: {per_arch.get('build_error')}"
    result = per_arch["cells"][selector]
    expected = expectation(framework, arch, selector)
    reference = ""
    if framework != "torch" and _installed("torch"):
        reference = f"; torch gives: {_shown(_results('torch')[arch]['cells'][selector])}"
    assert _compared(result, expected) == expected, (
        f"{arch} / {selector} / {framework} (blocks {per_arch['blocks']}): got {_shown(result)}; "
        f"expected {_shown(expected)}{reference}")


def test_matrix_size(capsys):
    """Architectures x selectors x frameworks, every one a named case."""
    assert len(CELLS) == len(ARCHS) * len(SELECTORS) * len(FRAMEWORKS) == len(set(CELLS))
    with capsys.disabled():
        print(f"\nconformance matrix: {len(ARCHS)} architectures x {len(SELECTORS)} selectors x "
              f"{len(FRAMEWORKS)} frameworks = {len(CELLS)} cells ({len(KNOWN)} known differences)")
