"""raftdzmqctl (raftlib/ctl.py) run as a subprocess against a real 3-node cluster (issue 15): bytes intact through
put and get, exit codes 0/1/2/3 with a one-line error, ls/del/txn/watch, leases, `lock -- COMMAND` (its exit
code and $RAFTDZMQ_LOCK_TOKEN), member list/transfer/remove, endpoint status/health (DATA SIZE from /status's
data_size); `snapshot save` from the real cluster (digest checked, the file restored with `raftdzmq -restore` and served by a node started on it),
signed for the node asked on a cluster with a secret (and refused unsigned), and against a stand-in server that
lies about the digest (nothing written)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from procs import ROOT, SERVER, LocalCluster, Node, paused, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("ctl"))).start()
    wait_for(lambda: all(n.status()["cluster_feature_level"] >= 2 for n in c.running()), 10, "feature level 2")
    yield c
    c.stop()


def ctl(cluster: LocalCluster | None, *args: str, stdin: bytes = b"", timeout: float = 30, endpoints=None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    if endpoints is None and cluster is not None:
        endpoints = ",".join(n.address for n in cluster.nodes)
    environ = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    if endpoints is not None:
        environ["RAFTDZMQ_ENDPOINTS"] = endpoints
    return subprocess.run([sys.executable, "-m", "raftlib.ctl", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=environ, cwd=ROOT)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    text = r.stderr.decode()
    assert text.startswith("raftdzmqctl: ") and text.count("\n") == 1, text
    return text


def test_put_from_stdin_and_get_keep_bytes_intact_and_exit_codes_say_what_happened(cluster):
    blob = bytes(range(256)) * 4 + b"\n\r\n"
    assert ctl(cluster, "put", "bin/blob", stdin=blob).returncode == 0
    r = ctl(cluster, "get", "bin/blob")
    assert r.returncode == 0 and r.stdout == blob
    r = ctl(cluster, "-w", "json", "put", "bin/text", "hello")
    assert r.returncode == 0 and json.loads(r.stdout)["index"] > 0
    got = json.loads(ctl(cluster, "-w", "json", "get", "bin/text").stdout)
    assert got["value"] == "hello" and got["create_index"] == got["modify_index"] > 0
    r = ctl(cluster, "put", "bin/text", "x", "--prev-index", str(got["modify_index"] - 1))
    assert r.returncode == 1 and "412" in one_line_error(r)
    r = ctl(cluster, "get", "bin/missing")
    assert r.returncode == 1 and "404" in one_line_error(r) and r.stdout == b""
    r = ctl(cluster, "frobnicate")
    assert r.returncode == 2 and "invalid choice" in one_line_error(r)
    r = ctl(cluster, "get")
    assert r.returncode == 2
    r = ctl(None, "--timeout", "1", "get", "x", endpoints="127.0.0.1:1")
    assert r.returncode == 1 and "could not connect" in one_line_error(r)
    r = ctl(None, "--endpoints", "localhost:notaport", "get", "x")
    assert r.returncode == 2 and "host:port" in one_line_error(r)


def test_keys_with_dot_segments_arrive_as_written(cluster):
    """Review edge3, Q1: raftdzmqctl writes through the client, whose URLs urllib3 rid of `.` and `..` segments:
    `put t1/../t2/k` wrote t2/k. Now every such key arrives as written."""
    keys = ("t1/../t2/k", "t1/./k", "t1/..")
    for key in keys:
        assert ctl(cluster, "put", key, key).returncode == 0, key
    for key in keys:
        r = ctl(cluster, "get", key)
        assert (r.returncode, r.stdout) == (0, key.encode()), key
    assert ctl(cluster, "ls", "t").stdout.decode().split() == sorted(keys)  # no t2/k, no t1/k
    assert ctl(cluster, "del", "t1/..").returncode == 0
    assert ctl(cluster, "ls", "t").stdout.decode().split() == sorted(keys[:2])


def test_ls_del_txn_and_a_watch(cluster):
    for key in ("ls/a", "ls/b", "ls/c"):
        assert ctl(cluster, "put", key, key.upper()).returncode == 0
    assert ctl(cluster, "ls", "ls/").stdout.decode().split() == ["ls/a", "ls/b", "ls/c"]
    assert json.loads(ctl(cluster, "-w", "json", "ls", "ls/").stdout) == ["ls/a", "ls/b", "ls/c"]
    assert ctl(cluster, "del", "ls/a").returncode == 0
    r = ctl(cluster, "del", "ls/a")
    assert r.returncode == 1 and "404" in one_line_error(r)
    body = json.dumps({"compare": [{"key": "ls/b", "target": "value", "op": "==", "value": "LS/B"}],
                       "success": [{"op": "get", "prefix": "ls/"}], "failure": []}).encode()
    r = ctl(cluster, "-w", "json", "txn", stdin=body)
    answer = json.loads(r.stdout)
    assert answer["succeeded"] and [kv["key"] for kv in answer["results"][0]["kvs"]] == ["ls/b", "ls/c"]
    r = ctl(cluster, "txn", stdin=b"{not json")
    assert r.returncode == 2
    start = json.loads(ctl(cluster, "-w", "json", "put", "wt/0", "zero").stdout)["index"]
    ctl(cluster, "put", "wt/1", "one")
    ctl(cluster, "put", "other", "x")
    ctl(cluster, "del", "wt/", "--prefix")
    watch = subprocess.Popen([sys.executable, "-m", "raftlib.ctl", "-w", "json", "watch", "wt/", "--prefix",
                              "--from", str(start - 1)], stdout=subprocess.PIPE, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": ROOT,
                                  "RAFTDZMQ_ENDPOINTS": ",".join(n.address for n in cluster.nodes)})
    try:
        events = [json.loads(watch.stdout.readline()) for _ in range(4)]
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=10)
    assert [(e["type"], e["key"], e.get("value")) for e in events] == [
        ("put", "wt/0", "zero"), ("put", "wt/1", "one"), ("delete", "wt/0", None), ("delete", "wt/1", None)]
    assert watch.returncode == 130


def test_leases_grant_keepalive_ls_revoke(cluster):
    granted = json.loads(ctl(cluster, "-w", "json", "lease", "grant", "30").stdout)
    lease_id = granted["id"]
    assert ctl(cluster, "put", "lz/k", "v", "--lease", str(lease_id)).returncode == 0
    r = ctl(cluster, "lease", "keepalive", str(lease_id), "--once")
    assert r.returncode == 0 and f"lease {lease_id} keepalived" in r.stdout.decode()
    assert lease_id in [int(info["id"]) for info in json.loads(ctl(cluster, "-w", "json", "lease", "ls").stdout)]
    r = ctl(cluster, "lease", "revoke", str(lease_id))
    assert r.returncode == 0 and "1 keys deleted" in r.stdout.decode()
    assert ctl(cluster, "get", "lz/k").returncode == 1
    assert ctl(cluster, "lease", "keepalive", str(lease_id), "--once").returncode == 1


def test_lock_runs_the_command_holding_the_lock_with_its_token_and_passes_its_exit_code(cluster):
    r = ctl(cluster, "lock", "locks/ctl", "--ttl", "5", "--", sys.executable, "-c",
            "import os, sys; print(os.environ['RAFTDZMQ_LOCK_TOKEN']); sys.exit(7)")
    assert r.returncode == 7, r.stderr
    token = int(r.stdout.decode())
    r = ctl(cluster, "lock", "locks/ctl", "--", sys.executable, "-c",
            "import os; print(os.environ['RAFTDZMQ_LOCK_TOKEN'])")
    assert r.returncode == 0 and int(r.stdout.decode()) > token
    assert ctl(cluster, "ls", "locks/ctl/").stdout == b""  # released: the lease and its key are gone


def test_a_write_whose_fate_is_open_exits_3(cluster):
    leader = cluster.leader()
    followers = [n for n in cluster.running() if n is not leader]
    # The value comes on stdin once the process waits for it (started and loaded): the put then reaches the leader
    # at once after the pause, before check-quorum makes it step down (which would be a not-applied 503, exit 1).
    put = subprocess.Popen([sys.executable, "-m", "raftlib.ctl", "--timeout", "0.5", "--endpoints", leader.address,
                            "put", "u/k"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT})
    try:
        wait_for(lambda: "pipe_read" in open(f"/proc/{put.pid}/wchan").read(), 30, "raftdzmqctl to read stdin")
        with paused(followers):
            put.stdin.write(b"v")
            put.stdin.close()
            put.wait(timeout=30)
    finally:
        if put.poll() is None:
            put.kill()
            put.wait()
    stderr = put.stderr.read().decode()
    assert put.returncode == 3 and stderr.count("\n") == 1 and "may have applied" in stderr, stderr


class SnapshotStandIn(http.server.BaseHTTPRequestHandler):
    """GET /snapshot as the ops branch's contract says: the bytes, X-Raft-Snapshot-Index, X-Raft-Snapshot-Sha256
    (a wrong one when the server's `lie` is set)."""

    def do_GET(self) -> None:
        body = self.server.body  # type: ignore[attr-defined]
        digest = hashlib.sha256(body + (b"x" if self.server.lie else b"")).hexdigest()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Raft-Snapshot-Index", "42")
        self.send_header("X-Raft-Snapshot-Sha256", digest)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_snapshot_save_checks_the_digest_and_writes_the_file_atomically(cluster, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SnapshotStandIn)
    server.body, server.lie = os.urandom(300_000), False  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"127.0.0.1:{server.server_address[1]}"
    target = str(tmp_path / "backup.snap")
    try:
        r = ctl(None, "-w", "json", "snapshot", "save", target, endpoints=endpoint)
        assert r.returncode == 0, r.stderr
        assert open(target, "rb").read() == server.body  # type: ignore[attr-defined]
        assert json.loads(r.stdout)["index"] == 42
        server.lie = True  # type: ignore[attr-defined]
        r = ctl(None, "snapshot", "save", str(tmp_path / "bad.snap"), endpoints=endpoint)
        assert r.returncode == 1 and "SHA-256" in one_line_error(r)
        assert sorted(os.listdir(tmp_path)) == ["backup.snap"]  # nothing half written, no temporary file left
    finally:
        server.shutdown()
        server.server_close()


def test_snapshot_save_from_the_cluster_restores_into_a_node_that_serves_the_keys(cluster, tmp_path):
    written = {f"snap/{i}": f"value {i} \x00\n".encode() for i in range(5)}
    indices = []
    for key, value in written.items():
        r = ctl(cluster, "-w", "json", "put", key, stdin=value)
        assert r.returncode == 0, r.stderr
        indices.append(json.loads(r.stdout)["index"])
    target = str(tmp_path / "backup.snap")
    r = ctl(cluster, "-w", "json", "snapshot", "save", target)
    assert r.returncode == 0, r.stderr
    saved = json.loads(r.stdout)
    data = open(target, "rb").read()
    assert saved["sha256"] == hashlib.sha256(data).hexdigest() and saved["bytes"] == len(data)
    assert saved["index"] >= max(indices)  # every acknowledged write is in it
    assert sorted(os.listdir(tmp_path)) == ["backup.snap"]  # no temporary file left
    (tmp_path / "nodes").mkdir()
    restored = Node("restored", str(tmp_path / "nodes"))
    try:
        done = subprocess.run([sys.executable, SERVER, "-restore", target, restored.data_dir], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and f"index {saved['index']}" in done.stdout, done
        restored.start()
        wait_for(lambda: restored.status()["role"] == "leader", 15, "the restored node to lead")
        for key, value in written.items():
            r = ctl(None, "get", key, endpoints=restored.address)
            assert (r.returncode, r.stdout) == (0, value), (key, r)
    finally:
        restored.kill()


def test_snapshot_save_signs_for_the_node_it_asks_on_a_cluster_with_a_secret(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret-of-the-ctl-cluster")
    (tmp_path / "nodes").mkdir()
    c = LocalCluster(str(tmp_path / "nodes"), extra=("-secret-file", str(secret))).start()
    try:
        assert ctl(c, "put", "signed/k", "v").returncode == 0
        follower = next(n for n in c.nodes if n is not c.leader())
        endpoints = ",".join([follower.address] + [n.address for n in c.nodes if n is not follower])
        for attempt in ("a.snap", "b.snap"):  # a fresh nonce each time: the second save is no replay
            r = ctl(None, "-w", "json", "--secret-file", str(secret), "snapshot", "save", str(tmp_path / attempt),
                    endpoints=endpoints)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["sha256"] == hashlib.sha256(open(tmp_path / attempt, "rb").read()).hexdigest()
        r = ctl(None, "snapshot", "save", str(tmp_path / "unsigned.snap"), endpoints=endpoints)
        assert r.returncode == 1 and "X-Raftdzmq-Nonce" in one_line_error(r), r
        r = ctl(None, "snapshot", "save", str(tmp_path / "wrong.snap"), endpoints=endpoints,
                env={"RAFTDZMQ_SECRET": "not-the-secret-of-this-cluster"})
        assert r.returncode == 1 and "403" in one_line_error(r), r
        assert not os.path.exists(tmp_path / "unsigned.snap") and not os.path.exists(tmp_path / "wrong.snap")
        r = ctl(c, "member", "transfer", c.nodes[0].status()["node_id"])  # unsigned: refused
        assert r.returncode == 1 and "403" in one_line_error(r), r
        target = follower.status()["node_id"]
        r = ctl(c, "--secret-file", str(secret), "member", "transfer", target)
        assert r.returncode == 0, r.stderr
        assert c.leader().status()["node_id"] == target
    finally:
        c.stop()


def test_member_list_endpoint_status_and_health_transfer_and_remove(cluster):
    members = json.loads(ctl(cluster, "-w", "json", "member", "list").stdout)
    assert len(members) == 3
    r = ctl(cluster, "endpoint", "status")
    assert r.returncode == 0 and r.stdout.decode().count("leader") == 1 and r.stdout.decode().count("follower") == 2
    statuses = json.loads(ctl(cluster, "-w", "json", "endpoint", "status").stdout)
    assert sorted(s["node_id"] for s in statuses) == sorted(m["id"] for m in members)
    assert all(s["lag"] is not None and s["lag"] >= 0 for s in statuses)
    assert all(isinstance(s["data_size"], int) and s["data_size"] > 0 for s in statuses), statuses
    table_rows = [line for line in r.stdout.decode().splitlines() if line.startswith("| ") and "DATA SIZE" not in line]
    assert len(table_rows) == 3 and all(not line.rstrip(" |").endswith("-") for line in table_rows), r.stdout
    health = json.loads(ctl(cluster, "-w", "json", "endpoint", "health").stdout)
    assert [h["health"] for h in health] == [True, True, True]
    leader = cluster.leader()
    follower_id = next(s["node_id"] for s in statuses if s["role"] == "follower")
    r = ctl(cluster, "member", "transfer", follower_id)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: cluster.leader().status()["node_id"] == follower_id, 10, "the transfer")
    leader.kill()
    r = ctl(cluster, "-w", "json", "endpoint", "health")
    assert r.returncode == 1 and sorted(h["health"] for h in json.loads(r.stdout)) == [False, True, True]
    r = ctl(cluster, "endpoint", "status")
    assert r.returncode == 1 and "unreachable" in r.stdout.decode()
    dead_id = next(m["id"] for m in members if m["http_address"].endswith(f":{leader.http_port}"))
    assert ctl(cluster, "member", "remove", dead_id).returncode == 0
    assert len(json.loads(ctl(cluster, "-w", "json", "member", "list").stdout)) == 2
