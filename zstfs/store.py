"""The backing directory of a zstfs store.

Every operation is relative to one directory descriptor opened before the mount, so the daemon
never resolves a path through its own mountpoint (it is normally mounted over that very directory).
Paths here are `bytes` relative to the store root (`b"."` is the root itself).

This module is synchronous and thread-safe: the filesystem layer calls cheap metadata operations
inline and runs the bulk ones (promote, compress) in worker threads. It knows the on-disk rules
(plain wins, temp names, atomic publication) but nothing about FUSE or open handles; the caller
decides *when* a swap may happen and holds its own lock while it does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

from zstfs import codec, leases
from zstfs.names import (
    LOCK_NAME,
    ZST_SUFFIX_B,
    NameRules,
    is_reserved,
    is_temp,
    temp_name,
    zst_name,
)
from zstfs.stats import Census

log = logging.getLogger(__name__)

Stat = os.stat_result
T = TypeVar("T")
RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
SYS_OPENAT2: Final = 437  # the same number on every architecture (asm-generic)
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_openat2_missing = False
#: After unlinking the plain name, how long a swap keeps the way back open before it trusts an
#: intact lease: an opener that resolved the name just before the unlink reaches the lease
#: check within the same system call, microseconds later unless it is descheduled in between.
LEASE_GRACE = 0.01
#: A plain file that had to be set aside (never removed by recovery; reported).
KEPT_PREFIX: Final = b".zstfs-kept."


#: Frames decoded at once when a big file is promoted (the writer waits for it).
PROMOTE_THREADS = 2
#: Compressed files up to this size are read ahead whole when opened.
READAHEAD_LIMIT = 4 << 20


class StoreError(Exception):
    """A problem with the store as a whole (not a single file): shown to the user as one line."""


class StoreLocked(StoreError):
    def __init__(self, source: str, pid: int | None) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"{source}: store is in use by {holder} (a zstfs mount or offline command)")
        self.pid = pid


class Changed(Exception):
    """The file changed (or vanished) while a swap was being prepared; the swap was abandoned."""


class Busy(Changed):
    """Some process (through the mount, under it, or from before it) has the file open or
    mapped, or opened it while the swap was in progress."""


class Abandoned(Busy):
    """The daemon asked the swap to give up (an open, removal or rename through the mount)."""


class Leased(BlockingIOError):
    """A backing file cannot be opened without waiting: a lease on it is being broken (EAGAIN
    if it ever reaches the filesystem layer's errno translation)."""

    def __init__(self, key: tuple[int, int]) -> None:
        super().__init__(errno.EAGAIN, f"file {key} is leased")
        self.key = key


class Unadoptable(Exception):
    """A foreign `.zst` that cannot be re-encoded here (damaged, or a window too wide)."""


class PairExists(Exception):
    """`NAME.zst` already exists beside the plain `NAME` being swapped."""


@dataclass(frozen=True, slots=True)
class Entry:
    """What a logical name currently is in the backing store."""

    name: bytes  # the backing name (NAME or NAME.zst)
    st: os.stat_result
    compressed: bool


@dataclass(frozen=True, slots=True)
class Recovery:
    temps_removed: int = 0
    leftovers_removed: int = 0
    leftovers_kept: int = 0
    #: The plain files whose differing `.zst` was kept (reported here, once).
    kept_pairs: tuple[bytes, ...] = ()


def join(parent: bytes, name: bytes) -> bytes:
    return name if parent == b"." else parent + b"/" + name


def split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return (parent or b"."), name


def full_identity(st: os.stat_result) -> tuple[int, int, int, int, int, int]:
    """What must not change between deciding on a swap and publishing it: the same file
    (device, inode), the same content (size, mtime), the same metadata (ctime covers mode,
    owner, xattrs and times) and still one name."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)


def no_zst_form(e: OSError) -> bool:
    """Does this error from a `.zst` form's name say that form is not there? Not found, or it
    cannot exist: beside a name or a path at the length limit, the `.zst` is too long."""
    return e.errno in (errno.ENOENT, errno.ENAMETOOLONG)


class Store:
    """One backing directory, addressed through `root_fd`."""

    def __init__(
        self,
        root_fd: int,
        rules: NameRules,
        params: codec.CodecParams | None = None,
        source: str = "",
        decoders: codec.Decoders | None = None,
    ) -> None:
        self.root_fd = root_fd
        self.rules = rules
        self.params = params or codec.CodecParams()
        self.source = source
        #: The decoders of every `.zst` of this store. Their index cache is the one owner of
        #: each `.zst`'s logical size and of the damage found in it (counted from the first time
        #: seen, even after the view remembers a damaged file's stored size as its size).
        self.decoders = decoders if decoders is not None else codec.Decoders()
        self._lock_fd: int | None = None
        self.accounting = leases.Accounting()
        leases.ignore_lease_signal()

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def open(
        cls, source: str, rules: NameRules, params: codec.CodecParams | None = None
    ) -> Store:
        try:
            fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"{source}: no such directory") from None
        except NotADirectoryError:
            raise StoreError(f"{source}: not a directory") from None
        except PermissionError:
            raise StoreError(f"{source}: permission denied") from None
        return cls(fd, rules, params, source)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        os.close(self.root_fd)

    def lock(self) -> None:
        """Take the store's owner lock (an flock on `.zstfs.lock`), or raise StoreLocked."""
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644,
                         dir_fd=self.root_fd)
        except PermissionError:
            raise StoreError(
                f"{self.source}: cannot create the store lock: permission denied") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).split()[0])
            except (ValueError, IndexError):
                pid = None
            os.close(fd)
            raise StoreLocked(self.source, pid) from None
        self._lock_fd = fd
        self.record_lock_owner()

    def after_fork(self) -> None:
        """The daemon forked to detach: fresh decoders (the parent's threads are not in this
        process) and our PID in the lock file."""
        self.decoders = self.decoders.forked()
        self.record_lock_owner()

    def record_lock_owner(self) -> None:
        """Write our PID into the lock file (again after a daemonizing fork)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    # ----------------------------------------------------------------- space
    def give_back_space(self) -> bool:
        """A write into the store failed with ENOSPC: drop the daemon's decoded copies at once
        (they are optional; the frames are decoded again when read). True if any were held."""
        if self.decoders.spills.give_back():
            log.info("out of space: decoded copies given back")
            return True
        return False

    def with_room(self, op: Callable[[], T]) -> T:
        """Run `op` (a create or promotion into the store); if it fails with ENOSPC while
        decoded copies hold space, give them back and run it once more."""
        try:
            return op()
        except OSError as e:
            if e.errno != errno.ENOSPC or not self.give_back_space():
                raise
        return op()

    # ----------------------------------------------------------------- lookups
    def lstat(self, path: bytes) -> os.stat_result:
        return os.stat(path, dir_fd=self.root_fd, follow_symlinks=False)

    def resolve(self, parent: bytes, name: bytes) -> Entry | None:
        """The backing entry for logical `name` in `parent` (plain wins), or None."""
        return self._resolve(parent, name, self.lstat, join)

    def resolve_in(self, dir_fd: int, parent: bytes, name: bytes) -> Entry | None:
        """`resolve` with `parent` already open as `dir_fd` (a listing resolves every name)."""
        return self._resolve(parent, name,
                             lambda n: os.stat(n, dir_fd=dir_fd, follow_symlinks=False),
                             lambda _parent, n: n)

    def _resolve(self, parent: bytes, name: bytes, lstat: Callable[[bytes], os.stat_result],
                 at: Callable[[bytes, bytes], bytes]) -> Entry | None:
        try:
            return Entry(name, lstat(at(parent, name)), False)
        except FileNotFoundError:
            pass
        if not self.rules.compressible(parent, name):
            return None
        zname = zst_name(name)
        try:
            st = lstat(at(parent, zname))
        except OSError as e:
            if no_zst_form(e):
                return None
            raise
        if not stat.S_ISREG(st.st_mode):
            return None
        return Entry(zname, st, True)

    def list_names(self, path: bytes, dir_fd: int | None = None) -> list[bytes]:
        """The logical names in a directory (a `.zst` listed once, under its plain name), from the
        directory entries' types alone: no stat, so an entry that goes while it is listed (a swap
        or promotion in that directory replaces one form by the other) is simply not there.
        `readdir` looks at each name again when it answers. `dir_fd`: `path`, already open."""
        fd = self.open_dir(path) if dir_fd is None else dir_fd
        try:
            with os.scandir(fd) as it:  # reads a duplicate of fd from its start
                raw = [(os.fsencode(e.name), e.is_file(follow_symlinks=False)) for e in it]
        finally:
            if dir_fd is None:
                os.close(fd)
        names: dict[bytes, None] = {}
        for name, regular in raw:
            if is_reserved(name):
                continue
            if not self.rules.is_representation(path, name):
                names[name] = None
            elif regular:
                names[self.rules.logical(path, name)] = None
        return list(names)

    def known_size(self, st: os.stat_result) -> int | None:
        """The logical size of a compressed file if it is known without any I/O."""
        return self.decoders.indexes.known_size(codec.identity_of(st))

    def logical_size(self, path: bytes, st: os.stat_result) -> int:
        """Decoded size of the `.zst` at `path` (reads its seek table or frame headers, cached)."""
        size = self.decoders.indexes.size(codec.identity_of(st))
        if size is not None:
            return size
        fd = self.open_compressed(path, st)
        try:
            return self.size_of(fd, st)
        finally:
            os.close(fd)

    def size_of(self, fd: int, st: os.stat_result) -> int:
        """Decoded size of the open `.zst` `fd`, whose stat is `st`; raises the damage found in
        it, now or before (both kept by the decoders' index cache)."""
        size = self.decoders.indexes.size(codec.identity_of(st))
        if size is not None:
            return size
        return codec.ZstReader(fd, self.decoders).size

    def note_damaged(self, st: os.stat_result, why: codec.CorruptError) -> None:
        """Remember a damaged `.zst` (any stat of it) so that the census counts it from now on."""
        self.decoders.indexes.note_damaged(codec.identity_of(st), why)

    def open_plain(self, path: bytes, flags: int, *, dir_fd: int | None = None) -> int:
        """Open a plain backing file for the daemon's own use (`path` relative to `dir_fd`,
        else to the store root), never waiting on a lease (the daemon's thread must not block
        on its own swap's lease): Leased instead."""
        at = self.root_fd if dir_fd is None else dir_fd
        try:
            fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at)
        except BlockingIOError:
            st = os.stat(path, dir_fd=at, follow_symlinks=False)
            raise Leased((st.st_dev, st.st_ino)) from None
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd

    def wait_unleased(self, dir_fd: int, name: bytes, flags: int) -> None:
        """Wait (in a worker thread) until someone else's lease on `name` in `dir_fd` (a
        descriptor the caller owns until this returns) lets us open it."""
        with contextlib.suppress(OSError):
            os.close(os.open(name, (flags & os.O_ACCMODE) | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dir_fd))

    def open_compressed(self, path: bytes, st: os.stat_result, *,
                        dir_fd: int | None = None) -> int:
        """Open a `.zst` for reading (`path` relative to `dir_fd`, else to the store root). A
        small one is read ahead whole, in the background: its seek table, header and frames
        would otherwise be several small reads waiting on the disk one after another, on the
        thread that serves every request."""
        if st.st_size == 0:
            # zstd calls an empty file damaged; the kernel would never ask us to read a file whose
            # size is 0, so say it here.
            error = codec.CorruptError("not zstd: empty file")
            self.note_damaged(st, error)
            error.zstfs_path = os.fsdecode(path)  # type: ignore[attr-defined]
            raise error
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                     dir_fd=self.root_fd if dir_fd is None else dir_fd)
        if st.st_size <= READAHEAD_LIMIT:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd

    def eligible(self, parent: bytes, name: bytes, st: os.stat_result) -> bool:
        """May this backing entry (`name` in directory `parent`) be compressed (by the compactor
        or `zstfs compress`)? A plain regular file with one link (a swap would split a hard link),
        which matches the patterns and whose name can still carry the `.zst` suffix. Age and open
        handles are the caller's."""
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_nlink == 1
            and len(name) + len(b".zst") <= 255
            and self.rules.compressible(parent, name)
            and not self.rules.is_representation(parent, name)
        )

    def learn_sizes(self, dir_fd: int, names: list[bytes]) -> None:
        """Read the logical sizes of several `.zst` files of directory `dir_fd` into the cache
        (damaged ones are left for the caller, which reports them when it asks for that file)."""
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                self.size_of(fd, os.fstat(fd))
            except (OSError, codec.CorruptError):
                continue
            finally:
                os.close(fd)

    def remember_size(self, st: os.stat_result, size: int) -> None:
        self.decoders.indexes.remember_size(codec.identity_of(st), size)

    # ----------------------------------------------------------------- renames
    def set_aside(self, parent: bytes, name: bytes, *, dir_fd: int | None = None) -> bytes | None:
        """Rename `parent/name` (`name` in `dir_fd`, if given), if it exists, to a hidden name
        that nothing removes (a kept leftover whose plain sibling went); returns the new name."""
        kept = KEPT_PREFIX + os.urandom(6).hex().encode() + b"." + name[-100:]
        if dir_fd is None:
            at, old, new = self.root_fd, join(parent, name), join(parent, kept)
        else:
            at, old, new = dir_fd, name, kept
        try:
            rename_at(at, old, at, new, RENAME_NOREPLACE)
        except OSError as e:
            if no_zst_form(e):  # (only `.zst` forms are set aside)
                return None
            raise
        log.warning("%s: a leftover that differs from its plain file is kept as %s",
                    os.fsdecode(join(parent, name)), os.fsdecode(kept))
        return kept

    def moved_representation(self, old: bytes, new: bytes) -> bytes | None:
        """If directory `old` were renamed to `new`, the first `.zst` inside it (path under `old`)
        that would change between being a file's compressed form and a file of its own (the
        patterns can depend on the path); None if nothing would."""
        for d, entries in self.walk(old):
            moved = new + d[len(old):]
            for n, st in entries:
                if (n.endswith(ZST_SUFFIX_B) and stat.S_ISREG(st.st_mode)
                        and self.rules.is_representation(d, n)
                        != self.rules.is_representation(moved, n)):
                    return join(d, n)
        return None

    # ----------------------------------------------------------------- directories
    def open_dir(self, path: bytes) -> int:
        """A descriptor of directory `path`, resolved beneath the store root following no
        symlink at any component (a directory swapped for a link, or a link left where a
        directory was moved to another disk, is refused with ELOOP/EXDEV, never followed)."""
        global _openat2_missing
        if path in (b".", b""):
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        if not _openat2_missing:
            how = _OpenHow(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                           RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
            fd = _syscall(SYS_OPENAT2, self.root_fd, path, ctypes.byref(how),
                          ctypes.sizeof(how))
            if fd >= 0:
                return int(fd)
            err = ctypes.get_errno()
            if err != errno.ENOSYS:
                raise OSError(err, os.strerror(err), path)
            _openat2_missing = True
        return self._walk_to(path)

    def _walk_to(self, path: bytes) -> int:
        """`open_dir` without openat2: one component at a time, O_NOFOLLOW each."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            for part in path.split(b"/"):
                if part in (b"", b"."):
                    continue
                if part == b"..":
                    raise OSError(errno.EXDEV, "path leaves the store", path)
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ----------------------------------------------------------------- promotion
    def promote(self, parent: bytes, name: bytes, *, empty: bool = False,
                expect: tuple[int, int] | None = None) -> os.stat_result:
        """Turn `name.zst` in directory `parent` into plain `name`, atomically; return the plain
        file's stat. See `promote_at`."""
        dir_fd = self.open_dir(parent)
        try:
            return self.promote_at(dir_fd, name, empty=empty, expect=expect)
        finally:
            os.close(dir_fd)

    def promote_at(self, dir_fd: int, name: bytes, *, empty: bool = False,
                   expect: tuple[int, int] | None = None) -> os.stat_result:
        """Turn `name.zst` in the directory `dir_fd` into plain `name`, atomically.

        Decode into a temp file beside it, copy mode/owner/xattrs/times, fsync, rename over the
        plain name, fsync the directory, then remove the `.zst`. Everything is relative to the
        directory descriptor, so a rename of the directory meanwhile changes nothing. With
        `expect` (device, inode), the `.zst` must be that file (else Changed). A crash at any
        point leaves either the `.zst` alone or a complete plain file (plus a `.zst` leftover
        that recovery removes). With `empty`, the content is not decoded (the caller is
        truncating it to zero anyway).
        """
        zname = zst_name(name)
        src = os.open(zname, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            st = os.fstat(src)
            if expect is not None and (st.st_dev, st.st_ino) != expect:
                raise Changed(f"{name!r}: the compressed file was replaced")
            with self._temp_in(dir_fd, name) as (tmp_name, tmp):
                if not empty:
                    codec.decompress_file(src, tmp, threads=PROMOTE_THREADS,
                                          decoders=self.decoders)
                copy_metadata(src, tmp, st)
                os.fsync(tmp)
                rename_at(dir_fd, tmp_name, dir_fd, name, RENAME_NOREPLACE)
        finally:
            os.close(src)
        os.fsync(dir_fd)
        os.unlink(zname, dir_fd=dir_fd)
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    @contextlib.contextmanager
    def _temp_in(self, dir_fd: int, name: bytes) -> Iterator[tuple[bytes, int]]:
        """A new temp file in `dir_fd`, removed again unless the body renamed it away."""
        tmp_name = temp_name(name)
        fd = os.open(
            tmp_name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            yield tmp_name, fd
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- compression
    def begin_swap(self, path: bytes) -> Swap:
        """Decide on compressing plain `path` (see `begin_swap_at`)."""
        return self.begin_swap_at(path, self.open_dir(split(path)[0]))

    def adoptable(self, parent: bytes, name: bytes, st: os.stat_result) -> bool:
        """May this backing `NAME.zst` be re-encoded into zstfs's format (if it is not in it
        yet)? A regular file with one link that represents a compressible name."""
        return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                and self.rules.is_representation(parent, name))

    def foreign(self, path: bytes) -> bool:
        """True if the `.zst` at `path` is not in zstfs's own format (reads headers only)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                         dir_fd=self.root_fd)
        except OSError:
            return False
        try:
            return not codec.is_native(fd, self.params)
        finally:
            os.close(fd)

    def begin_swap_at(
        self,
        path: bytes,
        dir_fd: int,
        *,
        expect: os.stat_result | None = None,
        abandon: Callable[[], bool] | None = None,
        adopt: bool = False,
    ) -> Swap:
        """Open the plain file `path` names in the directory `dir_fd` (resolved beneath the
        root, no symlinks: `open_dir`) and take a write lease on it. Raises Busy if any process
        has it open or mapped, Changed if it is not (`expect`, if given) an eligible file.
        With `adopt`, `path` is a foreign `NAME.zst` to re-encode (see `adopt_swap`).
        The Swap owns `dir_fd` from here on; the caller must `end_swap` what this returns."""
        name = split(path)[1]
        try:
            src = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                          dir_fd=dir_fd)
        except BlockingIOError:
            os.close(dir_fd)
            raise Busy(f"{path!r} is leased by another process") from None
        except FileNotFoundError:
            os.close(dir_fd)
            raise Changed(f"{path!r} was removed or renamed") from None
        except BaseException:
            os.close(dir_fd)
            raise
        swap = Swap(path, dir_fd, name, src, os.fstat(src),
                    lease=leases.READ if adopt else leases.WRITE)
        try:
            ok = (self.adoptable if adopt else self.eligible)(split(path)[0], name, swap.source)
            if not ok:
                raise Changed(f"{path!r} is not an eligible file")
            if expect is not None and full_identity(expect) != full_identity(swap.source):
                raise Changed(f"{path!r} changed since it was chosen")
            try:
                if not leases.take(src, swap.lease):
                    raise Busy(f"{path!r} is open in another process")
            except leases.Unsupported as e:
                self.accounting.fell_back(os.fsdecode(path), str(e))
                swap.leased = False
                if leases.open_elsewhere(swap.source, frozenset({src})):
                    raise Busy(f"{path!r} is open in another process") from None
            self.check_swap(swap, abandon)
        except BaseException:
            self.end_swap(swap)
            raise
        return swap

    def leftover_superseded(self, swap: Swap) -> bool:
        """True if the `NAME.zst` beside the file being swapped holds nothing the plain file
        lacks (it decodes to a prefix of it: an earlier swap's, interrupted after its rename)."""
        try:
            zfd = os.open(zst_name(swap.name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                          dir_fd=swap.dir_fd)
        except OSError:
            return False
        try:
            return _decodes_to_prefix(zfd, swap.src_fd, self.decoders)
        finally:
            os.close(zfd)

    def check_swap(self, swap: Swap, abandon: Callable[[], bool] | None = None) -> None:
        """Raise Changed (Busy) unless the swap may go on: nobody asked to abandon it, our lease
        is intact (nobody started opening the file) and the file still has its name."""
        if abandon is not None and abandon():
            raise Abandoned(f"{swap.path!r} was opened, removed or renamed through the mount")
        if swap.leased and not leases.intact(swap.src_fd, swap.lease):
            raise Busy(f"{swap.path!r} was opened by another process")
        if os.fstat(swap.src_fd).st_nlink == 0:
            raise Changed(f"{swap.path!r} was removed")

    def compress_swap(
        self,
        swap: Swap,
        *,
        abandon: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Compress the leased file into a verified temp `.zst` beside it, with its metadata
        (the slow part of a swap, for a worker thread). Nothing visible changes."""
        with self._swap_temp(swap, abandon, progress) as (tmp, step):
            logical, stored = codec.compress_file(swap.src_fd, tmp, self.params, progress=step)
            self.check_swap(swap, abandon)
            if logical != swap.source.st_size:
                raise Changed(f"{swap.path!r} changed size while being compressed")
            codec.verify_equal(tmp, swap.src_fd,
                               progress=lambda _n: self.check_swap(swap, abandon))
            self._seal_temp(swap, tmp, logical, stored, abandon)

    @contextlib.contextmanager
    def _swap_temp(
        self,
        swap: Swap,
        abandon: Callable[[], bool] | None,
        progress: Callable[[int], None] | None,
    ) -> Iterator[tuple[int, Callable[[int], None]]]:
        """The swap's temp file beside the source (removed by `end_swap`), and the progress
        callback that checks, between frames, that the swap may go on."""

        def step(done: int) -> None:
            self.check_swap(swap, abandon)
            if progress is not None:
                progress(done)

        swap.temp = temp_name(swap.name)
        tmp = os.open(swap.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                      | os.O_NOFOLLOW, 0o600, dir_fd=swap.dir_fd)
        try:
            yield tmp, step
        finally:
            os.close(tmp)

    def _seal_temp(self, swap: Swap, tmp: int, logical: int, stored: int,
                   abandon: Callable[[], bool] | None) -> None:
        """The verified temp gets the source's metadata (all of it, or an error) and is made
        durable."""
        self.check_swap(swap, abandon)
        copy_metadata(swap.src_fd, tmp, swap.source)
        os.fsync(tmp)
        self.remember_size(os.fstat(tmp), logical)
        swap.logical, swap.stored = logical, stored

    def adopt_swap(
        self,
        swap: Swap,
        *,
        abandon: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
        max_window: int = codec.ZSTD_DEFAULT_WINDOW,
    ) -> bool:
        """Re-encode the leased foreign `.zst` into a verified temp in zstfs's format, with its
        metadata. False (nothing done) if it is in our format already; Unadoptable if it is
        damaged or needs a window wider than `max_window`."""
        if codec.is_native(swap.src_fd, self.params):
            return False
        with self._swap_temp(swap, abandon, progress) as (tmp, step):
            try:
                logical, stored = codec.reencode(swap.src_fd, tmp, self.params, progress=step,
                                                 max_window=max_window)
                self.check_swap(swap, abandon)
                codec.verify_reencoded(tmp, swap.src_fd, max_window=max_window)
            except codec.CorruptError as e:
                raise Unadoptable(str(e)) from None
            self._seal_temp(swap, tmp, logical, stored, abandon)
        return True

    def _still_there(self, swap: Swap, abandon: Callable[[], bool] | None) -> os.stat_result:
        """The swap may go on (`check_swap`) and its name still holds the very file that was
        read: same device, inode, size, mtime, ctime, one link. Returns the file's stat."""
        self.check_swap(swap, abandon)
        try:
            current = os.stat(swap.name, dir_fd=swap.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise Changed(f"{swap.path!r} was removed or renamed") from None
        now = os.fstat(swap.src_fd)
        if not (full_identity(current) == full_identity(now) == full_identity(swap.source)):
            raise Changed(f"{swap.path!r} changed since it was read")
        return now

    def publish_adopt(
        self, swap: Swap, *, abandon: Callable[[], bool] | None = None
    ) -> os.stat_result:
        """Replace the foreign `.zst` with its re-encoded temp, if the name still holds the
        file that was read and no plain file has appeared beside it. An opener that was
        waiting on the lease gets the old file, whose content is the same. Returns the stat."""
        self._still_there(swap, abandon)
        if _exists_at(swap.dir_fd, swap.name[: -len(b".zst")]):
            raise PairExists(f"{swap.path!r}: a plain file appeared beside it")
        rename_at(swap.dir_fd, swap.temp, swap.dir_fd, swap.name)
        swap.temp = b""
        os.fsync(swap.dir_fd)
        return os.stat(swap.name, dir_fd=swap.dir_fd, follow_symlinks=False)

    def adopt(self, path: bytes, *, progress: Callable[[int], None] | None = None,
              max_window: int = codec.ZSTD_DEFAULT_WINDOW) -> Swap | None:
        """Re-encode a foreign `.zst` at once, for offline use; None if it is ours already."""
        swap = self.begin_swap_at(path, self.open_dir(split(path)[0]), adopt=True)
        try:
            if not self.adopt_swap(swap, progress=progress, max_window=max_window):
                return None
            self.publish_adopt(swap)
            return swap
        finally:
            self.end_swap(swap)

    def publish_swap(
        self, swap: Swap, *, abandon: Callable[[], bool] | None = None, replace: bool = False
    ) -> os.stat_result:
        """Install the verified `.zst` and remove the plain file, acting only on the file that
        was compressed: the name must still hold it (device, inode, size, mtime, ctime, one
        link) and the lease must still be intact. Returns the `.zst`'s stat.

        The plain inode keeps a hidden second name until, after the unlink, the lease is known
        unbroken: an opener that resolved the plain name just before the unlink blocks on the
        lease, and then gets the plain file back under its name (the swap is undone) instead
        of an unlinked inode that nobody would ever read again. With `replace`, an existing
        `NAME.zst` (a leftover the caller checked holds nothing the plain file lacks) is
        replaced; else it raises PairExists.
        """
        now = self._still_there(swap, abandon)
        if not swap.leased and leases.open_elsewhere(now, frozenset({swap.src_fd})):
            raise Busy(f"{swap.path!r} was opened by another process")
        zname = zst_name(swap.name)
        if not replace and _exists_at(swap.dir_fd, zname):
            raise PairExists(f"{swap.path!r}: a .zst of it already exists")
        keep = temp_name(swap.name)
        os.link(swap.name, keep, src_dir_fd=swap.dir_fd, dst_dir_fd=swap.dir_fd,
                follow_symlinks=False)
        done = False
        try:
            try:
                rename_at(swap.dir_fd, swap.temp, swap.dir_fd, zname,
                          0 if replace else RENAME_NOREPLACE)
            except FileExistsError:
                raise PairExists(f"{swap.path!r}: a .zst of it already exists") from None
            swap.temp = b""
            zst_st = os.stat(zname, dir_fd=swap.dir_fd, follow_symlinks=False)
            os.fsync(swap.dir_fd)  # the .zst is durable before the plain file goes
            os.unlink(swap.name, dir_fd=swap.dir_fd)
            if swap.leased:
                time.sleep(LEASE_GRACE)
            if (swap.leased and not leases.intact(swap.src_fd)) or (
                    not swap.leased and leases.open_elsewhere(now, frozenset({swap.src_fd}))):
                self._undo_publish(swap, keep, zname)
                raise Busy(f"{swap.path!r} was opened while its swap was published")
            done = True
        finally:
            self._drop_keep(swap, keep, done)
        if swap.leased and not leases.intact(swap.src_fd, swap.lease):
            # An opener resolved the name before the unlink yet reached the lease only after
            # the grace: it will get the unlinked inode. Nothing to restore it with; say so.
            log.error("%s: a process opened it in the last instant of its swap; what it "
                      "writes through that descriptor is not in the store",
                      os.fsdecode(swap.path))
        return zst_st

    def _drop_keep(self, swap: Swap, keep: bytes, done: bool) -> None:
        """Remove the hidden second link, unless it became the plain file's only name in a swap
        that did not finish (an error while undoing it): then it is set aside where recovery
        keeps it."""
        try:
            kst = os.stat(keep, dir_fd=swap.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # renamed back to its name by the undo
        if done or kst.st_nlink > 1:
            os.unlink(keep, dir_fd=swap.dir_fd)
            return
        kept = KEPT_PREFIX + os.urandom(6).hex().encode() + b"." + swap.name[-100:]
        rename_at(swap.dir_fd, keep, swap.dir_fd, kept, RENAME_NOREPLACE)
        log.error("%s: its swap failed half way; the plain file is kept as %s",
                  os.fsdecode(swap.path), os.fsdecode(kept))

    def _undo_publish(self, swap: Swap, keep: bytes, zname: bytes) -> None:
        """Someone is opening the plain inode we just unlinked: give it its name back (plain
        wins, and it holds the same bytes as the `.zst`, which goes)."""
        try:
            rename_at(swap.dir_fd, keep, swap.dir_fd, swap.name, RENAME_NOREPLACE)
        except FileExistsError:
            # A new file took the name in between: keep the old one where recovery keeps it.
            kept = KEPT_PREFIX + os.urandom(6).hex().encode() + b"." + swap.name[-100:]
            rename_at(swap.dir_fd, keep, swap.dir_fd, kept, RENAME_NOREPLACE)
            log.error("%s: opened during its swap while a new file took its name; the old "
                      "file is kept as %s", os.fsdecode(swap.path), os.fsdecode(kept))
            return
        os.fsync(swap.dir_fd)
        os.unlink(zname, dir_fd=swap.dir_fd)

    def end_swap(self, swap: Swap) -> None:
        """Remove what is left of a swap (its temp), give up the lease, close descriptors."""
        if swap.temp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(swap.temp, dir_fd=swap.dir_fd)
            swap.temp = b""
        if swap.leased:
            leases.release(swap.src_fd)
        for fd in (swap.src_fd, swap.dir_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        swap.src_fd = swap.dir_fd = -1

    def swap(self, path: bytes, *, progress: Callable[[int], None] | None = None,
             min_saving: float = 0.0) -> Swap | None:
        """The whole swap at once, for offline use (no mount): returns the finished Swap, or
        None if compression saved less than `min_saving` (the file stays plain)."""
        swap = self.begin_swap(path)
        try:
            self.compress_swap(swap, progress=progress)
            if swap.stored > swap.logical * (1 - min_saving):
                return None
            self.publish_swap(swap)
            return swap
        finally:
            self.end_swap(swap)

    # ----------------------------------------------------------------- census
    def census(self) -> Census:
        """Count plain and compressed files and their logical and stored bytes (a walk; the
        `.zst` sizes come from the size cache or their seek tables, never from decoding)."""
        c = Census()
        for d, entries in self.walk():
            names = {n for n, _ in entries}
            for n, st in entries:
                if n.startswith(KEPT_PREFIX):
                    c.kept_files += 1  # set aside, never removed: the user should look
                if is_reserved(n) or not stat.S_ISREG(st.st_mode):
                    continue
                if self.rules.is_representation(d, n):
                    if self.rules.logical(d, n) in names:
                        continue  # a hidden leftover: the plain file is the one shown
                    c.compressed_files += 1
                    c.compressed_stored_bytes += st.st_size
                    try:
                        c.compressed_logical_bytes += self.logical_size(join(d, n), st)
                    except (codec.CorruptError, OSError):
                        c.damaged_files += 1
                        c.compressed_logical_bytes += st.st_size
                elif self.rules.compressible(d, n):
                    c.plain_files += 1
                    c.plain_bytes += st.st_size
        return c

    # ----------------------------------------------------------------- recovery
    def walk(self, path: bytes = b".") -> Iterator[tuple[bytes, list[tuple[bytes, Stat]]]]:
        """Yield (directory, [(name, stat)]) for every backing directory, top down, raw names."""
        stack = [path]
        while stack:
            d = stack.pop()
            try:
                fd = self.open_dir(d)
            except OSError:
                continue  # gone, not a directory (any more), a symlink now, unreadable
            try:
                with os.scandir(fd) as it:
                    entries = []
                    for e in it:
                        try:
                            entries.append((os.fsencode(e.name), e.stat(follow_symlinks=False)))
                        except FileNotFoundError:
                            continue
            finally:
                os.close(fd)
            yield d, entries
            stack.extend(join(d, n) for n, st in entries if stat.S_ISDIR(st.st_mode))

    def recover(self) -> Recovery:
        """Undo what an interrupted swap or promotion left: remove temp files; where both `NAME`
        and `NAME.zst` exist, keep `NAME` and remove the `.zst` once `NAME` is known complete
        (its first bytes decode-equal the `.zst`); a `.zst` that does not match is kept hidden
        and reported."""
        temps = removed = kept = 0
        pairs: list[bytes] = []
        for d, entries in self.walk():
            names = {n for n, _ in entries}
            for n, st in entries:
                if is_temp(n) and stat.S_ISREG(st.st_mode):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(join(d, n), dir_fd=self.root_fd)
                        temps += 1
                elif self.rules.is_representation(d, n) and self.rules.logical(d, n) in names:
                    if self._plain_supersedes(join(d, self.rules.logical(d, n)), join(d, n)):
                        os.unlink(join(d, n), dir_fd=self.root_fd)
                        removed += 1
                    else:
                        kept += 1
                        pairs.append(join(d, self.rules.logical(d, n)))
                        log.warning(
                            "%s: both plain and .zst exist and differ; keeping both, the plain "
                            "file is shown", os.fsdecode(join(d, n)))
        if temps or removed:
            log.info("recovery: removed %d temp files and %d superseded .zst files", temps, removed)
        return Recovery(temps, removed, kept, tuple(pairs))

    def _plain_supersedes(self, plain: bytes, zpath: bytes) -> bool:
        """True if the plain file holds everything the `.zst` holds (it may have grown since)."""
        try:
            pfd = os.open(plain, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.root_fd)
        except OSError:
            return False
        try:
            zfd = os.open(zpath, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.root_fd)
        except OSError:
            os.close(pfd)
            return False
        try:
            return _decodes_to_prefix(zfd, pfd, self.decoders)
        finally:
            os.close(pfd)
            os.close(zfd)


def _decodes_to_prefix(zfd: int, pfd: int, decoders: codec.Decoders) -> bool:
    """True if the `.zst` at `zfd` decodes to a prefix of the plain file at `pfd` (which may
    have grown since). A damaged `.zst` cannot be shown to hold nothing more: False."""
    try:
        reader = codec.ZstReader(zfd, decoders)
        size = reader.size
        if os.fstat(pfd).st_size < size:
            return False
        pos = 0
        while pos < size:
            n = min(8 << 20, size - pos)
            if reader.read(pos, n) != os.pread(pfd, n, pos):
                return False
            pos += n
        return True
    except codec.CorruptError:
        return False


@dataclass(slots=True)
class Swap:
    """One swap in progress: the plain file (leased), its directory, the temp `.zst`."""

    path: bytes  # relative to the store root when the swap was decided (for messages)
    dir_fd: int  # the directory the file was in then, wherever it is now
    name: bytes
    src_fd: int
    source: os.stat_result  # the plain file when the lease was taken
    leased: bool = True  # False: the /proc scan stands in for a lease
    lease: int = leases.WRITE  # a read lease for a `.zst` being re-encoded (readers may stay)
    temp: bytes = b""
    logical: int = 0
    stored: int = 0


def _exists_at(dir_fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def rename_at(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
    if flags == 0:
        os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        return
    if _renameat2(old_dir, old, new_dir, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old, None, new)


def copy_metadata(src_fd: int, dst_fd: int, st: os.stat_result) -> None:
    """Give `dst_fd` the owner, mode, xattrs and times of `src_fd` (stat `st`), all of them or
    none: any failure raises, and the caller keeps the original file."""
    dst = os.fstat(dst_fd)
    if (dst.st_uid, dst.st_gid) != (st.st_uid, st.st_gid):
        os.fchown(dst_fd, st.st_uid, st.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src_fd)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        names = []
    for attr in names:
        os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
