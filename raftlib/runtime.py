"""Runtime: drives one RaftNode with gevent: ticks, the inbox, disk, transport and the state machine.

Rules: one greenlet at a time touches the node, in `_drive`. Everything else (HTTP handlers, the transport's
greenlets) puts an item in the inbox and waits on a result with a bound; `_loop` drives for them, waking for
the inbox or once a tick at the latest. A transport greenlet that finds the node free drives it itself (a
peer's message, a reply), saving two greenlet switches a hop. A drive advances the node's clock by the monotonic
clock, takes everything waiting at once, steps the node with all of it, and only then lets its timers fire (after
a stall, once each, on what the peers sent meanwhile: issue 13; so the answers to rounds sent before the stall
count, and a leader cut off during a stall steps down within one election timeout of running time after it
resumes, not at once), then handles each Ready in order: save (one
fsync for the whole batch: group commit), send, apply, wake the waiting requests, advance. A disk failure stops
the node rather than acknowledge anything (fsyncgate). A full disk is waited out instead: the save is tried
again until there is room, nothing is sent or acknowledged meanwhile (to the others the node looks paused), and
new proposals are refused at once. A save refused for want of a file descriptor (OutOfDescriptors: nothing
changed on the disk; descriptors come back as connections close) is waited out too, tried again every
`descriptor_retry_seconds` and logged at most once a second, but proposals are not refused: only a follower's
install of a leader's snapshot opens files, a leader's saves never do. A snapshot of this node's own that meets
a full disk or no descriptor is tried again later: the log on disk still holds everything. A leader's snapshot
goes to its file as its chunks come (the storage's sink), and once saved is restored into the state machine a
few pieces per drive of the loop's own (`restoring`, RESTORE_DRIVE_SECONDS; a transport greenlet that drives takes
none, so its reply leaves first, but for a leader's snapshot the first step, in the greenlet that saved it): the
node answers heartbeats, votes and appends meanwhile and applies nothing (the core hands out no committed entry
until `snapshot_applied`).

Every map and list a request waits in is bounded: by the request's own deadline (`_deadlines`; `_index_waiters`
and `_reads_waiting_apply`, left by the last caller that gives up: the index may never be applied here, e.g. on
a node cut off or removed right after it got a read index), by the node (`_reads`: the core answers or fails
every read within its read_timeout_ticks), by the log (`_proposals`: one per entry of this node's log, answered
when that index is applied or a snapshot replaces it), by one (`_read_waiting`: per kind, the read not yet
taken, shared by every caller meanwhile), or by the drive (`_inbox`: it takes everything at once; while a drive
waits for a full disk, a peer's frame not taken within `deliver_timeout_seconds` is dropped, as the network may
drop it, proposals are refused at once and reads share one item; only the rare membership changes and transfers
queue up). A proposal, a membership change or a transfer whose caller gave up (its deadline passed) before a drive
took it is dropped there, never carried out: its caller, told it timed out, never sees it happen later.

The runtime keeps the node's recent events for people watching (`events`, raftlib.events: GET /events and the
dashboard): it records them where it already notes them, from what it sees (a Ready's role, term and leader, a
configuration applied, a snapshot taken, sent or installed, a full disk), never inside the core and never per write.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import itertools
import logging
import os
import posix
import random
import resource
import signal
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.monkey

from . import crashpoints, events, readonly
from .core import NodeStatus, NotLeader, ProposalDropped, RaftNode, Ready, TargetRestoring, UncommittedBoundExceeded
from .interfaces import StateMachine, Storage, Transport
from .messages import ConfChange, Entry, EntryKind, InstallSnapshot, Membership, Message, Role, Snapshot
from .fs import NO_DESCRIPTOR
from .snapshotfile import SNAPSHOT_IO_BYTES, export_snapshot
from .storage_errors import DiskFull, OutOfDescriptors

logger = logging.getLogger("raftlib.runtime")

# Test-only (tests/faults.py), ignored unless set: RAFTDZMQ_TEST_CLOCK_RATE=1.15 makes the clock this node's ticks
# are derived from run 1.15 times as fast as the monotonic clock (0.87: slower), to test what the lease assumes
# about clock rates (README, "Lease reads and their clock assumption").
_CLOCK_RATE = float(os.environ.get("RAFTDZMQ_TEST_CLOCK_RATE") or 1)
# How a snapshot of this node's own is written (Runtime.snapshot_mode; the server's -snapshot-mode): "stepped" (the
# default) by the loop itself a bounded step at a time from a copy-on-write view of the state (issue 13: no fork,
# whose page-table copy held the loop 10-18 ms at 1M keys), for a state machine that has one
# (KeyValueStore.begin_stepped_snapshot: from feature level 3), else as "fork"; "fork" by a forked child (Redis's
# BGSAVE), in process where os.fork does not exist; "in-process" whole in the loop (it stalls for as long as it
# takes). RAFTDZMQ_SNAPSHOT_MODE sets the default; RAFTDZMQ_SNAPSHOT_FORK=0 (older) means "in-process".
SNAPSHOT_MODES = ("stepped", "fork", "in-process")
_CAN_FORK = hasattr(os, "fork")
_SNAPSHOT_MODE = os.environ.get("RAFTDZMQ_SNAPSHOT_MODE") or (
    "in-process" if os.environ.get("RAFTDZMQ_SNAPSHOT_FORK", "1") == "0" else "stepped")
# A stepped snapshot's greenlet runs writer steps of at most STEPPED_SNAPSHOT_STEP_ITEMS keys (or leases: ~0.3 ms
# at 256 keys of 100 bytes here) and appends their bytes to the file while both its CPU and its wall time in this
# turn of the loop stay under STEPPED_SNAPSHOT_TURN_SECONDS (the CPU clock alone lets a turn run long in wall time,
# what clients see, on a loaded machine), then yields a turn (timers, sockets, drives): under the 10 ms stall
# target (issue 13), progressing under constant load (every turn gives it one) and when idle.
STEPPED_SNAPSHOT_TURN_SECONDS = 0.002
STEPPED_SNAPSHOT_STEP_ITEMS = 256
# RAFTDZMQ_SNAPSHOT_CHILD_TIMEOUT_SECONDS: a snapshot child that has not finished by then is killed, and the next
# snapshot is taken in process (a child that hangs once may hang again: whatever held it is not known).
_SNAPSHOT_CHILD_TIMEOUT_SECONDS = float(os.environ.get("RAFTDZMQ_SNAPSHOT_CHILD_TIMEOUT_SECONDS") or 600)
# Test-only: a snapshot's child sleeps this long before it writes (tests/test_snapshot_fork.py kills the parent
# meanwhile).
_TEST_CHILD_DELAY_SECONDS = float(os.environ.get("RAFTDZMQ_TEST_SNAPSHOT_CHILD_DELAY_SECONDS") or 0)
# The hub-lag probe (bench/snapshot_stall.py sets 0.001): a greenlet sleeps this long and records how late it woke,
# in stats (loop_lag_max_microseconds, loop_lags_over_10ms), and logs each wake-up later than
# LOOP_LAG_LOGGED_SECONDS with what the loop's thread did meanwhile (`_probe_loop_lag`). 0: off.
_LOOP_LAG_PROBE_SECONDS = float(os.environ.get("RAFTDZMQ_LOOP_LAG_PROBE_SECONDS") or 0)
LOOP_LAG_LOGGED_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1
# A snapshot transfer abandoned because its file could not be read is logged at most once per peer this often.
SNAPSHOT_READ_WARNING_SECONDS = 10.0
# After a stall (a drive that finds at least an election timeout of ticks due), the drive first yields this long:
# the frames that came meanwhile are taken from zmq into the inbox (zmq's I/O thread may have to read them off TCP
# first, after a SIGSTOP), so the timers that ran out judge on them. A stall has already cost an election timeout.
# Shorter catch-ups do not yield (review stallstep L3): a drive a few heartbeats late is common under load, and
# a shorter stall leaves part of the check-quorum window (or election timeout) before it, when answers were stepped.
# If the inbox is still empty then, the drive waits for its first item up to one heartbeat interval: a peer's
# transport holds what it has for this node until this node answered its last request (raftlib.transport: a live
# peer's late reply is waited for), and those answers went out only after the stalled drive, so the leader's next
# frame comes a round trip after them (review replytimeout F1). An empty inbox after a stall costs that wait once.
STALL_YIELD_SECONDS = 0.001
# A drive advances a restore under way by steps back to back while the next one (as long as the longest this drive
# has taken) still fits in this much wall time, then yields (issue 13, restart1m). One step a drive, as before,
# spent most of a restart's restore waiting: each yield is a turn of the loop (gevent.sleep(0.00001): libev's
# poll waits at least 1 ms, ~1.4 ms measured) and ~1,000 steps at 1,000,000 keys. Kept well under the stall target
# (10 ms). Only the loop's drives take steps (a transport greenlet's reply does not wait for them: review of
# restart1m, L1), and from the hand-over on (the step that replaces the state, then applies up to 256 entries) one a
# drive, not within the budget: the last one lets the collector go (a collection, 50+ ms at 1M keys). The loop's
# longest pause is this budget plus the heaviest single step (a step being 1-8 ms CPU; the hand-over or the last
# more), and a frame that arrives meanwhile waits that long in its socket.
RESTORE_DRIVE_SECONDS = 0.005
# A snapshot of this node's own commits with a base segment pre-built while its child writes (issue 13, basestep:
# DiskStorage.begin_base): each drive of the loop writes the log since the snapshot into it by steps of
# BASE_STEP_BYTES of entries while they fit in BASE_DRIVE_SECONDS, and its bulk is fdatasynced in gevent's
# threadpool (a file no reader uses yet) once BASE_SYNC_BYTES are unsynced, and once more when the child is done.
# Only the loop's drives take steps (as a restore's: a transport greenlet that drives answers its frame first).
# The commit waits, drives going on, until the segment holds the whole log and at most BASE_COMMIT_UNSYNCED_BYTES
# of it are unsynced (its own fsync then small) and no sync of it runs: at most BASE_WAIT_SECONDS after the child
# is done, then it commits anyway (the entries the segment lacks written in the loop; a segment whose sync still
# runs is dropped and the log written whole, as before basestep: never a commit through a threadpool fdatasync that
# has not ended, whose EIO the commit's fsync on the same descriptor might not see, fsyncgate).
BASE_STEP_BYTES = 256 << 10
BASE_DRIVE_SECONDS = 0.003
BASE_SYNC_BYTES = 8 << 20
BASE_COMMIT_UNSYNCED_BYTES = 1 << 20
BASE_WAIT_SECONDS = 5.0
# A snapshot that is due (the log over its threshold, or one requested) while a committed backlog is being applied
# waits for the backlog's end, which it then covers whole, but at most this long from when it first waited; then it
# is taken at the applied index, mid-backlog. The wait: DiskStorage.log_bytes counts the committed entries not
# applied yet, so a log over the threshold stays over it after a snapshot of a piece, and one was taken after every
# piece (review applycap L1). The bound: under a steady load the leader's backlog seldom empties at a drive's end,
# and an unbounded wait postponed its snapshots for seconds while the log grew (review stall1m L1: 7.2 s, 86.7 MB
# at a 1 MB threshold). Mid-backlog, a snapshot is taken at most once per this bound (plus its own duration).
SNAPSHOT_BACKLOG_WAIT_SECONDS = 1.0
# A snapshot of the node's own is due once the log since the newest snapshot holds at least max(the byte threshold,
# this ratio x that snapshot's size) (`Runtime._maybe_snapshot`; -snapshot-log-ratio). With a fixed threshold alone,
# a 580 MB state was rewritten for every 16 MiB of log at 5,000,000 keys (~35x write amplification: every node
# wrote a stepped snapshot 94-97% of the time, and the cluster changed leader 31 times while loading: issue 13).
# Redis rewrites its AOF once it has grown by a percentage of its last rewrite the same way. A bigger ratio means
# fewer snapshots but more log to replay at a restart: see docs/BENCHMARKS.md ("Snapshot log ratio") for the
# default's measurement. 0: the byte threshold alone (as before).
SNAPSHOT_LOG_RATIO = 0.25
# A drive applies committed pieces (Config.max_committed_entries_per_ready / _bytes_) one after the other while the
# loop's thread has spent less than this much CPU in the drive's Readys, then yields a turn of the loop (`_drive`)
# and leaves the rest to the next drives. The pieces bound each step; this lets a drive apply more than one, so
# that the leader's apply keeps up with its commits (review stall1m L2: one 64 KiB piece a drive, and the loaded leader's
# commit-applied lag had a median of 23-28 entries).
APPLY_DRIVE_SECONDS = 0.003
# How long `stop` waits for the threadpool's jobs on the data dir (the pre-built base's fdatasync, the unlink of a
# snapshot's garbage) before it returns and the caller closes the storage (its folder handles, LOCK): review
# basestep L2/L3. Past it, a warning: a job still running may touch the folder after that.
STOP_DISK_JOBS_SECONDS = 10.0
STOP_CHILD_EXIT_SECONDS = 2.0  # stop's bound on the reap of a killed snapshot child, and of the backups' children


class Timeout(Exception):
    """The request did not finish in time; for a write, its outcome is unknown."""


class EntryLost(Exception):
    """The entry was overwritten by a new leader: it was not, and will never be, committed."""


class Stopped(Exception):
    """The node is stopping or has stopped. Raised to a request already queued, its outcome is unknown: a proposal
    may have been appended, even committed, before the node stopped."""


class NotRunning(Stopped):
    """The node was not running when the request came: nothing was queued, so nothing will come of it. Raised
    only before a request is put in the inbox or registered (`_call`, `read`, `wait_applied`); once it is, the
    request gets Stopped."""


class BackupBusy(Exception):
    """As many backups as may run at once (MAX_BACKUPS) are being taken: nothing was started; ask again later."""


class BackupFailed(Exception):
    """The backup could not be written (its child failed, the disk is full, nothing applied yet): nothing is
    left behind."""


@dataclass(frozen=True, slots=True)
class Backup:
    """A backup (Runtime.backup): the snapshot file of the state machine at `index`, `size` bytes whose SHA-256 is
    `sha256` (hex), open for reading in `file`, whose name is already unlinked. `close()` closes it (freeing the
    space) and ends its count against MAX_BACKUPS: a backup counts until then, while it is streamed too (review of
    ops, finding 3: N slow readers held N copies of the state on the disk the log needs)."""

    index: int
    sha256: str
    size: int
    file: Any
    release: Callable[[], None] = lambda: None  # called once, by close()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
            self.release()


class CollectorHold:
    """The cyclic garbage collector held off while a leader's snapshot is restored a step per drive (issue 13).

    With the collector on, a restore of 1M keys had steps of 32-78 ms (bench/restore_steps.py): a collection of
    the oldest generation walked the growing state (69 ms), then untracked the new map, which the next record
    tracked again into the youngest generation, so the next young collections walked all of it too (~20 ms each).
    Held, the collector runs only as `after_step`'s collection of the youngest generation (what that step made:
    ~0.1 ms, and the records of atomic values leave its sight there), and once the restore ends the restored
    state is frozen (gc.freeze, as raftlib.server.tuning does after start-up): unfrozen, every later collection
    of the oldest generation walked its 1M records again (51 ms). Frozen objects are still freed by their
    reference count, so the next restore frees this state as before.

    The price: a cycle of garbage made during the restore that outlives the step it was made in (and one in the
    older generations not collected yet when it ends) is frozen with the state: what a few seconds of serving
    leave, once per restore, and restores repeat (a follower that keeps falling behind). Bounded by a sweep
    (`sweep`: everything unfrozen, collected in full, frozen again), a pause of a full collection of the whole heap
    (59 ms CPU at 1M keys on a quiet machine, 109-205 ms under load), so only once earlier restores left more than
    SWEEP_AFTER_FROZEN_GROWTH objects frozen that are still there. Counted at a restore's end before its own freeze
    (`_freeze_or_sweep`), against the lowest count seen at such a point since the last sweep: the state this restore
    replaced was freed by its steps (frozen objects leave the count when their reference count frees them), and
    what earlier restores froze alive has left too (the log's entries, compacted or replaced by the install; the
    watch history's events, evicted or cleared by the restore), while frozen garbage stays. Counted after the
    freeze, as it was, the growth held the state just restored and what the serving made live meanwhile: at 300k
    keys under writes a restore froze 19,609 objects (9,085 log entries, 9,085 watch events, ~1,100 of the state's
    own), so it swept, and the sweep then found 5-15 objects of garbage, for 63-68 ms of CPU. Frozen garbage
    stays under that many objects plus what the last restore froze (not counted until the next restore's end),
    plus what lived frozen at the lowest count and died since (between two sweeps the floor only goes down). A state
    kept alive frozen by earlier restores counts like garbage (a sweep comes earlier, never later).

    The hold is counted (several runtimes in one process, as tests run them): the collector comes back on when
    the last hold is released, on every way out (the restore done, the node stopping, a step that raised), and
    only if it was on before; a restore replaced by a newer one keeps it, once, and its replacement collects the
    two younger generations (`collect_replaced`). It is also let go while a save waits for room or a descriptor
    (Runtime._wait_to_save_again: no step runs then, however long it lasts), taken again once saved."""

    SWEEP_AFTER_FROZEN_GROWTH = 10_000  # objects left frozen by earlier restores, garbage perhaps, before a sweep
    # Restores' ends since the last sweep before one sweeps whatever the count says: live objects frozen at the last
    # sweep that die meanwhile (the log compacted, watch events evicted) hide as many objects of garbage from the
    # count (review of fix2snap, L2: 32,500 cycles of 2,500 a restore, against 7,500 without): this caps that at as
    # many restores' garbage. A sweep (59-205 ms at 1M keys) per this many restores (each 6-30 s there) at most.
    SWEEP_AFTER_RESTORES = 20
    _restores_since_sweep = 0

    _holders = 0
    _was_enabled = False
    # gc.get_freeze_count() after the last sweep (or at the first hold), lowered to the count at a restore's end
    # before its freeze whenever that is lower (`_freeze_or_sweep`).
    _frozen_floor: int | None = None
    # True from the moment everything is unfrozen for a sweep (`begin_sweep`: here, or FreezeSurvivors at a
    # collection's stop) until the full collection that walks it all ends it (`end_sweep`): a freeze before that
    # would cancel the sweep and leave its garbage frozen (review of gcpause, L2), so a restore's end sweeps then.
    unfrozen_for_sweep = False

    def __init__(self) -> None:
        self.held = False

    def hold(self) -> None:
        if self.held:
            return
        self.held = True
        if CollectorHold._holders == 0:
            CollectorHold._was_enabled = gc.isenabled()
            gc.disable()
            if CollectorHold._frozen_floor is None:
                CollectorHold._frozen_floor = gc.get_freeze_count()
        CollectorHold._holders += 1

    def after_step(self) -> None:
        """A collection of the youngest generation only: what the step made, unless the collector was off anyway."""
        if self.held and CollectorHold._was_enabled:
            gc.collect(0)

    def collect_replaced(self) -> None:
        """A restore replaced by a newer one, the hold kept: the two younger generations collected once, what the
        replaced restore left that outlived its steps (its partial state is left to the new restore's first steps
        to free, by reference count; the oldest generation is not walked: the state being served). Without it the
        collector left a chain of replacing restores' garbage to the last one's freeze (and the sweep)."""
        if self.held and CollectorHold._was_enabled:
            gc.collect(1)

    def release(self, freeze: bool) -> None:
        """Back on once no runtime holds it (if it was on); with `freeze`, the restored state out of its sight."""
        if not self.held:
            return
        self.held = False
        CollectorHold._holders -= 1
        if freeze and CollectorHold._was_enabled:
            gc.collect(0)
            self._freeze_or_sweep()
        if CollectorHold._holders == 0 and CollectorHold._was_enabled:
            gc.enable()

    @staticmethod
    def _freeze_or_sweep() -> None:
        """The restored state frozen, or, once earlier restores left more than SWEEP_AFTER_FROZEN_GROWTH objects
        frozen (counted before this freeze: the class's rules) or SWEEP_AFTER_RESTORES restores ended since the last
        sweep, everything swept instead (the sweep freezes too)."""
        frozen = gc.get_freeze_count()
        floor = min(frozen, CollectorHold._frozen_floor if CollectorHold._frozen_floor is not None else frozen)
        CollectorHold._frozen_floor = floor
        CollectorHold._restores_since_sweep += 1
        if CollectorHold.unfrozen_for_sweep or frozen - floor > CollectorHold.SWEEP_AFTER_FROZEN_GROWTH or \
                CollectorHold._restores_since_sweep >= CollectorHold.SWEEP_AFTER_RESTORES:
            CollectorHold.sweep()
        else:
            gc.freeze()

    @staticmethod
    def sweep() -> None:
        """Everything unfrozen, collected in full, frozen again: the frozen garbage freed, in one full collection
        of the whole heap (bench/restore_steps.py --compare times it). Logged: it holds the event loop."""
        started, frozen = time.thread_time(), gc.get_freeze_count()
        CollectorHold.begin_sweep()
        found = gc.collect()  # FreezeSurvivors, when installed, ends the sweep in this collection's stop callback
        if CollectorHold.unfrozen_for_sweep:
            CollectorHold.end_sweep()
        logger.info("swept the garbage frozen by restores: %d unreachable objects collected (%d were frozen) in %.0f ms"
                    " of CPU", found, frozen, (time.thread_time() - started) * 1000)

    @staticmethod
    def begin_sweep() -> None:
        """Everything unfrozen: the next full collection walks the whole heap (and must end with `end_sweep`)."""
        gc.unfreeze()
        CollectorHold.unfrozen_for_sweep = True

    @staticmethod
    def end_sweep() -> int:
        """At the end of the full collection that walked the whole heap: everything frozen again, and the counts of
        both sweeping policies start over here (this class's floor and restores; FreezeSurvivors takes the frozen
        count returned, after each sweep whoever began it)."""
        gc.freeze()
        CollectorHold.unfrozen_for_sweep = False
        CollectorHold._frozen_floor = frozen = gc.get_freeze_count()
        CollectorHold._restores_since_sweep = 0
        return frozen


MAX_BACKUPS = 1  # backups written at once: each child may grow to the size of the state (copy on write)


class _Expired(Exception):
    """Set by the expiry sweep on a request whose time is up; its waiter raises Timeout."""


# ---- the inbox: one item type per kind of input (etcd's node.go gives each its own channel; h11 its event
# classes). Items are compared by identity (eq=False): two equal requests are still two requests.


@dataclass(frozen=True, slots=True, eq=False)
class Deliver:
    """Messages from a peer; `result`, when not None, takes the messages to answer with (its REP socket waits)."""

    messages: list[Message]
    result: gevent.event.AsyncResult | None


@dataclass(frozen=True, slots=True, eq=False)
class Propose:
    command: bytes
    result: gevent.event.AsyncResult
    # Runtime.propose's `configuration`: (term, configuration index) the entry must be appended in, or None.
    configuration: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Read:
    lease: bool
    result: gevent.event.AsyncResult


@dataclass(frozen=True, slots=True, eq=False)
class ChangeMembership:
    change: ConfChange
    result: gevent.event.AsyncResult


@dataclass(frozen=True, slots=True, eq=False)
class Transfer:
    target: str
    result: gevent.event.AsyncResult


InboxItem = Deliver | Propose | Read | ChangeMembership | Transfer


@dataclass(frozen=True, slots=True)
class RuntimeStatus:
    """What the node is and knows (`node`), and how its runtime is doing: a frozen copy (hashicorp/raft's Stats)."""

    node: NodeStatus
    running: bool  # started, not stopped, and its driving loop alive (Runtime.alive)
    disk_full: bool  # saves are failing for lack of room: writes are refused
    stats: Mapping[str, int]  # every counter of _COUNTERS, since start
    # time.monotonic() when this node last stepped a message from its leader (a follower), or last drove the node
    # while leading (its own check-quorum then says whether it still leads); -inf if never. `node.leader_active`
    # is as of the last drive, by ticks: after a pause (SIGSTOP) it is stale until the next drive, and a request
    # may be served first. Compared with the clock at the request (GET /readyz, review L3).
    leader_contact_at: float = float("-inf")
    election_timeout_seconds: float = 0.0  # the node's election_ticks in seconds


_COUNTERS = (
    "proposals",  # taken as leader
    "proposals_refused_uncommitted",  # refused as leader at Config.max_uncommitted_bytes (the server's own too)
    "applied",  # entries applied
    "elections_won",
    "saves",  # Readies saved (one fsync each when they must sync)
    "snapshots",  # taken of this node's own state machine
    "out_of_descriptors",  # saves and snapshots refused for want of a file descriptor (each try)
    "snapshot_children_failed",  # snapshots whose file was not written (a forked child's, or a stepped one's)
    "snapshot_reads_failed",  # snapshot transfers abandoned: the snapshot's file could not be read (logged)
    "snapshots_installed",  # leaders' snapshots saved here and restored (or being restored) into the state machine
    "snapshot_catch_up_appends",  # appends sent from the entries kept behind the snapshot's cut, not the snapshot
    "restore_step_max_microseconds",  # the longest step of restoring a leader's snapshot, in CPU time
    "snapshot_commit_max_microseconds",  # the longest commit of a snapshot of this node's own, in wall time
    "snapshot_stepped_cpu_microseconds",  # the last stepped snapshot's CPU in the loop's thread (steps, appends)
    "snapshot_stepped_wall_microseconds",  # ... and its wall time from its begin to its file's fsync
    "loop_lag_max_microseconds",  # the hub-lag probe, when on: the latest wake-up seen
    "loop_lags_over_10ms",  # ... and how many wake-ups came more than 10 ms late
)


class Runtime:
    def __init__(
        self,
        node: RaftNode,
        storage: Storage,
        transport: Transport,
        state_machine: StateMachine,
        tick_seconds: float = 0.01,
        snapshot_threshold_bytes: int = 16 << 20,
        on_fatal: Callable[[Exception], object] | None = None,
        snapshot_mode: str | None = None,
        snapshot_log_ratio: float = SNAPSHOT_LOG_RATIO,
    ) -> None:
        self.node = node
        self.storage = storage
        self.transport = transport
        self.state_machine = state_machine
        self.tick_seconds = tick_seconds
        self.snapshot_threshold_bytes = snapshot_threshold_bytes
        assert snapshot_log_ratio >= 0, snapshot_log_ratio
        self.snapshot_log_ratio = snapshot_log_ratio  # SNAPSHOT_LOG_RATIO
        self._on_fatal = on_fatal
        self._inbox: collections.deque[InboxItem] = collections.deque()
        self._wake = gevent.event.Event()
        self._driving = False  # a greenlet is in _drive (it may have yielded: a leader's sends, a full disk)
        self._proposals: dict[int, tuple[int, gevent.event.AsyncResult]] = {}
        self._reads: dict[int, gevent.event.AsyncResult] = {}
        # read -> (its read index, the term its round confirmed)
        self._reads_waiting_apply: dict[gevent.event.AsyncResult, tuple[int, int]] = {}
        self._index_waiters: dict[gevent.event.AsyncResult, int] = {}  # wait_applied: result -> index
        self._read_waiting: dict[bool, gevent.event.AsyncResult] = {}  # lease? -> the read not yet taken
        self._request_ids = readonly.request_ids(random.SystemRandom())  # unique across restarts
        # Requests by their timeout: each deque holds (deadline, result) in arrival order, so in deadline order.
        # Requests waiting for an answer, by timeout: {result: deadline} in the order they came (so in deadline
        # order). A caller removes its own once answered: kept until its deadline (seconds), every request's result
        # outlived a few young collections and was walked by the full ones (issue 13, docs/BENCHMARKS.md).
        self._deadlines: dict[float, dict[gevent.event.AsyncResult, float]] = {}
        self._greenlets: list[gevent.Greenlet] = []
        self._membership: Membership | None = None
        self._soft: tuple[Role | None, int, str | None] = (None, 0, None)  # role, term, leader: as last logged
        self._removed: tuple[str | None, int] | None = None  # the node's `removed` notice, as last logged
        self.running = False
        self.disk_full = False
        self.disk_retry_seconds = 0.5
        self.descriptor_retry_seconds = 0.1
        self._leader_contact_at = float("-inf")  # RuntimeStatus.leader_contact_at
        self._drive_clock = 0.0  # time.monotonic() at the current drive's start (_advance_clock)
        self._descriptors_logged_at = float("-inf")  # monotonic time of the last line about missing descriptors
        self._snapshot_read_warned_at: dict[str, float] = {}  # peer -> monotonic time of its last line
        self._snapshot_reads_said: dict[str, int] = {}  # peer -> its failed snapshot reads counted in a line
        self._waiting_for_descriptors = False  # the save in hand was refused for want of one
        self._snapshot_not_before = 0.0
        self._snapshot_postponed_since: float | None = None  # monotonic time a due snapshot first met a backlog
        self.snapshot_mode = snapshot_mode or _SNAPSHOT_MODE  # one of SNAPSHOT_MODES
        assert self.snapshot_mode in SNAPSHOT_MODES, self.snapshot_mode
        # A stepped snapshot's writing greenlet (`_write_stepped`), named from its begin until its outcome is handed
        # to the drive (`_snapshot_done`), its file's fsync included.
        self._snapshot_stepper: gevent.Greenlet | None = None
        self._snapshot_writer: Any = None  # ... and its state machine's writer (`stop` closes it)
        self.snapshot_child_timeout_seconds = _SNAPSHOT_CHILD_TIMEOUT_SECONDS  # then the child is killed
        self._snapshot_in_process_next = False  # set when a child was killed for hanging: the next one in process
        self._unreaped: list[int] = []  # children that closed their pipe but had not exited: reaped later
        self._snapshot_child: int | None = None  # its pid while one runs (one at a time)
        self._snapshot_done: tuple[Snapshot, str, bool] | None = None  # (snapshot, file, written?): to finish
        self._snapshot_done_at = 0.0  # time.monotonic() when it was handed over (the commit waits for its base)
        # The greenlets that wait for a threadpool job on the data dir (that fdatasync; an unlink of garbage):
        # `stop` waits for them (bounded) so that none touches the folder after the storage is closed.
        self._disk_jobs: list[gevent.Greenlet] = []
        self._garbage_job: gevent.Greenlet | None = None  # the storage's garbage_job under way (one at a time)
        # request_snapshot: a snapshot at or past this index is taken at the end of a drive, whatever the log's size
        # (0: none asked for). The commit index when asked: the entry whose apply asked is at or below it.
        self._snapshot_requested_index = 0
        # Backups asked for (Runtime.backup), started at the end of the next drive: (file path, its result).
        self._backups_asked: list[tuple[str, gevent.event.AsyncResult]] = []
        self._backup_children: set[int] = set()  # backups' children, from their fork to their reap: `stop` kills them
        self._backups = 0  # being taken: at most MAX_BACKUPS
        self._backup_numbers = itertools.count(1)
        self.snapshot_retry_seconds = 5.0  # a snapshot refused (a full disk, no descriptor) waits this long
        self.deliver_timeout_seconds = 2.0  # how long a peer's frame waits for its answer (the REP server waits)
        self.stats: collections.Counter[str] = collections.Counter(dict.fromkeys(_COUNTERS, 0))
        # Recent events for people watching (raftlib.events: GET /events, the dashboard): recorded where this
        # runtime already notes them (roles and leaders from each Ready, configurations applied, snapshots, a full
        # disk), never per write.
        self.events = events.EventRing()
        self._leader_noted: tuple[str, int] | None = None  # (leader, term) of the last leader event
        self._snapshots_sent: dict[str, int] = {}  # peer -> the index of the snapshot last noted as sent to it
        # A snapshot being restored into the state machine a piece per drive (a leader's, or this node's own at a
        # restart: restore_at_start): (its index, the steps).
        self._restoring: tuple[int, Iterator[bool]] | None = None
        self._restore_applied = False  # the state machine holds that snapshot: the steps left free the old state
        self._collector = CollectorHold()  # held while a restore is under way
        if hasattr(storage, "garbage_job"):  # a DiskStorage: old segments and snapshots unlinked off the loop
            storage.unlink_garbage_later = True  # type: ignore[attr-defined]
        receive = getattr(storage, "receive_snapshot", None)
        if receive is not None:  # a leader's snapshot's chunks go to its file as they come, not to memory
            node.open_snapshot_sink = receive

    def status(self) -> RuntimeStatus:
        return RuntimeStatus(self.node.status(), self.alive, self.disk_full, types.MappingProxyType(dict(self.stats)),
                             self._leader_contact_at, self.node.config.election_ticks * self.tick_seconds)

    @property
    def alive(self) -> bool:
        """Running, and the loop that drives the node has not died (only a bug ends it while running: `_drive`
        catches what it raises and stops the node)."""
        return self.running and bool(self._greenlets) and not self._greenlets[0].dead

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self._clock_start = time.monotonic()
        self._ticks_given = 0
        self._sync_peers()
        if self._restoring is not None:  # restore_at_start's
            self._collector.hold()
        self._greenlets = [gevent.spawn(self._loop), gevent.spawn(self._expire_loop)]
        if _LOOP_LAG_PROBE_SECONDS > 0:
            self._greenlets.append(gevent.spawn(self._probe_loop_lag, _LOOP_LAG_PROBE_SECONDS))

    def stop(self) -> None:
        """Stop the node and fail every waiting request. On every path (a second call, and after a fatal error,
        when the drive stopped the node itself, included) it kills a snapshot child and the backups' children
        still writing and waits until they are reaped (each at most STOP_CHILD_EXIT_SECONDS), closes a stepped
        snapshot's writer, and waits, at most STOP_DISK_JOBS_SECONDS in all, for its greenlet and the threadpool's
        jobs on the data dir: once it returns the caller may close the storage. (A stepper still in a write then
        hands over its file after stop: no drive commits it, and start-up deletes the `*.tmp`.)"""
        if self.running:
            self.running = False
            self._wake.set()
            deadline = time.monotonic() + 2
            while self._driving and time.monotonic() < deadline:  # a transport greenlet in the middle of a drive
                gevent.sleep(0.01)
            gevent.joinall(self._greenlets, timeout=2)
            for g in self._greenlets:
                g.kill(block=False)
            self._fail_all(Stopped("node is stopping"))
            self._collector.release(freeze=False)  # a restore under way stops with the node
        self._kill_snapshot_child()  # after a fatal error too: it would write into the data dir once closed
        self._kill_backup_children()
        deadline = time.monotonic() + STOP_DISK_JOBS_SECONDS  # one bound for the stepper and the disk jobs
        stepper = self._snapshot_stepper
        if stepper is not None:  # its steps end at their next check (a write in the threadpool first: waited for)
            self._snapshot_writer.close()
            stepper.join(timeout=STOP_DISK_JOBS_SECONDS)  # then its end in a disk job, waited for below
        self._wait_disk_jobs(max(0.0, deadline - time.monotonic()))
        if self._snapshot_done is not None and self._snapshot_stepper is None:  # written or not, never committed now
            done, self._snapshot_done = self._snapshot_done, None
            self.storage.abort_snapshot(done[1])
        self._reap_later()  # a child whose reader was killed in its poll (no drive sweeps after stop)

    def _spawn_disk_job(self, run: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """`run(*args)` in a greenlet that `stop` waits for (it waits for a threadpool job on the data dir). Such a
        greenlet is never killed: the thread would run on, unwaited for, and its outcome be lost."""
        self._disk_jobs = [g for g in self._disk_jobs if not g.dead]
        job = gevent.spawn(run, *args)
        self._disk_jobs.append(job)
        return job

    def _wait_disk_jobs(self, timeout_seconds: float) -> None:
        """Wait, at most `timeout_seconds`, for the threadpool's jobs on the data dir (a thread cannot be killed:
        the storage must not be closed under one)."""
        jobs = [g for g in self._disk_jobs if not g.dead and g is not gevent.getcurrent()]
        if jobs:
            gevent.joinall(jobs, timeout=timeout_seconds)
        left = [g for g in jobs if not g.dead]
        self._disk_jobs = left
        if left:
            logger.warning("stopping with %d job(s) on the data dir still running in the threadpool after %gs (a "
                           "slow disk): they may touch it after the storage is closed", len(left), timeout_seconds)

    def _ticks_due(self) -> int:
        """The ticks of monotonic time since the node's clock was last advanced."""
        now = self._drive_clock = time.monotonic()
        return int((now - self._clock_start) * _CLOCK_RATE / self.tick_seconds) - self._ticks_given

    def _advance_clock(self) -> None:
        """Advance the node's clock by every tick of monotonic time since the last call, before anything else is
        stepped: after the process was stopped (SIGSTOP, a long GC, a full disk), the node's clock jumps over the
        time it missed, so its leader lease has run out before it answers a read. Its timers fire only once the
        drive's items are stepped (`RaftNode.advance_clock`). Capped at three election timeouts, which every
        timer in the core has expired by."""
        due = self._ticks_due()
        if due <= 0:
            return
        self._ticks_given += due
        self.node.advance_clock(min(due, 3 * self.node.config.election_ticks))

    def _put(self, item: InboxItem, drive: bool = False) -> None:
        """Queue an item for the node. With `drive` (the transport's greenlets), a caller that finds the node free
        steps it itself, now. Requests from clients do not: a drive can wait on a full disk without bound, and
        a request must keep its own."""
        self._inbox.append(item)
        if drive and not self._driving and self.running:
            self._drive()
        else:
            self._wake.set()

    # ---- requests (called from other greenlets) -------------------------------------------------

    def propose(self, command: bytes, timeout_seconds: float, configuration: tuple[int, int] | None = None):
        """Replicate `command`; return (index, result of applying it) once it is committed and applied here.
        Raises NotLeader, ProposalDropped, EntryLost, Timeout (outcome unknown), Stopped, or DiskFull (refused:
        this node's disk has no room). With `configuration` (a term and a configuration index: the node's
        `current_term` and `membership_index`), the entry is appended only if the node still leads in that term
        and has that configuration when the loop takes the proposal (ProposalDropped otherwise, nothing
        appended): a configuration change queued before it, or made meanwhile, comes first in the log."""
        if self.disk_full:
            raise DiskFull("the disk of this node is full")
        if configuration is None:
            return self._call(timeout_seconds, Propose, command)
        return self._call(timeout_seconds, lambda c, result: Propose(c, result, configuration), command)

    @property
    def restoring_snapshot(self) -> bool:
        """A snapshot is saved and the state machine does not hold it yet (restored a batch per drive): a leader's,
        or this node's own at a restart (`restore_at_start`, the state machine empty until then: the HTTP routes
        refuse what would answer from it, routes_shared.refuse_from_the_empty_state).
        Whoever reads the state machine outside the apply path must wait meanwhile: it holds the OLD state, and
        is replaced by the snapshot's without an event per change (the lease keeper, the feature-level gate:
        final review of this stop, F1 and F2). The node may lead meanwhile (its log holds the snapshot)."""
        return self._restoring is not None and not self._restore_applied

    def read(self, timeout_seconds: float, lease: bool = False) -> tuple[int, int]:
        """Block until a linearizable read of the state machine is safe (thesis §6.4); returns (read index, the
        term its round confirmed: this node's term when the core answered it; readonly fails a read the node
        changed term or role before taking).
        With `lease`, a leader within its lease answers without a round (§6.4.1). Raises NotLeader (no leader
        known, the leader changed, or the node got no answer within its read_timeout_ticks: retry), Timeout or
        Stopped."""
        # Reads that arrive before the loop takes the waiting one share it: its read index is chosen after every
        # one of them arrived, so it is safe for all, and a burst of reads costs the loop one request.
        if not self.running:  # before queueing: NotRunning says nothing was asked of the node
            raise NotRunning("node is not running")
        shared = self._read_waiting.get(lease)
        if shared is None:
            shared = self._read_waiting[lease] = gevent.event.AsyncResult()
            self._put(Read(lease, shared))
        try:
            return self._wait(shared, timeout_seconds)
        except Timeout:
            if not shared.linkcount():  # nobody else waits for it: forget it (its index may never be applied)
                self._reads_waiting_apply.pop(shared, None)
            raise

    def wait_applied(self, index: int, timeout_seconds: float) -> int:
        """Block until the state machine has applied `index`."""
        if self.node.last_applied >= index:
            return self.node.last_applied
        if not self.running:
            raise NotRunning("node is not running")
        result = gevent.event.AsyncResult()
        self._index_waiters[result] = index
        try:
            return self._wait(result, timeout_seconds)
        except Timeout:
            # Forget it now: the next apply may be far off (no leader, a full disk) and waiters would pile up.
            self._index_waiters.pop(result, None)
            raise

    def request_snapshot(self) -> None:
        """Take a snapshot of the state machine at the end of the current drive (or the next one), however small the
        log: the state machine asks for it while it applies (raftlib.server.store: the feature level's raise, so
        that an older binary cannot replay the log). While a committed backlog is applied over several drives, at
        the end of the drive that applies its last piece (the snapshot then covers the commit index of now), or
        after SNAPSHOT_BACKLOG_WAIT_SECONDS at the applied index, and again after each such wait until one covers
        that index. Only from within a drive or the loop's greenlet."""
        self._snapshot_requested_index = max(self._snapshot_requested_index, self.node.commit_index)

    def backup(self, folder: str, timeout_seconds: float) -> Backup:
        """A backup of the state machine at this node's applied index when the next drive ends (the state any read
        then sees; while a committed backlog is applied over several drives, an index inside it: entries committed
        may not be applied yet), at least the index applied when asked: the snapshot file
        (snapshotfile.export_snapshot) written by a forked child, as the node's own snapshots are (in process where
        fork is off: serving stalls meanwhile), into a new file in `folder` that is opened and unlinked before
        this returns. Not while a leader's snapshot is being restored (it waits). At most MAX_BACKUPS at once,
        each counted until the caller closes the Backup (Backup.close).
        Raises NotRunning, Stopped, BackupBusy (nothing started), BackupFailed, or Timeout after `timeout_seconds`
        (the child is killed); whatever happens, the file is gone from `folder` when this returns."""
        if not self.running:
            raise NotRunning("node is not running")
        if self._backups >= MAX_BACKUPS:
            raise BackupBusy(f"{self._backups} backup(s) are being taken on this node, its most at once; retry later")
        self._backups += 1
        path = os.path.join(folder, f"backup-{os.getpid()}-{next(self._backup_numbers)}.tmp")
        started = gevent.event.AsyncResult()
        deadline = time.monotonic() + timeout_seconds
        handed = read = False
        try:
            self._backups_asked.append((path, started))
            self._wake.set()
            try:
                index, pid, r, sha256 = started.get(timeout=timeout_seconds)
            except gevent.Timeout:
                raise Timeout(f"the backup did not start within {timeout_seconds:g}s") from None
            if pid is not None:
                read = True
                answer = self._read_child(pid, r, max(0.0, deadline - time.monotonic()))
                if answer is None:
                    raise Timeout(f"the backup was not written within {timeout_seconds:g}s (its child is killed)")
                if not answer.startswith(b"ok "):
                    raise BackupFailed(f"the backup's child failed: {answer.decode(errors='replace') or 'killed?'}")
                sha256 = answer[3:].decode()
            f = open(path, "rb")  # noqa: SIM115 - handed to the caller, who closes it
            backup = Backup(index, sha256, os.fstat(f.fileno()).st_size, f, self._backup_closed)
            handed = True
            return backup
        finally:
            # However this ends (a timeout, or the caller's greenlet killed while it waited): the request is not
            # started later for nobody, and a child started for it and not read is killed and reaped before the
            # file is unlinked (review of ops, finding 8: started in the same turn as the timeout fired, it wrote
            # the file after, until a restart; review stopkids 1: a killed caller's child was never reaped).
            self._backups_asked = [(p, result) for p, result in self._backups_asked if result is not started]
            if not read and started.successful() and started.value[1] is not None:
                self._read_child(started.value[1], started.value[2], 0)
            if not handed:
                self._backup_closed()
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _backup_closed(self) -> None:
        self._backups -= 1

    def _start_backups(self) -> None:
        """At the end of a drive: begin every backup asked for, at the state applied now (Runtime.backup)."""
        asked, self._backups_asked = self._backups_asked, []
        node = self.node
        for path, result in asked:
            if node.last_applied == 0:
                result.set_exception(BackupFailed("this node has applied nothing yet"))
                continue
            if node.last_applied > node.log.snapshot_index:
                meta = node.snapshot_metadata(node.last_applied)
            else:  # nothing applied since the node's own snapshot: it is the state
                held = node.snapshot
                assert held is not None and held.last_included_index == node.last_applied
                meta = Snapshot(held.last_included_index, held.last_included_term, held.membership)
            index = meta.last_included_index

            def write(meta: Snapshot = meta, path: str = path) -> bytes:
                snap = Snapshot(meta.last_included_index, meta.last_included_term, meta.membership,
                                self.state_machine.snapshot())
                return b"ok " + export_snapshot(snap, path).encode()

            if self.snapshot_mode != "in-process" and _CAN_FORK and getattr(self.storage, "snapshot_files", False):
                try:
                    pid, r = self._fork_child(write)
                except OSError as e:
                    result.set_exception(BackupFailed(f"could not fork the backup's child: {e}"))
                    continue
                self._backup_children.add(pid)  # from its fork on: `stop` kills it; `_reap` forgets it
                result.set((index, pid, r, ""))
                continue
            try:
                sha256 = write()[3:].decode()
            except OSError as e:
                result.set_exception(BackupFailed(f"could not write the backup: {e}"))
                continue
            result.set((index, None, None, sha256))

    def change_membership(self, change: ConfChange, timeout_seconds: float):
        return self._call(timeout_seconds, ChangeMembership, change)

    def transfer_leadership(self, target: str, timeout_seconds: float) -> None:
        """Start a transfer and wait until `target` leads (or the time is up: Timeout). ProposalDropped when the
        time was up before the loop took the transfer: it is then never started (`_handle`), as a proposal whose
        caller gave up is never appended, so a caller told it timed out does not see leadership move later. The
        core's refusals (NotLeader, ValueError, TargetRestoring) are raised as they are. Timeout as soon as this node
        still leads with the transfer no longer under way: the core aborted it after an election timeout (or
        another transfer replaced it); waiting longer would only hold the caller (a TimeoutNow sent may still be on
        its way: the outcome is unknown, as for a timeout)."""
        try:
            self._call(timeout_seconds, Transfer, target)
        except Timeout:
            raise ProposalDropped(f"the transfer to {target} was not started within {timeout_seconds:g}s (the node "
                                  "was busy); it never will be") from None
        deadline = gevent.get_hub().loop.now() + timeout_seconds
        while self.node.leader_id != target:
            if self.node.role is Role.LEADER and self.node.transferee != target:
                raise Timeout(f"{target} did not take over within an election timeout: the transfer was aborted")
            if gevent.get_hub().loop.now() > deadline:
                raise Timeout(f"{target} did not take over in {timeout_seconds}s")
            gevent.sleep(self.tick_seconds)

    def deliver(self, messages: list[Message], reply_wanted: bool) -> list[Message] | None:
        """Transport handler: step the messages; when `reply_wanted`, return the answers to their sender."""
        if not self.running:
            return []
        if not reply_wanted:
            self._put(Deliver(messages, None), drive=True)
            return None
        result = gevent.event.AsyncResult()
        item = Deliver(messages, result)
        self._put(item, drive=True)
        try:
            return result.get(timeout=self.deliver_timeout_seconds)
        except gevent.Timeout:
            # Not taken yet (the drive is held up, e.g. by a full disk): drop it, as the network may drop any
            # message, rather than let every frame that comes meanwhile pile up in the inbox.
            for n, queued in enumerate(self._inbox):
                if queued is item:
                    del self._inbox[n]
                    break
            return []

    def _call(self, timeout_seconds: float, item_type: Callable[[Any, gevent.event.AsyncResult], InboxItem],
              argument: object) -> Any:
        """Put `item_type(argument, result)` in the inbox and wait for the loop to set the result, or for
        `_expire_loop` to time it out: one timer for all requests rather than a gevent.Timeout each, which would
        arm and cancel a timer on the leader's busiest path for every write."""
        if not self.running:
            raise NotRunning("node is not running")
        result = gevent.event.AsyncResult()
        pending = self._deadlines.get(timeout_seconds)
        if pending is None:
            pending = self._deadlines[timeout_seconds] = {}
        pending[result] = time.monotonic() + timeout_seconds
        self._put(item_type(argument, result))
        try:
            return result.get()
        except _Expired:
            raise Timeout(f"no answer in {timeout_seconds}s") from None
        finally:
            pending.pop(result, None)  # answered (or expired already): not held until its deadline

    def _expire_loop(self) -> None:
        while self.running:
            gevent.sleep(self.tick_seconds)
            now = time.monotonic()
            for pending in self._deadlines.values():
                expired = []
                for result, deadline in pending.items():  # oldest first: stop at the first not yet due
                    if deadline > now:
                        break
                    expired.append(result)
                for result in expired:
                    del pending[result]
                    if not result.ready():
                        result.set_exception(_Expired())
            for timeout_seconds in [t for t, pending in self._deadlines.items() if not pending]:
                del self._deadlines[timeout_seconds]  # callers may pass any number of distinct timeouts

    def _wait(self, result: gevent.event.AsyncResult, timeout_seconds: float):
        # Stopped, not NotRunning: the request is already queued or registered (NotRunning is raised only before
        # that, in the callers), so for all its caller knows it was acted on.
        if not self.running:
            raise Stopped("node stopped")
        try:
            return result.get(timeout=timeout_seconds)
        except gevent.Timeout:
            raise Timeout(f"no answer in {timeout_seconds}s") from None

    # ---- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        """Ticks the node when nothing else does, and takes what arrives while another greenlet has the node."""
        while self.running:
            if (not self._inbox and self._restoring is None and not self.node.apply_pending) or self._driving:
                self._wake.clear()
                self._wake.wait(self.tick_seconds)  # a tick at the latest: the clock is read in _drive
            if not self._driving and self.running:
                self._drive(by_loop=True)  # it yields a turn on its way out while a restore is under way

    def _drive(self, by_loop: bool = False) -> None:
        """Take everything in the inbox, step the node with it and carry out what it asks. Only one greenlet at a
        time is in here (`_driving`): the loop (`by_loop`), or a transport greenlet whose message found the node
        free, whose reply leaves only once its drive returns (zmq's REP greenlet sends what the handler returns). Items
        that come while a drive has yielded (to let a leader's appends go out, or while the disk is full) wait in
        the inbox; the drive wakes the loop for them on its way out."""
        self._driving = True
        try:
            if self._ticks_due() >= self.node.config.election_ticks:
                # The process could not run for a while: what the peers sent meanwhile waits in the sockets. A
                # turn of the loop lets their greenlets put it in the inbox, so that the timers that ran out in
                # the stall judge on it (a leader's check-quorum on its followers' replies; a follower's election
                # timer on its leader's heartbeat) rather than on an inbox the loop's own wake-up found empty.
                gevent.sleep(STALL_YIELD_SECONDS)
                if not self._inbox:
                    self._wake.clear()  # _put sets it; the drive wakes the loop for what is left on its way out
                    self._wake.wait(self.node.config.heartbeat_ticks * self.tick_seconds)
            items = list(self._inbox)
            self._inbox.clear()
            self._advance_clock()
            replies: dict[str, tuple[gevent.event.AsyncResult, list[Message]]] = {}
            for item in items:
                self._handle(item, replies)
            self.node.fire_timers()  # after the items: what arrived while the clock ran counts (advance_clock)
            if self.node.role is Role.LEADER:
                self._leader_contact_at = self._drive_clock
            self._process_ready(replies)
            for result, out in replies.values():
                result.set(out)
            self.stats["snapshot_catch_up_appends"] = self.node.catch_up_appends
            if self.node.snapshot_reads_failed != self.stats["snapshot_reads_failed"]:
                self._note_snapshot_read_failure()
            if self.node.removed != self._removed:  # a notice may change nothing else: no Ready for it
                self._note_removed(self.node.removed)
            if self._restoring is not None and by_loop:  # the replies set: pieces of the restore
                self._restore_steps(replies)
            self._maybe_snapshot(by_loop)
            if self._backups_asked and not self.restoring_snapshot:
                self._start_backups()
        except Exception as e:
            logger.critical("stopping: %s", e, exc_info=not isinstance(e, OSError))
            self.running = False
            self._collector.release(freeze=False)
            self._fail_all(Stopped(f"node stopped: {e}"))
            if self._on_fatal is not None:
                self._on_fatal(e)
        finally:
            self._driving = False
        # Committed entries left to apply (`_process_ready` applies pieces for APPLY_DRIVE_SECONDS of CPU a drive):
        # the loop drives again at once, after the yield below, until the backlog is applied. Set here, after `_driving` went
        # false, so that a loop waiting while a transport greenlet drove wakes for it; the loop tests the
        # backlog itself before it waits, so no wake is lost.
        apply_pending = self.node.apply_pending
        if self._inbox or apply_pending or (self._restoring is not None and not by_loop):
            self._wake.set()  # it came while we saved or sent, or a restore's steps are left: the loop takes it
        if len(items) > 64 or apply_pending or (self._restoring is not None and by_loop):
            # Let timers and I/O run between big batches and between the pieces of a backlog or of a restore (the
            # loop does not wait while one is under way: this is its turn): a short sleep yields to the next turn
            # of the loop (timers run, every socket is polled); gevent.idle() would wait until nothing else is
            # runnable, and gevent.sleep(0) lets no timer run. One yield per drive, whichever of these holds.
            gevent.sleep(0.00001)

    def _note_snapshot_read_failure(self) -> None:
        # The core abandons a transfer whose source it could not read (SnapshotUnreadable) and counts it, per
        # peer; it neither logs nor stops. Counted here at each drive; said at most once per peer per
        # SNAPSHOT_READ_WARNING_SECONDS, with that peer's count since its last line, so that a failing disk shows
        # without a line per drive (the core retries the transfer at each heartbeat: ~20 lines a second per peer)
        # and one peer's line never counts another's failures (fifth review of snapfork, finding 5).
        node = self.node
        self.stats["snapshot_reads_failed"] = node.snapshot_reads_failed
        now = time.monotonic()
        for peer, (failed, index, reason) in node.snapshot_read_failures.items():
            unsaid = failed - self._snapshot_reads_said.get(peer, 0)
            if not unsaid or now - self._snapshot_read_warned_at.get(peer, float("-inf")) < SNAPSHOT_READ_WARNING_SECONDS:
                continue
            self._snapshot_read_warned_at[peer] = now
            self._snapshot_reads_said[peer] = failed
            logger.warning("snapshot transfer abandoned %d time(s) (%d since start): the snapshot at %d for %s "
                           "could not be read: %s", unsaid, failed, index, peer, reason)

    def _handle(self, item: InboxItem, replies: dict[str, tuple[gevent.event.AsyncResult, list[Message]]]) -> None:
        # Class patterns without captures: a positional capture looks up __match_args__ and each attribute again,
        # several times the cost of the type test, on every write.
        node = self.node
        match item:
            case Propose():
                if item.result.ready():  # its caller gave up (Timeout: outcome unknown) before the loop took it
                    return  # never appended: nothing waits on it, and a bound raise is not outlived by its lock
                if item.configuration is not None and item.configuration != (node.current_term, node.membership_index):
                    item.result.set_exception(ProposalDropped(
                        f"the configuration changed: (term, configuration index) {item.configuration}, now "
                        f"{(node.current_term, node.membership_index)}"))
                    return
                try:
                    index = node.propose(item.command)
                except (NotLeader, ProposalDropped) as e:
                    if isinstance(e, UncommittedBoundExceeded):
                        self.stats["proposals_refused_uncommitted"] += 1
                    item.result.set_exception(e)
                    return
                self._proposals[index] = (node.current_term, item.result)
                self.stats["proposals"] += 1
            case Deliver():
                messages = item.messages
                for m in messages:
                    node.step(m)
                if messages and messages[0].src == node.leader_id:  # a frame holds one peer's messages
                    self._leader_contact_at = self._drive_clock
                if item.result is not None:
                    src = messages[0].src
                    if src in replies:
                        replies[src][0].set([])  # an older exchange from the same peer: answer it empty
                    replies[src] = (item.result, [])
            case Read():
                self._read_waiting.pop(item.lease, None)  # later reads wait for the next one
                request_id = next(self._request_ids)
                try:
                    node.read_index(request_id, lease=item.lease)
                except NotLeader as e:
                    item.result.set_exception(e)
                    return
                self._reads[request_id] = item.result
            case ChangeMembership():
                if item.result.ready():  # as for Propose: a join that timed out has released its lock
                    return
                try:
                    membership_index = node.change_membership(item.change)
                except (NotLeader, ProposalDropped, ValueError) as e:
                    item.result.set_exception(e)
                    return
                if membership_index is None:
                    item.result.set((node.commit_index, None))
                else:
                    self._proposals[membership_index] = (node.current_term, item.result)
            case Transfer():
                if item.result.ready():  # as for Propose: its caller gave up, and was told it never started
                    return
                try:
                    node.transfer_leadership(item.target)
                    item.result.set(None)
                except (NotLeader, ValueError, TargetRestoring) as e:
                    item.result.set_exception(e)

    def _process_ready(self, replies: dict[str, tuple[gevent.event.AsyncResult, list[Message]]]) -> None:
        node = self.node
        started = time.thread_time()
        while True:
            rd = node.ready()
            if rd is None:
                return
            early, late = rd.split_messages()
            if early:  # a leader's appends: the followers write while we do (thesis §10.2.1)
                self._send(early, replies)
                gevent.sleep(0)  # let the senders hand them to zmq before the fsync holds the hub
            if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                self._save(rd)
                if crashpoints.enabled:
                    crashpoints.hit("runtime.after_save")
            self._send(late, replies)
            restoring = False
            if rd.snapshot is not None:
                restoring = self._begin_restore(rd.snapshot)
            for e in rd.committed_entries:
                self._apply(e)
            for request_id, index in rd.read_states:
                result = self._reads.pop(request_id, None)
                if result is not None and result.linkcount():  # else every caller gave up already
                    self._reads_waiting_apply[result] = (index, rd.term)
            for request_id in rd.failed_reads:
                result = self._reads.pop(request_id, None)
                if result is not None:
                    result.set_exception(NotLeader(rd.leader_id))
            node.advance(rd, snapshot_applied=not restoring)
            self._note_soft_state(rd)
            self._wake_applied()
            if node.membership is not self._membership:
                self._sync_peers()
            if rd.committed_entries and node.apply_pending and time.thread_time() - started >= APPLY_DRIVE_SECONDS:
                # A backlog's pieces past the drive's budget (APPLY_DRIVE_SECONDS): the rest in the next drives,
                # the hub let run between them (`_drive`), so that a node that restored a snapshot or fell behind
                # answers its peers and clients meanwhile instead of applying thousands of entries in one go.
                return

    def _begin_restore(self, snap: Snapshot) -> bool:
        """A leader's snapshot, saved: restore the state machine from it. A state machine with `restoring` (one
        piece per step) is restored over the next drives, a piece each, while the node goes on answering (its
        heartbeats, votes, reads wait): returns True, and `_restore_step` tells the node when it is done. Else
        in one go, now."""
        index = snap.last_included_index
        self._fail_proposals_up_to(index)
        self.events.record(events.SNAPSHOT_INSTALLED, index=index)
        self.stats["snapshots_installed"] += 1
        steps = getattr(self.state_machine, "restoring", None)
        if steps is None:
            self.state_machine.restore(snap.data)
            logger.info("installed a snapshot at index %d from the leader", index)
            return False
        replaced_index = self._restoring[0] if self._restoring is not None else None  # not its steps: dropped below
        if replaced_index is not None:
            logger.info("the restore of the snapshot at index %d is replaced by the one at %d", replaced_index, index)
        started = time.thread_time()
        # The replaced restore's steps dropped: what it built is left for the new one's first steps to free, a
        # batch each (the state machine's `restoring`); timed as a step, with the collection that follows.
        self._restore_by_steps(index, steps(snap.data))
        if replaced_index is not None:
            self._collector.collect_replaced()
            self._note_restore_step_time(started)
        logger.info("installed a snapshot at index %d from the leader; restoring the state machine", index)
        self._restore_step(None)
        return not self._restore_applied

    def restore_at_start(self, snap: Snapshot) -> None:
        """This node's own snapshot, found on disk at start (before `start`): restored into the state machine a
        piece per drive once the loop runs, as a leader's is, so a restart on a big state answers heartbeats,
        appends and votes from its first drive; reads wait, and /readyz says it restores, until it is in
        (RaftNode.snapshot_not_applied_yet: the entries after it are applied only then, once). Nothing of it is
        on disk: a crash meanwhile restarts it from the start. A state machine without `restoring`: in one go,
        now."""
        steps = getattr(self.state_machine, "restoring", None)
        if steps is None:
            self.state_machine.restore(snap.data)
            return
        self.node.snapshot_not_applied_yet()
        self._restore_by_steps(snap.last_included_index, steps(snap.data))
        logger.info("restoring the state machine from this node's snapshot at index %d", snap.last_included_index)

    def _restore_by_steps(self, index: int, steps: Iterator[bool]) -> None:
        """The restore that `_restore_step` advances from now on (a drive each), the collector held meanwhile."""
        self._restoring = (index, steps)
        if self.running:  # not a drive that outlived stop() (stop let the hold go for good), nor before start
            self._collector.hold()  # once: a restore that replaces another keeps the hold
        self._restore_applied = False
        self._restore_started = time.monotonic()

    def _restore_steps(self, replies: dict) -> None:
        """Steps of the restore under way, back to back while the next would end within RESTORE_DRIVE_SECONDS of
        the first's start (judged by the longest so far: a step is about as long as the one before), at least
        one, up to the step that hands the node the snapshot. From then on one a drive, not within the budget: the
        steps that free the old state, then the last, which lets the collector go (`CollectorHold.release`: a
        collection, 50+ ms at 1M keys), each starts a drive of its own (review of restart1m, L2)."""
        if self._restore_applied:
            self._restore_step(replies)
            return
        started = time.monotonic()
        longest = 0.0
        while True:
            step_started = time.monotonic()
            handed_over = self._restore_step(replies)
            now = time.monotonic()
            longest = max(longest, now - step_started)
            if handed_over or self._restoring is None or now - started + longest > RESTORE_DRIVE_SECONDS:
                return

    def _restore_step(self, replies: dict | None) -> bool:
        """One piece of the restore under way. Once the state machine holds the snapshot the node is told, and
        the entries after the snapshot are applied; the steps after that free the old state. True if this step
        handed the node the snapshot."""
        assert self._restoring is not None
        index, steps = self._restoring
        started = time.thread_time()
        try:
            replaced = next(steps)
        except StopIteration:
            self._restoring = None
            self._collector.release(freeze=True)
            replaced = not self._restore_applied  # a state machine that swaps in its last step
        else:
            self._collector.after_step()
        self._note_restore_step_time(started)
        if not replaced or self._restore_applied:
            return False
        self._restore_applied = True
        self.node.snapshot_applied(index)
        logger.info("restored the state machine from the snapshot at index %d in %.2fs", index,
                    time.monotonic() - self._restore_started)
        if replies is not None:  # in a drive whose replies went out already: what follows goes by the transport
            self._process_ready({})
        self._wake_applied()
        return True

    def _note_restore_step_time(self, started: float) -> None:
        """The CPU time since `started` (time.thread_time: the step's own cost, not the machine's other
        processes'), kept if it is the longest restore step so far: bench/snapshot_stall.py reports it."""
        took_microseconds = int((time.thread_time() - started) * 1e6)
        if took_microseconds > self.stats["restore_step_max_microseconds"]:
            self.stats["restore_step_max_microseconds"] = took_microseconds

    def _send(self, messages: list[Message], replies: dict[str, tuple[gevent.event.AsyncResult, list[Message]]]) -> None:
        """Messages for a peer whose request we are answering ride back on the reply; the others go out now."""
        outgoing = []
        for m in messages:
            if isinstance(m, InstallSnapshot) and m.offset == 0:
                self._note_snapshot_sent(m)
            route = replies.get(m.dst)
            if route is not None:
                route[1].append(m)
            else:
                outgoing.append(m)
        if outgoing:
            self.transport.send(outgoing)

    def _note_snapshot_sent(self, m: InstallSnapshot) -> None:
        """A leader's first chunk of its snapshot to a follower: an event once per (follower, snapshot), however
        often the transfer starts over."""
        if self._snapshots_sent.get(m.dst) != m.last_included_index:
            self._snapshots_sent[m.dst] = m.last_included_index
            self.events.record(events.SNAPSHOT_SENT, to=m.dst, index=m.last_included_index)

    def _save(self, rd: Ready) -> None:
        collector_held = self._collector.held  # a restore under way: its hold is let go while a save waits
        while True:
            try:
                self.storage.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)
                break
            except DiskFull as e:
                if not self.disk_full:
                    logger.error("%s: refusing writes, and trying again every %gs", e, self.disk_retry_seconds)
                    self.disk_full = True
                    self.events.record(events.DISK_FULL)
                if not self.running:
                    raise
                self._wait_to_save_again(self.disk_retry_seconds)
            except OutOfDescriptors as e:
                # Nothing changed on the disk (storage's rules): not fatal, and not a full disk (no 507).
                self._note_no_descriptor(f"{e}: trying the save again every {self.descriptor_retry_seconds:g}s")
                self._waiting_for_descriptors = True
                if not self.running:
                    raise
                self._wait_to_save_again(self.descriptor_retry_seconds)
        if collector_held and self.running:  # stop() let it go for good meanwhile
            self._collector.hold()
        if self.disk_full:
            logger.warning("the disk has room again: carrying on")
            self.disk_full = False
            self.events.record(events.DISK_OK)
        if self._waiting_for_descriptors:
            logger.warning("a file descriptor was free again: saved")
            self._waiting_for_descriptors = False
        self.stats["saves"] += 1

    def _wait_to_save_again(self, seconds: float) -> None:
        """Sleep before a save's next try, the collector's hold (a restore under way) let go meanwhile: the drive
        waits here as long as the disk stays full, no restore step runs, so neither does the young collection
        after each step, while HTTP goes on serving. Held through the wait, the collector stayed fully off and
        the garbage cycles of every request served grew without bound. `_save` takes the hold again once saved."""
        self._collector.release(freeze=False)
        gevent.sleep(seconds)

    def _note_no_descriptor(self, message: str) -> None:
        """Count a save or snapshot refused for want of a descriptor; log it at most once a second (a burst of
        connections can last a while, and each retry would log)."""
        self.stats["out_of_descriptors"] += 1
        now = time.monotonic()
        if now - self._descriptors_logged_at >= 1.0:
            self._descriptors_logged_at = now
            logger.warning("%s", message)

    def _apply(self, e: Entry) -> None:
        waiter = self._proposals.pop(e.index, None)
        result = None
        if e.kind is EntryKind.COMMAND:
            result = self.state_machine.apply(e.index, e.data)
        elif e.kind is EntryKind.MEMBERSHIP and e.membership is not None:
            logger.info("membership at index %d: voters %s, learners %s", e.index,
                        ",".join(e.membership.voters), ",".join(e.membership.learners) or "-")
            self.events.record(events.MEMBERSHIP_CHANGED, index=e.index, voters=list(e.membership.voters),
                               learners=list(e.membership.learners))
            current = {m.node_id for m in e.membership.members}
            self._snapshots_sent = {peer: i for peer, i in self._snapshots_sent.items() if peer in current}
        self.stats["applied"] += 1
        if waiter is not None:
            term, async_result = waiter
            if term == e.term:
                async_result.set((e.index, result))
            else:
                async_result.set_exception(EntryLost(f"entry {e.index} was overwritten by a newer leader"))

    def _fail_proposals_up_to(self, index: int) -> None:
        for i in [i for i in self._proposals if i <= index]:
            # A snapshot replaced these entries: we cannot tell whether ours committed. (Also one known committed
            # but not applied yet: a deposed leader's own, in a backlog the snapshot skipped. Unknown is honest,
            # only less precise; and rare: review applycap Q3.)
            self._proposals.pop(i)[1].set_exception(Timeout("outcome unknown: replaced by a snapshot"))

    def _wake_applied(self) -> None:
        applied = self.node.last_applied
        if self._reads_waiting_apply:
            for result in [r for r, (index, _) in self._reads_waiting_apply.items() if index <= applied]:
                result.set(self._reads_waiting_apply.pop(result))
        if self._index_waiters:
            for result in [r for r, index in self._index_waiters.items() if index <= applied]:
                del self._index_waiters[result]
                result.set(applied)

    def _note_soft_state(self, rd: Ready) -> None:
        soft = (rd.role, rd.term, rd.leader_id)
        if soft == self._soft:
            return
        old_role, old_term, old_leader = self._soft
        self._soft = soft
        self._record_soft_state(rd, old_role, old_term)
        if rd.role is Role.LEADER and old_role is not Role.LEADER:
            self.stats["elections_won"] += 1
            logger.info("became leader in term %d", rd.term)
        elif rd.leader_id is not None and (rd.leader_id, rd.term) != (old_leader, old_term):
            logger.info("leader is %s (term %d)", rd.leader_id, rd.term)
        elif rd.role is Role.CANDIDATE and old_role is not Role.CANDIDATE:
            logger.info("starting an election for term %d", rd.term)
        elif old_role is Role.LEADER and rd.role is not Role.LEADER:
            logger.info("stepped down in term %d", rd.term)

    def _record_soft_state(self, rd: Ready, old_role: Role | None, old_term: int) -> None:
        """The events of a change of role, term or leader (each its own: a leader that steps down for a new
        leader is both)."""
        record = self.events.record
        if old_role is Role.LEADER and rd.role is not Role.LEADER:
            record(events.STEPPED_DOWN, term=rd.term)
        became_candidate = rd.role is Role.CANDIDATE and (old_role is not Role.CANDIDATE or rd.term != old_term)
        # A lone voter stands and wins inside one Ready: its candidacy shows only as the win.
        won_unseen = rd.role is Role.LEADER and not (old_role is Role.CANDIDATE and old_term == rd.term)
        if became_candidate or (won_unseen and old_role is not Role.LEADER):
            record(events.ELECTION_STARTED, term=rd.term)
        if rd.role is Role.LEADER and old_role is not Role.LEADER:
            record(events.ELECTION_WON, term=rd.term, leader=rd.leader_id)
        elif rd.leader_id is not None and (rd.leader_id, rd.term) != self._leader_noted:
            record(events.LEADER_CHANGED, leader=rd.leader_id, term=rd.term)
        if rd.leader_id is not None:
            # Once per leader and term: a leader lost from sight and found again in its term is no change.
            self._leader_noted = (rd.leader_id, rd.term)

    def _note_removed(self, removed) -> None:
        self._removed = removed
        if removed is None:
            logger.info("a leader counts this node as a member (again)")
            return
        leader_id, index = removed
        self.events.record(events.REMOVED, by=leader_id, index=index)
        # At or before: a member that compacted the configuration's entry into a snapshot names the snapshot's index.
        logger.warning("this node was removed from the cluster (%sat or before index %d); it keeps out of the way: "
                       "add it again, or stop it", f"by {leader_id}, " if leader_id else "", index)

    def _sync_peers(self) -> None:
        self._membership = self.node.membership
        self.transport.set_peers(
            {m.node_id: m.raft_address for m in self._membership.members if m.node_id != self.node.node_id}
        )

    # ---- snapshots: written by steps in the loop, or by a forked child (Redis's BGSAVE); the loop commits them ---

    def _maybe_snapshot(self, by_loop: bool = False) -> None:
        """Called at the end of each drive. Finishes a snapshot whose file is written (by its stepper or its child);
        else, when one is due, begins one as `snapshot_mode` says: by steps (`_begin_stepped_snapshot`:
        the loop goes on serving between them), in a forked child (the loop goes on serving while the child
        serializes its copy-on-write image and writes and fsyncs the file; also for a state machine without steps
        at its level), or in process where fork is unavailable or off.
        `by_loop`: the loop's own drive (`_drive`), the only one that takes the base segment's steps.
        Due: one was requested (`request_snapshot`, whatever the log's size), or the log since the newest snapshot
        holds at least `snapshot_due_bytes()`: max(snapshot_threshold_bytes, snapshot_log_ratio x the newest
        snapshot's size), that snapshot this node's own or a leader's it installed (SNAPSHOT_LOG_RATIO)."""
        if (self._snapshot_child is not None or self._snapshot_stepper is not None
                or self._snapshot_done is not None) and by_loop:
            self._base_steps()  # the loop's drives only: a transport greenlet's reply does not wait for them
        if self._snapshot_done is not None and not self._base_wait():
            done, self._snapshot_done = self._snapshot_done, None
            self._finish_snapshot(*done)
        # What an install (this node's snapshot or a leader's) made garbage, one job at a time: names listed again
        # meanwhile wait in the storage, never cut by two threads at once (review of unlinkcut, L2).
        if self._garbage_job is None or self._garbage_job.dead:
            unlink = getattr(self.storage, "garbage_job", lambda: None)()
            if unlink is not None:
                self._garbage_job = self._spawn_disk_job(gevent.get_hub().threadpool.apply, unlink)
        if self._unreaped:
            self._reap_later()
        node = self.node
        if self._snapshot_child is not None or self._snapshot_stepper is not None or self._snapshot_done is not None:
            return  # one at a time: a child or a stepper writes, or its snapshot waits for its base (`_base_wait`)
        requested = self._snapshot_requested_index > node.log.snapshot_index
        if node.last_applied <= node.log.snapshot_index or (
                self.storage.log_bytes < self.snapshot_due_bytes() and not requested):
            self._snapshot_postponed_since = None  # not due: a later backlog's wait starts afresh
            return
        now = time.monotonic()
        if self._snapshot_not_before > now:
            return
        if node.apply_pending:
            # A committed backlog is being applied piece by piece: the snapshot waits for its end, which covers it
            # all, but at most SNAPSHOT_BACKLOG_WAIT_SECONDS (see there).
            if self._snapshot_postponed_since is None:
                self._snapshot_postponed_since = now
            if now - self._snapshot_postponed_since < SNAPSHOT_BACKLOG_WAIT_SECONDS:
                return
        self._snapshot_postponed_since = None
        meta = node.snapshot_metadata(node.last_applied)
        if self._snapshot_in_process_next:
            self._snapshot_in_process_next = False
            logger.warning("taking the snapshot at index %d in process (the last child hung): serving stalls "
                           "meanwhile", meta.last_included_index)
            self._snapshot_in_process(meta)
        elif self.snapshot_mode == "in-process" or not getattr(self.storage, "snapshot_files", False):
            self._snapshot_in_process(meta)  # (a child's or a stepper's file only on disk)
        elif self.snapshot_mode == "stepped" and self._begin_stepped_snapshot(meta):
            pass  # begun (or refused for now: a full disk, no descriptor)
        elif _CAN_FORK:
            self._fork_snapshot(meta)
        else:
            self._snapshot_in_process(meta)

    def snapshot_due_bytes(self) -> int:
        """The log's size (storage.log_bytes) at which a snapshot is due: max(snapshot_threshold_bytes,
        snapshot_log_ratio x the newest snapshot's size). That size is its data's length, known without reading it
        (a snapshot file's size, or the bytes' length); none yet: the threshold alone."""
        snapshot = self.node.snapshot
        newest_bytes = len(snapshot.data) if snapshot is not None else 0
        return max(self.snapshot_threshold_bytes, int(self.snapshot_log_ratio * newest_bytes))

    def _base_steps(self) -> None:
        """Pre-build the snapshot's base segment (DiskStorage.base_step) while BASE_DRIVE_SECONDS last, and start
        an fdatasync of its bulk in the threadpool when due."""
        storage: Any = self.storage  # a DiskStorage (the steps are its own; other storages have none)
        step = getattr(storage, "base_step", None)
        if step is None:
            return
        started = time.monotonic()
        longest = 0.0
        while True:
            step_started = time.monotonic()
            left = step(BASE_STEP_BYTES)
            now = time.monotonic()
            longest = max(longest, now - step_started)
            if not left or now - started + longest > BASE_DRIVE_SECONDS:
                break
        pending = storage.base_pending()
        if pending is None:
            return
        _, unsynced, syncing = pending
        due = BASE_SYNC_BYTES if self._snapshot_done is None else BASE_COMMIT_UNSYNCED_BYTES + 1
        if unsynced >= due and not syncing:
            job = storage.base_sync_job()
            if job is not None:
                self._spawn_disk_job(self._sync_base, *job)

    def _sync_base(self, sync: Callable[[], OSError | None], done: Callable[..., None]) -> None:
        """The pre-built base segment's fdatasync in gevent's threadpool (the loop goes on), its outcome handed
        back here, in the hub's thread, however the call ends (DiskStorage.base_sync_job: an error it returns is
        raised by the storage's next step or commit; an exception the call raises drops the segment). Even a
        GreenletExit or Timeout (nothing should kill a disk job: `_spawn_disk_job`) ends the storage's record of
        the sync before it goes on up."""
        try:
            error = gevent.get_hub().threadpool.apply(sync)
        except BaseException as e:  # the threadpool's, the sync's own, or the greenlet's: the sync's record ends
            done(None, raised=e)
            if not isinstance(e, Exception):
                raise
        else:
            done(error)
        self._wake.set()

    def _base_wait(self) -> bool:
        """Whether the finished snapshot's commit waits (a drive more) for its pre-built base segment: it lacks
        entries, or more than BASE_COMMIT_UNSYNCED_BYTES of it are not known synced (a sync of them runs, or is
        started by `_base_steps`); never past BASE_WAIT_SECONDS."""
        assert self._snapshot_done is not None
        pending = getattr(self.storage, "base_pending", lambda: None)()
        if pending is None or not self._snapshot_done[2]:
            return False
        now = time.monotonic()
        if not self._snapshot_done_at:
            self._snapshot_done_at = now
        lacking, unsynced, syncing = pending
        if not lacking and unsynced <= BASE_COMMIT_UNSYNCED_BYTES and not syncing:
            return False
        if now - self._snapshot_done_at < BASE_WAIT_SECONDS:
            return True
        # At the bound: a segment whose sync still runs is dropped by the commit (never committed through a
        # threadpool fdatasync not ended: fsyncgate), which writes the log whole in the loop as before issue 13.
        logger.warning("the snapshot's log segment is not ready %gs after its child finished (%d entries to "
                       "write, %d bytes to sync%s): committing it in the loop%s", BASE_WAIT_SECONDS, lacking,
                       unsynced, ", a sync running" if syncing else "",
                       ", the segment dropped and the log written whole" if syncing else "")
        return False

    def _snapshot_in_process(self, meta: Snapshot) -> None:
        """The snapshot written in the loop (no fork): it stalls serving for as long as it takes."""
        snap = Snapshot(meta.last_included_index, meta.last_included_term, meta.membership,
                        self.state_machine.snapshot())
        tmp = self.storage.begin_snapshot(snap.last_included_index)
        try:
            self.storage.write_snapshot(snap, tmp)
        except (DiskFull, OutOfDescriptors) as e:
            self.storage.abort_snapshot(tmp)
            self._snapshot_refused(e)
            return
        self._finish_snapshot(snap, tmp, True)

    def _snapshot_refused(self, e: Exception) -> None:
        # The log on disk still holds everything: the snapshot is only tried again later.
        if isinstance(e, OutOfDescriptors):
            self._note_no_descriptor(f"could not write a snapshot: {e}; trying again in "
                                     f"{self.snapshot_retry_seconds:g}s")
        else:
            logger.warning("could not write a snapshot: %s; trying again in %gs", e, self.snapshot_retry_seconds)
        self._snapshot_not_before = time.monotonic() + self.snapshot_retry_seconds

    def _finish_snapshot(self, snap: Snapshot, tmp: str, written: bool) -> None:
        """In the drive: make the written file the node's snapshot (storage.commit_snapshot: a rename, a folder
        fsync, a base segment of the log since the fork) and compact the core's log. Nothing of the state
        machine's size happens here. A child that failed, or a snapshot from a leader that overtook this one,
        leaves the log as it was."""
        index = snap.last_included_index
        self._snapshot_done_at = 0.0
        if not self.node.can_snapshot_at(index):  # a leader's snapshot replaced the log meanwhile (written or not)
            self.storage.abort_snapshot(tmp)
            return
        if not written:
            self.storage.abort_snapshot(tmp)
            self.stats["snapshot_children_failed"] += 1
            logger.warning("the snapshot for index %d was not written; trying again in %gs", index,
                           self.snapshot_retry_seconds)
            self._snapshot_not_before = time.monotonic() + self.snapshot_retry_seconds
            return
        started = time.monotonic()
        try:
            kept = self.storage.commit_snapshot(snap, tmp)
        except (DiskFull, OutOfDescriptors) as e:
            self._snapshot_refused(e)
            return
        if kept is None:
            return
        self.node.create_snapshot(index, kept.data)
        took_microseconds = int((time.monotonic() - started) * 1e6)
        self.stats["snapshot_commit_max_microseconds"] = max(self.stats["snapshot_commit_max_microseconds"],
                                                             took_microseconds)
        self.stats["snapshots"] += 1
        self.events.record(events.SNAPSHOT_TAKEN, index=index, bytes=len(kept.data))
        logger.info("took a snapshot at index %d (%d bytes; its commit held the loop %.1f ms)", index, len(kept.data),
                    took_microseconds / 1e3)

    def _begin_stepped_snapshot(self, meta: Snapshot) -> bool:
        """Begin a stepped snapshot (`_write_stepped`) of a state machine that has one at its level; False when it
        has none (the caller forks). A file that cannot be created (a full disk, no descriptor) is a snapshot
        refused (tried again later), True."""
        begin = getattr(self.state_machine, "begin_stepped_snapshot", None)
        writer = begin() if begin is not None else None
        if writer is None:
            return False
        storage: Any = self.storage  # a DiskStorage (snapshot_files)
        tmp = storage.begin_snapshot(meta.last_included_index)
        try:
            out = storage.open_snapshot_file(meta, tmp)
        except BaseException as e:
            writer.close()
            storage.abort_snapshot(tmp)
            if not isinstance(e, (DiskFull, OutOfDescriptors, OSError)):
                raise
            # An I/O error at the new file's create or head is not fatal either (as at any later piece, and as in
            # a forked child): the file is never committed; tried again later (review of eef4bc2, L1).
            self._snapshot_refused(e)
            return True
        begin_base = getattr(storage, "begin_base", None)
        if begin_base is not None:  # its base segment pre-built meanwhile, a step a drive (`_base_steps`)
            begin_base(meta)
        logger.info("writing the state at index %d by steps", meta.last_included_index)
        self._snapshot_writer = writer
        self._snapshot_stepper = gevent.spawn(self._write_stepped, meta, tmp, writer, out)
        return True

    def _write_stepped(self, meta: Snapshot, tmp: str, writer: Any, out: Any) -> None:
        """A stepped snapshot's greenlet: writer steps (raftlib.server.store.SteppedSnapshotWriter) a turn of the
        loop until its CPU or its wall time reaches STEPPED_SNAPSHOT_TURN_SECONDS, the first of them; their bytes,
        once SNAPSHOT_IO_BYTES are held, appended to the file through the storage's FileSystem
        (raftlib.snapshotfile.SnapshotFileWriter) in gevent's threadpool, the greenlet waiting (a write() of a file whose pages the kernel is writing back can wait for
        the disk: 50 ms holds of the loop, "idle or blocked", were seen at 1M keys when the loop wrote); then the
        rest, the trailer and the fsync in a disk job (`_end_stepped`). A file that cannot be written (DiskFull,
        OutOfDescriptors, an I/O error), an unexpected exception (a bug: logged with its traceback), or a writer
        closed (by a restore that replaced the state, a leader's snapshot, or by `stop`): the snapshot is handed
        over unwritten (`_finish_snapshot` unlinks it, and unless a leader's snapshot overtook it counts it in
        `snapshot_children_failed` and tries again snapshot_retry_seconds later), as a failed child's is. Never
        killed (`stop` closes its writer and waits): a write in a thread would go on with the file closed under
        it."""
        started, cpu = time.monotonic(), 0.0
        threadpool = gevent.get_hub().threadpool
        pieces: list[bytes] = []
        held = 0
        handed = False
        try:
            while not writer.done and not writer.closed:
                turn_started, turn_cpu_started = time.perf_counter(), time.thread_time()
                while not writer.done and not writer.closed:
                    piece = writer.step(STEPPED_SNAPSHOT_STEP_ITEMS)
                    if piece:
                        pieces.append(piece)
                        held += len(piece)
                    if (time.thread_time() - turn_cpu_started >= STEPPED_SNAPSHOT_TURN_SECONDS
                            or time.perf_counter() - turn_started >= STEPPED_SNAPSHOT_TURN_SECONDS):
                        break
                cpu += time.thread_time() - turn_cpu_started
                if held >= SNAPSHOT_IO_BYTES and not writer.closed:  # the wait for the thread is this turn's yield
                    _threadpool_call(threadpool, out.append, b"".join(pieces))
                    pieces, held = [], 0
                else:
                    gevent.sleep(0.00001)  # a turn of the loop (STACK-NOTES: gevent.sleep(0) lets no timer run)
            if writer.done:
                self.stats["snapshot_stepped_cpu_microseconds"] = int(cpu * 1e6)
                self._spawn_disk_job(self._end_stepped, meta, tmp, out, b"".join(pieces), started)
                handed = True
            else:
                logger.info("the snapshot at index %d is dropped (a leader's snapshot replaced the state, or the "
                            "node stops)", meta.last_included_index)
        except Exception as e:
            self._log_unwritten(meta, e)
        finally:
            writer.close()
            if not handed:
                out.close()
                self._stepped_done(meta, tmp, False)

    def _end_stepped(self, meta: Snapshot, tmp: str, out: Any, rest: bytes, started: float) -> None:
        """A stepped snapshot's last bytes, its trailer and its fsync, in gevent's threadpool (a disk job: `stop`
        waits for it), its file closed and the outcome handed to the drive."""
        def end() -> None:
            out.append(rest)
            out.finish()
            out.sync()

        written = False
        try:
            _threadpool_call(gevent.get_hub().threadpool, end)
            written = True
            self.stats["snapshot_stepped_wall_microseconds"] = int((time.monotonic() - started) * 1e6)
        except Exception as e:
            self._log_unwritten(meta, e)
        finally:
            out.close()
            self._stepped_done(meta, tmp, written)

    @staticmethod
    def _log_unwritten(meta: Snapshot, e: Exception) -> None:
        """Log why a stepped snapshot's file was not written: a refusal of the disk (DiskFull, OutOfDescriptors,
        an I/O error) as a warning, anything else (a bug) with its traceback."""
        if isinstance(e, (DiskFull, OutOfDescriptors, OSError)):
            logger.warning("could not write the snapshot at index %d: %s", meta.last_included_index, e)
        else:
            logger.exception("could not write the snapshot at index %d (unexpected)", meta.last_included_index)

    def _stepped_done(self, meta: Snapshot, tmp: str, written: bool) -> None:
        self._snapshot_stepper = self._snapshot_writer = None
        self._snapshot_done = (meta, tmp, written)
        self._wake.set()

    def _fork_snapshot(self, meta: Snapshot) -> None:
        """Fork a child that writes the snapshot's file (`_fork_child`); a greenlet waits for it
        (`_wait_snapshot_child`)."""
        tmp = self.storage.begin_snapshot(meta.last_included_index)

        def write() -> bytes:
            if _TEST_CHILD_DELAY_SECONDS:
                gevent.monkey.get_original("time", "sleep")(_TEST_CHILD_DELAY_SECONDS)  # not the hub's sleep
            snap = Snapshot(meta.last_included_index, meta.last_included_term, meta.membership,
                            self.state_machine.snapshot())
            self.storage.write_snapshot(snap, tmp)
            return b"ok"

        try:
            pid, r = self._fork_child(write)
        except OSError as e:
            self.storage.abort_snapshot(tmp)
            if e.errno in NO_DESCRIPTOR:
                # No descriptor for the child's pipe: this one in process, where the storage's reserve helps.
                self._snapshot_in_process(meta)
                return
            # EAGAIN, ENOMEM: a passing shortage (processes, memory). Fork stays on: tried again later. (Where fork
            # does not exist at all, _CAN_FORK is false and snapshots are taken in process from the start.)
            self.stats["snapshot_children_failed"] += 1
            logger.warning("could not fork a snapshot child (%s); trying again in %gs", e,
                           self.snapshot_retry_seconds)
            self._snapshot_not_before = time.monotonic() + self.snapshot_retry_seconds
            return
        self._snapshot_child = pid
        begin_base = getattr(self.storage, "begin_base", None)
        if begin_base is not None:  # its base segment pre-built meanwhile, a step a drive (`_base_steps`)
            begin_base(meta)
        logger.info("snapshot child %d writing the state at index %d", pid, meta.last_included_index)
        gevent.spawn(self._wait_snapshot_child, pid, r, meta, tmp)

    def _fork_child(self, work: Callable[[], bytes]) -> tuple[int, int]:
        """Fork a child that runs `work` and sends back what it returns on a pipe (`_child_main`: it closes every
        descriptor it inherited but its pipe and stdio (the zmq sockets, the HTTP listener, the data dir's lock
        and log: a parent killed meanwhile restarts on the same ports and dir), dies with its parent
        (PR_SET_PDEATHSIG), touches neither zmq nor gevent's hub (a raw fork: gevent's runs its hooks and
        reinitializes the hub in the child), and leaves with os._exit). Returns (its pid, the pipe's read end).
        Raises OSError: no descriptor for the pipe (errno in NO_DESCRIPTOR), or the fork failed (EAGAIN, ENOMEM);
        nothing is left open then."""
        libc = _libc()
        fd_limit = _descriptor_limit()
        r, w = os.pipe()
        parent = os.getpid()
        try:
            pid = posix.fork()
        except OSError:
            posix.close(r)
            posix.close(w)
            raise
        if pid == 0:  # the child
            _child_main(work, w, parent, libc, fd_limit)
        posix.close(w)
        return pid, r

    def _read_child(self, pid: int, r: int, timeout_seconds: float) -> bytes | None:
        """Cooperatively: what the child `_fork_child` started sent, read from its pipe until it closes (the child
        has exited, or was killed), bounded by `timeout_seconds`: None when it did not close in time. A child
        that did not answer "ok..." is killed; every child is reaped without blocking the hub, the pipe closed."""
        from gevent.os import make_nonblocking, nb_read  # noqa: PLC0415 - gevent's, only in a running runtime

        got = b""
        closed = False
        try:
            make_nonblocking(r)
            with gevent.Timeout(timeout_seconds, False):
                while True:
                    chunk = nb_read(r, 64)
                    if not chunk:
                        closed = True
                        break
                    got += chunk
        finally:
            # In the finally: a reader killed meanwhile (its greenlet) still kills a child that did not finish
            # (review stopkids 2). Before the reap: the pid is this child's until then.
            if not closed or not got.startswith(b"ok"):
                with _suppress_oserror():
                    os.kill(pid, signal.SIGKILL)
            posix.close(r)
            self._reap(pid)
        return got if closed else None

    def _wait_snapshot_child(self, pid: int, r: int, meta: Snapshot, tmp: str) -> None:
        """Read the snapshot child's answer (`_read_child`), bounded by snapshot_child_timeout_seconds, and hand
        the outcome to the drive."""
        got: bytes | None = None
        try:
            got = self._read_child(pid, r, self.snapshot_child_timeout_seconds)
            if got is None:
                logger.warning("snapshot child %d did not finish in %gs: killed; the next snapshot is taken in "
                               "process", pid, self.snapshot_child_timeout_seconds)
                self._snapshot_in_process_next = True
            elif got != b"ok":
                logger.warning("snapshot child %d: %s", pid,
                               got.decode(errors="replace") or "exited without writing (killed?)")
        finally:
            self._snapshot_child = None
        self._snapshot_done = (meta, tmp, got == b"ok")
        self._wake.set()

    def _reap(self, pid: int) -> None:
        """waitpid without blocking the hub: the child has closed its pipe, so it is exiting; poll a bounded time,
        then leave it to `_reap_later` (a zombie is reaped whenever it exits, never left for good). Handed to
        `_reap_later` only once this poll ends without reaping it (its time up, or its reader killed: review
        stopkids 2): listed there while this poll runs, the drive's sweep could reap it while `_snapshot_child` or
        `_backup_children` still named it, and `stop` kill a pid no longer this process's child (review
        stopkids2 S1). Once this ends, `stop` no longer waits for it (`_backup_children`)."""
        reaped = False
        try:
            for attempt in range(2001):
                if _reaped(pid):
                    reaped = True
                    return
                if attempt < 2000:
                    gevent.sleep(0.005)
            logger.warning("child %d did not exit after closing its pipe: reaped later", pid)
            with _suppress_oserror():
                os.kill(pid, signal.SIGKILL)  # not reaped: checked just above, no yield since
        finally:
            if not reaped:
                self._unreaped.append(pid)
            self._backup_children.discard(pid)

    def _reap_later(self) -> None:
        self._unreaped = [pid for pid in self._unreaped if not _reaped(pid)]

    def _kill_snapshot_child(self) -> None:
        """SIGKILL a snapshot child still writing, then wait (polled, never past STOP_CHILD_EXIT_SECONDS) until its
        waiter (`_wait_snapshot_child`) has reaped it and cleared `_snapshot_child`: a write() it was in the middle
        of completes before `stop` returns, never after the caller closed the storage and released LOCK (review
        baseleft2 R2). Only the waiter reaps: a pid reaped here was still held by the waiter and by
        `_snapshot_child`, and killed again after the reap (by the waiter on the pipe's close, or by a second
        `stop`), when it may already name another process (review final26 L1). (`_reap_later` reaps only what a
        reader's poll gave up: by then it is named nowhere else.)"""
        pid = self._snapshot_child
        if pid is None:
            return
        with _suppress_oserror():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_CHILD_EXIT_SECONDS
        while self._snapshot_child == pid:
            if time.monotonic() >= deadline:
                logger.warning("snapshot child %d not reaped %gs after SIGKILL: its waiter reaps it later", pid,
                               STOP_CHILD_EXIT_SECONDS)
                return
            gevent.sleep(0.005)

    def _kill_backup_children(self) -> None:
        """SIGKILL the children writing backups (`backup`: they may write for up to its timeout, into a folder the
        caller may close or remove once `stop` returns), then wait, at most STOP_CHILD_EXIT_SECONDS, until each
        reader has reaped its child (its `_read_child` sees the pipe close; only it reaps, as with the snapshot
        child: review final26). The backups fail (BackupFailed: killed)."""
        for pid in list(self._backup_children):
            with _suppress_oserror():
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_CHILD_EXIT_SECONDS
        while self._backup_children:
            if time.monotonic() >= deadline:
                logger.warning("backup child(ren) %s not reaped %gs after SIGKILL: their readers reap them later",
                               sorted(self._backup_children), STOP_CHILD_EXIT_SECONDS)
                return
            gevent.sleep(0.005)

    def _probe_loop_lag(self, period_seconds: float) -> None:
        """The hub-lag probe: how late a short sleep wakes is how long the loop was held by something else. A
        wake-up later than LOOP_LAG_LOGGED_SECONDS is logged with what the hub's thread did over the whole sleep
        (its period and the delay; the three parts add up to it): its CPU (this process's own work held the loop),
        its wait for a core (Linux's schedstat: the machine; "unknown" where it cannot be read), and the rest (idle
        in the hub's poll, or blocked in a system call: an fsync in the loop, a page fault that read the disk).
        Each wake-up's readings are the next sleep's start: one schedstat read a wake-up."""
        stats = self.stats
        t0, cpu0, queued0 = time.monotonic(), time.thread_time(), _run_queue_seconds()
        while self.running:
            gevent.sleep(period_seconds)
            t1, cpu1, queued1 = time.monotonic(), time.thread_time(), _run_queue_seconds()
            late = int((t1 - t0 - period_seconds) * 1e6)
            if late > stats["loop_lag_max_microseconds"]:
                stats["loop_lag_max_microseconds"] = late
            if late > 10_000:
                stats["loop_lags_over_10ms"] += 1
            if late > LOOP_LAG_LOGGED_SECONDS * 1e6:
                slept_ms, cpu_ms = (t1 - t0) * 1e3, (cpu1 - cpu0) * 1e3
                if queued0 is None or queued1 is None:
                    parts = f"waited for a core (unknown: no schedstat) or was idle or blocked {slept_ms - cpu_ms:.1f} ms"
                else:
                    queued_ms = (queued1 - queued0) * 1e3
                    parts = f"waited {queued_ms:.1f} ms for a core, was idle or blocked {slept_ms - cpu_ms - queued_ms:.1f} ms"
                logger.info("the hub-lag probe woke %.1f ms late; over its %.1f ms of sleep the loop's thread ran "
                            "%.1f ms, %s", late / 1e3, slept_ms, cpu_ms, parts)
            t0, cpu0, queued0 = t1, cpu1, queued1

    def _fail_all(self, error: Exception) -> None:
        for _, result in self._proposals.values():
            result.set_exception(error)
        for result in self._reads.values():
            result.set_exception(error)
        for result in self._reads_waiting_apply:
            result.set_exception(error)
        for result in self._index_waiters:
            result.set_exception(error)
        for _, result in self._backups_asked:  # review of ops, finding 8: they waited up to their timeout
            result.set_exception(error)
        self._backups_asked = []
        self._proposals, self._reads, self._reads_waiting_apply, self._index_waiters = {}, {}, {}, {}
        for pending in self._deadlines.values():  # requests still in the inbox, or answered already
            for result in pending:
                if not result.ready():
                    result.set_exception(error)
        self._deadlines = {}


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, OSError)


_libc_handle: ctypes.CDLL | None = None
_no_libc = False


def _libc() -> ctypes.CDLL | None:
    """libc for prctl (Linux), loaded in the parent: a child should not load libraries."""
    global _libc_handle, _no_libc
    if _libc_handle is None and not _no_libc:
        try:
            _libc_handle = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _no_libc = True
    return _libc_handle


def _run_queue_seconds() -> float | None:
    """How long the calling thread has waited on a run queue for a core (Linux's /proc/thread-self/schedstat, its
    second field, in ns); None where it cannot be read (another OS, a kernel without CONFIG_SCHED_INFO, hidepid)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _reaped(pid: int) -> bool:
    """waitpid(WNOHANG): whether the child `pid` is gone (reaped now, or already)."""
    try:
        done, _ = posix.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # reaped already (gevent's child watcher, when something else started one)
    return bool(done)


def _descriptor_limit() -> int:
    """One past the highest descriptor number this process can hold (RLIMIT_NOFILE's soft limit), found in the
    parent: the child closes every inherited descriptor up to it. Unlimited: the numbers in use are bounded by
    what the kernel allows a process (fs.nr_open, 1M by default)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _threadpool_call(threadpool: Any, call: Callable[..., None], *args: Any) -> None:
    """`call(*args)` in gevent's threadpool, an Exception it raises raised here, in the waiting greenlet: caught
    in the thread and handed back as a value, since gevent's threadpool prints the traceback of an exception a
    task raises before the caller sees it (a full disk at a stepped snapshot's write wrote a "Traceback" into the
    log of a node that handled it: CI at 2b2f029, tests/test_disk_faults.py)."""
    def task() -> Exception | None:
        try:
            call(*args)
        except Exception as e:  # noqa: BLE001 - raised again below, in the caller's greenlet
            return e
        return None

    error = threadpool.apply(task)
    if error is not None:
        raise error


def _child_main(work: Callable[[], bytes], w: int, parent: int, libc, fd_limit: int) -> None:
    """A forked child (Runtime._fork_child): run `work` on the copy-on-write image and write what it returns on
    the pipe `w` (an exception's name and text when it raises). Never returns."""
    code = 1
    try:
        try:
            if libc and hasattr(libc, "prctl"):
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl
                posix._exit(1)
            # The lowest CPU priority: on a small machine the children of all nodes snapshot at about the same
            # time (same threshold, same log), and at full priority they starve the serving processes of CPU
            # until leaders miss their quorum checks (bench/snapshot_stall.py: a leader change at 1M keys).
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, 0, 19)
            # Every inherited descriptor but stdio and the pipe: the sockets (a restarted parent must find its
            # ports free), the data dir's lock, log and folders, gevent's and zmq's own.
            posix.closerange(3, w)
            posix.closerange(w + 1, max(fd_limit, w + 1))
            from . import fs as fs_module  # noqa: PLC0415

            fs_module._spares.clear()  # closed above: never close those numbers again
            gc.disable()  # collections would touch (and copy) every page of the image for nothing
            posix.write(w, work())
            code = 0
        except BaseException as e:  # noqa: BLE001 - the parent learns of it through the pipe
            try:
                posix.write(w, f"{type(e).__name__}: {e}".encode()[:200])
            except BaseException:  # noqa: BLE001, S110
                pass
    finally:
        posix._exit(code)
