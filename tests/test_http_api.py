"""raftlib.server.api in process: every route and every error answer, through the WSGI application with a fake
runtime (no sockets, no processes, no Raft). The requests are built as the edge (raftlib.server.edge) hands them
to the application: the body read whole in environ["raftdzmq.body"], REQUEST_URI as sent."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import sys
import time
import types
import urllib.parse

import gevent
import gevent.event
import pytest

from raftlib import ConfChangeKind, Member, Membership, NodeStatus, NotLeader, ProposalDropped, Role, TargetRestoring
from raftlib.progress import ProgressState, ProgressStatus
from raftlib.runtime import Backup, BackupBusy, BackupFailed, EntryLost, NotRunning, RuntimeStatus, Stopped, Timeout
from raftlib.server import api as api_module
from raftlib.server import routes_txn
from raftlib.server.admin import (NODE_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, AdminGuard, admin_headers,
                                  node_request_headers,
                                  answer_headers,
                                  keys_request_headers, parse_vouched, read_keys_answer, verify_answer)
from raftlib.server.api import Api, make_app
from raftlib.server.health import MAX_APPLY_LAG_ENTRIES
from raftlib.server.leases import LeaseKeeper
from raftlib.server.metrics import Metrics
from raftlib.server.routes_shared import NOT_LEADER
from raftlib.server.node import RESTORING_IN_REPLIES_LEVEL, Server
from raftlib.server.store import (ADMIN_CLAIM, ADMIN_CLOCK_SKEW_SECONDS, FEATURE_LEVEL, MAX_DELETE_KEYS_PER_ENTRY,
                                  MAX_TXN_OPS, SET, SET_FEATURE_LEVEL, KeyValueStore, TxnResult, command)
from raftlib.storage_errors import DiskFull

MEMBERS = (Member("a", "10.0.0.1:5555", "10.0.0.1:8080"), Member("b", "10.0.0.2:5555", "10.0.0.2:8080"),
           Member("c", "10.0.0.3:5555", "10.0.0.3:8080"))
SECRET = b"the cluster secret"
ALL_VOTERS = Membership(("a", "b", "c"), (), MEMBERS)


@dataclasses.dataclass
class FakeNode:
    """The fields api.NodeView names."""

    node_id: str = "a"
    role: Role = Role.LEADER
    leader_id: str | None = "a"
    current_term: int = 1
    last_applied: int = 0
    removed: tuple[str | None, int] | None = None
    membership: Membership = Membership(("a", "b"), ("c",), MEMBERS)
    commit_index: int | None = None  # None: the same as last_applied (status() only)
    leader_active: bool = True  # status() only
    leader_commit: int = 0  # status() only
    leader_contact_seconds_ago: float = 0.0  # status() only
    receiving_snapshot: bool = False  # status() only
    restoring_snapshot: bool = False  # status() only (the core says receiving_snapshot then too)
    membership_index: int = 0  # the FeatureLevelRaiser's; a new one with each new configuration, as the core's
    catch_up: tuple[int, int] = (0, 0)  # status() only: the entries kept behind the snapshot's cut, their bytes

    def __setattr__(self, name: str, value) -> None:
        if name == "membership" and value != getattr(self, "membership", value):  # a new configuration's entry
            object.__setattr__(self, "membership_index", self.membership_index + 1)
        object.__setattr__(self, name, value)


class FakeRuntime:
    """A runtime with no Raft under it: a proposal applies to the store at once, a read is safe at once, unless a
    test queued an exception for the call (`fail`). Records every call."""

    def __init__(self, store: KeyValueStore) -> None:
        self.node = FakeNode()
        self.store = store
        self.failures: dict[str, list[Exception]] = {}
        self.calls: list[tuple] = []
        self.disk_full = False
        self.running = True
        self.restoring_snapshot = False  # a leader's snapshot saved, not restored yet (Runtime.restoring_snapshot)
        self.follower_restoring = False  # b's last append reply said it restores a snapshot (Progress.restoring)
        # Commands in this leader's log not applied yet (a predecessor's, before this leader's entry commits):
        # status() counts them in last_index, and wait_applied applies them in order.
        self.pending: list[bytes] = []

    def fail(self, call: str, *errors: Exception) -> None:
        self.failures.setdefault(call, []).extend(errors)

    def _call(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if self.failures.get(name):
            raise self.failures[name].pop(0)

    def propose(self, cmd: bytes, timeout_seconds: float, configuration: tuple[int, int] | None = None):
        self._call("propose", cmd, timeout_seconds)
        if configuration is not None and configuration != (self.node.current_term, self.node.membership_index):
            raise ProposalDropped("the configuration changed")
        self.node.last_applied += 1
        return self.node.last_applied, self.store.apply(self.node.last_applied, cmd)

    def read(self, timeout_seconds: float, lease: bool = False) -> tuple[int, int]:
        self._call("read", timeout_seconds, lease)
        return self.node.last_applied, self.node.current_term

    def wait_applied(self, index: int, timeout_seconds: float) -> int:
        self._call("wait_applied", index, timeout_seconds)
        while self.pending and index > self.node.last_applied:
            self.node.last_applied += 1
            self.store.apply(self.node.last_applied, self.pending.pop(0))
        if index > self.node.last_applied:
            raise Timeout(f"no answer in {timeout_seconds}s")
        return self.node.last_applied

    def backup(self, folder: str, timeout_seconds: float) -> Backup:
        self._call("backup", folder, timeout_seconds)
        data = b"RDZMQSNP a snapshot file of the state at %d" % self.node.last_applied
        return Backup(self.node.last_applied, hashlib.sha256(data).hexdigest(), len(data), io.BytesIO(data))

    def change_membership(self, change, timeout_seconds: float):
        self._call("change_membership", change, timeout_seconds)
        self.node.last_applied += 1
        return self.node.last_applied, None

    def transfer_leadership(self, target: str, timeout_seconds: float) -> None:
        self._call("transfer_leadership", target, timeout_seconds)
        self.node.leader_id = target  # the runtime returns once this node has heard of the target leading

    def status(self) -> RuntimeStatus:
        n = self.node
        leading = n.role is Role.LEADER
        progress = {"b": ProgressStatus(n.last_applied - 1, n.last_applied, ProgressState.REPLICATE, True,
                                        self.follower_restoring)}
        return RuntimeStatus(
            NodeStatus(node_id=n.node_id, role=n.role, term=7, leader_id=n.leader_id,
                       commit_index=n.last_applied if n.commit_index is None else n.commit_index,
                       last_applied=n.last_applied, last_index=n.last_applied + len(self.pending), snapshot_index=0,
                       membership=n.membership, progress=types.MappingProxyType(progress if leading else {}),
                       removed=n.removed, reads_pending=0, leader_active=n.leader_active,
                       leader_commit=n.leader_commit, receiving_snapshot=n.receiving_snapshot,
                       restoring_snapshot=n.restoring_snapshot,
                       uncommitted_bytes=sum(map(len, self.pending)) if leading else 0,
                       catch_up_entries=n.catch_up[0], catch_up_bytes=n.catch_up[1]),
            self.running, self.disk_full, types.MappingProxyType({"proposals": 3, "applied": 4, "elections_won": 1,
                                                          "saves": 5, "snapshots": 0,
                                                          "loop_lag_max_microseconds": 2500,
                                                          "loop_lags_over_10ms": 0,
                                                          "out_of_descriptors": 2,
                                                          "snapshot_reads_failed": 3,
                                                          "snapshots_installed": 7,
                                                          "snapshot_catch_up_appends": 8,
                                                          "proposals_refused_uncommitted": 6,
                                                          "restore_step_max_microseconds": 4000,
                                                          "snapshot_commit_max_microseconds": 3000,
                                                          "snapshot_stepped_cpu_microseconds": 1_500_000,
                                                          "snapshot_stepped_wall_microseconds": 2_250_000}),
            leader_contact_at=time.monotonic() - n.leader_contact_seconds_ago, election_timeout_seconds=1.0)


class Answer:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


class Client:
    """An Api on a FakeRuntime, and its WSGI application called as the edge calls it."""

    def __init__(self, **api_options) -> None:
        self.store = KeyValueStore()
        self.runtime = FakeRuntime(self.store)
        self.metrics = Metrics()
        self.metrics.bind(self.runtime.status)
        self.api = Api(self.runtime, self.store, self.metrics, **api_options)
        self.app = make_app(self.api)

    def __call__(self, method: str, target: str, body: bytes | str = b"", headers: dict | None = None) -> Answer:
        """`target` as it would be on the request line (percent-encoded)."""
        body = body.encode() if isinstance(body, str) else body
        path, _, query = target.partition("?")
        environ = {
            "REQUEST_METHOD": method, "REQUEST_URI": target, "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote_to_bytes(path).decode("latin-1"), "QUERY_STRING": query,
            "SERVER_NAME": "localhost", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http", "raftdzmq.body": body,
        }
        for name, value in (headers or {}).items():  # as the edge files them (Content-Type without HTTP_)
            key = name.upper().replace("-", "_")
            environ[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
        started = []
        out = b"".join(self.app(environ, lambda status, headers, exc_info=None: started.append((status, headers))))
        return Answer(*started[0], out)

    def counted(self, family: str) -> dict[str, float]:
        return dict(getattr(self.metrics, family).values)

    def be_follower(self, leader_id: str | None = "b") -> None:
        self.runtime.node.role, self.runtime.node.leader_id = Role.FOLLOWER, leader_id


def one_line(answer: Answer) -> bool:
    return answer.body.endswith(b"\n") and answer.body.count(b"\n") == 1 and b"Traceback" not in answer.body


@pytest.fixture
def client() -> Client:
    return Client(write_timeout_seconds=2.0, read_timeout_seconds=0.2)


# ---- writes -----------------------------------------------------------------------------------------------------


def test_a_write_answers_200_with_its_index_once_applied(client):
    r = client("POST", "/db/foo", "bar")
    assert (r.status, r.body, r.headers["x-raft-index"]) == (200, b"", "1")
    r = client("PUT", "/db/foo", "baz")
    assert (r.status, r.headers["x-raft-index"]) == (200, "2")
    assert client.store.get("foo") == b"baz"
    assert client.runtime.calls[0] == ("propose", command(SET, "foo", b"bar"), 2.0)  # bounded by -write-timeout
    assert client.counted("writes") == {"committed": 2} and sum(client.metrics.write_seconds.counts) == 2


def test_keys_are_decoded_from_the_path_as_utf8_and_kept_as_sent(client):
    assert client("POST", "/db/a%2Fb%20c%C3%A9", "1").status == 200
    assert client("POST", "/db/dir/../x", "2").status == 200
    assert sorted(client.store.data) == ["a/b c\u00e9", "dir/../x"]


def test_compare_and_set_and_create_answer_412_when_the_precondition_fails(client):
    client("POST", "/db/k", "1")
    r = client("POST", "/db/k?prev_value=2", "3")
    assert (r.status, r.text, r.headers["x-raft-index"]) == (412, "precondition failed\n", "2")
    assert client("POST", "/db/k?prev_value=1", "3").status == 200 and client.store.get("k") == b"3"
    assert client("POST", "/db/k?prev_exist=false", "4").status == 412
    assert client("POST", "/db/new?prev_exist=false", "4").status == 200
    # prev_value is compared as the percent-decoded bytes, UTF-8 or not.
    client("POST", "/db/raw", b"\xff\x00")
    assert client("POST", "/db/raw?prev_value=%FF%00", "ok").status == 200 and client.store.get("raw") == b"ok"
    assert client("POST", "/db/raw?prev_value=", "no").status == 412


def test_delete_answers_404_for_a_missing_key(client):
    client("POST", "/db/k", "1")
    r = client("DELETE", "/db/k")
    assert (r.status, r.headers["x-raft-index"]) == (200, "2")
    r = client("DELETE", "/db/k")
    assert (r.status, r.text, r.headers["x-raft-index"]) == (404, "no such key: k\n", "3")


def test_keys_longer_than_4096_bytes_are_refused(client):
    for method in ("POST", "DELETE", "GET"):
        r = client(method, "/db/" + "\u00e9" * 2049)  # 4,098 bytes in UTF-8
        assert (r.status, r.text) == (400, "key must be 1 to 4096 bytes\n") and one_line(r)
    assert client("POST", "/db/" + "k" * 4096, "v").status == 200
    assert client.runtime.calls == [("propose", command(SET, "k" * 4096, b"v"), 2.0)]


def test_a_write_to_a_follower_is_redirected_to_the_leader_with_the_target_as_sent(client):
    client.be_follower("b")
    r = client("POST", "/db/%2541%3F/../k%C3%A9?prev_exist=false", "v")
    assert (r.status, r.text) == (307, NOT_LEADER + "\n")
    assert r.headers["location"] == "http://10.0.0.2:8080/db/%2541%3F/../k%C3%A9?prev_exist=false"
    assert client("DELETE", "/db/k").status == 307
    assert client.runtime.calls == [] and client.counted("writes") == {"redirected": 2}


def test_a_write_with_no_leader_known_gets_503_and_on_a_removed_node_410(client):
    client.be_follower(None)
    r = client("POST", "/db/k", "v")
    assert (r.status, r.text) == (503, "no leader is known right now; retry shortly\n")
    client.runtime.node.removed = ("b", 17)
    r = client("POST", "/db/k", "v")
    assert (r.status, r.text) == (410, "this node was removed from the cluster (by b at or before index 17)\n")
    client.runtime.node.removed = (None, 17)
    assert client("POST", "/db/k", "v").text == "this node was removed from the cluster (at or before index 17)\n"


@pytest.mark.parametrize("error, status, text, outcome, raft_outcome", [
    (NotLeader("b"), 307, NOT_LEADER, "redirected", "not-applied"),
    (ProposalDropped("a transfer is under way"), 503, "write refused for now: a transfer is under way; retry",
     "refused", "not-applied"),
    (EntryLost("entry 3 was overwritten"), 503,
     "write lost: leadership changed before it committed; it was not applied", "lost", "not-applied"),
    (Timeout("no answer in 2.0s"), 503, "write not confirmed within 2s; its outcome is unknown", "unknown", "unknown"),
    (DiskFull("the disk of this node is full"), 507, "write refused: the disk of this node is full; it was not applied",
     "refused", "not-applied"),
    (Stopped("node is stopping"), 503, "node is stopping", None, "unknown"),
    (NotRunning("node is not running"), 503, "node is not running", None, "not-applied"),
])
def test_each_failure_of_a_write_has_its_answer_and_outcome(client, error, status, text, outcome, raft_outcome):
    """Issue 15: X-Raft-Outcome says whether a failed write surely took no effect (`not-applied`: it may be sent
    again) or was proposed and its fate is not known (`unknown`)."""
    client.runtime.node.leader_id = "b"  # when NotLeader comes, the node has just learnt of another leader
    client.runtime.fail("propose", error)
    r = client("POST", "/db/k", "v")
    assert (r.status, r.text) == (status, text + "\n") and one_line(r), r
    assert r.headers["x-raft-outcome"] == raft_outcome
    assert client.counted("writes") == ({outcome: 1} if outcome else {})
    assert client.metrics.write_seconds.counts == [0] * len(client.metrics.write_seconds.counts)
    assert client.store.get("k") is None


def test_a_failure_nobody_expected_is_a_500_of_one_line(client, capsys):
    client.runtime.fail("propose", RuntimeError("a bug"))
    r = client("POST", "/db/k", "v")
    assert (r.status, r.text) == (500, "500 Internal Server Error: Internal Server Error\n")
    assert r.headers["x-raft-outcome"] == "unknown"  # the bug may have struck after the proposal
    client.runtime.fail("propose", ValueError("not a failure a write may have"))
    assert client("POST", "/db/k", "v").status == 500
    assert "RuntimeError: a bug" in capsys.readouterr().err  # the traceback goes to the log, not to the client


def test_a_cross_site_header_that_cannot_be_read_is_refused_in_one_line(client, capsys):
    """Review edge30 Q4: the cross-site check read Origin through Bottle's get_header, which decodes it as UTF-8: an
    Origin not UTF-8 (the edge files a header's bytes as latin-1) raised there, a 500 `unknown` for a write never
    proposed and a traceback in the log a request, without a bound. An Origin urlsplit cannot split did the same.
    A check that cannot read its headers refuses: 403, one line, `not-applied`, nothing in the log."""
    for headers in ({"Origin": "http://\xff.example"}, {"Origin": "http://[::1"},
                    {"Sec-Fetch-Site": "cross\xff", "Origin": "http://localhost:8080"},
                    {"Origin": "http://localhost:8080", "Host": "localhost:8080\xff"}):
        r = client("POST", "/db/k", "v", headers={"Host": "localhost:8080", **headers})
        assert r.status == 403 and one_line(r) and "cannot read" in r.text, (headers, r)
        assert r.headers["x-raft-outcome"] == "not-applied", (headers, r)
    assert client.store.get("k") is None and client.runtime.calls == []
    assert capsys.readouterr().err == ""
    r = client("POST", "/db/k", "v", headers={"Host": "localhost:8080", "Origin": "http://localhost:8080"})
    assert r.status == 200, r  # the same-origin write as before


JUNK = ("\xe9", "\xe2\x82\xac", "a b")  # a header's bytes as the edge files them (latin-1): not UTF-8, UTF-8 of a
# character past latin-1 ("\u20ac"), and a space: none of them the shape of an id, hex or digits


def test_junk_in_the_apis_own_headers_is_refused_in_one_line_and_logged_at_most_once_a_second(monkeypatch, caplog,
                                                                                              capsys):
    """Review edge3, L3: bytes that are not UTF-8 (or UTF-8 past latin-1) in an X-Raftdzmq-* header raised in
    Bottle's get_header or in the signature's check: a 500, `X-Raft-Outcome: unknown` on a write that was never
    forwarded, and a traceback at ERROR a request. Now: 403 for the signature's headers (not signed), 400 for the
    others, one line naming the header, `not-applied` on a write, nothing proposed nor forwarded, and one line of
    log a second at most."""
    signed = signed_client()
    node_headers = node_request_headers(SECRET, "a", "GET", "/snapshot")
    keys_headers = keys_request_headers(SECRET, "a")
    transfer_headers = admin_headers(SECRET, "POST", "/cluster/transfer?to=b")
    cases = []
    for junk in JUNK:
        cases += [
            (signed, "GET", "/snapshot", {**node_headers, SIGNATURE_HEADER: junk}, 403, SIGNATURE_HEADER),
            (signed, "GET", "/snapshot", {**node_headers, NONCE_HEADER: junk}, 400, NONCE_HEADER),
            (signed, "GET", "/cluster/keys", {**keys_headers, NODE_HEADER: junk}, 400, NODE_HEADER),
            (signed, "GET", "/cluster/keys", {**keys_headers, TIMESTAMP_HEADER: junk}, 403, TIMESTAMP_HEADER),
            (signed, "POST", "/cluster/transfer?to=b", {**transfer_headers, SIGNATURE_HEADER: junk}, 403,
             SIGNATURE_HEADER),
        ]
    monkeypatch.setattr(FakeConnection, "made", [])
    forwarding = Client(forward=True, write_timeout_seconds=2.0, connect=FakeConnection)
    forwarding.be_follower("c")
    for junk in JUNK:
        for method, target in (("POST", "/db/jx"), ("DELETE", "/db/jx"), ("POST", "/lease?ttl=5"),
                               ("POST", "/cluster/transfer?to=b")):
            cases += [(forwarding, method, target, {"X-Raftdzmq-Forwarded": junk}, 400, "X-Raftdzmq-Forwarded"),
                      (forwarding, method, target, {SIGNATURE_HEADER: junk}, 403, SIGNATURE_HEADER),
                      (forwarding, method, target, {TIMESTAMP_HEADER: junk}, 403, TIMESTAMP_HEADER)]
        cases.append((forwarding, "POST", "/ui/actions/transfer?to=b", {"X-Raft-Dashboard": junk}, 400,
                      "X-Raft-Dashboard"))
    caplog.set_level("WARNING", logger="raftdzmq.api")
    for client, method, target, headers, status, name in cases:
        r = client(method, target, headers=headers)
        assert (r.status, r.text) == (status, f"refused: malformed {name} header: want 1 to 256 visible ASCII "
                                              "characters\n"), (method, target, headers, r)
        if method != "GET":
            assert r.headers["x-raft-outcome"] == "not-applied", (method, target, headers, r)
    assert signed.runtime.calls == [] and forwarding.runtime.calls == [] and FakeConnection.made == []
    assert "Traceback" not in capsys.readouterr().err
    # One line for each of the two nodes (each has its own log of refusals); the rest within the second left out.
    assert [rec.levelname for rec in caplog.records] == ["WARNING", "WARNING"]
    assert all("malformed" in rec.getMessage() for rec in caplog.records)


# ---- -forward -----------------------------------------------------------------------------------------------------


class FakeConnection:
    """http.client.HTTPConnection's part that forward_to uses; the leader's answer is `answer` (or `error`)."""

    made: list[FakeConnection] = []
    answer = (200, b"", [("X-Raft-Index", "9"), ("Server", "gevent"), ("Content-Type", "text/plain")])
    error: Exception | None = None  # raised while sending
    response_error: Exception | None = None  # raised while waiting for the answer

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.address, self.timeout, self.sent, self.closed = (host, port), timeout, None, False
        FakeConnection.made.append(self)

    def request(self, method, target, body, headers):
        if self.error is not None:
            raise self.error
        self.sent = (method, target, body, headers)

    def getresponse(self):
        if self.response_error is not None:
            raise self.response_error
        status, body, headers = self.answer
        return types.SimpleNamespace(status=status, read=lambda: body, getheaders=lambda: headers)

    def close(self):
        self.closed = True


def test_a_forward_follower_passes_a_write_on_to_the_leader_once(monkeypatch):
    monkeypatch.setattr(FakeConnection, "made", [])
    client = Client(forward=True, write_timeout_seconds=2.0, connect=FakeConnection)
    client.be_follower("c")
    signed = admin_headers(SECRET, "POST", "/db/k%C3%A9?prev_exist=false", b"v")
    r = client("POST", "/db/k%C3%A9?prev_exist=false", "v", headers={"Content-Type": "text/plain", **signed})
    assert (r.status, r.headers["x-raft-index"], r.headers["content-type"]) == (200, "9", "text/plain")
    assert "server" not in r.headers  # only what the client needs of the leader's answer
    [conn] = FakeConnection.made
    method, target, body, headers = conn.sent
    assert (conn.address, conn.timeout, method, target, body) == (("10.0.0.3", 8080), 3.0, "POST",
                                                                  "/db/k%C3%A9?prev_exist=false", b"v")
    assert headers["X-Raftdzmq-Forwarded"] == "a" and headers["Content-Type"] == "text/plain"
    assert headers[TIMESTAMP_HEADER] == signed[TIMESTAMP_HEADER] and headers[SIGNATURE_HEADER] == signed[
        SIGNATURE_HEADER] and conn.closed
    # A request that was forwarded once is not forwarded again: the follower answers 307.
    r = client("POST", "/db/k", "v", headers={"X-Raftdzmq-Forwarded": "b"})
    assert r.status == 307 and len(FakeConnection.made) == 1
    monkeypatch.setattr(FakeConnection, "error", ConnectionRefusedError(111, "Connection refused"))
    r = client("DELETE", "/db/k")
    assert r.status == 503 and r.text.startswith("could not forward to the leader at 10.0.0.3:8080: ") and \
        r.text.endswith("; not applied\n") and one_line(r)
    assert r.headers["x-raft-outcome"] == "not-applied"  # nothing reached the leader whole


def test_a_forward_follower_passes_the_leaders_outcome_on_and_says_unknown_when_the_answer_is_lost(monkeypatch):
    monkeypatch.setattr(FakeConnection, "made", [])
    client = Client(forward=True, write_timeout_seconds=2.0, connect=FakeConnection)
    client.be_follower("c")
    monkeypatch.setattr(FakeConnection, "answer", (503, b"write not confirmed within 2s; its outcome is unknown\n",
                                                   [("X-Raft-Outcome", "unknown"), ("Content-Type", "text/plain")]))
    r = client("POST", "/db/k", "v")
    assert (r.status, r.headers["x-raft-outcome"]) == (503, "unknown")
    monkeypatch.setattr(FakeConnection, "answer", (503, b"write refused for now\n",
                                                   [("X-Raft-Outcome", "not-applied")]))
    assert client("POST", "/db/k", "v").headers["x-raft-outcome"] == "not-applied"
    # Sent whole, then no answer (the leader's -write-timeout + 1 passed): it may have been applied.
    monkeypatch.setattr(FakeConnection, "response_error", TimeoutError("timed out"))
    r = client("PUT", "/db/k", "v")
    assert (r.status, r.headers["x-raft-outcome"]) == (503, "unknown") and one_line(r)
    assert r.text == "no answer from the leader at 10.0.0.3:8080: timed out; outcome unknown\n"


# ---- reads --------------------------------------------------------------------------------------------------------


def test_a_read_is_linearizable_by_default_and_answers_the_value_with_its_headers(client):
    client("POST", "/db/k", b"\x00value")
    r = client("GET", "/db/k")
    assert (r.status, r.body, r.headers["content-type"]) == (200, b"\x00value", "application/octet-stream")
    assert (r.headers["x-raft-applied-index"], r.headers["x-raft-leader"]) == ("1", "a")
    assert client.runtime.calls[-1][0] == "read" and 0.1 < client.runtime.calls[-1][1] <= 0.2  # the read timeout
    assert client.runtime.calls[-1][2] is False
    r = client("GET", "/db/missing")
    assert (r.status, r.text, r.headers["x-raft-applied-index"]) == (404, "no such key: missing\n", "1")
    assert client.counted("reads") == {"linearizable": 2} and sum(client.metrics.read_index_seconds.counts) == 2


def test_lease_and_stale_reads(client):
    client("POST", "/db/k", "v")
    assert client("GET", "/db/k?consistency=lease").body == b"v"
    assert client.runtime.calls[-1][::2] == ("read", True)
    client.be_follower(None)
    client.runtime.fail("read", NotLeader(None))  # a stale read never asks
    r = client("GET", "/db/k?consistency=stale")
    assert (r.status, r.body, r.headers["x-raft-leader"]) == (200, b"v", "")
    assert client.counted("reads") == {"lease": 1, "stale": 1}
    r = client("GET", "/db/k?consistency=weird")
    assert (r.status, r.text) == (400, "consistency must be linearizable, lease or stale\n")


def test_min_index_waits_for_the_index_within_the_read_timeout(client):
    client("POST", "/db/k", "v")
    assert client("GET", "/db/k?min_index=1&consistency=stale").body == b"v"
    assert ("wait_applied", 1, 0.2) in client.runtime.calls
    r = client("GET", "/db/k?min_index=5&consistency=stale")
    assert (r.status, r.text) == (503, "index 5 not applied here within 0.2s\n")
    r = client("GET", "/db/k?min_index=abc")
    assert (r.status, r.text) == (400, "min_index must be an integer\n")


def test_a_read_waits_for_a_leader_within_its_bound_then_answers_503(client):
    client.runtime.fail("read", NotLeader(None), NotLeader(None))
    client("POST", "/db/k", "v")
    assert client("GET", "/db/k").body == b"v"  # a leader came after two tries
    client.runtime.fail("read", *[NotLeader(None)] * 1000)
    r = client("GET", "/db/k")
    assert (r.status, r.text) == (503, "no leader is known right now; the read cannot be confirmed\n")
    reads = [c for c in client.runtime.calls if c[0] == "read"]
    assert 3 < len(reads) < 30  # every 20 ms for the 0.2 s read timeout, each try bounded by what is left
    assert all(0.01 <= c[1] <= 0.2 for c in reads)


def test_a_read_on_a_removed_node_answers_410_at_once(client):
    client.runtime.node.removed = ("b", 4)
    client.runtime.fail("read", NotLeader(None), NotLeader(None))
    r = client("GET", "/db/k?consistency=lease")
    assert (r.status, r.text) == (410, "this node was removed from the cluster (by b at or before index 4)\n")
    assert [c[0] for c in client.runtime.calls] == ["read"]


@pytest.mark.parametrize("error, text", [
    (Timeout("no answer"), "could not confirm a linearizable read within 0.2s"),
    (Stopped("node is stopping"), "node is stopping"),
])
def test_each_failure_of_a_read_has_its_answer(client, error, text):
    client.runtime.fail("read", error)
    r = client("GET", "/db/k")
    assert (r.status, r.text) == (503, text + "\n")


def test_a_page_of_keys_as_json_with_the_next_key(client):
    for k in ("b/1", "a", "b/2", "b/3", "\u00e9t\u00e9"):
        client("POST", "/db/" + urllib.parse.quote(k), "v")
    r = client("GET", "/db/?prefix=b/&limit=2")
    assert (r.status, r.headers["content-type"]) == (200, "application/json")
    assert r.body == b'{"keys": ["b/1", "b/2"], "next": "b/2"}\n'
    assert json.loads(client("GET", "/db?prefix=b/&after=b/2").body) == {"keys": ["b/3"], "next": None}
    assert json.loads(client("GET", "/db/?prefix=%C3%A9").body)["keys"] == ["\u00e9t\u00e9"]
    assert json.loads(client("GET", "/db/?limit=0").body) == {"keys": ["a"], "next": "a"}  # at least 1
    assert len(json.loads(client("GET", "/db/?limit=99999").body)["keys"]) == 5  # at most 10,000
    assert client.runtime.calls[-1][::2] == ("read", False)
    for query, text in (("prefix=%FF", "prefix and after must be UTF-8"), ("after=%C3", "prefix and after must be UTF-8"),
                        ("limit=ten", "limit must be an integer"), ("consistency=x", "consistency must be linearizable, "
                                                                                     "lease or stale")):
        r = client("GET", "/db/?" + query)
        assert (r.status, r.text) == (400, text + "\n"), query


PAGE_BYTES = 4 << 20  # the bound in bytes of JSON of a page of keys, as the README gives it


def test_a_page_of_keys_stops_at_its_bound_in_bytes_of_json_and_names_the_next_key(client):
    """Review edge3, L2: GET /db/?limit=10000 had no bound in bytes: 10,000 keys of 4,096 control bytes (24.5 KB of
    JSON each) made one answer of 245 MB. A page stops at 4 MiB of JSON, and "next" says where the next
    page starts, as when `limit` stops it; paging through gets every key once."""
    keys = [f"{i:03d}" + "\x01" * 4000 for i in range(400)]  # 24 KB of JSON each: 9.6 MB in all
    for i, key in enumerate(keys):
        client.store.apply(i + 1, command(SET, key, b"v"))
    seen: list[str] = []
    after, pages = "", 0
    while True:
        r = client("GET", "/db/?limit=10000&after=" + urllib.parse.quote(after))
        # The keys' JSON within the bound, then "next": one key more (at most 6 x 4,096 bytes of JSON).
        assert r.status == 200 and len(r.body) <= PAGE_BYTES + 6 * 4096 + 100, len(r.body)
        page = json.loads(r.body)
        seen += page["keys"]
        pages += 1
        if page["next"] is None:
            break
        assert page["next"] == page["keys"][-1]
        after = page["next"]
    assert seen == keys and pages == 3  # 4 MiB is 174 of these keys
    assert r.body == (json.dumps({"keys": keys[348:], "next": None}) + "\n").encode()  # json.dumps' own text


def test_a_leases_keys_are_listed_up_to_the_page_bound_in_bytes(leased):
    """Review edge3, L2: GET /lease/ID listed its first 1,000 keys whatever their size (24.5 MB of JSON). It lists
    at most 4 MiB of them as JSON; key_count counts them all."""
    client, _, _ = leased
    assert client("POST", "/lease?ttl=10").status == 200
    lease_id = max(client.store.leases)
    keys = sorted(f"{i:03d}" + "\x01" * 4000 for i in range(300))
    for key in keys:
        assert client("POST", f"/db/{urllib.parse.quote(key)}?lease={lease_id}", "v").status == 200
    r = client("GET", f"/lease/{lease_id}")
    answer = json.loads(r.body)
    assert r.status == 200 and len(r.body) <= PAGE_BYTES + 200, len(r.body)
    assert answer["key_count"] == 300 and answer["keys"] == keys[:174]


# ---- membership and leadership ------------------------------------------------------------------------------------

JOIN = json.dumps({"node_id": "d", "raft_address": "10.0.0.4:5555", "http_address": "10.0.0.4:8080"})
D_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a CURVE public key (Z85; the one in RFC 32's example)
A_KEY = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"  # another (RFC 32's example server key)
B_KEY, C_KEY = "^R^Q{<giwv)vJU.c*l?4EdeYygWkTt&}[!OkA-2D", "-p]9@i8{bMzPp-Z1fHT^<5Db[Z2aAa7}F22{^&W*"
KEYED = Membership(("a", "b"), ("c",), tuple(dataclasses.replace(m, public_key=k) for m, k in zip(
    MEMBERS, (A_KEY, B_KEY, C_KEY))))  # the configuration of a cluster with a secret: every member has its key
SIGNED_JOIN = json.dumps({**json.loads(JOIN), "public_key": D_KEY})  # with a cluster secret


def test_join_adds_a_learner_and_answers_its_index(client):
    r = client("POST", "/join", JOIN)
    assert (r.status, r.headers["content-type"], json.loads(r.body)) == (200, "application/json", {"index": 1})
    [(_, change, timeout_seconds)] = client.runtime.calls
    assert (change.kind, change.member, timeout_seconds) == (ConfChangeKind.ADD_LEARNER,
                                                             Member("d", "10.0.0.4:5555", "10.0.0.4:8080"), 2.0)


@pytest.mark.parametrize("body", [b"", b"not json", b"[", b"{}", b"[1, 2, 3]", json.dumps({
    "node_id": 1, "raft_address": "a", "http_address": "b"}).encode(), json.dumps({
        "node_id": "", "raft_address": "a", "http_address": "b"}).encode(), json.dumps({
            "node_id": "x" * 256, "raft_address": "a", "http_address": "b"}).encode()])
def test_a_bad_join_body_gets_400(client, body):
    r = client("POST", "/join", body)
    assert r.status == 400 and r.text.startswith("bad join body") and one_line(r)
    assert client.runtime.calls == []


def test_a_join_waits_out_another_change_in_flight_within_the_write_timeout():
    client = Client(write_timeout_seconds=0.3)
    client.runtime.fail("change_membership", ProposalDropped("a change is in flight"))
    assert client("POST", "/join", JOIN).status == 200
    client.runtime.fail("change_membership", *[ProposalDropped("a change is in flight")] * 100)
    r = client("POST", "/join", JOIN)
    assert (r.status, r.text) == (503, "join not possible now: a change is in flight\n")
    assert 4 <= len(client.runtime.calls) - 2 <= 10  # every 50 ms for 0.3 s


@pytest.mark.parametrize("operation, method, target, body, call", [
    ("join", "POST", "/join", JOIN, "change_membership"),
    ("removal", "DELETE", "/cluster/b", "", "change_membership"),
    ("transfer", "POST", "/cluster/transfer?to=b", "", "transfer_leadership"),
])
def test_each_failure_of_an_admin_request_has_its_answer(client, operation, method, target, body, call):
    assert client(method, target, body).status == 200
    cases = [(Timeout("no answer in 2.0s"), 503, f"{operation} not confirmed: no answer in 2.0s", "unknown"),
             (Stopped("node is stopping"), 503, f"{operation} not confirmed: node is stopping", "unknown"),
             (NotRunning("node is not running"), 503, f"{operation} not confirmed: node is not running",
              "not-applied"),
             (ValueError("b is not a member"), 400, "b is not a member", "not-applied"),
             (NotLeader("c"), 307, NOT_LEADER, "not-applied")]
    if operation != "transfer":
        cases.append((EntryLost("entry 5 was overwritten"), 503, f"{operation} not confirmed: entry 5 was overwritten",
                      "not-applied"))
    if operation == "removal":
        cases.append((ProposalDropped("a change is in flight"), 503, "removal not confirmed: a change is in flight",
                      "not-applied"))
    if operation == "transfer":  # timed out before the runtime took it: never started (Runtime.transfer_leadership)
        cases.append((ProposalDropped("the transfer to b was not started within 2s"), 503,
                      "the transfer to b was not started within 2s; sign it again to retry", "not-applied"))
    for error, status, text, raft_outcome in cases:
        client.runtime.node.leader_id = "c"
        client.runtime.fail(call, error)
        r = client(method, target, body)
        assert (r.status, r.text) == (status, text + "\n") and one_line(r), (error, r)
        assert r.headers["x-raft-outcome"] == raft_outcome, (error, r.headers)
        client.runtime.node.leader_id = "a"
    client.be_follower("b")
    r = client(method, target, body)
    assert r.status == 307 and r.headers["location"] == "http://10.0.0.2:8080" + target


def test_remove_and_transfer_answer_what_they_did(client):
    client.runtime.node.membership = ALL_VOTERS  # a transfer's target is a voter (check_transfer_target)
    r = client("DELETE", "/cluster/b")
    assert (r.status, r.text, r.headers["x-raft-index"]) == (200, "removed b\n", "1")
    change = client.runtime.calls[-1][1]
    assert (change.kind, change.member.node_id) == (ConfChangeKind.REMOVE, "b")
    r = client("POST", "/cluster/transfer?to=c")
    assert (r.status, r.text) == (200, "leader is now c\n")
    assert client.runtime.calls[-2] == ("transfer_leadership", "c", 2.0) and client.runtime.calls[-1][0] == "read"


def test_a_transfer_to_a_member_restoring_a_snapshot_is_refused_409_before_anything_is_started(client):
    """Review restoreedges: a member restoring a snapshot ignores TimeoutNow until its restore ends, so a transfer to
    it was accepted, held the leader's writes for its bound, and timed out. The leader knows it restores (its
    append replies say so: Progress.restoring) and refuses the transfer at once, 409 with one line, not applied.
    Once b's replies no longer say it, the transfer goes ahead."""
    client.runtime.follower_restoring = True
    r = client("POST", "/cluster/transfer?to=b")
    assert (r.status, r.text) == (409, "b is restoring a snapshot and would ignore the transfer; retry once its "
                                       "restore ends\n") and one_line(r)
    assert r.headers["x-raft-outcome"] == "not-applied"
    assert not [c for c in client.runtime.calls if c[0] == "transfer_leadership"]
    client.runtime.follower_restoring = False
    r = client("POST", "/cluster/transfer?to=b")
    assert (r.status, r.text) == (200, "leader is now b\n")
    assert ("transfer_leadership", "b", 2.0) in client.runtime.calls


