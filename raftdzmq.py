#!/usr/bin/env python
"""raftdzmq: a Raft-replicated key/value server. Raft over zmq.green REQ/REP with CBOR messages, a Bottle HTTP
API on gevent's WSGI server, and an append-only log in the data dir.

    python raftdzmq.py -p 5555 -hp 8080 ~/node.1
    python raftdzmq.py -p 5556 -hp 8081 -join localhost:8080 ~/node.2

The command only: flags, logging and main(); the server is raftlib.server (ARCHITECTURE.md). This file is the only
one that monkey-patches gevent, in its first lines, before anything else is imported. Exit codes: 0 after a clean
stop (or a -restore done, or the help), 1 when the join, the cluster secret or a -restore fails, 2 when the node
cannot start (flags, data dir, host, ports), 3 when its storage fails while it runs.

Every flag may also come from the environment as RAFTDZMQ_<DEST> (RAFTDZMQ_HTTP_PORT, RAFTDZMQ_SECRET_FILE),
converted and checked as on the command line, which wins. `-h` alone (it takes a HOST) prints the help and a hint.
"""

import importlib.metadata

from gevent import monkey


# patch_all looks up gevent's plugins (entry points) 25 times, each a scan of every installed distribution: ~130 ms
# of CPU at every start with 124 installed (issue 13, restart1m). One scan answers them all: the plugins run as
# before. (gevent imports importlib.metadata before it patches anything, so importing it first changes nothing.)
def _scanned_once(installed):
    """importlib.metadata.entry_points answered from `installed`, one scan's answer."""
    def entry_points(**select):
        return installed.select(**select) if select else installed
    return entry_points


_entry_points = importlib.metadata.entry_points
importlib.metadata.entry_points = _scanned_once(_entry_points())
try:
    monkey.patch_all()
finally:
    importlib.metadata.entry_points = _entry_points  # the scan's answer goes with the replacement (nothing keeps it)
del _scanned_once

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import zmq.green as zmq  # noqa: E402

from raftlib.runtime import SNAPSHOT_LOG_RATIO, SNAPSHOT_MODES  # noqa: E402
from raftlib.server.admin import SECRET_ENV, SecretError, admin_headers, node_request_headers, read_secret  # noqa: E402
from raftlib.server.edge import DEFAULT_MAX_UNSENT_BYTES, connection_bound, raise_descriptor_limit  # noqa: E402
from raftlib.server.hosts import parse_allowed_hosts  # noqa: E402
from raftlib.server.node import NAME_PATTERN, CannotStart, JoinFailed, Server, ServerConfig  # noqa: E402
from raftlib.server.restore import RestoreError, restore_backup  # noqa: E402
from raftlib.server.routes_shared import BACKUP_MIN_RATE  # noqa: E402
from raftlib.server.watch import MIN_HISTORY_EVENTS  # noqa: E402
from raftlib.server.tuning import FreezeSurvivors, freeze_after_start, watch_gc_from_env  # noqa: E402
from raftlib.server.nodestart import NAMED_ID  # noqa: E402
from raftlib.storage_errors import StorageError  # noqa: E402
from raftlib.codec import MAX_ENTRY_BYTES  # noqa: E402
from raftlib.core import Config  # noqa: E402
from raftlib.transport import CURVE_AVAILABLE, TRACE  # noqa: E402

COMMAND_OVERHEAD_BYTES = 8192  # a write's entry beyond its body: the key (at most 4 KiB) and the command's encoding
MAX_BODY_LIMIT = MAX_ENTRY_BYTES - COMMAND_OVERHEAD_BYTES
# -max-batch-bytes' most: main's batch for long. A follower catching up decodes and saves each batch in one turn
# of its loop (1 MiB held a joiner's heartbeats 20-45 ms: restore10). The frames fit whatever the bound: the core
# never adds an entry past it but for a lone one (Log.slice), so a frame holds at most a batch and the transport's
# room for small messages (FrameBudget) or one entry of up to MAX_ENTRY_BYTES, both under MAX_FRAME_BYTES.
MAX_BATCH_LIMIT = 1 << 20

log = logging.getLogger("raftdzmq")

