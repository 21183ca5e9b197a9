"""The cluster secret (-secret-file / $RAFTDZMQ_SECRET), driven through real processes: members with it replicate,
joins without it or with another are refused; each node has a CURVE key of its own and speaks only as itself, and
a removed member's key is refused;
admin requests (/join, /cluster changes) need a fresh signature, directly, forwarded and redirected; and the
warning for a node that listens beyond loopback without a secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

from procs import ROOT, SERVER, LocalCluster, Node, free_port, netns_unavailable, wait_for
from raftlib.server.store import FEATURE_LEVEL


GHOST_KEY = zmq.curve_keypair()[0].decode()  # the public key a made-up joining node names


def secret_file(tmp_path, name: str, secret: str) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        f.write(secret + "\n")
    return path


def test_members_with_the_secret_replicate_and_strangers_are_refused(tmp_path):
    good = secret_file(tmp_path, "good", "s3cret-of-the-cluster")
    bad = secret_file(tmp_path, "bad", "another-secret-of-a-cluster")
    c = LocalCluster(str(tmp_path), size=3, extra=("-secret-file", good)).start()
    try:
        leader = c.leader()
        assert c.write("k", "v1").status == 200
        for n in c.nodes:
            wait_for(lambda n=n: n.request("GET", "/db/k").body == b"v1", 10, "a read of the replicated write")

        # A join signed with another secret, and one not signed at all, are refused with a clear message.
        for extra, what in ((("-secret-file", bad), "other secret"), ((), "no secret")):
            stranger = Node(f"stranger-{len(extra)}", str(tmp_path))
            stranger.proc = subprocess.Popen(
                [sys.executable, SERVER, "-p", str(stranger.port), "-hp", str(stranger.http_port), "-join",
                 leader.address, "-join-timeout", "5", *extra, stranger.data_dir],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                out, _ = stranger.proc.communicate(timeout=30)
            finally:
                stranger.kill()
            assert stranger.proc.returncode != 0, what
            assert b"join refused" in out and b"secret" in out, (what, out[-2000:])
        wait_for(lambda: "refused a join" in leader.log_text(), 5, "the leader to log the refusals")
        assert len(leader.status()["members"]) == 3

        # Restarted with the secret from the environment, a member catches up.
        follower = next(n for n in c.nodes if n is not leader)
        follower.stop()
        assert leader.request("POST", "/db/k", "v2").status == 200
        os.environ["RAFTDZMQ_SECRET"] = "s3cret-of-the-cluster"
        try:
            follower.start()
        finally:
            del os.environ["RAFTDZMQ_SECRET"]
        wait_for(lambda: follower.request("GET", "/db/k?consistency=stale").body == b"v2", 15, "the catch-up")
        # Each node has a key of its own in its data dir, owner-only; its public key is in the configuration.
        keys = {m["id"]: m["public_key"] for m in leader.request("GET", "/cluster").json()}
        for n in c.nodes:
            path = os.path.join(n.data_dir, "node.key")
            assert os.stat(path).st_mode & 0o077 == 0
            with open(path) as f:
                secret_key = json.load(f)["secret_key"]
            assert secret_key not in n.log_text()
            assert keys[n.status()["node_id"]] == zmq.curve_public(secret_key.encode()).decode()
        assert len(set(keys.values())) == 3
    finally:
        c.stop()


# One frame to a node's Raft port through a CURVE connection made with a node key: argv: the client's secret key
# (Z85), the server's public key, the port, the frame (hex). Prints "answered" or "no answer".
RAW_FRAME = r"""
import sys, zmq
secret_key, server_key, port, frame = sys.argv[1:5]
ctx = zmq.Context()
s = ctx.socket(zmq.REQ)
for option, value in ((zmq.LINGER, 0), (zmq.SNDTIMEO, 2000), (zmq.RCVTIMEO, 2000)):
    s.setsockopt(option, value)
s.setsockopt(zmq.CURVE_SECRETKEY, secret_key.encode())
s.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(secret_key.encode()))
s.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
s.connect(f"tcp://127.0.0.1:{port}")
try:
    s.send(bytes.fromhex(frame))
    s.recv()
    print("answered")
except zmq.Again:
    print("no answer")
