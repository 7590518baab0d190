"""The compactor: compresses cold files that nobody has open, in the background.

Policy: a file is eligible when its name matches the pattern, it is a regular file with one link,
it is plain, its mtime is older than `compress_after`, and no handle is open on it.

Scheduling: one scan of the backing tree at mount; after that the filesystem tells us about every
compressible file whose last handle was released (`notify`), and we keep a heap ordered by the
time each file becomes eligible. No periodic rescans.

The swap itself (lease, compress, verify, publish) belongs to `swap.py`, run on the mount by
`openfiles.OpenFiles.compact`; this module decides *which* file and *when*, and what to do with
the answer: a file open somewhere (under the mount or before it, which sends us no release) is
retried with a backoff, a changed one by its new mtime, a failed one after an exponential
backoff. Whatever a job raises is logged and backed off: the compactor, and so the mount, never
dies of one file.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from zstfs.openfiles import OpenFiles
from zstfs.stats import Census, Stats
from zstfs.store import Store, join, split
from zstfs.swap import Adopt, Compress, Outcome, candidate

log = logging.getLogger(__name__)

#: A file is left plain if compression saves less than this fraction (retried only once changed).
MIN_SAVING = 0.05
MAX_BACKOFF = 3600.0
#: A file open outside the mount sends no release: look again after this long (doubling).
BUSY_RETRY = 30.0
MAX_BUSY_RETRY = 900.0
#: Walks of the store at start, at most, while directories are renamed through the mount.
SCAN_ATTEMPTS = 3


def _moved_along(path: bytes, moves: list[tuple[bytes, bytes]]) -> bytes:
    """Where `path` is after the renames `moves` (in the order they were made)."""
    for old, new in moves:
        if path == old or path.startswith(old + b"/"):
            path = new + path[len(old):]
    return path


@dataclass
class _File:
    """What the compactor knows of one path: its place in the queue, its failures and busy
    streak, the identity it last left alone, and, while a job works on it, where a rename
    through the mount took it."""

    due: float | None = None  # queued: eligible from then on
    failures: int = 0  # failed jobs in a row
    retry_at: float = 0.0  # a failed file waits out its backoff until then
    busy: int = 0  # times found open elsewhere in a row
    skipped: tuple[object, ...] | None = None  # identity left plain or left alone
    in_flight: bool = False
    #: Renamed (or its directory was) through the mount while in flight: where it is now. The
    #: job, which does not finish its file, requeues it there (its own path may lead nowhere).
    moved_to: bytes | None = None

    def idle(self) -> bool:
        """Nothing worth keeping."""
        return self == _File()

    def history(self) -> _File:
        """What follows the file when it is renamed (not the job working on its old path)."""
        return _File(due=self.due, failures=self.failures, retry_at=self.retry_at,
                     busy=self.busy, skipped=self.skipped)


def _under(path: bytes, old: bytes) -> bool:
    return path == old or path.startswith(old + b"/")


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
        #: Ordered by due time; an entry whose path is no longer due then is stale.
        self._heap: list[tuple[float, bytes]] = []
        self._files: dict[bytes, _File] = {}
        self._in_flight = 0
        self._wake = trio.Event()
        self._stopping = False
        self._paused = False
        self._idle = trio.Event()
        self._scanned = False
        #: Renames through the mount while a scan walks the store (None when none is running):
        #: what the scan found under an old path is queued under the new one.
        self._scan_moves: list[tuple[bytes, bytes]] | None = None
        self._census = CensusCache()
        self.files: OpenFiles | None = None

    def attach(self, files: OpenFiles) -> None:
        self.files = files

    @property
    def enabled(self) -> bool:
        return self.compress_after is not None

    # ------------------------------------------------------------------ events
    def notify(self, path: bytes) -> None:
        """A compressible plain file's last handle was released: (re)schedule it by its mtime."""
        if not self.enabled:
            return
        try:
            st = (self.store if self.files is None else self.files).lstat(path)
        except OSError:
            return
        # A reader closing a file that just failed (ENOSPC, EIO) must not cut its backoff short.
        f = self._file(path)
        due = max(st.st_mtime + (self.compress_after or 0.0), f.retry_at)
        f.busy = 0
        self._schedule(path, due)

    def left_alone(self, paths: tuple[bytes, ...]) -> None:
        """Plain files beside a differing `.zst` that recovery kept and reported: skipped (not
        reported again) until one of the pair changes."""
        assert self.files is not None
        for path in paths:
            ident = self.files.identity_of(path)
            if ident is not None:
                self._file(path).skipped = ident
                self.stats.pairs_skipped += 1

    def wake(self) -> None:
        """Look at the queue now (after the clock moved, for instance)."""
        self._wake.set()

    def moved(self, old: bytes, new: bytes) -> None:
        """A file or directory was renamed through the mount: what was queued under the old
        path is queued under the new one (a renamed cold file, such as an archived rollout,
        must not fall out of the queue)."""
        if not self.enabled:
            return
        if self._scan_moves is not None:
            self._scan_moves.append((old, new))
        zst = self._files.get(old + b".zst")
        if zst is not None and zst.due is not None:  # a renamed file whose .zst waits to be adopted
            due, zst.due = zst.due, None
            self._tidy(old + b".zst")
            self._schedule(new + b".zst", due)
        for f in self._files.values():
            if f.moved_to is not None and _under(f.moved_to, old):
                f.moved_to = new + f.moved_to[len(old):]
        for path in [p for p in self._files if _under(p, old)]:
            f = self._files.pop(path)
            to = new + path[len(old):]
            if f.in_flight:  # the job keeps its path; the rest follows the file
                if f.moved_to is None:
                    f.moved_to = to
                self._files[path] = _File(in_flight=True, moved_to=f.moved_to)
                f = f.history()
            due, f.due = f.due, None
            there = self._files.get(to)
            if there is not None and there.in_flight:  # a job on the path it replaced
                f.in_flight, f.moved_to = True, there.moved_to
            if not f.idle():
                self._files[to] = f
            elif there is not None:
                del self._files[to]
            if due is not None:
                self._schedule(to, due)

    def _file(self, path: bytes) -> _File:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = _File()
        return f

    def _tidy(self, path: bytes) -> None:
        """Drop the record of `path` if it holds nothing."""
        f = self._files.get(path)
        if f is not None and f.idle():
            del self._files[path]

    def _due_times(self) -> Iterator[float]:
        return (f.due for f in self._files.values() if f.due is not None)

    def _schedule(self, path: bytes, due: float) -> None:
        f = self._file(path)
        if f.due == due:
            return
        f.due = due
        heapq.heappush(self._heap, (due, path))
        self._wake.set()

    # ------------------------------------------------------------------ main loop
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.enabled:
            await trio.sleep_forever()
        candidates = await self._initial_scan()
        for path, mtime in candidates:
            self._schedule(path, mtime + (self.compress_after or 0.0))
        self._scanned = True
        log.info("compactor: %d candidate files after the initial scan", len(candidates))
        async with trio.open_nursery() as nursery:
            while not self._stopping:
                if not self._paused:
                    self._start_due(nursery)
                delay = self._heap[0][0] - self.clock() if self._heap else float("inf")
                if self._in_flight >= self.jobs or self._paused:
                    delay = float("inf")  # a finishing job, or resume(), wakes us
                with trio.move_on_after(max(delay, 0.01)):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _start_due(self, nursery: trio.Nursery) -> None:
        now = self.clock()
        while self._heap and self._heap[0][0] <= now and self._in_flight < self.jobs:
            due, path = heapq.heappop(self._heap)
            f = self._files.get(path)
            if f is None or f.due != due or f.in_flight:
                continue  # superseded by a later schedule, or requeued when its job ends
            f.due = None
            f.in_flight = True
            self._in_flight += 1
            nursery.start_soon(self._job, path)

    async def pause(self) -> None:
        """Start nothing new and let the swaps in progress give up (they are queued again):
        before an unmount, which may yet fail because the mount is busy."""
        self._paused = True
        await self._drain()

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def _drain(self) -> None:
        if self.files is not None:
            for ticket in list(self.files.swaps):
                ticket.abandon()
        while self._in_flight:
            self._idle = trio.Event()
            await self._idle.wait()

    async def stop(self) -> None:
        """Stop taking new files and wait for the swaps in progress, which are asked to abandon
        (a publish already under way finishes: it is short and shielded)."""
        self._stopping = True
        self._wake.set()
        await self._drain()

    async def _initial_scan(self) -> list[tuple[bytes, float]]:
        """The scan at start, which walks the store on a worker thread while the mount is
        served. A directory renamed through the mount meanwhile may have been walked under its
        old name, or missed between two names: the walk is repeated (up to SCAN_ATTEMPTS times)
        until none was renamed during it, and what the last walk found is then moved along the
        renames made during it (so nothing is queued under a path that leads nowhere, and
        nothing is dropped later as gone)."""
        for attempt in range(1, SCAN_ATTEMPTS + 1):
            self._scan_moves = []
            try:
                found = await trio.to_thread.run_sync(self._scan)
                moves = self._scan_moves
            finally:
                self._scan_moves = None
            if not moves or attempt == SCAN_ATTEMPTS:
                break
            log.debug("compactor: %d renames during the scan; scanning again", len(moves))
        return [(_moved_along(path, moves), mtime) for path, mtime in found]

    def _scan(self) -> list[tuple[bytes, float]]:
        """Every plain file to compress, and every `.zst` not in zstfs's format to adopt."""
        found = []
        for d, entries in self.store.walk():
            names = {name for name, _ in entries}
            for name, st in entries:
                if candidate(self.store, d, name, st, names):
                    found.append((join(d, name), st.st_mtime))
        return found

    # ------------------------------------------------------------------ one file
    async def _job(self, path: bytes) -> None:
        try:
            await self._compact(path)
        except Exception as e:  # one file's trouble must never end the compactor (or the mount)
            if not isinstance(e, OSError):
                log.exception("compaction of %s failed", os.fsdecode(path))
            self._failed(path, e)
        finally:
            f = self._file(path)
            f.in_flight = False
            self._in_flight -= 1
            moved_to, f.moved_to = f.moved_to, None
            if f.due is not None:  # notified again while it was being compressed
                heapq.heappush(self._heap, (f.due, path))
            self._tidy(path)
            if moved_to is not None and not self._stopping:
                # Renamed (or its directory was) while in flight: if it is still plain there,
                # it is queued under its new path (nothing happens if it was compressed).
                self.notify(moved_to)
            self._wake.set()
            if not self._in_flight:
                self._idle.set()

    async def _compact(self, path: bytes) -> None:
        assert self.files is not None
        assert self.compress_after is not None
        now = self.clock()
        skipped = self._file(path).skipped
        if skipped is not None and skipped == self.files.identity_of(path):
            return  # left plain or left alone before, and nothing changed since
        plan = (Adopt() if self.store.rules.is_representation(*split(path))
                else Compress(MIN_SAVING))
        outcome = await self.files.compact(path, plan, limiter=self.limiter,
                                           not_before=now - self.compress_after)
        if outcome is Outcome.DONE:
            self._forget(path)
        elif outcome is Outcome.WAIT:
            self.stats.swaps_abandoned += 1
            if not self._stopping:
                self.notify(path)  # by its (new) mtime; nothing if it is gone
        elif outcome is Outcome.OPEN:
            self.stats.swaps_abandoned += 1  # the release through the mount schedules it
            if self._paused and not self._stopping:
                self.notify(path)  # given up for a pause, not for an open: queued again
        elif outcome is Outcome.BUSY:
            self.stats.swaps_busy += 1
            f = self._file(path)
            f.busy += 1
            if not self._stopping:
                self._schedule(path, now + min(MAX_BUSY_RETRY, BUSY_RETRY * 2 ** (f.busy - 1)))
        elif outcome in (Outcome.SMALL, Outcome.PAIR, Outcome.UNADOPTABLE):
            ident = self.files.identity_of(path)
            if ident is not None:
                self._file(path).skipped = ident
            if outcome is Outcome.PAIR:
                self.stats.pairs_skipped += 1
                self.stats.error(os.fsdecode(path), "both plain and .zst exist and differ; "
                                 "left alone until one of them changes")
            elif outcome is Outcome.UNADOPTABLE:
                self.stats.error(os.fsdecode(path), "cannot be re-encoded (damaged, or it needs "
                                 "a wider decoding window than the daemon allows); left as is")
            else:
                log.debug("%s: left plain, compression saves too little", os.fsdecode(path))

    def _forget(self, path: bytes) -> None:
        """Compressed: its history goes (a job still working on the path keeps its record)."""
        f = self._files.get(path)
        if f is not None:
            f.failures, f.retry_at, f.busy, f.skipped = 0, 0.0, 0, None
            self._tidy(path)

    def _failed(self, path: bytes, e: BaseException) -> None:
        self.stats.swaps_failed += 1
        f = self._file(path)
        f.failures += 1
        delay = min(MAX_BACKOFF, 10.0 * 2 ** (f.failures - 1))
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            what = "no space left on device"
        self.stats.error(os.fsdecode(path), f"compression failed ({what}); retry in {delay:.0f}s")
        f.retry_at = self.clock() + delay
        if not self._stopping:
            self._schedule(path, f.retry_at)

    # ------------------------------------------------------------------ status
    async def status(self) -> dict[str, Any]:
        """The compactor's part of `zstfs status`: live counters, and the census of the store
        (a walk, cached: see `CensusCache`)."""
        census = await self._census.get(self.store.census, (self.stats.swaps_done,
                                                            self.stats.promotions))
        now = self.clock()
        next_due = min(self._due_times(), default=None)
        return {
            **census.as_dict(),
            "census_age": round(self._census.age(), 3),
            "compress_after": self.compress_after,
            "scan_done": self._scanned,
            "waiting_files": sum(1 for _ in self._due_times()),
            "eligible_now": sum(1 for d in self._due_times() if d <= now),
            "next_eligible_in": None if next_due is None else max(0.0, next_due - now),
            "in_flight": self._in_flight,
        }


class CensusCache:
    """The census of the store (a walk of the whole backing tree) for `zstfs status`, which
    polls: one walk at a time, shared by concurrent callers; retaken when it is older than
    `max_age`, or older than `min_age` and the daemon's own swaps or promotions changed the store
    since (`key`). Changes made by programs through the mount show within `max_age`."""

    def __init__(self, *, min_age: float = 0.5, max_age: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_age = min_age
        self.max_age = max_age
        self.clock = clock
        self._census: Census | None = None
        self._key: object = None
        self._taken = 0.0
        self._lock = trio.Lock()

    def age(self) -> float:
        return self.clock() - self._taken if self._census is not None else 0.0

    def _fresh(self, key: object) -> bool:
        if self._census is None:
            return False
        age = self.age()
        return age < self.min_age or (age < self.max_age and key == self._key)

    async def get(self, walk: Callable[[], Census], key: object) -> Census:
        async with self._lock:  # a caller that waited finds the walk it waited for fresh
            if not self._fresh(key):
                taken = self.clock()
                self._census = await trio.to_thread.run_sync(walk)
                self._key, self._taken = key, taken
            assert self._census is not None
            return self._census
