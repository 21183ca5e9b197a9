"""Watches (issue 14): the recent changes of this node's store, kept in a bounded history that watchers read by
position, and their forms on the wire (the event JSON, server-sent events).

Rules:
- Events come from the store during apply, an entry's at once (`on_events`; `on_event` is one of them: store.Event,
  in apply order: indices never go down, asserted), so a node hands out only what it applied, hence only what was
  committed; followers serve watches from their own applied state, with no forward and no read round (Raft §8:
  what a node applied is a prefix of the committed log, the same on every node). Events need no feature level: they are node-local (below level 2 their
  create_index is 0, as the store exposes it). `applied(index)` after each applied entry (the node's store calls
  it) moves `applied_index`, changes or not.
- The history holds at most `history_events` events and about `history_bytes` bytes (EVENT_OVERHEAD_BYTES plus
  key and value each; the newest entry's events are always kept whole by the byte bound, the newest event by both); an evicted event's references are dropped at once.
  `history_start` is the index such that every event with an index above it is in the history: it moves up to an
  evicted event's index, and to a snapshot's index when one is restored (`restored`: a restore produces no
  events, so nothing at or below it can be handed out; node.WatchedStore calls it too, at an entry whose events
  the history failed on). The oldest index available is history_start + 1.
- A position is an index the watcher has seen everything up to, matching its filter or not: every event with an
  index at or below it was handed out or did not match. A read moves it to the end of what it looked at: the
  applied index when it read to the end (so a quiet watcher's position follows the node's applied index, not
  only its own events), else the last index handed out (a read is cut between two index groups past its event or
  byte budget). The stream sends it as an SSE `id:` (with its first chunk and with a keep-alive when it moved), a
  long poll in X-Raft-Watch-Position: the next `from`.
- 410 (Behind) only when an event that matches the watcher's filter may have been evicted. A registered Watcher
  (`watch`) is told of every matching event as it arrives (`first_match`, the lowest index of one since it last
  read to the end), so a read skips the stretch in between, which held nothing for it: its reads scan from
  max(position, first_match - 1), and only that has to be at or above history_start. A connected quiet watcher
  thus never falls behind; a `from` (a new watch, a reconnect) is checked against history_start itself, as
  nobody watched the stretch for it. A restore marks every watcher (it may hide changes of any key).
- Whole index groups only (the events of one entry, a txn or a prefix delete, share its index: never split), at
  most about `max_events` (MAX_EVENTS_PER_READ) and `max_bytes` of event JSON a read (a group is never cut;
  a stream's batch gets MAX_STREAM_BYTES_PER_READ). A slow watcher
  costs no memory here, only its position.
- Resuming "after index N" means every event of index N was delivered: on the SSE stream the `id:` line comes
  only with the last event of an index (`sse_frame`), so a client's Last-Event-ID always names a whole group.
- Each event's JSON is encoded once, when a watcher first needs it, and shared (`encodings` counts them); its
  length counts in held_bytes (JSON escapes make it up to 6x the raw bytes).
- Reads are shared: watchers of the same filter that read from the same index with the same budgets while the
  history is unchanged get the same answer, so it is computed once, with its SSE frame (`next_sse`), and handed to
  each of them (`shared_reads` counts the reads answered so). Any change (an event, an applied index, an eviction, a
  restore) drops the shared answers. Only the most recent are kept: at most MAX_SHARED_ANSWERS, and their frames
  about MAX_SHARED_BYTES (the newest answer's frame is kept whatever its size; the frames count in held_bytes, as
  `shared_bytes`), so readers at many different places of a quiet history (a reconnect storm with different
  Last-Event-IDs, catch-ups a cut read at a time) leave at most that much, not a frame each. The cost of a wake
  is then one lookup and one write per watcher, not a scan and an encoding of its events: at 1,000 watchers of
  one prefix that is what a follower spends (bench: docs/BENCHMARKS.md). The lists handed out are shared: callers never change them.
- Waking: only the watchers whose filter matches an event are woken (by exact key: a dict; by prefix: a radix
  trie of the watched prefixes, `_PrefixNode`, walked along the key: one dict lookup and one C-level
  `startswith` per node on the way, so an event costs one step per watched prefix (or branch point) that leads
  to its key, whatever the prefixes' length; review edge3, L1: a trie of one node per character walked 4,092
  steps per event for one long watched prefix, 812 ms for a 2,000-key prefix delete), once per read, shallow
  prefixes first. An entry's keys share their walk: each starts where the previous key's leaves its path
  (`_match_prefixes`), so a prefix delete (its keys in key order) pays for the prefixes above it once, not per
  key; keys out of order (a transaction's, several leases' expiries) pay per sorted run. The watchers of
  one key or prefix that are all marked already are skipped as a whole (`_Watchers.all_marked`), so the events
  after a drive's first cost one check each. A watcher with a `deliver` (a stream behind the edge:
  raftlib.server.watchstream) is offered its wake first: its frame is read and written there and then, with no
  switch to its greenlet, which is woken only when that could not be done whole. At most WAKE_BATCH greenlets
  and about WAKE_TURN_SECONDS of deliveries a turn of the event loop (the rest in the next turns, after the Raft
  timers), so a burst for many watchers never holds the loop. `wakes` counts the watchers taken off the queue.
  A delivery costs a follower ~20 us of CPU, two thirds of it the kernel's send (bench/watch_deliver_cost.py),
  so what the wake adds per delivery is kept to a few steps: the clock is read once every CLOCK_EVERY offers
  (the turn's budget, and the write time the deliver is given) and after a delivery that made a new shared answer,
  a read that equals the newest shared one takes it without a dict lookup (`_newest_key`, forgotten with its
  answer whenever that leaves the shared answers), its chunk (`next_chunk`) is made once per shared read, and the
  metrics are tallied and added up at the end of the turn (`after_wake`; a callback's failure is logged). A
  deliver that raises (a bug, logged) marks its watcher `failed`: its stream ends with an error event.
  `wait` (plain position, no Watcher) is the old form: any event wakes it.
- Pure but for waking the waiters (gevent), kept in `_wake_some` and the two waits, and the clock read when a
  watcher is marked (`marked_at`: the GET /metrics histogram of apply to write, raftdzmq_watch_delivery_seconds).
- The events one drive applies (no yield between them) wake each of their watchers once, after the drive: its read
  takes them all, and a stream writes them as one frame (one chunk, one send).
- Refusal (review L1 of issue 14; etcd's WithRequireLeader): while `refusal` is set (status, reason) -- the node
  was removed, or has heard from no leader for too long (raftlib.server.watchguard decides) -- this node will see
  no new event, so a watch that stayed here would wait in vain and its position could fall behind every member's
  history. `refuse` sets it and wakes every registered watcher, whose stream ends with an `error` event giving
  the reason and whose long poll answers it (routes_watch); new watches are answered the same way. `admit` ends
  it (a leader heard again).
"""

