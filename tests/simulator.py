"""A deterministic simulated cluster of RaftNodes, and the safety checks run after every step.

One `random.Random(seed)` drives everything: node rngs, clock rates, message delays (a few longer than an election
timeout), drops, duplicates and reorders, partitions, pauses, crashes (and where they hit), membership changes,
leadership transfers, snapshots and the clients. Time is an integer number of ticks; the network is a heap of
(deliver_at, sequence, message); every message crosses `codec.encode_batch`/`codec.decode_batch`.

Rules of the model:
- Each node runs the real DiskStorage on its own simulated disk (tests/crashfs.py), so the model and the disk code
  cannot drift apart. A crash is a power failure (the disk becomes one of the states CrashFS allows, picked at
  random: unsynced data dropped, kept or torn, unsynced folder operations undone) or a SIGKILL (the page cache
  survives). A node may crash at any point of a Ready (`CRASH_POINTS`): before its save (a leader's early
  appends, thesis §10.2.1, may be out already), at a random file operation of its save or snapshot install,
  after its save, after its sends; a suffix of what it had handed to the transport in that Ready is lost. It may
  also crash at a random file operation of a snapshot it takes, and of its own recovery. Crashes are 20 times as
  likely around a new term or vote or a leader's snapshot, five times in a new leader's first tick.
- A link may be held (`Cluster.hold`): every message sent on it waits for 1 to 10 election timeouts, as in a
  transport's queue or the socket buffer of a process that stopped reading, then the whole backlog arrives in one
  burst (in order or shuffled, some of it twice), long after terms, configurations and snapshots moved on. Half the
  schedules hold links (from an rng of their own); `stats` counts the held messages that reached a node whose term,
  snapshot or configuration had moved since they were sent.
- A paused node (SIGSTOP) misses its ticks and catches up on them when resumed, as the runtime's monotonic clock
  does; messages sent to it wait, as in its socket buffers, and are read after the catch-up (or after a client's
  request). Each node's clock runs at its own rate, within `clock_drift_percent` of the true one; leases (thesis
  §6.4.1) assume rates agree within their margin (`lease_scenario` pushes that to the edge).
- Clients (`Client`) ask one request at a time of the node they stick to, follow redirects for writes, and give
  up after a timeout (a write's outcome is then unknown).
- Checks run after every tick of a node, every delivered message and every Ready, on the node that moved: Figure 3
  (election safety, leader append-only, log matching over whole logs, leader completeness, state machine safety:
  log matching incrementally, as every entry a node ever holds is recorded with the term before it, so two logs
  that share an (index, term) share all before it), one vote per term, a commit index that never goes back, and
  that recovery gives back the fsynced term and vote. At the end of a schedule: liveness after healing, every
  acknowledged write on every member, and the clients' history through `tests/linearizability.py`.
- A failure raises SafetyViolation with the seed, the last events, and one command that replays the schedule.

What it does not run (review fresh, Q1): the core and the storage, not raftlib.runtime. A snapshot of a node's
own is written whole (`write_snapshot`, as a forked child) and committed without a pre-built base segment
(`begin_base`, `base_step`, `base_sync_job`); what installs make garbage is unlinked in the install, not by the
garbage job (`unlink_garbage_later`, `garbage_job`); no stepped snapshot (`open_snapshot_file`,
SteppedSnapshotWriter); a backlog is applied one capped piece per drive, the core's side only, not the runtime's
(pieces for APPLY_DRIVE_SECONDS of CPU, its proposals' waiters). Those are covered by tests/crash_explorer.py
(every crash state of the base segment's steps and sync, the garbage job with faults, stepped snapshots: run by
test_crash_explorer), test_storage, test_snapshot_stepped and test_runtime (pre-built bases, slowed garbage
jobs, applying in pieces, a waiter whose index another term's entry took).

`PROFILES` are the nemeses a schedule's seed picks from. `MUTATIONS` names deliberately broken variants of the
core and storage; `--mutation NAME` runs with one on, to show that the checks catch it (tests/test_mutations.py).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # `python tests/simulator.py` from the project root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ast
import collections
import contextlib
import dataclasses
import heapq
import math
import random
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import linearizability
from crashfs import CrashFS, SimulatedCrash
from raftlib import storage as storage_module
from raftlib import (
    AppendEntries,
    ConfChange,
    ConfChangeKind,
    Config,
    Entry,
    EntryKind,
    HardState,
    Member,
    Membership,
    NotLeader,
    ProposalDropped,
    RaftNode,
    RequestVoteReply,
    Role,
    Snapshot,
    StoredState,
    TargetRestoring,
    TimeoutNow,
    UncommittedBoundExceeded,
)
from raftlib import codec, readonly
from raftlib.messages import snapshot_bytes
from raftlib.progress import ProgressState
from raftlib.storage import DiskStorage
from raftlib.storage_errors import StorageError

ELECTION_TICKS = 10
HEARTBEAT_TICKS = 2
CLIENTS = 4
CLIENT_OP_CHANCE = 0.25  # per idle client per tick: a write (55%) or a read
CLIENT_TIMEOUT_ELECTIONS = 3  # a client gives up on a request after this many election timeouts
HOLD_RATE = 0.015  # per round of a schedule that holds links: the chance that a hold begins (_hold_links)
START_RESTORE_DRIVES_MAX = 40  # a restart restores its own snapshot over 0..this (or restore_drives_max) drives

# Where in the handling of a Ready a node may crash (see the module docstring).
CRASH_POINTS = ("before_save", "mid_save", "after_save", "after_send")

# Deliberately broken variants of the core, each named by what it gets wrong: the Config overrides that make it (a
# value may be a function of the schedule's election ticks), "storage.NAME": a switch of raftlib.storage, or
# "cluster.NAME": an attribute of Cluster, for what the simulator decides in the server's place (how it starts nodes).
MUTATIONS: dict[str, dict] = {
    "vote_twice": {"unsafe_vote_twice": True},
    "read_without_quorum": {"unsafe_read_without_quorum": True},
    "commit_previous_term": {"unsafe_commit_previous_term": True},
    "lease_without_margin": {"unsafe_lease_ticks": lambda election_ticks: election_ticks},
    "lease_longer_than_election_timeout": {"unsafe_lease_ticks": lambda election_ticks: 2 * election_ticks},
    "lease_before_commit_in_term": {"unsafe_lease_before_commit_in_term": True},
    "reply_before_fsync": {"unsafe_reply_before_fsync": True},
    "count_own_entries_before_fsync": {"unsafe_count_own_entries_before_fsync": True},
    "forget_vote_on_restart": {"unsafe_forget_vote_on_restart": True},
    "keep_conflicting_suffix": {"unsafe_keep_conflicting_suffix": True},
    "catch_up_counted_from_the_cut": {"unsafe_catch_up_counted_from_the_cut": True},
    # The server's: every start of a node passes `bootstrapped` to RaftNode, not only the one that made a new
    # cluster (raftlib.server.node): a restarted lone voter then campaigns at its first tick (review rv3, T1).
    "bootstrapped_on_restart": {"cluster.unsafe_bootstrapped_on_restart": True},
    # The storage's own: recovery as before base records (issue 11), each record's entries at or below the
    # snapshot dropped, and with them the cut of a conflicting suffix they stood for.
    "replay_filter": {"storage.UNSAFE_REPLAY_FILTER": True},
}


class SafetyViolation(AssertionError):
    pass


class KV:
    """The simulated state machine: key -> (value, index of the write that set it)."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[str, int]] = {}
        self.applied_index = 0

    def apply(self, entry: Entry) -> None:
        if entry.kind is EntryKind.COMMAND:
            key, value = entry.data.decode().split("=", 1)
            self.data[key] = (value, entry.index)
        self.applied_index = entry.index

    def snapshot_bytes(self) -> bytes:
        """The state with the index of the last entry applied to it: its SETs are idempotent, so a snapshot whose
        data is the state at another index than its own would restore to a state that looks right; the index
        inside lets `restore` tell (a snapshot written at commit time but labelled with the fork's index)."""
        return repr((self.applied_index, sorted(self.data.items()))).encode()

    def restore(self, data: bytes, index: int) -> None:
        applied, items = ast.literal_eval(data.decode()) if data else (0, [])
        if data and applied != index:
            raise SafetyViolation(f"a snapshot at index {index} holds the state at index {applied}")
        self.data = dict(items)
        self.applied_index = index


DATA_DIR = "/data"
SAVE_OPS = 2  # the file operations of a plain save: append the record, fdatasync
WRITE_SNAPSHOT_OPS = 3  # the forked child's part of a snapshot: create, append, fsync its file
INSTALL_OPS = 14  # a snapshot install takes 12-13 (the snapshot file, the new segment, the unlinks, their syncs)
LOAD_OPS = 6  # a recovery 3 (its syncs), more when it repairs something (a torn tail, garbage)


class SimDisk:
    """One node's disk: the real DiskStorage on its own CrashFS, so the simulated crashes are the ones the storage
    code meets (tests/crashfs.py: unsynced data dropped, kept or torn; unsynced folder operations undone in any
    combination that applies). `crash_at_op` crashes a call at its k-th file operation (k = 0: before the first)."""

    def __init__(self) -> None:
        self.fs = CrashFS()
        self.fs.record_ops = False
        self.storage: DiskStorage | None = None

    def open(self, crash_at_op: int | None = None) -> StoredState | None:
        """A process starts: a fresh DiskStorage recovers the data dir. None when it crashed on the way."""
        self.storage = None
        self._arm(crash_at_op)
        try:
            storage = DiskStorage(DATA_DIR, fs=self.fs)
            stored = storage.load()
        except SimulatedCrash:
            return None
        self._disarm()
        self.storage = storage
        return stored

    def load(self) -> StoredState:
        """What the open storage holds (a first start, and tests, read it)."""
        s = self.storage.state
        return StoredState(s.hard_state, s.snapshot, list(s.entries))

    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None = None,
             sync: bool = True, crash_at_op: int | None = None) -> bool:
        """Like DiskStorage.save; False when the process died in it (at `crash_at_op`)."""
        self._arm(crash_at_op)
        try:
            self.storage.save(hard_state, entries, snapshot, sync=sync)
        except SimulatedCrash:
            return False
        self._disarm()
        return True

    def write_snapshot(self, snapshot: Snapshot, crash_at_op: int | None = None) -> str | None:
        """The part of a snapshot of the node's own that the runtime's forked child runs: its file under a
        temporary name. Returns that name, or None when the machine died in it (at `crash_at_op`)."""
        tmp = self.storage.begin_snapshot(snapshot.last_included_index)
        self._arm(crash_at_op)
        try:
            self.storage.write_snapshot(snapshot, tmp)
        except SimulatedCrash:
            return None
        self._disarm()
        return tmp

    def commit_snapshot(self, snapshot: Snapshot, tmp: str,
                        crash_at_op: int | None = None) -> tuple[bool, Snapshot | None]:
        """The part the runtime runs once the child has exited: (False, None) when the process died in it, else
        (True, the snapshot kept, its data read from the file; None when a leader's snapshot overtook it)."""
        self._arm(crash_at_op)
        try:
            kept = self.storage.commit_snapshot(snapshot, tmp)
        except SimulatedCrash:
            return False, None
        self._disarm()
        return True, kept

    def crash(self, rng, power_failure: bool = True) -> None:
        """The process dies: a power failure leaves one crash state CrashFS allows, picked with `rng`; a process
        crash (SIGKILL) leaves what the kernel has, synced or not."""
        self.storage = None
        if power_failure:
            self.fs.crash(rng)
        else:
            self.fs.crash_process()

    def _arm(self, crash_at_op: int | None) -> None:
        if crash_at_op is not None:
            self.fs.fail_at = {self.fs.op_count + crash_at_op: SimulatedCrash()}

    def _disarm(self) -> None:
        self.fs.fail_at = {}


