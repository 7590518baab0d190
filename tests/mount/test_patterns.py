"""Which files are compressible: the default patterns (codex's rollouts only) and `--pattern`.

- Unit tests of `NameRules`: the default takes `rollout-*.jsonl` anywhere under `sessions/` and
  `archived_sessions/` and nothing else; a pattern without `/` matches a file name anywhere; one
  with `/` matches the path from the store root (`*` within a component, `**` across them).
- On a real mount with the default patterns: only rollouts are compressed, `history.jsonl` and
  every other file stay untouched; a rename across directories makes a compressed file plain when
  its new place is not compressible; a directory move that would change what a `.zst` inside it
  is fails with EXDEV (so `mv` copies the logical files instead).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness.mount import MountFactory, wait_until

from zstfs.names import DEFAULT_PATTERNS, NameRules

OLD_NS = 1_600_000_000 * 10**9


# ---------------------------------------------------------------------- NameRules
@pytest.mark.parametrize(("parent", "name", "expected"), [
    (b"sessions/2026/01/02", b"rollout-2026-01-02T10-00-00-abc.jsonl", True),
    (b"sessions", b"rollout-x.jsonl", True),
    (b"archived_sessions", b"rollout-x.jsonl", True),
    (b"archived_sessions/deeper", b"rollout-x.jsonl", True),
    (b".", b"history.jsonl", False),
    (b".", b"session_index.jsonl", False),
    (b".", b"rollout-x.jsonl", False),  # not under sessions/
    (b"sessions/2026/01/02", b"notes.jsonl", False),
    (b"sessions/2026/01/02", b"rollout-x.json", False),
    (b"sessions-old/2026", b"rollout-x.jsonl", False),
    (b"worktrees/p/sessions", b"rollout-x.jsonl", False),  # sessions/ only at the root
    (b"log", b"codex-tui.log", False),
])
def test_default_patterns_are_codex_rollouts(parent: bytes, name: bytes, expected: bool) -> None:
    rules = NameRules()
    assert rules.patterns == DEFAULT_PATTERNS
    assert rules.path_aware
    assert rules.compressible(parent, name) is expected
    assert rules.is_representation(parent, name + b".zst") is expected
    assert rules.visible(parent, name + b".zst") is not expected
    assert rules.logical(parent, name + b".zst") == (name if expected else name + b".zst")


def test_reserved_names_are_never_compressible() -> None:
    rules = NameRules()
    name = b".zstfs-tmp.x.rollout-x.jsonl"
    assert not rules.compressible(b"sessions", name)
    assert not rules.visible(b"sessions", name)


def test_a_name_whose_zst_form_cannot_exist_is_only_plain() -> None:
    rules = NameRules(["*"])
    longest = b"L" * (255 - len(b".zst"))
    assert rules.compressible(b"d", longest)
    for n in range(len(longest) + 1, 256):
        assert not rules.compressible(b"d", b"L" * n)
        assert rules.visible(b"d", b"L" * n)
        assert rules.logical(b"d", b"L" * n) == b"L" * n


def test_name_pattern_matches_in_every_directory() -> None:
    rules = NameRules("*.jsonl")
    assert not rules.path_aware
    for parent in (b".", b"a", b"a/b/c"):
        assert rules.compressible(parent, b"x.jsonl")
        assert not rules.compressible(parent, b"x.log")
        assert not rules.compressible(parent, b".zstfs.lock.jsonl")  # reserved


def test_path_patterns() -> None:
    rules = NameRules(["logs/*/app-?.log", "/top.txt", "data/**/[!x]*.csv"])
    assert rules.path_aware
    assert rules.compressible(b"logs/web", b"app-1.log")
    assert not rules.compressible(b"logs", b"app-1.log")  # `*` is exactly one component
    assert not rules.compressible(b"logs/a/b", b"app-1.log")  # and never crosses `/`
    assert not rules.compressible(b"logs/web", b"app-10.log")
    assert rules.compressible(b".", b"top.txt")  # a leading `/` anchors at the root
    assert not rules.compressible(b"sub", b"top.txt")
    assert rules.compressible(b"data", b"a.csv")  # `**` may be no directory at all
    assert rules.compressible(b"data/1/2/3", b"a.csv")
    assert not rules.compressible(b"data/1", b"xa.csv")
    assert not rules.compressible(b"other/data", b"a.csv")


def test_invalid_pattern_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names no files"):
        NameRules("sessions/")
    r = subprocess.run([sys.executable, "-m", "zstfs", "compress", "--pattern", "logs/",
                        str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "names no files" in r.stderr


# ---------------------------------------------------------------------- on a mount
def write(path: Path, data: bytes, *, old: bool = True) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, ns=(OLD_NS, OLD_NS))
    return data


def lines(tag: str, n: int = 3000) -> bytes:
    return b"".join(b'{"type":"event_msg","payload":{"tag":"%s","n":%d}}\n' % (tag.encode(), i)
                    for i in range(n))


def backing_files(fd: int) -> dict[str, str]:
    """Every regular file under the backing directory → sha256 of its bytes."""
    out = {}
    root = Path(f"/proc/self/fd/{fd}")
    for p in root.rglob("*"):
        if p.is_file() and not p.name.startswith(".zstfs"):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


R1 = "sessions/2026/01/02/rollout-2026-01-02T10-00-00-0001.jsonl"
R2 = "archived_sessions/rollout-2026-01-01T09-00-00-0002.jsonl"


@pytest.fixture
def codex_store(store: Path) -> dict[str, bytes]:
    """A store laid out like CODEX_HOME, every file old enough to compress."""
    files = {
        R1: lines("r1"),
        R2: lines("r2"),
        "history.jsonl": lines("history"),
        "session_index.jsonl": lines("index"),
        "rollout-at-the-root.jsonl": lines("root"),
        "log/codex-tui.log": lines("log"),
        "worktrees/p/sessions/rollout-in-a-project.jsonl": lines("project"),
        "sessions/2026/01/02/notes.jsonl": lines("notes"),
    }
    for rel, data in files.items():
        write(store / rel, data)
    return files


@pytest.mark.timeout(60)
def test_default_compresses_rollouts_only(store: Path, codex_store: dict[str, bytes],
                                          mount_factory: MountFactory) -> None:
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        m = mount_factory(store, "--compress-after", "0", flat=False)
        assert m.status()["patterns"] == list(DEFAULT_PATTERNS)
        wait_until(lambda: m.status()["compressed_files"] == 2
                   and m.status()["waiting_files"] == 0 and m.status()["in_flight"] == 0,
                   30, "the two rollouts compressed")
        assert m.status()["plain_files"] == 0  # nothing else even counts as compressible
        below = backing_files(fd)
        expected = {rel: sha(data) for rel, data in codex_store.items() if rel not in (R1, R2)}
        assert {k: v for k, v in below.items() if not k.endswith(".zst")} == expected
        assert sorted(k for k in below if k.endswith(".zst")) == sorted([R1 + ".zst",
                                                                         R2 + ".zst"])
        for rel, data in codex_store.items():  # the view: every file as it was
            assert (store / rel).read_bytes() == data, rel
        m.stop()
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_rename_across_directories(store: Path, mount_factory: MountFactory) -> None:
    """A compressed rollout moved out of sessions/ becomes a plain file (its new name has no
    compressed form); moved back it stays plain until the compactor takes it again. A `.zst`
    that is a file of its own outside sessions/ cannot be renamed to where it would be a
    compressed form (EPERM, as for creating that name)."""
    data = write(store / R1, lines("mv"))
    own = write(store / "rollout-own.jsonl.zst", b"not zstd at all")
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        m = mount_factory(store, "--compress-after", "0", flat=False)
        below = Path(f"/proc/self/fd/{fd}")
        wait_until(lambda: (below / (R1 + ".zst")).exists(), 30, "the rollout compressed")
        assert (store / "rollout-own.jsonl.zst").read_bytes() == own  # shown as itself

        os.rename(store / R1, store / "moved.jsonl")
        assert (below / "moved.jsonl").read_bytes() == data  # promoted: plain below
        assert not (below / "moved.jsonl.zst").exists()
        assert (store / "moved.jsonl").read_bytes() == data

        os.rename(store / "moved.jsonl", store / R1)
        assert (store / R1).read_bytes() == data
        with open(store / R1, "rb"):  # a release tells the compactor about it again
            pass
        wait_until(lambda: (below / (R1 + ".zst")).exists(), 30, "compressed again")
        assert (store / R1).read_bytes() == data

        with pytest.raises(PermissionError):
            os.rename(store / "rollout-own.jsonl.zst", store / "sessions" / "rollout-own.jsonl.zst")
        assert (store / "rollout-own.jsonl.zst").read_bytes() == own
        m.stop()
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_directory_move_that_changes_views_is_exdev(store: Path,
                                                    mount_factory: MountFactory) -> None:
    """Moving sessions/ away would turn its compressed rollouts into raw `.zst` files: rename(2)
    fails with EXDEV and `mv` falls back to copying the logical files. A move that keeps every
    file's status (sessions/2026 → sessions/2025) is a plain rename."""
    data = write(store / R1, lines("dir"))
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        m = mount_factory(store, "--compress-after", "0", flat=False)
        below = Path(f"/proc/self/fd/{fd}")
        wait_until(lambda: (below / (R1 + ".zst")).exists(), 30, "the rollout compressed")

        with pytest.raises(OSError, match="cross-device") as e:
            os.rename(store / "sessions", store / "sessions-old")
        assert e.value.errno == errno.EXDEV
        assert (store / R1).read_bytes() == data

        os.rename(store / "sessions" / "2026", store / "sessions" / "2025")
        moved = R1.replace("2026/", "2025/", 1)
        assert (below / (moved + ".zst")).exists()  # still compressed, nothing decoded
        assert (store / moved).read_bytes() == data

        subprocess.run(["mv", str(store / "sessions"), str(store / "sessions-old")], check=True,
                       timeout=30)
        old = moved.replace("sessions/", "sessions-old/", 1)
        assert (store / old).read_bytes() == data
        assert (below / old).read_bytes() == data  # copied as the plain file it is now
        assert not (store / "sessions").exists()
        m.stop()
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_names_too_long_for_a_zst_form(store: Path, mount_factory: MountFactory) -> None:
    """A 252-255 byte name matching the patterns has no `.zst` form: unlink, rename and link
    succeed as on the backing filesystem, and the names made after them (which may reuse the
    freed inode numbers) are served right."""
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        mount_factory(store, "--pattern", "*", "--compress-after", "0", flat=False)
        below = Path(f"/proc/self/fd/{fd}")
        d = store / "d"
        d.mkdir()
        for n in (252, 255):
            long_name = "L" * n
            (d / long_name).write_bytes(b"A\n")
            os.unlink(d / long_name)
            (d / "f1").write_bytes(b"c\n")
            assert (d / "f1").read_bytes() == b"c\n"
            (d / "sub").mkdir()
            assert list((d / "sub").iterdir()) == []

            (d / long_name).write_bytes(b"B\n")
            os.rename(d / long_name, d / ("M" * n))
            assert (d / ("M" * n)).read_bytes() == b"B\n"
            os.rename(d / ("M" * n), d / "short")
            os.rename(d / "short", d / long_name)
            os.link(d / long_name, d / ("H" * n))
            assert (d / ("H" * n)).read_bytes() == b"B\n"
            for name in (long_name, "H" * n, "f1"):
                os.unlink(d / name)
            (d / "sub").rmdir()
            (d / "f2").write_bytes(b"e\n")
            assert (d / "f2").read_bytes() == b"e\n"
            os.unlink(d / "f2")
            assert os.listdir(d) == []
            # (a swap of f2 that its unlink abandoned may still be removing its temp file)
            wait_until(lambda: os.listdir(below / "d") == [], 10, "an empty backing directory")
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_paths_too_long_for_a_zst_form(store: Path, mount_factory: MountFactory) -> None:
    """A path of PATH_MAX - 1 bytes from the store root (reached through descriptors, as
    pjdfstest does) has no `.zst` form either: create, stat, rename and unlink work."""
    mount_factory(store, "--pattern", "*", "--compress-after", "0", flat=False)
    fds = [os.open(store, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for i in range(16):  # 16 directories of 250 bytes: 4,016 bytes with their slashes
            part = f"{i:x}".rjust(250, "d")
            os.mkdir(part, dir_fd=fds[-1])
            fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        deep = fds[-1]
        name = "n" * (4095 - 16 * 251)  # the file's path from the store root: 4,095 bytes
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=deep)
        os.write(fd, b"deep\n")
        os.close(fd)
        assert os.stat(name, dir_fd=deep).st_size == 5
        os.rename(name, "m" * len(name), src_dir_fd=deep, dst_dir_fd=deep)
        fd = os.open("m" * len(name), os.O_RDONLY, dir_fd=deep)
        assert os.read(fd, 100) == b"deep\n"
        os.close(fd)
        os.unlink("m" * len(name), dir_fd=deep)
        os.mkdir(name, dir_fd=deep)
        os.rmdir(name, dir_fd=deep)
        assert os.listdir(deep) == []
    finally:
        for fd in fds:
            os.close(fd)
