"""Extended attributes through the mount: each backing object's own (never through the mount,
never a symlink's target's), except zstfs's own, `user.zstfs.*`: on the mount root
`user.zstfs.status` is the virtual status document, and a `.zst` may carry a note of its
logical size (`sizenote`). The mount never shows those or lets them be set.

POSIX ACLs, and SELinux labels where SELinux is not running, are not supported through the
mount: their names answer EOPNOTSUPP and are not listed, as on a filesystem without them (ext4
mounted `noacl`). The kernel enforces ACLs on a FUSE mount only with `FUSE_POSIX_ACL`, which
zstfs does not ask for, so an ACL read or set through it would claim a protection that is not
there; and a label means nothing to a kernel that runs no SELinux (where SELinux runs, labels
pass through as before). Listing tools remember a filesystem that lacks them: GNU `ls -l` asks
every file for both names until one answers EOPNOTSUPP, then never again on that device. The
backing files keep theirs, and so does compaction."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from zstfs.names import STATUS_XATTR, is_own_xattr
from zstfs.openfiles import ROOT_INODE
from zstfs.view import View

ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})
SELINUX_XATTR = b"security.selinux"
#: Mounted by every system that runs SELinux (libselinux looks for selinuxfs too).
SELINUXFS = "/sys/fs/selinux"


def unsupported_xattrs(selinuxfs: str = SELINUXFS) -> frozenset[bytes]:
    """The names the mount answers EOPNOTSUPP for on this machine."""
    return ACL_XATTRS if os.path.isdir(selinuxfs) else ACL_XATTRS | {SELINUX_XATTR}


#: How long the status document given to a thread bounds the length of its next one.
STATUS_PAIR_SECONDS = 1.0


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Xattrs:
    def __init__(self, view: View) -> None:
        self.view = view
        self.unsupported = unsupported_xattrs()
        #: What the status document says (set by the mount once it can describe itself).
        self.status_provider: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._given: dict[int, tuple[float, bytes]] = {}  # see _status_json

    async def get(self, inode: int, name: bytes, caller: int) -> bytes:
        """Attribute `name` of inode `inode`, for process `caller`; ENODATA if it has none."""
        if is_own_xattr(name):
            if inode == ROOT_INODE and name == STATUS_XATTR and self.status_provider is not None:
                return await self._status_json(caller)
            raise _error(errno.ENODATA)
        if name in self.unsupported:
            raise _error(errno.EOPNOTSUPP)
        node = self.view.node(inode)
        fd = self.view.handles.held_fd(node)
        if fd is not None:  # every write asks for security.capability: no path walk
            return os.getxattr(fd, name)
        return self.view.getxattr(node, name)

    async def set(self, inode: int, name: bytes, value: bytes) -> None:
        self._settable(name)
        node = self.view.node(inode)
        # Never during a swap's publish, which would revert it.
        async with self.view.files.hold(node):
            self.view.xattr_call(node, os.setxattr, name, value)

    def list(self, inode: int) -> list[bytes]:
        names = [os.fsencode(n) for n in self.view.xattr_call(self.view.node(inode), os.listxattr)]
        names = [n for n in names if not is_own_xattr(n) and n not in self.unsupported]
        if inode == ROOT_INODE and self.status_provider is not None:
            names.append(STATUS_XATTR)
        return names

    async def remove(self, inode: int, name: bytes) -> None:
        self._settable(name)
        node = self.view.node(inode)
        async with self.view.files.hold(node):
            self.view.xattr_call(node, os.removexattr, name)

    def _settable(self, name: bytes) -> None:
        if is_own_xattr(name):
            raise _error(errno.EPERM)
        if name in self.unsupported:
            raise _error(errno.EOPNOTSUPP)

    async def _status_json(self, caller: int) -> bytes:
        """The status document, computed afresh for every request.

        A getxattr caller asks twice, for the size and then the value (`getfattr`: size 0, then
        exactly that size; Python: 128 bytes, then 64 KiB), and the second answer must not be
        longer than the first. So the document given to a thread is remembered for a second: the
        thread's next request gets a fresh one padded with spaces (still JSON) to the same length,
        or, if the fresh one is longer, the remembered one itself."""
        assert self.status_provider is not None
        doc = json.dumps(await self.status_provider(), sort_keys=True).encode()
        now = time.monotonic()
        self._given = {pid: given for pid, given in self._given.items()
                       if now - given[0] < STATUS_PAIR_SECONDS}
        first = self._given.pop(caller, None)
        if first is None:
            self._given[caller] = (now, doc)
            return doc
        return doc.ljust(len(first[1])) if len(doc) <= len(first[1]) else first[1]
