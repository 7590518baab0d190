"""Talking to a running mount: `zstfs umount` and `zstfs status`.

The daemon answers one virtual extended attribute on the mount root, `user.zstfs.status`, with
a JSON object (see `stats.py`); `getfattr -n user.zstfs.status --only-values MNT` works too. On an
unmounted store, `status` walks the backing directory itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from zstfs import busy
from zstfs.names import STATUS_XATTR

#: The filesystem type of a zstfs mount in /proc/self/mountinfo (FUSE's `subtype=zstfs`).
FSTYPE = "fuse.zstfs"
#: What a FUSE mount whose daemon is gone answers: the kernel's connection to it is cut.
DEAD_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})
#: One line for the user about what a dead daemon means for their data.
NOTHING_LOST = "the store is plain files and .zst: nothing is lost"


def mounts() -> list[tuple[str, str]]:
    """(mountpoint, filesystem type) of every mount this process sees, in /proc/self/mountinfo
    order (a mount listed later is on top of one listed earlier at the same place)."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
                found.append((point, parts[sep + 1]))
    except (OSError, ValueError, IndexError):
        return []
    return found


def mount_type(path: str) -> str | None:
    """The filesystem type mounted at `path` (the topmost mount there), or None."""
    real = os.path.realpath(path)
    types = [fstype for point, fstype in mounts() if point == real]
    return types[-1] if types else None


def enclosing_zstfs_mount(path: str) -> str | None:
    """The mountpoint of the zstfs mount that `path` is on or inside (the innermost mount
    holding it is a zstfs mount), or None."""
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for point, fstype in mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best[0] if best is not None and best[1] == FSTYPE else None


def is_dead(mountpoint: str) -> bool:
    """Does the FUSE mount at `mountpoint` have no daemon any more (killed, crashed)? Every
    request fails with ENOTCONN (ECONNABORTED for one in flight when it died). A stat alone
    may still succeed from the kernel's attribute cache; the status attribute and statfs
    always go to the daemon."""
    try:
        os.getxattr(mountpoint, STATUS_XATTR)
        return False  # a daemon answered
    except OSError as e:
        if e.errno in DEAD_ERRNOS:
            return True
    for probe in (os.statvfs, os.stat):
        try:
            probe(mountpoint)
        except OSError as e:
            if e.errno in DEAD_ERRNOS:
                return True
    return False


def dead_mount(path: str) -> str | None:
    """The mountpoint of the dead zstfs mount that `path` is on or inside, or None."""
    point = enclosing_zstfs_mount(path)
    return point if point is not None and is_dead(point) else None


def dead_message(path: str, dead: str) -> str:
    """One line for the user about `path` on or inside `dead`, a dead zstfs mount."""
    what = ("its zstfs daemon is gone (killed or crashed), the mount is dead"
            if dead == os.path.realpath(path) else
            f"inside the zstfs mount on {dead}, whose daemon is gone (killed or crashed)")
    return f"{path}: {what}; run `zstfs umount {dead}`"


def clear_dead_mount(mountpoint: str) -> str | None:
    """Detach a dead mount (lazily: there is no daemon to finish, and processes that still
    have it as their working directory keep only an error). As root with umount(8); as an
    ordinary user with the setuid fusermount3, which lets a user unmount only their own
    mounts. Returns why it failed, or None."""
    cmd = [_fusermount(), "-u", "-z", mountpoint]
    if os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount", "-l", mountpoint]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot clear the dead mount: {e}"
    if r.returncode != 0 or (mount_type(mountpoint) == FSTYPE and is_dead(mountpoint)):
        msg = " ".join((r.stderr or r.stdout).split()) or f"{cmd[0]} exited {r.returncode}"
        return f"cannot clear the dead mount: {msg}"
    return None


def prepare_mountpoint(path: str) -> str | None:
    """Before a mount of or on `path` (its SOURCE or MOUNTPOINT): clear a dead zstfs mount
    left on it (saying so on stderr). Returns why the mount must be refused, or None: `path`
    is inside another zstfs mount (a store inside a store: the outer daemon would serve the
    inner one's files, and refuses its lock), inside a dead one, or on a dead one that could
    not be cleared. A live zstfs mount on `path` itself is left to `mount` ("already
    mounted")."""
    point = enclosing_zstfs_mount(path)
    if point is None:
        return None
    dead = is_dead(point)
    if point == os.path.realpath(path):
        if not dead:
            return None
        why = clear_dead_mount(point)
        if why is not None:
            return f"{path}: the previous zstfs daemon is gone; {why}"
        print(f"zstfs: {path}: the previous zstfs daemon is gone; cleared its dead mount "
              f"({NOTHING_LOST})", file=sys.stderr)
        return None
    if dead:
        return dead_message(path, point)
    info = read_status(point)
    owner = f" (pid {info['pid']})" if info and "pid" in info else ""
    return (f"{path}: inside the zstfs mount on {point}{owner}; mount a directory outside "
            "it (or unmount that one first)")


