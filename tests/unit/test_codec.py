"""Tests for zstfs.codec: round trips, random access, foreign files, interop, damage, threads."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zstfs import codec
from zstfs.codec import CodecParams, CorruptError, Decoders, ZstReader
from zstfs.codec.format import one_shot_decompressor

SMALL = CodecParams(frame_size=4096)
HAS_ZSTD = shutil.which("zstd") is not None
needs_zstd = pytest.mark.skipif(not HAS_ZSTD, reason="zstd CLI not installed")
HYPO = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def text_data(n: int, seed: int = 0) -> bytes:
    """Compressible, line-structured bytes (like JSONL) of exactly ``n`` bytes."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b'"type":"event_msg"', b"gamma", b"{", b"}", b"delta", b"0123"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) for _ in range(rng.randrange(1, 30))) + b"\n"
        if rng.random() < 0.05:
            out += os.urandom(rng.randrange(1, 200))
    return bytes(out[:n])


class Files:
    """Writes files into the test's tmp_path and opens fds that are closed at teardown; `dec`,
    the test's own decoders (each test starts cold, so a cached index or frame cannot hide a
    bug)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: list[int] = []
        self.count = 0
        self.dec = Decoders()

    def path(self, suffix: str = "") -> Path:
        self.count += 1
        return self.root / f"f{self.count}{suffix}"

    def write(self, data: bytes, suffix: str = "") -> Path:
        path = self.path(suffix)
        path.write_bytes(data)
        return path

    def open(self, path: Path, flags: int = os.O_RDONLY) -> int:
        fd = os.open(path, flags, 0o644)
        self.fds.append(fd)
        return fd

    def compress(self, data: bytes, params: CodecParams = SMALL) -> Path:
        src = self.open(self.write(data, ".plain"))
        dst_path = self.path(".zst")
        dst = self.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        logical, stored = codec.compress_file(src, dst, params)
        assert logical == len(data)
        assert stored == dst_path.stat().st_size
        return dst_path

    def close(self) -> None:
        self.dec.clear()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Files]:
    f = Files(tmp_path)
    yield f
    f.close()


def decompress(files: Files, zst: Path) -> bytes:
    out = files.path(".out")
    n = codec.decompress_file(files.open(zst), files.open(out, os.O_WRONLY | os.O_CREAT))
    data = out.read_bytes()
    assert n == len(data)
    return data


def check_roundtrip(files: Files, zst: Path, data: bytes) -> None:
    """Every public entry point agrees that ``zst`` holds ``data``."""
    fd = files.open(zst)
    assert codec.verify_file(fd) == len(data)
    assert decompress(files, zst) == data
    codec.verify_equal(fd, files.open(files.write(data)))
    reader = ZstReader(fd, files.dec)
    assert reader.size == len(data) == codec.logical_size(fd, files.dec)
    assert reader.read(0, len(data) + 10) == data


def zstd_cli(files: Files, args: list[str], stdin: bytes) -> bytes:
    done = subprocess.run(["zstd", "-q", *args], input=stdin, capture_output=True, check=True)
    return done.stdout


# --------------------------------------------------------------------------------------------
# Round trips and random access


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 1, 100_000])
def test_roundtrip_sizes(files: Files, n: int) -> None:
    data = text_data(n, seed=n)
    zst = files.compress(data)
    check_roundtrip(files, zst, data)
    assert ZstReader(files.open(zst), files.dec).seekable


def seek_table_sizes(zst: Path) -> list[int]:
    """The decompressed sizes listed in a seekable file's seek table."""
    raw = zst.read_bytes()
    count, descriptor = struct.unpack_from("<IB", raw, len(raw) - 9)
    entry = 12 if descriptor & 0x80 else 8
    start = len(raw) - 9 - count * entry
    return [struct.unpack_from("<II", raw, start + i * entry)[1] for i in range(count)]


