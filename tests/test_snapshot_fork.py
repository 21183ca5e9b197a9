"""Snapshots taken by a forked child (issue 13), with real processes (tests/procs.py): leaders and followers
snapshot under writes, a new node catches up by InstallSnapshot streamed from the leader's file, and a node
SIGKILLed while its child writes restarts on the same ports and data dir with nothing acknowledged lost. The first
also in the stepped mode (the default from feature level 3: written by the serving process a step at a time)."""

from __future__ import annotations

import os
import re
import time

import pytest
from procs import LocalCluster, Node, wait_for

THRESHOLD = ("-snapshot-threshold", "20000", "-snapshot-mode", "fork")
STEPPED = ("-snapshot-threshold", "20000", "-snapshot-mode", "stepped")


def _write_many(cluster: LocalCluster, prefix: str, count: int) -> dict[str, str]:
    written = {}
    for i in range(count):
        key, value = f"{prefix}{i:05d}", f"v{i}-" + "x" * 60
        cluster.write(key, value)
        written[key] = value
    return written


def _check_every_key(node: Node, written: dict[str, str]) -> None:
    """Every key written, read stale from `node` once it is not restoring its snapshot (a restarted node answers
    stale reads 503 until then: review of fastrestore, Q2)."""
    wait_for(lambda: not node.status()["restoring"], 30, f"{node.name} to restore its snapshot")
    for key, value in written.items():
        r = node.request("GET", f"/db/{key}?consistency=stale")
        assert (r.status, r.text) == (200, value), (node.name, key, r)


def _snapshot_children(node: Node) -> list[int]:
    return [int(pid) for pid in re.findall(r"snapshot child (\d+) writing", node.log_text())]


@pytest.mark.parametrize("flags", [THRESHOLD, STEPPED], ids=["fork", "stepped"])
def test_leader_and_followers_snapshot_in_children_and_a_new_node_catches_up_from_the_file(tmp_path, flags):
    c = LocalCluster(str(tmp_path), size=3, extra=flags).start()
    try:
        written = _write_many(c, "k", 400)
        for n in c.nodes:
            wait_for(lambda n=n: n.status()["snapshot_index"] > 0, 20, f"a snapshot on {n.name}")
            if flags is THRESHOLD:
                assert _snapshot_children(n), f"{n.name} took no snapshot in a child:\n{n.log_text()}"
            else:
                assert "by steps" in n.log_text() and not _snapshot_children(n), n.log_text()
            assert "took a snapshot at index" in n.log_text()
        written.update(_write_many(c, "m", 50))  # after the snapshots: the log goes on past them
        late = Node("node.4", str(tmp_path))
        c.nodes.append(late)
        late.start(*flags, join=c.leader().address)
        wait_for(lambda: "installed a snapshot" in late.log_text(), 30, "node.4 to install a snapshot")
        leader_commit = c.leader().status()["commit_index"]
        wait_for(lambda: late.status()["applied_index"] >= leader_commit, 30, "node.4 to catch up")
        for n in c.nodes:
            _check_every_key(n, written)
        # And it restarts from the snapshot it received (its file), still holding every key.
        late.stop()
        late.start(*flags)
        _check_every_key(late, written)
    finally:
        c.stop()


def test_a_node_killed_while_its_snapshot_child_writes_restarts_on_its_ports_with_nothing_lost(tmp_path):
    """The child sleeps 30 s before writing (a test-only variable); the parent is SIGKILLed meanwhile. The child
    must die with it (PR_SET_PDEATHSIG) and hold none of its ports or its data dir's lock: the node restarts on
    the same ports and dir at once, and every acknowledged write is there."""
    node = Node("node.1", str(tmp_path))
    env = {"RAFTDZMQ_TEST_SNAPSHOT_CHILD_DELAY_SECONDS": "30"}
    node.start(*THRESHOLD, env=env)
    c = LocalCluster(str(tmp_path), nodes=[node])
    try:
        wait_for(lambda: node.status()["role"] == "leader", 10, "the node to lead")
        written = {}
        deadline = time.monotonic() + 30
        while not _snapshot_children(node):
            assert time.monotonic() < deadline, "no snapshot child started"
            written.update(_write_many(c, f"a{len(written)}-", 20))
        child = _snapshot_children(node)[0]
        # While it writes, the child holds none of its parent's sockets (the listeners, zmq's) nor the data dir's
        # files: it closed every inherited descriptor (snapfork review, finding 3: the ports were freed by
        # PR_SET_PDEATHSIG alone, so the restart below passed with the closing removed; this does not).
        assert _sockets(node.proc.pid), "the parent holds no socket?"
        wait_for(lambda: not _sockets(child), 5, f"the child to close its parent's sockets: {_descriptors(child)}")
        assert not [t for fd, t in _descriptors(child).items() if fd > 2 and t.startswith(str(tmp_path))], _descriptors(child)
        written.update(_write_many(c, "b", 20))  # acknowledged while the child runs
        assert node.status()["snapshot_index"] == 0  # the child sleeps: nothing committed yet
        node.kill()
        wait_for(lambda: not _alive(child), 5, f"the snapshot child {child} to die with its parent")
        node.start(*THRESHOLD)  # same ports, same data dir
        wait_for(lambda: node.status()["role"] == "leader", 10, "the restarted node to lead")
        _check_every_key(node, written)
        assert not [f for f in os.listdir(node.data_dir) if f.endswith(".tmp")]  # the child's file: deleted
    finally:
        c.stop()


def _descriptors(pid: int) -> dict[int, str]:
    """What each of the process's descriptors points at (/proc/PID/fd)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass  # closed meanwhile
    return out


def _sockets(pid: int) -> set[str]:
    return {t for t in _descriptors(pid).values() if t.startswith("socket:")}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
