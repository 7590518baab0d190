"""The decoder budget: the memory everything decoding holds, under the one lock the decoding parts
(frame cache, resumable streams, decoded copies) share, and the janitor thread they share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from zstfs.codec.decode import STREAM_READ
from zstfs.codec.format import (
    IO_CHUNK,
    MAX_BLOCK_SIZE,
    ZSTD_DEFAULT_WINDOW,
    BudgetBusyError,
    DecodeLimitError,
    gib,
)

#: Everything decoding holds at once in the daemon: the decoded-frame cache, whole-frame decodes
#: in flight and streaming decoders (their windows), parked or working.  With the daemon's own
#: ~40 MB this keeps its peak RSS under 200 MB whatever the number of readers (BENCHMARKS.md).
DEFAULT_MEMORY = 120 * 2**20
#: Decoded bytes a stream keeps behind its position, so reads that arrive slightly out of order
#: (the kernel's parallel readahead) are served without restarting the frame.
STREAM_HISTORY = 4 << 20
#: Decoded bytes a sequential stream keeps ready ahead of its reader, decoded by a prefetch
#: thread on another core while the FUSE layer ships the previous ones.
STREAM_AHEAD = 4 << 20
#: Decoder context, block buffers and bookkeeping on top of the window (zstd's DCtx is ~160 KiB).
STREAM_OVERHEAD = (STREAM_READ + STREAM_HISTORY + STREAM_AHEAD + 2 * IO_CHUNK + MAX_BLOCK_SIZE
                   + (256 << 10))
#: Granularity of the budget charged by a decoder whose output size is not known in advance.
GROW_STEP = 8 << 20
#: Reservations this small never wait: the FUSE layer decodes small files on its event loop.
SMALL_RESERVATION = 4 << 20
#: A reservation that cannot be met for this long (the budget is pinned by work in progress)
#: fails rather than hanging the read.
RESERVE_TIMEOUT = 60.0


def stream_cost(window: int, size: int | None) -> int:
    """Memory of a streaming decoder: zstd allocates min(window, content size) plus a block."""
    need = window if size is None else min(window, size)
    return need + STREAM_OVERHEAD


class Budget:
    """``memory`` bytes for everything decoding holds, and the lock (``cond``) of all of it.

    A reservation that does not fit first asks the evictors (cached frames, then parked decoders,
    each least recently used first), then waits for work in progress to give room back, for at
    most ``RESERVE_TIMEOUT`` (:class:`BudgetBusyError`); one bigger than ``memory`` fails at once
    (:class:`DecodeLimitError`).
    """

    def __init__(self, memory: int = DEFAULT_MEMORY) -> None:
        self.memory = memory
        self.cond = threading.Condition(threading.Lock())
        self._used = 0  # cached frames + reservations (decodes in flight, streams)
        self.peak = 0  # highest use seen (tests, benchmarks)
        #: Each frees one thing it holds (called under ``cond``), or returns False.
        self._evictors: list[Callable[[], bool]] = []

    def add_evictor(self, evict_one_locked: Callable[[], bool]) -> None:
        self._evictors.append(evict_one_locked)

    @property
    def used(self) -> int:
        with self.cond:
            return self._used

    @property
    def used_locked(self) -> int:
        """What is in use (the caller holds ``cond``)."""
        return self._used

    def reserve(self, nbytes: int, what: str, *, never_wait: bool = False) -> None:
        """Take ``nbytes`` of the budget, evicting or waiting as needed (see the class doc)."""
        if nbytes > self.memory:
            raise DecodeLimitError(f"{what} needs {gib(nbytes)} of decoder memory, more than "
                                   f"the budget of {gib(self.memory)}")
        deadline = time.monotonic() + RESERVE_TIMEOUT
        with self.cond:
            while self._used + nbytes > self.memory:
                if any(evict() for evict in self._evictors):
                    continue
                if never_wait and nbytes <= SMALL_RESERVATION:
                    break  # never block a small decode (it may run on the event loop)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusyError(f"{what}: the decoder budget stayed busy for "
                                          f"{RESERVE_TIMEOUT:.0f} s")
                self.cond.wait(min(left, 1.0))
            self._used += nbytes
            self.peak = max(self.peak, self._used)

    def release(self, nbytes: int) -> None:
        with self.cond:
            self._used -= nbytes
            self.cond.notify_all()

    def release_locked(self, nbytes: int) -> None:
        """Give back ``nbytes`` (the caller holds ``cond`` and notifies when it is done)."""
        self._used -= nbytes

    def check_window(self, window: int, at: int, size: int | None) -> None:
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


class Janitor:
    """One thread that gives back what was left idle (parked decoders, decoded copies), while
    anything is held.  Each task runs under the budget's lock and returns None (nothing held),
    0 (it dropped something: look again now) or the seconds until it is due again."""

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._tasks: list[Callable[[float], float | None]] = []
        self._thread: threading.Thread | None = None

    def add(self, task: Callable[[float], float | None]) -> None:
        self._tasks.append(task)

    def start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="zstfs-decoder-janitor")
            self._thread.start()

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [d for task in self._tasks if (d := task(now)) is not None]
                if not due:
                    break
                if min(due) > 0:
                    self._cond.wait(min(*due, 3600.0))
            self._thread = None
