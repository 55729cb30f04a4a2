"""The wire protocol of a sync round, shared by the PyTorch and TensorFlow front ends.

Every round sends one buffer per dtype (names ``horovod_local.sync.<dtype>``, reused each round,
so a rank in another kind of round gets Horovod's shape-mismatch error rather than a hang). One
buffer carries one extra *control element*: 1.0 if the sending rank has joined, 0.0 otherwise,
and ``GRADIENT_ROUND`` in a warm-up (gradient) round. Its sum over the ranks tells everyone how
many have joined, and a sum that fits neither kind means ranks are in different kinds of rounds,
which must fail rather than average gradients with parameters. The same buffer carries a second
control element, the *round number* (rounds this rank entered before, modulo ``round_modulus``):
a sum other than ``n`` times one's own means the ranks are in different rounds (a rank finished
without ``join()``); and a third, 1 in an explicit ``average_parameters()`` round: ranks that
have not joined must agree on it (a one-rank ``average_parameters()`` meets a scheduled round). The PyTorch front end also ends
every buffer with a *guard* element (see ``horovod_local.torch.ops``).
"""
from __future__ import annotations

from typing import Sequence

SYNC_NAME = "horovod_local.sync.{}"
DEVIATION_NAME = "horovod_local.deviation"
GRADIENT_ROUND = 1024.0

# significand bits: integers up to 2**p are exact
_SIGNIFICAND = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
CONTROL_ELEMENTS = 3  # joined / round kind, round number, explicit round

EXPLICIT_MISMATCH = (
    "horovod_local: ranks are in different kinds of sync rounds: some called "
    "average_parameters() while others are in a scheduled round (a rank called "
    "average_parameters() alone). Call average_parameters() on every rank of the process set, "
    "at the same point.")


def explicit_rounds_agree(explicit_sum, joined_sum, n: int, explicit: bool):
    """Ranks that have not joined are all in an explicit round, or none is; joined ranks (who
    send 0) pair with either. Plain arithmetic: works on floats and tensors."""
    if explicit:
        return abs(explicit_sum - (n - joined_sum)) < 0.5
    return explicit_sum < 0.5

def round_mismatch(mine, m: int, total, n: int) -> list:
    """The message parts (strings and scalars) of a round-number mismatch."""
    return ["horovod_local: ranks are in different sync rounds: this rank is in round ", mine,
            f" (mod {m}) but the round numbers sum to ", total, f" over {n} ranks. A rank "
            "called average_parameters() alone, or finished its data without join() while "
            "another rank still syncs. Call average_parameters() on every rank, and join() on "
            "every rank when its data ends."]


def round_modulus(dtype_name: str, n: int) -> int:
    """The largest power of two M with n * M exact in ``dtype_name`` (capped at 2**40); 0 when
    it is under 64 (the round check is off: a 16-bit control buffer on many ranks)."""
    m = 1 << 40
    while m * n > (1 << _SIGNIFICAND[dtype_name]):
        m >>= 1
    return m if m >= 64 else 0


def rounds_agree(round_sum, n: int, mine: int):
    """Whether the summed round numbers are n times this rank's (works on floats and tensors)."""
    return abs(round_sum - n * mine) < 0.5


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
