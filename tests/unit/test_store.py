"""Unit tests of the backing store: naming, atomic swaps and recovery (no FUSE)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from zstfs import codec
from zstfs.names import NameRules
from zstfs.store import Store, StoreLocked
from zstfs.swap import Compress, swap_now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(str(tmp_path), NameRules("*.jsonl"), codec.CodecParams(frame_size=1 << 16))
    yield s
    s.close()


def lines(n: int, tag: str = "x") -> bytes:
    return b"".join(b'{"n":%d,"tag":"%s","pad":"%s"}\n' % (i, tag.encode(), b"ab" * (i % 50))
                    for i in range(n))


def test_resolve_prefers_plain_and_hides_representations(store: Store, tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"plain\n")
    (tmp_path / "a.jsonl.zst").write_bytes(b"leftover")
    (tmp_path / "b.txt.zst").write_bytes(b"not a representation")
    (tmp_path / ".zstfs-tmp.123.c.jsonl").write_bytes(b"temp")
    entry = store.resolve(b".", b"a.jsonl")
    assert entry is not None
    assert not entry.compressed
    assert sorted(store.list_names(b".")) == [b"a.jsonl", b"b.txt.zst"]
    (tmp_path / "c.jsonl.zst").mkdir()  # not a regular file: not a representation either
    (tmp_path / "d.jsonl.zst").write_bytes(b"x")
    assert sorted(store.list_names(b".")) == [b"a.jsonl", b"b.txt.zst", b"d.jsonl"]


def test_a_name_that_goes_while_listed_is_left_out_not_an_error(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap or promotion replaces one form of a file by the other in the very directory being
    listed: the directory's listing must not fail because one entry went after getdents."""
    for name in ("a.jsonl", "b.jsonl", "c.txt"):
        (tmp_path / name).write_bytes(b"x\n")
    real_scandir = os.scandir

    class Vanishing:
        """scandir whose entries are read (getdents) before "b.jsonl" is unlinked."""

        def __init__(self, fd: int) -> None:
            self.it = real_scandir(fd)
            self.entries = list(self.it)

        def __enter__(self) -> Vanishing:
            (tmp_path / "b.jsonl").unlink()
            (tmp_path / "a.jsonl").rename(tmp_path / "a.jsonl.zst")  # the other form now
            return self

        def __exit__(self, *exc: object) -> None:
            self.it.close()

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            return iter(self.entries)

    monkeypatch.setattr(os, "scandir", Vanishing)
    names = store.list_names(b".")
    monkeypatch.undo()
    assert sorted(names) == [b"a.jsonl", b"b.jsonl", b"c.txt"]  # as getdents saw them
    assert store.resolve(b".", b"b.jsonl") is None  # readdir looks again, and skips it
    entry = store.resolve(b".", b"a.jsonl")
    assert entry is not None
    assert entry.compressed


def test_swap_then_promote_round_trip_keeps_metadata(store: Store, tmp_path: Path) -> None:
    data = lines(20000)
    f = tmp_path / "r.jsonl"
    f.write_bytes(data)
    os.chmod(f, 0o600)
    os.utime(f, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    os.setxattr(f, "user.note", b"kept")
    swap = swap_now(store, Compress(), b"r.jsonl")
    assert swap is not None
    assert swap.logical == len(data)
    assert not f.exists()
    z = tmp_path / "r.jsonl.zst"
    st = z.stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 1_500_000_000_987_654_321)
    assert os.getxattr(z, "user.note") == b"kept"
    out = subprocess.run(["zstd", "-dc", str(z)], capture_output=True, check=True).stdout
    assert out == data
    store.promote(b".", b"r.jsonl")
    assert f.read_bytes() == data
    assert not z.exists()
    assert f.stat().st_mtime_ns == 1_500_000_000_987_654_321
    assert os.getxattr(f, "user.note") == b"kept"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".zstfs-tmp")]


def test_recover_removes_temps_and_superseded_leftovers(store: Store, tmp_path: Path) -> None:
    data = lines(3000)
    (tmp_path / "d").mkdir()
    for name in ("same.jsonl", "grown.jsonl", "differs.jsonl"):
        (tmp_path / "d" / name).write_bytes(data)
        swap_now(store, Compress(), b"d/" + name.encode())
    # Interrupted swaps: the plain file came back beside its .zst.
    (tmp_path / "d" / "same.jsonl").write_bytes(data)
    (tmp_path / "d" / "grown.jsonl").write_bytes(data + b'{"more":1}\n')
    (tmp_path / "d" / "differs.jsonl").write_bytes(b"something else\n")
    (tmp_path / "d" / ".zstfs-tmp.abc.x.jsonl").write_bytes(b"half written")
    report = store.recover()
    assert (report.temps_removed, report.leftovers_removed, report.leftovers_kept) == (1, 2, 1)
    assert sorted(os.listdir(tmp_path / "d")) == [
        "differs.jsonl", "differs.jsonl.zst", "grown.jsonl", "same.jsonl"]


