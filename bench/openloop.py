#!/usr/bin/env python
"""The open-loop load generator: HTTP requests sent on a fixed schedule (request i at start + i / rate) whether or
not earlier ones have returned, each one's latency measured from its *scheduled* time, as wrk2 and HdrHistogram
do. A closed-loop client (wrk, one request per connection at a time) stops sending while the server stalls, so a
stall shows up as one slow request instead of the thousands a steady stream of users would have waited
(coordinated omission); here every request scheduled during a stall counts the time it waited.

    python bench/openloop.py --url http://127.0.0.1:8080 --rate 2000 --duration 10 --requests reqs.json

Rules:
- The schedule is fixed before the run; nothing the server does moves it. A request with no free connection waits
  in a queue, and that wait is the server's (it is in the latency); a new connection is opened whenever every open
  one is busy, up to `--max-connections`.
- The generator's own lateness is measured apart: for each request, the time from when it could have been sent
  (its scheduled time, or when a connection became free, whichever is later) to when it was; and how busy its
  event loop was, by a probe that sleeps 5 ms over and over (an answer noticed late is queueing of its own making).
  If the loop was busy most of the run, its lateness is a material part of the tail it reports, or its CPU nears a
  whole core, the run is marked invalid: the generator, not the server, was the bottleneck (`verdict`).
- Requests still unanswered when the run ends (after a bounded drain) count as timeouts with an infinite latency:
  they raise the percentiles, never vanish from them. Answers other than 2xx (a 307 from a node that lost the
  leadership, 4xx, 5xx) and broken connections are counted as errors, and their latency is kept too.
- Why gevent and raw sockets rather than wrk: Debian's wrk is closed-loop (wrk2 is not packaged), and its Lua
  hooks have no clock to measure from a schedule. One gevent process with pre-encoded requests and a minimal
  response parser cost 90-125 us of CPU a request on the busy shared machine (13-20% of a core at 900-2,200/s);
  its CPU, lateness and loop busy share are reported with every run so that it keeping up is checked each time,
  not assumed.

The pure parts (`schedule_seconds`, `percentile`, `summarize`, `verdict`) are tested in tests/test_bench.py.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections.abc import Sequence

# ---- the pure parts -----------------------------------------------------------------------------------------------


def schedule_seconds(rate_per_second: float, duration_seconds: float) -> list[float]:
    """Offsets from the start at which requests are due: i / rate for every i with i / rate < duration."""
    assert rate_per_second > 0 and duration_seconds > 0
    count = math.ceil(duration_seconds * rate_per_second - 1e-9)
    return [i / rate_per_second for i in range(count)]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value with at least p% of the values at or below it (so p100 is
    the maximum and a single value above the 99.9th is not averaged away). `sorted_values` ascending, not empty."""
    assert sorted_values and 0 < p <= 100
    rank = math.ceil(round(p / 100 * len(sorted_values), 9))  # 99.9 / 100 * 1000 is 999.0000000000001
    return sorted_values[max(1, rank) - 1]


PERCENTILES = ((50, "p50"), (90, "p90"), (99, "p99"), (99.9, "p999"), (100, "max"))


def summarize(latencies_seconds: Sequence[float], lateness_seconds: Sequence[float]) -> dict:
    """Latency and generator-lateness percentiles in microseconds (inf for a request never answered)."""
    out: dict = {}
    lat = sorted(latencies_seconds)
    late = sorted(lateness_seconds)
    for p, name in PERCENTILES:
        out[name] = percentile(lat, p) * 1e6 if lat else math.nan
        out[f"late_{name}"] = percentile(late, p) * 1e6 if late else math.nan
    return out


def busy_share(probe_lags_seconds: Sequence[float], probe_period_seconds: float) -> float:
    """The share of the run the generator's event loop was not waiting for I/O, from a probe that sleeps
    `probe_period_seconds` over and over: each wake-up's lateness is time the loop spent on other work (or
    waiting for a core the machine did not give it)."""
    late = sum(probe_lags_seconds)
    return late / (late + probe_period_seconds * len(probe_lags_seconds)) if probe_lags_seconds else 0.0


