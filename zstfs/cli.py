"""The `zstfs` command line.

`zstfs mount|umount|status|compress|expand|verify`, plus the form mount.fuse3 uses for an fstab
line of type `fuse.zstfs`: `zstfs SOURCE MOUNTPOINT -o opt,opt=val`.

Errors are one line on stderr naming the path and the cause; exit status 1 (2 for usage errors).
pyfuse3 and trio are imported only by the commands that need them, so `status` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from zstfs import __version__
from zstfs.names import DEFAULT_PATTERNS, parse_patterns
from zstfs.options import MountOptions, default_jobs, parse_duration

COMMANDS = ("mount", "umount", "unmount", "status", "compress", "expand", "verify")

#: Generic mount(8) options that mean nothing to zstfs and are ignored in `-o` lists.
GENERIC_MOUNT_OPTIONS = {
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "dev",
    "nodev", "suid", "nosuid", "exec", "noexec", "_netdev", "nofail", "async", "sync", "atime",
    "noatime", "relatime", "norelatime", "strictatime", "diratime", "nodiratime", "lazytime",
    "nolazytime", "silent", "loud", "x-systemd.automount", "comment",
}


class UsageError(Exception):
    pass


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _level(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 19:
        raise argparse.ArgumentTypeError("level must be between 1 and 19")
    return n


def _jobs(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("jobs must be at least 1")
    return n


_DEFAULT = " and ".join(DEFAULT_PATTERNS)


def _pattern(text: str) -> str:
    try:
        parse_patterns(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zstfs",
        description="Keep cold Codex rollouts zstd-compressed while every tool sees plain .jsonl.",
    )
    p.add_argument("--version", action="version", version=f"zstfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount a store (over itself by default)")
    m.add_argument("source", metavar="SOURCE", help="the store directory (e.g. ~/.codex)")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="where to mount (default: SOURCE itself)")
    m.add_argument("--compress-after", type=_duration, metavar="DURATION",
                   help="compress files whose mtime is older than this (7d, 12h, 30m, 0); "
                        "default: never compress in the background")
    m.add_argument("--pattern", action="append", type=_pattern, metavar="GLOB",
                   help=f"which files are compressed; repeatable (default: {_DEFAULT})")
    m.add_argument("--level", type=_level, default=3, help="zstd level for new files (default 3)")
    m.add_argument("--jobs", type=_jobs, default=default_jobs(),
                   help=f"parallel background compressions (default {default_jobs()})")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached and log to stderr (for systemd and debugging)")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users use the mount (needs user_allow_other in /etc/fuse.conf)")
    m.add_argument("--allow-root", action="store_true", help="let root use the mount")
    m.add_argument("--log", dest="log_file", metavar="FILE",
                   help="log file (default for a detached daemon: ~/.local/state/zstfs/)")
    m.add_argument("--debug", action="store_true", help="log every decision")
    m.add_argument("--force", action="store_true",
                   help="mount even if processes have files in SOURCE open (status warns)")
    m.add_argument("-o", dest="options", metavar="OPTS", action="append", default=[],
                   help="fstab-style options: compress_after=7d,pattern=GLOB,level=3,jobs=1,"
                        "allow_other,allow_root,debug,log=FILE,foreground,force")

    u = sub.add_parser("umount", aliases=["unmount"],
                       help="unmount and wait until the daemon has finished")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now even if busy")
    u.add_argument("--stop-codex", action="store_true",
                   help="if codex's background app-server keeps the mount busy, stop it first")
    u.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the daemon to exit (default 600)")

    s = sub.add_parser("status", help="what a mount or store holds and what the daemon does")
    s.add_argument("path", metavar="PATH", help="a zstfs mountpoint or an unmounted store")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--pattern", action="append", type=_pattern, metavar="GLOB",
                   help="for an unmounted store: which files count as compressible "
                        "(default: codex's rollouts; a mount reports its own)")

    c = sub.add_parser("compress", help="compress eligible files of an unmounted store now")
    c.add_argument("source", metavar="SOURCE")
    c.add_argument("--older-than", type=_duration, default=0.0, metavar="DURATION",
                   help="only files whose mtime is older than this (default 0: all)")
    c.add_argument("--pattern", action="append", type=_pattern, metavar="GLOB",
                   help="which files (default: codex's rollouts); repeatable")
    c.add_argument("--level", type=_level, default=3)
    c.add_argument("--jobs", type=_jobs, default=default_jobs())

    e = sub.add_parser("expand", help="turn every .zst of an unmounted store back into plain files")
    e.add_argument("source", metavar="SOURCE")
    e.add_argument("--pattern", action="append", type=_pattern, metavar="GLOB",
                   help="which .zst files are compressed forms (default: codex's rollouts)")

    v = sub.add_parser("verify", help="decode every .zst of an unmounted store; report damage")
    v.add_argument("source", metavar="SOURCE")
    v.add_argument("--pattern", action="append", type=_pattern, metavar="GLOB",
                   help="which .zst files are compressed forms (default: codex's rollouts)")
    for cmd in (c, e, v):
        cmd.add_argument("--progress", dest="progress", action="store_true", default=None,
                         help="show a progress bar (default: when stderr is a terminal)")
        cmd.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def fstab_argv(argv: list[str]) -> list[str]:
    """`zstfs SOURCE MOUNTPOINT -o a,b=c` (what mount.fuse3 runs) → `zstfs mount ...`."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return ["mount", *argv]
    return argv


