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
    over_the_cap()
    only_the_cluster_key()
    sys.stdout.flush()


def peer_of(fd: int):
    """The peer address of the socket `fd` (which is zmq's: not closed here), or None."""
    import _socket

    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()


def over_the_cap() -> None:
    """60 silent TCP connections to a transport's port: it keeps at most its cap of them, and the connection of a
    peer that speaks is not among those it closes."""
    a_port, b_port = free_port(), free_port()
    a, b = Peer("a", a_port), Peer("b", b_port)
    a.t.set_peers({"b": f"127.0.0.1:{b_port}"})
    a.t.send([RequestVote("a", "b", 1, 0, 0)])
    wait(lambda: a.received, 2)
    gevent.sleep(0.1)  # the monitor has seen the accept
    (member_fd,) = b.t._inbound._rank
    member_peer = peer_of(member_fd)
    squatters = [socket.create_connection(("127.0.0.1", b_port)) for _ in range(60)]
    gevent.sleep(0.5)
    cap, kept = b.t._inbound.cap, len(b.t._inbound)
    member_kept = member_fd in b.t._inbound._rank and peer_of(member_fd) == member_peer
    a.received.clear()
    a.t.send([RequestVote("a", "b", 2, 0, 0)])
    ok = wait(lambda: a.received, 2)
    closed = 0
    for s in squatters:  # the node's greeting, then end of file for those it closed
        s.settimeout(0.05)
        try:
            while s.recv(4096):
                pass
            closed += 1
        except socket.timeout:
            pass
        except OSError:
            closed += 1
        s.close()
    good = kept <= cap and closed >= 60 - cap and ok and b.t._inbound.closed >= 60 - cap and member_kept
    print("over-the-cap", "ok" if good else f"FAIL kept {kept} cap {cap} closed {closed} member answered {ok} "
          f"member's connection kept {member_kept}")
    for p in (a, b):
        p.t.stop()


def only_the_cluster_key() -> None:
    """With a secret: a member gets answers; a client that knows the server's public key but has a key pair of
    its own is refused by the ZAP handler, and one that speaks NULL does not get through either."""
    import zmq as plain_zmq

    from raftlib import codec
    from raftlib.transport import curve_keypair

    port, member_port = free_port(), free_port()
    received = []
    server = ZmqTransport("s", f"127.0.0.1:{port}", lambda m, r: received.extend(m) or [], reply_timeout_seconds=0.3,
                          secret=b"the-secret")
    server.start()
    member = ZmqTransport("m", f"127.0.0.1:{member_port}", lambda m, r: [], secret=b"the-secret")
    member.start()
    member.set_peers({"s": f"127.0.0.1:{port}"})
    member.send([RequestVote("m", "s", 1, 0, 0)])
    member_ok = wait(lambda: received, 3)
    public_key, _ = curve_keypair(b"the-secret")
    ctx = plain_zmq.Context()
    strangers = []
    for curve in (True, False):
        req = ctx.socket(plain_zmq.REQ)
        req.setsockopt(plain_zmq.LINGER, 0)
        if curve:
            own_public, own_secret = plain_zmq.curve_keypair()
            req.setsockopt(plain_zmq.CURVE_SERVERKEY, public_key)
            req.setsockopt(plain_zmq.CURVE_PUBLICKEY, own_public)
            req.setsockopt(plain_zmq.CURVE_SECRETKEY, own_secret)
        req.connect(f"tcp://127.0.0.1:{port}")
        req.send(codec.encode_batch([RequestVote("x", "s", 9, 0, 0)]), plain_zmq.NOBLOCK)
        strangers.append(req)
    gevent.sleep(1.0)
    refused = not any(m.src == "x" for m in received)
    for req in strangers:
        req.close(linger=0)
    ctx.term()
    print("only-the-cluster-key", "ok" if member_ok and refused else f"FAIL member {member_ok} refused {refused}")
    member.stop()
    server.stop()


if __name__ == "__main__":
    main()
