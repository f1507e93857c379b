"""What :func:`layerlock.check` looks for, one module per framework.

Each module has a ``check(model, optimizer=None, *, scheduler, bn, schedule)`` function (the
:class:`~layerlock.backends.Check` protocol) that reads a training set-up, changes nothing
and returns :class:`~layerlock.Finding` values, and a ``str`` for each thing it could not
inspect (reported as "not checked: ..."); the registry loads it by the backend's name on the
first ``ll.check`` (:func:`layerlock.backends.get_check`). JAX pytrees have no backend:
:mod:`.pytree` checks an optax state against a spec (``layerlock.jax.check``).
"""
