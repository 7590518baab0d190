"""The compressed view, tested against real mounts.

Every backing store here is built BEFORE mounting, the way a user's store looks: `.zst` files made
by the `zstd` CLI (with and without a content size, and through a pipe) and by zstfs's own codec
(many 1 MiB frames, an old mtime, mode 0600). The mount then covers the store directory itself, so
a test that needs to see the backing files while mounted opens the store directory first and lists
through that descriptor (`backing()`); after an unmount the store path shows the backing again.

The rules under test: names (`NAME.zst` shows as `NAME`, plain wins, reserved names), attributes
(logical size without decoding, the `.zst`'s mtime/mode/owner/xattrs, real `st_blocks`), random
access reads, promotion on the first write (and only then), namespace operations on whichever form
exists, recovery at mount, one owner per store, damage reported as EIO, and `du` telling the truth.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gen_rollouts
import pytest
from harness.mount import Mount, MountFactory, wait_until

from zstfs.codec import CodecParams, compress_file

MiB = 1 << 20
OLD_NS = 1_700_000_000_123_456_789  # an old mtime with nanoseconds, for codec-made files
TEMP_PREFIX = ".zstfs-tmp."


# ---------------------------------------------------------------------------------------------
# building stores


def write_rollout(path: Path, size: int, seed: int) -> bytes:
    """A realistic Codex rollout of about `size` bytes at `path`; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gen_rollouts.generate_rollout(path, size, seed=seed)
    return path.read_bytes()


def zstd_cli(path: Path, how: str) -> Path:
    """Compress `path` to `path.zst` with the zstd CLI and remove `path`."""
    if how == "zstd":
        subprocess.run(["zstd", "-q", "-3", "--rm", str(path)], check=True)
    elif how == "zstd-no-content-size":
        subprocess.run(["zstd", "-q", "--no-content-size", "--rm", str(path)], check=True)
    elif how == "zstd-pipe":  # a stream: no content size in the frame header
        subprocess.run(f"cat '{path}' | zstd > '{path}.zst'", shell=True, check=True)
        path.unlink()
    else:
        raise AssertionError(how)
    return Path(f"{path}.zst")


