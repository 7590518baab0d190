"""The edges of a mount's life, on real mounts with real programs.

- Extended attributes on the mount root are the backing root's own, beside the virtual
  `user.zstfs.status`; `user.zstfs.*` is reserved there.
- `zstfs status` counters are live (never a cached document), and the getxattr size-then-value
  protocol of `getfattr` and Python holds while they change.
- `--log` inside the mounted directory: the daemon opens, writes and rotates it below the mount,
  never through it (it used to hang `zstfs mount`), detached and in the foreground.
- SIGTERM/SIGINT/SIGHUP: the compactor stops while the mount keeps being served, then a
  non-lazy unmount; a busy mount stays mounted and served and the log names who uses it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gen_rollouts
import pytest
from harness.mount import (
    FLAT_PATTERN,
    STATUS_XATTR,
    Mount,
    MountFactory,
    errno_of,
    gone,
    is_mounted,
    lazy_unmount,
    wait_until,
)


def old(path: Path, days: float = 8) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t))


# ------------------------------------------------------------------ 11: xattrs on the root
@pytest.mark.timeout(60)
def test_xattrs_on_the_mount_root(store: Path, mount_factory: MountFactory) -> None:
    """set/get/list/remove on the mount root act on the backing root (with `setfattr`,
    `getfattr` and Python), beside the virtual status; `user.zstfs.*` is refused."""
    os.setxattr(store, "user.before", b"set before the mount")
    m = mount_factory(store)
    r = subprocess.run(["setfattr", "-n", "user.tool", "-v", "from-setfattr", str(store)],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    os.setxattr(store, "user.bin", bytes(range(256)))
    r = subprocess.run(["getfattr", "-n", "user.tool", "--only-values", str(store)],
                       capture_output=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"from-setfattr"
    assert os.getxattr(store, "user.before") == b"set before the mount"
    assert os.getxattr(store, "user.bin") == bytes(range(256))
    names = set(os.listxattr(store))
    assert {"user.before", "user.tool", "user.bin", STATUS_XATTR} <= names
    r = subprocess.run(["getfattr", "-d", "-m", "^user\\.", str(store)], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert 'user.tool="from-setfattr"' in r.stdout
    assert "user.zstfs.status=" in r.stdout
    assert errno_of(os.getxattr, store, "user.absent") == errno.ENODATA
    assert errno_of(os.setxattr, store, "user.tool", b"x", os.XATTR_CREATE) == errno.EEXIST
    os.removexattr(store, "user.tool")
    assert errno_of(os.removexattr, store, "user.tool") == errno.ENODATA
    assert "user.tool" not in os.listxattr(store)
    # zstfs's own names on the root: the status is virtual, the rest reserved.
    for name in (STATUS_XATTR, "user.zstfs.other"):
        assert errno_of(os.setxattr, store, name, b"x") == errno.EPERM
        assert errno_of(os.removexattr, store, name) == errno.EPERM
    assert errno_of(os.getxattr, store, "user.zstfs.other") == errno.ENODATA
    r = subprocess.run(["setfattr", "-n", "user.zstfs.status", "-v", "x", str(store)],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode != 0
    assert json.loads(os.getxattr(store, STATUS_XATTR))["pid"] == m.pid
    m.stop()
    # What was set through the mount is on the backing root itself.
    assert os.getxattr(store, "user.bin") == bytes(range(256))
    assert os.getxattr(store, "user.before") == b"set before the mount"
    assert "user.tool" not in os.listxattr(store)
    assert not any(n.startswith("user.zstfs.") for n in os.listxattr(store))


# ------------------------------------------------------------------ status is never stale
def getfattr_status(path: Path) -> dict:
    r = subprocess.run(["getfattr", "-n", STATUS_XATTR, "--only-values", str(path)],
                       capture_output=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.timeout(120)
def test_status_counters_are_live_and_getxattr_holds_while_they_change(
        store: Path, mount_factory: MountFactory) -> None:
    """Each promotion and swap shows in the very next status read; and while a writer keeps
    the counters (and the document's length) changing, every `getfattr` and `os.getxattr`
    read gets a whole JSON document (the size asked first still fits the value)."""
    files = [store / f"f{i}.jsonl" for i in range(3)]
    for f in files:
        f.write_bytes(b'{"line": "some json that compresses well"}\n' * 2000)
        old(f)
    m = mount_factory(store, "--compress-after", "0")
    wait_until(lambda: m.status()["swaps_done"] == 3, 30, "the three cold files to be swapped")
    for i, f in enumerate(files, start=1):
        with open(f, "ab") as out:
            out.write(b'{"line": "appended"}\n')  # promotes the compressed file
        # No waiting: the write returned, so the counter has moved.
        assert m.status()["promotions"] == i
    wait_until(lambda: m.status()["swaps_done"] == 6, 30, "the appended files to be swapped")

    stop = threading.Event()
    appends = 0

    def churn() -> None:
        nonlocal appends
        while not stop.is_set():
            with open(files[appends % 3], "ab") as out:
                out.write(b'{"line": "%d"}\n' % appends)
            appends += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        lengths = set()
        for _ in range(100):
            lengths.add(len(json.dumps(getfattr_status(store))))
            for _ in range(5):
                json.loads(os.getxattr(store, STATUS_XATTR))
        end = m.status()
    finally:
        stop.set()
        writer.join(timeout=30)
    assert not writer.is_alive()
    assert end["promotions"] > 3, end
    assert end["swaps_done"] > 6, end
    assert len(lengths) > 1, "the document never changed length: nothing was exercised"
    m.stop()


# ------------------------------------------------------------------ 12: --log inside the mount
# A daemon that opens its log through its own mount deadlocks, and so does any access through
# that mount: these tests touch it only from child processes with timeouts, and read the log
# from below the mount.
def bounded(mountpoint: Path, *cmd: str | Path, timeout: float = 15,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` (which goes through the mount on `mountpoint`). If it hangs, kill the daemon
    serving that mount first: a child stuck on an inode lock behind the daemon's own request
    cannot be killed, but a dead daemon releases everything waiting on its mount."""
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in daemons_serving(mountpoint):
            os.kill(pid, signal.SIGKILL)
        p.kill()
        p.communicate()
        raise AssertionError(f"{cmd[0]} through the mount hung for {timeout}s") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def answered_status(mountpoint: Path) -> dict | None:
    r = bounded(mountpoint, "getfattr", "-n", STATUS_XATTR, "--only-values", mountpoint)
    return json.loads(r.stdout) if r.returncode == 0 else None


def rotate_by_swapping(mnt: Path, name: str, below: Path, log: str, rotations: int) -> None:
    """Append to MNT/name (a promotion) and let the compactor swap it back, again and again
    (each step logs at --debug), until the log `below/log` was rotated `rotations` times."""
    want = [below / f"{log}.{i}" for i in range(1, rotations + 1)]
    deadline = time.monotonic() + 90
    n = 0
    while not all(p.exists() for p in want):
        assert time.monotonic() < deadline, "the log was not rotated"
        done = answered_status(mnt)["swaps_done"]  # type: ignore[index]
        r = bounded(mnt, "sh", "-c", f'echo \'{{"cycle": {n}}}\' >> "$1"', "sh", mnt / name)
        assert r.returncode == 0, r.stderr
        n += 1
        wait_until(lambda done=done: answered_status(mnt)["swaps_done"] > done,  # type: ignore[index]
                   30, "a swap")


@contextlib.contextmanager
def below(directory: Path) -> Iterator[Path]:
    """`directory` as it is underneath a mount made over it later (a descriptor opened now)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield Path(f"/proc/{os.getpid()}/fd/{fd}")
    finally:
        os.close(fd)


def daemons_serving(mountpoint: Path) -> list[int]:
    """PIDs of zstfs daemons whose command line names `mountpoint` (found without the mount)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if b"zstfs" in argv and os.fsencode(mountpoint) in argv:
                    pids.append(int(entry))
    return pids


@pytest.fixture
def src_store(tmp_path: Path) -> Iterator[Path]:
    """A store with one compressible file; any daemon a test left on it is stopped."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "data.jsonl").write_bytes(b'{"line": "compress me"}\n' * 500)
    yield d
    # A daemon that deadlocked on its own mount blocks every path lookup through it (even
    # the harness's checks): end it first (a dead mount answers ENOTCONN at once), then unmount.
    for mp in (d, tmp_path / "mnt"):
        for pid in daemons_serving(mp):
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                wait_until(lambda pid=pid: gone(pid), 20, "the daemon to exit")
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda pid=pid: gone(pid), 20, "the daemon to die")
        lazy_unmount(mp)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", ["over-itself", "other-mountpoint"])
def test_detached_mount_with_its_log_inside_the_mount(
        src_store: Path, tmp_path: Path, where: str) -> None:
    """`zstfs mount --log MNT/…` returns promptly with a live mount; the log is the file the
    mount shows there, it rotates, and the daemon's stderr (faulthandler) follows it."""
    mnt = src_store if where == "over-itself" else tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    (src_store / "logs").mkdir()
    log = mnt / "logs" / "zstfs.log"
    env = {**os.environ, "ZSTFS_LOG_MAX_BYTES": "3000"}
    with below(src_store) as src_below:
        logs = src_below / "logs"
        r = bounded(mnt, sys.executable, "-m", "zstfs", "mount", src_store, mnt, "--log", log,
                    "--pattern", FLAT_PATTERN, "--debug", "--compress-after", "0", env=env,
                    timeout=30)
        assert r.returncode == 0, r.stderr
        info = answered_status(mnt)
        assert info is not None
        assert f"mounted {src_store} on {mnt}" in (logs / "zstfs.log").read_text()
        assert b"mounted" in bounded(mnt, "cat", log).stdout  # the mount shows the same file
        rotate_by_swapping(mnt, "data.jsonl", logs, "zstfs.log", rotations=2)
        assert "compressed data.jsonl" in (logs / "zstfs.log.1").read_text()
        # fd 2 of the detached daemon follows the rotated log: a stack dump lands in the new
        # file.
        os.kill(info["pid"], signal.SIGUSR1)
        wait_until(lambda: "most recent call first" in (logs / "zstfs.log").read_text(), 20,
                   "the stack dump")
        r = bounded(mnt, sys.executable, "-m", "zstfs", "umount", mnt, timeout=30)
        assert r.returncode == 0, r.stderr
        assert gone(info["pid"])
        text = (logs / "zstfs.log").read_text()
    assert f"unmounted {mnt}" in text
    assert "ERROR" not in text
    assert (src_store / "logs" / "zstfs.log").read_text() == text


@pytest.mark.timeout(150)
def test_foreground_mount_with_its_log_inside_the_mount_rotates(
        src_store: Path, mount_factory: MountFactory) -> None:
    """In the foreground the thread that serves the mount also logs: writing and rotating a
    log inside the mount must not go through it."""
    m = mount_factory(src_store, "--log", str(src_store / "zstfs.log"), "--debug",
                      "--compress-after", "0", start=False)
    with below(src_store) as src_below, open(m.log, "ab") as out:
        m.proc = subprocess.Popen(
            [sys.executable, "-m", "zstfs", "mount", "--foreground", "--pattern", FLAT_PATTERN,
             *m.args, str(src_store)],
            stdout=out, stderr=out, start_new_session=True,
            env={**os.environ, "ZSTFS_LOG_MAX_BYTES": "3000"})
        wait_until(lambda: answered_status(src_store) is not None, 30, "the mount to answer")
        assert "mounted" in (src_below / "zstfs.log").read_text()
        rotate_by_swapping(src_store, "data.jsonl", src_below, "zstfs.log", rotations=2)
        assert answered_status(src_store)["pid"] == m.pid  # type: ignore[index]
        assert len((src_below / "zstfs.log").read_bytes()) <= 3000
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=30) == 0
        m.proc = None
        assert "unmounted" in (src_below / "zstfs.log").read_text()


