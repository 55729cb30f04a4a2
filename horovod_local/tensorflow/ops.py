"""The TensorFlow backend of the sync pipeline (:class:`horovod_local.core.ops.SyncOps`): graph
ops built inside a ``tf.function`` (the Keras train step, or the wrapper's own function for
``synchronize()`` / ``join()``); nothing round-trips to Python per batch.

Packing: the tensors of one dtype are flattened and concatenated (``tf.concat``) into one
buffer, the control element at the end of the widest dtype's buffer, summed over the ranks by
one ``horovod.tensorflow.allreduce(op=Sum)``. (Measured against ``grouped_allreduce``: equal
within noise for a 9.8M-float model, concat slightly faster for 200 small tensors; concat also
guarantees one allreduce per dtype whatever ``HOROVOD_FUSION_THRESHOLD`` is.) Finiteness: one
reduction per summed buffer (a sum is non-finite if any element is); the exact search runs on
the failure path only. The fused unpacks follow the arithmetic specified in
``horovod_local.torch._kernels`` (accumulate in float32 / float64, round once on store), so the
two front ends agree to float rounding.

Collective names: Horovod matches collectives across ranks by name. Every round uses the same
names (``horovod_local.sync.<dtype>``, ``ignore_name_scope``) whichever graph it is built in, so
a rank in a ``join()`` round meets a rank in a scheduled round, and a rank in another kind of
round gets a shape or control-element error instead of a hang. An eagerly executed Horovod op
does not match a graph op of the same name, so every collective runs inside a ``tf.function``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from horovod_local.core import protocol
from horovod_local.core.ops import Bucket, SyncOps
from horovod_local.tensorflow.collectives import _hvd

__all__ = ["TFOps", "TensorSlot", "FLOAT_DTYPES", "numel"]


FLOAT_DTYPES = frozenset([tf.float64, tf.float32, tf.bfloat16, tf.float16])


def numel(t: Any) -> int:
    return int(math.prod(int(d) for d in t.shape))


def _acc(dtype: tf.DType) -> tf.DType:
    """Accumulation dtype of the fused unpacks: float64 for float64, else float32."""
    return tf.float64 if dtype == tf.float64 else tf.float32


class TensorSlot:
    """A tensor the pipeline reads and writes like a variable (``assign``), for values that
    are not variables: warm-up gradients, the outer optimizer's pseudo-gradients."""

    def __init__(self, value: tf.Tensor) -> None:
        self._value = value
        self.dtype, self.shape = value.dtype, value.shape

    @classmethod
    def like(cls, t: Any) -> "TensorSlot":
        """An empty slot of ``t``'s dtype and shape (the pipeline assigns it first)."""
        slot = cls.__new__(cls)
        slot._value, slot.dtype, slot.shape = None, tf.as_dtype(t.dtype), t.shape
        return slot

    def assign(self, value: tf.Tensor) -> None:
        self._value = value

    def value(self) -> tf.Tensor:
        return self._value


def _read(t: Any) -> tf.Tensor:
    return t.value() if isinstance(t, TensorSlot) else tf.convert_to_tensor(t)


