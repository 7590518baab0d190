"""Whole-file decoding and verification, and the adoption of foreign ``.zst`` files."""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterator

from zstfs.codec.decode import decode_whole, iter_decoded
from zstfs.codec.decoders import Decoders
from zstfs.codec.format import (
    DEFAULT_PARAMS,
    WRITE_CHUNK,
    ZSTD_DEFAULT_WINDOW,
    CodecParams,
    CorruptError,
    DecodeLimitError,
    ProgressFn,
    gib,
    identity_of,
    pread_full,
    write_all,
)
from zstfs.codec.index import Frame, Index, checked_frames, entry_header, read_seek_table
from zstfs.codec.writer import compress_stream


def _decode_all(fd: int, sink: Callable[[bytes], None], progress: ProgressFn | None) -> int:
    """Decode the whole file into ``sink`` chunk by chunk; returns the decoded length."""
    total = 0
    for raw, expected in checked_frames(fd):
        for chunk in iter_decoded(fd, raw.start, raw.end, expected):
            sink(chunk)
            total += len(chunk)
            if progress is not None:
                progress(total)
    return total


def decompress_file(
    src_fd: int, dst_fd: int, *, progress: ProgressFn | None = None, threads: int = 1,
    decoders: Decoders | None = None,
) -> int:
    """Stream-decode any valid ``.zst`` into ``dst_fd`` with bounded memory; returns bytes written.

    Checks everything :func:`verify_file` checks.  On CorruptError part of the output may already
    be written; the caller writes to a temp file and discards it.  With ``threads`` > 1, a file
    with a seek table (frames of known size, independent by construction) has that many frames
    decoded at once, each written at its own offset: promotion of a big file is then bound by
    the disk, not one core.  Memory: ``threads`` frames, charged to ``decoders`` (which the
    parallel decode needs).
    """
    if threads > 1:
        if decoders is None:
            raise ValueError("decoding frames in parallel needs the decoders to charge them to")
        index = decoders.index(src_fd, identity_of(os.fstat(src_fd)))
        if (index.seekable and len(index.frames) > 1
                and max(f.log_size for f in index.frames) <= PARALLEL_FRAME_LIMIT):
            return _decode_parallel(src_fd, dst_fd, index, threads, progress, decoders)
    return _decode_all(src_fd, lambda chunk: write_all(dst_fd, chunk), progress)


#: Frames decoded whole in parallel by promotion at most this big; bigger ones (other writers'
#: seekable files) are streamed.
PARALLEL_FRAME_LIMIT = 64 << 20


def _decode_parallel(
    src_fd: int, dst_fd: int, index: Index, threads: int, progress: ProgressFn | None,
    decoders: Decoders,
) -> int:
    """Decode the frames of a seekable file `threads` at a time, in order, verified each.

    The frames in flight are charged to the decoder budget (evicting cached frames), so a
    promotion does not add its own frames on top of everything the readers hold."""
    written = 0
    frames = list(index.frames)
    budget = decoders.budget
    pending: collections.deque[tuple[Frame, concurrent.futures.Future[bytes]]] = (
        collections.deque()
    )

    def cost(frame: Frame) -> int:
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
                pending.append((frame, pool.submit(decode_whole, src_fd, frame)))
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


def _write_frame(dst_fd: int, frame: Frame, future: concurrent.futures.Future[bytes]) -> int:
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
    pos = _compare_decoded(zst_fd, lambda at, n: pread_full(plain_fd, n, at), "the plain file",
                           progress)
    if os.pread(plain_fd, 1, pos):
        raise CorruptError(f"plain file is longer than the decoded {pos} bytes")


def _compare_decoded(zst_fd: int, theirs: Callable[[int, int], bytes], what: str,
                     progress: ProgressFn | None) -> int:
    """Decode ``zst_fd`` (every check of :func:`verify_file`) comparing it with ``theirs(at, n)``
    (the other side's ``n`` bytes at ``at``, fewer only at its end): raise :class:`CorruptError`
    at the first differing offset, or return the decoded length (the caller checks that the
    other side ends there)."""
    pos = 0

    def compare(chunk: bytes) -> None:
        nonlocal pos
        other = theirs(pos, len(chunk))
        if other != chunk:
            at = pos + next(
                (i for i, (a, b) in enumerate(zip(other, chunk, strict=False)) if a != b),
                min(len(other), len(chunk)),
            )
            raise CorruptError(f"content differs from {what} at offset {at}")
        pos += len(chunk)

    _decode_all(zst_fd, compare, progress)
    return pos


# --------------------------------------------------------------------------------------------
# Adoption of foreign .zst files


def is_native(fd: int, params: CodecParams = DEFAULT_PARAMS) -> bool:
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
        table = read_seek_table(fd, os.fstat(fd).st_size)
        if table is None:
            return False
        entries, _table_len = table
        if any(entry.checksum is None for entry in entries):
            return False
        for i, entry in enumerate(entries):
            header = entry_header(fd, i, entry)
            if (header.content_size is None or not header.has_checksum
                    or header.window > ZSTD_DEFAULT_WINDOW or entry.size > params.frame_size):
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
    for raw, expected in checked_frames(fd):
        size = raw.content_size if raw.content_size is not None else expected
        need = raw.window if size is None else min(raw.window, size)
        if need > max_window:
            bits = max(need - 1, 1).bit_length()
            raise DecodeLimitError(
                f"frame at offset {raw.start} needs a {gib(need)} decoding window "
                f"(`zstd -d --long={bits}`), more than the {gib(max_window)} allowed"
            )
        yield from iter_decoded(fd, raw.start, raw.end, expected)


def _content_size(fd: int, max_window: int) -> int:
    """The decoded size of a whole ``.zst``: from headers and table, or by decoding it once."""
    total = 0
    for raw, expected in checked_frames(fd):
        size = raw.content_size if raw.content_size is not None else expected
        if size is None:
            return sum(len(chunk) for chunk in _decoded_chunks(fd, max_window))
        total += size
    return total


def reencode(
    src_fd: int,
    dst_fd: int,
    params: CodecParams = DEFAULT_PARAMS,
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
    logical, stored = compress_stream(source.read, expected, dst_fd, params, progress,
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
    pos = _compare_decoded(new_fd, lambda _at, n: source.read(n), "the source .zst", None)
    if source.read(1):
        raise CorruptError(f"the source .zst is longer than the re-encoded {pos} bytes")
    return pos
