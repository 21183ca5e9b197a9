"""Watches (issue 14): the recent changes of this node's store, kept in a bounded history that watchers read by
position, and their forms on the wire (the event JSON, server-sent events).

Rules:
- Events come from the store's `on_event` during apply (store.Event, in apply order: indices never go down,
  asserted), so a node hands out only what it applied, hence only what was committed; followers serve watches
  from their own applied state, with no forward and no read round (Raft §8: what a node applied is a prefix of the
  committed log, the same on every node). Events need no feature level: they are node-local (below level 2 their
  create_index is 0, as the store exposes it).
- The history holds the last `history_events` events. `history_start` is the index such that every event with an
  index above it is in the history: it moves up to an evicted event's index, and to a snapshot's index when one
  is restored (`restored`: a restore produces no events, so nothing at or below it can be handed out). The oldest
  index available is history_start + 1: a position (a `from`, a Last-Event-ID) below history_start is Behind
  (410 Gone, X-Raft-Oldest-Index: history_start + 1); a position at or above it is served, even one above the
  applied index (it waits).
- A watcher holds only its position: every event with an index at or below it was handed out (or did not match
  its filter). `read` gives the matching events after it, whole index groups only (the events of one entry, a
  txn or a prefix delete, share its index: never split), at most about MAX_EVENTS_PER_READ at a time (a group is
  never cut). A slow watcher costs no memory here, only its position; once the history has moved past it, its
  next read raises Behind and it is ended.
- Resuming "after index N" means every event of index N was delivered: on the SSE stream the `id:` line comes
  only with the last event of an index (`sse_frame`), so a client's Last-Event-ID always names a whole group. A
  client that acts on a group when its id line arrives sees every change exactly once across reconnects; a
  stream cut inside a group is sent whole again after the reconnect.
- Pure but for waking the waiters: `wait` is the one place that blocks (gevent), and `on_event` sets one
  gevent Event per batch of changes that someone waits for.
"""

from __future__ import annotations

import base64
import bisect
import json
from collections.abc import Iterable
from operator import itemgetter

import gevent
import gevent.event

from .store import Event

DEFAULT_HISTORY_EVENTS = 10_000  # -watch-history
MAX_EVENTS_PER_READ = 1000  # events handed out by one read (a group of one index beyond it goes whole)
_COMPACT_EVENTS = 4096  # the evicted front of the list is dropped once it is this long and half the list
_index_of = itemgetter(3)  # Event.index, by position: faster than the attribute, and bisect's key


class Behind(Exception):
    """The position asked for is below the history's start: the events after it are no longer all here."""

    def __init__(self, position: int, history_start: int) -> None:
        super().__init__(f"events after index {position} are no longer kept here: the oldest index available is "
                         f"{history_start + 1}")
        self.position, self.history_start = position, history_start

    @property
    def oldest_index(self) -> int:
        """X-Raft-Oldest-Index: events of this index and later are all kept (resume with from=oldest_index - 1)."""
        return self.history_start + 1


class Filter:
    """Which keys a watcher wants: one key, or every key that starts with a prefix (the empty prefix: all)."""

    __slots__ = ("key", "prefix")

    def __init__(self, key: str | None = None, prefix: str | None = None) -> None:
        assert (key is None) != (prefix is None), "a watch names a key or a prefix"
        self.key, self.prefix = key, prefix

    def matches(self, event: Event) -> bool:
        if self.key is not None:
            return event.key == self.key
        return event.key.startswith(self.prefix)  # type: ignore[arg-type]


