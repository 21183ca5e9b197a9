"""Stepped snapshots (issue 13, raftlib.runtime's "stepped" mode) on a one-node runtime over a DiskStorage: written
by the loop a bounded step at a time while writes apply between the steps, committed, restored after a restart
with every acknowledged write; abandoned by `stop` (in its steps or in its file's fsync) with no `*.tmp` left
and a clean restart; never committed after a failed fsync; overtaken by a leader's snapshot; a turn bounded by
wall time. (The store's writer: tests/test_store.py; a real cluster: tests/test_snapshot_fork.py.)"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable

import gevent
import pytest

from raftlib import runtime as runtime_module
from raftlib.core import Config, RaftNode
from raftlib.interfaces import HardState
from raftlib.messages import AppendEntries, Entry, EntryKind, InstallSnapshot, Member, Membership, Role
from raftlib.runtime import Runtime
from raftlib.server.store import FEATURE_LEVEL, SET, SET_FEATURE_LEVEL, KeyValueStore, SteppedSnapshotWriter, command
from raftlib.snapshotfile import SnapshotFileWriter
from raftlib.storage import DiskStorage
from runtime_fakes import NullTransport


def _kv_runtime(data_dir: str, bootstrap: bool, **runtime_args) -> tuple[Runtime, DiskStorage, KeyValueStore]:
    """A one-node runtime (not started) on a DiskStorage in `data_dir` with a KeyValueStore, bootstrapped alone
    (`bootstrap`) or restarted on what the dir holds (its snapshot restored at start, as the server does)."""
    storage = DiskStorage(data_dir)
    storage.load()
    if bootstrap:
        me = Member("a", "127.0.0.1:1", "")
        storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership(("a",), (), (me,)))])
    stored = storage.state
    node = RaftNode(Config("a", election_ticks=4, heartbeat_ticks=1), random.Random(1), stored.hard_state,
                    stored.raft_log(), stored.snapshot)
    kv = KeyValueStore()
    runtime = Runtime(node, storage, NullTransport(), kv, tick_seconds=0.005, **runtime_args)
    assert runtime.snapshot_mode == "stepped", "the default"
    if stored.snapshot is not None:
        runtime.restore_at_start(stored.snapshot)
    return runtime, storage, kv


def _lead(runtime: Runtime) -> None:
    with gevent.Timeout(5):
        while runtime.node.role is not Role.LEADER:
            gevent.sleep(0.01)


def _no_fork(monkeypatch) -> None:
    def refused():
        raise AssertionError("a stepped snapshot forks nothing")

    monkeypatch.setattr(runtime_module.posix, "fork", refused)


def _tmp_files(data_dir: str) -> list[str]:
    return [os.path.join(root, f) for root, _, files in os.walk(data_dir) for f in files if f.endswith(".tmp")]


def _restarted_values(data_dir: str) -> dict[str, bytes]:
    """The key/values a restart on `data_dir` serves once it has restored its snapshot and applied its log."""
    runtime, storage, kv = _kv_runtime(data_dir, bootstrap=False)
    runtime.start()
    try:
        _lead(runtime)
        with gevent.Timeout(10):
            while runtime.restoring_snapshot or runtime.node.last_applied < runtime.node.commit_index:
                gevent.sleep(0.01)
        return {key: kv.get(key) for key in kv.keys}
    finally:
        runtime.stop()
        storage.close()


def test_stepped_snapshots_taken_under_writes_restart_with_every_acknowledged_write(tmp_path, monkeypatch):
    # Small steps: each snapshot takes many turns of the loop, and writes (overwrites, new keys) apply between them.
    monkeypatch.setattr(runtime_module, "STEPPED_SNAPSHOT_STEP_ITEMS", 8)
    monkeypatch.setattr(runtime_module, "STEPPED_SNAPSHOT_TURN_SECONDS", 0)
    _no_fork(monkeypatch)
    data_dir = str(tmp_path)
    runtime, storage, kv = _kv_runtime(data_dir, bootstrap=True, snapshot_threshold_bytes=20_000)
    acknowledged: dict[str, bytes] = {}
    applied_while_writing = 0
    runtime.start()
    try:
        _lead(runtime)
        runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 2.0)
        rng = random.Random(7)
        deadline = time.monotonic() + 60
        i = 0
        while runtime.stats["snapshots"] < 3 or i < 2000:
            assert time.monotonic() < deadline, runtime.stats
            key, value = f"k{rng.randrange(1500):04d}", b"v%d-" % i + b"x" * rng.randrange(80)
            runtime.propose(command(SET, key, value), 2.0)
            acknowledged[key] = value
            if runtime._snapshot_stepper is not None:
                applied_while_writing += 1
            i += 1
        assert runtime.stats["snapshot_children_failed"] == 0 and runtime.running
        assert runtime.stats["snapshot_stepped_cpu_microseconds"] > 0
        assert applied_while_writing > 100, applied_while_writing  # writes did apply between the steps
        assert {k: kv.get(k) for k in kv.keys} == acknowledged
        with gevent.Timeout(10):  # no write any more: the one under way still ends (its greenlet runs when idle)
            while runtime._snapshot_stepper is not None or runtime._snapshot_done is not None:
                gevent.sleep(0.01)
    finally:
        runtime.stop()
        storage.close()
    assert not _tmp_files(data_dir)
    assert _restarted_values(data_dir) == acknowledged


@pytest.mark.parametrize("stopped_in", ["steps", "fsync"])
def test_stop_during_a_stepped_snapshot_leaves_no_tmp_and_the_node_restarts_clean(tmp_path, monkeypatch, stopped_in):
    """`stop` in the middle of the steps (one key a turn: many turns from its end) closes the writer, whose
    greenlet ends at its next check, and waits for it; in the file's fsync (a slow disk) it waits for it (a disk
    job): either way the snapshot's file and its pre-built base segment are unlinked before it returns, and a
    restart serves every acknowledged write."""
    monkeypatch.setattr(runtime_module, "STEPPED_SNAPSHOT_STEP_ITEMS", 1 if stopped_in == "steps" else 256)
    monkeypatch.setattr(runtime_module, "STEPPED_SNAPSHOT_TURN_SECONDS", 0)
    syncing = []
    real_sync = SnapshotFileWriter.sync

    def slow_sync(self):
        syncing.append(1)
        time.sleep(0.5)  # in the threadpool's thread
        real_sync(self)

    monkeypatch.setattr(SnapshotFileWriter, "sync", slow_sync)
    _no_fork(monkeypatch)
    data_dir = str(tmp_path)
    runtime, storage, kv = _kv_runtime(data_dir, bootstrap=True, snapshot_threshold_bytes=60_000)
    acknowledged: dict[str, bytes] = {}
    runtime.start()
    try:
        _lead(runtime)
        runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 2.0)
        deadline = time.monotonic() + 30
        i = 0
        while runtime._snapshot_stepper is None:
            assert time.monotonic() < deadline, "no stepped snapshot began"
            key, value = f"k{i:05d}", b"x" * 100
            runtime.propose(command(SET, key, value), 2.0)
            acknowledged[key] = value
            i += 1
        if stopped_in == "fsync":
            with gevent.Timeout(10):
                while not syncing:
                    gevent.sleep(0.001)
        assert _tmp_files(data_dir), "the snapshot's file is being written"
        writer = runtime._snapshot_writer
        assert stopped_in == "fsync" or not writer.done, "stopped mid-way"
    finally:
        runtime.stop()
        storage.close()
    if stopped_in == "steps":
        assert writer.closed and not writer.done, "stop closed the writer: it did not wait for its end"
    assert runtime.stats["snapshots"] == 0
    assert not _tmp_files(data_dir)
    assert _restarted_values(data_dir) == acknowledged


def test_a_stepped_snapshot_that_meets_a_full_disk_is_dropped_and_taken_again_later(tmp_path, monkeypatch, caplog,
                                                                                    capfd):
    """As a forked child's: its file unlinked, nothing changed, the next try (snapshot_retry_seconds later) goes
    through; a warning is logged, no traceback printed (gevent's threadpool prints one for a task that raises: a
    full disk handled as it should wrote "Traceback" into a node's log, CI at 2b2f029)."""
    monkeypatch.setattr(runtime_module, "SNAPSHOT_IO_BYTES", 1)  # every turn's bytes appended at once
    _no_fork(monkeypatch)
    real_append, refused = SnapshotFileWriter.append, []

    def append_once_full(self, data):
        if not refused and len(data) > 100:  # not the head: a piece of the state
            refused.append(1)
            raise runtime_module.DiskFull("no room on the disk (test)")
        real_append(self, data)

    monkeypatch.setattr(SnapshotFileWriter, "append", append_once_full)

    def check(runtime: Runtime) -> None:
        assert refused and runtime.stats["snapshot_children_failed"] == 1
        assert any("could not write the snapshot" in r.getMessage() for r in caplog.records)
        assert "Traceback" not in capfd.readouterr().err

    _snapshot_taken_after_a_failure(str(tmp_path), check)


def _snapshot_taken_after_a_failure(data_dir: str, check: Callable[[Runtime], None]) -> None:
    """A one-node runtime retrying a failed snapshot 0.2 s later, written to until it takes one; `check(runtime)`
    then, before it stops; no `*.tmp` left, and a restart serves every acknowledged write."""
    runtime, storage, kv = _kv_runtime(data_dir, bootstrap=True, snapshot_threshold_bytes=4_000)
    runtime.snapshot_retry_seconds = 0.2
    acknowledged: dict[str, bytes] = {}
    runtime.start()
    try:
        _write_until_snapshots(runtime, acknowledged)
        check(runtime)
    finally:
        runtime.stop()
        storage.close()
    assert not _tmp_files(data_dir)
    assert _restarted_values(data_dir) == acknowledged


def _write_until_snapshots(runtime: Runtime, acknowledged: dict[str, bytes], snapshots: int = 1) -> None:
    """Raise the feature level, then write 100-byte values to new keys until `snapshots` snapshots are taken."""
    _lead(runtime)
    runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 2.0)
    deadline = time.monotonic() + 20
    i = len(acknowledged)
    while runtime.stats["snapshots"] < snapshots:
        assert time.monotonic() < deadline, runtime.stats
        key, value = f"k{i:05d}", b"x" * 100
        runtime.propose(command(SET, key, value), 2.0)
        acknowledged[key] = value
        i += 1
        gevent.sleep(0.002)


