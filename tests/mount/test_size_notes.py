"""On a real mount: the logical size a `.zst` carries as a note (`user.zstfs.size`). Every swap
writes it and a listing reads it instead of the file's seek table; it counts only while the
file's size and mtime are the ones it names; the mount never shows it or lets it be set, a plain
file never inherits it, and a note that lies reads as an I/O error, never as other bytes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness.mount import MountFactory, errno_of, wait_until

NOTE = "user.zstfs.size"
OLD = time.time() - 86400


def lines(n: int) -> bytes:
    return b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"ab" * (i % 50)) for i in range(n))


def note_of(path: str | Path) -> bytes | None:
    try:
        return os.getxattr(path, NOTE, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


def old_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))


def compress_offline(store: Path) -> None:
    """`zstfs compress` of an unmounted store, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "zstfs", "compress", "--no-progress", "--pattern",
                        "*.jsonl", str(store)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def expected_note(zst: Path, logical: int) -> bytes:
    st = os.stat(zst)
    return b"1 %d %d %d" % (st.st_size, st.st_mtime_ns, logical)


def test_a_swap_notes_the_size_and_the_mount_neither_shows_nor_copies_it(
        store: Path, mount_factory: MountFactory) -> None:
    data = lines(6000)
    old_file(store / "r.jsonl", data)
    below = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        m = mount_factory(store, "--compress-after", "0")
        wait_until(lambda: m.status()["swaps_done"] >= 1, 60, "the swap")
        zst = f"/proc/self/fd/{below}/r.jsonl.zst"
        assert note_of(zst) == expected_note(Path(zst), len(data))
        f = store / "r.jsonl"
        assert os.stat(f).st_size == len(data)
        # Through the mount it does not exist, and cannot be made.
        assert not [n for n in os.listxattr(f) if n.startswith("user.zstfs.")]
        assert errno_of(os.getxattr, f, NOTE) == errno.ENODATA
        assert errno_of(os.setxattr, f, NOTE, b"1 1 1 1") == errno.EPERM
        assert errno_of(os.removexattr, f, NOTE) == errno.EPERM
        dump = subprocess.run(["getfattr", "-d", "-m", "-", str(f)], capture_output=True,
                              text=True, check=True).stdout
        assert "zstfs" not in dump
        os.setxattr(f, "user.kept", b"yes")  # the user's own still go through
        # A write promotes it: the plain file keeps the user's xattr, not the note.
        with open(f, "ab") as w:
            w.write(b'{"n":"last"}\n')
        plain = f"/proc/self/fd/{below}/r.jsonl"
        wait_until(lambda: os.path.exists(plain), 30, "the promotion")
        assert note_of(plain) is None
        assert os.getxattr(plain, "user.kept") == b"yes"
        assert f.read_bytes() == data + b'{"n":"last"}\n'
    finally:
        os.close(below)


def test_a_listing_takes_the_noted_size_and_a_read_still_checks_the_file(
        store: Path, mount_factory: MountFactory) -> None:
    """The seek table of `r.jsonl.zst` is damaged after it was compressed (size and mtime kept):
    a fresh mount lists it with its noted size, which it can only have from the note (a damaged
    file otherwise lists with its stored size), and reading it is still an I/O error."""
    data = lines(6000)
    old_file(store / "r.jsonl", data)
    old_file(store / "ok.jsonl", lines(300))
    compress_offline(store)
    zst = store / "r.jsonl.zst"
    assert note_of(zst) == expected_note(zst, len(data))
    st = os.stat(zst)
    with open(zst, "r+b") as f:
        f.seek(-9, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")  # the footer's frame count: a table that cannot fit
    os.utime(zst, ns=(st.st_atime_ns, st.st_mtime_ns))
    mount_factory(store, expect_errors=r"r\.jsonl: damaged \.zst: seek table")
    assert {p.name: p.stat().st_size for p in store.iterdir()} == {
        "r.jsonl": len(data), "ok.jsonl": len(lines(300))}
    assert (store / "ok.jsonl").read_bytes() == lines(300)
    r = subprocess.run(["cat", str(store / "r.jsonl")], capture_output=True)
    assert r.returncode != 0
    assert b"Input/output error" in r.stderr


def test_a_note_that_lies_reads_as_an_error_never_as_other_bytes(
        store: Path, mount_factory: MountFactory) -> None:
    """A note is trusted only for the size and mtime it names: one naming another mtime is
    ignored; one that names them but lies about the content (the file was changed keeping its
    size and mtime) lists as it says, and then no byte of the file is served."""
    data = lines(6000)
    old_file(store / "lies.jsonl", data)
    old_file(store / "stale.jsonl", data)
    compress_offline(store)
    for name, mtime_shift, claim in (("lies", 0, len(data) - 100), ("stale", 1, 7)):
        zst = store / f"{name}.jsonl.zst"
        st = os.stat(zst)
        os.setxattr(zst, NOTE, b"1 %d %d %d" % (st.st_size, st.st_mtime_ns + mtime_shift, claim))
        assert os.stat(zst).st_mtime_ns == st.st_mtime_ns
    mount_factory(store, expect_errors=r"lies\.jsonl: damaged \.zst: .*size note")
    assert (store / "stale.jsonl").stat().st_size == len(data)
    assert (store / "stale.jsonl").read_bytes() == data
    assert (store / "lies.jsonl").stat().st_size == len(data) - 100
    for cmd in (["cat"], ["tail", "-c", "50"], ["head", "-c", "10"]):
        r = subprocess.run([*cmd, str(store / "lies.jsonl")], capture_output=True)
        assert r.returncode != 0, cmd
        assert r.stdout == b"", (cmd, r.stdout[:80])


def test_a_foreign_zst_is_noted_when_first_listed(store: Path,
                                                   mount_factory: MountFactory) -> None:
    """A `.zst` zstfs did not write (the `zstd` tool's) gets its note the first time the mount
    learns its size; its mtime and content stay as they were."""
    if subprocess.run(["zstd", "--version"], capture_output=True).returncode != 0:
        pytest.skip("needs the zstd command")
    data = lines(4000)
    old_file(store / "f.jsonl", data)
    subprocess.run(["zstd", "-q", "--rm", str(store / "f.jsonl")], check=True)
    zst = store / "f.jsonl.zst"
    before = zst.read_bytes()
    st = os.stat(zst)
    assert note_of(zst) is None
    below = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        m = mount_factory(store)
        subprocess.run(["ls", "-l", str(store)], capture_output=True, check=True)
        assert (store / "f.jsonl").stat().st_size == len(data)
        path = f"/proc/self/fd/{below}/f.jsonl.zst"
        assert note_of(path) == b"1 %d %d %d" % (st.st_size, st.st_mtime_ns, len(data))
        assert os.stat(path).st_mtime_ns == st.st_mtime_ns
        m.stop()
    finally:
        os.close(below)
    assert zst.read_bytes() == before
