"""-forward's keep-alive connections to the leader (raftlib.server.forwarding; review edge3, L4 and Q2), through real
processes: forwarded writes open at most the pool's bound of connections, survive the leader's restart and the
leader closing idle connections, and a 412 keeps its X-Raft-Modify-Index; then the pool alone against a fake
leader on a real socket: a request sent again only when it cannot have reached the leader."""

from __future__ import annotations

import http.client
import os
import select
import socket
import threading
import time

import gevent
import pytest

from procs import LocalCluster, Node, metric_samples, wait_for
from raftlib.server import forwarding
from raftlib.server.forwarding import FORWARD_CONNECTIONS, LeaderConnections, NoAnswer


def tcp_sockets_to(port: int):
    """The fields of every line of /proc/net/tcp and tcp6 whose remote end is `port` (fields[1] the local address,
    [3] the state, [9] the socket's inode)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        with open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    yield fields


def sockets_to(port: int) -> set[tuple[str, str]]:
    """Every TCP socket on this machine (any state but LISTEN, TIME_WAIT included) whose remote end is `port`:
    (local address, state). A connection closed by its client stays in TIME_WAIT for 60 s, so this counts the
    connections opened to `port` over the last minute."""
    return {(fields[1], fields[3]) for fields in tcp_sockets_to(port) if fields[3] != "0A"}


def roles(cluster: LocalCluster) -> tuple[Node, Node]:
    leader = cluster.leader()
    return leader, next(n for n in cluster.nodes if n is not leader)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("fwdpool")), extra=("-forward",)).start()
    yield c
    c.stop()


def test_forwarded_writes_use_at_most_the_pools_bound_of_connections_to_the_leader(cluster):
    leader, follower = roles(cluster)
    assert follower.request("POST", "/db/pool/warm", "w").status == 200
    before = {local for local, _ in sockets_to(leader.http_port)}
    for i in range(200):  # one client, one write at a time: one connection carries them all
        r = follower.request("POST", f"/db/pool/seq{i}", str(i))
        assert r.status == 200, r
    errors: list[object] = []

    def writer(t: int) -> None:
        for i in range(6):
            r = follower.request("POST", f"/db/pool/par{t}-{i}", str(i))
            if r.status != 200:
                errors.append(r)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(48)]  # more clients than connections
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    opened = {local for local, _ in sockets_to(leader.http_port)} - before
    # On main: a connection per write, 488 in TIME_WAIT.
    assert len(opened) <= FORWARD_CONNECTIONS, f"{len(opened)} connections opened for 488 forwarded writes"
    assert leader.request("GET", "/db/pool/par47-5").body == b"5"


def test_a_forwarded_412_carries_the_leaders_modify_index(cluster):
    leader, follower = roles(cluster)
    r = follower.request("POST", "/db/cas/mi", "v1")
    assert r.status == 200
    index = r.headers["x-raft-index"]
    on_leader = leader.request("POST", "/db/cas/mi?prev_index=1", "v2")
    forwarded = follower.request("POST", "/db/cas/mi?prev_index=1", "v2")
    assert (on_leader.status, forwarded.status) == (412, 412)
    assert on_leader.headers["x-raft-modify-index"] == index
    assert forwarded.headers.get("x-raft-modify-index") == index, forwarded.headers  # on main: dropped
    assert forwarded.headers["x-raft-outcome"] == "not-applied" and "x-raft-index" in forwarded.headers
    r = follower.request("POST", "/db/cas/missing?prev_index=3", "v")  # a missing key's modify index is 0
    assert (r.status, r.headers.get("x-raft-modify-index")) == (412, "0")


def test_forwarded_writes_go_on_after_the_leader_restarts(cluster):
    """The follower's pooled connections to the leader die with it; once the same node leads again (a transfer
    back to it), writes through the follower succeed on new connections, again at most the pool's bound."""
    leader, follower = roles(cluster)
    for i in range(20):
        assert follower.request("POST", f"/db/restart/a{i}", "a").status == 200
    leader_id = leader.status()["node_id"]
    leader.kill()
    leader.start("-forward")
    successor = cluster.leader(timeout=15)
    if successor is not leader:
        r = successor.request("POST", f"/cluster/transfer?to={leader_id}")
        assert r.status == 200, r
    wait_for(lambda: follower.status()["leader"] == leader_id and leader.status()["role"] == "leader", 15,
             "the restarted node to lead, as the follower sees it")
    before = {local for local, _ in sockets_to(leader.http_port)}
    answers = [follower.request("POST", f"/db/restart/b{i}", "b") for i in range(50)]
    assert [r.status for r in answers] == [200] * 50, [(r.status, r.text) for r in answers if r.status != 200]
    assert len({local for local, _ in sockets_to(leader.http_port)} - before) <= FORWARD_CONNECTIONS
    assert leader.request("GET", "/db/restart/b49").body == b"b"