@pytest.mark.parametrize("fault", ["eio_at_fsync", "a_bug_in_a_step"])
def test_a_stepped_snapshot_whose_file_fails_is_never_committed_and_is_taken_again_later(
        tmp_path, monkeypatch, caplog, fault):
    """fsyncgate: a file whose fsync failed (EIO) is never committed, even though every byte was appended: it is
    unlinked, counted, and a new snapshot is taken into a new file snapshot_retry_seconds later. An unexpected
    exception in a step (a bug) is logged with its traceback and dropped the same way, not retried at once."""
    _no_fork(monkeypatch)
    failed: list[str] = []
    if fault == "eio_at_fsync":
        real_sync = SnapshotFileWriter.sync

        def sync_fails_once(self):
            if not failed:
                failed.append(self.path)
                raise OSError(errno.EIO, "Input/output error (test)")
            real_sync(self)

        monkeypatch.setattr(SnapshotFileWriter, "sync", sync_fails_once)
    else:
        real_step = SteppedSnapshotWriter.step

        def step_fails_once(self, max_items):
            if not failed:
                failed.append("step")
                raise RuntimeError("a bug (test)")
            return real_step(self, max_items)

        monkeypatch.setattr(SteppedSnapshotWriter, "step", step_fails_once)
    data_dir = str(tmp_path)
    runtime, storage, kv = _kv_runtime(data_dir, bootstrap=True, snapshot_threshold_bytes=4_000)
    runtime.snapshot_retry_seconds = 0.3
    committed: list[tuple[int, str]] = []
    real_commit = storage.commit_snapshot

    def commit(snap, tmp):
        committed.append((snap.last_included_index, tmp))
        return real_commit(snap, tmp)

    monkeypatch.setattr(storage, "commit_snapshot", commit)
    acknowledged: dict[str, bytes] = {}
    started = time.monotonic()
    runtime.start()
    try:
        _write_until_snapshots(runtime, acknowledged)
        assert time.monotonic() - started >= runtime.snapshot_retry_seconds  # the retry waited
        assert failed and runtime.stats["snapshot_children_failed"] == 1
        assert len(committed) == 1 and committed[0][1] not in failed, (committed, failed)
        record = next(r for r in caplog.records if "could not write the snapshot" in r.getMessage())
        assert (record.exc_info is not None) == (fault == "a_bug_in_a_step")
    finally:
        runtime.stop()
        storage.close()
    assert not _tmp_files(data_dir)
    assert _restarted_values(data_dir) == acknowledged


