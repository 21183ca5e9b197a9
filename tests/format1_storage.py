# ruff: noqa: E402
"""FROZEN: raftlib/storage.py as of commit d2cfdfd, the last code that wrote format-1 data dirs without base records.
Only the crash explorer and the storage tests import it, to make the data dirs that code left (by a clean run, or
killed at any file operation) and check that today's load upgrades each to the state that code had. Do not edit
(only the imports were changed, to load it from tests/); the module docstring of the original follows.
"""

from __future__ import annotations

_ORIGINAL_DOCSTRING = """DiskStorage: a node's durable state in its data dir: log segments, snapshots, identity, and a lock.

Rules: a Ready's snapshot, entries and hard state become durable with one fsync (`save`); nothing is rewritten in
place; a torn record at the end of the newest segment (a crash mid-append) is cut off with a warning, and any
other damage stops the node with the file and offset named. The data dir holds:

    LOCK                   held with flock(LOCK_EX) while a process uses the dir
    node.json              {"format": 1, "node_id": ..., "raft_address": ..., "http_address": ...}
    log/NNNNNNNNNN.seg     log segments, replayed in order (see FORMAT.md at the project root)
    snapshot-IIII.snap     the newest snapshot (IIII = its last included index, 20 digits)
"""


import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import zlib

import cbor2

from raftlib import codec
from raftlib.memory_storage import StoredState
from raftlib.messages import Entry, HardState, Snapshot

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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, data: bytes) -> None:
    """Write to a temporary file, fsync, rename over `path`, fsync the folder. Out of room: DiskFull, no trace."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno in _NO_ROOM:
            raise DiskFull(f"no room on the disk for {path}: {e.strerror}") from None
        raise
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


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

    def __init__(self, data_dir: str, fsync: bool = True, fdatasync=None) -> None:
        """`fdatasync(fd, nbytes)` makes a batch of `nbytes` durable (default: os.fdatasync); the gevent server
        passes one that runs big batches in a worker thread so the hub keeps serving while the disk works."""
        self.data_dir = os.path.abspath(data_dir)
        self._fdatasync = fdatasync or (lambda fd, nbytes: os.fdatasync(fd))
        self.log_dir = os.path.join(self.data_dir, "log")
        self._fsync = fsync
        os.makedirs(self.log_dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.data_dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DataDirLocked(f"data dir {self.data_dir} is in use by another process (LOCK is held)") from None
        self._check_format()
        self.state = StoredState()
        self._segment = None  # the open newest segment
        self._segment_seq = 0
        self.log_bytes = 0  # bytes in segments since the last snapshot
        self._loaded = False

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
            with open(self._identity_path, "rb") as f:
                ident = json.loads(f.read())
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
        _write_atomically(self._identity_path, json.dumps(ident, indent=1).encode() + b"\n")

    # ---- recovery -------------------------------------------------------------------------------

    def _segments(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir(self.log_dir):
            if name.endswith(".seg") and name[:-4].isdigit():
                out.append((int(name[:-4]), os.path.join(self.log_dir, name)))
        return sorted(out)

    def _snapshots(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir(self.data_dir):
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
                snapshot = read_snapshot(path)
                break
            except StorageError as e:
                logger.warning("skipping snapshot: %s", e)
        if snapshot is None and self._snapshots():
            raise CorruptLogError(f"no readable snapshot in {self.data_dir}")
        self.state = StoredState(HardState(), snapshot, [])
        segments = self._segments()
        for n, (seq, path) in enumerate(segments):
            self._replay_segment(path, is_last=n == len(segments) - 1)
            self._segment_seq = seq
        hs = self.state.hard_state
        last = self.state.last_index
        if hs.commit_index > last:
            # The commit index may be saved ahead of a snapshot-only state; never beyond what we hold.
            self.state.hard_state = HardState(hs.current_term, hs.voted_for, last)
        if segments:
            self._segment = open(segments[-1][1], "ab", buffering=0)
        else:
            self._open_new_segment(self.state.hard_state, [])
        for _, path in self._snapshots()[1:]:
            os.unlink(path)  # older snapshots are only kept until a newer one is complete
        return StoredState(self.state.hard_state, self.state.snapshot, list(self.state.entries))

    def _replay_segment(self, path: str, is_last: bool) -> None:
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < _HEADER.size:
            if is_last:
                logger.warning("%s: torn segment header (%d bytes), starting it again", path, len(data))
                with open(path, "wb") as f:
                    f.write(_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION))
                return
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
                if length > MAX_RECORD_BYTES or end > len(data):
                    problem = f"record length {length} runs past the end of the file"
                elif zlib.crc32(data[offset + _RECORD.size : end]) != crc:
                    problem = "checksum mismatch"
            if problem is not None:
                torn = is_last and (
                    problem != "checksum mismatch" or end == len(data) or not any(data[end:])
                )
                if not torn:
                    raise CorruptLogError(f"{path}: {problem} at offset {offset}; the log is damaged")
                logger.warning("%s: torn record at offset %d (%s): cut off %d bytes", path, offset, problem,
                               len(data) - offset)
                with open(path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                return
            self._apply_record(path, offset, data[offset + _RECORD.size : end])
            self.log_bytes += end - offset
            offset = end

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
        try:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._segment_seq -= 1
            if e.errno in _NO_ROOM:
                raise DiskFull(f"no room on the disk for a new log segment: {e.strerror}") from None
            raise
        if self._fsync:
            _fsync_dir(self.log_dir)
        if self._segment is not None:
            self._segment.close()
        self._segment = open(path, "ab", buffering=0)
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
            self._fdatasync(self._segment.fileno(), len(record))
        self.log_bytes += len(record)
        if entries:
            self.state.put_entries(entries)
        if hard_state is not None:
            self.state.hard_state = hard_state

    def _append(self, record: bytes) -> None:
        """Write one record at the end of the segment, unbuffered. When the disk is full, cut off whatever part of
        it reached the file (so no torn record is left before later ones) and raise DiskFull."""
        fd = self._segment.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            if e.errno not in _NO_ROOM:
                raise
            os.ftruncate(fd, start)
            raise DiskFull(f"no room on the disk for the log ({len(record)} bytes): {e.strerror}") from None

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """A snapshot this node took of its own state machine: write it, then drop the log it covers."""
        self._install_snapshot(snapshot)

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.last_included_index <= self.state.base_index:
            return
        path = os.path.join(self.data_dir, f"snapshot-{snapshot.last_included_index:020d}.snap")
        _write_atomically(path, encode_snapshot(snapshot))
        old_segments = self._segments()
        self.state.install_snapshot(snapshot)
        # A new segment starts with what the snapshot does not cover; only then do older files go.
        self._open_new_segment(self.state.hard_state, self.state.entries)
        for seq, seg in old_segments:
            if seq < self._segment_seq:
                os.unlink(seg)
        for index, snap_path in self._snapshots():
            if index < snapshot.last_included_index:
                os.unlink(snap_path)

    def close(self) -> None:
        if self._segment is not None:
            if self._fsync:
                os.fsync(self._segment.fileno())
            self._segment.close()
            self._segment = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def encode_snapshot(s: Snapshot) -> bytes:
    meta = cbor2.dumps(codec.encode_snapshot_meta(s))
    body = _HEADER.pack(SNAPSHOT_MAGIC, FORMAT_VERSION) + struct.pack(">I", len(meta)) + meta + s.data
    return body + struct.pack(">I", zlib.crc32(body))


def read_snapshot(path: str) -> Snapshot:
    with open(path, "rb") as f:
        data = f.read()
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
