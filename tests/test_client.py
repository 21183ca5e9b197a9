"""raftlib.client and raftlib.concurrency against real 3-node clusters (issue 15): every method; the leader found
through a follower's 307 and failed over when it is SIGKILLed; OutcomeUnknown (never a retry) for a write whose
fate is open, Unavailable for one that surely did not apply; a watch across the death of the node it streams
from, compared with the writes' own indices (no gap, no repeat); Compacted; leases kept alive and stopped;
processes contending for a lock while the leader is killed (fencing tokens used in order, no two holds at once);
a holder paused past its lease (the next one takes the lock, the paused one's fenced write is refused); a signed
admin request retried after a not-applied answer is signed again, not refused as a replay (a stand-in leader)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from procs import LocalCluster, paused, wait_for
from raftlib.client import (BadRequest, Client, Compacted, Event, NotFound, OutcomeUnknown, PreconditionFailed,
                            Unavailable, delete_op, get_op, put_op)
from raftlib.concurrency import LockTimeout
from raftlib.server.admin import SIGNATURE_HEADER, TIMESTAMP_HEADER, AdminGuard
from raftlib.server.watch import EVENT_OVERHEAD_BYTES

HISTORY_EVENTS = 600  # about: -watch-history-bytes for 600 small events (-watch-history is at least 4096)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lock_worker.py")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("client")), extra=(
        "-write-timeout", "2", "-watch-history-bytes", str(HISTORY_EVENTS * (EVENT_OVERHEAD_BYTES + 12)))).start()
    wait_for(lambda: all(n.status()["cluster_feature_level"] >= 2 for n in c.running()), 10, "feature level 2")
    yield c
    c.stop()


@pytest.fixture
def client(cluster):
    with Client([n.address for n in cluster.nodes], timeout=10) as c:
        yield c


def restart_stopped(cluster: LocalCluster) -> None:
    """Start every node that is not running again (its data dir kept), and wait until all are ready."""
    for node in cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            node.start(*cluster.extra)
    wait_for(lambda: all(n.request("GET", "/readyz", timeout=2).status == 200 for n in cluster.nodes), 20,
             "every node ready")


def test_keys_put_get_delete_with_conditions_list_range(client):
    index = client.put("k/a", b"1")
    kv = client.get("k/a")
    assert (kv.value, kv.create_index, kv.modify_index) == (b"1", index, index)
    assert client.put("k/a", "2", prev_value=b"1") > index
    with pytest.raises(PreconditionFailed) as e:
        client.put("k/a", "3", prev_value=b"1")
    assert e.value.status == 412 and e.value.modify_index == client.get("k/a").modify_index
    modify = client.get("k/a").modify_index
    client.put("k/a", b"3", prev_index=modify)
    with pytest.raises(PreconditionFailed):
        client.put("k/a", b"4", prev_index=modify)
    with pytest.raises(PreconditionFailed):
        client.put("k/a", b"4", prev_exist=False)
    client.put("k/b", b"new", prev_exist=False)
    with pytest.raises(PreconditionFailed):
        client.put("k/missing", b"x", prev_exist=True)
    client.put("k/b", b"again", prev_exist=True)
    binary = bytes(range(256)) + b"\r\n\x00"
    client.put("k/bin ary%2F?", binary)  # bytes intact, a key with a space, % and ?
    assert client.get("k/bin ary%2F?").value == binary
    assert client.list("k/") == ["k/a", "k/b", "k/bin ary%2F?"]
    assert client.list("k/", limit=2) == ["k/a", "k/b"]
    assert [(kv.key, kv.value) for kv in client.range("k/")] == [("k/a", b"3"), ("k/b", b"again"),
                                                                  ("k/bin ary%2F?", binary)]
    with pytest.raises(NotFound):
        client.get("k/missing")
    b = client.get("k/b")
    with pytest.raises(PreconditionFailed):
        client.delete("k/b", prev_index=b.modify_index - 1)
    client.delete("k/b", prev_index=b.modify_index)
    with pytest.raises(NotFound):
        client.delete("k/b")
    assert client.delete_prefix("k/") == 2 and client.list("k/") == []
    with pytest.raises(BadRequest):
        client.put("k/a", b"x", prev_index=1, prev_value=b"y")  # the server's 400, one line
    with pytest.raises(ValueError):
        client.get("")


DOT_KEYS = ("dot/../ient", "dot/./y", "dot/..", "dot/../..", "dot/.", "dot/a/../../b", "dot//x/..", "dot/%2E/%2e%2E")


def test_keys_with_dot_segments_arrive_as_written(cluster, client):
    """Review edge3, Q1: urllib3 removes `.` and `..` segments from a URL's path, so that put("cl/../ient") wrote
    "ient" (under a per-tenant prefix, another tenant's key). The client sends them as %2E, and the server decodes
    that back to ".": every key round-trips, and no other key is touched."""
    for key in DOT_KEYS:
        client.put(key, key)
    assert client.list("dot/") == sorted(DOT_KEYS) and client.list("ient") == client.list("y") == []
    for key in DOT_KEYS:
        assert client.get(key).value == key.encode(), key
    leader = cluster.leader()  # the server's own decoding of %2E, on the wire as the client sends it
    assert leader.request("GET", "/db/dot/%2E%2E/ient").body == b"dot/../ient"
    assert leader.request("GET", "/db/dot/%2e").body == b"dot/."
    for key in DOT_KEYS:
        client.delete(key)
    assert client.list("dot/") == []


def test_txn_builder_both_branches(client):
    first = (client.txn().compare("t/lock", "exists", "==", False)
             .success(put_op("t/lock", b"me"), get_op(key="t/lock")).failure(get_op(key="t/lock")).commit())
    assert first.succeeded and first.kvs(1)[0].value == b"me" and first.kvs(1)[0].create_index == first.index
    second = (client.txn().compare("t/lock", "exists", "==", False)
              .success(put_op("t/lock", b"you")).failure(get_op(key="t/lock"), delete_op(key="t/lock")).commit())
    assert not second.succeeded and second.kvs(0)[0].value == b"me" and second.results[1]["deleted"] == 1
    assert (client.txn().compare("t/lock", "create_index", "==", 0).commit()).succeeded


def test_status_members_and_a_follower_only_client_finds_the_leader_by_its_307(cluster, client):
    leader = cluster.leader()
    members = client.members()
    assert len(members) == 3 and {m.role for m in members} == {"voter"}
    assert client.status()["leader"] in {m.id for m in members}
    follower = next(n for n in cluster.running() if n is not leader)
    with Client([follower.address], timeout=10) as c:
        c.put("r/1", b"x")
        assert c.leader is not None and c.leader.endswith(f":{leader.http_port}")
        assert c.status(follower.address)["role"] == "follower"


def test_a_lease_is_kept_alive_past_its_ttl_and_revoking_it_deletes_its_keys(client):
    with client.lease(1) as lease:
        ttl = lease.ttl  # raised to 1.5 election timeouts at least
        client.put("l/key", b"v", lease=lease)
        time.sleep(ttl * 2 + 0.5)
        assert client.get("l/key").value == b"v" and not lease.lost.is_set()
        assert any(int(info["id"]) == lease.id for info in client.leases())
        assert client.lease_info(lease.id)["keys"] == ["l/key"]
    assert lease.lost.is_set() and not lease._thread.is_alive()  # the keepalive thread ended with the block
    with pytest.raises(NotFound):
        client.get("l/key")
    other = client.lease(1)
    client.revoke(other.id)  # revoked behind its back: the next keepalive finds it gone
    wait_for(other.lost.is_set, 5, "the lease to be noticed lost")
    other.close()
    assert not other._thread.is_alive()


def test_a_watch_resumes_on_another_node_after_the_one_it_streams_from_dies_without_gap_or_repeat(cluster):
    leader = cluster.leader()
    follower = next(n for n in cluster.running() if n is not leader)
    others = [n.address for n in cluster.nodes if n is not follower]
    writer = Client([n.address for n in cluster.nodes], timeout=10)
    start = writer.put("w/start", b"0")
    watcher = Client([follower.address, *others], timeout=10)
    watch = watcher.watch(prefix="w/", from_index=start)
    written: list[int] = []
    received: list[Event] = []

    def write() -> None:
        for i in range(60):
            txn = writer.txn().success(put_op(f"w/{i}", str(i)), put_op(f"w/{i}b", b"\xff"))
            written.append(txn.commit().index)  # two events under one index
            if i == 20:
                follower.kill()
            time.sleep(0.01)

    thread = threading.Thread(target=write)
    thread.start()
    bound = threading.Timer(60, watch.close)  # a watch waits for events without end: this one has 60 s
    bound.start()
    try:
        for event in watch:
            received.append(event)
            if len(received) == 120:
                break
    finally:
        bound.cancel()
        thread.join(30)
        watch.close()
    assert watch.reconnects >= 1
    assert [e.index for e in received] == [i for i in written for _ in (0, 1)]
    assert [(e.key, e.value) for e in received] == [(k, v) for i in range(60) for k, v in
                                                    ((f"w/{i}", str(i).encode()), (f"w/{i}b", b"\xff"))]
    restart_stopped(cluster)


def test_closing_a_watch_from_another_thread_ends_its_iteration_at_once(client):
    watch = client.watch(key="cw/k")
    seen: list[Event] = []
    reader = threading.Thread(target=lambda: seen.extend(watch))
    reader.start()
    wait_for(lambda: watch.position is not None, 10, "the stream to start")
    client.put("cw/k", b"1")
    wait_for(lambda: seen, 10, "the event")
    started = time.monotonic()
    watch.close()  # the reader waits in a socket read (the next keep-alive is 5 s away)
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - started < 2 and [e.value for e in seen] == [b"1"]


def test_a_watch_older_than_the_history_raises_compacted_with_the_oldest_index(client):
    start = client.put("c/start", b"0")
    for batch in range(HISTORY_EVENTS // 100 + 2):
        txn = client.txn().success(*(put_op(f"c/{batch}/{i}", b"v") for i in range(100)))
        txn.commit()
    with pytest.raises(Compacted) as e:
        next(iter(client.watch(prefix="c/", from_index=start)))
    assert e.value.oldest_index > start
    began = time.monotonic()  # every node answers 410 at once: Compacted, not Unavailable at the timeout
    with pytest.raises(Compacted) as polled:
        client.poll_events(prefix="c/", from_index=start, timeout=1)
    assert polled.value.oldest_index > start and time.monotonic() - began < 5
    events, position = client.poll_events(prefix="c/", from_index=e.value.oldest_index - 1, timeout=1)
    assert events and events[0].index == e.value.oldest_index and position >= events[-1].index


def test_writes_fail_over_when_the_leader_is_sigkilled(cluster, client):
    client.put("f/0", b"before")
    old = cluster.leader()
    old.kill()
    started = time.monotonic()
    index = client.put("f/1", b"after")  # connection refused: retried elsewhere, then on the new leader
    took = time.monotonic() - started
    new = cluster.leader()
    assert new is not old and client.leader is not None and client.leader.endswith(f":{new.http_port}")
    assert client.get("f/1").modify_index == index and client.get("f/0").value == b"before"
    assert took < 10
    restart_stopped(cluster)


def test_a_write_whose_fate_is_open_raises_outcome_unknown_and_one_that_surely_failed_unavailable(cluster):
    leader = cluster.leader()
    followers = [n for n in cluster.running() if n is not leader]
    with paused(followers):
        early: list[BaseException] = []

        def write_with_a_short_bound() -> None:  # no answer within the client's bound after sending
            with Client([leader.address], timeout=0.3) as c:
                try:
                    c.put("u/1", b"x")
                except BaseException as e:
                    early.append(e)

        thread = threading.Thread(target=write_with_a_short_bound)
        thread.start()
        with Client([leader.address], timeout=10) as c:  # the leader's own 503 once it steps down (check-quorum)
            with pytest.raises(OutcomeUnknown) as e:
                c.put("u/2", b"x")
            assert e.value.status == 503
        thread.join(10)
        assert len(early) == 1 and type(early[0]) is OutcomeUnknown and early[0].status is None, early
        # Once the leader stepped down (check-quorum), writes are refused not-applied: retried until the bound
        wait_for(lambda: leader.status()["role"] != "leader", 10, "the leader to step down")
        with Client([leader.address], timeout=1.5) as c:
            with pytest.raises(Unavailable) as e:
                c.put("u/3", b"x")
            assert "no leader" in str(e.value)
    with Client([n.address for n in cluster.nodes], timeout=10) as c:
        with pytest.raises(NotFound):
            c.get("u/3")  # surely not applied


def test_election_campaign_leader_observe_resign(cluster):
    with Client([n.address for n in cluster.nodes], timeout=10) as c1, \
            Client([n.address for n in cluster.nodes], timeout=10) as c2:
        first, second = c1.election("el/svc", ttl=2), c2.election("el/svc", ttl=2)
        assert first.leader() is None
        first.campaign("one")
        seen: list[bytes | None] = []
        observer = first.observe()
        seen.append(next(observer).value)
        won = threading.Event()
        thread = threading.Thread(target=lambda: (second.campaign("two", timeout=20), won.set()))
        thread.start()
        time.sleep(0.5)
        assert not won.is_set() and second.leader().value == b"one"
        first.proclaim("one, again")
        seen.append(next(observer).value)
        first.resign()
        seen.append(next(observer).value)
        thread.join(20)
        assert won.is_set() and seen == [b"one", b"one, again", b"two"]
        with pytest.raises(LockTimeout):
            first.campaign("late", timeout=1)  # second leads: first waits and gives up, its key removed
        second.resign()
        assert second.leader() is None


def run_workers(cluster: LocalCluster, args_of, count: int) -> list[subprocess.Popen]:
    endpoints = ",".join(n.address for n in cluster.nodes)
    return [subprocess.Popen([sys.executable, WORKER, *args_of(i, endpoints)], stdout=subprocess.PIPE, text=True)
            for i in range(count)]


def test_processes_contending_for_a_lock_while_the_leader_dies_hold_it_one_at_a_time_in_token_order(cluster,
                                                                                                   client, tmp_path):
    client.put("fence", "0" * 20)
    out = str(tmp_path / "holds.jsonl")
    workers = run_workers(cluster, lambda i, endpoints: ["contend", endpoints, "locks/job", "6", out], 4)
    try:
        wait_for(lambda: os.path.exists(out) and len(open(out).readlines()) >= 4, 30, "a few holds")
        cluster.leader().kill()
        for w in workers:
            assert w.wait(timeout=90) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    holds = [json.loads(line) for line in open(out)]
    errors = [h for h in holds if "error" in h]
    assert len(errors) <= 2, errors  # an acquisition may give up during the election; no more
    holds = [h for h in holds if "error" not in h]
    assert len(holds) >= 22 and all(h["fenced"] and not h["lost"] for h in holds), holds
    by_start = sorted(holds, key=lambda h: h["start"])
    assert [h["token"] for h in by_start] == sorted(h["token"] for h in holds)  # tokens used in order
    assert len({h["token"] for h in holds}) == len(holds)
    for before, after in zip(by_start, by_start[1:]):
        assert before["end"] <= after["start"], (before, after)  # never two holders at once
    restart_stopped(cluster)


def test_a_holder_paused_past_its_lease_loses_the_lock_to_the_next_and_its_fenced_write_is_refused(
        cluster, client, tmp_path):
    client.put("fence", "0" * 20)
    go, out = str(tmp_path / "go"), str(tmp_path / "held.json")
    holder = run_workers(cluster, lambda i, endpoints: ["hold", endpoints, "locks/paused", go, out], 1)[0]
    try:
        line = holder.stdout.readline()
        assert line.startswith("acquired "), line
        paused_token = int(line.split()[1])
        os.kill(holder.pid, signal.SIGSTOP)  # a long GC pause, a stopped VM
        started = time.monotonic()
        with client.lock("locks/paused", ttl=2, timeout=20) as token:  # not stuck behind the paused holder
            waited = time.monotonic() - started
            assert token > paused_token
            result = (client.txn().compare("fence", "value", "<", f"{token:020d}")
                      .success(put_op("fence", f"{token:020d}")).commit())
            assert result.succeeded
        os.kill(holder.pid, signal.SIGCONT)
        open(go, "w").close()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
    report = json.loads(open(out).read())
    assert report == {"token": paused_token, "fenced": False, "lost": True}
    assert waited < 15


def test_importing_the_client_loads_no_gevent_nor_zmq_and_patches_nothing():
    code = ("import sys, socket; s = socket.socket; import raftlib.client, raftlib.concurrency, raftlib.ctl; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'zmq', 'bottle')), "
            "socket.socket is s)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=os.path.dirname(WORKER) + "/..")
    assert out.stdout.strip() == "[] True", out.stdout + out.stderr


GEVENT_PROGRAM = """
from gevent import monkey
monkey.patch_all()
import sys, threading, time
import gevent
from raftlib.client import Client
client = Client(sys.argv[1].split(","), timeout=10)
start = client.put("g/start", b"0")
events = []
watch = client.watch(prefix="g/", from_index=start)
reader = gevent.spawn(lambda: [events.append(e) for e in watch])  # one greenlet reads, others write
with client.lease(1) as lease:
    client.put("g/leased", b"v", lease=lease)
    for i in range(10):
        gevent.spawn(client.put, f"g/{i}", str(i)).join()
    gevent.sleep(lease.ttl * 2 + 0.5)  # only the keepalive greenlet keeps it
    assert client.get("g/leased").value == b"v" and not lease.lost.is_set()
deadline = time.monotonic() + 10
while len(events) < 12 and time.monotonic() < deadline:
    gevent.sleep(0.05)
watch.close()
reader.join(5)
assert [e.key for e in events] == ["g/leased"] + [f"g/{i}" for i in range(10)] + ["g/leased"], events
assert threading._start_new_thread.__module__ == "gevent.thread"  # the keepalive "thread" was a greenlet
print("ok")
"""


def test_the_client_works_in_a_monkey_patched_gevent_program(cluster, tmp_path):
    program = tmp_path / "gevent_client.py"
    program.write_text(GEVENT_PROGRAM)
    out = subprocess.run([sys.executable, str(program), ",".join(n.address for n in cluster.running())],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(WORKER))})
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


class DroppingLeader(http.server.BaseHTTPRequestHandler):
    """A leader with a cluster secret whose first transfer is dropped (never started: 503 not-applied), as
    Runtime.transfer_leadership does when the loop was busy, after the signature was claimed (AdminGuard, as
    routes_shared.check_signature does); later ones succeed. Each answer's status goes to the server's `answers`."""

    def do_POST(self) -> None:
        server = self.server
        guard: AdminGuard = server.guard  # type: ignore[attr-defined]
        reason = guard.verify("POST", self.path, b"", self.headers.get(TIMESTAMP_HEADER),
                              self.headers.get(SIGNATURE_HEADER))
        reason = reason or guard.claim(self.headers[SIGNATURE_HEADER])
        if reason is not None:
            status, body, outcome = 403, f"transfer refused: {reason}", "not-applied"
        elif not server.answers:  # type: ignore[attr-defined]
            status, outcome = 503, "not-applied"
            body = "the transfer to b was not started within 2s; sign it again to retry"
        else:
            status, body, outcome = 200, "", None
        server.answers.append(status)  # type: ignore[attr-defined]
        data = (body + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if outcome is not None:
            self.send_header("X-Raft-Outcome", outcome)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_a_signed_admin_request_is_signed_again_for_a_retry_after_a_not_applied_answer():
    """Review of rebind, F3: the leader claims an admin request's signature before it queues the request, so a
    dropped transfer's retry with the same headers was refused 403 as a replay. The client signs each attempt."""
    secret = os.urandom(32)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DroppingLeader)
    server.guard, server.answers = AdminGuard(secret), []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Client([f"127.0.0.1:{server.server_address[1]}"], timeout=10) as c:
            c.transfer_leadership("b", secret=secret)
        assert server.answers == [503, 200], server.answers  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


