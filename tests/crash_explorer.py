#!/usr/bin/env python
"""The crash-state explorer: DiskStorage workloads run on CrashFS, and at EVERY file operation every state a crash
could leave on the disk (tests/crashfs.py: unsynced data dropped, kept or torn; unsynced folder operations in any
applicable combination) is recovered with a fresh DiskStorage.load() and checked.

The checks, on each recovered state R, against the save in flight (or, between saves, the last one):
- it loads at all (a CorruptLogError on a state a crash can leave is a failure);
- the log is well formed: contiguous after the snapshot, terms never decrease along it (from the snapshot's term);
- R equals the state before or the state after the save in flight (a snapshot install included): the same
  snapshot, the same entries (so nothing cut before the last sync comes back, nothing synced is lost), the same
  term and vote; the commit index may be lost only back to what was fsynced;
- recovery is itself crash-safe where it writes (torn-tail truncation, deleting garbage, rewriting the log as a
  base segment): R is recovered again from every crash state at every operation of that recovery, and must still
  be allowed; and once a recovery has returned, every crash state after it must load as exactly what it returned;
- a process crash (SIGKILL: unsynced writes still in the page cache) is recovered too, and power failures during
  that recovery must not lose what it returned;
- no crash state holds a snapshot file cut under its final name (the garbage job cuts one only once its unlink
  is durable), and a snapshot a transfer held while it was garbage still reads whole when the transfer ends.

    python tests/crash_explorer.py                          # the hand-written workloads and 20 random ones
    python tests/crash_explorer.py --workloads 500 --seed 7  # a soak; prints how many crash states it explored
    python tests/crash_explorer.py --unsafe-replay-filter    # the replay before issue 11's fix: finds violations

Workloads are saves with and without sync, conflicting truncations, hard-state-only saves, snapshots taken by the
node and installed from a leader (agreeing with the log and not), segment rolls (every install starts a segment)
and reopens; some of them on a full disk, with a file operation failing, or out of file descriptors (EMFILE after
n more opens: OutOfDescriptors, and the state must not have moved). A share of the random ones leave what installs
make garbage to the runtime's garbage job, run between their steps (itself on a failing disk at times), while
transfers hold old snapshots; a share of the others run it beside snapshots of the node's own (stepped or forked,
their base segments pre-built) and leaders' (received), the job made in the loop and its thread run among their
steps (--mix-share). Random ones come from --seed; workload i of seed S is the same on every run (`--only i`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass, field, fields

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crashfs import CrashFS  # noqa: E402
from raftlib import Entry, EntryKind, HardState, Member, Membership, Snapshot, StoredState  # noqa: E402
from raftlib.messages import SnapshotUnreadable, snapshot_bytes  # noqa: E402
from raftlib import logformat  # noqa: E402
from raftlib import storage as storage_module  # noqa: E402
from raftlib.storage import DiskStorage  # noqa: E402
from raftlib.storage_errors import DiskFull, OutOfDescriptors, StorageError  # noqa: E402

DATA_DIR = "/data"
MEMBERSHIP = Membership(voters=("a",), members=(Member("a", "a:1", "a:2"),))


# ---- the expected state ---------------------------------------------------------------------------------------


@dataclass
class Model:
    """What storage must hold: the last saved state, and the commit index a crash cannot take away."""

    state: StoredState = field(default_factory=StoredState)
    durable_commit_index: int = 0

    def copy(self) -> Model:
        s = self.state
        return Model(StoredState(s.hard_state, s.snapshot, list(s.entries)), self.durable_commit_index)

    def after(self, step: tuple) -> Model:
        out = self.copy()
        s = out.state
        kind = step[0]
        if kind in ("save", "receive"):  # receive: a save whose snapshot came in chunks into its file
            _, hard_state, entries, snapshot, sync = step
            installed = snapshot is not None and s.install_snapshot(snapshot)
            if entries:
                s.put_entries(entries)
            if hard_state is not None:
                s.hard_state = hard_state
            if sync or installed:  # an fdatasync covers every earlier record; a base record holds the hard state
                out.durable_commit_index = s.hard_state.commit_index
        elif kind in ("snapshot", "snapshot_commit"):  # a commit: the second part of a forked snapshot
            if s.install_snapshot(step[1]):
                out.durable_commit_index = s.hard_state.commit_index
        elif kind in ("snapshot_write", "snapshot_abort") or kind.startswith(("base_", "stepped_", "garbage_")):
            pass  # the first part (a forked child's file, or a stepped one's pieces), or dropping it, or
            # pre-building the base segment of its commit (DiskStorage.begin_base, base_step, base_sync_job), or
            # freeing what installs made garbage (garbage_job) and holding an old snapshot's reader meanwhile:
            # nothing a reader uses changes
        elif kind == "reopen":
            out.durable_commit_index = s.hard_state.commit_index  # close() fsyncs; load() fsyncs what it read
        return out


def describe(st: StoredState) -> str:
    """One line: the snapshot, the log as runs of one term ("1..10@3 11..12@4"), the hard state."""
    snap = st.snapshot and (st.snapshot.last_included_index, st.snapshot.last_included_term)
    runs: list[list[int]] = []  # [first, last, term]
    for e in st.entries:
        if runs and runs[-1][2] == e.term and runs[-1][1] == e.index - 1:
            runs[-1][1] = e.index
        else:
            runs.append([e.index, e.index, e.term])
    log = " ".join(f"{a}..{b}@{t}" for a, b, t in runs)
    hs = st.hard_state
    return f"snapshot={snap} log=[{log}] term={hs.current_term} vote={hs.voted_for} commit={hs.commit_index}"


def problems(got: StoredState, candidates: list[Model]) -> str | None:
    """Why `got` is not an allowed recovery, or None."""
    base_index = got.snapshot.last_included_index if got.snapshot else 0
    base_term = got.snapshot.last_included_term if got.snapshot else 0
    for n, e in enumerate(got.entries):
        if e.index != base_index + 1 + n:
            return f"the log is not contiguous after the snapshot at {base_index}"
    terms = [base_term] + [e.term for e in got.entries]
    if any(a > b for a, b in zip(terms, terms[1:])):
        return "terms go down along the log"
    last_index = base_index + len(got.entries)
    hs = got.hard_state
    if hs.commit_index > last_index:
        return f"commit index {hs.commit_index} beyond the log's last index {last_index}"
    for m in candidates:
        want = m.state
        if got.snapshot != want.snapshot or got.entries != want.entries:
            continue
        if (hs.current_term, hs.voted_for) != (want.hard_state.current_term, want.hard_state.voted_for):
            continue
        high = min(want.hard_state.commit_index, want.last_index)
        low = min(m.durable_commit_index, high)
        if low <= hs.commit_index <= high:
            return None
    return "neither the state before nor the state after the save in flight"


SNAPSHOTS_CUT = "snapshot files that do not read whole under their final names"


def snapshots_cut(fs: CrashFS) -> list[str]:
    """The files under a snapshot's final name whose checksum does not hold: a snapshot is renamed into place only
    once fsynced whole, and the garbage job cuts an old one only once its unlink is durable (storage.py: nothing
    is cut by name), so no crash may show one cut or unwritten, whether or not load would read it (SNAPSHOTS_CUT:
    the violation's words)."""
    return sorted(p for p, data in fs.tree().items() if p.endswith(".snap") and data is not None
                  and (len(data) < 4 or zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "big")))


def in_memory(st: StoredState) -> StoredState:
    """`st` with its snapshot's data read into bytes: a loaded snapshot reads through a handle of the process that
    loaded it, which a later (simulated) process crash closes, while the explorer compares states across crashes."""
    s = st.snapshot
    if s is not None and not isinstance(s.data, bytes):
        s = Snapshot(s.last_included_index, s.last_included_term, s.membership, snapshot_bytes(s.data))
    return StoredState(st.hard_state, s, st.entries)


# ---- the explorer ---------------------------------------------------------------------------------------------


