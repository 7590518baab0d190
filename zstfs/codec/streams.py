"""Resumable streams: decoders positioned inside big frames (too big to cache whole), so that
reads which continue where earlier ones ended continue decoding instead of starting over."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections import OrderedDict

from zstfs.codec.budget import (
    RESERVE_TIMEOUT,
    STREAM_AHEAD,
    STREAM_HISTORY,
    Budget,
    Janitor,
    stream_cost,
)
from zstfs.codec.decode import FrameDecoder
from zstfs.codec.format import (
    IO_CHUNK,
    BudgetBusyError,
    CorruptError,
    Identity,
)
from zstfs.codec.index import Frame

#: A parked decoder nobody used for this long gives its memory back.
IDLE_SECONDS = 30.0
#: Resumable decoder positions kept per big frame (sequential readers, a few random ones).
STREAMS_PER_FRAME = 4
#: What the prefetcher decodes ahead of a sequential reader at a time.
PREFETCH_CHUNK = 256 << 10

StreamKey = tuple[Identity, int]  # (file, frame number)


class Stream:
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
        self.doomed = False  # dropped at the next check-in (a clear while it was busy)
        self.pinned: int | None = None  # the holder's read starts here: history kept from it
        self.lock = lock
        # The decoded bytes [pos - _history, pos), as the pieces the decoder returned.
        self._pieces: collections.deque[bytes] = collections.deque()
        self._history = 0
        self.busy = True
        self.last_used = time.monotonic()
        self._fd = os.dup(fd)
        self._decoder = FrameDecoder(self._fd, frame.comp_start, frame.comp_end, frame.log_size)

    @property
    def history_start(self) -> int:
        return self.pos - self._history

    def work(self, lo: int) -> int:
        """Bytes to decode before this stream can serve offset ``lo`` (-1: it cannot)."""
        if lo < self.history_start:
            return -1
        return max(0, lo - self.pos)

    def close(self) -> None:
        self._decoder.close()  # the decoder and its window go now, even if a traceback holds us
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pull(self, n: int, keep: bool) -> list[bytes]:
        parts: list[bytes] = []
        while n > 0:
            data = self._decoder.read(min(IO_CHUNK, n))
            if not data:  # never: the decoder ends only at log_size, and reads stop there
                raise AssertionError(f"read past the end of frame at {self.frame.comp_start}")
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




class Streams:
    """Up to ``STREAMS_PER_FRAME`` resumable decoders per big frame, shared by all readers of the
    file and charged to the budget whether working or parked.  Parked ones unused for
    ``idle_seconds`` are dropped by the janitor, and by the budget (least recently used first)
    when a decode needs the room.  A prefetch thread decodes ahead of sequential readers."""

    def __init__(self, budget: Budget, janitor: Janitor,
                 idle_seconds: float = IDLE_SECONDS) -> None:
        self.budget = budget
        self.idle_seconds = idle_seconds
        self._cond = budget.cond
        self._janitor = janitor
        self._streams: dict[StreamKey, list[Stream]] = {}
        self._idle: OrderedDict[Stream, None] = OrderedDict()  # parked streams, LRU first
        self._prefetch_queue: collections.deque[Stream] = collections.deque()
        self._prefetcher: threading.Thread | None = None
        self.started = 0  # streaming decoders started at a frame start
        self.streamed_bytes = 0  # bytes decoded by streaming decoders (skipped ones included)
        budget.add_evictor(self._evict_one_locked)
        janitor.add(self._janitor_locked)

    def count(self) -> int:
        with self._cond:
            return sum(len(v) for v in self._streams.values())

    def _evict_one_locked(self) -> bool:
        if not self._idle:
            return False
        stream, _ = self._idle.popitem(last=False)
        self._drop_locked(stream)
        return True

    def _drop_locked(self, stream: Stream) -> None:
        streams = self._streams.get(stream.key)
        if streams is not None and stream in streams:
            streams.remove(stream)
            if not streams:
                del self._streams[stream.key]
        self._idle.pop(stream, None)
        stream.close()
        self.budget.release_locked(stream.cost)
        self._cond.notify_all()

    def clear_locked(self) -> None:
        """Drop every parked decoder (a busy one when its holder is done with it)."""
        self._prefetch_queue.clear()
        for streams in list(self._streams.values()):
            for stream in list(streams):
                if stream.busy:
                    stream.doomed = True  # dropped when its holder is done with it
                else:
                    self._drop_locked(stream)

    def close_inherited(self) -> None:
        """In a forked child: close the descriptors of the parent's decoders (no lock: a thread
        of the parent's may have held it)."""
        for streams in self._streams.values():
            for stream in streams:
                with contextlib.suppress(OSError):
                    stream.close()

    def _janitor_locked(self, now: float) -> float | None:
        """Drop the parked decoder unused longest once it was idle for ``idle_seconds``."""
        if not self._idle or self.idle_seconds <= 0:
            return None
        oldest = next(iter(self._idle))
        due = oldest.last_used + self.idle_seconds - now
        if due <= 0:
            self._drop_locked(oldest)
            return 0.0
        return due

    def read(self, fd: int, identity: Identity, frame_no: int, frame: Frame,
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

    def _prefetch_locked(self, stream: Stream) -> None:
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
                    self._drop_locked(stream)
                    continue
                self._idle[stream] = None
                if more:
                    self._prefetch_locked(stream)
                self._cond.notify_all()

    def _checkout(self, fd: int, key: StreamKey, frame: Frame, lo: int) -> Stream:
        deadline = time.monotonic() + RESERVE_TIMEOUT
        while True:
            with self._cond:
                streams = self._streams.get(key, [])
                best: Stream | None = None
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
                        self._drop_locked(max(parked, key=lambda s: s.pos))
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
        self.budget.reserve(cost, f"frame at offset {frame.comp_start}")
        try:
            stream = Stream(fd, key, frame, cost, self._cond)
            stream.pinned = lo
        except BaseException:
            self.budget.release(cost)
            raise
        with self._cond:
            self._streams.setdefault(key, []).append(stream)
            self.started += 1
        return stream

    def _checkin(self, stream: Stream, *, keep: bool, prefetch: bool = False) -> None:
        with self._cond:
            stream.busy = False
            stream.pinned = None
            stream.last_used = time.monotonic()
            if not keep or stream.doomed:
                self._drop_locked(stream)
                return
            self._idle[stream] = None
            if prefetch:
                self._prefetch_locked(stream)
            self._cond.notify_all()
            if self.idle_seconds > 0:
                self._janitor.start_locked()