def test_a_transfer_to_a_learner_restoring_a_snapshot_is_refused_400_as_not_a_voter(client):
    """Review restoreedges-fix Q3: the voter check comes first (check_transfer_target), as a learner's restore
    ending would not make the transfer possible: 400 "not a voter", not 409 "retry once its restore ends"."""
    client.runtime.node.membership = Membership(("a", "c"), ("b",), MEMBERS)
    client.runtime.follower_restoring = True
    r = client("POST", "/cluster/transfer?to=b")
    assert (r.status, r.text) == (400, "b is not a voter\n") and one_line(r)
    assert r.headers["x-raft-outcome"] == "not-applied"
    assert not [c for c in client.runtime.calls if c[0] == "transfer_leadership"]


def test_a_signed_transfer_refused_409_for_a_restoring_target_may_be_sent_again_once_the_restore_ended():
    """Review restoreedges-fix Q2: the route refuses a target it knows restores before it claims the signature,
    so the same signed request goes through once the restore ended. When the core refuses it (the target began
    restoring after the route's check, V1: TargetRestoring), the claim is made: the same request is a replay."""
    client = signed_client()
    runtime = client.runtime
    headers = admin_headers(SECRET, "POST", "/cluster/transfer?to=b")
    runtime.follower_restoring = True
    r = client("POST", "/cluster/transfer?to=b", headers=headers)
    assert (r.status, r.text) == (409, "b is restoring a snapshot and would ignore the transfer; retry once its "
                                       "restore ends\n") and one_line(r)
    assert r.headers["x-raft-outcome"] == "not-applied"
    assert runtime.calls == [] and client.store.admin_claims.claims == {}  # nothing claimed, nothing started
    runtime.follower_restoring = False
    r = client("POST", "/cluster/transfer?to=b", headers=headers)
    assert (r.status, r.text) == (200, "leader is now b\n"), r
    assert [c[0] for c in runtime.calls[:2]] == ["propose", "transfer_leadership"]  # the claim, then the transfer

    runtime.node.leader_id = "a"
    headers = admin_headers(SECRET, "POST", "/cluster/transfer?to=b")
    runtime.fail("transfer_leadership", TargetRestoring("b"))
    r = client("POST", "/cluster/transfer?to=b", headers=headers)
    assert (r.status, r.text) == (409, "b is restoring a snapshot and would ignore the transfer; retry once its "
                                       "restore ends\n") and one_line(r)
    assert r.headers["x-raft-outcome"] == "not-applied"
    r = client("POST", "/cluster/transfer?to=b", headers=headers)
    assert r.status == 403 and "already used (a replay)" in r.text, r


