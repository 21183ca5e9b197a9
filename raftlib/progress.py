"""Replication progress: a leader's view of each follower's log (Figure 2's next_index and match_index; etcd's
tracker/progress.go).

Pure bookkeeping: the leader (`raftlib.core`) decides what to send and when; this module keeps the numbers and the
state each follower is in, and answers the questions the leader asks of all of them together (what a majority
holds, whether a majority was heard from). Rules:
- `match_index` only grows while a node leads: it is what the follower said it holds, and a follower never loses
  an entry it acknowledged (it saved it first). `next_index` stays above it: match_index < next_index.
- A follower is in one state: PROBE (one AppendEntries per heartbeat until the follower's log matches ours; §5.3's
  "decrement nextIndex and retry"), REPLICATE (entries go as soon as they exist, next_index moves ahead
  optimistically: several batches in flight), or SNAPSHOT (a snapshot is being sent, §7; appends wait; a chunk
  is sent again only once the follower was heard from since the last went: `chunk_unanswered`).
- In REPLICATE the appends with entries in flight form a window (etcd-io/raft's tracker/inflights.go): each one's
  last index and entry bytes (Entry.size), oldest first, bounded by the leader's Config.max_inflight_messages and
  max_inflight_bytes (`window_full`; the bytes bound is soft: one append may take the window past it, as etcd's).
  An acknowledgement (match_index) frees every append at or below it; becoming PROBE or SNAPSHOT empties it.
- A rejection that does not answer the request in flight (`is_stale_rejection`) changes nothing.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from .messages import Membership, Snapshot


class ProgressState(enum.Enum):
    PROBE = "probe"  # one AppendEntries per heartbeat until the follower's log matches
    REPLICATE = "replicate"  # send new entries as soon as they exist
    SNAPSHOT = "snapshot"  # sending a snapshot; appends wait


@dataclass(frozen=True, slots=True)
class ProgressStatus:
    """A copy of one follower's progress, for status pages and tests."""

    match_index: int
    next_index: int
    state: ProgressState
    recent_active: bool
    restoring: bool = False  # Progress.restoring: its state machine lacks a snapshot it holds, as last heard
    heard_ticks_ago: int | None = None  # the leader's ticks since its last reply; None: none this leadership

    def heard_within(self, ticks: int) -> bool:
        """A reply came from it in the `ticks` ticks before this copy was made (Progress.heard_within)."""
        return self.heard_ticks_ago is not None and self.heard_ticks_ago <= ticks


