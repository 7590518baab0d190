"""Counters of a running mount (reported by `zstfs status`: see `zstfs.status`), and the census of a
store."""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def human_bytes(n: float) -> str:
    """1536 → "1.5 KiB": for status and progress output."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass
class Stats:
    swaps_done: int = 0
    swaps_abandoned: int = 0
    swaps_failed: int = 0
    swaps_busy: int = 0  # found open (anywhere) when its turn came, or opened during it
    pairs_skipped: int = 0  # a plain file beside a different .zst: left alone, reported
    adopted: int = 0  # foreign .zst files re-encoded into zstfs's format
    promotions: int = 0
    bytes_compressed: int = 0
    corrupt_reads: int = 0
    passthrough_opens: int = 0  # opens whose reads and writes the kernel served itself
    last_errors: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=10)
    )
    _logged_once: set[str] = field(default_factory=set)

    def error(self, path: str, message: str) -> None:
        """Record an error for `status`; log it once per (path, message)."""
        self.last_errors.append({"time": time.time(), "path": path, "error": message})
        key = f"{path}\0{message}"
        if key not in self._logged_once:
            if len(self._logged_once) > 10_000:
                self._logged_once.clear()
            self._logged_once.add(key)
            log.error("%s: %s", path, message)

    def counters(self) -> dict[str, Any]:
        return {
            "swaps_done": self.swaps_done,
            "swaps_abandoned": self.swaps_abandoned,
            "swaps_failed": self.swaps_failed,
            "swaps_busy": self.swaps_busy,
            "pairs_skipped": self.pairs_skipped,
            "adopted": self.adopted,
            "promotions": self.promotions,
            "bytes_compressed": self.bytes_compressed,
            "corrupt_reads": self.corrupt_reads,
            "passthrough_opens": self.passthrough_opens,
            "last_errors": list(self.last_errors),
        }


@dataclass
class Census:
    """What a store holds: filled by a walk of the backing tree."""

    plain_files: int = 0
    compressed_files: int = 0
    plain_bytes: int = 0
    compressed_logical_bytes: int = 0
    compressed_stored_bytes: int = 0
    damaged_files: int = 0
    kept_files: int = 0  # `.zstfs-kept.*`: set aside rather than lost

    def as_dict(self) -> dict[str, Any]:
        logical = self.plain_bytes + self.compressed_logical_bytes
        stored = self.plain_bytes + self.compressed_stored_bytes
        return {
            "plain_files": self.plain_files,
            "compressed_files": self.compressed_files,
            "logical_bytes": logical,
            "stored_bytes": stored,
            "saved_bytes": logical - stored,
            "ratio": round(logical / stored, 3) if stored else 1.0,
            "compressed_logical_bytes": self.compressed_logical_bytes,
            "compressed_stored_bytes": self.compressed_stored_bytes,
            "damaged_files": self.damaged_files,
            "kept_files": self.kept_files,
        }
