"""MemoryStorage: the in-memory twin of `raftlib.storage.DiskStorage`, for tests and the simulator.

Same contract: `save()` makes a Ready's snapshot, entries and hard state durable (here: keeps them), `load()`
returns exactly what was saved, nothing more.
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


class MemoryStorage:
    def __init__(self) -> None:
        self.state = StoredState()

    def load(self) -> StoredState:
        s = self.state
        return StoredState(s.hard_state, s.snapshot, list(s.entries))

    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None = None) -> None:
        if snapshot is not None:
            self._install_snapshot(snapshot)
        if entries:
            first = entries[0].index
            base = self.state.snapshot.last_included_index if self.state.snapshot else 0
            assert base < first <= base + len(self.state.entries) + 1, "entries must extend the log"
            del self.state.entries[first - base - 1 :]
            self.state.entries.extend(entries)
        if hard_state is not None:
            self.state.hard_state = hard_state

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot the node took itself: drop the entries it covers."""
        self._install_snapshot(snapshot)

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        old = self.state.snapshot.last_included_index if self.state.snapshot else 0
        if snapshot.last_included_index <= old:
            return
        keep = [e for e in self.state.entries if e.index > snapshot.last_included_index]
        covered = [e for e in self.state.entries if e.index == snapshot.last_included_index]
        if not covered or covered[0].term != snapshot.last_included_term:
            keep = []
        self.state.snapshot = snapshot
        self.state.entries = keep
