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
    def __init__(self, held: set[str]) -> None:
        self.held, self.written = held, []

    def keys(self) -> set[str]:
        return set(self.held)

    def put(self, key: str) -> int:
        self.written.append(key)
        self.held.add(key)
        return 200

    def count(self) -> int:
        return len(self.held)


def test_the_scale_load_writes_again_exactly_the_keys_whose_write_failed():
    import scale

    cluster = FakeCluster({f"k{i:09d}" for i in range(100) if i % 7})
    assert scale.repair(cluster, 100) == 15
    assert sorted(cluster.written) == [f"k{i:09d}" for i in range(0, 100, 7)]
    assert cluster.count() == 100


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
