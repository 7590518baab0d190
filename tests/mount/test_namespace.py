"""The backing store is reached through descriptors the daemon holds, one per directory it
knows, opened from its parent's by one name, following no symlink. So:

- a directory swapped for a symlink (or for another directory) underneath the mount never
  leads the daemon outside the store: a root daemon with `--allow-other`, and an unprivileged
  user who can write a directory of the store, cannot read or create files in a root-only
  directory through it;
- a directory renamed underneath keeps being the directory the mount showed;
- paths longer than PATH_MAX from the store root work, as they do on the backing filesystem
  relative to a directory descriptor (pjdfstest's `*/03.t` from a directory inside the mount).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness.inprocess import World
from harness.mount import NOBODY, MountFactory, shared_tmp, wait_until

from zstfs import openfiles

ATTACK = r"""
import errno, os, sys
mnt, store, secret = sys.argv[1:4]
def err(fn, *a):
    try:
        fn(*a)
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"
os.mkdir(os.path.join(mnt, "d", "sub"))
if sys.argv[4] == "listed":
    os.listdir(os.path.join(mnt, "d", "sub"))  # the daemon has used the directory already
os.rename(os.path.join(store, "d", "sub"), os.path.join(store, "d", "sub.old"))
os.symlink(secret, os.path.join(store, "d", "sub"))
print(err(lambda: open(os.path.join(mnt, "d", "sub", "victim")).read()))
print(err(lambda: open(os.path.join(mnt, "d", "sub", "pwned"), "w").write("p\n")))
print(err(os.mkdir, os.path.join(mnt, "d", "sub", "pwned-dir")))
print(err(os.listdir, os.path.join(mnt, "d", "sub")))
print(err(os.chmod, os.path.join(mnt, "d", "sub"), 0o777))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["listed", "fresh"])
def test_a_directory_swapped_for_a_symlink_never_leads_outside(
        mount_factory: MountFactory, when: str) -> None:
    """`mkdir M/d/sub` (and, for `listed`, a listing of it), then, underneath, `sub` moved
    aside and replaced by a symlink to a root-only directory holding a 0644 `victim`: through
    the mount, nobody can neither read `victim` nor create anything beside it. A directory the
    daemon has used goes on being that directory (now `sub.old`); one it has not used yet is
    refused (ENOTDIR: no symlink is followed)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (a root daemon and an unprivileged user) and setpriv")
    with shared_tmp() as base:
        store, mnt, secret = base / "store", base / "mnt", base / "secret"
        (store / "d").mkdir(parents=True)
        os.chown(store / "d", NOBODY, NOBODY)
        mnt.mkdir()
        secret.mkdir(mode=0o700)
        (secret / "victim").write_text("root only\n")
        (secret / "victim").chmod(0o644)
        mount_factory(store, "--allow-other", "--pattern", "*", mountpoint=mnt, flat=False)
        r = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-c", textwrap.dedent(ATTACK), str(mnt), str(store), str(secret),
             when], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        read, create, mkdir, listing, chmod = r.stdout.split()
        assert read != "ok"
        if when == "listed":
            # The daemon goes on with the directory it knew, moved aside, inside the store.
            assert (create, mkdir, listing, chmod) == ("ok", "ok", "ok", "ok")
            assert (store / "d" / "sub.old").stat().st_mode & 0o777 == 0o777
            assert sorted(os.listdir(store / "d" / "sub.old")) == ["pwned", "pwned-dir"]
        else:
            assert create != "ok"
            assert mkdir != "ok"
            assert listing != "ok"
            assert chmod != "ok"
        assert secret.stat().st_mode & 0o777 == 0o700
        assert sorted(os.listdir(secret)) == ["victim"]
        assert (secret / "victim").read_text() == "root only\n"


@pytest.mark.timeout(60)
def test_a_directory_renamed_underneath_is_still_the_one_shown(
        store: Path, tmp_path: Path, mount_factory: MountFactory) -> None:
    """Once the daemon knows a directory, its files are found in that directory wherever it is
    moved underneath, and a directory put in its place underneath is not taken for it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (store / "a").mkdir()
    (store / "a" / "f").write_text("first\n")
    mount_factory(store, "--pattern", "*", mountpoint=mnt, flat=False)
    assert (mnt / "a" / "f").read_text() == "first\n"
    os.rename(store / "a", store / "a.moved")
    (store / "a").mkdir()
    (store / "a" / "f").write_text("impostor\n")
    (mnt / "a" / "g").write_text("second\n")  # lands in the directory the mount showed
    assert (store / "a.moved" / "g").read_text() == "second\n"
    assert not (store / "a" / "g").exists()
    assert (mnt / "a" / "f").read_text() == "first\n"


