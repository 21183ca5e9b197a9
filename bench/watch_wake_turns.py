#!/usr/bin/env python
"""How long one turn of the watch wake (WatchHub._wake_some) runs against its budget (WAKE_TURN_SECONDS) when
every delivery makes a new shared answer, none shared (review of fanout3, L1): W watchers of W distinct prefixes
that all match one drive of E events of V bytes, so each delivery scans, encodes the frame (about E x V bytes)
and builds its chunk; the deliver is a stand-in for a stream's send that takes every byte. The events' JSON is
encoded once before the wake, as the first reader's cost, so the turns measure the per-answer work. Wall time:
run old and new builds alternately and record the load. Bench only; asserts nothing.

    python bench/watch_wake_turns.py -W 40 -E 700 -V 1100
    python bench/watch_wake_turns.py --build /work/main ...   # the raftlib of another tree

Prints each turn's milliseconds and deliveries, and their median.
"""

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-W", type=int, default=40, help="watchers, each of its own prefix")
    p.add_argument("-E", type=int, default=700, help="events in the drive")
    p.add_argument("-V", type=int, default=1100, help="bytes of each event's value")
    p.add_argument("--build", help="import raftlib from this tree (default: this one)")
    args = p.parse_args()
    sys.path.insert(0, os.path.abspath(args.build) if args.build else
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gevent

    from raftlib.server.store import Event
    from raftlib.server.watch import WAKE_TURN_SECONDS, Filter, WatchHub

    hub = WatchHub(history_events=max(100_000, args.E), history_bytes=1 << 30)
    turns: list[list[float]] = []  # [seconds, deliveries]

    def deliver(watcher, now: float) -> bool:
        hub.next_chunk(watcher)
        turns[-1][1] += 1
        return watcher.first_match is None

    for i in range(args.W):
        watcher = hub.watch(0, Filter(prefix="k" + "x" * i))
        hub.next(watcher)
        watcher.deliver = deliver
    wake = hub._wake_some

    def timed_wake() -> None:
        turns.append([time.perf_counter(), 0])
        wake()
        turns[-1][0] = time.perf_counter() - turns[-1][0]

    hub._wake_some = timed_wake  # type: ignore[method-assign]
    events = [Event("put", "k" + "x" * args.W + str(i), b"v" * args.V, i, 0) for i in range(1, args.E + 1)]
    hub.on_events(events)
    hub.applied(args.E)
    hub.data_of(events)
    for _ in range(10_000):  # until the wake's turns are done: a bound in turns of the loop
        gevent.sleep(0.001)
        if not hub._waking:
            break
    print(f"raftlib from {sys.path[0]}; load {os.getloadavg()}; budget {WAKE_TURN_SECONDS * 1000:g} ms")
    print("turns (ms, deliveries):", [(round(seconds * 1000, 2), int(n)) for seconds, n in turns])
    print(f"median turn {statistics.median(seconds for seconds, _ in turns) * 1000:.2f} ms, "
          f"max {max(seconds for seconds, _ in turns) * 1000:.2f} ms, {len(turns)} turns")


if __name__ == "__main__":
    main()
