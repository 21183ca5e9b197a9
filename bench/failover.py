#!/usr/bin/env python
"""Failover after a killed leader (issue 13, timeouts): how long a 3-node cluster goes without a leader, and
without an acknowledged write, when its leader is SIGKILLed, for each -election-ms given.

    python bench/failover.py                                  # the default election timeout (1,000 ms), 5 tries
    python bench/failover.py --election-ms 300 default --tries 5   # and 300 ms, alternating try by try

For each setting, a 3-node cluster of this checkout (-forward off, one data dir each, in a temporary folder removed
at the end). Each try: a write to the leader, every follower caught up to its commit index, a quiet second; then
SIGKILL the leader and poll the two others' GET /status every 10 ms: "elected" is the first moment one of them
says it leads in a newer term, "written" the first 200 of a write sent to it (tried every 10 ms). The killed node
is started again on its data dir and caught up before the next try (so each try kills a leader of 3 live nodes).
The settings alternate try by try, and the medians are printed with the load average at the start and end: the
machine is shared, so compare settings only within one run. Every wait has a bound; every process started is
stopped by its pid. Speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from load import free_port  # noqa: E402

POLL_SECONDS = 0.01
FAILOVER_BOUND_SECONDS = 30.0  # a try that finds no new leader (and no write) in this long is reported "timeout"


def request(method: str, port: int, path: str, body: bytes | None = None, timeout: float = 0.5) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def status(port: int) -> dict | None:
    try:
        code, body = request("GET", port, "/status")
    except OSError:
        return None
    return json.loads(body) if code == 200 else None


def wait_until(predicate, bound: float, what: str):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"failover: timed out after {bound:g}s waiting for {what}")


class Cluster:
    """3 nodes of this checkout started one by one (the others join the first), with `flags`."""

    def __init__(self, workdir: str, flags: list[str]) -> None:
        self.workdir, self.flags = workdir, flags
        self.ports = [(free_port(), free_port()) for _ in range(3)]
        self.procs: list[subprocess.Popen | None] = [None, None, None]
        try:
            for i in range(3):
                self.start(i, join=None if i == 0 else self.ports[0][1])
                wait_until(lambda i=i: self.voters() == i + 1, 60, f"node {i} to be a voter")
        except BaseException:
            self.stop()
            raise

    def start(self, i: int, join: int | None = None) -> None:
        raft_port, http_port = self.ports[i]
        args = [sys.executable, os.path.join(ROOT, "raftdzmq.py"), "-p", str(raft_port), "-hp", str(http_port),
                "-h", "127.0.0.1", *self.flags]
        if join is not None:
            args += ["-join", f"127.0.0.1:{join}"]
        with open(os.path.join(self.workdir, f"n{i}.log"), "ab") as log:
            self.procs[i] = subprocess.Popen(args + [os.path.join(self.workdir, f"n{i}")], stdout=log,
                                             stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(lambda: status(http_port) is not None, 60, f"node {i} to serve HTTP")

    def leader(self) -> tuple[int, dict] | None:
        for i, (_, http_port) in enumerate(self.ports):
            st = status(http_port) if self.alive(i) else None
            if st and st["role"] == "leader":
                return i, st
        return None

    def voters(self) -> int:
        found = self.leader()
        return sum(m["role"] == "voter" for m in found[1]["members"]) if found else 0

    def alive(self, i: int) -> bool:
        p = self.procs[i]
        return p is not None and p.poll() is None

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=15)

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def caught_up(self) -> bool:
        found = self.leader()
        if found is None:
            return False
        commit = found[1]["commit_index"]
        states = [status(self.ports[i][1]) for i in range(3)]
        return all(st is not None and st["applied_index"] >= commit and st["leader"] == found[1]["node_id"]
                   for st in states)

    def one_try(self, n: int) -> dict:
        """Kill the leader, time the election and the first write after it, start the killed node again."""
        victim, st = wait_until(self.leader, 30, "a leader")
        code, _ = request("POST", self.ports[victim][1], f"/db/failover-{n}", b"before", timeout=5)
        if code != 200:
            raise SystemExit(f"failover: the leader answered a write {code}")
        wait_until(self.caught_up, 30, "the followers to catch up")
        time.sleep(1.0)
        term = st["term"]
        others = [i for i in range(3) if i != victim]
        self.kill(victim)
        killed = time.monotonic()
        elected = written = None
        new = None
        while time.monotonic() - killed < FAILOVER_BOUND_SECONDS:
            if new is None:
                for i in others:
                    s = status(self.ports[i][1])
                    if s and s["role"] == "leader" and s["term"] > term:
                        new, elected = i, time.monotonic() - killed
                        break
            if new is not None:
                try:
                    code, _ = request("POST", self.ports[new][1], f"/db/failover-{n}", b"after")
                except OSError:
                    code = 0
                if code == 200:
                    written = time.monotonic() - killed
                    break
            time.sleep(POLL_SECONDS)
        self.start(victim)
        wait_until(self.caught_up, 60, "the restarted node to catch up")
        return {"elected": elected, "written": written}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--election-ms", nargs="+", default=["default"], metavar="MS",
                   help="the -election-ms of each cluster; 'default': none given (default: default)")
    p.add_argument("--tries", type=int, default=5, help="leaders killed per setting (default 5)")
    args = p.parse_args()
    workdir = tempfile.mkdtemp(prefix="failover-")
    clusters: dict[str, Cluster] = {}
    results: dict[str, list[dict]] = {setting: [] for setting in args.election_ms}
    try:
        for setting in args.election_ms:
            folder = os.path.join(workdir, setting)
            os.makedirs(folder)
            clusters[setting] = Cluster(folder, [] if setting == "default" else ["-election-ms", setting])
        print(f"failover: load average {loadavg()} at the start", flush=True)
        for n in range(args.tries):
            for setting in args.election_ms:
                r = clusters[setting].one_try(n)
                results[setting].append(r)
                shown = {k: "timeout" if v is None else f"{v:.2f}s" for k, v in r.items()}
                print(f"failover: -election-ms {setting}, try {n + 1}: elected {shown['elected']}, written "
                      f"{shown['written']} (load {loadavg()})", flush=True)
        print(f"failover: load average {loadavg()} at the end")
        for setting, rs in results.items():
            line = []
            for what in ("elected", "written"):
                times = sorted(r[what] for r in rs if r[what] is not None)
                missing = len(rs) - len(times)
                line.append(f"{what} median {statistics.median(times):.2f}s (min {times[0]:.2f}, max {times[-1]:.2f})"
                            if times else f"{what}: none")
                if missing:
                    line.append(f"{missing} timeout(s)")
            print(f"failover: -election-ms {setting}, {len(rs)} tries: " + "; ".join(line))
    finally:
        for cluster in clusters.values():
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