@dataclass
class Stats:
    crash_points: int = 0
    crash_states: int = 0  # recoveries from a power-failure crash state after a workload operation
    recovery_crash_states: int = 0  # recoveries from a crash state inside a recovery, or after one
    process_crashes: int = 0
    # What the garbage jobs of the workloads did (with_garbage_job): files opened, unlinked, cuts, and the jobs
    # an injected fault (a failing operation, EMFILE, ENOSPC) reached.
    garbage_opens: int = 0
    garbage_unlinks: int = 0
    garbage_cuts: int = 0
    garbage_faults: int = 0
    # The mix (with_garbage_mix): garbage jobs run while a snapshot of the node's own was written (its file, its
    # pre-built base segment), the mixed workloads explored and the crash states explored inside them.
    garbage_jobs_beside_snapshots: int = 0
    mixed_workloads: int = 0
    mixed_crash_states: int = 0
    violations: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.crash_states + self.recovery_crash_states + self.process_crashes

    def add(self, other: Stats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Limits:
    states: int = 32  # crash states recovered per crash point (all of them when there are fewer)
    nested_states: int = 6  # crash states per operation of a recovery
    nested_every: int = 4  # a recovery from every n-th crash state is crashed in too (the process crash: always)
    max_violations: int = 5


class _Found(BaseException):
    """A violation was recorded: stop exploring this crash point (raised through DiskStorage from a hook)."""


class Explorer:
    def __init__(self, name: str, limits: Limits, storage_fs=None) -> None:
        """`storage_fs(fs)`: what the workload's DiskStorage gets instead of the CrashFS (a test passes a file
        system that skips some syncs, to see that the explorer notices); recoveries always get the CrashFS."""
        self.name = name
        self.limits = limits
        self.storage_fs = storage_fs or (lambda fs: fs)
        self.stats = Stats()
        self.where = ""

    def violation(self, what: str, got: StoredState | None, candidates: list[Model]) -> None:
        lines = [f"{self.name}: {self.where}: {what}"]
        if got is not None:
            lines.append(f"    recovered: {describe(got)}")
        for label, m in zip(("before", "after"), candidates):
            lines.append(f"    {label:9}: {describe(m.state)} (durable commit {m.durable_commit_index})")
        self.stats.violations.append("\n".join(lines))
        raise _Found()

    def recover(self, fs: CrashFS) -> StoredState | str:
        try:
            return in_memory(DiskStorage(DATA_DIR, fs=fs).load())
        except StorageError as e:
            return f"recovery failed: {type(e).__name__}: {e}"

    def check(self, got: StoredState | str, candidates: list[Model]) -> None:
        if isinstance(got, str):
            self.violation(got, None, candidates)
        why = problems(got, candidates)
        if why is not None:
            self.violation(why, got, candidates)

    def recover_crashing(self, fs: CrashFS, candidates: list[Model], seed: int) -> None:
        """Recover `fs` (a copy of it), and at every operation of that recovery, recover each crash state of the
        moment: all must be allowed. Once it returned, every crash state must load as what it returned."""
        work = fs.copy()
        work.record_ops = False
        limits = self.limits

        def inside(wfs: CrashFS, number: int, kind: str, what: str) -> None:
            for state in wfs.crash_states(limits.nested_states, seed=seed + number):
                self.stats.recovery_crash_states += 1
                got = self.recover(state)
                if isinstance(got, str) or problems(got, candidates):
                    wfs.before_op = None  # the recovery being crashed in unwinds through close(): no more of this
                    self.where += f" / a crash in that recovery before its {kind} {what}"
                    self.check(got, candidates)

        work.before_op = inside
        got = self.recover(work)
        work.before_op = None
        self.check(got, candidates)
        garbage = [p for p in work.tree() if p.endswith(".tmp") or p.startswith(DATA_DIR + "/log/")]
        snapshots = [p for p in work.tree() if p.endswith(".snap")]
        if len(garbage) != 1 or len(snapshots) != (got.snapshot is not None):
            self.violation(f"recovery left garbage: {sorted(garbage + snapshots)}", got, candidates)
        for state in work.crash_states(limits.nested_states, seed=seed):
            self.stats.recovery_crash_states += 1
            again = self.recover(state)
            if isinstance(again, str) or (again.hard_state, again.snapshot, again.entries) != (
                    got.hard_state, got.snapshot, got.entries):
                self.violation("a crash after recovery returned loses what it returned: "
                               + (again if isinstance(again, str) else describe(again)), got, candidates)
        self.write_after_recovery(work, got, candidates, seed)

    def write_after_recovery(self, work: CrashFS, got: StoredState, candidates: list[Model], seed: int) -> None:
        """The recovered node goes on: a save of one more entry (fdatasynced) on what the recovery left, and every
        crash state after it must load as the recovered state with that entry (a torn tail load did not cut, or
        garbage it did not delete, would spoil it)."""
        work.crash_process()
        work.free_bytes = None  # the disk has room again
        storage = DiskStorage(DATA_DIR, fs=work)
        storage.load()
        last = got.raft_log().last_index
        term = max(got.hard_state.current_term, got.raft_log().last_term, 1)
        entry = es(last + 1, 1, term)[0]
        hs = HardState(term, got.hard_state.voted_for, got.hard_state.commit_index)
        storage.save(hs, [entry])
        want = (hs, got.snapshot, list(got.entries) + [entry])
        storage.close()
        for state in work.crash_states(self.limits.nested_states, seed=seed + 1):
            self.stats.recovery_crash_states += 1
            again = self.recover(state)
            if isinstance(again, str) or (again.hard_state, again.snapshot, again.entries) != want:
                self.violation(f"a save of entry {last + 1} after the recovery, then a crash: "
                               + (again if isinstance(again, str) else describe(again)), got, candidates)

    def crash_point(self, fs: CrashFS, candidates: list[Model], label: str) -> None:
        """Every crash state of `fs` as it is now, and a process crash, recovered and checked."""
        if len(self.stats.violations) >= self.limits.max_violations:
            return
        self.stats.crash_points += 1
        point = self.stats.crash_points
        try:
            for n, state in enumerate(fs.crash_states(self.limits.states, seed=point)):
                self.stats.crash_states += 1
                self.where = f"{label} (power failure, crash state {n})"
                cut = snapshots_cut(state)  # before the recovery deletes them (reported after its checks)
                if n % self.limits.nested_every == 0:
                    self.recover_crashing(state, candidates, seed=point * 1000 + n)
                else:
                    self.check(self.recover(state), candidates)
                if cut:
                    self.violation(f"{SNAPSHOTS_CUT}: {cut}", None, candidates)
            self.where = f"{label} (process crash)"
            self.stats.process_crashes += 1
            self.recover_crashing(fs.copy(), candidates, seed=point * 1000 + 999)
            cut = snapshots_cut(fs)
            if cut:
                self.violation(f"{SNAPSHOTS_CUT}: {cut}", None, candidates)
        except _Found:
            pass

    def run_garbage_job(self, fs: CrashFS, job, beside_a_snapshot: bool) -> None:
        """Run a garbage job, counting in the stats the files it opened, unlinked and cut, whether an injected
        fault reached it (it logs those: the garbage left goes at the next install or start; a folder fsync's is
        fatal at the next save), and whether it ran while a snapshot of the node's own was being written
        (`beside_a_snapshot`: its file or its base segment)."""
        ops, opens, faults = len(fs.ops), fs.descriptors_taken, fs.faults_injected
        job()
        kinds = [kind for _, kind, _ in fs.ops[ops:]]
        self.stats.garbage_opens += fs.descriptors_taken - opens
        self.stats.garbage_unlinks += kinds.count("unlink")
        self.stats.garbage_cuts += kinds.count("truncate")
        self.stats.garbage_faults += fs.faults_injected > faults
        self.stats.garbage_jobs_beside_snapshots += beside_a_snapshot

    def run(self, workload: list[tuple]) -> Stats:
        previous = logging.getLogger("raftlib.storage").level
        logging.getLogger("raftlib.storage").setLevel(logging.ERROR)  # torn tails are expected by the thousand
        try:
            self._run(workload)
        finally:
            logging.getLogger("raftlib.storage").setLevel(previous)
        return self.stats

    def _run(self, workload: list[tuple]) -> None:
        fs = CrashFS()
        fs.page_bytes = 512  # lost pages inside the small records of these workloads too
        model = Model()
        candidates = [model, model]
        step_label = "creating the data dir"
        failing = None  # [kind, how many more of that kind to let run, errno] while a "fail" step runs

        def hook(fs: CrashFS, number: int, kind: str, what: str) -> None:
            self.crash_point(fs, candidates, f"{step_label}, before operation {number} ({kind} {what})")
            if failing is not None and kind == failing[0]:
                if failing[1] == 0:
                    fs.fail_at[number] = OSError(failing[2], os.strerror(failing[2]))
                failing[1] -= 1

        fs.before_op = hook
        storage = DiskStorage(DATA_DIR, fs=self.storage_fs(fs))
        storage.load()
        unlink_later = False  # from a "garbage_later" step on, every storage of the run is as the runtime's
        held: list[Snapshot] = []  # snapshots whose data a "garbage_hold" keeps read (a leader's transfer)
        writing: dict[int, str] = {}  # forked snapshots written and not yet committed: index -> their file
        stepped: dict[int, list] = {}  # stepped snapshots being written: index -> [their file's writer, bytes left]
        syncing = None  # a pre-built base segment's sync begun ("base_sync_begin") and not yet ended
        garbage_running = None  # a garbage job made ("garbage_begin") whose thread has not run yet ("garbage_end")
        for i, step in enumerate(workload):
            if len(self.stats.violations) >= self.limits.max_violations:
                return
            full = step[0] == "full"  # ("full", free_bytes, step): the disk has only that much room for it
            if full:
                fs.free_bytes, step = step[1], step[2]
            fail = step[0] == "fail"  # ("fail", kind, n, errno, step): the n-th operation of that kind fails
            if fail:
                failing, step = [step[1], step[2], step[3]], step[4]
            no_descriptors = step[0] == "nofds"  # ("nofds", n, step): EMFILE from the (n+1)-th open on
            if no_descriptors:
                fs.opens_left, step = step[1], step[2]
            after = model.after(step)
            candidates = [model, after]
            step_label = f"step {i} {describe_step(workload[i])}"
            try:
                if step[0] == "save":
                    _, hard_state, entries, snapshot, sync = step
                    storage.save(hard_state, entries, snapshot, sync=sync)
                elif step[0] == "receive":
                    receive(storage, *step[1:])
                elif step[0] == "snapshot":
                    storage.save_snapshot(step[1])
                elif step[0] == "snapshot_write":  # what the runtime's forked child runs
                    index = step[1].last_included_index
                    writing[index] = storage.begin_snapshot(index)
                    storage.write_snapshot(step[1], writing[index])
                elif step[0].startswith("stepped_"):  # what the runtime's stepped snapshot runs
                    stepped_snapshot_step(storage, step, writing, stepped)
                elif step[0] == "snapshot_commit":  # what the runtime runs once the child exited 0
                    storage.commit_snapshot(step[1], writing.pop(step[1].last_included_index))
                elif step[0] == "snapshot_abort":  # a child that failed or was killed
                    storage.abort_snapshot(writing.pop(step[1].last_included_index))
                elif step[0] == "base_begin":  # the runtime, once the child is forked
                    storage.begin_base(step[1])
                elif step[0] == "base_step":  # the runtime's drives meanwhile
                    storage.base_step(step[1])
                elif step[0] in ("base_sync", "base_sync_begin"):  # the threadpool's fdatasync (begun only:
                    syncing = storage.base_sync_job()  # its end comes with "base_sync_end", steps between)
                    if syncing is not None and step[0] == "base_sync":
                        syncing[1](syncing[0]())
                        syncing = None
                elif step[0] == "base_sync_end":
                    if syncing is not None:
                        syncing[1](syncing[0]())
                        syncing = None
                elif step[0] == "garbage_later":  # the runtime's: what installs make garbage, for garbage_job
                    unlink_later = storage.unlink_garbage_later = True
                elif step[0] in ("garbage_job", "garbage_begin", "garbage_end"):
                    # Made at the end of a drive, for the threadpool, which runs it at once ("garbage_job"), or made
                    # ("garbage_begin") and run at its "garbage_end", the loop's steps between: one at a time.
                    if step[0] != "garbage_end":
                        assert garbage_running is None, "one garbage job at a time (the runtime's rule)"
                        garbage_running = storage.garbage_job()
                    if step[0] != "garbage_begin" and garbage_running is not None:
                        job, garbage_running = garbage_running, None
                        self.run_garbage_job(fs, job, bool(writing) or storage.base_pending() is not None)
                        storage.save(None, [])  # the runtime's next save: raises a folder fsync's error (fatal)
                elif step[0] == "garbage_hold":  # a transfer of the snapshot held now (if any) begins
                    if storage.state.snapshot is not None:
                        held.append(storage.state.snapshot)
                elif step[0] == "garbage_release":  # ... and ends: it read the whole snapshot
                    for h in held:
                        try:
                            unread = snapshot_bytes(h.data) != snap(h.last_included_index, h.last_included_term).data
                        except SnapshotUnreadable as e:
                            unread = str(e)
                        if unread:
                            self.where = step_label
                            try:
                                self.violation(f"a held snapshot ({h.last_included_index}, {h.last_included_term}) no "
                                               f"longer reads whole: {unread}", None, [model])
                            except _Found:
                                return
                        live_snapshot = storage.state.snapshot
                        if live_snapshot is None or h.data is not live_snapshot.data:
                            h.data.close()  # type: ignore[union-attr]  # (the storage still reads the live one)
                    held.clear()
                else:
                    storage.close()
                    storage = DiskStorage(DATA_DIR, fs=self.storage_fs(fs))
                    storage.load()
                    storage.unlink_garbage_later = unlink_later
                model = after
            except DiskFull:
                # The disk fills only in a "full" step, or when told to fail with ENOSPC; the state must not
                # have moved (checked below, and by the crash point after the step).
                assert full or (fail and failing[2] in (errno.ENOSPC, errno.EDQUOT)), step_label
            except OutOfDescriptors:
                # Only when the process runs out of them; the state must not have moved, as for DiskFull.
                assert no_descriptors, step_label
            except (OSError, StorageError) as e:
                # Fatal (fsyncgate): the node stops. The disk must recover to the state before or after the step,
                # now and after any crash; the process starts again on what it finds.
                if not fail or failing[1] >= 0:  # no fault injected (or not yet): the storage's own error
                    self.where = step_label
                    try:
                        self.violation(f"the step failed on a healthy disk: {type(e).__name__}: {e}", None,
                                       candidates)
                    except _Found:
                        return
                failing = None
                found = len(self.stats.violations)
                self.crash_point(fs, candidates, f"{step_label}: after the fatal {type(e).__name__} {e}")
                if len(self.stats.violations) > found:
                    return
                fs.crash_process()
                held.clear()  # the transfers died with the process, and a garbage job's thread
                garbage_running = None
                storage = DiskStorage(DATA_DIR, fs=self.storage_fs(fs))
                got = storage.load()
                model = next(m for m in candidates if (m.state.snapshot, m.state.entries) == (got.snapshot,
                                                                                             got.entries))
                model = model.copy()
                model.state.hard_state = got.hard_state  # the commit index may have gone back (checked above)
                model.durable_commit_index = got.hard_state.commit_index
            finally:
                fs.free_bytes = None
                fs.opens_left = None
                failing = None
            live = storage.state
            if (live.hard_state, live.snapshot, live.entries) != (model.state.hard_state, model.state.snapshot,
                                                                 model.state.entries):
                self.where = step_label
                try:
                    self.violation("the live state differs from the model: " + describe(live), None, [model])
                except _Found:
                    return
            candidates = [model]
            self.crash_point(fs, candidates, f"after step {i} {describe_step(step)}")
        fs.before_op = None
        storage.close()


def stepped_snapshot_step(storage: DiskStorage, step: tuple, writing: dict[int, str], stepped: dict[int, list]) -> None:
    """A part of a stepped snapshot, as raftlib.runtime writes it (issue 13): ("stepped_begin", snapshot) its
    file created with its head (DiskStorage.open_snapshot_file); ("stepped_append", index, n) the next n bytes of
    its data appended (the loop's steps, saves between them); ("stepped_end", index) the rest, the trailer, the
    fsync (the threadpool's), the close: then a "snapshot_commit" commits it, as a forked child's. A DiskFull or
    OutOfDescriptors (or a fatal error) closes and aborts it, as the runtime's `_finish_snapshot` does."""
    kind, index = step[0], (step[1].last_included_index if step[0] == "stepped_begin" else step[1])
    try:
        if kind == "stepped_begin":
            writing[index] = storage.begin_snapshot(index)
            stepped[index] = [None, snapshot_bytes(step[1].data)]
            stepped[index][0] = storage.open_snapshot_file(step[1], writing[index])
            return
        out, left = stepped[index]
        n = step[2] if kind == "stepped_append" else len(left)
        if n:
            out.append(left[:n])
        stepped[index][1] = left[n:]
        if kind == "stepped_end":
            out.finish()
            out.sync()
            out.close()
            del stepped[index]
    except BaseException:
        out = stepped.pop(index, [None])[0]
        if out is not None:
            out.close()
        storage.abort_snapshot(writing.pop(index))
        raise


def receive(storage: DiskStorage, hard_state, entries, snapshot: Snapshot, sync: bool) -> None:
    """What a follower's runtime does with a leader's snapshot (issue 13): its chunks into the storage's sink as
    they come (a few bytes each here, for many file operations), then the Ready's save with the finished data,
    which the install renames into place. A chunk the disk had no room for, or a finish that failed, is the
    DiskFull of this step: the transfer is dropped (the leader starts it over) and nothing may have changed."""
    sink = storage.receive_snapshot(snapshot)
    data = snapshot_bytes(snapshot.data)
    for offset in range(0, len(data), 4):
        sink.write(data[offset : offset + 4])
        if len(sink) != min(len(data), offset + 4):
            sink.discard()
            raise DiskFull("a chunk of the snapshot was held back (no room)")
    finished = sink.finish()
    if finished is None:
        sink.discard()
        raise DiskFull("the received snapshot could not be finished (no room)")
    storage.save(hard_state, entries, Snapshot(snapshot.last_included_index, snapshot.last_included_term,
                                               snapshot.membership, finished), sync=sync)


def describe_step(step: tuple) -> str:
    if step[0] == "full":
        return f"{describe_step(step[2])} with {step[1]} bytes free"
    if step[0] == "fail":
        return f"{describe_step(step[4])}, its {step[1]} number {step[2]} failing with {errno.errorcode[step[3]]}"
    if step[0] == "nofds":
        return f"{describe_step(step[2])} with {step[1]} file descriptors left"
    if step[0] in ("save", "receive"):
        _, hs, entries, snap, sync = step
        parts = []
        if snap is not None:
            parts.append(f"snapshot ({snap.last_included_index}, {snap.last_included_term})")
        if entries:
            parts.append(f"entries {entries[0].index}..{entries[-1].index}@{entries[0].term}")
        if hs is not None:
            parts.append(f"hs ({hs.current_term}, {hs.voted_for}, {hs.commit_index})")
        return "save " + ", ".join(parts) + ("" if sync else " (no sync)")
    if step[0] == "snapshot":
        return f"save_snapshot ({step[1].last_included_index}, {step[1].last_included_term})"
    if step[0].startswith("snapshot_") or step[0] == "base_begin":
        return f"{step[0]} ({step[1].last_included_index}, {step[1].last_included_term})"
    if step[0] == "base_step":
        return f"base_step ({step[1]} bytes)"
    if step[0] == "stepped_begin":
        return f"stepped_begin ({step[1].last_included_index}, {step[1].last_included_term})"
    if step[0].startswith("stepped_"):
        return f"{step[0]} ({step[1]}{f', {step[2]} bytes' if len(step) > 2 else ''})"
    if step[0].startswith(("base_", "garbage_")):
        return step[0]
    return "reopen"


# ---- workloads ------------------------------------------------------------------------------------------------


def es(first: int, count: int, term: int, size: int = 12) -> list[Entry]:
    return [Entry(term, i, EntryKind.COMMAND, (b"%d.%d:" % (term, i)).ljust(size, b"x")) for i in range(first, first + count)]


def snap(index: int, term: int) -> Snapshot:
    return Snapshot(index, term, MEMBERSHIP, b"state-%d-%d" % (index, term))


def save(hs, entries=(), snapshot=None, sync=True) -> tuple:
    return ("save", hs, list(entries), snapshot, sync)


def received(hs, entries=(), snapshot=None, sync=True) -> tuple:
    """A save whose snapshot a follower received in chunks into its file (`receive`)."""
    return ("receive", hs, list(entries), snapshot, sync)


HAND_WRITTEN: dict[str, list[tuple]] = {
    # Issue 13 (unlinkcut): what installs make garbage freed by the runtime's garbage job (`unlink_garbage_later`),
    # a big file opened, unlinked, then cut from its end a step at a time (GARBAGE_CUT_STEP_BYTES, scaled down)
    # through its descriptor; the node's own snapshots and a leader's, a reopen while garbage waits.
    "garbage-unlinked-then-cut": [
        ("garbage_later",),
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot", snap(8, 1)),
        save(HardState(1, "a", 12), es(11, 4, 1)),
        ("garbage_job",),
        ("snapshot", snap(12, 1)),
        received(HardState(2, "b", 20), es(21, 1, 2), snap(20, 2)),
        ("garbage_job",),
        save(HardState(2, "b", 21), es(22, 2, 2)),
        ("snapshot", snap(21, 2)),
        ("reopen",),  # the garbage not freed yet: load deletes it
        save(HardState(2, "b", 23), es(24, 1, 2)),
        ("snapshot", snap(23, 2)),
        ("garbage_job",),
    ],
    # ... an old snapshot a transfer still reads is unlinked whole, never cut (when the transfer is done it must
    # still read whole), and one still held at a reopen is deleted by load.
    "garbage-held-snapshot-unlinked-whole": [
        ("garbage_later",),
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot", snap(8, 1)),
        ("garbage_hold",),
        save(HardState(1, "a", 12), es(11, 4, 1)),
        ("snapshot", snap(12, 1)),
        ("garbage_job",),
        save(HardState(1, "a", 14), [], sync=False),
        ("garbage_job",),
        ("garbage_release",),
        ("garbage_job",),
        ("garbage_hold",),
        received(HardState(2, "b", 20), es(21, 1, 2), snap(20, 2)),
        ("garbage_job",),
        ("reopen",),
        ("garbage_release",),
        save(HardState(2, "b", 21), es(22, 1, 2)),
    ],
    # Issue 13: a leader's snapshot received into its file chunk by chunk, then installed by a rename.
    "received-snapshot-installed": [
        save(HardState(1, "a", 5), es(1, 10, 1)),
        received(HardState(2, "b", 15), es(16, 1, 2), snap(15, 2)),
        save(HardState(2, "b", 17), es(17, 1, 2)),
        received(HardState(3, "c", 20), [], snap(20, 3)),
    ],
    # ... while a forked child of the node's own writes its snapshot, which the received one then overtakes.
    "received-snapshot-over-a-forked-child": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        received(HardState(2, "b", 15), es(16, 1, 2), snap(15, 2)),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "b", 16), es(17, 1, 2)),
    ],
    # ... and the disk full part way through the chunks: nothing changes; the next transfer goes through.
    "received-snapshot-disk-full": [
        save(HardState(1, "a", 5), es(1, 10, 1)),
        ("full", 700, received(HardState(2, "b", 15), es(16, 1, 2), snap(15, 2))),
        received(HardState(2, "b", 15), es(16, 1, 2), snap(15, 2)),
    ],
    # Issue 13: a forked snapshot's two halves, the node saving (and syncing, and not) between them.
    "forked-snapshot-committed-after-saves": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        save(HardState(2, "a", 9), es(11, 2, 2)),
        save(HardState(2, "a", 10), [], sync=False),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "a", 12), es(13, 1, 2)),
    ],
    # Issue 13 (basestep): the commit's base segment pre-built while the child writes, a step at a time (one
    # entry a step here), its bulk synced (off the loop in the runtime), saves between; the commit appends only
    # the entries since the last step and the hard state, then renames it into place.
    "forked-base-prebuilt": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("base_step", 1),
        save(HardState(2, "a", 9), es(11, 2, 2)),
        ("base_step", 1 << 20),
        ("base_sync",),
        save(HardState(2, "a", 10), es(13, 1, 2)),
        ("base_step", 1),
        save(HardState(2, "a", 12), [], sync=False),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "a", 13), es(14, 1, 2)),
    ],
    # ... a new leader cuts entries the segment holds (a follower's log): it is begun again, from the new log.
    "forked-base-cut-below-what-it-holds": [
        save(HardState(1, "a", 8), es(1, 14, 1)),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("base_step", 1 << 20),
        ("base_sync",),
        save(HardState(2, "b", 8), es(11, 2, 2)),
        ("base_step", 1),
        save(HardState(2, "b", 9), es(13, 1, 2)),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "b", 10), es(14, 1, 2)),
    ],
    # ... cut right after it was begun again (no step since: the commit writes the whole log), and a sync of the
    # dropped file ending after the cut.
    "forked-base-cut-then-commit-at-once": [
        save(HardState(1, "a", 9), es(1, 14, 1)),
        ("snapshot_write", snap(9, 1)),
        ("base_begin", snap(9, 1)),
        ("base_step", 1 << 20),
        ("base_sync_begin",),
        save(HardState(2, "b", 9), es(14, 1, 2)),
        ("base_sync_end",),
        ("snapshot_commit", snap(9, 1)),
    ],
    # ... a full disk at a step, at its sync, at the commit's tail: the commit refuses (DiskFull), nothing changed;
    # the snapshot taken again goes through. (Each commit refused is run as a "full" step: DiskFull allowed.)
    "forked-base-disk-full-at-a-step": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("full", 40, ("base_step", 1 << 20)),
        save(HardState(1, "a", 9), es(11, 1, 1)),
        ("base_step", 1 << 20),
        ("full", 1 << 30, ("snapshot_commit", snap(8, 1))),
        ("snapshot_write", snap(9, 1)),
        ("base_begin", snap(9, 1)),
        ("base_step", 1 << 20),
        ("fail", "fdatasync", 0, errno.ENOSPC, ("base_sync",)),
        ("full", 1 << 30, ("snapshot_commit", snap(9, 1))),
        ("snapshot_write", snap(9, 1)),
        ("base_begin", snap(9, 1)),
        ("base_step", 1 << 20),
        ("fail", "fsync", 0, errno.ENOSPC, ("snapshot_commit", snap(9, 1))),
        ("snapshot_write", snap(9, 1)),
        ("base_begin", snap(9, 1)),
        ("base_step", 4),
        save(HardState(1, "a", 10), es(12, 1, 1)),
        ("snapshot_commit", snap(9, 1)),
    ],
    # ... no descriptor for the segment at its first step: the commit refuses (OutOfDescriptors), nothing changed.
    "forked-base-no-descriptor-at-a-step": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("nofds", 0, ("base_step", 1 << 20)),
        ("nofds", 9, ("snapshot_commit", snap(8, 1))),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("base_step", 1 << 20),
        ("snapshot_commit", snap(8, 1)),
    ],
    # ... a disk failing at the commit's tail or its rename (fatal: the node stops, starts again on what it finds).
    "forked-base-disk-fails-at-the-commit": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("base_step", 1 << 20),
        ("fail", "fsync", 0, errno.EIO, ("snapshot_commit", snap(8, 1))),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("base_step", 1 << 20),
        ("fail", "rename", 1, errno.EIO, ("snapshot_commit", snap(8, 1))),
        save(HardState(1, "a", 10), es(11, 1, 1)),
    ],
    # ... a leader's snapshot installed meanwhile, past the node's (the commit changes nothing) and below it (the
    # commit writes the whole log, the pre-built segment dropped with the install).
    "forked-base-overtaken-by-leaders-snapshots": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("base_step", 1 << 20),
        save(HardState(2, "b", 15), es(16, 1, 2), snap(15, 2)),
        ("base_step", 1 << 20),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "b", 20), es(17, 5, 2)),
        ("snapshot_write", snap(20, 2)),
        ("base_begin", snap(20, 2)),
        ("base_step", 1 << 20),
        received(HardState(2, "b", 18), [], snap(18, 2)),
        ("snapshot_commit", snap(20, 2)),
    ],
    # A leader's snapshot installed while the child writes: the commit finds it overtaken and changes nothing.
    "forked-snapshot-overtaken-by-a-leaders-snapshot": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        save(HardState(2, "b", 15), es(16, 1, 2), snap(15, 2)),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "b", 16), es(17, 1, 2)),
    ],
    # Issue 13 (stepped): a snapshot written by the loop a piece at a time, the node saving (and syncing, and not)
    # between the pieces and while its base segment is pre-built; then committed as a forked child's.
    "stepped-snapshot-committed-after-saves": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("stepped_begin", snap(8, 1)),
        ("base_begin", snap(8, 1)),
        ("stepped_append", 8, 3),
        save(HardState(2, "a", 9), es(11, 2, 2)),
        ("base_step", 1),
        ("stepped_append", 8, 2),
        save(HardState(2, "a", 10), [], sync=False),
        ("base_step", 1 << 20),
        ("stepped_end", 8),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "a", 12), es(13, 1, 2)),
    ],
    # ... the disk full at a piece (the snapshot dropped, its file unlinked), then at its file's create; the next
    # one goes through.
    "stepped-snapshot-disk-full": [
        save(HardState(1, "a", 9), es(1, 10, 1)),
        ("stepped_begin", snap(8, 1)),
        ("stepped_append", 8, 2),
        ("full", 2, ("stepped_append", 8, 4)),
        ("full", 0, ("stepped_begin", snap(8, 1))),
        ("stepped_begin", snap(9, 1)),
        ("stepped_end", 9),
        ("snapshot_commit", snap(9, 1)),
    ],
    # ... and overtaken by a leader's snapshot received while its pieces are written: its commit changes nothing.
    "stepped-snapshot-overtaken-by-a-leaders-snapshot": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("stepped_begin", snap(8, 1)),
        ("stepped_append", 8, 4),
        received(HardState(2, "b", 15), es(16, 1, 2), snap(15, 2)),
        ("stepped_end", 8),
        ("snapshot_commit", snap(8, 1)),
        save(HardState(2, "b", 16), es(17, 1, 2)),
    ],
    # A child that failed (or was killed): its file dropped; the next snapshot, in process, goes through.
    "forked-snapshot-child-failed": [
        save(HardState(1, "a", 9), es(1, 10, 1)),
        ("snapshot_write", snap(8, 1)),
        ("snapshot_abort", snap(8, 1)),
        ("snapshot_write", snap(9, 1)),
        ("snapshot_commit", snap(9, 1)),
    ],
    # Issue 11: a term-4 leader cut 1..14 (term 3) back to 12, then the node snapshots at 12.
    "issue11-cut-then-snapshot": [
        save(HardState(3, "a", 10), es(1, 14, 3)),
        save(HardState(4, "b", 12), es(11, 2, 4)),
        ("snapshot", snap(12, 4)),
        save(HardState(4, "b", 13), es(13, 1, 4)),
    ],
    # Issue 11's second case: a leader's snapshot disagrees with the log at its last index: all entries go.
    "issue11-disagreeing-leader-snapshot": [
        save(HardState(3, "a", 10), es(1, 14, 3)),
        save(HardState(4, None, 12), [], snap(12, 4)),
        save(None, es(13, 2, 4)),
    ],
    "leader-snapshot-past-a-short-log": [
        save(HardState(1, "a", 3), es(1, 5, 1)),
        save(HardState(3, None, 20), [], snap(20, 3)),
        save(None, es(21, 3, 3)),
        ("reopen",),
        save(HardState(3, None, 23), [], sync=False),
    ],
    "agreeing-leader-snapshot-keeps-the-rest": [
        save(HardState(1, "a", 4), es(1, 10, 1)),
        save(HardState(2, None, 6), es(11, 1, 2), snap(6, 1)),
        save(HardState(2, None, 8), [], sync=False),
    ],
    "full-disk-mid-install-then-more-saves": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("full", 80, ("snapshot", snap(8, 1))),  # the snapshot file fits (56 bytes), its segment (66) does not
        save(HardState(1, "a", 10), es(11, 2, 1)),  # the node carries on on the old segment
        ("full", 0, save(HardState(2, None, 10), es(13, 1, 2))),
        ("snapshot", snap(10, 1)),
        ("reopen",),
    ],
    # Review L1: a segment begun by a leader's snapshot past the log holds no entry in its first record; the
    # next install's segment is the log (the old code left all three segments when a power failure undid its
    # unlinks).
    "leader-snapshot-past-the-log-then-own-snapshot": [
        save(HardState(1, "a", 5), es(1, 10, 1)),
        save(HardState(2, None, 15), [], snap(15, 2)),
        save(HardState(2, None, 22), es(16, 10, 2)),
        ("snapshot", snap(20, 2)),
        save(HardState(2, None, 23), [], sync=False),
    ],
    # Review S1: no room at the fsync of the new segment (operation "fsync" number 1 of an install; number 0 is
    # the snapshot file's): DiskFull, and the node carries on with the old segment, acknowledging saves.
    "no-room-at-the-new-segments-fsync-then-more-saves": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        ("fail", "fsync", 1, errno.ENOSPC, ("snapshot", snap(8, 1))),
        save(HardState(1, "a", 10), es(11, 2, 1)),
        ("fail", "fsync_dir", 1, errno.EIO, ("snapshot", snap(10, 1))),
        save(HardState(1, "a", 12), es(13, 1, 1)),
    ],
    # The attacker review: EMFILE at each open of an install (the snapshot's temporary file, the new segment, the
    # listings for the garbage after the commit point), by the node and from a leader; each refused one is tried
    # again, and the garbage one left goes at the next install.
    "out-of-descriptors-at-each-open-of-an-install": [
        save(HardState(1, "a", 8), es(1, 10, 1)),
        # The opens of an install: its temporary file (0), the handle the snapshot is read through, taken before
        # the commit point (1), the new segment (2), then the folders' listings for the garbage (3 on).
        ("nofds", 0, ("snapshot", snap(6, 1))),
        ("nofds", 1, ("snapshot", snap(6, 1))),
        ("nofds", 2, ("snapshot", snap(6, 1))),
        ("nofds", 3, ("snapshot", snap(6, 1))),  # committed; the old segment and no snapshot listed, left
        save(HardState(1, "a", 10), es(11, 2, 1)),
        ("nofds", 1, save(HardState(2, None, 12), es(13, 1, 2), snap(12, 1))),
        ("nofds", 2, save(HardState(2, None, 12), es(13, 1, 2), snap(12, 1))),
        save(HardState(2, None, 12), es(13, 1, 2), snap(12, 1)),
        ("nofds", 0, save(HardState(2, None, 13), es(14, 2, 2))),  # a plain save opens nothing
        ("snapshot", snap(13, 2)),
        ("reopen",),
    ],
    "rolls-reopens-and-unsynced-commits": [
        save(HardState(1, "a", 0), es(1, 4, 1)),
        save(HardState(1, "a", 3), [], sync=False),
        save(HardState(1, "a", 4), [], sync=False),
        ("snapshot", snap(3, 1)),
        save(HardState(2, "b", 4), es(5, 2, 2)),
        ("reopen",),
        save(HardState(3, None, 4), es(6, 2, 3)),  # a conflicting truncation after a reopen
        ("snapshot", snap(5, 2)),
        ("snapshot", snap(6, 3)),
        save(HardState(3, "c", 6)),  # a vote alone
        ("reopen",),
    ],
}