# ---- a watch's choice of node: stand-in nodes that answer GET /watch as each test scripts them ----------------------


def sse_put(key: str, value: str, index: int) -> str:
    return f"event: put\ndata: {json.dumps({'type': 'put', 'key': key, 'value': value, 'index': index})}\nid: {index}\n\n"


def compacted_answer(oldest_index: int) -> tuple[int, dict[str, str], str]:
    return 410, {"X-Raft-Oldest-Index": str(oldest_index)}, f"events after index 1 are no longer kept here: the " \
        f"oldest index available is {oldest_index}\n"


class ScriptedWatchNode(http.server.BaseHTTPRequestHandler):
    """GET /watch answered with the server's `answers` in turn (the last one again once they run out): (status,
    headers, body); a 200 is a whole stream (text/event-stream), then the connection closes. Each request's
    (poll or stream, Last-Event-ID or from) goes to the server's `asked`."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        server = self.server
        answers: list = server.answers  # type: ignore[attr-defined]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        poll = query.get("poll") == ["1"]
        server.asked.append(("poll" if poll else "stream",  # type: ignore[attr-defined]
                             self.headers.get("Last-Event-ID") or query.get("from", [None])[0]))
        status, headers, body = answers.pop(0) if len(answers) > 1 else answers[0]
        data = body.encode()
        self.send_response(status)
        content_type = "application/json" if poll else "text/event-stream" if status == 200 else "text/plain"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted_nodes():
    """Start stand-in nodes, each with its answers; every one is shut down at the end."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(*scripts: list) -> list[http.server.ThreadingHTTPServer]:
        for answers in scripts:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedWatchNode)
            server.answers, server.asked = list(answers), []  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        return list(servers)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def address(server: http.server.ThreadingHTTPServer) -> str:
    return f"127.0.0.1:{server.server_address[1]}"


