"""Keras helpers: ``import layerlock.keras`` (this imports keras).

:func:`param_groups` and :func:`with_rates` give a Keras 3 optimizer a learning rate per
variable (``lr_mult``, ``layer_decay``, ``no_decay`` mean what they mean in
``layerlock.torch``). :func:`sync_optimizer` brings the optimizer of a custom training loop in
step after an ``apply``, like its torch namesake. :class:`FreezeScheduler` is a Keras callback
that applies a :class:`~layerlock.Schedule` (or a :class:`~layerlock.MetricSchedule`, whose
phases move on when a metric in ``logs`` stops improving) at the start of each epoch of
``fit``; the very next step trains the new set, and the optimizer keeps its state for
variables that stay trainable.

>>> import keras, layerlock as ll, layerlock.keras as llk
>>> callback = llk.FreezeScheduler(ll.gradual(3), log=None)   # model.fit(..., callbacks=[callback])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import keras

from .backends import get_backend
from .backends import keras_internals as internals
from .backends.keras import KerasBackend, TfKerasBackend, compiled_optimizer, short_name
from .errors import BackendError, LayerlockError, LayerlockWarning, SpecError
from .rate_table import check_rate, rates
from .resolver import BnPolicy
from .results import Plan
from .schedule import MetricSchedule, Phase, Schedule
from .stepper import PhaseStepper, check_saved_state, log_option, structure_digest, warn_check

__all__ = ["FreezeScheduler", "KerasBackend", "TfKerasBackend", "param_groups", "structure_fingerprint",
           "sync_optimizer", "with_rates"]

internals.register_rated_classes()  # so that load_model finds the rated optimizers a model was saved with


def _variables(model: Any) -> dict[str, Any]:
    """layerlock path -> variable, every path of a tied variable included; refuses a model
    where two variables share a ``variable.path`` (what an optimizer's rates are keyed by)."""
    backend: Any = get_backend(model)  # the Keras backend: walk() gives the variables
    walk = backend.walk(model)
    by_key: dict[str, dict[int, list[str]]] = {}
    for path, variable in zip(walk.tree.param_paths, walk.tensors):
        by_key.setdefault(str(variable.path), {}).setdefault(id(variable), []).append(path)
    shared = {key: owners for key, owners in by_key.items() if len(owners) > 1}
    if shared:
        named = "; ".join(f"{key!r} is the path of {' and '.join(paths[0] for paths in owners.values())}"
                          for key, owners in list(shared.items())[:3])
        raise BackendError(f"per-variable learning rates are keyed by variable.path, and two variables of this model "
                           f"share one: {named}. Give the layers distinct names (or build them under distinct "
                           "keras.name_scope) so their variables' paths differ.")
    return dict(zip(walk.tree.param_paths, walk.tensors))


def param_groups(model: Any, lr: float, *, lr_mult: Mapping[str, float] | None = None,
                 weight_decay: float | None = None, no_decay: str | Sequence[str] = (),
                 layer_decay: float | None = None, within: str | None = None,
                 strict: bool = True) -> list[dict[str, Any]]:
    """Rate groups for the trainable variables, with the names and rates of
    ``layerlock.torch.param_groups`` (both are :func:`layerlock.rates`): ``[{"name", "lr",
    "weight_decay"?, "params": [(path, variable), ...]}]``. Hand them to :func:`with_rates`.

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="body"),
    ...                           keras.layers.Dense(1, name="head")])
    >>> [(g["name"], g["lr"], [p for p, _ in g["params"]]) for g in param_groups(model, 1.0, layer_decay=0.5)]
    [('block0', 0.5, ['body.kernel', 'body.bias']), ('block1', 1.0, ['head.kernel', 'head.bias'])]
    """
    table = rates(model, lr, lr_mult=lr_mult, weight_decay=weight_decay, no_decay=no_decay,
                  layer_decay=layer_decay, within=within, strict=strict)
    variables = _variables(model)
    return [{**{k: v for k, v in group.items() if k != "paths"},
             "params": [(path, variables[path]) for path in group["paths"]]} for group in table.groups]


def _group_rates(groups: Iterable[Mapping[str, Any]], base: float) -> tuple[dict[str, float], dict[str, float | None]]:
    """``variable.path -> multiplier`` and ``-> weight decay`` from rate groups; refuses
    malformed groups, a variable in two groups and two variables with one path."""
    if isinstance(groups, (str, bytes, Mapping)) or not isinstance(groups, Iterable):
        raise SpecError(f"with_rates takes a list of groups such as param_groups(model, lr) returns; "
                        f"received {groups!r}")
    multipliers: dict[str, float] = {}
    decays: dict[str, float | None] = {}
    seen: dict[str, tuple[Any, str]] = {}
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping) or "lr" not in group or "params" not in group:
            raise SpecError(f"groups[{i}] must be a dict with 'lr' and 'params' (and optional 'name', "
                            f"'weight_decay'), as param_groups returns; received {group!r}")
        lr = check_rate(group["lr"], f"groups[{i}]['lr']")
        decay = group.get("weight_decay")
        if decay is not None:
            decay = check_rate(decay, f"groups[{i}]['weight_decay']", zero=True)
        for item in group["params"]:
            name, variable = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            key = getattr(variable, "path", None)
            if not isinstance(variable, keras.Variable) or not isinstance(key, str):
                raise SpecError(f"groups[{i}]['params'] holds {type(variable).__name__} {variable!r}; it takes Keras "
                                "variables or (path, variable) pairs")
            label = name or key
            if key in seen:
                other, other_label = seen[key]
                if other is variable:
                    raise SpecError(f"{label!r} is in more than one group; give each variable one rate")
                raise BackendError(f"per-variable learning rates are keyed by variable.path, and {other_label!r} and "
                                   f"{label!r} share the path {key!r}. Give the layers distinct names so their "
                                   "variables' paths differ.")
            seen[key] = (variable, label)
            multipliers[key], decays[key] = internals.multiplier(lr, base), decay
    return multipliers, decays


