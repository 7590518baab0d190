"""The frame index of a ``.zst``: where each frame is and which logical bytes it holds, from
the seek table (checked against the frame headers) or from a walk of frame and block headers."""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from zstfs.codec.format import (
    FOOTER_SIZE,
    IO_CHUNK,
    MAX_BLOCK_SIZE,
    MAX_CONTENT_SIZE,
    SEEK_TABLE_MAGIC,
    SEEKABLE_MAGIC,
    SKIPPABLE_MAGIC_BASE,
    SKIPPABLE_MAGIC_MASK,
    ZSTD_MAGIC,
    CorruptError,
    Header,
    pread_exact,
    read_header,
)


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One zstd frame's compressed extent, as found in the file (not yet decoded)."""

    start: int
    end: int
    content_size: int | None  # from the frame header, None when the header has none
    checksum: int | None  # the frame's trailing content checksum, None when the frame has none
    window: int = 0  # decoding window from the frame header



def walk_blocks(fd: int, offset: int, limit: int, frame_start: int) -> int:
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


def parse_frame(fd: int, start: int, limit: int) -> RawFrame:
    """Find the extent of the zstd frame at ``start`` (within ``limit``) from structure alone."""
    header = read_header(fd, start, limit)
    end = walk_blocks(fd, start + header.length, limit, start)
    checksum = None
    if header.has_checksum:
        checksum = int.from_bytes(pread_exact(fd, 4, end, "frame checksum"), "little")
        end += 4
        if end > limit:
            raise CorruptError(f"truncated: frame checksum of frame at {start} runs past {limit}")
    return RawFrame(start, end, header.content_size, checksum, header.window)


def walk_frames(fd: int, fsize: int) -> Iterator[tuple[str, int, int, RawFrame | None]]:
    """Yield every frame of the file in order as ``(kind, start, end, frame)``.

    ``kind`` is ``"zstd"`` (with its :class:`RawFrame`) or ``"skip"`` (skippable frame).  Bytes
    that are neither mean the file is not (entirely) zstd.
    """
    offset = 0
    while offset < fsize:
        magic_bytes = pread_exact(fd, 4, offset, "frame magic")
        magic = int.from_bytes(magic_bytes, "little")
        if magic == ZSTD_MAGIC:
            frame = parse_frame(fd, offset, fsize)
            yield "zstd", frame.start, frame.end, frame
            offset = frame.end
        elif magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC_BASE:
            size = int.from_bytes(pread_exact(fd, 4, offset + 4, "skippable frame size"), "little")
            end = offset + 8 + size
            if end > fsize:
                raise CorruptError(f"truncated: skippable frame at offset {offset} ends past EOF")
            yield "skip", offset, end, None
            offset = end
        else:
            raise CorruptError(f"not zstd: unknown magic {magic:#010x} at offset {offset}")


@dataclass(frozen=True, slots=True)
class TableEntry:
    start: int
    end: int
    size: int
    checksum: int | None


def read_seek_table(fd: int, fsize: int) -> tuple[list[TableEntry], int] | None:
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
    raw = pread_exact(fd, table_len, table_start, "seek table")
    skip_magic, frame_size = struct.unpack_from("<II", raw)
    if skip_magic != SEEK_TABLE_MAGIC or frame_size != payload:
        raise CorruptError(f"seek table: bad skippable frame header at offset {table_start}")
    entries: list[TableEntry] = []
    pos = 0
    for i in range(count):
        at = 8 + i * entry_size
        csize, dsize = struct.unpack_from("<II", raw, at)
        checksum = struct.unpack_from("<I", raw, at + 8)[0] if has_checksum else None
        if csize == 0:
            raise CorruptError(f"seek table: frame {i} has compressed size 0")
        entries.append(TableEntry(pos, pos + csize, dsize, checksum))
        pos += csize
    if pos != table_start:
        raise CorruptError(
            f"seek table: compressed sizes add up to {pos}, but frames end at {table_start}"
        )
    return entries, table_len


