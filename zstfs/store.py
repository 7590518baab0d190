"""The backing directory of a zstfs store.

Every operation is relative to one directory descriptor opened before the mount, so the daemon
never resolves a path through its own mountpoint (it is normally mounted over that very directory).
Paths here are `bytes` relative to the store root (`b"."` is the root itself).

This module is synchronous and thread-safe: the filesystem layer calls cheap metadata operations
inline and runs the bulk ones (promote) in worker threads. It knows the on-disk rules (plain
wins, temp names, atomic publication) but nothing about FUSE or open handles. The swap
(plain → `.zst`, and adoption of foreign `.zst` files) is `swap.py`'s, built on the primitives
here (`open_dir`, `open_temp`, `rename_at`, `copy_metadata`, `decodes_to_prefix`).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

from zstfs import codec, leases, sizenote
from zstfs.names import (
    KEPT_PREFIX,
    LOCK_NAME,
    ZST_SUFFIX_B,
    NameRules,
    is_own_xattr,
    is_reserved,
    is_temp,
    kept_name,
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


SYS_GETXATTRAT: Final = 464  # Linux 6.13+; the same number on every architecture
AT_SYMLINK_NOFOLLOW: Final = 0x100
AT_EMPTY_PATH: Final = 0x1000


class _XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_openat2_missing = False
_getxattrat_missing = False

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


class Leased(BlockingIOError):
    """A backing file cannot be opened without waiting: a lease on it is being broken (EAGAIN
    if it ever reaches the filesystem layer's errno translation)."""

    def __init__(self, key: codec.FileKey) -> None:
        super().__init__(errno.EAGAIN, f"file {key} is leased")
        self.key = key


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

    def write_all(self, fd: int, buf: bytes, off: int) -> int:
        """Write all of `buf` at `off`, as one write(2) does on the backing filesystem. Where the
        disk fills up (a short write, then ENOSPC) while decoded copies hold space, they are
        given back once and the rest is written; what was written before an error is reported."""
        view, done, gave_back = memoryview(buf), 0, False
        while done < len(view):
            try:
                n = os.pwrite(fd, view[done:], off + done)
            except OSError as e:
                if e.errno == errno.ENOSPC and not gave_back:
                    gave_back = True
                    if self.give_back_space():
                        continue
                if done:
                    return done
                raise
            if n == 0:
                break
            done += n
        return done

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

    def getxattr_in(self, dir_fd: int, parent: bytes, name: bytes, attr: bytes) -> bytes | None:
        """Extended attribute `attr` of what `name` stands for in directory `dir_fd` (`parent`),
        as `resolve_in` finds it (the plain form, else a regular `.zst` form), without opening
        it; None where the kernel has no getxattrat."""
        try:
            return getxattrat(dir_fd, name, attr)
        except FileNotFoundError:
            if not self.rules.compressible(parent, name):
                raise
        zname = zst_name(name)
        try:
            st = os.stat(zname, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            if no_zst_form(e):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name) from None
            raise
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        return getxattrat(dir_fd, zname, attr)

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
        """Decoded size of the `.zst` at `path`: cached, noted on it, else from its seek table or
        frame headers."""
        size = self.decoders.indexes.size(codec.identity_of(st))
        if size is not None:
            return size
        fd = self.open_for_size(self.root_fd, path)
        try:
            return self.size_of(fd, st)
        finally:
            os.close(fd)

    @staticmethod
    def open_for_size(dir_fd: int, zname: bytes) -> int:
        """Open `.zst` `zname` of `dir_fd` to learn its size (`size_of`): not `open_compressed`,
        which reads a small file ahead whole for a reader; a size needs its note or its seek
        table."""
        return os.open(zname, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)

    def size_of(self, fd: int, st: os.stat_result) -> int:
        """Decoded size of the open `.zst` `fd`, whose stat is `st`: the one way a size is
        learnt. Cached by identity; else the note on the file (`sizenote`: one xattr read, no
        data read; checked against the frames when a reader builds the index); else its seek
        table or frame headers, and then noted on it for the next mount. Raises the damage
        found in it, now or before (both kept by the decoders' index cache)."""
        identity = codec.identity_of(st)
        size = self.decoders.indexes.size(identity)
        if size is not None:
            return size
        size = sizenote.read(fd, st)
        if size is not None:
            self.decoders.indexes.remember_noted(identity, size)
            return size
        size = codec.ZstReader(fd, self.decoders).size
        sizenote.write(fd, st, size)
        return size

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
            raise Leased(codec.key_of(st)) from None
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

    def learn_sizes(self, dir_fd: int, names: list[bytes]) -> None:
        """Read the logical sizes of several `.zst` files of directory `dir_fd` into the cache
        (damaged ones are left for the caller, which reports them when it asks for that file)."""
        for name in names:
            try:
                fd = self.open_for_size(dir_fd, name)
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
        kept = kept_name(name)
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

    def remove_forms(self, dir_fd: int, parent: bytes, name: bytes) -> bool:
        """Remove every backing form of logical `name` in directory `dir_fd` (`parent`): the
        plain file and, where the patterns take the name, its `.zst`. True if any was there."""
        removed = False
        forms = [name, zst_name(name)] if self.rules.compressible(parent, name) else [name]
        for form in forms:
            try:
                os.unlink(form, dir_fd=dir_fd)
                removed = True
            except OSError as e:
                if not (e.errno == errno.ENOENT or (form != name and no_zst_form(e))):
                    raise
        return removed

    def rename_entry(self, old_fd: int, old_dir: bytes, old_name: bytes, src: Entry,
                     new_fd: int, new_dir: bytes, new_name: bytes, dst: Entry | None, *,
                     noreplace: bool = False) -> None:
        """Rename logical `old_name` (backing entry `src`, in `old_fd`, i.e. `old_dir`) to
        `new_name` (in `new_fd`, `new_dir`; `dst` is what that name holds), keeping its
        representation: a `.zst` is renamed to the new name's `.zst`. The caller makes `src`
        plain first where the new name has no `.zst` form."""
        target = zst_name(new_name) if src.compressed else new_name
        if dst is not None and dst.compressed != src.compressed:
            # Replace both forms of the destination. Remove the other form first, so that
            # no moment shows the old plain file winning over the new compressed one.
            if stat.S_ISDIR(src.st.st_mode) != stat.S_ISDIR(dst.st.st_mode):
                code = errno.EISDIR if stat.S_ISDIR(dst.st.st_mode) else errno.ENOTDIR
                raise OSError(code, os.strerror(code))
            os.unlink(dst.name, dir_fd=new_fd)
        rename_at(old_fd, src.name, new_fd, target, RENAME_NOREPLACE if noreplace else 0)
        if not src.compressed and self.rules.compressible(old_dir, old_name):
            # A differing leftover `.zst` that recovery kept hidden behind the plain file
            # would show its old content under the old name: keep it aside, hidden.
            self.set_aside(old_dir, zst_name(old_name), dir_fd=old_fd)
        if self.rules.compressible(new_dir, new_name) and not src.compressed:
            # A stale compressed form of the destination would resurface if the plain one went.
            try:
                os.unlink(zst_name(new_name), dir_fd=new_fd)
            except OSError as e:
                if not no_zst_form(e):
                    raise

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
            if expect is not None and codec.key_of(st) != expect:
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
        tmp_name, fd = open_temp(dir_fd, name)
        try:
            yield tmp_name, fd
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)

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
            return decodes_to_prefix(zfd, pfd, self.decoders)
        finally:
            os.close(pfd)
            os.close(zfd)


