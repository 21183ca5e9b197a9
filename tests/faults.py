"""Jepsen-style fault runs against real raftdzmq processes, with the history checked for linearizability.

    python tests/faults.py --nodes 3 --seconds 60 --seed 7 --faults kill,pause,restart-all
    python tests/faults.py --nodes 5 --seconds 600 --faults kill,pause,restart-all,partition,loss   # as root

Clients (threads, one HTTP request at a time each, any node; the nodes run with -forward) write unique values to a
few register keys, read them back with the default linearizable reads, and insert unique keys of their own. Every
operation is recorded with its invocation and completion times and its outcome: ok, failed for sure, or unknown.
A nemesis driven by one seeded RNG meanwhile:
  kill         SIGKILL a node (the leader half the time), restart it later without -join
  pause        SIGSTOP a node (the leader half the time), SIGCONT it later
  restart-all  SIGKILL every node at once, then start them all again
  partition    (root) isolate the leader, or split the nodes into a majority and a minority
  loss         (root) drop a share of one node's packets at random
For the network faults each node runs in its own network namespace, joined to the others by veth pairs on a bridge
in a hub namespace, where this runner and its clients live; cuts are iptables rules inside the node namespaces
(this kernel has no tc netem). After the run every fault is healed and the run fails unless: the history is
linearizable, every acknowledged insert is on every node and nothing was invented, all nodes converge to the same
state, and no node crashed or logged a traceback.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import http.client
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from linearizability import READ, WRITE, Op, check  # noqa: E402
from procs import LocalCluster, Node, http_request, wait_for  # noqa: E402

FAULTS = ("kill", "pause", "restart-all", "partition", "loss")
NETWORK_FAULTS = ("partition", "loss")
REGISTER_KEYS = ("r0", "r1", "r2")
REQUEST_TIMEOUT = 3.0
SUBNET = "10.77.0"
REFUSED = object()
# Answers that say a write was certainly not applied; any other failure leaves its outcome unknown.
DEFINITE_FAILURES = ("raft.Server: Not current leader", "no leader is known", "write refused", "write lost")


@dataclasses.dataclass
class Stats:
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    faults: collections.Counter = dataclasses.field(default_factory=collections.Counter)


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
            node = self.rng.choice(self.run_.cluster.nodes)
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
            r = http_request(method, node.address, path, body, timeout=REQUEST_TIMEOUT)
        except ConnectionRefusedError:
            r = REFUSED
        except (OSError, http.client.HTTPException):  # e.g. the node died in the middle of its answer
            r = None
        if r is None or r is REFUSED or r.status >= 300:
            time.sleep(0.05)  # a down node answers at once: do not spin on it
        return r

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
        outcome = self._write_outcome(r)
        self.run_.stats.ops[f"write {outcome}"] += 1
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
        outcome = self._write_outcome(self._request("POST", node, f"/db/{key}", key))
        self.inserts[key] = outcome
        self.run_.stats.ops[f"insert {outcome}"] += 1


class FaultRun:
    def __init__(self, size: int, seconds: float, seed: int, faults: list[str], base_dir: str, clients: int = 6,
                 log=print, read_consistency: str = "linearizable") -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        self.size, self.seconds, self.seed, self.faults = size, seconds, seed, faults
        self.rng = random.Random(seed)
        self.base_dir = base_dir
        self.n_clients = clients
        self.log = log
        self.stats = Stats()
        self.read_query = "" if read_consistency == "linearizable" else f"?consistency={read_consistency}"
        self.stopping = threading.Event()
        self.netns = Netns(size) if any(f in NETWORK_FAULTS for f in faults) else None
        self.paused: set[int] = set()
        self.dead: set[int] = set()
        extra = ("-forward", "-write-timeout", "2", "-read-timeout", "2")
        if self.netns:
            # Beyond loopback, as a real deployment: with a cluster secret, so signed frames get the faults too.
            secret = os.path.join(base_dir, "secret")
            with open(secret, "w") as f:
                f.write(f"fault-run-{seed}\n")
            extra += ("-secret-file", secret)
            nodes = [Node(f"node.{i + 1}", base_dir, host=self.netns.addresses[i], ports=(5551 + i, 8081 + i),
                          wrap=self.netns.wrap(i)) for i in range(size)]
        else:
            nodes = [Node(f"node.{i}", base_dir) for i in range(1, size + 1)]
        self.cluster = LocalCluster(base_dir, extra=extra, nodes=nodes)

    # -- the run ----------------------------------------------------------------------------------------------------

    def execute(self) -> dict:
        if self.netns:
            self.netns.up()
            self.netns.enter_hub()
        try:
            self.cluster.start()
            started = time.monotonic()
            clients = [Client(self, i) for i in range(self.n_clients)]
            for c in clients:
                c.start()
            try:
                self._nemesis(started + self.seconds)
            finally:
                self._heal_everything()
                self.stopping.set()
                for c in clients:
                    c.join(REQUEST_TIMEOUT * 3)
            return self._verify(clients, time.monotonic() - started)
        finally:
            for i in list(self.paused):
                self._signal(i, signal.SIGCONT)
            self.cluster.stop()
            if self.netns:
                self.netns.down()

    def _nemesis(self, until: float) -> None:
        """Rounds of every enabled fault once, in a shuffled order, with quiet spells between faults."""
        round_: list[str] = []
        while time.monotonic() < until:
            time.sleep(self.rng.uniform(0.5, 1.5))
            if time.monotonic() >= until:
                break
            if not round_:
                round_ = self.rng.sample(self.faults, len(self.faults))
            fault = round_.pop()
            self.stats.faults[fault] += 1
            getattr(self, "_fault_" + fault.replace("-", "_"))()

    def _target(self) -> int:
        """The leader half the time, else any node."""
        if self.rng.random() < 0.5:
            leader = self._leader_index()
            if leader is not None:
                return leader
        return self.rng.randrange(self.size)

    def _leader_index(self) -> int | None:
        for i, n in enumerate(self.cluster.nodes):
            if i in self.paused or i in self.dead:
                continue
            try:
                if n.status()["role"] == "leader":
                    return i
            except (OSError, ValueError):
                pass
        return None

    def _hold(self) -> None:
        time.sleep(self.rng.uniform(0.6, 3.0))

    def _fault_kill(self) -> None:
        i = self._target()
        self.log(f"nemesis: SIGKILL {self.cluster.nodes[i].name}")
        self._kill(i)
        self._hold()
        self._restart(i)

    def _fault_pause(self) -> None:
        i = self._target()
        self.log(f"nemesis: SIGSTOP {self.cluster.nodes[i].name}")
        self._signal(i, signal.SIGSTOP)
        self.paused.add(i)
        self._hold()
        self._signal(i, signal.SIGCONT)
        self.paused.discard(i)

    def _fault_restart_all(self) -> None:
        self.log("nemesis: SIGKILL every node, then restart them all")
        for i in range(self.size):
            self._kill(i)
        time.sleep(self.rng.uniform(0.1, 1.0))
        for i in range(self.size):
            self._restart(i)

    def _fault_partition(self) -> None:
        nodes = list(range(self.size))
        leader = self._leader_index()
        if leader is not None and self.rng.random() < 0.5:
            minority = [leader]
        else:
            self.rng.shuffle(nodes)
            minority = nodes[: (self.size - 1) // 2]
        majority = [i for i in range(self.size) if i not in minority]
        self.log(f"nemesis: partition {[self.cluster.nodes[i].name for i in minority]} from the rest")
        for a in minority:
            for b in majority:
                self.netns.cut(a, b)
        self._hold()
        self.netns.heal()

    def _fault_loss(self) -> None:
        i = self._target()
        self.log(f"nemesis: drop 30% of {self.cluster.nodes[i].name}'s packets")
        self.netns.lossy(i, 0.3)
        self._hold()
        self.netns.heal()

    def _kill(self, i: int) -> None:
        node = self.cluster.nodes[i]
        if i in self.dead:
            return
        self._ensure_ran_well(node)
        if i in self.paused:
            self._signal(i, signal.SIGCONT)
            self.paused.discard(i)
        node.kill(signal.SIGKILL)
        self.dead.add(i)

    def _restart(self, i: int) -> None:
        if i in self.dead:
            self.cluster.nodes[i].start(*self.cluster.extra)
            self.dead.discard(i)

    def _signal(self, i: int, sig: int) -> None:
        proc = self.cluster.nodes[i].proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)

    def _ensure_ran_well(self, node: Node) -> None:
        """A node must never exit or trace back on its own: a crash is a failure, not a fault."""
        if node.exited():
            raise AssertionError(f"{node.name} exited on its own with code {node.proc.returncode}:\n"
                                 + node.log_text()[-3000:])
        text = node.log_text()
        if "Traceback" in text:
            raise AssertionError(f"{node.name} logged a traceback:\n" + text[text.index("Traceback"):][:3000])

    def _heal_everything(self) -> None:
        if self.netns:
            self.netns.heal()
        for i in list(self.paused):
            self._signal(i, signal.SIGCONT)
            self.paused.discard(i)
        for i in list(self.dead):
            self._restart(i)

    # -- the checks -------------------------------------------------------------------------------------------------

    def _verify(self, clients: list[Client], elapsed: float) -> dict:
        for c in clients:
            if c.error is not None:
                raise AssertionError(f"client {c.number} failed: {c.error!r}")
        for n in self.cluster.nodes:
            self._ensure_ran_well(n)
        history = [op for c in clients for op in c.history]
        # One more linearizable read of every register after the faults, so a lost last write cannot hide.
        leader = self.cluster.leader(timeout=30)
        for key in REGISTER_KEYS:
            call = time.monotonic()
            r = wait_for(lambda key=key: _ok(leader.request("GET", f"/db/{key}", timeout=REQUEST_TIMEOUT)), 30,
                         f"a final read of {key}")
            history.append(Op(key, READ, r.text if r.status == 200 else None, call, time.monotonic(), -1))
        with open(os.path.join(self.base_dir, "history.json"), "w") as f:
            json.dump([dataclasses.astuple(op)[:5] + (op.client,) for op in history], f)
        t0 = time.monotonic()
        result = check(history)
        check_seconds = time.monotonic() - t0
        if not result.ok:
            raise AssertionError(f"history of {len(history)} operations is not linearizable: {result.explanation}")

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
        first = next(iter(states.values()))
        for name, state in states.items():
            if state != first:
                raise AssertionError(f"{name} did not converge to the same state as {self.cluster.nodes[0].name}")
        for n in self.cluster.nodes:
            self._ensure_ran_well(n)
        ops = self.stats.ops
        return {
            "nodes": self.size, "seed": self.seed, "seconds": round(elapsed, 1), "faults": dict(self.stats.faults),
            "operations": dict(ops), "history_checked": len(history), "check_seconds": round(check_seconds, 2),
            "acknowledged_writes": ops["write ok"] + ops["insert ok"], "linearizable": True,
            "inserts_present_on_every_node": len(acknowledged),
        }

    def _converged_states(self) -> dict:
        """Once every node has applied what the leader committed: each node's keys and register values."""
        def states():
            leader = self.cluster.leader(timeout=10)
            commit = leader.status()["commit_index"]
            out = {}
            for n in self.cluster.nodes:
                if n.status()["applied_index"] < commit:
                    return None
                keys = set(_list_keys(n))
                registers = tuple(
                    _text_or_none(n.request("GET", f"/db/{k}?consistency=stale", timeout=REQUEST_TIMEOUT))
                    for k in REGISTER_KEYS)
                out[n.name] = (keys, registers)
            values = list(out.values())
            return out if all(v == values[0] for v in values) else None

        return wait_for(states, 60, "every node to converge to the same state", interval=0.3)


