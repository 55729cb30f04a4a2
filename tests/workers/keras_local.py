"""Runs a list of Keras configs on this rank (model.fit on the fixtures' linear model, float64).

Config format = tests/reference.py's (inner / schedule / warmup_steps / state_policy /
algorithm / steps), plus ``kind``: ``fit`` (default), ``ctl`` (custom training loop),
``callbacks``, ``save_load`` (exact resume after model.save / load_model), ``time_budget``,
``overlap_probe`` (can a Horovod TF collective stay in flight across train steps?),
``reliability`` (mismatched replicas, NaN at a sync), ``uneven`` (a different number of batches
per rank in every epoch, with the collective callbacks and validation data); and for ``fit`` an
optional ``dtype`` ("float64" by default, or "float32"): the model's, the data's and Keras'
floatx for that config; ``compression`` ('fp16' / 'int8') is passed on as in
tests/workers/torch_local.py. Two-level averaging: ``local_period`` and ``groups`` (lists of ranks,
registered as process sets at ``hvd.init`` and passed as ``local_process_set``), as in
tests/workers/torch_local.py; a ``fit`` config may have per-rank ``steps`` (a list) with
``join``: ``FinalSyncCallback`` joins at the epoch's end.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402

import fixtures  # noqa: E402
from _common import group_set, init_horovod, load_payload, main_guard, save_result  # noqa: E402


def _keras():
    import keras

    return keras


def make_model(perturb: float = 0.0, dtype: str = "float64"):
    keras = _keras()
    dense = keras.layers.Dense(fixtures.OUT_FEATURES, dtype=dtype, name="linear")
    model = keras.Sequential([keras.Input((fixtures.IN_FEATURES,), dtype=dtype), dense])
    p = fixtures.init_params()
    dense.kernel.assign(p["weight"].T + perturb)
    dense.bias.assign(p["bias"] + perturb)
    return model, dense


def params_of(dense) -> dict:
    return {"weight": np.array(dense.kernel.numpy()).T.copy(), "bias": np.array(dense.bias.numpy())}


def loss_fn(y, p):
    import tensorflow as tf

    # per sample 0.5 * sum over outputs; Keras averages over the batch -> 0.5*sum/BATCH
    return 0.5 * tf.reduce_sum(tf.square(p - y), axis=-1)


def data(rank: int, steps: int, first: int = 1, dtype: str = "float64"):
    xs, ys = zip(*(fixtures.make_batch(rank, t) for t in range(first, first + steps)))
    return np.concatenate(xs).astype(dtype), np.concatenate(ys).astype(dtype)


def make_lr(spec: dict):
    keras = _keras()
    fn = spec.get("lr_schedule")
    if fn is None:
        return float(spec["lr"])
    if fn is fixtures.step_decay:
        import tensorflow as tf

        base = float(spec["lr"])

        class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):  # step = optimizer iterations before the step (0-based)
                return tf.where(step < 30, tf.constant(base, tf.float64),
                                tf.constant(base * 0.5, tf.float64))

            def get_config(self):
                return {}

        return StepDecay()
    raise ValueError(fn)


def make_inner(spec: dict):
    keras = _keras()
    from horovod_local.tensorflow.keras import LocalAdaAlter

    lr = make_lr(spec)
    if spec["name"] == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=float(spec.get("momentum", 0.0)))
    if spec["name"] == "adam":
        b1, b2 = spec["betas"]
        return keras.optimizers.Adam(learning_rate=lr, beta_1=b1, beta_2=b2,
                                     epsilon=float(spec["eps"]))
    if spec["name"] == "adaalter":
        return LocalAdaAlter(learning_rate=lr, epsilon=spec["eps"],
                             initial_accumulator_value=spec["initial_accumulator_value"],
                             lr_warmup_steps=spec.get("lr_warmup_steps", 0))
    raise ValueError(spec["name"])


def make_optimizer(cfg: dict):
    keras = _keras()
    from horovod_local.tensorflow.keras import DistributedLocalOptimizer

    kw = dict(period=fixtures.schedule_from_spec(cfg["schedule"]),
              warmup_steps=cfg.get("warmup_steps", 0),
              state_policy=cfg.get("state_policy", "keep"))
    if "nonfinite" in cfg:
        kw["nonfinite"] = cfg["nonfinite"]
    if cfg.get("compression"):
        kw["compression"] = cfg["compression"]
    if cfg.get("local_period") is not None:
        kw["local_period"] = cfg["local_period"]
        import horovod.tensorflow as hvd

        kw["local_process_set"] = group_set(_GROUP_SETS, hvd, cfg.get("groups"))
    alg = cfg.get("algorithm") or {"name": "local_sgd"}
    if alg["name"] == "slowmo":
        kw.update(algorithm="slowmo", slowmo_lr=alg["alpha"], slowmo_momentum=alg["beta"])
    elif alg["name"] == "outer_sgd":
        if cfg.get("outer_factory"):
            kw["outer_optimizer"] = lambda anchors: keras.optimizers.SGD(
                alg["lr"], momentum=alg["momentum"], nesterov=alg["nesterov"])
        else:
            kw["outer_optimizer"] = keras.optimizers.SGD(alg["lr"], momentum=alg["momentum"],
                                                         nesterov=alg["nesterov"])
    return DistributedLocalOptimizer(make_inner(cfg["inner"]), **kw)


_GROUP_SETS: dict = {}  # two-level groups (tuple of ranks) -> Horovod process set




class Recorder:
    """Per-batch record of sync rounds (as the torch worker records them)."""

    def __init__(self, opt):
        self.opt = opt
        self.sync_steps, self.periods, self.rounds, self.lrs = [], [], [], []
        self.t = 0
        self.last_sync_t = 0

    def callback(self, sleep: float = 0.0):
        keras = _keras()
        rec = self

        class _CB(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                if not rec.opt.built:  # Keras builds it lazily in the first traced step
                    rec.opt.build(self.model.trainable_variables)
                rec.prev_syncs = int(rec.opt._hl_syncs.numpy())
                rec.prev_period = float(rec.opt._hl_gs.period.numpy())

            def on_train_batch_begin(self, batch, logs=None):
                rec.lrs.append(float(np.asarray(rec.opt.learning_rate)))

            def on_train_batch_end(self, batch, logs=None):
                rec.t += 1
                if sleep:
                    time.sleep(sleep)
                s = int(rec.opt._hl_syncs.numpy())
                if s > rec.prev_syncs:
                    rec.sync_steps.append(rec.t)
                    rec.periods.append(rec.prev_period)
                    rec.rounds.append(rec.t - rec.last_sync_t - rec.opt._hl_warmup_steps
                                      * (rec.last_sync_t == 0))
                    rec.last_sync_t = rec.t
                rec.prev_syncs = s
                rec.prev_period = float(rec.opt._hl_gs.period.numpy())

        return _CB()


def result_of(opt, dense, rec: Recorder, **extra) -> dict:
    out = {"params": params_of(dense), "sync_steps": rec.sync_steps, "periods": rec.periods,
           "rounds": rec.rounds, "stats": opt.sync_stats().as_dict(),
           "schedule_state": opt.schedule.state_dict(), "lrs": rec.lrs}
    out.update(extra)
    return out


def run_fit(cfg: dict, rank: int) -> dict:
    dtype = cfg.get("dtype", "float64")
    model, dense = make_model(dtype=dtype)
    opt = make_optimizer(cfg)
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    steps = cfg["steps"] if isinstance(cfg["steps"], int) else cfg["steps"][rank]
    x, y = data(rank, steps, dtype=dtype)
    rec = Recorder(opt)
    callbacks = [rec.callback()]  # first: it sees the scheduled rounds, not the join's
    if cfg.get("join"):  # uneven data: the epoch-end join (the callbacks' path)
        from horovod_local.tensorflow.keras import FinalSyncCallback

        callbacks.append(FinalSyncCallback())
    model.fit(x, y, batch_size=fixtures.BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=callbacks)
    if cfg.get("final_sync"):
        opt.average_parameters()
    return result_of(opt, dense, rec)


def run_time_budget(cfg: dict, rank: int) -> dict:
    from horovod_local.tensorflow.keras import FinalSyncCallback

    model, dense = make_model()
    opt = make_optimizer(cfg)
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    x, y = data(rank, cfg["steps"])
    rec = Recorder(opt)
    model.fit(x, y, batch_size=fixtures.BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[rec.callback(sleep=cfg["sleep_per_step"][rank]), FinalSyncCallback()])
    return result_of(opt, dense, rec)


def custom_train_step(model, opt):
    """A custom training loop's step (``tf.function``): loss, gradients, ``apply_gradients``."""
    import tensorflow as tf

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def run_ctl(cfg: dict, rank: int) -> dict:
    import tensorflow as tf

    model, dense = make_model()
    opt = make_optimizer(cfg)
    opt.build(model.trainable_variables)
    train_step = custom_train_step(model, opt)

    sync_steps = []
    for t in range(1, cfg["steps"] + 1):
        x, y = fixtures.make_batch(rank, t)
        before = int(opt._hl_syncs.numpy())
        train_step(tf.constant(x), tf.constant(y))
        if int(opt._hl_syncs.numpy()) > before:
            sync_steps.append(t)
    if cfg.get("final_sync"):
        opt.average_parameters()
    rec = Recorder(opt)
    rec.sync_steps = sync_steps
    return result_of(opt, dense, rec, traces=train_step.experimental_get_tracing_count())


