"""FUSE passthrough: the kernel reads, writes and maps a file's backing file itself.

zstfs's pyfuse3 on libfuse 3.17+, Linux 6.9+, and `CAP_SYS_ADMIN` to register a backing file.
Only files outside the patterns, which the compactor never takes (databases, configs, working
trees), are opened this way: a mapping of a passthrough file maps the backing file itself, and
its handle is released when its descriptor is closed, so the daemon could not count it as open.
One backing id per inode, shared by its handles (the kernel allows one backing file per inode),
and none while a handle of the inode is served by the daemon (the kernel fails an open that mixes
the two with EIO). The first refused registration turns passthrough off for the mount.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Protocol

from zstfs import privileges
from zstfs.openfiles import Handle, Node, OpenFiles
from zstfs.store import split

log = logging.getLogger(__name__)

#: `Node.seen` after a passthrough writer: no cached open keeps the pages it finds.
NEVER_SEEN = (-1, -1)


class Session(Protocol):
    """The kernel session's side of it (pyfuse3's `Operations` attributes: pyfuse3 sets the
    switch at INIT; the calls are replaceable for the in-process tests)."""

    enable_passthrough: bool

    def passthrough_open(self, fd: int) -> int: ...

    def passthrough_close(self, backing_id: int) -> None: ...


class Passthrough:
    def __init__(self, files: OpenFiles, session: Session) -> None:
        self.files = files
        self.session = session

    def open(self, handle: Handle) -> int:
        """The backing id to open `handle` (counted already) with, or 0 for a handle whose
        reads and writes come to the daemon: one of a `.zst`, of a name inside the patterns, or
        beside another handle of the file that the daemon serves (a file renamed out of the
        patterns while its `.zst` or promoted form is read)."""
        if handle.reader is not None:
            return 0
        node, session = handle.node, self.session
        # The kernel allows one backing file per inode: the node's other handles share theirs.
        backing_id = self.files.handles.backing_id_of(node, besides=handle)
        if not backing_id:
            # (each other open handle is served here)
            if not session.enable_passthrough or node.opens > 1:
                return 0
            if privileges.served_writer(handle.fd, handle.flags):
                return 0
            path = self.files.table.path(node)
            if path is None or self.files.store.rules.compressible(*split(path)):
                return 0
            try:
                backing_id = session.passthrough_open(handle.fd)
            except OSError as e:
                self._refused(e)
                return 0
        handle.backing_id = backing_id
        if handle.flags & os.O_ACCMODE != os.O_RDONLY:
            # Its writes bypass the kernel's page cache of this inode, and may leave the mtime
            # as it was (utimensat): a later cached open (after a rename into the patterns)
            # must not keep pages read before.
            node.seen = NEVER_SEEN
        self.files.stats.passthrough_opens += 1
        return backing_id

    def release(self, handle: Handle) -> None:
        """Before `handle` leaves the table: the node's last passthrough handle gives its
        backing id back (the kernel keeps its own reference for as long as it needs one)."""
        if not handle.backing_id or self.files.handles.backing_id_of(handle.node,
                                                                     besides=handle):
            return
        try:
            self.session.passthrough_close(handle.backing_id)
        except OSError as e:
            log.warning("passthrough_close(%d) of %s: %s", handle.backing_id,
                        _describe(self.files, handle.node), os.strerror(e.errno or errno.EIO))

    def probe(self) -> None:
        """Learn at once (after INIT) whether backing files can be registered here (it needs
        CAP_SYS_ADMIN, and a backing filesystem stacked at most once), so that status says so
        before the first open: with an unnamed file in the store, which nothing can see."""
        if not self.session.enable_passthrough:
            return
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                         dir_fd=self.files.store.root_fd)
        except OSError:
            return  # (a read-only store, or no O_TMPFILE): the first open decides
        try:
            self.session.passthrough_close(self.session.passthrough_open(fd))
        except OSError as e:
            self._refused(e)
        finally:
            os.close(fd)

    def _refused(self, e: OSError) -> None:
        """Expected without CAP_SYS_ADMIN (a mount by an ordinary user): passthrough is off
        for the mount from now on; handles that have a backing id keep it."""
        self.session.enable_passthrough = False
        log.info("passthrough is off for this mount: registering a backing file failed: %s",
                 os.strerror(e.errno or errno.EIO))


def _describe(files: OpenFiles, node: Node) -> str:
    path = files.table.path(node)
    return os.fsdecode(path) if path is not None else f"<inode {node.ino}>"