def test_the_leader_closing_idle_pooled_connections_loses_and_repeats_no_write(tmp_path):
    """-idle-timeout 1: the leader closes the follower's pooled connections while they wait (the keep-alive race).
    Creates (?prev_exist=false) forwarded after each such close all succeed once: a write sent twice would get
    412, one lost a 503. The leader's idle_timeout evictions show it closed them (on main the follower closed
    each connection itself after its answer)."""
    c = LocalCluster(str(tmp_path), extra=("-forward", "-idle-timeout", "1")).start()
    try:
        leader, follower = roles(c)
        evicted = metric_samples(leader.request("GET", "/metrics").text).get(
            'raftdzmq_http_evictions_total{reason="idle_timeout"}', 0)
        for round_ in range(4):
            for i in range(5):
                r = follower.request("POST", f"/db/race/r{round_}-{i}?prev_exist=false", f"{round_}-{i}")
                assert r.status == 200, (round_, i, r.status, r.text, r.headers)
            time.sleep(2.0)  # the leader's sweeper closes the idle pooled connection meanwhile
        evicted_after = metric_samples(leader.request("GET", "/metrics").text).get(
            'raftdzmq_http_evictions_total{reason="idle_timeout"}', 0)
        assert evicted_after >= evicted + 4  # each round's pooled connection, closed idle by the leader
        keys = leader.request("GET", "/db/?prefix=race/&limit=100").json()["keys"]
        assert keys == sorted(f"race/r{r}-{i}" for r in range(4) for i in range(5))
    finally:
        c.stop()


def established_from(pid: int, port: int) -> int:
    """The ESTABLISHED TCP connections process `pid` holds whose remote end is `port` (/proc/net/tcp and tcp6,
    matched to the process's descriptors by socket inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return sum(1 for fields in tcp_sockets_to(port) if fields[3] == "01" and fields[9] in inodes)


def test_a_follower_that_becomes_leader_closes_its_connections_to_the_old_leader(cluster):
    """Review fwd, F2: nothing closed the pool, so a follower that became leader kept up to 32 connections to the
    old leader (half-closed once the old leader timed them out). Now the node's periodic look closes them."""
    leader, follower = roles(cluster)
    assert follower.proc is not None
    errors: list[object] = []

    def writer(t: int) -> None:
        r = follower.request("POST", f"/db/stale/w{t}", str(t))
        if r.status != 200:
            errors.append(r)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads), errors
    held = established_from(follower.proc.pid, leader.http_port)
    assert held >= 1, "the follower's pool holds no connection to the leader: nothing to test"
    follower_id = follower.status()["node_id"]
    r = leader.request("POST", f"/cluster/transfer?to={follower_id}")
    assert r.status == 200, r
    wait_for(lambda: follower.status()["role"] == "leader", 15, "the follower to lead")
    # On main: all `held` stay ESTABLISHED until the old leader's -idle-timeout (60 s), then sit in CLOSE_WAIT.
    wait_for(lambda: established_from(follower.proc.pid, leader.http_port) == 0, 5,
             f"the new leader to close its {held} connections to the old leader")


