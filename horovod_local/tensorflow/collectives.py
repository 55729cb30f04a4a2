"""TensorFlow collectives of horovod-local outside the sync round (the round itself is
:mod:`horovod_local.tensorflow.ops` under the core pipeline): broadcast of variables, metric
averages, object allgather, and variable naming.

Every collective here runs inside its own ``tf.function``: an eagerly executed Horovod op does
not match a graph op of the same name on another rank, and all of this package's collectives
must be able to meet (see :mod:`horovod_local.tensorflow.ops`).
"""
from __future__ import annotations

import pickle
from typing import Any

import tensorflow as tf

__all__ = ["broadcast_variables", "allreduce_mean_values", "allgather_object", "variable_path",
           "split"]


def _hvd():
    import horovod.tensorflow as hvd

    return hvd


def _value(v) -> tf.Tensor:
    """A Keras or TF variable's current value as a tensor."""
    return tf.convert_to_tensor(v)


def variable_path(v) -> str:
    """A variable's name in messages and fingerprints: the Keras 3 path (``dense/kernel``), which
    is unique within a model, unlike ``name`` (``kernel``); a TF variable's name otherwise."""
    path = getattr(v, "path", None)
    return str(path) if path else str(getattr(v, "name", "?"))


def _numel(v) -> int:
    n = 1
    for d in v.shape:
        n *= int(d)
    return n


# ---- collectives used by the callbacks (each inside its own tf.function) ---------------------
def split(buf: tf.Tensor, tensors: list, offset: int) -> tuple[list, int]:
    """Views of ``buf`` shaped like ``tensors``, starting at ``offset``."""
    out = []
    for t in tensors:
        k = _numel(t)
        out.append(tf.reshape(buf[offset: offset + k], t.shape))
        offset += k
    return out, offset


def broadcast_variables(variables: list, root_rank: int = 0, process_set=None,
                        name: str = "horovod_local.broadcast") -> None:
    """Set ``variables`` (Keras 3 or TF variables, any dtypes) to ``root_rank``'s values: one
    Horovod broadcast per dtype (packed like a sync). Collective: every rank of the process set
    calls it with the same list of variables (same shapes and dtypes, same order).

    Works on Keras 3 variables, unlike ``horovod.tensorflow.broadcast_variables`` there."""
    hvd = _hvd()
    ps = process_set if process_set is not None else hvd.global_process_set
    by_dtype: dict = {}
    for v in variables:
        by_dtype.setdefault(tf.as_dtype(v.dtype), []).append(v)
    if not by_dtype:
        return
    groups = sorted(by_dtype.items(), key=lambda kv: kv[0].name)

    @tf.function(autograph=False)
    def run():
        for dtype, vs in groups:
            buf = tf.concat([tf.reshape(_value(v), [-1]) for v in vs], axis=0)
            buf = hvd.broadcast(buf, root_rank=root_rank, name=f"{name}.{dtype.name}",
                                process_set=ps, ignore_name_scope=True)
            parts, _ = split(buf, vs, 0)
            for v, p in zip(vs, parts):
                v.assign(p)

    run()


def allreduce_mean_values(values: list[float], process_set=None,
                          name: str = "horovod_local.metrics") -> list[float]:
    """Mean over the ranks of a list of Python floats, in one float64 allreduce. Collective."""
    hvd = _hvd()
    ps = process_set if process_set is not None else hvd.global_process_set
    n = ps.size()

    @tf.function(autograph=False)
    def run(x):
        return hvd.allreduce(x, op=hvd.Sum, name=name, process_set=ps,
                             ignore_name_scope=True) * (1.0 / n)

    out = run(tf.constant(list(values) if values else [0.0], dtype=tf.float64))
    return [float(v) for v in out.numpy()[: len(values)]]


def allgather_object(obj: Any, name: str, process_set=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order within ``process_set``. Collective.

    Eager only (call it under ``tf.init_scope()`` from traced code). The two allgathers run
    inside a ``tf.function``, as all of this package's collectives (see the module docstring)."""
    hvd = _hvd()
    ps = process_set if process_set is not None else hvd.global_process_set
    data = tf.io.decode_raw(tf.constant(pickle.dumps(obj)), tf.uint8)

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.uint8)])
    def gather(x):
        sizes = hvd.allgather(tf.reshape(tf.size(x, out_type=tf.int64), [1]),
                              name=name + ".sizes", process_set=ps, ignore_name_scope=True)
        return sizes, hvd.allgather(x, name=name, process_set=ps, ignore_name_scope=True)

    sizes, blob = gather(data)
    raw = blob.numpy().tobytes()
    out, off = [], 0
    for k in sizes.numpy().tolist():
        out.append(pickle.loads(raw[off: off + k]))
        off += k
    return out