def decodes_to_prefix(zfd: int, pfd: int, decoders: codec.Decoders) -> bool:
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


def open_temp(dir_fd: int, name: bytes) -> tuple[bytes, int]:
    """A new temp file beside `name` in `dir_fd` (mode 0600, a name recovery removes): its name
    and a read-write descriptor."""
    tmp_name = temp_name(name)
    fd = os.open(tmp_name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600, dir_fd=dir_fd)
    return tmp_name, fd


def getxattrat(dir_fd: int, name: bytes, attr: bytes) -> bytes | None:
    """Extended attribute `attr` of `name` in directory `dir_fd` (a symlink's own, never its
    target's; `name` empty: of `dir_fd` itself, if it is not `O_PATH`) in one system call,
    without opening it; None where the kernel has no getxattrat (before 6.13). `ls -l` asks
    two of these for every file it lists; opening the file `O_PATH` and reading through
    `/proc/self/fd` cost three times as much (11 µs against 4)."""
    global _getxattrat_missing
    if _getxattrat_missing:
        return None
    flags = AT_SYMLINK_NOFOLLOW if name else AT_EMPTY_PATH
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        args = _XattrArgs(ctypes.addressof(buf), size, 0)
        n = _syscall(SYS_GETXATTRAT, dir_fd, name, flags, attr, ctypes.byref(args),
                     ctypes.c_size_t(ctypes.sizeof(args)))
        if n >= 0:
            return buf.raw[:n]
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _getxattrat_missing = True
            return None
        if err != errno.ERANGE:
            raise OSError(err, os.strerror(err), name)
        args = _XattrArgs(0, 0, 0)  # too small: ask for the size (it may grow again meanwhile)
        n = _syscall(SYS_GETXATTRAT, dir_fd, name, flags, attr, ctypes.byref(args),
                     ctypes.c_size_t(ctypes.sizeof(args)))
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), name)
        size = max(int(n), 1)


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
        if not is_own_xattr(os.fsencode(attr)):  # a size note names the source, not the copy
            os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
