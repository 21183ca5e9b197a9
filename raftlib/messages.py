"""Raft messages and the small value types the protocol is made of.

Pure data: frozen dataclasses with slots, named after the Raft paper (Figure 2) and Ongaro's thesis. Every
message carries `src`, `dst` and `term`; only `raftlib.codec` knows how they look on the wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class EntryKind(enum.IntEnum):
    COMMAND = 0  # data is an opaque command for the state machine
    NOOP = 1  # appended by a new leader (§5.4.2, §8: commit an entry of its own term)
    MEMBERSHIP = 2  # data is unused; `membership` holds the new configuration (thesis §4.1)


@dataclass(frozen=True, slots=True)
class Member:
    """One server of the cluster. The core only uses `node_id`; the addresses, and with a cluster secret the node's
    CURVE public key (Z85 text, "" without a secret: raftlib.transport admits on the Raft port only the keys of the
    configuration's members), travel with the configuration."""

    node_id: str
    raft_address: str = ""
    http_address: str = ""
    public_key: str = ""


@dataclass(frozen=True, slots=True)
class Membership:
    """A cluster configuration: voters decide elections and commits, learners only receive the log."""

    voters: tuple[str, ...]
    learners: tuple[str, ...] = ()
    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        assert self.voters == tuple(sorted(self.voters)), "voters must be sorted"
        assert self.learners == tuple(sorted(self.learners)), "learners must be sorted"
        assert not set(self.voters) & set(self.learners), "a node is a voter or a learner, not both"

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.voters + self.learners))

    def member(self, node_id: str) -> Member | None:
        for m in self.members:
            if m.node_id == node_id:
                return m
        return None

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    kind: EntryKind = EntryKind.COMMAND
    data: bytes = b""
    membership: Membership | None = None

    def size(self) -> int:
        return len(self.data) + 24


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before a node speaks (§5.1, Figure 2 "persistent state"), plus the commit index."""

    current_term: int = 0
    voted_for: str | None = None
    commit_index: int = 0


class SnapshotSource(Protocol):
    """A snapshot's state-machine bytes, read a chunk at a time: the runtime's is a file held open (a leader streams
    InstallSnapshot from it, never holding the whole state in memory), a test's may be bytes. Its content never
    changes, so reading it is as deterministic as reading bytes: the core reads chunks from it as etcd-io/raft's
    core reads entries from its Storage, and the I/O is the source's, not the core's."""

    def __len__(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer only at the end). Raises SnapshotUnreadable, and nothing
        else, when its data can no longer be read (the runtime's file: an I/O error)."""
        ...


class SnapshotUnreadable(Exception):
    """A SnapshotSource's data can no longer be read. The core abandons a transfer that meets it, and starts it
    again from its newest snapshot (a node must never stop because one transfer's source went away)."""


SnapshotData = bytes | SnapshotSource  # plain bytes are a source too (`snapshot_chunk`, `snapshot_bytes`)


def snapshot_chunk(data: SnapshotData, offset: int, length: int) -> bytes:
    """`length` bytes of a snapshot's data from `offset` (fewer at its end), whatever holds them."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data[offset : offset + length])
    return data.read(offset, length)


def snapshot_bytes(data: SnapshotData) -> bytes:
    """All of a snapshot's data in memory: for small states and tests; the runtime streams instead."""
    return snapshot_chunk(data, 0, len(data))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state machine at `last_included_index` (§7), with the configuration in force at that index. `data` is
    bytes or a SnapshotSource; two snapshots are equal when their data reads the same."""

    last_included_index: int
    last_included_term: int
    membership: Membership
    data: SnapshotData = field(default=b"", repr=False)


class SnapshotSink(Protocol):
    """Where a follower puts the InstallSnapshot chunks of a leader's snapshot as they come (§7), so that it never
    holds the whole state in memory: the runtime's appends them to a file through the storage, the default
    (`BytesSink`) to bytes. The core only appends in order and asks how much it holds; the I/O is the sink's.
    Nothing in it is durable until the install saves the finished snapshot: a node that restarts starts over."""

    def __len__(self) -> int:
        """How many bytes of the snapshot's data it holds: what the follower tells the leader to resume from."""
        ...

    def write(self, data: bytes) -> None:
        """Append `data`. When it cannot now (a full disk, no descriptor), it holds what it held: the leader
        sends the same chunk again."""
        ...

    def finish(self) -> SnapshotData | None:
        """All the data is in: the snapshot's data to install, or None when it could not be finished (the
        transfer starts over)."""
        ...

    def discard(self) -> None:
        """The transfer was given up (a newer snapshot, or the log caught up): drop what it holds."""
        ...