def test_a_transfer_answers_200_only_once_the_target_is_confirmed_as_leader():
    """Review 3 F2: the runtime returns once this node has heard of the target leading; a target that cannot hold
    leadership (cut off from the others) did that for a moment, and the transfer answered 200. The route now
    confirms it with a linearizable read, within the write timeout."""
    client = Client(write_timeout_seconds=0.5)
    client.runtime.node.membership = ALL_VOTERS
    client.runtime.fail("read", Timeout("could not confirm a read in 0.5s"))
    r = client("POST", "/cluster/transfer?to=c")
    assert (r.status, r.text) == (503, "transfer not confirmed: could not confirm a read in 0.5s\n") and one_line(r)
    # The read confirms a leader, but another one: the target lost it meanwhile.
    runtime = client.runtime
    read = runtime.read

    def read_then_lost(timeout_seconds: float, lease: bool = False) -> int:
        runtime.node.leader_id = "a"
        return read(timeout_seconds, lease)

    runtime.read = read_then_lost
    r = client("POST", "/cluster/transfer?to=c")
    assert (r.status, r.text) == (503, "transfer not confirmed: a leads, not c\n"), r
    # No leader known for a while (NotLeader), then the target confirmed: 200, with the read asked again.
    runtime.read = read
    runtime.fail("read", NotLeader(None), NotLeader(None))
    r = client("POST", "/cluster/transfer?to=c")
    assert (r.status, r.text) == (200, "leader is now c\n"), r
    assert [c[0] for c in runtime.calls[-4:]] == ["transfer_leadership", "read", "read", "read"]
    # Never confirmed within the bound: 503.
    runtime.fail("read", *[NotLeader(None)] * 1000)
    r = client("POST", "/cluster/transfer?to=c")
    assert r.status == 503 and "c was not confirmed as the leader within 0.5s" in r.text, r


def test_a_transfer_started_on_a_node_that_then_stops_is_unknown_not_not_applied():
    """Review S1: the transfer took effect (TimeoutNow went out, the target leads), then the node stopped before
    the confirming read was queued (NotRunning). That read's NotRunning is not the transfer's: `unknown`."""
    client = Client(write_timeout_seconds=2.0, read_timeout_seconds=0.2)
    client.runtime.node.membership = ALL_VOTERS
    client.runtime.fail("read", NotRunning("node is not running"))
    r = client("POST", "/cluster/transfer?to=b")
    assert client.runtime.node.leader_id == "b"
    assert (r.status, r.headers["x-raft-outcome"]) == (503, "unknown"), (r, r.headers)
    assert r.text == "transfer not confirmed: node is not running; the transfer was started\n"
    # Refused before anything was sent: not applied.
    client.runtime.fail("transfer_leadership", NotRunning("node is not running"))
    r = client("POST", "/cluster/transfer?to=c")
    assert (r.status, r.headers["x-raft-outcome"]) == (503, "not-applied"), (r, r.headers)


# ---- signed admin requests ----------------------------------------------------------------------------------------


def signed_client() -> Client:
    client = Client(write_timeout_seconds=2.0, guard=AdminGuard(SECRET))
    client.runtime.node.membership = KEYED
    return client


@pytest.mark.parametrize("method, target, body, what", [
    ("POST", "/join", SIGNED_JOIN, "join"), ("DELETE", "/cluster/b", "", "removal"),
    ("POST", "/cluster/transfer?to=b", "", "transfer")])
def test_with_a_secret_admin_requests_must_be_signed_once(method, target, body, what):
    client = signed_client()
    for headers, why in (({}, "not signed with this cluster's secret (no signature)"),
                         (admin_headers(b"another", method, target, body.encode()), "the signature does not match"),
                         (admin_headers(SECRET, method, target + "x", body.encode()), "the signature does not match"),
                         ({TIMESTAMP_HEADER: "soon", SIGNATURE_HEADER: "00"}, "malformed timestamp"),
                         (admin_headers(SECRET, method, target, body.encode(), now=1.0), "from this node's clock")):
        r = client(method, target, body, headers=headers)
        assert r.status == 403 and r.text.startswith(f"{what} refused: ") and why in r.text and one_line(r), r
    assert client.runtime.calls == []
    headers = admin_headers(SECRET, method, target, body.encode())
    assert client(method, target, body, headers=headers).status == 200
    claim = client.runtime.calls[0]
    assert claim[0] == "propose" and client.store.admin_claims.claims == {
        headers[SIGNATURE_HEADER]: float(headers[TIMESTAMP_HEADER])}
    calls = len(client.runtime.calls)
    r = client(method, target, body, headers=headers)  # the same request again: a replay
    assert (r.status, r.text) == (403, f"{what} refused: this signed request was already used (a replay); sign it "
                                       "again\n")
    assert len(client.runtime.calls) == calls  # the replay to this leader cost no log entry


def test_a_signature_claimed_on_another_leader_is_refused():
    client = signed_client()
    headers = admin_headers(SECRET, "POST", "/cluster/transfer?to=b")
    # Another leader claimed it through the log; this one never saw the request.
    client.store.apply(1, command(ADMIN_CLAIM, headers[SIGNATURE_HEADER], b"", [float(headers[TIMESTAMP_HEADER]), 0]))
    r = client("POST", "/cluster/transfer?to=b", headers=headers)
    assert (r.status, r.text) == (403, "transfer refused: this signed request was already used, on another leader (a "
                                       "replay); sign it again\n")
    assert not any(c[0] == "transfer_leadership" for c in client.runtime.calls)


@pytest.mark.parametrize("error", [ProposalDropped("busy"), EntryLost("lost"), Timeout("no answer"),
                                   DiskFull("disk full"), Stopped("stopping")])
def test_a_claim_that_does_not_commit_must_be_signed_again(error):
    client = signed_client()
    client.runtime.fail("propose", error)
    r = client("DELETE", "/cluster/b", headers=admin_headers(SECRET, "DELETE", "/cluster/b"))
    assert (r.status, r.text) == (503, f"removal not confirmed ({error}); sign it again to retry\n")
    assert r.headers["x-raft-outcome"] == "not-applied"  # the removal itself was never proposed
    assert [c[0] for c in client.runtime.calls] == ["propose"]


def test_a_signed_request_to_a_follower_is_redirected_before_its_claim():
    client = signed_client()
    client.be_follower("b")
    headers = admin_headers(SECRET, "POST", "/join", SIGNED_JOIN.encode())
    r = client("POST", "/join", SIGNED_JOIN, headers=headers)
    assert r.status == 307 and client.runtime.calls == []
    client.runtime.node.role = Role.LEADER
    assert client("POST", "/join", SIGNED_JOIN, headers=headers).status == 200  # not used up by the redirect


def test_removing_a_node_that_is_not_a_member_is_404_and_appends_nothing():
    """Review 2, minor: a signed DELETE /cluster/nope00 answered 200 and put a claim into the log."""
    client = signed_client()
    r = client("DELETE", "/cluster/nope00", headers=admin_headers(SECRET, "DELETE", "/cluster/nope00"))
    assert (r.status, r.text) == (404, "nope00 is not a member\n")
    assert client.runtime.calls == []


