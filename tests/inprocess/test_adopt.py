"""Foreign `.zst` files (codex's own single frames, the zstd CLI's output) are adopted: re-encoded
into zstfs's seekable format by the compactor (and `zstfs compress`), with the same guarantees as
a swap — verified, nobody has it open, metadata kept — and counted in status as `adopted`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from harness.inprocess import Gate, World, jsonl
from harness.mount import MountFactory, wait_until

from zstfs import codec
from zstfs.openfiles import Outcome

pytestmark = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
OLD = time.time() - 30 * 86400


def foreign(path: Path, data: bytes, *args: str) -> None:
    """`path` written by the zstd CLI (one frame, like codex's), old, mode 0640, an xattr."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["zstd", "-q", "-3", *args, "-o", str(path)], input=data, check=True)
    os.chmod(path, 0o640)
    os.setxattr(path, "user.origin", b"codex")
    ns = int(OLD) * 10**9 + 123_456_789
    os.utime(path, ns=(ns, ns))


def native(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return codec.is_native(fd)
    finally:
        os.close(fd)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    root = tmp_path / "store"
    root.mkdir()
    w = World(root)
    yield w
    w.close()


async def test_a_foreign_file_is_reencoded_with_its_metadata(world: World) -> None:
    data = jsonl(50_000)
    z = world.root / "r.jsonl.zst"
    foreign(z, data, "--no-check")
    before = os.stat(z)
    assert not native(z)
    assert await world.adopt("r.jsonl.zst") is Outcome.DONE
    assert native(z)
    after = os.stat(z)
    assert (after.st_mode, after.st_mtime_ns, after.st_uid) == (
        before.st_mode, before.st_mtime_ns, before.st_uid)
    assert os.getxattr(z, "user.origin") == b"codex"
    assert world.stats.adopted == 1
    assert await world.content("r.jsonl") == data
    assert world.below() == ["r.jsonl.zst"]
    # Ours now: a second pass leaves it alone.
    assert await world.adopt("r.jsonl.zst") is Outcome.GONE


def hold(path: Path, mode: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; f = open(sys.argv[1], {mode!r});"
                               " print('ready', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline() == "ready\n"
    return holder


async def test_a_file_open_for_writing_is_not_adopted(world: World) -> None:
    data = jsonl(5000)
    z = world.root / "r.jsonl.zst"
    foreign(z, data)
    holder = hold(z, "ab")
    try:
        assert await world.adopt("r.jsonl.zst") is Outcome.BUSY
        assert not native(z)
    finally:
        holder.communicate("")
    # Opened for writing while it is being re-encoded: the re-encoding gives up.
    gate = Gate("compressed")
    world.files.step = gate
    async with trio.open_nursery() as n:
        result: dict[str, Outcome] = {}

        async def run() -> None:
            result["outcome"] = await world.adopt("r.jsonl.zst")

        n.start_soon(run)
        await gate.reached.wait()
        with pytest.raises(BlockingIOError):
            os.open(z, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        gate.go.set()
    assert result["outcome"] is Outcome.BUSY
    assert not native(z)
    assert [n for n in world.below() if n.startswith(".zstfs")] == []


async def test_readers_do_not_stop_an_adoption_and_keep_reading(world: World) -> None:
    data = jsonl(20_000)
    z = world.root / "r.jsonl.zst"
    foreign(z, data)
    outside = hold(z, "rb")  # a reader below the mount
    try:
        fh = await world.open("r.jsonl")  # and one through it
        assert (await world.ops.read(fh, 0, 100)) == data[:100]
        assert await world.adopt("r.jsonl.zst") is Outcome.DONE
        assert native(z)
        assert await world.read(fh) == data  # the old file, the same bytes
        await world.release(fh)
    finally:
        outside.communicate("")
    assert await world.content("r.jsonl") == data


async def test_a_damaged_foreign_file_is_kept_as_it_is(world: World) -> None:
    z = world.root / "d.jsonl.zst"
    foreign(z, jsonl(5000))
    raw = bytearray(z.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    z.write_bytes(bytes(raw))
    assert await world.adopt("d.jsonl.zst") is Outcome.UNADOPTABLE
    assert z.read_bytes() == bytes(raw)
    assert world.below() == ["d.jsonl.zst"]


def test_the_compactor_adopts_cold_foreign_files(store: Path,
                                                 mount_factory: MountFactory) -> None:
    data = jsonl(200_000)
    foreign(store / "sessions" / "big.jsonl.zst", data)
    foreign(store / "sessions" / "small.jsonl.zst", jsonl(100, "s"))
    below = os.open(store / "sessions", os.O_RDONLY | os.O_DIRECTORY)
    try:
        m = mount_factory(store, "--compress-after", "1d")
        wait_until(lambda: m.status()["adopted"] == 2, 60, "both foreign files adopted")
        for name in ("big.jsonl.zst", "small.jsonl.zst"):
            fd = os.open(name, os.O_RDONLY, dir_fd=below)
            try:
                assert codec.is_native(fd)
                st = os.fstat(fd)
                assert (st.st_mode & 0o777, st.st_mtime_ns % 10**9) == (0o640, 123456789)
            finally:
                os.close(fd)
        assert (store / "sessions" / "big.jsonl").read_bytes() == data
        m.stop()
    finally:
        os.close(below)
    out = subprocess.run(["zstd", "-dc", str(store / "sessions" / "big.jsonl.zst")],
                         capture_output=True, check=True).stdout
    assert out == data


def test_offline_compress_adopts_foreign_files(store: Path) -> None:
    data = jsonl(20_000)
    foreign(store / "sessions" / "r.jsonl.zst", data, "--long=30")
    r = subprocess.run([sys.executable, "-m", "zstfs", "compress", "--pattern", "*.jsonl",
                        "--no-progress", str(store)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 .zst files re-encoded" in r.stdout
    assert native(store / "sessions" / "r.jsonl.zst")
    out = subprocess.run(["zstd", "-dc", str(store / "sessions" / "r.jsonl.zst")],
                         capture_output=True, check=True).stdout
    assert out == data
