"""The file system under DiskStorage: a small protocol, and OsFileSystem, the real one (the default).

Rules:
- Every file operation `raftlib.storage` does goes through a `FileSystem`, so that a test can put a simulated one
  underneath (`tests/crashfs.py` records every operation and builds the states a crash can leave on the disk).
- Paths are absolute strings. A handle is whatever `create`, `open_append` or `open_dir` returned (a file
  descriptor here); only the file system that made it may use it.
- Files are append-only: created empty, grown with `append`, cut back only with `truncate`; never rewritten in
  place.
- Nothing is durable until it is synced, and each sync covers only what it names (POSIX; ALICE, OSDI 2014):
  `fdatasync`/`fsync` a file's data, `fsync_dir` the creations, renames and unlinks inside one folder. A new
  file's data can be on the disk while its name is not.
- Errors are OSError with an errno, exactly as `os.*` raises them (ENOSPC for a full disk, EIO for a failed sync).
- Out of file descriptors (EMFILE: this process's limit; ENFILE: the system's), an operation that opens one
  (`create`, `open_append`, `open_dir`, `open_read`, `read_file`, `listdir`, `lock`, and `fsync_dir` given a path) raises
  OSError with that errno and has done nothing: the kernel takes the descriptor before it looks up or creates
  the name. No other operation opens one: `fsync_dir` given a handle from `open_dir` needs none, so a caller
  that opened its folders beforehand can always make its renames and unlinks durable.
- OsFileSystem keeps RESERVE_DESCRIPTORS descriptors in reserve for the whole process (on /dev/null, opened by the
  first OsFileSystem, never by an import): an open that finds none left closes one of them, tries once more, and
  the reserve is topped up again at each open that finds descriptors free (libuv's accept does the same with its
  one). A short burst of connections that takes every descriptor then costs the disk nothing. Three, because a
  snapshot's install holds two new descriptors at once before it closes the old ones (the new snapshot file, held
  open for reading from before its commit point, and the new segment: raftlib.storage), and a node's first
  snapshot keeps one more open for good (a held snapshot; there was none). It is a help, not a promise: another
  thread may take a freed descriptor first, and ENFILE is the whole system's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import posix
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

Handle = Any  # an open file or folder, as the file system that opened it represents it
NO_DESCRIPTOR = (errno.EMFILE, errno.ENFILE)  # the errnos of an open that found no file descriptor free


class FileSystem(Protocol):
    def listdir(self, path: str) -> list[str]:
        """The names in a folder (FileNotFoundError when it does not exist)."""

    def read_file(self, path: str) -> bytes:
        """The whole content of a file (FileNotFoundError when it does not exist)."""

    def create(self, path: str) -> Handle:
        """A new empty file open for appending (an existing one of that name is truncated)."""

    def open_append(self, path: str, reserve: bool = True) -> Handle:
        """An existing file open for appending at its end. `reserve=False`: never with a descriptor of the
        reserve (a thread's open that can do without one: the loop's installs count on the reserve)."""

    def open_dir(self, path: str, reserve: bool = True) -> Handle:
        """A folder, held open for `fsync_dir` (which then opens nothing) until `close`. `reserve`: as
        `open_append`'s."""

    def open_read(self, path: str) -> Handle:
        """An existing file open for `pread` (it stays readable through the handle after a rename or an unlink)."""

    def pread(self, handle: Handle, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the file from `offset` (fewer only at its end)."""

    def file_size(self, handle: Handle) -> int:
        """The file's size now."""

    def size_of(self, path: str) -> int:
        """The size of the file at `path` now, opening nothing (FileNotFoundError when it does not exist)."""

    def append(self, handle: Handle, data: bytes) -> None:
        """Write all of `data` at the end of the file, or raise OSError (part of it may have been written)."""

    def truncate(self, handle: Handle, size: int) -> None:
        """Cut the file to `size` bytes."""

    def fdatasync(self, handle: Handle) -> None:
        """Make the file's data (and its size) durable."""

    def fsync(self, handle: Handle) -> None:
        """Make the file's data and metadata durable."""

    def close(self, handle: Handle) -> None: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically give `src` the name `dst`, replacing any file of that name (both in the same folder)."""

    def unlink(self, path: str) -> None: ...

    def mkdir(self, path: str) -> bool:
        """Make one folder (its parent must exist: FileNotFoundError). False when it existed already."""

    def fsync_dir(self, folder: str | Handle) -> None:
        """Make the creations, renames and unlinks done in this folder (a path, or a handle from `open_dir`)
        durable."""

    def lock(self, path: str) -> Handle:
        """Hold an exclusive lock named by `path` (created if missing) until `unlock`; BlockingIOError when another
        holder has it."""

    def unlock(self, handle: Handle) -> None: ...


# Descriptors in reserve: two for the two an install holds at once (its snapshot file and its new segment), one
# for the snapshot a node without one holds after its first (see the module's rules).
RESERVE_DESCRIPTORS = 3
_spares: list[int] = []  # the descriptors held in reserve (for the process, opened by the first OsFileSystem)
_T = TypeVar("_T")


def _reserve_spare() -> None:
    """Top the reserve up to RESERVE_DESCRIPTORS, as far as descriptors are free."""
    while len(_spares) < RESERVE_DESCRIPTORS:
        try:
            _spares.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return  # none free: the next open tries again


def _with_spare(opening: Callable[[], _T]) -> _T:
    """`opening()` (an open, or an open and its use and its close): out of descriptors, once more with one of the
    reserve given up for it; then the reserve is topped up if descriptors are free (else at the next open). A
    second failure is raised: another thread took the freed descriptor (libzmq's I/O thread opens sockets), or the
    system (ENFILE) has none. Only an open raises EMFILE or ENFILE, so trying again repeats nothing done."""
    _reserve_spare()
    try:
        return opening()
    except OSError as e:
        if e.errno not in NO_DESCRIPTOR or not _spares:
            raise
    posix.close(_spares.pop())  # os.close may be gevent's (25.8.1+), which closes a device's descriptor a loop turn later
    try:
        return opening()
    finally:
        _reserve_spare()


class OsFileSystem:
    """The real file system, through `os`: handles are file descriptors, `lock` is flock(2). Every method calls
    `os.*` at call time (no functions bound early), so a test process may wrap them. Each one that opens a
    descriptor goes through `_with_spare`: nothing else (appends, syncs) pays for the reserve."""

    def __init__(self) -> None:
        _reserve_spare()  # before the descriptors run out, not after

    def listdir(self, path: str) -> list[str]:
        return _with_spare(lambda: os.listdir(path))

    def read_file(self, path: str) -> bytes:
        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return _with_spare(read)

    def create(self, path: str) -> int:
        return _with_spare(lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644))

    def open_append(self, path: str, reserve: bool = True) -> int:
        opening = lambda: os.open(path, os.O_WRONLY | os.O_APPEND)  # noqa: E731
        return _with_spare(opening) if reserve else opening()

    def open_dir(self, path: str, reserve: bool = True) -> int:
        opening = lambda: os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # noqa: E731
        return _with_spare(opening) if reserve else opening()

    def open_read(self, path: str) -> int:
        return _with_spare(lambda: os.open(path, os.O_RDONLY))

    def pread(self, fd: int, offset: int, length: int) -> bytes:
        out = os.pread(fd, length, offset)
        while len(out) < length:  # a short read before the end of the file (signals); b"" at the end
            more = os.pread(fd, length - len(out), offset + len(out))
            if not more:
                break
            out += more
        return out

    def file_size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def size_of(self, path: str) -> int:
        return os.stat(path).st_size

    def append(self, fd: int, data: bytes) -> None:
        written = os.write(fd, data)
        while written < len(data):  # a short write; the next one raises when the disk is full
            written += os.write(fd, memoryview(data)[written:])

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str) -> bool:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return False
        return True

    def fsync_dir(self, folder: str | int) -> None:
        if not isinstance(folder, str):
            os.fsync(folder)
            return
        fd = self.open_dir(folder)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, path: str) -> int:
        fd = _with_spare(lambda: os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlock(self, fd: int) -> None:
        os.close(fd)  # closing the descriptor releases the flock
