"""The conformance kit: what every backend must do, as cases a backend's own tests run.

Build the reference model (:data:`LAYOUT`) in your framework and subclass
:class:`BackendConformance` in a test module; pytest collects every case (``test_prefix``,
``test_later_wins``, ``test_snapshot_restore_is_exact``, ...)::

    from layerlock.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        def make(self):               # a fresh reference model, as LAYOUT describes it
            return my_framework_reference_model()

        def train(self, steps=3):     # a few real optimizer steps on self.model
            ...

The expectations come from the layout itself (:func:`expected`), not from another backend, so
a plugin is held to exactly what the built-in backends are held to. Without pytest,
:func:`run` runs the cases and says which passed or were skipped. Importing this module
imports no framework.

>>> expected("nested").frozen
('body.fc1.weight', 'body.fc1.bias')
>>> frozen_layers(expected("later-wins")), expected("later-wins").held
(['body.fc1', 'stem.bn', 'stem.conv'], ('stem.bn',))
"""

from __future__ import annotations

import functools
import sys
import unittest
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

from .backends import get_backend, get_check
from .errors import LayerlockWarning, NoMatchError, SpecError
from .operations import apply, check, fingerprint, plan, restore, snapshot
from .resolver import resolve
from .results import Finding, Plan
from .spec import Spec, freeze, unfreeze
from .tree import Tree, build

# The reference model: layer path -> (class name, {parameter short name: scalars}), in the
# framework's order. Short names may be the framework's own: ``weight`` or ``kernel`` for a
# dense or conv layer's matrix, ``bias``; a norm layer's scale ``weight``, ``gamma`` or
# ``scale`` and its shift ``bias`` or ``beta``. Kinds may be the framework's too, as long as
# ``Conv*`` and ``BatchNorm*`` match the conv and norm layers. Parameter-free layers (ReLU,
# pooling, flatten) may sit in ``stem`` after ``bn``; the model's blocks are stem, body, head.
LAYOUT: Mapping[str, tuple[str, Mapping[str, int]]] = {
    "stem": ("Stem", {}),
    "stem.conv": ("Conv2d", {"weight": 4 * 3 * 3 * 3, "bias": 4}),   # 3 -> 4 channels, 3x3 kernel, valid
    "stem.bn": ("BatchNorm2d", {"weight": 4, "bias": 4}),          # over the 4 channels, then ReLU and mean pool
    "body": ("Body", {}),
    "body.fc1": ("Linear", {"weight": 4 * 8, "bias": 8}),          # 4 -> 8
    "body.fc2": ("Linear", {"weight": 8 * 8, "bias": 8}),          # 8 -> 8
    "head": ("Linear", {"weight": 8 * 3, "bias": 3}),              # 8 -> 3 classes
}

# The named specs every backend must resolve alike on the reference model.
SPECS: Mapping[str, Spec] = {
    "flat": freeze("head"),
    "prefix": freeze("stem"),
    "nested": freeze("body.fc1"),
    "later-wins": freeze("stem", "body").unfreeze("body.fc2"),
    "depth": freeze(depth=2),
    "negative-depth": freeze(depth=-1),
    "within": freeze(depth=1, within="body"),
    "kind": freeze(kind=["Conv*", "BatchNorm*"]),
    # a norm layer's shift is `bias` (torch, NNX, Equinox) or `beta` (Keras): one regex serves all
    "bitfit": freeze().unfreeze("re:.*\\.(bias|beta)"),
    # a norm layer's scale is `weight` (torch, Equinox), `gamma` (Keras) or `scale` (NNX)
    "bn-scale": freeze("re:.*\\.bn\\.(weight|gamma|scale)"),
    # every tensor but the shifts
    "no-bias": freeze("re:.*\\.(weight|kernel|gamma|scale)"),
    "regex": freeze("re:(stem|body)\\..*"),
    "everything": freeze(),
}


