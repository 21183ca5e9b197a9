#!/usr/bin/env python
"""What gevent's thread pool would free of the event loop during a follower's fdatasync, and what the hand-off
costs it (issue 14, fan-out: the follower's inline fdatasync holds the hub ~7% of the time while it serves 1,000
watch streams). In one process: appends of B bytes to a file, each followed by an fdatasync, inline
(os.fdatasync, as node.py's _timed_fdatasync) or through the hub's thread pool (threadpool.apply), alternating
in rounds, while a busy greenlet does 20 us slices of work (a watch wake, say) whenever the loop lets it. For each:
a save's time as the saving greenlet sees it (what delays the append's reply), the wall time per save in all, and
the other greenlet's work per save (the loop's time the save left to others). Bench only; asserts nothing.

    python bench/fsync_handoff.py --saves 500 --rounds 6 --bytes 4096
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saves", type=int, default=500)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--bytes", type=int, default=4096, help="bytes appended before each fdatasync")
    args = p.parse_args()
    pool = gevent.get_hub().threadpool
    record = os.urandom(args.bytes)
    slices = [0]
    running = True

    def busy() -> None:  # other work the loop could do meanwhile (a watch wake, say), 20 us at a time
        while running:
            end = time.perf_counter() + 20e-6
            while time.perf_counter() < end:
                pass
            slices[0] += 1
            gevent.sleep(1e-6)  # the next turn of the loop, after its I/O (sleep(0) would not let the pool's answer in)

    results: dict[str, list[tuple[float, float, float]]] = {"inline": [], "pool": []}
    with tempfile.TemporaryDirectory() as folder:
        fd = os.open(os.path.join(folder, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        worker = gevent.spawn(busy)
        try:
            for _ in range(args.rounds):
                for mode in ("inline", "pool"):
                    walls = []
                    started_round, slices_before = time.perf_counter(), slices[0]
                    for _ in range(args.saves):
                        os.write(fd, record)
                        started = time.perf_counter()
                        if mode == "inline":
                            os.fdatasync(fd)
                        else:
                            pool.apply(os.fdatasync, (fd,))
                        walls.append(time.perf_counter() - started)
                        gevent.sleep(1e-6)  # the rest of a drive: the loop turns
                    elapsed = time.perf_counter() - started_round
                    results[mode].append((statistics.median(walls) * 1e6, elapsed / args.saves * 1e6,
                                          (slices[0] - slices_before) * 20 / args.saves))
        finally:
            running = False
            worker.join(timeout=2)
            os.close(fd)
    print(f"load {os.getloadavg()}; {args.rounds} rounds of {args.saves} saves of {args.bytes} B, alternating; "
          "medians of the rounds")
    for mode, rows in results.items():
        saves, elapsed, work = (statistics.median(column) for column in zip(*rows))
        print(f"{mode:>6}: a save takes {saves:.0f} us as its greenlet sees it (p50); {elapsed:.0f} us of wall a save "
              f"in all, of which the other greenlet's work {work:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
