"""A third-party backend, written from docs/backends.md alone (tests/plugin/layerlock_tinynp.py
over the toy numpy framework tests/plugin/tinynp.py), passes the conformance kit
layerlock.testing: registered with layerlock.backends.register here, and installed through a
real entry point in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import layerlock as ll
import layerlock.backends as lb
from layerlock.testing import BackendConformance, cases

np = pytest.importorskip("numpy")
PLUGIN = Path(__file__).resolve().parent / "plugin"
ROOT = PLUGIN.parent.parent


class TinyConformance(BackendConformance):
    """The reference model in tinynp, trained with tinynp's SGD (momentum, weight decay)."""

    def make(self):
        import tinynp as tn

        rng = np.random.default_rng(0)
        return tn.Sequential(
            stem=tn.Sequential(conv=tn.Conv2d(3, 4, 3, rng), bn=tn.BatchNorm2d(4), relu=tn.ReLU(),
                               pool=tn.GlobalAvgPool()),
            body=tn.Sequential(fc1=tn.Linear(4, 8, rng), fc2=tn.Linear(8, 8, rng)),
            head=tn.Linear(8, 3, rng))

    def train(self, steps=3):
        import tinynp as tn

        opt = tn.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        rng = np.random.default_rng(0)
        self.model.train()
        for _ in range(steps):
            x, y = rng.normal(size=(8, 3, 6, 6)), rng.integers(0, 3, size=8)
            opt.zero_grad()
            _, grad = tn.cross_entropy(self.model(x), y)
            self.model.backward(grad)
            opt.step()

    def layer_values(self):
        """The weights and, for BatchNorm, the running statistics (a held layer keeps them)."""
        out = super().layer_values()
        for path, module in self.model.named_modules():
            if hasattr(module, "running_mean"):
                out[path] = [*out[path], module.running_mean.tobytes(), module.running_var.tobytes()]
        return out


@pytest.fixture(scope="module", autouse=True)
def tinynp_backend():
    sys.path.insert(0, str(PLUGIN))
    import layerlock_tinynp

    backend = lb.register(layerlock_tinynp.TinyBackend())
    yield backend
    lb.unregister("tinynp")
    sys.path.remove(str(PLUGIN))


class TestTinyBackend(TinyConformance):
    """Every case of the kit, collected by pytest."""


def test_frozen_arrays_are_bit_identical_after_sgd_with_momentum():
    case = TinyConformance()
    model = case.model
    case.train()  # every tensor has a momentum buffer now
    ll.apply(model, ll.freeze("stem", "body.fc1"))
    frozen = {p: t.data.copy() for p, t in _tensors(model).items() if p.startswith(("stem.", "body.fc1."))}
    stats = model.stem.bn.running_mean.copy()
    case.train(steps=4)
    for path, data in frozen.items():
        assert np.array_equal(_tensors(model)[path].data, data), path
    assert np.array_equal(model.stem.bn.running_mean, stats)  # the frozen BatchNorm is held
    assert not np.array_equal(model.head.weight.data, TinyConformance().model.head.weight.data)


def _tensors(model):
    return {f"{path}.{name}" if path else name: t for path, m in model.named_modules() for name, t in m.named_tensors()}


def test_a_list_the_plugin_claimed_does_not_stay_cached_to_it():
    import tinynp as tn

    rng = np.random.default_rng(0)
    blocks = [tn.Linear(2, 2, rng), tn.Linear(2, 1, rng)]
    assert ll.plan(blocks, ll.freeze(depth=1)).frozen == ("0.weight", "0.bias")
    with pytest.raises(ll.BackendError) as info:
        ll.plan([1, 2], ll.freeze())
    assert "builtins.list (received [1, 2])" in str(info.value)
    assert "tinynp (imported)" in str(info.value) and "tinynp backend" in str(info.value)
    assert lb.get_backend(blocks).name == "tinynp"  # still asked, still claimed


def test_the_plugin_passes_the_kit_through_a_real_entry_point(tmp_path):
    dist = tmp_path / "layerlock_tinynp-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: layerlock-tinynp\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[layerlock.backends]\ntinynp = layerlock_tinynp:TinyBackend\n")
    code = textwrap.dedent("""
        import sys
        import layerlock.backends as lb
        from layerlock.testing import run
        from tests.test_plugin import TinyConformance

        model = TinyConformance().model      # imports tinynp; nothing registers a backend here
        backend = lb.get_backend(model)
        print(type(backend).__module__, backend.name)
        results = run(TinyConformance)
        print(sorted(set(results.values())), len(results))
        print(sorted(m for m in ("torch", "keras", "jax", "tensorflow") if m in sys.modules))
    """)
    path = ":".join(map(str, [tmp_path, PLUGIN, ROOT, *sys.path[1:]]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    origin, outcomes, frameworks = out.stdout.strip().splitlines()
    assert origin == "layerlock_tinynp tinynp"
    assert outcomes == f"['passed'] {len(cases(TinyConformance))}"
    assert frameworks == "[]"


def test_the_kit_imports_no_framework():
    code = ("import sys, layerlock.testing; print(sorted(m for m in ('torch', 'keras', 'tensorflow', 'jax', 'flax', "
            "'numpy', 'pytest') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
