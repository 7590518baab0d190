#!/usr/bin/env python3
"""What the mount costs everyday tools: each workload through a zstfs mount of a plain
directory vs the same on the plain disk, interleaved, medians and ratios against their goals.

Rows: sqlite3 WAL with 10,000 single-statement inserts; `git status` on a clean tree; `git clone`
of a local repository (file://, so both sides copy a pack); `tar -x`, `diff -r` and `rm -rf` of a
few thousand files; and, when the Codex CLI is installed (scripts/install-codex.sh), `codex exec`
and `codex exec resume` of a session that is compressed in the store (baseline: the same resume of
a plain session on disk), both against the loopback mock model of the codex tests' harness.

With `--count` (default on) every row is first run once on a mount started with
`ZSTFS_OPSTATS=1`, and the FUSE requests it caused are reported by type, with the time spent in
the daemon's handlers and the daemon's CPU time per request. Timed runs use a mount without the
counters.

With `--user NAME --user-python PATH` (as root) every row runs twice, as root and as that
ordinary user (their daemon and their workload: `setpriv`, their HOME, a workdir of theirs under
`--workdir`, this checkout's zstfs and scripts copied into it, PATH their zstfs venv's python,
whose pyfuse3 the daemon uses), and one table puts the two side by side. `--user-python` may be
repeated (e.g. venvs with stock pyfuse3, and zstfs's against libfuse 3.14 and 3.17): a column
each, the order of the sides rotating row by row. /dev/fuse is made mode 0666 for each of the
user's runs if it is not, and put back after.

Usage::

    python scripts/bench_mount_cost.py [--reps N] [--rows a,b] [--workdir DIR] [--markdown FILE]
                                       [--user NAME --user-python PATH] [--json FILE]

`scripts/bench.py --only mountcost` runs the same rows into bench.py's table (`--user` too).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
from benchlib import fuse_device_open, run, umount_under

REPO = Path(__file__).resolve().parent.parent
#: The mock model server and codex runner of the codex tests, loaded from its file.
CODEX_HARNESS = REPO / "tests" / "harness" / "codex.py"

# The daemons run this checkout's zstfs.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

#: Trees of a few thousand files for tar / diff / rm / git (whichever exist; system files).
TREE_SOURCES = ["/usr/lib/python3.11", "/usr/share/perl", "/usr/lib/python3/dist-packages"]
INSERTS = 10_000

#: The codex rows' CODEX_HOME is BASE/codex, not the mount root, where codex's own patterns
#: (zstfs's default) would look: every mount and `zstfs compress` here also takes them one
#: directory down, so the sessions to resume really are compressed.
PATTERNS = ("sessions/**/rollout-*.jsonl", "archived_sessions/**/rollout-*.jsonl",
            "*/sessions/**/rollout-*.jsonl", "*/archived_sessions/**/rollout-*.jsonl")
PATTERN_ARGS = tuple(a for p in PATTERNS for a in ("--pattern", p))

GOALS = {"sqlite": 1.5, "sqlite-normal": None, "git-status": 2.0, "git-clone": None,
         "tar": 2.0, "diff": 3.0, "rm": 2.0, "codex-exec": 1.05, "codex-resume": 1.10}
#: The daemon's CPU time per timed run through the mount, at most (seconds).
CPU_GOALS = {"codex-exec": 0.030}
#: The daemon's peak RSS in any row, at most (bytes).
RSS_GOAL = 200_000_000


@dataclass
class Workload:
    name: str
    what: str
    prepare: Callable[[Path, int], None]  # untimed, before each run
    timed: Callable[[Path, int], float]


class Fixtures:
    def __init__(self, work: Path) -> None:
        self.work = work
        fix = work / "fixtures"
        self.tree, self.tar, self.repo, self.sql = (fix / "tree", fix / "tree.tar",
                                                    fix / "repo.git", fix / "inserts.sql")
        if not self.sql.exists():
            shutil.rmtree(fix, ignore_errors=True)
            fix.mkdir(parents=True)
            self.tree.mkdir()
            for src in TREE_SOURCES:
                if os.path.isdir(src):
                    subprocess.run(["cp", "-a", src, str(self.tree / Path(src).name)], check=True)
            subprocess.run(["tar", "-cf", str(self.tar), "-C", str(self.tree), "."], check=True)
            src_repo = fix / "repo-src"
            subprocess.run(["cp", "-a", str(self.tree), str(src_repo)], check=True)
            git = ["git", "-c", "user.name=b", "-c", "user.email=b@b", "-C", str(src_repo)]
            subprocess.run([*git, "init", "-q"], check=True)
            subprocess.run([*git, "add", "-A", "-f"], check=True)
            subprocess.run([*git, "commit", "-q", "-m", "tree"], check=True)
            subprocess.run(["git", "clone", "-q", "--bare", str(src_repo), str(self.repo)],
                           check=True)
            shutil.rmtree(src_repo)
            lines = ["PRAGMA journal_mode=WAL;",
                     "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"]
            lines += [f"INSERT INTO t(v) VALUES('row {i} {'x' * 60}');" for i in range(INSERTS)]
            self.sql.write_text("\n".join(lines) + "\n")
        self.files = sum(len(f) for _, _, f in os.walk(self.tree))
        self.dirs = sum(1 for _ in os.walk(self.tree))
        self.bytes = self.tar.stat().st_size


@functools.cache
def load_codex_harness() -> types.ModuleType:
    """The tests' codex harness (stdlib only), loaded from its file (tests are not a package)."""
    spec = importlib.util.spec_from_file_location("codex_harness", CODEX_HARNESS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def workloads(fx: Fixtures, codex: Codex | None) -> list[Workload]:
    def fresh(p: Path) -> None:
        shutil.rmtree(p, ignore_errors=True)

    def sqlite_prep(base: Path, i: int) -> None:
        fresh(base / "sq")
        (base / "sq").mkdir()

    def sqlite_run(base: Path, i: int) -> float:
        return run(["sqlite3", str(base / "sq" / "db.sqlite")], stdin=fx.sql.read_bytes())

    def sqlite_normal_run(base: Path, i: int) -> float:
        sql = fx.sql.read_bytes().replace(b"PRAGMA journal_mode=WAL;",
                                          b"PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        return run(["sqlite3", str(base / "sq" / "db.sqlite")], stdin=sql)

    def status_prep(base: Path, i: int) -> None:
        if not (base / "gs" / ".git").is_dir():
            run(["git", "clone", "-q", f"file://{fx.repo}", str(base / "gs")])
        run(["git", "-C", str(base / "gs"), "status", "--porcelain"])  # index refreshed, warm

    def status_run(base: Path, i: int) -> float:
        return run(["git", "-C", str(base / "gs"), "status", "--porcelain"])

    def clone_prep(base: Path, i: int) -> None:
        fresh(base / "clone")

    def clone_run(base: Path, i: int) -> float:
        return run(["git", "clone", "-q", f"file://{fx.repo}", str(base / "clone")])

    def tar_prep(base: Path, i: int) -> None:
        fresh(base / "x")
        (base / "x").mkdir()

    def tar_run(base: Path, i: int) -> float:
        return run(["tar", "-xf", str(fx.tar), "-C", str(base / "x")])

    def diff_prep(base: Path, i: int) -> None:
        for d in ("dx", "dy"):
            if not (base / d).is_dir():
                (base / d).mkdir()
                run(["tar", "-xf", str(fx.tar), "-C", str(base / d)])

    def diff_run(base: Path, i: int) -> float:
        return run(["diff", "-r", "--no-dereference", str(base / "dx"), str(base / "dy")])

    def rm_prep(base: Path, i: int) -> None:
        fresh(base / "r")
        (base / "r").mkdir()
        run(["tar", "-xf", str(fx.tar), "-C", str(base / "r")])

    def rm_run(base: Path, i: int) -> float:
        return run(["rm", "-rf", str(base / "r")])

    tree = f"{fx.files} files, {fx.dirs} dirs, {fx.bytes / 1e6:.0f} MB"
    rows = [
        Workload("sqlite", f"sqlite3 WAL, {INSERTS:,} single-statement inserts", sqlite_prep,
                 sqlite_run),
        Workload("sqlite-normal", "the same with `synchronous=NORMAL` (no fsync per commit)",
                 sqlite_prep, sqlite_normal_run),
        Workload("git-status", f"`git status`, clean tree ({fx.files} files)", status_prep,
                 status_run),
        Workload("git-clone", f"`git clone file://` ({fx.files} files)", clone_prep, clone_run),
        Workload("tar", f"`tar -x` ({tree})", tar_prep, tar_run),
        Workload("diff", "`diff -r` of two such trees", diff_prep, diff_run),
        Workload("rm", "`rm -rf` of one such tree", rm_prep, rm_run),
    ]
    if codex is not None:
        rows += [Workload("codex-exec", "`codex exec` (mock model)", codex.exec_prep,
                          codex.exec_run),
                 Workload("codex-resume", "`codex exec resume` of a compressed session "
                          "(baseline: plain session on disk)", codex.resume_prep,
                          codex.resume_run)]
    return rows


class Codex:
    """The real Codex CLI against the loopback mock; CODEX_HOME is BASE/codex."""

    def __init__(self, work: Path, binary: Path, server: Any) -> None:
        self.h = load_codex_harness()
        self.binary, self.server = binary, server
        self.cwd = work / "codex-cwd"
        self.cwd.mkdir(exist_ok=True)
        self.sessions: dict[Path, list[str]] = {}

    def home(self, base: Path) -> Path:
        return base / "codex"

    def setup(self, base: Path, sessions: int) -> None:
        """Before mounting: a CODEX_HOME with `sessions` finished sessions to resume."""
        home = self.home(base)
        shutil.rmtree(home, ignore_errors=True)
        self.h.write_config(home, self.server.base_url)
        ids = []
        for k in range(sessions):
            self.h.run_codex(home, ["exec", "--skip-git-repo-check", f"setup {k}"], cwd=self.cwd,
                             codex=self.binary)
        for p in self.h.rollouts(home):
            ids.append(self.h.session_id_from_rollout(p))
        self.sessions[base] = ids

    def exec_prep(self, base: Path, i: int) -> None:
        pass

    def exec_run(self, base: Path, i: int) -> float:
        t0 = time.perf_counter()
        self.h.run_codex(self.home(base), ["exec", "--skip-git-repo-check", f"hello {i}"],
                         cwd=self.cwd, codex=self.binary)
        return time.perf_counter() - t0

    def resume_prep(self, base: Path, i: int) -> None:
        pass

    def resume_run(self, base: Path, i: int) -> float:
        sid = self.sessions[base].pop()
        t0 = time.perf_counter()
        self.h.run_codex(self.home(base), ["exec", "--skip-git-repo-check", "resume", sid,
                                           f"again {i}"], cwd=self.cwd, codex=self.binary)
        return time.perf_counter() - t0


class DaemonCost:
    """What the timed daemon spends on one row: its CPU time in each timed run through the mount
    (utime+stime before and after: the workload's requests and whatever they set off), and its
    peak RSS over the row's runs (VmHWM, reset when the row starts)."""

    def __init__(self, d: benchlib.Daemon | None) -> None:
        self.d = d
        self.cpu: list[float] = []
        self.peak = 0
        #: False: clear_refs was refused, the peak is since the daemon started.
        self.reset = d is not None and benchlib.reset_peak_rss(d.pid)
        self._t0: float | None = None

    def before_run(self) -> None:
        self._t0 = benchlib.cpu_seconds(self.d.pid) if self.d is not None else None

    def after_run(self) -> None:
        if self.d is None or self._t0 is None:
            return
        t1 = benchlib.cpu_seconds(self.d.pid)
        if t1 is not None:
            self.cpu.append(t1 - self._t0)

    def read_peak(self) -> None:
        """At the row's end (and before a daemon of the row goes away)."""
        if self.d is not None and (hwm := benchlib.vm_hwm(self.d.pid)):
            self.peak = max(self.peak, hwm)

    def record(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "peak_rss": self.peak or None, "peak_reset": self.reset}

    def goal_row(self, res: benchlib.Results, w: Workload) -> None:
        """A result row for a daemon CPU goal (per `codex exec`)."""
        goal = CPU_GOALS.get(w.name)
        if goal is None or not self.cpu:
            return
        t = benchlib.median(self.cpu)
        res.add(benchlib.Row(f"daemon CPU per run: {w.what}", f"{t * 1000:.0f} ms", "-", None,
                             f"<= {goal * 1000:.0f} ms", t <= goal))


DAEMON_COST_NOTE = (
    "daemon CPU/run: the timed daemon's utime+stime over each timed run through the mount, median "
    "(the kernel counts 10 ms ticks); daemon peak RSS: its VmHWM over the row's timed runs (reset "
    f"when the row starts); goals: CPU <= {CPU_GOALS['codex-exec'] * 1000:.0f} ms per `codex "
    f"exec`, peak RSS <= {RSS_GOAL / 1e6:.0f} MB in every row")


def cpu_cell(rec: dict[str, Any], name: str) -> str:
    """The daemon's median CPU per timed mount run of a row, in ms; MISS against its goal."""
    cpu = rec.get("cpu") or []
    if not cpu:
        return "n/a"
    t = benchlib.median(cpu)
    goal = CPU_GOALS.get(name)
    return f"{t * 1000:.0f} ms" + (" MISS" if goal is not None and t > goal else "")


def rss_cell(rec: dict[str, Any]) -> str:
    """The daemon's peak RSS over a row's timed runs; MISS over RSS_GOAL."""
    peak = rec.get("peak_rss")
    if not peak:
        return "n/a"
    since = "" if rec.get("peak_reset") else " (since start)"
    return f"{peak / 1e6:.0f} MB{since}" + (" MISS" if peak > RSS_GOAL else "")


def daemon_table(rows: dict[str, dict[str, Any]]) -> str:
    """Per row, what the timed daemon spent: CPU per run (median; the kernel counts in 10 ms
    ticks) and peak RSS, against the goals."""
    lines = ["| row | daemon CPU per mount run (median) | daemon peak RSS | goals |",
             "|---|---:|---:|---|"]
    for name, rec in rows.items():
        goal = CPU_GOALS.get(name)
        goals = (f"CPU <= {goal * 1000:.0f} ms, " if goal is not None else "") + \
            f"RSS <= {RSS_GOAL / 1e6:.0f} MB"
        lines.append(f"| {name} | {cpu_cell(rec, name)} | {rss_cell(rec)} | {goals} |")
    return "\n".join(lines)


def diff_requests(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("count", "errors", "ns"):
        c = collections.Counter(b[key])
        c.subtract(a[key])
        out[key] = {k: v for k, v in c.items() if v}
    out["cpu_s"] = b["cpu_s"] - a["cpu_s"]
    return out


def settle_status(d: benchlib.Daemon) -> dict[str, Any]:
    time.sleep(1.1)  # the status document is cached for a second
    st = d.status()
    if st is None or "requests" not in st:
        raise RuntimeError("the daemon does not count requests (ZSTFS_OPSTATS)")
    return st["requests"]


def request_table(counts: dict[str, dict[str, Any]], rows: list[Workload]) -> str:
    lines = ["| row | requests | by type (handler µs each) | errors / negative | handler µs/req | "
             "daemon CPU µs/req |",
             "|---|---:|---|---|---:|---:|"]
    for w in rows:
        if w.name not in counts:
            continue
        c = counts[w.name]
        cnt = dict(c["count"])
        cnt = {k: v for k, v in cnt.items() if v}
        total = sum(cnt.values())
        by = ", ".join(f"{k} {v} ({max(c['ns'].get(k, 0), 0) / 1000 / v:.0f} µs)"
                       for k, v in sorted(cnt.items(), key=lambda kv: -kv[1]) if v > 0)
        errs = ", ".join(f"{k} {v}" for k, v in sorted(c["errors"].items(),
                                                        key=lambda kv: -kv[1]))
        ns = sum(c["ns"].values())
        lines.append(f"| {w.name} | {total} | {by} | {errs or '-'} | "
                     f"{ns / 1000 / max(total, 1):.0f} | "
                     f"{c['cpu_s'] * 1e6 / max(total, 1):.0f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def other_mount(kind: str, src: Path, mnt: Path) -> Iterator[None]:
    """An experiment's baseline: another FUSE daemon serving `src` on `mnt` (no zstfs)."""
    if kind != "fuse-overlayfs":
        raise ValueError(kind)
    low, wk = src.parent / "ovl-lower", src.parent / "ovl-work"
    for d in (low, wk, mnt):
        d.mkdir(exist_ok=True)
    proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o",
                             f"lowerdir={low},upperdir={src},workdir={wk}", str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fuse-overlayfs did not mount")
            time.sleep(0.05)
        yield
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(timeout=60)


def bench_mount_cost(res: benchlib.Results, work: Path, reps: int, only: set[str] | None = None,
                     count: bool = True, mounter: str = "zstfs",
                     record: dict[str, Any] | None = None,
                     zstfs: Sequence[str] = benchlib.ZSTFS) -> dict[str, dict[str, Any]]:
    """Run the rows into `res`; returns the request counts per row (empty without `count`).
    `record`, if given, gets each row's run times (`rows`) and what the timed daemon reported
    about its pyfuse3 (`daemon`); `zstfs` is the command that runs zstfs."""
    work.mkdir(parents=True, exist_ok=True)
    fx = Fixtures(work)
    disk, src, mnt = work / "disk", work / "src", work / "mnt"
    codex = None
    server = None
    want_codex = only is None or bool({"codex-exec", "codex-resume"} & only)
    if want_codex:
        codex_harness = load_codex_harness()

        binary = codex_harness.find_codex()
        if binary is None:
            res.notes.append("codex rows skipped: run scripts/install-codex.sh "
                             "(or set ZSTFS_CODEX_DIR)")
        else:
            server = codex_harness.MockResponsesServer().start()
            codex = Codex(work, binary, server)
    rows = [w for w in workloads(fx, codex) if only is None or w.name in only]
    counts: dict[str, dict[str, Any]] = {}
    try:
        for base in (disk, src):
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
        if codex is not None and mounter != "zstfs":
            raise RuntimeError("the codex rows need zstfs (they resume compressed sessions)")
        if codex is not None:
            # Sessions to resume, made through a mount (codex records their paths), then
            # compressed offline: what a store looks like after `--compress-after`.
            resumes = 2 * reps + 2 if any(w.name == "codex-resume" for w in rows) else 0
            codex.setup(disk, resumes)
            with benchlib.mounted(res, "mount cost (codex sessions)", src, mnt, *PATTERN_ARGS,
                                  zstfs=zstfs):
                codex.setup(mnt, resumes)
            run([*zstfs, "compress", "--older-than", "0", *PATTERN_ARGS, str(src)])
            stored = list((src / "codex").rglob("rollout-*.jsonl.zst"))
            if len(stored) < resumes:
                raise RuntimeError(f"{len(stored)} compressed sessions in {src / 'codex'}, "
                                   f"expected {resumes}")
        if count:
            os.environ["ZSTFS_OPSTATS"] = "1"
            try:
                with benchlib.mounted(res, "mount cost (counting)", src, mnt, *PATTERN_ARGS,
                                      zstfs=zstfs) as d:
                    settle_status(d)
                    idle = diff_requests(settle_status(d), settle_status(d))
                    for w in rows:
                        w.prepare(mnt, -1)
                        before = settle_status(d)
                        w.timed(mnt, -1)
                        c = diff_requests(before, settle_status(d))
                        for key in ("count", "ns"):  # minus the status reads themselves
                            for k, v in idle[key].items():
                                c[key][k] = c[key].get(k, 0) - v
                        c["cpu_s"] -= idle["cpu_s"]
                        counts[w.name] = c
                        print(f"  {w.name}: {sum(c['count'].values())} requests {c['errors']} "
                              f"{counts[w.name]['count']}", flush=True)
            finally:
                del os.environ["ZSTFS_OPSTATS"]
        timed_mount = (benchlib.mounted(res, "mount cost", src, mnt, *PATTERN_ARGS, zstfs=zstfs)
                       if mounter == "zstfs" else other_mount(mounter, src, mnt))
        with timed_mount as d:
            for w in rows:
                times: dict[Path, list[float]] = {disk: [], mnt: []}
                cost = DaemonCost(d)
                for i in range(reps):
                    for base in ((disk, mnt) if i % 2 == 0 else (mnt, disk)):
                        w.prepare(base, i)
                        if base == mnt:
                            cost.before_run()
                        times[base].append(w.timed(base, i))
                        if base == mnt:
                            cost.after_run()
                cost.read_peak()
                benchlib.ratio_row(res, w.what, times[mnt], times[disk], "disk", GOALS[w.name])
                cost.goal_row(res, w)
                if record is not None:
                    record.setdefault("rows", {})[w.name] = {
                        "what": w.what, "mount": times[mnt], "disk": times[disk],
                        **cost.record()}
            if record is not None and d is not None:
                time.sleep(1.1)  # the status document is cached for a second
                st = d.status() or {}
                record["daemon"] = {k: st.get(k) for k in ("pyfuse3_patches", "passthrough",
                                                           "passthrough_opens")}
    finally:
        if server is not None:
            server.stop()
    return counts


# --------------------------------------------------------------------------------------------
# The same rows as an ordinary user

#: What a run as the user needs of this checkout, copied into their workdir.
STAGED = ("zstfs", "scripts", "tests/harness/codex.py")


class User:
    """An ordinary user who runs the rows too: their daemon and their workload, from their venv
    (`--user-python`), with this checkout's zstfs and scripts copied where they can read them."""

    def __init__(self, name: str, python: Path, work: Path, sets: list[str]) -> None:
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid, self.home = name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir)
        self.python, self.work, self.sets = python, work, sets
        self.stage = work / "checkout"

    def argv(self, *cmd: str, env: dict[str, str] | None = None) -> list[str]:
        """`cmd` as the user (uid, gid, groups), in a clean environment with their HOME."""
        return benchlib.as_user(self.uid, self.gid, self.name, self.home, *cmd, env=env)

    def can(self, *test: str) -> bool:
        """`test ARGS` as the user (what they can read, write, run)."""
        return subprocess.run(self.argv("test", *test), capture_output=True).returncode == 0

    def prepare(self) -> None:
        """Their workdir (theirs), with a copy of this checkout's zstfs, scripts and harness."""
        self.work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.stage, ignore_errors=True)
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        for rel in STAGED:
            src, dst = REPO / rel, self.stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=skip)
            else:
                shutil.copy2(src, dst)
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(self.work)], check=True)
        if not self.can("-x", str(self.python)):
            raise RuntimeError(f"{self.python} is not executable by {self.name}")

    def run_row(self, name: str, reps: int, count: bool,
                codex_dir: Path | None) -> dict[str, Any]:
        """One row as the user (a child bench_mount_cost.py); its --json document."""
        out = self.work / f"result-{name}.json"
        out.unlink(missing_ok=True)
        cmd = [str(self.python), str(self.stage / "scripts" / "bench_mount_cost.py"),
               "--reps", str(reps), "--rows", name, "--workdir", str(self.work),
               "--json", str(out), *([] if count else ["--no-count"])]
        for a in self.sets:
            cmd += ["--set", a]
        env = {"ZSTFS_CODEX_DIR": str(codex_dir)} if codex_dir is not None else {}
        print(f"  as {self.name}: {name}", flush=True)
        with fuse_device_open():
            r = subprocess.run(self.argv(*cmd, env=env), cwd=self.work)
        umount_under(self.work)  # a child that failed may leave its mount behind
        if not out.exists():
            return {"error": f"exited {r.returncode} without results (daemon log: "
                             f"{self.work / 'mnt.log'})"}
        doc: dict[str, Any] = json.loads(out.read_text())
        if r.returncode != 0:
            doc["error"] = f"exited {r.returncode}"
        return doc


