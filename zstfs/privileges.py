"""What a file system does for the kernel under FUSE_HANDLE_KILLPRIV_V2: clear set-uid/set-gid
where a request says so.

With KILLPRIV_V2 negotiated (zstfs's pyfuse3 on libfuse 3.17+: `enable_killpriv_v2`), the kernel
marks the superblock SB_NOSEC: once a write has found a file without set-uid/set-gid bits and
without `security.capability`, its inode gets S_NOSEC and later writes no longer ask for the
xattr (one GETXATTR per write(2) otherwise). In exchange the kernel leaves to the server what it
did itself. On WRITE (FUSE_WRITE_KILL_SUIDGID), on SETATTR of size or owner
(FATTR_KILL_SUIDGID) and on a truncating OPEN or CREATE (FUSE_OPEN_KILL_SUIDGID), sent only for
a caller without CAP_FSETID (always for chown), it expects set-uid and, where the group may
execute, set-gid cleared, as the VFS clears them on a local file system. Direct I/O writes carry
the write flag whether or not KILLPRIV_V2 is negotiated (the kernel never clears the bits itself
on that path). zstfs's pyfuse3 reads the flags from each request (`kill_suidgid`). The
capability needs nothing here: the daemon's own write to the backing file makes the backing
file system remove it (its file_remove_privs drops it for any writer, root included).
"""

from __future__ import annotations

import os
import stat


def clear_suidgid(target: int | bytes) -> None:
    """Clear set-uid, and set-gid where the group may execute, on `target` (a descriptor or a
    path), as the VFS does for a write or truncation by a caller without CAP_FSETID."""
    mode = os.stat(target).st_mode
    kept = mode & ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        kept &= ~stat.S_ISGID
    if kept != mode:
        os.chmod(target, stat.S_IMODE(kept))


def before_write(fd: int, kill_suidgid: bool) -> None:
    """What a WRITE asks of the server before its data lands on the backing file `fd`."""
    if kill_suidgid:
        clear_suidgid(fd)


def served_writer(fd: int, flags: int) -> bool:
    """Whether a writable open of the file `fd` must be served by the daemon, not passed
    through: a set-uid or set-gid file. A passthrough write reaches the backing file with the
    daemon's credentials (root's CAP_FSETID keeps the bits) and never through this module."""
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return False
    return bool(os.fstat(fd).st_mode & (stat.S_ISUID | stat.S_ISGID))


def kills_on_open(flags: int, kill_suidgid: bool, killpriv_v2: bool, uid: int) -> bool:
    """Whether an open clears set-uid/set-gid: a truncating one the kernel flags
    (FUSE_OPEN_KILL_SUIDGID). Without KILLPRIV_V2 the kernel sends no such flag, and with
    atomic O_TRUNC it drops the bits' clearing altogether (fuse_setattr returns before any
    request for ATTR_OPEN): then a caller other than root counts as one without CAP_FSETID.
    (An ordinary user's daemon needs none of this: the backing file system clears the bits
    at its own truncation.)"""
    if kill_suidgid:
        return True
    return (not killpriv_v2 and flags & os.O_TRUNC != 0 and flags & os.O_ACCMODE != os.O_RDONLY
            and uid != 0 and os.geteuid() == 0)
