#!/usr/bin/env python
"""CPU per request of each node of a 3-node cluster, and entries per leader fsync, for each workload of bench/load.py
at one concurrency (wrk), the workloads alternating on one cluster: where a workload's cost lands (the leader, the
followers) when the machine's cores are the limit. Bench only; asserts nothing.

    python bench/cpu_per_request.py -w write txn -c 64 -d 4 --repeat 2
    python bench/cpu_per_request.py --build /tmp/before   # another checkout's raftdzmq.py (alternate the two)
    python bench/cpu_per_request.py -w write --follower   # writes sent to a follower, forwarded (-forward)

CPU is each node's utime + stime from /proc over the run, divided by the proposals its leader took
(`raftdzmq_proposals`); entries per fsync is that over `raftdzmq_batches_saved` (GET /metrics of the leader).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load import Raftdzmq, get, run_load, workload_requests  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counter(metrics: str, name: str) -> float:
    found = re.search(r"^" + name + r"(?:_total)? ([0-9.e+]+)$", metrics, re.M)
    if found is None:
        raise SystemExit(f"bench: no {name} in the leader's /metrics")
    return float(found.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-w", "--workloads", nargs="+", default=["write", "txn"], choices=["write", "txn"])
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--txn-ops", type=int, default=10)
    p.add_argument("--build", metavar="DIR", default=None, help="run this checkout's raftdzmq.py (default: this one)")
    p.add_argument("--follower", action="store_true", help="send the load to a follower, the nodes started with "
                   "-forward: the CPU of forwarding each request to the leader")
    args = p.parse_args()
    args.value_size = [100, 100]
    workdir = tempfile.mkdtemp(prefix="raftdzmq-cpu-")
    system = None
    try:
        # A node that fails to join raises here, the nodes started before it stopped by Raftdzmq itself.
        flags = ["-forward"] if args.follower else []
        system = Raftdzmq(workdir, 3, flags) if args.build is None else Raftdzmq(workdir, 3, flags, build=args.build)
        print(f"{system.name}, load average {os.getloadavg()[0]:.1f}", flush=True)
        system.follow_leader()
        keys = [f"k{i}" for i in range(1000)]
        rng = random.Random(1)
        run_load(system.url, system.write_requests(keys, "v" * 100), 16, 2, workdir, "prefill", "wrk", sequential=True)
        for _ in range(args.repeat):
            for workload in args.workloads:
                system.follow_leader()  # a loaded machine may move the leadership between runs
                leader_pid = system.pids()[system.http_ports.index(int(system.url.rsplit(":", 1)[1]))]
                requests = workload_requests(system, workload, keys, rng, args)
                before = get(system.url + "/metrics", timeout=5).decode(), [cpu_seconds(p) for p in system.pids()]
                target = system.url
                if args.follower:
                    target = next(f"http://127.0.0.1:{port}" for port in system.http_ports
                                  if f":{port}" != system.url[system.url.rindex(":"):])
                result = run_load(target, requests, args.concurrency, args.duration, workdir, workload, "wrk")
                after = get(system.url + "/metrics", timeout=5).decode(), [cpu_seconds(p) for p in system.pids()]
                proposals = counter(after[0], "raftdzmq_proposals") - counter(before[0], "raftdzmq_proposals")
                saves = counter(after[0], "raftdzmq_batches_saved") - counter(before[0], "raftdzmq_batches_saved")
                if not proposals or not saves:  # the node asked lost the leadership: it proposed nothing
                    print(f"{workload:<6} left out: the leader changed during the run", flush=True)
                    continue
                per_node = [(b - a) / proposals * 1e6 for a, b in zip(before[1], after[1])]
                target_pid = system.pids()[system.http_ports.index(int(target.rsplit(":", 1)[1]))]
                roles = ["leader" if pid == leader_pid else "follower (loaded)" if pid == target_pid else "follower"
                         for pid in system.pids()]
                print(f"{workload:<6} {result['ops']:>7.0f}/s  entries per leader fsync {proposals / saves:5.1f}  CPU per "
                      f"request: " + ", ".join(f"{role} {us:.0f} us" for role, us in zip(roles, per_node))
                      + f"  (all {sum(per_node):.0f} us)", flush=True)
    finally:
        if system is not None:
            system.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
