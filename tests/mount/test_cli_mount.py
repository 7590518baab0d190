"""The life of a mount as a user drives it: `zstfs mount` (detached), `zstfs umount`, signals,
the fstab form, refusals, an ordinary user's own mount, and the daemon's log.

Commands run as real subprocesses (`sys.executable -m zstfs`), detached exactly as a user would
run them; teardown lazy-unmounts and reaps whatever a failing test left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness.mount import (
    NOBODY,
    Mount,
    as_nobody_in,
    gone,
    is_mounted,
    one_line,
    status,
    wait_until,
    zstfs,
)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "hello.txt").write_text("hello\n")
    return d


# ------------------------------------------------------------------ mount / umount
@pytest.mark.timeout(60)
def test_detached_mount_is_live_when_it_returns_and_umount_waits_for_the_daemon(
        src: Path, tmp_path: Path, detached: list[Path]) -> None:
    detached.append(src)
    log = tmp_path / "daemon.log"
    r = zstfs("mount", src, "--log", log)
    assert r.returncode == 0, r.stderr
    assert r.stdout == r.stderr == ""
    # No waiting: the command returned, so the mount answers now.
    assert (src / "hello.txt").read_text() == "hello\n"
    info = status(src)
    assert info is not None
    assert info["source"] == str(src)
    assert info["mountpoint"] == str(src)
    pid = info["pid"]
    assert not gone(pid)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"zstfs"]
    (src / "written.txt").write_text("through the mount\n")
    r = zstfs("status", src)
    assert r.returncode == 0, r.stderr
    assert f"pid {pid}" in r.stdout
    r = zstfs("umount", src)
    assert r.returncode == 0, r.stderr
    assert gone(pid), "zstfs umount returned before the daemon exited"
    assert not os.path.exists(f"/proc/{pid}") or gone(pid)
    assert not is_mounted(src)
    assert (src / "written.txt").read_text() == "through the mount\n"
    assert (src / ".zstfs.lock").exists()  # the backing directory is visible again
    assert f"mounted {src} on {src}" in log.read_text()
    assert f"unmounted {src}" in log.read_text()


@pytest.mark.timeout(60)
def test_mount_on_another_mountpoint_and_status_json(src: Path, tmp_path: Path,
                                                     detached: list[Path]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    detached.append(mnt)
    r = zstfs("mount", src, mnt, "--log", tmp_path / "log", "--compress-after", "12h")
    assert r.returncode == 0, r.stderr
    assert (mnt / "hello.txt").read_text() == "hello\n"
    info = json.loads(zstfs("status", "--json", mnt).stdout)
    assert (info["source"], info["mountpoint"], info["compress_after"]) == (
        str(src), str(mnt), 12 * 3600)
    assert zstfs("umount", mnt).returncode == 0
    assert not is_mounted(mnt)
    assert list(mnt.iterdir()) == []


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("case", "needle"), [
    ("missing", "no such directory"),
    ("file", "not a directory"),
    ("unknown-option", "unknown mount option 'frobnicate'"),
    ("bad-o-duration", "invalid duration 'soon'"),
    ("o-duration-without-unit", "invalid duration '7': give a unit"),
    ("missing-mountpoint", "no such directory"),
    ("unwritable-log", "cannot open the log file"),
])
def test_refusals_are_one_line_and_leave_nothing_mounted(
        tmp_path: Path, src: Path, case: str, needle: str, detached: list[Path]) -> None:
    detached.append(src)
    named = src
    args: list[str | Path] = ["mount", src, "--log", tmp_path / "log"]
    if case == "missing":
        named = tmp_path / "nope"
        args = ["mount", named]
    elif case == "file":
        named = src / "hello.txt"
        args = ["mount", named]
    elif case == "unknown-option":
        args += ["-o", "compress_after=1h,frobnicate"]
        named = Path("frobnicate")
    elif case == "bad-o-duration":
        args += ["-o", "compress_after=soon"]
        named = Path("compress_after=soon")
    elif case == "o-duration-without-unit":
        args += ["-o", "compress_after=7"]
        named = Path("compress_after=7")
    elif case == "unwritable-log":
        named = tmp_path / "no-dir" / "zstfs.log"
        args = ["mount", src, "--log", named]
    elif case == "missing-mountpoint":
        named = tmp_path / "no-mnt"
        args = ["mount", src, named, "--log", tmp_path / "log"]
    r = zstfs(*args)
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert line.startswith("zstfs: ")
    assert str(named) in line
    assert needle in line
    assert not is_mounted(src)
    assert status(src) is None


@pytest.mark.parametrize(("args", "needle"), [
    (["mount", "--compress-after", "soon"], "argument --compress-after: invalid duration 'soon'"),
    (["mount", "--compress-after", "7"], "argument --compress-after: invalid duration '7': "
                                         "give a unit (7d, 12h, 30m, 45s; s m h d w), or 0"),
    (["compress", "--older-than", "7"], "argument --older-than: invalid duration '7': "
                                        "give a unit (7d, 12h, 30m, 45s; s m h d w), or 0"),
])
def test_bad_duration_is_a_usage_error(src: Path, args: list[str], needle: str) -> None:
    (src / "old.jsonl").write_text("{}\n" * 1000)
    r = zstfs(*args, src)
    assert r.returncode == 2
    assert needle in r.stderr.splitlines()[-1]
    assert not is_mounted(src)
    assert sorted(p.name for p in src.iterdir()) == ["hello.txt", "old.jsonl"]  # nothing done


@pytest.mark.timeout(60)
@pytest.mark.parametrize("inside", ["source", "mountpoint"])
def test_mount_inside_a_zstfs_mount_is_refused_naming_it(
        src: Path, tmp_path: Path, inside: str, detached: list[Path]) -> None:
    """`zstfs mount ~/.codex/sessions` while ~/.codex is mounted: the store would be served by
    the outer daemon (which refuses zstfs's own names, such as the store lock)."""
    detached.append(src)
    assert zstfs("mount", src, "--log", tmp_path / "log").returncode == 0
    pid = status(src)["pid"]  # type: ignore[index]
    inner = src / "sessions"
    inner.mkdir()
    (inner / "a.jsonl").write_text("{}\n")
    other = tmp_path / "other"
    other.mkdir()
    detached.append(other)
    args = [inner] if inside == "source" else [other, inner]
    r = zstfs("mount", *args, "--log", tmp_path / "inner.log")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith(f"zstfs: {inner}: ")
    assert f"inside the zstfs mount on {src} (pid {pid})" in line
    assert "store lock" not in line
    assert not is_mounted(inner)
    assert not is_mounted(other)
    assert status(src)["pid"] == pid  # type: ignore[index]
    assert (inner / "a.jsonl").read_text() == "{}\n"
    assert zstfs("umount", src).returncode == 0


@pytest.mark.timeout(60)
def test_second_mount_of_the_same_source_is_refused(src: Path, tmp_path: Path,
                                                    detached: list[Path]) -> None:
    detached.append(src)
    assert zstfs("mount", src, "--log", tmp_path / "log").returncode == 0
    pid = status(src)["pid"]  # type: ignore[index]
    # Again over itself.
    r = zstfs("mount", src, "--log", tmp_path / "log2")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert str(src) in line
    assert "already mounted" in line
    # The same store onto another mountpoint: the store lock refuses it.
    other = tmp_path / "other"
    other.mkdir()
    detached.append(other)
    r = zstfs("mount", src, other, "--log", tmp_path / "log3")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert str(src) in line
    assert "in use" in line or "already mounted" in line, line
    assert not is_mounted(other)
    assert status(src)["pid"] == pid  # type: ignore[index]
    assert (src / "hello.txt").read_text() == "hello\n"
    assert zstfs("umount", src).returncode == 0


def test_umount_of_something_else_fails_clearly(tmp_path: Path) -> None:
    r = zstfs("umount", tmp_path)
    assert r.returncode == 1
    assert str(tmp_path) in one_line(r.stderr)
    assert "not a zstfs mount" in r.stderr


# --------------------------------------------------------------------------- busy
@pytest.mark.timeout(60)
@pytest.mark.parametrize("holder", ["cwd", "open-file"])
def test_umount_of_a_busy_mount_fails_and_keeps_it(src: Path, tmp_path: Path, holder: str,
                                                   detached: list[Path]) -> None:
    detached.append(src)
    assert zstfs("mount", src, "--log", tmp_path / "log").returncode == 0
    pid = status(src)["pid"]  # type: ignore[index]
    if holder == "cwd":
        proc = subprocess.Popen(["sleep", "60"], cwd=src)
    else:
        proc = subprocess.Popen(["sh", "-c", f"exec 3<'{src}/hello.txt'; exec sleep 60"],
                                cwd=tmp_path)
    try:
        wait_until(lambda: any(os.path.realpath(f"/proc/{proc.pid}/{link}").startswith(str(src))
                               for link in ("cwd", "fd/3") if os.path.lexists(
                                   f"/proc/{proc.pid}/{link}")), 10, "the holder to get in")
        r = zstfs("umount", src)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert lines[0] == f"zstfs: {src}: mount is busy, not unmounted:"
        assert lines[1].startswith(f"  pid {proc.pid} (")  # a line for the holder
        assert lines[1].endswith("cwd" if holder == "cwd" else "has open hello.txt")
        assert lines[2:] == ["close them, or use --lazy"]
        assert is_mounted(src)
        assert status(src)["pid"] == pid  # type: ignore[index]
        assert (src / "hello.txt").read_text() == "hello\n"
    finally:
        proc.kill()
        proc.wait()
    r = zstfs("umount", src)
    assert r.returncode == 0, r.stderr
    assert gone(pid)
    assert not is_mounted(src)


# ------------------------------------------------------------------------- signals
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(store: Path, mount_factory, sig: signal.Signals) -> None:
    m: Mount = mount_factory(store)
    (store / "data.jsonl").write_text('{"kept": true}\n')
    assert m.proc is not None
    m.proc.send_signal(sig)
    assert m.proc.wait(timeout=20) == 0
    m.proc = None
    assert not is_mounted(store)
    assert (store / "data.jsonl").read_text() == '{"kept": true}\n'
    assert (store / ".zstfs.lock").exists()  # the backing store, not the mount
    assert f"signal {int(sig)}: unmounting" in m.log_text()


@pytest.mark.timeout(60)
def test_sigterm_to_a_detached_daemon(src: Path, tmp_path: Path, detached: list[Path]) -> None:
    detached.append(src)
    assert zstfs("mount", src, "--log", tmp_path / "log").returncode == 0
    pid = status(src)["pid"]  # type: ignore[index]
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: gone(pid), 20, "the daemon to exit on SIGTERM")
    assert not is_mounted(src)
    assert "unmounted" in (tmp_path / "log").read_text()