from __future__ import annotations

import base64
import bisect
import collections
import json
import logging
import time
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any

import gevent
import gevent.event

from .store import Event

log = logging.getLogger("raftdzmq.watch")

DEFAULT_HISTORY_EVENTS = 10_000  # -watch-history
MIN_HISTORY_EVENTS = 4096  # above the most events one entry makes (2,000 keys of a prefix delete, 128 txn ops)
DEFAULT_HISTORY_BYTES = 64 << 20  # -watch-history-bytes
EVENT_OVERHEAD_BYTES = 200  # an event's cost beyond its key and value (the tuple, its cached JSON, the lists)
MAX_EVENTS_PER_READ = 1000  # events handed out by one read (a group of one index beyond it goes whole)
MAX_BYTES_PER_READ = 4 << 20  # bytes of event JSON handed out by one read, the same way
MAX_STREAM_BYTES_PER_READ = 1 << 20  # a stream's batch: one chunk, held until written
MAX_SHARED_ANSWERS = 16  # shared reads kept at once, the most recently used (a wake's readers share a few)
MAX_SHARED_BYTES = 4 << 20  # their SSE frames, about (the newest is kept whatever its size)
WAKE_BATCH = 64  # watchers' greenlets woken per turn of the event loop
WAKE_TURN_SECONDS = 0.005  # deliveries from the wake per turn of the event loop, about (edge's TurnGate's budget)
# The wake reads the clock once every this many offered deliveries (for its turn's budget and the deliveries' write
# time, raftdzmq_watch_delivery_seconds), and after any delivery that made a new shared answer (a scan, encodings,
# a frame: about a millisecond for a 1 MiB read): a delivery that shares an answer costs a follower ~20 us, mostly
# the kernel's send, so the budget is overrun by a fraction of a millisecond plus one new answer at most, and a
# frame's write time is off by as little. Offers that did not deliver (a partial send, Behind) count the same.
CLOCK_EVERY = 8
_COMPACT_EVENTS = 4096  # the evicted front of the list is dropped once it is this long and half the list
_NO_CHUNK: tuple[bytes, ...] = ()
_NO_EVENTS_BODY = b"[]\n"  # a long poll's body with no events (poll_body of [])
_index_of: Callable[[Any], int] = itemgetter(3)  # Event.index, by position: faster than the attribute, and bisect's key


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