# ------------------------------------------------------------------ 14: signals
@pytest.mark.timeout(90)
@pytest.mark.parametrize("holder", ["cwd", "open-file"])
def test_sigterm_on_a_busy_mount_keeps_it_mounted_and_served(
        store: Path, mount_factory: MountFactory, tmp_path: Path, holder: str) -> None:
    (store / "hello.txt").write_text("hello\n")
    m = mount_factory(store, "--compress-after", "1h")
    assert m.proc is not None
    if holder == "cwd":
        proc = subprocess.Popen(["sleep", "60"], cwd=store)
        inside = f"/proc/{proc.pid}/cwd"
    else:
        proc = subprocess.Popen(["sh", "-c", f"exec 3<'{store}/hello.txt'; exec sleep 60"],
                                cwd=tmp_path)
        inside = f"/proc/{proc.pid}/fd/3"
    try:
        wait_until(lambda: os.path.lexists(inside)
                   and os.path.realpath(inside).startswith(str(store)), 10,
                   "the holder to get in")
        m.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "is busy, not unmounted" in m.log_text(), 30,
                   "the daemon to report the busy mount")
        lines = m.log_text().splitlines()
        at = next(i for i, x in enumerate(lines) if "is busy" in x)
        assert " WARNING " in lines[at]
        end = next(i for i in range(at, len(lines)) if lines[i].startswith("still serving"))
        # A line for each process that uses the mount.
        assert any(x.startswith(f"  pid {proc.pid} (") for x in lines[at + 1:end]), lines[at:]
        assert m.proc.poll() is None
        assert is_mounted(store)
        assert m.status()["pid"] == m.pid
        # The holder still sees the mount (the view hides zstfs's lock file), not the backing.
        if holder == "cwd":
            assert "hello.txt" in os.listdir(inside)
            assert ".zstfs.lock" not in os.listdir(inside)
        else:
            assert Path(inside).read_text() == "hello\n"
        (store / "after.txt").write_text("written after the signal\n")
        # Background compression goes on after the failed unmount.
        cold = b'{"type":"event","text":"cold and compressible"}\n' * 2000
        (store / "cold.jsonl").write_bytes(cold)
        os.utime(store / "cold.jsonl", (1_600_000_000, 1_600_000_000))
        with open(store / "cold.jsonl", "rb") as f:  # a release queues it
            assert f.read() == cold
        wait_until(lambda: m.status()["swaps_done"] >= 1, 30,
                   "the compactor to work again after the busy unmount")
    finally:
        proc.kill()
        proc.wait()
    m.proc.send_signal(signal.SIGTERM)  # again, now that nobody is inside
    assert m.proc.wait(timeout=30) == 0
    m.proc = None
    assert not is_mounted(store)
    assert (store / "after.txt").read_text() == "written after the signal\n"
    assert (store / ".zstfs.lock").exists()


