"""Local SGD with Keras 3: a small MLP on scikit-learn's digits, model.fit under horovodrun.

    horovodrun -np 2 -H localhost:2 python examples/keras_digits.py

Each rank trains on its own shard of the training set with local SGD (a parameter average
every 8 steps, after 20 warm-up steps of gradient averaging); the callbacks broadcast the
start, average the epoch metrics over the ranks, log the sync statistics and do a final sync,
so every rank ends with the same model. Rank 0 prints the held-out accuracy.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--period", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()

    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from horovod_local.tensorflow import keras as hlk

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    keras.utils.set_random_seed(1234 + rank)  # different starts: the broadcast aligns them

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0,
                                                        stratify=y)
    x_shard, y_shard = x_train[rank::size], y_train[rank::size]  # this rank's data

    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])
    opt = hlk.DistributedLocalOptimizer(
        keras.optimizers.SGD(learning_rate=args.lr, momentum=0.9),
        period=args.period, warmup_steps=args.warmup_steps, state_policy="keep")
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)  # Horovod ops have no XLA kernels

    steps_per_epoch = len(x_shard) // args.batch_size  # equal on all ranks (same step count)
    steps_per_epoch = int(hvd.allreduce(tf.constant(steps_per_epoch), op=hvd.Min,
                                        name="steps_per_epoch"))
    callbacks = [
        hlk.BroadcastGlobalVariablesCallback(root_rank=0),
        hlk.FinalSyncCallback(),  # at train end: every rank holds the same averaged model
        hlk.MetricAverageCallback(),
        hlk.SyncStatsLogger(verbose=1),
    ]
    ds = (tf.data.Dataset.from_tensor_slices((x_shard, y_shard))
          .shuffle(len(x_shard), seed=rank).batch(args.batch_size, drop_remainder=True)
          .repeat())
    t0 = time.perf_counter()
    model.fit(ds, epochs=args.epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
              verbose=2 if rank == 0 else 0)
    seconds = time.perf_counter() - t0

    _, acc = model.evaluate(x_test, y_test, verbose=0)
    # every rank holds the same model after the final sync: check it
    w = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    identical = bool(np.array_equal(hvd.allreduce(tf.constant(w), op=hvd.Max,
                                                  name="w_max").numpy(), w))
    if rank == 0:
        st = opt.sync_stats()
        print(f"held-out accuracy: {acc:.4f}  ({size} ranks, period {args.period}, "
              f"{seconds:.1f} s of training)")
        print(f"sync stats: steps={st.steps} warm-up steps={st.warmup_steps_done} "
              f"syncs={st.syncs} bytes sent={st.bytes_sent} "
              f"(allreduce every step: {st.bytes_per_step_allreduce}, "
              f"ratio {st.communication_ratio:.3f}), time in sync={st.sync_seconds:.3f} s")
        print(f"replicas identical after the final sync: {identical}")


if __name__ == "__main__":
    main()
