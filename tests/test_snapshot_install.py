"""A follower installing a leader's big snapshot without stalling (issue 13, step 3), in this process: the chunks
go to the snapshot's file as they come (never a growing bytes object), the install renames that file into place,
and the state machine is restored a piece per drive while the node answers heartbeats and applies nothing."""

from __future__ import annotations

import random

import gevent
import pytest

from crashfs import CrashFS
from raftlib import (
    AppendEntries,
    AppendEntriesReply,
    Config,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotReply,
    Member,
    Membership,
    RaftNode,
    Snapshot,
)
from raftlib.runtime import Runtime
from raftlib.server.store import RESTORE_BATCH_KEYS, SET, KeyValueStore, command
from raftlib.snapshotfile import ReceivedSnapshotFile
from raftlib.storage import DiskStorage

MEMBERSHIP = Membership(("a", "b"), (), (Member("a", "127.0.0.1:1", ""), Member("b", "127.0.0.1:2", "")))


class Sent:
    def __init__(self):
        self.messages = []

    def set_peers(self, addresses):
        pass

    def send(self, messages):
        self.messages.extend(messages)


def values(kv) -> dict[str, bytes]:
    """The key -> value map of a store's records."""
    return {key: record[0] for key, record in kv.data.items()}


def store_of(n: int, prefix: str = "k") -> KeyValueStore:
    kv = KeyValueStore()
    for i in range(n):
        kv.apply(i + 1, command(SET, f"{prefix}{i:07d}", b"v%d" % i))
    return kv


def follower_b(fs: CrashFS):
    """Node b of {a, b} on a DiskStorage over `fs`, a KeyValueStore holding one key, b's election far off."""
    storage = DiskStorage("/data", fs=fs)
    storage.load()
    storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", MEMBERSHIP)])
    stored = storage.state
    node = RaftNode(Config("b", election_ticks=1000, snapshot_chunk_bytes=1 << 16), random.Random(1),
                    stored.hard_state, stored.raft_log(), stored.snapshot)
    kv = KeyValueStore()
    kv.apply(1, command(SET, "old", b"1"))
    transport = Sent()
    runtime = Runtime(node, storage, transport, kv, tick_seconds=0.005)
    return runtime, storage, kv, transport


def chunks_of(data: bytes, index: int, term: int, size: int) -> list[InstallSnapshot]:
    out = []
    for offset in range(0, len(data), size):
        piece = data[offset : offset + size]
        out.append(InstallSnapshot("a", "b", term, index, term, MEMBERSHIP, offset, piece,
                                   offset + len(piece) == len(data)))
    return out


def test_a_big_snapshot_is_received_into_its_file_and_restored_a_piece_per_drive_while_heartbeats_are_answered():
    fs = CrashFS()
    runtime, storage, kv, transport = follower_b(fs)
    source = store_of(30 * RESTORE_BATCH_KEYS)
    data = source.snapshot()
    runtime.start()
    try:
        with gevent.Timeout(2):
            while runtime.node.last_applied < 1:
                gevent.sleep(0.01)
        received = []
        real_open = storage.receive_snapshot

        def spy(meta):
            sink = real_open(meta)
            received.append(sink)
            return sink

        runtime.node.open_snapshot_sink = spy
        chunks = chunks_of(data, 50, 2, 1 << 16)
        assert len(chunks) > 10
        for m in chunks[:-1]:
            runtime.deliver([m], False)
        # The chunks so far are in the file, not in memory: the sink holds no buffer, the file holds them.
        sink = received[0]
        assert not hasattr(sink, "buffer") and len(sink) == sum(len(m.data) for m in chunks[:-1])
        on_disk = fs.read_file(sink.path)
        assert on_disk.endswith(b"".join(m.data for m in chunks[:-1]))
        runtime.deliver(chunks[-1:], False)
        assert storage.state.snapshot is not None and storage.state.snapshot.last_included_index == 50
        assert not fs.listdir("/data") or not any(n.endswith(".tmp") for n in fs.listdir("/data"))  # renamed
        # The restore is under way: a heartbeat (and an entry after the snapshot, committed) is answered, but
        # nothing is applied and the old state is still whole.
        answered = 0
        entry = Entry(2, 51, EntryKind.COMMAND, command(SET, "after", b"51"))
        runtime.deliver([AppendEntries("a", "b", 2, 50, 2, (entry,), 51)], False)
        while not runtime._restore_applied:
            before = len(transport.messages)
            runtime.deliver([AppendEntries("a", "b", 2, 51, 2, (), 51)], False)
            assert any(isinstance(m, AppendEntriesReply) and m.success for m in transport.messages[before:])
            if not runtime._restore_applied:
                answered += 1
                assert runtime.node.last_applied < 50
                assert values(kv) == {"old": b"1"} and list(kv.keys) == ["old"]
        assert answered >= 5, answered  # one piece per drive: a one-step restore answers none meanwhile
        assert runtime.wait_applied(51, 2.0) == 51
        assert runtime.status().stats["restore_step_max_microseconds"] > 0  # timed (bench/snapshot_stall.py)
        assert values(kv) == {**values(source), "after": b"51"}
        assert list(kv.keys) == sorted(kv.data)
        kv.keys._check()
    finally:
        runtime.stop()


