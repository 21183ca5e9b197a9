"""DiskStorage: a node's durable state in its data dir: log segments, snapshots, identity, and a lock.

What it stands on, each in its own module: the record format (framing, checksums, groups, the scan that finds a
torn tail, replay) is raftlib.logformat; snapshot files (their format, reading one back, receiving a leader's)
are raftlib.snapshotfile; the errors are raftlib.storage_errors (re-exported here). What a node's first start
makes of the data dir (its id, JOINING, RESTORE, -force-new-cluster) is the server's: raftlib.server.nodestart.

Rules:
- A Ready's entries and hard state become durable with one record and one fdatasync (`save`). Files are only
  ever appended to, cut back to a good record, renamed into place or unlinked (garbage: maybe cut from its
  end once unlinked, `garbage_job`); never rewritten in place. Every file operation goes through a
  `raftlib.fs.FileSystem` (the real one unless a test passes another).
- Every segment starts with a BASE record, `[snapshot_index, snapshot_term, hard_state, entries]`: the whole log
  after the snapshot at `snapshot_index`. Everything written before it is forgotten, so the newest segment that
  starts with a complete base record IS the log (with the records after its base), and older segments are
  garbage. A segment is made durable (file fsynced, then its folder) before anything is appended to it or
  anything older is deleted.
- Installing a snapshot is a transaction. The snapshot file is written to a temporary name, fsynced, renamed, and
  its folder fsynced; then a new segment whose base record holds the whole new state (the Ready's hard state and
  entries included) is made durable: that is the commit point. Only then does `self.state` change, and the older
  segments and snapshots are unlinked (and the folders fsynced). A crash, or a full disk, before the commit
  point leaves the state before the save; after it, the state after. A snapshot file that the newest base record
  does not name is an install that did not commit: load deletes it.
- Load keeps all of that true and is itself safe to crash in: it fsyncs what it is going to rely on (a killed
  process leaves writes in the page cache that a power failure can still drop), cuts a torn tail off the newest
  segment, deletes garbage only once the segment that makes it garbage is durable, and for a data dir written
  before base records existed writes one (see `_load_format1`). A segment newer than the newest base that holds
  no complete group is a segment creation a crash interrupted: deleted with a warning.
- Running out of file descriptors (EMFILE, ENFILE) never stops a node: it changes nothing on the disk. The data
  dir's two folders are held open from the constructor to `close`, so their fsyncs need no descriptor; after
  `load`, a save opens one only to create a file (the snapshot's temporary file, a new segment), refused before
  anything changed (OutOfDescriptors, as DiskFull: the same save may be tried again), and to list the folders for
  the garbage an install leaves, after its commit point (refused: the garbage stays, harmless, for load or the
  next install to delete). A plain save (append, fdatasync) opens none. A snapshot held (loaded or committed)
  keeps its file open for reading (a leader streams InstallSnapshot from it), opened before its commit point:
  with no descriptor free for it the snapshot is refused (OutOfDescriptors, nothing changed), never committed
  unreadable.
- A leader's snapshot is received into its file as its chunks come (`receive_snapshot`: a SnapshotSink, with
  raftlib.snapshotfile's rules), under a `*.received.tmp` name; the install that saves it renames that file
  rather than write it again. Until then nothing a reader uses changes (load deletes a `*.tmp`).
- A snapshot of the node's own comes in two parts: `write_snapshot` (a forked child may run it) writes and
  fsyncs its file under a `*.tmp` name, changing nothing a reader uses; `commit_snapshot` (the serving process)
  does the rest of the install transaction from the rename on. Installs leave a `*.tmp` being written alone.
- Meanwhile the commit's new segment may be pre-built (`begin_base`, `base_step`, `base_sync_job`: issue 13, so
  that the commit's work in the loop does not grow with the log since the snapshot): `log/base-IIII.seg.tmp`,
  the header and a base group left open (a base part record, batch part records), written a bounded step at a
  time; load never takes a `*.tmp` for the log (and deletes it), nor would it a segment whose group is open. A
  save whose entries replace some it holds begins it again; a leader's install, or another snapshot's commit,
  drops it; a full disk or no descriptor at a step or at its sync drops it, and the commit of its snapshot then
  refuses (DiskFull, OutOfDescriptors: nothing changed); a call of its sync that raises (rather than return the
  disk's error) drops it too, and that commit writes the log whole. The commit appends the entries it lacks and
  the hard state in the record that closes the group, fsyncs it BEFORE the snapshot's rename, and after that
  rename (and its folder's fsync) renames it to the next segment's name and fsyncs the log folder: the commit
  point.
- With `unlink_garbage_later` (the runtime's), what an install makes garbage is unlinked by `garbage_job` in a
  thread, after the commit point (load would delete it too). There an old snapshot or segment (a final name:
  `snapshot-I.snap`, `log/N.seg`) that no SnapshotFile reads is opened, unlinked (its folder fsynced), and only
  then cut from its end through that descriptor, GARBAGE_CUT_STEP_BYTES a step, each cut fdatasynced, and
  closed: no one journal commit frees it whole (which the log's next fdatasync waits for: issue 13, unlinkcut).
  Nothing is cut by name: a file that takes a garbage one's name once the job has opened it is never cut, and
  a crash part way leaves no name (the file system frees the unlinked inode at recovery). The job fsyncs the
  folders through descriptors of its own, and their error is fatal at the next save, step or commit (fsyncgate:
  an error the job took on the loop's handle, the loop's commit point would not see). A snapshot file that
  a SnapshotFile still reads through its handle (a leader's transfer of it under way, a restore from it, the
  core's received file) is unlinked whole, never cut: the reader keeps it whole until its last close, which
  frees it (in the loop: the rare case). A `*.tmp` is unlinked whole too: no reader of one is noted (a
  leftover, a backup of another process). The job is handed only names no file of this process can take again
  (`_never_named_again`: a segment below the live one, a snapshot's files below the kept index): a name encodes
  an index, not an install, and the job's names are fixed while the loop goes on installing. The rest of the
  garbage (a snapshot file above the kept one, left by an install refused after its rename; another leftover
  `*.tmp`) is unlinked in the loop at the install: the garbage job never unlinks nor cuts what load would read.

The data dir:

    LOCK                   held with flock(LOCK_EX) while a process uses the dir
    node.json              {"format": 1, "node_id": ..., "raft_address": ..., "http_address": ...}
    node.key               with a cluster secret: the node's CURVE key pair and whom it admits before it has a
                           configuration (raftlib.server.node); mode 0600, never logged
    log/NNNNNNNNNN.seg     log segments: "RDZMQLOG", u32 version 1, then records (raftlib.logformat, docs/DATA-DIR.md)
    snapshot-IIII.snap     the snapshot the newest base record names (IIII = its last included index, 20 digits)
    RESTORE                a backup's snapshot file (raftdzmq -restore) until the first start installs it
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

from . import crashpoints
from .fs import NO_DESCRIPTOR, FileSystem, OsFileSystem
from .interfaces import StoredState
from .logformat import (_HEADER, FORMAT_VERSION, RECORD_BASE, SEGMENT_MAGIC, _Replay, _replay_base, _replay_format1,
                        _scan, encode_base_group_head, encode_base_record, encode_group_parts, encode_group_tail,
                        encode_record)
from .messages import Entry, HardState, Snapshot
from .snapshotfile import SnapshotFile, SnapshotFileWriter, SnapshotReceiver, _write_snapshot_file, read_snapshot
from .storage_errors import (_NO_ROOM, CorruptLogError, DataDirLocked, DiskFull, OutOfDescriptors, StorageError,
                             UnknownFormatError)

# What moved out of this module to raftlib.logformat, raftlib.snapshotfile and raftlib.storage_errors, importable
# from here for one more release (embedders and old scripts import them from raftlib.storage; the project imports
# them from their homes). A constant re-exported is a copy: to change MAX_RECORD_BYTES, set it in logformat.
from .logformat import (MAX_RECORD_BYTES, RECORD_BASE_PART, RECORD_BATCH, RECORD_BATCH_PART,  # noqa: F401
                        SECTOR_BYTES)
from .snapshotfile import (SNAPSHOT_IO_BYTES, SNAPSHOT_MAGIC, ReceivedSnapshotFile, encode_snapshot,  # noqa: F401
                           export_snapshot)
from .storage_errors import RecordTooBig  # noqa: F401


# Test-only (the crash explorer's mutation table): replay every segment as the code before base records did,
# dropping each record's entries at or below the snapshot index, and with them the cut that record stood for.
UNSAFE_REPLAY_FILTER = False

logger = logging.getLogger("raftlib.storage")

# `garbage_job` cuts an unlinked old snapshot or segment from its end, this much a step (each step fdatasynced),
# before its close frees the rest: bench/garbage_unlink.py, a 110 MiB file beside 1 KiB fdatasyncs: the slowest
# 17-29 ms unlinked whole, 2.5-3.2 ms cut 8 MiB a step.
GARBAGE_CUT_STEP_BYTES = 8 << 20
# Garbage the job could not unlink at all (no folder descriptor, and an unlink failing) waits this long for the
# next job, or for the next install (`DiskStorage._unlink_whole`): not a job and two warnings at every drive.
GARBAGE_RETRY_SECONDS = 5.0

# The names of files that encode a number the loop only raises (`DiskStorage._never_named_again`).
_SEGMENT_NAME = re.compile(r"(\d+)\.seg")
_BASE_TMP_NAME = re.compile(r"base-(\d+)\.seg\.tmp")
_SNAPSHOT_FILE_NAME = re.compile(r"snapshot-(\d+)\.snap(?:\.tmp|\.received\.tmp)?")


def _write_file(fs: FileSystem, tmp: str, write: Callable[[object], None], private: bool = False) -> None:
    """Create `tmp`, `write(handle)` its content, fsync and close it. No room (the writes or the fsync): DiskFull,
    and the file is unlinked (not synced: a power failure may bring it back; no reader looks at a `*.tmp`, and
    load deletes them). No descriptor: OutOfDescriptors, and nothing was made. Any other error goes up (fatal).
    `private`: readable by the owner only, from before its first byte."""
    try:
        f = fs.create(tmp)
        try:
            if private and isinstance(f, int):  # a real descriptor: readable by the owner only, before any byte
                os.fchmod(f, 0o600)
            write(f)
            fs.fsync(f)  # a new file: nothing older rides on this sync, so a failure of it loses nothing
        finally:
            fs.close(f)
    except OSError as e:
        if e.errno in NO_DESCRIPTOR:  # only an open raises it: the create, which made nothing
            raise OutOfDescriptors(f"no file descriptor free to write {tmp}: {e.strerror}") from None
        with contextlib.suppress(OSError):
            fs.unlink(tmp)
        if e.errno in _NO_ROOM:
            raise DiskFull(f"no room on the disk for {tmp}: {e.strerror}") from None
        raise


def _write_atomically(fs: FileSystem, path: str, data: bytes, crash_point: str | None = None, folder=None,
                      private: bool = False) -> None:
    """Write to a temporary file, fsync, rename over `path`, fsync the folder (`folder`: a handle of it from
    `open_dir`, so that the sync opens nothing; by default its path). No room, no descriptor: as `_write_file`,
    and `path` is as it was. A failed rename or folder fsync is fatal (the OSError goes up): which of the
    folder's operations reached the disk is unknown."""
    tmp = path + ".tmp"
    _write_file(fs, tmp, lambda f: fs.append(f, data), private)
    if crash_point and crashpoints.enabled:
        crashpoints.hit(crash_point)
    fs.rename(tmp, path)
    fs.fsync_dir(folder if folder is not None else os.path.dirname(path))