def codec_compress(path: Path, frame_size: int = MiB, mtime_ns: int = OLD_NS) -> Path:
    """Compress `path` with zstfs's codec (many frames), give the `.zst` an old mtime and mode
    0600, and remove `path`."""
    zpath = Path(f"{path}.zst")
    src = os.open(path, os.O_RDONLY)
    dst = os.open(zpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        compress_file(src, dst, CodecParams(frame_size=frame_size))
    finally:
        os.close(src)
        os.close(dst)
    path.unlink()
    os.chmod(zpath, 0o600)
    os.utime(zpath, ns=(mtime_ns, mtime_ns))
    return zpath


def compress(path: Path, how: str) -> Path:
    return codec_compress(path) if how == "codec" else zstd_cli(path, how)


@contextlib.contextmanager
def store_fd(store: Path) -> Iterator[int]:
    """A descriptor of the store directory taken before mounting: the backing, seen from below."""
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def backing(fd: int, sub: str = ".") -> list[str]:
    """The raw names in a backing directory (while the mount covers it)."""
    if sub == ".":
        return sorted(os.listdir(fd))
    d = os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    try:
        return sorted(os.listdir(d))
    finally:
        os.close(d)


STATUS_TTL = 1.0  # fs.py computes the status document at most once a second


def fresh_status(m: Mount) -> dict[str, Any]:
    """A status computed after everything this test did so far. The daemon serves a cached
    document for up to STATUS_TTL, and a counter that must have stayed unchanged gives no event
    to wait for, so wait out the cache (a bounded wait, not a synchronisation)."""
    time.sleep(STATUS_TTL + 0.1)
    return m.status()


def append_script(path: Path, lines: list[bytes]) -> list[str]:
    """argv of a process that appends `lines` to `path` (O_WRONLY|O_APPEND, no O_CREAT), one
    os.write per line, and prints what happened."""
    code = textwrap.dedent("""
        import os, sys
        path, lines = sys.argv[1], [l.encode() for l in sys.argv[2:]]
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        print("opened", flush=True)
        try:
            for line in lines:
                assert os.write(fd, line) == len(line)
        except OSError as e:
            print("error", e.errno, flush=True)
            sys.exit(3)
        os.close(fd)
        print("wrote", flush=True)
    """)
    return [sys.executable, "-c", code, str(path), *(line.decode() for line in lines)]


def read_until_error(path: Path, chunk: int = 64 * 1024) -> tuple[bytes, OSError | None]:
    """Read `path` sequentially with os.read: the bytes obtained and the error that stopped it."""
    out = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                data = os.read(fd, chunk)
            except OSError as e:
                return bytes(out), e
            if not data:
                return bytes(out), None
            out += data
    finally:
        os.close(fd)


def seekable_frames(zpath: Path) -> list[tuple[int, int]]:
    """(compressed offset, compressed size) of each frame, from a seekable file's seek table."""
    raw = zpath.read_bytes()
    assert raw[-4:] == (0x8F92EAB1).to_bytes(4, "little"), "no seek table"
    count = int.from_bytes(raw[-9:-5], "little")
    entry = 12 if raw[-5] & 0x80 else 8
    table = raw[-9 - count * entry:-9]
    frames, pos = [], 0
    for i in range(count):
        csize = int.from_bytes(table[i * entry:i * entry + 4], "little")
        frames.append((pos, csize))
        pos += csize
    return frames


# ---------------------------------------------------------------------------------------------
# 1. names, attributes and reads


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["zstd", "zstd-no-content-size", "zstd-pipe", "codec"])
def test_compressed_file_reads_like_the_original(store: Path, mount_factory: MountFactory,
                                                  how: str) -> None:
    """listing, stat (logical size, the .zst's mtime/mode/owner/blocks/xattrs), cat, tail, grep
    and 300 random preads all see exactly the original bytes; the .zst name is invisible."""
    sub = store / "sessions" / "2026" / "06" / "04"
    data = write_rollout(sub / "rollout-a.jsonl", 3 * MiB + 500_000, seed=11)
    zpath = compress(sub / "rollout-a.jsonl", how)
    os.setxattr(zpath, "user.origin", b"test-view")
    zst = os.stat(zpath)
    (store / "notes.txt").write_text("notes\n")
    below = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    mount_factory(store)
    f = sub / "rollout-a.jsonl"

    assert os.listdir(sub) == ["rollout-a.jsonl"]
    assert sorted(os.listdir(store)) == ["notes.txt", "sessions"]
    with pytest.raises(FileNotFoundError):
        os.stat(zpath)  # the representation is not a name of the view

    # Random reads first, on a fresh mount: nothing is in the kernel's page cache yet, so the
    # daemon serves them, at offsets all over the file, across frame boundaries and past EOF.
    rng = random.Random(f"preads-{how}")
    size = len(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        for i in range(300):
            if i % 3 == 0:
                off = max(0, rng.randrange(1, 4) * MiB + rng.randrange(-3000, 3000))
            elif i % 7 == 0:
                off = size + rng.randrange(-2000, 5000)
            else:
                off = rng.randrange(0, size)
            n = rng.choice([1, rng.randrange(1, 200), rng.randrange(1, 70_000),
                            rng.randrange(1, 600_000)])
            assert os.pread(fd, n, off) == data[off:off + n], (off, n)
    finally:
        os.close(fd)

    st = os.stat(f)
    assert st.st_size == size
    assert st.st_mtime_ns == zst.st_mtime_ns
    assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(zst.st_mode)
    assert stat.S_ISREG(st.st_mode)
    assert (st.st_uid, st.st_gid) == (zst.st_uid, zst.st_gid)
    # What is really stored (now: the size note the mount added may have taken an xattr block).
    try:
        assert st.st_blocks == os.stat(zpath.name, dir_fd=below).st_blocks
    finally:
        os.close(below)
    assert st.st_blocks * 512 < size / 2  # ... which is far less than the logical size
    assert os.getxattr(f, "user.origin") == b"test-view"
    if how == "codec":
        assert st.st_mtime_ns == OLD_NS
        assert stat.S_IMODE(st.st_mode) == 0o600
    r = subprocess.run(["stat", "-c", "%s", str(f)], capture_output=True, text=True, check=True)
    assert int(r.stdout) == size

    r = subprocess.run(["cat", str(f)], capture_output=True, check=True)
    assert r.stdout == data
    r = subprocess.run(["tail", "-n", "5", str(f)], capture_output=True, check=True)
    assert r.stdout == b"".join(data.splitlines(keepends=True)[-5:])
    needle = b'"type":"response_item"'
    r = subprocess.run(["grep", "-c", "-F", needle.decode(), str(f)], capture_output=True,
                       check=True)
    expected = sum(1 for line in data.splitlines() if needle in line)
    assert expected > 10
    assert int(r.stdout) == expected


@pytest.mark.timeout(60)
def test_names_of_the_view(store: Path, mount_factory: MountFactory) -> None:
    """`NAME.zst` shows as `NAME` only for names matching the pattern; reserved and `.zst` names
    cannot be looked up or created; renames and links onto them are refused and change nothing."""
    a = write_rollout(store / "a.jsonl", 200_000, seed=1)
    zstd_cli(store / "a.jsonl", "zstd")
    (store / "notes.txt").write_text("notes\n")
    zstd_cli(store / "notes.txt", "zstd")  # notes.txt.zst: outside the pattern
    (store / "plain.jsonl").write_bytes(b'{"x":1}\n')
    (store / ".zstfs-tmp.0123.a.jsonl").write_bytes(b"junk")  # removed by recovery
    m = mount_factory(store)
    r = subprocess.run(["ls", "-1A", str(store)], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["a.jsonl", "notes.txt.zst", "plain.jsonl"]
    assert (store / "a.jsonl").read_bytes() == a
    assert (store / "notes.txt.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # as it is
    for name in ("a.jsonl.zst", ".zstfs.lock", ".zstfs-tmp.0123.a.jsonl"):
        with pytest.raises(FileNotFoundError):
            os.stat(store / name)

    def refused(fn, *args) -> None:
        with pytest.raises(PermissionError) as e:
            fn(*args)
        assert e.value.errno == errno.EPERM

    refused(os.open, store / "new.jsonl.zst", os.O_WRONLY | os.O_CREAT, 0o644)
    refused(os.open, store / "a.jsonl.zst", os.O_WRONLY | os.O_CREAT, 0o644)
    refused(os.rename, store / "plain.jsonl", store / "b.jsonl.zst")
    refused(os.rename, store / "a.jsonl", store / "a.jsonl.zst")
    refused(os.link, store / "plain.jsonl", store / "c.jsonl.zst")
    refused(os.symlink, "plain.jsonl", store / "d.jsonl.zst")
    refused(os.mkdir, store / "e.jsonl.zst")
    refused(os.open, store / ".zstfs-mine", os.O_WRONLY | os.O_CREAT, 0o644)
    refused(os.open, store / ".zstfs.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    refused(os.mkdir, store / ".zstfs")
    refused(os.rename, store / "plain.jsonl", store / ".zstfs-tmp.x")
    r = subprocess.run(["touch", str(store / "f.jsonl.zst")], capture_output=True, text=True)
    assert r.returncode != 0
    assert "not permitted" in r.stderr
    r = subprocess.run(["mv", str(store / "plain.jsonl"), str(store / "g.jsonl.zst")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    # An unrelated .zst name is an ordinary file name.
    (store / "other.txt.zst").write_bytes(b"not even zstd")
    assert (store / "other.txt.zst").read_bytes() == b"not even zstd"
    assert m.status()["recovery"]["temps_removed"] == 1
    m.stop()
    assert sorted(os.listdir(store)) == [
        ".zstfs.lock", "a.jsonl.zst", "notes.txt.zst", "other.txt.zst", "plain.jsonl"]
    assert (store / "plain.jsonl").read_bytes() == b'{"x":1}\n'


@pytest.mark.timeout(60)
def test_pattern_option_selects_the_compressed_names(store: Path,
                                                     mount_factory: MountFactory) -> None:
    """With `--pattern '*.log'`, `x.log.zst` shows as `x.log` and `x.jsonl.zst` as itself."""
    log_data = write_rollout(store / "x.log", 100_000, seed=2)
    zstd_cli(store / "x.log", "zstd")
    write_rollout(store / "y.jsonl", 100_000, seed=3)
    y_zst = zstd_cli(store / "y.jsonl", "zstd").read_bytes()
    m = mount_factory(store, "--pattern", "*.log")
    assert sorted(os.listdir(store)) == ["x.log", "y.jsonl.zst"]
    assert (store / "x.log").read_bytes() == log_data
    assert (store / "y.jsonl.zst").read_bytes() == y_zst
    with pytest.raises(FileNotFoundError):
        os.stat(store / "y.jsonl")
    with pytest.raises(PermissionError):
        os.open(store / "z.log.zst", os.O_WRONLY | os.O_CREAT, 0o644)
    (store / "z.jsonl.zst").write_bytes(b"fine here")
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "x.log.zst", "y.jsonl.zst", "z.jsonl.zst"]


@pytest.mark.timeout(60)
def test_plain_wins_over_its_zst(store: Path, mount_factory: MountFactory) -> None:
    """With both `NAME` and a different `NAME.zst` in the store, the plain one shows, once; the
    `.zst` stays hidden and is kept (it does not match, so recovery must not remove it)."""
    plain = write_rollout(store / "w.jsonl", 300_000, seed=4)
    other = write_rollout(store / "tmp" / "w.jsonl", 300_000, seed=5)
    assert not plain.startswith(other)
    os.rename(codec_compress(store / "tmp" / "w.jsonl"), store / "w.jsonl.zst")
    os.rmdir(store / "tmp")
    zst_bytes = (store / "w.jsonl.zst").read_bytes()
    m = mount_factory(store)
    assert os.listdir(store) == ["w.jsonl"]
    assert (store / "w.jsonl").read_bytes() == plain
    assert os.stat(store / "w.jsonl").st_size == len(plain)
    with pytest.raises(FileNotFoundError):
        os.stat(store / "w.jsonl.zst")
    assert m.status()["recovery"]["leftovers_kept"] == 1
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "w.jsonl", "w.jsonl.zst"]
    assert (store / "w.jsonl.zst").read_bytes() == zst_bytes


# ---------------------------------------------------------------------------------------------
# 2. writes, promotion, metadata without decoding


@pytest.mark.timeout(90)
def test_append_like_codex_promotes_once(store: Path, mount_factory: MountFactory) -> None:
    """One writer holding an O_APPEND fd (no O_CREAT) writes 50 lines: exactly one promotion,
    the file is the original plus the lines, the inode number and metadata survive, and the
    backing holds only the plain file afterwards."""
    sub = store / "sessions" / "2026" / "06" / "04"
    data = write_rollout(sub / "r.jsonl", 3 * MiB, seed=6)
    zpath = codec_compress(sub / "r.jsonl")
    os.setxattr(zpath, "user.origin", b"kept")
    owner = (os.stat(zpath).st_uid, os.stat(zpath).st_gid)
    below = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    m = mount_factory(store)
    f = sub / "r.jsonl"
    ino = os.stat(f).st_ino
    rng = random.Random(6)
    lines = []
    for i in range(50):
        pad = "x" * (100_000 if i % 10 == 3 else rng.randrange(10, 400))
        lines.append(json.dumps({"type": "event_msg", "i": i, "pad": pad}).encode() + b"\n")
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        assert backing(below, "sessions/2026/06/04") == ["r.jsonl.zst"]  # no decoding yet
        for line in lines:
            assert os.write(fd, line) == len(line)
        st = os.fstat(fd)
        assert st.st_size == len(data) + sum(map(len, lines))
    finally:
        os.close(fd)
        os.close(below)
    expected = data + b"".join(lines)
    assert f.read_bytes() == expected
    r = subprocess.run(["tail", "-n", "50", str(f)], capture_output=True, check=True)
    assert r.stdout == b"".join(lines)
    st = os.stat(f)
    assert st.st_ino == ino
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == owner
    assert os.getxattr(f, "user.origin") == b"kept"
    wait_until(lambda: m.status()["promotions"] == 1, 5, "promotions == 1")
    m.stop()
    assert os.listdir(sub) == ["r.jsonl"]
    assert (sub / "r.jsonl").read_bytes() == expected
    assert not [n for n in os.listdir(store) if n.startswith(TEMP_PREFIX)]


@pytest.mark.timeout(60)
def test_unarchive_touch_does_not_decode(store: Path, mount_factory: MountFactory) -> None:
    """Open O_WRONLY|O_APPEND, futimens, close (what codex does when it unarchives a session):
    the `.zst` stays, with the new mtime; nothing is promoted."""
    data = write_rollout(store / "t.jsonl", 2 * MiB, seed=7)
    zpath = codec_compress(store / "t.jsonl")
    zst_bytes = zpath.read_bytes()
    m = mount_factory(store)
    f = store / "t.jsonl"
    new_ns = 1_780_000_000_987_654_321
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.utime(fd, ns=(new_ns, new_ns))
        assert os.fstat(fd).st_mtime_ns == new_ns
    finally:
        os.close(fd)
    st = os.stat(f)
    assert st.st_mtime_ns == new_ns
    assert st.st_size == len(data)
    assert fresh_status(m)["promotions"] == 0
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "t.jsonl.zst"]
    assert os.stat(zpath).st_mtime_ns == new_ns
    assert zpath.read_bytes() == zst_bytes


@pytest.mark.timeout(60)
def test_chmod_chown_touch_apply_to_the_zst(store: Path, mount_factory: MountFactory) -> None:
    """chmod, chown, `touch -d` (utimens by path) and plain `touch` (open for writing, then
    UTIME_NOW) on compressed files change the `.zst`, do not decode it, and show through the
    mount."""
    data = write_rollout(store / "m.jsonl", MiB, seed=8)
    zpath = codec_compress(store / "m.jsonl")
    zst_bytes = zpath.read_bytes()
    write_rollout(store / "n.jsonl", MiB, seed=45)
    npath = zstd_cli(store / "n.jsonl", "zstd")
    m = mount_factory(store)
    f = store / "m.jsonl"
    before = time.time_ns()
    subprocess.run(["touch", str(store / "n.jsonl")], check=True)  # open O_WRONLY + UTIME_NOW
    now_ns = os.stat(store / "n.jsonl").st_mtime_ns
    assert before - 10**9 <= now_ns <= time.time_ns() + 10**9
    subprocess.run(["chmod", "640", str(f)], check=True)
    subprocess.run(["chown", "1234:2345", str(f)], check=True)
    subprocess.run(["touch", "-m", "-d", "@1600000000.5", str(f)], check=True)
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 2345)
    assert st.st_mtime_ns == 1_600_000_000_500_000_000
    assert st.st_size == len(data)
    os.setxattr(f, "user.note", b"via mount")
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "m.jsonl.zst", "n.jsonl.zst"]
    assert zpath.read_bytes() == zst_bytes
    assert os.stat(npath).st_mtime_ns == now_ns
    zst = os.stat(zpath)
    assert stat.S_IMODE(zst.st_mode) == 0o640
    assert (zst.st_uid, zst.st_gid) == (1234, 2345)
    assert zst.st_mtime_ns == 1_600_000_000_500_000_000
    assert os.getxattr(zpath, "user.note") == b"via mount"


@pytest.mark.timeout(60)
def test_truncation_promotes(store: Path, mount_factory: MountFactory) -> None:
    """O_TRUNC of a compressed file gives an empty plain file; `truncate -s N` keeps the first
    N bytes in plain form."""
    write_rollout(store / "e.jsonl", MiB, seed=9)
    codec_compress(store / "e.jsonl")
    data = write_rollout(store / "k.jsonl", MiB, seed=10)
    zstd_cli(store / "k.jsonl", "zstd")
    m = mount_factory(store)
    fd = os.open(store / "e.jsonl", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(store / "e.jsonl").st_size == 0
    assert (store / "e.jsonl").read_bytes() == b""
    subprocess.run(["truncate", "-s", "123457", str(store / "k.jsonl")], check=True)
    assert (store / "k.jsonl").read_bytes() == data[:123457]
    wait_until(lambda: m.status()["promotions"] == 2, 5, "promotions == 2")
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "e.jsonl", "k.jsonl"]
    assert (store / "e.jsonl").read_bytes() == b""
    assert (store / "k.jsonl").read_bytes() == data[:123457]


# ---------------------------------------------------------------------------------------------
# 3. namespace operations on whichever form exists


@pytest.mark.timeout(60)
def test_rename_across_directories_and_unlink(store: Path, mount_factory: MountFactory) -> None:
    """Archiving and unarchiving (rename between directories) moves the `.zst` without decoding;
    unlink of a compressed file removes its `.zst`."""
    day = store / "sessions" / "2026" / "01" / "01"
    x = write_rollout(day / "x.jsonl", 2 * MiB, seed=12)
    x_zst = codec_compress(day / "x.jsonl").read_bytes()
    write_rollout(day / "y.jsonl", MiB, seed=13)
    zstd_cli(day / "y.jsonl", "zstd")
    (store / "archived_sessions").mkdir()
    m = mount_factory(store)
    arch = store / "archived_sessions"
    subprocess.run(["mv", str(day / "x.jsonl"), str(arch / "x.jsonl")], check=True)
    assert os.listdir(arch) == ["x.jsonl"]
    assert os.listdir(day) == ["y.jsonl"]
    assert (arch / "x.jsonl").read_bytes() == x
    m.stop()
    assert os.listdir(arch) == ["x.jsonl.zst"]
    assert (arch / "x.jsonl.zst").read_bytes() == x_zst
    assert os.listdir(day) == ["y.jsonl.zst"]

    m = mount_factory(store)
    os.rename(arch / "x.jsonl", day / "x.jsonl")
    assert sorted(os.listdir(day)) == ["x.jsonl", "y.jsonl"]
    assert os.listdir(arch) == []
    subprocess.run(["rm", str(day / "y.jsonl")], check=True)
    assert os.listdir(day) == ["x.jsonl"]
    with pytest.raises(FileNotFoundError):
        os.stat(day / "y.jsonl")
    assert (day / "x.jsonl").read_bytes() == x
    m.stop()
    assert os.listdir(day) == ["x.jsonl.zst"]
    assert (day / "x.jsonl.zst").read_bytes() == x_zst
    assert os.listdir(arch) == []


@pytest.mark.timeout(60)
def test_rename_onto_an_existing_name_replaces_both_forms(
        store: Path, mount_factory: MountFactory) -> None:
    """Plain onto compressed, compressed onto plain, and compressed onto a name that has both
    forms (plain + a hidden mismatching `.zst`): exactly one form of the destination remains and
    it holds the source's bytes."""
    b = write_rollout(store / "b.jsonl", 400_000, seed=14)  # plain
    write_rollout(store / "c.jsonl", 400_000, seed=15)
    codec_compress(store / "c.jsonl")  # compressed, will be replaced by b
    a = write_rollout(store / "a.jsonl", 400_000, seed=16)
    codec_compress(store / "a.jsonl")  # compressed, will replace p
    write_rollout(store / "p.jsonl", 400_000, seed=17)  # plain
    d = write_rollout(store / "d.jsonl", 400_000, seed=18)
    d_zst = zstd_cli(store / "d.jsonl", "zstd").read_bytes()  # compressed, will replace q
    write_rollout(store / "q.jsonl", 400_000, seed=19)  # plain, with a mismatching .zst
    write_rollout(store / "tmp.jsonl", 400_000, seed=20)
    os.rename(zstd_cli(store / "tmp.jsonl", "zstd"), store / "q.jsonl.zst")
    m = mount_factory(store)
    assert m.status()["recovery"]["leftovers_kept"] == 1
    os.rename(store / "b.jsonl", store / "c.jsonl")
    os.rename(store / "a.jsonl", store / "p.jsonl")
    subprocess.run(["mv", "-f", str(store / "d.jsonl"), str(store / "q.jsonl")], check=True)
    assert sorted(os.listdir(store)) == ["c.jsonl", "p.jsonl", "q.jsonl"]
    assert (store / "c.jsonl").read_bytes() == b
    assert (store / "p.jsonl").read_bytes() == a
    assert (store / "q.jsonl").read_bytes() == d
    assert os.stat(store / "p.jsonl").st_size == len(a)
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "c.jsonl", "p.jsonl.zst", "q.jsonl.zst"]
    assert (store / "c.jsonl").read_bytes() == b
    assert (store / "q.jsonl.zst").read_bytes() == d_zst
    r = subprocess.run(["zstd", "-dc", str(store / "p.jsonl.zst")], capture_output=True,
                       check=True)
    assert r.stdout == a


