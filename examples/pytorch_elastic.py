"""Elastic local SGD: ``hvd.elastic.run`` with ``hl.LocalTorchState`` (Gloo), after Horovod's
``pytorch_mnist_elastic.py``, on scikit-learn's digits.

Fixed set of workers (runs like any other Horovod script)::

    horovodrun -np 2 -H localhost:2 --gloo python examples/pytorch_elastic.py

Elastic: workers may come and go; a discovery script prints the current ``host:slots`` lines::

    printf '#!/bin/sh\\necho localhost:2\\n' > discover.sh && chmod +x discover.sh
    horovodrun -np 2 --min-np 1 --max-np 4 --host-discovery-script ./discover.sh \\
        --network-interface lo python examples/pytorch_elastic.py

What differs from Horovod's elastic example:

* ``hl.LocalTorchState`` instead of ``hvd.elastic.TorchState`` (which cannot carry the wrapper:
  docs/SEMANTICS.md, "Elastic training"). After every membership change it adopts the new
  world size, broadcasts rank 0's model and optimizer state and starts a fresh round.
* Commit right after a sync (``opt.sync_stats().local_steps == 0``): there every rank holds the
  same model, so a rollback after a crash loses no rank's progress unevenly.
* ``opt.join()`` at the end of each epoch: ranks can have processed different numbers of batches
  after a change (the ``ElasticSampler`` re-partitions the rest of the epoch); ``join()`` serves
  the others' sync rounds until every rank is done, then all hold the same averaged model.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import horovod.torch as hvd
import horovod_local.torch as hl


def digits_datasets():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (torch.utils.data.TensorDataset(x_tr, y_tr),
            torch.utils.data.TensorDataset(x_te, y_te))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05, help="per rank; scaled by the ranks")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--period", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    train_dataset, test_dataset = digits_datasets()
    # Horovod: an ElasticSampler re-partitions the epoch's remaining samples after a change.
    train_sampler = hvd.elastic.ElasticSampler(train_dataset, shuffle=True, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size,
                                               sampler=train_sampler)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(),
                                momentum=args.momentum)
    optimizer = hl.DistributedLocalOptimizer(optimizer, model.named_parameters(),
                                             period=args.period, warmup_steps=args.warmup_steps)

    def evaluate():
        # every rank evaluates its share of the test set; the accuracy is averaged over ranks
        x, y = test_dataset.tensors
        x, y = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]
        with torch.no_grad():
            acc = model(x).argmax(dim=1).eq(y).float().mean()
        return hvd.allreduce(acc, name="test_accuracy").item()

    @hvd.elastic.run
    def train(state):
        # (re-)entered at the start and after every membership change, with every rank equal
        while state.epoch <= args.epochs:
            model.train()
            for batch_idx, (data, target) in enumerate(train_loader):
                optimizer.zero_grad()
                F.cross_entropy(model(data), target).backward()
                optimizer.step()
                # Horovod: record what this rank has processed (for the re-partition)
                train_sampler.record_batch(batch_idx, args.batch_size)
                st = optimizer.sync_stats()
                if st.steps > args.warmup_steps and st.local_steps == 0:  # right after a sync
                    state.commit()
            optimizer.join()  # every rank now holds the same averaged model
            state.last_accuracy = evaluate()
            if hvd.rank() == 0:
                st = optimizer.sync_stats()
                print(f"epoch {state.epoch}: {hvd.size()} ranks, test accuracy "
                      f"{state.last_accuracy:.4f}, steps {st.steps}, syncs {st.syncs}", flush=True)
            state.epoch += 1
            train_sampler.set_epoch(state.epoch)  # the next epoch's shuffle, nothing processed
            state.commit()

    def on_state_reset():
        # Horovod: the world size may have changed; rescale the lr (the sampler is reset by
        # the state, the wrapper adopts the new size in LocalTorchState.sync())
        for group in optimizer.param_groups:
            group["lr"] = args.lr * hvd.size()

    state = hl.LocalTorchState(model, optimizer, train_sampler=train_sampler, epoch=1,
                               last_accuracy=0.0)
    state.register_reset_callbacks([on_state_reset])
    train(state)
    if hvd.rank() == 0:
        print(f"final accuracy {state.last_accuracy:.4f} (rank 0)", flush=True)


if __name__ == "__main__":
    main()
