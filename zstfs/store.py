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
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from zstfs import codec
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
RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


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


def join(parent: bytes, name: bytes) -> bytes:
    return name if parent == b"." else parent + b"/" + name


def split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return (parent or b"."), name


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must not change between preparing and publishing a swap."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_nlink)


class Store:
    """One backing directory, addressed through `root_fd`."""

    def __init__(
        self,
        root_fd: int,
        rules: NameRules,
        params: codec.CodecParams | None = None,
        source: str = "",
    ) -> None:
        self.root_fd = root_fd
        self.rules = rules
        self.params = params or codec.CodecParams()
        self.source = source
        self.proc_root = f"/proc/self/fd/{root_fd}".encode()
        self._lock_fd: int | None = None
        self._sizes: dict[tuple[int, int, int, int], int] = {}
        self._sizes_lock = threading.Lock()

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

    def record_lock_owner(self) -> None:
        """Write our PID into the lock file (again after a daemonizing fork)."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    # ----------------------------------------------------------------- lookups
    def lstat(self, path: bytes) -> os.stat_result:
        return os.stat(path, dir_fd=self.root_fd, follow_symlinks=False)

    def resolve(self, parent: bytes, name: bytes) -> Entry | None:
        """The backing entry for logical `name` in `parent` (plain wins), or None."""
        try:
            return Entry(name, self.lstat(join(parent, name)), False)
        except FileNotFoundError:
            pass
        if not self.rules.compressible(parent, name):
            return None
        zname = zst_name(name)
        try:
            st = self.lstat(join(parent, zname))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return Entry(zname, st, True)

    def listdir(self, path: bytes) -> list[tuple[bytes, Entry]]:
        """The logical listing of a directory: (logical name, entry), plain winning over `.zst`."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            with os.scandir(fd) as it:
                raw = [(os.fsencode(e.name), e.stat(follow_symlinks=False)) for e in it]
        finally:
            os.close(fd)
        plain: dict[bytes, Entry] = {}
        packed: dict[bytes, Entry] = {}
        for name, st in raw:
            if is_reserved(name):
                continue
            if self.rules.is_representation(path, name) and stat.S_ISREG(st.st_mode):
                packed[self.rules.logical(path, name)] = Entry(name, st, True)
            elif not self.rules.is_representation(path, name):
                plain[name] = Entry(name, st, False)
        for logical, entry in packed.items():
            plain.setdefault(logical, entry)
        return list(plain.items())

    def known_size(self, st: os.stat_result) -> int | None:
        """The logical size of a compressed file if it is known without any I/O."""
        with self._sizes_lock:
            return self._sizes.get(identity(st))

    def logical_size(self, path: bytes, st: os.stat_result) -> int:
        """Decoded size of the `.zst` at `path` (reads its seek table or frame headers, cached)."""
        key = identity(st)
        with self._sizes_lock:
            size = self._sizes.get(key)
        if size is not None:
            return size
        fd = self.open_compressed(path, st)
        try:
            size = codec.ZstReader(fd).size
        finally:
            os.close(fd)
        self.remember_size(st, size)
        return size

    def open_compressed(self, path: bytes, st: os.stat_result) -> int:
        """Open a `.zst` for reading. A small one is read ahead whole, in the background: its
        seek table, header and frames would otherwise be several small reads waiting on the disk
        one after another, on the thread that serves every request."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.root_fd)
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

    def learn_sizes(self, paths: list[bytes]) -> None:
        """Read the logical sizes of several `.zst` files into the cache (damaged ones are left
        for the caller, which reports them when it asks for that file)."""
        for path in paths:
            try:
                self.logical_size(path, self.lstat(path))
            except (OSError, codec.CorruptError):
                continue

    def remember_size(self, st: os.stat_result, size: int) -> None:
        with self._sizes_lock:
            if len(self._sizes) > 200_000:
                self._sizes.clear()
            self._sizes[identity(st)] = size

    def xattr_path(self, path: bytes) -> bytes:
        """A path to the backing file that does not go through the mount (for *xattr calls,
        which have no dir_fd form): the kernel's magic link for our root descriptor."""
        return self.proc_root if path == b"." else self.proc_root + b"/" + path

    # ----------------------------------------------------------------- renames
    def rename(self, old: bytes, new: bytes, flags: int = 0) -> None:
        if flags == 0:
            os.rename(old, new, src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd)
            return
        if _renameat2(self.root_fd, old, self.root_fd, new, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), old, None, new)

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

    def fsync_dir(self, path: bytes) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- promotion
    def promote(self, parent: bytes, name: bytes, *, empty: bool = False) -> os.stat_result:
        """Turn `name.zst` into plain `name`, atomically; return the plain file's stat.

        Decode into a temp file beside it, copy mode/owner/xattrs/times, fsync, rename over the
        plain name, fsync the directory, then remove the `.zst`. A crash at any point leaves either
        the `.zst` alone or a complete plain file (plus a `.zst` leftover that recovery removes).
        With `empty`, the content is not decoded (the caller is truncating it to zero anyway).
        """
        zpath = join(parent, zst_name(name))
        src = os.open(zpath, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            st = os.fstat(src)
            with self._temp_beside(parent, name) as (tmp_path, tmp):
                if not empty:
                    codec.decompress_file(src, tmp, threads=PROMOTE_THREADS)
                copy_metadata(src, tmp, st)
                os.fsync(tmp)
                self.rename(tmp_path, join(parent, name), RENAME_NOREPLACE)
        finally:
            os.close(src)
        self.fsync_dir(parent)
        os.unlink(zpath, dir_fd=self.root_fd)
        return self.lstat(join(parent, name))

    @contextlib.contextmanager
    def _temp_beside(self, parent: bytes, name: bytes) -> Iterator[tuple[bytes, int]]:
        """A new temp file in `parent`, removed again unless the body renamed it away."""
        tmp_path = join(parent, temp_name(name))
        fd = os.open(
            tmp_path,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=self.root_fd,
        )
        try:
            yield tmp_path, fd
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path, dir_fd=self.root_fd)
            raise
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- compression
    def prepare_compressed(
        self, path: bytes, *, progress: Callable[[int], None] | None = None
    ) -> Prepared:
        """Compress plain `path` into a verified temp `.zst` beside it (the slow part of a swap).

        Nothing visible changes; the caller publishes with `publish` (or discards) once it has
        checked, under its own lock, that nobody opened or changed the file meanwhile.
        """
        parent, name = split(path)
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.root_fd)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise Changed(f"{path!r} is not a regular file")
            with self._temp_beside(parent, name) as (tmp_path, tmp):
                logical, stored = codec.compress_file(src, tmp, self.params, progress=progress)
                if logical != st.st_size:
                    raise Changed(f"{path!r} changed size while being compressed")
                try:
                    codec.verify_equal(tmp, src)
                except codec.CorruptError:
                    # A write through the mount between compressing and verifying (allowed:
                    # the file is not locked yet) is a change to retry, not a broken codec.
                    if identity(os.fstat(src)) != identity(st):
                        raise Changed(f"{path!r} changed while being verified") from None
                    raise
                copy_metadata(src, tmp, st)
                os.fsync(tmp)
                tmp_st = os.fstat(tmp)
                self.remember_size(tmp_st, logical)
                return Prepared(path, tmp_path, st, logical, stored)
        finally:
            os.close(src)

    def publish(self, prepared: Prepared) -> os.stat_result:
        """Install a prepared `.zst` and remove the plain file (for offline use: no mount, no
        concurrent opens). The mounted compactor calls the three steps itself, under its lock."""
        zst_st = self.install(prepared)
        self.fsync_dir(split(prepared.path)[0])
        self.finish(prepared)
        return zst_st

    def install(self, prepared: Prepared) -> os.stat_result:
        """Rename the verified temp to `NAME.zst` if the plain file is still exactly what was
        compressed; else remove the temp and raise Changed. Until `finish`, plain still wins."""
        parent, name = split(prepared.path)
        zpath = join(parent, zst_name(name))
        try:
            try:
                current = self.lstat(prepared.path)
            except FileNotFoundError:
                raise Changed(f"{prepared.path!r} was removed or renamed") from None
            if identity(current) != identity(prepared.source):
                raise Changed(f"{prepared.path!r} changed while being compressed")
            self.rename(prepared.temp, zpath, RENAME_NOREPLACE)
        except BaseException:
            self.discard(prepared)
            raise
        return self.lstat(zpath)

    def finish(self, prepared: Prepared) -> None:
        """The last step of a swap: the plain file goes, the `.zst` (already durable) shows."""
        os.unlink(prepared.path, dir_fd=self.root_fd)

    def discard(self, prepared: Prepared) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(prepared.temp, dir_fd=self.root_fd)

    # ----------------------------------------------------------------- census
    def census(self) -> Census:
        """Count plain and compressed files and their logical and stored bytes (a walk; the
        `.zst` sizes come from the size cache or their seek tables, never from decoding)."""
        c = Census()
        for d, entries in self.walk():
            names = {n for n, _ in entries}
            for n, st in entries:
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
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
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
                        log.warning(
                            "%s: both plain and .zst exist and differ; keeping both, the plain "
                            "file is shown", os.fsdecode(join(d, n)))
        if temps or removed:
            log.info("recovery: removed %d temp files and %d superseded .zst files", temps, removed)
        return Recovery(temps, removed, kept)

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
            reader = codec.ZstReader(zfd)
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
            # A damaged .zst beside a plain file holds nothing the plain file needs.
            return True
        finally:
            os.close(pfd)
            os.close(zfd)


@dataclass(frozen=True, slots=True)
class Prepared:
    path: bytes  # the plain file
    temp: bytes  # the verified compressed temp beside it
    source: os.stat_result  # the plain file as it was read
    logical: int
    stored: int


def copy_metadata(src_fd: int, dst_fd: int, st: os.stat_result) -> None:
    """Give `dst_fd` the owner, mode, xattrs and times of `src_fd` (stat `st`)."""
    if os.geteuid() == 0 or st.st_uid == os.geteuid():
        with contextlib.suppress(PermissionError):
            os.fchown(dst_fd, st.st_uid, st.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src_fd)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        names = []
    for attr in names:
        with contextlib.suppress(OSError):
            os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
