#!/usr/bin/env python
"""The snapshot stall bench (issue 13): does taking, writing, sending, installing and restoring a big snapshot
hold a node's event loop, and does it cost leaders? A local 3-node cluster (default flags but a snapshot
threshold that makes snapshots happen, and -snapshot-log-ratio 0: the threshold alone, since at the default 0.25 a
snapshot waits for a log of a quarter of the state, ~29 MB at 1,000,000 keys; --snapshot-log-ratio R gives another)
is formed, stopped, and loaded with --keys distinct keys of --value-bytes directly in its data dirs (the same
snapshot in each, in the key/value format every build reads: a CBOR map; writing a million keys over HTTP would take
longer than the rest of the run); it is started again (each node's start-up restores that snapshot, timed), takes
overwrites of those keys for --seconds (its own snapshots: taken, written), then a 4th node joins (it catches up by
InstallSnapshot: the leader sends, it receives and restores) and a follower is restarted (its start-up restores a
snapshot it took). Reported per node:

- loop lag: the hub-lag probe's max (RAFTDZMQ_LOOP_LAG_PROBE_SECONDS=0.001, /metrics
  raftdzmq_loop_lag_seconds_max, and the count of wake-ups > 10 ms late), where the build has it; and, for every
  build, the slowest /status answer seen by a poller every 20 ms (an outside view of the same stalls);
- the terms seen during the run (leader changes: the target is none after the first election);
- the restarted follower's start-up time until it serves with the commit index it had applied.

    python bench/snapshot_stall.py --keys 300000                       # this checkout
    python bench/snapshot_stall.py --keys 1000000 --build /work/main   # another checkout (e.g. before)

Speed is measured here, never asserted in a test. The load comes from wrk (a C client). Note `uptime` next to
the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402

sys.path.insert(0, load.ROOT)
import cbor2  # noqa: E402

from raftlib import EntryKind, HardState, Snapshot  # noqa: E402
from raftlib.storage import DiskStorage  # noqa: E402

# Writes keys key00000000.. in order, each wrk thread and connection taking the next one, from OFFSET; wraps at KEYS.
FILL_SCRIPT = """
local offset, keys, value = %d, %d, "%s"
local threads = {}
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
local n = 0
request = function()
  local k = (offset + n * %d + id) %% keys
  n = n + 1
  return wrk.format("POST", string.format("/db/key%%08d", k), nil, value)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "errors": %%d, "seconds": %%f, "p99": %%f}\\n',
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout, summary.duration / 1e6,
    latency:percentile(99)))