# The flags, in --help's order: (names, argparse keywords). README's "Flags" lists the same (tests/test_server.py).
FLAGS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("--help",), dict(action="help", help="show this help and exit")),
    (("-p", "--port"), dict(type=int, default=5555, help="the Raft (ZeroMQ) port (default 5555)")),
    (("-hp", "--http-port"), dict(dest="http_port", type=int, default=8080, help="the HTTP port (default 8080)")),
    (("-h", "--host"), dict(default="localhost", help="the host (a name or an address) this node binds both ports "
                            "to; 0.0.0.0 binds every address and needs -advertise (default localhost)")),
    (("-advertise", "--advertise"), dict(metavar="HOST", help="the host peers and clients reach this node at (the "
                                         "members list, redirects to the leader); default: -h")),
    (("-allowed-hosts", "--allowed-hosts"), dict(dest="allowed_hosts", metavar="LIST", default="", help=(
        "more host names HTTP requests may give in Host, comma-separated; * allows any. Other names are refused "
        "403 (DNS rebinding). Always allowed: IP addresses, localhost (not *.localhost), -h, -advertise, the "
        "members' advertised hosts; list this machine's names here if clients use them"))),
    (("-name", "--name"), dict(metavar="NAME", help="this node's name (letters, digits, . _ -; at most 63): its id is "
                               "NAME-<8 random hex digits>, made at its first start and kept by every start after "
                               "(another name is refused); DELETE /cluster/NAME removes it. Default: a random id "
                               "kept in DATA_DIR")),
    (("-join", "--join"), dict(metavar="HOST:HTTPPORT", help="join the cluster through this node (followed to the "
                               "leader); ignored once joined")),
    (("-v", "--verbose"), dict(action="store_true", help="debug-level raftdzmq logging, and an access log: a line per "
                               "HTTP request (method, target, status, bytes, ms, client) at INFO on raftdzmq.access")),
    (("-log-format", "--log-format"), dict(dest="log_format", choices=("text", "json"), default="text", help=(
        "text (default), or json: one object a line with time, level, logger, message and node, for log "
        "shippers"))),
    (("-debug", "--debug"), dict(action="store_true", help="debug-level raft logging")),
    (("-trace", "--trace"), dict(action="store_true", help="trace-level raft logging (every message)")),
    (("-forward", "--forward"), dict(action="store_true", help="followers proxy writes to the leader instead of "
                                     "redirecting with 307")),
    (("-heartbeat-ms", "--heartbeat-ms"), dict(dest="heartbeat_ms", type=float, default=50, help="leader heartbeat "
                                               "interval in ms (default 50)")),
    (("-election-ms", "--election-ms"), dict(dest="election_ms", type=float, default=1000, help="election timeout "
                                             "in ms; randomized between this and twice this (default 1000, etcd's)")),
    (("-write-timeout", "--write-timeout"), dict(dest="write_timeout", type=float, default=5.0, help="seconds a "
                                                 "write may take to commit before it gets 503 (default 5)")),
    (("-read-timeout", "--read-timeout"), dict(dest="read_timeout", type=float, default=5.0, help="seconds a "
                                               "linearizable read may wait (default 5)")),
    (("-join-timeout", "--join-timeout"), dict(dest="join_timeout", type=float, default=10.0, help="seconds to keep "
                                               "trying to join before giving up (default 10)")),
    (("-max-body", "--max-body"), dict(dest="max_body", type=int, default=1 << 20, help="largest accepted request "
                                       "body in bytes (default 1 MiB)")),
    (("-max-header-bytes", "--max-header-bytes"), dict(dest="max_header_bytes", type=int, default=32 << 10, help=(
        "largest request head (request line and header fields) in bytes; larger gets 431 (default 32 KiB)"))),
    (("-max-connections", "--max-connections"), dict(dest="max_connections", type=int, help=(
        "most HTTP connections at once; when full, the longest idle one is closed for a new one (default: half the "
        "descriptors left under ulimit -n after 100 kept for Raft and the log, at most 1000)"))),
    (("-max-unsent-bytes", "--max-unsent-bytes"), dict(dest="max_unsent_bytes", metavar="BYTES", type=int,
                                                       default=DEFAULT_MAX_UNSENT_BYTES, help=(
        "most bytes of answers a node holds for clients slow to read them (transaction answers, long polls, watch "
        "streams' frames; one shared counts once); past it clients are cut off: first those not reading (no byte "
        "taken since their answer was offered, or for 2 s), the longest stalled first, clients that share an answer as "
        "one; readers last. The kernel's send queue of each connection is not counted (default 256 MiB)"))),
    (("-idle-timeout", "--idle-timeout"), dict(dest="idle_timeout", type=float, default=60.0, help=(
        "seconds an HTTP connection may wait for its next request before it is closed, and may take beyond the "
        "request's own bounds to read its answer (default 60)"))),
    (("-receive-timeout", "--receive-timeout"), dict(dest="receive_timeout", type=float, default=10.0, help=(
        "seconds a client has to send a whole request (head and body) once it has begun; 408 after (default 10)"))),
    (("-backup-min-rate", "--backup-min-rate"), dict(dest="backup_min_rate", type=int, default=BACKUP_MIN_RATE,
        help="bytes a second a backup's reader (GET /snapshot) must take on average, with 16 MiB of slack; a "
             "slower one is cut off, freeing the node's one backup slot (default 256 KiB)")),
    (("-snapshot-threshold", "--snapshot-threshold"), dict(dest="snapshot_threshold", type=int, default=16 << 20,
        help="take a snapshot when the log since the last one passes this many bytes and -snapshot-log-ratio "
             "(default 16 MiB)")),
    (("-snapshot-log-ratio", "--snapshot-log-ratio"), dict(dest="snapshot_log_ratio", metavar="R", type=float,
                                                           default=SNAPSHOT_LOG_RATIO, help=(
        "take a snapshot only once the log since the last one also holds R times that snapshot's size, so that "
        "a big state is not rewritten for every -snapshot-threshold of log; 0: the threshold alone "
        f"(default {SNAPSHOT_LOG_RATIO:g})"))),
    (("-snapshot-mode", "--snapshot-mode"), dict(dest="snapshot_mode", choices=SNAPSHOT_MODES, default=None, help=(
        "how a snapshot is written: stepped (the default from feature level 3: by the serving process, ~2 ms of "
        "work per turn of its loop, from a copy-on-write view of the keys), fork (a forked child: the fork holds "
        "the process ~10-18 ms at 1M keys), in-process (whole, stalling the node); default $RAFTDZMQ_SNAPSHOT_MODE "
        "or stepped"))),
    (("-max-uncommitted-bytes", "--max-uncommitted-bytes"), dict(dest="max_uncommitted_bytes", metavar="BYTES",
                                                                 type=int, default=64 << 20, help=(
        "most bytes of writes a leader holds appended but not yet committed; beyond, a write gets 503 (not "
        "applied: retry) until a majority catches up. At least twice -max-body plus 8 KiB, so that the largest "
        "write goes in while others are pending (default 64 MiB)"))),
    (("-max-batch-bytes", "--max-batch-bytes"), dict(dest="max_batch_bytes", metavar="BYTES", type=int,
                                                     default=Config.max_batch_bytes, help=(
        "most bytes of entries a leader sends a follower in one append, and one append goes a round trip (default "
        f"256 KiB, at most {MAX_BATCH_LIMIT >> 10} KiB). A follower catching up decodes and saves each append in one "
        "go, its heartbeats held meanwhile (~5 ms for 256 KiB of 100-byte writes); over a long link, 256 KiB a "
        "round trip may be less than a bulk load writes: raise it there (give every node the same)"))),
    (("-snapshot-catch-up-entries", "--snapshot-catch-up-entries"), dict(
        dest="snapshot_catch_up_entries", metavar="N", type=int, default=Config.snapshot_catch_up_entries, help=(
            "entries kept in memory behind a snapshot's cut (and at most "
            f"{Config.snapshot_catch_up_bytes >> 20} MiB of them): a follower whose next entry is among them is sent "
            "appends from them instead of the whole snapshot (etcd's SnapshotCatchUpEntries); 0: none kept "
            f"(default {Config.snapshot_catch_up_entries})"))),
    (("-max-members", "--max-members"), dict(dest="max_members", metavar="N", type=int, default=64, help=(
        "most members (voters and learners) a join may bring the cluster to; a join beyond gets 409 (default 64; "
        "the leader that takes the join decides: give every node the same)"))),
    (("-secret-file", "--secret-file"), dict(dest="secret_file", metavar="PATH", help=(
        f"a file holding the cluster secret (or set ${SECRET_ENV}): every join and /cluster change is signed with "
        "it (HMAC-SHA256), and requests without it are refused; with it each node makes a CURVE key pair of its "
        "own (random, kept in DATA_DIR/node.key), and raft connections admit only the members' keys"))),
    (("-sign", "--sign"), dict(nargs=2, metavar=("METHOD", "TARGET"), help=(
        "print the headers that sign this admin request with the cluster secret, for curl -H @FILE (e.g. -sign "
        "DELETE /cluster/ab12cd34), and exit; no DATA_DIR"))),
    (("-sign-node", "--sign-node"), dict(dest="sign_node", metavar="ID", help=(
        "with -sign: the request is for the node ID alone, with a fresh nonce (GET /snapshot, GET /cluster/keys)"))),
    (("-sign-body", "--sign-body"), dict(dest="sign_body", metavar="FILE", help="with -sign: the request's body, "
                                         "from this file ('-': standard input)")),
    (("-watch-history", "--watch-history"), dict(dest="watch_history", metavar="N", type=int, default=10_000, help=(
        "events kept for watches (GET /watch); a watch from further back gets 410 Gone (default 10000, at least "
        "4096: the most events one entry makes)"))),
    (("-watch-history-bytes", "--watch-history-bytes"), dict(dest="watch_history_bytes", metavar="BYTES", type=int,
                                                             default=64 << 20, help=(
        "and at most about this many bytes of keys and values (200 bytes more per event; default 64 MiB): the "
        "oldest events go first, the newest is always kept"))),
    (("-restore", "--restore"), dict(metavar="FILE", help=(
        "make DATA_DIR (new or empty) from a backup (GET /snapshot) and exit: the file is checked whole (its "
        "SHA-256 against -restore-checksum or FILE.sha256 when given, its checksum, its state); a node started on "
        "DATA_DIR is then a new one-node cluster holding that state, with a new node id, that others -join"))),
    (("-restore-checksum", "--restore-checksum"), dict(dest="restore_checksum", metavar="HEX", help=(
        "with -restore: the backup's SHA-256 (X-Raft-Snapshot-Sha256 of its answer)"))),
    (("-force-new-cluster", "--force-new-cluster"), dict(dest="force_new_cluster", action="store_true", help=(
        "lost-quorum recovery: restart this surviving member as a one-node cluster with its data (its "
        "configuration becomes itself alone, the entries it did not know as committed are dropped); start it "
        "once with the flag, then without; never start the other members on their old data dirs again. Refused "
        "on a node it was given before whose cluster has grown since; command line only"))),
    (("-force-new-cluster-again", "--force-new-cluster-again"), dict(dest="force_new_cluster_again",
                                                                     action="store_true", help=(
        "-force-new-cluster on a node forced before whose cluster has grown since (every member that joined "
        "since is lost for good); command line only"))),
    (("-no-fsync", "--no-fsync"), dict(dest="no_fsync", action="store_true", help="UNSAFE, for experiments only: do "
                                       "not fsync the log")),
    (("data_dir",), dict(metavar="DATA_DIR", nargs="?", help="where this node keeps its log and snapshots")),
)


