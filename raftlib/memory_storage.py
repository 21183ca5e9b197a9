"""MemoryStorage: the in-memory twin of `raftlib.storage.DiskStorage`, for tests and the simulator.

Same contract: `save()` makes a Ready's snapshot, entries and hard state durable (here: keeps them), `load()`
returns exactly what was saved, nothing more.

Rules of the crash model (`crash`), which mirror what DiskStorage leaves on a disk after a power cut: a `save` is
one record appended to the log; what a synced save wrote (and everything written before it) survives; of the
records written without a sync since, a prefix survives (the kernel may have written out some of them, and a torn
or missing record ends the replay, so no record after it counts). A snapshot install is synced as a whole (the
disk writes the snapshot and a new segment with everything held, and fsyncs both).
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
        self._durable = StoredState()  # what a crash cannot take away
        self._unsynced: list[tuple[HardState | None, list[Entry]]] = []  # records written since the last sync
        self.log_bytes = 0  # the runtime snapshots by log size: never, here

    @property
    def unsynced_records(self) -> int:
        return len(self._unsynced)

    def crash(self, rng=None) -> None:
        """A power cut: keep what was synced and, chosen with `rng` (none without it), a prefix of the records
        written since. The state then is what a restart would load."""
        kept = rng.randint(0, len(self._unsynced)) if rng is not None else 0
        for hard_state, entries in self._unsynced[:kept]:
            self._durable.put_record(hard_state, entries)
        self._unsynced = []
        self.state = self._durable.copy()

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
            self._install_snapshot(snapshot)
        if hard_state is None and not entries:
            return
        self.state.put_record(hard_state, entries)
        self._unsynced.append((hard_state, list(entries)))
        if sync:
            self._sync()

    def _sync(self) -> None:
        for hard_state, entries in self._unsynced:
            self._durable.put_record(hard_state, entries)
        self._unsynced = []

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot the node took itself: drop the entries it covers."""
        self._install_snapshot(snapshot)

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        if self.state.install_snapshot(snapshot):
            # DiskStorage starts a new segment holding everything kept, and fsyncs it: all of it is durable.
            self._unsynced = []
            self._durable = self.state.copy()
