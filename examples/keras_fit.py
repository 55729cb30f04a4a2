"""Local SGD with Keras 3 ``model.fit`` on NumPy arrays: the optimizer wrapper and four callbacks.

    horovodrun -np 2 -H localhost:2 python examples/keras_fit.py

The Horovod Keras recipe with ``horovod_local.tensorflow.keras`` in place of
``horovod.tensorflow.keras`` (whose callbacks fail on Keras 3, see docs/KERAS.md):

* ``hlk.DistributedLocalOptimizer(keras.optimizers.SGD(...), period=8, warmup_steps=20)``: local
  steps, a model average every 8 steps (gradients averaged in the first 20 steps);
* ``BroadcastGlobalVariablesCallback(0)``: every rank starts from rank 0's weights;
* ``FinalSyncCallback()``: ``join()``, so every rank ends with the same averaged model;
* ``MetricAverageCallback()``: the epoch's metrics (loss, accuracy, val_*) averaged over ranks;
* ``SyncStatsLogger()``: syncs and bytes sent, per epoch.

Each rank fits its own shard of scikit-learn's digits (the shards have equal length, so every
rank takes the same number of steps per epoch). Rank 0 prints the held-out accuracy of the
final, averaged model. ``examples/keras_digits.py`` does the same from a ``tf.data`` pipeline.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import horovod_local.tensorflow.keras as hlk  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--period", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=20)
    args = p.parse_args()

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    keras.utils.set_random_seed(1234 + rank)  # different initial weights: the broadcast aligns

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0,
                                                        stratify=y)
    per_rank = len(x_train) // size  # equal shards: the same number of steps on every rank
    x_shard = x_train[rank * per_rank:(rank + 1) * per_rank]
    y_shard = y_train[rank * per_rank:(rank + 1) * per_rank]

    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    opt = hlk.DistributedLocalOptimizer(keras.optimizers.SGD(args.lr, momentum=0.9),
                                        period=args.period, warmup_steps=args.warmup_steps)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"],
                  jit_compile=False)  # Horovod's ops have no XLA kernels
    model.fit(x_shard, y_shard, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_test, y_test),
              callbacks=[hlk.BroadcastGlobalVariablesCallback(0),
                         hlk.FinalSyncCallback(),
                         hlk.MetricAverageCallback(),
                         hlk.SyncStatsLogger(verbose=1 if rank == 0 else 0)],
              verbose=2 if rank == 0 else 0)

    # After FinalSyncCallback every rank holds the same model: check it, then evaluate it.
    w = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    w_max = hvd.allreduce(tf.constant(w), op=hvd.Max, name="w_max").numpy()
    _, acc = model.evaluate(x_test, y_test, verbose=0)
    if rank == 0:
        st = opt.sync_stats()
        print(f"replicas identical: {bool(np.array_equal(w, w_max))}; steps {st.steps}, "
              f"syncs {st.syncs}, bytes sent {st.communication_ratio:.3f} of a per-step "
              f"allreduce", flush=True)
        print(f"final accuracy {acc:.4f} (rank 0)", flush=True)


if __name__ == "__main__":
    main()
