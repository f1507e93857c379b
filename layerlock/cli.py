"""The ``layerlock`` command: see what a spec does to a model, and run the demo.

    layerlock plan MODEL --spec SPEC [--config JSON] [--bn POLICY] [--frozen-mode eval] [--no-strict] [--json] [--trust]
    layerlock summary MODEL [--config JSON] [--json] [--trust]
    layerlock demo [--backend torch|keras|flax|all] [--quick] [--out DIR]
    layerlock --version

Errors print one line to stderr and exit with status 2. Importing this module imports no
framework: models are loaded, and frameworks imported, inside the commands. TensorFlow's
start-up log lines are kept off stderr (``TF_CPP_MIN_LOG_LEVEL=0`` shows them).

>>> parse_rules("freeze:backbone; unfreeze:backbone.layer4, *.bias; freeze:kind=BatchNorm*")
Spec(freeze('backbone'), unfreeze('backbone.layer4', '*.bias'), freeze(kind='BatchNorm*'))
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, demo
from .demo.report import import_keras
from .errors import LayerlockError, SpecError
from .operations import plan, summary
from .spec import ACTIONS, Spec

EXIT_ERROR = 2
MODEL_HELP = ("a .keras (or .h5) file; a whole model saved with torch.save (needs --trust); "
              "package.module:factory, called with no arguments; or transformers:ModelClass "
              "(e.g. transformers:BertForSequenceClassification), built from its default config "
              "plus --config on the meta device: no weights are downloaded or allocated")
CONFIG_HELP = ("for transformers:ModelClass only: config overrides as a JSON object, e.g. "
               "'{\"num_hidden_layers\": 4}' (unknown keys are errors), or a config.json file "
               "(or a folder holding one), taken as is; Auto* classes need \"model_type\"")
SPEC_HELP = """\
SPEC is a .json/.yaml/.yml file, JSON text, or inline rules: rules separated by ';',
each ACTION[:SELECTOR,SELECTOR,...] with ACTION freeze or unfreeze and SELECTOR one of
  PATTERN        glob over full dotted paths ('*' crosses '.'), or 're:' + a regex
  depth=N        the first N blocks (like layers[:N]; -1 = all but the last)
  within=PATH    count depth among the children of PATH
  kind=GLOB      layers whose class name matches (BatchNorm*)
A rule without selectors selects everything; the later rule wins. Example:
  "freeze; unfreeze:backbone.layer4, *.bias; freeze:kind=BatchNorm*"
