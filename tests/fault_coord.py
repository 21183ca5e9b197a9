"""Issue 14's proof in the fault runs (tests/faults.py): watchers, leases and transaction counters under the faults.

They run beside faults.py's clients, through any member (the nodes run with -forward), and are checked after the
run by `Coordination.verify` (each check names what it caught in its AssertionError):

Watchers (--watchers N): each streams `GET /watch?prefix=` (every key: the clients' whole key space) as
server-sent events from index 0 (the cluster is fresh), keeps an event only once the `id:` line of its index group
came (watch.py's rules: a Last-Event-ID names a whole group), takes an `id:` without events (the stream's first
chunk, a keep-alive: watch.py's positions) as its position moving past a stretch with no event, and when its node
dies, stops answering (a read timeout past the 5 s keep-alive comments), ends the stream or is removed, reconnects
to ANOTHER member with `Last-Event-ID: <its position>` (after a wait that backs off while streams move nothing:
WATCH_RECONNECT_SECONDS). A 410 with X-Raft-Oldest-Index makes it try every other
member; only when every member answers 410 does it resume after the oldest index offered, and that gap is excluded
from its checks and counted. The checks, over each watcher's span (index 0 to the sentinel written after the run,
minus its gaps):
  - order and no duplicate: group indices strictly increase, every event of a group carries the group's index;
  - agreement: two watchers that both covered an index saw the same group there (so no gap: a watcher without an
    index another one saw events at fails, and nothing uncommitted: what one invented the others did not see);
  - acknowledged writes: every write answered 200 at index i (registers, inserts, counters' txns, lease keys,
    each client reads X-Raft-Index) is a put of that key and value at index i;
  - nothing invented: every put's value is one some client wrote to that key; counters only ever go up by one (between two of a watcher's events with none of its gaps between);
  - the state: replaying the events of a watcher without gaps gives the final state exactly (every key, value and
    modify index, read from the leader after the sentinel);
  - a gap (every member 410) fails the run unless a restart-all came after the watcher's last event (every node
    then serves from its own snapshot), or every member's 410 is a snapshot it restored (its log names a restore
    at the index before the oldest it offered: a restart, or a leader's snapshot installed after a pause or a
    partition; with the runs' 4 KB snapshots, nodes that each restarted or fell behind in turn do lose the
    events, by design), or --allow-watch-gaps is given (long soaks with a small -watch-history).
Leases (--leases): a holder grants a lease of TTL_SECONDS, puts keys on it, keeps it alive every TTL/3 through
any member (following a 307) and records every keepalive answered 200 with the time it was sent; it reads its keys
now and then. A lapser grants leases, puts keys on them, keeps each alive 0-2 times and lets it lapse. The checks:
  - never early: no key of a lease vanished (a read answered 404, or an `expire` event reaching a watcher) before
    TTL after the sending of the last keepalive (or grant) answered 200 before the vanishing, less
    EARLY_TOLERANCE_SECONDS for the checker's own scheduling (one machine, one monotonic clock). Sound: the leader
    counts a keepalive's TTL from its arrival, after its sending; a new leader gives every lease its full TTL
    from its election (leases.py's rules). `RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET=1` on the nodes (leases.py:
    a new leader counts each lease's TTL from when its grant applied on that node, no reset) is caught by it:
    tests/test_faults.py runs it and expects this check to fail;
  - lapsed leases do go: each lapsed lease's keys got an `expire` event no later than
    max(last answered + TTL, heal) + TTL + LAPSE_SLACK_SECONDS, and after the run no lease is left.
Counters (--counters N): N threads increment the keys cnt0 and cnt1 with a compare-and-set transaction (read value
and X-Raft-Modify-Index, `POST /txn` compare modify_index == i, put value + 1). Each increment is acknowledged (200,
succeeded), lost for sure (succeeded false, X-Raft-Outcome: not-applied, a 4xx, a refused connection) or unknown
(X-Raft-Outcome: unknown, a timeout, a 5xx). The check: acknowledged <= final value <= acknowledged + unknown.

Each check was seen to fail on a broken build (`python tests/faults.py --nodes 3 --seconds 12 --seed 1 --faults
kill,pause`, the change made by hand, then reverted):
  - routes_watch._watch_position resuming after Last-Event-ID + 1 (a reconnect skips a group): the agreement, the
    acknowledged-put, the counter-step and the replay checks all fail;
  - store._compare taking every modify_index compare as true (run with --watchers 0, so the watchers' counter
    step does not fail first): "cnt0 is 224 after 275 acknowledged and 1 unknown increments";
  - node.LeaderLeases.tick never proposing an expiry: verify times out waiting for every lease to go;
  - the full-TTL reset removed (RAFTDZMQ_TEST_UNSAFE_LEASE_NO_RESET=1, --unsafe-lease-no-reset): keys of leases
    vanish about 2 s after a keepalive answered with a TTL of 3 s (tests/test_faults.py runs this one in CI).
tests/test_mutations.py's table is the simulator's mutations (its test asserts the table equals
simulator.MUTATIONS), so this one lives in tests/test_faults.py instead.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import threading
import time
import urllib.parse

from procs import Node

TTL_SECONDS = 3  # 10 election timeouts of the runs' nodes (-election-ms 300): several elections fit in one
EARLY_TOLERANCE_SECONDS = 0.05
LAPSE_SLACK_SECONDS = 10.0  # a leader elected after the heal (crash points may kill one more) and its expiry entry
KEEPALIVE_TIMEOUT_SECONDS = 1.0
WATCH_READ_TIMEOUT_SECONDS = 7.0  # the server writes a comment every 5 s (watchstream.KEEPALIVE_SECONDS)
# A watcher waits this long before it reconnects, doubled after each stream that moved nothing (a node down, a
# 410, a refusal), up to the bound, and back to the first wait once a stream moved its position.
WATCH_RECONNECT_SECONDS = (0.05, 1.0)
COUNTER_KEYS = ("cnt0", "cnt1")
SENTINEL_KEY = "zz-watch-end"


def _request(node: Node, method: str, path: str, body: str | None = None, timeout: float = 3.0):
    """(response or None, refused): None when the outcome is unknown; follows one 307 to the leader."""
    try:
        r = node.request(method, path, body, timeout=timeout)
        if r.status == 307 and "location" in r.headers:
            location = r.headers["location"].split("://", 1)[-1]
            address, _, target = location.partition("/")
            host, port = address.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
            try:
                conn.request(method, "/" + target, body=body.encode() if body else None)
                resp = conn.getresponse()
                r = type(r)(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
            finally:
                conn.close()
        return r, False
    except ConnectionRefusedError:
        return None, True
    except (OSError, http.client.HTTPException):
        return None, False


def _outcome(r, refused: bool) -> str:
    """ok, failed (surely not applied) or unknown, as the README's X-Raft-Outcome says."""
    if refused:
        return "failed"
    if r is None:
        return "unknown"
    if r.status == 200:
        return "ok"
    said = r.headers.get("x-raft-outcome")
    if said == "not-applied" or (said is None and r.status < 500):
        return "failed"
    return "unknown"


