"""The membership and admin routes: POST /join (a node joins as a learner), GET /cluster (the members), GET
/cluster/keys (with a cluster secret: the members' keys of the newest committed configuration), DELETE
/cluster/ID (a removal) and POST /cluster/transfer (leadership handed to a member, then confirmed; refused 409 to
a member that the leader knows restores a snapshot). With a cluster secret the admin requests (join, removal,
transfer) are signed with it, and claimed on the leader just before it acts (routes_shared.check_signature,
claim_signature): a replay is refused. join_refusal says which joins the configuration refuses (409)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import bottle
import gevent

from raftlib.core import NotLeader, ProposalDropped, check_transfer_target
from raftlib.messages import ConfChange, ConfChangeKind, Member, Membership
from raftlib.runtime import NotRunning, Stopped, Timeout

from .admin import SIGNATURE_HEADER, answer_headers, valid_public_key
from .nodestart import name_of
from .routes_shared import (Api, check_signature, claim_signature, json_answer, log, members, node_request_refusal,
                            own_header, read_body, require_leader, text)


def join_refusal(membership: Membership, member: Member, secret: bool, max_members: int = 64,
                 fenced: frozenset[str] = frozenset()) -> str | None:
    """Why a join of `member` is refused (409) in the configuration `membership`, else None. A join that names a
    member exactly as the configuration has it is a retry of the same join and not refused. `secret`: the cluster
    has a secret (node keys); `max_members`: the most members (voters and learners) a join may bring it to;
    `fenced`: the members this node removed by -force-new-cluster."""
    node_id, public_key = member.node_id, member.public_key
    name = name_of(node_id)
    if name in {name_of(f) for f in fenced}:
        # Review of ops, finding 7: the fence drops a removed member's messages only while its id is not a member;
        # a node of that name joining again would let it be heard.
        return (f"{name} is a member that -force-new-cluster removed: a fresh node takes a new name (and the old "
                "one's data dir is wiped)")
    namesake = next((m for m in membership.node_ids if m != node_id and name_of(m) == name), None)
    if namesake is not None:
        # Review of ops, finding 1: a node on a new data dir under a member's name is not that member (it has none
        # of its log nor its votes): the member must go first.
        return (f"member {namesake} has the name {name}: a node on a new data dir is a new node; remove it first "
                f"(DELETE /cluster/{name}), then join")
    keyless = [m for m in membership.node_ids if not getattr(membership.member(m), "public_key", "")]
    if secret and keyless:
        # Review 3 F3: the joining node could not admit these members (nor they it): it would wait for ever.
        return (f"members {', '.join(keyless)} have no node key (a cluster made by a raftdzmq before node keys, or "
                "without a secret): it cannot take new nodes with a secret; recreate it with this version")
    known = membership.member(node_id)
    if known is not None and known.public_key != public_key:
        # A signed join must not give a member's identity to another key: only its own key speaks as it.
        return f"node {node_id} is a member with another key: remove it first"
    if known is not None and known != member:
        # Review 3 F4: a join naming a member's id and key with other addresses moved the member (a follower's
        # 307 then sent clients to the join's address). A node's addresses are fixed by its first join.
        return (f"node {node_id} is a member at {known.raft_address} (raft) and {known.http_address} (http): a join "
                "does not move a member; remove it first")
    if public_key:
        # Review 3 F2: a member's public key (GET /cluster lists them) named by another node id took that member's
        # frames from it on every node, cutting it off.
        owner = next((m.node_id for m in membership.members if m.public_key == public_key and m.node_id != node_id),
                     None)
        if owner is not None:
            return f"this public key is member {owner}'s: every node needs a key of its own"
    if known is None and len(membership.node_ids) >= max_members:
        # Review 3 F5: every member is in every membership entry and snapshot, and costs each node a socket and a
        # sender; signed learner joins without end would grow all of them.
        return (f"the cluster has {len(membership.node_ids)} members, the most -max-members allows: remove one "
                "first")
    return None


def level_refusal(api: Api, body: dict) -> bottle.HTTPResponse | None:
    """The 409 for a join whose node says a feature level below the cluster's (an older release says none)."""
    cluster_level, joining_level = api.store.feature_level, body.get("feature_level", 1)
    if cluster_level >= 2 and (type(joining_level) is not int or joining_level < cluster_level):
        return text(409, f"the joining node runs an older raftdzmq (feature level {joining_level}) than the "
                    f"cluster (feature level {cluster_level}): upgrade it, then join")
    return None


