"""The kernel's own accounting of who has a file open: write leases, and a /proc fallback.

A write lease (`fcntl(F_SETLEASE, F_WRLCK)`) is granted only while no other open file
description and no mapping of the file exists anywhere: through a FUSE mount, under it, opened
before it, in any process. While it is held, any `open()` or `truncate()` of the file by anyone
blocks in the kernel and turns the lease into a *breaking* one, which `F_GETLEASE` reports; the
opener proceeds once the holder releases the lease (or after `/proc/sys/fs/lease-break-time`).

So a swap takes a lease on the plain file before it reads it, checks that the lease is still
intact between steps, and gives up as soon as it is broken. Where the kernel refuses leases (a
filesystem without them, a file the process does not own without CAP_LEASE), `Accounting` falls
back to scanning `/proc/*/fd` and `/proc/*/maps` for the inode, which sees every descriptor and
mapping of every process we may inspect, but cannot stop one from being opened a moment later.

The lease-break signal (SIGIO by default, whose default action ends the process) is ignored once
per process: we poll the lease state instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

LEASE = "lease"
PROC_SCAN = "proc-scan"

_signal_lock = threading.Lock()
_signal_ignored = False


def ignore_lease_signal() -> None:
    """Make lease breaks harmless to this process (call from the main thread, before leasing)."""
    global _signal_ignored
    with _signal_lock:
        if _signal_ignored:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGIO, signal.SIG_IGN)
            _signal_ignored = True


class Unsupported(Exception):
    """The kernel does not give leases on this file (use the /proc scan)."""


WRITE = fcntl.F_WRLCK  # nobody else has the file open or mapped; any open breaks it
READ = fcntl.F_RDLCK  # nobody has the file open for writing; an open for writing breaks it


def take(fd: int, kind: int = WRITE) -> bool:
    """Take a lease on the open file `fd`: True if granted, False if the file is open (for a
    read lease: open for writing) elsewhere. Raises Unsupported where leases are unavailable."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, kind)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            return False
        if e.errno in (errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.ENOSYS):
            raise Unsupported(os.strerror(e.errno)) from None
        raise
    return True


def intact(fd: int, kind: int = WRITE) -> bool:
    """True while our lease on `fd` is held and nobody has started an open that breaks it."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == kind
    except OSError:
        return False


def release(fd: int) -> None:
    """Give the lease up (a blocked opener proceeds at once)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def open_elsewhere(st: os.stat_result, own_fds: frozenset[int] = frozenset()) -> bool:
    """True if any process (this one excepted for `own_fds`) has the file of `st` open or
    mapped: the fallback when leases are unavailable. Processes we may not inspect count as
    not having it open, which is why leases are preferred."""
    me = os.getpid()
    dev, ino = st.st_dev, st.st_ino
    maps_dev = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            fds = []
        for name in fds:
            if pid == me and int(name) in own_fds:
                continue
            try:
                s = os.stat(f"{fd_dir}/{name}")
            except OSError:
                continue
            if s.st_ino == ino and s.st_dev == dev:
                return True
        try:
            with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) >= 5 and parts[4] == str(ino) and parts[3] == maps_dev:
                        return True
        except OSError:
            continue
    return False


class Accounting:
    """Which mechanism a store's swaps rely on, said once in the log and kept for `status`."""

    def __init__(self) -> None:
        self.mode = LEASE
        self._lock = threading.Lock()

    def fell_back(self, path: str, why: str) -> None:
        with self._lock:
            if self.mode == PROC_SCAN:
                return
            self.mode = PROC_SCAN
        log.warning(
            "%s: the kernel gives no file lease here (%s); open files are found by scanning "
            "/proc instead, which cannot see processes of other users or stop an open that "
            "starts during a swap", path, why)
