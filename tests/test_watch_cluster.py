"""GET /watch through real processes (issue 14, watches): a stream on a follower sees exactly the committed changes
of its prefix written through the leader, a txn's and a prefix delete's events together under one index; after
that follower is killed, a reconnect to another node with Last-Event-ID misses nothing and repeats nothing; long
polls; 410 past a small -watch-history; a cluster of feature level 1 serves watches too. A node removed from the
cluster, or cut off from its leader for 3 election timeouts, ends its streams and long polls with the reason and
refuses new watches; a client's watch (raftlib.client, raftdzmqctl) then resumes on another member exactly."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from procs import ROOT, LocalCluster, Node, paused, wait_for
from raftlib.client import Client
from raftlib.server.watch import EVENT_OVERHEAD_BYTES
from raftlib.server.watchguard import MIN_LEADERLESS_SECONDS

HISTORY_EVENTS = 40  # about: -watch-history-bytes for 40 small events (-watch-history is at least 4096)
HISTORY_BYTES = HISTORY_EVENTS * (EVENT_OVERHEAD_BYTES + 8)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("watch")), extra=("-watch-history-bytes", str(HISTORY_BYTES))).start()
    wait_for(lambda: all(n.status()["cluster_feature_level"] >= 2 for n in c.running()), 10, "feature level 2")
    yield c
    c.stop()


class SseReader:
    """A watch stream read over http.client (chunked decoding), parsed into events; every read bounded by the
    socket's timeout."""

    def __init__(self, node: Node, target: str, headers: dict | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        self.conn.request("GET", target, headers=headers or {})
        self.response = self.conn.getresponse()
        self.last_id: int | None = None  # the id of the last whole group received, or the last position sent
        self.position: int | None = None  # the last position sent alone (watch.py's positions)
        self.error: dict | None = None  # the stream's last event, when it was ended

    def groups_until(self, index: int, deadline_seconds: float = 15.0) -> list[tuple[str, str, int]]:
        """(type, key, index) of every event received until a group with an id >= `index` is whole."""
        out, block = [], {}
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            line = self.response.readline().decode()
            if not line:
                raise EOFError("the stream ended")
            line = line.rstrip("\n")
            if line:
                name, _, value = line.partition(":")
                block[name] = value.strip()
                continue
            if block.get("event") == "error":
                self.error = json.loads(block["data"])
            elif "data" in block:
                event = json.loads(block["data"])
                assert event["type"] == block["event"]
                out.append((event["type"], event["key"], event["index"]))
            if "id" in block:
                self.last_id = int(block["id"])
                if "data" not in block:  # a position alone (the first chunk, a keep-alive): no event
                    self.position = self.last_id
                    block = {}
                    continue
                assert self.last_id == out[-1][2]
                if self.last_id >= index:
                    return out
            block = {}
        raise AssertionError(f"no event of index {index} within {deadline_seconds}s; got {out}")

    def close(self) -> None:
        self.conn.close()


def index_of(r) -> int:
    assert r.status == 200, r
    return int(r.headers["x-raft-index"])


def test_a_follower_streams_exactly_the_committed_changes_and_a_reconnect_elsewhere_resumes_them(cluster):
    leader = cluster.leader()
    follower, other = [n for n in cluster.running() if n is not leader]
    reader = SseReader(follower, "/watch?prefix=w/")
    assert reader.response.status == 200 and reader.response.getheader("Content-Type").startswith(
        "text/event-stream")
    expected = []
    i = index_of(leader.request("POST", "/db/w/a", "1"))
    expected.append(("put", "w/a", i))
    i = index_of(leader.request("POST", "/db/w/b", "2"))
    expected.append(("put", "w/b", i))
    index_of(leader.request("POST", "/db/x", "not watched"))
    i = index_of(leader.request("DELETE", "/db/w/a"))
    expected.append(("delete", "w/a", i))
    txn = {"success": [{"op": "put", "key": "w/c", "value": "3"}, {"op": "put", "key": "x2", "value": "-"},
                       {"op": "put", "key": "w/d", "value": "4"}]}
    i = index_of(leader.request("POST", "/txn", json.dumps(txn)))
    expected += [("put", "w/c", i), ("put", "w/d", i)]
    i = index_of(leader.request("DELETE", "/db/?prefix=w/"))
    expected += [("delete", "w/b", i), ("delete", "w/c", i), ("delete", "w/d", i)]
    assert reader.groups_until(i) == expected
    resume_after = reader.last_id
    follower.kill()
    later = []
    for key in ("w/e", "w/f"):
        later.append(("put", key, index_of(cluster.write(key, "5"))))
    later.append(("delete", "w/e", index_of(cluster.leader().request("DELETE", "/db/w/e"))))
    with pytest.raises((EOFError, OSError, http.client.HTTPException)):
        reader.groups_until(later[-1][2], deadline_seconds=5)
    reader.close()
    again = SseReader(other, "/watch?prefix=w/", headers={"Last-Event-ID": str(resume_after)})
    assert again.groups_until(later[-1][2]) == later  # no gap, no duplicate
    again.close()
    follower.start()


def test_a_long_poll_answers_events_after_from_or_an_empty_list_after_its_timeout(cluster):
    leader = cluster.leader()
    follower = next(n for n in cluster.running() if n is not leader)
    i = index_of(leader.request("POST", "/db/p/one", "1"))
    r = follower.request("GET", f"/watch?key=p/one&from={i - 1}&poll=1")
    assert r.status == 200 and r.json() == [{"type": "put", "key": "p/one", "value": "1", "index": i,
                                             "create_index": i}]
    t0 = time.monotonic()
    r = follower.request("GET", f"/watch?key=p/one&from={i}&poll=1&timeout=1")
    assert r.status == 200 and r.json() == [] and time.monotonic() - t0 >= 0.9


def test_from_older_than_the_history_is_410_with_the_oldest_index(cluster):
    leader = cluster.leader()
    first = index_of(leader.request("POST", "/db/h/0", "v"))
    for n in range(1, HISTORY_EVENTS + 5):
        last = index_of(leader.request("POST", f"/db/h/{n}", "v"))
    # A node serves watches from its own applied state: should it have lost the leadership meanwhile (a loaded
    # machine), the writes went to the new leader and this node may not have applied the last ones yet.
    wait_for(lambda: leader.status()["applied_index"] >= last, 10, "the node to apply the last write")
    r = leader.request("GET", f"/watch?prefix=h/&from={first - 1}&poll=1")
    assert r.status == 410 and int(r.headers["x-raft-oldest-index"]) > first
    assert r.text.count("\n") == 1 and "oldest index available" in r.text
    oldest = int(r.headers["x-raft-oldest-index"])
    r = leader.request("GET", f"/watch?prefix=h/&from={oldest - 1}&poll=1")
    assert r.status == 200 and r.json()[0]["index"] == oldest


def test_a_cluster_of_feature_level_1_serves_watches_of_sets_and_deletes(tmp_path):
    node = Node("old", str(tmp_path)).start(env={"RAFTDZMQ_FEATURE_LEVEL": "1"})
    try:
        wait_for(lambda: node.status()["role"] == "leader", 10, "the node to lead")
        assert node.status()["cluster_feature_level"] == 1
        put = index_of(node.request("POST", "/db/k", "v"))
        gone = index_of(node.request("DELETE", "/db/k"))
        r = node.request("GET", f"/watch?key=k&from={put - 1}&poll=1")
        assert r.status == 200 and [(e["type"], e["index"], e["create_index"]) for e in r.json()] == [
            ("put", put, 0), ("delete", gone, 0)]  # no indices below level 2 (store: "Indices")
    finally:
        node.kill()


def test_a_follower_that_installs_a_snapshot_ends_its_streams_and_a_reconnect_elsewhere_resumes_exactly(
        tmp_path):
    """Review 6 (the reviewer's snap.py): a follower paused while the leader snapshots and compacts past it gets
    the snapshot (no events); its stream ends with an error event, a reconnect to it with the old Last-Event-ID
    gets 410 and X-Raft-Oldest-Index, a reconnect to another node gets exactly the committed sequence. No entries
    kept behind the leader's cut (-snapshot-catch-up-entries 0): a follower this few entries behind would be sent
    appends from them, its stream going on (test_snapshot_catch_up)."""
    c = LocalCluster(str(tmp_path), extra=("-snapshot-threshold", "20000", "-snapshot-catch-up-entries", "0")).start()
    paused = None
    try:
        wait_for(lambda: all(n.status()["cluster_feature_level"] >= 2 for n in c.running()), 10, "feature level 2")
        leader = c.leader()
        follower, other = [n for n in c.running() if n is not leader]
        reader = SseReader(follower, "/watch?prefix=s/")
        committed = [("put", f"s/{k}", index_of(leader.request("POST", f"/db/s/{k}", "x" * 300))) for k in range(5)]
        assert reader.groups_until(committed[-1][2]) == committed
        resume_after = reader.last_id
        os.kill(follower.proc.pid, signal.SIGSTOP)
        paused = follower
        for k in range(5, 400):
            committed.append(("put", f"s/{k}", index_of(leader.request("POST", f"/db/s/{k}", "x" * 300))))
        # Both others compacted past the paused follower: whichever of them leads when it wakes must send it a
        # snapshot (CI once saw the leadership move to a node whose log still held the entries, and the follower
        # caught up by appends and then snapshotted on its own).
        wait_for(lambda: all(n.status()["snapshot_index"] > resume_after + 10 for n in (leader, other)), 20,
                 "the others' snapshots")
        # The leader's transport holds what it sends a stopped peer while it waits for the peer's reply (up to its
        # cap, raftlib.transport), so a short pause can end with the held appends catching the follower up, no
        # snapshot needed: keep it paused past that cap, writing meanwhile, so that what was held is given up.
        paused_until = time.monotonic() + 5
        k = 400
        while time.monotonic() < paused_until:
            committed.append(("put", f"s/{k}", index_of(leader.request("POST", f"/db/s/{k}", "x" * 300))))
            k += 1
            time.sleep(0.02)
        os.kill(follower.proc.pid, signal.SIGCONT)
        paused = None
        # An install past where it paused (its process's log also holds the install of its join, at index 3).
        wait_for(lambda: any(int(i) > resume_after + 10 for i in re.findall(
            r"installed a snapshot at index (\d+) from the leader", follower.log_text(current=True))), 20,
            "the follower to install the leader's snapshot")
        with pytest.raises((EOFError, OSError, http.client.HTTPException)):
            reader.groups_until(committed[-1][2], deadline_seconds=10)
        assert reader.error is not None and reader.error["oldest_index"] > resume_after + 1
        reader.close()
        r = follower.request("GET", "/watch?prefix=s/&poll=1", headers={"Last-Event-ID": str(resume_after)})
        assert r.status == 410 and int(r.headers["x-raft-oldest-index"]) > resume_after + 1
        again = SseReader(other, "/watch?prefix=s/", headers={"Last-Event-ID": str(resume_after)})
        assert again.groups_until(committed[-1][2]) == committed[5:]  # no gap, no duplicate
        again.close()
    finally:
        if paused is not None:
            os.kill(paused.proc.pid, signal.SIGCONT)
        c.stop()


# A stream ends within max(3 election timeouts, 3 s) (3 s at the tests' 300 ms, procs.TEST_ELECTION_MS) and a check
# (0.1 s) of losing its leader; a removed node learns it at its next pre-vote. Generous for a shared, loaded machine:
# without the guard a stream never ends (keep-alives every 5 s) and a long poll answers [] at its timeout.
END_BOUND_SECONDS = 8.0


def watches_open(node: Node) -> float:
    found = re.search(r"^raftdzmq_watches_open (\S+)$", node.request("GET", "/metrics").text, re.M)
    assert found is not None
    return float(found.group(1))


def stream_and_long_poll_open(node: Node, prefix: str, after: int) -> tuple[threading.Thread, list]:
    """A long poll of `prefix` after `after` on `node` (30 s) in a thread, and the list its answer goes to; returns
    once the node counts it and one stream open."""
    polled: list = []
    poll = threading.Thread(target=lambda: polled.append(node.request(
        "GET", f"/watch?prefix={prefix}&from={after}&poll=1&timeout=30", timeout=40)))
    poll.start()
    wait_for(lambda: watches_open(node) == 2, 10, "the stream and the long poll to be open")
    return poll, polled


def test_a_removed_node_ends_its_watch_streams_and_long_polls_and_refuses_new_watches(tmp_path):
    """Review L1: a watch on a node that is then removed ends with an `error` event that says why (410, removed),
    within a bound; its long poll answers 410 and the reason instead of [] at its timeout; a new watch there is 410
    with the reason on one line. Nothing is left registered."""
    c = LocalCluster(str(tmp_path)).start()
    try:
        leader = c.leader()
        victim = next(n for n in c.running() if n is not leader)
        reader = SseReader(victim, "/watch?prefix=r/")
        committed = [("put", f"r/{k}", index_of(leader.request("POST", f"/db/r/{k}", "v"))) for k in range(3)]
        assert reader.groups_until(committed[-1][2]) == committed
        poll, polled = stream_and_long_poll_open(victim, "r/", committed[-1][2])
        assert leader.request("DELETE", f"/cluster/{victim.status()['node_id']}").status == 200
        removed_at = time.monotonic()
        with pytest.raises(EOFError):  # the error event, then the stream's end (no keep-alive carries it on)
            reader.groups_until(10**9, deadline_seconds=END_BOUND_SECONDS + 5)
        assert time.monotonic() - removed_at < END_BOUND_SECONDS
        assert reader.error is not None and reader.error["status"] == 410, reader.error
        assert reader.error["error"].startswith("this node was removed from the cluster"), reader.error
        reader.close()
        poll.join(END_BOUND_SECONDS)
        assert polled and polled[0].status == 410, polled
        assert time.monotonic() - removed_at < END_BOUND_SECONDS
        for target in ("/watch?prefix=r/", "/watch?prefix=r/&poll=1&timeout=5"):
            r = victim.request("GET", target, timeout=5)
            assert r.status == 410 and r.text.count("\n") == 1 and "removed" in r.text, (target, r)
        wait_for(lambda: watches_open(victim) == 0, 5, "every watch to be unregistered")
    finally:
        c.stop()


def test_a_follower_cut_from_its_leader_ends_its_watches_within_three_election_timeouts(tmp_path):
    """A follower whose two peers are stopped (SIGSTOP) hears from no leader: after 3 s its stream
    ends with a 503 `error` event and the reason, its long poll answers 503 instead of [] at its timeout, and new
    watches are 503. Once the peers run again and a leader is heard, it serves watches again."""
    c = LocalCluster(str(tmp_path)).start()
    try:
        leader = c.leader()
        follower = next(n for n in c.running() if n is not leader)
        others = [n for n in c.running() if n is not follower]
        reader = SseReader(follower, "/watch?prefix=q/")
        committed = [("put", "q/0", index_of(leader.request("POST", "/db/q/0", "v")))]
        assert reader.groups_until(committed[-1][2]) == committed
        poll, polled = stream_and_long_poll_open(follower, "q/", committed[-1][2])
        with paused(others):
            cut_at = time.monotonic()
            with pytest.raises(EOFError):
                reader.groups_until(10**9, deadline_seconds=END_BOUND_SECONDS + 5)
            ended_after = time.monotonic() - cut_at
            # not before the bound, 3 s, less a margin: the last contact came before the pause (a heartbeat, later
            # than its 50 ms on a loaded machine)
            assert MIN_LEADERLESS_SECONDS - 0.5 <= ended_after < END_BOUND_SECONDS, ended_after
            assert reader.error is not None and reader.error["status"] == 503, reader.error
            assert "heard from no leader" in reader.error["error"], reader.error
            reader.close()
            poll.join(END_BOUND_SECONDS)
            assert polled and polled[0].status == 503 and "no leader" in polled[0].text, polled
            r = follower.request("GET", "/watch?prefix=q/", timeout=5)
            assert r.status == 503 and r.text.count("\n") == 1 and "no leader" in r.text, r
            assert watches_open(follower) == 0
        wait_for(lambda: follower.request("GET", "/watch?prefix=q/&poll=1&timeout=0").status == 200, 15,
                 "the follower to serve watches again once a leader is heard")
    finally:
        c.stop()


def refused_count(node: Node) -> float:
    text = node.request("GET", "/metrics").text
    return sum(float(v) for v in re.findall(r"^raftdzmq_watches_refused_total\{[^}]*\} (\S+)$", text, re.M))


def test_a_watched_node_stopped_past_the_bound_carries_its_stream_on_once_it_runs_again(tmp_path):
    """Review watchend L1 (the stall rule): a follower stopped (SIGSTOP: a stopped VM, a blocked loop) for longer
    than the no-leader bound last heard its leader before the stop, which says nothing of now: it hears from it
    within a heartbeat once it runs again. Its stream must carry on with the next change, and no watch be refused
    (the guard's first check after the stop comes late: it counts as contact)."""
    c = LocalCluster(str(tmp_path)).start()
    try:
        leader = c.leader()
        follower = next(n for n in c.running() if n is not leader)
        reader = SseReader(follower, "/watch?prefix=s/")
        first = index_of(leader.request("POST", "/db/s/0", "v"))
        assert reader.groups_until(first) == [("put", "s/0", first)]
        with paused([follower]):
            time.sleep(MIN_LEADERLESS_SECONDS + 1.0)
        after = index_of(c.write("s/1", "v"))
        assert reader.groups_until(after, deadline_seconds=END_BOUND_SECONDS) == [("put", "s/1", after)]
        assert reader.error is None and refused_count(follower) == 0
        reader.close()
    finally:
        c.stop()


def test_watchers_on_a_removed_node_resume_on_another_member_with_every_event_once(tmp_path):
    """raftlib.client's watch and `raftdzmqctl watch`, both on the node that is then removed (the first endpoint),
    see every committed change of their prefix exactly once: those the node applied before its removal, and the
    rest from another member after its stream ended."""
    c = LocalCluster(str(tmp_path)).start()
    ctl = watch = None
    try:
        leader = c.leader()
        victim = next(n for n in c.running() if n is not leader)
        endpoints = [victim.address] + [n.address for n in c.running() if n is not victim]
        client = Client(endpoints, timeout=10)
        seen: list = []
        watch = client.watch(prefix="m/")
        assert watch is not None

        def follow() -> None:
            for event in watch:
                seen.append((event.type, event.key, event.index))

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        ctl = subprocess.Popen([sys.executable, "-m", "raftlib.ctl", "-w", "json", "watch", "m/", "--prefix"],
                               stdout=subprocess.PIPE, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": ROOT, "RAFTDZMQ_ENDPOINTS": ",".join(endpoints)})
        wait_for(lambda: watches_open(victim) == 2, 15, "both watches to be open on the node to remove")
        committed = []
        for k in range(5):
            committed.append(("put", f"m/{k}", index_of(leader.request("POST", f"/db/m/{k}", "v"))))
        assert leader.request("DELETE", f"/cluster/{victim.status()['node_id']}").status == 200
        for k in range(5, 15):
            committed.append(("put", f"m/{k}", index_of(c.write(f"m/{k}", "v"))))
        committed.append(("delete", "m/0", index_of(c.leader().request("DELETE", "/db/m/0"))))
        wait_for(lambda: len(seen) >= len(committed), 20, "the client's watch to see every change")
        assert seen == committed and watch.reconnects >= 1
        lines = []
        for _ in committed:  # each read bounded: the events are all committed and the other members serve them
            lines.append(json.loads(_readline_within(ctl, 20)))
        assert [(e["type"], e["key"], e["index"]) for e in lines] == committed
        client.close()
    finally:
        if watch is not None:
            watch.close()
        if ctl is not None:
            ctl.kill()
            ctl.wait(10)
        c.stop()


def _readline_within(proc: subprocess.Popen, seconds: float) -> bytes:
    """The next line of `proc`'s stdout, or AssertionError after `seconds`."""
    got: list = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(seconds)
    assert got and got[0], f"no line within {seconds}s"
    return got[0]
