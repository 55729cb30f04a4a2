"""Keras 3 (TensorFlow backend) front end of horovod-local.

Example::

    import horovod.tensorflow as hvd, keras
    from horovod_local.tensorflow import keras as hlk
    hvd.init()
    model.compile(optimizer=hlk.DistributedLocalOptimizer(keras.optimizers.SGD(0.05), period=8),
                  loss="mse", jit_compile=False)
    model.fit(x, y, callbacks=[hlk.BroadcastGlobalVariablesCallback(0), hlk.FinalSyncCallback(),
                               hlk.MetricAverageCallback()])  # ranks may have uneven batches

See ``docs/KERAS.md``.
"""
from horovod_local.schedules import (  # noqa: F401
    Adaptive,
    Constant,
    Increasing,
    Never,
    PeriodSchedule,
    TimeBudget,
)
from horovod_local.stats import SyncStats  # noqa: F401
from horovod_local.tensorflow.collectives import broadcast_variables  # noqa: F401
from horovod_local.tensorflow.keras.adaalter import LocalAdaAlter  # noqa: F401
from horovod_local.tensorflow.keras.callbacks import (  # noqa: F401
    BroadcastGlobalVariablesCallback,
    FinalSyncCallback,
    LearningRateWarmupCallback,
    MetricAverageCallback,
    SyncStatsLogger,
    join_epoch,
)
from horovod_local.tensorflow.keras.optimizer import DistributedLocalOptimizer  # noqa: F401