def test_a_watch_ended_by_a_node_reconnects_to_another_node_first_even_if_that_one_would_accept_it(scripted_nodes):
    """Review watchend L2: a node that ends the stream (an `error` event: it refuses watches, or the watcher fell
    behind its history) is passed over; the reconnect goes to the next node with Last-Event-ID, though the ending
    node would answer it 200 (a refusal lifted meanwhile: it flaps)."""
    ending, other = scripted_nodes(
        [(200, {}, ": watching after index 0\nid: 0\n\n" + sse_put("w/1", "a", 1)
          + 'event: error\ndata: {"error": "this node has heard from no leader for over 3s", "status": 503}\n\n'),
         (200, {}, sse_put("w/2", "from the node that ended the stream", 2))],
        [(200, {}, sse_put("w/2", "b", 2))])
    with Client([address(ending), address(other)], timeout=10) as c, c.watch(prefix="w/", from_index=0) as watch:
        seen = [next(watch), next(watch)]
    assert [(e.key, e.value, e.index) for e in seen] == [("w/1", b"a", 1), ("w/2", b"b", 2)]
    assert ending.asked == [("stream", "0")] and other.asked == [("stream", "1")]  # type: ignore[attr-defined]


def test_a_watch_older_than_one_nodes_history_resumes_on_a_node_that_holds_it(scripted_nodes):
    """A 410 for a position older than one node's history is that node's (restored from a snapshot, or behind):
    the watch asks the next node, which serves it. Compacted only when every endpoint says so, with the smallest
    oldest index they gave, each asked once."""
    short, holding = scripted_nodes([compacted_answer(9)], [(200, {}, sse_put("w/3", "v", 3))])
    with Client([address(short), address(holding)], timeout=10) as c, c.watch(prefix="w/", from_index=1) as watch:
        event = next(watch)
    assert (event.key, event.index) == ("w/3", 3) and watch.position == 3
    assert short.asked == [("stream", "1")] and holding.asked == [("stream", "1")]  # type: ignore[attr-defined]

    nodes = scripted_nodes([compacted_answer(9)], [compacted_answer(7)], [compacted_answer(8)])[2:]
    began = time.monotonic()
    with Client([address(n) for n in nodes], timeout=10) as c, pytest.raises(Compacted) as e:
        next(iter(c.watch(prefix="w/", from_index=1)))
    assert e.value.oldest_index == 7 and time.monotonic() - began < 5
    assert [n.asked for n in nodes] == [[("stream", "1")]] * 3  # type: ignore[attr-defined]


