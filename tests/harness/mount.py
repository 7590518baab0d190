"""Real zstfs mounts in temporary directories, the `zstfs` command as users run it (detached; as an
ordinary user too), and what an ordinary user's mount needs: helpers and fixtures (a pytest
plugin, loaded by tests/conftest.py).

A mount is the real `zstfs mount` command run as a subprocess (`--foreground`, so a test can also
kill it), over its own source directory by default. Every mount is bounded in time: waiting for it
to come up, and for it to go away, fails the test rather than hanging CI; teardown always
lazy-unmounts whatever is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.logcheck import LogCheck, daemon_errors

STATUS_XATTR = "user.zstfs.status"
MOUNT_TIMEOUT = 20.0
#: The ordinary user that tests run zstfs as (`nobody`).
NOBODY = 65534
#: Most tests use flat stores of `*.jsonl` files rather than codex's `sessions/**/rollout-*`
#: layout (the default patterns); `flat_pattern` gives their commands `--pattern '*.jsonl'`.
FLAT_PATTERN = "*.jsonl"
_PATTERN_COMMANDS = ("mount", "compress", "expand", "verify", "status")


def flat_pattern(args: list[str]) -> list[str]:
    """`args` of a zstfs command line with `--pattern '*.jsonl'` added after the subcommand,
    unless it is not one that takes patterns or names its own (`--pattern`, `-o pattern=`)."""
    if any(a == "--pattern" or "pattern=" in a for a in args):
        return args
    for i, a in enumerate(args):
        if a in _PATTERN_COMMANDS:
            return [*args[:i + 1], "--pattern", FLAT_PATTERN, *args[i + 1:]]
    return args


def fuse_available() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (apt-get install fuse3)"
    return None


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02) -> Any:
    """Poll an observable condition with a deadline (the test fails, it never hangs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    """The errno of a system call that must fail (the test fails if it succeeds)."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno or 0
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def compress_in_place(path: Path) -> None:
    """Replace a plain backing file by its `.zst` in zstfs's format (what a swap leaves)."""
    from zstfs.codec import CodecParams, compress_file

    src = os.open(path, os.O_RDONLY)
    dst = os.open(f"{path}.zst", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        compress_file(src, dst, CodecParams())
    finally:
        os.close(src)
        os.close(dst)
    path.unlink()


@contextlib.contextmanager
def tmpfs_store(where: Path, options: str) -> Iterator[Path]:
    """An empty `store` directory on a tmpfs mounted at `where` with `options` (a filesystem
    that fills up, or runs out of room for xattrs); the test skips where it cannot mount one
    (needs root)."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs: {r.stderr.strip()}")
    try:
        (where / "store").mkdir()  # not itself a mountpoint, so that a mount can cover it
        yield where / "store"
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def shared_tmp() -> Iterator[Path]:
    """A temporary directory every user can traverse (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="zstfs-shared-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def reap(*procs: subprocess.Popen[Any] | None) -> None:
    """Kill what is still running and close its pipes (teardown of a test's children)."""
    for proc in procs:
        if proc is None:
            continue
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class Mount:
    """One zstfs daemon serving `source` on `mountpoint`."""

    def __init__(self, source: Path, mountpoint: Path, args: list[str], log: Path,
                 flat: bool = True) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.args = args
        self.flat = flat
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Mount:
        args = ["mount", "--foreground", *self.args]
        cmd = [sys.executable, "-m", "zstfs", *(flat_pattern(args) if self.flat else args),
               str(self.source), str(self.mountpoint)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env,
                                         start_new_session=True)
        wait_until(self._ready, MOUNT_TIMEOUT, f"the mount on {self.mountpoint}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"zstfs exited with {self.proc.returncode}:\n{self.log_text()}")
        return self.status_or_none() is not None

    def status_or_none(self) -> dict[str, Any] | None:
        try:
            return json.loads(os.getxattr(self.mountpoint, STATUS_XATTR))
        except OSError:
            return None

    def status(self) -> dict[str, Any]:
        s = self.status_or_none()
        assert s is not None, "the mount does not answer status"
        return s

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """Unmount with `zstfs umount` and check that the daemon exited cleanly."""
        assert self.proc is not None
        r = subprocess.run([sys.executable, "-m", "zstfs", "umount", str(self.mountpoint)],
                           capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
        assert r.returncode == 0, r.stderr
        rc = self.proc.wait(timeout=MOUNT_TIMEOUT)
        assert rc == 0, f"daemon exited with {rc}:\n{self.log_text()}"
        assert not is_mounted(self.mountpoint)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and clear the dead mount."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=MOUNT_TIMEOUT)
        self.proc = None
        lazy_unmount(self.mountpoint)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            lazy_unmount(self.mountpoint)
            try:
                self.proc.wait(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=MOUNT_TIMEOUT)
        elif is_mounted(self.mountpoint):
            lazy_unmount(self.mountpoint)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def errors(self) -> list[str]:
        return daemon_errors(self.log)


def lazy_unmount(path: Path) -> None:
    for _ in range(50):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                       timeout=MOUNT_TIMEOUT)


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount_factory(tmp_path: Path, log_check: LogCheck) -> Iterator[MountFactory]:
    """`mount_factory(source, *args, mountpoint=None)` → a started Mount (over source by default).

    Mounts get `--pattern '*.jsonl'` (see `flat_pattern`) unless `flat=False` (the default
    patterns, for codex's own layout) or the arguments name a pattern.

    All mounts are cleaned up at teardown; one that logged errors fails the test (`log_check`)
    unless the test expected them: `expect_errors=PATTERN` for this mount's log, or the test's
    `expect_log_errors`.
    """
    mounts: list[Mount] = []

    def factory(source: Path, *args: str, mountpoint: Path | None = None,
                expect_errors: str = "", start: bool = True,
                flat: bool = True) -> Mount:
        m = Mount(source, mountpoint or source, list(args),
                  tmp_path / f"zstfs-{len(mounts)}.log", flat)
        mounts.append(m)
        log_check.watch(m.log, expect_errors)
        return m.start() if start else m

    yield factory
    for m in mounts:
        m.cleanup()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty store directory."""
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture
def mounted(store: Path, mount_factory: MountFactory) -> Iterator[Mount]:
    """A store mounted over itself with default options (no background compression)."""
    m = mount_factory(store)
    yield m
    with contextlib.suppress(Exception):
        if m.proc is not None:
            m.stop()


# ------------------------------------------------------- the command, as users run it
def zstfs(*args: str | Path, timeout: float = 30, user: int | None = None,
          env: dict[str, str] | None = None, cwd: Path | None = None,
          ) -> subprocess.CompletedProcess[str]:
    """`zstfs ARGS` as a command (detaching as a user's does), with `--pattern '*.jsonl'` (see
    `flat_pattern`); as `user` when given."""
    cmd = [sys.executable, "-m", "zstfs", *flat_pattern([str(a) for a in args])]
    if user is not None:
        # No `env` in between: the environment passes through setpriv as it is. (Here the venv's
        # interpreter is a symlink into root's 0700 home; only setpriv's own exec reaches it.)
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def status(mountpoint: Path) -> dict | None:
    """The daemon's status, or None if nothing answers it at `mountpoint`."""
    try:
        return json.loads(os.getxattr(mountpoint, STATUS_XATTR))
    except OSError:
        return None


def gone(pid: int) -> bool:
    """The process no longer exists (a zombie waiting for an absent reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def detached() -> Iterator[list[Path]]:
    """Mountpoints of detached daemons started by a test; cleared at teardown whatever happens."""
    mounts: list[Path] = []
    yield mounts
    for mp in mounts:
        info = status(mp)
        if is_mounted(mp):
            lazy_unmount(mp)
        if info is not None:
            with contextlib.suppress(AssertionError):
                wait_until(lambda info=info: gone(info["pid"]), 20, "the daemon to exit")
            if not gone(info["pid"]):
                os.kill(info["pid"], signal.SIGKILL)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line of error, got:\n{stderr}"
    return lines[0]


# -------------------------------------------------------------- an ordinary user's mount
@pytest.fixture
def user_dir() -> Iterator[Path]:
    """A directory owned by user nobody, holding `before.txt`: for nobody's own mount."""
    base = Path(tempfile.mkdtemp(prefix="zstfs-user-", dir="/tmp"))
    base.chmod(0o755)
    d = base / "codex"
    d.mkdir()
    os.chown(d, NOBODY, NOBODY)
    (d / "before.txt").write_text("from before\n")
    os.chown(d / "before.txt", NOBODY, NOBODY)
    yield d
    if is_mounted(d):
        lazy_unmount(d)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stock_permissions() -> Iterator[None]:
    """Give this machine, for one test, the permissions of a stock Debian install where an
    ordinary user can mount: /dev/fuse mode 0666, and the interpreter reachable by every user
    (here it lives under /root, mode 0700). Restored afterwards. Only root can do this."""
    changed: list[tuple[str, int]] = []
    if os.geteuid() == 0:
        wanted = [("/dev/fuse", 0o006)]
        real = os.path.realpath(sys.executable)
        parent = os.path.dirname(real)
        while parent not in ("/", ""):
            wanted.append((parent, 0o001))
            parent = os.path.dirname(parent)
        for path, bits in wanted:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & bits != bits:
                os.chmod(path, mode | bits)
                changed.append((path, mode))
    try:
        yield
    finally:
        for path, mode in reversed(changed):
            os.chmod(path, mode)


def why_user_cannot_mount() -> str | None:
    if shutil.which("setpriv") is None:
        return "setpriv not installed"
    fm = shutil.which("fusermount3")
    if fm is None or not os.stat(fm).st_mode & 0o4000 or os.stat(fm).st_uid != 0:
        return "fusermount3 is not setuid root"
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        return (f"/dev/fuse is mode {mode:04o} here (distributions ship 0666): libfuse3's "
                "fuse_kern_mount() opens /dev/fuse itself and falls back to the setuid "
                "fusermount3 only when mount(2) fails with EPERM, not when that open() fails "
                "with EACCES, so a non-root mount fails with 'fuse: failed to open /dev/fuse: "
                "Permission denied'")
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        sys.executable, "-c", "import zstfs, pyfuse3, trio"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"user {NOBODY} cannot import zstfs from {sys.executable}: {r.stderr.strip()}"
    return None


def as_nobody_in(user_dir: Path, detached: list[Path]) -> tuple[dict[str, str], Path]:
    """For a test of user nobody's own mount of `user_dir` (skipped where nobody cannot
    mount): the environment nobody runs `zstfs` with, and a log file nobody may write."""
    why = why_user_cannot_mount()
    if why is not None:
        pytest.skip(why)
    detached.append(user_dir)
    env = {"HOME": str(user_dir), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    log = user_dir.parent / "user.log"
    log.touch()
    os.chown(log, NOBODY, NOBODY)
    return env, log


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = fuse_available()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"FUSE unavailable: {reason}")
    for item in items:
        if "mount_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