def total_requests(counts: dict[str, Any] | None) -> str:
    return str(sum(counts["count"].values())) if counts else "-"


def describe_daemons(who: str, daemons: list[dict[str, Any]]) -> str:
    """What the timed daemons (one per row) said about their pyfuse3 and passthrough."""
    if not daemons:
        return f"{who}: no timed daemon"
    patches = {", ".join(d.get("pyfuse3_patches") or []) or "none (stock pyfuse3)"
               for d in daemons}
    on = {bool(d.get("passthrough")) for d in daemons}
    opens = sum(d.get("passthrough_opens") or 0 for d in daemons)
    return (f"{who}: pyfuse3 patches {' | '.join(sorted(patches))}; passthrough "
            f"{' | '.join('on' if x else 'off' for x in sorted(on))} ({opens} passthrough opens "
            "in the timed runs)")


def pyfuse3_label(doc: dict[str, Any]) -> str:
    """"patched, libfuse 3.14.0" (zstfs's pyfuse3) or "stock, ..." from a --json document."""
    f = doc.get("pyfuse3") or {}
    return f"{'patched' if f.get('patches') else 'stock'}, libfuse {f.get('libfuse') or '?'}"


def side_by_side(names: list[str], sides: list[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """workload | disk | root | ratio | ordinary user | ratio | ... | requests, daemon CPU per
    mount run and daemon peak RSS, root / user ...; `sides`: (label, {row: that side's --json
    document}), root first."""
    med, secs = benchlib.median, benchlib.secs
    who = " / ".join(lbl.split(" (")[0] for lbl, _ in sides)
    lines = ["| workload | disk (each side, in column order) | "
             + " | ".join(f"{lbl} | ratio" for lbl, _ in sides)
             + f" | requests ({who}) | daemon CPU/run ({who}) | daemon peak RSS ({who}) |",
             "|---|" + "---:|" * (2 * len(sides) + 4)]
    for n in names:
        got = [docs.get(n, {}).get("rows", {}).get(n) for _, docs in sides]
        if not any(got):
            continue
        what = next(x for x in got if x)["what"]
        disk = " / ".join(secs(med(x["disk"])) if x else "n/a" for x in got)
        cells = []
        for x in got:
            cells += ([secs(med(x["mount"])), f"{med(x['mount']) / med(x['disk']):.2f}x"]
                      if x else ["n/a", "n/a"])
        reqs = " / ".join(total_requests(docs.get(n, {}).get("counts", {}).get(n))
                          for _, docs in sides)
        cpu = " / ".join(cpu_cell(x, n) if x else "n/a" for x in got)
        rss = " / ".join(rss_cell(x) if x else "n/a" for x in got)
        lines.append(f"| {what} | {disk} | {' | '.join(cells)} | {reqs} | {cpu} | {rss} |")
    return "\n".join(lines)


def root_and_user(res: benchlib.Results, work: Path, reps: int, only: set[str] | None,
                  count: bool, users: list[User],
                  zstfs: Sequence[str] = benchlib.ZSTFS) -> tuple[str, bool]:
    """Each row as root (into `res`) and as each of `users` (one user, a venv each; which side
    goes first rotates row by row); the side-by-side table with its notes, and whether every
    user row that could run did."""
    codex_harness = load_codex_harness()

    names = [n for n in GOALS if only is None or n in only]
    name = users[0].name
    codex_dir = None
    skips: dict[str, str] = {}
    codex_rows = [n for n in names if n.startswith("codex")]
    binary = codex_harness.find_codex() if codex_rows else None
    if codex_rows and binary is None:
        res.notes.append("codex rows skipped: run scripts/install-codex.sh "
                         "(or set ZSTFS_CODEX_DIR)")
        names = [n for n in names if n not in codex_rows]
    elif binary is not None:
        if users[0].can("-x", str(binary)):
            codex_dir = codex_harness.codex_dir().resolve()
        else:
            skips = {n: f"{binary} is not executable by {name}" for n in codex_rows}
    for u in users:
        u.prepare()
    root: dict[str, dict[str, Any]] = {}
    root_daemons: list[dict[str, Any]] = []
    by_user: list[dict[str, dict[str, Any]]] = [{} for _ in users]
    sides = len(users) + 1
    for k, n in enumerate(names):
        for side in (k + j for j in range(sides)):
            side %= sides
            if side == 0:
                rec: dict[str, Any] = {}
                rec["counts"] = bench_mount_cost(res, work, reps, {n}, count, record=rec,
                                                 zstfs=zstfs)
                root_daemons.append(rec.pop("daemon", {}))
                root[n] = rec
            elif n in skips:
                by_user[side - 1][n] = {"error": skips[n]}
            else:
                by_user[side - 1][n] = users[side - 1].run_row(n, reps, count, codex_dir)
    labels = []
    notes = [describe_daemons("root's daemons", root_daemons), DAEMON_COST_NOTE]
    for u, docs in zip(users, by_user, strict=True):
        ran = [d for d in docs.values() if "rows" in d]
        label = f"user ({pyfuse3_label(ran[-1])})" if ran else str(u.python)
        labels.append(label)
        notes.append(describe_daemons(f"{name}'s daemons, {u.python}",
                                      [d["daemon"] for d in ran if d.get("daemon")]))
        if ran:
            notes.append(f"{label}: {name}, {ran[-1]['versions']}")
        notes += sorted({f"{name}: {x}" for d in docs.values() for x in d.get("notes", [])})
    missing = [(n, u, d["error"]) for u, docs in zip(users, by_user, strict=True)
               for n, d in docs.items() if n not in d.get("rows", {})]
    notes += [f"{n} as {name} ({u.python}): n/a ({why})" for n, u, why in missing]
    text = (f"Root and the ordinary user {name}, row by row (which side goes first rotates), "
            f"medians of {reps}; each ratio is against that side's own interleaved disk runs:"
            "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n\n"
            + side_by_side(names, [("root", root), *zip(labels, by_user, strict=True)])
            + "\n")
    rows = [Workload(n, n, lambda b, i: None, lambda b, i: 0.0) for n in GOALS]
    for who, docs in (("root", root), *zip(labels, by_user, strict=True)):
        counts = {n: d["counts"][n] for n, d in docs.items() if n in d.get("counts", {})}
        if counts:
            text += (f"\nFUSE requests of one run per row, as {who}:\n\n"
                     + request_table(counts, rows) + "\n")
    return text, all(n in skips for n, _, _ in missing)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", help="comma list of: sqlite,sqlite-normal,git-status,git-clone,"
                                   "tar,diff,rm,codex-exec,codex-resume")
    ap.add_argument("--no-count", action="store_true", help="skip the request-counting pass")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/zstfs-mountcost"))
    ap.add_argument("--markdown", type=Path, metavar="FILE")
    ap.add_argument("--python", metavar="PY",
                    help="experiment: run the daemons with this interpreter (e.g. a venv with a "
                         "patched pyfuse3)")
    ap.add_argument("--set", action="append", default=[], metavar="ATTR=PYVALUE",
                    help="experiment: set an Operations class attribute in the daemons, e.g. "
                         "cache_readdir=True (needs a pyfuse3 that reads it)")
    ap.add_argument("--mounter", default="zstfs", choices=["zstfs", "fuse-overlayfs"],
                    help="experiment: time another FUSE daemon (a C one) instead of zstfs")
    ap.add_argument("--user", metavar="NAME",
                    help="as root: run every row as root and then as this ordinary user (their "
                         "daemon and workload), and print both side by side")
    ap.add_argument("--user-python", type=Path, metavar="PATH", action="append", default=[],
                    help="with --user: the python of that user's zstfs venv, e.g. "
                         "~NAME/.local/share/zstfs/venv/bin/python (its pyfuse3 is used); "
                         "repeat for a column per venv")
    ap.add_argument("--json", type=Path, metavar="FILE",
                    help="also write the run times, request counts and notes here")
    args = ap.parse_args(argv)
    if args.user and (os.geteuid() != 0 or not args.user_python or args.mounter != "zstfs"):
        ap.error("--user needs root, --user-python and the zstfs mounter")
    if args.python or args.set:
        sets = "".join(f"setattr(f.Operations, {k!r}, {v});"
                       for k, v in (a.split("=", 1) for a in args.set))
        zstfs = [args.python or sys.executable, "-c",
                 f"import sys; import zstfs.fs as f; {sets} "
                 "from zstfs.cli import main; sys.exit(main())"]
    else:
        zstfs = list(benchlib.ZSTFS)
    only = set(args.rows.split(",")) if args.rows else None
    res = benchlib.Results()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    count = not args.no_count and args.mounter == "zstfs"
    record: dict[str, Any] = {}
    both = ""
    user_ok = True
    if args.user:
        work = args.workdir.resolve()
        users = [User(args.user, py, work / f"user-{args.user}", args.set)
                 for py in args.user_python]
        both, user_ok = root_and_user(res, work, args.reps, only, count, users, zstfs)
        counts = {}
    else:
        counts = bench_mount_cost(res, args.workdir.resolve(), args.reps, only, count,
                                  args.mounter, record=record, zstfs=zstfs)
    load1 = os.getloadavg()
    header = [
        f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"total {time.perf_counter() - t0:.0f} s; medians of {args.reps} interleaved runs",
        f"machine: {benchlib.versions()}",
        f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}",
        f"daemons: {' '.join(zstfs) if args.mounter == 'zstfs' else args.mounter}",
        *res.notes,
    ]
    text = "\n".join(f"- {h}" for h in header) + "\n\n" + res.table() + "\n"
    if counts:
        rows = workloads(Fixtures(args.workdir.resolve()), None)
        rows += [Workload(n, n, lambda b, i: None, lambda b, i: 0.0)
                 for n in ("codex-exec", "codex-resume")]
        text += "\nFUSE requests of one run per row:\n\n" + request_table(counts, rows) + "\n"
    if record.get("rows"):
        text += (f"\nWhat the timed daemon spent per row ({DAEMON_COST_NOTE}):\n\n"
                 + daemon_table(record["rows"]) + "\n")
    if both:
        text += "\n" + both
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        import pyfuse3

        with open("/proc/self/maps") as f:
            libfuse = re.search(r"libfuse3\.so\.(\d[\d.]*)", f.read())
        args.json.write_text(json.dumps({
            **record, "counts": counts, "notes": res.notes, "versions": benchlib.versions(),
            "python": sys.executable, "uid": os.geteuid(),
            "pyfuse3": {"patches": list(getattr(pyfuse3, "ZSTFS_PATCHES", ())),
                        "libfuse": libfuse.group(1) if libfuse else None}}))
    return 0 if user_ok and all(r.ok is not False for r in res.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