def reconnect_delay(previous: float, moved: bool) -> float:
    """A watcher's wait before its next reconnect (WATCH_RECONNECT_SECONDS): the first wait again after a stream
    that moved its position, else twice the previous wait, bounded."""
    first, bound = WATCH_RECONNECT_SECONDS
    return first if moved else min(2 * previous, bound)


class Worker(threading.Thread):
    def __init__(self, coord: "Coordination", name: str, seed: int) -> None:
        super().__init__(daemon=True, name=name)
        self.coord = coord
        self.rng = random.Random(seed)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # a bug of the test itself: the run fails with it
            self.error = e
            raise

    def node(self) -> Node:
        return self.rng.choice(self.coord.run.targets)

    def pause(self, seconds: float) -> bool:
        """Sleep; False once the workers are to stop."""
        return not self.coord.stopping.wait(seconds)


class Watcher(Worker):
    def __init__(self, coord: "Coordination", number: int) -> None:
        super().__init__(coord, f"watcher-{number}", coord.run.seed * 1000 + 500 + number)
        self.number = number
        self.position = 0  # the index of the last group delivered
        self.groups: dict[int, tuple] = {}  # index -> ((type, key, value), ...) in delivery order
        self.order: list[int] = []
        self.received_at: dict[int, float] = {}
        self.gaps: list[tuple[int, int, str]] = []  # (after, resumed after, why): indices in between not covered
        # per gap: the members' refusals (node -> the oldest index its 410 offered), and whether every member refused
        self.gap_refusals: list[tuple[dict[Node, int], bool]] = []
        self.last_delivery = time.monotonic()
        self.reconnects = 0
        self.answers_410 = 0
        self.problems: list[str] = []
        self.done = threading.Event()

    def _run(self) -> None:
        members = self.coord.run.members
        node = members[self.number % len(members)]
        refused_410: dict[Node, int] = {}  # this episode: member -> the oldest index it offered
        episode_started = time.monotonic()
        delay = WATCH_RECONNECT_SECONDS[0]
        while not self.done.is_set():
            position = self.position
            answer = self._stream(node)
            delay = reconnect_delay(delay, moved=self.position != position)
            if answer is not None:  # a 410 with the oldest index
                refused_410[node] = answer
                self.answers_410 += 1
            else:
                refused_410.clear()
                episode_started = time.monotonic()
            members = list(self.coord.run.members)
            if refused_410 and (set(members) <= set(refused_410) or time.monotonic() - episode_started > 20):
                resume = min(refused_410.values()) - 1
                explained = any(t > self.last_delivery for t in self.coord.run.restart_all_times)
                self.gaps.append((self.position, resume, "after a restart-all" if explained else "unexplained"))
                self.gap_refusals.append((dict(refused_410), set(members) <= set(refused_410)))
                self.position = resume
                refused_410.clear()
                episode_started = time.monotonic()
            others = [n for n in members if n is not node and n not in refused_410] or members
            node = self.rng.choice(others)
            self.reconnects += 1
            self.done.wait(delay)

    def _stream(self, node: Node) -> int | None:
        """Read events from `node` until the stream ends or fails; the oldest index of a 410, else None."""
        host, port = node.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=3)
        try:
            conn.request("GET", "/watch?prefix=", headers={"Last-Event-ID": str(self.position)})
            r = conn.getresponse()
            if r.status == 410:
                oldest = r.headers.get("X-Raft-Oldest-Index")
                r.read()
                return int(oldest) if oldest else None  # without it: a removed node, try another
            if r.status != 200:
                r.read()
                return None
            conn.sock.settimeout(WATCH_READ_TIMEOUT_SECONDS)
            pending: list[tuple[int, str, str, str | None]] = []
            kind = data = event_id = None
            while not self.done.is_set():
                line = r.readline()
                if not line:
                    return None
                line = line.decode().rstrip("\n")
                if line.startswith(":"):
                    continue
                if line:
                    name, _, value = line.partition(": ")
                    if name == "id":
                        event_id = int(value)
                    elif name == "event":
                        kind = value
                    elif name == "data":
                        data = json.loads(value)
                    continue
                if kind == "error":  # fell behind the history: reconnect, and take the 410
                    return None
                if data is not None:
                    pending.append((data["index"], data["type"], data["key"], data.get("value")))
                if event_id is not None and not pending:
                    self._moved(event_id)  # a position with no event (watch.py's positions): nothing up to it
                elif event_id is not None:
                    self._deliver(event_id, pending)
                    pending = []
                kind = data = event_id = None
            return None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def _deliver(self, index: int, events: list) -> None:
        now = time.monotonic()
        if index <= self.position:
            self.problems.append(f"group {index} delivered after group {self.position} (a duplicate or out of order)")
        if any(e[0] != index for e in events) or not events:
            self.problems.append(f"group {index} holds events of other indices: {events[:3]}")
        self.groups[index] = tuple(e[1:] for e in events)
        self.order.append(index)
        self.received_at[index] = now
        self.position = max(self.position, index)
        self.last_delivery = now

    def _moved(self, index: int) -> None:
        """An `id:` alone: every event up to `index` was sent (a quiet stretch, or what the first chunk resumes
        after). It never goes back: the first chunk names the Last-Event-ID sent, a keep-alive a later position."""
        if index < self.position:
            self.problems.append(f"position {index} sent after group or position {self.position} (it went back)")
        self.position = max(self.position, index)

    def gap_between(self, earlier: int, later: int) -> bool:
        """Whether a gap (indices this watcher never saw) lies between its events at `earlier` and `later`."""
        return any(earlier <= after < later for after, _, _ in self.gaps)

    def covered(self, index: int) -> bool:
        return 0 < index <= self.position and not any(after < index <= resumed for after, resumed, _ in self.gaps)