def with_rates(optimizer: Any, groups: Iterable[Mapping[str, Any]] | None = None) -> Any:
    """Make a Keras 3 optimizer train each variable at its own rate, in place, and return it:
    the variables of each group (from :func:`param_groups`) at the group's ``lr`` and, where
    the group has one, its ``weight_decay`` (0.0: none; absent: the optimizer's own, with its
    ``exclude_from_weight_decay``); others at the optimizer's ``learning_rate``. Decoupled
    weight decay (AdamW) uses each variable's rate. Under a learning-rate schedule every rate
    follows the schedule's factor: a rate ``r`` is ``r * schedule(t) / schedule(0)`` at step ``t``.

    The optimizer stays the same object, with its slots and ``iterations``, so a compiled
    model keeps it; its class becomes a subclass of its own (``RatedAdam`` for ``Adam``),
    which ``get_config`` / ``model.save`` record with the rates (``load_model`` restores
    them once ``layerlock.keras`` is imported). A ``LossScaleOptimizer``'s inner optimizer
    gets the rates. Rates are read when a train function is traced: give them before the
    first ``fit`` (``FreezeScheduler`` and :func:`sync_optimizer` rebuild it when they
    change rates). An optimizer that cannot carry them (not Keras 3, an update path
    layerlock does not know) raises :class:`~layerlock.BackendError` before anything changes.

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fc")], name="net")
    >>> opt = with_rates(keras.optimizers.SGD(0.1), param_groups(model, 0.1, lr_mult={"fc.bias": 0.5}))
    >>> type(opt).__name__, opt.get_config()["layerlock_rates"]
    ('RatedSGD', {'net/fc/bias': 0.05})
    """
    target = internals.rated_target(optimizer)
    multipliers, decays = _group_rates(groups, internals.base_rate(target)) if groups is not None else ({}, {})
    internals.set_rates(internals.upgrade(target), multipliers, decays)
    return optimizer


def _rate_new(optimizer: Any, variables: list[Any], lr: float) -> bool:
    """Give newly trainable variables the rate ``lr``; True if a rate changed."""
    target = internals.upgrade(optimizer)
    factor = internals.multiplier(lr, internals.base_rate(target))
    return internals.set_rates(target, {str(v.path): factor for v in variables})


