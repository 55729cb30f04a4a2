"""TensorFlow front end of horovod-local.

The user-facing API is the Keras 3 one, :mod:`horovod_local.tensorflow.keras`
(``DistributedLocalOptimizer``, ``LocalAdaAlter``, callbacks). This package holds the
TensorFlow-level pieces it is built on: the in-graph fused sync (:mod:`.fused_sync`) and the
in-graph period schedules (:mod:`.graph_schedule`). All collectives use ``horovod.tensorflow``
ops (``horovod.tensorflow.keras`` does not work on Keras 3 and is not used).
"""
from horovod_local.tensorflow.fused_sync import broadcast_variables  # noqa: F401
