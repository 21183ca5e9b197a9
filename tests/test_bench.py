"""The bench's own logic, which its figures rest on: the open-loop schedule, the percentiles, latency counted from
the scheduled time (no coordinated omission), connections opened as needed, the generator's behind-schedule
verdict, and the Prometheus deltas of bench/load.py. Fast: no cluster, one tiny threaded HTTP server on 127.0.0.1
in this process and bench/openloop.py as a subprocess. Speed is never asserted here."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import load  # noqa: E402
import openloop  # noqa: E402


def test_schedule_is_fixed_by_rate_and_duration():
    assert openloop.schedule_seconds(4, 1) == [0, 0.25, 0.5, 0.75]
    offsets = openloop.schedule_seconds(1000, 2.5)
    assert len(offsets) == 2500 and offsets[-1] == pytest.approx(2.499)
    assert openloop.schedule_seconds(3, 1) == [0, 1 / 3, 2 / 3]


def test_percentile_is_nearest_rank():
    values = list(range(1, 1001))
    assert openloop.percentile(values, 50) == 500
    assert openloop.percentile(values, 99) == 990
    assert openloop.percentile(values, 99.9) == 999
    assert openloop.percentile(values, 100) == 1000
    assert openloop.percentile([7], 99.9) == 7
    # One outlier in a thousand is the p100, not the p99.9; two are the p99.9: never averaged away.
    assert openloop.percentile([1] * 999 + [500], 99.9) == 1
    assert openloop.percentile([1] * 998 + [500, 500], 99.9) == 500


def test_summary_keeps_unanswered_requests_as_infinite():
    s = openloop.summarize([0.001] * 990 + [math.inf] * 10, [0.0] * 1000)
    assert s["p50"] == pytest.approx(1000) and s["p99"] == pytest.approx(1000) and s["p999"] == math.inf


def test_verdict_names_the_generator_when_it_is_the_bottleneck():
    fine = {"p99": 50_000, "p999": 80_000, "late_p99": 800, "late_p999": 3_000}
    assert openloop.verdict(fine, cpu_cores=0.3) is None
    assert "CPU" in openloop.verdict(fine, cpu_cores=0.95)
    late = dict(fine, late_p99=20_000)
    assert "p99" in openloop.verdict(late, cpu_cores=0.3)
    late_tail = dict(fine, late_p999=30_000)
    assert "p999" in openloop.verdict(late_tail, cpu_cores=0.3)
    assert "busy" in openloop.verdict(fine, cpu_cores=0.3, busy=0.7)
    assert openloop.verdict(fine, cpu_cores=0.3, busy=0.3) is None
    # Under the timer's resolution lateness is not held against a run, however small its latencies.
    fast = {"p99": 900, "p999": 950, "late_p99": 700, "late_p999": 900}
    assert openloop.verdict(fast, cpu_cores=0.3) is None


def test_busy_share_is_the_probes_lateness_over_the_time_it_covered():
    assert openloop.busy_share([], 0.005) == 0.0
    assert openloop.busy_share([0.0] * 10, 0.005) == 0.0
    assert openloop.busy_share([0.005] * 10, 0.005) == pytest.approx(0.5)
    assert openloop.busy_share([0.045, 0.0], 0.005) == pytest.approx(0.045 / 0.055)


def test_histogram_delta_counts_a_runs_observations_above_each_bound():
    text = ('raftdzmq_hub_lag_seconds_bucket{le="0.01"} 95.0\nraftdzmq_hub_lag_seconds_bucket{le="0.05"} 99.0\n'
            'raftdzmq_hub_lag_seconds_bucket{le="+Inf"} 100.0\n')
    before = {0.01: 40.0, 0.05: 40.0, math.inf: 40.0}
    after = load.prom_histogram(text, "raftdzmq_hub_lag_seconds")
    assert after == {0.01: 95.0, 0.05: 99.0, math.inf: 100.0}
    assert load.histogram_delta(before, after) == {"count": 60.0, ">0.01": 5.0, ">0.05": 1.0}


class StallingServer:
    """HTTP/1.1 keep-alive on 127.0.0.1, a thread per connection; the `stall_at`-th request (1-based, across all
    connections) is answered `stall_seconds` late, every other one at once."""

    def __init__(self, stall_at: int = 0, stall_seconds: float = 0.0, status: bytes = b"200 OK") -> None:
        self.stall_at, self.stall_seconds, self.status = stall_at, stall_seconds, status
        self.count, self.lock, self.conns = 0, threading.Lock(), []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                _, buf = buf.split(b"\r\n\r\n", 1)
                with self.lock:
                    self.count += 1
                    stall = self.count == self.stall_at
                if stall:
                    time.sleep(self.stall_seconds)
                conn.sendall(b"HTTP/1.1 " + self.status + b"\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def requests_file(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([["GET", "/x", None, {}]]))
    return str(path)


def generate(port: int, requests_file: str, rate: float, duration: float, max_connections: int,
             burn_us: float = 0) -> dict:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "openloop.py"), "--url",
                          f"http://127.0.0.1:{port}", "--rate", str(rate), "--duration", str(duration), "--warmup",
                          "0", "--requests", requests_file, "--max-connections", str(max_connections), "--timeout",
                          "5", "--burn-us", str(burn_us)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_latency_counts_from_the_schedule_so_a_stall_delays_every_request_behind_it(requests_file):
    # One connection, 200 requests/s for 1.5 s, the 50th answered 0.4 s late: the ~80 requests scheduled during
    # the stall wait behind it and each counts its wait. Measured from when each was sent (coordinated omission),
    # only one request would be slow and the p90 would be about a millisecond.
    server = StallingServer(stall_at=50, stall_seconds=0.4)
    try:
        r = generate(server.port, requests_file, rate=200, duration=1.5, max_connections=1)
    finally:
        server.close()
    assert r["requests"] == 300 and r["errors"] == 0 and r["timeouts"] == 0
    assert r["connections"] == 1 and r["max_waiting"] >= 60
    assert r["p90"] >= 100_000, r
    assert r["max"] >= 390_000, r


def test_connections_open_as_needed_so_a_stall_holds_only_its_own_request(requests_file):
    server = StallingServer(stall_at=50, stall_seconds=0.4)
    try:
        r = generate(server.port, requests_file, rate=200, duration=1.5, max_connections=64)
    finally:
        server.close()
    assert r["requests"] == 300 and r["errors"] == 0
    assert r["connections"] >= 2
    assert r["max"] >= 390_000, r
    assert r["p90"] < 100_000, r


def test_a_generator_that_cannot_keep_up_marks_its_run_invalid(requests_file):
    # 20 ms of the generator's own CPU per answer at 200 requests/s is 4 cores' worth: it falls behind.
    server = StallingServer()
    try:
        r = generate(server.port, requests_file, rate=200, duration=1.0, max_connections=8, burn_us=20_000)
    finally:
        server.close()
    assert not r["valid"], r
    assert "generator" in r["invalid_reason"]


def test_a_redirect_is_an_error_not_an_answer(requests_file):
    # A node that lost the leadership answers writes with 307 at once: counted as answers, they would make its
    # latency look better than the leader's.
    server = StallingServer(status=b"307 Temporary Redirect")
    try:
        r = generate(server.port, requests_file, rate=100, duration=0.5, max_connections=8)
    finally:
        server.close()
    assert r["requests"] == 50 and r["errors"] == 50, r


class FakeCluster:
    """The cluster as scale.repair and scale.Stalled see it; `failing`: how many write requests fail (503, nothing
    written) before they succeed."""

    def __init__(self, held: set[str], failing: int = 0) -> None:
        self.held, self.requests, self.failing = held, [], failing

    def keys(self) -> set[str]:
        return set(self.held)

    def put_keys(self, keys: list[str]) -> int:
        self.requests.append(list(keys))
        if self.failing:
            self.failing -= 1
            return 503
        self.held.update(keys)
        return 200

    def count(self) -> int:
        return len(self.held)


@pytest.mark.parametrize("batch", [1, 4, 100])
def test_the_scale_load_writes_again_exactly_the_keys_whose_write_failed(batch):
    import scale

    cluster = FakeCluster({f"k{i:09d}" for i in range(100) if i % 7})
    assert scale.repair(cluster, 100, batch) == 15
    assert sorted(k for r in cluster.requests for k in r) == [f"k{i:09d}" for i in range(0, 100, 7)]
    assert max(len(r) for r in cluster.requests) == min(batch, 15)  # `batch` keys a request (the last: the rest)
    assert len(cluster.requests) == -(-15 // batch)
    assert cluster.count() == 100


def test_the_scale_repair_writes_again_what_its_own_write_lost():
    """A repair write that fails (an election) is found missing by the next listing and written again."""
    import scale

    cluster = FakeCluster({f"k{i:09d}" for i in range(100) if i % 7}, failing=1)
    assert scale.repair(cluster, 100, 10) == 15  # what the first listing missed
    assert cluster.count() == 100
    assert len(cluster.requests) == 3  # 10 + 5 keys, the failed request's 10 or 5 again


def test_the_scale_repair_gives_up_after_its_passes():
    import scale

    cluster = FakeCluster({"k000000000"}, failing=10**6)
    assert scale.repair(cluster, 3, 1, passes=3) == 2
    assert len(cluster.requests) == 6 and cluster.count() == 1  # 2 keys a pass, 3 passes, then it stops


def test_the_scale_load_stops_waiting_when_the_count_stalls(monkeypatch):
    import scale

    cluster = FakeCluster({"k000000000"})
    clock = [0.0]
    monkeypatch.setattr(scale.time, "monotonic", lambda: clock[0])
    stalled = scale.Stalled(cluster, 10, seconds=15)
    assert not stalled()
    clock[0] = 10
    cluster.held.add("k000000001")
    assert not stalled()  # it grew: the wait starts again
    clock[0] = 24
    assert not stalled()
    clock[0] = 26
    assert stalled()
    assert scale.Stalled(FakeCluster({f"k{i}" for i in range(10)}), 10)()



def test_the_scale_harness_times_the_snapshot_of_all_its_keys(tmp_path):
    """It set the store's dict alone, and the snapshot walks the ordered keys: it timed an empty map (38 bytes)."""
    import scale

    timed = scale.time_store_snapshot(50, str(tmp_path))
    assert timed["encoded_bytes"] > 50 * scale.VALUE_BYTES  # every value is in it
    assert list(tmp_path.iterdir()) == []  # its file removed

