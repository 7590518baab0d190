"""The life of a mount: open and lock the store, recover, mount, detach, serve, unmount.

Order matters: the store directory is opened (and recovered) before the mount covers it, the fork
happens before trio starts threads, and a crash never unmounts (a dead mount says ENOTCONN; an
unmounted one would silently show the raw backing files to a running codex).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import time
from typing import Any

import pyfuse3
import trio

from zstfs import __version__, busy, codec, control, daemon
from zstfs.compactor import Compactor
from zstfs.fs import Operations
from zstfs.log import below_mount, default_log_file, setup_logging
from zstfs.names import STATUS_XATTR, NameRules
from zstfs.openfiles import OpenFiles
from zstfs.opstats import install as install_opstats
from zstfs.options import MountOptions
from zstfs.stats import SCHEMA, Stats
from zstfs.store import Store, StoreError

log = logging.getLogger(__name__)


#: On a signal: how long an unmount may take before it counts as failed, and how often a
#: busy mount is tried (a moment apart) before the daemon gives up and keeps serving.
UNMOUNT_TIMEOUT = 60.0
UNMOUNT_ATTEMPTS = 5
UNMOUNT_RETRY_DELAY = 0.2


class MountError(Exception):
    """A mount that cannot start; the message names the path and the cause, on one line (on
    more for processes that use the store: a line each, and the commands that stop them)."""


#: The filesystem type mounted at a path (the topmost mount there), or None.
is_mountpoint = control.mount_type


def _mount_owner(path: str) -> str:
    """` (pid N)` of the daemon serving the zstfs mount at `path` (from its status), or "": the
    user needs to know which process holds the store."""
    try:
        pid = json.loads(os.getxattr(path, STATUS_XATTR))["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" (pid {pid})"


def check_not_in_use(opts: MountOptions) -> list[str]:
    """Refuse a SOURCE that processes use (open files, cwd, mappings, executables): they would
    keep using the directory underneath the mount while new processes use the mount, and an
    SQLite database seen through both is two files with separate locks. With --force, mount
    anyway; the returned warnings stay in the status."""
    source = os.path.abspath(opts.source)
    users = [u for u in busy.users_of(source) if u.uses_files]
    if not users:
        return []
    if not opts.force:
        raise MountError(busy.explain(
            f"{source}: in use by {busy.count(users)}, not mounted:", users, source,
            "they would keep using the directory underneath the mount: stop them "
            "(or mount with --force)"))
    what = "; ".join(line.strip() for line in busy.describe_users(users))
    warning = (f"mounted with --force while {source}: in use by {what}: they still use the "
               "directory underneath")
    log.warning("%s", warning)
    return [warning]


def tune_readahead(real_mountpoint: str, kib: int = 1024) -> None:
    """Let the kernel read ahead 1 MiB at a time on this mount instead of 128 KiB: a quarter
    of the read requests for sequential readers (`cat`, `grep`). pyfuse3 cannot set max_read;
    the mount's backing-device setting can be changed by root only, so this is best effort.

    `real_mountpoint` must be resolved before mounting: once the mount exists, any path lookup
    through it from this process waits for a request only this process can answer."""
    real = real_mountpoint
    device = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if parts[4] == real and parts[sep + 1] == "fuse.zstfs":
                    device = parts[2]  # the last one listed is the topmost mount
        if device is not None:
            with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
                f.write(f"{kib}\n")
    except OSError as e:
        log.debug("read-ahead left at the default: %s", e)


def fuse_options(opts: MountOptions) -> set[str]:
    options = {"default_permissions", f"fsname={opts.fsname or os.path.abspath(opts.source)}",
               "subtype=zstfs"}
    if opts.allow_other:
        options.add("allow_other")
    if opts.allow_root:
        options.add("allow_root")
    return options


def raise_open_files_limit() -> None:
    """The daemon holds a descriptor for every directory the kernel knows (a `find` over a big
    store), so it may have as many open as the hard limit allows, not the soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def mount(opts: MountOptions) -> int:
    """Run `zstfs mount`. Returns the exit status; raises MountError for a clean refusal."""
    raise_open_files_limit()
    log_file = opts.log_file
    try:
        if log_file is None and not opts.foreground:
            log_file = default_log_file(opts.source)
        if log_file is not None:
            log_file = below_mount(log_file, opts.source, opts.mountpoint)
        log_handler = setup_logging(debug=opts.debug, log_file=log_file,
                                    to_stderr=opts.foreground)
    except OSError as e:
        # An unwritable --log (or $HOME) is a refusal like any other, not a traceback.
        raise MountError(f"{e.filename or log_file}: cannot open the log file: "
                         f"{e.strerror or e}") from None
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse: no such device (is the fuse kernel module loaded?)")
    for path in {opts.source, opts.mountpoint}:
        if is_mountpoint(path) == control.FSTYPE:
            raise MountError(f"{path}: already mounted by zstfs{_mount_owner(path)}")
    if not os.path.isdir(opts.mountpoint):
        raise MountError(f"{opts.mountpoint}: no such directory")
    # Files are created with exactly the mode the caller asked for (the kernel and `fs.py`
    # apply the caller's umask; the daemon's own must not apply a second time).
    os.umask(0)
    rules = NameRules(opts.patterns)
    params = codec.CodecParams(level=opts.level)
    try:
        store = Store.open(opts.source, rules, params)
    except StoreError as e:
        raise MountError(str(e)) from None
    try:
        store.lock()
        warnings = check_not_in_use(opts)
        recovery = store.recover()
    except (StoreError, MountError) as e:
        store.close()
        raise MountError(str(e)) from None
    stats = Stats()
    compactor = Compactor(store, stats, compress_after=opts.compress_after, jobs=opts.jobs)
    files = OpenFiles(store, stats)
    ops = Operations(files, on_idle=compactor.notify, on_moved=compactor.moved)
    compactor.attach(files)
    compactor.left_alone(recovery.kept_pairs)
    started = time.time()
    source, mountpoint = os.path.abspath(opts.source), os.path.abspath(opts.mountpoint)

    async def status() -> dict[str, Any]:
        snap: dict[str, Any] = {
            "schema": SCHEMA,
            "version": __version__,
            "pid": os.getpid(),
            "source": source,
            "mountpoint": mountpoint,
            "started": started,
            "pattern": rules.pattern,
            "patterns": list(rules.patterns),
            "warnings": warnings,
            "compress_after": opts.compress_after,
            "level": opts.level,
            "jobs": opts.jobs,
            "open_files": sum(1 for n in ops.table if n.opens > 0),
            "open_file_accounting": store.accounting.mode,
            "pyfuse3_patches": list(getattr(pyfuse3, "ZSTFS_PATCHES", ())),
            "passthrough": ops.enable_passthrough,
            "killpriv_v2": ops.enable_killpriv_v2,
            "known_inodes": len(ops.table.nodes),
            "recovery": {"temps_removed": recovery.temps_removed,
                         "leftovers_removed": recovery.leftovers_removed,
                         "leftovers_kept": recovery.leftovers_kept},
        }
        copies, copied = codec.default_decoders().spill_stats()
        snap["decoded_copies"] = {"files": copies, "bytes": copied}
        snap.update(stats.counters())
        if opstats is not None:
            snap["requests"] = opstats.snapshot()
        snap.update(await compactor.status())
        return snap

    ops.status_provider = status
    opstats = install_opstats(ops)  # ZSTFS_OPSTATS=1: count and time every request
    real_mountpoint = os.path.realpath(opts.mountpoint)
    try:
        pyfuse3.init(ops, opts.mountpoint, fuse_options(opts))
    except RuntimeError as e:
        store.close()
        raise MountError(f"{opts.mountpoint}: mount failed: {e} (see the message above)") from None
    notify: daemon.Notify = lambda error: None  # noqa: E731
    if not opts.foreground:
        notify = daemon.detach(None if log_handler is None else log_handler.fd)
        if log_handler is not None:
            log_handler.mirror_stderr = True  # fd 2 follows the log through rotations
        store.record_lock_owner()
    # Big foreign frames are checked once before any byte is served; the checking pass keeps its
    # output in unnamed files in the store (its filesystem has the room, and they vanish with the
    # daemon), so such files are decoded once, not twice (codec.Decoders).
    codec.default_decoders().set_spill_dir(store.root_fd)
    log.info("mounted %s on %s (pid %d)", opts.source, opts.mountpoint, os.getpid())
    try:
        trio.run(_serve, ops, compactor, notify, real_mountpoint)
    except BaseException as e:
        log.exception("the daemon failed: %s", e)
        notify(f"zstfs: {opts.mountpoint}: the daemon failed: {e}")
        raise
    finally:
        # Never unmount here: pyfuse3 would detach lazily, and processes still in the mount
        # would see the raw backing files. `main()` returns once the kernel ended the session
        # (an unmount: ours on a signal, `zstfs umount`, `fusermount3 -u`); after a crash the
        # mount stays dead (ENOTCONN) until `zstfs umount` (or `fusermount3 -uz`) clears it.
        pyfuse3.close(unmount=False)
        store.close()
        if is_mountpoint(real_mountpoint) == control.FSTYPE:
            log.error("%s is left mounted but dead (ENOTCONN); clear it with "
                      "`zstfs umount %s`", opts.mountpoint, opts.mountpoint)
        else:
            log.info("unmounted %s", opts.mountpoint)
    return 0


