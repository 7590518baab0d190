#!/usr/bin/env python3
"""Benchmark a real zstfs mount against the tools people use without it.

One command runs every comparison side by side on this machine and prints a table of medians,
ratios to the baseline, the target and PASS/MISS:

* ``grep -rc PATTERN`` through the mount over a compressed store vs ``zstdgrep -c`` over the
  backing ``.zst`` files vs ``grep -rc`` over the same files plain on disk (cold and warm);
* ``tail -n 5`` of a 150 MB compressed rollout through the mount vs ``zstdcat F.zst | tail -n 5``;
* ``cat`` of a 200 MB plain file through the mount vs on disk;
* ``find`` and ``ls -lR`` over 10,000 (compressed) files through the mount vs on disk;
* appending codex-like lines (one ``write`` per line, 0.2-40 KB, O_APPEND fd held open);
* promotion: the first append to a 100 MB compressed file vs ``zstd -d`` of it;
* compaction: the daemon compressing the whole store (``--compress-after 0``), MB/s per core,
  and the stored size vs ``zstd -3`` one frame per file (codex's format);
* foreign files: ``cat`` of a 400 MB single-frame ``zstd -3`` file vs ``zstdcat``, and the peak
  RSS while 8 processes hold 8 ``zstd --long=30`` files open;
* the daemons' peak RSS (VmHWM) over all of it;
* with ``--only mountcost``, the rows of ``scripts/bench_mount_cost.py`` (sqlite, git, tar,
  diff, rm, its store rows -- cold grep, tail, a random line, a session list, ``ls -lR``, appends
  with fsync -- and codex, through the mount vs on disk, with the daemon's CPU per run and peak
  RSS per row); ``--mountcost-rows`` picks some (e.g. ``store``); with ``--user NAME
  --user-python PATH`` also as that ordinary user, side by side (root drops the page cache for
  the user's cold runs), and with ``--user-floor PATH`` through libfuse's C ``passthrough_ll``
  as that user (scripts/build-passthrough-ll.sh PATH).

Stores come from ``scripts/gen_rollouts.py`` and are cached in ``--workdir`` across runs (the
plain store only; everything derived from it is rebuilt each run). Mounts use the real CLI
(``zstfs mount --foreground`` as a subprocess, ``zstfs umount``), on a mountpoint beside the
store so the backing files stay reachable for the baselines.

"Cold" means ``sync; echo 3 > /proc/sys/vm/drop_caches`` before the run and, for runs through
the mount, a freshly started daemon (its decoded-frame cache empty); it needs root. "Warm" runs
come after one untimed warm-up run. Every tool's output goes to a pipe: GNU grep stops at the
first match when stdout is /dev/null, even with ``-c``.

Usage::

    sudo /tmp/venv/bin/python scripts/bench.py [--quick] [--reps N] [--workdir DIR]
                                               [--markdown FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gen_rollouts
from benchlib import (
    MB,
    ZSTFS,
    Results,
    Row,
    can_drop_caches,
    drop_caches,
    mounted,
    ratio_row,
    sh,
    versions,
    vm_hwm,
)


@dataclass
class Config:
    small: int
    big: list[str]
    promo: str
    append_mb: int
    tree_files: int
    reps: int
    seed: int = 7
    pattern: str = "deprecated"


FULL = Config(small=2000, big=["30M", "150M", "200M"], promo="100M", append_mb=64,
              tree_files=10_000, reps=5)
QUICK = Config(small=300, big=["30M", "150M", "200M"], promo="100M", append_mb=16,
               tree_files=10_000, reps=2)


# --------------------------------------------------------------------------------------------
# Data


def make_plain_store(work: Path, cfg: Config) -> tuple[Path, dict[str, Any]]:
    """The generated store, cached by its parameters; returns (dir, manifest)."""
    key = f"plain-s{cfg.small}-b{'_'.join(cfg.big)}-seed{cfg.seed}"
    root = work / key
    manifest_path = work / f"{key}.json"
    if manifest_path.exists() and root.is_dir():
        return root, json.loads(manifest_path.read_text())
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    big = [gen_rollouts.parse_size(s) for s in cfg.big]
    paths = gen_rollouts.generate_store(root, small=cfg.small, big_sizes=big, seed=cfg.seed)
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in paths}
    by_size = sorted(sizes, key=sizes.__getitem__)
    manifest = {"sizes": sizes, "big": by_size[-len(big):] if big else []}
    manifest_path.write_text(json.dumps(manifest))
    print(f"generated {len(paths)} rollouts, {sum(sizes.values()) / MB:.0f} MB, in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return root, manifest


def pick_big(manifest: dict[str, Any], size: str) -> str:
    """The generated big file closest to `size`."""
    want = gen_rollouts.parse_size(size)
    return min(manifest["big"], key=lambda rel: abs(manifest["sizes"][rel] - want))


def append_lines(plain: Path, total: int) -> list[bytes]:
    """Real rollout lines of 0.2-40 KB (what codex appends, one write each), about `total` bytes."""
    lines: list[bytes] = []
    n = 0
    for p in sorted(plain.rglob("*.jsonl")):
        if p.stat().st_size > 2 * MB:
            continue
        for line in p.read_bytes().splitlines(keepends=True):
            if 200 <= len(line) <= 40_000:
                lines.append(line)
                n += len(line)
                if n >= total:
                    random.Random(1).shuffle(lines)
                    return lines
    return lines


# --------------------------------------------------------------------------------------------
# The comparisons


def grep_total(out: bytes) -> int:
    return sum(int(line.rsplit(b":", 1)[1]) for line in out.splitlines() if b":" in line)


def bench_compaction(res: Results, work: Path, plain: Path, comp: Path,
                     manifest: dict[str, Any]) -> None:
    print("compaction: zstd -3 per file (codex's format), then the daemon with "
          "--compress-after 0", flush=True)
    codex = work / "codex-zst"
    shutil.rmtree(codex, ignore_errors=True)
    t_cli, _ = sh(f"zstd -q -3 -T1 -r --output-dir-mirror {shlex.quote(str(codex))} "
                  f"{shlex.quote(str(plain))}")
    codex_bytes = sum(p.stat().st_size for p in codex.rglob("*.zst"))
    shutil.rmtree(codex)
    logical = sum(manifest["sizes"].values())

    shutil.rmtree(comp, ignore_errors=True)
    subprocess.run(["cp", "-a", str(plain), str(comp)], check=True)
    with mounted(res, "compaction", comp, work / "mnt-compact", "--compress-after", "0") as d:
        deadline = time.monotonic() + 1800
        while True:
            s = d.status() or {}
            if (s.get("scan_done") and s.get("waiting_files") == 0 and s.get("in_flight") == 0
                    and s.get("compressed_files") == len(manifest["sizes"])):
                break
            if s.get("swaps_failed"):
                raise RuntimeError(f"compaction failed: {s.get('last_errors')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"compaction did not finish in 30 min: {s}")
            time.sleep(0.25)
        wall = time.perf_counter() - d.started_at
        jobs = int(s["jobs"])
        stored = int(s["compressed_stored_bytes"])
    per_core = logical / MB / wall / jobs
    cli_rate = logical / MB / t_cli
    res.add(Row(f"compaction throughput ({len(manifest['sizes'])} files, "
                f"{logical / MB:.0f} MB, jobs={jobs}, mount to idle)",
                f"{per_core:.0f} MB/s/core", f"`zstd -3 -T1 -r` {cli_rate:.0f} MB/s",
                per_core / cli_rate, "-", None))
    res.add(Row("stored size vs `zstd -3` one frame per file",
                f"{stored / MB:.1f} MB ({logical / stored:.2f}x)",
                f"codex {codex_bytes / MB:.1f} MB ({logical / codex_bytes:.2f}x)",
                stored / codex_bytes, "-", None))
    leftovers = [p for p in comp.rglob("*.jsonl")]
    if leftovers:
        raise RuntimeError(f"plain files left after compaction: {leftovers[:3]}")


def bench_grep_tail(res: Results, cfg: Config, work: Path, plain: Path, comp: Path,
                    manifest: dict[str, Any], cold_ok: bool) -> None:
    mnt = work / "mnt"
    q = shlex.quote
    pat = q(cfg.pattern)
    big = pick_big(manifest, "150M")
    grep_mnt = f"grep -rc {pat} {q(str(mnt))}"
    zgrep = f"find {q(str(comp))} -name '*.zst' -exec zstdgrep -c {pat} {{}} +"
    grep_plain = f"grep -rc {pat} {q(str(plain))}"
    tail_mnt = f"tail -n 5 {q(str(mnt / big))}"
    tail_z = f"zstdcat {q(str(comp / big))}.zst | tail -n 5"
    print(f"grep/tail: {len(manifest['sizes'])} files, pattern {cfg.pattern!r}; tail of {big} "
          f"({manifest['sizes'][big] / MB:.0f} MB)", flush=True)
    with mounted(res, "read compressed store", comp, mnt) as d:
        outputs: dict[str, bytes] = {}
        modes = (["cold"] if cold_ok else []) + ["warm"]
        for mode in modes:
            t: dict[str, list[float]] = {k: [] for k in ("gm", "gz", "gp", "tm", "tz")}
            cmds = {"gm": grep_mnt, "gz": zgrep, "gp": grep_plain, "tm": tail_mnt, "tz": tail_z}
            if mode == "warm":
                for k, c in cmds.items():
                    outputs[k] = sh(c, ok_codes=(0, 1))[1]
            for _ in range(cfg.reps):
                for k, c in cmds.items():
                    if mode == "cold":
                        if k in ("gm", "tm"):
                            d.restart()
                        drop_caches()
                    dt, out = sh(c, ok_codes=(0, 1))
                    t[k].append(dt)
                    outputs[k] = out
            totals = {k: grep_total(outputs[k]) for k in ("gm", "gz", "gp")}
            if len(set(totals.values())) != 1 or outputs["tm"] != outputs["tz"]:
                raise RuntimeError(f"outputs differ: grep totals {totals}, tail "
                                   f"{outputs['tm'][-200:]!r} vs {outputs['tz'][-200:]!r}")
            gm, gz, gp = t["gm"], t["gz"], t["gp"]
            ratio_row(res, f"`grep -rc` through mount, {mode} ({totals['gm']} hits)", gm, gz,
                      "`zstdgrep -c`", 0.5)
            ratio_row(res, f"`grep -rc` through mount, {mode}", gm, gp, "plain `grep -rc`", 3)
            ratio_row(res, f"`tail -n 5` 150 MB compressed, {mode}", t["tm"], t["tz"],
                      "`zstdcat | tail`", 0.25)
        d.record_hwm()


def bench_appends(res: Results, cfg: Config, work: Path, plain: Path, comp: Path) -> None:
    lines = append_lines(plain, cfg.append_mb * MB)
    total = sum(map(len, lines))
    print(f"appends: {len(lines)} lines, {total / MB:.1f} MB, one write each", flush=True)
    mnt = work / "mnt"
    disk_dir = work / "append-disk"
    disk_dir.mkdir(exist_ok=True)
    (comp / "bench-append").mkdir(exist_ok=True)

    def run(path: Path) -> float:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for line in lines:
                os.write(fd, line)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
        if path.stat().st_size != total:
            raise RuntimeError(f"{path}: {path.stat().st_size} bytes, expected {total}")
        return dt

    with mounted(res, "appends", comp, mnt) as d:
        tm, td = [], []
        for _ in range(cfg.reps):
            tm.append(run(mnt / "bench-append" / "a.jsonl"))
            td.append(run(disk_dir / "a.jsonl"))
        (mnt / "bench-append" / "a.jsonl").unlink()
        (mnt / "bench-append").rmdir()
        d.record_hwm()
    shutil.rmtree(disk_dir)
    ratio_row(res, f"append {len(lines)} lines of 0.2-40 KB, O_APPEND ({total / MB:.0f} MB)",
              tm, td, "disk", 0.5, higher_is_better=True,
              fmt=lambda s: f"{total / MB / s:.0f} MB/s")


def bench_cat(res: Results, cfg: Config, work: Path, plain: Path, manifest: dict[str, Any],
              cold_ok: bool) -> None:
    big = pick_big(manifest, "200M")
    size = manifest["sizes"][big]
    mnt = work / "mnt-plain"
    q = shlex.quote
    cat_mnt = f"cat {q(str(mnt / big))} | wc -c"
    cat_disk = f"cat {q(str(plain / big))} | wc -c"
    print(f"cat: {big} ({size / MB:.0f} MB, plain)", flush=True)
    with mounted(res, "cat plain store", plain, mnt) as d:
        for mode in (["cold"] if cold_ok else []) + ["warm"]:
            tm, td = [], []
            if mode == "warm":
                sh(cat_mnt)
                sh(cat_disk)
            for _ in range(cfg.reps):
                for cmd, acc in ((cat_mnt, tm), (cat_disk, td)):
                    if mode == "cold":
                        drop_caches()
                    dt, out = sh(cmd)
                    if int(out) != size:
                        raise RuntimeError(f"{cmd}: {out!r}, expected {size}")
                    acc.append(dt)
            ratio_row(res, f"`cat` 200 MB plain, {mode}" + (" (first read)" if mode == "cold"
                                                             else ""),
                      tm, td, "disk", 0.7 if mode == "cold" else None,
                      higher_is_better=True, fmt=lambda s: f"{size / MB / s:.0f} MB/s")
        d.record_hwm()


HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
data = os.pread(fd, 65536, max(0, size - 65536))
print(len(data), flush=True)
sys.stdin.read()  # hold the file open until told
"""


