"""Two real training tasks on data already on the machine (no downloads), for the benchmarks.

* ``CharLM``: a byte-level LSTM language model on CPython's own standard-library sources
  (``sysconfig.get_paths()['stdlib']``), deterministic file list, fixed-size corpus, train /
  held-out split by file; metric: held-out perplexity per byte (lower is better).
* ``Digits``: a wide MLP on scikit-learn's bundled ``load_digits`` (8x8 handwritten digits);
  metric: held-out accuracy (higher is better).

Each rank trains on its own shard of the training data (rank-strided: example ``j`` goes to rank
``j % size``); every rank sees the same held-out set. A task is framework-level only (models, data,
loss, evaluation); ``benchmarks/compare.py`` owns the optimizers and the distributed loop.

Example (single process)::

    from examples.tasks import make_task
    task = make_task("digits")
    model = task.build_model(seed=0)
    batches = task.train_batches(rank=0, size=1, seed=0)
    x, y = next(batches)
    loss = task.loss(model, (x, y)); loss.backward()
    print(task.metric_name, task.metric_from_sums(task.eval_sums(model, part=0, parts=1)))
"""
from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CharLM", "Digits", "make_task", "TASKS"]


def _epoch_batches(n: int, batch: int, seed: int, rank: int) -> Iterator[np.ndarray]:
    """Index batches over ``range(n)``, reshuffled every epoch, deterministic in (seed, rank)."""
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, rank, epoch])
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]
        epoch += 1


# ---------------------------------------------------------------------------------------------
# (a) byte-level LSTM language model on the standard library's sources
# ---------------------------------------------------------------------------------------------
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_corpus(budget_bytes: int = 1_500_000, heldout_every: int = 10):
    """(train bytes, held-out bytes, info). Files: every ``*.py`` under the stdlib, test suites
    and site-packages excluded, sorted by relative path; taken in that order while the total
    stays <= ``budget_bytes``. File ``k`` of that list is held out if ``k % heldout_every ==
    heldout_every - 1`` (a split by file). Files are joined with a NUL separator."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _EXCLUDED_DIRS]  # prune (site-packages is big)
        found += [Path(d) / n for n in names if n.endswith(".py")]
    files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    train, held, used, total = [], [], [], 0
    for p in files:
        data = p.read_bytes()
        if total + len(data) > budget_bytes:
            if total >= 0.9 * budget_bytes:
                break
            continue  # a big file: skip it, smaller ones may still fit
        (held if len(used) % heldout_every == heldout_every - 1 else train).append(data)
        used.append(p.relative_to(root).as_posix())
        total += len(data)
    if total < 100_000:
        raise RuntimeError(f"stdlib corpus too small ({total} bytes under {root})")
    train_b, held_b = b"\0".join(train), b"\0".join(held)
    info = {"root": str(root), "files": len(used), "train_files": len(train),
            "heldout_files": len(held), "train_bytes": len(train_b),
            "heldout_bytes": len(held_b), "first_file": used[0], "last_file": used[-1],
            "sha1": hashlib.sha1(train_b + b"\1" + held_b).hexdigest()[:16]}
    return train_b, held_b, info


class _LSTMLM(torch.nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, emb)
        self.lstm = torch.nn.LSTM(emb, hidden, num_layers=layers, batch_first=True)
        self.decoder = torch.nn.Linear(hidden, vocab)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.decoder(out)


class CharLM:
    """Byte-level LSTM LM; metric: held-out perplexity per byte (exp of the mean CE).

    The inner optimizer is AdaGrad (Horovod baseline, local SGD, ADPSGD, SlowMo) or Local
    AdaAlter (ours), as in the AdaAlter paper's LSTM LM experiment."""

    name = "charlm"
    metric_name = "held-out perplexity"
    metric_short = "ppl"
    higher_is_better = False
    vocab = 256  # bytes

    def __init__(self, emb: int = 64, hidden: int = 384, layers: int = 1, seq: int = 64,
                 batch: int = 16, corpus_bytes: int = 1_500_000, eval_seqs: int = 256):
        self.emb, self.hidden, self.layers, self.seq, self.batch = emb, hidden, layers, seq, batch
        train, held, self.data_info = stdlib_corpus(corpus_bytes)
        self.train = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
        heldout = torch.frombuffer(bytearray(held), dtype=torch.uint8).long()
        # Training examples: non-overlapping windows of seq + 1 bytes.
        self.n_train = (len(self.train) - 1) // seq
        # Held-out: eval_seqs windows, evenly spaced over the held-out text.
        starts = np.linspace(0, len(heldout) - seq - 1, eval_seqs).astype(np.int64)
        self.eval_x = torch.stack([heldout[s:s + seq + 1] for s in starts])

    def config(self) -> dict:
        return {"emb": self.emb, "hidden": self.hidden, "layers": self.layers, "seq": self.seq,
                "batch_per_rank": self.batch, "eval_tokens": int(self.eval_x[:, 1:].numel()),
                "data": self.data_info}

    def build_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return _LSTMLM(self.vocab, self.emb, self.hidden, self.layers)

    def train_batches(self, rank: int, size: int, seed: int) -> Iterator[torch.Tensor]:
        shard = np.arange(rank, self.n_train, size)  # rank-strided windows
        for idx in _epoch_batches(len(shard), self.batch, seed, rank):
            starts = torch.from_numpy(shard[idx] * self.seq)
            yield self.train[starts[:, None] + torch.arange(self.seq + 1)]

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.vocab), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def eval_sums(self, model, part: int, parts: int) -> list:
        """[sum of CE over tokens, tokens] over this part (1/parts) of the held-out set."""
        x = self.eval_x[part::parts]
        logits = model(x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, self.vocab), x[:, 1:].reshape(-1), reduction="sum")
        return [float(ce), float(x[:, 1:].numel())]

    @staticmethod
    def metric_from_sums(sums) -> float:
        return math.exp(sums[0] / sums[1])

    def samples_per_step(self) -> int:
        return self.batch


