"""Disk faults: a data dir on a small tmpfs that fills up (ENOSPC), an fsync that fails (fsyncgate), and a process
that runs out of file descriptors (EMFILE) when it takes a snapshot."""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import subprocess
import sys
import time

import pytest

from procs import LocalCluster, Node, wait_for

from raftlib.server.store import FEATURE_LEVEL

HERE = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def small_disk(path: str, size: str):
    os.makedirs(path)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", path], check=True)
    finally:
        subprocess.run(["umount", "-l", path])


VALUE = b"v" * 60_000


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_full_disk_refuses_writes_then_recovers_without_losing_any(tmp_path):
    mount = os.path.join(tmp_path, "small")
    with small_disk(mount, "1m") as resize:
        node = Node("node.1", mount)
        node.log_path = os.path.join(tmp_path, "node.1.log")  # the log stays off the small disk
        node.start()
        try:
            wait_for(lambda: node.status()["role"] == "leader", 10, "leadership")
            acknowledged, refused = [], None
            for i in range(40):
                r = node.request("POST", f"/db/k{i}", VALUE)
                if r.status == 200:
                    acknowledged.append(i)
                else:
                    refused = r
                    break
            assert refused is not None, "the disk never filled"
            # Refused with a clear answer (the batch that hit the wall may instead time out: outcome unknown).
            if refused.status == 503:
                assert "unknown" in refused.text, refused
                refused = node.request("POST", "/db/after", VALUE)
            assert refused.status == 507 and "disk" in refused.text and "full" in refused.text, refused
            assert node.status()["disk_full"] is True and not node.exited()
            assert "refusing writes" in node.log_text()
            # Reads still work while full.
            assert node.request("GET", f"/db/k{acknowledged[-1]}?consistency=stale").body == VALUE

            resize("16m")
            wait_for(lambda: node.request("POST", "/db/later", b"back").status == 200, 15, "writes to work again")
            assert node.status()["disk_full"] is False
            assert "the disk has room again" in node.log_text()

            node.kill()  # SIGKILL: every acknowledged write must come back, and the log must read cleanly
            node.start()
            wait_for(lambda: node.status()["role"] == "leader", 10, "leadership after the restart")
            for i in acknowledged:
                assert node.request("GET", f"/db/k{i}").body == VALUE, i
            assert node.request("GET", "/db/later").body == b"back"
            assert "Traceback" not in node.log_text() and "corrupt" not in node.log_text().lower()
        finally:
            node.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_follower_with_a_full_disk_does_not_stop_the_cluster_and_catches_up(tmp_path):
    mount = os.path.join(tmp_path, "small")
    with small_disk(mount, "1m") as resize:
        nodes = [Node("node.1", str(tmp_path)), Node("node.2", str(tmp_path)), Node("node.3", mount)]
        nodes[2].log_path = os.path.join(tmp_path, "node.3.log")
        c = LocalCluster(str(tmp_path), nodes=nodes).start()
        try:
            leader = c.leader()
            assert leader is not nodes[2]
            for i in range(40):  # 2.4 MB: more than node.3's disk holds
                assert leader.request("POST", f"/db/k{i}", VALUE).status == 200, i
            wait_for(lambda: nodes[2].status()["disk_full"], 10, "node.3 to notice its full disk")
            assert not nodes[2].exited()
            resize("16m")
            wait_for(lambda: nodes[2].status()["applied_index"] >= leader.status()["commit_index"], 20,
                     "node.3 to catch up")
            assert nodes[2].request("GET", "/db/k39?consistency=stale").body == VALUE
            assert nodes[2].status()["disk_full"] is False
        finally:
            c.stop()


def test_a_failing_fsync_stops_the_node_without_acknowledging():
    out = subprocess.run([sys.executable, os.path.join(HERE, "fsync_failure_harness.py")], capture_output=True,
                         text=True, timeout=60, cwd=os.path.dirname(HERE),
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines.get("acknowledged-before") == "5", out.stdout + out.stderr
    assert lines.get("failing-write") == "Stopped", out.stdout + out.stderr
    # A write after the node stopped is refused before it is queued: NotRunning (a Stopped; X-Raft-Outcome
    # not-applied at the HTTP edge), never acknowledged.
    assert lines.get("later-write") == "NotRunning", out.stdout + out.stderr
    assert lines.get("fatal") == "OSError 5", out.stdout + out.stderr
    assert lines.get("reopened-entries") == "5", out.stdout + out.stderr


# ---- out of file descriptors (the attacker review) ---------------------------------------------------------------


def lowest_free_descriptor(pid: int) -> int:
    taken = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(taken) + 1)) - taken)


