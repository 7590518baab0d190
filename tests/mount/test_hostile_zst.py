"""Hostile and foreign `.zst` files through a real mount.

Each test builds its backing store before mounting (as a user's store would be), mounts it with
the real CLI and reads through the mount from other processes, the way `cat`, `tail` and codex do.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.mount import MountFactory
from harness.zstfiles import frame_claiming, reference, seekable, text

from zstfs import codec
from zstfs.names import NameRules
from zstfs.store import Store

MiB = 1 << 20
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def read_at(path: Path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def read_error(path: Path, offset: int = 0, n: int = 1 << 20) -> int | None:
    try:
        read_at(path, offset, n)
    except OSError as e:
        return e.errno
    return None


def long_window_file(path: Path, block: bytes, gap: int, *, stdin: bool) -> bytes:
    """``block``, ``gap`` zero bytes, ``block`` again, compressed with `zstd --long=30`: the second
    block matches the first only with a window of more than ``gap`` bytes."""
    data = block + bytes(gap) + block
    if stdin:
        blob = subprocess.run(["zstd", "-q", "-1", "--long=30", "-c"], input=data,
                              capture_output=True, check=True).stdout
        path.write_bytes(blob)
    else:
        plain = path.with_suffix(".plain")
        plain.write_bytes(data)
        subprocess.run(["zstd", "-q", "-1", "--long=30", "-f", str(plain), "-o", str(path)],
                       check=True)
        plain.unlink()
    return data


READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
try:
    data = os.pread(fd, 65536, size - 65536)
except OSError as e:
    print(f"errno={e.errno}", file=sys.stderr)
    sys.exit(3)
sys.stderr.write("read\\n")
sys.stderr.flush()
sys.stdin.read()  # hold the file open until every reader has read
sys.stdout.buffer.write(data)
"""


def readers_near_end(path: Path, n: int,
                     while_open: Callable[[], None] | None = None,
                     ) -> list[subprocess.CompletedProcess[bytes]]:
    """``n`` processes read the last 64 KiB of ``path`` at once and keep it open until all have
    read; ``while_open`` runs then (while every one still holds it)."""
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]
    first = []
    for p in procs:
        assert p.stderr is not None
        first.append(p.stderr.readline())  # "read", or the error line (the process then exits)
    if while_open is not None:
        while_open()
    out = []
    for p, line in zip(procs, first, strict=True):
        stdout, stderr = p.communicate(b"", timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, line + stderr))
    return out


# --------------------------------------------------------------------------------------------
# memory bounded by the decoder budget, whatever the number of readers


@needs_zstd
def test_long_window_file_read_by_many_processes_keeps_rss_bounded(
        store: Path, mount_factory: MountFactory) -> None:
    """A `--long=30` file whose window (~100 MB) fits the budget: six processes read its end at
    once; all get the right bytes and the daemon's peak RSS stays under 200 MB."""
    block = random.Random(1).randbytes(2 * MiB)
    data = long_window_file(store / "wide.jsonl.zst", block, 96 * MiB, stdin=False)
    m = mount_factory(store)
    peak: list[int] = []
    results = readers_near_end(store / "wide.jsonl", 6,
                               while_open=lambda: peak.append(vm_hwm(m.pid)))
    for r in results:
        assert r.returncode == 0, r.stderr
        assert r.stdout == data[-65536:]
    assert peak[0] <= 200 * 10**6


@needs_zstd
@pytest.mark.parametrize("stdin", [False, True], ids=["content-size", "no-content-size"])
def test_window_beyond_the_budget_is_eio_with_one_log_line(
        store: Path, mount_factory: MountFactory, stdin: bool) -> None:
    block = random.Random(2).randbytes(MiB)
    long_window_file(store / "huge.jsonl.zst", block, 300 * MiB, stdin=stdin)
    (store / "ok.jsonl").write_bytes(b"fine\n")
    m = mount_factory(store, expect_errors=r"huge\.jsonl: cannot decode \.zst: .* decoding window")
    assert sorted(os.listdir(store)) == ["huge.jsonl", "ok.jsonl"]  # the directory lists
    results = readers_near_end(store / "huge.jsonl", 4)
    for r in results:
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert f"errno={errno.EIO}".encode() in r.stderr
    assert vm_hwm(m.pid) <= 200 * 10**6
    lines = [line for line in m.log_text().splitlines()
             if "huge.jsonl" in line and "--long=" in line]
    assert len(lines) == 1, m.log_text()
    bits = "--long=29" if not stdin else "--long=30"  # zstd sizes the window to the input
    assert bits in lines[0]
    assert (store / "ok.jsonl").read_bytes() == b"fine\n"


# --------------------------------------------------------------------------------------------
# a big single frame reads linearly


