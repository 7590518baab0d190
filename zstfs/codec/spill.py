"""Decoded copies: the decoded bytes of checked big frames, kept in unnamed temporary files
(``O_TMPFILE``) in the store, so that a big foreign frame is decoded once, not once to check it
and again for every read."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import OrderedDict

from zstfs.codec.budget import Janitor
from zstfs.codec.format import CorruptError, Identity, pread_full, write_all

#: Big frames (too big to cache whole) are decoded once to check them; with a spill directory
#: the checking pass also writes what it decodes to an unnamed temporary file there (O_TMPFILE:
#: gone with the daemon, whatever kills it), and reads are then served from that file. At most
#: this many bytes of such copies are kept (least recently used go first) ...
DEFAULT_SPILL_LIMIT = 16 * 2**30
#: ... each for this long after its last read ...
SPILL_IDLE_SECONDS = 600.0
#: ... and only while the filesystem keeps this share of its space, and SPILL_MIN_FREE bytes,
#: free after the copy (the store's own writes come first).
SPILL_FREE_SHARE = 0.10
SPILL_MIN_FREE = 1 << 30
#: While a copy is written, the free space is looked at again every this many bytes; while copies
#: are held, every this many seconds (all are dropped when it fell short).
SPILL_CHECK_EVERY = 64 << 20
SPILL_ROOM_CHECK = 30.0

SpillKey = tuple[Identity, int]  # (file, compressed start of the frame)


class Spill:
    """A checked big frame's decoded bytes, in an unnamed temporary file (see DEFAULT_SPILL_LIMIT).

    Written by the checking pass as it decodes; served from (``pread``) only once that pass found
    the frame intact, so reading it never returns a byte the frame's checksum has not vouched for.
    A reader pins it while it reads, so evicting it never closes the descriptor under a ``pread``.
    """

    __slots__ = ("__weakref__", "checked", "doomed", "fd", "given_up", "keep_free", "last_used",
                 "limit", "pins", "size")

    def __init__(self, fd: int, limit: int, keep_free: float) -> None:
        self.fd = fd
        self.size = 0
        self.limit = limit
        self.keep_free = keep_free  # bytes of the filesystem this copy must leave free
        self.checked = 0  # size at the last look at the free space
        self.last_used = time.monotonic()
        self.pins = 0
        self.doomed = False
        self.given_up = False  # set by another thread: stop at the next write (space wanted)

    def write(self, data: memoryview) -> None:
        """Append decoded bytes; on any error (a full disk), past ``limit``, or once the
        filesystem's free space falls to ``keep_free`` (others write too) the copy is given up
        and the checking pass goes on without it."""
        if self.fd < 0:
            return
        if self.size + len(data) > self.limit or self.given_up:
            self.close()
            return
        try:
            if self.size - self.checked >= SPILL_CHECK_EVERY:
                self.checked = self.size
                sv = os.fstatvfs(self.fd)
                if sv.f_bavail * sv.f_frsize < self.keep_free:
                    raise OSError("the filesystem is filling up")
            write_all(self.fd, data)
        except OSError:
            self.close()
            return
        self.size += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1




class Spills:
    """The decoded copies held: at most ``limit`` bytes in all (least recently used go first),
    each dropped ``idle`` seconds after its last read, all dropped when the filesystem keeps less
    free than ``keep_free`` or a write into the store needs the space (:meth:`give_back`)."""

    def __init__(self, cond: threading.Condition, janitor: Janitor, dir_fd: int | None = None,
                 limit: int = DEFAULT_SPILL_LIMIT, idle: float = SPILL_IDLE_SECONDS) -> None:
        self._cond = cond
        self._janitor = janitor
        self.dir_fd = dir_fd
        self.limit = limit
        self.idle = idle
        self.keep_free = (SPILL_FREE_SHARE, SPILL_MIN_FREE)  # share of the fs, bytes
        self._held: OrderedDict[SpillKey, Spill] = OrderedDict()  # LRU first
        self._bytes = 0
        #: Copies being written by a checking pass (not kept yet), so that they can be stopped.
        self._writing: weakref.WeakSet[Spill] = weakref.WeakSet()
        self.given_back = 0  # times copies were dropped because a write needed the space
        self.skipped = 0  # big frames checked without a copy (no room, no O_TMPFILE)
        janitor.add(self._janitor_locked)

    def set_dir(self, dir_fd: int | None) -> None:
        """Where checked big frames are copied (an open directory; None: nowhere)."""
        with self._cond:
            self.dir_fd = dir_fd

    def stats(self) -> tuple[int, int]:
        """(copies held, bytes held)."""
        with self._cond:
            return len(self._held), self._bytes

    def give_back(self) -> int:
        """Someone needs the space now (a write failed with ENOSPC): drop every decoded copy,
        and stop the ones being written at their next block. Returns the bytes given back
        (a copy that a reader is reading goes when that ``pread`` returns)."""
        with self._cond:
            freed = self._bytes + sum(s.size for s in self._writing if s.fd >= 0)
            for spill in self._writing:
                spill.given_up = True
            self.clear_locked()
            if freed:
                self.given_back += 1
        return freed

    def clear_locked(self) -> None:
        for key in list(self._held):
            self._drop_locked(key)

    def close_inherited(self) -> None:
        """In a forked child: close the parent's copies (no lock: a thread of the parent's may
        have held it)."""
        for spill in self._held.values():
            spill.close()

    def new(self, expected: int | None) -> Spill | None:
        """An unnamed file for the decoded copy of a frame of ``expected`` bytes (None: unknown),
        or None when there is no directory, no room, or no O_TMPFILE there."""
        with self._cond:
            dir_fd = self.dir_fd
        if dir_fd is None:
            return None
        need = expected or 0
        try:
            sv = os.fstatvfs(dir_fd)
            keep = self._keep_free(sv)
            if need > self.limit or sv.f_bavail * sv.f_frsize - need < keep:
                raise OSError("no room")
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError:
            self.skipped += 1
            return None
        spill = Spill(fd, self.limit if expected is None else expected, keep)
        with self._cond:
            self._writing.add(spill)
        return spill

    def _keep_free(self, sv: os.statvfs_result) -> float:
        """Bytes of that filesystem that copies must leave free (``keep_free``)."""
        share, least = self.keep_free
        return max(sv.f_blocks * sv.f_frsize * share, least)

    def _short_of_room(self) -> bool:
        """Whether the spill directory's filesystem has less free space than copies must leave."""
        dir_fd = self.dir_fd
        if dir_fd is None:
            return False
        try:
            sv = os.fstatvfs(dir_fd)
        except OSError:
            return False
        return sv.f_bavail * sv.f_frsize < self._keep_free(sv)

    def remember(self, identity: Identity, comp_start: int, spill: Spill | None, size: int) -> None:
        """Keep a finished copy of a frame just found intact (if it is whole)."""
        if spill is None:
            return
        with self._cond:
            self._writing.discard(spill)
        if spill.fd < 0 or spill.size != size:
            self.skipped += 1
            spill.close()
            return
        key = (identity, comp_start)
        with self._cond:
            if key in self._held:
                self._drop_locked(key)
            while self._held and self._bytes + size > self.limit:
                self._drop_locked(next(iter(self._held)))
            self._held[key] = spill
            self._bytes += size
            spill.last_used = time.monotonic()
            self._janitor.start_locked()

    def _drop_locked(self, key: SpillKey) -> None:
        spill = self._held.pop(key)
        self._bytes -= spill.size
        if spill.pins:
            spill.doomed = True  # closed by the last reader
        else:
            spill.close()

    def unpin(self, spill: Spill) -> None:
        with self._cond:
            spill.pins -= 1
            if spill.doomed and not spill.pins:
                spill.close()

    def held(self, identity: Identity, comp_start: int) -> Spill | None:
        """The copy kept of that frame, if any (tests)."""
        with self._cond:
            return self._held.get((identity, comp_start))

    def read(self, identity: Identity, comp_start: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of a checked frame from its decoded copy, or None without one."""
        key = (identity, comp_start)
        with self._cond:
            spill = self._held.get(key)
            if spill is None:
                return None
            self._held.move_to_end(key)
            spill.last_used = time.monotonic()
            spill.pins += 1
        try:
            data = pread_full(spill.fd, hi - lo, lo)
        finally:
            self.unpin(spill)
        if len(data) != hi - lo:  # never: the copy was complete when kept
            raise CorruptError(f"frame at offset {comp_start}: decoded copy is short")
        return data

    def _janitor_locked(self, now: float) -> float | None:
        """Drop the copy read longest ago once idle for ``idle``; every copy when the
        filesystem fills up (other writers come first: looked at every SPILL_ROOM_CHECK
        seconds while any is held)."""
        if not self._held:
            return None
        wait = 3600.0
        if self.idle > 0:
            key, spill = next(iter(self._held.items()))
            due = spill.last_used + self.idle - now
            if due <= 0:
                self._drop_locked(key)
                return 0.0
            wait = due
        if self._short_of_room():
            self.clear_locked()
            return 0.0
        return min(wait, SPILL_ROOM_CHECK)
