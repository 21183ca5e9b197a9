"""DiskStorage: a node's durable state in its data dir: log segments, snapshots, identity, and a lock.

Rules: a Ready's snapshot, entries and hard state become durable with one fsync (`save`); nothing is rewritten in
place; a torn record at the end of the newest segment (a crash mid-append) is cut off with a warning, and any
other damage stops the node with the file and offset named. The data dir holds:

    LOCK                   held with flock(LOCK_EX) while a process uses the dir
    node.json              {"format": 1, "node_id": ..., "raft_address": ..., "http_address": ...}
    log/NNNNNNNNNN.seg     log segments, replayed in order (see FORMAT.md at the project root)
    snapshot-IIII.snap     the newest snapshot (IIII = its last included index, 20 digits)
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

from . import codec
from .fs import FileSystem, OsFileSystem
from .memory_storage import StoredState
from .messages import Entry, HardState, Snapshot

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"RDZMQLOG"
SNAPSHOT_MAGIC = b"RDZMQSNP"
_HEADER = struct.Struct(">8sI")  # magic, format version
_RECORD = struct.Struct(">II")  # payload length, crc32(payload)
MAX_RECORD_BYTES = 256 << 20
RECORD_BATCH = 1  # payload: 1 type byte, then CBOR [hard_state or null, [entry, ...]]

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
    tried again once there is room, and the data dir stays as it was before."""


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _write_atomically(fs: FileSystem, path: str, data: bytes) -> None:
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
    fs.rename(tmp, path)
    fs.fsync_dir(os.path.dirname(path))


def _check_header(path: str, data: bytes, magic: bytes, what: str) -> None:
    found, version = _HEADER.unpack_from(data, 0)
    if found != magic:
        raise CorruptLogError(f"{path}: not a raftdzmq {what} (bad magic at offset 0)")
    if version != FORMAT_VERSION:
        raise UnknownFormatError(f"{path}: {what} format {version}; this raftdzmq reads format {FORMAT_VERSION}")


def encode_record(hard_state: HardState | None, entries: list[Entry]) -> bytes:
    hs = None if hard_state is None else [hard_state.current_term, hard_state.voted_for, hard_state.commit_index]
    payload = bytes([RECORD_BATCH]) + cbor2.dumps([hs, [codec.entry_to_wire(e) for e in entries]])
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


