"""Real raftdzmq processes on loopback for tests: free ports, temporary data dirs, polling with deadlines, and
every process stopped by its pid at the end."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "raftdzmq.py")
# The last commit of main before issue 14: a release of feature level 1, which applies the commands of level 2 as
# nothing and ignores ?prev_index (tests/test_coord_api.py runs it as the "old" node of a rolling upgrade).
OLD_RELEASE = "637af7468c6a662943d8a68683cb93ecf9e6478b"


def old_release(dest: str) -> str:
    """The path of raftdzmq.py of OLD_RELEASE, extracted under `dest` with `git archive` from this checkout's
    repository (CI clones it with its history). Raises when git or the commit is missing: never a skip."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", OLD_RELEASE], capture_output=True,
                             check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return os.path.join(dest, "raftdzmq.py")


# The election timeout the tests' nodes run with unless a test gives its own (-election-ms in its flags) or asks for
# the server's default (Node(election_ms=None)): the default became 1,000 ms (etcd's, issue 13), and the tests that
# kill leaders, wait out elections or watch nodes go leaderless keep the pace they were written for at 300.
TEST_ELECTION_MS = "300"
PORT_RACE_RETRIES = 3
PORT_TAKEN = "Address already in use"  # what the server says when its -p or -hp port is taken (CannotStart)


LISTEN_PORTS_FROM = 10_000  # listening ports are picked from here to just below the kernel's ephemeral range
_picked: set[int] = set()  # the ports this process has handed out: never twice


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (net.ipv4.ip_local_port_range; Linux's default 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server to listen on, picked at random below the ephemeral range and
    never handed out twice by this process. Not from the ephemeral range (bind to port 0), where the kernel also
    picks the local port of every outgoing connection: a node killed and restarted on its ports found one taken
    by some client's connection made meanwhile (EADDRINUSE: the node exits; CI at 4f133a2, the full-disk test's
    restart), and the suite makes thousands of connections a run."""
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(LISTEN_PORTS_FROM, low) if low - LISTEN_PORTS_FROM >= 1000 else 0
        if port in _picked:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _picked:
            _picked.add(port)
            return port
    raise RuntimeError("no free port found below the ephemeral range")


class Response:
    def __init__(self, status: int, body: bytes, headers: dict) -> None:
        self.status, self.body, self.headers = status, body, headers

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:100]!r}>"


def http_request(method: str, address: str, path: str, body: bytes | str | None = None, timeout: float = 10.0,
         headers: dict | None = None) -> Response:
    """One HTTP request; raises OSError when the node does not answer."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