def apply_o_options(opts: MountOptions, lists: list[str]) -> None:
    """Map `-o` options onto MountOptions; ignore generic mount(8) flags; reject unknown keys."""
    patterns: tuple[str, ...] = ()
    for item in ",".join(lists).split(","):
        item = item.strip()
        if not item or item in GENERIC_MOUNT_OPTIONS or item.startswith("x-"):
            continue
        key, has_value, value = item.partition("=")
        key = key.replace("-", "_")
        try:
            if key == "compress_after" and has_value:
                opts.compress_after = parse_duration(value)
            elif key == "pattern" and has_value:
                # Repeatable: the first `pattern=` replaces the default, later ones add to it.
                patterns = (*patterns, _pattern(value))
                opts.patterns = patterns
            elif key == "level" and has_value:
                opts.level = _level(value)
            elif key == "jobs" and has_value:
                opts.jobs = _jobs(value)
            elif key == "log" and has_value:
                opts.log_file = value
            elif key == "fsname" and has_value:
                opts.fsname = value
            elif key in ("allow_other", "allow_root", "debug", "foreground", "force") \
                    and not has_value:
                setattr(opts, key, True)
            elif key == "default_permissions" and not has_value:
                pass  # always on
            else:
                raise UsageError(f"unknown mount option {item!r}")
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UsageError(f"mount option {item!r}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = fstab_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args)
    except UsageError as e:
        print(f"zstfs: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "mount":
        return _mount(args)
    if args.command in ("umount", "unmount"):
        from zstfs import control

        return control.umount(args.mountpoint, lazy=args.lazy, timeout=args.timeout,
                              stop_codex=args.stop_codex)
    if args.command == "status":
        from zstfs import status

        return status.command(args.path, as_json=args.json, pattern=args.pattern)
    from zstfs import offline

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.command == "compress":
        return offline.compress(args.source, older_than=args.older_than, pattern=args.pattern,
                                level=args.level, jobs=args.jobs, progress=progress)
    if args.command == "expand":
        return offline.expand(args.source, pattern=args.pattern, progress=progress)
    if args.command == "verify":
        return offline.verify(args.source, pattern=args.pattern, progress=progress)
    raise AssertionError(args.command)


def _mount(args: argparse.Namespace) -> int:
    source = os.path.expanduser(args.source)
    opts = MountOptions(
        source=source,
        mountpoint=os.path.expanduser(args.mountpoint) if args.mountpoint else source,
        foreground=args.foreground,
        allow_other=args.allow_other,
        allow_root=args.allow_root,
        debug=args.debug,
        log_file=args.log_file,
        patterns=parse_patterns(args.pattern),
        force=args.force,
        compress_after=args.compress_after,
        level=args.level,
        jobs=args.jobs,
    )
    apply_o_options(opts, args.options)
    from zstfs import control

    # First, before anything looks through them (on a dead mount every look fails): SOURCE and
    # MOUNTPOINT against the zstfs mounts there.
    for path in dict.fromkeys((opts.source, opts.mountpoint)):
        refusal = control.prepare_mountpoint(path)
        if refusal is not None:
            print(f"zstfs: {refusal}", file=sys.stderr)
            return 1
    if not os.path.isdir(opts.source):
        what = "not a directory" if os.path.exists(opts.source) else "no such directory"
        print(f"zstfs: {opts.source}: {what}", file=sys.stderr)
        return 1
    from zstfs.mount import MountError, mount

    try:
        return mount(opts)
    except MountError as e:
        print(f"zstfs: {e}", file=sys.stderr)
        return 1
