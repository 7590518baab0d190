"""The daemon's decoders, composed: the budget, the decoded-frame cache, the resumable streams,
the decoded copies and the index cache, and what needs several of them (building an index,
checking a big frame once)."""

from __future__ import annotations

from zstfs.codec.budget import DEFAULT_MEMORY, GROW_STEP, Budget, Janitor, stream_cost
from zstfs.codec.cache import DEFAULT_CACHE_LIMIT, FrameCache
from zstfs.codec.decode import check_extent, count_frame
from zstfs.codec.format import Identity, ProgressFn
from zstfs.codec.index import Frame, Index, RawFrame, build_index
from zstfs.codec.indexes import IndexCache
from zstfs.codec.spill import DEFAULT_SPILL_LIMIT, SPILL_IDLE_SECONDS, Spill, Spills
from zstfs.codec.streams import IDLE_SECONDS, Streams

#: The most one read decodes from a single frame (a "zeros bomb" of 20 GiB is refused at once
#: when its header says so, and stopped here when it does not).  ~2-4 s of one core.
MAX_FRAME_DECODE = 4 * 2**30


class Decoders:
    """The daemon's one decoder budget, shared by every reader and the decoded-frame cache.

    Everything decoding holds counts against ``memory`` (``budget``): cached decoded frames
    (``frames``), whole-frame decodes in flight (output plus input) and streaming decoders
    (``streams``: window, buffers), whether working or parked between reads.  A decode that needs
    room first evicts cached frames, then parked decoders (least recently used first), then waits
    for work in progress to finish; a frame whose decoder alone would not fit (a window beyond
    what ``memory`` allows, as `zstd --long=31` writes) raises :class:`DecodeLimitError` at once,
    naming the ``--long`` it needs.

    Big frames (more than half the cache) are streamed: each keeps up to ``STREAMS_PER_FRAME``
    resumable decoder positions, shared by all readers of the file, so a read that continues where
    an earlier one ended continues that decoder instead of decoding from the frame start again.
    Parked decoders unused for ``idle_seconds`` are released by a janitor thread.

    Before any byte of a frame is served, the frame has been decoded in full once and found
    consistent: checksum (when present), exact length (the seek table's or the header's claim),
    structure.  Small frames are decoded whole anyway; a big one is decoded once and remembered as
    verified by file identity.  Given a ``spill_dir`` (the daemon passes the backing store's root),
    that checking pass also copies the big frame's decoded bytes into an unnamed temporary file
    there (``spills``), and reads of the frame are served from it: a foreign single-frame file is
    decoded once, not once to check and again to serve, and random reads in it cost a ``pread``.
    Copies are bounded (``spill_limit`` bytes in all, free space kept, dropped when idle) and
    optional: without room for one, the frame is streamed as before.

    Each file's index, logical size and damage are kept by identity (``indexes``).

    Thread-safe; one instance per store (:class:`zstfs.store.Store` owns it), handed to every
    reader.  Not across a fork: a forked child calls :meth:`forked` for its own.
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
        self.max_frame = max_frame
        self.budget = Budget(memory)
        janitor = Janitor(self.budget.cond)
        self.frames = FrameCache(self.budget, cache)  # evicted first ...
        self.streams = Streams(self.budget, janitor, idle_seconds)  # ... then parked decoders
        self.spills = Spills(self.budget.cond, janitor, spill_dir, spill_limit, spill_idle)
        self.indexes = IndexCache()

    def forked(self) -> Decoders:
        """For a forked child (the daemon detaching after recovery): fresh decoders with the same
        settings, the inherited ones' descriptors closed.  The parent's janitor, prefetch and
        decode-ahead threads do not exist in the child, and its lock may have been held."""
        self.streams.close_inherited()
        self.spills.close_inherited()
        return Decoders(self.budget.memory, self.frames.limit, max_frame=self.max_frame,
                        idle_seconds=self.streams.idle_seconds, spill_dir=self.spills.dir_fd,
                        spill_limit=self.spills.limit, spill_idle=self.spills.idle)

    def clear(self) -> None:
        """Forget every cached index, size, decoded frame, verification mark, decoded copy and
        parked decoder."""
        self.indexes.clear()
        with self.budget.cond:
            self.frames.clear_locked()
            self.spills.clear_locked()
            self.streams.clear_locked()
            self.budget.cond.notify_all()

    def index(self, fd: int, identity: Identity) -> Index:
        """The index for this file identity (cached; built on a miss)."""

        def count(raw: RawFrame) -> int:
            # A frame without a content size is decoded once to learn it (and checked).  Without
            # one zstd allocates the whole window, but only the part the output reaches becomes
            # resident: charge the budget as the output grows.
            what = f"frame at offset {raw.start}"
            window = raw.window or self.max_frame
            charged = min(stream_cost(window, GROW_STEP), self.budget.memory)
            self.budget.reserve(charged, what)

            def grow(total: int) -> None:
                nonlocal charged
                self.budget.check_window(window, raw.start, total)
                need = min(stream_cost(window, total + GROW_STEP), self.budget.memory)
                if need > charged:
                    self.budget.reserve(need - charged, what)
                    charged = need

            # A frame whose compressed extent alone is a sixteenth of the cache will likely be too
            # big to cache whole: copy it while checking it (smaller ones would only cost writes).
            spill = None
            if raw.end - raw.start >= self.frames.limit // 16:
                spill = self.spills.new(None)
            try:
                n = self._check(fd, raw.start, raw.end, None, spill, grow)
            finally:
                self.budget.release(charged)
            if spill is not None and n <= self.frames.cacheable_size:
                spill.close()  # cacheable after all: decoded whole when read
                spill = None
            self.spills.remember(identity, raw.start, spill, n)
            self.frames.mark_verified(identity, raw.start)
            return n

        return self.indexes.get(identity, lambda: build_index(fd, count))

    def verify(self, fd: int, identity: Identity, frame: Frame) -> None:
        """Decode a frame once in full (to nowhere, or into its decoded copy) unless already
        verified for this identity."""
        frames = self.frames
        while not frames.is_verified(identity, frame.comp_start):
            key = ("verify", identity, frame.comp_start)
            event = frames.flights.claim(key)
            if event is None:
                continue
            try:
                if frames.is_verified(identity, frame.comp_start):
                    return
                self.budget.check_window(frame.window, frame.comp_start, frame.log_size)
                cost = stream_cost(frame.window, frame.log_size)
                self.budget.reserve(cost, f"frame at offset {frame.comp_start}")
                spill = None if frames.cacheable(frame) else self.spills.new(frame.log_size)
                try:
                    check_extent(fd, frame)
                    self._check(fd, frame.comp_start, frame.comp_end, frame.log_size, spill)
                finally:
                    self.budget.release(cost)
                self.spills.remember(identity, frame.comp_start, spill, frame.log_size)
                frames.mark_verified(identity, frame.comp_start)
            finally:
                frames.flights.done(key, event)

    def _check(self, fd: int, start: int, end: int, expected: int | None, spill: Spill | None,
               progress: ProgressFn | None = None) -> int:
        """Decode the frame ``[start, end)`` once in full, verified (:func:`count_frame`), into
        ``spill`` if given (closed, so never kept, if the frame is found damaged)."""
        try:
            return count_frame(fd, start, end, expected, self.max_frame, progress,
                               sink=None if spill is None else spill.write)
        except BaseException:
            if spill is not None:
                spill.close()
            raise