@pytest.mark.timeout(60)
def test_rename_out_of_the_pattern_makes_it_plain(store: Path,
                                                  mount_factory: MountFactory) -> None:
    """`x.jsonl` (compressed) renamed to `x.txt` cannot stay compressed: it becomes plain `x.txt`
    with the same bytes; a hard link to a compressed file links the plain form."""
    x = write_rollout(store / "x.jsonl", MiB, seed=21)
    codec_compress(store / "x.jsonl")
    y = write_rollout(store / "y.jsonl", MiB, seed=22)
    zstd_cli(store / "y.jsonl", "zstd-pipe")
    m = mount_factory(store)
    os.rename(store / "x.jsonl", store / "x.txt")
    assert (store / "x.txt").read_bytes() == x
    subprocess.run(["ln", str(store / "y.jsonl"), str(store / "y-link.jsonl")], check=True)
    assert (store / "y-link.jsonl").read_bytes() == y
    assert os.stat(store / "y.jsonl").st_ino == os.stat(store / "y-link.jsonl").st_ino
    assert sorted(os.listdir(store)) == ["x.txt", "y-link.jsonl", "y.jsonl"]
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "x.txt", "y-link.jsonl", "y.jsonl"]
    assert (store / "x.txt").read_bytes() == x
    assert (store / "y.jsonl").read_bytes() == y
    assert os.stat(store / "y.jsonl").st_nlink == 2