# ---- bench/watch_fanout.py and the txn workload of bench/load.py ------------------------------------------------


def chunked(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads)


def test_dechunk_takes_whole_chunks_only_and_keeps_the_rest():
    import watch_fanout

    data = chunked(b"hello ", b"world") + b"5\r\nabc"
    assert watch_fanout.dechunk(data) == (b"hello world", b"5\r\nabc", False)
    assert watch_fanout.dechunk(b"5\r") == (b"", b"5\r", False)
    assert watch_fanout.dechunk(chunked(b"x") + b"0\r\n\r\n") == (b"x", b"", True)
    assert watch_fanout.dechunk(b"a;ext=1\r\n0123456789\r\n") == (b"0123456789", b"", False)


def test_complete_messages_split_at_the_last_delimiter():
    import watch_fanout

    assert watch_fanout.complete_messages(b"a\n\nb\n\nc", b"\n\n") == (b"a\n\nb\n\n", b"c")
    assert watch_fanout.complete_messages(b"partial", b"\n") == (b"", b"partial")


def raftdzmq_frame(key: str, index: int) -> bytes:
    return (f"id: {index}\nevent: put\ndata: " + json.dumps({"type": "put", "key": key, "value": "v", "index": index,
                                                             "create_index": index}) + "\n\n").encode()


