"""MemoryStorage: the in-memory twin of `raftlib.storage.DiskStorage`, for tests.

Same contract, `raftlib.interfaces.Storage`, which both conform to by type: `save()` makes a Ready's snapshot,
entries and hard state durable (here: keeps them), `load()` returns exactly what was saved, nothing more. It has no
crash model: the simulator drives the real DiskStorage on a simulated disk (tests/crashfs.py), whose crashes lose
what a real one can lose.
"""

from __future__ import annotations

from .interfaces import StoredState
from .messages import Entry, HardState, Snapshot


class MemoryStorage:
    def __init__(self) -> None:
        self.state = StoredState()
        self.log_bytes = 0  # the runtime snapshots by log size: never, here
        self._written: dict[str, Snapshot] = {}  # snapshots written and not yet committed, by name

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

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot the node took itself: drop the entries it covers."""
        self.state.install_snapshot(snapshot)

    # A snapshot in two parts, as DiskStorage's (in memory: the runtime never forks for it).
    def begin_snapshot(self, index: int) -> str:
        return str(index)

    def write_snapshot(self, snapshot: Snapshot, tmp: str) -> None:
        self._written[tmp] = snapshot

    def commit_snapshot(self, snapshot: Snapshot, tmp: str) -> Snapshot | None:
        written = self._written.pop(tmp, snapshot)
        return written if self.state.install_snapshot(written) else None

    def abort_snapshot(self, tmp: str) -> None:
        self._written.pop(tmp, None)