@pytest.mark.timeout(60)
def test_sighup_unmounts_an_idle_mount(store: Path, mount_factory: MountFactory) -> None:
    m = mount_factory(store)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGHUP)
    assert m.proc.wait(timeout=20) == 0
    m.proc = None
    assert not is_mounted(store)
    assert "signal 1: unmounting" in m.log_text()


def timed_access(path: Path, expected: bytes, bound: float) -> None:
    """`cat` a file through the mount in a separate process: it must answer within `bound`."""
    start = time.monotonic()
    try:
        r = subprocess.run(["cat", str(path)], capture_output=True, timeout=bound)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"an access hung for {bound}s during the shutdown") from None
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    assert time.monotonic() - start < bound


@pytest.mark.timeout(180)
def test_sigterm_during_a_long_compression_keeps_serving_until_exit(
        store: Path, mount_factory: MountFactory) -> None:
    """A level-19 compression of a 32 MiB rollout is in flight when SIGTERM arrives: while the
    daemon stops it, every access through the mount is answered promptly; then it unmounts and
    exits 0, and the file is whole (plain, or compressed and decoding to the same bytes)."""
    big = store / "big.jsonl"
    gen_rollouts.generate_rollout(big, 32 << 20, seed=7)
    old(big)
    data = big.read_bytes()
    (store / "small.txt").write_bytes(b"small\n")
    m: Mount = mount_factory(store, "--compress-after", "0", "--level", "19", "--jobs", "1")
    assert m.proc is not None
    wait_until(lambda: m.status()["in_flight"] == 1, 30, "the compression to start")
    m.proc.send_signal(signal.SIGTERM)
    served = 0
    while "background compression paused" not in m.log_text():
        assert m.proc.poll() is None, m.log_text()
        timed_access(store / "small.txt", b"small\n", bound=5)
        served += 1
    print(f"{served} accesses answered while the compactor stopped")
    assert m.proc.wait(timeout=30) == 0
    m.proc = None
    assert not is_mounted(store)
    names = set(os.listdir(store))
    assert not [n for n in names if n.startswith(".zstfs-tmp.")]
    if "big.jsonl" in names:
        assert big.read_bytes() == data
    else:
        r = subprocess.run(["zstd", "-d", "-q", "-c", str(store / "big.jsonl.zst")],
                           capture_output=True, timeout=60)
        assert r.returncode == 0
        assert r.stdout == data
    assert "signal 15: unmounting" in m.log_text()
    assert "is busy" not in m.log_text()