def renameat2_exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


@pytest.mark.timeout(60)
def test_rename_exchange_of_compressed_files(store: Path, mount_factory: MountFactory) -> None:
    """renameat2(RENAME_EXCHANGE) of a compressed file with a plain one, and of two compressed
    files, swaps the contents the names show; nothing is lost or duplicated in the backing."""
    a = write_rollout(store / "a.jsonl", 500_000, seed=41)
    codec_compress(store / "a.jsonl")
    b = write_rollout(store / "b.jsonl", 500_000, seed=42)  # plain
    c = write_rollout(store / "d" / "c.jsonl", 500_000, seed=43)
    zstd_cli(store / "d" / "c.jsonl", "zstd")
    e = write_rollout(store / "d" / "e.jsonl", 500_000, seed=44)
    codec_compress(store / "d" / "e.jsonl")
    m = mount_factory(store)
    # Known to the kernel (looked up) before the exchange, as they are in real use.
    assert os.stat(store / "a.jsonl").st_size == len(a)
    assert os.stat(store / "d" / "c.jsonl").st_size == len(c)
    renameat2_exchange(store / "a.jsonl", store / "b.jsonl")
    renameat2_exchange(store / "d" / "c.jsonl", store / "d" / "e.jsonl")
    assert (store / "a.jsonl").read_bytes() == b
    assert (store / "b.jsonl").read_bytes() == a
    assert (store / "d" / "c.jsonl").read_bytes() == e
    assert (store / "d" / "e.jsonl").read_bytes() == c
    assert sorted(os.listdir(store / "d")) == ["c.jsonl", "e.jsonl"]
    m.stop()
    for name, content in (("a.jsonl", b), ("b.jsonl", a), ("d/c.jsonl", e), ("d/e.jsonl", c)):
        forms = [p for p in (store / name, store / f"{name}.zst") if p.exists()]
        assert len(forms) == 1, forms
        got = forms[0].read_bytes()
        if forms[0].suffix == ".zst":
            got = subprocess.run(["zstd", "-dc", str(forms[0])], capture_output=True,
                                 check=True).stdout
        assert got == content, name


