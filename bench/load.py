#!/usr/bin/env python
"""The load bench: start a local raftdzmq cluster (or target --url), run writes and reads at several
concurrencies, print a table of ops/s and latency percentiles, and compare side by side with references run the
same way on loopback in the same run: a bare Bottle dict server (--vs bare), etcd (--vs etcd, v3 JSON gateway;
--vs etcd2 for its v2 API) and PySyncObj (--vs pysyncobj, through bench/pysyncobj_server.py).

    python bench/load.py                                   # 3 nodes, writes and reads at 1, 16, 64 clients
    python bench/load.py --vs bare --vs etcd --json out.json --plot out.png
    python bench/load.py --url http://localhost:8080 --workloads write -c 64 -d 10
    python bench/load.py --vs-build /tmp/old -c 1 64 -w write --repeat 5   # this build against another, alternating
    python bench/load.py --follower --raftdzmq-flag=-forward --vs-build /tmp/old -c 64 -w write   # forwarded writes
    python bench/load.py --vs etcd --open-loop --fractions 0.5 0.8 -w write --plot ol.png   # open loop, see below
    python bench/load.py --vs etcd -c 64 -w write txn --repeat 3   # 10-put transactions against single writes

The load comes from wrk when it is on the PATH (a C client: it is not the bottleneck), else from a gevent client
(bench/pyclient.py). The load generator's own CPU use is reported per run.

--open-loop: requests at fixed rates (--rates, or --fractions of a saturation rate measured first with the closed
loop at --saturation-clients on the --saturation-of system, by default the last reference), latency from each
request's scheduled time (bench/openloop.py: no coordinated omission); per rate and system p50/p99/p99.9/max, how
far the generator fell behind its schedule and its CPU, and whether the run is valid (the generator was not the
bottleneck). On raftdzmq each run also reports the leader's hub lag and fsync times over the run (GET /metrics).

-w txn: transactions of --txn-ops puts of distinct random keys each (raftdzmq's POST /txn, etcd's POST
/v3/kv/txn through its gateway; systems without transactions are left out of it). With -w write txn the table is
followed by each system's transaction rate over its single-write rate at each concurrency, and its key writes/s.
The watch fan-out is bench/watch_fanout.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench: timed out waiting for {what}")


# ---- systems under test -----------------------------------------------------------------------------------


class System:
    name = "?"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log_name: str, cwd: str = ROOT) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, log_name), "ab")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        log.close()
        self.procs.append(p)
        return p

    @contextlib.contextmanager
    def _stopped_on_failure(self):
        """Stop every process started so far when the start fails (a node that failed to join, a server that never
        came up): the caller never gets the object to stop."""
        try:
            yield
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # Each returns a list of (method, path, body or None, headers) to pick from at random.
    def write_requests(self, keys: list[str], value: str) -> list:
        return [("POST", f"/db/{k}", value, {}) for k in keys]

    def read_requests(self, keys: list[str], stale: bool = False, lease: bool = False) -> list:
        q = "?consistency=stale" if stale else "?consistency=lease" if lease else ""
        return [("GET", f"/db/{k}{q}", None, {}) for k in keys]

    def txn_requests(self, key_sets: list[list[str]], value: str) -> list | None:
        """One request per key set: a transaction that puts `value` at each key of the set; None without them."""
        return None


class Raftdzmq(System):
    def __init__(self, workdir: str, nodes: int, extra: list[str], build: str = ROOT,
                 profile_to: str | None = None) -> None:
        """`build`: the checkout whose raftdzmq.py runs (another one: named after its folder). `profile_to`: run
        each node under bench/profile_node.py, its profile written to PROFILE_TO.<pid>.prof when it stops."""
        super().__init__(workdir)
        self.name = f"raftdzmq-{nodes}" + ("" if build == ROOT else f"-{os.path.basename(build.rstrip('/'))}")
        self.http_ports = []
        with self._stopped_on_failure():
            for i in range(nodes):
                port, http_port = free_port(), free_port()
                wrapper = [] if profile_to is None else [os.path.join(HERE, "profile_node.py"), profile_to]
                args = [sys.executable, *wrapper, os.path.join(build, "raftdzmq.py"), "-p", str(port), "-hp",
                        str(http_port)]
                if i > 0:
                    args += ["-join", f"127.0.0.1:{self.http_ports[0]}"]
                self.spawn(args + extra + [os.path.join(workdir, f"{self.name}-node{i + 1}")],
                           f"{self.name}-{i + 1}.log", cwd=build)
                self.http_ports.append(http_port)
                wait_until(lambda: self._voters() == i + 1, 20, f"{self.name} node {i + 1} to join")
        self.url = f"http://127.0.0.1:{self.http_ports[0]}"
        self.to_follower = False

    def follow_leader(self) -> None:
        """Point `url` at the node that leads now (a loaded machine can move the leadership between runs); with
        `to_follower` (--follower), at a node that does not lead (its requests forwarded: -forward)."""
        for port in self.http_ports:
            try:
                if (json.loads(get(f"http://127.0.0.1:{port}/status"))["role"] == "leader") != self.to_follower:
                    self.url = f"http://127.0.0.1:{port}"
                    return
            except OSError:
                continue

    def txn_requests(self, key_sets, value):
        return [("POST", "/txn", json.dumps({"compare": [], "success": [{"op": "put", "key": k, "value": value}
                                                                         for k in ks]}), {}) for ks in key_sets]

    def _voters(self) -> int:
        st = json.loads(get(f"http://127.0.0.1:{self.http_ports[0]}/status"))
        return sum(1 for m in st["members"] if m["role"] == "voter") if st["role"] == "leader" else 0


class RunningRaftdzmq(System):
    """A raftdzmq node started elsewhere (--url): raftdzmq's requests, transactions included (a plain System has
    none, so `--url ... -w txn` ran no transactions: review of stall1m, Q3)."""
    name = "raftdzmq"
    txn_requests = Raftdzmq.txn_requests


class Bare(System):
    name = "bare-bottle"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with self._stopped_on_failure():
            self.spawn([sys.executable, os.path.join(HERE, "bare_server.py"), str(port)], "bare.log")
            wait_until(lambda: self._up(), 10, "the bare server")

    def _up(self) -> bool:
        try:
            get(self.url + "/db/x")
        except urllib.error.HTTPError as e:
            return e.code == 404
        return True


class Etcd(System):
    def __init__(self, workdir: str, nodes: int, api: str) -> None:
        super().__init__(workdir)
        self.api = api
        self.name = f"etcd-{nodes}-{api}"
        peers = [(f"e{i}", free_port(), free_port()) for i in range(nodes)]
        cluster = ",".join(f"{n}=http://127.0.0.1:{pp}" for n, _, pp in peers)
        with self._stopped_on_failure():
            for name, cp, pp in peers:
                args = [
                    "etcd", "--name", name, "--data-dir", os.path.join(workdir, f"{self.name}-{name}"),
                    "--listen-client-urls", f"http://127.0.0.1:{cp}", "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                    "--listen-peer-urls", f"http://127.0.0.1:{pp}", "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{pp}", "--initial-cluster", cluster, "--initial-cluster-state", "new",
                    "--log-level", "error",
                ]
                if api == "v2":
                    args.append("--enable-v2")
                self.spawn(args, f"{self.name}-{name}.log")
            self.urls = [f"http://127.0.0.1:{cp}" for _, cp, _ in peers]
            self.url = self.urls[0]
            wait_until(lambda: b"true" in get(self.url + "/health"), 30, "etcd to be healthy")

    @staticmethod
    def _b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    def write_requests(self, keys, value):
        if self.api == "v2":
            return [("PUT", f"/v2/keys/{k}", f"value={value}", {"Content-Type": "application/x-www-form-urlencoded"})
                    for k in keys]
        return [("POST", "/v3/kv/put", json.dumps({"key": self._b64(k), "value": self._b64(value)}), {})
                for k in keys]

    def txn_requests(self, key_sets, value):
        if self.api == "v2":
            return None
        return [("POST", "/v3/kv/txn", json.dumps({"success": [
            {"request_put": {"key": self._b64(k), "value": self._b64(value)}} for k in ks]}), {}) for ks in key_sets]

    def read_requests(self, keys, stale=False):
        if self.api == "v2":
            q = "" if stale else "?quorum=true"
            return [("GET", f"/v2/keys/{k}{q}", None, {}) for k in keys]
        extra = ', "serializable": true' if stale else ""
        return [("POST", "/v3/kv/range", '{"key": "%s"%s}' % (self._b64(k), extra), {}) for k in keys]


class PySyncObjKV(System):
    def __init__(self, workdir: str, nodes: int) -> None:
        super().__init__(workdir)
        self.name = f"pysyncobj-{nodes}"
        raft = [free_port() for _ in range(nodes)]
        http = [free_port() for _ in range(nodes)]
        with self._stopped_on_failure():
            for i in range(nodes):
                partners = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(raft) if j != i)
                self.spawn([sys.executable, os.path.join(HERE, "pysyncobj_server.py"), f"127.0.0.1:{raft[i]}", partners,
                            str(http[i])], f"{self.name}-{i}.log")
            self.urls = [f"http://127.0.0.1:{p}" for p in http]
            wait_until(self._find_leader, 30, "a pysyncobj leader")

    def _find_leader(self) -> bool:
        for u in self.urls:
            if get(u + "/leader") == b"yes":
                self.url = u
                return True
        return False


# ---- the load -----------------------------------------------------------------------------------------------


def _lua_table(requests: list) -> str:
    def q(s):
        return json.dumps(s) if s is not None else "nil"

    rows = []
    for method, path, body, headers in requests:
        hs = "{" + ",".join(f"[{q(k)}]={q(v)}" for k, v in headers.items()) + "}"
        rows.append(f"{{{q(method)},{q(path)},{q(body)},{hs}}}")
    # Lua allows 65,536 constants in one function: fill the table from functions of 4,000 rows each.
    parts = []
    for i in range(0, len(rows), 4000):
        parts.append(";(function() local n = #t\n" + "\n".join(
            f"t[n + {j + 1}] = {row}" for j, row in enumerate(rows[i:i + 4000])) + "\nend)()")
    return "(function() local t = {}\n" + "\n".join(parts) + "\nreturn t end)()"


WRK_SCRIPT = """
local reqs = %s
local sequential = %s
local n = 0
math.randomseed(%d)
request = function()
  n = n + 1
  local r = sequential and reqs[(n - 1) %% #reqs + 1] or reqs[math.random(#reqs)]
  return wrk.format(r[1], r[2], r[4], r[3])
end
-- Every answer but a 2xx is an error (wrk counts only statuses over 399): after an election the old leader answers
-- each write with a quick 307 to the new one, and those counted as writes done (txns faster than writes: txncompact).
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) not_2xx = 0 end
response = function(status, headers, body)
  if status < 200 or status > 299 then not_2xx = not_2xx + 1 end