def reference_tree() -> Tree:
    """:data:`LAYOUT` as the :class:`~layerlock.tree.Tree` a conforming backend's tree
    resolves like (built with :func:`layerlock.tree.build`, as a backend builds its own)."""
    def children(path: str) -> Iterator[tuple[str, str]]:
        prefix = path + "." if path else ""
        for sub in LAYOUT:
            name = sub.removeprefix(prefix)
            if sub.startswith(prefix) and "." not in name:
                yield name, sub

    def params(path: str) -> list[tuple[str, str, int, bool]]:
        return [(name, f"{path}.{name}", n, True) for name, n in LAYOUT[path][1].items()] if path else []

    def describe(path: str) -> tuple[str, bool, bool]:
        kind = LAYOUT[path][0] if path else "Net"
        return kind, kind.startswith("BatchNorm"), False

    return build("", children, params, describe, key=str).tree


@functools.lru_cache(maxsize=None)
def _expected(spec: Spec, frozen_mode: str | None) -> Plan:
    return resolve(reference_tree(), spec, frozen_mode=frozen_mode, backend="reference")


def expected(spec: str | Spec, *, frozen_mode: str | None = None) -> Plan:
    """The plan of ``spec`` (a name in :data:`SPECS`, or a Spec) on the reference layout:
    what every backend's plan must agree with, layer by layer."""
    return _expected(SPECS[spec] if isinstance(spec, str) else spec, frozen_mode)


def frozen_layers(result: Plan) -> list[str]:
    """The layers a plan freezes parameters of, sorted: comparable across frameworks, whose
    parameter short names differ."""
    return sorted({p.rpartition(".")[0] for p in result.frozen})


def _skip(reason: str) -> NoReturn:
    """Skip the case: through pytest when it runs the case (the report points at the case),
    else with :class:`unittest.SkipTest`, which :func:`run` and unittest understand."""
    pytest = sys.modules.get("pytest")
    if pytest is not None:
        pytest.skip(reason)
    raise unittest.SkipTest(reason)


def _skipped() -> tuple[type[BaseException], ...]:
    pytest = sys.modules.get("pytest")
    return (unittest.SkipTest, pytest.skip.Exception) if pytest is not None else (unittest.SkipTest,)


