"""Snapshot files: their format, a file written a piece at a time (and a backup's: export_snapshot), one read
back (its checksum checked, then held open: SnapshotFile), and a leader's snapshot received into one as its
chunks come (SnapshotReceiver). The install transaction that makes a file the node's snapshot is
raftlib.storage.DiskStorage's.

Rules:
- A snapshot file is written and checked a piece (SNAPSHOT_IO_BYTES) at a time, from the snapshot's data (bytes
  or a source): never the whole state in memory twice.
- A snapshot's data is read through a handle held open (SnapshotFile), so that a rename or an unlink of its file
  does not take it away while a leader streams InstallSnapshot from it. A read of a held file that fails raises
  SnapshotUnreadable (the core abandons that transfer).
- A leader's snapshot is received into its file (SnapshotReceiver, for DiskStorage.receive_snapshot) under a
  `*.received.tmp` name, each chunk appended and fdatasynced when it comes (so that the install's fsync has one
  chunk left to flush, not the whole state). A full disk or no descriptor while receiving holds the chunk back
  (the leader sends it again); other errors are fatal.

A snapshot file is `RDZMQSNP`, the u32 version, a u32 length and CBOR `[index, term, membership]`, the state
machine's bytes, and a u32 crc32 of all of that (docs/DATA-DIR.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import cbor2

from . import codec, crashpoints
from .fs import NO_DESCRIPTOR, FileSystem, OsFileSystem
from .logformat import _HEADER, FORMAT_VERSION, _check_header
from .messages import Snapshot, SnapshotUnreadable, snapshot_chunk
from .storage_errors import _NO_ROOM, CorruptLogError, DiskFull, OutOfDescriptors

if TYPE_CHECKING:  # SnapshotReceiver works for a DiskStorage, which imports this module
    from .storage import DiskStorage

SNAPSHOT_MAGIC = b"RDZMQSNP"

# The logger of raftlib.storage, where this code was: its warnings keep their logger's name (and its level,
# which tests and operators set).
logger = logging.getLogger("raftlib.storage")


SNAPSHOT_IO_BYTES = 1 << 20  # a snapshot file is written and checked in pieces of this size


def _snapshot_head(s: Snapshot) -> bytes:
    meta = cbor2.dumps(codec.encode_snapshot_meta(s))
    return _HEADER.pack(SNAPSHOT_MAGIC, FORMAT_VERSION) + struct.pack(">I", len(meta)) + meta


def _snapshot_file_pieces(s: Snapshot) -> Iterator[bytes]:
    """A snapshot file's bytes (`encode_snapshot`'s) in pieces of about SNAPSHOT_IO_BYTES read from the snapshot's
    data (bytes or a source): never the whole state in memory twice. A small snapshot is one piece."""
    pending = bytearray(_snapshot_head(s))
    crc = 0
    size = len(s.data)
    for offset in range(0, size, SNAPSHOT_IO_BYTES):
        pending += snapshot_chunk(s.data, offset, SNAPSHOT_IO_BYTES)
        if len(pending) >= SNAPSHOT_IO_BYTES:
            crc = zlib.crc32(pending, crc)
            yield bytes(pending)
            pending = bytearray()
    crc = zlib.crc32(pending, crc)
    yield bytes(pending) + struct.pack(">I", crc)


# A snapshot file's writers fdatasync each piece as they go (a SNAPSHOT_IO_BYTES piece; the head), so that its
# dirty pages never pile up: on ext4 (data=ordered) an fsync of any file commits the journal, which first writes
# out the data of every file whose blocks that transaction allocated, so the loop's fdatasync of the log, just
# after a snapshot's 76 MB were written, waited for them: one 20-60 ms hold of the loop a snapshot at 1,000,000
# keys, "idle or blocked" in the hub-lag probe, in both snapshot modes. Synced a piece at a time (in the
# threadpool, or a forked child), the log's fsync waits for at most a piece. `python bench/fork_pause.py --node
# --keys 1000000 --mode stepped --seconds 20`, A B A B (load 0.4-2.0): hub lags over 20 ms 4 and 5 without, 0 and 0
# with; the longest 58 and 58 ms against 21 and 22 (docs/BENCHMARKS.md). Safety is the final fsync's, as before: a
# file is committed only after it returned (the trailer's piece included), never on the pieces' syncs. Writers
# that run in the loop (an in-process snapshot, an install of an in-memory snapshot) pay the pieces' syncs for
# nothing (64 MiB: 92-139 ms against 80-84, review of eef4bc2 L2): left, both are rare paths.


def _write_snapshot_file(fs: FileSystem, f, s: Snapshot) -> None:
    """A snapshot file's bytes, appended and fdatasynced a piece at a time (`_snapshot_file_pieces`; why: the
    comment above)."""
    for piece in _snapshot_file_pieces(s):
        fs.append(f, piece)
        fs.fdatasync(f)


class SnapshotFileWriter:
    """A snapshot file of this node's own written a piece at a time as the state machine makes its bytes (the
    runtime's stepped snapshots, issue 13): the head (`_snapshot_head`), each piece as `append`ed, and the crc32
    trailer at `finish`: the file `_write_snapshot_file` writes of the same bytes. `sync` fsyncs it (the runtime
    runs it in gevent's threadpool: a file no reader uses yet); `close` closes it, whatever happened. Raises
    DiskFull (no room), OutOfDescriptors (no descriptor for the create) or OSError (any other error, EIO
    included) as raftlib.storage's `_write_file` does. None of them is fatal here, as none is for a forked
    child's file: the file is only ever committed after a `sync` that returned, so whoever began it unlinks a file
    not finished (DiskStorage.abort_snapshot) and takes a new snapshot into a new file later, never this one again
    (fsyncgate). The runtime counts a file that failed once created (DiskFull on an append included) in
    `snapshot_children_failed`, as a forked child's, and a create refused (DiskFull, OutOfDescriptors) as a
    snapshot refused for now (`_snapshot_refused`); both are tried again snapshot_retry_seconds later."""

    def __init__(self, fs: FileSystem, path: str, meta: Snapshot) -> None:
        self.fs, self.path, self.handle, self.crc = fs, path, None, 0
        try:
            self.handle = fs.create(path)
        except OSError as e:
            raise _disk_refusal(e, path) from None
        head = _snapshot_head(meta)
        try:  # not synced here (this runs in the loop): the first `append`'s fdatasync covers it
            self._write(head)
        except BaseException:
            self.close()  # its caller unlinks the file (abort_snapshot); the descriptor is this object's
            raise
        self.crc = zlib.crc32(head)

    def append(self, data: bytes) -> None:
        """Write `data` and fdatasync it (why: the comment above `_write_snapshot_file`)."""
        self._write(data)
        self.crc = zlib.crc32(data, self.crc)
        try:
            self.fs.fdatasync(self.handle)
        except OSError as e:
            raise _disk_refusal(e, self.path) from None

    def finish(self) -> None:
        self._write(struct.pack(">I", self.crc))

    def sync(self) -> None:
        try:
            self.fs.fsync(self.handle)
        except OSError as e:
            raise _disk_refusal(e, self.path) from None

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.fs.close(self.handle)
            self.handle = None

    def _write(self, data: bytes) -> None:
        try:
            self.fs.append(self.handle, data)
        except OSError as e:
            raise _disk_refusal(e, self.path) from None


def _disk_refusal(e: OSError, path: str) -> Exception:
    """What an OSError writing the snapshot file `path` is to its writer: DiskFull, OutOfDescriptors, or itself."""
    if e.errno in NO_DESCRIPTOR:
        return OutOfDescriptors(f"no file descriptor free to write {path}: {e.strerror}")
    if e.errno in _NO_ROOM:
        return DiskFull(f"no room on the disk for {path}: {e.strerror}")
    return e


def export_snapshot(s: Snapshot, path: str) -> str:
    """A backup (GET /snapshot): the snapshot file of `s` written to a new file at `path` (created, never
    overwritten: FileExistsError; readable by the owner only) through the real file system, not fsynced (it is
    streamed, then deleted). Returns the SHA-256 of its bytes, in hex."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for piece in _snapshot_file_pieces(s):
            digest.update(piece)
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return digest.hexdigest()


class SnapshotFile:
    """A snapshot file's state-machine bytes (a raftlib.messages.SnapshotSource), read through a handle held open:
    a leader sends a snapshot from it in chunks, and a rename or an unlink of the file (a newer snapshot made
    this one garbage while a transfer of it is under way) does not take them away. Always a handle: a snapshot
    that could not be held open is not committed (`_commit_install`), since reopening by path at each read fails
    once the file is unlinked or no descriptor is free. A read that fails (an I/O error) raises
    SnapshotUnreadable, which the core catches (it abandons that transfer). The handle is closed with `close`,
    or when the object is collected. Equal to any data that reads the same (tests compare snapshots)."""

    __slots__ = ("fs", "handle", "start", "size", "path", "__weakref__")

    def __init__(self, fs: FileSystem, handle, start: int, size: int, path: str) -> None:
        self.fs, self.handle, self.start, self.size, self.path = fs, handle, start, size, path

    @classmethod
    def at(cls, fs: FileSystem, path: str, handle) -> SnapshotFile:
        """The data of a snapshot file written by this storage (its checksum not read: O(1)), through `handle`
        (held open, then owned by the SnapshotFile; still the caller's when this raises)."""
        source = cls(fs, handle, 0, 0, path)
        try:
            source._locate(handle)
        except BaseException:
            source.handle = None  # its collection must not close the caller's descriptor
            raise
        return source

    def _locate(self, handle) -> None:
        head = self.fs.pread(handle, 0, _HEADER.size + 4)
        _check_header(self.path, head, SNAPSHOT_MAGIC, "snapshot")
        self.start = _HEADER.size + 4 + struct.unpack_from(">I", head, _HEADER.size)[0]
        self.size = self.fs.file_size(handle) - self.start - 4

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        if self.handle is None:
            raise SnapshotUnreadable(f"{self.path}: closed")
        try:
            data = self.fs.pread(self.handle, self.start + offset, length)
        except OSError as e:
            raise SnapshotUnreadable(f"{self.path}: {e}") from None
        if len(data) != length:
            raise SnapshotUnreadable(f"{self.path}: snapshot file shorter than it was "
                                     f"({self.start + offset + len(data)} bytes)")
        return data

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            with contextlib.suppress(Exception):
                self.fs.close(handle)

    def __del__(self) -> None:
        try:
            self.close()
        except BaseException:  # noqa: S110 - a test's file system that "crashed"; nothing to do at collection
            pass

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (bytes, bytearray)) or hasattr(other, "read"):
            return len(other) == len(self) and snapshot_chunk(other, 0, len(self)) == self.read(0, len(self))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SnapshotFile({self.path!r})"


