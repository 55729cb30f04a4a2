"""Local AdaAlter (Xie et al., Alg. 3) as a Keras 3 optimizer."""
from __future__ import annotations

import numbers

import keras
import tensorflow as tf
from keras import initializers

from horovod_local.tensorflow.keras import _compat

__all__ = ["LocalAdaAlter"]


@keras.saving.register_keras_serializable(package="horovod_local")
class LocalAdaAlter(keras.optimizers.Optimizer):
    r"""AdaGrad whose denominators ``B2`` change only at refreshes, so that ranks share them.

    Step ``t`` (the optimizer's 1-based step count) with ``t'`` steps since the last refresh::

        lr_t = learning_rate * min(1, t / lr_warmup_steps)     (if lr_warmup_steps > 0)
        x   -= lr_t * g / sqrt(B2 + t' * epsilon**2)             # B2 frozen between refreshes
        A2  += g * g

    and a refresh sets ``B2 = A2``, ``t' = 0``. Alone, the optimizer refreshes after every step.
    Wrapped in :class:`~horovod_local.tensorflow.keras.DistributedLocalOptimizer` it refreshes
    after every warm-up step, and at each sync with ``B2 = A2 = mean over ranks of A2`` (``A2``
    travels in the parameters' fused allreduce). Exact rules: ``docs/SEMANTICS.md``.

    Args:
        learning_rate: eta (paper: 0.5 for the LSTM LM); a float or a Keras lr schedule.
        epsilon: the placeholder epsilon; each local step adds ``epsilon**2`` to the
            denominator (paper: 1).
        initial_accumulator_value: ``b0**2``, the initial ``A2`` and ``B2`` (paper: 1).
        lr_warmup_steps: linear lr warm-up over the optimizer's own steps (paper: 600); 0 = off.
        **kwargs: the usual Keras optimizer arguments (``clipnorm``, ``weight_decay``, ...).

    Example::

        >>> import keras, numpy as np
        >>> from horovod_local.tensorflow.keras import LocalAdaAlter
        >>> w = keras.Variable(np.ones(3, dtype="float32"))
        >>> opt = LocalAdaAlter(learning_rate=0.5)
        >>> opt.apply([2.0 * w.value], [w])  # grad of sum(w*w): x = 1 - 0.5 * 2 / sqrt(1 + 1)
        >>> np.round(w.numpy(), 4)
        array([0.2929, 0.2929, 0.2929], dtype=float32)
    """

    # slot lists that are AdaAlter's own accumulators, not "inner state" for a state policy
    _hl_not_state = ("_accumulators", "_denominators")

    def __init__(self, learning_rate=0.5, epsilon=1.0, initial_accumulator_value=1.0,
                 lr_warmup_steps=0, name="local_adaalter", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if isinstance(learning_rate, numbers.Real) and not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        if not (isinstance(epsilon, numbers.Real) and epsilon >= 0):
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        if not (isinstance(initial_accumulator_value, numbers.Real)
                and initial_accumulator_value > 0):
            raise ValueError(f"initial_accumulator_value must be > 0 (it is b0**2 and starts the "
                             f"denominator), got {initial_accumulator_value!r}")
        if isinstance(lr_warmup_steps, bool) or not isinstance(lr_warmup_steps, numbers.Integral) \
                or lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {lr_warmup_steps!r}")
        self.epsilon = float(epsilon)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.lr_warmup_steps = int(lr_warmup_steps)
        # Alone: refresh after every step. DistributedLocalOptimizer turns this off and refreshes
        # at its syncs (and after warm-up steps).
        self._auto_refresh = True
        _compat.verify()  # the private Keras APIs used below (fails here, naming them)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        init = initializers.Constant(self.initial_accumulator_value)
        accs, dens = [], []
        for v in var_list:
            dt = "float32" if v.dtype in ("float16", "bfloat16") else v.dtype
            base = v.path.replace("/", "_") if hasattr(v, "path") else v.name
            accs.append(self.add_variable(shape=v.shape, dtype=dt, initializer=init,
                                          name=f"{base}_accumulator"))
            dens.append(self.add_variable(shape=v.shape, dtype=dt, initializer=init,
                                          name=f"{base}_denominator"))
        self._accumulators = accs
        self._denominators = dens
        self._local_steps = self.add_variable(shape=(), dtype="int64", initializer="zeros",
                                              name="local_steps")

    def update_step(self, gradient, variable, learning_rate):
        i = _compat.variable_index(self, variable)
        a2, b2 = self._accumulators[i], self._denominators[i]
        dt = a2.dtype
        g = tf.cast(tf.convert_to_tensor(gradient), dt)
        lr = tf.cast(learning_rate, dt)
        if self.lr_warmup_steps > 0:
            t = tf.cast(self.iterations + 1, dt)
            lr = lr * tf.minimum(tf.constant(1.0, dt), t / self.lr_warmup_steps)
        t_local = tf.cast(self._local_steps + 1, dt)
        denom = tf.sqrt(tf.convert_to_tensor(b2) + t_local * (self.epsilon ** 2))
        self.assign_sub(variable, tf.cast(lr * g / denom, variable.dtype))
        self.assign_add(a2, g * g)

    def apply(self, grads, trainable_variables=None):
        # Keras' step, then count it (and refresh when alone). The public ``apply`` rather than
        # the private ``_backend_apply_gradients`` hook; ``apply`` with no gradients is a no-op.
        if len(grads) == 0:
            return super().apply(grads, trainable_variables)
        super().apply(grads, trainable_variables)
        self._local_steps.assign_add(1)
        if self._auto_refresh:
            self.refresh_denominators()

    # ---- used by DistributedLocalOptimizer -------------------------------------------------
    def refresh_denominators(self):
        """``B2 = A2`` and restart the local step count (the sync of one rank)."""
        for a2, b2 in zip(self._accumulators, self._denominators):
            b2.assign(a2)
        self._local_steps.assign(0)
        return tf.constant(0.0, tf.float64)

    def accumulator_pairs(self) -> list:
        """(A2, B2) of each trainable variable, in the order the optimizer was built with."""
        return list(zip(self._accumulators, self._denominators))

    def reset_local_steps(self):
        self._local_steps.assign(0)

    @property
    def local_steps(self):
        """Steps since the denominators were last refreshed (t' - 1 of the next step)."""
        return self._local_steps

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon,
                       "initial_accumulator_value": self.initial_accumulator_value,
                       "lr_warmup_steps": self.lr_warmup_steps})
        return config
