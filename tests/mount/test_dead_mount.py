"""A mount whose daemon was killed (`kill -9`, the OOM killer): the kernel keeps the mount, and
every access through it fails with ENOTCONN ("Transport endpoint is not connected"). `zstfs
status` says so in one line naming `zstfs umount`; `zstfs umount` clears it; `zstfs mount` clears
it by itself and mounts again, the store intact. As root and as an ordinary user.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness.mount import (
    NOBODY,
    as_nobody_in,
    gone,
    is_mounted,
    one_line,
    status,
    wait_until,
    zstfs,
)

#: What a dead mount answers: ENOTCONN, or ECONNABORTED for the first request after the kill.
DEAD = "Transport endpoint is not connected|Software caused connection abort"
#: A store's files: `old.jsonl` the first daemon compresses (a `.zst` underneath), `data.bin`
#: it writes.
OLD = b"".join(b'{"n": %d, "text": "an old line of a rollout"}\n' % i for i in range(4000))
BINARY = bytes(range(256)) * 64


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "hello.txt").write_text("hello\n")
    return d


def as_user(*cmd: str | Path, user: int = NOBODY) -> subprocess.CompletedProcess[str]:
    """A command run as `user` (the way `zstfs(..., user=)` runs zstfs)."""
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                           *map(str, cmd)], capture_output=True, text=True, timeout=30)


def kill_daemon(pid: int) -> None:
    """SIGKILL the daemon (what the OOM killer does) and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), 20, f"the killed daemon (pid {pid}) to exit")


def mount_and_kill(src: Path, tmp_path: Path) -> None:
    """Mount `src` over itself, detached; kill its daemon; check that the mount is dead."""
    r = zstfs("mount", src, "--log", tmp_path / "zstfs.log")
    assert r.returncode == 0, r.stderr
    kill_daemon(status(src)["pid"])  # type: ignore[index]
    assert is_mounted(src)
    with pytest.raises(OSError, match=DEAD):
        os.listdir(src)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_status_of_a_dead_mount_is_one_line_naming_zstfs_umount(
        src: Path, tmp_path: Path, detached: list[Path], json_output: bool) -> None:
    detached.append(src)
    mount_and_kill(src, tmp_path)
    r = zstfs("status", *(["--json"] if json_output else []), src)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    line = one_line(r.stderr)
    assert line.startswith(f"zstfs: {src}: ")
    assert "daemon is gone" in line
    assert f"run `zstfs umount {src}`" in line
    assert is_mounted(src)  # status only looks


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lazy", [False, True], ids=["umount", "umount -z"])
def test_umount_clears_a_dead_mount(src: Path, tmp_path: Path, detached: list[Path],
                                    lazy: bool) -> None:
    detached.append(src)
    mount_and_kill(src, tmp_path)
    r = zstfs("umount", *(["-z"] if lazy else []), src)
    assert r.returncode == 0, r.stderr
    line = one_line(r.stderr)
    assert line.startswith(f"zstfs: {src}: ")
    assert "daemon was gone" in line
    assert "cleared its dead mount" in line
    assert not is_mounted(src)
    assert (src / "hello.txt").read_text() == "hello\n"  # the store underneath
    assert (src / ".zstfs.lock").exists()
    # Nothing left to clear: an ordinary refusal.
    r = zstfs("umount", src)
    assert r.returncode == 1
    assert "not a zstfs mount" in one_line(r.stderr)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["over itself", "elsewhere"])
