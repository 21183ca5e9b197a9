"""The README's examples typed as shown (issue 14: "everything above works through curl as the README shows it").

The code blocks are read from README.md itself: the walk-through of "Running", the Python client and `raftdzmqctl`,
"Indices, compare-and-set and transactions", "Leases and TTL keys", "Watches", the health rows of the HTTP API table,
"Backups and restores" and "Running in production" (two more nodes with a secret, for raftdzmqctl's signed lines).
Each command runs in bash against a real 3-node cluster, as a user types it: only the
ports (8080-8082 are free ports here) and the ids and indices change, to what the earlier answers gave. Each answer
is checked against the README's comment beside it: status, JSON fields and the values that are deterministic;
the README's ids and indices stand for "some number", bound to the ones the cluster gave, one for one and in the
same order (class Numbers). A command the README changes or adds fails here (its list below) until the walk
handles it. `curl` runs through a wrapper that also writes the status and headers to stderr (stdout is what the
user sees); `raftdzmqctl` and `raftdzmq` run this checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from procs import ROOT, LocalCluster, free_port, wait_for

README = os.path.join(ROOT, "README.md")
README_PORTS = ("8080", "8081", "8082")


# ---- the README's code blocks ----

def section(title: str) -> list[str]:
    """The lines of the README section under the heading `title`, up to the next heading of its level or higher
    (a `# comment` inside a code block is no heading)."""
    with open(README) as f:
        lines = f.read().splitlines()
    fenced, start, level = False, None, 0
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"(#+) (.*)", line)
        if heading and start is None and heading.group(2).strip() == title:
            start, level = i + 1, len(heading.group(1))
        elif heading and start is not None and len(heading.group(1)) <= level:
            return lines[start:i]
    assert start is not None, f"README.md has no heading {title!r}"
    return lines[start:]


def code_blocks(title: str) -> list[str]:
    blocks, current = [], None
    for line in section(title):
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _split_comment(line: str, quote: str | None) -> tuple[str, str | None, str | None]:
    """(code, comment or None, the quote still open at the line's end)."""
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip(), None
    return line.rstrip(), None, quote


def commands(block: str) -> list[tuple[str, str]]:
    """(command, comment) of each command of a shell block: a command goes on while a quote is open (the txn's
    body) or after a line ending in a backslash; its comment is the `# ...` after it, and `#` lines right after
    it go on with that comment."""
    out: list[list[str]] = []
    quote = None
    for line in block.splitlines():
        if out and out[-1][0].endswith("\\"):
            code, comment, quote = _split_comment(line, None)
            out[-1][0] += "\n" + code
        elif quote:
            code, comment, quote = _split_comment(line, quote)
            out[-1][0] += "\n" + code
        elif line.lstrip().startswith("#"):
            if out:
                out[-1][1] = (out[-1][1] + " " + line.lstrip()[1:].strip()).strip()
            continue
        elif not line.strip():
            continue
        else:
            code, comment, quote = _split_comment(line, None)
            out.append([code, ""])
        if comment:
            out[-1][1] = (out[-1][1] + " " + comment).strip()
    return [(c, m) for c, m in out]


def table_row(request: str) -> str:
    with open(README) as f:
        rows = [line for line in f if line.startswith(f"| `{request}` |")]
    assert len(rows) == 1, f"README's HTTP API table has {len(rows)} rows for {request}"
    return rows[0]


# ---- what the comments say ----

INDEX_FIELDS = {"id", "index", "create_index", "modify_index"}


class Numbers:
    """The README's ids and indices in one example, bound to the cluster's: a README number always means the same
    number here, two README numbers never mean the same one, and they keep their order (the log only grows).
    Past the example's first answer (which finds what came before it: the README's 12 and 40), a new number keeps
    the README's distance to the largest one below it: the README counts the log entries its commands make."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.bound: dict[int, int] = {}
        self.answers = 0

    def answer(self) -> None:
        """A new answer's numbers follow."""
        self.answers += 1

    def bind(self, readme: int, actual: int, what: str) -> None:
        if readme in self.bound:
            assert self.bound[readme] == actual, \
                f"{self.where}: the README's {readme} ({what}) is {actual} here, but {self.bound[readme]} before"
            return
        for r, a in self.bound.items():
            assert a != actual and (r < readme) == (a < actual), \
                f"{self.where}: the README's {readme} ({what}) is {actual} here, against {r} -> {a}: not in its order"
        below = [r for r in self.bound if r < readme]
        if self.answers > 1 and below:
            r = max(below)
            assert actual - self.bound[r] == readme - r, \
                f"{self.where}: the README's {readme} ({what}) is {actual} here, {actual - self.bound[r]} after its " \
                f"{r} ({self.bound[r]} here), not {readme - r}"
        self.bound[readme] = actual

    def actual(self, readme: int) -> int:
        """What the README's number stands for; one no answer gave yet (a number a user makes up) keeps its
        distance to the nearest one bound (the README's 58 in a lease section whose 57 is 23 here: 24)."""
        if readme not in self.bound:
            assert self.bound, f"{self.where}: the README uses {readme} before any answer gave an index"
            near = min(self.bound, key=lambda r: (abs(r - readme), r))
            self.bind(readme, self.bound[near] + readme - near, "a number made up from its neighbour")
        return self.bound[readme]

    ID_IN_COMMAND = re.compile(r"(?<=prev_index=)[1-9]\d*|(?<=lease=)\d+|(?<=/lease/)\d+|(?<=Last-Event-ID: )\d+"
                               r"|(?<=from=)\d+|(?<=keepalive )\d+|(?<=revoke )\d+|(?<=\")\d+(?=\")")

    def substitute(self, command: str) -> str:
        return self.ID_IN_COMMAND.sub(lambda m: str(self.actual(int(m.group()))), command)


def documented_json(comment: str):
    """The JSON in a comment (after its prose, "revoke: {...}"); `, ...]` and `, ...}` say more may follow."""
    start = min(i for i in (comment.find("{"), comment.find("[")) if i >= 0)
    text = comment[start:].replace(", ...]", ', "..."]').replace(", ...}", ', "...": "..."}')
    return json.JSONDecoder().raw_decode(text)[0]


def match_answer(expected, actual, numbers: Numbers, path: str = "answer") -> None:
    numbers.answer()
    match(expected, actual, numbers, path)


def match(expected, actual, numbers: Numbers, path: str) -> None:
    """`actual` as the README documents it: the same fields (more where it says `...`), the same values, ids and
    indices bound through `numbers`, a fractional number (a remaining time) any number."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: {actual!r} is no object"
        keys = set(expected) - {"..."}
        assert keys <= set(actual) if "..." in expected else keys == set(actual), \
            f"{path}: fields {sorted(actual)}, the README's {sorted(keys)}"
        for k in keys:
            if k in INDEX_FIELDS:
                assert type(actual[k]) is type(expected[k]) and str(actual[k]).isdigit(), f"{path}.{k}: {actual[k]!r}"
                numbers.bind(int(expected[k]), int(actual[k]), f"{path}.{k}")
            else:
                match(expected[k], actual[k], numbers, f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: {actual!r} is no list"
        more = expected[-1:] == ["..."]
        items = expected[:-1] if more else expected
        assert len(actual) >= len(items) if more else len(actual) == len(items), f"{path}: {actual!r}"
        for i, item in enumerate(items):
            match(item, actual[i], numbers, f"{path}[{i}]")
    elif isinstance(expected, float) and not expected.is_integer():
        assert isinstance(actual, (int, float)) and not isinstance(actual, bool), f"{path}: {actual!r}"
    else:
        assert actual == expected, f"{path}: {actual!r}, the README's {expected!r}"


def documented_headers(comment: str) -> dict[str, str]:
    return dict(re.findall(r"(X-Raft-[\w-]+): ([^,)\s]+)", comment))


def match_headers(comment: str, headers: dict[str, str], numbers: Numbers) -> None:
    numbers.answer()
    expected = documented_headers(comment)
    assert expected, f"no header in the comment {comment!r}"
    for name, value in expected.items():
        got = headers.get(name.lower())
        assert got is not None, f"no {name} in {headers}"
        if value.isdigit():
            assert got.isdigit(), f"{name}: {got!r}"
            numbers.bind(int(value), int(got), name)
        elif value.endswith("..."):  # a digest's first digits
            assert re.fullmatch(r"[0-9a-f]{64}", got), f"{name}: {got!r}"
        else:
            assert got == value, f"{name}: {got!r}, the README's {value!r}"


def match_text(documented: str, output: str, numbers: Numbers) -> None:
    """A line as the README quotes it, `...` any text; the numbers after "lease " and "index " are ids and
    indices, bound; the others are as quoted."""
    pattern = re.escape(documented).replace(r"\.\.\.", ".*")
    pattern = re.sub(r"(?<=lease\\ )\d+|(?<=index\\ )\d+", lambda m: f"(?P<n{m.group()}>\\d+)", pattern)
    numbers.answer()
    found = re.search(pattern, output)
    assert found, f"{output!r} is not the README's {documented!r}"
    for name, value in found.groupdict().items():
        numbers.bind(int(name[1:]), int(value), documented)


# ---- running commands as typed ----

class Shell:
    """bash in a working directory, with this checkout's `raftdzmqctl` and `raftdzmq` on the PATH, and `curl`
    wrapped to also write `@@STATUS@@HEADERS-AS-JSON@@` to stderr."""

    def __init__(self, tmp_path, cluster: LocalCluster) -> None:
        self.cwd = str(tmp_path / "work")
        os.makedirs(self.cwd)
        bin_dir = str(tmp_path / "bin")
        os.makedirs(bin_dir)
        curl = shutil.which("curl")
        assert curl, "curl is not installed"
        scripts = {
            "curl": f"#!/bin/sh\nexec {curl} \"$@\" -w '%{{stderr}}@@%{{http_code}}@@%{{header_json}}@@\\n'\n",
            "raftdzmqctl": f"#!/bin/sh\nexec {sys.executable} -m raftlib.ctl \"$@\"\n",
            "raftdzmq": f"#!/bin/sh\nexec {sys.executable} {ROOT}/raftdzmq.py \"$@\"\n",
        }
        for name, text in scripts.items():
            path = os.path.join(bin_dir, name)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o755)
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONPATH": ROOT}
        self.env.pop("RAFTDZMQ_ENDPOINTS", None)
        self.ports = {readme: str(n.http_port) for readme, n in zip(README_PORTS, cluster.nodes)}

    def typed(self, command: str, numbers: Numbers | None = None) -> str:
        for readme, port in self.ports.items():
            command = command.replace(f"localhost:{readme}", f"localhost:{port}")
        return numbers.substitute(command) if numbers else command

    def run(self, command: str, numbers: Numbers | None = None, stdin: bytes | None = None) -> "Ran":
        typed = self.typed(command, numbers)
        proc = subprocess.run(["bash", "-c", typed], cwd=self.cwd, env=self.env, capture_output=True, timeout=60,
                              input=stdin)
        return Ran(typed, proc.returncode, proc.stdout, proc.stderr)

    def start(self, command: str, numbers: Numbers | None = None) -> "Running":
        return Running(self.typed(command, numbers), self)


class Ran:
    def __init__(self, command: str, returncode: int, stdout: bytes, stderr: bytes) -> None:
        self.command, self.returncode, self.stdout, self.stderr = command, returncode, stdout, stderr
        self.text = stdout.decode(errors="replace")
        answers = re.findall(r"@@(\d{3})@@(.*?)@@\n", stderr.decode(errors="replace"), re.S)
        self.status = int(answers[-1][0]) if answers else None
        self.headers = {k: v[-1] for k, v in json.loads(answers[-1][1]).items()} if answers else {}

    def __repr__(self) -> str:
        return f"<{self.command!r}: exit {self.returncode}, {self.status}, {self.stdout[:300]!r} {self.stderr[-300:]!r}>"


class Running:
    """A command that runs until stopped (a watch), its output gathered by a thread."""

    def __init__(self, command: str, shell: Shell) -> None:
        self.command = command
        self.proc = subprocess.Popen(["bash", "-c", f"exec {command}" if command.startswith("curl") else command],
                                     cwd=shell.cwd, env=shell.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.out = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            self.out += chunk

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: bash and what it runs, by this pid
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)


def sse_frames(text: str) -> list[dict[str, str]]:
    """The stream's frames with an event: {"id", "event", "data"}."""
    frames = []
    for raw in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in raw.splitlines() if line and not line.startswith(":"))
        if "event" in fields:
            frames.append(fields)
    return frames


