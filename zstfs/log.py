"""Logging setup for the daemon and the command-line tools."""

from __future__ import annotations

import faulthandler
import itertools
import logging
import os
import signal
import sys
from pathlib import Path

#: The log file is rotated (NAME → NAME.1 → NAME.2) when it would grow past this many bytes;
#: `ZSTFS_LOG_MAX_BYTES` overrides it.
MAX_BYTES = 10 << 20
BACKUPS = 2


def default_log_file(source: str) -> str:
    """Where a detached daemon logs when no --log is given: `$XDG_STATE_HOME/zstfs/`."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "zstfs"
    state.mkdir(parents=True, exist_ok=True)
    name = os.path.abspath(source).strip("/").replace("/", "_") or "root"
    return str(state / f"{name}.log")


def below_mount(path: str, source: str, mountpoint: str) -> str:
    """The file a log `path` inside MOUNTPOINT stands for: the same place in SOURCE, which is
    what the mount will show there (SOURCE itself when the store is mounted over itself)."""
    real, mnt = os.path.realpath(path), os.path.realpath(mountpoint)
    if real == mnt or not real.startswith(mnt.rstrip("/") + "/"):
        return path
    return os.path.join(os.path.realpath(source), os.path.relpath(real, mnt))


class LogFile(logging.Handler):
    """A size-rotated log file addressed through a descriptor of its directory, opened once.

    Writes, rotation and reopening never look a path up again: a log inside the directory the
    daemon mounts over would otherwise be opened through the daemon's own mount, which hangs
    before it is served and deadlocks when the thread that logs is the one that serves it.
    With `mirror_stderr`, descriptor 2 follows the current file (a detached daemon's tracebacks
    and faulthandler dumps land in its log)."""

    def __init__(self, path: str, *, max_bytes: int, backups: int = BACKUPS) -> None:
        super().__init__()
        directory, self.filename = os.path.split(os.path.abspath(path))
        self.max_bytes = max_bytes
        self.backups = max(1, backups)
        self.mirror_stderr = False
        try:
            self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None  # name the file, not its dir
        try:
            self.fd = self._open()
        except OSError as e:
            os.close(self.dir_fd)
            raise OSError(e.errno, e.strerror, path) from None

    def _open(self) -> int:
        return os.open(self.filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       0o600, dir_fd=self.dir_fd)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="backslashreplace")
            size = os.fstat(self.fd).st_size
            if self.max_bytes > 0 and size > 0 and size + len(data) > self.max_bytes:
                self.rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except Exception:
            self.handleError(record)

    def rotate(self) -> None:
        """NAME.1 → NAME.2 …, NAME → NAME.1, and a new NAME; all relative to the directory."""
        names = [self.filename] + [f"{self.filename}.{i}" for i in range(1, self.backups + 1)]
        for older, newer in reversed(list(itertools.pairwise(names))):
            try:
                os.rename(older, newer, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            except FileNotFoundError:
                continue
        old, self.fd = self.fd, self._open()
        if self.mirror_stderr:
            os.dup2(self.fd, 2)
        os.close(old)

    def close(self) -> None:
        self.acquire()
        try:
            for fd in (self.fd, self.dir_fd):
                if fd >= 0:
                    os.close(fd)
            self.fd = self.dir_fd = -1
        finally:
            self.release()
        super().close()


def _max_bytes() -> int:
    try:
        return int(os.environ.get("ZSTFS_LOG_MAX_BYTES") or MAX_BYTES)
    except ValueError:
        return MAX_BYTES


def setup_logging(*, debug: bool, log_file: str | None, to_stderr: bool) -> LogFile | None:
    """Configure the root logger; returns the log file's handler, if any."""
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    fh = None
    if log_file is not None:
        fh = LogFile(log_file, max_bytes=_max_bytes())
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if to_stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return fh
