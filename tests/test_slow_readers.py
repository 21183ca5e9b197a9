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
        wait_for(lambda: node.status()["cluster_feature_level"] == node.status()["feature_level"], 10,
                 "the feature level raised (a transaction is refused 409 meanwhile)")
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


def reading(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    """`function(*args, **kwargs)` in a thread of its own, started: the thread and the list its result goes in."""
    got: list = []
    thread = threading.Thread(target=lambda: got.append(function(*args, **kwargs)))
    thread.start()
    return thread, got


def test_a_push_to_long_polls_sharing_one_body_cuts_the_txn_non_readers_not_the_polls(small_budget_node):
    """12 long polls of one key share one 6 MB body (it counts once) and read it slowly (about 2 MB/s each); then
    4 clients POST /txn gets of 6 MB each and never read. Past the budget, the cut goes to the transactions'
    non-readers: the polls are one candidate (they share the body), as stalled as the least stalled of them, and they
    read. (Polls that share a body and do not read are the attacker's pairs of review bud, L1: they are cut as one,
    the longest stalled first: test_pairs_of_non_readers_sharing_answers_are_cut_for_an_honest_client.) The gauges
    show the fill while it is held and nothing once the clients read or go."""
    node = small_budget_node
    assert node.request("POST", "/db/tk", VALUE, timeout=20).status == 200
    polls = never_reading(node, b"GET /watch?key=pk&poll=1&timeout=60 HTTP/1.1\r\nHost: localhost\r\n\r\n", 12)
    txns: list[socket.socket] = []
    readers = []
    try:
        time.sleep(1)  # every poll is waiting
        cuts0 = unsent_budget_cuts(node)
        assert node.request("POST", "/db/pk", VALUE, timeout=20).status == 200
        wait_for(lambda: unsent_gauges(node)[1] == 12, 10, "the 12 polls to hold their answer")
        held_bytes, _ = unsent_gauges(node)
        assert 6_000_000 <= held_bytes < 7_000_000, held_bytes  # one body for the 12
        readers = [reading(whole_answer, s, 60, piece=65536, pause=0.03) for s in polls]
        for _ in range(4):
            txns += never_reading(node, txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'), 1)
            time.sleep(0.5)  # its answer built and held before the next comes
        for thread, _ in readers:
            thread.join(60)
        answers = [got[0] if got else None for _, got in readers]
        assert all(a is not None and a[0] == 200 and json.loads(a[1])[0]["value"] == VALUE.decode()
                   for a in answers), [None if a is None else a[0] for a in answers]
        cut = [s for s in txns if whole_answer(s) is None]
        assert len(cut) >= 3, f"{len(cut)} of the 4 transaction non-readers cut"  # the newest may stay
        assert unsent_budget_cuts(node) - cuts0 == len(cut)
    finally:
        for s in polls + txns:
            s.close()
        for thread, _ in readers:
            thread.join(10)
    wait_for(lambda: unsent_gauges(node) == (0, 0), 10, "the budget's fill back to nothing")


def first_event_value(sock: socket.socket, seconds: float = 30.0, piece: int = 1 << 20,
                      pause: float = 0.0) -> bytes | None:
    """The value of the first event a watch stream's client receives (its head skipped, the chunked coding undone),
    or None if the connection ends first (cut); read `piece` bytes at a time with `pause` seconds after each. At most
    `seconds`."""
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
            chunk = sock.recv(piece)
            if not chunk:
                return None
            data += chunk
            if pause:
                time.sleep(pause)
    except ConnectionResetError:
        return None


def test_a_push_to_streams_sharing_one_frame_cuts_the_txn_non_readers_not_the_streams(small_budget_node):
    """The same for watch streams (server-sent events), whose frames the wake writes: 8 streams of one key share one
    6 MB frame and read it slowly; then 4 clients POST /txn gets of 6 MB and never read. Past the budget the
    transactions' non-readers are cut, not the streams, which each get the event whole."""
    node = small_budget_node
    assert node.request("POST", "/db/tk", VALUE, timeout=20).status == 200
    streams = never_reading(node, b"GET /watch?key=sk HTTP/1.1\r\nHost: localhost\r\n\r\n", 8)
    txns: list[socket.socket] = []
    readers = []
    try:
        time.sleep(1)  # every stream is waiting
        cuts0 = unsent_budget_cuts(node)
        assert node.request("POST", "/db/sk", VALUE, timeout=20).status == 200
        wait_for(lambda: unsent_gauges(node)[1] == 8, 10, "the 8 streams to hold their frame")
        readers = [reading(first_event_value, s, 60, piece=65536, pause=0.03) for s in streams]
        for _ in range(4):
            txns += never_reading(node, txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'), 1)
            time.sleep(0.5)
        for thread, _ in readers:
            thread.join(60)
        values = [got[0] if got else None for _, got in readers]
        assert all(v == VALUE for v in values), [None if v is None else len(v) for v in values]  # None: cut
        cut = [s for s in txns if whole_answer(s) is None]
        assert len(cut) >= 3, f"{len(cut)} of the 4 transaction non-readers cut"
        assert unsent_budget_cuts(node) - cuts0 == len(cut)
    finally:
        for s in streams + txns:
            s.close()
        for thread, _ in readers:
            thread.join(10)


# Review bud, L1: an attacker fills the budget with answers that pairs of its non-readers share (a long poll's body, a
# stream's frame, a value pipelined GETs send), one pair to a key. Each pair is one candidate, stalled since its answer
# was offered, so an honest client's answer (that it reads) is served and the pairs are cut, oldest first. Before, a
# holder that shared its answer was never cut while another freed bytes alone, and the honest client was cut at once.
PAIR_REQUESTS = {
    "polls": b"GET /watch?key=%s&poll=1&timeout=60 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "streams": b"GET /watch?key=%s HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "gets": b"GET /db/%s HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4,  # pipelined: each holds the store's value
}


def fill_with_pairs(node, kind: str, pairs: int) -> list[socket.socket]:
    """`pairs` pairs of non-readers, each pair sharing one answer of `kind` (about 6 MB), all held."""
    socks: list[socket.socket] = []
    try:
        for i in range(pairs):
            key = f"p/{i}"
            if kind == "gets":  # its value as it is stored, 1 MB less than a write's bound
                assert node.request("POST", f"/db/{key}", b"g" * 1_000_000, timeout=20).status == 200
            socks += never_reading(node, PAIR_REQUESTS[kind].replace(b"%s", key.encode()), 2)
        if kind != "gets":
            time.sleep(1)  # every watch is waiting
            for i in range(pairs):
                assert node.request("POST", f"/db/p/{i}", VALUE, timeout=20).status == 200
        wait_for(lambda: unsent_gauges(node)[1] == 2 * pairs, 10, "the pairs to hold their answers")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def honest_answer(node, kind: str) -> bool:
    """An honest client of `kind` reads its answer (a 6 MB transaction get, as fast as it can; a lone stream's 6 MB
    event at about 2 MB/s; a backup of about 8 MB at about 4 MB/s): whether it came whole."""
    s = socket.create_connection(("127.0.0.1", node.http_port))
    try:
        if kind == "txn":
            s.sendall(txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'))
            got = whole_answer(s, 60)
            return (got is not None and got[0] == 200
                    and json.loads(got[1])["results"][0]["kvs"][0]["value"] == VALUE.decode())
        if kind == "stream":
            s.sendall(b"GET /watch?key=lone HTTP/1.1\r\nHost: localhost\r\n\r\n")
            time.sleep(0.5)  # the watch is waiting
            thread, got = reading(first_event_value, s, 60, piece=65536, pause=0.03)
            assert node.request("POST", "/db/lone", VALUE, timeout=20).status == 200
            thread.join(70)
            return bool(got) and got[0] == VALUE
        s.sendall(b"GET /snapshot HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = whole_answer(s, 60, piece=262144, pause=0.06)
        return got is not None and got[0] == 200 and len(got[1]) > 8_000_000
    finally:
        s.close()


@pytest.mark.parametrize("pairs_of, honest", [("polls", "txn"), ("streams", "txn"), ("gets", "txn"),
                                              ("polls", "stream"), ("polls", "backup")])
def test_pairs_of_non_readers_sharing_answers_are_cut_for_an_honest_client(tmp_path, pairs_of, honest):
    """L1 (review bud): 2 pairs of non-readers, each pair sharing one answer, hold 12 MB of a 16 MiB budget (2 MB of
    a 4 MiB one against pipelined GETs of 1 MB values; 12 MiB for a backup, whose pieces are 1 MiB); an honest client
    of each kind in turn reads its answer whole, three times (a backup once), and each cut is one of the pairs'."""
    budget = {"gets": 4 << 20, "polls": 12 << 20 if honest == "backup" else SMALL_BUDGET}.get(pairs_of, SMALL_BUDGET)
    node = budget_node(tmp_path, budget)
    attack: list[socket.socket] = []
    try:
        assert node.request("POST", "/db/tk", VALUE, timeout=20).status == 200
        if honest == "backup":
            for j in range(8):
                assert node.request("POST", f"/db/b/{j}", bytes(range(256)) * 3907, timeout=20).status == 200
        attack = fill_with_pairs(node, pairs_of, 2)
        served = [honest_answer(node, honest) for _ in range(1 if honest == "backup" else 3)]
        assert all(served), f"the honest {honest} client served: {served}"
        assert 0 < unsent_budget_cuts(node) <= len(attack)  # the honest ones served: the cuts went to the pairs
    finally:
        for s in attack:
            s.close()
        node.kill()


def test_a_newcomer_that_does_not_read_over_a_budget_full_of_readers_is_cut(small_budget_node):
    """Two clients read 6 MB transaction answers slowly (about 1 MB/s); a third asks for one and never reads. Past the
    budget, the newcomer that has not read is cut, not a reader (it ranks as not reading from its first hold)."""
    node = small_budget_node
    assert node.request("POST", "/db/tk", VALUE, timeout=20).status == 200
    readers, socks = [], []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", node.http_port))
            socks.append(s)
            s.sendall(txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'))
            readers.append(reading(whole_answer, s, 60, piece=65536, pause=0.06))
            time.sleep(0.3)
        time.sleep(0.5)
        newcomer = never_reading(node, txn_request(b'{"success": [{"op": "get", "key": "tk"}]}'), 1)[0]
        socks.append(newcomer)
        for thread, _ in readers:
            thread.join(60)
        assert all(got and got[0] is not None and got[0][0] == 200 for _, got in readers), "a reader was cut"
        assert whole_answer(newcomer) is None
        assert unsent_budget_cuts(node) == 1
    finally:
        for s in socks:
            s.close()
        for thread, _ in readers:
            thread.join(10)


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


def churning_non_reader(node, stop: threading.Event, life: float) -> None:
    """Until `stop`: a new connection asks for a 6 MB transaction get, never reads, and closes after `life` seconds
    or once the node cut it (an end of file or a reset, peeked at without reading what came)."""
    request = txn_request(b'{"success": [{"op": "get", "key": "tk"}]}')
    while not stop.is_set():
        s = never_reading(node, request, 1)[0]
        s.settimeout(0.05)
        end = time.monotonic() + life
        try:
            while not stop.is_set() and time.monotonic() < end:
                try:
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        break
                    time.sleep(0.05)
                except TimeoutError:
                    pass
        except OSError:
            pass
        finally:
            s.close()


@pytest.mark.parametrize("reader_first", [True], ids=["reading-first"])
def test_a_steady_reader_keeps_its_answer_while_fresh_non_readers_keep_coming(small_budget_node, reader_first):
    """L2 (review bud): one client takes a 7.8 MB transaction answer at about 1 MB/s; meanwhile 6 clients in turn
    ask for 6 MB transaction gets, never read, and close after 0.3 s (or once cut), each followed by a fresh one.
    The reader gets its answer whole: a fresh non-reader ranks as not reading from its first hold, and the reader's
    answer, while it is made, as begun at its latest turn. Before, every hold started the holder's time without
    progress again, so the newest always looked less stalled than the reader, which was cut. A reader that arrives
    into the churn (reader_first False) is not promised this (README, -max-unsent-bytes; review bud2, L2: its fresh
    answer ranks among the just-offered ones until its first byte is seen, and was cut in 12 rounds of 21 with 8
    churners; CI at 1f04b16 saw it cut with 6), so that case is not asserted."""
    node = small_budget_node
    small = b"\x01" * 300_000
    for key, value in (("s/a", VALUE), ("s/b", small), ("tk", VALUE)):
        assert node.request("POST", f"/db/{key}", value, timeout=20).status == 200
    cuts0 = unsent_budget_cuts(node)
    stop = threading.Event()
    churn = [threading.Thread(target=churning_non_reader, args=(node, stop, 0.3)) for _ in range(6)]
    steady = socket.create_connection(("127.0.0.1", node.http_port))
    reader: threading.Thread | None = None
    try:
        if not reader_first:
            for thread in churn:
                thread.start()
            time.sleep(1)
        steady.sendall(txn_request(b'{"success": [{"op": "get", "prefix": "s/"}]}'))
        reader, got = reading(whole_answer, steady, 60, piece=65536, pause=0.06)
        if reader_first:
            time.sleep(0.5)
            for thread in churn:
                thread.start()
        reader.join(60)
        assert not reader.is_alive()
        cuts = unsent_budget_cuts(node) - cuts0
        assert got[0] is not None, f"the steady reader was cut ({cuts} cuts)"
        status, body = got[0]
        assert status == 200, (status, body[:200])
        kvs = json.loads(body)["results"][0]["kvs"]
        assert [kv["value"].encode() for kv in kvs] == [VALUE, small]
        assert cuts > 0
    finally:
        stop.set()
        for thread in churn:
            if thread.is_alive():
                thread.join(10)
        steady.close()
        if reader is not None:
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
