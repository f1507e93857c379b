"""Private framework access behind one door per framework: every private attribute of
Keras/TensorFlow, PyTorch, Hugging Face and Flax that layerlock uses is named in that
framework's ``*_internals.py`` module only, and no other module uses any private name of
another object. Read off the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "layerlock"
BACKENDS = PACKAGE / "backends"
# door -> everything behind it. Adding a name here is a decision: give it a layout check.
DOORS = {
    BACKENDS / "keras_internals.py": {
        "_flatten_layers", "_trainable_variables", "_trainable_weights", "_value",                # layers, variables
        "_variables", "_trainable_variables_indices", "_var_key", "_tracker", "_built", "_index_dict",  # optimizers
        "keras.src.utils.tracking", "keras.src.optimizers.base_optimizer",
        "_distribute_strategy", "_is_compiled", "_compiled_trainable_state", "_reset_compile_cache",  # models
        "_learning_rate", "_backend_apply_gradients", "_backend_update_step", "_parallel_update_step",  # rates
        "_apply_weight_decay", "_use_weight_decay", "_get_current_learning_rate",
        "_weights_path", "_prev_weights_path",                                     # BackupAndRestore files
    },
    BACKENDS / "torch_internals.py": {
        "_parameters", "_modules",                                    # a module's own entries (the walk)
        "_NormBase", "_BatchNorm",                                    # norm layers with running statistics
        "_orig_mod", "_compiled_call_impl", "torch._dynamo", "_dynamo",  # torch.compile
        "_get_ddp_logging_data", "_comm_hooks",                       # DDP's reducer and its comm hooks
        "_last_lr",                                                   # LR schedulers (and lr_lambdas)
        "_backward_hooks",                                            # a tensor's gradient hooks
    },
    BACKENDS / "hf_internals.py": {"_gradient_checkpointing_func", "_require_grads_hook", "_require_grads_hooks"},
    BACKENDS / "flax_internals.py": {"_pytree__nodes", "_pytree__"},  # definition order; flax's bookkeeping prefix
}
# Framework internals without a leading underscore, held behind a door all the same.
UNMARKED = {BACKENDS / "torch_internals.py": {"lr_lambdas"}}
# Private names outside the doors that are no framework's: CPython's sys._getframe (warning
# stack levels), a TypeVar's name and the demo's module-name suffix.
NOT_A_FRAMEWORK = {"_getframe", "_T", "_run"}
PRIVATE_NAME = re.compile(r"_(?!_|layerlock)\w+")  # not dunders, not layerlock's own marks
PRIVATE_MODULE = re.compile(r"((tf_)?keras\.src|tensorflow\.python|torch\._\w+|flax\.nnx\.\w*\._\w+)(\.\w+)*")


def private_uses(path: Path) -> set[str]:
    """Private names a module uses on objects other than itself: ``x._name`` (x not self or
    cls), a private name as a string (``getattr(x, "_name")``, a layout table) and private
    framework modules (``keras.src...``, ``torch._dynamo``), imported or named."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and PRIVATE_NAME.fullmatch(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if PRIVATE_NAME.fullmatch(node.value) or PRIVATE_MODULE.fullmatch(node.value):
                found.add(node.value)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n for n in names if PRIVATE_MODULE.fullmatch(n)}
    return found


def attributes(path: Path) -> set[str]:
    return {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}


@pytest.mark.parametrize("door", DOORS, ids=lambda p: p.name)
def test_each_door_uses_exactly_its_listed_private_names(door):
    assert private_uses(door) - NOT_A_FRAMEWORK == DOORS[door]
    assert UNMARKED.get(door, set()) <= attributes(door)


def outside_the_doors() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p not in DOORS]


@pytest.mark.parametrize("path", outside_the_doors(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_outside_the_doors_uses_a_private_framework_name(path):
    assert private_uses(path) - NOT_A_FRAMEWORK == set()
    assert attributes(path) & set().union(*UNMARKED.values()) == set()
