#!/usr/bin/env python
"""The server side of a watch fan-out in one process, without HTTP: what a follower's event loop spends per watcher
woken and per event delivered (raftlib.server.watch's WatchHub with W watcher greenlets of one prefix, each
reading its shared SSE frame and writing it to a socket whose other end a reader thread-free greenlet drains),
while entries of E events are applied at a fixed rate. Bench only; asserts nothing.

    python bench/watch_wake_cost.py -W 1000 --rate 1000 -d 5

Prints the loop's CPU per second of run, wakes and deliveries per second, and microseconds of CPU per wake and
per delivery: the floor of the follower's cost in bench/watch_fanout.py (which adds HTTP chunking, the Raft
traffic and applying), and so how many deliveries a second one core carries.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raftlib.server.store import Event  # noqa: E402
from raftlib.server.watch import Filter, WatchHub  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-W", "--watchers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=1000.0, help="events a second (one entry each)")
    p.add_argument("-d", "--duration", type=float, default=5.0)
    p.add_argument("--value-size", type=int, default=100)
    args = p.parse_args()
    hub = WatchHub()
    delivered = [0]
    frames = [0]
    stop = False

    def watcher(sock: socket.socket) -> None:
        w = hub.watch(0, Filter(prefix="fan/"))
        while not stop:
            hub.wait_for(w, 1.0)
            events, frame = hub.next_sse(w)
            if events:
                sock.sendall(frame)
                delivered[0] += len(events)
                frames[0] += 1

    def drain(sock: socket.socket) -> None:
        while True:
            if not sock.recv(1 << 20):
                return

    pairs = [socket.socketpair() for _ in range(args.watchers)]
    workers = [gevent.spawn(watcher, a) for a, _ in pairs] + [gevent.spawn(drain, b) for _, b in pairs]
    gevent.sleep(0.1)
    value = b"v" * args.value_size
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < args.duration:
        index += 1
        hub.on_event(Event("put", f"fan/{index}", value, index, index))
        hub.applied(index)
        due = started + index / args.rate
        gevent.sleep(max(0.0, due - time.monotonic()))
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    stop = True
    gevent.sleep(1.5)  # every watcher leaves its wait (1 s) and sees `stop`
    gevent.killall(workers, timeout=2)
    for a, b in pairs:
        a.close()
        b.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{args.watchers} watchers, {index / wall:.0f} events/s for {wall:.1f} s: loop CPU {cpu / wall:.2f} cores "
          f"(user {(after.ru_utime - before.ru_utime) / wall:.2f}); {frames[0] / wall:,.0f} wakes/s, "
          f"{delivered[0] / wall:,.0f} deliveries/s ({delivered[0] / max(1, frames[0]):.1f} events a wake); "
          f"{cpu / max(1, frames[0]) * 1e6:.1f} us per wake, {cpu / max(1, delivered[0]) * 1e6:.2f} us per delivery; "
          f"shared reads {hub.shared_reads:,}, encodings {hub.encodings:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
