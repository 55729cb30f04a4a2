"""Naming the rank that was lost when a sync round fails.

When a rank dies, the survivors' collective fails (Horovod raises ``HorovodInternalError``), but
no survivor is told *which* peer is gone, and Horovod's Gloo launcher reports the first process
that exited, which can be a survivor whose sync broke a few milliseconds before the dead rank's
exit was noticed, and says nothing at all about a rank that left with exit status 0. So every
rank of a wrapper runs a heartbeat: a daemon thread that bumps a counter under its rank in the
launcher's own key-value store (the Gloo rendezvous server every ``horovodrun --gloo`` worker
already talks to) every ``interval`` seconds (1 s, longer for large jobs: ``size / 200`` s, so
the store sees about 200 writes a second at most). When a collective fails, the survivor watches
the counters for three intervals: ranks whose counter did not move are named as lost. The wait
also lets the launcher see the dead rank exit first, so its report names the same rank.

A heartbeat survives a rank whose main thread is stuck (only a dead process stops beating).
A process that exits normally writes ``-1`` as its last beat, so a peer that simply finished
(its data ended without ``join()``) is named as such rather than as a lost process.
Under MPI there is no such store (``mpirun`` names the dead rank itself) and under elastic
training recovery is Horovod's job, so nothing runs and errors are re-raised unchanged there.
``HOROVOD_LOCAL_HEARTBEAT=0`` turns it off.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

__all__ = ["HEARTBEAT_ENV", "Heartbeat", "lost_ranks", "reporting_lost_ranks", "start_heartbeat"]

HEARTBEAT_ENV = "HOROVOD_LOCAL_HEARTBEAT"
_SCOPE = "horovod_local_heartbeat"
_MAX_WRITES_PER_SECOND = 200.0
_EXITED = -1  # the last beat of a process that exits normally


def _store() -> Optional[tuple[str, int]]:
    addr = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
    port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    if (not addr or not port or os.environ.get("HOROVOD_ELASTIC") == "1"
            or os.environ.get(HEARTBEAT_ENV, "1") == "0"):
        return None
    return addr, int(port)


def _read(store: tuple[str, int], rank: int) -> Optional[int]:
    from horovod.runner.http.http_client import read_data_from_kvstore

    try:
        return int(read_data_from_kvstore(store[0], store[1], _SCOPE, str(rank)))
    except (RuntimeError, ValueError):  # not there (404) or the store is gone
        return None


class Heartbeat:
    """This process's heartbeat (one per process, shared by every wrapper in it)."""

    def __init__(self, store: tuple[str, int], rank: int, size: int) -> None:
        self.store, self.rank = store, rank
        self.interval = max(1.0, size / _MAX_WRITES_PER_SECOND)
        self._stopped = False
        self._beat = self._put(0)
        if self._beat:
            threading.Thread(target=self._run, name="horovod_local-heartbeat", daemon=True).start()
            atexit.register(self._exit)

    def _exit(self) -> None:
        """At a normal interpreter exit: the last beat says "finished", not "lost"."""
        self._stopped = True
        self._put(_EXITED)

    def _put(self, value: int) -> bool:
        from horovod.runner.http.http_client import put_data_into_kvstore

        try:
            put_data_into_kvstore(self.store[0], self.store[1], _SCOPE, str(self.rank),
                                  str(value).encode())
            return True
        except RuntimeError:
            return False  # the launcher is gone: nobody to tell

    def _run(self) -> None:
        n = 0
        while True:
            time.sleep(self.interval)
            n += 1
            if self._stopped or not self._put(n):
                return

    def lost(self, ranks: Sequence[int]) -> list[int]:
        """The ranks among ``ranks`` whose heartbeat does not move within three intervals."""
        others = [r for r in ranks if r != self.rank]
        first = {r: _read(self.store, r) for r in others}
        deadline = time.monotonic() + 3 * self.interval
        missing = list(others)
        while missing and time.monotonic() < deadline:
            time.sleep(0.1)
            missing = [r for r in missing
                       if _read(self.store, r) in (None, first[r], _EXITED)]
        return missing

    def exited(self, ranks: Sequence[int]) -> list[int]:
        """The ranks among ``ranks`` whose process exited normally."""
        return [r for r in ranks if _read(self.store, r) == _EXITED]


_heartbeat: Optional[Heartbeat] = None
_lock = threading.Lock()


def start_heartbeat(rank: int, size: int) -> Optional[Heartbeat]:
    """Start this process's heartbeat if there is a store to beat into (idempotent)."""
    global _heartbeat
    with _lock:
        if _heartbeat is None:
            store = _store()
            if store is not None:
                _heartbeat = Heartbeat(store, rank, size)
        return _heartbeat


def lost_ranks(ranks: Sequence[int]) -> Optional[list[int]]:
    """Ranks among ``ranks`` whose process is gone; ``None`` if that cannot be told here."""
    return _heartbeat.lost(ranks) if _heartbeat is not None else None


@contextlib.contextmanager
def reporting_lost_ranks(rank: int, ranks: Sequence[int], what: str) -> Iterator[None]:
    """Around a collective: if it fails with ``HorovodInternalError``, re-raise it (same type,
    so elastic handlers still catch it) with the lost ranks named.

    Args:
        rank: this process's global rank.
        ranks: the global ranks taking part in the collective (the process set).
        what: the collective, for the message (e.g. "the sync round at step 12").
    """
    from horovod.common.exceptions import HorovodInternalError

    try:
        yield
    except HorovodInternalError as err:
        lost = lost_ranks(ranks)
        if lost is None:
            raise
        finished = _heartbeat.exited(lost) if lost else []
        if finished:
            msg = (f"horovod_local: {what} failed on rank {rank}: rank(s) {finished} of "
                   f"{sorted(ranks)} finished (their process exited normally) while this rank "
                   f"was still training: a rank whose data ends must call join() (every rank "
                   f"calls it once), so that it serves the other ranks' rounds until all "
                   f"have joined.")
            others = [r for r in lost if r not in finished]
            if others:
                msg += f" Rank(s) {others} were lost (their heartbeat stopped)."
        elif lost:
            msg = (f"horovod_local: {what} failed on rank {rank}: rank(s) {lost} of "
                   f"{sorted(ranks)} were lost (their heartbeat stopped).")
        else:
            msg = (f"horovod_local: {what} failed on rank {rank}; every rank of "
                   f"{sorted(ranks)} is still alive (heartbeats), so the failure is not a lost "
                   f"process.")
        print(msg, file=sys.stderr, flush=True)
        raise HorovodInternalError(f"{msg} Horovod said: {err}") from err