# ---------------------------------------------------------------------------- fstab
@pytest.mark.timeout(60)
def test_fstab_form_mounts_with_options(src: Path, tmp_path: Path,
                                        detached: list[Path]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    detached.append(mnt)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("XDG_STATE_HOME", None)
    r = zstfs(src, mnt, "-o", "compress_after=1h,noauto,user,rw,pattern=*.jsonl,level=5", env=env)
    assert r.returncode == 0, r.stderr
    info = status(mnt)
    assert info is not None
    assert (info["compress_after"], info["level"], info["pattern"]) == (3600, 5, "*.jsonl")
    assert (mnt / "hello.txt").read_text() == "hello\n"
    # A detached daemon without --log logs under $HOME/.local/state/zstfs/.
    logs = list((home / ".local" / "state" / "zstfs").iterdir())
    assert len(logs) == 1
    assert "mounted" in logs[0].read_text()
    assert zstfs("umount", mnt).returncode == 0
    assert not is_mounted(mnt)


# ----------------------------------------------------------------------- a user's own
@pytest.mark.timeout(90)
def test_ordinary_user_mounts_reads_writes_and_unmounts_their_own_dir(
        stock_permissions: None, user_dir: Path, detached: list[Path]) -> None:
    env, log = as_nobody_in(user_dir, detached)
    r = zstfs("mount", user_dir, "--log", log, user=NOBODY, env=env)
    assert r.returncode == 0, r.stderr
    info = status(user_dir)
    # root may not see the mount's contents (no allow_root), but the kernel lists it.
    assert is_mounted(user_dir)
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        sys.executable, "-c", """
import json, os, sys
d = sys.argv[1]
print(open(os.path.join(d, "before.txt")).read(), end="")
with open(os.path.join(d, "mine.jsonl"), "w") as f:
    f.write('{"user": "nobody"}\\n')
print(open(os.path.join(d, "mine.jsonl")).read(), end="")
st = os.stat(os.path.join(d, "mine.jsonl"))
info = json.loads(os.getxattr(d, "user.zstfs.status"))
print(st.st_uid, info["pid"], int(info.get("passthrough", False)))
""", str(user_dir)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["from before", '{"user": "nobody"}']
    uid, pid, passthrough = map(int, lines[2].split())
    assert uid == NOBODY
    # Registering a backing file needs CAP_SYS_ADMIN: an ordinary user's mount serves its
    # files itself, and says so from the start.
    assert passthrough == 0
    assert Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0] == str(NOBODY)
    del info
    r = zstfs("umount", user_dir, user=NOBODY, env=env)
    assert r.returncode == 0, r.stderr
    assert gone(pid)
    assert not is_mounted(user_dir)
    assert (user_dir / "mine.jsonl").read_text() == '{"user": "nobody"}\n'
    assert os.stat(user_dir / "mine.jsonl").st_uid == NOBODY


