"""raftlib.server.watch in process (the hub: history, history_start, filters, whole index groups, Behind, waking)
and GET /watch through the WSGI application on a fake runtime (test_http_api's), no sockets."""

from __future__ import annotations

import json
import time

import gevent
import pytest

from raftlib.server.store import DELETE_PREFIX, SET, TXN, Event, KeyValueStore, SET_FEATURE_LEVEL, command
from raftlib.server.watch import MAX_EVENTS_PER_READ, Behind, Filter, WatchHub, event_json, sse_frame
from test_http_api import Client

ALL = Filter(prefix="")


def put(index: int, key: str = "k", value: bytes = b"v") -> Event:
    return Event("put", key, value, index, index)


def indices(events) -> list[int]:
    return [e.index for e in events]


# ---- the history --------------------------------------------------------------------------------------------------


def test_the_history_keeps_the_last_n_events_and_history_start_follows_evictions():
    hub = WatchHub(history_events=5)
    for i in range(1, 9):
        hub.on_event(put(i))
    assert len(hub) == 5 and hub.history_start == 3
    with pytest.raises(Behind) as behind:
        hub.read(2, ALL)
    assert behind.value.oldest_index == 4
    events, position = hub.read(3, ALL)
    assert indices(events) == [4, 5, 6, 7, 8] and position == 8


def test_a_slow_reader_is_ended_and_the_history_does_not_grow_for_it():
    hub = WatchHub(history_events=100)
    position = 0
    for i in range(1, 20_001):
        hub.on_event(put(i))
    assert len(hub) == 100
    assert len(hub._events) <= 100 + 4096 + 1  # the evicted front is dropped, not kept for the laggard
    with pytest.raises(Behind):
        hub.read(position, ALL)


def test_a_restore_moves_history_start_to_the_snapshot_index():
    hub = WatchHub()
    for i in (1, 2, 3):
        hub.on_event(put(i))
    hub.restored(10)
    assert hub.history_start == 10 and len(hub) == 0
    with pytest.raises(Behind) as behind:
        hub.read(5, ALL)
    assert behind.value.oldest_index == 11
    assert hub.read(10, ALL) == ([], 10)
    hub.on_event(put(11))
    assert indices(hub.read(10, ALL)[0]) == [11]


def test_the_node_store_tells_the_hub_of_a_restore_with_the_snapshot_index():
    from raftlib.server.node import WatchedStore

    class Snap:
        last_included_index = 7
        data = KeyValueStore().snapshot()

    hub = WatchHub()
    store = WatchedStore(hub, lambda: Snap)
    store.apply(1, command(SET, "a", b"1"))
    assert indices(hub.read(0, ALL)[0]) == [1]
    store.restore(Snap.data)
    assert hub.history_start == 7
    with pytest.raises(Behind):
        hub.read(1, ALL)


def test_filters_take_one_key_or_a_prefix():
    hub = WatchHub()
    for i, key in enumerate(("a", "ab", "b/1", "b/2", "c"), 1):
        hub.on_event(put(i, key))
    assert [e.key for e in hub.read(0, Filter(key="a"))[0]] == ["a"]
    assert [e.key for e in hub.read(0, Filter(prefix="b/"))[0]] == ["b/1", "b/2"]
    assert len(hub.read(0, Filter(prefix=""))[0]) == 5
    # Nothing matched: the position still moves past what was looked at.
    assert hub.read(0, Filter(key="zz")) == ([], 5)