# ---------------------------------------------------------------------------------------------
# (b) a wide MLP on scikit-learn's digits
# ---------------------------------------------------------------------------------------------
class Digits:
    """MLP 64 -> hidden -> hidden2 -> 10 on ``sklearn.datasets.load_digits`` (1797 images,
    stratified 80/20 split, fixed seed; features standardised on the training split); metric:
    held-out accuracy. Inner optimizer: SGD with momentum."""

    name = "digits"
    metric_name = "held-out accuracy"
    metric_short = "acc"
    higher_is_better = True

    def __init__(self, hidden: int = 1024, hidden2: int = 512, batch: int = 32,
                 heldout_fraction: float = 0.2):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        self.hidden, self.hidden2, self.batch = hidden, hidden2, batch
        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=heldout_fraction, random_state=0,
                                              stratify=y)
        mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
        self.Xtr = torch.tensor((Xtr - mu) / sd, dtype=torch.float32)
        self.ytr = torch.tensor(ytr, dtype=torch.long)
        self.Xte = torch.tensor((Xte - mu) / sd, dtype=torch.float32)
        self.yte = torch.tensor(yte, dtype=torch.long)

    def config(self) -> dict:
        return {"hidden": [self.hidden, self.hidden2], "batch_per_rank": self.batch,
                "data": {"dataset": "sklearn load_digits", "train": len(self.ytr),
                         "heldout": len(self.yte)}}

    def build_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(64, self.hidden), torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, self.hidden2), torch.nn.ReLU(),
            torch.nn.Linear(self.hidden2, 10))

    def train_batches(self, rank: int, size: int, seed: int):
        shard = np.arange(rank, len(self.ytr), size)  # rank-strided examples
        for idx in _epoch_batches(len(shard), self.batch, seed, rank):
            j = torch.from_numpy(shard[idx])
            yield self.Xtr[j], self.ytr[j]

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def eval_sums(self, model, part: int, parts: int) -> list:
        x, y = self.Xte[part::parts], self.yte[part::parts]
        return [float((model(x).argmax(1) == y).sum()), float(len(y))]

    @staticmethod
    def metric_from_sums(sums) -> float:
        return sums[0] / sums[1]

    def samples_per_step(self) -> int:
        return self.batch


TASKS = {"charlm": CharLM, "digits": Digits}


def make_task(name: str, **kwargs):
    return TASKS[name](**kwargs)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
