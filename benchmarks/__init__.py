"""layerlock benchmarks: step time, peak memory, apply overhead and import cost.

Run ``python -m benchmarks [--quick] [--device cpu|cuda|auto] [--only ...]``.

- ``measure``: the one measuring loop every backend shares (interleaved modes, stats).
- ``env``: machine, versions, device and thread settings recorded with the results.
- ``torch_cases`` / ``keras_cases``: models and the five freezing modes per framework.
- ``worker``: what runs inside a subprocess (one framework per process).
- ``overhead``: ``ll.plan`` / ``ll.apply`` against a hand-written loop; import time.
- ``report``: JSON results -> ``docs/benchmarks.md`` and PNG plots.
"""