# ---- the walk ----

@pytest.fixture
def walk(tmp_path):
    cluster = LocalCluster(str(tmp_path)).start()
    try:
        leader = cluster.nodes[0]
        assert cluster.leader() is leader
        wait_for(lambda: all(n.status()["cluster_feature_level"] >= 2 for n in cluster.nodes), 15, "feature level 2")
        yield cluster, Shell(tmp_path, cluster)
    finally:
        cluster.stop()


def written(shell: Shell, key: str, value: str) -> None:
    """A write of the user's own, between the README's examples."""
    ran = shell.run(f"curl -XPOST localhost:8080/db/{key} --data-binary {value}")
    assert (ran.returncode, ran.status) == (0, 200), ran


def check_silent_write(ran: Ran) -> None:
    """A command without a comment: a write that succeeds (200) and prints nothing, as curl shows it."""
    assert (ran.returncode, ran.status, ran.stdout) == (0, 200, b""), ran


def test_the_readmes_examples_answer_as_their_comments_say(walk, tmp_path):
    cluster, shell = walk
    walkthrough(shell)
    client_and_ctl(cluster, shell)
    indices_and_transactions(shell)
    leases(shell)
    watches(shell)
    health(shell)
    backups(shell, tmp_path)
    membership_last(cluster, shell)
    production_with_a_secret(shell, tmp_path)


