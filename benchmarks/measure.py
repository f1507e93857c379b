"""The measuring loop shared by every backend: modes interleaved round-robin, so that a
slow patch of the (shared, noisy) machine hits every mode alike.

>>> s = summarize([3.0, 1.0, 2.0, 4.0])
>>> s["median"], s["iqr"]
(2.5, 1.5)
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

Step = Callable[[], Any]

# One training mode per key; torch and Keras build these five (Keras adds `features`,
# Flax NNX has its own four: full, layerlock, mask, limit; Equinox adds hand and hand_mask).
MODES = ("full", "layerlock", "hand", "limit", "layerlock_eval")

# The sizes of the models every framework builds alike, so their ratios compare.
SIZES = {
    "cnn": {"full": {"channels": (48, 96, 192, 352), "batch": 32, "hw": 64},
            "quick": {"channels": (16, 32, 64, 96), "batch": 16, "hw": 32}},
    "transformer": {"full": {"d": 256, "heads": 4, "layers": 4, "seq": 128, "batch": 16},
                    "quick": {"d": 128, "heads": 4, "layers": 2, "seq": 64, "batch": 8}},
}


def image_arrays(s: dict, *, channels_last: bool = True) -> tuple[Any, Any]:
    """One seeded batch of images (NHWC, or NCHW) and labels, as numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (s["batch"], s["hw"], s["hw"], 3) if channels_last else (s["batch"], 3, s["hw"], s["hw"])
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, 10, s["batch"])


def sequence_arrays(s: dict) -> tuple[Any, Any]:
    """One seeded batch of token features and labels, as numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((s["batch"], s["seq"], s["d"]), dtype=np.float32), rng.integers(0, 10, s["batch"])


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and interquartile range of per-step times (seconds)."""
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": statistics.median(samples), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "n": len(samples)}


def _time(step: Step, inner: int, sync: Callable[[], None]) -> float:
    """Seconds per step, averaged over ``inner`` back-to-back steps."""
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        step()
    sync()
    return (time.perf_counter() - start) / inner


def calibrate(step: Step, sync: Callable[[], None], warmup: int, target_s: float) -> int:
    """Warm up (tracing, allocator, caches), then pick how many steps make one sample
    last about ``target_s``: tiny steps are otherwise lost in timer and scheduler noise."""
    for _ in range(warmup):
        step()
    one = _time(step, 1, sync)
    return max(1, math.ceil(target_s / max(one, 1e-6)))


def interleave(steps: dict[str, Step], *, reps: int, warmup: int = 2, target_s: float = 0.05,
               sync: Callable[[], None] = lambda: None,
               on_sample: Callable[[], None] = lambda: None,
               peak: tuple[Callable[[], None], Callable[[], float]] | None = None) -> dict[str, Any]:
    """Time every mode ``reps`` times, round-robin (mode order rotates each repetition).

    ``peak`` = (reset, read) measures in-process peak memory per mode (CUDA); the result
    per mode holds raw samples, their summary and ``inner`` (steps per sample).
    """
    names = list(steps)
    inner = {n: calibrate(steps[n], sync, warmup, target_s) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float] = {n: 0.0 for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if peak:
                peak[0]()
            samples[n].append(_time(steps[n], inner[n], sync))
            if peak:
                peaks[n] = max(peaks[n], peak[1]())
            on_sample()
    out: dict[str, Any] = {}
    for n in names:
        out[n] = {"samples_s": samples[n], "inner": inner[n], **summarize(samples[n])}
        if peak:
            out[n]["peak_mem_mb"] = peaks[n]
    return out


def ratio(results: dict[str, Any], a: str, b: str) -> float | None:
    """median(a) / median(b), or None when either mode is missing."""
    if a in results and b in results and results[b]["median"] > 0:
        return results[a]["median"] / results[b]["median"]
    return None


RATIOS = {  # name -> (numerator mode, denominator mode)
    "layerlock/hand": ("layerlock", "hand"),
    "frozen/full": ("layerlock", "full"),
    "frozen/limit": ("layerlock", "limit"),
    "eval/frozen": ("layerlock_eval", "layerlock"),
    "frozen/features": ("layerlock", "features"),   # Keras only
    "mask/layerlock": ("mask", "layerlock"),        # JAX only: optax mask vs the filtered gradient
    "mask/hand mask": ("mask", "hand_mask"),        # Equinox: layerlock.jax.optimizer vs a hand label tree
}


def ratios(results: dict[str, Any]) -> dict[str, float]:
    found = {name: ratio(results, a, b) for name, (a, b) in RATIOS.items()}
    return {name: r for name, r in found.items() if r is not None}


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def median_of(samples: Iterable[float]) -> float:
    return statistics.median(list(samples))
