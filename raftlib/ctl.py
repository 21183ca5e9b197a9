"""raftdzmqctl: the command line of a raftdzmq cluster, in etcdctl's shape, on raftlib.client.

    raftdzmqctl --endpoints=localhost:8080,localhost:8081 put cfg v1
    raftdzmqctl get cfg                        # the raw value on stdout
    raftdzmqctl put blob < file.bin            # no VALUE: stdin, bytes intact
    raftdzmqctl -w json endpoint status
    raftdzmqctl lock jobs -- ./run-job.sh      # runs it holding the lock; $RAFTDZMQ_LOCK_TOKEN is the fencing token

Its rules:
- Endpoints from --endpoints, else $RAFTDZMQ_ENDPOINTS, else localhost:8080; `-w table` (default: text for
  people) or `-w json` (one JSON document, or one per line for watch).
- Exit codes: 0 done, 1 failed (the request was refused or could not be made), 2 usage (bad flags or arguments),
  3 outcome unknown (a write that may or may not have applied: read before retrying). A failure is one line on
  stderr, `raftdzmqctl: ...`.
- Values travel as bytes: `get` writes the value's bytes exactly (no newline added), `put` without VALUE reads
  stdin whole.
- Signed admin requests (member remove, member transfer, snapshot save) sign with the cluster secret from
  --secret-file or $RAFTDZMQ_SECRET when one is given (raftlib.server.admin, which loads no gevent); a snapshot
  save is signed for the node it asks (its id from that node's GET /status) with a fresh nonce (Client.save_snapshot).
- `lock NAME -- COMMAND` passes the command's exit code on (it is the command's to say what 1-3 mean then); a
  signal to raftdzmqctl (SIGINT, SIGTERM) is passed to the command, and the lock is released when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from raftlib.client import (Client, KeyValue, Member, OutcomeUnknown, RaftdzmqError, Unavailable, normalize_endpoint)

ENDPOINTS_ENV = "RAFTDZMQ_ENDPOINTS"
TOKEN_ENV = "RAFTDZMQ_LOCK_TOKEN"
EXIT_FAILED, EXIT_USAGE, EXIT_UNKNOWN = 1, 2, 3


class Usage(Exception):
    """Bad arguments: exit 2 with the message."""


def _kv_json(kv: KeyValue) -> dict[str, Any]:
    try:
        value: dict[str, str] = {"value": kv.value.decode()}
    except UnicodeDecodeError:
        import base64
        value = {"value_base64": base64.b64encode(kv.value).decode()}
    return {"key": kv.key, **value, "create_index": kv.create_index, "modify_index": kv.modify_index}


def table(rows: list[list[str]], header: list[str]) -> str:
    """An etcdctl-style box table."""
    cells = [header] + rows
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(row: list[str]) -> str:
        return "|" + "|".join(f" {str(c):<{w}} " for c, w in zip(row, widths)) + "|"

    return "\n".join([line, fmt(header), line, *(fmt(r) for r in rows), line])


class Ctl:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = args.write_out == "json"
        self.client = Client(args.endpoints, timeout=args.timeout)

    def out(self, text_form: str | None, json_form: object) -> None:
        if self.json:
            print(json.dumps(json_form))
        elif text_form is not None:
            print(text_form)

    # ---- keys ----

    def get(self) -> int:
        kv = self.client.get(self.args.key)
        if self.json:
            print(json.dumps(_kv_json(kv)))
        else:
            sys.stdout.buffer.write(kv.value)
            sys.stdout.buffer.flush()
        return 0

    def put(self) -> int:
        a = self.args
        value = a.value.encode() if a.value is not None else sys.stdin.buffer.read()
        prev_exist = None if a.prev_exist is None else a.prev_exist == "true"
        index = self.client.put(a.key, value, prev_value=a.prev_value, prev_index=a.prev_index,
                                prev_exist=prev_exist, lease=a.lease)
        self.out("OK", {"index": index})
        return 0

    def delete(self) -> int:
        a = self.args
        if a.prefix:
            deleted = self.client.delete_prefix(a.key)
            self.out(str(deleted), {"deleted": deleted})
        else:
            index = self.client.delete(a.key, prev_index=a.prev_index)
            self.out("1", {"deleted": 1, "index": index})
        return 0

    def ls(self) -> int:
        keys = self.client.list(self.args.prefix, limit=self.args.limit)
        self.out("\n".join(keys) if keys else None, keys)
        return 0

    def watch(self) -> int:
        a = self.args
        key, prefix = (None, a.key) if a.prefix else (a.key, None)
        with self.client.watch(key=key, prefix=prefix, from_index=a.from_index) as events:
            for event in events:
                if self.json:
                    item = {"type": event.type, "key": event.key, "index": event.index,
                            "create_index": event.create_index}
                    if event.value is not None:
                        item.update({k: v for k, v in _kv_json(KeyValue(event.key, event.value, 0, 0)).items()
                                     if k.startswith("value")})
                    print(json.dumps(item), flush=True)
                else:
                    print(f"{event.type.upper()} {event.key} {event.index}", flush=True)
                    if event.value is not None:
                        sys.stdout.buffer.write(event.value + b"\n")
                        sys.stdout.buffer.flush()
        return 0

    def txn(self) -> int:
        try:
            body = json.loads(sys.stdin.buffer.read())
        except ValueError as e:
            raise Usage(f"txn reads a JSON transaction on stdin: {e}") from None
        result = self.client.txn_json(body)
        results = [{**r, "kvs": [_kv_json(kv) for kv in r["kvs"]]} if "kvs" in r else r for r in result.results]
        answer = {"succeeded": result.succeeded, "index": result.index, "results": results}
        self.out(("SUCCESS" if result.succeeded else "FAILURE") + "".join(f"\n{json.dumps(r)}" for r in results),
                 answer)
        return 0

    # ---- leases ----

    def lease(self) -> int:
        a = self.args
        if a.lease_command == "grant":
            lease_id, ttl = self.client.grant(a.ttl)
            self.out(f"lease {lease_id} granted with TTL({ttl}s)", {"id": lease_id, "ttl": ttl})
        elif a.lease_command == "revoke":
            deleted = self.client.revoke(a.id)
            self.out(f"lease {a.id} revoked ({deleted} keys deleted)", {"id": a.id, "deleted": deleted})
        elif a.lease_command == "ls":
            leases = self.client.leases()
            self.out("\n".join(f"{info['id']} ttl {info['ttl']}s remaining {info['remaining']:.1f}s"
                               for info in leases) or None, leases)
        else:  # keepalive: until interrupted, or --once
            while True:
                ttl = self.client.keepalive(a.id)
                self.out(f"lease {a.id} keepalived with TTL({ttl})", {"id": a.id, "ttl": ttl})
                sys.stdout.flush()
                if a.once:
                    return 0
                time.sleep(max(ttl / 3.0, 0.5))
        return 0

    # ---- lock ----

    def lock(self) -> int:
        a = self.args
        command = a.command
        lock = self.client.lock(a.name, ttl=a.ttl, timeout=a.wait)
        with lock as token:
            if not command:  # hold it until interrupted
                self.out(f"{a.name} locked: token {token}", {"name": a.name, "token": token})
                sys.stdout.flush()
                try:
                    while not lock.lost:
                        time.sleep(0.2)
                except KeyboardInterrupt:
                    return 0
                raise RaftdzmqError(f"{a.name}: the lock's lease was lost")
            return run_holding(command, {TOKEN_ENV: str(token)})

    # ---- the cluster ----

    def member(self) -> int:
        a = self.args
        if a.member_command == "list":
            members = self.client.members()
            self.out(table([[m.id, m.role, m.http_address, m.raft_address] for m in members],
                           ["ID", "ROLE", "HTTP ADDRESS", "RAFT ADDRESS"]),
                     [m.__dict__ for m in members])
            return 0
        secret = cluster_secret(a.secret_file)
        if a.member_command == "remove":
            self.client.remove_member(a.id, secret=secret)
        else:
            self.client.transfer_leadership(a.id, secret=secret)
        self.out(f"member {a.id} removed" if a.member_command == "remove" else f"leadership transferred to {a.id}",
                 {"id": a.id, "done": a.member_command})
        return 0

    def _members_or_endpoints(self) -> list[Member]:
        """Every member (asked of the cluster), or, when no member list can be had, the endpoints as given."""
        try:
            return self.client.members()
        except RaftdzmqError:
            return [Member("?", "?", e, "?", None) for e in self.client.endpoints]

    def endpoint(self) -> int:
        members = self._members_or_endpoints()
        if self.args.endpoint_command == "health":
            return self._health(members)
        statuses: list[dict[str, Any]] = []
        for m in members:
            try:
                statuses.append({"address": m.http_address, **self.client.status(m.http_address)})
            except RaftdzmqError as e:
                statuses.append({"address": m.http_address, "node_id": m.id, "error": str(e)})
        leader_commit = max((s.get("commit_index", 0) for s in statuses if s.get("role") == "leader"), default=None)
        rows = []
        for s in statuses:
            if "error" in s:
                rows.append([s["node_id"], s["address"], "unreachable", "", "", "", "", "", s["error"]])
                continue
            lag = "" if leader_commit is None else str(max(0, leader_commit - s["applied_index"]))
            s["lag"] = None if leader_commit is None else int(lag)
            rows.append([s["node_id"], s["address"], s["role"], str(s["term"]), str(s["commit_index"]),
                         str(s["applied_index"]), lag, "" if s.get("keys") is None else str(s["keys"]),
                         _size(s.get("data_size"))])
        self.out(table(rows, ["ID", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED", "LAG", "KEYS", "DATA SIZE"]),
                 statuses)
        return 0 if all("error" not in s for s in statuses) else EXIT_FAILED

    def _health(self, members: list[Member]) -> int:
        rows, out = [], []
        for m in members:
            started = time.monotonic()
            try:
                answer = self.client.ask(m.http_address, "GET", "/readyz", timeout=min(self.args.timeout, 5.0))
                healthy, reason = answer.status == 200, answer.reason
            except Unavailable as e:
                healthy, reason = False, str(e)
            took = time.monotonic() - started
            rows.append([m.http_address, str(healthy).lower(), f"{took * 1000:.1f}ms", "" if healthy else reason])
            out.append({"endpoint": m.http_address, "health": healthy, "took_seconds": round(took, 4),
                        **({} if healthy else {"error": reason})})
        self.out(table(rows, ["ENDPOINT", "HEALTH", "TOOK", "ERROR"]), out)
        return 0 if all(item["health"] for item in out) else EXIT_FAILED

    def snapshot(self) -> int:
        index, digest, size = self.client.save_snapshot(
            self.args.file, timeout=self.args.snapshot_timeout,
            secret=cluster_secret(self.args.secret_file))
        self.out(f"snapshot saved at index {index} to {self.args.file} ({size} bytes, sha256 {digest})",
                 {"file": self.args.file, "index": index, "sha256": digest, "bytes": size})
        return 0


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(n)


def cluster_secret(secret_file: str | None) -> bytes | None:
    """The cluster secret when one is given (--secret-file or $RAFTDZMQ_SECRET), else None: the client signs with
    it (admin requests; a snapshot save for the node it asks, with a fresh nonce)."""
    from raftlib.server.admin import SecretError, read_secret
    try:
        return read_secret(secret_file)
    except SecretError as e:
        raise Usage(str(e)) from None


def run_holding(command: list[str], env: dict[str, str]) -> int:
    """Run `command` with `env` added; pass SIGINT and SIGTERM on to it; its exit code (128 + n for signal n)."""
    try:
        proc = subprocess.Popen(command, env={**os.environ, **env})
    except OSError as e:
        raise RaftdzmqError(f"cannot run {command[0]}: {e.strerror}") from None

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def exit_code(e: Exception) -> int:
    """The module's exit codes: 2 usage, 3 outcome unknown, 1 any other failure."""
    if isinstance(e, (Usage, ValueError)):
        return EXIT_USAGE
    return EXIT_UNKNOWN if isinstance(e, OutcomeUnknown) else EXIT_FAILED


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Usage(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="raftdzmqctl", description="A command line for a raftdzmq cluster (etcdctl's shape).")
    p.add_argument("--endpoints", default=os.environ.get(ENDPOINTS_ENV, "localhost:8080"),
                   help=f"host:port,host:port of the cluster's HTTP ports (default ${ENDPOINTS_ENV}, else "
                        "localhost:8080)")
    p.add_argument("-w", "--write-out", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each request may take, failover included")
    p.add_argument("--secret-file", help="the cluster secret (or $RAFTDZMQ_SECRET): signs member remove and "
                   "transfer, and snapshot save")
    sub = p.add_subparsers(dest="command_name", required=True, parser_class=_Parser)

    def add(name: str, run: Callable[[Ctl], int], help: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help)
        q.set_defaults(run=run)
        return q

    q = add("get", Ctl.get, "print a key's raw value")
    q.add_argument("key")
    q = add("put", Ctl.put, "write a key (no VALUE: read it from stdin)")
    q.add_argument("key")
    q.add_argument("value", nargs="?")
    q.add_argument("--lease", type=int, help="put the key on this lease")
    q.add_argument("--prev-value", help="only when the current value is this")
    q.add_argument("--prev-index", type=int, help="only when the key's modify index is this (0: missing)")
    q.add_argument("--prev-exist", choices=("true", "false"), help="only when the key exists (true) or not (false)")
    q = add("del", Ctl.delete, "delete a key (--prefix: every key under it)")
    q.add_argument("key")
    q.add_argument("--prefix", action="store_true")
    q.add_argument("--prev-index", type=int)
    q = add("ls", Ctl.ls, "list the keys under a prefix")
    q.add_argument("prefix", nargs="?", default="")
    q.add_argument("--limit", type=int)
    q = add("watch", Ctl.watch, "print changes of a key (or --prefix) until interrupted")
    q.add_argument("key")
    q.add_argument("--prefix", action="store_true", help="KEY is a prefix")
    q.add_argument("--from", dest="from_index", type=int, help="the changes after this index (default: from now)")
    add("txn", Ctl.txn, "run the JSON transaction on stdin (README: POST /txn)")
    q = add("lease", Ctl.lease, "grant, keepalive, revoke, ls")
    lease = q.add_subparsers(dest="lease_command", required=True, parser_class=_Parser)
    lease.add_parser("grant").add_argument("ttl", type=int)
    keepalive = lease.add_parser("keepalive")
    keepalive.add_argument("id", type=int)
    keepalive.add_argument("--once", action="store_true", help="one keepalive, then exit")
    lease.add_parser("revoke").add_argument("id", type=int)
    lease.add_parser("ls")
    q = add("lock", Ctl.lock, "run COMMAND holding the lock NAME ($RAFTDZMQ_LOCK_TOKEN: its fencing token)")
    q.add_argument("name")
    q.add_argument("--ttl", type=int, default=10, help="the lock's lease TTL in seconds (default 10)")
    q.add_argument("--wait", type=float, help="seconds to wait for the lock (default: no bound)")
    q.set_defaults(command=[])  # what follows `--` (main() takes it off before parsing)
    q = add("member", Ctl.member, "list, remove ID, transfer ID")
    member = q.add_subparsers(dest="member_command", required=True, parser_class=_Parser)
    member.add_parser("list")
    member.add_parser("remove").add_argument("id")
    member.add_parser("transfer").add_argument("id")
    q = add("endpoint", Ctl.endpoint, "status (a table of every member) or health (/readyz of each)")
    q.add_argument("endpoint_command", choices=("status", "health"))
    q = add("snapshot", Ctl.snapshot, "save FILE: a backup of the state, written atomically")
    q.add_argument("snapshot_command", choices=("save",))
    q.add_argument("file")
    q.add_argument("--snapshot-timeout", type=float, default=600.0,
                   help="seconds the node may take to write and send it (default 600)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "lock" in argv and "--" in argv[argv.index("lock"):]:  # lock NAME [flags] -- COMMAND...
        split = argv.index("--", argv.index("lock"))
        argv, command = argv[:split], argv[split + 1:]
    try:
        args = parser().parse_args(argv)
        if command:
            args.command = command
        for endpoint in args.endpoints.split(","):
            normalize_endpoint(endpoint)
        ctl = Ctl(args)
        return args.run(ctl)
    except (Usage, ValueError, RaftdzmqError) as e:
        hint = " (raftdzmqctl --help)" if isinstance(e, Usage) else ""
        print(f"raftdzmqctl: {e}{hint}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `raftdzmqctl watch ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