@dataclass
class SimNode:
    node_id: str
    storage: SimDisk
    node: RaftNode | None = None
    kv: KV = field(default_factory=KV)
    alive: bool = True
    paused: bool = False
    missed_ticks: int = 0  # while paused; a resumed node catches up on them first, as the runtime's clock does
    backlog: list = field(default_factory=list)  # messages that arrived while paused, in arrival order
    rate_percent: int = 100  # how fast this node's clock runs
    clock_percent: int = 0  # the fraction of a tick this node's clock has run but not yet ticked
    max_commit_index: int = 0  # since the last start: a commit index never goes back
    leader_last_index: tuple[int, int] = (0, 0)  # (term, last index) while leader: a leader never shrinks its log
    saved_vote: tuple[int, str | None] = (0, None)  # (current_term, voted_for) last saved
    durable_vote: tuple[int, str | None] = (0, None)  # ... last saved with an fsync: no crash may take it away
    written_votes: set = field(default_factory=set)  # ... written since, which a crash may keep or lose
    leader_since: int = -1000  # when this node last became leader
    batching: bool = False  # this tick, its inputs are all stepped before its Readies are handled
    incarnation: int = 0  # how many times this node has started
    bootstrapped: bool = False  # this start was a bootstrap (Cluster._start) of its configuration's only voter
    ticks_since_start: int = 0  # of its own clock, since this start
    request_ids: Iterator[int] = field(default_factory=lambda: iter(()))  # this process's read ids
    # A snapshot whose file the runtime's forked child has written and whose commit the node has not yet made
    # (the node applies, saves and sends meanwhile): (snapshot, its temporary file, the commit's crash op or None).
    forked: tuple | None = None
    # A leader's snapshot saved, whose restore into the KV the node has not finished (the runtime's piece-by-piece
    # restore: `advance(rd, snapshot_applied=False)`, then `snapshot_applied` some drives later): (its index, its
    # data, the drives left).
    restoring: tuple[int, bytes, int] | None = None


@dataclass
class PendingWrite:
    key: str
    value: str
    node_id: str
    index: int
    term: int
    start: int
    call: int = 0  # on the history's clock
    ret: float = math.inf  # when acknowledged; math.inf while (or when forever) unknown
    lost: bool = False  # another entry was applied at its index: it never took effect


@dataclass
class PendingRead:
    request_id: int
    key: str
    node_id: str
    start: int
    min_write_index: int  # the index of the newest write to `key` acknowledged before this read began
    read_index: int | None = None
    call: int = 0
    served: bool = False


@dataclass
class Hold:
    """A held link: what was sent on it since the hold began (each message with the receiver's state then, see
    Cluster.receiver_state), released as one burst at `release_at`."""

    release_at: int
    shuffle: bool  # the burst arrives in any order (else in the order sent)
    duplicate: bool  # some of its messages arrive twice
    messages: list = field(default_factory=list)


# What a held message's receiver was when it was sent: (incarnation, current term, snapshot index, configuration
# index), or None while it was down.
ReceiverState = tuple[int, int, int, int] | None


class CoreCall:
    """`with cluster.core_call(node_id, doing):` around a call into the core: an assert of the core's (its own
    invariants) raised there fails the schedule as a SafetyViolation, with the trace and the replay command, as
    stepping a message always did. Only the stepping was wrapped before: an assert from a snapshot's commit
    (create_snapshot) escaped as a bare AssertionError, which tests/test_mutations.py did not count as a catch
    (review cu2, Q3)."""

    __slots__ = ("cluster", "node_id", "doing")

    def __init__(self, cluster: Cluster, node_id: str, doing: str) -> None:
        self.cluster, self.node_id, self.doing = cluster, node_id, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if kind is not None and issubclass(kind, AssertionError) and not issubclass(kind, SafetyViolation):
            self.cluster.core_assertion_failed(self.node_id, self.doing, error)
        return False


