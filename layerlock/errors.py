"""One exception hierarchy for everything layerlock raises.

>>> import layerlock as ll
>>> issubclass(ll.NoMatchError, ll.LayerlockError)
True
"""

from __future__ import annotations

from collections.abc import Sequence


class LayerlockError(Exception):
    """Base class of every error layerlock raises on purpose."""


class SpecError(LayerlockError, ValueError):
    """A spec, schedule or option is malformed; the message names the field and the value."""


class NoMatchError(SpecError):
    """A rule selects nothing in ``strict`` mode.

    ``pattern`` is what was written; ``suggestions`` are the closest existing paths.
    """

    def __init__(self, message: str, *, pattern: str, suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.pattern = pattern
        self.suggestions = tuple(suggestions)


class BackendError(LayerlockError, TypeError):
    """No backend handles this model, or a backend cannot do what was asked."""


class DistributedFreezeError(LayerlockError):
    """A change to the trainable set would silently break a distributed wrapper."""


class LayerlockWarning(UserWarning):
    """What ``strict=False`` turns errors into, and other things worth a look."""