def _ok(r):
    return r if r.status in (200, 404) else None


def _text_or_none(r):
    if r.status not in (200, 404):
        raise ValueError(f"stale read answered {r.status}")
    return r.text if r.status == 200 else None


def _list_keys(node: Node) -> list[str]:
    keys, after = [], ""
    while True:
        r = node.request("GET", f"/db/?consistency=stale&limit=10000&after={after}", timeout=REQUEST_TIMEOUT)
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
    p.add_argument("--faults", default="kill,pause,restart-all", help=f"comma-separated, of {', '.join(FAULTS)}")
    p.add_argument("--read-consistency", default="linearizable",
                   help="stale shows the checker catching the stale reads a weaker store would serve")
    p.add_argument("--keep", action="store_true", help="keep the data dirs and node logs of a failed run")
    args = p.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    if any(f in NETWORK_FAULTS for f in faults) and os.geteuid() != 0:
        sys.exit("network faults (partition, loss) need root: they make network namespaces and iptables rules")
    totals: collections.Counter = collections.Counter()
    for seed in range(args.seed, args.seed + args.runs):
        base = tempfile.mkdtemp(prefix="raftdzmq-faults-")
        ok = False
        try:
            result = FaultRun(args.nodes, args.seconds, seed, faults, base, args.clients,
                              read_consistency=args.read_consistency).execute()
            ok = True
            print(json.dumps(result), flush=True)
            totals.update({"runs": 1, "seconds": result["seconds"], "history_checked": result["history_checked"],
                           "acknowledged_writes": result["acknowledged_writes"]})
            totals.update({f"fault {k}": v for k, v in result["faults"].items()})
        finally:
            if ok or not args.keep:
                shutil.rmtree(base, ignore_errors=True)
            else:
                print(f"kept {base}", file=sys.stderr)
    print("total", json.dumps(dict(totals)))


if __name__ == "__main__":
    main()
