"""sfrik_scale.health's failure attribution alone (the trainer asks it whom to blame when it raises);
the watchdog itself, with killed ranks, is in tests/test_reliability.py."""
from __future__ import annotations

import time

import pytest

from sfrik_scale.comm import is_communication_error
from sfrik_scale.errors import RaisedOnEveryRank
from sfrik_scale.health import RankHealth


@pytest.mark.parametrize("err, expected", [
    (ConnectionError("reset"), True), (TimeoutError(), True),
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
    (RuntimeError("NCCL error: unhandled system error"), True),
    (RuntimeError("CUDA out of memory"), False), (ValueError("connection"), False), (KeyError("x"), False),
])
def test_communication_errors_are_told_from_our_own(err, expected):
    assert is_communication_error(err) is expected


class _EveryRank(RaisedOnEveryRank, ValueError):
    pass


def _pair(tmp_path, peer_timeout_s: float):
    """This rank (0) and its peer (1) of a 2-rank session, without a process group or heartbeat thread."""
    me = RankHealth(tmp_path, rank=0, world_size=2, peer_timeout_s=peer_timeout_s, interval_s=1000)
    peer = RankHealth(tmp_path, rank=1, world_size=2, peer_timeout_s=1000, interval_s=1000)
    me.dir = peer.dir  # one session (without a process group each picked its own)
    return me, peer


@pytest.fixture
def pair(tmp_path):
    me, peer = _pair(tmp_path, peer_timeout_s=1000)
    yield me, peer
    peer.close()
    me.close()


def test_nobody_is_blamed_alone_or_for_an_error_every_rank_raises(tmp_path, pair):
    alone = RankHealth(tmp_path / "one", rank=0, world_size=1, peer_timeout_s=10)
    try:
        assert alone.peers_to_blame(ConnectionError("reset")) == ""
    finally:
        alone.close()
    me, peer = pair
    peer.mark("failed", "ValueError: boom")
    assert me.peers_to_blame(_EveryRank("bad input")) == ""


def test_a_peer_that_failed_first_is_named(pair):
    me, peer = pair
    assert me.peers_to_blame(RuntimeError("our own bug")) == ""  # the peer is alive
    peer.set_step(12)
    peer.mark("failed", "ValueError: boom")
    text = me.peers_to_blame(RuntimeError("our own bug"))
    assert text.startswith("rank 1 failed: raised: ValueError: boom") and "at step 12" in text
    assert me.peers_to_blame(ConnectionError("reset by peer")) == text


def test_a_broken_collective_waits_until_the_silent_peer_is_named(tmp_path):
    me, peer = _pair(tmp_path, peer_timeout_s=0.5)  # the peer's record is not refreshed: it goes stale
    try:
        assert me.peers_to_blame(RuntimeError("our own bug")) == ""  # no waiting: the peer looks alive
        start = time.time()
        text = me.peers_to_blame(ConnectionError("reset by peer"))
        assert text.startswith("rank 1 failed: no heartbeat for") and time.time() - start >= 0.4
    finally:
        peer.close()
        me.close()


def test_a_broken_collective_is_told_in_one_short_clause():
    """What a rank says of its own broken collective once it has named the peer that failed:
    gloo's message without its source location and advice; other errors kept, bounded."""
    from sfrik_scale.comm import short_error

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                        "[127.0.0.1]:43398: Connection reset by peer. This is typically caused by a remote "
                        "worker hanging or bugs in the application. Check the logs of the remote worker.")
    assert short_error(gloo) == "RuntimeError: Read error [127.0.0.1]:43398: Connection reset by peer"
    assert short_error(ValueError("bad. value")) == "ValueError: bad. value"  # not a collective: whole
    assert len(short_error(ValueError("x" * 500))) == 160 and short_error(KeyError()) == "KeyError"
