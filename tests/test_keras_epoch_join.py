"""The Keras front end's epoch-end join and the average_parameters() rename, in one process
(Horovod with one rank, no horovodrun): the collective callbacks join once per epoch whichever
of them runs first and whatever the input, FinalSyncCallback adds no train-end round after an
epoch's join, an input of unknown length counts only the steps taken, and ``synchronize()`` is a
deprecated alias of ``average_parameters()``. The multi-rank behaviour (uneven batches per rank,
no hang, replicas equal to the reference) is tested under horovodrun in
test_keras_optimizer.py (test_uneven_batches_per_rank_join_every_epoch)."""
from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from horovod_local.tensorflow import keras as hlk

BATCHES, BATCH, PERIOD, EPOCHS = 10, 8, 4, 2


@pytest.fixture(scope="module", autouse=True)
def _horovod():
    import horovod.tensorflow as hvd

    hvd.init()
    assert hvd.size() == 1
    yield


def _model(period=PERIOD):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    opt = hlk.DistributedLocalOptimizer(keras.optimizers.SGD(0.05), period=period)
    model.compile(optimizer=opt, loss="mse", metrics=["mae"], jit_compile=False)
    return model, opt


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCHES * BATCH, 6)).astype("float32")
    return x, (x @ np.full((6, 4), 0.1, "float32")).astype("float32")


class _SyncsAtEpochEnd(keras.callbacks.Callback):
    def __init__(self, opt):
        super().__init__()
        self.opt, self.syncs, self.steps = opt, [], []

    def on_epoch_end(self, epoch, logs=None):
        self.syncs.append(self.opt.sync_stats().syncs)
        self.steps.append(self.opt.sync_stats().steps)


# per epoch: the scheduled rounds (steps 4, 8) and the epoch's join
WANT_SYNCS = [(BATCHES // PERIOD + 1) * (e + 1) for e in range(EPOCHS)]


@pytest.mark.parametrize("order,length", [("broadcast_first", "known"),
                                          ("metrics_first", "unknown"),
                                          ("final_sync_first", "unknown_validation")])
def test_one_join_per_epoch(order, length):
    model, opt = _model()
    x, y = _data()
    rec = _SyncsAtEpochEnd(opt)
    ours = {"broadcast_first": [hlk.BroadcastGlobalVariablesCallback(0),
                                hlk.MetricAverageCallback(), hlk.FinalSyncCallback()],
            "metrics_first": [hlk.MetricAverageCallback(), hlk.FinalSyncCallback(),
                              hlk.BroadcastGlobalVariablesCallback(0)],
            "final_sync_first": [hlk.FinalSyncCallback(), hlk.MetricAverageCallback(),
                                 hlk.BroadcastGlobalVariablesCallback(0)]}[order]
    if length == "known":
        fit = dict(x=x, y=y, batch_size=BATCH, shuffle=False)
    else:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).filter(lambda a, b: True)
        fit = dict(x=ds)
        if length == "unknown_validation":
            fit["validation_data"] = (x[:16], y[:16])
    model.fit(epochs=EPOCHS, verbose=0, callbacks=ours + [rec], **fit)
    assert rec.syncs == WANT_SYNCS
    assert opt.sync_stats().syncs == WANT_SYNCS[-1]  # no train-end round: nothing to join
    # Keras runs the train function once more on an exhausted input of unknown length; the
    # wrapper's step counter counts only the steps taken
    assert rec.steps == [BATCHES * (e + 1) for e in range(EPOCHS)]
    assert opt.sync_stats().local_steps == 0


def test_final_sync_joins_at_train_end_only_after_steps():
    model, opt = _model(period=100)
    x, y = _data()
    fsc = hlk.FinalSyncCallback()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[fsc])
    assert opt.sync_stats().syncs == 1  # the epoch's join; none at train end
    # a second fit (same callback object) joins its epoch again: one more round
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[fsc])
    assert opt.sync_stats().syncs == 2


def test_every_epoch_false_warns_that_it_has_no_effect():
    with pytest.warns(DeprecationWarning, match=r"every_epoch=False\) has no effect"):
        hlk.FinalSyncCallback(every_epoch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hlk.FinalSyncCallback()
        hlk.FinalSyncCallback(every_epoch=True)


def test_synchronize_is_a_deprecated_alias_of_average_parameters():
    model, opt = _model(period=100)
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert opt.sync_stats().syncs == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.average_parameters()
    assert opt.sync_stats().syncs == 1
    with pytest.warns(DeprecationWarning, match=r"synchronize\(\) is deprecated: call "
                                                r"average_parameters\(\)"):
        opt.synchronize()
    assert opt.sync_stats().syncs == 2
    # inside a tf.function too (the warning comes when it is traced)
    with pytest.warns(DeprecationWarning, match="average_parameters"):
        tf.function(opt.synchronize)()
    assert opt.sync_stats().syncs == 3
