"""The store seen from below while it is mounted over itself, realistic rollouts in it, and the
`zstfs` command: what the real-mount tests of the compactor and of open files share.

A test opens the store directory before mounting over it (`backing`), and sees the real files
through that descriptor (`NAME`, `NAME.zst`, temps) while programs use the mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gen_rollouts
import pytest

from harness.mount import Mount, flat_pattern

DAY = 86400
TEMP_PREFIX = ".zstfs-tmp."

needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")


def old_ns(days: float = 8, salt: int = 0) -> int:
    """An mtime `days` ago, with odd nanoseconds so that a copy that loses them is caught."""
    return int((time.time() - days * DAY) * 1e9) // 10**9 * 10**9 + 123_456_789 + salt


def rollout(path: Path, size: int, seed: int, mtime_ns: int | None = None) -> bytes:
    """A realistic Codex rollout at `path` with the given mtime (old by default); its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gen_rollouts.generate_rollout(path, size, seed=seed)
    ns = old_ns(salt=seed) if mtime_ns is None else mtime_ns
    os.utime(path, ns=(ns, ns))
    return path.read_bytes()


class Backing:
    """The store directory seen from below (opened before mounting over it)."""

    def __init__(self, store: Path) -> None:
        self.fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.fd)

    def path(self, name: str) -> str:
        return f"/proc/self/fd/{self.fd}/{name}"

    def names(self, sub: str = ".") -> set[str]:
        return set(os.listdir(self.path(sub) if sub != "." else self.fd))

    def all_names(self) -> set[str]:
        """Every backing path below the store, relative to it."""
        out = set()
        for d, dirs, files in os.walk(self.path(".")):
            rel = os.path.relpath(d, self.path("."))
            for n in dirs + files:
                out.add(n if rel == "." else f"{rel}/{n}")
        return out

    def stat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def is_compressed(self, name: str) -> bool:
        """`name` is stored as `name.zst` and no longer plain (the swap is complete)."""
        d, _, base = name.rpartition("/")
        names = self.names(d or ".")
        return f"{base}.zst" in names and base not in names

    def is_plain(self, name: str) -> bool:
        d, _, base = name.rpartition("/")
        names = self.names(d or ".")
        return base in names and f"{base}.zst" not in names

    def temps(self) -> list[str]:
        return [n for n in self.all_names() if n.rpartition("/")[2].startswith(TEMP_PREFIX)]


@contextlib.contextmanager
def backing(store: Path) -> Iterator[Backing]:
    b = Backing(store)
    try:
        yield b
    finally:
        b.close()


def zstd_decode(data: bytes) -> bytes:
    """Decode with the zstd CLI: the compactor's output must be plain zstd to anyone."""
    r = subprocess.run(["zstd", "-d", "-q", "-c"], input=data, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def idle(m: Mount) -> bool:
    """The compactor has nothing due and nothing in progress."""
    s = m.status()
    return s["scan_done"] and s["in_flight"] == 0 and s["eligible_now"] == 0


def zstfs_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zstfs", *flat_pattern(list(args))],
                          capture_output=True,
                          text=True, timeout=timeout)
