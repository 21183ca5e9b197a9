"""EventRing: a bounded ring of a node's recent events (elections, leader changes, membership changes, snapshots,
a full disk), for people watching the cluster (GET /events, the dashboard's timeline at GET /ui).

Rules:
- Pure: no gevent, no I/O. The clock is passed in (`clock`, wall-clock seconds: events of several nodes are
  merged by it on a page, so it is time.time(), not the monotonic clock). The core never records here: the
  runtime derives events from what it already sees (a Ready's role, term and leader, an applied configuration,
  a snapshot it took or installed, a save refused for a full disk), at the places it already logs them.
- Bounded: the newest `capacity` events; older ones are dropped. Each event has a sequence number, 1, 2, 3...
  per ring (per process: a restarted node starts again at 1, and a reader that sees `first_seq` fall below what
  it asked for knows the node restarted), so a reader asks only for what it has not seen (`since`).
- Recording costs a dict and a deque append; it happens a few times per election or snapshot, never per write.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

DEFAULT_CAPACITY = 256

# The kinds of event, and the fields each carries besides seq, time and kind.
ELECTION_STARTED = "election_started"  # term: this node stood as a candidate
ELECTION_WON = "election_won"  # term: this node became leader
LEADER_CHANGED = "leader_changed"  # leader, term: this node learnt of a new leader
STEPPED_DOWN = "stepped_down"  # term: this node stopped leading
MEMBERSHIP_CHANGED = "membership_changed"  # index, voters, learners: a configuration applied
SNAPSHOT_TAKEN = "snapshot_taken"  # index, bytes: of this node's own state machine
SNAPSHOT_SENT = "snapshot_sent"  # to, index: a leader began to send its snapshot to a follower
SNAPSHOT_INSTALLED = "snapshot_installed"  # index: a leader's snapshot saved here, restored into the state machine
DISK_FULL = "disk_full"  # a save was refused for want of room: writes are refused until there is room
DISK_OK = "disk_ok"  # the disk had room again
REMOVED = "removed"  # by, index: a member told this node it was removed
KINDS = (ELECTION_STARTED, ELECTION_WON, LEADER_CHANGED, STEPPED_DOWN, MEMBERSHIP_CHANGED, SNAPSHOT_TAKEN,
         SNAPSHOT_SENT, SNAPSHOT_INSTALLED, DISK_FULL, DISK_OK, REMOVED)


class EventRing:
    """The newest `capacity` events of one node, each a dict {"seq", "time", "kind", ...fields}."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError("an event ring holds at least one event")
        self._events: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._clock = clock
        self.last_seq = 0  # the newest event's sequence number; 0 before any

    def record(self, kind: str, **fields: object) -> dict:
        """Note an event of `kind` (one of KINDS) now; returns it."""
        self.last_seq += 1
        event = {"seq": self.last_seq, "time": self._clock(), "kind": kind, **fields}
        self._events.append(event)
        return event

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still held (last_seq + 1 when empty)."""
        return self._events[0]["seq"] if self._events else self.last_seq + 1

    def since(self, seq: int) -> list[dict]:
        """The events after `seq`, oldest first (all held when `seq` is older than the ring, or newer than
        last_seq: the node restarted and counts from 1 again)."""
        if seq >= self.last_seq:
            return [] if seq == self.last_seq else list(self._events)
        newer = self.last_seq - seq
        if newer >= len(self._events):
            return list(self._events)
        return list(self._events)[-newer:]
