#!/usr/bin/env python
"""The watch fan-out bench (issue 14): W watchers on one FOLLOWER of a 3-node cluster while writes go to the leader
at a fixed rate; does every watcher receive every event, and how long after the write's acknowledgement does each
event reach each watcher? raftdzmq (`GET /watch?prefix=P`, server-sent events) and etcd v3 (its JSON gateway's
streaming `POST /v3/watch`, keys in base64) are measured alternating in the same run, with the same watchers and
rate.

    python bench/watch_fanout.py                              # 1,000 watchers, 1,000 writes/s for 10 s, both
    python bench/watch_fanout.py -W 100 --rate 500 -d 5 --systems raftdzmq --json out.json

How one run goes (one system):
- The watcher process(es) (`watch_fanout.py watchers`, no gevent: one epoll loop over non-blocking sockets) open
  W streams on a follower, each for the run's own key prefix, and say `ready` once every stream is established
  (raftdzmq's first comment, etcd's `created` message). Only then does the writer start.
- The writer (`watch_fanout.py writer`, bench/openloop.py's open-loop generator) puts key PREFIX<seq> for seq =
  0, 1, ... at start + seq / rate on the leader and records when each 2xx answer arrived (time.monotonic(): the
  same clock in every process of one machine).
- The watchers then get the acknowledgement times and keep reading for at most --drain seconds, until each has
  every event. Each event's delivery latency is the time its message was complete on the watcher's socket minus
  its write's acknowledgement: it can be negative (a follower may apply before the leader's answer arrives).
- A watcher "fell behind" when, at the end, it missed an acknowledged write's event, or its stream ended (closed,
  raftdzmq's `event: error` when it fell out of the history, etcd's `canceled`), or got an event of an index below
  one it had already seen (`out_of_order`). Duplicates are counted (a watcher must see each change once). Writes
  that failed are not expected (they may or may not have been applied).
- Once ready, the watchers only read: each read's bytes are kept with the time they were read at (and event marks
  counted, to stop once every event came), and parsed after the run, each event timed by the read that completed
  its message, as if parsed at once. Parsing a million events a second as they came cost the readers most of the
  two cores (0.7-1 us an event in Python), and the tail measured was theirs; now a reader costs one recv per
  wake. Memory: ~210 bytes a (watcher, event), ~2 GB at 1,000 x 1,000 for 10 s.
- The watchers' own CPU and loop busy share are reported: one Python process reading W x rate events a second
  can itself be the bottleneck, and then the tail is partly its own (`valid` says so, as in bench/openloop.py).
- The follower's own share (raftdzmq): its raftdzmq_watch_delivery_seconds between two scrapes of GET /metrics,
  the time from applying a change to the write of the frame that carries it, per frame written (bucket bounds),
  and the events per frame: a tail the server has and the readers do not see is there.

Rules: nothing is asserted here (speed is measured, never asserted: tests/test_bench.py tests the pure parts);
nodes listen on 127.0.0.1 on free ports; every process is stopped by pid; data dirs are in a temporary folder,
removed at the end. raftdzmq's nodes get -max-connections 2W + 200 (watches may hold at most half the connection
pool; beyond that a watch is refused with 503).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import openloop  # noqa: E402

# ---- the pure parts (tests/test_bench.py) ----------------------------------------------------------------------

# An event's key and index, spelt out field by field (a lazy [^}]*? between them cost 7 us an event): raftdzmq's
# event JSON ("key": "k", "value": "v", "index": 9), etcd's kv ("key":"a2V5","create_revision":"9","mod_revision":"9").
EVENT_PATTERNS = {"raftdzmq": re.compile(rb'"key": "([^"]*)", (?:"value(?:_base64)?": "[^"]*", )?"index": (\d+)'),
                  "etcd": re.compile(rb'"key":"([^"]*)",(?:"create_revision":"\d+",)?"mod_revision":"(\d+)"')}
# A mark counted once per event while the run goes (to stop reading once every event came; the check is feed's).
EVENT_MARKS = {"raftdzmq": b"event: put", "etcd": b'"mod_revision"'}
READ_BYTES = 262144  # a watcher reads at most this much a recv


def dechunk(buffer: bytes) -> tuple[bytes, bytes, bool]:
    """HTTP/1.1 chunked transfer coding, incrementally: (the payload of every complete chunk at the front of
    `buffer`, the bytes left for later, whether the last chunk (size 0) was seen). A chunk is taken only whole, so
    a message inside it is timed when its last byte arrived."""
    payload = []
    at = 0
    while True:
        end = buffer.find(b"\r\n", at)
        if end < 0:
            break
        size = int(buffer[at:end].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(payload), b"", True
        if len(buffer) < end + 2 + size + 2:
            break
        payload.append(buffer[end + 2:end + 2 + size])
        at = end + 2 + size + 2
    return b"".join(payload), buffer[at:], False


def complete_messages(pending: bytes, delimiter: bytes) -> tuple[bytes, bytes]:
    """(every whole message in `pending`, up to and with its last `delimiter`; the incomplete rest)."""
    end = pending.rfind(delimiter)
    if end < 0:
        return b"", pending
    end += len(delimiter)
    return pending[:end], pending[end:]


def key_table(prefix: str, count: int, base64_keys: bool) -> dict[bytes, int]:
    """{the key as it appears in an event's JSON: seq} for the keys PREFIX0 .. PREFIX<count - 1>."""
    out = {}
    for seq in range(count):
        key = f"{prefix}{seq}".encode()
        out[base64.b64encode(key) if base64_keys else key] = seq
    return out


def percentile_of_histogram(counts: dict[int, int], total: int, p: float) -> int:
    """The nearest-rank percentile (bench/openloop.py's) of values given as {value: how many}, `total` of them."""
    assert total > 0 and 0 < p <= 100
    rank = max(1, math.ceil(round(p / 100 * total, 9)))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    raise AssertionError("counts add up to less than total")


RESOLUTION_SECONDS = 0.0001  # latencies are counted to the nearest 0.1 ms


def delivery_summary(arrivals: list[array], duplicates: list[int], ended: list[str | None],
                     answered_at: list[float | None], out_of_order: list[int] | None = None) -> dict:
    """Per watcher (its arrival time per seq, NaN for none; duplicates seen; why its stream ended, if it did) and
    per write (its acknowledgement time, None if it failed), and the events each got below an index it had seen
    (`out_of_order`): how many watchers got every acknowledged event, which fell behind (missed one, or their
    stream ended) or got events out of index order (counted as not complete), and the delivery latency's percentiles in ms over every
    (watcher, acknowledged event) pair received, with the worst watcher's own p99."""
    acked = [(seq, t) for seq, t in enumerate(answered_at) if t is not None]
    histogram: dict[int, int] = {}
    total = missed_events = 0
    behind = []
    worst_p99_ms = -math.inf
    for w, times in enumerate(arrivals):
        mine: dict[int, int] = {}
        got = 0
        for seq, acked_at in acked:
            arrived = times[seq] if seq < len(times) else math.nan
            if arrived != arrived:  # NaN: never arrived
                continue
            bucket = round((arrived - acked_at) / RESOLUTION_SECONDS)
            mine[bucket] = mine.get(bucket, 0) + 1
            got += 1
        for bucket, n in mine.items():
            histogram[bucket] = histogram.get(bucket, 0) + n
        total += got
        missed = len(acked) - got
        missed_events += missed
        disordered = out_of_order[w] if out_of_order else 0
        if missed or ended[w] or disordered:
            behind.append({"watcher": w, "missed": missed, "ended": ended[w],
                           **({"out_of_order": disordered} if disordered else {})})
        if got:
            worst_p99_ms = max(worst_p99_ms, percentile_of_histogram(mine, got, 99) * RESOLUTION_SECONDS * 1000)
    out: dict = {"watchers": len(arrivals), "writes_acknowledged": len(acked),
                 "writes_failed": len(answered_at) - len(acked), "events_expected": len(acked) * len(arrivals),
                 "events_received": total, "events_missed": missed_events, "duplicates": sum(duplicates),
                 "out_of_order": sum(out_of_order) if out_of_order else 0,
                 "watchers_complete": len(arrivals) - len(behind), "watchers_behind": len(behind),
                 "behind": behind[:20], "worst_watcher_p99_ms": worst_p99_ms if total else math.nan}
    for p, name in openloop.PERCENTILES:
        out[f"{name}_ms"] = (percentile_of_histogram(histogram, total, p) * RESOLUTION_SECONDS * 1000
                             if total else math.nan)
    return out


DELIVERY_METRIC = "raftdzmq_watch_delivery_seconds"


def delivery_counts(metrics_text: str) -> dict[str, float]:
    """From a raftdzmq node's GET /metrics: the cumulative bucket counts of DELIVERY_METRIC by upper bound ("le"),
    and the stream events delivered ("events")."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(DELIVERY_METRIC + "_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[bound] = float(line.rsplit(" ", 1)[1])
        elif line.startswith('raftdzmq_watch_events_delivered_total{mode="stream"}'):
            out["events"] = float(line.rsplit(" ", 1)[1])
    return out


def server_delivery(before: dict[str, float], after: dict[str, float]) -> dict:
    """The server's share of the run (the follower's DELIVERY_METRIC between two scrapes): frames written, events
    per frame, and the p50/p99 of apply-to-write as the upper bound of the bucket holding it (ms)."""
    bounds = sorted((float(b), b) for b in after if b != "events")
    counts = [(bound, after[name] - before.get(name, 0.0)) for bound, name in bounds]
    frames = counts[-1][1] if counts else 0.0
    out: dict = {"server_frames": frames,
                 "server_events_per_frame": (after.get("events", 0) - before.get("events", 0)) / frames if frames
                 else math.nan}
    for p in (50, 99):
        out[f"server_p{p}_ms"] = next((bound * 1000 for bound, n in counts if n >= frames * p / 100), math.nan) \
            if frames else math.nan
    return out


# ---- the watchers (a subprocess) -----------------------------------------------------------------------------------


class Watcher:
    """One stream: its socket, what is buffered, and when each seq's event arrived."""

    __slots__ = ("sock", "head_done", "chunked", "raw", "pending", "ready", "ended", "arrivals", "duplicates",
                 "received", "last_index", "out_of_order", "recorded", "marks", "tail")

    def __init__(self, sock: socket.socket, max_events: int) -> None:
        self.sock = sock
        self.head_done = self.chunked = self.ready = False
        self.raw = self.pending = b""
        self.ended: str | None = None
        self.arrivals = array("d", [math.nan]) * max_events
        self.duplicates = self.received = 0
        self.last_index = self.out_of_order = 0  # the highest event index seen; events that came below it
        self.recorded: list[tuple[float, bytes]] = []  # (when, bytes read): fed after the run (run_watchers)
        self.marks = 0  # EVENT_MARKS counted in what was recorded
        self.tail = b""  # the recorded bytes' last few (a mark cut between two reads counts once)

    def record(self, data: bytes, now: float, mark: bytes) -> None:
        """Keep what was read at `now` for `feed` after the run, counting the event marks in it (none missed or
        counted twice where a read cuts one)."""
        self.recorded.append((now, data))
        keep = len(mark) - 1
        self.marks += data.count(mark) + (self.tail + data[:keep]).count(mark)
        self.tail = (self.tail + data[-keep:])[-keep:]  # not tail + data: a copy of every read