s.close(linger=0)
ctx.term()
"""


def send_raw(secret_key: str, server_key: str, port: int, messages) -> str:
    from raftlib import codec

    out = subprocess.run([sys.executable, "-c", RAW_FRAME, secret_key, server_key, str(port),
                          codec.encode_batch(messages).hex()], capture_output=True, text=True, timeout=30, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_strangers_junk_frame_is_never_decoded_with_a_secret(tmp_path):
    """Review edge L3: without a secret, one 4 MiB frame of 4,000,000 empty CBOR arrays holds a node's loop for
    about a second in cbor2 (README: the Raft port then trusts whoever reaches it). With a secret, what the README
    promises instead: a stranger's frame, without CURVE or with a key of its own, is never decoded nor answered."""
    secret = secret_file(tmp_path, "secret", "s3cret-of-the-cluster")
    node = Node("one", str(tmp_path)).start("-secret-file", secret)
    context = zmq.Context()
    try:
        wait_for(lambda: node.status()["role"] == "leader", 15, "the node to lead")
        junk = b"\x82\x01\x9a" + (4_000_000).to_bytes(4, "big") + b"\x80" * 4_000_000
        for curve in (False, True):
            sock = context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if curve:
                public, secret_key = zmq.curve_keypair()
                sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
                sock.setsockopt(zmq.CURVE_SERVERKEY, node.request("GET", "/cluster").json()[0]["public_key"].encode())
            sock.connect(f"tcp://127.0.0.1:{node.port}")
            sock.send(junk)
            assert not sock.poll(3000), curve  # without a secret: answered (an empty batch) after ~1 s of decoding
            sock.close()
        assert "dropped a bad frame" not in node.log_text()
        assert node.request("POST", "/db/k", "v").status == 200
    finally:
        context.destroy(linger=0)  # its sockets too, an assertion's included
        node.kill()


def test_a_member_speaks_only_as_itself_and_not_once_removed(tmp_path):
    """Review 2 F2: with one CURVE key for the whole cluster and no check of a message's `src`, a removed member
    (anyone who ever had the secret) derived the key, sent a TimeoutNow claiming to come from the leader, and the
    target started an election and won. Now each node has its own key: a member's frame that names the leader as
    its `src` is dropped, and once the member is removed its key does not even complete a handshake."""
    from raftlib import TimeoutNow

    path = secret_file(tmp_path, "s", "forgery-s3cret-of-the-cluster")
    secret = b"forgery-s3cret-of-the-cluster"
    c = LocalCluster(str(tmp_path), size=3, extra=("-secret-file", path)).start()
    try:
        leader = c.leader()
        leader_id = leader.status()["node_id"]
        removed, target = (n for n in c.nodes if n is not leader)
        removed_id, target_id = removed.status()["node_id"], target.status()["node_id"]
        target_key = {m["id"]: m["public_key"] for m in leader.request("GET", "/cluster").json()}[target_id]
        with open(os.path.join(removed.data_dir, "node.key")) as f:
            removed_key = json.load(f)["secret_key"]
        term = target.status()["term"]

        # A member, still in the configuration, speaking as the leader: answered (the connection is a member's),
        # but the message is dropped: no election.
        assert send_raw(removed_key, target_key, target.port, [TimeoutNow(leader_id, target_id, term)]) == "answered"
        time.sleep(1.5)
        assert target.status()["term"] == term and c.leader() is leader
        wait_for(lambda: "whose src is not" in target.log_text(), 5, "the target to log the forgery")

        # Removed (signed), and stopped: its key is refused from then on, whatever it claims.
        r = leader.request("DELETE", f"/cluster/{removed_id}", headers=sign(secret, "DELETE", f"/cluster/{removed_id}"))
        assert r.status == 200, r
        wait_for(lambda: removed_id not in members(target), 10, "the removal to reach the target")
        removed.stop()
        for src in (leader_id, removed_id):
            assert send_raw(removed_key, target_key, target.port, [TimeoutNow(src, target_id, term)]) == "no answer"
        time.sleep(1.0)
        assert target.status()["term"] == term and c.leader() is leader
        wait_for(lambda: "not a member's key" in target.log_text(), 5, "the target to log the refusal")
        assert leader.request("POST", "/db/after", "x").status == 200
    finally:
        c.stop()


def sign(secret: bytes, method: str, target: str, body: bytes = b"", timestamp: float | None = None) -> dict:
    """The documented admin signature, computed here independently of the server's code."""
    ts = f"{time.time() if timestamp is None else timestamp:.6f}"
    message = f"raftdzmq-admin-v1\n{method}\n{target}\n{ts}\n".encode() + body
    return {"X-Raftdzmq-Timestamp": ts, "X-Raftdzmq-Signature": hmac.new(secret, message, hashlib.sha256).hexdigest()}


def members(node: Node) -> dict:
    return {m["id"]: m["role"] for m in node.request("GET", "/cluster").json()}


