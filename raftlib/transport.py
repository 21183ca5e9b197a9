"""ZmqTransport: Raft messages between nodes over zmq.green REQ/REP, as CBOR frames (raftlib.codec).

Rules: every socket is used by one greenlet only. Each peer has one REQ socket and one request in flight: its
sender greenlet takes everything queued for that peer, sends it as one frame and waits (bounded) for the reply
frame, which carries the messages the peer had for us in answer. A reply that does not come in time closes the
socket with linger 0 and opens a new one (the zguide's "lazy pirate"), so a dead peer never wedges the sender;
the messages are dropped, as Raft allows. Any other failure of a send, the opening of a socket included (out of
descriptors: EMFILE), drops the batch too, is logged at most once a second, and is retried after 0.1 s: a sender
never dies while its peer exists. The REP server decodes each frame, hands the messages to the owner
and answers with whatever the owner returns. Bad frames are logged and dropped, never raised.
"""

from __future__ import annotations

import collections
import errno
import logging
import time

import gevent
import gevent.event
import zmq.green as zmq

from . import codec

logger = logging.getLogger("raftlib.transport")
TRACE = 5


class ZmqTransport:
    def __init__(
        self,
        node_id: str,
        bind_address: str,
        handler,
        reply_timeout_seconds: float = 0.5,
        max_queued_messages: int = 10_000,
        secret: bytes | None = None,
    ) -> None:
        """`handler(messages, reply_wanted) -> list[Message]`: called in the transport's greenlets; when
        `reply_wanted` it may block (bounded) and returns the messages to answer with. With a `secret` every frame
        is signed, and frames without its signature are dropped."""
        self.node_id = node_id
        self.bind_address = bind_address
        self._handler = handler
        self._reply_timeout_ms = int(reply_timeout_seconds * 1000)
        self._max_queued = max_queued_messages
        self._context = zmq.Context.instance()
        self._peers: dict[str, _PeerSender] = {}
        self._server = None
        self._rep = None
        self._secret = secret
        self.dropped_frames = 0
        self._warned_at = 0.0
        self._unwarned = 0

    def _encode(self, messages) -> bytes:
        return codec.sign_frame(codec.encode_batch(messages), self._secret)

    def _decode(self, data: bytes):
        return codec.decode_batch(codec.open_frame(data, self._secret))

    def _warn_dropped(self, what: str, nbytes: int, error: Exception) -> None:
        """Log a dropped frame, at most once a second: a peer with the wrong secret sends one every heartbeat."""
        self.dropped_frames += 1
        now = time.monotonic()
        if now - self._warned_at < 1.0:
            self._unwarned += 1
            return
        also = f" (and {self._unwarned} more since the last warning)" if self._unwarned else ""
        logger.warning("dropped %s (%d bytes): %s%s", what, nbytes, error, also)
        self._warned_at, self._unwarned = now, 0

    def start(self) -> None:
        self._rep = self._context.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        self._rep.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        self._bind(self._rep, f"tcp://{self.bind_address}")
        self._server = gevent.spawn(self._serve)

    @staticmethod
    def _bind(sock, endpoint: str, patience_seconds: float = 3.0) -> None:
        """Bind, waiting (bounded) while the port is still held. zmq closes a socket in its I/O thread, after
        close() has returned, so a transport stopped and started again in one process can find its own old
        listener still there for a moment."""
        deadline = time.monotonic() + patience_seconds
        while True:
            try:
                sock.bind(endpoint)
                return
            except zmq.ZMQError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    sock.close(linger=0)
                    raise
                gevent.sleep(0.05)

    def set_peers(self, addresses: dict[str, str]) -> None:
        """Which peers exist and where they listen ("host:port"). Senders for others are stopped."""
        for node_id in list(self._peers):
            if node_id not in addresses or self._peers[node_id].address != addresses[node_id]:
                self._peers.pop(node_id).stop()
        for node_id, address in addresses.items():
            if node_id != self.node_id and node_id not in self._peers and address:
                self._peers[node_id] = _PeerSender(self, node_id, address)

    def send(self, messages) -> None:
        for m in messages:
            peer = self._peers.get(m.dst)
            if peer is None:
                logger.log(TRACE, "no address for %s, dropping %s", m.dst, type(m).__name__)
                continue
            peer.enqueue(m)

    def _serve(self) -> None:
        sock = self._rep
        while True:
            try:
                frame = sock.recv(copy=True)
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM or sock.closed:
                    return
                logger.warning("raft port receive error: %s", e)
                continue
            replies = []
            try:
                messages = self._decode(frame)
                if any(m.dst != self.node_id for m in messages):
                    raise codec.CodecError("frame addressed to another node")
                logger.log(TRACE, "recv %s", messages)
                if messages:
                    replies = self._handler(messages, True) or []
            except codec.CodecError as e:
                self._warn_dropped("a bad frame on the raft port", len(frame), e)
            except Exception:
                logger.exception("handler failed on a raft frame")
            try:
                sock.send(self._encode(replies))
            except zmq.ZMQError as e:
                if sock.closed:
                    return
                logger.warning("raft port send error: %s", e)

    def stop(self) -> None:
        for peer in list(self._peers.values()):
            peer.stop()
        self._peers.clear()
        if self._server is not None:
            self._server.kill(block=False)
        if self._rep is not None:
            self._rep.close(linger=0)


