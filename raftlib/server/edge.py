"""The HTTP edge: gevent's WSGI server with strict request framing, limits on every request and connection, and a
bound on the HTTP work one turn of the event loop may start.

gevent.pywsgi's own request parsing is replaced here (EdgeHandler.handle_one_request): it treated end-of-file as
the end of the headers, let a second Content-Length or a Transfer-Encoding other than chunked through, had no cap
on the header block and no read timeout, and drained any claimed body after an answer. The rules (EdgeHandler's
docstring) follow RFC 9112's list of what a server must refuse (§2.2, §3, §5, §6.1, §6.3, §7.1, §11.2).

Rules:
- No route runs until a whole request, head and body, has arrived and parsed cleanly; what cannot be framed is
  answered 4xx/5xx with a one-line reason and the connection closed.
- Every wait is bounded: for a request (-idle-timeout), for the rest of one (-receive-timeout, 408), for a whole
  request's life (EdgeServer's sweeper), for the client to take a refusal (a second).
- At most -max-connections connections; when full, the one that has waited or received longest goes.
- Answers held for clients slow to take them count in one budget a node (-max-unsent-bytes, EdgeServer.hold);
  past it the clients not reading are cut, the longest stalled first, the clients sharing an answer as one, and
  readers only after them.
- One turn of the event loop starts at most about TURN_BUDGET_SECONDS of HTTP work (TurnGate), so Raft's timers
  keep their pace however many connections have a request ready.
- The parsing runs for every request, so it stays lean: bytes are checked with bytes.translate, and the WSGI
  environ is built in the same pass.
- A request whose Host names no host this node answers to (EdgeServer's `host_refusal`: raftlib.server.hosts,
  against DNS rebinding) is refused 403 with its reason, before its body is read and before any route. Two Host
  lines, a Host that is not a host and an optional port (hosts.malformed_host), and an HTTP/1.1 request without
  Host are refused 400 (RFC 9112 §3.2), with or without `host_refusal`; an HTTP/1.0 request may leave Host out, and
  so may a health check (HOSTLESS_PROBES: GET or HEAD of exactly /livez or /readyz, no body): HAProxy's old
  `option httpchk GET /readyz HTTP/1.1` sends none (second review of rebind, F2). A browser always sends Host, so
  a rebound page gains nothing from it.
- A streaming answer (GET /watch: an iterable of chunks, sent with chunked encoding as each is yielded) holds
  its connection through a Stream: each chunk written restarts its whole-life bound, which then bounds one
  write the client does not take (-idle-timeout and the routes' bounds); the client closing its end (or sending
  anything) ends the stream at once; the connection closes after it.
- Importing this module patches nothing: the command monkey-patches before it imports it.
- A refusal here runs nothing, so a write's (WRITE_METHODS) says `X-Raft-Outcome: not-applied`
  (raftlib.server.routes_shared's rules): it may be sent again. A read's says nothing, nor does one refused before its
  request line was read (its method unknown; a 4xx all the same, which the README counts as not applied).
- No access log unless asked for (-v): then AccessLogHandler writes one line per request answered, refusals
  included, at INFO on `raftdzmq.access` (its docstring gives the format); without it nothing is formatted per
  request. No secret is logged: no header, and `prev_value`'s value is redacted.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import heapq
import io
import logging
import math
import re
import resource
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import gevent
import gevent.event
import gevent.hub
import gevent.pool
import gevent.pywsgi
import gevent.socket

from .hosts import malformed_host

log = logging.getLogger("raftdzmq.edge")
access_log = logging.getLogger("raftdzmq.access")


WRITE_METHODS = frozenset(("POST", "PUT", "DELETE", "PATCH"))  # whose failed answers carry X-Raft-Outcome
# HTTP/1.1 requests served without Host: health checks as load balancers send them (method, exact target; no body)
HOSTLESS_PROBES = frozenset((method, target) for method in (b"GET", b"HEAD") for target in (b"/livez", b"/readyz"))
MAX_REQUEST_LINE_BYTES = 16384  # a 4,096-byte key percent-encoded, and a query
MAX_FIELD_LINE_BYTES = 8192
MAX_HEADER_FIELDS = 100
MAX_CHUNK_LINE_BYTES = 1024
# Chunks in one request body: each costs a few microseconds of Python (its size line parsed, its data read), so a
# body of 2-byte chunks within -max-body took 2.6 s of loop time (review edge Q1). A client sends chunks as it
# writes, pieces of a buffer or lines: 8,192 chunks are a 1 MiB body in pieces of 128 bytes.
MAX_BODY_CHUNKS = 8192
TURN_BUDGET_SECONDS = 0.005  # HTTP work one turn of the event loop may start (TurnGate)
# Bytes of answers a node holds for clients that do not take them yet (-max-unsent-bytes: EdgeServer.hold); past
# it the clients not reading are cut, the longest stalled first (those sharing an answer as one). A quarter of a
# 1 GB machine: 30 transaction answers at their 8 MiB bound, or 40 frames of a 1 MiB write of control bytes (6 MB
# as JSON).
DEFAULT_MAX_UNSENT_BYTES = 256 << 20
# An object this big or bigger held by several makes them one candidate of the budget's cuts, and a candidate whose
# cut frees less is none (EdgeServer.hold): a watch stream's own chunk-size line, the constant pieces of JSON that
# many answers hold, are not worth a cut, and link no one.
MIN_FREED_BYTES = 4096
# A holder has taken bytes (EdgeServer.hold) when the kernel's queue of bytes not yet sent to it shrank by this much
# since the last look: its receive window opened, so its client read. Less may be the peer's stack tidying a full
# receive buffer of a client that reads nothing; a reader of a big answer opens its window an MSS or more at a time.
PROGRESS_BYTES = 16384
# A connection that took bytes of a held answer within this many seconds is reading (EdgeServer.hold: cut after
# every holder not reading). On loopback a client reading 1 MB/s (64 KiB every 60 ms) was seen taking bytes every
# 0.1 s, 256 KB/s every 0.45 s; one that took none for this long ranks with the non-readers, by how long, so a
# client that read once and stopped does not shield itself behind the rank of readers.
READER_SECONDS = 2.0
SIOCOUTQNSD = 0x894B  # Linux (linux/sockios.h): bytes in a TCP socket's send queue not yet sent
ONE_SEND_BODY_BYTES = 16384  # an answer's first piece (its body, a stream's first chunk) up to this size goes with the head (EdgeHandler)
# Descriptors kept for all but HTTP: a few dozen for stdio, the hub, the listeners, the log, zmq's own (a mailbox per socket);
# two per peer (its REQ socket); and the Raft port's inbound connections (at most 32 kept: transport.py).
FD_RESERVE = 100
_TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # RFC 9110 §5.6.2
_FIELD_VALUE_CHARS = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))  # HTAB, SP, VCHAR, obs-text
_TARGET_CHARS = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))  # no space, no control character
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 413: "Content Too Large",
            414: "URI Too Long", 431: "Request Header Fields Too Large", 501: "Not Implemented",
            505: "HTTP Version Not Supported"}


def _field_line(line: bytes) -> tuple[bytes, bytes]:
    """A header or trailer field line (without its CRLF) checked (RFC 9112 §5, RFC 9110 §5.5): a token name, a colon
    with no space before it, a value of visible characters, spaces and tabs (obs-text allowed), no control
    character and no lone CR. Returns (name, value without the spaces around it); raises HttpError 400."""
    name, colon, value = line.partition(b":")
    if not colon or not name or name.translate(None, _TCHARS):
        raise HttpError(400, "malformed field line (no colon, a space before the colon, or a folded line)")
    value = value.strip(b" \t")
    if value.translate(None, _FIELD_VALUE_CHARS):
        raise HttpError(400, "a control character in a field value")
    return name, value


class HttpError(Exception):
    """A request refused before any route runs: answered with `status` and a one-line reason, and the connection
    closed, since what follows it on the connection cannot be framed reliably (RFC 9112 §6.3, §11.2)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class _ReceiveTimeout(Exception):
    """Raised (by a gevent.Timeout) in a handler whose client took longer than -receive-timeout to send a request."""


