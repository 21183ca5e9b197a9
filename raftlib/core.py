"""RaftNode: the Raft protocol as a deterministic state machine.

Pure: no clock, no sockets, no files, no module-level random. Time comes in as `tick()`, messages as `step()`,
requests as `propose()`, `read_index()`, `change_membership()` and `transfer_leadership()`. What the node wants
done comes out of `ready()`: hard state and entries to persist, messages to send once they are persisted,
committed entries to apply, and reads that are now safe. The caller does all of that, then calls `advance()`.
Same state and same inputs give the same outputs, so a seeded simulator can replay any run.

Section numbers cite the Raft paper (§5-§8) and Ongaro's thesis ("thesis §x").
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from .log import RaftLog, membership_at, within_bytes
from .messages import (
    AppendEntries,
    AppendEntriesReply,
    ConfChange,
    ConfChangeKind,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    InstallSnapshotReply,
    Member,
    Membership,
    Message,
    ReadIndexReply,
    ReadIndexRequest,
    Removed,
    RequestVote,
    RequestVoteReply,
    Role,
    BytesSink,
    Snapshot,
    SnapshotData,
    SnapshotSink,
    TimeoutNow,
    SnapshotUnreadable,
    snapshot_chunk,
)
from .progress import Progress, ProgressState, ProgressStatus, ProgressTracker, best_successor
from .readonly import ReadAnswer, ReadOnly


# Election timeouts with no leader heard after which a node that never campaigns (a learner, a node whose removal it
# knows committed) drops a partial snapshot transfer (fire_timers). Long enough that a live leader on a lossy link is
# heard within it.
LEARNER_TRANSFER_SILENCE_TIMEOUTS = 10


class NotLeader(Exception):
    """Raised by a request only a leader can serve. `leader_id` is the leader this node knows, or None."""

    def __init__(self, leader_id: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader_id})")
        self.leader_id = leader_id


class ProposalDropped(Exception):
    """The leader cannot take this request now (a transfer or membership change is under way, or its log holds
    `Config.max_uncommitted_bytes` not yet committed); nothing was appended: retry later."""


class TargetRestoring(Exception):
    """Raised by transfer_leadership: the target's last append reply said it restores a snapshot, or it has just
    installed the leader's (Progress.restoring). It ignores TimeoutNow until its restore ends, so the transfer
    would only hold this leader's proposals until it is aborted after an election timeout. Nothing was started:
    retry once the restore ends (the HTTP API answers 409)."""

    def __init__(self, target: str) -> None:
        super().__init__(f"{target} is restoring a snapshot and would ignore the transfer; retry once its restore ends")
        self.target = target


def check_transfer_target(target: str, voters: Collection[str], target_restoring: bool) -> None:
    """Why a leader refuses a transfer to `target` (another node than itself), in this order: ValueError when it is
    not a voter (a learner that restores is told that first: restoring ends, not being a voter does not), then
    TargetRestoring when the leader takes it as restoring a snapshot (Progress.restoring). The core and the HTTP
    route (before it claims the request's signature) both ask it."""
    if target not in voters:
        raise ValueError(f"{target} is not a voter")
    if target_restoring:
        raise TargetRestoring(target)


class UncommittedBoundExceeded(ProposalDropped):
    """The ProposalDropped of `Config.max_uncommitted_bytes`: a distinct type, so that callers (the server's
    metrics, the simulator) tell it from the other refusals without working out why again."""


INFLIGHT_WINDOW_BATCHES = 8  # a window's full batches in flight to a follower by default (Config.max_inflight_bytes)


@dataclass(frozen=True)
class Config:
    node_id: str
    election_ticks: int = 10  # a follower waits election_ticks + rng.randrange(election_ticks) ticks
    heartbeat_ticks: int = 1
    # Bounds on the entries of one AppendEntries, by their bytes (Entry.size: data + 24) and their count, at least
    # one entry whatever the bounds. A follower catching up (a joiner after its snapshot, a restart) is sent full
    # batches, and decodes each frame and saves its entries in one turn of its loop: at 1 MiB (7,436 writes of 100
    # bytes) that was ~10 ms of cbor2 and ~6-13 ms of saving, heartbeats held 20-45 ms on a joiner (issue 13,
    # restore10); at 256 KiB (1,885 of them), ~2.5-4 and ~2-2.5 ms. The cost goes by the entry more than by the byte:
    # 256 KiB of the smallest writes (`put k=''`, 30 bytes by Entry.size) are 8,738 entries, 11 ms of cbor2 and
    # 6 ms of saving, so the count is bounded too, at about a batch of 100-byte writes. Normal replication is far
    # below both. The trade-off: the transport has one request in flight per peer, so a follower is sent at most
    # one batch a round trip (256 KiB: at most 12.5 MiB/s at 20 ms, 9 measured; 2.5 at 100 ms), which a long link
    # may need raised (raftdzmq's -max-batch-bytes). The transport's frames follow both bounds (FrameBudget).
    max_batch_bytes: int = 256 << 10
    max_batch_entries: int = 2048
    # Bounds on the appends with entries in flight to one follower in REPLICATE, not yet acknowledged (etcd-io/raft's
    # MaxInflightMsgs and MaxInflightBytes; Progress.window_full): while either is reached, no new entries go to it,
    # heartbeats still do. Without them a follower that stopped (SIGSTOP, a long pause) or is slow was sent every
    # new batch, and the transport queued them all for it: up to its 10,000 messages of max_batch_bytes each held in
    # the leader's memory. 256 is etcd's usual MaxInflightMsgs (raftexample). The bytes go by the batch bound unless
    # given (`inflight_bytes_bound`: INFLIGHT_WINDOW_BATCHES full batches, 2 MiB at the default max_batch_bytes, 8
    # MiB at -max-batch-bytes' most): the transport sends what is queued for a peer one frame, a full batch, a
    # round trip, and a heartbeat or read round waits behind every batch queued ahead of it. An 8 MiB window fixed while the
    # batches went from 1 MiB to 256 KiB was 32 of them ahead of a catching-up follower's heartbeats: their round
    # trip took ~1 s over a 20 ms link (review final28, L2); 8 batches hold it near 8 round trips. More batches
    # would not go faster (one frame a round trip bounds the rate: Little's law), and 8 keep one queued while the
    # acknowledgements come back. The trade-off: a smaller window fills sooner, so a follower is more often a window
    # behind (a GC or fsync stall, a loaded machine) when the leader snapshots, and the entries it needs are then
    # behind the cut, where without the window the appends already queued for it carried it past the cut: the
    # entries kept behind the cut (snapshot_catch_up_entries, below) are what it is sent instead of the snapshot.
    max_inflight_messages: int = 256
    max_inflight_bytes: int | None = None
    # Bound on the payload bytes (Entry.data) of the entries a leader appended in its term that are not committed
    # yet (etcd-io/raft's MaxUncommittedEntriesSize): a leader that cannot commit (its followers cut off while
    # check-quorum has not yet stepped it down, or too slow) refuses proposals beyond it with ProposalDropped,
    # instead of appending, saving and holding in memory every write that comes until they time out. Never
    # refused: a proposal while nothing is uncommitted (however big, else it could never be proposed), an entry
    # without payload (the no-op of a new term, a configuration change: one at a time, of a few members). The
    # default, 64 MiB, is 64 writes of the largest body (-max-body, 1 MiB) at once: a healthy leader holds only what
    # came since its last round, and three nodes commit 64 MiB in about 0.2 s (measured: 64 clients writing 1 MB
    # values, ~300 writes/s, none refused), far inside the 5 s write timeout.
    max_uncommitted_bytes: int = 64 << 20
    snapshot_chunk_bytes: int = 1 << 20
    # Bounds on the entries a node keeps in memory behind its own snapshot's cut (etcd's SnapshotCatchUpEntries, 5,000;
    # its server compacts at snapi - SnapshotCatchUpEntries), the newest ones, by count (that many and the one before
    # them, for its term) and by bytes (Entry.size): a follower whose next index is among them is sent ordinary appends
    # from them instead of the whole snapshot (§7; at 5,000,000 keys 615 MB, seconds of CPU on both ends, and its watch
    # history restarted). A follower a window behind (max_inflight_bytes) when the leader snapshots is such a follower.
    # The entries are committed and applied when they are cut (a snapshot holds only those), so they are the same in
    # every later term's log (Leader Completeness): valid to send whoever leads. Memory only: a restart, or a leader's
    # snapshot installed here (the log replaced), keeps none. 8 MiB holds four default windows (2 MiB each), and the
    # largest window (8 batches at -max-batch-bytes' most, 8 MiB) once: a follower a window or two behind, plus what
    # came during its stall, stays within it; bigger entries (up to -max-body, 1 MiB) are bounded by the bytes, not by
    # 5,000 of them (5 GB). 0 entries or bytes: none kept (every follower behind the cut gets the snapshot).
    snapshot_catch_up_entries: int = 5000
    snapshot_catch_up_bytes: int = 8 << 20
    # Bounds on the committed entries one Ready hands to the state machine (etcd-io/raft's
    # MaxCommittedSizePerReady), at least one entry whatever the bounds, so that applying always progresses: a
    # node that restored a snapshot, or fell behind (paused, partitioned), finds thousands of entries committed
    # at once, and applying them in one go holds the event loop (5,386 entries took 44-66 ms at 1M keys, issue
    # 13). The runtime lets other work run between pieces. Applying a 100-byte write costs 6-12 us here (the
    # store's apply, a watch event, the runtime's bookkeeping), so 256 entries (~40 KB) cost ~2-3 ms. The bytes
    # bound (Entry.size) caps entries that each carry many writes: a transaction of 100 puts is ~12 KB and ~100
    # writes' work, so 1 MiB of them (85 entries, 8,500 puts) held the loop 13 ms of CPU here, 100-300 ms on a
    # busy machine (bench/apply_backlog.py --ops 100; the loop stalls of a 1M-key load in 100-put transactions,
    # bench/scale.py --batch 100); 64 KiB (5 of them) costs about what 256 plain writes do. A bigger entry (up to
    # -max-body) is a piece of its own.
    max_committed_entries_per_ready: int = 256
    max_committed_bytes_per_ready: int = 64 << 10
    pre_vote: bool = True  # thesis §9.6
    check_quorum: bool = True  # thesis §6.2 / §9.6: leader steps down without a majority; voters keep a lease
    auto_promote: bool = True  # promote a learner to voter once it has caught up (thesis §4.2.1)
    # Leader leases (thesis §6.4.1): how long after sending a heartbeat that a majority acknowledged the leader may
    # answer lease reads without a round. Below election_ticks by a margin for clock drift; None: 4/5 of it.
    lease_ticks: int | None = None
    # A read not answered within this many ticks fails (`Ready.failed_reads`; the caller may retry): a forwarded
    # request or its answer can be lost, and a leader may not get a round confirmed or commit in its term. This
    # bounds every list a read waits in. None: two election timeouts. At least one election timeout: a read may
    # take two round trips (forwarded, then confirmed) and a new leader's first commit, and the protocol only
    # assumes that a round trip fits well inside an election timeout (§5.6); less would fail healthy reads.
    read_timeout_ticks: int | None = None
    # Whether every member reads AppendEntriesReply.restoring (a field added after version 1: a node that does not
    # know it drops the whole frame, raftlib.codec), asked before each reply while this node restores a snapshot.
    # With it a restoring follower says so, and a leader's hand-over passes it by: it ignores TimeoutNow
    # (review of fastrestore2, L1'). None: never said (a mixed cluster, or a caller that does not know).
    restoring_in_replies: Callable[[], bool] | None = None
    # Deliberate faults, only for showing that the simulator's checks can fire. Never set them otherwise.
    unsafe_commit_previous_term: bool = False
    unsafe_read_without_quorum: bool = False
    unsafe_vote_twice: bool = False
    unsafe_reply_before_fsync: bool = False  # a follower's new entries need no fsync before its reply
    unsafe_count_own_entries_before_fsync: bool = False  # nor a leader's before it counts itself
    unsafe_forget_vote_on_restart: bool = False
    unsafe_keep_conflicting_suffix: bool = False  # a follower keeps its entries that conflict with the leader's
    unsafe_lease_ticks: int | None = None  # a lease of this many ticks, past the check on lease_ticks
    unsafe_lease_before_commit_in_term: bool = False  # a lease read before an entry of the term is committed
    # The entries kept behind a cut outlive a leader's snapshot installed here, and are found by their distance from
    # the cut (as if they ended at it): after an install, an index is answered with another index's entry.
    unsafe_catch_up_counted_from_the_cut: bool = False

    def __post_init__(self) -> None:
        """Refuse a configuration the protocol cannot run on (a local error: ValueError, naming the field)."""

        def ticks(name: str, value, low: int) -> None:
            if type(value) is not int or value < low:
                raise ValueError(f"Config.{name} must be an integer of at least {low}, not {value!r}")

        ticks("election_ticks", self.election_ticks, 1)
        ticks("heartbeat_ticks", self.heartbeat_ticks, 1)
        ticks("max_batch_bytes", self.max_batch_bytes, 1)
        ticks("max_batch_entries", self.max_batch_entries, 1)
        ticks("max_inflight_messages", self.max_inflight_messages, 1)
        if self.max_inflight_bytes is not None:
            ticks("max_inflight_bytes", self.max_inflight_bytes, 1)
        ticks("max_uncommitted_bytes", self.max_uncommitted_bytes, 1)
        ticks("snapshot_chunk_bytes", self.snapshot_chunk_bytes, 1)
        ticks("snapshot_catch_up_entries", self.snapshot_catch_up_entries, 0)
        ticks("snapshot_catch_up_bytes", self.snapshot_catch_up_bytes, 0)
        ticks("max_committed_entries_per_ready", self.max_committed_entries_per_ready, 1)
        ticks("max_committed_bytes_per_ready", self.max_committed_bytes_per_ready, 1)
        if self.lease_ticks is not None:
            ticks("lease_ticks", self.lease_ticks, 1)
            if self.lease_ticks >= self.election_ticks:
                # thesis §6.4.1: a lease as long as the voters' election timeout leaves no margin for clock drift.
                raise ValueError(f"Config.lease_ticks ({self.lease_ticks}) must be below election_ticks "
                                 f"({self.election_ticks})")
        if self.read_timeout_ticks is not None:
            ticks("read_timeout_ticks", self.read_timeout_ticks, self.election_ticks)

    @property
    def inflight_bytes_bound(self) -> int:
        """The window's bound on the entry bytes in flight to one follower: max_inflight_bytes if given, else
        INFLIGHT_WINDOW_BATCHES full batches (max_batch_bytes each)."""
        if self.max_inflight_bytes is not None:
            return self.max_inflight_bytes
        return INFLIGHT_WINDOW_BATCHES * self.max_batch_bytes


@dataclass
class Ready:
    """What the node needs done. In this order: persist `snapshot`, then `entries` (replacing any entries at or
    after entries[0].index), then `hard_state`, durably; then send `messages`; then apply `snapshot` and
    `committed_entries` to the state machine; then serve `read_states` once applied up to their index; then call
    `advance(ready)`. The save must reach the disk (fsync) only when `must_sync`: new entries, a snapshot, or a
    new term or vote. A hard state whose only change is the commit index may be written lazily: a commit index
    lost in a crash is learnt again from the leader (etcd's MustSync).

    One exception saves a disk's worth of latency (thesis §10.2.1): a leader's early messages (`split_messages`) may go out
    before the save, so followers write while the leader writes. It is safe because the leader counts itself
    towards a majority only up to the entries `advance` told it are durable, and because a Ready that changes the
    term or the vote has no early messages: no message may carry a term (or rest on a vote) that could still be
    lost (§5.1: a lone voter wins its election inside one Ready)."""

    hard_state: HardState | None
    entries: list[Entry]
    snapshot: Snapshot | None
    messages: list[Message]
    committed_entries: list[Entry]
    read_states: list[tuple[int, int]]  # (request_id, read_index)
    # Request ids this node can no longer answer: it lost its leader or its leadership, or no answer came within
    # read_timeout_ticks. The caller may retry.
    failed_reads: list[int]
    role: Role
    term: int
    leader_id: str | None
    must_sync: bool = True
    new_term_or_vote: bool = False  # hard_state changes current_term or voted_for

    def split_messages(self) -> tuple[list[Message], list[Message]]:
        """(early, late): the messages that may be sent before this Ready is saved (a leader's AppendEntries in a
        Ready that keeps the saved term and vote), and those that must wait for the save."""
        if self.role is not Role.LEADER or self.new_term_or_vote:
            return [], self.messages
        early: list[Message] = []
        late: list[Message] = []
        for m in self.messages:
            (early if type(m) is AppendEntries else late).append(m)
        return early, late


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What a node is and knows at one moment (etcd-io/raft's Status): a frozen copy, so that status pages,
    metrics and the choice of a successor read this rather than the node's fields."""

    node_id: str
    role: Role
    term: int
    leader_id: str | None
    commit_index: int
    last_applied: int
    last_index: int
    snapshot_index: int
    membership: Membership
    # Each follower's replication progress while this node leads (empty otherwise), by node id.
    progress: Mapping[str, ProgressStatus]
    removed: tuple[str | None, int] | None  # see RaftNode.removed
    reads_pending: int
    # The newest commit index this node heard from its current leader in this term (AppendEntries' leader_commit,
    # an InstallSnapshot's last included index): what it has yet to apply, which its own commit_index (at most
    # its last new entry, §5.3) does not show while it catches up. A leader's own commit index; 0 when no
    # leader was heard in this term. GET /readyz compares last_applied with it.
    leader_commit: int = 0
    # A snapshot from the leader is being received, or one (the leader's, or this node's own at a restart) is not yet
    # restored: not ready.
    receiving_snapshot: bool = False
    # The part of `receiving_snapshot` past the transfer: a snapshot received whole and not yet saved (the leader's),
    # or saved and not yet held by the state machine (the leader's, or this node's own at a restart): restoring.
    restoring_snapshot: bool = False
    # A leader is known and was heard from within an election timeout (this node itself while it leads: check-quorum
    # steps a leader down when a majority was silent that long, thesis §6.2). What GET /readyz calls "a leader".
    leader_active: bool = False
    # The payload bytes this leader holds in entries of its term not yet committed (RaftNode.uncommitted_bytes,
    # bounded by Config.max_uncommitted_bytes); 0 unless it leads.
    uncommitted_bytes: int = 0
    # The index of the entry of `membership` (RaftNode.membership_index): the configuration is applied here once
    # last_applied reaches it (a node that applied one that leaves it out was removed: server.watchguard).
    membership_index: int = 0
    # The entries kept in memory behind the snapshot's cut (RaftNode.catch_up_entries, -snapshot-catch-up-entries):
    # how many, and their bytes by Entry.size. 0 until this node's first snapshot of its own since its start, and
    # after it installs a leader's.
    catch_up_entries: int = 0
    catch_up_bytes: int = 0


_NO_PROGRESS: Mapping[str, ProgressStatus] = types.MappingProxyType({})


class RaftNode:
    def __init__(
        self,
        config: Config,
        rng,
        hard_state: HardState = HardState(),
        log: RaftLog | None = None,
        snapshot: Snapshot | None = None,
        membership: Membership | None = None,
        bootstrapped: bool = False,
    ) -> None:
        """`rng` is any object with `randrange` (random.Random(seed) in tests). `log` holds the persisted entries
        after `snapshot`; `membership` is the configuration to start from when there is neither a snapshot nor
        a membership entry (an empty one for a node waiting to be added to a cluster). `bootstrapped`: the caller
        made this state just now as a new cluster's first node under a new node id (raftlib.server.nodestart's
        bootstrap, or a backup restored), so the node has never heard from another: as its configuration's only
        voter it campaigns at its first tick (`_reset_election_timer` says why that is safe only then); ignored
        unless it is the only voter."""
        self.config = config
        self.node_id = config.node_id
        self._rng = rng
        # The newest entries at or before the snapshot's index, contiguous up to it, within
        # Config.snapshot_catch_up_entries and _bytes (their Entry.size in _catch_up_bytes): kept by create_snapshot,
        # read only by _send_append (the log answers every other question as if they were gone), dropped with the
        # log when a leader's snapshot replaces it (_restore).
        self._catch_up: list[Entry] = []
        self._catch_up_bytes = 0
        self.catch_up_appends = 0  # appends with entries sent from _catch_up since start (instead of a snapshot)
        self._start_from(hard_state, log if log is not None else RaftLog(), snapshot, membership)
        # Set when a member told us that its committed configuration leaves us out: (the leader it knew, or None;
        # an index N). We were removed at or before N: N is the index of that configuration's entry while the
        # member has it in its log, and its snapshot's index once the entry is compacted (a snapshot does not
        # record its configuration's index; keeping it would change the snapshot and wire formats). It only
        # informs (/status, the HTTP answers): we campaign and serve as before, and forget it when a leader sends
        # us entries (it counts us as a member) or we win an election.
        self.removed: tuple[str | None, int] | None = None

        self.role = Role.FOLLOWER
        self.leader_id: str | None = None
        self._ticks = 0  # ticks since this node started: its clock
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_ticks = 0
        self._votes: dict[str, bool] = {}
        self._progress = ProgressTracker()  # as leader
        self._pending_membership_index = 0  # as leader: no new configuration until this one is committed
        # As leader: the payload bytes of the entries of our term after commit_index (Config.max_uncommitted_bytes).
        self._uncommitted_bytes = 0
        self._transferee: str | None = None
        self._transfer_elapsed = 0
        self._no_lease_term = 0  # a term in which this node sent TimeoutNow: votes in it may skip the leases
        self._messages: list[Message] = []
        self._append_dirty = False  # as leader: entries or next indices changed; followers may need appends
        self._pending_snapshot: Snapshot | None = None  # a leader's snapshot, to be saved and applied
        # The sink _pending_snapshot's data was received into (None: not received): discarded if a newer snapshot
        # supersedes it before a Ready hands it out, so that its file does not outlive the transfer (fifth review
        # of snapfork, finding 3).
        self._pending_sink: SnapshotSink | None = None
        # A leader's snapshot being received (§7): (index, term, the sink its chunks go to). The sink comes from
        # `open_snapshot_sink(meta)`: the runtime's writes to a file through the storage (never the whole state in
        # memory); by default, bytes.
        # A transfer resumes only from chunks of the same leader's file. One leader in one term sends one file per
        # index (a leader's next snapshot is at a higher index, and a restart is a new term), while two leaders'
        # files at one index may differ in their bytes (another format in a rolling upgrade). Nothing on the wire
        # names the file (old nodes read every chunk), so the rule is: a change of term or leader drops a partial
        # transfer (_reset, the one place), and within one leader's term it is keyed on (index, term). The
        # sender and its term are kept to assert that rule.
        self._incoming_snapshot: tuple[int, int, str, int, SnapshotSink] | None = None
        self.open_snapshot_sink: Callable[[Snapshot], SnapshotSink] = BytesSink
        # Transfers abandoned because their snapshot's source could not be read (SnapshotUnreadable), since
        # start, and the last one's (peer, snapshot index, reason); per peer, (how many since start, snapshot
        # index, reason) of its last: the pure core does not log, the runtime does, per peer.
        self.snapshot_reads_failed = 0
        self.last_snapshot_read_failure: tuple[str, int, str] | None = None
        self.snapshot_read_failures: dict[str, tuple[int, int, str]] = {}
        # A leader's snapshot saved, whose restore into the state machine the caller has not finished
        # (`advance(rd, snapshot_applied=False)`, then `snapshot_applied`): no committed entry is handed out
        # meanwhile, and last_applied stays below it. 0: none.
        self._snapshot_unapplied = 0
        self._leader_commit = 0  # see NodeStatus.leader_commit: heard from leader_id in current_term
        read_timeout_ticks = config.read_timeout_ticks
        if read_timeout_ticks is None:
            read_timeout_ticks = 2 * config.election_ticks
        self._reads = ReadOnly(self.node_id, read_timeout_ticks)  # linearizable reads and leases (thesis §6.4)
        self._ready_outstanding = False

        self._reset_election_timer()
        if bootstrapped and self._sole_voter():
            self._randomized_election_ticks = 1
        # Thesis §9.6: each pre-vote round has its own number, echoed in the replies, so that a grant from an
        # earlier round (delayed or duplicated) is not counted in a later one at the same term. Random to start
        # with, so that a restarted node does not number its rounds as it did before.
        self._pre_vote_round = self._rng.randrange(1 << 32)

    def _start_from(self, hard_state: HardState, log: RaftLog, snapshot: Snapshot | None,
                    membership: Membership | None) -> None:
        """Take the persisted state: the log and snapshot, the configuration they hold, and the hard state."""
        self.log = log
        self._snapshot = snapshot
        if snapshot is not None:
            assert log.snapshot_index == snapshot.last_included_index
            self._base_membership = snapshot.membership
        else:
            self._base_membership = membership if membership is not None else Membership(voters=())
        self._refresh_membership()
        self.current_term = hard_state.current_term
        self.voted_for = None if self.config.unsafe_forget_vote_on_restart else hard_state.voted_for
        assert hard_state.commit_index <= log.last_index, "commit index beyond the persisted log"
        self.commit_index = max(hard_state.commit_index, log.snapshot_index)
        self.last_applied = log.snapshot_index
        self._persisted_index = log.last_index
        self._unstable_from = log.last_index + 1
        self._saved_hard_state = hard_state

    # ---- read-only views -------------------------------------------------------------------------

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(n for n in self.membership.node_ids if n != self.node_id)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def progress(self, node_id: str) -> Progress | None:
        """The leader's live record of `node_id` (tests look inside; others read `status().progress`)."""
        return self._progress.get(node_id)

    @property
    def transferee(self) -> str | None:
        """As leader, the target of the leadership transfer under way (transfer_leadership), else None: None again
        once the transfer is aborted (an election timeout without the target taking over) or this node steps down."""
        return self._transferee

    @property
    def membership_index(self) -> int:
        """The index of the entry of the configuration in force (`membership`: the latest in the log, committed or
        not; the snapshot's index when the log holds none). In one term of one leader it changes with every new
        configuration, also one equal to an older (a member removed and added again)."""
        return self._membership_index

    @property
    def uncommitted_bytes(self) -> int:
        """The payload bytes of the entries of this leader's term past its commit index, which
        `Config.max_uncommitted_bytes` bounds. Kept only while it leads: counted from 0 when it becomes leader."""
        return self._uncommitted_bytes

    @property
    def reads_pending(self) -> int:
        """How many reads this node holds: its callers' (waiting for a round, a commit or the leader's answer)
        and, as leader, its followers'. Each is answered or failed within read_timeout_ticks."""
        return self._reads.pending

    def status(self) -> NodeStatus:
        """A frozen copy of what this node is and knows now. Costs a copy of the followers' progress: for status
        pages and metrics, not for every request."""
        leading = self.role is Role.LEADER
        return NodeStatus(
            node_id=self.node_id,
            role=self.role,
            term=self.current_term,
            leader_id=self.leader_id,
            commit_index=self.commit_index,
            last_applied=self.last_applied,
            last_index=self.log.last_index,
            snapshot_index=self.log.snapshot_index,
            membership=self.membership,
            membership_index=self._membership_index,
            progress=self._progress.status(self.node_id, self._ticks) if leading else _NO_PROGRESS,
            removed=self.removed,
            reads_pending=self._reads.pending,
            leader_commit=self.commit_index if leading else self._leader_commit,
            receiving_snapshot=self._incoming_snapshot is not None
            or self._pending_snapshot is not None
            or self._snapshot_unapplied != 0,
            restoring_snapshot=self._pending_snapshot is not None or self._snapshot_unapplied != 0,
            # A follower's election timer restarts whenever its leader speaks (_become_follower): while it knows a
            # leader, _election_elapsed counts the ticks since it last heard from it. A learner never campaigns, so
            # its leader_id alone would stay set for ever after the leader died.
            leader_active=self.leader_id is not None
            and (leading or self._election_elapsed < self.config.election_ticks),
            uncommitted_bytes=self._uncommitted_bytes if leading else 0,
            catch_up_entries=len(self._catch_up),
            catch_up_bytes=self._catch_up_bytes,
        )

    def _promotable(self) -> bool:
        """A voter of the configuration in force may campaign; so may a voter of the one before it while the one in
        force, which leaves it out, is not committed (its removal is pending, thesis §4.2.2). A leader of two voters
        that removed itself and went down before its removal reached the other kept the longer log: the other,
        still in the old configuration, needs its vote and cannot get it (a candidate's log must be as up to date),
        and it would never campaign, so neither could lead again (random schedule 478, size 3). Elected, it counts
        votes and acknowledgements in the configuration in force, without itself, commits its removal, and hands
        over as any leader that removed itself does. Not once a member told it that this configuration, or a later
        one, removed it (a notice of an older removal, delivered late, is stale: review rmv, L1)."""
        if self.node_id in self.membership.voters:
            return True
        if self._membership_index <= self.commit_index:
            return False
        if self.removed is not None and self.removed[1] >= self._membership_index:
            return False  # a member named this configuration, or a later one, as the one that removed it
        entries = self.log.membership_entries()
        previous = entries[-2].membership if len(entries) >= 2 else self._base_membership
        return previous is not None and self.node_id in previous.voters

    # ---- inputs ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """One unit of logical time has passed."""
        self.advance_clock(1)
        self.fire_timers()

    def advance_clock(self, ticks: int) -> None:
        """`ticks` units of logical time have passed, and no timer fires for them until `fire_timers`.

        The runtime catches its clock up this way after the process could not run (SIGSTOP, CPU starvation, a
        long GC or fork): the clock moves first, so a lease that ran out in real time has run out before any
        read is answered, and the reads that waited too long fail. The timers (election, check-quorum, heartbeat,
        transfer) fire after the messages that waited meanwhile were stepped, and each at most once: they judge on
        what the peers said until now, not on what was still in the socket. Otherwise a leader whose loop stalled
        longer than an election timeout stepped down although a majority had answered it (its replies not yet
        stepped, or a second check-quorum boundary crossed in the same catch-up found the activity reset by the
        first: issue 13), and a follower campaigned with its leader's heartbeat waiting in its inbox. etcd loses
        the missed ticks instead (Go's ticker drops them), leases included."""
        self._ticks += ticks
        self._reads.expire(self._ticks)
        self._election_elapsed += ticks
        if self.role is Role.LEADER:
            self._heartbeat_elapsed += ticks
            if self._transferee is not None:
                self._transfer_elapsed += ticks
            if self._election_elapsed >= 2 * self.config.election_ticks:
                # A whole check-quorum window passed while the node could not run: what it heard before is older
                # than an election timeout and counts no more. What waited for it, stepped before fire_timers,
                # does: with none, the leader steps down at once (thesis §6.2), as it would have in time.
                self._progress.reset_recent_active(self.node_id)

    def fire_timers(self) -> None:
        """Act on every timer that has run out (`advance_clock`), once."""
        if self.role is Role.LEADER:
            self._fire_leader_timers()
        # Not while the state machine lacks a snapshot this node holds (`advance`, `snapshot_not_applied_yet`):
        # elected, it could serve no read or write until the restore ends (30 s at 1M keys on a loaded 2-core
        # machine, bench/restart.py), while the others, whose state is whole, could lead. It still votes.
        elif self._promotable() and not self._snapshot_unapplied \
                and self._election_elapsed >= self._randomized_election_ticks:
            self._election_elapsed = 0
            self._campaign(pre_vote=self.config.pre_vote)
        elif not self._promotable() and self._incoming_snapshot is not None \
                and self._election_elapsed >= LEARNER_TRANSFER_SILENCE_TIMEOUTS * self.config.election_ticks:
            # A learner (or a node whose removal is committed) never campaigns, so no _reset lets go of a transfer
            # whose leader went silent (removed mid-transfer, or deposed): after LEARNER_TRANSFER_SILENCE_TIMEOUTS
            # election timeouts with no leader heard, it is dropped (its sink discarded). A later leader starts over
            # from offset 0 (review of health, Q6). Not after one timeout: on a lossy link a live leader's transfer would start
            # over again and again (review health2, L1: at 80% loss a learner never caught up).
            self._drop_incoming_snapshot()

    def _fire_leader_timers(self) -> None:
        if self._transferee is not None and self._transfer_elapsed >= self.config.election_ticks:
            self._transferee = None  # thesis §3.10: abort a transfer that does not finish in time
        if self._election_elapsed >= self.config.election_ticks:
            self._election_elapsed = 0
            if self.config.check_quorum and not self._progress.quorum_active(self.membership, self.node_id):
                # thesis §6.2: a leader that has not heard from a majority for an election timeout steps down.
                self._become_follower(self.current_term, None)
                return
            self._progress.reset_recent_active(self.node_id)
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()
            self._reads.forget_old_rounds(self._ticks - self.config.election_ticks)

    def propose(self, command: bytes) -> int:
        """Append a command to the log; returns its index. Raises NotLeader or ProposalDropped.
        The command is committed when an entry with this index *and the current term* is applied."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if self._transferee is not None:
            raise ProposalDropped("leadership transfer in progress")
        held, size = self._uncommitted_bytes, len(command)
        if held and size and held + size > self.config.max_uncommitted_bytes:
            # etcd-io/raft's increaseUncommittedSize: with nothing uncommitted any size goes (else an entry above
            # the bound could never be proposed); an entry without payload always goes.
            raise UncommittedBoundExceeded(f"the leader holds {held} bytes of entries not yet committed (at most "
                                           f"{self.config.max_uncommitted_bytes}): a majority is slow or unreachable")
        return self._append(EntryKind.COMMAND, command)

    def change_membership(self, change: ConfChange) -> int | None:
        """Propose a configuration with one server added (as a learner), promoted or removed (thesis §4.1).
        Returns the index of its entry, or None when the configuration already says so. Raises NotLeader,
        ProposalDropped (a change is still in progress, or this term has no committed entry yet: the fix
        from thesis §4.1 for single-server changes), or ValueError for a change that makes no sense."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if self._transferee is not None:
            raise ProposalDropped("leadership transfer in progress")
        if self._pending_membership_index > self.commit_index:
            raise ProposalDropped("a membership change is in progress")
        if self.log.term(self.commit_index) != self.current_term:
            raise ProposalDropped("the leader has not committed an entry in its term yet")
        new = self._changed_membership(self.membership, change)
        if new is None:
            return None
        return self._append(EntryKind.MEMBERSHIP, b"", new)

    @staticmethod
    def _changed_membership(old: Membership, change: ConfChange) -> Membership | None:
        node_id = change.member.node_id
        voters, learners = list(old.voters), list(old.learners)
        members = [m for m in old.members if m.node_id != node_id]
        if change.kind is ConfChangeKind.ADD_LEARNER:
            if node_id in voters or node_id in learners:
                if old.member(node_id) == change.member:
                    return None
                members.append(change.member)  # same node, new address
            else:
                learners.append(node_id)
                members.append(change.member)
        elif change.kind is ConfChangeKind.PROMOTE:
            if node_id in voters:
                return None
            if node_id not in learners:
                raise ValueError(f"{node_id} is not a learner")
            learners.remove(node_id)
            voters.append(node_id)
            members.append(old.member(node_id) or change.member)
        elif change.kind is ConfChangeKind.REMOVE:
            if node_id not in voters and node_id not in learners:
                return None
            if voters == [node_id]:
                raise ValueError("cannot remove the last voter")
            if node_id in voters:
                voters.remove(node_id)
            else:
                learners.remove(node_id)
        return Membership(
            voters=tuple(sorted(voters)),
            learners=tuple(sorted(learners)),
            members=tuple(sorted(members, key=lambda m: m.node_id)),
        )

    def transfer_leadership(self, target: str) -> None:
        """Thesis §3.10: bring `target` up to date, then tell it to start an election. Raises NotLeader, or
        (check_transfer_target) ValueError or TargetRestoring, with nothing started. Proposals are refused until
        the transfer ends or is aborted after an election timeout (`transferee` is then None again)."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if target == self.node_id:
            return
        target_progress = self._progress.get(target)
        check_transfer_target(target, self.membership.voters, target_progress is not None and target_progress.restoring)
        self._transferee = target
        self._transfer_elapsed = 0
        pr = self._progress[target]
        if pr.match_index == self.log.last_index:
            self._send(TimeoutNow(self.node_id, target, self.current_term))
        else:
            self._append_dirty = True

    def read_index(self, request_id: int, lease: bool = False) -> None:
        """Ask for a linearizable read (thesis §6.4). Later, `ready().read_states` holds (request_id, index):
        the read may be served once the state machine has applied `index`. Or `failed_reads` holds the id: this
        node lost its leader or leadership, or no answer came within `read_timeout_ticks`; the caller may retry.
        Raises NotLeader(None) when this node knows no leader to ask.

        With `lease`, a leader holding a lease answers at once, without a confirmation round (thesis §6.4.1). This
        assumes that clocks run at about the same rate (within the margin of `lease_ticks`) and that a paused
        process catches up on the ticks it missed before it steps anything else. Elsewhere it is a normal read."""
        if lease and self.role is Role.LEADER and self._lease_valid():
            self._reads.answer(request_id, self.commit_index)
        elif self.role is Role.LEADER:
            self._queue_leader_read(request_id, self.node_id)
        elif self.leader_id is not None:
            self._reads.forward(request_id)
        else:
            raise NotLeader(None)

    def snapshot_metadata(self, index: int) -> Snapshot:
        """What a snapshot at `index` (applied here, still in the log) records besides the state machine: its
        term and the configuration in force there (§7). Changes nothing: the caller may write the state machine
        elsewhere (a forked child) and only later call `create_snapshot`, if the log still holds `index`."""
        assert self.log.snapshot_index < index <= self.last_applied, (index, self.last_applied)
        term = self.log.term(index)
        assert term is not None
        return Snapshot(index, term, membership_at(self._base_membership, self.log.membership_entries(), index))

    def can_snapshot_at(self, index: int) -> bool:
        """Whether `create_snapshot(index, ...)` may be called: the log still holds `index` (no snapshot from a
        leader replaced it meanwhile) and it is applied."""
        return self.log.snapshot_index < index <= self.last_applied

    def create_snapshot(self, index: int, data: SnapshotData) -> Snapshot:
        """The state machine, serialized as `data` (bytes or a source to read them from), has applied exactly up
        to `index`. Drop the log up to there and keep the snapshot to send to followers that are too far behind
        (§7). The caller persists it (before or after: the log on disk holds everything until it has)."""
        meta = self.snapshot_metadata(index)
        snap = Snapshot(index, meta.last_included_term, meta.membership, data)
        self._snapshot = snap
        self._base_membership = meta.membership
        self._keep_behind_cut(index)
        self.log.compact(index, meta.last_included_term)
        return snap

    def _keep_behind_cut(self, index: int) -> None:
        """Before the log is compacted up to `index`: keep its newest entries up to there in _catch_up, within
        the bounds (Config.snapshot_catch_up_entries, _bytes), the oldest dropped first. Up to N + 1 of them for
        snapshot_catch_up_entries N: the oldest serves only as a batch's previous term, so that a follower whose next
        index is any of the N up to the cut is served, as etcd's Compact(snapi - SnapshotCatchUpEntries) serves
        (review of cu, Q4)."""
        positions, bytes_bound = self.config.snapshot_catch_up_entries, self.config.snapshot_catch_up_bytes
        if not positions or not bytes_bound:
            return
        limit = positions + 1
        low = max(self.log.first_index, index - limit + 1)
        fresh = self.log.slice(low, index + 1)
        if low == self.log.first_index and self._catch_up:
            assert self._catch_up[-1].index == self.log.snapshot_index \
                or self.config.unsafe_catch_up_counted_from_the_cut, (self._catch_up[-1].index, low)
            fresh = self._catch_up + fresh
        total, start = 0, len(fresh)
        while start > 0 and len(fresh) - start < limit:
            size = fresh[start - 1].size()
            if total + size > bytes_bound:
                break
            total += size
            start -= 1
        self._catch_up = fresh[start:]
        self._catch_up_bytes = total

    @property
    def catch_up_entries(self) -> tuple[int, int, int]:
        """The entries kept behind the snapshot's cut: (first index, how many, their bytes by Entry.size); (0, 0, 0)
        when none."""
        if not self._catch_up:
            return (0, 0, 0)
        return (self._catch_up[0].index, len(self._catch_up), self._catch_up_bytes)

    def _catch_up_term(self, index: int) -> int | None:
        """The term of the entry at `index` among those kept behind the cut, or None when it is not kept."""
        first = self._catch_up_first()
        if self._catch_up and first <= index < first + len(self._catch_up):
            return self._catch_up[index - first].term
        return None

    def _last_index_of_term(self, term: int) -> int:
        """The last index holding `term` in the log, else among the entries kept behind the cut, by the same rule
        (newest first, stopping at a lower term); 0 when neither holds it. Without the kept entries, a follower an
        earlier leader left with an uncommitted tail of a term our cut has passed was probed from the start of its
        run of that term, below the kept entries, and sent the whole snapshot (review cu2, L1)."""
        last = self.log.last_index_of_term(term)
        if last:
            return last
        for e in reversed(self._catch_up):
            if e.term == term:
                return e.index
            if e.term < term:
                break
        return 0

    def _catch_up_first(self) -> int:
        if self.config.unsafe_catch_up_counted_from_the_cut:
            return self.log.snapshot_index - len(self._catch_up) + 1
        return self._catch_up[0].index if self._catch_up else 0

    def step(self, m: Message) -> None:
        """Take one message from a peer."""
        assert not self._ready_outstanding, "advance() the last Ready before stepping"
        if m.dst != self.node_id or m.src == self.node_id:
            return
        if m.src not in self._member_ids and type(m) is not Removed:
            self._tell_removed(m.src)
        if m.term != self.current_term and not self._take_term(m):
            return
        match m:
            case RequestVote():
                self._handle_request_vote(m)
            case RequestVoteReply():
                self._handle_request_vote_reply(m)
            case AppendEntries():
                self._handle_append_entries(m)
            case AppendEntriesReply():
                self._handle_append_entries_reply(m)
            case InstallSnapshot():
                self._handle_install_snapshot(m)
            case InstallSnapshotReply():
                self._handle_install_snapshot_reply(m)
            case TimeoutNow():
                self._handle_timeout_now(m)
            case ReadIndexRequest():
                self._handle_read_index_request(m)
            case ReadIndexReply():
                self._handle_read_index_reply(m)
            case Removed():
                self._handle_removed(m)

    def _take_term(self, m: Message) -> bool:
        """§5.1: a message of a newer term makes this node a follower in it (but see the leases below); one of an
        older term is answered at our term where that helps its sender, and dropped. Returns whether `m` is to
        be handled."""
        if m.term > self.current_term:
            if isinstance(m, RequestVote):
                # Also in the first election timeout after a start: this node may have acknowledged a leader's
                # heartbeat just before it crashed, and the leader's lease counts on that.
                in_lease = (
                    self.config.check_quorum
                    and (self.leader_id is not None or self._ticks < self.config.election_ticks)
                    and self._election_elapsed < self.config.election_ticks
                )
                if in_lease and not m.leadership_transfer:
                    # thesis §4.2.3 / §9.6: a node that hears from a leader ignores disruptive candidates.
                    return False
                if not m.pre_vote:
                    self._become_follower(m.term, None)
            elif isinstance(m, RequestVoteReply) and m.pre_vote and m.vote_granted:
                pass  # a granted pre-vote carries the term we would campaign in
            elif isinstance(m, (AppendEntries, InstallSnapshot, TimeoutNow)):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.current_term and type(m) is not Removed:
            # A Removed notice is let through: a removed node that campaigns without pre-vote runs its term ahead
            # of the members', who answer at their own term, so it would never learn why nobody follows it. Its
            # own check (`_handle_removed`: a configuration of ours that is newer, with us in it) tells a stale
            # notice, whatever its term.
            if isinstance(m, (AppendEntries, InstallSnapshot)):
                # Tell a stale leader about the new term, or it would never step down (thesis §9.6).
                self._send(AppendEntriesReply(self.node_id, m.src, self.current_term, False, 0))
            elif isinstance(m, RequestVote) and m.pre_vote:
                self._send(RequestVoteReply(self.node_id, m.src, self.current_term, False, pre_vote=True,
                                            pre_vote_round=m.pre_vote_round))
            return False
        return True

    # ---- outputs --------------------------------------------------------------------------------

    @property
    def apply_pending(self) -> bool:
        """Committed entries wait to be handed to the state machine, in the next ready(): a Ready carries at most
        Config.max_committed_entries_per_ready of them, so a backlog comes over several, and the runtime lets
        other work run between them. False while a snapshot is pending or not yet restored (§7: the entries after
        it are applied once the state machine holds it)."""
        return self.commit_index > self.last_applied and not self._snapshot_unapplied and self._pending_snapshot is None

    def has_ready(self) -> bool:
        reads = self._reads
        return bool(
            self._messages
            or (self.role is Role.LEADER and (
                self._append_dirty or any(self._commit_due(pr) for node_id, pr in self._progress.items()
                                          if node_id != self.node_id)))
            or reads.unstarted  # a round to start, at the next ready()
            or reads.to_forward
            or reads.read_states
            or reads.failed_reads
            or self._pending_snapshot is not None
            or self._unstable_from <= self.log.last_index
            or self.apply_pending
            or self._hard_state() != self._saved_hard_state
        )

    def ready(self) -> Ready | None:
        """Collect what is to be done, or None. Every Ready must be followed by `advance(ready)` before the
        next `step`, `tick` or `ready`."""
        assert not self._ready_outstanding, "advance() the last Ready first"
        if self.role is Role.LEADER:
            self._flush_appends()
            if self._reads.unstarted:
                self._start_read_round()
        elif self.leader_id is not None and self._reads.to_forward:
            ids = self._reads.take_to_forward(self._ticks)
            self._send(ReadIndexRequest(self.node_id, self.leader_id, self.current_term, ids))
        if not self.has_ready():
            return None
        hard_state = self._hard_state()
        entries = []
        if self._unstable_from <= self.log.last_index:
            entries = self.log.slice(self._unstable_from, self.log.last_index + 1)
        committed = []
        # §7: the entries after a leader's snapshot are applied once the state machine holds it: not in the Ready
        # that carries the snapshot (the caller may restore it over several steps, `advance(rd, False)`, and an
        # entry applied meanwhile would go to the old state, which the restore then replaces), but in the first
        # Ready after `advance` (restored at once) or `snapshot_applied` (restored piece by piece).
        if self.apply_pending:
            assert self.last_applied >= self.log.snapshot_index, (self.last_applied, self.log.snapshot_index)
            # At most max_committed_entries_per_ready and ..._bytes_... (at least one): the rest comes in the
            # next Readys, in order (has_ready stays true while anything committed is unapplied).
            high = min(self.commit_index, self.last_applied + self.config.max_committed_entries_per_ready) + 1
            committed = self.log.slice(self.last_applied + 1, high, self.config.max_committed_bytes_per_ready)
        saved = self._saved_hard_state
        unsafe_lazy_fsync = (self.config.unsafe_count_own_entries_before_fsync if self.role is Role.LEADER
                             else self.config.unsafe_reply_before_fsync)
        new_term_or_vote = self.current_term != saved.current_term or self.voted_for != saved.voted_for
        read_states: list[tuple[int, int]] = []
        failed_reads: list[int] = []
        if self._reads.read_states or self._reads.failed_reads:
            read_states, failed_reads = self._reads.take_results()
        rd = Ready(
            hard_state=hard_state if hard_state != saved else None,
            entries=entries,
            snapshot=self._pending_snapshot,
            messages=self._messages,
            committed_entries=committed,
            read_states=read_states,
            failed_reads=failed_reads,
            role=self.role,
            term=self.current_term,
            leader_id=self.leader_id,
            must_sync=bool(entries) and not unsafe_lazy_fsync
            or self._pending_snapshot is not None
            or new_term_or_vote,
            new_term_or_vote=new_term_or_vote,
        )
        self._messages = []
        self._ready_outstanding = True
        return rd

    def advance(self, rd: Ready, snapshot_applied: bool = True) -> None:
        """Everything in `rd` has been persisted, sent and applied. With `snapshot_applied` False, all but its
        snapshot, which the caller restores into the state machine over several steps (a big state decoded a
        piece at a time, the node stepped meanwhile): it calls `snapshot_applied` when the state machine holds it.
        Until then no committed entry is handed out and last_applied stays (§7: a read that waits for the
        snapshot's index must not be answered from the old state)."""
        assert self._ready_outstanding
        self._ready_outstanding = False
        if rd.snapshot is not None:
            self._pending_snapshot = self._pending_sink = None
            index = rd.snapshot.last_included_index
            self._persisted_index = max(self._persisted_index, index)
            if snapshot_applied:
                self._snapshot_unapplied = 0
                self.last_applied = max(self.last_applied, index)
            else:
                self._snapshot_unapplied = index
        if rd.entries:
            self._persisted_index = rd.entries[-1].index
            self._unstable_from = max(self._unstable_from, rd.entries[-1].index + 1)
        if rd.hard_state is not None:
            self._saved_hard_state = rd.hard_state
        if rd.committed_entries:
            self.last_applied = rd.committed_entries[-1].index
        if self.role is Role.LEADER and (rd.entries or rd.snapshot):
            self._maybe_commit()

    def _hard_state(self) -> HardState:
        return HardState(self.current_term, self.voted_for, self.commit_index)

    def _send(self, m: Message) -> None:
        if isinstance(m, TimeoutNow):
            self._no_lease_term = self.current_term  # the target's votes may ignore the voters' leases
        self._messages.append(m)

    # ---- roles ----------------------------------------------------------------------------------

    def _reset_election_timer(self) -> None:
        """An election timeout drawn from [election_ticks, 2 x election_ticks) (§5.2: split votes are rare), or
        exactly election_ticks for the configuration's only voter, whose vote alone elects it: there is no vote to
        split, so waiting longer only delays the cluster's one possible leader. Not less, even for it: a node that
        acknowledged a leader's heartbeat (before a restart, or a leader that removed itself and awaits its commit)
        promised not to vote, itself included, for an election timeout, and that leader's lease counts on it
        (thesis §6.4.1; `_take_term` refuses others' votes at a start for the same reason). A bootstrapped node
        (`__init__`) has heard from no one, so no lease counts on it: it campaigns at its first tick."""
        self._election_elapsed = 0
        if self._sole_voter():
            self._randomized_election_ticks = self.config.election_ticks
        else:
            self._randomized_election_ticks = (self.config.election_ticks
                                               + self._rng.randrange(self.config.election_ticks))

    def _sole_voter(self) -> bool:
        return self.membership.voters == (self.node_id,)

    def _reset(self, term: int) -> None:
        if term != self.current_term:
            self.current_term = term
            self.voted_for = None
        self.leader_id = None
        self._leader_commit = 0  # a new term or no leader: what an earlier leader said is no measure
        # §7: a new leader, or a new term, sends its own snapshot, if any (from offset 0): a partial transfer is
        # dropped here, its file and descriptor let go, and never spliced with another leader's chunks. The one
        # place of that rule (a candidate resets too).
        self._drop_incoming_snapshot()
        self._votes = {}
        self._heartbeat_elapsed = 0
        self._transferee = None
        self._append_dirty = False
        # §7: the snapshots a leader was sending are let go when it steps down (a later leader starts its own
        # transfers from offset 0): held on, a replaced snapshot's file (unlinked, in the runtime) kept its space
        # and a descriptor until this node led again and finished a transfer.
        for pr in self._progress.values():
            if pr.snapshot is not None:
                pr.snapshot, pr.snapshot_offset = None, 0
                pr.become_probe()
        self._reset_election_timer()
        self._reads.reset()

    def _become_follower(self, term: int, leader_id: str | None) -> None:
        if self.role is Role.FOLLOWER and term == self.current_term and leader_id == self.leader_id:
            self._election_elapsed = 0
            return
        if self.role is Role.FOLLOWER and term == self.current_term and self.leader_id is None:
            # Learning the leader of our own term does not cost our vote nor pending forwarded reads.
            self.leader_id = leader_id
            self._leader_commit = 0
            self._election_elapsed = 0
            return
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader_id = leader_id

    def _campaign(self, pre_vote: bool, leadership_transfer: bool = False) -> None:
        if pre_vote:
            # thesis §9.6: do not bump the term until a majority says it would vote for us.
            self._reset(self.current_term)
            self.role = Role.PRE_CANDIDATE
            term = self.current_term + 1
            self._pre_vote_round += 1
        else:
            self._reset(self.current_term + 1)
            self.role = Role.CANDIDATE
            self.voted_for = self.node_id
            term = self.current_term
        self._votes = {self.node_id: True}
        if self._won_votes():
            if pre_vote:
                self._campaign(pre_vote=False)
            else:
                self._become_leader()
            return
        for peer in self.membership.voters:
            if peer != self.node_id:
                self._send(
                    RequestVote(
                        self.node_id,
                        peer,
                        term,
                        self.log.last_index,
                        self.log.last_term,
                        pre_vote=pre_vote,
                        leadership_transfer=leadership_transfer,
                        pre_vote_round=self._pre_vote_round if pre_vote else 0,
                    )
                )

    def _won_votes(self) -> bool:
        granted = sum(1 for n in self.membership.voters if self._votes.get(n) is True)
        return granted >= self.membership.quorum()

    def _lost_votes(self) -> bool:
        rejected = sum(1 for n in self.membership.voters if self._votes.get(n) is False)
        return rejected >= self.membership.quorum()

    def _become_leader(self) -> None:
        assert self.role is Role.CANDIDATE
        self.role = Role.LEADER
        self.leader_id = self.node_id
        self.removed = None  # a majority of our configuration just voted for us
        self._heartbeat_elapsed = 0
        self._election_elapsed = 0
        self._progress = ProgressTracker.for_new_leader(self.membership.node_ids, self.log.last_index + 1)
        self._uncommitted_bytes = 0  # the entries of earlier terms in our log are not ours to count
        # The last membership entry in our log may not be committed yet: no new change until it is.
        entries = self.log.membership_entries()
        self._pending_membership_index = entries[-1].index if entries else 0
        # §8: a new leader commits a no-op of its own term, which also commits everything before it.
        self._append(EntryKind.NOOP, b"")

    # ---- elections ------------------------------------------------------------------------------

    def _handle_request_vote(self, m: RequestVote) -> None:
        if m.pre_vote:
            can_vote = m.term > self.current_term or self.voted_for in (None, m.src)
        else:
            can_vote = self.voted_for == m.src or (self.voted_for is None and self.leader_id is None)
            if self.config.unsafe_vote_twice:
                can_vote = True
        granted = can_vote and self.log.is_up_to_date(m.last_log_index, m.last_log_term)
        if granted and not m.pre_vote:
            self.voted_for = m.src  # §5.2; persisted (in the Ready's hard state) before the reply leaves
            self._reset_election_timer()
        term = m.term if (m.pre_vote and granted) else self.current_term
        self._send(RequestVoteReply(self.node_id, m.src, term, granted, pre_vote=m.pre_vote,
                                    pre_vote_round=m.pre_vote_round))

    def _handle_request_vote_reply(self, m: RequestVoteReply) -> None:
        expected = Role.PRE_CANDIDATE if m.pre_vote else Role.CANDIDATE
        if self.role is not expected:
            return
        if not m.pre_vote and m.term != self.current_term:
            return
        if m.pre_vote and m.pre_vote_round != self._pre_vote_round:
            return  # answers an earlier round: that majority is not one now (thesis §9.6)
        self._votes.setdefault(m.src, m.vote_granted)
        if self._won_votes():
            if m.pre_vote:
                self._campaign(pre_vote=False)
            else:
                self._become_leader()
        elif self._lost_votes():
            self._become_follower(self.current_term, None)

    def _handle_timeout_now(self, m: TimeoutNow) -> None:
        """A transfer's target, or the voter a removed leader hands over to, campaigns at once. Not while its state
        machine lacks a snapshot it holds (`tick`'s guard, review of fastrestore L1): its log is whole, so a
        hand-over picks it, and elected it could apply nothing until its restore ends. The transfer then times out
        and is aborted; a removed leader's hand-over falls back to an ordinary election."""
        if self._promotable() and self.role is not Role.LEADER and not self._snapshot_unapplied:
            self._campaign(pre_vote=False, leadership_transfer=True)

    # ---- replication: follower side ---------------------------------------------------------------

    def _handle_append_entries(self, m: AppendEntries) -> None:
        self._become_follower(m.term, m.src)
        if m.leader_commit > self._leader_commit:  # a reordered, older message must not move it back
            self._leader_commit = m.leader_commit
        self.removed = None  # a leader sends entries only to the members of its configuration
        reply = self._append_from_leader(m)
        # A snapshot received but not yet saved counts too: the leader's last chunk and a heartbeat's append
        # stepped in one drive answer before `advance` marks the snapshot unapplied, and this reply, following the
        # install's, would undo the leader's guess (Progress.snapshot_done) at once (review of snapdone, L1).
        if (self._snapshot_unapplied or self._pending_snapshot is not None) and self._members_read_restoring():
            reply = dataclasses.replace(reply, restoring=True)
        self._send(reply)

    def _append_from_leader(self, m: AppendEntries) -> AppendEntriesReply:
        me, term = self.node_id, self.current_term
        if m.prev_log_index < self.commit_index:
            # Everything up to our commit index matches the leader's log (§5.4 Log Matching).
            return AppendEntriesReply(me, m.src, term, True, self.commit_index, read_round=m.read_round)
        if not self.log.match_term(m.prev_log_index, m.prev_log_term):
            if m.prev_log_index > self.log.last_index:
                conflict_index, conflict_term = self.log.last_index + 1, 0
            else:
                conflict_term = self.log.term(m.prev_log_index) or 0
                conflict_index = self.log.first_index_of_term(m.prev_log_index)
            return AppendEntriesReply(
                me, m.src, term, False, 0, m.prev_log_index, conflict_index, conflict_term, m.read_round
            )
        new_entries: tuple[Entry, ...] = ()
        for n, e in enumerate(m.entries):
            if self.log.term(e.index) != e.term:
                assert e.index > self.commit_index, "a leader overwrote a committed entry"
                new_entries = m.entries[n:]
                break
        if self.config.unsafe_keep_conflicting_suffix:
            new_entries = tuple(e for e in new_entries if e.index > self.log.last_index)
        if new_entries:
            first = new_entries[0].index
            truncated = first <= self.log.last_index
            self.log.append(new_entries)
            self._unstable_from = min(self._unstable_from, first)
            self._persisted_index = min(self._persisted_index, first - 1)
            if truncated or any(e.membership is not None for e in new_entries):
                self._refresh_membership()
        last_new = m.prev_log_index + len(m.entries)
        self._commit_to(min(m.leader_commit, last_new))
        return AppendEntriesReply(me, m.src, term, True, last_new, read_round=m.read_round)

    def snapshot_not_applied_yet(self) -> None:
        """The state machine does not hold this node's own snapshot yet: a restart restores it over several steps
        with the node stepped meanwhile (answering heartbeats, appends and votes), as a leader's snapshot is (see
        `advance`). Until `snapshot_applied` of its index no committed entry is handed out, and last_applied stays
        at 0 (a read waits for the restore; no snapshot or backup is taken of a state that is not there yet).
        Called once, before the first step."""
        index = self.log.snapshot_index
        assert self.last_applied == index and not self._ready_outstanding and not self._snapshot_unapplied
        if index:
            self._snapshot_unapplied = index
            self.last_applied = 0

    def snapshot_applied(self, index: int) -> None:
        """The state machine now holds the leader's snapshot at `index` (see `advance`). A call for a snapshot that
        a newer one replaced meanwhile changes nothing."""
        if index == self._snapshot_unapplied:
            self._snapshot_unapplied = 0
            self.last_applied = max(self.last_applied, index)

    def _commit_to(self, index: int) -> None:
        if index > self.commit_index:
            assert index <= self.log.last_index
            self.commit_index = index
            held = self._incoming_snapshot
            if held is not None and held[0] <= index:
                # §7: the log caught up past the snapshot being received (a leader that still had the entries):
                # the transfer is abandoned, and its file and descriptors are let go now, not at the next
                # InstallSnapshot (which may never come) nor at a restart.
                self._drop_incoming_snapshot()

    def _handle_install_snapshot(self, m: InstallSnapshot) -> None:
        self._become_follower(m.term, m.src)
        # A leader snapshots only what it has applied, so committed (§7): its commit index is at least this.
        self._leader_commit = max(self._leader_commit, m.last_included_index)
        self.removed = None
        index, term = m.last_included_index, m.last_included_term

        def reply(next_offset: int, done: bool) -> None:
            self._send(InstallSnapshotReply(self.node_id, m.src, self.current_term, index, next_offset, done))

        if index <= self.commit_index:
            self._drop_incoming_snapshot()
            reply(0, True)
            return
        held = self._incoming_snapshot
        # Another leader's or another term's partial transfer was dropped when this node learned of them (_reset).
        assert held is None or held[2:4] == (m.src, m.term), "a partial snapshot outlived its leader's term"
        if held is None or held[:2] != (index, term):
            # Another snapshot: the transfer starts over from offset 0.
            if m.offset != 0:
                reply(0, False)
                return
            self._drop_incoming_snapshot()  # a transfer of another snapshot, given up for this one
            held = self._incoming_snapshot = (index, term, m.src, m.term, self.open_snapshot_sink(
                Snapshot(index, term, m.membership)))
        sink = held[4]
        if m.offset == len(sink):
            sink.write(m.data)  # a sink that could not take it holds what it held: the leader sends it again
        elif m.offset > len(sink):
            reply(len(sink), False)
            return
        held_bytes = len(sink)
        if not (m.done and m.offset + len(m.data) == held_bytes):
            reply(held_bytes, False)
            return
        self._incoming_snapshot = None
        if self.log.match_term(index, term):  # our log caught up meanwhile: nothing to install (_restore)
            sink.discard()
            self._commit_to(index)
            reply(held_bytes, True)
            return
        data = sink.finish()
        if data is None:  # could not be finished (a full disk): start over
            sink.discard()
            reply(0, False)
            return
        self._restore(Snapshot(index, term, m.membership, data), sink)
        reply(held_bytes, True)

    def _drop_incoming_snapshot(self) -> None:
        if self._incoming_snapshot is not None:
            self._incoming_snapshot[4].discard()
            self._incoming_snapshot = None

    def _restore(self, snap: Snapshot, sink: SnapshotSink | None = None) -> None:
        """§7: replace our state with a snapshot the leader sent, unless our log already has its last entry.
        `sink`: the one its data was received into, discarded when the snapshot is not (or no longer) to be
        saved."""
        index, term = snap.last_included_index, snap.last_included_term
        if self.log.match_term(index, term):
            if sink is not None:
                sink.discard()
            self._commit_to(index)
            return
        if self._pending_snapshot is not None and self._pending_sink is not None:
            # Superseded before any Ready handed it out (no step while one is outstanding): two leaders'
            # snapshots finished in one drive. Nothing will install the first: its received file goes now.
            self._pending_sink.discard()
        self.log = RaftLog(index, term)
        if not self.config.unsafe_catch_up_counted_from_the_cut:
            self._catch_up, self._catch_up_bytes = [], 0  # behind our old cut, not the new one's: contiguous no more
        self._snapshot = snap
        self._base_membership = snap.membership
        self._refresh_membership()
        self.commit_index = index
        # last_applied stays: the state machine holds the snapshot only once the caller has applied this Ready
        # (after the save, which may wait), and `advance` moves it then. Until then a read waiting for `index`
        # must not be answered from the old state.
        self._pending_snapshot = snap
        self._pending_sink = sink
        self._unstable_from = index + 1
        self._persisted_index = min(self._persisted_index, index)

    def _refresh_membership(self) -> None:
        entries = self.log.membership_entries()
        if entries:
            last = entries[-1]
            assert last.membership is not None
            self._set_membership(last.membership, last.index)
        else:
            # The snapshot's configuration: made at or before its index, which is all the snapshot tells.
            self._set_membership(self._base_membership, self.log.snapshot_index)

    def _set_membership(self, membership: Membership, index: int) -> None:
        """The configuration in force is the latest in the log, committed or not (thesis §4.1), from `index`."""
        self.membership = membership
        self._membership_index = index
        self._member_ids = frozenset(membership.voters + membership.learners)

    def _tell_removed(self, node_id: str) -> None:
        """`node_id` spoke to us and our configuration leaves it out. Say so if that configuration is committed
        (a removed node, not one that is being added and that our log has not caught up with) and we are in it.
        A message from a non-member is still handled as ever: thesis §4.2.3 has servers take votes and
        entries from servers outside their configuration."""
        if self._membership_index <= self.commit_index and self.node_id in self._member_ids:
            self._send(Removed(self.node_id, node_id, self.current_term, self._membership_index,
                               self.leader_id or ""))

    def _handle_removed(self, m: Removed) -> None:
        if self.node_id in self._member_ids and self._membership_index > m.membership_index:
            return  # our log holds a newer configuration, with us in it: the notice is stale
        leader_id = m.leader_id or None
        if leader_id is None and self.removed is not None and self.removed[1] == m.membership_index:
            leader_id = self.removed[0]  # keep the leader another member named for the same configuration
        self.removed = (leader_id, m.membership_index)

    # ---- replication: leader side -----------------------------------------------------------------

    def _append(self, kind: EntryKind, data: bytes, membership: Membership | None = None) -> int:
        index = self.log.last_index + 1
        self.log.append([Entry(self.current_term, index, kind, data, membership)])
        self._uncommitted_bytes += len(data)
        self._unstable_from = min(self._unstable_from, index)
        self._append_dirty = True
        if membership is not None:
            self._pending_membership_index = index
            self._apply_membership_to_progress(membership, index)
        return index

    def _apply_membership_to_progress(self, membership: Membership, index: int) -> None:
        self._set_membership(membership, index)
        self._progress.set_members(membership, self.log.last_index, self.node_id)

    def _flush_appends(self) -> None:
        # New entries go at once. A commit index that moved goes too, as an empty AppendEntries (etcd's
        # bcastAppend after maybeCommit), to each follower not sent it yet that holds everything it was sent
        # (`Progress.idle`: nothing in flight to it, so no answer will come to carry the news): else a follower
        # learned it at the next append or heartbeat, and a lone write reached its state machine, and its
        # watchers, up to -heartbeat-ms late. When writes come close together (the follower's last two batches
        # went within a tick of each other) the next batch is likely to carry it, and an empty append in flight
        # would hold that batch behind its round trip (one request in flight per peer: a client writing back to
        # back lost ~20% of its rate): then it waits until over a tick has passed since the last batch (ready()
        # after tick()) and goes only if no append carried the commit meanwhile. So a follower learns a commit
        # index at once when writes are sparse, within two ticks when they stop, and no empty append goes under a
        # steady load.
        dirty, self._append_dirty = self._append_dirty, False
        for peer in self.peers:
            if dirty:
                self._send_append(peer, allow_empty=False)
            pr = self._progress[peer]
            if self._commit_due(pr):
                self._send_append(peer, allow_empty=True)

    def _commit_due(self, pr: Progress) -> bool:
        """An empty append carrying the commit index is due to this follower (_flush_appends says when)."""
        return pr.commit_sent < self.commit_index and pr.idle and (
            pr.batch_tick - pr.previous_batch_tick > 1 or self._ticks > pr.batch_tick + 1)

    def _broadcast_heartbeat(self, read_round: int = 0) -> None:
        """Every heartbeat (the heartbeat timer's call, without read_round) is a read round (thesis §6.4, §6.4.1):
        its answers confirm the reads of every round up to it and renew the lease. A read round started for the
        reads queued (_start_read_round, with its read_round) goes the same way, except that it sends no snapshot
        chunk again: those go once a heartbeat, not once an answered read round (one per round trip under reads)."""
        from_heartbeat_timer = not read_round
        if not read_round:
            read_round = self._reads.new_round_id()
        self._reads.sent_round(read_round, self._ticks)
        for peer in self.peers:
            pr = self._progress[peer]
            if pr.state is ProgressState.PROBE:
                pr.probe_sent = False  # a probe lost on the way is sent again with each heartbeat
            self._send_append(peer, allow_empty=True, read_round=read_round, resend_chunk=from_heartbeat_timer)

    def _send_append(self, peer: str, allow_empty: bool, read_round: int = 0, resend_chunk: bool = False) -> None:
        """An append to `peer`: a batch of the entries it is due while its window has room, else an empty one if
        `allow_empty`; the snapshot instead once those entries are compacted. In SNAPSHOT only the current chunk
        again if `resend_chunk` (the heartbeat timer's), and the read round's empty append if `read_round`."""
        pr = self._progress[peer]
        if pr.state is ProgressState.SNAPSHOT:
            if resend_chunk and not pr.chunk_unanswered:
                # The current chunk goes again, in case it or its answer was lost, but only once the follower was
                # heard from since a chunk last went (Progress.chunk_unanswered): a stopped follower answers
                # nothing, and a chunk (snapshot_chunk_bytes) per heartbeat queued for it grew the leader by ~16
                # MiB/s for as long as it was stopped. Once it answers anything (the read round's append, below)
                # the chunk goes at the next heartbeat: never at a read round, or a follower answering reads
                # would be sent it once a round trip.
                self._send_snapshot(peer)
            if read_round:
                # A chunk's reply carries no read round. An empty append at the snapshot's last entry carries
                # it, so that this follower still confirms read rounds and renews the lease (thesis §6.4, §6.4.1)
                # for as long as the transfer takes: it may be needed for a majority. Whatever it answers
                # changes nothing else here: a success only tells how far its log matches ours (true), and a
                # rejection is ignored in this state (_handle_append_entries_reply).
                snap = pr.snapshot
                assert snap is not None
                self._send(
                    AppendEntries(
                        self.node_id, peer, self.current_term, snap.last_included_index, snap.last_included_term,
                        (), self.commit_index, read_round,
                    )
                )
            return
        paused = pr.paused
        if paused and not read_round:
            return
        prev_index = pr.next_index - 1
        prev_term = self.log.term(prev_index)
        behind_cut = prev_term is None
        if behind_cut:
            # The entries this follower needs are compacted: sent from those kept behind the cut when they reach
            # back to its prev_log_index (Config.snapshot_catch_up_entries), else (§7) the snapshot instead.
            prev_term = self._catch_up_term(prev_index)
            if prev_term is None:
                self._send_snapshot(peer)
                return
        assert prev_term is not None
        entries: list[Entry] = []
        if (pr.next_index <= self.log.last_index and not paused
                and not pr.window_full(self.config.max_inflight_messages, self.config.inflight_bytes_bound)):
            high = min(self.log.last_index, pr.next_index + self.config.max_batch_entries - 1) + 1
            if behind_cut:
                # A batch from behind the cut ends at it; the next one, from prev_log_index snapshot_index, comes
                # from the log.
                entries = self._catch_up_slice(pr.next_index, min(high, self.log.first_index))
                self.catch_up_appends += 1
            else:
                entries = self.log.slice(pr.next_index, high, self.config.max_batch_bytes)
        if not entries and not allow_empty:
            return
        pr.sent_entries(entries[-1].index if entries else prev_index, sum(e.size() for e in entries))
        pr.commit_sent = self.commit_index
        if entries:
            pr.previous_batch_tick, pr.batch_tick = pr.batch_tick, self._ticks
        self._send(
            AppendEntries(
                self.node_id, peer, self.current_term, prev_index, prev_term, tuple(entries),
                self.commit_index, read_round,
            )
        )

    def _catch_up_slice(self, low: int, high: int) -> list[Entry]:
        """The kept entries with low <= index < high (all kept, high at most the cut + 1), within max_batch_bytes
        as RaftLog.slice bounds a batch (within_bytes): at least one."""
        first = self._catch_up_first()
        return within_bytes(self._catch_up[low - first : high - first], self.config.max_batch_bytes)

    def _send_snapshot(self, peer: str) -> None:
        pr = self._progress[peer]
        if pr.state is not ProgressState.SNAPSHOT or pr.snapshot is None:
            assert self._snapshot is not None, "log compacted without a snapshot"
            pr.become_snapshot(self._snapshot)
        # §7: the transfer under way is finished even when a newer snapshot is taken meanwhile. Starting over
        # with each new one, a follower on a slow link would never get a whole snapshot while the leader
        # snapshots faster than one transfer takes; once this one is in, the next transfer brings it further.
        snap = pr.snapshot
        assert snap is not None
        # The chunk is read from the snapshot's source (a file the runtime holds open): the leader never needs
        # the whole state in memory to send it.
        try:
            chunk = snapshot_chunk(snap.data, pr.snapshot_offset, self.config.snapshot_chunk_bytes)
        except SnapshotUnreadable as e:
            self.snapshot_reads_failed += 1
            self.last_snapshot_read_failure = (peer, snap.last_included_index, str(e))
            failed_before = self.snapshot_read_failures.get(peer, (0, 0, ""))[0]
            self.snapshot_read_failures[peer] = (failed_before + 1, snap.last_included_index, str(e))
            # Its source is gone (an I/O error on the file): this transfer is abandoned, never the node, and
            # starts over from the newest snapshot (§7: the follower drops the chunks of a snapshot it no longer
            # receives). Nothing is sent now; the next heartbeat sends the newest one's first chunk, or finds it
            # unreadable too and tries again at the one after.
            if self._snapshot is not None and snap is not self._snapshot:
                pr.become_snapshot(self._snapshot)
            else:
                pr.snapshot_offset = 0
            return
        done = pr.snapshot_offset + len(chunk) >= len(snap.data)
        self._send(
            InstallSnapshot(
                self.node_id, peer, self.current_term, snap.last_included_index, snap.last_included_term,
                snap.membership, pr.snapshot_offset, chunk, done,
            )
        )
        pr.chunk_unanswered = True

    def _handle_install_snapshot_reply(self, m: InstallSnapshotReply) -> None:
        pr = self._progress.get(m.src)
        if self.role is not Role.LEADER or pr is None:
            return
        pr.heard(self._ticks)
        if pr.state is not ProgressState.SNAPSHOT or m.last_included_index != pr.snapshot_index:
            return
        if m.done:
            # The follower now restores the snapshot by steps (`advance`), ignoring TimeoutNow, before its next
            # append reply says so: taken as restoring at once, where append replies carry it, so that no transfer
            # or hand-over picks it in that window (review final24, L1). The next append reply corrects it (one
            # round trip: appends go at once) if it restored in one go, or had nothing to install.
            pr.snapshot_done(m.last_included_index, restoring=self._members_read_restoring())
            self._append_dirty = True
        elif m.next_offset != pr.snapshot_offset:
            # The follower moved on (or lost what it held, restarting): the next chunk. A reply that moves
            # nothing answers a chunk sent twice (each heartbeat sends the current chunk again, in case it was
            # lost): answered with another chunk, each such reply would start one more chain of chunks in flight,
            # one more per heartbeat while the follower takes its time to write them, until the leader spends
            # itself sending (bench/snapshot_stall.py: a leader change every few seconds at 1M keys).
            pr.snapshot_offset = m.next_offset
            self._send_snapshot(m.src)

    def _members_read_restoring(self) -> bool:
        """Whether Config.restoring_in_replies says every member reads AppendEntriesReply.restoring."""
        return self.config.restoring_in_replies is not None and self.config.restoring_in_replies()

    def _handle_append_entries_reply(self, m: AppendEntriesReply) -> None:
        pr = self._progress.get(m.src)
        if self.role is not Role.LEADER or pr is None:
            return
        pr.heard(self._ticks)
        pr.restoring = m.restoring
        if m.read_round:
            self._send_read_answers(self._reads.acknowledged(m.src, m.read_round, self.membership))
        if m.success:
            if pr.update_match(m.match_index):
                self._maybe_commit()
                if self.role is not Role.LEADER:
                    return  # committing our own removal made us step down
            pr.matched()
            self._append_dirty = True
            if m.src == self._transferee and pr.match_index == self.log.last_index:
                self._send(TimeoutNow(self.node_id, m.src, self.current_term))
            self._maybe_promote(m.src)
            return
        if m.reject_index == 0 and m.match_index == 0 and m.conflict_index == 0:
            return  # a stale-term answer; the term rule above already handled it
        if pr.is_stale_rejection(m.reject_index):
            return
        if m.conflict_term:
            last_of_term = self._last_index_of_term(m.conflict_term)
            hint = last_of_term + 1 if last_of_term else m.conflict_index
        else:
            hint = m.conflict_index
        pr.rejected(m.reject_index, hint)
        self._append_dirty = True

    def _maybe_promote(self, node_id: str) -> None:
        pr = self._progress[node_id]
        if (
            self.config.auto_promote
            and node_id in self.membership.learners
            and pr.match_index >= self.commit_index
            and self._pending_membership_index <= self.commit_index
            and self.log.term(self.commit_index) == self.current_term
            and self._transferee is None
        ):
            self.change_membership(ConfChange(ConfChangeKind.PROMOTE, Member(node_id)))

    def _maybe_commit(self) -> None:
        if not self.membership.voters:
            return
        index = self._progress.committed_index(self.membership, self.node_id, self._persisted_index)
        if index <= self.commit_index:
            return
        # §5.4.2 (Figure 8): only entries of the leader's own term commit by counting replicas.
        if self.log.term(index) != self.current_term and not self.config.unsafe_commit_previous_term:
            return
        # Exactly what _append counted: the entries of our term (all appended by us) that commit now.
        self._uncommitted_bytes -= sum(len(e.data) for e in self.log.slice(self.commit_index + 1, index + 1)
                                       if e.term == self.current_term)
        assert self._uncommitted_bytes >= 0, self._uncommitted_bytes
        self.commit_index = index
        if self._reads.before_commit and self.log.term(self.commit_index) == self.current_term:
            self._reads.committed_in_term()
        if self.commit_index >= self._pending_membership_index and self.node_id not in self.membership.node_ids:
            self._step_down_after_removal()

    def _step_down_after_removal(self) -> None:
        """Thesis §4.2.2: a leader removed from the configuration steps down once the removal is committed.
        It hands over to the most up-to-date voter first so the cluster need not wait for an election timeout; not
        to one that said it restores a snapshot (it would ignore the TimeoutNow); of those that tie, to one heard
        from within an election timeout (progress.best_successor)."""
        self._flush_appends()
        responsive = [n for n, pr in self._progress.items() if pr.heard_within(self.config.election_ticks, self._ticks)]
        best = best_successor(self._progress, self.membership.voters, responsive)
        if best is not None and self._progress[best].match_index == self.log.last_index:
            self._send(TimeoutNow(self.node_id, best, self.current_term))
        self._become_follower(self.current_term, None)
        self.removed = (self.node_id, self._membership_index)

    # ---- linearizable reads (thesis §6.4) ----------------------------------------------------------

    def _lease_valid(self) -> bool:
        if not self.config.check_quorum or self._no_lease_term == self.current_term:
            return False
        if self.log.term(self.commit_index) != self.current_term and not self.config.unsafe_lease_before_commit_in_term:
            return False  # §6.4 step 1 holds for leases too
        lease_ticks = self.config.unsafe_lease_ticks or self.config.lease_ticks
        if lease_ticks is None:
            lease_ticks = self.config.election_ticks * 4 // 5
        return self._reads.lease_holds(self._ticks, self.membership, lease_ticks)

    def _queue_leader_read(self, request_id: int, origin: str) -> None:
        # §6.4 step 1: until an entry of its term commits, a new leader does not know the commit index.
        committed_in_term = self.log.term(self.commit_index) == self.current_term
        self._reads.queue(request_id, origin, self._ticks, committed_in_term)

    def _start_read_round(self) -> None:
        """§6.4 step 2: one round of heartbeats confirms that we still lead, for every read queued since the last."""
        rnd = self._reads.start_round(self.commit_index, self._ticks)
        if rnd is None:
            return
        if self._reads.confirmed(rnd, self.membership) or self.config.unsafe_read_without_quorum:
            self._send_read_answers(self._reads.release(rnd.round_id))
        else:
            self._broadcast_heartbeat(read_round=rnd.round_id)

    def _send_read_answers(self, answers: list[ReadAnswer]) -> None:
        for origin, request_ids, read_index in answers:
            self._send(ReadIndexReply(self.node_id, origin, self.current_term, request_ids, read_index))

    def _handle_read_index_request(self, m: ReadIndexRequest) -> None:
        if self.role is not Role.LEADER:
            return  # the follower times its requests out, or fails them when it learns of a new leader
        if m.src not in self._member_ids:
            # A node our configuration leaves out gets no more entries from us (thesis §4.2.2), so it could never
            # apply the read index (at least the removal's index). Dropped: it times the reads out, and is told
            # it was removed (step) once that configuration is committed.
            return
        for request_id in m.request_ids:
            self._queue_leader_read(request_id, m.src)

    def _handle_read_index_reply(self, m: ReadIndexReply) -> None:
        self._reads.forwarded_answer(m.request_ids, m.read_index)
