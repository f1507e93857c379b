"""The recorded metric sequence every integration's metric-schedule test is fed, and the
phase each epoch must run in (tests/test_metric_schedule*.py, the Keras, Lightning,
Trainer, torch and NNX tests)."""

import layerlock as ll

MONITOR = "val_loss"
# Phase 0 improves to 0.8, then stalls (0.79 and 0.795 do not beat 0.8 by 0.01): phase 1
# from epoch 4. Phase 1 starts afresh at 0.7, stalls again: phase 2 from epoch 7, the last.
VALUES = [1.0, 0.8, 0.79, 0.795, 0.7, 0.69, 0.695, 0.70, 0.5, 0.4]
PHASES = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]   # the phase in force during each epoch
STARTS = [0, 4, 7]


def schedule(body, head, **rule):
    """Three phases on a body -> head model: the head, then the top of the body, then all."""
    return ll.MetricSchedule([ll.freeze(body), ll.unfreeze(f"{body}.*"), ll.unfreeze()], monitor=MONITOR,
                             patience=2, min_delta=0.01, **rule)
