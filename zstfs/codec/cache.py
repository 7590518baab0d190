"""The decoded-frame cache: small frames decoded whole (verified), shared by every reader and
charged to the budget; the marks of frames found intact; frames decoded ahead of a reader."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections import OrderedDict

from zstfs.codec.budget import Budget
from zstfs.codec.decode import decode_whole
from zstfs.codec.format import CorruptError, Identity
from zstfs.codec.index import Frame

#: The part of the budget decoded frames may keep when nobody needs the room: three default
#: (32 MiB) frames; frames up to half of it are cached whole and shared by all readers ...
DEFAULT_CACHE_LIMIT = 96 * 2**20
#: ... of which no frame bigger than this (zstfs's own are 32 MiB): a sequential reader then
#: has the frame it reads and the two decoded ahead of it (AHEAD_FRAMES) cached at once.
CACHED_FRAME_MAX = 32 * 2**20
#: Frames decoded ahead of a sequential reader, in parallel (the next ones after the frame read).
AHEAD_FRAMES = 2
VERIFIED_ENTRIES = 4096

FrameKey = tuple[Identity, int]  # (file, frame number) or (file, compressed start)


class Flights:
    """Work done once even when several threads want it at the same moment (the kernel's
    parallel readahead): the first claims a key, the others wait for it."""

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._inflight: dict[tuple[object, ...], threading.Event] = {}

    def claim(self, key: tuple[object, ...]) -> threading.Event | None:
        """Claim ``key`` for this thread (returns its Event, for :meth:`done`) or wait for the
        thread that has it (returns None after it finished)."""
        with self._cond:
            waiter = self._inflight.get(key)
            if waiter is None:
                done = self._inflight[key] = threading.Event()
                return done
        waiter.wait()
        return None

    def done(self, key: tuple[object, ...], event: threading.Event) -> None:
        with self._cond:
            del self._inflight[key]
        event.set()

    def __contains__(self, key: tuple[object, ...]) -> bool:
        return key in self._inflight


class FrameCache:
    """Decoded frames up to half of ``limit`` (at most CACHED_FRAME_MAX), least recently used
    evicted first, by the budget too when a decode needs the room."""

    def __init__(self, budget: Budget, limit: int = DEFAULT_CACHE_LIMIT) -> None:
        self.budget = budget
        self.limit = min(limit, budget.memory)
        self._cond = budget.cond
        self.flights = Flights(budget.cond)
        self._frames: OrderedDict[FrameKey, bytes] = OrderedDict()
        self._bytes = 0
        self._verified: OrderedDict[FrameKey, None] = OrderedDict()
        # Frames queued for decode_ahead and not decoded by anyone yet -> their sizes.
        self._ahead: dict[FrameKey, int] = {}
        self._ahead_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.decoded = 0  # frames decoded whole (statistics, tests)
        budget.add_evictor(self._evict_one_locked)

    @property
    def held(self) -> int:
        """Bytes of decoded frames held."""
        with self._cond:
            return self._bytes

    def set_limit(self, nbytes: int) -> int:
        """Set the cache bound; returns the previous one (tests restore it)."""
        with self._cond:
            previous, self.limit = self.limit, max(0, min(nbytes, self.budget.memory))
            self._trim_locked(0)
            self._cond.notify_all()
        return previous

    def clear_locked(self) -> None:
        self.budget.release_locked(self._bytes)
        self._frames.clear()
        self._bytes = 0
        self._verified.clear()

    def _evict_one_locked(self) -> bool:
        if not self._frames:
            return False
        _key, data = self._frames.popitem(last=False)
        self._bytes -= len(data)
        self.budget.release_locked(len(data))
        return True

    def _trim_locked(self, room: int) -> None:
        while self._frames and self._bytes + room > self.limit:
            self._evict_one_locked()

    @property
    def cacheable_size(self) -> int:
        return min(self.limit // 2, CACHED_FRAME_MAX)

    def cacheable(self, frame: Frame) -> bool:
        """Frames up to half the cache (at most CACHED_FRAME_MAX) are decoded whole and cached;
        bigger ones are streamed (or served from their decoded copy)."""
        return frame.log_size <= self.cacheable_size

    def cached(self, key: FrameKey) -> bytes | None:
        with self._cond:
            data = self._frames.get(key)
            if data is not None:
                self._frames.move_to_end(key)
            return data

    # ---------------------------------------------------------------- verification marks
    def is_verified(self, identity: Identity, comp_start: int) -> bool:
        with self._cond:
            return (identity, comp_start) in self._verified

    def mark_verified(self, identity: Identity, comp_start: int) -> None:
        with self._cond:
            self._verified[(identity, comp_start)] = None
            while len(self._verified) > VERIFIED_ENTRIES:
                self._verified.popitem(last=False)

    # ---------------------------------------------------------------- decoding
    def frame_bytes(self, fd: int, identity: Identity, frame_no: int, frame: Frame) -> bytes:
        """A cacheable frame decoded whole (verified), from the cache or decoded once even when
        several threads miss it at the same moment (the kernel's parallel readahead)."""
        data = self._decode(fd, identity, frame_no, frame, ahead=False)
        assert data is not None
        return data

    def _decode(self, fd: int, identity: Identity, frame_no: int, frame: Frame, *,
                ahead: bool) -> bytes | None:
        key = (identity, frame_no)
        flight = ("frame", identity, frame_no)
        while True:
            data = self.cached(key)
            if data is not None:
                return data
            event = self.flights.claim(flight)
            if event is not None:
                break
        try:
            if ahead:
                with self._cond:
                    if key not in self._ahead:
                        return None  # decoded by its reader meanwhile (and maybe evicted since)
            comp = frame.comp_end - frame.comp_start
            self.budget.reserve(frame.log_size + comp, f"frame at offset {frame.comp_start}",
                                never_wait=True)
            try:
                data = decode_whole(fd, frame)
            except BaseException:
                self.budget.release(frame.log_size + comp)
                raise
            self.mark_verified(identity, frame.comp_start)
            with self._cond:
                self.decoded += 1
                self._ahead.pop(key, None)  # decoded: a job queued for it has nothing to do
                self.budget.release_locked(comp)
                if len(data) <= self.cacheable_size and key not in self._frames:
                    self._trim_locked(len(data))
                    self._frames[key] = data
                    self._bytes += len(data)
                else:
                    self.budget.release_locked(len(data))
                self._cond.notify_all()
            return data
        finally:
            self.flights.done(flight, event)

    def decode_ahead(self, fd: int, identity: Identity, frame_no: int, frame: Frame,
                     reading: int) -> None:
        """Decode a cacheable frame into the cache in the background (AHEAD_FRAMES threads),
        unless it is there or being decoded already, for a reader of a frame of ``reading``
        bytes. Never waits for budget: a frame that does not fit now is decoded when read."""
        key = (identity, frame_no)
        with self._cond:
            # Only into room the cache has beside the frame being read and the others decoded
            # ahead (older frames are evicted first: least recently read).
            if (key in self._frames or ("frame", identity, frame_no) in self.flights
                    or key in self._ahead or len(self._ahead) >= AHEAD_FRAMES
                    or reading + sum(self._ahead.values()) + frame.log_size > self.limit
                    or self.budget.used_locked + frame.log_size
                    + (frame.comp_end - frame.comp_start) > self.budget.memory):
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
                self._decode(own, identity, frame_no, frame, ahead=True)
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

    def pending_ahead(self) -> int:
        """Frames queued to be decoded ahead and not decoded yet (tests)."""
        with self._cond:
            return len(self._ahead)
