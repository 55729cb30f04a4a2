"""Replica fingerprints: what every rank must agree on before the first sync, and the message
naming the first difference. Framework-free (plain Python values), shared by the PyTorch and
Keras front ends; each front end builds its fingerprint and gathers everyone's.

A fingerprint is a list of ``(kind, name, value)`` tuples, e.g. ``("config", "warmup_steps",
100)`` or ``("parameter", "fc.weight", ((4, 6), "float64"))``, in an order every rank computes
the same way (configuration first, then the synced tensors in buffer order). Values must be
picklable and comparable with ``==``.

Why: ranks built differently (another layer size, period or optimizer) would otherwise hang in
the first sync, fail there with Horovod's shape error, or, worst, silently average unrelated
tensors of equal size. Checking once, up front, costs one small allgather.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

__all__ = ["Entry", "first_difference", "check_fingerprints"]

Entry = tuple[str, str, Any]

DEFAULT_HINT = ("Every rank must build the same model (same names, shapes, dtypes, order) and "
                "the same DistributedLocalOptimizer arguments.")


def _describe(entry: Entry) -> str:
    return f"{entry[0]} {entry[1]!r} = {entry[2]!r}"


def first_difference(everyone: Sequence[Sequence[Entry]]) -> Optional[str]:
    """The first entry (in fingerprint order, then rank order) where some rank differs from rank
    0, as a message; None if all fingerprints are equal.

    Entry order first, so that a configuration difference is reported before the parameter
    differences it usually causes; every rank gets the same list and so the same message.
    """
    if len(everyone) < 2:
        return None
    ref = list(everyone[0])
    others = [list(fp) for fp in everyone[1:]]
    longest = max(len(ref), *(len(fp) for fp in others))
    for i in range(longest):
        a = ref[i] if i < len(ref) else None
        for r, theirs in enumerate(others, start=1):
            b = theirs[i] if i < len(theirs) else None
            if a == b:
                continue
            if a is None:
                return (f"rank 0 has {len(ref)} fingerprint entries, rank {r} has more: its next "
                        f"is {_describe(b)}")
            if b is None:
                return (f"rank {r} has {len(theirs)} fingerprint entries, rank 0 has more: its "
                        f"next is {_describe(a)}")
            if a[:2] == b[:2]:
                return (f"ranks disagree on {a[0]} {a[1]!r}: rank 0 has {a[2]!r}, rank {r} has "
                        f"{b[2]!r}")
            return (f"ranks disagree at entry {i}: rank 0 has {_describe(a)}, rank {r} has "
                    f"{_describe(b)}")
    return None


def check_fingerprints(everyone: Sequence[Sequence[Entry]], hint: str = DEFAULT_HINT) -> None:
    """Raise ``ValueError`` naming the first difference between the ranks' fingerprints."""
    diff = first_difference(everyone)
    if diff is not None:
        raise ValueError(f"horovod_local: {diff}. {hint}")
