"""The open-file promise, deterministically: every interleaving of a swap with other
operations, one step at a time, in one trio run (tests/harness/inprocess.py), against the real
backing directory.

One test per numbered scenario (the real-mount versions of 1, 2, 3, 5 and 13 are in
tests/mount/test_open_files_and_swaps.py). Each checks every byte and what is left on disk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from harness.inprocess import CTX, O_APPEND_W, Gate, World, jsonl, wait_for, write_cold
from pyfuse3 import FUSEError

from zstfs import leases
from zstfs.openfiles import ROOT_INODE, Outcome
from zstfs.store import RENAME_EXCHANGE
from zstfs.swap import Compress


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    root = tmp_path / "store"
    root.mkdir()
    w = World(root)
    yield w
    w.close()


def temps(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob(".zstfs-*")]


async def compact_in_background(w: World, path: str, nursery: trio.Nursery) -> dict[str, Outcome]:
    result: dict[str, Outcome] = {}

    async def run() -> None:
        result["outcome"] = await w.compact(path)

    nursery.start_soon(run)
    return result


# --------------------------------------------------------------------------- 1 and 2
def hold_open(path: Path, mode: str = "append") -> subprocess.Popen[str]:
    """Another process holding `path` open (or only mapped), until its stdin closes."""
    code = {
        "append": "f = open(p, 'ab')",
        "read": "f = open(p, 'rb')",
        "mmap": "import mmap; g = open(p, 'rb'); f = mmap.mmap(g.fileno(), 0, "
                "prot=mmap.PROT_READ); g.close()",
    }[mode]
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys\np = sys.argv[1]\n{code}\nprint('ready', "
         "flush=True)\nsys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.parametrize("mode", ["append", "read", "mmap"])
async def test_1_a_descriptor_from_outside_the_mount_stops_the_swap(world: World,
                                                                    mode: str) -> None:
    data = jsonl(2000)
    write_cold(world.root / "held.jsonl", data)
    holder = hold_open(world.root / "held.jsonl", mode)
    try:
        assert await world.compact("held.jsonl") is Outcome.BUSY
        assert world.below() == ["held.jsonl"]
    finally:
        holder.communicate("")
    assert await world.compact("held.jsonl") is Outcome.DONE
    assert world.below() == ["held.jsonl.zst"]
    assert await world.content("held.jsonl") == data


async def test_1_an_open_from_outside_during_compression_abandons_it(world: World) -> None:
    data = jsonl(3000)
    write_cold(world.root / "r.jsonl", data)
    gate = Gate("compressed")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "r.jsonl", n)
        await gate.reached.wait()
        # An opener that does not wait: it still breaks the lease (a blocking one would wait
        # for the swap to give up, which is what the real-mount test shows).
        with pytest.raises(BlockingIOError):
            os.open(world.root / "r.jsonl", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        gate.go.set()
    assert result["outcome"] is Outcome.BUSY
    assert world.below() == ["r.jsonl"]
    assert (world.root / "r.jsonl").read_bytes() == data


async def test_1_an_opener_blocked_on_the_lease_at_the_unlink_gets_the_file_back(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step: an opener that resolved the plain name just before the unlink and then
    blocked on the lease. The swap is undone, and what it writes lands in the named file."""
    data = jsonl(3000)
    write_cold(world.root / "r.jsonl", data)
    opener: list[subprocess.Popen[str]] = []
    real_unlink = os.unlink

    def unlink(path: object, *args: object, **kwargs: object) -> None:
        if path == b"r.jsonl" and not opener:
            # Start a writer now and wait until it is blocked on our lease.
            opener.append(subprocess.Popen(
                [sys.executable, "-c", "import sys\nf = open(sys.argv[1], 'ab')\n"
                 "f.write(b'{\"late\":1}\\n')\nf.close()", str(world.root / "r.jsonl")]))
            fd = world_swap_fd()
            import time
            deadline = time.monotonic() + 30
            while leases.intact(fd):
                assert time.monotonic() < deadline, "the opener never reached the lease"
                time.sleep(0.001)
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    def world_swap_fd() -> int:
        # The descriptor the swap leased: the only one of ours open on r.jsonl.
        ino = os.stat(world.root / "r.jsonl").st_ino
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{name}").st_ino == ino:
                    return int(name)
            except OSError:
                continue
        raise AssertionError("no leased descriptor")

    monkeypatch.setattr(os, "unlink", unlink)
    outcome = await world.compact("r.jsonl")
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert opener
    assert opener[0].wait(30) == 0
    assert outcome is Outcome.BUSY
    assert world.below() == ["r.jsonl"]
    assert (world.root / "r.jsonl").read_bytes() == data + b'{"late":1}\n'
    assert temps(world.root) == []