def etcd_message(key: str, revision: int) -> bytes:
    import base64

    b64 = base64.b64encode(key.encode()).decode()
    return (json.dumps({"result": {"header": {"revision": str(revision)}, "events": [
        {"kv": {"key": b64, "mod_revision": str(revision), "value": "dg=="}}]}}, separators=(",", ":")) + "\n"
            ).encode()


@pytest.mark.parametrize("system", ["raftdzmq", "etcd"])
def test_a_watcher_times_each_event_when_its_message_is_whole(system):
    import watch_fanout

    keys = watch_fanout.key_table("fan1/", 4, base64_keys=system == "etcd")
    if system == "raftdzmq":
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        first = b": watching after index 7\n\n"
        frames = [raftdzmq_frame(f"fan1/{i}", 8 + i) for i in range(4)] + [raftdzmq_frame("other", 12)]
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        first = b'{"result":{"header":{"revision":"7"},"created":true}}\n'
        frames = [etcd_message(f"fan1/{i}", 8 + i) for i in range(4)] + [etcd_message("other", 12)]
    stream = head + chunked(first) + chunked(frames[0] + frames[1]) + chunked(frames[2]) + chunked(frames[3]) \
        + chunked(frames[4]) + chunked(frames[1])
    w = watch_fanout.Watcher(None, 4)
    # Fed in pieces that cut the head, a chunk's size line and a key: each event is timed by the piece that made
    # its chunk whole.
    cut = [len(head) - 3, len(head) + 5, len(head) + len(chunked(first)) + 20, len(stream) - 40]
    pieces = [stream[a:b] for a, b in zip([0] + cut, cut + [len(stream)])]
    for t, piece in enumerate(pieces):
        watch_fanout.feed(w, piece, float(t), system, keys)
    assert w.ready and w.ended is None
    assert w.received == 4 and w.duplicates == 1  # frames[1] came twice; "other" is not one of the run's keys
    whole_at = [next(t for t, end in enumerate(cut + [len(stream)]) if end >= stream.find(f) + len(f) + 2)
                for f in frames[:4]]
    assert list(w.arrivals) == [float(t) for t in whole_at]
    assert whole_at[0] >= 2  # not timed at the piece that carried only its beginning