async def _serve(ops: Operations, compactor: Compactor, notify: daemon.Notify,
                 real_mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, compactor, real_mountpoint)
        await nursery.start(compactor.run)
        nursery.start_soon(_ready_after_init, ops, notify, real_mountpoint)
        await pyfuse3.main()  # until the kernel ends the session: the mount is gone
        daemon.sd_notify("STOPPING=1")
        await compactor.stop()
        nursery.cancel_scope.cancel()


async def _ready_after_init(ops: Operations, notify: daemon.Notify,
                            real_mountpoint: str) -> None:
    """Report the mount ready once the kernel's INIT request is answered: the kernel sets the
    mount's read-ahead from that reply, so only then can it be raised (before the first reader
    of a fresh mount, not a while after it)."""
    await ops.initialized.wait()
    ops.probe_passthrough()
    await trio.to_thread.run_sync(tune_readahead, real_mountpoint)
    notify(None)
    daemon.sd_notify("READY=1")


async def _signals(compactor: Compactor, real_mountpoint: str) -> None:
    """SIGTERM, SIGINT, SIGHUP: stop the compactor while the mount keeps being served, then
    unmount (not lazily: a busy mount stays mounted and served, and the log says who uses it)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting %s (background compression stops first)",
                     sig, real_mountpoint)
            await compactor.pause()  # STOPPING=1 only once unmounted: a busy mount stays up
            log.info("signal %d: background compression paused", sig)
            why = await unmount(real_mountpoint)
            if why is not None:
                compactor.resume()
                log.warning("signal %d: %s\nstill serving, background compression goes on "
                            "(signal again to retry)", sig, why)


async def unmount(mountpoint: str) -> str | None:
    """Unmount now, never lazily (a lazy unmount leaves the processes inside with the mount
    while everyone else sees the backing files). A mount busy for a moment (a `grep` finishing)
    is tried again a few times. Returns why it failed, or None.

    The unmount and the search for its users run off the trio thread: they make requests that
    this thread answers."""
    for attempt in range(UNMOUNT_ATTEMPTS):
        if attempt:
            await trio.sleep(UNMOUNT_RETRY_DELAY)
        in_use, why = await trio.to_thread.run_sync(_unmount_once, mountpoint)
        if not in_use:
            return why
    return await trio.to_thread.run_sync(_busy_message, mountpoint)


def _busy_message(mountpoint: str) -> str:
    """Why a busy mount was not unmounted: a line, then a line per process using it (and how
    to stop codex's app-server if it is one of them)."""
    try:
        users = busy.users_of(mountpoint, dev=os.stat(mountpoint).st_dev)
    except OSError:
        users = []
    if not users:
        return f"{mountpoint} is busy, not unmounted (by processes that could not be identified)"
    lines = [f"{mountpoint} is busy, not unmounted; in use by {busy.count(users)}:",
             *busy.describe_users(users), *busy.codex_advice(users, mountpoint)]
    return "\n".join(lines)


def _unmount_once(mountpoint: str) -> tuple[bool, str | None]:
    """(busy, why it failed or None)."""
    cmd = [control._fusermount(), "-u", mountpoint]
    if os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount", mountpoint]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=UNMOUNT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot unmount {mountpoint}: {e}"
    if r.returncode == 0:
        return False, None
    msg = " ".join((r.stderr or r.stdout).split())
    return "busy" in msg.lower(), f"cannot unmount {mountpoint}: {msg}"