def walkthrough(shell: Shell) -> None:
    """"Running": the `$ ` lines of its first answered block, and what they print."""
    block = next(b for b in code_blocks("Running") if b.startswith("$ curl -XPOST"))
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    assert [c for c, _ in steps] == [
        "curl -XPOST localhost:8080/db/foo --data-binary 'bar'", "curl localhost:8080/db/foo",
        "curl localhost:8081/db/foo", "curl localhost:8082/db/foo"]
    for command, output in steps:
        ran = shell.run(command)
        assert ran.returncode == 0 and ran.status == 200 and ran.text == "".join(output), (ran, output)


CTL_LINES = [
    "export RAFTDZMQ_ENDPOINTS=localhost:8080,localhost:8081,localhost:8082",
    "raftdzmqctl put cfg v1; raftdzmqctl get cfg",
    "raftdzmqctl put blob < photo.jpg",
    "raftdzmqctl ls app/; raftdzmqctl del app/ --prefix; raftdzmqctl watch app/ --prefix",
    "raftdzmqctl txn < txn.json",
    "raftdzmqctl lease grant 30",
    "raftdzmqctl lease keepalive 57 --once",
    "raftdzmqctl lease revoke 57; raftdzmqctl lease ls",
    "raftdzmqctl lock jobs -- ./run-job.sh",
    "raftdzmqctl member list; raftdzmqctl member transfer ID; raftdzmqctl member remove ID",
    "raftdzmqctl --secret-file ~/secret member remove ID",
    "raftdzmqctl -w json endpoint status",
    "raftdzmqctl endpoint health",
    "raftdzmqctl snapshot save backup.snap",
    "raftdzmqctl --secret-file ~/secret snapshot save backup.snap",
]
# The membership line runs last (membership_last): it moves the leader off 8080.
CTL_LATER = {"raftdzmqctl member list; raftdzmqctl member transfer ID; raftdzmqctl member remove ID"}
# With a secret: on the two nodes of "Running in production" (production_with_a_secret).
CTL_SIGNED = {"raftdzmqctl --secret-file ~/secret member remove ID",
                "raftdzmqctl --secret-file ~/secret snapshot save backup.snap"}


