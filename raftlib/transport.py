"""ZmqTransport: Raft messages between nodes over zmq.green REQ/REP, as CBOR frames (raftlib.codec).

Rules: every socket is used by one greenlet only. Each peer has one REQ socket and one request in flight: its
sender greenlet takes what is queued for that peer, as much as fits its FrameBudget (at least one message),
sends it as one frame and waits (bounded) for the reply frame, which carries the messages the peer had for us in
answer (as many as fit; the rest go as requests of our own). So a follower is sent at most one full batch of the
core's a round trip (FrameBudget): a ceiling on replication over a long link (Config.max_batch_bytes). Every frame stays under codec.MAX_FRAME_BYTES, which
is zmq's MAXMSGSIZE on every socket: a few MiB, since libzmq applies it to handshake commands too (review 2 F1).
A reply that does not come in time closes the socket with linger 0 and opens a new one (the zguide's "lazy
pirate"), so a dead peer never wedges the sender; the messages are dropped, as Raft allows. "In time" is
`reply_timeout_seconds`, and past it as long as the peer is alive, up to `reply_wait_cap_seconds`: a live peer
starved of CPU may answer later than an election timeout, and a reply given up on came on a socket already
closed, so the leader never heard from a follower that had heard from it and check-quorum ended the term with
every node alive (issue 13, bench/hog_elections.py). Alive means the socket's connection is up (its monitor saw
the handshake and no disconnection since the request went out) and answers zmq's heartbeats (ZMTP PING/PONG,
answered by the peer's I/O thread, which a busy event loop does not hold up): a peer that died or restarted is
given up on at once (the TCP connection closes), one stopped or cut off within HEARTBEAT_TIMEOUT_SECONDS, one whose
loop is wedged at the cap. Meanwhile what is queued for that peer waits and goes as one batch after the reply;
heartbeats to it wait too, but it is still busy with the request before them. Any other failure of a send, the
opening of a socket included (out of descriptors: EMFILE), drops the batch too, is logged at most once a second,
and is retried after 0.1 s: a sender never dies while its peer exists. The REP server decodes each frame, hands
the messages to the owner and answers with whatever the owner returns. Bad frames are logged and dropped, never raised.

Security. With a cluster secret every node has a CURVE key pair of its own (RFC 26/CurveZMQ; made at its first
start and kept in its data dir, raftlib.server.node), and its public key travels in the configuration
(messages.Member.public_key). Every connection uses CURVE: a client must know the public key of the node it
calls, and proves in its INITIATE that it holds the secret key of its own; the ZAP handler (RFC 27) admits a
client only if that key is the key of a member of the current configuration (the latest in the log, committed or
not: thesis §4.1), and tells zmq which node it is (the ZAP User-Id, which zmq puts on every frame of the
connection). The REP server takes a frame only if its sender's key is still a member's (a removed member's
connection is refused from the moment the configuration without it is here, and so are its frames on a
connection made before) and every message in it has `src` = that member (review 2 F2: a message's `src` was not
authenticated, and anyone who once held the cluster secret could speak as any member). A key belongs to one
member only: when a configuration gives two members one key, the one that had it first keeps it and the other is
neither admitted nor called (review 3 F2; the leader refuses such a join too). A sender checks the
replies' `src` likewise (the server's key is the peer's own). Every frame travels encrypted and authenticated
under keys of that connection alone, with a nonce that must increase: a frame or a whole session recorded and
sent again does not open, which is why frames carry no HMAC, sequence number or timestamp of their own.
Vouched keys. A node's log can be behind the cluster's configuration: a member restarted after others joined
(its configuration lacks the leader that must send it the entries that would name that leader), or a joining node
whose first appends carry a configuration older than its leader. So the node also admits the keys of a "vouched"
list: the newest configuration (index, members' keys) that a member gave it in an answer signed with the cluster
secret (the join's answer, or GET /cluster/keys: raftlib.server.node asks), only while the node's own newest
configuration is older than that list (its index below the list's). Once the node's newest configuration, or
its commit index, reaches that index the list is dropped for good (`on_vouched_dropped`: the node forgets it on
disk), even when the configuration then names this node alone (review 3 F1: a removed member's key must never
come back that way). The commit index counts too (review of edge5, finding 2): a list at an index the node has
committed is either in its log or was cut off (members answer with their newest committed configuration, but a
list from an older version, or one that moved on, may name an uncommitted one), so it can teach nothing, and
without that rule a cut-off list pinned the node until a configuration change reached its index. The transport
sees configuration changes (`set_peers`), not commits: the node calls `recheck_vouched` as its commit index moves.
Until then the list adds to the configuration's keys and never takes any away: a member removed after the node's
configuration is still admitted until the node's log catches up (a list may be behind the cluster, and one
that is replaced must not lock out a member the node still counts). A key refused that neither list names is
reported (`on_refused`) so that the node can ask for a newer list.
Without a secret anyone who reaches the port is a peer and may name any `src`.

Descriptors. zmq accepts every TCP connection to the port, and keeps each until it closes: strangers could hold
all of the process's descriptors (review F1). So a connection must finish its handshake within
HANDSHAKE_SECONDS, and at most `max_inbound_connections` are kept: the REP socket's monitor tells which
descriptors zmq accepted, each frame tells which one it came on (ZMQ_SRCFD), and past the cap the connection that
has gone longest without a valid frame is shut down (one that never sent one counts from NEVER_SPOKE_SECONDS
before it was accepted). Members speak every heartbeat; an idle member connection that is closed is opened again
by zmq when needed. The cap holds after the fact (zmq accepts first): leave descriptors in reserve beyond it.
"""

