"""The wire protocol of a sync round, shared by the PyTorch and TensorFlow front ends.

Every round sends one buffer per dtype (names ``horovod_local.sync.<dtype>``, reused each round,
so a rank in another kind of round gets Horovod's shape-mismatch error rather than a hang). One
buffer carries one extra *control element*: 1.0 if the sending rank has joined, 0.0 otherwise,
and ``GRADIENT_ROUND`` in a warm-up (gradient) round. Its sum over the ranks tells everyone how
many have joined, and a sum that fits neither kind means ranks are in different kinds of rounds,
which must fail rather than average gradients with parameters. The PyTorch front end also ends
every buffer with a *guard* element (see ``horovod_local.torch.ops``).
"""
from __future__ import annotations

from typing import Sequence

SYNC_NAME = "horovod_local.sync.{}"
DEVIATION_NAME = "horovod_local.deviation"
GRADIENT_ROUND = 1024.0

# The control element goes into the widest dtype's buffer, where small integers are exact.
CONTROL_PREFERENCE = ("float64", "float32", "bfloat16", "float16")

ROUND_KIND_MISMATCH = (
    "horovod_local: ranks are in different kinds of rounds (some allreduce gradients in "
    "warm-up, others sync parameters). This happens when a rank calls join() or "
    "synchronize() while others are still in warm-up, or when ranks were built with "
    "different warmup_steps. Give every rank the same warmup_steps and call join() only "
    "after warm-up.")


def control_bucket_index(dtype_names: Sequence[str]) -> int:
    """Index of the bucket (by dtype name, e.g. 'float32') that carries the control element."""
    for name in CONTROL_PREFERENCE:
        if name in dtype_names:
            return list(dtype_names).index(name)
    raise TypeError(f"horovod_local syncs floating-point tensors only; got dtypes "
                    f"{sorted(dtype_names)}")


def round_kinds_agree(control_sum, n: int, gradient_round: bool):
    """Whether the summed control element fits the round this rank is in. Plain arithmetic and
    comparisons only, so it works on Python floats and, in-graph, on tf tensors alike."""
    if gradient_round:
        return abs(control_sum - n * GRADIENT_ROUND) < 0.5
    return control_sum < GRADIENT_ROUND - 0.5
