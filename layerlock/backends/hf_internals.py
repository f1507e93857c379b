"""Every private Hugging Face (transformers) attribute layerlock uses, behind one door.

The layouts (transformers 4.40 to 5.x):

- a module that runs its layers under activation checkpointing has
  ``gradient_checkpointing = True`` and keeps the checkpoint function, a
  ``functools.partial`` of ``torch.utils.checkpoint.checkpoint`` with its ``use_reentrant``
  keyword, in ``_gradient_checkpointing_func``;
- ``enable_input_require_grads()`` keeps the forward hook it registers in
  ``_require_grads_hook`` (older: ``_require_grads_hooks``).

Nothing here imports transformers: these are attributes of the user's model.

>>> import torch
>>> checkpointed(torch.nn.Linear(1, 1)), input_grads_forced(torch.nn.Linear(1, 1))
(None, False)
"""

from __future__ import annotations

import functools
from typing import Any


def checkpointed(module: Any) -> bool | None:
    """Whether ``module`` runs its layers under reentrant activation checkpointing (True),
    non-reentrant (False), or is no Hugging Face checkpointing module (None)."""
    if getattr(module, "gradient_checkpointing", False) is not True:
        return None
    func = getattr(module, "_gradient_checkpointing_func", None)
    if not isinstance(func, functools.partial):
        return None  # checkpointing of a layout layerlock does not know: not reported
    return bool(func.keywords.get("use_reentrant", True))


def input_grads_forced(model: Any) -> bool:
    """True when ``model.enable_input_require_grads()`` made the embeddings' output require grad."""
    return bool(getattr(model, "_require_grads_hook", None) or getattr(model, "_require_grads_hooks", None))
