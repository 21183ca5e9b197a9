#!/usr/bin/env python
"""CPU per write of two steps of the HTTP path, in process, this build against another checkout (bench only; asserts
nothing): the cross-site check of a POST that has no Origin (api.cross_site_refusal, with Bottle's request bound
to a fresh environ as Bottle binds it) and the sending of a write's answer over loopback TCP
(EdgeHandler._sendall: one gevent socket, TCP_NODELAY, a reader draining every 100 answers). Each build runs in
its own interpreter (gevent patched first, as raftdzmq.py does), the builds alternating A B B A; CPU is the
thread's (time.thread_time), the best and the median of the rounds.

    python bench/write_edge_cost.py --build /tmp/old          # this checkout against /tmp/old (git archive)

On a shared machine the other processes still slow these loops down (caches, the scheduler): compare the builds
within one run only.
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
import json, socket, sys, time, types
sys.path.insert(0, sys.argv[1])
import bottle
from raftlib.server.api import cross_site_refusal
from raftlib.server.edge import EdgeHandler

ENVIRON = {"REQUEST_METHOD": "POST", "PATH_INFO": "/db/k1", "HTTP_HOST": "127.0.0.1:8080", "CONTENT_LENGTH": "100",
           "QUERY_STRING": ""}
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=UTF-8\r\nX-Raft-Index: 123456\r\n"
          b"Content-Length: 0\r\nDate: Thu, 03 Dec 2026 21:00:00 GMT\r\n\r\n")


def per_call_microseconds(step, calls=20_000):
    started = time.thread_time()
    for _ in range(calls):
        step()
    return (time.thread_time() - started) / calls * 1e6


def bind():
    bottle.request.bind(dict(ENVIRON))


def bind_and_check():
    bottle.request.bind(dict(ENVIRON))
    cross_site_refusal(bottle.request)


listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
reader = socket.create_connection(listener.getsockname())
server_side, _ = listener.accept()
server_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
handler = types.SimpleNamespace(socket=server_side, code=200, status=b"200 OK", response_length=0)
reader.setblocking(False)
sent = 0


def send_answer():
    global sent
    EdgeHandler._sendall(handler, bytearray(ANSWER))
    sent += 1
    if sent % 100 == 0:
        try:
            while reader.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


print(json.dumps({"cross_site_check": per_call_microseconds(bind_and_check) - per_call_microseconds(bind),
                  "answer_send": per_call_microseconds(send_answer)}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", metavar="DIR", required=True, help="the other checkout (e.g. git archive main)")
    p.add_argument("--rounds", type=int, default=4, help="A B B A rounds (default 4)")
    args = p.parse_args()
    builds = {"this": ROOT, os.path.basename(args.build.rstrip("/")): args.build}
    results: dict[str, list[dict]] = {name: [] for name in builds}
    for i in range(args.rounds):
        for name in (list(builds) if i % 2 == 0 else list(builds)[::-1]):
            out = subprocess.run([sys.executable, "-c", CHILD, builds[name]], capture_output=True, text=True,
                                 timeout=300, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"load average {os.getloadavg()[0]:.1f}; us per write, best / median of {args.rounds}")
    for step in ("cross_site_check", "answer_send"):
        row = [f"{name} {min(r[step] for r in runs):5.2f} / {statistics.median(r[step] for r in runs):5.2f}"
               for name, runs in results.items()]
        print(f"{step:<17} " + "   ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