def test_a_turn_of_stepped_snapshot_steps_is_bounded_by_wall_time_too(tmp_path, monkeypatch):
    """A turn's steps end once their wall time passes STEPPED_SNAPSHOT_TURN_SECONDS, whatever CPU they took (a
    loaded machine, a slow page fault): with the CPU clock stopped, the snapshot still takes many turns."""
    monkeypatch.setattr(runtime_module, "STEPPED_SNAPSHOT_STEP_ITEMS", 1)
    monkeypatch.setattr(runtime_module.time, "thread_time", lambda: 0.0)  # no CPU bound ever trips
    _no_fork(monkeypatch)
    turns = [0]
    turns_seen: set[int] = set()
    real_step = SteppedSnapshotWriter.step

    def step(self, max_items):
        turns_seen.add(turns[0])
        time.sleep(0.0005)  # wall time, no CPU (time.sleep is not gevent's here: the loop is held)
        return real_step(self, max_items)

    def count_turns():
        while True:
            turns[0] += 1
            gevent.sleep(0.00001)

    monkeypatch.setattr(SteppedSnapshotWriter, "step", step)
    data_dir = str(tmp_path)
    runtime, storage, kv = _kv_runtime(data_dir, bootstrap=True, snapshot_threshold_bytes=8_000)
    counter = gevent.spawn(count_turns)
    runtime.start()
    try:
        _write_until_snapshots(runtime, {})
        # one key a step, 0.5 ms each: a 2 ms turn holds about 4 steps, and the ~50 keys take ~13 turns
        assert len(turns_seen) >= 5, len(turns_seen)
    finally:
        counter.kill()
        runtime.stop()
        storage.close()