def _open_snapshot_file(fs: FileSystem, path: str, name: str | None = None) -> SnapshotFile:
    """The data of the snapshot file at `path` as a SnapshotFile (`name`: the path it goes by, for messages),
    its checksum checked, read a piece at a time. Raises CorruptLogError, UnknownFormatError, or OSError."""
    name = name or path
    handle = fs.open_read(path)
    try:
        head = fs.pread(handle, 0, _HEADER.size + 4)
        if len(head) < _HEADER.size + 4:
            raise CorruptLogError(f"{name}: too short to be a snapshot")
        _check_header(name, head, SNAPSHOT_MAGIC, "snapshot")
        (meta_len,) = struct.unpack_from(">I", head, _HEADER.size)
        crc, offset, tail = 0, 0, b""
        while True:  # the checksum of everything but its last 4 bytes, which hold it
            piece = fs.pread(handle, offset, SNAPSHOT_IO_BYTES)
            offset += len(piece)
            data = tail + piece
            if len(piece) < SNAPSHOT_IO_BYTES:
                break
            crc = zlib.crc32(data[:-4], crc)
            tail = data[-4:]
        if offset < _HEADER.size + 8 + meta_len:
            raise CorruptLogError(f"{name}: too short to be a snapshot")
        crc = zlib.crc32(data[:-4], crc)
        if struct.unpack(">I", data[-4:])[0] != crc:
            raise CorruptLogError(f"{name}: snapshot checksum mismatch")
        start = _HEADER.size + 4 + meta_len
        return SnapshotFile(fs, handle, start, offset - 4 - start, name)
    except BaseException:
        fs.close(handle)
        raise