@dataclass(frozen=True, slots=True)
class Frame:
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
class Index:
    frames: tuple[Frame, ...]  # only frames with content; empty frames never serve a read
    starts: tuple[int, ...]  # frames[i].log_start, for bisect
    size: int
    seekable: bool
    unsized: tuple[Frame, ...] = ()  # frames (empty ones included) whose size is only claimed
    empty: tuple[Frame, ...] = ()  # frames that state they are empty: checked when EOF is read

    def frame_at(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1


def _size_and_table(fd: int) -> tuple[int, tuple[list[TableEntry], int] | None]:
    """The file's size and its seek table (None: it has none); an empty file is no zstd."""
    fsize = os.fstat(fd).st_size
    if fsize == 0:
        raise CorruptError("not zstd: empty file")
    return fsize, read_seek_table(fd, fsize)


def check_entry(i: int, entry: TableEntry, content_size: int | None,
                checksum: int | None) -> None:
    """The one check of a seek-table entry against its frame: the content size the frame states
    (if it states one) and its checksum (if both have one) must be the table's."""
    if content_size is not None and content_size != entry.size:
        raise CorruptError(
            f"seek table: frame {i} at offset {entry.start} holds {content_size} bytes, "
            f"table says {entry.size}"
        )
    if None not in (checksum, entry.checksum) and checksum != entry.checksum:
        raise CorruptError(
            f"seek table: checksum of frame {i} at offset {entry.start} does not match"
        )


def entry_header(fd: int, i: int, entry: TableEntry) -> Header:
    """The header of the frame seek-table entry ``i`` claims, checked against the entry with
    its trailing checksum (:func:`check_entry`): a pread or two, nothing decoded."""
    header = read_header(fd, entry.start, entry.end)
    checksum = None
    if header.has_checksum and entry.checksum is not None:
        checksum = int.from_bytes(pread_exact(fd, 4, entry.end - 4, "frame checksum"), "little")
    check_entry(i, entry, header.content_size, checksum)
    return header


def checked_frames(fd: int) -> Iterator[tuple[RawFrame, int | None]]:
    """Every zstd frame of the file with its expected decoded size, after full structural checks.

    Walks the whole file (ignoring any seek table) and, if a seek table is present, requires it to
    describe exactly the frames found: same extents, sizes and checksums.
    """
    fsize, table = _size_and_table(fd)
    walked = list(walk_frames(fd, fsize))
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
        check_entry(i, entry, raw.content_size, raw.checksum)
        yield raw, entry.size


def _index_from_table(fd: int, entries: list[TableEntry], fsize: int) -> list[Frame]:
    """Trust but check the seek table: each entry must start with a frame header that agrees.

    One small pread per frame (header) plus one for the trailing checksum catches a lying
    decompressed size (when the frame states it) or a shifted compressed size before any read.
    The full structural check of each extent happens when the frame is decoded; a frame that does
    not state its size is marked unsized and decoded once before it (or anything after it) serves.
    """
    frames: list[Frame] = []
    log = 0
    for i, entry in enumerate(entries):
        header = entry_header(fd, i, entry)
        window = header.window or entry.size
        frames.append(Frame(entry.start, entry.end, log, entry.size, header.has_checksum,
                             window, header.content_size is not None))
        log += entry.size
    return frames


def _index_from_walk(fd: int, fsize: int, count: Callable[[RawFrame], int]) -> list[Frame]:
    """Index a file without a seek table by walking frame and block headers.

    A frame without a content size (``zstd`` reading stdin, codex's streaming writer) has to be
    decoded once to learn its size (``count``, which also verifies it).  The index is cached by
    file identity so this happens once per file, not per open.
    """
    frames: list[Frame] = []
    log = 0
    for kind, _start, _end, raw in walk_frames(fd, fsize):
        if kind != "zstd" or raw is None:
            continue
        size = raw.content_size
        if size is None:
            size = count(raw)
        frames.append(Frame(raw.start, raw.end, log, size, raw.checksum is not None,
                             raw.window or size))
        log += size
    return frames


def build_index(fd: int, count: Callable[[RawFrame], int]) -> Index:
    """Build the frame index of one ``.zst`` (seek table if present, else a structural walk)."""
    fsize, table = _size_and_table(fd)
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
    return Index(kept, tuple(f.log_start for f in kept), size, table is not None, unsized,
                  empty)

