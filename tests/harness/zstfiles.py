"""zstd files as other writers make them (frames with or without checksums and content sizes,
seek tables that may lie, headers that claim absurd sizes), test data for them, and what
libzstd's own decoder makes of a file: the reference the codec tests and the hostile-file mount
tests compare zstfs with."""

from __future__ import annotations

import io
import random
import struct

import zstandard


def text(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b'"type":"event_msg"', b"{", b"}", b"0123", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
        if rng.random() < 0.01:
            out += rng.randbytes(rng.randrange(1, 64))
    return bytes(out[:n])


def frame(data: bytes, *, checksum: bool = True, size: bool = True, level: int = 3) -> bytes:
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=size)
    if size:
        return cctx.compress(data)
    out = io.BytesIO()
    with cctx.stream_writer(out, closefd=False) as w:  # streaming: no content size
        w.write(data)
    return out.getvalue()


def seekable(chunks: list[bytes], *, checksum: bool, size: bool,
             claims: list[int] | None = None) -> bytes:
    """A seekable file from another writer: frames with or without checksums and content sizes,
    and a seek table whose decompressed sizes may lie (``claims``)."""
    frames = [frame(c, checksum=checksum, size=size) for c in chunks]
    sizes = claims if claims is not None else [len(c) for c in chunks]
    entries = b"".join(struct.pack("<II", len(f), d) for f, d in zip(frames, sizes, strict=True))
    footer = struct.pack("<IBI", len(frames), 0, 0x8F92EAB1)
    table = struct.pack("<II", 0x184D2A5E, len(entries) + len(footer)) + entries + footer
    return b"".join(frames) + table


def reference_prefix(blob: bytes) -> bytes:
    """What libzstd's streaming decoder emits before it fails (all of it if it does not): what
    `zstd -d` prints of a damaged file."""
    out = bytearray()
    reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
        io.BytesIO(blob), read_across_frames=True)
    try:
        while chunk := reader.read(1024):
            out += chunk
    except zstandard.ZstdError:
        pass
    return bytes(out)


def reference(blob: bytes) -> bytes | None:
    """What libzstd's own streaming decoder makes of the whole file (None: it fails)."""
    if not blob:
        return None
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            io.BytesIO(blob), read_across_frames=True)
        out = reader.read()
        if reader.read(1):
            return None
        return out
    except zstandard.ZstdError:
        return None


def frame_claiming(size: int) -> bytes:
    """A frame header declaring ``size`` bytes (8-byte field), followed by one empty raw block."""
    return struct.pack("<IBB", 0xFD2FB528, 0xC0, 0x50) + struct.pack("<Q", size) + b"\x01\x00\x00"