# ---------------------------------------------------------------------------------------------
# 4. open handles across a promotion


@pytest.mark.timeout(90)
def test_open_readers_see_appends_across_promotion(store: Path,
                                                   mount_factory: MountFactory,
                                                   tmp_path: Path) -> None:
    """`tail -n0 -f` on a compressed file sees lines another process appends (the append
    promotes the file); a reader halfway through keeps reading correct bytes, then the new ones."""
    t_data = write_rollout(store / "tailed.jsonl", 2 * MiB, seed=23)
    codec_compress(store / "tailed.jsonl")
    r_data = write_rollout(store / "read.jsonl", 3 * MiB, seed=24)
    codec_compress(store / "read.jsonl")
    m = mount_factory(store)
    tailed = store / "tailed.jsonl"
    out = tmp_path / "tail.out"
    with open(out, "wb") as sink:
        tail = subprocess.Popen(["tail", "-n0", "-s", "0.1", "-f", str(tailed)], stdout=sink)
    try:
        def tail_has_it_open() -> bool:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{tail.pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{tail.pid}/fd/{fd}") == str(tailed):
                            return True
            return False

        wait_until(tail_has_it_open, 10, "tail to open the file")
        lines = [json.dumps({"type": "event_msg", "n": i}).encode() + b"\n" for i in range(5)]
        subprocess.run(append_script(tailed, lines), check=True, capture_output=True)
        wait_until(lambda: out.read_bytes() == b"".join(lines), 15, "tail -f to show the lines")
        more = [b'{"type":"event_msg","n":"later"}\n']
        subprocess.run(append_script(tailed, more), check=True, capture_output=True)
        wait_until(lambda: out.read_bytes() == b"".join(lines + more), 15,
                   "tail -f to show the later line")
    finally:
        tail.kill()
        tail.wait()
    assert tailed.read_bytes() == t_data + b"".join(lines + more)

    f = store / "read.jsonl"
    fd = os.open(f, os.O_RDONLY)
    try:
        half = bytearray()
        while len(half) < len(r_data) // 2:
            chunk = os.read(fd, 100_000)
            assert chunk
            half += chunk
        assert bytes(half) == r_data[:len(half)]
        appended = [json.dumps({"type": "response_item", "k": i}).encode() + b"\n"
                    for i in range(20)]
        subprocess.run(append_script(f, appended), check=True, capture_output=True)
        rest = bytearray()
        while chunk := os.read(fd, 100_000):
            rest += chunk
        assert bytes(half + rest) == r_data + b"".join(appended)
    finally:
        os.close(fd)
    wait_until(lambda: m.status()["promotions"] == 2, 5, "promotions == 2")
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "read.jsonl", "tailed.jsonl"]