class _PeerSender:
    def __init__(self, transport: ZmqTransport, node_id: str, address: str) -> None:
        self.transport = transport
        self.node_id = node_id
        self.address = address
        self._queue: collections.deque = collections.deque(maxlen=transport._max_queued)
        self._wake = gevent.event.Event()
        self._sock = None
        self._failures = 0
        self._warned_at = 0.0
        self._greenlet = gevent.spawn(self._run)

    def enqueue(self, m) -> None:
        self._queue.append(m)
        self._wake.set()

    def _open(self):
        sock = self.transport._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        sock.connect(f"tcp://{self.address}")
        return sock

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _run(self) -> None:
        t = self.transport
        while True:
            if not self._queue:
                self._wake.clear()
                self._wake.wait()
                continue
            batch = list(self._queue)
            self._queue.clear()
            try:
                if self._sock is None:
                    # Inside the try: opening can fail too (EMFILE when the process is out of descriptors), and
                    # a sender that died here would never speak to this peer again.
                    self._sock = self._open()
                logger.log(TRACE, "send to %s: %s", self.node_id, batch)
                self._sock.send(t._encode(batch))
                # recv under a gevent.Timeout waits on the socket's own watcher; poll() would build a Poller, a
                # select and two timers for every request.
                with gevent.Timeout(t._reply_timeout_ms / 1000.0, False):
                    frame = None
                    frame = self._sock.recv()
                if frame is None:
                    logger.debug("no reply from %s at %s in %d ms: reconnecting", self.node_id, self.address,
                                 t._reply_timeout_ms)
                    self._close()
                    continue
            except zmq.ZMQError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._failed(e)
                    continue
                logger.debug("socket to %s failed (%s): reconnecting", self.node_id, e)
                self._close()
                gevent.sleep(0.01)
                continue
            except Exception as e:  # any failure: the batch is dropped, as Raft allows, and we retry
                self._failed(e)
                continue
            try:
                replies = t._decode(frame)
            except codec.CodecError as e:
                t._warn_dropped(f"a bad reply from {self.node_id}", len(frame), e)
                continue
            if replies:
                logger.log(TRACE, "reply from %s: %s", self.node_id, replies)
                try:
                    t._handler(replies, False)
                except Exception:
                    logger.exception("handler failed on a reply from %s", self.node_id)

    def _failed(self, error: Exception) -> None:
        """A send or a reconnect failed in an unexpected way: warn (at most once a second), start afresh after a
        pause."""
        self._failures += 1
        if time.monotonic() - self._warned_at >= 1.0:
            logger.warning("sending to %s at %s failed (%s; %d failures since the last warning): retrying",
                           self.node_id, self.address, error, self._failures)
            self._warned_at, self._failures = time.monotonic(), 0
        try:
            self._close()
        except Exception:  # a socket half made: zmq frees it with the context
            self._sock = None
        gevent.sleep(0.1)

    def stop(self) -> None:
        self._greenlet.kill(block=False)
        self._close()
