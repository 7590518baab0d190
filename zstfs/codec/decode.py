"""Decoding one frame, verified: structure, checksum, exact length."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import zstandard

from zstfs.codec.format import (
    IO_CHUNK,
    CorruptError,
    DecodeLimitError,
    PreadSource,
    ProgressFn,
    decompressor,
    gib,
    pread_exact,
)
from zstfs.codec.index import Frame, parse_frame

#: Input read size of a streaming decoder.
STREAM_READ = 1 << 18


def check_extent(fd: int, frame: Frame) -> None:
    """Confirm by structure that ``[comp_start, comp_end)`` is exactly one zstd frame.

    Seek-table extents are only claims; a frame that ends before or after the claimed end would let
    the decoder silently stop early or read the next frame.  Walking the block headers costs a few
    hundred 3-byte preads per 32 MiB frame, under 1 % of decoding it.
    """
    raw = parse_frame(fd, frame.comp_start, frame.comp_end)
    if raw.end != frame.comp_end:
        raise CorruptError(
            f"seek table: frame at offset {frame.comp_start} ends at {raw.end}, "
            f"table says {frame.comp_end}"
        )


def iter_decoded(fd: int, start: int, end: int, expected: int | None) -> Iterator[bytes]:
    """Stream-decode the frame ``[start, end)`` in chunks of at most IO_CHUNK bytes.

    The decoder checks the content checksum and content size when the frame has them; we check the
    total length against ``expected`` because a truncated stream just ends early.
    """
    reader = decompressor().stream_reader(
        PreadSource(fd, start, end), read_size=IO_CHUNK, read_across_frames=False, closefd=False
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


def decode_whole(fd: int, frame: Frame) -> bytes:
    """Decode one (cacheable) frame into memory, verified: structure, checksum, exact size."""
    check_extent(fd, frame)
    data = pread_exact(fd, frame.comp_end - frame.comp_start, frame.comp_start, "frame")
    try:
        out = decompressor().decompress(data, max_output_size=max(frame.log_size, 1))
    except zstandard.ZstdError as exc:
        raise CorruptError(f"frame at offset {frame.comp_start}: {exc}") from exc
    if len(out) != frame.log_size:
        raise CorruptError(
            f"frame at offset {frame.comp_start} decodes to {len(out)} bytes, "
            f"expected {frame.log_size}"
        )
    return out


def count_frame(fd: int, start: int, end: int, expected: int | None, limit: int,
                 progress: ProgressFn | None = None,
                 sink: Callable[[memoryview], None] | None = None) -> int:
    """Decode a frame to nowhere (into one reused buffer) and return its length, verifying it:
    the decoder checks structure, checksum and stated size; we check ``expected``.  Decoding stops
    with :class:`DecodeLimitError` past ``limit`` bytes, so a "zeros bomb" cannot burn a core.
    ``sink`` receives the decoded bytes as they come (a view of the buffer, valid for the call)."""
    reader: zstandard.ZstdDecompressionReader | None = decompressor().stream_reader(
        PreadSource(fd, start, end), read_size=STREAM_READ, read_across_frames=False,
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
                    f"frame at offset {start} decodes to more than {gib(limit)}, the most zstfs "
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