# ---------------------------------------------------------------------------------------------
# 5. recovery and ownership


@pytest.mark.timeout(60)
def test_recovery_at_mount(store: Path, mount_factory: MountFactory) -> None:
    """Temp files are removed; a `.zst` beside a complete plain file (its prefix decodes equal)
    is removed; a mismatching one is kept hidden and the plain file shown."""
    done = write_rollout(store / "sub" / "done.jsonl", 500_000, seed=25)
    codec_compress(store / "sub" / "done.jsonl")
    grown = done + b'{"type":"event_msg","after":"promotion"}\n'
    (store / "sub" / "done.jsonl").write_bytes(grown)  # a promotion that crashed before unlink
    same = write_rollout(store / "same.jsonl", 300_000, seed=26)
    zstd_cli(store / "same.jsonl", "zstd-no-content-size")
    (store / "same.jsonl").write_bytes(same)
    diff = write_rollout(store / "diff.jsonl", 300_000, seed=27)
    write_rollout(store / "t" / "diff.jsonl", 300_000, seed=28)
    os.rename(zstd_cli(store / "t" / "diff.jsonl", "zstd"), store / "diff.jsonl.zst")
    os.rmdir(store / "t")
    (store / "diff.jsonl").write_bytes(diff)
    (store / "sub" / "short.jsonl").write_bytes(diff)
    codec_compress(store / "sub" / "short.jsonl", frame_size=64 * 1024)
    short = diff[:1000]
    (store / "sub" / "short.jsonl").write_bytes(short)  # shorter than its .zst: incomplete
    (store / f"{TEMP_PREFIX}abc.done.jsonl").write_bytes(b"partial")
    (store / "sub" / f"{TEMP_PREFIX}def.done.jsonl").write_bytes(b"partial")
    m = mount_factory(store)
    assert m.status()["recovery"] == {"temps_removed": 2, "leftovers_removed": 2,
                                      "leftovers_kept": 2}
    assert sorted(os.listdir(store)) == ["diff.jsonl", "same.jsonl", "sub"]
    assert sorted(os.listdir(store / "sub")) == ["done.jsonl", "short.jsonl"]
    assert (store / "sub" / "done.jsonl").read_bytes() == grown
    assert (store / "same.jsonl").read_bytes() == same
    assert (store / "diff.jsonl").read_bytes() == diff
    assert (store / "sub" / "short.jsonl").read_bytes() == short
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "diff.jsonl", "diff.jsonl.zst",
                                         "same.jsonl", "sub"]
    assert sorted(os.listdir(store / "sub")) == ["done.jsonl", "short.jsonl",
                                                 "short.jsonl.zst"]


