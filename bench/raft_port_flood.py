#!/usr/bin/env python
"""A flood of frames on the leader's Raft port of a real 3-node cluster, as an attacker or a runaway peer drives
it: whether the leader keeps its term, how its writes fare meanwhile, and how late its timers run.

    python bench/raft_port_flood.py                                       # this checkout: junk, 24 DEALERs x 50
    python bench/raft_port_flood.py --kind ghost --pipeline 0             # a non-member's frames from 24 REQs
    python bench/raft_port_flood.py --repeat 3 --vs-build /tmp/main       # and another build, alternating

Each run: a fresh 3-node cluster of --build's raftdzmq.py (the nodes' hub-lag probe at 1 ms:
RAFTDZMQ_LOOP_LAG_PROBE_SECONDS=0.001), then for --seconds a flooder process (FLOODER) keeps --senders
connections to the leader's Raft port, each with --pipeline frames queued (DEALER sockets; 0: REQ sockets, one
frame out each), sending the next as each is answered: --kind junk (CBOR that is no batch) or ghost (a well-formed,
stale-term message from a node that is no member). Meanwhile a client writes to the leader every 50 ms (each
write bounded by 5 s). Reported per run: the term kept or moved (any term or leader change seen on any node), writes
answered / tried, the median and the slowest write, the leader's hub-lag probe maximum
(raftdzmq_loop_lag_seconds_max), and the frames the flooder had answered. With --vs-build DIR the runs alternate
between --build and DIR, --repeat runs each, and each build's medians follow. The load average is printed with
every run: the machine is shared, so compare builds only within one run of this script. Measures; asserts nothing.
Every process is stopped by its pid; the data dirs live in one temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from procs import LocalCluster, Node  # noqa: E402

# The flooder, in a process of its own (also tests/test_raft_port_flood.py's). Arguments: the checkout whose codec
# encodes a ghost's frame, port, the leader's node id, kind (junk or ghost), senders, pipeline (frames each keeps
# queued, on DEALER sockets; 0: REQ sockets, one out each), seconds. Prints the frames answered.
FLOODER = r"""
import sys, time, zmq
sys.path.insert(0, sys.argv[1])
from raftlib import codec
from raftlib.messages import RequestVoteReply
port, dst, kind = int(sys.argv[2]), sys.argv[3], sys.argv[4]
senders, pipeline, seconds = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
# junk: CBOR that is no batch; ghost: a well-formed, stale-term message from a node that is no member.
frame = (b"\x82\x63junk" * 8 if kind == "junk"
         else codec.encode_batch([RequestVoteReply("ghost", dst, 0, False)]))
