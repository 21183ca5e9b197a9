"""A flood of frames on a leader's Raft port, driven through real processes: junk, and well-formed frames from a
node that is no member. The REP greenlet served queued frames back to back without a turn of the loop, so the
leader's heartbeats did not go out while the flood lasted and its followers elected another (review of
restart1m). Now it yields a turn every transport.SERVE_TURN_SECONDS of serving: the leader keeps its term and
answers writes throughout, and the junk is dropped and logged."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from procs import ROOT, LocalCluster, wait_for

sys.path.insert(0, os.path.join(ROOT, "bench"))
from raft_port_flood import FLOODER  # noqa: E402  (the bench's flooder: bench/raft_port_flood.py)

# Connections, each keeping PIPELINE frames queued on the port (DEALER sockets: a REQ socket has one out, and 64 of
# them kept the queue full only now and then). Fewer than the port's cap (transport.MAX_INBOUND_CONNECTIONS, 32):
# past it the connections that never sent a valid frame are shut down, and the junk flood dies with them.
SENDERS = 24
PIPELINE = 50
FLOOD_SECONDS = 4.0  # 7-13 election timeouts (300-600 ms at the tests' -election-ms 300: procs.TEST_ELECTION_MS)
WRITE_BOUND_SECONDS = 3.0  # each write during the flood: a bound, not a speed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("flood"))).start()
    yield c
    c.stop()


@pytest.mark.parametrize("kind", ["junk", "ghost"])
def test_a_flood_on_the_raft_port_neither_deposes_the_leader_nor_holds_up_its_writes(cluster, kind):
    leader = cluster.leader()
    st = leader.status()
    term, leader_id = st["term"], st["node_id"]
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, ROOT, str(leader.port), leader_id, kind,
                                str(SENDERS), str(PIPELINE), str(FLOOD_SECONDS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        latencies: list[float] = []
        failures: list[str] = []
        end = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = leader.request("POST", f"/db/flood-{kind}", str(len(latencies)), timeout=WRITE_BOUND_SECONDS)
                if r.status != 200:
                    failures.append(f"{r.status} {r.text[:200]}")
            except OSError as e:
                failures.append(f"no answer: {e}")
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        out, err = flooder.communicate(timeout=30)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(timeout=10)
    assert flooder.returncode == 0, err[-2000:]
    terms = {n.name: (n.status()["term"], n.status()["role"]) for n in cluster.running()}
    lag = [line for line in leader.request("GET", "/metrics").text.splitlines() if "hub_lag_seconds_bucket" in line]
    assert leader.status()["term"] == term and leader.status()["role"] == "leader", (terms, lag)
    assert not failures and max(latencies) < WRITE_BOUND_SECONDS, (failures, max(latencies), lag)
    assert len(latencies) >= 10  # writes went on during the flood
    answered = int(out)
    assert answered > 2000, f"the flood did not happen: {answered} frames answered"  # 5,000-10,000 a second here
    if kind == "junk":
        wait_for(lambda: "dropped a bad frame on the raft port" in leader.log_text(current=True), 5, "the warning")
    assert not leader.exited()