def metric_samples(text: str) -> dict[str, float]:
    """GET /metrics' samples: {'name{labels}': value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


_started_nodes: list["Node"] = []  # every Node this process started, for `log_tails`
LOG_TAIL_LINES = 20


def log_tails(since: float) -> str:
    """The last LOG_TAIL_LINES lines of the log of each node started by this process that still runs (a module's
    cluster too) or whose log was written at or after `since` (time.time()): what a failed test's report shows
    (tests/conftest.py), so that a failure in CI says why a node died, did not serve or lost its leadership."""
    parts = []
    for node in _started_nodes:
        running = node.proc is not None and node.proc.poll() is None
        try:
            if not running and os.path.getmtime(node.log_path) < since:
                continue
            with open(node.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(node.log_path) - 64 * 1024))
                lines = f.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        state = "running" if running else f"exited {node.proc.returncode}" if node.proc is not None else "not started"
        parts.append(f"== {node.name} ({node.log_path}, {state})\n" + "\n".join(lines))
    return "\n".join(parts)


class Node:
    def __init__(self, name: str, base_dir: str, host: str | None = None, ports: tuple[int, int] | None = None,
                 wrap: tuple[str, ...] = (), server: str = SERVER, election_ms: str | None = TEST_ELECTION_MS) -> None:
        """`host`: the -h address (default: the server's default, localhost); `ports`: (raft, http), default two
        free ports; `wrap`: a command prefix, such as ("ip", "netns", "exec", NS), that execs the server;
        `server`: the raftdzmq.py to run (this checkout's; `old_release()`'s for an older release); `election_ms`:
        the -election-ms given unless the start's flags give one (None: none, the server's default)."""
        self.server = server
        self.election_ms = election_ms
        self.name = name
        self.data_dir = os.path.join(base_dir, name)
        self.host = host
        self.ports_picked = ports is None  # free ports picked here: another may be picked again (start)
        self.port, self.http_port = ports or (free_port(), free_port())
        self.address = f"{host or '127.0.0.1'}:{self.http_port}"
        self.log_path = os.path.join(base_dir, f"{name}.log")
        self.wrap = wrap
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0  # where the current process's lines start in the log file

    def start(self, *extra: str, join: str | None = None, env: dict[str, str] | None = None) -> "Node":
        """Start the server (`env`: variables added to this process's environment) and wait until it serves HTTP
        or exits. A new node whose free ports were taken by another process between their pick and its bind (the
        suite runs processes side by side; the node says so and exits before its data dir gets an identity) is
        started again on other free ports, at most PORT_RACE_RETRIES times: its address is not known to anyone yet."""
        new_node = self.proc is None and self.ports_picked and not os.path.exists(self.data_dir)
        for _ in range(PORT_RACE_RETRIES):
            self._start(extra, join, env)
            if not (new_node and self.exited() and PORT_TAKEN in self.log_text(current=True)):
                break
            self.port, self.http_port = free_port(), free_port()
            self.address = f"{self.address.rsplit(':', 1)[0]}:{self.http_port}"
        return self

    def _start(self, extra: tuple[str, ...], join: str | None, env: dict[str, str] | None) -> None:
        args = [*self.wrap, sys.executable, self.server, "-p", str(self.port), "-hp", str(self.http_port)]
        if self.host:
            args += ["-h", self.host]
        if join:
            args += ["-join", join]
        if self.election_ms is not None and not gives_flag(extra, "election-ms"):
            args += ["-election-ms", self.election_ms]
        args += list(extra) + [self.data_dir]
        self._close_log()  # the last process's, when it died by itself
        self._log = open(self.log_path, "ab")
        if self not in _started_nodes:
            _started_nodes.append(self)
        self.log_offset = self._log.tell()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **env} if env else None)
        try:
            self._wait_serving()
        except BaseException:
            self.kill()
            raise

    def _wait_serving(self) -> None:
        # exited() first: a refused connection raises, and a process that died while starting never serves.
        wait_for(lambda: self.exited() or self.request("GET", "/status", timeout=1).status == 200, 15,
                 f"{self.name} to serve HTTP")

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def request(self, method: str, path: str, body=None, timeout: float = 10.0, headers=None) -> Response:
        return http_request(method, self.address, path, body, timeout, headers)

    def status(self) -> dict:
        return self.request("GET", "/status", timeout=2).json()

    def rss_bytes(self) -> int:
        """The process's resident memory (VmRSS)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=15)
        self._close_log()

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL if it did not stop; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def log_text(self, current: bool = False) -> str:
        """The node's log; with `current`, only what the current (or last) process wrote."""
        with open(self.log_path, "rb") as f:
            if current:
                f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def wipe(self) -> None:
        """Delete the data dir (the process must be stopped): the next start is a new node."""
        assert not self.proc or self.proc.poll() is not None, f"{self.name} is running"
        shutil.rmtree(self.data_dir, ignore_errors=True)


def gives_flag(args, name: str) -> bool:
    """Whether the command line `args` gives the flag `name` (-name or --name, with its value apart or after =)."""
    return any(a.lstrip("-") == name or a.lstrip("-").startswith(name + "=") for a in args if a.startswith("-"))


@contextlib.contextmanager
def paused(nodes: list[Node]):
    """SIGSTOP `nodes` for the block (a pause: a long GC, a stopped VM), SIGCONT them after it whatever happens."""
    for n in nodes:
        os.kill(n.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for n in nodes:
            os.kill(n.proc.pid, signal.SIGCONT)


class LocalCluster:
    def __init__(self, base_dir: str, size: int = 3, extra: tuple[str, ...] = (), nodes: list[Node] | None = None
                 ) -> None:
        self.base_dir = base_dir
        self.extra = extra
        self.nodes = nodes or [Node(f"node.{i}", base_dir) for i in range(1, size + 1)]

    def start(self) -> "LocalCluster":
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "LocalCluster":
        first = self.nodes[0].start(*self.extra)
        wait_for(lambda: first.status()["role"] == "leader", 10, "the first node to lead")
        for n in self.nodes[1:]:
            n.start(*self.extra, join=first.address)
            # A bound, not a speed: a join waits for the leader to have applied its log and for the membership lock
            # (the feature-level raiser holds it only to propose the raise, no longer while it asks every member's
            # /status); CI once took over 15 s here on a loaded machine, before that change.
            wait_for(lambda n=n: self._is_voter(n), 30, f"{n.name} to become a voter")
        return self

    def _is_voter(self, node: Node) -> bool:
        st = self.leader().status()
        return any(m["http_address"].endswith(f":{node.http_port}") and m["role"] == "voter" for m in st["members"])

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def leader(self, timeout: float = 10.0) -> Node:
        def find():
            for n in self.running():
                try:
                    if n.status()["role"] == "leader":
                        return n
                except OSError:
                    pass
            return None

        return wait_for(find, timeout, "a leader")

    def write(self, key: str, value: str | bytes, timeout: float = 10.0) -> Response:
        """Write through whichever node leads, retrying until acknowledged."""

        def attempt():
            r = self.leader().request("POST", f"/db/{key}", value)
            return r if r.status == 200 else None

        return wait_for(attempt, timeout, f"write {key}={value}", interval=0.1)

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (not root, or no permission even as root), or None."""
    if os.geteuid() != 0:
        return "needs root: partitions use network namespaces and iptables rules"
    name = f"rdzprobe{os.getpid() % 100000}"
    try:
        out = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return f"cannot run ip: {e}"
    if out.returncode != 0:
        return f"cannot make a network namespace here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    for tool in ("iptables",):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            return f"{tool} is not installed"
    return None