class TFOps(SyncOps):
    """Graph ops over one Horovod process set."""

    quote_names = False  # tf.debugging.Assert prints strings C-escaped: quotes would show as \'

    def __init__(self, process_set: Any) -> None:
        self.process_set = process_set

    # ---- tensors ----------------------------------------------------------------------------------
    def dtype_of(self, t):
        dtype = tf.as_dtype(t.dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"horovod_local syncs floating-point tensors only, got {dtype.name}")
        return dtype, dtype.name

    def numel(self, t):
        return numel(t)

    def size(self):
        return self.process_set.size()

    def now(self):
        return tf.timestamp()

    # ---- buffers ----------------------------------------------------------------------------------
    def pack(self, bucket: Bucket, control: Sequence[Any]) -> tf.Tensor:
        pieces = [tf.reshape(tf.cast(_read(t), bucket.dtype), [-1])
                  for sec in bucket.sections() for t in sec]
        if bucket.has_control:
            for c in control:
                c = tf.cast(c, bucket.dtype) if tf.is_tensor(c) \
                    else tf.constant(float(c), bucket.dtype)  # tf.cast(float) rounds via f32
                pieces.append(tf.reshape(c, [1]))
        return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0)

    def allreduce_sum(self, buckets, bufs, what, step):
        hvd = _hvd()
        return [hvd.allreduce(buf, op=hvd.Sum, name=protocol.SYNC_NAME.format(b.dtype_name),
                              process_set=self.process_set, ignore_name_scope=True)
                for b, buf in zip(buckets, bufs)]

    def nbytes(self, buf):
        return int(buf.shape[0]) * buf.dtype.size

    def elements(self, buf, index, count):
        return [tf.cast(buf[index + i], tf.float64) for i in range(count)]

    def proves_finite(self, bucket, buf):
        wide = buf if bucket.dtype in (tf.float32, tf.float64) else tf.cast(buf, tf.float32)
        return tf.math.is_finite(tf.reduce_sum(wide))

    def locate_nonfinite(self, bucket, buf):
        flags, off = [], 0
        for k in bucket.sizes + [bucket.control_numel()]:
            flags.append(tf.logical_not(tf.reduce_all(tf.math.is_finite(buf[off: off + k]))))
            off += k
        bad = tf.stack(flags)
        first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
        return tf.where(tf.reduce_any(bad), first, tf.constant(-1, tf.int32))

    # ---- fused unpacks (arithmetic of horovod_local.torch._kernels) --------------------------------
    @staticmethod
    def _averages(buf, tensors, scale, offset):
        """Per tensor: (x_avg in the accumulation dtype, shaped like the tensor)."""
        acc = _acc(buf.dtype)
        s = tf.constant(scale, acc)
        out = []
        for t in tensors:
            k = numel(t)
            out.append(tf.reshape(tf.cast(buf[offset: offset + k], acc) * s, t.shape))
            offset += k
        return out

    def unpack_average(self, buf, tensors, scale, offset):
        for t, x in zip(tensors, self._averages(buf, tensors, scale, offset)):
            t.assign(tf.cast(x, t.dtype))

    @staticmethod
    def _deviation(new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
        d = tf.cast(new, tf.float64) - tf.cast(old, tf.float64)
        return tf.reduce_sum(d * d)

    def unpack_average_deviation(self, buf, tensors, scale, offset):
        dev = tf.constant(0.0, tf.float64)
        for t, x in zip(tensors, self._averages(buf, tensors, scale, offset)):
            new = tf.cast(x, t.dtype)
            dev = dev + self._deviation(new, _read(t))
            t.assign(new)
        return dev

    def unpack_slowmo(self, buf, params, anchors, momenta, scale, lrs, alpha, beta, offset):
        dev = tf.constant(0.0, tf.float64)
        acc = _acc(buf.dtype)
        for p, x0, u, lr, x in zip(params, anchors, momenta, lrs,
                                   self._averages(buf, params, scale, offset)):
            dev = dev + self._deviation(tf.cast(x, p.dtype), _read(p))
            lr64 = tf.cast(lr, tf.float64)
            u_new = tf.constant(beta, acc) * _read(u) + (_read(x0) - x) / tf.cast(lr64, acc)
            x0_new = _read(x0) - tf.cast(tf.constant(alpha, tf.float64) * lr64, acc) * u_new
            u.assign(u_new)
            x0.assign(x0_new)
            p.assign(tf.cast(x0_new, p.dtype))
        return dev

    def unpack_pseudo_grad(self, buf, params, anchors, grads, scale, offset):
        dev = tf.constant(0.0, tf.float64)
        for p, x0, g, x in zip(params, anchors, grads, self._averages(buf, params, scale, offset)):
            dev = dev + self._deviation(tf.cast(x, p.dtype), _read(p))
            g.assign(_read(x0) - x)
        return dev

    def unpack_adaalter(self, buf, accumulators, denominators, scale, offset):
        for a2, b2, x in zip(accumulators, denominators,
                             self._averages(buf, accumulators, scale, offset)):
            v = tf.cast(x, a2.dtype)
            a2.assign(v)
            b2.assign(v)

    # ---- state --------------------------------------------------------------------------------------
    def zero(self, tensors):
        for t in tensors:
            t.assign(tf.zeros(t.shape, t.dtype))

    def copy(self, dst, src):
        for d, s in zip(dst, src):
            d.assign(tf.cast(_read(s), d.dtype))

    def mean_scalar(self, value):
        hvd = _hvd()
        s = hvd.allreduce(tf.reshape(tf.cast(value, tf.float64), [1]), op=hvd.Sum,
                          name=protocol.DEVIATION_NAME, process_set=self.process_set,
                          ignore_name_scope=True)
        return s[0] * (1.0 / self.size())

    # ---- control flow -------------------------------------------------------------------------------
    def cond(self, pred, then_fn, else_fn):
        return tf.cond(pred, then_fn, else_fn)

    def all_true(self, preds):
        return tf.reduce_all(tf.stack([tf.convert_to_tensor(p) for p in preds]))

    def any_true(self, preds):
        return tf.reduce_any(tf.stack([tf.convert_to_tensor(p) for p in preds]))

    def logical_not(self, pred):
        return tf.logical_not(pred)

    def true(self):
        return tf.constant(True)

    def false(self):
        return tf.constant(False)

    def scalar(self, value):
        return tf.constant(value, tf.float64)

    def to_float(self, value):
        return tf.cast(value, tf.float64)

    def check(self, pred, error, message):
        # every error is tf.errors.InvalidArgumentError in a graph; the message says what
        return tf.debugging.Assert(pred, [message()])

    def after(self, tokens, fn):
        with tf.control_dependencies([t for t in tokens if t is not None]):
            return fn()

    def message(self, parts):
        return tf.strings.join([p if isinstance(p, str) else
                                tf.strings.as_string(p) for p in parts])

    def pick(self, labels, index):
        return tf.gather(tf.constant(list(labels)), tf.maximum(index, 0))

    def warn(self, message, suffix):
        def warn(m: bytes) -> np.int64:
            warnings.warn(m.decode() + suffix, RuntimeWarning, stacklevel=2)
            return np.int64(0)

        return tf.numpy_function(warn, [message], tf.int64, stateful=True)
