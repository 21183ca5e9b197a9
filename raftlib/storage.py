"""DiskStorage: a node's durable state in its data dir: log segments, snapshots, identity, and a lock.

Rules:
- A Ready's entries and hard state become durable with one record and one fdatasync (`save`). Files are only
  ever appended to, cut back to a good record, renamed into place or unlinked; never rewritten in place. Every
  file operation goes through a `raftlib.fs.FileSystem` (the real one unless a test passes another).
- Records are replayed with their full meaning, always: a record's entries replace every entry at or after their
  first index (that is how a conflicting suffix is cut, §5.3), whatever snapshot came later.
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
  before base records existed writes one (see `_load_format1`).
- A torn record at the end of the newest segment (a crash mid-append) is cut off with a warning; any other damage
  stops the node with the file and offset named. A segment newer than the newest base that holds no complete
  record is a segment creation a crash interrupted: deleted with a warning.

The data dir:

    LOCK                   held with flock(LOCK_EX) while a process uses the dir
    node.json              {"format": 1, "node_id": ..., "raft_address": ..., "http_address": ...}
    log/NNNNNNNNNN.seg     log segments: "RDZMQLOG", u32 version 1, then records (README, "The data dir")
    snapshot-IIII.snap     the snapshot the newest base record names (IIII = its last included index, 20 digits)

A record is `u32 length | u32 crc32(payload) | payload`; the payload is a type byte and CBOR: type 1 (batch)
`[hard_state or null, [entry, ...]]`, type 2 (base) `[snapshot_index, snapshot_term, hard_state, [entry, ...]]`.
Readers from before type 2 stop on it with "unknown record type", naming the file and offset.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import zlib

import cbor2

from . import codec, crashpoints
from .fs import FileSystem, OsFileSystem
from .interfaces import StoredState
from .messages import Entry, HardState, Snapshot

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"RDZMQLOG"
SNAPSHOT_MAGIC = b"RDZMQSNP"
_HEADER = struct.Struct(">8sI")  # magic, format version
_RECORD = struct.Struct(">II")  # payload length, crc32(payload)
MAX_RECORD_BYTES = 256 << 20
RECORD_BATCH = 1  # payload: 1 type byte, then CBOR [hard_state or null, [entry, ...]]
RECORD_BASE = 2  # payload: 1 type byte, then CBOR [snapshot_index, snapshot_term, hard_state, [entry, ...]]

# Test-only (the crash explorer's mutation table): replay every segment as the code before base records did,
# dropping each record's entries at or below the snapshot index, and with them the cut that record stood for.
UNSAFE_REPLAY_FILTER = False

logger = logging.getLogger("raftlib.storage")


class StorageError(Exception):
    """The data dir cannot be used; the message says why and where."""


class CorruptLogError(StorageError):
    pass


class UnknownFormatError(StorageError):
    pass


class DataDirLocked(StorageError):
    pass


class DiskFull(StorageError):
    """The disk had no room (ENOSPC, EDQUOT). Nothing of the failed write is left behind: the same save may be
    tried again once there is room, and the data dir and the storage's state stay as they were before."""


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _write_atomically(fs: FileSystem, path: str, data: bytes, crash_point: str | None = None) -> None:
    """Write to a temporary file, fsync, rename over `path`, fsync the folder. Out of room: DiskFull, no trace."""
    tmp = path + ".tmp"
    try:
        f = fs.create(tmp)
        try:
            fs.append(f, data)
            fs.fsync(f)
        finally:
            fs.close(f)
    except OSError as e:
        with contextlib.suppress(OSError):
            fs.unlink(tmp)
        if e.errno in _NO_ROOM:
            raise DiskFull(f"no room on the disk for {path}: {e.strerror}") from None
        raise
    if crash_point and crashpoints.enabled:
        crashpoints.hit(crash_point)
    fs.rename(tmp, path)
    fs.fsync_dir(os.path.dirname(path))


def _check_header(path: str, data: bytes, magic: bytes, what: str) -> None:
    found, version = _HEADER.unpack_from(data, 0)
    if found != magic:
        raise CorruptLogError(f"{path}: not a raftdzmq {what} (bad magic at offset 0)")
    if version != FORMAT_VERSION:
        raise UnknownFormatError(f"{path}: {what} format {version}; this raftdzmq reads format {FORMAT_VERSION}")