@contextlib.contextmanager
def descriptor_limit(pid: int, soft: int):
    """Lower the running process's soft RLIMIT_NOFILE to `soft` (its descriptors above stay open; it can open no
    new one numbered `soft` or more); back to what it was on leaving. The hard limit is left alone, so no
    privilege is needed either way."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)


class KeepAlive:
    """One HTTP/1.1 connection, opened before the node's descriptors run out (it can accept no new one then)."""

    def __init__(self, node: Node) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)

    def post(self, key: str, value: bytes) -> int:
        self.conn.request("POST", f"/db/{key}", body=value)
        r = self.conn.getresponse()
        r.read()
        return r.status


def test_a_node_with_no_descriptor_left_at_a_snapshot_serves_on_and_loses_nothing(tmp_path):
    """The attacker review: with every descriptor taken, the next snapshot's temporary file failed with EMFILE and
    the node exited (code 3), an availability loss for a failure that changed nothing on the disk. Here the soft
    limit is lowered to 3 (stdin, stdout and stderr: nothing more can be opened, the reserve descriptor included)
    while writes cross the snapshot threshold: every write is acknowledged, the snapshot waits, and is taken once
    descriptors are back; after a SIGKILL every acknowledged write is there. The feature level's raise (a new
    leader's first act in a cluster of this release) asks for a snapshot of its own: the test waits for it before
    it lowers the limit, or that snapshot, taken at any time around the lowering, made the test flaky (2 of 5 runs
    on main)."""
    node = Node("node.1", str(tmp_path))
    node.start("-snapshot-threshold", "20000")
    try:
        wait_for(lambda: node.status()["role"] == "leader", 10, "leadership")
        wait_for(lambda: node.status()["cluster_feature_level"] == FEATURE_LEVEL, 10, "the feature level's raise")
        wait_for(lambda: "took a snapshot" in node.log_text(), 10, "the raise's snapshot")
        taken = node.log_text().count("took a snapshot")
        client = KeepAlive(node)
        assert client.post("k0", b"0" * 1000) == 200
        acknowledged = ["k0"]
        with descriptor_limit(node.proc.pid, 3):
            for i in range(1, 40):  # 40 KB: past the threshold
                assert client.post(f"k{i}", str(i).encode() * 1000) == 200, i
                acknowledged.append(f"k{i}")
            assert not node.exited()
            wait_for(lambda: "could not write a snapshot: no file descriptor free" in node.log_text(), 5,
                     "the refused snapshot to be logged")
        assert node.log_text().count("took a snapshot") == taken
        deadline = time.monotonic() + 15  # the snapshot is tried again 5 s after it was refused
        while node.log_text().count("took a snapshot") == taken and time.monotonic() < deadline:
            assert client.post("later", b"later") == 200
            time.sleep(0.2)
        assert node.log_text().count("took a snapshot") > taken
        assert node.status()["snapshot_index"] > 0 and not node.exited()
        assert "storage failed" not in node.log_text() and "Traceback" not in node.log_text()
        node.kill()
        node.start()
        wait_for(lambda: node.status()["role"] == "leader", 10, "leadership after the restart")
        for key in acknowledged:
            i = int(key[1:])
            assert node.request("GET", f"/db/{key}").body == str(i).encode() * 1000, key
    finally:
        node.kill()


def test_the_reserve_descriptor_lets_a_snapshot_through_when_the_process_has_none_left(tmp_path):
    """The soft limit lowered to the process's lowest free descriptor: it can open nothing, but the storage gives
    up its reserve descriptor for the snapshot's files (and gets it back), so the snapshot is taken at once, and no
    write or snapshot ever waits. (gevent's os.close closes a device's descriptor only a loop turn later: the
    reserve must be closed with the real close, or the retried open finds no descriptor free.) The raise's own
    snapshot is waited for first: it would otherwise satisfy the wait below before the threshold's is tried."""
    node = Node("node.1", str(tmp_path))
    node.start("-snapshot-threshold", "20000")
    try:
        wait_for(lambda: node.status()["role"] == "leader", 10, "leadership")
        wait_for(lambda: node.status()["cluster_feature_level"] == FEATURE_LEVEL, 10, "the feature level's raise")
        wait_for(lambda: "took a snapshot" in node.log_text(), 10, "the raise's snapshot")
        taken = node.log_text().count("took a snapshot")
        client = KeepAlive(node)
        assert client.post("k0", b"0" * 1000) == 200
        with descriptor_limit(node.proc.pid, lowest_free_descriptor(node.proc.pid)):
            for i in range(1, 26):  # 26 KB: past the threshold once
                assert client.post(f"k{i}", b"v" * 1000) == 200, i
            wait_for(lambda: node.log_text().count("took a snapshot") > taken, 5,
                     "a snapshot while no descriptor is free")
            assert not node.exited()
        # Nothing the snapshot or the log opens was refused; the garbage job (after the snapshot) has no reserve:
        # with no descriptor for the folders it unlinks whole and says so (review r30 L-a), which is not a refusal.
        refused = [line for line in node.log_text().splitlines()
                   if "no file descriptor free" in line and "unlinking the garbage" not in line]
        assert not refused, refused
    finally:
        node.kill()
