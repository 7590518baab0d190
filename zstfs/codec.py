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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import zstandard

__all__ = [
    "CodecParams",
    "CorruptError",
    "ZstReader",
    "clear_caches",
    "compress_file",
    "decompress_file",
    "logical_size",
    "set_cache_limit",
    "verify_equal",
    "verify_file",
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
    cctx = _compressor(params)
    entries: list[tuple[int, int, int]] = []
    consumed = stored = 0
    # os.pread allocates its full request up front; asking for 16 MiB to read a 50 KB file costs
    # more than compressing it, so ask for what fstat says is left (at least 1 byte to see EOF).
    expected = os.fstat(src_fd).st_size
    plan = _frame_plan(expected, params.frame_size)
    while True:
        want = plan.pop(0) if plan else min(params.frame_size, max(expected - consumed, 1))
        data = _pread_full(src_fd, want, consumed)
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
        if len(data) < want:
            break
    table = _seek_table(entries)
    _write_all(dst_fd, table)
    return consumed, stored + len(table)


#: A multi-frame file ends with a frame of at most this much input: `tail`, `less +G` and codex's
#: reverse scan read the end of a rollout, and this makes that cost one small decode instead of
#: up to a whole frame, for well under 1 % of the stored size.
TAIL_FRAME = 2**20


def _frame_plan(size: int, frame_size: int) -> list[int]:
    """Uncompressed sizes of the frames for a file of `size` bytes: full frames, then the rest
    with its last `TAIL_FRAME` bytes split off (only for files that need several frames anyway,
    so small files keep the ratio of a single frame)."""
    tail = min(TAIL_FRAME, frame_size // 8)
    if size <= frame_size or tail == 0:
        return []
    full, rest = divmod(size, frame_size)
    plan = [frame_size] * full
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


@dataclass(frozen=True, slots=True)
class _Header:
    length: int
    content_size: int | None
    has_checksum: bool


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
    return _Header(length, content_size, bool(fhd & 0x04))


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
    return _RawFrame(start, end, header.content_size, checksum)


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


def _count_decoded(fd: int, start: int, end: int, expected: int | None) -> int:
    """Decode a frame to nowhere and return its length (verifying it on the way)."""
    return sum(len(chunk) for chunk in _iter_decoded(fd, start, end, expected))


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


@dataclass(frozen=True)
class _Index:
    frames: tuple[_Frame, ...]  # only frames with content; empty frames never serve a read
    starts: tuple[int, ...]  # frames[i].log_start, for bisect
    size: int
    seekable: bool

    def frame_at(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1


def _index_from_table(fd: int, entries: list[_TableEntry], fsize: int) -> list[_Frame]:
    """Trust but check the seek table: each entry must start with a frame header that agrees.

    One small pread per frame (header) plus one for the trailing checksum catches a lying
    decompressed size (our frames always state it) or a shifted compressed size before any read.
    The full structural check of each extent happens when the frame is decoded.
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
        frames.append(_Frame(entry.start, entry.end, log, entry.size, header.has_checksum))
        log += entry.size
    return frames


def _index_from_walk(fd: int, fsize: int) -> list[_Frame]:
    """Index a file without a seek table by walking frame and block headers.

    A frame without a content size (``zstd`` reading stdin, codex's streaming writer) has to be
    decoded once to learn its size; that also verifies it.  The index is cached by file identity
    so this happens once per file, not per open.
    """
    frames: list[_Frame] = []
    log = 0
    for kind, _start, _end, raw in _walk_frames(fd, fsize):
        if kind != "zstd" or raw is None:
            continue
        size = raw.content_size
        if size is None:
            size = _count_decoded(fd, raw.start, raw.end, None)
            if raw.checksum is not None:
                _mark_verified(_identity(fd), raw.start)
        frames.append(_Frame(raw.start, raw.end, log, size, raw.checksum is not None))
        log += size
    return frames


def _build_index(fd: int) -> _Index:
    """Build the frame index of one ``.zst`` (seek table if present, else a structural walk)."""
    fsize = os.fstat(fd).st_size
    if fsize == 0:
        raise CorruptError("not zstd: empty file")
    table = _read_seek_table(fd, fsize)
    if table is not None:
        frames = _index_from_table(fd, table[0], fsize)
    else:
        frames = _index_from_walk(fd, fsize)
    size = frames[-1].log_start + frames[-1].log_size if frames else 0
    kept = tuple(f for f in frames if f.log_size)
    return _Index(kept, tuple(f.log_start for f in kept), size, table is not None)


# --------------------------------------------------------------------------------------------
# Module caches

Identity = tuple[int, int, int, int]

INDEX_CACHE_ENTRIES = 4096
VERIFIED_ENTRIES = 4096
# Two default (32 MiB) frames: the half rule below keeps zstfs's own frames cacheable, so readers
# of one file share decoded frames and a sequential read decodes each frame once, while the
# daemon stays within its memory budget (decodes in flight come on top of this).
DEFAULT_CACHE_LIMIT = 64 * 2**20

_lock = threading.Lock()
_index_cache: OrderedDict[Identity, _Index] = OrderedDict()
_frame_cache: OrderedDict[tuple[Identity, int], bytes] = OrderedDict()
_frame_cache_bytes = 0
_cache_limit = DEFAULT_CACHE_LIMIT
# Big frames are streamed, so their checksum is only checked at the frame end; (identity, frame
# start) of big frames already decoded once in full, so later streamed reads are known good.
_verified: OrderedDict[tuple[Identity, int], None] = OrderedDict()
# Frames being decoded right now, so concurrent misses on one frame wait instead of re-decoding.
_inflight: dict[tuple[Identity, int], threading.Event] = {}


def set_cache_limit(nbytes: int) -> int:
    """Set the decoded-frame cache bound in bytes; returns the previous bound (tests restore it)."""
    global _cache_limit
    with _lock:
        previous, _cache_limit = _cache_limit, max(0, nbytes)
        _evict_locked()
    return previous


def clear_caches() -> None:
    """Forget every cached index, decoded frame and verification mark (benchmarks, tests)."""
    global _frame_cache_bytes
    with _lock:
        _index_cache.clear()
        _frame_cache.clear()
        _verified.clear()
        _frame_cache_bytes = 0


def _evict_locked() -> None:
    global _frame_cache_bytes
    while _frame_cache and _frame_cache_bytes > _cache_limit:
        _key, data = _frame_cache.popitem(last=False)
        _frame_cache_bytes -= len(data)


def _cacheable(frame: _Frame) -> bool:
    """Frames above half the cache are streamed, so one file cannot flush everyone else."""
    return frame.log_size <= _cache_limit // 2


def _cache_get(key: tuple[Identity, int]) -> bytes | None:
    with _lock:
        data = _frame_cache.get(key)
        if data is not None:
            _frame_cache.move_to_end(key)
        return data


def _cache_put(key: tuple[Identity, int], data: bytes) -> None:
    global _frame_cache_bytes
    with _lock:
        if key in _frame_cache or len(data) > _cache_limit // 2:
            return
        _frame_cache[key] = data
        _frame_cache_bytes += len(data)
        _evict_locked()


def _decode_shared(fd: int, key: tuple[Identity, int], frame: _Frame) -> bytes:
    """Decode a cacheable frame once even when several threads miss it at the same moment.

    The kernel's readahead sends parallel reads for neighbouring pages, which all land in the
    same frame; without this each would decode the same 32 MiB.
    """
    while True:
        with _lock:
            waiter = _inflight.get(key)
            if waiter is None:
                done = _inflight[key] = threading.Event()
        if waiter is None:
            break
        waiter.wait()
        data = _cache_get(key)
        if data is not None:
            return data
    try:
        _make_room(frame.log_size)
        data = _decode_whole(fd, frame)
        _cache_put(key, data)
        return data
    finally:
        with _lock:
            del _inflight[key]
        done.set()


def _make_room(nbytes: int) -> None:
    """Evict before decoding, not after: the daemon's peak memory is the cache bound plus the
    decodes in flight, not the bound plus one more frame."""
    global _frame_cache_bytes
    with _lock:
        while _frame_cache and _frame_cache_bytes + nbytes > _cache_limit:
            _key, old = _frame_cache.popitem(last=False)
            _frame_cache_bytes -= len(old)


def _mark_verified(identity: Identity, comp_start: int) -> None:
    with _lock:
        _verified[(identity, comp_start)] = None
        while len(_verified) > VERIFIED_ENTRIES:
            _verified.popitem(last=False)


def _is_verified(identity: Identity, comp_start: int) -> bool:
    with _lock:
        return (identity, comp_start) in _verified


def _cached_index(identity: Identity) -> _Index | None:
    with _lock:
        index = _index_cache.get(identity)
        if index is not None:
            _index_cache.move_to_end(identity)
        return index


def _get_index(fd: int, identity: Identity) -> _Index:
    """The cached index for this file identity, built (outside the lock) on a miss."""
    index = _cached_index(identity)
    if index is not None:
        return index
    index = _build_index(fd)
    with _lock:
        _index_cache[identity] = index
        while len(_index_cache) > INDEX_CACHE_ENTRIES:
            _index_cache.popitem(last=False)
    return index


# --------------------------------------------------------------------------------------------
# Random access


class _Stream:
    """A decoder positioned inside one big frame, so sequential reads continue where they ended."""

    def __init__(self, fd: int, frame_no: int, frame: _Frame) -> None:
        self.frame_no = frame_no
        self.frame = frame
        self.pos = 0
        self._reader = _decompressor().stream_reader(
            _PreadSource(fd, frame.comp_start, frame.comp_end),
            read_size=IO_CHUNK,
            read_across_frames=False,
            closefd=False,
        )

    def _read(self, n: int) -> bytes:
        try:
            data = self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise CorruptError(f"frame at offset {self.frame.comp_start}: {exc}") from exc
        if not data:
            raise CorruptError(
                f"frame at offset {self.frame.comp_start} ends at {self.pos} bytes, "
                f"expected {self.frame.log_size}"
            )
        self.pos += len(data)
        return data

    def skip_to(self, target: int) -> None:
        while self.pos < target:
            self._read(min(IO_CHUNK, target - self.pos))

    def take(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            data = self._read(min(IO_CHUNK, n))
            parts.append(data)
            n -= len(data)
        return b"".join(parts)


class ZstReader:
    """Random-access reader over one ``.zst`` file descriptor.

    The caller owns ``fd`` and keeps it open while the reader is in use.  Only ``os.pread`` is used,
    so one reader may serve several threads at once.  The frame index and decoded frames live in
    module caches keyed by the file identity, so readers of the same unchanged file share them.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._identity = _identity(fd)
        self._stream: _Stream | None = None
        self._stream_lock = threading.Lock()

    def _index(self) -> _Index:
        return _get_index(self._fd, self._identity)

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
        index = self._index() if decode else _cached_index(self._identity)
        if index is None:
            return None
        end = min(offset + length, index.size)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        frame_no = index.frame_at(offset)
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

    def _frame_slice(
        self, frame_no: int, frame: _Frame, lo: int, hi: int, *, decode: bool
    ) -> bytes | None:
        """Bytes ``[lo, hi)`` of one frame: from the shared cache, or the per-reader stream."""
        if not _cacheable(frame):
            return self._stream_slice(frame_no, frame, lo, hi) if decode else None
        key = (self._identity, frame_no)
        data = _cache_get(key)
        if data is None:
            if not decode:
                return None
            self._read_ahead(frame_no + 1)
            data = _decode_shared(self._fd, key, frame)
        if lo == 0 and hi == len(data):
            return data
        return data[lo:hi]

    def _read_ahead(self, frame_no: int) -> None:
        """Ask the kernel to fetch the next frame's compressed bytes while this one decodes:
        a sequential reader then rarely waits for the disk."""
        frames = self._index().frames
        if frame_no < len(frames):
            nxt = frames[frame_no]
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, nxt.comp_start, nxt.comp_end - nxt.comp_start,
                                 os.POSIX_FADV_WILLNEED)

    def _stream_slice(self, frame_no: int, frame: _Frame, lo: int, hi: int) -> bytes:
        """Serve a big frame by streaming; restart from the frame start only when seeking back.

        A streamed frame's checksum is only checked at its end, so a frame with a checksum is
        decoded once in full before its first byte is served (remembered per file identity).
        """
        if frame.has_checksum and not _is_verified(self._identity, frame.comp_start):
            _check_extent(self._fd, frame)
            _count_decoded(self._fd, frame.comp_start, frame.comp_end, frame.log_size)
            _mark_verified(self._identity, frame.comp_start)
        with self._stream_lock:
            stream = self._stream
            if stream is None or stream.frame_no != frame_no or stream.pos > lo:
                _check_extent(self._fd, frame)
                stream = self._stream = _Stream(self._fd, frame_no, frame)
            try:
                stream.skip_to(lo)
                return stream.take(hi - lo)
            except CorruptError:
                self._stream = None
                raise


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
        index = _get_index(src_fd, _identity(src_fd))
        if index.seekable and len(index.frames) > 1:
            return _decode_parallel(src_fd, dst_fd, index, threads, progress)
    return _decode_all(src_fd, lambda chunk: _write_all(dst_fd, chunk), progress)


def _decode_parallel(
    src_fd: int, dst_fd: int, index: _Index, threads: int, progress: ProgressFn | None
) -> int:
    """Decode the frames of a seekable file `threads` at a time, in order, verified each."""
    written = 0
    frames = list(index.frames)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: collections.deque[tuple[_Frame, concurrent.futures.Future[bytes]]] = (
            collections.deque()
        )
        for frame in frames:
            pending.append((frame, pool.submit(_decode_whole, src_fd, frame)))
            if len(pending) < threads:
                continue
            written += _write_frame(dst_fd, *pending.popleft())
            if progress is not None:
                progress(written)
        while pending:
            written += _write_frame(dst_fd, *pending.popleft())
            if progress is not None:
                progress(written)
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
