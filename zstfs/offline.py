"""Offline commands on an unmounted store: `zstfs compress`, `zstfs expand`, `zstfs verify`.

They work on the backing directory directly, with the same swap the daemon runs (`swap.py`,
under its offline guard: the same lease, verified temp and atomic rename), so a store is in the
same on-disk state whichever way it was compressed. Each takes the store's lock first: a mount
and an offline command on one store at the same time would race on the same files.

Output contract: one line on stderr per file that could not be processed (path and cause), an
optional progress bar on stderr, a one-paragraph summary on stdout; exit status 1 if any file
failed (or the store could not be opened), else 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from zstfs import codec
from zstfs.compactor import MIN_SAVING
from zstfs.names import NameRules, Patterns, zst_name
from zstfs.stats import human_bytes
from zstfs.store import Changed, Store, StoreError, StoreLocked, join, split
from zstfs.swap import Adopt, Busy, Compress, PairExists, Unadoptable, candidate, swap_now

#: Offline, a foreign .zst may need any window zstd allows (`--long=31`): memory is ours alone.
ADOPT_MAX_WINDOW = 1 << 31
#: Redraw the bar at most this often: a terminal repaints slower than files complete.
REDRAW_INTERVAL = 0.1


# ---------------------------------------------------------------------- formatting
def human_eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---------------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar on stderr (bytes, files, rate, ETA), redrawn in place with `\\r`.

    Thread-safe, because `compress` reports from several worker threads. Disabled, it draws
    nothing at all, so scripts and logs (stderr not a terminal) stay clean. Redraws are
    throttled to `REDRAW_INTERVAL`: codec callbacks can come far more often than that.
    """

    def __init__(
        self,
        label: str,
        total_files: int,
        total_bytes: int,
        *,
        enabled: bool,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.files = 0
        self.bytes = 0
        self._start = clock()
        self._drawn = float("-inf")
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        """Count `nbytes` more processed (may be called from any thread)."""
        with self._lock:
            self.bytes += nbytes
            self._maybe_draw()

    def file_done(self) -> None:
        with self._lock:
            self.files += 1
            self._maybe_draw()

    def note(self, line: str) -> None:
        """Print a message line on stderr without leaving a half-drawn bar in front of it."""
        with self._lock:
            if self.enabled:
                self.stream.write("\r\x1b[K")
            print(line, file=self.stream, flush=True)
            if self.enabled:
                self._draw()

    def close(self) -> None:
        """Draw the final state and end the line, so the summary starts on a fresh one."""
        with self._lock:
            if self.enabled:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()

    def render(self) -> str:
        elapsed = max(self.clock() - self._start, 1e-6)
        fraction = self.bytes / self.total_bytes if self.total_bytes else (
            self.files / self.total_files if self.total_files else 1.0)
        fraction = min(max(fraction, 0.0), 1.0)
        width = 16
        filled = int(fraction * width)
        rate = self.bytes / elapsed
        left = self.total_bytes - self.bytes
        eta = human_eta(left / rate) if rate > 0 and left > 0 else "--:--"
        if fraction >= 1.0:
            eta = human_eta(0)
        return (
            f"{self.label} {fraction * 100:3.0f}% [{'#' * filled}{'.' * (width - filled)}] "
            f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)} "
            f"{self.files}/{self.total_files} files {human_bytes(rate)}/s ETA {eta}"
        )

    def _maybe_draw(self) -> None:
        if self.enabled and self.clock() - self._drawn >= REDRAW_INTERVAL:
            self._draw()

    def _draw(self) -> None:
        line = self.render()
        try:
            # A line longer than the terminal wraps, and `\r` would then redraw only its tail.
            line = line[: os.get_terminal_size(self.stream.fileno()).columns - 1]
        except (OSError, ValueError, AttributeError):
            pass  # not a terminal (--progress into a pipe or a file): nothing wraps
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._drawn = self.clock()


# ---------------------------------------------------------------------- shared plumbing
@dataclass
class Tally:
    """What a run did, for the summary and the exit status."""

    done: int = 0
    skipped: int = 0
    busy: int = 0  # open in another process: left plain, not an error
    adopted: int = 0  # foreign .zst files re-encoded
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, bytes_in: int, bytes_out: int) -> None:
        with self.lock:
            self.done += 1
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextlib.contextmanager
def locked_store(source: str, pattern: Patterns, level: int = 3) -> Iterator[Store]:
    """The store opened and locked for exclusive offline use; StoreError if that is not possible.

    A store mounted over itself hides its lock file behind the mount, so the lock alone would
    fail with a confusing "permission denied": ask the mount's daemon first and report it as
    the holder.
    """
    from zstfs.control import read_status

    info = read_status(source)
    if info is not None:
        raise StoreLocked(source, int(info.get("pid") or 0) or None)
    try:
        store = Store.open(source, NameRules(pattern), codec.CodecParams(level=level))
    except OSError as e:  # e.g. ENOTCONN: a crashed mount still covers the directory
        raise StoreError(f"{source}: {e.strerror}") from None
    try:
        store.lock()
        yield store
    finally:
        store.close()


