"""Disk faults: a data dir on a small tmpfs that fills up (ENOSPC), and an fsync that fails (fsyncgate)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from procs import LocalCluster, Node, wait_for

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
    assert lines.get("later-write") == "Stopped", out.stdout + out.stderr
    assert lines.get("fatal") == "OSError 5", out.stdout + out.stderr
    assert lines.get("reopened-entries") == "5", out.stdout + out.stderr