class Watcher:
    """A registered watch (WatchHub.watch): its filter, its position, and `first_match`, the lowest index of an
    event that may match after its position (None: none came since it last read to the end). `deliver`, when
    set, is tried before `woken` (the module's rules: waking)."""

    __slots__ = ("wanted", "position", "first_match", "marked_at", "woken", "deliver", "group", "failed")

    def __init__(self, wanted: Filter, position: int) -> None:
        self.wanted, self.position = wanted, position
        self.first_match: int | None = position + 1  # nobody watched before: the first read scans
        self.marked_at = time.monotonic()  # when first_match was last set from None: its event's apply (metrics)
        self.woken = gevent.event.Event()
        # The stream's write from the wake itself (watchstream.SocketWriter.deliver), given the wake's clock read
        # (at most CLOCK_EVERY deliveries old): True when it wrote what there was, False to wake the watcher's
        # greenlet after all. None: always woken.
        self.deliver: Callable[[Watcher, float], bool] | None = None
        self.group: _Watchers | None = None  # the watchers of its key or prefix (WatchHub.watch)
        self.failed = False  # its deliver raised: its stream ends with an error event (WatchHub._wake_some)


class _Watchers(set):
    """The watchers of one key or one prefix. `all_marked`: every one of them has a first_match (set by a full
    pass of _matched, cleared when one reads to the end), so the next event for them marks nobody and its pass is
    skipped: at 1,000 watchers of one prefix, the events after a drive's first cost one check, not 1,000."""

    __slots__ = ("all_marked",)

    def __init__(self) -> None:
        super().__init__()
        self.all_marked = False


class _PrefixNode:
    """A node of the watched prefixes' radix trie (WatchHub._prefix_root): `label`, the characters on the edge from
    its parent (empty only at the root), so the prefix a node stands for is its path's labels joined; `children`
    by the first character of their label; `group`, the watchers of the prefix that ends here, or None at a branch
    point. Every node but the root has watchers or at least two children."""

    __slots__ = ("label", "children", "group")

    def __init__(self, label: str, group: _Watchers | None = None) -> None:
        self.label = label
        self.children: dict[str, _PrefixNode] = {}
        self.group = group


def _common_length(label: str, text: str, start: int) -> int:
    """How many leading characters of `label` text[start:] shares (a registration's cost, not an event's)."""
    most = min(len(label), len(text) - start)
    if text.startswith(label[:most], start):
        return most
    low, high = 0, most  # label[:low] is shared and label[:high] is not: halve, each test a C-level compare
    while high - low > 1:
        middle = (low + high) // 2
        if text.startswith(label[:middle], start):
            low = middle
        else:
            high = middle
    return low


def _event_bytes(event: Event) -> int:
    return EVENT_OVERHEAD_BYTES + len(event[1]) + (0 if event[2] is None else len(event[2]))