def display(source: str, path: bytes) -> str:
    """A path the user can paste: the store directory joined with the backing name."""
    return os.path.join(source, os.fsdecode(path))


def describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def recover(store: Store, out: Progress) -> None:
    """Finish what an interrupted swap or promotion left, before looking at any file."""
    r = store.recover()
    if r.temps_removed or r.leftovers_removed:
        out.note(f"zstfs: recovery removed {r.temps_removed} temp files and "
                 f"{r.leftovers_removed} superseded .zst files")


def run_guarded(body: Callable[[], int]) -> int:
    """Turn store-wide problems (locked, missing, unreadable) into one line and exit status 1."""
    try:
        return body()
    except StoreError as e:
        print(f"zstfs: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- compress
def compress(
    source: str, *, older_than: float, pattern: Patterns, level: int, jobs: int, progress: bool
) -> int:
    """Compress every eligible plain file of an unmounted store now, `jobs` at a time.

    Eligible means what the daemon's compactor means (regular file, one link, name matches,
    plain, mtime older than `older_than`); nobody can have it open through zstfs, since we
    hold the store lock. A file that compression shrinks by less than MIN_SAVING stays plain.
    """
    return run_guarded(lambda: _compress(source, older_than, pattern, level, jobs, progress))


def _compress(
    source: str, older_than: float, pattern: Patterns, level: int, jobs: int, progress: bool
) -> int:
    with locked_store(source, pattern, level) as store:
        bar = Progress("compress", 0, 0, enabled=progress)
        recover(store, bar)
        candidates = _compress_candidates(store, time.time() - older_than)
        bar.total_files = len(candidates)
        bar.total_bytes = sum(size for _, size in candidates)
        tally = Tally()
        stop = threading.Event()

        def one(path: bytes, size: int) -> None:
            if not stop.is_set():
                _compress_one(store, source, path, size, bar, tally)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs))
        try:
            # Biggest first: the long jobs start early and the small ones fill the gaps.
            order = sorted(candidates, key=lambda c: -c[1])
            futures = [pool.submit(one, path, size) for path, size in order]
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            # Ctrl-C: start nothing new; the swaps in progress finish (each is atomic).
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        bar.close()
        ratio = tally.bytes_in / tally.bytes_out if tally.bytes_out else 1.0
        _summary(
            f"compress: {tally.done} files compressed, {tally.adopted} .zst files re-encoded, "
            f"{tally.skipped} left plain "
            f"(compression saves less than {MIN_SAVING:.0%}), {tally.busy} in use by "
            f"another process left plain, {tally.failed} failed; "
            f"{human_bytes(tally.bytes_in)} -> {human_bytes(tally.bytes_out)} "
            f"(ratio {ratio:.2f}x, saved {human_bytes(tally.bytes_in - tally.bytes_out)}) "
            f"in {tally.elapsed():.1f}s."
        )
        return 1 if tally.failed else 0


def _compress_candidates(store: Store, cutoff: float) -> list[tuple[bytes, int]]:
    """(path, size) of every file the compactor would compress, with mtime at or before cutoff."""
    found = []
    for d, entries in store.walk():
        names = {name for name, _ in entries}
        for name, st in entries:
            if st.st_mtime <= cutoff and candidate(store, d, name, st, names):
                found.append((join(d, name), st.st_size))
    return found


def _compress_one(
    store: Store, source: str, path: bytes, size: int, bar: Progress, tally: Tally
) -> None:
    """Compress one file; any failure leaves it exactly as it was and is reported once."""
    seen = 0

    def advance(consumed: int) -> None:
        nonlocal seen
        bar.add(consumed - seen)
        seen = consumed

    try:
        if store.rules.is_representation(*split(path)):
            # A .zst not in zstfs's format (codex's own, the zstd CLI's): re-encoded for random
            # access and the better ratio. Offline there is memory for any window zstd allows.
            if swap_now(store, Adopt(ADOPT_MAX_WINDOW), path) is not None:
                with tally.lock:
                    tally.adopted += 1
            return
        swap = swap_now(store, Compress(MIN_SAVING), path, progress=advance)
        if swap is None:
            with tally.lock:
                tally.skipped += 1
        else:
            tally.record(swap.logical, swap.stored)
    except Busy:
        # A writer without a mount (a codex session running with the store unmounted) holds
        # it, or opened it meanwhile: compressing it would lose what it writes next.
        with tally.lock:
            tally.busy += 1
        bar.note(f"zstfs: {display(source, path)}: open in another process; left plain")
    except Unadoptable as e:
        _fail(bar, tally, source, path, f"cannot be re-encoded ({e}); left as it is")
    except PairExists:
        _fail(bar, tally, source, path,
              f"{os.fsdecode(zst_name(split(path)[1]))} already exists; left plain")
    except Changed as e:
        # Only something bypassing the lock (writing to the backing directory) gets here.
        _fail(bar, tally, source, path, f"changed while being compressed, left plain ({e})")
    except (OSError, ValueError, codec.CorruptError) as e:
        # (ValueError: the codec's limits, e.g. a frame that does not fit the seek table.)
        if isinstance(e, FileExistsError):
            why = f"{os.fsdecode(zst_name(split(path)[1]))} already exists; left plain"
        else:
            why = describe(e) + "; left plain"
        _fail(bar, tally, source, path, why)
    finally:
        bar.add(size - seen)  # the rest of the file's share of the total, done or not
        bar.file_done()