def watch_request(system: str, host: str, port: int, prefix: str) -> bytes:
    if system == "raftdzmq":
        return (f"GET /watch?prefix={prefix} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
                ).encode()
    end = bytearray(prefix.encode())
    end[-1] += 1  # etcd's range_end for a prefix: the prefix with its last byte raised
    body = json.dumps({"create_request": {"key": base64.b64encode(prefix.encode()).decode(),
                                          "range_end": base64.b64encode(bytes(end)).decode()}}).encode()
    return (f"POST /v3/watch HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def feed(w: Watcher, data: bytes, now: float, system: str, keys: dict[bytes, int]) -> None:
    """Take `data` read from w's socket at `now`: the answer's head, then whole chunks, then whole messages."""
    if not w.head_done:
        w.raw += data
        end = w.raw.find(b"\r\n\r\n")
        if end < 0:
            return
        head, data, w.raw = w.raw[:end], w.raw[end + 4:], b""
        status = head.split(b" ", 2)[1]
        if status != b"200":
            w.ended = f"status {status.decode()}"
            return
        w.head_done = True
        w.chunked = b"chunked" in head.lower()
    if w.chunked:
        payload, w.raw, last = dechunk(w.raw + data)
        if last:
            w.ended = "stream closed by the server"
    else:
        payload = data
    delimiter = b"\n\n" if system == "raftdzmq" else b"\n"
    messages, w.pending = complete_messages(w.pending + payload, delimiter)
    if not messages:
        return
    if not w.ready:
        w.ready = b": watching" in messages if system == "raftdzmq" else b'"created":true' in messages
    if system == "raftdzmq" and b"event: error" in messages:
        w.ended = "event: error (fell out of the history)"
    elif system == "etcd" and b'"canceled":true' in messages:
        w.ended = "canceled"
    arrivals = w.arrivals
    for key, index in EVENT_PATTERNS[system].findall(messages):
        seq = keys.get(key)
        if seq is None:
            continue
        index = int(index)
        if index < w.last_index:
            w.out_of_order += 1
        w.last_index = max(w.last_index, index)
        if arrivals[seq] == arrivals[seq]:  # not NaN: seen before
            w.duplicates += 1
        else:
            arrivals[seq] = now
            w.received += 1


def run_watchers(args: argparse.Namespace) -> int:
    """Open the streams, say `ready`, read until stdin says `done FILE` (the writer's acknowledgement times), then
    until every watcher has every write or --drain passed; print the summary as JSON."""
    host, port = args.url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    keys = key_table(args.prefix, args.max_events, base64_keys=args.system == "etcd")
    request = watch_request(args.system, host, int(port), args.prefix)
    mark = EVENT_MARKS[args.system]
    sel = selectors.DefaultSelector()
    watchers = []
    for _ in range(args.watchers):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        sock.setblocking(False)
        w = Watcher(sock, args.max_events)
        watchers.append(w)
        sel.register(sock, selectors.EVENT_READ, w)
    os.set_blocking(sys.stdin.fileno(), False)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    ready_deadline = time.monotonic() + 60
    said_ready = False
    drain_deadline = math.inf
    answered_at: list[float | None] | None = None
    stdin_buffer = b""
    busy_seconds = 0.0
    # One buffer for every read, the bytes copied out: `recv(262144)` allocates (mmaps) 256 KiB each time and
    # shrinks it, 31 us a 14 KB read against 7.5 us this way (a socketpair, in process).
    read_buffer = bytearray(READ_BYTES)
    read_view = memoryview(read_buffer)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    measured_from = time.monotonic()
    while True:
        now = time.monotonic()
        if not said_ready:
            if all(w.ready or w.ended for w in watchers):
                print(json.dumps({"ready": sum(w.ready for w in watchers)}), flush=True)
                said_ready = True
                cpu_before, measured_from, busy_seconds = resource.getrusage(resource.RUSAGE_SELF), now, 0.0
            elif now > ready_deadline:
                print(json.dumps({"ready": sum(w.ready for w in watchers), "error": "streams not ready in 60 s"}),
                      flush=True)
                return 1
        if answered_at is not None:
            total = len(answered_at)
            if now > drain_deadline or all(w.marks >= total or w.ended for w in watchers):
                break
        for key, _ in sel.select(timeout=0.05):
            w = key.data
            if w is None:  # stdin: the orchestrator
                stdin_buffer += os.read(sys.stdin.fileno(), 65536)
                if b"\n" in stdin_buffer:
                    with open(stdin_buffer.split(b"\n", 1)[0].split(b" ", 1)[1].decode()) as f:
                        answered_at = json.load(f)["answered_at"]
                    sel.unregister(sys.stdin)
                    drain_deadline = time.monotonic() + args.drain
                continue
            started = time.monotonic()
            try:
                data = read_view[:w.sock.recv_into(read_buffer)].tobytes()
            except BlockingIOError:
                continue
            except OSError as e:
                data, w.ended = b"", f"socket error: {e}"
            if not data:
                w.ended = w.ended or "connection closed"
                sel.unregister(w.sock)
                continue
            if said_ready:
                w.record(data, started, mark)
            else:
                feed(w, data, started, args.system, keys)
            busy_seconds += time.monotonic() - started
    wall = time.monotonic() - measured_from
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"read": True}), flush=True)  # the orchestrator takes the nodes' CPU now, before the parse
    for w in watchers:
        w.sock.close()
        for at, data in w.recorded:  # parsed now, each piece with the time it was read at
            feed(w, data, at, args.system, keys)
        w.recorded = []
    assert answered_at is not None
    summary = delivery_summary([w.arrivals for w in watchers], [w.duplicates for w in watchers],
                               [w.ended for w in watchers], answered_at, [w.out_of_order for w in watchers])
    summary["watcher_cpu"] = ((cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
                              ) / wall
    summary["watcher_busy"] = busy_seconds / wall
    print(json.dumps(summary), flush=True)
    return 0


# ---- the writer (a subprocess) -------------------------------------------------------------------------------------


def write_requests(system: str, prefix: str, count: int, value: str) -> list[tuple]:
    """Request seq puts key PREFIX<seq>: one per seq, in order (the generator sends request i at its i-th slot)."""
    if system == "raftdzmq":
        return [("POST", f"/db/{prefix}{seq}", value, {}) for seq in range(count)]
    b64 = base64.b64encode(value.encode()).decode()
    return [("POST", "/v3/kv/put", json.dumps({"key": base64.b64encode(f"{prefix}{seq}".encode()).decode(),
                                                "value": b64}), {}) for seq in range(count)]


def run_writer(args: argparse.Namespace) -> int:
    host, port = args.url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    count = len(openloop.schedule_seconds(args.rate, args.duration))
    requests = [openloop.encode_request(m, p, b, h, f"{host}:{port}")
                for m, p, b, h in write_requests(args.system, args.prefix, count, "v" * args.value_size)]
    answered_at: list[float | None] = []
    summary = openloop.run(host, int(port), requests, args.rate, args.duration, 0.0, 256, 10.0,
                           answered_at=answered_at)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "answered_at": answered_at}, f)
    return 0


