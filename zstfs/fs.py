"""The FUSE operations of zstfs: a protocol adapter only.

Each handler translates one pyfuse3 request (inode numbers, handle numbers, EntryAttributes,
FileInfo) into calls on the layers below and their answers back; `translate_errors` is the one
place where exceptions become errnos. Below: `view.py` (logical names, sizes and stats, metadata
changes, renames), `openfiles.py` (the file table, open handles, per-file locks through
`OpenFiles.hold`, promotion and swaps), `listing.py` (the readdir protocol, chosen at INIT),
`passthrough.py` (kernel passthrough), `xattrs.py` and `attrs.py` (what the kernel is told).

Concurrency contract: every handler runs on the trio thread. Table updates happen between awaits;
a handler that awaits (promotion, decoding, fsync) re-reads what it needs afterwards. Namespace
changes and opens of a file take that file's lock, so they wait for a promotion or a swap of it;
an open, truncation or removal of a file first abandons its compaction (`OpenFiles.settle`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileInfo, FUSEError, InodeT

from zstfs import codec, listing, privileges
from zstfs.attrs import (
    DIRECT_APPENDS,
    NEGATIVE,
    appending,
    dot,
    entry_attributes,
    file_info,
    keep_cache,
)
from zstfs.names import NAME_MAX
from zstfs.openfiles import Handle, Node, OpenFiles
from zstfs.passthrough import Passthrough
from zstfs.stats import Stats
from zstfs.store import join
from zstfs.view import NoEntry, View, codec_problem, linked
from zstfs.xattrs import Xattrs

log = logging.getLogger(__name__)

#: How long the reader polls for the next request (`Operations.spin_ns`): 50 µs covers the
#: think time of a process that sends one request after the other (see BENCHMARKS).
SPIN_NS = 50_000

_DOTS = {b".": 0, b"..": 1}
#: Entries one readdir call looks at: more than the kernel's largest reply (128 KiB) can hold.
READDIR_BATCH = 1024

#: fsync of a plain file up to this size runs on the trio thread: a thread hop costs more than
#: fsync of a small file (measured here: 190 µs vs 60-130 µs), and SQLite syncs its WAL at every
#: commit. Bigger files, and a handle whose last fsync took longer than INLINE_FSYNC_SLOW
#: seconds, sync on a worker thread, so no request waits long behind another's sync. A
#: directory's fsync (codex: after every file it creates) runs inline the same way, until one
#: of them is slow.
INLINE_FSYNC_LIMIT = 8 << 20
INLINE_FSYNC_SLOW = 0.02


P = ParamSpec("P")
R = TypeVar("R")


async def _sync(sync: Callable[[int], None], fd: int, inline: bool) -> bool:
    """`sync(fd)` on the trio thread if `inline`, else on a worker thread; whether it was slow
    (judged again at every sync: a thread's time also counts its hop, a fraction of the limit)."""
    started = time.monotonic()
    if inline:
        sync(fd)
    else:
        await trio.to_thread.run_sync(sync, fd)
    return time.monotonic() - started > INLINE_FSYNC_SLOW


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


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False  # appends must reach the backing file as the writer sent them
    # Read only by zstfs's build of pyfuse3 (contrib/pyfuse3; `pyfuse3.ZSTFS_PATCHES`), ignored by
    # a stock one. The kernel may keep directory listings: it drops one at every change made
    # through the mount, and when the directory's mtime has changed once its attributes expire
    # (CACHE_TIMEOUT), which is as long as any other change made behind the mount stays unseen;
    # zstfs's own swaps and promotions never change a listed name.
    enable_readdir_cache = True
    # Requests are read with one read(2), not spliced: zstfs copies every write into Python anyway.
    disable_splice_read = True
    # No OPENDIR/RELEASEDIR round trips: opendir answers ENOSYS, which a kernel that supports it
    # (5.1+) takes as success for good; readdir and fsyncdir then receive the directory's inode.
    # Reset at INIT where unsupported (a property: setting it picks the listing protocol).
    _by_inode = "directories_by_inode" in getattr(pyfuse3, "ZSTFS_PATCHES", ())
    # Files outside the patterns are opened in FUSE passthrough mode where Linux 6.9+, libfuse
    # 3.17+ and CAP_SYS_ADMIN allow: the kernel serves their reads, writes and mappings itself
    # (passthrough.py). Reset at INIT where unsupported; off after a refused registration.
    enable_passthrough = "enable_passthrough" in getattr(pyfuse3, "ZSTFS_PATCHES", ())
    # FUSE_HANDLE_KILLPRIV_V2 (libfuse 3.17+): writes stop asking for security.capability, and
    # set-uid/set-gid are cleared where a request says so (`kill_suidgid`; privileges.py).
    enable_killpriv_v2 = "enable_killpriv_v2" in getattr(pyfuse3, "ZSTFS_PATCHES", ())
    # While requests arrive back to back, the reader polls for the next one this long before it
    # sleeps: a process waiting on the mount then finds the daemon awake instead of paying for a
    # wake-up on another CPU (tens of µs on a VM). An idle daemon never polls. 0: off.
    spin_ns = SPIN_NS
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
        self.slow_dir_sync = False  # a directory's fsync was slow: the next one goes to a thread
        files.on_swapped = self.invalidate_attrs
        files.on_idle, files.on_moved = on_idle, on_moved
        self.handles = files.handles
        self.passthrough = Passthrough(files, self)
        self.view = View(files, read_threads=read_threads)
        self._protocols = (listing.Handles(self.table), listing.Inodes(self.table))
        self.dirs = self._protocols[0].dirs  # directory handles
        self.xattrs = Xattrs(self.view)
        self.xattrs.status_provider = status  # set by the mount once it can describe itself
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None
        self.root_uid = os.geteuid() == 0
        self.initialized = trio.Event()  # the kernel's INIT request has been answered (see init)
        self.listings: listing.Handles | listing.Inodes = self._protocols[0]
        self._choose_listings()

    def init(self) -> None:
        # pyfuse3 calls this while it handles the kernel's INIT request; the reply goes out as
        # this returns, before any task waiting on the event runs. pyfuse3 has just set
        # `directories_by_inode` to what the kernel allows.
        self._choose_listings()
        self.initialized.set()

    @property
    def directories_by_inode(self) -> bool:
        return self._by_inode

    @directories_by_inode.setter
    def directories_by_inode(self, on: bool) -> None:
        self._by_inode = on
        self._choose_listings()

    def _choose_listings(self) -> None:
        """The listing protocol (listing.py) for every opendir, readdir and fsyncdir from now
        on, as `directories_by_inode` says."""
        self.listings = self._protocols[bool(self.directories_by_inode)]

    # ------------------------------------------------------------------ helpers
    async def _entry(self, parent_ino: int, name: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        """Resolve (parent, name) to a node (created if new) and its attributes; no lookup count."""
        node, st, size = await self.view.entry(parent_ino, name)
        return node, entry_attributes(node.ino, st, size)

    async def _stat_node(self, node: Node) -> pyfuse3.EntryAttributes:
        return entry_attributes(node.ino, *await self.view.stat(node))

    # ------------------------------------------------------------------ lookups
    @translate_errors
    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if not self.rules.visible(self.view.dir_path(parent_inode), name):
            return NEGATIVE
        try:
            node, attrs = await self._entry(parent_inode, name)
        except NoEntry:
            # A negative entry the kernel caches (sqlite, git and codex probe absent names
            # all the time): safe because every name is made through the mount, whose
            # create, mkdir, mknod, symlink, link and rename replace it; the daemon never
            # makes a visible name appear by itself (swaps and promotions keep the name).
            return NEGATIVE
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
        return await self._stat_node(self.view.node(inode))

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
        f = fields
        st, size = await self.view.setattr(
            self.view.node(inode), self.handles.get(fh) if fh is not None else None,
            size=attr.st_size if f.update_size else None,
            mode=stat.S_IMODE(attr.st_mode) if f.update_mode else None,
            owner=((attr.st_uid if f.update_uid else -1, attr.st_gid if f.update_gid else -1)
                   if f.update_uid or f.update_gid else None),
            times=((attr.st_atime_ns if f.update_atime else None,
                    attr.st_mtime_ns if f.update_mtime else None)
                   if f.update_atime or f.update_mtime else None),
            kill_suidgid=kill_suidgid)
        return entry_attributes(inode, st, size)

    @translate_errors
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        dfd, _, name = self.view.at(self.view.node(inode))
        return os.readlink(name, dir_fd=dfd)

    # ------------------------------------------------------------------ directories
    @translate_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        return FileHandleT(self.listings.opendir(inode))

    @translate_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries from offset `start_id` on, paged as the listing protocol says."""
        node = self.listings.node(fh)
        parent = self.view.path(node)
        # A descriptor of our own (the node's is only borrowed, and O_PATH cannot be listed).
        dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self.table.dir_fd(node))
        try:
            # One getdents: cheaper inline than a thread hop.
            slots = self.listings.page(fh, start_id,
                                       lambda: self.store.list_names(parent, dir_fd))
            # No more than a reply can hold (a reply that stops early just brings the next
            # call): stat'ing every remaining name on every page made big directories quadratic.
            slots = slots[:READDIR_BATCH]
            current, stale = await self.view.current(
                dir_fd, parent, [name for name, _ in slots if name not in _DOTS])
        finally:
            os.close(dir_fd)
        for name, next_id in slots:
            if name in _DOTS:  # the kernel takes only their inode numbers (no lookup)
                if not self.readdir_reply(token, name, dot(node, _DOTS[name]), next_id):
                    return
                continue
            entry = current[name]
            if entry is None:
                continue
            if stale or (entry.compressed and self.store.known_size(entry.st) is None):
                found = await self.view.listed_entry(node, name)
                if found is None:
                    continue
                entry, size = found
            else:
                size = self.store.known_size(entry.st) if entry.compressed else entry.st.st_size
            child = self.table.attach(node.ino, name, entry.st, entry.compressed)
            attrs = entry_attributes(child.ino, entry.st, size)
            if not self.readdir_reply(token, name, attrs, next_id):
                self.table.maybe_drop(child)
                return
            child.lookups += 1

    @translate_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        self._protocols[0].releasedir(fh)

    @translate_errors
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        node = self.listings.node(fh)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.table.dir_fd(node))
        try:
            # Like a small file's fsync, on this thread until one of them is slow.
            self.slow_dir_sync = await _sync(os.fsync, fd, not self.slow_dir_sync)
        finally:
            os.close(fd)

    @translate_errors
    async def mkdir(
        self, parent_inode: InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.view.check_name(parent_inode, name)
        dfd = self.view.dfd(parent_inode)
        os.mkdir(name, stat.S_IMODE(mode) & ~ctx.umask, dir_fd=dfd)
        self._give_to_caller(dfd, name, ctx)
        return await self._new_entry(parent_inode, name)

    @translate_errors
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not self.rules.visible(self.view.dir_path(parent_inode), name):
            raise FUSEError(errno.ENOENT)
        st = os.stat(name, dir_fd=self.view.dfd(parent_inode), follow_symlinks=False)
        # A compaction abandoned by the unlink of the directory's last file may still have
        # its temp in there for a moment: let it clean up first.
        await self.files.settle_dir(codec.key_of(st))
        os.rmdir(name, dir_fd=self.view.dfd(parent_inode))
        self.table.unlink(parent_inode, name)

    @translate_errors
    async def symlink(
        self,
        parent_inode: InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self.view.check_name(parent_inode, name)
        dfd = self.view.dfd(parent_inode)
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
        self.view.check_name(parent_inode, name)
        parent, dfd = self.view.dir_path(parent_inode), self.view.dfd(parent_inode)
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
    @translate_errors
    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not self.rules.visible(self.view.dir_path(parent_inode), name):
            raise FUSEError(errno.ENOENT)
        async with self.files.hold(self.view.known_node(parent_inode, name)) as node:
            self.files.abandon(node)  # compressing a removed file is wasted work
            parent, dfd = self.view.dir_path(parent_inode), self.view.dfd(parent_inode)
            entry = self.store.resolve_in(dfd, parent, name)
            if not self.store.remove_forms(dfd, parent, name):
                raise FUSEError(errno.ENOENT)
            self.table.unlink(parent_inode, name, linked_elsewhere=linked(entry))

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
        if not self.rules.visible(self.view.dir_path(parent_inode_old), name_old):
            raise FUSEError(errno.ENOENT)
        self.view.check_name(parent_inode_new, name_new)
        hold = self.files.hold
        async with hold(self.view.known_node(parent_inode_old, name_old)) as src_node, \
                hold(self.view.known_node(parent_inode_new, name_new)) as dst_node:
            # A swap decided under the old name would fail to publish anyway.
            self.files.abandon(src_node)
            self.files.abandon(dst_node)
            old_path = join(self.view.dir_path(parent_inode_old), name_old)
            exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
            await self.view.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                   noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
                                   exchange=exchange)
            new_path = join(self.view.dir_path(parent_inode_new), name_new)
        self.files.moved(old_path, new_path, src_node, exchange=exchange)

    @translate_errors
    async def link(
        self,
        inode: InodeT,
        new_parent_inode: InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self.view.check_name(new_parent_inode, new_name)
        node = self.view.node(inode)
        # A hard link to a compressed file would be broken by its next promotion: link the
        # plain form instead.
        await self.files.make_plain(node)
        new_dir, new_fd = self.view.dir_path(new_parent_inode), self.view.dfd(new_parent_inode)
        if (self.rules.compressible(new_dir, new_name)
                and self.store.resolve_in(new_fd, new_dir, new_name)):
            raise FUSEError(errno.EEXIST)
        src_fd, _, src_name = self.view.at(node)
        os.link(src_name, new_name, src_dir_fd=src_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        return await self._new_entry(new_parent_inode, new_name)

    # ------------------------------------------------------------------ open files
    @translate_errors
    async def open(self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext,
                   kill_suidgid: bool = False) -> FileInfo:
        handle = await self.files.open(self.view.node(inode), flags)
        if privileges.kills_on_open(flags, kill_suidgid, self.enable_killpriv_v2, ctx.uid):
            privileges.clear_suidgid(handle.fd)
        return self._file_info(handle, keep_cache(handle))

    def _file_info(self, handle: Handle, keep_cache: bool) -> FileInfo:
        """The kernel's view of a new handle (counted already): kernel passthrough or not,
        direct I/O or not."""
        backing_id = self.passthrough.open(handle)
        direct = self.direct_appends and appending(handle.flags) and not backing_id
        return file_info(handle.fh, keep_cache, backing_id, direct)

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
        self.view.check_name(parent_inode, name)
        parent, dfd = self.view.dir_path(parent_inode), self.view.dfd(parent_inode)
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
        self.handles.add(handle)
        return self._file_info(handle, True), entry_attributes(node.ino, st, st.st_size)

    @translate_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        h = self.handles[fh]
        self.files.refresh(h)
        reader = h.reader
        if reader is None:
            return os.pread(h.fd, size, off)
        try:
            if h.inline:
                return reader.read(off, size)
            data = reader.read_cached(off, size)
            if data is None:
                data = await trio.to_thread.run_sync(reader.read, off, size,
                                                     limiter=self.view.read_limiter)
        except codec.CorruptError as e:
            e.zstfs_path = self.view.describe(h.node)  # type: ignore[attr-defined]
            if not isinstance(e, codec.BudgetBusyError):
                self.store.note_damaged(os.fstat(h.fd), e)
            raise
        return data

    @translate_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes,
                    kill_suidgid: bool = False) -> int:
        h = self.handles[fh]
        if h.node.compressed:
            await self.files.make_plain(h.node)
        self.files.refresh(h)
        privileges.before_write(h.fd, kill_suidgid)
        n = self.store.write_all(h.fd, buf, off)
        h.wrote = True
        h.node.writes += 1
        return n

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
        inline = not h.slow_sync and os.fstat(h.fd).st_size <= INLINE_FSYNC_LIMIT
        h.slow_sync = await _sync(os.fdatasync if datasync else os.fsync, h.fd, inline)

    @translate_errors
    async def release(self, fh: FileHandleT) -> None:
        self.passthrough.release(self.handles[fh])
        self.files.release(fh)

    # ------------------------------------------------------------------ xattrs
    # (ENODATA is pyfuse3.ENOATTR on Linux)
    @translate_errors
    async def getxattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.xattrs.get(inode, name, ctx.pid)

    @translate_errors
    async def setxattr(
        self, inode: InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.xattrs.set(inode, name, value)

    @translate_errors
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.xattrs.list(inode)

    @translate_errors
    async def removexattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.xattrs.remove(inode, name)

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

