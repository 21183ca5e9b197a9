"""The log's on-disk format: the file header, records (framing, checksum, the encoding of batch and base records
and of groups), decoding, the scan of a segment that tells a torn tail from damage, and replay (of a segment that
starts with a base record, and of the format-1 segments from before base records). It decides nothing about files:
raftlib.storage.DiskStorage writes, cuts and deletes them; `_replay_format1` only reads the segments it is given.

Rules:
- Records are replayed with their full meaning, always: a record's entries replace every entry at or after their
  first index (that is how a conflicting suffix is cut, §5.3), whatever snapshot came later.
- No record is longer than MAX_RECORD_BYTES, the length a reader trusts: a save or a base record too big for one
  record is written as a GROUP (part records, closed by a batch record) in the same append and fsync, and load
  applies a group only when all of it is there. An entry too big for any record is refused (RecordTooBig)
  before anything is written.
- A torn record (group) at the end of the newest segment is cut off with a warning. Torn means what a crash
  during unsynced appends can leave: the file ends inside it, or only its checksum fails and nothing but zeros
  follows, or a sector of it (from where it starts; to the file's end when its length reads as 0) is all zeros,
  a page whose data never reached the disk though a later one or the size did. Records after a torn one were
  appended after it, so were never synced either: they go too. (A synced record that the disk itself zeroes
  reads the same way: etcd's WAL draws the same line.) Any other damage (a checksum that fails with data after
  it, a length over the limit, a record that does not decode, a base record anywhere but first) stops the node
  with the file and offset named.

A record is `u32 length | u32 crc32(payload) | payload`; the payload is a type byte and CBOR: type 1 (batch)
`[hard_state or null, [entry, ...]]`, type 2 (base) `[snapshot_index, snapshot_term, hard_state, [entry, ...]]`;
types 3 and 4 are batch and base records that more records of their group follow (a group: 3* 1, or 4 3* 1; the
hard state rides in a base group's first record and a batch group's last). Readers from before types 2-4 stop on
them with "unknown record type", naming the file and offset. A file (a segment, and a snapshot file too) starts
with the header `_HEADER`: 8 bytes of magic and a u32 format version (docs/DATA-DIR.md).
"""

from __future__ import annotations

import logging
import struct
import zlib

import cbor2

from . import codec
from .fs import FileSystem
from .messages import Entry, HardState, Snapshot
from .storage_errors import CorruptLogError, RecordTooBig, UnknownFormatError

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"RDZMQLOG"
_HEADER = struct.Struct(">8sI")  # magic, format version
_RECORD = struct.Struct(">II")  # payload length, crc32(payload)
MAX_RECORD_BYTES = 256 << 20
RECORD_BATCH = 1  # payload: 1 type byte, then CBOR [hard_state or null, [entry, ...]]
RECORD_BASE = 2  # payload: 1 type byte, then CBOR [snapshot_index, snapshot_term, hard_state, [entry, ...]]
RECORD_BATCH_PART = 3  # a batch record that more records of its group follow (payload as type 1)
RECORD_BASE_PART = 4  # a base record that more records of its group follow (payload as type 2)

# The logger of raftlib.storage, where this code was: its warnings keep their logger's name (and its level,
# which tests and operators set).
logger = logging.getLogger("raftlib.storage")


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


def _chunks(head: list, wire: list, limit: int) -> list[list]:
    """`wire` (encoded entries) cut into runs whose record, CBOR `head + [run]` after one type byte, fits in
    `limit` bytes. An entry that no record can hold is refused before anything is written."""
    overhead = 1 + len(cbor2.dumps(head + [[]])) + 8  # the type byte, the head, a list header of up to 9 bytes
    out: list[list] = [[]]
    size = overhead
    for w in wire:
        n = len(cbor2.dumps(w))
        if n + overhead > limit:
            raise RecordTooBig(f"a log entry of {n} bytes (index {w[1]}) is over the {limit}-byte record limit")
        if size + n > limit and out[-1]:
            out.append([])
            size = overhead
        out[-1].append(w)
        size += n
    return out