# ---- the orchestrator ----------------------------------------------------------------------------------------------


def post_json(url: str, path: str, body: dict) -> dict:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (/proc/PID/stat fields 14 and 15, after the command's parenthesis)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def cluster_term(system) -> int | None:
    """raftdzmq's highest term among its nodes (None for etcd)."""
    from load import Raftdzmq, get

    if not isinstance(system, Raftdzmq):
        return None
    terms = []
    for port in system.http_ports:
        try:
            terms.append(json.loads(get(f"http://127.0.0.1:{port}/status"))["term"])
        except (OSError, ValueError, KeyError):
            continue
    return max(terms) if terms else None


def follower_delivery(system, follower: str) -> dict[str, float] | None:
    """delivery_counts of the follower now (None for etcd, or a build without the metric)."""
    from load import Raftdzmq, get

    if not isinstance(system, Raftdzmq):
        return None
    counts = delivery_counts(get(follower + "/metrics", timeout=10).decode())
    return counts if len(counts) > 1 else None


def leader_and_follower(system) -> tuple[tuple[str, int], tuple[str, int]]:
    """((the leader's URL, pid), (a follower's URL, pid)) as the cluster stands now."""
    from load import Raftdzmq, get

    roles = {}
    if isinstance(system, Raftdzmq):
        for port, proc in zip(system.http_ports, system.procs):
            url = f"http://127.0.0.1:{port}"
            roles[(url, proc.pid)] = json.loads(get(url + "/status"))["role"] == "leader"
    else:
        for url, proc in zip(system.urls, system.procs):
            st = post_json(url, "/v3/maintenance/status", {})
            roles[(url, proc.pid)] = st["header"]["member_id"] == st["leader"]
    leaders = [u for u, lead in roles.items() if lead]
    followers = [u for u, lead in roles.items() if not lead]
    if len(leaders) != 1 or not followers:
        raise SystemExit(f"bench: no single leader: {roles}")
    return leaders[0], followers[0]


def run_one(system, name: str, args: argparse.Namespace, workdir: str, run_number: int) -> dict:
    kind = "etcd" if name == "etcd" else "raftdzmq"  # the protocol; `name` tells builds apart
    (leader, leader_pid), (follower, follower_pid) = leader_and_follower(system)
    if args.profile:
        print(f"  {name}: the follower is pid {follower_pid}, the leader pid {leader_pid}", file=sys.stderr)
    prefix = f"fan{run_number}/"
    count = len(openloop.schedule_seconds(args.rate, args.duration))
    shares = [args.watchers // args.watcher_processes + (i < args.watchers % args.watcher_processes)
              for i in range(args.watcher_processes)]
    procs = []
    try:
        for share in shares:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "watchers", "--system", kind, "--url", follower,
                 "--prefix", prefix, "--watchers", str(share), "--max-events", str(count), "--drain", str(args.drain)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            line = p.stdout.readline()  # bounded: the watchers give up after 60 s and say so
            ready = json.loads(line) if line else {"error": "the watcher process died"}
            if "error" in ready:
                raise SystemExit(f"bench: {kind} watchers: {ready}")
        ackfile = os.path.join(workdir, f"acks-{run_number}.json")
        term_before = cluster_term(system)
        delivery_before = follower_delivery(system, follower)
        cpu_before = cpu_seconds(leader_pid), cpu_seconds(follower_pid), time.monotonic()
        print(f"  {kind}: {args.watchers} watchers on {follower}, writing {args.rate:g}/s for {args.duration:g} s to "
              f"{leader}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.abspath(__file__), "writer", "--system", kind, "--url", leader,
                        "--prefix", prefix, "--rate", str(args.rate), "--duration", str(args.duration),
                        "--value-size", str(args.value_size), "--out", ackfile], check=True,
                       timeout=args.duration + 60)
        parts = []
        for p in procs:
            p.stdin.write(f"done {ackfile}\n")
            p.stdin.flush()
        for p in procs:
            p.stdout.readline()  # {"read": true}: bounded by the drain (or the process's end)
        wall = time.monotonic() - cpu_before[2]
        cpu = (cpu_seconds(leader_pid) - cpu_before[0]) / wall, (cpu_seconds(follower_pid) - cpu_before[1]) / wall
        for p, share in zip(procs, shares):  # each parses what it read: ~1-5 us an event, more on a loaded machine
            out, _ = p.communicate(timeout=120 + 20e-6 * share * count)
            parts.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with open(ackfile) as f:
        writer = json.load(f)["summary"]
    result = merge_parts(parts, writer, name, follower, leader)
    term_after = cluster_term(system)
    # Elections during the run (raftdzmq: the highest term moved; a write to a deposed leader fails): what a
    # loaded machine does to a run, told apart from the watch path's own figures.
    result["terms_moved"] = None if term_before is None or term_after is None else term_after - term_before
    delivery_after = follower_delivery(system, follower)
    if delivery_before is not None and delivery_after is not None:
        result.update(server_delivery(delivery_before, delivery_after))
    # Each node's CPU (cores) from the writer's start to the last watcher's end (the drain included).
    result["leader_cpu"], result["follower_cpu"] = cpu
    return result