def random_workload(rng: random.Random, steps: int) -> list[tuple]:
    """Raft-shaped saves: appends in the current term, cuts of an uncommitted suffix by a newer leader, commit-only
    saves without sync, term and vote changes, snapshots by the node (at or below the commit index) and from a
    leader (agreeing with the log at its index, or of a newer term), and reopens."""
    model = StoredState()
    term, vote = 1, "a"
    out = []
    for _ in range(steps):
        base, last = model.base_index, model.last_index
        commit = model.hard_state.commit_index
        r = rng.random()
        if r < 0.3 or last == base:
            n = rng.randint(1, 4)
            commit = min(last + n, commit + rng.randint(0, 3))
            step = save(HardState(term, vote, commit), es(last + 1, n, term, rng.choice((8, 12, 40))))
        elif r < 0.42 and commit < last:
            term += 1
            vote = rng.choice(("b", None))
            first = rng.randint(max(commit, base) + 1, last)
            step = save(HardState(term, vote, commit), es(first, rng.randint(1, 3), term))
        elif r < 0.55 and commit < last:
            step = save(HardState(term, vote, rng.randint(commit + 1, last)), [], sync=False)
        elif r < 0.62:
            term += rng.randint(0, 1)
            vote = rng.choice(("a", "b", None))
            step = save(HardState(term, vote, commit))
        elif r < 0.75 and commit > base:
            index = rng.randint(base + 1, commit)
            step = ("snapshot", snap(index, model.entries[index - base - 1].term))
        elif r < 0.85:
            if rng.random() < 0.5 and last > max(base, commit):
                index = rng.randint(max(base, commit) + 1, last)  # agrees with our log there
                s = snap(index, model.entries[index - base - 1].term)
                term = max(term, s.last_included_term)
            else:
                term += 1
                index = rng.randint(max(base, commit) + 1, last + 3)
                s = snap(index, term)  # a newer leader's: our entry there, if any, is of an older term
                vote = None
            extra = es(index + 1, rng.randint(0, 2), term) if rng.random() < 0.3 else []
            step = save(HardState(term, vote, max(commit, index)), extra, s)
        else:
            step = ("reopen",)
        r = rng.random()
        if step[0] != "reopen" and r < 0.15:
            # The disk is (nearly) full for this save: it fails with DiskFull, or not; then it is tried again, as
            # the runtime does (a save tried again after it worked changes nothing).
            out.append(("full", rng.choice((0, 5, 20, 60, 150, 400)), step))
        elif r < 0.3:
            # One of its file operations fails: DiskFull (then tried again), or fatal (the node stops; started
            # again, it finds the state before or after; the step is tried again, which changes nothing after).
            kind = rng.choice(("append", "fdatasync", "fsync", "fsync_dir", "create", "rename", "unlink", "truncate"))
            out.append(("fail", kind, rng.randint(0, 1), rng.choice((errno.ENOSPC, errno.EIO, errno.EDQUOT)), step))
        elif r < 0.4 and step[0] != "reopen":
            # The process runs out of file descriptors after a few opens: OutOfDescriptors (then tried again), or
            # through (a plain save opens nothing; an install's garbage listing may be refused after its commit).
            out.append(("nofds", rng.randint(0, 4), step))
        out.append(step)
        _apply_to_model(model, step)
    return out


