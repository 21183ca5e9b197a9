"""Big answers to clients that never read them (review edge, L1, L2, Q2): raw sockets against a real 3-node cluster at
the default flags but the tests' -election-ms 300 (procs.TEST_ELECTION_MS). While they hang, the leader's RSS stays
within its budget of unsent answers (-max-unsent-bytes, 256 MiB by default, plus a margin for the heap malloc keeps) and
its loop's lag (raftdzmq_hub_lag_seconds) under the election timeout (300 ms). Against main's code (7c9b6f8), within
4 s: 60 transactions of a prefix get over four 1 MB values of control bytes (24 MB of JSON each) grew the leader by
578 MiB, a probe over 0.25 s late; 100 long polls of one key written with 1 MB, by 588 MiB (one body each), two probes
late; 100 streams on different prefixes, by 583 MiB (one frame each)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from procs import LocalCluster, Node, metric_samples, wait_for
from raftlib.server.edge import DEFAULT_MAX_UNSENT_BYTES

VALUE = b"\x01" * 1_000_000  # 6 MB as JSON (\u0001)
LAG_BOUND_SECONDS = 0.25  # the histogram's bucket under the tests' election timeout (procs.TEST_ELECTION_MS: 300 ms)
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


def evictions(node, reason: str) -> int:
    """raftdzmq_http_evictions_total{reason=...} of `node` now."""
    found = re.search(r'^raftdzmq_http_evictions_total\{reason="%s"\} (\S+)' % reason,
                      node.request("GET", "/metrics").text, re.M)
    return int(float(found.group(1))) if found else 0


def unsent_budget_cuts(node) -> int:
    return evictions(node, "unsent_budget")


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


# Which slow readers the budget cuts (review ef, L1 and L2): a node of its own with a budget of 16 MiB, room for two
# answers of 6 MB (VALUE as JSON) and a part of a third. A cut connection gives its client the part the kernel had
# queued, then its end: `whole_answer` tells.
SMALL_BUDGET = 16 << 20


def budget_node(tmp_path, budget: int) -> Node:
    node = Node("node", str(tmp_path)).start("-max-unsent-bytes", str(budget))
    try:
        wait_for(lambda: node.status()["role"] == "leader", 10, "the node to lead")
    except BaseException:
        node.kill()
        raise
    return node


@pytest.fixture
def small_budget_node(tmp_path):
    node = budget_node(tmp_path, SMALL_BUDGET)
    yield node
    node.kill()


def txn_request(body: bytes) -> bytes:
    return b"POST /txn HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def whole_answer(sock: socket.socket, seconds: float = 30.0, piece: int = 1 << 20,
                 pause: float = 0.0) -> tuple[int, bytes] | None:
    """Read `sock`'s answer (Content-Length framed), `piece` bytes a read with `pause` seconds after each: (status,
    body) if it came whole, None if the connection ended first (cut). At most `seconds` in all."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    data = bytearray()
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = bytes(data).partition(b"\r\n\r\n")
        found = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert found is not None, head
        length, body = int(found.group(1)), bytearray(rest)
        while len(body) < length:
            assert time.monotonic() < deadline, f"{len(body)} of {length} bytes within {seconds}s"
            chunk = sock.recv(piece)
            if not chunk:
                return None
            body += chunk
            if pause:
                time.sleep(pause)
    except ConnectionResetError:
        return None
    return int(head.split()[1]), bytes(body)


def unsent_gauges(node) -> tuple[float, float]:
    samples = metric_samples(node.request("GET", "/metrics").text)
    return samples["raftdzmq_http_unsent_bytes"], samples["raftdzmq_http_unsent_holders"]


