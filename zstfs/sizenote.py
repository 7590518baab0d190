"""The logical size of a `.zst`, noted on the file itself (an extended attribute), so that the
census every mount runs and a listing (`ls -l`, `find`, codex's session picker, READDIRPLUS)
learn it from the file's inode instead of reading its seek table from the far end of the file:
on a cold store that is one disk read less per compressed file (`Store.size_of`).

The note names the `.zst`'s own size and mtime when it was written, and counts only while both
are unchanged: the identity the daemon's caches key on (`codec.identity_of`), kept across
mounts. A reader still builds the frame index from the file itself before it serves a byte, and
a file whose frames disagree with the size it was listed with reads as damaged (`IndexCache`),
never as other bytes. The note is zstfs's own: the mount never shows it or lets it be set
(`user.zstfs.*`), metadata copies leave it out, and the `zstd` tools ignore xattrs. Where the
backing file system has no user xattrs, or the daemon may not set them, files simply carry none.
"""

from __future__ import annotations

import errno
import logging
import os

from zstfs.codec.format import MAX_CONTENT_SIZE
from zstfs.names import XATTR_PREFIX

log = logging.getLogger(__name__)

#: The attribute: under `user.zstfs.`, which the mount reserves.
NAME = XATTR_PREFIX + b"size"
_VERSION = b"1"
#: Errors of setting a note that only mean it is not kept: no user xattrs there, a file the
#: daemon may not change, a read-only or full file system.
_NOT_KEPT = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.ERANGE,
             errno.E2BIG, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT)


def encode(st: os.stat_result, logical: int) -> bytes:
    """The note for a `.zst` whose stat is `st` and which decodes to `logical` bytes."""
    return b"%s %d %d %d" % (_VERSION, st.st_size, st.st_mtime_ns, logical)


def decode(value: bytes | None, st: os.stat_result) -> int | None:
    """The logical size a note gives, if it is well formed and names exactly the file `st`
    describes now (its size and mtime); else None."""
    if not value:
        return None
    parts = value.split(b" ")
    if len(parts) != 4 or parts[0] != _VERSION or not all(p.isdigit() for p in parts[1:]):
        return None
    size, mtime_ns, logical = (int(p) for p in parts[1:])
    if (size, mtime_ns) != (st.st_size, st.st_mtime_ns) or logical >= MAX_CONTENT_SIZE:
        return None
    return logical


def read(fd: int, st: os.stat_result) -> int | None:
    """The logical size noted on the `.zst` open as `fd`, if its note names the file as `st`
    describes it; None if it has none (or none the daemon may read)."""
    try:
        return decode(os.getxattr(fd, NAME), st)
    except OSError:
        return None


def write(fd: int, st: os.stat_result, logical: int) -> bool:
    """Note that the `.zst` open as `fd`, as `st` describes it, decodes to `logical` bytes
    (setting an xattr changes its ctime, not its size or mtime). Not if it has changed since
    `st`; best effort: False where the note is not kept."""
    try:
        now = os.fstat(fd)
        if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return False
        os.setxattr(fd, NAME, encode(now, logical))
    except OSError as e:
        if e.errno not in _NOT_KEPT:
            log.warning("cannot note the size of a compressed file: %s", e)
        return False
    return True
