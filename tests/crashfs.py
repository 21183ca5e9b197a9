"""CrashFS: an in-memory file system (the `raftlib.fs.FileSystem` protocol) that records every operation and builds
the states a crash can leave on the disk, after the model of ALICE (OSDI 2014) and CrashMonkey (OSDI 2018).

The model: POSIX promises, no more.
- A file's data is durable as of its last `fsync`/`fdatasync`. The appends and truncates made since reach the disk
  in order, and a crash keeps any prefix of them; the last one kept may be torn: only a prefix of its bytes, or
  its length in zeros (the new size got to the disk, the data did not: ext4's delayed allocation). Or all of them
  are kept but one page (`page_bytes`, 4096) of the unsynced range reads as zeros while later ones made it: the
  page cache writes pages back in no promised order.
- A folder's entries are durable as of its last `fsync_dir`. The creations, mkdirs, renames and unlinks made in it
  since reach the disk in ANY combination that can be applied in order (a rename needs its source, an unlink its
  file): journaling file systems keep them in order, POSIX does not promise it.
- A file's fsync does not make its name durable; a folder's fsync does not make its files' data durable. A file no
  durable name reaches is gone after the crash.
- Locks and open handles die with the process; `lock` makes no file.
- Descriptors (`opens_left`): each call that opens one (create, open_append, open_dir, read_file, listdir, lock,
  fsync_dir given a path) takes one of those left; with none left it raises EMFILE before doing anything, as the
  kernel does (the descriptor is taken before the name is looked up or made).

Use:
    fs = CrashFS()
    storage = DiskStorage("/data", fs=fs); storage.load(); storage.save(...)
    states = fs.crash_states(limit=64)      # every state a power failure now could leave (deterministic, capped)
    fs.crash(rng)                           # become one of them, picked at random (the simulator's crash)
    fs.crash_process()                      # SIGKILL: the page cache survives, unsynced data stays unsynced
    fs.fail_at[k] = OSError(errno.ENOSPC)   # the mutating operation number k raises instead of running
    fs.fail_at[k] = SimulatedCrash()        # ... or the process dies there: every later call raises it too
    fs.before_op = hook                     # hook(fs, number, kind, name) before each mutating operation
    fs.free_bytes = 4096                    # a disk that fills up: an append past it writes what fits, then ENOSPC
    fs.opens_left = 2                       # out of file descriptors after two more opens: then EMFILE
    fs.page_bytes = 512                     # the page a crash loses whole (smaller: lost pages in small workloads)
    fs.record_ops = False                   # keep no operation list (long simulations); numbering goes on

Operations are numbered from 0 in the order they run; only the mutating ones (create, append, truncate, fsync,
fdatasync, fsync_dir, rename, unlink, mkdir) get numbers: they are the crash points. `fs.ops` lists them.
Everything is deterministic: the same calls give the same numbers and the same crash states. Appends cost what
the data costs (about 10 us a DiskStorage.save() here), so a simulated cluster can run on it.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
from dataclasses import dataclass, field

ROOT = 0


class SimulatedCrash(BaseException):
    """The simulated process died at this operation (a BaseException: storage code must not catch it)."""


@dataclass
class _Inode:
    is_dir: bool
    data: bytearray = field(default_factory=bytearray)  # a file's content as the process sees it
    synced_len: int = 0  # ... and as the disk holds it for sure: data[:synced_len], unless `durable` says
    durable: bytes | None = None  # set when a truncate changed data[:synced_len] since the last sync
    pending: list = field(default_factory=list)  # ("append", bytes) | ("truncate", size) since the last sync
    entries: dict = field(default_factory=dict)  # a folder's names -> inode numbers, as the process sees them
    durable_entries: dict = field(default_factory=dict)
    dir_pending: list = field(default_factory=list)  # ("create", name, ino) | ("unlink", name, ino) | ("rename", src, dst, ino)

    def durable_content(self) -> bytes:
        return self.durable if self.durable is not None else bytes(self.data[: self.synced_len])

    def keep_durable(self) -> None:
        """Before data[:synced_len] changes (a truncate): keep what the disk holds for sure."""
        if self.durable is None:
            self.durable = bytes(self.data[: self.synced_len])

    def synced(self) -> None:
        self.synced_len, self.durable, self.pending = len(self.data), None, []


def _apply_data(base: bytes, ops: list) -> bytes:
    for op in ops:
        if op[0] == "append":
            base = base + op[1]
        else:
            size = op[1]
            base = base[:size] + bytes(max(0, size - len(base)))
    return base


PAGE_BYTES = 4096  # the unit the page cache writes back: each page of unsynced data reaches the disk or not
MAX_LOST_PAGES_ENUMERATED = 8  # pages of one file's unsynced range tried lost, one at a time (the first and last)


def _data_variants(node: _Inode, page_bytes: int = PAGE_BYTES) -> list[bytes]:
    """Every content a crash can leave this file with: a prefix of its pending operations, the last one torn; and
    all of them kept, but one page of the unsynced range lost (zeros: the size reached the disk, that page did
    not) while later pages made it."""
    cur = node.durable_content()
    out = [cur]
    durable = cur
    for op in node.pending:
        if op[0] == "append":
            data = op[1]
            for cut in sorted({1, len(data) // 2, len(data) - 1}):
                if 0 < cut < len(data):
                    out.append(cur + data[:cut])
            if data.strip(b"\0"):
                out.append(cur + bytes(len(data)))
        cur = _apply_data(cur, [op])
        out.append(cur)
    start = 0  # where the unsynced range begins: the first byte that differs from what is durable
    while start < min(len(cur), len(durable)) and cur[start] == durable[start]:
        start += 1
    pages = range(start - start % page_bytes, len(cur), page_bytes)
    if len(pages) > MAX_LOST_PAGES_ENUMERATED:
        half = MAX_LOST_PAGES_ENUMERATED // 2
        pages = list(pages[:half]) + list(pages[-half:])
    for page in pages:
        lo, hi = max(page, start), min(page + page_bytes, len(cur))
        out.append(cur[:lo] + bytes(hi - lo) + cur[hi:])
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def _apply_dir(durable: dict, ops: list, mask: int) -> dict | None:
    """The folder after the operations picked by `mask`, in order; None when one of them cannot apply."""
    ents = dict(durable)
    for i, op in enumerate(ops):
        if not mask >> i & 1:
            continue
        kind = op[0]
        if kind == "create":
            if op[1] in ents:
                return None
            ents[op[1]] = op[2]
        elif kind == "unlink":
            if ents.get(op[1]) != op[2]:
                return None
            del ents[op[1]]
        else:
            _, src, dst, ino = op
            if ents.get(src) != ino:
                return None
            del ents[src]
            ents[dst] = ino
    return ents


MAX_DIR_OPS_ENUMERATED = 10  # past this many unsynced operations in one folder, only prefixes and suffix-drops


def _dir_masks(node: _Inode) -> list[int]:
    n = len(node.dir_pending)
    if n <= MAX_DIR_OPS_ENUMERATED:
        candidates = range(1 << n)
    else:
        full = (1 << n) - 1
        candidates = sorted({(1 << k) - 1 for k in range(n + 1)} | {full & ~(1 << k) for k in range(n)})
    return [m for m in candidates if _apply_dir(node.durable_entries, node.dir_pending, m) is not None]


class CrashFS:
    def __init__(self) -> None:
        self.inodes: dict[int, _Inode] = {ROOT: _Inode(is_dir=True)}
        self._next_ino = 1
        self._handles: dict[int, int] = {}  # handle -> inode number
        self._handle_paths: dict[int, str] = {}  # handle -> the path it was opened by (for the operation list)
        self._next_handle = 3
        self._locks: dict[str, int] = {}
        self.op_count = 0
        self.ops: list[tuple[int, str, str]] = []  # (number, kind, what) of every mutating operation
        self.record_ops = True
        self.fail_at: dict[int, BaseException] = {}
        self.before_op = None
        self.free_bytes: int | None = None
        self.opens_left: int | None = None  # None: no limit
        self.descriptors_taken = 0  # opens that took a descriptor (counted, for tests of what code reached)
        self.faults_injected = 0  # fail_at's errors, EMFILE from opens_left and ENOSPC from free_bytes raised
        self.page_bytes = PAGE_BYTES
        self.dead = False

    # ---- paths ------------------------------------------------------------------------------------

    def _lookup(self, path: str) -> int | None:
        ino = ROOT
        for part in path.strip("/").split("/"):
            if not part:
                continue
            node = self.inodes[ino]
            if not node.is_dir:
                return None
            ino = node.entries.get(part)
            if ino is None:
                return None
        return ino

    def _parent(self, path: str) -> tuple[_Inode, str]:
        head, name = os.path.split(os.path.normpath(path))
        ino = self._lookup(head)
        if ino is None or not self.inodes[ino].is_dir or not name:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.inodes[ino], name

    def _file(self, path: str) -> _Inode:
        ino = self._lookup(path)
        if ino is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        node = self.inodes[ino]
        if node.is_dir:
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        return node

    def _handle(self, handle: int, folder: bool = False) -> _Inode:
        if self.dead:
            raise SimulatedCrash()
        ino = self._handles.get(handle)
        if ino is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        node = self.inodes[ino]
        if node.is_dir != folder:
            raise OSError(errno.EISDIR if node.is_dir else errno.ENOTDIR, "Wrong kind of handle",
                          self._handle_paths[handle])
        return node

    def _descriptor(self, path: str) -> None:
        """Take a file descriptor for an open of `path`, or raise EMFILE when none is left (nothing done)."""
        if self.dead:
            raise SimulatedCrash()
        if self.opens_left is not None:
            if self.opens_left <= 0:
                self.faults_injected += 1
                raise OSError(errno.EMFILE, "Too many open files", path)
            self.opens_left -= 1
        self.descriptors_taken += 1

    def _op(self, kind: str, what: str) -> None:
        """Number a mutating operation; run the hook; fail it when told to."""
        if self.dead:
            raise SimulatedCrash()
        number = self.op_count
        self.op_count += 1
        if self.record_ops:
            self.ops.append((number, kind, what))
        if self.before_op is not None:
            self.before_op(self, number, kind, what)
        error = self.fail_at.pop(number, None)
        if error is not None:
            if isinstance(error, SimulatedCrash):
                self.dead = True
            self.faults_injected += 1
            raise error

    def _new_inode(self, is_dir: bool) -> int:
        ino = self._next_ino
        self._next_ino += 1
        self.inodes[ino] = _Inode(is_dir=is_dir)
        return ino

    # ---- the FileSystem protocol ----------------------------------------------------------------------

    def _directory(self, path: str) -> int:
        """The inode of the folder `path`, after the descriptor check its opening takes (ENOENT, ENOTDIR)."""
        self._descriptor(path)
        ino = self._lookup(path)
        if ino is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if not self.inodes[ino].is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
        return ino

    def listdir(self, path: str) -> list[str]:
        return sorted(self.inodes[self._directory(path)].entries)

    def read_file(self, path: str) -> bytes:
        self._descriptor(path)
        return bytes(self._file(path).data)

    def create(self, path: str) -> int:
        self._descriptor(path)
        parent, name = self._parent(path)
        self._op("create", path)
        ino = parent.entries.get(name)
        if ino is not None:
            node = self.inodes[ino]
            if node.is_dir:
                raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
            node.keep_durable()
            node.data = bytearray()
            node.pending.append(("truncate", 0))
        else:
            ino = self._new_inode(is_dir=False)
            parent.entries[name] = ino
            parent.dir_pending.append(("create", name, ino))
        return self._open(ino, path)

    def _open(self, ino: int, path: str) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = ino
        self._handle_paths[handle] = path
        return handle

    def open_append(self, path: str, reserve: bool = True) -> int:
        self._descriptor(path)
        self._file(path)
        return self._open(self._lookup(path), path)

    def open_dir(self, path: str, reserve: bool = True) -> int:
        self._descriptor(path)
        return self._open(self._directory(path), path)

    def open_read(self, path: str) -> int:
        self._descriptor(path)
        self._file(path)
        return self._open(self._lookup(path), path)

    def pread(self, handle: int, offset: int, length: int) -> bytes:
        return bytes(self._handle(handle).data[offset : offset + length])

    def file_size(self, handle: int) -> int:
        return len(self._handle(handle).data)

    def size_of(self, path: str) -> int:
        return len(self._file(path).data)

    def append(self, handle: int, data: bytes) -> None:
        node = self._handle(handle)
        self._op("append", f"{self._name(handle)} +{len(data)}")
        data = bytes(data)
        error = None
        if self.free_bytes is not None and len(data) > self.free_bytes:
            data, error = data[: self.free_bytes], OSError(errno.ENOSPC, "No space left on device")
        if self.free_bytes is not None:
            self.free_bytes -= len(data)
        if data:
            node.data += data
            node.pending.append(("append", data))
        if error is not None:
            self.faults_injected += 1
            raise error

    def truncate(self, handle: int, size: int) -> None:
        node = self._handle(handle)
        self._op("truncate", f"{self._name(handle)} to {size}")
        if self.free_bytes is not None:
            self.free_bytes += max(0, len(node.data) - size)
        node.keep_durable()
        if size <= len(node.data):
            del node.data[size:]
        else:
            node.data += bytes(size - len(node.data))
        node.pending.append(("truncate", size))

    def fdatasync(self, handle: int) -> None:
        node = self._handle(handle)
        self._op("fdatasync", self._name(handle))
        node.synced()

    def fsync(self, handle: int) -> None:
        node = self._handle(handle)
        self._op("fsync", self._name(handle))
        node.synced()

    def close(self, handle: int) -> None:
        if self.dead:
            raise SimulatedCrash()
        if handle not in self._handles:
            raise OSError(errno.EBADF, "Bad file descriptor")
        del self._handles[handle]
        del self._handle_paths[handle]

    def rename(self, src: str, dst: str) -> None:
        sparent, sname = self._parent(src)
        dparent, dname = self._parent(dst)
        if sparent is not dparent:
            raise OSError(errno.EXDEV, "CrashFS renames only inside one folder", src)
        ino = sparent.entries.get(sname)
        if ino is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", src)
        self._op("rename", f"{src} -> {os.path.basename(dst)}")
        del sparent.entries[sname]
        sparent.entries[dname] = ino
        sparent.dir_pending.append(("rename", sname, dname, ino))

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        ino = parent.entries.get(name)
        if ino is None:
            if self.dead:
                raise SimulatedCrash()
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if self.inodes[ino].is_dir:
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        self._op("unlink", path)
        del parent.entries[name]
        parent.dir_pending.append(("unlink", name, ino))

    def mkdir(self, path: str) -> bool:
        parent, name = self._parent(path)
        if name in parent.entries:
            if self.dead:
                raise SimulatedCrash()
            if not self.inodes[parent.entries[name]].is_dir:
                raise FileExistsError(errno.EEXIST, "File exists", path)
            return False
        self._op("mkdir", path)
        ino = self._new_inode(is_dir=True)
        parent.entries[name] = ino
        parent.dir_pending.append(("create", name, ino))
        return True

    def fsync_dir(self, folder: str | int) -> None:
        """`folder`: a path (which takes a descriptor for the time of the call) or a handle from `open_dir`."""
        if isinstance(folder, str):
            path = folder
            self._descriptor(path)
            ino = self._lookup(path)
            if ino is None or not self.inodes[ino].is_dir:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            node = self.inodes[ino]
        else:
            node = self._handle(folder, folder=True)
            path = self._name(folder)
        self._op("fsync_dir", path)
        node.durable_entries, node.dir_pending = dict(node.entries), []

    def lock(self, path: str) -> str:
        self._descriptor(path)
        self._parent(path)
        if path in self._locks:
            raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable", path)
        self._locks[path] = 1
        return path

    def unlock(self, handle: str) -> None:
        if self.dead:
            raise SimulatedCrash()
        self._locks.pop(handle, None)

    # ---- looking at it ------------------------------------------------------------------------------

    def _name(self, handle: int) -> str:
        return self._handle_paths.get(handle, "?")

    def _walk(self, durable: bool, ino: int = ROOT, prefix: str = ""):
        node = self.inodes[ino]
        ents = node.durable_entries if durable else node.entries
        for name in sorted(ents):
            child = ents[name]
            path = f"{prefix}/{name}"
            yield path, child
            if self.inodes[child].is_dir:
                yield from self._walk(durable, child, path)

    def tree(self) -> dict[str, bytes | None]:
        """Every path the process sees, with its content (None for a folder)."""
        return {p: None if self.inodes[i].is_dir else bytes(self.inodes[i].data) for p, i in self._walk(False)}

    def fingerprint(self) -> tuple:
        return tuple(sorted(self.tree().items(), key=lambda kv: kv[0]))

    def unsynced(self) -> bool:
        """Whether a crash now could lose anything (any unsynced data or folder operation)."""
        return any(n.pending or n.dir_pending for n in self.inodes.values())

    # ---- crashes ------------------------------------------------------------------------------------

    def _choices(self) -> tuple[list[int], dict[int, list[int]], list[int], dict[int, list[bytes]]]:
        dirs = sorted(i for i, n in self.inodes.items() if n.is_dir and n.dir_pending)
        masks = {i: _dir_masks(self.inodes[i]) for i in dirs}
        files = sorted(i for i, n in self.inodes.items() if not n.is_dir and n.pending)
        variants = {i: _data_variants(self.inodes[i], self.page_bytes) for i in files}
        return dirs, masks, files, variants

    def _build(self, dir_pick: dict[int, int], file_pick: dict[int, bytes]) -> CrashFS:
        """The file system after a crash that kept what the picks say: all durable, no handles, no locks."""
        out = CrashFS()
        out.inodes = {}
        stack = [ROOT]
        while stack:
            ino = stack.pop()
            node = self.inodes[ino]
            if node.is_dir:
                ents = node.durable_entries
                if ino in dir_pick:
                    ents = _apply_dir(node.durable_entries, node.dir_pending, dir_pick[ino])
                out.inodes[ino] = _Inode(is_dir=True, entries=dict(ents), durable_entries=dict(ents))
                stack.extend(ents.values())
            else:
                data = file_pick[ino] if ino in file_pick else node.durable_content()
                out.inodes[ino] = _Inode(is_dir=False, data=bytearray(data), synced_len=len(data))
        out._next_ino = self._next_ino
        out._next_handle = self._next_handle
        out.free_bytes, out.page_bytes = self.free_bytes, self.page_bytes
        return out

    def _reachable_files(self, dir_pick: dict[int, int], files: list[int]) -> list[int]:
        reached, stack = set(), [ROOT]
        while stack:
            ino = stack.pop()
            node = self.inodes[ino]
            if not node.is_dir:
                reached.add(ino)
                continue
            ents = node.durable_entries
            if ino in dir_pick:
                ents = _apply_dir(node.durable_entries, node.dir_pending, dir_pick[ino])
            stack.extend(ents.values())
        return [f for f in files if f in reached]

    def crash_states(self, limit: int = 64, seed: int = 0) -> list[CrashFS]:
        """Distinct states a power failure now could leave, each a fresh CrashFS (all durable, nothing open).
        All of them when there are at most `limit`; else the two extremes (nothing unsynced kept, everything
        kept) and a sample drawn with random.Random(seed), up to `limit`. The same state gives the same list."""
        dirs, masks, files, variants = self._choices()
        combos = []
        for pick in itertools.product(*(masks[d] for d in dirs)):
            dir_pick = dict(zip(dirs, pick))
            live = self._reachable_files(dir_pick, files)
            combos.append((dir_pick, live))
        total = sum(_product(len(variants[f]) for f in live) for _, live in combos)
        out, seen = [], set()

        def add(dir_pick, file_pick) -> None:
            state = self._build(dir_pick, file_pick)
            key = state.fingerprint()
            if key not in seen:
                seen.add(key)
                out.append(state)

        if total <= limit:
            for dir_pick, live in combos:
                for vs in itertools.product(*(variants[f] for f in live)):
                    add(dir_pick, dict(zip(live, vs)))
            return out
        # The extremes first: everything unsynced lost, and everything kept.
        add({d: masks[d][0] for d in dirs}, {f: variants[f][0] for f in files})
        add({d: masks[d][-1] for d in dirs}, {f: variants[f][-1] for f in files})
        rng = random.Random(seed)
        for _ in range(limit * 4):
            if len(out) >= limit:
                break
            dir_pick, live = rng.choice(combos)
            add(dir_pick, {f: rng.choice(variants[f]) for f in live})
        return out

    def count_crash_states(self) -> int:
        """How many crash states the model allows now (before removing duplicates; without the cap)."""
        dirs, masks, files, variants = self._choices()
        total = 0
        for pick in itertools.product(*(masks[d] for d in dirs)):
            live = self._reachable_files(dict(zip(dirs, pick)), files)
            total += _product(len(variants[f]) for f in live)
        return total

    def crash(self, rng: random.Random) -> None:
        """A power failure: this file system becomes one state the model allows, picked with `rng`. Open handles
        and locks are gone, and everything left is durable. Operation numbers carry on."""
        dirs, masks, files, variants = self._choices()
        state = self._build({d: rng.choice(masks[d]) for d in dirs}, {f: rng.choice(variants[f]) for f in files})
        self.inodes = state.inodes
        self._handles, self._handle_paths, self._locks, self.dead = {}, {}, {}, False

    def crash_process(self) -> None:
        """A process crash (SIGKILL): the kernel keeps what was written, synced or not; handles and locks go."""
        self._handles, self._handle_paths, self._locks, self.dead = {}, {}, {}, False

    def copy(self) -> CrashFS:
        """A copy of the state as it is (unsynced data stays unsynced), with no handles open and no locks."""
        out = CrashFS()
        out.inodes = {
            i: _Inode(n.is_dir, bytearray(n.data), n.synced_len, n.durable, list(n.pending), dict(n.entries),
                      dict(n.durable_entries), list(n.dir_pending))
            for i, n in self.inodes.items()
        }
        out._next_ino, out._next_handle, out.free_bytes = self._next_ino, self._next_handle, self.free_bytes
        out.page_bytes = self.page_bytes
        return out


def _product(numbers) -> int:
    out = 1
    for n in numbers:
        out *= n
    return out