def sync_optimizer(optimizer: Any, model: Any, *, lr: float | None = None) -> list[str]:
    """Make a built optimizer track exactly ``model.trainable_variables``, keeping the state
    (Adam moments, ``iterations``) of every variable it already tracks; return the paths
    of the variables it added. For ``fit`` you never need it: ``ll.apply`` syncs the
    compiled model's own optimizer. In a custom loop, call it after each ``apply``, or
    ``optimizer.apply_gradients`` fails on the newly trainable variables ("Unknown variable").
    The variables it adds train at ``lr`` (the optimizer gets per-variable rates, see
    :func:`with_rates`); without ``lr`` they train at the rate they had, which is the
    optimizer's base rate for a variable never given one; the others keep theirs. An
    optimizer layout layerlock does not know (a future Keras), or one that cannot carry
    ``lr``, raises :class:`~layerlock.BackendError` before anything changes.

    >>> import keras, layerlock as ll
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fc")])
    >>> _ = ll.apply(model, ll.freeze("fc.bias"))
    >>> opt = keras.optimizers.SGD(); opt.build(model.trainable_variables)
    >>> _ = ll.apply(model, ll.unfreeze())
    >>> sync_optimizer(opt, model), sync_optimizer(opt, model)
    (['fc.bias'], [])
    """
    if lr is not None:
        check_rate(lr, "lr")
        internals.rated_target(optimizer)
        _variables(model)
    added = internals.sync_variables(optimizer, model.trainable_variables, internals.strategy_scope(model)) or []
    if not added:
        return []
    if lr is not None and _rate_new(optimizer, added, lr) and compiled_optimizer(model) is optimizer:
        internals.rebuild_step_functions(model)
    paths = {id(v): path for path, _, v in get_backend(model).unique_variables(get_backend(model).walk(model))}
    return [paths.get(id(v), short_name(v)) for v in added]


def structure_fingerprint(model: Any) -> str:
    """SHA-256 of the variable paths and shapes: equal for models of the same structure
    (what :meth:`FreezeScheduler.load_state_dict` checks, like its torch namesake).

    >>> import keras
    >>> def net():
    ...     return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fc")])
    >>> structure_fingerprint(net()) == structure_fingerprint(net())
    True
    """
    backend = get_backend(model)
    return structure_digest((path, variable.shape) for path, _, variable in backend.unique_variables(backend.walk(model)))