@pytest.mark.parametrize("system", ["raftdzmq", "etcd"])
def test_a_watcher_counts_events_that_come_below_an_index_it_saw(system):
    import watch_fanout

    keys = watch_fanout.key_table("fan1/", 3, base64_keys=system == "etcd")
    message = raftdzmq_frame if system == "raftdzmq" else etcd_message
    w = watch_fanout.Watcher(None, 3)
    watch_fanout.feed(w, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + chunked(message("fan1/0", 8) + message("fan1/2", 10) + message("fan1/1", 9)),
                      1.0, system, keys)
    assert w.received == 3 and w.out_of_order == 1
    s = watch_fanout.delivery_summary([w.arrivals], [w.duplicates], [w.ended], [0.5, 0.5, 0.5], [w.out_of_order])
    assert s["out_of_order"] == 1 and s["watchers_complete"] == 0
    assert s["behind"] == [{"watcher": 0, "missed": 0, "ended": None, "out_of_order": 1}]


def test_a_watcher_records_what_it_read_and_counts_each_event_mark_once_however_reads_cut_it():
    import watch_fanout

    mark = watch_fanout.EVENT_MARKS["raftdzmq"]
    stream = b"".join(raftdzmq_frame(f"fan1/{i}", 8 + i) for i in range(5))
    for cut_size in (1, 3, 7, 9, 10, 11, len(stream)):
        w = watch_fanout.Watcher(None, 5)
        for at in range(0, len(stream), cut_size):
            w.record(stream[at:at + cut_size], float(at), mark)
        assert w.marks == 5, cut_size
        assert b"".join(data for _, data in w.recorded) == stream