def test_the_final_chunk_and_an_append_past_the_snapshot_in_one_drive_lose_no_entry():
    """Second review of snapfork, finding 1 (§7): the last chunk and an append past the snapshot with
    leader_commit above it, stepped in one drive (one frame; the transport may also reorder so). The Ready that
    carried the snapshot handed out the entry after it; the runtime, restoring piece by piece, applied it to the
    old state, which the restore then replaced: 'after' was lost and last_applied stayed at 50."""
    fs = CrashFS()
    runtime, storage, kv, transport = follower_b(fs)
    source = store_of(30 * RESTORE_BATCH_KEYS)
    runtime.start()
    try:
        with gevent.Timeout(2):
            while runtime.node.last_applied < 1:
                gevent.sleep(0.01)
        chunks = chunks_of(source.snapshot(), 50, 2, 1 << 16)
        for m in chunks[:-1]:
            runtime.deliver([m], False)
        entry = Entry(2, 51, EntryKind.COMMAND, command(SET, "after", b"51"))
        runtime.deliver([chunks[-1], AppendEntries("a", "b", 2, 50, 2, (entry,), 51)], False)
        assert runtime._restoring is not None and not runtime._restore_applied  # a restore in several steps
        assert values(kv) == {"old": b"1"} and runtime.node.last_applied < 50
        with gevent.Timeout(10):
            while not runtime._restore_applied:
                runtime.deliver([AppendEntries("a", "b", 2, 51, 2, (), 51)], False)
                gevent.sleep(0.001)
        assert runtime.wait_applied(51, 2.0) == 51
        assert values(kv) == {**values(source), "after": b"51"}
    finally:
        runtime.stop()


def test_a_transfer_abandoned_because_the_log_caught_up_leaves_no_file_nor_descriptor():
    """Second review of snapfork, finding 2: a new leader that still holds the entries catches b up by appends
    in the middle of a transfer. Its *.received.tmp and the two descriptors stayed until a restart."""
    fs = CrashFS()
    runtime, storage, kv, transport = follower_b(fs)
    runtime.start()
    try:
        with gevent.Timeout(2):
            while runtime.node.last_applied < 1:
                gevent.sleep(0.01)
        for m in chunks_of(store_of(30 * RESTORE_BATCH_KEYS).snapshot(), 50, 2, 1 << 16)[:3]:
            runtime.deliver([m], False)
        assert any(n.endswith(".received.tmp") for n in fs.listdir("/data")) and storage._writing
        entries = tuple(Entry(3, i, EntryKind.COMMAND, command(SET, f"n{i}", b"x")) for i in range(2, 61))
        runtime.deliver([AppendEntries("a", "b", 3, 1, 1, entries, 60)], False)
        assert runtime.wait_applied(60, 2.0) == 60
        assert not any(n.endswith(".tmp") for n in fs.listdir("/data")), fs.listdir("/data")
        assert not storage._writing and runtime.node._incoming_snapshot is None
    finally:
        runtime.stop()


def test_a_transfer_given_up_for_a_newer_snapshot_leaves_no_file():
    fs = CrashFS()
    runtime, storage, kv, transport = follower_b(fs)
    runtime.start()
    try:
        runtime.deliver(chunks_of(b"x" * 100, 50, 2, 60)[:1], False)
        assert any(n.endswith(".received.tmp") for n in fs.listdir("/data"))
        runtime.deliver(chunks_of(store_of(10).snapshot(), 60, 2, 1 << 16), False)
        assert runtime.wait_applied(60, 2.0) == 60
        assert not any(n.endswith(".tmp") for n in fs.listdir("/data")), fs.listdir("/data")
        assert len(kv.data) == 10
        reply = [m for m in transport.messages if isinstance(m, InstallSnapshotReply)][-1]
        assert reply.done and reply.last_included_index == 60
    finally:
        runtime.stop()


