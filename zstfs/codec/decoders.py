"""The decoder budget: everything decoding holds in the daemon, shared by every reader."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import threading
import time
import weakref
from collections import OrderedDict

import zstandard

from zstfs.codec.decode import STREAM_READ, check_extent, count_frame, decode_whole
from zstfs.codec.format import (
    IO_CHUNK,
    MAX_BLOCK_SIZE,
    ZSTD_DEFAULT_WINDOW,
    BudgetBusyError,
    CorruptError,
    DecodeLimitError,
    Identity,
    PreadSource,
    decompressor,
    gib,
    pread_full,
    write_all,
)
from zstfs.codec.index import Frame, Index, RawFrame, build_index

INDEX_CACHE_ENTRIES = 4096
VERIFIED_ENTRIES = 4096
#: Everything decoding holds at once in the daemon: the decoded-frame cache, whole-frame decodes
#: in flight and streaming decoders (their windows), parked or working.  With the daemon's own
#: ~40 MB this keeps its peak RSS under 200 MB whatever the number of readers (BENCHMARKS.md).
DEFAULT_MEMORY = 120 * 2**20
#: The part of the budget decoded frames may keep when nobody needs the room: three default
#: (32 MiB) frames; frames up to half of it are cached whole and shared by all readers ...
DEFAULT_CACHE_LIMIT = 96 * 2**20
#: ... of which no frame bigger than this (zstfs's own are 32 MiB): a sequential reader then
#: has the frame it reads and the two decoded ahead of it (AHEAD_FRAMES) cached at once.
CACHED_FRAME_MAX = 32 * 2**20
#: The most one read decodes from a single frame (a "zeros bomb" of 20 GiB is refused at once
#: when its header says so, and stopped here when it does not).  ~2-4 s of one core.
MAX_FRAME_DECODE = 4 * 2**30
#: A parked decoder nobody used for this long gives its memory back.
IDLE_SECONDS = 30.0
#: Resumable decoder positions kept per big frame (sequential readers, a few random ones).
STREAMS_PER_FRAME = 4
#: Decoded bytes a stream keeps behind its position, so reads that arrive slightly out of order
#: (the kernel's parallel readahead) are served without restarting the frame.
STREAM_HISTORY = 4 << 20
#: Granularity of the budget charged by a decoder whose output size is not known in advance.
GROW_STEP = 8 << 20
#: Decoded bytes a sequential stream keeps ready ahead of its reader, decoded by a prefetch
#: thread on another core while the FUSE layer ships the previous ones.
STREAM_AHEAD = 4 << 20
PREFETCH_CHUNK = 256 << 10
#: Frames decoded ahead of a sequential reader, in parallel (the next ones after the frame read).
AHEAD_FRAMES = 2
#: Decoder context, block buffers and bookkeeping on top of the window (zstd's DCtx is ~160 KiB).
STREAM_OVERHEAD = (STREAM_READ + STREAM_HISTORY + STREAM_AHEAD + 2 * IO_CHUNK + MAX_BLOCK_SIZE
                   + (256 << 10))
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
#: Reservations this small never wait: the FUSE layer decodes small files on its event loop.
SMALL_RESERVATION = 4 << 20
#: A reservation that cannot be met for this long (the budget is pinned by work in progress)
#: fails rather than hanging the read.
RESERVE_TIMEOUT = 60.0


def stream_cost(window: int, size: int | None) -> int:
    """Memory of a streaming decoder: zstd allocates min(window, content size) plus a block."""
    need = window if size is None else min(window, size)
    return need + STREAM_OVERHEAD


class _Stream:
    """A decoder positioned inside one big frame, so sequential reads continue where they ended.

    It reads its own duplicate of the file descriptor, so it stays valid after the handle that
    created it is closed, and can be resumed by any reader of the same file.  It remembers the
    bytes it decoded last, from ``STREAM_HISTORY`` behind the end of the last read served to up
    to ``STREAM_AHEAD`` decoded ahead of it by the prefetcher.  Only the thread that holds the
    stream (``busy``) decodes; the remembered pieces change under ``lock`` only, so other threads
    may serve from them (:meth:`peek`).
    """

    def __init__(self, fd: int, key: tuple[Identity, int], frame: Frame, cost: int,
                 lock: threading.Condition) -> None:
        self.key = key
        self.frame = frame
        self.cost = cost
        self.pos = 0
        self.served = 0  # end of the furthest read served
        self.queued = False  # waiting for the prefetcher
        self.doomed = False  # dropped at the next check-in (Decoders.clear while busy)
        self.pinned: int | None = None  # the holder's read starts here: history kept from it
        self.lock = lock
        # The decoded bytes [pos - _history, pos), as the pieces the decoder returned.
        self._pieces: collections.deque[bytes] = collections.deque()
        self._history = 0
        self.busy = True
        self.last_used = time.monotonic()
        self._fd = os.dup(fd)
        self._reader: zstandard.ZstdDecompressionReader | None = decompressor().stream_reader(
            PreadSource(self._fd, frame.comp_start, frame.comp_end),
            read_size=STREAM_READ,
            read_across_frames=False,
            closefd=False,
        )

    @property
    def history_start(self) -> int:
        return self.pos - self._history

    def work(self, lo: int) -> int:
        """Bytes to decode before this stream can serve offset ``lo`` (-1: it cannot)."""
        if lo < self.history_start:
            return -1
        return max(0, lo - self.pos)

    def close(self) -> None:
        self._reader = None  # the decoder and its window go now, even if a traceback holds us
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pull(self, n: int, keep: bool) -> list[bytes]:
        parts: list[bytes] = []
        while n > 0:
            if self._reader is None:
                raise CorruptError(f"frame at offset {self.frame.comp_start}: decoder released")
            try:
                data = self._reader.read(min(IO_CHUNK, n))
            except zstandard.ZstdError as exc:
                raise CorruptError(f"frame at offset {self.frame.comp_start}: {exc}") from exc
            if not data:
                raise CorruptError(
                    f"frame at offset {self.frame.comp_start} ends at {self.pos} bytes, "
                    f"expected {self.frame.log_size}"
                )
            n -= len(data)
            if keep or n < STREAM_HISTORY:
                parts.append(data)
            else:
                with self.lock:
                    self.pos += len(data)
                    self._pieces.clear()
                    self._history = 0
                continue
            self._remember(data)
        return parts

    def _remember(self, data: bytes) -> None:
        with self.lock:
            self._pieces.append(data)
            self._history += len(data)
            self.pos += len(data)
            self._trim_locked()

    def _trim_locked(self) -> None:
        keep_from = self.served - STREAM_HISTORY
        if self.pinned is not None:
            keep_from = min(keep_from, self.pinned)
        while self._pieces and self.history_start + len(self._pieces[0]) <= keep_from:
            self._history -= len(self._pieces.popleft())

    def _recall_locked(self, lo: int, hi: int) -> list[bytes]:
        """Slices of the remembered bytes covering ``[lo, min(hi, pos))``."""
        out: list[bytes] = []
        at = self.history_start
        for piece in self._pieces:
            end = at + len(piece)
            if end > lo and at < hi:
                out.append(piece[max(lo, at) - at : min(hi, end) - at])
            at = end
        return out

    def peek(self, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` if already decoded and remembered (any thread, under ``lock``)."""
        if lo < self.history_start or hi > self.pos:
            return None
        out = self._recall_locked(lo, hi)
        self.served = max(self.served, hi)
        self._trim_locked()
        return out[0] if len(out) == 1 else b"".join(out)

    def read(self, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of the frame (``lo`` at or after ``history_start``); the caller
        holds the stream."""
        out: list[bytes] = []
        if lo < self.pos:
            with self.lock:
                out = self._recall_locked(lo, hi)
            if lo < self.history_start or sum(map(len, out)) != min(hi, self.pos) - lo:
                raise AssertionError(f"stream history lost [{lo}, {self.pos})")  # never: pinned
            lo = min(hi, self.pos)
        if lo < hi:
            if lo > self.pos:
                self._pull(lo - self.pos, keep=False)
            out.extend(self._pull(hi - lo, keep=True))
        with self.lock:
            self.served = max(self.served, hi)
            self._trim_locked()
        return out[0] if len(out) == 1 else b"".join(out)

    def prefetch(self) -> bool:
        """Decode one chunk ahead of the last read served; True if more would be useful."""
        want = min(self.served + STREAM_AHEAD, self.frame.log_size) - self.pos
        if want <= 0:
            return False
        self._pull(min(want, PREFETCH_CHUNK), keep=True)
        return self.pos < min(self.served + STREAM_AHEAD, self.frame.log_size)


class _Spill:
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


class Decoders:
    """The daemon's one decoder budget, shared by every reader and the decoded-frame cache.

    Everything decoding holds counts against ``memory``: cached decoded frames, whole-frame decodes
    in flight (output plus input) and streaming decoders (window, buffers), whether working or
    parked between reads.  A decode that needs room first evicts cached frames, then parked
    decoders (least recently used first), then waits for work in progress to finish; a frame
    whose decoder alone would not fit (a window beyond what ``memory`` allows, as `zstd --long=31`
    writes) raises :class:`DecodeLimitError` at once, naming the ``--long`` it needs.

    Big frames (more than half the cache) are streamed: each keeps up to ``STREAMS_PER_FRAME``
    resumable decoder positions, shared by all readers of the file, so a read that continues where
    an earlier one ended continues that decoder instead of decoding from the frame start again.
    Parked decoders unused for ``idle_seconds`` are released by a janitor thread.

    Before any byte of a frame is served, the frame has been decoded in full once and found
    consistent: checksum (when present), exact length (the seek table's or the header's claim),
    structure.  Small frames are decoded whole anyway; a big one is decoded once and remembered as
    verified by file identity.  Given a ``spill_dir`` (the daemon passes the backing store's root),
    that checking pass also copies the big frame's decoded bytes into an unnamed temporary file
    there, and reads of the frame are served from it: a foreign single-frame file is decoded once,
    not once to check and again to serve, and random reads in it cost a ``pread``.  Copies are
    bounded (``spill_limit`` bytes in all, free space kept, dropped when idle) and optional: without
    room for one, the frame is streamed as before.

    Thread-safe; one instance per daemon (``default_decoders()`` unless a caller passes its own).
    """

    def __init__(
        self,
        memory: int = DEFAULT_MEMORY,
        cache: int = DEFAULT_CACHE_LIMIT,
        *,
        max_frame: int = MAX_FRAME_DECODE,
        idle_seconds: float = IDLE_SECONDS,
        spill_dir: int | None = None,
        spill_limit: int = DEFAULT_SPILL_LIMIT,
        spill_idle: float = SPILL_IDLE_SECONDS,
    ) -> None:
        self.memory = memory
        self.cache_limit = min(cache, memory)
        self.max_frame = max_frame
        self.idle_seconds = idle_seconds
        self._cond = threading.Condition(threading.Lock())
        self._used = 0  # cached frames + reservations (decodes in flight, streams)
        self.peak = 0  # highest _used seen (tests, benchmarks)
        self.streams_started = 0  # streaming decoders started at a frame start
        self.frames_decoded = 0  # cacheable frames decoded whole
        self.streamed_bytes = 0  # bytes decoded by streaming decoders (skipped ones included)
        self._index_cache: OrderedDict[Identity, Index] = OrderedDict()
        self._failed: OrderedDict[Identity, tuple[type[CorruptError], str]] = OrderedDict()
        self._frames: OrderedDict[tuple[Identity, int], bytes] = OrderedDict()
        self._frame_bytes = 0
        self._verified: OrderedDict[tuple[Identity, int], None] = OrderedDict()
        self._inflight: dict[tuple[object, ...], threading.Event] = {}
        self._streams: dict[tuple[Identity, int], list[_Stream]] = {}
        self._idle: OrderedDict[_Stream, None] = OrderedDict()  # parked streams, LRU first
        self._janitor: threading.Thread | None = None
        self._prefetch_queue: collections.deque[_Stream] = collections.deque()
        self._prefetcher: threading.Thread | None = None
        # Frames queued for decode_ahead and not decoded by anyone yet -> their sizes.
        self._ahead: dict[tuple[Identity, int], int] = {}
        self._ahead_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.spill_dir = spill_dir
        self.spill_limit = spill_limit
        self.spill_idle = spill_idle
        self.spill_keep_free = (SPILL_FREE_SHARE, SPILL_MIN_FREE)  # share of the fs, bytes
        self._spills: OrderedDict[tuple[Identity, int], _Spill] = OrderedDict()  # LRU first
        self._spill_bytes = 0
        #: Copies being written by a checking pass (not kept yet), so that they can be stopped.
        self._writing: weakref.WeakSet[_Spill] = weakref.WeakSet()
        self.spills_given_back = 0  # times copies were dropped because a write needed the space
        self.spills_skipped = 0  # big frames checked without a copy (no room, no O_TMPFILE)

    # ---------------------------------------------------------------- accounting
    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    def stream_count(self) -> int:
        with self._cond:
            return sum(len(v) for v in self._streams.values())

    def reserve(self, nbytes: int, what: str, *, never_wait: bool = False) -> None:
        """Take ``nbytes`` of the budget, evicting or waiting as needed (see the class doc)."""
        if nbytes > self.memory:
            raise DecodeLimitError(f"{what} needs {gib(nbytes)} of decoder memory, more than "
                                   f"the budget of {gib(self.memory)}")
        deadline = time.monotonic() + RESERVE_TIMEOUT
        with self._cond:
            while self._used + nbytes > self.memory:
                if self._evict_one_locked():
                    continue
                if never_wait and nbytes <= SMALL_RESERVATION:
                    break  # never block a small decode (it may run on the event loop)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusyError(f"{what}: the decoder budget stayed busy for "
                                           f"{RESERVE_TIMEOUT:.0f} s")
                self._cond.wait(min(left, 1.0))
            self._used += nbytes
            self.peak = max(self.peak, self._used)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._used -= nbytes
            self._cond.notify_all()

    def _evict_one_locked(self) -> bool:
        if self._frames:
            _key, data = self._frames.popitem(last=False)
            self._frame_bytes -= len(data)
            self._used -= len(data)
            return True
        if self._idle:
            stream, _ = self._idle.popitem(last=False)
            self._drop_stream_locked(stream)
            return True
        return False

    def _drop_stream_locked(self, stream: _Stream) -> None:
        streams = self._streams.get(stream.key)
        if streams is not None and stream in streams:
            streams.remove(stream)
            if not streams:
                del self._streams[stream.key]
        self._idle.pop(stream, None)
        stream.close()
        self._used -= stream.cost
        self._cond.notify_all()

    # ---------------------------------------------------------------- knobs and caches
    def set_cache_limit(self, nbytes: int) -> int:
        """Set the decoded-frame cache bound; returns the previous one (tests restore it)."""
        with self._cond:
            previous, self.cache_limit = self.cache_limit, max(0, min(nbytes, self.memory))
            self._trim_cache_locked(0)
            self._cond.notify_all()
        return previous

    def clear(self) -> None:
        """Forget every cached index, decoded frame, verification mark and parked decoder."""
        with self._cond:
            self._index_cache.clear()
            self._failed.clear()
            self._used -= self._frame_bytes
            self._frames.clear()
            self._frame_bytes = 0
            self._verified.clear()
            for key in list(self._spills):
                self._drop_spill_locked(key)
            self._prefetch_queue.clear()
            for streams in list(self._streams.values()):
                for stream in list(streams):
                    if stream.busy:
                        stream.doomed = True  # dropped when its holder is done with it
                    else:
                        self._drop_stream_locked(stream)
            self._cond.notify_all()

    def _janitor_loop(self) -> None:
        """Drop parked decoders and decoded copies once idle (both kept in least recently used
        order, so only the oldest of each is ever due)."""
        with self._cond:
            while (self._idle and self.idle_seconds > 0) or self._spills:
                now = time.monotonic()
                wait = 3600.0
                if self._idle and self.idle_seconds > 0:
                    oldest = next(iter(self._idle))
                    due = oldest.last_used + self.idle_seconds - now
                    if due <= 0:
                        self._drop_stream_locked(oldest)
                        continue
                    wait = min(wait, due)
                if self._spills and self.spill_idle > 0:
                    key, spill = next(iter(self._spills.items()))
                    due = spill.last_used + self.spill_idle - now
                    if due <= 0:
                        self._drop_spill_locked(key)
                        continue
                    wait = min(wait, due)
                if self._spills:
                    # Copies give their room back when the filesystem fills up (other writers
                    # come first): looked at every SPILL_ROOM_CHECK seconds while any is held.
                    if self._short_of_room():
                        for key in list(self._spills):
                            self._drop_spill_locked(key)
                        continue
                    wait = min(wait, SPILL_ROOM_CHECK)
                self._cond.wait(wait)
            self._janitor = None

    def _start_janitor_locked(self) -> None:
        if self._janitor is None and (self.idle_seconds > 0 or self._spills):
            self._janitor = threading.Thread(target=self._janitor_loop, daemon=True,
                                             name="zstfs-decoder-janitor")
            self._janitor.start()

    # ---------------------------------------------------------------- decoded copies
    def set_spill_dir(self, dir_fd: int | None) -> None:
        """Where checked big frames are copied (an open directory; None: nowhere)."""
        with self._cond:
            self.spill_dir = dir_fd

    def spill_stats(self) -> tuple[int, int]:
        """(copies held, bytes held)."""
        with self._cond:
            return len(self._spills), self._spill_bytes

    def give_back_copies(self) -> int:
        """Someone needs the space now (a write failed with ENOSPC): drop every decoded copy,
        and stop the ones being written at their next block. Returns the bytes given back
        (a copy that a reader is reading goes when that ``pread`` returns)."""
        with self._cond:
            freed = self._spill_bytes + sum(s.size for s in self._writing if s.fd >= 0)
            for spill in self._writing:
                spill.given_up = True
            for key in list(self._spills):
                self._drop_spill_locked(key)
            if freed:
                self.spills_given_back += 1
        return freed

    def _new_spill(self, expected: int | None) -> _Spill | None:
        """An unnamed file for the decoded copy of a frame of ``expected`` bytes (None: unknown),
        or None when there is no directory, no room, or no O_TMPFILE there."""
        with self._cond:
            dir_fd = self.spill_dir
        if dir_fd is None:
            return None
        need = expected or 0
        try:
            sv = os.fstatvfs(dir_fd)
            keep = self._keep_free(sv)
            if need > self.spill_limit or sv.f_bavail * sv.f_frsize - need < keep:
                raise OSError("no room")
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError:
            self.spills_skipped += 1
            return None
        spill = _Spill(fd, self.spill_limit if expected is None else expected, keep)
        with self._cond:
            self._writing.add(spill)
        return spill

    def _keep_free(self, sv: os.statvfs_result) -> float:
        """Bytes of that filesystem that copies must leave free (``spill_keep_free``)."""
        share, least = self.spill_keep_free
        return max(sv.f_blocks * sv.f_frsize * share, least)

    def _short_of_room(self) -> bool:
        """Whether the spill directory's filesystem has less free space than copies must leave."""
        dir_fd = self.spill_dir
        if dir_fd is None:
            return False
        try:
            sv = os.fstatvfs(dir_fd)
        except OSError:
            return False
        return sv.f_bavail * sv.f_frsize < self._keep_free(sv)

    def _keep_spill(self, identity: Identity, comp_start: int, spill: _Spill | None,
                    size: int) -> None:
        """Keep a finished copy of a frame just found intact (if it is whole)."""
        if spill is None:
            return
        with self._cond:
            self._writing.discard(spill)
        if spill.fd < 0 or spill.size != size:
            self.spills_skipped += 1
            spill.close()
            return
        key = (identity, comp_start)
        with self._cond:
            if key in self._spills:
                self._drop_spill_locked(key)
            while self._spills and self._spill_bytes + size > self.spill_limit:
                self._drop_spill_locked(next(iter(self._spills)))
            self._spills[key] = spill
            self._spill_bytes += size
            spill.last_used = time.monotonic()
            self._start_janitor_locked()

    def _drop_spill_locked(self, key: tuple[Identity, int]) -> None:
        spill = self._spills.pop(key)
        self._spill_bytes -= spill.size
        if spill.pins:
            spill.doomed = True  # closed by the last reader
        else:
            spill.close()

    def _unpin_spill(self, spill: _Spill) -> None:
        with self._cond:
            spill.pins -= 1
            if spill.doomed and not spill.pins:
                spill.close()

    def spill_read(self, identity: Identity, comp_start: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of a checked frame from its decoded copy, or None without one."""
        key = (identity, comp_start)
        with self._cond:
            spill = self._spills.get(key)
            if spill is None:
                return None
            self._spills.move_to_end(key)
            spill.last_used = time.monotonic()
            spill.pins += 1
        try:
            data = pread_full(spill.fd, hi - lo, lo)
        finally:
            self._unpin_spill(spill)
        if len(data) != hi - lo:  # never: the copy was complete when kept
            raise CorruptError(f"frame at offset {comp_start}: decoded copy is short")
        return data

    def _trim_cache_locked(self, room: int) -> None:
        while self._frames and self._frame_bytes + room > self.cache_limit:
            _key, data = self._frames.popitem(last=False)
            self._frame_bytes -= len(data)
            self._used -= len(data)

    @property
    def cacheable_size(self) -> int:
        return min(self.cache_limit // 2, CACHED_FRAME_MAX)

    def cacheable(self, frame: Frame) -> bool:
        """Frames up to half the cache (at most CACHED_FRAME_MAX) are decoded whole and cached;
        bigger ones are streamed (or served from their decoded copy)."""
        return frame.log_size <= self.cacheable_size

    def cached_frame(self, key: tuple[Identity, int]) -> bytes | None:
        with self._cond:
            data = self._frames.get(key)
            if data is not None:
                self._frames.move_to_end(key)
            return data

    def is_verified(self, identity: Identity, comp_start: int) -> bool:
        with self._cond:
            return (identity, comp_start) in self._verified

    def _mark_verified(self, identity: Identity, comp_start: int) -> None:
        with self._cond:
            self._verified[(identity, comp_start)] = None
            while len(self._verified) > VERIFIED_ENTRIES:
                self._verified.popitem(last=False)

    # ---------------------------------------------------------------- index
    def cached_index(self, identity: Identity) -> Index | None:
        with self._cond:
            index = self._index_cache.get(identity)
            if index is not None:
                self._index_cache.move_to_end(identity)
            return index

    def index(self, fd: int, identity: Identity) -> Index:
        """The cached index for this file identity, built (outside the lock) on a miss."""
        index = self.cached_index(identity)
        if index is not None:
            return index
        with self._cond:
            failed = self._failed.get(identity)
        if failed is not None:  # the same file again: the same answer, without the work
            raise failed[0](failed[1])

        def count(raw: RawFrame) -> int:
            # Without a content size zstd allocates the whole window, but only the part the
            # output reaches becomes resident: charge the budget as the output grows.
            what = f"frame at offset {raw.start}"
            window = raw.window or self.max_frame
            charged = min(stream_cost(window, GROW_STEP), self.memory)
            self.reserve(charged, what)

            def grow(total: int) -> None:
                nonlocal charged
                self._check_window(window, raw.start, total)
                need = min(stream_cost(window, total + GROW_STEP), self.memory)
                if need > charged:
                    self.reserve(need - charged, what)
                    charged = need

            # A frame whose compressed extent alone is a sixteenth of the cache will likely be too
            # big to cache whole: copy it while checking it (smaller ones would only cost writes).
            spill = None
            if raw.end - raw.start >= self.cache_limit // 16:
                spill = self._new_spill(None)
            try:
                n = count_frame(fd, raw.start, raw.end, None, self.max_frame, grow,
                                 sink=None if spill is None else spill.write)
            except BaseException:
                if spill is not None:
                    spill.close()
                raise
            finally:
                self.release(charged)
            if spill is not None and n <= self.cacheable_size:
                spill.close()  # cacheable after all: decoded whole when read
                spill = None
            self._keep_spill(identity, raw.start, spill, n)
            self._mark_verified(identity, raw.start)
            return n

        try:
            index = build_index(fd, count)
        except CorruptError as e:
            if not isinstance(e, BudgetBusyError):
                with self._cond:
                    self._failed[identity] = (type(e), str(e))
                    while len(self._failed) > INDEX_CACHE_ENTRIES:
                        self._failed.popitem(last=False)
            raise
        with self._cond:
            self._index_cache[identity] = index
            while len(self._index_cache) > INDEX_CACHE_ENTRIES:
                self._index_cache.popitem(last=False)
        return index

    def _check_window(self, window: int, at: int, size: int | None) -> None:
        """Refuse at once a frame whose streaming decoder could never fit the budget."""
        cost = stream_cost(window, size)
        if cost <= self.memory:
            return
        need = window if size is None else min(window, size)
        hint = ""
        if window > ZSTD_DEFAULT_WINDOW:
            bits = (window - 1).bit_length()
            hint = f" (written with a long window: `zstd -d --long={bits}`)"
        raise DecodeLimitError(
            f"frame at offset {at} needs a {gib(need)} decoding window{hint}, more than the "
            f"decoder budget of {gib(self.memory)}"
        )

    # ---------------------------------------------------------------- decoding
    def _once(self, key: tuple[object, ...]) -> threading.Event | None:
        """Claim ``key`` for this thread (returns its Event) or wait for the thread that has it
        (returns None after it finished): concurrent misses do the work once."""
        with self._cond:
            waiter = self._inflight.get(key)
            if waiter is None:
                done = self._inflight[key] = threading.Event()
                return done
        waiter.wait()
        return None

    def _done(self, key: tuple[object, ...], event: threading.Event) -> None:
        with self._cond:
            del self._inflight[key]
        event.set()

    def frame_bytes(self, fd: int, identity: Identity, frame_no: int, frame: Frame) -> bytes:
        """A cacheable frame decoded whole (verified), from the cache or decoded once even when
        several threads miss it at the same moment (the kernel's parallel readahead)."""
        data = self._decode_frame(fd, identity, frame_no, frame, ahead=False)
        assert data is not None
        return data

    def _decode_frame(self, fd: int, identity: Identity, frame_no: int, frame: Frame, *,
                      ahead: bool) -> bytes | None:
        key = (identity, frame_no)
        while True:
            data = self.cached_frame(key)
            if data is not None:
                return data
            event = self._once(("frame", identity, frame_no))
            if event is not None:
                break
        try:
            if ahead:
                with self._cond:
                    if key not in self._ahead:
                        return None  # decoded by its reader meanwhile (and maybe evicted since)
            comp = frame.comp_end - frame.comp_start
            self.reserve(frame.log_size + comp, f"frame at offset {frame.comp_start}",
                         never_wait=True)
            try:
                data = decode_whole(fd, frame)
            except BaseException:
                self.release(frame.log_size + comp)
                raise
            self._mark_verified(identity, frame.comp_start)
            with self._cond:
                self.frames_decoded += 1  # statistics (tests)
                self._ahead.pop(key, None)  # decoded: a job queued for it has nothing to do
                self._used -= comp
                if len(data) <= self.cacheable_size and key not in self._frames:
                    self._trim_cache_locked(len(data))
                    self._frames[key] = data
                    self._frame_bytes += len(data)
                else:
                    self._used -= len(data)
                self._cond.notify_all()
            return data
        finally:
            self._done(("frame", identity, frame_no), event)

    def decode_ahead(self, fd: int, identity: Identity, frame_no: int, frame: Frame,
                     reading: int) -> None:
        """Decode a cacheable frame into the cache in the background (AHEAD_FRAMES threads),
        unless it is there or being decoded already, for a reader of a frame of ``reading``
        bytes. Never waits for budget: a frame that does not fit now is decoded when read."""
        key = (identity, frame_no)
        with self._cond:
            # Only into room the cache has beside the frame being read and the others decoded
            # ahead (older frames are evicted first: least recently read).
            if (key in self._frames or ("frame", identity, frame_no) in self._inflight
                    or key in self._ahead or len(self._ahead) >= AHEAD_FRAMES
                    or reading + sum(self._ahead.values()) + frame.log_size > self.cache_limit
                    or self._used + frame.log_size + (frame.comp_end - frame.comp_start)
                    > self.memory):
                return
            self._ahead[key] = frame.log_size
            if self._ahead_pool is None:
                self._ahead_pool = concurrent.futures.ThreadPoolExecutor(
                    AHEAD_FRAMES, thread_name_prefix="zstfs-decode-ahead")
            pool = self._ahead_pool

        def done() -> None:
            with self._cond:
                self._ahead.pop(key, None)

        try:
            own = os.dup(fd)  # the reader's descriptor may be closed before the job runs
        except OSError:
            done()
            return

        def job() -> None:
            try:
                # Checked again once it is the one decoder of the frame: never a frame its
                # reader decoded meanwhile.
                self._decode_frame(own, identity, frame_no, frame, ahead=True)
            except (CorruptError, OSError):
                pass  # the reader that wants it decodes it again, and reports the damage
            finally:
                os.close(own)
                done()

        try:
            pool.submit(job)
        except RuntimeError:  # shut down (interpreter exit)
            os.close(own)
            done()

    def verify(self, fd: int, identity: Identity, frame: Frame) -> None:
        """Decode a frame once in full (to nowhere) unless already verified for this identity."""
        while not self.is_verified(identity, frame.comp_start):
            key = ("verify", identity, frame.comp_start)
            event = self._once(key)
            if event is None:
                continue
            try:
                if self.is_verified(identity, frame.comp_start):
                    return
                self._check_window(frame.window, frame.comp_start, frame.log_size)
                cost = stream_cost(frame.window, frame.log_size)
                self.reserve(cost, f"frame at offset {frame.comp_start}")
                spill = None if self.cacheable(frame) else self._new_spill(frame.log_size)
                try:
                    check_extent(fd, frame)
                    count_frame(fd, frame.comp_start, frame.comp_end, frame.log_size,
                                 self.max_frame, sink=None if spill is None else spill.write)
                except BaseException:
                    if spill is not None:
                        spill.close()
                    raise
                finally:
                    self.release(cost)
                self._keep_spill(identity, frame.comp_start, spill, frame.log_size)
                self._mark_verified(identity, frame.comp_start)
            finally:
                self._done(key, event)

    def stream_read(self, fd: int, identity: Identity, frame_no: int, frame: Frame,
                    lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of a big (verified) frame from the best resumable decoder."""
        data = self.peek(identity, frame_no, lo, hi)
        if data is not None:
            return data
        stream = self._checkout(fd, (identity, frame_no), frame, lo)
        ok = False
        before = stream.pos
        sequential = lo == stream.served and lo > 0
        try:
            data = stream.read(lo, hi)
            ok = True
            return data
        finally:
            self.streamed_bytes += stream.pos - before  # statistics: races only blur them
            self._checkin(stream, keep=ok, prefetch=sequential)

    def peek(self, identity: Identity, frame_no: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of a streamed frame if a decoder already has them (decoded ahead
        by the prefetcher, or just behind); never decodes, never waits for a decoder."""
        with self._cond:
            for stream in self._streams.get((identity, frame_no), ()):
                data = stream.peek(lo, hi)
                if data is not None:
                    stream.last_used = time.monotonic()
                    if stream in self._idle:
                        self._idle.move_to_end(stream)  # least recently used stays first
                    self._prefetch_locked(stream)
                    return data
        return None

    def _prefetch_locked(self, stream: _Stream) -> None:
        """Queue a sequentially read stream for decoding ahead (see :meth:`_prefetch_loop`)."""
        if stream.queued or stream.pos >= min(stream.served + STREAM_AHEAD,
                                              stream.frame.log_size):
            return
        stream.queued = True
        self._prefetch_queue.append(stream)
        self._cond.notify_all()
        if self._prefetcher is None:
            self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                name="zstfs-decoder-prefetch")
            self._prefetcher.start()

    def _prefetch_loop(self) -> None:
        """Decode ahead of sequential readers, one chunk per turn, on its own thread (the decoder
        releases the GIL): `cat` then decodes on one core while the FUSE layer ships on the
        other, and a reader that wants the stream waits at most one chunk."""
        while True:
            with self._cond:
                idle_since = time.monotonic()
                while not self._prefetch_queue:
                    if time.monotonic() - idle_since > 5.0:
                        self._prefetcher = None
                        return
                    self._cond.wait(1.0)
                stream = self._prefetch_queue.popleft()
                stream.queued = False
                if stream.busy or stream not in self._streams.get(stream.key, ()):
                    continue
                stream.busy = True
                self._idle.pop(stream, None)
            more = drop = False
            before = stream.pos
            try:
                more = stream.prefetch()
            except CorruptError:
                drop = True
            self.streamed_bytes += stream.pos - before
            with self._cond:
                stream.busy = False
                if drop or stream.doomed:
                    self._drop_stream_locked(stream)
                    continue
                self._idle[stream] = None
                if more:
                    self._prefetch_locked(stream)
                self._cond.notify_all()

    def _checkout(self, fd: int, key: tuple[Identity, int], frame: Frame, lo: int) -> _Stream:
        deadline = time.monotonic() + RESERVE_TIMEOUT
        while True:
            with self._cond:
                streams = self._streams.get(key, [])
                best: _Stream | None = None
                for s in streams:
                    w = s.work(lo)
                    if w >= 0 and (best is None or w < best.work(lo)):
                        best = s
                if best is not None and not best.busy:
                    best.busy = True
                    best.pinned = lo
                    self._idle.pop(best, None)
                    return best
                if best is None and len(streams) >= STREAMS_PER_FRAME:
                    # Make room among this frame's decoders: the parked one furthest along
                    # is the least likely to serve a read that had to start over.
                    parked = [s for s in streams if not s.busy]
                    if parked:
                        self._drop_stream_locked(max(parked, key=lambda s: s.pos))
                        best = None
                    else:
                        best = streams[0]  # all busy: wait for one
                if best is None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusyError(f"frame at offset {frame.comp_start}: its decoders "
                                           f"stayed busy for {RESERVE_TIMEOUT:.0f} s")
                self._cond.wait(min(left, 1.0))  # a busy decoder ahead of us: wait for it
        cost = stream_cost(frame.window, frame.log_size)
        self.reserve(cost, f"frame at offset {frame.comp_start}")
        try:
            stream = _Stream(fd, key, frame, cost, self._cond)
            stream.pinned = lo
        except BaseException:
            self.release(cost)
            raise
        with self._cond:
            self._streams.setdefault(key, []).append(stream)
            self.streams_started += 1
        return stream

    def _checkin(self, stream: _Stream, *, keep: bool, prefetch: bool = False) -> None:
        with self._cond:
            stream.busy = False
            stream.pinned = None
            stream.last_used = time.monotonic()
            if not keep or stream.doomed:
                self._drop_stream_locked(stream)
                return
            self._idle[stream] = None
            if prefetch:
                self._prefetch_locked(stream)
            self._cond.notify_all()
            self._start_janitor_locked()


_default_decoders: Decoders | None = None
_default_lock = threading.Lock()


def default_decoders() -> Decoders:
    """The process's shared budget, used by readers that are not given their own."""
    global _default_decoders
    with _default_lock:
        if _default_decoders is None:
            _default_decoders = Decoders()
        return _default_decoders


def _forget_default_after_fork() -> None:
    """A forked child (the daemon detaching after recovery) gets a fresh default budget: the
    parent's janitor and prefetch threads do not exist in it, and its lock may have been held."""
    global _default_decoders, _default_lock
    old, _default_decoders, _default_lock = _default_decoders, None, threading.Lock()
    if old is not None:
        for streams in old._streams.values():
            for stream in streams:
                with contextlib.suppress(OSError):
                    stream.close()
        for spill in old._spills.values():
            spill.close()


os.register_at_fork(after_in_child=_forget_default_after_fork)


def set_cache_limit(nbytes: int) -> int:
    """Set the default budget's decoded-frame cache bound; returns the previous bound."""
    return default_decoders().set_cache_limit(nbytes)


def clear_caches() -> None:
    """Forget the default budget's cached indexes, frames, marks and parked decoders."""
    default_decoders().clear()