def client_and_ctl(cluster: LocalCluster, shell: Shell) -> None:
    """"The Python client and raftdzmqctl": the Python block runs (but for its endless watch loop), then every
    raftdzmqctl line, with the files it names made as a user would (photo.jpg, txn.json, run-job.sh)."""
    python, ctl = code_blocks("The Python client and `raftdzmqctl`")
    endless = 'for event in c.watch(prefix="app/"): ...'
    lines = python.splitlines()
    assert [line.split("  #")[0].strip() for line in lines].count(endless) == 1
    program = "\n".join(line for line in lines if line.split("  #")[0].strip() != endless)
    ran = subprocess.run([sys.executable, "-c", shell.typed(program)], cwd=shell.cwd, env=shell.env,
                         capture_output=True, timeout=60)
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    assert cluster.nodes[0].request("GET", "/db/cfg").body == b"v3"  # the txn's put
    assert cluster.nodes[0].request("GET", "/db/svc/web-1").status == 404  # the lease revoked as its block ended

    units = commands(ctl)
    assert [c for c, _ in units] == CTL_LINES
    comments = dict(units)
    export = CTL_LINES[0].split(" ", 1)[1].split("=", 1)
    shell.env[export[0]] = shell.typed(export[1])
    numbers = Numbers("raftdzmqctl")

    ran = shell.run(CTL_LINES[1])
    assert comments[CTL_LINES[1]] == "get prints the raw value"
    assert (ran.returncode, ran.stdout) == (0, b"OK\nv1"), ran

    photo = bytes(range(256)) * 8 + b"\r\n\n\x00end"
    with open(os.path.join(shell.cwd, "photo.jpg"), "wb") as f:
        f.write(photo)
    ran = shell.run(CTL_LINES[2])
    assert comments[CTL_LINES[2]] == "no VALUE: stdin, bytes intact" and ran.returncode == 0, ran
    assert shell.run("raftdzmqctl get blob").stdout == photo

    written(shell, "app/a", "1")
    written(shell, "app/b", "2")
    watch = shell.start(CTL_LINES[3])
    try:
        wait_for(lambda: watch.text.startswith("app/a\napp/b\n2\n"), 20, f"ls and del to print: {watch.text!r}")
        # The watch waits now; a write of app/c shows as etcdctl shows it: PUT KEY INDEX, then the value.
        def put_seen():
            written(shell, "app/c", "3")
            return re.search(r"PUT app/c \d+\n3\n", watch.text)
        wait_for(put_seen, 20, f"the watch to print the put: {watch.text!r}", interval=0.5)
    finally:
        watch.stop()

    with open(os.path.join(shell.cwd, "txn.json"), "w") as f:
        json.dump({"compare": [{"key": "cfg", "target": "value", "op": "==", "value": "v1"}],
                   "success": [{"op": "put", "key": "cfg", "value": "v2"}], "failure": []}, f)
    ran = shell.run(CTL_LINES[4])
    assert comments[CTL_LINES[4]] == "the body of POST /txn"
    assert (ran.returncode, ran.text) == (0, 'SUCCESS\n{"op": "put", "key": "cfg"}\n'), ran

    ran = shell.run(CTL_LINES[5], numbers)
    assert ran.returncode == 0, ran
    match_text(comments[CTL_LINES[5]], ran.text, numbers)
    ran = shell.run(CTL_LINES[6], numbers)
    assert ran.returncode == 0 and re.fullmatch(r"lease \d+ keepalived with TTL\(30\)\n", ran.text), ran
    assert f"lease {numbers.actual(57)} " in ran.text
    ran = shell.run(CTL_LINES[7], numbers)
    assert (ran.returncode, ran.text) == (0, f"lease {numbers.actual(57)} revoked (0 keys deleted)\n"), ran

    with open(os.path.join(shell.cwd, "run-job.sh"), "w") as f:
        f.write('#!/bin/sh\necho "token $RAFTDZMQ_LOCK_TOKEN"\nexit 7\n')
    os.chmod(os.path.join(shell.cwd, "run-job.sh"), 0o755)
    ran = shell.run(CTL_LINES[8])
    assert comments[CTL_LINES[8]].startswith("$RAFTDZMQ_LOCK_TOKEN is the fencing token; its exit code")
    assert ran.returncode == 7 and re.fullmatch(r"token \d+\n", ran.text), ran

    ran = shell.run(CTL_LINES[11])
    assert ran.returncode == 0, ran
    fields = {"id": "node_id", "address": "address", "role": "role", "term": "term", "commit": "commit_index",
              "applied": "applied_index", "lag": "lag", "keys": "keys", "data size": "data_size"}
    named = [w.strip() for w in comments[CTL_LINES[11]].split("(")[0].split(",")]
    assert named == list(fields), named
    statuses = json.loads(ran.text)
    assert sorted(s["address"] for s in statuses) == sorted(shell.typed(f"localhost:{p}") for p in README_PORTS)
    for status in statuses:
        assert {fields[name] for name in named} <= set(status), status
        assert isinstance(status["data_size"], int) and status["data_size"] > 0, status

    ran = shell.run(CTL_LINES[12])
    assert comments[CTL_LINES[12]] == "/readyz of every member"
    rows = [line for line in ran.text.splitlines() if "| localhost:" in line]
    assert ran.returncode == 0 and len(rows) == 3 and all("| true " in row for row in rows), ran

    ran = shell.run(CTL_LINES[13])
    assert comments[CTL_LINES[13]] == "GET /snapshot, digest checked, written atomically"
    assert ran.returncode == 0 and ran.text.startswith("snapshot saved at index "), ran
    assert os.path.getsize(os.path.join(shell.cwd, "backup.snap")) > 0
    os.remove(os.path.join(shell.cwd, "backup.snap"))  # the Backups section makes its own
    assert set(CTL_LINES) - {CTL_LINES[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13)} == CTL_LATER | CTL_SIGNED


