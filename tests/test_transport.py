"""The transport in a subprocess that owns its gevent hub: reconnects (lazy pirate), the cap on inbound
connections, and who may connect with node keys (CURVE and ZAP), as whom. In this process: the Raft port's REP
greenlet lets the loop turn while it serves a full queue."""

import os
import subprocess
import sys
import time
from typing import Callable

import gevent
import zmq

from procs import free_port
from raftlib import AppendEntries, Config, Entry, RequestVote, codec
from raftlib.transport import SERVE_TURN_SECONDS, FrameBudget, ZmqTransport, fit_frame

HERE = os.path.dirname(os.path.abspath(__file__))


def test_reconnects_after_dead_missing_and_returning_peers():
    out = subprocess.run([sys.executable, os.path.join(HERE, "transport_harness.py")], capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(HERE),
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    lines = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
    assert lines == {"never-existed": "ok", "killed-mid-request": "ok", "came-back": "ok", "over-the-cap": "ok",
                     "only-members-as-themselves": "ok",
                     "frames-within-the-limit": "ok", "reply-after-stall": "ok",
                     "late-reply-taken": "ok", "stopped-peer-given-up": "ok",
                     "restarted-peer-given-up": "ok"}, out.stdout + out.stderr


def spin(seconds: float) -> None:
    """Take `seconds` of CPU without a yield, as a drive that takes its time."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


def served_when_a_timer_ran(transport: ZmqTransport, port: int, queue: Callable[[zmq.Context, str], None],
                            served: list, total: int) -> int:
    """Start `transport`, let `queue` queue work for it on its Raft port (plain zmq: its sockets never yield) while
    the hub is held, so that all of it is queued before the transport's greenlets first run (they start from a
    callback, and serve what is queued without waiting); then a timer due at once: how much of `served` it saw."""
    timer_saw: list[int] = []
    context = zmq.Context()
    try:
        transport.start()  # bound; its greenlets start at our first yield
        queue(context, f"tcp://127.0.0.1:{port}")
        time.sleep(0.5)  # the hub held (no monkey patching here): zmq's I/O thread queues the work meanwhile
        gevent.spawn_later(0.001, lambda: timer_saw.append(len(served)))
        deadline = time.monotonic() + 30
        while len(served) < total and time.monotonic() < deadline:
            gevent.sleep(0.01)
    finally:
        context.destroy(linger=0)
        transport.stop()
    assert len(served) >= total, served  # and the monitor may report the closing of its connections
    assert timer_saw, "the timer never ran"
    return timer_saw[0]


# Work items queued at once, each taking at least SERVE_TURN_SECONDS / 4: at most 15 yields of the greenlet serving
# them. gevent.sleep(0) yields through the hub's callbacks, which let the loop turn (and a timer run) only after 50
# of them (gevent's CALLBACK_CHECK_COUNT): so a timer runs before they are all served only with the timed yield.
QUEUED = 60


def test_a_timer_runs_before_a_full_raft_port_is_drained():
    """The REP greenlet serves queued frames back to back (zmq.green's recv returns at once while frames are
    queued); after SERVE_TURN_SECONDS of that it must yield a turn of the loop, so that a timer due meanwhile runs
    before the queue is empty (review of flood, Q1). Without a yield, or with gevent.sleep(0) (QUEUED), the timer
    runs only once all the frames are served."""
    served: list[int] = []

    def handle(messages, reply_wanted):
        spin(SERVE_TURN_SECONDS / 4)
        served.append(len(messages))
        return []

    def queue(context: zmq.Context, endpoint: str) -> None:
        dealer = context.socket(zmq.DEALER)  # a REP takes a DEALER's frames after an empty delimiter, as a REQ's
        dealer.connect(endpoint)
        frame = codec.encode_batch([RequestVote("b", "a", 1, 0, 0)])
        for _ in range(QUEUED):
            dealer.send_multipart([b"", frame])

    port = free_port()
    saw = served_when_a_timer_ran(ZmqTransport("a", f"127.0.0.1:{port}", handle), port, queue, served, QUEUED)
    assert saw < QUEUED, f"the timer ran only after all {saw} frames"


def test_a_timer_runs_before_a_full_monitor_queue_is_drained(monkeypatch):
    """The monitor's greenlet drains the REP socket's events (a flood of connections queues up to
    MONITOR_QUEUE_EVENTS) by the same rule (review of flood, L1): a timer due meanwhile runs before they are all
    taken. Each event here costs SERVE_TURN_SECONDS / 4 (it is ~4 us: a real flood queues thousands)."""
    port = free_port()
    transport = ZmqTransport("a", f"127.0.0.1:{port}", lambda messages, reply_wanted: [],
                             max_inbound_connections=QUEUED)  # no eviction: QUEUED events, one per connection
    taken: list[dict] = []
    on_event = transport._on_event

    def slow_on_event(event: dict) -> None:
        spin(SERVE_TURN_SECONDS / 4)
        taken.append(event)
        on_event(event)

    monkeypatch.setattr(transport, "_on_event", slow_on_event)

    dealers: list[zmq.Socket] = []  # kept open until the context goes

    def queue(context: zmq.Context, endpoint: str) -> None:
        for _ in range(QUEUED):  # each accepted: one event
            dealers.append(context.socket(zmq.DEALER))
            dealers[-1].connect(endpoint)

    saw = served_when_a_timer_ran(transport, port, queue, taken, QUEUED)
    assert saw < QUEUED, f"the timer ran only after all {saw} events"


def _full_batch(entries: int, data: bytes) -> AppendEntries:
    return AppendEntries("a", "b", 1, 0, 0, tuple(Entry(1, i, data=data) for i in range(entries)), 0)


HEARTBEAT = AppendEntries("a", "b", 1, 0, 0, (), 0)


def test_a_frame_holds_at_most_one_full_batch_of_appends():
    """Issue 13 (restore10): a peer decodes a frame in one cbor2 call and saves its entries in one drive, so the
    appends queued for a follower catching up go one full batch (256 KiB by default) a frame, not 2 MiB (20-45 ms
    held)."""
    batch = _full_batch(256, b"v" * 1000)  # 256 KiB with Entry.size's overhead
    assert sum(e.size() for e in batch.entries) == Config.max_batch_bytes
    assert fit_frame([batch] * 8) == 1
    small = [AppendEntries("a", "b", 1, 0, 0, batch.entries[:16], 0) for _ in range(8)]
    assert fit_frame(small) == 8


def test_a_heartbeat_rides_in_the_frame_of_a_full_batch():
    """Review of restore10, L1: the messages queued between a catch-up's full batches (heartbeats, read rounds, a
    vote) go in a full batch's frame, as they did with 1 MiB batches in 2 MiB frames; without room beside the batch
    each went alone, a round trip of its own."""
    for batch in (_full_batch(256, b"v" * 1000), _full_batch(Config.max_batch_entries, b"")):
        queue = [batch, HEARTBEAT, RequestVote("a", "b", 2, 0, 0)] + [batch, HEARTBEAT] * 3
        frames = []
        while queue:
            n = fit_frame(queue)
            frames.append(len(queue[:n]))
            del queue[:n]
        assert frames == [3, 2, 2, 2], frames


def test_a_frame_holds_at_most_max_batch_entries():
    """Review of restore10, L3: decoding and saving cost by the entry more than by the byte, so batches of tiny
    entries, each under the core's count bound, do not pack several to a frame (2,048 of the smallest writes take
    78 KB by codec.estimated_size: 3 fit 256 KiB, ~6,000 entries)."""
    batch = _full_batch(Config.max_batch_entries, b"x" * 6)
    assert fit_frame([batch] * 3) == 1
    assert fit_frame([_full_batch(Config.max_batch_entries // 2, b"x" * 6)] * 3) == 2
    assert fit_frame([batch], FrameBudget(1 << 20, 1)) == 1  # one message alone goes whatever the budget
