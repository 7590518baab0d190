"""The logical view of the store, by the table's inode numbers: `x.jsonl.zst` seen as `x.jsonl`.

`View` resolves logical names in directories the kernel knows (each through its directory's
descriptor, `FileTable.dir_fd`), gives the logical size and stat of a node, changes a node's
metadata on its backing object itself, and renames names with their representation. `fs.py`
translates between this and pyfuse3; here errors are OSErrors (`NoEntry` where a name resolves
to nothing, which a lookup answers with a negative entry).

Runs on the trio thread. Descriptors it gives out are borrowed until the next await; a method
that awaits resolves what it needs again afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any, cast

import trio

from zstfs import codec, privileges
from zstfs.openfiles import ROOT_INODE, Handle, Node, OpenFiles
from zstfs.store import RENAME_EXCHANGE, Entry, join, rename_at

log = logging.getLogger(__name__)


class NoEntry(FileNotFoundError):
    """The name resolves to nothing (or its directory has no name any more)."""

    def __init__(self) -> None:
        super().__init__(errno.ENOENT, os.strerror(errno.ENOENT))


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def codec_problem(e: codec.CorruptError) -> str:
    what = "cannot decode .zst" if isinstance(e, codec.DecodeLimitError) else "damaged .zst"
    return f"{what}: {e}"


def linked(entry: Entry | None) -> bool:
    """True if the file `entry` names has other names too (so removing this one leaves it)."""
    return entry is not None and not stat.S_ISDIR(entry.st.st_mode) and entry.st.st_nlink > 1


class View:
    def __init__(self, files: OpenFiles, *, read_threads: int = 2) -> None:
        self.files = files
        self.store = files.store
        self.rules = files.store.rules
        self.table = files.table
        self.handles = files.handles
        self.read_limiter = trio.CapacityLimiter(read_threads)

    # ------------------------------------------------------------------ nodes and names
    def node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None:
            raise _error(errno.ESTALE)
        return node

    def path(self, node: Node) -> bytes:
        path = self.table.path(node)
        if path is None:
            raise NoEntry()
        return path

    def describe(self, node: Node) -> str:
        path = self.table.path(node)
        return os.fsdecode(path) if path is not None else f"<inode {node.ino}>"

    def dir_path(self, ino: int) -> bytes:
        """A directory's path from the store root: for the naming rules and messages only.
        The backing store is reached through descriptors (`dfd`), never by this path."""
        node = self.node(ino)
        if not node.is_dir:
            raise _error(errno.ENOTDIR)
        return self.path(node)

    def dfd(self, ino: int) -> int:
        """The descriptor of directory `ino` (FileTable.dir_fd): names in it are resolved
        relative to it. Borrowed: valid until the next await."""
        node = self.node(ino)
        if not node.is_dir:
            raise _error(errno.ENOTDIR)
        return self.table.dir_fd(node)

    def at(self, node: Node) -> tuple[int, bytes, bytes]:
        """(descriptor of its directory, that directory's path, its name) for a node with a
        name; the descriptor is borrowed until the next await."""
        if not node.links:
            raise _error(errno.ENOENT)
        parent = self.table.get(node.links[0][0])
        if parent is None:
            raise _error(errno.ENOENT)
        return self.table.dir_fd(parent), self.path(parent), node.links[0][1]

    def check_name(self, parent_ino: int, name: bytes) -> None:
        """Names the view cannot create: zstfs's own and the `.zst` representations."""
        if not self.rules.visible(self.dir_path(parent_ino), name):
            raise _error(errno.EPERM)

    def known_node(self, parent_ino: int, name: bytes) -> Node | None:
        """The known node of (parent, name), or None."""
        node = self.table.by_link.get((parent_ino, name))
        if node is None:
            entry = self.store.resolve_in(self.dfd(parent_ino), self.dir_path(parent_ino), name)
            if entry is None:
                return None
            node = self.table.by_key.get((entry.st.st_dev, entry.st.st_ino))
        return node

    def node_at(self, parent_ino: int, name: bytes, entry: Entry) -> Node:
        return self.table.attach(parent_ino, name, entry.st, entry.compressed)

    # ------------------------------------------------------------------ sizes and stats
    async def logical_size(self, dfd: int, parent: bytes, zname: bytes,
                           st: os.stat_result) -> int:
        """The decoded size of `.zst` `zname` in directory `dfd` (`parent`). Opened here, on
        the trio thread (the directory's descriptor is only borrowed), read in a worker."""
        size = self.store.known_size(st)
        if size is None:
            try:
                fd = self.store.open_for_size(dfd, zname)
                try:
                    size = await trio.to_thread.run_sync(
                        self.store.size_of, fd, st, limiter=self.read_limiter)
                finally:
                    os.close(fd)
            except codec.CorruptError as e:
                # A damaged file still lists (with its stored size); reading it gives EIO.
                # (named like reads name it: one line per file)
                self.files.stats.error(
                    os.fsdecode(join(parent, self.rules.logical(parent, zname))),
                    codec_problem(e))
                self.store.remember_size(st, st.st_size)
                size = st.st_size
        return size

    async def resolve(self, parent_ino: int, name: bytes) -> tuple[Entry, int]:
        """The entry for a logical name in directory `parent_ino` and its logical size, or
        NoEntry."""
        parent = self.dir_path(parent_ino)
        entry = self.store.resolve_in(self.dfd(parent_ino), parent, name)
        if entry is None:
            raise NoEntry()
        if not entry.compressed:
            return entry, entry.st.st_size
        size = await self.logical_size(self.dfd(parent_ino), parent, entry.name, entry.st)
        # The await let other requests run: the directory may have been renamed or dropped.
        parent = self.dir_path(parent_ino)
        again = self.store.resolve_in(self.dfd(parent_ino), parent, name)
        if again is None:
            raise NoEntry()
        if again.compressed and (again.st.st_ino, again.st.st_size) != (
            entry.st.st_ino,
            entry.st.st_size,
        ):
            size = await self.logical_size(self.dfd(parent_ino), parent, again.name, again.st)
        return again, (size if again.compressed else again.st.st_size)

    async def entry(self, parent_ino: int, name: bytes) -> tuple[Node, os.stat_result, int]:
        """Resolve (parent, name) to a node (created if new), its stat and logical size; no
        lookup count."""
        entry, size = await self.resolve(parent_ino, name)
        return self.node_at(parent_ino, name, entry), entry.st, size

    async def stat(self, node: Node) -> tuple[os.stat_result, int]:
        """The node's backing stat and logical size."""
        if node.is_dir or node.ino == ROOT_INODE:
            # The directory itself, through its descriptor (whatever its name holds now).
            st = os.fstat(self.table.dir_fd(node))
            return st, st.st_size
        if self.table.path(node) is None:
            return await self._stat_unlinked(node)
        parent_ino, name = node.links[0]
        entry, size = await self.resolve(parent_ino, name)
        return entry.st, size

    async def _stat_unlinked(self, node: Node) -> tuple[os.stat_result, int]:
        """A file that was unlinked while open: from one of its descriptors."""
        fd = node.anon_fd
        reader = None
        if fd is None:
            for h in self.handles.of(node)[:1]:
                fd, reader = h.fd, h.reader
        if fd is None:
            raise _error(errno.ENOENT)
        st = os.fstat(fd)
        size = st.st_size
        if reader is not None and node.anon_fd is None:
            size = await trio.to_thread.run_sync(lambda: reader.size, limiter=self.read_limiter)
        return st, size

    # ------------------------------------------------------------------ listings
    async def current(self, dir_fd: int, parent: bytes,
                      names: list[bytes]) -> tuple[dict[bytes, Entry | None], bool]:
        """What each listed name in directory `dir_fd` (`parent`, a descriptor the caller owns)
        is now, not what it was when listed: a file swapped or promoted since has another
        backing inode, and a stale stat must never rekey the table. True with it if sizes were
        learnt meanwhile, which makes the entries stale (see `listed_entry`)."""
        current = {name: self.store.resolve_in(dir_fd, parent, name) for name in names}
        unknown = [e.name for e in current.values()
                   if e is not None and e.compressed and self.store.known_size(e.st) is None]
        if unknown:
            # One thread hop for the whole directory rather than one per compressed file:
            # a cold `find` or `grep -r` reads every seek table once.
            await trio.to_thread.run_sync(self.store.learn_sizes, dir_fd, unknown,
                                          limiter=self.read_limiter)
        return current, bool(unknown)

    async def listed_entry(self, dir_node: Node, name: bytes) -> tuple[Entry, int] | None:
        """The current entry of a listed name and its logical size, stat'ed after the last
        await (None if it is gone)."""
        for _ in range(3):
            parent = self.path(dir_node)
            dfd = self.table.dir_fd(dir_node)
            entry = self.store.resolve_in(dfd, parent, name)
            if entry is None:
                return None
            if not entry.compressed:
                return entry, entry.st.st_size
            size = self.store.known_size(entry.st)
            if size is not None:
                return entry, size
            await self.logical_size(dfd, parent, entry.name, entry.st)
        return None  # changing faster than it can be listed

    # ------------------------------------------------------------------ metadata
    def truncate(self, node: Node, handle: Handle | None, size: int) -> None:
        """Truncate a plain node: through `handle`, its anonymous copy, or its name."""
        if handle is not None:
            self.files.refresh(handle)
            os.ftruncate(handle.fd, size)
        elif node.anon_fd is not None:
            os.ftruncate(node.anon_fd, size)
        else:
            dfd, _, name = self.at(node)
            fd = self.store.open_plain(name, os.O_WRONLY, dir_fd=dfd)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        node.writes += 1

    async def setattr(self, node: Node, handle: Handle | None, *, size: int | None = None,
                      mode: int | None = None, owner: tuple[int, int] | None = None,
                      times: tuple[int | None, int | None] | None = None,
                      kill_suidgid: bool = False) -> tuple[os.stat_result, int]:
        """Truncate to `size`, chmod, chown (-1: unchanged) and set (atime, mtime) (None:
        unchanged) of a node, and clear set-uid/set-gid where the kernel says so
        (`privileges`); its stat and logical size after. Under the file's lock: a
        promotion or a swap's publish step never runs meanwhile, so the change lands on the
        file that results (and a swap never reverts it)."""
        files = self.files
        if size is not None:
            while node.swap is not None:
                await files.settle(node)

        async def attempt() -> tuple[os.stat_result, int]:
            async with files.hold(node):
                if size is not None:
                    files.abandon(node)  # one that started while we waited
                    # Truncation changes content: a compressed file becomes plain first.
                    await files.make_plain(node, empty=size == 0)
                    self.truncate(node, handle, size)
                target = self.target(node, handle)
                if mode is not None:
                    self.apply(target, lambda t: os.chmod(t, mode), node)
                if owner is not None:
                    self.apply(target, lambda t: os.chown(t, *owner), node)
                if times is not None:
                    current, _ = await self.stat(node)
                    ns = (current.st_atime_ns if times[0] is None else times[0],
                          current.st_mtime_ns if times[1] is None else times[1])
                    self.apply(target, lambda t: os.utime(t, ns=ns), node)
                if kill_suidgid:  # a truncation or chown (FATTR_KILL_SUIDGID)
                    self.apply(target, privileges.clear_suidgid, node)
                return await self.stat(node)

        return await files.unleased(node, os.O_WRONLY, attempt)

    def target(self, node: Node, handle: Handle | None) -> int | None:
        """A descriptor for metadata changes when the file has no name (unlinked but open)."""
        if self.table.path(node) is not None:
            return None
        if node.anon_fd is not None:
            return node.anon_fd
        if handle is not None:
            return handle.fd
        fd = self.handles.any_fd(node)
        if fd is None:
            raise _error(errno.ENOENT)
        return fd

    def apply(self, fd: int | None, change: Callable[[int | bytes], None], node: Node) -> None:
        """Apply a metadata change (chmod, chown, utime: given a descriptor or a path) to
        `fd`, else to the node's backing object itself (never decoding)."""
        if fd is not None:
            change(fd)
            return
        with self.backing_object(node) as path:
            change(path)

    def getxattr(self, node: Node, attr: bytes) -> bytes:
        """`attr` of the node's backing object (as `xattr_call` finds it); for a file, by name
        in one or two system calls where the kernel has getxattrat. (A directory keeps its own
        `O_PATH` descriptor, which getxattrat does not take.)"""
        if node.ino != ROOT_INODE and not node.is_dir:
            dfd, parent, name = self.at(node)
            value = self.store.getxattr_in(dfd, parent, name, attr)
            if value is not None:
                return value
        return cast(bytes, self.xattr_call(node, os.getxattr, attr))

    def xattr_call(self, node: Node, call: Callable[..., Any], *args: Any) -> Any:
        """Run an `os.*xattr` call on the node's backing file, never through the mount: the
        store's own descriptor for the root, the backing object itself for anything else (a
        symlink's own xattrs, never its target's)."""
        if node.ino == ROOT_INODE:
            return call(self.store.root_fd, *args)
        with self.backing_object(node) as path:
            return call(path, *args)

    @contextlib.contextmanager
    def backing_object(self, node: Node) -> Iterator[bytes]:
        """`/proc/self/fd/N` of the node's backing object itself: a directory's own descriptor,
        or the current representation (plain or `.zst`) of anything else opened O_PATH without
        following a symlink (a symlink is then the link itself). A change made through it never
        lands on whatever a name underneath was replaced by."""
        if node.is_dir or node.ino == ROOT_INODE:
            yield f"/proc/self/fd/{self.table.dir_fd(node)}".encode()
            return
        dfd, parent, name = self.at(node)
        entry = self.store.resolve_in(dfd, parent, name)
        if entry is None:
            raise _error(errno.ENOENT)
        fd = os.open(entry.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            yield f"/proc/self/fd/{fd}".encode()
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ renames
    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, *,
                     noreplace: bool = False, exchange: bool = False) -> None:
        """Rename a logical name with its representation (the caller holds the nodes' locks)."""
        if self.rules.path_aware:  # (awaits: everything below is resolved afterwards)
            await self._check_subtree_move(p_old, n_old, p_new, n_new)
            if exchange:
                await self._check_subtree_move(p_new, n_new, p_old, n_old)
        old_dir, new_dir = self.dir_path(p_old), self.dir_path(p_new)
        src = self.store.resolve_in(self.dfd(p_old), old_dir, n_old)
        if src is None:
            raise _error(errno.ENOENT)
        dst = self.store.resolve_in(self.dfd(p_new), new_dir, n_new)
        if noreplace and dst is not None:
            raise _error(errno.EEXIST)
        if src.compressed and not self.rules.compressible(new_dir, n_new):
            # The new name cannot have a .zst form: the file becomes plain first.
            await self.files.make_plain(self.node_at(p_old, n_old, src))
            old_dir, new_dir = self.dir_path(p_old), self.dir_path(p_new)
            src = self.store.resolve_in(self.dfd(p_old), old_dir, n_old)
            assert src is not None
        if exchange:
            await self._exchange(p_old, n_old, src, p_new, n_new, dst)
            return
        self.store.rename_entry(self.dfd(p_old), old_dir, n_old, src, self.dfd(p_new), new_dir,
                                n_new, dst, noreplace=noreplace)
        self.table.unlink(p_new, n_new, linked_elsewhere=linked(dst))
        self.table.move((p_old, n_old), (p_new, n_new))

    async def _exchange(self, p_old: int, n_old: bytes, src: Entry, p_new: int, n_new: bytes,
                        dst: Entry | None) -> None:
        if dst is None:
            raise _error(errno.ENOENT)
        for parent_ino, name, entry in ((p_old, n_old, src), (p_new, n_new, dst)):
            if entry.compressed:
                # Both sides must have the same form to swap names atomically.
                await self.files.make_plain(self.node_at(parent_ino, name, entry))
        old_fd, new_fd = self.dfd(p_old), self.dfd(p_new)
        src = self.store.resolve_in(old_fd, self.dir_path(p_old), n_old) or src
        dst = self.store.resolve_in(new_fd, self.dir_path(p_new), n_new) or dst
        rename_at(old_fd, src.name, new_fd, dst.name, RENAME_EXCHANGE)
        self.table.exchange((p_old, n_old), (p_new, n_new))

    async def _check_subtree_move(self, p_old: int, old_name: bytes, p_new: int,
                                  new_name: bytes) -> None:
        """With path-dependent patterns, moving a directory can change which `.zst` files inside
        it are compressed forms of files and which are files of their own: refuse such a move
        with EXDEV, so that `mv` copies the files (their logical content) instead."""
        try:
            st = os.stat(old_name, dir_fd=self.dfd(p_old), follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        old = join(self.dir_path(p_old), old_name)
        new = join(self.dir_path(p_new), new_name)
        changed = await trio.to_thread.run_sync(self.store.moved_representation, old, new)
        if changed is not None:
            log.info("rename %s -> %s refused (EXDEV): it would change what %s is",
                     os.fsdecode(old), os.fsdecode(new), os.fsdecode(changed))
            raise _error(errno.EXDEV)