def test_with_a_secret_a_join_names_its_key_and_the_answer_lists_the_members_keys_signed():
    """Review 2 F2: the joining node's public key goes into the configuration; the answer's keys are what it
    admits until a configuration reaches it, so the answer is signed for this request; a member's id with another
    key is refused (a holder of the secret must not take over a member's identity)."""
    client = signed_client()
    r = client("POST", "/join", JOIN, headers=admin_headers(SECRET, "POST", "/join", JOIN.encode()))
    assert r.status == 400 and "public_key" in r.text and one_line(r), r
    headers = admin_headers(SECRET, "POST", "/join", SIGNED_JOIN.encode())
    r = client("POST", "/join", SIGNED_JOIN, headers=headers)
    assert r.status == 200, r
    change = next(c[1] for c in client.runtime.calls if c[0] == "change_membership")
    assert change.member == Member("d", "10.0.0.4:5555", "10.0.0.4:8080", D_KEY)
    answer = {k.lower(): v for k, v in r.headers.items()}
    canonical = {TIMESTAMP_HEADER: answer[TIMESTAMP_HEADER.lower()], SIGNATURE_HEADER: answer[SIGNATURE_HEADER.lower()]}
    assert verify_answer(SECRET, headers[SIGNATURE_HEADER], r.body, canonical)
    assert not verify_answer(SECRET, "another request", r.body, canonical)
    assert not verify_answer(b"another secret", headers[SIGNATURE_HEADER], r.body, canonical)
    assert json.loads(r.body) == {"index": 2, "leader": "a", "members": {m.node_id: m.public_key for m in KEYED.members},
                                  "http_addresses": {m.node_id: m.http_address for m in KEYED.members}}
    taken = json.dumps({"node_id": "b", "raft_address": "x:1", "http_address": "x:2", "public_key": D_KEY})
    r = client("POST", "/join", taken, headers=admin_headers(SECRET, "POST", "/join", taken.encode()))
    assert r.status == 409 and "another key" in r.text, r


def answer_headers_of(r: Answer) -> dict:
    headers = {k.lower(): v for k, v in r.headers.items()}
    return {TIMESTAMP_HEADER: headers.get(TIMESTAMP_HEADER.lower(), ""),
            SIGNATURE_HEADER: headers.get(SIGNATURE_HEADER.lower(), "")}


def test_the_keys_request_is_answered_by_any_member_signed_for_that_request_only():
    """GET /cluster/keys (review of edge3, findings 1 and 2: a node whose configuration is behind asks a member for
    the keys of a newer one): a follower answers from its own newest configuration, with its index, signed for the
    request; an unsigned, wrongly signed, stale or replayed request is refused (403), one without a fresh nonce is
    400, and nothing goes through the log. An answer verifies for its own request only, so a recorded answer
    cannot be handed to another."""
    client = Client(write_timeout_seconds=2.0, guard=AdminGuard(SECRET), committed_configuration=lambda: (7, KEYED))
    client.runtime.node.membership = KEYED
    client.be_follower("b")
    headers = keys_request_headers(SECRET, "a")
    r = client("GET", "/cluster/keys", headers=headers)
    assert r.status == 200, r
    assert json.loads(r.body)["node_id"] == "a"
    assert verify_answer(SECRET, headers[SIGNATURE_HEADER], r.body, answer_headers_of(r))
    assert parse_vouched(r.body) == (7, {m.node_id: m.public_key for m in KEYED.members},
                                     {m.node_id: m.http_address for m in KEYED.members})
    # The asker takes it for its own request only: not for another (a recorded answer replayed), not changed, not
    # under another secret.
    assert read_keys_answer(SECRET, headers, r.body, answer_headers_of(r)) == parse_vouched(r.body)
    other = keys_request_headers(SECRET, "a")
    tampered = r.body.replace(b'"index": 7', b'"index": 9')
    for secret, request_headers, body in ((SECRET, other, r.body), (SECRET, headers, tampered),
                                          (b"another secret", headers, r.body)):
        with pytest.raises(ValueError, match="not signed for our request"):
            read_keys_answer(secret, request_headers, body, answer_headers_of(r))
    nonce = headers[NONCE_HEADER]
    for request_headers, status, why in (
            ({NONCE_HEADER: nonce, NODE_HEADER: "a"}, 403, "(no signature)"),
            ({**admin_headers(SECRET, "GET", "/cluster/keys"), NONCE_HEADER: nonce, NODE_HEADER: "a"}, 403,
             "does not match"),
            (keys_request_headers(b"another secret", "a"), 403, "does not match"),
            (keys_request_headers(SECRET, "a", now=1.0), 403, "from this node's clock"),
            ({**keys_request_headers(SECRET, "a"), NODE_HEADER: "b"}, 403, "does not match"),
            ({k: v for k, v in headers.items() if k != NONCE_HEADER}, 400, NONCE_HEADER),
            ({k: v for k, v in keys_request_headers(SECRET, "a").items() if k != NODE_HEADER}, 400, NODE_HEADER),
            ({**keys_request_headers(SECRET, "a", nonce="ab" * 4)}, 400, NONCE_HEADER)):
        r = client("GET", "/cluster/keys", headers=request_headers)
        assert r.status == status and why in r.text and one_line(r), (request_headers, r)
        assert SIGNATURE_HEADER.lower() not in {k.lower() for k in r.headers}
    assert client.runtime.calls == []
    assert Client()("GET", "/cluster/keys").status == 404  # no secret, no keys


def test_the_keys_answer_is_the_newest_committed_configuration():
    """Review of edge5, finding 2: GET /cluster/keys answered the newest configuration in the log, committed or
    not; one later cut off pinned the asker's list. The answer is the newest configuration at or below the commit
    index (Server.committed_configuration), else the snapshot's; with neither, 503 and no list."""
    from raftlib import Entry, EntryKind, Snapshot

    old, new = KEYED, Membership(("a", "b", "c"), (), KEYED.members)
    entries = [Entry(1, 3, EntryKind.MEMBERSHIP, membership=old), Entry(2, 6, EntryKind.MEMBERSHIP, membership=new)]
    snapshot = Snapshot(2, 1, Membership(("a",), (), KEYED.members[:1]), b"")
    raft = types.SimpleNamespace(commit_index=5, snapshot=snapshot,
                                 log=types.SimpleNamespace(membership_entries=lambda: entries))
    node = types.SimpleNamespace(node=raft)
    assert Server.committed_configuration(node) == (3, old)  # 6 is not committed
    raft.commit_index = 6
    assert Server.committed_configuration(node) == (6, new)
    entries.clear()
    assert Server.committed_configuration(node) == (2, snapshot.membership)
    raft.snapshot = None
    assert Server.committed_configuration(node) is None
    client = Client(write_timeout_seconds=2.0, guard=AdminGuard(SECRET), committed_configuration=lambda: (3, old))
    client.runtime.node.membership = new  # the newest in the log, not committed
    r = client("GET", "/cluster/keys", headers=keys_request_headers(SECRET, "a"))
    assert r.status == 200 and json.loads(r.body)["index"] == 3, r
    client.api.committed_configuration = lambda: None
    r = client("GET", "/cluster/keys", headers=keys_request_headers(SECRET, "a"))
    assert r.status == 503 and "no committed configuration" in r.text and one_line(r), r


def test_keys_requests_take_no_place_in_the_admin_guards_memory():
    """Review of edge5, finding 3: every keys request's signature was kept for 600 s, so a removed member dialling
    in filled the memory that admin requests need (and past 256 entries every claim rebuilt it). The answer is
    bound to the request's fresh nonce, so the same request again is answered again (signed for that request,
    which only its asker takes) and nothing is remembered."""
    guard = AdminGuard(SECRET)
    client = Client(write_timeout_seconds=2.0, guard=guard, committed_configuration=lambda: (7, KEYED))
    client.runtime.node.membership = KEYED
    headers = keys_request_headers(SECRET, "a")
    bodies = {client("GET", "/cluster/keys", headers=headers).body for _ in range(3)}
    for _ in range(300):
        assert client("GET", "/cluster/keys", headers=keys_request_headers(SECRET, "a")).status == 200
    assert len(bodies) == 1 and guard.remembered == 0


class CountingTime(float):
    """A clock reading that counts the comparisons made with it (and with the times computed from it)."""

    comparisons = 0

    def __add__(self, other):
        return CountingTime(float(self) + other)

    def _count(op):
        def compare(self, other):
            CountingTime.comparisons += 1
            return op(float(self), float(other))
        return compare

    __lt__, __le__, __gt__, __ge__ = (_count(float.__lt__), _count(float.__le__), _count(float.__gt__),
                                      _count(float.__ge__))


def test_the_admin_guard_forgets_in_time_order_at_constant_cost_per_claim():
    """Review of edge5, finding 3: past 256 live signatures every claim rebuilt the whole table (O(n) per claim).
    Signatures expire in the order they came, 2 x the clock skew after their claim; a claim costs O(1) amortized
    however many are live, and a signature is refused while remembered and taken again once forgotten."""
    now = [CountingTime(1000.0)]
    guard = AdminGuard(SECRET, clock=lambda: now[0])
    for i in range(2000):
        assert guard.claim(f"sig{i}") is None
    CountingTime.comparisons = 0
    now[0] = CountingTime(1001.0)
    for i in range(2000, 4000):
        assert guard.claim(f"sig{i}") is None
    assert CountingTime.comparisons < 3 * 2000, CountingTime.comparisons  # a table rebuild is 2,000 per claim
    assert guard.claim("sig0") is not None and guard.remembered == 4000
    now[0] = CountingTime(1000.0 + 2 * ADMIN_CLOCK_SKEW_SECONDS)  # the first 2,000 expire now, in order
    assert guard.claim("sig0") is None and guard.claim("sig2000") is not None and guard.remembered == 2001
    now[0] = CountingTime(1001.0 + 2 * ADMIN_CLOCK_SKEW_SECONDS)
    assert guard.claim("sig3999") is None and guard.remembered == 2


def test_a_keys_request_is_answered_only_by_the_node_it_names_and_taken_only_from_it():
    """Review of edge5, finding 1: C asked B's address; Z, a node of another cluster with the same secret, listened
    there and answered with its own list, which C took (and, kept in node.key, it then refused B's genuine lists
    for good). The request names the node asked, signed: another node refuses it (421). The answer names its
    node, signed: the asker refuses an answer from another node, or from a node not in the list it sends."""
    z_membership = Membership(("z",), (), (Member("z", "10.9.0.1:5555", "10.9.0.1:8080", D_KEY),))
    z = Client(write_timeout_seconds=2.0, guard=AdminGuard(SECRET), committed_configuration=lambda: (35, z_membership))
    z.runtime.node.node_id = "z"
    z.runtime.node.membership = z_membership
    z.be_follower("z")
    for_b = keys_request_headers(SECRET, "b")
    r = z("GET", "/cluster/keys", headers=for_b)
    assert (r.status, r.text) == (421, "this is node z, not b: ask the node at the address it gave\n"), r
    assert SIGNATURE_HEADER.lower() not in {k.lower() for k in r.headers}
    # Z answers a request naming Z; a recording of that answer, or a node that answers whatever it is asked,
    # does not pass for B's answer, nor does one naming B in a list without B.
    for_z = keys_request_headers(SECRET, "z")
    r = z("GET", "/cluster/keys", headers=for_z)
    assert r.status == 200 and json.loads(r.body)["node_id"] == "z", r
    assert read_keys_answer(SECRET, for_z, r.body, answer_headers_of(r))[0] == 35
    for claimed, why in (("z", "answered by 'z', not by 'b'"), ("b", "b is not a member")):
        body = r.body.replace(b'"node_id": "z"', f'"node_id": "{claimed}"'.encode())
        signed = answer_headers(SECRET, for_b[SIGNATURE_HEADER], body)
        with pytest.raises(ValueError, match=why):
            read_keys_answer(SECRET, for_b, body, signed)


def test_a_join_with_another_members_key_is_409():
    """Review 3 F2: a new node id with a member's public key (GET /cluster lists them) was accepted, and every node
    then took that member's frames as the newcomer's: the member was cut off."""
    client = signed_client()
    client.runtime.node.membership = Membership(("a", "b"), (), (dataclasses.replace(MEMBERS[0], public_key=A_KEY),
                                                                   dataclasses.replace(MEMBERS[1], public_key=D_KEY)))
    for key, owner in ((D_KEY, "b"), (A_KEY, "a")):
        body = json.dumps({"node_id": "zzzzzzzz", "raft_address": "x:1", "http_address": "x:2", "public_key": key})
        r = client("POST", "/join", body, headers=admin_headers(SECRET, "POST", "/join", body.encode()))
        assert (r.status, r.text) == (409, f"this public key is member {owner}'s: every node needs a key of its "
                                           "own\n"), r
    assert client.runtime.calls == []  # refused before its claim: nothing in the log


@pytest.mark.parametrize("secret", [True, False])
def test_a_join_naming_a_member_with_other_addresses_is_409_and_the_same_join_is_a_retry(secret):
    """Review 3 F4: a signed join naming the leader's id and key with another HTTP address moved the leader, and
    a follower's 307 then pointed at attacker.example."""
    client = signed_client() if secret else Client()
    b = (KEYED if secret else client.runtime.node.membership).members[1]
    for raft, http_address in ((b.raft_address, "attacker.example:80"), ("attacker.example:5555", b.http_address)):
        body = json.dumps({"node_id": "b", "raft_address": raft, "http_address": http_address,
                           **({"public_key": b.public_key} if secret else {})})
        r = client("POST", "/join", body, headers=admin_headers(SECRET, "POST", "/join", body.encode()))
        assert (r.status, r.text) == (409, "node b is a member at 10.0.0.2:5555 (raft) and 10.0.0.2:8080 (http): a "
                                           "join does not move a member; remove it first\n"), r
    assert client.runtime.calls == []
    body = json.dumps({"node_id": "b", "raft_address": b.raft_address, "http_address": b.http_address,
                       **({"public_key": b.public_key} if secret else {})})
    r = client("POST", "/join", body, headers=admin_headers(SECRET, "POST", "/join", body.encode()))
    assert r.status == 200, r  # the same join again (a retry): answered as before
    assert next(c for c in client.runtime.calls if c[0] == "change_membership")[1].member == b


def test_a_join_checks_its_refusals_again_under_the_membership_lock_and_at_each_retry(monkeypatch):
    """Review of ops 2, C: join_refusal ran only before the membership lock; two joins under one name (zz-1111...,
    zz-2222...), one waiting for the lock while the other's change applied, both became members, and so past
    max_members. Here a namesake of d joins while d's join waits for the leader's log, then while its change
    waits out another; a name two members share is then a 409 on removal, not a 404."""
    namesake = Member("d-0a1b2c3d", "10.0.0.9:5555", "10.0.0.9:8080")

    def another_join_meanwhile(*args):
        client.runtime.node.membership = Membership(("a", "b", "c"), ("d-0a1b2c3d",), (*MEMBERS, namesake))

    client = Client()
    client.runtime.pending = [b"an entry this leader has not applied yet"]
    waited = client.runtime.wait_applied
    monkeypatch.setattr(client.runtime, "wait_applied", lambda *args: (another_join_meanwhile(), waited(*args))[1])
    r = client("POST", "/join", JOIN)
    assert r.status == 409 and "member d-0a1b2c3d has the name d" in r.text, r
    assert not [c for c in client.runtime.calls if c[0] == "change_membership"]

    client = Client()

    def change_in_flight(change, timeout_seconds):
        another_join_meanwhile()
        raise ProposalDropped("a change is in flight")

    monkeypatch.setattr(client.runtime, "change_membership", change_in_flight)
    r = client("POST", "/join", JOIN)
    assert r.status == 409 and "member d-0a1b2c3d has the name d" in r.text, r

    client = Client()
    client.runtime.node.membership = Membership(("a", "b", "c"), ("d-0a1b2c3d", "d-11111111"),
                                                (*MEMBERS, namesake, Member("d-11111111", "x:1", "x:2")))
    r = client("DELETE", "/cluster/d")
    assert (r.status, r.text) == (409, "d is the name of several members (d-0a1b2c3d, d-11111111): give the id\n")
    assert client("DELETE", "/cluster/d-11111111").status == 200


