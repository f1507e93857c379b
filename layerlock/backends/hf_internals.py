"""Every private Hugging Face (transformers) attribute layerlock uses, behind one door.

The layouts (transformers 4.40 to 5.x):

- a module that runs its layers under activation checkpointing has
  ``gradient_checkpointing = True`` and keeps the checkpoint function, a
  ``functools.partial`` of ``torch.utils.checkpoint.checkpoint`` with its ``use_reentrant``
  keyword, in ``_gradient_checkpointing_func``;
- ``enable_input_require_grads()`` keeps the forward hook it registers in
  ``_require_grads_hook`` (older: ``_require_grads_hooks``);
- the ``Trainer`` runs callback events from its own methods, so while a callback runs the
  Trainer is the ``self`` of a calling frame.

Nothing here imports transformers: these are attributes of the user's model.

>>> import torch
>>> checkpointed(torch.nn.Linear(1, 1)), input_grads_forced(torch.nn.Linear(1, 1))
(None, False)
"""

from __future__ import annotations

import functools
import sys
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


def calling_trainer(trainer_class: type) -> Any:
    """The ``trainer_class`` instance whose method is running a callback event now, or None.

    A ``TrainerCallback`` is handed the model inside the distributed wrapper, not the wrapper
    (``trainer.model_wrapped``); the Trainer calls its callbacks from its own methods
    (``_inner_training_loop`` → ``CallbackHandler.call_event`` → the callback), so it is the
    ``self`` of a frame above.

    >>> class Owner:
    ...     def event(self):
    ...         return calling_trainer(Owner)
    >>> owner = Owner()
    >>> owner.event() is owner, calling_trainer(Owner)
    (True, None)
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_class):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None
