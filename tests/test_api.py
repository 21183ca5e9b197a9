"""The HTTP API beyond the seed, driven through real processes: errors, delete, compare-and-set, listing,
consistency levels, forwarding, membership and leadership, and junk on the Raft port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from procs import SERVER, LocalCluster, Node, free_port, metric_samples, paused, wait_for
from raftlib.codec import MAX_FRAME_BYTES


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("api")), extra=("-forward", "-max-body", "1000")).start()
    yield c
    c.stop()


def test_errors_are_one_line_4xx_without_tracebacks(cluster):
    leader = cluster.leader()
    r = leader.request("POST", "/db/big", b"x" * 1001)
    assert r.status == 413 and "limit" in r.text
    for body in (b"not json", b"{}", b'{"node_id": 1, "raft_address": "a", "http_address": "b"}'):
        r = leader.request("POST", "/join", body)
        assert r.status == 400 and "bad join body" in r.text
    assert leader.request("GET", "/db/missing").status == 404
    assert leader.request("GET", "/nowhere").status == 404
    assert leader.request("PATCH", "/db/x").status == 405
    assert leader.request("GET", "/db/x?consistency=weird").status == 400
    assert leader.request("GET", "/db/x?min_index=abc").status == 400
    for r in (leader.request("GET", "/nowhere"), leader.request("POST", "/join", b"[")):
        assert "Traceback" not in r.text and r.text.count("\n") <= 1


def raw_http(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_bad_request_headers_get_400_and_good_ones_work(cluster):
    leader = cluster.leader()
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    for head, status in ((b"NoColonHere\r\n", 400), (b"X-Folded: a\r\n  b\r\n", 400), (b"Bad Name : x\r\n", 400),
                         (many, 431), (b"X-Long: " + b"x" * 70000 + b"\r\n", 431)):
        out = raw_http(leader.address, b"GET /db/k HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n")
        assert out.startswith(b"HTTP/1.1 %d" % status), (head[:30], out[:100])
    # Case-insensitive names, a body by Content-Length, keep-alive: two requests on one connection.
    out = raw_http(leader.address, b"POST /db/hdr HTTP/1.1\r\nHost: localhost\r\ncontent-LENGTH: 5\r\n\r\nhello"
                                   b"GET /db/hdr HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.count(b"HTTP/1.1 200") == 2 and out.endswith(b"hello"), out
    # A body cut short (the client died, or a forwarding node was killed in the middle of its request).
    out = raw_http(leader.address, b"POST /db/cut HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 400") and b"cut short" in out, out
    assert not leader.exited() and "Traceback" not in leader.log_text()


def test_delete_and_compare_and_set(cluster):
    leader = cluster.leader()
    assert leader.request("POST", "/db/cas", "1").status == 200
    assert leader.request("POST", "/db/cas?prev_value=2", "3").status == 412
    assert leader.request("POST", "/db/cas?prev_value=1", "2").status == 200
    assert leader.request("GET", "/db/cas").body == b"2"
    assert leader.request("POST", "/db/cas?prev_exist=false", "9").status == 412
    assert leader.request("POST", "/db/fresh?prev_exist=false", "9").status == 200
    assert leader.request("DELETE", "/db/cas").status == 200
    assert leader.request("DELETE", "/db/cas").status == 404
    assert leader.request("GET", "/db/cas").status == 404


def test_concurrent_compare_and_set_increments_are_exact(cluster):
    leader = cluster.leader()
    assert leader.request("POST", "/db/counter", "0").status == 200
    successes = []

    def client():
        mine = 0
        for _ in range(25):
            cur = leader.request("GET", "/db/counter").body
            r = leader.request("POST", f"/db/counter?prev_value={cur.decode()}", str(int(cur) + 1))
            if r.status == 200:
                mine += 1
            else:
                assert r.status == 412, r
        successes.append(mine)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert int(leader.request("GET", "/db/counter").body) == sum(successes) > 0


def test_listing_is_sorted_and_paginated(cluster):
    leader = cluster.leader()
    for i in range(5):
        assert leader.request("POST", f"/db/list/{i}", str(i)).status == 200
    r = leader.request("GET", "/db/?prefix=list/&limit=2").json()
    assert r == {"keys": ["list/0", "list/1"], "next": "list/1"}
    r = leader.request("GET", "/db/?prefix=list/&limit=2&after=list/1").json()
    assert r["keys"] == ["list/2", "list/3"]
    r = leader.request("GET", "/db/?prefix=list/&limit=10&after=list/3").json()
    assert r == {"keys": ["list/4"], "next": None}


def test_follower_forwards_writes_and_reads_its_writes(cluster):
    leader = cluster.leader()
    follower = next(n for n in cluster.nodes if n is not leader)
    r = follower.request("POST", "/db/fwd", "via-follower")
    assert r.status == 200
    index = int(r.headers["x-raft-index"])
    # Read-your-writes on any node with min_index; the default read is linearizable anyway.
    for n in cluster.nodes:
        r = n.request("GET", f"/db/fwd?min_index={index}&consistency=stale")
        assert r.body == b"via-follower" and int(r.headers["x-raft-applied-index"]) >= index
        assert n.request("GET", "/db/fwd").body == b"via-follower"


def test_default_reads_are_linearizable_right_after_a_write_on_every_node(cluster):
    leader = cluster.leader()
    for i in range(20):
        assert leader.request("POST", "/db/fresh-read", str(i)).status == 200
        for n in cluster.nodes:
            assert n.request("GET", "/db/fresh-read").body == str(i).encode()


def test_junk_on_the_raft_port_is_dropped_and_logged(cluster):
    import zmq

    n = cluster.nodes[1]
    # Not ZMTP at all.
    with socket.create_connection(("127.0.0.1", n.port), timeout=5) as s:
        s.sendall(os.urandom(4096))
    # Well-formed ZMTP, junk frames. (A junk TCP peer may take one reply with it: the REQ side then times out
    # and reconnects, as the node's own senders do; so no reply is required here, only that the node lives.)
    ctx = zmq.Context()
    sockets = []
    try:
        oversized = b"\x00" * (MAX_FRAME_BYTES + 1)  # zmq's MAXMSGSIZE cuts the connection
        for payload in (b"\x00", os.urandom(300), b"\x82\x01\x81\x84\x63abc", b"\x82\x63\x80", b"\xff" * 70000,
                        oversized):
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            sockets.append(req)
            req.connect(f"tcp://127.0.0.1:{n.port}")
            req.send(payload)
            req.poll(2000)
    finally:
        for req in sockets:
            req.close(linger=0)
        ctx.term()
    wait_for(lambda: "dropped a bad frame" in n.log_text(), 5, "the warning")
    assert not n.exited()
    assert cluster.write("after-junk", "ok").status == 200
    wait_for(lambda: n.request("GET", "/db/after-junk?consistency=stale").body == b"ok", 10, "replication to it")


def test_transfer_then_remove_a_follower_and_the_leader(tmp_path):
    c = LocalCluster(str(tmp_path)).start()
    try:
        leader = c.leader()
        target = next(n for n in c.nodes if n is not leader)
        target_id = target.status()["node_id"]
        r = leader.request("POST", f"/cluster/transfer?to={target_id}")
        assert r.status == 200, r
        assert c.leader() is target
        assert c.write("t", "1").status == 200
        # Remove the old leader (now a follower), then the current leader itself.
        old_id = leader.status()["node_id"]
        assert target.request("DELETE", f"/cluster/{old_id}").status == 200
        members = [m["id"] for m in target.request("GET", "/cluster").json()]
        assert old_id not in members and len(members) == 2
        assert target.request("DELETE", f"/cluster/{target_id}").status == 200
        third = next(n for n in c.nodes if n not in (leader, target))
        wait_for(lambda: third.status()["role"] == "leader", 10, "the last member to lead")
        assert third.request("POST", "/db/t", "2").status == 200
        assert [m["id"] for m in third.request("GET", "/cluster").json()] == [third.status()["node_id"]]
    finally:
        c.stop()


def test_sigterm_on_the_leader_hands_over_first(tmp_path):
    c = LocalCluster(str(tmp_path)).start()
    try:
        leader = c.leader()
        assert leader.stop() == 0
        assert "handed leadership to" in leader.log_text()
        t0 = time.monotonic()
        assert c.write("after", "1").status == 200
        assert time.monotonic() - t0 < 3
    finally:
        c.stop()


def test_node_joining_after_compaction_catches_up_through_a_snapshot(tmp_path):
    c = LocalCluster(str(tmp_path), size=2, extra=("-snapshot-threshold", "4000")).start()
    try:
        for i in range(120):
            c.write(f"s{i}", f"value-{i}")
        leader = c.leader()
        wait_for(lambda: leader.status()["snapshot_index"] > 0, 10, "a snapshot on the leader")
        late = Node("late", str(tmp_path))
        c.nodes.append(late)
        late.start("-snapshot-threshold", "4000", join=leader.address)
        wait_for(lambda: late.request("GET", "/db/s119?consistency=stale").body == b"value-119", 15, "catch-up")
        assert "installed a snapshot" in late.log_text()
        assert late.request("GET", "/db/s0").body == b"value-0"
        # And it restarts from its own snapshot.
        late.kill()
        late.start()
        assert late.request("GET", "/db/s7").body == b"value-7"
    finally:
        c.stop()


@pytest.mark.parametrize("consistency", ["linearizable", "lease"])
def test_paused_old_leader_never_serves_a_stale_read(tmp_path, consistency):
    """Thesis §6.4 and §6.4.1: the old leader, paused while the others elect and write, must not answer the old
    value, by default nor under its lease. The read is already waiting in its socket when it wakes up, and the
    others are stopped then: without a round (lease) only the clock can save it."""
    c = LocalCluster(str(tmp_path), extra=("-read-timeout", "2")).start()
    try:
        old = c.leader()
        assert old.request("POST", "/db/k", "old").status == 200
        assert old.request("GET", f"/db/k?consistency={consistency}").body == b"old"
        os.kill(old.proc.pid, signal.SIGSTOP)
        answer = []
        try:
            others = [n for n in c.nodes if n is not old]

            def new_leader():
                for n in others:
                    if n.status()["role"] == "leader":
                        return n
                return None

            new = wait_for(new_leader, 10, "a new leader")
            assert new.request("POST", "/db/k", "new").status == 200
            # The others stop too, so the old leader cannot learn of the new term before it answers: only its
            # own clock can tell it that its lease is over.
            for n in others:
                os.kill(n.proc.pid, signal.SIGSTOP)
            reader = threading.Thread(
                target=lambda: answer.append(old.request("GET", f"/db/k?consistency={consistency}", timeout=15)))
            reader.start()
            time.sleep(0.3)
            os.kill(old.proc.pid, signal.SIGCONT)
            reader.join(20)
        finally:
            for n in c.nodes:
                os.kill(n.proc.pid, signal.SIGCONT)
        r = answer[0]
        assert r.body != b"old" and r.status in (200, 503), r
        if r.status == 200:
            assert r.body == b"new"
        # The stale level may answer from memory: it is allowed to be old, and says what it knows.
        r = old.request("GET", "/db/k?consistency=stale")
        assert r.status == 200 and "x-raft-applied-index" in r.headers
    finally:
        c.stop()


def test_a_leader_that_cannot_commit_refuses_writes_beyond_max_uncommitted_bytes(tmp_path):
    """-max-uncommitted-bytes (raftlib.core.Config.max_uncommitted_bytes): with its followers SIGSTOPped the leader
    appends writes (they wait, their outcome unknown) until it holds the bound, then answers the next 503
    not-applied at once, so that a client may retry it; GET /status and /metrics show the bytes held and count the
    refusal apart from the others. The bound is the least -max-body 4096 allows (2 x 4096 +
    8192): four writes of 4,000 bytes fit, a fifth does not. -election-ms 3000 keeps it leading for at least 3 s
    (check-quorum). Once the followers resume, writes are taken again."""
    c = LocalCluster(str(tmp_path), extra=("-election-ms", "3000", "-max-body", "4096",
                                           "-max-uncommitted-bytes", "16384")).start()
    try:
        leader = c.leader()
        value = b"v" * 4000
        with paused([n for n in c.nodes if n is not leader]):
            for i in range(4):  # ~16 KB held: below the bound, so appended, and never committed
                with pytest.raises(OSError):  # no answer within our bound: the write waits for a majority
                    leader.request("POST", f"/db/u{i}", value, timeout=0.3)
            refused = leader.request("POST", "/db/u4", value, timeout=2)
            held = leader.status()["uncommitted_bytes"]
            samples = metric_samples(leader.request("GET", "/metrics", timeout=2).text)
        assert refused.status == 503 and refused.headers.get("x-raft-outcome") == "not-applied", refused
        assert "bytes of entries not yet committed" in refused.text, refused
        # What operators see: the bytes held (the four writes' entries, under the bound), the refusal counted apart.
        assert 4 * 4000 < held <= 16384 and f"holds {held} bytes" in refused.text, (held, refused)
        assert samples["raftdzmq_uncommitted_bytes"] == held
        assert samples['raftdzmq_writes_total{outcome="refused_uncommitted"}'] == 1
        assert samples["raftdzmq_proposals_refused_uncommitted_total"] == 1
        assert 'raftdzmq_writes_total{outcome="refused"}' not in samples
        assert c.write("u5", "after", timeout=20).status == 200
        assert c.leader().request("GET", "/db/u4").status == 404  # refused: never applied
        wait_for(lambda: c.leader().status()["uncommitted_bytes"] == 0, 10, "the leader to commit all it holds")
        assert all(n.status()["uncommitted_bytes"] == 0 for n in c.nodes if n is not c.leader())
    finally:
        c.stop()


def test_a_max_uncommitted_bytes_that_would_starve_the_largest_write_is_refused_at_start(tmp_path):
    """Review of uncommitted, 1: the leader takes a write above what the bound leaves only when it holds nothing
    uncommitted, which steady writes from other clients never allow; a bound below twice -max-body plus 8 KiB would
    refuse the largest writes for good. Refused as a usage error (exit 2, one line of error), before any file."""
    data_dir = tmp_path / "d"
    for max_body, bound in (("4096", "16383"), ("1048576", "1048576")):
        ports = ("-p", str(free_port()), "-hp", str(free_port()))  # were it to start: never the default ports
        out = subprocess.run([sys.executable, SERVER, *ports, "-max-body", max_body, "-max-uncommitted-bytes", bound,
                              str(data_dir)], capture_output=True, text=True, timeout=30)
        [error] = [line for line in out.stderr.splitlines() if "error:" in line]
        assert out.returncode == 2 and error.endswith(
            f"-max-uncommitted-bytes must be at least {2 * int(max_body) + 8192} (twice -max-body {max_body}, plus "
            "8192 for a key and the encoding): below, the largest write is taken only when no other is pending, "
            "which steady writes never allow"), out
    assert not data_dir.exists()


def test_status_and_prometheus_metrics(cluster):
    leader = cluster.leader()
    assert leader.request("POST", "/db/m", "1").status == 200
    assert leader.request("GET", "/db/m").status == 200
    st = leader.status()
    assert st["role"] == "leader" and st["commit_index"] >= st["applied_index"] > 0
    assert len(st["members"]) == 3 and all(m["match_index"] is not None for m in st["members"])
    text = leader.request("GET", "/metrics").text
    for name in ("raftdzmq_writes_total{outcome=\"committed\"}", "raftdzmq_fsync_seconds_bucket",
                 "raftdzmq_write_seconds_count", "raftdzmq_read_index_seconds_count", "raftdzmq_is_leader 1.0",
                 "raftdzmq_elections_won", "raftdzmq_hub_lag_seconds_count"):
        assert name in text, name
    samples = metric_samples(text)
    assert samples['raftdzmq_writes_total{outcome="committed"}'] >= 1
    # The histograms add up: every committed write observed once, the +Inf bucket holds them all.
    assert samples["raftdzmq_write_seconds_count"] == samples['raftdzmq_writes_total{outcome="committed"}']
    assert samples['raftdzmq_write_seconds_bucket{le="+Inf"}'] == samples["raftdzmq_write_seconds_count"]
    assert 0 < samples["raftdzmq_write_seconds_sum"] < samples["raftdzmq_write_seconds_count"] * 10
    assert samples['raftdzmq_write_seconds_bucket{le="0.0005"}'] <= samples['raftdzmq_write_seconds_bucket{le="2.0"}']
    assert samples["raftdzmq_hub_lag_seconds_count"] > 10  # a 10 ms probe, running since the start
    assert samples["raftdzmq_elections_won"] >= 1
