"""Who has what open, and what may be swapped: the one owner of that question.

`FileTable` is the table of files the daemon knows (inode numbers, names, open counts, per-file
locks); `OpenFiles` wraps it with the two steps that change a file's representation, which the
filesystem layer and the compactor both call: `promote` (`.zst` → plain, before a write) and
`compact` (a `swap.py` plan run under `MountGuard`, for the compactor).

"Open" is the kernel's notion, not ours: a swap holds a write lease on the plain file from before
it reads it until after the plain name is gone (`swap.py`, `leases.py`), so any descriptor or
mapping anywhere, through the mount or not, opened before the mount or during the swap, stops
it. Opens through the mount are also counted here, and an open of a file whose swap is in
flight first abandons that swap and waits for it to let go, so the daemon never blocks on its
own lease. A swap is published only under the file's lock, only if the name in the directory it
resolved (beneath the store root, no symlinks) still holds the very file it compressed.

The table's methods run on the trio thread and never await, so each is atomic with respect to
FUSE requests.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import trio

from zstfs import codec, leases
from zstfs.handles import INLINE_DECODE_LIMIT, Handle, HandleTable
from zstfs.names import zst_name
from zstfs.stats import Stats
from zstfs.store import Changed, Leased, Store, join, split
from zstfs.swap import (
    Outcome,
    PairExists,
    Plan,
    Swap,
    Swapper,
    Unadoptable,
    outcome_of,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

ROOT_INODE = 1
R = TypeVar("R")
#: Open flags that are the kernel's business, not the backing file's.
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
#: Numbers for files whose natural number is taken by another live file start here (far above
#: any inode number a real filesystem hands out).
FALLBACK_INODE_BASE = 1 << 62
#: How many representation changes (swap, promotion) are remembered after the kernel forgot the
#: file, so that its inode number stays the same when it is looked up again.
ALIAS_LIMIT = 200_000

Key = codec.FileKey  # (st_dev, st_ino) of the backing file
key_of = codec.key_of
#: Directory descriptors used within this many `FileTable.dir_fd` calls are never closed to
#: make room (see `_close_idle_dir_fds`).
DIR_FD_GRACE = 256


def dir_fds_budget() -> int:
    """How many directory descriptors the table may hold: half the open-files limit (the mount
    raises it to the hard limit first), and never fewer than DIR_FD_GRACE."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(DIR_FD_GRACE, soft // 2)


def blocks_opens(lease: int) -> bool:
    """Must an open through the mount abandon a swap holding `lease` first? Under a write lease
    any open of the file, the daemon's own too, would wait for the swap. Under a read lease (a
    `.zst` being re-encoded) readers go on, and a write promotes under the file's lock."""
    return lease == leases.WRITE


class SwapTicket:
    """A compaction in flight: how the trio side asks the worker thread to give up, and how it
    learns that the worker let go of the file (lease released, temp removed)."""

    __slots__ = ("_abandon", "blocks_opens", "dir_key", "done", "file_key")

    def __init__(self, dir_key: Key, file_key: Key, lease: int = leases.WRITE) -> None:
        self._abandon = threading.Event()
        self.done = trio.Event()
        self.dir_key = dir_key  # the directory holding its temp
        self.file_key = file_key  # the file it leases
        self.blocks_opens = blocks_opens(lease)

    def abandon(self) -> None:
        self._abandon.set()

    def abandoned(self) -> bool:
        return self._abandon.is_set()