class FreezeScheduler(keras.callbacks.Callback):  # type: ignore[misc]
    """Apply ``schedule`` at epoch begin inside ``fit``.

    Every phase is checked against the model at ``on_train_begin``, so a pattern that
    matches nothing fails before the first step. A phase's ``lr`` is the rate of what that
    phase makes trainable, as in torch: those variables train at ``lr``, what was already
    training keeps its own rate, and without ``lr`` a variable trains at the rate it had (the
    optimizer's base rate for one never given a rate, by a phase or :func:`with_rates`);
    under a learning-rate schedule every rate follows the schedule's factor. For that the
    compiled optimizer gets per-variable rates (:func:`with_rates`) when training begins;
    one that cannot carry them raises :class:`~layerlock.SpecError` naming its type, before
    anything changes. ``log`` receives the one-line message of each transition (default
    ``print``; None: silent). When training starts (after the first epoch's phase is applied) the set-up is
    checked once with :func:`layerlock.check`; what it finds comes as one
    :class:`~layerlock.LayerlockWarning` with the report's table.

    With a :class:`~layerlock.MetricSchedule` the phases move on when a metric stops
    improving: at each epoch's end the callback reads ``rule.monitor`` from ``logs`` (what
    ``fit`` logs, ``val_loss`` with validation data, or what a callback placed before this
    one puts there; a monitor ``logs`` lacks raises :class:`~layerlock.SpecError` at the
    first epoch end, naming the keys it has), and when the :class:`~layerlock.Plateau` rule
    ends the phase, the next one is applied at the next epoch's begin, its log line starting
    with the values that decided it. ``lr={phase: rate}`` is each phase's ``lr`` as above.
    With ``restore_best=True`` the callback keeps an in-memory copy of the model's weights and
    the compiled optimizer's variables (its slots and ``iterations``, so a Keras LR schedule's
    position too) at each new best epoch of a phase, and at the transition puts them back
    before the next phase is applied. The tracker's state (phase starts, best value, wait
    count) is part of ``state_dict()`` and of the BackupAndRestore record (where this callback
    must come before the BackupAndRestore, so the backup at an epoch's end holds the verdict
    on it); the best epoch's copy is not, and a resumed run restores it only when it resumes
    right after that epoch (otherwise it warns).

    >>> import keras, layerlock as ll
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="body"),
    ...                           keras.layers.Dense(1, name="head")])
    >>> rule = ll.MetricSchedule([ll.freeze("body"), ll.unfreeze()], monitor="val_loss", patience=1)
    >>> callback = FreezeScheduler(rule, log=print)
    >>> callback.set_model(model); callback.on_train_begin()
    >>> for epoch, val_loss in enumerate([1.0, 0.5, 0.6]):   # what fit does: logs at each epoch's end
    ...     callback.on_epoch_begin(epoch)
    ...     callback.on_epoch_end(epoch, {"loss": 0.1, "val_loss": val_loss})
    layerlock: epoch 0: phase 1/2 Spec(freeze('body')): +0 / -6 trainable scalars, 3 trainable (33.3%)
    >>> callback.on_epoch_begin(3)
    layerlock: epoch 3: val_loss did not improve on 0.5 (epoch 1) for 1 epoch: phase 2/2 Spec(unfreeze()): +6 / -0 trainable scalars, 9 trainable (100.0%)

    Resuming: ``fit(initial_epoch=e)`` applies the cumulative spec for epoch ``e`` by itself.
    ``state_dict()`` / ``load_state_dict(state)`` carry the phase across processes, as in
    the torch and NNX loop schedulers: on restart, ``set_model(model)`` (the model loaded
    from the checkpoint) and ``load_state_dict(saved)`` bring the model to the saved phase
    (its trainable set and per-variable rates) before ``fit(..., initial_epoch=
    saved["epoch"] + 1)``: the phases are replayed, so the compiled optimizer gets the
    saved run's rates. A state saved for another schedule or another model structure
    raises :class:`~layerlock.LayerlockError` before anything changes.

    With ``keras.callbacks.BackupAndRestore`` in the same ``fit`` (before or after this
    callback) nothing more is needed: every backup it writes records the phase, and a
    ``fit`` restarted on a new model with new callbacks brings the model to the backup's
    phase (trainable set, optimizer layout, per-variable rates) in ``set_model``, before the
    backup's weights and optimizer variables load, so the run continues as if it had not
    stopped. A backup of another schedule or model, or one written without a FreezeScheduler,
    raises :class:`~layerlock.LayerlockError` before anything loads. Not carried over: the
    optimizer state of a variable a phase froze after it had trained (the backup holds the
    optimizer's variables only), which a later phase that unfreezes it starts afresh.

    >>> import keras, layerlock as ll
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="body"),
    ...                           keras.layers.Dense(1, name="head")])
    >>> callback = FreezeScheduler(ll.Schedule({0: ll.freeze("body"), 2: ll.unfreeze()}), log=None)
    >>> callback.set_model(model)
    >>> saved = {**callback.state_dict(), "epoch": 1, "phase": 0}   # as saved after epoch 1
    >>> callback.load_state_dict(saved)
    >>> ll.plan(model, ll.Spec()).trainable
    ('head.kernel', 'head.bias')

    ``verbose=`` (the old name of ``log``) works for one more release, with a
    ``DeprecationWarning``; ``verbose=0`` is ``log=None``.
    """

    def __init__(self, schedule: Schedule | MetricSchedule, *, strict: bool = True, bn: BnPolicy = "follow",
                 frozen_mode: str | None = None, log: Callable[[str], None] | None = print,
                 verbose: int | bool | None = None) -> None:
        super().__init__()
        self.stepper = PhaseStepper(schedule, strict=strict, bn=bn, frozen_mode=frozen_mode,
                                    owner="layerlock.keras.FreezeScheduler")
        self.schedule = schedule
        self.log = log_option("layerlock.keras.FreezeScheduler", log, verbose)
        self.epoch = -1
        self._checked = False
        lrs = schedule.lr if isinstance(schedule, MetricSchedule) else [p.lr for p in schedule.phases]
        self._rated = any(lr is not None for lr in lrs)
        self._best_at_begin = False

    @property
    def phase(self) -> int:
        """Index of the phase in force (-1 before the first)."""
        return self.stepper.phase

    def on_train_begin(self, logs: Any = None) -> None:
        self.stepper.check(self.model)
        if self._rated:
            internals.upgrade(self._rate_target(self.model))
        self.stepper.phase = -1  # fit(initial_epoch=e) re-applies the cumulative spec for e

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch
        change = self.stepper.step(self.model, epoch, self._sync)
        if self._best_at_begin:  # resumed at the end of the phase's best epoch (see _restore)
            self._best_at_begin = False
            self.stepper.kept = self._keep_best()
        if not self._checked:
            self._checked = True
            warn_check(self.model, bn=self.stepper.options["bn"], schedule=self.stepper.planned)
        if change is not None and self.log is not None:
            self.log(change.message)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """With a :class:`~layerlock.MetricSchedule`, judge the epoch's ``logs``: when they end
        the phase, the next one begins at the next ``on_epoch_begin`` (with ``restore_best``,
        from the phase's best epoch, put back here). A monitor ``logs`` lacks raises
        :class:`~layerlock.SpecError` naming the keys it has."""
        self.stepper.observe(epoch, logs if logs is not None else {}, self._keep_best, self._restore_best)

    def _keep_best(self) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
        """(variable, value) copies of the model's weights and the compiled optimizer's
        variables (its slots, ``iterations`` and so the position of an LR schedule)."""
        optimizer = compiled_optimizer(self.model)
        variables = [] if optimizer is None else list(optimizer.variables)

        def copy(vs: Iterable[Any]) -> list[tuple[Any, Any]]:
            return [(v, keras.ops.convert_to_numpy(v.value).copy()) for v in vs]

        return copy(self.model.weights), copy(variables)

    def _restore_best(self, kept: tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]) -> None:
        """Put back what :meth:`_keep_best` copied. The copy was taken in the phase now
        ending, so the optimizer has the same variables (a phase change syncs them, and it
        has not happened yet); anything else is refused before anything is assigned."""
        weights, slots = kept
        optimizer = compiled_optimizer(self.model)
        now = [] if optimizer is None else list(optimizer.variables)
        if [id(v) for v in now] != [id(v) for v, _ in slots] or \
                [id(v) for v in self.model.weights] != [id(v) for v, _ in weights]:
            raise LayerlockError(
                f"restore_best: the model's weights or the optimizer's variables changed since the phase's best epoch "
                f"(optimizer: {len(slots)} variables then, {len(now)} now), so that epoch cannot be put back. Leave "
                "the model and its optimizer to the FreezeScheduler within a phase, or use restore_best=False.")
        for variable, value in weights + slots:
            variable.assign(value)

    def _rate_target(self, model: Any) -> Any:
        """The compiled optimizer that is to carry the phases' rates, checked (changes nothing)."""
        optimizer = compiled_optimizer(model)
        if optimizer is None:
            raise SpecError("this schedule gives phases an lr, the rate of what each phase makes trainable, and that "
                            "rate lives in the compiled optimizer: compile the model first")
        try:
            internals.rated_target(optimizer)
        except BackendError as exc:
            name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
            raise SpecError(f"this schedule gives phases an lr, but {name} cannot train variables at rates of "
                            f"their own: {exc}") from exc
        _variables(model)  # refuses two variables with one variable.path
        return optimizer

    def _sync(self, phase: Phase, plan: Plan) -> str:
        # apply() already brought the optimizer's slots in step; the variables this phase
        # makes trainable get its lr, the others keep theirs. Without lr nothing changes:
        # a variable never given a rate trains at the base rate.
        optimizer = compiled_optimizer(self.model)
        if phase.lr is None or optimizer is None:
            return ""
        variables = _variables(self.model)
        added = list({id(v): v for v in map(variables.__getitem__, plan.gained)}.values())
        if not added:
            return ""
        if _rate_new(optimizer, added, phase.lr):
            internals.rebuild_step_functions(self.model)  # rates are read when the train function is traced
        return f"optimizer +{len(added)} variables at lr {phase.lr:g}"

    # -- resuming -------------------------------------------------------------------------

    def _bound_model(self, what: str) -> Any:
        model = self.model  # None until fit (or the user) calls set_model
        if model is None:
            raise LayerlockError(f"FreezeScheduler.{what}() needs the model: call callback.set_model(model) "
                                 "first (fit does it for its callbacks)")
        return model

    def state_dict(self) -> dict[str, Any]:
        """The epoch last begun, the phase in force, the schedule, the model's structure and,
        for a :class:`~layerlock.MetricSchedule`, its tracker's state (``"plateau"``: the
        phases' start epochs, the best value and the wait count)."""
        model = self._bound_model("state_dict")
        return {"epoch": self.epoch, **self.stepper.state_dict(), "structure": structure_fingerprint(model)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Bring the model to the saved phase (trainable set, optimizer slots, the phases'
        per-variable rates), as ``fit(initial_epoch=e)`` would; refuse, before anything changes,
        a state of another schedule or another model structure."""
        model = self._bound_model("load_state_dict")
        self._check_state(model, state)
        self._restore(model, state)

    def _check_state(self, model: Any, state: Mapping[str, Any], backup: Any = None) -> None:
        """Refuse a state of another schedule or model (one read from ``backup``'s files, if given)."""
        try:
            check_saved_state(state, self.schedule, structure_fingerprint(model))
        except LayerlockError as exc:
            if backup is None:
                raise
            raise LayerlockError(f"the backup in {backup.backup_dir}: {exc} Resume with the model and schedule that "
                                 f"wrote it, or delete {backup.backup_dir} to start over.") from None

    def _restore(self, model: Any, state: Mapping[str, Any]) -> None:
        self.stepper.load(state)  # a metric schedule's phase starts, best value and wait count (checked there)
        self.stepper.check(model)
        if self._rated:
            internals.upgrade(self._rate_target(model))
        self.stepper.replay(model, state["phase"], self._sync)
        self.epoch = state["epoch"]
        self.stepper.kept, self._best_at_begin = None, False
        tracker = self.stepper.tracker
        if tracker is None or not tracker.rule.restore_best or tracker.best_epoch is None \
                or tracker.phase == self.stepper.phase_count - 1:
            return
        if tracker.best_epoch == self.epoch:  # the weights resumed from are the best epoch's: copied when it begins
            self._best_at_begin = True
        else:
            warnings.warn(f"layerlock.keras.FreezeScheduler: restore_best keeps the best epoch of a phase in memory, "
                          f"and this run resumes after it (epoch {tracker.best_epoch}, resumed after epoch "
                          f"{self.epoch}): if the phase ends before a new best, the next phase starts from the last "
                          "epoch's weights, not the best one's", LayerlockWarning, stacklevel=3)

    # -- resuming with keras.callbacks.BackupAndRestore -----------------------------------

    def set_model(self, model: Any) -> None:
        """Bind the model (``fit`` calls it for its callbacks, before ``on_train_begin``).
        When the same ``fit`` has a ``keras.callbacks.BackupAndRestore`` that is about to
        restore a backup, bring ``model`` to the backup's phase first (see the class
        docstring); and make the backups it writes record the phase.

        >>> import keras, layerlock as ll
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fc")])
        >>> callback = FreezeScheduler(ll.Schedule({0: ll.freeze("fc.bias")}), log=None)
        >>> callback.set_model(model); callback.model is model
        True
        """
        super().set_model(model)
        callbacks = internals.fit_callbacks(self) or []
        backups = [c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)]
        mine = next(i for i, c in enumerate(callbacks) if c is self) if backups else 0
        early = [c for c in callbacks[:mine] if isinstance(c, keras.callbacks.BackupAndRestore)
                 and getattr(c, "save_freq", None) == "epoch"]
        if self.stepper.tracker is not None and early:
            raise SpecError(f"a FreezeScheduler with a MetricSchedule must come before keras.callbacks."
                            f"BackupAndRestore({str(early[0].backup_dir)!r}) in callbacks: the backup written at an "
                            "epoch's end must hold the verdict on that epoch's logs, which the FreezeScheduler "
                            "takes in its on_epoch_end; received the backup first. Put the FreezeScheduler "
                            "before it (callbacks=[scheduler, backup]).")
        for backup in backups:
            state = self._backup_state(backup)
            if state is not None:
                self._check_state(model, state, backup)
                self._restore(model, state)
        if backups:
            internals.attach_record(model, self.state_dict)

    @staticmethod
    def _backup_state(backup: Any) -> dict[str, Any] | None:
        """The FreezeScheduler state in the backup ``backup`` will restore (None: no backup)."""
        for path in internals.backup_files(backup):
            if not os.path.exists(path):
                continue
            try:
                state = internals.read_record(path)
            except OSError:
                continue  # BackupAndRestore falls back to the previous backup too
            if state is None:
                raise LayerlockError(f"the backup {path} holds no FreezeScheduler record: it was written by a fit "
                                     f"without layerlock's FreezeScheduler (or a Keras {keras.__version__} that "
                                     "does not save it), so its phase is unknown. Resume it without the "
                                     f"FreezeScheduler, or delete {backup.backup_dir} to start over.")
            return state
        return None

    def on_train_end(self, logs: Any = None) -> None:
        internals.detach_record(self.model)
