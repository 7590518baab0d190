"""On a real mount: mode, owner, xattrs and times all survive a swap, or the
swap fails and the plain file stays. Here the store's disk has room for the compressed data but
not for a copy of the file's xattr (a tmpfs charges user xattrs to its inode space)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mount import Mount, MountFactory, tmpfs_store, wait_until


def lines(n: int) -> bytes:
    return b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"ab" * (i % 50)) for i in range(n))


@pytest.fixture
def xattr_tight_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with room for data but little for extended attributes (`nr_inodes` times 1 KiB)."""
    with tmpfs_store(tmp_path / "tight", "size=64m,nr_inodes=200") as store:
        yield store


def errors(m: Mount) -> str:
    return " ".join(e["error"] for e in m.status()["last_errors"])


def test_no_room_for_an_xattr_fails_the_swap_and_keeps_the_plain_file(
        xattr_tight_fs: Path, mount_factory: MountFactory) -> None:
    store = xattr_tight_fs
    data = lines(20000)
    f = store / "r.jsonl"
    f.write_bytes(data)
    os.setxattr(f, "user.big", b"v" * 60000)
    old = time.time() - 86400
    os.utime(f, (old, old))
    for i in range(200):  # use up the xattr space, leaving less than one more copy
        g = store / f"filler{i}"
        g.touch()
        try:
            os.setxattr(g, "user.p", b"p" * 20000)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            break
    below = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        m = mount_factory(store, "--pattern", "*.jsonl", "--compress-after", "0",
                          expect_errors=r"r\.jsonl: compression failed \(no space left")
        wait_until(lambda: m.status()["swaps_failed"] >= 1, 60, "the swap to fail")
        assert "no space left" in errors(m)
        names = sorted(n for n in os.listdir(below) if not n.startswith("filler"))
        assert names == [".zstfs.lock", "r.jsonl"]  # no .zst, no temp left behind
        assert (store / "r.jsonl").read_bytes() == data
        assert os.getxattr(store / "r.jsonl", "user.big") == b"v" * 60000
        m.stop()
    finally:
        os.close(below)
    assert os.getxattr(f, "user.big") == b"v" * 60000
    assert f.read_bytes() == data
