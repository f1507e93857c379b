"""PyTorch helpers: ``import layerlock.torch`` (this imports torch).

>>> import layerlock.torch as llt
>>> llt.unwrap.__name__
'unwrap'
"""

from .backends.torch import TorchBackend, unwrap

__all__ = ["TorchBackend", "unwrap"]
