"""A follower stopped (SIGSTOP) while the leader writes and snapshots, on real processes: resumed, it catches up
from the entries the leader keeps behind its snapshot's cut (-snapshot-catch-up-entries, etcd's
SnapshotCatchUpEntries) with no snapshot installed; with the flag 0 it is sent the snapshot."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import pytest

from procs import SERVER, LocalCluster, free_port, metric_samples, paused, wait_for

VALUE_BYTES = 64 << 10
# 3 MiB while the follower is stopped: past the leader's window of appends in flight to it (2 MiB by default), so
# that the entries it needs are behind the leader's snapshots (one every 1 MiB of log), and within the 8 MiB kept.
WRITES = 48
KEYS = 16
WRITERS = 4


def _counter(node, name: str) -> float:
    return metric_samples(node.request("GET", "/metrics", timeout=5).text)[f"raftdzmq_{name}_total"]


def _kept(node) -> tuple[int, int]:
    """The entries a node keeps behind its snapshot's cut, (how many, their bytes), as GET /status gives them,
    checked equal to its /metrics gauges (review cu2, Q2: neither showed them)."""
    st = node.status()
    samples = metric_samples(node.request("GET", "/metrics", timeout=5).text)
    kept = (st["snapshot_catch_up_entries"], st["snapshot_catch_up_bytes"])
    assert (samples["raftdzmq_snapshot_catch_up_entries"], samples["raftdzmq_snapshot_catch_up_bytes"]) == kept
    return kept


@pytest.mark.parametrize("catch_up_entries, installs", [(None, False), ("0", True)])
def test_a_follower_stopped_while_the_leader_snapshots_catches_up_from_the_entries_behind_the_cut(
        tmp_path, catch_up_entries, installs):
    extra = ("-snapshot-threshold", str(1 << 20), "-snapshot-log-ratio", "0", "-election-ms", "3000")
    if catch_up_entries is not None:
        extra += ("-snapshot-catch-up-entries", catch_up_entries)
    c = LocalCluster(str(tmp_path), extra=extra).start()
    try:
        for i in range(KEYS):
            c.write(f"k{i}", b"-")
        leader = c.leader()
        term = leader.status()["term"]
        follower = next(n for n in c.nodes if n is not leader)
        wait_for(lambda: follower.status()["applied_index"] == leader.status()["commit_index"], 10,
                 "the follower caught up before its stop")
        snapshots_before = leader.status()["snapshot_index"]
        installed_before = _counter(follower, "snapshots_installed")  # its join's, when it joined by one
        last: dict[str, bytes] = {}

        def write(n: int) -> int:
            return c.write(f"k{n % KEYS}", n.to_bytes(4, "big") * (VALUE_BYTES // 4), timeout=30).status

        with paused([follower]):
            with concurrent.futures.ThreadPoolExecutor(WRITERS) as pool:
                statuses = list(pool.map(write, range(WRITES)))
            st = leader.status()
            assert st["role"] == "leader" and st["term"] == term, (st["role"], st["term"], term)
            assert st["snapshot_index"] > snapshots_before, "the leader took no snapshot while the follower stopped"
        assert statuses == [200] * WRITES
        for n in range(WRITES - KEYS, WRITES):
            last[f"k{n % KEYS}"] = n.to_bytes(4, "big") * (VALUE_BYTES // 4)

        def caught_up() -> bool:
            return all(node.request("GET", f"/db/{key}?consistency=stale", timeout=5).body == value
                       for node in c.nodes for key, value in last.items())

        wait_for(caught_up, 60, "every key equal on every node", interval=0.5)
        installed = _counter(follower, "snapshots_installed") - installed_before
        from_behind_the_cut = _counter(leader, "snapshot_catch_up_appends")
        print(f"follower installed {installed:g} snapshots; leader sent {from_behind_the_cut:g} appends from behind "
              "its cut")
        if installs:
            assert installed >= 1 and from_behind_the_cut == 0
            assert _kept(leader) == (0, 0)
        else:
            assert installed == 0 and from_behind_the_cut >= 1
            # The leader snapshotted: it keeps entries behind its cut, writes of 64 KiB among them, within 8 MiB.
            entries, kept_bytes = _kept(leader)
            assert 0 < entries and VALUE_BYTES < kept_bytes <= 8 << 20, (entries, kept_bytes)
            leader.stop()
            leader.start(*c.extra)  # held in memory only: none after a restart
            assert _kept(leader) == (0, 0)
    finally:
        c.stop()


def test_a_negative_snapshot_catch_up_entries_is_refused_at_start(tmp_path):
    """A usage error (exit 2, one line), before any file."""
    data_dir = tmp_path / "d"
    ports = ("-p", str(free_port()), "-hp", str(free_port()))  # were it to start: never the default ports
    out = subprocess.run([sys.executable, SERVER, *ports, "-snapshot-catch-up-entries", "-1", str(data_dir)],
                         capture_output=True, text=True, timeout=30)
    [error] = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and error.endswith("-snapshot-catch-up-entries must be 0 or more (0: a follower behind "
                                                  "a snapshot's cut gets the snapshot)"), out
    assert not data_dir.exists()
