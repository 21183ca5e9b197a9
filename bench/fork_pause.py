#!/usr/bin/env python
"""The serving process's pause when it forks a snapshot child (issue 13), and what makes it large. A node takes a
snapshot by forking (raftlib.runtime, `_fork_snapshot`): the child writes its copy-on-write image, and the parent
is held for as long as fork() takes, mostly the kernel copying the page tables of its memory (a 4 KiB page a
table entry unless the memory is in transparent huge pages). This builds a feature-level-2 state of --keys keys
of --value-bytes in this process (bench/restore_steps.py's), then forks --forks times as the runtime does (a raw
posix.fork; the child leaves at once, or after --child-seconds to keep its image alive), timing each fork in the
parent while a gevent timer probe (1 ms, the node's RAFTDZMQ_LOOP_LAG_PROBE_SECONDS) measures the hub's lag
around it. It reports the process's RSS, its page tables (VmPTE), its transparent huge pages (AnonHugePages), the
system's THP mode and the collector's frozen count, so a large pause can be put down to one of them.

    python bench/fork_pause.py --keys 1000000
    python bench/fork_pause.py --keys 1000000 --freeze          # gc.freeze() first, as a node after start-up
    python bench/fork_pause.py --keys 1000000 --child-seconds 1  # and the parent's pass over the state meanwhile

With --child-seconds the parent also reads every record once while the child is alive and once after (a pass
that touches every object's reference count: the copy-on-write faults a serving parent pays while a child
lives).

--node does it to a real node instead: a one-node cluster of this checkout, stopped, given a snapshot of --keys
keys in its data dir (bench/snapshot_stall.py's preload), started again with the hub-lag probe on
(RAFTDZMQ_LOOP_LAG_PROBE_SECONDS=0.001), a small -snapshot-threshold and -snapshot-log-ratio 0 (the threshold
alone: at the default 0.25 a snapshot waits for a log of a quarter of the state, ~29 MB at 1,000,000 keys, which
the pass's writes never reach; --snapshot-log-ratio R gives another), then sent one write of 1 KiB at a time
for --seconds, so that it snapshots (forks) again and again: once under strace (-T on the main thread's clone
calls: the time the kernel took in each fork) and once without (the probe's count of lags over 10 ms, and the
slowest of GET /status asked every 20 ms, against the forks made meanwhile); then, restarted with a threshold
it never reaches, the same writes again (the same counts with no fork).

    python bench/fork_pause.py --node --keys 1000000
    python bench/fork_pause.py --node --keys 1000000 --mode stepped --no-baseline   # no fork: stepped snapshots

--mode gives the node's -snapshot-mode (fork by default here; stepped: the loop writes the snapshot ~2 ms a turn,
no clone to trace, so no strace pass): each pass also reports the hub-lag histogram's share of the 10 ms timer's
wake-ups later than 5, 10 and 20 ms over the pass and the highest bucket reached (the probe's max is since the
start, restore included), and in the stepped mode the last snapshot's CPU and wall time (/metrics).
--no-baseline leaves out the pass without snapshots.

Measures; asserts nothing. Note `uptime`: the machine is shared.
"""

from __future__ import annotations

import argparse
import gc
import os
import posix
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import gevent

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from restore_steps import build_state  # noqa: E402


