"""The FUSE operations of zstfs: a protocol adapter only.

What the store looks like is defined by `store.py` (backing names, plain-wins, promotion) and
`openfiles.py` (inodes, open counts, per-file locks, the promote and swap steps); here we
translate between those and pyfuse3's operations interface: inode numbers and EntryAttributes
in, FUSEErrors out.

Concurrency contract: every handler runs on the trio thread. Table updates happen between awaits;
a handler that awaits (promotion, decoding, fsync) re-reads what it needs afterwards. Namespace
changes and opens of a file take that file's lock, so they wait for a promotion or a swap of it;
an open, truncation or removal of a file first abandons its compaction (`OpenFiles.settle`).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileInfo, FUSEError, InodeT

from zstfs import codec, privileges
from zstfs.names import NAME_MAX, STATUS_XATTR, zst_name
from zstfs.openfiles import ROOT_INODE, Node, OpenFiles
from zstfs.stats import Stats
from zstfs.store import Entry, Leased, join, no_zst_form, rename_at, split

log = logging.getLogger(__name__)

#: Entry and attribute cache time. Every change goes through the mount, so the kernel's cache
#: stays right; swaps (which change only st_blocks and ctime) invalidate the inode explicitly.
CACHE_TIMEOUT = 60.0
_DOTS = {b".": 0, b"..": 1}
#: Directories whose listing in progress is kept for its next pages (see `readdir`), and the
#: most names they hold together (the last one is kept whatever its size).
LISTINGS_KEPT = 16
LISTED_NAMES_KEPT = 100_000
#: Entries one readdir call looks at: more than the kernel's largest reply (128 KiB) can hold.
READDIR_BATCH = 1024


def _cookie(name: bytes) -> int:
    """A directory offset for `name` that does not depend on the other names: 3 and up (0-2
    are the start, `.` and `..`), below 2**62 + 3 (an off_t with room for `+ 1`)."""
    return 3 + (int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 2)
BLKSIZE = 128 * 1024
#: Compressed files up to this logical size are decoded on the trio thread: a thread hop costs
#: more than decoding 1 MiB (~1 ms), and `grep -r` over many small files is bound by per-request
#: overhead.
INLINE_DECODE_LIMIT = 1 << 20
#: fsync of a plain file up to this size runs on the trio thread: a thread hop costs more than
#: fsync of a small file (measured here: 190 µs vs 60-130 µs), and SQLite syncs its WAL at every
#: commit. Bigger files, and a handle whose last fsync took longer than INLINE_FSYNC_SLOW
#: seconds, sync on a worker thread, so no request waits long behind another's sync.
INLINE_FSYNC_LIMIT = 8 << 20
INLINE_FSYNC_SLOW = 0.02
#: `Node.seen` after a passthrough writer: no cached open keeps the pages it finds.
NEVER_SEEN = (-1, -1)
#: Extended attributes on the mount root under this prefix are zstfs's own (`user.zstfs.status`).
RESERVED_XATTR_PREFIX = b"user.zstfs."
#: How long the status document given to a thread bounds the length of its next one.
STATUS_PAIR_SECONDS = 1.0
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | getattr(os, "O_DIRECT", 0)


def _negative_entry() -> pyfuse3.EntryAttributes:
    """The answer to a lookup of an absent name: inode 0, cached like a positive entry."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = InodeT(0)
    a.entry_timeout = CACHE_TIMEOUT
    return a


_NEGATIVE = _negative_entry()

P = ParamSpec("P")
R = TypeVar("R")


def codec_problem(e: codec.CorruptError) -> str:
    what = "cannot decode .zst" if isinstance(e, codec.DecodeLimitError) else "damaged .zst"
    return f"{what}: {e}"