# ----------------------------------------------------------------------------- logs
@pytest.mark.timeout(90)
@pytest.mark.parametrize("debug", [False, True], ids=["info", "debug"])
def test_log_file_and_debug(src: Path, tmp_path: Path, detached: list[Path],
                            debug: bool) -> None:
    detached.append(src)
    log = tmp_path / "zstfs.log"
    (src / "old.jsonl").write_text('{"line": "compress me"}\n' * 5000)
    old = time.time() - 3600
    os.utime(src / "old.jsonl", (old, old))
    r = zstfs("mount", src, "--log", log, "--compress-after", "1m",
              *(["--debug"] if debug else []))
    assert r.returncode == 0, r.stderr
    wait_until(lambda: status(src)["swaps_done"] >= 1, 30, "the compactor's swap")  # type: ignore[index]
    with open(src / "old.jsonl", "a") as f:  # the first write promotes it back to plain
        f.write('{"line": "appended"}\n')
    pid = status(src)["pid"]  # type: ignore[index]
    assert zstfs("umount", src).returncode == 0
    text = log.read_text()
    levels = {line.split()[3] for line in text.splitlines() if line[:2] == "20"}
    assert f"{pid} INFO zstfs.mount: mounted {src} on {src}" in text
    assert f"{pid} INFO zstfs.mount: unmounted {src}" in text
    if debug:
        assert "DEBUG" in levels
        assert "compressed old.jsonl" in text
        assert "promoted old.jsonl" in text
    else:
        assert "DEBUG" not in levels
    assert "ERROR" not in levels, text