@pytest.mark.timeout(60)
def test_one_owner_per_store(store: Path, mount_factory: MountFactory, tmp_path: Path) -> None:
    """A second mount of a mounted store fails and names the first daemon's PID, whether the
    store is mounted over itself or elsewhere."""
    write_rollout(store / "o.jsonl", 100_000, seed=29)
    zstd_cli(store / "o.jsonl", "zstd")
    mnt1, mnt2 = tmp_path / "mnt1", tmp_path / "mnt2"
    mnt1.mkdir()
    mnt2.mkdir()
    m = mount_factory(store, mountpoint=mnt1)
    r = subprocess.run([sys.executable, "-m", "zstfs", "mount", "--foreground", str(store),
                        str(mnt2)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert str(m.pid) in r.stderr, r.stderr
    assert os.listdir(mnt2) == []
    assert os.listdir(mnt1) == ["o.jsonl"]
    m.stop()

    m = mount_factory(store)
    r = subprocess.run([sys.executable, "-m", "zstfs", "mount", "--foreground", str(store),
                        str(mnt2)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert str(m.pid) in r.stderr, r.stderr
    assert os.listdir(mnt2) == []
    m.stop()


@pytest.mark.timeout(60)
def test_offline_commands_refuse_a_mounted_store(store: Path, mount_factory: MountFactory,
                                                 tmp_path: Path) -> None:
    """`zstfs verify|compress|expand STORE` on a mounted store are refused and change nothing,
    whether the store is mounted over itself or elsewhere."""
    data = write_rollout(store / "v.jsonl", 300_000, seed=30)
    v_zst = codec_compress(store / "v.jsonl").read_bytes()
    plain = write_rollout(store / "p.jsonl", 300_000, seed=31)
    os.utime(store / "p.jsonl", ns=(OLD_NS, OLD_NS))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for mountpoint in (store, mnt):
        m = mount_factory(store, mountpoint=mountpoint)
        for cmd in (["verify"], ["compress"], ["expand"]):
            r = subprocess.run([sys.executable, "-m", "zstfs", *cmd, str(store),
                                "--no-progress"], capture_output=True, text=True, timeout=60)
            assert r.returncode != 0, (cmd, r.stdout, r.stderr)
            assert str(m.pid) in r.stderr, (cmd, r.stderr)  # names who holds the store
            assert "Traceback" not in r.stderr, (cmd, r.stderr)
        assert sorted(os.listdir(mountpoint)) == ["p.jsonl", "v.jsonl"]
        assert (mountpoint / "v.jsonl").read_bytes() == data
        assert (mountpoint / "p.jsonl").read_bytes() == plain
        m.stop()
        assert sorted(os.listdir(store)) == [".zstfs.lock", "p.jsonl", "v.jsonl.zst"]
        assert (store / "v.jsonl.zst").read_bytes() == v_zst


# ---------------------------------------------------------------------------------------------
# 6. crash during a promotion


def big_jsonl(size: int) -> bytes:
    """~`size` bytes of compressible JSONL (a 1.5 MB block of varied lines, repeated with a
    numbered header line, so every MB differs from the next)."""
    rng = random.Random(99)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    base = b"".join(
        json.dumps({"i": i, "type": rng.choice(["response_item", "event_msg", "turn_context"]),
                    "text": " ".join(rng.choices(words, k=rng.randint(5, 40)))}).encode() + b"\n"
        for i in range(8000))
    chunks, n = [], 0
    while n < size:
        chunk = b'{"chunk":%d}\n' % len(chunks) + base
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_during_promotion_loses_nothing(store: Path, mount_factory: MountFactory) -> None:
    """SIGKILL of the daemon while it promotes a 150 MB file: after a remount every file has
    every byte, the interrupted append did not happen, and no stray name is left or shown."""
    big = big_jsonl(150 * MiB)
    (store / "big.jsonl").write_bytes(big)
    codec_compress(store / "big.jsonl", frame_size=32 * MiB)
    small = write_rollout(store / "s" / "small.jsonl", 500_000, seed=32)
    codec_compress(store / "s" / "small.jsonl")
    other = write_rollout(store / "s" / "plain.jsonl", 200_000, seed=33)
    with store_fd(store) as below:
        m = mount_factory(store)
        line = b'{"type":"event_msg","appended":true}\n'
        writer = subprocess.Popen(append_script(store / "big.jsonl", [line]),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            def temp_present() -> bool:
                return any(n.startswith(TEMP_PREFIX) for n in os.listdir(below))

            wait_until(temp_present, 60, "the promotion's temp file", interval=0.001)
            m.kill()
            # The temp is still there after the daemon died: the promotion was interrupted
            # (it renames the temp away when it completes).
            assert temp_present(), "the promotion finished before the kill; the test proved nothing"
            assert "big.jsonl.zst" in backing(below)
            assert "big.jsonl" not in backing(below)
            out, _ = writer.communicate(timeout=30)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert b"wrote" not in out  # the append never completed

        m2 = mount_factory(store)
        assert m2.status()["recovery"]["temps_removed"] == 1
        assert not [n for n in backing(below) if n.startswith(TEMP_PREFIX)]
        assert sorted(os.listdir(store)) == ["big.jsonl", "s"]
        assert sorted(os.listdir(store / "s")) == ["plain.jsonl", "small.jsonl"]
        assert os.stat(store / "big.jsonl").st_size == len(big)
        got = (store / "big.jsonl").read_bytes()
        assert got == big  # not big + line: that write never completed
        del got
        assert (store / "s" / "small.jsonl").read_bytes() == small
        assert (store / "s" / "plain.jsonl").read_bytes() == other
        # The file is still usable: the append now works.
        subprocess.run(append_script(store / "big.jsonl", [line]), check=True,
                       capture_output=True)
        assert os.stat(store / "big.jsonl").st_size == len(big) + len(line)
        with open(store / "big.jsonl", "rb") as fh:
            fh.seek(len(big) - 1000)
            assert fh.read() == big[-1000:] + line
        m2.stop()
    names = sorted(os.listdir(store))
    assert names == [".zstfs.lock", "big.jsonl", "s"]
    h = hashlib.sha256()
    with open(store / "big.jsonl", "rb") as fh:
        while block := fh.read(8 * MiB):
            h.update(block)
    assert h.digest() == hashlib.sha256(big + line).digest()


# ---------------------------------------------------------------------------------------------
# 7. damage


@pytest.mark.timeout(60)
def test_corrupt_zst_reads_as_eio(store: Path, mount_factory: MountFactory) -> None:
    """A bit-flipped frame, a truncated file and garbage named `.zst` read as EIO, never as
    wrong bytes; the rest of the mount keeps working."""
    flipped = write_rollout(store / "flipped.jsonl", 3 * MiB + 100_000, seed=34)
    zpath = codec_compress(store / "flipped.jsonl")
    frames = seekable_frames(zpath)
    assert len(frames) == 5  # a small head frame, three full ones, the small tail frame
    start, size = frames[2]  # the one holding MiB + MiB // 2
    raw = bytearray(zpath.read_bytes())
    mid = start + size // 2
    raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])
    zpath.write_bytes(bytes(raw))
    os.utime(zpath, ns=(OLD_NS, OLD_NS))

    truncated = write_rollout(store / "truncated.jsonl", 3 * MiB, seed=35)
    tpath = codec_compress(store / "truncated.jsonl")
    os.truncate(tpath, tpath.stat().st_size * 6 // 10)

    (store / "garbage.jsonl.zst").write_bytes(random.Random(36).randbytes(200_000))
    good = write_rollout(store / "good.jsonl", MiB, seed=37)
    zstd_cli(store / "good.jsonl", "zstd")

    m = mount_factory(store, expect_errors=r"(garbage|truncated|flipped)\.jsonl: damaged \.zst")
    assert sorted(os.listdir(store)) == ["flipped.jsonl", "garbage.jsonl", "good.jsonl",
                                         "truncated.jsonl"]
    for name, original in (("flipped.jsonl", flipped), ("truncated.jsonl", truncated),
                           ("garbage.jsonl", None)):
        f = store / name
        r = subprocess.run(["cat", str(f)], capture_output=True)
        assert r.returncode != 0, name
        assert b"Input/output error" in r.stderr, (name, r.stderr)
        got, err = read_until_error(f)
        assert err is not None, name
        assert err.errno == errno.EIO, (name, err)
        if original is None:
            assert got == b""
        else:
            assert original.startswith(got), f"{name}: wrong bytes before the error"
            assert original.startswith(r.stdout), f"{name}: cat printed wrong bytes"
    # The first frame of the bit-flipped file is intact and still reads; its second does not.
    fd = os.open(store / "flipped.jsonl", os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, 5000) == flipped[5000:6000]
        with pytest.raises(OSError, match="Input/output error") as e:
            os.pread(fd, 1000, MiB + MiB // 2)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    # The rest of the mount is fine.
    assert (store / "good.jsonl").read_bytes() == good
    assert len(os.listdir(store)) == 4
    wait_until(lambda: m.status()["corrupt_reads"] >= 3, 5, "corrupt_reads >= 3")
    m.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "flipped.jsonl.zst",
                                         "garbage.jsonl.zst", "good.jsonl.zst",
                                         "truncated.jsonl.zst"]


# ---------------------------------------------------------------------------------------------
# 8. disk usage


@pytest.mark.timeout(60)
def test_du_shows_real_usage_and_ls_logical_sizes(store: Path,
                                                  mount_factory: MountFactory) -> None:
    """`du` through the mount is the backing's real usage; `du --apparent-size` and `ls -l` show
    the logical sizes."""
    sizes: dict[str, int] = {}
    for i, how in enumerate(["codec", "zstd", "codec", "zstd-pipe", "codec", "zstd"]):
        rel = f"sessions/2026/06/0{i % 3 + 1}/r{i}.jsonl"
        sizes[rel] = len(write_rollout(store / rel, 2 * MiB + i * 100_000, seed=40 + i))
        compress(store / rel, how)

    def du(*args: str) -> int:
        r = subprocess.run(["du", "-s", *args, str(store)], capture_output=True, text=True,
                           check=True)
        return int(r.stdout.split()[0])

    real_before = du("-B1")
    apparent_before = du("-b")
    stored = sum(os.stat(f"{store}/{rel}.zst").st_size for rel in sizes)
    m = mount_factory(store)
    real = du("-B1")
    apparent = du("-b")
    logical = sum(sizes.values())
    assert abs(real - real_before) <= 8192, (real, real_before)  # only the hidden lock differs
    assert real < logical / 2
    # Apparent size: the directories as before, each file counted with its logical size.
    assert apparent == apparent_before - stored + logical, (apparent, apparent_before)
    for rel, size in sizes.items():
        r = subprocess.run(["ls", "-l", str(store / rel)], capture_output=True, text=True,
                           check=True)
        assert int(r.stdout.split()[4]) == size, r.stdout
    r = subprocess.run(["find", str(store), "-type", "f"], capture_output=True, text=True,
                       check=True)
    assert sorted(os.path.relpath(p, store) for p in r.stdout.split()) == sorted(sizes)
    m.stop()