def test_a_join_beyond_max_members_is_409_and_a_retry_or_a_removal_is_not_refused():
    """Review 3 F5: thousands of signed learner joins grew every membership entry and snapshot, and opened a
    socket each on every node. The configuration has three members here."""
    client = Client(max_members=3)
    r = client("POST", "/join", JOIN)
    assert (r.status, r.text) == (409, "the cluster has 3 members, the most -max-members allows: remove one first\n")
    assert client.runtime.calls == []
    b = MEMBERS[1]
    again = json.dumps({"node_id": "b", "raft_address": b.raft_address, "http_address": b.http_address})
    assert client("POST", "/join", again).status == 200  # a retry of a member's join adds nobody
    assert client("DELETE", "/cluster/c").status == 200
    client.runtime.node.membership = Membership(("a", "b"), (), MEMBERS[:2])
    assert client("POST", "/join", JOIN).status == 200
    assert Client()("POST", "/join", JOIN).status == 200  # the default, 64


def test_with_a_secret_a_cluster_whose_members_lack_keys_refuses_joins():
    """Review 3 F3: a cluster with a secret made before node keys (no key in the configuration) took a join, and
    the new node admitted nobody: it waited for ever. Now 409 with the reason; without a secret, joins as before."""
    client = signed_client()
    client.runtime.node.membership = Membership(("a", "b"), ("c",), (KEYED.members[0], MEMBERS[1], KEYED.members[2]))
    r = client("POST", "/join", SIGNED_JOIN, headers=admin_headers(SECRET, "POST", "/join", SIGNED_JOIN.encode()))
    assert r.status == 409 and r.text.startswith("members b have no node key") and one_line(r), r
    client.runtime.node.membership = Membership(("a",), (), (MEMBERS[0],))  # the leader's own key missing
    r = client("POST", "/join", SIGNED_JOIN, headers=admin_headers(SECRET, "POST", "/join", SIGNED_JOIN.encode()))
    assert r.status == 409 and r.text.startswith("members a have no node key"), r
    assert client.runtime.calls == []
    assert Client()("POST", "/join", JOIN).status == 200


# ---- status pages -------------------------------------------------------------------------------------------------


def test_status_is_one_line_of_json_from_the_status_copy(client):
    client("POST", "/db/k", "v")
    client("POST", "/db/k", "w")
    client.runtime.pending = [command(SET, "p", b"")] * 2
    r = client("GET", "/status")
    assert (r.status, r.headers["content-type"]) == (200, "application/json")
    assert r.body.endswith(b"}\n") and r.body.count(b"\n") == 1  # compact, not indented
    assert json.loads(r.body) == {
        "node_id": "a", "role": "leader", "term": 7, "leader": "a", "leader_http": "10.0.0.1:8080",
        "commit_index": 2, "applied_index": 2, "last_index": 4, "snapshot_index": 0, "keys": 1, "data_size": None,
        "disk_full": False, "uncommitted_bytes": 2 * len(command(SET, "p", b"")),
        "snapshot_catch_up_entries": 0, "snapshot_catch_up_bytes": 0, "removed": None, "feature_level": FEATURE_LEVEL,
        "cluster_feature_level": 1, "restoring": False, "election_timeout_ms": 1000, "members": [
            {"id": "a", "raft_address": "10.0.0.1:5555", "http_address": "10.0.0.1:8080", "role": "voter",
             "match_index": 4},
            {"id": "b", "raft_address": "10.0.0.2:5555", "http_address": "10.0.0.2:8080", "role": "voter",
             "match_index": 1},
            {"id": "c", "raft_address": "10.0.0.3:5555", "http_address": "10.0.0.3:8080", "role": "learner",
             "match_index": None}]}
    client.be_follower(None)
    client.runtime.node.removed = ("b", 3)
    client.runtime.disk_full = True
    client.runtime.node.catch_up = (12, 345)
    status = json.loads(client("GET", "/status").body)
    assert (status["role"], status["leader"], status["leader_http"], status["removed"], status["disk_full"],
            status["uncommitted_bytes"]) == ("follower", None, None, {"by": "b", "index": 3}, True, 0)
    assert (status["snapshot_catch_up_entries"], status["snapshot_catch_up_bytes"]) == (12, 345)
    assert [m["match_index"] for m in status["members"]] == [None, None, None]
    client.api.data_size = lambda: 123456  # the node gives DiskStorage.disk_bytes
    assert json.loads(client("GET", "/status").body)["data_size"] == 123456


def test_cluster_lists_the_members(client):
    client.runtime.pending = [command(SET, "p", b"")] * 2
    r = client("GET", "/cluster")
    assert r.body.count(b"\n") == 1
    assert [(m["id"], m["role"], m["match_index"]) for m in json.loads(r.body)] == [
        ("a", "voter", 2), ("b", "voter", -1), ("c", "learner", None)]


def test_metrics_are_prometheus_text_with_the_runtime_status_as_gauges(client):
    client("POST", "/db/k", "v")
    client("GET", "/db/k?consistency=stale")
    client.runtime.pending = [command(SET, "p", b"")] * 2
    client.runtime.node.catch_up = (12, 345)
    r = client("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=")
    samples = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#"))
    assert samples['raftdzmq_writes_total{outcome="committed"}'] == "1.0"
    assert samples['raftdzmq_reads_total{consistency="stale"}'] == "1.0"
    assert samples["raftdzmq_write_seconds_count"] == "1.0"
    assert (samples["raftdzmq_term"], samples["raftdzmq_is_leader"], samples["raftdzmq_last_index"],
            samples["raftdzmq_batches_saved"], samples["raftdzmq_elections_won"]) == ("7.0", "1.0", "3.0", "5.0", "1.0")
    assert "# TYPE raftdzmq_hub_lag_seconds histogram" in r.text
    assert (samples["raftdzmq_loop_lag_seconds_max"], samples["raftdzmq_loop_lags_over_10ms"]) == ("0.0025", "0.0")
    assert samples["raftdzmq_out_of_descriptors"] == "2.0"
    assert samples["raftdzmq_snapshot_reads_failed_total"] == "3.0"  # fourth review of snapfork
    assert (samples["raftdzmq_snapshots_installed_total"], samples["raftdzmq_snapshot_catch_up_appends_total"]) == (
        "7.0", "8.0")
    assert samples["raftdzmq_proposals_refused_uncommitted_total"] == "6.0"  # review of uncommitted, 4
    assert float(samples["raftdzmq_uncommitted_bytes"]) == 2 * len(command(SET, "p", b""))
    assert (samples["raftdzmq_snapshot_catch_up_entries"], samples["raftdzmq_snapshot_catch_up_bytes"]) == ("12.0",
                                                                                                            "345.0")
    assert samples["raftdzmq_restore_step_seconds_max"] == "0.004"
    assert samples["raftdzmq_snapshot_commit_seconds_max"] == "0.003"
    assert (samples["raftdzmq_snapshot_stepped_cpu_seconds"], samples["raftdzmq_snapshot_stepped_seconds"]) == ("1.5",
                                                                                                          "2.25")
    assert "# TYPE raftdzmq_snapshot_reads_failed_total counter" in r.text
    assert samples["raftdzmq_leases"] == "0.0"


def test_the_lease_gauge_has_no_sample_while_a_restart_restores_into_the_empty_state(client):
    """Review of fastrestore2, Q-b: while a node restores its snapshot into its empty store (a restart's), the
    raftdzmq_leases gauge said 0, as if every lease were gone; it has no sample then (Server.lease_count), and
    counts the store's leases otherwise, a leader's snapshot restored over a whole state included."""
    client.runtime.propose(command(SET, "k", b"v"), 1.0)
    node = client.runtime.node
    server = types.SimpleNamespace(runtime=client.runtime, store=types.SimpleNamespace(leases={1: "a", 2: "b"}))
    client.metrics.lease_count = lambda: Server.lease_count(server)  # type: ignore[arg-type]
    client.runtime.restoring_snapshot, applied, node.last_applied = True, node.last_applied, 0
    text = client("GET", "/metrics").text
    assert "# TYPE raftdzmq_leases gauge" in text and not re.search(r"^raftdzmq_leases ", text, re.M)
    node.last_applied = applied
    assert re.search(r"^raftdzmq_leases 2\.0$", client("GET", "/metrics").text, re.M)


# ---- what no route takes ------------------------------------------------------------------------------------------


def test_unknown_paths_and_methods_get_one_line(client):
    for method, target, status in (("GET", "/nowhere", 404), ("PATCH", "/db/k", 405), ("GET", "/cluster/x", 405),
                                   ("POST", "/status", 405)):
        r = client(method, target)
        assert r.status == status and one_line(r) and r.headers["content-type"] == "text/plain; charset=utf-8", r
    assert client.runtime.calls == []


def test_every_refused_write_says_not_applied_and_no_success_or_read_names_an_outcome(client):
    """Issue 15: bad input, a failed precondition, a redirect, no leader, a removed node, a refused signature, a
    route or method that does not exist: each answer to a write says `not-applied`; successes and reads say
    nothing."""
    refusals = [("POST", "/db/" + "k" * 4097, 400), ("POST", "/db/k?prev_exist=false", 412), ("DELETE", "/db/nope", 404),
                ("POST", "/join", 400), ("DELETE", "/cluster/zz", 404), ("POST", "/status", 405), ("PUT", "/nowhere", 404)]
    assert client("POST", "/db/k", "v").status == 200
    for method, target, status in refusals:
        r = client(method, target, "v" if target.startswith("/db") else "")
        assert (r.status, r.headers.get("x-raft-outcome")) == (status, "not-applied"), (method, target, r)
    r = client("PATCH", "/db/k", "v")  # no such method here: a write all the same
    assert (r.status, r.headers.get("x-raft-outcome")) == (405, "not-applied"), r
    for method, target in (("POST", "/db/k"), ("DELETE", "/db/k"), ("GET", "/db/k"), ("GET", "/db/nope"),
                           ("GET", "/cluster/transfer"), ("HEAD", "/cluster/transfer"), ("GET", "/nowhere")):
        assert "x-raft-outcome" not in client(method, target, "v").headers, (method, target)
    client.be_follower("b")
    assert client("POST", "/db/k", "v").headers["x-raft-outcome"] == "not-applied"  # 307
    client.be_follower(None)
    r = client("POST", "/db/k", "v")
    assert (r.status, r.headers["x-raft-outcome"]) == (503, "not-applied")
    client.runtime.node.removed = ("b", 17)
    r = client("DELETE", "/db/k")
    assert (r.status, r.headers["x-raft-outcome"]) == (410, "not-applied")
    signed = signed_client()
    r = signed("DELETE", "/cluster/b")
    assert (r.status, r.headers["x-raft-outcome"]) == (403, "not-applied")


# ---- health -----------------------------------------------------------------------------------------------------


def test_livez_answers_ok_while_the_runtime_drives(client):
    r = client("GET", "/livez")
    assert (r.status, r.text, r.headers["cache-control"]) == (200, "ok\n", "no-store")
    assert client("GET", "/livez?verbose").text == "[+]raft ok\nlivez ok\n"
    client.runtime.running = False
    r = client("GET", "/livez")
    assert (r.status, r.text) == (503, "the raft runtime has stopped\n") and one_line(r)
    assert client("GET", "/livez?verbose").text == "[-]raft failed: the raft runtime has stopped\nlivez check failed\n"
    assert client.runtime.calls == []  # no Raft round


def test_readyz_names_what_the_node_lacks(client):
    r = client("GET", "/readyz")
    assert (r.status, r.text) == (200, "ok\n")
    assert client("GET", "/readyz?verbose").text == ("[+]member ok\n[+]leader ok\n[+]disk ok\n[+]watches ok\n[+]snapshot ok\n"
                                                     "[+]applied ok\n[+]read ok\nreadyz ok\n")
    # The checks passed: a linearizable read round confirms the leader's commit index NOW (a follower's
    # leader_commit may come from an old queued frame: CI, test_health); one that fails is a 503.
    client.runtime.fail("read", Timeout("no answer"))
    r = client("GET", "/readyz")
    assert r.status == 503 and r.text.startswith("applying: a linearizable read did not complete"), r.text
    # Its budget: at least an election timeout (the fake's is 1 s, over READY_READ_SECONDS).
    assert [c[1] for c in client.runtime.calls if c[0] == "read"][-1] == 1.0
    node = client.runtime.node
    node.last_applied, node.commit_index = 10, 10 + MAX_APPLY_LAG_ENTRIES
    assert client("GET", "/readyz").status == 200  # within the lag
    # Review L1: a follower catching up has applied all of its own commit index; the leader's is far ahead.
    node.commit_index, node.leader_commit = 10, 2000
    assert (client("GET", "/readyz").status, client("GET", "/readyz").text) == (503, "applying: applied 10 of 2000\n")
    node.leader_commit = 0
    # Review L3: the core still says a leader is active (its clock is as of its last drive), but the runtime last
    # heard from the leader longer than an election timeout ago (a node just resumed from SIGSTOP): no leader.
    node.leader_contact_seconds_ago = 1.5
    assert client("GET", "/readyz").text == "no leader\n"
    node.leader_contact_seconds_ago = 0.0
    node.receiving_snapshot = True  # the leader's chunks are coming
    assert client("GET", "/readyz").text == "applying: receiving a snapshot from the leader\n"
    assert client("GET", "/status").json()["restoring"] is True
    node.restoring_snapshot = True  # received whole, or saved and restored a batch per drive
    assert client("GET", "/readyz").text == "applying: restoring a snapshot\n"
    node.receiving_snapshot = node.restoring_snapshot = False
    assert client("GET", "/status").json()["restoring"] is False
    node.commit_index = 2000
    assert (client("GET", "/readyz").status, client("GET", "/readyz").text) == (503, "applying: applied 10 of 2000\n")
    client.runtime.disk_full = True
    assert client("GET", "/readyz").text == "disk full\n"
    node.leader_active = False
    assert client("GET", "/readyz").text == "no leader\n"
    assert client("GET", "/readyz?verbose").text == (
        "[+]member ok\n[-]leader failed: no leader\n[-]disk failed: disk full\n[+]watches ok\n[+]snapshot ok\n"
        "[-]applied failed: applying: applied 10 of 2000\nreadyz check failed\n")
    node.removed = ("b", 17)
    r = client("GET", "/readyz")
    assert (r.status, r.text) == (503, "not a member\n") and one_line(r)
    node.removed, node.node_id = None, "z"  # still joining: not in the configuration
    assert client("GET", "/readyz").text == "not a member\n"
    # A read round only once every other check passed (the two 200s and the failed read above): four.
    assert [c[0] for c in client.runtime.calls] == ["read"] * 4


def test_every_route_is_tested_here():
    """A route added to api.ROUTES without a test here fails this test: add the test, then the route below."""
    assert {(method, path) for method, path, _, _ in api_module.ROUTES} == {
        ("POST", "/db/<key:path>"), ("PUT", "/db/<key:path>"), ("DELETE", "/db/<key:path>"),
        ("GET", "/db/<key:path>"), ("GET", "/db/"), ("GET", "/db"), ("POST", "/join"), ("GET", "/status"),
        ("GET", "/metrics"), ("GET", "/cluster"), ("DELETE", "/cluster/<node_id>"), ("POST", "/cluster/transfer"),
        ("GET", "/cluster/keys"), ("GET", "/livez"), ("GET", "/readyz"), ("DELETE", "/db/"), ("DELETE", "/db"),
        ("POST", "/txn"), ("POST", "/lease"), ("GET", "/lease"), ("POST", "/lease/<lease_id>/keepalive"),
        ("POST", "/lease/keepalive"),
        ("GET", "/lease/<lease_id>"), ("DELETE", "/lease/<lease_id>"),
        ("GET", "/watch"), ("GET", "/snapshot")}  # GET /watch: tests/test_watch.py


# ---- backups ------------------------------------------------------------------------------------------------------


