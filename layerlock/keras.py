"""Keras helpers: ``import layerlock.keras``.

>>> import layerlock.keras as llk
>>> llk.KerasBackend.name
'keras'
"""

from .backends.keras import KerasBackend, TfKerasBackend, sync_optimizer

__all__ = ["KerasBackend", "TfKerasBackend", "sync_optimizer"]
