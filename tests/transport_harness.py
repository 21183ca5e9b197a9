"""Run by tests/test_transport.py in its own process (it monkey-patches gevent). Prints one line per check."""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from raftlib import RequestVote, RequestVoteReply  # noqa: E402
from raftlib.transport import ZmqTransport  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer:
    """A transport whose handler answers every RequestVote with a granted reply, optionally slowly."""

    def __init__(self, node_id: str, port: int, delay: float = 0.0) -> None:
        self.received = []
        self.delay = delay
        self.arrived = gevent.event.Event()
        self.t = ZmqTransport(node_id, f"127.0.0.1:{port}", self.handle, reply_timeout_seconds=0.3)
        self.t.start()

    def handle(self, messages, reply_wanted):
        self.received.extend(messages)
        self.arrived.set()
        out = []
        for m in messages:
            if isinstance(m, RequestVote):
                if self.delay:
                    gevent.sleep(self.delay)
                out.append(RequestVoteReply(m.dst, m.src, m.term, True))
        return out if reply_wanted else None


def wait(event_or_pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if event_or_pred():
            return True
        gevent.sleep(0.01)
    return False


def main() -> None:
    a_port, b_port, ghost_port = free_port(), free_port(), free_port()
    a = Peer("a", a_port)
    b = Peer("b", b_port)
    a.t.set_peers({"b": f"127.0.0.1:{b_port}", "ghost": f"127.0.0.1:{ghost_port}"})

    # A peer that never existed does not hold up messages to the others.
    a.t.send([RequestVote("a", "ghost", 1, 0, 0), RequestVote("a", "b", 1, 0, 0)])
    ok = wait(lambda: any(isinstance(m, RequestVoteReply) for m in a.received), 2)
    print("never-existed", "ok" if ok else "FAIL")

    # A peer killed mid-request: the sender times out, reconnects, and reaches the peer once it is back.
    b.t.stop()
    slow = Peer("b", b_port, delay=5.0)  # takes the request, then dies before answering
    a.t.send([RequestVote("a", "b", 2, 0, 0)])
    wait(lambda: slow.received, 2)
    slow.t.stop()
    gevent.sleep(0.5)
    back = Peer("b", b_port)
    a.received.clear()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(m.term == 3 for m in a.received):
        a.t.send([RequestVote("a", "b", 3, 0, 0)])
        gevent.sleep(0.2)
    print("killed-mid-request", "ok" if any(m.term == 3 for m in a.received) else "FAIL")
    print("came-back", "ok" if any(m.term == 3 for m in back.received) else "FAIL")
    for p in (a, back):
        p.t.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
