#!/usr/bin/env python
"""CPU of the HTTP edge's budget of unsent answers (EdgeServer.hold), in process, this build against another
checkout (bench only; asserts nothing): with N connections holding an answer each (loopback TCP sockets, their
kernel queues empty; the answers views of one buffer, 1 MiB each, so nothing is copied),
- hold_release: one more connection holds a 64 KiB answer and lets it go, within the budget (the slow path's cost
  at every send that could not finish);
- cut: one more connection holds 1 MiB past the budget, so one holder is cut (the victim chosen; counting, logging
  and shutting its socket left out, so the next round's holder is the one cut);
- cut_half: then one hold of N/2 MiB, which cuts about half the holders in one call (once a run: the median of the
  rounds is of single calls).
Each build runs in its own interpreter (gevent patched first, as raftdzmq.py does), the builds alternating A B B A;
CPU is the thread's (time.thread_time), the best and the median of the rounds.

    python bench/unsent_budget_cost.py --build /tmp/old          # this checkout against /tmp/old (git archive)

On a shared machine the other processes still slow these loops down: compare the builds within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
from gevent import monkey
monkey.patch_all()
import json, resource, socket, sys, time
sys.path.insert(0, sys.argv[1])
from raftlib.server.edge import EdgeServer, listen

holders = int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
MIB = 1 << 20
buffer = bytearray((holders + 2) * MIB)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(holders + 2)


class Handler:  # what the budget asks of a connection's EdgeHandler
    took_bytes_at = None

    def __init__(self, sock, client_address):
        self.socket, self.client_address = sock, client_address


clients, handlers = [], []
for i in range(holders + 2):
    clients.append(socket.create_connection(listener.getsockname()))
    server_side, address = listener.accept()
    handlers.append(Handler(server_side, address))
server = EdgeServer(listen("127.0.0.1", 0), None, max_connections=holders + 10, idle_timeout_seconds=60,
                    receive_timeout_seconds=60, busy_timeout_seconds=60, max_header_bytes=8192, max_body_bytes=1024,
                    max_unsent_bytes=holders * MIB + MIB // 2)
views = {}  # what each holds, or held when it was last cut
for i in range(holders + 2):
    views[id(handlers[i])] = memoryview(buffer)[i * MIB:(i + 1) * MIB]
for i in range(holders):
    server.hold(handlers[i], (views[id(handlers[i])],))


def per_call_microseconds(step, calls):
    started = time.thread_time()
    for _ in range(calls):
        step()
    return (time.thread_time() - started) / calls * 1e6


small = memoryview(buffer)[holders * MIB:holders * MIB + 65536]
spare = handlers[holders]


def hold_release():
    server.hold(spare, (small,))
    server.release(spare)


next_holder = [handlers[holders + 1]]


def cut():
    handler = next_holder[0]
    server.hold(handler, (views[id(handler)],))
    next_holder[0] = victims[-1]  # the one cut holds again next round


victims = []  # the holders cut, newest last (the log's rate limit, the sockets' shutdown left out: both builds')
server._evict = lambda handlers, handler, reason: (victims.append(handler), handlers.pop(handler, None))


calls = max(200, 200_000 // holders)
result = {"hold_release": per_call_microseconds(hold_release, calls), "cut": per_call_microseconds(cut, calls)}
# Last (it cuts half the holders): one hold of holders / 2 MiB, so one call cuts about half of them.
victims.clear()
many = memoryview(buffer)[:max(1, holders // 2) * MIB]
result["cut_half"] = per_call_microseconds(lambda: server.hold(handlers[holders], (many,)), 1)
result["cut_half_count"] = len(victims)
print(json.dumps(result))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", metavar="DIR", required=True, help="the other checkout (e.g. git archive main)")
    p.add_argument("--rounds", type=int, default=4, help="A B B A rounds (default 4)")
    p.add_argument("--holders", type=int, nargs="+", default=[10, 100, 1000], help="connections holding answers")
    args = p.parse_args()
    builds = {"this": ROOT, os.path.basename(args.build.rstrip("/")): args.build}
    print(f"load average {os.getloadavg()[0]:.1f}; us per call, best / median of {args.rounds}")
    for holders in args.holders:
        results: dict[str, list[dict]] = {name: [] for name in builds}
        for i in range(args.rounds):
            for name in (list(builds) if i % 2 == 0 else list(builds)[::-1]):
                out = subprocess.run([sys.executable, "-c", CHILD, builds[name], str(holders)], capture_output=True,
                                     text=True, timeout=300, check=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for step in ("hold_release", "cut", "cut_half"):
            row = [f"{name} {min(r[step] for r in runs):7.2f} / {statistics.median(r[step] for r in runs):7.2f}"
                   for name, runs in results.items()]
            print(f"{holders:>5} holders {step:<13} " + "   ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
