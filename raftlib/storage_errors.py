"""The storage's errors: StorageError and its kinds. Apart from DiskStorage so that the modules it stands on
(raftlib.logformat, raftlib.snapshotfile) raise them without importing it; raftlib.storage re-exports every one.

Rules:
- DiskFull and OutOfDescriptors mean that nothing changed: the same save may be tried again. Any other error of
  a write or a sync is an OSError, never one of these: the caller must stop (fsyncgate).
- A StorageError's message says why the data dir cannot be used, and where (the file, the offset).
"""

from __future__ import annotations

import errno


class StorageError(Exception):
    """The data dir cannot be used; the message says why and where."""


class CorruptLogError(StorageError):
    pass


class UnknownFormatError(StorageError):
    pass


class DataDirLocked(StorageError):
    pass


class RecordTooBig(StorageError):
    """A log entry too big for any record (over MAX_RECORD_BYTES): refused before anything is written."""


class DiskFull(StorageError):
    """The disk had no room (ENOSPC, EDQUOT) for a write, or for the fsync of a file this write created. The
    storage's state is as it was, and so is the data dir as every reader sees it, now and after any crash: it
    loads to the state before the write. What may be left is harmless: a `*.tmp` file whose unlink a power failure
    undid (no reader uses it, load deletes it), a snapshot file no base record names (an install that did not
    commit: load deletes it), or the part of a record that reached the log before ENOSPC, cut off and never
    synced (a torn tail at worst, which load cuts). The same save may be tried again once there is room. Every
    other error of a write or a sync is an OSError: the caller must stop (fsyncgate)."""


class OutOfDescriptors(StorageError):
    """The process had no file descriptor free (EMFILE; ENFILE: the system had none) to create a file a save
    needed. Nothing was changed: the kernel takes the descriptor before it makes the name. As with DiskFull, the
    storage's state and what any crash recovers are as before the save, which may be tried again (descriptors
    come back as connections close). Not a disk failure: the caller must not stop for it."""


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