BOTTLE_HEADERS_KEY = "bottle.request.headers"  # where bottle.BaseRequest.headers keeps its WSGIHeaderDict


class _Body(io.BytesIO):
    """The request body, read whole before the route runs, as wsgi.input."""

    def _discard(self) -> None:  # pywsgi calls this after each response to skip what the route left unread
        pass


def _request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """The request line checked (RFC 9112 §3): (method, target, version); raises HttpError 400, 501 or 505."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line: want METHOD SP TARGET SP HTTP/1.1")
    method, target, version = parts
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):  # well formed, another version
            raise HttpError(505, f"HTTP version {version.decode('latin-1')!r} is not supported; use HTTP/1.1")
        raise HttpError(400, "malformed request line: want METHOD SP TARGET SP HTTP/1.1")
    if not method or method.translate(None, _TCHARS):
        raise HttpError(400, "malformed request method")
    if method != method.upper():  # Bottle would upper-case it: `post` ran as a write past a filter of GET only
        raise HttpError(501, "request method not implemented: methods are case-sensitive (RFC 9110 §9.1): "
                        "send GET, HEAD, POST, PUT, DELETE or OPTIONS")
    if target[:1] != b"/" or target.translate(None, _TARGET_CHARS):
        raise HttpError(400, "malformed request target: want a path starting with / and no control characters")
    return method, target, version


def _fields(env: dict, lines: list[bytes]) -> tuple[int | None, bytes | None, bytes | None, bytes | None]:
    """The header fields after the request line, checked, into `env` as HTTP_* (repeated ones joined with
    commas); returns the values framing depends on: (Content-Length, Transfer-Encoding, Expect, Connection)."""
    length = te = expect = connection = None
    for line in lines[1:]:
        name, value = _field_line(line)
        name = name.upper()
        if name == b"CONTENT-LENGTH":
            if not value.isdigit() or len(value) > 18:
                raise HttpError(400, "Content-Length must be plain digits")
            if length is not None and int(value) != length:
                raise HttpError(400, "two different Content-Length values")
            length = int(value)
            continue
        if name == b"TRANSFER-ENCODING":
            if te is not None:
                raise HttpError(501, "only one transfer coding is supported: chunked")
            te = value
            continue
        if name == b"CONTENT-TYPE":
            env["CONTENT_TYPE"] = value.decode("latin-1")
            continue
        if name == b"CONNECTION":
            connection = value.lower()
        elif name == b"EXPECT":
            expect = value.lower()
        if b"_" in name:
            continue  # X_A and X-A both read as HTTP_X_A: one could pass for the other (pywsgi drops them too)
        key = "HTTP_" + name.replace(b"-", b"_").decode("latin-1")
        text_value = value.decode("latin-1")
        if key in env:
            if key == "HTTP_HOST":  # joined, "a,b" would be judged as one value (RFC 9112 §3.2: 400)
                raise HttpError(400, "two Host header fields")
            env[key] = env[key] + "," + text_value
        else:
            env[key] = text_value
    return length, te, expect, connection


def _chunked(version: bytes, length: int | None, te: bytes | None, max_body_bytes: int) -> bool:
    """Whether the body is chunked (RFC 9112 §6.1, §6.3): Transfer-Encoding exactly `chunked` (501 for another
    coding), never with Content-Length nor in HTTP/1.0 (400); a declared length over the limit is 413 at once."""
    if te is None:
        if length is not None and length > max_body_bytes:
            raise HttpError(413, f"body of {length} bytes is over the {max_body_bytes} byte limit")
        return False
    if version == b"HTTP/1.0":
        raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
    if te.lower() != b"chunked":
        raise HttpError(501, f"transfer coding {te.decode('latin-1')!r} is not supported: only chunked")
    if length is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    return True


class EdgeHandler(gevent.pywsgi.WSGIHandler):
    """One HTTP connection: a keep-alive loop of strictly framed requests.

    Rules:
    - No route runs until the whole request, head and body, has arrived and parsed cleanly. End-of-file before the
      blank line closes the connection and runs nothing; a body cut short, a malformed or oversized head or
      ambiguous framing is answered 4xx/5xx with a one-line reason, and the connection is closed.
    - The request line ends in CRLF (a bare LF is refused), has exactly three parts, HTTP/1.1 or HTTP/1.0 (505
      otherwise), a target in origin form; at most 16 KiB (414). Header fields: token names, no space before the
      colon and no obs-fold (400), no control characters in values; a field line at most 8 KiB, at most 100
      fields, and the whole head at most -max-header-bytes (431). Empty lines before a request line are skipped
      (RFC 9112 §2.2), within the same budget. The path, percent-decoded, must be UTF-8 (400): Bottle would drop the
      bytes that are not, and name another key. Host (RFC 9112 §3.2): at most one line, a host and an optional
      port (400 otherwise), required in HTTP/1.1 (400) but by a health check (HOSTLESS_PROBES); then EdgeServer's
      `host_refusal` judges it (403).
    - A body is framed by Content-Length (plain digits; duplicates must agree) or by Transfer-Encoding that is
      exactly `chunked`, never both (400); any other coding gets 501. A declared length over -max-body gets 413
      before a byte of the body is read; a chunked body is cut off at the limit the same way, or at its
      MAX_BODY_CHUNKS + 1st chunk.
    - Waits are bounded: a connection waits at most -idle-timeout for a request's first byte (EdgeServer closes
      it); from that byte, the rest of the request must come within -receive-timeout (408), and a request that is
      already whole in the buffer (nearly every one under load) starts no timer; a request's life as a whole, its
      answer included, is bounded by EdgeServer too.
    - An answer that closes the connection half-closes it and reads what the client still sends for up to a
      second (at most 1 MiB), so the answer is not lost to a reset; a claimed body is never drained beyond that.
    - Each request, once its first byte is there, passes EdgeServer.gate (TurnGate) before anything else: a turn of
      the event loop starts at most about 5 ms of requests, so timers keep their pace however many connections
      are ready (a sleep every few requests would bound nothing once every connection is ready).
    """

    took_bytes_at: float | None = None  # when its client last took bytes of a held answer (EdgeServer.hold)

    def handle(self):
        """pywsgi's loop over the connection's requests; once it ends (closed by either side, timed out, evicted,
        an error), the handler and its last request's environ let go of each other (`raftdzmq.handler`, for a
        streaming answer): else a cycle a connection, the last body in it, left to the collector (and kept frozen
        until a sweep by tuning.FreezeSurvivors when the connection outlived a full collection). Both links are
        cut: Bottle's `request` may still hold that environ until its next request."""
        try:
            super().handle()
        finally:
            self.server.release(self)
            environ = self.__dict__.pop("environ", None)  # as pywsgi's own handle drops its socket and rfile
            if environ is not None:
                environ.pop("raftdzmq.handler", None)

    def handle_one_request(self):
        if self.rfile.closed:
            return None
        server = self.server
        server.idle[self] = time.monotonic()  # closed when idle too long, or evicted first when the server is full
        try:
            buffered = self.rfile.peek(1)
        except OSError:  # a reset, or closed by EdgeServer
            return None
        finally:
            server.idle.pop(self, None)
        if not buffered:
            return None
        if server.gate.enter():  # it waited for a later turn of the loop: what came meanwhile counts too
            buffered = self.rfile.peek(1)
        server.busy[self] = server.receiving[self] = time.monotonic()
        try:
            return self._handle_request(buffered)
        finally:
            server.receiving.pop(self, None)
            server.busy.pop(self, None)
            server.release(self)  # what its answer held (a transaction's made, then sent whole) counts no more

    def _handle_request(self, buffered: bytes):
        server = self.server
        timer = refusal = None
        self.command = self.path = None  # not the last request's on this connection: a refusal depends on them
        try:
            head_end = buffered.find(b"\r\n\r\n")
            if head_end <= 0 or buffered[0] in b"\r\n":
                timer = gevent.Timeout.start_new(server.receive_timeout_seconds, _ReceiveTimeout)
            lines = self._read_head()
            if lines is None:
                return None  # end of file before the blank line: nothing runs
            length, chunked, expect = self._parse_head(lines)
            if length or chunked:
                if timer is None and (chunked or len(buffered) - head_end - 4 < length):
                    timer = gevent.Timeout.start_new(server.receive_timeout_seconds, _ReceiveTimeout)
                body = self._read_body(length, chunked, expect)
            else:
                body = b""
        except HttpError as e:
            refusal = e.status, e.reason
        except _ReceiveTimeout:
            refusal = 408, f"request not received within {server.receive_timeout_seconds:g}s"
        except OSError:  # a reset, or closed by EdgeServer: nothing to answer
            return None
        finally:
            if timer is not None:
                timer.close()
        server.receiving.pop(self, None)  # whole: no longer the first to go when the server is full
        if refusal is not None:
            return self._refuse(*refusal)  # after the timer is closed: it must not fire in the answer
        environ = self.environ
        environ["raftdzmq.body"] = body
        environ["raftdzmq.handler"] = self  # for a streaming answer (Stream)
        self.wsgi_input = environ["wsgi.input"] = _Body(body)
        self.application = server.application
        self.handle_one_response()
        # Bottle caches request.headers (get_header: none of the API's routes since routes_shared.own_header reads
        # their headers from the environ; any route that does) in the environ as a WSGIHeaderDict that holds the
        # environ: a cycle a request, the body with it, left to the collector (and promoted to the oldest generation
        # when a young collection found it in flight). Cut once answered.
        environ.pop(BOTTLE_HEADERS_KEY, None)
        if self.close_connection or self.rfile.closed:
            return None
        return True

    def _read_head(self) -> list[bytes] | None:
        """The request line and field lines without their CRLFs, or None at end of file before the blank line."""
        readline = self.rfile.readline
        budget = self.server.max_header_bytes
        lines: list[bytes] = []
        while True:
            cap = MAX_FIELD_LINE_BYTES if lines else MAX_REQUEST_LINE_BYTES
            limit = min(cap, budget)
            line = readline(limit + 1)
            if len(line) > limit:
                if limit < cap:
                    raise HttpError(431, f"request head over the {self.server.max_header_bytes} byte limit")
                if lines:
                    raise HttpError(431, f"a header field line over {cap} bytes")
                raise HttpError(414, f"request line over {cap} bytes")
            if line[-1:] != b"\n":
                return None
            if line[-2:-1] != b"\r":
                raise HttpError(400, "a line ends in a bare LF; HTTP lines end in CRLF")
            budget -= len(line)
            if len(line) == 2:
                if lines:
                    return lines
                continue
            lines.append(line[:-2])
            if len(lines) > MAX_HEADER_FIELDS + 1:
                raise HttpError(431, f"over {MAX_HEADER_FIELDS} header fields")

    def _parse_head(self, lines: list[bytes]) -> tuple[int, bool, bytes | None]:
        """Check the head and build the WSGI environ; returns (Content-Length or 0, chunked, Expect value)."""
        method, target, version = _request_line(lines[0])
        # Known from here: a refusal of a write says so, and the access log names them (_refuse).
        self.command, self.path = method.decode("latin-1"), target.decode("latin-1")
        server = self.server
        env = server.get_environ()
        length, te, expect, connection = _fields(env, lines)
        chunked = _chunked(version, length, te, server.max_body_bytes)
        tokens = () if connection is None else [token.strip() for token in connection.split(b",")]
        self.close_connection = b"close" in tokens if version == b"HTTP/1.1" else b"keep-alive" not in tokens
        text_target = target.decode("latin-1")
        path, _, query = text_target.partition("?")
        env["REQUEST_METHOD"] = self.command
        self.path = env["REQUEST_URI"] = text_target
        self.request_version = env["SERVER_PROTOCOL"] = version.decode("latin-1")
        self.requestline = lines[0].decode("latin-1")
        env["SCRIPT_NAME"] = ""
        path = env["PATH_INFO"] = gevent.pywsgi.unquote_latin1(path)
        if not path.isascii():
            # Bottle decodes the path from UTF-8 with errors ignored: /db/k%E9x would name the key "kx".
            try:
                path.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise HttpError(400, "the request path is not UTF-8 once percent-decoded") from None
        env["QUERY_STRING"] = query
        if length is not None:
            env["CONTENT_LENGTH"] = str(length)
        address = self.client_address
        if isinstance(address, tuple):
            env["REMOTE_ADDR"], env["REMOTE_PORT"] = str(address[0]), str(address[1])
        env["wsgi.input_terminated"] = True
        self.environ = env
        host = env.get("HTTP_HOST")
        if host is None:
            if version == b"HTTP/1.1" and ((method, target) not in HOSTLESS_PROBES or length or chunked):
                raise HttpError(400, "an HTTP/1.1 request must give Host (RFC 9112 section 3.2)")
        elif (malformed := malformed_host(host)) is not None:
            raise HttpError(400, malformed)
        if server.host_refusal is not None:
            reason = server.host_refusal(host)
            if reason is not None:
                raise HttpError(403, reason)
        return length or 0, chunked, expect

    def _read_body(self, length: int, chunked: bool, expect: bytes | None) -> bytes:
        if expect == b"100-continue" and self.request_version == "HTTP/1.1":
            self.socket.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked:
            body = self._read_chunked()
            self.environ["CONTENT_LENGTH"] = str(len(body))
            return body
        body = self.rfile.read(length)
        if len(body) != length:
            raise HttpError(400, f"request body cut short: {len(body)} of {length} bytes")
        return body

    def _read_chunked(self) -> bytes:
        """A chunked body (RFC 9112 §7.1): hex sizes only (no sign, prefix or underscore), every chunk followed by
        CRLF, extensions and trailer fields read and dropped within the line and head limits. A size line, its
        extensions included, holds no control character or lone CR (§7.1.1), and each trailer line is a well-formed
        field line (§7.1.2), as a header's must be. At most MAX_BODY_CHUNKS chunks (413), read into one buffer: an
        object a chunk cost about 48 bytes each, 25 MiB for a body of tiny chunks (review edge Q1)."""
        rfile, limit = self.rfile, self.server.max_body_bytes
        body, chunks = bytearray(), 0
        while True:
            line = rfile.readline(MAX_CHUNK_LINE_BYTES + 1)
            if line[-2:] != b"\r\n":
                if len(line) > MAX_CHUNK_LINE_BYTES:
                    raise HttpError(400, f"a chunk size line over {MAX_CHUNK_LINE_BYTES} bytes")
                raise HttpError(400, "a chunk size line ends in a bare LF" if line[-1:] == b"\n" else
                                "request body cut short (chunked)")
            if line.translate(None, _FIELD_VALUE_CHARS) != b"\r\n":
                raise HttpError(400, "a control character (or a lone CR) in a chunk size line or its extensions")
            size_text = line[:-2].split(b";", 1)[0].rstrip(b" \t")
            if not size_text or len(size_text) > 16 or size_text.translate(None, _HEX_DIGITS):
                raise HttpError(400, "malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise HttpError(413, f"chunked body over the {limit} byte limit")
            chunks += 1
            if chunks > MAX_BODY_CHUNKS:
                raise HttpError(413, f"chunked body of over {MAX_BODY_CHUNKS} chunks; send larger chunks")
            data = rfile.read(size + 2)
            if len(data) != size + 2:
                raise HttpError(400, "request body cut short (chunked)")
            if data[-2:] != b"\r\n":
                raise HttpError(400, "chunk data longer than its size, or not followed by CRLF")
            body += data
            del body[-2:]
            if chunks % 256 == 0:
                gevent.sleep(0.00001)  # many tiny chunks already buffered never block: let timers run
        budget = self.server.max_header_bytes
        while True:  # the trailer section: field lines until an empty one
            line = rfile.readline(min(budget, MAX_FIELD_LINE_BYTES) + 1)
            if len(line) > min(budget, MAX_FIELD_LINE_BYTES):
                raise HttpError(431, "chunked trailer fields over the limit")
            if line[-2:] != b"\r\n":
                raise HttpError(400, "request body cut short (chunked)" if line[-1:] != b"\n" else
                                "a trailer line ends in a bare LF")
            if line == b"\r\n":
                return bytes(body)
            _field_line(line[:-2])  # a trailer field is a field line like any in the head (RFC 9112 §7.1.2)
            budget -= len(line)

    def _refuse(self, status: int, reason: str):
        """Answer `status` with a one-line reason, then close (see the class docstring); returns None for
        pywsgi's loop, which then closes the socket."""
        self.close_connection = True
        self.server.note_refusal(self.client_address, status, reason)
        body = reason.encode("ascii", "backslashreplace") + b"\n"
        outcome = b"X-Raft-Outcome: not-applied\r\n" if self.command in WRITE_METHODS else b""
        answer = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                  b"%sConnection: close\r\n\r\n%s" % (status, _REASONS[status].encode(), len(body), outcome, body))
        sock = self.socket
        self.log_refusal(status, len(body))
        draining = self.server.draining
        try:
            sock.sendall(answer)
            sock.shutdown(socket.SHUT_WR)
            # Answered: only a courtesy is left, so the first to go when the pool is full (else a flood of refused
            # connections held open filled the pool with drains nothing could evict: review edge L4).
            draining[self] = time.monotonic()
            with gevent.Timeout(1.0, False):
                budget = 1 << 20
                while budget > 0:
                    data = sock.recv(65536)
                    if not data:
                        break
                    budget -= len(data)
        except OSError:
            pass
        finally:
            draining.pop(self, None)
        return None

    provided_date: Any  # pywsgi's: whether the route gave a Date header (None: not yet looked)
    status: Any  # pywsgi's: the status line's bytes, or (as pywsgi sets it too) the text of a socket error
    code: Any  # pywsgi's: the status code, negated after a socket error
    _date = (0, b"")  # (second, its Date header): pywsgi would format one per response, on every write's path

    def log_request(self):  # no access log: formatting a line per request is a cost on every write's path
        pass

    def log_refusal(self, status: int, body_bytes: int) -> None:  # the same for the edge's own refusals
        pass

    def finalize_headers(self):
        if self.provided_date is None:
            now = int(time.time())
            if EdgeHandler._date[0] != now:
                EdgeHandler._date = (now, gevent.pywsgi.format_date_time(now))
            self.response_headers.append((b"Date", EdgeHandler._date[1]))
            self.provided_date = True
        super().finalize_headers()

    def _write_with_headers(self, data):
        """pywsgi's, but with a body of up to ONE_SEND_BODY_BYTES in the same send as the head: pywsgi sends the
        head, then the body, two syscalls and (TCP_NODELAY) two segments, each waking the client. A write's empty
        200 was one send; a transaction's or a read's answer was two: at 64 clients the second send was ~35 us of
        the leader's time a txn (docs/BENCHMARKS.md). This is called with the answer's first piece, so a chunked
        answer (a watch stream: its first frame) has its first chunk, if up to ONE_SEND_BODY_BYTES, framed and sent
        with the head too (the same bytes as pywsgi's, in one segment); its later chunks go as pywsgi sends them. An
        empty first piece, or a larger one, goes as pywsgi sends it: the head alone, then the piece.

        A copy of gevent 26.9.0's pywsgi.WSGIHandler._write_with_headers and _write (chunk framing), relying on
        its `headers_sent`, `response_use_chunked`, `status`, `response_headers` and `_sendall` (gevent is pinned
        >=26.9,<27 in pyproject.toml): check it against a new gevent's. tests/test_edge.py has it on a real node
        (HEAD, pipelined keep-alive requests, a body past the bound, a watch stream)."""
        if not data or len(data) > ONE_SEND_BODY_BYTES:
            super()._write_with_headers(data)
            return
        self.headers_sent = True
        self.finalize_headers()  # decides response_use_chunked
        if self.response_use_chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        towrite = bytearray(b"HTTP/1.1 ")
        towrite += self.status
        towrite += b"\r\n"
        for header, value in self.response_headers:
            towrite += header
            towrite += b": "
            towrite += value
            towrite += b"\r\n"
        towrite += b"\r\n"
        towrite += data
        self._sendall(towrite)

    def _sendall(self, data):
        """pywsgi's, with one plain send first. gevent's sendall asks the kernel for the socket's send buffer on
        every call (a getsockopt syscall: one of the three a write's answer cost, with its recv and its send) and
        walks a memoryview through two more layers; an answer of a few hundred bytes fits the socket's buffer,
        so the one send takes it whole. That send is the OS socket's, which never waits: gevent's waited for room
        when the socket was full (a client that had not taken the last answer), the answer not counted in the
        node's budget meanwhile (review ef). What it did not take is sent by _send_held. pywsgi's status, code and
        response_length kept."""
        sock: Any = self.socket
        try:
            try:
                sent = getattr(sock, "_sock", sock).send(data)  # the OS socket's: never waits (review ef)
            except BlockingIOError:  # full: a client that has not taken the last answer yet
                sent = 0
            if sent < len(data):  # a client slower than its answer: the answer counts in the node's budget meanwhile
                self._send_held(data, sent)
        except OSError as ex:
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

    def _send_held(self, data, sent: int) -> None:
        """The rest of `data` after `sent` bytes, held in the node's budget (EdgeServer.hold) until sent: gevent's
        send waits for room, then sends what fits; each send that took bytes tells the budget this client is taking
        its answer (EdgeServer.took_bytes). The handler's socket has no timeout: a client that stops reading is cut
        by the sweeper or the budget, which ends the wait with an error."""
        server = self.server
        server.hold(self, (data,))
        try:
            rest = memoryview(data)[sent:]
            send = self.socket.send
            while rest:
                sent = send(rest)
                if sent:
                    server.took_bytes(self)
                    rest = rest[sent:]
        finally:
            server.release(self)


