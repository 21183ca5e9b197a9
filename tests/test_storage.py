"""DiskStorage against real files: crashes at every byte, corruption, locks, snapshots, and a model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftlib import Entry, EntryKind, HardState, MemoryStorage, Member, Membership, Snapshot
from raftlib.storage import CorruptLogError, DataDirLocked, DiskStorage, UnknownFormatError

MEMBERSHIP = Membership(voters=("a",), members=(Member("a", "localhost:5555", "localhost:8080"),))


def entries(first: int, count: int, term: int = 1, size: int = 20) -> list[Entry]:
    return [Entry(term, i, EntryKind.COMMAND, f"cmd-{i}-".encode().ljust(size, b"x")) for i in range(first, first + count)]


def reopen(path) -> tuple[DiskStorage, object]:
    s = DiskStorage(str(path))
    return s, s.load()


def segment_path(path) -> str:
    segs = sorted(os.listdir(os.path.join(path, "log")))
    return os.path.join(path, "log", segs[-1])


def test_save_and_reload(tmp_path):
    s, st0 = reopen(tmp_path)
    assert st0.entries == [] and st0.hard_state == HardState()
    s.save(HardState(1, "a", 0), entries(1, 3))
    s.save(HardState(2, None, 3), entries(4, 2, term=2))
    s.close()
    s, st1 = reopen(tmp_path)
    assert [e.index for e in st1.entries] == [1, 2, 3, 4, 5]
    assert st1.entries[3].term == 2
    assert st1.hard_state == HardState(2, None, 3)
    s.close()


def test_truncating_a_conflicting_suffix_survives_reopen(tmp_path):
    s, _ = reopen(tmp_path)
    s.save(HardState(1, "a", 1), entries(1, 5))
    s.save(HardState(2, "b", 1), entries(3, 1, term=2))  # a new leader overwrote 3..5
    s.close()
    s, st1 = reopen(tmp_path)
    assert [(e.index, e.term) for e in st1.entries] == [(1, 1), (2, 1), (3, 2)]
    s.close()


def test_second_process_on_the_same_dir_is_refused(tmp_path):
    s, _ = reopen(tmp_path)
    with pytest.raises(DataDirLocked, match="in use by another process"):
        DiskStorage(str(tmp_path))
    s.close()
    DiskStorage(str(tmp_path)).close()


def test_newer_format_is_refused(tmp_path):
    s, _ = reopen(tmp_path)
    s.write_identity("a", "localhost:5555", "localhost:8080")
    s.close()
    p = tmp_path / "node.json"
    p.write_text(p.read_text().replace('"format": 1', '"format": 99'))
    with pytest.raises(UnknownFormatError, match="format 99"):
        DiskStorage(str(tmp_path))


def _write_records(path, count: int) -> tuple[list[int], bytes]:
    """Write `count` single-entry records; return the file offset where each record ends, and the bytes."""
    s, _ = reopen(path)
    ends = []
    for i in range(1, count + 1):
        s.save(HardState(1, "a", i - 1), entries(i, 1))
        ends.append(os.path.getsize(segment_path(path)))
    s.close()
    with open(segment_path(path), "rb") as f:
        return ends, f.read()


def test_torn_tail_at_every_byte_offset_keeps_every_complete_record(tmp_path):
    base = tmp_path / "base"
    ends, data = _write_records(base, 4)
    start = ends[1]  # tear anywhere inside the last two records
    for cut in range(start, len(data)):
        d = tmp_path / f"cut{cut}"
        os.makedirs(d / "log")
        with open(os.path.join(d, "log", os.path.basename(segment_path(base))), "wb") as f:
            f.write(data[:cut])
        s, st1 = reopen(d)
        complete = sum(1 for e in ends if e <= cut)
        assert [e.index for e in st1.entries] == list(range(1, complete + 1)), cut
        # The torn bytes are gone from the file, and new appends land after the good records.
        s.save(None, entries(complete + 1, 1))
        s.close()
        s, st2 = reopen(d)
        assert [e.index for e in st2.entries] == list(range(1, complete + 2))
        s.close()


def test_corruption_before_the_tail_stops_with_file_and_offset(tmp_path):
    ends, data = _write_records(tmp_path, 4)
    seg = segment_path(tmp_path)
    for pos in range(ends[0] + 8, ends[1]):  # every payload byte of the second record
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        with open(seg, "wb") as f:
            f.write(bad)
        with pytest.raises(CorruptLogError, match=rf"{os.path.basename(seg)}: .* at offset {ends[0]}"):
            reopen(tmp_path)


def test_corrupted_last_record_is_treated_as_torn(tmp_path):
    ends, data = _write_records(tmp_path, 3)
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    with open(segment_path(tmp_path), "wb") as f:
        f.write(bad)
    s, st1 = reopen(tmp_path)
    assert [e.index for e in st1.entries] == [1, 2]
    s.close()


def test_snapshot_drops_old_segments_and_restart_replays_only_the_rest(tmp_path):
    s, _ = reopen(tmp_path)
    s.save(HardState(1, "a", 10), entries(1, 10))
    s.save_snapshot(Snapshot(8, 1, MEMBERSHIP, b"state-at-8"))
    s.save(HardState(1, "a", 12), entries(11, 2))
    s.close()
    assert len(os.listdir(tmp_path / "log")) == 1
    s, st1 = reopen(tmp_path)
    assert st1.snapshot == Snapshot(8, 1, MEMBERSHIP, b"state-at-8")
    assert [e.index for e in st1.entries] == [9, 10, 11, 12]
    assert st1.hard_state.commit_index == 12
    s.close()


def test_damaged_snapshot_is_reported(tmp_path):
    s, _ = reopen(tmp_path)
    s.save(HardState(1, "a", 3), entries(1, 3))
    s.save_snapshot(Snapshot(3, 1, MEMBERSHIP, b"abc"))
    s.close()
    snap = [p for p in os.listdir(tmp_path) if p.endswith(".snap")][0]
    with open(tmp_path / snap, "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    with pytest.raises(CorruptLogError, match="no readable snapshot"):
        reopen(tmp_path)


def test_snapshot_received_from_leader_replaces_a_disagreeing_log(tmp_path):
    s, _ = reopen(tmp_path)
    s.save(HardState(1, "a", 2), entries(1, 5))
    s.save(HardState(3, None, 20), [], Snapshot(20, 3, MEMBERSHIP, b"leader-state"))
    s.save(None, entries(21, 1, term=3))
    s.close()
    s, st1 = reopen(tmp_path)
    assert st1.snapshot.last_included_index == 20
    assert [e.index for e in st1.entries] == [21]
    s.close()


CHILD = textwrap.dedent(
    """
    import sys
    from raftlib import Entry, EntryKind, HardState
    from raftlib.storage import DiskStorage
    s = DiskStorage(sys.argv[1])
    st = s.load()
    i = len(st.entries) + 1
    while True:
        batch = [Entry(1, j, EntryKind.COMMAND, b"v%d" % j * 50) for j in range(i, i + (i % 7) + 1)]
        s.save(HardState(1, "a", i - 1), batch)
        i += len(batch)
        print(i - 1, flush=True)  # every index below i is durable now
    """
)


def test_sigkill_mid_append_loses_nothing_reported_durable(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    durable = 0
    for round_ in range(6):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 10
        seen = 0
        while seen < 200 + round_ * 37 and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            seen += 1
            durable = int(line)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        p.stdout.close()
        s, st1 = reopen(tmp_path)
        got = [e.index for e in st1.entries]
        assert got[: durable] == list(range(1, durable + 1)), "a durable entry is missing"
        assert got == list(range(1, len(got) + 1)), "entries invented or out of order"
        assert all(e.data == b"v%d" % e.index * 50 for e in st1.entries)
        s.close()
    assert durable >= 200


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 3), st.integers(1, 4)),  # back off by n, append k
        st.tuples(st.just("snapshot"), st.integers(0, 5)),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("hard_state"), st.integers(0, 5)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_disk_storage_matches_the_memory_model(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("model")
    disk, _ = reopen(path)
    model = MemoryStorage()
    term = 1
    for op in ops:
        state = model.load()
        base = state.snapshot.last_included_index if state.snapshot else 0
        last = base + len(state.entries)
        if op[0] == "append":
            # Raft never overwrites a committed entry (the load clamps a commit index beyond the log otherwise).
            first = max(base + 1, last + 1 - op[1], state.hard_state.commit_index + 1)
            term += 1 if op[1] else 0
            new = entries(first, op[2], term=term)
            for s in (disk, model):
                s.save(None, new)
        elif op[0] == "snapshot":
            index = last - op[1]
            if index > base:
                t = [e for e in state.entries if e.index == index][0].term
                snap = Snapshot(index, t, MEMBERSHIP, b"snap%d" % index)
                for s in (disk, model):
                    s.save_snapshot(snap)
        elif op[0] == "hard_state":
            hs = HardState(term, "a" if op[1] % 2 else None, min(op[1], last))
            for s in (disk, model):
                s.save(hs, [])
        else:
            disk.close()
            disk, _ = reopen(path)
        got, want = disk.load() if False else disk.state, model.load()
        assert got.entries == want.entries and got.snapshot == want.snapshot and got.hard_state == want.hard_state
    disk.close()
    disk, reloaded = reopen(path)
    want = model.load()
    assert reloaded.entries == want.entries
    assert reloaded.snapshot == want.snapshot
    assert reloaded.hard_state == want.hard_state
    disk.close()


def test_a_commit_index_alone_is_written_but_not_synced(tmp_path):
    synced = []
    s = DiskStorage(str(tmp_path), fdatasync=lambda fd, nbytes: synced.append(nbytes))
    s.load()
    s.save(HardState(1, "a", 0), entries(1, 3))
    assert len(synced) == 1
    s.save(HardState(1, "a", 3), [], sync=False)  # only the commit index moved (Ready.must_sync is False)
    assert len(synced) == 1
    s.close()
    s, st = reopen(tmp_path)
    assert st.hard_state == HardState(1, "a", 3) and [e.index for e in st.entries] == [1, 2, 3]
    s.close()