def _fail(bar: Progress, tally: Tally, source: str, path: bytes, why: str) -> None:
    with tally.lock:
        tally.failed += 1
    bar.note(f"zstfs: {display(source, path)}: {why}")


def _summary(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------- expand
def expand(source: str, *, pattern: Patterns, progress: bool) -> int:
    """Turn every `NAME.zst` of an unmounted store back into plain `NAME` (mode, owner, xattrs
    and mtime kept), so that a user can stop using zstfs at any time. A damaged `.zst` is
    reported and left as it is."""
    return run_guarded(lambda: _expand(source, pattern, progress))


def _expand(source: str, pattern: Patterns, progress: bool) -> int:
    with locked_store(source, pattern) as store:
        bar = Progress("expand", 0, 0, enabled=progress)
        recover(store, bar)
        packed = _zst_files(store)
        bar.total_files = len(packed)
        bar.total_bytes = sum(size for _, _, size in packed)
        tally = Tally()
        for path, shadowed, stored in packed:
            parent, zname = split(path)
            name = store.rules.logical(parent, zname)
            if shadowed:
                # Recovery keeps a .zst beside a plain file only when they differ.
                _fail(bar, tally, source, path,
                      f"{os.fsdecode(name)} exists too and differs; both left as they are")
            else:
                try:
                    st = store.promote(parent, name)
                    tally.record(stored, st.st_size)
                except (OSError, codec.CorruptError) as e:
                    why = describe(e)
                    if isinstance(e, codec.CorruptError):
                        why = f"damaged: {why}"
                    _fail(bar, tally, source, path, why + "; left compressed")
            bar.add(stored)
            bar.file_done()
        bar.close()
        _summary(
            f"expand: {tally.done} files expanded, {tally.failed} failed; "
            f"{human_bytes(tally.bytes_in)} -> {human_bytes(tally.bytes_out)} "
            f"in {tally.elapsed():.1f}s."
        )
        return 1 if tally.failed else 0


def _zst_files(store: Store) -> list[tuple[bytes, bool, int]]:
    """(path, shadowed by a plain file, stored size) of every regular `NAME.zst` of the store."""
    found = []
    for d, entries in store.walk():
        names = {n for n, _ in entries}
        for name, st in entries:
            if stat.S_ISREG(st.st_mode) and store.rules.is_representation(d, name):
                shadowed = store.rules.logical(d, name) in names
                found.append((join(d, name), shadowed, st.st_size))
    return found


# ---------------------------------------------------------------------- verify
def verify(source: str, *, pattern: Patterns, progress: bool) -> int:
    """Decode every `.zst` of an unmounted store and report the damaged ones; changes nothing
    (no recovery), so it is safe to run on a store one is worried about."""
    return run_guarded(lambda: _verify(source, pattern, progress))


def _verify(source: str, pattern: Patterns, progress: bool) -> int:
    with locked_store(source, pattern) as store:
        packed = _zst_files(store)
        bar = Progress("verify", len(packed), sum(s for _, _, s in packed), enabled=progress)
        tally = Tally()
        for path, _shadowed, stored in packed:
            try:
                logical = _verify_one(store, path)
                tally.record(stored, logical)
            except (OSError, codec.CorruptError) as e:
                _fail(bar, tally, source, path, f"damaged: {describe(e)}")
            bar.add(stored)
            bar.file_done()
        bar.close()
        _summary(
            f"verify: {tally.done + tally.failed} files checked, {tally.done} good, "
            f"{tally.failed} damaged; {human_bytes(tally.bytes_in)} decoded to "
            f"{human_bytes(tally.bytes_out)} in {tally.elapsed():.1f}s."
        )
        return 1 if tally.failed else 0


def _verify_one(store: Store, path: bytes) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=store.root_fd)
    try:
        return codec.verify_file(fd)
    finally:
        os.close(fd)
