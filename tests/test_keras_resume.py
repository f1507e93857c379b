"""A fit with ``FreezeScheduler`` and ``keras.callbacks.BackupAndRestore``, killed inside a
later phase and started again in a fresh process (new model from the same seed, new
optimizer, new callbacks), ends where the uninterrupted fit ends: bit-identical wherever
Keras' own resume is (the control: the same kill and resume without layerlock), in either
callback order, on TensorFlow, torch and JAX. The frozen stem never moves, and no optimizer
state is skipped. A backup of another schedule or model is refused before anything loads.

The runs are this file run as a script (``python tests/test_keras_resume.py first|resume
DIR``) in subprocesses: ``first`` does every uninterrupted run and every killed run,
``resume`` every resume, in a new process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EPOCHS, KILLS = 4, {"2": (2, 1), "3": (3, 1)}  # kill: (epoch, batch) -> raised after that batch
# The resumes per backend, (callback order, kill), with Keras' own (the control) at the same kill:
# each order with each kill once across the backends, fits being slow to compile.
RESUMES = {"tensorflow": [("scheduler-first", "2"), ("backup-first", "3")],
           "torch": [("scheduler-first", "3")], "jax": [("backup-first", "2")]}
SLOW = ("torch", "jax")  # the other backends' runs are make test-all's (LAYERLOCK_TEST_ALL=1)


class Kill(Exception):
    pass


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")


def schedule():
    import layerlock as ll

    return ll.Schedule({0: ll.freeze("stem", "body"), 2: ll.unfreeze("body")}, lr={2: 0.003})


def build(seed=0, stem=8):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(stem, name="stem"),
                              keras.layers.Dense(8, name="body"), keras.layers.Dense(1, name="head")], name="net")
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def fit(mode, backup_dir=None, kill=None):
    """One fit of ``mode`` ('control' or the callback order) from a new model; its final weights by path."""
    import keras

    import layerlock.keras as llk

    model = build()
    callbacks = [] if mode == "control" else [llk.FreezeScheduler(schedule(), log=None)]
    if backup_dir is not None:
        backup = keras.callbacks.BackupAndRestore(backup_dir)
        callbacks = [backup, *callbacks] if mode == "backup-first" else [*callbacks, backup]
    if kill is not None:
        class Killer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (self.epoch, batch) == kill:
                    raise Kill()

        callbacks.append(Killer())
    x, y = data()
    try:
        model.fit(x, y, epochs=EPOCHS, batch_size=8, shuffle=False, verbose=0, callbacks=callbacks)
    except Kill:
        pass
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def refusals(out):
    """Fits of another schedule, another model and a scheduler-less backup, each with its
    message and whether the model was left as it was; run while the backups are there."""
    import keras
    import numpy as np

    import layerlock as ll
    import layerlock.keras as llk

    found = {}
    for case, backup in [("schedule", "scheduler-first-2"), ("model", "scheduler-first-2"), ("no-record", "control-2")]:
        model = build(seed=1, stem=6 if case == "model" else 8)
        before = [keras.ops.convert_to_numpy(v) for v in model.weights]
        scheduler = llk.FreezeScheduler(ll.Schedule({0: ll.freeze("stem")}) if case == "schedule" else schedule(),
                                        log=None)
        try:
            model.fit(*data(), epochs=EPOCHS, verbose=0,
                      callbacks=[keras.callbacks.BackupAndRestore(out / f"{backup}.backup"), scheduler])
            found[case] = {"error": None}
        except Exception as exc:
            found[case] = {"error": type(exc).__name__, "layerlock": isinstance(exc, ll.LayerlockError),
                           "message": str(exc)}
        found[case]["unchanged"] = all(v.trainable and (keras.ops.convert_to_numpy(v) == b).all()
                                       for v, b in zip(model.weights, before))
    (out / "refusals.json").write_text(json.dumps(found))


def main(stage, out):
    import keras
    import numpy as np

    out = Path(out)
    resumes = RESUMES[keras.backend.backend()]
    for name in [f"control-{k}" for _, k in resumes] + [f"{o}-{k}" for o, k in resumes]:
        mode, kill = name.rsplit("-", 1)
        if stage == "first":
            np.savez(out / f"{name}.killed.npz", **fit(mode, out / f"{name}.backup", KILLS[kill]))
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                weights = fit(mode, out / f"{name}.backup")
            np.savez(out / f"{name}.resumed.npz", **weights)
            (out / f"{name}.warnings.json").write_text(json.dumps([str(w.message) for w in caught]))
    if stage == "first":  # the uninterrupted fits (the callback order plays no part there)
        np.savez(out / "control.reference.npz", **fit("control"))
        np.savez(out / "scheduler.reference.npz", **fit("scheduler-first"))
        np.savez(out / "initial.npz", **{v.path: keras.ops.convert_to_numpy(v) for v in build().weights})
        if keras.backend.backend() == "tensorflow":
            refusals(out)


# -- the tests --------------------------------------------------------------------------------------
def run_stage(backend, stage, out):
    env = {**os.environ, "KERAS_BACKEND": backend, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.Popen([sys.executable, __file__, stage, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every backend's runs: first the uninterrupted and killed fits, then, in a new process,
    the resumes; the backends run beside each other."""
    import importlib.util

    every = os.environ.get("LAYERLOCK_TEST_ALL") == "1"
    outs = {b: tmp_path_factory.mktemp(b) for b in RESUMES
            if importlib.util.find_spec(b) is not None and (every or b not in SLOW)}
    for stage in ("first", "resume"):
        procs = {b: run_stage(b, stage, out) for b, out in outs.items()}
        for b, proc in procs.items():
            log, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"KERAS_BACKEND={b} {stage}:\n{log[-4000:]}"
    return outs