def test_a_leaders_snapshot_that_overtakes_a_stepped_one_drops_it_uncounted(tmp_path, monkeypatch):
    """A follower writing a stepped snapshot (one key a turn) installs a leader's newer snapshot: the restore
    closes the writer, and its unwritten file is unlinked as overtaken (`can_snapshot_at`), neither counted as a
    failure nor delaying the next snapshot; the state is the leader's."""
    monkeypatch.setattr(runtime_module, "STEPPED_SNAPSHOT_STEP_ITEMS", 1)
    monkeypatch.setattr(runtime_module, "STEPPED_SNAPSHOT_TURN_SECONDS", 0)
    _no_fork(monkeypatch)
    data_dir = str(tmp_path)
    storage = DiskStorage(data_dir)
    storage.load()
    members = Membership(("a", "b"), (), (Member("a", "127.0.0.1:1", ""), Member("b", "127.0.0.1:2", "")))
    storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", members)])
    stored = storage.state
    node = RaftNode(Config("b", election_ticks=1000), random.Random(1), stored.hard_state, stored.raft_log(),
                    stored.snapshot)
    kv = KeyValueStore()
    runtime = Runtime(node, storage, NullTransport(), kv, tick_seconds=0.005, snapshot_threshold_bytes=20_000)
    commands = [command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL),
                *(command(SET, f"k{i:05d}", b"x" * 100) for i in range(1000))]
    entries = tuple(Entry(2, 2 + i, EntryKind.COMMAND, c) for i, c in enumerate(commands))
    leaders = KeyValueStore()
    leaders.apply(1, command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL))
    leaders.apply(2, command(SET, "from-the-leader", b"1"))
    overtaking = 5000
    runtime.start()
    try:
        runtime.deliver([AppendEntries("a", "b", 2, 1, 1, entries, entries[-1].index)], False)
        with gevent.Timeout(10):
            while runtime._snapshot_stepper is None:
                gevent.sleep(0.001)
        writer = runtime._snapshot_writer
        runtime.deliver([InstallSnapshot("a", "b", 2, overtaking, 2, members, 0, leaders.snapshot(), True)], False)
        with gevent.Timeout(10):
            while (runtime._restoring is not None or runtime._snapshot_stepper is not None
                   or runtime._snapshot_done is not None):
                runtime.deliver([AppendEntries("a", "b", 2, overtaking, 2, (), overtaking)], False)
                gevent.sleep(0.001)
        assert writer.closed and not writer.done, "overtaken mid-way"
        assert runtime.stats["snapshot_children_failed"] == 0 and runtime.stats["snapshots"] == 0
        assert runtime._snapshot_not_before == 0.0  # the next snapshot is not put off
        assert {key: kv.get(key) for key in kv.keys} == {"from-the-leader": b"1"}
        assert storage.state.snapshot is not None and storage.state.snapshot.last_included_index == overtaking
    finally:
        runtime.stop()
        storage.close()
    assert not _tmp_files(data_dir)


def test_an_io_error_at_a_stepped_snapshot_files_create_is_not_fatal_and_the_snapshot_is_taken_later(
        tmp_path, monkeypatch):
    """Review of eef4bc2 (L1): an EIO at the new file's create or head stopped the node, where the same error at
    any later piece only drops that snapshot: now refused for now and taken again snapshot_retry_seconds later."""
    _no_fork(monkeypatch)
    from raftlib.storage import DiskStorage

    real_open, refused = DiskStorage.open_snapshot_file, []

    def open_once_eio(self, meta, tmp):
        if not refused:
            refused.append(1)
            raise OSError(errno.EIO, "Input/output error")
        return real_open(self, meta, tmp)

    monkeypatch.setattr(DiskStorage, "open_snapshot_file", open_once_eio)

    def check(runtime: Runtime) -> None:
        assert refused and runtime.alive

    _snapshot_taken_after_a_failure(str(tmp_path), check)
