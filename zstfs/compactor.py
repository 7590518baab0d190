"""The compactor: compresses cold files that nobody has open, in the background.

Policy: a file is eligible when its name matches the pattern, it is a regular file with one link,
it is plain, its mtime is older than `compress_after`, and no handle is open on it.

Scheduling: one scan of the backing tree at mount; after that the filesystem tells us about every
compressible file whose last handle was released (`notify`), and we keep a heap ordered by the
time each file becomes eligible. No periodic rescans.

The swap: compress and verify into a temp beside the file in a worker thread (the filesystem keeps
serving, and may even open the file meanwhile); then, holding the file's lock so no open can
start, check that nothing opened or changed it, rename the temp to `NAME.zst`, fsync the
directory, unlink the plain file. That last part is shielded from cancellation.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from zstfs import codec
from zstfs.files import key_of
from zstfs.stats import Stats
from zstfs.store import Changed, Prepared, Store, split

if TYPE_CHECKING:
    from zstfs.fs import Operations

log = logging.getLogger(__name__)

#: A file is left plain if compression saves less than this fraction (retried only once changed).
MIN_SAVING = 0.05
MAX_BACKOFF = 3600.0


class Compactor:
    def __init__(
        self,
        store: Store,
        stats: Stats,
        *,
        compress_after: float | None,
        jobs: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.stats = stats
        self.compress_after = compress_after
        self.jobs = max(1, jobs)
        self.clock = clock
        self.limiter = trio.CapacityLimiter(self.jobs)
        self._heap: list[tuple[float, bytes]] = []
        self._due: dict[bytes, float] = {}
        self._failures: dict[bytes, int] = {}
        self._retry_at: dict[bytes, float] = {}  # a failed file waits out its backoff
        self._incompressible: set[tuple[bytes, int, int, int]] = set()
        self._in_flight: set[bytes] = set()
        self._wake = trio.Event()
        self._stopping = False
        self._idle = trio.Event()
        self._scanned = False
        self.ops: Operations | None = None

    def attach(self, ops: Operations) -> None:
        self.ops = ops

    @property
    def enabled(self) -> bool:
        return self.compress_after is not None

    # ------------------------------------------------------------------ events
    def notify(self, path: bytes) -> None:
        """A compressible plain file's last handle was released: (re)schedule it by its mtime."""
        if not self.enabled:
            return
        try:
            st = self.store.lstat(path)
        except OSError:
            return
        # A reader closing a file that just failed (ENOSPC, EIO) must not cut its backoff short.
        due = max(st.st_mtime + (self.compress_after or 0.0), self._retry_at.get(path, 0.0))
        self._schedule(path, due)

    def _schedule(self, path: bytes, due: float) -> None:
        if self._due.get(path) == due:
            return
        self._due[path] = due
        heapq.heappush(self._heap, (due, path))
        self._wake.set()

    # ------------------------------------------------------------------ main loop
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.enabled:
            await trio.sleep_forever()
        candidates = await trio.to_thread.run_sync(self._scan)
        for path, mtime in candidates:
            self._schedule(path, mtime + (self.compress_after or 0.0))
        self._scanned = True
        log.info("compactor: %d candidate files after the initial scan", len(candidates))
        async with trio.open_nursery() as nursery:
            while not self._stopping:
                self._start_due(nursery)
                delay = self._heap[0][0] - self.clock() if self._heap else float("inf")
                if len(self._in_flight) >= self.jobs:
                    delay = float("inf")  # a finishing job wakes us
                with trio.move_on_after(max(delay, 0.01)):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _start_due(self, nursery: trio.Nursery) -> None:
        now = self.clock()
        while self._heap and self._heap[0][0] <= now and len(self._in_flight) < self.jobs:
            due, path = heapq.heappop(self._heap)
            if self._due.get(path) != due or path in self._in_flight:
                continue  # superseded by a later schedule, or requeued when its job ends
            del self._due[path]
            self._in_flight.add(path)
            nursery.start_soon(self._job, path)

    async def stop(self) -> None:
        """Stop taking new files and wait for the swaps in progress (they finish or abandon)."""
        self._stopping = True
        self._wake.set()
        while self._in_flight:
            self._idle = trio.Event()
            await self._idle.wait()

    def _scan(self) -> list[tuple[bytes, float]]:
        found = []
        for d, entries in self.store.walk():
            for name, st in entries:
                if self.store.eligible(d, name, st):
                    found.append((d + b"/" + name if d != b"." else name, st.st_mtime))
        return found

    # ------------------------------------------------------------------ one file
    async def _job(self, path: bytes) -> None:
        try:
            await self._compact(path)
        finally:
            self._in_flight.discard(path)
            if path in self._due:  # notified again while it was being compressed
                heapq.heappush(self._heap, (self._due[path], path))
            self._wake.set()
            if not self._in_flight:
                self._idle.set()

    async def _compact(self, path: bytes) -> None:
        assert self.ops is not None
        assert self.compress_after is not None
        table = self.ops.table
        try:
            st = self.store.lstat(path)
        except FileNotFoundError:
            return
        if not self.store.eligible(*split(path), st):
            return
        due = st.st_mtime + self.compress_after
        if due > self.clock():
            self._schedule(path, due)
            return
        if (path, st.st_ino, st.st_size, st.st_mtime_ns) in self._incompressible:
            return
        existing = table.by_key.get(key_of(st))
        if existing is not None and existing.opens > 0:
            return  # its release will schedule it again
        node = table.claim(st)
        try:
            writes = node.writes
            try:
                prepared = await trio.to_thread.run_sync(
                    self.store.prepare_compressed, path, limiter=self.limiter
                )
            except Changed as e:
                self._abandoned(path, str(e))
                return
            if prepared.stored > prepared.logical * (1 - MIN_SAVING):
                self.store.discard(prepared)
                self._incompressible.add((path, st.st_ino, st.st_size, st.st_mtime_ns))
                log.debug("%s: left plain, compression saves too little", os.fsdecode(path))
                return
            async with node.lock:
                with trio.CancelScope(shield=True):
                    await self._publish(prepared, node, writes)
        except (OSError, codec.CorruptError) as e:
            self._failed(path, e)
        finally:
            table.unclaim(node)

    async def _publish(self, prepared: Prepared, node: Any, writes: int) -> None:
        """The critical section: runs with the node's lock held (no open can start)."""
        assert self.ops is not None
        path = prepared.path
        if node.opens > 0 or node.writes != writes:
            self.store.discard(prepared)
            self._abandoned(path, "opened or written during compression")
            return
        try:
            zst_st = self.store.install(prepared)
        except Changed as e:
            self._abandoned(path, str(e))
            return
        await trio.to_thread.run_sync(self.store.fsync_dir, split(path)[0])
        # No await between removing the plain file and rekeying the node: a lookup in between
        # would otherwise see the .zst as a new file.
        self.store.finish(prepared)
        self.ops.table.rekey(node, zst_st, True)
        self.ops.invalidate_attrs(node)
        self._failures.pop(path, None)
        self._retry_at.pop(path, None)
        self.stats.swaps_done += 1
        self.stats.bytes_compressed += prepared.logical
        log.debug("compressed %s: %d -> %d bytes", os.fsdecode(path), prepared.logical,
                  prepared.stored)

    def _abandoned(self, path: bytes, why: str) -> None:
        self.stats.swaps_abandoned += 1
        log.debug("swap of %s abandoned: %s", os.fsdecode(path), why)
        if not self._stopping:
            self.notify(path)  # reschedules by the new mtime (no-op if the file is gone)

    def _failed(self, path: bytes, e: BaseException) -> None:
        self.stats.swaps_failed += 1
        n = self._failures.get(path, 0) + 1
        self._failures[path] = n
        delay = min(MAX_BACKOFF, 10.0 * 2 ** (n - 1))
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            what = "no space left on device"
        self.stats.error(os.fsdecode(path), f"compression failed ({what}); retry in {delay:.0f}s")
        self._retry_at[path] = self.clock() + delay
        if not self._stopping:
            self._schedule(path, self._retry_at[path])

    # ------------------------------------------------------------------ status
    async def status(self) -> dict[str, Any]:
        census = await trio.to_thread.run_sync(self.store.census)
        now = self.clock()
        next_due = min(self._due.values(), default=None)
        return {
            **census.as_dict(),
            "compress_after": self.compress_after,
            "scan_done": self._scanned,
            "waiting_files": len(self._due),
            "eligible_now": sum(1 for d in self._due.values() if d <= now),
            "next_eligible_in": None if next_due is None else max(0.0, next_due - now),
            "in_flight": len(self._in_flight),
        }