class LeaseHolder(Worker):
    """Keeps a lease alive for the whole run (a new one only when it was lost) and reads its keys now and then."""

    def __init__(self, coord: "Coordination") -> None:
        super().__init__(coord, "lease-holder", coord.run.seed * 1000 + 900)
        self.leases: list[dict] = []  # {"id", "ttl", "keys", "answered": [sent_at, ...], "vanished": [(when, how)]}
        self.keepalives = 0

    def _run(self) -> None:
        generation = 0
        while not self.coord.stopping.is_set():
            generation += 1
            lease = self.coord.grant(self, f"lk{generation}-", 2)
            if lease is None:
                continue
            self.leases.append(lease)
            while self.pause(lease["ttl"] / 3):
                sent = time.monotonic()
                # A short timeout: a keepalive stuck on a paused node must not eat the TTL (the next goes elsewhere).
                r, _ = _request(self.node(), "POST", f"/lease/{lease['id']}/keepalive", timeout=KEEPALIVE_TIMEOUT_SECONDS)
                if r is not None and r.status == 200:
                    lease["answered"].append(sent)
                    self.keepalives += 1
                elif r is not None and r.status == 404:
                    lease["lost_at"] = time.monotonic()
                    break
                key = self.rng.choice(lease["keys"])
                r, _ = _request(self.node(), "GET", f"/db/{key}", timeout=KEEPALIVE_TIMEOUT_SECONDS)
                if r is not None and r.status == 404:
                    lease["vanished"].append((time.monotonic(), f"a read of {key} answered 404"))
                    break
            else:  # stopping: revoke it, so the state stops changing (a failed revoke: it expires after TTL)
                lease["revoke_sent"] = time.monotonic()
                _request(self.node(), "DELETE", f"/lease/{lease['id']}")


