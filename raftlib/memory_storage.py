"""MemoryStorage: the in-memory twin of `raftlib.storage.DiskStorage`, for tests.

Same contract: `save()` makes a Ready's snapshot, entries and hard state durable (here: keeps them), `load()`
returns exactly what was saved, nothing more. It has no crash model: the simulator drives the real DiskStorage on
a simulated disk (tests/crashfs.py), whose crashes lose what a real one can lose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .log import RaftLog
from .messages import Entry, HardState, Snapshot


@dataclass
class StoredState:
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
        """Entries replace whatever is at or after entries[0].index (the conflicting suffix)."""
        first = entries[0].index
        assert self.base_index < first <= self.last_index + 1, "entries must extend the log"
        del self.entries[first - self.base_index - 1 :]
        self.entries.extend(entries)

    def install_snapshot(self, snapshot: Snapshot) -> bool:
        """Drop the entries `snapshot` covers (all of them when the log disagrees with it at its last index).
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

    def put_record(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        """One log record: entries (replacing any conflicting suffix), then the hard state."""
        if entries:
            self.put_entries(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    def copy(self) -> StoredState:
        return StoredState(self.hard_state, self.snapshot, list(self.entries))


class MemoryStorage:
    def __init__(self) -> None:
        self.state = StoredState()
        self.log_bytes = 0  # the runtime snapshots by log size: never, here

    def load(self) -> StoredState:
        return self.state.copy()

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
        sync: bool = True,
    ) -> None:
        if snapshot is not None:
            self.state.install_snapshot(snapshot)
        self.state.put_record(hard_state, entries)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot the node took itself: drop the entries it covers."""
        self.state.install_snapshot(snapshot)