def read_status(mountpoint: str) -> dict[str, Any] | None:
    """The daemon's status, or None if `mountpoint` is not a live zstfs mount."""
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def umount(mountpoint: str, *, lazy: bool = False, timeout: float = 600.0,
           stop_codex: bool = False) -> int:
    mountpoint = os.path.abspath(os.path.expanduser(mountpoint))
    info = read_status(mountpoint)
    if info is None:
        dead = dead_mount(mountpoint)
        if dead is not None and dead != os.path.realpath(mountpoint):
            print(f"zstfs: {dead_message(mountpoint, dead)}", file=sys.stderr)
            return 1
        if dead is not None:
            # Nothing to wait for: the daemon is gone, only the kernel's mount is left.
            why = clear_dead_mount(mountpoint)
            if why is not None:
                print(f"zstfs: {mountpoint}: its zstfs daemon is gone; {why}", file=sys.stderr)
                return 1
            print(f"zstfs: {mountpoint}: the zstfs daemon was gone (killed or crashed); "
                  f"cleared its dead mount ({NOTHING_LOST})", file=sys.stderr)
            return 0
        print(f"zstfs: {mountpoint}: not a zstfs mount (or its daemon does not answer)",
              file=sys.stderr)
        return 1
    pid = int(info["pid"])
    dev = os.stat(mountpoint).st_dev
    cmd = [_fusermount(), "-u", *(["-z"] if lazy else []), mountpoint]
    if os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount", *(["-l"] if lazy else []), mountpoint]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if (r.returncode != 0 and stop_codex and "busy" in (r.stderr or r.stdout).lower()
            and _stop_codex_daemon(mountpoint, dev)):
        # An exited process lets go of its files a moment after it shows as gone (its other
        # threads are still being torn down): retry for a little while.
        retry_until = time.monotonic() + 10
        r = subprocess.run(cmd, capture_output=True, text=True)
        while (r.returncode != 0 and "busy" in (r.stderr or r.stdout).lower()
               and time.monotonic() < retry_until):
            time.sleep(0.1)
            r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip()
        if "busy" in msg.lower():
            users = busy.users_of(mountpoint, dev=dev, exclude={pid})
            home = str(info.get("source") or mountpoint)
            if not users:
                print(f"zstfs: {mountpoint}: mount is busy, not unmounted (by processes that "
                      "could not be identified); close them, or use --lazy", file=sys.stderr)
            else:
                last = "close them, or use --lazy"
                if any(u.codex for u in users):
                    last = (f"or let zstfs stop it and unmount:\n{busy.INDENT}zstfs umount "
                            f"--stop-codex {mountpoint}\nclose the others, or use --lazy")
                print("zstfs: " + busy.explain(f"{mountpoint}: mount is busy, not unmounted:",
                                               users, home, last), file=sys.stderr)
        else:
            print(f"zstfs: {mountpoint}: unmount failed: {msg}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            print(f"zstfs: {mountpoint}: unmounted, but the daemon (pid {pid}) is still "
                  f"finishing after {timeout:.0f}s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stop_codex_daemon(mountpoint: str, dev: int, timeout: float = 30.0) -> bool:
    """SIGTERM codex's background app-server and its pid-update-loop where they use the mount
    (what `codex app-server daemon stop` does, plus the loop it leaves behind) and wait for them
    to exit. True if there were any."""
    daemons = [u for u in busy.users_of(mountpoint, dev=dev) if u.codex]
    for u in daemons:
        print(f"zstfs: {mountpoint}: stopping pid {u.pid} ({u.short_command})", file=sys.stderr)
        try:
            os.kill(u.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_running(u.pid) for u in daemons) and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(daemons)


def _running(pid: int) -> bool:
    """True while any thread of `pid` has not exited (a zombie leader can still have threads
    holding the process's files)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X"):
                    return True
        except OSError:
            continue
    return False
