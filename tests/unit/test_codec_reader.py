"""The reader against hostile files: a fuzz test against the reference decoder, lying
seek tables, absurd sizes, the decoder budget, resumable streams, and the adoption primitives."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from harness.zstfiles import frame, frame_claiming, reference, reference_prefix, seekable, text
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zstfs import codec
from zstfs.codec import CodecParams, CorruptError, DecodeLimitError, Decoders, ZstReader
from zstfs.codec.index import Frame
from zstfs.codec.reader import SEQ_RUN

HAS_ZSTD = shutil.which("zstd") is not None
needs_zstd = pytest.mark.skipif(not HAS_ZSTD, reason="zstd CLI not installed")


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def open_blob(tmp_path: Path, fds: list[int], blob: bytes, name: str = "f.zst") -> int:
    path = tmp_path / name
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    fds.append(fd)
    return fd


def ours(data: bytes, frame_size: int = 4096) -> bytes:
    """zstfs's own format, in memory."""
    with tempfile.TemporaryFile() as plain, tempfile.TemporaryFile() as out:
        plain.write(data)
        plain.flush()
        codec.compress_file(plain.fileno(), out.fileno(), CodecParams(frame_size=frame_size))
        out.seek(0)
        return out.read()


def skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A53, len(payload)) + payload


# --------------------------------------------------------------------------------------------
# Fuzz: random valid and mutated files, random reads; bytes are the reference's or CorruptError


KINDS = ["ours", "ours-big", "single", "single-nosize", "single-nocheck", "concat",
         "seek-plain", "seek-nosize", "seek-lying"]
UNCHECKED = {"single-nocheck", "seek-nosize", "seek-lying"}  # frames without a checksum


def make_file(kind: str, data: bytes, rng: random.Random) -> bytes:
    cut = sorted(rng.randrange(len(data) + 1) for _ in range(3))
    chunks = [data[a:b] for a, b in zip([0, *cut], [*cut, len(data)], strict=True)]
    if kind == "ours":
        return ours(data, 512)
    if kind == "ours-big":
        return ours(data, 1 << 20)  # one big frame: streamed under the small cache below
    if kind == "single":
        return frame(data)
    if kind == "single-nosize":
        return frame(data, size=False)
    if kind == "single-nocheck":
        return frame(data, checksum=False, size=False)
    if kind == "concat":
        return skippable(b"x") + b"".join(frame(c, size=bool(i % 2)) for i, c in enumerate(chunks))
    if kind == "seek-plain":
        return seekable(chunks, checksum=True, size=True)
    if kind == "seek-nosize":
        return seekable(chunks, checksum=False, size=False)
    # A table that lies about frames that state neither size nor checksum.
    claims = [len(c) for c in chunks]
    i = rng.randrange(len(claims))
    claims[i] = max(0, claims[i] + rng.choice([-5000, -7, -1, 1, 9, 4096]))
    return seekable(chunks, checksum=False, size=False, claims=claims)


