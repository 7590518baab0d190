"""zstfs in one trio run, without a mount: the store, the file table, the FUSE operations and the
compactor wired as `mount.py` wires them, driven by calling the operations directly.

The only fakes are the two calls into the kernel session (the readdir reply buffer and inode
invalidation) and the compactor's clock. Everything below the operations is real: the backing
directory on disk, kernel leases, worker threads. `Gate` stops `OpenFiles.compact` or `promote`
at a named step (`leased`, `compressed`, `locked`, `promoting`), so a test can force any
interleaving of a swap with other operations, one step at a time.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from zstfs.compactor import MIN_SAVING, Compactor
from zstfs.fs import Operations
from zstfs.names import NameRules
from zstfs.openfiles import ROOT_INODE, OpenFiles, Outcome
from zstfs.stats import Stats
from zstfs.store import Store
from zstfs.swap import Adopt, Compress

CTX = pyfuse3.RequestContext()
O_APPEND_W = os.O_WRONLY | os.O_APPEND
WAIT = 30.0  # seconds a test waits for a condition before it fails (CI is a loaded machine)


def jsonl(n: int, tag: str = "x") -> bytes:
    """`n` compressible JSON lines."""
    return b"".join(
        b'{"type":"event","tag":"%s","n":%d,"text":"the same words again and again"}\n'
        % (tag.encode(), i) for i in range(n))


class Clock:
    """The compactor's clock: starts far enough ahead that every file is old enough."""

    def __init__(self, ahead: float = 10_000.0) -> None:
        self.offset = ahead

    def __call__(self) -> float:
        import time
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Fields:
    """What pyfuse3.SetattrFields carries (read-only there, so tests use this)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


class Gate:
    """Stops the first swap or promotion (of `path`, if given) that reaches step `at`."""

    def __init__(self, at: str, path: str | None = None) -> None:
        self.at = at
        self.path = path.encode() if path is not None else None
        self.reached = trio.Event()
        self.go = trio.Event()

    async def __call__(self, what: str, path: bytes) -> None:
        if what != self.at or self.reached.is_set():
            return
        if self.path is not None and path != self.path:
            return
        self.reached.set()
        await self.go.wait()


class World:
    def __init__(self, root: Path, *, pattern: str = "*.jsonl", compress_after: float = 0.0,
                 jobs: int = 1) -> None:
        self.root = root
        self.store = Store.open(str(root), NameRules(pattern))
        self.stats = Stats()
        self.clock = Clock()
        self.compress_after = compress_after
        self.files = OpenFiles(self.store, self.stats)
        self.compactor = Compactor(self.store, self.stats, compress_after=compress_after,
                                   jobs=jobs, clock=self.clock)
        self.ops = Operations(self.files, on_idle=self.compactor.notify,
                              on_moved=self.compactor.moved)
        self.ops.readdir_reply = self._reply  # type: ignore[method-assign]
        self.ops.invalidate_inode = self._invalidate  # type: ignore[method-assign]
        # Directory handles, as on a kernel without FUSE_NO_OPENDIR_SUPPORT (the harness drives
        # opendir/readdir/releasedir itself); `by_inode()` switches to the other protocol.
        self.ops.directories_by_inode = False
        # Reads and writes come here, as they do for a file opened without passthrough.
        self.ops.enable_passthrough = False
        self.compactor.attach(self.files)
        self.invalidated: list[int] = []
        self.limiter = trio.CapacityLimiter(2)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ kernel fakes
    @staticmethod
    def _reply(token: list[tuple[bytes, Any, int]], name: bytes, attrs: Any, nxt: int) -> bool:
        token.append((name, attrs, nxt))
        return True

    def _invalidate(self, ino: int, attr_only: bool = False) -> None:
        self.invalidated.append(ino)

    # ------------------------------------------------------------------ namespace
    async def lookup(self, path: str) -> int:
        ino = ROOT_INODE
        for part in path.split("/"):
            if part:
                ino = (await self.ops.lookup(ino, part.encode(), CTX)).st_ino
                if ino == 0:  # a negative entry: the kernel answers ENOENT
                    raise pyfuse3.FUSEError(errno.ENOENT)
        return ino

    async def parent_and_name(self, path: str) -> tuple[int, bytes]:
        parent, _, name = path.rpartition("/")
        return await self.lookup(parent), name.encode()

    async def stat(self, path: str) -> pyfuse3.EntryAttributes:
        return await self.ops.getattr(await self.lookup(path), CTX)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        po, no = await self.parent_and_name(old)
        pn, nn = await self.parent_and_name(new)
        await self.ops.rename(po, no, pn, nn, flags, CTX)

    async def unlink(self, path: str) -> None:
        await self.ops.unlink(*(await self.parent_and_name(path)), CTX)

    async def rmdir(self, path: str) -> None:
        await self.ops.rmdir(*(await self.parent_and_name(path)), CTX)

    async def mkdir(self, path: str) -> None:
        await self.ops.mkdir(*(await self.parent_and_name(path)), 0o755, CTX)

    async def chmod(self, path: str, mode: int) -> None:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_mode = mode
        await self.ops.setattr(await self.lookup(path), attrs, Fields(update_mode=True), None,
                               CTX)

    async def truncate(self, path: str, size: int) -> None:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_size = size
        await self.ops.setattr(await self.lookup(path), attrs, Fields(update_size=True), None,
                               CTX)

    async def listdir(self, fh: int) -> list[str]:
        token: list[tuple[bytes, Any, int]] = []
        await self.ops.readdir(fh, 0, token)  # type: ignore[arg-type]
        return sorted(os.fsdecode(n) for n, _, _ in token if n not in (b".", b".."))

    async def opendir(self, path: str) -> int:
        return await self.ops.opendir(await self.lookup(path), CTX)

    # ------------------------------------------------------------------ files
    async def open(self, path: str, flags: int = os.O_RDONLY) -> int:
        return (await self.ops.open(await self.lookup(path), flags, CTX)).fh

    async def create(self, path: str, data: bytes = b"") -> int:
        parent, name = await self.parent_and_name(path)
        info, _ = await self.ops.create(parent, name, 0o644, os.O_WRONLY | os.O_APPEND, CTX)
        if data:
            await self.ops.write(info.fh, 0, data)
        return info.fh

    async def read(self, fh: int) -> bytes:
        out, off = [], 0
        while True:
            chunk = await self.ops.read(fh, off, 1 << 17)
            if not chunk:
                return b"".join(out)
            out.append(chunk)
            off += len(chunk)

    async def append(self, fh: int, data: bytes) -> None:
        """What the kernel does for an O_APPEND write: at the end as the daemon reports it."""
        size = (await self.ops.getattr(self.ops.handles[fh].node.ino, CTX)).st_size
        assert await self.ops.write(fh, size, data) == len(data)

    async def release(self, fh: int) -> None:
        await self.ops.release(fh)

    async def content(self, path: str) -> bytes:
        fh = await self.open(path)
        try:
            return await self.read(fh)
        finally:
            await self.release(fh)

    # ------------------------------------------------------------------ compaction
    async def compact(self, path: str) -> Outcome:
        return await self.files.compact(
            path.encode(), Compress(MIN_SAVING), limiter=self.limiter,
            not_before=self.clock() - self.compress_after)

    async def adopt(self, path: str) -> Outcome:
        """Re-encode the foreign `path` (a backing `NAME.zst`) as the compactor would."""
        return await self.files.compact(
            path.encode(), Adopt(), limiter=self.limiter,
            not_before=self.clock() - self.compress_after)

    def below(self, path: str = "") -> list[str]:
        """The backing directory's names (what is really on disk), lock file left out."""
        d = self.root / path if path else self.root
        return sorted(n for n in os.listdir(d) if n != ".zstfs.lock")


def write_cold(path: Path, data: bytes, age: float = 30 * 86400) -> None:
    """A file with an old mtime, as the backing store would hold it."""
    import time
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - age
    os.utime(path, (t, t))


async def wait_for(predicate: Callable[[], object], what: str, limit: float = WAIT) -> None:
    """Wait until `predicate()` holds, polling (the conditions are set by worker threads and
    other tasks alike, with no event to await); fail the test after `limit` seconds."""
    with trio.move_on_after(limit) as scope:
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.005)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {limit}s waiting for {what}")


def errno_of(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, pyfuse3.FUSEError) else getattr(exc, "errno", errno.EIO)