class Stream:
    """What a watch (a stream, or a long poll while it waits) needs of its connection (the module's rules).

    - `gone` is set when the client sends bytes where none are expected (a watch is the connection's last
      answer: a request pipelined behind it is never answered), bytes read into the handler's buffer with the
      watch's request (sent with it) too, or, after its end of file, when writes fail. An end of file alone is not "gone": a client may half-close (SHUT_WR) after its
      request and still read; `eof` is set instead, and the stream probes (HALF_CLOSE_PROBES comments, written at
      once, EOF_PROBE_SECONDS apart): a client that closed both ways answers the first with a reset, and the
      next write fails, which ends the stream.
    - `wrote()` after each chunk: the sweeper's busy bound then counts from the last chunk written, so it cuts off
      only a client that stopped taking the stream (a write that cannot complete within the bound: the unread
      bytes are at most the socket's send buffer and one chunk).
    - TCP_USER_TIMEOUT (Linux) of `user_timeout_seconds`: a peer that stopped acknowledging (gone silent, no
      reset) is dropped by the kernel, and the next write fails.
    - It is in the server's `watching` (oldest first) until `close()`. The server never ends a watch to make
      room in a full pool: watches are capped at half of it (EdgeServer.handle says why)."""

    def __init__(self, handler: EdgeHandler, user_timeout_seconds: float | None = None,
                 last_answer: bool = True) -> None:
        """`last_answer`: a stream; False for a long poll, whose connection may carry on (bytes that come
        meanwhile are its next request, not a sign of anything)."""
        self.handler = handler
        self.last_answer = last_answer
        self.gone = gevent.event.Event()
        self.eof = gevent.event.Event()
        if last_answer:
            handler.close_connection = True  # whatever ends the stream ends the connection
        self._watcher: Any = None  # a libev io watcher on the socket, for reading
        try:
            sock: Any = handler.socket
            fileno = sock.fileno()
            if user_timeout_seconds is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_seconds * 1000))
        except (OSError, AttributeError):
            self.gone.set()
            return
        if last_answer and _already_read(handler):
            self.gone.set()  # no need to watch the socket: the stream ends at its first chunk
            return
        self._watcher = gevent.get_hub().loop.io(fileno, 1)
        self._watcher.start(self._readable)
        handler.server.watching[self] = time.monotonic()

    def _readable(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        try:
            sock: Any = self.handler.socket
            peeked = getattr(sock, "_sock", sock).recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            if self._watcher is not None:
                self._watcher.start(self._readable)
            return
        except OSError:  # a reset
            self.gone.set()
            return
        if peeked:
            if self.last_answer:
                self.gone.set()  # bytes where none are expected
        else:
            self.eof.set()  # a half-close, or a close: a stream's probes tell
            if not self.last_answer:
                self.gone.set()  # a long poll cannot probe: it answers at once with what it has

    def wrote(self) -> None:
        busy = self.handler.server.busy
        if busy.pop(self.handler, None) is not None:  # to the end: the dict is kept oldest first
            busy[self.handler] = time.monotonic()

    def close(self) -> None:
        self.handler.server.watching.pop(self, None)
        self.handler.server.release(self.handler)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


def _already_read(handler: EdgeHandler) -> bool:
    """Whether the handler's rfile holds bytes past the request it is answering: sent in the same segment as the
    request (pipelined), they were read into the buffer with it, and a watcher on the socket never sees them (review
    of fanout2, finding 3: such a request was never answered and did not end the stream). A peek with the socket
    non-blocking for its length: with the buffer empty it reads what the kernel has, and waits for nothing."""
    sock: Any = handler.socket
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return bool(handler.rfile.peek(1))
    except (OSError, ValueError):  # a reset, or a closed file: the socket's watcher or the first write tells
        return False
    finally:
        sock.settimeout(timeout)


HALF_CLOSE_PROBES = 2
EOF_PROBE_SECONDS = 0.2  # a reset comes back within a round trip: localhost or a LAN, well within this


@contextlib.contextmanager
def waiting_on_its_own(environ: dict) -> Iterator[None]:
    """For a route whose wait has a bound of its own, longer than the routes' (a long poll: up to a minute): the
    sweeper's busy bound is off while it waits and counts again from the end of the wait, so it still cuts off a
    client that does not take the answer. A no-op outside the edge (tests call the app directly)."""
    handler = environ.get("raftdzmq.handler")
    if handler is None:
        yield
        return
    busy = handler.server.busy
    held = busy.pop(handler, None) is not None
    try:
        yield
    finally:
        if held:
            busy[handler] = time.monotonic()


def end_connection(environ: dict, reason: str | None = None) -> bool:
    """Shut down the connection of the request `environ` belongs to, as EdgeServer does to evict one: its greenlet's
    wait ends as for a client gone; with a `reason`, counted and logged as the server's evictions are
    (EdgeServer.note_eviction). False outside the edge (tests call the app directly)."""
    handler = environ.get("raftdzmq.handler")
    if handler is None:
        return False
    if reason is not None:
        handler.server.note_eviction(handler, reason)
    handler.server.shut_down(handler)
    return True


class Holding:
    """What one connection holds in the node's budget of unsent answers (EdgeServer.hold): its objects, the bytes of
    them no other connection holds, when its hold began (kept by the connection's next hold until a release, unless
    it was being made: then its latest turn or its send), whether it is an answer being made (not offered to the
    client yet), and the kernel's queue of bytes not yet sent to it at the last look (None: not known). When the
    connection last took bytes is its handler's (`took_bytes_at`): it outlives a hold, and so a backup's next MiB or
    a stream's next frame is a reader's."""

    __slots__ = ("objects", "alone_bytes", "began_at", "making", "queued")

    def __init__(self, objects: tuple | list, began_at: float, making: bool) -> None:
        self.objects = tuple(objects)
        self.alone_bytes = 0
        self.began_at = began_at
        self.making = making
        self.queued: int | None = None


def _rank(handler: EdgeHandler, record: Holding, now: float) -> tuple[int, float]:
    """A holder's place in the order of cuts (EdgeServer.hold; the least goes first): (-1, since) not reading, (0,
    since) a reader, `since` when it last took bytes, or when its hold began if later (EdgeServer._cut ranks alike)."""
    took = handler.took_bytes_at
    if took is None:
        return -1, record.began_at
    if now - took < READER_SECONDS:
        return 0, took
    return -1, max(took, record.began_at)


def _unsent_in_kernel(handler: EdgeHandler) -> int | None:
    """Bytes in the kernel's send queue of `handler`'s socket not yet sent to the client (Linux's SIOCOUTQNSD; they
    leave as its receive window opens, so as it reads); None where not known (another system, a closed socket)."""
    try:
        sock: Any = handler.socket
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        return None


def _look(handler: EdgeHandler, record: Holding, now: float) -> None:
    """Whether `handler`'s client took bytes since the last look (EdgeServer.hold): the kernel's queue of bytes not
    sent to it shrank by PROGRESS_BYTES or more; then it took bytes at `now`."""
    queued = _unsent_in_kernel(handler)
    if queued is None:
        return
    if record.queued is None or queued > record.queued:  # not known, or a send added to it since
        record.queued = queued
    elif record.queued - queued >= PROGRESS_BYTES:
        handler.took_bytes_at, record.queued = now, queued


class AccessLogHandler(EdgeHandler):
    """EdgeHandler with an access log (-v): one line per request answered, the edge's refusals (400, 408, 413,
    431, 501...) included, at INFO on `raftdzmq.access`:

        METHOD TARGET STATUS BODY_BYTES DURATIONms CLIENT

    - TARGET is the path and query as sent, with the value of `prev_value` (a compare-and-set comparand, which
      may be a lock token) logged as `<redacted>`; a backslash is logged as `\\\\` and a byte outside printable
      ASCII as `\\xNN`, so the escaping is unambiguous (control characters never get here: refused with 400).
    - METHOD and TARGET are `-` for a refusal before the request line was read.
    - STATUS is the code sent, suffixed `-undelivered` when the answer could not be delivered (the client went
      away: gevent's pywsgi then negates the code).
    - DURATION: from the request's first byte (a refusal) or its whole arrival (an answer) to the answer sent."""

    def log_request(self):
        duration_ms = (self.time_finish - self.time_start) * 1000 if self.time_finish else -1.0
        # The body's bytes, as the common log format counts them (pywsgi's response_length counts the head too).
        length = next((v.decode("latin-1") if isinstance(v, bytes) else v for k, v in self.response_headers or ()
                       if k.lower() in (b"content-length", "content-length")), "-")
        code = self.code
        status = str(code) if code is None or code >= 0 else f"{-code}-undelivered"
        self._log_line(status, length, duration_ms)

    def log_refusal(self, status: int, body_bytes: int) -> None:
        started = self.server.busy.get(self)
        duration_ms = (time.monotonic() - started) * 1000 if started is not None else -1.0
        self._log_line(str(status), str(body_bytes), duration_ms)

    def _log_line(self, status: str, length: str, duration_ms: float) -> None:
        address = self.client_address
        client = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address or "-")
        target = "-" if self.path is None else loggable_target(self.path)
        access_log.info("%s %s %s %s %.1fms %s", self.command or "-", target, status, length, duration_ms, client)