def translate_errors(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """The one place where exceptions become errnos: OSError → its errno, damage → EIO.

    Anything else is a bug: it is logged with its traceback and answered with EIO rather than
    taking the whole mount down (an uncaught exception in a pyfuse3 handler ends `main()`).
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except codec.CorruptError as e:
            ops = cast(Operations, args[0])
            ops.stats.corrupt_reads += 1
            ops.stats.error(getattr(e, "zstfs_path", "?"), codec_problem(e))
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


def _linked(entry: Entry | None) -> bool:
    """True if the file `entry` names has other names too (so removing this one leaves it)."""
    return entry is not None and not stat.S_ISDIR(entry.st.st_mode) and entry.st.st_nlink > 1


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return release >= (major, minor)


#: Appends are sent to the daemon as direct I/O (FOPEN_DIRECT_IO) where the kernel then drops
#: the written range from the page cache, so that other openers' cached pages never go stale:
#: Linux 6.13 (fuse_direct_io invalidates for every FOPEN_DIRECT_IO write; earlier kernels only
#: with FUSE_DIRECT_IO_ALLOW_MMAP, or not at all).
DIRECT_APPENDS = _kernel_at_least(6, 13)


def _file_info(fh: int, keep_cache: bool, backing_id: int, direct_io: bool = False) -> FileInfo:
    if not backing_id:  # (a stock pyfuse3's FileInfo has no backing_id)
        return FileInfo(fh=FileHandleT(fh), keep_cache=keep_cache, direct_io=direct_io)
    # The kernel takes no open flags but its own beside passthrough (FOPEN_PASSTHROUGH_MASK).
    return FileInfo(fh=FileHandleT(fh), keep_cache=False,  # type: ignore[call-arg]
                    backing_id=backing_id)


class Handle:
    """One open file description: a plain backing fd, or a `.zst` fd with its reader."""

    __slots__ = ("backing_id", "fd", "flags", "generation", "inline", "node", "reader",
                 "retired", "slow_sync", "wrote")

    def __init__(self, node: Node, fd: int, flags: int, reader: codec.ZstReader | None,
                 inline: bool = False) -> None:
        self.node = node
        self.fd = fd
        self.flags = flags
        self.reader = reader
        self.inline = inline  # small compressed file: decode without a thread hop
        self.generation = node.generation
        self.wrote = False
        #: Opened in passthrough mode with this backing id (0: not): the kernel reads, writes
        #: and maps the backing file itself, and no READ or WRITE of this handle reaches here.
        self.backing_id = 0
        self.slow_sync = False  # an inline fsync of it was slow: the next ones go to a thread
        #: Descriptors of earlier representations: a read on a worker thread may still be
        #: using one, so they are closed at release, not when the handle moves on.
        self.retired: list[int] = []


class DirHandle:
    """A directory listing, taken by the first readdir (not at opendir: the kernel may answer the
    listing from its own cache and never ask); its names are the stable offsets readdir pages
    through; what each name is *now* is looked up again when it is returned."""

    __slots__ = ("names", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.names: list[bytes] | None = None


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False  # appends must reach the backing file as the writer sent them
    # Read only by zstfs's build of pyfuse3 (contrib/pyfuse3; `pyfuse3.ZSTFS_PATCHES`), ignored by
    # a stock one. The kernel may keep directory listings: it drops one at every change made
    # through the mount, and when the directory's mtime has changed once its attributes expire
    # (CACHE_TIMEOUT), which is as long as any other change made behind the mount stays unseen;
    # zstfs's own swaps and promotions never change a listed name.
    enable_readdir_cache = True
    # Requests are read with one read(2), not spliced into a pipe first: zstfs copies every
    # write into Python anyway (BENCHMARKS.md: -25-35 % on request-bound work).
    disable_splice_read = True
    # No OPENDIR/RELEASEDIR round trips: opendir answers ENOSYS, which a kernel that supports it
    # (5.1+) takes as success for good; readdir and fsyncdir then receive the directory's inode.
    # zstfs's pyfuse3 resets this to False at INIT where the kernel does not support it.
    directories_by_inode = "directories_by_inode" in getattr(pyfuse3, "ZSTFS_PATCHES", ())
    # Files outside the patterns are opened in FUSE passthrough mode (Linux 6.9+, libfuse
    # 3.17+, and CAP_SYS_ADMIN to register a backing file): the kernel reads, writes and maps
    # the backing file itself, so a write costs no round trip through this daemon and nothing
    # written is ever held here (see _passthrough). zstfs's pyfuse3 resets this at INIT where
    # the kernel lacks it; the first refused registration turns it off for the mount.
    enable_passthrough = "enable_passthrough" in getattr(pyfuse3, "ZSTFS_PATCHES", ())
    # FUSE_HANDLE_KILLPRIV_V2 (libfuse 3.17+): no GETXATTR security.capability before every
    # write; set-uid/set-gid are cleared here where a request's kill flag says so (privileges).
    # zstfs's pyfuse3 resets this at INIT where the kernel lacks it; its presence alone has
    # the kill flags passed on (`kill_suidgid`), which direct I/O writes carry in any case.
    enable_killpriv_v2 = "enable_killpriv_v2" in getattr(pyfuse3, "ZSTFS_PATCHES", ())
    # The calls into the kernel session, replaceable so that the in-process tests can drive
    # these operations without a mount.
    readdir_reply = staticmethod(pyfuse3.readdir_reply)
    invalidate_inode = staticmethod(pyfuse3.invalidate_inode)
    passthrough_open = staticmethod(getattr(pyfuse3, "passthrough_open", lambda fd: 0))
    direct_appends = DIRECT_APPENDS
    passthrough_close = staticmethod(getattr(pyfuse3, "passthrough_close", lambda bid: None))

    def __init__(
        self,
        files: OpenFiles,
        *,
        status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        on_idle: Callable[[bytes], None] | None = None,
        on_moved: Callable[[bytes, bytes], None] | None = None,
        read_threads: int = 2,
    ) -> None:
        super().__init__()
        self.files = files
        self.store = files.store
        self.rules = files.store.rules
        self.stats: Stats = files.stats
        self.table = files.table
        files.on_swapped = self.invalidate_attrs
        self.on_moved = on_moved
        self.handles: dict[int, Handle] = {}
        self._by_node: dict[Node, list[Handle]] = {}  # the same handles, by node
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self.status_provider = status  # set by the mount once it can describe itself
        self.on_idle = on_idle
        self.read_limiter = trio.CapacityLimiter(read_threads)
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None
        self._status_given: dict[int, tuple[float, bytes]] = {}  # see _status_json
        self.root_uid = os.geteuid() == 0
        self.initialized = trio.Event()  # the kernel's INIT request has been answered (see init)
        # By inode (`directories_by_inode`): the sorted (cookie, name) listing each directory's
        # last readdir from the start took, which the next pages of that listing go through
        # (as a handle's would): a big directory is read from the disk once, not once a page.
        self._listings: collections.OrderedDict[int, list[tuple[int, bytes]]] = (
            collections.OrderedDict())
        self._listed = 0  # names in _listings

    def init(self) -> None:
        # pyfuse3 calls this while it handles the kernel's INIT request; the reply goes out as
        # this returns, before any task waiting on the event runs.
        self.initialized.set()

    # ------------------------------------------------------------------ helpers
    def _node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _path(self, node: Node) -> bytes:
        path = self.table.path(node)
        if path is None:
            raise FUSEError(errno.ENOENT)
        return path

    def _dir_path(self, ino: int) -> bytes:
        """A directory's path from the store root: for the naming rules and messages only.
        The backing store is reached through descriptors (`_dfd`), never by this path."""
        node = self._node(ino)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return self._path(node)

    def _dfd(self, ino: int) -> int:
        """The descriptor of directory `ino` (FileTable.dir_fd): names in it are resolved
        relative to it. Borrowed: valid until the next await."""
        node = self._node(ino)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return self.table.dir_fd(node)

    def _at(self, node: Node) -> tuple[int, bytes, bytes]:
        """(descriptor of its directory, that directory's path, its name) for a node with a
        name; the descriptor is borrowed until the next await."""
        if not node.links:
            raise FUSEError(errno.ENOENT)
        parent_ino, name = node.links[0]
        parent = self.table.get(parent_ino)
        if parent is None:
            raise FUSEError(errno.ENOENT)
        return self.table.dir_fd(parent), self._path(parent), name

    def _handles_of(self, node: Node) -> list[Handle]:
        """The open handles on a node (indexed: a writer's every GETXATTR asks, and a process
        may hold thousands of files open)."""
        return list(self._by_node.get(node, ()))

    def _add_handle(self, fh: int, handle: Handle) -> None:
        self.handles[fh] = handle
        self._by_node.setdefault(handle.node, []).append(handle)
        handle.node.opens += 1

    def _remove_handle(self, fh: int) -> Handle:
        handle = self.handles.pop(fh)
        held = self._by_node[handle.node]
        held.remove(handle)
        if not held:
            del self._by_node[handle.node]
        handle.node.opens -= 1
        return handle

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _check_name(self, parent_ino: int, name: bytes) -> None:
        """Names the view cannot create: zstfs's own and the `.zst` representations."""
        if not self.rules.visible(self._dir_path(parent_ino), name):
            raise FUSEError(errno.EPERM)

    async def _logical_size(self, dfd: int, parent: bytes, zname: bytes,
                            st: os.stat_result) -> int:
        """The decoded size of `.zst` `zname` in directory `dfd` (`parent`). Opened here, on
        the trio thread (the directory's descriptor is only borrowed), read in a worker."""
        size = self.store.known_size(st)
        if size is None:
            try:
                fd = self.store.open_compressed(zname, st, dir_fd=dfd)
                try:
                    size = await trio.to_thread.run_sync(
                        self.store.size_of, fd, st, limiter=self.read_limiter)
                finally:
                    os.close(fd)
            except codec.CorruptError as e:
                # A damaged file still lists (with its stored size); reading it gives EIO.
                # (named like reads name it: one line per file)
                self.stats.error(os.fsdecode(join(parent, self.rules.logical(parent, zname))),
                                 codec_problem(e))
                self.store.remember_size(st, st.st_size)
                size = st.st_size
        return size

    async def _resolve(self, parent_ino: int, name: bytes) -> tuple[Entry, int]:
        """The entry for a logical name in directory `parent_ino` and its logical size, or
        ENOENT."""
        parent = self._dir_path(parent_ino)
        entry = self.store.resolve_in(self._dfd(parent_ino), parent, name)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        if not entry.compressed:
            return entry, entry.st.st_size
        size = await self._logical_size(self._dfd(parent_ino), parent, entry.name, entry.st)
        # The await let other requests run: the directory may have been renamed or dropped.
        parent = self._dir_path(parent_ino)
        again = self.store.resolve_in(self._dfd(parent_ino), parent, name)
        if again is None:
            raise FUSEError(errno.ENOENT)
        if again.compressed and (again.st.st_ino, again.st.st_size) != (
            entry.st.st_ino,
            entry.st.st_size,
        ):
            size = await self._logical_size(self._dfd(parent_ino), parent, again.name, again.st)
        return again, (size if again.compressed else again.st.st_size)

    def _attrs(self, node: Node, st: os.stat_result, size: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = InodeT(node.ino)
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = size
        a.st_blksize = BLKSIZE
        a.st_blocks = st.st_blocks  # what is really stored, so `du` tells the truth
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    async def _entry(self, parent_ino: int, name: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        """Resolve (parent, name) to a node (created if new) and its attributes; no lookup count."""
        entry, size = await self._resolve(parent_ino, name)
        node = self.table.attach(parent_ino, name, entry.st, entry.compressed)
        return node, self._attrs(node, entry.st, size)

    async def _stat_node(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.is_dir or node.ino == ROOT_INODE:
            # The directory itself, through its descriptor (whatever its name holds now).
            st = os.fstat(self.table.dir_fd(node))
            return self._attrs(node, st, st.st_size)
        if self.table.path(node) is None:
            return await self._stat_unlinked(node)
        parent_ino, name = node.links[0]
        entry, size = await self._resolve(parent_ino, name)
        return self._attrs(node, entry.st, size)

    async def _stat_unlinked(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of a file that was unlinked while open: from one of its descriptors."""
        fd = node.anon_fd
        reader = None
        if fd is None:
            for h in self._handles_of(node)[:1]:
                fd, reader = h.fd, h.reader
        if fd is None:
            raise FUSEError(errno.ENOENT)
        st = os.fstat(fd)
        size = st.st_size
        if reader is not None and node.anon_fd is None:
            size = await trio.to_thread.run_sync(lambda: reader.size, limiter=self.read_limiter)
        return self._attrs(node, st, size)

    # ------------------------------------------------------------------ lookups
    @translate_errors
    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if not self.rules.visible(self._dir_path(parent_inode), name):
            return _NEGATIVE
        try:
            node, attrs = await self._entry(parent_inode, name)
        except FUSEError as e:
            if e.errno != errno.ENOENT:
                raise
            # A negative entry the kernel caches (sqlite, git and codex probe absent names
            # all the time): safe because every name is made through the mount, whose
            # create, mkdir, mknod, symlink, link and rename replace it; the daemon never
            # makes a visible name appear by itself (swaps and promotions keep the name).
            return _NEGATIVE
        node.lookups += 1
        return attrs

    async def forget(self, inode_list: list[tuple[InodeT, int]]) -> None:
        for ino, n in inode_list:
            try:
                self.table.forget(ino, n)
            except Exception:  # forget must never raise
                log.exception("forget(%d, %d)", ino, n)

    @translate_errors
    async def getattr(
        self, inode: InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return await self._stat_node(self._node(inode))

    @translate_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
        kill_suidgid: bool = False,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        handle = self.handles.get(fh) if fh is not None else None
        if fields.update_size:
            while node.swap is not None:
                await self.files.settle(node)

        async def attempt() -> pyfuse3.EntryAttributes:
            # Under the file's lock: a promotion or a swap's publish step never runs meanwhile,
            # so the change lands on the file that results (and a swap never reverts it).
            async with self._locked(node):
                if fields.update_size:
                    self.files.abandon(node)  # one that started while we waited
                return await self._setattr_locked(node, handle, attr, fields, kill_suidgid)

        return await self._unleased(node, os.O_WRONLY, attempt)

    async def _setattr_locked(
        self,
        node: Node,
        handle: Handle | None,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        kill_suidgid: bool = False,
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            # Truncation changes content: a compressed file becomes plain first.
            await self._make_plain(node, empty=attr.st_size == 0)
            if handle is not None:
                self._refresh_handle(handle)
                os.ftruncate(handle.fd, attr.st_size)
            elif node.anon_fd is not None:
                os.ftruncate(node.anon_fd, attr.st_size)
            else:
                self._truncate(node, attr.st_size)
            node.writes += 1
        target = self._target(node, handle)
        if fields.update_mode:
            mode = stat.S_IMODE(attr.st_mode)
            self._apply(target, lambda t: os.chmod(t, mode), node)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            self._apply(target, lambda t: os.chown(t, uid, gid), node)
        if fields.update_atime or fields.update_mtime:
            current = await self._stat_node(node)
            ns = (
                attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns,
            )
            self._apply(target, lambda t: os.utime(t, ns=ns), node)
        if kill_suidgid:  # a truncation or chown (FATTR_KILL_SUIDGID)
            self._apply(target, privileges.clear_suidgid, node)
        return await self._stat_node(node)

    @contextlib.asynccontextmanager
    async def _locked(self, node: Node) -> AsyncIterator[None]:
        """Hold the node's lock (the node is kept in the table meanwhile). A free lock is taken
        without a trip through the scheduler (one fewer task switch per setattr)."""
        node.claims += 1
        try:
            if node.lock.locked():
                await node.lock.acquire()
            else:
                node.lock.acquire_nowait()
            try:
                yield
            finally:
                node.lock.release()
        finally:
            node.claims -= 1
            self.table.maybe_drop(node)

    def _truncate(self, node: Node, size: int) -> None:
        dfd, _, name = self._at(node)
        fd = self.store.open_plain(name, os.O_WRONLY, dir_fd=dfd)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def _target(self, node: Node, handle: Handle | None) -> int | None:
        """A descriptor for metadata changes when the file has no name (unlinked but open)."""
        if self.table.path(node) is not None:
            return None
        if node.anon_fd is not None:
            return node.anon_fd
        if handle is not None:
            return handle.fd
        fd = self._any_fd(node)
        if fd is None:
            raise FUSEError(errno.ENOENT)
        return fd

    def _apply(self, fd: int | None, change: Callable[[int | bytes], None], node: Node) -> None:
        """Apply a metadata change (chmod, chown, utime: given a descriptor or a path) to
        `fd`, else to the node's backing object itself (never decoding)."""
        if fd is not None:
            change(fd)
            return
        with self._backing_object(node) as path:
            change(path)

    @contextlib.contextmanager
    def _backing_object(self, node: Node) -> Iterator[bytes]:
        """`/proc/self/fd/N` of the node's backing object itself: a directory's own descriptor,
        or the current representation (plain or `.zst`) of anything else opened O_PATH without
        following a symlink (a symlink is then the link itself). A change made through it never
        lands on whatever a name underneath was replaced by."""
        if node.is_dir or node.ino == ROOT_INODE:
            yield f"/proc/self/fd/{self.table.dir_fd(node)}".encode()
            return
        dfd, parent, name = self._at(node)
        entry = self.store.resolve_in(dfd, parent, name)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        fd = os.open(entry.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            yield f"/proc/self/fd/{fd}".encode()
        finally:
            os.close(fd)

    @translate_errors
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        dfd, _, name = self._at(self._node(inode))
        return os.readlink(name, dir_fd=dfd)

    # ------------------------------------------------------------------ directories
    @translate_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        if self.directories_by_inode:
            # The kernel takes ENOSYS as success and never sends OPENDIR (nor RELEASEDIR) again;
            # readdir and fsyncdir then receive the directory's inode.
            raise FUSEError(errno.ENOSYS)
        node = self._node(inode)
        self._dir_path(inode)  # a directory that has a name
        fh = self._new_fh()
        self.dirs[fh] = DirHandle(node)
        return FileHandleT(fh)

    @translate_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries from offset `start_id` on. With a directory handle, offsets index the names
        its first readdir listed; by inode (`directories_by_inode`), every call lists afresh and
        offsets are cookies from a hash of each name, so entries that come or go between two
        calls never shift the others (none is skipped or repeated)."""
        if self.directories_by_inode:
            node = self._node(fh)  # pyfuse3 passes the directory's inode
            if not node.is_dir:
                raise FUSEError(errno.ENOTDIR)
        else:
            d = self.dirs[fh]
            node = d.node
        parent = self._path(node)
        # A descriptor of our own (the node's is only borrowed, and O_PATH cannot be listed).
        dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self.table.dir_fd(node))
        try:
            # One getdents: cheaper inline than a thread hop.
            if self.directories_by_inode:
                listing = self._listings.get(node.ino) if start_id > 2 else None
                if listing is None:  # a listing starts: what is there now
                    listing = sorted((_cookie(n), n)
                                     for n in self.store.list_names(parent, dir_fd))
                self._keep_listing(node.ino, listing)  # its next pages page through it
                slots = [(b".", 1), (b"..", 2)][min(start_id, 2):]
                first = bisect.bisect_left(listing, (start_id, b""))
                slots += [(name, c + 1) for c, name in listing[first:]]
            else:
                if d.names is None:
                    d.names = [b".", b"..", *self.store.list_names(parent, dir_fd)]
                slots = [(d.names[i], i + 1) for i in range(start_id, len(d.names))]
            # No more than a reply can hold (a reply that stops early just brings the next
            # call): stat'ing every remaining name on every page made big directories quadratic.
            slots = slots[:READDIR_BATCH]
            # What each name is now, not what it was when listed: a file swapped or promoted
            # since has another backing inode, and a stale stat must never rekey the table.
            current = {name: self.store.resolve_in(dir_fd, parent, name)
                       for name, _ in slots if name not in _DOTS}
            unknown = [e.name for e in current.values()
                       if e is not None and e.compressed and self.store.known_size(e.st) is None]
            if unknown:
                # One thread hop for the whole directory rather than one per compressed file:
                # a cold `find` or `grep -r` reads every seek table once. The stats above are
                # stale after it: each name is looked at again below.
                await trio.to_thread.run_sync(self.store.learn_sizes, dir_fd, unknown,
                                              limiter=self.read_limiter)
        finally:
            os.close(dir_fd)
        for name, next_id in slots:
            if name in _DOTS:  # the kernel takes only their inode numbers (no lookup)
                if not self.readdir_reply(token, name, self._dot(node, _DOTS[name]), next_id):
                    return
                continue
            entry = current[name]
            if entry is None:
                continue
            if unknown or (entry.compressed and self.store.known_size(entry.st) is None):
                found = await self._listing_entry(node, name)
                if found is None:
                    continue
                entry, size = found
            else:
                size = self.store.known_size(entry.st) if entry.compressed else entry.st.st_size
            child = self.table.attach(node.ino, name, entry.st, entry.compressed)
            if not self.readdir_reply(token, name, self._attrs(child, entry.st, size), next_id):
                self.table.maybe_drop(child)
                return
            child.lookups += 1

    def _keep_listing(self, ino: int, listing: list[tuple[int, bytes]]) -> None:
        old = self._listings.pop(ino, None)
        if old is not None:
            self._listed -= len(old)
        self._listings[ino] = listing
        self._listed += len(listing)
        while len(self._listings) > 1 and (len(self._listings) > LISTINGS_KEPT
                                           or self._listed > LISTED_NAMES_KEPT):
            self._listed -= len(self._listings.popitem(last=False)[1])

    def _dot(self, node: Node, i: int) -> pyfuse3.EntryAttributes:
        """`.` (i == 0) or `..` of a directory: the kernel creates no dentry for either and
        uses only the inode number and type, so no stat is needed."""
        ino = node.ino
        if i == 1 and node.ino != ROOT_INODE and node.links:
            ino = node.links[0][0]
        a = pyfuse3.EntryAttributes()
        a.st_ino = InodeT(ino)
        a.st_mode = stat.S_IFDIR | 0o755
        return a

    async def _listing_entry(self, dir_node: Node, name: bytes) -> tuple[Entry, int] | None:
        """The current entry of a listed name and its logical size, stat'ed after the last
        await (None if it is gone)."""
        for _ in range(3):
            parent = self._path(dir_node)
            dfd = self.table.dir_fd(dir_node)
            entry = self.store.resolve_in(dfd, parent, name)
            if entry is None:
                return None
            if not entry.compressed:
                return entry, entry.st.st_size
            size = self.store.known_size(entry.st)
            if size is not None:
                return entry, size
            await self._logical_size(dfd, parent, entry.name, entry.st)
        return None  # changing faster than it can be listed

    @translate_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        del self.dirs[fh]

    @translate_errors
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        node = self._node(fh) if self.directories_by_inode else self.dirs[fh].node
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.table.dir_fd(node))
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    @translate_errors
    async def mkdir(
        self, parent_inode: InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        dfd = self._dfd(parent_inode)
        os.mkdir(name, stat.S_IMODE(mode) & ~ctx.umask, dir_fd=dfd)
        self._give_to_caller(dfd, name, ctx)
        return await self._new_entry(parent_inode, name)

    @translate_errors
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not self.rules.visible(self._dir_path(parent_inode), name):
            raise FUSEError(errno.ENOENT)
        st = os.stat(name, dir_fd=self._dfd(parent_inode), follow_symlinks=False)
        # A compaction abandoned by the unlink of the directory's last file may still have
        # its temp in there for a moment: let it clean up first.
        await self.files.settle_dir((st.st_dev, st.st_ino))
        os.rmdir(name, dir_fd=self._dfd(parent_inode))
        self.table.unlink(parent_inode, name)

    @translate_errors
    async def symlink(
        self,
        parent_inode: InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        dfd = self._dfd(parent_inode)
        os.symlink(target, name, dir_fd=dfd)
        self._give_to_caller(dfd, name, ctx)
        return await self._new_entry(parent_inode, name)

    @translate_errors
    async def mknod(
        self,
        parent_inode: InodeT,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        parent, dfd = self._dir_path(parent_inode), self._dfd(parent_inode)
        if (self.rules.compressible(parent, name)
                and self.store.resolve_in(dfd, parent, name) is not None):
            raise FUSEError(errno.EEXIST)
        os.mknod(name, mode & ~ctx.umask, rdev, dir_fd=dfd)
        self._give_to_caller(dfd, name, ctx)
        return await self._new_entry(parent_inode, name)

    def _give_to_caller(self, dfd: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """A daemon running as root creates files owned by the user who asked."""
        if self.root_uid and (ctx.uid, ctx.gid) != (0, 0):
            os.chown(name, ctx.uid, ctx.gid, dir_fd=dfd, follow_symlinks=False)

    async def _new_entry(self, parent_ino: int, name: bytes) -> pyfuse3.EntryAttributes:
        node, attrs = await self._entry(parent_ino, name)
        node.lookups += 1
        return attrs

    # ------------------------------------------------------------------ namespace
    async def _locked_node(self, parent_ino: int, name: bytes) -> Node | None:
        """The known node of (parent, name) with its lock taken (waits for a swap), or None."""
        node = self.table.by_link.get((parent_ino, name))
        if node is None:
            entry = self.store.resolve_in(self._dfd(parent_ino), self._dir_path(parent_ino), name)
            if entry is None:
                return None
            node = self.table.by_key.get((entry.st.st_dev, entry.st.st_ino))
            if node is None:
                return None
        node.claims += 1
        try:
            await node.lock.acquire()
        finally:
            node.claims -= 1
        return node

    def _release_node(self, node: Node | None) -> None:
        if node is not None:
            node.lock.release()
            self.table.maybe_drop(node)

    @translate_errors
    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not self.rules.visible(self._dir_path(parent_inode), name):
            raise FUSEError(errno.ENOENT)
        node = await self._locked_node(parent_inode, name)
        try:
            self.files.abandon(node)  # compressing a removed file is wasted work
            parent, dfd = self._dir_path(parent_inode), self._dfd(parent_inode)
            entry = self.store.resolve_in(dfd, parent, name)
            self._remove_forms(dfd, parent, name, missing_ok=False)
            self.table.unlink(parent_inode, name, linked_elsewhere=_linked(entry))
        finally:
            self._release_node(node)

    def _remove_forms(self, dfd: int, parent: bytes, name: bytes, *, missing_ok: bool) -> bool:
        """Remove every backing form of a logical file name in directory `dfd` (`parent`);
        True if anything was removed."""
        removed = False
        forms = [name, zst_name(name)] if self.rules.compressible(parent, name) else [name]
        for form in forms:
            try:
                os.unlink(form, dir_fd=dfd)
                removed = True
            except OSError as e:
                if not (e.errno == errno.ENOENT or (form != name and no_zst_form(e))):
                    raise
        if not removed and not missing_ok:
            raise FUSEError(errno.ENOENT)
        return removed

    @translate_errors
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: bytes,
        parent_inode_new: InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if not self.rules.visible(self._dir_path(parent_inode_old), name_old):
            raise FUSEError(errno.ENOENT)
        self._check_name(parent_inode_new, name_new)
        src_node = await self._locked_node(parent_inode_old, name_old)
        dst_node = None
        try:
            dst_node = await self._locked_node(parent_inode_new, name_new)
            if dst_node is src_node:
                dst_node = None
            # A swap decided under the old name would fail to publish anyway.
            self.files.abandon(src_node)
            self.files.abandon(dst_node)
            old_path = join(self._dir_path(parent_inode_old), name_old)
            await self._rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
            new_path = join(self._dir_path(parent_inode_new), name_new)
        finally:
            self._release_node(dst_node)
            self._release_node(src_node)
        self._moved(old_path, new_path, src_node, flags)

    def _moved(self, old_path: bytes, new_path: bytes, node: Node | None, flags: int) -> None:
        """Tell the compactor where a renamed file (or directory) is now, so a cold file moved
        by `codex archive` stays queued; an exchange moved both."""
        if self.on_moved is None:
            return
        if flags & pyfuse3.RENAME_EXCHANGE:
            tmp = b"\0exchange"
            self.on_moved(old_path, tmp)
            self.on_moved(new_path, old_path)
            self.on_moved(tmp, new_path)
        else:
            self.on_moved(old_path, new_path)
        if (node is not None and node.opens == 0 and not node.compressed and not node.is_dir
                and self.on_idle is not None and self.rules.compressible(*split(new_path))):
            self.on_idle(new_path)

    async def _rename(
        self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int
    ) -> None:
        if self.rules.path_aware:  # (awaits: everything below is resolved afterwards)
            await self._check_subtree_move(p_old, n_old, p_new, n_new)
            if flags & pyfuse3.RENAME_EXCHANGE:
                await self._check_subtree_move(p_new, n_new, p_old, n_old)
        old_dir, new_dir = self._dir_path(p_old), self._dir_path(p_new)
        src = self.store.resolve_in(self._dfd(p_old), old_dir, n_old)
        if src is None:
            raise FUSEError(errno.ENOENT)
        dst = self.store.resolve_in(self._dfd(p_new), new_dir, n_new)
        if flags & pyfuse3.RENAME_NOREPLACE and dst is not None:
            raise FUSEError(errno.EEXIST)
        if src.compressed and not self.rules.compressible(new_dir, n_new):
            # The new name cannot have a .zst form: the file becomes plain first.
            await self._make_plain(self._node_at(p_old, n_old, src))
            old_dir, new_dir = self._dir_path(p_old), self._dir_path(p_new)
            src = self.store.resolve_in(self._dfd(p_old), old_dir, n_old)
            assert src is not None
        if flags & pyfuse3.RENAME_EXCHANGE:
            await self._exchange(p_old, n_old, src, p_new, n_new, dst)
            return
        old_fd, new_fd = self._dfd(p_old), self._dfd(p_new)
        target = zst_name(n_new) if src.compressed else n_new
        if dst is not None and dst.compressed != src.compressed:
            # Replace both forms of the destination. Remove the other form first, so that
            # no moment shows the old plain file winning over the new compressed one.
            if stat.S_ISDIR(src.st.st_mode) != stat.S_ISDIR(dst.st.st_mode):
                raise FUSEError(errno.EISDIR if stat.S_ISDIR(dst.st.st_mode) else errno.ENOTDIR)
            os.unlink(dst.name, dir_fd=new_fd)
        rename_at(old_fd, src.name, new_fd, target, flags & pyfuse3.RENAME_NOREPLACE)
        if not src.compressed and self.rules.compressible(old_dir, n_old):
            # A differing leftover `.zst` that recovery kept hidden behind the plain file
            # would show its old content under the old name: keep it aside, hidden.
            self.store.set_aside(old_dir, zst_name(n_old), dir_fd=old_fd)
        if self.rules.compressible(new_dir, n_new) and not src.compressed:
            # A stale compressed form of the destination would resurface if the plain one went.
            try:
                os.unlink(zst_name(n_new), dir_fd=new_fd)
            except OSError as e:
                if not no_zst_form(e):
                    raise
        self.table.unlink(p_new, n_new, linked_elsewhere=_linked(dst))
        self.table.move((p_old, n_old), (p_new, n_new))

    async def _exchange(
        self,
        p_old: int,
        n_old: bytes,
        src: Entry,
        p_new: int,
        n_new: bytes,
        dst: Entry | None,
    ) -> None:
        if dst is None:
            raise FUSEError(errno.ENOENT)
        for parent_ino, name, entry in ((p_old, n_old, src), (p_new, n_new, dst)):
            if entry.compressed:
                # Both sides must have the same form to swap names atomically.
                await self._make_plain(self._node_at(parent_ino, name, entry))
        old_fd, new_fd = self._dfd(p_old), self._dfd(p_new)
        src = self.store.resolve_in(old_fd, self._dir_path(p_old), n_old) or src
        dst = self.store.resolve_in(new_fd, self._dir_path(p_new), n_new) or dst
        rename_at(old_fd, src.name, new_fd, dst.name, pyfuse3.RENAME_EXCHANGE)
        a = self.table.by_link.pop((p_old, n_old), None)
        b = self.table.by_link.pop((p_new, n_new), None)
        for node, old, new in ((a, (p_old, n_old), (p_new, n_new)),
                               (b, (p_new, n_new), (p_old, n_old))):
            if node is not None:
                node.links[node.links.index(old)] = new
                self.table.by_link[new] = node

    def _node_at(self, parent_ino: int, name: bytes, entry: Entry) -> Node:
        return self.table.attach(parent_ino, name, entry.st, entry.compressed)

    async def _check_subtree_move(
        self, p_old: int, old_name: bytes, p_new: int, new_name: bytes
    ) -> None:
        """With path-dependent patterns, moving a directory can change which `.zst` files inside
        it are compressed forms of files and which are files of their own: refuse such a move
        with EXDEV, so that `mv` copies the files (their logical content) instead."""
        try:
            st = os.stat(old_name, dir_fd=self._dfd(p_old), follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        old = join(self._dir_path(p_old), old_name)
        new = join(self._dir_path(p_new), new_name)
        changed = await trio.to_thread.run_sync(self.store.moved_representation, old, new)
        if changed is not None:
            log.info("rename %s -> %s refused (EXDEV): it would change what %s is",
                     os.fsdecode(old), os.fsdecode(new), os.fsdecode(changed))
            raise FUSEError(errno.EXDEV)

    @translate_errors
    async def link(
        self,
        inode: InodeT,
        new_parent_inode: InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._check_name(new_parent_inode, new_name)
        node = self._node(inode)
        # A hard link to a compressed file would be broken by its next promotion: link the
        # plain form instead.
        await self._make_plain(node)
        new_dir, new_fd = self._dir_path(new_parent_inode), self._dfd(new_parent_inode)
        if (self.rules.compressible(new_dir, new_name)
                and self.store.resolve_in(new_fd, new_dir, new_name)):
            raise FUSEError(errno.EEXIST)
        src_fd, _, src_name = self._at(node)
        os.link(src_name, new_name, src_dir_fd=src_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        return await self._new_entry(new_parent_inode, new_name)

    # ------------------------------------------------------------------ open files
    @translate_errors
    async def open(self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext,
                   kill_suidgid: bool = False) -> FileInfo:
        node = self._node(inode)
        info = await self._unleased(node, flags, lambda: self._open(node, flags))
        if privileges.kills_on_open(flags, kill_suidgid, self.enable_killpriv_v2, ctx.uid):
            privileges.clear_suidgid(self.handles[info.fh].fd)
        return info

    async def _unleased(self, node: Node, flags: int,
                        attempt: Callable[[], Awaitable[R]]) -> R:
        """Run `attempt`, which opens a backing file without waiting on a lease (Leased). If
        the file is leased, a swap of ours (found by its inode, in case the kernel reached it
        through another node) gives up, anyone else's lease is waited out in a worker thread
        (never on the thread that serves every request), and it is tried again; a file leased
        over and over ends in EAGAIN."""
        for _ in range(3):
            try:
                return await attempt()
            except Leased as e:
                if not await self.files.settle_file(e.key):
                    dfd, _, name = self._at(node)
                    owned = os.dup(dfd)  # (the node's is borrowed: the thread outlives an await)
                    try:
                        await trio.to_thread.run_sync(self.store.wait_unleased, owned, name,
                                                      flags)
                    finally:
                        os.close(owned)
        return await attempt()

    async def _open(self, node: Node, flags: int) -> FileInfo:
        while node.swap is not None and not node.swap.adopt:
            # Its compaction holds a lease: opening the backing file now would block this
            # thread on our own lease. Make it give up first. (A re-encoding of a `.zst` holds
            # only a read lease: readers go on, and a write promotes under the file's lock.)
            await self.files.settle(node)
        if not node.busy and not (flags & os.O_TRUNC and node.compressed):
            # Nobody holds the lock and nothing below awaits: the open is atomic with respect
            # to swaps without taking the lock (a lock round trip per open shows in `grep -r`).
            return self._open_now(node, flags)
        node.claims += 1
        try:
            async with node.lock:
                return await self._open_locked(node, flags)
        finally:
            node.claims -= 1
            self.table.maybe_drop(node)

    async def _open_locked(self, node: Node, flags: int) -> FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY and flags & os.O_TRUNC:
            await self._make_plain(node, empty=True)
        return self._open_now(node, flags)

    def _open_now(self, node: Node, flags: int) -> FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        handle = self._open_handle(node, flags)
        if writing and flags & os.O_TRUNC:
            os.ftruncate(handle.fd, 0)
            node.writes += 1
        fh = self._new_fh()
        keep = self._keep_cache(node, handle)
        backing_id = self._passthrough(node, handle)
        self._add_handle(fh, handle)
        return _file_info(fh, keep, backing_id, self._direct(flags, backing_id))

    def _direct(self, flags: int, backing_id: int) -> bool:
        """Whether a handle the daemon serves is opened for direct I/O: an appender's
        (O_APPEND, for writing), where the kernel allows it (DIRECT_APPENDS).

        A buffered write that starts inside a page the kernel has not cached whole (every
        append that does not start on a page boundary) is cut after that page
        (`fuse_fill_write_pages`): one `write(2)` reaches the daemon as two WRITEs, and a daemon
        killed between them leaves the first part of a line in the file. A direct write is sent
        whole, up to `max_write` per request (128 KiB). The kernel drops the written range from
        other openers' page cache. Only appenders: a shared writable mapping of a direct-I/O
        descriptor is refused (ENODEV) unless libfuse negotiates FUSE_DIRECT_IO_ALLOW_MMAP."""
        return (self.direct_appends and not backing_id and bool(flags & os.O_APPEND)
                and flags & os.O_ACCMODE != os.O_RDONLY)

    def _passthrough(self, node: Node, handle: Handle) -> int:
        """The backing id to open `handle` with in passthrough mode, or 0 for a handle whose
        reads and writes come here. Called before `handle` is in the table.

        Only files the compactor never takes (names outside the patterns: databases, configs,
        working trees): a mapping of a passthrough file maps the backing file itself, and its
        handle is released when its descriptor is closed, so the daemon could not count it as
        open. And only where no handle of the file is served here (a file renamed out of the
        patterns while its `.zst` or promoted form is read): the kernel refuses to mix the two
        on one inode (the open would fail with EIO)."""
        if handle.reader is not None:
            return 0
        # The kernel allows one backing file per inode: the node's other handles share theirs.
        backing_id = self._backing_id_of(node)
        if not backing_id:
            if not self.enable_passthrough or node.opens:  # (each open handle is served here)
                return 0
            if privileges.served_writer(handle.fd, handle.flags):
                return 0
            path = self.table.path(node)
            if path is None or self.rules.compressible(*split(path)):
                return 0
            try:
                backing_id = self.passthrough_open(handle.fd)
            except OSError as e:
                self._passthrough_refused(e)
                return 0
        handle.backing_id = backing_id
        if handle.flags & os.O_ACCMODE != os.O_RDONLY:
            # Its writes bypass the kernel's page cache of this inode, and may leave the mtime
            # as it was (utimensat): a later cached open (after a rename into the patterns)
            # must not keep pages read before.
            node.seen = NEVER_SEEN
        self.stats.passthrough_opens += 1
        return backing_id

    def _backing_id_of(self, node: Node) -> int:
        return next((h.backing_id for h in self._by_node.get(node, ()) if h.backing_id), 0)

    def _passthrough_refused(self, e: OSError) -> None:
        """Expected without CAP_SYS_ADMIN (a mount by an ordinary user): passthrough is off
        for the mount from now on; handles that have a backing id keep it."""
        self.enable_passthrough = False
        log.info("passthrough is off for this mount: registering a backing file failed: %s",
                 os.strerror(e.errno or errno.EIO))

    def probe_passthrough(self) -> None:
        """Learn at once (after INIT) whether backing files can be registered here (it needs
        CAP_SYS_ADMIN, and a backing filesystem stacked at most once), so that status says so
        before the first open: with an unnamed file in the store, which nothing can see."""
        if not self.enable_passthrough:
            return
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                         dir_fd=self.store.root_fd)
        except OSError:
            return  # (a read-only store, or no O_TMPFILE): the first open decides
        try:
            self.passthrough_close(self.passthrough_open(fd))
        except OSError as e:
            self._passthrough_refused(e)
        finally:
            os.close(fd)

    def _drop_passthrough(self, handle: Handle) -> None:
        """After `handle` left the table: the node's last passthrough handle gives its backing
        id back (the kernel keeps its own reference for as long as it needs one)."""
        if self._backing_id_of(handle.node):
            return
        try:
            self.passthrough_close(handle.backing_id)
        except OSError as e:
            log.warning("passthrough_close(%d) of %s: %s", handle.backing_id,
                        self._describe(handle.node), os.strerror(e.errno or errno.EIO))

    def _open_handle(self, node: Node, flags: int) -> Handle:
        """A handle on the node's current representation (never decodes)."""
        backing_flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        same = self._current_fd(node)
        if same is not None:
            # Unlinked (but open elsewhere): reopen that very inode through its descriptor.
            return Handle(node, os.open(f"/proc/self/fd/{same}", backing_flags), flags, None)
        if node.ino == ROOT_INODE:
            raise FUSEError(errno.EISDIR)
        dfd, parent, name = self._at(node)
        entry = self.store.resolve_in(dfd, parent, name)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        if entry.compressed:
            try:
                fd = self.store.open_compressed(entry.name, entry.st, dir_fd=dfd)
            except codec.CorruptError as e:
                e.zstfs_path = os.fsdecode(join(parent, entry.name))  # type: ignore[attr-defined]
                raise
            reader = codec.ZstReader(fd)
            size = self.store.known_size(entry.st)
            return Handle(node, fd, flags, reader, size is not None and size <= INLINE_DECODE_LIMIT)
        return Handle(node, self.store.open_plain(name, backing_flags, dir_fd=dfd), flags, None)

    def _current_fd(self, node: Node) -> int | None:
        """For a node with no name: a descriptor of its current plain content (its anonymous
        promotion, or a handle opened since its last promotion), else None."""
        if node.anon_fd is not None:
            return node.anon_fd
        if self.table.path(node) is not None:
            return None
        return next((h.fd for h in self._handles_of(node)
                     if h.reader is None and h.generation == node.generation), None)

    def _keep_cache(self, node: Node, handle: Handle) -> bool:
        """Keep the kernel's cached pages unless the content changed behind our back."""
        st = os.fstat(handle.fd)
        seen = (st.st_size if handle.reader is None else -1, st.st_mtime_ns)
        keep = node.seen is None or node.seen[1] == seen[1]
        node.seen = seen
        return keep

    def _refresh_handle(self, handle: Handle) -> None:
        """Point a handle at the node's current representation after a promotion. The old
        descriptor stays open until release: a read on a worker thread may still use it."""
        node = handle.node
        if handle.generation == node.generation:
            return
        try:
            fresh = self._open_handle(node, handle.flags)
        except (FUSEError, FileNotFoundError):
            if handle.flags & os.O_ACCMODE != os.O_RDONLY or node.compressed:
                raise
            # Promoted, then removed, and every descriptor of the new form is closed: nobody
            # can see that content any more; this reader goes on with what it had.
            handle.generation = node.generation
            return
        handle.retired.append(handle.fd)
        handle.fd, handle.reader, handle.generation = fresh.fd, fresh.reader, fresh.generation
        handle.inline = fresh.inline

    async def _make_plain(self, node: Node, *, empty: bool = False) -> None:
        if node.compressed:
            await self.files.promote(node, empty=empty, source_fd=self._any_fd(node))
            # Every handle moves to the plain file now, while it has a name: a writer left on
            # the `.zst` until its next request could find the file removed meanwhile and
            # nothing left to reopen (ENOENT from write(2) on an open descriptor).
            for h in self._handles_of(node):
                self._refresh_handle(h)

    def _any_fd(self, node: Node) -> int | None:
        return next((h.fd for h in self._handles_of(node)), None)

    async def _create_existing(
        self, parent_inode: int, name: bytes, flags: int, ctx: pyfuse3.RequestContext,
        kill_suidgid: bool = False,
    ) -> tuple[FileInfo, pyfuse3.EntryAttributes]:
        if flags & os.O_EXCL:
            raise FUSEError(errno.EEXIST)
        node, _ = await self._entry(parent_inode, name)
        info = await self.open(InodeT(node.ino), flags & ~os.O_CREAT, ctx, kill_suidgid)
        node.lookups += 1
        return info, await self._stat_node(node)

    @translate_errors
    async def create(
        self,
        parent_inode: InodeT,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
        kill_suidgid: bool = False,
    ) -> tuple[FileInfo, pyfuse3.EntryAttributes]:
        self._check_name(parent_inode, name)
        parent, dfd = self._dir_path(parent_inode), self._dfd(parent_inode)
        compressible = self.rules.compressible(parent, name)
        existing = self.store.resolve_in(dfd, parent, name) if compressible else None
        if existing is not None:
            # The name exists in compressed form: O_CREAT without O_EXCL opens it.
            return await self._create_existing(parent_inode, name, flags, ctx, kill_suidgid)
        try:
            # Exclusive, whatever the caller asked: an existing file (created below the mount
            # since the kernel cached its absence) is opened like any open, never chowned or
            # opened here while a swap of ours holds its lease.
            fd = self.store.with_room(lambda: os.open(
                name, (flags & ~getattr(os, "O_DIRECT", 0)) | os.O_CREAT | os.O_EXCL
                | os.O_CLOEXEC | os.O_NOFOLLOW, stat.S_IMODE(mode) & ~ctx.umask, dir_fd=dfd))
        except FileExistsError:
            return await self._create_existing(parent_inode, name, flags, ctx, kill_suidgid)
        try:
            if self.root_uid and (ctx.uid, ctx.gid) != (0, 0):
                os.fchown(fd, ctx.uid, ctx.gid)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        node = self.table.attach(parent_inode, name, st, False)
        node.lookups += 1
        handle = Handle(node, fd, flags, None)
        node.seen = (st.st_size, st.st_mtime_ns)
        fh = self._new_fh()
        backing_id = self._passthrough(node, handle)
        self._add_handle(fh, handle)
        info = _file_info(fh, True, backing_id, self._direct(flags, backing_id))
        return info, self._attrs(node, st, st.st_size)

    @translate_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        h = self.handles[fh]
        self._refresh_handle(h)
        reader = h.reader
        if reader is None:
            return os.pread(h.fd, size, off)
        try:
            if h.inline:
                return reader.read(off, size)
            data = reader.read_cached(off, size)
            if data is None:
                data = await trio.to_thread.run_sync(reader.read, off, size,
                                                     limiter=self.read_limiter)
        except codec.CorruptError as e:
            e.zstfs_path = self._describe(h.node)  # type: ignore[attr-defined]
            if not isinstance(e, codec.BudgetBusyError):
                self.store.note_damaged(os.fstat(h.fd), e)
            raise
        return data

    def _describe(self, node: Node) -> str:
        path = self.table.path(node)
        return os.fsdecode(path) if path is not None else f"<inode {node.ino}>"

    @translate_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes,
                    kill_suidgid: bool = False) -> int:
        h = self.handles[fh]
        if h.node.compressed:
            await self._make_plain(h.node)
        self._refresh_handle(h)
        privileges.before_write(h.fd, kill_suidgid)
        n = self._write_all(h.fd, buf, off)
        h.wrote = True
        h.node.writes += 1
        return n

    def _write_all(self, fd: int, buf: bytes, off: int) -> int:
        """Write all of `buf`, as one write(2) does on the backing filesystem. Where the disk
        fills up (a short write, then ENOSPC) while decoded copies hold space, they are given
        back once and the rest is written; what was written before an error is reported."""
        view, done, gave_back = memoryview(buf), 0, False
        while done < len(view):
            try:
                n = os.pwrite(fd, view[done:], off + done)
            except OSError as e:
                if e.errno == errno.ENOSPC and not gave_back:
                    gave_back = True
                    if self.store.give_back_space():
                        continue
                if done:
                    return done
                raise
            if n == 0:
                break
            done += n
        return done

    @translate_errors
    async def flush(self, fh: FileHandleT) -> None:
        # Nothing is buffered here. ENOSYS makes the kernel stop sending FLUSH at all (it still
        # writes back dirty mmap pages first): one request less for every close().
        raise FUSEError(errno.ENOSYS)

    @translate_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        h = self.handles[fh]
        if h.reader is not None:
            return
        sync = os.fdatasync if datasync else os.fsync
        started = time.monotonic()
        if h.slow_sync or os.fstat(h.fd).st_size > INLINE_FSYNC_LIMIT:
            await trio.to_thread.run_sync(sync, h.fd)
        else:
            sync(h.fd)
        # Judged again at every sync (a thread's also counts its hop, a fraction of the limit).
        h.slow_sync = time.monotonic() - started > INLINE_FSYNC_SLOW

    @translate_errors
    async def release(self, fh: FileHandleT) -> None:
        h = self._remove_handle(fh)
        node = h.node
        if h.wrote:
            st = os.fstat(h.fd)
            node.seen = (st.st_size, st.st_mtime_ns)  # our own writes kept the page cache right
        os.close(h.fd)
        for fd in h.retired:
            os.close(fd)
        if h.backing_id:
            self._drop_passthrough(h)
        if node.opens == 0 and self.on_idle is not None and not node.compressed:
            path = self.table.path(node)
            if path is not None and self.rules.compressible(*split(path)):
                self.on_idle(path)
        self.table.maybe_drop(node)

    # ------------------------------------------------------------------ xattrs
    def _xattr_call(self, node: Node, call: Callable[..., Any], *args: Any) -> Any:
        """Run an `os.*xattr` call on the node's backing file, never through the mount.

        The root is the store's own descriptor. Anything else is its backing object itself
        (`_backing_object`: a symlink's own xattrs, never its target's)."""
        if node.ino == ROOT_INODE:
            return call(self.store.root_fd, *args)
        with self._backing_object(node) as path:
            return call(path, *args)

    @staticmethod
    def _reserved_xattr(inode: int, name: bytes) -> bool:
        """`user.zstfs.*` on the mount root is zstfs's own (the virtual status)."""
        return inode == ROOT_INODE and name.startswith(RESERVED_XATTR_PREFIX)

    @translate_errors
    async def getxattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self._reserved_xattr(inode, name):
            if name == STATUS_XATTR and self.status_provider is not None:
                return await self._status_json(ctx.pid)
            raise FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        fd = self._held_fd(node)
        try:
            if fd is not None:  # every write asks for security.capability: no path walk
                return os.getxattr(fd, name)
            return cast(bytes, self._xattr_call(node, os.getxattr, name))
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    def _held_fd(self, node: Node) -> int | None:
        """A descriptor of the node's current representation that an open handle holds."""
        if not node.opens:
            return None
        return next((h.fd for h in self._handles_of(node) if h.generation == node.generation),
                    None)

    async def _status_json(self, caller: int) -> bytes:
        """The status document, computed afresh for every request.

        A getxattr caller asks twice, for the size and then the value (`getfattr`: size 0, then
        exactly that size; Python: 128 bytes, then 64 KiB), and the second answer must not be
        longer than the first. So the document given to a thread is remembered for a second: the
        thread's next request gets a fresh one padded with spaces (still JSON) to the same length,
        or, if the fresh one is longer, the remembered one itself."""
        assert self.status_provider is not None
        doc = json.dumps(await self.status_provider(), sort_keys=True).encode()
        now = time.monotonic()
        self._status_given = {pid: given for pid, given in self._status_given.items()
                              if now - given[0] < STATUS_PAIR_SECONDS}
        first = self._status_given.pop(caller, None)
        if first is None:
            self._status_given[caller] = (now, doc)
            return doc
        return doc.ljust(len(first[1])) if len(doc) <= len(first[1]) else first[1]

    @translate_errors
    async def setxattr(
        self, inode: InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if self._reserved_xattr(inode, name):
            raise FUSEError(errno.EPERM)
        node = self._node(inode)
        async with self._locked(node):  # never during a swap's publish, which would revert it
            self._xattr_call(node, os.setxattr, name, value)

    @translate_errors
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = [os.fsencode(n) for n in self._xattr_call(self._node(inode), os.listxattr)]
        names = [n for n in names if not self._reserved_xattr(inode, n)]
        if inode == ROOT_INODE and self.status_provider is not None:
            names.append(STATUS_XATTR)
        return names

    @translate_errors
    async def removexattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._reserved_xattr(inode, name):
            raise FUSEError(errno.EPERM)
        node = self._node(inode)
        try:
            async with self._locked(node):
                self._xattr_call(node, os.removexattr, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    # ------------------------------------------------------------------ filesystem
    @translate_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        now = time.monotonic()
        if self._statfs is not None and now - self._statfs[0] < 1.0:
            return self._statfs[1]  # editors and `df` poll this
        sv = os.statvfs(self.store.root_fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail"):
            setattr(data, field, getattr(sv, field))
        data.f_namemax = sv.f_namemax  # names whose `.zst` would not fit just stay plain
        self._statfs = (now, data)
        return data

    # ------------------------------------------------------------------ for the compactor
    def invalidate_attrs(self, node: Node) -> None:
        """Tell the kernel that a node's attributes (st_blocks, ctime) changed under it."""
        if node.lookups > 0:
            try:
                self.invalidate_inode(InodeT(node.ino), attr_only=True)
            except OSError as e:
                log.debug("invalidate_inode(%d): %s", node.ino, e)