class LeaseLapser(Worker):
    """Grants leases, keeps each alive 0-2 times, then lets it lapse."""

    def __init__(self, coord: "Coordination") -> None:
        super().__init__(coord, "lease-lapser", coord.run.seed * 1000 + 901)
        self.leases: list[dict] = []

    def _run(self) -> None:
        generation = 0
        while not self.coord.stopping.is_set():
            generation += 1
            lease = self.coord.grant(self, f"lx{generation}-", 2)
            if lease is None:
                continue
            self.leases.append(lease)
            for _ in range(self.rng.randrange(3)):
                if not self.pause(lease["ttl"] / 3):
                    break
                sent = time.monotonic()
                r, _ = _request(self.node(), "POST", f"/lease/{lease['id']}/keepalive")
                if r is not None and r.status == 200:
                    lease["answered"].append(sent)
                    lease["last_answer"] = time.monotonic()
            self.pause(self.rng.uniform(0.5, 2.0))


class CounterClient(Worker):
    def __init__(self, coord: "Coordination", number: int) -> None:
        super().__init__(coord, f"counter-{number}", coord.run.seed * 1000 + 800 + number)
        self.counts: dict[str, collections.Counter] = {k: collections.Counter() for k in COUNTER_KEYS}

    def _run(self) -> None:
        while not self.coord.stopping.is_set():
            key = self.rng.choice(COUNTER_KEYS)
            r, _ = _request(self.node(), "GET", f"/db/{key}")
            if r is None or r.status != 200 or "x-raft-modify-index" not in r.headers:
                self.pause(0.05)
                continue
            value, index = int(r.text), int(r.headers["x-raft-modify-index"])
            body = json.dumps({"compare": [{"key": key, "target": "modify_index", "op": "==", "value": index}],
                               "success": [{"op": "put", "key": key, "value": str(value + 1)}], "failure": []})
            self.coord.wrote(key, str(value + 1))
            r, refused = _request(self.node(), "POST", "/txn", body)
            outcome = _outcome(r, refused)
            if outcome == "ok":
                answer = r.json()
                if answer["succeeded"]:
                    self.coord.acknowledged(answer["index"], key, str(value + 1))
                else:
                    outcome = "compare failed"
            self.counts[key][outcome] += 1
            if outcome != "ok":
                self.pause(0.02)


