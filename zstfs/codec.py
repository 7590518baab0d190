"""zstd only: the seekable multi-frame writer, a random-access reader for any .zst, verification.

zstfs stores a cold ``NAME`` as ``NAME.zst`` in the zstd *seekable format* (facebook/zstd
``contrib/seekable_format``, spec v0.1.0): independent zstd frames, each with its content size and
content checksum, followed by a skippable frame holding the seek table.  Plain ``zstd -d``,
``zstdcat`` and ``zstdgrep`` read such files unchanged, and a reader that understands the table can
decode just the frames a read touches.

The reader also accepts every other valid zstd file (codex writes one frame, sometimes without a
content size; people ``cat`` ``.zst`` files together; skippable frames may appear anywhere), because
the backing store may hold ``.zst`` files that zstfs did not write.

Damage of any kind surfaces as :class:`CorruptError`.  What can be detected depends on the file:

* zstfs's own files carry a content checksum per frame, a content size per frame and a seek table,
  so truncation, bit flips and a lying seek table are all detected before any byte is returned.
  The one undetectable case is a cut exactly at the start of the seek table: what remains is a
  valid multi-frame zstd file.  ``ZstReader.seekable`` lets a caller insist on the table for its
  own files.  (Likewise a flipped bit in the footer magic turns the table into an ordinary
  skippable frame; the bytes read are still right.)
* Foreign frames without a content checksum can only be checked as far as the decoder checks them
  (structure, block sizes, content size when present); a flipped literal byte then goes unnoticed.
* If a seek table has checksums but its frames do not (other writers), the table checksums are not
  verified: python-zstandard does not expose XXH64, and a pure-Python one would be far too slow.

No FUSE and no trio here: everything is synchronous and thread-safe, meant to be called from worker
threads.  Only ``os.pread`` is used on file descriptors, never the shared file offset.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import os
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zstandard

__all__ = [
    "BudgetBusyError",
    "CodecParams",
    "CorruptError",
    "DecodeLimitError",
    "Decoders",
    "ZstReader",
    "clear_caches",
    "compress_file",
    "decompress_file",
    "default_decoders",
    "is_native",
    "logical_size",
    "reencode",
    "set_cache_limit",
    "verify_equal",
    "verify_file",
    "verify_reencoded",
]

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
SKIPPABLE_MAGIC_BASE = 0x184D2A50
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
FOOTER_SIZE = 9
MAX_BLOCK_SIZE = 128 * 1024
MAX_FRAME_HEADER = 18  # magic 4 + descriptor 1 + window 1 + dictionary id 4 + content size 8
U32_MAX = 0xFFFFFFFF
# Sizes at or beyond this are damage: no file is that big, and st_size (off_t) cannot carry them.
MAX_CONTENT_SIZE = 1 << 63
# zstd's own default decoding limit: windows above it need `zstd -d --long=N`.
ZSTD_DEFAULT_WINDOW = 1 << 27

# Window sizes a reader accepts.  zstd refuses windows above 2**27 unless told otherwise
# (`--long=31`); foreign files written that way are still valid, so the reader allows them.
MAX_READ_WINDOW = 1 << 31

# Bytes per pread and per output chunk in streaming paths: bounds memory, amortizes calls.
IO_CHUNK = 1 << 20

ProgressFn = Callable[[int], None]


class CorruptError(Exception):
    """The ``.zst`` is damaged or not zstd: truncated, bit-flipped, lying seek table, garbage.

    The one error for any damage, so callers (store, offline verify) need one ``except``.
    """


@dataclass(frozen=True)
class CodecParams:
    """How zstfs writes frames.  Defaults are chosen by ``scripts/bench_codec.py`` (BENCHMARKS.md).

    ``frame_size`` trades ratio (long-range matches do not cross frames) against the cost of a
    random read (a read decodes its whole frame once).  ``window_log`` must stay <= 27 so plain
    ``zstd -d`` decodes without ``--long``.
    """

    level: int = 3
    frame_size: int = 32 * 2**20
    window_log: int = 27
    long_distance: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.frame_size <= 2**31:
            raise ValueError(f"frame_size must be in 1..2**31, not {self.frame_size}")
        if not 10 <= self.window_log <= 31:
            raise ValueError(f"window_log must be in 10..31, not {self.window_log}")


# --------------------------------------------------------------------------------------------
# Low-level I/O


def _pread_full(fd: int, n: int, offset: int) -> bytes:
    """pread until ``n`` bytes or EOF, because a single pread may legally return less."""
    first = os.pread(fd, n, offset)
    if len(first) == n or not first:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pread_exact(fd: int, n: int, offset: int, what: str) -> bytes:
    """pread exactly ``n`` bytes; a short read means the file is truncated."""
    data = _pread_full(fd, n, offset)
    if len(data) != n:
        raise CorruptError(f"truncated: {what} at offset {offset} needs {n} bytes, got {len(data)}")
    return data


#: Largest single write(2). Measured here: writing 105 MB into a new file takes 0.02 s in
#: 128 KiB writes and 0.23 s in 1 MiB writes (page-cache charging of big writes), so big decoded
#: chunks are written in slices.
WRITE_CHUNK = 128 * 1024


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until everything is written (short writes happen on pipes and some filesystems)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:WRITE_CHUNK])
        view = view[n:]


class _PreadSource:
    """A file-like ``read(n)`` over ``[start, end)`` of an fd, for python-zstandard's stream_reader.

    Bounding the source at the frame end means the decoder cannot run into the next frame, and
    pread keeps the fd's shared offset untouched.
    """

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self._pos = start
        self._end = end

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._end - self._pos
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data


def _identity(fd: int) -> tuple[int, int, int, int]:
    """Cache key for a file's content: a changed file has a new size or mtime (or inode)."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _decompressor() -> zstandard.ZstdDecompressor:
    """A fresh decompression context: contexts are not safe to share between threads."""
    return zstandard.ZstdDecompressor(max_window_size=MAX_READ_WINDOW)


# --------------------------------------------------------------------------------------------
# Writing


def _compressor(params: CodecParams) -> zstandard.ZstdCompressor:
    """Every frame carries its content size (readers learn sizes without decoding) and checksum."""
    cparams = zstandard.ZstdCompressionParameters.from_level(
        params.level,
        window_log=params.window_log,
        enable_ldm=params.long_distance,
        write_content_size=True,
        write_checksum=True,
    )
    return zstandard.ZstdCompressor(compression_params=cparams)


def _seek_table(entries: list[tuple[int, int, int]]) -> bytes:
    """Encode the seek table skippable frame for (compressed, decompressed, checksum) entries."""
    body = b"".join(struct.pack("<III", c, d, x) for c, d, x in entries)
    footer = struct.pack("<IBI", len(entries), 0x80, SEEKABLE_MAGIC)
    payload = body + footer
    return struct.pack("<II", SEEK_TABLE_MAGIC, len(payload)) + payload


def compress_file(
    src_fd: int,
    dst_fd: int,
    params: CodecParams = CodecParams(),  # frozen, so a shared default is safe
    *,
    progress: ProgressFn | None = None,
) -> tuple[int, int]:
    """Write ``src_fd`` (offset 0 to EOF) to the fresh ``dst_fd`` as a seekable zstd stream.

    One frame per ``params.frame_size`` input bytes, so memory stays at about two frames whatever
    the file size.  The table entry's checksum is the frame's own trailing content checksum (the low
    32 bits of XXH64 of the frame content, exactly what the seekable spec asks for), so no separate
    XXH64 is needed.  An empty source gives a file with zero frames and only the seek table, which
    ``zstd -d`` accepts as empty.  Returns ``(logical_bytes, stored_bytes)``.
    """
    consumed = 0

    def read(n: int) -> bytes:
        nonlocal consumed
        data = _pread_full(src_fd, n, consumed)
        consumed += len(data)
        return data

    # The source may still grow (the caller re-checks it before swapping): read on past the
    # planned size until EOF.
    return _compress_stream(read, os.fstat(src_fd).st_size, dst_fd, params, progress,
                            exact=False)


def _compress_stream(
    read: Callable[[int], bytes],
    expected: int,
    dst_fd: int,
    params: CodecParams,
    progress: ProgressFn | None,
    *,
    exact: bool,
) -> tuple[int, int]:
    """The writer behind :func:`compress_file` and :func:`reencode`: frames of the input that
    ``read(n)`` returns (n bytes, fewer only at EOF), planned for ``expected`` bytes."""
    cctx = _compressor(params)
    entries: list[tuple[int, int, int]] = []
    consumed = stored = 0
    # os.pread allocates its full request up front; asking for 16 MiB to read a 50 KB file costs
    # more than compressing it, so ask for what is left (at least 1 byte to see EOF).
    plan = _frame_plan(expected, params.frame_size)
    while True:
        want = plan.pop(0) if plan else min(params.frame_size, max(expected - consumed, 1))
        data = read(want)
        if not data:
            break
        frame = cctx.compress(data)
        if len(frame) > U32_MAX:
            raise ValueError("compressed frame exceeds the seek table's u32 size field")
        _write_all(dst_fd, frame)
        entries.append((len(frame), len(data), int.from_bytes(frame[-4:], "little")))
        consumed += len(data)
        stored += len(frame)
        if progress is not None:
            progress(consumed)
        if len(data) < want or (exact and consumed >= expected):
            break
    table = _seek_table(entries)
    _write_all(dst_fd, table)
    return consumed, stored + len(table)


#: A multi-frame file ends with a frame of at most this much input: `tail`, `less +G` and codex's
#: reverse scan read the end of a rollout, and this makes that cost one small decode instead of
#: up to a whole frame, for well under 1 % of the stored size.
TAIL_FRAME = 2**20
#: ... and starts with one: codex and its session picker read the first line (`session_meta`,
#: 7-25 KB), `head` and `file` read the start.  256 KiB covers the kernel's first read requests;
#: measured on a 150 MB rollout it costs nothing (a 1 MiB head frame cost +0.9 %).
HEAD_FRAME = 2**18