@pytest.mark.timeout(120)
def test_paths_past_path_max_from_the_store_root(store: Path,
                                                 mount_factory: MountFactory) -> None:
    """A tree deeper than PATH_MAX, built and used through directory descriptors inside the
    mount (as pjdfstest does from a directory inside it): every operation works at 6 KiB from
    the store root, with the default patterns and with every file compressible."""
    for pattern in ("sessions/**/rollout-*.jsonl", "*"):
        for p in list(store.iterdir()):
            if p.is_dir():
                shutil.rmtree(p)
        m = mount_factory(store, "--pattern", pattern, flat=False)
        fds = [os.open(store, os.O_RDONLY | os.O_DIRECTORY)]
        try:
            for i in range(24):  # 24 directories of 250 bytes: 6,024 bytes
                part = f"{i:x}".rjust(250, "p")
                os.mkdir(part, dir_fd=fds[-1])
                fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            deep = fds[-1]
            fd = os.open("f.jsonl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=deep)
            os.write(fd, b'{"deep": true}\n')
            os.close(fd)
            os.chmod("f.jsonl", 0o600, dir_fd=deep)
            assert os.stat("f.jsonl", dir_fd=deep).st_mode & 0o777 == 0o600
            os.truncate(f"/proc/self/fd/{deep}/f.jsonl", 8)
            os.link("f.jsonl", "g.jsonl", src_dir_fd=deep, dst_dir_fd=deep)
            os.rename("g.jsonl", "h.jsonl", src_dir_fd=deep, dst_dir_fd=deep)
            os.symlink("f.jsonl", "s", dir_fd=deep)
            assert os.readlink("s", dir_fd=deep) == "f.jsonl"
            os.mkfifo("fifo", dir_fd=deep)
            os.mkdir("sub", dir_fd=deep)
            assert sorted(os.listdir(deep)) == ["f.jsonl", "fifo", "h.jsonl", "s", "sub"]
            fd = os.open("h.jsonl", os.O_RDONLY, dir_fd=deep)
            assert os.read(fd, 100) == b'{"deep":'
            os.close(fd)
            for name in ("f.jsonl", "h.jsonl", "s", "fifo"):
                os.unlink(name, dir_fd=deep)
            os.rmdir("sub", dir_fd=deep)
            assert os.listdir(deep) == []
        finally:
            for fd in fds:
                os.close(fd)
        m.stop()


async def test_directory_descriptors_are_bounded(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: with room for 4 directory descriptors, 40 directories (a chain of 10 and 30
    side by side) are made, written, read, renamed and removed through the operations; the
    table never holds many more than 4, and descriptors closed to make room are opened again
    from their parents by name when needed."""
    monkeypatch.setattr(openfiles, "DIR_FD_GRACE", 2)
    root = tmp_path / "store"
    root.mkdir()
    w = World(root, pattern="*.jsonl")
    w.files.table.dir_fds_max = 4
    try:
        held = []
        chain = "/".join(f"c{i}" for i in range(10))
        for i in range(10):
            await w.mkdir("/".join(f"c{j}" for j in range(i + 1)))
        for i in range(30):
            await w.mkdir(f"d{i}")
            await w.release(await w.create(f"d{i}/f.jsonl", b"%d\n" % i))
            held.append(len(w.files.table._dir_fds))
        await w.release(await w.create(f"{chain}/deep.jsonl", b"deep\n"))
        for i in range(30):
            assert await w.content(f"d{i}/f.jsonl") == b"%d\n" % i
            held.append(len(w.files.table._dir_fds))
        await w.rename("d0", "c0/d0")
        assert await w.content("c0/d0/f.jsonl") == b"0\n"
        assert await w.content(f"{chain}/deep.jsonl") == b"deep\n"
        await w.unlink(f"{chain}/deep.jsonl")
        assert max(held) <= 4 + 3  # (at most the grace's worth above the limit)
        assert (root / "c0" / "d0" / "f.jsonl").read_bytes() == b"0\n"
        assert not (root / chain / "deep.jsonl").exists()
    finally:
        w.close()


@pytest.mark.timeout(120)
def test_a_file_past_path_max_is_compressed_and_read_back(store: Path,
                                                          mount_factory: MountFactory) -> None:
    """The compactor reaches a directory the kernel knows through the same descriptors: a cold
    file 6 KiB deep from the store root is swapped, and reads back byte for byte."""
    below = [os.open(store, os.O_RDONLY | os.O_DIRECTORY)]  # the backing store itself
    fds: list[int] = []
    try:
        mount_factory(store, "--compress-after", "0")
        fds.append(os.open(store, os.O_RDONLY | os.O_DIRECTORY))
        for i in range(24):
            part = f"{i:x}".rjust(250, "q")
            os.mkdir(part, dir_fd=fds[-1])
            fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            below.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=below[-1]))
        data = b"".join(b'{"deep": %d, "text": "the same words"}\n' % i for i in range(3000))
        fd = os.open("r.jsonl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fds[-1])
        os.write(fd, data)
        os.close(fd)  # released: the compactor takes it (compress-after 0)
        wait_until(lambda: sorted(os.listdir(below[-1])) == ["r.jsonl.zst"], 30,
                   "the deep file compressed")
        fd = os.open("r.jsonl", os.O_RDONLY, dir_fd=fds[-1])
        try:
            assert os.read(fd, len(data) + 1) == data
        finally:
            os.close(fd)
    finally:
        for fd in fds + below:
            os.close(fd)