class WatchHub:
    """The history and its readers (see the module's rules)."""

    def __init__(self, history_events: int = DEFAULT_HISTORY_EVENTS) -> None:
        assert history_events >= 1
        self.history_events = history_events
        self.history_start = 0
        self.last_index = 0  # the newest event's index (history_start after a restore past it)
        self._events: list[Event] = []  # the history is _events[_head:], in index order
        self._head = 0
        self._wake: gevent.event.Event | None = None  # set on the next change; None while nobody waits

    def __len__(self) -> int:
        return len(self._events) - self._head

    def on_event(self, event: Event) -> None:
        """The store's on_event: called during apply, for each change in order."""
        index = event[3]
        assert index >= self.last_index, f"event index {index} after {self.last_index}"
        self._events.append(event)
        self.last_index = index
        if len(self._events) - self._head > self.history_events:
            self._evict()
        if self._wake is not None:
            self._wake.set()  # the waiters run once this apply yields: its whole group is in by then
            self._wake = None

    def _evict(self) -> None:
        evicted = self._events[self._head]
        self._head += 1
        if evicted[3] > self.history_start:
            self.history_start = evicted[3]  # what is left of its group is no longer promised
        if self._head >= _COMPACT_EVENTS and self._head * 2 >= len(self._events):
            del self._events[:self._head]
            self._head = 0

    def restored(self, index: int) -> None:
        """A snapshot at `index` replaced the state (it produced no events): nothing at or below `index` can be
        handed out any more. Every waiter wakes, and those behind it are ended at their next read."""
        if index <= self.history_start:
            return
        self._events, self._head = [], 0
        self.history_start = index
        self.last_index = max(self.last_index, index)
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def check(self, position: int) -> None:
        """Raise Behind unless a watch may start (or carry on) after `position`."""
        if position < self.history_start:
            raise Behind(position, self.history_start)

    def read(self, position: int, wanted: Filter, limit: int = MAX_EVENTS_PER_READ) -> tuple[list[Event], int]:
        """(the events after `position` that `wanted` matches, whole index groups, about `limit` at most; the new
        position: the last index handed out, or the newest one looked at when none matched). Raises Behind."""
        self.check(position)
        events = self._events
        start = bisect.bisect_right(events, position, lo=self._head, key=_index_of)
        out: list[Event] = []
        matches = wanted.matches
        for i in range(start, len(events)):
            event = events[i]
            if len(out) >= limit and event[3] != out[-1][3]:
                return out, out[-1][3]  # cut between two groups: the next read starts at this one
            if matches(event):
                out.append(event)
        return out, events[-1][3] if start < len(events) else position  # every event here was looked at

    def wait(self, position: int, timeout_seconds: float, also: gevent.event.Event | None = None) -> None:
        """Block until an event after `position` may be here (or a restore happened), `also` is set, or
        `timeout_seconds` passed. The caller reads again either way."""
        if self.last_index > position or position < self.history_start:
            return
        if self._wake is None:
            self._wake = gevent.event.Event()
        gevent.wait([self._wake] if also is None else [self._wake, also], timeout=timeout_seconds, count=1)


def event_json(event: Event) -> dict:
    """The event as the API gives it: {"type", "key", "value" | "value_base64" (puts only), "index",
    "create_index"}; the value as text when it is UTF-8, else in base64."""
    out: dict = {"type": event.type, "key": event.key}
    value = event.value
    if value is not None:
        try:
            out["value"] = value.decode()
        except UnicodeDecodeError:
            out["value_base64"] = base64.b64encode(value).decode()
    out["index"], out["create_index"] = event[3], event.create_index
    return out


def sse_frame(events: list[Event]) -> bytes:
    """Server-sent events for `events` (whole index groups): `event:` and `data:` lines for each, and `id: <index>`
    before the last event of each index only (the module's rules: a Last-Event-ID names a whole group)."""
    lines = []
    last = len(events) - 1
    for i, event in enumerate(events):
        if i == last or events[i + 1][3] != event[3]:
            lines.append(f"id: {event[3]}\n")
        lines.append(f"event: {event.type}\ndata: {json.dumps(event_json(event))}\n\n")
    return "".join(lines).encode()


def sse_error(error: str, oldest_index: int) -> bytes:
    """The stream's last event when its watcher fell behind: no id line, so the client resumes where it was and
    gets the 410 that says what is lost."""
    return f"event: error\ndata: {json.dumps({'error': error, 'oldest_index': oldest_index})}\n\n".encode()


def poll_json(events: Iterable[Event]) -> str:
    return json.dumps([event_json(e) for e in events])
