"""What :func:`layerlock.check` looks for, one module per framework.

Each module has a ``check(model, optimizer=None, *, scheduler, bn, schedule)`` function (the
:class:`~layerlock.backends.Check` protocol) that reads a training set-up, changes nothing
and returns :class:`~layerlock.Finding` values; the registry loads it by the backend's name
on the first ``ll.check`` (:func:`layerlock.backends.get_check`).
"""