def _apply_to_model(model: StoredState, step: tuple) -> None:
    """What a save or a node's snapshot of the workload makes of the state (when it goes through)."""
    if step[0] == "save":
        _, hs, entries, s, _ = step
        if s is not None:
            model.install_snapshot(s)
        if entries:
            model.put_entries(entries)
        if hs is not None:
            model.hard_state = hs
    elif step[0] == "snapshot":
        model.install_snapshot(step[1])


def _innermost(step: tuple) -> tuple:
    """The step a "full", "fail" or "nofds" wraps (the step itself when none)."""
    while step[0] in ("full", "fail", "nofds"):
        step = step[-1]
    return step


def _base_work(rng: random.Random, r: float, syncing: bool, step_below: float,
               sync_below: float) -> tuple[tuple, bool]:
    """One piece of a pre-built base segment's work, drawn from `r`: a step of the base (r < step_below), an
    fdatasync of its bulk begun in the threadpool (r < sync_below, none running), the running one's end, or one
    in the loop; and whether one runs after it."""
    if r < step_below:
        return ("base_step", rng.choice((1, 30, 200, 1 << 20))), syncing
    if r < sync_below and not syncing:
        return ("base_sync_begin",), True
    if syncing:
        return ("base_sync_end",), False
    return ("base_sync",), syncing