@pytest.mark.parametrize(("n", "expected"), [
    (4096, [4096]),  # one frame: no split, small files keep a single frame's ratio
    (4097, [512, 3073, 512]),
    (2 * 4096, [512, 4096, 3072, 512]),
    (2 * 4096 + 612, [512, 4096, 4096, 100]),
    (2 * 4096 + 2512, [512, 4096, 4096, 1488, 512]),
])
def test_multi_frame_files_start_and_end_with_a_small_frame(files: Files, n: int,
                                                            expected: list[int]) -> None:
    """Reading the start (codex's session_meta, head) or the end of a file (tail, less +G,
    codex's reverse scan) decodes a small frame."""
    data = text_data(n, seed=n)
    zst = files.compress(data)
    assert seek_table_sizes(zst) == expected
    check_roundtrip(files, zst, data)


@HYPO
@given(data=st.binary(max_size=30_000), frame_size=st.integers(1, 5000))
def test_roundtrip_hypothesis(files: Files, data: bytes, frame_size: int) -> None:
    zst = files.compress(data, CodecParams(frame_size=frame_size))
    check_roundtrip(files, zst, data)


@HYPO
@given(
    n=st.integers(0, 40_000),
    reads=st.lists(st.tuples(st.integers(0, 45_000), st.integers(0, 20_000)), max_size=30),
)
def test_random_reads(files: Files, n: int, reads: list[tuple[int, int]]) -> None:
    data = text_data(n, seed=n)
    reader = ZstReader(files.open(files.compress(data)), files.dec)
    for offset, length in reads:
        assert reader.read(offset, length) == data[offset : offset + length]


def test_read_edges(files: Files) -> None:
    data = text_data(5 * 4096 + 7)
    reader = ZstReader(files.open(files.compress(data)), files.dec)
    for offset, length in [
        (0, 0),
        (4095, 2),
        (4096, 4096),
        (4000, 9000),
        (len(data), 5),
        (len(data) - 1, 100),
        (10**9, 1),
        (0, 10**9),
    ]:
        assert reader.read(offset, length) == data[offset : offset + length]
    with pytest.raises(ValueError, match="negative"):
        reader.read(-1, 1)


def test_read_cached(files: Files) -> None:
    data = text_data(3 * 4096 + 100)
    reader = ZstReader(files.open(files.compress(data)), files.dec)
    assert reader.read_cached(5000, 100) is None  # nothing indexed or decoded yet
    assert reader.read(5000, 100) == data[5000:5100]
    assert reader.read_cached(5000, 100) == data[5000:5100]
    assert reader.read_cached(4608, 4096) == data[4608:8704]  # frames: 512, 4096, 4096, ...
    assert reader.read_cached(100, 10) is None  # frame 0 not decoded
    assert reader.read_cached(len(data) + 1, 10) == b""


def test_cache_shared_between_readers(files: Files) -> None:
    data = text_data(3 * 4096)
    zst = files.compress(data)
    assert ZstReader(files.open(zst), files.dec).read(0, 10) == data[:10]
    reader = ZstReader(files.open(zst), files.dec)
    assert reader.read_cached(0, 512) == data[:512]  # the head frame


def test_progress_and_empty(files: Files) -> None:
    data = text_data(10 * 4096 + 1)
    seen: list[int] = []
    src = files.open(files.write(data))
    dst = files.open(files.path(".zst"), os.O_WRONLY | os.O_CREAT)
    codec.compress_file(src, dst, SMALL, progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == len(data)
    empty = files.compress(b"")
    assert empty.stat().st_size == 17  # seek table only
    check_roundtrip(files, empty, b"")


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="frame_size"):
        CodecParams(frame_size=0)
    with pytest.raises(ValueError, match="window_log"):
        CodecParams(window_log=40)


# --------------------------------------------------------------------------------------------
# Foreign files and interop


@needs_zstd
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda z: z(["-3", "-c", "-"]), id="zstd-3-stdin"),  # no content size
        pytest.param(lambda z: z(["--no-content-size", "-c", "-"]), id="no-content-size"),
        pytest.param(lambda z: z(["-3", "--no-check", "-c", "-"]), id="no-checksum"),
        pytest.param(lambda z: z(["--long=27", "-19", "-c", "-"]), id="long-19"),
    ],
)
def test_foreign_single_frame(files: Files, make: Callable[..., bytes]) -> None:
    data = text_data(300_000)
    blob = make(lambda args: zstd_cli(files, args, data))
    check_roundtrip(files, files.write(blob), data)