ENV_PREFIX = "RAFTDZMQ_"  # every flag also from the environment: RAFTDZMQ_HTTP_PORT for --http-port
# A mode of their own, not a setting; or a one-off action that must not stay set for every restart (review of ops,
# finding 2: a -force-new-cluster left in the environment of a unit restarted on failure split the cluster).
NOT_FROM_ENV = ("help", "sign", "sign_body", "sign_node", "restore", "restore_checksum", "force_new_cluster",
                "force_new_cluster_again")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
HOST_HINT = ("raftdzmq: -h is the host to bind (-h HOST, e.g. -h 0.0.0.0 -advertise node1.example); --help lists "
             "every flag")


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def env_defaults(p: argparse.ArgumentParser, environ: dict[str, str]) -> dict[str, object]:
    """The flags set in the environment (RAFTDZMQ_<FLAG>), converted as the command line would be; the command
    line wins (these are only defaults). A value that does not convert is a usage error naming the variable."""
    out: dict[str, object] = {}
    for action in p._actions:
        name = env_name(action.dest)
        if name not in environ:
            continue
        if action.dest in NOT_FROM_ENV:  # a one-off: set for good, it would act at every start (review of ops 2, E)
            p.error(f"${name} is not read from the environment: give {action.option_strings[0]} on the command line")
        raw = environ[name]
        if isinstance(action, argparse._StoreTrueAction):
            if raw.lower() not in TRUE_WORDS + FALSE_WORDS:
                p.error(f"${name} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS[:-1])}, not {raw!r}")
            out[action.dest] = raw.lower() in TRUE_WORDS
            continue
        try:
            value = action.type(raw) if callable(action.type) else raw
        except ValueError:
            p.error(f"${name}: not a valid value: {raw!r}")
        if action.choices is not None and value not in action.choices:
            p.error(f"${name} must be one of {', '.join(map(str, action.choices))}, not {raw!r}")
        out[action.dest] = value
    return out