class Node:
    """One logical file or directory, stable across changes of representation."""

    __slots__ = (
        "_lock",
        "anon_fd",
        "claims",
        "compressed",
        "dir_fd",
        "generation",
        "ino",
        "is_dir",
        "key",
        "links",
        "lookups",
        "opens",
        "seen",
        "swap",
        "writes",
    )

    def __init__(self, ino: int, st: os.stat_result, compressed: bool) -> None:
        self.ino = ino
        self.is_dir = stat.S_ISDIR(st.st_mode)
        self.key: Key | None = key_of(st)
        self.compressed = compressed
        self.links: list[tuple[int, bytes]] = []  # (parent inode, logical name), first is used
        self.lookups = 0  # the kernel's references (lookup, create, readdirplus entries)
        self.opens = 0  # open handles (kernel open/create minus release; mmaps hold one)
        self.claims = 0  # the compactor's references while it works on the file
        self.generation = 0  # bumped when the representation changes (promote or swap)
        self.writes = 0  # bumped on every change of content through the mount
        self._lock: trio.Lock | None = None
        self.seen: tuple[int, int] | None = None  # (size, mtime_ns) at the last open
        self.anon_fd: int | None = None  # content of an unlinked file promoted while open
        self.swap: SwapTicket | None = None  # the compaction of this file in flight
        #: A directory's O_PATH descriptor, held while the node lives (FileTable.dir_fd).
        self.dir_fd: int | None = None

    @property
    def lock(self) -> trio.Lock:
        """Held by open, promote, swap and namespace changes (created on first use: most nodes
        never need one, and a tree walk creates hundreds of thousands of nodes)."""
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    @property
    def busy(self) -> bool:
        return self._lock is not None and self._lock.locked()


