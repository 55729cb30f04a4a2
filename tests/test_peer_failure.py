"""The heartbeat watch that names lost ranks (horovod_local.peer_failure), against Horovod's own
rendezvous server (the key-value store horovodrun --gloo runs), in one process: a heartbeat
that keeps beating is alive, one that stopped (or never started) is lost. The multi-process
behaviour (a rank killed or gone mid-sync) is tested in tests/test_killed_rank.py."""
from __future__ import annotations

import time

import pytest

from horovod_local import peer_failure as pf


@pytest.fixture()
def store(monkeypatch):
    from horovod.runner.http.http_server import RendezvousServer

    server = RendezvousServer(verbose=0)
    port = server.start()
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", "127.0.0.1")
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_PORT", str(port))
    monkeypatch.delenv("HOROVOD_ELASTIC", raising=False)
    monkeypatch.delenv(pf.HEARTBEAT_ENV, raising=False)
    yield ("127.0.0.1", port)
    server.stop()


def test_beating_ranks_are_alive_stopped_ones_lost(store, monkeypatch):
    me = pf.Heartbeat(store, rank=0, size=4)
    peer = pf.Heartbeat(store, rank=1, size=4)  # keeps beating (its daemon thread)
    dead = pf.Heartbeat(store, rank=2, size=4)
    monkeypatch.setattr(dead, "_put", lambda value: False)  # ...and rank 2's stops: "killed"
    # rank 3 never started beating
    t0 = time.monotonic()
    assert me.lost([0, 1, 2, 3]) == [2, 3]
    assert 2.5 <= time.monotonic() - t0 < 10  # watched for three 1 s intervals
    assert me.lost([0, 1]) == []  # returns as soon as every other rank's counter moved
    assert peer.interval == 1.0 and pf.Heartbeat(store, 5, size=1000).interval == 5.0


def test_no_store_no_heartbeat(monkeypatch):
    monkeypatch.delenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", raising=False)  # e.g. under mpirun
    assert pf._store() is None
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_ADDR", "127.0.0.1")
    monkeypatch.setenv("HOROVOD_GLOO_RENDEZVOUS_PORT", "1")
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")  # elastic: Horovod handles membership
    assert pf._store() is None
    monkeypatch.delenv("HOROVOD_ELASTIC")
    monkeypatch.setenv(pf.HEARTBEAT_ENV, "0")
    assert pf._store() is None


def test_failure_message_names_lost_ranks(store, monkeypatch):
    from horovod.common.exceptions import HorovodInternalError

    me = pf.Heartbeat(store, rank=0, size=3)
    monkeypatch.setattr(pf, "_heartbeat", me)
    with pytest.raises(HorovodInternalError,
                       match=r"the sync round at step 7 failed on rank 0: rank\(s\) \[1, 2\] of "
                             r"\[0, 1, 2\] were lost .* Horovod said: boom"):
        with pf.reporting_lost_ranks(0, [0, 1, 2], "the sync round at step 7"):
            raise HorovodInternalError("boom")
    monkeypatch.setattr(pf, "_heartbeat", None)  # no store: the error is left as it was
    with pytest.raises(HorovodInternalError, match="^boom$"):
        with pf.reporting_lost_ranks(0, [0, 1, 2], "x"):
            raise HorovodInternalError("boom")