def test_mount_clears_a_dead_mount_and_serves_the_store_again(
        src: Path, tmp_path: Path, detached: list[Path], where: str) -> None:
    mnt = src if where == "over itself" else tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    detached.append(mnt)
    log = tmp_path / "zstfs.log"
    (src / "old.jsonl").write_bytes(OLD)
    old = time.time() - 3600
    os.utime(src / "old.jsonl", (old, old))
    r = zstfs("mount", src, mnt, "--log", log, "--compress-after", "1m")
    assert r.returncode == 0, r.stderr
    (mnt / "data.bin").write_bytes(BINARY)  # through the mount
    wait_until(lambda: status(mnt)["swaps_done"] >= 1, 30, "old.jsonl compressed")  # type: ignore[index]
    pid = status(mnt)["pid"]  # type: ignore[index]
    kill_daemon(pid)
    with pytest.raises(OSError, match=DEAD):
        os.listdir(mnt)

    r = zstfs("mount", src, mnt, "--log", log)
    assert r.returncode == 0, r.stderr
    line = one_line(r.stderr)
    assert line.startswith(f"zstfs: {mnt}: ")
    assert "previous zstfs daemon is gone" in line
    assert "cleared its dead mount" in line
    assert "nothing is lost" in line
    info = status(mnt)
    assert info is not None
    assert info["pid"] != pid
    assert info["compressed_files"] == 1
    assert (mnt / "old.jsonl").read_bytes() == OLD
    assert (mnt / "data.bin").read_bytes() == BINARY
    assert (mnt / "hello.txt").read_text() == "hello\n"
    assert zstfs("umount", mnt).returncode == 0
    assert not is_mounted(mnt)
    assert (src / "old.jsonl.zst").exists()  # still compressed underneath


@pytest.mark.timeout(60)
def test_a_directory_inside_a_dead_mount_names_zstfs_umount(
        src: Path, tmp_path: Path, detached: list[Path]) -> None:
    detached.append(src)
    (src / "sessions").mkdir()
    mount_and_kill(src, tmp_path)
    inner = src / "sessions"
    for args in (["status", inner], ["umount", inner],
                 ["mount", inner, "--log", tmp_path / "inner.log"]):
        r = zstfs(*args)
        assert r.returncode == 1, args
        line = one_line(r.stderr)
        assert line.startswith(f"zstfs: {inner}: ")
        assert f"`zstfs umount {src}`" in line
    assert is_mounted(src)  # none clears a mount it was not given
    assert zstfs("umount", src).returncode == 0
    assert not is_mounted(src)


# ------------------------------------------------------------------ an ordinary user
@pytest.mark.timeout(120)
def test_ordinary_user_clears_their_dead_mount_with_umount_and_with_mount(
        stock_permissions: None, user_dir: Path, detached: list[Path]) -> None:
    """User nobody's own mount, killed: status, umount and mount run as nobody (fusermount3
    clears only the user's own mounts), and the store reads back through the new mount."""
    env, log = as_nobody_in(user_dir, detached)

    def mount() -> subprocess.CompletedProcess[str]:
        return zstfs("mount", user_dir, "--log", log, user=NOBODY, env=env)

    def daemon_pid() -> int:
        r = zstfs("status", "--json", user_dir, user=NOBODY, env=env)
        assert r.returncode == 0, r.stderr
        return int(json.loads(r.stdout)["pid"])

    r = mount()
    assert r.returncode == 0, r.stderr
    w = as_user("sh", "-c", 'printf "%s\\n" "{\\"user\\": \\"nobody\\"}" > "$0/mine.jsonl"',
                user_dir)
    assert w.returncode == 0, w.stderr
    kill_daemon(daemon_pid())
    r = as_user("ls", user_dir)
    assert r.returncode != 0
    assert re.search(DEAD, r.stderr), r.stderr

    r = zstfs("status", user_dir, user=NOBODY, env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"`zstfs umount {user_dir}`" in one_line(r.stderr)
    r = zstfs("umount", user_dir, user=NOBODY, env=env)
    assert r.returncode == 0, r.stderr
    assert "cleared its dead mount" in one_line(r.stderr)
    assert not is_mounted(user_dir)

    r = mount()
    assert r.returncode == 0, r.stderr
    kill_daemon(daemon_pid())
    r = mount()
    assert r.returncode == 0, r.stderr
    assert "cleared its dead mount" in one_line(r.stderr)
    pid = daemon_pid()
    r = as_user("cat", user_dir / "before.txt", user_dir / "mine.jsonl")
    assert r.returncode == 0, r.stderr
    assert r.stdout == 'from before\n{"user": "nobody"}\n'
    r = zstfs("umount", user_dir, user=NOBODY, env=env)
    assert r.returncode == 0, r.stderr
    assert gone(pid)
    assert not is_mounted(user_dir)
    assert (user_dir / "mine.jsonl").read_text() == '{"user": "nobody"}\n'
