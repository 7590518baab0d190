"""Directory listings for readdir, in one of two protocols chosen once, at the kernel's INIT.

With directory handles (`Handles`: stock pyfuse3, old kernels), opendir makes a handle whose
first readdir lists the names; offsets index that list. By inode (`Inodes`: zstfs's pyfuse3,
`directories_by_inode`, a kernel with FUSE_NO_OPENDIR_SUPPORT), opendir answers ENOSYS, which the
kernel takes as success for good; readdir then gets the directory's inode, a listing from the
start lists afresh, and offsets are cookies from a hash of each name, so names that come or go
between two pages never shift the others (none is skipped or repeated).

Either way a page is a list of (name, offset of the next entry), `.` and `..` first. RELEASEDIR
comes only with handles.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable

from zstfs.openfiles import FileTable, Node

#: By inode: directories whose listing in progress is kept for its next pages, and the most
#: names they hold together (the last one is kept whatever its size).
LISTINGS_KEPT = 16
LISTED_NAMES_KEPT = 100_000


def _cookie(name: bytes) -> int:
    """A directory offset for `name` that does not depend on the other names: 3 and up (0-2
    are the start, `.` and `..`), below 2**62 + 3 (an off_t with room for `+ 1`)."""
    return 3 + (int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") >> 2)


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _known(table: FileTable, ino: int) -> Node:
    node = table.get(ino)
    if node is None:
        raise _error(errno.ESTALE)
    return node


class DirHandle:
    """A directory listing, taken by the first readdir (not at opendir: the kernel may answer the
    listing from its own cache and never ask); its names are the stable offsets readdir pages
    through; what each name is *now* is looked up again when it is returned."""

    __slots__ = ("names", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.names: list[bytes] | None = None


class Handles:
    """Listings through directory handles."""

    def __init__(self, table: FileTable) -> None:
        self.table = table
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    def opendir(self, ino: int) -> int:
        node = _known(self.table, ino)
        if not node.is_dir:
            raise _error(errno.ENOTDIR)
        if self.table.path(node) is None:  # a directory that has a name
            raise _error(errno.ENOENT)
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = DirHandle(node)
        return fh

    def node(self, fh: int) -> Node:
        return self.dirs[fh].node

    def page(self, fh: int, start_id: int,
             list_names: Callable[[], list[bytes]]) -> list[tuple[bytes, int]]:
        d = self.dirs[fh]
        if d.names is None:
            d.names = [b".", b"..", *list_names()]
        return [(d.names[i], i + 1) for i in range(start_id, len(d.names))]

    def releasedir(self, fh: int) -> None:
        del self.dirs[fh]


class Inodes:
    """Listings by the directory's inode, paged by per-name cookies. The sorted (cookie, name)
    listing each directory's last readdir from the start took is kept for the next pages (as a
    handle's would be): a big directory is read from the disk once, not once a page."""

    def __init__(self, table: FileTable) -> None:
        self.table = table
        self._listings: OrderedDict[int, list[tuple[int, bytes]]] = OrderedDict()
        self._listed = 0  # names in _listings

    def opendir(self, ino: int) -> int:
        # The kernel takes ENOSYS as success and never sends OPENDIR (nor RELEASEDIR) again;
        # readdir and fsyncdir then receive the directory's inode.
        raise _error(errno.ENOSYS)

    def node(self, fh: int) -> Node:
        node = _known(self.table, fh)  # pyfuse3 passes the directory's inode
        if not node.is_dir:
            raise _error(errno.ENOTDIR)
        return node

    def page(self, fh: int, start_id: int,
             list_names: Callable[[], list[bytes]]) -> list[tuple[bytes, int]]:
        listing = self._listings.get(fh) if start_id > 2 else None
        if listing is None:  # a listing starts: what is there now
            listing = sorted((_cookie(n), n) for n in list_names())
        self._keep(fh, listing)  # its next pages page through it
        slots = [(b".", 1), (b"..", 2)][min(start_id, 2):]
        first = bisect.bisect_left(listing, (start_id, b""))
        return slots + [(name, c + 1) for c, name in listing[first:]]

    def _keep(self, ino: int, listing: list[tuple[int, bytes]]) -> None:
        old = self._listings.pop(ino, None)
        if old is not None:
            self._listed -= len(old)
        self._listings[ino] = listing
        self._listed += len(listing)
        while len(self._listings) > 1 and (len(self._listings) > LISTINGS_KEPT
                                           or self._listed > LISTED_NAMES_KEPT):
            self._listed -= len(self._listings.popitem(last=False)[1])