def merge_parts(parts: list[dict], writer: dict, kind: str, follower: str, leader: str) -> dict:
    """One run's figures from its watcher processes' summaries (percentiles: the worst process's, said so when
    there were several) and the writer's."""
    out = dict(parts[0]) if len(parts) == 1 else {
        "watchers": sum(p["watchers"] for p in parts), "writes_acknowledged": parts[0]["writes_acknowledged"],
        "writes_failed": parts[0]["writes_failed"],
        **{k: sum(p[k] for p in parts) for k in ("events_expected", "events_received", "events_missed", "duplicates",
                                                 "out_of_order", "watchers_complete", "watchers_behind")},
        "behind": [b for p in parts for b in p["behind"]][:20],
        **{k: max(p[k] for p in parts) for k in ("worst_watcher_p99_ms", "p50_ms", "p90_ms", "p99_ms", "p999_ms",
                                                 "max_ms", "watcher_cpu", "watcher_busy")},
        "percentiles": "the worst of the watcher processes"}
    out.update(system=kind, follower=follower, leader=leader, write_rate=writer["rate"],
               write_p99_ms=writer["p99"] / 1000, write_errors=writer["errors"], writer_valid=writer["valid"],
               writer_invalid_reason=writer["invalid_reason"], writer_cpu=writer["client_cpu"])
    # The watchers' tail is theirs, not the server's, when their one process was busy most of the run. The writer's
    # own verdict (bench/openloop.py) bears on the write p99 only: delivery is timed from each acknowledgement.
    cpu = max(p["watcher_cpu"] for p in parts)
    out["valid"] = cpu <= 0.8 and out["watcher_busy"] <= 0.5
    return out