def verdict(summary: dict, cpu_cores: float, busy: float = 0.0, late_share: float = 0.2,
            late_floor_us: float = 1000.0, cpu_limit_cores: float = 0.8, busy_limit: float = 0.5) -> str | None:
    """None when the run measured the server; else why the generator was the bottleneck. A single process cannot
    use more than one core: near it, the generator cannot keep up. A loop busy over `busy_limit` of the time
    (`busy_share`, whether on its own work or waiting for a core) notices answers late and queues requests for
    connections it has not yet seen free: its queueing is then its own, not the server's. And the generator's
    lateness in sending is part of every latency it reports: when at the 99th percentile it is over `late_share`
    of the reported p99 (and over `late_floor_us`, below which it is the timer's resolution), the tail is partly
    the generator's own."""
    if cpu_cores > cpu_limit_cores:
        return f"generator CPU {cpu_cores:.2f} cores > {cpu_limit_cores:g}"
    if busy > busy_limit:
        return f"generator loop busy {busy:.0%} of the run > {busy_limit:.0%}"
    for p in ("p99", "p999"):
        late, lat = summary[f"late_{p}"], summary[p]
        if late > late_floor_us and late > late_share * lat:
            return (f"generator {late / 1000:.1f} ms behind schedule at {p}, over {late_share:.0%} of the {p} "
                    f"latency {lat / 1000:.1f} ms")
    return None


# ---- the generator ------------------------------------------------------------------------------------------------


def encode_request(method: str, path: str, body: str | None, headers: dict, host: str) -> bytes:
    data = (body or "").encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None or method in ("POST", "PUT"):
        head.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class Connection:
    """One keep-alive HTTP/1.1 connection: send a request, read one answer (Content-Length or chunked)."""

    def __init__(self, sock) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.buf += data

    def exchange(self, request: bytes) -> int:
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buf = self.buf[:end], self.buf[end + 4:]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            self._read_chunked()
        else:
            while len(self.buf) < length:
                self._fill()
            self.buf = self.buf[length:]
        return status

    def _read_chunked(self) -> None:
        while True:
            while (end := self.buf.find(b"\r\n")) < 0:
                self._fill()
            size = int(self.buf[:end].split(b";")[0], 16)
            self.buf = self.buf[end + 2:]
            while len(self.buf) < size + 2:
                self._fill()
            self.buf = self.buf[size + 2:]
            if size == 0:
                return


PROBE_PERIOD_SECONDS = 0.005