@needs_zstd
def test_single_frame_cat_equals_zstdcat(tmp_path: Path, store: Path,
                                         mount_factory: MountFactory) -> None:
    data = text(40 * MiB, 3)
    plain = tmp_path / "big.jsonl"
    plain.write_bytes(data)
    subprocess.run(["zstd", "-q", "-3", str(plain), "-o", str(store / "big.jsonl.zst")],
                   check=True)
    expected = hashlib.sha256(subprocess.run(["zstdcat", str(store / "big.jsonl.zst")],
                                             capture_output=True, check=True).stdout).hexdigest()
    mount_factory(store)
    out = subprocess.run(["cat", str(store / "big.jsonl")], capture_output=True, check=True,
                         timeout=120).stdout
    assert hashlib.sha256(out).hexdigest() == expected
    # tail, then head again: random reads into the same frame are still right.
    tail = subprocess.run(["tail", "-c", "5000", str(store / "big.jsonl")], capture_output=True,
                          check=True, timeout=120).stdout
    assert tail == data[-5000:]
    assert read_at(store / "big.jsonl", 12345, 1000) == data[12345:13345]


def room_for_copies(path: Path, size: int) -> bool:
    """Whether the daemon will copy a decoded frame of ``size`` bytes there (codec.Decoders)."""
    sv = os.statvfs(path)
    return (sv.f_bavail * sv.f_frsize - size
            >= max(sv.f_blocks * sv.f_frsize * codec.SPILL_FREE_SHARE, codec.SPILL_MIN_FREE))


@needs_zstd
def test_single_frame_is_decoded_once_into_an_unnamed_copy(tmp_path: Path, store: Path,
                                                           mount_factory: MountFactory) -> None:
    """The check before serving a never-seen big frame keeps what it decodes (in an O_TMPFILE in
    the store, invisible and gone with the daemon): cat, tail and random reads are served from it,
    and a frame whose checksum fails leaves no copy and serves no byte."""
    if not room_for_copies(store, 80 * MiB):
        pytest.skip("not enough free space for the daemon's decoded copies")
    data = text(40 * MiB, 9)
    plain = tmp_path / "big.jsonl"
    plain.write_bytes(data)
    subprocess.run(["zstd", "-q", "-3", str(plain), "-o", str(store / "big.jsonl.zst")],
                   check=True)
    bad = bytearray((store / "big.jsonl.zst").read_bytes())
    bad[-1] ^= 0x10  # its content checksum: only a check of the whole frame sees it
    (store / "bad.jsonl.zst").write_bytes(bytes(bad))
    before = sorted(os.listdir(store))
    m = mount_factory(store, expect_errors=r"bad\.jsonl: damaged \.zst: .*checksum")
    assert m.status()["decoded_copies"] == {"files": 0, "bytes": 0}
    for name in ("bad.jsonl", "bad.jsonl"):  # again: still EIO, from the remembered failure
        r = subprocess.run(["cat", str(store / name)], capture_output=True, timeout=120)
        assert r.returncode != 0
        assert r.stdout == b""  # not one byte of a frame that failed its check
        assert b"Input/output error" in r.stderr
        assert read_error(store / name, 20 * MiB, 4096) == errno.EIO
    assert m.status()["decoded_copies"] == {"files": 0, "bytes": 0}
    out = subprocess.run(["cat", str(store / "big.jsonl")], capture_output=True, check=True,
                         timeout=120).stdout
    assert out == data
    assert m.status()["decoded_copies"] == {"files": 1, "bytes": len(data)}
    tail = subprocess.run(["tail", "-c", "7000", str(store / "big.jsonl")],
                          capture_output=True, check=True, timeout=120).stdout
    assert tail == data[-7000:]
    rng = random.Random(3)
    for _ in range(50):
        off = rng.randrange(len(data))
        assert read_at(store / "big.jsonl", off, 5000) == data[off : off + 5000]
    m.kill()  # even killed, the daemon leaves nothing behind: the copy never had a name
    assert sorted(set(os.listdir(store)) - {".zstfs.lock"}) == before


# --------------------------------------------------------------------------------------------
# a lying seek table is EIO, never short or shifted data


def test_lying_seek_table_is_eio(store: Path, mount_factory: MountFactory) -> None:
    chunks = [text(MiB, i) for i in range(6)]
    short = [len(c) for c in chunks]
    short[2] = 0  # the table "loses" a frame: 1 MiB missing in the middle
    (store / "short.jsonl.zst").write_bytes(
        seekable(chunks, checksum=False, size=False, claims=short))
    off = [len(c) for c in chunks]
    off[1] -= 5000  # one frame 5,000 bytes short
    (store / "shifted.jsonl.zst").write_bytes(
        seekable(chunks, checksum=False, size=False, claims=off))
    mount_factory(store, expect_errors=r"(short|shifted)\.jsonl: damaged \.zst")
    for name in ("short.jsonl", "shifted.jsonl"):
        r = subprocess.run(["cat", str(store / name)], capture_output=True, timeout=60)
        assert r.returncode != 0, name
        assert b"Input/output error" in r.stderr
        r = subprocess.run(["tail", "-c", "3000", str(store / name)], capture_output=True,
                           timeout=60)
        assert r.returncode != 0, name
    # Before the lie, the bytes are the true ones.
    assert read_at(store / "shifted.jsonl", 0, 4096) == chunks[0][:4096]


# --------------------------------------------------------------------------------------------
# absurd content sizes; empty files, damage counted once, recovery keeps damage