def _encode_group(first_kind: int, head: list, hard_state: HardState | None, entries: list[Entry]) -> bytes:
    """One record (`first_kind`'s final type) or, when that would be over MAX_RECORD_BYTES, a group: records of
    the part types, closed by a batch record. The hard state rides in the first record of a base group and in
    the last of a batch group; load applies a group only when all of it is there."""
    limit = MAX_RECORD_BYTES
    wire = [codec.entry_to_wire(e) for e in entries]
    hs = _hard_state_out(hard_state)
    if first_kind == RECORD_BASE:
        one = bytes([RECORD_BASE]) + cbor2.dumps(head + [hs, wire])
    else:
        one = bytes([RECORD_BATCH]) + cbor2.dumps([hs, wire])
    if len(one) <= limit:  # the common case costs one encoding, as before groups
        return _framed(one)
    runs = _chunks(head + [hs] if first_kind == RECORD_BASE else [hs], wire, limit)
    out = []
    for n, run in enumerate(runs):
        last = n == len(runs) - 1
        if n == 0 and first_kind == RECORD_BASE:
            payload = bytes([RECORD_BASE if last else RECORD_BASE_PART]) + cbor2.dumps(head + [hs, run])
        else:
            body = [hs if last and first_kind == RECORD_BATCH else None, run]
            payload = bytes([RECORD_BATCH if last else RECORD_BATCH_PART]) + cbor2.dumps(body)
        assert len(payload) <= limit, (len(payload), limit)
        out.append(_framed(payload))
    return b"".join(out)


def encode_record(hard_state: HardState | None, entries: list[Entry]) -> bytes:
    """A Ready's hard state (or None) and entries as one batch record, or as a group when over the record limit."""
    return _encode_group(RECORD_BATCH, [], hard_state, entries)


def encode_base_record(snapshot_index: int, snapshot_term: int, hard_state: HardState, entries: list[Entry]) -> bytes:
    """A base record: the whole log after the snapshot at `snapshot_index`; what came before is forgotten. Over the
    record limit: a base part record, then batch records holding the rest of the entries (one group)."""
    return _encode_group(RECORD_BASE, [snapshot_index, snapshot_term], hard_state, entries)


def _open_group_records(head: list | None, hard_state: HardState | None, entries: list[Entry], close: bool) -> bytes:
    """Records of a group written in several appends (a base segment pre-built in steps, DiskStorage.base_step):
    with `head` ([snapshot_index, snapshot_term]) its first, a base part record (type 4, never 2) holding the
    hard state; else batch part records (type 3); with `close`, the last record a batch record (type 1) holding
    `hard_state`, which closes the group. Until then load takes the group for one a crash cut short."""
    wire = [codec.entry_to_wire(e) for e in entries]
    hs = _hard_state_out(hard_state)

    def payload(first: bool, last: bool, run: list) -> bytes:
        if first and head is not None:
            return bytes([RECORD_BASE_PART]) + cbor2.dumps(head + [hs, run])
        if last and close:
            return bytes([RECORD_BATCH]) + cbor2.dumps([hs, run])
        return bytes([RECORD_BATCH_PART]) + cbor2.dumps([None, run])

    assert head is None or not close, "a base head opens a group: another record closes it"
    one = payload(True, True, wire)
    if len(one) <= MAX_RECORD_BYTES:
        return _framed(one)  # the common case: one encoding
    runs = _chunks((head or []) + [hs], wire, MAX_RECORD_BYTES)
    out = []
    for n, run in enumerate(runs):
        data = payload(n == 0, n == len(runs) - 1, run)
        assert len(data) <= MAX_RECORD_BYTES, (len(data), MAX_RECORD_BYTES)
        out.append(_framed(data))
    return b"".join(out)


def encode_base_group_head(snapshot_index: int, snapshot_term: int, hard_state: HardState,
                           entries: list[Entry]) -> bytes:
    """The first records of a base group left open (the log after the snapshot at `snapshot_index`, from its
    first entry): closed later by `encode_group_tail`, after any `encode_group_parts`."""
    return _open_group_records([snapshot_index, snapshot_term], hard_state, entries, close=False)


def encode_group_parts(entries: list[Entry]) -> bytes:
    """More entries of a group left open: batch part records."""
    return _open_group_records(None, None, entries, close=False)


def encode_group_tail(hard_state: HardState, entries: list[Entry]) -> bytes:
    """The last entries of a group left open and the hard state, in the record that closes it."""
    return _open_group_records(None, hard_state, entries, close=True)


