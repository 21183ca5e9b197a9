"""Run by tests/test_disk_faults.py in its own process: a one-node Runtime on a real DiskStorage whose fsync starts
failing with EIO. Prints one line per check."""

from gevent import monkey

monkey.patch_all()

import errno  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import gevent  # noqa: E402

from raftlib import Config, Entry, EntryKind, HardState, Member, Membership, RaftNode, Role  # noqa: E402
from raftlib.runtime import Runtime  # noqa: E402
from runtime_fakes import NullTransport, Values  # noqa: E402
from raftlib.storage import DiskStorage  # noqa: E402


def main() -> None:
    data_dir = tempfile.mkdtemp(prefix="raftdzmq-fsync-")
    failing = {"on": False}

    def fdatasync(fd, nbytes):
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error (injected)")

    try:
        storage = DiskStorage(data_dir, fdatasync=fdatasync)
        stored = storage.load()
        me = Member("a", "127.0.0.1:1", "127.0.0.1:2")
        storage.save(HardState(1, None, 1), [Entry(1, 1, EntryKind.MEMBERSHIP, b"", Membership(("a",), (), (me,)))])
        stored = storage.state
        node = RaftNode(Config("a", election_ticks=4, heartbeat_ticks=1), random.Random(1), stored.hard_state,
                        stored.raft_log(), stored.snapshot)
        fatal = []
        runtime = Runtime(node, storage, NullTransport(), Values(), tick_seconds=0.005, on_fatal=fatal.append)
        runtime.start()
        deadline = gevent.time.time() + 5
        while node.role is not Role.LEADER and gevent.time.time() < deadline:
            gevent.sleep(0.01)
        acked = 0
        for i in range(5):
            runtime.propose(f"ok-{i}".encode(), 2.0)
            acked += 1
        print("acknowledged-before", acked)
        failing["on"] = True
        for label in ("failing-write", "later-write"):
            try:
                runtime.propose(b"never-acknowledged", 2.0)
                print(label, "ACKNOWLEDGED")
            except Exception as e:
                print(label, type(e).__name__)
        print("fatal", " ".join(f"{type(e).__name__} {getattr(e, 'errno', '')}" for e in fatal))
        storage.close()
        reopened = DiskStorage(data_dir).load()
        commands = [e.data for e in reopened.entries if e.kind is EntryKind.COMMAND]
        print("reopened-entries", sum(1 for i in range(5) if f"ok-{i}".encode() in commands))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
