"""The package is layered: every module imports only modules of lower layers, at module
level or inside a function, so there is no import cycle to dodge. Read off the source."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "layerlock"

# Bottom to top. `__init__` loads the public API lazily (PEP 562) and imports only `errors`.
LAYERS = [
    {"errors", "_format"},
    {"families"},                                    # layer families: kind="family:dense" (spec checks names)
    {"spec", "tree", "__init__"},
    {"results"},                                     # plain result values
    {"resolver"},                                    # the pure resolver
    {"schedule"},                                    # Phase / Schedule values (no runtime)
    {"backends"},                                    # protocol, registry, check protocol
    # one door per framework: every private attribute of that framework, layout-checked
    {"backends.keras_internals", "backends.torch_internals", "backends.hf_internals", "backends.flax_internals"},
    {"backends.wrappers"},                           # DDP / compile / Accelerate / PEFT unwrapping
    {"backends.distributed"},                        # DDP / FSDP guards
    {"backends.torch_rows"},                         # torch: some rows of a tensor trainable
    {"backends.torch", "backends.keras", "backends.flax", "backends.pytree"},  # translation tables
    {"diagnostics", "diagnostics.torch", "diagnostics.keras", "diagnostics.flax", "diagnostics.pytree"},  # ll.check
    {"operations", "rate_table"},                        # plan, apply, summary, state, check; the rate table
    {"testing"},                                     # conformance kit for backends (plugins too)
    {"stepper"},                                     # the runtime that steps a Schedule
    {"torch", "keras", "jax"},                      # helpers per framework
    {"flax"},                                        # NNX helpers (its optimizer rates are layerlock.jax's)
    {"lightning", "transformers", "demo.config", "demo.data", "demo.report"},
    {"demo.torch_run"},
    {"demo.keras_run", "demo.flax_run"},
    {"demo"},
    {"cli"},
]
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(layerlock module, line) for each import of the package in ``path``, ignoring
    ``if TYPE_CHECKING:`` blocks (they run only under a type checker)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` names a submodule when x is one, else the package itself
            for alias in node.names if not node.module else [None]:
                full = f"{target}.{alias.name}" if alias and target else (alias.name if alias else target)
                out.append((full if full in LAYER else (target or "__init__"), node.lineno))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [(n.removeprefix("layerlock.") or "__init__", node.lineno) for n in names
                    if n == "layerlock" or n.startswith("layerlock.")]
    return out


def test_every_module_is_in_a_layer():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(LAYER), f"add to or remove from LAYERS: {sorted(modules ^ set(LAYER))}"


def test_modules_import_only_lower_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for target, line in imported_modules(path):
            if target != name and LAYER[target] >= LAYER[name]:
                wrong.append(f"{name} (layer {LAYER[name]}) imports {target} (layer {LAYER[target]}) at line {line}")
    assert not wrong, "\n".join(wrong)


def test_the_registry_loads_neither_the_resolver_nor_a_framework():
    code = textwrap.dedent("""
        import sys
        import layerlock.backends
        print(sorted(m for m in ("layerlock.resolver", "layerlock.operations", "torch", "keras") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
