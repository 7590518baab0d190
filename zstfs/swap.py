"""A swap: one file changes its form on disk, with nothing lost and no open file changed under
anyone.

Two *plans* say what changes. `Compress` turns plain `NAME` into `NAME.zst`. `Adopt` turns a
foreign `NAME.zst` (codex's single frames, the zstd CLI's output) into the same name in zstfs's
own seekable format. Each plan brings its lease kind, its eligibility, its encoding with
verification, and its publication.

One orchestrator, `Swapper`, runs a plan on one file under a *guard*. Its functions are the
numbered steps of docs/DESIGN.md ("Open files and swaps"), in order: `resolve`, `claim`,
`lease`, `encode`, `publish`, and `release`, whatever happened. The guard keeps the rest of the
system away from the file meanwhile. On a mount it claims the file's node in the table, gives
it a swap ticket and holds its lock to publish (`openfiles.MountGuard`). Offline it does
nothing (`Offline`): the store lock keeps any other zstfs out, and the lease every other process.

The steps that touch the disk are synchronous and run where the guard puts them: a worker
thread on a mount, the calling thread offline. Every one acts relative to the directory
descriptor resolved at step 1.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from zstfs import codec, leases, sizenote
from zstfs.names import kept_name, temp_name, zst_name
from zstfs.stats import Stats
from zstfs.store import (
    RENAME_NOREPLACE,
    Changed,
    Store,
    copy_metadata,
    decodes_to_prefix,
    join,
    open_temp,
    rename_at,
    split,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
#: After unlinking the plain name, how long a swap keeps the way back open before it trusts an
#: intact lease: an opener that resolved the name just before the unlink reaches the lease
#: check within the same system call, microseconds later unless it is descheduled in between.
LEASE_GRACE = 0.01


class Busy(Changed):
    """Some process (through the mount, under it, or from before it) has the file open or
    mapped, or opened it while the swap was in progress."""


class Abandoned(Busy):
    """The daemon asked the swap to give up (an open, removal or rename through the mount)."""


class Unadoptable(Exception):
    """A foreign `.zst` that cannot be re-encoded here (damaged, or a window too wide)."""


class PairExists(Exception):
    """`NAME.zst` already exists beside the plain `NAME` being swapped."""


class Outcome(enum.Enum):
    DONE = "done"
    GONE = "gone"  # no longer there, or no longer an eligible plain file
    WAIT = "wait"  # not old enough (yet), or changed since: schedule by its mtime
    OPEN = "open"  # open through the mount (or opened, moved, removed through it meanwhile)
    BUSY = "busy"  # open or mapped outside the mount, or opened there during the swap
    SMALL = "small"  # compression saves too little
    PAIR = "pair"  # a different NAME.zst beside it: reported, left alone
    UNADOPTABLE = "unadoptable"  # a foreign .zst that cannot be re-encoded (damaged, wide window)


def outcome_of(e: Exception) -> Outcome:
    """What a swap that stopped with `e` comes to (subclasses before their bases)."""
    if isinstance(e, Unadoptable):
        return Outcome.UNADOPTABLE
    if isinstance(e, PairExists):
        return Outcome.PAIR
    if isinstance(e, Abandoned):
        return Outcome.OPEN
    if isinstance(e, Busy):
        return Outcome.BUSY
    return Outcome.WAIT  # Changed: decided again by its (new) mtime


def unchanged(st: os.stat_result) -> tuple[codec.Identity, int, int]:
    """What must not change between deciding on a swap and publishing it: the same file in
    the same state (its identity), the same metadata (ctime covers mode, owner, xattrs and
    times) and still one name."""
    return (codec.identity_of(st), st.st_ctime_ns, st.st_nlink)


# ---------------------------------------------------------------------- one swap in progress
@dataclass(slots=True)
class Swap:
    """One swap in progress: the source file (leased), its directory, the temp beside it."""

    path: bytes  # relative to the store root when the swap was decided (for messages)
    dir_fd: int  # the directory the file was in then, wherever it is now
    name: bytes
    src_fd: int
    source: os.stat_result  # the source file when the lease was taken
    abandoned: Callable[[], bool]  # the guard's: has the swap been asked to give up?
    leased: bool = True  # False: the /proc scan stands in for a lease
    lease: int = leases.WRITE  # a read lease for a `.zst` being re-encoded (readers may stay)
    temp: bytes = b""
    logical: int = 0
    stored: int = 0

    def check(self) -> None:
        """Raise Changed (Busy) unless the swap may go on: nobody asked to abandon it, our lease
        is intact (nobody started opening the file) and the file still has its name."""
        if self.abandoned():
            raise Abandoned(f"{self.path!r} was opened, removed or renamed through the mount")
        if self.leased and not leases.intact(self.src_fd, self.lease):
            raise Busy(f"{self.path!r} was opened by another process")
        if os.fstat(self.src_fd).st_nlink == 0:
            raise Changed(f"{self.path!r} was removed")

    def still_there(self) -> os.stat_result:
        """The swap may go on (`check`) and its name still holds the very file that was read:
        same device, inode, size, mtime, ctime, one link. Returns the file's stat."""
        self.check()
        try:
            current = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise Changed(f"{self.path!r} was removed or renamed") from None
        now = os.fstat(self.src_fd)
        if not (unchanged(current) == unchanged(now) == unchanged(self.source)):
            raise Changed(f"{self.path!r} changed since it was read")
        return now

    def end(self) -> None:
        """Remove what is left of the swap (its temp), give up the lease, close descriptors."""
        if self.temp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp, dir_fd=self.dir_fd)
            self.temp = b""
        if self.leased:
            leases.release(self.src_fd)
        for fd in (self.src_fd, self.dir_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.src_fd = self.dir_fd = -1


@contextlib.contextmanager
def _temp(swap: Swap, progress: Callable[[int], None] | None
          ) -> Iterator[tuple[int, Callable[[int], None]]]:
    """The swap's temp file beside the source (removed by `Swap.end`), and the progress
    callback that checks, between frames, that the swap may go on."""

    def step(done: int) -> None:
        swap.check()
        if progress is not None:
            progress(done)

    swap.temp, tmp = open_temp(swap.dir_fd, swap.name)
    try:
        yield tmp, step
    finally:
        os.close(tmp)


def _seal(store: Store, swap: Swap, tmp: int, logical: int, stored: int) -> None:
    """The verified temp gets the source's metadata (all of it, or an error) and a note of its
    logical size (`sizenote`), and is made durable."""
    swap.check()
    copy_metadata(swap.src_fd, tmp, swap.source)
    sizenote.write(tmp, os.fstat(tmp), logical)
    os.fsync(tmp)
    store.remember_size(os.fstat(tmp), logical)
    swap.logical, swap.stored = logical, stored


def _exists_at(dir_fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------- plans
class Plan(Protocol):
    """What a swap changes: the lease it holds, which files it takes, how it encodes and
    verifies into the temp, and how it puts the temp in place."""

    #: The lease held on the source from step 3 on (`leases.WRITE` or `leases.READ`).
    lease: int
    #: What was done to a file, for the log.
    done: str

    def eligible(self, store: Store, parent: bytes, name: bytes, st: os.stat_result) -> bool:
        """May this backing entry (`name` in directory `parent`) be swapped by this plan?"""
        ...

    def encode(self, store: Store, swap: Swap, progress: Callable[[int], None] | None) -> bool:
        """Write the new form into a verified temp beside the source, with its metadata.
        False: nothing to do."""
        ...

    def worth(self, swap: Swap) -> bool:
        """Is the encoded temp worth publishing?"""
        ...

    def publish(self, store: Store, swap: Swap) -> os.stat_result:
        """Put the temp in place of the source; returns the new file's stat."""
        ...

    def record(self, stats: Stats, swap: Swap) -> None:
        """Count a published swap in the mount's statistics."""
        ...


@dataclass(frozen=True)
class Compress:
    """Plain `NAME` → `NAME.zst`, under a write lease: nobody may have the plain file open."""

    #: The file stays plain if compression saves less than this fraction.
    min_saving: float = 0.0
    lease = leases.WRITE
    done = "compressed"

    @staticmethod
    def eligible(store: Store, parent: bytes, name: bytes, st: os.stat_result) -> bool:
        """A plain regular file with one link (a swap would split a hard link), which matches
        the patterns and whose name can still carry the `.zst` suffix. Age and open handles
        are the caller's."""
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_nlink == 1
            and len(name) + len(b".zst") <= 255
            and store.rules.compressible(parent, name)
            and not store.rules.is_representation(parent, name)
        )

    def encode(self, store: Store, swap: Swap, progress: Callable[[int], None] | None) -> bool:
        """Compress the leased file into a verified temp `.zst` beside it, with its metadata
        (the slow part of a swap). Nothing visible changes."""
        with _temp(swap, progress) as (tmp, step):
            logical, stored = codec.compress_file(swap.src_fd, tmp, store.params, progress=step)
            swap.check()
            if logical != swap.source.st_size:
                raise Changed(f"{swap.path!r} changed size while being compressed")
            codec.verify_equal(tmp, swap.src_fd, progress=lambda _n: swap.check())
            _seal(store, swap, tmp, logical, stored)
        return True

    def worth(self, swap: Swap) -> bool:
        return swap.stored <= swap.logical * (1 - self.min_saving)

    def publish(self, store: Store, swap: Swap) -> os.stat_result:
        """Install the verified `.zst` in place of the plain file. A `NAME.zst` already there
        is replaced only if it holds nothing the plain file lacks (an earlier swap's,
        interrupted after its rename); else PairExists."""
        try:
            return _install(swap)
        except PairExists:
            if not _leftover_superseded(store, swap):
                raise
        return _install(swap, replace=True)

    def record(self, stats: Stats, swap: Swap) -> None:
        stats.swaps_done += 1
        stats.bytes_compressed += swap.logical


@dataclass(frozen=True)
class Adopt:
    """A foreign `NAME.zst` → the same name in zstfs's format, under a read lease: nobody may
    have it open for writing; readers (the daemon's own handles too) keep the old inode, which
    decodes to the same bytes."""

    #: The widest decoding window the source may need (Unadoptable beyond it).
    max_window: int = codec.ZSTD_DEFAULT_WINDOW
    lease = leases.READ
    done = "re-encoded"

    @staticmethod
    def eligible(store: Store, parent: bytes, name: bytes, st: os.stat_result) -> bool:
        """A regular `NAME.zst` with one link that represents a compressible name (in zstfs's
        format or not: `encode` finds out)."""
        return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                and store.rules.is_representation(parent, name))

    def encode(self, store: Store, swap: Swap, progress: Callable[[int], None] | None) -> bool:
        """Re-encode the leased foreign `.zst` into a verified temp in zstfs's format, with its
        metadata. False (nothing done) if it is in our format already; Unadoptable if it is
        damaged or needs a window wider than `max_window`. (No progress is reported: the
        encoder counts decoded bytes, the caller's total is the stored size.)"""
        if codec.is_native(swap.src_fd, store.params):
            return False
        with _temp(swap, None) as (tmp, step):
            try:
                logical, stored = codec.reencode(swap.src_fd, tmp, store.params, progress=step,
                                                 max_window=self.max_window)
                swap.check()
                codec.verify_reencoded(tmp, swap.src_fd, max_window=self.max_window)
            except codec.CorruptError as e:
                raise Unadoptable(str(e)) from None
            _seal(store, swap, tmp, logical, stored)
        return True

    def worth(self, swap: Swap) -> bool:
        return True

    def publish(self, store: Store, swap: Swap) -> os.stat_result:
        """Replace the foreign `.zst` with its re-encoded temp, if the name still holds the
        file that was read and no plain file has appeared beside it. An opener that was
        waiting on the lease gets the old file, whose content is the same."""
        swap.still_there()
        if _exists_at(swap.dir_fd, swap.name[: -len(b".zst")]):
            raise PairExists(f"{swap.path!r}: a plain file appeared beside it")
        rename_at(swap.dir_fd, swap.temp, swap.dir_fd, swap.name)
        swap.temp = b""
        os.fsync(swap.dir_fd)
        return os.stat(swap.name, dir_fd=swap.dir_fd, follow_symlinks=False)

    def record(self, stats: Stats, swap: Swap) -> None:
        stats.adopted += 1