def test_admin_requests_need_a_fresh_signature_forwarded_or_redirected(tmp_path):
    """Issue 17 item 4: with a secret, unsigned, wrongly signed, stale and replayed /cluster changes and joins are
    refused (the leader stays, all three voters stay); signed ones work directly, through a -forward follower and
    after a 307; the -sign helper signs for curl; the secret is never logged."""
    secret = b"admin-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret.decode())
    c = LocalCluster(str(tmp_path), size=3, extra=("-secret-file", path, "-forward")).start()
    try:
        leader = c.leader()
        leader_id = leader.status()["node_id"]
        follower = next(n for n in c.nodes if n is not leader)
        follower_id = follower.status()["node_id"]
        voters = members(leader)
        assert sorted(voters.values()) == ["voter"] * 3
        ghost = json.dumps({"node_id": "ghost", "raft_address": "127.0.0.1:1", "http_address": "127.0.0.1:2",
                            "feature_level": FEATURE_LEVEL, "public_key": GHOST_KEY})
        now = time.time()
        refusals = [
            ("DELETE", f"/cluster/{leader_id}", b"", {}, "not signed"),
            ("DELETE", f"/cluster/{follower_id}", b"", {}, "not signed"),
            ("POST", f"/cluster/transfer?to={follower_id}", b"", {}, "not signed"),
            ("POST", "/join", ghost.encode(), {}, "not signed"),
            ("DELETE", f"/cluster/{leader_id}", b"", sign(b"another", "DELETE", f"/cluster/{leader_id}"), "not signed"),
            # Signed for another target, another body, another method: the signature does not match.
            ("POST", f"/cluster/transfer?to={follower_id}", b"",
             sign(secret, "POST", f"/cluster/transfer?to={leader_id}"), "not signed"),
            ("POST", "/join", ghost.encode(), sign(secret, "POST", "/join", b"{}"), "not signed"),
            ("DELETE", f"/cluster/{follower_id}", b"", sign(secret, "POST", f"/cluster/{follower_id}"), "not signed"),
            # Out of the allowed clock skew (300 s) either way: a recording is worthless after it.
            ("DELETE", f"/cluster/{follower_id}", b"", sign(secret, "DELETE", f"/cluster/{follower_id}", b"",
                                                             now - 301), "clock"),
            ("POST", "/join", ghost.encode(), sign(secret, "POST", "/join", ghost.encode(), now + 301), "clock"),
        ]
        for node in (leader, follower):
            for method, target, body, headers, why in refusals:
                r = node.request(method, target, body, headers=headers)
                assert r.status == 403 and why in r.text, (node.name, method, target, r)
        assert c.leader() is leader and members(leader) == voters

        # A signed join, then a signed removal of the same node; the join replayed is refused (the same signature
        # within the window), so the removed node does not come back.
        join = sign(secret, "POST", "/join", ghost.encode())
        assert leader.request("POST", "/join", ghost, headers=join).status == 200
        assert members(leader).get("ghost") == "learner"
        remove = sign(secret, "DELETE", "/cluster/ghost")
        assert follower.request("DELETE", "/cluster/ghost", headers=remove).status == 200  # forwarded
        assert "ghost" not in members(leader)
        for node in (leader, follower):
            r = node.request("POST", "/join", ghost, headers=join)
            assert r.status == 403 and "replay" in r.text, r
        assert "ghost" not in members(leader)

        # A redirect: the client follows the 307 with the same signed request.
        join = sign(secret, "POST", "/join", ghost.encode())
        r = follower.request("POST", "/join", ghost, headers={**join, "X-Raftdzmq-Forwarded": "test"})
        assert r.status == 307, r
        target = re.sub(r"^http://[^/]+", "", r.headers["location"])
        assert target == "/join"
        assert leader.request("POST", target, ghost, headers=join).status == 200
        assert members(leader).get("ghost") == "learner"

        # curl with the headers from -sign (DELETE, no body).
        out = subprocess.run([sys.executable, SERVER, "-secret-file", path, "-sign", "DELETE", "/cluster/ghost"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        headers_file = os.path.join(tmp_path, "headers")
        with open(headers_file, "w") as f:
            f.write(out.stdout)
        curl = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-XDELETE", "-H",
                               f"@{headers_file}", f"http://{leader.address}/cluster/ghost"], capture_output=True,
                              text=True, timeout=30)
        assert curl.stdout == "200", curl
        assert "ghost" not in members(leader)

        # A signed transfer through the forwarding follower.
        r = follower.request("POST", f"/cluster/transfer?to={follower_id}",
                             headers=sign(secret, "POST", f"/cluster/transfer?to={follower_id}"))
        assert r.status == 200, r
        assert c.leader() is follower

        # A new node whose -join names a -forward follower: the leader's signed answer comes back through it with
        # its signature (the joining node refuses an unsigned one and exits).
        newcomer = Node("node.4", str(tmp_path))
        c.nodes.append(newcomer)
        newcomer.start("-secret-file", path, "-forward", join=leader.address)  # `leader` is a follower now
        wait_for(lambda: members(follower).get(newcomer.status()["node_id"]) == "voter", 20, "the newcomer to vote")
        for n in c.nodes:
            assert secret.decode() not in n.log_text() and "Traceback" not in n.log_text()
        assert "refused a removal" in leader.log_text()
    finally:
        c.stop()


