"""What the kernel is told about an inode (pyfuse3's `EntryAttributes`, and how long it may keep
them) and about an open (`FileInfo`: cached pages kept, direct I/O, a passthrough backing id)."""

from __future__ import annotations

import os
import stat

import pyfuse3
from pyfuse3 import FileHandleT, FileInfo, InodeT

from zstfs.openfiles import ROOT_INODE, Handle, Node

#: Entry and attribute cache time. Every change goes through the mount, so the kernel's cache
#: stays right; swaps (which change only st_blocks and ctime) invalidate the inode explicitly.
CACHE_TIMEOUT = 60.0
BLKSIZE = 128 * 1024


def entry_attributes(ino: int, st: os.stat_result, size: int) -> pyfuse3.EntryAttributes:
    """Inode `ino` as backed by `st`, with its logical size."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = InodeT(ino)
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


def dot(node: Node, i: int) -> pyfuse3.EntryAttributes:
    """`.` (i == 0) or `..` of a directory: the kernel creates no dentry for either and uses
    only the inode number and type, so no stat is needed."""
    ino = node.ino
    if i == 1 and node.ino != ROOT_INODE and node.links:
        ino = node.links[0][0]
    a = pyfuse3.EntryAttributes()
    a.st_ino = InodeT(ino)
    a.st_mode = stat.S_IFDIR | 0o755
    return a


def _negative() -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = InodeT(0)
    a.entry_timeout = CACHE_TIMEOUT
    return a


#: The answer to a lookup of an absent name: inode 0, cached like a positive entry.
NEGATIVE = _negative()


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


def appending(flags: int) -> bool:
    """Whether a handle the daemon serves is opened for direct I/O (where DIRECT_APPENDS): an
    appender's (O_APPEND, for writing).

    A buffered write that starts inside a page the kernel has not cached whole (every append
    that does not start on a page boundary) is cut after that page (`fuse_fill_write_pages`):
    one `write(2)` reaches the daemon as two WRITEs, and a daemon killed between them leaves the
    first part of a line in the file. A direct write is sent whole, up to `max_write` per request
    (128 KiB). The kernel drops the written range from other openers' page cache. Only
    appenders: a shared writable mapping of a direct-I/O descriptor is refused (ENODEV) unless
    libfuse negotiates FUSE_DIRECT_IO_ALLOW_MMAP."""
    return bool(flags & os.O_APPEND) and flags & os.O_ACCMODE != os.O_RDONLY


def keep_cache(handle: Handle) -> bool:
    """Keep the kernel's cached pages unless the content changed behind our back."""
    node = handle.node
    st = os.fstat(handle.fd)
    seen = (st.st_size if handle.reader is None else -1, st.st_mtime_ns)
    keep = node.seen is None or node.seen[1] == seen[1]
    node.seen = seen
    return keep


def file_info(fh: int, keep_cache: bool, backing_id: int, direct_io: bool = False) -> FileInfo:
    if not backing_id:  # (a stock pyfuse3's FileInfo has no backing_id)
        return FileInfo(fh=FileHandleT(fh), keep_cache=keep_cache, direct_io=direct_io)
    # The kernel takes no open flags but its own beside passthrough (FOPEN_PASSTHROUGH_MASK).
    return FileInfo(fh=FileHandleT(fh), keep_cache=False,  # type: ignore[call-arg]
                    backing_id=backing_id)
