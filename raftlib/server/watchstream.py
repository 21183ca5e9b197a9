"""A watch stream (GET /watch without poll=1): the loop that writes a watcher's events as server-sent events and,
behind the edge, the connection taken from pywsgi once the answer's head is out, so that the code that wakes
watchers (WatchHub._wake_some) writes a batch's frame to each waiting watcher's socket itself.

Why (issue 14, fan-out): with 1,000 watchers on one follower, 45% of its time went to pywsgi writing frames. Each
watcher's answer was a generator that pywsgi iterated, so each frame cost each watcher a greenlet switch (woken,
read, yield), pywsgi's copy of the frame into a bytearray behind its chunk header, and a sendall. Now the wake
sends the frame itself (shared by the watchers of one filter at one place: WatchHub.next_sse) with one
non-blocking sendmsg per watcher (chunk header, frame, CRLF: no copy), and the watcher's greenlet sleeps until a
keep-alive is due or a send could not take the whole frame.

How the socket is taken: the edge puts its handler in the environ (environ["raftdzmq.handler"], which edge.Stream
already uses to see the client go); its `socket` is the connection, and its `response_use_chunked` says how
pywsgi framed the answer (chunked for HTTP/1.1; an HTTP/1.0 answer has no chunks and ends with the connection).
Not the `write` callable of start_response: it is pywsgi's same blocking, copying write. Not wsgi.input's socket:
the edge reads a body whole and hands a BytesIO. The first chunk still goes through pywsgi, so the head is made as
for every answer; once pywsgi asks for the second chunk, the head is on the socket, and from then on the generator
writes every chunk itself and never yields again. When it returns, pywsgi writes only the last chunk (0 CRLF CRLF).

Rules:
- One writer at a time, so frames never interleave: the wake writes only to a watcher whose greenlet waits
  (`armed`, true only inside SocketWriter.wait) with nothing left of an earlier frame; the greenlet writes only
  while disarmed.
- The wake's send never blocks. A frame the socket takes whole is done: tallied for the metrics (Metrics.stream_writes,
  added up when the wake's turn ends: WatchHub.after_wake), and the edge's
  busy bound restarted (Stream.wrote; at most once a BUSY_NOTE_SECONDS); if its read was cut at the budget (more
  than MAX_STREAM_BYTES_PER_READ or MAX_EVENTS_PER_READ waiting), the greenlet is woken to write the rest. What
  is left of a frame taken in part (or not at all: a full buffer, or an error) is kept (`pending`: at most one
  frame, as views into the hub's shared frame, not a copy) and the greenlet woken, which writes it with blocking
  sends before anything else. A client that does not read is then cut off by the edge's busy bound as before
  (the sweeper shuts the socket, the write fails, the stream ends); a client gone ends the stream at that write.
- The greenlet's own writes never join a chunk's parts either (SocketWriter._send): a slow reader's stream holds
  no copy of a frame while it waits for room.
- A watcher behind the history (Behind) is woken too: its greenlet reads again, writes the `error` event and ends;
  so is one whose deliver raised (a bug, logged: its read may have moved the position past events it did not
  write), with status 503, so that the client resumes after the last id it received, elsewhere first, with no gap;
  so is every watcher when the hub refuses watches (WatchHub.refuse: removed, or no leader for too long), whose
  greenlet writes the `error` event with the refusal's reason and ends.
- Positions, ids, keep-alives, half-close probes: api's rules, as before; a keep-alive carries an `id:` when the
  position moved past the last index written by either writer (`sent_position`).
- In process (tests call the application directly: no handler), the generator yields every chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import gevent
import gevent.event

from .edge import EOF_PROBE_SECONDS, HALF_CLOSE_PROBES, Stream
from .metrics import Metrics
from .watch import MAX_STREAM_BYTES_PER_READ, Behind, Filter, Watcher, WatchHub, sse_error

KEEPALIVE_SECONDS = 5.0  # a watch stream with nothing to send writes a comment this often (and so finds a dead peer)
# The wake restarts the edge's busy bound (Stream.wrote) at most this often: the bound is many seconds (node.py),
# and a dict's move per frame per watcher cost 6% of a follower at 1,000 x 1,000.
BUSY_NOTE_SECONDS = 1.0


def watch_stream(hub: WatchHub, metrics: Metrics, position: int, wanted: Filter, environ: dict) -> Iterator[bytes]:
    """The chunks of a watch stream from `position` (Bottle hands the generator to pywsgi). Not started, it holds
    nothing: the count, the registration and the connection's Stream begin with the first chunk, which carries the
    position as an `id:` (and the answer's head with it)."""
    handler = environ.get("raftdzmq.handler")  # None in process (tests): no peer to watch, nothing to take over
    metrics.watches_open += 1
    try:
        watcher = hub.watch(position, wanted)
    except Behind as e:  # the history moved between the route's check and the first chunk
        metrics.watches_open -= 1
        metrics.watches_behind.inc("stream")
        yield sse_error(str(e), 410, e.oldest_index)
        return
    stream = None if handler is None else Stream(handler, user_timeout_seconds=2 * KEEPALIVE_SECONDS)
    try:
        yield f": watching after index {position}\nid: {position}\n\n".encode()
        if stream is None:
            yield from _chunks(hub, metrics, watcher, None, _Progress(hub, position))
            return
        writer = SocketWriter(hub, metrics, stream, position)  # pywsgi wrote the head: the socket is this stream's
        hub.after_wake.add(metrics.stream_writes.flush)  # one per Metrics: a set of bound methods
        watcher.deliver = writer.deliver
        try:
            for chunk in _chunks(hub, metrics, watcher, stream, writer):
                writer.write(chunk)
        except OSError:
            pass  # the client went, or the edge cut it off: pywsgi's last chunk fails too, and it closes
    finally:
        hub.unwatch(watcher)
        metrics.watches_open -= 1
        if stream is not None:
            stream.close()


def _chunks(hub: WatchHub, metrics: Metrics, watcher: Watcher, stream: Stream | None,
            progress: _Progress) -> Iterator[bytes]:
    """The chunks after the first, each one written by the time the generator resumes; events the wake wrote
    meanwhile (SocketWriter.deliver) are in `progress`."""
    probes = 0
    while True:
        if stream is not None:
            stream.wrote()
            if stream.gone.is_set():
                return
            if stream.eof.is_set() and probes < HALF_CLOSE_PROBES:
                if probes:
                    gevent.sleep(EOF_PROBE_SECONDS)  # the reset to the first probe comes back meanwhile
                probes += 1
                yield b": are you there\n\n"  # fails once the client closed both ways: the stream ends
                continue
        if hub.refusal is not None:  # removed, or no leader for too long (watch.py's rules): go elsewhere
            metrics.watches_refused.inc("stream")
            yield sse_error(hub.refusal[1], hub.refusal[0])
            return
        if watcher.failed:  # the wake's write raised (a bug, logged): what its read took may not have gone out
            yield sse_error("writing this watch's events failed on this node: resume after the last id received", 503)
            return
        marked_at = watcher.marked_at  # the oldest event's apply, for this read's frame
        try:
            events, frame = hub.next_sse(watcher, max_bytes=MAX_STREAM_BYTES_PER_READ)
        except Behind as e:
            metrics.watches_behind.inc("stream")
            yield sse_error(str(e), 410, e.oldest_index)
            return
        if events:
            metrics.watch_events.inc("stream", len(events))
            yield frame
            progress.written_at = time.monotonic()
            metrics.watch_delivery_seconds.observe(progress.written_at - marked_at)
            progress.sent_position = events[-1][3]
            continue
        remaining = KEEPALIVE_SECONDS - (time.monotonic() - progress.written_at)
        if remaining <= 0:
            if watcher.position != progress.sent_position:
                progress.sent_position = watcher.position
                yield b": keep-alive\nid: %d\n\n" % progress.sent_position
            else:
                yield b": keep-alive\n\n"
            progress.written_at = time.monotonic()
            continue
        # A client's end of file (a half-close, or a close) wakes it too: the probes above tell which, at once.
        progress.wait(watcher, remaining, None if stream is None or stream.eof.is_set() else (stream.gone, stream.eof))


class _Progress:
    """What a stream wrote last (the index of its last event and when), and how it waits: in process, the hub's
    wait (the generator yields every chunk)."""

    def __init__(self, hub: WatchHub, position: int) -> None:
        self.hub = hub
        self.sent_position = position
        self.written_at = time.monotonic()

    def wait(self, watcher: Watcher, seconds: float, also: tuple[gevent.event.Event, ...] | None) -> None:
        self.hub.wait_for(watcher, seconds, also)


class SocketWriter(_Progress):
    """A stream's connection once pywsgi wrote the answer's head: the greenlet's blocking writes (`write`, and
    `wait`'s of a pending rest) and the wake's non-blocking one (`deliver`). The module's rules."""

    def __init__(self, hub: WatchHub, metrics: Metrics, stream: Stream, position: int) -> None:
        super().__init__(hub, position)
        handler = stream.handler
        sock: Any = handler.socket
        self._sendmsg_waiting = sock.sendmsg  # gevent's: waits for room once, then sends what fits (the greenlet's)
        self._sendmsg = getattr(sock, "_sock", sock).sendmsg  # the OS socket's, non-blocking under gevent (the wake's)
        self.chunked = handler.response_use_chunked
        self.metrics, self.stream = metrics, stream
        self.stream_writes = metrics.stream_writes
        self.armed = False  # the greenlet waits: the wake may write
        self.pending: list[memoryview] = []  # the rest of a frame the wake could not write whole: the greenlet's
        self.pending_marked_at = 0.0
        self.busy_noted_at = 0.0  # when the wake last restarted the edge's busy bound

    def framed(self, chunk: bytes) -> tuple[bytes, ...]:
        """The chunk as it goes on the wire: with its chunk-size line and CRLF when the answer is chunked."""
        return (b"%x\r\n" % len(chunk), chunk, b"\r\n") if self.chunked else (chunk,)

    def write(self, chunk: bytes) -> None:
        """The greenlet's write (disarmed: the wake writes nothing meanwhile). Raises OSError when the client went."""
        self._send(self.framed(chunk))

    def _send(self, parts: Sequence[bytes | memoryview]) -> None:
        """The greenlet's blocking send of `parts`, without joining them: a frame is the hub's, shared with every
        watcher that read it, and a stream whose client reads slowly must not hold a copy of it while it waits.
        What the socket does not take at once counts in the node's budget of unsent answers (EdgeServer.hold)
        while it waits; each send that takes bytes says so (EdgeServer.took_bytes: a reader is not stalled)."""
        try:
            sent = self._sendmsg(parts)
        except BlockingIOError:
            sent = 0
        parts = _unsent(parts, sent)
        if not parts:
            return
        server = self.stream.handler.server
        server.hold(self.stream.handler, _objects(parts))
        try:
            while parts:
                sent = self._sendmsg_waiting(parts)
                if sent:
                    server.took_bytes(self.stream.handler)
                    parts = _unsent(parts, sent)
        finally:
            server.release(self.stream.handler)

    def wait(self, watcher: Watcher, seconds: float, also: tuple[gevent.event.Event, ...] | None) -> None:
        """Wait armed (the wake writes the watcher's frames meanwhile), then write what the wake left of a frame."""
        self.armed = True
        try:
            self.hub.wait_for(watcher, seconds, also)
        finally:
            self.armed = False
        if self.pending:
            pending, self.pending = self.pending, []
            self._send(pending)
            self.stream.handler.server.release(self.stream.handler)  # the wake's hold of it (deliver)
            self.written_at = time.monotonic()
            self.metrics.watch_delivery_seconds.observe(self.written_at - self.pending_marked_at)

    def deliver(self, watcher: Watcher, now: float) -> bool:
        """Write the watcher's next frame from the wake, without blocking (WatchHub._wake_some calls it in place of
        waking the greenlet; `now`: its clock read): True when nothing is left to do, False to wake the greenlet
        (not armed, Behind, a frame the socket did not take whole, or a read cut at its budget: more events wait,
        and no later event would queue the watcher again while its first_match stays set -- review of fanout2,
        finding 1). The frame's parts and their length come made with the shared read (WatchHub.next_chunk); the
        metrics are tallied (Metrics.stream_writes, added up at the end of the wake's turn)."""
        if not self.armed:
            return False
        marked_at = watcher.marked_at
        try:
            if self.chunked:
                events, parts, length = self.hub.next_chunk(watcher, max_bytes=MAX_STREAM_BYTES_PER_READ)
            else:
                events, frame = self.hub.next_sse(watcher, max_bytes=MAX_STREAM_BYTES_PER_READ)
                parts, length = (frame,), len(frame)
        except Behind:
            return False  # its greenlet reads again and ends the stream with the error event
        if not events:
            return True  # nothing matched after all (its position moved: the next keep-alive gives it)
        gone = False
        try:
            sent = self._sendmsg(parts)
        except OSError as e:  # a full buffer (EAGAIN), or the client went: the greenlet's blocking write tells which
            sent, gone = 0, not isinstance(e, BlockingIOError)
        self.sent_position = events[-1][3]
        if sent == length:
            self.stream_writes.add(len(events), now - marked_at)
            self.written_at = now
            if now - self.busy_noted_at >= BUSY_NOTE_SECONDS:
                self.busy_noted_at = now
                self.stream.wrote()
            return watcher.first_match is None  # a read cut at its budget: the greenlet writes the rest at once
        self.metrics.watch_events.inc("stream", len(events))
        self.pending = _unsent(parts, sent)
        if not gone:  # a slow reader (may cut another); one gone, or cut already, would count as the newest
            self.stream.handler.server.hold(self.stream.handler, _objects(self.pending))
        self.pending_marked_at = marked_at
        self.armed = False
        return False


def _objects(views: Sequence[bytes | memoryview]) -> list:
    """The objects (frames, chunk lines) that `views` keep alive: what a stream holds while they wait."""
    return [view.obj if isinstance(view, memoryview) else view for view in views]


def _unsent(parts: Sequence[bytes | memoryview], sent: int) -> list[memoryview]:
    """What a send of `parts` that took `sent` bytes left: views into them, not a copy. The frame is the hub's,
    shared by every watcher that read it, so a thousand streams that stopped reading hold one frame between them,
    not a copy each (review of fanout2, finding 2)."""
    rest: list[memoryview] = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
        else:
            rest.append(memoryview(part)[sent:])
            sent = 0
    return rest
