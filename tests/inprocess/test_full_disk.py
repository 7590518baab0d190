"""A full disk, in process (tests/harness/inprocess.py) on a small tmpfs (needs root to mount it).

Decoded copies of big foreign frames live as unnamed files in the store's filesystem. When a
write, a create or a promotion through the operations layer fails with ENOSPC while copies hold
space there, the copies are given back at once and the operation is tried once more: no writer
gets ENOSPC for space a copy could give up. A promotion that still fails is in `last_errors`.
(ENOSPC during a swap is in tests/mount/test_compactor.py.)
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import zstandard
from harness.inprocess import World, errno_of, jsonl
from harness.mount import compress_in_place, tmpfs_store
from pyfuse3 import FUSEError

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs with an empty `store` directory."""
    with tmpfs_store(tmp_path / "small", "size=24m") as store:
        yield store


@pytest.fixture
async def world(small_fs: Path) -> AsyncIterator[World]:
    """The operations over the small store, with the store's decoders keeping copies there
    whatever the free space (as they do on a big disk) and caching only small frames."""
    w = World(small_fs)
    dec = w.store.decoders
    dec.spills.keep_free = (0.0, 0)
    dec.frames.set_limit(1 * MiB)
    dec.spills.set_dir(w.store.root_fd)
    try:
        yield w
    finally:
        dec.clear()
        w.close()


def free_bytes(path: Path) -> int:
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize


def fill(path: Path, leave: int) -> None:
    """Fill the filesystem of `path` until `leave` bytes are free."""
    with open(path / "filler.bin", "ab") as f:
        f.write(b"\0" * max(0, free_bytes(path) - leave))


async def hold_a_copy(world: World) -> tuple[bytes, int]:
    """Read a foreign one-frame `.zst` through the operations: its decoded copy is kept."""
    data = jsonl(60_000)  # ~5 MiB decoded, a few hundred KiB stored
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    (world.root / "big.jsonl.zst").write_bytes(frame)
    assert await world.content("big.jsonl") == data
    copies, held = world.store.decoders.spills.stats()
    assert copies == 1
    assert held == len(data)
    return data, held


async def test_a_write_takes_the_space_of_a_decoded_copy(world: World) -> None:
    data, held = await hold_a_copy(world)
    fill(world.root, held // 2)
    payload = b"x" * (held // 2 + held // 4)  # more than is free, less than free + the copy
    fh = await world.create("new.jsonl")
    try:
        assert await world.ops.write(fh, 0, payload) == len(payload)
    finally:
        await world.release(fh)
    assert world.store.decoders.spills.stats() == (0, 0)
    assert (world.root / "new.jsonl").read_bytes() == payload
    assert await world.content("big.jsonl") == data  # decoded again, from the .zst
    # Nothing left to give back: the disk is really full now, and a write says so.
    fill(world.root, 0)
    fh = await world.create("more.jsonl")
    try:
        with pytest.raises(FUSEError) as e:
            await world.ops.write(fh, 0, b"y" * (1 * MiB))
        assert errno_of(e.value) == errno.ENOSPC
    finally:
        await world.release(fh)


async def test_a_promotion_takes_the_space_of_a_decoded_copy(world: World) -> None:
    text = jsonl(40_000)
    (world.root / "r.jsonl").write_bytes(text)
    compress_in_place(world.root / "r.jsonl")
    _, held = await hold_a_copy(world)
    fill(world.root, held // 2)
    assert len(text) > held // 2  # the promotion needs the copy's space
    fh = await world.open("r.jsonl", os.O_WRONLY | os.O_APPEND)
    try:
        await world.append(fh, b'{"appended": true}\n')
    finally:
        await world.release(fh)
    assert world.store.decoders.spills.stats() == (0, 0)
    assert (world.root / "r.jsonl").read_bytes() == text + b'{"appended": true}\n'
    assert list(world.stats.last_errors) == []


@pytest.mark.expect_log_errors(r"r\.jsonl: cannot make it plain for writing: .*No space left")
async def test_a_failed_promotion_is_reported(world: World) -> None:
    text = jsonl(40_000)
    (world.root / "r.jsonl").write_bytes(text)
    compress_in_place(world.root / "r.jsonl")
    fill(world.root, 64 * 1024)
    fh = await world.open("r.jsonl", os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(FUSEError) as e:
            await world.ops.write(fh, 0, b"z\n")
        assert errno_of(e.value) == errno.ENOSPC
    finally:
        await world.release(fh)
    errors = [e for e in world.stats.last_errors if e["path"] == "r.jsonl"]
    assert len(errors) == 1, world.stats.last_errors
    assert "space" in errors[0]["error"].lower()
    # The file is as it was: compressed, whole, nothing left beside it.
    assert world.below() == ["filler.bin", "r.jsonl.zst"]
    os.unlink(world.root / "filler.bin")
    assert await world.content("r.jsonl") == text