def loggable_target(target: str) -> str:
    """A request target (latin-1 text of the bytes sent) for the access log: `prev_value`'s value redacted (its
    name compared as Bottle decodes it: `prev%5Fvalue` is the same parameter), a backslash doubled, any byte
    outside printable ASCII as \\xNN."""
    path, question, query = target.partition("?")
    if question and "prev" in query.lower():  # cheap test first: most targets have no such parameter
        fields = []
        for field in query.split("&"):
            name, equals, _ = field.partition("=")
            if equals and urllib.parse.unquote_plus(name) == "prev_value":
                field = f"{name}=<redacted>"
            fields.append(field)
        target = f"{path}?{'&'.join(fields)}"
    return target.replace("\\", "\\\\").encode("latin-1", "replace").decode("ascii", "backslashreplace")


class TurnGate:
    """How much HTTP work one turn of the event loop may do, so that timers (ticks, heartbeats, elections) run
    often enough however many connections have a request ready.

    Why: in one turn, the loop runs every greenlet whose socket became readable, one after the other, and only
    then the timers that expired. With a few hundred keep-alive connections sending requests as fast as answered,
    each turn ran all of them before any timer, long enough for the leader to lose its term; the stall grows with
    the number of connections ready at once, whatever each request costs.

    Rules: a request starts at once while this turn has spent less than `budget_seconds` on requests (measured from
    the first request of the turn; a turn is libev's iteration count) and nobody is waiting. Otherwise it waits,
    first come first served, and a timer callback (run after this turn's I/O, in a later turn's timer phase, with
    the Raft timers) starts the waiting ones, at least one and then while its own budget lasts. So a turn does at
    most about two budgets of HTTP work plus a few microseconds per ready connection to queue it. A request that
    blocks (a write waiting for its commit) does not hold the budget while it waits."""

    def __init__(self, budget_seconds: float) -> None:
        self.budget_seconds = budget_seconds
        self._loop = gevent.get_hub().loop
        self._turn = -1
        self._turn_started = 0.0
        self._waiting: collections.deque = collections.deque()
        self._timer: Any = None  # a libev timer watcher, while requests wait
        self.waited = 0  # requests that waited for a later turn, in all (tests read it: the gate did engage)

    def enter(self) -> bool:
        """Return once this greenlet's request may start; True if it had to wait."""
        if not self._waiting:
            turn = self._loop.iteration
            if turn != self._turn:
                self._turn, self._turn_started = turn, time.perf_counter()
                return False
            if time.perf_counter() - self._turn_started < self.budget_seconds:
                return False
        waiter = gevent.hub.Waiter()
        self._waiting.append(waiter)
        self.waited += 1
        if self._timer is None:
            self._timer = self._loop.timer(0.0)
            self._timer.start(self._admit)
        waiter.get()
        return True

    def _admit(self) -> None:
        """In the hub, a turn later: start waiting requests, each running until it blocks, within the budget.
        At most one timer is ever armed: `_timer` stays set while the requests run, so one that enters again
        meanwhile (its connection's next request, already read) waits for the timer started here at the end, not
        one of its own. (With `_timer` cleared first, that request armed a second timer, and this one's end a third
        over it: the orphan, firing after the queue had emptied, closed `_timer` while it was None and raised.)"""
        self._timer.close()
        started = time.perf_counter()
        self._turn, self._turn_started = self._loop.iteration, started
        waiting = self._waiting
        while waiting:
            waiting.popleft().switch(None)
            if time.perf_counter() - started >= self.budget_seconds:
                break
        if waiting:
            self._timer = self._loop.timer(0.0)
            self._timer.start(self._admit)
        else:
            self._timer = None


