"""The table of files the daemon knows: inode numbers, names, open counts and per-file locks.

Shared by the filesystem layer and the compactor. It is the single place that enforces "a file
that is open is never swapped": the filesystem counts every open and release here, and the
compactor publishes a swap only while holding the file's lock with its open count at zero.

Everything here runs on the trio thread and never awaits, so each method is atomic with respect
to FUSE requests.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from collections.abc import Iterator

import trio

from zstfs.store import join

ROOT_INODE = 1
#: Numbers for files whose natural number is taken by another live file start here (far above
#: any inode number a real filesystem hands out).
FALLBACK_INODE_BASE = 1 << 62
#: How many representation changes (swap, promotion) are remembered after the kernel forgot the
#: file, so that its inode number stays the same when it is looked up again.
ALIAS_LIMIT = 200_000

Key = tuple[int, int]  # (st_dev, st_ino) of the backing file


def key_of(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


class Node:
    """One logical file or directory, stable across changes of representation."""

    __slots__ = (
        "_lock",
        "anon_fd",
        "claims",
        "compressed",
        "generation",
        "ino",
        "is_dir",
        "key",
        "links",
        "lookups",
        "opens",
        "seen",
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
    def __init__(self, root_st: os.stat_result) -> None:
        root = Node(ROOT_INODE, root_st, False)
        root.lookups = 1 << 62  # never forgotten
        self.nodes: dict[int, Node] = {ROOT_INODE: root}
        self.by_key: dict[Key, Node] = {key_of(root_st): root}
        self.by_link: dict[tuple[int, bytes], Node] = {}
        self._next_fallback = FALLBACK_INODE_BASE
        self._aliases: OrderedDict[Key, int] = OrderedDict()

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

    def find(self, parent: int, name: bytes, st: os.stat_result | None) -> Node | None:
        """The node known under (parent, name), if it is still the file `st` describes."""
        node = self.by_link.get((parent, name))
        if node is None:
            return self.by_key.get(key_of(st)) if st is not None else None
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

    def claim(self, st: os.stat_result) -> Node:
        """The node for a backing file found by the compactor, held until `unclaim`."""
        node = self.by_key.get(key_of(st))
        if node is None:
            node = self._new_node(st, False)
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

    def unlink(self, parent: int, name: bytes) -> Node | None:
        node = self.by_link.pop((parent, name), None)
        if node is None:
            return None
        node.links.remove((parent, name))
        if not node.links and node.key is not None and self.by_key.get(node.key) is node:
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
