"""A watch on a long prefix must not hold the event loop (review edge3, L1), against a real 3-node cluster at the
default -election-ms 1000. One client streams `GET /watch?prefix=` of a 4,092-character prefix P from the leader,
puts 2,000 keys of 4,096 characters that share P's first 4,091 characters, and deletes them with one
`DELETE /db/?prefix=` (one log entry of 2,000 events, applied in one go). The leader's loop lag
(raftdzmq_hub_lag_seconds, a 10 ms timer) must stay under LAG_BOUND_SECONDS, a quarter of the election timeout,
meanwhile. With main's prefix index (a trie of one dict per character, at 8f03447) each event walked 4,091 nodes
along P before it found the key was not under it: the apply held the loop ~0.8 s (812 ms in process at load 3
in the review, whose keys were under P; the leader was deposed at -election-ms 300). Keys just off P cost main
the same walk and the watch no delivery, so the lag measured here is the index's alone (a delivery of 2,000 events
of 4 KiB is one 8 MiB frame: its cost is its own, bounded by the entry). The watch still gets its own keys'
events, and none of the others."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse

import pytest

from procs import LocalCluster, wait_for
from test_slow_readers import lag_buckets

PREFIX = "p" * 4092  # watched
NEAR = PREFIX[:-1] + "q"  # the keys: P's first 4,091 characters, then off it
KEYS = [NEAR + "%03d" % i for i in range(1000)] + [NEAR + "x%03d" % i for i in range(1000)]  # 4,095 and 4,096
PUTS_PER_TXN = 125  # ~512 KiB a transaction (-max-body 1 MiB; at most 128 ops)
LAG_BOUND_SECONDS = 0.25  # a bucket of the histogram, a quarter of the election timeout (1 s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("longprefix")), extra=("-election-ms", "1000")).start()
    yield c
    c.stop()


class StreamReader(threading.Thread):
    """Keeps a watch stream's bytes as they come (bounded by the socket's timeout; the test closes it)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock, self.received = sock, b""

    def run(self) -> None:
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    return
                self.received += data
        except OSError:  # closed by the test, or its timeout
            return


def late_over(before: dict[float, float], after: dict[float, float], bound: float) -> int:
    inf = float("inf")
    return int((after[inf] - before[inf]) - (after[bound] - before[bound]))


def test_a_prefix_delete_along_a_long_watched_prefix_does_not_hold_the_leaders_loop(cluster):
    leader = cluster.leader()
    sock = socket.create_connection(("127.0.0.1", leader.http_port), timeout=60)
    reader = StreamReader(sock)
    try:
        sock.sendall(b"GET /watch?prefix=%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % PREFIX.encode())
        reader.start()
        wait_for(lambda: reader.received, 10, "the watch's answer")
        assert reader.received.startswith(b"HTTP/1.1 200"), reader.received[:200]
        for i in range(0, len(KEYS), PUTS_PER_TXN):
            body = json.dumps({"success": [{"op": "put", "key": key, "value": ""}
                                           for key in KEYS[i:i + PUTS_PER_TXN]]})
            r = leader.request("POST", "/txn", body, timeout=30)
            assert r.status == 200, r.text[:200]
        time.sleep(1)
        term0, lag0 = leader.status()["term"], lag_buckets(leader)
        r = leader.request("DELETE", "/db/?prefix=" + urllib.parse.quote(NEAR), timeout=30)
        assert r.status == 200, r.text[:200]
        assert r.json()["deleted"] == len(KEYS)  # one entry: 2,000 keys is a prefix delete's most
        time.sleep(1)  # a probe held by the apply has fired by now
        lag1 = lag_buckets(leader)
        late, term = late_over(lag0, lag1, LAG_BOUND_SECONDS), leader.status()["term"]
        # The watch gets its own prefix's changes, and nothing of the keys off it.
        assert leader.request("POST", "/db/" + urllib.parse.quote(PREFIX + "1"), "mine").status == 200
        wait_for(lambda: b"event: put" in reader.received, 10, "the watch to get its key's put")
    finally:
        sock.close()
        reader.join(10)
    assert reader.received.count(b"event: ") == 1 and NEAR.encode() not in reader.received
    assert late == 0, (f"{late} of the leader's 10 ms probes fired over {LAG_BOUND_SECONDS} s late around the "
                       f"prefix delete (term {term0} -> {term}; lag histogram's change "
                       f"{ {b: lag1[b] - lag0[b] for b in lag0} })")