class Cluster:
    # Each answered read is compared at once with the newest write acknowledged before it began (a quick check that
    # names the read); the whole history goes through the linearizability checker at the end either way.
    check_reads_at_once = True

    def __init__(
        self,
        seed: int,
        n: int = 3,
        spares: int = 0,
        config_overrides: dict | None = None,
        codec_roundtrip: bool = True,
        drop_rate: float = 0.0,
        dup_rate: float = 0.0,
        max_delay: int = 2,
        election_ticks: int = ELECTION_TICKS,
        heartbeat_ticks: int = HEARTBEAT_TICKS,
        lease_share: float = 0.5,
        long_delay_rate: float = 0.0,
        clock_drift_percent: int = 0,
        restart_rate: float = 0.0,
    ) -> None:
        self.seed = seed
        self.lease_share = lease_share  # of the client reads, the share asked for with a lease
        self.size = n
        self.rng = random.Random(seed)
        self.now = 0
        self.codec_roundtrip = codec_roundtrip
        self.drop_rate, self.dup_rate, self.max_delay = drop_rate, dup_rate, max_delay
        self.long_delay_rate = long_delay_rate  # of the messages, the share delayed by 1 to 3 election timeouts
        self.restart_rate = restart_rate  # of the crashes inside a Ready, the share restarted at once (a supervisor)
        self.load_crash_rate = 0.0  # of the recoveries, the share that crash (at a random file operation)
        self.snapshot_entries: int | None = None  # a node snapshots once it applied this many entries since the last
        self.snapshot_crash_rate = 0.0  # of the snapshots, the share that crash (at a random file operation)
        self.batch_rate = 0.0  # of the ticks of a node, the share in which its inputs are batched (_after_input)
        # A leader's snapshot is restored into the KV over 1..restore_drives_max drives (0: in the Ready that
        # carries it), as the runtime restores a big state a piece per drive. Drawn from its own rng, so that
        # the schedules without a leader's snapshot are the same with it or without it.
        self.restore_drives_max = 0
        self.restore_rng = random.Random(f"{seed}/restore")
        self.power_failure_share = 0.5  # of the crashes, the share that lose the page cache (the rest: SIGKILL)
        self.config_overrides = dict(config_overrides or {})
        # A mutation (MUTATIONS): every start of a node passes `bootstrapped`, as a server that mistook a restart
        # for a bootstrap would. Set from a "cluster.NAME" override, before any node starts.
        self.unsafe_bootstrapped_on_restart = False
        for name in [k for k in self.config_overrides if k.startswith("cluster.")]:
            setattr(self, name[len("cluster."):], self.config_overrides.pop(name))
        self.election_ticks, self.heartbeat_ticks = election_ticks, heartbeat_ticks
        self.replay_command = f"python tests/simulator.py --seed {seed} --size {n}"
        self.ids = [f"n{i}" for i in range(1, n + spares + 1)]
        voters = tuple(self.ids[:n])
        self.initial = Membership(voters=voters, members=tuple(Member(v, f"raft-{v}", f"http-{v}") for v in voters))
        self.nodes: dict[str, SimNode] = {}
        self.trace: list[str] = []
        self.leaders_by_term: dict[int, str] = {}
        self.applied: dict[int, tuple[int, int, bytes]] = {}  # index -> (term, kind, data) applied anywhere
        self.entries_seen: dict[tuple[int, int], tuple[Entry, int | None]] = {}  # (index, term) -> (entry, term before)
        self.commit_term: dict[int, int] = {}  # index -> term of the leader that first committed it
        self.votes: dict[tuple[str, int], str] = {}  # (voter, term) -> the candidate it voted for
        self.stats: collections.Counter = collections.Counter()  # what the faults did (test_simulation counts them)
        self._leader_commit: dict[str, int] = {}
        self._leaders_checked: set[tuple[str, int]] = set()
        for node_id in self.ids:
            storage = self.new_storage()
            if node_id in voters:  # bootstrap: every initial voter starts with the same first entry
                storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", self.initial)])
            rate = 100 + self.rng.randint(-clock_drift_percent, clock_drift_percent) if clock_drift_percent else 100
            self.nodes[node_id] = SimNode(node_id, storage, rate_percent=rate,
                                          clock_percent=self.rng.randrange(100) if clock_drift_percent else 0)
            # As the server's first start after its bootstrap (nodestart): the initial voters' first starts only.
            self._start(node_id, bootstrapped=node_id in voters)
        self.network: list = []
        self._seq = 0
        self.cut: set[tuple[str, str]] = set()  # directed links that drop everything
        self.holds: dict[tuple[str, str], Hold] = {}  # directed links whose messages wait for a burst (hold)
        self._held: dict[int, ReceiverState] = {}  # network sequence number of a released message -> its receiver's
        # state when it was sent. Holds are drawn from an rng of their own: schedules that hold nothing are the same.
        self.hold_rate = 0.0  # per round of a random schedule: the chance that a hold begins
        self.hold_rng = random.Random(f"{seed}/hold")
        self.deliver_filter = None  # optional callable(message) -> message or None, for scripted scenarios
        self.writes: list[PendingWrite] = []  # every write a leader accepted, whatever became of it
        self.acked_writes: list[PendingWrite] = []
        self._acked_index: dict[str, int] = {}  # key -> index of the newest acknowledged write to it
        self.read_ops: list[linearizability.Op] = []  # every read that was answered
        self.history_clock = 0  # orders calls and returns: the simulator is one thread, so this is real time
        self.pending_writes: dict[str, list[PendingWrite]] = {i: [] for i in self.ids}
        self.pending_reads: dict[str, dict[int, PendingRead]] = {i: {} for i in self.ids}
        self.reads_checked = 0
        self.next_value = 1
        self.keys = ["a", "b", "c"]

    # ---- node lifecycle ---------------------------------------------------------------------------

    def _config(self, node_id: str) -> Config:
        # Every node is of this release: a restoring one says so in its append replies.
        overrides = {"restoring_in_replies": lambda: True, **self.config_overrides}
        return Config(
            node_id=node_id,
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            snapshot_chunk_bytes=64,
            **overrides,
        )

    def new_storage(self) -> SimDisk:
        """An empty disk for a node, its storage open."""
        storage = SimDisk()
        storage.open()
        return storage

    def _recover(self, sn: SimNode) -> StoredState:
        """The node's process starts and recovers its storage; it may crash while doing so (and start again)."""
        for _ in range(3):
            crash_at = self.rng.randrange(LOAD_OPS) if self.rng.random() < self.load_crash_rate else None
            try:
                stored = sn.storage.open(crash_at_op=crash_at)
            except StorageError as e:
                self.fail(f"storage: {sn.node_id} cannot recover its data dir after a crash: {e}")
            if stored is not None:
                return stored
            self.log_event(sn.node_id, f"crash at file operation {crash_at} of recovery")
            self.stats["crash inside a recovery"] += 1
            sn.storage.crash(self.rng, power_failure=self.rng.random() < self.power_failure_share)
        stored = sn.storage.open()
        assert stored is not None
        return stored

    def _start(self, node_id: str, bootstrapped: bool = False) -> None:
        """Start the node's process on its disk. `bootstrapped`: this start made its state (Cluster's first start of
        an initial voter), passed to RaftNode as the server passes it after a bootstrap; never on a restart, nor
        on a disk a test set up (preload_logs)."""
        sn = self.nodes[node_id]
        recovering = sn.storage.storage is None  # (else: a first start, on the storage as a test set it up)
        stored = self._recover(sn) if recovering else sn.storage.load()
        recovered = (stored.hard_state.current_term, stored.hard_state.voted_for)
        if recovering and recovered != sn.durable_vote and recovered not in sn.written_votes:
            self.fail(f"storage: {node_id} recovered term and vote {recovered}; it had fsynced {sn.durable_vote} "
                      f"and written {sorted(sn.written_votes, key=repr)} since")
        sn.durable_vote, sn.written_votes = recovered, set()  # a recovery makes what it read durable
        with self.core_call(node_id, "starting from its storage"):
            sn.node = RaftNode(
                self._config(node_id),
                random.Random(self.rng.randrange(1 << 30)),
                stored.hard_state,
                stored.raft_log(),
                stored.snapshot,
                # A lone voter (a cluster grown from one node) leads at its first tick then (RaftNode's rules); a
                # restart waits one election timeout.
                bootstrapped=bootstrapped or self.unsafe_bootstrapped_on_restart,
            )
        sn.bootstrapped = bootstrapped and sn.node.membership.voters == (node_id,)
        sn.ticks_since_start = 0
        # A leader's snapshot's chunks go to its file on this node's disk as they come, as in the runtime.
        sn.node.open_snapshot_sink = sn.storage.storage.receive_snapshot
        sn.incarnation += 1
        # Read ids as the runtime draws them: a new sequence per process (see readonly.request_ids).
        sn.request_ids = readonly.request_ids(random.Random(f"{self.seed}/{node_id}/{sn.incarnation}"))
        sn.kv = KV()
        sn.restoring = None
        if stored.snapshot is not None:
            # Through the snapshot's source (a file held open on the node's CrashFS), as the server restores: over
            # 1..START_RESTORE_DRIVES_MAX drives, as Runtime.restore_at_start does (the node stepped meanwhile, the
            # KV empty until the swap: RaftNode.snapshot_not_applied_yet), or, drawn 0, at once (review of
            # fastrestore2, Q-a: the start-up restore was not modelled, so never mixed with crashes and the rest).
            index, data = stored.snapshot.last_included_index, snapshot_bytes(stored.snapshot.data)
            drives = self.restore_rng.randint(0, max(self.restore_drives_max, START_RESTORE_DRIVES_MAX))
            if drives:
                with self.core_call(node_id, "at snapshot_not_applied_yet"):
                    sn.node.snapshot_not_applied_yet()
                sn.restoring = (index, data, drives)
                self.stats["own snapshot restored at start over several drives"] += 1
            else:
                sn.kv.restore(data, index)
        sn.alive = True
        sn.paused = False
        sn.missed_ticks = 0
        sn.backlog = []
        sn.max_commit_index = 0
        sn.leader_last_index = (0, 0)
        sn.saved_vote = (stored.hard_state.current_term, stored.hard_state.voted_for)
        log = sn.node.log
        for index in range(log.first_index, log.last_index + 1):  # what storage gave back was once in a Ready
            self._check_entry(node_id, log.entry(index), log.term(index - 1))

    def _crash_in_ready(self, node_id: str, outbox: list) -> None:
        sent = self.rng.randint(0, len(outbox))
        for m in outbox[:sent]:  # what left before the process died
            self.send(m)
        self.stats["messages lost in a crash"] += len(outbox) - sent
        self.crash(node_id)
        if self.restart_rate and self.rng.random() < self.restart_rate:
            self.restart(node_id)

    def preload_logs(self, logs: dict[str, list[int]], current_term: int) -> None:
        """Give each node a log with these terms (index 1 stays the bootstrap configuration), then restart it."""
        first = self.nodes[self.ids[0]].storage.load().entries[0]
        for node_id, terms in logs.items():
            storage = self.new_storage()
            es = [first] + [Entry(t, i, EntryKind.COMMAND, f"k=t{t}i{i}".encode()) for i, t in enumerate(terms[1:], 2)]
            storage.save(HardState(current_term, None, 1), es)
            self.nodes[node_id].storage = storage
            self.restart(node_id)

    def crash(self, node_id: str) -> None:
        sn = self.nodes[node_id]
        sn.alive = False
        sn.node = None
        sn.backlog = []
        sn.forked = None  # a snapshot's child dies with its parent (PR_SET_PDEATHSIG)
        # A power failure: the kernel wrote out some, none or all of what was not synced. Else SIGKILL: all of it.
        power_failure = self.rng.random() < self.power_failure_share
        self.stats["power failures" if power_failure else "process kills"] += 1
        sn.storage.crash(self.rng, power_failure=power_failure)
        self.pending_writes[node_id] = []  # outcome unknown: they may or may not commit
        self.pending_reads[node_id] = {}
        self.log_event(node_id, "crash")

    def restart(self, node_id: str) -> None:
        self._start(node_id)
        self.log_event(node_id, "restart")

    # ---- network ----------------------------------------------------------------------------------

    def send(self, m) -> None:
        if isinstance(m, AppendEntries) and m.src in self.nodes:
            config = self.nodes[m.src].node.config
            bound = config.max_batch_entries
            if len(m.entries) > bound:
                self.fail(f"{m.src} sent {len(m.entries)} entries in one append, over max_batch_entries {bound}")
            # More than one entry over max_batch_bytes: unbounded, an append outgrows the codec's frame (4 MiB) and
            # its follower never catches up (raftlib.log.within_bytes; the batches from behind a snapshot's cut too).
            batch_bytes = sum(e.size() for e in m.entries)
            if len(m.entries) > 1 and batch_bytes > config.max_batch_bytes:
                self.fail(f"{m.src} sent {len(m.entries)} entries of {batch_bytes} bytes in one append, over "
                          f"max_batch_bytes {config.max_batch_bytes}")
            if len(m.entries) == bound < Config.max_batch_entries:
                self.stats["appends cut at max_batch_entries"] += 1
            if m.entries and m.prev_log_index < self.nodes[m.src].node.log.snapshot_index:
                self.stats["appends sent from behind a snapshot's cut"] += 1  # Config.snapshot_catch_up_entries
        if (m.src, m.dst) in self.cut:
            return
        if self.deliver_filter is not None:
            m = self.deliver_filter(m)
            if m is None:
                return
        if self.rng.random() < self.drop_rate:
            return
        copies = 2 if self.rng.random() < self.dup_rate else 1
        hold = self.holds.get((m.src, m.dst))
        for _ in range(copies):
            if self.codec_roundtrip:
                try:
                    m = codec.decode_batch(codec.encode_batch([m]))[0]
                except codec.CodecError as e:  # its receiver would drop it, and log it: a sender's bug
                    self.fail(f"a message the codec refuses ({type(m).__name__} from {m.src}): {e}")
            if hold is not None:
                hold.messages.append((m, self.receiver_state(m.dst)))
                self.stats["messages held"] += 1
                continue
            if self.long_delay_rate and self.rng.random() < self.long_delay_rate:
                delay = self.rng.randint(self.election_ticks, 3 * self.election_ticks)
                self.stats["long delays"] += 1
            else:
                delay = self.rng.randint(0, self.max_delay)
            self._seq += 1
            heapq.heappush(self.network, (self.now + delay, self._seq, m))

    def isolate(self, node_id: str) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def partition(self, group: list[str]) -> None:
        rest = [i for i in self.ids if i not in group]
        for a in group:
            for b in rest:
                self.cut.add((a, b))
                self.cut.add((b, a))

    def heal(self) -> None:
        self.cut.clear()

    def hold(self, links: list[tuple[str, str]], ticks: int, shuffle: bool = False, duplicate: bool = False) -> None:
        """Hold these directed links (those not held already) for `ticks`: what is sent on them meanwhile arrives
        in one burst at the end (release_holds)."""
        for link in links:
            if link not in self.holds:
                self.holds[link] = Hold(self.now + ticks, shuffle, duplicate)
                self.log_event(link[0], f"link to {link[1]} held for {ticks} ticks"
                                        f"{' (shuffled)' if shuffle else ''}{' (duplicated)' if duplicate else ''}")

    def receiver_state(self, node_id: str) -> ReceiverState:
        sn = self.nodes[node_id]
        if not sn.alive:
            return None
        n = sn.node
        return sn.incarnation, n.current_term, n.log.snapshot_index, n.membership_index

    def release_holds(self, every: bool = False) -> None:
        """The holds whose time is up (`every`: all of them) release their backlog: delivered in this tick, one
        after the other (shuffled, or with some messages twice, as the hold was drawn)."""
        for link in sorted(self.holds):
            hold = self.holds[link]
            if not every and hold.release_at > self.now:
                continue
            del self.holds[link]
            burst = []
            for held in hold.messages:
                burst.append(held)
                if hold.duplicate and self.hold_rng.random() < 0.5:
                    burst.append(held)
            if hold.shuffle:
                self.hold_rng.shuffle(burst)
            self.stats["held bursts"] += 1
            self.log_event(link[0], f"link to {link[1]} released: a burst of {len(burst)}")
            for m, state in burst:
                self._seq += 1
                self._held[self._seq] = state
                heapq.heappush(self.network, (self.now, self._seq, m))

    def _count_held_delivery(self, sn: SimNode, m, sent_to: ReceiverState) -> None:
        """Count what a held message meets at its receiver (test_simulation requires each, so that the fault is
        not vacuous): a term, snapshot or configuration that moved since it was sent, a restart."""
        n = sn.node
        self.stats["held messages delivered"] += 1
        if m.term < n.current_term:
            self.stats["held messages of an older term delivered"] += 1
        if isinstance(m, AppendEntries) and m.prev_log_index < n.log.snapshot_index:
            self.stats["held appends below the receiver's snapshot delivered"] += 1
        if sent_to is None or sent_to[0] != sn.incarnation:
            self.stats["held messages delivered after a restart"] += 1
            return
        _, term, snapshot_index, membership_index = sent_to
        if n.current_term != term:
            self.stats["held messages delivered after a term change"] += 1
        if n.log.snapshot_index != snapshot_index:
            self.stats["held messages delivered after a snapshot"] += 1
        if n.membership_index != membership_index:
            self.stats["held messages delivered after a configuration change"] += 1

    # ---- running ----------------------------------------------------------------------------------

    def log_event(self, node_id: str, event: str) -> None:
        sn = self.nodes[node_id]
        n = sn.node
        if n is not None:
            self.trace.append(
                f"t={self.now} {node_id} {n.role.value} term={n.current_term} commit={n.commit_index} {event}"
            )
        else:
            self.trace.append(f"t={self.now} {node_id} down {event}")
        if len(self.trace) > 400:
            del self.trace[:200]

    def _clock_ticks(self, sn: SimNode) -> int:
        """How many times this node's clock ticks during this tick of true time (0, 1 or 2 when rates differ)."""
        if sn.rate_percent == 100:
            return 1
        sn.clock_percent += sn.rate_percent
        ticks, sn.clock_percent = divmod(sn.clock_percent, 100)
        return ticks

    def tick(self, crash_rate: float = 0.0, clients=None) -> None:
        """Advance one tick: tick every live node (by its own clock), let the `clients()` act, deliver what is due,
        process every Ready (at once, or for a batching node at the end)."""
        self.now += 1
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if not sn.alive:
                continue
            ticks = self._clock_ticks(sn)
            if sn.paused:
                sn.missed_ticks += ticks
                continue
            for _ in range(ticks):
                self._tick_node(node_id, crash_rate)
                if not sn.alive:
                    break
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if sn.backlog and sn.alive and not sn.paused:
                self._deliver_backlog(sn, crash_rate)
        if clients is not None:
            clients()
        if self.holds:
            self.release_holds()
        while self.network and self.network[0][0] <= self.now:
            _, seq, m = heapq.heappop(self.network)
            held = seq in self._held
            sent_to = self._held.pop(seq, None)
            sn = self.nodes[m.dst]
            if not sn.alive:
                continue
            if sn.paused:
                sn.backlog.append(m)  # waits in the socket for the process to run again
                continue
            if held:
                self._count_held_delivery(sn, m, sent_to)
            self._step(m, crash_rate)
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if sn.batching and sn.alive and not sn.paused:
                self.stats["batched drives"] += 1
                self.process(node_id, crash_rate)
            sn.batching = bool(self.batch_rate) and self.rng.random() < self.batch_rate

    def _tick_node(self, node_id: str, crash_rate: float = 0.0) -> None:
        sn = self.nodes[node_id]
        role = sn.node.role
        sn.ticks_since_start += 1
        with self.core_call(node_id, "at a tick"):
            sn.node.tick()
        if sn.node.role is not role:
            self.log_event(node_id, f"tick -> {sn.node.role.value}")
        self._after_input(sn, crash_rate)

    def _after_input(self, sn: SimNode, crash_rate: float = 0.0) -> None:
        """Handle the node's Readies now, or (batching) once everything of this tick reached it: the runtime's
        drive takes everything waiting at once (ticks, messages, proposals) and steps the node with all of it."""
        if sn.batching:
            self._check_node(sn.node_id)
        else:
            self.process(sn.node_id, crash_rate)

    def _step(self, m, crash_rate: float = 0.0) -> None:
        sn = self.nodes[m.dst]
        role = sn.node.role
        try:
            sn.node.step(m)
        except SafetyViolation:
            raise
        except AssertionError as e:  # as core_call does (not used here: the type and source are named only then)
            self.core_assertion_failed(m.dst, f"stepping {type(m).__name__} from {m.src}", e)
        if sn.node.role is not role:
            self.log_event(m.dst, f"{type(m).__name__} from {m.src} -> {sn.node.role.value}")
        self._after_input(sn, crash_rate)

    def process(self, node_id: str, crash_rate: float = 0.0) -> None:
        """Check the node, then handle each of its Readies as the runtime does, checking again after each."""
        sn = self.nodes[node_id]
        self._check_node(node_id)
        if sn.alive and sn.restoring is not None:
            self._restore_step(sn)
        while sn.alive:
            with self.core_call(node_id, "handing out a Ready"):
                rd = sn.node.ready() if sn.node.has_ready() else None
            if rd is None:
                break
            point = None
            # Crash 20 times as often around a new term or vote, or a snapshot from the leader (the saves whose
            # loss matters most; they are few), five times in a new leader's first tick (its first entries then
            # stay on a few nodes: Figure 8).
            hs = rd.hard_state
            votes = hs is not None and (hs.current_term, hs.voted_for) != sn.saved_vote
            fresh = rd.role is Role.LEADER and self.now - sn.leader_since <= 1
            rare = votes or rd.snapshot is not None
            if crash_rate and self.rng.random() < 2 * crash_rate * (20 if rare else 5 if fresh else 1):
                point = self.rng.choice(CRASH_POINTS)
            n = sn.node
            if rd.role is Role.LEADER and rd.entries:
                term, last = sn.leader_last_index
                if term == rd.term and rd.entries[0].index <= last:
                    self.fail(f"leader append-only: {node_id} rewrote its log from {rd.entries[0].index} in term "
                              f"{term}, where it had {last}")
                sn.leader_last_index = (rd.term, rd.entries[-1].index)
            if rd.snapshot is not None:
                s = rd.snapshot
                seen = self.applied.get(s.last_included_index)
                if seen is not None and seen[0] != s.last_included_term:
                    self.fail(f"{node_id} installs a snapshot at {s.last_included_index} term {s.last_included_term}"
                              f", but the entry applied there has term {seen[0]}")
            early, late = rd.split_messages()
            # A leader's appends are handed to the transport before its own save, as the runtime does. What was
            # handed over in this Ready is in the process's send buffers: a crash now loses an arbitrary suffix.
            outbox = list(early)
            if point is not None:
                self.stats[f"crash {point.replace('_', ' ')}"] += 1
            if point == "before_save":
                self._crash_in_ready(node_id, outbox)  # nothing of this Ready saved
                return
            if hs is not None:
                sn.written_votes.add((hs.current_term, hs.voted_for))
            if point == "mid_save":
                # At one of the save's file operations (or just after it): what was written and not synced may
                # be lost, kept or torn.
                ops = INSTALL_OPS if rd.snapshot is not None else SAVE_OPS
                if not sn.storage.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync,
                                       crash_at_op=self.rng.randrange(ops)):
                    self.stats["crash inside a snapshot install" if rd.snapshot else "crash inside a save"] += 1
                self._crash_in_ready(node_id, outbox)
                return
            sn.storage.save(rd.hard_state, rd.entries, rd.snapshot, sync=rd.must_sync)
            # Entries count from their save on: a leader's entries that were neither saved nor sent (it crashed
            # first) never existed, and it may write others at the same index and term once it wins the term again.
            for e in rd.entries:
                self._check_entry(node_id, e, n.log.term(e.index - 1))
            if hs is not None:
                sn.saved_vote = (hs.current_term, hs.voted_for)
                if rd.must_sync:
                    sn.durable_vote, sn.written_votes = sn.saved_vote, set()
            if point == "after_save":
                self._crash_in_ready(node_id, outbox)  # saved, its messages maybe not sent, nothing applied
                return
            for m in late:
                if type(m) is RequestVoteReply and m.vote_granted and not m.pre_vote:
                    self._check_vote(m)
                outbox.append(m)
            if point == "after_send":
                self._crash_in_ready(node_id, outbox)  # saved and (some) sent, nothing applied
                return
            for m in outbox:
                self.send(m)
            restoring = False
            if rd.snapshot is not None:
                index, data = rd.snapshot.last_included_index, snapshot_bytes(rd.snapshot.data)
                drives = self.restore_rng.randint(0, self.restore_drives_max)
                if drives:  # over the next drives: the KV keeps the old state meanwhile, and nothing is applied
                    sn.restoring = (index, data, drives)
                    restoring = True
                    self.stats["snapshot restored over several drives"] += 1
                else:
                    sn.restoring = None  # a restore under way is replaced by this snapshot's
                    sn.kv.restore(data, index)
            for e in rd.committed_entries:
                self._apply(sn, e)
            for request_id, index in rd.read_states:
                r = self.pending_reads[node_id].get(request_id)
                if r is not None:
                    r.read_index = index
            for request_id in rd.failed_reads:
                self.pending_reads[node_id].pop(request_id, None)
            with self.core_call(node_id, "at advance"):
                sn.node.advance(rd, snapshot_applied=not restoring)
            self._serve_reads(sn)
            self._check_node(node_id)
            if sn.forked is not None and self.rng.random() < 0.3:
                self.finish_snapshot(node_id)  # the child exited a few Readies after the fork
                if not sn.alive:
                    return
            if self.snapshot_entries and n.last_applied - n.log.snapshot_index >= self.snapshot_entries:
                # As the server does when its log has grown past a threshold (here counted in entries).
                crash = self.rng.random() < self.snapshot_crash_rate
                self.take_snapshot(node_id, crash_at_op=self.rng.randrange(INSTALL_OPS) if crash else None,
                                   commit_now=False)
            if rd.committed_entries and n.apply_pending:
                # One capped piece of a backlog per drive (the runtime applies pieces for APPLY_DRIVE_SECONDS of CPU
                # a drive; one a drive is its slowest case): the rest at the node's next input.
                self.stats["apply backlog left for the next drive"] += 1
                return

    def _restore_step(self, sn: SimNode) -> None:
        """One drive of a restore under way; the last one swaps in the snapshot's state and tells the node."""
        assert sn.restoring is not None
        index, data, drives = sn.restoring
        if drives > 1:
            sn.restoring = (index, data, drives - 1)
            return
        sn.restoring = None
        sn.kv.restore(data, index)
        with self.core_call(sn.node_id, "at snapshot_applied"):
            sn.node.snapshot_applied(index)
        self.log_event(sn.node_id, f"restored the snapshot at {index}")

    def _stamp(self) -> int:
        self.history_clock += 1
        return self.history_clock

    def _apply(self, sn: SimNode, e: Entry) -> None:
        seen = self.applied.get(e.index)
        mine = (e.term, int(e.kind), e.data)
        if seen is None:
            self.applied[e.index] = mine
        elif seen != mine:
            self.fail(f"state machine safety: {sn.node_id} applied {mine} at {e.index}, another node applied {seen}")
        if e.index != sn.kv.applied_index + 1:
            self.fail(f"{sn.node_id} applied {e.index} after {sn.kv.applied_index}")
        sn.kv.apply(e)
        still = []
        for w in self.pending_writes[sn.node_id]:
            if w.index == e.index:
                if w.term == e.term:
                    w.ret = self._stamp()
                    self.acked_writes.append(w)
                    self._acked_index[w.key] = max(self._acked_index.get(w.key, 0), w.index)
                else:
                    w.lost = True  # (index, term) never commits once another entry committed at the index
            elif w.index > e.index:
                still.append(w)
        self.pending_writes[sn.node_id] = still

    def _serve_reads(self, sn: SimNode) -> None:
        reads = self.pending_reads[sn.node_id]
        for request_id in [rid for rid, r in reads.items() if r.read_index is not None]:
            r = reads[request_id]
            if sn.kv.applied_index < r.read_index:
                continue
            del reads[request_id]
            r.served = True
            value, write_index = sn.kv.data.get(r.key, (None, 0))
            self.reads_checked += 1
            self.read_ops.append(linearizability.Op(r.key, linearizability.READ, value, r.call, self._stamp()))
            if self.check_reads_at_once and write_index < r.min_write_index:
                self.fail(
                    f"linearizability: read of {r.key!r} on {sn.node_id} (started t={r.start}) saw the write at "
                    f"index {write_index}, but the write at {r.min_write_index} was acknowledged before it began"
                )

    # ---- clients ----------------------------------------------------------------------------------

    def leader(self) -> str | None:
        best = None
        for node_id in self.ids:
            sn = self.nodes[node_id]
            if sn.alive and not sn.paused and sn.node.role is Role.LEADER:
                if best is None or sn.node.current_term > self.nodes[best].node.current_term:
                    best = node_id
        return best

    def pause(self, node_id: str) -> None:
        self.nodes[node_id].paused = True
        self.log_event(node_id, "paused")

    def resume(self, node_id: str, catch_up: bool = True, backlog: bool = True) -> None:
        """Like SIGCONT for the real runtime: the node's clock jumps over the time it was stopped, then it reads
        the messages that waited for it (at once, or with `backlog` False at the next tick: a client's request
        may come first), and only then do the timers that ran out meanwhile fire, once (RaftNode.advance_clock).
        Without `catch_up`, a runtime whose clock stopped with the process: what leases must not run on."""
        sn = self.nodes[node_id]
        if not sn.paused:
            return
        sn.paused = False
        if sn.alive and catch_up:
            with self.core_call(node_id, "at advance_clock"):
                sn.node.advance_clock(sn.missed_ticks)
        if backlog:
            self._deliver_backlog(sn)
        if sn.alive and catch_up:
            with self.core_call(node_id, "firing its timers"):
                sn.node.fire_timers()
            self.log_event(node_id, f"resumed after {sn.missed_ticks} ticks -> {sn.node.role.value}")
            self.process(node_id)
        sn.missed_ticks = 0

    def _deliver_backlog(self, sn: SimNode, crash_rate: float = 0.0) -> None:
        messages, sn.backlog = sn.backlog, []
        self.stats["messages read after a pause"] += len(messages)
        for m in messages:
            if sn.alive:
                self._step(m, crash_rate)

    def client_write(self, node_id: str, key: str | None = None, redirect: bool = True,
                     value: str | None = None) -> PendingWrite | None:
        sn = self.nodes[node_id]
        if not sn.alive or sn.paused:
            return None
        key = key or self.rng.choice(self.keys)
        if value is None:
            value = f"v{self.next_value}"
            self.next_value += 1
        call = self._stamp()
        try:
            with self.core_call(node_id, "at propose"):
                index = sn.node.propose(f"{key}={value}".encode())
        except NotLeader as e:
            # The client follows the redirect to the leader the node names, once (`curl -L`, or `-forward`).
            hint = self.nodes.get(e.leader_id) if redirect else None
            if hint is None or not hint.alive or hint.paused:
                return None
            return self.client_write(hint.node_id, key, redirect=False, value=value)
        except UncommittedBoundExceeded:
            self.stats["proposals refused at max_uncommitted_bytes"] += 1
            return None
        except ProposalDropped:
            return None
        w = PendingWrite(key, value, node_id, index, sn.node.current_term, self.now, call)
        self.writes.append(w)
        self.pending_writes[node_id].append(w)
        self._after_input(sn)
        return w

    def client_read(self, node_id: str, key: str | None = None, lease: bool | None = None) -> PendingRead | None:
        sn = self.nodes[node_id]
        if not sn.alive or sn.paused:
            return None
        key = key or self.rng.choice(self.keys)
        min_index = self._acked_index.get(key, 0)
        request_id = next(sn.request_ids)
        call = self._stamp()
        try:
            with self.core_call(node_id, "at read_index"):
                sn.node.read_index(request_id, lease=self.rng.random() < self.lease_share if lease is None else lease)
        except NotLeader:
            return None
        r = PendingRead(request_id, key, node_id, self.now, min_index, call=call)
        self.pending_reads[node_id][request_id] = r
        self._after_input(sn)
        return r

    def take_snapshot(self, node_id: str, crash_at_op: int | None = None, commit_now: bool = True) -> None:
        """As the runtime does: a forked child writes the state as it is now to a file (the node does not wait),
        and the node commits it later (`finish_snapshot`), after more Readies. `crash_at_op` below
        WRITE_SNAPSHOT_OPS crashes in the child's writing: the machine dies (a power failure or all processes
        killed) or, half the time, only the child does and the snapshot is dropped; above, in the commit."""
        sn = self.nodes[node_id]
        n = sn.node
        if not sn.alive or n.last_applied <= n.log.snapshot_index or sn.forked is not None:
            return
        with self.core_call(node_id, "taking a snapshot (snapshot_metadata)"):
            meta = n.snapshot_metadata(n.last_applied)
        snap = Snapshot(meta.last_included_index, meta.last_included_term, meta.membership, sn.kv.snapshot_bytes())
        in_child = crash_at_op is not None and crash_at_op < WRITE_SNAPSHOT_OPS
        tmp = sn.storage.write_snapshot(snap, crash_at_op=crash_at_op if in_child else None)
        if tmp is None:
            if self.rng.random() < 0.5:
                self.log_event(node_id, f"the snapshot child at {snap.last_included_index} died at file operation "
                                        f"{crash_at_op}: dropped")
                self.stats["snapshot child killed"] += 1
                sn.storage.fs.dead = False  # only the child died; its file is garbage (a *.tmp)
                sn.storage.fs.fail_at = {}
                sn.storage.storage.abort_snapshot(sn.storage.storage.snapshot_tmp_path(snap.last_included_index))
                return
            self.log_event(node_id, f"crash at file operation {crash_at_op} of a snapshot's file at "
                                    f"{snap.last_included_index}")
            self.stats["crash inside a snapshot"] += 1
            self.crash(node_id)
            return
        commit_crash = crash_at_op - WRITE_SNAPSHOT_OPS if crash_at_op is not None and not in_child else None
        sn.forked = (snap, tmp, commit_crash)
        self.log_event(node_id, f"snapshot child at {snap.last_included_index}")
        if commit_now:  # the child exited before anything else happened (a test that wants the snapshot taken)
            self.finish_snapshot(node_id)

    def finish_snapshot(self, node_id: str) -> None:
        """The child exited: commit its file (the runtime's `_finish_snapshot`), unless a leader's snapshot
        overtook it."""
        sn = self.nodes[node_id]
        n = sn.node
        snap, tmp, crash_at_op = sn.forked
        sn.forked = None
        index = snap.last_included_index
        with self.core_call(node_id, "at can_snapshot_at"):
            can = n.can_snapshot_at(index)
        if not can:
            sn.storage.storage.abort_snapshot(tmp)
            self.log_event(node_id, f"snapshot at {index} overtaken: dropped")
            self.stats["snapshot overtaken by a leader's"] += 1
            return
        ok, kept = sn.storage.commit_snapshot(snap, tmp, crash_at_op=crash_at_op)
        if not ok:
            self.log_event(node_id, f"crash at file operation {crash_at_op} of a snapshot's commit at {index}")
            self.stats["crash inside a snapshot"] += 1
            self.crash(node_id)
            return
        assert kept is not None
        with self.core_call(node_id, "committing a snapshot (create_snapshot)"):
            n.create_snapshot(index, kept.data)
        self.log_event(node_id, f"snapshot at {index}")

    def change_membership(self, kind: ConfChangeKind, node_id: str) -> bool:
        leader = self.leader()
        if leader is None:
            return False
        try:
            with self.core_call(leader, "at change_membership"):
                index = self.nodes[leader].node.change_membership(
                    ConfChange(kind, Member(node_id, f"raft-{node_id}", f"http-{node_id}"))
                )
        except (NotLeader, ProposalDropped, ValueError):
            return False
        self.log_event(leader, f"membership {kind.name} {node_id} at {index}")
        self.process(leader)
        return index is not None

    # ---- checks -----------------------------------------------------------------------------------

    def fail(self, why: str) -> None:
        trace = "\n".join(self.trace[-60:])
        raise SafetyViolation(
            f"{why}\nseed={self.seed} t={self.now}\n--- last events ---\n{trace}\n"
            f"replay: {self.replay_command}"
        )

    def core_call(self, node_id: str, doing: str) -> CoreCall:
        return CoreCall(self, node_id, doing)

    def core_assertion_failed(self, node_id: str, doing: str, e: AssertionError) -> None:
        """The core's own invariants (its asserts): a SafetyViolation with the trace and the replay command."""
        at = traceback.extract_tb(e.__traceback__)[-1]
        self.fail(f"{node_id}: the core's assertion failed {doing}: "
                  f"{os.path.basename(at.filename)}:{at.lineno} `{at.line}` {e}")

    def _check_entry(self, node_id: str, e: Entry, term_before: int | None) -> None:
        """Log matching (§5.3), whole logs, incrementally: an (index, term) names one entry everywhere, and one
        term of the entry before it, so by induction logs that agree at an index agree on all before it."""
        key = (e.index, e.term)
        seen = self.entries_seen.get(key)
        if seen is None:
            self.entries_seen[key] = (e, term_before)
        elif seen[0] != e:
            self.fail(f"log matching: {node_id} holds {e} at index {e.index} term {e.term}, another node {seen[0]}")
        elif term_before is not None and seen[1] is not None and seen[1] != term_before:
            self.fail(f"log matching: {node_id} holds entry {e.index} term {e.term} after an entry of term "
                      f"{term_before}, another node after one of term {seen[1]}")

    def _check_vote(self, m: RequestVoteReply) -> None:
        """§5.2: each server votes for at most one candidate in a term (on a first-come-first-served basis)."""
        other = self.votes.setdefault((m.src, m.term), m.dst)
        if other != m.dst:
            self.fail(f"one vote per term (§5.2): {m.src} voted for {other} and for {m.dst} in term {m.term}")

    def _check_node(self, node_id: str) -> None:
        """Figure 3, on the node that just moved."""
        sn = self.nodes[node_id]
        if not sn.alive:
            return
        n = sn.node
        if n.role is Role.LEADER:
            other = self.leaders_by_term.setdefault(n.current_term, node_id)
            if other != node_id:
                self.fail(f"election safety: {other} and {node_id} both leaders in term {n.current_term}")
            if (node_id, n.current_term) not in self._leaders_checked:
                self._leaders_checked.add((node_id, n.current_term))
                sn.leader_since = self.now
                self._check_leader_completeness(node_id)
                if sn.bootstrapped and sn.ticks_since_start <= 1:
                    self.stats["bootstrapped lone voter led at its first tick"] += 1
            before = self._leader_commit.get(node_id, 0)
            if n.commit_index > before:
                for index in range(max(before, n.log.snapshot_index) + 1, n.commit_index + 1):
                    self.commit_term.setdefault(index, n.current_term)
            self._leader_commit[node_id] = n.commit_index
            self._check_uncommitted_bytes(node_id)
            self._check_inflight_windows(node_id)
        if n.commit_index > n.log.last_index:
            self.fail(f"{node_id} commit {n.commit_index} beyond its log {n.log.last_index}")
        if n.commit_index < sn.max_commit_index:
            self.fail(f"{node_id} commit index went back from {sn.max_commit_index} to {n.commit_index}")
        sn.max_commit_index = n.commit_index

    def _check_inflight_windows(self, node_id: str) -> None:
        """The leader's window of appends in flight to each follower (Progress.inflight): only in REPLICATE, above
        the follower's match_index and below its next_index, in order, its bytes summed right, never more appends
        than Config.max_inflight_messages. A full one with entries waiting behind it (next_index <= last_index) is
        counted: the bound at work, holding appends back."""
        n = self.nodes[node_id].node
        for peer in n.peers:
            pr = n.progress(peer)
            assert pr is not None
            indices = [last for last, _ in pr.inflight]
            if pr.inflight and (
                pr.state is not ProgressState.REPLICATE or indices != sorted(set(indices))
                or indices[0] <= pr.match_index or indices[-1] >= pr.next_index
                or pr.inflight_bytes != sum(b for _, b in pr.inflight)
                or len(indices) > n.config.max_inflight_messages
            ):
                self.fail(f"{node_id}'s window to {peer} is wrong: {pr}")
            if pr.next_index <= n.log.last_index and pr.window_full(
                    n.config.max_inflight_messages, n.config.inflight_bytes_bound):
                self.stats["appends held back by a full in-flight window"] += 1

    def _check_uncommitted_bytes(self, node_id: str) -> None:
        """Config.max_uncommitted_bytes: a leader counts exactly the payload of its term's entries after its commit
        index, and holds no more than the bound, or one entry above it (proposed when nothing was uncommitted)."""
        n = self.nodes[node_id].node
        tail = [len(e.data) for e in n.log.slice(n.commit_index + 1, n.log.last_index + 1)
                if e.term == n.current_term]
        if sum(tail) != n.uncommitted_bytes:
            self.fail(f"{node_id} counts {n.uncommitted_bytes} bytes uncommitted, its log holds {sum(tail)}")
        if sum(tail) > max([n.config.max_uncommitted_bytes, *tail]):
            self.fail(f"{node_id} holds {sum(tail)} bytes uncommitted, beyond max_uncommitted_bytes "
                      f"({n.config.max_uncommitted_bytes})")

    def check_safety(self) -> None:
        for node_id in self.ids:
            self._check_node(node_id)

    def _check_leader_completeness(self, node_id: str) -> None:
        """§5.4: a leader's log holds every entry committed in an earlier term."""
        n = self.nodes[node_id].node
        for index, committed_in in self.commit_term.items():
            if committed_in >= n.current_term or index <= n.log.snapshot_index:
                continue
            if index > n.log.last_index or n.log.term(index) != self.applied.get(index, (n.log.term(index),))[0]:
                self.fail(f"leader completeness: {node_id} (term {n.current_term}) lacks committed entry {index}")

    def check_log_matching(self) -> None:
        """Log matching, part 2 (§5.3): logs that agree at an index agree on everything before it."""
        live = [self.nodes[i].node for i in self.ids if self.nodes[i].alive]
        for a in live:
            for b in live:
                if a is b:
                    continue
                low = max(a.log.first_index, b.log.first_index)
                high = min(a.log.last_index, b.log.last_index)
                agreed = False
                for index in range(high, low - 1, -1):
                    same = a.log.term(index) == b.log.term(index)
                    if agreed and not same:
                        self.fail(f"log matching: {a.node_id} and {b.node_id} differ at {index} below a match")
                    agreed = agreed or same

    def check_history(self) -> None:
        """The clients' reads and writes must be linearizable: acknowledged writes at their acknowledgement,
        writes never acknowledged (a crash, a lost leadership, the end of the run) with unknown outcome, writes
        whose entry was overwritten left out (they never took effect), answered reads as answered."""
        ops = [linearizability.Op(w.key, linearizability.WRITE, w.value, w.call, w.ret)
               for w in self.writes if not w.lost]
        result = linearizability.check(ops + self.read_ops)
        if not result.ok:
            self.fail(f"linearizability (history checker): {result.explanation}")

    def run(self, ticks: int, **kwargs) -> None:
        for _ in range(ticks):
            self.tick(**kwargs)

    def run_until(self, predicate, max_ticks: int) -> bool:
        for _ in range(max_ticks):
            if predicate():
                return True
            self.tick()
        return predicate()


