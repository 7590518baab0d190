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

The modules, each importing only those before it:

* ``format``: magic numbers, limits, errors, :class:`CodecParams`, :class:`Identity`, frame headers;
* ``writer``: :func:`compress_file` (frames, frame plan, seek table);
* ``index``: seek table reading, the frame walk, the frame index of a file;
* ``decode``: decoding one frame, verified;
* ``budget``: the decoder budget (memory, the shared lock, the janitor thread);
* ``cache``: decoded frames (small ones, decoded whole) and the marks of frames found intact;
* ``streams``: resumable decoders inside big frames, with a prefetch thread;
* ``spill``: decoded copies of checked big frames, in unnamed files in the store;
* ``indexes``: each file's index, logical size and damage, by identity;
* ``decoders``: :class:`Decoders`, all of the above composed: one per store;
* ``reader``: :class:`ZstReader`;
* ``verify``: whole-file decoding and verification, adoption of foreign files.
"""

from __future__ import annotations

from zstfs.codec.decoders import Decoders
from zstfs.codec.format import (
    ZSTD_DEFAULT_WINDOW,
    BudgetBusyError,
    CodecParams,
    CorruptError,
    DecodeLimitError,
    FileKey,
    Identity,
    identity_of,
    key_of,
)
from zstfs.codec.reader import ZstReader, logical_size
from zstfs.codec.spill import SPILL_FREE_SHARE, SPILL_MIN_FREE
from zstfs.codec.verify import (
    decompress_file,
    is_native,
    reencode,
    verify_equal,
    verify_file,
    verify_reencoded,
)
from zstfs.codec.writer import HEAD_FRAME, compress_file

__all__ = [
    "HEAD_FRAME",
    "SPILL_FREE_SHARE",
    "SPILL_MIN_FREE",
    "ZSTD_DEFAULT_WINDOW",
    "BudgetBusyError",
    "CodecParams",
    "CorruptError",
    "DecodeLimitError",
    "Decoders",
    "FileKey",
    "Identity",
    "ZstReader",
    "compress_file",
    "decompress_file",
    "identity_of",
    "is_native",
    "key_of",
    "logical_size",
    "reencode",
    "verify_equal",
    "verify_file",
    "verify_reencoded",
]
