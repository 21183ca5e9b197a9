"""A node's identity and first start, over its data dir (raftlib.storage.DiskStorage): who the node is (node.json;
a new id: new_node_id, and the -name in it: name_of), what its first start must do (JOINING: bootstrap, join or
restore; RESTORE: a backup to install), and -force-new-cluster's lost-quorum recovery with its fence
(force_new_cluster, settle_forcing). The server's concern, not the library's: raftlib.server.node runs it at
start, raftlib.server.routes_cluster and raftdzmq.py read names with it.

Rules:
- Each state of a first start is durable before the next is entered, so that a crash anywhere leaves one of them
  (start_node lists them): never an identity without its intent (JOINING is written before node.json).
- A new data dir is always a new node: its id is random, with -name too (new_node_id).
- A node that was in a cluster ("joined") and has lost its log is refused (LogMissing), and so is a log without
  its node.json: under its old id it would vote as a node that forgot its votes and entries.
- -force-new-cluster is one save (one record, one fdatasync): a crash leaves the log before it or after it. The
  members it removes are fenced in node.json before that record; a fence a crash left half done is settled at the
  next start (settle_forcing).
- No gevent and no sockets: everything goes through the DiskStorage given (tests run it on tests/crashfs.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

from raftlib.interfaces import StoredState
from raftlib.messages import Entry, EntryKind, HardState, Member, Membership, Snapshot
from raftlib.snapshotfile import read_snapshot
from raftlib.storage import DiskStorage
from raftlib.storage_errors import StorageError

# The logger of raftlib.storage, where this code was: its warnings keep their logger's name (and its level, which
# tests and operators set).
logger = logging.getLogger("raftlib.storage")


class NotJoined(StorageError):
    """This data dir's node never joined a cluster, and no -join was given."""


class RestoreNotJoin(StorageError):
    """A data dir holding a restored backup was started with -join."""


class LogMissing(StorageError):
    """A data dir whose node.json says a cluster had it ("joined") holds no term, no log and no snapshot, or one
    that holds a log but no node.json: its log and its identity no longer go together (start_node)."""


class ForcedAgain(StorageError):
    """-force-new-cluster on a node it was given before, whose cluster has grown since (force_new_cluster)."""


@dataclasses.dataclass
class NodeStart:
    node_id: str
    stored: StoredState  # the state to start the node with (the bootstrap's included)
    bootstrapped: bool = False  # this start made a new one-node cluster
    must_join: bool = False  # a -join was given and no leader has reached this node yet: join, then run
    joined_before: bool = False  # a leader reached this node (a term, entries or a snapshot), or it bootstrapped
    restored: int = 0  # this start made a new one-node cluster from a backup (RESTORE): the backup's index


NAMED_ID = re.compile(r"(.+)-[0-9a-f]{8}")  # NAME-<8 random hex>: a node started with -name NAME


def new_node_id(name: str | None) -> str:
    """A new data dir's node id: 8 random hex digits, or NAME-<8 random hex> given -name NAME. Random in either
    case (review of ops, finding 1): a node whose data dir was lost and which starts again under the same name on
    an empty one has no log and no vote record, and under the old id it would grant votes and answer appends as
    the old member (an acknowledged write lost). Under a new id the old members' messages do not reach it (they
    name the old id), and its join is refused while a member has its name (routes_cluster.join_refusal)."""
    suffix = os.urandom(4).hex()
    return suffix if name is None else f"{name}-{suffix}"


def name_of(node_id: str) -> str:
    """The -name a node id was made from (`new_node_id`), or the id itself for a node started without -name."""
    named = NAMED_ID.fullmatch(node_id)
    return node_id if named is None else named.group(1)