class Client:
    """One client: one request at a time, as a real client waits for its answer (so the history stays as narrow
    as the checker needs), to the node it keeps talking to (a kept-alive connection: the clients of a stale
    leader keep asking it). It follows a redirect for writes, gives up on a request after `timeout_ticks` (a
    write's outcome is then unknown), and moves to another node when its node fails it."""

    def __init__(self, home: str, timeout_ticks: int) -> None:
        self.home = home
        self.timeout_ticks = timeout_ticks
        self.request: PendingWrite | PendingRead | None = None

    def _waiting(self, cluster: Cluster) -> bool:
        """Is the request still unanswered (True), or answered, failed or given up (False, and failed says how)?"""
        r = self.request
        if isinstance(r, PendingWrite):
            answered = r.ret != math.inf or r.lost or r not in cluster.pending_writes[r.node_id]
            self.failed = r.ret == math.inf
        else:
            answered = r.request_id not in cluster.pending_reads[r.node_id]
            self.failed = answered and not r.served
        return not answered and cluster.now - r.start < self.timeout_ticks

    def act(self, cluster: Cluster, alive: list[str]) -> None:
        r = cluster.rng
        if self.request is not None:
            if self._waiting(cluster):
                return
            self.request = None
            if self.failed and alive:
                self.home = r.choice(alive)
            return
        x = r.random()
        if x >= CLIENT_OP_CHANCE:
            return
        if self.home not in alive or cluster.nodes[self.home].paused:
            if alive:
                self.home = r.choice(alive)
            return
        if x < CLIENT_OP_CHANCE * 0.55:
            self.request = cluster.client_write(self.home)
        else:
            self.request = cluster.client_read(self.home)
        if alive and (self.request is None or r.random() < 0.02):
            self.home = r.choice(alive)