def forget_pages(path: Path) -> None:
    """Drop the kernel's cached pages of one file (for a FUSE file: the mount's copy, so the next
    read goes to the daemon) without touching any other file's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_foreign(res: Results, cfg: Config, work: Path, cold_ok: bool) -> None:
    """Foreign `.zst` files: `cat` of a 400 MB single-frame `zstd -3` file (what codex
    and people write) vs `zstdcat`, and the daemon's peak RSS while 8 processes hold 8
    `zstd --long=30` files (windows of ~100 MB each) open after reading their ends."""
    root = work / "foreign"
    store = root / "store"
    store.mkdir(parents=True, exist_ok=True)
    plain = root / "big400.jsonl"
    if not plain.exists():
        gen_rollouts.generate_rollout(plain, 400 * MB, seed=cfg.seed)
    single = store / "single.jsonl.zst"
    if not single.exists():
        sh(f"zstd -q -3 -f {shlex.quote(str(plain))} -o {shlex.quote(str(single))}")
    block = random.Random(cfg.seed).randbytes(2 << 20)
    wide = []
    for i in range(8):
        path = store / f"wide{i}.jsonl.zst"
        wide.append(path)
        if not path.exists():
            src = root / "wide.plain"
            src.write_bytes(block + bytes(96 << 20) + bytes([i]) * 1000 + block)
            sh(f"zstd -q -1 --long=30 -f {shlex.quote(str(src))} -o {shlex.quote(str(path))}")
            src.unlink()
    size = plain.stat().st_size
    mnt = root / "mnt"
    q = shlex.quote
    cat_mnt = f"cat {q(str(mnt / 'single.jsonl'))} | wc -c"
    zcat = f"zstdcat {q(str(single))} | wc -c"
    print(f"foreign: cat of a {size / MB:.0f} MB single-frame file", flush=True)
    with mounted(res, "foreign files", store, mnt, "--pattern", "*.jsonl") as d:
        modes = (["cold"] if cold_ok else []) + ["warm", "hot"]
        for mode in modes:
            tm, tz = [], []
            for _ in range(cfg.reps):
                if mode == "cold":
                    d.restart()
                for cmd, acc in ((cat_mnt, tm), (zcat, tz)):
                    if cold_ok and mode != "hot":
                        drop_caches()  # warm: the daemon knows the frame verified
                    if mode == "hot":
                        forget_pages(mnt / "single.jsonl")  # the daemon serves every byte
                    dt, out = sh(cmd)
                    if int(out) != size:
                        raise RuntimeError(f"{cmd}: {out!r}, expected {size}")
                    acc.append(dt)
                d.record_hwm()
            label = {"cold": "cold: fresh daemon, first read verifies the frame",
                     "warm": "daemon warm (frame verified), page cache dropped",
                     "hot": "daemon warm, backing files in the page cache (the mount's "
                            "own pages dropped)"}[mode]
            ratio_row(res, f"`cat` {size / MB:.0f} MB single-frame `zstd -3` file, {label}",
                      tm, tz, "`zstdcat`", 1.5)
        d.restart()
        procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(mnt / p.name[:-4])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                 for p in wide]
        try:
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline()
                if line.strip() != b"65536":
                    raise RuntimeError(f"a long-window reader failed: {line!r}")
            hwm = vm_hwm(d.pid) or 0
        finally:
            for p in procs:
                with contextlib.suppress(OSError):
                    p.communicate(b"", timeout=60)
        res.add(Row("daemon peak RSS, 8 readers holding 8 `zstd --long=30` files (~100 MB "
                    "windows) open", f"{hwm / MB:.0f} MB", "-", None, "<= 200 MB",
                    hwm <= 200 * MB))
        d.record_hwm()


def make_tree(comp: Path, tree: Path, n: int) -> None:
    """`n` compressed rollouts (copies of the store's small `.zst` files) in a codex layout."""
    shutil.rmtree(tree, ignore_errors=True)
    smalls = [p for p in sorted(comp.rglob("*.jsonl.zst")) if p.stat().st_size < 2 * MB]
    for i in range(n):
        src = smalls[i % len(smalls)]
        rel = src.relative_to(comp)
        dst = tree / f"copy{i // len(smalls)}" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def bench_walk(res: Results, cfg: Config, work: Path, comp: Path, cold_ok: bool) -> None:
    tree = work / "tree"
    make_tree(comp, tree, cfg.tree_files)
    mnt = work / "mnt-tree"
    q = shlex.quote
    print(f"find/ls -lR: {cfg.tree_files} compressed files", flush=True)
    with mounted(res, "find/ls tree", tree, mnt) as d:
        for tool, fmt in (("find", "find {} | wc -l"), ("ls -lR", "ls -lR {} | wc -l")):
            cm, cd = fmt.format(q(str(mnt))), fmt.format(q(str(tree)))
            for mode in (["cold"] if cold_ok else []) + ["warm"]:
                tm, td = [], []
                if mode == "warm":
                    sh(cm)
                    sh(cd)
                for _ in range(cfg.reps):
                    for cmd, acc, through in ((cm, tm, True), (cd, td, False)):
                        if mode == "cold":
                            if through:
                                d.restart()
                            drop_caches()
                        dt, out = sh(cmd)
                        # On disk the store root also holds `.zstfs.lock`, hidden by the mount.
                        if int(out) < cfg.tree_files:
                            raise RuntimeError(f"{cmd}: {out!r} lines")
                        acc.append(dt)
                ratio_row(res, f"`{tool}` {cfg.tree_files} files, {mode}", tm, td, "disk", 3)
        d.record_hwm()
    shutil.rmtree(tree)


def bench_promotion(res: Results, cfg: Config, work: Path) -> None:
    size = gen_rollouts.parse_size(cfg.promo)
    master_dir = work / f"promo-{cfg.promo}"
    master = master_dir / "promo.jsonl.zst"
    if not master.exists():
        shutil.rmtree(master_dir, ignore_errors=True)
        master_dir.mkdir(parents=True)
        gen_rollouts.generate_rollout(master_dir / "promo.jsonl", size, seed=cfg.seed + 1)
        r = subprocess.run([*ZSTFS, "compress", str(master_dir), "--no-progress",
                            "--pattern", "*.jsonl"],
                           capture_output=True, text=True)
        if r.returncode != 0 or not master.exists():
            raise RuntimeError(f"zstfs compress {master_dir}: {r.stderr}")
    logical = size
    store = work / "promo-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    for k in range(cfg.reps):
        shutil.copy2(master, store / f"p{k}.jsonl.zst")
    out = work / "promo-out.jsonl"
    mnt = work / "mnt-promo"
    line = b'{"timestamp":"2026-07-07T00:00:00.000Z","type":"event_msg","payload":{}}\n'
    print(f"promotion: first append to a {size / MB:.0f} MB compressed file", flush=True)
    tm, tz, tzs = [], [], []
    with mounted(res, "promotion", store, mnt, "--pattern", "*.jsonl") as d:
        for k in range(cfg.reps):
            path = mnt / f"p{k}.jsonl"
            logical = path.stat().st_size
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            # Each timed step starts with nothing left to write back: otherwise one step's
            # fsync pays for the previous step's deletion of a 100 MB file.
            os.sync()
            try:
                t0 = time.perf_counter()
                os.write(fd, line)
                tm.append(time.perf_counter() - t0)
            finally:
                os.close(fd)
            if path.stat().st_size != logical + len(line):
                raise RuntimeError(f"{path}: wrong size after the append")
            # Like the baselines' output, the promoted file goes: page cache that keeps growing
            # run after run slows every later write on this VM, for zstfs and zstd alike.
            path.unlink()
            os.sync()
            dt, _ = sh(f"zstd -d -q -f -o {shlex.quote(str(out))} {shlex.quote(str(master))}")
            tz.append(dt)
            out.unlink()
            os.sync()
            # The promotion fsyncs the decoded file before it replaces the .zst; so does this.
            dt, _ = sh(f"zstd -d -q -f -o {shlex.quote(str(out))} {shlex.quote(str(master))}"
                       f" && sync {shlex.quote(str(out))}")
            tzs.append(dt)
            out.unlink()
            os.sync()
        deadline = time.monotonic() + 10  # the status document is cached for a second
        while (d.status() or {}).get("promotions") != cfg.reps:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not count {cfg.reps} promotions")
            time.sleep(0.1)
        d.record_hwm()
    shutil.rmtree(store)
    ratio_row(res, f"promotion: first append to a {logical / MB:.0f} MB compressed file",
              tm, tz, "`zstd -d`", 1.5)
    ratio_row(res, "promotion vs a durable decode (info)", tm, tzs, "`zstd -d && sync FILE`",
              None)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller store, fewer repetitions")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (median reported)")
    ap.add_argument("--small", type=int, help="number of small rollouts")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/zstfs-bench"))
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table here")
    ap.add_argument("--only", help="comma list of: compaction,grep,append,cat,walk,promotion,"
                    "foreign,mountcost (mountcost only when named: "
                    "scripts/bench_mount_cost.py)")
    ap.add_argument("--mountcost-rows", metavar="ROWS",
                    help="with --only mountcost: which of its rows (bench_mount_cost.py --rows: "
                         "names or sets such as store, codex; default all); its store has "
                         "--small small rollouts (default 1000, 300 with --quick)")
    ap.add_argument("--user", metavar="NAME",
                    help="with --only mountcost, as root: those rows as root and as this "
                         "ordinary user, side by side (scripts/bench_mount_cost.py --user)")
    ap.add_argument("--user-python", type=Path, metavar="PATH", action="append", default=[],
                    help="with --user: the python of that user's zstfs venv (repeatable)")
    ap.add_argument("--user-floor", type=Path, metavar="PATH",
                    help="with --user: one more column, the user's rows through libfuse's C "
                         "passthrough_ll at PATH (scripts/build-passthrough-ll.sh PATH)")
    args = ap.parse_args(argv)
    if args.user_floor and not args.user:
        ap.error("--user-floor needs --user")
    if args.user and (not args.user_python or os.geteuid() != 0
                      or "mountcost" not in (args.only or "").split(",")):
        ap.error("--user needs root, --user-python and --only mountcost")
    mountcost_rows = None
    if args.mountcost_rows:
        if "mountcost" not in (args.only or "").split(","):
            ap.error("--mountcost-rows needs --only mountcost")
        import bench_mount_cost

        try:
            mountcost_rows = bench_mount_cost.parse_rows(args.mountcost_rows)
        except argparse.ArgumentTypeError as e:
            ap.error(f"--mountcost-rows: {e}")
    cfg = QUICK if args.quick else FULL
    if args.reps:
        cfg.reps = args.reps
    if args.small is not None:
        cfg.small = args.small
    only = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return only is None or name in only

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cold_ok = can_drop_caches()
    res = Results()
    both, user_ok = "", True  # with --user: the mount-cost rows as root and as that user
    if not cold_ok:
        res.notes.append("not root: cold-cache rows skipped (drop_caches needs root)")
    started = time.perf_counter()
    load0 = os.getloadavg()
    needs_store = only is None or bool(only - {"foreign", "mountcost"})
    plain, manifest = (make_plain_store(work, cfg) if needs_store
                       else (work, {"sizes": {}, "big": []}))
    comp = work / "comp"
    if want("compaction") or ((want("grep") or want("walk") or want("append"))
                              and not (comp.is_dir() and not any(comp.rglob("*.jsonl")))):
        bench_compaction(res, work, plain, comp, manifest)
    if want("grep"):
        bench_grep_tail(res, cfg, work, plain, comp, manifest, cold_ok)
    if want("append"):
        bench_appends(res, cfg, work, plain, comp)
    if want("cat"):
        bench_cat(res, cfg, work, plain, manifest, cold_ok)
    if want("walk"):
        bench_walk(res, cfg, work, comp, cold_ok)
    if want("promotion"):
        bench_promotion(res, cfg, work)
    if want("foreign"):
        bench_foreign(res, cfg, work, cold_ok)
    if only is not None and "mountcost" in only:  # sqlite, git, tar, codex, ...
        import bench_mount_cost  # imports the codex harness: only when asked for

        rows = mountcost_rows
        small = (args.small if args.small is not None
                 else cfg.small if args.quick else bench_mount_cost.STORE_SMALL)
        if args.user:
            users = [bench_mount_cost.User(args.user, py,
                                           work / "mountcost" / f"user-{args.user}", [])
                     for py in args.user_python]
            if args.user_floor:
                users.append(bench_mount_cost.User(
                    args.user, args.user_python[0],
                    work / "mountcost" / f"user-{args.user}-floor", [],
                    floor=args.user_floor.resolve()))
            text, user_ok = bench_mount_cost.root_and_user(res, work / "mountcost", cfg.reps,
                                                           rows, False, users,
                                                           store_small=small)
            both = "\n" + text
        else:
            rec: dict[str, Any] = {}
            bench_mount_cost.bench_mount_cost(res, work / "mountcost", cfg.reps, rows,
                                              count=False, record=rec, store_small=small)
            both = ("\nWhat the timed daemon spent per mount-cost row "
                    f"({bench_mount_cost.DAEMON_COST_NOTE}):\n\n"
                    + bench_mount_cost.daemon_table(rec.get("rows", {})) + "\n")
    peak_label, peak = max(res.hwm.items(), key=lambda kv: kv[1])
    res.add(Row(f"daemon peak RSS (VmHWM, max over {len(res.hwm)} daemons: {peak_label})",
                f"{peak / MB:.0f} MB", "-", None, "<= 200 MB", peak <= 200 * MB))
    load1 = os.getloadavg()
    total = time.perf_counter() - started
    command = " ".join([Path(sys.executable).as_posix(), "scripts/bench.py",
                        *(argv if argv is not None else sys.argv[1:])])
    logical = sum(manifest["sizes"].values())
    header = [
        f"command: `{command}`",
        f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; total {total:.0f} s",
        f"store: {len(manifest['sizes'])} rollouts, {logical / MB:.0f} MB "
        f"(small: {cfg.small}, big: {', '.join(cfg.big)}; seed {cfg.seed}); medians of "
        f"{cfg.reps} runs; cold = drop_caches + a fresh daemon",
        f"machine: {versions()}",
        f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}",
        "daemon peak RSS per phase: " + ", ".join(f"{k} {v / MB:.0f} MB"
                                                  for k, v in res.hwm.items()),
        *res.notes,
    ]
    text = "\n".join(f"- {h}" for h in header) + "\n\n" + res.table() + "\n" + both
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if user_ok and all(r.ok is not False for r in res.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