class DiskStorage:
    """Durable storage for one node. Use `DiskStorage(data_dir)` then `load()` once, then `save()` per Ready."""

    def __init__(self, data_dir: str, fsync: bool = True, fdatasync=None, fs: FileSystem | None = None) -> None:
        """`fs` is the file system to work through (default: the real one, `OsFileSystem`). `fdatasync(handle,
        nbytes)` makes a batch of `nbytes` durable (default: the file system's fdatasync); the server passes one
        that times it."""
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
        self._segment = None  # the handle of the open newest segment
        self._segment_bytes = 0  # its size
        self._segment_seq = 0
        self.log_bytes = 0  # bytes in segments since the last snapshot
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

    def load(self) -> StoredState:
        """Recover: the newest good snapshot, then every record of every segment. Raises StorageError (and
        releases the data dir)."""
        assert not self._loaded
        self._loaded = True
        try:
            return self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> StoredState:
        snapshot = None
        for _, path in self._snapshots():
            try:
                snapshot = read_snapshot(path, self.fs)
                break
            except StorageError as e:
                logger.warning("skipping snapshot: %s", e)
        if snapshot is None and self._snapshots():
            raise CorruptLogError(f"no readable snapshot in {self.data_dir}")
        self.state = StoredState(HardState(), snapshot, [])
        segments = self._segments()
        size = 0
        for n, (seq, path) in enumerate(segments):
            size = self._replay_segment(path, is_last=n == len(segments) - 1)
            self._segment_seq = seq
        hs = self.state.hard_state
        last = self.state.last_index
        if hs.commit_index > last:
            # The commit index may be saved ahead of a snapshot-only state; never beyond what we hold.
            self.state.hard_state = HardState(hs.current_term, hs.voted_for, last)
        if segments:
            self._segment = self.fs.open_append(segments[-1][1])
            self._segment_bytes = size
        else:
            self._open_new_segment(self.state.hard_state, [])
        for _, path in self._snapshots()[1:]:
            self.fs.unlink(path)  # older snapshots are only kept until a newer one is complete
        return StoredState(self.state.hard_state, self.state.snapshot, list(self.state.entries))

    def _replay_segment(self, path: str, is_last: bool) -> int:
        """Apply the segment's records; return its size after any torn tail is cut off."""
        data = self.fs.read_file(path)
        if len(data) < _HEADER.size:
            if is_last:
                logger.warning("%s: torn segment header (%d bytes), starting it again", path, len(data))
                f = self.fs.create(path)
                self.fs.append(f, _HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION))
                self.fs.close(f)
                return _HEADER.size
            raise CorruptLogError(f"{path}: truncated segment header")
        _check_header(path, data, SEGMENT_MAGIC, "log segment")
        offset = _HEADER.size
        self.log_bytes += offset
        while offset < len(data):
            problem = None
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
                    torn = is_last and not any(data[offset:])
                else:
                    torn = is_last and (problem != "checksum mismatch" or end == len(data) or not any(data[end:]))
                if not torn:
                    raise CorruptLogError(f"{path}: {problem} at offset {offset}; the log is damaged")
                logger.warning("%s: torn record at offset %d (%s): cut off %d bytes", path, offset, problem,
                               len(data) - offset)
                f = self.fs.open_append(path)
                self.fs.truncate(f, offset)
                self.fs.fsync(f)
                self.fs.close(f)
                return offset
            self._apply_record(path, offset, data[offset + _RECORD.size : end])
            self.log_bytes += end - offset
            offset = end
        return offset

    def _apply_record(self, path: str, offset: int, payload: bytes) -> None:
        try:
            if payload[:1] != bytes([RECORD_BATCH]):
                raise ValueError(f"unknown record type {payload[:1]!r}")
            hs, entries = cbor2.loads(payload[1:])
            entries = [codec.entry_from_wire(e) for e in entries]
            hard_state = None if hs is None else codec.decode_hard_state(cbor2.dumps(hs))
        except Exception as e:
            raise CorruptLogError(f"{path}: undecodable record at offset {offset}: {e}") from None
        entries = [e for e in entries if e.index > self.state.base_index]
        if entries:
            if entries[0].index > self.state.last_index + 1:
                raise CorruptLogError(f"{path}: record at offset {offset} leaves a gap before {entries[0].index}")
            self.state.put_entries(entries)
        if hard_state is not None:
            self.state.hard_state = hard_state

    # ---- writing --------------------------------------------------------------------------------

    def _open_new_segment(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        self._segment_seq += 1
        path = os.path.join(self.log_dir, f"{self._segment_seq:010d}.seg")
        data = _HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION)
        if hard_state is not None or entries:
            data += encode_record(hard_state, entries)
        fs = self.fs
        try:
            f = fs.create(path)
            try:
                fs.append(f, data)
                if self._fsync:
                    fs.fsync(f)
            except BaseException:
                fs.close(f)
                raise
        except OSError as e:
            with contextlib.suppress(OSError):
                fs.unlink(path)
            self._segment_seq -= 1
            if e.errno in _NO_ROOM:
                raise DiskFull(f"no room on the disk for a new log segment: {e.strerror}") from None
            raise
        if self._fsync:
            fs.fsync_dir(self.log_dir)
        if self._segment is not None:
            fs.close(self._segment)
        self._segment = f
        self._segment_bytes = len(data)
        self.log_bytes = len(data)

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
        sync: bool = True,
    ) -> None:
        """Make a Ready durable: snapshot (if any) first, then entries and hard state in one record and one
        fsync. With `sync` False (a Ready that only moves the commit index) the record is written but not
        fsynced: the next synced record, or the kernel, takes it to the disk. Raises OSError when the disk
        fails: the caller must stop, not acknowledge (fsyncgate)."""
        if snapshot is not None:
            self._install_snapshot(snapshot)
        if entries:
            assert self.state.base_index < entries[0].index <= self.state.last_index + 1
        if hard_state is None and not entries:
            return
        record = encode_record(hard_state, entries)
        self._append(record)
        if self._fsync and sync:
            self._fdatasync(self._segment, len(record))
        self.log_bytes += len(record)
        if entries:
            self.state.put_entries(entries)
        if hard_state is not None:
            self.state.hard_state = hard_state

    def _append(self, record: bytes) -> None:
        """Write one record at the end of the segment, unbuffered. When the disk is full, cut off whatever part of
        it reached the file (so no torn record is left before later ones) and raise DiskFull."""
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
        self._install_snapshot(snapshot)

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.last_included_index <= self.state.base_index:
            return
        path = os.path.join(self.data_dir, f"snapshot-{snapshot.last_included_index:020d}.snap")
        _write_atomically(self.fs, path, encode_snapshot(snapshot))
        old_segments = self._segments()
        self.state.install_snapshot(snapshot)
        # A new segment starts with what the snapshot does not cover; only then do older files go.
        self._open_new_segment(self.state.hard_state, self.state.entries)
        for seq, seg in old_segments:
            if seq < self._segment_seq:
                self.fs.unlink(seg)
        for index, snap_path in self._snapshots():
            if index < snapshot.last_included_index:
                self.fs.unlink(snap_path)

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
