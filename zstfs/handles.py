"""Open files through the mount: one `Handle` per open file description, indexed by node.

`HandleTable` is the kernel's opens as the daemon counts them: adding a handle counts an open of
its node (`Node.opens`, which the compactor and a swap's publish step look at) and removing it
uncounts it. `OpenFiles` (openfiles.py) owns the one table and opens, refreshes and releases the
handles in it. Everything here runs on the trio thread and never awaits.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from zstfs import codec

if TYPE_CHECKING:
    from zstfs.openfiles import Node

#: Compressed files up to this logical size are decoded on the trio thread: a thread hop costs
#: more than decoding 1 MiB (~1 ms), and `grep -r` over many small files is bound by per-request
#: overhead.
INLINE_DECODE_LIMIT = 1 << 20


class Handle:
    """One open file description: a plain backing fd, or a `.zst` fd with its reader."""

    __slots__ = ("backing_id", "fd", "fh", "flags", "generation", "inline", "node", "reader",
                 "retired", "slow_sync", "wrote")

    def __init__(self, node: Node, fd: int, flags: int, reader: codec.ZstReader | None,
                 inline: bool = False) -> None:
        self.node = node
        self.fd = fd
        self.flags = flags
        self.reader = reader
        self.inline = inline  # small compressed file: decode without a thread hop
        self.generation = node.generation
        self.fh = 0  # its number, once in the table
        self.wrote = False
        #: Opened in kernel passthrough mode with this backing id (0: not): the kernel reads,
        #: writes and maps the backing file itself, and no READ or WRITE of it reaches here.
        self.backing_id = 0
        self.slow_sync = False  # an inline fsync of it was slow: the next ones go to a thread
        #: Descriptors of earlier representations: a read on a worker thread may still be
        #: using one, so they are closed at release, not when the handle moves on.
        self.retired: list[int] = []


class HandleTable(Mapping[int, Handle]):
    """The open handles by number, and by node (indexed: a writer's every GETXATTR asks, and a
    process may hold thousands of files open)."""

    def __init__(self) -> None:
        self._by_fh: dict[int, Handle] = {}
        self._by_node: dict[Node, list[Handle]] = {}
        self._next_fh = 1

    def __getitem__(self, fh: int) -> Handle:
        return self._by_fh[fh]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_fh)

    def __len__(self) -> int:
        return len(self._by_fh)

    def add(self, handle: Handle) -> int:
        """Number `handle`, index it, and count the open of its node."""
        handle.fh = fh = self._next_fh
        self._next_fh += 1
        self._by_fh[fh] = handle
        self._by_node.setdefault(handle.node, []).append(handle)
        handle.node.opens += 1
        return fh

    def remove(self, fh: int) -> Handle:
        handle = self._by_fh.pop(fh)
        held = self._by_node[handle.node]
        held.remove(handle)
        if not held:
            del self._by_node[handle.node]
        handle.node.opens -= 1
        return handle

    def of(self, node: Node) -> list[Handle]:
        """The open handles on a node."""
        return list(self._by_node.get(node, ()))

    def any_fd(self, node: Node) -> int | None:
        return next((h.fd for h in self._by_node.get(node, ())), None)

    def held_fd(self, node: Node) -> int | None:
        """A descriptor of the node's current representation that an open handle holds."""
        if not node.opens:
            return None
        return next((h.fd for h in self._by_node.get(node, ())
                     if h.generation == node.generation), None)

    def plain_fd(self, node: Node) -> int | None:
        """A descriptor of the node's current content held by a handle on its plain form."""
        return next((h.fd for h in self._by_node.get(node, ())
                     if h.reader is None and h.generation == node.generation), None)

    def backing_id_of(self, node: Node, *, besides: Handle | None = None) -> int:
        """The kernel passthrough backing id the node's handles (other than `besides`) share,
        or 0."""
        return next((h.backing_id for h in self._by_node.get(node, ())
                     if h.backing_id and h is not besides), 0)