class FileTable:
    def __init__(self, root_fd: int) -> None:
        root_st = os.fstat(root_fd)
        root = Node(ROOT_INODE, root_st, False)
        root.lookups = 1 << 62  # never forgotten
        root.dir_fd = root_fd  # the store's (closed with the store, never here)
        #: Directories holding a descriptor (root aside), least recently used first, with the
        #: tick of their last use; at most `dir_fds_max` of them (see `dir_fd`).
        self._dir_fds: OrderedDict[Node, int] = OrderedDict()
        self._tick = 0
        self.dir_fds_max = dir_fds_budget()
        self.nodes: dict[int, Node] = {ROOT_INODE: root}
        self.by_key: dict[Key, Node] = {key_of(root_st): root}
        self.by_link: dict[tuple[int, bytes], Node] = {}
        self._next_fallback = FALLBACK_INODE_BASE
        self._aliases: OrderedDict[Key, int] = OrderedDict()
        #: Files being swapped, by (directory key, name): a lookup that finds the new `.zst`
        #: before the swap rekeys its node must get that node, not a second one.
        self.pending: dict[tuple[Key, bytes], Node] = {}

    def _number_for(self, st: os.stat_result) -> int:
        """The inode number a backing file shows under.

        Normally the backing file's own st_ino, so numbers survive the kernel forgetting a file
        (and even a remount) at no memory cost. A file whose backing inode changed with its
        representation keeps its first number through a bounded alias table. A number already
        used by another live file (a reused backing inode, another device) gets a fallback.
        """
        key = key_of(st)
        number = self._aliases.get(key, st.st_ino)
        holder = self.nodes.get(number)
        if holder is not None and holder.key != key:
            number = self._next_fallback
            self._next_fallback += 1
        return number

    def _new_node(self, st: os.stat_result, compressed: bool) -> Node:
        node = Node(self._number_for(st), st, compressed)
        self.nodes[node.ino] = node
        self.by_key[key_of(st)] = node
        return node

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def path(self, node: Node) -> bytes | None:
        """The node's path relative to the store root, or None once it has no name."""
        if node.ino == ROOT_INODE:
            return b"."
        if not node.links:
            return None
        parent_ino, name = node.links[0]
        parent = self.nodes.get(parent_ino)
        if parent is None:
            return None
        parent_path = self.path(parent)
        return None if parent_path is None else join(parent_path, name)

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def node_at(self, path: bytes) -> Node | None:
        """The node a path from the store root names, if the table knows every component."""
        node: Node | None = self.nodes[ROOT_INODE]
        for part in path.split(b"/"):
            if part in (b"", b"."):
                continue
            if node is None:
                return None
            node = self.by_link.get((node.ino, part))
        return node

    def dir_fd(self, node: Node) -> int:
        """A descriptor of directory `node`, which names in it are resolved relative to (one
        component at a time, so no path is ever built from the store root: no PATH_MAX, and
        no symlink followed at any component). Opened from its parent's descriptor by name,
        with O_NOFOLLOW, and kept only if it is the very directory the node stands for; held
        until the node is dropped, so it follows the directory through renames. A directory
        replaced underneath the mount (by another one, or by a symlink) is ENOENT."""
        self._tick += 1
        if node.dir_fd is not None:
            if node in self._dir_fds:
                self._dir_fds[node] = self._tick
                self._dir_fds.move_to_end(node)
            return node.dir_fd
        chain = []  # from `node` up to the nearest ancestor that has a descriptor
        at: Node | None = node
        while at is not None and at.dir_fd is None:
            if not at.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            if not at.links or at.key is None:
                raise FileNotFoundError(errno.ENOENT, "the directory has no name")
            chain.append(at)
            at = self.nodes.get(at.links[0][0])
        if at is None:
            raise FileNotFoundError(errno.ENOENT, "the directory's parent is gone")
        parent_fd = at.dir_fd
        assert parent_fd is not None
        for d in reversed(chain):
            fd = os.open(d.links[0][1], os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent_fd)
            if key_of(os.fstat(fd)) != d.key:
                os.close(fd)
                raise FileNotFoundError(errno.ENOENT, "the directory was replaced underneath")
            d.dir_fd = parent_fd = fd
            self._dir_fds[d] = self._tick
        self._close_idle_dir_fds()
        return parent_fd

    def _close_idle_dir_fds(self) -> None:
        """Past `dir_fds_max` descriptors (a `find` over a tree of many directories), close
        the least recently used ones; they are opened again from their parents, by name, when
        next needed. Never one used in the last DIR_FD_GRACE calls: a caller may hold the
        descriptors it was given until its next await, and no request asks for that many."""
        while len(self._dir_fds) > self.dir_fds_max:
            oldest, used = next(iter(self._dir_fds.items()))
            if used > self._tick - DIR_FD_GRACE:
                return
            self._forget_dir_fd(oldest)

    def _forget_dir_fd(self, node: Node) -> None:
        if node.dir_fd is not None and node.ino != ROOT_INODE:
            os.close(node.dir_fd)
            node.dir_fd = None
        self._dir_fds.pop(node, None)

    def find(self, parent: int, name: bytes, st: os.stat_result | None) -> Node | None:
        """The node known under (parent, name), if it is still the file `st` describes."""
        node = self.by_link.get((parent, name))
        if node is None:
            if st is None:
                return None
            node = self.by_key.get(key_of(st))
            if node is None and self.pending:
                parent_node = self.nodes.get(parent)
                if parent_node is not None and parent_node.key is not None:
                    node = self.pending.get((parent_node.key, name))
            return node
        if st is None or node.key == key_of(st) or node.busy:
            # A busy node is mid-swap: its backing inode is about to change, the file is the same.
            return node
        self.unlink(parent, name)
        return self.by_key.get(key_of(st))

    def attach(self, parent: int, name: bytes, st: os.stat_result, compressed: bool) -> Node:
        """The node for (parent, name) backed by `st`, created if new; the link is recorded."""
        node = self.find(parent, name, st)
        if node is None:
            node = self._new_node(st, compressed)
        elif not node.busy and node.key != key_of(st):
            self.rekey(node, st, compressed)
        if (parent, name) not in self.by_link:
            self.by_link[(parent, name)] = node
            node.links.append((parent, name))
        return node

    def claim(self, st: os.stat_result, compressed: bool = False) -> Node:
        """The node for a backing file found by the compactor, held until `unclaim`."""
        node = self.by_key.get(key_of(st))
        if node is None:
            node = self._new_node(st, compressed)
        node.claims += 1
        return node

    def unclaim(self, node: Node) -> None:
        node.claims -= 1
        self.maybe_drop(node)

    def rekey(self, node: Node, st: os.stat_result, compressed: bool) -> None:
        """The node's backing file was replaced (promotion or swap): same file, new inode."""
        if node.key is not None and self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        node.key = key_of(st)
        node.compressed = compressed
        node.generation += 1
        self.by_key[node.key] = node
        if node.ino != st.st_ino:
            self._aliases[node.key] = node.ino
            self._aliases.move_to_end(node.key)
            if len(self._aliases) > ALIAS_LIMIT:
                self._aliases.popitem(last=False)

    def unlink(self, parent: int, name: bytes, *, linked_elsewhere: bool = False) -> Node | None:
        """(parent, name) is gone. `linked_elsewhere`: the file has other names (hard links the
        table may not know yet), so it keeps its identity and is found by them later."""
        node = self.by_link.pop((parent, name), None)
        if node is None:
            return None
        node.links.remove((parent, name))
        if (not node.links and not linked_elsewhere and node.key is not None
                and self.by_key.get(node.key) is node):
            # Gone from the namespace: its backing inode number may be reused by a new file.
            del self.by_key[node.key]
            node.key = None
        self.maybe_drop(node)
        return node

    def move(self, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        node = self.by_link.pop(old, None)
        if node is None:
            return
        node.links[node.links.index(old)] = new
        self.by_link[new] = node

    def exchange(self, a: tuple[int, bytes], b: tuple[int, bytes]) -> None:
        """The names `a` and `b` were swapped (RENAME_EXCHANGE)."""
        first, second = self.by_link.pop(a, None), self.by_link.pop(b, None)
        for node, old, new in ((first, a, b), (second, b, a)):
            if node is not None:
                node.links[node.links.index(old)] = new
                self.by_link[new] = node

    def at(self, node: Node) -> tuple[int, bytes, bytes]:
        """(descriptor of its directory, that directory's path, its name) for a node with a
        name; the descriptor is borrowed until the next await."""
        parent = self.nodes.get(node.links[0][0]) if node.links else None
        path = None if parent is None else self.path(parent)
        if parent is None or path is None:
            raise FileNotFoundError(errno.ENOENT, "the file has no name")
        return self.dir_fd(parent), path, node.links[0][1]

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.lookups -= n
            self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        if node.lookups > 0 or node.opens > 0 or node.claims > 0 or node.ino == ROOT_INODE:
            return
        if node.busy:
            return
        del self.nodes[node.ino]
        if node.key is not None and self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        for link in node.links:
            if self.by_link.get(link) is node:
                del self.by_link[link]
        node.links.clear()
        if node.anon_fd is not None:
            os.close(node.anon_fd)
            node.anon_fd = None
        self._forget_dir_fd(node)


class OpenFiles:
    """The file table, the handles open through the mount, and the promote and swap steps, over
    one store."""

    def __init__(self, store: Store, stats: Stats) -> None:
        self.store = store
        self.stats = stats
        self.table = FileTable(store.root_fd)
        self.handles = HandleTable()
        #: Called with the path of a plain file under a name the patterns take once nobody has
        #: it open (released, or renamed while closed): the compactor queues it.
        self.on_idle: Callable[[bytes], None] | None = None
        #: Called with (old path, new path) of a file or directory renamed through the mount.
        self.on_moved: Callable[[bytes, bytes], None] | None = None
        self.swaps: set[SwapTicket] = set()
        #: Called after a node's representation changed under the kernel's caches (a swap).
        self.on_swapped: Callable[[Node], None] = lambda node: None
        #: A test seam: awaited at each named step of `compact` and `promote` (with the path),
        #: so that in-process tests can force every interleaving with other operations.
        self.step: Callable[[str, bytes], Awaitable[None]] | None = None

    async def _step(self, what: str, path: bytes) -> None:
        if self.step is not None:
            await self.step(what, path)

    # ------------------------------------------------------------------ opening
    async def settle(self, node: Node) -> None:
        """Before the daemon opens, truncates or removes a file's backing form: abandon its
        compaction, if one is in flight, and wait until that has let go of the file."""
        ticket = node.swap
        if ticket is not None:
            ticket.abandon()
            await ticket.done.wait()

    async def settle_dir(self, dir_key: Key) -> None:
        """Before a directory is removed: abandon the compactions whose temps are in it."""
        for ticket in [t for t in self.swaps if t.dir_key == dir_key]:
            ticket.abandon()
            await ticket.done.wait()

    async def settle_file(self, key: Key) -> bool:
        """Abandon the compaction leasing backing file `key` (found by a non-blocking open that
        would have waited), wait for it to let go; False if no swap of ours holds it."""
        tickets = [t for t in self.swaps if t.file_key == key]
        for ticket in tickets:
            ticket.abandon()
            await ticket.done.wait()
        return bool(tickets)

    def abandon(self, node: Node | None) -> None:
        """The file was removed or renamed: its compaction (if any) need not go on, and its
        old name, which another file may take now, no longer leads to it."""
        if node is not None and node.swap is not None:
            node.swap.abandon()
            for where in [k for k, n in self.table.pending.items() if n is node]:
                del self.table.pending[where]

    # ------------------------------------------------------------------ open handles
    @contextlib.asynccontextmanager
    async def hold(self, node: Node | None) -> AsyncIterator[Node | None]:
        """Hold `node`'s lock (nothing for None), the node kept in the table meanwhile: the one
        way a task takes a file's lock (s3ql's `MultiLock`, keyed by node). A free lock is taken
        without a trip through the scheduler (one task switch fewer per setattr)."""
        if node is None:
            yield None
            return
        node.claims += 1
        try:
            if node.lock.locked():
                await node.lock.acquire()
            else:
                node.lock.acquire_nowait()
            try:
                yield node
            finally:
                node.lock.release()
        finally:
            node.claims -= 1
            self.table.maybe_drop(node)

    async def open(self, node: Node, flags: int) -> Handle:
        """Open `node` for the kernel: a handle on its current representation, counted as an
        open (in `handles`) until `release`."""
        return await self.unleased(node, flags, lambda: self._open(node, flags))

    async def unleased(self, node: Node, flags: int, attempt: Callable[[], Awaitable[R]]) -> R:
        """Run `attempt`, which opens a backing file without waiting on a lease (Leased). If
        the file is leased, a swap of ours (found by its inode, in case the kernel reached it
        through another node) gives up, anyone else's lease is waited out in a worker thread
        (never on the thread that serves every request), and it is tried again; a file leased
        over and over ends in EAGAIN."""
        for _ in range(3):
            try:
                return await attempt()
            except Leased as e:
                if not await self.settle_file(e.key):
                    dfd, _, name = self.table.at(node)
                    owned = os.dup(dfd)  # (the node's is borrowed: the thread outlives an await)
                    try:
                        await trio.to_thread.run_sync(self.store.wait_unleased, owned, name,
                                                      flags)
                    finally:
                        os.close(owned)
        return await attempt()

    async def _open(self, node: Node, flags: int) -> Handle:
        while node.swap is not None and node.swap.blocks_opens:
            # Its compaction holds a lease: opening the backing file now would block this
            # thread on our own lease. Make it give up first. (A re-encoding of a `.zst` holds
            # only a read lease: readers go on, and a write promotes under the file's lock.)
            await self.settle(node)
        if not node.busy and not (flags & os.O_TRUNC and node.compressed):
            # Nobody holds the lock and nothing below awaits: the open is atomic with respect
            # to swaps without taking the lock (a lock round trip per open shows in `grep -r`).
            return self._open_now(node, flags)
        async with self.hold(node):
            if flags & os.O_ACCMODE != os.O_RDONLY and flags & os.O_TRUNC:
                await self.make_plain(node, empty=True)
            return self._open_now(node, flags)

    def _open_now(self, node: Node, flags: int) -> Handle:
        handle = self.open_handle(node, flags)
        if flags & os.O_ACCMODE != os.O_RDONLY and flags & os.O_TRUNC:
            os.ftruncate(handle.fd, 0)
            node.writes += 1
        self.handles.add(handle)
        return handle

    def open_handle(self, node: Node, flags: int) -> Handle:
        """A handle on the node's current representation (never decodes), not yet counted."""
        backing_flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        same = self.current_fd(node)
        if same is not None:
            # Unlinked (but open elsewhere): reopen that very inode through its descriptor.
            return Handle(node, os.open(f"/proc/self/fd/{same}", backing_flags), flags, None)
        if node.ino == ROOT_INODE:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        dfd, parent, name = self.table.at(node)
        entry = self.store.resolve_in(dfd, parent, name)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        if entry.compressed:
            try:
                fd = self.store.open_compressed(entry.name, entry.st, dir_fd=dfd)
            except codec.CorruptError as e:
                e.zstfs_path = os.fsdecode(join(parent, entry.name))  # type: ignore[attr-defined]
                raise
            reader = codec.ZstReader(fd, self.store.decoders)
            size = self.store.known_size(entry.st)
            return Handle(node, fd, flags, reader, size is not None and size <= INLINE_DECODE_LIMIT)
        return Handle(node, self.store.open_plain(name, backing_flags, dir_fd=dfd), flags, None)

    def current_fd(self, node: Node) -> int | None:
        """For a node with no name: a descriptor of its current plain content (its anonymous
        promotion, or a handle opened since its last promotion), else None."""
        if node.anon_fd is not None:
            return node.anon_fd
        if self.table.path(node) is not None:
            return None
        return self.handles.plain_fd(node)

    def refresh(self, handle: Handle) -> None:
        """Point a handle at the node's current representation after a promotion. The old
        descriptor stays open until release: a read on a worker thread may still use it."""
        node = handle.node
        if handle.generation == node.generation:
            return
        try:
            fresh = self.open_handle(node, handle.flags)
        except FileNotFoundError:
            if handle.flags & os.O_ACCMODE != os.O_RDONLY or node.compressed:
                raise
            # Promoted, then removed, and every descriptor of the new form is closed: nobody
            # can see that content any more; this reader goes on with what it had.
            handle.generation = node.generation
            return
        handle.retired.append(handle.fd)
        handle.fd, handle.reader, handle.generation = fresh.fd, fresh.reader, fresh.generation
        handle.inline = fresh.inline

    async def make_plain(self, node: Node, *, empty: bool = False) -> None:
        """Before a change of content: a compressed node becomes plain, and its handles with it."""
        if node.compressed:
            await self.promote(node, empty=empty, source_fd=self.handles.any_fd(node))
            # Every handle moves to the plain file now, while it has a name: a writer left on
            # the `.zst` until its next request could find the file removed meanwhile and
            # nothing left to reopen (ENOENT from write(2) on an open descriptor).
            for h in self.handles.of(node):
                self.refresh(h)

    def release(self, fh: int) -> Handle:
        """The kernel's last reference to handle `fh` is gone: close it, uncount the open."""
        h = self.handles.remove(fh)
        node = h.node
        if h.wrote:
            st = os.fstat(h.fd)
            node.seen = (st.st_size, st.st_mtime_ns)  # our own writes kept the page cache right
        os.close(h.fd)
        for fd in h.retired:
            os.close(fd)
        if node.opens == 0:
            self.rested(node)
        self.table.maybe_drop(node)
        return h

    def rested(self, node: Node, path: bytes | None = None) -> None:
        """A file nobody has open may now be compressed: tell the compactor if it is plain
        and its name (`path`, else its current one) is one the patterns take."""
        if node.opens or node.compressed or node.is_dir or self.on_idle is None:
            return
        path = self.table.path(node) if path is None else path
        if path is not None and self.store.rules.compressible(*split(path)):
            self.on_idle(path)

    def moved(self, old_path: bytes, new_path: bytes, node: Node | None, *,
              exchange: bool = False) -> None:
        """Tell the compactor where a renamed file (or directory) is now, so a cold file moved
        by `codex archive` stays queued; an exchange moved both."""
        if self.on_moved is None:
            return
        if exchange:
            tmp = b"\0exchange"
            self.on_moved(old_path, tmp)
            self.on_moved(new_path, old_path)
            self.on_moved(tmp, new_path)
        else:
            self.on_moved(old_path, new_path)
        if node is not None:
            self.rested(node, new_path)

    # ------------------------------------------------------------------ promotion
    async def promote(self, node: Node, *, empty: bool = False,
                      source_fd: int | None = None) -> None:
        """Make a compressed node plain, holding its lock (taken here unless the calling task
        already holds it: trio locks are not reentrant). A node without a name (unlinked while
        open) is decoded from `source_fd` into an unnamed file that lives as long as it."""
        if not node.compressed:
            return
        if node.lock.statistics().owner is trio.lowlevel.current_task():
            await self._promote_locked(node, empty=empty, source_fd=source_fd)
            return
        async with self.hold(node):
            await self._promote_locked(node, empty=empty, source_fd=source_fd)

    async def _promote_locked(self, node: Node, *, empty: bool, source_fd: int | None) -> None:
        if not node.compressed:
            return
        path = self.table.path(node)
        if path is None or node.key is None:
            await self._promote_anonymous(node, empty=empty, source_fd=source_fd)
            return
        parent_ino, name = node.links[0]
        parent = self.table.get(parent_ino)
        if parent is None:
            raise FileNotFoundError(errno.ENOENT, "the file's directory is gone")
        # The directory's own descriptor, taken now, under the lock: the promotion happens in
        # that very directory even if it is renamed while the file decodes.
        dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self.table.dir_fd(parent))
        try:
            await self._step("promoting", path)
            st = await trio.to_thread.run_sync(self.store.with_room, functools.partial(
                self.store.promote_at, dir_fd, name, empty=empty, expect=node.key))
        except (FileNotFoundError, BlockingIOError):
            raise  # gone meanwhile, or leased: not a failure of the store
        except OSError as e:
            # The writer gets the errno; status and the log say which file and why (damage is
            # reported where it becomes EIO).
            self.stats.error(os.fsdecode(path), f"cannot make it plain for writing: {e}")
            raise
        finally:
            os.close(dir_fd)
        self.table.rekey(node, st, False)
        self.stats.promotions += 1
        log.debug("promoted %s", os.fsdecode(path))

    async def _promote_anonymous(self, node: Node, *, empty: bool, source_fd: int | None) -> None:
        if source_fd is None:
            raise FileNotFoundError(2, "the file has no name and no open descriptor")
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                     dir_fd=self.store.root_fd)
        try:
            if not empty:
                await trio.to_thread.run_sync(codec.decompress_file, source_fd, fd)
        except BaseException:
            os.close(fd)
            raise
        node.anon_fd = fd
        node.compressed = False
        node.generation += 1

    # ------------------------------------------------------------------ compaction
    def open_dir(self, path: bytes) -> int:
        """A descriptor of directory `path` (from the store root) that the caller owns: from
        the table's descriptor of that directory where the kernel knows it (the mechanism every
        request uses: no PATH_MAX, no symlink), else resolved beneath the root with no symlink
        followed (`Store.open_dir`)."""
        node = self.table.node_at(path)
        if node is not None and node.is_dir:
            try:
                return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                               dir_fd=self.table.dir_fd(node))
            except FileNotFoundError:
                pass  # replaced underneath: resolve the path as it is now
        return self.store.open_dir(path)

    def lstat(self, path: bytes) -> os.stat_result:
        """`lstat` of `path` from the store root, through the table's descriptor of its
        directory where the kernel knows it (any depth), else resolved from the root."""
        parent, name = split(path)
        node = self.table.node_at(parent)
        if node is not None and node.is_dir:
            with contextlib.suppress(FileNotFoundError):
                return os.stat(name, dir_fd=self.table.dir_fd(node), follow_symlinks=False)
        return self.store.lstat(path)

    def identity_of(self, path: bytes) -> tuple[object, ...] | None:
        """What a decision to leave `path` alone depended on: the plain file's identity and
        ctime, and its `.zst`'s identity if any. None if the plain file is gone."""
        parent, name = split(path)
        try:
            dir_fd = self.open_dir(parent)
        except OSError:
            return None
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            ident: tuple[object, ...] = (codec.identity_of(st), st.st_ctime_ns)
            try:
                z = os.stat(zst_name(name), dir_fd=dir_fd, follow_symlinks=False)
                ident += (codec.identity_of(z),)
            except FileNotFoundError:
                pass
            return ident
        except OSError:
            return None
        finally:
            os.close(dir_fd)

    async def compact(self, path: bytes, plan: Plan, *, limiter: trio.CapacityLimiter,
                      not_before: float) -> Outcome:
        """Run `plan` (`swap.Compress`, or `swap.Adopt` for a `NAME.zst` not in zstfs's format)
        on `path` under this table's guard, if it is still an eligible file with an mtime at or
        before `not_before` that nobody has open. The answer says what happened."""
        try:
            return await Swapper(self.store, plan, path,
                                 MountGuard(self, limiter, not_before)).run()
        except (Unadoptable, PairExists, Changed) as e:
            return outcome_of(e)


