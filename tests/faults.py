"""Jepsen-style fault runs against real raftdzmq processes, with the history checked for linearizability.

    python tests/faults.py --nodes 3 --seconds 60 --seed 7 --faults kill,pause,restart-all
    python tests/faults.py --nodes 5 --seconds 600 --faults kill,pause,restart-all,partition,loss   # as root
    python tests/faults.py --faults kill,membership --crash-points --snapshot-threshold 4096
    python tests/faults.py --faults kill,skewed-pause --clock-rate 0.87 --read-consistency lease

Clients (threads, one HTTP request at a time each, any node; the nodes run with -forward) write unique values to a
few register keys, read them back with the default linearizable reads, and insert unique keys of their own. Every
operation is recorded with its invocation and completion times and its outcome: ok, failed for sure, or unknown.
A nemesis driven by one seeded RNG meanwhile injects one fault at a time, in shuffled rounds of the enabled kinds:
  kill             SIGKILL a node (the leader half the time), restart it later without -join
  pause            SIGSTOP a node (the leader half the time), SIGCONT it later
  restart-all      SIGKILL every node at once, then start them all again
  partition        (root) isolate the leader, or split the nodes into a majority and a minority
  loss             (root) drop a share of one node's packets at random
  remove           DELETE /cluster/ID of a voter (the leader half the time), wipe its data dir, bring it back with
                   -join as a new node, and wait until it is a voter again
  add              add a spare node (-join, until it is a voter); the next time, remove it again and wipe it
  removed-restart  remove a voter, restart it on its old data dir (it does not know it was removed) for a few
                   seconds: the leader's term must not move because of it; then wipe it and let it join again
  transfer         POST /cluster/transfer?to=ID to another voter
  slow-disk        every log fdatasync of one node (a follower, the next time the leader) takes 0.2-0.5 s for a
                   while; when the node stays a follower, the others must keep acknowledging writes meanwhile
  skewed-pause     (with --clock-rate) hand leadership to the node whose clock is skewed, then SIGSTOP it for 1-2 s
  membership       all of remove, add, removed-restart and transfer
Options that apply to every kind: --snapshot-threshold (default 4 KB, with -snapshot-log-ratio 0: snapshots and
InstallSnapshot all the time),
--crash-points (RAFTDZMQ_CRASH_POINTS on every node, raftlib/crashpoints.py: a node that SIGKILLs itself at a named
point is restarted, as a fault, the run goes on), --clock-rate R (RAFTDZMQ_TEST_CLOCK_RATE on one node, chosen by
the seed: its ticks run R times as fast; the README's lease margin is 1.25 between a leader and a voter).
The test-only variables these set on the node processes (each ignored unless set): RAFTDZMQ_CRASH_POINTS and
RAFTDZMQ_CRASH_SEED (raftlib/crashpoints.py), RAFTDZMQ_TEST_CLOCK_RATE (raftlib/runtime.py: the rate of the clock
the node's ticks are derived from), RAFTDZMQ_TEST_FSYNC_DELAY_FILE (raftlib/server/node.py: a file holding the seconds each
log fdatasync blocks the process first; the nemesis writes and deletes it).
For the network faults each node runs in its own network namespace, joined to the others by veth pairs on a bridge
in a hub namespace, where this runner and its clients live; cuts are iptables rules inside the node namespaces
(this kernel has no tc netem). After the run every fault is healed and the run fails unless: the history is
linearizable, every acknowledged insert is on every member at the end and nothing was invented, all members
converge to the same state, and no node exited (other than at a crash point) or logged a traceback.
Beside the clients, by default (tests/fault_coord.py has their rules and checks): --watchers N streams of
GET /watch that reconnect to other nodes with Last-Event-ID and must see exactly the committed changes; a lease
kept alive whose keys must never vanish early and leases let lapse whose keys must go (--no-leases to leave them
out); --counters N clients incrementing counters with compare-and-set transactions that must lose no increment.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import hashlib
import hmac
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fault_coord import Coordination  # noqa: E402
from linearizability import READ, WRITE, Op, check  # noqa: E402
from procs import Node, http_request, wait_for  # noqa: E402

MEMBERSHIP_FAULTS = ("remove", "add", "removed-restart", "transfer")
FAULTS = ("kill", "pause", "restart-all", "partition", "loss", *MEMBERSHIP_FAULTS, "slow-disk", "skewed-pause")
NETWORK_FAULTS = ("partition", "loss")
REGISTER_KEYS = ("r0", "r1", "r2")
SUBNET = "10.77.0"
REFUSED = object()
# Answers that say a write was certainly not applied; any other failure leaves its outcome unknown.
DEFINITE_FAILURES = ("raft.Server: Not current leader", "no leader is known", "write refused", "write lost")
# Every point at a small probability per hit; the hot ones (hit on every save) lower, so that a node dies at one
# every ten seconds or so under the clients' load, and the snapshot points (hit a few times a second with tiny
# snapshots) often enough to be reached in a short run.
DEFAULT_CRASH_POINTS = "runtime.after_save=0.0003,log.after_write=0.0003,log.after_fsync=0.0003,*=0.004"
CRASH_LINE = re.compile(r"crash point (\S+): killing this process")
# How long a node may take to come back as a voter after a join (a snapshot to install, a crash point on the way).
JOIN_SECONDS = 40


@dataclasses.dataclass
class Stats:
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    faults: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    crash_points: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    slow_disk_windows: list = dataclasses.field(default_factory=list)


class Netns:
    """A hub namespace with a bridge, one namespace per node, and iptables cuts between them."""

    def __init__(self, size: int) -> None:
        tag = f"rdz{os.getpid() % 100000}"
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-n{i}" for i in range(1, size + 1)]
        self.addresses = [f"{SUBNET}.{i}" for i in range(1, size + 1)]
        self._made: list[str] = []

    def up(self) -> None:
        self._add(self.hub)
        self._ip(self.hub, "link", "set", "lo", "up")
        self._ip(self.hub, "link", "add", "br0", "type", "bridge")
        self._ip(self.hub, "addr", "add", f"{SUBNET}.254/24", "dev", "br0")
        self._ip(self.hub, "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(zip(self.names, self.addresses), 1):
            self._add(ns)
            self._ip(ns, "link", "set", "lo", "up")
            self._ip(self.hub, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip(self.hub, "link", "set", f"v{i}", "master", "br0")
            self._ip(self.hub, "link", "set", f"v{i}", "up")
            self._ip(ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            self._ip(ns, "link", "set", "eth0", "up")

    def enter_hub(self) -> None:
        """Move this process (its main thread, before any other starts) into the hub, where the nodes are reachable."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{self.hub}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns into the hub namespace failed")
        finally:
            os.close(fd)

    def wrap(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[i])

    def cut(self, a: int, b: int) -> None:
        for x, y in ((a, b), (b, a)):
            self._iptables(x, "-A", "INPUT", "-s", self.addresses[y], "-j", "DROP")
            self._iptables(x, "-A", "OUTPUT", "-d", self.addresses[y], "-j", "DROP")

    def lossy(self, i: int, probability: float) -> None:
        for chain in ("INPUT", "OUTPUT"):
            self._iptables(i, "-A", chain, "-m", "statistic", "--mode", "random", "--probability", f"{probability}",
                           "-j", "DROP")

    def heal(self) -> None:
        for i in range(len(self.names)):
            self._iptables(i, "-F")

    def down(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    def _add(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._made.append(ns)

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _run("ip", "-n", ns, *args)

    def _iptables(self, i: int, *args: str) -> None:
        _run("ip", "netns", "exec", self.names[i], "iptables", "-w", *args)


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")


class Client(threading.Thread):
    def __init__(self, run: "FaultRun", number: int) -> None:
        super().__init__(daemon=True, name=f"client-{number}")
        self.run_ = run
        self.number = number
        self.rng = random.Random(run.seed * 1000 + number)
        self.history: list[Op] = []
        self.inserts: dict[str, str] = {}  # key -> "ok" | "unknown" | "failed"
        self.acknowledged: list[tuple[float, float, Node]] = []  # (returned, seconds taken, node) of each ok write
        self.puts: list[tuple[int, str, str]] = []  # (X-Raft-Index, key, value) of each write answered 200
        self.written: dict[str, set[str]] = collections.defaultdict(set)  # key -> values written, any outcome
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # a bug of the test itself: the run fails with it
            self.error = e
            raise

    def _run(self) -> None:
        seq = 0
        while not self.run_.stopping.is_set():
            seq += 1
            node = self.rng.choice(self.run_.targets)  # the nemesis replaces the list as members come and go
            dice = self.rng.random()
            if dice < 0.4:
                self.write(node, self.rng.choice(REGISTER_KEYS), f"c{self.number}-{seq}")
            elif dice < 0.8:
                self.read(node, self.rng.choice(REGISTER_KEYS))
            else:
                self.insert(node, f"ins-c{self.number}-{seq}")

    def _request(self, method: str, node: Node, path: str, body: str | None = None):
        """The response; REFUSED when no connection was made (nothing was sent); None when the outcome is unknown."""
        try:
            r = http_request(method, node.address, path, body, timeout=self.run_.request_timeout_seconds)
        except ConnectionRefusedError:
            r = REFUSED
        except (OSError, http.client.HTTPException):  # e.g. the node died in the middle of its answer
            r = None
        if r is None or r is REFUSED or r.status >= 300:
            time.sleep(0.05)  # a down node answers at once: do not spin on it
        return r

    def _note_put(self, key: str, value: str, r) -> None:
        """For the watchers' checks (fault_coord.py): what was written, and where each acknowledged put went."""
        self.written[key].add(value)
        if r is not None and r is not REFUSED and r.status == 200 and "x-raft-index" in r.headers:
            self.puts.append((int(r.headers["x-raft-index"]), key, value))

    def _write_outcome(self, r) -> str:
        if r is REFUSED:
            return "failed"
        if r is not None and r.status == 200:
            return "ok"
        if r is not None and (r.status < 500 or any(s in r.text for s in DEFINITE_FAILURES)):
            return "failed"
        return "unknown"

    def write(self, node: Node, key: str, value: str) -> None:
        call = time.monotonic()
        r = self._request("POST", node, f"/db/{key}", value)
        ret = time.monotonic()
        self._note_put(key, value, r)
        outcome = self._write_outcome(r)
        self.run_.stats.ops[f"write {outcome}"] += 1
        if outcome == "ok":
            self.acknowledged.append((ret, ret - call, node))
        if outcome != "failed":
            self.history.append(Op(key, WRITE, value, call, ret if outcome == "ok" else math.inf, self.number))

    def read(self, node: Node, key: str) -> None:
        call = time.monotonic()
        r = self._request("GET", node, f"/db/{key}" + self.run_.read_query)
        ret = time.monotonic()
        if r is not None and r is not REFUSED and r.status in (200, 404):
            self.history.append(Op(key, READ, r.text if r.status == 200 else None, call, ret, self.number))
            self.run_.stats.ops["read ok"] += 1
        else:
            self.run_.stats.ops["read failed"] += 1

    def insert(self, node: Node, key: str) -> None:
        call = time.monotonic()
        r = self._request("POST", node, f"/db/{key}", key)
        self._note_put(key, key, r)
        outcome = self._write_outcome(r)
        self.inserts[key] = outcome
        self.run_.stats.ops[f"insert {outcome}"] += 1
        if outcome == "ok":
            ret = time.monotonic()
            self.acknowledged.append((ret, ret - call, node))


class FaultRun:
    def __init__(self, size: int, seconds: float, seed: int, faults: list[str], base_dir: str, clients: int = 6,
                 log=print, read_consistency: str = "linearizable", snapshot_threshold_bytes: int | None = 4096,
                 crash_points: str | None = None, clock_rate: float | None = None,
                 request_timeout_seconds: float = 3.0, watchers: int = 3, leases: bool = True, counters: int = 2,
                 allow_watch_gaps: bool = False, unsafe_lease_no_reset: bool = False) -> None:
        faults = [f for name in faults for f in (MEMBERSHIP_FAULTS if name == "membership" else (name,))]
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        if "skewed-pause" in faults and clock_rate is None:
            raise ValueError("skewed-pause needs --clock-rate")
        self.size, self.seconds, self.seed, self.faults = size, seconds, seed, faults
        self.rng = random.Random(seed)
        self.base_dir = base_dir
        self.n_clients = clients
        self.log = log
        self.stats = Stats()
        self.read_query = "" if read_consistency == "linearizable" else f"?consistency={read_consistency}"
        self.request_timeout_seconds = request_timeout_seconds
        self.crash_points = crash_points
        self.clock_rate = clock_rate
        self.stopping = threading.Event()
        self.t0 = time.monotonic()
        n_slots = size + (1 if "add" in faults else 0)  # a spare for "add"
        self.netns = Netns(n_slots) if any(f in NETWORK_FAULTS for f in faults) else None
        extra = ("-forward", "-write-timeout", "2", "-read-timeout", "2", "-join-timeout", str(JOIN_SECONDS))
        if snapshot_threshold_bytes:  # that threshold alone (-snapshot-log-ratio 0): snapshots all the time
            extra += ("-snapshot-threshold", str(snapshot_threshold_bytes), "-snapshot-log-ratio", "0")
        self.secret: bytes | None = None
        if self.netns:
            # Beyond loopback, as a real deployment: with a cluster secret, so signed frames get the faults too.
            self.secret = f"fault-run-secret-{seed}".encode()
            secret_file = os.path.join(base_dir, "secret")
            with open(secret_file, "wb") as f:
                f.write(self.secret + b"\n")
            extra += ("-secret-file", secret_file)
            self.slots = [Node(f"node.{i + 1}", base_dir, host=self.netns.addresses[i], ports=(5551 + i, 8081 + i),
                               wrap=self.netns.wrap(i)) for i in range(n_slots)]
        else:
            self.slots = [Node(f"node.{i}", base_dir) for i in range(1, n_slots + 1)]
        self.extra = extra
        self.slot = {node: i for i, node in enumerate(self.slots)}
        self.skewed = self.slots[self.rng.randrange(size)] if clock_rate is not None else None
        self.members: list[Node] = list(self.slots[:size])  # what the runner keeps as members of the cluster
        self.targets: list[Node] = list(self.members)  # where clients send requests
        self.up: set[Node] = set()  # started and not stopped by the nemesis: an exit is a crash (point) to handle
        self.paused: set[Node] = set()
        self.starts: collections.Counter = collections.Counter()
        self.joined: set[Node] = set()  # nodes whose current identity the cluster has as a voter
        self.crashed: dict[Node, float] = {}  # nodes that died at a crash point -> when to restart them
        self._reaping = False
        self.probes = 0
        self.probe_history: list[Op] = []  # the skewed-pause probe's operations (list.append: thread-safe)
        self.restart_all_times: list[float] = []  # when each restart-all began (a watcher's gap may follow one)
        self.healed_at = math.inf
        self.unsafe_lease_no_reset = unsafe_lease_no_reset
        self.coord = Coordination(self, watchers, leases, counters, allow_watch_gaps)

    # -- the run ----------------------------------------------------------------------------------------------------

    def execute(self) -> dict:
        if self.netns:
            self.netns.up()
            self.netns.enter_hub()
        try:
            if self.skewed is not None:
                self._say(f"{self.skewed.name}'s clock runs at {self.clock_rate}x")
            self._start_cluster()
            self.coord.start()
            started = time.monotonic()
            clients = [Client(self, i) for i in range(self.n_clients)]
            self.clients = clients
            for c in clients:
                c.start()
            try:
                self._nemesis(started + self.seconds)
            finally:
                self._heal_everything()
                self.stopping.set()
                for c in clients:
                    c.join(self.request_timeout_seconds * 3)
                self.coord.stop()
            return self._verify(clients, time.monotonic() - started)
        finally:
            self.coord.close()
            for node in list(self.paused):
                self._signal(node, signal.SIGCONT)
            for node in self.slots:
                node.kill()
            if self.netns:
                self.netns.down()

    def _start_cluster(self) -> None:
        first = self.members[0]
        self._start(first)
        self.joined.add(first)  # it made the cluster
        self._wait(lambda: first.status()["role"] == "leader", 15, "the first node to lead")
        for node in self.members[1:]:
            self._start(node, join=first.address)
            self._wait_voter(node)

    def _nemesis(self, until: float) -> None:
        """Rounds of every enabled fault once, in a shuffled order, with quiet spells between faults."""
        round_: list[str] = []
        while time.monotonic() < until:
            self._sleep(self.rng.uniform(0.5, 1.5))
            if time.monotonic() >= until:
                break
            if not round_:
                round_ = self.rng.sample(self.faults, len(self.faults))
            fault = round_.pop()
            self.stats.faults[fault] += 1
            getattr(self, "_fault_" + fault.replace("-", "_"))()

    # -- nodes ------------------------------------------------------------------------------------------------------

    def _env(self, node: Node) -> dict[str, str]:
        env = {}
        if self.crash_points:
            self.starts[node] += 1
            env["RAFTDZMQ_CRASH_POINTS"] = self.crash_points
            env["RAFTDZMQ_CRASH_SEED"] = f"{self.seed}-{node.name}-{self.starts[node]}"
        if node is self.skewed:
            env["RAFTDZMQ_TEST_CLOCK_RATE"] = str(self.clock_rate)
        if self.unsafe_lease_no_reset:
            env["RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET"] = "1"
        if "slow-disk" in self.faults:
            env["RAFTDZMQ_TEST_FSYNC_DELAY_FILE"] = self._delay_file(node)
        return env

    def _delay_file(self, node: Node) -> str:
        return os.path.join(self.base_dir, f"{node.name}.fsync-delay")

    def _start(self, node: Node, join: str | None = None) -> None:
        node.start(*self.extra, join=join, env=self._env(node))
        self.up.add(node)

    @staticmethod
    def _node_id(node: Node) -> str | None:
        """The identity in the node's data dir (written before it serves), or None before it has one."""
        try:
            with open(os.path.join(node.data_dir, "node.json")) as f:
                return json.load(f)["node_id"]
        except (OSError, ValueError, KeyError):
            return None

    def _leader(self, timeout: float = 20) -> Node:
        return self._wait(self._leader_now, timeout, "a leader")

    def _leader_now(self) -> Node | None:
        """The member that leads in the highest term (an isolated old leader may still think it leads), or None."""
        best, best_term = None, -1
        for node in self.members:
            if node not in self.up or node in self.paused:
                continue
            try:
                st = node.status()
            except (OSError, ValueError):
                continue
            if st["role"] == "leader" and st["term"] > best_term:
                best, best_term = node, st["term"]
        return best

    def _leader_term(self) -> int:
        return self._wait(lambda: self._leader().status()["term"], 20, "the leader's term")

    def _membership(self) -> tuple[set[str], set[str]]:
        """(voters, learners) as the leader sees them."""
        members = self._wait(lambda: self._leader().status()["members"], 20, "the leader's configuration")
        return ({m["id"] for m in members if m["role"] == "voter"}, {m["id"] for m in members if m["role"] != "voter"})

    def _wait_voter(self, node: Node) -> None:
        def is_voter():
            voters, _ = self._membership()
            return self._node_id(node) in voters

        self._wait(is_voter, JOIN_SECONDS, f"{node.name} to become a voter")
        self.joined.add(node)

    def _target(self) -> Node:
        """The leader half the time, else any member."""
        if self.rng.random() < 0.5:
            leader = self._leader_or_none()
            if leader is not None:
                return leader
        return self.rng.choice(self.members)

    def _leader_or_none(self) -> Node | None:
        try:
            return self._leader(timeout=2)
        except AssertionError:
            return None

    def _kill(self, node: Node) -> None:
        self._reap()
        if node not in self.up:
            return
        if node in self.paused:
            self._signal(node, signal.SIGCONT)
            self.paused.discard(node)
        node.kill(signal.SIGKILL)
        self.up.discard(node)

    def _restart(self, node: Node) -> None:
        if node not in self.up and node not in self.crashed:  # the reaper brings back those
            self._start(node)

    def _rejoin(self, node: Node) -> None:
        """Start `node` on an empty data dir as a new node that joins through a member, and wait until it votes."""
        node.wipe()
        self.joined.discard(node)
        others = [n for n in self.members if n is not node]
        self._start(node, join=self.rng.choice(others).address)
        self._wait_voter(node)

    def _signal(self, node: Node, sig: int) -> None:
        proc = node.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    def _reap(self) -> None:
        """A node that SIGKILLed itself at a crash point is a fault: note it, and restart it a moment later. A node
        that exited any other way fails the run."""
        if self._reaping:
            return  # called again from a wait of the reaper's own
        self._reaping = True
        try:
            for node in list(self.up):
                if node.exited():
                    self._note_crash(node)
            for node in list(self.crashed):
                self._bring_back(node)
        finally:
            self._reaping = False

    def _note_crash(self, node: Node) -> None:
        point = CRASH_LINE.search(node.log_text(current=True))
        if point is None or node.proc.returncode != -signal.SIGKILL:
            self._ensure_ran_well(node)
        self.up.discard(node)
        self.paused.discard(node)
        self.stats.crash_points[point.group(1)] += 1
        self._say(f"{node.name} died at crash point {point.group(1)}")
        self.crashed[node] = time.monotonic() + self.rng.uniform(0.1, 1.0)

    def _bring_back(self, node: Node) -> None:
        if node not in self.members:
            del self.crashed[node]  # a removed node the nemesis ran on its old dir: it is wiped and joins again
            return
        if time.monotonic() < self.crashed[node]:
            return
        if node in self.joined:
            del self.crashed[node]
            self._start(node)
            return
        # It died while it was joining: if its join did not go through, its data dir can never join (the server
        # ignores -join once it has an identity), so it starts afresh. Which it is, only a leader can say; without
        # one now, the next reap asks again (the nodes that make one may be among those still to restart).
        leader = self._leader_now()
        if leader is None:
            return
        try:
            members = {m["id"] for m in leader.status()["members"]}
        except (OSError, ValueError):
            return
        del self.crashed[node]
        if self._node_id(node) in members:
            self._start(node)
        else:
            # A join that reached the leader just before the node died leaves a learner behind that nobody runs:
            # _members_are_voters removes it at the end.
            node.wipe()
            others = [n for n in self.members if n in self.joined] or [n for n in self.members if n is not node]
            self._start(node, join=self.rng.choice(others).address)

    def _in_configuration(self, node: Node) -> bool:
        """Whether the identity in `node`'s data dir is in the leader's configuration (its join went through)."""
        voters, learners = self._membership()
        return self._node_id(node) in voters | learners

    def _say(self, what: str) -> None:
        self.log(f"{time.monotonic() - self.t0:7.2f}s nemesis: {what}")

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self._reap()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))

    def _wait(self, predicate, timeout: float, what: str):
        """wait_for, restarting nodes that die at crash points meanwhile."""
        def step():
            self._reap()
            return predicate()

        return wait_for(step, timeout, what, interval=0.1)

    def _hold(self) -> None:
        self._sleep(self.rng.uniform(0.6, 3.0))

    def _ensure_ran_well(self, node: Node) -> None:
        """A node must never exit or trace back on its own: a crash is a failure, not a fault (a crash point's
        SIGKILL is a fault: _reap)."""
        if node.proc is None and not os.path.exists(node.log_path):
            return  # never started (a spare)
        if node in self.up and node.exited():
            raise AssertionError(f"{node.name} exited on its own with code {node.proc.returncode}:\n"
                                 + node.log_text(current=True)[-3000:])
        text = node.log_text()
        if "Traceback" in text:
            raise AssertionError(f"{node.name} logged a traceback:\n" + text[text.index("Traceback"):][:3000])

    # -- faults -----------------------------------------------------------------------------------------------------

    def _fault_kill(self) -> None:
        node = self._target()
        self._say(f"SIGKILL {node.name}")
        self._kill(node)
        self._hold()
        self._restart(node)

    def _fault_pause(self) -> None:
        node = self._target()
        self._pause(node, self.rng.uniform(0.6, 3.0))

    def _pause(self, node: Node, seconds: float) -> None:
        self._say(f"SIGSTOP {node.name} for {seconds:.1f}s")
        self._signal(node, signal.SIGSTOP)
        self.paused.add(node)
        self._sleep(seconds)
        self._signal(node, signal.SIGCONT)
        self.paused.discard(node)

    def _fault_restart_all(self) -> None:
        self._say("SIGKILL every node, then restart them all")
        self.restart_all_times.append(time.monotonic())
        for node in self.members:
            self._kill(node)
        time.sleep(self.rng.uniform(0.1, 1.0))
        for node in self.members:
            self._restart(node)

    def _fault_partition(self) -> None:
        nodes = [self.slot[n] for n in self.members]
        leader = self._leader_or_none()
        if leader is not None and self.rng.random() < 0.5:
            minority = [self.slot[leader]]
        else:
            self.rng.shuffle(nodes)
            minority = nodes[: (len(nodes) - 1) // 2]
        majority = [i for i in nodes if i not in minority]
        self._say(f"partition {[self.slots[i].name for i in minority]} from the rest")
        for a in minority:
            for b in majority:
                self.netns.cut(a, b)
        self._hold()
        self.netns.heal()

    def _fault_loss(self) -> None:
        node = self._target()
        self._say(f"drop 30% of {node.name}'s packets")
        self.netns.lossy(self.slot[node], 0.3)
        self._hold()
        self.netns.heal()

    def _remove(self, node: Node) -> None:
        """DELETE /cluster/ID through the leader until the leader's configuration no longer has the node."""
        node_id = self._node_id(node)
        assert node_id is not None, f"{node.name} has no identity to remove"

        def removed():
            voters, learners = self._membership()
            if node_id not in voters | learners:
                return True
            r = self._admin(self._leader(), "DELETE", f"/cluster/{node_id}")
            self.stats.notes[f"DELETE /cluster answered {r.status}"] += 1
            return None

        self._wait(removed, 30, f"{node.name} ({node_id}) to be removed")

    def _fault_remove(self) -> None:
        node = self._target()
        self._say(f"remove {node.name} from the cluster, wipe it and join it again")
        self._remove(node)
        self.members.remove(node)
        self.targets = [n for n in self.targets if n is not node]
        self._kill(node)
        self._sleep(self.rng.uniform(0.2, 1.5))
        self.members.append(node)
        self._rejoin(node)
        self.targets = list(self.members)

    def _fault_add(self) -> None:
        spare = self.slots[-1]
        if spare not in self.members:
            self._say(f"add {spare.name} to the cluster")
            self.members.append(spare)
            self._rejoin(spare)
            self.targets = list(self.members)
        else:
            self._say(f"remove {spare.name}, the node added before")
            self._remove(spare)
            self.members.remove(spare)
            self.targets = list(self.members)
            self._kill(spare)
            spare.wipe()
            self.joined.discard(spare)

    def _fault_removed_restart(self) -> None:
        """A removed node restarted on its old dir does not know it was removed (its log may end before the
        removal): it must not disturb the members (thesis §4.2.3)."""
        node = self._target()
        self._say(f"remove {node.name}, then restart it on its old data dir")
        self._remove(node)
        self.members.remove(node)
        self._kill(node)
        term_before = self._leader_term()
        self._start(node)  # in `targets` still: it must not answer a read from its stale state either
        self._sleep(self.rng.uniform(2.0, 4.0))
        term_after = self._leader_term()
        campaigned = "starting an election" in node.log_text(current=True)
        if term_after != term_before:
            if campaigned:
                raise AssertionError(f"the leader's term moved from {term_before} to {term_after} while {node.name}, "
                                     f"removed, ran elections:\n" + node.log_text(current=True)[-3000:])
            self.stats.notes["removed-restart: term moved, not by the removed node"] += 1
        self.targets = [n for n in self.targets if n is not node]
        self._kill(node)
        self.members.append(node)
        self._rejoin(node)
        self.targets = list(self.members)

    def _fault_transfer(self) -> None:
        leader = self._leader()
        others = [n for n in self.members if n is not leader]
        if self.skewed in others and self.rng.random() < 0.5:
            target = self.skewed
        else:
            target = self.rng.choice(others)
        self._transfer(leader, target)

    def _admin(self, node: Node, method: str, target: str):
        """An admin request; with a cluster secret, signed as the server wants it: HMAC-SHA256 under the secret of
        "raftdzmq-admin-v1\n" METHOD "\n" TARGET "\n" TIMESTAMP "\n" BODY (a server that does not check ignores it)."""
        headers = {}
        if self.secret is not None:
            timestamp = f"{time.time():.6f}"
            message = f"raftdzmq-admin-v1\n{method}\n{target}\n{timestamp}\n".encode()
            headers = {"X-Raftdzmq-Timestamp": timestamp,
                       "X-Raftdzmq-Signature": hmac.new(self.secret, message, hashlib.sha256).hexdigest()}
        return node.request(method, target, timeout=5, headers=headers)

    def _transfer(self, leader: Node, target: Node) -> int:
        self._say(f"transfer leadership from {leader.name} to {target.name}")
        try:
            r = self._admin(leader, "POST", f"/cluster/transfer?to={self._node_id(target)}")
            status = r.status
        except OSError:
            status = 0
        self.stats.notes[f"transfer answered {status}"] += 1
        return status

    def _fault_skewed_pause(self) -> None:
        """Lease reads under a clock-rate fault: the skewed node leads, then stops for longer than the others'
        election timeout, and the others elect a leader. A probe writes every register through that leader and
        sends a lease read of each to the stopped node, where they wait in its socket. Then the others stop and the
        skewed node wakes alone, as an old leader cut off from the new majority would be: within the README's
        margin its lease has run out, by its own clock, and it cannot confirm a read until the others wake; well
        beyond the margin it answers from memory at once, and the checker sees the stale values."""
        node = self.skewed
        for _ in range(5):
            leader = self._leader()
            if leader is node or self._transfer(leader, node) == 200:
                break
            self._sleep(0.3)
        else:
            self.stats.notes["skewed-pause: no transfer"] += 1
            return
        self._sleep(0.2)  # its no-op commits and a majority answers: its lease starts
        seconds = self.rng.uniform(1.0, 2.0)
        self._say(f"SIGSTOP {node.name} for {seconds:.1f}s; then it wakes while the others are stopped")
        wake_at = time.monotonic() + seconds
        others = [n for n in self.members if n is not node and n in self.up]
        readers = []
        self._signal(node, signal.SIGSTOP)
        self.paused.add(node)
        try:
            readers = self._probe(node)
            self._sleep(max(0.1, wake_at - time.monotonic()))  # at least: the reads are in its socket
            for n in others:
                self._signal(n, signal.SIGSTOP)
                self.paused.add(n)
            self._signal(node, signal.SIGCONT)
            self.paused.discard(node)
            self._sleep(0.5)
        finally:
            for n in [node, *others]:
                self._signal(n, signal.SIGCONT)
                self.paused.discard(n)
        for t in readers:
            t.join(10)

    def _probe(self, stopped: Node) -> list[threading.Thread]:
        """Write a new value to every register through the leader the others elected, then read each from
        `stopped` in a thread of its own (it answers once it wakes). Every operation goes into the history."""
        try:
            leader = self._leader(timeout=5)  # among the nodes that run: `stopped` is paused
        except AssertionError:
            self.stats.notes["skewed-pause: no new leader to probe"] += 1
            return []
        self.probes += 1
        for key in REGISTER_KEYS:
            value = f"probe-{self.probes}-{key}"
            self.coord.wrote(key, value)  # the watchers' "nothing invented" check
            call = time.monotonic()
            try:
                r = leader.request("POST", f"/db/{key}", value, timeout=3)
                ok = r.status == 200
            except OSError:
                ok = False  # unknown
            self.probe_history.append(Op(key, WRITE, value, call, time.monotonic() if ok else math.inf, -2))

        def read(key: str) -> None:
            call = time.monotonic()
            try:
                r = stopped.request("GET", f"/db/{key}{self.read_query}", timeout=10)
            except OSError:
                return
            if r.status in (200, 404):
                self.probe_history.append(Op(key, READ, r.text if r.status == 200 else None, call,
                                             time.monotonic(), -2))
                self.stats.notes[f"probe read answered {r.status}"] += 1

        readers = [threading.Thread(target=read, args=(key,), daemon=True) for key in REGISTER_KEYS]
        for t in readers:
            t.start()
        return readers

    def _fault_slow_disk(self) -> None:
        # A follower first, then the leader, and so on: a short run checks the follower case.
        leader = self._leader_or_none()
        if self.stats.faults["slow-disk"] % 2 == 0 and leader is not None:
            node = leader
        else:
            node = self.rng.choice([n for n in self.members if n is not leader])
        seconds = self.rng.uniform(0.2, 0.5)
        hold = self.rng.uniform(2.0, 4.0)
        self._say(f"{node.name}'s fsyncs take {seconds:.2f}s for {hold:.1f}s")
        leader_before = self._leader_or_none()
        # Checked only with every other member up throughout: a majority without the slow node.
        all_up = not self.crashed and all(n in self.up for n in self.members)
        crashes_before = sum(self.stats.crash_points.values())
        with open(self._delay_file(node), "w") as f:
            f.write(f"{seconds}\n")
        t0 = time.monotonic()
        try:
            self._sleep(hold)
        finally:
            t1 = time.monotonic()
            os.unlink(self._delay_file(node))
        leader_after = self._leader_or_none()
        # The writes acknowledged through the other nodes (clients that picked the slow node wait for it).
        others = sorted(took for c in self.clients for ret, took, via in c.acknowledged
                        if t0 <= ret <= t1 and via is not node)
        follower = leader_before is not None and leader_before is leader_after and leader_before is not node
        window = {"node": node.name, "fsync_seconds": round(seconds, 2), "seconds": round(t1 - t0, 1),
                  "leaders": [n.name if n else None for n in (leader_before, leader_after)],
                  "as_follower": follower, "acknowledged_through_others": len(others),
                  "their_median_seconds": round(others[len(others) // 2], 3) if others else None}
        self.stats.slow_disk_windows.append(window)
        if follower and all_up and sum(self.stats.crash_points.values()) == crashes_before:
            # A majority without the slow node commits without it: writes through the others keep coming (most
            # clients wait on the slow node, so a few a second), and most of them take less than one of its
            # fsyncs (a leader that waited for it would take more).
            if len(others) < 3 or others[len(others) // 2] >= seconds:
                raise AssertionError(f"with a slow disk on a follower the cluster stalled or waited for it: {window}")

    def _heal_everything(self) -> None:
        if self.netns:
            self.netns.heal()
        for node in list(self.paused):
            self._signal(node, signal.SIGCONT)
            self.paused.discard(node)
        for node in self.slots:
            if os.path.exists(self._delay_file(node)):
                os.unlink(self._delay_file(node))
        for node in self.members:
            self._restart(node)
        self._wait(lambda: not self.crashed, 60, "the nodes that died at crash points to be back")
        self.healed_at = time.monotonic()

    # -- the checks -------------------------------------------------------------------------------------------------

    def _verify(self, clients: list[Client], elapsed: float) -> dict:
        for c in clients:
            if c.error is not None:
                raise AssertionError(f"client {c.number} failed: {c.error!r}")
        self._reap()
        for n in self.slots:
            self._ensure_ran_well(n)
        # Crash points stay armed to the end: the last checks restart what dies, as the nemesis did.
        history = [op for c in clients for op in c.history] + self.probe_history
        # One more linearizable read of every register after the faults, so a lost last write cannot hide.
        for key in REGISTER_KEYS:
            call = time.monotonic()
            r = self._wait(lambda key=key: _ok(self._leader().request("GET", f"/db/{key}", timeout=3)), 30,
                           f"a final read of {key}")
            history.append(Op(key, READ, r.text if r.status == 200 else None, call, time.monotonic(), -1))
        with open(os.path.join(self.base_dir, "history.json"), "w") as f:
            json.dump([dataclasses.astuple(op)[:5] + (op.client,) for op in history], f)
        t0 = time.monotonic()
        result = check(history)
        check_seconds = time.monotonic() - t0
        if not result.ok:
            raise AssertionError(f"history of {len(history)} operations is not linearizable: {result.explanation}")

        self._wait(self._members_are_voters, JOIN_SECONDS, "the members at the end to be the cluster's voters")
        inserts = {k: v for c in clients for k, v in c.inserts.items()}
        acknowledged = {k for k, v in inserts.items() if v == "ok"}
        states = self._converged_states()
        for name, (keys, registers) in states.items():
            missing = acknowledged - keys
            if missing:
                raise AssertionError(f"{name} lost {len(missing)} acknowledged inserts, e.g. {sorted(missing)[:5]}")
            invented = {k for k in keys if k.startswith("ins-")} - set(inserts)
            if invented:
                raise AssertionError(f"{name} has inserts nobody made: {sorted(invented)[:5]}")
        first_name, first = next(iter(states.items()))
        for name, state in states.items():
            if state != first:
                raise AssertionError(f"{name} did not converge to the same state as {first_name}")
        written: dict[str, set[str]] = collections.defaultdict(set)
        for c in clients:
            for key, values in c.written.items():
                written[key] |= values
        coordination = self.coord.verify([p for c in clients for p in c.puts], written, self.healed_at)
        self._reap()
        for n in self.slots:
            self._ensure_ran_well(n)
        logs = "".join(n.log_text() for n in self.slots if os.path.exists(n.log_path))
        ops = self.stats.ops
        return {
            "nodes": self.size, "seed": self.seed, "seconds": round(elapsed, 1), "faults": dict(self.stats.faults),
            "crash_points": dict(self.stats.crash_points), "operations": dict(ops), "history_checked": len(history),
            "check_seconds": round(check_seconds, 2), "acknowledged_writes": ops["write ok"] + ops["insert ok"],
            "linearizable": True, "inserts_present_on_every_node": len(acknowledged),
            "members_at_end": len(self.members), "snapshots_taken": logs.count("took a snapshot at index"),
            "snapshots_installed": logs.count("installed a snapshot at index"), "notes": dict(self.stats.notes),
            **({"slow_disk_windows": self.stats.slow_disk_windows} if self.stats.slow_disk_windows else {}),
            "coordination": coordination,
        }

    def _members_are_voters(self) -> bool:
        voters, learners = self._membership()
        ids = {self._node_id(n) for n in self.members}
        for phantom in learners - ids:  # a join that went through just before its node died at a crash point
            self._admin(self._leader(), "DELETE", f"/cluster/{phantom}")
        return voters == ids and not learners

    def _converged_states(self) -> dict:
        """Once every member has applied what the leader committed: each member's keys and register values."""
        def states():
            commit = self._leader(timeout=10).status()["commit_index"]
            out = {}
            for n in self.members:
                if n.status()["applied_index"] < commit:
                    return None
                keys = set(_list_keys(n))
                registers = tuple(
                    _text_or_none(n.request("GET", f"/db/{k}?consistency=stale", timeout=3)) for k in REGISTER_KEYS)
                out[n.name] = (keys, registers)
            values = list(out.values())
            return out if all(v == values[0] for v in values) else None

        return self._wait(states, 60, "every member to converge to the same state")


def _ok(r):
    return r if r.status in (200, 404) else None


def _text_or_none(r):
    if r.status not in (200, 404):
        raise ValueError(f"stale read answered {r.status}")
    return r.text if r.status == 200 else None


def _list_keys(node: Node) -> list[str]:
    keys, after = [], ""
    while True:
        r = node.request("GET", f"/db/?consistency=stale&limit=10000&after={after}", timeout=3)
        body = r.json()
        keys += body["keys"]
        if body["next"] is None:
            return keys
        after = body["next"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=1, help="runs with seeds seed, seed+1, ...")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--faults", default="kill,pause,restart-all", help=f"comma-separated, of {', '.join(FAULTS)}, "
                   "membership")
    p.add_argument("--read-consistency", default="linearizable",
                   help="stale shows the checker catching the stale reads a weaker store would serve")
    p.add_argument("--snapshot-threshold", type=int, default=4096, metavar="BYTES",
                   help="the nodes' -snapshot-threshold (default 4096: tiny snapshots; 0: the server's default)")
    p.add_argument("--crash-points", nargs="?", const=DEFAULT_CRASH_POINTS, default=None, metavar="SPEC",
                   help=f"RAFTDZMQ_CRASH_POINTS for every node (alone: {DEFAULT_CRASH_POINTS})")
    p.add_argument("--clock-rate", type=float, default=None,
                   help="one node's clock runs this many times as fast (RAFTDZMQ_TEST_CLOCK_RATE)")
    p.add_argument("--request-timeout", type=float, default=3.0, help="seconds a client waits for an answer")
    p.add_argument("--keep", action="store_true", help="keep the data dirs and node logs of a failed run")
    p.add_argument("--watchers", type=int, default=3, help="GET /watch streams checked (fault_coord.py; 0: none)")
    p.add_argument("--no-leases", action="store_true", help="no lease holder nor lapser (fault_coord.py)")
    p.add_argument("--counters", type=int, default=2, help="compare-and-set counter clients (fault_coord.py)")
    p.add_argument("--allow-watch-gaps", action="store_true",
                   help="a watcher's 410 from every member with no restart-all before it is counted, not a failure")
    p.add_argument("--unsafe-lease-no-reset", action="store_true",
                   help="a broken build for the lease check to catch: RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET=1 on every "
                   "node (a new leader does not give leases their full TTL)")
    args = p.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    if any(f in NETWORK_FAULTS for f in faults) and os.geteuid() != 0:
        sys.exit("network faults (partition, loss) need root: they make network namespaces and iptables rules")
    totals: collections.Counter = collections.Counter()
    failed = []
    for seed in range(args.seed, args.seed + args.runs):
        base = tempfile.mkdtemp(prefix="raftdzmq-faults-")
        ok = False
        try:
            result = FaultRun(args.nodes, args.seconds, seed, faults, base, args.clients,
                              read_consistency=args.read_consistency, snapshot_threshold_bytes=args.snapshot_threshold,
                              crash_points=args.crash_points, clock_rate=args.clock_rate,
                              request_timeout_seconds=args.request_timeout, watchers=args.watchers,
                              leases=not args.no_leases, counters=args.counters,
                              allow_watch_gaps=args.allow_watch_gaps,
                              unsafe_lease_no_reset=args.unsafe_lease_no_reset).execute()
            ok = True
            print(json.dumps(result), flush=True)
            totals.update({"runs": 1, "seconds": result["seconds"], "history_checked": result["history_checked"],
                           "acknowledged_writes": result["acknowledged_writes"],
                           "snapshots_taken": result["snapshots_taken"],
                           "snapshots_installed": result["snapshots_installed"]})
            totals.update({f"fault {k}": v for k, v in result["faults"].items()})
            totals.update({k: v for k, v in result["coordination"].items() if type(v) is int})
            for key, counts in result["coordination"].items():
                if key.endswith("_increments"):
                    totals.update({f"{key} {k}": v for k, v in counts.items()})
            totals.update({f"crash point {k}": v for k, v in result["crash_points"].items()})
        except Exception:  # the next seeds still run; the exit code says that one failed
            traceback.print_exc()
            print(f"run with seed {seed} FAILED", file=sys.stderr, flush=True)
            failed.append(seed)
        finally:
            if ok or not args.keep:
                shutil.rmtree(base, ignore_errors=True)
            else:
                print(f"kept {base}", file=sys.stderr)
    print("total", json.dumps(dict(totals)))
    if failed:
        sys.exit(f"failed seeds: {failed}")


if __name__ == "__main__":
    main()
