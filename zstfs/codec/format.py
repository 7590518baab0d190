"""The zstd format as zstfs reads and writes it: magic numbers and limits, the errors, the
writer's parameters, a file's identity (the key of every cache), frame header parsing, and the
``pread``/``write`` helpers every part uses (never the shared file offset)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import zstandard

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


#: The defaults (frozen, so one shared instance is safe as a default argument).
DEFAULT_PARAMS = CodecParams()


class DecodeLimitError(CorruptError):
    """A valid frame that this reader will not decode: its window does not fit the decoder budget,
    or it is too big to decode for one read.  A CorruptError, so callers answer EIO."""


class BudgetBusyError(DecodeLimitError):
    """The decoder budget stayed pinned by work in progress: a transient refusal, not damage."""


#: Which file: (st_dev, st_ino).
FileKey = tuple[int, int]


def key_of(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino)


class Identity(NamedTuple):
    """zstfs's one notion of a file's identity: which file (device, inode: `key`) and which
    state of its content (size, mtime); a changed file has a new size or mtime, a replaced one
    a new inode. The codec keys its caches on it; the store, the file table and the swap compare
    it (with ctime and link count where metadata matters too: `swap.unchanged`)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> FileKey:
        return (self.dev, self.ino)


def identity_of(st: os.stat_result) -> Identity:
    return Identity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------
# Low-level I/O


def pread_full(fd: int, n: int, offset: int) -> bytes:
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


def pread_exact(fd: int, n: int, offset: int, what: str) -> bytes:
    """pread exactly ``n`` bytes; a short read means the file is truncated."""
    data = pread_full(fd, n, offset)
    if len(data) != n:
        raise CorruptError(f"truncated: {what} at offset {offset} needs {n} bytes, got {len(data)}")
    return data


#: Largest single write(2). Measured here: writing 105 MB into a new file takes 0.02 s in
#: 128 KiB writes and 0.23 s in 1 MiB writes (page-cache charging of big writes), so big decoded
#: chunks are written in slices.
WRITE_CHUNK = 128 * 1024


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until everything is written (short writes happen on pipes and some filesystems)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:WRITE_CHUNK])
        view = view[n:]


class PreadSource:
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


def decompressor() -> zstandard.ZstdDecompressor:
    """A fresh decompression context: contexts are not safe to share between threads, and a
    streaming reader keeps using its context's state until it is dropped."""
    return zstandard.ZstdDecompressor(max_window_size=MAX_READ_WINDOW)


_one_shot = threading.local()


def one_shot_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's context for one-shot ``decompress`` calls of frames that state their size
    (decoded in one pass: the context keeps nothing between calls, and each call resets it).
    Making a context costs as much as decoding a small rollout's frame (~9 µs here), and a
    listing or a `grep -r` decodes one such frame per file."""
    ctx: zstandard.ZstdDecompressor | None = getattr(_one_shot, "ctx", None)
    if ctx is None:
        ctx = _one_shot.ctx = decompressor()
    return ctx


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Frame headers


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    content_size: int | None
    has_checksum: bool
    window: int  # the decoder's history window in bytes (the content size for a single segment)


def parse_header(buf: bytes, offset: int) -> Header:
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
    return Header(length, content_size, bool(fhd & 0x04), window)


def read_header(fd: int, offset: int, limit: int) -> Header:
    """Read and parse the zstd frame header at ``offset``; anything else there is corruption."""
    buf = os.pread(fd, min(MAX_FRAME_HEADER, limit - offset), offset)
    if len(buf) < 4 or int.from_bytes(buf[:4], "little") != ZSTD_MAGIC:
        raise CorruptError(f"not zstd: no zstd frame at offset {offset}")
    return parse_header(buf, offset)