def join(api: Api) -> bottle.HTTPResponse:
    """Add the node the body names as a learner. With a cluster secret the body names its CURVE public key too,
    and the answer lists the members' keys, signed (admin.answer_headers): the joining node admits them."""
    raw = read_body()
    check_signature(api, "join")
    try:
        body = json.loads(raw or b"null")
        fields = [body[k] for k in ("node_id", "raft_address", "http_address")]
        if not all(isinstance(f, str) and 0 < len(f) < 256 and f.isprintable() for f in fields):
            raise ValueError
    except (ValueError, TypeError, KeyError, RecursionError):
        return text(400, 'bad join body: want JSON {"node_id": ..., "raft_address": ..., "http_address": ...}')
    public_key = ""
    if api.guard is not None:
        public_key = body.get("public_key")
        if not valid_public_key(public_key):
            return text(400, "bad join body: with a cluster secret, want the node's CURVE public key as "
                        '"public_key" (40 characters of Z85)')
    require_leader(api)
    member = Member(fields[0], fields[1], fields[2], public_key)
    refusal = join_refusal(api.runtime.node.membership, member, api.guard is not None, api.max_members,
                           api.fenced())
    if refusal is not None:
        return text(409, refusal)
    # Under the membership lock: the leader's FeatureLevelRaiser raises the cluster's level under it too, only if
    # the configuration then is the one whose members it asked (no change since: a removal of this id included),
    # so this join comes either before (and is asked) or after (and is checked here).
    if not api.membership_lock.acquire(timeout=api.write_timeout_seconds):
        return text(503, "join not possible now: the cluster's feature level is being raised; retry")
    try:
        deadline = time.monotonic() + api.write_timeout_seconds
        # Review of coord1, S1: the applied level is stale while this leader's log holds a raise not applied yet
        # (the raiser's proposal timed out and released the lock; or a new leader, whose predecessor's raise
        # commits only with an entry of its own term, §5.4.2 and its no-op, §8). Every raise is in the log up to
        # last_index (a later one needs this lock, or another leader, which fails the change): wait for it.
        last_index = api.runtime.status().node.last_index
        if last_index > api.runtime.node.last_applied:
            try:
                api.runtime.wait_applied(last_index, api.write_timeout_seconds)
            except Timeout:
                return text(503, "join not possible now: this leader has not applied its log yet; retry")
        if (refusal := join_refusal_now(api, body, member)) is not None:
            return refusal
        claim_signature(api, "join")
        change = ConfChange(ConfChangeKind.ADD_LEARNER, member)
        while True:
            try:
                index, _ = api.runtime.change_membership(change, api.write_timeout_seconds)
                break
            except ProposalDropped:  # another change in flight: wait for it
                if time.monotonic() > deadline:
                    raise
                gevent.sleep(0.05)
                if (refusal := join_refusal_now(api, body, member)) is not None:  # it may have applied meanwhile
                    return refusal
    finally:
        api.membership_lock.release()
    log.info("node %s (%s) joined as a learner", fields[0], fields[2])
    if api.guard is None:
        return json_answer({"index": index})
    node = api.runtime.status().node
    # The joining node admits these keys until its log holds the configuration at `index`, the one that added it
    # (raftlib.transport, "vouched keys"): not before, however old the configurations its first appends carry.
    answer = json.dumps({"index": index, "leader": node.node_id,
                         "members": {m.node_id: m.public_key for m in node.membership.members},
                         "http_addresses": {m.node_id: m.http_address for m in node.membership.members}}).encode()
    headers = answer_headers(api.guard.secret, own_header(SIGNATURE_HEADER) or "", answer)
    return bottle.HTTPResponse(answer, 200, {"Content-Type": "application/json", **headers})


def join_refusal_now(api: Api, body: dict, member: Member) -> bottle.HTTPResponse | None:
    """Under the membership lock, in the configuration of now: the level's refusal, and join_refusal's again
    (review of ops 2, C: checked only before the lock, two joins under one name, or past max_members, that
    waited for it both became members)."""
    if (refusal := level_refusal(api, body)) is not None:
        return refusal
    reason = join_refusal(api.runtime.node.membership, member, api.guard is not None, api.max_members, api.fenced())
    return None if reason is None else text(409, reason)


def cluster_keys(api: Api) -> bottle.HTTPResponse:
    """GET /cluster/keys, with a cluster secret: this node's newest committed configuration (its index, the
    members' public keys and HTTP addresses), whether or not it leads, for a node whose own configuration may be older (it admits
    these keys on its Raft port until its log catches up: raftlib.transport, "vouched keys"). The request carries
    a fresh nonce and the id of the node it asks, and is signed with both as the body (admin.keys_request_headers);
    a request meant for another node is refused (421: review of edge5, finding 1, another cluster's node at a
    member's old address answered for it). Its signature is not remembered (review of edge5, finding 3: every
    keys request took a place in the AdminGuard for 600 s): the answer is signed for this request's own fresh
    nonce, so a replayed request gets only an answer its asker will not take, and nothing changes. Nothing goes
    through the log: any member answers, a lagging one too. The answer names this node and is signed for that
    request (admin.answer_headers)."""
    if api.guard is None:
        return text(404, "no cluster secret: nodes have no keys")
    refusal = node_request_refusal(api, "keys request")
    if refusal is not None:
        return refusal
    node_id = api.runtime.status().node.node_id
    # Committed only (review of edge5, finding 2): an uncommitted configuration may be cut off, and a list at its
    # index would stay with the asker until its log passed that index.
    committed = api.committed_configuration()
    if committed is None:
        return text(503, "this node has no committed configuration yet; ask another member")
    index, membership = committed
    answer = json.dumps({"node_id": node_id, "index": index,
                         "members": {m.node_id: m.public_key for m in membership.members},
                         "http_addresses": {m.node_id: m.http_address for m in membership.members}}).encode()
    headers = answer_headers(api.guard.secret, own_header(SIGNATURE_HEADER) or "", answer)
    return bottle.HTTPResponse(answer, 200, {"Content-Type": "application/json", **headers})