def test_failed_forwards_are_counted_and_logged(tmp_path):
    """Review fwd, F4: the pool left no trace; a follower's failed forwards are now in /metrics
    (raftdzmq_forwards_total by result, connections opened) and in one rate-limited log line."""
    c = LocalCluster(str(tmp_path), extra=("-forward",)).start()
    try:
        leader, follower = roles(c)
        assert follower.request("POST", "/db/trace/a", "a").status == 200
        leader.kill()  # its port refuses connections until the follower sees the leader gone

        def refused() -> bool:
            r = follower.request("POST", "/db/trace/b", "b")
            return r.status == 503 and r.text.startswith("could not forward")

        wait_for(refused, 10, "a forward the follower could not send")
        samples = metric_samples(follower.request("GET", "/metrics").text)
        assert samples.get('raftdzmq_forwards_total{result="answered"}', 0) >= 1, samples
        assert samples.get('raftdzmq_forwards_total{result="not_sent"}', 0) >= 1, samples
        assert samples.get("raftdzmq_forward_connections_opened_total", 0) >= 1, samples
        assert "could not forward a POST to the leader at" in follower.log_text(current=True)
    finally:
        c.stop()


# ---- the pool alone, against a fake leader on a real socket --------------------------------------------------------


class FakeLeader:
    """A listening socket answering each request 200 on a keep-alive connection, recording (connection number,
    request line). `close_after`: the answers a connection gets before the fake closes it idle; `read_then_close`:
    on that connection's request, read it whole, then close without an answer (a leader that died after reading)."""

    def __init__(self, close_after: int | None = None, read_then_close: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.close_after, self.read_then_close = close_after, read_then_close
        self.requests: list[tuple[int, str]] = []
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        number = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            number += 1
            threading.Thread(target=self._connection, args=(conn, number), daemon=True).start()

    def _connection(self, conn: socket.socket, number: int) -> None:
        f = conn.makefile("rb")
        answered = 0
        with conn:
            while True:
                line = f.readline()
                if not line:
                    return
                length = 0
                while (header := f.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                f.read(length)
                self.requests.append((number, line.decode().strip()))
                if self.read_then_close and answered == (self.close_after or 0):
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Raft-Index: %d\r\n\r\nok" % len(self.requests))
                answered += 1
                if not self.read_then_close and answered == self.close_after:
                    conn.shutdown(socket.SHUT_RDWR)  # closed idle, before the next request
                    self.closed.set()
                    return

    def close(self) -> None:
        self.listener.close()


def forward(pool: LeaderConnections, leader: FakeLeader, method: str, target: str) -> int:
    return pool.forward(http.client.HTTPConnection, leader.address, method, target, b"v", {}, 5.0).status


def test_the_pool_reuses_a_connection_and_replaces_one_the_leader_closed_idle():
    leader = FakeLeader(close_after=2)
    pool = LeaderConnections()
    try:
        assert [forward(pool, leader, "POST", f"/db/k{i}") for i in range(2)] == [200, 200]
        assert leader.closed.wait(5)
        assert select.select([pool.idle[0].sock], [], [], 5)[0]  # the leader's close has arrived
        assert forward(pool, leader, "POST", "/db/k2") == 200
        # Each write reached the fake once; the third on a second connection (the first was found closed).
        assert leader.requests == [(1, "POST /db/k0 HTTP/1.1"), (1, "POST /db/k1 HTTP/1.1"), (2, "POST /db/k2 HTTP/1.1")]
        assert (pool.opened, pool.resent) == (2, 0)  # found closed before sending: nothing failed, nothing resent
    finally:
        leader.close()
        pool.close()


def test_a_write_the_leader_read_before_closing_is_unknown_and_never_sent_again(monkeypatch):
    """The instant the pool's check cannot see: the leader reads the request on a reused connection, then closes.
    A write is then NoAnswer (unknown), sent once; a GET is sent again on a new connection."""
    monkeypatch.setattr(forwarding, "dropped", lambda conn: False)  # as if the close came just after the check
    leader = FakeLeader(close_after=1, read_then_close=True)
    pool = LeaderConnections()
    try:
        assert forward(pool, leader, "POST", "/db/a") == 200
        with pytest.raises(NoAnswer):
            forward(pool, leader, "POST", "/db/b")
        assert leader.requests == [(1, "POST /db/a HTTP/1.1"), (1, "POST /db/b HTTP/1.1")]  # b once, never again
        assert forward(pool, leader, "POST", "/db/c") == 200  # a new connection
        assert forward(pool, leader, "GET", "/lease/7") == 200  # closed on connection 2, sent again on 3
        assert leader.requests[2:] == [(2, "POST /db/c HTTP/1.1"), (2, "GET /lease/7 HTTP/1.1"),
                                       (3, "GET /lease/7 HTTP/1.1")]
        assert (pool.opened, pool.resent) == (3, 1)
    finally:
        leader.close()
        pool.close()


class EarlyHintsLeader:
    """A fake leader that answers a request whose body is b"alice" first with an interim `103 Early Hints`, then
    50 ms later with its final 200 (as a proxy or another server at the leader's address may); others at once.
    Each final answer names the body it answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        with conn:
            while f.readline():
                length = 0
                while (header := f.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                body = f.read(length)
                try:
                    if body == b"alice":
                        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
                        time.sleep(0.05)
                    answer = b"applied " + body
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                except OSError:  # the pool closed the connection after the 103
                    return

    def close(self) -> None:
        self.listener.close()


def test_an_interim_1xx_answer_is_no_answer_and_never_reaches_the_next_request():
    """Review fwd, F1: http.client skips only 100; a 103 came back as alice's answer and her connection went back
    to the pool with her real answer on its way, which bob then read as his. Now alice's write is NoAnswer (503,
    outcome unknown) and her connection is closed: bob gets his own answer."""
    leader = EarlyHintsLeader()
    pool = LeaderConnections()
    try:
        with pytest.raises(NoAnswer, match="interim answer 103"):
            pool.forward(http.client.HTTPConnection, leader.address, "POST", "/db/alice", b"alice", {}, 5.0)
        bob = pool.forward(http.client.HTTPConnection, leader.address, "POST", "/db/bob", b"bob", {}, 5.0)
        assert (bob.status, bob.body) == (200, b"applied bob")  # on main: (200, b"applied alice")
        assert pool.opened == 2  # alice's connection was not reused
    finally:
        leader.close()
        pool.close()


def test_a_request_that_waited_for_a_connection_goes_to_the_leader_known_when_one_is_free():
    """Review fwd, F3: a request that waited for a free connection went to the leader named before its wait, even
    when another had been elected meanwhile. Now the leader is asked again once a connection is free."""
    old, new = FakeLeader(), FakeLeader()
    pool = LeaderConnections(size=1)
    known = {"leader": old.address}

    def busy_then_new_leader() -> None:  # a request holding the only connection while the leader changes
        pool.slots.acquire()
        gevent.sleep(0.2)
        known["leader"] = new.address
        pool.slots.release()

    holder = gevent.spawn(busy_then_new_leader)
    try:
        gevent.sleep(0)  # the holder takes the slot
        answer = pool.forward(http.client.HTTPConnection, old.address, "POST", "/db/k", b"v", {}, 5.0,
                              leader=lambda: known["leader"])
        assert answer.status == 200
        assert (old.requests, new.requests) == ([], [(1, "POST /db/k HTTP/1.1")])  # on main: sent to the old one
        known["leader"] = None
        with pytest.raises(forwarding.NotSent, match="no leader"):
            pool.forward(http.client.HTTPConnection, new.address, "POST", "/db/k2", b"v", {}, 5.0,
                         leader=lambda: known["leader"])
        assert len(new.requests) == 1
    finally:
        holder.kill()
        old.close()
        new.close()
        pool.close()