def with_forked_base(rng: random.Random, workload: list[tuple]) -> list[tuple]:
    """`workload` with forked snapshots whose base segment is pre-built interleaved (review basestep T2): once the
    commit index is past the snapshot's, now and then a child writes a snapshot at a committed index and its base
    is begun; the next few steps are followed by base steps of varied sizes and syncs (whole, or begun and ended
    across later saves and the commit: the threadpool's), then the commit. Inside such a window no reopen or
    node's own snapshot (the runtime takes one at a time, and a restart kills the child), and a fatal failure is
    left out (it restarts the node and its child)."""
    model = StoredState()
    out: list[tuple] = []
    window = None
    left = 0
    syncing = False
    for step in workload:
        inner = _innermost(step)
        if window is not None and inner[0] in ("reopen", "snapshot"):
            continue
        if window is not None and step[0] == "fail":
            step = inner
        out.append(step)
        _apply_to_model(model, inner)
        if window is None:
            if model.hard_state.commit_index > model.base_index and rng.random() < 0.5:
                index = rng.randint(model.base_index + 1, min(model.hard_state.commit_index, model.last_index))
                window = snap(index, model.entries[index - model.base_index - 1].term)
                out += [("snapshot_write", window), ("base_begin", window)]
                left, syncing = rng.randint(1, 5), False
            continue
        for _ in range(rng.randint(0, 2)):
            step, syncing = _base_work(rng, rng.random(), syncing, 0.6, 0.8)
            out.append(step)
        left -= 1
        if left == 0:
            out.append(("snapshot_commit", window))  # a sync begun may still run: the commit must not use it
            if syncing and rng.random() < 0.5:
                out.append(("base_sync_end",))
            window = None
    if window is not None:
        out.append(("snapshot_commit", window))
    return out