def _hard_state_out(hs: HardState | None) -> list | None:
    return None if hs is None else [hs.current_term, hs.voted_for, hs.commit_index]


def _framed(payload: bytes) -> bytes:
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def encode_record(hard_state: HardState | None, entries: list[Entry]) -> bytes:
    """A batch record: the Ready's hard state (or None) and entries."""
    hs = None if hard_state is None else [hard_state.current_term, hard_state.voted_for, hard_state.commit_index]
    return _framed(bytes([RECORD_BATCH]) + cbor2.dumps([hs, [codec.entry_to_wire(e) for e in entries]]))


def encode_base_record(snapshot_index: int, snapshot_term: int, hard_state: HardState, entries: list[Entry]) -> bytes:
    """A base record: the whole log after the snapshot at `snapshot_index`; what came before is forgotten."""
    body = [snapshot_index, snapshot_term, _hard_state_out(hard_state), [codec.entry_to_wire(e) for e in entries]]
    return _framed(bytes([RECORD_BASE]) + cbor2.dumps(body))


class _Record:
    __slots__ = ("offset", "kind", "hard_state", "entries", "snapshot_index", "snapshot_term")

    def __init__(self, offset, kind, hard_state, entries, snapshot_index=None, snapshot_term=None) -> None:
        self.offset, self.kind, self.hard_state, self.entries = offset, kind, hard_state, entries
        self.snapshot_index, self.snapshot_term = snapshot_index, snapshot_term


def _decode_record(path: str, offset: int, payload: bytes) -> _Record:
    try:
        kind = payload[0]
        body = cbor2.loads(payload[1:])
        if kind == RECORD_BATCH:
            hs, entries = body
            base = None
        elif kind == RECORD_BASE:
            index, term, hs, entries = body
            if type(index) is not int or type(term) is not int or index < 0 or term < 0 or hs is None:
                raise ValueError("bad base record")
            base = (index, term)
        else:
            raise ValueError(f"unknown record type {payload[:1]!r}")
        entries = [codec.entry_from_wire(e) for e in entries]
        hard_state = None if hs is None else codec.decode_hard_state(cbor2.dumps(hs))
    except Exception as e:
        raise CorruptLogError(f"{path}: undecodable record at offset {offset}: {e}") from None
    for n, e in enumerate(entries):
        if e.index != entries[0].index + n or e.index < 1:
            raise CorruptLogError(f"{path}: record at offset {offset} holds entries out of order")
    if base is None:
        return _Record(offset, kind, hard_state, entries)
    return _Record(offset, kind, hard_state, entries, *base)


def _scan(path: str, data: bytes, tail_may_tear: bool) -> tuple[list[_Record], int]:
    """The records of a segment, and the offset where the good ones end (less than len(data) when a torn tail
    follows them). A torn tail is allowed only when `tail_may_tear`; any other damage raises CorruptLogError."""
    if len(data) < _HEADER.size:
        if tail_may_tear:
            return [], 0
        raise CorruptLogError(f"{path}: truncated segment header")
    if tail_may_tear and not any(data[: _HEADER.size]):
        return [], 0  # the file's size reached the disk, its data did not
    _check_header(path, data, SEGMENT_MAGIC, "log segment")
    records = []
    offset = _HEADER.size
    while offset < len(data):
        problem = None
        end = len(data)
        if offset + _RECORD.size > len(data):
            problem = "incomplete record header"
        else:
            length, crc = _RECORD.unpack_from(data, offset)
            end = offset + _RECORD.size + length
            if length == 0:
                problem = "empty record"  # zeros: the size reached the disk, the data did not
            elif length > MAX_RECORD_BYTES or end > len(data):
                problem = f"record length {length} runs past the end of the file"
            elif zlib.crc32(data[offset + _RECORD.size : end]) != crc:
                problem = "checksum mismatch"
        if problem is not None:
            if problem == "empty record":
                torn = not any(data[offset:])
            else:
                torn = problem != "checksum mismatch" or end == len(data) or not any(data[end:])
            if not (torn and tail_may_tear):
                raise CorruptLogError(f"{path}: {problem} at offset {offset}; the log is damaged")
            return records, offset
        records.append(_decode_record(path, offset, data[offset + _RECORD.size : end]))
        offset = end
    return records, offset


