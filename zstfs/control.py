"""Talking to a running mount: `zstfs umount` and `zstfs status`.

The daemon answers one virtual extended attribute on the mount root, `user.zstfs.status`, with
a JSON object (see `stats.py`); `getfattr -n user.zstfs.status --only-values MNT` works too. On an
unmounted store, `status` walks the backing directory itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from zstfs import busy
from zstfs.names import STATUS_XATTR, NameRules, Patterns
from zstfs.stats import human_bytes


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
            listed = f", in use by {busy.describe_users(users)}" if users else ""
            advice = busy.codex_advice(users, str(info.get("source") or mountpoint))
            if advice:
                advice += f" (or run `zstfs umount --stop-codex {mountpoint}`)"
            print(f"zstfs: {mountpoint}: mount is busy{listed}; "
                  f"{advice + '; ' if advice else ''}close them, or use --lazy", file=sys.stderr)
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
        print(f"zstfs: {mountpoint}: stopping {u.describe()}", file=sys.stderr)
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


# ---------------------------------------------------------------------- status
def status(path: str, *, as_json: bool, pattern: Patterns = None) -> int:
    path = os.path.abspath(os.path.expanduser(path))
    info = read_status(path)
    if info is None:
        if not os.path.isdir(path):
            print(f"zstfs: {path}: no such directory", file=sys.stderr)
            return 1
        info = offline_status(path, pattern)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(render(info))
    return 0


def offline_status(source: str, pattern: Patterns = None) -> dict[str, Any]:
    from zstfs.store import Store

    store = Store.open(source, NameRules(pattern))
    try:
        census = store.census().as_dict()
    finally:
        store.close()
    return {"schema": 1, "mounted": False, "source": source, **census}


def human_duration(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def render(info: dict[str, Any]) -> str:
    mounted = "pid" in info
    lines = [
        f"store:       {info.get('source')}"
        + (f"  (mounted on {info['mountpoint']}, pid {info['pid']})" if mounted else
           "  (not mounted)"),
        f"files:       {info['plain_files']} plain, {info['compressed_files']} compressed"
        + (f", {info['damaged_files']} damaged" if info.get("damaged_files") else ""),
        f"logical:     {human_bytes(info['logical_bytes'])}",
        f"stored:      {human_bytes(info['stored_bytes'])}  "
        f"(ratio {info['ratio']:.2f}x, saved {human_bytes(info['saved_bytes'])})",
    ]
    if mounted:
        after = info.get("compress_after")
        policy = "off" if after is None else f"after {human_duration(after)}"
        nxt = info.get("next_eligible_in")
        queue = f"{info['waiting_files']} waiting"
        if info.get("eligible_now"):
            queue += f", {info['eligible_now']} eligible now"
        if nxt is not None:
            queue += f", next in {human_duration(nxt)}"
        lines += [
            f"compaction:  {policy}; {queue}; {info['in_flight']} in progress",
            f"swaps:       {info['swaps_done']} done, {info['swaps_abandoned']} abandoned, "
            f"{info['swaps_failed']} failed; {info['promotions']} promotions",
        ]
        for warning in info.get("warnings", []):
            lines.append(f"warning:     {warning}")
        for err in info.get("last_errors", [])[-5:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err["time"]))
            lines.append(f"error:       {when} {err['path']}: {err['error']}")
    return "\n".join(lines)