def test_a_backup_follows_a_linearizable_read_and_names_its_index_and_digest(client):
    """GET /snapshot: the body is the backup's file, with its index and SHA-256; a read round comes first (every
    write acknowledged before the request is in the backup), on any node, followers too."""
    client.be_follower()
    client.runtime.node.last_applied = 41
    r = client("GET", "/snapshot")
    assert r.status == 200 and r.body == b"RDZMQSNP a snapshot file of the state at 41", r
    assert r.headers["x-raft-snapshot-index"] == "41"
    assert r.headers["x-raft-snapshot-sha256"] == hashlib.sha256(r.body).hexdigest()
    assert r.headers["content-length"] == str(len(r.body))
    assert [c[0] for c in client.runtime.calls] == ["read", "backup"]
    assert client.runtime.calls[1][1:] == (".", 600.0)  # the folder and the bound the node gives


@pytest.mark.parametrize("error, status, text", [
    (BackupBusy("1 backup(s) are being taken on this node, its most at once; retry later"), 503,
     "1 backup(s) are being taken on this node, its most at once; retry later\n"),
    (BackupFailed("the backup's child failed: OSError: disk"), 503, "the backup's child failed: OSError: disk\n"),
    (Timeout("the backup was not written within 600s (its child is killed)"), 503,
     "the backup was not written within 600s (its child is killed)\n"),
])
def test_each_failure_of_a_backup_has_its_answer(client, error, status, text):
    client.runtime.fail("backup", error)
    r = client("GET", "/snapshot")
    assert (r.status, r.text) == (status, text) and one_line(r) and "x-raft-outcome" not in r.headers


def test_a_backup_without_a_confirmed_read_is_not_taken(client):
    """No leader: 503 after the read's bound, and no backup; a removed node: 410."""
    client.be_follower(None)
    client.runtime.fail("read", *[NotLeader(None)] * 1000)
    r = client("GET", "/snapshot")
    assert r.status == 503 and one_line(r) and not any(c[0] == "backup" for c in client.runtime.calls)
    client.runtime.node.removed = ("a", 9)
    assert client("GET", "/snapshot").status == 410


def test_with_a_secret_a_backup_must_be_signed_for_this_node_and_once():
    """Review of ops, finding 5: a signed GET /snapshot seen once downloaded the whole state again, on any node.
    Now it is signed with a fresh nonce for one node, and claimed there: a replay is refused."""
    client = signed_client()
    signed = node_request_headers(SECRET, "a", "GET", "/snapshot")
    unsigned = {k: v for k, v in signed.items() if k not in (SIGNATURE_HEADER, TIMESTAMP_HEADER)}
    r = client("GET", "/snapshot", headers=unsigned)
    assert r.status == 403 and r.text.startswith("backup refused: ") and one_line(r)
    r = client("GET", "/snapshot", headers=admin_headers(SECRET, "GET", "/snapshot"))  # no nonce, no node
    assert r.status == 400 and NONCE_HEADER in r.text
    r = client("GET", "/snapshot", headers=node_request_headers(SECRET, "b", "GET", "/snapshot"))
    assert r.status == 421 and "this is node a, not b" in r.text
    assert client.runtime.calls == []
    assert client("GET", "/snapshot", headers=signed).status == 200
    r = client("GET", "/snapshot", headers=signed)
    assert r.status == 403 and "already used" in r.text
    assert client("GET", "/snapshot", headers=node_request_headers(SECRET, "a", "GET", "/snapshot")).status == 200


def test_the_access_log_names_an_undelivered_answer_and_escapes_unambiguously(caplog):
    """Review Q3/Q4: gevent negates the status of an answer it could not deliver (logged `-307` before); a
    literal backslash is doubled, so `\\xc3` as sent and the byte 0xC3 log differently."""
    from raftlib.server.edge import AccessLogHandler

    handler = AccessLogHandler.__new__(AccessLogHandler)  # the fields log_request reads, without a socket
    handler.command, handler.path, handler.client_address = "POST", "/db/a\\xc3\xc3?prev_value=s&x=1", ("1.2.3.4", 5)
    handler.time_start, handler.time_finish, handler.code = 10.0, 10.0125, -307
    handler.response_headers = [(b"Content-Length", b"12")]
    with caplog.at_level("INFO", logger="raftdzmq.access"):
        handler.log_request()
    assert caplog.messages == ["POST /db/a\\\\xc3\\xc3?prev_value=<redacted>&x=1 307-undelivered 12 12.5ms 1.2.3.4:5"]


# ---- issue 14: indices, ?prev_index, prefix deletes, transactions, the feature level ---------------------------


@pytest.fixture
def upgraded(client) -> Client:
    """A client whose cluster's feature level was raised (index 1)."""
    client.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 1.0)
    assert client.store.feature_level == FEATURE_LEVEL
    return client


def test_reads_answer_the_indices_from_level_2_on(client):
    client("POST", "/db/k", "v")
    r = client("GET", "/db/k")
    assert r.status == 200 and "x-raft-create-index" not in r.headers and "x-raft-modify-index" not in r.headers
    client.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 1.0)  # index 2
    client("POST", "/db/k", "w")  # index 3
    r = client("GET", "/db/k")
    assert (r.body, r.headers["x-raft-create-index"], r.headers["x-raft-modify-index"]) == (b"w", "2", "3")


def test_prev_index_is_compare_and_set_on_the_modify_index(upgraded):
    client = upgraded
    assert client("POST", "/db/k?prev_index=0", "1").status == 200  # 0: only when missing (index 2)
    r = client("POST", "/db/k?prev_index=0", "x")
    assert (r.status, r.text, r.headers["x-raft-index"]) == (412, "precondition failed\n", "3")
    assert client("POST", "/db/k?prev_index=2", "2").status == 200 and client.store.get("k") == b"2"  # index 4
    assert client("DELETE", "/db/k?prev_index=2").status == 412 and client.store.get("k") == b"2"
    assert client("DELETE", "/db/k?prev_index=4").status == 200 and client.store.get("k") is None
    # Missing: 412 unless prev_index is 0 (issue 14's "likewise"; review of coord1, Q3), then 404.
    r = client("DELETE", "/db/k?prev_index=4")
    assert (r.status, r.headers["x-raft-modify-index"]) == (412, "0")
    assert client("DELETE", "/db/k?prev_index=0").status == 404
    for bad in ("prev_index=x", "prev_index=-1", "prev_index=1&prev_value=a", "prev_index=1&prev_exist=false",
                "prev_index=%2B4", "prev_index=1_4", "prev_index=-0", "prev_index=%204", "prev_index=",
                "prev_index=%D9%A4"):  # +4, 1_4, -0, " 4", "", an Arabic-Indic 4: int() takes most of them
        r = client("POST", f"/db/k?{bad}", "v")
        assert r.status == 400 and "prev_index" in r.text, bad
    assert client("DELETE", "/db/k?prev_index=x").status == 400
    assert client.store.get("k") is None


def test_a_412_carries_the_keys_modify_index(upgraded):
    """Review of coord1, Q3: a compare-and-set loop needs no GET after a 412."""
    client = upgraded
    client("POST", "/db/k", "1")  # index 2
    client("POST", "/db/k", "2")  # index 3
    for method, target in (("POST", "/db/k?prev_index=2"), ("DELETE", "/db/k?prev_index=2"),
                           ("POST", "/db/k?prev_value=1"), ("POST", "/db/k?prev_exist=false")):
        r = client(method, target, "x")
        assert (r.status, r.headers["x-raft-modify-index"]) == (412, "3"), target
    r = client("POST", "/db/new?prev_index=3", "x")
    assert (r.status, r.headers["x-raft-modify-index"]) == (412, "0")


def test_delete_prefix_answers_what_it_deleted(upgraded):
    client = upgraded
    for key in ("p/1", "p/2", "p", "q"):
        client("POST", f"/db/{key}", "v")
    r = client("DELETE", "/db/?prefix=p/")
    assert (r.status, r.json()) == (200, {"deleted": 2, "index": 6}) and sorted(client.store.data) == ["p", "q"]
    assert client("DELETE", "/db?prefix=zz").json() == {"deleted": 0, "index": 7}
    for target in ("/db/", "/db/?prefix=", "/db/?prefix=%FF"):
        r = client("DELETE", target)
        assert r.status == 400 and "prefix" in r.text, target
    assert sorted(client.store.data) == ["p", "q"]


def test_a_txn_answers_its_branch_and_results(upgraded):
    client = upgraded
    client("POST", "/db/a", "1")  # index 2
    client("POST", "/db/bin", b"\xff\x00")  # index 3
    body = {"compare": [{"key": "a", "target": "value", "op": "==", "value": "1"},
                        {"key": "a", "target": "modify_index", "op": "==", "value": 2},
                        {"key": "nope", "target": "exists", "op": "==", "value": False}],
            "success": [{"op": "put", "key": "a", "value_base64": "AP8="}, {"op": "get", "prefix": "b"},
                        {"op": "delete", "key": "bin"}, {"op": "get", "key": "a"}],
            "failure": [{"op": "put", "key": "failed", "value": "x"}]}
    r = client("POST", "/txn", json.dumps(body))
    assert r.status == 200 and r.headers["x-raft-index"] == "4" and r.headers["content-type"] == "application/json"
    assert r.json() == {"succeeded": True, "index": 4, "results": [
        {"op": "put", "key": "a"},
        {"op": "get", "kvs": [{"key": "bin", "value_base64": "/wA=", "create_index": 3, "modify_index": 3}]},
        {"op": "delete", "deleted": 1},
        {"op": "get", "kvs": [{"key": "a", "value_base64": "AP8=", "create_index": 2, "modify_index": 4}]}]}
    r = client("POST", "/txn", json.dumps(body))  # a's value is no longer "1"
    assert r.json() == {"succeeded": False, "index": 5, "results": [{"op": "put", "key": "failed"}]}
    assert client.store.get("failed") == b"x" and client.store.get("a") == b"\x00\xff"
    assert client("POST", "/txn", "{}").json() == {"succeeded": True, "index": 6, "results": []}


def test_a_txn_answer_is_the_json_of_its_results():
    """routes_txn.txn_answer_json writes a put's result as text: the answer must be what json_answer of the results'
    dicts gives, byte for byte (escapes, non-ASCII keys, every kind of result)."""
    result = TxnResult(True, [("put", "k"), ("put", 'k\u00e9"\\/\n\U0001f600'), ("delete", 2, True), ("delete", 0, False),
                              ("get", [("a", b"\xff\x00", 1, 2), ("b\u00e9", "\u00e9".encode(), 3, 4)], False),
                              ("get", [], True), ("put", "z")])
    for r in (result, TxnResult(False, []), TxnResult(False, [("put", "x")])):
        expected = {"succeeded": r.succeeded, "index": 41, "results": [routes_txn._txn_answer(x) for x in r.results]}
        answer = routes_txn.txn_answer_json(r, 41)
        assert (answer.encode() if isinstance(answer, str) else answer) == (json.dumps(expected) + "\n").encode()


def test_a_txn_answer_counts_its_gets_as_the_json_they_become():
    """Review edge, L1: 4 MiB of control bytes were a 24 MB answer. The key-values go in while their JSON fits
    MAX_TXN_ANSWER_BYTES; past it that get and every later one that found anything say "more" (no key-values), as
    past the store's own bounds; the answer is built in slices, `turn` passed between them."""
    value = b"\x01" * 1_000_000  # 6 MB as JSON
    kvs = [(f"t{i}", value, i, i) for i in range(4)]
    result = TxnResult(True, [("get", kvs[:2], False), ("put", "p"), ("get", kvs[2:], False), ("get", [], False)])
    turns = []
    answer = json.loads(routes_txn.txn_answer_json(result, 7, lambda pieces: turns.append(len(pieces)) or True))
    first, put, later, empty = answer["results"]
    assert [kv["key"] for kv in first["kvs"]] == ["t0"] and first["kvs"][0]["value"] == value.decode()
    assert first["more"] is True and later == {"op": "get", "kvs": [], "more": True}
    assert put == {"op": "put", "key": "p"} and empty == {"op": "get", "kvs": []}
    # Passed every ANSWER_SLICE_BYTES of t0 and t1 (whose JSON is then past the bound); t2 cut by its raw size alone.
    assert len(turns) >= 2_000_000 // routes_txn.ANSWER_SLICE_BYTES - 1 and turns == sorted(turns)
    # Made in slices, the same bytes as json.dumps: escapes, non-ASCII, a surrogate pair's two halves, base64.
    mixed = TxnResult(True, [("get", [("m\u00e9", ('\u00e9\U0001f600\x01a"\\' * 60000).encode(), 5, 6),
                                      ("b", b"\xff" * 300000, 7, 8)], False)])
    expected = {"succeeded": True, "index": 9, "results": [routes_txn._txn_answer(x) for x in mixed.results]}
    assert routes_txn.txn_answer_json(mixed, 9, lambda pieces: True) == (json.dumps(expected) + "\n").encode()
    # A client cut while its answer waited for its turn: no more key-values are made for it.
    cut = json.loads(routes_txn.txn_answer_json(result, 7, lambda pieces: False))
    assert cut["results"][0] == {"op": "get", "kvs": [], "more": True}
    # Under the bound, as the store gave it: a value that escapes a little is whole.
    small = TxnResult(True, [("get", [("a", b'"quoted"\n' * 1000, 1, 1)], False)])
    assert json.loads(routes_txn.txn_answer_json(small, 8))["results"][0]["kvs"][0]["value"] == '"quoted"\n' * 1000


@pytest.mark.parametrize("body, problem", [
    ("not json", "not JSON"), ("[]", "JSON object"), ('{"compares": []}', "unknown field 'compares'"),
    ('{"success": {}}', "success must be a list"),
    ('{"compare": [{"key": "k", "target": "size", "op": "==", "value": 1}]}', "unknown target 'size'"),
    ('{"compare": [{"key": "k", "target": "value", "op": "=~", "value": "x"}]}', "unknown compare op"),
    ('{"compare": [{"target": "exists", "op": "==", "value": true}]}', "missing key"),
    ('{"compare": [{"key": "k", "target": "modify_index", "op": "<", "value": "3"}]}', "integer >= 0"),
    ('{"compare": [{"key": "k", "target": "exists", "op": "==", "value": 1}]}', "true or false"),
    ('{"success": [{"op": "patch", "key": "k"}]}', "unknown op 'patch'"),
    ('{"success": [{"op": "put", "value": "v"}]}', "missing key"),
    ('{"success": [{"op": "put", "key": "k"}]}', "needs a value"),
    ('{"success": [{"op": "put", "key": "k", "value": "a", "value_base64": "YQ=="}]}', "both given"),
    ('{"failure": [{"op": "put", "key": "k", "value_base64": "not base64!"}]}', "not base64"),
    ('{"success": [{"op": "put", "key": "k", "value": "v", "lease": -7}]}', "a lease is a lease id"),
    ('{"compare": [{"key": "k", "target": "lease", "op": "==", "value": "x"}]}', "a lease is a lease id"),
    ('{"success": [{"op": "delete", "key": "k", "prefix": "k"}]}', "one of them"),
    ('{"success": [{"op": "get"}]}', "one of them"),
    ('{"success": [{"op": "get", "key": ""}]}', "1 to 4096 bytes"),
    ('{"success": [{"op": "get", "key": "k", "limit": 3}]}', "unknown field 'limit'"),
    (json.dumps({"success": [{"op": "get", "key": "k"}] * (MAX_TXN_OPS + 1)}), f"at most {MAX_TXN_OPS}"),
    # Review of coord1, Q1 and Q2: a lone surrogate (500 before), nesting past the recursion limit (500 before),
    # a lease that is not an int, the same key put twice in a branch (as etcd).
    ('{"success": [{"op": "put", "key": "\\ud800", "value": "x"}]}', "success[0]: key is not valid Unicode"),
    ('{"success": [{"op": "put", "key": "k", "value": "\\udfff"}]}', "success[0]: value is not valid Unicode"),
    ('{"compare": [{"key": "k", "target": "value", "op": "==", "value": "\\ud800"}]}', "not valid Unicode"),
    ('{"success": [{"op": "get", "prefix": "\\ud800"}]}', "prefix is not valid Unicode"),
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"success": [{"op": "put", "key": "k", "value": "v", "lease": false}]}', "a lease is a lease id"),
    ('{"success": [{"op": "put", "key": "k", "value": "v", "lease": 0.0}]}', "a lease is a lease id"),
    ('{"success": [{"op": "put", "key": "k", "value": "v", "lease": "0x2a"}]}', "a lease is a lease id"),
    ('{"success": [{"op": "put", "key": "k", "value": "1"}, {"op": "put", "key": "k", "value": "2"}]}',
     "success[1]: key 'k' is put twice"),
    # The plain put's fast path (routes_txn._txn_item) leaves every problem to the general one.
    (json.dumps({"success": [{"op": "put", "key": "k" * 4097, "value": "v"}]}), "1 to 4096 bytes"),
    (json.dumps({"success": [{"op": "put", "key": "a", "value": "v"}, {"op": "put", "key": "b", "value": "v"},
                             {"op": "put", "key": "c", "value": 5}]}), "success[2]: needs a value"),
    (json.dumps({"failure": [{"op": "put", "key": "a", "value": "v"}, ["put", "b", "v"]]}),
     "failure[1]: want a JSON object"),
    ('{"success": [{"op": "put", "key": "k", "value": 5}]}', "needs a value"),
    ('{"success": [{"op": "put", "key": 5, "value": "v"}]}', "1 to 4096 bytes"),
])
def test_a_malformed_txn_is_a_400_naming_the_problem(upgraded, body, problem):
    r = upgraded("POST", "/txn", body)
    assert r.status == 400 and r.text.startswith("bad transaction: ") and problem in r.text, r.text
    assert r.text.count("\n") == 1
    assert not [c for c in upgraded.runtime.calls if c[0] == "propose" and c[1] != command(
        SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL)]  # nothing proposed