def run_callbacks(cfg: dict, rank: int) -> dict:
    keras = _keras()
    import tensorflow as tf
    from horovod_local.tensorflow import keras as hlk

    model, dense = make_model(perturb=0.01 * rank)  # ranks start apart: the broadcast fixes it
    opt = make_optimizer(cfg)
    model.compile(optimizer=opt, loss=loss_fn, metrics=["mae"], jit_compile=False)
    spe, epochs = cfg["steps_per_epoch"], cfg["epochs"]
    x, y = data(rank, spe * epochs)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(fixtures.BATCH)
    rec = Recorder(opt)
    seen = {"begin": None, "raw": [], "avg": []}

    class AtBegin(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["begin"] = params_of(dense)

    class Raw(keras.callbacks.Callback):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def on_epoch_end(self, epoch, logs=None):
            seen[self.key].append({k: float(v) for k, v in logs.items()})

    callbacks = [hlk.BroadcastGlobalVariablesCallback(0), AtBegin(),
                 hlk.LearningRateWarmupCallback(cfg["inner"]["lr"],
                                                warmup_steps=cfg["lr_warmup_batches"]),
                 rec.callback(), Raw("raw"), hlk.MetricAverageCallback(), Raw("avg"),
                 hlk.SyncStatsLogger(verbose=0), hlk.FinalSyncCallback()]
    hist = model.fit(ds, epochs=epochs, steps_per_epoch=spe, verbose=0, callbacks=callbacks)
    return result_of(opt, dense, rec, begin=seen["begin"], raw=seen["raw"], avg=seen["avg"],
                     history={k: [float(v) for v in vs] for k, vs in hist.history.items()})


def run_uneven(cfg: dict, rank: int) -> dict:
    """``cfg["batches"][rank]`` batches per epoch (the same data every epoch), ``epochs``
    epochs, validation data, ranks starting apart (the broadcast aligns them). Two runs:

    * ``known``: arrays (Keras knows the number of batches), the callbacks in an unhelpful
      order: first a callback of the user's that allreduces at every epoch's end, then
      ``MetricAverageCallback``, then the broadcast and ``FinalSyncCallback``;
    * ``unknown``: a dataset of unknown length (``filter``), validation every second epoch, so
      the epoch's join runs at ``on_epoch_end`` (epoch 1) or at the validation's start (epoch 2).

    Records per epoch the weights and sync count seen at ``on_epoch_end`` (after the join), the
    logs before and after metric averaging, and the user collective's result."""
    keras = _keras()
    import horovod.tensorflow as hvd
    import tensorflow as tf
    from horovod_local.tensorflow import keras as hlk

    nb = cfg["batches"][rank % len(cfg["batches"])]
    x, y = data(rank, nb)
    xv, yv = data(rank, cfg["val_batches"], first=cfg["val_first"])

    @tf.function(autograph=False)
    def user_sum(v):
        return hvd.allreduce(v, op=hvd.Sum, name="test.user_epoch_end")

    out = {}
    for variant in ("known", "unknown"):
        model, dense = make_model(perturb=0.01 * rank)
        opt = make_optimizer(cfg)
        model.compile(optimizer=opt, loss=loss_fn, metrics=["mae"], jit_compile=False)
        seen = {"raw": [], "avg": [], "epoch_params": [], "epoch_syncs": [], "user": []}

        class Raw(keras.callbacks.Callback):
            def __init__(self, key):
                super().__init__()
                self.key = key

            def on_epoch_end(self, epoch, logs=None):
                seen[self.key].append({k: float(v) for k, v in logs.items()})

        class AtEpochEnd(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                seen["epoch_params"].append(params_of(dense))
                seen["epoch_syncs"].append(opt.sync_stats().syncs)

        class UserCollective(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                seen["user"].append(float(user_sum(tf.constant([rank + 1.0], tf.float64))[0]))

        if variant == "known":
            callbacks = [UserCollective(), Raw("raw"), hlk.MetricAverageCallback(), Raw("avg"),
                         hlk.BroadcastGlobalVariablesCallback(0), hlk.FinalSyncCallback(),
                         AtEpochEnd()]
            fit = dict(x=x, y=y, batch_size=fixtures.BATCH, shuffle=False,
                       validation_data=(xv, yv))
        else:
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(fixtures.BATCH) \
                .filter(lambda a, b: True)  # unknown length: Keras does not know the batches
            callbacks = [hlk.BroadcastGlobalVariablesCallback(0), hlk.FinalSyncCallback(),
                         Raw("raw"), hlk.MetricAverageCallback(), Raw("avg"), AtEpochEnd()]
            fit = dict(x=ds, validation_data=(xv, yv), validation_freq=2)
        hist = model.fit(epochs=cfg["epochs"], verbose=0, callbacks=callbacks, **fit)
        out[variant] = dict(
            params=params_of(dense), stats=opt.sync_stats().as_dict(), batches=nb,
            history={k: [float(v) for v in vs] for k, vs in hist.history.items()}, **seen)
        keras.backend.clear_session()
    return out


def run_save_load(cfg: dict, rank: int, out_dir: str) -> dict:
    """An uninterrupted run of ``steps + more_steps`` vs. a run stopped after ``steps`` (mid-round),
    saved with ``model.save``, loaded with ``keras.models.load_model`` and trained on: the loaded
    one must continue bit-identically. The stopped original also trains on (same result)."""
    keras = _keras()
    import horovod_local.tensorflow.keras  # noqa: F401  (registers the custom objects)

    stop, more = cfg["steps"], cfg["more_steps"]
    fit = dict(batch_size=fixtures.BATCH, epochs=1, shuffle=False, verbose=0)
    x2, y2 = data(rank, more, first=stop + 1)

    model, dense = make_model()
    opt = make_optimizer(cfg)
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    model.fit(*data(rank, stop + more), **fit)
    straight, straight_stats = params_of(dense), opt.sync_stats().as_dict()
    keras.backend.clear_session()  # the stopped run gets the same variable paths

    model, dense = make_model()
    opt = make_optimizer(cfg)
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    model.fit(*data(rank, stop), **fit)
    path = os.path.join(out_dir, f"model_{cfg['id']}_rank{rank}.keras")
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects={"loss_fn": loss_fn})
    lopt = loaded.optimizer
    out = {
        "type": type(lopt).__name__, "inner_type": type(lopt.inner_optimizer).__name__,
        "config_equal": _strip_names(opt.get_config()) == _strip_names(lopt.get_config()),
        "n_vars": (len(opt.variables), len(lopt.variables)),
        # every saved variable (all but the wall-clock start of the current round)
        "opt_vars": [np.array(v.numpy()) for v in opt._hl_saved_variables()],
        "loaded_opt_vars": [np.array(v.numpy()) for v in lopt._hl_saved_variables()],
        "weights": [np.array(w) for w in model.get_weights()],
        "loaded_weights": [np.array(w) for w in loaded.get_weights()],
        "stats": opt.sync_stats().as_dict(), "loaded_stats": lopt.sync_stats().as_dict(),
        "straight": straight, "straight_stats": straight_stats,
        "residuals": [np.array(e.numpy()) for e in (opt.residuals or [])],
    }
    # both go on training (every rank, the same collectives in the same order): exact resume
    model.fit(x2, y2, **fit)
    loaded.fit(x2, y2, **fit)
    out["continued"] = params_of(dense)
    lw = loaded.get_weights()
    out["loaded_continued"] = {"weight": np.array(lw[0]).T.copy(), "bias": np.array(lw[1])}
    out["continued_stats"] = (opt.sync_stats().as_dict(), lopt.sync_stats().as_dict())
    out["schedules"] = (opt.schedule.state_dict(), lopt.schedule.state_dict())
    return out


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test asserts on the type and the message
        return f"{type(e).__name__}: {e}"
    return "no error"


def _mismatch(rank: int, what: str) -> str:
    """Rank 1 builds its model or optimizer differently (``what``); returns the error text."""
    keras = _keras()
    import tensorflow as tf
    from horovod_local.tensorflow import keras as hlk

    odd = rank == 1
    units, layer, dtype = fixtures.OUT_FEATURES, "linear", "float64"
    if what == "shape" and odd:
        units = fixtures.OUT_FEATURES - 1
    if what == "path" and odd:
        layer = "linear2"
    if what == "dtype" and odd:
        dtype = "float32"
    dense = keras.layers.Dense(units, dtype=dtype, name=layer)
    model = keras.Sequential([keras.Input((fixtures.IN_FEATURES,), dtype="float64"), dense])
    inner = keras.optimizers.Adam(0.01) if what == "inner" and odd else keras.optimizers.SGD(0.05)
    kw = dict(period=4)
    if what == "period" and odd:
        kw["period"] = 5
    if what == "warmup_steps" and odd:
        kw["warmup_steps"] = 2
    if what == "state_policy" and odd:
        kw["state_policy"] = "average"
    if what == "outer":
        kw["outer_optimizer"] = keras.optimizers.SGD(0.7 if not odd else 0.8, momentum=0.5)
    opt = hlk.DistributedLocalOptimizer(inner, **kw)
    x, y = data(rank, 2)
    y = y[:, :units]
    if what == "ctl":  # a custom loop: the check runs when apply_gradients is first traced
        opt = hlk.DistributedLocalOptimizer(inner, period=4 + odd)
        opt.build(model.trainable_variables)
        step = custom_train_step(model, opt)
        return _error(lambda: step(tf.constant(x[:8]), tf.constant(y[:8])))
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    callbacks = [hlk.BroadcastGlobalVariablesCallback(0)] if what == "shape" else []
    return _error(lambda: model.fit(x, y, batch_size=fixtures.BATCH, verbose=0,
                                    callbacks=callbacks))


def _nan_run(cfg: dict, rank: int, steps: int, nan_rank: int, nan_step: int,
             record: tuple = ()) -> dict:
    """Train ``steps`` steps with a NaN in rank ``nan_rank``'s batch ``nan_step`` (1-based);
    returns the error (or "no error"), the parameters after the steps in ``record`` and at the
    end, the stats and the warnings raised."""
    import warnings

    keras = _keras()
    model, dense = make_model()
    opt = make_optimizer(cfg)
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    x, y = data(rank, steps)
    if rank == nan_rank:
        x[(nan_step - 1) * fixtures.BATCH, 0] = np.nan
    seen = {}

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 in record:
                seen[batch + 1] = params_of(dense)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = _error(lambda: model.fit(x, y, batch_size=fixtures.BATCH, epochs=1, shuffle=False,
                                       verbose=0, callbacks=[Record()]))
    return {"error": err, "seen": seen, "params": params_of(dense),
            "stats": opt.sync_stats().as_dict(),
            "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning]}


def _average_parameters_alone(rank: int) -> str:
    """Rank 1 takes 4 steps (a scheduled sync at step 4); the others take 3 and call
    ``average_parameters()``: the explicit round meets a scheduled one. Returns the error."""
    cfg = {"inner": {"name": "sgd", "lr": 0.05}, "schedule": {"kind": "constant", "period": 4}}
    model, _ = make_model()
    opt = make_optimizer(cfg)
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    x, y = data(rank, 4 if rank == 1 else 3)

    def run():
        model.fit(x, y, batch_size=fixtures.BATCH, epochs=1, shuffle=False, verbose=0)
        if rank != 1:
            opt.average_parameters()

    return _error(run)


def _different_start(rank: int, broadcast: bool, lazy: bool, spec: dict) -> dict:
    """Ranks start from different variables (rank-dependent values, or a lazily built model's
    own random initialisation), with anchors x0 / c taken from them (``spec``): without a
    broadcast the first sync round fails on every rank; with the broadcast callback (after the
    first batch for a lazy model, as Horovod's) training goes on. Returns the error and the
    variables after ``average_parameters()``."""
    keras = _keras()
    from horovod_local.tensorflow import keras as hlk

    if lazy:  # built in the first traced train step, each rank from its own random init
        dense = keras.layers.Dense(fixtures.OUT_FEATURES, dtype="float64", name="linear",
                                   kernel_initializer=keras.initializers.RandomNormal(seed=rank))
        model = keras.Sequential([dense])
    else:
        model, dense = make_model(perturb=0.01 * rank)
    opt = make_optimizer(dict(spec, schedule={"kind": "constant", "period": 4}))
    model.compile(optimizer=opt, loss=loss_fn, jit_compile=False)
    x, y = data(rank, 9)
    callbacks = [hlk.BroadcastGlobalVariablesCallback(0)] if broadcast else []

    def run():
        model.fit(x, y, batch_size=fixtures.BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=callbacks)
        opt.average_parameters()

    err = _error(run)
    return {"error": err, "params": params_of(dense) if dense.built else {}}


def run_reliability(cfg: dict, rank: int) -> dict:
    """Mismatched replicas, NaN at a sync or a warm-up allreduce (raise / skip),
    ``average_parameters()`` on some ranks only."""
    keras = _keras()
    out = {}
    for what in cfg["mismatches"]:
        out["mismatch_" + what] = _mismatch(rank, what)
        keras.backend.clear_session()
    base = {"inner": {"name": "sgd", "lr": 0.05}, "schedule": {"kind": "constant", "period": 4}}
    # a NaN on rank 1 at step 7 reaches the sync at step 8: every rank fails, nothing written
    out["nan_sync"] = _nan_run(base, rank, 8, nan_rank=1, nan_step=7)
    keras.backend.clear_session()
    out["nan_warmup"] = _nan_run(dict(base, warmup_steps=4), rank, 4, nan_rank=1, nan_step=3)
    keras.backend.clear_session()
    # nonfinite='skip': the round at step 8 is dropped, every rank returns to the average of
    # step 4, and training goes on (syncs at 4 and 12)
    out["skip_sync"] = _nan_run(dict(base, nonfinite="skip"), rank, 12, nan_rank=1, nan_step=7,
                                record=(4, 8))
    keras.backend.clear_session()
    # ... and a skipped warm-up step: no rank takes step 2
    out["skip_warmup"] = _nan_run(dict(base, warmup_steps=4, nonfinite="skip"), rank, 12,
                                  nan_rank=1, nan_step=2, record=(1, 2))
    keras.backend.clear_session()
    out["average_parameters_alone"] = _average_parameters_alone(rank)
    keras.backend.clear_session()
    sgd = {"name": "sgd", "lr": 0.05}
    out["start_int8"] = _different_start(rank, False, False, dict(inner=sgd, compression="int8"))
    keras.backend.clear_session()
    out["start_lazy_slowmo"] = _different_start(
        rank, False, True, dict(inner=sgd, algorithm={"name": "slowmo", "alpha": 1.0,
                                                      "beta": 0.5}))
    keras.backend.clear_session()
    out["start_lazy_slowmo_broadcast"] = _different_start(
        rank, True, True, dict(inner=sgd, compression="fp16",
                               algorithm={"name": "slowmo", "alpha": 1.0, "beta": 0.5}))
    return out


def run_overlap_probe(cfg: dict, rank: int) -> dict:
    """Why ``overlap=True`` is refused in Keras (docs/KERAS.md, "Overlapped rounds"): can a
    Horovod TensorFlow collective stay in flight while train steps run? Rank 1 enters every
    collective ``delay`` seconds late, so that a round is "in flight" on rank 0 for that long;
    rank 0 times its side of four ways of starting it:

    * ``A``: inside a ``tf.function`` whose result is not used (start, do not wait);
    * ``B``: inside a ``tf.function`` that writes the result to a variable (a round's apply);
    * ``C``: ``B`` under asynchronous eager execution, then train steps;
    * ``D``: ``B`` on a Python thread while the main thread runs train steps."""
    import threading

    import horovod.tensorflow as hvd
    import tensorflow as tf

    keras = _keras()
    delay = float(cfg["delay"])

    def meet(tag):
        tf.function(lambda: hvd.allreduce(tf.constant([0.0], tf.float64), op=hvd.Sum,
                                          name="test.probe.meet." + tag,
                                          ignore_name_scope=True), autograph=False)()

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    opt = keras.optimizers.SGD(0.01)
    xb, yb = tf.ones([16, 64], tf.float64), tf.zeros([16, 64], tf.float64)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    buf = tf.ones([4096], tf.float64)
    v = tf.Variable(tf.zeros([4096], tf.float64))

    @tf.function(autograph=False)
    def start_unused(x):
        hvd.allreduce(x, op=hvd.Sum, name="test.probe.a", ignore_name_scope=True)
        return x * 2.0

    @tf.function(autograph=False)
    def start_store(x):
        v.assign(hvd.allreduce(x, op=hvd.Sum, name="test.probe.b", ignore_name_scope=True))
        return x * 2.0

    def timed(fn, *a):
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0

    float(train_step())
    start_store(buf)  # traced (and one round) before any timing
    graph = start_unused.get_concrete_function(buf).graph
    out = {"stateful": {op.type: op.op_def.is_stateful for op in graph.get_operations()
                        if op.type.startswith("Horovod")}}
    meet("a")
    if rank == 1:
        time.sleep(delay)
    out["A_call_s"] = timed(start_unused, buf)
    meet("b")
    if rank == 1:
        time.sleep(delay)
    out["B_call_s"] = timed(start_store, buf)
    meet("c")
    if rank == 1:
        time.sleep(delay)
        start_store(buf)
    else:
        tf.config.experimental.set_synchronous_execution(False)
        try:
            out["C_call_s"] = timed(start_store, buf)
            out["C_first_step_s"] = timed(lambda: float(train_step()))
        finally:
            tf.config.experimental.set_synchronous_execution(True)
    meet("d")
    if rank == 1:
        time.sleep(delay)
        start_store(buf)
    else:
        took = {}
        th = threading.Thread(target=lambda: took.setdefault("round", timed(start_store, buf)))
        th.start()
        steps = 0
        while th.is_alive():
            float(train_step())
            steps += 1
        th.join()
        out["D_round_s"], out["D_steps_during_round"] = took["round"], steps
    meet("end")
    return out


def _strip_names(c):
    if isinstance(c, dict):
        return {k: _strip_names(v) for k, v in c.items() if k != "name"}
    if isinstance(c, list):
        return [_strip_names(v) for v in c]
    return c


def main():
    out_dir, configs = load_payload()
    import horovod.tensorflow as hvd
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    _GROUP_SETS.update(init_horovod(hvd, configs))
    keras = _keras()
    keras.config.set_floatx("float64")
    rank = hvd.rank()
    results, timings = {}, {}
    for cfg in configs:
        t0 = time.perf_counter()
        kind = cfg.get("kind", "fit")
        keras.config.set_floatx(cfg.get("dtype", "float64"))
        if kind == "fit":
            results[cfg["id"]] = run_fit(cfg, rank)
        elif kind == "ctl":
            results[cfg["id"]] = run_ctl(cfg, rank)
        elif kind == "callbacks":
            results[cfg["id"]] = run_callbacks(cfg, rank)
        elif kind == "save_load":
            results[cfg["id"]] = run_save_load(cfg, rank, out_dir)
        elif kind == "time_budget":
            results[cfg["id"]] = run_time_budget(cfg, rank)
        elif kind == "reliability":
            results[cfg["id"]] = run_reliability(cfg, rank)
        elif kind == "uneven":
            results[cfg["id"]] = run_uneven(cfg, rank)
        elif kind == "overlap_probe":
            results[cfg["id"]] = run_overlap_probe(cfg, rank)
        else:
            raise ValueError(kind)
        timings[cfg["id"]] = time.perf_counter() - t0
        keras.backend.clear_session()
    results["_timings"] = timings
    if _GROUP_SETS:
        # A group's last local rounds may still be running when the other group is done, and
        # a rank's exit shuts Horovod down on every rank (the others' next collective fails):
        # meet once more before leaving.
        tf.function(lambda: hvd.allreduce(tf.constant([0.0], tf.float64), op=hvd.Sum,
                                          name="test.final_barrier"), autograph=False)()
    save_result(out_dir, rank, results)


if __name__ == "__main__":
    main_guard(main)