class _PrebuiltBase:
    """The base segment of a snapshot of this node's own, written ahead of its commit point (`begin_base`,
    `base_step`): `log/base-IIII.seg.tmp`, its base group left open (a crash or load never takes it for the log:
    load deletes a `*.tmp`). Holds the log after the snapshot up to `written_to`."""

    __slots__ = ("index", "term", "path", "handle", "size", "written_to", "synced", "syncing", "dropped")

    def __init__(self, index: int, term: int, path: str) -> None:
        self.index, self.term, self.path = index, term, path
        self.handle: object = None  # created by the first step
        self.size = 0  # bytes written
        self.written_to = index  # the last index whose entry is in the file
        self.synced = 0  # bytes known durable (an fdatasync off the loop: `base_sync_job`)
        self.syncing = False  # such a sync runs: the handle is closed by its end, not by a drop
        self.dropped = False


class _BaseSyncClaim:
    """Who closes a pre-built base's descriptor when the call of its sync raised (`base_sync_job`): the loop's
    `done(raised)` abandons the base while the thread's `sync` may be queued, running or finished (review baseleft2
    R1). Rules: `sync` calls `start` before it touches the descriptor and skips it if that says no; once started
    it calls `finish` after its fdatasync, and closes the descriptor if that says so; `abandon` says whether the
    loop closes it. Exactly one side closes, never during the fdatasync.

    No lock: each side appends its mark to one list (list.append is atomic under the GIL, from any thread) and
    decides from the marks before its own, so both read the same order. The loop never waits, and nothing depends
    on what monkey-patching made of threading.Lock (a gevent lock taken from a threadpool thread)."""

    __slots__ = ("_marks",)
    _START, _FINISH, _ABANDON = "start", "finish", "abandon"

    def __init__(self) -> None:
        self._marks: list[str] = []

    def _before(self, mark: str) -> list[str]:
        """Appends `mark`; returns the marks that came before it."""
        self._marks.append(mark)
        return self._marks[:self._marks.index(mark)]

    def start(self) -> bool:
        """In the thread, first: whether the sync may run (False: abandoned while queued, the loop has closed)."""
        return self._ABANDON not in self._before(self._START)

    def finish(self) -> bool:
        """In the thread, after its fdatasync: whether it closes (the base was abandoned while it ran)."""
        return self._ABANDON in self._before(self._FINISH)

    def abandon(self) -> bool:
        """In the loop, at `done(raised)`: whether it closes (the sync never started, or has finished)."""
        before = self._before(self._ABANDON)
        return self._START not in before or self._FINISH in before