@dataclass(slots=True)
class Progress:
    """The leader's view of one follower (Figure 2: next_index, match_index)."""

    match_index: int = 0
    next_index: int = 1
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False  # PROBE: an append is in flight; the next waits for its answer or a heartbeat
    recent_active: bool = False  # heard from within this election timeout (check-quorum, thesis §6.2)
    snapshot: Snapshot | None = None  # SNAPSHOT: the one being sent, kept until done even if a newer one is taken
    snapshot_offset: int = 0  # SNAPSHOT: how many of its bytes the follower holds
    chunk_unanswered: bool = False  # SNAPSHOT: a chunk went and nothing was heard from the follower since
    commit_sent: int = 0  # the highest leader_commit sent to it in an AppendEntries (this leadership's)
    batch_tick: int = -1  # the leader's tick count when it last sent it entries
    previous_batch_tick: int = -1  # ... and the time before
    # Its last append reply said it restores a snapshot (AppendEntriesReply.restoring), or it just installed ours
    # (`snapshot_done`: the leader's guess until its next append reply).
    restoring: bool = False
    heard_tick: int = -1  # the leader's tick count at its last reply (`heard`); -1: none in this leadership
    # REPLICATE: the appends with entries not yet acknowledged, as (last index, bytes of entries), oldest first;
    # and the sum of their bytes. Empty in PROBE and SNAPSHOT.
    inflight: list[tuple[int, int]] = field(default_factory=list)
    inflight_bytes: int = 0

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.last_included_index if self.snapshot is not None else 0

    @property
    def idle(self) -> bool:
        """REPLICATE and nothing in flight: the follower acknowledged every entry sent to it."""
        return self.state is ProgressState.REPLICATE and self.next_index <= self.match_index + 1

    @property
    def paused(self) -> bool:
        """A probe is in flight: nothing more goes until it is answered or the next heartbeat."""
        return self.state is ProgressState.PROBE and self.probe_sent

    def window_full(self, max_messages: int, max_bytes: int) -> bool:
        """REPLICATE and no room in the window for one more append with entries: nothing but empty appends (the
        heartbeats, which carry the commit index and read rounds) goes until an acknowledgement frees some.

        A full window never stays full for good, whatever is lost, held or reordered: each heartbeat is an empty
        append at prev_log_index next_index - 1, the last entry sent. A follower that holds every entry sent
        answers it with success at that index, which frees the whole window; one that lacks some (an append lost,
        or still held on the way) rejects it at that index, above match_index, so not as stale: the leader backs
        off to PROBE (`rejected`), which empties the window (etcd recovers the same way: the heartbeat's answer
        sends an append whose rejection ends REPLICATE). A lost heartbeat or answer is made good by the next."""
        return bool(self.inflight) and (len(self.inflight) >= max_messages or self.inflight_bytes >= max_bytes)

    def status(self, tick: int) -> ProgressStatus:
        """A copy, at the leader's tick count `tick`."""
        return ProgressStatus(self.match_index, self.next_index, self.state, self.recent_active, self.restoring,
                              None if self.heard_tick < 0 else tick - self.heard_tick)

    def heard(self, tick: int) -> None:
        """A reply came from the follower at the leader's tick count `tick` (check-quorum's `recent_active`, and the
        sliding window `heard_within` reads)."""
        self.recent_active = True
        self.heard_tick = tick
        self.chunk_unanswered = False

    def heard_within(self, ticks: int, tick: int) -> bool:
        """A reply came from it in the last `ticks` ticks before the leader's tick count `tick`. Unlike
        `recent_active`, which check-quorum resets every election timeout (so for a moment after each reset it is
        false for every follower), a window that slides."""
        return self.heard_tick >= 0 and tick - self.heard_tick <= ticks

    def become_probe(self) -> None:
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self._empty_window()

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snapshot = snapshot
        self.snapshot_offset = 0
        self.chunk_unanswered = False
        self._empty_window()

    def _empty_window(self) -> None:
        self.inflight.clear()
        self.inflight_bytes = 0

    def sent_entries(self, last_index: int, entry_bytes: int = 0) -> None:
        """An AppendEntries went out whose last entry (or, when it has none, its prev_log_index) is `last_index`,
        with `entry_bytes` of entries (Entry.size). A probe waits for its answer; replication moves next_index past
        it at once, and an append with entries (its last index at or past next_index) takes a place in the
        window."""
        if self.state is ProgressState.PROBE:
            self.probe_sent = True
        elif last_index >= self.next_index:
            if self.state is ProgressState.REPLICATE:
                self.inflight.append((last_index, entry_bytes))
                self.inflight_bytes += entry_bytes
            self.next_index = last_index + 1

    def update_match(self, match_index: int) -> bool:
        """The follower said its log matches ours up to `match_index`: the appends in flight that end at or below
        it are acknowledged and leave the window. Returns whether match_index grew."""
        if match_index <= self.match_index:
            return False
        self.match_index = match_index
        acknowledged = 0
        for last_index, entry_bytes in self.inflight:
            if last_index > match_index:
                break
            acknowledged += 1
            self.inflight_bytes -= entry_bytes
        del self.inflight[:acknowledged]
        return True

    def matched(self) -> None:
        """After a successful append: a probe that matched starts replicating; next_index stays past match_index.
        (A success while a snapshot is sent, the answer to the heartbeat at the snapshot's index, keeps SNAPSHOT.)"""
        if self.state is ProgressState.PROBE:
            self.state = ProgressState.REPLICATE
            self.probe_sent = False
        self.next_index = max(self.next_index, self.match_index + 1)

    def is_stale_rejection(self, reject_index: int) -> bool:
        """A rejection of prev_log_index `reject_index` that does not answer what is in flight now: one from
        before a snapshot transfer, one at or below what the follower already matched, or one for a probe that has
        since been replaced."""
        if self.state is ProgressState.SNAPSHOT:
            return True
        if self.state is ProgressState.REPLICATE:
            return reject_index <= self.match_index
        return reject_index != self.next_index - 1

    def rejected(self, reject_index: int, hint: int) -> None:
        """The follower's log does not match at `reject_index`; `hint` is where the leader's log and its may
        match (fast backtracking, §5.3). Probe from there, never at or below match_index."""
        self.next_index = max(self.match_index + 1, min(hint, reject_index))
        self.become_probe()

    def snapshot_done(self, index: int, restoring: bool) -> None:
        """The follower holds the snapshot at `index`: probe from just after it. `restoring`: taken as restoring it
        (the leader's guess, until its next append reply says)."""
        self.match_index = max(self.match_index, index)
        self.restoring = restoring
        self.next_index = self.match_index + 1
        self.become_probe()
        self.snapshot, self.snapshot_offset = None, 0