def test_store_lock_names_the_holder(tmp_path: Path) -> None:
    a = Store.open(str(tmp_path), NameRules())
    b = Store.open(str(tmp_path), NameRules())
    try:
        a.lock()
        with pytest.raises(StoreLocked) as exc:
            b.lock()
        assert str(os.getpid()) in str(exc.value)
    finally:
        a.close()
        b.close()


def test_census_counts_logical_and_stored_bytes(store: Store, tmp_path: Path) -> None:
    data = lines(5000)
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.jsonl").write_bytes(data)
    (tmp_path / "other.db").write_bytes(b"x" * 100)
    swap_now(store, Compress(), b"b.jsonl")
    c = store.census().as_dict()
    assert (c["plain_files"], c["compressed_files"]) == (1, 1)
    assert c["logical_bytes"] == 2 * len(data)
    assert c["stored_bytes"] == len(data) + (tmp_path / "b.jsonl.zst").stat().st_size
    assert c["ratio"] > 1.5


def test_a_swap_that_cannot_copy_every_xattr_fails_and_keeps_the_plain_file(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata either all survives a swap or the swap fails (a nearly full
    disk refusing an xattr must not silently drop it)."""
    import errno

    data = lines(3000)
    f = tmp_path / "r.jsonl"
    f.write_bytes(data)
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.b", b"2" * 1000)
    real = os.setxattr

    def full(target: object, name: object, value: bytes, *args: object, **kw: object) -> None:
        if name == "user.b":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, name, value, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "setxattr", full)
    with pytest.raises(OSError, match="No space left"):
        swap_now(store, Compress(), b"r.jsonl")
    monkeypatch.setattr(os, "setxattr", real)
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl"]
    assert f.read_bytes() == data
    assert os.getxattr(f, "user.b") == b"2" * 1000
    assert swap_now(store, Compress(), b"r.jsonl") is not None  # and with room, everything is kept
    assert os.getxattr(tmp_path / "r.jsonl.zst", "user.b") == b"2" * 1000



@pytest.mark.parametrize("kernel", ["getxattrat", "without getxattrat"])
def test_xattrs_by_name_read_the_form_a_name_stands_for(
        store: Store, tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`getxattr_in` answers like an open of what `resolve_in` finds: the plain form when both
    exist, else a regular `.zst` form; a symlink's own attributes, never its target's; values of
    any length; ENODATA and ENOENT as the kernel gives them. Before Linux 6.13 it says so (None)
    and the caller takes the slow path."""
    import zstfs.store as store_module

    if kernel != "getxattrat":
        monkeypatch.setattr(store_module, "_getxattrat_missing", True)
    big = bytes(range(256)) * 12  # 3,072 bytes: past the first buffer, within an ext4 block
    (tmp_path / "both.jsonl").write_bytes(b"plain\n")
    (tmp_path / "both.jsonl.zst").write_bytes(b"leftover")
    os.setxattr(tmp_path / "both.jsonl", "user.form", b"plain")
    os.setxattr(tmp_path / "both.jsonl.zst", "user.form", b"zst")
    (tmp_path / "z.jsonl.zst").write_bytes(b"x")
    os.setxattr(tmp_path / "z.jsonl.zst", "user.big", big)
    os.setxattr(tmp_path / "z.jsonl.zst", "user.empty", b"")
    (tmp_path / "d.jsonl.zst").mkdir()  # not a representation
    (tmp_path / "target.txt").write_bytes(b"t")
    os.setxattr(tmp_path / "target.txt", "user.form", b"target")
    (tmp_path / "link.txt").symlink_to("target.txt")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def get(name: bytes, attr: bytes) -> bytes | None:
            return store.getxattr_in(dfd, b".", name, attr)

        if kernel != "getxattrat":
            assert get(b"both.jsonl", b"user.form") is None
            return
        assert get(b"both.jsonl", b"user.form") == b"plain"
        assert get(b"z.jsonl", b"user.big") == big
        assert get(b"z.jsonl", b"user.empty") == b""
        with pytest.raises(OSError, match="No data available"):
            get(b"z.jsonl", b"user.absent")
        for missing in (b"d.jsonl", b"none.jsonl", b"none.txt"):
            with pytest.raises(FileNotFoundError):
                get(missing, b"user.form")
        with pytest.raises(OSError, match="No data available"):  # the link's own (none)
            get(b"link.txt", b"user.form")
        os.setxattr(tmp_path, "user.dir", b"the directory's own")
        assert store_module.getxattrat(dfd, b"", b"user.dir") == b"the directory's own"
    finally:
        os.close(dfd)