class DiskStorage:
    """Durable storage for one node. Use `DiskStorage(data_dir)` then `load()` once, then `save()` per Ready."""

    @property
    def snapshot_files(self) -> bool:
        """Whether `write_snapshot` in a forked child reaches this process's disk: only on the real file system
        (a test's in-memory one stays in the child)."""
        return isinstance(self.fs, OsFileSystem)

    def __init__(self, data_dir: str, fsync: bool = True, fdatasync=None, fs: FileSystem | None = None) -> None:
        """`fs` is the file system to work through (default: the real one, `OsFileSystem`). `fdatasync(handle,
        nbytes)` makes a batch of `nbytes` durable (default: the file system's fdatasync; with OsFileSystem the
        handle is a file descriptor); the server passes one that times it."""
        self.fs = fs if fs is not None else OsFileSystem()
        self.data_dir = os.path.abspath(data_dir)
        self._fdatasync = fdatasync or (lambda handle, nbytes: self.fs.fdatasync(handle))
        self.log_dir = os.path.join(self.data_dir, "log")
        self._fsync = fsync
        self.state = StoredState()
        self._segment = None  # the handle of the newest segment, open for appending
        self._segment_bytes = 0  # its size
        self._segment_seq = 0
        self.log_bytes = 0  # bytes in the segment since the last snapshot
        self._loaded = False
        self._lock = None
        self._folders: dict[str, object] = {}  # data_dir and log_dir -> a handle (fsync_dir then opens nothing)
        self._writing: set[str] = set()  # snapshot files begun (begin_snapshot) and not yet committed or aborted
        self._base: _PrebuiltBase | None = None  # the base segment of a snapshot being taken, pre-built
        self._base_refused: tuple[int, StorageError] | None = None  # a step's DiskFull/OutOfDescriptors, by index
        # The disk's error met off the loop (the pre-built base's sync, a garbage job's folder fsync): fatal at the
        # next save, step or commit.
        self._failed_off_loop: OSError | None = None
        # Set (the runtime does): what an install makes garbage is left for `garbage_job` (a thread) to unlink.
        self.unlink_garbage_later = False
        self._unlinking: list[str] = []  # garbage for `garbage_job`
        self._unlink_retry_at = 0.0  # time.monotonic() before which `garbage_job` makes none (`_unlink_whole`)
        # The SnapshotFiles reading this data dir's snapshot files, by the name each file has now: one that a
        # reader holds is unlinked whole by `garbage_job`, not cut (the module's rules). Weak: a collected reader
        # reads no more.
        self._snapshot_readers: dict[str, list[weakref.ref[SnapshotFile]]] = {}
        self._make_dir(self.log_dir)
        try:
            self._lock = self.fs.lock(os.path.join(self.data_dir, "LOCK"))
        except BlockingIOError:
            raise DataDirLocked(f"data dir {self.data_dir} is in use by another process (LOCK is held)") from None
        try:
            for path in (self.data_dir, self.log_dir):
                self._folders[path] = self.fs.open_dir(path)
            self._check_format()
        except BaseException:
            self.close()
            raise

    def _fsync_dir(self, path: str) -> None:
        """Fsync a folder: through its handle for the data dir and the log folder (no descriptor to open)."""
        self.fs.fsync_dir(self._folders.get(path, path))

    def _make_dir(self, path: str, depth: int = 2) -> None:
        """Make `path` and any missing parent, and make each name durable in its parent folder: `path` and its
        `depth - 1` parents even when they existed (a process killed after its mkdir left the name in the page
        cache only, and a power failure after this process's first synced save would still take the folder)."""
        parent = os.path.dirname(path)
        try:
            made = self.fs.mkdir(path)
        except FileNotFoundError:
            if parent == path:
                raise
            self._make_dir(parent, depth=0)
            made = self.fs.mkdir(path)
        if depth > 1 and parent != path:
            self._make_dir(parent, depth - 1)
        if (made or depth > 0) and self._fsync:
            self.fs.fsync_dir(parent)

    # ---- identity -------------------------------------------------------------------------------

    @property
    def _identity_path(self) -> str:
        return os.path.join(self.data_dir, "node.json")

    def _read_file(self, path: str) -> bytes:
        """A small file of the data dir read whole (node.json, node.key, JOINING): no descriptor free to open it,
        OutOfDescriptors, as every other open of the storage (`_open`), not a bare OSError(EMFILE) that a caller
        would take for a failing disk."""
        return self._open(self.fs.read_file, path, f"no file descriptor free to read {path}")

    def _check_format(self) -> None:
        ident = self.read_identity()
        if ident is not None and ident.get("format") != FORMAT_VERSION:
            raise UnknownFormatError(
                f"{self._identity_path} is format {ident.get('format')!r}; this raftdzmq reads format "
                f"{FORMAT_VERSION}. Use the raftdzmq that wrote it."
            )

    def read_identity(self) -> dict | None:
        """node.json's object, None when there is none. No descriptor free to read it: OutOfDescriptors (a node
        that runs may try again: `mark_joined`'s caller does)."""
        try:
            ident = json.loads(self._read_file(self._identity_path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise StorageError(f"{self._identity_path} is not valid JSON: {e}") from None
        if not isinstance(ident, dict):
            raise StorageError(f"{self._identity_path} is not a JSON object")
        return ident

    def write_identity(self, node_id: str, raft_address: str, http_address: str, name: str | None = None) -> None:
        ident: dict = {"format": FORMAT_VERSION, "node_id": node_id, "raft_address": raft_address,
                       "http_address": http_address}
        if name is not None:
            ident["name"] = name  # the -name it was made with (name_of): never parsed back from the id
        self._write_identity(ident)

    def _write_identity(self, ident: dict) -> None:
        _write_atomically(self.fs, self._identity_path, json.dumps(ident, indent=1).encode() + b"\n",
                          folder=self._folders[self.data_dir])

    def update_identity(self, **fields: object) -> None:
        """Set `fields` in node.json (None removes one), crash-safe (the old file or the new one)."""
        ident = self.read_identity()
        assert ident is not None, "update the identity of a node that has one"
        for key, value in fields.items():
            if value is None:
                ident.pop(key, None)
            else:
                ident[key] = value
        self._write_identity(ident)

    def mark_joined(self) -> None:
        """node.json's "joined": a leader's term reached this node's log after its join was accepted (the server
        waits for it), or it bootstrapped (or was restored). From then on a
        start without its log is refused (start_node, LogMissing): its votes would be those of a node that forgot
        what it promised."""
        if not (self.read_identity() or {}).get("joined"):
            self.update_identity(joined=True)

    def fence(self, node_ids: tuple[str, ...], forced: tuple[int, int]) -> None:
        """Record, before the forced entry is written, node.json's "forcing": the members `node_ids` to fence and
        [index, term] of the forced entry (force_new_cluster's rules); `confirm_force` folds it into "fenced"
        and "forced" once the entry is in the log, and so does the next start (settle_forcing) when a crash came
        between. Crash-safe (the old file or the new one)."""
        self.update_identity(forcing={"fenced": sorted(node_ids), "forced": list(forced)})

    def fenced(self) -> frozenset[str]:
        """The members this node removed by -force-new-cluster (node.json's "fenced", and "forcing"'s while a
        force is being recorded): the server drops their messages while they are not members."""
        ident = self.read_identity() or {}
        return frozenset(ident.get("fenced", ())) | frozenset((ident.get("forcing") or {}).get("fenced", ()))

    def confirm_force(self) -> None:
        """The forced entry is in the log: "forcing" becomes "forced", and its members join "fenced"."""
        ident = self.read_identity() or {}
        forcing = ident.get("forcing")
        if forcing is not None:
            self.update_identity(fenced=sorted(set(ident.get("fenced", [])) | set(forcing["fenced"])),
                                 forced=forcing["forced"], forcing=None)

    # ---- the node's key (with a cluster secret) ------------------------------------------------------------

    @property
    def _node_key_path(self) -> str:
        return os.path.join(self.data_dir, NODE_KEY)

    def read_node_key(self) -> dict | None:
        """The JSON object in node.key, None when there is none; StorageError when it is not one."""
        try:
            value = json.loads(self._read_file(self._node_key_path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise StorageError(f"{self._node_key_path} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise StorageError(f"{self._node_key_path} is not a JSON object")
        return value

    def write_node_key(self, value: dict) -> None:
        """Replace node.key, crash-safe (a crash leaves the old file or the new one), readable by the owner only."""
        _write_atomically(self.fs, self._node_key_path, json.dumps(value, indent=1).encode() + b"\n",
                          folder=self._folders[self.data_dir], private=True)

    # ---- the join marker: what a node's first start is for, until it is done ---------------------------

    @property
    def _join_marker_path(self) -> str:
        return os.path.join(self.data_dir, JOIN_MARKER)

    def read_join_marker(self) -> str | None:
        """"bootstrap" or "join" while the first start of this dir's node is not done; else None."""
        try:
            return self._read_file(self._join_marker_path).decode(errors="replace").strip() or None
        except FileNotFoundError:
            return None

    def write_join_marker(self, intent: str) -> None:
        assert intent in ("bootstrap", "join", "restore")
        _write_atomically(self.fs, self._join_marker_path, intent.encode() + b"\n",
                          folder=self._folders[self.data_dir])

    def remove_join_marker(self) -> None:
        try:
            self.fs.unlink(self._join_marker_path)
        except FileNotFoundError:
            return
        if self._fsync:
            self._fsync_dir(self.data_dir)

    # ---- a restored backup, until the node's first start installs it (raftdzmq -restore) ---------------------

    @property
    def restore_path(self) -> str:
        return os.path.join(self.data_dir, RESTORE_FILE)

    def has_restore_file(self) -> bool:
        return RESTORE_FILE in self.fs.listdir(self.data_dir)

    def write_restore_file(self, snapshot: Snapshot) -> None:
        """RESTORE: the backup's snapshot file (`snapshot`'s bytes, written again: its checksum is computed anew
        from what was read and checked), crash-safe (a temporary file fsynced, renamed, the folder fsynced)."""
        tmp = self.restore_path + ".tmp"
        _write_file(self.fs, tmp, lambda f: _write_snapshot_file(self.fs, f, snapshot))
        self.fs.rename(tmp, self.restore_path)
        self.fs.fsync_dir(self._folders[self.data_dir])

    def remove_restore_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.unlink(self.restore_path)
            if self._fsync:
                self._fsync_dir(self.data_dir)

    # ---- recovery -------------------------------------------------------------------------------

    def _segments(self) -> list[tuple[int, str]]:
        out = []
        for name in self.fs.listdir(self.log_dir):
            if name.endswith(".seg") and name[:-4].isdigit():
                out.append((int(name[:-4]), os.path.join(self.log_dir, name)))
        return sorted(out)

    def _snapshots(self) -> list[tuple[int, str]]:
        out = []
        for name in self.fs.listdir(self.data_dir):
            if name.startswith("snapshot-") and name.endswith(".snap") and name[9:-5].isdigit():
                out.append((int(name[9:-5]), os.path.join(self.data_dir, name)))
        return sorted(out, reverse=True)

    def _snapshot_path(self, index: int) -> str:
        return os.path.join(self.data_dir, f"snapshot-{index:020d}.snap")

    def disk_bytes(self) -> int | None:
        """The bytes this node's state takes on disk: its newest snapshot file and its log segments (GET /status's
        data_size). Cheap: two listings and a stat per file, no descriptor opened, nothing read; a file removed
        meanwhile (a compaction) counts as gone. None when the folders cannot be listed or a file stat'ed (no
        descriptor left, an I/O error): GET /status answers without the figure rather than 500 (final review, F2)."""
        try:
            paths = [path for _, path in self._segments()] + [path for _, path in self._snapshots()[:1]]
            total = 0
            for path in paths:
                try:
                    total += self.fs.size_of(path)
                except FileNotFoundError:
                    pass
            return total
        except OSError as e:
            logger.debug("could not measure the data dir for GET /status: %s", e)
            return None

    def load(self) -> StoredState:
        """Recover the state of the last save (or of the one before, when a crash cut the last one short).
        Raises StorageError (and releases the data dir)."""
        assert not self._loaded
        self._loaded = True
        try:
            if UNSAFE_REPLAY_FILTER:
                self._load_unsafe_replay_filter()
            else:
                self._load()
        except BaseException:
            self.close()
            raise
        if self.state.snapshot is not None:
            self._note_reader(self._snapshot_path(self.state.snapshot.last_included_index), self.state.snapshot.data)
        hs = self.state.hard_state
        if hs.commit_index > self.state.last_index:
            # The commit index may be saved ahead of a snapshot-only state; never beyond what we hold.
            self.state.hard_state = HardState(hs.current_term, hs.voted_for, self.state.last_index)
        return StoredState(self.state.hard_state, self.state.snapshot, list(self.state.entries))

    def _load(self) -> None:
        segments = self._segments()
        self._segment_seq = segments[-1][0] if segments else 0
        base, interrupted = self._newest_base(segments)
        if base is None:
            self._load_format1(segments[: len(segments) - len(interrupted)], interrupted)
            return
        pos, path, data, groups, good_end = base
        if good_end < len(data):
            logger.warning("%s: torn record at offset %d: cutting off %d bytes", path, good_end, len(data) - good_end)
        replay = _replay_base(path, groups)
        snapshot = None
        if replay.start_index > 0:
            snapshot = self._read_snapshot_at(replay.start_index, replay.start_term, path)
        elif replay.start_term != 0:
            raise CorruptLogError(f"{path}: base record at index 0 with term {replay.start_term}")
        self.state = StoredState(replay.hard_state, snapshot, replay.entries)
        self._segment = self._continue_segment(path, len(data), good_end)
        self._segment_bytes = self.log_bytes = good_end
        garbage = [p for _, p in segments[:pos]] + interrupted
        self._delete(garbage, keep_snapshot=replay.start_index if snapshot else None)

    def _newest_base(self, segments: list[tuple[int, str]]) -> tuple[tuple | None, list[str]]:
        """Newest first, the first segment that starts with a complete base record (group): it is the log. Returns
        (its position, path, bytes, groups and the end of its last complete group), or None when the segment
        newest with a complete record starts otherwise (format 1); and the newer segments holding no complete
        record (creations a crash cut short)."""
        interrupted = []
        for pos in range(len(segments) - 1, -1, -1):
            path = segments[pos][1]
            data = self.fs.read_file(path)
            # Only the newest segment that holds anything can have a torn tail: a segment is durable before
            # anything is appended to it, and a new one is created only once the one before is (load fsyncs it).
            groups, good_end = _scan(path, data, tail_may_tear=True)
            if not groups:
                logger.warning("%s: holds no complete record (a crash cut its creation short): deleting it", path)
                interrupted.append(path)
                continue
            if groups[0].kind == RECORD_BASE:
                return (pos, path, data, groups, good_end), interrupted
            break
        return None, interrupted

    def _continue_segment(self, path: str, size: int, good_end: int) -> int:
        """Open the segment the log goes on in, cut to `good_end`, and make durable what we rely on before anything
        goes: the segment (a killed process may have left its tail in the page cache only), its name, and the
        snapshot's name. Returns its handle."""
        fs = self.fs
        handle = fs.open_append(path)
        try:
            if good_end < size:
                fs.truncate(handle, good_end)
            if self._fsync:
                fs.fsync(handle)
                self._fsync_dir(self.log_dir)
                self._fsync_dir(self.data_dir)
        except BaseException:
            fs.close(handle)
            raise
        return handle

    def _read_snapshot_at(self, index: int, term: int, named_by: str) -> Snapshot:
        path = self._snapshot_path(index)
        try:
            snapshot = read_snapshot(path, self.fs)
        except FileNotFoundError:
            raise CorruptLogError(f"no readable snapshot in {self.data_dir}: {path}, which {named_by} starts "
                                  "after, is missing") from None
        except StorageError as e:
            raise CorruptLogError(f"no readable snapshot in {self.data_dir}: {e}") from None
        if (snapshot.last_included_index, snapshot.last_included_term) != (index, term):
            raise CorruptLogError(f"{path} holds index {snapshot.last_included_index} term "
                                  f"{snapshot.last_included_term}; {named_by} starts after index {index} term {term}")
        return snapshot

    def _delete(self, segments: list[str], keep_snapshot: int | None) -> None:
        """Unlink garbage: the given segments, every snapshot but the one at `keep_snapshot`, leftover temporary
        files; then fsync the folders so that it stays gone. Only call once what makes it garbage is durable."""
        self._unlink(self._garbage(segments, keep_snapshot))

    def _garbage(self, segments: list[str], keep_snapshot: int | None) -> list[str]:
        names = list(segments)
        names += [p for index, p in self._snapshots() if index != keep_snapshot]
        # A backup this process is writing (Runtime.backup: backup-PID-N.tmp) is not garbage: unlinked under its
        # child, the serving process found no file to open (a 500 when a backup met the node's own snapshot).
        ours = f"backup-{os.getpid()}-"
        names += [os.path.join(self.data_dir, n) for n in self.fs.listdir(self.data_dir)
                  if n.endswith(".tmp") and not n.startswith(ours)]
        names += [os.path.join(self.log_dir, n) for n in self.fs.listdir(self.log_dir) if n.endswith(".tmp")]
        return [n for n in names if n not in self._writing]

    def _unlink(self, names: list[str]) -> None:
        """Unlink `names`, then fsync both folders through the loop's handles of them (the loop's only: see
        `garbage_job`)."""
        self._unlink_files(names)
        if names and self._fsync:
            self._fsync_dir(self.log_dir)
            self._fsync_dir(self.data_dir)

    def _unlink_files(self, names: list[str]) -> None:
        """Unlink `names`; one gone already is skipped (`garbage_job` and an install both list it)."""
        for path in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.unlink(path)
            if crashpoints.enabled:
                crashpoints.hit("snapshot.between_unlinks")

    def _load_format1(self, segments: list[tuple[int, str]], interrupted: list[str]) -> None:
        """A log without base records: a data dir written before them (raftdzmq up to d2cfdfd), or a new one. Then,
        the state in memory was always the newest snapshot install's segment replayed on top of that snapshot: an
        install wrote the snapshot (fsynced, renamed, folder fsynced), then a new segment whose first record held
        the hard state and every entry after the snapshot, fsynced with its folder; older files were unlinked
        without a folder fsync, so any of them may still be here (issue 11), and are garbage. So the log is the
        newest segment begun by an install, replayed on the snapshot that began it: the one just below its first
        entry, or, when it holds no entry, the newest snapshot (an install after it that a crash cut short keeps
        its snapshot: the state after that install, without what its Ready appended). Two kinds of segment were
        not begun by an install: the first one ever (its entries start at 1), and one whose creation a crash cut
        short and the old code, restarted, then appended to (its first record has no hard state, or its entries
        follow no snapshot): its log goes on from the segment before, cut by the newest snapshot at or below
        where its entries start, as the old load did. Then write the state as a base segment, and only once
        that is durable delete the old files."""
        fs = self.fs
        snapshots = self._readable_snapshots()
        newest = max(snapshots, default=0)
        replay = _replay_format1(segments, snapshots, newest, fs)
        if replay is None:  # no segment: a new data dir (or one whose segments a crash left empty)
            replay = _Replay(newest, snapshots[newest].last_included_term if newest else 0)
        if replay.start_index is None:
            replay.start_index, replay.start_term = 0, 0
        snapshot = snapshots.get(replay.start_index)
        if snapshot is None and replay.start_index != 0:
            raise CorruptLogError(f"{self.log_dir}: the log starts after index {replay.start_index} and there is "
                                  "no snapshot there")
        self.state = StoredState(replay.hard_state, snapshot, replay.entries)
        if segments:
            logger.warning("%s: log segments without a base record (written before format 1 had them): "
                           "rewriting the log after the snapshot as one base segment", self.log_dir)
        if self._fsync:
            self._fsync_dir(self.data_dir)  # the snapshot's name, before a base record names it
        index, term = (snapshot.last_included_index, snapshot.last_included_term) if snapshot else (0, 0)
        self._segment, self._segment_bytes = self._create_segment(
            encode_base_record(index, term, self.state.hard_state, self.state.entries))
        self.log_bytes = self._segment_bytes
        self._delete([p for _, p in segments] + interrupted, keep_snapshot=index if snapshot else None)

    def _readable_snapshots(self) -> dict[int, Snapshot]:
        """Every snapshot file that reads, by index (a data dir before base records may hold several)."""
        snapshots: dict[int, Snapshot] = {}
        for index, path in self._snapshots():
            try:
                snapshots[index] = read_snapshot(path, self.fs)
            except StorageError as e:
                logger.warning("skipping snapshot: %s", e)
        if self._snapshots() and not snapshots:
            raise CorruptLogError(f"no readable snapshot in {self.data_dir}")
        return snapshots

    def _load_unsafe_replay_filter(self) -> None:
        """The replay before base records (issue 11), kept only for the crash explorer to show what it finds:
        every segment in order on top of the newest snapshot, each record's entries at or below the snapshot
        index dropped, and with them the cut they stood for. The rest is as `_load` does it."""
        fs = self.fs
        snapshot = None
        for _, path in self._snapshots():
            try:
                snapshot = read_snapshot(path, fs)
                break
            except StorageError:
                pass
        self.state = StoredState(HardState(), snapshot, [])
        segments = self._segments()
        while segments and not _scan(segments[-1][1], fs.read_file(segments[-1][1]), tail_may_tear=True)[0]:
            fs.unlink(segments.pop()[1])  # an interrupted creation, as `_load` deletes it
        self._segment_seq = segments[-1][0] if segments else self._segment_seq
        size = 0
        for n, (_, path) in enumerate(segments):
            records, size = _scan(path, fs.read_file(path), tail_may_tear=n == len(segments) - 1)
            for r in records:
                entries = [e for e in r.entries if e.index > self.state.base_index]
                if entries:
                    if entries[0].index > self.state.last_index + 1:
                        raise CorruptLogError(f"{path}: record at offset {r.offset} leaves a gap")
                    self.state.put_entries(entries)
                if r.hard_state is not None:
                    self.state.hard_state = r.hard_state
        if segments:
            self._segment = fs.open_append(segments[-1][1])
            fs.truncate(self._segment, size)
            fs.fsync(self._segment)
            self._fsync_dir(self.log_dir)
            self._fsync_dir(self.data_dir)
            self._segment_bytes = self.log_bytes = size
        else:
            index, term = (snapshot.last_included_index, snapshot.last_included_term) if snapshot else (0, 0)
            self._fsync_dir(self.data_dir)
            self._segment, self._segment_bytes = self._create_segment(
                encode_base_record(index, term, self.state.hard_state, self.state.entries))

    # ---- writing --------------------------------------------------------------------------------

    def _create_segment(self, records: bytes) -> tuple[object, int]:
        """A new newest segment holding `records` (a base record, and the batch records that continue it), durable
        (file and folder) when fsync is on; returns its handle, open for appending, and its size.

        No room (ENOSPC, EDQUOT from a write or from the new file's fsync): the file is unlinked AND the folder
        fsynced before DiskFull goes up, so that no power failure can bring back a complete base record that the
        caller, carrying on with the older segment, no longer writes to (the newest base record is the log). Any
        other error, or any error of a folder fsync, is fatal: the OSError goes up (fsyncgate: which of the
        folder's operations reached the disk is unknown, and syncing again would not tell), and the caller must
        stop; what is on the disk then recovers to the state before this segment or, with it, after. No
        descriptor for the new file: OutOfDescriptors, and nothing was made."""
        fs = self.fs
        seq = self._segment_seq + 1
        path = os.path.join(self.log_dir, f"{seq:010d}.seg")
        data = _HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION) + records
        try:
            f = fs.create(path)
        except OSError as e:  # no room for a new name, or no descriptor: the file does not exist
            if e.errno in _NO_ROOM:
                raise DiskFull(f"no room on the disk for a new log segment: {e.strerror}") from None
            if e.errno in NO_DESCRIPTOR:
                raise OutOfDescriptors(f"no file descriptor free for a new log segment: {e.strerror}") from None
            raise
        try:
            fs.append(f, data)
            if self._fsync:
                fs.fsync(f)
        except OSError as e:
            fs.close(f)
            if e.errno not in _NO_ROOM:
                raise
            fs.unlink(path)
            if self._fsync:
                self._fsync_dir(self.log_dir)  # fails: fatal, as any folder fsync
            raise DiskFull(f"no room on the disk for a new log segment: {e.strerror}") from None
        except BaseException:
            fs.close(f)
            raise
        if self._fsync:
            try:
                self._fsync_dir(self.log_dir)
            except BaseException:
                fs.close(f)
                raise
        self._segment_seq = seq
        return f, len(data)

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
        sync: bool = True,
    ) -> None:
        """Make a Ready durable: entries and hard state in one record and one fdatasync; with a snapshot newer
        than the one held, all three at once in a new segment (see the module's rules). With `sync` False (a
        Ready that only moves the commit index) the record is written but not fsynced: the next synced record,
        or the kernel, takes it to the disk. Raises DiskFull or OutOfDescriptors (nothing changed: try the same
        save again later; only an install opens files, so only a save with a snapshot can meet the second), or
        OSError when the disk fails: the caller must stop, not acknowledge (fsyncgate)."""
        self._raise_failed_off_loop()
        if snapshot is not None and snapshot.last_included_index > self.state.base_index:
            self._install_snapshot(snapshot, hard_state, entries)
            return
        if entries:
            assert self.state.base_index < entries[0].index <= self.state.last_index + 1
            base = self._base
            if base is not None and entries[0].index <= base.written_to:
                # Entries the pre-built base segment holds are replaced (a new leader cut this log): it no longer
                # holds this log. Begun again by the next step.
                self._restart_base()
        if hard_state is None and not entries:
            return
        record = encode_record(hard_state, entries)
        self._append(record)
        if crashpoints.enabled:
            crashpoints.hit("log.after_write")
        if self._fsync and sync:
            self._fdatasync(self._segment, len(record))
            if crashpoints.enabled:
                crashpoints.hit("log.after_fsync")
        self.log_bytes += len(record)
        if entries:
            self.state.put_entries(entries)
        if hard_state is not None:
            self.state.hard_state = hard_state

    def _append(self, record: bytes) -> None:
        """Write one record at the end of the segment. When the disk is full, cut off whatever part of it reached
        the file (so no torn record is left before later ones) and raise DiskFull."""
        start = self._segment_bytes
        try:
            self.fs.append(self._segment, record)
        except OSError as e:
            if e.errno not in _NO_ROOM:
                raise
            self.fs.truncate(self._segment, start)
            raise DiskFull(f"no room on the disk for the log ({len(record)} bytes): {e.strerror}") from None
        self._segment_bytes = start + len(record)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot this node took of its own state machine: write it, then drop the log it covers. Raises as
        `save` does. The same as `write_snapshot` then `commit_snapshot`, in this process."""
        if snapshot.last_included_index <= self.state.base_index:
            return
        tmp = self.begin_snapshot(snapshot.last_included_index)
        try:
            self.write_snapshot(snapshot, tmp)
        except BaseException:
            self.abort_snapshot(tmp)
            raise
        self.commit_snapshot(snapshot, tmp)

    # ---- a snapshot of this node's own, in two parts: the file (a forked child may write it), then the commit ----

    def begin_snapshot(self, index: int) -> str:
        """The temporary name a snapshot at `index` is written under (`write_snapshot`): no install deletes it as
        garbage until `commit_snapshot` or `abort_snapshot` (load does: the writer died with the process)."""
        tmp = self.snapshot_tmp_path(index)
        self._writing.add(tmp)
        return tmp

    def snapshot_tmp_path(self, index: int) -> str:
        return self._snapshot_path(index) + ".tmp"

    def write_snapshot(self, snapshot: Snapshot, tmp: str) -> None:
        """The first part of a snapshot of this node's own: its file under `tmp`, written and fsynced (not its
        folder: the rename that `commit_snapshot` makes durable is what counts). Changes nothing that load or
        `self.state` uses: a crash anywhere leaves the state as it was (load deletes a `*.tmp`). Touches nothing
        but that file (and the fs): a forked child runs it on its copy of this object, and must not touch the
        log. Raises DiskFull or OutOfDescriptors (the file unlinked, nothing changed), or OSError (fatal)."""
        _write_file(self.fs, tmp, lambda f: _write_snapshot_file(self.fs, f, snapshot))

    def open_snapshot_file(self, snapshot: Snapshot, tmp: str) -> SnapshotFileWriter:
        """`write_snapshot` a piece at a time (the runtime's stepped snapshots): the file under `tmp` (from
        `begin_snapshot`) created with its head; the caller appends the state machine's bytes, finishes, fsyncs
        and closes it, then commits or aborts it. Raises as SnapshotFileWriter says."""
        return SnapshotFileWriter(self.fs, tmp, snapshot)

    def abort_snapshot(self, tmp: str) -> None:
        """A snapshot whose writing failed or was killed: unlink what was written (not synced: a power failure
        may bring it back, and load deletes it)."""
        self._writing.discard(tmp)
        if self._base is not None and tmp == self.snapshot_tmp_path(self._base.index):
            self._drop_base()
        with contextlib.suppress(OSError):
            self.fs.unlink(tmp)

    def commit_snapshot(self, snapshot: Snapshot, tmp: str) -> Snapshot | None:
        """The second part: make the file `write_snapshot` wrote the node's snapshot and drop the log it covers
        (the module's transaction from the rename on: a folder fsync and a new segment whose base record holds
        the log after the snapshot, the entries saved since it was begun included). Work of the size of that log,
        not of the state machine's. Returns the snapshot, its data read from the file held open; or None when a
        snapshot at or past its index was installed meanwhile (from a leader): the file is unlinked and nothing
        else changes. Raises as `save` does; on DiskFull or OutOfDescriptors the state is as before and the file
        is unlinked (take the snapshot again later)."""
        self._writing.discard(tmp)
        index = snapshot.last_included_index
        self._raise_failed_off_loop()
        if index <= self.state.base_index:
            self.abort_snapshot(tmp)
            return None
        refused, self._base_refused = self._base_refused, None
        if refused is not None and refused[0] == index:
            self.abort_snapshot(tmp)
            raise refused[1]
        base = self._base
        if base is not None and ((base.index, base.term) != (index, snapshot.last_included_term)
                                 or not self._agrees_at(index, base.term) or base.syncing):
            # Begun for another snapshot, or no longer this log's, or a sync of it still runs (or its outcome is
            # not handed back yet): the whole log is written here. Never through a running sync (fsyncgate:
            # Linux reports a writeback error once per open file description, so if that thread consumed an EIO
            # the commit's fsync on the same descriptor would return 0 and lost pages would become the log).
            self._drop_base()
            base = None
        try:
            return self._commit_install(snapshot, tmp, None, [], prebuilt=base)
        except (DiskFull, OutOfDescriptors):
            self.abort_snapshot(tmp)
            raise

    # ---- the base segment of a snapshot of this node's own, pre-built in bounded steps (issue 13) -------------

    def begin_base(self, snapshot: Snapshot) -> None:
        """Pre-build the base segment that `commit_snapshot(snapshot)` needs, while its file is written (a forked
        child): `base_step` writes the log after the snapshot into it a bounded piece at a time, and
        `base_sync_job` fdatasyncs that bulk off the loop; the commit then appends only the entries since and
        the hard state, closing its base group, and renames it into place. Until then it is a `*.tmp` whose group
        is open: a crash leaves the state as it was, and load deletes it."""
        self._drop_base()
        index = snapshot.last_included_index
        if self.state.base_index < index <= self.state.last_index:
            self._base = _PrebuiltBase(index, snapshot.last_included_term,
                                       os.path.join(self.log_dir, f"base-{index:020d}.seg.tmp"))
            self._base_refused = None

    def base_step(self, max_bytes: int) -> int:
        """Write the next entries of the log into the pre-built base segment, up to about `max_bytes` of their
        data (at least one), creating it at the first step. Returns how many entries it still lacks (0: caught
        up; also when there is none being built). A full disk or no descriptor drops it: the commit of its
        snapshot then refuses (DiskFull, OutOfDescriptors: nothing changed, the snapshot is taken again later)."""
        self._raise_failed_off_loop()
        base = self._base
        if base is None:
            return 0
        state = self.state
        start = state.base_index
        if base.index <= start or not self._agrees_at(base.index, base.term):
            self._drop_base()  # overtaken (the commit finds it so too) or no longer this log
            return 0
        # By index, only the step sliced: the work is the step's, not the log's since the snapshot (review
        # basestep L1: a copy of the rest of the list at every step was 7.9 ms a step at 400,000 entries).
        entries = state.entries
        lo = base.written_to - start  # the list's position of the first entry the segment lacks
        if base.handle is not None and lo >= len(entries):
            return 0
        size = 0
        hi = lo
        while hi < len(entries) and (hi == lo or size < max_bytes):  # at least one
            size += len(entries[hi].data)
            hi += 1
        step = entries[lo:hi]
        try:
            if base.handle is None:
                data = _HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION) + encode_base_group_head(
                    base.index, base.term, state.hard_state, step)
                base.handle = self._create_file(base.path)
                self._writing.add(base.path)
            else:
                data = encode_group_parts(step)
            self.fs.append(base.handle, data)
        except OSError as e:
            self._drop_base()
            if e.errno in _NO_ROOM:
                self._refuse_base(base.index, e)
                return 0
            raise
        except OutOfDescriptors as e:
            self._drop_base()
            self._base_refused = (base.index, e)
            return 0
        base.size += len(data)
        base.written_to += len(step)
        if crashpoints.enabled:
            crashpoints.hit("snapshot.base_step")
        return len(entries) - hi

    def base_pending(self) -> tuple[int, int, bool] | None:
        """The pre-built base segment's progress: (entries it lacks, bytes not known durable, a sync running), or
        None when none is being built."""
        base = self._base
        if base is None:
            return None
        return self.state.last_index - base.written_to, base.size - base.synced, base.syncing

    def base_sync_job(self) -> tuple[Callable[[], OSError | None], Callable[..., None]] | None:
        """The fdatasync of what the pre-built base segment holds so far, for a thread (a file no reader uses
        yet: it may run off the loop while steps append to it): (`sync`, run it anywhere, it returns its error;
        `done(error, raised=None)`, call it back in the loop, once, however the call of `sync` ended). None when
        nothing is to sync or a sync runs. From the job's making until `done` the segment counts as syncing
        (`base_pending`'s third item: the one record of it), and a commit meanwhile drops it (fsyncgate: an EIO
        that thread consumed is not reported again to the commit's fsync on the same descriptor). A full disk at
        it drops the segment (the snapshot's commit refuses, DiskFull); any other error it returns is fatal
        (fsyncgate), raised by the next step or commit; one it returns for a segment dropped meanwhile is logged
        (not the log, but the disk may be failing). `raised`: the exception the call raised instead of returning
        (the threadpool's, the sync's own, or the greenlet's: GreenletExit): its outcome unknown, the segment is
        dropped (logged) and the snapshot's commit writes the log whole, as before basestep (not fatal: the
        segment was never the log). The call may have raised with `sync` still queued (gevent's ThreadPool queues
        a task before it starts a thread for it, and that start can fail) or running, so who closes the
        descriptor is settled by `_BaseSyncClaim` (review baseleft2 R1): exactly one side, never during the
        fdatasync, and never a number the next opened file (the commit's) may have taken (fsyncgate: the stray
        fdatasync would consume that file's writeback error). `sync` takes the claim before it touches the
        descriptor and skips when the base was abandoned; `done(raised)` closes it at once unless the fdatasync
        runs (then `sync` closes it at its end). A `sync` never run after all leaks nothing: its descriptor was
        closed by `done`. The claim takes no lock: the loop never waits on the disk."""
        base = self._base
        if base is None or base.handle is None or base.syncing or base.synced >= base.size or not self._fsync:
            return None
        base.syncing = True
        handle, size, fs = base.handle, base.size, self.fs
        claim = _BaseSyncClaim()

        def sync() -> OSError | None:
            if not claim.start():
                return None  # abandoned while queued: `done` closed the descriptor; its number may be reused
            error = None
            try:
                fs.fdatasync(handle)
            except OSError as e:
                error = e
            finally:
                if claim.finish():  # abandoned while it ran: its close is this side's, and its error no one's else
                    if error is not None:
                        logger.error("the sync of the abandoned pre-built log segment %s failed: %s (not the log; "
                                     "but the disk may be failing)", base.path, error)
                    self._close_dropped_base(base.path, handle)
            return error

        def done(error: OSError | None, raised: BaseException | None = None) -> None:
            if raised is not None:
                closes_here = claim.abandon()
                logger.error("the sync of the snapshot's pre-built log segment %s raised %r: the segment dropped "
                             "(the snapshot's commit writes the log whole), its descriptor %r %s", base.path,
                             raised, handle, "closed" if closes_here else "closed by the sync, at its end")
                if self._base is base:
                    self._drop_base()  # still syncing: the drop leaves its handle to the claim
                base.syncing = False
                if closes_here:
                    self._close_dropped_base(base.path, handle)
                return
            base.syncing = False
            if base.dropped:
                if error is not None:
                    logger.error("the sync of the dropped pre-built log segment %s failed: %s (not the log; but the "
                                 "disk may be failing)", base.path, error)
                self._close_dropped_base(base.path, handle)
                return
            if error is None:
                base.synced = max(base.synced, size)
                return
            building = self._base is base
            if building:
                self._drop_base()
            if building and error.errno in _NO_ROOM:
                self._refuse_base(base.index, error)
            else:
                # Any other failure: fatal, at the next save, step or commit (a commit never takes a segment
                # whose sync runs, so this one is not the log; but the disk is failing).
                self._failed_off_loop = error

        return sync, done

    def _raise_failed_off_loop(self) -> None:
        """Raise the disk's error met off the loop, if any (fatal: `_failed_off_loop`), with its traceback reset:
        one stored error raised at each call would otherwise grow a frame longer each time."""
        if self._failed_off_loop is not None:
            raise self._failed_off_loop.with_traceback(None)

    def _refuse_base(self, index: int, error: OSError) -> None:
        """The commit of the snapshot at `index` refuses (DiskFull): its pre-built segment found no room."""
        self._base_refused = (index, DiskFull(f"no room on the disk for the snapshot's log segment: {error.strerror}"))

    def _agrees_at(self, index: int, term: int) -> bool:
        """The log holds an entry at `index` (after the snapshot held) of `term`."""
        state = self.state
        return state.base_index < index <= state.last_index and state.entries[index - state.base_index - 1].term == term

    def _restart_base(self) -> None:
        base = self._base
        assert base is not None
        self._drop_base()
        self._base = _PrebuiltBase(base.index, base.term, base.path)

    def _drop_base(self) -> None:
        """Stop pre-building: its file closed unless a sync of it runs (whose end closes it), and unlinked (not
        synced: load deletes a `*.tmp`). Never raises: a close or an unlink that fails is logged."""
        base, self._base = self._base, None
        if base is None or base.handle is None:
            return
        base.dropped = True
        self._writing.discard(base.path)
        if not base.syncing:
            self._close_dropped_base(base.path, base.handle)
        try:
            self.fs.unlink(base.path)
        except OSError as e:  # harmless: a *.tmp that load deletes; but the disk may be failing
            logger.warning("could not unlink the dropped pre-built log segment %s: %s (load deletes it)",
                           base.path, e)

    def _close_dropped_base(self, path: str, handle: object) -> None:
        """Close a dropped pre-built segment's handle; an error is logged, never raised (it was never the log:
        nothing durable depends on it; but the disk may be failing)."""
        try:
            self.fs.close(handle)
        except OSError as e:
            logger.warning("could not close the dropped pre-built log segment %s: %s", path, e)

    def _create_file(self, path: str):
        """A new file's handle; no descriptor: OutOfDescriptors, nothing made; no room: OSError(ENOSPC) up."""
        return self._open(self.fs.create, path, f"no file descriptor free for {path}")

    def _open(self, opener: Callable[[str], object], path: str, refusal: str):
        """`opener(path)`, its want of a descriptor raised as OutOfDescriptors(`refusal`: ...)."""
        try:
            return opener(path)
        except OSError as e:
            if e.errno in NO_DESCRIPTOR:
                raise OutOfDescriptors(f"{refusal}: {e.strerror}") from None
            raise

    def _close_prebuilt(self, base: _PrebuiltBase, state: StoredState) -> None:
        """Append to the pre-built base segment the entries of `state` it lacks and its hard state, closing its
        base group, and make it durable (its bulk mostly is already: `base_sync_job`). No room: DiskFull, and the
        segment dropped (not renamed: nothing a reader uses changed). Still a `*.tmp`: the rename commits it."""
        tail = encode_group_tail(state.hard_state, state.entries[base.written_to - base.index :])
        try:
            self.fs.append(base.handle, tail)
            base.size += len(tail)
            if self._fsync:
                self.fs.fsync(base.handle)  # a file no reader uses: a failure loses nothing acknowledged
        except OSError as e:
            self._drop_base()
            if e.errno in _NO_ROOM:
                raise DiskFull(f"no room on the disk for the snapshot's log segment: {e.strerror}") from None
            raise
        base.written_to = state.last_index
        if crashpoints.enabled:
            crashpoints.hit("snapshot.after_base_tail")

    def _rename_prebuilt(self) -> tuple[object, int]:
        """The commit point of a pre-built base segment: renamed to the next segment's name, its folder fsynced
        (a failure of either is fatal: which reached the disk is unknown). Returns its handle and size."""
        base = self._base
        assert base is not None and base.handle is not None
        seq = self._segment_seq + 1
        self.fs.rename(base.path, os.path.join(self.log_dir, f"{seq:010d}.seg"))
        if self._fsync:
            self._fsync_dir(self.log_dir)
        self._segment_seq = seq
        self._base = None
        self._writing.discard(base.path)
        return base.handle, base.size

    def receive_snapshot(self, meta: Snapshot) -> SnapshotReceiver:
        """A sink for a leader's snapshot's chunks (RaftNode.open_snapshot_sink): its file, written as they come
        (the module's rules). `meta`: the snapshot's index, term and configuration."""
        return SnapshotReceiver(self, meta)

    def _install_snapshot(self, snapshot: Snapshot, hard_state: HardState | None, entries: list[Entry]) -> None:
        """A leader's snapshot with the Ready's hard state and entries: the module's transaction, the snapshot's
        file the one received (`receive_snapshot`) or else written here. A base segment being pre-built for a
        snapshot of this node's own is dropped: this install changes the log it was built from."""
        self._drop_base()
        built = self._base_record(snapshot, hard_state, entries)  # may be refused (RecordTooBig) before any write
        received = getattr(snapshot.data, "received_tmp", None)
        taken_back = False
        if received is not None and received in self._writing:
            tmp = received  # its file, received and fsynced: renamed into place
        else:
            tmp = self.snapshot_tmp_path(snapshot.last_included_index)
            # The node's own snapshot at this index would be written under the same name (the core installs a
            # leader's only above its commit index, and takes its own at or below it: review st31, r2).
            assert tmp not in self._writing, f"{tmp}: a snapshot of this node's own is being written at this index"
            taken_back = self._take_back_leftover(snapshot, tmp)
            if not taken_back:
                _write_file(self.fs, tmp, lambda f: _write_snapshot_file(self.fs, f, snapshot))
        try:
            handle = self._hold_snapshot_file(tmp)  # OutOfDescriptors: nothing changed, a received file still ours
        except OutOfDescriptors:
            if taken_back:
                # Left as it was, a leftover for the next retry to take back: unlinked, the inode `snapshot.data`
                # holds would stay allocated beside the new copy the retry writes (review final32 L1). Unsynced:
                # both names are garbage to load, the snapshot above the held one.
                self.fs.rename(tmp, self._snapshot_path(snapshot.last_included_index))
            elif tmp != received:
                self.abort_snapshot(tmp)
            raise
        # Handed over for good: should the install stop at a full disk after the rename, the retry takes the file
        # back or writes a new one from the data (`_take_back_leftover`).
        self._writing.discard(tmp)
        self._commit_install(snapshot, tmp, hard_state, entries, built, handle)

    def _take_back_leftover(self, snapshot: Snapshot, tmp: str) -> bool:
        """Before a leader's snapshot's file is written under `tmp`: the file an install of a snapshot at the same
        index left at its final name when it was refused after its rename (a full disk at its segment). That name
        is above the held snapshot, so it is not live: load reads the snapshot the newest base record names, and
        deletes this one (nor is it the garbage job's: `_never_named_again`). When `snapshot`'s data reads that
        very file (a received one: its SnapshotFile was noted as its reader at the rename), it is renamed back to
        `tmp` and installed as it is: True (the note stays under the final name, true again once the install
        commits, or once the file is renamed back there when no descriptor is free to hold it: `_install_snapshot`).
        Else it is unlinked (its folder fsynced) before the new copy is written: False. Either way the retry never
        needs room for two copies, which a disk with room for one would refuse forever (review st31 L2)."""
        path = self._snapshot_path(snapshot.last_included_index)
        assert snapshot.last_included_index > self.state.base_index
        readers = self._snapshot_readers.get(path, ())
        try:
            if any(ref() is snapshot.data for ref in readers):
                self.fs.rename(path, tmp)  # both names garbage to load: no fsync needed between
                return True
            self.fs.unlink(path)
        except FileNotFoundError:
            return False
        self._snapshot_readers.pop(path, None)  # they read the unlinked file, no longer one of this name
        if self._fsync:
            self._fsync_dir(self.data_dir)
        return False

    def _hold_snapshot_file(self, tmp: str):
        """A handle of the written snapshot file `tmp`, opened before the commit point: the committed snapshot
        reads its data through it (a rename keeps it). No descriptor free: OutOfDescriptors, and nothing changed
        (the snapshot is not committed: one that cannot be read would be sent and restored from; the old one
        stays, and the caller tries again later)."""
        return self._open(self.fs.open_read, tmp, f"no file descriptor free to hold the snapshot {tmp}")

    def _state_after(self, snapshot: Snapshot, hard_state: HardState | None, entries: list[Entry]) -> StoredState:
        state = StoredState(self.state.hard_state, self.state.snapshot, list(self.state.entries))
        state.install_snapshot(snapshot)
        if entries:
            assert state.base_index < entries[0].index <= state.last_index + 1
            state.put_entries(entries)
        if hard_state is not None:
            state.hard_state = hard_state
        return state

    def _base_record(self, snapshot: Snapshot, hard_state: HardState | None,
                     entries: list[Entry]) -> tuple[StoredState, bytes]:
        state = self._state_after(snapshot, hard_state, entries)
        return state, encode_base_record(snapshot.last_included_index, snapshot.last_included_term,
                                         state.hard_state, state.entries)

    def _commit_install(self, snapshot: Snapshot, tmp: str, hard_state: HardState | None,
                        entries: list[Entry], built: tuple[StoredState, bytes] | None = None,
                        held=None, prebuilt: _PrebuiltBase | None = None) -> Snapshot:
        """The transaction of the module's rules from the written file on: the new state is computed first, and
        becomes `self.state` only once the segment that holds it is durable. The snapshot kept reads its data
        through `held` (`_hold_snapshot_file`'s handle of `tmp`, opened here when None), taken before the rename:
        with no descriptor free, OutOfDescriptors before anything changed. `prebuilt`: the snapshot's base segment,
        pre-built (`begin_base`): closed and fsynced before the rename of the snapshot's file, renamed into place
        after it (the commit point), instead of a new segment written here whole."""
        index = snapshot.last_included_index
        if held is None:
            held = self._hold_snapshot_file(tmp)
        data: SnapshotFile | None = None
        try:
            make_segment: Callable[[], tuple[object, int]]
            if prebuilt is not None and prebuilt.handle is not None:
                # The node's own snapshot, the log agreeing with it at its index (commit_snapshot checked): the
                # log after it is a slice (install_snapshot's pass over every entry in Python: ~5 ms at 100,000).
                assert hard_state is None and not entries
                base_index = self.state.base_index
                state = StoredState(self.state.hard_state, snapshot, self.state.entries[index - base_index :])
                self._close_prebuilt(prebuilt, state)  # DiskFull: nothing a reader uses changed
                make_segment = self._rename_prebuilt
            else:
                self._drop_base()
                # `built`: the caller's, made from the same state (nothing changed it since): encoded once.
                state, base = built if built is not None else self._base_record(snapshot, hard_state, entries)
                make_segment = lambda: self._create_segment(base)  # noqa: E731
            path = self._snapshot_path(index)
            data = SnapshotFile.at(self.fs, path, held)  # its head read now, before anything changes
            self._note_reader(path, data)
            if getattr(snapshot.data, "received_tmp", None) == tmp:  # the core's, and a restore's: this file too
                self._note_reader(path, snapshot.data)
            if crashpoints.enabled:
                crashpoints.hit("snapshot.after_write")
            self.fs.rename(tmp, path)
            self.fs.fsync_dir(self._folders[self.data_dir])
            if crashpoints.enabled:
                crashpoints.hit("snapshot.after_rename")
            handle, size = make_segment()
            if crashpoints.enabled:
                crashpoints.hit("snapshot.after_segment")
        except BaseException:
            with contextlib.suppress(Exception):
                if data is None:
                    self.fs.close(held)
                else:  # it owns `held`: closed here, and its collection then closes nothing (that number reused)
                    data.close()
            raise
        # Committed: the new segment is durable, and it makes everything older garbage.
        kept = Snapshot(index, snapshot.last_included_term, snapshot.membership, data)
        state.snapshot = kept
        old, self._segment = self._segment, handle
        self._segment_bytes = self.log_bytes = size
        self.state = state
        if old is not None:
            self.fs.close(old)
        try:
            names = self._garbage([p for seq, p in self._segments() if seq < self._segment_seq], keep_snapshot=index)
        except OSError as e:
            if e.errno not in NO_DESCRIPTOR:
                raise
            # Listing the folders opens them. The install stands; what it made garbage stays until load or the
            # next install deletes it (load takes the newest base segment, and deletes any snapshot it does not name).
            logger.warning("installed the snapshot at index %d, but no file descriptor was free to list the old "
                           "files: they go at the next snapshot or start (%s)", index, e.strerror)
            return kept
        if self.unlink_garbage_later:
            now = [n for n in names if not self._never_named_again(n, index)]
            later = [n for n in names if n not in now and n not in self._unlinking]  # two installs: listed once
            self._unlinking += later
            self._unlink_retry_at = 0.0  # garbage of its own: what waited goes with it
            if now:  # rare (an install refused after its rename, a leftover): unlinked here, before any name returns
                self._unlink(now)
            return kept
        self._unlink(names)
        return kept

    def _never_named_again(self, path: str, kept_index: int) -> bool:
        """Whether no file of this process can take the name `path` once the install of a snapshot at `kept_index`
        has committed: the only names `garbage_job` may be handed, since it unlinks (and opens, to cut) by name
        later, in a thread, while the loop goes on installing. Such a name never becomes what load reads: a log
        segment numbered below the live one (their numbers only go up), and a snapshot's files (`snapshot-I.snap`,
        its `.tmp` and `.received.tmp`, `log/base-I.seg.tmp`) at an index I below `kept_index` (installs only go
        up: `save` and `commit_snapshot` take no snapshot at or below the one held). A name is what it encodes:
        the index, not the term nor which install made it, so a snapshot's file above the kept one (left by an
        install refused after its rename) takes a live name again when that snapshot is installed again, and the
        loop writes the other `*.tmp` names (node.json's, node.key's) again: those are unlinked in the loop."""
        folder, name = os.path.split(path)
        if folder == self.log_dir:
            if (segment := _SEGMENT_NAME.fullmatch(name)) is not None:
                return int(segment[1]) < self._segment_seq
            named = _BASE_TMP_NAME.fullmatch(name)
        else:
            named = _SNAPSHOT_FILE_NAME.fullmatch(name) if folder == self.data_dir else None
        return named is not None and int(named[1]) < kept_index

    def garbage_job(self) -> Callable[[], None] | None:
        """With `unlink_garbage_later`: the unlinks of what installs made garbage (after their commit points: load
        deletes it too) and the folder fsyncs after them, for a thread: the loop does not wait while the file
        system frees a big file (~50 ms for a 45 MB segment here). An old snapshot or segment no SnapshotFile
        reads (noted now, in the loop) is opened first, and cut once unlinked (`_cut`: the module's rules). A
        failure is logged: what is left goes at the next install or start. But a folder fsync's error is fatal,
        as any folder fsync's (fsyncgate): logged, and raised by the next save, step or commit. The job fsyncs
        the folders through descriptors it opens itself (without the reserve, as its files), never the loop's
        handles of them: Linux reports a writeback error once per open file description, so one the job took
        there, the loop's next commit point (a snapshot's rename, a new segment) would not see, and would commit
        on what never reached the disk (review fresh, S1). None when there is nothing to free, once a folder
        fsync has failed: a new job's descriptors would not see that error, and it would cut (review r30, S-a), or
        while names a job could not unlink wait (`_unlink_whole`)."""
        if self._failed_off_loop is not None or not self._unlinking or time.monotonic() < self._unlink_retry_at:
            return None
        names, self._unlinking = self._unlinking, []
        free = [n for n in names if n.endswith((".snap", ".seg")) and not self._read_now(n)]

        def unlink() -> None:
            try:
                self._unlink_off_loop(names, free)
            except OSError as e:
                logger.warning("could not unlink the files a snapshot made garbage (%s): they go at the next "
                               "snapshot or start", e)

        return unlink

    def _unlink_off_loop(self, names: list[str], free: list[str]) -> None:
        """The garbage job's work, in its thread: both folders opened by descriptors of its own (without the
        reserve), then the files of `free` to cut, then every unlink, the folders fsynced through those
        descriptors, and the cuts. The folders first: with few descriptors free, a file that could not be
        opened is only unlinked whole, whereas no folder descriptor makes every unlink whole and unsynced. A
        folder fsync's failure is fatal (`garbage_job`): logged, and raised by the next save, step or commit; no
        cut follows. No descriptor free for a folder: the files are unlinked whole, not cut and with no folder
        fsync (a name a crash brings back is garbage, which load deletes); if even that fails the names go back
        to `_unlinking`, for a job after the next install or GARBAGE_RETRY_SECONDS (review r30, L-a; st31 L3).
        Any other OSError goes up (logged by the job)."""
        folders: list = []
        handles: list = []
        try:
            try:
                if self._fsync:
                    for path in (self.log_dir, self.data_dir):
                        folders.append(self.fs.open_dir(path, reserve=False))
            except OSError as e:
                if e.errno not in NO_DESCRIPTOR:
                    raise
                self._unlink_whole(names, e)
                return
            for path in free:
                try:
                    handles.append(self.fs.open_append(path, reserve=False))  # the reserve is the loop's
                except OSError as e:  # gone already (an earlier job's), or no descriptor: unlinked whole
                    if not isinstance(e, FileNotFoundError) and e.errno not in NO_DESCRIPTOR:
                        raise
            self._unlink_files(names)
            try:
                for folder in folders:
                    self.fs.fsync_dir(folder)
            except OSError as e:
                logger.error("a folder fsync after unlinking the garbage of a snapshot failed: %s (fatal at the next "
                             "save)", e)
                self._failed_off_loop = e
                return
            for handle in handles:
                self._cut(handle)
        finally:
            for handle in handles + folders:
                with contextlib.suppress(OSError):
                    self.fs.close(handle)

    def _unlink_whole(self, names: list[str], no_descriptor: OSError) -> None:
        """The garbage job's unlinks with no descriptor free for a folder (`_unlink_off_loop`). The names it could
        not unlink go back to `_unlinking`: the runtime makes no job while one runs, so only an install's in-place
        extend of that list can come between (and a name listed twice is skipped once gone). They wait for the next
        install or GARBAGE_RETRY_SECONDS: a disk that keeps refusing them costs no job and warnings at every drive
        (the job with folder descriptors drops such names: the next install or load lists them again)."""
        logger.warning("no file descriptor free to fsync the folders after unlinking the garbage of a snapshot (%s): "
                       "unlinked whole, not cut", no_descriptor.strerror)
        try:
            self._unlink_files(names)
        except OSError as e:
            self._unlink_retry_at = time.monotonic() + GARBAGE_RETRY_SECONDS
            self._unlinking += [n for n in names if n not in self._unlinking]
            logger.warning("could not unlink the files a snapshot made garbage (%s): tried again at the next "
                           "install or in %g s", e, GARBAGE_RETRY_SECONDS)

    def _note_reader(self, path: str, data: object) -> None:
        """`data` (a SnapshotFile, else nothing to note) reads the snapshot file now named `path`. The names whose
        readers are all gone are dropped here (without `unlink_garbage_later` nothing else looks at them)."""
        if isinstance(data, SnapshotFile):
            self._snapshot_readers = {p: refs for p, refs in self._snapshot_readers.items()
                                      if any(ref() is not None for ref in refs)}
            self._snapshot_readers.setdefault(path, []).append(weakref.ref(data))  # unhashable: compared by content

    def _read_now(self, path: str) -> bool:
        """Whether a SnapshotFile still reads the file at `path` through its handle (not closed, not collected)."""
        for ref in self._snapshot_readers.get(path, ()):
            reader = ref()
            if reader is not None and reader.handle is not None:
                return True
        self._snapshot_readers.pop(path, None)
        return False

    def _cut(self, handle) -> None:
        """Cut the unlinked garbage file open at `handle` from its end, GARBAGE_CUT_STEP_BYTES a step, each step
        fdatasynced, down to one step or less, which its close frees: a journal commit then frees one step, not the
        whole file. The runtime runs one job at a time (two cutting one file could extend it: a size read, the
        other's cut, then this one's)."""
        while (size := self.fs.file_size(handle)) > GARBAGE_CUT_STEP_BYTES:
            self.fs.truncate(handle, size - GARBAGE_CUT_STEP_BYTES)
            if self._fsync:
                self.fs.fdatasync(handle)

    def close(self) -> None:
        self._drop_base()
        if self._segment is not None:
            if self._fsync:
                self.fs.fsync(self._segment)
            self.fs.close(self._segment)
            self._segment = None
        for path in list(self._folders):
            self.fs.close(self._folders.pop(path))
        if self._lock is not None:
            self.fs.unlock(self._lock)
            self._lock = None


NODE_KEY = "node.key"
JOIN_MARKER = "JOINING"  # in the data dir while a node's first start is not done: "bootstrap", "join" or "restore"
RESTORE_FILE = "RESTORE"  # a backup's snapshot file (raftdzmq -restore), installed by the node's first start


# Moved to raftlib.server.nodestart (a node's identity and first start are the server's concern, and the library
# does not depend on the server): importable from here for one more release (embedders and old scripts), looked up
# only when asked for (PEP 562), so that importing raftlib.storage imports nothing of raftlib.server. The project
# imports them from raftlib.server.nodestart.
_MOVED_TO_THE_SERVER = frozenset({
    "ForcedAgain", "LogMissing", "NAMED_ID", "NodeStart", "NotJoined", "RestoreNotJoin", "force_new_cluster",
    "name_of", "new_node_id", "settle_forcing", "start_node",
})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_THE_SERVER:
        from .server import nodestart
        return getattr(nodestart, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _MOVED_TO_THE_SERVER)


# The knobs re-exported above are copies, read only in their homes: setting one here (an old script's
# `storage.MAX_RECORD_BYTES = ...`) is forwarded there, never silently lost (review of the split, Q1).
_KNOB_HOMES = {"MAX_RECORD_BYTES": "logformat", "SECTOR_BYTES": "logformat", "SNAPSHOT_IO_BYTES": "snapshotfile"}


class _StorageModule(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        home = _KNOB_HOMES.get(name)
        if home is not None:
            setattr(importlib.import_module(f"{__package__}.{home}"), name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _StorageModule