def explain_gaps(gaps: list[tuple[int, int, str]], refusals: list[tuple[dict[Node, int], bool]]
                 ) -> list[tuple[int, int, str]]:
    """`gaps` with those nothing else explained explained when every member refused and each one's 410 is a
    snapshot it restored: its log says it restored one at exactly the index before the oldest it offered
    (watch.py's `restored`, at a restart or a leader's snapshot installed), so no member kept the events, by
    design. A 410 from an eviction, or from a history that lost events otherwise, stays unexplained."""
    logs: dict[Node, str] = {}
    out = []
    for (after, resumed, why), (refused, every_member) in zip(gaps, refusals):
        if why == "unexplained" and every_member:
            for node in refused:
                if node not in logs:
                    logs[node] = node.log_text() if os.path.exists(node.log_path) else ""
            if all(f"restored the state machine from the snapshot at index {oldest - 1} " in logs[node]
                   for node, oldest in refused.items()):
                why = "every member restored a snapshot past it"
        out.append((after, resumed, why))
    return out


class Coordination:
    """The watchers, lease threads and counter clients of one fault run (the module's rules), and their checks."""

    def __init__(self, run, watchers: int = 3, leases: bool = True, counters: int = 2,
                 allow_watch_gaps: bool = False) -> None:
        self.run = run
        self.stopping = threading.Event()
        self.allow_watch_gaps = allow_watch_gaps
        self.lock = threading.Lock()
        self.written: dict[str, set[str]] = collections.defaultdict(set)  # key -> every value written (any outcome)
        self.acks: list[tuple[int, str, str]] = []  # (index, key, value) of every put answered 200
        self.watchers = [Watcher(self, i) for i in range(watchers)]
        self.holder = LeaseHolder(self) if leases else None
        self.lapser = LeaseLapser(self) if leases else None
        self.counters = [CounterClient(self, i) for i in range(counters)]
        self.workers: list[Worker] = [w for w in (self.holder, self.lapser) if w is not None] + self.counters

    def wrote(self, key: str, value: str) -> None:
        with self.lock:
            self.written[key].add(value)

    def acknowledged(self, index: int, key: str, value: str) -> None:
        with self.lock:
            self.acks.append((index, key, value))

    def grant(self, worker: Worker, prefix: str, n_keys: int) -> dict | None:
        """A lease with `n_keys` keys on it (None when the grant or a put failed: the lease lapses unused)."""
        sent = time.monotonic()
        r, _ = _request(worker.node(), "POST", f"/lease?ttl={TTL_SECONDS}")
        if r is None or r.status != 200:
            worker.pause(0.2)  # 409 below level 2 at the start, a leader being elected...
            return None
        answer = r.json()
        lease = {"id": answer["id"], "ttl": answer["ttl"], "keys": [], "answered": [sent], "vanished": [],
                 "last_answer": time.monotonic()}
        for k in range(n_keys):
            key, value = f"{prefix}{k}", f"{prefix}{k}-{answer['id']}"
            self.wrote(key, value)
            r, _ = _request(worker.node(), "POST", f"/db/{key}?lease={answer['id']}", value)
            if r is None or r.status != 200:
                return None
            self.acknowledged(int(r.headers["x-raft-index"]), key, value)
            lease["keys"].append(key)
        return lease

    def start(self) -> None:
        leader = self.run._leader()
        for key in COUNTER_KEYS:
            self.run._wait(lambda key=key: _ok(leader.request("POST", f"/db/{key}", "0", timeout=3)), 20,
                           f"{key} set to 0")
            self.wrote(key, "0")
        for w in self.watchers + self.workers:
            w.start()

    def close(self) -> None:
        """Every thread told to end (the run is over, passed or failed): none outlives its nodes for long."""
        self.stopping.set()
        for w in self.watchers:
            w.done.set()

    def stop(self) -> None:
        """The writers stop (the watchers go on until verify has them catch up)."""
        self.stopping.set()
        for w in self.workers:
            w.join(15)

    def verify(self, client_acks: list[tuple[int, str, str]], client_written: dict[str, set[str]],
               healed_at: float) -> dict:
        for w in self.watchers + self.workers:
            if w.error is not None:
                raise AssertionError(f"{w.name} failed: {w.error!r}")
        run = self.run
        started = time.monotonic()
        # Every lease gone (the holder's revoked, the lapsed ones expired): from here the state no longer changes.
        run._wait(lambda: not run._leader().request("GET", "/lease", timeout=3).json()["leases"],
                  TTL_SECONDS + LAPSE_SLACK_SECONDS + 20, "every lease to be revoked or to expire")
        r = run._wait(lambda: _ok(run._leader().request("POST", f"/db/{SENTINEL_KEY}", "end", timeout=3)), 30,
                      "the sentinel write")
        end_index = int(r.headers["x-raft-index"])
        self.wrote(SENTINEL_KEY, "end")
        self.acknowledged(end_index, SENTINEL_KEY, "end")
        try:
            run._wait(lambda: all(w.position >= end_index for w in self.watchers), 60,
                      f"every watcher to reach the sentinel's index {end_index}")
        finally:
            for w in self.watchers:
                w.done.set()
        for w in self.watchers:
            w.join(WATCH_READ_TIMEOUT_SECONDS + 5)
        final = self._final_state(run._leader())
        written = collections.defaultdict(set, {k: set(v) for k, v in self.written.items()})
        for key, values in client_written.items():
            written[key] |= values
        acks = self.acks + client_acks
        summary = {"watchers": len(self.watchers), "check_seconds": round(time.monotonic() - started, 1)}
        if self.watchers:
            summary.update(self._check_watchers(final, acks, written, end_index))
        if self.holder is not None:
            summary.update(self._check_leases(healed_at))
        if self.counters:
            summary.update(self._check_counters(final))
        return summary

    def _final_state(self, node: Node) -> dict[str, tuple[str, int]]:
        keys, after = [], ""
        while True:
            body = node.request("GET", f"/db/?consistency=stale&limit=10000&after={after}", timeout=5).json()
            keys += body["keys"]
            if body["next"] is None:
                break
            after = body["next"]
        state = {}
        host, port = node.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=5)  # one connection for them all: thousands
        try:
            for key in keys:
                conn.request("GET", f"/db/{urllib.parse.quote(key)}?consistency=stale")
                r = conn.getresponse()
                value = r.read().decode()
                assert r.status == 200, f"{key} listed but answered {r.status}"
                state[key] = (value, int(r.getheader("X-Raft-Modify-Index")))
        finally:
            conn.close()
        return state

    def _check_watchers(self, final, acks, written, end_index) -> dict:
        problems = []
        for w in self.watchers:
            w.gaps = explain_gaps(w.gaps, w.gap_refusals)
            problems += [f"{w.name}: {p}" for p in w.problems]
            unexplained = [g for g in w.gaps if g[2] == "unexplained"]
            if unexplained and not self.allow_watch_gaps:
                refusals = [{n.name: oldest for n, oldest in refused.items()} | {"every member": every}
                            for g, (refused, every) in zip(w.gaps, w.gap_refusals) if g[2] == "unexplained"]
                problems.append(f"{w.name}: members answered 410 (the oldest index each offered: {refusals}) with "
                                f"no restart-all since its last event nor a snapshot restored there on every "
                                f"member: gaps {unexplained}")
        # Agreement: a group one watcher saw is the group every watcher that covered its index saw.
        for w in self.watchers:
            for v in self.watchers:
                if v is w:
                    continue
                for index, group in w.groups.items():
                    if v.covered(index) and v.groups.get(index) != group:
                        problems.append(f"at index {index} {w.name} saw {group} but {v.name} saw "
                                        f"{v.groups.get(index)}")
                        break
        for index, key, value in acks:
            for w in self.watchers:
                if w.covered(index) and ("put", key, value) not in w.groups.get(index, ()):
                    problems.append(f"{w.name} missed the acknowledged put of {key}={value!r} at index {index}: "
                                    f"saw {w.groups.get(index)}")
        events = 0
        for w in self.watchers:
            state: dict[str, tuple[str, int]] = {}
            for index in w.order:
                for kind, key, value in w.groups[index]:
                    events += 1
                    if kind == "put":
                        if value not in written.get(key, ()):
                            problems.append(f"{w.name}: a put of {key}={value!r} at index {index} nobody wrote")
                        if (key in COUNTER_KEYS and key in state and int(value) != int(state[key][0]) + 1
                                and not w.gap_between(state[key][1], index)):
                            problems.append(f"{w.name}: counter {key} went from {state[key][0]} to {value} at {index}")
                        state[key] = (value, index)
                    elif key in state or not w.gaps:
                        if key not in state:
                            problems.append(f"{w.name}: a {kind} of {key} at {index}, which was not there")
                        state.pop(key, None)
            if not w.gaps and state != final:
                diff = sorted(set(state.items()) ^ set(final.items()))[:5]
                problems.append(f"{w.name}: replaying its events does not give the final state, e.g. {diff}")
        if problems:
            raise AssertionError("watchers: " + "; ".join(problems[:10]))
        gaps = [g for w in self.watchers for g in w.gaps]
        return {"watch_events_checked": events, "watch_reconnects": sum(w.reconnects for w in self.watchers),
                "watch_410s": sum(w.answers_410 for w in self.watchers), "watch_gaps": len(gaps),
                "watch_gaps_unexplained": len([g for g in gaps if g[2] == "unexplained"]),
                "watch_end_index": end_index, "acknowledged_puts_checked": len(acks)}

    def _vanishings(self, lease: dict) -> list[tuple[float, str]]:
        """When the lease's keys were seen gone: the holder's reads, and each watcher's `expire` events."""
        out = list(lease["vanished"])
        for w in self.watchers:
            for index, group in w.groups.items():
                for kind, key, _ in group:
                    if kind == "expire" and key in lease["keys"]:
                        out.append((w.received_at[index], f"{w.name} got the expire of {key} at index {index}"))
        return out

    def _check_leases(self, healed_at: float) -> dict:
        problems = []
        expired = 0
        for lease in self.holder.leases + self.lapser.leases:
            for when, how in self._vanishings(lease):
                if when >= lease.get("revoke_sent", float("inf")):
                    continue
                before = [s for s in lease["answered"] if s < when]
                last = max(before)  # the grant's sending at least
                if when < last + lease["ttl"] - EARLY_TOLERANCE_SECONDS:
                    problems.append(f"lease {lease['id']} vanished {when - last:.2f}s after the last keepalive "
                                    f"answered before it (TTL {lease['ttl']}s): {how}")
                    break  # one line a lease
        lateness = []
        for lease in self.lapser.leases:
            seen = [when for when, _ in self._vanishings(lease)]
            if not seen:
                if self.watchers and not any(w.gaps for w in self.watchers):  # else: gone, verify waited for it
                    problems.append(f"lapsed lease {lease['id']}: no watcher saw its keys {lease['keys']} expire")
                continue
            expired += 1
            due = lease["last_answer"] + lease["ttl"]
            lateness.append(min(seen) - due)
            if min(seen) > max(due, healed_at) + lease["ttl"] + LAPSE_SLACK_SECONDS:
                problems.append(f"lapsed lease {lease['id']} expired {min(seen) - due:.1f}s after its TTL")
        if problems:
            raise AssertionError("leases: " + "; ".join(problems[:10]))
        return {"lease_keepalives": self.holder.keepalives, "leases_held": len(self.holder.leases),
                "leases_lapsed": len(self.lapser.leases), "lapsed_leases_seen_expiring": expired,
                "lapse_lateness_max_seconds": round(max(lateness), 2) if lateness else None}

    def _check_counters(self, final) -> dict:
        problems = []
        summary = {}
        for key in COUNTER_KEYS:
            counts = collections.Counter()
            for c in self.counters:
                counts.update(c.counts[key])
            value = int(final[key][0])
            if not counts["ok"] <= value <= counts["ok"] + counts["unknown"]:
                problems.append(f"{key} is {value} after {counts['ok']} acknowledged and {counts['unknown']} unknown "
                                "increments")
            summary[f"{key}_increments"] = dict(counts, value=value)
        if problems:
            raise AssertionError("counters: " + "; ".join(problems))
        return summary


def _ok(r):
    return r if r.status == 200 else None