def test_the_new_api_is_409_until_the_cluster_is_upgraded(client):
    client.api.upgrade_reason = lambda: "the cluster is not upgraded yet: members c run an older raftdzmq"
    client("POST", "/db/k", "v")
    for method, target, body in (("POST", "/db/k?prev_index=1", "w"), ("DELETE", "/db/k?prev_index=1", ""),
                                 ("DELETE", "/db/?prefix=k", ""), ("POST", "/txn", "{}")):
        r = client(method, target, body)
        assert (r.status, r.text) == (409, "the cluster is not upgraded yet: members c run an older raftdzmq\n")
    assert client.store.get("k") == b"v" and client.runtime.node.last_applied == 1  # nothing proposed
    # A follower answers them itself (review of coord1, S2): its leader may run an older release, which would
    # take ?prev_index=N as an unconditional write. At level 2 it sends them to the leader, as every write.
    client.be_follower("b")
    for method, target, body in (("POST", "/db/k?prev_index=1", "w"), ("DELETE", "/db/k?prev_index=1", ""),
                                 ("DELETE", "/db/?prefix=k", ""), ("POST", "/txn", "{}")):
        assert client(method, target, body).status == 409, target
    client.runtime.node.role = Role.LEADER
    client.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 1.0)
    client.be_follower("b")
    for method, target, body in (("POST", "/db/k?prev_index=1", "w"), ("DELETE", "/db/k?prev_index=1", ""),
                                 ("DELETE", "/db/?prefix=k", ""), ("POST", "/txn", "{}")):
        assert client(method, target, body).status == 307, target


def test_a_join_without_the_feature_level_is_refused_once_the_cluster_has_it(client):
    join = {"node_id": "d", "raft_address": "10.0.0.4:5555", "http_address": "10.0.0.4:8080"}
    assert client("POST", "/join", json.dumps(join)).status == 200  # level 1: an older node may join
    client.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 1.0)
    for level in ({}, {"feature_level": 1}, {"feature_level": "2"}):
        r = client("POST", "/join", json.dumps({**join, "node_id": "e", **level}))
        assert r.status == 409 and "upgrade it, then join" in r.text, level
    r = client("POST", "/join", json.dumps({**join, "node_id": "e", "feature_level": FEATURE_LEVEL}))
    assert r.status == 200


# ---- issue 14 part 2: leases ------------------------------------------------------------------------------------


@pytest.fixture
def leased(monkeypatch) -> tuple[Client, LeaseKeeper, list[float]]:
    """A client of a level-2 cluster whose leader keeps leases by a clock the test moves (`now[0]`)."""
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # the lease routes' clock (routes_leases)
    keeper = LeaseKeeper(max_batch=8)
    c = Client(write_timeout_seconds=2.0, read_timeout_seconds=0.2, min_ttl_seconds=2,
               lease_keeper=lambda: keeper if c.runtime.node.role is Role.LEADER else None)
    keeper.become_leader(1, [], now[0])
    c.store.on_lease = lambda i, ttl: keeper.removed(i) if ttl is None else keeper.granted(i, ttl, now[0])
    c.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 1.0)
    return c, keeper, now


def test_lease_routes_grant_keep_alive_list_and_revoke(leased):
    client, keeper, now = leased
    r = client("POST", "/lease?ttl=10")
    assert (r.status, json.loads(r.body), r.headers["x-raft-index"]) == (200, {"id": "2", "ttl": 10}, "2")
    assert json.loads(client("POST", "/lease?ttl=1").body)["ttl"] == 2  # raised to the minimum
    assert client("POST", "/db/a?lease=2", "x").status == 200 and client.store.lease_of == {"a": 2}
    r = client("POST", "/db/t?ttl=5", "y")
    assert r.headers["x-raft-lease"] == r.headers["x-raft-index"] == "5" and client.store.leases[5].keys == {"t"}
    assert r.headers["x-raft-lease-ttl"] == "5"
    r = client("POST", "/db/t1?ttl=1", "y")  # review of lease, R5: the TTL raised to the minimum says so
    assert (r.headers["x-raft-lease"], r.headers["x-raft-lease-ttl"]) == ("6", "2")
    assert client("DELETE", "/lease/6").status == 200
    assert client("POST", "/db/z?lease=2", "x").status == 200 and client.store.lease_of["z"] == 2
    r = client("POST", "/db/z?lease=0", "x")  # etcd's "no lease": the put detaches the key
    assert r.status == 200 and "z" not in client.store.lease_of and client.store.leases[2].keys == {"a"}
    assert client("DELETE", "/db/z").status == 200
    now[0] += 4
    calls = len(client.runtime.calls)
    r = client("POST", "/lease/2/keepalive")
    assert (r.status, json.loads(r.body)) == (200, {"id": "2", "ttl": 10}) and keeper.deadlines[2] == 114.0
    assert client.runtime.calls[calls][0] == "read"  # leadership confirmed by a read round, nothing proposed
    assert len(client.runtime.calls) == calls + 1 and client.counted("lease_keepalives") == {"kept": 1}
    assert json.loads(client("GET", "/lease/2").body) == {"id": "2", "ttl": 10, "remaining": 10.0, "keys": ["a"],
                                                          "key_count": 1}
    assert json.loads(client("GET", "/lease?limit=2").body) == {"leases": [
        {"id": "2", "ttl": 10, "remaining": 10.0}, {"id": "3", "ttl": 2, "remaining": 0.0}], "next": "3"}
    assert json.loads(client("GET", "/lease?after=3").body)["leases"] == [{"id": "5", "ttl": 5, "remaining": 1.0}]

    class NoScan(dict):  # review of lease, R6: a page bisects the sorted ids, never walks every lease
        def items(self):
            raise AssertionError("GET /lease walked every lease")

        __iter__ = keys = values = items

    leases, client.store.leases = client.store.leases, NoScan(client.store.leases)
    assert json.loads(client("GET", "/lease?after=2").body)["leases"] == [
        {"id": "3", "ttl": 2, "remaining": 0.0}, {"id": "5", "ttl": 5, "remaining": 1.0}]
    client.store.leases = leases
    assert keeper.due(now[0]) == [3]  # being expired: keepalive and GET answer 404 from then on
    for r in (client("POST", "/lease/3/keepalive"), client("GET", "/lease/3")):
        assert (r.status, r.text) == (404, "lease 3 is expiring: its deadline passed and its expiry is proposed; "
                                           "grant a new one\n")
    assert client("POST", "/lease/3/keepalive").headers["x-raft-outcome"] == "not-applied"
    assert client.counted("lease_keepalives") == {"kept": 1, "not_found": 2}
    r = client("DELETE", "/lease/2")
    assert (r.status, json.loads(r.body)) == (200, {"id": "2", "deleted": 1, "index": 11}) and "a" not in client.store.data
    assert client("DELETE", "/lease/2").status == 404
    r = client("POST", "/lease/2/keepalive")
    assert (r.status, r.text) == (404, "lease 2 not found (expired or revoked)\n")


def test_a_batched_keepalive_keeps_many_leases_alive_behind_one_read_round(leased):
    """Review of lease, R3: POST /lease/keepalive with a list of ids: one read round for all, each id answered as
    its own keepalive would be."""
    client, keeper, now = leased
    for ttl in (10, 20, 5):
        assert client("POST", f"/lease?ttl={ttl}").status == 200  # ids 2, 3, 4
    now[0] += 5
    assert keeper.due(now[0]) == [4]  # being expired
    calls = len(client.runtime.calls)
    r = client("POST", "/lease/keepalive", json.dumps(["2", 3, "4", "99", "2"]))
    assert (r.status, json.loads(r.body)) == (200, {"leases": [
        {"id": "2", "ttl": 10}, {"id": "3", "ttl": 20}, {"id": "4", "error": "expiring"},
        {"id": "99", "error": "not found"}, {"id": "2", "ttl": 10}]})
    assert [c[0] for c in client.runtime.calls[calls:]] == ["read"]  # one round, nothing proposed
    assert (keeper.deadlines[2], keeper.deadlines[3]) == (115.0, 125.0)
    assert client.counted("lease_keepalives") == {"kept": 3, "not_found": 2}
    for body, says in (("", "not JSON"), ("[", "not JSON"), ("{}", "want a JSON list"), ("[]", "want a JSON list"),
                       (json.dumps(list(range(1, 1_002))), "1 to 1000 lease ids"),
                       (json.dumps([str(10**18 + i) for i in range(1_500)]), "the body is over 32768 bytes"),
                       ('["2", 0]', "item 1: a lease id"), ('[true]', "item 0"), ('["0x2"]', "item 0"),
                       ('[2.0]', "item 0")):
        r = client("POST", "/lease/keepalive", body)
        assert (r.status, r.text.count("\n")) == (400, 1) and says in r.text, (body, r.text)
        assert r.headers["x-raft-outcome"] == "not-applied"
    client.runtime.fail("read", Timeout("no answer"))
    r = client("POST", "/lease/keepalive", '["2"]')
    assert r.status == 503 and r.headers["x-raft-outcome"] == "not-applied" and "not extended" in r.text
    client.runtime.node.role, client.runtime.node.leader_id = Role.FOLLOWER, "b"
    r = client("POST", "/lease/keepalive", '["2"]')
    assert r.status == 307 and r.headers["location"] == "http://10.0.0.2:8080/lease/keepalive"


def test_a_keepalive_extends_only_if_the_keeper_leads_in_the_term_its_read_round_confirmed(leased, monkeypatch):
    """Re-review of lease, finding 3: leadership lost and won back between the read round and the keepalive; an
    expiry entry of the older term could still be ahead of the new term's no-op. Both routes refuse (503, not
    extended) unless the keeper's term is the one the round confirmed."""
    client, keeper, now = leased
    assert client("POST", "/lease?ttl=10").status == 200  # id 2
    now[0] += 5
    real_read = client.runtime.read

    def read_then_new_term(timeout_seconds: float, lease: bool = False) -> tuple[int, int]:
        answer = real_read(timeout_seconds, lease)  # confirmed in term 1
        keeper.become_leader(3, [(2, 10)], now[0] - 1)  # lost and won again meanwhile
        return answer

    monkeypatch.setattr(client.runtime, "read", read_then_new_term)
    for target, body in (("/lease/2/keepalive", ""), ("/lease/keepalive", '["2"]')):
        keeper.become_leader(1, [(2, 10)], now[0] - 5)
        r = client("POST", target, body)
        assert (r.status, r.headers["x-raft-outcome"]) == (503, "not-applied"), (target, r.status, r.text)
        assert "term 1, now 3" in r.text and "not extended" in r.text and r.text.count("\n") == 1
        assert keeper.deadlines[2] == now[0] - 1 + 10  # as term 3's election left it: not now + 10
    monkeypatch.setattr(client.runtime, "read", real_read)
    keeper.become_leader(1, [(2, 10)], now[0] - 5)
    client.runtime.node.current_term = 1
    assert client("POST", "/lease/2/keepalive").status == 200 and keeper.deadlines[2] == now[0] + 10


def test_lease_routes_are_the_leaders_and_check_their_input(leased):
    client, _, _ = leased
    for method, target, status, says in (
            ("POST", "/lease?ttl=x", 400, "ttl must be whole seconds"),
            ("POST", "/lease?ttl=31536001", 400, "ttl must be whole seconds"),
            ("GET", "/lease/-1", 400, "a lease id is a positive decimal number"),
            ("DELETE", "/lease/1e3", 400, "a lease id"),
            ("GET", "/lease?limit=x", 400, "limit must be an integer"),
            ("POST", "/db/k?lease=9", 404, "lease 9 not found"),
            ("POST", "/db/k?lease=00", 400, "a lease id"),
            ("POST", "/db/k?lease=", 400, "a lease id"),
            ("POST", "/db/k?ttl=3&prev_exist=false", 400, "lease and ttl go alone")):
        r = client(method, target, "v")
        assert (r.status, r.text.count("\n")) == (status, 1) and says in r.text, (target, r.text)
    client.runtime.node.role, client.runtime.node.leader_id = Role.FOLLOWER, "b"
    for method, target in (("POST", "/lease?ttl=5"), ("POST", "/lease/2/keepalive"), ("GET", "/lease/2"),
                           ("GET", "/lease"), ("DELETE", "/lease/2"), ("POST", "/db/k?ttl=5")):
        r = client(method, target)
        assert r.status == 307 and r.headers["location"] == f"http://10.0.0.2:8080{target}", target


def test_lease_routes_answer_409_below_level_2():
    client = Client(lease_keeper=lambda: LeaseKeeper(1))
    for method, target in (("POST", "/lease?ttl=5"), ("POST", "/lease/2/keepalive"), ("DELETE", "/lease/2"),
                           ("POST", "/db/k?ttl=5"), ("POST", "/db/k?lease=2")):
        assert client(method, target).status == 409, target
    assert client("POST", "/lease/keepalive", '["2"]').status == 409


# ---- review of coord1: the join against the raise, the membership lock, the raiser --------------------------------


def test_a_join_waits_for_a_raise_in_this_leaders_log_before_it_reads_the_level(client):
    """Review of coord1, S1: the raiser's SET_FEATURE_LEVEL timed out (or a new leader has its predecessor's raise
    in its log, not applied until an entry of its own term commits): the applied level is 1, the log's 2. An old
    node's join (no feature_level) must wait for it and be refused."""
    client.runtime.pending = [command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL)]
    r = client("POST", "/join", JOIN)
    assert r.status == 409 and "upgrade it, then join" in r.text, r
    assert client.store.feature_level == FEATURE_LEVEL
    assert not [c for c in client.runtime.calls if c[0] == "change_membership"]


def test_a_join_that_waits_out_another_change_checks_the_level_again(client, monkeypatch):
    """Review of coord1, S1: the join's retries (ProposalDropped: a change in flight, or a new leader's entry not
    yet committed) must each see the level as it is then."""
    calls = []

    def change_membership(change, timeout_seconds):
        calls.append(change)
        # While this join waits, a raise applies (a new leader's predecessor's, committed with its no-op).
        client.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 1.0)
        raise ProposalDropped("a change is in flight")

    monkeypatch.setattr(client.runtime, "change_membership", change_membership)
    r = client("POST", "/join", JOIN)
    assert r.status == 409 and "upgrade it, then join" in r.text, r
    assert len(calls) == 1