def test_an_index_group_is_never_split_by_a_read_nor_by_the_sse_ids():
    hub = WatchHub()
    store = KeyValueStore(on_event=hub.on_event)
    store.apply(1, command(SET_FEATURE_LEVEL, "", b"", 2))
    for i, key in enumerate(("d/a", "d/b", "d/c"), 2):
        store.apply(i, command(SET, key, b"v"))
    store.apply(5, command(DELETE_PREFIX, "d/"))  # three events at index 5
    store.apply(6, command(TXN, "", b"", [[], [["put", "x", b"1"], ["put", "y", b"2"]], []]))
    events, position = hub.read(4, ALL, limit=1)
    assert indices(events) == [5, 5, 5] and position == 5  # the limit does not cut a group
    events, position = hub.read(position, ALL, limit=1)
    assert [(e.index, e.key) for e in events] == [(6, "x"), (6, "y")] and position == 6
    frame = sse_frame(hub.read(4, ALL)[0]).decode()
    blocks = frame.strip("\n").split("\n\n")
    ids = [line for block in blocks for line in block.splitlines() if line.startswith("id:")]
    assert ids == ["id: 5", "id: 6"]  # one id per group, on its last event
    assert blocks[2].startswith("id: 5") and blocks[4].startswith("id: 6")
    # A stream cut after the first event of group 5: the client's last id is 4, and resuming after it gives the
    # whole group again, then the rest.
    assert indices(hub.read(4, ALL)[0]) == [5, 5, 5, 6, 6]


def test_a_group_bigger_than_the_history_moves_history_start_to_its_index():
    hub = WatchHub(history_events=3)
    for key in "abcde":
        hub.on_event(Event("delete", key, None, 2, 1))
    assert hub.history_start == 2
    with pytest.raises(Behind):
        hub.read(1, ALL)
    assert hub.read(2, ALL) == ([], 2)


def test_a_position_beyond_the_newest_event_waits_for_later_events():
    hub = WatchHub()
    hub.on_event(put(3))
    assert hub.read(10, ALL) == ([], 10)
    hub.on_event(put(11))
    assert indices(hub.read(10, ALL)[0]) == [11]


def test_a_read_hands_out_at_most_about_the_limit():
    hub = WatchHub()
    for i in range(1, 3 * MAX_EVENTS_PER_READ + 1):
        hub.on_event(put(i))
    events, position = hub.read(0, ALL)
    assert len(events) == MAX_EVENTS_PER_READ and position == MAX_EVENTS_PER_READ


def test_waiters_wake_on_an_event_and_on_a_restore_and_otherwise_at_their_bound():
    hub = WatchHub()
    waiter = gevent.spawn(hub.wait, 0, 5.0)
    gevent.sleep(0.01)
    t0 = time.monotonic()
    hub.on_event(put(1))
    waiter.join(2)
    assert waiter.dead and time.monotonic() - t0 < 1
    waiter = gevent.spawn(hub.wait, 1, 5.0)
    gevent.sleep(0.01)
    hub.restored(5)
    waiter.join(2)
    assert waiter.dead
    t0 = time.monotonic()
    hub.wait(5, 0.1)
    assert 0.09 <= time.monotonic() - t0 < 1


def test_the_event_json_gives_text_or_base64_and_no_value_for_a_delete():
    assert event_json(Event("put", "k", "é".encode(), 3, 2)) == {
        "type": "put", "key": "k", "value": "é", "index": 3, "create_index": 2}
    assert event_json(Event("put", "k", b"\xff", 3, 2))["value_base64"] == "/w=="
    assert event_json(Event("delete", "k", None, 4, 2)) == {"type": "delete", "key": "k", "index": 4,
                                                             "create_index": 2}


# ---- GET /watch in process ----------------------------------------------------------------------------------------


@pytest.fixture
def client() -> Client:
    c = Client(write_timeout_seconds=2.0, read_timeout_seconds=0.2)
    c.store.on_event = c.api.watch_hub.on_event
    return c


def test_a_long_poll_answers_the_events_after_from_or_an_empty_list_after_its_timeout(client):
    for key in ("app/a", "app/b", "other"):
        assert client("POST", f"/db/{key}", "v").status == 200
    assert client("DELETE", "/db/app/a").status == 200
    r = client("GET", "/watch?prefix=app/&from=0&poll=1")
    assert r.status == 200 and [(e["type"], e["key"], e["index"]) for e in r.json()] == [
        ("put", "app/a", 1), ("put", "app/b", 2), ("delete", "app/a", 4)]
    t0 = time.monotonic()
    r = client("GET", "/watch?key=app/b&from=2&poll=1&timeout=0.2")
    assert r.status == 200 and r.json() == [] and 0.15 < time.monotonic() - t0 < 2
    # From now (the default): what comes later.
    later = gevent.spawn(client, "GET", "/watch?key=k&poll=1&timeout=5")
    gevent.sleep(0.05)
    client("POST", "/db/k", "new")
    r = later.get(timeout=2)
    assert [(e["key"], e["value"]) for e in r.json()] == [("k", "new")]
    assert client.metrics.watches_open == 0 and client.counted("watch_events")["poll"] == 4