def _config_arg(overrides: dict) -> str:
    return " ".join(f"--config {k}={v!r}" for k, v in sorted(overrides.items()))


# Nemesis profiles: the chance of each action per round (one round per `scale` ticks), and the chances per Ready of
# a crash inside it. "mixed" is a bit of everything; "churn" takes leaders away often (isolation, crash, transfer),
# which is what makes logs diverge across terms (Figure 8); "crashy" crashes and restarts nodes all the time.
PROFILES: dict[str, dict] = {
    "mixed": {"crash": 0.01, "restart": 0.02, "isolate_leader": 0.01, "partition": 0.01, "cut": 0.005,
              "heal": 0.025, "snapshot": 0.005, "transfer": 0.005, "add_learner": 0.003, "remove": 0.002,
              "pause": 0.005, "crash_leader": 0.0, "ready_crash_rates": (0.0, 0.0005, 0.001, 0.003), "snapshot_crash": 0.1,
              "load_crash": 0.05},
    "churn": {"crash": 0.005, "restart": 0.03, "isolate_leader": 0.04, "partition": 0.02, "cut": 0.005,
              "heal": 0.04, "snapshot": 0.005, "transfer": 0.01, "add_learner": 0.0, "remove": 0.0,
              "pause": 0.005, "crash_leader": 0.01, "ready_crash_rates": (0.0, 0.002), "snapshot_crash": 0.1,
              "load_crash": 0.05},
    "isolation": {"crash": 0.002, "restart": 0.02, "isolate_leader": 0.03, "partition": 0.01, "cut": 0.0,
                  "heal": 0.01, "snapshot": 0.002, "transfer": 0.0, "add_learner": 0.0, "remove": 0.0,
                  "pause": 0.0, "crash_leader": 0.0, "ready_crash_rates": (0.0,), "snapshot_crash": 0.0,
                  "load_crash": 0.0},
    "crashy": {"crash": 0.03, "restart": 0.06, "isolate_leader": 0.005, "partition": 0.005, "cut": 0.0,
               "heal": 0.03, "snapshot": 0.01, "transfer": 0.005, "add_learner": 0.003, "remove": 0.002,
               "pause": 0.005, "crash_leader": 0.01, "ready_crash_rates": (0.003, 0.01), "snapshot_crash": 0.3,
               "load_crash": 0.2},
}
PROFILE_MIX = ("mixed", "mixed", "churn", "crashy")  # a schedule's profile, drawn from its seed