class ReceivedSnapshotFile(SnapshotFile):
    """The data of a leader's snapshot received into a file (SnapshotReceiver.finish): a SnapshotFile that the
    install renames into place instead of copying (`received_tmp`: its name until then)."""

    __slots__ = ("received_tmp",)


class SnapshotReceiver:
    """A raftlib.messages.SnapshotSink writing a leader's snapshot's chunks to its file (the module's rules): the
    snapshot file's head, then the data as it comes, then the checksum at `finish`. Opens its two handles (one
    to append, one to read the data back once finished) at its first write; a write that meets a full disk or
    no descriptor is cut back and held back (length unchanged)."""

    def __init__(self, storage: DiskStorage, meta: Snapshot) -> None:
        self.storage = storage
        self.meta = meta
        self.path = storage._snapshot_path(meta.last_included_index) + ".received.tmp"
        self.size = 0  # data bytes held
        self._head_bytes = 0
        self._crc = 0
        self._writer = None
        self._reader = None
        self._done = False
        self._source: ReceivedSnapshotFile | None = None  # what `finish` returned: closed by `discard`
        storage._writing.add(self.path)  # no install's garbage sweep deletes it

    def __len__(self) -> int:
        return self.size

    def _open(self) -> bool:
        fs = self.storage.fs
        try:
            self._writer = fs.create(self.path)
            self._reader = fs.open_read(self.path)
            head = _snapshot_head(self.meta)
            fs.append(self._writer, head)
        except OSError as e:
            self._close()
            if e.errno not in NO_DESCRIPTOR + _NO_ROOM:
                raise
            logger.warning("could not begin receiving the snapshot at index %d (%s): the leader sends it again",
                           self.meta.last_included_index, e.strerror)
            return False
        self._head_bytes = len(head)
        self._crc = zlib.crc32(head)
        return True

    def write(self, data: bytes) -> None:
        assert not self._done
        if self._writer is None and not self._open():
            return
        fs = self.storage.fs
        end = self._head_bytes + self.size
        try:
            fs.append(self._writer, data)
            fs.fdatasync(self._writer)  # a chunk at a time, so that the install has little left to flush
        except OSError as e:
            if e.errno not in _NO_ROOM:
                raise
            fs.truncate(self._writer, end)
            logger.warning("no room to receive the snapshot at index %d (%s): the leader sends the chunk again",
                           self.meta.last_included_index, e.strerror)
            return
        if crashpoints.enabled:
            crashpoints.hit("snapshot.after_chunk")
        self._crc = zlib.crc32(data, self._crc)
        self.size += len(data)

    def finish(self) -> ReceivedSnapshotFile | None:
        """The checksum appended and the file fsynced; its data, read through the handle held (the rename into
        place and any later unlink leave it readable). None when the disk had no room: the transfer starts over."""
        if self._writer is None and not self._open():  # an empty snapshot: its head only
            return None
        fs = self.storage.fs
        try:
            fs.append(self._writer, struct.pack(">I", self._crc))
            fs.fsync(self._writer)
        except OSError as e:
            if e.errno not in _NO_ROOM:
                raise
            return None
        fs.close(self._writer)
        self._writer = None
        self._done = True
        source = ReceivedSnapshotFile(fs, self._reader, self._head_bytes, self.size, self.path)
        source.received_tmp = self.path
        self._reader = None  # the source's now
        self._source = source
        return source

    def _close(self) -> None:
        for handle in (self._writer, self._reader):
            if handle is not None:
                with contextlib.suppress(OSError):
                    self.storage.fs.close(handle)
        self._writer = self._reader = None

    def discard(self) -> None:
        """Given up, finished or not (a finished one superseded before it was saved): the file and its handles."""
        self._close()
        if self._source is not None:
            self._source.close()
            self._source = None
        self.storage.abort_snapshot(self.path)


def encode_snapshot(s: Snapshot) -> bytes:
    """A snapshot file's bytes, in memory (tests; the storage writes them in pieces, `_write_snapshot_file`)."""
    body = _snapshot_head(s) + snapshot_chunk(s.data, 0, len(s.data))
    return body + struct.pack(">I", zlib.crc32(body))


def read_snapshot(path: str, fs: FileSystem | None = None) -> Snapshot:
    """The snapshot in the file at `path`, its data a SnapshotFile (the file held open, its checksum checked)."""
    fs = fs or OsFileSystem()
    source = _open_snapshot_file(fs, path)
    meta_bytes = fs.pread(source.handle, _HEADER.size + 4, source.start - _HEADER.size - 4)
    try:
        meta = cbor2.loads(meta_bytes)
        return codec.decode_snapshot_meta(meta, source)
    except Exception as e:
        source.close()
        raise CorruptLogError(f"{path}: bad snapshot metadata: {e}") from None