@pytest.mark.parametrize("target, reason", [
    ("/watch?poll=1", "names ?key=K or ?prefix=P"),
    ("/watch?key=a&prefix=b", "names ?key=K or ?prefix=P"),
    ("/watch?key=a&from=-1", "from must be an index"),
    ("/watch?key=a&from=x", "from must be an index"),
    ("/watch?key=a&poll=yes", "poll must be 1"),
    ("/watch?key=a&poll=1&timeout=61", "timeout must be a number"),
    ("/watch?key=a&poll=1&timeout=nan", "timeout must be a number"),
    ("/watch?key=a&timeout=1", "timeout goes with poll=1"),
    ("/watch?key=&poll=1", "key must be 1 to"),
])
def test_junk_gets_400_with_a_reason(client, target, reason):
    r = client("GET", target)
    assert r.status == 400 and reason in r.text and r.text.count("\n") == 1


def test_from_older_than_the_history_is_410_with_the_oldest_index():
    c = Client()
    c.api.watch_hub = WatchHub(history_events=2)
    c.store.on_event = c.api.watch_hub.on_event
    for i in range(5):
        c("POST", f"/db/k{i}", "v")
    r = c("GET", "/watch?prefix=&from=1&poll=1")
    assert r.status == 410 and r.headers["x-raft-oldest-index"] == "4" and "oldest index available is 4" in r.text
    r = c("GET", "/watch?prefix=&poll=1", headers={"Last-Event-ID": "2"})
    assert r.status == 410  # Last-Event-ID overrides from
    r = c("GET", "/watch?prefix=&from=0&poll=1", headers={"Last-Event-ID": "3"})
    assert r.status == 200 and [e["index"] for e in r.json()] == [4, 5]
    assert c.counted("watches_behind") == {"poll": 2}


def test_the_watches_open_at_once_are_bounded():
    c = Client(max_watches=1)
    c.store.on_event = c.api.watch_hub.on_event
    first = gevent.spawn(c, "GET", "/watch?key=a&poll=1&timeout=1")
    gevent.sleep(0.05)
    r = c("GET", "/watch?key=a&poll=1&timeout=1")
    assert r.status == 503 and "watches open" in r.text
    assert first.get(timeout=3).status == 200
    assert c("GET", "/watch?key=a&poll=1&timeout=0").status == 200


