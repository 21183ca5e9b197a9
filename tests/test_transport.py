"""The transport in a subprocess that owns its gevent hub: reconnects (lazy pirate), the cap on inbound
connections, and who may connect with node keys (CURVE and ZAP), as whom. In this process: the Raft port's REP
greenlet lets the loop turn while it serves a full queue."""

import os
import socket
import subprocess
import sys
import time

import gevent
import zmq

from raftlib import RequestVote, codec
from raftlib.transport import SERVE_TURN_SECONDS, ZmqTransport

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


def test_a_timer_runs_before_a_full_raft_port_is_drained():
    """The REP greenlet serves queued frames back to back (zmq.green's recv returns at once while frames are
    queued); after SERVE_TURN_SECONDS of that it must yield a turn of the loop, so that a timer due meanwhile runs
    before the queue is empty (review of flood, Q1). Without a yield the timer runs only once all `queued` frames are
    served. With gevent.sleep(0) too: that yield goes through the hub's callbacks, which let the loop turn (and a
    timer run) only after 50 of them (gevent's CALLBACK_CHECK_COUNT), and serving the 60 frames, each costing at
    least a quarter of SERVE_TURN_SECONDS, takes at most 60 / 4 = 15 yields. Deterministic: the frames are all
    queued before the REP greenlet first runs (it starts from a callback, and serves them without waiting)."""
    queued = 60
    served: list[int] = []
    timer_saw: list[int] = []

    def handle(messages, reply_wanted):
        spin_until = time.monotonic() + SERVE_TURN_SECONDS / 4  # no yield: as a drive that takes its time
        while time.monotonic() < spin_until:
            pass
        served.append(len(messages))
        return []

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = ZmqTransport("a", f"127.0.0.1:{port}", handle)
    context = zmq.Context()  # plain zmq: its sends never yield, so the REP greenlet does not run until we wait
    dealer = context.socket(zmq.DEALER)  # a REP takes a DEALER's frames after an empty delimiter, as a REQ's
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        transport.start()  # bound; its greenlets start at our first yield
        dealer.connect(f"tcp://127.0.0.1:{port}")
        frame = codec.encode_batch([RequestVote("b", "a", 1, 0, 0)])
        for _ in range(queued):
            dealer.send_multipart([b"", frame])
        time.sleep(0.5)  # the hub held (no monkey patching here): zmq's I/O thread queues the frames at the REP
        gevent.spawn_later(0.001, lambda: timer_saw.append(len(served)))
        deadline = time.monotonic() + 30
        while len(served) < queued and time.monotonic() < deadline:
            gevent.sleep(0.01)
    finally:
        dealer.close(linger=0)
        context.term()
        transport.stop()
    assert len(served) == queued, served
    assert timer_saw and timer_saw[0] < queued, f"the timer ran only after {timer_saw} of {queued} frames"