CAS_LINES = [
    "curl -si localhost:8080/db/cfg | grep -i x-raft-",
    "curl -XPOST 'localhost:8080/db/cfg?prev_index=40' --data-binary new",
    "curl -XPOST 'localhost:8080/db/owner?prev_index=0' --data-binary me",
    "curl -XDELETE 'localhost:8080/db/?prefix=jobs/'",
    "curl -XPOST localhost:8080/txn --data-binary '{\n"
    '  "compare": [{"key": "lock", "target": "exists", "op": "==", "value": false}],\n'
    '  "success": [{"op": "put", "key": "lock", "value": "me"}, {"op": "get", "key": "lock"}],\n'
    '  "failure": [{"op": "get", "key": "lock"}]}\'',
]


def indices_and_transactions(shell: Shell) -> None:
    """"Indices, compare-and-set and transactions", after the examples before it created cfg (the Python client's
    put) and a user wrote three jobs, then cfg again (the last write before the README's commands, at its 40)."""
    (block,) = code_blocks("Indices, compare-and-set and transactions")
    units = commands(block)
    assert [c for c, _ in units] == CAS_LINES
    numbers = Numbers("compare-and-set")
    (read, read_comment), (cas, cas_comment), (create, create_comment), (delete, delete_comment), \
        (txn, txn_comment) = units

    for job in ("jobs/1", "jobs/2", "jobs/3"):
        written(shell, job, "todo")
    written(shell, "cfg", "v4")  # the README's cfg was the last write before its example: its 40
    ran = shell.run(read)
    assert ran.returncode == 0, ran
    match_headers(read_comment, ran.headers, numbers)
    shown = dict(line.split(": ", 1) for line in ran.text.replace("\r", "").splitlines())
    for name in documented_headers(read_comment):
        assert shown[name] == ran.headers[name.lower()], (name, ran.text)

    # "200, or 412 when someone wrote it since"; "create only: 412 when it exists". Their second halves are
    # checked after the block, typing each again: a refused compare takes a log entry too.
    first, again = (int(s) for s in re.fullmatch(r"(\d{3}), or (\d{3}) when someone wrote it since", cas_comment)
                    .groups())
    refused = int(re.fullmatch(r"create only: (\d{3}) when it exists", create_comment).group(1))
    ran = shell.run(cas, numbers)
    assert (ran.returncode, ran.status, ran.stdout) == (0, first, b""), ran
    check_silent_write(shell.run(create, numbers))
    for command, comment in ((delete, delete_comment), (txn, txn_comment)):
        ran = shell.run(command, numbers)
        assert (ran.returncode, ran.status) == (0, 200), ran
        match_answer(documented_json(comment), json.loads(ran.text), numbers)
        assert ran.headers["x-raft-index"] == str(json.loads(ran.text)["index"])
    ran = shell.run(cas, numbers)
    assert (ran.returncode, ran.status) == (0, again) and ran.text == "precondition failed\n", ran
    ran = shell.run(create, numbers)
    assert (ran.returncode, ran.status) == (0, refused), ran


