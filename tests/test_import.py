"""`import layerlock` and all framework-free work import no framework."""

import subprocess
import sys
import textwrap

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "tf_keras", "numpy")


def test_import_and_core_work_import_no_framework():
    code = textwrap.dedent(f"""
        import sys
        import layerlock as ll
        from layerlock.resolver import resolve
        from layerlock.tree import Node, Param
        spec = ll.freeze("backbone").unfreeze("*.bias")
        assert ll.Spec.from_json(spec.to_json()) == spec
        root = Node("", "Net", children=[Node("backbone", "Block", params=[Param("backbone.bias", 3, True, 0)])])
        str(resolve(root, spec))
        try:
            ll.apply(object(), spec)
        except ll.BackendError:
            pass
        print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