end
done = function(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("not_2xx") end
  io.write(string.format('RESULT {"requests": %%d, "errors": %%d, "seconds": %%f, "p50": %%f, "p90": %%f, "p99": %%f, "p999": %%f}\\n',
    summary.requests - bad, e.connect + e.read + e.write + e.timeout + bad, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


class Progress:
    def __init__(self, label: str, seconds: float) -> None:
        self.label, self.seconds, self._stop = label, seconds, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(0.5):
            if sys.stderr.isatty():
                sys.stderr.write(f"\r  {self.label}: {time.monotonic() - t0:4.1f}/{self.seconds:g}s ")
                sys.stderr.flush()

    def __enter__(self):
        if sys.stderr.isatty():
            self._t.start()
        else:
            sys.stderr.write(f"  {self.label} ({self.seconds:g}s)\n")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 80 + "\r")


def run_load(url: str, requests: list, concurrency: int, seconds: float, workdir: str, label: str,
             client: str, sequential: bool = False) -> dict:
    """Run one load; `sequential` walks the requests in order (wrk only), so a prefill writes every key."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Progress(label, seconds):
        if client == "wrk":
            script = os.path.join(workdir, "load.lua")
            with open(script, "w") as f:
                f.write(WRK_SCRIPT % (_lua_table(requests), "true" if sequential else "false",
                                      random.randrange(1 << 30)))
            threads = 1 if concurrency < 4 else 2
            out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s",
                                  "--timeout", "10s", "-s", script, url], capture_output=True, text=True,
                                 timeout=seconds + 60)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"bench: wrk gave no result:\n{out.stdout}\n{out.stderr}")
            result = json.loads(line[7:])
        else:
            reqfile = os.path.join(workdir, "requests.json")
            with open(reqfile, "w") as f:
                json.dump(requests, f)
            out = subprocess.run([sys.executable, os.path.join(HERE, "pyclient.py"), url, str(concurrency),
                                  str(seconds), reqfile], capture_output=True, text=True, timeout=seconds + 60)
            result = json.loads(out.stdout.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["ops"] = result["requests"] / result["seconds"]
    result["client_cpu"] = cpu / result["seconds"]
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--nodes", type=int, default=3, help="raftdzmq cluster size (default 3)")
    p.add_argument("--url", help="target a running raftdzmq node (its leader) instead of starting a cluster")
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("-w", "--workloads", nargs="+", default=["write", "read"],
                   choices=["write", "read", "lease-read", "stale-read", "txn"],
                   help="read: the default (linearizable); lease-read: ?consistency=lease on raftdzmq, the default "
                        "read elsewhere; txn: transactions of --txn-ops puts")
    p.add_argument("--txn-ops", type=int, default=10, help="puts in each transaction of -w txn (default 10)")
    p.add_argument("--keys", type=int, default=1000, help="distinct random keys (default 1000)")
    p.add_argument("--value-size", type=int, nargs=2, default=[100, 100], metavar=("MIN", "MAX"),
                   help="value sizes in bytes, drawn uniformly (default 100 100)")
    p.add_argument("--vs", action="append", default=[],
                   choices=["bare", "etcd", "etcd2", "pysyncobj", "raftdzmq1", "raftdzmq3", "raftdzmq5", "raftdzmq7"],
                   help="also measure this reference, alternating, in the same run")
    p.add_argument("--vs-build", action="append", default=[], metavar="DIR",
                   help="also measure the raftdzmq.py of this checkout (another build, e.g. from git archive), "
                        "alternating, in the same run")
    p.add_argument("--repeat", type=int, default=1, help="alternate the systems this many times (A B B A ...); report medians")
    p.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--raftdzmq-flag", action="append", default=[], help="extra flag for every raftdzmq node")
    p.add_argument("--follower", action="store_true", help="load a follower, not the leader, of each raftdzmq cluster "
                   "started (with --raftdzmq-flag=-forward its writes are passed on to the leader)")
    p.add_argument("--open-loop", action="store_true", help="fixed request rates, latency from the schedule (above)")
    p.add_argument("--rates", type=float, nargs="+", help="--open-loop: requests per second")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.8, 0.95],
                   help="--open-loop without --rates: fractions of the saturation rate (default 0.25 0.5 0.8 0.95)")
    p.add_argument("--saturation-of", metavar="NAME", help="--open-loop: the system (a prefix of its name, e.g. "
                   "etcd) whose closed-loop rate is the saturation rate (default: the last one started)")
    p.add_argument("--saturation-clients", type=int, default=64, help="closed-loop clients for the saturation rate")
    p.add_argument("--warmup", type=float, default=1.0, help="--open-loop: seconds at each rate before measuring")
    p.add_argument("--max-connections", type=int, default=256, help="--open-loop: the generator's connection cap")
    p.add_argument("--gc-stats", action="store_true", help="time every garbage collection in each raftdzmq node "
                   "($RAFTDZMQ_GC_STATS) and print the pauses at the end")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--profile", metavar="PREFIX", help="run this build's nodes under cProfile (bench/profile_node.py): "
                   "each node's profile goes to PREFIX.<pid>.prof when it stops (the leader: the first node)")
    p.add_argument("--plot", help="draw throughput and latency against concurrency to this PNG (needs matplotlib)")
    return p.parse_args()


def start_systems(args: argparse.Namespace, workdir: str, systems: list[System]) -> None:
    """Start raftdzmq (or name --url) and every reference asked for, appending each to `systems` as it starts (the
    caller stops them however this ends)."""
    if args.url:
        s = RunningRaftdzmq(workdir)
        s.url = args.url.rstrip("/")
        systems.append(s)
    else:
        systems.append(Raftdzmq(workdir, args.nodes, args.raftdzmq_flag,
                                profile_to=None if args.profile is None else os.path.abspath(args.profile)))
    for build in args.vs_build:
        systems.append(Raftdzmq(workdir, args.nodes, args.raftdzmq_flag, build=os.path.abspath(build)))
    for ref in args.vs:
        if ref.startswith("raftdzmq"):  # raftdzmq3, raftdzmq5: another cluster size, same run
            systems.append(Raftdzmq(workdir, int(ref[len("raftdzmq"):]), args.raftdzmq_flag))
        elif ref == "bare":
            systems.append(Bare(workdir))
        elif ref in ("etcd", "etcd2"):
            if not shutil.which("etcd"):
                print("bench: etcd is not on the PATH (apt-get install etcd-server); skipping it", file=sys.stderr)
                continue
            systems.append(Etcd(workdir, args.nodes, "v2" if ref == "etcd2" else "v3"))
        elif ref == "pysyncobj":
            try:
                import pysyncobj  # noqa: F401
            except ImportError:
                print("bench: pysyncobj is not installed (pip install pysyncobj); skipping it", file=sys.stderr)
                continue
            systems.append(PySyncObjKV(workdir, args.nodes))


def measure(args: argparse.Namespace, systems: list[System], keys: list[str], rng: random.Random, workdir: str,
            client: str) -> dict:
    """Every workload at every concurrency, the systems alternating, `--repeat` times, in reverse order every other
    time (A B, B A, A B, ...: a drift of the machine's load favours neither): {(workload, clients, system): [result,
    ...]}."""
    value = "v" * rng.randint(*args.value_size)
    for s in systems:  # every key exists before reads
        run_load(s.url, s.write_requests(keys, value), 16, 2, workdir, f"{s.name} prefill", client, sequential=True)
    results: dict = {}
    for workload in args.workloads:
        for c in args.concurrency:
            for round_number in range(args.repeat):
                for s in systems if round_number % 2 == 0 else systems[::-1]:
                    reqs = workload_requests(s, workload, keys, rng, args)
                    if reqs is None:
                        continue
                    if isinstance(s, Raftdzmq):  # an election on a loaded machine: every later run got 307s only
                        s.to_follower = args.follower
                        s.follow_leader()
                    r = run_load(s.url, reqs, c, args.duration, workdir, f"{s.name} {workload} c={c}", client)
                    results.setdefault((workload, c, s.name), []).append(r)
    return results


def main() -> int:
    args = parse_args()
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "python")
    workdir = tempfile.mkdtemp(prefix="raftdzmq-bench-")
    rng = random.Random(1)
    keys = [f"k{rng.randrange(10**9)}" for _ in range(args.keys)]
    systems: list[System] = []
    if args.gc_stats:
        os.environ["RAFTDZMQ_GC_STATS"] = os.path.join(workdir, "gc")
        os.mkdir(os.environ["RAFTDZMQ_GC_STATS"])
    try:
        start_systems(args, workdir, systems)
        print(f"bench: client {client}, {args.duration:g}s per run, {args.keys} keys, values "
              f"{args.value_size[0]}-{args.value_size[1]} bytes, systems: {', '.join(s.name for s in systems)}",
              file=sys.stderr)
        if args.open_loop:
            return open_loop(args, systems, keys, rng, workdir, client)
        results = measure(args, systems, keys, rng, workdir, client)
        print_table(results, systems)
        print_txn_ratios(results, systems, args.txn_ops)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([{"workload": w, "concurrency": c, "system": n, "runs": rs, "median": median(rs)}
                           for (w, c, n), rs in results.items()], f, indent=1)
        if args.plot:
            plot(results, systems, args.plot)
    finally:
        for s in systems:
            s.stop()
        if args.gc_stats:
            print_gc_stats(systems, os.environ["RAFTDZMQ_GC_STATS"])
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def print_gc_stats(systems: list[System], folder: str) -> None:
    """Each raftdzmq node's collections over the whole run, by generation (raftlib/server/tuning.py wrote them)."""
    for s in systems:
        for k, pid in enumerate(s.pids()):
            path = os.path.join(folder, f"gc-{pid}.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                st = json.load(f)
            gens = "; ".join(f"gen{g} {st['count'][g]}x total {st['total_seconds'][g] * 1000:.0f} ms max "
                             f"{st['max_seconds'][g] * 1000:.1f} ms, {len(st['long_seconds'][g])} >= 1 ms"
                             for g in range(3))
            full = ", ".join(f"{seconds * 1000:.0f}" for seconds in st["long_seconds"][2])
            print(f"gc {s.name} node{k + 1}: {gens}; gen2 pauses ms: {full}; frozen at exit {st['frozen']}")


# ---- the open loop ------------------------------------------------------------------------------------------


def prom_histogram(text: str, name: str) -> dict[float, float]:
    """The cumulative buckets {le: count} of one histogram in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_delta(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """How many observations of a run fell above each bucket's bound: {"> 0.01": 3, ...}, and their count."""
    total = after.get(float("inf"), 0) - before.get(float("inf"), 0)
    out = {"count": total}
    for le in sorted(after):
        if le != float("inf"):
            out[f">{le:g}"] = total - (after[le] - before.get(le, 0))
    return out


def raftdzmq_metrics(s: System) -> dict | None:
    if not isinstance(s, Raftdzmq):
        return None
    text = get(s.url + "/metrics").decode()
    out = {h: prom_histogram(text, h) for h in ("raftdzmq_hub_lag_seconds", "raftdzmq_fsync_seconds",
                                                 "raftdzmq_write_seconds")}
    for line in text.splitlines():
        if line.startswith(("raftdzmq_proposals ", "raftdzmq_batches_saved ")):
            out[line.split()[0]] = {0.0: float(line.split()[1])}
    return out


def run_open_loop(s: System, requests: list, rate: float, args: argparse.Namespace, workdir: str,
                  label: str) -> dict:
    if isinstance(s, Raftdzmq):
        s.follow_leader()
    reqfile = os.path.join(workdir, "openloop-requests.json")
    with open(reqfile, "w") as f:
        json.dump(requests, f)
    before = raftdzmq_metrics(s)
    with Progress(label, args.duration + args.warmup):
        out = subprocess.run([sys.executable, os.path.join(HERE, "openloop.py"), "--url", s.url, "--rate", str(rate),
                              "--duration", str(args.duration), "--warmup", str(args.warmup), "--requests", reqfile,
                              "--max-connections", str(args.max_connections)], capture_output=True, text=True,
                             timeout=args.duration + args.warmup + 60)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise SystemExit(f"bench: the open-loop generator failed:\n{out.stdout}\n{out.stderr}")
    result = json.loads(lines[-1])
    if before is not None:
        after = raftdzmq_metrics(s)
        for name in ("raftdzmq_hub_lag_seconds", "raftdzmq_fsync_seconds", "raftdzmq_write_seconds"):
            result[name.replace("raftdzmq_", "")] = histogram_delta(before[name], after[name])
        delta = {k: after[k][0.0] - before[k][0.0] for k in ("raftdzmq_proposals", "raftdzmq_batches_saved")}
        # The leader's entries per fsync over the run (group commit): proposals / batches saved.
        result["entries_per_batch"] = delta["raftdzmq_proposals"] / max(1.0, delta["raftdzmq_batches_saved"])
    return result


def saturation_rates(args, systems, keys, rng, workdir, client) -> dict[str, float]:
    """{workload: ops/s} of the --saturation-of system under the closed loop at --saturation-clients."""
    ref = systems[-1]
    if args.saturation_of:
        ref = next((s for s in systems if s.name.startswith(args.saturation_of)), None)
        if ref is None:
            raise SystemExit(f"bench: no system named {args.saturation_of}*: {[s.name for s in systems]}")
    out = {}
    for workload in args.workloads:
        r = run_load(ref.url, workload_requests(ref, workload, keys, rng, args), args.saturation_clients,
                     args.duration, workdir, f"{ref.name} {workload} saturation", client)
        out[workload] = r["ops"]
        print(f"bench: {ref.name} {workload} saturates at {r['ops']:.0f}/s ({args.saturation_clients} clients, "
              f"closed loop)", file=sys.stderr)
    return {"system": ref.name, **out}


def txn_key_sets(keys: list[str], ops: int, count: int, rng: random.Random) -> list[list[str]]:
    """`count` sets of `ops` distinct keys drawn from `keys` (a transaction puts a key at most once: raftdzmq and
    etcd both refuse a key put twice)."""
    assert 0 < ops <= len(keys)
    return [rng.sample(keys, ops) for _ in range(count)]


def workload_requests(s: System, workload: str, keys: list[str], rng: random.Random, args) -> list | None:
    """The requests of one workload on `s`, or None when `s` has no such operation (txn on bare, etcd2...)."""
    if workload == "txn":
        return s.txn_requests(txn_key_sets(keys, args.txn_ops, 2000, rng), "v" * rng.randint(*args.value_size))
    if workload == "write":
        return s.write_requests(keys, "v" * rng.randint(*args.value_size))
    return s.read_requests(keys, stale=workload == "stale-read", **(
        {"lease": True} if workload == "lease-read" and isinstance(s, Raftdzmq) else {}))


def open_loop(args, systems, keys, rng, workdir, client) -> int:
    """Prefill, find the rates, then each workload at each rate on each system, alternating, --repeat times."""
    value = "v" * rng.randint(*args.value_size)
    for s in systems:
        run_load(s.url, s.write_requests(keys, value), 16, 2, workdir, f"{s.name} prefill", client, sequential=True)
    saturation = {} if args.rates else saturation_rates(args, systems, keys, rng, workdir, client)
    results: dict = {}
    for workload in args.workloads:
        rates = args.rates or [round(f * saturation[workload]) for f in args.fractions]
        for rate in rates:
            for round_number in range(args.repeat):
                for s in systems if round_number % 2 == 0 else systems[::-1]:
                    reqs = workload_requests(s, workload, keys, rng, args)
                    if reqs is None:
                        continue
                    reqs = [reqs[rng.randrange(len(reqs))] for _ in range(20000)]
                    r = run_open_loop(s, reqs, rate, args, workdir, f"{s.name} {workload} {rate:g}/s")
                    results.setdefault((workload, rate, s.name), []).append(r)
    print_open_loop(results, systems, saturation)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"saturation": saturation, "results": [
                {"workload": w, "rate": r, "system": n, "runs": rs, "median": ol_median(rs)}
                for (w, r, n), rs in results.items()]}, f, indent=1)
    if args.plot:
        plot_open_loop(results, systems, args.plot)
    return 0


