#!/usr/bin/env python
"""Endurance: a local raftdzmq cluster takes a million writes over a hundred thousand keys (snapshots on, fsync
on), with each node's memory (RSS) sampled as it goes; then every node is killed with SIGKILL and started again,
and the time until it serves with everything applied is measured.

    python bench/endurance.py                                   # 1,000,000 writes over 100,000 keys, 3 nodes
    python bench/endurance.py --writes 200000 --keys 20000 -n 5 --raftdzmq-flag=-snapshot-threshold=4000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def dir_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


def status(port: int) -> dict:
    return json.loads(load.get(f"http://127.0.0.1:{port}/status"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--nodes", type=int, default=3)
    p.add_argument("--writes", type=int, default=1_000_000)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--chunk", type=float, default=20.0, help="seconds of load between memory samples")
    p.add_argument("--raftdzmq-flag", action="append", default=[])
    p.add_argument("--json", help="write the samples and restart times to this file")
    return p.parse_args()


def write_all(args: argparse.Namespace, cluster: load.Raftdzmq, workdir: str) -> list[dict]:
    """--writes writes in chunks of --chunk seconds, printing each node's memory after each; returns the samples."""
    keys = [f"key{i:06d}" for i in range(args.keys)]
    value = "".join(random.choice("abcdefghij") for _ in range(100))
    requests = cluster.write_requests(keys, value)
    samples = []
    done = 0
    t0 = time.monotonic()
    print(f"endurance: {args.nodes} nodes, {args.writes:,} writes over {args.keys:,} keys, c={args.concurrency}")
    print(f"{'writes':>10} {'writes/s':>9} {'errors':>7}  " + "  ".join(f"node{i + 1} MB" for i in range(args.nodes)))
    while done < args.writes:
        r = load.run_load(cluster.url, requests, args.concurrency, args.chunk, workdir, "writes", "wrk")
        done += r["requests"]
        rss = [rss_mb(pid) for pid in cluster.pids()]
        samples.append({"writes": done, "ops": r["ops"], "errors": r["errors"], "rss_mb": rss,
                        "seconds": time.monotonic() - t0})
        print(f"{done:>10,} {r['ops']:>9.0f} {r['errors']:>7}  " + "  ".join(f"{m:>9.1f}" for m in rss))
    return samples


def restart_all(cluster: load.Raftdzmq, commit: int) -> list[float]:
    """Kill every node at once, start them again (without -join), and time each one until it serves with every
    write up to `commit` applied."""
    for proc in cluster.procs:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    restarted = []
    for proc in cluster.procs:
        t = time.monotonic()
        args_ = [a for a in proc.args]
        if "-join" in args_:
            i = args_.index("-join")
            del args_[i:i + 2]
        restarted.append((t, subprocess.Popen(args_, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                              cwd=load.ROOT)))
    cluster.procs = [pr for _, pr in restarted]
    restart_seconds = []
    for (t, _), port in zip(restarted, cluster.http_ports):
        load.wait_until(lambda port=port: status(port)["applied_index"] >= commit, 60, "a restarted node")
        restart_seconds.append(time.monotonic() - t)
    return restart_seconds


def main() -> int:
    args = parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("bench: endurance needs wrk on the PATH (apt-get install wrk)")
    workdir = tempfile.mkdtemp(prefix="raftdzmq-endurance-")
    cluster = None
    try:
        cluster = load.Raftdzmq(workdir, args.nodes, args.raftdzmq_flag)
        samples = write_all(args, cluster, workdir)
        leader = status(cluster.http_ports[0])
        commit = leader["commit_index"]
        for port in cluster.http_ports:
            load.wait_until(lambda port=port: status(port)["applied_index"] >= commit, 60, "every node to catch up")
        sizes = [dir_mb(os.path.join(workdir, f"{cluster.name}-node{i + 1}")) for i in range(args.nodes)]
        print(f"data dirs (MB): {', '.join(f'{s:.1f}' for s in sizes)}; snapshot index {leader['snapshot_index']:,}"
              f" of {commit:,}")
        restart_seconds = restart_all(cluster, commit)
        print("restart to serving with every write applied (s): " + ", ".join(f"{s:.2f}" for s in restart_seconds))
        print("memory after restart (MB): " + ", ".join(f"{rss_mb(pr.pid):.1f}" for pr in cluster.procs))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"samples": samples, "restart_seconds": restart_seconds, "data_dir_mb": sizes,
                           "commit_index": commit}, f, indent=1)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