def test_a_received_snapshot_superseded_before_it_was_saved_leaves_no_file_nor_descriptor():
    """Fifth review of snapfork, finding 3: two leaders' snapshots (term 2 at 50, its successor's at 60 in term 3)
    finished in one drive. The second replaced the first as the snapshot to save; the first's *.received.tmp (and
    its name among the files being written) stayed until a restart."""
    fs = CrashFS()
    runtime, storage, kv, transport = follower_b(fs)
    runtime.start()
    try:
        first = chunks_of(store_of(5).snapshot(), 50, 2, 1 << 16)
        second = [InstallSnapshot(m.src, m.dst, 3, 60, 3, m.membership, m.offset, m.data, m.done)
                  for m in chunks_of(store_of(10).snapshot(), 60, 3, 1 << 16)]
        runtime.deliver(first + second, False)  # both final chunks in one drive
        assert runtime.wait_applied(60, 2.0) == 60
        assert len(kv.data) == 10
        assert not any(n.endswith(".tmp") for n in fs.listdir("/data")), fs.listdir("/data")
        assert not storage._writing
        opened = [fs._name(h) for h in fs._handles]  # by the name they were opened by (the 60's: renamed since)
        assert not any("0000050.snap" in p for p in opened), opened
    finally:
        runtime.stop()


def test_a_received_snapshot_file_is_installed_by_a_rename_and_loads_after_a_restart():
    """The storage's side: chunks through `receive_snapshot`, the finished data saved as the Ready's snapshot.
    The install renames the received file (no second copy written) and a reload reads the same snapshot."""
    fs = CrashFS()
    storage = DiskStorage("/data", fs=fs)
    storage.load()
    storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", MEMBERSHIP)])
    data = store_of(3 * RESTORE_BATCH_KEYS).snapshot()
    sink = storage.receive_snapshot(Snapshot(50, 2, MEMBERSHIP))
    for offset in range(0, len(data), 1 << 16):
        sink.write(data[offset : offset + (1 << 16)])
    finished = sink.finish()
    assert isinstance(finished, ReceivedSnapshotFile) and finished == data
    creates_before = sum(1 for op in fs.ops if op[1] == "create")
    storage.save(HardState(2, None, 50), [], Snapshot(50, 2, MEMBERSHIP, finished))
    created = [op for op in fs.ops if op[1] == "create"][creates_before:]
    assert len(created) == 1 and created[0][2].endswith(".seg"), created  # the new segment only: a rename
    storage.close()
    again = DiskStorage("/data", fs=fs).load()
    assert again.snapshot.last_included_index == 50 and again.snapshot.data == data


@pytest.mark.parametrize("cut", [0, 1, 7])
def test_a_snapshot_whose_data_is_damaged_in_transit_is_refused_by_the_store(cut):
    data = store_of(RESTORE_BATCH_KEYS + 3).snapshot()
    kv = KeyValueStore()
    with pytest.raises(ValueError):
        kv.restore(data[: len(data) - 1 - cut])
    assert values(kv) == {}


