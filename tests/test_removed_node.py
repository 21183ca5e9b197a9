"""A node removed from the cluster and restarted on its old data dir, through real processes: it learns that it
was removed (issue 11 item 10), says so in its log, its HTTP answers and /status, and disturbs nobody."""

from __future__ import annotations

import time

from procs import LocalCluster, wait_for


def test_a_removed_node_restarted_on_its_dir_says_so_and_disturbs_nobody(tmp_path):
    c = LocalCluster(str(tmp_path)).start()
    try:
        leader = c.leader()
        before = leader.status()
        victim = next(n for n in c.nodes if n is not leader)
        r = leader.request("DELETE", f"/cluster/{victim.status()['node_id']}")
        assert r.status == 200, r
        index = int(r.headers["x-raft-index"])
        victim.kill()
        victim.start()  # its log still holds the configuration with itself in it, never the removal
        status = wait_for(lambda: (s := victim.status())["removed"] and s, 15, "the removed node to be told")
        assert status["removed"] == {"by": before["node_id"], "index": index}
        want = f"this node was removed from the cluster (by {before['node_id']} at or before index {index})"
        for method, path in (("GET", "/db/k"), ("POST", "/db/k"), ("GET", "/db/k?consistency=lease")):
            r = victim.request(method, path, b"v" if method == "POST" else None, timeout=5)
            assert (r.status, r.text.strip()) == (410, want), (method, path, r)
        assert victim.request("GET", "/db/k?consistency=stale").status == 404  # its own memory, as always
        assert "this node was removed from the cluster" in victim.log_text()
        time.sleep(1.0)  # several of its election timeouts: it asks for pre-votes and is told, nothing more
        after = c.leader().status()
        assert (after["node_id"], after["term"]) == (before["node_id"], before["term"])
        assert c.write("k", "v").status == 200
    finally:
        c.stop()