from __future__ import annotations

import _socket
import collections
import errno
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import gevent
import gevent.event
import zmq.green as zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from . import codec
from .core import Config
from .messages import AppendEntries, Member

logger = logging.getLogger("raftlib.transport")
TRACE = 5
CURVE_AVAILABLE = zmq.has("curve")
SMALL_MESSAGES_ROOM_BYTES = 64 << 10  # a frame's room beside a full batch: FrameBudget
HANDSHAKE_SECONDS = 2.0  # a connection must finish the zmq handshake (and CURVE's) within this
# A sender's connection is probed this often (a ZMTP PING) and closed when nothing came back for the timeout: a
# stopped or cut-off peer is told from a slow one while the sender waits past its reply timeout. The PING queues
# behind the request still in the socket buffers (one frame: REQ has one request out), and only data from the peer
# stops the timeout, so the timeout must exceed the largest frame's transfer time (codec.MAX_FRAME_BYTES, 4 MiB):
# microseconds on 127.0.0.1 or a LAN, but a link slower than about 4 MiB/s (32 Mbit/s, a WAN member) would have a
# big append or snapshot chunk cut off and retried forever. For such links raise it to at least MAX_FRAME_BYTES over
# the link's bytes per second, with margin (review replytimeout F2). It is a socket option set before the connect,
# so it cannot follow each frame's size.
HEARTBEAT_IVL_SECONDS = 0.25
HEARTBEAT_TIMEOUT_SECONDS = 1.0
LIVE_CHECK_SECONDS = 0.05  # how often a sender waiting past its reply timeout looks whether the connection is up
MAX_INBOUND_CONNECTIONS = 32  # kept at once on the Raft port; members need one each
NEVER_SPOKE_SECONDS = 1.0  # a connection that never sent a valid frame ranks as if it last did this long before it came
MONITOR_QUEUE_EVENTS = 10_000  # monitor events queued for the loop at most (each two small frames)
# The REP greenlet serves frames back to back while more are queued (zmq.green's recv returns at once then, without
# a turn of the loop), for at most this long; then it yields a turn of the loop (timers run, every socket is
# polled). Under a flood of frames (junk, a stranger's, or just many) a node's timers and other greenlets were
# held until the socket emptied: a timer 583 ms late, a restore 2-3 s instead of 0.6 s, and a leader whose
# heartbeats did not go out deposed (review of restart1m). A socket that empties lets the loop turn anyway: at
# the usual one or two senders the queue never holds frames that long, and nothing is spent on yields. The monitor's
# greenlet drains its events by the same rule (_ServeTurns): a flood of connections queues up to MONITOR_QUEUE_EVENTS.
SERVE_TURN_SECONDS = 0.002
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks who may connect (RFC 27/ZAP)
_HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "a protocol error", zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                     "refused by authentication"}


@dataclass(frozen=True)
class FrameBudget:
    """How much one frame takes of the messages queued for a peer when it packs several (one message alone may take
    more, up to codec.MAX_FRAME_BYTES: an AppendEntries of max_batch_bytes and one entry, a snapshot chunk): at most
    `max_bytes` by codec.estimated_size and `max_entries` entries of AppendEntries in all. The receiver decodes a
    frame in one cbor2 call and its runtime saves what it holds in one drive, so a frame of appends holds the peer's
    loop for as long as its entries take, by their count more than their bytes: a catch-up's queued appends packed
    2 MiB a frame held a joiner 20-45 ms (issue 13, restore10). So a frame holds at most one full batch of the
    core's (Config.max_batch_bytes and max_batch_entries; by default ~5 ms of decoding and saving for writes of
    ~100 bytes, and the count keeps smaller writes from packing more: 256 KiB of the smallest took ~17 ms) with
    room for the small messages queued between (heartbeats, read rounds, votes: ~100-200 bytes each; a full batch's
    estimate is also 8 bytes an entry over its Entry.size, 16 KiB at 2,048 entries). Without that room each
    heartbeat behind a full batch went alone, a round trip of its own (review of restore10, L1)."""

    max_bytes: int
    max_entries: int

    @classmethod
    def for_batches(cls, max_batch_bytes: int, max_batch_entries: int) -> FrameBudget:
        """The budget of frames that carry the core's batches bounded by these Config values."""
        return cls(max_batch_bytes + SMALL_MESSAGES_ROOM_BYTES, max_batch_entries)