# A REP socket takes a DEALER's frames after an empty delimiter, as a REQ's; a REQ has one out at a time.
parts = [b"", frame] if pipeline else [frame]
ctx = zmq.Context()
poller = zmq.Poller()
sockets = []
for _ in range(senders):
    s = ctx.socket(zmq.DEALER if pipeline else zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    poller.register(s, zmq.POLLIN)
    sockets.append(s)
    for _ in range(max(pipeline, 1)):
        s.send_multipart(parts)
answered = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s, _ in poller.poll(100):
        s.recv_multipart()
        answered += 1
        s.send_multipart(parts)  # the next, so that each connection keeps `pipeline` queued
for s in sockets:
    s.close(linger=0)
ctx.term()
print(answered)
"""

WRITE_TIMEOUT_SECONDS = 5.0
WRITE_EVERY_SECONDS = 0.05


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def flood_once(build: str, workdir: str, args: argparse.Namespace) -> dict:
    """One run on a fresh cluster of `build`'s raftdzmq.py: what the leader and its writes did under the flood."""
    base = tempfile.mkdtemp(dir=workdir)
    server = os.path.join(build, "raftdzmq.py")
    cluster = LocalCluster(base, nodes=[Node(f"node.{i}", base, server=server) for i in (1, 2, 3)]).start()
    try:
        leader = cluster.leader()
        st = leader.status()
        term, leader_id = st["term"], st["node_id"]
        seen = {(term, leader_id)}
        flooder = subprocess.Popen([sys.executable, "-c", FLOODER, build, str(leader.port), leader_id, args.kind,
                                    str(args.senders), str(args.pipeline), str(args.seconds)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        latencies: list[float] = []
        tried = 0
        try:
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                t0 = time.monotonic()
                tried += 1
                try:
                    if leader.request("POST", "/db/flood", str(tried), timeout=WRITE_TIMEOUT_SECONDS).status == 200:
                        latencies.append(time.monotonic() - t0)
                except OSError:
                    pass
                for node in cluster.running():
                    try:
                        s = node.status()
                        seen.add((s["term"], s.get("leader")))
                    except (OSError, ValueError):
                        pass
                time.sleep(WRITE_EVERY_SECONDS)
            out, err = flooder.communicate(timeout=args.seconds + 30)
        finally:
            if flooder.poll() is None:
                flooder.kill()
                flooder.wait(timeout=10)
        lag_max = metric(leader.request("GET", "/metrics").text, "raftdzmq_loop_lag_seconds_max")
        after = leader.status()
        moved = after["term"] != term or after["role"] != "leader" or len(seen) > 1
        return {"term": "moved" if moved else "kept", "ok": len(latencies), "tried": tried,
                "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
                "max_ms": max(latencies) * 1000 if latencies else None,
                "lag_max_ms": lag_max * 1000 if lag_max is not None else None,
                "answered": int(out) if flooder.returncode == 0 and out.strip() else f"flooder failed: {err[-200:]}"}
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--build", default=ROOT, help="the tree whose raftdzmq.py the nodes run (default: this one)")
    p.add_argument("--vs-build", help="another tree: the runs alternate between --build and this one")
    p.add_argument("--kind", choices=["junk", "ghost"], default="junk", help="what the flood sends (default junk)")
    p.add_argument("--senders", type=int, default=24, help="connections to the leader's Raft port (default 24)")
    p.add_argument("--pipeline", type=int, default=50,
                   help="frames each connection keeps queued, on a DEALER; 0: REQ sockets, one out (default 50)")
    p.add_argument("--seconds", type=float, default=8.0, help="how long the flood lasts (default 8)")
    p.add_argument("--repeat", type=int, default=1, help="runs per build (default 1)")
    args = p.parse_args()
    builds = [os.path.abspath(args.build)] + ([os.path.abspath(args.vs_build)] if args.vs_build else [])
    os.environ["RAFTDZMQ_LOOP_LAG_PROBE_SECONDS"] = "0.001"  # the nodes inherit it
    sockets = f"{args.senders} {'DEALER x ' + str(args.pipeline) + ' queued' if args.pipeline else 'REQ'}"
    print(f"flood: {args.kind} from {sockets}, {args.seconds:g} s, a write every {WRITE_EVERY_SECONDS * 1000:.0f} ms;"
          f" load {load_average()}", flush=True)
    print(f"{'build':40} {'term':6} {'writes ok':>10} {'p50 ms':>7} {'max ms':>7} {'probe max ms':>12} {'answered':>9}"
          "  load", flush=True)
    runs: dict[str, list[dict]] = {build: [] for build in builds}
    workdir = tempfile.mkdtemp(prefix="raft-port-flood-")
    try:
        for _ in range(args.repeat):
            for build in builds:
                r = flood_once(build, workdir, args)
                runs[build].append(r)
                print(f"{build:40} {r['term']:6} {str(r['ok']) + '/' + str(r['tried']):>10} {ms(r['p50_ms']):>7} "
                      f"{ms(r['max_ms']):>7} {ms(r['lag_max_ms']):>12} {r['answered']!s:>9}  {load_average()}",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.repeat > 1 or len(builds) > 1:
        for build, rs in runs.items():
            def median(key: str, rs: list[dict] = rs) -> float | None:
                values = [r[key] for r in rs if isinstance(r[key], (int, float))]
                return statistics.median(values) if values else None

            kept = sum(r["term"] == "kept" for r in rs)
            print(f"{build}: term kept {kept}/{len(rs)}; medians: writes ok {ms(median('ok'))}, max write "
                  f"{ms(median('max_ms'))} ms, probe max {ms(median('lag_max_ms'))} ms, answered {ms(median('answered'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