async def test_1_without_leases_the_proc_scan_sees_other_processes(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lease(fd: int, kind: int = leases.WRITE) -> bool:
        raise leases.Unsupported("Invalid argument")

    monkeypatch.setattr(leases, "take", no_lease)
    data = jsonl(2000)
    write_cold(world.root / "a.jsonl", data)
    holder = hold_open(world.root / "a.jsonl", "mmap")
    try:
        assert await world.compact("a.jsonl") is Outcome.BUSY
    finally:
        holder.communicate("")
    assert world.store.accounting.mode == leases.PROC_SCAN
    assert await world.compact("a.jsonl") is Outcome.DONE
    assert await world.content("a.jsonl") == data


def test_2_offline_swap_refuses_a_file_held_by_a_writer(tmp_path: Path) -> None:
    from zstfs.names import NameRules
    from zstfs.store import Store
    from zstfs.swap import Busy, swap_now

    data = jsonl(2000)
    write_cold(tmp_path / "w.jsonl", data)
    holder = hold_open(tmp_path / "w.jsonl", "append")
    store = Store.open(str(tmp_path), NameRules("*.jsonl"))
    try:
        with pytest.raises(Busy):
            swap_now(store, Compress(), b"w.jsonl")
        assert sorted(os.listdir(tmp_path)) == ["w.jsonl"]
    finally:
        holder.communicate("")
        store.close()


# --------------------------------------------------------------------------- 3
async def test_3_a_stale_directory_handle_never_rekeys_a_live_file(world: World) -> None:
    data = jsonl(2000)
    write_cold(world.root / "d" / "x.jsonl", data)
    write_cold(world.root / "d" / "y.jsonl", jsonl(10, "y"))
    dh = await world.opendir("d")
    assert await world.listdir(dh) == ["x.jsonl", "y.jsonl"]
    assert await world.compact("d/x.jsonl") is Outcome.DONE
    fh = await world.open("d/x.jsonl", O_APPEND_W)
    await world.append(fh, b'{"one":1}\n')
    assert await world.listdir(dh) == ["x.jsonl", "y.jsonl"]  # the handle from before the swap
    await world.append(fh, b'{"two":2}\n')
    await world.release(fh)
    await world.ops.releasedir(dh)
    assert await world.content("d/x.jsonl") == data + b'{"one":1}\n{"two":2}\n'
    assert world.below("d") == ["x.jsonl", "y.jsonl"]
    assert temps(world.root) == []


# --------------------------------------------------------------------------- 4
async def test_4_a_rename_onto_the_path_during_the_thread_hop_is_not_swapped(
        world: World) -> None:
    cold, hot = jsonl(2000, "cold"), jsonl(2000, "hot")
    write_cold(world.root / "x.jsonl", cold)
    write_cold(world.root / "y.jsonl", hot)
    fh = await world.open("y.jsonl", O_APPEND_W)
    gate = Gate("compressed")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "x.jsonl", n)
        await gate.reached.wait()
        await world.rename("y.jsonl", "x.jsonl")  # the open file takes the path
        gate.go.set()
    assert result["outcome"] is not Outcome.DONE
    await world.append(fh, b'{"after":1}\n')
    await world.release(fh)
    assert world.below() == ["x.jsonl"]
    assert await world.content("x.jsonl") == hot + b'{"after":1}\n'
    assert temps(world.root) == []


