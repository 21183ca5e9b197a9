#!/usr/bin/env python
"""What the prefix index of raftlib.server.watch costs an applied entry, in one process: WatchHub.on_events of one
entry of E events (a prefix delete's 2,000 by default), with the watched prefixes held as main's old character trie
(one dict per character, kept here as it was) and as the radix trie that replaced it (review edge3, L1). Bench
only; asserts nothing.

    python bench/watch_prefix_cost.py --reps 5

The cases:
- long: one watcher of a 4,092-character prefix, the entry's keys 4,096 characters under it (the review's attack);
- chain: 450 watchers at distinct depths along that prefix (one every 9 characters), the same entry;
- fanout: 1,000 watchers of one short prefix (`fan/`), the entry's keys under it (bench/watch_fanout.py's case);
- short: 1,000 distinct short prefixes (`app/000/` to `app/999/`), the entry's keys spread over them.
Prints, for each case and index, the median over the repetitions of the whole on_events (ms) and of the index's
walk alone per event (us), and the old/new ratio of the walk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import gevent

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftlib.server.store import Event  # noqa: E402
from raftlib.server.watch import Filter, Watcher, WatchHub  # noqa: E402


class CharTrieHub(WatchHub):
    """main's index before the radix trie (at 8f03447): the watched prefixes as a trie of one dict per character
    (a node's "" holds the watchers of the prefix that ends there), walked along the key one character at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._char_trie: dict[str, Any] = {}

    def watch(self, position: int, wanted: Filter) -> Watcher:
        watcher = super().watch(position, wanted)
        if wanted.prefix is not None:
            node = self._char_trie
            for character in wanted.prefix:
                node = node.setdefault(character, {})
            node[""] = watcher.group
        return watcher

    def _match_prefixes(self, events: list[Event] | tuple[Event, ...]) -> None:
        for event in events:
            self._match_one(event[1], event[3])

    def _match_one(self, key: str, index: int) -> None:
        node = self._char_trie
        watchers = node.get("")
        if watchers:
            self._matched(watchers, index)
        for character in key:
            node = node.get(character)
            if node is None:
                break
            watchers = node.get("")
            if watchers:
                self._matched(watchers, index)


def case(name: str, events: int) -> tuple[list[str], list[str]]:
    """(the watched prefixes, the entry's keys)"""
    long_prefix = "p" * 4092
    if name == "long":
        return [long_prefix], [long_prefix + "%04d" % i for i in range(events)]
    if name == "chain":
        return ([long_prefix[:4092 - d * (4092 // 450)] for d in range(450)],
                [long_prefix + "%04d" % i for i in range(events)])
    if name == "fanout":
        return ["fan/"] * 1000, ["fan/%06d" % i for i in range(events)]
    assert name == "short"
    return ["app/%03d/" % i for i in range(1000)], ["app/%03d/key%d" % (i % 1000, i) for i in range(events)]


def measure(hub_class: type[WatchHub], prefixes: list[str], keys: list[str]) -> tuple[float, float]:
    """(on_events of the entry in seconds, the index's walk alone per event in seconds), each on a fresh hub whose
    watchers have read to the end (so the entry's first events mark them, as live)."""
    results = []
    for walk_only in (False, True):
        hub = hub_class()
        hub.on_events([Event("put", "x", b"", 1, 1)])
        watchers = [hub.watch(1, Filter(prefix=p)) for p in prefixes]
        for watcher in watchers:
            hub.next(watcher)
        events = [Event("delete", key, None, 2, 0) for key in keys]
        started = time.perf_counter()
        if walk_only:
            hub._match_prefixes(events)
            results.append((time.perf_counter() - started) / len(keys))
        else:
            hub.on_events(events)
            results.append(time.perf_counter() - started)
        gevent.sleep(0)  # run the queued wake
        for watcher in watchers:
            hub.unwatch(watcher)
    return results[0], results[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--events", type=int, default=2000, help="events of the one entry (a prefix delete: 2,000)")
    p.add_argument("--cases", default="long,chain,fanout,short")
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.events} events in one entry, median of {args.reps}")
    for name in args.cases.split(","):
        prefixes, keys = case(name, args.events)
        rows = {}
        for label, hub_class in (("char trie (old)", CharTrieHub), ("radix trie (new)", WatchHub)):
            runs = [measure(hub_class, prefixes, keys) for _ in range(args.reps)]
            rows[label] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"{name:7} {label:17} on_events {rows[label][0] * 1e3:8.2f} ms   walk {rows[label][1] * 1e6:8.2f} us"
                  f" per event", flush=True)
        old, new = rows["char trie (old)"][1], rows["radix trie (new)"][1]
        print(f"{name:7} walk old/new {old / new:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