def stream(client: Client, target: str, headers: dict | None = None):
    """The status, headers and chunk iterator of a stream answer (the WSGI app called as the edge does)."""
    environ = {"REQUEST_METHOD": "GET", "REQUEST_URI": target, "SCRIPT_NAME": "", "PATH_INFO": "/watch",
               "QUERY_STRING": target.partition("?")[2], "SERVER_NAME": "localhost", "SERVER_PORT": "8080",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http", "raftdzmq.body": b""}
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started = []
    body = client.app(environ, lambda status, headers, exc_info=None: started.append((status, dict(headers))))
    return started[0][0], started[0][1], iter(body)


def test_a_stream_sends_events_then_an_error_event_when_it_falls_behind():
    c = Client()
    c.api.watch_hub = WatchHub(history_events=3)
    c.store.on_event = c.api.watch_hub.on_event
    status, headers, chunks = stream(c, "/watch?prefix=p/")
    assert status.startswith("200") and headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert next(chunks).startswith(b": watching after index 0")
    c("POST", "/db/p/a", "1")
    first = gevent.spawn(next, chunks)
    # The fake cluster is at feature level 1: events need no level, and their create_index is 0 there (store).
    assert first.get(timeout=2) == (b'id: 1\nevent: put\ndata: {"type": "put", "key": "p/a", "value": "1", '
                                    b'"index": 1, "create_index": 0}\n\n')
    assert c.metrics.watches_open == 1
    for i in range(5):  # the reader does not read meanwhile: the history moves past it
        c("POST", f"/db/q{i}", "v")
    error = gevent.spawn(next, chunks).get(timeout=2)
    assert error.startswith(b"event: error\ndata: ") and json.loads(error.split(b"data: ")[1])["oldest_index"] == 4
    with pytest.raises(StopIteration):
        next(chunks)
    assert c.metrics.watches_open == 0 and c.counted("watches_behind") == {"stream": 1}


# ---- streams through the edge (a process of its own: it monkey-patches) -------------------------------------------

STREAM_THROUGH_THE_EDGE = r"""
from gevent import monkey
monkey.patch_all()
import json, socket, sys, time, types
sys.path.insert(0, sys.argv[1])
import gevent, gevent.socket
from raftlib import Role
from raftlib.server import api as api_module
from raftlib.server.api import Api, make_app
from raftlib.server.edge import EdgeServer
from raftlib.server.metrics import Metrics
from raftlib.server.store import SET, KeyValueStore, command
from raftlib.server.watch import WatchHub

api_module.KEEPALIVE_SECONDS = 1.0
listener = gevent.socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
hub, metrics = WatchHub(), Metrics()
kv = KeyValueStore(on_event=hub.on_event)
node = types.SimpleNamespace(node_id="n", last_applied=0, leader_id="n", role=Role.LEADER, removed=None)
evictions = []
server = EdgeServer(listener, make_app(Api(types.SimpleNamespace(node=node), kv, metrics, watch_hub=hub)),
                    max_connections=50, idle_timeout_seconds=1.0, receive_timeout_seconds=1.0,
                    busy_timeout_seconds=3.0, max_header_bytes=32768, max_body_bytes=1024,
                    on_eviction=evictions.append)
server.start()
port = listener.getsockname()[1]

def watch():
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /watch?prefix=k HTTP/1.1\r\nHost: x\r\n\r\n")
    return s

# A stream with nothing to say for longer than the busy bound and the idle timeout: it is not cut off.
kept = watch()
received = b""
end = time.monotonic() + 7
while time.monotonic() < end:
    received += kept.recv(65536)
node.last_applied = 1
kv.apply(1, command(SET, "k1", b"v"))
t0 = time.monotonic()
while b"id: 1" not in received and time.monotonic() - t0 < 5:
    received += kept.recv(65536)
event_seconds = time.monotonic() - t0
# A client that goes away ends its stream at once, not at the next keep-alive.
gone = watch()
gevent.sleep(0.3)
opened = metrics.watches_open
gone.close()
t0 = time.monotonic()
while metrics.watches_open == opened and time.monotonic() - t0 < 5:
    gevent.sleep(0.01)
gone_seconds = time.monotonic() - t0
# A long poll longer than the busy bound is answered, not cut off.
polling = socket.create_connection(("127.0.0.1", port), timeout=10)
polling.sendall(b"GET /watch?key=zz&poll=1&timeout=4 HTTP/1.1\r\nHost: x\r\n\r\n")
poll_answer = polling.recv(65536).decode()
print(json.dumps({"poll_answer": poll_answer, "head": received.split(b"\r\n\r\n")[0].decode(), "keepalives": received.count(b": keep-alive"),
                  "event_seconds": event_seconds, "evictions": evictions, "opened": opened,
                  "gone_seconds": gone_seconds, "open_after": metrics.watches_open}))
"""


def test_a_stream_through_the_edge_is_chunked_outlives_the_busy_bound_and_ends_when_its_client_goes():
    """And a long poll longer than the busy bound is answered."""
    import subprocess
    import sys

    from procs import ROOT

    out = subprocess.run([sys.executable, "-c", STREAM_THROUGH_THE_EDGE, ROOT], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert "Transfer-Encoding: chunked" in result["head"] and "text/event-stream" in result["head"]
    assert result["evictions"] == [] and result["keepalives"] >= 5  # 7 s, a keep-alive a second, busy bound 3 s
    assert result["event_seconds"] < 1.0  # written as it came, not buffered
    assert result["opened"] == 2 and result["open_after"] == 1 and result["gone_seconds"] < 0.5
    assert result["poll_answer"].startswith("HTTP/1.1 200") and result["poll_answer"].endswith("\r\n\r\n[]\n")