def random_schedule(
    seed: int, n: int, fault_ticks: int = 300, heal_ticks: int = 600, config_overrides: dict | None = None,
    lease_share: float = 0.5, mutation: str | None = None, profile: str | None = None, holds: bool | None = None,
) -> Cluster:
    """One seeded run: faults and clients for `fault_ticks` (times the time scale), then heal everything and check
    liveness and the clients' history. `mutation` names a deliberately broken core from MUTATIONS; `profile` a
    nemesis from PROFILES (default: drawn from the seed); `holds` whether links are held (Cluster.hold; default:
    drawn from the seed, in half the schedules)."""
    rng = random.Random(seed ^ 0x5EED)
    drawn = rng.choice(PROFILE_MIX)
    nemesis = PROFILES[profile or drawn]
    # A fifth of the clusters grow from one node, the others joining as learners (promoted once caught up), as a
    # cluster is built from `-join`: elections of a lone voter are won inside one Ready.
    grow = rng.random() < 0.2
    if grow:
        nemesis = dict(nemesis, add_learner=0.05)
    # A third of the schedules run on a finer clock (a tick a third as long, messages as fast as before): the races
    # between an election timeout and a lease, and clock drift, then show at a resolution the lease margin needs.
    scale = rng.choice([1, 1, 3])
    election_ticks = ELECTION_TICKS * scale
    # One entry per AppendEntries in some schedules: followers then hold parts of a new leader's log, as in Figure 8.
    # The others draw the default bound or the one before it (1 MiB; -max-batch-bytes' most).
    overrides = {"max_batch_bytes": rng.choice([1 << 20, Config.max_batch_bytes, 1])}
    # A share of the schedules bound a batch to about three writes by their bytes (an entry of a write is ~30 bytes
    # by Entry.size) instead: the byte bound then cuts batches of several entries, from the log and from behind a
    # snapshot's cut, where the others send one entry or every entry due. From an rng of its own, as below.
    if random.Random(seed ^ 0xBB17).random() < 0.25:
        overrides["max_batch_bytes"] = 100
    # The protocol's options are part of the contract too: a share of the schedules runs without each.
    overrides["check_quorum"] = rng.random() >= 0.2
    overrides["pre_vote"] = rng.random() >= 0.2
    # A third of the schedules bound a leader's uncommitted entries (Config.max_uncommitted_bytes) to one or two
    # writes (a write is `key=vN`, 4 to 8 bytes), a third to about four: proposals are then refused under load and
    # at a leader cut off. From an rng of its own, so that the rest of each schedule draws as it did before.
    bound = random.Random(seed ^ 0xB0D).choice([None, 8, 20])
    if bound is not None:
        overrides["max_uncommitted_bytes"] = bound
    # A third of the schedules apply a backlog of committed entries a few at a time (Config.max_committed_*):
    # one or three entries per Ready, or about two by their bytes (an entry of a write is ~30 bytes by Entry.size).
    # From an rng of its own, as above.
    apply_cap = random.Random(seed ^ 0xA991).choice([None, None, None, None, ("entries", 1), ("entries", 3),
                                                      ("bytes", 64)])
    if apply_cap is not None:
        overrides[f"max_committed_{apply_cap[0]}_per_ready"] = apply_cap[1]
    # A third of the schedules bound the appends in flight to a follower (Config.max_inflight_*) to one or two, or
    # to about two batches of a few writes by their bytes (an entry of a write is ~30 bytes by Entry.size): the
    # window then fills under load, at a follower paused or cut off, and behind lost and held appends, and must
    # never stall replication. From an rng of its own, as above.
    window = random.Random(seed ^ 0x1F11).choice([None, None, None, None, ("messages", 1), ("messages", 2),
                                                   ("bytes", 200)])
    if window is not None:
        overrides[f"max_inflight_{window[0]}"] = window[1]
    # A share of the schedules bound an AppendEntries by its entry count (Config.max_batch_entries, 2,048: never
    # reached here, where the byte bound or the log's end cut every batch) to two or three: the count's cut is then
    # the one that binds. From an rng of its own, as above.
    entries = random.Random(seed ^ 0xBA7C).choice([None, None, None, None, 2, 3])
    if entries is not None:
        overrides["max_batch_entries"] = entries
    # The entries kept behind a snapshot's cut (Config.snapshot_catch_up_*): the default 5,000 outlasts every
    # schedule's log, so that followers behind a snapshot would never be sent one; most schedules keep none or a few
    # (4 or 16 entries, or about three writes by their bytes), so that both a snapshot and appends from behind the
    # cut reach followers a little behind. From an rng of its own, as above.
    catch_up = random.Random(seed ^ 0xCA7C).choice([("entries", 0), ("entries", 0), ("entries", 4), ("entries", 16),
                                                     ("bytes", 100), None])
    if catch_up is not None:
        overrides[f"snapshot_catch_up_{catch_up[0]}"] = catch_up[1]
    storage_switches = {}
    for name, value in (MUTATIONS[mutation] if mutation else {}).items():
        if name.startswith("storage."):
            storage_switches[name[len("storage."):]] = value
        else:
            overrides[name] = value(election_ticks) if callable(value) else value
    overrides.update(config_overrides or {})
    with _storage_switches(storage_switches):
        cluster = Cluster(
            seed,
            n=1 if grow else n,
            config_overrides=overrides,
            lease_share=lease_share,
            spares=n if grow else 1,
            election_ticks=election_ticks,
            heartbeat_ticks=HEARTBEAT_TICKS if scale == 1 else 5,
            drop_rate=rng.choice([0.0, 0.02, 0.1]),
            dup_rate=rng.choice([0.0, 0.02]),
            max_delay=rng.choice([1, 2, 4]),
            long_delay_rate=rng.choice([0.0, 0.0, 0.003, 0.01]),
            # Within the lease margin (thesis §6.4.1): a lease is 4/5 of the election timeout, so rates may differ by
            # up to 5/4; 8% either way is 1.17 at most, with room for the ticks' granularity.
            clock_drift_percent=rng.choice([0, 4, 8]),
            restart_rate=rng.choice([0.0, 0.5, 1.0]),
        )
        cluster.replay_command = f"python tests/simulator.py --seed {seed} --size {n}"
        cluster.load_crash_rate = nemesis["load_crash"]
        cluster.snapshot_entries = rng.choice([None, 20, 60])
        cluster.batch_rate = rng.choice([0.0, 0.5, 1.0])
        cluster.snapshot_crash_rate = nemesis["snapshot_crash"]
        cluster.restore_drives_max = random.Random(seed ^ 0x7E57).choice([0, 3, 12])
        # Half the schedules hold links (from an rng of their own, as above): a hold begins in ~1 round of 65.
        drawn_holds = random.Random(seed ^ 0x401D).random() < 0.5
        cluster.hold_rate = HOLD_RATE if (drawn_holds if holds is None else holds) else 0.0
        crash_rate = rng.choice(nemesis["ready_crash_rates"])
        if mutation:
            cluster.replay_command += f" --mutation {mutation}"
        if profile and profile != drawn:
            cluster.replay_command += f" --profile {profile}"
        if lease_share != 0.5:
            cluster.replay_command += f" --lease-share {lease_share}"
        if holds is not None and holds != drawn_holds:
            cluster.replay_command += f" --holds {'on' if holds else 'off'}"
        if config_overrides:
            cluster.replay_command += " " + _config_arg(config_overrides)
        _drive(cluster, nemesis, n, scale, crash_rate, fault_ticks, heal_ticks)
    return cluster


