"""The seekable writer: independent frames with content size and checksum, then the seek table."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import zstandard

from zstfs.codec.format import (
    DEFAULT_PARAMS,
    SEEK_TABLE_MAGIC,
    SEEKABLE_MAGIC,
    U32_MAX,
    CodecParams,
    ProgressFn,
    pread_full,
    write_all,
)


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
    params: CodecParams = DEFAULT_PARAMS,
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
        data = pread_full(src_fd, n, consumed)
        consumed += len(data)
        return data

    # The source may still grow (the caller re-checks it before swapping): read on past the
    # planned size until EOF.
    return compress_stream(read, os.fstat(src_fd).st_size, dst_fd, params, progress,
                            exact=False)


def compress_stream(
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
        write_all(dst_fd, frame)
        entries.append((len(frame), len(data), int.from_bytes(frame[-4:], "little")))
        consumed += len(data)
        stored += len(frame)
        if progress is not None:
            progress(consumed)
        if len(data) < want or (exact and consumed >= expected):
            break
    table = _seek_table(entries)
    write_all(dst_fd, table)
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
