"""Options of a mount, and the parsing of the values users type (durations, -o lists)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from zstfs.names import DEFAULT_PATTERNS

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EXAMPLES = "7d, 12h, 30m, 45s; s m h d w"


def parse_duration(text: str) -> float:
    """`7d`, `12h`, `30m`, `45s`, `1.5h`, `0` → seconds. Raises ValueError with a clear message.

    A number needs its unit (`7` could be days as well as seconds); only zero stands alone."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if m is None:
        raise ValueError(f"invalid duration {text!r}: give a number and a unit ({_EXAMPLES}), or 0")
    value = float(m.group(1))
    if not m.group(2):
        if value == 0:
            return 0.0
        raise ValueError(f"invalid duration {text!r}: give a unit ({_EXAMPLES}), or 0")
    return value * _UNITS[m.group(2)]


def default_jobs() -> int:
    """Background compression threads: half the cores, so the foreground always has CPU."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class MountOptions:
    source: str
    mountpoint: str
    foreground: bool = False
    allow_other: bool = False
    allow_root: bool = False
    debug: bool = False
    log_file: str | None = None
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    compress_after: float | None = None  # seconds; None: never compress in the background
    level: int = 3
    jobs: int = field(default_factory=default_jobs)
    fsname: str | None = None
    force: bool = False  # mount even if processes use the source