def print_results(results: list[dict]) -> None:
    print(f"{'system':<10}{'watchers':>9}{'writes/s':>9}{'acked':>7}{'complete':>9}{'behind':>7}{'missed':>8}"
          f"{'dups':>6}{'disord':>7}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'p99.9 ms':>9}{'max ms':>8}{'worst p99':>10}"
          f"{'watch cpu':>10}{'busy':>6}{'write p99':>10}{'lead cpu':>9}{'fol cpu':>8}  valid (watchers; writer)")
    for r in results:
        print(f"{r['system']:<10}{r['watchers']:>9}{r['write_rate']:>9.0f}{r['writes_acknowledged']:>7}"
              f"{r['watchers_complete']:>9}{r['watchers_behind']:>7}{r['events_missed']:>8}{r['duplicates']:>6}{r['out_of_order']:>7}"
              f"{r['p50_ms']:>8.1f}{r['p90_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['p999_ms']:>9.1f}{r['max_ms']:>8.0f}"
              f"{r['worst_watcher_p99_ms']:>10.1f}{r['watcher_cpu'] * 100:>9.0f}%{r['watcher_busy'] * 100:>5.0f}%"
              f"{r['write_p99_ms']:>10.1f}{r['leader_cpu'] * 100:>8.0f}%{r['follower_cpu'] * 100:>7.0f}%  {'yes' if r['valid'] else 'NO: the watchers process was the bottleneck'}; "
              f"{'yes' if r['writer_valid'] else 'writer: ' + r['writer_invalid_reason']}")
        if r.get("server_frames"):
            print(f"    server (the follower, apply to the frame's write): p50 <= {r['server_p50_ms']:g} ms, p99 <= "
                  f"{r['server_p99_ms']:g} ms over {r['server_frames']:.0f} frames, "
                  f"{r['server_events_per_frame']:.1f} events a frame")
        if r.get("terms_moved"):
            print(f"    the cluster's term moved by {r['terms_moved']} during the run (an election: writes to the "
                  f"deposed leader failed)")
        for b in r["behind"][:5]:
            print(f"    behind: watcher {b['watcher']} missed {b['missed']}, ended: {b['ended']}")


