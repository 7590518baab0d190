#!/usr/bin/env python3
"""One request's round trip through zstfs's daemon, for daemons run by different interpreters
(e.g. venvs with different pyfuse3 builds), interleaved with the same calls on the disk.

A client process sends one request after the other on an open file: `getxattr` of an absent
name (`--mode xattr`: a `GETXATTR` whose handler returns at once) or `fdatasync` of a clean file
(`--mode fsync`: an `FSYNC`, the daemon's `fdatasync` of the backing file, what a SQLite commit
waits for). Each run mounts a fresh daemon (as root, over a scratch directory), warms it with
2,000 calls, then times `--calls` calls on the disk, through the mount, and on the disk again.
Reported per daemon, medians over `--reps` runs: the time a call takes through the mount minus
on the disk (µs), the daemon's user and system CPU per call (from /proc, 10 ms ticks), and the
function-call IPIs per call (`CAL` in /proc/interrupts: a wake-up of the other, idle vCPU).

Usage (root)::

    python scripts/bench_round_trip.py [--mode xattr|fsync] [--calls N] [--reps N]
                                       NAME=PYTHON [NAME=PYTHON ...]

e.g. `old=/tmp/venv-old/bin/python new=.venv/bin/python`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARM = 2000
MOUNT_TIMEOUT = 20.0


def calls(path: Path, n: int, mode: str) -> float:
    """`n` calls of `mode` on `path`; µs per call."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x")
        os.fdatasync(fd)
        started = time.perf_counter()
        if mode == "xattr":
            for _ in range(n):
                try:
                    os.getxattr(fd, "user.absent")
                except OSError:
                    pass
        else:
            for _ in range(n):
                os.fdatasync(fd)
        return (time.perf_counter() - started) / n * 1e6
    finally:
        os.close(fd)


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def call_ipis() -> int:
    for line in Path("/proc/interrupts").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "CAL:":
            return sum(int(p) for p in parts[1:1 + os.cpu_count()] if p.isdigit())
    return 0


def one_run(python: str, work: Path, n: int, mode: str) -> tuple[float, float, float, float]:
    """(extra µs per call, daemon user µs, system µs, IPIs per call) for one fresh daemon."""
    src, mnt, disk = work / "src", work / "mnt", work / "disk"
    for d in (src, mnt, disk):
        d.mkdir(exist_ok=True)
    log = open(work / "daemon.log", "w")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen([python, "-m", "zstfs", "mount", "--foreground", str(src),
                               str(mnt)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mnt):
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{python}: the mount did not come up (see {work / 'daemon.log'})")
            time.sleep(0.05)
        calls(mnt / "f", WARM, mode)
        before = calls(disk / "f", n, mode)
        u0, s0 = cpu_ticks(daemon.pid)
        i0 = call_ipis()
        through = calls(mnt / "f", n, mode)
        i1 = call_ipis()
        u1, s1 = cpu_ticks(daemon.pid)
        after = calls(disk / "f", n, mode)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        daemon.wait(timeout=30)
        log.close()
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    return (through - (before + after) / 2, (u1 - u0) * tick_us / n, (s1 - s0) * tick_us / n,
            (i1 - i0) / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["xattr", "fsync"], default="xattr")
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("daemons", nargs="+", metavar="NAME=PYTHON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("run as root (it mounts and reads the daemon's /proc entries)")
    daemons = [d.split("=", 1) for d in args.daemons]
    if any(len(d) != 2 for d in daemons):
        ap.error("daemons are NAME=PYTHON")
    results: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n, _ in daemons}
    with tempfile.TemporaryDirectory(prefix="zstfs-rt-") as tmp:
        for _ in range(args.reps):
            for name, python in daemons:
                results[name].append(one_run(python, Path(tmp), args.calls, args.mode))
    print(f"{args.mode}: {args.calls} calls per run, medians of {args.reps} runs")
    print("| daemon | extra per call (runs) | daemon user / system CPU per call | IPIs per call |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        extra, user, system, ipis = (statistics.median(c) for c in zip(*rows, strict=True))
        runs = " ".join(f"{r[0]:.0f}" for r in rows)
        print(f"| {name} | {extra:.1f} µs ({runs}) | {user:.1f} / {system:.1f} µs | {ipis:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