def start_node(storage: DiskStorage, stored: StoredState, new_node_id: str, raft_address: str, http_address: str,
               join: bool, public_key: str = "", name: str | None = None) -> NodeStart:
    """Who this data dir's node is and what it must do, made crash-safe. The states, each durable before the next
    is entered, so that a crash anywhere leaves one of them:

        no node.json                       a new node: `new_node_id`; with `join`, a joining node, else the first
                                           node of a new cluster. The intent (JOINING) is written first, then
                                           node.json: never an identity without its intent.
        node.json + JOINING "bootstrap"    the first node, not bootstrapped yet: the bootstrap save (term 1 and a
                                           configuration with this node as the only voter, at index 1), then
                                           JOINING removed. A crash or a full disk before the save's fsync: the
                                           next start bootstraps again, with the same id.
        node.json + JOINING "join"         a joining node no leader has accepted yet: joins again with the same id
                                           (with -join; without, NotJoined, saying how to go on).
        node.json, no JOINING              a leader accepted the join (the server removed JOINING, and writes
                                           "joined" in node.json once a leader's term is saved in the log), or
                                           the node bootstrapped ("joined" too): it runs. With "joined" but no term, no log and no snapshot, its log is
                                           lost: LogMissing (review of ops 2, A: under its old id it would vote
                                           as a node that forgot its votes and entries). Without "joined" (a dir
                                           of an older raftdzmq that never started with its log since): a warning.
        a log but no node.json             LogMissing (review of ops 2, F: it ran the old log under a new id,
                                           outside its configuration, serving stale data).
        a term, entries or a snapshot      in a cluster: runs (-join ignored), "joined" set; a JOINING left over
                                           is removed,
                                           and so is a RESTORE the install left (its snapshot is the log's);
                                           another RESTORE next to a log is refused (StorageError).
        RESTORE (+ JOINING "restore")      a data dir made by `raftdzmq -restore` (no node.json, no log): the first
                                           start installs the backup's snapshot as a new one-node cluster (its
                                           index and term kept, the configuration this node alone, the commit
                                           index the snapshot's: one install transaction), then RESTORE goes,
                                           then JOINING. A crash before the install's commit point: done again,
                                           with the same id. Not with -join (RestoreNotJoin).

    A "forcing" a crash left in node.json is settled first (settle_forcing). `public_key` (with a cluster secret)
    goes into the bootstrap's configuration with this node; `name` (-name) into a new node.json.
    Raises LogMissing, NotJoined, RestoreNotJoin, DiskFull (nothing is lost: start again once there is room), or
    OSError."""
    identity = storage.read_identity()
    pending = storage.read_join_marker()
    joined_before = stored.hard_state.current_term > 0 or stored.last_index > 0
    restoring = not joined_before and storage.has_restore_file()
    if joined_before and storage.has_restore_file():
        _check_restore_installed(storage, stored, identity)
    if identity is None and joined_before:
        raise LogMissing(f"{storage.data_dir} holds a log but no node.json: the node it belonged to is unknown "
                         "(restore node.json, or start from an empty data dir: a new node)")
    if identity is not None and identity.get("joined") and stored.hard_state.current_term == 0 and not restoring:
        # (a snapshot file next to an empty log/ does not make up for it: the votes and the entries after it
        # are gone all the same)
        raise LogMissing(f"{storage.data_dir}: node {identity.get('node_id')} was in a cluster but its log is "
                         "missing (no term in log/): mount or restore log/; else remove the member "
                         "(DELETE /cluster/ID) and start a new node on an empty data dir")
    settle_forcing(storage, stored)
    if restoring and join:
        raise RestoreNotJoin(f"{storage.data_dir} holds a restored backup: it starts a new cluster of its own, "
                             "which other nodes then join (-join to it); start it without -join")
    if restoring:
        old = read_snapshot(storage.restore_path, storage.fs)
        old.data.close()  # type: ignore[union-attr]
        new_id = new_node_id if identity is None else identity["node_id"]
        if new_id in old.membership.node_ids:
            raise RestoreNotJoin(f"{new_id} was a member of the cluster the backup was taken of: a restored node "
                                 "starts a new cluster, under a new name (-name), so that the old members' "
                                 "messages never reach it as theirs")
    if identity is None:
        node_id = new_node_id
        pending = "restore" if restoring else "join" if join else "bootstrap"
        storage.write_join_marker(pending)  # before the identity: no identity without its intent
        storage.write_identity(node_id, raft_address, http_address, name)
    else:
        node_id = identity["node_id"]
        if (identity.get("raft_address"), identity.get("http_address")) != (raft_address, http_address):
            logger.warning("this node was created with addresses %s / %s; the cluster still knows it by those",
                           identity.get("raft_address"), identity.get("http_address"))
    out = NodeStart(node_id, stored, joined_before=joined_before)
    if joined_before:
        if stored.hard_state.current_term > 0:  # done already, a crash came before it, or an older raftdzmq
            storage.mark_joined()
        if storage.has_restore_file():
            storage.remove_restore_file()  # installed before a crash: the log holds it
        if pending is not None:
            storage.remove_join_marker()  # a leader reached it: the join was accepted (or the bootstrap done)
    elif restoring:
        backup = read_snapshot(storage.restore_path, storage.fs)
        me = Member(node_id, raft_address, http_address, public_key)
        alone = Membership((node_id,), (), (me,))
        index, term = backup.last_included_index, backup.last_included_term
        try:
            storage.save(HardState(term, None, index), [], Snapshot(index, term, alone, backup.data))
        finally:
            backup.data.close()
        out.stored = StoredState(storage.state.hard_state, storage.state.snapshot, list(storage.state.entries))
        storage.mark_joined()
        storage.remove_restore_file()
        storage.remove_join_marker()
        out.restored = index
        out.joined_before = True
    elif join:
        out.must_join = True  # a first join, or one that never succeeded: again, with the same node id
        if pending != "join":
            storage.write_join_marker("join")
    elif pending == "join":
        raise NotJoined(f"node {node_id} ({storage.data_dir}) never joined a cluster: its -join did not succeed. "
                        "Start it again with -join HOST:HTTPPORT (it keeps its id), or give it an empty data dir to "
                        "start a new cluster")
    elif pending == "bootstrap":
        # The first node of a new cluster: a configuration with itself as the only voter (index 1).
        me = Member(node_id, raft_address, http_address, public_key)
        first = Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership((node_id,), (), (me,)))
        storage.save(HardState(1, None, 1), [first])
        out.stored = StoredState(storage.state.hard_state, storage.state.snapshot, list(storage.state.entries))
        storage.mark_joined()
        storage.remove_join_marker()
        out.bootstrapped = True
    else:
        # An identity without "joined", no log and no marker: a dir written by an older raftdzmq (whose failed
        # joins, lost bootstraps and lost logs looked like this; a start with its log marks it "joined").
        logger.warning("node %s has no log and no term yet: no leader has reached it. If its join never succeeded, "
                       "restart it with -join HOST:HTTPPORT; if it was the first node of a new cluster, give it an "
                       "empty data dir", node_id)
    return out


