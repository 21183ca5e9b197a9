"""The in-memory view of a node's Raft log.

Pure: no files. Indices are 1-based; everything at or before `snapshot_index` has been compacted into a
snapshot, whose last entry's term is `snapshot_term` (index 0, term 0 is the sentinel of an empty log).
"""

from __future__ import annotations

from .messages import Entry, Membership


class RaftLog:
    def __init__(self, snapshot_index: int = 0, snapshot_term: int = 0, entries: tuple[Entry, ...] = ()) -> None:
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self._entries: list[Entry] = list(entries)
        for offset, entry in enumerate(self._entries):
            assert entry.index == snapshot_index + 1 + offset, "log entries must be contiguous"

    # ---- reading ---------------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot_term

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`, or None when it is compacted or beyond the end."""
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index or index > self.last_index:
            return None
        return self._entries[index - self.snapshot_index - 1].term

    def entry(self, index: int) -> Entry:
        assert self.snapshot_index < index <= self.last_index, f"no entry {index} in memory"
        return self._entries[index - self.snapshot_index - 1]

    def slice(self, low: int, high: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries with low <= index < high; at least one when any, at most `max_bytes` more."""
        assert self.snapshot_index < low <= high <= self.last_index + 1, (low, high, self.snapshot_index)
        out = self._entries[low - self.snapshot_index - 1 : high - self.snapshot_index - 1]
        return out if max_bytes is None else within_bytes(out, max_bytes)

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_log_index: int, last_log_term: int) -> bool:
        """§5.4.1: the candidate's log is at least as up to date as ours."""
        return (last_log_term, last_log_index) >= (self.last_term, self.last_index)

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries that ends at `index` and shares its term (fast backtracking)."""
        term = self.term(index)
        while index - 1 > self.snapshot_index and self.term(index - 1) == term:
            index -= 1
        return index

    def last_index_of_term(self, term: int) -> int:
        """The last index holding `term`, or 0 when our log has no such entry."""
        for e in reversed(self._entries):
            if e.term == term:
                return e.index
            if e.term < term:
                break
        return 0

    def membership_entries(self) -> list[Entry]:
        return [e for e in self._entries if e.membership is not None]

    # ---- changing -------------------------------------------------------------------------------

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Put `entries` after entries[0].index - 1, dropping whatever was there (the conflicting suffix)."""
        if not entries:
            return
        first = entries[0].index
        assert self.snapshot_index < first <= self.last_index + 1, (first, self.snapshot_index, self.last_index)
        del self._entries[first - self.snapshot_index - 1 :]
        self._entries.extend(entries)

    def compact(self, index: int, term: int) -> None:
        """Drop entries up to `index` (now held by a snapshot)."""
        if index <= self.snapshot_index:
            return
        if index >= self.last_index or self.term(index) != term:
            self._entries = []
        else:
            del self._entries[: index - self.snapshot_index]
        self.snapshot_index = index
        self.snapshot_term = term


def within_bytes(entries: list[Entry], max_bytes: int) -> list[Entry]:
    """The longest prefix of `entries` whose sizes (Entry.size) sum to at most `max_bytes`, and at least the first
    entry (one bigger than the bound still goes alone, or nothing would progress). The one rule that bounds a batch
    (Config.max_batch_bytes): of the log's entries (RaftLog.slice) and of those kept behind a snapshot's cut alike,
    so that no append outgrows the codec's frame (raftlib.codec.MAX_FRAME_BYTES)."""
    total = 0
    for n, e in enumerate(entries):
        total += e.size()
        if total > max_bytes and n > 0:
            return entries[:n]
    return entries


def membership_at(base: Membership, entries: list[Entry], index: int) -> Membership:
    """The configuration in force at `index`: the last membership entry at or before it, or `base`."""
    result = base
    for e in entries:
        if e.index > index:
            break
        if e.membership is not None:
            result = e.membership
    return result