def test_a_join_waits_for_the_membership_lock_the_raiser_holds():
    """Review of coord1, Q4: without the lock in join, an old node could join between the raiser's question and
    its raise (no test failed when it was removed)."""
    client = Client(write_timeout_seconds=0.2)
    assert client.api.membership_lock.acquire(blocking=False)  # the raiser is asking the members
    r = client("POST", "/join", JOIN)
    assert (r.status, r.text) == (503, "join not possible now: the cluster's feature level is being raised; retry\n")
    assert client.runtime.calls == []
    client.api.membership_lock.release()
    assert client("POST", "/join", JOIN).status == 200


class StatusConnection:
    """GET /status of a member, for the FeatureLevelRaiser: `levels` maps an http address to the feature_level
    its status says (None: no such field, an older release), or to an exception (no answer)."""

    levels: dict[str, object] = {}

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.address = f"{host}:{port}"

    def request(self, method, target):
        assert (method, target) == ("GET", "/status")
        level = self.levels[self.address]
        if isinstance(level, Exception):
            raise level

    def getresponse(self):
        level = self.levels[self.address]
        body = json.dumps({} if level is None else {"feature_level": level}).encode()
        return types.SimpleNamespace(status=200, read=lambda n: body)

    def close(self):
        pass


def raiser_of(client: Client, levels: dict[str, object], monkeypatch):
    from raftlib.server.node import FeatureLevelRaiser
    monkeypatch.setattr(StatusConnection, "levels", levels)
    return FeatureLevelRaiser(client.runtime, client.store, FEATURE_LEVEL, client.api.membership_lock, 0.2,
                              connect=StatusConnection)


def test_the_raiser_raises_only_once_every_member_learners_too_has_the_level(client, monkeypatch):
    """Review of coord1, Q4: the raiser had no unit test (the learner that lags, no answer, the timeout)."""
    levels = {"10.0.0.2:8080": FEATURE_LEVEL, "10.0.0.3:8080": None}  # b (voter) upgraded; c (learner) an older release
    raiser = raiser_of(client, levels, monkeypatch)
    assert raiser.raise_once() is False and client.store.feature_level == 1 and client.runtime.calls == []
    assert raiser.reason() == "the cluster is not upgraded yet: members c run an older raftdzmq"
    levels["10.0.0.3:8080"] = OSError("connection refused")
    assert raiser.raise_once() is False and client.runtime.calls == []
    assert raiser.reason() == "the cluster is not upgraded yet: members c did not answer which raftdzmq they run"
    levels["10.0.0.3:8080"] = FEATURE_LEVEL
    # The proposal times out: the raise may still be in the log (a join waits for it: S1); the lock is free again.
    client.runtime.fail("propose", Timeout("no answer in 0.2s"))
    with pytest.raises(Timeout):
        raiser.raise_once()
    assert not client.api.membership_lock.locked() and client.store.feature_level == 1
    assert raiser.raise_once() is True and client.store.feature_level == FEATURE_LEVEL
    assert [c[1] for c in client.runtime.calls if c[0] == "propose"] == [
        command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL)] * 2


def test_the_raiser_asks_without_the_membership_lock_and_raises_under_it(client, monkeypatch):
    raiser = raiser_of(client, {"10.0.0.2:8080": FEATURE_LEVEL, "10.0.0.3:8080": FEATURE_LEVEL}, monkeypatch)
    assert client.api.membership_lock.acquire(blocking=False)  # a join is being made
    assert raiser.raise_once() is False and client.runtime.calls == []  # waited 0.2 s for it, then gave up
    client.api.membership_lock.release()
    held = []
    monkeypatch.setattr(StatusConnection, "getresponse", lambda self: (
        held.append(client.api.membership_lock.locked()),
        types.SimpleNamespace(status=200, read=lambda n: json.dumps({"feature_level": FEATURE_LEVEL}).encode()))[1])
    propose = client.runtime.propose
    monkeypatch.setattr(client.runtime, "propose", lambda *args, **kwargs: (
        held.append(client.api.membership_lock.locked()), propose(*args, **kwargs))[1])
    assert raiser.raise_once() is True and held == [False, False, True]  # asked without it, raised under it


def test_a_join_is_not_held_up_by_a_member_slow_to_answer_the_raiser(client, monkeypatch):
    """CI flaked once: a join took over 15 s at cluster formation. The raiser held the membership lock while it
    asked every member's /status, so a member slow to answer held every join up to the round's bound; the join
    gives up after -write-timeout (503). Now the question is asked without the lock."""
    raiser = raiser_of(client, {"10.0.0.2:8080": FEATURE_LEVEL, "10.0.0.3:8080": FEATURE_LEVEL}, monkeypatch)
    asked, answer = gevent.event.Event(), gevent.event.Event()
    real = StatusConnection.getresponse

    def slow(self):
        if self.address == "10.0.0.3:8080":
            asked.set()
            answer.wait(5)  # c (stopped, or busy) answers only once the join is through
        return real(self)

    monkeypatch.setattr(StatusConnection, "getresponse", slow)
    round_ = gevent.spawn(raiser.raise_once)
    assert asked.wait(5)
    r = client("POST", "/join", JOIN)  # the raiser waits for c meanwhile
    assert r.status == 200, r
    assert not round_.ready()  # through while c was still being asked (the round gives c up to 2 s)
    answer.set()
    # d joined after the question: the raise waits for a round that asks it too (the fake's configuration
    # has it now).
    client.runtime.node.membership = Membership(("a", "b"), ("c", "d"), MEMBERS + (
        Member("d", "10.0.0.4:5555", "10.0.0.4:8080"),))
    assert round_.get(timeout=5) is False and client.store.feature_level == 1
    assert [c[0] for c in client.runtime.calls] == ["change_membership"]


def test_the_raiser_raises_only_when_every_member_it_asked_is_still_every_member(client, monkeypatch):
    """Asked without the lock, a round may miss a node that joined meanwhile (a join takes the lock, not the
    question): under the lock the raiser looks at the configuration again, and a member it did not ask, or asked
    at another address, stops the raise until the next round has asked it."""
    levels = {"10.0.0.2:8080": FEATURE_LEVEL, "10.0.0.3:8080": FEATURE_LEVEL, "10.0.0.4:8080": 1}
    raiser = raiser_of(client, levels, monkeypatch)
    joined = Membership(("a", "b"), ("c", "d"), MEMBERS + (Member("d", "10.0.0.4:5555", "10.0.0.4:8080"),))
    real = StatusConnection.getresponse

    def joins_meanwhile(self):
        client.runtime.node.membership = joined  # d (an older release) joined while the members were asked
        return real(self)

    monkeypatch.setattr(StatusConnection, "getresponse", joins_meanwhile)
    assert raiser.raise_once() is False and client.runtime.calls == [] and client.store.feature_level == 1
    assert raiser.raise_once() is False and raiser.laggards == {"d": "feature level 1"}  # the next round asks d
    levels["10.0.0.4:8080"] = FEATURE_LEVEL
    assert raiser.raise_once() is True and client.store.feature_level == FEATURE_LEVEL


def test_the_raiser_does_not_raise_after_a_member_was_removed_and_joined_again_during_the_question(client, monkeypatch):
    """Review of scale, finding 1: under the lock the raiser checked only that every member then was asked at the
    same (id, http address). An operator rolled c back to an older release while the question was out (DELETE
    /cluster/c, which takes no lock; then c, wiped, joined again with the same id and addresses: the join found the
    lock free and the level still 1) and the raise went through with c, now of feature level 1, in the
    configuration. Now any change of configuration since the question stops the raise; the next round asks c."""
    levels = {"10.0.0.2:8080": FEATURE_LEVEL, "10.0.0.3:8080": FEATURE_LEVEL}  # b and c run this release when asked
    raiser = raiser_of(client, levels, monkeypatch)
    real = StatusConnection.getresponse
    events: list[tuple[str, int]] = []
    replacing: list[gevent.Greenlet] = []

    def replace_c() -> None:
        events.append(("remove", client("DELETE", "/cluster/c").status))
        client.runtime.node.membership = Membership(("a", "b"), (), MEMBERS[:2])  # as the runtime would
        r = client("POST", "/join", json.dumps({"node_id": "c", "raft_address": "10.0.0.3:5555",
                                                "http_address": "10.0.0.3:8080"}))  # names no level: older
        events.append(("join", r.status))
        client.runtime.node.membership = Membership(("a", "b"), ("c",), MEMBERS)
        levels["10.0.0.3:8080"] = None

    def c_replaced_meanwhile(self):
        answer = real(self)  # c answers level 2: the new release still runs there
        if self.address == "10.0.0.3:8080" and not replacing:
            replacing.append(gevent.spawn(replace_c))
            gevent.sleep(0.3)  # c's answer takes 0.3 s, well within LEVEL_REQUEST_TIMEOUT_SECONDS
        return answer

    monkeypatch.setattr(StatusConnection, "getresponse", c_replaced_meanwhile)
    assert raiser.raise_once() is False and client.store.feature_level == 1
    replacing[0].join(5)
    assert events == [("remove", 200), ("join", 200)]
    assert raiser.raise_once() is False and raiser.laggards == {"c": "feature level 1"}  # the next round asks c
    assert not [c for c in client.runtime.calls if c[0] == "propose"]


def test_the_raise_is_bound_to_the_configuration_the_raiser_asked(client, monkeypatch):
    """Review of scale, item 3: a join whose change timed out released the lock while its change still waited in
    the runtime's inbox, ahead of the raise. The raiser's proposal names the configuration it asked in, and the
    runtime drops it when another reached the log first (as the fake does here)."""
    raiser = raiser_of(client, {"10.0.0.2:8080": FEATURE_LEVEL, "10.0.0.3:8080": FEATURE_LEVEL}, monkeypatch)
    propose = client.runtime.propose

    def change_appended_first(*args, **kwargs):
        client.runtime.node.membership = Membership(("a", "b"), ("c", "d"), MEMBERS + (
            Member("d", "10.0.0.4:5555", "10.0.0.4:8080"),))  # the timed-out join's change, taken first
        return propose(*args, **kwargs)

    monkeypatch.setattr(client.runtime, "propose", change_appended_first)
    with pytest.raises(ProposalDropped):
        raiser.raise_once()
    assert client.store.feature_level == 1 and not client.api.membership_lock.locked()


def test_a_prefix_delete_over_the_cap_is_several_entries_and_answers_the_last_index(upgraded):
    """Review of coord1, L2: one entry deletes at most MAX_DELETE_KEYS_PER_ENTRY keys; the route goes on."""
    client = upgraded
    n = MAX_DELETE_KEYS_PER_ENTRY
    for i in range(2 * n + 3):
        client.runtime.propose(command(SET, f"p/{i:05d}", b"v"), 1.0)
    client.runtime.propose(command(SET, "q", b"v"), 1.0)
    before = client.runtime.node.last_applied
    r = client("DELETE", "/db/?prefix=p/")
    assert (r.status, r.json()) == (200, {"deleted": 2 * n + 3, "index": before + 3})
    assert sorted(client.store.data) == ["q"]


def test_the_new_api_waits_while_a_snapshot_is_restored_rather_than_saying_not_upgraded(client):
    """Final review of this stop, F2: a node restoring a leader's snapshot (a batch per drive) still holds the old
    state, its feature level too: a level-2 request got 409 "not upgraded" from a node of an upgraded cluster. It
    is told to retry (503, not-applied) until the snapshot is in."""
    client.runtime.propose(command(SET_FEATURE_LEVEL, "", b"", FEATURE_LEVEL), 1.0)
    client.store.feature_level = 1  # the old state a node holds while it restores the snapshot of a level-2 cluster
    client.runtime.restoring_snapshot = True
    r = client("POST", "/txn", b'{"compare": [], "success": [], "failure": []}')
    assert (r.status, r.headers.get("x-raft-outcome")) == (503, "not-applied"), r.text
    assert "restoring a snapshot" in r.text
    client.runtime.restoring_snapshot = False
    client.store.feature_level = FEATURE_LEVEL
    assert client("POST", "/txn", b'{"compare": [], "success": [], "failure": []}').status == 200


def test_a_node_restoring_its_own_snapshot_at_start_does_not_answer_from_the_empty_state(client):
    """Review of fastrestore, Q2: a restarted node restores its snapshot by steps while it serves, its store a
    fresh, empty one meanwhile (last_applied 0: RaftNode.snapshot_not_applied_yet). What answers without waiting
    for an index came from that empty state: stale reads and lists (keys gone), a watch from now (starting at 0,
    then 410 at the swap), /status's cluster_feature_level (1) and keys (0). They answer 503 now, /status and the
    dashboard's /stats with those null (review of fastrestore2, Q-b: /stats said 0 keys; and left out, they broke
    clients that index them); a leader's snapshot restored over a whole state changes none of it."""
    client.runtime.propose(command(SET, "k", b"v"), 1.0)
    node = client.runtime.node
    applied = node.last_applied
    client.runtime.restoring_snapshot = True
    node.last_applied = 0
    for path in ("/db/k?consistency=stale", "/db/?consistency=stale", "/watch?key=k&poll=1&timeout=0",
                 "/watch?prefix=&poll=1&timeout=0", "/watch?prefix="):
        r = client("GET", path)
        assert (r.status, r.text) == (503, "this node is restoring a snapshot; retry\n"), path
    status = client("GET", "/status").json()
    assert status["restoring"] is True and status["cluster_feature_level"] is None and status["keys"] is None
    assert client("GET", "/stats").json()["keys"] is None
    node.last_applied = applied  # a leader's snapshot, restored over this node's whole state: served as before
    node.receiving_snapshot = node.restoring_snapshot = True  # as the core says it then
    assert client("GET", "/db/k?consistency=stale").text == "v"
    assert client("GET", "/db/?consistency=stale").json()["keys"] == ["k"]
    assert client("GET", "/watch?key=k&poll=1&timeout=0").status == 200
    status = client("GET", "/status").json()
    assert (status["keys"], status["cluster_feature_level"]) == (1, client.store.feature_level)
    assert client("GET", "/stats").json()["keys"] == 1
    # It says it restores (review of the health leftovers, item 2: it said so only into the empty state).
    assert status["restoring"] is True
    client.runtime.restoring_snapshot = node.receiving_snapshot = node.restoring_snapshot = False
    assert client("GET", "/status").json()["restoring"] is False


def test_a_joiner_receiving_its_first_snapshot_counts_nothing_yet(client):
    """Review of health, Q7: a joiner (nothing applied) receiving the leader's snapshot in chunks showed the empty
    state's keys 0 and cluster_feature_level 1 in /status (and keys 0 in /stats) until the restore began (then null,
    then its values). Counted as the empty state from the first chunk: null throughout."""
    node = client.runtime.node
    node.last_applied = 0
    node.receiving_snapshot = True  # chunks come; the restore has not begun (runtime.restoring_snapshot False)
    assert not client.runtime.restoring_snapshot
    status = client("GET", "/status").json()
    assert status["restoring"] is True and status["keys"] is None and status["cluster_feature_level"] is None, status
    assert client("GET", "/stats").json()["keys"] is None
    node.receiving_snapshot = False  # a node that applied nothing and receives nothing counts its (empty) state
    status = client("GET", "/status").json()
    assert (status["restoring"], status["keys"], status["cluster_feature_level"]) == (False, 0, 1), status


def test_a_node_says_it_restores_in_its_append_replies_only_in_a_cluster_of_this_release():
    """Review of fastrestore2, L1': AppendEntriesReply.restoring makes an older node drop the frame, so a node says
    it only at the feature level that came with the field: its store's, or while that store is still empty (the
    restore into it), the snapshot's it restores (store.restoring_level: a V4's level; 0 for an older format)."""
    def members_read_restoring(store_level: int, restoring_level: int) -> bool:
        store = types.SimpleNamespace(feature_level=store_level, restoring_level=restoring_level)
        return Server._members_read_restoring(types.SimpleNamespace(store=store))  # type: ignore[arg-type]

    assert RESTORING_IN_REPLIES_LEVEL == 3
    assert not members_read_restoring(1, 0) and not members_read_restoring(2, 0)
    assert members_read_restoring(3, 0) and members_read_restoring(1, 3)