def proc_status(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status and /proc/self/smaps_rollup, in kB."""
    found: dict[str, int] = {}
    for path in ("/proc/self/status", "/proc/self/smaps_rollup"):
        try:
            with open(path) as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name in fields and rest.split() and rest.split()[0].isdigit():
                        found[name] = int(rest.split()[0])
        except OSError:
            pass
    return found


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class LagProbe:
    """How late a 1 ms gevent sleep wakes: the hub's lag, as the runtime's probe measures it."""

    def __init__(self, period_seconds: float = 0.001) -> None:
        self.period = period_seconds
        self.lags_ms: list[float] = []
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            gevent.sleep(self.period)
            self.lags_ms.append((time.monotonic() - t0 - self.period) * 1000)

    def stop(self) -> None:
        self.greenlet.kill()


def fork_once(child_seconds: float) -> tuple[int, float]:
    """A raw fork as the runtime's (no gevent hooks); the child sleeps `child_seconds` then leaves by _exit.
    Returns the child's pid and the parent's milliseconds in fork()."""
    t0 = time.perf_counter()
    pid = posix.fork()
    if pid == 0:
        if child_seconds:
            time.sleep(child_seconds)
        os._exit(0)
    return pid, (time.perf_counter() - t0) * 1000


def record_pass(kv) -> float:
    """Milliseconds to read every record once (each object's reference count touched, its page written)."""
    t0 = time.perf_counter()
    total = 0
    for record in kv.data.values():
        total += len(record[0])
    return (time.perf_counter() - t0) * 1000


def hub_lag_buckets(port: int) -> dict[float, float]:
    """The hub-lag histogram's cumulative counts (le bound in seconds -> wake-ups at most that late)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {float(m.group(1)): float(m.group(2))
            for m in re.finditer(r'^raftdzmq_hub_lag_seconds_bucket{le="([^"]+)"} ([0-9.e+-]+)$', text, re.M)}


def lag_summary(before: dict[float, float], after: dict[float, float]) -> str:
    """The 10 ms timer's wake-ups between two readings: how many, the share later than 5, 10, 20 ms, and the
    bound of the highest bucket any of them reached."""
    delta = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return "no hub-lag samples"
    over = {ms: total - delta[ms / 1000] for ms in (5, 10, 20)}
    reached = min((b for b in sorted(delta) if delta[b] == total), default=float("inf"))
    return (f"hub lag ({total:.0f} wake-ups): over 5 ms {over[5]:.0f}, over 10 ms {over[10]:.0f}, over 20 ms "
            f"{over[20]:.0f}; the latest within {reached * 1000:g} ms")


def held_by(lines: list[tuple[str, str]]) -> str:
    """The probe's logged wake-ups by the largest part of their sleep: the loop's own CPU, the wait for a core
    (the machine), or idle or blocked (a system call, the GIL)."""
    counts = {"CPU": 0, "waiting for a core": 0, "idle or blocked": 0}
    for _, what in lines:
        m = re.search(r"ran ([0-9.-]+) ms, waited ([0-9.-]+) ms for a core, was idle or blocked ([0-9.-]+) ms", what)
        if m:
            parts = dict(zip(counts, map(float, m.groups())))
            counts[max(parts, key=lambda k: parts[k])] += 1
    return ", ".join(f"{n} mostly {k}" for k, n in counts.items() if n) or "none"


def node_forks(keys: int, seconds: float, threshold: int, mode: str = "fork", baseline: bool = True,
               log_ratio: float = 0.0) -> int:
    """The --node run (the module's docstring)."""
    import load  # noqa: PLC0415 - the node mode's only
    import snapshot_stall  # noqa: PLC0415

    os.environ["RAFTDZMQ_LOOP_LAG_PROBE_SECONDS"] = "0.001"
    workdir = tempfile.mkdtemp(prefix="fork-pause-")
    cluster = load.Raftdzmq(workdir, 1, ["-snapshot-threshold", str(threshold), "-snapshot-log-ratio", str(log_ratio),
                                         "-snapshot-mode", mode])
    port = cluster.http_ports[0]
    value = b"w" * 1024
    try:
        proc = cluster.procs[0]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        index = snapshot_stall.preload([proc.args[-1]], keys, b"v" * 100)
        proc = snapshot_stall.restart(cluster, 0, load.ROOT, workdir)
        load.wait_until(lambda: snapshot_stall.get_json(port)["applied_index"] >= index, 300, "the preloaded node")
        load.wait_until(lambda: (snapshot_stall.get_json(port).get("cluster_feature_level") or 1) >= 2, 60,
                        "the level raise")
        time.sleep(5)  # the raise's snapshot
        status = proc_status_of(proc.pid, "VmRSS", "VmPTE", "AnonHugePages")
        print(f"  the node serves {keys:,} keys: " + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in status.items()))
        passes = [(True, True)] if mode == "fork" else []
        passes += [(False, True)] + ([(False, False)] if baseline else [])
        for traced, snapshots in passes:
            if not snapshots:  # the same writes with no snapshot: what the probe counts without forks
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
                argv = list(proc.args)
                argv[argv.index("-snapshot-threshold") + 1] = str(1 << 30)
                with open(os.path.join(workdir, "no-snapshots.log"), "ab") as log:
                    proc = cluster.procs[0] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
                load.wait_until(lambda: snapshot_stall.get_json(port)["role"] == "leader", 300, "the node to lead")
                time.sleep(3)
            before = snapshot_stall.metrics(port)
            before_snapshots = snapshots_of(port)
            lags_before = hub_lag_buckets(port)
            log_path = os.path.join(workdir, "restart-1.log" if snapshots else "no-snapshots.log")
            log_start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
            trace_path = os.path.join(workdir, "strace.txt")
            tracer = subprocess.Popen(["strace", "-T", "-e", "trace=clone,clone3,fork,vfork", "-p", str(proc.pid),
                                       "-o", trace_path], stderr=subprocess.DEVNULL) if traced else None
            time.sleep(1)
            slowest = 0.0
            writes = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/db/w{writes % 1000}",
                                                              data=value, method="POST"), timeout=10).read()
                writes += 1
                for _ in range(2):  # a status answer every ~20 ms: the outside view of a stall
                    t1 = time.monotonic()
                    snapshot_stall.get_json(port)
                    slowest = max(slowest, time.monotonic() - t1)
                    time.sleep(0.01)
            forks = snapshots_of(port) - before_snapshots
            after = snapshot_stall.metrics(port)
            lags = lag_summary(lags_before, hub_lag_buckets(port))
            if tracer is not None:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
                with open(trace_path) as f:
                    clones = [float(m.group(1)) * 1000 for m in re.finditer(r"^clone.*<([0-9.]+)>$", f.read(), re.M)]
                print(f"  under strace: {writes} writes in {seconds:g}s, {forks} snapshots; the main thread's "
                      f"clone() calls: {len(clones)}, median {statistics.median(clones or [0]):.1f} ms, max "
                      f"{max(clones or [0]):.1f} ms ({', '.join(f'{c:.1f}' for c in clones)})")
            else:
                over = after["raftdzmq_loop_lags_over_10ms"] - before["raftdzmq_loop_lags_over_10ms"]
                how = "" if snapshots else ", restarted with no snapshot threshold"
                print(f"  without strace{how}: {writes} writes in {seconds:g}s, {forks} snapshots; the probe's lags "
                      f"over 10 ms meanwhile: {over:.0f}; the slowest GET /status: {slowest * 1000:.0f} ms; the "
                      f"probe's max since the start {after['raftdzmq_loop_lag_seconds_max'] * 1000:.0f} ms (its "
                      f"restore included); {lags}")
                with open(log_path, errors="replace") as f:
                    f.seek(log_start)
                    held = re.findall(r"the hub-lag probe woke ([0-9.]+) ms late; (.*)", f.read())
                held.sort(key=lambda m: -float(m[0]))
                print(f"  wake-ups later than 50 ms logged: {len(held)} ({held_by(held)})"
                      + "".join(f"\n    {ms} ms late: {what}" for ms, what in held[:3]))
                if mode == "stepped" and snapshots:
                    stepped = snapshot_stall.metrics(port)
                    print(f"  the last stepped snapshot: CPU {stepped['raftdzmq_snapshot_stepped_cpu_seconds']:.2f} s"
                          f" in the serving process, wall {stepped['raftdzmq_snapshot_stepped_seconds']:.2f} s")
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"  {os.popen('uptime').read().strip()}")
    return 0