DEFAULT_FRAME_BUDGET = FrameBudget.for_batches(Config.max_batch_bytes, Config.max_batch_entries)


def fit_frame(messages, budget: FrameBudget = DEFAULT_FRAME_BUDGET) -> int:
    """How many of `messages`, from the first, go into one frame: at least one, then as many as fit `budget`
    (review 2 F1: frames must stay under MAXMSGSIZE, which is now small)."""
    total_bytes = total_entries = 0
    for n, m in enumerate(messages):
        total_bytes += codec.estimated_size(m)
        if type(m) is AppendEntries:
            total_entries += len(m.entries)
        if n > 0 and (total_bytes > budget.max_bytes or total_entries > budget.max_entries):
            return n
    return len(messages)


def new_node_key() -> str:
    """A new CURVE secret key for a node (Z85 text, 40 characters), from the system's random source."""
    return zmq.curve_keypair()[1].decode("ascii")


def public_key_of(secret_key: str) -> str:
    """The CURVE public key (Z85 text) of the secret key `secret_key` (Z85 text). ValueError when it is not one."""
    try:
        return zmq.curve_public(secret_key.encode("ascii")).decode("ascii")
    except (zmq.ZMQError, UnicodeError) as e:
        raise ValueError(f"not a CURVE secret key in Z85 text: {e}") from None