def _first_record(path: str, data: bytes) -> _Record | None:
    """A segment's first record, or None when it holds no complete one (a creation a crash cut short: only a
    torn or zero-filled header or first record). Any other damage raises CorruptLogError."""
    if len(data) < _HEADER.size or not any(data[: _HEADER.size]):
        return None
    _check_header(path, data, SEGMENT_MAGIC, "log segment")
    offset = _HEADER.size
    if offset + _RECORD.size <= len(data):
        length, crc = _RECORD.unpack_from(data, offset)
        end = offset + _RECORD.size + length
        if 0 < length <= MAX_RECORD_BYTES and end <= len(data) and zlib.crc32(data[offset + _RECORD.size : end]) == crc:
            return _decode_record(path, offset, data[offset + _RECORD.size : end])
    _scan(path, data, tail_may_tear=True)  # raises unless what follows the header is a torn tail
    return None


class _Replay:
    """The log as replay rebuilds it: the entries after (start_index, start_term), and the last hard state.
    `start_index` None: not known yet; `start_term` None: not known (format-1 segments do not say)."""

    def __init__(self, start_index=None, start_term=None, entries=None, hard_state=HardState()) -> None:
        self.start_index, self.start_term = start_index, start_term
        self.entries: list[Entry] = entries or []
        self.hard_state = hard_state

    @property
    def last_index(self) -> int:
        return self.start_index + len(self.entries)

    def put(self, entries: list[Entry], where: str) -> None:
        """What a record's entries mean: they replace everything at or after their first index."""
        first = entries[0].index
        if self.start_index is None:
            self.start_index, self.start_term = first - 1, None
        if not self.start_index < first <= self.last_index + 1:
            raise CorruptLogError(f"{where}: entries from index {first} do not follow the log, which holds "
                                  f"{self.start_index + 1}..{self.last_index}")
        del self.entries[first - self.start_index - 1 :]
        self.entries.extend(entries)

    def cut(self, snapshot: Snapshot, where: str) -> None:
        """Drop what the snapshot covers, exactly as StoredState.install_snapshot does (everything, when the log
        disagrees with the snapshot at its last index)."""
        index, term = snapshot.last_included_index, snapshot.last_included_term
        if self.start_index is None:
            self.start_index, self.start_term = index, term
            return
        if index < self.start_index:
            raise CorruptLogError(f"{where}: the log starts after index {self.start_index}, past the snapshot at "
                                  f"{index}: what lies between is lost")
        if index == self.start_index:
            agrees = self.start_term is None or self.start_term == term
        else:
            agrees = index <= self.last_index and self.entries[index - self.start_index - 1].term == term
        self.entries = self.entries[index - self.start_index :] if agrees else []
        self.start_index, self.start_term = index, term


