#!/usr/bin/env python
"""A follower's restart on a big state, as a user sees it (issue 13): how long from the process's start until it
answers HTTP, until it answered a heartbeat of its leader, and until it answers a linearizable read; and the
restore's CPU alone, in this process.

    python bench/restart.py --keys 1000000 --repeat 3                      # this build, V4 snapshots
    git archive BASE | tar -x -C /tmp/before
    python bench/restart.py --keys 1000000 --build /tmp/before --format v3  # another build (its raftdzmq.py)
    python bench/restart.py --keys 1000000 --vs-build /work/main            # node 3 restarted by each in turn

Set-up (not timed): a backup of --keys keys (`k000000000`.., --value-bytes values) in --format (V3: a level-2
cluster's; V4: a level-3 cluster's, written by this build's encode_state) made in this process, `raftdzmq -restore` into node 1's data dir, node 1 started (a one-node cluster holding
the keys), nodes 2 and 3 joined (each receives and restores the leader's snapshot). Then --repeat times: node 3
killed (SIGKILL) and started again, polled every --poll-ms on its HTTP port:
- `http`: GET /status answered;
- `heartbeat`: /status names a leader other than itself (a restarted follower learns its leader from an
  AppendEntries it stepped, and its answer went out in that drive: a heartbeat answered, to within the poll; the
  term may have moved since the kill: elections on a loaded machine);
- `read`: GET /db/KEY (linearizable: ReadIndex through the leader) answered 200 with the key's value.
Each from the Popen. A restart by each build first is not counted (the first found the machine cold). With
--vs-build DIR the restarts alternate between --build's raftdzmq.py and DIR's in A B B A order (the same data dir,
one set-up: the builds must read each other's), --repeat restarts each, medians per build and their ratios (DIR's
/ --build's). The nodes run with Python's bytecode cached (in the temporary folder, warmed for each
build before the first timed start) as an installed raftdzmq has it (pip compiles it; a checkout writes
__pycache__ at its first run), whatever PYTHONDONTWRITEBYTECODE says here; --bytecode off runs them without (every
start compiles every module from source: ~0.5 s more CPU at start-up). Then `restore_cpu`: KeyValueStore.restore of the same snapshot bytes, by --build's store in a
process of its own (time.process_time), --repeat times. Medians, with the load average before and after. Measures; asserts nothing.
Every process is stopped by its pid; everything lives in one temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import cbor2  # noqa: E402

from procs import Node, wait_for  # noqa: E402
from raftlib.messages import Membership, Snapshot  # noqa: E402
from raftlib.server import store  # noqa: E402
from raftlib.snapshotfile import export_snapshot  # noqa: E402

SET_UP_SECONDS = 600  # a bound on each step of the set-up at a million keys on a loaded machine
RESTART_SECONDS = 120  # a bound on one restart


def state_bytes(keys: int, value_bytes: int, form: str) -> bytes:
    """A level-2 state machine's snapshot (V3) of `keys` keys, each created at its own index; for "v4", that state
    raised to level 3 and written by this build (V4)."""
    value = b"v" * value_bytes
    v3 = cbor2.dumps([store.SNAPSHOT_V3, {f"k{i:09d}": [value, i + 2, i + 2] for i in range(keys)}, {}, 0.0, 2, 1,
                      {}])
    if form == "v3":
        return v3
    kv = store.KeyValueStore()
    kv.restore(v3)
    assert kv.apply(keys + 2, store.command(store.SET_FEATURE_LEVEL, "", b"", 3)) == "ok"
    return kv.snapshot()


def status_or_none(node: Node) -> dict | None:
    try:
        return node.status()
    except (OSError, ValueError):
        return None


class QuietNode(Node):
    """A Node whose start returns at once (the bench times what follows itself), in the bench's environment."""

    env: dict[str, str] = {}

    def _wait_serving(self) -> None:
        pass

    def start(self, *extra: str, join: str | None = None, env: dict[str, str] | None = None) -> Node:
        return super().start(*extra, join=join, env={**self.env, **(env or {})})


def bytecode_env(workdir: str, cached: bool) -> dict[str, str]:
    """The nodes' environment: bytecode cached in `workdir` (PYTHONDONTWRITEBYTECODE cleared: an empty value is
    unset to Python), or never written."""
    if not cached:
        return {"PYTHONDONTWRITEBYTECODE": "1"}
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": os.path.join(workdir, "pycache")}


def warm_bytecode(server: str) -> None:
    """Every module a node imports compiled into the cache (`--help` exits after the imports)."""
    subprocess.run([sys.executable, server, "--help"], env={**os.environ, **QuietNode.env}, check=True,
                   capture_output=True, timeout=SET_UP_SECONDS)


def set_up(workdir: str, data: bytes, keys: int, server: str) -> list[Node]:
    backup = os.path.join(workdir, "backup.snap")
    export_snapshot(Snapshot(keys + 2, 1, Membership(("old",)), data), backup)
    nodes = [QuietNode(f"node.{i}", workdir, server=server) for i in (1, 2, 3)]
    subprocess.run([sys.executable, server, "-restore", backup, nodes[0].data_dir], check=True, capture_output=True,
                   timeout=SET_UP_SECONDS)
    os.unlink(backup)
    first = nodes[0].start()
    wait_for(lambda: (status_or_none(first) or {}).get("role") == "leader", SET_UP_SECONDS, "node 1 to lead",
             interval=0.2)
    for node in nodes[1:]:
        node.start(join=first.address)
        wait_for(lambda node=node: caught_up(first, node), SET_UP_SECONDS, f"{node.name} to join and catch up",
                 interval=0.5)
    return nodes