def test_a_reply_to_a_chunk_sent_twice_starts_no_second_chain_of_chunks():
    """§7 with heartbeats: the leader sends the current chunk again with each heartbeat (it may have been lost).
    The follower answers the copy with the offset it holds; answering that with the next chunk again would add
    one more chain of chunks in flight per heartbeat (seen: a leader change every few seconds while a follower
    took a 114 MB snapshot). A reply that moves nothing sends nothing; one that moves on sends the next chunk."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from simulator import Cluster
    from test_core import elect, write

    from raftlib.progress import ProgressState

    c = Cluster(seed=11, n=3)
    leader = elect(c)
    lagger = next(i for i in c.ids if i != leader)
    c.crash(lagger)
    for k in range(30):
        write(c, f"key{k % 7}", ticks=500)
    c.take_snapshot(leader)
    node = c.nodes[leader].node
    size = node.config.snapshot_chunk_bytes  # the simulator's: small, for many chunks
    c.restart(lagger)
    assert c.run_until(lambda: (node.progress(lagger).state is ProgressState.SNAPSHOT
                                and node.progress(lagger).snapshot_offset > 0), 1000)
    pr = node.progress(lagger)

    def chunks_sent_after(reply):
        node.step(reply)
        rd = node.ready()
        sent = [m for m in rd.messages if isinstance(m, InstallSnapshot)] if rd else []
        if rd:
            c.nodes[leader].node.advance(rd)
        return sent

    held = pr.snapshot_offset
    assert chunks_sent_after(InstallSnapshotReply(lagger, leader, node.current_term, pr.snapshot_index, held,
                                                  False)) == []
    sent = chunks_sent_after(InstallSnapshotReply(lagger, leader, node.current_term, pr.snapshot_index, held + size,
                                                  False))
    assert [m.offset for m in sent] == [held + size]


def test_a_leaders_snapshot_file_cut_under_it_is_abandoned_counted_and_logged_at_a_bounded_rate(
        tmp_path, monkeypatch, caplog):
    """Fourth review of snapfork, items 2 and 4: a leader sends a lagging learner its snapshot from the file (a
    real SnapshotFile on a real disk); the file is cut short under it (a failing disk), every read of a chunk
    raises SnapshotUnreadable, the core abandons the transfer and counts it, tries again at each heartbeat, and
    the runtime counts every failure (stats) but says so at most once per peer per SNAPSHOT_READ_WARNING_SECONDS,
    with the count since its last line. The node goes on leading and serving writes."""
    import os

    from raftlib import runtime as runtime_module
    from raftlib.core import Role

    membership = Membership(("a",), ("b",), (Member("a", "127.0.0.1:1", ""), Member("b", "127.0.0.1:2", "")))
    storage = DiskStorage(str(tmp_path / "a"))
    storage.load()
    storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", membership)])
    stored = storage.state
    node = RaftNode(Config("a", election_ticks=4, heartbeat_ticks=1, snapshot_chunk_bytes=1 << 10),
                    random.Random(1), stored.hard_state, stored.raft_log(), stored.snapshot)
    transport = Sent()  # b never answers: the leader sends it the current chunk again with each heartbeat
    runtime = Runtime(node, storage, transport, KeyValueStore(), tick_seconds=0.005, snapshot_threshold_bytes=2000)
    runtime.snapshot_fork = False  # the file is the same either way; in process, the test does not wait for a child
    runtime.start()
    try:
        with caplog.at_level("WARNING", logger="raftlib.runtime"), gevent.Timeout(20):
            while node.role is not Role.LEADER:
                gevent.sleep(0.01)
            i = 0
            while runtime.stats["snapshots"] == 0:
                runtime.propose(command(SET, f"k{i}", bytes(100)), 2.0)
                i += 1
            snapshot_file = storage.state.snapshot.data
            assert type(snapshot_file).__name__ == "SnapshotFile" and node.snapshot.data is snapshot_file
            while not any(type(m) is InstallSnapshot for m in transport.messages):  # the transfer is under way
                gevent.sleep(0.01)
            assert node.snapshot_reads_failed == 0
            os.truncate(snapshot_file.path, 20)  # its head only: every chunk's read now comes up short
            while node.snapshot_reads_failed < 5:  # abandoned, tried again, abandoned ... at each heartbeat
                gevent.sleep(0.01)
            said = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
            assert len(said) == 1, said  # not one a drive
            assert said[0].startswith("snapshot transfer abandoned ") and " for b could not be read: " in said[0]
            assert "snapshot file shorter than it was" in said[0]
            monkeypatch.setattr(runtime_module, "SNAPSHOT_READ_WARNING_SECONDS", 0.0)
            failed_before = node.snapshot_reads_failed
            while node.snapshot_reads_failed < failed_before + 2:
                gevent.sleep(0.01)
            runtime.propose(command(SET, "after", b"1"), 2.0)  # a drive after them: it says what it counted
            said = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
            assert len(said) >= 2
            counts = [int(line.split()[3]) for line in said]  # "abandoned N time(s) (M since start)"
            totals = [int(line.split("(")[2].split()[0]) for line in said]
            assert counts[0] >= 1 and counts[1] >= failed_before - totals[0], said  # the count since the last line
            assert sum(counts) == totals[-1], said  # every failure said once, in some line's count
        assert node.role is Role.LEADER
        assert runtime.status().stats["snapshot_reads_failed"] == node.snapshot_reads_failed >= failed_before + 2
    finally:
        runtime.stop()
        storage.close()
