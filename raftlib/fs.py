"""The file system under DiskStorage: a small protocol, and OsFileSystem, the real one (the default).

Rules:
- Every file operation `raftlib.storage` does goes through a `FileSystem`, so that a test can put a simulated one
  underneath (`tests/crashfs.py` records every operation and builds the states a crash can leave on the disk).
- Paths are absolute strings. A handle is whatever `create` or `open_append` returned (a file descriptor here);
  only the file system that made it may use it.
- Files are append-only: created empty, grown with `append`, cut back only with `truncate`; never rewritten in
  place.
- Nothing is durable until it is synced, and each sync covers only what it names (POSIX; ALICE, OSDI 2014):
  `fdatasync`/`fsync` a file's data, `fsync_dir` the creations, renames and unlinks inside one folder. A new
  file's data can be on the disk while its name is not.
- Errors are OSError with an errno, exactly as `os.*` raises them (ENOSPC for a full disk, EIO for a failed sync).
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Protocol

Handle = Any  # an open file, as the file system that opened it represents it


class FileSystem(Protocol):
    def listdir(self, path: str) -> list[str]:
        """The names in a folder (FileNotFoundError when it does not exist)."""

    def read_file(self, path: str) -> bytes:
        """The whole content of a file (FileNotFoundError when it does not exist)."""

    def create(self, path: str) -> Handle:
        """A new empty file open for appending (an existing one of that name is truncated)."""

    def open_append(self, path: str) -> Handle:
        """An existing file open for appending at its end."""

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

    def fsync_dir(self, path: str) -> None:
        """Make the creations, renames and unlinks done in this folder durable."""

    def lock(self, path: str) -> Handle:
        """Hold an exclusive lock named by `path` (created if missing) until `unlock`; BlockingIOError when another
        holder has it."""

    def unlock(self, handle: Handle) -> None: ...


class OsFileSystem:
    """The real file system, through `os`: handles are file descriptors, `lock` is flock(2). Every method calls
    `os.*` at call time (no functions bound early), so a test process may wrap them."""

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def open_append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND)

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

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlock(self, fd: int) -> None:
        os.close(fd)  # closing the descriptor releases the flock
