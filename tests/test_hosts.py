"""The check of a request's Host against DNS rebinding (raftlib.server.hosts, -allowed-hosts): its rules in
process, then real nodes asked over raw sockets with the Host a rebound page's browser sends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from procs import ROOT, SERVER, LocalCluster, Node, free_port, wait_for
from raftlib.messages import Member, Membership
from raftlib.server.hosts import MAX_VERDICTS, AllowedHosts, host_of, malformed_host, parse_allowed_hosts

# ---- the rules, in process ----------------------------------------------------------------------------------------


def membership_of(*http_addresses: str) -> Membership:
    members = tuple(Member(f"n{i}", f"127.0.0.1:{i}", address) for i, address in enumerate(http_addresses, 1))
    return Membership(tuple(m.node_id for m in members), (), members)


def test_allowed_hosts_parse_names_and_refuse_what_is_no_name():
    assert parse_allowed_hosts("") == ()
    assert parse_allowed_hosts(" KV.Example. , ,node_2.lan,10.0.0.5,[::1]") == ("kv.example", "node_2.lan", "10.0.0.5",
                                                                               "[::1]")
    assert parse_allowed_hosts("*") == ("*",)
    # Each refusal says why (second review of rebind, F4): an IPv6 address needs no listing, a non-ASCII name is
    # given in punycode, anything else has a scheme, a port or a pattern.
    for entry, why in (("node1:8080", "without a scheme or a port"), ("http://kv.example", "without a scheme"),
                       ("*.example.com", "exact names"), (".example.com", "exact names"), ("a b", "exact names"),
                       ("kv.example/", "exact names"), ("::1", "always allowed"), ("fe80::1%eth0", "always allowed"),
                       ("bücher.example", "in punycode, as clients send it in Host (xn--bcher-kva.example)")):
        with pytest.raises(ValueError) as refused:
            parse_allowed_hosts(f"ok.example,{entry}")
        reason = str(refused.value)
        assert reason.startswith(f"{entry!r} is not a host name: ") and why in reason and "\n" not in reason, reason


def test_the_names_a_node_answers_to_without_configuration_and_with_it():
    current = [membership_of("alpha.example:8080", "127.0.0.1:8081", "")]
    hosts = AllowedHosts(parse_allowed_hosts("kv.example,dash.localhost"), ("localhost", "node1.example", "vm"),
                         lambda: current[0], node_address="node1.example:8080")
    for host in (None, "127.0.0.1", "127.0.0.1:8080", "10.1.2.3:1", "[::1]:8080", "[fe80::1]", "[fe80::1%25eth0]:80",
                 "[fe80::1%eth0]", "localhost",
                 "LOCALHOST.:8080", "dash.localhost:8080", "node1.example:8080", "vm", "kv.example:9999",
                 "KV.example.", "alpha.example:1234"):
        assert hosts.refusal(host) is None, host
    # *.localhost only when listed (review of rebind, F1): Safari and glibc's `files dns` ask DNS for those names.
    for host in ("evil.example:8080", "evil.example", "localhost.evil.example", "kv.example.evil", "evillocalhost",
                 "rebind.localhost:8080", "dash.dash.localhost", "[::1", "[127.0.0.1]", "::1", "[127.0.0.1%eth0]",
                 "[evil%eth0]",
                 "kv.example,evil.example", "kv.example evil", "127.0.0.1.evil", "node1", "1.2.3", "",
                 "localhost:evil.example", "[::1]evil.example", "localhost\xe9"):
        reason = hosts.refusal(host)
        assert reason is not None and "\n" not in reason, host
        assert reason.endswith("give it in -allowed-hosts on the node at node1.example:8080"), reason
    # The members' names follow the configuration: a new one's member is allowed, a removed one's no longer.
    assert hosts.refusal("bravo.example:8080") is not None
    current[0] = membership_of("127.0.0.1:8081", "bravo.example:8080")
    assert hosts.refusal("bravo.example:8080") is None and hosts.refusal("alpha.example:8080") is not None
    # A long Host is cut in the reason.
    reason = hosts.refusal("e" * 5000)
    assert reason is not None and len(reason) < 300


# Host values that are not a host and an optional port (review of rebind, F2): a browser never sends them, and read
# loosely each could pass for an allowed name.
MALFORMED_HOSTS = ("localhost,evil.example", "evil.example, localhost", "localhost evil.example", "localhost:1 evil",
                   "localhost:evil.example", "[::1]evil.example", "[::1]:80x", "evil\xe9.localhost", "", ":8080",
                   "localhost:1:2", "[::1", "local\x00host", "localhost@evil.example", "localhost/x", "[fe80::1%]",
                   "[fe80::1%eth0/x]", "[fe80::1%eth0]evil", "fe80::1%eth0", "localhost%eth0", "[fe80::1%%eth0]")


def test_host_of_takes_a_host_and_an_optional_port_and_nothing_else():
    for value, host in (("localhost", "localhost"), ("LocalHost.:8080", "localhost"), ("localhost:", "localhost"),
                        ("[::1]:8080", "[::1]"), ("[FE80::1]", "[fe80::1]"),
                        ("[::ffff:127.0.0.1]:1", "[::ffff:127.0.0.1]"), ("10.0.0.5:80", "10.0.0.5"),
                        ("node_2.lan", "node_2.lan"), ("[fe80::1%25eth0]:8080", "[fe80::1%25eth0]"),
                        ("[FE80::1%eth0]", "[fe80::1%eth0]"), ("[fe80::1%25en0.1_a~b-c]", "[fe80::1%25en0.1_a~b-c]")):
        assert host_of(value) == host and malformed_host(value) is None, value
    for value in MALFORMED_HOSTS:
        reason = malformed_host(value)
        assert host_of(value) is None and reason is not None and "\n" not in reason, value
        assert reason.startswith("malformed Host ") and repr(value) in reason, reason


def test_a_star_allows_any_host_and_the_verdicts_kept_are_bounded():
    anything = AllowedHosts(("*", "kv.example"), (), lambda: membership_of(), node_address="localhost:8080")
    assert all(anything.refusal(h) is None for h in ("evil.example:8080", "a,b", "[::1"))
    hosts = AllowedHosts((), ("localhost",), lambda: membership_of(), node_address="localhost:8080")
    for i in range(3 * MAX_VERDICTS):
        assert hosts.refusal(f"127.0.0.1:{i}") is None and hosts.refusal(f"evil{i}.example") is not None
        assert len(hosts._verdicts) <= MAX_VERDICTS
    assert hosts.refusal("localhost:1") is None and hosts.refusal("evil0.example") is not None
    # The start-up line names localhost once, and no IP address (any is allowed).
    assert anything.served_names().startswith("any Host")
    listed = AllowedHosts(("kv.example",), ("LOCALHOST.", "127.0.0.1", "node1"), lambda: membership_of(),
                          node_address="node1:8080")
    assert listed.served_names().startswith("the Host names localhost, kv.example, node1, any IP address ")


# ---- real nodes, raw sockets --------------------------------------------------------------------------------------


def ask(node: Node, method: str, path: str, host: str, headers: dict[str, str] | None = None, body: bytes = b""
        ) -> tuple[int, dict[str, str], bytes]:
    """One request on a raw connection to `node`, with exactly this Host (a browser's, say); (status, headers with
    lowercase names, body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return exchange(node, head.encode() + b"\r\n" + body)


def exchange(node: Node, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send these bytes on a raw connection to `node` and read until it closes; (status, headers with lowercase
    names, body) of the answer."""
    address, port = node.address.rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split(" ", 2)[1]), fields, rest


def rebound(node: Node, name: str = "evil.example") -> tuple[str, dict[str, str]]:
    """The Host and headers of a request that a page on `name`, rebound to the node's address, has a browser send:
    same-origin for the browser, and for the check against other sites' pages (api.cross_site_refusal)."""
    host = f"{name}:{node.http_port}"
    return host, {"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin", "Content-Type": "text/plain"}


def assert_refused(answer: tuple[int, dict[str, str], bytes], write: bool) -> None:
    status, fields, body = answer
    assert status == 403 and b"-allowed-hosts" in body and body.count(b"\n") == 1, answer
    assert fields.get("x-raft-outcome") == ("not-applied" if write else None), answer


def test_a_rebound_name_is_refused_and_the_nodes_own_and_members_names_are_served(tmp_path):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 is same-origin with the node, so
    Origin and Sec-Fetch-Site pass. Its Host gives it away: a read, a write and a dashboard action are refused 403
    by both nodes, and nothing is written; so is one from a rebound name under .localhost (b does not list
    dash.localhost), and one naming this machine, which b does not list (second review of rebind, F1). The node's own
    names (-h, -advertise), IP addresses, localhost and -allowed-hosts (a lists dash.localhost and this machine's
    name) are served; a member's advertised name is served by the other member too.
    `a` advertises alpha.test, which does not resolve: the requests go to 127.0.0.1 with that Host, and `a` leads
    throughout, so `b` never has to reach it (b's reads are stale ones: a linearizable read would ask a)."""
    a = Node("a", str(tmp_path))
    b = Node("b", str(tmp_path))
    cluster = LocalCluster(str(tmp_path), nodes=[a, b])
    a_extra = ("-advertise", "alpha.test", "-allowed-hosts", f"KV.example,dash.localhost,{socket.gethostname()}")
    try:
        a.start(*a_extra)
        wait_for(lambda: a.status()["role"] == "leader", 10, "a to lead")
        b.start(join=a.address)
        wait_for(lambda: cluster._is_voter(b), 30, "b to become a voter")
        b_id = b.status()["node_id"]
        assert ask(a, "POST", "/db/k", f"localhost:{a.http_port}", body=b"before")[0] == 200
        # b's reads below are stale ones: b must have applied the write first (a follower learns a commit index
        # with the leader's next append, within two ticks: CI at 698956f read b before, 404).
        committed = a.status()["commit_index"]
        wait_for(lambda: b.status()["applied_index"] >= committed, 10, "b to apply the write")
        for node, name in ((a, "evil.example"), (b, "evil.example"), (a, "rebind.localhost"), (b, "dash.localhost"),
                           (b, socket.gethostname())):
            host, page = rebound(node, name)
            assert_refused(ask(node, "GET", "/db/k", host, page), write=False)
            assert_refused(ask(node, "GET", "/ui", host, page), write=False)
            assert_refused(ask(node, "POST", "/db/k", host, page, b"evil"), write=True)
            assert_refused(ask(node, "DELETE", "/db/k", host, page), write=True)
            action = {**page, "X-Raft-Dashboard": "1"}
            assert_refused(ask(node, "POST", f"/ui/actions/transfer?to={b_id}", host, action), write=True)
            assert_refused(ask(node, "DELETE", f"/ui/actions/members/{b_id}", host, action), write=True)
        assert a.status()["role"] == "leader" and len(a.request("GET", "/cluster").json()) == 2

        served_by_a = ("localhost", "127.0.0.1", "[::1]", "dash.localhost", socket.gethostname(), "kv.example",
                       "KV.EXAMPLE.", "alpha.test")
        # b's own -h, addresses (an IPv6 one with a zone id, as a browser sends it), a's advertised name
        served_by_b = ("localhost", "127.0.0.1", "[fe80::1%25eth0]", "[fe80::1%eth0]", "alpha.test")
        for node, names in ((a, served_by_a), (b, served_by_b)):
            for name in names:
                host, page = rebound(node, name)
                status, _, body = ask(node, "GET", "/db/k?consistency=stale", host, page)
                assert (status, body) == (200, b"before"), (node.name, name, status, body)
                if node is a:  # b would pass the action on to a, at alpha.test
                    # The page's actions reach their route when the Host is the node's: 404, no such member.
                    status, _, body = ask(node, "DELETE", "/ui/actions/members/nosuchnode", host,
                                          {**page, "X-Raft-Dashboard": "1"})
                    assert status == 404 and b"is not a member" in body, (name, status, body)
        for name in ("kv.example", "bravo.test"):  # -allowed-hosts is a's, not b's; no member advertises bravo.test
            assert_refused(ask(b, "GET", "/db/k", *rebound(b, name)), write=False)
        host, page = rebound(a, "alpha.test")
        assert ask(a, "POST", "/db/k", host, page, b"after")[0] == 200
        wait_for(lambda: ask(b, "GET", "/db/k?consistency=stale", *rebound(b, "alpha.test"))[2] == b"after", 10,
                 "b to apply the write")
        for node in (a, b):
            assert "Traceback" not in node.log_text()
    finally:
        cluster.stop()


HOSTILE_RESOLVER = """
import socket, sys
sys.path.insert(0, {root!r})
import raftdzmq  # monkey-patches with gevent on import
import gevent._socketcommon
real_gethostbyaddr = socket.gethostbyaddr
def hostile_gethostbyaddr(address):
    host, aliases, addresses = real_gethostbyaddr(address)
    return "evil.example", [host, *aliases], addresses  # what a rogue resolver answers to the PTR query
socket.gethostbyaddr = gevent._socketcommon.gethostbyaddr = hostile_gethostbyaddr
sys.exit(raftdzmq.main(sys.argv[1:]))
"""


def test_this_machines_names_are_not_allowed_by_default_so_a_hostile_reverse_lookup_names_nothing(tmp_path):
    """Second review of rebind, F1: socket.getfqdn() is a reverse lookup, so a rogue network's resolver answering the
    machine's address with evil.example made that name allowed. A node whose resolver does so (the launcher stands in
    for it) refuses evil.example, and this machine's host name too (a browser may resolve it through DNS), while it
    serves localhost; its start-up line names localhost once and neither of those names."""
    launcher = tmp_path / "hostile_resolver.py"
    launcher.write_text(HOSTILE_RESOLVER.format(root=ROOT))
    assert socket.getfqdn(socket.gethostname()) != "evil.example"  # only the launcher's process is fooled
    node = Node("n1", str(tmp_path), server=str(launcher))
    try:
        node.start()
        wait_for(lambda: node.status()["role"] == "leader", 10, "a leader")
        for name in ("evil.example", socket.gethostname()):
            host, page = rebound(node, name)
            assert_refused(ask(node, "POST", "/db/owned", host, page, b"owned"), write=True)
        assert ask(node, "GET", "/db/owned", f"localhost:{node.http_port}")[0] == 404
        served = [line for line in node.log_text().splitlines() if "HTTP serves" in line]
        assert len(served) == 1 and served[0].count("localhost") == 1, served
        assert "evil.example" not in served[0] and f" {socket.gethostname()}," not in served[0], served
    finally:
        node.kill()


def test_a_malformed_host_two_host_lines_and_http_1_1_without_host_are_refused_400_http_1_0_without_host_served(
        tmp_path):
    """RFC 9112 §3.2 (review of rebind, F2): each malformed Host value, two Host lines (even of an allowed name) and
    an HTTP/1.1 request without Host are answered 400 with one line, before any route: a write among them says
    not-applied and writes nothing, with or without -allowed-hosts '*'. HTTP/1.0 may leave Host out."""
    heads = {f"Host {value!r}": b"Host: " + value.encode("latin-1") + b"\r\n" for value in MALFORMED_HOSTS
             if "\x00" not in value}  # a control character is refused before the Host is looked at
    heads["two Host lines"] = b"Host: localhost\r\nHost: localhost\r\n"
    heads["two Host lines, another name second"] = b"Host: localhost\r\nHost: evil.example\r\n"
    heads["two Host lines, around another field"] = b"Host: 127.0.0.1\r\nX-A: b\r\nhost: 127.0.0.1\r\n"
    heads["no Host"] = b""
    for allowed in ("", "*"):
        node = Node("star" if allowed else "strict", str(tmp_path))
        try:
            node.start(env={"RAFTDZMQ_ALLOWED_HOSTS": allowed})
            wait_for(lambda: node.status()["role"] == "leader", 10, "a leader")
            for i, (name, head) in enumerate(heads.items()):
                for method, body in ((b"GET", b""), (b"POST", b"evil")):
                    status, fields, answer = exchange(node, b"%s /db/k%d HTTP/1.1\r\n%sContent-Length: %d\r\n"
                                                            b"Connection: close\r\n\r\n%s"
                                                      % (method, i, head, len(body), body))
                    assert status == 400 and answer.count(b"\n") == 1, (allowed, name, method, status, answer)
                    assert (b"Host" in answer) and fields.get("x-raft-outcome") == (
                        "not-applied" if method == b"POST" else None), (allowed, name, method, fields, answer)
                assert node.request("GET", f"/db/k{i}").status == 404, (allowed, name)
            status, _, answer = exchange(node, b"POST /db/old HTTP/1.0\r\nContent-Length: 3\r\n\r\nv10")
            assert status == 200, answer
            assert exchange(node, b"GET /db/old HTTP/1.0\r\n\r\n")[::2] == (200, b"v10")
            assert "Traceback" not in node.log_text()
        finally:
            node.kill()


JOIN_NAME = "joined-through.test"
RESOLVING_LAUNCHER = """
import socket, sys
sys.path.insert(0, {root!r})
import raftdzmq  # monkey-patches with gevent on import
import gevent._socketcommon, gevent.socket
NAME = {name!r}
real_getaddrinfo, real_gethostbyname = socket.getaddrinfo, socket.gethostbyname
def getaddrinfo(host, *rest, **kw):
    return real_getaddrinfo("127.0.0.1" if host == NAME else host, *rest, **kw)
def gethostbyname(host):
    return "127.0.0.1" if host == NAME else real_gethostbyname(host)
# This process alone resolves NAME, to loopback (gevent.socket.create_connection looks getaddrinfo up in its module).
socket.getaddrinfo = gevent.socket.getaddrinfo = gevent._socketcommon.getaddrinfo = getaddrinfo
socket.gethostbyname = gevent.socket.gethostbyname = gevent._socketcommon.gethostbyname = gethostbyname
sys.exit(raftdzmq.main(sys.argv[1:]))
"""


def test_a_join_through_a_name_its_target_does_not_allow_says_whose_flag_to_set(tmp_path):
    """Second review of rebind, F4: the joining node shows the target's 403 as its own error, so the line names the
    node whose -allowed-hosts would take the name. b joins a through a name a does not list, which b's process
    alone resolves, to 127.0.0.1 (the launcher: no name of this machine or of DNS is relied on)."""
    launcher = tmp_path / "resolving_launcher.py"
    launcher.write_text(RESOLVING_LAUNCHER.format(root=ROOT, name=JOIN_NAME))
    name = JOIN_NAME
    a, b = Node("a", str(tmp_path)), Node("b", str(tmp_path), server=str(launcher))
    try:
        a.start()
        wait_for(lambda: a.status()["role"] == "leader", 10, "a to lead")
        b.start(join=f"{name}:{a.http_port}")
        wait_for(b.exited, 15, "b to give up")
        assert b.proc is not None and b.proc.returncode != 0
        assert (f"join refused by http://{name}:{a.http_port}/join: 403 Host '{name}:{a.http_port}' is not a "
                f"name of this node (refused against DNS rebinding); if it is one, give it in -allowed-hosts on the "
                f"node at localhost:{a.http_port}") in b.log_text(), b.log_text()
        assert len(a.request("GET", "/cluster").json()) == 1
    finally:
        b.kill()
        a.kill()


def test_a_health_check_without_host_is_served_and_nothing_else_is(tmp_path):
    """Second review of rebind, F2: HAProxy's old `option httpchk GET /readyz HTTP/1.1` sends no Host. GET and HEAD of
    exactly /livez and /readyz without a body are served without it, on a connection kept open as HTTP/1.1's are;
    any other HTTP/1.1 request without Host, those paths with a query, a body or another method included, is 400."""
    node = Node("n1", str(tmp_path))
    try:
        node.start()
        wait_for(lambda: node.status()["role"] == "leader", 10, "a leader")
        with socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as s:
            for request, body in ((b"GET /readyz HTTP/1.1\r\n\r\n", b"ok\n"), (b"GET /livez HTTP/1.1\r\n\r\n", b"ok\n"),
                                  (b"HEAD /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b""),
                                  (b"HEAD /livez HTTP/1.1\r\n\r\n", b"")):
                s.sendall(request)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = s.recv(65536)
                    assert chunk, (request, head)
                    head += chunk
                head, _, rest = head.partition(b"\r\n\r\n")
                length = 0 if request.startswith(b"HEAD") else int(head.split(b"Content-Length: ")[1].split(b"\r")[0])
                while len(rest) < length:
                    rest += s.recv(65536)
                assert head.startswith(b"HTTP/1.1 200 ") and rest == body, (request, head, rest)
        for head, body in ((b"GET /db/k HTTP/1.1\r\n", b""), (b"GET /readyz?verbose HTTP/1.1\r\n", b""),
                           (b"GET /readyz/ HTTP/1.1\r\n", b""), (b"GET /ui HTTP/1.1\r\n", b""),
                           (b"OPTIONS /livez HTTP/1.1\r\n", b""), (b"GET /LIVEZ HTTP/1.1\r\n", b""),
                           (b"GET /livez HTTP/1.1\r\nContent-Length: 1\r\n", b"x"),
                           (b"GET /livez HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
                           (b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n", b"")):
            status, _, answer = exchange(node, head + b"Connection: close\r\n\r\n" + body)
            assert status == 400 and b"must give Host" in answer, (head, status, answer)
        assert "Traceback" not in node.log_text()
    finally:
        node.kill()


def test_a_star_from_the_environment_allows_any_host_and_a_bad_list_is_a_usage_error(tmp_path):
    node = Node("n1", str(tmp_path))
    try:
        node.start(env={"RAFTDZMQ_ALLOWED_HOSTS": "*"})
        wait_for(lambda: node.status()["role"] == "leader", 10, "a leader")
        host, page = rebound(node)
        assert ask(node, "POST", "/db/k", host, page, b"any")[0] == 200
        assert ask(node, "GET", "/db/k", host, page)[2] == b"any"
        status, _, body = ask(node, "DELETE", "/ui/actions/members/nosuchnode", host, {**page, "X-Raft-Dashboard": "1"})
        assert status == 404 and b"is not a member" in body, (status, body)
        assert json.loads(ask(node, "GET", "/status", host)[2])["role"] == "leader"
    finally:
        node.kill()
    for args, env in ((["-allowed-hosts", "kv.example,node1:8080"], {}), ([], {"RAFTDZMQ_ALLOWED_HOSTS": "http://kv"})):
        out = subprocess.run([sys.executable, SERVER, "-p", str(free_port()), "-hp", str(free_port()), *args,
                              str(tmp_path / "never")], env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 2 and "-allowed-hosts: " in out.stderr and "not a host name: give" in out.stderr, out
        assert not (tmp_path / "never").exists()