# The share of random workloads run as the runtime's storage runs them (`with_garbage_job`).
GARBAGE_SHARE = 0.35


def with_garbage_job(rng: random.Random, workload: list[tuple]) -> list[tuple]:
    """`workload` with what installs make garbage left for the garbage job, as the runtime does (review unlinkcut
    T2): "garbage_later" first; after a step now and then the job (the threadpool's, at the end of a drive), at
    times with one of its operations failing (EIO or ENOSPC at an unlink, a cut or a cut's fdatasync: logged,
    what is left goes at the next install or start; at a folder fsync: fatal at the next save) or out of
    descriptors (a file it cannot open is unlinked whole; without a folder's, every file is, none cut, and
    what it could not unlink goes to the next job); and a transfer of the snapshot held then begun
    ("garbage_hold") and ended a few steps later ("garbage_release": it must still read whole). Only steps are
    added: the workload's own are kept, in order, and `rng` is the workload's own garbage one."""
    out: list[tuple] = [("garbage_later",)]
    release_in = 0  # steps until the transfers held end (0: none held)
    for step in workload:
        out.append(step)
        if step[0] in ("full", "fail", "nofds"):
            continue  # the step is tried again next: the job comes after that
        if release_in:
            release_in -= 1
            if not release_in:
                out.append(("garbage_release",))
        r = rng.random()
        if r < 0.15:
            kind = rng.choice(("unlink", "fsync_dir", "truncate", "fdatasync"))
            out.append(("fail", kind, rng.randint(0, 2), rng.choice((errno.EIO, errno.ENOSPC)), ("garbage_job",)))
        elif r < 0.25:
            out.append(("nofds", rng.randint(0, 2), ("garbage_job",)))
        elif r < 0.55:
            out.append(("garbage_job",))
        elif r < 0.7 and not release_in:
            out.append(("garbage_hold",))
            release_in = rng.randint(1, 4)
    if release_in:
        out.append(("garbage_release",))
    out.append(("garbage_job",))
    return out


# The share of the other random workloads (those not drawn for `with_garbage_job`) mixed (`with_garbage_mix`).
MIX_SHARE = 0.12
MIXED = "(garbage mix)"  # the end of a mixed workload's name