class WatchHub:
    """The history and its readers (see the module's rules)."""

    def __init__(self, history_events: int = DEFAULT_HISTORY_EVENTS,
                 history_bytes: int = DEFAULT_HISTORY_BYTES) -> None:
        assert history_events >= 1 and history_bytes >= 1
        self.history_events, self.history_bytes = history_events, history_bytes
        self.history_start = 0
        self.last_index = 0  # the newest event's index (history_start after a restore past it)
        self.applied_index = 0  # every event at or below it is in (or was evicted from) the history
        self.held_bytes = 0  # _event_bytes of the events in the history, their cached JSON's length, shared_bytes
        self._events: list[Event | None] = []  # the history is _events[_head:], in index order; None: evicted
        self._data: list[bytes | None] = []  # each event's JSON, encoded once when first needed (same positions)
        self._head = 0
        self._wake: gevent.event.Event | None = None  # for `wait` (positions): set on the next change
        self._by_key: dict[str, _Watchers] = {}
        self._by_prefix: dict[str, _Watchers] = {}
        # The watched prefixes as a radix trie (_PrefixNode; the root's label is ""): an event walks it along its
        # key, one node per watched prefix (or branch point) on the way, never one step per character.
        self._prefix_root = _PrefixNode("")
        self._to_wake: collections.deque[Watcher] = collections.deque()
        self._waking = False
        # Called at the end of each turn of the wake (watchstream adds its metrics' flush of the turn's tally).
        self.after_wake: set[Callable[[], None]] = set()
        self.wakes = 0  # watchers woken, in all (tests count them)
        self.encodings = 0  # events encoded to JSON, in all (tests count them)
        self.evictions = 0  # events evicted, in all
        self.shared_reads = 0  # reads answered from another watcher's identical read (tests count them)
        # (key, prefix, scan from, max events, max bytes) -> [events, position, whole, SSE frame or None, its chunk
        # or None], while the history is unchanged (the rules: cleared on every change), least recently used first,
        # bounded. _newest_key: the key of its last entry (None: unknown), whose readers need not move it.
        self._shared: dict[tuple, list] = {}
        self._newest_key: tuple | None = None
        self._newest_answer: list = []
        self._answer_made = False  # a read made a new shared answer since the wake last read the clock
        self.shared_bytes = 0  # the length of the SSE frames in _shared (part of held_bytes)
        self.refusal: tuple[int, str] | None = None  # (HTTP status, reason) while watches are refused (the rules)

    def __len__(self) -> int:
        return len(self._events) - self._head

    def on_event(self, event: Event) -> None:
        """The store's on_event: called during apply, for each change in order."""
        self.on_events((event,))

    def on_events(self, events: list[Event] | tuple[Event, ...]) -> None:
        """The changes of one applied entry (or more), in order: the same as `on_event` for each, with the history's
        bookkeeping and evictions done once for all of them (a 10-put txn makes 10; node.WatchedStore)."""
        index = events[-1][3]
        assert events[0][3] >= self.last_index, f"event index {events[0][3]} after {self.last_index}"
        history = self._events
        history += events
        self._data += [None] * len(events)
        self.held_bytes += sum(EVENT_OVERHEAD_BYTES + len(event[1]) + (0 if event[2] is None else len(event[2]))
                               for event in events)  # _event_bytes
        self.last_index = index
        if self._shared or self._newest_key is not None:
            self._drop_shared()
        if index > self.applied_index:
            self.applied_index = index
        over = len(history) - self._head - self.history_events
        if over > 0:
            self._evict(over)
        # The byte bound never evicts within the newest entry: its events must stay servable whole, however small
        # -watch-history-bytes is (an entry's events are bounded: its 2 MiB and 2,000 keys of a prefix delete).
        while self.held_bytes > self.history_bytes and len(self._events) - self._head > 1 and (
                self._events[self._head][3] != index):  # type: ignore[index]
            self._evict(1)  # a compaction replaces nothing but may shorten the list: read it afresh
        if self._by_key:
            for event in events:
                watchers = self._by_key.get(event[1])
                if watchers:
                    self._matched(watchers, event[3])
        if self._by_prefix:
            self._match_prefixes(events)
        if self._wake is not None:
            self._wake.set()  # the waiters run once this apply yields: its whole group is in by then
            self._wake = None

    def _match_prefixes(self, events: list[Event] | tuple[Event, ...]) -> None:
        """Tell the watchers of every watched prefix of each event's key of that event (the radix trie walked along
        the key, shallowest first). A key starts its walk where the previous key's ends to share its path: the
        nodes up to there were matched already in this call (`_matched` marks a group once, and nothing unmarks one
        before this returns), so a prefix delete's keys, which come in key order under one prefix, cost one
        comparison and their own nodes each, not every watched prefix above them again (review edge3, L1: 450
        watchers along one 4 KiB prefix made each of 2,000 events walk 450 nodes)."""
        path: list[_PrefixNode] = []  # the previous key's walk: path[i] stands for previous[:ends[i]]
        ends: list[int] = []
        previous = ""
        matched = self._matched
        for event in events:
            key, index = event[1], event[3]
            if path:
                shared = len(path) - 1  # the deepest node of the previous walk that this key reaches too
                if not key.startswith(previous[:ends[shared]]):
                    shared, beyond = 0, shared  # path[0], the root, is reached by every key; path[beyond] not
                    while beyond - shared > 1:
                        middle = (shared + beyond) // 2
                        if key.startswith(previous[:ends[middle]]):
                            shared = middle
                        else:
                            beyond = middle
                    del path[shared + 1:], ends[shared + 1:]
                node, depth = path[shared], ends[shared]
            else:
                node, depth = self._prefix_root, 0
                path.append(node)
                ends.append(0)
                if node.group is not None:
                    matched(node.group, index)
            end = len(key)
            while depth < end:
                child = node.children.get(key[depth])
                if child is None or not key.startswith(child.label, depth):
                    break
                node = child
                depth += len(child.label)
                path.append(node)
                ends.append(depth)
                if node.group is not None:
                    matched(node.group, index)
            previous = key

    def _add_prefix(self, prefix: str, group: _Watchers) -> None:
        """Put `group`, the watchers of `prefix`, in the radix trie (splitting the edge it ends or branches in)."""
        node, depth = self._prefix_root, 0
        while depth < len(prefix):
            child = node.children.get(prefix[depth])
            if child is None:
                node.children[prefix[depth]] = _PrefixNode(prefix[depth:], group)
                return
            label = child.label
            common = _common_length(label, prefix, depth)
            if common < len(label):  # the prefix ends or branches inside the edge: a node goes in there
                middle = _PrefixNode(label[:common])
                child.label = label[common:]
                middle.children[child.label[0]] = child
                node.children[label[0]] = child = middle
            node, depth = child, depth + common
        node.group = group

    def _remove_prefix(self, prefix: str) -> None:
        """Take the watchers of `prefix` out of the radix trie: its node goes when it has no child, and a node left
        with no watchers and one child is merged into that child (no node but the root is a bare pass-through)."""
        path = [self._prefix_root]
        depth = 0
        while depth < len(prefix):
            path.append(path[-1].children[prefix[depth]])
            depth += len(path[-1].label)
        path[-1].group = None
        while len(path) > 1:
            node = path.pop()
            parent = path[-1]
            if node.group is not None:
                return
            if not node.children:
                del parent.children[node.label[0]]  # and the parent may be left bare: go on up
                continue
            if len(node.children) == 1:
                [child] = node.children.values()
                child.label = node.label + child.label
                parent.children[node.label[0]] = child
            return

    def applied(self, index: int) -> None:
        """The node applied the entry at `index` (whatever it changed): positions may move up to it."""
        if index > self.applied_index:
            self.applied_index = index
            if self._shared or self._newest_key is not None:
                self._drop_shared()

    def _evict(self, count: int) -> None:
        """Evict the `count` oldest events of the history (at least one is left: the callers' bounds)."""
        head = self._head
        end = head + count
        events, data = self._events, self._data
        freed = 0
        for evicted, encoded in zip(events[head:end], data[head:end]):
            assert evicted is not None
            freed += _event_bytes(evicted) + (0 if encoded is None else len(encoded))
        newest = events[end - 1][3]  # type: ignore[index]
        events[head:end] = [None] * count  # values may be large: not kept until the compaction
        data[head:end] = [None] * count
        self.held_bytes -= freed
        self.evictions += count
        if self._shared or self._newest_key is not None:
            self._drop_shared()
        self._head = head = end
        if newest > self.history_start:
            self.history_start = newest  # what is left of its group is no longer promised
        if head >= _COMPACT_EVENTS and head * 2 >= len(events):
            del events[:head], data[:head]
            self._head = 0

    def restored(self, index: int, force: bool = False) -> None:
        """A snapshot at `index` replaced the state (it produced no events): nothing at or below `index` can be
        handed out any more. Every waiter wakes, and those behind it are ended at their next read. `force` (the
        events of the entry at `index` were not handed over whole: WatchedStore._hand_over): every watcher is
        marked even when the history already starts at or after `index` (its count bound evicted up to the entry
        before the failure), so that none moves past the entry without a 410 (final review, finding 2)."""
        if index > self.history_start:
            self._drop_shared()
            self._events, self._data, self._head, self.held_bytes = [], [], 0, 0
            self.history_start = index
            self.last_index = max(self.last_index, index)
            self.applied_index = max(self.applied_index, index)
        elif not force:
            return
        for watchers in (*self._by_key.values(), *self._by_prefix.values()):
            self._matched(watchers, 0)  # any key may have changed: each reads from its own position
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def end_every_watch(self, index: int) -> None:
        """The last resort when even `restored` failed (final review, finding 1): with none of the matching and
        sharing code, the history is made to start at `index` at least and every registered watcher is woken to
        read from its position, so each one behind `index` ends with 410 Behind; nothing is handed out that
        the history may have half taken."""
        self._events, self._data, self._head, self.held_bytes = [], [], 0, 0
        self._shared = {}
        self._forget_newest()
        self.shared_bytes = 0
        self.history_start = max(self.history_start, index)
        self.last_index = max(self.last_index, index)
        self.applied_index = max(self.applied_index, index)
        for watchers in (*self._by_key.values(), *self._by_prefix.values()):
            for watcher in watchers:
                watcher.first_match = watcher.position + 1
                watcher.woken.set()
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def refuse(self, status: int, reason: str) -> None:
        """Refuse watches (the module's rules): every registered watcher wakes to end with `reason`."""
        self.refusal = (status, reason)
        for watchers in (*self._by_key.values(), *self._by_prefix.values()):
            for watcher in watchers:
                watcher.woken.set()

    def admit(self) -> None:
        """Serve watches again."""
        self.refusal = None

    # ---- registered watchers ----------------------------------------------------------------------------------

    def watch(self, position: int, wanted: Filter) -> Watcher:
        """Register a watcher at `position` (raises Behind for a position below the history). `unwatch` it."""
        self.check(position)
        watcher = Watcher(wanted, position)
        if wanted.key is not None:
            group = self._by_key.get(wanted.key)
            if group is None:
                group = self._by_key[wanted.key] = _Watchers()
        else:
            prefix = wanted.prefix
            assert prefix is not None
            group = self._by_prefix.get(prefix)
            if group is None:
                group = self._by_prefix[prefix] = _Watchers()
            self._add_prefix(prefix, group)  # the same set
        group.add(watcher)  # marked (first_match): all_marked stays true
        watcher.group = group
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        wanted = watcher.wanted
        index, name = (self._by_key, wanted.key) if wanted.key is not None else (self._by_prefix, wanted.prefix)
        watchers = index.get(name)  # type: ignore[arg-type]
        if watchers is None or watcher not in watchers:
            return
        watchers.discard(watcher)
        if not watchers:
            del index[name]  # type: ignore[arg-type]
        if wanted.prefix is not None and not watchers:  # its trie node goes (or is merged)
            self._remove_prefix(wanted.prefix)

    def _matched(self, watchers: _Watchers, index: int) -> None:
        """Mark (and queue to wake) the watchers of `watchers` not marked yet, of an event at `index`; index 0:
        a restore, which moves every first_match down to its watcher's position."""
        if index and watchers.all_marked:
            return
        watchers.all_marked = True
        now = time.monotonic()
        for watcher in watchers:
            if watcher.first_match is None:  # woken once until it reads
                watcher.first_match = index if index else watcher.position + 1
                watcher.marked_at = now
                self._to_wake.append(watcher)
            elif not index:
                watcher.first_match = min(watcher.first_match, watcher.position + 1)
        if self._to_wake and not self._waking:
            self._waking = True
            gevent.get_hub().loop.run_callback(self._wake_some)

    def _wake_some(self) -> None:
        """Offer each queued watcher's `deliver` its wake, and wake the greenlets of the others: in one turn of the
        event loop at most WAKE_BATCH greenlets and about WAKE_TURN_SECONDS of deliveries; the rest in a later
        turn, from a timer (which runs with the Raft timers, after this turn's I/O: edge.TurnGate says why)."""
        to_wake = self._to_wake
        greenlets = delivered = 0
        now = time.monotonic()
        deadline = now + WAKE_TURN_SECONDS
        offered = 0
        self._answer_made = False
        while to_wake and greenlets < WAKE_BATCH:
            watcher = to_wake.popleft()
            deliver = watcher.deliver
            if deliver is None:
                watcher.woken.set()
                greenlets += 1
                continue
            # A deliver that raises is a bug, logged: it must not stop the wakes of the others for good, as an
            # exception out of this loop callback would (_waking stays set). Its read may have moved the watcher's
            # position past events it never wrote, so the watcher is marked `failed`: its greenlet ends the stream
            # with an error event, and the client resumes after the last id it received, without a gap.
            try:
                done = deliver(watcher, now)
            except Exception:
                log.exception("writing a watch's events from the wake failed: its stream is ended")
                watcher.failed = True
                done = False
            if done:
                delivered += 1
            else:
                watcher.woken.set()
                greenlets += 1
            offered += 1
            if self._answer_made or not offered % CLOCK_EVERY:
                self._answer_made = False
                now = time.monotonic()
                if now >= deadline:
                    break
        self.wakes += delivered + greenlets
        for after in self.after_wake:  # a failure is logged and the wakes go on (review of fanout3, Q3)
            try:
                after()
            except Exception:
                log.exception("a watch wake's end-of-turn callback failed")
        if to_wake:
            timer = gevent.get_hub().loop.timer(0.0)
            timer.start(self._wake_later, timer)
        else:
            self._waking = False

    def _wake_later(self, timer) -> None:
        timer.close()
        self._wake_some()

    def next(self, watcher: Watcher, max_events: int = MAX_EVENTS_PER_READ,
             max_bytes: int = MAX_BYTES_PER_READ) -> list[Event]:
        """The watcher's next events (whole groups, within the budgets; a shared list: not to be changed); its
        position moves past what was looked at. Raises Behind when a matching event may have been evicted."""
        answer = self._next(watcher, max_events, max_bytes)
        return [] if answer is None else answer[0]

    def next_sse(self, watcher: Watcher, max_events: int = MAX_EVENTS_PER_READ,
                 max_bytes: int = MAX_STREAM_BYTES_PER_READ) -> tuple[list[Event], bytes]:
        """`next` and the SSE frame of its events (b"" for none), both shared with every watcher that made the
        same read while the history stayed the same (the module's rules)."""
        answer = self._next(watcher, max_events, max_bytes)
        if answer is None or not answer[0]:
            return [], b""
        return answer[0], self._frame_of(answer)

    def next_chunk(self, watcher: Watcher, max_events: int = MAX_EVENTS_PER_READ,
                   max_bytes: int = MAX_STREAM_BYTES_PER_READ) -> tuple[list[Event], tuple[bytes, ...], int]:
        """`next_sse` with the frame as an HTTP/1.1 chunk: (events, (size line, frame, CRLF), their length), the
        three shared too, made once per shared read (a stream behind the edge sends them with one sendmsg, no
        join: watchstream.SocketWriter.deliver). No events: ([], (), 0)."""
        answer = self._next(watcher, max_events, max_bytes)
        if answer is None or not answer[0]:
            return [], _NO_CHUNK, 0
        chunk = answer[4]
        if chunk is None:
            frame = self._frame_of(answer)
            size_line = b"%x\r\n" % len(frame)
            chunk = answer[4] = ((size_line, frame, b"\r\n"), len(size_line) + len(frame) + 2)
        return answer[0], chunk[0], chunk[1]

    def next_poll(self, watcher: Watcher, max_events: int = MAX_EVENTS_PER_READ,
                  max_bytes: int = MAX_BYTES_PER_READ) -> tuple[list[Event], bytes]:
        """`next` and a long poll's body of its events (`poll_body`), shared like `next_sse`'s frame by every poll
        that made the same read: a hundred polls of one key answered by a 1 MB write hold one 6 MB body between
        them while their clients are slow to take it, not one each (review edge, L2). No events: ([], b"[]\n")."""
        answer = self._next(watcher, max_events, max_bytes)
        if answer is None or not answer[0]:
            return [], _NO_EVENTS_BODY
        body = answer[5]
        if body is None:
            body = answer[5] = self._count_shared(self.poll_body(answer[0]))
        return answer[0], body

    def _count_shared(self, made: bytes) -> bytes:
        """A frame or a poll body just made for the newest shared answer: it counts in shared_bytes (and held_bytes),
        and the oldest shared answers are forgotten past MAX_SHARED_BYTES."""
        self._answer_made = True
        self.shared_bytes += len(made)
        self.held_bytes += len(made)
        while self.shared_bytes > MAX_SHARED_BYTES and len(self._shared) > 1:
            self._forget_oldest_shared()
        return made

    def _frame_of(self, answer: list) -> bytes:
        """The SSE frame of a shared answer, made when first asked for."""
        frame = answer[3]
        if frame is None:  # the answer is the newest in _shared (_next put it there): its frame counts from here
            frame = answer[3] = self._count_shared(self.sse(answer[0]))
        return frame

    def _next(self, watcher: Watcher, max_events: int, max_bytes: int) -> list | None:
        """The shared answer [events, position, whole, frame or None, chunk or None, poll body or None] of the watcher's next read
        (None: nothing matching came since it last read to the end); its position and first_match move."""
        first_match = watcher.first_match
        watcher.woken.clear()  # on both paths: a wake left set from an earlier read would end every wait at once
        if first_match is None:  # nothing that matches came: all up to the applied index was looked at
            watcher.position = max(watcher.position, self.applied_index)
            return None
        scan_from = max(watcher.position, first_match - 1)
        watcher.first_match = None  # before the read: what arrives from here on marks it again
        if watcher.group is not None:
            watcher.group.all_marked = False
        wanted = watcher.wanted
        if scan_from < self.history_start:
            watcher.first_match = first_match
            raise Behind(scan_from, self.history_start)
        key = (wanted.key, wanted.prefix, scan_from, max_events, max_bytes)
        shared = self._shared
        answer: list | None
        if key == self._newest_key:  # a wake's watchers read alike: the most recently used stays where it is
            answer = self._newest_answer
            self.shared_reads += 1
        else:
            answer = shared.pop(key, None)
            if answer is None:
                answer = [*self._read(scan_from, wanted, max_events, max_bytes), None, None, None]
                self._answer_made = True  # the wake reads the clock after this delivery (CLOCK_EVERY)
                if len(shared) >= MAX_SHARED_ANSWERS:
                    self._forget_oldest_shared()
            else:
                self.shared_reads += 1
            shared[key] = answer  # the most recently used goes last: the oldest is forgotten first
            self._newest_key, self._newest_answer = key, answer
        position, whole = answer[1], answer[2]
        watcher.position = position
        if not whole:
            watcher.first_match = position + 1  # cut: the next read goes on from here
        return answer

    def _forget_oldest_shared(self) -> None:
        oldest = next(iter(self._shared))
        if oldest == self._newest_key:
            self._forget_newest()
        answer = self._shared.pop(oldest)
        for made in (answer[3], answer[5]):  # its frame, its poll body
            if made is not None:
                self.shared_bytes -= len(made)
                self.held_bytes -= len(made)

    def _drop_shared(self) -> None:
        """The history changed: no shared answer holds any more."""
        self._shared.clear()
        self._forget_newest()
        self.held_bytes -= self.shared_bytes
        self.shared_bytes = 0

    def _forget_newest(self) -> None:
        """The newest shared answer left _shared: no read takes it by the shortcut, and it is not held (its events
        and frame would stay referenced, outside held_bytes: review of fanout3, Q2)."""
        self._newest_key = None
        self._newest_answer = []

    def wait_for(self, watcher: Watcher, timeout_seconds: float,
                 also: gevent.event.Event | tuple[gevent.event.Event, ...] | None = None) -> None:
        """Block until a matching event (or a restore) may be there for `watcher`, `also` (or one of them) is set,
        or `timeout_seconds` passed."""
        if watcher.first_match is not None:
            return
        events = [watcher.woken]
        if also is not None:
            events += also if isinstance(also, tuple) else (also,)
        gevent.wait(events, timeout=timeout_seconds, count=1)

    # ---- positions --------------------------------------------------------------------------------------------

    def check(self, position: int) -> None:
        """Raise Behind unless a watch may start (or carry on) after `position`."""
        if position < self.history_start:
            raise Behind(position, self.history_start)

    def read(self, position: int, wanted: Filter, limit: int = MAX_EVENTS_PER_READ,
             max_bytes: int = MAX_BYTES_PER_READ) -> tuple[list[Event], int]:
        """(the events after `position` that `wanted` matches, whole index groups, about `limit` and `max_bytes`
        at most; the new position: the last index handed out when cut, else the applied index). Raises Behind."""
        events, position, _ = self._read(position, wanted, limit, max_bytes)
        return events, position

    def _read(self, position: int, wanted: Filter, limit: int, max_bytes: int) -> tuple[list[Event], int, bool]:
        self.check(position)
        events = self._events
        start = bisect.bisect_right(events, position, lo=self._head, key=_index_of)
        out: list[Event] = []
        size = 0
        matches = wanted.matches
        for i in range(start, len(events)):
            event = events[i]
            assert event is not None
            if out and (len(out) >= limit or size >= max_bytes) and event[3] != out[-1][3]:
                return out, out[-1][3], False  # cut between two groups: the next read starts at this one
            if matches(event):
                out.append(event)
                size += len(self._encoded(i))  # what goes out: JSON escapes make it up to 6x the raw bytes
        return out, max(position, self.applied_index), True  # every event up to the applied index was looked at

    def wait(self, position: int, timeout_seconds: float, also: gevent.event.Event | None = None) -> None:
        """Block until an event after `position` may be here (or a restore happened), `also` is set, or
        `timeout_seconds` passed. The caller reads again either way."""
        if self.last_index > position or position < self.history_start:
            return
        if self._wake is None:
            self._wake = gevent.event.Event()
        gevent.wait([self._wake] if also is None else [self._wake, also], timeout=timeout_seconds, count=1)

    # ---- encoding, once per event -----------------------------------------------------------------------------

    def _encoded(self, i: int) -> bytes:
        """The JSON of the held event at list position i, encoded once and counted in held_bytes (an event of
        control bytes is 6x larger as JSON: \\u0001 for \\x01)."""
        encoded = self._data[i]
        if encoded is None:
            encoded = self._data[i] = json.dumps(event_json(self._events[i])).encode()  # type: ignore[arg-type]
            self.encodings += 1
            self.held_bytes += len(encoded)
        return encoded

    def data_of(self, events: list[Event]) -> list[bytes]:
        """Each event's JSON (event_json), encoded once and shared by every watcher that reads it."""
        found = bisect.bisect_left(self._events, events[0][3], lo=self._head, key=_index_of) if events else 0
        out = []
        held = self._events
        for event in events:
            while found < len(held) and held[found] is not event:
                found += 1
            if found < len(held):
                encoded = self._encoded(found)
            else:  # evicted meanwhile (the caller holds it): encode it for this once
                encoded = json.dumps(event_json(event)).encode()
                self.encodings += 1
            out.append(encoded)
        return out

    def sse(self, events: list[Event]) -> bytes:
        """sse_frame with the shared encodings."""
        return sse_frame(events, self.data_of(events))

    def poll_body(self, events: list[Event]) -> bytes:
        return b"[" + b", ".join(self.data_of(events)) + b"]\n"


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