LEASE_LINES = [
    "curl -XPOST 'localhost:8080/lease?ttl=10'",
    "curl -XPOST 'localhost:8080/db/svc/web-1?lease=57' --data-binary 10.0.0.5:80",
    "curl -XPOST localhost:8080/lease/57/keepalive",
    "curl -XPOST localhost:8080/lease/keepalive --data-binary '[\"57\", \"58\"]'",
    "curl localhost:8080/lease/57",
    "curl -XDELETE localhost:8080/lease/57",
    "curl -XPOST 'localhost:8080/db/tmp/token?ttl=30' --data-binary x",
]


def leases(shell: Shell) -> None:
    (block,) = code_blocks("Leases and TTL keys")
    units = commands(block)
    assert [c for c, _ in units] == LEASE_LINES
    numbers = Numbers("leases")
    for command, comment in units:
        ran = shell.run(command, numbers)
        if not comment:
            check_silent_write(ran)
        elif "{" in comment:
            assert (ran.returncode, ran.status) == (0, 200), ran
            match_answer(documented_json(comment), json.loads(ran.text), numbers)
        else:  # "a key with a lease of its own (X-Raft-Lease: 60)"
            check_silent_write(ran)
            match_headers(comment, ran.headers, numbers)


WATCH_LINES = [
    "curl -N 'localhost:8081/watch?prefix=app/'",
    "curl -N 'localhost:8082/watch?prefix=app/' -H 'Last-Event-ID: 57'",
    "curl -i 'localhost:8081/watch?key=app/cfg&from=57&poll=1&timeout=30'",
]


def watches(shell: Shell) -> None:
    """"Watches": a stream on a follower sees a user's writes as the README's frame shows one; the stream resumed
    on another follower after the id before it starts with it; the long poll answers it."""
    commands_block, frame_block = code_blocks("Watches")
    units = commands(commands_block)
    assert [c for c, _ in units] == WATCH_LINES
    frame = dict(line.split(": ", 1) for line in frame_block.splitlines() if line)
    assert list(frame) == ["id", "event", "data"], frame
    event = json.loads(frame["data"])
    numbers = Numbers("watches")

    stream = shell.start(units[0][0], numbers)
    try:
        wait_for(lambda: re.search(r"^id: \d+$", stream.text, re.M), 20, "the stream's position")
        written(shell, event["key"], "created")  # the key's create index, the README's 12
        written(shell, "app/other", "x")  # the README's 57
        written(shell, event["key"], event["value"])
        wait_for(lambda: len(sse_frames(stream.text)) == 3, 20, f"three events on the stream: {stream.text!r}")
    finally:
        stream.stop()
    seen = sse_frames(stream.text)[2]
    assert seen["event"] == frame["event"], seen
    match_answer(event, json.loads(seen["data"]), numbers, "data")
    numbers.bind(int(frame["id"]), int(seen["id"]), "id")

    resumed = shell.start(units[1][0], numbers)
    try:
        wait_for(lambda: sse_frames(resumed.text), 20, f"the resumed stream's first event: {resumed.text!r}")
    finally:
        resumed.stop()
    first = sse_frames(resumed.text)[0]
    assert (first["id"], first["event"]) == (seen["id"], frame["event"]) and json.loads(first["data"]) == \
        json.loads(seen["data"]), resumed.text

    ran = shell.run(units[2][0], numbers)
    assert "long poll: [...] or [] after 30 s" in units[2][1]
    head, _, body = ran.text.replace("\r\n", "\n").partition("\n\n")
    assert ran.returncode == 0 and head.startswith("HTTP/1.1 200"), ran
    (polled,) = json.loads(body)
    match_answer(event, polled, numbers, "the long poll's event")