class EdgeServer(gevent.pywsgi.WSGIServer):
    """The HTTP server with a connection cap. Rules: at most `max_connections` connections at once (a pool; past it
    the server stops accepting and the kernel's backlog holds the rest, using none of this process's descriptors);
    when the pool fills, a refused connection still draining (answered already) is closed to make room, else the
    connection that has waited longest for its next request, or spent longest receiving one (whichever began
    earlier), so neither idle keep-alive connections, nor clients that send a byte now and then (slowloris), nor
    refused ones held open can lock others out. There is no cap per client
    address: -forward followers and proxies bring many clients from one address, and the eviction order already
    bounds what one slow sender holds. A sweeper closes connections that wait for a request
    longer than `idle_timeout_seconds`, or spend longer than `busy_timeout_seconds` on one request (a client that
    does not read its answer). It does this rather than a socket timeout, which would arm and cancel a timer on
    every wait of every request; closing is a shutdown() of the OS socket, which ends whatever wait its greenlet
    is in."""

    handler_class = EdgeHandler

    def __init__(self, listener, application, *, max_connections: int, idle_timeout_seconds: float,
                 receive_timeout_seconds: float, busy_timeout_seconds: float, max_header_bytes: int,
                 max_body_bytes: int, turn_budget_seconds: float = TURN_BUDGET_SECONDS,
                 on_eviction: Callable[[str], None] | None = None, access_log: bool = False,
                 host_refusal: Callable[[str | None], str | None] | None = None,
                 max_unsent_bytes: int = DEFAULT_MAX_UNSENT_BYTES) -> None:
        """`on_eviction(reason)` hears of every connection the server closes: "full_idle", "full_receiving" or
        "full_draining" (the pool was full), "idle_timeout" or "busy_timeout" (the sweeper), "unsent_budget"
        (`hold`), and any reason given to `end_connection` ("backup_too_slow": routes_ops); the metrics count them.
        `access_log`: a line per request (AccessLogHandler). `host_refusal(Host or None)`: why a request naming that
        Host is refused (403), or None to serve it (raftlib.server.hosts.AllowedHosts.refusal); None: every Host."""
        super().__init__(listener, application, spawn=gevent.pool.Pool(max_connections), log=None, error_log=log)
        if access_log:
            self.handler_class = AccessLogHandler
        self.idle_timeout_seconds = idle_timeout_seconds
        self.receive_timeout_seconds = receive_timeout_seconds
        self.busy_timeout_seconds = busy_timeout_seconds
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.host_refusal = host_refusal
        # Handlers waiting for a request, and handlers in one, each with the time.monotonic() it began: oldest
        # first, since a handler is removed and added again each time.
        self.idle: dict[EdgeHandler, float] = {}
        self.busy: dict[EdgeHandler, float] = {}
        self.receiving: dict[EdgeHandler, float] = {}  # the busy ones whose request has not all arrived yet
        self.draining: dict[EdgeHandler, float] = {}  # the busy ones refused and answered, reading what still comes
        self.watching: dict[Stream, float] = {}  # open watches (streams, long polls), oldest first: evictable
        # Answers held for clients that do not take them (`hold`): each connection's Holding; each object (an
        # answer, a frame) by id, with a reference and the set of connections that hold it: it counts once.
        self.max_unsent_bytes = max_unsent_bytes
        self.unsent_bytes = 0
        self.holding: dict[EdgeHandler, Holding] = {}
        self._held: dict[int, tuple[Any, set[EdgeHandler]]] = {}
        self._shared: dict[int, set[EdgeHandler]] = {}  # of _held, the objects of MIN_FREED_BYTES or more held by several
        self._refusals = RateLimitedLog("refused HTTP requests", log)
        self._accept_failures = RateLimitedLog("failed accepts", log)
        self._evictions = RateLimitedLog("closed connections", log)
        self._on_eviction = on_eviction
        self._accept_pause_seconds = 0.0
        self.gate = TurnGate(turn_budget_seconds)
        self._sweeper: gevent.Greenlet | None = None

    def start(self) -> None:
        super().start()
        self._sweeper = gevent.spawn(self._sweep)

    def stop(self, timeout=None) -> None:
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        super().stop(timeout)

    def do_read(self):
        """Accept one connection. Out of descriptors (EMFILE, ENFILE) or kernel memory, accepting pauses (0.01 s,
        doubling up to 1 s, back to nothing once one succeeds) and says so at most once a second: the connections
        wait in the backlog meanwhile. gevent would log a traceback each time, and retry at once in a busy loop
        for as long as the descriptors stay used up. A connection reset before it was accepted is skipped quietly."""
        try:
            accepted = super().do_read()
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            self._accept_pause_seconds = min(1.0, max(0.01, 2 * self._accept_pause_seconds))
            self._accept_failures.log(logging.WARNING, "cannot accept HTTP connections (%s): pausing accept for %gs",
                                      e.strerror, self._accept_pause_seconds)
            self.stop_accepting()
            self._timer = self.loop.timer(self._accept_pause_seconds)
            self._timer.start(self._start_accepting_if_started)
            return None
        self._accept_pause_seconds = 0.0
        return accepted

    def handle(self, sock, address):
        if self.pool.free_count() == 0 and self.draining:
            # This connection took the last place: make room for the next one. A refused connection's drain goes
            # first: its answer is sent, and the drain only spares it a reset (EdgeHandler._refuse).
            self._evict(self.draining, next(iter(self.draining)), "full_draining")
        elif self.pool.free_count() == 0:
            # This connection took the last place: make room for the next one. Of the one that has waited longest
            # for its next request and the one that has spent longest receiving one (a byte of it is enough to be
            # busy: slowloris), the older goes. Not simply an idle one first: a connection accepted a moment ago
            # is idle until its first bytes arrive, and under slowloris it would be the one closed every time.
            victims = [(next(iter(handlers.values())), handlers) for handlers in (self.idle, self.receiving)
                       if handlers]
            if victims:
                _, handlers = min(victims, key=lambda v: v[0])
                self._evict(handlers, next(iter(handlers)),
                            "full_idle" if handlers is self.idle else "full_receiving")
            # Watches are never ended to make room: they hold at most half the pool (api.max_watches, node.py),
            # so a full pool with none idle or receiving has busy requests, which end within their bounds. Ending
            # a watch for each connection that took the last place ended every watch in a burst of requests
            # (review 2 of watch, item 2).
        self.handler_class(sock, address, self).handle()

    def hold(self, handler: EdgeHandler, objects: tuple | list, making: bool = False) -> None:
        """`handler`'s connection holds `objects` (answers, frames: bytes-like) until `release(handler)`, for a client
        that has not taken them yet (a send that could not finish). Every slow reader's answer counts in one budget
        per node: a transaction's answer, a long poll's body, a stream's frame (review edge, L1, L2, Q2: each held up
        to 24 MB, unbounded in number but by the pool). An object held by several (a poll body or a frame shared by
        the readers of one filter, a value that pipelined GETs send) counts once. Called once a send could not finish
        at once (an answer taken whole costs nothing here), and with `making` at each turn of the loop a transaction's
        answer waits for while it is made (routes_txn). A hold by a connection that holds already (the send of the
        answer made, the wake's frame sent by its greenlet) replaces its objects and keeps its hold's start, unless
        what it held was being made: an answer not offered to its client yet starts again at each turn and at its
        send (its client could not take a byte of it meanwhile). A request lets go of what it held when it ends
        (EdgeHandler); when the connection last took bytes is kept across holds.

        Past `max_unsent_bytes`, candidates are cut (their connections shut: a write fails and the greenlet lets go)
        until the fill is back within it, each connection counted as the eviction "unsent_budget" and logged at most
        once a second (`_cut`). A candidate is a holder with every holder it shares a big object with (MIN_FREED_BYTES
        or more: a long poll's body, a frame, a value), taken as one: cutting it frees all they hold, and it ranks as
        its least stalled member, so one reader among them keeps them all (review bud, L1: before, a holder that shared
        was never cut while another freed bytes alone, so pairs of non-readers shielded each other and every honest
        answer was cut). A candidate that frees less than MIN_FREED_BYTES is not one. The order, first cut first:
        1. not reading: no byte taken since its hold began (a newcomer, a non-reader; an answer being made, as begun
           at its latest turn), or none for READER_SECONDS; the longest stalled first, stalled since the later of its
           hold's start and the last byte it took;
        2. readers: a connection that took bytes of a held answer within READER_SECONDS (of this answer or its last
           one: a backup's next MiB, a stream's next frame), the longest stalled first.
        So fresh non-readers arriving one after another (review bud, L2: churn) are cut before a steady reader, an
        answer being made goes after every non-reader whose answer was offered before its latest turn, and a newcomer
        that has not read goes before any reader (it waits elsewhere). The last candidate is kept whatever
        its size (an answer larger than the budget on its own still reaches a client that reads it: the fill may
        exceed the budget by one candidate's bytes), and once the candidate of this hold's connection is cut, no more
        are. What it does not promise: a newcomer is not reading until its first byte, so when the budget is full of
        answers being made or just offered it may be cut among them (the longest stalled first); a client
        that takes a little every READER_SECONDS is a reader, and keeps its answer as long as the sweeper's bounds
        allow; readers are cut too, longest stalled first, when readers alone fill the budget and one answer among
        them goes over it.
        Progress: a send that took bytes (`took_bytes`, the send paths), or the kernel's queue of bytes not yet sent
        to the client (SIOCOUTQNSD) seen PROGRESS_BYTES shorter than at the last look (its client read, the window
        opened between two of our sends). The kernel is asked at a hold, at each send that took bytes, by the sweeper
        once a period for each holder, and while cutting, once for each candidate about to be cut (a look only makes
        a candidate rank later). A hold within the budget costs O(its objects); one past it O(holders + the holders of
        shared objects) to rank the candidates once, then O(log holders) a cut and a look for each candidate cut or
        put back (review bud, Q1: every holder scanned for each cut before)."""
        before = self.holding.get(handler)
        self.release(handler)
        holding, held = self.holding, self._held
        now = time.monotonic()
        record = Holding(objects, now if before is None or before.making else before.began_at, making)
        for o in objects:
            entry = held.get(id(o))
            if entry is None:
                held[id(o)] = (o, {handler})
                self.unsent_bytes += len(o)
                record.alone_bytes += len(o)
                continue
            holders = entry[1]
            if handler in holders:
                continue  # twice in `objects`
            if len(holders) == 1:
                for sole in holders:  # it holds this one alone no longer
                    holding[sole].alone_bytes -= len(o)
                if len(o) >= MIN_FREED_BYTES:
                    self._shared[id(o)] = holders
            holders.add(handler)
        record.queued = _unsent_in_kernel(handler)
        holding[handler] = record
        if self.unsent_bytes > self.max_unsent_bytes:
            self._cut(handler, now)

    def took_bytes(self, handler: EdgeHandler) -> None:
        """A send to `handler`'s client took bytes of what it holds: it is reading (`hold`)."""
        record = self.holding.get(handler)
        if record is not None:
            handler.took_bytes_at = time.monotonic()
            record.queued = _unsent_in_kernel(handler)

    def release(self, handler: EdgeHandler) -> None:
        """What `handler` held (`hold`) is sent, or its connection ended: it no longer counts."""
        record = self.holding.pop(handler, None)
        if record is None:
            return
        holding, held = self.holding, self._held
        for o in record.objects:
            entry = held.get(id(o))
            if entry is None or handler not in entry[1]:
                continue  # twice in its objects: let go of already
            holders = entry[1]
            holders.discard(handler)
            if not holders:
                del held[id(o)]
                self.unsent_bytes -= len(o)
            elif len(holders) == 1:
                self._shared.pop(id(o), None)
                for sole in holders:  # it holds this one alone now
                    holding[sole].alone_bytes += len(o)

    def _sharing(self) -> list[tuple[list[EdgeHandler], int]]:
        """The holders of shared objects (`_shared`) as `hold`'s candidates: each with those it shares big objects
        with (transitively), and the bytes cutting them all frees. O(the holders of shared objects)."""
        parent: dict[EdgeHandler, EdgeHandler] = {}

        def root(h: EdgeHandler) -> EdgeHandler:
            while (up := parent.get(h, h)) is not h:
                parent[h] = h = parent.get(up, up)
            return h

        for holders in self._shared.values():
            first = None
            for h in holders:
                if first is None:
                    first = root(h)
                elif (r := root(h)) is not first:
                    parent[r] = first
        groups: dict[EdgeHandler, tuple[list[EdgeHandler], list[int]]] = {}
        for oid, holders in self._shared.items():
            for h in holders:
                groups.setdefault(root(h), ([], [0]))[1][0] += len(self._held[oid][0])
                break
        for h in {h for holders in self._shared.values() for h in holders}:
            members, freed = groups[root(h)]
            members.append(h)
            freed[0] += self.holding[h].alone_bytes
        return [(members, freed[0]) for members, freed in groups.values()]

    def _rank(self, members: Iterable[EdgeHandler], now: float) -> tuple[int, float]:
        """A candidate's place in the order of cuts (`hold`; the least goes first): its least stalled member's."""
        holding = self.holding
        return max(_rank(h, holding[h], now) for h in members)

    def _cut(self, newest: EdgeHandler, now: float) -> None:
        """Cut candidates (`hold`'s rules) until the fill is within the budget, or one is left, or `newest`'s went.
        Ranked once (a holder that shares nothing big is a candidate of its own: ranked inline, the common case), then
        taken from a heap; each is looked at (the kernel asked) before it goes, and if that made it rank later than
        the next, put back in its new place."""
        holding = self.holding
        heap: list[tuple[int, float, int, Sequence[EdgeHandler], bool]] = []
        sharing = set()
        if self._shared:
            for i, (members, freed) in enumerate(self._sharing(), start=len(holding)):  # i: each entry's own
                sharing.update(members)
                if freed >= MIN_FREED_BYTES:
                    heap.append((*self._rank(members, now), i, members, False))
        for i, (h, record) in enumerate(holding.items()):
            if record.alone_bytes < MIN_FREED_BYTES or h in sharing:
                continue
            took = h.took_bytes_at
            if took is None:
                heap.append((-1, record.began_at, i, (h,), False))
            elif now - took < READER_SECONDS:
                heap.append((0, took, i, (h,), False))
            else:
                heap.append((-1, took if took > record.began_at else record.began_at, i, (h,), False))
        heapq.heapify(heap)
        while self.unsent_bytes > self.max_unsent_bytes and len(heap) > 1:
            order, since, i, chosen, looked = heapq.heappop(heap)
            if not looked:
                for h in chosen:
                    if h is not newest:  # looked at as its hold began
                        _look(h, holding[h], now)
                key = self._rank(chosen, now)
                if key > heap[0][:2]:
                    heapq.heappush(heap, (*key, i, chosen, True))
                    continue
            for h in chosen:
                self.release(h)
                self._evict(holding, h, "unsent_budget")
            if newest in chosen:
                break

    def _sweep(self) -> None:
        period = min(1.0, self.idle_timeout_seconds / 4)
        while True:
            gevent.sleep(period)
            now = time.monotonic()
            for handler, record in self.holding.items():
                _look(handler, record, now)  # a holder's progress known to within a period (hold)
            for handlers, limit, reason in ((self.idle, self.idle_timeout_seconds, "idle_timeout"),
                                            (self.busy, self.busy_timeout_seconds, "busy_timeout")):
                expired = []
                for handler, since in handlers.items():
                    if now - since < limit:
                        break
                    expired.append(handler)
                for handler in expired:
                    self._evict(handlers, handler, reason)

    def _evict(self, handlers: dict, handler: EdgeHandler, reason: str) -> None:
        """Close a connection the server chose to close: counted, and logged at most once a second."""
        self.note_eviction(handler, reason)
        self._close(handlers, handler)

    def note_eviction(self, handler: EdgeHandler, reason: str) -> None:
        """Count (`on_eviction`) and log (at most a line a second) a connection closed for `reason`."""
        if self._on_eviction is not None:
            self._on_eviction(reason)
        client = handler.client_address
        self._evictions.log(logging.WARNING if reason.startswith(("full", "unsent")) else logging.INFO,
                            "closed the HTTP connection of %s (%s)", client[0] if isinstance(client, tuple) else client,
                            reason.replace("_", " "))

    def _close(self, handlers: dict, handler: EdgeHandler) -> None:
        handlers.pop(handler, None)
        self.shut_down(handler)

    @staticmethod
    def shut_down(handler: EdgeHandler) -> None:
        try:
            # On the OS socket: the kernel then ends the greenlet's wait with end of file or EPIPE, which pywsgi
            # takes as a client gone. gevent's own shutdown() cancels the wait with EBADF, logged as a traceback.
            sock: Any = handler.socket
            getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):  # it closed meanwhile
            pass

    def note_refusal(self, address, status: int, reason: str) -> None:
        client = address[0] if isinstance(address, tuple) else address
        self._refusals.log(logging.INFO, "%d to %s: %s", status, client, reason)