def _check_restore_installed(storage: DiskStorage, stored: StoredState, identity: dict | None) -> None:
    """A RESTORE next to a log: the install's, left by a crash before RESTORE went (the log's snapshot is the
    backup's, index and term, in a configuration of this node alone), else a StorageError (review of ops, finding
    6: a data dir cleared but for log/ ran the old log and dropped the backup, silently)."""
    backup = read_snapshot(storage.restore_path, storage.fs)
    backup.data.close()  # type: ignore[union-attr]
    held = stored.snapshot
    if identity is None or held is None or held.membership.node_ids != (identity.get("node_id"),) or \
            (held.last_included_index, held.last_included_term) != (backup.last_included_index,
                                                                    backup.last_included_term):
        raise StorageError(f"{storage.data_dir} holds a restored backup (RESTORE) and a log the restore did not "
                           "make: restore into an empty data dir")


def force_new_cluster(storage: DiskStorage, stored: StoredState, me: Member,
                      again: bool = False) -> tuple[int, tuple[str, ...]] | None:
    """Lost-quorum recovery (`raftdzmq -force-new-cluster`, etcd's flag): make this surviving node a one-node
    cluster with its data. One save, one record and one fdatasync, so a crash leaves the log before it or after
    it, never between: the entries after the commit index are cut off (they may never have committed, and some may
    have been answered as not applied: etcd drops them too), and an entry is appended at the commit index + 1,
    of a new term (the highest this node has seen + 1), holding the configuration `me` alone; the hard state's
    commit index covers it (as the bootstrap's does) and its vote is this node's. Before any message leaves.
    The configuration it starts from is the newest at or below the commit index (review of ops, finding 4: the
    newest in the log may be in the tail that is cut off): this node must be in it.

    The members removed are FENCED first (node.json's "forcing", before the record, made "fenced" after it, or at the
    next start if a crash came between; dropped there if the record was never written): those of that configuration
    and of every configuration in the tail cut off (one may have reached a node it adds). The server drops every
    message from a fenced node while it is not in this node's configuration, answering a Removed notice instead
    (raftlib.server.node), and refuses a join under a fenced name (routes_cluster.join_refusal). Without that, two old
    members back together (a majority of the old configuration) could elect a leader of their own whose appends,
    of a higher term, this node would follow. An old member that comes back alone could not disturb it anyway: it
    cannot count (the configuration names this node alone), nor win this node's vote or pre-vote (this log ends
    in a newer term than any of theirs). A fence without the record (a crash between) changes nothing: the old
    members are still in the configuration then. Only this node holds the fence: the old members' data dirs must
    be wiped all the same (README, "Disaster recovery"). With a cluster secret their connections are refused
    anyway (their keys are not in this configuration).

    The forced entry's index and term go into node.json ("forcing"'s, then "forced", as the fence does). Forcing
    again once the log holds a configuration after it (fresh nodes joined) is refused (ForcedAgain) unless
    `again` (review of ops, finding 2: a flag left set cut {a, d, e} back to {a} while d and e, a majority of
    it, went on as a cluster of their own). Entries of a lower term after that index do not count.

    Returns (the new entry's index, the members removed), or None when the newest configuration is this node
    alone already (a second start with the flag: nothing to do). Raises StorageError when this node has no
    configuration or is not in it, ForcedAgain, and as `save` does."""
    base = stored.snapshot.last_included_index if stored.snapshot is not None else 0
    commit = min(max(stored.hard_state.commit_index, base), stored.last_index)
    snapshot_membership = stored.snapshot.membership if stored.snapshot is not None else None
    committed = next((e.membership for e in reversed(stored.entries)
                      if e.membership is not None and e.index <= commit), snapshot_membership)
    tail = [e.membership for e in stored.entries if e.membership is not None and e.index > commit]
    newest = tail[-1] if tail else committed
    forced_before = (storage.read_identity() or {}).get("forced")
    if forced_before is not None and not again:
        forced_index, forced_term = forced_before
        later = [e.index for e in stored.entries
                 if e.membership is not None and e.index > forced_index and e.term >= forced_term]
        if stored.snapshot is not None and base > forced_index and stored.snapshot.last_included_term >= forced_term \
                and stored.snapshot.membership != Membership((me.node_id,), (), (me,)):
            later.append(base)
        if later:
            raise ForcedAgain(f"{storage.data_dir}: node {me.node_id} was made a one-node cluster by "
                              f"-force-new-cluster at index {forced_index}, and its cluster has changed since "
                              f"(a configuration at index {later[-1]}): forcing again would cut the members that "
                              "joined since, a majority of their own, into a second cluster. Start it without "
                              "-force-new-cluster; if every other member is lost for good, -force-new-cluster-again")
    if committed is None or me.node_id not in committed.node_ids:
        raise StorageError(f"{storage.data_dir}: node {me.node_id} is not in its newest committed configuration "
                           f"({'none' if committed is None else ', '.join(committed.node_ids)}): "
                           "-force-new-cluster needs a surviving member's data dir")
    assert newest is not None
    if newest.voters == (me.node_id,) and not newest.learners:
        return None
    last_term = stored.entries[-1].term if stored.entries else (
        stored.snapshot.last_included_term if stored.snapshot is not None else 0)
    term = max(stored.hard_state.current_term, last_term) + 1
    forced = Entry(term, commit + 1, EntryKind.MEMBERSHIP, b"", Membership((me.node_id,), (), (me,)))
    removed = tuple(sorted({n for m in (committed, *tail) for n in m.node_ids} - {me.node_id}))
    storage.fence(removed, forced=(commit + 1, term))
    storage.save(HardState(term, me.node_id, commit + 1), [forced])
    storage.confirm_force()
    return commit + 1, removed


def settle_forcing(storage: DiskStorage, stored: StoredState) -> None:
    """A "forcing" left in node.json by a crash during -force-new-cluster (between its fence and its record, or
    between the record and `confirm_force`): confirmed when the log holds the forced entry (its index and term),
    else dropped (review of ops 2, B: the forced entry never written, a "forced" and a fence left behind refused a
    later genuine force as ForcedAgain and joins under the old members' names). Nothing ran between the crash
    and this start, so the entry, when written, is still the log's last."""
    forcing = (storage.read_identity() or {}).get("forcing")
    if forcing is None:
        return
    index, term = forcing["forced"]
    held = next((e.term for e in stored.entries if e.index == index), None)
    if held is None and stored.snapshot is not None and stored.snapshot.last_included_index == index:
        held = stored.snapshot.last_included_term
    if held == term:
        storage.confirm_force()
    else:
        logger.warning("-force-new-cluster did not finish (no forced entry at index %d, term %d): its fence is "
                       "dropped", index, term)
        storage.update_identity(forcing=None)
