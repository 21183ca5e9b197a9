"""Issue 14 part 2 through real processes (3 nodes): leases and TTL keys. A TTL key vanishes after its TTL and not
before; a lease kept alive through a leader's SIGKILL keeps its keys (the new leader gives it its full TTL again);
revoke, keepalive after expiry, GET /lease and /lease/ID, the routes' errors."""

from __future__ import annotations

import json
import re
import time

import pytest

from procs import LocalCluster, Node, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("lease"))).start()
    wait_for(lambda: all(n.status()["cluster_feature_level"] >= 2 for n in c.running()), 10, "level 2")
    yield c
    c.stop()


def metric(node: Node, name: str) -> float:
    """The sum of a metric's samples on `node`'s /metrics."""
    text = node.request("GET", "/metrics").text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_a_ttl_key_vanishes_after_its_ttl_and_not_before(cluster):
    leader = cluster.leader()
    expired_before = metric(leader, "raftdzmq_lease_expirations_total")
    sent = time.monotonic()
    r = leader.request("POST", "/db/svc/web?ttl=2", "10.0.0.1:80")
    assert r.status == 200 and r.headers["x-raft-lease"] == r.headers["x-raft-index"]
    lease_id = r.headers["x-raft-lease"]
    time.sleep(1.0)  # TTL/2: still there, on every node
    for n in cluster.running():
        assert n.request("GET", "/db/svc/web").text == "10.0.0.1:80"
    info = leader.request("GET", f"/lease/{lease_id}").json()
    assert info["id"] == lease_id and info["ttl"] == 2 and info["keys"] == ["svc/web"] and info["key_count"] == 1
    assert 0 < info["remaining"] <= 1.05
    gone = wait_for(lambda: leader.request("GET", "/db/svc/web").status == 404 and time.monotonic(), 10,
                    "the TTL key to vanish")
    assert gone - sent >= 2.0, f"vanished {gone - sent:.2f}s after the put, before its TTL of 2 s"
    for n in cluster.running():  # an ordinary entry: every node applied it
        wait_for(lambda n=n: n.request("GET", "/db/svc/web?consistency=stale").status == 404, 5, "followers")
    assert metric(leader, "raftdzmq_lease_expirations_total") == expired_before + 1
    assert leader.request("POST", f"/lease/{lease_id}/keepalive").status == 404  # keepalive after expiry
    assert leader.request("GET", f"/lease/{lease_id}").status == 404