def _frame_plan(size: int, frame_size: int) -> list[int]:
    """Uncompressed sizes of the frames for a file of `size` bytes: a small head frame
    (`HEAD_FRAME`), full frames, then the rest with its last `TAIL_FRAME` bytes split off (only
    for files that need several frames anyway, so small files keep the ratio of a single frame)."""
    tail = min(TAIL_FRAME, frame_size // 8)
    head = min(HEAD_FRAME, frame_size // 8)
    if size <= frame_size or tail == 0:
        return []
    plan = [head] if head else []
    full, rest = divmod(size - head, frame_size)
    plan += [frame_size] * full
    if rest == 0:
        plan[-1] -= tail
        plan.append(tail)
    elif rest > tail:
        plan += [rest - tail, tail]
    else:
        plan.append(rest)
    return plan


# --------------------------------------------------------------------------------------------
# Parsing frame structure


@dataclass(frozen=True, slots=True)
class _RawFrame:
    """One zstd frame's compressed extent, as found in the file (not yet decoded)."""

    start: int
    end: int
    content_size: int | None  # from the frame header, None when the header has none
    checksum: int | None  # the frame's trailing content checksum, None when the frame has none
    window: int = 0  # decoding window from the frame header


@dataclass(frozen=True, slots=True)
class _Header:
    length: int
    content_size: int | None
    has_checksum: bool
    window: int  # the decoder's history window in bytes (the content size for a single segment)


def _parse_header(buf: bytes, offset: int) -> _Header:
    """Parse a zstd frame header from ``buf`` (read at file ``offset``; magic already checked)."""
    if len(buf) < 5:
        raise CorruptError(f"truncated: zstd frame header at offset {offset}")
    fhd = buf[4]
    fcs_flag, single_segment = fhd >> 6, (fhd >> 5) & 1
    if fhd & 0x08:
        raise CorruptError(f"not zstd: reserved bit set in frame header at offset {offset}")
    did_size = (0, 1, 2, 4)[fhd & 3]
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    pos = 5 + (0 if single_segment else 1) + did_size
    length = pos + fcs_size
    if len(buf) < length:
        raise CorruptError(f"truncated: zstd frame header at offset {offset}")
    content_size: int | None = None
    if fcs_size:
        content_size = int.from_bytes(buf[pos:length], "little")
        if fcs_size == 2:
            content_size += 256
        if content_size >= MAX_CONTENT_SIZE:
            raise CorruptError(
                f"frame at offset {offset} declares {content_size} bytes of content, beyond 2**63"
            )
    if single_segment:
        window = content_size or 0
    else:
        descriptor = buf[5]
        base = 1 << (10 + (descriptor >> 3))
        window = base + (base >> 3) * (descriptor & 7)
    return _Header(length, content_size, bool(fhd & 0x04), window)


def _read_header(fd: int, offset: int, limit: int) -> _Header:
    """Read and parse the zstd frame header at ``offset``; anything else there is corruption."""
    buf = os.pread(fd, min(MAX_FRAME_HEADER, limit - offset), offset)
    if len(buf) < 4 or int.from_bytes(buf[:4], "little") != ZSTD_MAGIC:
        raise CorruptError(f"not zstd: no zstd frame at offset {offset}")
    return _parse_header(buf, offset)


def _walk_blocks(fd: int, offset: int, limit: int, frame_start: int) -> int:
    """Follow the block headers from ``offset`` to the last block; return the offset after it.

    Reading 3-byte block headers finds the compressed frame end without decoding anything; a block
    that runs past ``limit`` means truncation (or a lying seek table).
    """
    if limit - offset > IO_CHUNK:
        # One header per block, up to 128 KiB apart: on a cold cache each would be a small
        # synchronous read. Ask for the whole extent at once (the disk streams it, and a read of
        # the frame that follows finds it cached).
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, limit - offset, os.POSIX_FADV_WILLNEED)
    while True:
        hdr = os.pread(fd, 3, offset)
        if len(hdr) < 3 or offset + 3 > limit:
            raise CorruptError(
                f"truncated: block header at offset {offset} (frame at {frame_start})"
            )
        value = int.from_bytes(hdr, "little")
        last, btype, bsize = value & 1, (value >> 1) & 3, value >> 3
        if btype == 3 or bsize > MAX_BLOCK_SIZE:
            raise CorruptError(f"corrupt block header at offset {offset} (frame at {frame_start})")
        offset += 3 + (1 if btype == 1 else bsize)
        if offset > limit:
            raise CorruptError(f"truncated: block at offset {offset} runs past {limit}")
        if last:
            return offset


def _parse_frame(fd: int, start: int, limit: int) -> _RawFrame:
    """Find the extent of the zstd frame at ``start`` (within ``limit``) from structure alone."""
    header = _read_header(fd, start, limit)
    end = _walk_blocks(fd, start + header.length, limit, start)
    checksum = None
    if header.has_checksum:
        checksum = int.from_bytes(_pread_exact(fd, 4, end, "frame checksum"), "little")
        end += 4
        if end > limit:
            raise CorruptError(f"truncated: frame checksum of frame at {start} runs past {limit}")
    return _RawFrame(start, end, header.content_size, checksum, header.window)


def _walk_frames(fd: int, fsize: int) -> Iterator[tuple[str, int, int, _RawFrame | None]]:
    """Yield every frame of the file in order as ``(kind, start, end, frame)``.

    ``kind`` is ``"zstd"`` (with its :class:`_RawFrame`) or ``"skip"`` (skippable frame).  Bytes
    that are neither mean the file is not (entirely) zstd.
    """
    offset = 0
    while offset < fsize:
        magic_bytes = _pread_exact(fd, 4, offset, "frame magic")
        magic = int.from_bytes(magic_bytes, "little")
        if magic == ZSTD_MAGIC:
            frame = _parse_frame(fd, offset, fsize)
            yield "zstd", frame.start, frame.end, frame
            offset = frame.end
        elif magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC_BASE:
            size = int.from_bytes(_pread_exact(fd, 4, offset + 4, "skippable frame size"), "little")
            end = offset + 8 + size
            if end > fsize:
                raise CorruptError(f"truncated: skippable frame at offset {offset} ends past EOF")
            yield "skip", offset, end, None
            offset = end
        else:
            raise CorruptError(f"not zstd: unknown magic {magic:#010x} at offset {offset}")


@dataclass(frozen=True, slots=True)
class _TableEntry:
    start: int
    end: int
    size: int
    checksum: int | None


def _read_seek_table(fd: int, fsize: int) -> tuple[list[_TableEntry], int] | None:
    """Parse the trailing seek table: ``(entries, table_frame_length)``, or None when absent.

    A footer with the seekable magic commits the file to the format: any inconsistency after that
    (sizes that do not add up, bad frame header) is a lying or damaged table, never a fallback.
    """
    if fsize < FOOTER_SIZE + 8:
        return None
    count, descriptor, magic = struct.unpack("<IBI", os.pread(fd, FOOTER_SIZE, fsize - FOOTER_SIZE))
    if magic != SEEKABLE_MAGIC:
        return None
    if descriptor & 0x7C:
        raise CorruptError(f"seek table: reserved descriptor bits set ({descriptor:#04x})")
    has_checksum = bool(descriptor & 0x80)
    entry_size = 12 if has_checksum else 8
    payload = count * entry_size + FOOTER_SIZE
    table_len = 8 + payload
    if table_len > fsize:
        raise CorruptError(f"seek table: {count} frames do not fit in a {fsize}-byte file")
    table_start = fsize - table_len
    raw = _pread_exact(fd, table_len, table_start, "seek table")
    skip_magic, frame_size = struct.unpack_from("<II", raw)
    if skip_magic != SEEK_TABLE_MAGIC or frame_size != payload:
        raise CorruptError(f"seek table: bad skippable frame header at offset {table_start}")
    entries: list[_TableEntry] = []
    pos = 0
    for i in range(count):
        at = 8 + i * entry_size
        csize, dsize = struct.unpack_from("<II", raw, at)
        checksum = struct.unpack_from("<I", raw, at + 8)[0] if has_checksum else None
        if csize == 0:
            raise CorruptError(f"seek table: frame {i} has compressed size 0")
        entries.append(_TableEntry(pos, pos + csize, dsize, checksum))
        pos += csize
    if pos != table_start:
        raise CorruptError(
            f"seek table: compressed sizes add up to {pos}, but frames end at {table_start}"
        )
    return entries, table_len


# --------------------------------------------------------------------------------------------
# Decoding one frame


def _check_extent(fd: int, frame: _Frame) -> None:
    """Confirm by structure that ``[comp_start, comp_end)`` is exactly one zstd frame.

    Seek-table extents are only claims; a frame that ends before or after the claimed end would let
    the decoder silently stop early or read the next frame.  Walking the block headers costs a few
    hundred 3-byte preads per 32 MiB frame, under 1 % of decoding it.
    """
    raw = _parse_frame(fd, frame.comp_start, frame.comp_end)
    if raw.end != frame.comp_end:
        raise CorruptError(
            f"seek table: frame at offset {frame.comp_start} ends at {raw.end}, "
            f"table says {frame.comp_end}"
        )


def _iter_decoded(fd: int, start: int, end: int, expected: int | None) -> Iterator[bytes]:
    """Stream-decode the frame ``[start, end)`` in chunks of at most IO_CHUNK bytes.

    The decoder checks the content checksum and content size when the frame has them; we check the
    total length against ``expected`` because a truncated stream just ends early.
    """
    reader = _decompressor().stream_reader(
        _PreadSource(fd, start, end), read_size=IO_CHUNK, read_across_frames=False, closefd=False
    )
    total = 0
    try:
        while True:
            chunk = reader.read(IO_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if expected is not None and total > expected:
                raise CorruptError(f"frame at offset {start} decodes to more than {expected} bytes")
            yield chunk
    except zstandard.ZstdError as exc:
        raise CorruptError(f"frame at offset {start}: {exc}") from exc
    if expected is not None and total != expected:
        raise CorruptError(f"frame at offset {start} decodes to {total} bytes, expected {expected}")


def _decode_whole(fd: int, frame: _Frame) -> bytes:
    """Decode one (cacheable) frame into memory, verified: structure, checksum, exact size."""
    _check_extent(fd, frame)
    data = _pread_exact(fd, frame.comp_end - frame.comp_start, frame.comp_start, "frame")
    try:
        out = _decompressor().decompress(data, max_output_size=max(frame.log_size, 1))
    except zstandard.ZstdError as exc:
        raise CorruptError(f"frame at offset {frame.comp_start}: {exc}") from exc
    if len(out) != frame.log_size:
        raise CorruptError(
            f"frame at offset {frame.comp_start} decodes to {len(out)} bytes, "
            f"expected {frame.log_size}"
        )
    return out


def _count_frame(fd: int, start: int, end: int, expected: int | None, limit: int,
                 progress: ProgressFn | None = None,
                 sink: Callable[[memoryview], None] | None = None) -> int:
    """Decode a frame to nowhere (into one reused buffer) and return its length, verifying it:
    the decoder checks structure, checksum and stated size; we check ``expected``.  Decoding stops
    with :class:`DecodeLimitError` past ``limit`` bytes, so a "zeros bomb" cannot burn a core.
    ``sink`` receives the decoded bytes as they come (a view of the buffer, valid for the call)."""
    reader: zstandard.ZstdDecompressionReader | None = _decompressor().stream_reader(
        _PreadSource(fd, start, end), read_size=STREAM_READ, read_across_frames=False,
        closefd=False,
    )
    buf = bytearray(IO_CHUNK)
    total = 0
    try:
        while True:
            assert reader is not None
            n = reader.readinto(buf)
            if not n:
                break
            total += n
            if expected is not None and total > expected:
                raise CorruptError(f"frame at offset {start} decodes to more than {expected} bytes")
            if progress is not None:
                progress(total)
            if total > limit:
                raise DecodeLimitError(
                    f"frame at offset {start} decodes to more than {_gib(limit)}, the most zstfs "
                    "decodes for a read (decode it with `zstd -d`)"
                )
            if sink is not None:
                sink(memoryview(buf)[:n])
    except zstandard.ZstdError as exc:
        raise CorruptError(f"frame at offset {start}: {exc}") from exc
    finally:
        # An exception's traceback keeps this frame alive (the FUSE layer chains it): drop the
        # decoder and its window now, not when the traceback goes.
        reader = None
    if expected is not None and total != expected:
        raise CorruptError(f"frame at offset {start} decodes to {total} bytes, expected {expected}")
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Index


@dataclass(frozen=True, slots=True)
class _Frame:
    """A frame in the reader's index: where it is compressed and which logical bytes it holds."""

    comp_start: int
    comp_end: int
    log_start: int
    log_size: int
    has_checksum: bool
    window: int = 0  # decoding window from the frame header
    # The frame header states log_size, so the decoder itself enforces it.  False only for a
    # seek-table claim over a frame without a content size: such a frame must be decoded once
    # before any byte at or after it is served (every later offset depends on its length).
    sized: bool = True


@dataclass(frozen=True)
class _Index:
    frames: tuple[_Frame, ...]  # only frames with content; empty frames never serve a read
    starts: tuple[int, ...]  # frames[i].log_start, for bisect
    size: int
    seekable: bool
    unsized: tuple[_Frame, ...] = ()  # frames (empty ones included) whose size is only claimed
    empty: tuple[_Frame, ...] = ()  # frames that state they are empty: checked when EOF is read

    def frame_at(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1


def _index_from_table(fd: int, entries: list[_TableEntry], fsize: int) -> list[_Frame]:
    """Trust but check the seek table: each entry must start with a frame header that agrees.

    One small pread per frame (header) plus one for the trailing checksum catches a lying
    decompressed size (when the frame states it) or a shifted compressed size before any read.
    The full structural check of each extent happens when the frame is decoded; a frame that does
    not state its size is marked unsized and decoded once before it (or anything after it) serves.
    """
    frames: list[_Frame] = []
    log = 0
    for i, entry in enumerate(entries):
        header = _read_header(fd, entry.start, entry.end)
        if header.content_size is not None and header.content_size != entry.size:
            raise CorruptError(
                f"seek table: frame {i} at offset {entry.start} holds {header.content_size} bytes, "
                f"table says {entry.size}"
            )
        if header.has_checksum and entry.checksum is not None:
            trailer = _pread_exact(fd, 4, entry.end - 4, "frame checksum")
            if int.from_bytes(trailer, "little") != entry.checksum:
                raise CorruptError(
                    f"seek table: checksum of frame {i} at offset {entry.start} does not match"
                )
        window = header.window or entry.size
        frames.append(_Frame(entry.start, entry.end, log, entry.size, header.has_checksum,
                             window, header.content_size is not None))
        log += entry.size
    return frames


def _index_from_walk(fd: int, fsize: int, count: Callable[[_RawFrame], int]) -> list[_Frame]:
    """Index a file without a seek table by walking frame and block headers.

    A frame without a content size (``zstd`` reading stdin, codex's streaming writer) has to be
    decoded once to learn its size (``count``, which also verifies it).  The index is cached by
    file identity so this happens once per file, not per open.
    """
    frames: list[_Frame] = []
    log = 0
    for kind, _start, _end, raw in _walk_frames(fd, fsize):
        if kind != "zstd" or raw is None:
            continue
        size = raw.content_size
        if size is None:
            size = count(raw)
        frames.append(_Frame(raw.start, raw.end, log, size, raw.checksum is not None,
                             raw.window or size))
        log += size
    return frames


def _build_index(fd: int, count: Callable[[_RawFrame], int]) -> _Index:
    """Build the frame index of one ``.zst`` (seek table if present, else a structural walk)."""
    fsize = os.fstat(fd).st_size
    if fsize == 0:
        raise CorruptError("not zstd: empty file")
    table = _read_seek_table(fd, fsize)
    if table is not None:
        frames = _index_from_table(fd, table[0], fsize)
    else:
        frames = _index_from_walk(fd, fsize, count)
    size = frames[-1].log_start + frames[-1].log_size if frames else 0
    if size >= MAX_CONTENT_SIZE:
        raise CorruptError(f"frames declare {size} bytes of content, beyond 2**63")
    kept = tuple(f for f in frames if f.log_size)
    unsized = tuple(f for f in frames if not f.sized)
    empty = tuple(f for f in frames if f.sized and not f.log_size)
    return _Index(kept, tuple(f.log_start for f in kept), size, table is not None, unsized,
                  empty)


# --------------------------------------------------------------------------------------------
# The decoder budget

Identity = tuple[int, int, int, int]

INDEX_CACHE_ENTRIES = 4096
VERIFIED_ENTRIES = 4096
#: Everything decoding holds at once in the daemon: the decoded-frame cache, whole-frame decodes
#: in flight and streaming decoders (their windows), parked or working.  With the daemon's own
#: ~40 MB this keeps its peak RSS under 200 MB whatever the number of readers (BENCHMARKS.md).
DEFAULT_MEMORY = 120 * 2**20
#: The part of the budget decoded frames may keep when nobody needs the room: three default
#: (32 MiB) frames; frames up to half of it are cached whole and shared by all readers ...
DEFAULT_CACHE_LIMIT = 96 * 2**20
#: ... of which no frame bigger than this (zstfs's own are 32 MiB): a sequential reader then
#: has the frame it reads and the two decoded ahead of it (AHEAD_FRAMES) cached at once.
CACHED_FRAME_MAX = 32 * 2**20
#: The most one read decodes from a single frame (a "zeros bomb" of 20 GiB is refused at once
#: when its header says so, and stopped here when it does not).  ~2-4 s of one core.
MAX_FRAME_DECODE = 4 * 2**30
#: A parked decoder nobody used for this long gives its memory back.
IDLE_SECONDS = 30.0
#: Resumable decoder positions kept per big frame (sequential readers, a few random ones).
STREAMS_PER_FRAME = 4
#: Decoded bytes a stream keeps behind its position, so reads that arrive slightly out of order
#: (the kernel's parallel readahead) are served without restarting the frame.
STREAM_HISTORY = 4 << 20
#: Granularity of the budget charged by a decoder whose output size is not known in advance.
GROW_STEP = 8 << 20
#: Decoded bytes a sequential stream keeps ready ahead of its reader, decoded by a prefetch
#: thread on another core while the FUSE layer ships the previous ones.
STREAM_AHEAD = 4 << 20
PREFETCH_CHUNK = 256 << 10
#: Frames decoded ahead of a sequential reader, in parallel (the next ones after the frame read).
AHEAD_FRAMES = 2
#: Input read size of a streaming decoder.
STREAM_READ = 1 << 18
#: Decoder context, block buffers and bookkeeping on top of the window (zstd's DCtx is ~160 KiB).
STREAM_OVERHEAD = (STREAM_READ + STREAM_HISTORY + STREAM_AHEAD + 2 * IO_CHUNK + MAX_BLOCK_SIZE
                   + (256 << 10))
#: Big frames (too big to cache whole) are decoded once to check them; with a spill directory
#: the checking pass also writes what it decodes to an unnamed temporary file there (O_TMPFILE:
#: gone with the daemon, whatever kills it), and reads are then served from that file. At most
#: this many bytes of such copies are kept (least recently used go first) ...
DEFAULT_SPILL_LIMIT = 16 * 2**30
#: ... each for this long after its last read ...
SPILL_IDLE_SECONDS = 600.0
#: ... and only while the filesystem keeps this share of its space, and SPILL_MIN_FREE bytes,
#: free after the copy (the store's own writes come first).
SPILL_FREE_SHARE = 0.10
SPILL_MIN_FREE = 1 << 30
#: While a copy is written, the free space is looked at again every this many bytes; while copies
#: are held, every this many seconds (all are dropped when it fell short).
SPILL_CHECK_EVERY = 64 << 20
SPILL_ROOM_CHECK = 30.0
#: Reservations this small never wait: the FUSE layer decodes small files on its event loop.
SMALL_RESERVATION = 4 << 20
#: A reservation that cannot be met for this long (the budget is pinned by work in progress)
#: fails rather than hanging the read.
RESERVE_TIMEOUT = 60.0


class DecodeLimitError(CorruptError):
    """A valid frame that this reader will not decode: its window does not fit the decoder budget,
    or it is too big to decode for one read.  A CorruptError, so callers answer EIO."""


class BudgetBusyError(DecodeLimitError):
    """The decoder budget stayed pinned by work in progress: a transient refusal, not damage."""


def _stream_cost(window: int, size: int | None) -> int:
    """Memory of a streaming decoder: zstd allocates min(window, content size) plus a block."""
    need = window if size is None else min(window, size)
    return need + STREAM_OVERHEAD


class _Stream:
    """A decoder positioned inside one big frame, so sequential reads continue where they ended.

    It reads its own duplicate of the file descriptor, so it stays valid after the handle that
    created it is closed, and can be resumed by any reader of the same file.  It remembers the
    bytes it decoded last, from ``STREAM_HISTORY`` behind the end of the last read served to up
    to ``STREAM_AHEAD`` decoded ahead of it by the prefetcher.  Only the thread that holds the
    stream (``busy``) decodes; the remembered pieces change under ``lock`` only, so other threads
    may serve from them (:meth:`peek`).
    """

    def __init__(self, fd: int, key: tuple[Identity, int], frame: _Frame, cost: int,
                 lock: threading.Condition) -> None:
        self.key = key
        self.frame = frame
        self.cost = cost
        self.pos = 0
        self.served = 0  # end of the furthest read served
        self.queued = False  # waiting for the prefetcher
        self.doomed = False  # dropped at the next check-in (Decoders.clear while busy)
        self.pinned: int | None = None  # the holder's read starts here: history kept from it
        self.lock = lock
        # The decoded bytes [pos - _history, pos), as the pieces the decoder returned.
        self._pieces: collections.deque[bytes] = collections.deque()
        self._history = 0
        self.busy = True
        self.last_used = time.monotonic()
        self._fd = os.dup(fd)
        self._reader: zstandard.ZstdDecompressionReader | None = _decompressor().stream_reader(
            _PreadSource(self._fd, frame.comp_start, frame.comp_end),
            read_size=STREAM_READ,
            read_across_frames=False,
            closefd=False,
        )

    @property
    def history_start(self) -> int:
        return self.pos - self._history

    def work(self, lo: int) -> int:
        """Bytes to decode before this stream can serve offset ``lo`` (-1: it cannot)."""
        if lo < self.history_start:
            return -1
        return max(0, lo - self.pos)

    def close(self) -> None:
        self._reader = None  # the decoder and its window go now, even if a traceback holds us
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pull(self, n: int, keep: bool) -> list[bytes]:
        parts: list[bytes] = []
        while n > 0:
            if self._reader is None:
                raise CorruptError(f"frame at offset {self.frame.comp_start}: decoder released")
            try:
                data = self._reader.read(min(IO_CHUNK, n))
            except zstandard.ZstdError as exc:
                raise CorruptError(f"frame at offset {self.frame.comp_start}: {exc}") from exc
            if not data:
                raise CorruptError(
                    f"frame at offset {self.frame.comp_start} ends at {self.pos} bytes, "
                    f"expected {self.frame.log_size}"
                )
            n -= len(data)
            if keep or n < STREAM_HISTORY:
                parts.append(data)
            else:
                with self.lock:
                    self.pos += len(data)
                    self._pieces.clear()
                    self._history = 0
                continue
            self._remember(data)
        return parts

    def _remember(self, data: bytes) -> None:
        with self.lock:
            self._pieces.append(data)
            self._history += len(data)
            self.pos += len(data)
            self._trim_locked()

    def _trim_locked(self) -> None:
        keep_from = self.served - STREAM_HISTORY
        if self.pinned is not None:
            keep_from = min(keep_from, self.pinned)
        while self._pieces and self.history_start + len(self._pieces[0]) <= keep_from:
            self._history -= len(self._pieces.popleft())

    def _recall_locked(self, lo: int, hi: int) -> list[bytes]:
        """Slices of the remembered bytes covering ``[lo, min(hi, pos))``."""
        out: list[bytes] = []
        at = self.history_start
        for piece in self._pieces:
            end = at + len(piece)
            if end > lo and at < hi:
                out.append(piece[max(lo, at) - at : min(hi, end) - at])
            at = end
        return out

    def peek(self, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` if already decoded and remembered (any thread, under ``lock``)."""
        if lo < self.history_start or hi > self.pos:
            return None
        out = self._recall_locked(lo, hi)
        self.served = max(self.served, hi)
        self._trim_locked()
        return out[0] if len(out) == 1 else b"".join(out)

    def read(self, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of the frame (``lo`` at or after ``history_start``); the caller
        holds the stream."""
        out: list[bytes] = []
        if lo < self.pos:
            with self.lock:
                out = self._recall_locked(lo, hi)
            if lo < self.history_start or sum(map(len, out)) != min(hi, self.pos) - lo:
                raise AssertionError(f"stream history lost [{lo}, {self.pos})")  # never: pinned
            lo = min(hi, self.pos)
        if lo < hi:
            if lo > self.pos:
                self._pull(lo - self.pos, keep=False)
            out.extend(self._pull(hi - lo, keep=True))
        with self.lock:
            self.served = max(self.served, hi)
            self._trim_locked()
        return out[0] if len(out) == 1 else b"".join(out)

    def prefetch(self) -> bool:
        """Decode one chunk ahead of the last read served; True if more would be useful."""
        want = min(self.served + STREAM_AHEAD, self.frame.log_size) - self.pos
        if want <= 0:
            return False
        self._pull(min(want, PREFETCH_CHUNK), keep=True)
        return self.pos < min(self.served + STREAM_AHEAD, self.frame.log_size)


class _Spill:
    """A checked big frame's decoded bytes, in an unnamed temporary file (see DEFAULT_SPILL_LIMIT).

    Written by the checking pass as it decodes; served from (``pread``) only once that pass found
    the frame intact, so reading it never returns a byte the frame's checksum has not vouched for.
    A reader pins it while it reads, so evicting it never closes the descriptor under a ``pread``.
    """

    __slots__ = ("__weakref__", "checked", "doomed", "fd", "given_up", "keep_free", "last_used",
                 "limit", "pins", "size")

    def __init__(self, fd: int, limit: int, keep_free: float) -> None:
        self.fd = fd
        self.size = 0
        self.limit = limit
        self.keep_free = keep_free  # bytes of the filesystem this copy must leave free
        self.checked = 0  # size at the last look at the free space
        self.last_used = time.monotonic()
        self.pins = 0
        self.doomed = False
        self.given_up = False  # set by another thread: stop at the next write (space wanted)

    def write(self, data: memoryview) -> None:
        """Append decoded bytes; on any error (a full disk), past ``limit``, or once the
        filesystem's free space falls to ``keep_free`` (others write too) the copy is given up
        and the checking pass goes on without it."""
        if self.fd < 0:
            return
        if self.size + len(data) > self.limit or self.given_up:
            self.close()
            return
        try:
            if self.size - self.checked >= SPILL_CHECK_EVERY:
                self.checked = self.size
                sv = os.fstatvfs(self.fd)
                if sv.f_bavail * sv.f_frsize < self.keep_free:
                    raise OSError("the filesystem is filling up")
            _write_all(self.fd, data)
        except OSError:
            self.close()
            return
        self.size += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class Decoders:
    """The daemon's one decoder budget, shared by every reader and the decoded-frame cache.

    Everything decoding holds counts against ``memory``: cached decoded frames, whole-frame decodes
    in flight (output plus input) and streaming decoders (window, buffers), whether working or
    parked between reads.  A decode that needs room first evicts cached frames, then parked
    decoders (least recently used first), then waits for work in progress to finish; a frame
    whose decoder alone would not fit (a window beyond what ``memory`` allows, as `zstd --long=31`
    writes) raises :class:`DecodeLimitError` at once, naming the ``--long`` it needs.

    Big frames (more than half the cache) are streamed: each keeps up to ``STREAMS_PER_FRAME``
    resumable decoder positions, shared by all readers of the file, so a read that continues where
    an earlier one ended continues that decoder instead of decoding from the frame start again.
    Parked decoders unused for ``idle_seconds`` are released by a janitor thread.

    Before any byte of a frame is served, the frame has been decoded in full once and found
    consistent: checksum (when present), exact length (the seek table's or the header's claim),
    structure.  Small frames are decoded whole anyway; a big one is decoded once and remembered as
    verified by file identity.  Given a ``spill_dir`` (the daemon passes the backing store's root),
    that checking pass also copies the big frame's decoded bytes into an unnamed temporary file
    there, and reads of the frame are served from it: a foreign single-frame file is decoded once,
    not once to check and again to serve, and random reads in it cost a ``pread``.  Copies are
    bounded (``spill_limit`` bytes in all, free space kept, dropped when idle) and optional: without
    room for one, the frame is streamed as before.

    Thread-safe; one instance per daemon (``default_decoders()`` unless a caller passes its own).
    """

    def __init__(
        self,
        memory: int = DEFAULT_MEMORY,
        cache: int = DEFAULT_CACHE_LIMIT,
        *,
        max_frame: int = MAX_FRAME_DECODE,
        idle_seconds: float = IDLE_SECONDS,
        spill_dir: int | None = None,
        spill_limit: int = DEFAULT_SPILL_LIMIT,
        spill_idle: float = SPILL_IDLE_SECONDS,
    ) -> None:
        self.memory = memory
        self.cache_limit = min(cache, memory)
        self.max_frame = max_frame
        self.idle_seconds = idle_seconds
        self._cond = threading.Condition(threading.Lock())
        self._used = 0  # cached frames + reservations (decodes in flight, streams)
        self.peak = 0  # highest _used seen (tests, benchmarks)
        self.streams_started = 0  # streaming decoders started at a frame start
        self.frames_decoded = 0  # cacheable frames decoded whole
        self.streamed_bytes = 0  # bytes decoded by streaming decoders (skipped ones included)
        self._index_cache: OrderedDict[Identity, _Index] = OrderedDict()
        self._failed: OrderedDict[Identity, tuple[type[CorruptError], str]] = OrderedDict()
        self._frames: OrderedDict[tuple[Identity, int], bytes] = OrderedDict()
        self._frame_bytes = 0
        self._verified: OrderedDict[tuple[Identity, int], None] = OrderedDict()
        self._inflight: dict[tuple[object, ...], threading.Event] = {}
        self._streams: dict[tuple[Identity, int], list[_Stream]] = {}
        self._idle: OrderedDict[_Stream, None] = OrderedDict()  # parked streams, LRU first
        self._janitor: threading.Thread | None = None
        self._prefetch_queue: collections.deque[_Stream] = collections.deque()
        self._prefetcher: threading.Thread | None = None
        # Frames queued for decode_ahead and not decoded by anyone yet -> their sizes.
        self._ahead: dict[tuple[Identity, int], int] = {}
        self._ahead_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.spill_dir = spill_dir
        self.spill_limit = spill_limit
        self.spill_idle = spill_idle
        self.spill_keep_free = (SPILL_FREE_SHARE, SPILL_MIN_FREE)  # share of the fs, bytes
        self._spills: OrderedDict[tuple[Identity, int], _Spill] = OrderedDict()  # LRU first
        self._spill_bytes = 0
        #: Copies being written by a checking pass (not kept yet), so that they can be stopped.
        self._writing: weakref.WeakSet[_Spill] = weakref.WeakSet()
        self.spills_given_back = 0  # times copies were dropped because a write needed the space
        self.spills_skipped = 0  # big frames checked without a copy (no room, no O_TMPFILE)

    # ---------------------------------------------------------------- accounting
    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    def stream_count(self) -> int:
        with self._cond:
            return sum(len(v) for v in self._streams.values())

    def reserve(self, nbytes: int, what: str, *, never_wait: bool = False) -> None:
        """Take ``nbytes`` of the budget, evicting or waiting as needed (see the class doc)."""
        if nbytes > self.memory:
            raise DecodeLimitError(f"{what} needs {_gib(nbytes)} of decoder memory, more than "
                                   f"the budget of {_gib(self.memory)}")
        deadline = time.monotonic() + RESERVE_TIMEOUT
        with self._cond:
            while self._used + nbytes > self.memory:
                if self._evict_one_locked():
                    continue
                if never_wait and nbytes <= SMALL_RESERVATION:
                    break  # never block a small decode (it may run on the event loop)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusyError(f"{what}: the decoder budget stayed busy for "
                                           f"{RESERVE_TIMEOUT:.0f} s")
                self._cond.wait(min(left, 1.0))
            self._used += nbytes
            self.peak = max(self.peak, self._used)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._used -= nbytes
            self._cond.notify_all()

    def _evict_one_locked(self) -> bool:
        if self._frames:
            _key, data = self._frames.popitem(last=False)
            self._frame_bytes -= len(data)
            self._used -= len(data)
            return True
        if self._idle:
            stream, _ = self._idle.popitem(last=False)
            self._drop_stream_locked(stream)
            return True
        return False

    def _drop_stream_locked(self, stream: _Stream) -> None:
        streams = self._streams.get(stream.key)
        if streams is not None and stream in streams:
            streams.remove(stream)
            if not streams:
                del self._streams[stream.key]
        self._idle.pop(stream, None)
        stream.close()
        self._used -= stream.cost
        self._cond.notify_all()

    # ---------------------------------------------------------------- knobs and caches
    def set_cache_limit(self, nbytes: int) -> int:
        """Set the decoded-frame cache bound; returns the previous one (tests restore it)."""
        with self._cond:
            previous, self.cache_limit = self.cache_limit, max(0, min(nbytes, self.memory))
            self._trim_cache_locked(0)
            self._cond.notify_all()
        return previous

    def clear(self) -> None:
        """Forget every cached index, decoded frame, verification mark and parked decoder."""
        with self._cond:
            self._index_cache.clear()
            self._failed.clear()
            self._used -= self._frame_bytes
            self._frames.clear()
            self._frame_bytes = 0
            self._verified.clear()
            for key in list(self._spills):
                self._drop_spill_locked(key)
            self._prefetch_queue.clear()
            for streams in list(self._streams.values()):
                for stream in list(streams):
                    if stream.busy:
                        stream.doomed = True  # dropped when its holder is done with it
                    else:
                        self._drop_stream_locked(stream)
            self._cond.notify_all()

    def _janitor_loop(self) -> None:
        """Drop parked decoders and decoded copies once idle (both kept in least recently used
        order, so only the oldest of each is ever due)."""
        with self._cond:
            while (self._idle and self.idle_seconds > 0) or self._spills:
                now = time.monotonic()
                wait = 3600.0
                if self._idle and self.idle_seconds > 0:
                    oldest = next(iter(self._idle))
                    due = oldest.last_used + self.idle_seconds - now
                    if due <= 0:
                        self._drop_stream_locked(oldest)
                        continue
                    wait = min(wait, due)
                if self._spills and self.spill_idle > 0:
                    key, spill = next(iter(self._spills.items()))
                    due = spill.last_used + self.spill_idle - now
                    if due <= 0:
                        self._drop_spill_locked(key)
                        continue
                    wait = min(wait, due)
                if self._spills:
                    # Copies give their room back when the filesystem fills up (other writers
                    # come first): looked at every SPILL_ROOM_CHECK seconds while any is held.
                    if self._short_of_room():
                        for key in list(self._spills):
                            self._drop_spill_locked(key)
                        continue
                    wait = min(wait, SPILL_ROOM_CHECK)
                self._cond.wait(wait)
            self._janitor = None

    def _start_janitor_locked(self) -> None:
        if self._janitor is None and (self.idle_seconds > 0 or self._spills):
            self._janitor = threading.Thread(target=self._janitor_loop, daemon=True,
                                             name="zstfs-decoder-janitor")
            self._janitor.start()

    # ---------------------------------------------------------------- decoded copies
    def set_spill_dir(self, dir_fd: int | None) -> None:
        """Where checked big frames are copied (an open directory; None: nowhere)."""
        with self._cond:
            self.spill_dir = dir_fd

    def spill_stats(self) -> tuple[int, int]:
        """(copies held, bytes held)."""
        with self._cond:
            return len(self._spills), self._spill_bytes

    def give_back_copies(self) -> int:
        """Someone needs the space now (a write failed with ENOSPC): drop every decoded copy,
        and stop the ones being written at their next block. Returns the bytes given back
        (a copy that a reader is reading goes when that ``pread`` returns)."""
        with self._cond:
            freed = self._spill_bytes + sum(s.size for s in self._writing if s.fd >= 0)
            for spill in self._writing:
                spill.given_up = True
            for key in list(self._spills):
                self._drop_spill_locked(key)
            if freed:
                self.spills_given_back += 1
        return freed

    def _new_spill(self, expected: int | None) -> _Spill | None:
        """An unnamed file for the decoded copy of a frame of ``expected`` bytes (None: unknown),
        or None when there is no directory, no room, or no O_TMPFILE there."""
        with self._cond:
            dir_fd = self.spill_dir
        if dir_fd is None:
            return None
        need = expected or 0
        try:
            sv = os.fstatvfs(dir_fd)
            keep = self._keep_free(sv)
            if need > self.spill_limit or sv.f_bavail * sv.f_frsize - need < keep:
                raise OSError("no room")
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError:
            self.spills_skipped += 1
            return None
        spill = _Spill(fd, self.spill_limit if expected is None else expected, keep)
        with self._cond:
            self._writing.add(spill)
        return spill

    def _keep_free(self, sv: os.statvfs_result) -> float:
        """Bytes of that filesystem that copies must leave free (``spill_keep_free``)."""
        share, least = self.spill_keep_free
        return max(sv.f_blocks * sv.f_frsize * share, least)

    def _short_of_room(self) -> bool:
        """Whether the spill directory's filesystem has less free space than copies must leave."""
        dir_fd = self.spill_dir
        if dir_fd is None:
            return False
        try:
            sv = os.fstatvfs(dir_fd)
        except OSError:
            return False
        return sv.f_bavail * sv.f_frsize < self._keep_free(sv)

    def _keep_spill(self, identity: Identity, comp_start: int, spill: _Spill | None,
                    size: int) -> None:
        """Keep a finished copy of a frame just found intact (if it is whole)."""
        if spill is None:
            return
        with self._cond:
            self._writing.discard(spill)
        if spill.fd < 0 or spill.size != size:
            self.spills_skipped += 1
            spill.close()
            return
        key = (identity, comp_start)
        with self._cond:
            if key in self._spills:
                self._drop_spill_locked(key)
            while self._spills and self._spill_bytes + size > self.spill_limit:
                self._drop_spill_locked(next(iter(self._spills)))
            self._spills[key] = spill
            self._spill_bytes += size
            spill.last_used = time.monotonic()
            self._start_janitor_locked()

    def _drop_spill_locked(self, key: tuple[Identity, int]) -> None:
        spill = self._spills.pop(key)
        self._spill_bytes -= spill.size
        if spill.pins:
            spill.doomed = True  # closed by the last reader
        else:
            spill.close()

    def _unpin_spill(self, spill: _Spill) -> None:
        with self._cond:
            spill.pins -= 1
            if spill.doomed and not spill.pins:
                spill.close()

    def spill_read(self, identity: Identity, comp_start: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of a checked frame from its decoded copy, or None without one."""
        key = (identity, comp_start)
        with self._cond:
            spill = self._spills.get(key)
            if spill is None:
                return None
            self._spills.move_to_end(key)
            spill.last_used = time.monotonic()
            spill.pins += 1
        try:
            data = _pread_full(spill.fd, hi - lo, lo)
        finally:
            self._unpin_spill(spill)
        if len(data) != hi - lo:  # never: the copy was complete when kept
            raise CorruptError(f"frame at offset {comp_start}: decoded copy is short")
        return data

    def _trim_cache_locked(self, room: int) -> None:
        while self._frames and self._frame_bytes + room > self.cache_limit:
            _key, data = self._frames.popitem(last=False)
            self._frame_bytes -= len(data)
            self._used -= len(data)

    @property
    def cacheable_size(self) -> int:
        return min(self.cache_limit // 2, CACHED_FRAME_MAX)

    def cacheable(self, frame: _Frame) -> bool:
        """Frames up to half the cache (at most CACHED_FRAME_MAX) are decoded whole and cached;
        bigger ones are streamed (or served from their decoded copy)."""
        return frame.log_size <= self.cacheable_size

    def cached_frame(self, key: tuple[Identity, int]) -> bytes | None:
        with self._cond:
            data = self._frames.get(key)
            if data is not None:
                self._frames.move_to_end(key)
            return data

    def is_verified(self, identity: Identity, comp_start: int) -> bool:
        with self._cond:
            return (identity, comp_start) in self._verified

    def _mark_verified(self, identity: Identity, comp_start: int) -> None:
        with self._cond:
            self._verified[(identity, comp_start)] = None
            while len(self._verified) > VERIFIED_ENTRIES:
                self._verified.popitem(last=False)

    # ---------------------------------------------------------------- index
    def cached_index(self, identity: Identity) -> _Index | None:
        with self._cond:
            index = self._index_cache.get(identity)
            if index is not None:
                self._index_cache.move_to_end(identity)
            return index

    def index(self, fd: int, identity: Identity) -> _Index:
        """The cached index for this file identity, built (outside the lock) on a miss."""
        index = self.cached_index(identity)
        if index is not None:
            return index
        with self._cond:
            failed = self._failed.get(identity)
        if failed is not None:  # the same file again: the same answer, without the work
            raise failed[0](failed[1])

        def count(raw: _RawFrame) -> int:
            # Without a content size zstd allocates the whole window, but only the part the
            # output reaches becomes resident: charge the budget as the output grows.
            what = f"frame at offset {raw.start}"
            window = raw.window or self.max_frame
            charged = min(_stream_cost(window, GROW_STEP), self.memory)
            self.reserve(charged, what)

            def grow(total: int) -> None:
                nonlocal charged
                self._check_window(window, raw.start, total)
                need = min(_stream_cost(window, total + GROW_STEP), self.memory)
                if need > charged:
                    self.reserve(need - charged, what)
                    charged = need

            # A frame whose compressed extent alone is a sixteenth of the cache will likely be too
            # big to cache whole: copy it while checking it (smaller ones would only cost writes).
            spill = None
            if raw.end - raw.start >= self.cache_limit // 16:
                spill = self._new_spill(None)
            try:
                n = _count_frame(fd, raw.start, raw.end, None, self.max_frame, grow,
                                 sink=None if spill is None else spill.write)
            except BaseException:
                if spill is not None:
                    spill.close()
                raise
            finally:
                self.release(charged)
            if spill is not None and n <= self.cacheable_size:
                spill.close()  # cacheable after all: decoded whole when read
                spill = None
            self._keep_spill(identity, raw.start, spill, n)
            self._mark_verified(identity, raw.start)
            return n

        try:
            index = _build_index(fd, count)
        except CorruptError as e:
            if not isinstance(e, BudgetBusyError):
                with self._cond:
                    self._failed[identity] = (type(e), str(e))
                    while len(self._failed) > INDEX_CACHE_ENTRIES:
                        self._failed.popitem(last=False)
            raise
        with self._cond:
            self._index_cache[identity] = index
            while len(self._index_cache) > INDEX_CACHE_ENTRIES:
                self._index_cache.popitem(last=False)
        return index

    def _check_window(self, window: int, at: int, size: int | None) -> None:
        """Refuse at once a frame whose streaming decoder could never fit the budget."""
        cost = _stream_cost(window, size)
        if cost <= self.memory:
            return
        need = window if size is None else min(window, size)
        hint = ""
        if window > ZSTD_DEFAULT_WINDOW:
            bits = (window - 1).bit_length()
            hint = f" (written with a long window: `zstd -d --long={bits}`)"
        raise DecodeLimitError(
            f"frame at offset {at} needs a {_gib(need)} decoding window{hint}, more than the "
            f"decoder budget of {_gib(self.memory)}"
        )

    # ---------------------------------------------------------------- decoding
    def _once(self, key: tuple[object, ...]) -> threading.Event | None:
        """Claim ``key`` for this thread (returns its Event) or wait for the thread that has it
        (returns None after it finished): concurrent misses do the work once."""
        with self._cond:
            waiter = self._inflight.get(key)
            if waiter is None:
                done = self._inflight[key] = threading.Event()
                return done
        waiter.wait()
        return None

    def _done(self, key: tuple[object, ...], event: threading.Event) -> None:
        with self._cond:
            del self._inflight[key]
        event.set()

    def frame_bytes(self, fd: int, identity: Identity, frame_no: int, frame: _Frame) -> bytes:
        """A cacheable frame decoded whole (verified), from the cache or decoded once even when
        several threads miss it at the same moment (the kernel's parallel readahead)."""
        data = self._decode_frame(fd, identity, frame_no, frame, ahead=False)
        assert data is not None
        return data

    def _decode_frame(self, fd: int, identity: Identity, frame_no: int, frame: _Frame, *,
                      ahead: bool) -> bytes | None:
        key = (identity, frame_no)
        while True:
            data = self.cached_frame(key)
            if data is not None:
                return data
            event = self._once(("frame", identity, frame_no))
            if event is not None:
                break
        try:
            if ahead:
                with self._cond:
                    if key not in self._ahead:
                        return None  # decoded by its reader meanwhile (and maybe evicted since)
            comp = frame.comp_end - frame.comp_start
            self.reserve(frame.log_size + comp, f"frame at offset {frame.comp_start}",
                         never_wait=True)
            try:
                data = _decode_whole(fd, frame)
            except BaseException:
                self.release(frame.log_size + comp)
                raise
            self._mark_verified(identity, frame.comp_start)
            with self._cond:
                self.frames_decoded += 1  # statistics (tests)
                self._ahead.pop(key, None)  # decoded: a job queued for it has nothing to do
                self._used -= comp
                if len(data) <= self.cacheable_size and key not in self._frames:
                    self._trim_cache_locked(len(data))
                    self._frames[key] = data
                    self._frame_bytes += len(data)
                else:
                    self._used -= len(data)
                self._cond.notify_all()
            return data
        finally:
            self._done(("frame", identity, frame_no), event)

    def decode_ahead(self, fd: int, identity: Identity, frame_no: int, frame: _Frame,
                     reading: int) -> None:
        """Decode a cacheable frame into the cache in the background (AHEAD_FRAMES threads),
        unless it is there or being decoded already, for a reader of a frame of ``reading``
        bytes. Never waits for budget: a frame that does not fit now is decoded when read."""
        key = (identity, frame_no)
        with self._cond:
            # Only into room the cache has beside the frame being read and the others decoded
            # ahead (older frames are evicted first: least recently read).
            if (key in self._frames or ("frame", identity, frame_no) in self._inflight
                    or key in self._ahead or len(self._ahead) >= AHEAD_FRAMES
                    or reading + sum(self._ahead.values()) + frame.log_size > self.cache_limit
                    or self._used + frame.log_size + (frame.comp_end - frame.comp_start)
                    > self.memory):
                return
            self._ahead[key] = frame.log_size
            if self._ahead_pool is None:
                self._ahead_pool = concurrent.futures.ThreadPoolExecutor(
                    AHEAD_FRAMES, thread_name_prefix="zstfs-decode-ahead")
            pool = self._ahead_pool

        def done() -> None:
            with self._cond:
                self._ahead.pop(key, None)

        try:
            own = os.dup(fd)  # the reader's descriptor may be closed before the job runs
        except OSError:
            done()
            return

        def job() -> None:
            try:
                # Checked again once it is the one decoder of the frame: never a frame its
                # reader decoded meanwhile.
                self._decode_frame(own, identity, frame_no, frame, ahead=True)
            except (CorruptError, OSError):
                pass  # the reader that wants it decodes it again, and reports the damage
            finally:
                os.close(own)
                done()

        try:
            pool.submit(job)
        except RuntimeError:  # shut down (interpreter exit)
            os.close(own)
            done()

    def verify(self, fd: int, identity: Identity, frame: _Frame) -> None:
        """Decode a frame once in full (to nowhere) unless already verified for this identity."""
        while not self.is_verified(identity, frame.comp_start):
            key = ("verify", identity, frame.comp_start)
            event = self._once(key)
            if event is None:
                continue
            try:
                if self.is_verified(identity, frame.comp_start):
                    return
                self._check_window(frame.window, frame.comp_start, frame.log_size)
                cost = _stream_cost(frame.window, frame.log_size)
                self.reserve(cost, f"frame at offset {frame.comp_start}")
                spill = None if self.cacheable(frame) else self._new_spill(frame.log_size)
                try:
                    _check_extent(fd, frame)
                    _count_frame(fd, frame.comp_start, frame.comp_end, frame.log_size,
                                 self.max_frame, sink=None if spill is None else spill.write)
                except BaseException:
                    if spill is not None:
                        spill.close()
                    raise
                finally:
                    self.release(cost)
                self._keep_spill(identity, frame.comp_start, spill, frame.log_size)
                self._mark_verified(identity, frame.comp_start)
            finally:
                self._done(key, event)

    def stream_read(self, fd: int, identity: Identity, frame_no: int, frame: _Frame,
                    lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of a big (verified) frame from the best resumable decoder."""
        data = self.peek(identity, frame_no, lo, hi)
        if data is not None:
            return data
        stream = self._checkout(fd, (identity, frame_no), frame, lo)
        ok = False
        before = stream.pos
        sequential = lo == stream.served and lo > 0
        try:
            data = stream.read(lo, hi)
            ok = True
            return data
        finally:
            self.streamed_bytes += stream.pos - before  # statistics: races only blur them
            self._checkin(stream, keep=ok, prefetch=sequential)

    def peek(self, identity: Identity, frame_no: int, lo: int, hi: int) -> bytes | None:
        """Bytes ``[lo, hi)`` of a streamed frame if a decoder already has them (decoded ahead
        by the prefetcher, or just behind); never decodes, never waits for a decoder."""
        with self._cond:
            for stream in self._streams.get((identity, frame_no), ()):
                data = stream.peek(lo, hi)
                if data is not None:
                    stream.last_used = time.monotonic()
                    if stream in self._idle:
                        self._idle.move_to_end(stream)  # least recently used stays first
                    self._prefetch_locked(stream)
                    return data
        return None

    def _prefetch_locked(self, stream: _Stream) -> None:
        """Queue a sequentially read stream for decoding ahead (see :meth:`_prefetch_loop`)."""
        if stream.queued or stream.pos >= min(stream.served + STREAM_AHEAD,
                                              stream.frame.log_size):
            return
        stream.queued = True
        self._prefetch_queue.append(stream)
        self._cond.notify_all()
        if self._prefetcher is None:
            self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                name="zstfs-decoder-prefetch")
            self._prefetcher.start()

    def _prefetch_loop(self) -> None:
        """Decode ahead of sequential readers, one chunk per turn, on its own thread (the decoder
        releases the GIL): `cat` then decodes on one core while the FUSE layer ships on the
        other, and a reader that wants the stream waits at most one chunk."""
        while True:
            with self._cond:
                idle_since = time.monotonic()
                while not self._prefetch_queue:
                    if time.monotonic() - idle_since > 5.0:
                        self._prefetcher = None
                        return
                    self._cond.wait(1.0)
                stream = self._prefetch_queue.popleft()
                stream.queued = False
                if stream.busy or stream not in self._streams.get(stream.key, ()):
                    continue
                stream.busy = True
                self._idle.pop(stream, None)
            more = drop = False
            before = stream.pos
            try:
                more = stream.prefetch()
            except CorruptError:
                drop = True
            self.streamed_bytes += stream.pos - before
            with self._cond:
                stream.busy = False
                if drop or stream.doomed:
                    self._drop_stream_locked(stream)
                    continue
                self._idle[stream] = None
                if more:
                    self._prefetch_locked(stream)
                self._cond.notify_all()

    def _checkout(self, fd: int, key: tuple[Identity, int], frame: _Frame, lo: int) -> _Stream:
        deadline = time.monotonic() + RESERVE_TIMEOUT
        while True:
            with self._cond:
                streams = self._streams.get(key, [])
                best: _Stream | None = None
                for s in streams:
                    w = s.work(lo)
                    if w >= 0 and (best is None or w < best.work(lo)):
                        best = s
                if best is not None and not best.busy:
                    best.busy = True
                    best.pinned = lo
                    self._idle.pop(best, None)
                    return best
                if best is None and len(streams) >= STREAMS_PER_FRAME:
                    # Make room among this frame's decoders: the parked one furthest along
                    # is the least likely to serve a read that had to start over.
                    parked = [s for s in streams if not s.busy]
                    if parked:
                        self._drop_stream_locked(max(parked, key=lambda s: s.pos))
                        best = None
                    else:
                        best = streams[0]  # all busy: wait for one
                if best is None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusyError(f"frame at offset {frame.comp_start}: its decoders "
                                           f"stayed busy for {RESERVE_TIMEOUT:.0f} s")
                self._cond.wait(min(left, 1.0))  # a busy decoder ahead of us: wait for it
        cost = _stream_cost(frame.window, frame.log_size)
        self.reserve(cost, f"frame at offset {frame.comp_start}")
        try:
            stream = _Stream(fd, key, frame, cost, self._cond)
            stream.pinned = lo
        except BaseException:
            self.release(cost)
            raise
        with self._cond:
            self._streams.setdefault(key, []).append(stream)
            self.streams_started += 1
        return stream

    def _checkin(self, stream: _Stream, *, keep: bool, prefetch: bool = False) -> None:
        with self._cond:
            stream.busy = False
            stream.pinned = None
            stream.last_used = time.monotonic()
            if not keep or stream.doomed:
                self._drop_stream_locked(stream)
                return
            self._idle[stream] = None
            if prefetch:
                self._prefetch_locked(stream)
            self._cond.notify_all()
            self._start_janitor_locked()


_default_decoders: Decoders | None = None
_default_lock = threading.Lock()


def default_decoders() -> Decoders:
    """The process's shared budget, used by readers that are not given their own."""
    global _default_decoders
    with _default_lock:
        if _default_decoders is None:
            _default_decoders = Decoders()
        return _default_decoders


def _forget_default_after_fork() -> None:
    """A forked child (the daemon detaching after recovery) gets a fresh default budget: the
    parent's janitor and prefetch threads do not exist in it, and its lock may have been held."""
    global _default_decoders, _default_lock
    old, _default_decoders, _default_lock = _default_decoders, None, threading.Lock()
    if old is not None:
        for streams in old._streams.values():
            for stream in streams:
                with contextlib.suppress(OSError):
                    stream.close()
        for spill in old._spills.values():
            spill.close()


os.register_at_fork(after_in_child=_forget_default_after_fork)


def set_cache_limit(nbytes: int) -> int:
    """Set the default budget's decoded-frame cache bound; returns the previous bound."""
    return default_decoders().set_cache_limit(nbytes)


def clear_caches() -> None:
    """Forget the default budget's cached indexes, frames, marks and parked decoders."""
    default_decoders().clear()


# --------------------------------------------------------------------------------------------
# Random access


class ZstReader:
    """Random-access reader over one ``.zst`` file descriptor.

    The caller owns ``fd`` and keeps it open while the reader is in use.  Only ``os.pread`` is used,
    so one reader may serve several threads at once.  The frame index, decoded frames and resumable
    decoders live in a :class:`Decoders` budget keyed by the file identity, so readers of the same
    unchanged file share them; a reader itself holds no decoder between reads.
    """

    def __init__(self, fd: int, decoders: Decoders | None = None) -> None:
        self._fd = fd
        self._identity = _identity(fd)
        self._dec = decoders if decoders is not None else default_decoders()

    def _index(self) -> _Index:
        return self._dec.index(self._fd, self._identity)

    @property
    def size(self) -> int:
        """Logical (decoded) size: from the seek table or frame headers; decodes only frames
        without a content size (once per file, cached)."""
        return self._index().size

    @property
    def seekable(self) -> bool:
        """Whether the file has a seek table (zstfs's own files always do)."""
        return self._index().seekable

    def read(self, offset: int, length: int) -> bytes:
        """Like ``pread`` on the decoded bytes: short only at EOF; decodes only needed frames."""
        return self._read(offset, length, decode=True) or b""

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes of ``read(offset, length)`` if every needed frame is already decoded in the
        cache, else None.  Never decodes, so the FUSE layer may call it on the event-loop thread."""
        return self._read(offset, length, decode=False)

    def _read(self, offset: int, length: int, *, decode: bool) -> bytes | None:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        index = self._index() if decode else self._dec.cached_index(self._identity)
        if index is None:
            return None
        end = min(offset + length, index.size)
        # Frames whose length is only the table's claim must have been checked before any byte
        # after their start is served, and all of them before EOF is (or the table may hide
        # bytes: short data).
        if index.unsized and length and not self._sizes_checked(
                index, end if offset + length <= index.size else MAX_CONTENT_SIZE, decode):
            return None
        # Empty frames serve no byte, so only a read that reaches EOF (claiming the file ends
        # there) checks them: a damaged one is damage, as `zstd -d` says.
        if index.empty and length and offset + length > index.size:
            for frame in index.empty:
                if not self._dec.is_verified(self._identity, frame.comp_start):
                    if not decode:
                        return None
                    self._dec.verify(self._fd, self._identity, frame)
        if offset >= end:
            return b""
        frame_no = index.frame_at(offset)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            frame = index.frames[frame_no]
            lo = pos - frame.log_start
            hi = min(end, frame.log_start + frame.log_size) - frame.log_start
            part = self._frame_slice(frame_no, frame, lo, hi, decode=decode)
            if part is None:
                return None
            parts.append(part)
            pos = frame.log_start + hi
            frame_no += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _sizes_checked(self, index: _Index, end: int, decode: bool) -> bool:
        """Every frame whose length is only a seek-table claim and that lies before ``end`` has
        been decoded once and matched the claim (offsets after it depend on that length)."""
        for frame in index.unsized:
            if frame.log_start >= end:
                break
            if self._dec.is_verified(self._identity, frame.comp_start):
                continue
            if not decode:
                return False
            self._check_size(frame)
            if frame.log_size and self._dec.cacheable(frame):
                # Decoded whole with its exact length checked, and cached for the read itself.
                frame_no = index.frame_at(frame.log_start)
                self._dec.frame_bytes(self._fd, self._identity, frame_no, index.frames[frame_no])
            else:
                self._dec.verify(self._fd, self._identity, frame)
        return True

    def _check_size(self, frame: _Frame) -> None:
        if frame.log_size > self._dec.max_frame:
            raise DecodeLimitError(
                f"frame at offset {frame.comp_start} decodes to {_gib(frame.log_size)}, more than "
                f"the {_gib(self._dec.max_frame)} zstfs decodes for a read (decode it with "
                "`zstd -d`, or let zstfs re-encode it)"
            )

    def _frame_slice(
        self, frame_no: int, frame: _Frame, lo: int, hi: int, *, decode: bool
    ) -> bytes | None:
        """Bytes ``[lo, hi)`` of one frame: from the shared cache, or a resumable stream."""
        self._check_size(frame)
        if not self._dec.cacheable(frame):
            if not decode:
                if not self._dec.is_verified(self._identity, frame.comp_start):
                    return None
                data = self._dec.spill_read(self._identity, frame.comp_start, lo, hi)
                if data is not None:
                    return data
                return self._dec.peek(self._identity, frame_no, lo, hi)
            self._dec.verify(self._fd, self._identity, frame)
            data = self._dec.spill_read(self._identity, frame.comp_start, lo, hi)
            if data is not None:
                return data
            return self._dec.stream_read(self._fd, self._identity, frame_no, frame, lo, hi)
        key = (self._identity, frame_no)
        data = self._dec.cached_frame(key)
        if data is None:
            if not decode:
                return None
            self._read_ahead(frame_no + 1)
            data = self._dec.frame_bytes(self._fd, self._identity, frame_no, frame)
        if hi * 2 > frame.log_size:
            # Past the middle of a frame, a reader that goes on wants the next ones: they are
            # decoded on other cores meanwhile (`grep -r`, `cat`, codex reading a rollout).
            for ahead in range(1, AHEAD_FRAMES + 1):
                self._decode_ahead(frame_no + ahead, frame.log_size)
        if lo == 0 and hi == len(data):
            return data
        return data[lo:hi]

    def _decode_ahead(self, frame_no: int, reading: int) -> None:
        index = self._dec.cached_index(self._identity)
        if index is None or frame_no >= len(index.frames):
            return
        frame = index.frames[frame_no]
        if self._dec.cacheable(frame):
            self._dec.decode_ahead(self._fd, self._identity, frame_no, frame, reading)

    def _read_ahead(self, frame_no: int) -> None:
        """Ask the kernel to fetch the next frame's compressed bytes while this one decodes:
        a sequential reader then rarely waits for the disk."""
        frames = self._index().frames
        if frame_no < len(frames):
            nxt = frames[frame_no]
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, nxt.comp_start, nxt.comp_end - nxt.comp_start,
                                 os.POSIX_FADV_WILLNEED)


def logical_size(fd: int) -> int:
    """The decoded size of a ``.zst`` file; shares the index cache with :class:`ZstReader`."""
    return ZstReader(fd).size


# --------------------------------------------------------------------------------------------
# Whole-file decode and verification


def _checked_frames(fd: int) -> Iterator[tuple[_RawFrame, int | None]]:
    """Every zstd frame of the file with its expected decoded size, after full structural checks.

    Walks the whole file (ignoring any seek table) and, if a seek table is present, requires it to
    describe exactly the frames found: same extents, sizes and checksums.
    """
    fsize = os.fstat(fd).st_size
    if fsize == 0:
        raise CorruptError("not zstd: empty file")
    table = _read_seek_table(fd, fsize)
    walked = list(_walk_frames(fd, fsize))
    if table is None:
        for kind, _start, _end, raw in walked:
            if kind == "zstd" and raw is not None:
                yield raw, raw.content_size
        return
    entries, _table_len = table
    body = walked[:-1]
    if not walked or walked[-1][0] != "skip" or len(body) != len(entries):
        raise CorruptError(f"seek table: lists {len(entries)} frames, file has {len(body)}")
    for i, ((kind, start, end, raw), entry) in enumerate(zip(body, entries, strict=True)):
        if kind != "zstd" or raw is None or (start, end) != (entry.start, entry.end):
            raise CorruptError(f"seek table: frame {i} at offset {entry.start} does not match")
        if raw.content_size is not None and raw.content_size != entry.size:
            raise CorruptError(f"seek table: size of frame {i} at offset {start} does not match")
        if None not in (raw.checksum, entry.checksum) and raw.checksum != entry.checksum:
            raise CorruptError(
                f"seek table: checksum of frame {i} at offset {start} does not match"
            )
        yield raw, entry.size


def _decode_all(fd: int, sink: Callable[[bytes], None], progress: ProgressFn | None) -> int:
    """Decode the whole file into ``sink`` chunk by chunk; returns the decoded length."""
    total = 0
    for raw, expected in _checked_frames(fd):
        for chunk in _iter_decoded(fd, raw.start, raw.end, expected):
            sink(chunk)
            total += len(chunk)
            if progress is not None:
                progress(total)
    return total


def decompress_file(
    src_fd: int, dst_fd: int, *, progress: ProgressFn | None = None, threads: int = 1
) -> int:
    """Stream-decode any valid ``.zst`` into ``dst_fd`` with bounded memory; returns bytes written.

    Checks everything :func:`verify_file` checks.  On CorruptError part of the output may already
    be written; the caller writes to a temp file and discards it.  With ``threads`` > 1, a file
    with a seek table (frames of known size, independent by construction) has that many frames
    decoded at once, each written at its own offset: promotion of a big file is then bound by
    the disk, not one core.  Memory: ``threads`` frames.
    """
    if threads > 1:
        index = default_decoders().index(src_fd, _identity(src_fd))
        if (index.seekable and len(index.frames) > 1
                and max(f.log_size for f in index.frames) <= PARALLEL_FRAME_LIMIT):
            return _decode_parallel(src_fd, dst_fd, index, threads, progress)
    return _decode_all(src_fd, lambda chunk: _write_all(dst_fd, chunk), progress)


#: Frames decoded whole in parallel by promotion at most this big; bigger ones (other writers'
#: seekable files) are streamed.
PARALLEL_FRAME_LIMIT = 64 << 20


def _decode_parallel(
    src_fd: int, dst_fd: int, index: _Index, threads: int, progress: ProgressFn | None
) -> int:
    """Decode the frames of a seekable file `threads` at a time, in order, verified each.

    The frames in flight are charged to the default decoder budget (evicting cached frames), so
    a promotion does not add its own frames on top of everything the readers hold."""
    written = 0
    frames = list(index.frames)
    budget = default_decoders()
    pending: collections.deque[tuple[_Frame, concurrent.futures.Future[bytes]]] = (
        collections.deque()
    )

    def cost(frame: _Frame) -> int:
        return frame.log_size + frame.comp_end - frame.comp_start

    def write_next() -> None:
        nonlocal written
        frame, future = pending.popleft()
        try:
            written += _write_frame(dst_fd, frame, future)
        finally:
            budget.release(cost(frame))
        if progress is not None:
            progress(written)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        try:
            for frame in frames:
                budget.reserve(cost(frame), f"frame at offset {frame.comp_start}")
                pending.append((frame, pool.submit(_decode_whole, src_fd, frame)))
                if len(pending) >= threads:
                    write_next()
            while pending:
                write_next()
        finally:
            while pending:  # an error: wait for the decodes in flight, give their room back
                frame, future = pending.popleft()
                concurrent.futures.wait([future])
                budget.release(cost(frame))
    if written != index.size:
        raise CorruptError(f"decoded {written} bytes, the seek table says {index.size}")
    return written


def _write_frame(dst_fd: int, frame: _Frame, future: concurrent.futures.Future[bytes]) -> int:
    data = memoryview(future.result())
    pos = 0
    while pos < len(data):
        pos += os.pwrite(dst_fd, data[pos : pos + WRITE_CHUNK], frame.log_start + pos)
    return len(data)


def verify_file(src_fd: int) -> int:
    """Decode everything to nowhere, checking structure, checksums and the seek table.

    Reads the file afresh (no caches), so it checks what is on disk now.  Returns the logical size.
    """
    return _decode_all(src_fd, lambda chunk: None, None)


def verify_equal(zst_fd: int, plain_fd: int, progress: ProgressFn | None = None) -> None:
    """Check that ``zst_fd`` decodes to exactly the bytes of ``plain_fd`` (streaming).

    The compactor calls this before it deletes a plain file, so a bad compression can never lose
    data.  Any difference, including length, raises CorruptError with the first differing offset.
    """
    pos = 0

    def compare(chunk: bytes) -> None:
        nonlocal pos
        plain = _pread_full(plain_fd, len(chunk), pos)
        if plain != chunk:
            at = pos + next(
                (i for i, (a, b) in enumerate(zip(plain, chunk, strict=False)) if a != b),
                min(len(plain), len(chunk)),
            )
            raise CorruptError(f"content differs from the plain file at offset {at}")
        pos += len(chunk)

    _decode_all(zst_fd, compare, progress)
    if os.pread(plain_fd, 1, pos):
        raise CorruptError(f"plain file is longer than the decoded {pos} bytes")


# --------------------------------------------------------------------------------------------
# Adoption of foreign .zst files


def is_native(fd: int, params: CodecParams = CodecParams()) -> bool:
    """True iff the file is already in zstfs's own format, as :func:`compress_file` writes it.

    That is: a seek table with checksums, every frame stating its content size (equal to the
    table's) and carrying a checksum (equal to the table's), windows zstd decodes without
    ``--long``, and no frame bigger than ``params.frame_size``, so any read decodes at most one
    frame.  Reads the table and the frame headers only (nothing is decoded), so it does not vouch
    for the frames' content; a file damaged in its structure is not native (False).  Files that
    are not native (codex's single frames, ``zstd`` CLI output, other seekable writers) are what
    :func:`reencode` is for.
    """
    try:
        fsize = os.fstat(fd).st_size
        table = _read_seek_table(fd, fsize)
        if table is None:
            return False
        entries, _table_len = table
        if any(entry.checksum is None for entry in entries):
            return False
        for entry in entries:
            header = _read_header(fd, entry.start, entry.end)
            if (header.content_size != entry.size or not header.has_checksum
                    or header.window > ZSTD_DEFAULT_WINDOW or entry.size > params.frame_size):
                return False
            trailer = _pread_exact(fd, 4, entry.end - 4, "frame checksum")
            if int.from_bytes(trailer, "little") != entry.checksum:
                return False
        return True
    except CorruptError:
        return False


class _DecodedSource:
    """``read(n)`` over the decoded content of a whole ``.zst`` (every check of
    :func:`verify_file`), n bytes at a time in bounded memory: the source of :func:`reencode`."""

    def __init__(self, fd: int, max_window: int) -> None:
        self._chunks = _decoded_chunks(fd, max_window)
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int) -> bytes:
        while len(self._buf) < n and not self._eof:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._eof = True
            else:
                self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _decoded_chunks(fd: int, max_window: int) -> Iterator[bytes]:
    for raw, expected in _checked_frames(fd):
        size = raw.content_size if raw.content_size is not None else expected
        need = raw.window if size is None else min(raw.window, size)
        if need > max_window:
            bits = max(need - 1, 1).bit_length()
            raise DecodeLimitError(
                f"frame at offset {raw.start} needs a {_gib(need)} decoding window "
                f"(`zstd -d --long={bits}`), more than the {_gib(max_window)} allowed"
            )
        yield from _iter_decoded(fd, raw.start, raw.end, expected)


def _content_size(fd: int, max_window: int) -> int:
    """The decoded size of a whole ``.zst``: from headers and table, or by decoding it once."""
    total = 0
    for raw, expected in _checked_frames(fd):
        size = raw.content_size if raw.content_size is not None else expected
        if size is None:
            return sum(len(chunk) for chunk in _decoded_chunks(fd, max_window))
        total += size
    return total


def reencode(
    src_fd: int,
    dst_fd: int,
    params: CodecParams = CodecParams(),
    *,
    progress: ProgressFn | None = None,
    max_window: int = ZSTD_DEFAULT_WINDOW,
) -> tuple[int, int]:
    """Re-encode any valid ``.zst`` (``src_fd``) into zstfs's format in the fresh ``dst_fd``.

    Streams decode -> encode in bounded memory (about two frames of ``params.frame_size`` plus the
    source's decoding window; a window above ``max_window``, by default zstd's own limit of
    2**27, raises :class:`DecodeLimitError`: pass more to adopt `--long` files, offline).
    The source is fully checked while it is decoded (structure, checksums, sizes, seek table):
    a damaged source raises :class:`CorruptError` and ``dst_fd`` must be discarded.  A source
    whose frames do not state their sizes is decoded twice (once to learn the size, which the
    frame plan needs).  Returns ``(logical_bytes, stored_bytes)``; check the result with
    :func:`verify_reencoded` before replacing the source.
    """
    expected = _content_size(src_fd, max_window)
    source = _DecodedSource(src_fd, max_window)
    logical, stored = _compress_stream(source.read, expected, dst_fd, params, progress,
                                       exact=True)
    if logical != expected or source.read(1):
        raise CorruptError(f"source decoded to a different length than its {expected} bytes")
    return logical, stored


def verify_reencoded(new_fd: int, src_fd: int, *, max_window: int = ZSTD_DEFAULT_WINDOW) -> int:
    """Check that the ``.zst`` ``new_fd`` decodes to exactly what the ``.zst`` ``src_fd``
    decodes to (both fully checked, streaming, bounded memory); returns the logical size.

    Any difference, including length, raises :class:`CorruptError` with the first differing
    offset.
    """
    source = _DecodedSource(src_fd, max_window)
    pos = 0

    def compare(chunk: bytes) -> None:
        nonlocal pos
        theirs = source.read(len(chunk))
        if theirs != chunk:
            at = pos + next(
                (i for i, (a, b) in enumerate(zip(theirs, chunk, strict=False)) if a != b),
                min(len(theirs), len(chunk)),
            )
            raise CorruptError(f"content differs from the source .zst at offset {at}")
        pos += len(chunk)

    _decode_all(new_fd, compare, None)
    if source.read(1):
        raise CorruptError(f"the source .zst is longer than the re-encoded {pos} bytes")
    return pos