def test_an_empty_secret_file_is_refused(tmp_path):
    empty = secret_file(tmp_path, "empty", "")
    out = subprocess.run([sys.executable, SERVER, "-p", str(free_port()), "-hp", str(free_port()), "-secret-file",
                          empty, os.path.join(tmp_path, "node")], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "secret file" in out.stderr and "empty" in out.stderr


def test_a_short_secret_is_refused_from_a_file_and_from_the_environment(tmp_path):
    """Review 2 F5: a signed admin header is HMAC(secret, known text), open to offline guessing: a secret must have
    at least 16 bytes, and the error says how to make one."""
    short = secret_file(tmp_path, "short", "x" * 15)
    node_dir = os.path.join(tmp_path, "node")
    for extra, env in ((("-secret-file", short), {}), ((), {"RAFTDZMQ_SECRET": "y" * 15})):
        out = subprocess.run([sys.executable, SERVER, "-p", str(free_port()), "-hp", str(free_port()), *extra,
                              node_dir], capture_output=True, text=True, timeout=30, env={**os.environ, **env})
        assert out.returncode != 0 and "at least 16 bytes" in out.stderr and "openssl rand" in out.stderr, out
        assert not os.path.exists(node_dir)  # refused before anything is made
    out = subprocess.run([sys.executable, SERVER, "-secret-file", secret_file(tmp_path, "ok", "z" * 16), "-sign",
                          "DELETE", "/cluster/x"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "X-Raftdzmq-Signature" in out.stdout, out


@pytest.mark.skipif(netns_unavailable() is not None, reason=f"the non-loopback address lives in a network namespace: "
                                                             f"{netns_unavailable()}")
def test_warns_when_listening_beyond_loopback_without_a_secret(tmp_path):
    ns = f"rdz{os.getpid() % 100000}-warn"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "a0", "type", "veth", "peer", "name", "b0"],
                    ["addr", "add", "10.78.0.1/24", "dev", "a0"], ["link", "set", "a0", "up"],
                    ["link", "set", "b0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, timeout=30)
        node = Node("outside", str(tmp_path), host="10.78.0.1", ports=(5555, 8080), wrap=("ip", "netns", "exec", ns))
        node._wait_serving = lambda: None  # its HTTP port is only reachable inside the namespace
        node.start()
        try:
            wait_for(lambda: "beyond loopback without a cluster secret" in node.log_text(), 15, "the warning")
        finally:
            node.kill()
        local = Node("inside", str(tmp_path)).start()
        try:
            wait_for(lambda: "serving http" in local.log_text(), 15, "the start-up line")
            assert "beyond loopback" not in local.log_text()
        finally:
            local.kill()
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)


def test_a_used_admin_request_is_refused_by_every_later_leader(tmp_path):
    """Review F5: a recorded signed join of a node later removed, replayed to the next leader (after a transfer),
    brought it back; the recorded removal replayed removed it again: the used-signature memory was the leader's
    own. Now a claim of each signature goes through the Raft log before the request acts, and every node, also one
    restarted from a snapshot that holds the claims, refuses it."""
    secret = b"claims-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret.decode())
    c = LocalCluster(str(tmp_path), size=3, extra=("-secret-file", path, "-snapshot-threshold", "65536")).start()
    try:
        leader = c.leader()
        ghost = json.dumps({"node_id": "ghost", "raft_address": "127.0.0.1:1", "http_address": "127.0.0.1:2",
                            "feature_level": FEATURE_LEVEL, "public_key": GHOST_KEY})
        join = sign(secret, "POST", "/join", ghost.encode())
        assert leader.request("POST", "/join", ghost, headers=join).status == 200
        assert members(leader).get("ghost") == "learner"
        remove = sign(secret, "DELETE", "/cluster/ghost")
        r = leader.request("DELETE", "/cluster/ghost", headers=remove)
        assert r.status == 200, r
        removed_at = int(r.headers["x-raft-index"])
        assert "ghost" not in members(leader)

        # Enough writes that every node's snapshot covers the claims; then the next leader restarts from it.
        successor = next(n for n in c.nodes if n is not leader)
        for i in range(120):
            assert leader.request("POST", f"/db/fill{i}", b"x" * 1024).status == 200
        wait_for(lambda: successor.status()["snapshot_index"] > removed_at, 15, "a snapshot past the claims")
        successor.stop()
        successor.start("-secret-file", path, "-snapshot-threshold", "65536")
        successor_id = successor.status()["node_id"]
        wait_for(lambda: leader.request("POST", f"/cluster/transfer?to={successor_id}", headers=sign(
            secret, "POST", f"/cluster/transfer?to={successor_id}")).status == 200, 15, "the transfer")
        assert c.leader() is successor

        # The recorded join, replayed to the new leader (directly and through the old one): refused.
        for node in (successor, leader):
            r = node.request("POST", "/join", ghost, headers=join)
            assert r.status in (403, 307) and ("replay" in r.text or r.status == 307), r
        r = successor.request("POST", "/join", ghost, headers=join)
        assert r.status == 403 and "replay" in r.text, r
        assert "ghost" not in members(successor)
        # Joined again with a fresh signature, the recorded removal replayed does not remove it.
        assert successor.request("POST", "/join", ghost, headers=sign(secret, "POST", "/join", ghost.encode())
                                 ).status == 200
        r = successor.request("DELETE", "/cluster/ghost", headers=remove)
        assert r.status == 403 and "replay" in r.text, r
        assert members(successor).get("ghost") == "learner"
        for n in c.nodes:
            assert "Traceback" not in n.log_text()
    finally:
        c.stop()


# A member's session, as the leader would hold it: one heartbeat (AppendEntries at the leader's term) to a follower,
# through this process's transport with the leader's node key. argv: the leader's secret key, leader id, term,
# follower id, address, the follower's public key.
MEMBER_HEARTBEAT = r"""
from gevent import monkey
monkey.patch_all()
import socket, sys, gevent
from raftlib import AppendEntries, Member
from raftlib.transport import ZmqTransport

node_key, leader_id, term, follower_id, address, follower_key = sys.argv[1:7]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
replies = []
t = ZmqTransport(leader_id, f"127.0.0.1:{port}", lambda m, r: replies.extend(m) or [], reply_timeout_seconds=2.0,
                 node_key=node_key, members=lambda: [Member(follower_id, address, "", follower_key)])
t.start()
t.set_peers({follower_id: address})
t.send([AppendEntries(leader_id, follower_id, int(term), 0, 0, (), 0)])
for _ in range(100):
    gevent.sleep(0.05)
    if replies:
        break
print("replies", len(replies))
"""


class RecordingProxy:
    """A TCP proxy to `port` that records what the client side sends (one connection)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = b""
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pipe(a, b, record):
            try:
                while data := a.recv(65536):
                    if record:
                        self.recorded += data
                    b.sendall(data)
            except OSError:
                pass
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pipe, args=(upstream, client, False), daemon=True).start()
        pipe(client, upstream, True)


def test_a_recorded_heartbeat_sent_again_does_not_hold_off_an_election(tmp_path):
    """Review F2: signed frames carried no sequence number or timestamp, so an AppendEntries heartbeat captured
    and sent again every 50 ms after the leader was SIGKILLed kept both followers following the dead leader for as
    long as it went on (20 s in the review). Here a member's session to each follower is recorded byte for byte,
    the leader killed, and each recording sent again on new connections every 50 ms for 8 s: the followers must
    elect a new leader meanwhile. (CURVE: the recorded handshake does not open a new session.)"""
    secret = "replay-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret)
    c = LocalCluster(str(tmp_path), size=3, extra=("-secret-file", path)).start()
    stop = threading.Event()
    try:
        leader = c.leader()
        status = leader.status()
        followers = [n for n in c.nodes if n is not leader]
        recordings = []
        keys = {m["id"]: m["public_key"] for m in leader.request("GET", "/cluster").json()}
        with open(os.path.join(leader.data_dir, "node.key")) as f:
            leader_key = json.load(f)["secret_key"]
        for f in followers:
            proxy = RecordingProxy(f.port)
            follower_id = f.status()["node_id"]
            out = subprocess.run([sys.executable, "-c", MEMBER_HEARTBEAT, leader_key, status["node_id"],
                                  str(status["term"]), follower_id, f"127.0.0.1:{proxy.port}", keys[follower_id]],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ,
                                                                                                PYTHONPATH=ROOT))
            assert out.stdout.split() == ["replies", "1"], out.stdout + out.stderr  # the session was a real one
            recordings.append((f.port, proxy.recorded))
        assert all(len(r) > 64 for _, r in recordings)
        leader.kill()

        def replay(port: int, data: bytes) -> None:
            while not stop.is_set():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(data[:64])  # the ZMTP greeting: libzmq reads it apart from what follows
                        time.sleep(0.01)
                        s.sendall(data[64:])
                        s.settimeout(0.05)
                        try:
                            s.recv(65536)
                        except OSError:
                            pass
                except OSError:
                    pass
                time.sleep(0.05)

        threads = [threading.Thread(target=replay, args=r, daemon=True) for r in recordings]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        new_leader = wait_for(lambda: next((n for n in followers if n.status()["role"] == "leader"), None), 8,
                              "a new leader while the recorded heartbeats are sent again")
        assert new_leader.status()["term"] > status["term"]
        print(f"new leader after {time.monotonic() - t0:.2f}s")
    finally:
        stop.set()
        c.stop()


def node_key_of(node: Node) -> dict:
    with open(os.path.join(node.data_dir, "node.key")) as f:
        return json.load(f)


def test_a_removed_member_is_not_admitted_by_the_sole_survivor(tmp_path):
    """Review 3 F1: B joined A (B's node.key kept A's key from the join's answer to admit before any configuration
    reached it); a signed removal of A left B the only member, and B's transport, finding no other member, fell
    back to that list: A's key was admitted as A again, and A's AppendEntries at a higher term made B apply
    `SET pwned`. Now the list counts only while B has no configuration at all, and leaves node.key once one
    arrives: A's key gets no handshake, before and after B restarts, and nothing of A's is applied."""
    from raftlib import AppendEntries, Entry
    from raftlib.server.store import SET, command

    secret = b"survivor-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret.decode())
    a, b = Node("a", str(tmp_path)), Node("b", str(tmp_path))
    c = LocalCluster(str(tmp_path), extra=("-secret-file", path), nodes=[a, b]).start()
    try:
        a_id, b_id = a.status()["node_id"], b.status()["node_id"]
        a_key, b_public = node_key_of(a)["secret_key"], {m["id"]: m["public_key"] for m in a.request("GET", "/cluster").json()}[b_id]
        r = a.request("DELETE", f"/cluster/{a_id}", headers=sign(secret, "DELETE", f"/cluster/{a_id}"))
        assert r.status == 200, r
        wait_for(lambda: b.status()["role"] == "leader" and list(members(b)) == [b_id], 15, "B to lead alone")
        a.stop()
        for restart in (False, True):
            if restart:
                b.stop()
                b.start("-secret-file", path)
                wait_for(lambda: b.status()["role"] == "leader", 10, "B to lead again")
            st = b.status()
            forged = AppendEntries(a_id, b_id, st["term"] + 100, st["last_index"], st["term"],
                                   (Entry(st["term"] + 100, st["last_index"] + 1,
                                          data=command(SET, "pwned", b"by removed A", None)),), st["last_index"] + 1)
            assert send_raw(a_key, b_public, b.port, [forged]) == "no answer", restart
            time.sleep(1.0)
            assert b.status()["term"] == st["term"], restart
            assert b.request("GET", "/db/pwned?consistency=stale").status == 404, restart
            # The join answer's list left node.key once B's log reached the configuration that added B.
            assert "admit" not in node_key_of(b) and "vouched" not in node_key_of(b), restart
        wait_for(lambda: "not a member's key" in b.log_text(), 5, "B to log the refusal")
        assert b.request("POST", "/db/after", "x").status == 200
    finally:
        c.stop()


def test_a_signed_join_cannot_take_a_members_key_nor_move_it_nor_pass_the_cap(tmp_path):
    """Review 3 F2 on real nodes: a signed join of a new id with B's public key (from the open GET /cluster) was
    accepted, every node then took B's frames as the newcomer's and dropped them, and B was cut off (its reads
    timed out; a transfer to it answered 200 and did not hold). Now the join is refused (409) and B keeps its
    voice: a transfer to it answers 200 and B leads. F4: a signed join naming the leader's id and key with
    another HTTP address moved it, and a follower's 307 pointed at attacker.example: now 409, and the 307 points
    at the leader."""
    secret = b"dupkey-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret.decode())
    a, b = Node("a", str(tmp_path)), Node("b", str(tmp_path))
    c = LocalCluster(str(tmp_path), extra=("-secret-file", path, "-max-members", "2"), nodes=[a, b]).start()
    try:
        b_id = b.status()["node_id"]
        keys = {m["id"]: m["public_key"] for m in a.request("GET", "/cluster").json()}
        body = json.dumps({"node_id": "zzzzzzzz", "raft_address": "127.0.0.1:9", "http_address": "127.0.0.1:9",
                           "feature_level": FEATURE_LEVEL, "public_key": keys[b_id]})
        r = a.request("POST", "/join", body, headers=sign(secret, "POST", "/join", body.encode()))
        assert r.status == 409 and f"member {b_id}'s" in r.text, r
        assert set(members(a)) == set(keys)
        assert c.write("x", "1").status == 200
        assert b.request("GET", "/db/x", timeout=15).body == b"1"
        r = a.request("POST", f"/cluster/transfer?to={b_id}", headers=sign(secret, "POST", f"/cluster/transfer?to={b_id}"))
        assert r.status == 200, r
        assert c.leader() is b
        assert b.request("POST", "/db/y", "2").status == 200

        me = next(m for m in b.request("GET", "/cluster").json() if m["id"] == b_id)
        body = json.dumps({"node_id": b_id, "raft_address": me["raft_address"], "http_address": "attacker.example:80",
                           "feature_level": FEATURE_LEVEL, "public_key": me["public_key"]})
        r = b.request("POST", "/join", body, headers=sign(secret, "POST", "/join", body.encode()))
        assert r.status == 409 and "does not move a member" in r.text, r
        r = a.request("POST", "/db/secret", "v")
        assert r.status == 307 and r.headers["location"] == f"http://{me['http_address']}/db/secret", r
        # F5: -max-members 2, and two members: a new node's join is refused.
        body = json.dumps({"node_id": "c0ffee00", "raft_address": "127.0.0.1:9", "http_address": "127.0.0.1:9",
                           "feature_level": FEATURE_LEVEL, "public_key": GHOST_KEY})
        r = b.request("POST", "/join", body, headers=sign(secret, "POST", "/join", body.encode()))
        assert r.status == 409 and "the most -max-members allows" in r.text, r
        assert set(members(b)) == set(keys)
    finally:
        c.stop()


def test_a_configuration_whose_members_lack_keys_does_not_start_with_a_secret(tmp_path):
    """Review 3 F3: a data dir whose configuration holds members without a node key (made by a raftdzmq before
    node keys with a secret, or made without one) started with a secret and wedged silently (pre-candidates for
    ever; a single leader whose joiners were never admitted). Now it exits with code 2 and one line saying what
    to do, and leaves the data dir as it was: without a secret it runs on, its data intact."""
    path = secret_file(tmp_path, "s", "upgrade-s3cret-of-the-cluster")
    node = Node("old", str(tmp_path)).start()
    try:
        wait_for(lambda: node.request("POST", "/db/k", "v").status == 200, 10, "a write")
        assert node.stop() == 0
        out = subprocess.run([sys.executable, SERVER, "-p", str(node.port), "-hp", str(node.http_port),
                              "-secret-file", path, node.data_dir], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out
        [line] = [x for x in out.stderr.splitlines() if x.startswith("raftdzmq:")]
        assert "members without a node key" in line and "recreate the cluster" in line and "without a secret" in line
        assert "Traceback" not in out.stderr
        assert not os.path.exists(os.path.join(node.data_dir, "node.key"))
        node.start()
        wait_for(lambda: node.request("GET", "/db/k").body == b"v", 10, "the write, read after the restart")
    finally:
        node.kill()


class JoinAnswerer:
    """An HTTP server on loopback that answers every POST /join with `answer`, signed with `secret` for that
    request (as a leader does): a leader whose configuration has no key of its own."""

    def __init__(self, secret: bytes, answer: bytes) -> None:
        import http.server

        from raftlib.server.admin import SIGNATURE_HEADER, answer_headers

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = answer_headers(secret, self.headers.get(SIGNATURE_HEADER, ""), answer)
                self.send_response(200)
                for name, value in {**headers, "Content-Type": "application/json",
                                    "Content-Length": str(len(answer))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_join_answer_without_the_leaders_key_is_refused(tmp_path):
    """Review 3 F3: the upgraded single node of a cluster made before node keys answered a join with its own key
    missing; the joining node dropped the keyless entry, admitted nobody, and waited for ever. Now the join fails
    (exit code 1) with the reason."""
    secret = b"answer-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret.decode())
    answerer = JoinAnswerer(secret, json.dumps({"index": 2, "leader": "0ld1ead0", "members": {"0ld1ead0": ""}}
                                               ).encode())
    joiner = Node("joiner", str(tmp_path))
    try:
        joiner.proc = subprocess.Popen([sys.executable, SERVER, "-p", str(joiner.port), "-hp", str(joiner.http_port),
                                        "-secret-file", path, "-join", answerer.address, "-join-timeout", "5",
                                        joiner.data_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = joiner.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = b"(still running: it took the answer)"
        assert joiner.proc.returncode == 1, out[-2000:]
        assert b"lacks the node keys of 0ld1ead0" in out, out[-2000:]
    finally:
        joiner.kill()
        answerer.close()


def voter(node: Node, node_id: str) -> bool:
    return members(node).get(node_id) == "voter"


def test_a_member_whose_configuration_is_behind_admits_the_leader_that_joined_meanwhile(tmp_path):
    """Review of edge3, finding 1: A, B, C voters; C down; D joins, is promoted and takes the leadership; C restarts
    with a configuration {A, B, C} that lacks D, so it refused D's key for good (a pre-candidate for ever, the
    cluster on 3 of 4 voters). Now C asks a member for the keys of its newest configuration (GET /cluster/keys,
    signed both ways) and admits D until its log holds that configuration: C catches up, and with A stopped
    D's writes commit only with C's acknowledgement (3 of 4 voters). A stranger's key is still refused, and the
    keys request is refused unsigned."""
    secret = b"lagging-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret.decode())
    a, b, c_, d = (Node(name, str(tmp_path)) for name in "abcd")
    cluster = LocalCluster(str(tmp_path), extra=("-secret-file", path), nodes=[a, b, c_, d])
    cluster.nodes = [a, b, c_]
    cluster.start()
    cluster.nodes.append(d)
    try:
        c_id = c_.status()["node_id"]
        c_.stop()
        d.start("-secret-file", path, join=a.address)
        d_id = d.status()["node_id"]
        wait_for(lambda: voter(a, d_id), 20, "D to become a voter")
        r = a.request("POST", f"/cluster/transfer?to={d_id}", headers=sign(secret, "POST", f"/cluster/transfer?to={d_id}"))
        assert r.status == 200, r
        assert d.request("POST", "/db/after", "v").status == 200
        # A and B follow D in D's term, and A's last request to the stopped C has been given up (the transport's
        # 0.5 s reply bound resets the socket) before C comes back: CI once saw C take A's queued term-2 append,
        # whose configuration names D, at its restart, and admit D without asking for keys.
        term = d.status()["term"]
        wait_for(lambda: all(n.status()["term"] == term and n.status()["leader"] == d_id for n in (a, b)), 10,
                 "A and B to follow D")
        time.sleep(1.5)
        c_.start("-secret-file", path)
        wait_for(lambda: c_.request("GET", "/db/after?consistency=stale").body == b"v", 20, "C to catch up")
        assert "vouched for the keys" in c_.log_text(current=True)
        # C's log now holds the configuration with D: the vouched list left node.key.
        wait_for(lambda: "vouched" not in node_key_of(c_), 10, "C to drop the vouched list")
        a.stop()
        assert d.request("POST", "/db/quorum", "needs C", timeout=15).status == 200
        assert wait_for(lambda: c_.request("GET", "/db/quorum?consistency=stale").body == b"needs C", 10, "C")
        assert dict((m["id"], m["match_index"]) for m in d.request("GET", "/cluster").json())[c_id] > 0

        # A stranger's key: refused, also after the refresh it set off (the lists name no stranger).
        from raftlib import RequestVote
        from raftlib.transport import new_node_key

        c_public = {m["id"]: m["public_key"] for m in d.request("GET", "/cluster").json()}[c_id]
        for _ in range(2):
            assert send_raw(new_node_key(), c_public, c_.port, [RequestVote("x", c_id, 99, 0, 0)]) == "no answer"
            time.sleep(2.5)
        assert c_.status()["term"] < 99
        r = c_.request("GET", "/cluster/keys", headers={"X-Raftdzmq-Nonce": "ab" * 16, "X-Raftdzmq-Node": c_id})
        assert r.status == 403 and "no signature" in r.text, r
    finally:
        cluster.stop()


def test_a_join_into_a_log_longer_than_one_batch_keeps_admitting_its_leader(tmp_path):
    """Review of edge3, finding 2: B joined A after 2.5 MiB of writes and took the leadership; D joined through B.
    B's first append to D (one 1 MiB batch) ended with the configuration at index 1, {A}: D dropped the join
    answer's keys there and refused B's frames for good ("a removed member"), never promoted. Now the join's keys
    count until D's log holds the configuration that added D (the answer's index): D catches up and is promoted."""
    secret = b"biglog-s3cret-of-the-cluster"
    path = secret_file(tmp_path, "s", secret.decode())
    a, b, d = (Node(name, str(tmp_path)) for name in "abd")
    cluster = LocalCluster(str(tmp_path), extra=("-secret-file", path), nodes=[a])
    cluster.start()
    cluster.nodes += [b, d]
    try:
        for i in range(5):
            assert a.request("POST", f"/db/big{i}", b"x" * 500_000, timeout=15).status == 200
        b.start("-secret-file", path, join=a.address)
        b_id = b.status()["node_id"]
        wait_for(lambda: voter(a, b_id), 20, "B to become a voter")
        r = a.request("POST", f"/cluster/transfer?to={b_id}", headers=sign(secret, "POST", f"/cluster/transfer?to={b_id}"))
        assert r.status == 200, r
        d.start("-secret-file", path, join=b.address)
        d_id = d.status()["node_id"]
        wait_for(lambda: voter(b, d_id), 30, "D to be promoted")
        wait_for(lambda: d.request("GET", "/db/big4?consistency=stale").body == b"x" * 500_000, 10, "D's copy")
        assert "a removed member" not in d.log_text()
        wait_for(lambda: "vouched" not in node_key_of(d), 10, "D to drop the join's list")
    finally:
        cluster.stop()


def test_keys_rounds_back_off_while_they_find_nothing_newer():
    """Review of edge5, finding 3: a removed member (or a stranger) dialling in made a node ask every member for
    keys every 2 s, for ever. The pause between rounds doubles (2, 4, 8, 16 s, then 30 s) while rounds find
    nothing newer, and is 2 s again after one that does."""
    from raftlib.server.node import KeysRefresh

    refresh, now, starts = KeysRefresh(), 0.0, []
    while now < 120.0:
        if refresh.due(now):
            starts.append(now)
            refresh.round_done(found_newer=False)
        now += 0.5  # a refused key every half second
    assert [b - a for a, b in zip(starts, starts[1:])][:6] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0], starts
    refresh.round_done(found_newer=True)
    assert not refresh.due(starts[-1] + 1.9) and refresh.due(starts[-1] + 2.0)
