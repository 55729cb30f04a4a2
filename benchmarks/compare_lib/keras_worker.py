"""The Keras 3 (TensorFlow) front end of the per-rank loop (``worker.worker_main``): the
digits task in a custom loop of ``tf.function`` steps, with our
``horovod_local.tensorflow.keras.DistributedLocalOptimizer`` or a per-step gradient allreduce."""
from __future__ import annotations

import math
import time

import horovod.tensorflow as hvd
import keras
import tensorflow as tf
import torch  # the task's data and initial weights come from the torch task

import horovod_local
from examples.tasks import make_task
from horovod_local.tensorflow import keras as hlk

from .config import ADPSGD_INITIAL_PERIOD, SLOWMO, TASK_SETTINGS, make_period

# The baseline is a per-step allreduce of every gradient with horovod.tensorflow.allreduce
# (op=Average) in a custom train step: what hvd.DistributedGradientTape does. Horovod's own Keras
# integration cannot be used on Keras 3 (Horovod 0.28.1, TF 2.21 / Keras 3.15):
# horovod.tensorflow.keras.DistributedOptimizer wraps a Keras 3 optimizer without error but never
# allreduces (Keras 3's apply_gradients bypasses the methods it overrides: the ranks silently
# train apart), and hvd.DistributedGradientTape fails on Keras 3 variables ('Variable' object
# has no attribute 'ref').
KERAS_BASELINE = ("per-step gradient allreduce: horovod.tensorflow.allreduce(op=Average) of every "
                  "gradient in a custom train step (horovod.tensorflow.keras.DistributedOptimizer "
                  "does not allreduce on Keras 3, hvd.DistributedGradientTape fails on Keras 3 "
                  "variables)")


class KerasRun:
    """One method of a Keras task: the per-step gradient allreduce baseline or our
    ``horovod_local.tensorflow.keras.DistributedLocalOptimizer``, in a custom loop of
    ``tf.function`` steps (``optimizer.apply_gradients`` inside; the sync is in that graph)."""

    def __init__(self, w: KerasWorker, spec: dict, steps: int) -> None:
        settings = w.settings
        self.w, self.spec = w, spec
        self.model = w.build_model()
        tvars = self.model.trainable_variables
        hlk.broadcast_variables(tvars, root_rank=0)  # as the torch runs (identical already)
        self.grad_bytes = sum(int(v.numpy().nbytes) for v in tvars)
        self.n_params = sum(int(math.prod(v.shape)) for v in tvars)
        if settings["lr_warmup_steps"] or settings["inner"] != "sgd":
            raise ValueError("the Keras task supports the SGD(+momentum) inner optimizer only")
        inner = keras.optimizers.SGD(learning_rate=settings["lr"], momentum=settings["momentum"])
        if spec["kind"] == "horovod":
            self.opt = inner
        else:
            kw = dict(SLOWMO, algorithm="slowmo") if spec.get("algorithm") == "slowmo" else {}
            if spec.get("overlap"):  # refused by the wrapper; compare.py drops such methods
                kw["overlap"] = True
            if spec.get("compression"):  # compressed syncs: 'fp16' | 'int8'
                kw["compression"] = spec["compression"]
            self.opt = hlk.DistributedLocalOptimizer(
                inner, period=make_period(hlk, spec, steps), **kw)
        self.opt.build(tvars)
        model, opt = self.model, self.opt
        loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # batch mean

        @tf.function(jit_compile=False)  # Horovod ops have no XLA kernels
        def grads_fn(x, y):
            with tf.GradientTape() as tape:
                loss = loss_obj(y, model(x, training=True))
            return loss, tape.gradient(loss, tvars)

        @tf.function(jit_compile=False)
        def allreduce_fn(grads):
            return [hvd.allreduce(g, op=hvd.Average, name=f"bench.grad.{i}")
                    for i, g in enumerate(grads)]

        @tf.function(jit_compile=False)
        def apply_fn(grads):
            opt.apply_gradients(zip(grads, tvars))

        # Trace before the timed region (tracing takes seconds; it must not count as training
        # time): get_concrete_function traces without running a step.
        b = w.task.batch
        grads_fn.get_concrete_function(tf.TensorSpec([b, w.x_dim], tf.float32),
                                       tf.TensorSpec([b], tf.int64))
        gspecs = [tf.TensorSpec(v.shape, v.dtype) for v in tvars]
        apply_fn.get_concrete_function(gspecs)
        self.sync_fn = None
        if spec["kind"] == "horovod":
            allreduce_fn.get_concrete_function(gspecs)
        else:
            self.sync_fn = tf.function(opt.average_parameters, jit_compile=False)
            self.sync_fn.get_concrete_function()
        self.grads_fn, self.allreduce_fn, self.apply_fn = grads_fn, allreduce_fn, apply_fn
        self._warm_up(spec)
        self.batches = w.task.train_batches(w.rank, w.size, seed=w.seed)  # the torch task's

    def _warm_up(self, spec: dict) -> None:
        """Real steps through every path (a sync included), then every model and optimizer
        variable restored: the timed run starts from scratch. TF instantiates a traced function
        at its first call and Horovod negotiates a new tensor name at its first allreduce:
        0.1-1.5 s here, once per process in a real job, but a large part of a short run."""
        p = spec.get("period")
        n = 2 if spec["kind"] == "horovod" else (
            ADPSGD_INITIAL_PERIOD if p == "adaptive" else 1 if p == "never" else int(p))
        variables = list({id(v): v for v in [*self.model.variables,
                                             *self.opt.variables]}.values())
        saved = [v.numpy() for v in variables]
        self.batches = self.w.task.train_batches(self.w.rank, self.w.size, seed=self.w.seed + 1)
        for _ in range(n):
            self.train_step()
        if self.sync_fn is not None:
            self.sync_fn()
        for v, x in zip(variables, saved):
            v.assign(x)
        if spec["kind"] == "local":
            st = self.opt.sync_stats()
            assert st.steps == st.syncs == st.bytes_sent == 0, st  # nothing left of the warm-up

    def train_step(self):
        """One step; returns (loss tensor, seconds in the baseline's gradient allreduce)."""
        x, y = next(self.batches)
        loss, grads = self.grads_fn(tf.constant(x.numpy()), tf.constant(y.numpy()))
        comm = 0.0
        if self.spec["kind"] == "horovod":
            t0 = time.perf_counter()
            grads = self.allreduce_fn(grads)  # returns once the allreduce is done (CPU)
            comm = time.perf_counter() - t0
        self.apply_fn(grads)
        return loss, comm

    def sync_stats(self):
        return self.opt.sync_stats()

    def sync_count(self) -> int:
        # Read per step (ADPSGD's period curve) inside the timed region: one counter variable
        # (~0.05 ms) instead of sync_stats()'s nine (~0.5 ms, 5% of an ADPSGD step here).
        return int(self.opt._hl_syncs.numpy())

    def synchronize(self) -> None:
        self.sync_fn()  # opt.synchronize(), traced in __init__

    def evaluate(self, need_avg: bool) -> float:
        """Held-out metric of the ranks' average model; each rank scores half the set."""
        w = self.w
        tvars = self.model.trainable_variables
        vals = [tf.convert_to_tensor(v) for v in tvars]
        if need_avg:
            flat = tf.concat([tf.reshape(v, [-1]) for v in vals], 0)
            flat = hvd.allreduce(flat, op=hvd.Average, name="bench.eval_avg")
            sizes = [int(math.prod(v.shape)) for v in tvars]
            vals = [tf.reshape(p, v.shape) for p, v in zip(tf.split(flat, sizes), tvars)]
        for ev, v in zip(w.eval_model.trainable_variables, vals):
            ev.assign(v)
        x, y = w.x_eval[w.rank::w.size], w.y_eval[w.rank::w.size]
        pred = w.eval_model(x, training=False).numpy().argmax(axis=1)
        sums = tf.constant([float((pred == y).sum()), float(len(y))], tf.float64)
        sums = hvd.allreduce(sums, op=hvd.Sum, name="bench.eval_sums")
        return float(w.task.metric_from_sums(sums.numpy().tolist()))