"""
_FACTORY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_KEYS = ("depth", "within", "kind")
_HF = "transformers:"


class CliError(LayerlockError):
    """A command-line input that cannot be used; the message is the one line shown."""


# -- inline specs -------------------------------------------------------------------------------
def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, so a regex such as ``re:x{1,2}`` stays whole.

    >>> _split_top("a, re:b{1,2}, c", ",")
    ['a', ' re:b{1,2}', ' c']
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_rules(text: str) -> Spec:
    """Parse inline rules (see ``layerlock plan --help``) into a :class:`~layerlock.Spec`.

    >>> parse_rules("freeze; unfreeze:depth=-2, within=encoder.layer")
    Spec(freeze(), unfreeze(depth=-2, within='encoder.layer'))
    >>> parse_rules("frezee:head")
    Traceback (most recent call last):
    ...
    layerlock.errors.SpecError: inline rule 1 'frezee:head': action must be freeze or unfreeze; received 'frezee'
    """
    spec = Spec()
    rules = [r.strip() for r in _split_top(text, ";")]
    if not any(rules):
        raise SpecError(f"the spec {text!r} holds no rule; write e.g. 'freeze:backbone; unfreeze:*.bias'")
    for n, rule in enumerate(rules, 1):
        if not rule:
            continue
        action, _, selectors = rule.partition(":")
        action = action.strip()
        where = f"inline rule {n} {rule!r}"
        if action not in ACTIONS:
            raise SpecError(f"{where}: action must be freeze or unfreeze; received {action!r}")
        patterns: list[str] = []
        options: dict[str, Any] = {}
        for item in (s.strip() for s in _split_top(selectors, ",")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq or item.startswith("re:") or key.strip() not in _KEYS:
                patterns.append(item)
                continue
            key, value = key.strip(), value.strip()
            if key == "kind":
                options.setdefault("kind", []).append(value)
            elif key in options:
                raise SpecError(f"{where}: {key} is given twice; split it into two rules")
            elif key == "depth":
                try:
                    options["depth"] = int(value)
                except ValueError:
                    raise SpecError(f"{where}: depth must be an int such as 2 or -1; received {value!r}") from None
            else:
                options[key] = value
        try:
            spec = getattr(spec, action)(*patterns, **options)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
    return spec


def load_spec(text: str) -> Spec:
    """A spec from a file (``.json``, ``.yaml``, ``.yml``), JSON text or inline rules.

    >>> load_spec('{"rules": [{"action": "freeze", "depth": 2}]}')
    Spec(freeze(depth=2))
    """
    stripped = text.strip()
    if stripped.lower().endswith((".json", ".yaml", ".yml")) or Path(stripped).is_file():
        return Spec.load(stripped)
    if stripped.startswith("{"):
        return Spec.from_json(stripped)
    return parse_rules(stripped)


# -- models -------------------------------------------------------------------------------------
def load_model(ref: str, *, trust: bool = False, config: str | None = None) -> Any:
    """Load MODEL: a ``.keras``/``.h5`` file, a ``torch.save``'d model (only with ``trust``,
    since unpickling runs code), ``package.module:factory`` or ``transformers:ModelClass``
    (with ``config``: JSON overrides or a config.json path; see :func:`load_transformers`).

    >>> load_model("mytask.models:build", config='{"num_hidden_layers": 4}')
    Traceback (most recent call last):
    ...
    layerlock.cli.CliError: --config applies only to transformers:ModelClass models; received MODEL 'mytask.models:build'
    """
    if ref.startswith(_HF):
        return load_transformers(ref[len(_HF):], config)
    if config is not None:
        raise CliError(f"--config applies only to {_HF}ModelClass models; received MODEL {ref!r}")
    path = Path(ref)
    if _FACTORY.fullmatch(ref) and not path.exists():
        return _call_factory(ref)
    if not path.exists():
        raise CliError(f"model {ref!r} not found: no such file, and not package.module:factory; "
                       f"MODEL is {MODEL_HELP}")
    if path.is_dir():
        raise CliError(f"model {ref!r} is a directory; MODEL is {MODEL_HELP} (save Keras models "
                       "with model.save('model.keras'))")
    if path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        return _load_keras(path)
    return _load_torch(path, trust)


def _call_factory(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder count
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CliError(f"cannot import {module_name!r} for factory {ref!r}: {exc}") from None
    except Exception as exc:
        raise CliError(f"importing {module_name!r} for factory {ref!r} failed: {type(exc).__name__}: {exc}") from None
    for name in attr.split("."):
        if not hasattr(obj, name):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n)))
            raise CliError(f"{module_name!r} has no attribute {attr!r} for factory {ref!r}; callables "
                           f"there: {', '.join(public[:8]) or 'none'}{', ...' if len(public) > 8 else ''}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise CliError(f"factory {ref!r} is a {type(obj).__name__}, not a callable that returns a model")
    try:
        return obj()
    except Exception as exc:
        raise CliError(f"factory {ref!r} raised {type(exc).__name__}: {exc}") from None


def load_transformers(name: str, config: str | None = None) -> Any:
    """Build the transformers model class ``name`` on the meta device, from the default config
    of its ``config_class`` updated with ``config`` (JSON text or a config.json path). Nothing
    is downloaded and no weights are allocated, so a 7B architecture plans in seconds.
    ``Auto*`` model classes take the architecture from ``"model_type"`` in ``config``.

    >>> load_transformers("BertForSequenceClassification", "{'num_hidden_layers': 4}")
    Traceback (most recent call last):
    ...
    layerlock.cli.CliError: --config is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); received "{'num_hidden_layers': 4}"
    """
    overrides, from_file = _read_config(config)  # bad JSON fails before the slow import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here should fetch
    try:
        import torch
        import transformers
    except ImportError:
        raise CliError(f"MODEL {_HF}{name} needs transformers and torch "
                       "(pip install transformers 'layerlock[torch]')") from None
    cls = _transformers_class(transformers, name)
    auto = hasattr(cls, "from_config")  # AutoModel*: the config class comes from model_type
    if auto:
        model_type = overrides.pop("model_type", None)
        if model_type is None:
            raise CliError(f"{_HF}{name} needs \"model_type\" in --config, e.g. '{{\"model_type\": \"llama\"}}'; "
                           f"or name the class itself, e.g. {_HF}LlamaForCausalLM")
        types = list(transformers.CONFIG_MAPPING.keys())
        if model_type not in types:
            raise CliError(f"--config model_type {model_type!r} is not a transformers model type; closest: "
                           f"{', '.join(difflib.get_close_matches(str(model_type), types, n=4)) or 'none'}")
        config_class = transformers.CONFIG_MAPPING[model_type]
    else:
        config_class = cls.config_class
        model_type = overrides.pop("model_type", config_class.model_type)
        if model_type != config_class.model_type:
            raise CliError(f"{_HF}{name} takes model_type {config_class.model_type!r}; --config has {model_type!r}")
    if not from_file:  # a config class accepts any key silently, so a typo would go unnoticed
        _check_config_keys(config_class, overrides, transformers.PretrainedConfig)
    what = f"{_HF}{name} with {config_class.__name__}"
    try:
        cfg = config_class.from_dict(overrides)
    except Exception as exc:
        raise CliError(f"{what}: the config is invalid: {type(exc).__name__}: {exc}") from None
    try:
        with torch.device("meta"):
            return cls.from_config(cfg) if auto else cls(cfg)
    except Exception as exc:
        raise CliError(f"building {what} raised {type(exc).__name__}: {exc}") from None


def _read_config(text: str | None) -> tuple[dict[str, Any], bool]:
    """``--config`` as a dict, and whether it came from a file."""
    if text is None:
        return {}, False
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise CliError(f"--config is not valid JSON ({exc}); received {text!r}") from None
        return data, False
    path = Path(stripped)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise CliError(f"--config {text!r} is neither a JSON object nor a config.json file "
                       "(or a folder holding one)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"--config file {str(path)!r} could not be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"--config file {str(path)!r} holds a {type(data).__name__}, not a JSON object")
    return data, True


def _transformers_class(transformers: Any, name: str) -> Any:
    names = [n for n in dir(transformers) if not n.startswith("_")]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.7)
        raise CliError(f"transformers has no model class {name!r} (MODEL {_HF}{name}); closest: "
                       f"{', '.join(close) or 'none'}")
    cls = getattr(transformers, name)
    if not (isinstance(cls, type) and (issubclass(cls, transformers.PreTrainedModel) or hasattr(cls, "from_config"))):
        raise CliError(f"MODEL {_HF}{name} is not a model class (a PreTrainedModel such as "
                       f"BertForSequenceClassification, or an AutoModel* class); received {type(cls).__name__} {name}")
    return cls


def _check_config_keys(config_class: Any, overrides: dict[str, Any], base: Any) -> None:
    default = config_class()
    known = set(default.to_dict()) | set(default.attribute_map) | {"num_labels"}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            own = sorted(known - set(base().to_dict()) - {"num_labels"})
            hint = f"closest: {', '.join(close)}" if close else f"{config_class.__name__} keys: {', '.join(own)}"
            raise CliError(f"--config key {key!r} is not a {config_class.__name__} key; {hint}")


def _load_keras(path: Path) -> Any:
    try:
        keras = import_keras()  # without TensorFlow's start-up lines
    except ImportError:
        raise CliError(f"{str(path)!r} is a Keras file, but keras is not installed "
                       "(pip install 'layerlock[tensorflow]')") from None
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise CliError(f"keras could not load {str(path)!r}: {type(exc).__name__}: {exc}") from None


def _load_torch(path: Path, trust: bool) -> Any:
    if not trust:
        raise CliError(f"loading {str(path)!r} with torch.load unpickles it, which can run arbitrary code; "
                       "pass --trust if you trust this file (or use package.module:factory)")
    try:
        import torch
    except ImportError:
        raise CliError(f"{str(path)!r} is not a .keras file, so it is read with torch.load, but torch is "
                       "not installed (pip install 'layerlock[torch]')") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CliError(f"torch.load could not read {str(path)!r}: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict):
        raise CliError(f"{str(path)!r} holds a dict (a state_dict or checkpoint?), not a model; save the "
                       "whole model with torch.save(model, path), or use package.module:factory")
    return obj


# -- commands -----------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)  # a bad spec fails before a framework is loaded
    model = load_model(args.model, trust=args.trust, config=args.config)
    result = plan(model, spec, strict=args.strict, bn=args.bn, frozen_mode=args.frozen_mode)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    result = summary(load_model(args.model, trust=args.trust, config=args.config))
    if args.json:
        print(json.dumps({"blocks": [asdict(r) for r in result.rows],
                          "trainable_scalars": result.trainable_scalars,
                          "frozen_scalars": result.frozen_scalars}, indent=2))
    else:
        print(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    every = list(demo.FRAMEWORKS)  # "both" is what "all" was called when there were two
    frameworks = {"all": every, "both": every, None: demo.installed()}.get(args.backend, [args.backend])
    if not frameworks:
        raise CliError("the demo needs torch, keras or flax, and none is installed "
                       "(pip install 'layerlock[torch]', 'layerlock[tensorflow]' or 'layerlock[jax]')")
    result = demo.run(frameworks, quick=args.quick, out=args.out, progress=sys.stderr.isatty())
    print()
    print(result["table"])
    print(f"\nwrote {result['json']}, {result['png']} and summary.txt in {args.out} "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items())})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line like every other error."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    """The command-line parser (also what ``--help`` shows)."""
    top = _Parser(prog="layerlock", description="Freeze and unfreeze layers in PyTorch, Keras and JAX: "
                  "inspect what a spec does to a model, or run the transfer-learning demo.")
    top.add_argument("--version", action="version", version=f"layerlock {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="{plan,summary,demo}",
                             parser_class=_Parser)

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("plan", help="show what a spec would freeze (changes nothing)", epilog=SPEC_HELP,
                       formatter_class=fmt, description="Dry run: print the plan of SPEC on MODEL.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--spec", required=True, metavar="SPEC", help="rules file, JSON text or inline rules (below)")
    p.add_argument("--config", metavar="JSON", help=CONFIG_HELP)
    p.add_argument("--bn", choices=("follow", "trainable", "frozen"), default="follow",
                   help="BatchNorm policy (default: follow the rules)")
    p.add_argument("--frozen-mode", choices=("eval",), default=None,
                   help="also hold fully frozen subtrees in inference mode")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="warn, instead of failing, when a rule selects nothing")
    p.add_argument("--json", action="store_true", help="print plan.to_dict() as JSON")
    p.add_argument("--trust", action="store_true", help="allow torch.load to unpickle MODEL (runs its code)")
    p.set_defaults(run=cmd_plan)

    s = sub.add_parser("summary", help="trainable and frozen counts per top-level block",
                       description="Print trainable / frozen counts per top-level block of MODEL.")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--config", metavar="JSON", help=CONFIG_HELP)
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    s.add_argument("--trust", action="store_true", help="allow torch.load to unpickle MODEL (runs its code)")
    s.set_defaults(run=cmd_summary)

    d = sub.add_parser("demo", help="transfer learning end to end on generated images",
                       description="Pretrain a small CNN on generated source classes, freeze its base, "
                       "train a new head on other classes, then fine-tune the top block; compare with "
                       "training from scratch. Writes summary.json, summary.txt and curves.png.")
    d.add_argument("--backend", choices=(*demo.FRAMEWORKS, "all", "both"), default=None, metavar="{"
                   + ",".join((*demo.FRAMEWORKS, "all")) + "}",
                   help="framework to run, or all (default: every installed one)")
    d.add_argument("--quick", action="store_true", help="a smaller run, about half the work (what the tests run)")
    d.add_argument("--out", default="layerlock-demo", metavar="DIR",
                   help="where to write the results (default: ./layerlock-demo)")
    d.set_defaults(run=cmd_demo)
    return top


def _error(message: str) -> int:
    print(f"layerlock: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``layerlock`` command; returns the exit status.

    >>> main(["plan", "no_such_module:build", "--spec", "freeze"])
    2
    """
    try:
        args = parser().parse_args(argv)
        return int(args.run(args))
    except SystemExit as exc:  # argparse: --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        print("layerlock: interrupted", file=sys.stderr)
        return 130
    except LayerlockError as exc:
        return _error(str(exc))
    except Exception as exc:  # a bug or an odd model: still one line, never a traceback
        return _error(f"unexpected {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
