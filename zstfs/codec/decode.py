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
    one_shot_decompressor,
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


def damage(start: int, exc: zstandard.ZstdError) -> CorruptError:
    """What the decoder found wrong in the frame at ``start`` (structure, checksum, stated size)."""
    return CorruptError(f"frame at offset {start}: {exc}")


def wrong_length(start: int, total: int | None, expected: int) -> CorruptError:
    """The frame at ``start`` decodes to ``total`` bytes (None: more than ``expected``)."""
    if total is None:
        return CorruptError(f"frame at offset {start} decodes to more than {expected} bytes")
    return CorruptError(f"frame at offset {start} decodes to {total} bytes, expected {expected}")


class FrameDecoder:
    """A streaming decoder of the frame ``[start, end)`` of ``fd``, and the one decoding loop:
    every streaming read goes through :meth:`readinto`, which turns what the decoder finds
    (structure, checksum, the size the frame states) into :class:`CorruptError` and checks the
    length against ``expected``, because a truncated stream just ends early."""

    def __init__(self, fd: int, start: int, end: int, expected: int | None, *,
                 read_size: int = STREAM_READ) -> None:
        self.start = start
        self.expected = expected
        self.total = 0
        self._reader: zstandard.ZstdDecompressionReader | None = decompressor().stream_reader(
            PreadSource(fd, start, end), read_size=read_size, read_across_frames=False,
            closefd=False,
        )

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Decode into ``buf``; 0 only at the end of a frame of the expected length."""
        reader = self._live()
        try:
            n = reader.readinto(buf)
        except zstandard.ZstdError as exc:
            raise damage(self.start, exc) from exc
        return self._count(n)

    def read(self, n: int) -> bytes:
        """Up to ``n`` decoded bytes; b"" only at the end of a frame of the expected length."""
        reader = self._live()
        try:
            data = reader.read(n)
        except zstandard.ZstdError as exc:
            raise damage(self.start, exc) from exc
        self._count(len(data))
        return data

    def _live(self) -> zstandard.ZstdDecompressionReader:
        if self._reader is None:
            raise CorruptError(f"frame at offset {self.start}: decoder released")
        return self._reader

    def _count(self, n: int) -> int:
        self.total += n
        if self.expected is not None:
            if self.total > self.expected:
                raise wrong_length(self.start, None, self.expected)
            if not n and self.total != self.expected:
                raise wrong_length(self.start, self.total, self.expected)
        return n

    def close(self) -> None:
        """Drop the decoder and its window now: an exception's traceback may keep this object
        alive for long (the FUSE layer chains it)."""
        self._reader = None


def iter_decoded(fd: int, start: int, end: int, expected: int | None) -> Iterator[bytes]:
    """Stream-decode the frame ``[start, end)`` in chunks of at most IO_CHUNK bytes, verified."""
    decoder = FrameDecoder(fd, start, end, expected, read_size=IO_CHUNK)
    try:
        while chunk := decoder.read(IO_CHUNK):
            yield chunk
    finally:
        decoder.close()


def decode_whole(fd: int, frame: Frame) -> bytes:
    """Decode one (cacheable) frame into memory, verified: structure, checksum, exact size."""
    check_extent(fd, frame)
    data = pread_exact(fd, frame.comp_end - frame.comp_start, frame.comp_start, "frame")
    try:
        # A frame that states its size decodes in one pass, keeping nothing in the context; one
        # that does not is streamed, and the context would keep its window after the call.
        ctx = (one_shot_decompressor() if zstandard.frame_content_size(data) >= 0
               else decompressor())
        out = ctx.decompress(data, max_output_size=max(frame.log_size, 1))
    except zstandard.ZstdError as exc:
        raise damage(frame.comp_start, exc) from exc
    if len(out) != frame.log_size:
        raise wrong_length(frame.comp_start, len(out), frame.log_size)
    return out


def count_frame(fd: int, start: int, end: int, expected: int | None, limit: int,
                progress: ProgressFn | None = None,
                sink: Callable[[memoryview], None] | None = None) -> int:
    """Decode a frame to nowhere (into one reused buffer) and return its length, verified.
    Decoding stops with :class:`DecodeLimitError` past ``limit`` bytes, so a "zeros bomb" cannot
    burn a core.  ``sink`` receives the decoded bytes as they come (a view of the buffer, valid
    for the call)."""
    decoder = FrameDecoder(fd, start, end, expected)
    buf = bytearray(IO_CHUNK)
    try:
        while n := decoder.readinto(buf):
            if progress is not None:
                progress(decoder.total)
            if decoder.total > limit:
                raise DecodeLimitError(
                    f"frame at offset {start} decodes to more than {gib(limit)}, the most zstfs "
                    "decodes for a read (decode it with `zstd -d`)"
                )
            if sink is not None:
                sink(memoryview(buf)[:n])
    finally:
        decoder.close()
    return decoder.total
