"""The HTTP edge under attack (issue 17, issue 11 items 8-9's HTTP part): raw sockets against real nodes.

Each hostile request is checked for the right 4xx/5xx, the connection closed where it must be (a request that
cannot be framed leaves the rest of the connection unreadable: RFC 9112 §6.3, §11.2), nothing applied (every
request here writes or deletes a key of its own, and a pipelined request after it writes another), and no
traceback in any log. A 3-node cluster runs the whole module, and its leader must keep its term throughout.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import bottle
import gevent
import gevent.socket
import pytest

from procs import ROOT, SERVER, LocalCluster, Node, free_port, wait_for
from raftlib.server import edge
from raftlib.server.edge import ONE_SEND_BODY_BYTES, EdgeHandler, EdgeServer, listen
from test_http_api import Client

MAX_BODY = 4096
RECEIVE_TIMEOUT = 1.0
IDLE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("edge")), extra=(
        "-forward", "-max-body", str(MAX_BODY), "-receive-timeout", str(RECEIVE_TIMEOUT),
        "-idle-timeout", str(IDLE_TIMEOUT))).start()
    leader = c.leader()
    c.first_leader, c.first_term = leader, leader.status()["term"]
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def no_traceback(request):
    yield
    if "cluster" in request.fixturenames:
        for n in request.getfixturevalue("cluster").nodes:
            assert "Traceback" not in n.log_text(), n.name


_keys = iter(range(10**9))


def fresh(prefix: str) -> str:
    return f"{prefix}-{next(_keys)}-{os.getpid()}"


# ---- raw HTTP ----------------------------------------------------------------------------------------------


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """The complete responses in `data` (1xx interim answers left out)."""
    out = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out
        head, rest = data[:end].decode("latin-1"), data[end + 4:]
        status = int(head.split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head.split("\r\n")[1:])}
        length = int(headers.get("content-length", "0")) if status >= 200 else 0
        if len(rest) < length:
            return out
        if status >= 200:
            out.append((status, headers, rest[:length]))
        data = rest[length:]


def exchange(address: str, data: bytes, half_close: bool = False, timeout: float = 5.0, sock=None):
    """Send `data` on a new connection (or `sock`) and read until the server closes it or `timeout` passes with
    nothing new. Returns (responses, closed): closed is True when the server ended the connection."""
    received, closed = receive(address, data, half_close, timeout, sock)
    return parse_responses(received), closed


def receive(address: str, data: bytes, half_close: bool = False, timeout: float = 5.0, sock=None):
    """exchange's, but the bytes received as they came (an answer's chunks not undone): (bytes, closed)."""
    host, port = address.rsplit(":", 1)
    s = sock or socket.create_connection((host, int(port)), timeout=timeout)
    s.settimeout(timeout)
    out, closed = b"", False
    try:
        if data:
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            out += chunk
    except socket.timeout:
        pass
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    finally:
        s.close()
    return out, closed


def post(key: str, body: bytes = b"v", extra: bytes = b"") -> bytes:
    return b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\n%sContent-Length: %d\r\n\r\n%s" % (key.encode(), extra, len(body), body)


def absent(node: Node, *keys: str) -> bool:
    return all(node.request("GET", f"/db/{k}").status == 404 for k in keys)


def leader_of(cluster) -> Node:
    leader = cluster.leader()
    return leader


# ---- issue 17 item 1: a request cut short runs nothing --------------------------------------------------------


def test_end_of_file_before_the_blank_line_runs_nothing(cluster):
    leader = leader_of(cluster)
    victim = fresh("victim")
    assert leader.request("POST", f"/db/{victim}", "alive").status == 200
    for cut in (b"DELETE /db/%s HTTP/1.1\r\nHost: localhost\r\nX-Still-Typing: " % victim.encode(),
                b"DELETE /db/%s HTTP/1.1\r\nHost: localhost\r\n" % victim.encode(),
                b"DELETE /db/%s HTTP/1.1" % victim.encode()):
        responses, closed = exchange(leader.address, cut, half_close=True)
        assert responses == [] and closed, cut
    # Many slow clients that never finish their heads, then go away.
    keys = [fresh("slow") for _ in range(50)]
    socks = []
    for k in keys:
        s = socket.create_connection(("127.0.0.1", leader.http_port), timeout=5)
        s.sendall(b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nX-Still-Typing: " % k.encode())
        socks.append(s)
    time.sleep(0.2)
    for s in socks:
        s.close()
    assert leader.request("GET", f"/db/{victim}").body == b"alive"
    assert absent(leader, *keys)


def test_a_body_shorter_than_its_length_runs_nothing(cluster):
    leader = leader_of(cluster)
    victim, short = fresh("victim"), fresh("short")
    assert leader.request("POST", f"/db/{victim}", "alive").status == 200
    for request in (b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc" % short.encode(),
                    b"DELETE /db/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc" % victim.encode()):
        responses, closed = exchange(leader.address, request, half_close=True)
        assert [r[0] for r in responses] == [400] and b"cut short" in responses[0][2] and closed, responses
    assert absent(leader, short)
    assert leader.request("GET", f"/db/{victim}").body == b"alive"


# ---- issue 17 item 6 and RFC 9112's smuggling vectors ------------------------------------------------------------


def _vectors():
    """(name, head lines after the request line, body, status): each must be refused and close the connection."""
    return [
        ("CL and TE together", b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n", 400),
        ("TE and CL together", b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"3\r\nabc\r\n0\r\n\r\n", 400),
        ("TE gzip", b"Transfer-Encoding: gzip\r\n", b"abc", 501),
        ("TE chunked twice in one field", b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n", 501),
        ("TE in two fields", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", 501),
        ("TE identity", b"Transfer-Encoding: identity\r\n", b"", 501),
        ("TE xchunked", b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n", 501),
        ("TE with a vertical tab", b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n", 400),
        ("CL differing duplicates", b"Content-Length: 3\r\nContent-Length: 60\r\n", b"abc", 400),
        ("CL +3", b"Content-Length: +3\r\n", b"abc", 400),
        ("CL 0_62", b"Content-Length: 0_62\r\n", b"abc", 400),
        ("CL -1", b"Content-Length: -1\r\n", b"abc", 400),
        ("CL 0x3", b"Content-Length: 0x3\r\n", b"abc", 400),
        ("CL list", b"Content-Length: 3, 3\r\n", b"abc", 400),
        ("CL empty", b"Content-Length: \r\n", b"abc", 400),
        ("CL unicode digit", "Content-Length: \u0663\r\n".encode("utf-8"), b"abc", 400),
        ("obs-fold", b"X-A: a\r\n b\r\n", b"", 400),
        ("obs-fold of TE", b"X-A: a\r\n\tTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", 400),
        ("space before the colon", b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n", 400),
        ("bare LF", b"X-A: a\nContent-Length: 3\r\n", b"abc", 400),
        ("bare CR", b"X-A: a\rContent-Length: 3\r\n", b"abc", 400),
        ("NUL in a value", b"X-A: a\x00b\r\n", b"", 400),
        ("a second Host line", b"Host: localhost\r\nContent-Length: 1\r\n", b"x", 400),  # RFC 9112 §3.2
        ("chunk size +3", b"Transfer-Encoding: chunked\r\n", b"+3\r\nabc\r\n0\r\n\r\n", 400),
        ("chunk size 0x3", b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n", 400),
        ("chunk longer than its size", b"Transfer-Encoding: chunked\r\n", b"2\r\nabc\r\n0\r\n\r\n", 400),
        ("chunk line bare LF", b"Transfer-Encoding: chunked\r\n", b"3\nabc\r\n0\r\n\r\n", 400),
        # RFC 9112 §7.1.1, §7.1.2: chunk extensions and trailer fields get the same character checks as a head.
        ("chunk extension with a lone CR", b"Transfer-Encoding: chunked\r\n", b"3;a\rX\r\nabc\r\n0\r\n\r\n", 400),
        ("chunk extension with NUL and DEL", b"Transfer-Encoding: chunked\r\n", b"3;\x00\x7f\r\nabc\r\n0\r\n\r\n", 400),
        ("last chunk extension with a control", b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0;\x01\r\n\r\n", 400),
        ("trailer with a lone CR", b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nA\rB\r\n\r\n", 400),
        ("trailer without a colon", b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nno colon here\r\n\r\n", 400),
        ("trailer with a control in its value", b"Transfer-Encoding: chunked\r\n",
         b"3\r\nabc\r\n0\r\nX-T: a\x01b\r\n\r\n", 400),
        ("trailer with a space before the colon", b"Transfer-Encoding: chunked\r\n",
         b"3\r\nabc\r\n0\r\nX-T : a\r\n\r\n", 400),
    ]


@pytest.mark.parametrize("name,head,body,status", _vectors(), ids=[v[0] for v in _vectors()])
def test_smuggling_vectors_are_refused_and_close_the_connection(cluster, name, head, body, status):
    leader = leader_of(cluster)
    first, smuggled = fresh("first"), fresh("smuggled")
    request = b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\n%s\r\n%s" % (first.encode(), head, body)
    responses, closed = exchange(leader.address, request + post(smuggled))
    assert [r[0] for r in responses] == [status], (name, responses)
    assert closed, name
    assert responses[0][2].count(b"\n") == 1, responses[0][2]  # one line of reason
    assert absent(leader, first, smuggled), name


@pytest.mark.parametrize("request_line,status", [
    (b"POST /db/%s HTTP/1.1\n", 400),  # bare LF after the request line
    (b"POST  /db/%s HTTP/1.1\r\n", 400),  # two spaces
    (b"POST /db/%s HTTP/2.0\r\n", 505),
    (b"POST /db/%s HTTP/1.1x\r\n", 400),
    (b"POST /db/%s\r\n", 400),  # HTTP/0.9
    (b"POST http://x/db/%s HTTP/1.1\r\n", 400),
    (b"PO\x01ST /db/%s HTTP/1.1\r\n", 400),
    (b"post /db/%s HTTP/1.1\r\n", 501),  # methods are case-sensitive (review edge3, Q3)
    (b"pUT /db/%s HTTP/1.1\r\n", 501),
])
def test_malformed_request_lines_are_refused(cluster, request_line, status):
    leader = leader_of(cluster)
    first, smuggled = fresh("first"), fresh("smuggled")
    request = (request_line % first.encode()) + b"Host: localhost\r\nContent-Length: 1\r\n\r\nx"
    responses, closed = exchange(leader.address, request + post(smuggled))
    assert [r[0] for r in responses] == [status] and closed, (request_line, responses)
    assert absent(leader, first, smuggled)


def test_a_method_not_in_upper_case_runs_nothing(cluster):
    """Review edge3, Q3: `dElEtE /db/K` deleted the key (Bottle upper-cases the method), past any filter in front
    that allows only GET. RFC 9110 §9.1: methods are case-sensitive. Refused 501 with its reason, before any
    route; the key stays, and so does the pipelined write after it."""
    leader = leader_of(cluster)
    key, smuggled = fresh("kept"), fresh("smuggled")
    assert leader.request("POST", f"/db/{key}", b"v").status == 200
    for method in (b"dElEtE", b"delete", b"get"):
        responses, closed = exchange(leader.address, b"%s /db/%s HTTP/1.1\r\nHost: localhost\r\n\r\n"
                                     % (method, key.encode()) + post(smuggled))
        assert [r[0] for r in responses] == [501] and closed, (method, responses)
        assert b"case-sensitive" in responses[0][2] and responses[0][2].count(b"\n") == 1, responses[0][2]
    assert leader.request("GET", f"/db/{key}").body == b"v"
    assert absent(leader, smuggled)


def test_junk_bytes_in_this_apis_own_headers_are_a_4xx_of_one_line_without_a_traceback(cluster):
    """Review edge3, L3, on the wire: bytes that are not UTF-8 (0xE9), or UTF-8 past latin-1 (U+20AC), in an
    X-Raftdzmq-* header sent to a -forward follower were a 500 with a 26-line traceback at ERROR a request (and
    `X-Raft-Outcome: unknown` though nothing was forwarded). Now 400 (403 for the signature's headers), one line,
    `not-applied`, nothing written; the module's fixture finds no traceback in any log."""
    leader = leader_of(cluster)
    follower = next(n for n in cluster.nodes if n is not leader)
    for name, status in ((b"X-Raftdzmq-Forwarded", 400), (b"X-Raftdzmq-Signature", 403),
                         (b"X-Raftdzmq-Timestamp", 403)):
        for junk in (b"\xe9", b"\xe2\x82\xac"):
            key = fresh("junk")
            responses, _ = exchange(follower.address, b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\n%s: %s\r\n"
                                    b"Content-Length: 1\r\nConnection: close\r\n\r\nv" % (key.encode(), name, junk))
            [(got, headers, body)] = responses
            assert (got, headers.get("x-raft-outcome")) == (status, "not-applied"), (name, junk, responses)
            assert body.count(b"\n") == 1 and b"malformed " + name in body, body
            assert absent(leader, key)


def test_an_edge_refusal_names_an_outcome_for_a_write_only(cluster):
    """Review (header placement): X-Raft-Outcome is for writes; a refused GET used to carry `not-applied` too. A
    refused POST/PUT/DELETE/PATCH says `not-applied` (nothing ran), whatever failed in its head; a request line
    that could not be read names none, even after a write on the same connection (the method is not the last
    request's)."""
    leader = leader_of(cluster)
    bad_header = b"X-Bad: a\x01b\r\n"
    for method in (b"GET", b"HEAD"):
        responses, _ = exchange(leader.address, b"%s /db/k HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % (method, bad_header))
        assert [r[0] for r in responses] == [400] and "x-raft-outcome" not in responses[0][1], (method, responses)
    for method in (b"POST", b"PUT", b"DELETE", b"PATCH"):
        key = fresh("refused")
        responses, _ = exchange(leader.address, b"%s /db/%s HTTP/1.1\r\nHost: localhost\r\n%sContent-Length: 1\r\n\r\nv"
                                % (method, key.encode(), bad_header))
        assert [(r[0], r[1].get("x-raft-outcome")) for r in responses] == [(400, "not-applied")], (method, responses)
    # Framing refused after the request line (two Content-Lengths): the method is known, it is a write.
    responses, _ = exchange(leader.address, b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
                            b"Content-Length: 2\r\n\r\nvv" % fresh("twice").encode())
    assert [(r[0], r[1].get("x-raft-outcome")) for r in responses] == [(400, "not-applied")], responses
    responses, _ = exchange(leader.address, post(fresh("good")) + b"PO\x01ST /db/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert [r[0] for r in responses] == [200, 400] and "x-raft-outcome" not in responses[1][1], responses


def test_a_declared_body_over_the_limit_gets_413_at_once_and_is_not_drained(cluster):
    leader = leader_of(cluster)
    for method in (b"POST", b"GET", b"DELETE"):
        key = fresh("big")
        t0 = time.monotonic()
        host, port = leader.address.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=10)
        # The head only: the claimed gigabyte never comes. A server that drains it waits for ever.
        responses, closed = exchange(leader.address, b"%s /db/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000"
                                     b"\r\n\r\n" % (method, key.encode()), sock=s, timeout=10)
        assert [r[0] for r in responses] == [413] and closed, (method, responses)
        assert time.monotonic() - t0 < 5
        assert absent(leader, key)


def test_a_path_that_is_not_utf8_gets_400_not_another_key(cluster):
    """Bottle decodes the path from UTF-8 ignoring errors: /db/k%E9latin named the key "klatin"."""
    leader = leader_of(cluster)
    tag = fresh("utf8")
    for raw in (b"k%E9latin", b"k\xe9raw", b"k%C3latin"):
        target = b"/db/%s/%s" % (tag.encode(), raw)
        for method in (b"POST", b"GET", b"DELETE"):
            responses, closed = exchange(leader.address, b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
                                         b"Connection: close\r\n\r\nx" % (method, target))
            assert [r[0] for r in responses] == [400] and b"UTF-8" in responses[0][2], (method, raw, responses)
    assert listed(leader, tag) == []
    # Valid UTF-8, raw or percent-encoded, still names the key.
    for raw in (b"ok%C3%A9", "ok\u00e9".encode()):
        responses, _ = exchange(leader.address, b"POST /db/%s/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
                                b"Connection: close\r\n\r\nx" % (tag.encode(), raw))
        assert [r[0] for r in responses] == [200], responses
    assert listed(leader, tag) == [f"{tag}/ok\u00e9"]


def test_prev_value_is_compared_as_the_bytes_sent(cluster):
    """?prev_value= bytes that are not UTF-8 were read as "" by Bottle: a compare-and-set against an empty value
    succeeded for %E9."""
    leader = leader_of(cluster)
    empty, binary = fresh("cas"), fresh("cas")
    assert leader.request("POST", f"/db/{empty}", b"").status == 200
    assert leader.request("POST", f"/db/{empty}?prev_value=%E9", b"new").status == 412
    assert leader.request("GET", f"/db/{empty}").body == b""
    assert leader.request("POST", f"/db/{binary}", b"\xe9").status == 200
    assert leader.request("POST", f"/db/{binary}?prev_value=%E8", b"no").status == 412
    assert leader.request("POST", f"/db/{binary}?prev_value=%E9", b"yes").status == 200
    assert leader.request("POST", f"/db/{binary}?prev_value=yes", "\u00e9t\u00e9".encode()).status == 200
    assert leader.request("POST", f"/db/{binary}?prev_value=%C3%A9t%C3%A9", b"done").status == 200
    assert leader.request("GET", f"/db/{binary}").body == b"done"


def test_good_requests_pipelined_keep_the_connection(cluster):
    leader = leader_of(cluster)
    a, b = fresh("pipe"), fresh("pipe")
    chunked = b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" % b.encode()
    responses, closed = exchange(leader.address, b"\r\n" + post(a, b"one") + chunked + b"GET /db/%s HTTP/1.1\r\n"
                                 b"Host: localhost\r\nContent-Length: 0\r\n\r\n" % a.encode(), timeout=1.0)
    assert [r[0] for r in responses] == [200, 200, 200] and responses[2][2] == b"one" and not closed, responses
    assert leader.request("GET", f"/db/{b}").body == b"abc"


def test_a_request_pipelined_behind_a_watch_ends_the_stream_and_runs_nothing(cluster):
    """Review of fanout2, finding 3: a request sent in the same segment as a GET /watch was read into pywsgi's
    buffer with it, where the stream's watch on the socket never looked: it was never answered, and the stream went
    on. A watch is the connection's last answer: anything sent behind it ends the stream at once and runs nothing."""
    leader = leader_of(cluster)
    watched, pipelined = fresh("piped-watch"), fresh("piped")
    watch = b"GET /watch?key=%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % watched.encode()
    # Silence for 3 s (less than a keep-alive, 5 s) ends the read: a stream that went on would not be closed.
    received, closed = receive(leader.address, watch + post(pipelined), timeout=3.0)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, received
    assert b"watching after" in body and body.endswith(b"\r\n0\r\n\r\n") and closed, received  # its last chunk
    assert b"HTTP/1.1" not in body  # the pipelined request is not answered
    assert absent(leader, pipelined)


# ---- issue 11 item 8: chunked request bodies ------------------------------------------------------------------


def test_chunked_bodies_from_raw_sockets_curl_and_requests(cluster, tmp_path):
    leader = leader_of(cluster)
    follower = next(n for n in cluster.nodes if n is not leader)
    k1, k2, k3, k4 = (fresh("chunked") for _ in range(4))
    # Extensions and a trailer field, split over several chunks.
    body = b"4;ext=1\r\nabcd\r\n2 ; x\r\nef\r\n0\r\nX-Trailer: t\r\n\r\n"
    responses, _ = exchange(leader.address, b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: Chunked\r\n"
                            b"Connection: close\r\n\r\n%s" % (k1.encode(), body))
    assert [r[0] for r in responses] == [200], responses
    assert leader.request("GET", f"/db/{k1}").body == b"abcdef"
    # curl -T - sends Transfer-Encoding: chunked and Expect: 100-continue; through a forwarding follower.
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", "-", "-XPOST",
                          f"http://{follower.address}/db/{k2}"], input=b"from curl\n", capture_output=True, timeout=30)
    assert out.stdout == b"200", out
    assert leader.request("GET", f"/db/{k2}").body == b"from curl\n"
    code = subprocess.run([sys.executable, "-c", "import requests, sys; r = requests.post(sys.argv[1], "
                           "data=(c for c in [b'gen', b'erat', b'or'])); print(r.status_code)",
                           f"http://{leader.address}/db/{k3}"], capture_output=True, text=True, timeout=30)
    assert code.stdout.strip() == "200", code
    assert leader.request("GET", f"/db/{k3}").body == b"generator"
    # Over the body limit, chunk by chunk: 413, nothing applied.
    big = b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(MAX_BODY // 1024 + 1)) + b"0\r\n\r\n"
    responses, closed = exchange(leader.address, b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked"
                                 b"\r\n\r\n%s" % (k4.encode(), big))
    assert [r[0] for r in responses] == [413] and closed, responses
    assert absent(leader, k4)


# ---- issue 17 item 2: forwarding and redirects keep the key ------------------------------------------------------


# (target as sent after /db/, the key it names)
KEYS = [
    (b"f_pct%2541", "f_pct%41"),
    (b"f_q%3Fprev_exist=false", "f_q?prev_exist=false"),
    (b"f_dot/../f_target", "f_dot/../f_target"),
    (b"f%20space", "f space"),
    (b"f_pct_utf8_%C3%A9", "f_pct_utf8_\u00e9"),
    ("f_raw_utf8_\u00e9\u4e2d".encode("utf-8"), "f_raw_utf8_\u00e9\u4e2d"),
    (b"f_hash%23x", "f_hash#x"),
    (b"f_plus+x", "f_plus+x"),
]


def listed(node: Node, prefix: str) -> list[str]:
    return node.request("GET", "/db/?prefix=" + prefix.replace("%", "%25").replace("+", "%2B")).json()["keys"]


@pytest.mark.parametrize("raw,key", KEYS, ids=[k for _, k in KEYS])
def test_forwarding_and_redirects_carry_the_key_as_sent(cluster, raw, key):
    leader = leader_of(cluster)
    follower = next(n for n in cluster.nodes if n is not leader)
    tag = fresh("k").encode()
    target = b"/db/" + tag + raw
    expect = tag.decode() + key
    # Through -forward: the follower proxies to the leader.
    responses, _ = exchange(follower.address, b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n"
                            b"Connection: close\r\n\r\nfwd" % target)
    assert [r[0] for r in responses] == [200], responses
    assert listed(leader, tag.decode()) == [expect]
    # A redirect (a request already forwarded once gets the 307): the Location names the same key.
    responses, _ = exchange(follower.address, b"POST %s HTTP/1.1\r\nHost: localhost\r\nX-Raftdzmq-Forwarded: test\r\n"
                            b"Content-Length: 3\r\nConnection: close\r\n\r\nred" % target)
    assert [r[0] for r in responses] == [307], responses
    location = responses[0][1]["location"]
    assert location.isascii() and " " not in location
    assert location.startswith(f"http://{cluster.leader().status()['leader_http']}/db/")
    path = re.sub(r"^http://[^/]+", "", location).encode()
    responses, _ = exchange(leader.address, b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n"
                            b"Connection: close\r\n\r\nred" % path)
    assert [r[0] for r in responses] == [200], responses
    assert listed(leader, tag.decode()) == [expect]
    responses, _ = exchange(leader.address, b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % target)
    assert responses[0][2] == b"red"


# ---- issue 17 item 3: header size and slow clients ----------------------------------------------------------------


def test_oversized_heads_get_431_or_414(cluster):
    leader = leader_of(cluster)
    for extra, status in (
        (b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(40)), 431),  # 40 KB of fields
        (b"".join(b"X-H%d: v\r\n" % i for i in range(101)), 431),
        (b"X-Long: " + b"x" * 9000 + b"\r\n", 431),
        (b"\r\n" * 20000, 431),  # empty lines: allowed before a request line, not as the head
    ):
        key = fresh("head")
        if extra.startswith(b"\r\n"):
            request = extra + post(key)
        else:
            request = b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\n%sContent-Length: 1\r\n\r\nx" % (key.encode(), extra)
        responses, closed = exchange(leader.address, request)
        assert [r[0] for r in responses] == [status] and closed, (extra[:20], responses)
        assert absent(leader, key)
    responses, closed = exchange(leader.address, b"GET /db/" + b"a" * 17000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert [r[0] for r in responses] == [414] and closed


def test_a_slow_head_or_body_gets_408_and_runs_nothing(cluster):
    leader = leader_of(cluster)
    k1, k2 = fresh("slow"), fresh("slow")
    host, port = leader.address.rsplit(":", 1)
    results = {}

    def drip(name, parts):
        s = socket.create_connection((host, int(port)), timeout=10)
        t0 = time.monotonic()
        try:
            for part in parts:
                s.sendall(part)
                time.sleep(0.3)
        except OSError:
            pass
        results[name] = (exchange(leader.address, b"", sock=s, timeout=10), time.monotonic() - t0)

    head = [b"POST /db/%s HTTP/1.1\r\n" % k1.encode()] + [b"X-%d: v\r\n" % i for i in range(20)]
    body = [b"POST /db/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 20\r\n\r\n" % k2.encode()] + [b"x"] * 19
    threads = [threading.Thread(target=drip, args=a) for a in (("head", head), ("body", body))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name in ("head", "body"):
        (responses, closed), took = results[name]
        assert [r[0] for r in responses] == [408] and closed, (name, responses)
        assert took < RECEIVE_TIMEOUT + 5
    assert absent(leader, k1, k2)


def test_many_huge_heads_at_once_neither_depose_the_leader_nor_bloat_it(cluster):
    leader = leader_of(cluster)
    term = leader.status()["term"]
    rss0 = leader.rss_bytes()
    host, port = leader.address.rsplit(":", 1)
    line = b"X-Big: " + b"x" * 60000 + b"\r\n"
    head = b"GET /db/k HTTP/1.1\r\nHost: localhost\r\n" + line * 100  # ~6 MB, never finished
    statuses = []

    def flood():
        s = socket.create_connection((host, int(port)), timeout=10)
        try:
            s.sendall(head)
        except OSError:
            pass  # the server answered 431 and closed while we were still sending
        statuses.append([r[0] for r in exchange(leader.address, b"", sock=s, timeout=10)[0]])

    threads = [threading.Thread(target=flood) for _ in range(25)]
    for t in threads:
        t.start()
    writes = 0
    while any(t.is_alive() for t in threads):
        assert leader.request("POST", "/db/during-flood", str(writes), timeout=10).status == 200
        writes += 1
    for t in threads:
        t.join()
    assert all(s in ([431], []) for s in statuses) and [431] in statuses, statuses
    # If the term moved, say whether the leader's own loop stalled (its timers late) or the machine did.
    lag = [line for line in leader.request("GET", "/metrics").text.splitlines() if "hub_lag_seconds_bucket" in line]
    assert leader.status()["term"] == term and leader.status()["role"] == "leader", (lag, leader.log_text()[-3000:])
    assert leader.rss_bytes() - rss0 < 100_000 * 1024


STATUS_FLOOD_CLIENT = r"""
import asyncio, sys, time
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
count = 0


async def worker():
    global count
    r, w = await asyncio.open_connection("127.0.0.1", port)
    end = time.time() + seconds
    while time.time() < end:
        w.write(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await r.readexactly(length)
        count += 1


async def main():
    await asyncio.gather(*[worker() for _ in range(n)])

asyncio.run(main())
print(count)
"""


def test_a_flood_of_status_requests_does_not_depose_the_leader(cluster):
    """Review F3, end to end: 200 keep-alive connections sending GET /status as fast as answered, for 10 s, at the
    leader (it moved the term in every 20 s run before TurnGate)."""
    leader = leader_of(cluster)
    term = leader.status()["term"]
    out = subprocess.run([sys.executable, "-c", STATUS_FLOOD_CLIENT, str(leader.http_port), "200", "10"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and int(out.stdout) > 1000, out.stderr[-2000:]
    lag = [line for line in leader.request("GET", "/metrics").text.splitlines() if "hub_lag_seconds_bucket" in line]
    assert leader.status()["term"] == term and leader.status()["role"] == "leader", lag


# ---- issue 17 item 5: idle connections, the connection cap, descriptors ----------------------------------------


def test_idle_connections_are_closed_after_the_idle_timeout(cluster):
    leader = leader_of(cluster)
    s = socket.create_connection(("127.0.0.1", leader.http_port), timeout=IDLE_TIMEOUT + 5)
    t0 = time.monotonic()
    assert s.recv(1) == b""  # the server ends it
    assert IDLE_TIMEOUT - 0.5 < time.monotonic() - t0 < IDLE_TIMEOUT + 4
    s.close()
    # A kept-alive connection too, after its request.
    s = socket.create_connection(("127.0.0.1", leader.http_port), timeout=IDLE_TIMEOUT + 5)
    responses, closed = exchange(leader.address, b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n", sock=s,
                                 timeout=IDLE_TIMEOUT + 5)
    assert [r[0] for r in responses] == [200] and closed
    # Counted and logged (review 2, minor): evictions were neither.
    metrics = leader.request("GET", "/metrics").text
    assert re.search(r'^raftdzmq_http_evictions_total\{reason="idle_timeout"\} [1-9]', metrics, re.M), metrics
    assert re.search(r"^raftdzmq_out_of_descriptors 0", metrics, re.M)
    assert "(idle timeout)" in leader.log_text()


def test_a_client_that_never_reads_its_answers_is_cut_off(tmp_path):
    """Every wait has a bound, sending too: 40 pipelined GETs of a 1 MiB value, never read, fill the socket
    buffers; the node closes the connection once the request has outlived receiving + its route's bounds +
    -idle-timeout (1 + 2 x 0.5 + 1 + 1 = 4 s here), rather than hold it and its memory for ever."""
    n = Node("one", str(tmp_path)).start("-idle-timeout", "1", "-receive-timeout", "1", "-write-timeout", "0.5",
                                         "-read-timeout", "0.5")
    try:
        wait_for(lambda: n.status()["role"] == "leader", 10, "a leader")
        assert n.request("POST", "/db/big", b"x" * (1 << 20)).status == 200
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", n.http_port))
        s.sendall(b"GET /db/big?consistency=stale HTTP/1.1\r\nHost: localhost\r\n\r\n" * 40)
        time.sleep(7)
        received, closed = 0, False
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
        else:
            closed = True
        s.close()
        assert closed and received < 20 << 20, received
        assert n.request("GET", "/db/big?consistency=stale").status == 200
        assert "Traceback" not in n.log_text()
    finally:
        n.kill()


def test_slowloris_cannot_lock_clients_out_of_a_full_server(tmp_path):
    """Review F4: connections that send one byte of a request and stall count as busy, and only idle ones were
    evicted when the pool was full: a normal request waited until -receive-timeout freed a place. Now the one that
    has spent longest receiving goes."""
    n = Node("one", str(tmp_path)).start("-max-connections", "40", "-receive-timeout", "20")
    stalled = []
    try:
        wait_for(lambda: n.status()["role"] == "leader", 10, "a leader")
        for _ in range(60):  # 40 fill the pool, 20 more wait in the backlog
            s = socket.create_connection(("127.0.0.1", n.http_port), timeout=10)
            s.sendall(b"G")
            stalled.append(s)
        time.sleep(0.5)
        for _ in range(3):
            t0 = time.monotonic()
            assert n.request("GET", "/status", timeout=30).status == 200
            took = time.monotonic() - t0
            assert took < 5, took  # it waited for -receive-timeout (20 s) before
        assert "Traceback" not in n.log_text()
        metrics = n.request("GET", "/metrics", timeout=30).text
        assert re.search(r'^raftdzmq_http_evictions_total\{reason="full_receiving"\} [1-9]', metrics, re.M), metrics
        assert "(full receiving)" in n.log_text()
    finally:
        for s in stalled:
            s.close()
        n.kill()


def test_refused_connections_held_open_cannot_lock_clients_out_of_a_full_server(tmp_path):
    """Review edge L4: a refused request (403, another site's Host) drains its connection for up to 1 s after the
    answer, and was neither idle nor receiving meanwhile, so nothing could be evicted: a flood of them, held open,
    kept the pool full and a normal request waited in the backlog behind them. Now a draining one goes first."""
    n = Node("one", str(tmp_path)).start("-max-connections", "20")
    refused = b"GET /status HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    stop = threading.Event()
    held: list[socket.socket] = []

    def flood():  # 50 refused connections a second, each held open 3 s (the pool drains 20 a second unevicted)
        opened: list[tuple[float, socket.socket]] = []
        while not stop.wait(0.02):
            try:
                s = socket.create_connection(("127.0.0.1", n.http_port), timeout=0.5)
            except OSError:  # the backlog is full: the next one
                continue
            opened.append((time.monotonic(), s))
            try:
                s.sendall(refused)
            except OSError:
                pass
            while opened and time.monotonic() - opened[0][0] > 3:
                opened.pop(0)[1].close()
        held.extend(s for _, s in opened)

    flooder = threading.Thread(target=flood)
    try:
        wait_for(lambda: n.status()["role"] == "leader", 10, "a leader")
        flooder.start()
        time.sleep(3)
        for _ in range(3):
            t0 = time.monotonic()
            assert n.request("GET", "/status", timeout=30).status == 200
            took = time.monotonic() - t0
            assert took < 1, took
        stop.set()
        flooder.join(10)
        assert "Traceback" not in n.log_text()
        metrics = n.request("GET", "/metrics", timeout=30).text
        assert re.search(r'^raftdzmq_http_evictions_total\{reason="full_draining"\} [1-9]', metrics, re.M), metrics
        assert "(full draining)" in n.log_text()
    finally:
        stop.set()
        if flooder.is_alive():
            flooder.join(10)
        for s in held:
            s.close()
        n.kill()


def test_out_of_descriptors_the_leader_keeps_serving_and_replicating(tmp_path):
    """Issue 17 item 5: the leader under `ulimit -n 300` with 290 idle HTTP connections open, and a follower that
    pauses (so the leader's sender reconnects): new requests are served, and the follower hears from the leader
    again afterwards."""
    nofile = ("prlimit", "--nofile=300:300", "--")
    nodes = [Node("node.1", str(tmp_path), wrap=nofile)] + [Node(f"node.{i}", str(tmp_path)) for i in (2, 3)]
    c = LocalCluster(str(tmp_path), nodes=nodes, extra=("-idle-timeout", "60")).start()
    idle = []
    try:
        leader = c.leader()
        assert leader is nodes[0]
        term = leader.status()["term"]
        for _ in range(290):
            idle.append(socket.create_connection(("127.0.0.1", leader.http_port), timeout=10))
        t0 = time.monotonic()
        assert leader.request("POST", "/db/k", "1", timeout=10).status == 200
        assert time.monotonic() - t0 < 5  # not after the 60 s idle timeout: the cap closes the longest idle
        follower = nodes[1]
        os.kill(follower.proc.pid, signal.SIGSTOP)
        try:
            more = [socket.create_connection(("127.0.0.1", leader.http_port), timeout=10) for _ in range(50)]
            idle += more
            time.sleep(1.0)  # the leader's sender to it times out and reconnects meanwhile
            assert leader.request("POST", "/db/k", "2", timeout=10).status == 200
        finally:
            os.kill(follower.proc.pid, signal.SIGCONT)
        wait_for(lambda: follower.request("GET", "/db/k?consistency=stale").body == b"2", 10, "the follower to catch up")
        assert leader.status()["term"] == term
        assert "Too many open files" not in leader.log_text() and "Traceback" not in leader.log_text()
    finally:
        for s in idle:
            s.close()
        c.stop()


# The ZMTP 3.0 greeting and READY of a REQ socket with the NULL mechanism: what any zmq client sends, no secret
# needed (RFC 23/ZMTP).
ZMTP_NULL_REQ = (b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
                 + b"\x04\x1a\x05READY\x0bSocket-Type\x00\x00\x00\x03REQ")


class RaftPortSquatter:
    """Holds `count` TCP connections to a Raft port, each sending `hello` (b"" for none), and opens a new one for
    each the node closes, at most `reconnects_per_second` (a persistent attacker that keeps the count up)."""

    def __init__(self, port: int, count: int, hello: bytes, reconnects_per_second: float = 200.0) -> None:
        self.port, self.count, self.hello = port, count, hello
        self.pause_seconds = 1.0 / reconnects_per_second
        self.closed_by_node = 0
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            if self.hello:
                s.sendall(self.hello)
            s.setblocking(False)
            self._socks.append(s)
        except OSError:
            time.sleep(0.05)

    def _run(self) -> None:
        while not self._stop.is_set():
            if len(self._socks) < self.count:
                self._open()
                time.sleep(self.pause_seconds)
                continue
            for s in list(self._socks):
                try:
                    if s.recv(65536) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:
                    self.closed_by_node += 1
                    self._socks.remove(s)
                    s.close()
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self._socks:
            s.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("with_secret", [False, True], ids=["no secret", "secret"])
def test_strangers_on_the_raft_port_cannot_use_up_the_leaders_descriptors(tmp_path, with_secret):
    """Review F1: 420 connections to the leader's Raft port, each doing the ZMTP NULL handshake of a REQ socket
    (no secret needed), were all kept by zmq: the leader (ulimit -n 400) ran out of descriptors, HTTP stopped
    answering, accept() logged a traceback every second, and the next snapshot died with EMFILE. Here 420 such
    connections and 100 that send nothing, kept up by reconnecting, against a leader with -snapshot-threshold
    small enough to snapshot several times meanwhile: it serves, replicates and snapshots throughout."""
    extra = ["-snapshot-threshold", "65536"]
    if with_secret:
        with open(tmp_path / "secret", "w") as f:
            f.write("squatters-do-not-know-this\n")
        extra += ["-secret-file", str(tmp_path / "secret")]
    nofile = ("prlimit", "--nofile=400:400", "--")
    nodes = [Node("node.1", str(tmp_path), wrap=nofile)] + [Node(f"node.{i}", str(tmp_path)) for i in (2, 3)]
    c = LocalCluster(str(tmp_path), nodes=nodes, extra=tuple(extra)).start()
    squatters = []
    try:
        leader = c.leader()
        assert leader is nodes[0]
        term = leader.status()["term"]
        squatters = [RaftPortSquatter(leader.port, 420, ZMTP_NULL_REQ), RaftPortSquatter(leader.port, 100, b"")]
        deadline = time.monotonic() + 8
        writes, most_fds = 0, 0
        while time.monotonic() < deadline:
            r = leader.request("POST", f"/db/k{writes % 20}", b"v" * 3000, timeout=10)
            assert r.status == 200, (writes, r, leader.log_text()[-2000:])
            assert leader.request("GET", "/status", timeout=10).status == 200
            writes += 1
            most_fds = max(most_fds, _fds(leader.proc.pid))
        follower = nodes[1]
        wait_for(lambda: follower.request("GET", "/db/k0?consistency=stale").body == b"v" * 3000, 10, "replication")
        status = leader.status()
        assert status["snapshot_index"] > 0 and status["term"] == term and status["role"] == "leader", status
        assert not leader.exited()
        assert sum(s.closed_by_node for s in squatters) > 0  # the node closed squatters rather than keep them
        text = leader.log_text()
        assert "Traceback" not in text and "storage failed" not in text, text[-3000:]
        print(f"writes {writes}, most descriptors {most_fds}/400, squatters closed "
              f"{[s.closed_by_node for s in squatters]}")
    finally:
        for s in squatters:
            s.stop()
        c.stop()


FLOOD_CLIENT = r"""
import asyncio, sys, time
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])


async def worker():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    end = time.time() + seconds
    while time.time() < end:
        w.write(b"GET /db/?consistency=stale&limit=200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await r.readuntil(b"}\n")


async def main():
    await asyncio.gather(*[worker() for _ in range(n)])

asyncio.run(main())
"""

TURNS_UNDER_A_FLOOD = r"""
from gevent import monkey
monkey.patch_all()
import bisect, json, subprocess, sys, time, types
sys.path.insert(0, sys.argv[1])
import gevent, gevent.socket
from raftlib import Role
from raftlib.server.api import Api, make_app
from raftlib.server.edge import EdgeServer
from raftlib.server.metrics import Metrics
from raftlib.server.store import SET, KeyValueStore, command

CONNECTIONS, SECONDS, CLIENT = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
listener = gevent.socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
kv = KeyValueStore()
for i in range(1000):
    kv.apply(i + 1, command(SET, "key%04d" % i, b"v"))
# The real routes on a stand-in runtime; the client lists a page of keys, a stale read (no Raft): ~0.3 ms each.
node = types.SimpleNamespace(node_id="n", last_applied=0, leader_id="n", role=Role.LEADER, removed=None)
app = make_app(Api(types.SimpleNamespace(node=node, restoring_snapshot=False), kv, Metrics()))
served = [0]
starts = []  # when each request started (perf_counter)


def counting(environ, start_response):  # plus 1 ms of work: more than the client needs to send the next request
    served[0] += 1
    t = time.perf_counter()
    starts.append(t)
    while time.perf_counter() - t < 0.001:
        pass
    return app(environ, start_response)


server = EdgeServer(listener, counting, max_connections=1000, idle_timeout_seconds=60, receive_timeout_seconds=60,
                    busy_timeout_seconds=120, max_header_bytes=32768, max_body_bytes=1024)
server.start()
client = subprocess.Popen([sys.executable, "-c", CLIENT, str(listener.getsockname()[1]), str(CONNECTIONS),
                           str(SECONDS)])
gevent.sleep(1.0)  # the connections are up and busy
lags, overdue = [], []
end = time.monotonic() + SECONDS - 2
while time.monotonic() < end:  # how late a 10 ms timer fires: what a Raft tick or heartbeat would see
    due = time.perf_counter() + 0.01
    gevent.sleep(0.01)
    woke = time.perf_counter()
    lags.append(woke - due)
    # The requests the loop started while the timer was due: what held it, counted in this process's own work (a
    # wait for a core, on a loaded machine, delays the timer too but starts no request).
    overdue.append(bisect.bisect_left(starts, woke) - bisect.bisect_right(starts, due))
client.wait()
lags.sort()
overdue.sort()
print(json.dumps({"served": served[0], "samples": len(lags), "p50": lags[len(lags) // 2],
                  "p90": lags[len(lags) * 9 // 10], "max": lags[-1], "overdue_p50": overdue[len(overdue) // 2],
                  "overdue_p90": overdue[len(overdue) * 9 // 10], "overdue_max": overdue[-1],
                  "waited": getattr(server, "gate", None) and server.gate.waited}))
"""


def test_many_ready_connections_do_not_stall_the_loops_timers():
    """Review F3: 200 keep-alive connections sending GET /status as fast as answered moved the leader's term in every
    run: one turn of the event loop ran every ready connection's request before any timer (hub lag 0.25-1.0 s),
    and the stall grows with the number of connections once the server is saturated (each request costs more than
    the client needs to send the next one, so every connection is ready at every turn). Here 150 connections list
    a page of keys through the real routes, with 1 ms of extra work each: without a bound a 10 ms timer fired
    ~135 ms late (p50; checked); with TurnGate's 5 ms budget, within a few ms. Judged by the requests the loop
    started while a 10 ms timer was due (about two budgets' worth at most: 3-8 seen, against 560-1,980 with no
    gate), not by the timer's lateness in milliseconds: on a machine at load 12 and more the process's waits for a
    core made the timer late too, and the test failed with the gate working."""
    out = subprocess.run([sys.executable, "-c", TURNS_UNDER_A_FLOOD, ROOT, "150", "6", FLOOD_CLIENT],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["overdue_p50"] <= 12 and result["overdue_p90"] <= 20, result
    # The flood saturated the server (without that the gate has nothing to hold): most requests found the budget of
    # their turn spent.
    assert result["served"] > 100 and result["waited"] > result["served"] / 2, result


def test_the_turn_gate_never_arms_a_second_timer_when_an_admitted_request_enters_again():
    """The 5,000,000-key scale run logged `AttributeError: 'NoneType' object has no attribute 'close'` from
    TurnGate._admit: a request admitted by it that entered again before blocking (its connection's next request,
    already read) armed a timer of its own, and _admit's end armed another over it; the orphan, firing after the
    queue emptied, found `_timer` None (requests left waiting after that were stuck until another one came). Here
    every request enters three times in a row under a zero budget: at every arming, no other timer of the gate may
    still be armed, and every request must get through."""
    from raftlib.server.edge import TurnGate

    gate = TurnGate(0.0)
    armed: list = []
    overlaps: list[int] = []
    real_loop = gate._loop

    class CountingLoop:
        iteration = property(lambda self: real_loop.iteration)

        def timer(self, after):
            overlaps.append(sum(t.active for t in armed))
            armed.append(real_loop.timer(after))
            return armed[-1]

    gate._loop = CountingLoop()
    done = []

    def request(n):
        for _ in range(3):
            gate.enter()
        done.append(n)

    greenlets = [gevent.spawn(request, n) for n in range(6)]
    gevent.joinall(greenlets, timeout=10)
    assert sorted(done) == list(range(6)), done
    assert armed and max(overlaps) == 0, overlaps
    assert gate._timer is None and not gate._waiting


ONE_SEND_SERVER = r"""
from gevent import monkey
monkey.patch_all()
import json, socket, sys
sys.path.insert(0, sys.argv[1])
import gevent, gevent.socket
from raftlib.server import edge

sends = []  # every send of every answer, as the handler made it
socket_calls = []  # what EdgeHandler._sendall asked of its socket: ["send", bytes, taken], ["sendall", bytes]


class RecordingSocket:
    def __init__(self, sock):
        self.sock = sock

    def send(self, data):
        taken = self.sock.send(data)
        socket_calls.append(["send", len(data), taken])
        return taken

    def sendall(self, data):
        socket_calls.append(["sendall", len(data)])
        return self.sock.sendall(data)


real_sendall = edge.EdgeHandler._sendall


def recording_sendall(self, data):
    sends.append(bytes(data))
    sock, self.socket = self.socket, RecordingSocket(self.socket)
    try:
        return real_sendall(self, data)
    finally:
        self.socket = sock


edge.EdgeHandler._sendall = recording_sendall
BIG = b"b" * (edge.ONE_SEND_BODY_BYTES + 1)
HUGE = bytes(range(256)) * 4096  # 1 MiB: more than one send takes (SO_SNDBUF); the reader, in this process, waits


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/stream":  # no Content-Length: chunked, one chunk a piece
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"first", b"second"])  # an iterator: pywsgi cannot sum a Content-Length
    body = {"/small": b'{"succeeded": true}\n', "/big": BIG, "/empty": b"", "/huge": HUGE}[path]
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


listener = gevent.socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # the connections' too: a socket takes ~128 KiB a send
listener.bind(("127.0.0.1", 0))
listener.listen(16)
server = edge.EdgeServer(listener, app, max_connections=10, idle_timeout_seconds=10, receive_timeout_seconds=10,
                         busy_timeout_seconds=10, max_header_bytes=8192, max_body_bytes=1024)
server.start()
out = {}
for path in ("/small", "/empty", "/big", "/stream", "/huge"):
    del sends[:], socket_calls[:]
    client = gevent.socket.create_connection(listener.getsockname(), timeout=10)
    client.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    client.close()
    out[path] = {"sends": [s.decode("latin-1") for s in sends], "received": received.decode("latin-1"),
                 "socket_calls": socket_calls[:]}
server.stop(timeout=5)
print(json.dumps(out))
"""


def test_a_small_answer_goes_out_in_one_send_with_its_head():
    """pywsgi sends an answer's head and its body apart: two syscalls and two segments (TCP_NODELAY), each waking
    the client; a 10-put transaction's answer cost the leader ~35 us more than a write's empty one
    (docs/BENCHMARKS.md). EdgeHandler sends a body of up to ONE_SEND_BODY_BYTES with its head; a bigger one, an
    empty one and a chunked stream go as before, and every answer arrives whole: a 1 MiB one to a reader that waits
    too. EdgeHandler._sendall: a small answer goes in one plain send (no sendall: its getsockopt); of the 1 MiB
    body, the one send takes a part (~128 KiB) and sends that wait for room the rest (EdgeHandler._send_held: no
    sendall, so the budget of unsent answers hears of each send that took bytes), asserted so (review edge30 Q3)."""
    out = subprocess.run([sys.executable, "-c", ONE_SEND_SERVER, ROOT], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    small = result["/small"]
    assert len(small["sends"]) == 1, small["sends"]
    answer_bytes = len(small["sends"][0])
    assert small["socket_calls"] == [["send", answer_bytes, answer_bytes]], small  # one send took it: no sendall
    assert small["sends"][0] == small["received"]
    assert small["received"].startswith("HTTP/1.1 200 OK\r\n")
    assert small["received"].endswith('\r\n\r\n{"succeeded": true}\n')
    assert "Content-Length: 20\r\n" in small["received"]
    for path in ("/empty", "/big"):  # pywsgi's own way: the head alone first
        sends = result[path]["sends"]
        assert sends[0].endswith("\r\n\r\n") and "".join(sends) == result[path]["received"], path
    big = result["/big"]["received"]
    assert big.endswith("\r\n\r\n" + "b" * (len(big) - big.index("\r\n\r\n") - 4))
    assert len(big) - big.index("\r\n\r\n") - 4 > 16384
    stream = result["/stream"]["received"]
    assert "Transfer-Encoding: chunked\r\n" in stream
    assert stream.endswith("\r\n\r\n5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"), stream
    assert len(result["/stream"]["sends"]) >= 2  # the first chunk with the head, then each further piece
    huge = result["/huge"]["received"].encode("latin-1")  # EdgeHandler._sendall: what its one send left, sent after
    assert huge.endswith(b"\r\n\r\n" + bytes(range(256)) * 4096) and b"Content-Length: 1048576\r\n" in huge
    assert len(result["/huge"]["sends"]) == 2, result["/huge"]["sends"]  # the head alone, then the body
    calls = result["/huge"]["socket_calls"]  # the head in one send; the body's one send partial, sends the rest
    (_, head, head_taken), (_, asked, taken), rest = calls[0], calls[1], calls[2:]
    assert head_taken == head and asked == 1 << 20 and 0 < taken < asked, calls
    left = asked - taken  # each of the rest's sends (EdgeHandler._send_held) asked for all that was left
    for call, n, took in rest:
        assert call == "send" and n == left, calls
        left -= took
    assert rest and left == 0, calls


FULL_SOCKET_SERVER = r"""
from gevent import monkey
monkey.patch_all()
import json, sys
sys.path.insert(0, sys.argv[1])
import gevent, gevent.socket
from raftlib.server import edge

ANSWER = b"a" * 1000


def app(environ, start_response):
    # The connection's socket full, as a client that has not taken an earlier answer leaves it.
    sock = environ["raftdzmq.handler"].socket._sock
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(ANSWER)))])
    return [ANSWER]


listener = edge.listen("127.0.0.1", 0)
server = edge.EdgeServer(listener, app, max_connections=4, idle_timeout_seconds=10, receive_timeout_seconds=10,
                         busy_timeout_seconds=10, max_header_bytes=8192, max_body_bytes=1024)
server.start()
client = gevent.socket.create_connection(listener.getsockname(), timeout=10)
client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
gevent.sleep(0.5)  # the answer's send waits for room meanwhile
waiting = [server.unsent_bytes, len(server.holding)]
received = b""
while chunk := client.recv(1 << 20):
    received = (received + chunk)[-4096:]
after = [server.unsent_bytes, len(server.holding)]
server.stop(timeout=5)
print(json.dumps({"waiting": waiting, "after": after, "tail": received.decode("latin-1")}))
"""


def test_an_answer_whose_first_send_finds_the_socket_full_counts_in_the_budget():
    """Review ef: EdgeHandler._sendall's first send was gevent's, which waits for room when the socket is full (a
    client that has not taken its last answer, pipelining): the answer was not counted in the node's budget of
    unsent answers while it waited. The first send is now the OS socket's, which never waits: an answer it takes
    nothing of is held (EdgeServer.hold) until sent, then let go, and arrives whole."""
    out = subprocess.run([sys.executable, "-c", FULL_SOCKET_SERVER, ROOT], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    head_and_body = result["tail"][result["tail"].index("HTTP/1.1 200 OK"):]
    assert head_and_body.endswith("\r\n\r\n" + "a" * 1000), result["tail"]
    assert result["waiting"] == [len(head_and_body), 1], result  # held: the head and body in one send
    assert result["after"] == [0, 0], result


def _answering_server(app, max_body_bytes: int = MAX_BODY, **options) -> EdgeServer:
    """An EdgeServer in this process on `app`, started, its bounds wide enough never to act in a test."""
    server = EdgeServer(listen("127.0.0.1", 0), app, max_connections=4, idle_timeout_seconds=5.0,
                        receive_timeout_seconds=5.0, busy_timeout_seconds=10.0, max_header_bytes=8192,
                        max_body_bytes=max_body_bytes, **options)
    server.start()
    return server


def test_a_body_of_tiny_chunks_is_refused_at_its_chunk_bound_in_bounded_time():
    """Review edge Q1: a 3.67 MB body of 524,280 two-byte chunks, within a 1 MiB -max-body, cost 2.6 s of the loop
    (and an object a chunk). Its chunks are now bounded (MAX_BODY_CHUNKS): 413 with the reason, in a bounded CPU
    time of this process (server and client both); a body of MAX_BODY_CHUNKS tiny chunks still arrives whole."""
    def app(environ, start_response):
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    head = b"POST /db/chunky HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = _answering_server(app, max_body_bytes=1 << 20)

    def answer(chunks: int) -> tuple[bytes, float]:
        """The answer to a body of `chunks` chunks of `ab`, and the CPU time it took."""
        client = gevent.socket.create_connection(server.address, timeout=30.0)

        def send():
            try:
                client.sendall(head + b"2\r\nab\r\n" * chunks + b"0\r\n\r\n")
            except OSError:  # refused: the server closes once it has drained what it reads
                pass

        started = time.process_time()
        sender = gevent.spawn(send)
        try:
            received = b""
            with gevent.Timeout(60):
                while not (match := re.search(rb"Content-Length: (\d+)\r\n.*?\r\n\r\n", received, re.S)) or \
                        len(received) < match.end() + int(match[1]):
                    piece = client.recv(65536)
                    assert piece, received
                    received += piece
            return received, time.process_time() - started
        finally:
            sender.kill()
            client.close()

    try:
        whole, _ = answer(edge.MAX_BODY_CHUNKS)
        assert whole.startswith(b"HTTP/1.1 200 OK\r\n") and whole.endswith(b"\r\n\r\n" + b"ab" * edge.MAX_BODY_CHUNKS)
        refused, cpu_seconds = answer(524_280)
        assert refused.startswith(b"HTTP/1.1 413 "), refused
        assert refused.endswith(b"\r\n\r\nchunked body of over %d chunks; send larger chunks\n" % edge.MAX_BODY_CHUNKS)
        assert cpu_seconds < 0.25, cpu_seconds  # 0.7-0.9 s here before (the review: 2.6 s of a node's loop)
    finally:
        server.stop(timeout=5.0)


def test_an_answer_a_client_reset_is_logged_undelivered(caplog):
    """EdgeHandler._sendall keeps pywsgi's bookkeeping: when a send fails, the code is negated, and the access log
    says `200-undelivered` (review edge30 Q2: with the negation removed it said `200`)."""
    body = b"x" * (4 << 20)  # more than the socket takes: the handler is in sendall when the client goes

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]

    server = _answering_server(app, access_log=True)
    client = gevent.socket.create_connection(server.address, timeout=5.0)
    try:
        with caplog.at_level("INFO", logger="raftdzmq.access"):
            client.sendall(b"GET /huge HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert client.recv(1000).startswith(b"HTTP/1.1 200 OK\r\n")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset, mid-answer
            with gevent.Timeout(5.0):
                while not caplog.messages:
                    gevent.sleep(0.01)
        assert len(caplog.messages) == 1 and " /huge 200-undelivered 4194304 " in caplog.messages[0], caplog.messages
    finally:
        client.close()
        server.stop(timeout=5.0)


def test_a_stream_that_fails_after_its_first_chunk_gets_no_error_page_in_it():
    """EdgeHandler._sendall keeps pywsgi's response_length: when the application raises after a chunk went out,
    pywsgi closes the connection rather than write a 500 into the 200 answer already under way (review edge30 Q2:
    without the count, `15\\r\\nInternal Server Error\\r\\n` followed the first chunk)."""
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])  # no Content-Length: chunked

        def chunks():
            yield b"first"
            raise RuntimeError("a route that fails mid-stream (this test's)")

        return chunks()

    server = _answering_server(app)
    client = gevent.socket.create_connection(server.address, timeout=5.0)
    try:
        client.sendall(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = b""
        with gevent.Timeout(5.0):
            while chunk := client.recv(65536):
                received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in head, received
        assert rest == b"5\r\nfirst\r\n", received  # then closed: the client sees no end chunk, no error page
    finally:
        client.close()
        server.stop(timeout=5.0)


def test_one_send_answers_on_a_node_head_pipelined_and_past_the_bound(cluster):
    """EdgeHandler._write_with_headers copies pywsgi's (gevent 26.9): on a real node, pipelined keep-alive requests
    in one send get their answers whole and in order on the one connection: HEAD (a Content-Length, no body bytes),
    small bodies (one send with the head) and a transaction's answer past ONE_SEND_BODY_BYTES (pywsgi's two sends),
    each with the Content-Length of its body, nothing left over, the connection kept."""
    leader = leader_of(cluster)
    prefix, small = fresh("onesend") + "/", fresh("onesend-small")
    values = {f"{prefix}{i}": (chr(ord("a") + i) * (MAX_BODY - 200)).encode() for i in range(6)}
    for key, value in [*values.items(), (small, b"tiny")]:
        assert leader.request("POST", f"/db/{key}", value).status == 200
    get_all = json.dumps({"success": [{"op": "get", "prefix": prefix}]}).encode()
    put_one = json.dumps({"success": [{"op": "put", "key": small, "value": "again"}]}).encode()

    def request(method: str, path: str, body: bytes = b"") -> bytes:
        return b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (
            method.encode(), path.encode(), len(body), body)

    sent = [("HEAD", f"/db/{small}", b""), ("GET", f"/db/{small}", b""), ("POST", "/txn", get_all),
            ("HEAD", f"/db/{fresh('onesend-missing')}", b""), ("HEAD", "/status", b""), ("POST", "/txn", put_one),
            ("GET", f"/db/{small}", b"")]
    received, closed = receive(leader.address, b"".join(request(*r) for r in sent), timeout=2.0)
    assert not closed, received[-300:]
    answers = []
    for method, _, _ in sent:
        end = received.index(b"\r\n\r\n")
        head, received = received[:end].decode("latin-1"), received[end + 4:]
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head.split("\r\n")[1:])}
        assert "transfer-encoding" not in headers, head
        length = int(headers["content-length"])
        taken = 0 if method == "HEAD" else length  # a HEAD answer's Content-Length is its GET's, with no body
        assert len(received) >= taken, (head, len(received))
        answers.append((int(head.split(" ", 2)[1]), length, received[:taken]))
        received = received[taken:]
    assert received == b""  # no body bytes of a HEAD, nothing twice
    assert [a[0] for a in answers] == [200, 200, 200, 404, 200, 200, 200], answers
    assert answers[0][1] == 4 and answers[1][2] == b"tiny"  # HEAD: the GET's length
    status, length, body = answers[2]
    assert length == len(body) > ONE_SEND_BODY_BYTES, length
    got = json.loads(body)["results"][0]["kvs"]
    assert {kv["key"]: kv["value"].encode() for kv in got} == values
    assert answers[3][1] > 0 and answers[4][1] > 0  # HEAD's lengths: a 404's reason, the status JSON
    assert json.loads(answers[5][2])["succeeded"] is True and answers[6][2] == b"again"


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    """Review F1 (b): a node started under a low soft limit (1,024 is common) raises it to the hard limit, and
    sizes its default HTTP connection cap from that."""
    n = Node("one", str(tmp_path), wrap=("prlimit", "--nofile=256:4096", "--")).start()
    try:
        with open(f"/proc/{n.proc.pid}/limits") as f:
            row = next(line for line in f if line.startswith("Max open files")).split()
        assert row[3:5] == ["4096", "4096"], row
        held = [socket.create_connection(("127.0.0.1", n.http_port), timeout=10) for _ in range(300)]
        try:  # more than (256 - 100) / 2 = 78 connections are served at once: the cap came from 4,096
            time.sleep(0.5)
            assert n.request("GET", "/status").status == 200
            assert _fds(n.proc.pid) > 300
        finally:
            for s in held:
                s.close()
    finally:
        n.kill()


ACCEPT_OUT_OF_DESCRIPTORS = r"""
from gevent import monkey
monkey.patch_all()
import io, json, logging, os, resource, sys
sys.path.insert(0, sys.argv[1])
import gevent, gevent.socket
from raftlib.server.edge import EdgeServer

out = io.StringIO()
logging.basicConfig(stream=out, level=logging.INFO)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
listener = gevent.socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)


def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


server = EdgeServer(listener, app, max_connections=50, idle_timeout_seconds=30, receive_timeout_seconds=30,
                    busy_timeout_seconds=60, max_header_bytes=32768, max_body_bytes=1024)
server.start()
hog = []
while True:  # every descriptor this process may have
    try:
        hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
print(listener.getsockname()[1], flush=True)
gevent.socket.wait_read(0)  # the test's clients connect and send; accept fails meanwhile; then a line comes
os.read(0, 100)
for fd in hog:
    os.close(fd)
gevent.sleep(3)
server.stop()
sys.stderr.write(out.getvalue())
"""


def test_out_of_descriptors_accept_pauses_and_says_so_once_a_second():
    """Review F1: with the process out of descriptors, gevent's accept() logged an EMFILE traceback every second (and
    retried at once, in a busy loop). Now it pauses, logs at most once a second, and the connections that waited in
    the backlog are served once descriptors are back."""
    p = subprocess.Popen([sys.executable, "-c", ACCEPT_OUT_OF_DESCRIPTORS, ROOT], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        port = int(p.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        for c in clients:
            c.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        time.sleep(3.5)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        answers = [c.recv(100) for c in clients]
        for c in clients:
            c.close()
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    log = err.decode()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), (answers, log)
    assert "Traceback" not in log and "Too many open files" in log, log
    assert 2 <= log.count("cannot accept HTTP connections") <= 5, log


SENDER_SURVIVES_EMFILE = r"""
from gevent import monkey
monkey.patch_all()
import errno, socket, sys, gevent, zmq.green as zmq
from raftlib import RequestVote
from raftlib.transport import ZmqTransport

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

port = free_port()
got = []
a = ZmqTransport("a", f"127.0.0.1:{free_port()}", lambda m, r: [], reply_timeout_seconds=0.2)
a.start()
context, real_socket, failures = a._context, type(a._context).socket, [0]

class Exhausted(type(a._context)):
    def socket(self, kind, *args, **kwargs):
        if kind == zmq.REQ and failures[0] < 5:
            failures[0] += 1
            raise zmq.ZMQError(errno.EMFILE)
        return real_socket(self, kind, *args, **kwargs)

a._context.__class__ = Exhausted  # the next 5 REQ sockets fail to open: "Too many open files"
a.set_peers({"b": f"127.0.0.1:{port}"})
b = ZmqTransport("b", f"127.0.0.1:{port}", lambda m, r: got.extend(m) or [], reply_timeout_seconds=0.2)
b.start()
for _ in range(100):
    a.send([RequestVote("a", "b", 2, 0, 0)])
    gevent.sleep(0.05)
    if got:
        break
print("failures", failures[0], "delivered", len(got))
"""


def test_a_peer_sender_survives_running_out_of_descriptors():
    out = subprocess.run([sys.executable, "-c", SENDER_SURVIVES_EMFILE], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    words = out.stdout.split()
    assert words[:2] == ["failures", "5"] and int(words[3]) > 0, out.stdout + out.stderr


# ---- issue 17 item 7: a page of keys does not walk the key set ---------------------------------------------------


STORE_PAGES = r"""
import io, json, random, sys, types
sys.path.insert(0, sys.argv[1])
from raftlib import Role
from raftlib.server.api import Api, make_app
from raftlib.server.metrics import Metrics
from raftlib.server.store import COMPARE_AND_SET, CREATE, DELETE, SET, KeyValueStore, command


class NoWalk(dict):
    def __iter__(self):
        raise AssertionError("a listing walked the whole key set")

    keys = values = items = __iter__


rng = random.Random(7)
kv = KeyValueStore()
model = {}
for i in range(20000):
    key = "".join(rng.choice("ab/\u00e9") for _ in range(rng.randint(1, 6)))
    op = rng.choice([SET, SET, DELETE, COMPARE_AND_SET, CREATE])
    kv.apply(i + 1, command(op, key, b"v%d" % i, model.get(key)))
    if op == DELETE:
        model.pop(key, None)
    elif op != CREATE or key not in model:
        model[key] = b"v%d" % i
assert {k: r[0] for k, r in kv.data.items()} == model and list(kv.keys) == sorted(model)
restored = KeyValueStore()
restored.restore(kv.snapshot())
assert list(restored.keys) == sorted(model)
kv.data = NoWalk(kv.data)

# The listing route itself, on a stand-in runtime (stale reads need no Raft).
node = types.SimpleNamespace(node_id="n", last_applied=0, leader_id="n", role=Role.LEADER, removed=None)
app = make_app(Api(types.SimpleNamespace(node=node, restoring_snapshot=False), kv, Metrics()))


def get(query):
    answer = []
    body = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/db/", "QUERY_STRING": query, "SERVER_NAME": "x",
                "SERVER_PORT": "1", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http"},
               lambda status, headers, exc_info=None: answer.append(status))
    return answer[0], b"".join(body)


checked = 0
for prefix in ["", "a", "ab", "b/", "\u00e9", "zz"]:
    for after in ["", "a", "ab/", "b", "\u00e9\u00e9", "zzz"]:
        for limit in [1, 3, 1000]:
            want = sorted(k for k in model if k.startswith(prefix) and k > after)
            q = "consistency=stale&limit=%d&prefix=%s&after=%s" % (limit, prefix.encode().decode("latin-1"),
                                                                after.encode().decode("latin-1"))
            status, body = get(q.replace("/", "%2F"))
            assert status.startswith("200"), (status, body[:300])
            assert json.loads(body) == {"keys": want[:limit], "next": want[limit - 1] if len(want) > limit else None}
            checked += 1
print(json.dumps({"checked": checked, "keys": len(model)}))
"""


def test_pages_of_keys_are_right_and_never_walk_the_whole_key_set():
    """Issue 17 item 7, without a clock: the listing route answers from the ordered keys, and would fail (500) if
    it walked the map of all keys to sort it."""
    out = subprocess.run([sys.executable, "-c", STORE_PAGES, ROOT], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["checked"] == 108 and result["keys"] > 1000


def test_listing_through_http_uses_the_ordered_keys(cluster):
    leader = leader_of(cluster)
    prefix = fresh("list") + "/"
    for k in ("b", "a", "c/1", "c/0"):
        assert leader.request("POST", f"/db/{prefix}{k}", k).status == 200
    assert leader.request("DELETE", f"/db/{prefix}b").status == 200
    r = leader.request("GET", f"/db/?prefix={prefix}&limit=2").json()
    assert r == {"keys": [f"{prefix}a", f"{prefix}c/0"], "next": f"{prefix}c/0"}
    r = leader.request("GET", f"/db/?prefix={prefix}&limit=2&after={prefix}c/0").json()
    assert r == {"keys": [f"{prefix}c/1"], "next": None}
    # Non-ASCII prefixes match keys (decoded from UTF-8 as keys are); bytes that are not UTF-8 get 400.
    assert leader.request("POST", f"/db/{prefix}%C3%A9t%C3%A9", "summer").status == 200
    assert leader.request("GET", f"/db/?prefix={prefix}%C3%A9").json()["keys"] == [f"{prefix}\u00e9t\u00e9"]
    assert leader.request("GET", f"/db/?prefix={prefix}&after={prefix}%C3%A9").json()["keys"] == \
        [f"{prefix}\u00e9t\u00e9"]
    assert leader.request("GET", "/db/?prefix=%FF").status == 400


def test_help_and_flags_reject_nonsense(tmp_path):
    for flags in (("-max-connections", "0"), ("-max-connections", "100000000"), ("-idle-timeout", "0"),
                  ("-max-header-bytes", "-1")):
        out = subprocess.run([sys.executable, SERVER, "-p", str(free_port()), "-hp", str(free_port()), *flags,
                              str(tmp_path / "n")], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and flags[0] in out.stderr, (flags, out.stderr)


# ---- the cluster kept its leader through all of the above (keep this test last) -----------------------------------


def test_the_leader_kept_its_term_through_the_whole_module(cluster):
    leader = cluster.leader()
    assert leader is cluster.first_leader and leader.status()["term"] == cluster.first_term
    for n in cluster.nodes:
        assert not n.exited()


def test_a_small_hard_descriptor_limit_is_warned_about_and_a_flood_does_not_pile_up_events(tmp_path):
    """Review 2 F3: under a hard `ulimit -n` of 200, strangers' connections to the Raft port used up the descriptors
    and zmq failed its accept over and over, each failure a monitor event queued without limit and parsed in the
    event loop (4.2 million in 44 s, 504 MiB). Now the start warns about the limit, accept failures are not
    monitored and the monitor's queue is bounded: the node's memory stays put under 6 s of such a flood, and it
    keeps answering. (The memory check does not reproduce the spiral here: it passes with the old monitor too;
    the warning is what fails without the fix.)"""
    n = Node("one", str(tmp_path), wrap=("prlimit", "--nofile=200:200", "--")).start()
    flood = []
    try:
        wait_for(lambda: n.status()["role"] == "leader", 10, "a leader")
        assert "hard limit on open files (ulimit -Hn) is 200" in n.log_text()
        for _ in range(400):
            try:
                flood.append(socket.create_connection(("127.0.0.1", n.port), timeout=2))
            except OSError:
                break
        time.sleep(1.0)
        assert not n.exited(), "the node died under the flood (its log's last lines follow the report)"
        before = n.rss_bytes()
        time.sleep(6.0)
        grown = n.rss_bytes() - before
        assert grown < 20 << 20, f"grew {grown >> 20} MiB in 6 s"
        for s in flood:
            s.close()
        wait_for(lambda: n.request("GET", "/status", timeout=5).status == 200, 15, "an answer after the flood")
    finally:
        for s in flood:
            s.close()
        n.kill()


def test_an_answered_write_leaves_no_cycle_for_the_collector(monkeypatch):
    """A route that reads a header through Bottle (request.headers, get_header) has Bottle keep request.headers in
    the environ as a WSGIHeaderDict holding the environ, a cycle a request that only the collector freed (and that
    a young collection finding it in flight moved to the oldest generation). Answered, the request's environ and
    body are freed by their reference counts: with the collector off, no WSGIHeaderDict outlives its request. In
    process, on the real edge and application (a FakeRuntime under the Api). None of the API's routes builds one
    any more: the dashboard's actions, a follower's -forward and signed admin requests read their headers from
    the environ (routes_shared.own_header; review edge30 Q1, review edge3 L3), so the page's removals build none,
    and a route added for the test reads a header through Bottle. The test counts the dicts built, so that it
    cannot pass on requests that build none."""
    built = []
    build = bottle.WSGIHeaderDict.__init__
    monkeypatch.setattr(bottle.WSGIHeaderDict, "__init__", lambda self, environ: (built.append(1), build(self, environ))[1])
    app = Client().app
    app.route("/header-read", "DELETE", lambda: bottle.HTTPResponse(bottle.request.get_header("X-Raft-Dashboard"), 200))
    server = _answering_server(app)
    conn = gevent.socket.create_connection(server.address, timeout=5.0)
    gc.collect()
    gc.disable()
    try:
        received = b""
        targets = [b"/ui/actions/members/nocycle-%d" % n for n in range(3)] + [b"/header-read"] * 3
        for n, target in enumerate(targets):  # keep-alive: each answered before the next, on one connection
            conn.sendall(b"DELETE %s HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\n"
                         b"X-Raft-Dashboard: 1\r\nContent-Length: 0\r\n\r\n" % target)
            with gevent.Timeout(5.0):
                while len(parse_responses(received)) <= n:
                    received += conn.recv(65536)
            if n == 2:
                assert built == [], built  # the page's removals read their header from the environ
        answers = parse_responses(received)
        assert [(status, body) for status, _, body in answers] == [
            (404, b"nocycle-%d is not a member\n" % n) for n in range(3)] + [(200, b"1")] * 3, answers
        assert len(built) == 3, built  # each request of the test's route built its dict
        gevent.sleep(0.01)  # the handler past its answer, waiting for the next request
        left = [o for o in gc.get_objects() if isinstance(o, bottle.WSGIHeaderDict)]
        assert not left, f"{len(left)} requests' headers (and environs, bodies) left to the collector"
    finally:
        gc.enable()
        conn.close()
        server.stop(timeout=5.0)


def test_a_closed_connection_leaves_no_cycle_for_the_collector():
    """Review of gcpause, L1: the handler and its last request's environ held each other (`raftdzmq.handler`), so
    each connection's end left a cycle with the last body in it to the collector, and kept it frozen until a sweep
    when the connection had lived through a full collection (tuning.FreezeSurvivors). Now, with the collector
    off, the handler and its last environ are freed by their reference counts once the connection ends."""
    server = _answering_server(Client().app)
    gc.collect()
    gc.disable()

    def handlers_alive() -> int:
        return sum(isinstance(o, EdgeHandler) for o in gc.get_objects())

    try:
        for n in range(3):
            conn = gevent.socket.create_connection(server.address, timeout=5.0)
            conn.sendall(post(f"closed-{n}", b"v" * 1000))
            received = b""
            with gevent.Timeout(5.0):
                while not parse_responses(received):
                    received += conn.recv(65536)
            assert parse_responses(received)[0][0] == 200
            conn.close()
        deadline = time.monotonic() + 5.0
        while handlers_alive() and time.monotonic() < deadline:  # the handlers see the close
            gevent.sleep(0.01)
        assert handlers_alive() == 0, "closed connections' handlers (their last environs, bodies) left to the collector"
    finally:
        gc.enable()
        server.stop(timeout=5.0)


def test_unsent_answers_count_once_each_and_the_longest_stalled_candidate_is_cut():
    """EdgeServer.hold (review edge, L1, L2, Q2; review bud, L1, L2): bytes held for slow readers count once per
    object however many connections hold it (a shared poll body or frame); past -max-unsent-bytes the candidates not
    reading go first, the longest stalled first, the holders of a shared object as one (all shut), each counted as
    the eviction "unsent_budget"; a reader goes after them; the last candidate stays whatever its size."""
    evictions: list[str] = []
    kib = 1024
    server = EdgeServer(listen("127.0.0.1", 0), bottle.Bottle(), max_connections=8, idle_timeout_seconds=5.0,
                        receive_timeout_seconds=5.0, busy_timeout_seconds=10.0, max_header_bytes=8192,
                        max_body_bytes=MAX_BODY, max_unsent_bytes=100 * kib, on_eviction=evictions.append)
    shut: list[str] = []

    class Connection:
        took_bytes_at: float | None = None

        def __init__(self, name: str) -> None:
            self.name, self.client_address = name, ("127.0.0.1", 1)
            self.socket = self

        def shutdown(self, how: int) -> None:
            shut.append(self.name)

    a, b, c, d, e = (Connection(name) for name in "abcde")
    shared = b"s" * (50 * kib)
    try:
        server.hold(a, (b"a" * (50 * kib),))
        server.hold(b, (shared,))
        server.hold(c, [shared])  # the same body: not counted again
        assert server.unsent_bytes == 100 * kib and shut == [] and evictions == []
        a.took_bytes_at = time.monotonic()  # a reads; b and c, which share, do not
        server.hold(d, (b"d" * (10 * kib),))  # past the budget: b and c, one candidate, longer stalled than d
        # b and c go together, in no set order (a group's members come from a set: CI at 1f04b16 cut c first)
        assert sorted(shut) == ["b", "c"] and evictions == ["unsent_budget"] * 2 and server.unsent_bytes == 60 * kib
        assert list(server.holding) == [a, d]
        server.hold(e, (b"e" * (45 * kib),))  # past it again: d, not reading and the longer stalled, not the reader
        assert sorted(shut[:2]) == ["b", "c"] and shut[2:] == ["d"] and server.unsent_bytes == 95 * kib
        server.release(e)
        server.release(e)  # twice: nothing more
        assert server.unsent_bytes == 50 * kib
        server.hold(a, (b"x" * (500 * kib),))  # the last candidate, over the budget: kept (it replaces a's own)
        assert server.unsent_bytes == 500 * kib and len(shut) == 3
        server.release(a)
        assert server.unsent_bytes == 0 and server.holding == {} and server._held == {} and server._shared == {}
    finally:
        server.close()