def sse_frame(events: list[Event], data: list[bytes] | None = None) -> bytes:
    """Server-sent events for `events` (whole index groups): `event:` and `data:` lines for each, and `id: <index>`
    before the last event of each index only (the module's rules: a Last-Event-ID names a whole group). `data`:
    each event's JSON when already encoded (WatchHub.sse)."""
    if data is None:
        data = [json.dumps(event_json(event)).encode() for event in events]
    parts = []
    last = len(events) - 1
    for i, event in enumerate(events):
        if i == last or events[i + 1][3] != event[3]:
            parts.append(b"id: %d\n" % event[3])
        parts.append(b"event: %s\ndata: %s\n\n" % (event[0].encode(), data[i]))
    return b"".join(parts)


def sse_error(error: str, status: int, oldest_index: int | None = None) -> bytes:
    """The stream's last event when it is ended: `status` is what a new watch here would be answered (410 when
    the watcher fell behind, with `oldest_index`; 410 or 503 when watches are refused: WatchHub.refusal). No id
    line, so the client resumes where it was: here it gets the answer that says why, elsewhere the events."""
    body: dict = {"error": error, "status": status}
    if oldest_index is not None:
        body["oldest_index"] = oldest_index
    return f"event: error\ndata: {json.dumps(body)}\n\n".encode()


def poll_json(events: Iterable[Event]) -> str:
    return json.dumps([event_json(e) for e in events])
