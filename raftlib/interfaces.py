"""The seams between the protocol and the world: what the runtime needs of a storage, a transport and a state
machine, and `StoredState`, what a storage hands back at start-up.

Rules:
- Pure: no files, no sockets, no gevent or zmq. The protocols are `typing.Protocol`s: an implementation conforms
  by its type, not by inheriting from them (`DiskStorage` and `MemoryStorage` are two unrelated classes that
  both are a `Storage`). mypy checks that they conform (tests/typing_conformance.py, run by tests/test_typing.py).
- A storage's `save` makes a Ready durable in the order `Ready` states (snapshot, entries, hard state); `load`
  gives back exactly what was saved and nothing more. A transport may drop, delay or duplicate messages (Raft
  tolerates all three), never change them. A state machine is deterministic: the same commands in the same order
  give the same state on every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .log import RaftLog
from .messages import Entry, HardState, Message, Snapshot, SnapshotData


@dataclass
class StoredState:
    """A node's durable state: its hard state, its newest snapshot, and the log entries after that snapshot."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)  # after the snapshot, contiguous

    def raft_log(self) -> RaftLog:
        if self.snapshot is None:
            return RaftLog(0, 0, tuple(self.entries))
        s = self.snapshot
        return RaftLog(s.last_included_index, s.last_included_term, tuple(self.entries))

    @property
    def base_index(self) -> int:
        return self.snapshot.last_included_index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.base_index + len(self.entries)

    def put_entries(self, entries: list[Entry]) -> None:
        """Entries replace whatever is at or after entries[0].index (the conflicting suffix, §5.3)."""
        first = entries[0].index
        assert self.base_index < first <= self.last_index + 1, "entries must extend the log"
        del self.entries[first - self.base_index - 1 :]
        self.entries.extend(entries)

    def install_snapshot(self, snapshot: Snapshot) -> bool:
        """Drop the entries `snapshot` covers (all of them when the log disagrees with it at its last index, §7).
        Returns False, changing nothing, for a snapshot no newer than the one held."""
        if snapshot.last_included_index <= self.base_index:
            return False
        keep = [e for e in self.entries if e.index > snapshot.last_included_index]
        covered = [e for e in self.entries if e.index == snapshot.last_included_index]
        if not covered or covered[0].term != snapshot.last_included_term:
            keep = []
        self.snapshot = snapshot
        self.entries = keep
        return True


class Storage(Protocol):
    """A node's durable state (hashicorp's LogStore and StableStore in one; etcd's Storage plus its WAL)."""

    def load(self) -> StoredState:
        """What was saved, once, before the node starts."""
        ...

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
        sync: bool = True,
    ) -> None:
        """Make a Ready durable: `snapshot` (when newer than the one held), then `entries` (replacing any entries
        at or after entries[0].index), then `hard_state`. Durable means on the disk (fsynced) when `sync`; without
        it the write may be lost in a crash, which only the commit index may be (see `Ready.must_sync`). Raises
        `raftlib.storage_errors.DiskFull` when nothing was written for lack of room, `raftlib.storage_errors.OutOfDescriptors`
        when no file descriptor was free to create a file the save needed (either way the same save may be tried
        again), any other exception when the disk failed: the caller must then stop, not acknowledge."""
        ...

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot the node took of its own state machine: keep it and drop the log entries it covers."""
        ...

    def begin_snapshot(self, index: int) -> str:
        """A snapshot of the node's own in two parts (see DiskStorage): the name its file is written under."""
        ...

    def write_snapshot(self, snapshot: Snapshot, tmp: str) -> None:
        """The first part, which a forked child may run: the snapshot's file, nothing else."""
        ...

    def commit_snapshot(self, snapshot: Snapshot, tmp: str) -> Snapshot | None:
        """The second part: make it the snapshot and drop the log it covers; returns the snapshot kept (its data
        read from where it was written), or None when a newer snapshot is held already."""
        ...

    def abort_snapshot(self, tmp: str) -> None:
        """Drop what the first part wrote."""
        ...

    @property
    def log_bytes(self) -> int:
        """How much log there is since the last snapshot: the runtime takes a snapshot past a threshold."""
        ...


class Transport(Protocol):
    """Carries messages to the other nodes. Sends never block for long and may lose messages; what comes in is
    handed to the runtime (`Runtime.deliver`), however the implementation arranges that."""

    def set_peers(self, addresses: dict[str, str]) -> None:
        """The nodes that exist (other than this one) and where they listen. Called again on every change."""
        ...

    def send(self, messages: list[Message]) -> None:
        """Queue `messages` for their `dst`; a message for an unknown node is dropped."""
        ...


class StateMachine(Protocol):
    """What the runtime applies committed commands to."""

    def apply(self, index: int, command: bytes) -> object:
        """Apply the command committed at `index`; the result is handed to the proposer."""
        ...

    def snapshot(self) -> bytes:
        """The whole state, to be given to `restore` on this or another node."""
        ...

    def restore(self, data: SnapshotData) -> None:
        """Replace the whole state with one `snapshot` made: bytes, or a source to read them from in chunks.
        A state machine may also have `restoring(data)`, the same as a generator that does a bounded piece of
        the work per step and replaces the state at its end: the runtime then restores a leader's snapshot a
        piece per drive, serving meanwhile (raftlib.server.store.KeyValueStore has it)."""
        ...
