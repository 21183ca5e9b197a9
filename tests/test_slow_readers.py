"""Big answers to clients that never read them (review edge, L1, L2, Q2): raw sockets against a real 3-node cluster
at the default flags. While they hang, the leader's RSS stays within its budget of unsent answers
(-max-unsent-bytes, 256 MiB by default, plus a margin for the heap malloc keeps) and its loop's lag
(raftdzmq_hub_lag_seconds) under the election timeout (300 ms). Against main's code (7c9b6f8), within 4 s: 60
transactions of a prefix get over four 1 MB values of control bytes (24 MB of JSON each) grew the leader by
578 MiB, a probe over 0.25 s late; 100 long polls of one key written with 1 MB, by 588 MiB (one body each), two
probes late; 100 streams on different prefixes, by 583 MiB (one frame each)."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from procs import LocalCluster
from raftlib.server.edge import DEFAULT_MAX_UNSENT_BYTES

VALUE = b"\x01" * 1_000_000  # 6 MB as JSON (\u0001)
LAG_BOUND_SECONDS = 0.25  # the histogram's bucket under the election timeout (300 ms)
HANG_SECONDS = 4.0
MARGIN_BYTES = 160 << 20  # the process's own growth meanwhile: the history's events, answers being built, the heap malloc keeps


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("slow"))).start()
    yield c
    c.stop()


def lag_buckets(node) -> dict[float, float]:
    metrics = node.request("GET", "/metrics").text
    return {float("inf") if b == "+Inf" else float(b): float(v)
            for b, v in re.findall(r'raftdzmq_hub_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', metrics)}


def late_samples(before: dict[float, float], after: dict[float, float]) -> int:
    """How many of the leader's 10 ms probes between the two readings fired over LAG_BOUND_SECONDS late."""
    inf = float("inf")
    return int((after[inf] - before[inf]) - (after[LAG_BOUND_SECONDS] - before[LAG_BOUND_SECONDS]))


def never_reading(node, request: bytes, count: int) -> list[socket.socket]:
    """`count` connections that each send `request` and never read (a 4 KiB receive buffer)."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", node.http_port))
        s.sendall(request)
        socks.append(s)
    return socks


def peak_growth(node, rss0: int, seconds: float) -> int:
    """The most the node's RSS rose above `rss0` over `seconds` (read every 0.1 s)."""
    peak, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, node.rss_bytes() - rss0)
        time.sleep(0.1)
    return peak


def unsent_budget_cuts(node) -> int:
    found = re.search(r'^raftdzmq_http_evictions_total\{reason="unsent_budget"\} (\S+)',
                      node.request("GET", "/metrics").text, re.M)
    return int(float(found.group(1))) if found else 0


def check_bounded(leader, rss0: int, lag0: dict[float, float], socks: list[socket.socket], bound: int) -> None:
    try:
        grown = peak_growth(leader, rss0, HANG_SECONDS)
        late = late_samples(lag0, lag_buckets(leader))
    finally:
        for s in socks:
            s.close()
    assert grown < bound and late == 0, (f"the leader's RSS grew by {grown >> 20} MiB (bound {bound >> 20} MiB); "
                                         f"{late} of its 10 ms probes fired over {LAG_BOUND_SECONDS} s late")


def test_big_txn_answers_to_readers_that_never_read(cluster):
    leader = cluster.leader()
    for i in range(4):
        assert leader.request("POST", f"/db/t{i}", VALUE, timeout=20).status == 200
    body = b'{"success": [{"op": "get", "prefix": "t"}]}'
    time.sleep(1)
    rss0, lag0, cuts0 = leader.rss_bytes(), lag_buckets(leader), unsent_budget_cuts(leader)
    request = b"POST /txn HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    check_bounded(leader, rss0, lag0, never_reading(leader, request, 60), DEFAULT_MAX_UNSENT_BYTES + MARGIN_BYTES)
    # 60 answers of 6 MB are past the budget: the oldest readers were cut, counted and logged.
    assert unsent_budget_cuts(leader) > cuts0
    assert "(unsent budget)" in leader.log_text()
    # A client that reads gets what fits in the answer's bound, the rest said to be "more" (not 24 MB).
    r = leader.request("POST", "/txn", body, timeout=30)
    assert r.status == 200, r.text[:200]
    got = r.json()["results"][0]
    assert got["more"] is True and [kv["key"] for kv in got["kvs"]] == ["t0"] and got["kvs"][0]["value"] == VALUE.decode()
    assert len(r.body) < 7_000_000


def test_long_polls_of_one_key_share_their_answer(cluster):
    leader = cluster.leader()
    socks = never_reading(leader, b"GET /watch?key=pk&poll=1&timeout=60 HTTP/1.1\r\nHost: localhost\r\n\r\n", 100)
    time.sleep(1)  # every poll is waiting
    rss0, lag0 = leader.rss_bytes(), lag_buckets(leader)
    assert leader.request("POST", "/db/pk", VALUE, timeout=20).status == 200
    # One 6 MB body for all of them (and the event's own JSON in the history), not one each (~600 MB).
    check_bounded(leader, rss0, lag0, socks, MARGIN_BYTES)
    r = leader.request("GET", "/watch?key=pk&poll=1&from=0", timeout=10)
    assert r.status == 200 and json.loads(r.body)[0]["value"] == VALUE.decode()


def test_stalled_streams_on_many_prefixes_are_held_within_the_budget(cluster):
    leader = cluster.leader()
    socks = [s for i in range(1, 101)
             for s in never_reading(leader, b"GET /watch?prefix=%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (b"k" * i), 1)]
    time.sleep(1)
    rss0, lag0, cuts0 = leader.rss_bytes(), lag_buckets(leader), unsent_budget_cuts(leader)
    assert leader.request("POST", "/db/" + "k" * 200, VALUE, timeout=20).status == 200
    # 100 frames of 6 MB, one per prefix: past the budget, the oldest streams are cut.
    check_bounded(leader, rss0, lag0, socks, DEFAULT_MAX_UNSENT_BYTES + MARGIN_BYTES)
    assert unsent_budget_cuts(leader) > cuts0
