"""Backend detection: lazy, cached by type, Keras before torch, and third-party entry points."""

import subprocess
import sys
import textwrap

import pytest


def run(code, *paths):
    env_path = ":".join(str(p) for p in paths)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_third_party_backend_loads_from_the_entry_point_group(tmp_path):
    (tmp_path / "toy_backend.py").write_text(textwrap.dedent("""
        from layerlock.results import State
        from layerlock.tree import Node, Param

        class ToyModel:
            flags = {"w": True}

        class ToyBackend:
            name, module, param_level = "toy", "toy_backend", True
            def owns(self, model): return isinstance(model, ToyModel)
            def tree(self, model): return Node("", "Toy", params=[Param("w", 3, model.flags["w"], 0)])
            def apply(self, model, plan): model.flags.update({p.path: p.trainable_after for p in plan.params})
            def read(self, model): return State("toy", dict(model.flags))
            def write(self, model, state): model.flags.update(state.params)
            def weights(self, model): yield "w", model.flags["w"], b"abc"
    """))
    dist = tmp_path / "toy_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[layerlock.backends]\ntoy = toy_backend:ToyBackend\n")
    out = run("""
        import sys, layerlock as ll
        import toy_backend
        print(ll.apply(toy_backend.ToyModel(), ll.freeze()).frozen, "torch" in sys.modules)
    """, tmp_path, *sys.path[1:])
    assert out == "('w',) False"


def test_a_broken_plugin_is_named_in_the_error(tmp_path):
    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[layerlock.backends]\nbroken = no_such_module:Backend\n")
    out = run("""
        import layerlock as ll
        try:
            ll.apply(object(), ll.freeze())
        except ll.BackendError as exc:
            print(exc)
    """, tmp_path, *sys.path[1:])
    assert "backend plugin 'broken' (no_such_module:Backend) failed to load" in out


def test_keras_models_go_to_the_keras_backend_even_on_torch_keras():
    out = run("""
        import os
        os.environ["KERAS_BACKEND"] = "torch"
        import keras, torch, layerlock.backends as lb
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        print(isinstance(model, torch.nn.Module), lb.get_backend(model).name, lb.get_backend(torch.nn.Linear(1, 1)).name)
    """, *sys.path[1:])
    assert out.splitlines()[-1] == "True keras torch"


class _Words:
    """A backend that claims plain lists of strings: one parameter per word."""

    name, module, param_level = "words", "layerlock", True

    def __init__(self):
        self.asked = 0

    def owns(self, model):
        self.asked += 1
        return isinstance(model, list) and bool(model) and all(isinstance(w, str) for w in model)

    def tree(self, model):
        from layerlock.tree import Node, Param

        return Node("", "Words", params=[Param(w, 1, True, w) for w in model])

    def apply(self, model, plan):
        pass

    def read(self, model):
        from layerlock.results import State

        return State(self.name, {w: True for w in model})

    def write(self, model, state):
        pass

    def weights(self, model):
        yield from ((w, True, w.encode()) for w in model)


def test_detection_does_not_cache_a_generic_container_type():
    import layerlock as ll
    import layerlock.backends as lb

    words = lb.register(_Words())
    try:
        assert ll.plan(["a", "b"], ll.freeze()).frozen == ("a", "b")
        with pytest.raises(ll.BackendError, match=r"builtins\.list \(received \[1, 2\]\)"):
            ll.plan([1, 2], ll.freeze())  # was: an empty plan, `list` cached to the first claimant
        asked = words.asked
        assert ll.plan(["c"], ll.freeze()).frozen == ("c",)
        assert words.asked == asked + 1  # asked again: nothing cached for a list
    finally:
        lb.unregister("words")


def test_detection_still_caches_a_models_own_type(fake_backend):
    import layerlock as ll

    from .fake import resnetish

    calls = []
    fake_backend.owns = lambda model, owns=fake_backend.owns: calls.append(1) or owns(model)
    model = resnetish()
    ll.plan(model, ll.freeze())
    ll.plan(model, ll.freeze())
    assert len(calls) == 1


def test_the_unowned_model_error_says_what_was_received_and_names_every_backend():
    import layerlock as ll
    import layerlock.backends as lb

    lb.register(_Words())
    try:
        with pytest.raises(ll.BackendError) as info:
            ll.plan({"w": 1}, ll.freeze())
    finally:
        lb.unregister("words")
    message = str(info.value)
    assert "builtins.dict (received {'w': 1})" in message
    assert "installed backends: keras (" in message and "torch (" in message
    assert "registered and plugin backends: words (imported)" in message
    assert "or a model of the words backend" in message  # not only torch, Keras or NNX
    assert "layerlock.backends.register" in message and "'layerlock.backends'" in message


def _holding(holds):
    from .fake import FakeBackend

    class Holding(FakeBackend):
        name = f"holds-{holds}"

    backend = Holding()
    backend.holds = holds
    return backend


def test_a_backend_that_holds_only_norm_layers_refuses_frozen_mode_eval_before_anything_changes():
    import layerlock as ll
    import layerlock.backends as lb

    from .fake import resnetish

    lb.register(_holding("norm"))
    try:
        model = resnetish()
        before = ll.snapshot(model)
        with pytest.raises(ll.SpecError) as info:
            ll.apply(model, ll.freeze("stem"), frozen_mode="eval")
        assert ll.snapshot(model) == before
        assert "holds-norm backend can hold only norm layers (holds='norm')" in str(info.value)
        assert "accepted with this backend: frozen_mode=None" in str(info.value)
        assert ll.apply(model, ll.freeze("stem")).held == ("stem.bn",)  # norm layers it can hold
    finally:
        lb.unregister("holds-norm")


def test_a_backend_that_holds_nothing_gets_plans_that_hold_nothing_but_bn_still_decides():
    import layerlock as ll
    import layerlock.backends as lb

    from .fake import resnetish

    lb.register(_holding("none"))
    try:
        model = resnetish()
        assert ll.plan(model, ll.freeze("stem")).layers == ()
        plan = ll.plan(model, ll.unfreeze(), bn="frozen")
        assert plan.layers == () and "stem.bn.weight" in plan.frozen
        assert "stem.bn.weight" in ll.plan(model, ll.freeze(), bn="trainable").trainable
        with pytest.raises(ll.SpecError, match="can hold no layer"):
            ll.plan(model, ll.freeze(), frozen_mode="eval")
    finally:
        lb.unregister("holds-none")


def test_a_backend_with_an_unknown_holds_value_fails_validation_naming_it():
    import layerlock as ll
    import layerlock.backends as lb

    with pytest.raises(ll.BackendError, match="backend 'holds-some' has holds='some'; accepted: 'any'"):
        lb.register(_holding("some"))
    assert "holds-some" not in [b.name for b in lb._registered]


def test_the_registry_and_the_resolver_accept_the_same_holds():
    import layerlock.backends as lb
    from layerlock.resolver import HOLDS

    assert lb.HOLDS == HOLDS