def proc_status_of(pid: int, *fields: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for path in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields and rest.split() and rest.split()[0].isdigit():
                    found[name] = int(rest.split()[0])
    return found


def snapshots_of(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        m = re.search(r"^raftdzmq_snapshots(?:{[^}]*})? ([0-9.e+-]+)$", r.read().decode(), re.M)
    return int(float(m.group(1))) if m else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--leases", type=int, default=0)
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--forks", type=int, default=10)
    p.add_argument("--freeze", action="store_true", help="gc.collect() and gc.freeze() after the build")
    p.add_argument("--child-seconds", type=float, default=0.0, help="how long each child lives (default 0)")
    p.add_argument("--node", action="store_true", help="fork a real node instead (see above)")
    p.add_argument("--seconds", type=float, default=30.0, help="--node: seconds of writes, each way (default 30)")
    p.add_argument("--snapshot-threshold", type=int, default=128 << 10, help="--node: bytes of log a snapshot")
    p.add_argument("--snapshot-log-ratio", type=float, default=0.0,
                   help="--node: its -snapshot-log-ratio (default 0: the threshold alone)")
    p.add_argument("--mode", choices=("fork", "stepped"), default="fork", help="--node: its -snapshot-mode")
    p.add_argument("--no-baseline", action="store_true", help="--node: no pass without snapshots")
    args = p.parse_args()
    if args.node:
        print(f"fork_pause --node: {args.keys:,} keys, -snapshot-mode {args.mode}, -snapshot-log-ratio "
              f"{args.snapshot_log_ratio:g}; THP {thp_mode()}; {os.popen('uptime').read().strip()}")
        return node_forks(args.keys, args.seconds, args.snapshot_threshold, args.mode, not args.no_baseline,
                          args.snapshot_log_ratio)
    print(f"fork_pause: {args.keys:,} keys of {args.value_bytes} bytes, {args.leases:,} leases; THP {thp_mode()}; "
          f"{os.popen('uptime').read().strip()}")
    fields = ("VmRSS", "VmPTE", "AnonHugePages", "RssAnon")
    before = proc_status(*fields)
    t0 = time.perf_counter()
    kv = build_state(args.keys, args.leases, args.value_bytes)
    built = time.perf_counter() - t0
    if args.freeze:
        gc.collect()
        gc.freeze()
    status = proc_status(*fields)
    print(f"  built in {built:.1f}s; " + ", ".join(f"{k} {v / 1024:.1f} MiB (was {before.get(k, 0) / 1024:.1f})"
                                                  for k, v in status.items())
          + f"; gc frozen {gc.get_freeze_count():,}, tracked {len(gc.get_objects()):,}")
    probe = LagProbe()
    gevent.sleep(0.1)
    forks: list[float] = []
    lags: list[float] = []
    passes: list[tuple[float, float]] = []
    for _ in range(args.forks):
        gevent.sleep(0.05)
        start = len(probe.lags_ms)
        pid, took = fork_once(args.child_seconds)
        forks.append(took)
        gevent.sleep(0.02)  # the probe wakes (late by the fork's pause) and once more
        lags.append(max(probe.lags_ms[start:] or [0.0]))
        if args.child_seconds:
            during = record_pass(kv)  # holds the loop: after the lag was taken
        os.waitpid(pid, 0)
        if args.child_seconds:
            passes.append((during, record_pass(kv)))
    probe.stop()
    print(f"  fork() in the parent, {len(forks)} forks: median {statistics.median(forks):.1f} ms, max "
          f"{max(forks):.1f} ms ({', '.join(f'{f:.1f}' for f in forks)})")
    print(f"  the hub-lag probe's largest lag around each fork: median {statistics.median(lags):.1f} ms, max "
          f"{max(lags):.1f} ms")
    if passes:
        print(f"  a pass over every record: while the child lived median "
              f"{statistics.median(a for a, _ in passes):.0f} ms, after it left "
              f"{statistics.median(b for _, b in passes):.0f} ms (copy-on-write faults)")
    print(f"  {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