def get_cluster(api: Api) -> bottle.HTTPResponse:
    return json_answer(members(api.runtime.status().node))


def member_named(membership: Membership, node_id_or_name: str) -> str:
    """The member whose id is `node_id_or_name`, else the one whose -name it is (nodestart.name_of: a node started
    with -name NAME has the id NAME-<8 hex>), else `node_id_or_name` itself; 409 (raised) when several have it."""
    if node_id_or_name in membership.node_ids:
        return node_id_or_name
    named = [m for m in membership.node_ids if name_of(m) == node_id_or_name]
    if len(named) > 1:  # (an older raftdzmq let two joins under one name both in: review of ops 2, C)
        raise text(409, f"{node_id_or_name} is the name of several members ({', '.join(named)}): give the id")
    return named[0] if named else node_id_or_name


def remove_member(api: Api, node_id: str) -> bottle.HTTPResponse:
    check_signature(api, "removal")
    require_leader(api)
    node_id = member_named(api.runtime.node.membership, node_id)
    if node_id not in api.runtime.node.membership.node_ids:
        return text(404, f"{node_id} is not a member")  # before the claim: nothing goes into the log
    claim_signature(api, "removal")
    index, _ = api.runtime.change_membership(ConfChange(ConfChangeKind.REMOVE, Member(node_id)),
                                             api.write_timeout_seconds)
    return text(200, f"removed {node_id}", **{"X-Raft-Index": str(index)})


def transfer(api: Api) -> bottle.HTTPResponse:
    target = bottle.request.query.get("to", "")
    check_signature(api, "transfer")
    require_leader(api)
    # Not a voter: 400. Its last append reply said it restores a snapshot: 409, as it ignores TimeoutNow until its
    # restore ends (RaftNode._handle_timeout_now), so the transfer would only hold this leader's writes for its
    # bound (review restoreedges). Asked here before the claim, so the same signature may be sent again (nothing
    # was started); the core asks again as it takes the transfer, for a target that began restoring meanwhile
    # (review restoreedges-fix V1). The leader itself is a voter with no progress: a transfer to it is a no-op.
    target_progress = api.runtime.status().node.progress.get(target)
    check_transfer_target(target, api.runtime.node.membership.voters,
                          target_progress is not None and target_progress.restoring)
    claim_signature(api, "transfer")
    deadline = time.monotonic() + api.write_timeout_seconds
    api.runtime.transfer_leadership(target, api.write_timeout_seconds)
    confirm_leader(api, target, deadline)
    return text(200, f"leader is now {target}")


def confirm_leader(api: Api, target: str, deadline: float) -> None:
    """After a transfer: Timeout unless `target` is confirmed as the leader by `deadline`. The runtime returns
    once this node has heard of `target` leading, which a target that cannot hold leadership also does for a
    moment (review 3 F2: a target cut off from the others won an election, lost it to check-quorum, and the
    transfer answered 200). A linearizable read through this node settles it (thesis §6.4): the leader answers
    only once an entry of its term has committed and a majority answered its heartbeat round after the read."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{target} was not confirmed as the leader within {api.write_timeout_seconds:g}s")
        try:
            api.runtime.read(remaining)
        except NotLeader:  # between two leaders: ask again, within the bound
            gevent.sleep(0.02)
            continue
        except NotRunning as e:
            # The read was never queued, but the transfer was: TimeoutNow went out and the target may lead. Not
            # `not-applied` (review S1): the transfer's outcome is unknown.
            raise Stopped(f"{e}; the transfer was started") from None
        leader = api.runtime.node.leader_id
        if leader == target:
            return
        raise Timeout(f"{leader or 'no node'} leads, not {target}")


# (method, path, route, the operation its failures are answered as): api.make_app installs them.
ROUTES: tuple[tuple[str, str, Callable[..., object], str], ...] = (
    ("POST", "/join", join, "join"),
    ("GET", "/cluster", get_cluster, "status"),
    ("GET", "/cluster/keys", cluster_keys, "keys"),
    ("DELETE", "/cluster/<node_id>", remove_member, "removal"),
    ("POST", "/cluster/transfer", transfer, "transfer"),
)