def run(host: str, port: int, requests: list[bytes], rate_per_second: float, duration_seconds: float,
        warmup_seconds: float, max_connections: int, timeout_seconds: float, burn_us: float = 0.0,
        answered_at: list | None = None) -> dict:
    """Send requests[i % len] at start + i / rate for `warmup_seconds + duration_seconds`; return the summary of
    those scheduled after the warm-up. `burn_us`: CPU to waste per answer (tests: a generator that cannot keep up).
    `answered_at`, when given, is extended with each request's time.monotonic() when its 2xx answer arrived (None for
    an error or no answer): bench/watch_fanout.py times each write's events from it."""
    import gevent
    import gevent.queue
    import gevent.socket

    offsets = schedule_seconds(rate_per_second, warmup_seconds + duration_seconds)
    n = len(offsets)
    latency: list[float | None] = [None] * n
    lateness: list[float] = [0.0] * n
    errors, done = [0], [0]
    ok = [False] * n
    queue: gevent.queue.Queue = gevent.queue.Queue()
    state = {"idle": 0, "workers": 0, "opened": 0, "max_waiting": 0}
    start = time.monotonic() + 0.05

    def connect() -> Connection:
        sock = gevent.socket.create_connection((host, port), timeout=timeout_seconds)
        sock.setsockopt(gevent.socket.IPPROTO_TCP, gevent.socket.TCP_NODELAY, 1)
        state["opened"] += 1
        return Connection(sock)

    def worker() -> None:
        conn: Connection | None = None
        free_at = time.monotonic()
        while True:
            state["idle"] += 1
            i = queue.get()
            state["idle"] -= 1
            if i is None:
                return
            due = start + offsets[i]
            try:
                if conn is None:
                    conn = connect()
                    free_at = time.monotonic()
                sent = time.monotonic()
                lateness[i] = max(0.0, sent - max(due, free_at))
                status = conn.exchange(requests[i % len(requests)])
                if not 200 <= status < 300:  # a 307 from a node that no longer leads is not an answer
                    errors[0] += 1
                else:
                    ok[i] = True
            except (OSError, ValueError, IndexError):
                errors[0] += 1
                if conn is not None:
                    conn.sock.close()
                conn = None
            free_at = time.monotonic()
            latency[i] = free_at - due
            done[0] += 1
            if burn_us:
                t = time.perf_counter() + burn_us / 1e6
                while time.perf_counter() < t:
                    pass

    probe_lags: list[float] = []

    def probe() -> None:
        while True:
            t = time.monotonic()
            gevent.sleep(PROBE_PERIOD_SECONDS)
            probe_lags.append(max(0.0, time.monotonic() - t - PROBE_PERIOD_SECONDS))

    workers: list = [gevent.spawn(probe)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    i = 0
    while i < n:
        now = time.monotonic()
        while i < n and start + offsets[i] <= now:
            queue.put(i)
            i += 1
            waiting = queue.qsize() - state["idle"]
            if waiting > 0 and state["workers"] < max_connections:
                state["workers"] += 1
                workers.append(gevent.spawn(worker))
            state["max_waiting"] = max(state["max_waiting"], waiting)
        if i < n:
            gevent.sleep(max(0.0, start + offsets[i] - time.monotonic()))
    # Drain: every answer may take its timeout, and no longer.
    deadline = time.monotonic() + timeout_seconds
    while done[0] < n and time.monotonic() < deadline:
        gevent.sleep(0.01)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    for _ in workers:
        queue.put(None)
    gevent.killall(workers, timeout=1)
    if answered_at is not None:
        answered_at.extend(start + offsets[k] + latency[k] if ok[k] and latency[k] is not None else None
                           for k in range(n))
    first = next((k for k, off in enumerate(offsets) if off >= warmup_seconds), n)
    measured = latency[first:]
    timeouts = sum(1 for x in measured if x is None)
    lats = [math.inf if x is None else x for x in measured]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = summarize(lats, lateness[first:])
    result.update(target_rate=rate_per_second, requests=len(lats), errors=errors[0], timeouts=timeouts,
                  seconds=duration_seconds,
                  rate=(len(lats) - timeouts) / duration_seconds, connections=state["opened"],
                  max_waiting=state["max_waiting"], client_cpu=cpu / wall,
                  client_busy=busy_share(probe_lags, PROBE_PERIOD_SECONDS),
                  client_loop_lag_p99=percentile(sorted(probe_lags), 99) * 1e6 if probe_lags else math.nan)
    reason = verdict(result, result["client_cpu"], result["client_busy"])
    result["valid"], result["invalid_reason"] = reason is None, reason
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="http://HOST:PORT")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds at the rate before measuring (default 1)")
    p.add_argument("--requests", required=True, help="a JSON list of [method, path, body or null, headers]")
    p.add_argument("--max-connections", type=int, default=256, help="connections opened at most (default 256)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a request may take (default 10)")
    p.add_argument("--burn-us", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    host, port = args.url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    with open(args.requests) as f:
        requests = [encode_request(m, path, b, h, f"{host}:{port}") for m, path, b, h in json.load(f)]
    result = run(host, int(port), requests, args.rate, args.duration, args.warmup, args.max_connections,
                 args.timeout, args.burn_us)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