def _same(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, expected {want!r}")


class BackendConformance:
    """The conformance cases; subclass it in a test module (``class TestMyBackend(...)``).

    Define ``make()``; define ``train()`` to run the training cases (they are skipped
    otherwise). Each case runs on a fresh instance, so ``self.model`` is a fresh model.

    - ``make()``: a fresh reference model (:data:`LAYOUT`).
    - ``train(steps=3)``: train ``self.model`` in place (or rebind it) for a few steps with an
      optimizer built over *all* its parameters that has momentum and weight decay, so that a
      frozen weight the framework let through would move.
    - ``layer_values()``: layer path -> a comparable value of that layer's weights (default:
      the bytes ``Backend.weights`` gives; add running statistics to check holds too).
    - ``holds``: what the backend can hold in inference mode; default: its ``holds``.
    - ``plan(spec, **options)`` / ``apply(spec, **options)``: default ``ll.plan`` / ``ll.apply``
      on ``self.model``; ``stateful = False`` for models that carry no flags (a JAX pytree,
      planned with ``layerlock.jax``): the snapshot, fingerprint and check cases are skipped.
    """

    holds: str | None = None
    stateful = True

    # -- what a subclass provides -------------------------------------------------------

    def make(self) -> Any:
        raise NotImplementedError("BackendConformance.make() must return a fresh reference model (see LAYOUT)")

    def train(self, steps: int = 3) -> None:
        _skip("define train() to run the training cases")

    def layer_values(self) -> dict[str, Any]:
        out: dict[str, list[bytes]] = {}
        for path, _, data in get_backend(self.model).weights(self.model):
            out.setdefault(path.rpartition(".")[0], []).append(data)
        return out

    def plan(self, spec: Spec, **options: Any) -> Plan:
        return plan(self.model, spec, **options)

    def apply(self, spec: Spec, **options: Any) -> Plan:
        return apply(self.model, spec, **options)

    @functools.cached_property
    def model(self) -> Any:
        return self.make()

    def capability(self) -> str:
        """What the backend under test can hold in inference mode (``"any"``, ``"norm"``, ``"none"``)."""
        return self.holds or str(getattr(get_backend(self.model), "holds", "any"))

    # -- the same spec selects the same layers ------------------------------------------

    def check_spec(self, name: str) -> None:
        """``SPECS[name]`` freezes the layers, and the scalars, the reference layout says."""
        got, want = self.plan(SPECS[name]), expected(name)
        _same(f"{name}: frozen layers", frozen_layers(got), frozen_layers(want))
        _same(f"{name}: frozen scalars", got.frozen_scalars, want.frozen_scalars)
        _same(f"{name}: trainable scalars", got.trainable_scalars, want.trainable_scalars)
        _same(f"{name}: layers held in inference mode", sorted(got.held),
              sorted(want.held) if self.capability() != "none" else [])

    def test_flat(self) -> None:
        self.check_spec("flat")

    def test_prefix(self) -> None:
        self.check_spec("prefix")

    def test_nested(self) -> None:
        self.check_spec("nested")

    def test_later_wins(self) -> None:
        self.check_spec("later-wins")

    def test_depth(self) -> None:
        self.check_spec("depth")

    def test_negative_depth(self) -> None:
        self.check_spec("negative-depth")

    def test_within(self) -> None:
        self.check_spec("within")

    def test_kind(self) -> None:
        self.check_spec("kind")

    def test_bitfit(self) -> None:
        self.check_spec("bitfit")

    def test_bn_scale(self) -> None:
        self.check_spec("bn-scale")

    def test_no_bias(self) -> None:
        self.check_spec("no-bias")

    def test_regex(self) -> None:
        self.check_spec("regex")

    def test_everything(self) -> None:
        self.check_spec("everything")

    def test_frozen_mode_eval_holds_what_the_backend_can(self) -> None:
        """``holds="any"``: the topmost fully frozen subtrees are held; otherwise a clear
        SpecError, before anything changes."""
        if not self.stateful:
            _skip("a model without flags has no inference mode to hold")
        spec = freeze("stem", "body.fc1")
        if self.capability() == "any":
            _same("frozen_mode='eval': held layers", sorted(self.plan(spec, frozen_mode="eval").held),
                  sorted(expected(spec, frozen_mode="eval").held))
            return
        state = snapshot(self.model)
        try:
            self.apply(spec, frozen_mode="eval")
        except SpecError as exc:
            if "frozen_mode" not in str(exc):
                raise AssertionError(f"the SpecError does not name frozen_mode: {exc}") from exc
        else:
            raise AssertionError(f"holds={self.capability()!r}, yet frozen_mode='eval' did not raise SpecError")
        _same("the state after a refused frozen_mode='eval'", snapshot(self.model), state)

    # -- applying -----------------------------------------------------------------------

    def test_apply_keeps_weights_and_is_idempotent(self) -> None:
        before = self.layer_values()
        first = self.apply(SPECS["later-wins"])
        _same("weights after apply", self.layer_values(), before)
        if self.stateful:  # a pytree plan is recomputed from the spec: there is no state to change
            _same("what a second apply changes", self.apply(SPECS["later-wins"]).changed, ())
            _same("the frozen set of a second apply", self.plan(SPECS["later-wins"]).frozen, first.frozen)

    def test_snapshot_restore_is_exact(self) -> None:
        """Restore puts back every trainable flag and every hold: a frozen norm layer's and,
        where the backend can hold any layer, ``frozen_mode="eval"``'s."""
        if not self.stateful:
            _skip("a model without flags has no state to snapshot")
        scenarios: list[tuple[Spec, str | None]] = [(freeze("stem").unfreeze("*.bias"), None), (freeze("stem"), None)]
        if self.capability() == "any":
            scenarios.append((freeze("stem", "body.fc1"), "eval"))
        for spec, frozen_mode in scenarios:
            state = snapshot(self.model)
            self.apply(spec, frozen_mode=frozen_mode)
            if snapshot(self.model) == state:
                raise AssertionError(f"apply({spec!r}, frozen_mode={frozen_mode!r}) changed nothing that "
                                     "snapshot() records")
            restore(self.model, state)
            _same(f"the state after {spec!r} (frozen_mode={frozen_mode!r}) and restore", snapshot(self.model), state)
            # the tree agrees: no layer is still held (the fresh model had no holds)
            _same(f"layers still held after {spec!r} (frozen_mode={frozen_mode!r}) and restore",
                  [lp.path for lp in self.plan(unfreeze()).layers if lp.held_before], [])

    # -- errors ---------------------------------------------------------------------------

    def test_typo_error(self) -> None:
        try:
            self.apply(freeze("body.fc3"))
        except NoMatchError as exc:
            if not {"body.fc1", "body.fc2"} & set(exc.suggestions):
                raise AssertionError(f"the suggestions miss body.fc1/body.fc2: {exc.suggestions}") from exc
        else:
            raise AssertionError("freeze('body.fc3') did not raise NoMatchError")

    def test_bad_input(self) -> None:
        """A non-Spec and a depth beyond the three blocks raise SpecError saying what is accepted."""
        bad_specs: list[tuple[Any, str]] = [("stem", "ll.freeze"), (freeze(depth=4), "-3 to 3")]
        for bad, says in bad_specs:
            try:
                self.plan(bad)
            except SpecError as exc:
                if says not in str(exc):
                    raise AssertionError(f"the SpecError does not say {says!r}: {exc}") from exc
            else:
                raise AssertionError(f"no SpecError (expected one saying {says!r})")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.plan(freeze(depth=4), strict=False)
        if not any(issubclass(w.category, LayerlockWarning) for w in caught):
            raise AssertionError("strict=False did not turn the depth error into a LayerlockWarning")

    # -- training -------------------------------------------------------------------------

    def check_training(self, name: str) -> None:
        """After ``SPECS[name]``, real training steps move exactly the trainable layers, and
        the frozen weights stay bit-identical."""
        result = self.apply(SPECS[name])
        _same(f"{name}: frozen layers", frozen_layers(result), frozen_layers(expected(name)))
        before = self.layer_values()
        frozen_before = fingerprint(self.model) if self.stateful else ""
        self.train()
        after = self.layer_values()
        moved = sorted(layer for layer in before if before[layer] != after.get(layer))
        _same(f"{name}: layers whose weights moved in training", moved,
              sorted({p.rpartition(".")[0] for p in result.trainable}))
        if self.stateful:
            _same(f"{name}: fingerprint of the frozen weights after training", fingerprint(self.model), frozen_before)
            _same(f"{name}: fingerprint, taken twice", fingerprint(self.model), fingerprint(self.model))

    def test_training_later_wins(self) -> None:
        self.check_training("later-wins")

    def test_training_depth(self) -> None:
        self.check_training("depth")

    def test_training_bitfit(self) -> None:
        self.check_training("bitfit")

    # -- ll.check -------------------------------------------------------------------------

    def test_check_never_claims_what_it_did_not_check(self) -> None:
        if not self.stateful:
            _skip("ll.check takes a model with flags")
        report = check(self.model)
        wrong = [f for f in report.findings if not isinstance(f, Finding)]
        _same("findings that are not layerlock.Finding", wrong, [])
        if get_check(get_backend(self.model)) is None and not report.not_checked:
            raise AssertionError("a backend without checks got a clean report instead of 'not checked'")


def cases(case_class: type[BackendConformance]) -> list[str]:
    """The names of the cases, in definition order."""
    names: dict[str, None] = {}
    for klass in reversed(case_class.__mro__):
        names.update((n, None) for n, v in vars(klass).items() if n.startswith("test_") and callable(v))
    return list(names)


def run(case_class: type[BackendConformance], only: Callable[[str], bool] = lambda name: True) -> dict[str, str]:
    """Run every case (those ``only`` accepts) on a fresh instance; return case -> ``"passed"``
    or ``"skipped: why"``. A failing case raises AssertionError naming it.

    >>> class Nothing(BackendConformance):
    ...     def make(self): raise unittest.SkipTest("no model here")
    >>> set(run(Nothing).values())
    {'skipped: no model here'}
    """
    out = {}
    for name in filter(only, cases(case_class)):
        try:
            getattr(case_class(), name)()
        except _skipped() as exc:
            out[name] = f"skipped: {getattr(exc, 'msg', None) or exc}"
        except AssertionError as exc:
            raise AssertionError(f"{case_class.__name__}.{name}: {exc}") from exc
        else:
            out[name] = "passed"
    return out


__all__ = ["LAYOUT", "SPECS", "BackendConformance", "cases", "expected", "frozen_layers", "reference_tree", "run"]
