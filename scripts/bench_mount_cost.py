#!/usr/bin/env python3
"""What the mount costs everyday tools: each workload through a zstfs mount of a plain
directory vs the same on the plain disk, interleaved, medians and ratios against their goals.

Rows: sqlite3 WAL with 10,000 single-statement inserts; `git status` on a clean tree; `git clone`
of a local repository (file://, so both sides copy a pack); `tar -x`, `diff -r` and `rm -rf` of a
few thousand files; and, when the Codex CLI is installed (scripts/install-codex.sh), `codex exec`
and `codex exec resume` of a session that is compressed in the store (baseline: the same resume of
a plain session on disk), both against the loopback mock model of the codex tests' harness.

The store rows (`--rows store`) read and write a generated Codex store (scripts/gen_rollouts.py:
`--store-small N` rollouts, default 1000, and one of 150 MiB; seed 7; generated once per workdir):
plain on the disk side, compressed with `zstfs compress` in the mount's source on the other.
`grep -rc deprecated` of the store, `tail -n 1` of the big rollout, one line at a seeded random
offset of it (a 64 KiB pread, the same offsets on both sides), the first line of every rollout
under sessions/ (in-process, like a session picker) and `ls -lR sessions/` run cold: before each
run the page cache is dropped and, through the mount, the daemon restarted (untimed). Without
root (and without a root parent's socket, see below) they are reported n/a. 10,000 appends of
300 B to a new rollout with an fsync every 100 run warm. Each run's output must be the same on
both sides.

For every row the timed daemon's CPU time per run through the mount (utime+stime, median) and
its peak RSS over the row (VmHWM, reset when the row starts) are reported against the goals
(<= 30 ms per `codex exec`, <= 200 MB).

With `--count` (default on) every row is first run once on a mount started with
`ZSTFS_OPSTATS=1`, and the FUSE requests it caused are reported by type, with the time spent in
the daemon's handlers and the daemon's CPU time per request (cold rows cold here too). Timed runs
use a mount without the counters.

With `--user NAME --user-python PATH` (as root) every row runs twice, as root and as that
ordinary user (their daemon and their workload: `setpriv`, their HOME, a workdir of theirs under
`--workdir`, this checkout's zstfs and scripts copied into it, PATH their zstfs venv's python,
whose pyfuse3 the daemon uses), and one table puts the two side by side. `--user-python` may be
repeated (e.g. venvs with stock pyfuse3, and zstfs's against libfuse 3.14 and 3.17): a column
each, the order of the sides rotating row by row. /dev/fuse is made mode 0666 for each of the
user's runs if it is not, and put back after. The user cannot drop the page cache: root serves
their cold runs on a Unix socket in their workdir (benchlib.DropCachesServer), and copies root's
generated store to them.

The floor: `--user-floor PATH` adds a column in which the same user runs the rows through
libfuse's own C example, `passthrough_ll` (scripts/build-passthrough-ll.sh builds it against the
bundled libfuse 3.17, with KILLPRIV_V2), over the plain store: what any FUSE daemon on this
machine pays, with no Python and nothing decoded. `--mounter passthrough_ll --floor-binary PATH`
times it alone. Only `codex exec` of the codex rows runs there (a resume needs a compressed
session). Root's floor is libfuse's C++ example `passthrough_hp` with FUSE passthrough on, as
zstfs's root mount has it: `--mounter passthrough_hp --floor-binary PATH`
(scripts/build-passthrough-hp.sh builds it).

Usage::

    python scripts/bench_mount_cost.py [--reps N] [--rows a,b|store] [--store-small N]
                                       [--workdir DIR] [--markdown FILE]
                                       [--user NAME --user-python PATH [--user-floor PATH]]
                                       [--json FILE]

`scripts/bench.py --only mountcost` runs the same rows into bench.py's table (`--user` too,
`--mountcost-rows` to choose them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import hashlib
import importlib.util
import json
import os
import pwd
import random
import re
import shlex
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
         "tar": 2.0, "diff": 3.0, "rm": 2.0,
         "grep-r": 1.0, "tail-1": None, "random-line": None, "session-list": 2.0, "ls-lR": 2.0,
         "appends-fsync": 3.0,
         "codex-exec": 1.15, "codex-resume": 1.10}
FIXTURE_ROWS = ("sqlite", "sqlite-normal", "git-status", "git-clone", "tar", "diff", "rm")
#: appends-fsync last: the other rows read the store as generated.
STORE_ROWS = ("grep-r", "tail-1", "random-line", "session-list", "ls-lR", "appends-fsync")
CODEX_ROWS = ("codex-exec", "codex-resume")
#: Names that `--rows` takes for a set of rows.
ROW_SETS = {"store": STORE_ROWS, "codex": CODEX_ROWS, "fixtures": FIXTURE_ROWS}

#: The store rows' store (scripts/gen_rollouts.py): this many small rollouts by default
#: (--store-small), one big one, and the seed.
STORE_SMALL = 1000
STORE_BIG = 150 * 1024 * 1024
STORE_SEED = 7
STORE_GREP = "deprecated"
#: random-line: one pread of this size at a random offset (more if no whole line is in it).
READ_CHUNK = 64 * 1024
#: appends-fsync: this many appends of this size, an fsync every so many.
APPENDS, APPEND_BYTES, FSYNC_EVERY = 10_000, 300, 100
COLD_COUNT_NOTE = ("the request-counting pass runs the cold rows cold too (a fresh daemon, the "
                   "page cache dropped)")
#: Why a cold row cannot run.
COLD_NA = ("n/a: a cold run drops the page cache, which needs root or a root parent's socket "
           f"({benchlib.DROP_CACHES_ENV}, as `--user` gives its child)")
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
    #: Each run starts cold: the page cache dropped and, through the mount, a freshly started
    #: daemon (what a first `grep` or session list after a reboot or a fresh mount costs).
    cold: bool = False


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


def workloads(fx: Fixtures | None, codex: Codex | None, store: Store | None) -> list[Workload]:
    """The rows that can run with what was set up, in GOALS order."""
    return [*(fixture_workloads(fx) if fx is not None else []),
            *(store_workloads(store) if store is not None else []),
            *(codex_workloads(codex) if codex is not None else [])]


def fixture_workloads(fx: Fixtures) -> list[Workload]:
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
    return rows


def codex_workloads(codex: Codex) -> list[Workload]:
    return [Workload("codex-exec", "`codex exec` (mock model)", codex.exec_prep, codex.exec_run),
            Workload("codex-resume", "`codex exec resume` of a compressed session "
                     "(baseline: plain session on disk)", codex.resume_prep, codex.resume_run)]


class Store:
    """The store rows' Codex store: `small` rollouts of 50 KB-2 MB and one of 150 MiB
    (scripts/gen_rollouts.py, seed 7), generated once per workdir and kept plain in
    WORK/store-cache (its bytes depend on the Python that made them, so `--user` copies root's
    there rather than have the user's Python make another). Each run copies it to BASE/store on
    both sides; the mount side's copy is then compressed."""

    def __init__(self, work: Path, small: int) -> None:
        self.key = f"store-s{small}-b{STORE_BIG}-seed{STORE_SEED}"
        self.cache = work / "store-cache"
        self.plain = self.cache / self.key
        self.manifest = self.cache / f"{self.key}.json"
        if not (self.manifest.exists() and self.plain.is_dir()):
            self.generate(small)
        self.sizes: dict[str, int] = json.loads(self.manifest.read_text())
        self.big = max(self.sizes, key=self.sizes.__getitem__)
        self.sessions = sum(1 for rel in self.sizes if rel.startswith("sessions/"))

    def generate(self, small: int) -> None:
        import gen_rollouts  # beside this script

        shutil.rmtree(self.plain, ignore_errors=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = gen_rollouts.generate_store(self.plain, small=small, big_sizes=[STORE_BIG],
                                            seed=STORE_SEED)
        sizes = {str(p.relative_to(self.plain)): p.stat().st_size for p in paths}
        self.manifest.write_text(json.dumps(sizes))
        print(f"generated the store: {len(sizes)} rollouts, {sum(sizes.values()) / 1e6:.0f} MB, "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)

    def copy_to(self, dst: Path) -> None:
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["cp", "-a", str(self.plain), str(dst)], check=True)

    def copy_cache(self, work: Path) -> None:
        """Put this store in another workdir's cache (where Store(work, ...) finds it)."""
        cache = work / "store-cache"
        plain, manifest = cache / self.key, cache / self.manifest.name
        if manifest.exists() and plain.is_dir():
            return
        cache.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(plain, ignore_errors=True)
        subprocess.run(["cp", "-a", str(self.plain), str(plain)], check=True)
        shutil.copy2(self.manifest, manifest)  # last: a manifest means a whole copy

    def check_compressed(self, root: Path) -> None:
        """The mount side's copy holds every rollout as `.zst` and none plain."""
        zst = list(root.rglob("rollout-*.jsonl.zst"))
        plain = list(root.rglob("rollout-*.jsonl"))
        if len(zst) != len(self.sizes) or plain:
            raise RuntimeError(f"{root}: {len(zst)} compressed and {len(plain)} plain rollouts, "
                               f"expected {len(self.sizes)} compressed")


class Agreement:
    """The mount side of a run must produce what the disk side of the same run did (a fast
    wrong answer is no result): each row's runs report a digest of their output here."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], tuple[Path, str, int]] = {}

    def __call__(self, row: str, base: Path, i: int, out: bytes) -> None:
        digest = hashlib.sha256(out).hexdigest()
        prev = self.seen.get((row, i))
        if prev is not None and prev[0] != base and prev[1] != digest:
            raise RuntimeError(f"{row}, run {i}: {base} gave {len(out)} bytes of output, "
                               f"{prev[0]} {prev[2]} bytes that differ")
        self.seen[(row, i)] = (base, digest, len(out))


def first_whole_line(path: Path, offset: int) -> bytes:
    """What a reader jumping into a rollout does: pread READ_CHUNK at `offset`, skip to the
    first line start and take that line (reading on while it is longer than the chunk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray()
        while True:
            chunk = os.pread(fd, READ_CHUNK, offset + len(buf))
            buf += chunk
            start = buf.find(b"\n") + 1
            end = buf.find(b"\n", start) if start else -1
            if end >= 0:
                return bytes(buf[start:end + 1])
            if not chunk:
                return bytes(buf[start:]) if start else b""
    finally:
        os.close(fd)


def first_lines(sessions: Path) -> bytes:
    """What a session picker reads: the first line of every rollout under `sessions`, walked in
    sorted order (open, readline, close)."""
    out = []
    for d, dirs, files in os.walk(sessions):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("rollout-") and name.endswith(".jsonl"):
                with open(os.path.join(d, name), "rb") as f:
                    out.append(f.readline())
    return b"".join(out)


def append_line() -> bytes:
    """APPEND_BYTES of a rollout line (an event, JSON, newline-terminated)."""
    head = b'{"timestamp":"2026-07-07T00:00:00.000Z","type":"event_msg","payload":{"text":"'
    tail = b'"}}\n'
    return head + b"x" * (APPEND_BYTES - len(head) - len(tail)) + tail


def store_workloads(st: Store) -> list[Workload]:
    q = shlex.quote
    agree = Agreement()
    big_size = st.sizes[st.big]
    line = append_line()

    def store(base: Path) -> Path:
        return base / "store"

    def nothing(base: Path, i: int) -> None:
        pass

    def grep_run(base: Path, i: int) -> float:
        dt, out = benchlib.sh(f"grep -rc {STORE_GREP} {q(str(store(base)))}", ok_codes=(0, 1))
        prefix = os.fsencode(store(base))
        agree("grep-r", base, i, b"\n".join(sorted(out.replace(prefix, b"").splitlines())))
        return dt

    def tail_run(base: Path, i: int) -> float:
        dt, out = benchlib.sh(f"tail -n 1 {q(str(store(base) / st.big))}")
        agree("tail-1", base, i, out)
        return dt

    def in_process(row: str, base: Path, i: int, work: Callable[[], bytes]) -> float:
        """Time `work` in this process; its output must agree across sides and runs."""
        t0 = time.perf_counter()
        out = work()
        dt = time.perf_counter() - t0
        agree(row, base, i, out)
        return dt

    def random_line_run(base: Path, i: int) -> float:
        # The same offset on both sides of run i, another in each run.
        offset = random.Random(f"random-line {STORE_SEED} {i}").randrange(big_size - READ_CHUNK)
        return in_process("random-line", base, i,
                          lambda: first_whole_line(store(base) / st.big, offset))

    def session_list_run(base: Path, i: int) -> float:
        return in_process("session-list", base, i, lambda: first_lines(store(base) / "sessions"))

    def ls_run(base: Path, i: int) -> float:
        dt, out = benchlib.sh(f"ls -lR {q(str(store(base) / 'sessions'))} | wc -l")
        agree("ls-lR", base, i, out)
        return dt

    def appends_run(base: Path, i: int) -> float:
        path = store(base) / "sessions" / "rollout-bench-appends.jsonl"
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for k in range(1, APPENDS + 1):
                os.write(fd, line)
                if k % FSYNC_EVERY == 0:
                    os.fsync(fd)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
        size = path.stat().st_size
        path.unlink()  # the other rows see the store as generated
        if size != APPENDS * APPEND_BYTES:
            raise RuntimeError(f"{path}: {size} bytes, expected {APPENDS * APPEND_BYTES}")
        return dt

    mb = sum(st.sizes.values()) / 1e6
    big = f"{big_size / 1e6:.0f} MB"
    return [
        Workload("grep-r", f"`grep -rc {STORE_GREP}` over the store ({len(st.sizes)} rollouts, "
                 f"{mb:.0f} MB), cold", nothing, grep_run, cold=True),
        Workload("tail-1", f"`tail -n 1` of its {big} rollout, cold", nothing, tail_run,
                 cold=True),
        Workload("random-line", f"one line at a random offset of the {big} rollout (open, pread "
                 f"{READ_CHUNK // 1024} KiB), cold", nothing, random_line_run, cold=True),
        Workload("session-list", f"first line of each of the {st.sessions} rollouts under "
                 "sessions/ (Python, like a session picker), cold", nothing, session_list_run,
                 cold=True),
        Workload("ls-lR", "`ls -lR sessions/ | wc -l`, cold", nothing, ls_run, cold=True),
        Workload("appends-fsync", f"{APPENDS:,} appends of {APPEND_BYTES} B to a new rollout, "
                 f"fsync every {FSYNC_EVERY}", nothing, appends_run),
    ]


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
    (utime+stime before and after: the workload's requests and whatever they set off, not a
    cold run's restart), and its peak RSS over the row's runs (VmHWM, reset when the row starts;
    with restarts for cold runs, the max over the row's daemons)."""

    def __init__(self, d: benchlib.Daemon | OtherDaemon | None) -> None:
        self.d = d
        self.cpu: list[float] = []
        self.peak = 0
        #: False: clear_refs was refused, the peak is since the daemon started.
        self.reset = d is not None and benchlib.reset_peak_rss(d.pid)
        self._t0: float | None = None
        #: The current daemon served a run of this row (else its peak is an earlier row's).
        self.served = False

    def before_run(self) -> None:
        self._t0 = benchlib.cpu_seconds(self.d.pid) if self.d is not None else None

    def after_run(self) -> None:
        if self.d is None or self._t0 is None:
            return
        t1 = benchlib.cpu_seconds(self.d.pid)
        if t1 is not None:
            self.cpu.append(t1 - self._t0)
        self.served = True

    def read_peak(self) -> None:
        """At the row's end (and before a daemon of the row goes away)."""
        if self.d is not None and self.served and (hwm := benchlib.vm_hwm(self.d.pid)):
            self.peak = max(self.peak, hwm)

    def restart(self) -> None:
        """A fresh daemon for a cold run; the peak is the max over the row's daemons."""
        if self.d is not None:
            self.read_peak()
            self.d.restart()
            self.served = False

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
    f"exec`, peak RSS <= {RSS_GOAL / 1e6:.0f} MB in every row; several rows in one run share "
    "a timed daemon, so a row's peak includes what the daemon kept from the rows before (with "
    "--user each row has its own)")


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


def request_table(counts: dict[str, dict[str, Any]], names: Sequence[str] = tuple(GOALS)) -> str:
    lines = ["| row | requests | by type (handler µs each) | errors / negative | handler µs/req | "
             "daemon CPU µs/req |",
             "|---|---:|---|---|---:|---:|"]
    for name in names:
        if name not in counts:
            continue
        c = counts[name]
        cnt = dict(c["count"])
        cnt = {k: v for k, v in cnt.items() if v}
        total = sum(cnt.values())
        by = ", ".join(f"{k} {v} ({max(c['ns'].get(k, 0), 0) / 1000 / v:.0f} µs)"
                       for k, v in sorted(cnt.items(), key=lambda kv: -kv[1]) if v > 0)
        errs = ", ".join(f"{k} {v}" for k, v in sorted(c["errors"].items(),
                                                        key=lambda kv: -kv[1]))
        ns = sum(c["ns"].values())
        lines.append(f"| {name} | {total} | {by} | {errs or '-'} | "
                     f"{ns / 1000 / max(total, 1):.0f} | "
                     f"{c['cpu_s'] * 1e6 / max(total, 1):.0f} |")
    return "\n".join(lines)


#: The C daemons `--mounter` can time instead of zstfs.
OTHER_MOUNTERS = ("fuse-overlayfs", "passthrough_ll", "passthrough_hp")
#: The C daemons that need --floor-binary (built by scripts/build-passthrough-ll.sh and
#: scripts/build-passthrough-hp.sh).
FLOOR_MOUNTERS = ("passthrough_ll", "passthrough_hp")


class OtherDaemon:
    """A C daemon serving `src` on `mnt` (`argv` mounts it in the foreground), whose CPU and
    peak RSS are read as zstfs's are; restarted for each cold run as zstfs is (passthrough_ll
    keeps an `O_PATH` descriptor of every inode it was asked about, which would keep those
    inodes cached through a drop of the caches)."""

    def __init__(self, kind: str, argv: list[str], mnt: Path) -> None:
        self.kind, self.argv, self.mnt = kind, argv, mnt
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        proc = self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not mount")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            self.proc.wait(timeout=60)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def other_mount(kind: str, src: Path, mnt: Path,
                floor_binary: Path | None = None) -> Iterator[OtherDaemon]:
    """A baseline: another FUSE daemon serving `src` on `mnt` (no zstfs). `passthrough_ll`
    (`floor_binary`, built by scripts/build-passthrough-ll.sh) gets the options that match
    zstfs's mount: xattrs passed through, no writeback cache, entries and attributes cached 60 s;
    multi-threaded, as libfuse runs it by default."""
    mnt.mkdir(exist_ok=True)
    if kind == "fuse-overlayfs":
        low, wk = src.parent / "ovl-lower", src.parent / "ovl-work"
        for d in (low, wk):
            d.mkdir(exist_ok=True)
        argv = ["fuse-overlayfs", "-f", "-o", f"lowerdir={low},upperdir={src},workdir={wk}",
                str(mnt)]
    elif kind == "passthrough_ll" and floor_binary is not None:
        argv = [str(floor_binary), "-f", "-o",
                f"source={src},xattr,no_writeback,timeout=60", str(mnt)]
    elif kind == "passthrough_hp" and floor_binary is not None:
        # Its defaults: FUSE passthrough on (root only), entries and attributes cached.
        argv = [str(floor_binary), "--foreground", str(src), str(mnt)]
    else:
        raise ValueError(f"{kind} (passthrough_ll and passthrough_hp need --floor-binary)")
    d = OtherDaemon(kind, argv, mnt)
    try:
        d.start()
        yield d
    finally:
        d.stop()


def bench_mount_cost(res: benchlib.Results, work: Path, reps: int, only: set[str] | None = None,
                     count: bool = True, mounter: str = "zstfs",
                     record: dict[str, Any] | None = None,
                     zstfs: Sequence[str] = benchlib.ZSTFS,
                     store_small: int = STORE_SMALL,
                     floor_binary: Path | None = None) -> dict[str, dict[str, Any]]:
    """Run the rows into `res`; returns the request counts per row (empty without `count`).
    `record`, if given, gets each row's run times and daemon cost (`rows`), the rows that could
    not run and why (`skipped`) and what the timed daemon reported about its pyfuse3 (`daemon`);
    `zstfs` is the command that runs zstfs; `store_small` the store rows' number of small
    rollouts; `floor_binary` the C daemon of `mounter` passthrough_ll or passthrough_hp."""
    work.mkdir(parents=True, exist_ok=True)
    record = {} if record is None else record
    disk, src, mnt = work / "disk", work / "src", work / "mnt"

    def wanted(names: Sequence[str]) -> bool:
        return only is None or bool(set(names) & only)

    fx = Fixtures(work) if wanted(FIXTURE_ROWS) else None
    store = Store(work, store_small) if wanted(STORE_ROWS) else None
    codex = None
    server = None
    if wanted(CODEX_ROWS):
        codex_harness = load_codex_harness()

        binary = codex_harness.find_codex()
        if binary is None:
            res.notes.append("codex rows skipped: run scripts/install-codex.sh "
                             "(or set ZSTFS_CODEX_DIR)")
        else:
            server = codex_harness.MockResponsesServer().start()
            codex = Codex(work, binary, server)
    rows = [w for w in workloads(fx, codex, store) if only is None or w.name in only]
    if mounter != "zstfs" and any(w.name == "codex-resume" for w in rows):
        why = f"needs a compressed session, which {mounter} shows as a .zst"
        res.notes.append(f"codex-resume: n/a ({why})")
        record.setdefault("skipped", {})["codex-resume"] = why
        rows = [w for w in rows if w.name != "codex-resume"]
    if not benchlib.can_drop_caches():
        for w in rows:
            if w.cold:
                res.notes.append(f"{w.name}: {COLD_NA}")
                record.setdefault("skipped", {})[w.name] = COLD_NA
        rows = [w for w in rows if not w.cold]
    counts: dict[str, dict[str, Any]] = {}
    try:
        for base in (disk, src):
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
        resumes = 2 * reps + 2 if any(w.name == "codex-resume" for w in rows) else 0
        if codex is not None and mounter != "zstfs":
            codex.setup(disk, 0)
            codex.setup(src, 0)
        elif codex is not None:
            # Sessions to resume, made through a mount (codex records their paths), then
            # compressed offline: what a store looks like after `--compress-after`.
            codex.setup(disk, resumes)
            with benchlib.mounted(res, "mount cost (codex sessions)", src, mnt, *PATTERN_ARGS,
                                  zstfs=zstfs):
                codex.setup(mnt, resumes)
        if store is not None:
            store.copy_to(disk / "store")
            store.copy_to(src / "store")
        if mounter != "zstfs":
            if store is not None:
                res.notes.append(f"store rows: the mount side's store is plain ({mounter} "
                                 "shows .zst files as they are); cold runs drop the page cache "
                                 "and restart it, as they restart zstfs")
        elif codex is not None or store is not None:
            run([*zstfs, "compress", "--older-than", "0", *PATTERN_ARGS, str(src)])
            stored = list((src / "codex").rglob("rollout-*.jsonl.zst"))
            if len(stored) < resumes:
                raise RuntimeError(f"{len(stored)} compressed sessions in {src / 'codex'}, "
                                   f"expected {resumes}")
            if store is not None:
                store.check_compressed(src / "store")
        if count:
            counts = count_requests(res, rows, src, mnt, zstfs)
            if any(w.cold for w in rows) and COLD_COUNT_NOTE not in res.notes:
                res.notes.append(COLD_COUNT_NOTE)  # once, though --user calls this per row
        timed_mount = (benchlib.mounted(res, "mount cost", src, mnt, *PATTERN_ARGS, zstfs=zstfs)
                       if mounter == "zstfs" else other_mount(mounter, src, mnt, floor_binary))
        with timed_mount as d:
            for w in rows:
                time_row(res, w, reps, disk, mnt, d, record)
            if isinstance(d, benchlib.Daemon):
                time.sleep(1.1)  # the status document is cached for a second
                st = d.status() or {}
                record["daemon"] = {k: st.get(k) for k in ("pyfuse3_patches", "passthrough",
                                                           "passthrough_opens")}
    finally:
        if server is not None:
            server.stop()
    return counts


def count_requests(res: benchlib.Results, rows: list[Workload], src: Path, mnt: Path,
                   zstfs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One run of each row on a mount started with ZSTFS_OPSTATS=1: the FUSE requests it caused,
    less those of the status reads that count them. A cold row runs cold here too."""
    counts: dict[str, dict[str, Any]] = {}
    os.environ["ZSTFS_OPSTATS"] = "1"
    try:
        with benchlib.mounted(res, "mount cost (counting)", src, mnt, *PATTERN_ARGS,
                              zstfs=zstfs) as d:
            settle_status(d)
            idle = diff_requests(settle_status(d), settle_status(d))
            for w in rows:
                w.prepare(mnt, -1)
                if w.cold:
                    d.restart()  # the counters start again at zero: `before` is read after
                before = settle_status(d)
                if w.cold:
                    benchlib.drop_caches()
                w.timed(mnt, -1)
                c = diff_requests(before, settle_status(d))
                for key in ("count", "ns"):  # minus the status reads themselves
                    for k, v in idle[key].items():
                        c[key][k] = c[key].get(k, 0) - v
                c["cpu_s"] -= idle["cpu_s"]
                counts[w.name] = c
                print(f"  {w.name}: {sum(c['count'].values())} requests {c['errors']} "
                      f"{c['count']}", flush=True)
    finally:
        del os.environ["ZSTFS_OPSTATS"]
    return counts


def time_row(res: benchlib.Results, w: Workload, reps: int, disk: Path, mnt: Path,
             d: benchlib.Daemon | OtherDaemon | None, record: dict[str, Any]) -> None:
    """`reps` runs of a row on each side, interleaved (which side goes first alternates), into
    `res` and `record["rows"]`. A cold row's runs each start with the page cache dropped and,
    through the mount, the timed daemon restarted (untimed)."""
    times: dict[Path, list[float]] = {disk: [], mnt: []}
    cost = DaemonCost(d)
    for i in range(reps):
        for base in ((disk, mnt) if i % 2 == 0 else (mnt, disk)):
            w.prepare(base, i)
            if w.cold:
                if base == mnt:
                    cost.restart()
                benchlib.drop_caches()
            if base == mnt:
                cost.before_run()
            times[base].append(w.timed(base, i))
            if base == mnt:
                cost.after_run()
    cost.read_peak()
    benchlib.ratio_row(res, w.what, times[mnt], times[disk], "disk", GOALS[w.name])
    cost.goal_row(res, w)
    record.setdefault("rows", {})[w.name] = {"what": w.what, "mount": times[mnt],
                                             "disk": times[disk], "cold": w.cold,
                                             **cost.record()}


# --------------------------------------------------------------------------------------------
# The same rows as an ordinary user

#: What a run as the user needs of this checkout, copied into their workdir.
STAGED = ("zstfs", "scripts", "tests/harness/codex.py")


class User:
    """An ordinary user who runs the rows too: their daemon and their workload, from their venv
    (`--user-python`), with this checkout's zstfs and scripts copied where they can read them."""

    def __init__(self, name: str, python: Path, work: Path, sets: list[str],
                 floor: Path | None = None) -> None:
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid, self.home = name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir)
        self.python, self.work, self.sets = python, work, sets
        #: Not zstfs: this passthrough_ll binary serves the plain store (the floor column).
        self.floor = floor
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
        for exe in (self.python, self.floor):
            if exe is not None and not self.can("-x", str(exe)):
                raise RuntimeError(f"{exe} is not executable by {self.name}")

    def run_row(self, name: str, reps: int, count: bool, codex_dir: Path | None,
                store_small: int = STORE_SMALL,
                drop_caches: Path | None = None) -> dict[str, Any]:
        """One row as the user (a child bench_mount_cost.py); its --json document. `drop_caches`:
        the socket of the DropCachesServer that drops the page cache for its cold runs."""
        out = self.work / f"result-{name}.json"
        out.unlink(missing_ok=True)
        cmd = [str(self.python), str(self.stage / "scripts" / "bench_mount_cost.py"),
               "--reps", str(reps), "--rows", name, "--workdir", str(self.work),
               "--store-small", str(store_small), "--json", str(out),
               *([] if count and self.floor is None else ["--no-count"])]
        if self.floor is not None:
            cmd += ["--mounter", "passthrough_ll", "--floor-binary", str(self.floor)]
        for a in self.sets:
            cmd += ["--set", a]
        env = {"ZSTFS_CODEX_DIR": str(codex_dir)} if codex_dir is not None else {}
        if drop_caches is not None:
            env[benchlib.DROP_CACHES_ENV] = str(drop_caches)
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


def cold_note(name: str, u: User, docs: dict[str, dict[str, Any]], served: int, reps: int,
              count: bool) -> str:
    """How many page-cache drops root did for the user's cold runs, against how many their
    cold rows needed (each run on each side, and the counting run)."""
    cold = [n for n, d in docs.items() if d.get("rows", {}).get(n, {}).get("cold")]
    expected = len(cold) * (2 * reps + (1 if count else 0))
    verdict = "as expected" if served == expected else f"EXPECTED {expected}"
    return (f"{name} ({u.python}): root dropped the page cache {served} times for their cold "
            f"runs ({len(cold)} cold rows; {verdict})")


def root_and_user(res: benchlib.Results, work: Path, reps: int, only: set[str] | None,
                  count: bool, users: list[User],
                  zstfs: Sequence[str] = benchlib.ZSTFS,
                  store_small: int = STORE_SMALL) -> tuple[str, bool]:
    """Each row as root (into `res`) and as each of `users` (one user, a venv each; which side
    goes first rotates row by row); the side-by-side table with its notes, and whether every
    user row that could run did. The users get root's generated store, and root drops the page
    cache for their cold runs (a DropCachesServer each, for the whole run)."""
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
    if set(names) & set(STORE_ROWS):
        store = Store(work, store_small)
        for u in users:
            store.copy_cache(u.work)  # before prepare() makes it theirs
    for u in users:
        u.prepare()
    root: dict[str, dict[str, Any]] = {}
    root_daemons: list[dict[str, Any]] = []
    by_user: list[dict[str, dict[str, Any]]] = [{} for _ in users]
    sides = len(users) + 1
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(benchlib.DropCachesServer(
            u.work / f"drop-caches-{j}.sock", u.uid, u.gid)) for j, u in enumerate(users)]
        for k, n in enumerate(names):
            for side in (k + j for j in range(sides)):
                side %= sides
                if side == 0:
                    rec: dict[str, Any] = {}
                    rec["counts"] = bench_mount_cost(res, work, reps, {n}, count, record=rec,
                                                     zstfs=zstfs, store_small=store_small)
                    root_daemons.append(rec.pop("daemon", {}))
                    root[n] = rec
                elif n in skips:
                    by_user[side - 1][n] = {"error": skips[n]}
                else:
                    by_user[side - 1][n] = users[side - 1].run_row(
                        n, reps, count, codex_dir, store_small, servers[side - 1].path)
    labels = []
    notes = [describe_daemons("root's daemons", root_daemons), DAEMON_COST_NOTE]
    for u, docs, srv in zip(users, by_user, servers, strict=True):
        ran = [d for d in docs.values() if "rows" in d]
        if u.floor is not None:
            label = "floor (C passthrough_ll, user)"
            notes.append(f"{label}: {name}, libfuse's example {u.floor} "
                         "(scripts/build-passthrough-ll.sh) over the plain store, "
                         "-o xattr,no_writeback,timeout=60, multi-threaded")
        else:
            label = f"user ({pyfuse3_label(ran[-1])})" if ran else str(u.python)
            notes.append(describe_daemons(f"{name}'s daemons, {u.python}",
                                          [d["daemon"] for d in ran if d.get("daemon")]))
        labels.append(label)
        if ran:
            notes.append(f"{label}: {name}, {ran[-1]['versions']}")
        notes += sorted({f"{name}: {x}" for d in docs.values() for x in d.get("notes", [])})
        notes.append(cold_note(name, u, docs, srv.served, reps, count and u.floor is None))
    missing = [(n, u, d.get("error") or d.get("skipped", {}).get(n, "no result"),
                n in skips or (u.floor is not None and n in d.get("skipped", {})))
               for u, docs in zip(users, by_user, strict=True)
               for n, d in docs.items() if n not in d.get("rows", {})]
    notes += [f"{n} as {name} ({u.floor or u.python}): n/a ({why})"
              for n, u, why, _ in missing]
    text = (f"Root and the ordinary user {name}, row by row (which side goes first rotates), "
            f"medians of {reps}; each ratio is against that side's own interleaved disk runs:"
            "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n\n"
            + side_by_side(names, [("root", root), *zip(labels, by_user, strict=True)])
            + "\n")
    for who, docs in (("root", root), *zip(labels, by_user, strict=True)):
        counts = {n: d["counts"][n] for n, d in docs.items() if n in d.get("counts", {})}
        if counts:
            text += (f"\nFUSE requests of one run per row, as {who}:\n\n"
                     + request_table(counts) + "\n")
    return text, all(expected for _, _, _, expected in missing)


def parse_rows(text: str) -> set[str]:
    """`--rows`: row names and set names (ROW_SETS), comma-separated."""
    names = {n for part in text.split(",") if part for n in ROW_SETS.get(part, (part,))}
    unknown = names - GOALS.keys()
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows: {', '.join(sorted(unknown))}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=parse_rows,
                    help=f"comma list of: {','.join(GOALS)}; or of sets of them: "
                         + ", ".join(f"{k} ({','.join(v)})" for k, v in ROW_SETS.items()))
    ap.add_argument("--store-small", type=int, default=STORE_SMALL, metavar="N",
                    help="the store rows' store: N small rollouts besides the 150 MiB one "
                         f"(default {STORE_SMALL}; generated once per workdir)")
    ap.add_argument("--no-count", action="store_true", help="skip the request-counting pass")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/zstfs-mountcost"))
    ap.add_argument("--markdown", type=Path, metavar="FILE")
    ap.add_argument("--python", metavar="PY",
                    help="experiment: run the daemons with this interpreter (e.g. a venv with a "
                         "patched pyfuse3)")
    ap.add_argument("--set", action="append", default=[], metavar="ATTR=PYVALUE",
                    help="experiment: set an Operations class attribute in the daemons, e.g. "
                         "cache_readdir=True (needs a pyfuse3 that reads it)")
    ap.add_argument("--mounter", default="zstfs", choices=["zstfs", *OTHER_MOUNTERS],
                    help="time another FUSE daemon (a C one) instead of zstfs")
    ap.add_argument("--floor-binary", type=Path, metavar="PATH",
                    help="with --mounter passthrough_ll or passthrough_hp: the binary "
                         "(scripts/build-passthrough-ll.sh PATH or "
                         "scripts/build-passthrough-hp.sh PATH builds it)")
    ap.add_argument("--user", metavar="NAME",
                    help="as root: run every row as root and then as this ordinary user (their "
                         "daemon and workload), and print both side by side")
    ap.add_argument("--user-python", type=Path, metavar="PATH", action="append", default=[],
                    help="with --user: the python of that user's zstfs venv, e.g. "
                         "~NAME/.local/share/zstfs/venv/bin/python (its pyfuse3 is used); "
                         "repeat for a column per venv")
    ap.add_argument("--user-floor", type=Path, metavar="PATH",
                    help="with --user: one more column, that user's rows through libfuse's C "
                         "example passthrough_ll at PATH (scripts/build-passthrough-ll.sh PATH) "
                         "over the plain store")
    ap.add_argument("--json", type=Path, metavar="FILE",
                    help="also write the run times, request counts and notes here")
    args = ap.parse_args(argv)
    if args.user and (os.geteuid() != 0 or not args.user_python or args.mounter != "zstfs"):
        ap.error("--user needs root, --user-python and the zstfs mounter")
    if args.user_floor and not args.user:
        ap.error("--user-floor needs --user")
    if args.mounter in FLOOR_MOUNTERS and not args.floor_binary:
        ap.error(f"--mounter {args.mounter} needs --floor-binary")
    if args.mounter == "passthrough_hp" and os.geteuid() != 0:
        ap.error("--mounter passthrough_hp is root's floor: FUSE passthrough needs root")
    if args.python or args.set:
        sets = "".join(f"setattr(f.Operations, {k!r}, {v});"
                       for k, v in (a.split("=", 1) for a in args.set))
        zstfs = [args.python or sys.executable, "-c",
                 f"import sys; import zstfs.fs as f; {sets} "
                 "from zstfs.cli import main; sys.exit(main())"]
    else:
        zstfs = list(benchlib.ZSTFS)
    only = args.rows
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
        if args.user_floor:
            users.append(User(args.user, args.user_python[0], work / f"user-{args.user}-floor",
                              [], floor=args.user_floor.resolve()))
        both, user_ok = root_and_user(res, work, args.reps, only, count, users, zstfs,
                                      args.store_small)
        counts = {}
    else:
        counts = bench_mount_cost(res, args.workdir.resolve(), args.reps, only, count,
                                  args.mounter, record=record, zstfs=zstfs,
                                  store_small=args.store_small,
                                  floor_binary=args.floor_binary)
    load1 = os.getloadavg()
    header = [
        f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"total {time.perf_counter() - t0:.0f} s; medians of {args.reps} interleaved runs",
        f"machine: {benchlib.versions()}",
        f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}",
        f"daemons: {' '.join(zstfs) if args.mounter == 'zstfs' else args.mounter}"
        + (f" ({args.floor_binary})" if args.floor_binary else ""),
        *res.notes,
    ]
    text = "\n".join(f"- {h}" for h in header) + "\n\n" + res.table() + "\n"
    if counts:
        text += "\nFUSE requests of one run per row:\n\n" + request_table(counts) + "\n"
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