def test_a_long_poll_older_than_every_nodes_history_raises_compacted_and_one_that_a_node_holds_is_served(
        scripted_nodes):
    """Client.poll_events: a 410 with X-Raft-Oldest-Index from every endpoint is Compacted at once (it was retried
    until the timeout, then Unavailable: review watchend, pre-existing); from one, the next node serves it."""
    nodes = scripted_nodes([compacted_answer(9)], [compacted_answer(7)], [compacted_answer(8)])
    began = time.monotonic()
    with Client([address(n) for n in nodes], timeout=10) as c, pytest.raises(Compacted) as e:
        c.poll_events(prefix="w/", from_index=1, timeout=1)
    assert e.value.oldest_index == 7 and time.monotonic() - began < 5
    assert [n.asked for n in nodes] == [[("poll", "1")]] * 3  # type: ignore[attr-defined]

    short, holding = scripted_nodes(
        [compacted_answer(9)],
        [(200, {"X-Raft-Watch-Position": "3"}, json.dumps([{"type": "put", "key": "w/3", "value": "v", "index": 3}]))])[3:]
    with Client([address(short), address(holding)], timeout=10) as c:
        events, position = c.poll_events(prefix="w/", from_index=1, timeout=1)
    assert [(e.key, e.index) for e in events] == [("w/3", 3)] and position == 3