def print_medians(results: list[dict]) -> None:
    """Each system's medians over its runs (--repeat): the figures to compare when the systems alternated."""
    print("medians over the runs:")
    for name in dict.fromkeys(r["system"] for r in results):
        runs = [r for r in results if r["system"] == name]
        figures = {k: statistics.median(r[k] for r in runs)
                   for k in ("p50_ms", "p99_ms", "max_ms", "watchers_complete", "events_received", "follower_cpu",
                             "watcher_cpu")}
        print(f"  {name:<24} runs {len(runs)}  p50 {figures['p50_ms']:.1f} ms  p99 {figures['p99_ms']:.1f} ms  "
              f"max {figures['max_ms']:.0f} ms  complete {figures['watchers_complete']:g}  received "
              f"{figures['events_received']:g}  follower cpu {figures['follower_cpu']:.2f}  watchers cpu "
              f"{figures['watcher_cpu']:.2f}")


def main_bench(args: argparse.Namespace) -> int:
    from load import Etcd, Raftdzmq

    workdir = tempfile.mkdtemp(prefix="raftdzmq-fanout-")
    systems = []
    results = []
    try:
        flags = ["-max-connections", str(2 * args.watchers + 200)]
        profile_to = None if args.profile is None else os.path.abspath(args.profile)
        if "raftdzmq" in args.systems:
            systems.append(("raftdzmq", Raftdzmq(workdir, 3, flags, profile_to=profile_to)))
        for build in args.vs_build:  # another checkout's raftdzmq.py: its results are named after its folder
            system = Raftdzmq(workdir, 3, flags, build=os.path.abspath(build),
                              profile_to=None if profile_to is None else f"{profile_to}-{os.path.basename(build)}")
            systems.append((f"raftdzmq-{os.path.basename(os.path.abspath(build))}", system))
        if "etcd" in args.systems:
            if not shutil.which("etcd"):
                raise SystemExit("bench: etcd is not on the PATH (apt-get install etcd-server)")
            systems.append(("etcd", Etcd(workdir, 3, "v3")))
        run_number = 0
        for _ in range(args.repeat):
            for kind, system in systems:
                run_number += 1
                results.append(run_one(system, kind, args, workdir, run_number))
        if len(results) > len(systems):
            print_medians(results)
        print_results(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for _, system in systems:
            system.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", nargs="?", default="bench", choices=["bench", "watchers", "writer"],
                   help=argparse.SUPPRESS)
    p.add_argument("-W", "--watchers", type=int, default=1000, help="streams on the follower (default 1000)")
    p.add_argument("--rate", type=float, default=1000.0, help="writes a second to the leader (default 1000)")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="seconds of writes per run (default 10)")
    p.add_argument("--drain", type=float, default=10.0,
                   help="seconds after the last write that watchers may take to get every event (default 10)")
    p.add_argument("--value-size", type=int, default=100, help="value bytes (default 100)")
    p.add_argument("--systems", nargs="+", default=["raftdzmq", "etcd"], choices=["raftdzmq", "etcd"])
    p.add_argument("--repeat", type=int, default=1, help="alternate the systems this many times")
    p.add_argument("--watcher-processes", type=int, default=1,
                   help="split the watchers over this many processes (default 1)")
    p.add_argument("--json", help="write every run's figures to this file")
    p.add_argument("--vs-build", action="append", default=[], metavar="DIR",
                   help="also measure the raftdzmq.py of this checkout (e.g. from git archive), alternating")
    p.add_argument("--profile", metavar="PREFIX", help="run raftdzmq's nodes under cProfile (bench/profile_node.py): "
                   "each node's profile goes to PREFIX.<pid>.prof when it stops; the follower's pid is printed")
    # The subprocesses' own flags.
    p.add_argument("--system", choices=["raftdzmq", "etcd"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--max-events", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "watchers":
        return run_watchers(args)
    if args.role == "writer":
        return run_writer(args)
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