class RateLimitedLog:
    """Log lines a remote party (or a condition that lasts, retried every tick) can cause, at most once every
    `interval_seconds`, counting the ones left out (a client could otherwise fill the log)."""

    def __init__(self, what: str, logger: logging.Logger, interval_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._logger = logger
        self._interval_seconds, self._clock = interval_seconds, clock
        self._logged_at = -math.inf
        self._left_out = 0

    def log(self, level: int, message: str, *args) -> None:
        now = self._clock()
        if now - self._logged_at < self._interval_seconds:
            self._left_out += 1
            return
        if self._left_out:
            message += f" (and {self._left_out} more {self.what} since the last such line)"
        self._logger.log(level, message, *args)
        self._logged_at, self._left_out = now, 0


def raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (a process may, without privileges): the soft default (often
    1,024) is what strangers' connections to either port would otherwise use up first. The HTTP connection cap is
    sized from the result (connection_bound)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.info("could not raise the descriptor limit from %d to %d: %s", soft, target, e)


def connection_bound() -> int:
    """The most HTTP connections the descriptor limit allows: half of those left after FD_RESERVE, since with
    -forward a connection may hold a second descriptor (its request forwarded to the leader)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, (soft - FD_RESERVE) // 2)


def listen(host: str, port: int) -> gevent.socket.socket:
    """The HTTP listening socket. gevent.pywsgi writes headers and body separately: without TCP_NODELAY each
    keep-alive response waits for Nagle's algorithm and the client's delayed ACK (tens of milliseconds). Accepted
    sockets inherit the option."""
    listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((host, port))
    listener.listen(1024)
    return listener