def caught_up(leader: Node, node: Node) -> bool:
    mine, theirs = status_or_none(node), status_or_none(leader)
    return bool(mine and theirs and mine["applied_index"] >= theirs["commit_index"]
                and any(m["http_address"].endswith(f":{node.http_port}") and m["role"] == "voter"
                        for m in theirs["members"]))


def restart(node: Node, key: str, value: bytes, poll_seconds: float) -> dict[str, float]:
    """Kill `node`, start it again, and time what the module's docstring says, from the Popen."""
    node.kill()
    started = time.monotonic()
    node.start()
    seen: dict[str, float] = {}
    while "read" not in seen:
        if node.exited():
            raise RuntimeError(f"{node.name} exited: {node.log_text(current=True)[-2000:]}")
        if time.monotonic() - started > RESTART_SECONDS:
            raise RuntimeError(f"{node.name} did not answer a read in {RESTART_SECONDS}s")
        status = status_or_none(node)
        now = time.monotonic() - started
        if status is not None:
            seen.setdefault("http", now)
            if status["leader"] not in (None, status["node_id"]):
                seen.setdefault("heartbeat", now)
            if "heartbeat" in seen:
                try:
                    r = node.request("GET", f"/db/{key}", timeout=RESTART_SECONDS)
                    if r.status == 200 and r.body == value:
                        seen["read"] = time.monotonic() - started
                except OSError:
                    pass
        time.sleep(poll_seconds)
    return seen


RESTORE_CPU = """
import sys, time
from raftlib.server.store import KeyValueStore
data = open(sys.argv[1], "rb").read()
kv = KeyValueStore()
started = time.process_time()
kv.restore(data)
print(time.process_time() - started)
"""


def restore_cpu(data_path: str, build: str) -> float:
    """The CPU time of KeyValueStore.restore of the bytes at `data_path`, by `build`'s store."""
    out = subprocess.run([sys.executable, "-c", RESTORE_CPU, data_path], env={**os.environ, "PYTHONPATH": build},
                         capture_output=True, text=True, check=True, timeout=SET_UP_SECONDS)
    return float(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--value-bytes", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--poll-ms", type=float, default=20.0)
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--build", default=ROOT, help="the tree whose raftdzmq.py and store run (default: this one)")
    p.add_argument("--vs-build", help="another tree: node 3's restarts alternate between --build's and this one's")
    p.add_argument("--bytecode", choices=("cached", "off"), default="cached",
                   help="the nodes' Python bytecode: cached (as installed) or compiled at every start")
    p.add_argument("--format", choices=("v3", "v4"), default="v4" if store.FEATURE_LEVEL >= 3 else "v3")
    args = p.parse_args()
    load_before = os.getloadavg()
    workdir = tempfile.mkdtemp(prefix="restart-bench-")
    QuietNode.env = bytecode_env(workdir, args.bytecode == "cached")
    builds = [args.build] + ([args.vs_build] if args.vs_build else [])
    nodes: list[Node] = []
    try:
        data = state_bytes(args.keys, args.value_bytes, args.format)
        data_path = os.path.join(workdir, "state.cbor")
        with open(data_path, "wb") as f:
            f.write(data)
        print(f"snapshot: {len(data) / 1e6:.1f} MB of state machine ({args.format}), {args.keys} keys", flush=True)
        del data
        for build in builds:
            warm_bytecode(os.path.join(build, "raftdzmq.py"))
        nodes = set_up(workdir, open(data_path, "rb").read(), args.keys, os.path.join(args.build, "raftdzmq.py"))
        key, value = f"k{args.keys // 2:09d}", b"v" * args.value_bytes
        runs: dict[str, list[dict[str, float]]] = {build: [] for build in builds}
        # One untimed restart by each build first (the run's first restart found the page cache and the machine
        # cold: review of restart1m, Q2), then the builds in A B B A order, so neither always goes first.
        for build in builds:
            nodes[2].server = os.path.join(build, "raftdzmq.py")
            warm_up = restart(nodes[2], key, value, args.poll_ms / 1000)
            print(f"warm-up, not counted ({build}): " + ", ".join(f"{k} {v:.2f}s" for k, v in warm_up.items()),
                  flush=True)
        for repeat in range(args.repeat):
            for build in builds if repeat % 2 == 0 else builds[::-1]:
                nodes[2].server = os.path.join(build, "raftdzmq.py")
                runs[build].append(restart(nodes[2], key, value, args.poll_ms / 1000))
                print(f"restart ({build}): " + ", ".join(f"{k} {v:.2f}s" for k, v in runs[build][-1].items()),
                      flush=True)
        cpu: dict[str, list[float]] = {build: [] for build in builds}
        for repeat in range(args.repeat):
            for build in builds if repeat % 2 == 0 else builds[::-1]:
                cpu[build].append(restore_cpu(data_path, build))
                print(f"restore alone ({build}): {cpu[build][-1]:.2f}s CPU", flush=True)
    finally:
        for node in nodes:
            node.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    figures = {build: {**{what: statistics.median(run[what] for run in runs[build])
                          for what in ("http", "heartbeat", "read")},
                       "restore_cpu": statistics.median(cpu[build])} for build in builds}
    loads = f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; bytecode {args.bytecode})"
    for build in builds:
        print(f"medians of {args.repeat} at {args.keys} keys, {build}: " +
              ", ".join(f"{k} {v:.2f}s" for k, v in figures[build].items()) + f" {loads}")
    if args.vs_build:
        mine, theirs = figures[args.build], figures[args.vs_build]
        print(f"{args.vs_build} / {args.build}: " + ", ".join(f"{k} {theirs[k] / mine[k]:.2f}x" for k in mine))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keys": args.keys, "format": args.format, "bytecode": args.bytecode, "runs": runs,
                       "restore_cpu": cpu, "medians": figures, "load_before": load_before[0],
                       "load_after": load_after[0]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
