#!/usr/bin/env python3
"""What the benchmark scripts share: running and timing commands, medians and ratios, a zstfs
daemon on a mountpoint and what it costs (CPU time, peak RSS), dropping the page cache (also for
an ordinary user, through a root parent's socket), running a command as another user, and the
result table.

`scripts/bench.py` and `scripts/bench_mount_cost.py` import it; it imports neither (run as
scripts, both find it beside them).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1_000_000
STATUS_XATTR = "user.zstfs.status"
#: The console script installed next to this interpreter (the venv's), else `python -m zstfs`.
_SCRIPT = Path(sys.executable).parent / "zstfs"
ZSTFS: tuple[str, ...] = (str(_SCRIPT),) if _SCRIPT.exists() else (sys.executable, "-m", "zstfs")
# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    what: str
    zstfs: str
    baseline: str
    ratio: float | None
    target: str
    ok: bool | None  # None: informational, no target

    @property
    def verdict(self) -> str:
        return "info" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hwm: dict[str, int] = field(default_factory=dict)  # daemon label -> peak VmHWM in bytes

    def add(self, row: Row) -> None:
        self.rows.append(row)
        r = f"{row.ratio:.3f}x" if row.ratio is not None else "-"
        print(f"  {row.what}: zstfs {row.zstfs} | {row.baseline} | {r} | {row.target} | "
              f"{row.verdict}", flush=True)

    def table(self) -> str:
        lines = ["| comparison | zstfs | baseline | ratio | target | result |",
                 "|---|---:|---:|---:|---|---|"]
        for r in self.rows:
            ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
            lines.append(f"| {r.what} | {r.zstfs} | {r.baseline} | {ratio} | {r.target} | "
                         f"{r.verdict} |")
        return "\n".join(lines)



def median(xs: list[float]) -> float:
    return statistics.median(xs)


def secs(t: float) -> str:
    return f"{t:.3f} s" if t >= 0.01 else f"{t * 1000:.2f} ms"


def ratio_row(res: Results, what: str, zstfs: list[float], base: list[float], base_label: str,
              limit: float | None, *, higher_is_better: bool = False,
              fmt: Callable[[float], str] = secs) -> None:
    """A row comparing the medians of two lists of run times; the ratio is zstfs / baseline
    (times) or its inverse (throughputs)."""
    print(f"    runs (s): zstfs {[round(x, 4) for x in zstfs]}, "
          f"{base_label} {[round(x, 4) for x in base]}", flush=True)
    t_zstfs, t_base = median(zstfs), median(base)
    if higher_is_better:  # throughput: baseline time / zstfs time
        ratio = t_base / t_zstfs
        target = f">= {limit}x" if limit is not None else "-"
        ok = None if limit is None else ratio >= limit
    else:
        ratio = t_zstfs / t_base
        target = f"<= {limit}x" if limit is not None else "-"
        ok = None if limit is None else ratio <= limit
    res.add(Row(what, fmt(t_zstfs), f"{base_label} {fmt(t_base)}", ratio, target, ok))


# --------------------------------------------------------------------------------------------
# Running things


#: In an ordinary user's benchmark run: the Unix socket of a root parent's DropCachesServer,
#: which drops the page cache for it (only root can write drop_caches).
DROP_CACHES_ENV = "ZSTFS_BENCH_DROP_CACHES"


def can_drop_caches() -> bool:
    """Root, or a process that a root parent serves (DROP_CACHES_ENV)."""
    if os.geteuid() == 0:
        return os.access("/proc/sys/vm/drop_caches", os.W_OK)
    return bool(os.environ.get(DROP_CACHES_ENV))


def drop_caches() -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: directly as root, else by asking the root
    parent's DropCachesServer and waiting for it to be done (never silently skipped)."""
    if os.geteuid() != 0:
        _ask_to_drop_caches()
        return
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _ask_to_drop_caches() -> None:
    path = os.environ.get(DROP_CACHES_ENV)
    if not path:
        raise RuntimeError(f"dropping the page cache needs root or {DROP_CACHES_ENV}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(path)
        s.sendall(b"drop\n")
        reply = s.makefile("rb").readline()
    if reply != b"ok\n":
        raise RuntimeError(f"the drop_caches server at {path} answered {reply!r}")


class DropCachesServer:
    """As root, for one ordinary user's benchmark process: a Unix socket (theirs, mode 0600) on
    which each request `drop\\n` is a `sync; echo 3 > /proc/sys/vm/drop_caches`, answered `ok\\n`
    when done. `served` counts them, so the parent can tell the user's cold runs were cold."""

    def __init__(self, path: Path, uid: int, gid: int) -> None:
        if len(os.fsencode(path)) >= 108:  # sun_path
            raise ValueError(f"socket path too long: {path}")
        self.path, self.uid, self.gid = path, uid, gid
        self.served = 0
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> DropCachesServer:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chown(self.path, self.uid, self.gid)
        os.chmod(self.path, 0o600)
        sock.listen(4)
        self.sock = sock
        self.thread = threading.Thread(target=self._serve, name="drop-caches", daemon=True)
        self.thread.start()
        return self

    def _serve(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by __exit__
                return
            with conn:
                try:
                    conn.settimeout(30)
                    if conn.makefile("rb").readline() != b"drop\n":
                        conn.sendall(b"bad request\n")
                        continue
                    drop_caches()
                    self.served += 1
                    conn.sendall(b"ok\n")
                except OSError as e:
                    print(f"drop_caches server: {e}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            # shutdown wakes the accept() that close() alone would leave blocked
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.path.unlink(missing_ok=True)


def sh(cmd: str, *, ok_codes: tuple[int, ...] = (0,)) -> tuple[float, bytes]:
    """Run a shell pipeline with its stdout on a pipe we read; (wall seconds, stdout)."""
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True)
    dt = time.perf_counter() - t0
    if r.returncode not in ok_codes:
        raise RuntimeError(f"{cmd!r} failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
    return dt, r.stdout


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads, the exited ones too) from /proc/PID/stat, in
    seconds; the kernel reports clock ticks (1/100 s)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (`echo 5 > /proc/PID/clear_refs`), so a later
    VmHWM is the peak since now; False where that is not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        return False
    return True


class Daemon:
    """`zstfs mount --foreground ARGS SOURCE MOUNTPOINT` as a subprocess; `zstfs` is the command
    that runs zstfs (by default this interpreter's)."""

    def __init__(self, res: Results, label: str, source: Path, mountpoint: Path,
                 *args: str, zstfs: Sequence[str] = ZSTFS) -> None:
        self.res, self.label, self.zstfs = res, label, list(zstfs)
        self.source, self.mountpoint, self.args = source, mountpoint, list(args)
        self.log = source.parent / f"{mountpoint.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Daemon:
        """Start the daemon and wait for its mount. An ordinary user's mount that found
        /dev/fuse closed to them is tried again for a while: on a shared machine another
        process may have just put its mode back (fuse_device_open puts it back in turn)."""
        deadline = time.monotonic() + 10
        while not self._start() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc is None:
            raise RuntimeError(f"zstfs mount: /dev/fuse stayed closed to uid {os.geteuid()}")
        return self

    def _start(self) -> bool:
        """False if the mount failed because /dev/fuse was not open to this user."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        cmd = [*self.zstfs, "mount", "--foreground", *self.args, str(self.source),
               str(self.mountpoint)]
        self.started_at = time.perf_counter()
        logged = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.status() is None:
            if self.proc.poll() is not None:
                with open(self.log, "rb") as f:
                    f.seek(logged)
                    if b"failed to open /dev/fuse: Permission denied" in f.read():
                        self.proc = None
                        return False
                raise RuntimeError(f"zstfs mount exited {self.proc.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the mount on {self.mountpoint} did not come up in 60 s")
            time.sleep(0.02)
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(os.getxattr(self.mountpoint, STATUS_XATTR))
        except OSError:
            return None

    def record_hwm(self) -> None:
        if self.proc is not None and (hwm := vm_hwm(self.proc.pid)) is not None:
            self.res.hwm[self.label] = max(self.res.hwm.get(self.label, 0), hwm)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.record_hwm()
        r = subprocess.run([*self.zstfs, "umount", str(self.mountpoint)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"zstfs umount {self.mountpoint}: {r.stderr.strip()}")
        rc = self.proc.wait(timeout=600)
        self.proc = None
        if rc != 0:
            raise RuntimeError(f"the daemon on {self.mountpoint} exited {rc}; see {self.log}")
        errors = [ln for ln in self.log.read_text(errors="replace").splitlines()
                  if " ERROR " in ln or "Traceback" in ln]
        if errors:
            raise RuntimeError(f"the daemon logged errors ({self.log}): {errors[:3]}")

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """Cleanup after a failure: lazy unmount and wait."""
        if self.proc is None:
            return
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def mounted(res: Results, label: str, source: Path, mountpoint: Path,
            *args: str, zstfs: Sequence[str] = ZSTFS) -> Iterator[Daemon]:
    d = Daemon(res, label, source, mountpoint, *args, zstfs=zstfs).start()
    try:
        yield d
        d.stop()
    finally:
        d.kill()



def run(argv: Sequence[str] | str, *, cwd: Path | None = None, env: dict[str, str] | None = None,
        stdin: bytes | None = None, ok: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True,
                       shell=isinstance(argv, str))
    dt = time.perf_counter() - t0
    if r.returncode not in ok:
        raise RuntimeError(f"{argv!r} failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
    return dt


@contextlib.contextmanager
def fuse_device_open() -> Iterator[None]:
    """/dev/fuse readable and writable by everyone (what distributions ship, and what an ordinary
    user's mount needs) for the duration; its mode is put back after. On a shared machine other
    processes may do the same and put their mode back meanwhile: a thread opens it again within
    milliseconds for as long as this lasts (Daemon.start retries a mount that hit the gap), and
    the mode put back at the end is the last one another process set, else the one before."""
    wanted = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    stop = threading.Event()

    def keep_open() -> None:
        nonlocal wanted
        while not stop.wait(0.005):
            now = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
            if now & 0o006 != 0o006:
                wanted = now
                os.chmod("/dev/fuse", now | 0o006)

    if wanted & 0o006 != 0o006:
        os.chmod("/dev/fuse", wanted | 0o006)
    keeper = threading.Thread(target=keep_open, name="fuse-device-open", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()
        if stat.S_IMODE(os.stat("/dev/fuse").st_mode) != wanted:
            os.chmod("/dev/fuse", wanted)


def umount_under(path: Path) -> None:
    """Lazily unmount whatever is still mounted under `path` (root cannot even stat another
    user's FUSE mount, so this reads the mount table)."""
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4].encode().decode("unicode_escape") for ln in f]
    for p in points:
        if p.startswith(prefix):
            subprocess.run(["umount", "-l", p], capture_output=True)


def as_user(uid: int, gid: int, name: str, home: Path, *cmd: str,
            env: dict[str, str] | None = None) -> list[str]:
    """The argv that runs `cmd` as that user (uid, gid, groups), in a clean environment with
    their HOME."""
    full = {"HOME": str(home), "USER": name, "LOGNAME": name,
            "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})}
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--",
            "env", "-i", *(f"{k}={v}" for k, v in full.items()), *cmd]


def versions() -> str:
    import pyfuse3
    import trio
    import zstandard

    zstd = subprocess.run(["zstd", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
            f"Python {platform.python_version()}, pyfuse3 {pyfuse3.__version__}, "
            f"trio {trio.__version__}, python-zstandard {zstandard.__version__}; {zstd}")

