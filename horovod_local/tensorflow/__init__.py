"""TensorFlow front end of horovod-local.

The user-facing API is the Keras 3 one, :mod:`horovod_local.tensorflow.keras`
(``DistributedLocalOptimizer``, ``LocalAdaAlter``, callbacks). This package holds the
TensorFlow-level pieces it is built on: the sync ops of the core pipeline (:mod:`.ops`), the collectives outside it
(:mod:`.collectives`) and the
in-graph period schedules (:mod:`.graph_schedule`). All collectives use ``horovod.tensorflow``
ops (``horovod.tensorflow.keras`` does not work on Keras 3 and is not used).
"""
from horovod_local.tensorflow.collectives import broadcast_variables  # noqa: F401
