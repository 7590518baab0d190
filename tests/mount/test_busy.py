"""`zstfs mount` refuses a store that processes use, each way the kernel knows of (/proc): an open
file, a working directory, a mapping whose descriptor is closed, an executable. Stand-in
processes hold the store the way codex's background app-server does
(tests/codex/test_codex_cli.py runs the real one). An open directory alone does not count;
`--force` mounts anyway and keeps a warning in the status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mount import STATUS_XATTR, fuse_available, is_mounted, lazy_unmount, wait_until

from zstfs import busy

pytestmark = pytest.mark.skipif(fuse_available() is not None,
                                reason=f"FUSE unavailable: {fuse_available()}")

HOLD = {
    # how → (a command that holds the store, what the message must say about it)
    "open-file": (["sh", "-c", 'exec 3<"$0/state.sqlite"; echo ready; exec sleep 60'],
                  "has open state.sqlite"),
    "cwd": (["sh", "-c", 'cd "$0" && echo ready && exec sleep 60'], "cwd"),
    # (ctypes, not the mmap module, which keeps a duplicate of the descriptor open)
    "mapping": ([sys.executable, "-c",
                 "import ctypes, mmap, os, sys, time\n"
                 "libc = ctypes.CDLL(None, use_errno=True)\n"
                 "libc.mmap.restype = ctypes.c_void_p\n"
                 "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,"
                 " ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
                 "fd = os.open(sys.argv[1] + '/state.sqlite', os.O_RDONLY)\n"
                 "assert libc.mmap(None, 8192, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) != -1\n"
                 "os.close(fd)\n"
                 "print('ready', flush=True)\n"
                 "time.sleep(60)\n"], "maps state.sqlite"),
    "executable": (["{src}/bin/holder", "-c", "echo ready; exec 2>&1; while :; do read x; done"],
                   "runs bin/holder"),
}


@pytest.fixture
def src(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "store"
    d.mkdir()
    (d / "state.sqlite").write_bytes(b"x" * 8192)
    yield d
    if is_mounted(d):
        lazy_unmount(d)


def zstfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zstfs", *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def hold(how: str, src: Path) -> subprocess.Popen[str]:
    cmd = [c.format(src=src) for c in HOLD[how][0]]
    if how == "executable":
        (src / "bin").mkdir()
        shutil.copy2("/bin/sh", src / "bin" / "holder")
    else:
        cmd.insert(len(cmd) if how == "mapping" else 3, str(src))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", sorted(HOLD))
def test_mount_refuses_a_store_in_use(src: Path, tmp_path: Path, how: str) -> None:
    proc = hold(how, src)
    try:
        users = busy.users_of(str(src))
        assert [u.pid for u in users] == [proc.pid]
        r = zstfs("mount", src, "--log", tmp_path / "log")
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 3, r.stderr
        assert lines[0] == f"zstfs: {src}: in use by 1 process, not mounted:"
        assert lines[1].startswith(f"  pid {proc.pid} (")
        assert lines[1].endswith(HOLD[how][1])  # (an executable's mapping is not repeated)
        assert "--force" in lines[2]
        assert "codex" not in r.stderr  # not codex's daemon: no advice about it
        assert not is_mounted(src)

        r = zstfs("mount", src, "--force", "--log", tmp_path / "log")
        assert r.returncode == 0, r.stderr
        status = json.loads(os.getxattr(src, STATUS_XATTR))
        assert len(status["warnings"]) == 1
        assert f"pid {proc.pid} " in status["warnings"][0]
        assert HOLD[how][1] in status["warnings"][0]
        # It uses the directory underneath, not the mount: the unmount is not busy.
        r = zstfs("umount", src)
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.timeout(60)
def test_an_open_directory_is_not_a_use(src: Path, tmp_path: Path) -> None:
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = zstfs("mount", src, "--log", tmp_path / "log")
        assert r.returncode == 0, r.stderr
        assert json.loads(os.getxattr(src, STATUS_XATTR))["warnings"] == []
        assert zstfs("umount", src).returncode == 0
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_umount_names_a_mapping_through_the_mount(src: Path, tmp_path: Path) -> None:
    """A file mapped through the mount (descriptor closed) keeps it busy; umount names it."""
    assert zstfs("mount", src, "--log", tmp_path / "log").returncode == 0
    proc = hold("mapping", src)
    try:
        r = zstfs("umount", src)
        assert r.returncode == 1
        assert f"pid {proc.pid} " in r.stderr
        assert "maps state.sqlite" in r.stderr
        assert is_mounted(src)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    wait_until(lambda: zstfs("umount", src).returncode == 0, 20, "the unmount")


#: Holds the files named after the arguments open (the first argument is only long) and says so.
LONG_HOLDER = """
import sys, time
held = [open(path, "rb") for path in sys.argv[2:]]
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_lines_about_a_process_with_a_long_command_line_stay_short(
        src: Path, tmp_path: Path) -> None:
    """Codex's app-server has a command line of thousands of characters; the refusal still
    names each process on one line of at most 120 characters, its PID first, for the mount
    and for the unmount."""
    names = [f"{i}-{'long-name-' * 12}.sqlite" for i in range(5)]
    for name in names:
        (src / name).write_bytes(b"x")

    def holder() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", LONG_HOLDER, "--flag=" + "x" * 5000,
                                 *(str(src / n) for n in names)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def check(stderr: str, pid: int) -> list[str]:
        lines = stderr.strip().splitlines()
        assert all(len(line) <= busy.MAX_LINE for line in lines), stderr
        assert [line for line in lines if line.startswith(f"  pid {pid} (")], stderr
        return lines

    proc = holder()
    try:
        r = zstfs("mount", src, "--log", tmp_path / "log")
        assert r.returncode == 1
        lines = check(r.stderr, proc.pid)
        assert lines[0] == f"zstfs: {src}: in use by 1 process, not mounted:"
        assert "has open" in lines[1]
        assert not is_mounted(src)
    finally:
        proc.kill()
        proc.communicate(timeout=10)

    assert zstfs("mount", src, "--log", tmp_path / "log").returncode == 0
    proc = holder()  # now through the mount
    try:
        r = zstfs("umount", src)
        assert r.returncode == 1
        lines = check(r.stderr, proc.pid)
        assert lines[0] == f"zstfs: {src}: mount is busy, not unmounted:"
        assert is_mounted(src)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    wait_until(lambda: zstfs("umount", src).returncode == 0, 20, "the unmount")