OL_FIELDS = ("rate", "p50", "p90", "p99", "p999", "max", "errors", "timeouts", "late_p99", "late_max", "client_cpu",
             "client_busy")


def ol_median(runs: list[dict]) -> dict:
    m = {k: statistics.median(r[k] for r in runs) for k in OL_FIELDS}
    m["valid"] = all(r["valid"] for r in runs)
    m["invalid_reasons"] = [r["invalid_reason"] for r in runs if r["invalid_reason"]]
    lag = [r["hub_lag_seconds"][">0.01"] for r in runs if "hub_lag_seconds" in r]
    if lag:
        m["hub_lag_over_10ms"] = statistics.median(lag)
        m["fsync_over_5ms"] = statistics.median(r["fsync_seconds"][">0.005"] for r in runs)
        m["entries_per_batch"] = statistics.median(r["entries_per_batch"] for r in runs)
    return m


def print_open_loop(results: dict, systems: list[System], saturation: dict) -> None:
    ref = saturation.get("system", systems[-1].name)
    print(f"{'workload':<11}{'rate/s':>8}  {'system':<18}{'done/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'p99.9 ms':>9}"
          f"{'max ms':>8}{'err':>5}{'t/o':>5}{'late p99':>9}{'gen cpu':>8}{'busy':>5}{'hub>10ms':>9}{'fs>5ms':>7}"
          f"{'batch':>6}"
          f"{'p99/ref':>8}{'p99.9/ref':>10}  valid")
    for (workload, rate, name), runs in results.items():
        m = ol_median(runs)
        r = ol_median(results[(workload, rate, ref)]) if (workload, rate, ref) in results else None
        ratio = lambda k: "" if r is None or name == ref else f"{m[k] / r[k]:.2f}" if r[k] else "-"  # noqa: E731
        hub = f"{m['hub_lag_over_10ms']:>9.0f}{m['fsync_over_5ms']:>7.0f}{m['entries_per_batch']:>6.1f}" \
            if "hub_lag_over_10ms" in m else " " * 22
        print(f"{workload:<11}{rate:>8.0f}  {name:<18}{m['rate']:>8.0f}{m['p50'] / 1000:>8.2f}{m['p99'] / 1000:>8.2f}"
              f"{m['p999'] / 1000:>9.2f}{m['max'] / 1000:>8.1f}{m['errors']:>5.0f}{m['timeouts']:>5.0f}"
              f"{m['late_p99'] / 1000:>8.2f}m{m['client_cpu'] * 100:>7.0f}%{m['client_busy'] * 100:>4.0f}%{hub}{ratio('p99'):>8}"
              f"{ratio('p999'):>10}  {'yes' if m['valid'] else 'NO: ' + '; '.join(m['invalid_reasons'])}")


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or None, said once on stderr, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def plot_open_loop(results: dict, systems: list[System], path: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    workloads = sorted({w for w, _, _ in results})
    fig, axes = plt.subplots(1, len(workloads), figsize=(7 * len(workloads), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, w in enumerate(workloads):
        ax = axes[0][col]
        for k, s in enumerate(systems):
            pts = sorted((ol_median(rs)["rate"], ol_median(rs)) for (ww, _, n), rs in results.items()
                         if ww == w and n == s.name)
            for key, style, label in (("p50", "-", "p50"), ("p99", "--", "p99"), ("p999", ":", "p99.9")):
                ax.plot([x for x, _ in pts], [m[key] / 1000 for _, m in pts], linestyle=style, marker="o",
                        color=colors[k % len(colors)], label=f"{s.name} {label}")
        ax.set_title(f"{w}: open-loop latency against throughput")
        ax.set_xlabel("completed requests/s (at a fixed arrival rate)")
        ax.set_ylabel("latency from the scheduled time, ms")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"bench: plot written to {path}", file=sys.stderr)


def median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("ops", "p50", "p90", "p99", "p999", "errors",
                                                                 "client_cpu")}


def print_table(results: dict, systems: list[System]) -> None:
    base = systems[0].name
    print(f"{'workload':<11}{'clients':>8}  {'system':<18}{'ops/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'p99.9 ms':>10}{'errors':>8}{'client cpu':>11}{'raftdzmq/x':>11}")
    for (workload, c, name), runs in results.items():
        m = median(runs)
        ours = median(results[(workload, c, base)])["ops"]
        ratio = "" if name == base else f"{ours / m['ops']:.2f}" if m["ops"] else "-"
        print(f"{workload:<11}{c:>8}  {name:<18}{m['ops']:>9.0f}{m['p50'] / 1000:>9.2f}{m['p90'] / 1000:>9.2f}"
              f"{m['p99'] / 1000:>9.2f}{m['p999'] / 1000:>10.2f}{m['errors']:>8.0f}{m['client_cpu'] * 100:>10.0f}%"
              f"{ratio:>11}")


def txn_ratios(results: dict, txn_ops: int) -> list[dict]:
    """Per system and concurrency measured with both: transactions/s over single writes/s (medians of the runs),
    and the key writes/s the transactions made (each puts `txn_ops` keys)."""
    out = []
    for (workload, c, name), runs in results.items():
        if workload != "txn" or ("write", c, name) not in results:
            continue
        txn, write = median(runs)["ops"], median(results[("write", c, name)])["ops"]
        out.append({"system": name, "concurrency": c, "txn_per_second": txn, "write_per_second": write,
                    "ratio": txn / write if write else math.nan, "key_writes_per_second": txn * txn_ops})
    return out


def print_txn_ratios(results: dict, systems: list[System], txn_ops: int) -> None:
    for r in txn_ratios(results, txn_ops):
        print(f"txn/write {r['system']:<18} c={r['concurrency']:<4} {r['txn_per_second']:>7.0f} txn/s over "
              f"{r['write_per_second']:>6.0f} writes/s = {r['ratio']:.2f}x; {r['key_writes_per_second']:>7.0f} key "
              f"writes/s ({txn_ops} puts each)")


def plot(results: dict, systems: list[System], path: str) -> None:
    plt = _pyplot()
    if plt is None:
        return
    workloads = sorted({w for w, _, _ in results})
    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for col, w in enumerate(workloads):
        for s in systems:
            pts = sorted((c, median(rs)) for (ww, c, n), rs in results.items() if ww == w and n == s.name)
            if not pts:
                continue
            cs = [c for c, _ in pts]
            axes[0][col].plot(cs, [m["ops"] for _, m in pts], marker="o", label=s.name)
            axes[1][col].plot(cs, [m["p50"] / 1000 for _, m in pts], marker="o", label=f"{s.name} p50")
            axes[1][col].plot(cs, [m["p99"] / 1000 for _, m in pts], marker="x", linestyle="--",
                              label=f"{s.name} p99")
        axes[0][col].set_title(f"{w}: throughput")
        axes[0][col].set_xlabel("concurrent clients")
        axes[0][col].set_ylabel("ops/s")
        axes[1][col].set_title(f"{w}: latency")
        axes[1][col].set_xlabel("concurrent clients")
        axes[1][col].set_ylabel("ms")
        axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"bench: plot written to {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