# --------------------------------------------------------------------------- 5
def exchange(root: Path, a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, str(root / a).encode(), -100, str(root / b).encode(),
                      RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


async def test_5_directories_exchanged_during_a_swap_publish_in_the_right_place(
        world: World) -> None:
    a, b = jsonl(2000, "a"), jsonl(2000, "b")
    write_cold(world.root / "d1" / "s.jsonl", a)
    write_cold(world.root / "d2" / "s.jsonl", b)
    gate = Gate("compressed")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "d1/s.jsonl", n)
        await gate.reached.wait()
        await world.rename("d1", "d2", RENAME_EXCHANGE)
        gate.go.set()
    # The swap acted on the file it compressed, in the directory it resolved (now d2).
    assert result["outcome"] is Outcome.DONE
    assert world.below("d2") == ["s.jsonl.zst"]
    assert world.below("d1") == ["s.jsonl"]
    assert await world.content("d2/s.jsonl") == a
    assert await world.content("d1/s.jsonl") == b
    assert temps(world.root) == []


async def test_5_a_directory_replaced_by_a_symlink_is_never_followed(world: World,
                                                                      tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    secret = jsonl(2000, "secret")
    write_cold(outside / "s.jsonl", secret)
    os.chmod(outside / "s.jsonl", 0o600)
    before = os.stat(outside / "s.jsonl")
    write_cold(world.root / "sessions" / "2025" / "s.jsonl", jsonl(2000))
    gate = Gate("leased")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "sessions/2025/s.jsonl", n)
        await gate.reached.wait()
        gate.go.set()
    assert result["outcome"] is Outcome.DONE
    # Now the directory goes and a link to the outside takes its place.
    await world.rename("sessions/2025", "sessions/moved")
    os.symlink(outside, world.root / "sessions" / "2025")
    assert await world.compact("sessions/2025/s.jsonl") is Outcome.GONE
    # And a link left in an intermediate component (a year moved to another disk).
    os.rename(world.root / "sessions", world.root / "old")
    os.symlink(outside.parent, world.root / "sessions")
    assert await world.compact("sessions/outside/s.jsonl") is Outcome.GONE
    assert sorted(os.listdir(outside)) == ["s.jsonl"]
    after = os.stat(outside / "s.jsonl")
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino, before.st_mtime_ns, before.st_ctime_ns)
    assert (outside / "s.jsonl").read_bytes() == secret


async def test_5_directory_flips_during_compaction_lose_nothing(world: World) -> None:
    contents = {}
    for d in ("p", "q"):
        for i in range(6):
            contents[f"{d}/f{i}.jsonl"] = jsonl(300 + i, f"{d}{i}")
            write_cold(world.root / d / f"f{i}.jsonl", contents[f"{d}/f{i}.jsonl"])
    flips = 0
    async with trio.open_nursery() as n:
        outcomes: list[Outcome] = []

        async def compact_all() -> None:
            for path in contents:
                outcomes.append(await world.compact(path))

        n.start_soon(compact_all)
        while len(outcomes) < len(contents):
            await world.rename("p", "q", RENAME_EXCHANGE)
            flips += 1
            await trio.lowlevel.checkpoint()
    # Each flip exchanged the directories: after an odd number, p holds q's files.
    for path, data in contents.items():
        d, name = path.split("/")
        now = d if flips % 2 == 0 else {"p": "q", "q": "p"}[d]
        assert await world.content(f"{now}/{name}") == data
    for d in ("p", "q"):
        names = world.below(d)
        assert len(names) == 6, names  # one form per file: no plain + .zst pairs
    assert temps(world.root) == []


# --------------------------------------------------------------------------- 6
async def test_6_a_chmod_during_compression_is_not_reverted(world: World) -> None:
    data = jsonl(2000)
    write_cold(world.root / "m.jsonl", data)
    os.chmod(world.root / "m.jsonl", 0o644)
    gate = Gate("compressed")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "m.jsonl", n)
        await gate.reached.wait()
        await world.chmod("m.jsonl", 0o600)
        gate.go.set()
    assert result["outcome"] is Outcome.WAIT  # the metadata changed: decided again later
    assert (await world.stat("m.jsonl")).st_mode & 0o777 == 0o600
    assert await world.compact("m.jsonl") is Outcome.DONE
    assert os.stat(world.root / "m.jsonl.zst").st_mode & 0o777 == 0o600