def test_the_servers_share_is_read_from_two_scrapes_of_its_delivery_histogram():
    import watch_fanout

    def scrape(counts, events):
        return "\n".join([f'raftdzmq_watch_delivery_seconds_bucket{{le="{le}"}} {n}'
                          for le, n in zip(("0.01", "0.1", "1.0", "+Inf"), counts)]
                         + [f'raftdzmq_watch_events_delivered_total{{mode="stream"}} {events}',
                            'raftdzmq_watch_events_delivered_total{mode="poll"} 7.0'])

    before = watch_fanout.delivery_counts(scrape((5, 5, 5, 5), 50))
    after = watch_fanout.delivery_counts(scrape((55, 104, 105, 105), 1050))
    s = watch_fanout.server_delivery(before, after)
    assert s["server_frames"] == 100 and s["server_events_per_frame"] == 10
    assert s["server_p50_ms"] == 10 and s["server_p99_ms"] == 100


def test_a_watcher_notes_why_its_stream_ended():
    import watch_fanout

    w = watch_fanout.Watcher(None, 1)
    watch_fanout.feed(w, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nno\n", 0.0, "raftdzmq", {})
    assert w.ended == "status 503"
    w = watch_fanout.Watcher(None, 1)
    watch_fanout.feed(w, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + chunked(b'event: error\ndata: {"error": "gone", "oldest_index": 9}\n\n'), 0.0, "raftdzmq", {})
    assert "error" in w.ended
    w = watch_fanout.Watcher(None, 1)
    watch_fanout.feed(w, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b'{"result":{}}\n')
                      + b"0\r\n\r\n", 0.0, "etcd", {})
    assert w.ended == "stream closed by the server"


def test_percentile_of_a_histogram_is_nearest_rank():
    import watch_fanout

    counts = {v: 1 for v in range(1, 1001)}
    assert watch_fanout.percentile_of_histogram(counts, 1000, 50) == 500
    assert watch_fanout.percentile_of_histogram(counts, 1000, 99.9) == 999
    assert watch_fanout.percentile_of_histogram({1: 999, 500: 1}, 1000, 99.9) == 1
    assert watch_fanout.percentile_of_histogram({1: 998, 500: 2}, 1000, 99.9) == 500
    assert watch_fanout.percentile_of_histogram({-3: 1, 4: 1}, 2, 50) == -3


def test_delivery_summary_counts_missed_events_and_ended_streams_as_behind():
    from array import array

    import watch_fanout

    nan = math.nan
    answered_at = [10.0, 11.0, None, 13.0]  # write 2 failed: not expected, its event not counted
    arrivals = [array("d", [10.002, 11.004, 12.5, 13.010]),  # every acknowledged event
                array("d", [10.003, nan, nan, 13.001]),  # missed write 1
                array("d", [10.001, 11.001, nan, 13.001])]  # all, but its stream ended
    s = watch_fanout.delivery_summary(arrivals, [0, 2, 0], [None, None, "connection closed"], answered_at)
    assert s["writes_acknowledged"] == 3 and s["writes_failed"] == 1
    assert s["events_expected"] == 9 and s["events_received"] == 8 and s["events_missed"] == 1
    assert s["duplicates"] == 2
    assert s["watchers_complete"] == 1 and s["watchers_behind"] == 2
    assert s["behind"] == [{"watcher": 1, "missed": 1, "ended": None},
                           {"watcher": 2, "missed": 0, "ended": "connection closed"}]
    assert s["p50_ms"] == pytest.approx(1.0) and s["p90_ms"] == pytest.approx(10.0)  # 1,1,1,1,2,3,4,10 ms
    assert s["max_ms"] == pytest.approx(10.0)
    assert s["worst_watcher_p99_ms"] == pytest.approx(10.0)


def test_delivery_summary_of_a_watcher_that_got_nothing():
    from array import array

    import watch_fanout

    s = watch_fanout.delivery_summary([array("d", [math.nan])], [0], [None], [1.0])
    assert s["events_received"] == 0 and s["watchers_behind"] == 1 and math.isnan(s["p99_ms"])


