"""The open-file promise as a property: random sequences of FUSE operations, processes
holding files outside the mount, compactions (also paused at a step while other operations
run) and clock jumps over the in-process layer (tests/harness/inprocess.py), checked after
every step against a plain model of the directory tree.

How it runs. A World (store, file table, operations, compactor) lives in one trio run, and
hypothesis rules are synchronous: each example starts `trio.run` in a thread of its own (a
`Portal`) and every rule hands it one coroutine and waits for the answer
(`trio.from_thread.run`). Nothing moves between rules. A swap started in the background stops
at a `Gate`; only a rule moves it on: `let_go`, or an operation that has to wait for it (an open
or a truncation settles the swap, a namespace change or chmod waits for the file's lock), which
the portal sees in the statistics of the swap's event and the files' locks and answers by
opening the gate, as the swap's worker thread would have gone on by itself.

The harness plays the kernel: it looks names up one component at a time, holding (and later
forgetting) the references the kernel would hold, and makes the checks the VFS makes before a
request reaches FUSE (EEXIST on an existing name, EISDIR/ENOTDIR on a type mismatch,
EINVAL/ENOTEMPTY for a rename into itself, a rename between two links of one file is a no-op).

Invariants after every step: the backing directory holds exactly the model's names, each in the
form the model predicts (`NAME` or `NAME.zst`, never both, no temp left unless a swap is
paused); every name looks up to the model's type, size, mode and extended attributes and reads
back the model's bytes through the operations; each file keeps one inode number while the
kernel knows it, and two files never share one; a file held open outside the mount is never
swapped (its names still hold the very inode held); a swap publishes only a file that had one
name, no handle and no holder and was not changed while it ran.

ZSTFS_STATEFUL_EXAMPLES / ZSTFS_STATEFUL_STEPS / ZSTFS_STATEFUL_RANDOM=1 explore further than CI
does (CI runs a fixed, derandomized sample).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from harness.inprocess import CTX, O_APPEND_W, Fields, Gate, World, jsonl, write_cold
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pyfuse3 import FUSEError

from zstfs import leases
from zstfs.names import NameRules
from zstfs.openfiles import ROOT_INODE, Outcome

NAMES = ["a.jsonl", "b.jsonl", "c.txt", "d", "e"]
RULES = NameRules("*.jsonl")
STEP_TIMEOUT = 60.0  # a rule that takes longer is deadlocked (or blocked on our own lease)
POLL = 0.0005
MODES = [0o600, 0o640, 0o644, 0o664]
XATTRS = [b"user.a", b"user.b"]

EXAMPLES = int(os.environ.get("ZSTFS_STATEFUL_EXAMPLES", "120"))
STEPS = int(os.environ.get("ZSTFS_STATEFUL_STEPS", "50"))
RANDOM = os.environ.get("ZSTFS_STATEFUL_RANDOM") == "1"


# --------------------------------------------------------------------------- the trio thread
class Portal:
    """One trio run in a thread; `call` runs a coroutine function in it and returns its result."""

    def __init__(self) -> None:
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="trio-portal", daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def main() -> None:
            self.token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as e:
            self._error = e
            self._ready.set()

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        if self.thread.is_alive() and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self.thread.join(30)


# --------------------------------------------------------------------------- the model
class MFile:
    def __init__(self, data: bytes, mode: int) -> None:
        self.data = bytes(data)
        self.mode = mode
        self.xattrs: dict[bytes, bytes] = {}
        self.compressed = False  # the backing form the model predicts
        self.ino: int | None = None  # its number while the kernel holds a reference

    def set(self, data: bytes) -> None:
        self.data = bytes(data)

    def __repr__(self) -> str:
        return f"<file {len(self.data)}B{' zst' if self.compressed else ''}>"


class MDir:
    def __init__(self, mode: int) -> None:
        self.mode = mode
        self.xattrs: dict[bytes, bytes] = {}
        self.ino: int | None = None

    def __repr__(self) -> str:
        return "<dir>"


Obj = MFile | MDir


def pjoin(d: str, n: str) -> str:
    return f"{d}/{n}" if d else n


def parent_of(p: str) -> str:
    return p.rpartition("/")[0]


def base(p: str) -> str:
    return p.rpartition("/")[2]


def inside(a: str, b: str) -> bool:
    """b is strictly below a."""
    return (a == "" and b != "") or b.startswith(a + "/")


def depth(p: str) -> int:
    return 0 if p == "" else p.count("/") + 1


def writable(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_RDONLY


def readable(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_WRONLY


class Background:
    """A swap started in the background and paused at its gate."""

    def __init__(self, path: str, gate: Gate, mf: Obj | None) -> None:
        self.path = path
        self.gate = gate
        self.mf = mf
        self.done = trio.Event()
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.touched = False  # changed meanwhile by an operation that did not wait for it


class Holder:
    """A descriptor of a backing file held by a process outside the mount."""

    def __init__(self, fd: int, mf: MFile, append: bool) -> None:
        self.fd = fd
        self.mf = mf
        self.append = append


def dotless(token: list[tuple[bytes, Any, int]]) -> list[tuple[bytes, Any, int]]:
    """A listing without `.` and `..` (listed first, taking no lookup reference)."""
    return [t for t in token if t[0] not in (b".", b"..")]


class Mismatch(AssertionError):
    pass


lines = st.builds(jsonl, st.integers(1, 40), st.sampled_from(["w", "v"]))
payload = st.one_of(lines, st.sampled_from([b"x\n", b'{"k":1}\n']))


# --------------------------------------------------------------------------- the machine
class ZstfsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        leases.ignore_lease_signal()  # the main thread's job: the portal's thread cannot
        self.tmp = Path(tempfile.mkdtemp(prefix="zstfs-stateful-"))
        self.root = self.tmp / "store"
        self.root.mkdir()
        self.portal = Portal()
        self.world: World = self.portal.call(self._make_world)
        self.tree: dict[str, Obj] = {}
        self.rootdir = MDir(stat.S_IMODE(os.stat(self.root).st_mode))
        self.rootdir.ino = ROOT_INODE
        self.handles: dict[int, tuple[MFile, int]] = {}  # fh -> (file, open flags)
        # fh -> (dir, the names its first readdir listed; None before that readdir)
        self.dirhandles: dict[int, tuple[MDir, list[str] | None]] = {}
        self.holders: list[Holder] = []
        self.bg: Background | None = None
        self.krefs: Counter[int] = Counter({ROOT_INODE: 1})  # the kernel's lookup references
        self.kino: dict[int, Obj] = {ROOT_INODE: self.rootdir}

    async def _make_world(self) -> World:
        return World(self.root)

    def teardown(self) -> None:
        try:
            if self.bg is not None:
                bg = self.bg

                async def finish() -> None:
                    bg.gate.go.set()
                    await bg.done.wait()

                self.portal.call(finish)
            for h in self.holders:
                os.close(h.fd)
            self.portal.call(self._close_all)
        finally:
            self.portal.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _close_all(self) -> None:
        for fh in list(self.world.ops.handles):
            await self.world.ops.release(fh)
        self.world.close()

    # ------------------------------------------------------------------ model helpers
    def paths_of(self, obj: Obj) -> list[str]:
        return sorted(p for p, o in self.tree.items() if o is obj)

    def path_of_dir(self, d: MDir) -> str | None:
        if d is self.rootdir:
            return ""
        paths = self.paths_of(d)
        return paths[0] if paths else None

    def children(self, d: str) -> list[str]:
        return sorted(base(p) for p in self.tree if parent_of(p) == d)

    def obj(self, path: str) -> Obj | None:
        return self.rootdir if path == "" else self.tree.get(path)

    def dirs(self) -> list[str]:
        return ["", *sorted(p for p, o in self.tree.items() if isinstance(o, MDir))]

    def candidates(self) -> list[str]:
        out = set(self.tree)
        for d in self.dirs():
            if depth(d) < 2:
                out.update(pjoin(d, n) for n in NAMES)
        return sorted(out)

    def file_paths(self) -> list[str]:
        return sorted(p for p, o in self.tree.items() if isinstance(o, MFile))

    def draw_path(self, data: st.DataObject, existing_files: bool = False) -> str:
        files = self.file_paths()
        if existing_files and files and data.draw(st.booleans(), label="existing"):
            return data.draw(st.sampled_from(files), label="path")
        return data.draw(st.sampled_from(self.candidates()), label="path")

    def draw_swappable(self, data: st.DataObject) -> str:
        """Mostly a plain file with a compressible name (a swap has something to do)."""
        plain = sorted(p for p, o in self.tree.items() if isinstance(o, MFile)
                       and not o.compressed and RULES.compressible(b".", base(p).encode()))
        if plain and data.draw(st.integers(0, 9), label="swappable") > 0:
            return data.draw(st.sampled_from(plain), label="path")
        return self.draw_path(data, existing_files=True)

    def open_on(self, mf: Obj | None) -> bool:
        return any(f is mf for f, _ in self.handles.values()) or any(
            h.mf is mf for h in self.holders)

    def dir_empty(self, d: str) -> bool:
        return not self.children(d)

    # ------------------------------------------------------------------ running steps
    def run(self, fn: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """Run one operation in the trio thread: (its result, whether it had to let a paused
        swap go on). A swap that ended is settled in the model before the caller's update."""
        paused = self.bg is not None
        result, waited = self.portal.call(self._drive, fn)
        if paused:
            event("an operation waited for the paused swap" if waited
                  else "an operation ran beside a paused swap")
        self._settle_background()
        return result, waited

    async def _drive(self, fn: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        with trio.fail_after(STEP_TIMEOUT):
            bg = self.bg
            if bg is None:
                return await fn(), False
            box: dict[str, Any] = {}
            finished = trio.Event()

            async def runner() -> None:
                try:
                    box["value"] = await fn()
                except Exception as e:
                    box["error"] = e
                finally:
                    finished.set()

            assert self.portal.nursery is not None
            self.portal.nursery.start_soon(runner)
            waited = False
            while not finished.is_set():
                if not waited and self._waiting_for_swap():
                    waited = True
                    bg.gate.go.set()
                await trio.sleep(POLL)
            if waited:
                await bg.done.wait()
            if "error" in box:
                raise box["error"]
            return box["value"], waited

    def _waiting_for_swap(self) -> bool:
        files = self.world.files
        if any(t.done.statistics().tasks_waiting for t in files.swaps):
            return True
        return any(n._lock is not None and n._lock.statistics().tasks_waiting
                   for n in files.table)

    def _settle_background(self) -> None:
        bg = self.bg
        if bg is None or not bg.done.is_set():
            return
        self.bg = None
        self.world.files.step = None
        if bg.error is not None:
            raise Mismatch(f"compact({bg.path}) raised {bg.error!r}") from bg.error
        assert bg.outcome is not None
        event(f"background swap: {bg.outcome.value}"
              f"{' (changed meanwhile)' if bg.touched else ''}")
        self._compacted(bg.path, bg.mf, bg.outcome, touched=bg.touched)

    def _compacted(self, path: str, mf: Obj | None, outcome: Outcome, *,
                   touched: bool = False) -> None:
        """Check a swap's outcome against the model, and record a published one."""
        if outcome is not Outcome.DONE:
            return
        problems = []
        if not isinstance(mf, MFile):
            problems.append("it is not a file")
        else:
            if not RULES.compressible(b".", base(path).encode()):
                problems.append("its name is not compressible")
            paths = self.paths_of(mf)
            if len(paths) != 1:
                problems.append(f"it has {len(paths)} names")
            if self.open_on(mf):
                problems.append("it is open")
            if mf.compressed:
                problems.append("it is compressed already")
            if touched:
                problems.append("it was changed while being compressed")
        if problems:
            raise Mismatch(f"compact({path}) published, but {', '.join(problems)}")
        assert isinstance(mf, MFile)
        mf.compressed = True

    # ------------------------------------------------------------------ the kernel
    def took(self, attrs: pyfuse3.EntryAttributes, obj: Obj | None, where: str) -> None:
        """The kernel got a reference to inode attrs.st_ino, which the model calls `obj`."""
        ino = attrs.st_ino
        if obj is None:
            raise Mismatch(f"{where}: found inode {ino}, the model has nothing there")
        self.krefs[ino] += 1
        self.check_attrs(attrs, obj, where)
        other = self.kino.get(ino)
        if other is not None and other is not obj:
            raise Mismatch(f"{where}: inode {ino} is also {other!r}, still known to the kernel")
        if obj.ino is not None and obj.ino != ino and self.krefs[obj.ino] > 0:
            raise Mismatch(f"{where}: inode number changed from {obj.ino} to {ino}")
        self.kino[ino] = obj
        obj.ino = ino

    def check_attrs(self, attrs: pyfuse3.EntryAttributes, obj: Obj, where: str) -> None:
        is_dir = stat.S_ISDIR(attrs.st_mode)
        if is_dir != isinstance(obj, MDir):
            raise Mismatch(f"{where}: type {oct(attrs.st_mode)}, the model has {obj!r}")
        if stat.S_IMODE(attrs.st_mode) != obj.mode:
            raise Mismatch(f"{where}: mode {oct(stat.S_IMODE(attrs.st_mode))}, "
                           f"the model has {oct(obj.mode)}")
        if isinstance(obj, MFile) and attrs.st_size != len(obj.data):
            raise Mismatch(f"{where}: size {attrs.st_size}, the model has {len(obj.data)}")

    async def unref(self, inos: Counter[int]) -> None:
        await self.world.ops.forget([(i, n) for i, n in inos.items() if n])  # type: ignore[misc]
        for ino, n in inos.items():
            self.krefs[ino] -= n
            assert self.krefs[ino] >= 0
            if self.krefs[ino] == 0:
                del self.krefs[ino]
                obj = self.kino.pop(ino, None)
                if obj is not None and obj.ino == ino:
                    obj.ino = None

    async def walk(self, path: str, taken: Counter[int] | None = None
                   ) -> pyfuse3.EntryAttributes | None:
        """Look `path` up one component at a time (as the kernel does): its attributes, or None
        if the last component does not exist. Every reference taken is counted."""
        if path == "":
            return await self.world.ops.getattr(ROOT_INODE, CTX)  # type: ignore[arg-type]
        ino = ROOT_INODE
        parts = path.split("/")
        attrs = None
        for i, part in enumerate(parts):
            sub = "/".join(parts[: i + 1])
            try:
                attrs = await self.world.ops.lookup(ino, part.encode(), CTX)  # type: ignore
                if attrs.st_ino == 0:  # a negative entry: the kernel answers ENOENT
                    raise FUSEError(errno.ENOENT)
            except FUSEError as e:
                if e.errno == errno.ENOENT and sub not in self.tree and i == len(parts) - 1:
                    return None
                raise Mismatch(f"lookup {sub}: errno {e.errno} ({os.strerror(e.errno)}), "
                               f"the model has {self.tree.get(sub)!r}") from None
            self.took(attrs, self.tree.get(sub), f"lookup {sub}")
            if taken is not None:
                taken[attrs.st_ino] += 1
            ino = attrs.st_ino
        return attrs

    async def parent_ino(self, path: str) -> int:
        attrs = await self.walk(parent_of(path))
        assert attrs is not None
        return attrs.st_ino

    @staticmethod
    async def attempt(aw: Awaitable[Any]) -> tuple[int, Any]:
        try:
            return 0, await aw
        except FUSEError as e:
            return e.errno, None

    @staticmethod
    def expect(what: str, got: tuple[int, Any], want: int) -> None:
        if got[0] != want:
            g = os.strerror(got[0]) if got[0] else "success"
            w = os.strerror(want) if want else "success"
            raise Mismatch(f"{what}: {g}, expected {w}")

    # ------------------------------------------------------------------ setup
    @initialize(b=st.booleans(), c=st.booleans(), e=st.booleans(),
                packed=st.sets(st.sampled_from(["a.jsonl", "d/b.jsonl"])))
    def populate(self, b: bool, c: bool, e: bool, packed: set[str]) -> None:
        """A store as the daemon finds it: cold files, some already compressed."""
        files = {"a.jsonl": jsonl(300, "a"),
                 "d/b.jsonl": jsonl(120, "b") if b else None,
                 "c.txt": jsonl(20, "c") if c else None}
        for path, data in files.items():
            if data is None:
                continue
            write_cold(self.root / path, data)
            if "/" in path:
                self.tree[parent_of(path)] = MDir(
                    stat.S_IMODE(os.stat(self.root / parent_of(path)).st_mode))
            self.tree[path] = MFile(data, stat.S_IMODE(os.stat(self.root / path).st_mode))
        if e:
            (self.root / "e").mkdir()
            self.tree["e"] = MDir(stat.S_IMODE(os.stat(self.root / "e").st_mode))
        for path in sorted(packed):
            if files[path] is not None:
                outcome, _ = self.run(lambda p=path: self.world.compact(p))
                assert outcome is Outcome.DONE
                self._compacted(path, self.tree[path], outcome)

    # ------------------------------------------------------------------ namespace rules
    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        path = self.draw_path(data)

        async def go() -> None:
            attrs = await self.walk(path)
            if (attrs is None) != (path not in self.tree):
                raise Mismatch(f"lookup {path}: ENOENT but the model has {self.tree[path]!r}")

        self.run(go)

    @rule(data=st.data())
    def mkdir(self, data: st.DataObject) -> None:
        path = self.draw_path(data)
        made: list[MDir] = []

        async def go() -> None:
            parent = await self.parent_ino(path)
            if await self.walk(path) is not None:
                return  # the kernel answers EEXIST itself
            got = await self.attempt(self.world.ops.mkdir(parent, base(path).encode(), 0o755,
                                                          CTX))
            self.expect(f"mkdir {path}", got, 0)
            d = MDir(stat.S_IMODE(got[1].st_mode))
            self.took(got[1], d, f"mkdir {path}")
            made.append(d)

        self.run(go)
        if made:
            self.tree[path] = made[0]

    @rule(data=st.data(), excl=st.booleans(), trunc=st.booleans(), race=st.booleans(),
          mode=st.sampled_from([os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_WRONLY]))
    def create(self, data: st.DataObject, excl: bool, trunc: bool, race: bool, mode: int) -> None:
        """open(O_CREAT): the kernel creates a name its lookup did not find, and opens one it
        found; `race` sends CREATE for an existing compressed file (a name created between the
        kernel's lookup and its create), which the daemon must answer as open(2) would."""
        path = self.draw_path(data)
        flags = mode | os.O_CREAT | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)
        existing = self.tree.get(path)
        raced = race and isinstance(existing, MFile) and existing.compressed
        out: dict[str, Any] = {}

        async def go() -> None:
            parent = await self.parent_ino(path)
            if raced:
                got = await self.attempt(self.world.ops.create(
                    parent, base(path).encode(), 0o644, flags, CTX))  # type: ignore[arg-type]
                self.expect(f"create {path} (exists)", got, errno.EEXIST if excl else 0)
                if not excl:
                    info, attrs = got[1]
                    self.krefs[attrs.st_ino] += 1
                    out["fh"] = info.fh
                return
            attrs = await self.walk(path)
            if attrs is not None:
                if excl or isinstance(existing, MDir):
                    return  # EEXIST / EISDIR from the kernel
                got = await self.attempt(self.world.ops.open(attrs.st_ino, flags & ~os.O_CREAT
                                                             & ~os.O_EXCL, CTX))
                self.expect(f"open {path}", got, 0)
                out["fh"] = got[1].fh
                return
            got = await self.attempt(self.world.ops.create(
                parent, base(path).encode(), 0o644, flags, CTX))  # type: ignore[arg-type]
            self.expect(f"create {path}", got, 0)
            info, attrs = got[1]
            mf = MFile(b"", stat.S_IMODE(attrs.st_mode))
            self.took(attrs, mf, f"create {path}")
            out["fh"], out["new"] = info.fh, mf

        self.run(go)
        if "new" in out:
            self.tree[path] = out["new"]
        if "fh" in out:
            mf = self.tree[path]
            assert isinstance(mf, MFile)
            if trunc:
                mf.set(b"")
                mf.compressed = False
            self.handles[out["fh"]] = (mf, flags)

    @rule(data=st.data(), trunc=st.booleans(), mode=st.sampled_from(
        [os.O_RDONLY, os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_APPEND,
         os.O_RDWR, os.O_WRONLY]))
    def open(self, data: st.DataObject, trunc: bool, mode: int) -> None:
        path = self.draw_path(data, existing_files=True)
        trunc = trunc and writable(mode)
        flags = mode | (os.O_TRUNC if trunc else 0)
        out: dict[str, int] = {}

        async def go() -> None:
            attrs = await self.walk(path)
            if attrs is None or stat.S_ISDIR(attrs.st_mode):
                return  # ENOENT (checked by walk); a directory is opendir's
            got = await self.attempt(self.world.ops.open(attrs.st_ino, flags, CTX))
            self.expect(f"open {path}", got, 0)
            out["fh"] = got[1].fh

        self.run(go)
        if "fh" in out:
            mf = self.tree[path]
            assert isinstance(mf, MFile)
            if trunc:
                mf.set(b"")
                mf.compressed = False
            self.handles[out["fh"]] = (mf, flags)

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), buf=payload, where=st.sampled_from(["start", "middle", "end", "gap"]))
    def write(self, data: st.DataObject, buf: bytes, where: str) -> None:
        fh = data.draw(st.sampled_from(sorted(self.handles)), label="fh")
        mf, flags = self.handles[fh]
        if not writable(flags):
            return
        size = len(mf.data)
        # An O_APPEND write comes at the end as the kernel knows it (the model's size).
        off = size if flags & os.O_APPEND else {
            "start": 0, "middle": size // 2, "end": size, "gap": size + 5}[where]

        async def go() -> None:
            got = await self.attempt(self.world.ops.write(fh, off, buf))  # type: ignore
            self.expect(f"write fh {fh} at {off}", got, 0)
            if got[1] != len(buf):
                raise Mismatch(f"write fh {fh}: wrote {got[1]} of {len(buf)} bytes")

        self.run(go)
        old = mf.data + b"\0" * max(0, off - size)
        mf.set(old[:off] + buf + old[off + len(buf):])
        mf.compressed = False

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        fh = data.draw(st.sampled_from(sorted(self.handles)), label="fh")
        mf, flags = self.handles[fh]
        if not readable(flags):
            return

        async def go() -> None:
            ops = self.world.ops
            attrs = await self.attempt(ops.getattr(ops.handles[fh].node.ino, CTX))
            self.expect(f"getattr of fh {fh}", attrs, 0)
            got = await self.attempt(self.world.read(fh))
            self.expect(f"read fh {fh}", got, 0)
            self.check_content(f"read fh {fh}", got[1], mf, flags)
            self.check_content(f"getattr of fh {fh}", b"\0" * attrs[1].st_size, mf, flags,
                               size_only=True)

        self.run(go)

    def check_content(self, what: str, got: bytes, mf: MFile, flags: int,
                      size_only: bool = False) -> None:
        # No lag allowed: a promotion moves every handle to the plain file at once, so even a
        # reader whose file was then removed sees what POSIX says (fs._make_plain).
        if (len(got) == len(mf.data)) if size_only else got == mf.data:
            return
        raise Mismatch(f"{what}: {len(got)} bytes {got[:60]!r}..., the model has "
                       f"{len(mf.data)} bytes {mf.data[:60]!r}...")

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        fh = data.draw(st.sampled_from(sorted(self.handles)), label="fh")

        async def go() -> None:
            self.expect(f"release fh {fh}", await self.attempt(self.world.release(fh)), 0)

        self.run(go)
        del self.handles[fh]

    def new_size(self, mf: MFile, how: str) -> int:
        return {"zero": 0, "half": len(mf.data) // 2, "grow": len(mf.data) + 7}[how]

    @rule(data=st.data(), how=st.sampled_from(["zero", "half", "grow"]))
    def truncate(self, data: st.DataObject, how: str) -> None:
        path = self.draw_path(data, existing_files=True)
        mf = self.tree.get(path)
        size = self.new_size(mf, how) if isinstance(mf, MFile) else 0
        done: list[bool] = []

        async def go() -> None:
            attrs = await self.walk(path)
            if attrs is None or stat.S_ISDIR(attrs.st_mode):
                return  # ENOENT; EISDIR from the kernel
            a = pyfuse3.EntryAttributes()
            a.st_size = size
            got = await self.attempt(self.world.ops.setattr(
                attrs.st_ino, a, Fields(update_size=True), None, CTX))  # type: ignore[arg-type]
            self.expect(f"truncate {path} to {size}", got, 0)
            done.append(True)

        self.run(go)
        if done:
            assert isinstance(mf, MFile)
            mf.set(mf.data[:size] + b"\0" * (size - len(mf.data)))
            mf.compressed = False

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), how=st.sampled_from(["zero", "half", "grow"]))
    def ftruncate(self, data: st.DataObject, how: str) -> None:
        fh = data.draw(st.sampled_from(sorted(self.handles)), label="fh")
        mf, flags = self.handles[fh]
        if not writable(flags):
            return
        size = self.new_size(mf, how)

        async def go() -> None:
            a = pyfuse3.EntryAttributes()
            a.st_size = size
            ino = self.world.ops.handles[fh].node.ino
            got = await self.attempt(self.world.ops.setattr(
                ino, a, Fields(update_size=True), fh, CTX))  # type: ignore[arg-type]
            self.expect(f"ftruncate fh {fh} to {size}", got, 0)

        self.run(go)
        mf.set(mf.data[:size] + b"\0" * (size - len(mf.data)))
        mf.compressed = False

    @rule(data=st.data(), flags=st.sampled_from(
        [0, 0, pyfuse3.RENAME_NOREPLACE, pyfuse3.RENAME_EXCHANGE]))
    def rename(self, data: st.DataObject, flags: int) -> None:
        src = self.draw_path(data, existing_files=True)
        dst = data.draw(st.sampled_from(self.candidates()), label="dst")
        s, d = self.tree.get(src), self.tree.get(dst)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        called: list[bool] = []

        async def go() -> None:
            ps, pd = await self.parent_ino(src), await self.parent_ino(dst)
            if await self.walk(src) is None:
                return  # ENOENT
            dst_attrs = await self.walk(dst)
            # What the VFS answers before the request reaches FUSE.
            if exchange and dst_attrs is None:
                return  # ENOENT
            if flags & pyfuse3.RENAME_NOREPLACE and dst_attrs is not None:
                return  # EEXIST
            if inside(src, dst) or inside(dst, src):
                return  # EINVAL / ENOTEMPTY
            if s is d:
                return  # the same inode: nothing to do
            if not exchange and d is not None and isinstance(s, MDir) != isinstance(d, MDir):
                return  # ENOTDIR / EISDIR
            want = 0
            if not exchange and isinstance(d, MDir) and self.children(dst):
                want = errno.ENOTEMPTY
            got = await self.attempt(self.world.ops.rename(
                ps, base(src).encode(), pd, base(dst).encode(), flags, CTX))  # type: ignore
            self.expect(f"rename {src} -> {dst} ({flags})", got, want)
            if not want:
                called.append(True)

        self.run(go)
        if not called:
            return
        assert s is not None
        if exchange:
            assert d is not None
            moved = {}
            for p, o in self.tree.items():
                if p == src or inside(src, p):
                    moved[dst + p[len(src):]] = o
                elif p == dst or inside(dst, p):
                    moved[src + p[len(dst):]] = o
                else:
                    moved[p] = o
            self.tree = moved
            for o in (s, d):
                if isinstance(o, MFile):
                    o.compressed = False
            return
        moved = {}
        for p, o in self.tree.items():
            if p == dst or inside(dst, p):
                continue  # replaced (an empty directory, or a file)
            if p == src or inside(src, p):
                moved[dst + p[len(src):]] = o
            else:
                moved[p] = o
        self.tree = moved
        if isinstance(s, MFile) and not RULES.compressible(b".", base(dst).encode()):
            s.compressed = False

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.draw_path(data, existing_files=True)
        called: list[bool] = []

        async def go() -> None:
            parent = await self.parent_ino(path)
            attrs = await self.walk(path)
            if attrs is None or stat.S_ISDIR(attrs.st_mode):
                return  # ENOENT; EISDIR from the kernel
            got = await self.attempt(self.world.ops.unlink(parent, base(path).encode(), CTX))
            self.expect(f"unlink {path}", got, 0)
            called.append(True)

        self.run(go)
        if called:
            del self.tree[path]

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.candidates()), label="path")
        called: list[bool] = []

        async def go() -> None:
            parent = await self.parent_ino(path)
            attrs = await self.walk(path)
            if attrs is None or not stat.S_ISDIR(attrs.st_mode):
                return  # ENOENT; ENOTDIR from the kernel
            want = errno.ENOTEMPTY if self.children(path) else 0
            got = await self.attempt(self.world.ops.rmdir(parent, base(path).encode(), CTX))
            self.expect(f"rmdir {path}", got, want)
            if not want:
                called.append(True)

        self.run(go)
        if called:
            del self.tree[path]

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        src = self.draw_path(data, existing_files=True)
        dst = data.draw(st.sampled_from(self.candidates()), label="dst")
        mf = self.tree.get(src)
        called: list[bool] = []

        async def go() -> None:
            pd = await self.parent_ino(dst)
            attrs = await self.walk(src)
            if attrs is None or stat.S_ISDIR(attrs.st_mode):
                return  # ENOENT; EPERM from the kernel
            if await self.walk(dst) is not None:
                return  # EEXIST from the kernel
            got = await self.attempt(self.world.ops.link(attrs.st_ino, pd, base(dst).encode(),
                                                         CTX))  # type: ignore[arg-type]
            self.expect(f"link {src} -> {dst}", got, 0)
            assert isinstance(mf, MFile)
            mf.compressed = False  # linked in its plain form
            self.took(got[1], mf, f"link {dst}")
            called.append(True)

        self.run(go)
        if called:
            assert isinstance(mf, MFile)
            self.tree[dst] = mf

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        path = self.draw_path(data, existing_files=True)
        o = self.tree.get(path)
        if isinstance(o, MDir):
            mode |= 0o111
        called: list[bool] = []

        async def go() -> None:
            attrs = await self.walk(path)
            if attrs is None:
                return
            a = pyfuse3.EntryAttributes()
            a.st_mode = mode
            got = await self.attempt(self.world.ops.setattr(
                attrs.st_ino, a, Fields(update_mode=True), None, CTX))  # type: ignore[arg-type]
            self.expect(f"chmod {path}", got, 0)
            called.append(True)

        _, waited = self.run(go)
        if called:
            assert o is not None
            o.mode = mode
            if self.bg is not None and self.bg.mf is o and not waited:
                self.bg.touched = True

    @rule(data=st.data(), name=st.sampled_from(XATTRS), value=st.sampled_from([b"1", b"22"]))
    def setxattr(self, data: st.DataObject, name: bytes, value: bytes) -> None:
        path = "" if data.draw(st.booleans(), label="root") else self.draw_path(data, True)
        o = self.obj(path)
        called: list[bool] = []

        async def go() -> None:
            attrs = await self.walk(path)
            if attrs is None:
                return
            got = await self.attempt(self.world.ops.setxattr(attrs.st_ino, name, value, CTX))
            self.expect(f"setxattr {path or '/'}", got, 0)
            called.append(True)

        _, waited = self.run(go)
        if called:
            assert o is not None
            o.xattrs[name] = value
            if self.bg is not None and self.bg.mf is o and not waited:
                self.bg.touched = True

    # ------------------------------------------------------------------ directories
    @rule(data=st.data())
    def opendir(self, data: st.DataObject) -> None:
        path = "" if data.draw(st.booleans(), label="root") else data.draw(
            st.sampled_from(self.candidates()), label="path")
        out: dict[str, int] = {}

        async def go() -> None:
            attrs = await self.walk(path)
            if attrs is None or not stat.S_ISDIR(attrs.st_mode):
                return
            got = await self.attempt(self.world.ops.opendir(attrs.st_ino, CTX))
            self.expect(f"opendir {path or '/'}", got, 0)
            out["fh"] = got[1]

        self.run(go)
        if "fh" in out:
            d = self.obj(path)
            assert isinstance(d, MDir)
            self.dirhandles[out["fh"]] = (d, None)  # listed by its first readdir

    @precondition(lambda self: self.dirhandles)
    @rule(data=st.data())
    def readdir(self, data: st.DataObject) -> None:
        """Through a handle opened before any number of other steps (stale handles matter):
        the names its first readdir listed that still exist, each as what it is now."""
        fh = data.draw(st.sampled_from(sorted(self.dirhandles)), label="dh")
        d, names = self.dirhandles[fh]
        path = self.path_of_dir(d)
        if names is None and path is not None:
            names = self.children(path)
            self.dirhandles[fh] = (d, names)

        async def go() -> None:
            token: list[tuple[bytes, Any, int]] = []
            got = await self.attempt(self.world.ops.readdir(fh, 0, token))  # type: ignore
            token = dotless(token)
            if path is None:  # removed: the kernel answers ENOENT itself
                if got[0] not in (0, errno.ENOENT) or (got[0] == 0 and token):
                    raise Mismatch(f"readdir of a removed directory: {got[0]}, {token}")
                return
            self.expect(f"readdir {path or '/'}", got, 0)
            listed = [os.fsdecode(n) for n, _, _ in token]
            assert names is not None
            want = [n for n in names if n in self.children(path)]
            if sorted(listed) != sorted(want):
                raise Mismatch(f"readdir {path or '/'} (stale handle): {sorted(listed)}, "
                               f"the model has {sorted(want)}")
            for n, attrs, _ in token:
                child = pjoin(path, os.fsdecode(n))
                self.took(attrs, self.tree.get(child), f"readdir entry {child}")
            for n, _, _ in token:  # and each is what a lookup says it is
                await self.walk(pjoin(path, os.fsdecode(n)))

        self.run(go)

    @rule(data=st.data())
    def readdir_by_inode(self, data: st.DataObject) -> None:
        """Without a handle (`directories_by_inode`, the kernel's FUSE_NO_OPENDIR_SUPPORT): a
        listing from the start is what the directory holds now, each entry as what it is."""
        path = "" if data.draw(st.booleans(), label="root") else data.draw(
            st.sampled_from(self.candidates()), label="path")

        async def go() -> None:
            attrs = await self.walk(path)
            if attrs is None or not stat.S_ISDIR(attrs.st_mode):
                return
            token: list[tuple[bytes, Any, int]] = []
            self.world.ops.directories_by_inode = True
            try:
                got = await self.attempt(self.world.ops.readdir(attrs.st_ino, 0, token))  # type: ignore
            finally:
                self.world.ops.directories_by_inode = False
            self.expect(f"readdir by inode {path or '/'}", got, 0)
            token = dotless(token)
            listed = sorted(os.fsdecode(n) for n, _, _ in token)
            if listed != sorted(self.children(path)):
                raise Mismatch(f"readdir by inode {path or '/'}: {listed}, the model has "
                               f"{sorted(self.children(path))}")
            for n, entry_attrs, _ in token:
                child = pjoin(path, os.fsdecode(n))
                self.took(entry_attrs, self.tree.get(child), f"readdir entry {child}")
            for n, _, _ in token:
                await self.walk(pjoin(path, os.fsdecode(n)))

        self.run(go)

    @precondition(lambda self: self.dirhandles)
    @rule(data=st.data())
    def releasedir(self, data: st.DataObject) -> None:
        fh = data.draw(st.sampled_from(sorted(self.dirhandles)), label="dh")

        async def go() -> None:
            await self.world.ops.releasedir(fh)  # type: ignore[arg-type]

        self.run(go)
        del self.dirhandles[fh]

    @precondition(lambda self: len(self.krefs) > 1)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        """The kernel drops an inode it no longer caches: one with no open handle and no child
        it still knows."""
        table = self.world.ops.table
        pinned = {h.node.ino for h in self.world.ops.handles.values()}
        pinned |= {h.node.ino for h in self.world.ops.dirs.values()}
        pinned |= {p for (p, _), node in table.by_link.items() if self.krefs.get(node.ino)}
        pinned.add(ROOT_INODE)
        # Chosen by what the file is in the model, never by its (run-dependent) number.
        free = sorted((self.label(i), i) for i in self.krefs if i not in pinned)
        if not free:
            return
        _, ino = data.draw(st.sampled_from(free), label="forget")
        self.run(lambda: self.unref(Counter({ino: self.krefs[ino]})))

    def label(self, ino: int) -> str:
        obj = self.kino.get(ino)
        paths = self.paths_of(obj) if obj is not None else []
        return paths[0] if paths else f"~{obj!r}"

    # ------------------------------------------------------------------ outside the mount
    @rule(data=st.data(), append=st.booleans())
    def hold(self, data: st.DataObject, append: bool) -> None:
        """A process opens the backing file directly (a writer started before the mount)."""
        path = self.draw_path(data, existing_files=True)
        mf = self.tree.get(path)
        if not isinstance(mf, MFile) or mf.compressed:
            return
        flags = (os.O_WRONLY | os.O_APPEND if append else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(self.root / path, flags | os.O_NONBLOCK)
        except BlockingIOError:
            # Leased by a paused swap: this open breaks the lease and would block until the
            # swap lets go, which it must do without publishing.
            assert self.bg is not None
            bg = self.bg
            bg.touched = True

            async def finish() -> None:
                bg.gate.go.set()
                await bg.done.wait()

            self.portal.call(finish)
            self._settle_background()
            try:
                fd = os.open(self.root / path, flags)
            except FileNotFoundError:
                raise Mismatch(f"{path}: swapped while a process was opening it") from None
        self.holders.append(Holder(fd, mf, append))

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), buf=payload)
    def holder_write(self, data: st.DataObject, buf: bytes) -> None:
        h = data.draw(st.sampled_from(self.holders), label="holder")
        if not h.append:
            return
        assert os.write(h.fd, buf) == len(buf)
        h.mf.set(h.mf.data + buf)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def unhold(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self.holders), label="holder")
        os.close(h.fd)
        self.holders.remove(h)

    # ------------------------------------------------------------------ the compactor
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        path = self.draw_swappable(data)
        mf = self.tree.get(path)
        outcome, _ = self.run(lambda: self.world.compact(path))
        event(f"compact: {outcome.value}")
        # A cold, closed, single-name plain file is compressed (or found not worth it), with
        # nothing stale in the table (a leaked open count, a lost node) keeping it plain.
        if (isinstance(mf, MFile) and not mf.compressed and not self.open_on(mf)
                and len(self.paths_of(mf)) == 1 and RULES.compressible(b".", base(path).encode())
                and self.world.clock.offset > 1000
                and (self.bg is None or self.bg.mf is not mf)):
            assert outcome in (Outcome.DONE, Outcome.SMALL), f"compact({path}): {outcome}"
        self._compacted(path, mf, outcome)

    @precondition(lambda self: self.bg is None)
    @rule(data=st.data(), at=st.sampled_from(["leased", "compressed", "locked"]))
    def start_swap(self, data: st.DataObject, at: str) -> None:
        """Start a compaction in the background; it stops at step `at` until a rule lets it go
        (or an operation waits for it)."""
        path = self.draw_swappable(data)
        bg = Background(path, Gate(at, path), self.tree.get(path))
        self.portal.call(self._start, bg)
        self.bg = bg
        self._settle_background()  # it may have ended before its gate (GONE, OPEN, SMALL...)

    # Twice more: the interleavings of a paused swap with other operations are where the
    # bugs live, and hypothesis picks among the enabled rules uniformly.
    start_another_swap = start_swap
    start_one_more_swap = start_swap

    async def _start(self, bg: Background) -> None:
        async def job() -> None:
            try:
                bg.outcome = await self.world.compact(bg.path)
            except Exception as e:
                bg.error = e
            finally:
                bg.done.set()

        self.world.files.step = bg.gate
        assert self.portal.nursery is not None
        self.portal.nursery.start_soon(job)
        with trio.fail_after(STEP_TIMEOUT):
            while not (bg.gate.reached.is_set() or bg.done.is_set()):  # noqa: ASYNC110
                await trio.sleep(POLL)

    @precondition(lambda self: self.bg is not None)
    @rule()
    def let_go(self) -> None:
        assert self.bg is not None
        bg = self.bg

        async def go() -> None:
            bg.gate.go.set()
            with trio.fail_after(STEP_TIMEOUT):
                await bg.done.wait()

        self.portal.call(go)
        self._settle_background()

    @rule(jump=st.sampled_from([-20000.0, 20000.0]))
    def time_jump(self, jump: float) -> None:
        self.world.clock.advance(jump)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def agrees_with_the_model(self) -> None:
        self.check_backing()
        self.run(self._check_view)
        for h in self.holders:
            held = os.fstat(h.fd)
            for p in self.paths_of(h.mf):
                try:
                    st_ = os.lstat(self.root / p)
                except FileNotFoundError:
                    raise Mismatch(f"{p}: held open outside the mount, and swapped") from None
                if st_.st_ino != held.st_ino:
                    raise Mismatch(f"{p}: held open outside the mount, now another inode")

    def check_backing(self) -> None:
        """The backing directory holds exactly the model's names, each in its predicted form."""
        want: dict[str, str] = {}
        for p, o in self.tree.items():
            if isinstance(o, MDir):
                want[p] = "dir"
            else:
                want[p + ".zst" if o.compressed else p] = "file"
        have: dict[str, str] = {}
        temps: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel
            for n in dirnames:
                have[pjoin(rel, n)] = "dir"
            for n in filenames:
                if rel == "" and n == ".zstfs.lock":
                    continue
                if n.startswith(".zstfs-tmp."):
                    temps.append(pjoin(rel, n))
                    continue
                have[pjoin(rel, n)] = "file"
        if temps and (self.bg is None or len(temps) > 1):
            raise Mismatch(f"temps left below: {temps}")
        if have != want:
            extra = sorted(set(have.items()) - set(want.items()))
            missing = sorted(set(want.items()) - set(have.items()))
            raise Mismatch(f"backing directory: unexpected {extra}, missing {missing}")

    async def _check_view(self) -> None:
        ops = self.world.ops
        taken: Counter[int] = Counter()
        busy = self.bg.mf if self.bg is not None else None  # opening it would settle the swap
        try:
            for path in ["", *sorted(self.tree)]:
                o = self.obj(path)
                assert o is not None
                attrs = await self.walk(path, taken)
                if attrs is None:
                    raise Mismatch(f"lookup {path}: ENOENT, the model has {o!r}")
                if path == "":
                    self.check_attrs(attrs, o, "getattr /")
                names = [n for n in await ops.listxattr(attrs.st_ino, CTX)  # type: ignore
                         if n.startswith(b"user.")]
                if sorted(names) != sorted(o.xattrs):
                    raise Mismatch(f"listxattr {path or '/'}: {sorted(names)}, the model has "
                                   f"{sorted(o.xattrs)}")
                for n, v in o.xattrs.items():
                    got = await ops.getxattr(attrs.st_ino, n, CTX)  # type: ignore[arg-type]
                    if got != v:
                        raise Mismatch(f"getxattr {path or '/'} {n!r}: {got!r}, model {v!r}")
                if isinstance(o, MFile) and o is not busy:
                    fh = (await ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh  # type: ignore
                    try:
                        content = await self.world.read(fh)
                    finally:
                        await ops.release(fh)
                    if content != o.data:
                        raise Mismatch(f"read {path}: {len(content)} bytes {content[:60]!r}..., "
                                       f"the model has {len(o.data)} bytes {o.data[:60]!r}...")
                if isinstance(o, MDir):
                    dh = await ops.opendir(attrs.st_ino, CTX)  # type: ignore[arg-type]
                    token: list[tuple[bytes, Any, int]] = []
                    try:
                        await ops.readdir(dh, 0, token)  # type: ignore[arg-type]
                    finally:
                        await ops.releasedir(dh)
                    token = dotless(token)
                    listed = sorted(os.fsdecode(n) for n, _, _ in token)
                    if listed != self.children(path):
                        raise Mismatch(f"readdir {path or '/'}: {listed}, the model has "
                                       f"{self.children(path)}")
                    for n, a, _ in token:
                        child = pjoin(path, os.fsdecode(n))
                        self.took(a, self.tree.get(child), f"readdir entry {child}")
                        taken[a.st_ino] += 1
        finally:
            await self.unref(taken)


ZstfsMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestZstfsMachine = ZstfsMachine.TestCase


# --------------------------------------------------------------------------- found examples
@pytest.fixture
async def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "store"
    root.mkdir()
    w = World(root)
    yield w
    w.close()


# Found by the machine above, kept as plain deterministic tests.
async def test_extended_attributes_of_the_root(world: World) -> None:
    """The root's backing path was the magic link `/proc/self/fd/N` itself, and
    the l*xattr calls act on a link: set gave EPERM, list was empty, get ENODATA."""
    await world.ops.setxattr(ROOT_INODE, b"user.a", b"1", CTX)  # type: ignore[arg-type]
    assert b"user.a" in await world.ops.listxattr(ROOT_INODE, CTX)  # type: ignore[arg-type]
    assert await world.ops.getxattr(ROOT_INODE, b"user.a", CTX) == b"1"  # type: ignore
    assert os.getxattr(world.root, "user.a") == b"1"


async def test_unlinking_one_of_two_links_keeps_the_inode_number(world: World) -> None:
    """`ln c.txt a.jsonl`, the kernel forgets the file, a process opens it as a.jsonl,
    `rm a.jsonl`: c.txt is still that file and must show the same inode number (the table
    dropped the node's identity with its last *known* name, and c.txt got a fallback number:
    two nodes for one file, st_ino differing between fstat of the open descriptor and stat)."""
    write_cold(world.root / "c.txt", jsonl(20))
    ino = await world.lookup("c.txt")
    await world.ops.link(ino, ROOT_INODE, b"a.jsonl", CTX)  # type: ignore[arg-type]
    await world.ops.forget([(ino, 2)])  # type: ignore[list-item]
    held = await world.lookup("a.jsonl")
    fh = await world.open("a.jsonl", O_APPEND_W)
    await world.unlink("a.jsonl")
    assert await world.lookup("c.txt") == held
    await world.append(fh, b'{"more":1}\n')
    await world.release(fh)
    assert await world.content("c.txt") == jsonl(20) + b'{"more":1}\n'


async def test_a_writer_on_a_compressed_file_promoted_by_another_then_removed(
        world: World) -> None:
    """A handle opened for writing on a compressed file keeps the `.zst` descriptor until its
    next request. Another descriptor promotes the file (here a truncation by path; an append
    through another handle, a link, a rename to a name without a .zst form do the same), the
    file is removed, and the first writer's next write finds no name to reopen and nothing of
    the plain file open: ENOENT from write(2) on an open descriptor, and what it held is gone."""
    data = jsonl(300)
    write_cold(world.root / "a.jsonl", data)
    assert await world.compact("a.jsonl") is Outcome.DONE
    writer = await world.open("a.jsonl", os.O_RDWR)
    await world.truncate("a.jsonl", 100)  # promotes
    await world.unlink("a.jsonl")
    assert await world.ops.write(writer, 100, b"more\n") == 5
    assert await world.read(writer) == data[:100] + b"more\n"
    await world.release(writer)
    assert world.below() == []


async def test_a_new_file_under_the_name_of_a_file_renamed_during_its_swap(world: World) -> None:
    """A swap registers its node under (directory, name) so that a lookup finding the new .zst
    before the rekey gets that node. Rename the file during the swap (what `mv log log.1` or
    an archive does) and create something new under the old name: the lookup of the new file
    found the renamed file's node through that entry, so two files shared one inode number (a
    directory and a regular file here: EIO in a real kernel)."""
    write_cold(world.root / "a.jsonl", jsonl(300))
    gate = Gate("leased")
    world.files.step = gate
    async with trio.open_nursery() as n:
        n.start_soon(world.compact, "a.jsonl")
        await gate.reached.wait()
        file_ino = await world.lookup("a.jsonl")
        await world.rename("a.jsonl", "b.jsonl")
        await world.mkdir("a.jsonl")
        assert await world.lookup("b.jsonl") == file_ino
        dir_ino = await world.lookup("a.jsonl")
        assert dir_ino != file_ino
        assert stat.S_ISDIR((await world.ops.getattr(dir_ino, CTX)).st_mode)  # type: ignore
        assert stat.S_ISREG((await world.ops.getattr(file_ino, CTX)).st_mode)  # type: ignore
        gate.go.set()
    assert await world.content("b.jsonl") == jsonl(300)
    assert world.below() == ["a.jsonl", "b.jsonl"]


async def test_a_handle_lists_what_is_there_at_its_first_readdir(world: World) -> None:
    """Found when the machine's model still said "names at opendir": a handle lists at its first
    readdir (opendir does no I/O, the kernel may keep listings and never ask), so a file made
    between opendir and that readdir is listed, and one made after it is not (POSIX leaves both
    open; zstfs keeps one snapshot per handle)."""
    write_cold(world.root / "a.jsonl", jsonl(5))
    dh = await world.opendir("")
    await world.release(await world.create("b.jsonl"))
    assert await world.listdir(dh) == ["a.jsonl", "b.jsonl"]
    await world.release(await world.create("c.jsonl"))
    assert await world.listdir(dh) == ["a.jsonl", "b.jsonl"]  # the same listing, paged again
    await world.ops.releasedir(dh)  # type: ignore[arg-type]
    dh = await world.opendir("")
    assert await world.listdir(dh) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    await world.ops.releasedir(dh)  # type: ignore[arg-type]
