"""Horovod's ``pytorch_mnist.py``, with local SGD: the one-line swap of the optimizer.

    horovodrun -np 2 -H localhost:2 python examples/pytorch_mnist.py
    horovodrun -np 2 -H localhost:2 python examples/pytorch_mnist.py --resume   # continue

Same structure as Horovod's example (a sampler shards the training set by rank, the lr is scaled
by the number of ranks, rank 0's initial model is broadcast, the test metrics are averaged with
``hvd.allreduce``), on scikit-learn's bundled 8x8 digits instead of MNIST (no download). The
only Horovod line that changes is the optimizer::

    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    optimizer = hl.DistributedLocalOptimizer(optimizer, model.named_parameters(),
                                             period=8, warmup_steps=20)

What else local SGD asks for:

* ``optimizer.join()`` at the end of each epoch, before evaluating: ranks differ between syncs;
  after ``join()`` every rank holds the same averaged model (and uneven shards are fine).
* Checkpoints per rank: ``ckpt.rank{r}.pt`` holds the model, ``optimizer.state_dict()`` (inner
  optimizer state, which is per rank, plus the wrapper's counters and schedule) and the epoch.
  ``--resume`` loads this rank's file and continues with the next epoch.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
import torch.utils.data.distributed
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import horovod.torch as hvd
import horovod_local.torch as hl


class Net(nn.Module):
    """A small CNN for 1x8x8 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def digits_datasets():
    """(train, test) TensorDatasets of 1x8x8 float images in [0, 1] and integer labels."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (torch.utils.data.TensorDataset(x_tr, y_tr),
            torch.utils.data.TensorDataset(x_te, y_te))


def metric_average(val, name):
    return hvd.allreduce(torch.tensor(val), name=name).item()  # op=Average


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05, help="per rank; scaled by the ranks")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--period", type=int, default=8, help="local steps between model averages")
    p.add_argument("--warmup-steps", type=int, default=20,
                   help="first steps with a gradient allreduce, as hvd.DistributedOptimizer")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--checkpoint-dir", default=".", help="where ckpt.rank<r>.pt are written")
    p.add_argument("--resume", action="store_true", help="continue from this rank's checkpoint")
    args = p.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()

    train_dataset, test_dataset = digits_datasets()
    # Partition the data by rank, as in Horovod's example.
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=size, rank=rank, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size,
                                               sampler=train_sampler)
    test_sampler = torch.utils.data.distributed.DistributedSampler(
        test_dataset, num_replicas=size, rank=rank, shuffle=False)
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=args.test_batch_size,
                                              sampler=test_sampler)

    model = Net()
    # Horovod: scale the learning rate by the number of ranks.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * size, momentum=args.momentum)

    # The one-line swap (was: hvd.DistributedOptimizer(optimizer, named_parameters=...)).
    optimizer = hl.DistributedLocalOptimizer(optimizer, model.named_parameters(),
                                             period=args.period, warmup_steps=args.warmup_steps)

    ckpt_path = os.path.join(args.checkpoint_dir, f"ckpt.rank{rank}.pt")
    start_epoch = 1
    if args.resume:
        # Every rank loads its own file: between syncs (and in the optimizer state) ranks differ.
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"] + 1
        print(f"rank {rank}: resumed from {ckpt_path} (epoch {ckpt['epoch']} done, "
              f"step {optimizer.sync_stats().steps}), continuing at epoch {start_epoch}",
              flush=True)
    else:
        # Horovod: start every rank from rank 0's initial model.
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def train(epoch):
        model.train()
        train_sampler.set_epoch(epoch)  # a new shuffle every epoch
        for batch_idx, (data, target) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()  # a local step; averages the models every `period` steps
            if batch_idx % args.log_interval == 0 and rank == 0:
                print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_sampler)}]"
                      f"\tLoss: {loss.item():.6f}", flush=True)
        # End of this rank's data: serve the others' sync rounds until every rank is here;
        # then every rank holds the same averaged model.
        optimizer.join()

    def test():
        model.eval()
        test_loss, test_accuracy = 0.0, 0.0
        with torch.no_grad():
            for data, target in test_loader:
                output = model(data)
                test_loss += F.nll_loss(output, target, reduction="sum").item()
                test_accuracy += output.argmax(dim=1).eq(target).float().sum().item()
        test_loss /= len(test_sampler)
        test_accuracy /= len(test_sampler)
        # Horovod: average the metric values over the ranks.
        return metric_average(test_loss, "avg_loss"), metric_average(test_accuracy, "avg_accuracy")

    test_loss, test_accuracy = None, None
    for epoch in range(start_epoch, args.epochs + 1):
        train(epoch)
        test_loss, test_accuracy = test()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch}, ckpt_path)
        if rank == 0:
            st = optimizer.sync_stats()
            print(f"epoch {epoch}: test loss {test_loss:.4f}, test accuracy {test_accuracy:.4f}, "
                  f"steps {st.steps}, syncs {st.syncs}, "
                  f"bytes sent {st.communication_ratio:.3f} of a per-step allreduce", flush=True)
    if test_accuracy is None:
        raise SystemExit(f"nothing to do: the checkpoint is at epoch {start_epoch - 1} "
                         f"and --epochs is {args.epochs}")
    if rank == 0:
        print(f"final accuracy {test_accuracy:.4f} (rank 0)", flush=True)


if __name__ == "__main__":
    main()