def test_the_writer_puts_one_key_per_slot_in_order():
    import base64

    import watch_fanout

    r = watch_fanout.write_requests("raftdzmq", "fan3/", 3, "vv")
    assert [path for _, path, _, _ in r] == ["/db/fan3/0", "/db/fan3/1", "/db/fan3/2"]
    e = watch_fanout.write_requests("etcd", "fan3/", 2, "vv")
    assert [base64.b64decode(json.loads(body)["key"]) for _, _, body, _ in e] == [b"fan3/0", b"fan3/1"]
    assert watch_fanout.key_table("fan3/", 2, base64_keys=True) == {base64.b64encode(b"fan3/0"): 0,
                                                                    base64.b64encode(b"fan3/1"): 1}


def test_etcd_watch_request_names_the_prefix_as_a_range():
    import base64

    import watch_fanout

    raw = watch_fanout.watch_request("etcd", "127.0.0.1", 2379, "fan1/")
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])["create_request"]
    assert base64.b64decode(body["key"]) == b"fan1/" and base64.b64decode(body["range_end"]) == b"fan10"


def test_answered_at_gives_each_answers_time_and_none_for_an_error():
    # In process: the generator's gevent sockets against the threaded server; the 3rd request is answered 0.2 s
    # late, and a server answering 500 gives no acknowledgement times at all.
    server = StallingServer(stall_at=3, stall_seconds=0.2)
    try:
        answered_at: list = []
        before = time.monotonic()
        r = openloop.run("127.0.0.1", server.port, [b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"], 50, 0.2, 0.0, 1, 5.0,
                         answered_at=answered_at)
    finally:
        server.close()
    assert r["errors"] == 0 and len(answered_at) == 10
    assert all(before < t < time.monotonic() for t in answered_at)
    assert answered_at == sorted(answered_at)
    assert answered_at[2] - answered_at[1] >= 0.19
    server = StallingServer(status=b"500 Internal Server Error")
    try:
        answered_at = []
        openloop.run("127.0.0.1", server.port, [b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"], 50, 0.1, 0.0, 2, 5.0,
                     answered_at=answered_at)
    finally:
        server.close()
    assert answered_at == [None] * 5


def test_txn_key_sets_hold_distinct_keys():
    import random

    sets = load.txn_key_sets([f"k{i}" for i in range(20)], 10, 50, random.Random(1))
    assert len(sets) == 50 and all(len(set(s)) == 10 for s in sets)


def test_txn_requests_put_every_key_of_a_set_once():
    import base64

    ours = load.Raftdzmq.txn_requests(None, [["a", "b"]], "v")
    assert ours == [("POST", "/txn", json.dumps({"compare": [], "success": [
        {"op": "put", "key": "a", "value": "v"}, {"op": "put", "key": "b", "value": "v"}]}), {})]
    etcd = load.Etcd.__new__(load.Etcd)
    etcd.api = "v3"
    (method, path, body, _), = etcd.txn_requests([["a", "b"]], "v")
    puts = [op["request_put"] for op in json.loads(body)["success"]]
    assert (method, path) == ("POST", "/v3/kv/txn")
    assert [base64.b64decode(p["key"]) for p in puts] == [b"a", b"b"]
    etcd.api = "v2"
    assert etcd.txn_requests([["a"]], "v") is None
    assert load.Bare.txn_requests(None, [["a"]], "v") is None


def test_txn_ratios_divide_the_medians_at_each_concurrency():
    def run(ops):
        return {"ops": ops, "p50": 0, "p90": 0, "p99": 0, "p999": 0, "errors": 0, "client_cpu": 0}

    results = {("write", 64, "raftdzmq-3"): [run(1000), run(900), run(1100)],
               ("txn", 64, "raftdzmq-3"): [run(800), run(850), run(700)],
               ("txn", 16, "raftdzmq-3"): [run(500)]}  # no single-write run at 16: no ratio
    (r,) = load.txn_ratios(results, 10)
    assert r["concurrency"] == 64 and r["ratio"] == pytest.approx(0.8)
    assert r["key_writes_per_second"] == pytest.approx(8000)
