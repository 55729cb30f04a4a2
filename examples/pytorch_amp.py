"""Local SGD with automatic mixed precision (``torch.autocast`` + ``torch.amp.GradScaler``).

    horovodrun -np 2 -H localhost:2 python examples/pytorch_amp.py
    horovodrun -np 2 -H localhost:2 python examples/pytorch_amp.py --dtype bfloat16

``examples/pytorch_mnist.py`` (digits, a small CNN, a sampler sharding by rank, per-rank
checkpoints) with the forward pass under ``torch.autocast`` (float16 by default, on the CPU;
``--device cuda`` on a GPU) and the usual GradScaler loop, unchanged, through the wrapper::

    scaler.scale(loss).backward()
    scaler.step(optimizer)      # the wrapper unscales, averages (warm-up) or steps locally
    scaler.update()

Every rank keeps its own loss scale. A step whose gradients overflowed on one rank is skipped on
that rank only (a local step) or on every rank (a warm-up step: the averaged gradient is not
finite); either way it counts as a step, so the ranks' sync rounds stay aligned (see
docs/SEMANTICS.md, "Mixed precision"). The scaler's state goes into the per-rank checkpoint.
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
        return self.fc2(x)  # logits; the loss is computed in float32 (autocast's policy)


def digits_datasets():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
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
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--device", default="cpu", help="'cpu', or 'cuda' (one GPU per rank)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--checkpoint-dir", default=".")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    amp_dtype = getattr(torch, args.dtype)

    train_dataset, test_dataset = digits_datasets()
    train_sampler = torch.utils.data.distributed.DistributedSampler(
        train_dataset, num_replicas=size, rank=rank, seed=args.seed)
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size,
                                               sampler=train_sampler)
    test_sampler = torch.utils.data.distributed.DistributedSampler(
        test_dataset, num_replicas=size, rank=rank, shuffle=False)
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=256, sampler=test_sampler)

    model = Net().to(device)  # float32 master weights; autocast runs the math in amp_dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * size, momentum=args.momentum)
    optimizer = hl.DistributedLocalOptimizer(optimizer, model.named_parameters(),
                                             period=args.period, warmup_steps=args.warmup_steps)
    scaler = torch.amp.GradScaler(device.type)

    ckpt_path = os.path.join(args.checkpoint_dir, f"ckpt.rank{rank}.pt")
    start_epoch = 1
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"] + 1
        print(f"rank {rank}: resumed from {ckpt_path}, continuing at epoch {start_epoch}",
              flush=True)
    else:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    test_accuracy = None
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        train_sampler.set_epoch(epoch)
        for data, target in train_loader:
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=amp_dtype):
                output = model(data)
                loss = F.cross_entropy(output, target)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.join()  # every rank now holds the same averaged model

        model.eval()
        correct, loss_sum = 0.0, 0.0
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype):
            for data, target in test_loader:
                data, target = data.to(device), target.to(device)
                output = model(data)
                loss_sum += F.cross_entropy(output, target, reduction="sum").item()
                correct += output.argmax(dim=1).eq(target).sum().item()
        test_loss = hvd.allreduce(torch.tensor(loss_sum / len(test_sampler)),
                                  name="avg_loss").item()
        test_accuracy = hvd.allreduce(torch.tensor(correct / len(test_sampler)),
                                      name="avg_accuracy").item()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch}, ckpt_path)
        if rank == 0:
            st = optimizer.sync_stats()
            print(f"epoch {epoch}: test loss {test_loss:.4f}, test accuracy {test_accuracy:.4f}, "
                  f"loss scale {scaler.get_scale():.0f}, steps {st.steps}, syncs {st.syncs}",
                  flush=True)
    if rank == 0 and test_accuracy is not None:
        print(f"final accuracy {test_accuracy:.4f} (rank 0, autocast {args.dtype})", flush=True)


if __name__ == "__main__":
    main()