async def test_6_a_chmod_or_setxattr_during_the_publish_lands_on_the_result(
        world: World) -> None:
    data = jsonl(2000)
    write_cold(world.root / "m.jsonl", data)
    gate = Gate("locked")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "m.jsonl", n)
        await gate.reached.wait()

        async def change() -> None:
            await world.chmod("m.jsonl", 0o640)
            await world.ops.setxattr(await world.lookup("m.jsonl"), b"user.k", b"v", None)

        n.start_soon(change)
        await trio.testing.wait_all_tasks_blocked()
        gate.go.set()
    assert result["outcome"] is Outcome.DONE
    assert os.stat(world.root / "m.jsonl.zst").st_mode & 0o777 == 0o640
    assert os.getxattr(world.root / "m.jsonl.zst", "user.k") == b"v"


# --------------------------------------------------------------------------- 7
@pytest.mark.expect_log_errors(r"compaction of bad\.jsonl failed",
                               r"bad\.jsonl: compression failed")
async def test_7_any_exception_in_a_job_is_survived(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_cold(world.root / "bad.jsonl", jsonl(500, "bad"))
    write_cold(world.root / "good.jsonl", jsonl(500, "good"))
    real = Compress.encode

    def explode(self, store, swap, progress):  # type: ignore[no-untyped-def]
        if swap.name == b"bad.jsonl":
            raise MemoryError("zstd could not allocate")
        return real(self, store, swap, progress)

    monkeypatch.setattr(Compress, "encode", explode)
    async with trio.open_nursery() as n:
        n.start_soon(world.compactor.run)
        await wait_for(lambda: world.stats.swaps_done == 1 and world.stats.swaps_failed == 1,
                       "one swap done and one failed")
        monkeypatch.setattr(Compress, "encode", real)
        world.clock.advance(3600)  # past the backoff
        world.compactor.wake()
        await wait_for(lambda: world.stats.swaps_done == 2, "the failed file retried")
        await world.compactor.stop()
        n.cancel_scope.cancel()
    assert world.below() == ["bad.jsonl.zst", "good.jsonl.zst"]
    assert temps(world.root) == []


# --------------------------------------------------------------------------- 8
async def test_8_a_file_renamed_through_the_mount_stays_queued(world: World) -> None:
    data = jsonl(1000)
    write_cold(world.root / "sessions" / "r.jsonl", data)
    (world.root / "archived").mkdir()
    world.compactor.compress_after = 3600.0
    world.clock.advance(-world.clock.offset)  # now: the file (30 days old) is due already
    world.compactor.compress_after = 40 * 86400.0  # ... make it due in ten days instead
    async with trio.open_nursery() as n:
        n.start_soon(world.compactor.run)
        await wait_for(lambda: world.compactor._scanned, "the initial scan")
        await world.rename("sessions/r.jsonl", "archived/r.jsonl")  # what `codex archive` does
        world.clock.advance(11 * 86400)
        world.compactor.wake()
        await wait_for(lambda: world.stats.swaps_done == 1, "the archived file compressed")
        await world.compactor.stop()
        n.cancel_scope.cancel()
    assert world.below("archived") == ["r.jsonl.zst"]
    assert await world.content("archived/r.jsonl") == data


async def test_8_a_file_whose_directory_is_renamed_during_its_swap_stays_queued(
        world: World) -> None:
    """The compactor's job runs under the path it started with: renamed meanwhile (its
    directory here), a job that does not finish the file must requeue it where it is now, not
    under the old path (which leads nowhere, or through a symlink)."""
    data = jsonl(2000)
    write_cold(world.root / "d" / "f.jsonl", data)
    gate = Gate("compressed")
    world.files.step = gate
    async with trio.open_nursery() as n:
        n.start_soon(world.compactor.run)
        await gate.reached.wait()
        await world.rename("d", "e")
        await world.chmod("e/f.jsonl", 0o600)  # changed: this swap must not publish
        gate.go.set()
        await wait_for(lambda: world.stats.swaps_done == 1, "the file compressed under e/")
        await world.compactor.stop()
        n.cancel_scope.cancel()
    assert world.stats.swaps_abandoned == 1
    assert world.below("e") == ["f.jsonl.zst"]
    assert os.stat(world.root / "e" / "f.jsonl.zst").st_mode & 0o777 == 0o600
    assert await world.content("e/f.jsonl") == data


# --------------------------------------------------------------------------- 9
async def test_9_a_refreshed_handle_keeps_its_old_descriptor_until_release(
        world: World) -> None:
    data = jsonl(2000)
    write_cold(world.root / "r.jsonl", data)
    assert await world.compact("r.jsonl") is Outcome.DONE
    reader = await world.open("r.jsonl")
    assert await world.read(reader) == data
    old_fd = world.ops.handles[reader].fd
    writer = await world.open("r.jsonl", O_APPEND_W)
    await world.append(writer, b'{"more":1}\n')  # promotes
    assert await world.read(reader) == data + b'{"more":1}\n'
    os.fstat(old_fd)  # a read on a worker thread may still be using it: still open
    await world.release(reader)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(old_fd)
    await world.release(writer)


async def test_9_a_reader_after_promotion_and_unlink_goes_on(world: World) -> None:
    data = jsonl(2000)
    write_cold(world.root / "r.jsonl", data)
    assert await world.compact("r.jsonl") is Outcome.DONE
    reader = await world.open("r.jsonl")
    writer = await world.open("r.jsonl", O_APPEND_W)
    await world.append(writer, b'{"more":1}\n')
    await world.unlink("r.jsonl")
    assert await world.read(reader) == data + b'{"more":1}\n'
    await world.release(writer)
    assert (await world.read(reader)).startswith(data)
    await world.release(reader)
    assert world.below() == []


# --------------------------------------------------------------------------- 10
async def test_10_a_kept_leftover_does_not_resurface_after_a_rename(world: World) -> None:
    from zstfs import codec

    plain, old = jsonl(100, "plain"), jsonl(100, "old")
    write_cold(world.root / "k.jsonl", plain)
    with open(world.root / "src", "wb") as f:
        f.write(old)
    sfd = os.open(world.root / "src", os.O_RDONLY)
    zfd = os.open(world.root / "k.jsonl.zst", os.O_WRONLY | os.O_CREAT, 0o644)
    codec.compress_file(sfd, zfd)
    os.close(sfd)
    os.close(zfd)
    os.unlink(world.root / "src")
    await world.rename("k.jsonl", "moved.jsonl")
    with pytest.raises(FUSEError) as e:
        await world.lookup("k.jsonl")
    assert e.value.errno == errno.ENOENT
    assert await world.content("moved.jsonl") == plain
    kept = [n for n in world.below() if n.startswith(".zstfs-kept.")]
    assert len(kept) == 1  # kept, hidden, never deleted


async def test_10_an_error_after_the_rename_does_not_block_later_swaps(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl(2000)
    write_cold(world.root / "e.jsonl", data)
    real_fsync = os.fsync
    failed: list[int] = []

    def fsync(fd: int) -> None:
        import stat
        if stat.S_ISDIR(os.fstat(fd).st_mode) and not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        await world.compact("e.jsonl")
    assert world.below() == ["e.jsonl", "e.jsonl.zst"]  # plain still wins
    assert await world.compact("e.jsonl") is Outcome.DONE
    assert world.below() == ["e.jsonl.zst"]
    assert await world.content("e.jsonl") == data


@pytest.mark.expect_log_errors(r"p\.jsonl: both plain and \.zst exist and differ")
async def test_10_a_differing_pair_is_reported_once_and_skipped(world: World) -> None:
    from zstfs import codec

    write_cold(world.root / "p.jsonl", jsonl(500, "plain"))
    src = world.root / "other"
    src.write_bytes(jsonl(500, "other"))
    sfd, zfd = os.open(src, os.O_RDONLY), os.open(world.root / "p.jsonl.zst",
                                                  os.O_WRONLY | os.O_CREAT, 0o644)
    codec.compress_file(sfd, zfd)
    os.close(sfd)
    os.close(zfd)
    src.unlink()
    async with trio.open_nursery() as n:
        n.start_soon(world.compactor.run)
        await wait_for(lambda: world.stats.pairs_skipped == 1, "the pair to be reported")
        for _ in range(3):
            world.clock.advance(7200)
            world.compactor.wake()
            await trio.testing.wait_all_tasks_blocked()
        await world.compactor.stop()
        n.cancel_scope.cancel()
    assert world.stats.pairs_skipped == 1
    assert world.stats.swaps_failed == 0
    assert world.below() == ["p.jsonl", "p.jsonl.zst"]


# --------------------------------------------------------------------------- 13
async def test_13_a_directory_renamed_during_promotion(world: World) -> None:
    data = jsonl(20000)
    write_cold(world.root / "d" / "big.jsonl", data)
    assert await world.compact("d/big.jsonl") is Outcome.DONE
    fh = await world.open("d/big.jsonl", O_APPEND_W)
    gate = Gate("promoting")
    world.files.step = gate
    async with trio.open_nursery() as n:
        async def write() -> None:
            await world.append(fh, b'{"late":1}\n')

        n.start_soon(write)
        await gate.reached.wait()
        await world.rename("d", "e")
        gate.go.set()
    await world.release(fh)
    assert await world.content("e/big.jsonl") == data + b'{"late":1}\n'
    assert world.below("e") == ["big.jsonl"]
    assert temps(world.root) == []
    await world.unlink("e/big.jsonl")
    await world.rmdir("e")


async def test_13_unlink_during_compression_cancels_it_and_rmdir_works(world: World) -> None:
    write_cold(world.root / "d" / "u.jsonl", jsonl(3000))
    gate = Gate("leased")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "d/u.jsonl", n)
        await gate.reached.wait()
        await world.unlink("d/u.jsonl")
        gate.go.set()
        await world.rmdir("d")  # waits for the abandoned swap to remove its temp
    assert result["outcome"] is Outcome.OPEN
    assert world.below() == []


async def test_the_daemon_never_blocks_on_its_own_lease(world: World) -> None:
    """An open that reaches a file being swapped through a node the swap is not registered on
    (a stale one) must not block the trio thread on our own lease: the open finds the swap by
    the file's inode, makes it give up, and goes on."""
    data = jsonl(2000)
    write_cold(world.root / "l.jsonl", data)
    ino = await world.lookup("l.jsonl")
    node = world.ops.table.get(ino)
    assert node is not None
    gate = Gate("compressed")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result = await compact_in_background(world, "l.jsonl", n)
        await gate.reached.wait()
        ticket, node.swap = node.swap, None  # as if the kernel came through another node
        opened: list[int] = []

        async def open_it() -> None:
            opened.append((await world.ops.open(ino, O_APPEND_W, CTX)).fh)

        n.start_soon(open_it)
        await trio.testing.wait_all_tasks_blocked()
        assert not opened  # waiting for the swap to give up, not blocked in the kernel
        node.swap = ticket
        gate.go.set()
    assert result["outcome"] is Outcome.OPEN
    await world.append(opened[0], b'{"more":1}\n')
    await world.release(opened[0])
    assert world.below() == ["l.jsonl"]
    assert await world.content("l.jsonl") == data + b'{"more":1}\n'


async def test_listing_by_inode_pages_by_name_cookies_through_changes(world: World) -> None:
    """Without directory handles (`directories_by_inode`, the kernel's FUSE_NO_OPENDIR_SUPPORT),
    every readdir lists afresh and offsets are per-name cookies: a listing read a few entries
    at a time while names come and go never skips or repeats a name that stayed."""
    world.ops.directories_by_inode = True
    with pytest.raises(FUSEError) as e:
        await world.opendir("")
    assert e.value.errno == errno.ENOSYS  # taken by the kernel as "no opendir, ever"
    await world.mkdir("d")
    for i in range(40):
        await world.release(await world.create(f"d/f{i:02}"))
    ino = await world.lookup("d")

    async def page(start: int, room: int) -> list[tuple[bytes, int]]:
        got: list[tuple[bytes, int]] = []

        def reply(token: object, name: bytes, attrs: object, nxt: int) -> bool:
            if len(got) == room:
                return False  # the kernel's buffer is full
            got.append((name, nxt))
            return True

        world.ops.readdir_reply = reply  # type: ignore[method-assign]
        await world.ops.readdir(ino, start, None)  # type: ignore[arg-type]
        return got

    seen: list[bytes] = []
    start, turn = 0, 0
    while True:
        got = await page(start, 7)
        if not got:
            break
        seen += [n for n, _ in got]
        start = got[-1][1]
        # Between two pages: one name goes, one comes (through the mount).
        await world.unlink(f"d/f{turn:02}")
        await world.release(await world.create(f"d/new{turn:02}"))
        turn += 1
    stayed = {f"f{i:02}".encode() for i in range(turn, 40)}
    assert seen[:2] == [b".", b".."]
    assert len(seen) == len(set(seen))  # nothing twice
    assert stayed <= set(seen)  # nothing that stayed was skipped
    # A listing from the start shows exactly what is there now.
    names = {n for n, _ in await page(0, 1000)} - {b".", b".."}
    assert names == stayed | {f"new{i:02}".encode() for i in range(turn)}
    # fsyncdir by inode too.
    await world.ops.fsyncdir(ino, False)  # type: ignore[arg-type]


async def test_fsync_of_a_small_file_or_a_directory_runs_inline_until_one_is_slow(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of a small plain file runs on the trio thread (a thread hop costs more than the
    sync); a big file, and a handle whose last sync was slow, sync on a worker thread; a fast
    sync brings the handle back. A directory's fsync is judged the same way, mount-wide. The
    clock is the test's: each fake sync says how long it took."""
    import threading
    import time as real_time

    from zstfs import fs

    now = [1000.0]
    took: list[float] = []
    threads: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        threads.append(threading.current_thread() is threading.main_thread())
        real_fsync(fd)
        now[0] += took.pop(0)

    class Clock:
        def monotonic(self) -> float:
            return now[0]

        def __getattr__(self, name: str) -> object:
            return getattr(real_time, name)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fs, "time", Clock())
    small = await world.create("small.db", b"x" * 100)
    big = await world.create("big.db")
    os.ftruncate(world.ops.handles[big].fd, fs.INLINE_FSYNC_LIMIT + 1)

    took[:] = [0.001, fs.INLINE_FSYNC_SLOW * 2, 0.001, 0.001, 0.001]
    for _ in range(4):
        await world.ops.fsync(small, False)
    await world.ops.fsync(big, False)
    # inline; inline but slow; so the next one on a thread (fast again); inline; big: a thread
    assert threads == [True, True, False, True, False]
    for fh in (small, big):
        await world.release(fh)

    world.ops.directories_by_inode = True
    with pytest.raises(FUSEError):
        await world.opendir("")  # ENOSYS: readdir and fsyncdir get the directory's inode
    await world.mkdir("d")
    d = await world.lookup("d")
    threads.clear()
    took[:] = [0.001, fs.INLINE_FSYNC_SLOW * 2, 0.001, 0.001]
    for ino in (d, ROOT_INODE, d, ROOT_INODE):
        await world.ops.fsyncdir(ino, False)  # type: ignore[arg-type]
    assert threads == [True, True, False, True]


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_directory_renamed_while_the_first_scan_walks_the_store(
        world: World, monkeypatch: pytest.MonkeyPatch, attempts: int) -> None:
    """The scan at start runs on a worker thread while the mount is served. A directory
    renamed through the mount after the walk saw it (found under `d/`, now `e/`) must still
    have its files compressed: they are found again by a second walk, or, when the walks are
    used up, queued under where the renames took them (queued under `d/`, they were dropped as
    gone). Found by a real-mount test that flips a directory while the daemon starts."""
    import threading

    from zstfs import compactor as compactor_module

    monkeypatch.setattr(compactor_module, "SCAN_ATTEMPTS", attempts)
    data = jsonl(3000)
    write_cold(world.root / "d" / "a.jsonl", data)
    real_scan = world.compactor._scan
    walks: list[list[tuple[bytes, float]]] = []
    walked, go = threading.Event(), threading.Event()

    def scan() -> list[tuple[bytes, float]]:
        found = real_scan()
        walks.append(found)
        if len(walks) == 1:
            walked.set()  # the walk saw d/a.jsonl ...
            assert go.wait(30)  # ... and returns only after the rename below
        return found

    monkeypatch.setattr(world.compactor, "_scan", scan)
    async with trio.open_nursery() as n:
        n.start_soon(world.compactor.run)
        await trio.to_thread.run_sync(walked.wait)
        await world.rename("d", "e")
        go.set()
        await wait_for(lambda: world.stats.swaps_done == 1, "the renamed file's compaction")
        await world.compactor.stop()
        n.cancel_scope.cancel()
    assert [p for p, _ in walks[0]] == [b"d/a.jsonl"]
    assert len(walks) == min(attempts, 2)
    assert world.below("e") == ["a.jsonl.zst"]
    assert await world.content("e/a.jsonl") == data
