#!/usr/bin/env python
"""What an open dashboard costs: write throughput of a local 3-node cluster with the page (GET /ui) open in
headless Chromium against without it, alternating, several rounds, medians.

    python bench/ui_cost.py                        # 5 rounds of 10 s each way, 64 clients, page on the leader
    python bench/ui_cost.py --rounds 7 -d 10 --page-on follower

Each round runs the closed-loop write load of bench/load.py (wrk when on the PATH) on the leader twice, once with
the page open and polling, once with the browser on about:blank (started once, so its start-up is not counted),
in alternating order (ABBA...), and prints every run, the medians and their ratio. The page on the leader is the
worst case: the leader serves the page's polls and gathers the other members' numbers. The browser runs on the same
two cores as the cluster and wrk: its own CPU is part of what is measured, as on an operator's laptop it would not
be. Chromium comes from Debian's packages (tests/browser.py)."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

import load  # noqa: E402  (bench/load.py)
from browser import quit_chromium, start_chromium  # noqa: E402
from procs import LocalCluster, http_request  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (the browser's processes under chromedriver)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def cpu_costs(cluster: LocalCluster, leader, page_node, driver, requests: list, workdir: str, client: str,
              concurrency: int) -> None:
    """Where the page's cost goes, from CPU time rather than from noisy throughput: the leader's CPU per write at
    full load, the CPU of the page node and of the leader per poll of an open page (idle cluster, 10 s), and the
    browser's own CPU per second."""
    pid = leader.proc.pid
    t0 = cpu_seconds(pid)
    result = load.run_load(f"http://{leader.address}", requests, concurrency, 5, workdir, "cpu per write", client)
    per_write = (cpu_seconds(pid) - t0) / result["requests"]
    print(f"leader CPU per write at {concurrency} clients: {per_write * 1e6:.0f} us "
          f"({result['ops']:.0f} writes/s)")
    nodes = {n.name: n.proc.pid for n in cluster.running()}
    before = {name: cpu_seconds(p) for name, p in nodes.items()}
    asks = 300
    for _ in range(asks):
        http_request("GET", page_node.address, "/cluster/status")
    used = {name: cpu_seconds(p) - before[name] for name, p in nodes.items()}
    print(f"CPU per GET /cluster/status asked of {page_node.name} ({asks} in a row, idle cluster; includes the "
          "heartbeats meanwhile): " + ", ".join(f"{name} {used[name] / asks * 1e6:.0f} us" for name in sorted(used)))
    for mode in ("open", "closed"):
        driver.get(f"http://{page_node.address}/ui" if mode == "open" else "about:blank")
        time.sleep(1.0)
        browser = descendants(driver.service.process.pid)
        nodes = {n.name: n.proc.pid for n in cluster.running()}
        before = {name: cpu_seconds(p) for name, p in nodes.items()}
        browser_before = sum(cpu_seconds(p) for p in browser if os.path.exists(f"/proc/{p}"))
        polls_before = driver.execute_script("return window.dashboard ? window.dashboard.state.polls : 0")
        time.sleep(10)
        polls = driver.execute_script("return window.dashboard ? window.dashboard.state.polls : 0") - polls_before
        used = {name: cpu_seconds(p) - before[name] for name, p in nodes.items()}
        browser_used = sum(cpu_seconds(p) for p in browser if os.path.exists(f"/proc/{p}")) - browser_before
        print(f"idle cluster, page {mode}, 10 s: {polls} polls; node CPU ms/s "
              + ", ".join(f"{name}{' (leader)' if nodes[name] == pid else ''}{' (page)' if nodes[name] == page_node.proc.pid else ''}"
                          f" {used[name] * 100:.2f}" for name in sorted(used))
              + f"; browser CPU {browser_used * 100:.1f} ms/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--page-on", choices=["leader", "follower"], default="leader")
    p.add_argument("--cpu-only", action="store_true", help="only the CPU accounting (no throughput rounds)")
    args = p.parse_args()
    workdir = tempfile.mkdtemp(prefix="raftdzmq-uicost-")
    client = "wrk" if shutil.which("wrk") else "python"
    cluster = LocalCluster(workdir).start()
    driver = start_chromium(1280, 1000)
    try:
        leader = cluster.leader()
        page_node = leader if args.page_on == "leader" else next(n for n in cluster.running() if n is not leader)
        rng = random.Random(1)
        keys = [f"k{rng.randrange(10**9)}" for _ in range(1000)]
        requests = [("POST", f"/db/{k}", "v" * 100, {}) for k in keys]
        url = f"http://{leader.address}"
        cpu_costs(cluster, leader, page_node, driver, requests, workdir, client, args.concurrency)
        if args.cpu_only:
            return 0
        runs: dict[str, list[float]] = {"open": [], "closed": []}
        for r in range(args.rounds):
            order = ["open", "closed"] if r % 2 == 0 else ["closed", "open"]
            for mode in order:
                driver.get(f"http://{page_node.address}/ui" if mode == "open" else "about:blank")
                if mode == "open":  # the page polls from now on
                    driver.execute_script("return 1")
                result = load.run_load(url, requests, args.concurrency, args.duration, workdir,
                                       f"round {r + 1} page {mode}", client)
                if mode == "open":
                    polls = driver.execute_script("return window.dashboard.state.polls")
                    assert polls >= args.duration - 2, f"the page polled only {polls} times"
                runs[mode].append(result["ops"])
                print(f"round {r + 1}: page {mode:6}  {result['ops']:8.0f} writes/s  p99 "
                      f"{result['p99'] / 1000:.1f} ms", flush=True)
        open_median, closed_median = statistics.median(runs["open"]), statistics.median(runs["closed"])
        print(f"medians: page open {open_median:.0f} writes/s, closed {closed_median:.0f} writes/s: "
              f"ratio {open_median / closed_median:.3f} ({(open_median / closed_median - 1) * 100:+.1f}%); "
              f"{args.rounds} rounds of {args.duration:g}s at {args.concurrency} clients, page on the {args.page_on}")
        print("per run (open):", " ".join(f"{x:.0f}" for x in runs["open"]))
        print("per run (closed):", " ".join(f"{x:.0f}" for x in runs["closed"]))
    finally:
        quit_chromium(driver)
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