def candidate(store: Store, parent: bytes, name: bytes, st: os.stat_result,
              names: set[bytes]) -> bool:
    """Is this backing entry (`name` in `parent`, among the directory's `names`) one to swap
    (the compactor's scan, `zstfs compress`)? A plain file to compress, or a `.zst` not in
    zstfs's format with no plain file beside it, to adopt."""
    return Compress.eligible(store, parent, name, st) or (
        Adopt.eligible(store, parent, name, st) and name[:-4] not in names
        and _foreign(store, join(parent, name)))


def _foreign(store: Store, path: bytes) -> bool:
    """True if the `.zst` at `path` is not in zstfs's own format (reads headers only)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=store.root_fd)
    except OSError:
        return False
    try:
        return not codec.is_native(fd, store.params)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- publishing a .zst
def _install(swap: Swap, *, replace: bool = False) -> os.stat_result:
    """Install the verified `.zst` and remove the plain file, acting only on the file that
    was compressed: the name must still hold it (device, inode, size, mtime, ctime, one
    link) and the lease must still be intact. Returns the `.zst`'s stat.

    The plain inode keeps a hidden second name until, after the unlink, the lease is known
    unbroken: an opener that resolved the plain name just before the unlink blocks on the
    lease, and then gets the plain file back under its name (the swap is undone) instead
    of an unlinked inode that nobody would ever read again. With `replace`, an existing
    `NAME.zst` (a leftover the caller checked holds nothing the plain file lacks) is
    replaced; else it raises PairExists.
    """
    now = swap.still_there()
    if not swap.leased and leases.open_elsewhere(now, frozenset({swap.src_fd})):
        raise Busy(f"{swap.path!r} was opened by another process")
    zname = zst_name(swap.name)
    if not replace and _exists_at(swap.dir_fd, zname):
        raise PairExists(f"{swap.path!r}: a .zst of it already exists")
    spare = temp_name(swap.name)
    os.link(swap.name, spare, src_dir_fd=swap.dir_fd, dst_dir_fd=swap.dir_fd,
            follow_symlinks=False)
    done = False
    try:
        try:
            rename_at(swap.dir_fd, swap.temp, swap.dir_fd, zname,
                      0 if replace else RENAME_NOREPLACE)
        except FileExistsError:
            raise PairExists(f"{swap.path!r}: a .zst of it already exists") from None
        swap.temp = b""
        zst_st = os.stat(zname, dir_fd=swap.dir_fd, follow_symlinks=False)
        os.fsync(swap.dir_fd)  # the .zst is durable before the plain file goes
        os.unlink(swap.name, dir_fd=swap.dir_fd)
        if swap.leased:
            time.sleep(LEASE_GRACE)
        if (swap.leased and not leases.intact(swap.src_fd)) or (
                not swap.leased and leases.open_elsewhere(now, frozenset({swap.src_fd}))):
            _undo_install(swap, spare, zname)
            raise Busy(f"{swap.path!r} was opened while its swap was published")
        done = True
    finally:
        _drop_spare(swap, spare, done)
    if swap.leased and not leases.intact(swap.src_fd, swap.lease):
        # An opener resolved the name before the unlink yet reached the lease only after
        # the grace: it will get the unlinked inode. Nothing to restore it with; say so.
        log.error("%s: a process opened it in the last instant of its swap; what it "
                  "writes through that descriptor is not in the store",
                  os.fsdecode(swap.path))
    return zst_st


def _drop_spare(swap: Swap, spare: bytes, done: bool) -> None:
    """Remove the hidden second link, unless it became the plain file's only name in a swap
    that did not finish (an error while undoing it): then it is set aside where recovery
    keeps it."""
    try:
        kst = os.stat(spare, dir_fd=swap.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # renamed back to its name by the undo
    if done or kst.st_nlink > 1:
        os.unlink(spare, dir_fd=swap.dir_fd)
        return
    kept = kept_name(swap.name)
    rename_at(swap.dir_fd, spare, swap.dir_fd, kept, RENAME_NOREPLACE)
    log.error("%s: its swap failed half way; the plain file is kept as %s",
              os.fsdecode(swap.path), os.fsdecode(kept))


def _undo_install(swap: Swap, spare: bytes, zname: bytes) -> None:
    """Someone is opening the plain inode we just unlinked: give it its name back (plain
    wins, and it holds the same bytes as the `.zst`, which goes)."""
    try:
        rename_at(swap.dir_fd, spare, swap.dir_fd, swap.name, RENAME_NOREPLACE)
    except FileExistsError:
        # A new file took the name in between: set the old one aside where recovery keeps it.
        kept = kept_name(swap.name)
        rename_at(swap.dir_fd, spare, swap.dir_fd, kept, RENAME_NOREPLACE)
        log.error("%s: opened during its swap while a new file took its name; the old "
                  "file is kept as %s", os.fsdecode(swap.path), os.fsdecode(kept))
        return
    os.fsync(swap.dir_fd)
    os.unlink(zname, dir_fd=swap.dir_fd)


def _leftover_superseded(store: Store, swap: Swap) -> bool:
    """True if the `NAME.zst` beside the file being swapped holds nothing the plain file
    lacks (it decodes to a prefix of it: an earlier swap's, interrupted after its rename)."""
    try:
        zfd = os.open(zst_name(swap.name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                      dir_fd=swap.dir_fd)
    except OSError:
        return False
    try:
        return decodes_to_prefix(zfd, swap.src_fd, store.decoders)
    finally:
        os.close(zfd)


# ---------------------------------------------------------------------- guards
class Guard(Protocol):
    """What keeps the rest of the system away from a file while a plan runs on it."""

    #: The file as `claim` found it: the lease must find that very file (None: not checked).
    expect: os.stat_result | None

    def open_dir(self, parent: bytes) -> int | None:
        """A descriptor of directory `parent` that the swap owns; None if it is gone."""
        ...

    def claim(self, plan: Plan, path: bytes, dir_fd: int) -> Outcome | None:
        """Hold the file for the swap; None to go on, else why not."""
        ...

    def abandoned(self) -> bool:
        """Has the swap been asked to give up?"""
        ...

    async def work(self, fn: Callable[[], T]) -> T:
        """Run a bulk step (lease, encode)."""
        ...

    async def call(self, fn: Callable[[], T]) -> T:
        """Run a short blocking step (publish, inside `publishing`)."""
        ...

    async def step(self, what: str, path: bytes) -> None:
        """The swap reached step `what` (a seam for tests that force interleavings)."""
        ...

    def publishing(self, path: bytes) -> AbstractAsyncContextManager[bool]:
        """The critical section around publication; yields whether it may go on."""
        ...

    def published(self, plan: Plan, swap: Swap, st: os.stat_result) -> None:
        """The file's new form `st` is in place (still inside `publishing`)."""
        ...

    def release(self) -> None:
        """Let go of the file (after the swap's own resources are released)."""
        ...


class Offline:
    """The guard of an unmounted store: nothing to do. The store lock keeps any other zstfs
    out, and the lease (or the /proc scan) every other process. Every step runs at once, on
    the calling thread."""

    expect: os.stat_result | None = None

    def __init__(self, store: Store) -> None:
        self.store = store

    def open_dir(self, parent: bytes) -> int | None:
        return self.store.open_dir(parent)

    def claim(self, plan: Plan, path: bytes, dir_fd: int) -> Outcome | None:
        return None

    def abandoned(self) -> bool:
        return False

    async def work(self, fn: Callable[[], T]) -> T:
        return fn()

    async def call(self, fn: Callable[[], T]) -> T:
        return fn()

    async def step(self, what: str, path: bytes) -> None:
        pass

    @contextlib.asynccontextmanager
    async def publishing(self, path: bytes) -> AsyncIterator[bool]:
        yield True

    def published(self, plan: Plan, swap: Swap, st: os.stat_result) -> None:
        pass

    def release(self) -> None:
        pass


# ---------------------------------------------------------------------- the orchestrator
class Swapper:
    """One plan run on one file under one guard: the numbered steps of docs/DESIGN.md, in
    order (`run`). Raises Changed (Busy, Abandoned), PairExists or Unadoptable when the swap
    stops on the file's account (`outcome_of` says what that comes to), OSError and the
    codec's errors when it fails; the file is then as it was."""

    def __init__(self, store: Store, plan: Plan, path: bytes, guard: Guard, *,
                 progress: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.plan = plan
        self.path = path
        self.parent, self.name = split(path)
        self.guard = guard
        self.progress = progress
        self.swap: Swap | None = None

    async def run(self) -> Outcome:
        dir_fd = self.resolve()
        if dir_fd is None:
            return Outcome.GONE  # gone, or a symlink now: never followed
        try:
            stop = self.claim(dir_fd)
            if stop is not None:
                return stop
            held, dir_fd = dir_fd, -1  # the swap owns it from here
            self.swap = await self.guard.work(functools.partial(self.lease, held))
            await self.guard.step("leased", self.path)
            if not await self.guard.work(self.encode):
                return Outcome.GONE  # in zstfs's format already
            await self.guard.step("compressed", self.path)
            if not self.plan.worth(self.swap):
                return Outcome.SMALL
            return await self.publish(self.swap)
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
            self.release()

    def resolve(self) -> int | None:
        """1. The file's directory, resolved once, beneath the store root with no symlink at
        any component: every later step is relative to it."""
        return self.guard.open_dir(self.parent)

    def claim(self, dir_fd: int) -> Outcome | None:
        """2. The guard holds the file for the swap (on a mount: its node and swap ticket)."""
        return self.guard.claim(self.plan, self.path, dir_fd)

    def lease(self, dir_fd: int) -> Swap:
        """3. Open the file the name holds in the directory `dir_fd` and take the plan's lease
        on it. Raises Busy if any process has it open or mapped (for a read lease: open for
        writing), Changed if it is not an eligible file (or not the one the guard claimed).
        The Swap owns `dir_fd` from here on; `release` ends it."""
        path, name = self.path, self.name
        try:
            src = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                          dir_fd=dir_fd)
        except BlockingIOError:
            os.close(dir_fd)
            raise Busy(f"{path!r} is leased by another process") from None
        except FileNotFoundError:
            os.close(dir_fd)
            raise Changed(f"{path!r} was removed or renamed") from None
        except BaseException:
            os.close(dir_fd)
            raise
        swap = Swap(path, dir_fd, name, src, os.fstat(src), self.guard.abandoned,
                    lease=self.plan.lease)
        try:
            if not self.plan.eligible(self.store, self.parent, name, swap.source):
                raise Changed(f"{path!r} is not an eligible file")
            expect = self.guard.expect
            if expect is not None and unchanged(expect) != unchanged(swap.source):
                raise Changed(f"{path!r} changed since it was chosen")
            try:
                if not leases.take(src, swap.lease):
                    raise Busy(f"{path!r} is open in another process")
            except leases.Unsupported as e:
                self.store.accounting.fell_back(os.fsdecode(path), str(e))
                swap.leased = False
                if leases.open_elsewhere(swap.source, frozenset({src})):
                    raise Busy(f"{path!r} is open in another process") from None
            swap.check()
        except BaseException:
            swap.end()
            raise
        return swap

    def encode(self) -> bool:
        """4. Encode and verify into a temp beside the file, checking between frames that the
        lease is intact and the file still has its name; copy its metadata. Nothing visible
        changes. False: nothing to do."""
        assert self.swap is not None
        return self.plan.encode(self.store, self.swap, self.progress)

    async def publish(self, swap: Swap) -> Outcome:
        """5. Inside the guard's critical section, put the temp in place of the file, if the
        name still holds the very file that was encoded."""
        async with self.guard.publishing(self.path) as clear:
            if not clear:
                return Outcome.OPEN
            st = await self.guard.call(functools.partial(self.plan.publish, self.store, swap))
            self.guard.published(self.plan, swap, st)
            log.debug("%s %s: %d -> %d bytes", self.plan.done, os.fsdecode(swap.path),
                      swap.logical, swap.stored)
            return Outcome.DONE

    def release(self) -> None:
        """6. Whatever happened: remove the temp, give up the lease, close the descriptors,
        then let the guard let go of the file."""
        if self.swap is not None:
            self.swap.end()
        self.guard.release()


def swap_now(store: Store, plan: Plan, path: bytes, *,
             progress: Callable[[int], None] | None = None) -> Swap | None:
    """Run `plan` on `path` at once on an unmounted store (`Offline`): the finished Swap, or
    None if nothing changed (compression saved too little; the `.zst` is in zstfs's format
    already)."""
    swapper = Swapper(store, plan, path, Offline(store), progress=progress)
    outcome = _run_at_once(swapper.run())
    return swapper.swap if outcome is Outcome.DONE else None


def _run_at_once(coro: Coroutine[Any, Any, T]) -> T:
    """Run to its end, on this thread, a coroutine that never waits (a swap under the
    `Offline` guard, whose every step returns at once): no event loop needed."""
    try:
        coro.send(None)
    except StopIteration as end:
        return end.value
    coro.close()
    raise RuntimeError("a swap under the offline guard waited for something")
