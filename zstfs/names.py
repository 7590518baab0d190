"""The naming rules of a zstfs store, in one place.

A logical name `NAME` that matches the compression pattern may be stored as `NAME` (plain) or
`NAME.zst` (compressed). Names starting with `.zstfs` belong to zstfs itself (the store lock, the
daemon's log, temp files of swaps) and are invisible through the mount.
"""

from __future__ import annotations

import fnmatch
import os
import re

ZST_SUFFIX = ".zst"
ZST_SUFFIX_B = b".zst"
RESERVED_PREFIX = b".zstfs"
LOCK_NAME = ".zstfs.lock"
LOG_NAME = ".zstfs.log"
TEMP_PREFIX = ".zstfs-tmp."
DEFAULT_PATTERN = "*.jsonl"

#: Extended attribute on the mount root that returns the daemon's status as JSON.
STATUS_XATTR = b"user.zstfs.status"


class NameRules:
    """Which logical names are compressible, and how they map to backing names."""

    def __init__(self, pattern: str = DEFAULT_PATTERN) -> None:
        self.pattern = pattern
        self._regex = re.compile(fnmatch.translate(pattern).encode(), re.DOTALL)

    def compressible(self, name: bytes) -> bool:
        """True if a file called `name` is shown plain and may be stored as `name.zst`."""
        return self._regex.match(name) is not None and not is_reserved(name)

    def is_representation(self, name: bytes) -> bool:
        """True for a backing `NAME.zst` standing for the logical `NAME` (hidden from the view)."""
        return name.endswith(ZST_SUFFIX_B) and self.compressible(name[: -len(ZST_SUFFIX_B)])

    def logical(self, backing_name: bytes) -> bytes:
        """The name a backing entry shows under (`NAME.zst` → `NAME`, anything else unchanged)."""
        if self.is_representation(backing_name):
            return backing_name[: -len(ZST_SUFFIX_B)]
        return backing_name

    def visible(self, name: bytes) -> bool:
        """False for names the view never shows or accepts: zstfs's own files, `NAME.zst`."""
        return not is_reserved(name) and not self.is_representation(name)


def is_reserved(name: bytes) -> bool:
    return name.startswith(RESERVED_PREFIX)


def zst_name(name: bytes) -> bytes:
    return name + ZST_SUFFIX_B


def temp_name(name: bytes) -> bytes:
    """A unique temp name beside `name`, recognisable by recovery (`.zstfs-tmp.` prefix)."""
    return TEMP_PREFIX.encode() + os.urandom(6).hex().encode() + b"." + name[-100:]


def is_temp(name: bytes) -> bool:
    return name.startswith(TEMP_PREFIX.encode())
