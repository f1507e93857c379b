"""Layer families: ``kind="family:dense"`` selects the dense layers of any framework.

A class-name glob means one framework's classes (``Linear`` is torch's dense layer, ``Dense``
Keras's). A family is a name with one meaning everywhere; :data:`TABLE` lists the class-name
globs (case-sensitive, like ``kind=`` globs) that make it up in each framework. The prefix
``family:`` cannot be mistaken for a glob: no class name has a colon.

A backend's name picks its columns (:data:`COLUMNS`): where a class name means different
things in two frameworks (``Conv1D`` is Hugging Face's dense layer in PyTorch, a convolution in
Keras), the backend decides. A backend not in the table (a plugin, a bare tree) gets the names
that mean the same family in every framework.

>>> match = matcher("family:dense", "torch")
>>> match("Linear"), match("Conv1D"), matcher("family:dense", "keras")("Conv1D")
(True, True, False)
>>> names("norm", "keras")[:2]
('BatchNormalization', 'SyncBatchNormalization')
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable

from .errors import SpecError

PREFIX = "family:"

# family -> framework column -> class-name globs. Column names are the docs table's.
TABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "dense": {
        # NonDynamicallyQuantizableLinear: MultiheadAttention's out_proj; Conv1D: GPT-2's dense
        "torch": ("Linear", "LazyLinear", "NonDynamicallyQuantizableLinear", "Conv1D",
                  "Linear8bitLt", "Linear4bit"),
        "keras": ("Dense", "EinsumDense"),
        "nnx": ("Linear", "LinearGeneral", "Einsum", "LoRALinear"),
        "equinox": ("Linear",),
        "linen": ("Dense", "DenseGeneral", "Einsum"),
    },
    "conv": {
        "torch": ("Conv[123]d", "ConvTranspose[123]d", "LazyConv[123]d", "LazyConvTranspose[123]d"),
        "keras": ("Conv[123]D", "Conv[123]DTranspose", "DepthwiseConv[12]D", "SeparableConv[12]D"),
        "nnx": ("Conv", "ConvTranspose"),
        "equinox": ("Conv", "Conv[123]d", "ConvTranspose", "ConvTranspose[123]d"),
        "linen": ("Conv", "ConvTranspose", "ConvLocal"),
    },
    "batchnorm": {
        "torch": ("BatchNorm[123]d", "LazyBatchNorm[123]d", "SyncBatchNorm", "FrozenBatchNorm2d"),
        "keras": ("BatchNormalization", "SyncBatchNormalization"),
        "nnx": ("BatchNorm",),
        "equinox": ("BatchNorm",),
        "linen": ("BatchNorm",),
    },
    "layernorm": {
        "torch": ("LayerNorm", "*LayerNorm"),  # Hugging Face's own: T5LayerNorm, ...
        "keras": ("LayerNormalization",),
        "nnx": ("LayerNorm",),
        "equinox": ("LayerNorm",),
        "linen": ("LayerNorm",),
    },
    "norm": {  # with every batchnorm and layernorm class (INCLUDES)
        "torch": ("GroupNorm", "InstanceNorm[123]d", "LazyInstanceNorm[123]d", "RMSNorm", "*RMSNorm",
                  "LocalResponseNorm", "CrossMapLRN2d"),
        "keras": ("GroupNormalization", "RMSNormalization", "UnitNormalization"),
        "nnx": ("RMSNorm", "GroupNorm", "InstanceNorm"),
        "equinox": ("GroupNorm", "RMSNorm"),
        "linen": ("RMSNorm", "GroupNorm", "InstanceNorm"),
    },
    "embedding": {
        "torch": ("Embedding", "EmbeddingBag", "*Embedding"),  # OPTLearnedPositionalEmbedding, ...
        "keras": ("Embedding", "*Embedding"),
        "nnx": ("Embed",),
        "equinox": ("Embedding",),
        "linen": ("Embed",),
    },
    "attention": {
        "torch": ("MultiheadAttention", "*Attention"),  # BertSelfAttention, GPT2Attention, ...
        "keras": ("MultiHeadAttention", "GroupQueryAttention", "GroupedQueryAttention", "Attention",
                  "*Attention"),
        "nnx": ("MultiHeadAttention",),
        "equinox": ("MultiheadAttention",),
        "linen": ("MultiHeadDotProductAttention", "MultiHeadAttention", "SelfAttention"),
    },
    "dropout": {
        "torch": ("*Dropout", "Dropout[123]d"),  # Dropout, AlphaDropout, FeatureAlphaDropout, ...
        "keras": ("Dropout", "SpatialDropout[123]D", "GaussianDropout", "AlphaDropout"),
        "nnx": ("Dropout",),
        "equinox": ("Dropout",),
        "linen": ("Dropout",),
    },
}
INCLUDES: dict[str, tuple[str, ...]] = {"norm": ("batchnorm", "layernorm")}
NAMES: tuple[str, ...] = tuple(TABLE)
# family -> the family whose layers it does not reach into: the projections of an attention
# layer are parts of that layer, not dense layers of the model. PyTorch's MultiheadAttention
# keeps its input projection as a raw parameter while Keras, NNX and Equinox build it from
# dense layers, so only "dense outside attention" means the same in every framework.
OUTSIDE: dict[str, str] = {"dense": "attention"}
# backend name -> the columns of TABLE it reads (the pytree backend holds Equinox and linen)
COLUMNS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",), "keras": ("keras",), "tf_keras": ("keras",), "flax": ("nnx",),
    "jax": ("equinox", "linen"),
}
FRAMEWORKS: tuple[str, ...] = ("torch", "keras", "nnx", "equinox", "linen")


def is_family(kind: str) -> bool:
    """True for a ``family:`` kind (``"family:norm"``), false for a class-name glob."""
    return kind.startswith(PREFIX)


def check(kind: str) -> str:
    """The family name of a ``family:`` kind; :class:`SpecError` for an unknown one.

    >>> check("family:conv")
    'conv'
    """
    name = kind[len(PREFIX):]
    if name not in TABLE:
        raise SpecError(f"unknown layer family {kind!r}; accepted: "
                        + ", ".join(PREFIX + n for n in NAMES) + " (or a class-name glob such as 'Linear')")
    return name


def _globs(name: str, column: str) -> tuple[str, ...]:
    subs = [g for sub in INCLUDES.get(name, ()) for g in TABLE[sub][column]]
    return tuple(dict.fromkeys([*subs, *TABLE[name][column]]))


def names(name: str, backend: str) -> tuple[str, ...]:
    """The class-name globs family ``name`` matches on ``backend`` (a backend's ``name``;
    one not in :data:`COLUMNS` reads every column).

    >>> names("conv", "flax")
    ('Conv', 'ConvTranspose')
    """
    columns = COLUMNS.get(backend, FRAMEWORKS)
    return tuple(dict.fromkeys(g for c in columns for g in _globs(name, c)))


def _regex(globs: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(g) for g in globs) or "(?!)")


@functools.lru_cache(maxsize=256)
def matcher(kind: str, backend: str) -> Callable[[str], bool]:
    """A predicate on class names for the ``family:`` kind ``kind`` on ``backend``.

    On a backend not in :data:`COLUMNS` a class name that another family claims in some
    framework matches neither (``Conv1D``):

    >>> matcher("family:dense", "")("Conv1D"), matcher("family:dense", "")("Dense")
    (False, True)
    """
    name = check(kind)
    compiled = _regex(names(name, backend))
    if backend in COLUMNS:
        return lambda cls: compiled.fullmatch(cls) is not None
    related = {name, *INCLUDES.get(name, ()), *(parent for parent, subs in INCLUDES.items() if name in subs)}
    others = _regex(tuple(g for other in NAMES if other not in related for g in names(other, backend)))
    return lambda cls: compiled.fullmatch(cls) is not None and others.fullmatch(cls) is None


def outside(kind: str) -> str | None:
    """The ``family:`` kind whose subtrees family ``kind`` skips, or None.

    >>> outside("family:dense"), outside("family:conv")
    ('family:attention', None)
    """
    name = OUTSIDE.get(check(kind))
    return None if name is None else PREFIX + name


def family_of(cls: str) -> str | None:
    """The family whose table lists class name ``cls`` in some framework (for hints), or None.

    >>> family_of("Dense"), family_of("Sequential")
    ('dense', None)
    """
    for name in NAMES:  # the narrowest first: batchnorm comes before norm
        for column in FRAMEWORKS:
            if any(fnmatch.fnmatchcase(cls, g) for g in TABLE[name][column]):
                return name
    return None