def mutate(blob: bytes, how: str, rng: random.Random) -> bytes:
    if not blob or how == "none":
        return blob
    out = bytearray(blob)
    if how == "flip":
        for _ in range(rng.randrange(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if how == "truncate":
        return bytes(out[: rng.randrange(len(out))])
    if how == "extend":
        return bytes(out) + rng.randbytes(rng.randrange(1, 20))
    # "table": lie about one size field in a trailing seek table, if any
    if len(out) >= 17 and struct.unpack_from("<I", out, len(out) - 4)[0] == 0x8F92EAB1:
        count, desc = struct.unpack_from("<IB", out, len(out) - 9)
        esize = 12 if desc & 0x80 else 8
        if count:
            at = len(out) - 9 - esize * count + esize * rng.randrange(count) + rng.choice([0, 4])
            value = struct.unpack_from("<I", out, at)[0]
            struct.pack_into("<I", out, at, max(0, value + rng.choice([-3, -1, 1, 100])))
    return bytes(out)


def check_reads(fd: int, blob: bytes, data: bytes, reads: list[tuple[int, int]],
                dec: Decoders, *, unchecked_frames: bool) -> None:
    """Every read is CorruptError or the reference's bytes.  When libzstd fails on the whole
    file, the reference is what it emitted before failing; beyond that, a seekable reader may
    still serve intact frames: their original bytes, unless the file has frames without a
    checksum (a flipped literal there is undetectable by anyone, zstd included)."""
    ref = reference(blob)
    prefix = reference_prefix(blob) if ref is None else ref
    reader = ZstReader(fd, dec)
    for offset, length in reads:
        try:
            got = reader.read(offset, length)
        except CorruptError:
            continue
        if ref is not None or offset + len(got) <= len(prefix):
            assert got == prefix[offset : offset + length], (offset, length, len(prefix))
        elif not unchecked_frames:
            assert got == data[offset : offset + length], (offset, length, len(data))


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(0, 12_000),
    seed=st.integers(0, 2**16),
    how=st.sampled_from(["none", "none", "flip", "truncate", "extend", "table"]),
    reads=st.lists(st.tuples(st.integers(0, 13_000), st.integers(0, 6000)), min_size=1,
                   max_size=12),
)
@example(kind="seek-lying", n=10_000, seed=1, how="none", reads=[(0, 13_000), (9000, 1000)])
@example(kind="single-nocheck", n=9000, seed=2, how="flip", reads=[(8000, 1000), (0, 9000)])
# Found by this test: a silent flip in a frame without checksum, other damage after it; a
# flipped checksum of an empty frame.
@example(kind="seek-nosize", n=1591, seed=6323, how="flip", reads=[(0, 351)])
@example(kind="concat", n=0, seed=1, how="flip", reads=[(0, 0)])
def test_fuzz_reader(tmp_path: Path, fds: list[int], kind: str, n: int, seed: int, how: str,
                     reads: list[tuple[int, int]]) -> None:
    rng = random.Random(seed)
    data = text(n, seed)
    blob = mutate(make_file(kind, data, rng), how, rng)
    fd = open_blob(tmp_path, fds, blob, f"{len(fds)}.zst")
    # A small cache: frames above 2 KiB are streamed, so both paths are fuzzed.
    dec = Decoders(memory=64 << 20, cache=4096, idle_seconds=0)
    check_reads(fd, blob, data, reads, dec, unchecked_frames=kind in UNCHECKED)
    # Sequential reads through one budget, as `cat` does, then the whole file at once.
    pos, seen = 0, bytearray()
    try:
        while True:
            chunk = ZstReader(fd, dec).read(pos, 1000)
            if not chunk:
                break
            seen += chunk
            pos += len(chunk)
    except CorruptError:
        return
    ref = reference(blob)
    assert ref is not None, "a full read succeeded on a file zstd rejects"
    assert bytes(seen) == ref


@needs_zstd
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    flags=st.sampled_from([["-3"], ["-1", "--no-check"], ["-19", "--long=27"], ["-3", "-B2048"]]),
    stdin=st.booleans(),
    how=st.sampled_from(["none", "flip", "truncate"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_zstd_cli_files(tmp_path: Path, fds: list[int], flags: list[str], stdin: bool,
                             how: str, seed: int) -> None:
    rng = random.Random(seed)
    data = text(rng.randrange(0, 40_000), seed)
    plain = tmp_path / f"p{seed}"
    plain.write_bytes(data)
    cmd = ["zstd", "-q", "-c", *flags] + ([] if stdin else [str(plain)])
    blob = subprocess.run(cmd, input=data if stdin else None, capture_output=True,
                          check=True).stdout
    blob = mutate(blob, how, rng)
    fd = open_blob(tmp_path, fds, blob, f"{len(fds)}.zst")
    reads = [(rng.randrange(len(data) + 10), rng.randrange(1, 9000)) for _ in range(10)]
    check_reads(fd, blob, data, reads, Decoders(memory=64 << 20, cache=8192, idle_seconds=0),
                unchecked_frames="--no-check" in flags)


# --------------------------------------------------------------------------------------------
# Lying seek tables, absurd sizes, empty files


def test_lying_table_over_unsized_frames_is_eio_not_short(tmp_path: Path, fds: list[int]) -> None:
    """The issue's case: frames with neither content size nor checksum, a table 4 MiB short."""
    chunks = [text(1 << 20, i) for i in range(6)]
    claims = [len(c) for c in chunks]
    claims[2] = 0  # the table "loses" a whole frame's bytes
    fd = open_blob(tmp_path, fds, seekable(chunks, checksum=False, size=False, claims=claims))
    reader = ZstReader(fd, Decoders())
    assert reader.size == sum(claims)  # stat shows the claim (nothing decoded at lookup) ...
    with pytest.raises(CorruptError):  # ... but cat never gets shifted bytes
        reader.read(0, reader.size)
    with pytest.raises(CorruptError):
        reader.read(reader.size - 100, 100)  # tail either
    assert reader.read(0, 1000) == chunks[0][:1000]  # before the lie: the true bytes


def test_table_5000_bytes_short_tail_is_eio(tmp_path: Path, fds: list[int]) -> None:
    chunks = [text(200_000, i) for i in range(4)]
    claims = [len(c) for c in chunks]
    claims[1] -= 5000
    fd = open_blob(tmp_path, fds, seekable(chunks, checksum=True, size=False, claims=claims))
    reader = ZstReader(fd, Decoders(cache=64 << 10))  # frame 1 streamed, not cached
    with pytest.raises(CorruptError):
        reader.read(reader.size - 8192, 8192)


@pytest.mark.parametrize("size", [2**63, 2**64 - 1, 2**64 - 2])
def test_content_size_beyond_2_63_is_damage(tmp_path: Path, fds: list[int], size: int) -> None:
    fd = open_blob(tmp_path, fds, frame_claiming(size))
    with pytest.raises(CorruptError, match="2\\*\\*63"):
        _ = ZstReader(fd, Decoders()).size
    with pytest.raises(CorruptError):
        codec.verify_file(fd)


def test_sizes_adding_up_beyond_2_63_are_damage(tmp_path: Path, fds: list[int]) -> None:
    fd = open_blob(tmp_path, fds, frame_claiming(2**62) * 2)
    with pytest.raises(CorruptError, match="2\\*\\*63"):
        _ = ZstReader(fd, Decoders()).size


def test_empty_file_is_damage(tmp_path: Path, fds: list[int]) -> None:
    fd = open_blob(tmp_path, fds, b"")
    with pytest.raises(CorruptError):
        _ = ZstReader(fd, Decoders()).size


# --------------------------------------------------------------------------------------------
# The decoder budget


def repetitive(n: int, period: int) -> bytes:
    """``n`` bytes repeating a random block of ``period`` bytes: matches at distance ``period``
    need a window at least that big."""
    block = random.Random(period).randbytes(period)
    return (block * (n // period + 1))[:n]


def long_window_frame(n: int, window_log: int, *, size: bool) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        1, window_log=window_log, enable_ldm=True, write_content_size=size, write_checksum=True)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    data = repetitive(n, 3 << 20)
    if size:
        return cctx.compress(data)
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as w:
        w.write(data)
    return out.getvalue()


def test_window_beyond_budget_is_refused_with_the_long_flag(tmp_path: Path,
                                                           fds: list[int]) -> None:
    blob = long_window_frame(24 << 20, 28, size=True)
    fd = open_blob(tmp_path, fds, blob)
    dec = Decoders(memory=16 << 20, cache=1 << 20)
    reader = ZstReader(fd, dec)
    assert reader.size == 24 << 20  # listing works
    with pytest.raises(DecodeLimitError, match="decoding window") as info:
        reader.read(20 << 20, 100)
    assert "--long" not in str(info.value)  # 24 MiB content < 2**27: no --long needed
    assert dec.budget.used == 0
    assert dec.budget.peak <= 16 << 20
    # With room for it, the same file reads correctly.
    big = Decoders(memory=64 << 20, cache=1 << 20)
    assert ZstReader(fd, big).read(20 << 20, 100) == repetitive(24 << 20, 3 << 20)[20 << 20:][:100]
    assert big.budget.peak <= 64 << 20


def test_unsized_long_window_names_zstd_long(tmp_path: Path, fds: list[int]) -> None:
    blob = long_window_frame(24 << 20, 28, size=False)  # declares a 256 MiB window
    fd = open_blob(tmp_path, fds, blob)
    dec = Decoders(memory=16 << 20, cache=1 << 20)
    with pytest.raises(DecodeLimitError, match="--long=28"):
        _ = ZstReader(fd, dec).size
    assert dec.budget.used == 0
    assert dec.budget.peak <= 16 << 20
    assert ZstReader(fd, Decoders(memory=64 << 20)).size == 24 << 20


def test_many_readers_stay_within_the_budget(tmp_path: Path, fds: list[int]) -> None:
    """8 threads, each with its own reader and file descriptor, reading 4 big-frame files at
    random: the budget's high-water mark never passes its limit."""
    blobs = [frame(text(3 << 20, i)) for i in range(4)]
    datas = [text(3 << 20, i) for i in range(4)]
    paths = []
    for i, blob in enumerate(blobs):
        (tmp_path / f"{i}.zst").write_bytes(blob)
        paths.append(tmp_path / f"{i}.zst")
    dec = Decoders(memory=30 << 20, cache=2 << 20)  # room for two streams at a time
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(paths[seed % 4], os.O_RDONLY)
        try:
            reader = ZstReader(fd, dec)
            for _ in range(15):
                off = rng.randrange(3 << 20)
                assert reader.read(off, 4096) == datas[seed % 4][off : off + 4096]
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert dec.budget.peak <= 30 << 20
    dec.clear()  # a stream the prefetcher still holds goes when it lets go
    end = time.monotonic() + 10.0
    while dec.budget.used and time.monotonic() < end:
        time.sleep(0.01)  # polling an observable, with a deadline
    assert dec.budget.used == 0


def test_work_per_read_is_bounded(tmp_path: Path, fds: list[int]) -> None:
    """A frame bigger than max_frame is refused before any decoding (content size stated) or
    after max_frame bytes (not stated): a zeros bomb cannot burn a core."""
    zeros = b"\0" * (8 << 20)
    dec = Decoders(max_frame=1 << 20)
    sized = open_blob(tmp_path, fds, frame(zeros), "sized.zst")
    reader = ZstReader(sized, dec)
    assert reader.size == 8 << 20
    with pytest.raises(DecodeLimitError, match="zstd -d"):
        reader.read(0, 10)
    assert dec.streams.streamed_bytes == 0
    unsized = open_blob(tmp_path, fds, frame(zeros, size=False), "unsized.zst")
    with pytest.raises(DecodeLimitError):
        _ = ZstReader(unsized, dec).size


# --------------------------------------------------------------------------------------------
# Linear sequential reads


@pytest.mark.parametrize("size", [True, False])
def test_sequential_reads_continue_the_decoder(tmp_path: Path, fds: list[int],
                                               size: bool) -> None:
    data = text(6 << 20, 3)
    fd = open_blob(tmp_path, fds, frame(data, size=size))
    dec = Decoders(cache=1 << 20, idle_seconds=0)
    reader = ZstReader(fd, dec)
    pos = 0
    while pos < len(data):
        assert reader.read(pos, 128 << 10) == data[pos : pos + (128 << 10)]
        pos += 128 << 10
    assert dec.streams.started == 1
    assert dec.streams.streamed_bytes == len(data)  # every byte decoded once for serving


def test_out_of_order_readahead_is_served_from_history(tmp_path: Path, fds: list[int]) -> None:
    data = text(4 << 20, 4)
    fd = open_blob(tmp_path, fds, frame(data))
    dec = Decoders(cache=1 << 20, idle_seconds=0)
    reader = ZstReader(fd, dec)
    k = 128 << 10
    order = [0, 2, 1, 3, 5, 4, 6, 7]  # the kernel's parallel readahead can swap neighbours
    for i in order:
        assert reader.read(i * k, k) == data[i * k : (i + 1) * k]
    assert dec.streams.started == 1


def read_through_new_handles(path: Path, dec: Decoders, data: bytes, step: int) -> None:
    """Read `path` sequentially, each read through a descriptor of its own, closed right after
    (as FUSE reads may come through different handles): parked decoders and frames decoded
    ahead must read their own duplicate descriptors."""
    pos = 0
    while pos < len(data):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert ZstReader(fd, dec).read(pos, step) == data[pos : pos + step]
        finally:
            os.close(fd)
        pos += step


def test_new_handles_resume_parked_decoders(tmp_path: Path, fds: list[int]) -> None:
    """Each FUSE read may come through another handle: decoders belong to the budget."""
    data = text(3 << 20, 5)
    path = tmp_path / "f.zst"
    path.write_bytes(frame(data))
    dec = Decoders(cache=1 << 20, idle_seconds=0)
    read_through_new_handles(path, dec, data, 256 << 10)
    assert dec.streams.started == 1


def test_idle_decoders_give_their_memory_back(tmp_path: Path, fds: list[int]) -> None:
    data = text(3 << 20, 6)
    fd = open_blob(tmp_path, fds, frame(data))
    dec = Decoders(cache=1 << 20, idle_seconds=0.05)
    assert ZstReader(fd, dec).read(1 << 20, 100) == data[1 << 20 : (1 << 20) + 100]
    end = time.monotonic() + 10.0
    while dec.streams.count() and time.monotonic() < end:
        time.sleep(0.01)  # polling an observable, with a deadline
    assert dec.streams.count() == 0
    assert dec.budget.used == 0


def test_random_reads_keep_a_few_positions(tmp_path: Path, fds: list[int]) -> None:
    data = text(4 << 20, 7)
    fd = open_blob(tmp_path, fds, frame(data))
    dec = Decoders(cache=1 << 20, idle_seconds=0)
    reader = ZstReader(fd, dec)
    starts = [0, 2 << 20, 1 << 20, 3 << 20]
    for rnd in range(3):  # four interleaved sequential readers
        for s in starts:
            off = s + rnd * 4096
            assert reader.read(off, 4096) == data[off : off + 4096]
    assert dec.streams.started <= codec.streams.STREAMS_PER_FRAME + 1
    assert dec.streams.count() <= codec.streams.STREAMS_PER_FRAME


# --------------------------------------------------------------------------------------------
# Adoption primitives


def write_fd(tmp_path: Path, fds: list[int], name: str) -> int:
    fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fds.append(fd)
    return fd


FOREIGN = {
    "single": lambda d: frame(d),
    "single-nosize": lambda d: frame(d, size=False),
    "nocheck": lambda d: frame(d, checksum=False, size=False),
    "concat-skippable": lambda d: frame(d[:5000]) + skippable(b"meta") + frame(d[5000:],
                                                                                 size=False),
    "other-seekable": lambda d: seekable([d[:7000], d[7000:]], checksum=False, size=True),
    "ours-other-frames": lambda d: ours(d, 64 << 10),
}


def test_is_native(tmp_path: Path, fds: list[int]) -> None:
    data = text(50_000, 8)
    assert codec.is_native(open_blob(tmp_path, fds, ours(data, 4096), "a"),
                           CodecParams(frame_size=4096))
    assert codec.is_native(open_blob(tmp_path, fds, ours(data), "b"), CodecParams())
    assert codec.is_native(open_blob(tmp_path, fds, ours(b""), "empty"))
    for name, make in FOREIGN.items():
        if name == "ours-other-frames":
            continue
        assert not codec.is_native(open_blob(tmp_path, fds, make(data), name)), name
    # Frames bigger than the caller's frame size: not native (reads would decode too much).
    assert not codec.is_native(open_blob(tmp_path, fds, ours(data, 64 << 10), "c"),
                               CodecParams(frame_size=4096))
    good = ours(data, 4096)
    assert not codec.is_native(open_blob(tmp_path, fds, good[:-3], "cut"))
    assert not codec.is_native(open_blob(tmp_path, fds, b"", "zero"))


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_reencode_roundtrip(tmp_path: Path, fds: list[int], name: str) -> None:
    data = text(70_000, 9)
    src = open_blob(tmp_path, fds, FOREIGN[name](data), "src.zst")
    dst = write_fd(tmp_path, fds, "dst.zst")
    params = CodecParams(frame_size=16_384)
    seen: list[int] = []
    logical, stored = codec.reencode(src, dst, params, progress=seen.append)
    assert logical == len(data)
    assert seen[-1] == len(data)
    assert stored == os.fstat(dst).st_size
    assert codec.is_native(dst, params)
    assert codec.verify_reencoded(dst, src) == len(data)
    assert ZstReader(dst, Decoders()).read(0, len(data)) == data
    codec.verify_equal(dst, open_blob(tmp_path, fds, data, "plain"))


def test_verify_reencoded_catches_differences(tmp_path: Path, fds: list[int]) -> None:
    data = text(30_000, 10)
    src = open_blob(tmp_path, fds, frame(data), "src.zst")
    other = open_blob(tmp_path, fds, ours(data[:-1] + b"X"), "other.zst")
    with pytest.raises(CorruptError, match=str(len(data) - 1)):
        codec.verify_reencoded(other, src)
    shorter = open_blob(tmp_path, fds, ours(data[:-1]), "short.zst")
    with pytest.raises(CorruptError, match="longer"):
        codec.verify_reencoded(shorter, src)
    longer = open_blob(tmp_path, fds, ours(data + b"!"), "long.zst")
    with pytest.raises(CorruptError):
        codec.verify_reencoded(longer, src)


def test_reencode_damaged_or_too_wide_source(tmp_path: Path, fds: list[int]) -> None:
    data = text(30_000, 11)
    blob = bytearray(frame(data))
    blob[len(blob) // 2] ^= 0x40
    src = open_blob(tmp_path, fds, bytes(blob), "bad.zst")
    with pytest.raises(CorruptError):
        codec.reencode(src, write_fd(tmp_path, fds, "out1.zst"))
    wide = open_blob(tmp_path, fds, long_window_frame(4 << 20, 28, size=False), "wide.zst")
    with pytest.raises(DecodeLimitError, match="--long=28"):
        codec.reencode(wide, write_fd(tmp_path, fds, "out2.zst"), max_window=1 << 20)


@needs_zstd
def test_reencode_zstd_cli_file(tmp_path: Path, fds: list[int]) -> None:
    data = text(300_000, 12)
    blob = subprocess.run(["zstd", "-q", "-3", "-c"], input=data, capture_output=True,
                          check=True).stdout
    src = open_blob(tmp_path, fds, blob, "cli.zst")
    dst = write_fd(tmp_path, fds, "dst.zst")
    codec.reencode(src, dst, CodecParams(frame_size=64 << 10))
    codec.verify_reencoded(dst, src)
    out = subprocess.run(["zstd", "-q", "-d", "-c", str(tmp_path / "dst.zst")],
                         capture_output=True, check=True).stdout
    assert out == data


def test_forked_child_gets_fresh_decoders(tmp_path: Path, fds: list[int]) -> None:
    """The daemon forks after recovery, which may have started decoder threads: the child must
    not go on with decoders whose threads do not exist (or whose lock one of them held)."""
    data = text(3 << 20, 13)
    fd = open_blob(tmp_path, fds, frame(data))
    parent = Decoders(cache=1 << 20)
    try:
        assert ZstReader(fd, parent).read(0, 1 << 20) == data[: 1 << 20]  # parks a stream
        assert ZstReader(fd, parent).read(1 << 20, 4096) == data[1 << 20 :][:4096]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            child = parent.forked()
            ok = child is not parent and child.frames.limit == parent.frames.limit
            ok = ok and ZstReader(fd, child).read(2 << 20, 100) == data[2 << 20 :][:100]
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        parent.clear()


def test_concurrent_sequential_readers_share_streams_correctly(tmp_path: Path,
                                                               fds: list[int]) -> None:
    """Several `cat`s of one big frame at once, from different starts, some through
    ``read_cached`` (the FUSE event loop's path) and some through ``read``, while the prefetcher
    decodes ahead: every byte is right, and the budget is never exceeded."""
    data = text(8 << 20, 14)
    path = tmp_path / "f.zst"
    path.write_bytes(frame(data))
    dec = Decoders(memory=48 << 20, cache=1 << 20)
    errors: list[BaseException] = []

    def cat(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY)
        try:
            reader = ZstReader(fd, dec)
            pos = rng.choice([0, 0, 1 << 20, 3 << 20])
            while pos < len(data):
                n = rng.choice([4096, 128 << 10, 1 << 20])
                got = reader.read_cached(pos, n) if rng.random() < 0.5 else None
                if got is None:
                    got = reader.read(pos, n)
                assert got == data[pos : pos + n], (seed, pos, n)
                if rng.random() < 0.1:  # the kernel's readahead: a step back now and then
                    back = max(0, pos - rng.randrange(1, 2 << 20))
                    assert reader.read(back, 4096) == data[back : back + 4096]
                pos += n
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=cat, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert dec.budget.peak <= 48 << 20


def test_parallel_promotion_decode_is_charged_and_released(tmp_path: Path,
                                                           fds: list[int]) -> None:
    """decompress_file(threads=2) (promotion) charges its frames in flight to the decoders'
    budget and gives them back, also when a frame is damaged."""
    dec = Decoders()
    data = text(200_000, 15)
    blob = ours(data, 16_384)
    out = tmp_path / "out"
    for damaged in (False, True):
        raw = bytearray(blob)
        if damaged:
            raw[len(raw) // 2] ^= 0xFF
        src = open_blob(tmp_path, fds, bytes(raw), f"src{damaged}.zst")
        dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        dec.budget.peak = 0
        try:
            if damaged:
                with pytest.raises(CorruptError):
                    codec.decompress_file(src, dst, threads=2, decoders=dec)
            else:
                assert codec.decompress_file(src, dst, threads=2, decoders=dec) == len(data)
                assert out.read_bytes() == data
        finally:
            os.close(dst)
        assert dec.budget.peak >= 16_384  # the frames in flight were charged
        assert dec.budget.used == dec.frames.held  # nothing left but cached frames


def test_eof_of_a_short_table_is_not_served_unchecked(tmp_path: Path, fds: list[int]) -> None:
    """Found by the fuzz test: a table claiming less than its unsized frames hold must not give
    a clean EOF at the claimed end (that is short data), even to a read starting there."""
    chunks = [text(3000, 20), text(4000, 21)]
    claims = [3000, 1000]
    fd = open_blob(tmp_path, fds, seekable(chunks, checksum=False, size=False, claims=claims))
    reader = ZstReader(fd, Decoders())
    assert reader.size == 4000
    with pytest.raises(CorruptError):
        reader.read(4000, 100)
    with pytest.raises(CorruptError):
        reader.read(3500, 1000)
    assert reader.read(0, 100) == chunks[0][:100]  # before the lie: the true bytes


def test_damaged_empty_frame_is_damage_at_eof(tmp_path: Path, fds: list[int]) -> None:
    """Found by the fuzz test: empty frames serve no byte, but a read reaching EOF checks them
    (a flipped checksum of an empty frame: `zstd -d` calls the file damaged)."""
    good = frame(b"abc") + frame(b"")
    bad = bytearray(good)
    bad[-1] ^= 0x80  # the empty frame's checksum
    fd = open_blob(tmp_path, fds, bytes(bad))
    reader = ZstReader(fd, Decoders())
    assert reader.read(0, 2) == b"ab"  # not reaching EOF: the bytes are right
    with pytest.raises(CorruptError):
        reader.read(0, 10)
    ok = open_blob(tmp_path, fds, good, "good.zst")
    assert ZstReader(ok, Decoders()).read(0, 10) == b"abc"


# --------------------------------------------------------------------------------------------
# Decoded copies of big frames (a single frame decoded once, not to check and again to
# serve)


def spill_budget(tmp_path: Path, fds: list[int], **kw: object) -> Decoders:
    """A budget with a small cache (frames above 512 KiB are "big") that copies big frames into
    ``tmp_path/spill`` whatever the free space there."""
    spill = tmp_path / "spill"
    spill.mkdir(exist_ok=True)
    dir_fd = os.open(spill, os.O_RDONLY | os.O_DIRECTORY)
    fds.append(dir_fd)
    dec = Decoders(cache=1 << 20, idle_seconds=0, spill_dir=dir_fd, **kw)  # type: ignore[arg-type]
    dec.spills.keep_free = (0.0, 0)
    return dec


def unnamed_files(tmp_path: Path) -> int:
    """This process's descriptors of unnamed files in ``tmp_path/spill`` (an O_TMPFILE shows as
    `DIR/#N (deleted)`)."""
    prefix = f"{tmp_path / 'spill'}/#"
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                n += 1
    return n


@pytest.mark.parametrize("size", [True, False])
def test_big_frame_is_decoded_once_and_served_from_its_copy(tmp_path: Path, fds: list[int],
                                                            size: bool) -> None:
    data = text(6 << 20, 11)
    fd = open_blob(tmp_path, fds, frame(data, size=size))
    dec = spill_budget(tmp_path, fds)
    reader = ZstReader(fd, dec)
    pos = 0
    while pos < len(data):
        assert reader.read(pos, 128 << 10) == data[pos : pos + (128 << 10)]
        pos += 128 << 10
    rng = random.Random(5)
    for _ in range(200):
        off = rng.randrange(len(data))
        n = rng.randrange(1, 300_000)
        assert reader.read(off, n) == data[off : off + n]
        assert reader.read_cached(off, n) == data[off : off + n]  # no decoding: a pread
    assert dec.spills.stats() == (1, len(data))
    assert dec.streams.started == 0
    assert dec.streams.streamed_bytes == 0
    assert list((tmp_path / "spill").iterdir()) == []  # unnamed: nothing to clean up, ever
    dec.clear()
    assert dec.spills.stats() == (0, 0)
    assert unnamed_files(tmp_path) == 0


def test_damaged_big_frame_keeps_no_copy_and_serves_nothing(tmp_path: Path,
                                                            fds: list[int]) -> None:
    data = text(6 << 20, 12)
    blob = bytearray(frame(data))
    blob[-1] ^= 0x40  # the content checksum: every decoded byte right, the frame still damaged
    fd = open_blob(tmp_path, fds, bytes(blob))
    dec = spill_budget(tmp_path, fds)
    reader = ZstReader(fd, dec)
    for off in (0, 3 << 20, len(data) - 10):
        with pytest.raises(CorruptError, match=r"(?i)checksum|corrupt"):
            reader.read(off, 4096)
        assert reader.read_cached(off, 4096) is None
    assert dec.spills.stats() == (0, 0)
    assert unnamed_files(tmp_path) == 0


def test_copy_limits_fall_back_to_streaming(tmp_path: Path, fds: list[int]) -> None:
    data = text(3 << 20, 13)
    fd = open_blob(tmp_path, fds, frame(data))
    dec = spill_budget(tmp_path, fds, spill_limit=1 << 20)  # no room for this frame's copy
    reader = ZstReader(fd, dec)
    assert reader.read(0, len(data)) == data
    assert dec.spills.stats() == (0, 0)
    assert dec.spills.skipped == 1
    assert dec.streams.started == 1
    # No room on the filesystem either: the same.
    fd2 = open_blob(tmp_path, fds, frame(text(3 << 20, 14)), "g.zst")
    dec2 = spill_budget(tmp_path, fds)
    dec2.spills.keep_free = (1.0, 0)  # keep the whole filesystem free
    assert ZstReader(fd2, dec2).read(1 << 20, 10) == text(3 << 20, 14)[1 << 20 : (1 << 20) + 10]
    assert dec2.spills.stats() == (0, 0)
    assert dec2.spills.skipped == 1
    assert unnamed_files(tmp_path) == 0


def test_copies_are_bounded_and_evicted_least_recently_used(tmp_path: Path,
                                                            fds: list[int]) -> None:
    blobs = [text(3 << 20, 20 + i) for i in range(3)]
    readers = []
    dec = spill_budget(tmp_path, fds, spill_limit=7 << 20)  # two copies fit, not three
    for i, data in enumerate(blobs):
        readers.append(ZstReader(open_blob(tmp_path, fds, frame(data), f"f{i}.zst"), dec))
    for r, data in zip(readers, blobs, strict=True):
        assert r.read(100, 1000) == data[100:1100]
    assert dec.spills.stats() == (2, 6 << 20)
    for r, data in zip(readers, blobs, strict=True):  # all still right, whichever is evicted
        assert r.read(len(data) - 5000, 5000) == data[-5000:]
    assert dec.spills.stats()[1] <= 7 << 20
    assert unnamed_files(tmp_path) == 2


def test_idle_copies_are_dropped(tmp_path: Path, fds: list[int]) -> None:
    data = text(3 << 20, 30)
    fd = open_blob(tmp_path, fds, frame(data))
    dec = spill_budget(tmp_path, fds, spill_idle=0.05)
    assert ZstReader(fd, dec).read(0, 10) == data[:10]
    end = time.monotonic() + 10.0
    while dec.spills.stats()[0] and time.monotonic() < end:
        time.sleep(0.01)  # polling an observable, with a deadline
    assert dec.spills.stats() == (0, 0)
    assert unnamed_files(tmp_path) == 0
    assert ZstReader(fd, dec).read(1 << 20, 10) == data[1 << 20 : (1 << 20) + 10]


def test_a_copy_being_read_survives_its_eviction(tmp_path: Path, fds: list[int]) -> None:
    data = text(3 << 20, 31)
    fd = open_blob(tmp_path, fds, frame(data))
    dec = spill_budget(tmp_path, fds)
    reader = ZstReader(fd, dec)
    assert reader.read(0, 10) == data[:10]
    ident = codec.identity_of(os.fstat(fd))
    index = dec.index(fd, ident)
    key = (ident, index.frames[0].comp_start)
    spill = dec.spills.held(*key)
    spill.pins += 1  # a reader in the middle of its pread
    dec.clear()  # evicts it
    assert spill.fd >= 0
    assert spill.doomed
    assert os.pread(spill.fd, 10, 0) == data[:10]
    dec.spills.unpin(spill)  # the reader is done: now it goes
    assert spill.fd < 0
    assert unnamed_files(tmp_path) == 0


# --------------------------------------------------------------------------------------------
# Decoding ahead of sequential readers (a cold `grep -r` decodes on the other core)


def no_pending(dec: Decoders) -> None:
    """Wait (with a deadline) until no frame is queued to be decoded ahead."""
    end = time.monotonic() + 10.0
    while dec.frames.pending_ahead() and time.monotonic() < end:
        time.sleep(0.005)  # polling an observable, with a deadline
    assert dec.frames.pending_ahead() == 0


def test_sequential_reader_gets_the_next_frames_decoded_ahead(tmp_path: Path,
                                                              fds: list[int]) -> None:
    data = text(2 << 20, 40)
    fd = open_blob(tmp_path, fds, ours(data, frame_size=128 << 10))
    dec = Decoders(cache=1 << 20, idle_seconds=0)  # 128 KiB frames are cached whole
    reader = ZstReader(fd, dec)
    index = dec.index(fd, codec.identity_of(os.fstat(fd)))
    frames = index.frames
    assert len(frames) > 8
    k = 3
    mid = frames[k].log_start + frames[k].log_size // 2
    for at in range(0, frames[k].log_start, 64 << 10):  # from the start, as `cat` reads
        assert reader.read(at, 64 << 10) == data[at : at + (64 << 10)]
    no_pending(dec)  # what earlier reads asked for is done: the next read's asks are its own
    assert reader.read(mid, 1000) == data[mid : mid + 1000]  # past the middle of frame k
    ident = codec.identity_of(os.fstat(fd))
    end = time.monotonic() + 10.0
    while not all(dec.frames.cached((ident, k + j)) for j in (1, 2)) and time.monotonic() < end:
        time.sleep(0.005)  # polling an observable, with a deadline
    for j in (1, 2):  # decoded and cached without being read
        assert dec.frames.cached((ident, k + j)) == data[frames[k + j].log_start:
                                                         frames[k + j].log_start
                                                         + frames[k + j].log_size]
    assert dec.frames.cached((ident, k + 3)) is None  # not more than AHEAD_FRAMES


def test_a_lone_read_in_the_middle_decodes_its_frame_and_nothing_ahead(
        tmp_path: Path, fds: list[int]) -> None:
    """A random line or `less` jumping into a big file: no next frame fetched or decoded."""
    data = text(8 << 20, 42)
    fd = open_blob(tmp_path, fds, ours(data, frame_size=256 << 10))
    dec = Decoders(cache=2 << 20, idle_seconds=0)
    reader = ZstReader(fd, dec)
    index = dec.index(fd, codec.identity_of(os.fstat(fd)))
    frames = index.frames
    k = 5
    late = frames[k].log_start + frames[k].log_size * 3 // 4  # past the middle of frame k
    assert reader.read(late, 1000) == data[late : late + 1000]
    assert reader.read(late + 1000, 1000) == data[late + 1000 : late + 2000]  # the line goes on
    assert dec.frames.pending_ahead() == 0
    assert dec.frames.decoded == 1
    # Reading on for long enough makes it a sequential reader after all.
    at = late + 2000
    while at < late + SEQ_RUN + (64 << 10):
        assert reader.read(at, 64 << 10) == data[at : at + (64 << 10)]
        at += 64 << 10
    j = index.frame_at(at) + 1
    assert j + 1 < len(frames)
    while at < frames[j].log_start - frames[j - 1].log_size // 4:  # past the middle of j - 1
        assert reader.read(at, 64 << 10) == data[at : at + (64 << 10)]
        at += 64 << 10
    ident = codec.identity_of(os.fstat(fd))
    no_pending(dec)
    # Frame j - 1 is the last one read; what was decoded ahead of it was never read. (Which of
    # j and j + 1 depends on how far the worker threads had got: a full queue skips a frame.)
    assert dec.frames.cached((ident, j)) or dec.frames.cached((ident, j + 1))


def fetch_spy(reader: ZstReader, monkeypatch: pytest.MonkeyPatch, *,
              decode_ahead: bool = False) -> list[int]:
    """The frames `reader` asks the kernel to fetch ahead (read-ahead of compressed bytes) when
    it decodes a frame. Unless `decode_ahead`, nothing is decoded ahead for it, so that every
    frame it reads is decoded by its own read and the fetches it asks for do not depend on
    worker threads' timing."""
    asked: list[int] = []
    real = reader._read_ahead

    def spy(frame_no: int) -> None:
        asked.append(frame_no)
        real(frame_no)

    monkeypatch.setattr(reader, "_read_ahead", spy)
    if not decode_ahead:
        monkeypatch.setattr(reader, "_decode_ahead", lambda frame_no, reading: None)
    return asked


def read_on(reader: ZstReader, data: bytes, start: int, stop: int, step: int = 128 << 10) -> None:
    for at in range(start, stop, step):
        assert reader.read(at, step) == data[at : at + step]


def mib_frames(tmp_path: Path, fds: list[int], seed: int) -> tuple[bytes, int, Decoders,
                                                                  tuple[Frame, ...]]:
    """8 MiB of text in zstfs's format with 1 MiB frames: data, descriptor, decoders, frames."""
    data = text(8 << 20, seed)
    fd = open_blob(tmp_path, fds, ours(data, frame_size=1 << 20))
    dec = Decoders(cache=4 << 20, idle_seconds=0)
    return data, fd, dec, dec.index(fd, codec.identity_of(os.fstat(fd))).frames


def test_a_first_line_reader_fetches_nothing_ahead_and_cat_does(
        tmp_path: Path, fds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    data, fd, dec, frames = mib_frames(tmp_path, fds, 43)
    head = ZstReader(fd, dec)  # a session list: the first line, from the head frame
    asked = fetch_spy(head, monkeypatch)
    assert head.read(0, 128 << 10) == data[: 128 << 10]
    assert asked == []
    cat = ZstReader(fd, Decoders(cache=4 << 20, idle_seconds=0))
    asked = fetch_spy(cat, monkeypatch)
    read_on(cat, data, 0, frames[2].log_start + 1)
    assert asked  # reading on from the start: the next frames are fetched as it goes
    assert max(asked) == 3


def test_a_run_whose_first_reads_arrive_out_of_order_still_starts_at_the_start(
        tmp_path: Path, fds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's first two read-ahead windows may reach the daemon in either order."""
    data, fd, dec, frames = mib_frames(tmp_path, fds, 44)
    reader = ZstReader(fd, dec)
    asked = fetch_spy(reader, monkeypatch)
    w = 128 << 10
    assert reader.read(w, w) == data[w : 2 * w]
    assert reader.read(0, w) == data[:w]
    read_on(reader, data, 2 * w, frames[2].log_start + 1)
    assert 3 in asked  # far less than SEQ_RUN read: only the start of the file made it a run
    assert frames[2].log_start + w < SEQ_RUN


def test_reads_far_apart_are_no_run(tmp_path: Path, fds: list[int],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lines a few MiB apart (within the slack) are two lone reads, not a sequential run."""
    data = text(12 << 20, 45)
    fd = open_blob(tmp_path, fds, ours(data, frame_size=1 << 20))
    dec = Decoders(cache=4 << 20, idle_seconds=0)
    reader = ZstReader(fd, dec)
    asked = fetch_spy(reader, monkeypatch, decode_ahead=True)
    for at in (3 << 20, (6 << 20) + 900_000, (9 << 20) + 900_000):  # each past its frame's middle
        assert reader.read(at, 4096) == data[at : at + 4096]
    assert asked == []
    assert dec.frames.pending_ahead() == 0
    assert dec.frames.decoded == 3


def test_decoding_ahead_decodes_each_frame_once_and_survives_a_closed_reader(
        tmp_path: Path) -> None:
    data = text(3 << 20, 41)
    path = tmp_path / "f.zst"
    path.write_bytes(ours(data, frame_size=128 << 10))
    dec = Decoders(cache=1 << 20, idle_seconds=0)
    fd = os.open(path, os.O_RDONLY)
    ident = codec.identity_of(os.fstat(fd))
    frames = dec.index(fd, ident).frames
    n = len(frames)
    k = n // 2
    stop = frames[k].log_start + frames[k].log_size * 3 // 4  # past the middle of frame k
    try:
        reader = ZstReader(fd, dec)
        read_on(reader, data, 0, stop, 64 << 10)
    finally:
        os.close(fd)  # while frames after k may still be queued to be decoded ahead
    no_pending(dec)
    assert dec.frames.cached((ident, k + 1)) or dec.frames.cached((ident, k + 2))
    # The rest through a new descriptor: frames decoded ahead are served, not decoded again.
    fd = os.open(path, os.O_RDONLY)
    try:
        read_on(ZstReader(fd, dec), data, stop, len(data), 64 << 10)
    finally:
        os.close(fd)
    no_pending(dec)
    assert dec.frames.decoded == n  # every frame once: ahead, or by its reader, never both


class _NoRoom:
    """What os.fstatvfs says of a filesystem with no free space left."""

    f_bavail = 0
    f_frsize = 4096
    f_blocks = 1 << 20


def test_a_copy_gives_up_when_the_filesystem_fills_while_it_is_written(
        tmp_path: Path, fds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    data = text(3 << 20, 50)
    fd = open_blob(tmp_path, fds, frame(data))
    dec = spill_budget(tmp_path, fds)
    dec.spills.keep_free = (0.0, 1)  # at least one byte must stay free
    monkeypatch.setattr(codec.spill, "SPILL_CHECK_EVERY", 256 << 10)
    real = os.fstatvfs
    calls = 0

    def filling(fd_: int) -> object:
        nonlocal calls
        calls += 1
        return real(fd_) if calls == 1 else _NoRoom()  # room at first, then none (others wrote)

    monkeypatch.setattr(os, "fstatvfs", filling)
    assert ZstReader(fd, dec).read(0, len(data)) == data  # served anyway, decoded again
    assert calls >= 2
    assert dec.spills.stats() == (0, 0)
    assert dec.spills.skipped == 1
    assert unnamed_files(tmp_path) == 0


def test_held_copies_are_dropped_when_the_filesystem_fills(
        tmp_path: Path, fds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    data = text(3 << 20, 51)
    fd = open_blob(tmp_path, fds, frame(data))
    monkeypatch.setattr(codec.spill, "SPILL_ROOM_CHECK", 0.02)
    dec = spill_budget(tmp_path, fds)
    assert ZstReader(fd, dec).read(0, 10) == data[:10]
    assert dec.spills.stats() == (1, len(data))
    dec.spills.keep_free = (0.0, 1)  # at least one byte must stay free
    monkeypatch.setattr(os, "fstatvfs", lambda fd_: _NoRoom())
    with dec.budget.cond:
        dec.budget.cond.notify_all()  # the janitor looks again now rather than at its next check
    end = time.monotonic() + 10.0
    while dec.spills.stats()[0] and time.monotonic() < end:
        time.sleep(0.01)  # polling an observable, with a deadline
    assert dec.spills.stats() == (0, 0)
    assert unnamed_files(tmp_path) == 0
    monkeypatch.undo()
    assert ZstReader(fd, dec).read(len(data) - 10, 10) == data[-10:]
