"""CrashFS, the simulated file system: its crash states are exactly what the POSIX model allows, and DiskStorage
runs on it."""

from __future__ import annotations

import errno
import random

import pytest

from crashfs import CrashFS, SimulatedCrash
from raftlib import Entry, EntryKind, HardState
from raftlib.storage import DiskStorage
from raftlib.storage_errors import DataDirLocked, DiskFull


def contents(states, path):
    return {s.tree().get(path, "missing") for s in states}


def new_file(fs: CrashFS, path: str, data: bytes, sync: bool) -> int:
    h = fs.create(path)
    fs.append(h, data)
    if sync:
        fs.fsync(h)
    return h


def test_synced_data_under_a_synced_name_survives_every_crash():
    fs = CrashFS()
    fs.mkdir("/d")
    fs.fsync_dir("/")
    new_file(fs, "/d/a", b"hello", sync=True)
    fs.fsync_dir("/d")
    assert fs.count_crash_states() == 1
    assert contents(fs.crash_states(), "/d/a") == {b"hello"}


def test_a_name_not_synced_may_vanish_even_when_the_data_was_synced():
    fs = CrashFS()
    fs.mkdir("/d")
    fs.fsync_dir("/")
    new_file(fs, "/d/a", b"hello", sync=True)
    assert contents(fs.crash_states(), "/d/a") == {b"hello", "missing"}
    # A folder made without fsyncing its parent takes everything in it along.
    fs.mkdir("/d/sub")
    h = new_file(fs, "/d/sub/x", b"x", sync=True)
    fs.fsync_dir("/d/sub")
    assert "missing" in contents(fs.crash_states(), "/d/sub/x")
    fs.close(h)


def test_unsynced_appends_are_dropped_kept_or_torn_in_order():
    fs = CrashFS()
    h = new_file(fs, "/a", b"0123", sync=True)
    fs.fsync_dir("/")
    fs.append(h, b"abcdefgh")
    fs.append(h, b"XY")
    got = contents(fs.crash_states(limit=1000), "/a")
    assert {b"0123", b"0123abcdefgh", b"0123abcdefghXY"} <= got  # dropped, first kept, both kept
    assert b"0123abcd" in got and b"0123" + bytes(8) in got  # torn: a prefix, or the size without the data
    assert all(c.startswith(b"0123") for c in got)  # the synced part is never lost
    assert b"0123XY" not in got  # never the second append without the first
    fs.fdatasync(h)
    assert contents(fs.crash_states(), "/a") == {b"0123abcdefghXY"}


def test_unsynced_folder_operations_land_in_any_applicable_combination():
    fs = CrashFS()
    new_file(fs, "/old", b"old", sync=True)
    new_file(fs, "/keep", b"keep", sync=True)
    fs.fsync_dir("/")
    new_file(fs, "/tmp", b"new", sync=True)
    fs.rename("/tmp", "/old")  # replaces /old
    fs.unlink("/keep")
    trees = {s.fingerprint() for s in fs.crash_states(limit=1000)}
    as_dicts = [dict(t) for t in trees]
    assert {"/old": b"new"} in as_dicts  # all of it
    assert {"/old": b"old", "/keep": b"keep"} in as_dicts  # none of it
    assert {"/old": b"old"} in as_dicts  # the unlink without the rename: POSIX allows it
    assert {"/old": b"old", "/keep": b"keep", "/tmp": b"new"} in as_dicts  # the create without the rename
    assert all(d.get("/old") in (b"old", b"new") for d in as_dicts)  # the rename is atomic: never no /old
    fs.fsync_dir("/")
    assert fs.count_crash_states() == 1


def test_crash_picks_one_of_the_crash_states_and_numbers_carry_on():
    fs = CrashFS()
    h = new_file(fs, "/a", b"x" * 10, sync=False)
    allowed = {s.fingerprint() for s in fs.crash_states(limit=1000)}
    n = fs.op_count
    seen = set()
    for seed in range(40):
        f = fs.copy()
        f.crash(random.Random(seed))
        seen.add(f.fingerprint())
        assert not f.unsynced()
    assert seen <= allowed and len(seen) > 1
    fs.crash(random.Random(1))
    with pytest.raises(OSError):
        fs.append(h, b"y")  # handles die with the process
    fs.create("/b")
    assert fs.op_count == n + 1


def test_an_operation_can_be_made_to_fail_or_to_crash():
    fs = CrashFS()
    h = fs.create("/a")
    fs.fail_at[fs.op_count] = OSError(errno.EIO, "injected")
    with pytest.raises(OSError):
        fs.fsync(h)
    fs.fsync(h)  # only that one
    fs.fail_at[fs.op_count + 1] = SimulatedCrash()
    fs.append(h, b"a")
    with pytest.raises(SimulatedCrash):
        fs.append(h, b"b")
    with pytest.raises(SimulatedCrash):
        fs.listdir("/")  # the process is dead
    fs.crash_process()
    assert fs.read_file("/a") == b"a"  # the page cache survived the process


def test_disk_storage_runs_on_crashfs_and_recovers_from_a_crash():
    fs = CrashFS()
    s = DiskStorage("/data", fs=fs)
    s.load()
    es = [Entry(1, i, EntryKind.COMMAND, b"v%d" % i) for i in range(1, 6)]
    s.save(HardState(1, "a", 0), es)
    s.save(HardState(1, "a", 5), [], sync=False)
    with pytest.raises(DataDirLocked):
        DiskStorage("/data", fs=fs)
    assert any(k == "fdatasync" for _, k, _ in fs.ops)
    for state in fs.crash_states(limit=100):
        got = DiskStorage("/data", fs=state).load()
        assert got.entries == es and got.hard_state.current_term == 1
        assert got.hard_state.commit_index in (0, 5)


def test_a_full_disk_on_crashfs_is_diskfull():
    fs = CrashFS()
    s = DiskStorage("/data", fs=fs)
    s.load()
    fs.free_bytes = 100
    with pytest.raises(DiskFull):
        s.save(HardState(1, "a", 0), [Entry(1, 1, EntryKind.COMMAND, b"x" * 200)])
    fs.free_bytes = None
    s.save(HardState(1, "a", 0), [Entry(1, 1, EntryKind.COMMAND, b"x" * 200)])
    s.close()
    assert [e.index for e in DiskStorage("/data", fs=fs).load().entries] == [1]


def test_a_lost_page_of_the_unsynced_range_reads_as_zeros_while_later_pages_made_it():
    fs = CrashFS()
    fs.page_bytes = 16
    h = new_file(fs, "/a", b"0123", sync=True)
    fs.fsync_dir("/")
    fs.append(h, b"a" * 30)  # the unsynced range is bytes 4..33: pages 0 (from 4), 1 and 2
    got = contents(fs.crash_states(limit=1000), "/a")
    assert b"0123" + bytes(12) + b"a" * 18 in got  # page 0 lost (the synced bytes of it kept), pages 1-2 made it
    assert b"0123" + b"a" * 12 + bytes(16) + b"aa" in got  # page 1 lost
    assert all(c.startswith(b"0123") for c in got)
    assert b"0123" + b"a" * 28 + bytes(2) in got  # the last page lost
