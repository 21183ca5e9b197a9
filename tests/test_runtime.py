"""The gevent runtime in this process: a one-node Runtime on MemoryStorage whose disk can be made to hang, so
the request bounds can be seen working: a write that cannot be saved times out in its own time (not the disk's),
and stopping the node fails every waiting request rather than leaving it hanging."""

from __future__ import annotations

import random
import time

import gevent
import pytest

from raftlib import Config, Entry, EntryKind, HardState, Member, Membership, MemoryStorage, RaftNode, Role
from raftlib.runtime import Runtime, Stopped, Timeout
from runtime_fakes import NullTransport, Values


class HangingStorage(MemoryStorage):
    """MemoryStorage whose save() blocks (cooperatively) while `hang` is set, like a disk that stopped."""

    def __init__(self):
        super().__init__()
        self.hang = False

    def save(self, *args, **kwargs):
        while self.hang:
            gevent.sleep(0.01)
        super().save(*args, **kwargs)


@pytest.fixture
def one_node():
    storage = HangingStorage()
    me = Member("a", "127.0.0.1:1", "127.0.0.1:2")
    storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership(("a",), (), (me,)))])
    stored = storage.load()
    node = RaftNode(Config("a", election_ticks=4, heartbeat_ticks=1), random.Random(1), stored.hard_state,
                    stored.raft_log(), stored.snapshot)
    values = Values()
    runtime = Runtime(node, storage, NullTransport(), values, tick_seconds=0.005)
    runtime.start()
    with gevent.Timeout(5):
        while node.role is not Role.LEADER or node.log.term(node.commit_index) != node.current_term:
            gevent.sleep(0.01)
    yield runtime, storage, values
    storage.hang = False
    runtime.stop()


def test_writes_commit_and_return_their_index_and_result(one_node):
    runtime, _, values = one_node
    index, result = runtime.propose(b"one", 2.0)
    assert values.applied == [b"one"] and result == 1
    assert runtime.propose(b"two", 2.0) == (index + 1, 2)


def test_a_write_the_disk_cannot_take_times_out_within_its_own_bound(one_node):
    runtime, storage, values = one_node
    storage.hang = True
    t0 = time.monotonic()
    with pytest.raises(Timeout), gevent.Timeout(3, AssertionError("the write outlived its bound by far")):
        runtime.propose(b"stuck", 0.2)
    took = time.monotonic() - t0
    assert 0.2 <= took < 0.6, took
    # A request with a shorter bound that came later is not held up behind the longer one.
    waiter = gevent.spawn(runtime.propose, b"also stuck", 5.0)
    gevent.sleep(0.05)
    t0 = time.monotonic()
    with pytest.raises(Timeout), gevent.Timeout(3, AssertionError("the write outlived its bound by far")):
        runtime.propose(b"short", 0.1)
    assert time.monotonic() - t0 < 0.4
    storage.hang = False
    # The disk is back: the stuck writes (outcome unknown to their callers) and new ones all commit.
    assert waiter.get(timeout=5)[0] > 0
    runtime.propose(b"after", 2.0)
    assert values.applied == [b"stuck", b"also stuck", b"short", b"after"]


def test_stopping_fails_every_waiting_request(one_node):
    runtime, storage, _ = one_node
    storage.hang = True
    waiters = [gevent.spawn(runtime.propose, f"w{i}".encode(), 30.0) for i in range(3)]
    gevent.sleep(0.05)
    storage.hang = False  # lets the loop finish the save it is in, so stop() can join it
    runtime.stop()
    gevent.joinall(waiters, timeout=3)
    for w in waiters:
        assert w.ready(), "a request outlived the node"
        assert w.successful() or isinstance(w.exception, Stopped), w.exception
    with pytest.raises(Stopped):
        runtime.propose(b"late", 1.0)