def with_garbage_mix(rng: random.Random, workload: list[tuple]) -> list[tuple]:
    """`workload` run as the runtime's storage runs it, the garbage job beside snapshots of the node's own and
    leaders' (review explmix): "garbage_later" first; now and then, once the commit index is past the snapshot's,
    a snapshot at a committed index is begun, stepped (its file a few bytes a step: "stepped_append") or by a
    forked child, and usually its base segment pre-built ("base_begin", steps, syncs whole or begun and ended
    across later steps), then ended and committed a few steps later, while a garbage job is made
    ("garbage_begin": the names the installs so far made garbage, in the loop) and run later ("garbage_end": its
    thread, then, at times with an operation failing or out of descriptors), or made and run at once
    ("garbage_job"), and a transfer holds the snapshot of the moment ("garbage_hold", "garbage_release"). A
    leader's snapshot is received in chunks at times ("receive"). The runtime's orders: one snapshot and one garbage
    job at a time; no node's own snapshot in process or reopen while one is written (a restart kills the child or
    the stepper; a fatal failure inside is run without its fault); a job's thread ends before a reopen (the close
    waits for it). Only steps are added (and some saves received): the workload's own are kept, in order, and
    `rng` is the workload's own mix one."""
    out: list[tuple] = [("garbage_later",)]
    model = StoredState()
    window: Snapshot | None = None  # the snapshot of the node's own being written
    stepped_bytes: int | None = 0  # its bytes not yet appended when it is stepped (None: a forked child's)
    steps_left = 0  # workload steps until it is ended and committed
    syncing = job_running = False
    release_in = 0  # steps until the transfers held end (0: none held)

    def garbage_step() -> tuple:
        r = rng.random()
        if r < 0.2:
            kind = rng.choice(("unlink", "fsync_dir", "truncate", "fdatasync"))
            return ("fail", kind, rng.randint(0, 2), rng.choice((errno.EIO, errno.ENOSPC)), ("garbage_end",))
        if r < 0.3:
            return ("nofds", rng.randint(0, 2), ("garbage_end",))
        return ("garbage_end",)

    for step in workload:
        inner = _innermost(step)
        if window is not None and inner[0] in ("reopen", "snapshot"):
            continue
        if window is not None and step[0] == "fail":
            step = inner
        if inner[0] == "reopen" and job_running:
            out.append(garbage_step())
            job_running = False
        if step is inner and step[0] == "save" and step[3] is not None and rng.random() < 0.5:
            step = ("receive",) + step[1:]
        out.append(step)
        _apply_to_model(model, inner)
        if step[0] in ("full", "fail", "nofds"):
            continue  # the step is tried again next: the rest comes after that
        if not job_running and (inner[0] == "snapshot" or inner[0] == "save" and inner[3] is not None):
            out.append(("garbage_begin",))  # the job of what an install made garbage, at the end of its drive
            job_running = True
        if window is None and model.hard_state.commit_index > model.base_index and (
                rng.random() < (0.8 if job_running else 0.3)):  # mostly while a job waits for its thread
            index = rng.randint(model.base_index + 1, min(model.hard_state.commit_index, model.last_index))
            window = snap(index, model.entries[index - model.base_index - 1].term)
            if rng.random() < 0.6:
                out.append(("stepped_begin", window))
                stepped_bytes = len(snapshot_bytes(window.data))
            else:
                out.append(("snapshot_write", window))
                stepped_bytes = None
            if rng.random() < 0.8:
                out.append(("base_begin", window))
            steps_left, syncing = rng.randint(1, 3), False
        elif window is not None:
            for _ in range(rng.randint(1, 3)):
                r = rng.random()
                if r < 0.3 and job_running:
                    out.append(garbage_step())  # the job's thread runs among the snapshot's steps
                    job_running = False
                elif r < 0.5 and stepped_bytes:
                    n = rng.randint(1, min(4, stepped_bytes))
                    out.append(("stepped_append", window.last_included_index, n))
                    stepped_bytes -= n
                else:
                    step, syncing = _base_work(rng, r, syncing, 0.65, 0.85)
                    out.append(step)
            steps_left -= 1
            if steps_left == 0:
                if stepped_bytes is not None:
                    out.append(("stepped_end", window.last_included_index))
                out.append(("snapshot_commit", window))  # a sync begun may still run: the commit must not use it
                if syncing and rng.random() < 0.5:
                    out.append(("base_sync_end",))
                    syncing = False
                window = None
                if not job_running:  # the runtime makes the job of what the commit made garbage at once
                    out.append(("garbage_begin",))
                    job_running = True
                continue
        if release_in:
            release_in -= 1
            if not release_in:
                out.append(("garbage_release",))
        r = rng.random()
        if job_running and r < 0.15:
            out.append(garbage_step())
            job_running = False
        elif not job_running and r < 0.3:
            out.append(("garbage_job",))
        elif r < 0.45 and not release_in:
            out.append(("garbage_hold",))
            release_in = rng.randint(1, 4)
    if window is not None:
        if stepped_bytes is not None:
            out.append(("stepped_end", window.last_included_index))
        out.append(("snapshot_commit", window))
    if job_running:
        out.append(garbage_step())
    if release_in:
        out.append(("garbage_release",))
    return out


def workloads(count: int, seed: int, hand_written: bool = True, forked_base: bool = False,
              garbage_share: float | None = None, mix_share: float | None = None):
    """The hand-written workloads and `count` random ones of `seed`; with `forked_base`, each random one with
    forked snapshots whose base segment is pre-built interleaved (`with_forked_base`). A share of the random ones
    (`garbage_share`, by default GARBAGE_SHARE, and none with `forked_base`: test_crash_explorer pins its
    workloads; each drawn from a generator of its own, so the others are as before) leave their garbage to the
    garbage job (`with_garbage_job`); a share of the rest (`mix_share`, by default MIX_SHARE, none with
    `forked_base`; a generator of its own too) run it beside snapshots of the node's own and leaders'
    (`with_garbage_mix`: their names end with MIXED)."""
    if garbage_share is None:
        garbage_share = 0.0 if forked_base else GARBAGE_SHARE
    if mix_share is None:
        mix_share = 0.0 if forked_base else MIX_SHARE
    if hand_written:
        yield from HAND_WRITTEN.items()
    for i in range(count):
        rng = random.Random(f"{seed}:{i}")
        if forked_base:
            name = f"random seed {seed} forked-base workload {i}"
            workload = with_forked_base(rng, random_workload(rng, rng.randint(6, 14)))
        else:
            name = f"random seed {seed} workload {i}"
            workload = random_workload(rng, rng.randint(4, 12))
        garbage_rng = random.Random(f"{seed}:{i}:garbage")
        if garbage_rng.random() < garbage_share:
            name, workload = f"{name} (garbage job)", with_garbage_job(garbage_rng, workload)
        else:
            mix_rng = random.Random(f"{seed}:{i}:mix")
            if mix_rng.random() < mix_share:  # a longer workload, its own draw: room for snapshots beside jobs
                name = f"{name} {MIXED}"
                workload = with_garbage_mix(mix_rng, random_workload(mix_rng, mix_rng.randint(8, 14)))
        yield name, workload


# The garbage job's cut, scaled down to these workloads' files (tens of bytes): several cuts a file.
GARBAGE_CUT_STEP_BYTES = 16


def explore(items, limits: Limits, unsafe_replay_filter: bool = False, out=None, storage_fs=None,
            record_bytes: int | None = None) -> Stats:
    """`record_bytes`: MAX_RECORD_BYTES for the run (scaled down, saves and base records become groups)."""
    total = Stats()
    storage_module.UNSAFE_REPLAY_FILTER = unsafe_replay_filter
    saved_limit = logformat.MAX_RECORD_BYTES
    if record_bytes is not None:
        logformat.MAX_RECORD_BYTES = record_bytes
    saved_cut = storage_module.GARBAGE_CUT_STEP_BYTES
    storage_module.GARBAGE_CUT_STEP_BYTES = GARBAGE_CUT_STEP_BYTES
    try:
        for name, workload in items:
            stats = Explorer(name, limits, storage_fs).run(workload)
            if name.endswith(MIXED):
                stats.mixed_workloads, stats.mixed_crash_states = 1, stats.total
            total.add(stats)
            if out is not None and stats.violations:
                print("\n".join(stats.violations), file=out)
    finally:
        storage_module.UNSAFE_REPLAY_FILTER = False
        logformat.MAX_RECORD_BYTES = saved_limit
        storage_module.GARBAGE_CUT_STEP_BYTES = saved_cut
    return total


# ---- data dirs of the code before base records (format 1) --------------------------------------------------------


class _Killed(BaseException):
    """The old process died here (raised out of the old code; nothing of it runs after)."""


class _OldOs:
    """`os` for tests/format1_storage.py (the frozen code before base records): every call that changes the disk
    first calls `before(kind, path)` (where the explorer takes the state a kill there leaves), and the unlinks and
    creations that no folder fsync has covered yet are kept, to build what a power failure can leave. Syncs change
    nothing on a real disk here: only what the process sees is used."""

    def __init__(self, before) -> None:
        self._before = before
        self.dir_fds: dict[int, str] = {}
        self.unsynced_unlinks: dict[str, dict[str, bytes]] = {}  # folder -> {path: content}
        self.unsynced_creations: dict[str, set[str]] = {}  # folder -> paths

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, *args):
        fd = os.open(path, flags, *args)
        if os.path.isdir(path):
            self.dir_fds[fd] = os.path.abspath(path)
        return fd

    def close(self, fd):
        self.dir_fds.pop(fd, None)
        os.close(fd)

    def fsync(self, fd):
        self._before("fsync", self.dir_fds.get(fd, "a file"))
        folder = self.dir_fds.get(fd)
        if folder is not None:
            self.unsynced_unlinks.pop(folder, None)
            self.unsynced_creations.pop(folder, None)

    def fdatasync(self, fd):
        self._before("fdatasync", "a file")

    def write(self, fd, data):
        self._before("write", "a file")
        return os.write(fd, data)

    def ftruncate(self, fd, size):
        self._before("ftruncate", "a file")
        os.ftruncate(fd, size)

    def replace(self, src, dst):
        self._before("replace", dst)
        os.replace(src, dst)

    def unlink(self, path):
        self._before("unlink", path)
        with open(path, "rb") as f:
            content = f.read()
        os.unlink(path)
        folder = os.path.dirname(os.path.abspath(path))
        if path in self.unsynced_creations.get(folder, ()):
            self.unsynced_creations[folder].discard(path)
        else:
            self.unsynced_unlinks.setdefault(folder, {})[path] = content

    def created(self, path) -> None:
        self.unsynced_creations.setdefault(os.path.dirname(os.path.abspath(path)), set()).add(path)