def test_grant_attach_list_revoke_and_errors(cluster):
    leader = cluster.leader()
    follower = next(n for n in cluster.running() if n is not leader)
    r = leader.request("POST", "/lease?ttl=60")
    assert r.status == 200 and r.json() == {"id": r.headers["x-raft-index"], "ttl": 60}
    lease_id = r.json()["id"]
    assert leader.request("POST", "/db/lock/b?lease=" + lease_id, "me").status == 200
    assert leader.request("POST", "/db/lock/a?lease=" + lease_id, "me").status == 200
    body = {"compare": [{"key": "lock/a", "target": "lease", "op": "==", "value": lease_id}],
            "success": [{"op": "put", "key": "lock/c", "value": "me", "lease": lease_id}], "failure": []}
    r = leader.request("POST", "/txn", json.dumps(body))
    assert r.status == 200 and r.json()["succeeded"] is True
    r = leader.request("POST", f"/lease/{lease_id}/keepalive")
    assert r.status == 200 and r.json() == {"id": lease_id, "ttl": 60}
    info = leader.request("GET", f"/lease/{lease_id}").json()
    assert info["keys"] == ["lock/a", "lock/b", "lock/c"] and 59 < info["remaining"] <= 60
    listed = leader.request("GET", "/lease").json()
    assert {"id": lease_id, "ttl": 60} in [{k: v for k, v in item.items() if k != "remaining"}
                                           for item in listed["leases"]] and listed["next"] is None
    r = follower.request("POST", f"/lease/{lease_id}/keepalive")  # the leader's: followers redirect as for writes
    assert r.status == 307 and r.headers["location"].endswith(f":{leader.http_port}/lease/{lease_id}/keepalive")
    assert follower.request("GET", "/lease").status == 307
    assert leader.request("POST", "/db/lock/a", "free").status == 200  # a put without a lease detaches it
    r = leader.request("DELETE", f"/lease/{lease_id}")
    assert r.status == 200 and r.json()["deleted"] == 2
    assert [leader.request("GET", f"/db/lock/{k}").status for k in "abc"] == [200, 404, 404]
    assert leader.request("DELETE", f"/lease/{lease_id}").status == 404
    assert leader.request("POST", f"/lease/{lease_id}/keepalive").status == 404
    # Errors: one line each.
    for method, target, status, says in (
            ("POST", "/lease?ttl=0", 400, "ttl must be whole seconds"),
            ("POST", "/lease?ttl=1.5", 400, "ttl must be whole seconds"),
            ("POST", "/lease", 400, "ttl must be whole seconds"),
            ("POST", "/lease/abc/keepalive", 400, "a lease id is a positive decimal number"),
            ("GET", "/lease/0", 400, "a lease id"),
            ("POST", "/db/k?lease=999999", 404, "lease 999999 not found"),
            ("POST", "/db/k?lease=1&ttl=5", 400, "lease and ttl go alone"),
            ("POST", "/db/k?ttl=5&prev_index=0", 400, "lease and ttl go alone")):
        r = leader.request(method, target, "v")
        assert (r.status, r.text.count("\n")) == (status, 1) and says in r.text, (target, r)
    body["compare"], body["success"][0]["lease"] = [], "999999"
    r = leader.request("POST", "/txn", json.dumps(body))
    assert r.status == 404 and "lease 999999 not found" in r.text
    assert leader.request("GET", "/db/lock/c").status == 404  # the txn applied as nothing


def test_a_lease_kept_alive_keeps_its_keys_through_a_leader_kill(tmp_path):
    """A client keeps a lease of TTL 3 s alive every second for 3x its TTL, during which the leader is SIGKILLed
    once the TTL has passed since the grant: the new leader gives the lease its full TTL from its election, so the
    key stays. (Fails when the reset is removed: checked.)"""
    c = LocalCluster(str(tmp_path)).start()
    try:
        wait_for(lambda: all(n.status()["cluster_feature_level"] >= 2 for n in c.running()), 10, "level 2")
        leader = c.leader()
        r = leader.request("POST", "/db/svc/db?ttl=3", "primary")
        assert r.status == 200
        lease_id = r.headers["x-raft-lease"]
        for n in c.running():  # the loop below reads each node's own state (stale): first every node holds the key
            wait_for(lambda n=n: n.request("GET", "/db/svc/db?consistency=stale").status == 200, 5, "the put applied")
        t0, killed = time.monotonic(), False

        def keepalive():
            for n in c.running():
                try:
                    r = n.request("POST", f"/lease/{lease_id}/keepalive", timeout=2)
                except OSError:
                    continue
                assert r.status != 404, f"the lease expired while kept alive ({time.monotonic() - t0:.1f}s in)"
                if r.status == 200:
                    return time.monotonic()
            return None

        last = t0
        while time.monotonic() - t0 < 9.0:
            sent = time.monotonic()
            if wait_for(keepalive, 5, "a keepalive answered"):  # an election under load can take seconds
                last = sent
            if not killed and time.monotonic() - t0 > 3.5:
                leader.kill()  # after the TTL since the grant: only keepalives keep it
                killed = True
            present = [n.request("GET", "/db/svc/db?consistency=stale").status for n in c.running()]
            assert present == [200] * len(present), f"the key vanished {time.monotonic() - t0:.1f}s in"
            time.sleep(max(0.0, 1.0 - (time.monotonic() - sent)))
        new = c.leader()
        assert new is not leader and new.request("GET", "/db/svc/db").text == "primary"
        # Left alone, it goes after its TTL from the last keepalive answered (and not before).
        gone = wait_for(lambda: new.request("GET", "/db/svc/db").status == 404 and time.monotonic(), 10, "expiry")
        assert gone - last >= 3.0
    finally:
        c.stop()
