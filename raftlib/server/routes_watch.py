"""GET /watch: a key's or a prefix's changes, as a stream of server-sent events or a long poll (poll=1).

Rules:
- GET /watch serves watches from this node's own applied state (raftlib.server.watch: the history's rules): no
  forward, no read round, no feature level, no secret (as GET /db). A stream (server-sent events) writes a
  comment every KEEPALIVE_SECONDS while it has nothing to send, and ends when its client goes (edge.Stream),
  falls behind the history, or this node stops serving watches (both with an `error` event); a long poll
  (poll=1) waits at most its timeout (MAX_POLL_TIMEOUT_SECONDS).
- While the hub refuses watches (the node was removed, or has heard from no leader for too long: watch.py's
  rules, raftlib.server.watchguard), a new watch, and a long poll that has no event to answer, gets the
  refusal's status (410 removed, 503 no leader) and one-line reason. At most `max_watches` of either are open at
  once (503 beyond). The stream is raftlib.server.watchstream.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable

import bottle

from .edge import Stream, waiting_on_its_own
from .routes_shared import MAX_KEY_BYTES, Api, check_key, read_headers, refuse_from_the_empty_state, removed_text, text
from .watch import Behind, Filter
from .watchstream import watch_stream

DEFAULT_POLL_TIMEOUT_SECONDS = 30.0
MAX_POLL_TIMEOUT_SECONDS = 60.0
MAX_POLL_BYTES = 4 << 20  # event JSON in one long poll's answer (a group goes whole): the client goes on from its position
WATCH_POSITION_HEADER = "X-Raft-Watch-Position"  # a long poll's next from (watch.py's positions)


def _watch_position(api: Api) -> int:
    """Where a watch starts: after Last-Event-ID (a reconnect), else after ?from=N, else after this node's last
    applied index (from now)."""
    req = bottle.request
    last_event_id = req.environ.get("HTTP_LAST_EVENT_ID")  # as sent (latin-1): Bottle's get_header decodes UTF-8
    name, given = ("Last-Event-ID", last_event_id) if last_event_id else ("from", req.query.get("from"))
    if given is None:
        refuse_from_the_empty_state(api)
        return max(api.runtime.node.last_applied, api.watch_hub.applied_index)
    if not (given.isascii() and given.isdigit()) or len(given) > 18:  # "\xb2".isdigit() is True: int() fails
        raise text(400, f"{name} must be an index: an integer >= 0")
    return int(given)


def _watch_names(query_string: str) -> tuple[str | None, str | None]:
    """?key= and ?prefix= as /db/KEY names keys: percent-decoded, `+` a literal plus (Bottle's query decoding
    would make it a space: `/watch?key=a+b` would watch "a b", not the key `/db/a+b` wrote), UTF-8. The last of
    each wins, as in Bottle."""
    found: dict[str, str] = {}
    for pair in query_string.split("&"):
        name, _, value = pair.partition("=")
        name = urllib.parse.unquote(name)
        if name in ("key", "prefix"):
            try:
                # WSGI gives the query as latin-1 text: back to its bytes first (unquote_to_bytes would encode
                # raw non-ASCII again as UTF-8: `?key=r\xc3\xa9` watched "rÃ©" while /db wrote "ré").
                found[name] = urllib.parse.unquote_to_bytes(value.encode("latin-1")).decode("utf-8")
            except UnicodeError:  # not UTF-8 (or, outside WSGI, not latin-1 text)
                raise text(400, "key and prefix must be UTF-8") from None
    return found.get("key"), found.get("prefix")


def get_watch(api: Api) -> bottle.HTTPResponse:
    """GET /watch?key=K or ?prefix=P [&from=N] [&poll=1[&timeout=S]]: the changes after N (the module's rules)."""
    q = bottle.request.query
    key, prefix = _watch_names(bottle.request.environ.get("QUERY_STRING", ""))
    if (key is None) == (prefix is None):
        raise text(400, "a watch names ?key=K or ?prefix=P, one of them (an empty prefix watches every key)")
    if key is not None:
        check_key(key)
    elif prefix is not None and len(prefix.encode()) > MAX_KEY_BYTES:
        raise text(400, f"prefix must be at most {MAX_KEY_BYTES} bytes (no key is longer: it would match none)")
    poll = q.get("poll", "0")
    if poll not in ("0", "1"):
        raise text(400, "poll must be 1 (a long poll) or 0 (a stream)")
    timeout_seconds = DEFAULT_POLL_TIMEOUT_SECONDS
    if "timeout" in q:
        if poll != "1":
            raise text(400, "timeout goes with poll=1 (a stream has none)")
        try:
            timeout_seconds = float(q["timeout"])
            if not 0 <= timeout_seconds <= MAX_POLL_TIMEOUT_SECONDS:  # NaN fails it too
                raise ValueError
        except ValueError:
            raise text(400, f"timeout must be a number of seconds from 0 to {MAX_POLL_TIMEOUT_SECONDS:g}") from None
    position = _watch_position(api)
    removed = removed_text(api.runtime.node.removed)
    if removed:
        raise text(410, removed)
    mode = "poll" if poll == "1" else "stream"
    if api.watch_hub.refusal is not None:  # removed, or no leader for too long (watch.py's rules)
        api.metrics.watches_refused.inc(mode)
        raise text(*api.watch_hub.refusal)
    try:
        api.watch_hub.check(position)
    except Behind as e:
        api.metrics.watches_behind.inc(mode)
        raise text(410, str(e), **{"X-Raft-Oldest-Index": str(e.oldest_index)}) from None
    if api.metrics.watches_open >= api.max_watches:
        raise text(503, f"this node has {api.max_watches} watches open, its most: watch through another node")
    wanted = Filter(key, prefix)
    if mode == "poll":
        return _long_poll(api, position, wanted, timeout_seconds)
    chunks = watch_stream(api.watch_hub, api.metrics, position, wanted, bottle.request.environ)
    return bottle.HTTPResponse(chunks, 200, {
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **read_headers(api)})


def _long_poll(api: Api, position: int, wanted: Filter, timeout_seconds: float) -> bottle.HTTPResponse:
    """The answer carries X-Raft-Watch-Position, the next `from` (watch.py's positions), `[]` too. A client that
    closes (or half-closes: it cannot be told apart before the answer) is answered at once with what there is."""
    hub, metrics = api.watch_hub, api.metrics
    deadline = time.monotonic() + timeout_seconds
    handler = bottle.request.environ.get("raftdzmq.handler")  # None in process (tests)
    metrics.watches_open += 1
    watcher = hub.watch(position, wanted)
    stream = None if handler is None else Stream(handler, last_answer=False)
    try:
        while True:
            try:
                events, body = hub.next_poll(watcher, max_bytes=MAX_POLL_BYTES)
            except Behind as e:
                metrics.watches_behind.inc("poll")
                return text(410, str(e), **{"X-Raft-Oldest-Index": str(e.oldest_index)})
            if not events and hub.refusal is not None:  # no event will come here: the client asks elsewhere
                metrics.watches_refused.inc("poll")
                return text(*hub.refusal)
            remaining = deadline - time.monotonic()
            ended = stream is not None and (stream.gone.is_set() or stream.eof.is_set())
            if events or remaining <= 0 or ended:
                metrics.watch_events.inc("poll", len(events))
                return bottle.HTTPResponse(body, 200, {
                    "Content-Type": "application/json", WATCH_POSITION_HEADER: str(watcher.position),
                    **read_headers(api)})
            with waiting_on_its_own(bottle.request.environ):  # bounded by remaining, at most a minute
                hub.wait_for(watcher, remaining, None if stream is None else stream.gone)
                if handler is not None:  # its answer is a request's work: it takes its turn (edge.TurnGate), or
                    handler.server.gate.enter()  # a hundred polls woken by one 1 MB write sent 6 MB each in one turn
                if stream is not None and stream.eof.is_set():
                    continue
    finally:
        hub.unwatch(watcher)
        metrics.watches_open -= 1
        if stream is not None:
            stream.close()


# (method, path, route, the operation its failures are answered as): api.make_app installs them.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("GET", "/watch", get_watch, "read"),
)