@contextlib.contextmanager
def _storage_switches(switches: dict):
    """raftlib.storage's module switches set for the duration (a mutation of the storage), then restored."""
    saved = {name: getattr(storage_module, name) for name in switches}
    try:
        for name, value in switches.items():
            setattr(storage_module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(storage_module, name, value)


def _drive(cluster: Cluster, nemesis: dict, n: int, scale: int, crash_rate: float, fault_ticks: int,
           heal_ticks: int) -> None:
    r = cluster.rng
    removed: set[str] = set()
    clients = [Client(r.choice(cluster.ids), CLIENT_TIMEOUT_ELECTIONS * cluster.election_ticks) for _ in range(CLIENTS)]
    actions = [(name, nemesis[name]) for name in ("crash", "restart", "isolate_leader", "partition", "cut", "heal",
                                                  "snapshot", "transfer", "add_learner", "remove", "pause",
                                                  "crash_leader")]
    for _ in range(fault_ticks):
        if cluster.hold_rate and cluster.hold_rng.random() < cluster.hold_rate:
            _hold_links(cluster)
        x = r.random()
        action = None
        for name, chance in actions:
            if x < chance:
                action = name
                break
            x -= chance
        if action == "crash":
            victim = r.choice(cluster.ids)
            if cluster.nodes[victim].alive:
                cluster.crash(victim)
        elif action == "restart":
            down = [i for i in cluster.ids if not cluster.nodes[i].alive]
            if down:
                cluster.restart(r.choice(down))
        elif action == "isolate_leader":
            leader = cluster.leader()
            if leader:
                cluster.isolate(leader)
                cluster.log_event(leader, "isolated")
        elif action == "crash_leader":
            leader = cluster.leader()
            if leader:
                cluster.crash(leader)
        elif action == "partition":
            group = r.sample(cluster.ids, len(cluster.ids) // 2)
            cluster.partition(group)
        elif action == "cut":
            a, b = r.sample(cluster.ids, 2)
            cluster.cut.add((a, b))  # asymmetric
        elif action == "heal":
            cluster.heal()
        elif action == "snapshot":
            # The child's file operations (the first WRITE_SNAPSHOT_OPS) drawn twice as often as the install's:
            # a child that dies alone is ~1 in 9 snapshot crashes, else ~2.7 per chunk of schedules, and a chunk
            # without one (test_simulation's coverage check) came with any change to the number of messages.
            crash_at = r.randrange(INSTALL_OPS + WRITE_SNAPSHOT_OPS) if r.random() < nemesis["snapshot_crash"] else None
            if crash_at is not None and crash_at >= INSTALL_OPS:
                crash_at -= INSTALL_OPS
            cluster.take_snapshot(r.choice(cluster.ids), crash_at_op=crash_at, commit_now=False)
        elif action == "transfer":
            leader = cluster.leader()
            voters = cluster.nodes[leader].node.membership.voters if leader else ()
            if leader and len(voters) > 1:
                target = r.choice([v for v in voters if v != leader])
                # Of transfer_leadership's refusals only TargetRestoring can come: the node leads (no NotLeader)
                # and the target is one of its voters (no ValueError). Anything else raised is a bug, and fails
                # the schedule (review final24, Q1: every exception was swallowed).
                try:
                    with cluster.core_call(leader, "at transfer_leadership"):
                        cluster.nodes[leader].node.transfer_leadership(target)
                    cluster.log_event(leader, f"transfer to {target}")
                except TargetRestoring:
                    cluster.stats["transfers refused: the target restores"] += 1
        elif action == "add_learner":
            leader = cluster.leader()
            outside = [i for i in cluster.ids if leader and i not in cluster.nodes[leader].node.membership.node_ids]
            if outside:
                cluster.change_membership(ConfChangeKind.ADD_LEARNER, r.choice(outside))
        elif action == "remove":
            leader = cluster.leader()
            if leader:
                voters = cluster.nodes[leader].node.membership.voters
                if len(voters) > n:
                    victim = r.choice(voters)
                    if cluster.change_membership(ConfChangeKind.REMOVE, victim):
                        removed.add(victim)
                elif len(voters) == 2 and cluster.change_membership(ConfChangeKind.REMOVE, leader):
                    # A growing cluster's leader of two removes itself (review rv3, T1): the other, its lone voter
                    # from then on, may be one its lease counts on (self_removal_lease_scenario directs that).
                    removed.add(leader)
                    cluster.stats["a leader of two voters removed itself"] += 1
        elif action == "pause":
            victim = r.choice(cluster.ids)
            if cluster.nodes[victim].paused:
                cluster.resume(victim, backlog=r.random() < 0.5)
            else:
                cluster.pause(victim)
        def act() -> None:
            alive = [i for i in cluster.ids if cluster.nodes[i].alive and i not in removed]
            for client in clients:
                client.act(cluster, alive)

        for _ in range(scale):
            cluster.tick(crash_rate=crash_rate, clients=act)
    # Heal: every link back (a held one's burst delivered in the next tick), every node up, no more faults; a
    # leader must appear and everything converge.
    cluster.heal()
    cluster.release_holds(every=True)
    cluster.drop_rate = cluster.dup_rate = cluster.long_delay_rate = cluster.snapshot_crash_rate = 0.0
    cluster.hold_rate = 0.0
    for node_id in cluster.ids:
        sn = cluster.nodes[node_id]
        cluster.resume(node_id)
        if not sn.alive:
            cluster.restart(node_id)
        if sn.forked is not None:
            sn.forked = sn.forked[:2] + (None,)  # no more faults: its commit will not crash either
    check_liveness(cluster, heal_ticks * scale)
    cluster.check_history()
    return cluster


def _hold_links(cluster: Cluster) -> None:
    """A hold begins (Cluster.hold), for 1 to 10 election timeouts: on a link to or from the leader half the time,
    and on every link out of a node (its transport's queues, or a stopped process's socket buffers) a third of the
    time. The burst comes shuffled half the time, with some messages twice a third of the time."""
    h = cluster.hold_rng
    leader = cluster.leader()
    node = leader if leader is not None and h.random() < 0.5 else h.choice(cluster.ids)
    others = [i for i in cluster.ids if i != node]
    if h.random() < 1 / 3:
        links = [(node, other) for other in others]
    else:
        other = h.choice(others)
        links = [(node, other) if h.random() < 0.5 else (other, node)]
    ticks = h.randint(cluster.election_ticks, 10 * cluster.election_ticks)
    cluster.hold(links, ticks, shuffle=h.random() < 0.5, duplicate=h.random() < 1 / 3)


LEASE_SCENARIO_DRIFT_PERCENT = 10  # rates up to 1.1 / 0.9 = 1.22 apart: inside the lease margin's 5/4


def lease_scenario(seed: int, mutation: str | None = None) -> Cluster:
    """A directed schedule for leader leases (thesis §6.4.1) against clock drift: a 3-node cluster on the fine
    clock (30-tick election timeout) whose leader's clock runs 10% slow and the others' 10% fast, the most the
    lease margin allows (a lease is 4/5 of the election timeout). The leader is isolated at a random moment; a
    client writes through the new leader as soon as there is one, and another asks the old leader for a lease read
    every tick until it steps down. The reads must be linearizable."""
    overrides = {}
    if mutation:
        for name, value in MUTATIONS[mutation].items():
            overrides[name] = value(3 * ELECTION_TICKS) if callable(value) else value
    c = Cluster(seed, n=3, config_overrides=overrides, election_ticks=3 * ELECTION_TICKS, heartbeat_ticks=5,
                max_delay=1)
    c.replay_command = f"python tests/simulator.py --scenario lease --seed {seed}" + (
        f" --mutation {mutation}" if mutation else "")
    if not c.run_until(lambda: c.leader() is not None, 20 * c.election_ticks):
        c.fail("liveness: no leader")
    old = c.leader()
    for node_id, sn in c.nodes.items():
        sn.rate_percent = 100 + (-1 if node_id == old else 1) * LEASE_SCENARIO_DRIFT_PERCENT
    n = c.nodes[old].node
    c.run_until(lambda: n.log.term(n.commit_index) == n.current_term, 100)
    w = c.client_write(old, "k")
    c.run_until(lambda: w.ret != math.inf, 100)
    c.run(c.rng.randrange(2 * c.election_ticks))
    c.isolate(old)
    c.log_event(old, "isolated")
    for _ in range(4 * c.election_ticks):
        new = c.leader()
        if new not in (None, old):
            c.client_write(new, "k")
        c.client_read(old, "k", lease=True)
        c.tick()
        if n.role is not Role.LEADER:
            break
    c.check_history()
    return c


def new_leader_lease_scenario(seed: int, mutation: str | None = None) -> Cluster:
    """A directed schedule for thesis §6.4 step 1 with leases: a new leader does not know the commit index until
    an entry of its term commits, so until then it answers no read from its lease. A 3-node cluster's leader
    acknowledges a write and is cut off at once, before its followers learn that the write committed; one of
    them that holds the write is made leader (TimeoutNow: its lease is not skipped), and its entries of its own
    term are kept from the others (they acknowledge its heartbeats, so it holds a lease, but it commits nothing)
    while a client asks it for a lease read of the written key every tick. Then everything heals. The reads must
    be linearizable."""
    overrides = dict(MUTATIONS[mutation]) if mutation else {}
    c = Cluster(seed, n=3, config_overrides=overrides, max_delay=1)
    c.replay_command = f"python tests/simulator.py --scenario lease-new-leader --seed {seed}" + (
        f" --mutation {mutation}" if mutation else "")
    if not c.run_until(lambda: c.leader() is not None, 20 * c.election_ticks):
        c.fail("liveness: no leader")
    old = c.leader()
    n = c.nodes[old].node
    c.run_until(lambda: n.log.term(n.commit_index) == n.current_term, 100)
    c.run(c.rng.randrange(c.election_ticks))
    w = c.client_write(old, "k")
    if w is None or not c.run_until(lambda: w.ret != math.inf, 100):
        c.fail("the write was not acknowledged")
    c.isolate(old)
    c.log_event(old, "isolated")
    new = next((i for i in c.ids if i != old and c.nodes[i].node.log.term(w.index) == w.term), None)
    if new is None:
        c.fail("no follower holds the acknowledged write")
    term = c.nodes[new].node.current_term + 1

    def without_the_new_terms_entries(m):
        if isinstance(m, AppendEntries) and m.term >= term:
            return dataclasses.replace(m, entries=tuple(e for e in m.entries if e.term < term))
        return m

    c.deliver_filter = without_the_new_terms_entries
    c.nodes[new].node.step(TimeoutNow(old, new, term - 1))
    c.process(new)
    for _ in range(2 * c.election_ticks):
        c.client_read(new, "k", lease=True)
        c.tick()
    c.deliver_filter = None
    c.heal()
    c.run(4 * c.election_ticks)
    c.check_history()
    return c


def self_removal_lease_scenario(seed: int, mutation: str | None = None) -> Cluster:
    """A directed schedule for why only a new cluster's first start is `bootstrapped` (RaftNode: a lone voter
    campaigns at its first tick then; restarted, it waits one election timeout), in the one case where a leader's
    lease counts on a lone voter other than itself (review rv3, T1). Leader A of {A, B} removes itself: {B} is in
    force at both once appended. B saves it, but its answers no longer reach A, which never commits its removal and
    goes on leading on the lease (4/5 of an election timeout) that B's last answer to a heartbeat gave it. B crashes
    and restarts as the sole voter of {B}. A client writes the key through B as soon as B leads; another asks A for
    a lease read of it every tick while A leads. Restarted, B waits a whole election timeout and A's lease runs out
    first; started as if bootstrapped (`bootstrapped_on_restart`), B leads at its first tick, commits the write
    alone, and A answers a lease read that misses it. The reads must be linearizable.

    `stats` says what happened: "lease reads the removed leader answered" after B's restart (A's lease was in
    force) and "ticks from the restart to B's lead"."""
    overrides = {"check_quorum": True, "pre_vote": True, **(MUTATIONS[mutation] if mutation else {})}
    c = Cluster(seed, n=2, config_overrides=overrides, max_delay=0)
    c.replay_command = f"python tests/simulator.py --scenario self-removal-lease --seed {seed}" + (
        f" --mutation {mutation}" if mutation else "")
    if not c.run_until(lambda: c.leader() is not None, 20 * c.election_ticks):
        c.fail("self-removal lease: no leader")
    a = c.leader()
    assert a is not None
    b = next(i for i in c.ids if i != a)
    old = c.nodes[a].node
    if not c.run_until(lambda: old.log.term(old.commit_index) == old.current_term, 100):
        c.fail("self-removal lease: the leader committed nothing in its term")
    w = c.client_write(a, "k")
    if w is None or not c.run_until(lambda: w in c.acked_writes, 100):
        c.fail("self-removal lease: the first write was not acknowledged")
    # Two heartbeats answered (A's lease is then in force), and then anywhere up to the next one.
    c.run(2 * c.heartbeat_ticks + c.rng.randrange(c.heartbeat_ticks))
    if not c.change_membership(ConfChangeKind.REMOVE, a):
        c.fail("self-removal lease: the leader did not take its own removal")
    removal = old.log.last_index
    c.cut.add((b, a))  # before any answer of B's to the removal's append: A keeps its lease and never commits it
    if not c.run_until(lambda: c.nodes[b].node.log.last_index >= removal
                       and c.nodes[b].node.membership.voters == (b,), 20):
        c.fail("self-removal lease: B did not save the removal")
    c.cut.add((a, b))
    c.crash(b)
    c.restart(b)
    restarted, led = c.now, False
    for _ in range(3 * c.election_ticks):
        if not led and c.nodes[b].node.role is Role.LEADER:
            led = True
            c.stats["ticks from the restart to B's lead"] = c.now - restarted
            if c.client_write(b, "k") is None:
                c.fail("self-removal lease: B leads but took no write")
        answered = len(c.read_ops)  # every read of the schedule is asked of A, and only a lease answers it now
        if old.role is Role.LEADER:
            c.client_read(a, "k", lease=True)
        c.tick()
        c.stats["lease reads the removed leader answered"] += len(c.read_ops) - answered
    if not led:
        c.fail(f"self-removal lease: B did not lead within {3 * c.election_ticks} ticks of its restart")
    c.check_history()
    return c


def figure_8_scenario(mutation: str | None = None) -> Cluster:
    """§5.4.2, Figure 8, scripted: S1 (n1), leader of term 4, gets its term-2 entry at index 2 onto a majority; then
    it crashes and S5 (n5), whose index 2 holds term 3, is elected and overwrites it everywhere. Safe only while a
    leader does not commit an entry of an earlier term by counting replicas."""
    logs = {"n1": [1, 2], "n2": [1, 2], "n3": [1], "n4": [1], "n5": [1, 3]}
    c = Cluster(seed=12, n=5, config_overrides={"max_batch_bytes": 1, **(MUTATIONS[mutation] if mutation else {})})
    c.replay_command = "python tests/simulator.py --scenario figure8" + (f" --mutation {mutation}" if mutation else "")
    c.preload_logs(logs, current_term=3)

    def only_index_2(m):  # S1 wins term 4 without S5, and only index 2 (never its term-4 no-op) reaches the others
        if "n5" in (m.src, m.dst):
            return None
        if isinstance(m, AppendEntries):
            return dataclasses.replace(m, entries=tuple(e for e in m.entries if e.index <= 2))
        return m

    c.deliver_filter = only_index_2
    c.nodes["n1"].node.step(TimeoutNow("n2", "n1", 3))
    c.process("n1")
    if not c.run_until(lambda: all(c.nodes[i].node.log.term(2) == 2 for i in ("n1", "n2", "n3", "n4")), 100):
        c.fail("figure 8: index 2 of term 2 never reached a majority")
    c.run(10)
    c.crash("n1")
    c.deliver_filter = None
    c.isolate("n1")
    c.nodes["n5"].node.step(TimeoutNow("n4", "n5", 4))  # S5 times out first, as in the figure
    c.process("n5")
    if not c.run_until(lambda: c.leader() == "n5", 100):
        c.fail("figure 8: S5 was not elected")
    c.run(50)
    return c


def stale_catch_up_scenario(mutation: str | None = None) -> Cluster:
    """Entries kept behind a snapshot's cut (Config.snapshot_catch_up_entries), scripted, on 7 nodes: a follower A
    snapshots (keeping its entries 1-6), is stopped while the leader writes and snapshots past it, installs the
    leader's snapshot, snapshots again of its own a little past it, and is made leader while B, stopped a few
    entries before the leader's cut, and C, stopped after the election, are behind A's cut. Safe only while A keeps
    no entries from before the install (its log was replaced; review of cu, Q2): B and C are then sent the
    snapshot. Kept, A's old entries and its new ones make one list that is not contiguous: counted from the cut,
    B is sent wrong entries; by their indices, C is sent the old ones and the new ones in one append."""
    c = Cluster(seed=12, n=7, config_overrides={"snapshot_catch_up_entries": 8, "max_inflight_messages": 1,
                                                **(MUTATIONS[mutation] if mutation else {})})
    c.replay_command = "python tests/simulator.py --scenario stale-catch-up" + (
        f" --mutation {mutation}" if mutation else "")
    if not c.run_until(lambda: c.leader() is not None, 500):
        c.fail("stale catch-up: no leader elected")
    first = c.leader()
    assert first is not None
    a, b, far = [i for i in c.ids if i != first][:3]
    leader, new_leader, behind, far_behind = (c.nodes[i].node for i in (first, a, b, far))
    if not c.run_until(lambda: far_behind.log.last_index > 0, 200):
        c.fail("stale catch-up: C has no entry")
    c.pause(far)
    c.isolate(far)  # its backlog would bring it the leader's snapshot once resumed

    def write(count: int) -> None:
        for _ in range(count):
            w = c.client_write(first, "k")
            if w is None or not c.run_until(lambda: w in c.acked_writes, 300):
                c.fail("stale catch-up: a write was not acknowledged")

    write(4)
    if not c.run_until(lambda: new_leader.last_applied == leader.log.last_index, 200):
        c.fail("stale catch-up: A did not apply the first writes")
    c.take_snapshot(a)
    c.pause(a)
    write(16)
    c.pause(b)
    write(3)
    c.take_snapshot(first)  # A is further behind than the leader keeps: it is sent the snapshot
    c.resume(a)
    if not c.run_until(lambda: new_leader.log.snapshot_index == leader.log.snapshot_index
                       and new_leader.last_applied == leader.log.last_index, 500):
        c.fail("stale catch-up: A did not install the leader's snapshot")
    write(2)
    if not c.run_until(lambda: new_leader.last_applied == leader.log.last_index, 200):
        c.fail("stale catch-up: A did not apply the writes after the install")
    c.take_snapshot(a)
    if not c.run_until(lambda: new_leader.log.snapshot_index == leader.log.last_index, 200):
        c.fail("stale catch-up: A did not snapshot after the install")
    if max(behind.log.last_index, far_behind.log.last_index) >= leader.log.snapshot_index:
        c.fail("stale catch-up: B or C is not behind the cut")
    leader.transfer_leadership(a)
    c.process(first)
    if not c.run_until(lambda: c.leader() == a, 200):
        c.fail("stale catch-up: A was not made leader")
    c.resume(b)
    c.heal()
    c.resume(far)
    if not c.run_until(lambda: behind.commit_index == far_behind.commit_index == new_leader.commit_index, 300):
        c.fail("stale catch-up: B or C did not catch up")
    return c


def check_liveness(cluster: Cluster, heal_ticks: int) -> None:
    def members() -> list[str]:
        leader = cluster.leader()
        if leader is None:
            return []
        return list(cluster.nodes[leader].node.membership.node_ids)

    def converged() -> bool:
        leader = cluster.leader()
        if leader is None:
            return False
        ln = cluster.nodes[leader].node
        if ln.log.term(ln.commit_index) != ln.current_term:
            return False
        return all(cluster.nodes[i].node.last_applied == ln.commit_index for i in members())

    # One write after healing makes the leader commit everything before it.
    deadline = cluster.now + heal_ticks
    wrote = False
    while cluster.now < deadline:
        leader = cluster.leader()
        if leader and not wrote:
            wrote = cluster.client_write(leader) is not None
        if wrote and converged():
            break
        cluster.tick()
    else:
        cluster.fail(f"liveness: no converged leader {heal_ticks} ticks after healing (leader={cluster.leader()})")
    cluster.check_log_matching()
    # The core answers (with a read index) or fails every read in bounded time: read_timeout_ticks, 2 election
    # timeouts by default; a few more ticks here for drift and for the messages. (Waiting to apply up to the read
    # index is the runtime's, with its own bound: a removed node, say, never gets there.)
    bound = 3 * cluster.election_ticks + 4 * cluster.max_delay
    for node_id in cluster.ids:
        for r in cluster.pending_reads[node_id].values():
            if r.read_index is None and cluster.now - r.start > bound:
                cluster.fail(f"liveness: a read on {node_id} (request {r.request_id}, started t={r.start}) was "
                             f"neither answered nor failed in {cluster.now - r.start} ticks")
    for w in cluster.acked_writes:
        for node_id in members():
            sn = cluster.nodes[node_id]
            if w.index > sn.node.log.snapshot_index and sn.node.log.term(w.index) != w.term:
                cluster.fail(f"acknowledged write {w} missing on {node_id}")


def _parse_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = ast.literal_eval(value)
    return out


def main() -> None:
    import argparse
    import logging
    import time

    p = argparse.ArgumentParser(description="Replay one seeded schedule, or soak many.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="cluster size (default: 3, 5 and 7)")
    p.add_argument("--count", type=int, default=1, help="run seeds seed .. seed+count-1")
    p.add_argument("--trace", action="store_true", help="print the event trace of each run")
    p.add_argument("--mutation", choices=sorted(MUTATIONS), help="run a deliberately broken core")
    p.add_argument("--scenario", choices=("random", "lease", "lease-new-leader", "self-removal-lease", "figure8",
                                          "stale-catch-up"),
                   default="random", help="random schedules (default), the directed lease-against-drift one, the "
                   "directed lease of a new leader before it commits in its term, the directed lease of a leader "
                   "that removed itself while its lone successor restarts, Figure 8 scripted, or entries kept "
                   "behind a cut across a snapshot install, scripted")
    p.add_argument("--profile", choices=sorted(PROFILES), help="the nemesis (default: drawn from the seed)")
    p.add_argument("--lease-share", type=float, default=0.5, help="of the client reads, the share with a lease")
    p.add_argument("--holds", choices=("on", "off"), help="hold links, then release bursts (default: drawn)")
    p.add_argument("--config", action="append", default=[], metavar="NAME=VALUE", help="a Config override")
    args = p.parse_args()
    logging.getLogger("raftlib.storage").setLevel(logging.ERROR)  # torn tails cut after crashes: expected here
    started, runs, writes, reads = time.monotonic(), 0, 0, 0
    held: collections.Counter = collections.Counter()
    for seed in range(args.seed, args.seed + args.count):
        if args.scenario != "random":
            scenario = {"lease": lease_scenario, "lease-new-leader": new_leader_lease_scenario,
                        "self-removal-lease": self_removal_lease_scenario}.get(args.scenario)
            scripted = {"figure8": figure_8_scenario, "stale-catch-up": stale_catch_up_scenario}.get(args.scenario)
            c = scripted(args.mutation) if scripted is not None else scenario(seed, args.mutation)
            runs, writes, reads = runs + 1, writes + len(c.acked_writes), reads + c.reads_checked
            continue
        for n in (args.size,) if args.size else (3, 5, 7):
            c = random_schedule(seed, n, config_overrides=_parse_config(args.config), lease_share=args.lease_share,
                                mutation=args.mutation, profile=args.profile,
                                holds=None if args.holds is None else args.holds == "on")
            runs, writes, reads = runs + 1, writes + len(c.acked_writes), reads + c.reads_checked
            held.update({k: v for k, v in c.stats.items() if "held" in k})
            if args.trace:
                print("\n".join(c.trace))
    print(f"{runs} schedules ok in {time.monotonic() - started:.1f}s: {writes} acknowledged writes, "
          f"{reads} linearizable reads checked")
    if held:
        print("holds: " + ", ".join(f"{k} {v}" for k, v in sorted(held.items())))


if __name__ == "__main__":
    main()