class _OldFile:
    """A file object of the old code whose writes are kill points (before the data reaches its buffer)."""

    def __init__(self, f, before) -> None:
        self._f, self._before = f, before

    def write(self, data):
        self._before("write", self._f.name)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _tree(root: str) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        out[folder] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.join(folder, name)] = f.read()
    return out


def crashfs_of(tree: dict[str, bytes | None], root: str) -> CrashFS:
    """A CrashFS holding `tree` (paths under `root`, put under DATA_DIR), everything durable."""
    fs = CrashFS()
    for path in sorted(tree):
        where = DATA_DIR + path[len(root):]
        if tree[path] is None:
            fs.mkdir(where)
        else:
            h = fs.create(where)
            fs.append(h, tree[path])
            fs.fsync(h)
            fs.close(h)
    for path in sorted(p for p in tree if tree[p] is None):
        fs.fsync_dir(DATA_DIR + path[len(root):])
    fs.fsync_dir("/")
    fs.ops.clear()
    return fs


def format1_states(workload: list[tuple], root: str):
    """Run `workload` with the frozen code before base records (tests/format1_storage.py) in the empty folder
    `root`, and yield, at every file operation it does, (label, tree, candidates): the data dir as a kill
    there leaves it, and as a power failure there can (the unlinks and the segment creations no folder fsync
    covered undone), with the states that code had in memory before and after the step in flight (and, for a
    save with a snapshot, after the install and before the Ready's record). Steps "reopen" are not run (the old
    load could itself bring cut entries back, issue 11), and "full", "fail" and "nofds" steps run without their
    fault (the old code's handling of faults is not the point here)."""
    import format1_storage as old

    states: list = []
    label = ["creating the data dir"]
    candidates: list[Model] = [Model()]

    def before(kind: str, path: str) -> None:
        if shim is None:
            return
        states.append((f"{label[0]}, before its {kind} of {path} (killed)", _tree(root), list(candidates)))
        unlinks = {p: c for d in shim.unsynced_unlinks.values() for p, c in d.items()}
        creations = {p for d in shim.unsynced_creations.values() for p in d}
        if unlinks or creations:
            tree = _tree(root)
            tree.update(unlinks)
            for p in creations:
                tree.pop(p, None)
            states.append((f"{label[0]}, before its {kind} of {path} (power failure)", tree, list(candidates)))

    def old_open(path, mode="r", *args, **kwargs):
        if "w" in mode and shim is not None:
            before("create", path)
            existed = os.path.exists(path)
            f = _OldFile(open(path, mode, *args, **kwargs), before)
            if not existed:
                shim.created(path)
            return f
        return open(path, mode, *args, **kwargs)

    shim = None
    saved = old.os, getattr(old, "open", None)
    old.os = _OldOs(before)
    old.open = old_open
    try:
        s = old.DiskStorage(root)
        s.load()
        shim = old.os
        model = Model()
        for i, step in enumerate(workload):
            step = _innermost(step)
            if step[0] in ("reopen", "snapshot_write", "snapshot_abort") or step[0].startswith(
                    ("base_", "stepped_", "garbage_")):
                continue  # the old code took its snapshots whole: a forked child's or a stepped one's file (or the
                # pre-built base segment of its commit) is its commit's step; it unlinked its garbage at once
            if step[0] == "receive":  # the old code had the received snapshot in memory: a save
                step = ("save",) + step[1:]
            after = model.after(step)
            after.durable_commit_index = 0  # the old code's commit index may be lost back to any
            candidates[:] = [model, after]
            if step[0] == "save" and step[3] is not None:
                mid = model.copy()
                mid.durable_commit_index = 0
                if mid.state.install_snapshot(step[3]):
                    candidates.append(mid)
            label[0] = f"old code: step {i} {describe_step(step)}"
            yield from states
            states.clear()
            if step[0] == "save":
                _, hard_state, entries, snapshot, sync = step
                s.save(hard_state, entries, snapshot, sync=sync)
            else:
                s.save_snapshot(step[1])
            live = s.state
            assert (live.snapshot, live.entries, live.hard_state) == (
                after.state.snapshot, after.state.entries, after.state.hard_state), label[0]
            model = after
        candidates[:] = [model]
        label[0] = "old code: after the last step"
        yield from states
        states.clear()
        shim = None
        yield label[0], _tree(root), [model]
        s.close()
    finally:
        old.os = saved[0]
        if saved[1] is None:
            del old.open
        else:
            old.open = saved[1]


def explore_format1(items, limits: Limits, out=None) -> Stats:
    """Every data dir the code before base records leaves (format1_states) is upgraded by today's load, crashed in
    at every operation of that upgrade, and checked against the state the old code had."""
    import tempfile

    total = Stats()
    previous = logging.getLogger("raftlib.storage").level
    logging.getLogger("raftlib.storage").setLevel(logging.ERROR)
    try:
        for name, workload in items:
            explorer = Explorer(f"format 1: {name}", limits)
            with tempfile.TemporaryDirectory() as tmp:
                root = os.path.join(tmp, "data")
                for n, (label, tree, candidates) in enumerate(format1_states(workload, root)):
                    if len(explorer.stats.violations) >= limits.max_violations:
                        break
                    explorer.stats.crash_points += 1
                    explorer.where = label
                    try:
                        explorer.recover_crashing(crashfs_of(tree, root), candidates, seed=n)
                    except _Found:
                        pass
            total.add(explorer.stats)
            if out is not None and explorer.stats.violations:
                print("\n".join(explorer.stats.violations), file=out)
    finally:
        logging.getLogger("raftlib.storage").setLevel(previous)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", type=int, default=20, help="random workloads (after the hand-written ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=int, default=None, help="run only random workload number ONLY of the seed")
    p.add_argument("--states", type=int, default=Limits.states, help="crash states per crash point")
    p.add_argument("--nested-states", type=int, default=Limits.nested_states)
    p.add_argument("--nested-every", type=int, default=Limits.nested_every)
    p.add_argument("--seconds", type=float, default=None, help="stop starting new workloads after this long")
    p.add_argument("--unsafe-replay-filter", action="store_true", help="the replay before issue 11's fix")
    p.add_argument("--record-bytes", type=int, default=None, help="MAX_RECORD_BYTES scaled down (groups)")
    p.add_argument("--print-workload", action="store_true")
    p.add_argument("--forked-base", action="store_true",
                   help="random workloads with forked snapshots whose base segment is pre-built interleaved")
    p.add_argument("--garbage-share", type=float, default=None,
                   help=f"the share of random workloads with the garbage job (default {GARBAGE_SHARE}, "
                        "none with --forked-base)")
    p.add_argument("--mix-share", type=float, default=None,
                   help=f"the share of the others with the garbage job beside snapshots (default {MIX_SHARE}, "
                        "none with --forked-base)")
    args = p.parse_args()
    limits = Limits(args.states, args.nested_states, args.nested_every)
    if args.only is not None:
        items = [w for n, w in enumerate(workloads(args.only + 1, args.seed, False, args.forked_base,
                                                   args.garbage_share, args.mix_share)) if n == args.only]
    else:
        items = workloads(args.workloads, args.seed, forked_base=args.forked_base, garbage_share=args.garbage_share,
                          mix_share=args.mix_share)
    started = time.monotonic()
    total = Stats()
    runs = 0
    for name, workload in items:
        if args.seconds is not None and time.monotonic() - started > args.seconds:
            break
        if args.print_workload:
            print(name)
            for i, step in enumerate(workload):
                print(f"  step {i}: {describe_step(step)}")
        total.add(explore([(name, workload)], limits, args.unsafe_replay_filter, out=sys.stdout,
                          record_bytes=args.record_bytes))
        runs += 1
    elapsed = time.monotonic() - started
    print(f"{runs} workloads, {total.crash_points} crash points, {total.total} crash states explored "
          f"({total.crash_states} after workload operations, {total.recovery_crash_states} in or after a recovery, "
          f"{total.process_crashes} process crashes) in {elapsed:.1f}s: {len(total.violations)} violations")
    return 1 if total.violations else 0


if __name__ == "__main__":
    sys.exit(main())
