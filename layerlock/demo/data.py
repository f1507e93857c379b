"""The demo's dataset: oriented textures drawn by numpy, deterministic, no files.

*Source* images are full-field gratings at six orientations; *target* images are small
Gabor patches (a grating under a Gaussian window, anywhere in the image) at four other
orientations. Frequency, phase, colour, contrast and position are random and Gaussian
noise is added, so no pixel and no colour gives the class away: telling the classes apart
needs orientation detectors, which is exactly what pretraining on the source can give.

>>> x, y = make("target", 2, seed=0)
>>> x.shape, x.dtype.name, sorted(set(y.tolist()))
((8, 3, 24, 24), 'float32', [0, 1, 2, 3])
>>> bool((make("target", 2, seed=0)[0] == x).all())   # deterministic
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 24
SOURCE_ANGLES = (0.0, 30.0, 60.0, 90.0, 120.0, 150.0)
TARGET_ANGLES = (15.0, 60.0, 105.0, 150.0)
NOISE = 0.6
SIGMA = (4.0, 7.0)  # the Gabor window of target images, in pixels


@dataclass(frozen=True)
class Split:
    """Train, test and (possibly empty) validation arrays, NCHW float32 images and int64
    labels. The validation images are held out of the training images; the test images
    are drawn apart."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, SIZE, SIZE), np.float32))
    y_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def classes(self) -> int:
        return int(self.y.max()) + 1


def make(task: str, per_class: int, *, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of each class of ``task`` ("source" or "target"), NCHW.

    >>> sorted(make("source", 1, seed=1)[1].tolist())
    [0, 1, 2, 3, 4, 5]
    """
    if task not in ("source", "target"):
        raise ValueError(f"task must be 'source' or 'target'; received {task!r}")
    angles = SOURCE_ANGLES if task == "source" else TARGET_ANGLES
    rng = np.random.default_rng([seed, len(angles)])
    y = np.repeat(np.arange(len(angles)), per_class)
    n = len(y)
    theta = np.deg2rad(np.asarray(angles)[y] + rng.uniform(-7, 7, n))
    wavelength = rng.uniform(3.5, 7.0, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    grid = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    along = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
    pattern = np.cos(2 * np.pi * along / wavelength[:, None, None] + phase[:, None, None])
    if task == "target":  # a Gabor patch at a random place: the texture fills only part of the image
        cx, cy = (rng.uniform(-size / 4, size / 4, (2, n)))
        sigma = rng.uniform(*SIGMA, n)
        r2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
        pattern = pattern * np.exp(-r2 / (2 * sigma[:, None, None] ** 2))
    colour = rng.normal(0, 1, (n, 3))
    colour /= np.linalg.norm(colour, axis=1, keepdims=True)
    contrast = rng.uniform(0.6, 1.2, n)
    background = rng.normal(0, 0.3, (n, 3))
    x = (contrast[:, None, None, None] * colour[:, :, None, None] * pattern[:, None]
         + background[:, :, None, None] + rng.normal(0, NOISE, (n, 3, size, size)))
    order = rng.permutation(n)
    return x[order].astype(np.float32), y[order].astype(np.int64)


def split(task: str, train_per_class: int, test_per_class: int, *, seed: int, val_per_class: int = 0) -> Split:
    """Disjoint train and test sets (different seeds) for one task; with ``val_per_class``,
    that many more images of each class are drawn with the training images and held out of
    them as a validation set (what a metric schedule decides on: never the test set).

    >>> s = split("target", 3, 2, seed=0, val_per_class=1)
    >>> len(s.y), len(s.y_val), len(s.y_test), s.classes, sorted(s.y_val.tolist())
    (12, 4, 8, 4, [0, 1, 2, 3])
    >>> len(split("target", 3, 2, seed=0).y_val)
    0
    """
    x, y = make(task, train_per_class + val_per_class, seed=seed)
    xt, yt = make(task, test_per_class, seed=seed + 1000)
    # The last val_per_class images of each class (in the shuffled order) are held out.
    held = np.zeros(len(y), bool)
    for c in np.unique(y):
        of_c = np.flatnonzero(y == c)
        held[of_c[len(of_c) - val_per_class:]] = True
    return Split(x[~held], y[~held], xt, yt, x[held], y[held])