@needs_zstd
def test_foreign_file_with_content_size(files: Files) -> None:
    data = text_data(200_000)
    plain = files.write(data)
    subprocess.run(["zstd", "-q", "-3", str(plain), "-o", f"{plain}.zst"], check=True)
    check_roundtrip(files, Path(f"{plain}.zst"), data)
    assert not ZstReader(files.open(Path(f"{plain}.zst")), files.dec).seekable


def skippable(payload: bytes, magic: int = 0x184D2A50) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


@needs_zstd
def test_foreign_concatenated_and_skippable(files: Files) -> None:
    a, b, c = text_data(70_000, 1), text_data(50_000, 2), text_data(1, 3)
    za = zstd_cli(files, ["-c", "-"], a)  # no content size
    plain_b = files.write(b)
    zb = subprocess.run(["zstd", "-q", "-c", str(plain_b)], capture_output=True, check=True).stdout
    zc = zstd_cli(files, ["-c", "-"], c)
    blob = skippable(b"hello") + za + skippable(b"", 0x184D2A5F) + zb + zc + skippable(b"x" * 9)
    path = files.write(blob)
    check_roundtrip(files, path, a + b + c)
    reader = ZstReader(files.open(path), files.dec)
    full = a + b + c
    for offset in (0, 69_999, 70_000, 119_999, 120_000, 120_001):
        assert reader.read(offset, 3) == full[offset : offset + 3]


@needs_zstd
def test_our_files_with_zstd_cli(files: Files) -> None:
    for n in (0, 1, 50_000):
        data = text_data(n)
        zst = files.compress(data)
        subprocess.run(["zstd", "-q", "-t", str(zst)], check=True)
        out = subprocess.run(["zstd", "-q", "-d", "-c", str(zst)], capture_output=True, check=True)
        assert out.stdout == data
        out = subprocess.run(["zstdcat", str(zst)], capture_output=True, check=True)
        assert out.stdout == data


def test_our_files_with_pyzstd(files: Files) -> None:
    pyzstd = pytest.importorskip("pyzstd", reason="pyzstd is the independent seekable reader")
    data = text_data(50_000)
    zst = files.compress(data)
    with pyzstd.SeekableZstdFile(zst) as f:
        assert f.read() == data
        f.seek(30_000)
        assert f.read(5000) == data[30_000:35_000]
        f.seek(100)
        assert f.read(10) == data[100:110]
    with pyzstd.SeekableZstdFile(files.compress(b"")) as f:
        assert f.read() == b""


def test_pyzstd_written_seekable(files: Files) -> None:
    """A seekable file from another writer (pyzstd/libzstd seekable) reads correctly."""
    pyzstd = pytest.importorskip("pyzstd", reason="pyzstd writes seekable files too")
    data = text_data(60_000)
    path = files.path(".zst")
    with pyzstd.SeekableZstdFile(path, "w", max_frame_content_size=5000) as f:
        f.write(data)
    check_roundtrip(files, path, data)
    assert ZstReader(files.open(path), files.dec).seekable


# --------------------------------------------------------------------------------------------
# Damage


def table_entries_offset(blob: bytes) -> tuple[int, int]:
    """(offset of the first seek table entry, number of frames) of one of our files."""
    count = struct.unpack_from("<I", blob, len(blob) - 9)[0]
    return len(blob) - 9 - 12 * count, count


def set_entry(blob: bytes, i: int, field: int, value: int) -> bytes:
    at, _count = table_entries_offset(blob)
    out = bytearray(blob)
    struct.pack_into("<I", out, at + 12 * i + 4 * field, value)
    return bytes(out)


def get_entry(blob: bytes, i: int, field: int) -> int:
    at, _count = table_entries_offset(blob)
    return int(struct.unpack_from("<I", blob, at + 12 * i + 4 * field)[0])