def health(shell: Shell) -> None:
    """The table's /livez and /readyz: `200` `ok`, and `?verbose`'s check lines."""
    for route, check in (("/livez", "[+]raft ok"), ("/readyz", "[+]leader ok")):
        row = table_row(f"GET {route}")
        assert "`200` `ok`" in row and "`?verbose` lists" in row and f"`{check}`" in row, row
        for port in README_PORTS:
            ran = shell.run(f"curl localhost:{port}{route}")
            assert (ran.returncode, ran.status, ran.text) == (0, 200, "ok\n"), ran
            ran = shell.run(f"curl 'localhost:{port}{route}?verbose'")
            assert ran.status == 200 and check in ran.text.splitlines(), ran


def backups(shell: Shell, tmp_path) -> None:
    """"Backups and restores": a backup by curl and its digest checked, one by raftdzmqctl, a restore, and a node
    started on the restored data dir (its host and ports this machine's)."""
    curl_block, ctl_block, restore_block = [b for b in code_blocks("Backups and restores")]
    numbers = Numbers("backups")
    units = commands(curl_block)
    assert [c for c, _ in units] == [
        "curl -sf -D headers -o backup.snap localhost:8080/snapshot",
        "grep -i x-raft-snapshot headers",
        "echo \"$(awk 'tolower($1)==\"x-raft-snapshot-sha256:\"{print $2}' headers | tr -d '\\r')  backup.snap\""
        " > backup.snap.sha256",
        "sha256sum -c backup.snap.sha256"]
    ran = shell.run(units[0][0])
    assert (ran.returncode, ran.status) == (0, 200), ran
    ran = shell.run(units[1][0])
    assert ran.returncode == 0, ran
    shown = dict(line.split(": ", 1) for line in ran.text.replace("\r", "").splitlines())
    match_headers(units[1][1], {name.lower(): value for name, value in shown.items()}, numbers)
    assert shell.run(units[2][0]).returncode == 0
    ran = shell.run(units[3][0])
    assert (ran.returncode, ran.text) == (0, "backup.snap: OK\n"), ran

    units = commands(ctl_block)
    assert [c for c, _ in units] == [
        "raftdzmqctl --endpoints=localhost:8081 snapshot save backup.snap",
        "raftdzmqctl --endpoints=localhost:8081 --secret-file ~/secret snapshot save backup.snap"]  # not here
    ran = shell.run(units[0][0])
    assert ran.returncode == 0, ran
    match_text(re.fullmatch(r'"(.*)"', units[0][1]).group(1), ran.text, numbers)

    units = commands(restore_block)
    new_dir = str(tmp_path / "raftdzmq-new")
    assert [c for c, _ in units] == [
        "raftdzmq -restore backup.snap /var/lib/raftdzmq-new",
        "raftdzmq -h 0.0.0.0 -advertise node1.example -name node1b -p 5555 -hp 8080 /var/lib/raftdzmq-new",
        "raftdzmq ... -name node2b -join node1.example:8080 /var/lib/raftdzmq"]  # not typed: its ... is the reader's
    ran = shell.run(units[0][0].replace("/var/lib/raftdzmq-new", new_dir))
    assert ran.returncode == 0, ran
    documented = re.match(r'"(.*)"; exit 1 on a bad file', units[0][1]).group(1)
    match_text(documented, ran.text + ran.stderr.decode(), numbers)
    http_port = free_port()
    start = (units[1][0].replace("-h 0.0.0.0 -advertise node1.example", "-h 127.0.0.1 -advertise localhost")
             .replace("-p 5555", f"-p {free_port()}").replace("-hp 8080", f"-hp {http_port}")
             .replace("/var/lib/raftdzmq-new", new_dir))
    node = subprocess.Popen(["bash", "-c", f"exec {start}"], cwd=shell.cwd, env=shell.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        restored = wait_for(lambda: json.loads(shell.run(f"curl -s localhost:{http_port}/status").stdout or b"null"),
                            20, "the restored node to serve")
        wait_for(lambda: shell.run(f"curl -s localhost:{http_port}/db/cfg").text == "new", 20,
                 "the restored node to lead and read cfg as the backup held it")
        assert restored["node_id"].startswith("node1b-") and len(restored["members"]) == 1, restored
    finally:
        os.kill(node.pid, signal.SIGKILL)
        node.wait(timeout=10)


def membership_last(cluster: LocalCluster, shell: Shell) -> None:
    """raftdzmqctl's membership line, last: ID is the member each command names (node 2 to lead, node 3 out)."""
    (line,) = CTL_LATER
    n1, n2, n3 = cluster.nodes
    id2, id3 = n2.status()["node_id"], n3.status()["node_id"]
    ran = shell.run(line.replace("transfer ID", f"transfer {id2}").replace("remove ID", f"remove {id3}"))
    assert ran.returncode == 0, ran
    assert ran.text.count("| voter |") == 3, ran
    assert f"leadership transferred to {id2}\nmember {id3} removed\n" in ran.text, ran
    members = wait_for(lambda: shell.run("raftdzmqctl -w json member list").text, 10, "member list")
    assert sorted(m["id"] for m in json.loads(members)) == sorted([n1.status()["node_id"], id2]), members


PRODUCTION_LINES = [
    "openssl rand -hex 32 > /etc/raftdzmq/secret",
    "raftdzmq -h 0.0.0.0 -advertise node1.example -name node1 -p 5555 -hp 8080 \\\n"
    "         -secret-file /etc/raftdzmq/secret /var/lib/raftdzmq",
    "raftdzmq -h 0.0.0.0 -advertise node2.example -name node2 -p 5555 -hp 8080 \\\n"
    "         -secret-file /etc/raftdzmq/secret -join node1.example:8080 /var/lib/raftdzmq",
]


def production_with_a_secret(shell: Shell, tmp_path) -> None:
    """"Running in production": the secret made, node1 started, node2 joining it (both on this machine: its
    loopback address, free ports, a data dir each); then raftdzmqctl's lines with `--secret-file ~/secret`: a
    backup signed for the node asked, on any endpoint and on node2 alone, and node2 removed."""
    (block, *_) = code_blocks("Running in production")
    units = commands(block)
    assert [c for c, _ in units] == PRODUCTION_LINES
    secret = str(tmp_path / "secret")
    hosts = {"node1.example": ("localhost", free_port(), free_port()),
             "node2.example": ("localhost", free_port(), free_port())}
    procs: list[subprocess.Popen] = []
    try:
        ran = shell.run(units[0][0].replace("/etc/raftdzmq/secret", secret))
        assert ran.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", open(secret).read()), ran
        for command, node in ((units[1][0], "node1.example"), (units[2][0], "node2.example")):
            _, raft_port, http_port = hosts[node]
            typed = (command.replace("-h 0.0.0.0", "-h 127.0.0.1").replace(f"-advertise {node}", "-advertise localhost")
                     .replace("-p 5555 -hp 8080", f"-p {raft_port} -hp {http_port}")
                     .replace("-join node1.example:8080", f"-join localhost:{hosts['node1.example'][2]}")
                     .replace("/etc/raftdzmq/secret", secret)
                     .replace("/var/lib/raftdzmq", str(tmp_path / f"production-{node}")))
            procs.append(subprocess.Popen(["bash", "-c", f"exec {typed}"], cwd=shell.cwd, env=shell.env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for(lambda: json.loads(shell.run(f"curl -s localhost:{http_port}/status").stdout or b"null"), 20,
                     f"{node} to serve")
        node2 = f"localhost:{hosts['node2.example'][2]}"
        endpoints = ",".join(f"localhost:{h[2]}" for h in hosts.values())
        status2 = wait_for(lambda: (st := json.loads(shell.run(f"curl -s {node2}/status").stdout))["leader"] and st, 20,
                           "node2 to know its leader")
        assert status2["node_id"].startswith("node2-") and len(status2["members"]) == 2, status2
        home = {**shell.env, "HOME": str(tmp_path)}  # ~/secret
        ctl_signed = [line for line in CTL_LINES if "--secret-file" in line]
        backups_signed = [c for c, _ in commands(code_blocks("Backups and restores")[1]) if "--secret-file" in c]
        assert ctl_signed == ["raftdzmqctl --secret-file ~/secret member remove ID",
                              "raftdzmqctl --secret-file ~/secret snapshot save backup.snap"], ctl_signed
        assert backups_signed == ["raftdzmqctl --endpoints=localhost:8081 --secret-file ~/secret snapshot save "
                                  "backup.snap"], backups_signed
        for line in (ctl_signed[1], backups_signed[0]):
            line = line.replace("localhost:8081", node2)
            ran = subprocess.run(["bash", "-c", line], cwd=shell.cwd, env={**home, "RAFTDZMQ_ENDPOINTS": endpoints},
                                 capture_output=True, timeout=60)
            assert ran.returncode == 0 and ran.stdout.startswith(b"snapshot saved at index "), ran
        ran = subprocess.run(["bash", "-c", ctl_signed[0].replace("ID", status2["node_id"])], cwd=shell.cwd,
                             env={**home, "RAFTDZMQ_ENDPOINTS": endpoints}, capture_output=True, timeout=60)
        assert (ran.returncode, ran.stdout) == (0, f"member {status2['node_id']} removed\n".encode()), ran
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