class _RateLimitedWarning:
    """A warning a remote party can cause, logged at most once a second with a count of those left out."""

    def __init__(self) -> None:
        self._warned_at = 0.0
        self._left_out = 0

    def warn(self, message: str, *args, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._warned_at < 1.0:
            self._left_out += 1
            return
        if self._left_out:
            message += f" (and {self._left_out} more since the last such line)"
        logger.log(level, message, *args)
        self._warned_at, self._left_out = now, 0


class _ServeTurns:
    """The SERVE_TURN_SECONDS rule for a greenlet that takes what is queued on a socket: zmq.green's recv returns
    at once while something is queued, without a turn of the loop, so a greenlet draining a full socket held the
    node's timers and other greenlets until it emptied. Ask `queued()` before each recv and tell `received()` after
    it: a turn of the loop is taken once the greenlet has served back to back for SERVE_TURN_SECONDS."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._turn_at = time.monotonic()  # when the loop last had a turn: a recv waited, or we yielded

    def queued(self) -> bool:
        """Whether something is queued (else the recv waits: the loop turns meanwhile); first a turn of the loop
        if it is, and the greenlet has served back to back for SERVE_TURN_SECONDS."""
        queued = bool(self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        if queued and time.monotonic() - self._turn_at >= SERVE_TURN_SECONDS:
            gevent.sleep(0.00001)  # a turn of the loop (gevent.sleep(0) lets no timer run: STACK-NOTES)
            self._turn_at = time.monotonic()
        return queued

    def received(self, queued: bool) -> None:
        """A recv returned; `queued` is what `queued()` said before it."""
        if not queued:
            self._turn_at = time.monotonic()


class ZmqTransport:
    def __init__(
        self,
        node_id: str,
        bind_address: str,
        handler,
        reply_timeout_seconds: float = 0.5,
        reply_wait_cap_seconds: float | None = None,
        max_queued_messages: int = 10_000,
        node_key: str | None = None,
        members: Callable[[], Iterable[Member]] | None = None,
        max_inbound_connections: int = MAX_INBOUND_CONNECTIONS,
        configuration_index: Callable[[], int] | None = None,
        on_vouched_dropped: Callable[[], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        commit_index: Callable[[], int] | None = None,
        frame_budget: FrameBudget = DEFAULT_FRAME_BUDGET,
    ) -> None:
        """`handler(messages, reply_wanted) -> list[Message]`: called in the transport's greenlets; when
        `reply_wanted` it may block (bounded) and returns the messages to answer with. A sender waits
        `reply_timeout_seconds` for a reply, and while the peer's connection is alive up to
        `reply_wait_cap_seconds` (default 10 times the reply timeout: the module's rules). With `node_key` (this
        node's CURVE secret key, Z85 text; a cluster secret), only the members that `members()` (the current
        configuration's, read on `start` and on every `set_peers`) lists with their public keys connect, each
        only as itself (CURVE, see the module's rules); raises RuntimeError if this libzmq has no CURVE.
        `configuration_index()` is the index of the newest configuration `members()` comes from (0: none), and
        `commit_index()` the node's commit index; `on_vouched_dropped()` is called once when either reaches the
        vouched list's index and
        the list is dropped (the node forgets it on disk then); `on_refused(public_key)` when the ZAP handler
        refuses a key that neither the configuration nor the vouched list names (the module's rules). Both are
        called in the transport's greenlets and must not block. `frame_budget`: FrameBudget.for_batches of the node's
        Config."""
        if node_key is not None and not CURVE_AVAILABLE:
            raise RuntimeError("a cluster secret needs a libzmq with CURVE (zmq.has('curve') is False)")
        self.node_id = node_id
        self.bind_address = bind_address
        self._handler = handler
        self._reply_timeout_ms = int(reply_timeout_seconds * 1000)
        self._reply_wait_cap = (10 * reply_timeout_seconds if reply_wait_cap_seconds is None
                                else max(reply_timeout_seconds, reply_wait_cap_seconds))
        self.late_replies = 0  # replies taken past the reply timeout, from a peer whose connection was alive
        self.replies_given_up = 0  # requests whose reply never came: the socket was reset
        self._max_queued = max_queued_messages
        self._frame_budget = frame_budget
        self._context = zmq.Context()  # its own: the ZAP handler is one per context
        self._peers: dict[str, _PeerSender] = {}
        self._greenlets: list = []
        self._rep = None
        self._zap = None
        self._monitor = None
        self._curve = None if node_key is None else (public_key_of(node_key), node_key)
        self._members = members or (lambda: ())
        self._key_owner: dict[str, str] = {}  # public key (Z85) -> node id: whom the ZAP handler admits
        self._peer_key: dict[str, str] = {}  # node id -> public key (Z85), to call it
        self._configuration_index = configuration_index or (lambda: 0)
        self._commit_index = commit_index or (lambda: 0)
        self._vouched: dict[str, str] = {}  # node id -> public key: admitted while our configuration is older
        self._vouched_index = 0  # the index of the configuration the vouched list is; 0: none
        self._on_vouched_dropped = on_vouched_dropped
        self._on_refused = on_refused
        self._keyless_warned: frozenset[str] = frozenset()
        self._duplicates_logged: list[str] = []
        self.dropped_frames = 0
        self._dropped_warning = _RateLimitedWarning()
        self._handshake_warning = _RateLimitedWarning()
        self._receive_warning = _RateLimitedWarning()
        self._inbound = _InboundConnections(int(bind_address.rsplit(":", 1)[1]), max_inbound_connections)

    def _encode(self, messages) -> bytes:
        return codec.encode_batch(messages)

    def _decode(self, data: bytes):
        return codec.decode_batch(data)

    def _warn_dropped(self, what: str, nbytes: int, error: Exception) -> None:
        """Log a dropped frame, at most once a second: a broken peer may send one every heartbeat."""
        self.dropped_frames += 1
        self._dropped_warning.warn("dropped %s (%d bytes): %s", what, nbytes, error)

    def secure(self, sock, server: bool = False, server_key: str = "") -> None:
        """With a secret: CURVE on `sock`, as the server (the REP socket) or as a client (a REQ socket) of the
        node whose public key is `server_key`."""
        if self._curve is None:
            return
        public_key, secret_key = self._curve
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public_key.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode("ascii"))
        if server:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
        else:
            assert server_key, "a CURVE client needs the key of the node it calls"
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))

    def _refresh_keys(self) -> None:
        """Whom to admit and how to call each peer: the keys of the current configuration's members, and those of
        the vouched list while the configuration is older than it (see the module's rules). A configuration of
        this node alone is a configuration: once it reaches the list's index it admits nobody (review 3 F1: a sole
        survivor fell back to the join's list and admitted the removed leader's key as that leader)."""
        if self._curve is None:
            return
        members = [m for m in self._members() if m.node_id != self.node_id]
        peer_key = {m.node_id: m.public_key for m in members if m.public_key}
        if self._vouched_index and self._known_index() >= self._vouched_index:
            self._vouched, self._vouched_index = {}, 0
            if self._on_vouched_dropped is not None:
                self._on_vouched_dropped()
        # The vouched list is the newer configuration: its key for a member wins (a member's key never changes
        # within one cluster's configurations: routes_cluster.join_refusal; this only orders a conflict).
        peer_key.update((node_id, key) for node_id, key in self._vouched.items() if node_id != self.node_id)
        keyless = frozenset(m.node_id for m in members if not m.public_key)
        if keyless and keyless != self._keyless_warned:
            logger.warning("members %s have no public key in the configuration: with a cluster secret they cannot "
                           "connect, nor be called (a configuration made without a secret, or by a raftdzmq "
                           "before node keys)", ", ".join(sorted(keyless)))
        self._keyless_warned = keyless
        self._peer_key, self._key_owner = self._one_member_per_key(peer_key)

    def _one_member_per_key(self, peer_key: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """`peer_key` without the members whose key another member has (review 3 F2: a join that reused a member's
        public key, read from GET /cluster, took that member's frames from it everywhere), and the map from key to
        member. A key stays with whoever had it first: the member it was admitted as before (else, for keys new
        here, the first in the configuration's order); my own key is mine. The others get neither a sender nor
        admission, and an error is logged (once per such configuration)."""
        owner: dict[str, str] = {}
        if self._curve is not None:
            owner[self._curve[0]] = self.node_id
        order = sorted(peer_key, key=lambda node_id: self._key_owner.get(peer_key[node_id]) != node_id)
        refused = []
        for node_id in order:
            key = peer_key[node_id]
            if key in owner:
                refused.append(f"{node_id} (the key of {owner[key]})")
            else:
                owner[key] = node_id
        if refused and refused != self._duplicates_logged:
            logger.error("members with another member's public key in the configuration: %s; neither admitted nor "
                         "called (remove them)", ", ".join(sorted(refused)))
        self._duplicates_logged = refused
        if self._curve is not None:
            del owner[self._curve[0]]
        return {node_id: key for key, node_id in owner.items()}, owner

    def vouch(self, index: int, keys: dict[str, str]) -> bool:
        """Admit the members `keys` names (node id -> public key), the configuration at `index` as a member
        vouched for it (an answer signed with the cluster secret), while this node's own configuration is older
        than `index`. Taken, returning True, only when it is newer than both this node's configuration and the
        vouched list it has; else ignored, returning False."""
        if index <= self._vouched_index or index <= self._known_index():
            return False
        self._vouched, self._vouched_index = dict(keys), index
        self._refresh_keys()
        return True

    def _known_index(self) -> int:
        """The index up to which this node knows the cluster's configuration: its newest configuration's, or its
        commit index (committed entries are the cluster's: §5.4.3), whichever is higher."""
        return max(self._configuration_index(), self._commit_index())

    def recheck_vouched(self) -> None:
        """Drop the vouched list if the commit index has reached it (the module's rules); cheap when it has not."""
        if self._vouched_index and self._commit_index() >= self._vouched_index:
            self._refresh_keys()

    @property
    def vouched_index(self) -> int:
        """The index of the vouched list admitted now; 0 when there is none."""
        return self._vouched_index

    def start(self) -> None:
        self._refresh_keys()
        if self._curve is not None:
            # Before the REP socket exists: libzmq asks the ZAP handler about every CURVE client once one is bound.
            self._zap = self._context.socket(zmq.REP)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind(_ZAP_ENDPOINT)
            self._greenlets.append(gevent.spawn(self._authenticate))
        self._rep = self._context.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        self._rep.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
        self._rep.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_SECONDS * 1000))
        self.secure(self._rep, server=True)
        # The monitor's events go through an inproc pair whose queue drops what does not fit: room for the bursts
        # a flood of connections brings while the loop is busy (a missed event skews the count), but bounded, and
        # no ACCEPT_FAILED: out of descriptors, zmq fails its accept over and over, an event each time (review 2
        # F3: 4.2 million in 44 s, 504 MiB queued, all parsed in the event loop). The runtime and the HTTP edge
        # report running out of descriptors already.
        endpoint = f"inproc://raft-port-monitor-{id(self)}"
        self._rep.monitor(endpoint, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                          | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._monitor = self._context.socket(zmq.PAIR)
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.setsockopt(zmq.RCVHWM, MONITOR_QUEUE_EVENTS)
        self._monitor.connect(endpoint)
        self._bind(self._rep, f"tcp://{self.bind_address}")
        self._greenlets += [gevent.spawn(self._serve), gevent.spawn(self._watch_connections)]

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
        """Which peers exist and where they listen ("host:port"). Senders for others are stopped. With a secret,
        also whom the ZAP handler admits now (`members()`), and a peer without a public key gets no sender."""
        self._refresh_keys()
        curve = self._curve is not None
        for node_id in list(self._peers):
            peer = self._peers[node_id]
            if (node_id not in addresses or peer.address != addresses[node_id]
                    or (curve and peer.server_key != self._peer_key.get(node_id))):
                self._peers.pop(node_id).stop()
        for node_id, address in addresses.items():
            server_key = self._peer_key.get(node_id, "")
            if node_id != self.node_id and node_id not in self._peers and address and (server_key or not curve):
                self._peers[node_id] = _PeerSender(self, node_id, address, server_key)
        self._inbound.members = len(addresses)

    def send(self, messages) -> None:
        for m in messages:
            peer = self._peers.get(m.dst)
            if peer is None:
                logger.log(TRACE, "no address for %s, dropping %s", m.dst, type(m).__name__)
                continue
            peer.enqueue(m)

    def _serve(self) -> None:
        sock = self._rep
        curve = self._curve is not None
        turns = _ServeTurns(sock)
        while True:
            try:
                queued = turns.queued()
                frame = sock.recv(copy=False)
                turns.received(queued)
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM or sock.closed:
                    return
                self._receive_warning.warn("raft port receive error: %s", e)
                gevent.sleep(0.1)  # a spin otherwise (EVENTS may say nothing is queued: no yield), as the senders
                continue
            data = frame.bytes
            replies = []
            try:
                messages = self._decode(data)
                if any(m.dst != self.node_id for m in messages):
                    raise codec.CodecError("frame addressed to another node")
                if curve:
                    # Who sent it is who its CURVE key says (the ZAP User-Id), and only while a member.
                    sender = self._key_owner.get(frame.get("User-Id"))
                    if sender is None:
                        raise codec.CodecError("a frame from a key that is no member's now (a removed member)")
                    if any(m.src != sender for m in messages):
                        raise codec.CodecError(f"a message whose src is not {sender}, the member whose key sent it")
                self._inbound.spoke(frame.get(zmq.SRCFD))
                logger.log(TRACE, "recv %s", messages)
                if messages:
                    replies = self._handler(messages, True) or []
            except codec.CodecError as e:
                self._warn_dropped("a bad frame on the raft port", len(data), e)
            except Exception:
                logger.exception("handler failed on a raft frame")
            n = fit_frame(replies, self._frame_budget)
            if n < len(replies):  # the rest as requests of our own: an answer must fit a frame too
                self.send(replies[n:])
                replies = replies[:n]
            out = self._encode(replies)
            if len(out) > codec.MAX_FRAME_BYTES:
                self._warn_dropped("an answer over the frame limit (not sent)", len(out), codec.CodecError("too big"))
                out = self._encode([])
            try:
                sock.send(out)
            except zmq.ZMQError as e:
                if sock.closed:
                    return
                logger.warning("raft port send error: %s", e)

    def _watch_connections(self) -> None:
        """Follow the REP socket's monitor: count the connections zmq accepted, shut down the surplus, and log
        handshakes that failed (another secret, none, or not zmq at all) at most once a second."""
        monitor, inbound = self._monitor, self._inbound
        turns = _ServeTurns(monitor)  # a flood of connections can queue MONITOR_QUEUE_EVENTS: ~40-100 ms to drain
        while True:
            try:
                queued = turns.queued()
                frames = monitor.recv_multipart()
                turns.received(queued)
                while True:  # everything that has happened, before any eviction: descriptors are reused
                    self._on_event(parse_monitor_message(frames))
                    if not turns.queued():
                        break
                    frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            except zmq.ZMQError as e:
                if monitor.closed or e.errno == zmq.ETERM:
                    return
                logger.warning("raft port monitor: %s", e)
                gevent.sleep(0.1)
                continue
            closed = inbound.enforce_cap()
            if closed:
                self._handshake_warning.warn(
                    "raft port: closed %d connection(s) beyond the cap of %d (those longest without a valid frame)",
                    closed, inbound.cap)

    def _on_event(self, event: dict) -> None:
        kind, value = event["event"], event["value"]
        inbound = self._inbound
        if kind == zmq.EVENT_ACCEPTED:
            inbound.accepted(value)
        elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
            if inbound.gone(value):
                # zmq says no more (its handshake events name no descriptor): the usual cause is a frame over
                # MAXMSGSIZE (review 2 F1: a stranger declaring a huge handshake command), else bytes that are not
                # ZMTP, a refused handshake (logged as well), or a peer that hung up.
                self._handshake_warning.warn(
                    "raft port: a connection closed before it sent a valid frame: a frame over the %d MiB limit, "
                    "not ZMTP, refused, or the other side hung up", codec.MAX_FRAME_BYTES >> 20)
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the value is an errno
            if value in (errno.EAGAIN, errno.ETIMEDOUT):  # HANDSHAKE_IVL ran out (zmq reports EAGAIN)
                self._handshake_warning.warn("raft port: closed a connection that did not finish its handshake "
                                             "within %gs", HANDSHAKE_SECONDS)
            else:  # a peer that died or stopped mid-handshake
                logger.debug("raft port: a connection ended before its handshake finished (%s)", zmq.strerror(value))
        elif kind in _HANDSHAKE_FAILED:
            self._handshake_warning.warn(
                "raft port: a connection failed the handshake (%s): a node with another cluster secret, or none, "
                "or not a raftdzmq node", _HANDSHAKE_FAILED[kind])

    def _authenticate(self) -> None:
        """The ZAP handler (RFC 27): admit a CURVE client only if its long-term key is a member's (it can use
        that key only if it holds the member's secret key: CURVE's INITIATE proves that), naming the key as the
        connection's User-Id, which `_serve` maps to the member on every frame."""
        zap = self._zap
        while True:
            try:
                frames = zap.recv_multipart()
            except zmq.ZMQError as e:
                if zap.closed:
                    return
                self._handshake_warning.warn("raft port: could not take an authentication request: %s", e)
                gevent.sleep(0.1)
                continue
            key = ""
            if len(frames) >= 7 and frames[5] == b"CURVE" and len(frames[6]) == 32:
                key = z85.encode(frames[6]).decode("ascii")
            ok = key in self._key_owner
            if not ok:
                self._handshake_warning.warn("raft port: refused a connection from %s: not a member's key",
                                             frames[3].decode(errors="replace") if len(frames) > 3 else "?")
                if key and self._on_refused is not None:
                    try:
                        self._on_refused(key)  # perhaps a member newer than our configuration: ask (bounded)
                    except Exception:
                        logger.exception("on_refused failed")
            request_id = frames[1] if len(frames) > 1 else b""
            try:
                zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                    b"OK" if ok else b"not a member's key", key.encode("ascii") if ok else b"", b""])
            except zmq.ZMQError as e:  # else the handler would die, and every CURVE handshake wait out its time
                if zap.closed:
                    return
                self._handshake_warning.warn("raft port: could not answer an authentication request: %s", e)

    def stop(self) -> None:
        for peer in list(self._peers.values()):
            peer.stop()
        self._peers.clear()
        for g in self._greenlets:
            g.kill(block=False)
        for sock in (self._monitor, self._rep, self._zap):
            if sock is not None:
                sock.close(linger=0)
        self._context.destroy(linger=0)


class _InboundConnections:
    """The connections zmq accepted on the Raft port, by descriptor (see the module's rules). Pure bookkeeping but
    for `enforce_cap`, which shuts the surplus down."""

    def __init__(self, port: int, cap: int) -> None:
        self.port = port
        self.base_cap = cap
        self.members = 0
        self.closed = 0  # by enforce_cap, in all
        self._rank: dict[int, float] = {}  # descriptor -> when it last sent a valid frame (see NEVER_SPOKE_SECONDS)
        self._silent: set[int] = set()  # descriptors accepted that have not sent a valid frame yet

    @property
    def cap(self) -> int:
        return max(self.base_cap, 2 * self.members + 8)

    def __len__(self) -> int:
        return len(self._rank)

    def accepted(self, fd: int) -> None:
        # It may have spoken already: its first frame can be handled before the monitor's event about it.
        if fd not in self._rank:
            self._silent.add(fd)
        self._rank[fd] = max(self._rank.get(fd, 0.0), time.monotonic() - NEVER_SPOKE_SECONDS)

    def spoke(self, fd: int) -> None:
        self._rank[fd] = time.monotonic()
        self._silent.discard(fd)

    def gone(self, fd: int) -> bool:
        """Forget `fd`; True when it was accepted and never sent a valid frame."""
        self._rank.pop(fd, None)
        if fd in self._silent:
            self._silent.remove(fd)
            return True
        return False

    def enforce_cap(self) -> int:
        """Shut down connections, longest without a valid frame first, until at most `cap` are left; returns how
        many. A descriptor is shut down only if it still is a connection accepted on our port: zmq may have
        closed it and given the number to another (then it is that one, which is as much a surplus)."""
        closed = 0
        rank = self._rank
        while len(rank) > self.cap:
            fd = min(rank, key=rank.__getitem__)
            del rank[fd]
            self._silent.discard(fd)
            if _shutdown_accepted(fd, self.port):
                closed += 1
        self.closed += closed
        return closed


def _shutdown_accepted(fd: int, port: int) -> bool:
    """shutdown(2) the socket `fd` if it is a TCP connection accepted on `port`: zmq's I/O thread then reads end of
    file and closes it. Not close(): the descriptor is zmq's. Uses no descriptor (none may be left)."""
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:  # closed meanwhile, or not a socket any more
        return False
    try:
        if sock.getsockname()[1] != port:
            return False
        sock.getpeername()  # a listening socket has none
        sock.shutdown(_socket.SHUT_RDWR)
        return True
    except (OSError, IndexError, TypeError):
        return False
    finally:
        sock.detach()


class _PeerSender:
    def __init__(self, transport: ZmqTransport, node_id: str, address: str, server_key: str = "") -> None:
        self.transport = transport
        self.node_id = node_id
        self.address = address
        self.server_key = server_key  # the peer's public key (Z85), with a secret
        self._queue: collections.deque = collections.deque(maxlen=transport._max_queued)
        self._wake = gevent.event.Event()
        self._sock = None
        self._monitor = None  # the socket's monitor: whether its connection is up (_take_events)
        self._connected = False
        self._failures = 0
        self._warned_at = 0.0
        self._greenlet = gevent.spawn(self._run)

    def enqueue(self, m) -> None:
        self._queue.append(m)
        self._wake.set()

    def _open(self):
        sock = self.transport._context.socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_SECONDS * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_SECONDS * 1000))
            self.transport.secure(sock, server_key=self.server_key)
            self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            self._connected = False
            sock.connect(f"tcp://{self.address}")
        except BaseException:
            self._close_monitor(sock)
            sock.close(linger=0)
            raise
        return sock

    def _close_monitor(self, sock) -> None:
        if self._monitor is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None

    def _close(self) -> None:
        if self._sock is not None:
            self._close_monitor(self._sock)
            self._sock.close(linger=0)
            self._sock = None

    def _take_events(self) -> bool:
        """Read what the socket's monitor saw since the last call: `_connected` is whether the newest event is a
        handshake that succeeded. True when the connection went down meanwhile (a peer that died, restarted, or
        missed zmq's heartbeats): a request it took is lost even if zmq has connected again since (the REQ state
        machine: STACK-NOTES). It runs before every send, so it looks at the monitor's EVENTS first: a read of an
        empty monitor raises zmq.Again, which costs a few times as much (review replytimeout F4)."""
        went_down = False
        while self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))["event"]
            self._connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            went_down = went_down or not self._connected
        return went_down

    def _peer_alive(self) -> bool:
        """Whether the connection the request went out on is up and has not gone down since it was sent."""
        return not self._take_events() and self._connected

    def _run(self) -> None:
        t = self.transport
        while True:
            if not self._queue:
                self._wake.clear()
                self._wake.wait()
                continue
            queue = self._queue
            n = fit_frame(queue, t._frame_budget) if len(queue) > 1 else 1
            batch = [queue.popleft() for _ in range(n)]
            data = t._encode(batch)
            if len(data) > codec.MAX_FRAME_BYTES:  # cannot happen within the core's bounds: see codec
                t._warn_dropped(f"a frame for {self.node_id} over the limit (not sent)", len(data),
                                codec.CodecError(f"{len(batch)} message(s)"))
                continue
            try:
                if self._sock is None:
                    # Inside the try: opening can fail too (EMFILE when the process is out of descriptors), and
                    # a sender that died here would never speak to this peer again.
                    self._sock = self._open()
                logger.log(TRACE, "send to %s: %s", self.node_id, batch)
                self._take_events()  # a disconnection before this request does not count against its reply
                self._sock.send(data)
                sent_at = time.monotonic()
                frame = self._await_reply(sent_at, t._reply_timeout_ms / 1000.0, t._reply_wait_cap)
                if frame is None:
                    t.replies_given_up += 1
                    logger.debug("no reply from %s at %s in %d ms: reconnecting", self.node_id, self.address,
                                 (time.monotonic() - sent_at) * 1000)
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
                if self.server_key and any(m.src != self.node_id for m in replies):
                    raise codec.CodecError(f"a reply whose src is not {self.node_id}, whose key answered")
            except codec.CodecError as e:
                t._warn_dropped(f"a bad reply from {self.node_id}", len(frame), e)
                continue
            if replies:
                logger.log(TRACE, "reply from %s: %s", self.node_id, replies)
                try:
                    t._handler(replies, False)
                except Exception:
                    logger.exception("handler failed on a reply from %s", self.node_id)

    def _await_reply(self, sent_at: float, timeout: float, cap: float):
        """The reply to the request sent at `sent_at` (monotonic), or None if none came within `timeout` seconds
        while the connection was down, or within `cap` seconds while it was up (the module's rules: a live peer
        starved of CPU answers late, and its late reply must count)."""
        deadline = sent_at + cap
        frame = self._recv_within(timeout)
        while frame is None and self._peer_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            frame = self._recv_within(min(LIVE_CHECK_SECONDS, left))
            if frame is not None:
                self.transport.late_replies += 1
                logger.debug("a late reply from %s, %d ms after its request", self.node_id,
                             (time.monotonic() - sent_at) * 1000)
        return frame

    def _recv_within(self, timeout: float):
        """The reply, or None if none came within `timeout` seconds. recv under a gevent.Timeout waits on the socket's
        own watcher (poll() would build a Poller, a select and two timers for every request). When the hub was blocked
        past the timeout (a stalled loop: a long step, a starved CPU), the overdue timer often fires before the socket's
        watcher is looked at, though the reply arrived in the stall: so one non-blocking recv is tried before the reply
        is declared lost (review stallstep L1: 12 of 20 replies were dropped after a 0.5 s stall, each resetting the
        socket, and check-quorum stepped a leader down whose followers had all answered). REQ/REP keeps this sound: the
        socket has one request out, so what it holds is that request's reply; after a real timeout nothing is there and
        the caller resets it."""
        frame = None
        with gevent.Timeout(timeout, False):
            frame = self._sock.recv()
        if frame is None:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                pass
        return frame

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
        except Exception:  # a socket half made: zmq frees it and its monitor with the context
            self._sock = None
            self._monitor = None  # else the next _open would replace it unclosed (review replytimeout N2)
        gevent.sleep(0.1)

    def stop(self) -> None:
        self._greenlet.kill(block=False)
        self._close()
