"""`raftdzmq -restore FILE DATA_DIR`: a new data dir from a backup (GET /snapshot), whose node's first start makes
it a new one-node cluster holding the backup's state (nodestart.start_node, "RESTORE").

Rules:
- Offline and pure of gevent: it runs before any server exists, and changes nothing but DATA_DIR.
- Everything is checked before anything is written: the file's SHA-256 against the one given (the answer's
  X-Raft-Snapshot-Sha256) or against FILE.sha256 when that exists (`sha256sum`'s format), its head, version and
  crc32 (snapshotfile.read_snapshot), its metadata, and the whole state machine's bytes decoded as a node would
  (KeyValueStore.restore: every rule of docs/DATA-DIR.md's "Snapshots").
- DATA_DIR must not exist or be empty (an empty log/ and a LOCK allowed, as a failed try leaves them): a restore
  never mixes with a node's data. It is made with the backup's
  snapshot file as RESTORE (written crash-safe: a temporary file fsynced, then renamed, then its folder fsynced);
  a crash before the rename leaves an empty-looking dir whose RESTORE.tmp is deleted by the next try's check.
- The node id, its addresses and its configuration are the first start's (-name, -advertise, -p, -hp): the
  backup's configuration names the old cluster's members, which the new cluster does not have.
"""

from __future__ import annotations

import hashlib
import os

from raftlib.snapshotfile import SNAPSHOT_IO_BYTES, read_snapshot
from raftlib.storage import DiskStorage
from raftlib.storage_errors import StorageError

from .store import KeyValueStore

DIGEST_SUFFIX = ".sha256"


class RestoreError(Exception):
    """The backup cannot be restored (the message says why, in one line); DATA_DIR was not changed."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(SNAPSHOT_IO_BYTES):
            digest.update(piece)
    return digest.hexdigest()


def expected_sha256(path: str, given: str | None) -> str | None:
    """The digest the backup must have: `given`, else the first word of FILE.sha256 when it exists, else None."""
    if given:
        return given.strip().lower()
    try:
        with open(path + DIGEST_SUFFIX, encoding="ascii", errors="replace") as f:
            words = f.read(4096).split()
    except FileNotFoundError:
        return None
    if not words:
        raise RestoreError(f"{path}{DIGEST_SUFFIX} is empty: it should hold the backup's SHA-256")
    return words[0].lower()


def _holds_files(folder: str) -> bool:
    """Whether `folder` exists and is not empty (a data dir's log/ with segments: review of ops, finding 6)."""
    return os.path.isdir(folder) and bool(os.listdir(folder))


def restore_backup(path: str, data_dir: str, sha256: str | None = None) -> tuple[int, int, int]:
    """Check the backup at `path` and make `data_dir` from it (the module's rules). Returns (the backup's index,
    its term, its number of keys). Raises RestoreError, changing nothing."""
    if not os.path.isfile(path):
        raise RestoreError(f"{path}: no such file")
    data_dir = os.path.abspath(data_dir)
    if os.path.exists(data_dir) and (not os.path.isdir(data_dir) or
                                     [n for n in os.listdir(data_dir) if n not in ("RESTORE.tmp", "LOCK", "log")]
                                     or _holds_files(os.path.join(data_dir, "log"))):
        raise RestoreError(f"{data_dir} is not empty: a restore makes a new data dir (give an empty or new one)")
    want = expected_sha256(path, sha256)
    if want is not None:
        got = file_sha256(path)
        if got != want:
            raise RestoreError(f"{path}: its SHA-256 is {got}, not {want} as given: a damaged or another backup")
    try:
        snapshot = read_snapshot(path)
    except StorageError as e:
        raise RestoreError(f"not a raftdzmq backup: {e}") from None
    try:
        store = KeyValueStore()
        try:
            store.restore(snapshot.data)
        except ValueError as e:
            raise RestoreError(f"{path}: the state in the backup is damaged or of an unknown format: {e}") from None
        storage = DiskStorage(data_dir)
        try:
            if storage.has_restore_file() or storage.read_identity() is not None:
                raise RestoreError(f"{data_dir} is not empty")
            storage.write_restore_file(snapshot)
        finally:
            storage.close()
        return snapshot.last_included_index, snapshot.last_included_term, len(store)
    finally:
        close = getattr(snapshot.data, "close", None)  # a SnapshotFile: its handle
        if close is not None:
            close()