end
"""


def preload(data_dirs: list[str], keys: int, value: bytes) -> int:
    """Give every (stopped) node the same snapshot holding `keys` keys, just past the log they hold, with the
    configuration of the most complete one: as if the cluster had committed and compacted it. Returns its index."""
    stored = []
    for d in data_dirs:
        storage = DiskStorage(d)
        stored.append(storage.load())
        storage.close()
    memberships = [e.membership for st in stored for e in st.entries if e.kind is EntryKind.MEMBERSHIP]
    memberships += [st.snapshot.membership for st in stored if st.snapshot is not None]  # a log compacted already
    membership = max(memberships, key=lambda m: len(m.voters))
    index = max(st.last_index for st in stored) + 1
    term = max(st.hard_state.current_term for st in stored)
    data = cbor2.dumps({f"key{k:08d}": value for k in range(keys)})
    for d in data_dirs:
        storage = DiskStorage(d)
        st = storage.load()
        storage.save(HardState(term, st.hard_state.voted_for, index), [], Snapshot(index, term, membership, data))
        storage.close()
    return index


def restart(cluster: load.Raftdzmq, i: int, build: str, workdir: str) -> subprocess.Popen:
    argv = [a for a in cluster.procs[i].args]
    if "-join" in argv:
        j = argv.index("-join")
        del argv[j:j + 2]
    log = open(os.path.join(workdir, f"restart-{i + 1}.log"), "ab")
    cluster.procs[i] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=build)
    log.close()
    return cluster.procs[i]


def get_json(port: int, path: str = "/status", timeout: float = 2.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for name in ("raftdzmq_loop_lag_seconds_max", "raftdzmq_loop_lags_over_10ms", "raftdzmq_snapshot_index",
                 "raftdzmq_restore_step_seconds_max", "raftdzmq_snapshot_stepped_cpu_seconds",
                 "raftdzmq_snapshot_stepped_seconds"):
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


def wrk(url: str, script: str, concurrency: int, seconds: float, workdir: str) -> dict:
    path = os.path.join(workdir, "fill.lua")
    with open(path, "w") as f:
        f.write(script)
    threads = 2
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s",
                          "--timeout", "10s", "-s", path, url], capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"snapshot_stall: wrk gave no result:\n{out.stdout}\n{out.stderr}")
    return json.loads(line[7:])


class Watch:
    """Polls each node's /status every 20 ms from a thread each: the slowest answer, and the terms seen."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = dict(ports)
        self.slowest: dict[str, float] = {}
        self.terms: set[int] = set()
        self.leaders: set[tuple[int, str]] = set()
        self.stopped = threading.Event()
        self.threads = []

    def add(self, name: str, port: int) -> None:
        self.ports[name] = port
        t = threading.Thread(target=self._run, args=(name, port), daemon=True)
        t.start()
        self.threads.append(t)

    def start(self) -> Watch:
        for name, port in list(self.ports.items()):
            t = threading.Thread(target=self._run, args=(name, port), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self, name: str, port: int) -> None:
        while not self.stopped.is_set():
            t0 = time.monotonic()
            try:
                st = get_json(port, timeout=5)
            except Exception:  # noqa: BLE001 - a node restarting: not an answer time
                time.sleep(0.02)
                continue
            took = time.monotonic() - t0
            self.slowest[name] = max(self.slowest.get(name, 0.0), took)
            self.terms.add(st["term"])
            if st["role"] == "leader":
                self.leaders.add((st["term"], st["node_id"]))
            time.sleep(0.02)

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=6)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=300_000)
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--seconds", type=float, default=60.0, help="overwrites after the load, default 60")
    p.add_argument("--snapshot-threshold", type=int, default=4 << 20, help="bytes of log per snapshot")
    p.add_argument("--snapshot-log-ratio", type=float, default=0.0,
                   help="the nodes' -snapshot-log-ratio (default 0: the threshold alone)")
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("--build", default=load.ROOT, help="the checkout whose raftdzmq.py runs (default: this one)")
    p.add_argument("--json", help="write the figures here too")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    os.environ["RAFTDZMQ_LOOP_LAG_PROBE_SECONDS"] = "0.001"  # read by builds that have the probe
    workdir = tempfile.mkdtemp(prefix="snapshot-stall-")
    value = "v" * args.value_bytes
    build = os.path.abspath(args.build)
    print(f"snapshot_stall: {args.keys:,} keys of {args.value_bytes} bytes, threshold {args.snapshot_threshold:,} "
          f"bytes, build {build}; {os.popen('uptime').read().strip()}")
    snapshot_flags = ["-snapshot-threshold", str(args.snapshot_threshold)]
    with open(os.path.join(build, "raftdzmq.py")) as f:
        if "-snapshot-log-ratio" in f.read():
            snapshot_flags += ["-snapshot-log-ratio", str(args.snapshot_log_ratio)]
        elif args.snapshot_log_ratio:  # a build from before the ratio takes its snapshots at the threshold alone
            raise SystemExit(f"bench: {build} has no -snapshot-log-ratio")
    cluster = load.Raftdzmq(workdir, 3, snapshot_flags, build=build)
    names = {f"node{i + 1}": port for i, port in enumerate(cluster.http_ports)}
    watch = Watch(names)
    result: dict = {"keys": args.keys, "build": build}
    http_port, follower, before = 0, 0, {}
    try:
        for proc in cluster.procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        t0 = time.monotonic()
        index = preload([proc.args[-1] for proc in cluster.procs], args.keys, value.encode())
        result["preload_seconds"] = time.monotonic() - t0
        t0 = time.monotonic()
        for i in range(3):
            restart(cluster, i, build, workdir)
        starts = []
        for port in cluster.http_ports:
            load.wait_until(lambda port=port: get_json(port)["applied_index"] >= index, 300, "a preloaded node")
            starts.append(time.monotonic() - t0)
        load.wait_until(lambda: any(get_json(p)["role"] == "leader" for p in cluster.http_ports), 60, "a leader")
        result["preloaded_start_seconds"] = starts
        print(f"  preloaded {args.keys:,} keys at index {index}; the nodes served them "
              f"{', '.join(f'{t:.1f}' for t in starts)}s after their start (the 3 at once)", flush=True)
        watch.start()
        overwrites = (FILL_SCRIPT % (0, args.keys, value, 2)).replace("(offset + n * 2 + id)", "(n * 7919 + id)")
        leader_port = next(p for p in cluster.http_ports if get_json(p)["role"] == "leader")
        r = wrk(f"http://127.0.0.1:{leader_port}", overwrites, args.concurrency, args.seconds, workdir)
        result["write_phase"] = {"ops": r["requests"] / r["seconds"], "errors": r["errors"], "p99_ms": r["p99"] / 1000}
        print(f"  then {r['requests'] / r['seconds']:.0f} writes/s for {args.seconds:g}s, p99 "
              f"{r['p99'] / 1000:.0f} ms, {r['errors']} errors", flush=True)
        # A 4th node joins: the leader streams it the snapshot, it receives and restores it.
        port, http_port = load.free_port(), load.free_port()
        leader_port = next(p for p in cluster.http_ports if get_json(p)["role"] == "leader")
        t_join = time.monotonic()
        cluster.spawn([sys.executable, os.path.join(build, "raftdzmq.py"), "-p", str(port), "-hp", str(http_port),
                       "-join", f"127.0.0.1:{leader_port}", *snapshot_flags, os.path.join(workdir, "node4")],
                      "node4.log", cwd=build)
        commit = get_json(leader_port)["commit_index"]
        load.wait_until(lambda: get_json(http_port)["applied_index"] >= commit, 600, "node4 to catch up")
        result["join_catch_up_seconds"] = time.monotonic() - t_join
        watch.add("node4", http_port)
        print(f"  node4 caught up by InstallSnapshot in {result['join_catch_up_seconds']:.1f}s", flush=True)
        # Restart a follower: its start-up reads and restores the snapshot.
        follower = next(i for i, p in enumerate(cluster.http_ports) if get_json(p)["role"] != "leader")
        proc = cluster.procs[follower]
        before = metrics(cluster.http_ports[follower])  # its probe's figures die with it: read them first
        commit = get_json(cluster.http_ports[follower])["applied_index"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        t_start = time.monotonic()
        restart(cluster, follower, build, workdir)
        load.wait_until(lambda: get_json(cluster.http_ports[follower])["applied_index"] >= commit, 120,
                        "the restarted follower")
        result["restart_seconds"] = time.monotonic() - t_start
        time.sleep(3)
        per_node = report(names, http_port, follower, before, watch)
    finally:
        watch.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result["nodes"] = per_node
    result["terms_seen"] = sorted(watch.terms)
    result["leaders_seen"] = sorted(watch.leaders)
    print(f"  follower node{follower + 1} restarted and served its applied index in {result['restart_seconds']:.1f}s")
    print(f"  terms seen: {result['terms_seen']} (leaders {result['leaders_seen']})")
    print(f"  {'node':<6} {'probe max ms':>12} {'>10ms':>6} {'slowest /status ms':>19} {'restore step max ms':>20}")
    for name, n in per_node.items():
        lag = "-" if n["probe_lag_max_ms"] is None else f"{n['probe_lag_max_ms']:.0f}"
        over = "-" if n["probe_lags_over_10ms"] is None else f"{n['probe_lags_over_10ms']:.0f}"
        extra = (f"  (after restart: {n['after_restart_probe_lag_max_ms']:.0f} ms)"
                 if "after_restart_probe_lag_max_ms" in n else "")
        step = "-" if n["restore_step_max_ms"] is None else f"{n['restore_step_max_ms']:.1f}"
        print(f"  {name:<6} {lag:>12} {over:>6} {n['status_slowest_ms']:>19.0f} {step:>20}{extra}")
    print(f"  {os.popen('uptime').read().strip()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def report(names: dict[str, int], http_port: int, follower: int, before: dict, watch: Watch) -> dict:
    """Each node's figures: its probe's (/metrics; the restarted follower's from before its restart, and its
    new process's apart) and the slowest /status answer the watch saw."""
    per_node = {}
    for name, port in {**names, "node4": http_port}.items():
        try:
            m = metrics(port)
        except Exception:  # noqa: BLE001
            m = {}
        if name == f"node{follower + 1}":
            m = {**before, "after_restart_lag_max": m.get("raftdzmq_loop_lag_seconds_max")}
        per_node[name] = {"probe_lag_max_ms": (m["raftdzmq_loop_lag_seconds_max"] * 1000
                                               if "raftdzmq_loop_lag_seconds_max" in m else None),
                          "probe_lags_over_10ms": m.get("raftdzmq_loop_lags_over_10ms"),
                          "status_slowest_ms": watch.slowest.get(name, 0) * 1000,
                          # The longest step of restoring a leader's snapshot (a node that installed one: node4).
                          "restore_step_max_ms": (m["raftdzmq_restore_step_seconds_max"] * 1000
                                                  if "raftdzmq_restore_step_seconds_max" in m else None)}
        if "after_restart_lag_max" in m and m["after_restart_lag_max"] is not None:
            per_node[name]["after_restart_probe_lag_max_ms"] = m["after_restart_lag_max"] * 1000
    return per_node


if __name__ == "__main__":
    sys.exit(main())