def min_uncommitted_bytes(max_body: int) -> int:
    """The least -max-uncommitted-bytes for `max_body`. The leader refuses a write when what it holds uncommitted
    plus the write's entry would pass the bound (raftlib.core.Config.max_uncommitted_bytes), and takes any write
    only when it holds nothing. At -max-body plus the overhead, a write of the largest body would wait for that
    empty moment, which pipelined writes from other clients never leave it (the review's starved write). At twice
    -max-body plus the overhead, it goes in whenever the others' uncommitted writes come to at most one
    -max-body: it competes like any other write."""
    return 2 * max_body + COMMAND_OVERHEAD_BYTES


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raftdzmq", add_help=False, epilog="Example: python raftdzmq.py -p 5555 -hp "
                                "8080 ~/node.1. Every flag can also be set in the environment as "
                                f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}HTTP_PORT=8080, {ENV_PREFIX}SECRET_FILE=PATH); "
                                "the command line wins.", description="A Raft-replicated key/value server: Raft over "
                                "ZeroMQ, the data over HTTP.")
    for names, options in FLAGS:
        p.add_argument(*names, **options)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[-1] in ("-h", "--host"):  # -h alone: a user asking for help, not argparse's "expected one"
        if len(argv) == 1:
            p.print_help()
            print(f"\n{HOST_HINT}")
            raise SystemExit(0)
        p.print_usage(sys.stderr)
        print(HOST_HINT, file=sys.stderr)
        raise SystemExit(2)
    p.set_defaults(**env_defaults(p, os.environ if environ is None else environ))
    args = p.parse_args(argv)
    if args.name is not None and not NAME_PATTERN.fullmatch(args.name):
        p.error("-name must be 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if args.name is not None and NAMED_ID.fullmatch(args.name):
        p.error("-name must not end in -<8 hex digits>: node ids are NAME-<8 random hex>, and the name would read "
                "as one")
    if args.sign is None and args.data_dir is None:
        p.error("the following arguments are required: DATA_DIR")
    if args.sign_node is not None and (args.sign is None or args.sign_body):
        p.error("-sign-node goes with -sign METHOD TARGET, without -sign-body (it signs a nonce and the node id)")
    try:
        args.allowed_hosts = parse_allowed_hosts(args.allowed_hosts)
    except ValueError as e:
        p.error(f"-allowed-hosts: {e}")
    if args.restore_checksum is not None and args.restore is None:
        p.error("-restore-checksum goes with -restore FILE")
    args.force_new_cluster = args.force_new_cluster or args.force_new_cluster_again
    if args.restore is not None and (args.join or args.force_new_cluster):
        p.error("-restore FILE DATA_DIR makes the data dir and exits: start the node on it afterwards")
    if args.force_new_cluster and args.join:
        p.error("-force-new-cluster restarts a surviving member as a new cluster: not with -join")
    for name in ("max_body", "max_header_bytes", "idle_timeout", "receive_timeout", "max_members", "watch_history",
                 "watch_history_bytes", "max_uncommitted_bytes", "max_batch_bytes", "max_unsent_bytes",
                 "backup_min_rate"):
        if getattr(args, name) <= 0:
            p.error(f"-{name.replace('_', '-')} must be positive")
    if args.snapshot_catch_up_entries < 0:
        p.error("-snapshot-catch-up-entries must be 0 or more (0: a follower behind a snapshot's cut gets the snapshot)")
    if not 0 <= args.snapshot_log_ratio < float("inf"):  # NaN too: no comparison holds
        p.error("-snapshot-log-ratio must be 0 or more (0: -snapshot-threshold alone)")
    if args.watch_history < MIN_HISTORY_EVENTS:  # a group (one entry's events) must fit whole, or it is never served
        p.error(f"-watch-history must be at least {MIN_HISTORY_EVENTS} (the most events one entry makes)")
    if args.max_body > MAX_BODY_LIMIT:  # an entry must fit a Raft frame (raftlib.codec.MAX_ENTRY_BYTES)
        p.error(f"-max-body must be at most {MAX_BODY_LIMIT} (a write travels in one Raft frame)")
    if args.max_batch_bytes > MAX_BATCH_LIMIT:
        p.error(f"-max-batch-bytes must be at most {MAX_BATCH_LIMIT} (a batch and the largest write after it travel "
                "in one Raft frame)")
    least_uncommitted = min_uncommitted_bytes(args.max_body)
    if args.max_uncommitted_bytes < least_uncommitted:
        p.error(f"-max-uncommitted-bytes must be at least {least_uncommitted} (twice -max-body {args.max_body}, "
                f"plus {COMMAND_OVERHEAD_BYTES} for a key and the encoding): below, the largest write is taken "
                "only when no other is pending, which steady writes never allow")
    safe = connection_bound()
    if args.max_connections is None:
        args.max_connections = min(1000, safe)
    elif not 0 < args.max_connections <= safe:
        p.error(f"-max-connections must be 1 to {safe} under this ulimit -n (descriptors kept for Raft and the log)")
    return args


def server_config(args: argparse.Namespace, secret: bytes | None) -> ServerConfig:
    return ServerConfig(
        data_dir=os.path.expanduser(args.data_dir), host=args.host, port=args.port, http_port=args.http_port,
        join=args.join, forward=args.forward, heartbeat_ms=args.heartbeat_ms, election_ms=args.election_ms,
        write_timeout_seconds=args.write_timeout, read_timeout_seconds=args.read_timeout,
        join_timeout_seconds=args.join_timeout, max_body_bytes=args.max_body, max_header_bytes=args.max_header_bytes,
        max_connections=args.max_connections, max_unsent_bytes=args.max_unsent_bytes,
        idle_timeout_seconds=args.idle_timeout,
        receive_timeout_seconds=args.receive_timeout, snapshot_threshold_bytes=args.snapshot_threshold,
        snapshot_log_ratio=args.snapshot_log_ratio,
        snapshot_mode=args.snapshot_mode,
        max_uncommitted_bytes=args.max_uncommitted_bytes, max_batch_bytes=args.max_batch_bytes,
        snapshot_catch_up_entries=args.snapshot_catch_up_entries,
        secret=secret, max_members=args.max_members, fsync=not args.no_fsync, access_log=args.verbose,
        watch_history_events=args.watch_history, watch_history_bytes=args.watch_history_bytes,
        force_new_cluster=args.force_new_cluster, force_again=args.force_new_cluster_again, name=args.name, advertise=args.advertise,
        allowed_hosts=args.allowed_hosts, backup_min_rate=args.backup_min_rate)


def load_secret(args: argparse.Namespace) -> bytes | None:
    """The cluster secret (-secret-file, else $RAFTDZMQ_SECRET), or None; exits when it cannot be had or used."""
    try:
        secret = read_secret(args.secret_file)
    except SecretError as e:
        raise SystemExit(f"raftdzmq: {e}") from None
    if secret is not None and not CURVE_AVAILABLE:
        raise SystemExit("raftdzmq: a cluster secret needs CURVE, and this pyzmq's libzmq has none (zmq.has('curve') "
                         "is False): install a pyzmq wheel")
    return secret


def print_signed_headers(args: argparse.Namespace) -> int:
    """-sign METHOD TARGET: print X-Raftdzmq-Timestamp and X-Raftdzmq-Signature lines (curl -H @FILE reads them)."""
    secret = load_secret(args)
    if secret is None:
        print(f"raftdzmq: -sign needs the cluster secret: -secret-file PATH or ${SECRET_ENV}", file=sys.stderr)
        return 2
    body = b""
    if args.sign_body == "-":
        body = sys.stdin.buffer.read()
    elif args.sign_body:
        with open(args.sign_body, "rb") as f:
            body = f.read()
    method, target = args.sign
    headers = admin_headers(secret, method.upper(), target, body) if args.sign_node is None else \
        node_request_headers(secret, args.sign_node, method.upper(), target)
    for name, value in headers.items():
        print(f"{name}: {value}")
    return 0


def restore(path: str, data_dir: str, sha256: str | None) -> int:
    """-restore FILE DATA_DIR: make the data dir (raftlib.server.restore), say what it holds, and exit."""
    try:
        index, term, keys = restore_backup(path, data_dir, sha256)
    except (RestoreError, OSError) as e:
        print(f"raftdzmq: cannot restore: {e}", file=sys.stderr)
        return 1
    print(f"restored the backup at index {index} (term {term}, {keys} keys) into {data_dir}: start a node on it "
          "(a new one-node cluster), then -join others to it")
    return 0


class JsonLogFormatter(logging.Formatter):
    """-log-format json: one JSON object a line: time (UTC, ISO 8601 with milliseconds), level, logger, message,
    node (this node's id; "-" before it is known), and exception (the traceback) when there is one."""

    def __init__(self, node_label: str) -> None:
        super().__init__()
        self.node_label = node_label

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname,
                "logger": record.name, "message": record.getMessage(), "node": self.node_label}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup_logging(args: argparse.Namespace, node_label: str = "-") -> None:
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(node_label) if args.log_format == "json" else
                         logging.Formatter(f"%(asctime)s %(levelname)s [{node_label}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("raftdzmq").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("raftlib").setLevel(TRACE if args.trace else logging.DEBUG if args.debug else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    raise_descriptor_limit()  # before parse_args: the default -max-connections depends on it
    args = parse_args(argv)
    if args.sign is not None:
        return print_signed_headers(args)
    if args.restore is not None:
        return restore(args.restore, os.path.expanduser(args.data_dir), args.restore_checksum)
    setup_logging(args)
    watch_gc_from_env()
    config = server_config(args, load_secret(args))
    try:
        server = Server(config)
    except (StorageError, CannotStart, OSError) as e:  # the first two say where; an OSError (a failed fsync, a
        # path) names it
        print(f"raftdzmq: cannot start on {config.data_dir}: {e}" if isinstance(e, OSError) else f"raftdzmq: {e}",
              file=sys.stderr)
        return 2
    setup_logging(args, server.node_id)
    freeze_after_start()  # the state on disk is loaded; nothing serves yet
    FreezeSurvivors().install()  # from now on each full collection's survivors, a sweep bounding the garbage
    try:
        server.start()
    except (OSError, zmq.ZMQError) as e:  # the Raft port (zmq), or the HTTP port
        print(f"raftdzmq: cannot listen on {server.bind_host} (-h {args.host}), ports {args.port} and "
              f"{args.http_port}: {e}", file=sys.stderr)
        return 2
    return serve(server, args.join)


def serve(server: Server, join: str | None) -> int:
    """Join when the data dir asks for it, then serve until SIGTERM or SIGINT stops the node cleanly."""
    done = gevent.event.Event()

    def on_signal() -> None:
        gevent.spawn(lambda: (server.stop(), done.set()))

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    if server.bootstrapped:
        log.info("bootstrapped a new one-node cluster")
    elif join and server.joined_before:
        log.info("this data dir already belongs to a cluster: starting normally, -join %s ignored", join)
    elif server.must_join:
        try:
            server.join(join)
        except JoinFailed as e:
            print(f"raftdzmq: {e}", file=sys.stderr)
            server.stop()
            return 1
    done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
