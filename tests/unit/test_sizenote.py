"""Unit tests of the size note a `.zst` carries (`user.zstfs.size`): what it names, when it
counts, who writes and reads it, and that a note its frames disagree with is damage."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from zstfs import codec, sizenote
from zstfs.codec.indexes import IndexCache
from zstfs.names import NameRules
from zstfs.store import Store, copy_metadata
from zstfs.swap import Compress, swap_now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(str(tmp_path), NameRules("*.jsonl"), codec.CodecParams(frame_size=1 << 16))
    yield s
    s.close()


def lines(n: int) -> bytes:
    return b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"ab" * (i % 50)) for i in range(n))


def test_a_note_counts_only_for_the_size_and_mtime_it_names(tmp_path: Path) -> None:
    f = tmp_path / "a.zst"
    f.write_bytes(b"x" * 100)
    st = os.stat(f)
    note = sizenote.encode(st, 12345)
    assert note == b"1 100 %d 12345" % st.st_mtime_ns
    assert sizenote.decode(note, st) == 12345
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert sizenote.decode(note, os.stat(f)) is None  # another mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    f.write_bytes(b"x" * 101)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sizenote.decode(note, os.stat(f)) is None  # another size
    for bad in (None, b"", b"2 100 %d 5" % st.st_mtime_ns, b"1 100 %d" % st.st_mtime_ns,
                b"1 100 %d -5" % st.st_mtime_ns, b"1 100 %d 5 6" % st.st_mtime_ns,
                b"1 100 %d %d" % (st.st_mtime_ns, 1 << 63), b"1 100 %d 5x" % st.st_mtime_ns):
        assert sizenote.decode(bad, st) is None, bad


def test_a_note_is_not_written_for_a_file_that_changed_meanwhile(tmp_path: Path) -> None:
    f = tmp_path / "a.zst"
    f.write_bytes(b"x" * 100)
    st = os.stat(f)
    fd = os.open(f, os.O_RDWR)
    try:
        os.write(fd, b"more")
        assert not sizenote.write(fd, st, 7)
        assert sizenote.NAME.decode() not in os.listxattr(f)
        assert sizenote.write(fd, os.fstat(fd), 7)
        assert sizenote.decode(os.getxattr(f, sizenote.NAME), os.stat(f)) == 7
    finally:
        os.close(fd)


def test_metadata_copies_leave_zstfs_xattrs_out(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"a")
    dst.write_bytes(b"b")
    os.setxattr(src, "user.mine", b"1")
    os.setxattr(src, sizenote.NAME, b"1 1 1 1")
    os.setxattr(src, "user.zstfs.other", b"2")
    s, d = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        copy_metadata(s, d, os.fstat(s))
    finally:
        os.close(s)
        os.close(d)
    assert os.listxattr(dst) == ["user.mine"]


def test_a_swap_notes_the_size_and_a_new_store_takes_it_instead_of_the_seek_table(
        tmp_path: Path) -> None:
    data = lines(5000)
    (tmp_path / "r.jsonl").write_bytes(data)
    first = Store.open(str(tmp_path), NameRules("*.jsonl"), codec.CodecParams(frame_size=1 << 16))
    try:
        assert swap_now(first, Compress(), b"r.jsonl") is not None
    finally:
        first.close()
    zst = tmp_path / "r.jsonl.zst"
    st = os.stat(zst)
    assert sizenote.decode(os.getxattr(zst, sizenote.NAME), st) == len(data)
    # Its seek table made unreadable, size and mtime kept: only the note can give the size.
    with open(zst, "r+b") as f:
        f.seek(-9, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    os.utime(zst, ns=(st.st_atime_ns, st.st_mtime_ns))
    st = os.stat(zst)
    second = Store.open(str(tmp_path), NameRules("*.jsonl"), codec.CodecParams())
    try:
        assert second.known_size(st) is None
        assert second.logical_size(b"r.jsonl.zst", st) == len(data)
        assert second.known_size(st) == len(data)
        fd = os.open(zst, os.O_RDONLY)
        try:  # a reader still goes by the file, which is damaged
            with pytest.raises(codec.CorruptError, match="seek table"):
                codec.ZstReader(fd, second.decoders).read(0, 10)
        finally:
            os.close(fd)
    finally:
        second.close()


def test_a_size_learnt_from_the_file_is_noted_on_it(store: Store, tmp_path: Path) -> None:
    data = lines(3000)
    zst = tmp_path / "f.jsonl.zst"
    (tmp_path / "f.jsonl").write_bytes(data)
    fd_in = os.open(tmp_path / "f.jsonl", os.O_RDONLY)
    fd_out = os.open(zst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        codec.compress_file(fd_in, fd_out, codec.CodecParams())
    finally:
        os.close(fd_in)
        os.close(fd_out)
    (tmp_path / "f.jsonl").unlink()
    st = os.stat(zst)
    assert sizenote.NAME.decode() not in os.listxattr(zst)
    assert store.logical_size(b"f.jsonl.zst", st) == len(data)
    assert os.stat(zst).st_mtime_ns == st.st_mtime_ns
    assert sizenote.decode(os.getxattr(zst, sizenote.NAME), os.stat(zst)) == len(data)


def test_a_noted_size_the_frames_disagree_with_is_damage() -> None:
    ids = IndexCache()
    ident = codec.Identity(1, 2, 300, 4)
    ids.remember_noted(ident, 1000)
    assert ids.known_size(ident) == 1000

    class FakeIndex:
        size = 999

    with pytest.raises(codec.CorruptError, match="size note says 1000"):
        ids.get(ident, lambda: FakeIndex())  # type: ignore[arg-type,return-value]
    with pytest.raises(codec.CorruptError, match="size note says 1000"):
        ids.get(ident, lambda: FakeIndex())  # type: ignore[arg-type,return-value]
    agreeing = codec.Identity(1, 3, 300, 4)
    ids.remember_noted(agreeing, 999)
    assert ids.get(agreeing, lambda: FakeIndex()).size == 999  # type: ignore[arg-type,return-value]
