"""MemoryStorage: the in-memory twin of `raftlib.storage.DiskStorage`, for tests and the simulator.

Same contract, `raftlib.interfaces.Storage`, which both conform to by type: `save()` makes a Ready's snapshot,
entries and hard state durable (here: keeps them), `load()` returns exactly what was saved, nothing more.
"""

from __future__ import annotations

from .interfaces import StoredState
from .messages import Entry, HardState, Snapshot


class MemoryStorage:
    def __init__(self) -> None:
        self.state = StoredState()
        self._synced_hard_state = HardState()  # what a crash cannot take away
        self.log_bytes = 0  # the runtime snapshots by log size: never, here

    def lose_unsynced(self) -> None:
        """A crash before the kernel wrote them out: hard states saved without `sync` are gone."""
        self.state.hard_state = self._synced_hard_state

    def load(self) -> StoredState:
        s = self.state
        return StoredState(s.hard_state, s.snapshot, list(s.entries))

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
        sync: bool = True,
    ) -> None:
        if snapshot is not None:
            self.state.install_snapshot(snapshot)
        if entries:
            self.state.put_entries(entries)
        if hard_state is not None:
            self.state.hard_state = hard_state
        if sync:
            self._synced_hard_state = self.state.hard_state

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot the node took itself: drop the entries it covers."""
        self.state.install_snapshot(snapshot)