def flip(blob: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(blob)
    out[offset] ^= 1 << bit
    return bytes(out)


def frame0_size(blob: bytes) -> int:
    return get_entry(blob, 0, 0)


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncate-1": lambda b: b[:-1],
    "truncate-footer": lambda b: b[:-5],
    "truncate-in-table": lambda b: b[:-20],
    "truncate-mid-frame": lambda b: b[: frame0_size(b) + 10],
    "truncate-in-header": lambda b: b[:3],
    "truncate-after-magic": lambda b: b[:6],
    "flip-frame-data": lambda b: flip(b, frame0_size(b) + 40, 3),
    "flip-frame-checksum": lambda b: flip(b, frame0_size(b) - 1),
    "flip-table-count": lambda b: flip(b, len(b) - 9),
    "flip-table-descriptor": lambda b: flip(b, len(b) - 5, 7),
    "flip-table-entry-checksum": lambda b: flip(b, table_entries_offset(b)[0] + 8),
    "flip-table-entry-size": lambda b: flip(b, table_entries_offset(b)[0] + 12 + 4),
    "lying-decompressed-size": lambda b: set_entry(b, 1, 1, get_entry(b, 1, 1) - 1),
    "lying-compressed-size": lambda b: set_entry(
        set_entry(b, 0, 0, get_entry(b, 0, 0) + 1), 1, 0, get_entry(b, 1, 0) - 1
    ),
    "swapped-entries": lambda b: set_entry(
        set_entry(b, 0, 0, get_entry(b, 1, 0)), 1, 0, get_entry(b, 0, 0)
    ),
    "garbage": lambda b: b"\x00garbage" + os.urandom(500),
    "empty": lambda b: b"",
}

STRUCTURAL = {k for k in DAMAGE if not k.startswith("flip-frame")}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_detected(files: Files, case: str) -> None:
    data = text_data(5 * 4096 + 123, seed=7)
    good = files.compress(data).read_bytes()
    bad = DAMAGE[case](good)
    assert bad != good
    path = files.write(bad)
    with pytest.raises(CorruptError):
        codec.verify_file(files.open(path))
    with pytest.raises(CorruptError):
        decompress(files, path)
    with pytest.raises(CorruptError):
        codec.verify_equal(files.open(path), files.open(files.write(data)))
    files.dec.clear()
    with pytest.raises(CorruptError):
        ZstReader(files.open(path), files.dec).read(0, len(data))
    files.dec.clear()
    if case in STRUCTURAL:
        with pytest.raises(CorruptError):
            _ = ZstReader(files.open(path), files.dec).size
    # Whatever part still reads must be the right bytes.
    files.dec.clear()
    reader = ZstReader(files.open(path), files.dec)
    rng = random.Random(case)
    for _ in range(50):
        offset, length = rng.randrange(len(data)), rng.randrange(1, 9000)
        try:
            got = reader.read(offset, length)
        except CorruptError:
            continue
        assert got == data[offset : offset + length]


def test_corrupt_error_says_where(files: Files) -> None:
    good = files.compress(text_data(3 * 4096)).read_bytes()
    with pytest.raises(CorruptError, match="offset"):
        codec.verify_file(files.open(files.write(good[:-30])))


# --------------------------------------------------------------------------------------------
# Concurrency and the big-frame streaming path


def test_concurrent_readers(files: Files) -> None:
    data = text_data(40 * 4096 + 5, seed=3)
    reader = ZstReader(files.open(files.compress(data)), files.dec)
    files.dec.frames.set_limit(64 * 1024)  # force evictions and re-decodes

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            offset, length = rng.randrange(len(data)), rng.randrange(0, 20_000)
            assert reader.read(offset, length) == data[offset : offset + length]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(16)))


def test_one_shot_contexts_are_kept_per_thread() -> None:
    """Whole-frame decodes reuse their thread's context, and never share one across threads
    (test_concurrent_readers decodes with them from eight threads at once)."""
    mine = one_shot_decompressor()
    assert one_shot_decompressor() is mine
    with ThreadPoolExecutor(1) as pool:
        theirs = pool.submit(one_shot_decompressor).result()
    assert theirs is not mine