class KerasWorker:
    """The digits task (``examples.tasks.Digits``: its data split, standardisation, per-rank
    batches and torch initial weights, copied into the same Keras MLP) trained with Keras 3."""

    framework = "keras"
    Run = KerasRun

    def __init__(self, cfg: dict) -> None:
        # CPU only and 1 compute thread per rank, as the torch runs (TF raises if its runtime
        # had already started: these would not apply).
        tf.config.set_visible_devices([], "GPU")
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        torch.set_num_threads(1)
        hvd.init()
        self.rank, self.size, self.seed = hvd.rank(), hvd.size(), cfg["seed"]
        self.settings = settings = TASK_SETTINGS[cfg["task"]]
        self.task = task = make_task(settings["base_task"], **settings["task_kwargs"])
        self.x_dim = int(task.Xtr.shape[1])
        self.x_eval, self.y_eval = task.Xte.numpy(), task.yte.numpy()
        self.backend = (f"keras {keras.__version__}, tensorflow {tf.__version__}: in-graph fused "
                        f"sync (tf.concat + one horovod.tensorflow allreduce per dtype), "
                        f"horovod_local {horovod_local.__version__}")
        self.baseline = KERAS_BASELINE
        self.eval_model = self.build_model()  # holds the averaged weights for evaluation

    def build_model(self):
        """The task's MLP in Keras, with the torch model's initial weights (same seed): every
        method, in both frameworks, starts from the same point."""
        tmodel = self.task.build_model(seed=self.seed)
        linears = [m for m in tmodel if hasattr(m, "weight")]
        layers = [keras.Input((self.x_dim,))]
        for i, lin in enumerate(linears):
            last = i == len(linears) - 1
            layers.append(keras.layers.Dense(lin.out_features,
                                             activation=None if last else "relu"))
        model = keras.Sequential(layers)
        for dense, lin in zip(model.layers, linears):
            # torch Linear keeps (out, in); a Keras Dense kernel is (in, out)
            dense.set_weights([lin.weight.detach().numpy().T, lin.bias.detach().numpy()])
        return model

    def barrier(self) -> None:
        hvd.allreduce(tf.zeros([1]), name="bench.barrier", op=hvd.Sum)

    def allreduce_max(self, x: float) -> float:
        c = hvd.allreduce(tf.constant([x], tf.float64), op=hvd.Max, name="bench.comm_max")
        return float(c.numpy()[0])