class ProgressTracker(dict[str, Progress]):
    """The leader's Progress of every member (itself included, whose entry only serves `recent_active`), by node
    id. A dict, so that the leader's hot path looks a follower up at dict speed."""

    @classmethod
    def for_new_leader(cls, node_ids: Iterable[str], next_index: int) -> ProgressTracker:
        """§5.3: a new leader starts every next_index just after its own last entry, and counts every member as
        recently active (it just won an election, or is alone)."""
        return cls((n, Progress(next_index=next_index, recent_active=True)) for n in node_ids)

    def set_members(self, membership: Membership, next_index: int, self_id: str) -> None:
        """Track exactly the members of `membership` (and this node): new ones start probing at `next_index`."""
        for node_id in membership.node_ids:
            if node_id not in self:
                self[node_id] = Progress(next_index=next_index, recent_active=True)
        for node_id in [n for n in self if n not in membership.node_ids and n != self_id]:
            del self[node_id]

    def committed_index(self, membership: Membership, self_id: str, self_match_index: int) -> int:
        """The highest index that a majority of the voters holds (this node's own holding is `self_match_index`,
        what it has saved). Whether it may commit is the caller's question (§5.4.2)."""
        matches = sorted(
            (self_match_index if n == self_id else self[n].match_index for n in membership.voters), reverse=True
        )
        return matches[membership.quorum() - 1]

    def quorum_active(self, membership: Membership, self_id: str) -> bool:
        """A majority of the voters was heard from since `reset_recent_active` (thesis §6.2, check-quorum)."""
        active = sum(1 for n in membership.voters if n == self_id or self[n].recent_active)
        return active >= membership.quorum()

    def reset_recent_active(self, self_id: str) -> None:
        for node_id, pr in self.items():
            pr.recent_active = node_id == self_id

    def status(self, self_id: str, tick: int) -> Mapping[str, ProgressStatus]:
        """Every follower's progress, frozen, at the leader's tick count `tick`."""
        return types.MappingProxyType({n: pr.status(tick) for n, pr in sorted(self.items()) if n != self_id})


def best_successor(progress: Mapping[str, Progress | ProgressStatus], voters: Iterable[str],
                   responsive: Collection[str] = ()) -> str | None:
    """The voter a leader hands over to (a removal's, core; a stop's, raftlib.server.node): of `voters` tracked in
    `progress` (the tracker's, or a status's copy), not one that said it restores a snapshot (it ignores
    TimeoutNow), the one with the highest match_index; of those that tie, one in `responsive` (the caller's: heard
    from lately) if any, then the greatest id, as a deterministic choice. None when there is none. The one place
    for this choice (review of fix2snap, Q2: two had opposite tie-breaks).

    Why `responsive` (review restoreedges L3): the transport waits for a live but slow peer's late reply (up to
    ten reply timeouts) and holds what it has for that peer meanwhile, the TimeoutNow of a hand-over included; a
    caught-up peer heard from lately takes over at once. A responsive peer that is behind is not preferred: the
    caller sends TimeoutNow only to a caught-up one (a removal), or the transfer first waits for it to catch up."""
    candidates = [n for n in voters if n in progress and not progress[n].restoring]
    return max(candidates, key=lambda n: (progress[n].match_index, n in responsive, n), default=None)