class _Record:
    """A record, or a whole group merged: `kind` RECORD_BATCH or RECORD_BASE for a group."""

    __slots__ = ("offset", "kind", "hard_state", "entries", "snapshot_index", "snapshot_term")

    def __init__(self, offset, kind, hard_state, entries, snapshot_index=None, snapshot_term=None) -> None:
        self.offset, self.kind, self.hard_state, self.entries = offset, kind, hard_state, entries
        self.snapshot_index, self.snapshot_term = snapshot_index, snapshot_term


def _decode_record(path: str, offset: int, payload: bytes) -> _Record:
    try:
        kind = payload[0]
        body = cbor2.loads(payload[1:])
        if kind in (RECORD_BATCH, RECORD_BATCH_PART):
            hs, entries = body
            base = None
        elif kind in (RECORD_BASE, RECORD_BASE_PART):
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


def _merge(path: str, parts: list[_Record]) -> _Record:
    """A group's records as one: the first one's kind and offset, the entries in order, the last hard state."""
    first = parts[0]
    if len(parts) == 1:
        return first
    entries = list(first.entries)
    hard_state = first.hard_state
    for r in parts[1:]:
        if r.entries:
            if entries and r.entries[0].index != entries[-1].index + 1:
                raise CorruptLogError(f"{path}: record at offset {r.offset} does not follow the entries of the "
                                      f"group at offset {first.offset}")
            entries += r.entries
        if r.hard_state is not None:
            hard_state = r.hard_state
    kind = RECORD_BASE if first.kind in (RECORD_BASE, RECORD_BASE_PART) else RECORD_BATCH
    return _Record(first.offset, kind, hard_state, entries, first.snapshot_index, first.snapshot_term)


def _check_record(data: bytes, offset: int) -> tuple[str | None, int]:
    """What is wrong with the record at `offset` (None: nothing), and where it ends (the file's end when its
    length cannot be trusted)."""
    if offset + _RECORD.size > len(data):
        return "incomplete record header", len(data)
    length, crc = _RECORD.unpack_from(data, offset)
    if length == 0:
        return "empty record", len(data)
    if length > MAX_RECORD_BYTES:
        return f"record length {length} is over the limit of {MAX_RECORD_BYTES}", len(data)
    end = offset + _RECORD.size + length
    if end > len(data):
        return f"record length {length} runs past the end of the file", len(data)
    if zlib.crc32(data[offset + _RECORD.size : end]) != crc:
        return "checksum mismatch", end
    return None, end


SECTOR_BYTES = 512  # the unit a disk writes whole or not at all; a lost page is 8 of them (etcd: isTornEntry)


def _torn(data: bytes, offset: int, problem: str, end: int) -> bool:
    """Whether a bad record at `offset` of the newest segment's tail is what a crash during unsynced appends can
    leave (it was never acknowledged), rather than damage. A crash keeps any prefix of the appended bytes (the
    file ends inside the record), and of what it keeps, each sector may hold its data or zeros (the size reached
    the disk before the data: ext4's delayed allocation; pages flushed out of order). So: torn when the file ends
    inside the record, or when the record is the file's last one and only its checksum fails (a sector torn), or
    when a sector from `offset` on within the record, or anywhere after it when its length cannot be trusted,
    reads as zeros."""
    if problem.startswith(("incomplete record header", "record length")) and "over the limit" not in problem:
        return True
    if problem == "checksum mismatch" and not any(data[end:]):
        return True
    first = offset - offset % SECTOR_BYTES
    for sector in range(first, end, SECTOR_BYTES):
        lo, hi = max(sector, offset), min(sector + SECTOR_BYTES, len(data))
        if lo < hi and not any(data[lo:hi]):
            return True
    return False


