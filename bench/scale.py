#!/usr/bin/env python
"""The scale harness: how raftdzmq's costs grow with the data, against etcd holding the same data in the same run.

    python bench/scale.py 100000 1000000 --json scale.json        # raftdzmq and etcd (3 nodes each)
    python bench/scale.py 100000 --no-etcd
    python bench/scale.py 1000000 --batch 100 --logs scale-logs   # transactions of 100 puts; keep the nodes' logs
    python bench/scale.py 2000000 --batch 100 --no-etcd --load-only   # the load alone: its leader changes
    python bench/scale.py 5000000 --batch 100 --no-raftdzmq       # etcd only (its fresh node if memory allows)

For each N (keys k000000000 .. of 100-byte values), a fresh 3-node cluster of each system is loaded by wrk (64
connections, each key written once: one put a request, or with --batch K one transaction of K puts of consecutive
keys; when the count stops growing, the keys whose write failed, e.g. during an election, are listed and written
again, K a request, until none is missing (at most 3 passes): the load's rate is N over the whole), and then:
- RSS per node (VmRSS) before and after (the table: the largest node's), and memory per key (the leader's growth
  / N);
- the snapshot: raftdzmq's newest snapshot file in the leader's data dir (none yet below -snapshot-threshold of
  log: then the size of the encoding below), and the time to take one of N keys (KeyValueStore.snapshot() of the
  same data, written and fsynced, in this process); etcd's `etcdctl snapshot save` size and time;
- the longest serving pause during the load, seen by probing each node's status every 20 ms, and leader changes
  (each new term a node reports is printed with the time, to be found in the nodes' logs: --logs keeps them);
- write and read (linearizable) throughput at that size: wrk, 64 connections, random keys, --seconds each;
- restart: SIGKILL a follower, start it again, until it answers a linearizable read;
- join: a fresh fourth node joins, until it has applied the leader's commit index (etcd: its revision); only if
  the machine has room for it: it will hold what the largest node holds (its RSS), and --memory-reserve GB must
  stay available besides (this machine has no swap, and an OOM kill hurts whoever shares it); else the step is
  reported "skipped: N GB needed, M available".

Rules: every wait has a bound (a step that passes it is reported as "timeout", and the run goes on); every process
is stopped by its pid; everything lives in one temporary folder, removed at the end (but for the logs --logs
copies). wrk is required.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from load import free_port  # noqa: E402

VALUE_BYTES = 100

WRK_LUA = r"""
local N, T, MODE, SYSTEM, K = %d, %d, "%s", "%s", %d
local value = string.rep("v", %d)
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(s)
  return ((s:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b %% 2 ^ i - b %% 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%%d%%d%%d?%%d?%%d?%%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({"", "==", "="})[#s %% 3 + 1])
end
local vb64 = b64(value)
local made = 0
function setup(thread) thread:set("tid", made); made = made + 1 end
local counter, me = 0, 0
function init(args) me = tonumber(tid); math.randomseed(1000 + me) end
-- The load with K > 1: one transaction of the K plain puts of keys first .. first + K - 1 (those below N).
local function batch_request(first)
  local ops = {}
  for i = first, math.min(first + K, N) - 1 do
    local key = string.format("k%%09d", i)
    if SYSTEM == "raftdzmq" then
      ops[#ops + 1] = '{"op":"put","key":"' .. key .. '","value":"' .. value .. '"}'
    else
      ops[#ops + 1] = '{"request_put":{"key":"' .. b64(key) .. '","value":"' .. vb64 .. '"}}'
    end
  end
  local path = SYSTEM == "raftdzmq" and "/txn" or "/v3/kv/txn"
  return wrk.format("POST", path, nil, '{"success":[' .. table.concat(ops, ",") .. ']}')
end
local batches = math.ceil(N / K)
request = function()
  local i
  if MODE == "load" and K > 1 then
    local b = (counter * T + me) %% batches
    counter = counter + 1
    return batch_request(b * K)
  elseif MODE == "load" then
    i = (counter * T + me) %% N
    counter = counter + 1
  else
    i = math.random(0, N - 1)
  end
  local key = string.format("k%%09d", i)
  if SYSTEM == "raftdzmq" then
    if MODE == "read" then return wrk.format("GET", "/db/" .. key) end
    return wrk.format("POST", "/db/" .. key, nil, value)
  end
  if MODE == "read" then return wrk.format("POST", "/v3/kv/range", nil, '{"key":"' .. b64(key) .. '"}') end
  return wrk.format("POST", "/v3/kv/put", nil, '{"key":"' .. b64(key) .. '","value":"' .. vb64 .. '"}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "errors": %%d, "seconds": %%f, "p50": %%f, "p99": %%f}\n',
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99)))
end
"""


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def poll(predicate, timeout_seconds: float, interval_seconds: float = 0.05) -> float | None:
    """Seconds until `predicate()` held (exceptions count as not yet), or None after `timeout_seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_seconds:
        try:
            if predicate():
                return time.monotonic() - t0
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(interval_seconds)
    return None


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available_bytes() -> int:
    """The kernel's estimate of the memory that can be allocated without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def no_room_for(needed_bytes: int, reserve_bytes: int) -> str | None:
    """Why a step that grows the machine's memory by `needed_bytes` must not run ("skipped: N GB needed, M
    available"), or None when it leaves `reserve_bytes` available besides."""
    available = mem_available_bytes()
    if available - needed_bytes >= reserve_bytes:
        return None
    return (f"skipped: {needed_bytes / 1e9:.1f} GB needed and {reserve_bytes / 1e9:.1f} GB kept free, "
            f"{available / 1e9:.1f} GB available")


def dir_bytes(path: str) -> int:
    """Bytes on disk (allocated blocks: etcd preallocates its WAL files)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


# ---- the two systems: start, count, kill, restart, join -----------------------------------------------------


class Cluster:
    """Three nodes of one system; each node's command kept so it can be started again."""

    name = "?"

    def __init__(self, workdir: str) -> None:
        self.workdir, self.procs, self.commands, self.urls = workdir, {}, {}, {}

    def spawn(self, i: int, command: list[str]) -> None:
        self.commands[i] = command
        with open(os.path.join(self.workdir, f"{self.name}-{i}.log"), "ab") as log:
            self.procs[i] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait()

    def restart(self, i: int) -> None:
        self.spawn(i, self.commands[i])

    def put_request(self, keys: list[str]) -> tuple[str, bytes]:
        """The URL and body that write VALUE_BYTES at each of `keys`: one put, or one transaction of them."""
        raise NotImplementedError

    def put_keys(self, keys: list[str]) -> int:
        """Write `keys` in one request: its status, 0 when no answer came (no leader, a timeout)."""
        try:
            return http("POST", *self.put_request(keys), timeout=30)[0]
        except OSError:
            return 0

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class RaftCluster(Cluster):
    name = "raftdzmq"

    def __init__(self, workdir: str, flags: list[str]) -> None:
        super().__init__(workdir)
        self.flags = flags
        for i in range(3):
            self.start_node(i, join=0 if i else None)
            if poll(lambda: self.voters() == i + 1, 30) is None:
                raise SystemExit(f"scale: raftdzmq node {i} did not join")
        # POST /txn (the load with --batch) is answered 409 until the leader raised the cluster's feature level.
        if poll(lambda: self.status(self.leader())["cluster_feature_level"] >= 2, 30) is None:
            raise SystemExit("scale: raftdzmq's cluster feature level stayed below 2")

    def start_node(self, i: int, join: int | None) -> None:
        port, http_port = free_port(), free_port()
        cmd = [sys.executable, os.path.join(ROOT, "raftdzmq.py"), "-p", str(port), "-hp", str(http_port), "-forward"]
        if join is not None:
            cmd += ["-join", self.urls[join].split("//")[1]]
        self.urls[i] = f"http://127.0.0.1:{http_port}"
        self.spawn(i, cmd + self.flags + [os.path.join(self.workdir, f"raftdzmq-node{i}")])

    def status(self, i: int) -> dict:
        return json.loads(http("GET", self.urls[i] + "/status", timeout=2)[1])

    def voters(self) -> int:
        st = self.status(0)
        return sum(1 for m in st["members"] if m["role"] == "voter") if st["role"] == "leader" else 0

    def leader(self, timeout_seconds: float = 60.0) -> int:
        """The node that leads, waiting out an election (a loaded machine has them); OSError after the bound."""
        found: list[int] = []

        def find() -> bool:
            for i in list(self.urls):
                try:
                    if self.status(i)["role"] == "leader":
                        found.append(i)
                        return True
                except (OSError, ValueError):
                    continue
            return False

        if poll(find, timeout_seconds, 0.1) is None:
            raise OSError(f"no leader for {timeout_seconds:.0f} s")
        return found[-1]

    def count(self) -> int:
        return self.status(self.leader())["keys"]

    def keys(self) -> set[str]:
        have: set[str] = set()
        after = ""
        while True:
            page = json.loads(http("GET", self.urls[self.leader()] + "/db/?prefix=k&limit=10000" + (
                f"&after={after}" if after else ""), timeout=30)[1])
            have.update(page["keys"])
            if not page.get("next"):
                return have
            after = page["next"]

    def put_request(self, keys: list[str]) -> tuple[str, bytes]:
        if len(keys) == 1:
            return self.urls[self.leader()] + "/db/" + keys[0], b"v" * VALUE_BYTES
        ops = [{"op": "put", "key": k, "value": "v" * VALUE_BYTES} for k in keys]
        return self.urls[self.leader()] + "/txn", json.dumps({"success": ops}).encode()

    def term(self, i: int) -> int:
        return self.status(i)["term"]

    def linearizable_read(self, i: int) -> bool:
        return http("GET", self.urls[i] + "/db/k000000000", timeout=2)[0] == 200

    def snapshot(self, n: int) -> dict:
        leader_dir = os.path.join(self.workdir, f"raftdzmq-node{self.leader()}")
        snaps = sorted((f for f in os.listdir(leader_dir) if f.endswith(".snap")), key=lambda f: int(f[9:-5]))
        out = {"file_bytes": os.path.getsize(os.path.join(leader_dir, snaps[-1])) if snaps else 0,
               "file_index": int(snaps[-1][9:-5]) if snaps else 0}
        out.update(time_store_snapshot(n, self.workdir))
        return out

    def join_fresh(self) -> float | None:
        target = self.status(self.leader())["commit_index"]
        self.start_node(3, join=self.leader())
        return poll(lambda: self.status(3)["applied_index"] >= target, 600, 0.1)


def time_store_snapshot(n: int, workdir: str) -> dict:
    """KeyValueStore.snapshot() of n keys of VALUE_BYTES, written and fsynced: the work a snapshot of this size
    costs, in this process (raftlib on the path)."""
    sys.path.insert(0, ROOT)
    from sortedcontainers import SortedList

    from raftlib.server.store import FEATURE_LEVEL, KeyTable, KeyValueStore

    store = KeyValueStore()
    # The store's own table (64 shards, store.KeyTable), as a node holds it: a plain dict was neither what a node
    # encodes from nor what encode_state reads (it looks keys up in their shards).
    store.data = KeyTable((f"k{i:09d}", (b"v" * VALUE_BYTES, i + 1, i + 1)) for i in range(n))
    # The snapshot walks the ordered keys (store.py), not the dict: without them it encoded an empty map (38 bytes).
    store.keys = SortedList(store.data)
    store.feature_level = FEATURE_LEVEL  # a cluster's level once raised: the format a node writes (V3)
    t0 = time.perf_counter()
    data = store.snapshot()
    encoded = time.perf_counter()
    path = os.path.join(workdir, "snapshot-timing.tmp")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    written = time.perf_counter()
    os.unlink(path)
    size = len(data)
    del store, data
    return {"encode_seconds": encoded - t0, "write_fsync_seconds": written - encoded, "encoded_bytes": size}


class EtcdCluster(Cluster):
    name = "etcd"

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.peers = {i: free_port() for i in range(3)}
        cluster = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, p in self.peers.items())
        for i in range(3):
            self.start_node(i, cluster, "new")
        if poll(lambda: b"true" in http("GET", self.urls[0] + "/health")[1], 30) is None:
            raise SystemExit("scale: etcd did not become healthy")

    def start_node(self, i: int, cluster: str, state: str) -> None:
        cp = free_port()
        self.urls[i] = f"http://127.0.0.1:{cp}"
        self.spawn(i, ["etcd", "--name", f"e{i}", "--data-dir", os.path.join(self.workdir, f"etcd-e{i}"),
                       "--listen-client-urls", self.urls[i], "--advertise-client-urls", self.urls[i],
                       "--listen-peer-urls", f"http://127.0.0.1:{self.peers[i]}", "--initial-advertise-peer-urls",
                       f"http://127.0.0.1:{self.peers[i]}", "--initial-cluster", cluster,
                       "--initial-cluster-state", state, "--quota-backend-bytes", str(8 << 30),
                       "--log-level", "error"])

    def _range(self, i: int, body: dict) -> dict:
        status, data = http("POST", self.urls[i] + "/v3/kv/range", json.dumps(body).encode(), timeout=5)
        if status != 200:
            raise OSError(f"etcd range: {status}")
        return json.loads(data)

    def count(self) -> int:
        return int(self._range(0, {"key": b64("\0"), "range_end": b64("\0"), "count_only": True}).get("count", 0))

    def keys(self) -> set[str]:
        have: set[str] = set()
        start = b64("k")
        while True:
            page = self._range(0, {"key": start, "range_end": b64("l"), "keys_only": True, "limit": 10000})
            keys = [base64.b64decode(kv["key"]).decode() for kv in page.get("kvs", [])]
            have.update(keys)
            if not page.get("more"):
                return have
            start = b64(keys[-1] + "\0")

    def put_request(self, keys: list[str]) -> tuple[str, bytes]:
        puts = [{"key": b64(k), "value": b64("v" * VALUE_BYTES)} for k in keys]
        if len(keys) == 1:
            return self.urls[0] + "/v3/kv/put", json.dumps(puts[0]).encode()
        return self.urls[0] + "/v3/kv/txn", json.dumps({"success": [{"request_put": p} for p in puts]}).encode()

    def revision(self, i: int, serializable: bool = False) -> int:
        return int(self._range(i, {"key": b64("k000000000"), "serializable": serializable})["header"]["revision"])

    def term(self, i: int) -> int:
        status, data = http("POST", self.urls[i] + "/v3/maintenance/status", b"{}", timeout=2)
        return int(json.loads(data)["raftTerm"])

    def leader(self) -> int:
        return 0

    def linearizable_read(self, i: int) -> bool:
        return self.revision(i) > 0

    def snapshot(self, n: int) -> dict:
        path = os.path.join(self.workdir, "etcd.snapshot")
        t0 = time.monotonic()
        subprocess.run(["etcdctl", "--endpoints", self.urls[0], "snapshot", "save", path], capture_output=True,
                       timeout=600, check=True)
        out = {"file_bytes": os.path.getsize(path), "save_seconds": time.monotonic() - t0}
        os.unlink(path)
        return out

    def join_fresh(self) -> float | None:
        target = self.revision(0)
        self.peers[3] = free_port()
        body = json.dumps({"peerURLs": [f"http://127.0.0.1:{self.peers[3]}"]}).encode()
        answers: list = []
        # etcd refuses a member while one was started lately ("unhealthy cluster"): the restart just before.
        if poll(lambda: answers.append(http("POST", self.urls[0] + "/v3/cluster/member/add", body, timeout=10))
                or answers[-1][0] == 200, 120, 1.0) is None:
            raise OSError(f"etcd member add: {answers[-1][0]} {answers[-1][1][:200]!r}")
        cluster = ",".join(f"e{i}=http://127.0.0.1:{p}" for i, p in self.peers.items())
        t0 = time.monotonic()
        self.start_node(3, cluster, "existing")
        waited = poll(lambda: self.revision(3, serializable=True) >= target, 600, 0.1)
        return None if waited is None else time.monotonic() - t0


# ---- the steps ----------------------------------------------------------------------------------------------


class Prober:
    """Polls every node's status every 20 ms in a thread each: the longest answer (a pause in serving), each
    answer over SLOW_SECONDS (the wall-clock time it was asked, the node and how long: to find it in the nodes'
    logs, --logs), and the terms seen (a change is an election)."""

    SLOW_SECONDS = 0.1

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.stop_event = cluster, threading.Event()
        self.longest_seconds = {i: 0.0 for i in cluster.urls}
        self.slow: list[tuple[str, int, float]] = []
        self.terms: dict[int, set] = {i: set() for i in cluster.urls}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in cluster.urls]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        while not self.stop_event.wait(0.02):
            t0 = time.monotonic()
            try:
                term = self.cluster.term(i)
            except (OSError, ValueError, KeyError):
                term = None
            if term is not None and term not in self.terms[i]:
                if self.terms[i]:  # a new term: an election; the time, to find it in the nodes' logs (--logs)
                    print(f"scale: {time.strftime('%H:%M:%S')} {self.cluster.name} node {i} in term {term}",
                          file=sys.stderr)
                self.terms[i].add(term)
            took = time.monotonic() - t0
            self.longest_seconds[i] = max(self.longest_seconds[i], took)
            if took > self.SLOW_SECONDS:
                asked = time.strftime("%H:%M:%S", time.localtime(time.time() - took))
                self.slow.append((asked, i, round(took, 3)))
                print(f"scale: {asked} {self.cluster.name} node {i}'s status took {took:.3f} s", file=sys.stderr)

    def stop(self) -> dict:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)
        terms = set().union(*self.terms.values())
        return {"longest_status_seconds": max(self.longest_seconds.values()), "terms_seen": sorted(terms),
                "slow_status": self.slow}


def wrk(cluster: Cluster, n: int, mode: str, seconds: float, workdir: str, until=None, bound: float = 0,
        batch: int = 1) -> dict:
    """wrk against the leader, 64 connections; `until` (load): run until it holds, at most `bound` seconds; `batch`
    (load): keys a request writes (over 1: a transaction of that many puts)."""
    script = os.path.join(workdir, f"scale-{mode}.lua")
    with open(script, "w") as f:
        f.write(WRK_LUA % (n, 2, mode, cluster.name, batch, VALUE_BYTES))
    duration = int(bound if until else seconds)
    # wrk's own CPU (user + sys): the children's usage grows by it when it is waited for, and by no one else's
    # meanwhile (the nodes are waited for at the end), so a load bound by wrk's Lua would show here.
    children_cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    p = subprocess.Popen(["wrk", "-t", "2", "-c", "64", "-d", f"{duration}s", "--timeout", "10s", "-s", script,
                          cluster.urls[cluster.leader()]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    waited = poll(until, bound, 0.5) if until else None
    if until:
        p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=duration + 60)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    result = json.loads(line[7:]) if line else {"requests": 0, "errors": -1, "seconds": 1, "p50": 0, "p99": 0}
    result["ops"] = result["requests"] / max(result["seconds"], 1e-9)
    result["wall_seconds"] = time.monotonic() - t0
    result["wrk_cpu_seconds"] = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - children_cpu
    if until:
        result["complete"] = waited is not None
    return result


class Stalled:
    """True once the cluster holds n keys, or its count has not moved for `seconds` (the first pass is done and
    the keys whose write failed, during an election, wait for the repair)."""

    def __init__(self, cluster: Cluster, n: int, seconds: float = 15.0) -> None:
        self.cluster, self.n, self.seconds, self.last, self.since = cluster, n, seconds, -1, time.monotonic()

    def __call__(self) -> bool:
        count = self.cluster.count()
        if count != self.last:
            self.last, self.since = count, time.monotonic()
        return count >= self.n or time.monotonic() - self.since > self.seconds


def repair(cluster: Cluster, n: int, batch: int, passes: int = 3) -> int:
    """Write every key of the n the cluster does not hold, `batch` keys a request, 32 requests at a time; list the
    keys again after each pass and write what is still missing (a repair write can fail too, in an election), at
    most `passes` times. How many keys the first listing missed."""
    from concurrent.futures import ThreadPoolExecutor

    first_missing = None
    for _ in range(passes):
        have = cluster.keys()
        missing = [f"k{i:09d}" for i in range(n) if f"k{i:09d}" not in have]
        first_missing = len(missing) if first_missing is None else first_missing
        if not missing:
            break
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(cluster.put_keys, [missing[i:i + batch] for i in range(0, len(missing), batch)]))
    return first_missing or 0


def measure(cluster: Cluster, n: int, args: argparse.Namespace, workdir: str) -> dict:
    out: dict = {"system": cluster.name, "keys": n}
    pids = {i: p.pid for i, p in cluster.procs.items()}
    out["rss_empty_bytes"] = {i: rss_bytes(pid) for i, pid in pids.items()}
    prober = Prober(cluster)
    t0 = time.monotonic()
    out["load"] = wrk(cluster, n, "load", 0, workdir, until=Stalled(cluster, n), bound=args.load_bound,
                      batch=args.batch)
    out["load"]["batch"] = args.batch
    out["load"]["repaired_keys"] = repair(cluster, n, args.batch) if cluster.count() < n else 0
    out["load"]["complete"] = cluster.count() >= n
    out["load"]["wall_seconds"] = time.monotonic() - t0
    out["load"]["ops"] = n / out["load"]["wall_seconds"]
    out["during_load"] = prober.stop()
    print(f"scale: {cluster.name} {n} keys loaded in {out['load']['wall_seconds']:.0f} s "
          f"({out['load']['ops']:.0f}/s, complete: {out['load']['complete']}; wrk's CPU "
          f"{out['load']['wrk_cpu_seconds']:.1f} s)", file=sys.stderr)
    if args.load_only:
        return out
    time.sleep(2)
    out["rss_bytes"] = {i: rss_bytes(pid) for i, pid in pids.items()}
    lead = cluster.leader()
    out["bytes_per_key"] = (out["rss_bytes"][lead] - out["rss_empty_bytes"][lead]) / n
    out["data_dir_bytes"] = {i: dir_bytes(os.path.join(workdir, d)) for i, d in enumerate(sorted(
        d for d in os.listdir(workdir) if d.startswith(f"{cluster.name}-") and os.path.isdir(os.path.join(workdir,
                                                                                                           d))))}
    out["snapshot"] = cluster.snapshot(n)
    out["write"] = wrk(cluster, n, "write", args.seconds, workdir)
    out["read"] = wrk(cluster, n, "read", args.seconds, workdir)
    follower = next(i for i in sorted(cluster.procs) if i != cluster.leader())
    cluster.kill(follower)
    t0 = time.monotonic()
    cluster.restart(follower)
    waited = poll(lambda: cluster.linearizable_read(follower), args.step_bound, 0.02)
    out["restart_seconds"] = None if waited is None else time.monotonic() - t0
    # The fresh node will hold what the others hold: the largest node's RSS now (the restarted one's new pid too).
    skipped = no_room_for(max(rss_bytes(p.pid) for p in cluster.procs.values()), int(args.memory_reserve * 1e9))
    if skipped:
        print(f"scale: {cluster.name} {n} keys: the fresh node's join {skipped}", file=sys.stderr)
        out["join_seconds"], out["join_skipped"] = None, skipped
        return out
    try:
        out["join_seconds"] = cluster.join_fresh()
    except OSError as e:
        out["join_seconds"], out["join_error"] = None, str(e)
    return out


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "timeout"
    if unit == "MB":
        return f"{v / 1e6:,.1f} MB"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:,.0f}"


def print_table(rows: list[dict]) -> None:
    print(f"{'system':<9}{'keys':>10}{'load/s':>8}{'RSS max':>12}{'B/key':>7}{'snap file':>11}{'snap take':>10}"
          f"{'pause':>8}{'terms':>6}{'write/s':>9}{'read/s':>8}{'restart':>9}{'join':>10}")
    for r in rows:
        snap = r["snapshot"]
        take = snap.get("save_seconds", snap.get("encode_seconds", 0) + snap.get("write_fsync_seconds", 0))
        lead = max(r["rss_bytes"].values())
        # A file under half the encoding's size is an early snapshot (the feature level's raise takes one at once).
        size = snap["file_bytes"] if snap["file_bytes"] >= snap.get("encoded_bytes", 0) / 2 else snap["encoded_bytes"]
        print(f"{r['system']:<9}{r['keys']:>10,}{r['load']['ops']:>8.0f}{fmt(lead, 'MB'):>12}"
              f"{r['bytes_per_key']:>7.0f}{fmt(size, 'MB'):>11}{fmt(take, 's'):>10}"
              f"{fmt(r['during_load']['longest_status_seconds'], 's'):>8}{len(r['during_load']['terms_seen']):>6}"
              f"{r['write']['ops']:>9.0f}{r['read']['ops']:>8.0f}{fmt(r['restart_seconds'], 's'):>9}"
              f"{'skipped' if r.get('join_skipped') else fmt(r['join_seconds'], 's'):>10}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("keys", type=int, nargs="+", help="key counts, e.g. 100000 1000000")
    one_system = p.add_mutually_exclusive_group()
    one_system.add_argument("--no-etcd", action="store_true", help="raftdzmq only")
    one_system.add_argument("--no-raftdzmq", action="store_true", help=(
        "etcd only (when both systems' runs at a size do not fit in one sitting: etcd's next to raftdzmq's)"))
    p.add_argument("--batch", type=int, default=1, metavar="K", help=(
        "load K keys a request: a transaction of K puts (raftdzmq POST /txn, etcd /v3/kv/txn), at most 128 (both "
        "systems' limit of ops a transaction); the repair pass too. Default 1: one put a key, the way most "
        "clients write"))
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of each throughput run (default 5)")
    p.add_argument("--load-bound", type=float, default=1800.0, help="seconds the load may take (default 1800)")
    p.add_argument("--step-bound", type=float, default=300.0, help="seconds a restart may take (default 300)")
    p.add_argument("--raftdzmq-flag", action="append", default=[], help="extra flag for every raftdzmq node")
    p.add_argument("--memory-reserve", type=float, default=5.0, metavar="GB", help=(
        "GB that must stay available besides the fresh node's estimate, or its join is skipped (default 5)"))
    p.add_argument("--load-only", action="store_true", help=(
        "stop after the load (its rate, longest status pause and terms seen): to count leader changes"))
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--logs", metavar="DIR", help="keep every node's log in DIR (named KEYS-SYSTEM-NODE.log)")
    args = p.parse_args()
    if not 1 <= args.batch <= 128:
        p.error("--batch: 1 to 128 (the most ops a transaction may have)")
    if args.no_raftdzmq and not shutil.which("etcd"):
        p.error("--no-raftdzmq: etcd is not installed")
    if not shutil.which("wrk"):
        raise SystemExit("scale: needs wrk (apt-get install wrk)")
    systems = ([] if args.no_raftdzmq else ["raftdzmq"]) + (
        [] if args.no_etcd or not shutil.which("etcd") else ["etcd"])
    # etcd's snapshot step runs etcdctl: checked now, not after a load that can take a quarter of an hour.
    if "etcd" in systems and not shutil.which("etcdctl"):
        raise SystemExit("scale: etcd's runs need etcdctl (apt-get install etcd-client)")
    rows = []
    for n in args.keys:
        for system in systems:
            workdir = tempfile.mkdtemp(prefix=f"raftdzmq-scale-{system}-")
            cluster: Cluster | None = None
            try:
                cluster = RaftCluster(workdir, args.raftdzmq_flag) if system == "raftdzmq" else EtcdCluster(workdir)
                rows.append(measure(cluster, n, args, workdir))
            finally:
                if cluster is not None:
                    cluster.stop()
                if args.logs:
                    os.makedirs(args.logs, exist_ok=True)
                    for name in os.listdir(workdir):
                        if name.endswith(".log"):
                            shutil.copy(os.path.join(workdir, name), os.path.join(args.logs, f"{n}-{name}"))
                shutil.rmtree(workdir, ignore_errors=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    if args.load_only:
        for r in rows:
            during = r["during_load"]
            print(f"{r['system']} {r['keys']:,} keys: {r['load']['ops']:,.0f} keys/s, longest status pause "
                  f"{during['longest_status_seconds']:.2f} s, terms seen {during['terms_seen']}")
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
