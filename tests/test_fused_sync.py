"""The PyTorch backend's buffer layout and the pipeline's finiteness proof (no Horovod: the
allreduce is replaced by the sum of the ranks' packed buffers, which is what op=Sum computes)."""
from __future__ import annotations

import pytest
import torch

from horovod_local.core.config import SyncConfig
from horovod_local.core.ops import ParamSlot
from horovod_local.core.pipeline import RoundPipeline
from horovod_local.schedules import Constant
from horovod_local.torch.ops import TorchOps
from horovod_local.stats import SyncStats


class _Counters:
    def __init__(self):
        self.stats = SyncStats()

    def get(self, name):
        return getattr(self.stats, name)

    def add(self, name, value):
        setattr(self.stats, name, getattr(self.stats, name) + value)

    def set(self, name, value):
        setattr(self.stats, name, value)


PIPELINE = RoundPipeline(SyncConfig(Constant(4)), TorchOps(process_set=None), _Counters())


class FusedSync:
    """The pipeline's finiteness check, as the old FusedSync spelled it."""

    @staticmethod
    def check_finite(buckets, bufs, step):
        assert PIPELINE.verify_finite(buckets, bufs, step, "sync")


def summed(per_rank: list[list[torch.Tensor]], dtype=torch.float32, control: bool = True):
    """Pack every rank's tensors as the sync does and sum the buffers (the allreduce's result)."""
    out, bucket = None, None
    for rank, tensors in enumerate(per_rank):
        slots = [ParamSlot(f"layer{j}.weight", t.to(dtype)) for j, t in enumerate(tensors)]
        (bucket,) = PIPELINE.plan(slots)
        bucket.has_control = control
        buf = PIPELINE.ops.pack(bucket, control=(float(rank == 1), 7.0, 0.0))
        out = buf.clone() if out is None else out + buf
    return bucket, out


def test_layout_data_control_round_guard():
    a = [torch.tensor([1.0, -5.0]), torch.tensor([[2.0], [3.0]])]
    b = [torch.tensor([0.5, 0.5]), torch.tensor([[-7.0], [1.0]])]
    bucket, buf = summed([a, b])
    # data, control elements (joined, round number 7 on both ranks, explicit), guard
    assert buf.tolist() == [1.5, -4.5, -5.0, 4.0, 1.0, 14.0, 0.0, 5.0 + 7.0]
    assert buf.numel() == 8 and bucket.data_numel() == 4


def test_finite_sum_is_proved_by_one_read(monkeypatch):
    g = torch.Generator().manual_seed(0)
    ranks = [[torch.randn(1000, generator=g), torch.randn(30, 3, generator=g)] for _ in range(3)]
    bucket, buf = summed(ranks)

    def no_full_pass(*_a, **_k):
        raise AssertionError("the finite case must not search the buffer")

    monkeypatch.setattr(torch, "isfinite", no_full_pass)
    FusedSync.check_finite([bucket], [buf], step=7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_on_one_rank_names_the_tensor(bad):
    ranks = [[torch.ones(10), torch.ones(20)] for _ in range(2)]
    ranks[1][1][13] = bad
    bucket, buf = summed(ranks)
    with pytest.raises(FloatingPointError, match=r"step 12: .*'layer1\.weight'"):
        FusedSync.check_finite([bucket], [buf], step=12)


def test_float16_overflow_of_the_sum_is_caught():
    # finite on every rank, but 40000 + 40000 overflows float16 (max 65504)
    ranks = [[torch.ones(4), torch.full((3,), 40000.0)] for _ in range(2)]
    bucket, buf = summed(ranks, dtype=torch.float16)
    assert torch.isinf(buf[-1])  # the guard overflowed too, so the search ran
    with pytest.raises(FloatingPointError, match=r"'layer1\.weight'"):
        FusedSync.check_finite([bucket], [buf], step=3)


def test_large_but_finite_float16_sum_passes():
    # guard sum 40000 > max/2: no proof from the guard, the search finds every element finite
    ranks = [[torch.full((3,), 20000.0), torch.full((2,), -20000.0)] for _ in range(2)]
    bucket, buf = summed(ranks, dtype=torch.float16)
    assert float(buf[-1]) == 40000.0
    FusedSync.check_finite([bucket], [buf], step=3)
