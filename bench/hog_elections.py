#!/usr/bin/env python
"""Leader changes under CPU starvation (issue 13): 3 nodes, --writers writer threads and N busy-loop hogs on the
machine's cores for --seconds; counts the leader changes from the nodes' logs and what caused each:

- check-quorum: the leader stepped down in its own term (it had not heard from a majority for an election
  timeout, thesis §6.2), and of those how many followed a "no reply ... reconnecting" of the leader's transport
  within --window seconds before (a reply the sender gave up on, and closed the socket it would have come on);
- election: the leader was deposed by a higher term (a follower's election after its pre-vote won; a leadership
  transfer would show the same way, and this bench asks for none);
- dropped replies: the transport's "no reply from PEER ... reconnecting" lines (the nodes run with -debug), and
  late replies: its "a late reply from PEER" lines (a reply taken past the reply timeout, where the build has it).

    python bench/hog_elections.py --hogs 4 6                                   # this checkout
    python bench/hog_elections.py --hogs 4 6 --repeat 3 --vs-build /tmp/main   # and another, alternating

Another build must be a checkout of its own (e.g. `git archive main | tar -x -C /tmp/main`): running one writes
its __pycache__. The load average at the end of each run is printed with it: the machine is shared, so compare
builds only within one run (alternating), as medians. Speed and stability are measured here, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402

NAMES = ("n1", "n2", "n3")
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \[[^\]]*\] raftlib\.\w+: (.*)$")
BECAME = re.compile(r"became leader in term (\d+)")
STEPPED = re.compile(r"stepped down in term (\d+)")
NO_REPLY = re.compile(r"no reply from (\S+) at ")
LATE_REPLY = re.compile(r"a late reply from (\S+), (\d+) ms after")


class Cluster(load.System):
    """3 named nodes of `build` with -debug (the transport's reconnects are debug lines), started one by one."""

    def __init__(self, build: str, workdir: str) -> None:
        super().__init__(workdir)
        self.logs: list[str] = []
        self.http_ports: list[int] = []
        try:
            for i, name in enumerate(NAMES):
                port, http_port = load.free_port(), load.free_port()
                args = [sys.executable, os.path.join(build, "raftdzmq.py"), "-p", str(port), "-hp", str(http_port),
                        "-h", "127.0.0.1", "-name", name, "-debug"]
                if i:
                    args += ["-join", f"127.0.0.1:{self.http_ports[0]}"]
                self.spawn(args + [os.path.join(workdir, name)], f"{name}.log", cwd=build)
                self.logs.append(os.path.join(workdir, f"{name}.log"))
                self.http_ports.append(http_port)
                load.wait_until(lambda: self._voters() == i + 1, 90, f"{name} to join")  # a shared, loaded machine
        except BaseException:
            self.stop()
            raise

    def _voters(self) -> int:
        """The voters the leader counts, whichever node leads (a loaded machine moves the leadership while the
        cluster forms); 0 while none does."""
        for port in self.http_ports:
            try:
                st = json.loads(load.get(f"http://127.0.0.1:{port}/status"))
            except OSError:
                continue
            if st["role"] == "leader":
                return sum(1 for m in st["members"] if m["role"] == "voter")
        return 0


def writer(ports: list[int], stop: threading.Event, counts: list[int], index: int) -> None:
    """POST /db/w<index>-<n> in a loop to whichever node leads (following 307s), each request bounded."""
    port, n = ports[index % len(ports)], 0
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("POST", f"/db/w{index}-{n % 1000}", b"x" * 100)
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                counts[index] += 1
                n += 1
            elif r.status == 307:
                port = int(r.getheader("Location").split("/")[2].rsplit(":", 1)[1])
            else:
                port = ports[(ports.index(port) + 1) % len(ports)] if port in ports else ports[0]
                stop.wait(0.05)
        except (OSError, http.client.HTTPException, ValueError, IndexError):
            port = ports[(ports.index(port) + 1) % len(ports)] if port in ports else ports[0]
            stop.wait(0.05)
        finally:
            conn.close()


def parse_log(path: str) -> list[tuple[float, str]]:
    lines = []
    with open(path, errors="replace") as f:
        for raw in f:
            m = LINE.match(raw)
            if m:
                stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                lines.append((stamp, m.group(2)))
    return lines


def causes(logs: list[str], start: float, end: float, window: float) -> dict:
    """Leader changes in [start, end] and their causes (the module's docstring), from the nodes' logs."""
    out = {"leader_changes": 0, "check_quorum": 0, "check_quorum_after_no_reply": 0, "deposed": 0,
           "deposed_after_no_reply": 0, "no_reply": 0, "late_reply": 0}
    for path in logs:
        led_term, no_replies = 0, []
        for stamp, text in parse_log(path):
            if m := BECAME.search(text):
                led_term = int(m.group(1))
                out["leader_changes"] += start <= stamp <= end
                continue
            if m := NO_REPLY.search(text):
                no_replies.append(stamp)
                out["no_reply"] += start <= stamp <= end
                continue
            if LATE_REPLY.search(text):
                out["late_reply"] += start <= stamp <= end
                continue
            m = STEPPED.search(text)
            if not m or not start <= stamp <= end:
                continue
            kind = "check_quorum" if int(m.group(1)) == led_term else "deposed"
            out[kind] += 1
            out[kind + "_after_no_reply"] += any(stamp - window <= t <= stamp for t in no_replies)
    return out


def run_once(build: str, hogs: int, seconds: float, writers: int, window: float) -> dict:
    workdir = tempfile.mkdtemp(prefix="hog_elections-")
    cluster, hog_procs, stop = None, [], threading.Event()
    threads = []
    try:
        cluster = Cluster(build, workdir)
        counts = [0] * writers
        threads = [threading.Thread(target=writer, args=(cluster.http_ports, stop, counts, i), daemon=True)
                   for i in range(writers)]
        for t in threads:
            t.start()
        time.sleep(2)  # the writers under way before the window opens
        hog_procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(hogs)]
        start = time.time()
        time.sleep(seconds)
        end = time.time()
        result = causes(cluster.logs, start, end, window)
        result.update(writes=sum(counts), load=os.getloadavg()[0], minutes=(end - start) / 60)
        return result
    finally:
        for p in hog_procs:
            p.kill()
            p.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hogs", type=int, nargs="+", default=[4, 6], help="busy-loop processes (each count is a run)")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--window", type=float, default=1.0, help="a step-down follows a dropped reply logged this many "
                   "seconds before it at most")
    p.add_argument("--vs-build", default=None, metavar="DIR", help="another checkout to alternate with")
    args = p.parse_args()
    builds = {"this": load.ROOT} | ({os.path.basename(args.vs_build.rstrip("/")): os.path.abspath(args.vs_build)}
                                    if args.vs_build else {})
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.repeat):
        for hogs in args.hogs:
            order = list(builds.items()) if r % 2 == 0 else list(reversed(builds.items()))
            for label, build in order:
                result = run_once(build, hogs, args.seconds, args.writers, args.window)
                runs.setdefault((label, hogs), []).append(result)
                print(f"run {r + 1} {label:>8} hogs={hogs}: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float)
                                                                           else f"{k}={v}" for k, v in result.items()),
                      flush=True)
    print("\nmedians (leader changes a minute; causes as counts a run):")
    for (label, hogs), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        print(f"{label:>8} hogs={hogs}: leader changes/min {med['leader_changes'] / med['minutes']:.1f}, "
              f"check-quorum {med['check_quorum']:g} (after a dropped reply {med['check_quorum_after_no_reply']:g}), "
              f"deposed {med['deposed']:g} (after a dropped reply {med['deposed_after_no_reply']:g}), "
              f"dropped replies {med['no_reply']:g}, late replies taken {med['late_reply']:g}, "
              f"writes {med['writes']:g}, load {med['load']:.1f} "
              f"({len(rs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