class MountGuard:
    """The guard of a swap on the mount (`swap.Guard`): the file's node is claimed in the table
    and carries a `SwapTicket` (an open, truncation, removal or rename through the mount
    abandons the swap and waits for it to let go); the bulk steps run in worker threads under
    the compaction limiter; the publication holds the node's lock, shielded from cancellation,
    so that no open through the mount slips into it."""

    def __init__(self, files: OpenFiles, limiter: trio.CapacityLimiter,
                 not_before: float) -> None:
        self.files = files
        self.limiter = limiter
        self.not_before = not_before
        self.expect: os.stat_result | None = None
        self.node: Node | None = None
        self.ticket: SwapTicket | None = None
        self.name = b""

    def open_dir(self, parent: bytes) -> int | None:
        try:
            return self.files.open_dir(parent)
        except OSError:
            return None  # gone, or a symlink now: never followed

    def claim(self, plan: Plan, path: bytes, dir_fd: int) -> Outcome | None:
        """An eligible file, cold enough, that nobody has open through the mount: its node is
        claimed and gets the swap's ticket."""
        parent, name = split(path)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return Outcome.GONE
        if not plan.eligible(self.files.store, parent, name, st):
            return Outcome.GONE
        if st.st_mtime > self.not_before:
            return Outcome.WAIT
        table = self.files.table
        existing = table.by_key.get(key_of(st))
        # (Readers of a `.zst` being re-encoded keep reading the old file: same bytes.)
        if existing is not None and ((existing.opens > 0 and blocks_opens(plan.lease))
                                     or existing.swap is not None):
            return Outcome.OPEN  # its release schedules it again
        if existing is not None and existing.busy:
            return Outcome.BUSY  # a rename or a metadata change holds it: look again later
        node = self.node = table.claim(
            st, compressed=self.files.store.rules.is_representation(parent, name))
        ticket = self.ticket = node.swap = SwapTicket(key_of(os.fstat(dir_fd)), key_of(st),
                                                      plan.lease)
        self.files.swaps.add(ticket)
        self.name = name
        table.pending[(ticket.dir_key, name)] = node
        self.expect = st
        return None

    def abandoned(self) -> bool:
        return self.ticket is not None and self.ticket.abandoned()

    async def work(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.limiter)

    async def call(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn)

    async def step(self, what: str, path: bytes) -> None:
        await self.files._step(what, path)

    @contextlib.asynccontextmanager
    async def publishing(self, path: bytes) -> AsyncIterator[bool]:
        """The critical section: the node's lock is held, so no open through the mount starts;
        the lease stops every other."""
        node, ticket = self.node, self.ticket
        assert node is not None
        assert ticket is not None
        async with node.lock:
            with trio.CancelScope(shield=True):
                await self.files._step("locked", path)
                yield not ((node.opens > 0 and ticket.blocks_opens) or ticket.abandoned())

    def published(self, plan: Plan, swap: Swap, st: os.stat_result) -> None:
        assert self.node is not None
        plan.record(self.files.stats, swap)
        # Lookups during the publish found this node (locked, or through `pending`); from here
        # on it stands for the .zst.
        self.files.table.rekey(self.node, st, True)
        self.files.on_swapped(self.node)

    def release(self) -> None:
        ticket, node, table = self.ticket, self.node, self.files.table
        if ticket is not None:
            self.files.swaps.discard(ticket)
            if table.pending.get((ticket.dir_key, self.name)) is node:
                del table.pending[(ticket.dir_key, self.name)]
            ticket.done.set()
        if node is not None:
            node.swap = None
            table.unclaim(node)