class DiskStorage:
    """Durable storage for one node. Use `DiskStorage(data_dir)` then `load()` once, then `save()` per Ready."""

    def __init__(self, data_dir: str, fsync: bool = True, fdatasync=None, fs: FileSystem | None = None) -> None:
        """`fs` is the file system to work through (default: the real one, `OsFileSystem`). `fdatasync(handle,
        nbytes)` makes a batch of `nbytes` durable (default: the file system's fdatasync; with OsFileSystem the
        handle is a file descriptor); the server passes one that times it."""
        self.fs = fs if fs is not None else OsFileSystem()
        self.data_dir = os.path.abspath(data_dir)
        self._fdatasync = fdatasync or (lambda handle, nbytes: self.fs.fdatasync(handle))
        self.log_dir = os.path.join(self.data_dir, "log")
        self._fsync = fsync
        self._make_dir(self.log_dir)
        try:
            self._lock = self.fs.lock(os.path.join(self.data_dir, "LOCK"))
        except BlockingIOError:
            raise DataDirLocked(f"data dir {self.data_dir} is in use by another process (LOCK is held)") from None
        self._check_format()
        self.state = StoredState()
        self._segment = None  # the handle of the newest segment, open for appending
        self._segment_bytes = 0  # its size
        self._segment_seq = 0
        self.log_bytes = 0  # bytes in the segment since the last snapshot
        self._loaded = False

    def _make_dir(self, path: str) -> None:
        """Make `path` and any missing parent, each made durable in its parent folder."""
        parent = os.path.dirname(path)
        try:
            made = self.fs.mkdir(path)
        except FileNotFoundError:
            if parent == path:
                raise
            self._make_dir(parent)
            made = self.fs.mkdir(path)
        if made:
            self.fs.fsync_dir(parent)

    # ---- identity -------------------------------------------------------------------------------

    @property
    def _identity_path(self) -> str:
        return os.path.join(self.data_dir, "node.json")

    def _check_format(self) -> None:
        ident = self.read_identity()
        if ident is not None and ident.get("format") != FORMAT_VERSION:
            raise UnknownFormatError(
                f"{self._identity_path} is format {ident.get('format')!r}; this raftdzmq reads format "
                f"{FORMAT_VERSION}. Use the raftdzmq that wrote it."
            )

    def read_identity(self) -> dict | None:
        try:
            ident = json.loads(self.fs.read_file(self._identity_path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise StorageError(f"{self._identity_path} is not valid JSON: {e}") from None
        if not isinstance(ident, dict):
            raise StorageError(f"{self._identity_path} is not a JSON object")
        return ident

    def write_identity(self, node_id: str, raft_address: str, http_address: str) -> None:
        ident = {"format": FORMAT_VERSION, "node_id": node_id, "raft_address": raft_address,
                 "http_address": http_address}
        _write_atomically(self.fs, self._identity_path, json.dumps(ident, indent=1).encode() + b"\n")

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
        hs = self.state.hard_state
        if hs.commit_index > self.state.last_index:
            # The commit index may be saved ahead of a snapshot-only state; never beyond what we hold.
            self.state.hard_state = HardState(hs.current_term, hs.voted_for, self.state.last_index)
        return StoredState(self.state.hard_state, self.state.snapshot, list(self.state.entries))

    def _load(self) -> None:
        fs = self.fs
        segments = self._segments()
        self._segment_seq = segments[-1][0] if segments else 0
        # Newest first: the first segment that starts with a complete base record is the log.
        interrupted = []  # newer segments holding no complete record: creations a crash cut short
        base = None
        for pos in range(len(segments) - 1, -1, -1):
            path = segments[pos][1]
            data = fs.read_file(path)
            first = _first_record(path, data)
            if first is None:
                logger.warning("%s: holds no complete record (a crash cut its creation short): deleting it", path)
                interrupted.append(path)
                continue
            if first.kind == RECORD_BASE:
                base = (pos, path, data)
            break
        if base is None:
            self._load_format1(segments[: len(segments) - len(interrupted)], interrupted)
            return
        pos, path, data = base
        records, good_end = _scan(path, data, tail_may_tear=True)
        if good_end < len(data):
            logger.warning("%s: torn record at offset %d: cutting off %d bytes", path, good_end, len(data) - good_end)
        first = records[0]
        replay = _Replay(first.snapshot_index, first.snapshot_term, list(first.entries), first.hard_state)
        for r in records[1:]:
            where = f"{path} at offset {r.offset}"
            if r.kind != RECORD_BATCH:
                raise CorruptLogError(f"{where}: a base record after the first record of a segment")
            if r.entries:
                replay.put(r.entries, where)
            if r.hard_state is not None:
                replay.hard_state = r.hard_state
        snapshot = None
        if replay.start_index > 0:
            snapshot = self._read_snapshot_at(replay.start_index, replay.start_term, path)
        elif replay.start_term != 0:
            raise CorruptLogError(f"{path}: base record at index 0 with term {replay.start_term}")
        self.state = StoredState(replay.hard_state, snapshot, replay.entries)
        # Make durable what we rely on before anything goes: the segment (a killed process may have left its tail
        # in the page cache only), its name, and the snapshot's name.
        handle = fs.open_append(path)
        try:
            if good_end < len(data):
                fs.truncate(handle, good_end)
            if self._fsync:
                fs.fsync(handle)
                fs.fsync_dir(self.log_dir)
                fs.fsync_dir(self.data_dir)
        except BaseException:
            fs.close(handle)
            raise
        self._segment, self._segment_bytes, self.log_bytes = handle, good_end, good_end
        garbage = [p for _, p in segments[:pos]] + interrupted
        self._delete(garbage, keep_snapshot=replay.start_index if snapshot else None)

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
        fs = self.fs
        names = list(segments)
        names += [p for index, p in self._snapshots() if index != keep_snapshot]
        names += [os.path.join(self.data_dir, n) for n in fs.listdir(self.data_dir) if n.endswith(".tmp")]
        for path in names:
            fs.unlink(path)
            if crashpoints.enabled:
                crashpoints.hit("snapshot.between_unlinks")
        if names and self._fsync:
            fs.fsync_dir(self.log_dir)
            fs.fsync_dir(self.data_dir)

    def _load_format1(self, segments: list[tuple[int, str]], interrupted: list[str]) -> None:
        """A log without base records: a data dir from before them, or a new one. Format-1 segments were each
        started at a snapshot install with a batch record holding the entries after that snapshot, but their
        older segments were not always gone (issue 11), so: replay every segment with full truncation meaning;
        where a later segment starts after the newest snapshot (its first entries follow it, or it has none),
        cut the log by that snapshot first, as the install did; cut by it at the end if nothing did. Then write
        the state as a base segment, and only once that is durable delete the old files."""
        fs = self.fs
        snapshot = None
        for _, path in self._snapshots():
            try:
                snapshot = read_snapshot(path, fs)
                break
            except StorageError as e:
                logger.warning("skipping snapshot: %s", e)
        if snapshot is None and self._snapshots():
            raise CorruptLogError(f"no readable snapshot in {self.data_dir}")
        replay = _Replay()
        cut = False
        for n, (_, path) in enumerate(segments):
            data = fs.read_file(path)
            records, good_end = _scan(path, data, tail_may_tear=n == len(segments) - 1)
            if good_end < len(data):
                logger.warning("%s: torn record at offset %d: dropping %d bytes", path, good_end, len(data) - good_end)
            for k, r in enumerate(records):
                where = f"{path} at offset {r.offset}"
                if r.kind != RECORD_BATCH:
                    raise CorruptLogError(f"{where}: a base record after a segment that has none")
                if k == 0 and n > 0 and snapshot is not None and not cut and (
                        not r.entries or r.entries[0].index == snapshot.last_included_index + 1):
                    replay.cut(snapshot, where)
                    cut = True
                if r.entries:
                    replay.put(r.entries, where)
                if r.hard_state is not None:
                    replay.hard_state = r.hard_state
        if snapshot is not None and not cut:
            replay.cut(snapshot, f"{self.log_dir} (the end)")
        if replay.start_index is None:
            replay.start_index, replay.start_term = 0, 0
        if snapshot is None and replay.start_index != 0:
            raise CorruptLogError(f"{self.log_dir}: the log starts after index {replay.start_index} and there is "
                                  "no snapshot")
        self.state = StoredState(replay.hard_state, snapshot, replay.entries)
        if segments:
            logger.warning("%s: log segments without a base record (written before format 1 had them): "
                           "rewriting the log after the snapshot as one base segment", self.log_dir)
        if self._fsync:
            fs.fsync_dir(self.data_dir)  # the snapshot's name, before a base record names it
        index, term = (snapshot.last_included_index, snapshot.last_included_term) if snapshot else (0, 0)
        self._segment, self._segment_bytes = self._create_segment(
            encode_base_record(index, term, self.state.hard_state, self.state.entries))
        self.log_bytes = self._segment_bytes
        self._delete([p for _, p in segments] + interrupted, keep_snapshot=index if snapshot else None)

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
        while segments and _first_record(segments[-1][1], fs.read_file(segments[-1][1])) is None:
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
            fs.fsync_dir(self.log_dir)
            fs.fsync_dir(self.data_dir)
            self._segment_bytes = self.log_bytes = size
        else:
            index, term = (snapshot.last_included_index, snapshot.last_included_term) if snapshot else (0, 0)
            fs.fsync_dir(self.data_dir)
            self._segment, self._segment_bytes = self._create_segment(
                encode_base_record(index, term, self.state.hard_state, self.state.entries))

    # ---- writing --------------------------------------------------------------------------------

    def _create_segment(self, base_record: bytes) -> tuple[object, int]:
        """A new newest segment holding `base_record`, durable (file and folder) when fsync is on; returns its
        handle, open for appending, and its size. Out of room: DiskFull, and the file is gone."""
        fs = self.fs
        seq = self._segment_seq + 1
        path = os.path.join(self.log_dir, f"{seq:010d}.seg")
        data = _HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION) + base_record
        try:
            f = fs.create(path)
            try:
                fs.append(f, data)
                if self._fsync:
                    fs.fsync(f)
                    fs.fsync_dir(self.log_dir)
            except BaseException:
                fs.close(f)
                raise
        except OSError as e:
            with contextlib.suppress(OSError):
                fs.unlink(path)
            if e.errno in _NO_ROOM:
                raise DiskFull(f"no room on the disk for a new log segment: {e.strerror}") from None
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
        or the kernel, takes it to the disk. Raises DiskFull (nothing changed: try the same save again later),
        or OSError when the disk fails: the caller must stop, not acknowledge (fsyncgate)."""
        if snapshot is not None and snapshot.last_included_index > self.state.base_index:
            self._install_snapshot(snapshot, hard_state, entries)
            return
        if entries:
            assert self.state.base_index < entries[0].index <= self.state.last_index + 1
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
        """A snapshot this node took of its own state machine: write it, then drop the log it covers."""
        if snapshot.last_included_index > self.state.base_index:
            self._install_snapshot(snapshot, None, [])

    def _install_snapshot(self, snapshot: Snapshot, hard_state: HardState | None, entries: list[Entry]) -> None:
        """The transaction of the module's rules: the new state is computed first, and becomes `self.state` only
        once the segment that holds it is durable."""
        state = StoredState(self.state.hard_state, self.state.snapshot, list(self.state.entries))
        state.install_snapshot(snapshot)
        if entries:
            assert state.base_index < entries[0].index <= state.last_index + 1
            state.put_entries(entries)
        if hard_state is not None:
            state.hard_state = hard_state
        index = snapshot.last_included_index
        _write_atomically(self.fs, self._snapshot_path(index), encode_snapshot(snapshot),
                          crash_point="snapshot.after_write")
        if crashpoints.enabled:
            crashpoints.hit("snapshot.after_rename")
        old_segments = self._segments()
        handle, size = self._create_segment(
            encode_base_record(index, snapshot.last_included_term, state.hard_state, state.entries))
        if crashpoints.enabled:
            crashpoints.hit("snapshot.after_segment")
        # Committed: the new segment is durable, and it makes everything older garbage.
        old, self._segment = self._segment, handle
        self._segment_bytes = self.log_bytes = size
        self.state = state
        if old is not None:
            self.fs.close(old)
        self._delete([p for seq, p in old_segments if seq < self._segment_seq], keep_snapshot=index)

    def close(self) -> None:
        if self._segment is not None:
            if self._fsync:
                self.fs.fsync(self._segment)
            self.fs.close(self._segment)
            self._segment = None
        if self._lock is not None:
            self.fs.unlock(self._lock)
            self._lock = None


def encode_snapshot(s: Snapshot) -> bytes:
    meta = cbor2.dumps(codec.encode_snapshot_meta(s))
    body = _HEADER.pack(SNAPSHOT_MAGIC, FORMAT_VERSION) + struct.pack(">I", len(meta)) + meta + s.data
    return body + struct.pack(">I", zlib.crc32(body))


def read_snapshot(path: str, fs: FileSystem | None = None) -> Snapshot:
    data = (fs or OsFileSystem()).read_file(path)
    if len(data) < _HEADER.size + 8:
        raise CorruptLogError(f"{path}: too short to be a snapshot")
    _check_header(path, data, SNAPSHOT_MAGIC, "snapshot")
    (crc,) = struct.unpack_from(">I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise CorruptLogError(f"{path}: snapshot checksum mismatch")
    (meta_len,) = struct.unpack_from(">I", data, _HEADER.size)
    start = _HEADER.size + 4
    try:
        meta = cbor2.loads(data[start : start + meta_len])
        return codec.decode_snapshot_meta(meta, data[start + meta_len : -4])
    except Exception as e:
        raise CorruptLogError(f"{path}: bad snapshot metadata: {e}") from None
