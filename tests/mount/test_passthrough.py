"""FUSE passthrough: the kernel reads, writes and maps files outside the patterns.

Where zstfs's pyfuse3 build, the kernel (6.9+) and CAP_SYS_ADMIN allow it, a file the compactor
never takes (a database, a config, a working tree) is opened with a backing id, and no READ or
WRITE of it reaches the daemon. Files inside the patterns stay served by the daemon: a mapping of
a passthrough file maps the backing file itself and lets go of the FUSE file, so the daemon could
not count it as open. Everything a user sees must stay the same: every byte through every path
(write, append, mmap, other processes, a killed daemon). The kernel refuses a passthrough open
beside a cached one on the same inode (the open would fail with EIO): a file renamed out of the
patterns while it is read stays served by the daemon until its readers are gone. Real mounts
driven by other processes; request counts from `ZSTFS_OPSTATS=1`; no timing asserts.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest
import trio
from harness.inprocess import CTX, World
from harness.mount import Mount, MountFactory, compress_in_place, wait_until


def kernel_at_least(major: int, minor: int) -> bool:
    got = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    return got >= (major, minor)


PASSTHROUGH_POSSIBLE = (os.geteuid() == 0
                        and "enable_passthrough" in getattr(pyfuse3, "ZSTFS_PATCHES", ())
                        and kernel_at_least(6, 9))
needs_passthrough = pytest.mark.skipif(
    not PASSTHROUGH_POSSIBLE, reason="needs root, zstfs's pyfuse3 build and Linux 6.9+")


def counting(mount_factory: MountFactory, store: Path, *args: str) -> Mount:
    return mount_factory(store, *args, start=False).start(
        env={**os.environ, "ZSTFS_OPSTATS": "1"})


def io_requests(m: Mount) -> tuple[int, int]:
    count = m.status()["requests"]["count"]
    return count.get("read", 0), count.get("write", 0)


def sh(script: str, cwd: Path) -> str:
    r = subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@needs_passthrough
def test_files_outside_the_patterns_are_read_written_and_mapped_by_the_kernel(
        store: Path, mount_factory: MountFactory) -> None:
    m = counting(mount_factory, store)
    d = m.mountpoint
    assert m.status()["passthrough"] is True
    before_io = io_requests(m)
    before_opens = m.status()["passthrough_opens"]

    # Writes, appends and reads from other processes.
    sh("printf 'one\\n' > a.db; printf 'two\\n' >> a.db; "
       "head -c 1000000 /dev/urandom > big.bin; cp big.bin copy.bin", d)
    assert sh("cat a.db", d) == "one\ntwo\n"
    assert (d / "copy.bin").read_bytes() == (d / "big.bin").read_bytes()
    assert len((d / "big.bin").read_bytes()) == 1_000_000
    # Positional writes and a shared mapping in this process; the bytes land in the backing
    # file as written, seen through a second descriptor and after the mount is gone.
    fd = os.open(d / "a.db", os.O_RDWR)
    try:
        os.pwrite(fd, b"ONE", 0)
        with mmap.mmap(fd, 0) as mapped:
            mapped[4:7] = b"TWO"
            mapped.flush()
        assert os.pread(fd, 100, 0) == b"ONE\nTWO\n"
    finally:
        os.close(fd)
    assert (d / "a.db").read_bytes() == b"ONE\nTWO\n"
    assert os.stat(d / "a.db").st_size == 8

    status = m.status()
    assert status["passthrough_opens"] >= before_opens + 8, status["passthrough_opens"]
    assert io_requests(m) == before_io, "reads or writes of passthrough files reached the daemon"

    # A file inside the patterns is the daemon's: its writes and reads come here.
    opens = m.status()["passthrough_opens"]
    sh("printf '{}\\n' > r.jsonl; cat r.jsonl > /dev/null", d)
    _, writes = io_requests(m)
    assert writes > before_io[1]
    assert m.status()["passthrough_opens"] == opens
    m.stop()
    assert (store / "a.db").read_bytes() == b"ONE\nTWO\n"
    assert (store / "copy.bin").read_bytes() == (store / "big.bin").read_bytes()


@needs_passthrough
def test_a_file_renamed_out_of_the_patterns_while_read_opens_without_error(
        store: Path, mount_factory: MountFactory) -> None:
    """A reader holds `r.jsonl` (served by the daemon); it is renamed to `r.log`, outside the
    patterns. Every later open must still work (the kernel would fail a passthrough open beside
    the cached one with EIO) and see every byte; once the reader is gone, the file goes to
    passthrough."""
    lines = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * (i % 50)) for i in range(20_000))
    (store / "r.jsonl").write_bytes(lines)
    m = mount_factory(store)
    d = m.mountpoint
    reader = open(d / "r.jsonl", "rb")  # noqa: SIM115 (held across the steps below)
    try:
        assert reader.read(10) == lines[:10]
        opens = m.status()["passthrough_opens"]
        os.rename(d / "r.jsonl", d / "r.log")
        want = lines
        for i in range(3):  # new opens beside the reader: served by the daemon, not refused
            sh(f"printf 'more {i}\\n' >> r.log", d)
            want += b"more %d\n" % i
            assert (d / "r.log").read_bytes() == want
        assert m.status()["passthrough_opens"] == opens
        reader.seek(0)
        assert reader.read() == want
    finally:
        reader.close()
    # The cached descriptors are gone once the daemon has seen their release.
    wait_until(lambda: m.status()["open_files"] == 0, 30, "the reader's release")
    sh("printf 'last\\n' >> r.log", d)
    want += b"last\n"
    assert (d / "r.log").read_bytes() == want
    assert m.status()["passthrough_opens"] >= opens + 2
    m.stop()
    assert (store / "r.log").read_bytes() == want


@needs_passthrough
def test_a_file_written_in_passthrough_is_compacted_once_closed_and_renamed_in(
        store: Path, mount_factory: MountFactory) -> None:
    """A passthrough open leaves a kernel reference on the backing file (which keeps any swap's
    lease away, as any open must); the last release gives it back: the file, renamed into the
    patterns, is compressed with every byte."""
    m = mount_factory(store, "--compress-after", "0")
    d = m.mountpoint
    body = b"".join(b'{"i": %d}\n' % i for i in range(50_000))
    before = m.status()["passthrough_opens"]
    with open(d / "w.tmp", "wb") as f:
        f.write(body)
        f.flush()
        with open(d / "w.tmp", "rb") as g:  # a second passthrough descriptor, same backing
            assert g.read() == body
    assert m.status()["passthrough_opens"] == before + 2
    os.rename(d / "w.tmp", d / "w.jsonl")
    wait_until(lambda: m.status()["swaps_done"] == 1, 60, "the renamed file's compaction")
    assert (d / "w.jsonl").read_bytes() == body
    m.stop()
    assert not (store / "w.jsonl").exists()
    assert (store / "w.jsonl.zst").exists()


@needs_passthrough
def test_a_passthrough_writer_killed_with_the_daemon_loses_nothing(
        store: Path, mount_factory: MountFactory) -> None:
    """Bytes a passthrough write returned are in the backing file: SIGKILL of the daemon while
    the writer still holds the file loses none of them, and the next mount shows them."""
    m = mount_factory(store)
    f = open(m.mountpoint / "k.log", "ab")  # noqa: SIM115
    written = b""
    for i in range(2_000):
        line = b'{"k": %d}\n' % i
        f.write(line)
        f.flush()
        written += line
    assert m.status()["passthrough_opens"] >= 1
    m.kill()
    try:
        f.close()
    except OSError:
        pass  # the connection is gone: nothing was buffered in this process
    assert (store / "k.log").read_bytes() == written
    m2 = mount_factory(store)
    assert (m2.mountpoint / "k.log").read_bytes() == written


@pytest.mark.skipif("enable_passthrough" not in getattr(pyfuse3, "ZSTFS_PATCHES", ()),
                    reason="needs zstfs's pyfuse3 build (FileInfo.backing_id)")
def test_one_backing_file_per_inode_and_never_beside_a_cached_open(tmp_path: Path) -> None:
    """The operations layer's rule, in process with a recording registry: a file outside the
    patterns shares one backing id among its handles, registered at the first open and dropped
    at the last release; a file inside the patterns (compressed or plain) is served here, and so
    is every open beside such a handle, also after a rename out of the patterns; a refused
    registration turns passthrough off without touching files already open with it."""
    registered: list[int] = []
    closed: list[int] = []
    refuse = False

    def register(fd: int) -> int:
        if refuse:
            raise PermissionError(1, "Operation not permitted")
        os.fstat(fd)  # a live descriptor
        registered.append(fd)
        return 100 + len(registered)

    def backing_id(info: pyfuse3.FileInfo) -> int:
        return info.backing_id  # type: ignore[attr-defined,no-any-return]

    async def go() -> None:
        nonlocal refuse
        w = World(tmp_path)
        try:
            w.ops.enable_passthrough = True
            w.ops.passthrough_open = register  # type: ignore[method-assign]
            w.ops.passthrough_close = closed.append  # type: ignore[method-assign]
            (w.root / "p.db").write_bytes(b"plain\n")
            (w.root / "q.db").write_bytes(b"other\n")
            (w.root / "c.jsonl").write_bytes(b"compressed\n" * 100)
            compress_in_place(w.root / "c.jsonl")
            (w.root / "r.jsonl").write_bytes(b"plain rollout\n")
            p, q = await w.lookup("p.db"), await w.lookup("q.db")
            c, r = await w.lookup("c.jsonl"), await w.lookup("r.jsonl")

            a = await w.ops.open(p, os.O_RDONLY, CTX)
            b = await w.ops.open(p, os.O_RDWR, CTX)
            assert (backing_id(a), backing_id(b)) == (101, 101)
            assert not a.keep_cache
            await w.ops.release(a.fh)
            assert closed == []
            await w.ops.release(b.fh)
            assert closed == [101]

            for ino in (c, r):  # inside the patterns: served here, compressed or not
                info = await w.ops.open(ino, os.O_RDWR, CTX)
                assert backing_id(info) == 0
                await w.ops.release(info.fh)

            held = await w.ops.open(r, os.O_RDONLY, CTX)  # served here ...
            await w.rename("r.jsonl", "r.log")  # ... and renamed out of the patterns
            beside = await w.ops.open(r, os.O_WRONLY | os.O_APPEND, CTX)
            assert backing_id(beside) == 0
            await w.ops.release(held.fh)
            await w.ops.release(beside.fh)
            again = await w.ops.open(r, os.O_RDONLY, CTX)  # nothing served here is open now
            assert backing_id(again) == 102

            refuse = True
            more = await w.ops.open(r, os.O_RDONLY, CTX)  # reuses the id: no registration
            assert backing_id(more) == 102
            other = await w.ops.open(q, os.O_RDONLY, CTX)  # a new registration is refused
            assert backing_id(other) == 0
            assert w.ops.enable_passthrough is False
            still = await w.ops.open(r, os.O_RDONLY, CTX)  # ... this inode keeps its id
            assert backing_id(still) == 102
            for info in (again, more, other, still):
                await w.ops.release(info.fh)
            assert closed == [101, 102]
            assert w.stats.passthrough_opens == 5
        finally:
            w.close()

    trio.run(go)


WORKER = r"""
import mmap, os, random, sys, time
d, wid, n, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(wid)
names = ["x.log", "x.jsonl"]  # outside / inside the patterns
bad, appended, i = [], 0, 0
while i < n or not os.path.exists(stop):
    i += 1
    if rng.random() < 0.2:
        time.sleep(0.02)  # a pause: a chance for the compactor to take x.jsonl
    op = rng.choice(["read", "append", "rename", "mmap", "rw"])
    name = os.path.join(d, rng.choice(names))
    try:
        if op == "read":
            with open(name, "rb") as f:
                f.read()
        elif op == "append":
            fd = os.open(name, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"w%d-%d\n" % (wid, i))
                appended += 1
            finally:
                os.close(fd)
        elif op == "rename":
            os.rename(name, os.path.join(d, names[name.endswith(".log")]))
        elif op == "mmap":
            fd = os.open(name, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size:
                    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
                        m[:10]
            finally:
                os.close(fd)
        else:
            with open(name, "r+b") as f:
                f.read(5)
    except FileNotFoundError:
        pass  # renamed by the other worker meanwhile
    except OSError as e:
        bad.append(f"{op} {name}: {e}")
print(appended, repr(bad))
"""


@needs_passthrough
def test_renames_in_and_out_of_the_patterns_under_load_fail_no_open_and_lose_nothing(
        store: Path, mount_factory: MountFactory) -> None:
    """Two processes read, append, map and rename one file between a name outside the patterns
    (passthrough) and one inside (served by the daemon, compressed whenever it rests), until the
    compactor (`--compress-after 0`) has swapped it three times: no open may fail (EIO would be
    the kernel refusing a passthrough open beside a cached one), and every appended line is
    there."""
    base = b"".join(b"line %d\n" % i for i in range(20_000))
    (store / "x.log").write_bytes(base)
    m = mount_factory(store, "--compress-after", "0")
    stop = store.parent / "stop"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(m.mountpoint), str(w), "400",
                               str(stop)], stdout=subprocess.PIPE, text=True) for w in (1, 2)]
    try:
        # Go on until the compactor has taken the file a few times in between.
        wait_until(lambda: m.status()["swaps_done"] >= 3, 240, "three swaps during the run")
    finally:
        stop.touch()
    appended = 0
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        count, bad = out.split(" ", 1)
        assert bad.strip() == "[]", bad
        appended += int(count)
    status = m.status()
    assert status["passthrough_opens"] > 0
    assert status["last_errors"] == []
    (name,) = [p.name for p in m.mountpoint.iterdir()]
    lines = (m.mountpoint / name).read_bytes().splitlines(keepends=True)
    assert len(lines) == 20_000 + appended
    assert b"".join(lines[:20_000]) == base
