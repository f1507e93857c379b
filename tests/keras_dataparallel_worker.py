"""Keras 3 on JAX under ``keras.distribution.DataParallel`` on 2 host devices, with layerlock.

Run as ``python tests/keras_dataparallel_worker.py OUT.json`` with ``KERAS_BACKEND=jax`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (read when jax starts, hence a
process of its own; ``tests/test_distributed_keras.py`` does that). It writes
``{"devices": n, "checks": {name: {"ok": bool, ...}}}``: ``ll.apply(freeze)`` before a fit
(the frozen body bit-identical, the head trained), ``ll.apply(unfreeze)`` between fits (the
body trains), a ``FreezeScheduler`` across one fit, and every model and optimizer variable
keeping its layout (sharding) throughout. Nothing runs at import.
"""

from __future__ import annotations

import json
import sys


def main(out: str) -> None:
    import jax
    import keras
    import numpy as np

    import layerlock as ll
    import layerlock.keras as llk

    checks: dict[str, dict] = {}

    def check(name, ok, **detail):
        checks[name] = {"ok": bool(ok), **detail}

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
                                  keras.layers.Dense(1, name="head")], name="net")
        model.compile(keras.optimizers.Adam(0.01), "mse")
        return model

    def values(model, layer):
        return [keras.ops.convert_to_numpy(v) for v in model.get_layer(layer).weights]

    def shardings(variables):
        return {v.path: str(v.value.sharding) for v in variables}

    def replicated(variables):  # DataParallel's layout: every variable whole on each device
        return all(v.value.sharding.is_fully_replicated and len(v.value.sharding.device_set) == 2
                   for v in variables)

    def same(a, b):
        return all((u == w).all() for u, w in zip(a, b))

    model = build()
    layouts = shardings(model.weights)
    check("variables_are_replicated", replicated(model.weights), layouts=layouts)

    ll.apply(model, ll.freeze("body"))
    body, head = values(model, "body"), values(model, "head")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    check("frozen_body_bit_identical", same(values(model, "body"), body))
    check("head_trains", not same(values(model, "head"), head))
    check("fit_keeps_layouts", shardings(model.weights) == layouts, after=shardings(model.weights))
    optimizer_layouts = shardings(model.optimizer.variables)

    ll.apply(model, ll.unfreeze())
    check("apply_keeps_layouts", shardings(model.weights) == layouts, after=shardings(model.weights))
    body = values(model, "body")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    check("unfrozen_body_trains", not same(values(model, "body"), body))
    check("unfreeze_keeps_layouts", shardings(model.weights) == layouts, after=shardings(model.weights))
    after = shardings(model.optimizer.variables)
    kept = {p: s for p, s in after.items() if p in optimizer_layouts}
    check("optimizer_keeps_layouts", kept == optimizer_layouts and len(after) == len(optimizer_layouts) + 4
          and replicated(model.optimizer.variables), before=optimizer_layouts, after=after)

    model = build()
    seen = {}

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = values(self.model, "body")

    body = values(model, "body")
    scheduler = llk.FreezeScheduler(ll.Schedule({0: ll.freeze("body"), 1: ll.unfreeze()}), log=None)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[scheduler, Record()])
    check("scheduler_frozen_epoch_bit_identical", same(seen[0], body))
    check("scheduler_unfrozen_epoch_trains", not same(seen[1], body))
    check("scheduler_keeps_layouts", shardings(model.weights) == layouts, after=shardings(model.weights))

    with open(out, "w") as f:
        json.dump({"devices": len(jax.devices()), "checks": checks}, f)


if __name__ == "__main__":
    main(sys.argv[1])
