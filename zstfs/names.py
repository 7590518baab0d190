"""The naming rules of a zstfs store, in one place.

A logical file that matches a compression pattern may be stored as `NAME` (plain) or `NAME.zst`
(compressed). Names starting with `.zstfs` belong to zstfs itself (the store lock, the daemon's
log, temp files of swaps) and are invisible through the mount.

Patterns are globs. One without a `/` matches a file name in any directory (`*.jsonl`). One with
a `/` matches the path relative to the store root: `*`, `?` and `[...]` stay within one path
component and a `**` component matches any number of directories (`sessions/**/rollout-*.jsonl`).
The default is what codex's own compressor takes: rollouts under `sessions/` and
`archived_sessions/`, and nothing else (`history.jsonl`, `session_index.jsonl`, logs and
databases are shown as they are, untouched).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable

ZST_SUFFIX_B = b".zst"
RESERVED_PREFIX = b".zstfs"
LOCK_NAME = ".zstfs.lock"
TEMP_PREFIX = ".zstfs-tmp."
#: A file set aside rather than removed (never touched by recovery; counted in status).
KEPT_PREFIX = b".zstfs-kept."
#: Longest name component the backing filesystems take (statfs f_namemax of ext4, xfs, btrfs...).
NAME_MAX = 255
#: Codex's rollouts, exactly what its own compressor matches (`rollout-*.jsonl` anywhere under
#: `sessions/` and `archived_sessions/`).
DEFAULT_PATTERNS: tuple[str, ...] = (
    "sessions/**/rollout-*.jsonl",
    "archived_sessions/**/rollout-*.jsonl",
)

#: Extended attributes under this prefix are zstfs's own, on every file: the mount never shows
#: them or lets them be set, and metadata copies leave them out.
XATTR_PREFIX = b"user.zstfs."


def is_own_xattr(name: bytes) -> bool:
    """`user.zstfs.*`: zstfs's own attribute (the status document, a size note), on any file."""
    return name.startswith(XATTR_PREFIX)

#: Extended attribute on the mount root that returns the daemon's status as JSON.
STATUS_XATTR = XATTR_PREFIX + b"status"

#: What `--pattern` options give: one pattern, several, or None for the default.
Patterns = str | Iterable[str] | None
_Rule = tuple[re.Pattern[bytes], re.Pattern[bytes] | None]


def _segment_regex(segment: str) -> str:
    """A glob for one path component (`*`, `?`, `[...]`) as a regex that never crosses `/`."""
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        start = i + 2 if segment[i + 1:i + 2] in ("!", "^") else i + 1
        end = segment.find("]", start + 1) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end > 0:
            negate = "^" if start == i + 2 else ""
            out.append("[" + negate + re.escape(segment[start:end]).replace("\\-", "-") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_pattern(pattern: str) -> _Rule:
    """(file-name regex, directory regex or None for "any directory") of one pattern."""
    directory, slash, base = pattern.lstrip("/").rpartition("/")
    if not base:
        raise ValueError(f"invalid pattern {pattern!r}: it names no files")
    name_re = re.compile(os.fsencode(fnmatch.translate(base)), re.DOTALL)
    if not slash and not pattern.startswith("/"):
        return name_re, None
    # The directory part is matched against "PARENT/" ("" for the root): each component is
    # "glob/", and a `**` component is any number of components.
    regex = "".join("(?:[^/]+/)*" if seg == "**" else _segment_regex(seg) + "/"
                    for seg in directory.split("/") if seg)
    return name_re, re.compile(os.fsencode(regex), re.DOTALL)


def parse_patterns(patterns: Patterns) -> tuple[str, ...]:
    """The patterns as a tuple (None: the default); raises ValueError for an invalid one."""
    if patterns is None:
        return DEFAULT_PATTERNS
    result = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    for p in result:
        compile_pattern(p)
    return result or DEFAULT_PATTERNS


class NameRules:
    """Which logical files are compressible, and how they map to backing names.

    `parent` is the directory relative to the store root (`b"."` for the root itself), as
    `store.py` spells paths. A rename across directories can change whether a file is
    compressible: the filesystem layer checks the destination's rules.
    """

    def __init__(self, patterns: Patterns = None) -> None:
        self.patterns = parse_patterns(patterns)
        self._rules = [compile_pattern(p) for p in self.patterns]
        #: False when only file names matter (no pattern has a directory part).
        self.path_aware = any(d is not None for _, d in self._rules)

    @property
    def pattern(self) -> str:
        """The patterns for display (space-separated)."""
        return " ".join(self.patterns)

    def compressible(self, parent: bytes, name: bytes) -> bool:
        """True if a file `name` in `parent` is shown plain and may be stored as `name.zst`. A
        name whose `.zst` form would be longer than NAME_MAX has only its plain form."""
        if is_reserved(name) or len(name) + len(ZST_SUFFIX_B) > NAME_MAX:
            return False
        dir_key: bytes | None = None
        for name_re, dir_re in self._rules:
            if name_re.match(name) is None:
                continue
            if dir_re is None:
                return True
            if dir_key is None:
                dir_key = b"" if parent in (b".", b"") else parent.strip(b"/") + b"/"
            if dir_re.fullmatch(dir_key) is not None:
                return True
        return False

    def is_representation(self, parent: bytes, name: bytes) -> bool:
        """True for a backing `NAME.zst` standing for the logical `NAME` (hidden from the view)."""
        return name.endswith(ZST_SUFFIX_B) and self.compressible(parent, name[: -len(ZST_SUFFIX_B)])

    def logical(self, parent: bytes, backing_name: bytes) -> bytes:
        """The name a backing entry shows under (`NAME.zst` → `NAME`, anything else unchanged)."""
        if self.is_representation(parent, backing_name):
            return backing_name[: -len(ZST_SUFFIX_B)]
        return backing_name

    def visible(self, parent: bytes, name: bytes) -> bool:
        """False for names the view never shows or accepts: zstfs's own files, `NAME.zst`."""
        return not is_reserved(name) and not self.is_representation(parent, name)


def is_reserved(name: bytes) -> bool:
    return name.startswith(RESERVED_PREFIX)


def zst_name(name: bytes) -> bytes:
    return name + ZST_SUFFIX_B


def temp_name(name: bytes) -> bytes:
    """A unique temp name beside `name`, recognisable by recovery (`.zstfs-tmp.` prefix)."""
    return TEMP_PREFIX.encode() + os.urandom(6).hex().encode() + b"." + name[-100:]


def kept_name(name: bytes) -> bytes:
    """A unique name beside `name` to set a file aside under (`.zstfs-kept.` prefix): hidden,
    and never removed by recovery."""
    return KEPT_PREFIX + os.urandom(6).hex().encode() + b"." + name[-100:]


def is_temp(name: bytes) -> bool:
    return name.startswith(TEMP_PREFIX.encode())
