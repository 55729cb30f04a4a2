"""Two-level averaging: the groups (one per host by default) and their Horovod process sets,
for both front ends. ``hvd`` is the front end's Horovod module, ``gather(obj)`` its allgather of
a Python object over the wrapper's process set (rank order)."""
from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Sequence

__all__ = ["host_groups", "check_partition", "local_process_set"]

_DYNAMIC = ("local_period: grouping the ranks by host needs Horovod's dynamic process sets: call "
            "hvd.init(process_sets='dynamic') (or set HOROVOD_DYNAMIC_PROCESS_SETS=1), or "
            "register one process set per host at hvd.init(process_sets=[...]) and pass it as "
            "local_process_set=. Horovod said: ")


def host_groups(hosts: Sequence[str], ranks: Sequence[int]) -> list[list[int]]:
    """Ranks grouped by host name, groups in order of their lowest rank."""
    groups: dict[str, list[int]] = {}
    for host, r in zip(hosts, ranks):
        groups.setdefault(host, []).append(r)
    return list(groups.values())


def check_partition(reported: Sequence[Sequence[int]], ranks: Sequence[int]) -> list[list[int]]:
    """Every rank's reported group (its ``local_process_set``'s ranks) must contain it, and the
    members of a group must all report that same group: the groups partition the ranks."""
    by_rank = {r: sorted(g) for r, g in zip(ranks, reported)}
    for r, g in by_rank.items():
        if r not in g:
            raise ValueError(f"local_process_set: rank {r}'s set {g} does not contain it")
        for other in g:
            if other not in by_rank:
                raise ValueError(f"local_process_set: rank {r}'s set {g} contains rank {other}, "
                                 f"which is not in the optimizer's process set {list(ranks)}")
            if by_rank[other] != g:
                raise ValueError(f"local_process_set: the sets must partition the ranks, but "
                                 f"rank {r} is in {g} and rank {other} in {by_rank[other]}")
    out: list[list[int]] = []
    for r in ranks:
        if by_rank[r] not in out:
            out.append(by_rank[r])
    return out


def local_process_set(hvd: Any, process_set: Any, given: Optional[Any],
                      gather: Callable[[Any], list]) -> tuple[Any, list[list[int]]]:
    """This rank's group's process set, and all groups. Collective over ``process_set``."""
    ranks = list(process_set.ranks) if getattr(process_set, "ranks", None) \
        else list(range(hvd.size()))
    if given is not None:
        if not given.included():
            raise ValueError(f"local_process_set: this rank ({hvd.rank()}) is not a member of "
                             f"{given!r}")
        return given, check_partition(gather(sorted(given.ranks)), ranks)
    groups = host_groups(gather(socket.gethostname()), ranks)
    mine = None
    for g in groups:  # the same order on every rank: add_process_set is collective
        if g == ranks:
            ps = process_set
        elif g == list(range(hvd.size())):
            ps = hvd.global_process_set
        else:
            try:
                ps = hvd.add_process_set(g)
            except ValueError as e:
                raise ValueError(_DYNAMIC + str(e)) from e
        if hvd.rank() in g:
            mine = ps
    return mine, groups