def test_content_size_beyond_2_63_still_lists(store: Path, mount_factory: MountFactory) -> None:
    (store / "absurd.jsonl.zst").write_bytes(frame_claiming(2**63 + 5))
    (store / "good.jsonl").write_bytes(b"good\n")
    mount_factory(store, expect_errors=r"absurd\.jsonl: damaged \.zst: .*beyond 2\*\*63")
    assert sorted(os.listdir(store)) == ["absurd.jsonl", "good.jsonl"]
    assert os.stat(store / "absurd.jsonl").st_size == len(frame_claiming(0))  # its stored size
    r = subprocess.run(["ls", "-l", str(store)], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert read_error(store / "absurd.jsonl") == errno.EIO


def test_empty_zst_is_eio(store: Path, mount_factory: MountFactory) -> None:
    (store / "empty.jsonl.zst").write_bytes(b"")
    mount_factory(store, expect_errors=r"empty\.jsonl(\.zst)?: damaged \.zst: not zstd: empty")
    assert os.stat(store / "empty.jsonl").st_size == 0
    assert read_error(store / "empty.jsonl") == errno.EIO


def test_damaged_files_are_counted_once_from_first_seen(store: Path,
                                                        mount_factory: MountFactory) -> None:
    for i in range(5):
        (store / f"bad{i}.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage" * (i + 1))
    (store / "zero.jsonl.zst").write_bytes(b"")
    m = mount_factory(store, expect_errors=r"(zero|bad\d)\.jsonl(\.zst)?: damaged \.zst")
    first = m.status()["damaged_files"]
    assert first == 6
    for name in sorted(os.listdir(store)):
        os.stat(store / name)
        assert read_error(store / name) == errno.EIO
    assert m.status()["damaged_files"] == 6


def test_recovery_keeps_a_damaged_zst_beside_its_plain_twin(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"plain\n")
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd not really")
    s = Store.open(str(tmp_path), NameRules("*.jsonl"))
    try:
        report = s.recover()
    finally:
        s.close()
    assert (report.leftovers_removed, report.leftovers_kept) == (0, 1)
    assert (tmp_path / "a.jsonl.zst").exists()


# --------------------------------------------------------------------------------------------
# the name limit


def test_name_limit(store: Path, mount_factory: MountFactory) -> None:
    mount_factory(store)
    assert os.statvfs(store).f_namemax == 255
    for n in (251, 252, 255):
        name = "r" * (n - len(".jsonl")) + ".jsonl"
        (store / name).write_bytes(b"x\n")
        assert (store / name).read_bytes() == b"x\n"
        other = "o" * n
        (store / other).write_bytes(b"y\n")
        assert (store / other).read_bytes() == b"y\n"
    for name in ("z" * 256, "z" * 250 + ".jsonl" * 2, "q" * 1000):
        with pytest.raises(OSError, match="too long") as e:
            os.stat(store / name)
        assert e.value.errno == errno.ENAMETOOLONG, name
        with pytest.raises(OSError, match="too long") as e:
            (store / name).write_bytes(b"no")
        assert e.value.errno == errno.ENAMETOOLONG, name


def zeros_bomb(size: int, *, stated: bool) -> bytes:
    """A valid zstd frame of ``size`` zero bytes from RLE blocks (4 bytes per 128 KiB): 20 GiB in
    ~640 KB, like the issue's bomb."""
    block = 128 << 10
    header = struct.pack("<IB", 0xFD2FB528, 0xC0 if stated else 0x00) + bytes([0x38])
    if stated:
        header += struct.pack("<Q", size)
    n, rest = divmod(size, block)
    rle = (2 | (block << 3)).to_bytes(3, "little") + b"\0"
    last = (1 | 2 | ((rest or block) << 3)).to_bytes(3, "little") + b"\0"
    return header + rle * (n - (0 if rest else 1)) + last


@pytest.mark.parametrize("stated", [True, False], ids=["content-size", "no-content-size"])
def test_zeros_bomb_is_refused_quickly(store: Path, mount_factory: MountFactory,
                                       stated: bool) -> None:
    """A 20 GiB "zeros bomb": listing works, a small read at its start or end is EIO after at
    most MAX_FRAME_DECODE of work (bounded here by the subprocess timeout), never minutes."""
    small = (3 << 17) + 5  # the same construction, small: a valid frame of zeros
    assert reference(zeros_bomb(small, stated=stated)) == bytes(small)
    (store / "bomb.jsonl.zst").write_bytes(zeros_bomb(20 << 30, stated=stated))
    m = mount_factory(store, expect_errors=r"bomb\.jsonl: cannot decode \.zst")
    assert os.listdir(store) == ["bomb.jsonl"]
    for cmd in (["head", "-c", "100"], ["tail", "-c", "100"]):
        r = subprocess.run([*cmd, str(store / "bomb.jsonl")], capture_output=True, timeout=60)
        assert r.returncode != 0, cmd
        assert b"Input/output error" in r.stderr, r.stderr
    assert any("bomb.jsonl" in line and "zstd -d" in line for line in m.errors()), m.log_text()