def load(out, name):
    import numpy as np

    with np.load(out / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def max_diff(a, b):
    import numpy as np

    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.mark.parametrize(("backend", "order", "kill"), [
    pytest.param(b, o, k, marks=[pytest.mark.slow] if b in SLOW else []) for b, runs in RESUMES.items() for o, k in runs],
    ids=lambda v: f"killed-in-epoch-{v}" if v in KILLS else v)
def test_a_fit_killed_in_a_later_phase_resumes_to_the_uninterrupted_result(runs, backend, order, kill):
    if backend not in runs:
        pytest.skip(f"{backend} is not installed")
    out = runs[backend]
    control = max_diff(load(out, f"control-{kill}.resumed"), load(out, "control.reference"))
    ours, reference = load(out, f"{order}-{kill}.resumed"), load(out, "scheduler.reference")
    assert max_diff(ours, reference) <= (0.0 if control == 0.0 else 1e-6), (control, max_diff(ours, reference))
    initial, killed = load(out, "initial"), load(out, f"{order}-{kill}.killed")
    for path in ("net/stem/kernel", "net/stem/bias"):  # frozen by every phase
        assert (ours[path] == initial[path]).all() and (killed[path] == initial[path]).all()
    assert not (ours["net/body/kernel"] == initial["net/body/kernel"]).all()  # phase 2 trained it
    assert not any("Skipping" in w for w in json.loads((out / f"{order}-{kill}.warnings.json").read_text()))


@pytest.mark.parametrize("case", ["schedule", "model", "no-record"])
def test_a_backup_of_another_schedule_or_model_or_without_the_scheduler_is_refused_before_anything_loads(runs, case):
    if "tensorflow" not in runs:
        pytest.skip("tensorflow is not installed")
    found = json.loads((runs["tensorflow"] / "refusals.json").read_text())[case]
    assert found["layerlock"], found
    expected = {"schedule": "another schedule", "model": "another structure", "no-record": "no FreezeScheduler record"}
    assert expected[case] in found["message"] and "delete" in found["message"] and ".backup" in found["message"]
    assert found["unchanged"]  # refused before BackupAndRestore loaded anything, before the first phase


if __name__ == "__main__":
    main(*sys.argv[1:])