def _scan(path: str, data: bytes, tail_may_tear: bool) -> tuple[list[_Record], int]:
    """The record groups of a segment (each merged into one _Record), and the offset where the complete ones end
    (less than len(data) when a torn tail follows them, or a group the file ends inside). A torn tail is allowed
    only when `tail_may_tear`; any other damage raises CorruptLogError naming the file and offset."""
    if len(data) < _HEADER.size or not any(data[:SECTOR_BYTES]):
        if tail_may_tear:
            return [], 0  # the file's size reached the disk, its first sector did not: a creation cut short
        raise CorruptLogError(f"{path}: truncated segment header")
    _check_header(path, data, SEGMENT_MAGIC, "log segment")
    groups: list[_Record] = []
    parts: list[_Record] = []  # the records of the group being read
    offset = group_start = _HEADER.size
    while offset < len(data):
        problem, end = _check_record(data, offset)
        if problem is not None:
            if tail_may_tear and _torn(data, offset, problem, end):
                return groups, group_start
            raise CorruptLogError(f"{path}: {problem} at offset {offset}; the log is damaged")
        r = _decode_record(path, offset, data[offset + _RECORD.size : end])
        if r.kind in (RECORD_BASE, RECORD_BASE_PART) and (parts or groups):
            raise CorruptLogError(f"{path}: a base record at offset {offset}, after the first record of a segment")
        parts.append(r)
        offset = end
        if r.kind in (RECORD_BATCH, RECORD_BASE):
            groups.append(_merge(path, parts))
            parts = []
            group_start = offset
    if parts:  # the file ends inside a group: the rest of its records never reached it
        if not tail_may_tear:
            raise CorruptLogError(f"{path}: the record group at offset {group_start} is incomplete")
        return groups, group_start
    return groups, offset


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


def _replay_base(path: str, groups: list[_Record]) -> _Replay:
    """The log a segment that starts with a base record holds: the base, then every record after it."""
    first = groups[0]
    where = f"{path} at offset {first.offset}"
    if first.entries and first.entries[0].index != first.snapshot_index + 1:
        raise CorruptLogError(f"{where}: the base record's entries start at index {first.entries[0].index}, "
                              f"not after its snapshot at {first.snapshot_index}")
    terms = [first.snapshot_term] + [e.term for e in first.entries]
    if any(a > b for a, b in zip(terms, terms[1:])):
        raise CorruptLogError(f"{where}: the base record's terms go down along its log (from the snapshot's "
                              f"term {first.snapshot_term})")
    replay = _Replay(first.snapshot_index, first.snapshot_term, list(first.entries), first.hard_state)
    for r in groups[1:]:
        where = f"{path} at offset {r.offset}"
        if r.entries:
            replay.put(r.entries, where)
        if r.hard_state is not None:
            replay.hard_state = r.hard_state
    return replay


def _replay_format1(segments: list[tuple[int, str]], snapshots: dict[int, Snapshot], newest: int,
                    fs: FileSystem) -> _Replay | None:
    """The log of a data dir before base records (DiskStorage._load_format1 says how it is found), or None when
    there is no segment with a complete record."""
    replay = None
    for _, path in segments:
        data = fs.read_file(path)
        # Any of them may end torn: the old code began a segment after records it had not synced (a commit
        # index alone), and never fsynced a segment it left behind.
        groups, good_end = _scan(path, data, tail_may_tear=True)
        if good_end < len(data):
            logger.warning("%s: torn record at offset %d: dropping %d bytes", path, good_end, len(data) - good_end)
        if not groups:
            continue
        for g in groups:
            if g.kind != RECORD_BATCH:
                raise CorruptLogError(f"{path} at offset {g.offset}: a base record after a segment that has none")
        first_index = next((g.entries[0].index for g in groups if g.entries), None)
        if groups[0].hard_state is not None and (first_index is None or first_index == 1
                                                 or first_index - 1 in snapshots):
            # Begun by an install (or the first segment ever): the whole log after its snapshot.
            index = newest if first_index is None else first_index - 1
            term = snapshots[index].last_included_term if index else 0
            replay = _Replay(index, term)
        else:
            # Appended to by a restarted old process: its log, cut as that process's load cut it.
            below = first_index - 1 if first_index is not None else newest
            cut = max((i for i in snapshots if i <= below), default=0)
            if replay is None:
                replay = _Replay()
            if cut and (replay.start_index is None or cut > replay.start_index):
                replay.cut(snapshots[cut], path)
        for g in groups:
            if g.entries:
                replay.put(g.entries, f"{path} at offset {g.offset}")
            if g.hard_state is not None:
                replay.hard_state = g.hard_state
    return replay