def test_a_push_to_long_polls_sharing_one_body_cuts_the_txn_non_readers_not_the_polls(small_budget_node):
    """L1: 12 long polls of one key, not reading, share one 6 MB body (it counts once); then 4 clients POST /txn
    gets of 6 MB each and never read. Past the budget, the cut goes to a transaction's non-reader: cutting a poll
    frees nothing while the others hold the body. Main's policy cut the oldest holder, so every poll (each one freeing
    nothing) before the body went, and the transaction non-readers stayed. The gauges show the fill while it is held
    and nothing once the clients read or go."""
    node = small_budget_node
    assert node.request("POST", "/db/tk", VALUE, timeout=20).status == 200
    polls = never_reading(node, b"GET /watch?key=pk&poll=1&timeout=60 HTTP/1.1\r\nHost: localhost\r\n\r\n", 12)
    txns: list[socket.socket] = []
    try:
        time.sleep(1)  # every poll is waiting
        cuts0 = unsent_budget_cuts(node)
        assert node.request("POST", "/db/pk", VALUE, timeout=20).status == 200
        wait_for(lambda: unsent_gauges(node)[1] == 12, 10, "the 12 polls to hold their answer")
        held_bytes, _ = unsent_gauges(node)
        assert 6_000_000 <= held_bytes < 7_000_000, held_bytes  # one body for the 12
        for _ in range(4):
            txns += never_reading(node, txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'), 1)
            time.sleep(0.5)  # its answer built and held before the next comes
        answers = [whole_answer(s) for s in polls]
        assert all(a is not None and a[0] == 200 and json.loads(a[1])[0]["value"] == VALUE.decode()
                   for a in answers), [None if a is None else a[0] for a in answers]
        cut = [s for s in txns if whole_answer(s) is None]
        assert len(cut) >= 3, f"{len(cut)} of the 4 transaction non-readers cut"  # the newest may stay
        assert unsent_budget_cuts(node) - cuts0 == len(cut)
    finally:
        for s in polls + txns:
            s.close()
    wait_for(lambda: unsent_gauges(node) == (0, 0), 10, "the budget's fill back to nothing")


def first_event_value(sock: socket.socket, seconds: float = 30.0) -> bytes | None:
    """The value of the first event a watch stream's client receives (its head skipped, the chunked coding undone),
    or None if the connection ends first (cut). At most `seconds`."""
    sock.settimeout(seconds)
    deadline, data = time.monotonic() + seconds, bytearray()
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        del data[:data.index(b"\r\n\r\n") + 4]
        while True:
            size_end = data.find(b"\r\n")
            if size_end >= 0 and len(data) >= size_end + 2 + int(data[:size_end], 16) + 2:
                size = int(data[:size_end], 16)
                frame = bytes(data[size_end + 2:size_end + 2 + size])
                del data[:size_end + 2 + size + 2]
                for line in frame.split(b"\n"):
                    if line.startswith(b"data: "):
                        return json.loads(line[6:])["value"].encode()
                continue
            assert time.monotonic() < deadline, f"no event within {seconds}s"
            chunk = sock.recv(1 << 20)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None


def test_a_push_to_streams_sharing_one_frame_cuts_the_txn_non_readers_not_the_streams(small_budget_node):
    """L1 for watch streams (server-sent events), whose frames the wake writes: 8 streams of one key, not reading,
    share one 6 MB frame; then 4 clients POST /txn gets of 6 MB and never read. Past the budget the transactions'
    non-readers are cut, not the streams, which each get the event whole once they read."""
    node = small_budget_node
    assert node.request("POST", "/db/tk", VALUE, timeout=20).status == 200
    streams = never_reading(node, b"GET /watch?key=sk HTTP/1.1\r\nHost: localhost\r\n\r\n", 8)
    txns: list[socket.socket] = []
    try:
        time.sleep(1)  # every stream is waiting
        cuts0 = unsent_budget_cuts(node)
        assert node.request("POST", "/db/sk", VALUE, timeout=20).status == 200
        wait_for(lambda: unsent_gauges(node)[1] == 8, 10, "the 8 streams to hold their frame")
        for _ in range(4):
            txns += never_reading(node, txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'), 1)
            time.sleep(0.5)
        values = [first_event_value(s) for s in streams]
        assert all(v == VALUE for v in values), [None if v is None else len(v) for v in values]  # None: cut
        cut = [s for s in txns if whole_answer(s) is None]
        assert len(cut) >= 3, f"{len(cut)} of the 4 transaction non-readers cut"
        assert unsent_budget_cuts(node) - cuts0 == len(cut)
    finally:
        for s in streams + txns:
            s.close()


def test_a_newcomer_over_a_budget_full_of_one_shared_body_is_cut_not_the_sharers(tmp_path):
    """L1, the budget's edge: 6 long polls share a 6 MB body and a budget of 8 MiB; one client POSTs a transaction
    get of 6 MB and never reads. Only the newcomer's cut frees bytes (a poll's frees nothing while the others hold
    the body), so it goes, and the polls get their answer. Main's policy cut the oldest holder, poll after poll, until
    the body was freed: all six."""
    node = budget_node(tmp_path, 8 << 20)
    polls: list[socket.socket] = []
    txn: list[socket.socket] = []
    try:
        assert node.request("POST", "/db/tk", VALUE, timeout=20).status == 200
        polls = never_reading(node, b"GET /watch?key=pk&poll=1&timeout=60 HTTP/1.1\r\nHost: localhost\r\n\r\n", 6)
        time.sleep(1)  # every poll is waiting
        assert node.request("POST", "/db/pk", VALUE, timeout=20).status == 200
        wait_for(lambda: unsent_gauges(node)[1] == 6, 10, "the 6 polls to hold their answer")
        txn = never_reading(node, txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'), 1)
        wait_for(lambda: unsent_budget_cuts(node) >= 1, 10, "a cut")
        answers = [whole_answer(s) for s in polls]
        assert all(a is not None and a[0] == 200 for a in answers), [None if a is None else a[0] for a in answers]
        assert whole_answer(txn[0]) is None
        assert unsent_budget_cuts(node) == 1
    finally:
        for s in polls + txn:
            s.close()
        node.kill()


def test_a_steady_slow_reader_keeps_its_answer_and_the_non_readers_are_cut(small_budget_node):
    """L2: one client takes a 7.8 MB transaction answer at about 1 MB/s; meanwhile 6 clients POST /txn gets of 6 MB
    and never read, one every 0.4 s. Past the budget, the cut goes to the non-reader that has gone longest without
    taking a byte, never the steady reader, which gets its answer whole. Main's policy cut the oldest holder: the
    steady reader, whose hold began first."""
    node = small_budget_node
    small = b"\x01" * 300_000
    for key, value in (("s/a", VALUE), ("s/b", small), ("tk", VALUE)):
        assert node.request("POST", f"/db/{key}", value, timeout=20).status == 200
    cuts0 = unsent_budget_cuts(node)
    steady = socket.create_connection(("127.0.0.1", node.http_port))
    steady.sendall(txn_request(b'{"success": [{"op": "get", "prefix": "s/"}]}'))
    got: list = []
    reader = threading.Thread(target=lambda: got.append(whole_answer(steady, 60, piece=65536, pause=0.06)))
    reader.start()
    others: list[socket.socket] = []
    try:
        time.sleep(0.5)
        for _ in range(6):
            others += never_reading(node, txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'), 1)
            time.sleep(0.4)
        reader.join(60)
        assert not reader.is_alive()
        assert got[0] is not None, "the steady reader was cut"
        status, body = got[0]
        kvs = json.loads(body)["results"][0]["kvs"]
        assert status == 200 and [kv["value"].encode() for kv in kvs] == [VALUE, small]
        cut = [s for s in others if whole_answer(s) is None]
        assert len(cut) >= 3, f"{len(cut)} of the 6 non-readers cut"
        assert unsent_budget_cuts(node) - cuts0 == len(cut)
    finally:
        steady.close()
        for s in others:
            s.close()
        reader.join(10)


def test_a_backup_reader_cut_off_for_its_rate_is_counted_as_an_eviction(tmp_path):
    """A backup's reader slower than -backup-min-rate is cut off (tests/test_ops.py); the cut shows in
    raftdzmq_http_evictions_total{reason="backup_too_slow"} as well as in the log (it did not, before: review ef)."""
    node = Node("node", str(tmp_path)).start("-backup-min-rate", str(8 << 20))
    slow = None
    try:
        wait_for(lambda: node.status()["role"] == "leader", 10, "the node to lead")
        for i in range(40):  # 8 MB: more than the socket buffers hold
            assert node.request("POST", f"/db/k{i}", "v" * 200_000).status == 200
        slow = never_reading(node, b"GET /snapshot HTTP/1.1\r\nHost: localhost\r\n\r\n", 1)[0]
        wait_for(lambda: evictions(node, "backup_too_slow") == 1, 20, "the backup reader counted as cut off")
        assert "closed the backup at index" in node.log_text()
    finally:
        if slow is not None:
            slow.close()
        node.kill()
