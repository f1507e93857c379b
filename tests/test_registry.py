"""Backend detection: lazy, cached by type, Keras before torch, and third-party entry points."""

import subprocess
import sys
import textwrap


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
