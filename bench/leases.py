#!/usr/bin/env python
"""The lease bench: the leader's CPU while N leases are kept alive at TTL/3, and the rate of a mass expiry.

    python bench/leases.py                     # 3 local nodes, 10,000 leases of 60 s, 20 s per phase
    python bench/leases.py -n 1000 --ttl 15 -d 10

Phases, on one local cluster (bench/load.py's Raftdzmq): grant N leases; `idle` (no keepalives); `single` (every
lease gets POST /lease/ID/keepalive once every TTL/3, spread evenly, from --threads client threads); `batched`
(POST /lease/keepalive with --batch ids a request, every lease once every TTL/3); then the keepalives stop and
every lease expires (`expiry`: from the first lease gone to the last, by GET /metrics' raftdzmq_leases). For each
phase: the leader's CPU (utime + stime from /proc/PID/stat) per second of the phase, the keepalives answered and
failed, and the client's own CPU (it shares the machine). Rules: nothing here is asserted; every process it starts
is stopped by pid; its data dirs are in a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load import Raftdzmq, get, wait_until  # noqa: E402

MAX_KEEPALIVE_IDS = 1_000  # raftlib.server.routes_leases': ids in one POST /lease/keepalive

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (/proc/PID/stat fields 14 and 15, after the command's parenthesis)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def leader_of(cluster: Raftdzmq) -> tuple[int, int]:
    """(http port, pid) of the node that leads now."""
    for port, proc in zip(cluster.http_ports, cluster.procs):
        try:
            if json.loads(get(f"http://127.0.0.1:{port}/status"))["role"] == "leader":
                return port, proc.pid
        except OSError:
            continue
    raise SystemExit("bench: no leader")


def lease_count(port: int) -> int:
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    match = re.search(r"^raftdzmq_leases (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else -1


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = self.failed = 0

    def add(self, ok: int, failed: int) -> None:
        with self.lock:
            self.ok += ok
            self.failed += failed


def grant(port: int, n: int, ttl: int, threads: int) -> list[str]:
    ids: list[str] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(count):
            conn.request("POST", f"/lease?ttl={ttl}")
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise SystemExit(f"bench: grant answered {r.status}: {body!r}")
            with lock:
                ids.append(json.loads(body)["id"])
        conn.close()

    ts = [threading.Thread(target=worker, args=(n // threads + (i < n % threads),)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return ids


def keep_alive(port: int, ids: list[str], period_seconds: float, seconds: float, threads: int, batch: int,
               counts: Counts) -> None:
    """Every id once every `period_seconds`, for `seconds`: one request per id (batch 0) or per `batch` ids, the
    requests of a period spread evenly over it, from `threads` threads."""
    if batch:
        requests = [("/lease/keepalive", json.dumps(ids[i:i + batch]).encode()) for i in range(0, len(ids), batch)]
    else:
        requests = [(f"/lease/{i}/keepalive", b"") for i in ids]
    start = time.monotonic()
    end = start + seconds

    def worker(k: int) -> None:
        mine = requests[k::threads]
        if not mine:
            return
        gap = period_seconds / len(mine)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n = 0
        while True:
            due = start + n * gap + k * gap / threads
            if due >= end:
                break
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            path, body = mine[n % len(mine)]
            n += 1
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                answer = r.read()
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                counts.add(0, len(json.loads(body)) if batch else 1)
                continue
            if r.status != 200:
                counts.add(0, len(json.loads(body)) if batch else 1)
            elif batch:
                kept = sum("ttl" in a for a in json.loads(answer)["leases"])
                counts.add(kept, len(json.loads(body)) - kept)
            else:
                counts.add(1, 0)
        conn.close()

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    time.sleep(max(0.0, end - time.monotonic()))  # the phase lasts `seconds`, whatever the last request's time


def phase(name: str, pid: int, seconds: float, run) -> dict:
    counts = Counts()
    cpu0, own0, t0 = cpu_seconds(pid), own_cpu_seconds(), time.monotonic()
    if run is None:
        time.sleep(seconds)
    else:
        run(counts)
    wall = time.monotonic() - t0
    result = {"phase": name, "seconds": round(wall, 1),
              "leader_cpu_per_second": round((cpu_seconds(pid) - cpu0) / wall, 3),
              "keepalives_ok_per_second": round(counts.ok / wall, 1), "keepalives_failed": counts.failed,
              "client_cpu_per_second": round((own_cpu_seconds() - own0) / wall, 3)}
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--leases", type=int, default=10_000)
    ap.add_argument("--ttl", type=int, default=60, help="the leases' TTL in seconds (keepalives every TTL/3)")
    ap.add_argument("-d", "--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--threads", type=int, default=8, help="client threads")
    ap.add_argument("--batch", type=int, default=1000, help="ids per batched keepalive")
    ap.add_argument("--phases", nargs="+", default=["idle", "single", "batched", "expiry"])
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="raftdzmq-bench-leases-")
    cluster = None
    try:
        cluster = Raftdzmq(workdir, 3, [])
        wait_until(lambda: (json.loads(get(cluster.url + "/status")).get("cluster_feature_level") or 1) >= 2, 20,
                   "the cluster's feature level 2")
        port, pid = leader_of(cluster)
        t0 = time.monotonic()
        ids = grant(port, args.leases, args.ttl, args.threads)
        print(json.dumps({"granted": len(ids), "seconds": round(time.monotonic() - t0, 1), "ttl": args.ttl,
                          "leader_pid": pid}), flush=True)
        period = args.ttl / 3
        for name in args.phases:
            if leader_of(cluster)[1] != pid:
                print("bench: the leadership moved; figures after this are not comparable", file=sys.stderr)
            if name == "idle":
                phase("idle", pid, args.duration, None)
            elif name == "single":
                phase("single", pid, args.duration,
                      lambda c: keep_alive(port, ids, period, args.duration, args.threads, 0, c))
            elif name == "batched":
                phase("batched", pid, args.duration,
                      lambda c: keep_alive(port, ids, period, args.duration, args.threads, args.batch, c))
            elif name == "expiry":
                # Every lease kept alive by one request (or as few as MAX_KEEPALIVE_IDS allows), so that their
                # deadlines fall together: then no keepalive, and every lease expires at once (a mass expiry).
                for i in range(0, len(ids), MAX_KEEPALIVE_IDS):
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    conn.request("POST", "/lease/keepalive", body=json.dumps(ids[i:i + MAX_KEEPALIVE_IDS]).encode())
                    assert conn.getresponse().status == 200
                    conn.close()
                cpu0, started, first_gone = cpu_seconds(pid), time.monotonic(), None
                while time.monotonic() < started + args.ttl + 120:
                    left = lease_count(port)
                    if first_gone is None and 0 <= left < len(ids):
                        first_gone, cpu0 = time.monotonic(), cpu_seconds(pid)
                    if left == 0:
                        break
                    time.sleep(0.01)
                done = time.monotonic()
                span = done - (first_gone or done)
                print(json.dumps({"phase": "expiry", "leases": len(ids), "first_to_last_seconds": round(span, 2),
                                  "leases_per_second": round(len(ids) / span) if span else None,
                                  "leader_cpu_per_second": round((cpu_seconds(pid) - cpu0) / span, 3)
                                  if span else None, "left": lease_count(port)}), flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
