"""Random access to any ``.zst``, through a :class:`Decoders` budget."""

from __future__ import annotations

import contextlib
import os

from zstfs.codec.cache import AHEAD_FRAMES
from zstfs.codec.decoders import Decoders
from zstfs.codec.format import MAX_CONTENT_SIZE, DecodeLimitError, gib, identity_of
from zstfs.codec.index import Frame, Index
from zstfs.codec.writer import HEAD_FRAME

#: A reader reads on sequentially while each read starts within this distance of the furthest
#: point it has read to (the kernel's parallel read-ahead sends its windows a little out of
#: order) ...
SEQ_SLACK = 4 << 20
#: ... and it gets the next frames fetched and decoded ahead once it has read this many bytes so,
#: or more than the head frame from the file's start (`cat`, `grep`, codex reading a rollout).
#: A lone read in the middle of a big file (a random line, `less` jumping) decodes its own frame
#: and nothing more, the disk fetching nothing else meanwhile; so does a first-line reader (a
#: session list), which stops inside the head frame.
SEQ_RUN = 4 << 20


class ZstReader:
    """Random-access reader over one ``.zst`` file descriptor.

    The caller owns ``fd`` and keeps it open while the reader is in use.  Only ``os.pread`` is used,
    so one reader may serve several threads at once.  The frame index, decoded frames and resumable
    decoders live in a :class:`Decoders` budget keyed by the file identity, so readers of the same
    unchanged file share them; a reader itself holds no decoder between reads.  It follows its
    own reads only to tell a sequential reader (worth reading ahead for) from a random one;
    threads racing on that only blur the guess.
    """

    def __init__(self, fd: int, decoders: Decoders) -> None:
        self._fd = fd
        self._identity = identity_of(os.fstat(fd))
        self._dec = decoders
        # The current sequential run: (start, furthest end, bytes read in it).
        self._run: tuple[int, int, int] | None = None

    def _run_with(self, offset: int, end: int) -> tuple[int, int, int]:
        """The run as it stands once ``[offset, end)`` is read."""
        run = self._run
        if run is not None and run[1] - SEQ_SLACK <= offset <= run[1] + SEQ_SLACK:
            return min(run[0], offset), max(run[1], end), run[2] + end - offset
        return offset, end, end - offset

    @staticmethod
    def _sequential(run: tuple[int, int, int]) -> bool:
        start, _end, nbytes = run
        return nbytes >= SEQ_RUN or (start == 0 and nbytes > HEAD_FRAME)

    def _index(self) -> Index:
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
        index = self._index() if decode else self._dec.indexes.cached(self._identity)
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
                if not self._dec.frames.is_verified(self._identity, frame.comp_start):
                    if not decode:
                        return None
                    self._dec.verify(self._fd, self._identity, frame)
        if offset >= end:
            return b""
        # Noted once the read is served (a cache probe that misses is tried again, decoding).
        run = self._run_with(offset, end)
        ahead = self._sequential(run)
        frame_no = index.frame_at(offset)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            frame = index.frames[frame_no]
            lo = pos - frame.log_start
            hi = min(end, frame.log_start + frame.log_size) - frame.log_start
            part = self._frame_slice(frame_no, frame, lo, hi, decode=decode, ahead=ahead)
            if part is None:
                return None
            parts.append(part)
            pos = frame.log_start + hi
            frame_no += 1
        self._run = run
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _sizes_checked(self, index: Index, end: int, decode: bool) -> bool:
        """Every frame whose length is only a seek-table claim and that lies before ``end`` has
        been decoded once and matched the claim (offsets after it depend on that length)."""
        for frame in index.unsized:
            if frame.log_start >= end:
                break
            if self._dec.frames.is_verified(self._identity, frame.comp_start):
                continue
            if not decode:
                return False
            self._check_size(frame)
            if frame.log_size and self._dec.frames.cacheable(frame):
                # Decoded whole with its exact length checked, and cached for the read itself.
                frame_no = index.frame_at(frame.log_start)
                self._dec.frames.frame_bytes(self._fd, self._identity, frame_no,
                                             index.frames[frame_no])
            else:
                self._dec.verify(self._fd, self._identity, frame)
        return True

    def _check_size(self, frame: Frame) -> None:
        if frame.log_size > self._dec.max_frame:
            raise DecodeLimitError(
                f"frame at offset {frame.comp_start} decodes to {gib(frame.log_size)}, more than "
                f"the {gib(self._dec.max_frame)} zstfs decodes for a read (decode it with "
                "`zstd -d`, or let zstfs re-encode it)"
            )

    def _frame_slice(
        self, frame_no: int, frame: Frame, lo: int, hi: int, *, decode: bool, ahead: bool
    ) -> bytes | None:
        """Bytes ``[lo, hi)`` of one frame: from the shared cache, or a resumable stream; with
        ``ahead`` (a sequential reader), the next frames are fetched and decoded meanwhile."""
        self._check_size(frame)
        if not self._dec.frames.cacheable(frame):
            if not decode:
                if not self._dec.frames.is_verified(self._identity, frame.comp_start):
                    return None
                data = self._dec.spills.read(self._identity, frame.comp_start, lo, hi)
                if data is not None:
                    return data
                return self._dec.streams.peek(self._identity, frame_no, lo, hi)
            self._dec.verify(self._fd, self._identity, frame)
            data = self._dec.spills.read(self._identity, frame.comp_start, lo, hi)
            if data is not None:
                return data
            return self._dec.streams.read(self._fd, self._identity, frame_no, frame, lo, hi)
        key = (self._identity, frame_no)
        data = self._dec.frames.cached(key)
        if data is None:
            if not decode:
                return None
            if ahead:
                self._read_ahead(frame_no + 1)
            data = self._dec.frames.frame_bytes(self._fd, self._identity, frame_no, frame)
        if ahead and hi * 2 > frame.log_size:
            # Past the middle of a frame, a reader that goes on wants the next ones: they are
            # decoded on other cores meanwhile (`grep -r`, `cat`, codex reading a rollout).
            for n in range(1, AHEAD_FRAMES + 1):
                self._decode_ahead(frame_no + n, frame.log_size)
        if lo == 0 and hi == len(data):
            return data
        return data[lo:hi]

    def _decode_ahead(self, frame_no: int, reading: int) -> None:
        index = self._dec.indexes.cached(self._identity)
        if index is None or frame_no >= len(index.frames):
            return
        frame = index.frames[frame_no]
        if self._dec.frames.cacheable(frame):
            self._dec.frames.decode_ahead(self._fd, self._identity, frame_no, frame, reading)

    def _read_ahead(self, frame_no: int) -> None:
        """Ask the kernel to fetch the next frame's compressed bytes while this one decodes:
        a sequential reader then rarely waits for the disk."""
        frames = self._index().frames
        if frame_no < len(frames):
            nxt = frames[frame_no]
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, nxt.comp_start, nxt.comp_end - nxt.comp_start,
                                 os.POSIX_FADV_WILLNEED)


def logical_size(fd: int, decoders: Decoders) -> int:
    """The decoded size of a ``.zst`` file; shares the index cache with :class:`ZstReader`."""
    return ZstReader(fd, decoders).size