class BytesSink:
    """A SnapshotSink in memory (tests, and storages that have no sink of their own)."""

    def __init__(self, meta: Snapshot | None = None) -> None:
        self.buffer = bytearray()

    def __len__(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        self.buffer += data

    def finish(self) -> bytes:
        return bytes(self.buffer)

    def discard(self) -> None:
        self.buffer = bytearray()


class ConfChangeKind(enum.IntEnum):
    ADD_LEARNER = 0
    PROMOTE = 1
    REMOVE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    kind: ConfChangeKind
    member: Member


# ---- messages between nodes -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestVote:
    src: str
    dst: str
    term: int
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False  # thesis §9.6: ask "would you vote for me?" without disrupting anyone
    leadership_transfer: bool = False  # thesis §3.10: voters must not ignore it under their leader lease
    pre_vote_round: int = 0  # which pre-vote round of the candidate this is (0 for a real vote); echoed back


@dataclass(frozen=True, slots=True)
class RequestVoteReply:
    src: str
    dst: str
    term: int
    vote_granted: bool
    pre_vote: bool = False
    pre_vote_round: int = 0  # the pre_vote_round of the request this answers: only the current round counts


@dataclass(frozen=True, slots=True)
class AppendEntries:
    src: str
    dst: str
    term: int
    prev_log_index: int
    prev_log_term: int
    entries: tuple[Entry, ...]
    leader_commit: int
    read_round: int = 0  # thesis §6.4: a heartbeat that confirms leadership for read rounds <= this one


@dataclass(frozen=True, slots=True)
class AppendEntriesReply:
    src: str
    dst: str
    term: int
    success: bool
    match_index: int  # on success: the last index known to match the leader's log
    reject_index: int = 0  # on failure: the prev_log_index that did not match
    conflict_index: int = 0  # on failure: where the leader should retry (fast backtracking)
    conflict_term: int = 0  # on failure: the follower's term at prev_log_index, 0 if it has no such entry
    read_round: int = 0
    # The follower's state machine lacks a snapshot it holds (it restores it by steps, and ignores TimeoutNow
    # meanwhile): a leader's hand-over passes it by. Added after version 1 (raftlib.codec); sent only where
    # Config.restoring_in_replies says every member reads it.
    restoring: bool = False


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    src: str
    dst: str
    term: int
    last_included_index: int
    last_included_term: int
    membership: Membership
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True)
class InstallSnapshotReply:
    src: str
    dst: str
    term: int
    last_included_index: int
    next_offset: int  # how many bytes of that snapshot the follower holds; resume from here
    done: bool


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Thesis §3.10: the leader tells its chosen successor to start an election at once."""

    src: str
    dst: str
    term: int


@dataclass(frozen=True, slots=True)
class ReadIndexRequest:
    """Thesis §6.4: a follower asks the leader for a read index on behalf of its clients."""

    src: str
    dst: str
    term: int
    request_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReadIndexReply:
    src: str
    dst: str
    term: int
    request_ids: tuple[int, ...]
    read_index: int


@dataclass(frozen=True, slots=True)
class Removed:
    """The sender's committed configuration, in force at `membership_index`, does not hold the receiver, which sent
    it a message. A node removed from the cluster learns it this way (the leader stops sending to a node once the
    configuration without it is appended, so that node never gets the entry itself; etcd likewise answers a
    removed member). The receiver was removed at or before `membership_index`: the index of the configuration's
    entry, or the sender's snapshot index once that entry is compacted. It only informs: the receiver keeps
    campaigning and serving as before, and forgets the notice when a leader sends it entries. It is taken whatever
    its term (a removed node's term may run ahead of the members'), unless the receiver holds a newer
    configuration with itself in it. `leader_id` is the leader the sender knows, "" for none."""

    src: str
    dst: str
    term: int
    membership_index: int
    leader_id: str


Message = (
    RequestVote
    | RequestVoteReply
    | AppendEntries
    | AppendEntriesReply
    | InstallSnapshot
    | InstallSnapshotReply
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexReply
    | Removed
)
