"""GET /livez and GET /readyz, the access log of -v, and X-Raft-Outcome, on real processes on loopback (issues 14
and 15): what a load balancer, a Kubernetes probe or a client deciding whether to retry a write sees."""

from __future__ import annotations

import os
import re
import signal

import pytest

from procs import LocalCluster, Node, wait_for


def send(node: Node, sig: int) -> None:
    """A signal to the node's process by its pid (Node.kill waits for the process to end)."""
    os.kill(node.proc.pid, sig)


def probe(node: Node, path: str, timeout: float = 2.0):
    return node.request("GET", path, timeout=timeout)


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(str(tmp_path)).start()
    yield c
    c.stop()


def test_livez_and_readyz_through_a_pause_and_the_loss_of_the_peers(cluster):
    for n in cluster.nodes:
        wait_for(lambda n=n: probe(n, "/readyz").status == 200, 10, f"{n.name} ready")
        assert (probe(n, "/livez").status, probe(n, "/livez").text) == (200, "ok\n")
        assert probe(n, "/readyz").text == "ok\n"
    leader = cluster.leader()
    paused = next(n for n in cluster.nodes if n is not leader)

    # A paused process answers neither: the prober's timeout is the check.
    send(paused, signal.SIGSTOP)
    try:
        for path in ("/livez", "/readyz"):
            with pytest.raises(OSError):  # socket.timeout
                probe(paused, path, timeout=1.0)
    finally:
        send(paused, signal.SIGCONT)
    # Woken up after over a second: the stall is reported at once (its loop saw its timers that late), then ends.
    r = probe(paused, "/livez")
    assert r.status == 503 and r.text.startswith("event loop stalled: its timers ran "), r
    wait_for(lambda: probe(paused, "/livez").status == 200, 15, "livez 200 after SIGCONT")
    wait_for(lambda: probe(paused, "/readyz").status == 200, 10, "readyz 200 after SIGCONT")

    # The peers killed: the survivor loses its leader (check-quorum, or its leader is gone) within a few election
    # timeouts and says so; its loop is fine.
    for n in cluster.nodes:
        if n is not leader:
            n.kill()
    r = wait_for(lambda: (r := probe(leader, "/readyz")).status == 503 and r, 10, "readyz 503 on the survivor")
    assert r.text == "no leader\n"
    assert "[-]leader failed: no leader\n" in probe(leader, "/readyz?verbose").text
    assert (probe(leader, "/livez").status, probe(leader, "/livez").text) == (200, "ok\n")

    # A write to the minority side: nothing was proposed, so it may be sent again.
    r = leader.request("POST", "/db/k", "v", timeout=10)
    assert (r.status, r.headers.get("x-raft-outcome")) == (503, "not-applied"), (r, r.headers)


def test_a_write_proposed_that_cannot_commit_is_unknown(tmp_path):
    """A leader whose followers are paused takes the write (it has an index) but cannot commit it: after the
    write timeout its outcome is unknown. The election timeout is long, so the leader keeps leading (check-quorum
    steps it down after one election timeout of silence) past the 1 s write timeout."""
    c = LocalCluster(str(tmp_path), extra=("-election-ms", "2000", "-write-timeout", "1")).start()
    try:
        leader = c.leader()
        assert c.write("before", "1").status == 200
        followers = [n for n in c.nodes if n is not leader]
        for n in followers:
            send(n, signal.SIGSTOP)
        try:
            r = leader.request("POST", "/db/k", "v", timeout=10)
        finally:
            for n in followers:
                send(n, signal.SIGCONT)
        assert r.status == 503 and r.text == "write not confirmed within 1s; its outcome is unknown\n", r
        assert r.headers["x-raft-outcome"] == "unknown"
    finally:
        c.stop()


ACCESS_LINE = re.compile(r"raftdzmq\.access: (\S+) (\S+) (\d{3}) (\d+) (\d+\.\d)ms 127\.0\.0\.1:\d+$", re.M)


@pytest.mark.parametrize("verbose", [True, False])
def test_v_logs_a_line_per_request_and_nothing_without(tmp_path, verbose):
    node = Node("node.1", str(tmp_path)).start(*(["-v"] if verbose else []))
    try:
        wait_for(lambda: node.status()["role"] == "leader", 10, "a leader")
        assert node.request("POST", "/db/k%C3%A9?prev_exist=false", "value").status == 200
        assert node.request("GET", "/db/nope?consistency=stale").status == 404
        if not verbose:
            node.stop()
            assert "raftdzmq.access" not in node.log_text(current=True)
            return
        lines = wait_for(lambda: (found := ACCESS_LINE.findall(node.log_text(current=True))) and
                         found[-1][1].startswith("/db/nope") and found, 10, "the access log's last line")
        assert ("POST", "/db/k%C3%A9?prev_exist=false", "200", "0") == lines[-2][:4], lines
        assert ("GET", "/db/nope?consistency=stale", "404", str(len(b"no such key: nope\n"))) == lines[-1][:4], lines
        assert all(m == "GET" and p == "/status" for m, p, *_ in lines[:-2])  # the start's polls
        assert " INFO " in next(line for line in node.log_text(current=True).splitlines() if "raftdzmq.access" in line)
    finally:
        node.kill()