@pytest.fixture
def small_cache(files: Files) -> None:
    files.dec.frames.set_limit(64 * 1024)  # frames above 16 KiB are streamed


def big_frame_files(files: Files, data: bytes) -> list[Path]:
    paths = [files.compress(data, CodecParams(frame_size=1 << 20))]
    if HAS_ZSTD:
        paths.append(files.write(zstd_cli(files, ["-c", "-"], data)))  # no content size
        paths.append(files.write(zstd_cli(files, ["--no-check", "-c", "-"], data)))
    return paths


@pytest.mark.usefixtures("small_cache")
def test_big_frame_streaming(files: Files) -> None:
    data = text_data(300_000, seed=5)
    for path in big_frame_files(files, data):
        files.dec.clear()
        reader = ZstReader(files.open(path), files.dec)
        assert reader.size == len(data)
        pos, chunk = 0, 8192
        while pos < len(data):
            assert reader.read(pos, chunk) == data[pos : pos + chunk]
            # Big frames are never cached whole, but a decoder may still hold the bytes just read.
            assert reader.read_cached(pos, chunk) in (None, data[pos : pos + chunk])
            pos += chunk
        for pos in range(len(data) - chunk, -1, -37_000):  # backwards
            assert reader.read(pos, chunk) == data[pos : pos + chunk]
        rng = random.Random(1)
        for _ in range(20):
            offset = rng.randrange(len(data))
            assert reader.read(offset, 5000) == data[offset : offset + 5000]


@pytest.mark.usefixtures("small_cache")
def test_big_frame_concurrent(files: Files) -> None:
    data = text_data(200_000, seed=6)
    reader = ZstReader(files.open(files.compress(data, CodecParams(frame_size=1 << 20))),
                       files.dec)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            offset = rng.randrange(len(data))
            assert reader.read(offset, 3000) == data[offset : offset + 3000]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(8)))


@pytest.mark.usefixtures("small_cache")
def test_big_frame_damage_caught_before_any_byte(files: Files) -> None:
    """A streamed frame is verified whole before its first byte is served."""
    data = text_data(300_000, seed=8)
    good = files.compress(data, CodecParams(frame_size=1 << 20)).read_bytes()
    bad = flip(good, len(good) // 2, 5)
    reader = ZstReader(files.open(files.write(bad)), files.dec)
    with pytest.raises(CorruptError):
        reader.read(0, 100)


# --------------------------------------------------------------------------------------------
# verify_equal


def test_verify_equal_differences(files: Files) -> None:
    data = text_data(4 * 4096 + 50)
    zfd = files.open(files.compress(data))
    codec.verify_equal(zfd, files.open(files.write(data)))
    changed = bytearray(data)
    changed[9000] ^= 1
    with pytest.raises(CorruptError, match="9000"):
        codec.verify_equal(zfd, files.open(files.write(bytes(changed))))
    with pytest.raises(CorruptError, match="longer"):
        codec.verify_equal(zfd, files.open(files.write(data + b"x")))
    with pytest.raises(CorruptError):
        codec.verify_equal(zfd, files.open(files.write(data[:-1])))
    with pytest.raises(CorruptError):
        codec.verify_equal(files.open(files.compress(b"")), files.open(files.write(b"x")))


def test_parallel_decode_equals_sequential_and_catches_damage(files: Files) -> None:
    """decompress_file(threads=2) (used by promotion) writes the same bytes, and a damaged
    frame still raises CorruptError."""
    data = text_data(20 * 4096 + 777, seed=5)
    zst = files.compress(data)
    out = files.path(".out")
    n = codec.decompress_file(files.open(zst), files.open(out, os.O_WRONLY | os.O_CREAT),
                              threads=2, decoders=files.dec)
    assert n == len(data)
    assert out.read_bytes() == data
    raw = bytearray(zst.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside some frame's compressed bytes
    bad = files.write(bytes(raw), ".zst")
    with pytest.raises(CorruptError):
        codec.decompress_file(files.open(bad), files.open(files.path(".o"),
                              os.O_WRONLY | os.O_CREAT), threads=2, decoders=files.dec)
