"""End-to-end tests: the real Codex CLI (0.169.0) against a mock Responses API.

Every test gets a CODEX_HOME from the ``home`` fixture, parametrized over ``plain`` (a plain
directory: what codex does without zstfs) and ``zstfs`` (the same directory with zstfs mounted
over it, ``--compress-after 0``: a rollout is compressed as soon as codex releases it). The
tests marked ``ZSTFS_ONLY`` are codex on a zstfs mount of CODEX_HOME itself. They look
at the backing store through a descriptor of the directory opened before the mount covered it
(``/proc/self/fd/N/...`` reaches the files under the mount), and at the daemon's status.
``test_sessions_only_mount_cannot_archive`` documents why the README says to mount CODEX_HOME
and not just ``sessions/``. The last tests run codex as people do: interactive (the TUI in a
pseudo-terminal, which writes history.jsonl) and with its background app-server, which the
mount must refuse to split and the unmount must name (or stop, with ``--stop-codex``).

Helpers live in tests/harness/codex.py; its docstring lists what codex really does to
CODEX_HOME.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import codex as h
from harness.mount import Mount, MountFactory, fuse_available, is_mounted, wait_until

CODEX = h.find_codex()
if CODEX is None:
    pytest.skip("codex CLI not installed: run scripts/install-codex.sh", allow_module_level=True)


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def mock_api():
    with h.MockResponsesServer() as server:
        yield server


@dataclass
class Home:
    """A CODEX_HOME: a plain directory, or one with zstfs mounted over it."""

    path: Path
    mount: Mount | None = None
    fd: int | None = None  # the directory itself, opened before the mount covered it

    @property
    def backing(self) -> Path:
        """The backing store under the mount (valid in this process only)."""
        assert self.fd is not None, "not a zstfs home"
        return Path(f"/proc/self/fd/{self.fd}")

    def under(self, logical: Path) -> Path:
        """Where a path seen through the mount lives in the backing store."""
        return self.backing / Path(logical).relative_to(self.path)

    def status(self) -> dict:
        assert self.mount is not None, "not a zstfs home"
        return self.mount.status()


@pytest.fixture(params=["plain", "zstfs"])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Home]:
    path = tmp_path / "codex-home"
    path.mkdir()
    if request.param == "plain":
        yield Home(path)
        return
    reason = fuse_available()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")
    factory: MountFactory = request.getfixturevalue("mount_factory")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        m = factory(path, "--compress-after", "0", flat=False)  # the default patterns
        yield Home(path, m, fd)
        if m.proc is not None:
            m.stop()  # a clean unmount after codex is part of every zstfs test
    finally:
        os.close(fd)


@pytest.fixture
def codex_home(home: Home) -> Path:
    """The CODEX_HOME under test."""
    return home.path


#: Tests of zstfs itself: only on the mount.
ZSTFS_ONLY = pytest.mark.parametrize("home", ["zstfs"], indirect=True)
#: Tests that put files into CODEX_HOME behind codex's back (a `.zst` cannot be created through
#: the mount), or that mount something else themselves.
PLAIN_ONLY = pytest.mark.parametrize("home", ["plain"], indirect=True)


@dataclass
class Codex:
    home: Path  # CODEX_HOME
    workdir: Path  # cwd for every codex run (resume --last filters by cwd)
    user_home: Path  # $HOME, never the real one
    api: h.MockResponsesServer

    def run(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return h.run_codex(
            self.home,
            args,
            cwd=self.workdir,
            home=self.user_home,
            codex=CODEX,
            timeout=timeout,
            check=check,
        )

    def exec(self, prompt: str) -> subprocess.CompletedProcess[str]:
        return self.run("exec", "--skip-git-repo-check", prompt)

    def resume_last(self, prompt: str) -> subprocess.CompletedProcess[str]:
        return self.run("exec", "--skip-git-repo-check", "resume", "--last", prompt)

    def rollouts(self) -> list[Path]:
        return h.rollouts(self.home)

    def only_rollout(self) -> Path:
        found = self.rollouts()
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def codex(codex_home: Path, mock_api: h.MockResponsesServer, tmp_path: Path) -> Codex:
    h.write_config(codex_home, mock_api.base_url)
    workdir = tmp_path / "work"
    workdir.mkdir()
    user_home = tmp_path / "home"
    user_home.mkdir()
    return Codex(codex_home, workdir, user_home, mock_api)


def _texts(path: Path) -> list[str]:
    return list(h.iter_texts(h.read_jsonl(path)))


def _assert_valid_rollout(path: Path, session_id: str) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "rollout must end with a newline"
    records = h.read_jsonl(path)
    assert records[0]["type"] == "session_meta"
    assert records[0]["payload"]["id"] == session_id
    return records


def _prompt_and_reply(tag: str) -> tuple[str, str]:
    prompt = f"zstfs e2e prompt {tag}"
    return prompt, h.default_reply(prompt)


# ---------------------------------------------------------------------------
# tests


@pytest.mark.timeout(180)
def test_exec_creates_one_rollout(codex: Codex) -> None:
    prompt, reply = _prompt_and_reply("alpha")
    proc = codex.exec(prompt)
    assert reply in proc.stdout

    path = codex.only_rollout()
    assert path.name.endswith(".jsonl")
    assert path.parent.parent.parent.parent == codex.home / "sessions"  # sessions/YYYY/MM/DD/
    sid = h.session_id_from_rollout(path)
    assert f"session id: {sid}" in proc.stderr
    _assert_valid_rollout(path, sid)
    texts = _texts(path)
    assert prompt in texts
    assert reply in texts

    [req] = codex.api.response_requests()
    assert prompt in req.text


@pytest.mark.timeout(180)
def test_resume_last_appends_to_same_rollout(codex: Codex) -> None:
    p1, r1 = _prompt_and_reply("first")
    p2, r2 = _prompt_and_reply("second")
    codex.exec(p1)
    path = codex.only_rollout()
    before = path.read_bytes()

    proc = codex.resume_last(p2)
    assert r2 in proc.stdout
    assert codex.only_rollout() == path
    after = path.read_bytes()
    assert after.startswith(before), "resume must only append"
    assert len(after) > len(before)
    _assert_valid_rollout(path, h.session_id_from_rollout(path))
    texts = _texts(path)
    for t in (p1, r1, p2, r2):
        assert t in texts

    first, second = codex.api.response_requests()
    assert p1 in first.text
    # the resumed turn must carry the earlier history
    assert p1 in second.text
    assert r1 in second.text
    assert p2 in second.text


@pytest.mark.timeout(180)
def test_archive_unarchive_roundtrip(codex: Codex) -> None:
    codex.exec(_prompt_and_reply("archive")[0])
    path = codex.only_rollout()
    sid = h.session_id_from_rollout(path)
    content = path.read_bytes()

    codex.run("archive", sid)
    archived = codex.home / "archived_sessions" / path.name
    assert codex.rollouts() == [archived]
    assert not path.exists()
    assert archived.read_bytes() == content

    codex.run("unarchive", sid)
    assert codex.rollouts() == [path]
    assert not archived.exists()
    assert path.read_bytes() == content  # unarchive only bumps mtime


@pytest.mark.timeout(180)
@PLAIN_ONLY
@pytest.mark.parametrize("state", ["plain", "compressed"])
def test_delete_by_id(codex: Codex, state: str) -> None:
    codex.exec(_prompt_and_reply(f"delete-{state}")[0])
    path = codex.only_rollout()
    sid = h.session_id_from_rollout(path)
    if state == "compressed":
        h.compress_rollout(path)
        assert not path.exists()

    # Without a TTY, `codex delete` refuses to prompt and needs --force + a UUID.
    codex.run("delete", "--force", sid)
    assert codex.rollouts() == []
    assert not path.exists()
    assert not path.with_name(path.name + ".zst").exists()
    assert not list(codex.home.rglob(f"*{sid}.jsonl*"))


@pytest.mark.timeout(180)
@PLAIN_ONLY
@pytest.mark.parametrize("method", ["seekable", "zstd-cli"])
def test_resume_from_compressed_rollout(codex: Codex, method: str) -> None:
    if method == "zstd-cli" and h.zstd_cli() is None:
        pytest.skip("zstd CLI not installed")
    p1, r1 = _prompt_and_reply(f"cold-{method}")
    p2, r2 = _prompt_and_reply(f"warm-{method}")
    codex.exec(p1)
    path = codex.only_rollout()
    original = path.read_bytes()

    zst = h.compress_rollout(path, method=method)
    assert not path.exists()
    assert h.decompress_zst(zst) == original
    assert codex.rollouts() == [zst]

    proc = codex.resume_last(p2)
    assert r2 in proc.stdout
    # codex materialized the plain file, removed the .zst and appended to it.
    assert codex.rollouts() == [path]
    assert not zst.exists()
    after = path.read_bytes()
    assert after.startswith(original)
    _assert_valid_rollout(path, h.session_id_from_rollout(path))
    texts = _texts(path)
    for t in (p1, r1, p2, r2):
        assert t in texts
    second = codex.api.response_requests()[-1]
    assert p1 in second.text
    assert r1 in second.text


_WAL_WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time
    db, writer = sys.argv[1], int(sys.argv[2])
    start_at, duration, min_tx = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    con.execute("PRAGMA busy_timeout=30000")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    while time.time() < start_at:
        time.sleep(0.005)
    end = time.time() + duration
    n = 0
    rows = 0
    while time.time() < end or n < min_tx:
        con.execute("BEGIN IMMEDIATE")
        k = 1 + n % 3
        for j in range(k):
            con.execute(
                "INSERT INTO t(writer, seq, sub, payload) VALUES (?, ?, ?, ?)",
                (writer, n, j, ("w%d-%d-%d|" % (writer, n, j)) * 20),
            )
        con.execute("COMMIT")
        n += 1
        rows += k
        if n % 50 == 0:
            con.execute("SELECT count(*) FROM t").fetchone()
    con.close()
    print(n, rows)
    """
)


@pytest.mark.timeout(180)
def test_sqlite_wal_concurrent_writers(codex_home: Path) -> None:
    import sqlite3

    db = codex_home / "zstfs_wal_test.sqlite"
    con = sqlite3.connect(db, isolation_level=None)
    assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    con.execute(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, writer INT, seq INT, sub INT, payload TEXT)"
    )
    con.close()

    start_at = time.time() + 0.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WAL_WRITER, str(db), str(w), repr(start_at), "2.0", "300"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (1, 2)
    ]
    expected: dict[int, tuple[int, int]] = {}
    try:
        for w, proc in zip((1, 2), procs, strict=True):
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            tx, rows = map(int, out.split())
            assert tx >= 300
            expected[w] = (tx, rows)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    con = sqlite3.connect(db, isolation_level=None)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        for w, (tx, rows) in expected.items():
            assert con.execute("SELECT count(*) FROM t WHERE writer=?", (w,)).fetchone()[0] == rows
            seqs = {r[0] for r in con.execute("SELECT DISTINCT seq FROM t WHERE writer=?", (w,))}
            assert seqs == set(range(tx))
        dup = con.execute(
            "SELECT count(*) FROM"
            " (SELECT writer, seq, sub FROM t GROUP BY 1, 2, 3 HAVING count(*) > 1)"
        ).fetchone()[0]
        assert dup == 0
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    assert os.path.getsize(db) > 0
    # payload sanity after the checkpoint moved everything into the main file
    con = sqlite3.connect(db)
    try:
        for w in expected:
            payload = con.execute(
                "SELECT payload FROM t WHERE writer=? AND seq=0 AND sub=0", (w,)
            ).fetchone()[0]
            assert payload == f"w{w}-0-0|" * 20
    finally:
        con.close()


# ---------------------------------------------------------------------------
# codex on a zstfs mount of CODEX_HOME itself


def _rollout_files(root: Path) -> list[str]:
    """Rollout files (either form) under a CODEX_HOME-shaped tree, as sorted relative paths."""
    found = []
    for d in ("sessions", "archived_sessions"):
        if (root / d).is_dir():
            found += [str(p.relative_to(root)) for p in (root / d).rglob("rollout-*")]
    return sorted(found)


def _rel(home: Home, logical: Path) -> str:
    return str(logical.relative_to(home.path))


def _wait_compressed(home: Home, logical: Path, swaps: int = 1) -> Path:
    """Wait until the compactor has swapped `logical` (its `swaps`-th swap in all) and the
    backing store holds only its `.zst`; return that `.zst` (a backing path)."""
    plain = home.under(logical)
    zst = plain.with_name(plain.name + ".zst")

    def done() -> bool:
        s = home.status()
        return s["swaps_done"] >= swaps and s["compressed_files"] >= 1 and zst.exists() \
            and not plain.exists()

    wait_until(done, 20, f"{logical.name} compressed in the backing store")
    return zst


def _compressed_session(codex: Codex, home: Home, tag: str) -> tuple[Path, str, bytes]:
    """One finished `codex exec` whose rollout zstfs has compressed: (logical path, id, bytes)."""
    prompt, reply = _prompt_and_reply(tag)
    assert reply in codex.exec(prompt).stdout
    path = codex.only_rollout()
    _wait_compressed(home, path)
    assert _rollout_files(home.backing) == [_rel(home, path) + ".zst"]
    return path, h.session_id_from_rollout(path), path.read_bytes()


@pytest.mark.timeout(180)
@ZSTFS_ONLY
def test_zstfs_exec_rollout_compressed_when_idle(codex: Codex, home: Home) -> None:
    """1. `codex exec` through the mount; the rollout is compressed once codex lets go of it,
    the view still shows the plain `.jsonl`, and nothing else codex keeps is touched."""
    prompt, reply = _prompt_and_reply("issue6-exec")
    proc = codex.exec(prompt)
    assert reply in proc.stdout
    path = codex.only_rollout()
    assert path.name.endswith(".jsonl")
    assert path.parent.parent.parent.parent == home.path / "sessions"
    sid = h.session_id_from_rollout(path)
    assert f"session id: {sid}" in proc.stderr

    zst = _wait_compressed(home, path)
    status = home.status()
    assert status["compressed_files"] >= 1
    assert status["swaps_failed"] == 0
    # Backing: only the .zst; view: only the plain name, with the logical size.
    assert _rollout_files(home.backing) == [_rel(home, path) + ".zst"]
    assert sorted(os.listdir(path.parent)) == [path.name]
    shown = path.read_bytes()
    assert h.decompress_zst(zst) == shown
    assert path.stat().st_size == len(shown)
    assert zst.stat().st_size < len(shown)
    _assert_valid_rollout(path, sid)
    texts = _texts(path)
    assert prompt in texts
    assert reply in texts
    # grep through the mount finds the turn in the compressed rollout.
    grep = subprocess.run(["grep", "-rl", reply, str(home.path / "sessions")],
                          capture_output=True, text=True, timeout=30)
    assert grep.stdout.split() == [str(path)]

    # Everything that is not *.jsonl is shown untouched: codex's config, its SQLite
    # databases (consistent after codex's WAL traffic through the mount) and the rest.
    assert (home.backing / "config.toml").read_bytes() == (home.path / "config.toml").read_bytes()
    backing_zst = list(home.backing.rglob("*.zst"))
    assert [p.name for p in backing_zst] == [zst.name]
    dbs = sorted(p.name for p in home.path.glob("*.sqlite"))
    assert dbs, "codex keeps SQLite databases in CODEX_HOME"
    assert dbs == sorted(p.name for p in home.backing.glob("*.sqlite"))
    for name in dbs:
        check = subprocess.run(["sqlite3", str(home.path / name), "PRAGMA integrity_check"],
                               capture_output=True, text=True, timeout=30)
        assert check.stdout.strip() == "ok", (name, check.stdout, check.stderr)


@pytest.mark.timeout(180)
@ZSTFS_ONLY
def test_zstfs_resume_promotes_compressed_rollout(codex: Codex, home: Home) -> None:
    """2. `resume --last` continues a compressed session: the same rollout, both turns, promoted
    to plain by codex's append; once released, it is compressed again."""
    p1, r1 = _prompt_and_reply("issue6-first")
    p2, r2 = _prompt_and_reply("issue6-second")
    path, sid, before = _compressed_session(codex, home, "issue6-first")
    promotions = home.status()["promotions"]

    # A reader holding the rollout open (like `tail -f`) keeps the compactor off it after codex
    # exits, so the promoted plain file can be seen in the backing store.
    with open(path, "rb") as viewer:
        proc = codex.resume_last(p2)
        assert r2 in proc.stdout
        assert f"session id: {sid}" in proc.stderr
        assert codex.only_rollout() == path
        assert _rollout_files(home.backing) == [_rel(home, path)]
        wait_until(lambda: home.status()["promotions"] >= promotions + 1, 5, "the promotion count")
        after = path.read_bytes()
        assert home.under(path).read_bytes() == after
        assert after.startswith(before), "resume must only append"
        assert len(after) > len(before)
        assert viewer.read() == after  # the reader's handle follows the promotion
    _assert_valid_rollout(path, sid)
    texts = _texts(path)
    for t in (p1, r1, p2, r2):
        assert t in texts
    second = codex.api.response_requests()[-1]
    assert p1 in second.text  # codex read the compressed history
    assert r1 in second.text

    zst = _wait_compressed(home, path, swaps=2)
    assert _rollout_files(home.backing) == [_rel(home, path) + ".zst"]
    assert h.decompress_zst(zst) == after
    assert path.read_bytes() == after


@pytest.mark.timeout(180)
@ZSTFS_ONLY
def test_zstfs_archive_unarchive_compressed(codex: Codex, home: Home) -> None:
    """3. archive and unarchive move the `.zst` itself (no promotion) and keep every byte;
    unarchive's O_APPEND open without a write and its mtime update do not promote either."""
    path, sid, content = _compressed_session(codex, home, "issue6-archive")
    promotions = home.status()["promotions"]
    archived = home.path / "archived_sessions" / path.name

    codex.run("archive", sid)
    assert codex.rollouts() == [archived]
    assert not path.exists()
    assert archived.read_bytes() == content
    assert _rollout_files(home.backing) == [_rel(home, archived) + ".zst"]
    assert h.decompress_zst(home.under(archived).with_name(archived.name + ".zst")) == content
    archived_mtime = archived.stat().st_mtime_ns

    codex.run("unarchive", sid)
    assert codex.rollouts() == [path]
    assert not archived.exists()
    assert path.read_bytes() == content
    zst_rel = _rel(home, path) + ".zst"
    assert _rollout_files(home.backing) == [zst_rel]
    assert h.decompress_zst(home.backing / zst_rel) == content
    # unarchive bumps the mtime, and it lands on the .zst.
    st = path.stat()
    assert st.st_mtime_ns > archived_mtime
    assert (home.backing / zst_rel).stat().st_mtime_ns == st.st_mtime_ns
    assert st.st_size == len(content)
    assert home.status()["promotions"] == promotions


@pytest.mark.timeout(180)
@ZSTFS_ONLY
def test_zstfs_delete_compressed(codex: Codex, home: Home) -> None:
    """4. `codex delete --force` of a compressed rollout leaves neither form behind."""
    path, sid, _ = _compressed_session(codex, home, "issue6-delete")
    codex.run("delete", "--force", sid)
    assert codex.rollouts() == []
    assert not path.exists()
    assert _rollout_files(home.backing) == []
    assert not [p for p in home.backing.rglob(f"*{sid}*") if p.is_file()]
    wait_until(lambda: home.status()["compressed_files"] == 0, 5, "the census to drop the file")


@pytest.mark.timeout(180)
@ZSTFS_ONLY
def test_zstfs_backing_store_usable_without_zstfs(
    codex: Codex, home: Home, mount_factory: MountFactory
) -> None:
    """5. After unmount the `.zst` decodes with `zstd -d` to what the mount showed, and codex
    resumes from it by itself; mounted again, zstfs compresses what codex wrote meanwhile."""
    p1, r1 = _prompt_and_reply("issue6-cold")
    p2, r2 = _prompt_and_reply("issue6-offline")
    path, sid, shown = _compressed_session(codex, home, "issue6-cold")
    assert home.mount is not None
    home.mount.stop()

    zst = path.with_name(path.name + ".zst")
    assert _rollout_files(home.path) == [_rel(home, zst)]
    decoded = subprocess.run(["zstd", "-q", "-d", "-c", str(zst)], capture_output=True,
                             check=True, timeout=30).stdout
    assert decoded == shown

    proc = codex.resume_last(p2)  # no mount: codex decodes the .zst itself
    assert r2 in proc.stdout
    assert f"session id: {sid}" in proc.stderr
    assert _rollout_files(home.path) == [_rel(home, path)]
    assert not zst.exists()
    after = path.read_bytes()
    assert after.startswith(shown)
    assert path.stat().st_nlink == 1  # codex's hard-linked temp is gone
    _assert_valid_rollout(path, sid)
    texts = _texts(path)
    for t in (p1, r1, p2, r2):
        assert t in texts

    again = mount_factory(home.path, "--compress-after", "0", flat=False)
    home.mount = again
    _wait_compressed(home, path)  # found by the initial scan
    assert path.read_bytes() == after
    again.stop()


@pytest.mark.timeout(180)
@PLAIN_ONLY
def test_sessions_only_mount_cannot_archive(
    codex: Codex, home: Home, mount_factory: MountFactory
) -> None:
    """With only CODEX_HOME/sessions mounted, exec, resume and delete work, but archive and
    unarchive fail: their rename crosses two filesystems (EXDEV) and codex has no fallback.
    This is why the README says to mount CODEX_HOME itself."""
    reason = fuse_available()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")
    sessions = home.path / "sessions"
    sessions.mkdir()
    # The default patterns are relative to CODEX_HOME: a store of sessions/ alone needs its own.
    m = mount_factory(sessions, "--compress-after", "0", "--pattern", "rollout-*.jsonl")
    p1, _ = _prompt_and_reply("sessions-only-1")
    p2, r2 = _prompt_and_reply("sessions-only-2")
    codex.exec(p1)
    path = codex.only_rollout()
    sid = h.session_id_from_rollout(path)
    wait_until(lambda: m.status()["compressed_files"] >= 1, 20, "the rollout compressed")
    assert r2 in codex.resume_last(p2).stdout
    content = path.read_bytes()

    proc = codex.run("archive", sid, check=False)
    assert proc.returncode != 0
    assert "failed to archive session" in proc.stderr
    assert codex.rollouts() == [path]  # nothing moved, nothing lost
    assert path.read_bytes() == content
    archived = home.path / "archived_sessions" / path.name
    assert not archived.exists()
    archived.parent.mkdir(exist_ok=True)
    with pytest.raises(OSError, match="cross-device") as e:
        os.rename(path, archived)  # what codex does
    assert e.value.errno == errno.EXDEV

    # An archived rollout (moved by hand: `mv` copies across filesystems) cannot come back.
    subprocess.run(["mv", str(path), str(archived)], check=True, timeout=30)
    proc = codex.run("unarchive", sid, check=False)
    assert proc.returncode != 0
    assert "failed to unarchive session" in proc.stderr
    assert codex.rollouts() == [archived]
    assert archived.read_bytes() == content

    codex.run("delete", "--force", sid)
    assert codex.rollouts() == []
    m.stop()


# ---------------------------------------------------------------------------
# codex as people run it (interactive, with its background app-server)


@pytest.fixture
def daemons_killed(codex_home: Path) -> Iterator[None]:
    """Whatever happens, codex's background processes of this CODEX_HOME are gone at the end
    (before the mount's own teardown, which they would keep busy)."""
    yield
    h.kill_codex_daemons(codex_home)


def _tui(codex: Codex, prompt: str) -> None:
    h.run_codex_tui(codex.home, prompt, cwd=codex.workdir, home=codex.user_home, api=codex.api,
                    codex=CODEX, timeout=90)


def _zstfs(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zstfs", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _short_lines(stderr: str) -> list[str]:
    """The lines of a message about processes, none longer than a terminal line (codex's
    app-server has a command line of thousands of characters)."""
    lines = stderr.strip().splitlines()
    assert all(len(x) <= 120 for x in lines), stderr
    return lines


def _history(codex_home: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (codex_home / "history.jsonl").read_text()
            .splitlines()]


def _wait_daemons(codex_home: Path) -> dict[str, int]:
    return wait_until(lambda: (d := h.codex_daemons(codex_home)) and len(d) == 2 and d, 30,
                      "codex's app-server and pid-update-loop")


@pytest.mark.timeout(300)
@ZSTFS_ONLY
def test_zstfs_history_and_codex_daemon_across_mounts(
    codex: Codex, home: Home, mount_factory: MountFactory, daemons_killed: None
) -> None:
    """Interactive codex over the mount writes history.jsonl, which stays a plain file (the
    default patterns compress rollouts only) while its rollout is compressed. The app-server
    it leaves behind keeps the mount busy: `zstfs umount` names it and says how to stop it,
    `--stop-codex` does. Codex without the mount appends to the same history.jsonl and starts
    its daemon underneath: `zstfs mount` refuses, naming it; once stopped as told, the mount
    shows the whole history."""
    assert home.mount is not None
    p1, p2 = "zstfs issue12 first prompt", "zstfs issue12 second prompt"
    _tui(codex, p1)
    assert _history(home.path) == [p1]
    # The app-server hosts the TUI's thread and keeps its rollout open after the TUI exits, so
    # the rollout is compressed only later; history.jsonl, closed, must never be.
    codex.only_rollout()
    below = home.backing
    wait_until(lambda: home.status()["waiting_files"] == 0 and home.status()["in_flight"] == 0,
               20, "the compactor idle")
    assert (below / "history.jsonl").read_bytes() == (home.path / "history.jsonl").read_bytes()
    assert not [p for p in below.rglob("*.zst") if not p.name.startswith("rollout-")]

    daemons = _wait_daemons(home.path)
    r = _zstfs("umount", home.path)
    assert r.returncode == 1
    lines = _short_lines(r.stderr)
    assert "busy" in lines[0]
    for pid in daemons.values():
        assert f"  pid {pid} (" in r.stderr
    assert f"  CODEX_HOME={home.path} codex app-server daemon stop" in lines
    assert any(x.startswith(f"  kill {daemons['pid-update-loop']}  # ") for x in lines)
    assert lines[-3:] == ["or let zstfs stop it and unmount:",
                          f"  zstfs umount --stop-codex {home.path}",
                          "close the others, or use --lazy"]
    assert is_mounted(home.path)

    r = _zstfs("umount", "--stop-codex", home.path)
    assert r.returncode == 0, r.stderr
    assert h.codex_daemons(home.path) == {}
    assert home.mount.proc is not None
    assert home.mount.proc.wait(timeout=30) == 0
    home.mount.proc = None
    assert not is_mounted(home.path)
    history = (home.path / "history.jsonl").read_bytes()

    _tui(codex, p2)  # no mount: codex appends to the plain history.jsonl it finds
    assert _history(home.path) == [p1, p2]
    assert (home.path / "history.jsonl").read_bytes().startswith(history)
    assert not (home.path / "history.jsonl.zst").exists()
    daemons = _wait_daemons(home.path)

    r = _zstfs("mount", home.path, "--log", home.path.parent / "refused.log")
    assert r.returncode == 1
    lines = _short_lines(r.stderr)
    for pid in daemons.values():
        assert f"  pid {pid} (" in r.stderr
    assert f"  CODEX_HOME={home.path} codex app-server daemon stop" in lines
    assert "--force" in lines[-1]
    assert not is_mounted(home.path)

    # What the message says to do.
    stop = codex.run("app-server", "daemon", "stop")
    assert '"stopped"' in stop.stdout
    os.kill(daemons["pid-update-loop"], signal.SIGTERM)
    wait_until(lambda: all(map(h.process_gone, daemons.values())), 30, "codex's daemon to stop")

    home.mount = mount_factory(home.path, "--compress-after", "0", flat=False)
    assert home.mount.status()["warnings"] == []
    rollouts = codex.rollouts()
    assert len(rollouts) == 2
    wait_until(lambda: home.status()["compressed_files"] == 2, 30, "both rollouts compressed")
    assert sorted(p.name for p in below.rglob("*.zst")) == sorted(p.name + ".zst"
                                                                   for p in rollouts)
    assert (below / "history.jsonl").is_file()  # plain, as codex wrote it
    assert _history(home.path) == [p1, p2]
    for rollout in rollouts:
        _assert_valid_rollout(rollout, h.session_id_from_rollout(rollout))
    home.mount.stop()


@pytest.mark.timeout(180)
@PLAIN_ONLY
def test_mount_refuses_while_codex_daemon_runs(
    codex: Codex, home: Home, mount_factory: MountFactory, daemons_killed: None
) -> None:
    """`codex app-server daemon start` before the mount: the daemon holds the SQLite databases
    underneath, so `zstfs mount` refuses, naming both processes and how to stop them. With
    --force it mounts, and `zstfs status` keeps saying so."""
    reason = fuse_available()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")
    codex.exec("zstfs issue12 before the daemon")
    start = codex.run("app-server", "daemon", "start")
    assert '"started"' in start.stdout
    daemons = _wait_daemons(home.path)
    server = daemons["app-server"]
    held = os.listdir(f"/proc/{server}/fd")
    assert any(os.readlink(f"/proc/{server}/fd/{fd}") == str(home.path / "state_5.sqlite")
               for fd in held)

    r = _zstfs("mount", home.path, "--log", home.path.parent / "refused.log")
    assert r.returncode == 1
    lines = _short_lines(r.stderr)
    assert lines[0] == f"zstfs: {home.path}: in use by 2 processes, not mounted:"
    by_pid = {int(x.split()[1]): x for x in lines if x.startswith("  pid ")}
    assert set(by_pid) == set(daemons.values())
    assert by_pid[server].startswith(f"  pid {server} (codex app-server --listen unix://")
    assert re.search(r"has open \w+\.sqlite", by_pid[server])  # its databases
    updater = daemons["pid-update-loop"]
    assert "(codex app-server daemon pid-update-loop)" in by_pid[updater]
    # Its executable is in the store.
    assert any("runs packages/" in x for x in by_pid.values())
    at = lines.index(f"  CODEX_HOME={home.path} codex app-server daemon stop")
    assert lines[at + 1].startswith(f"  kill {updater}  # its pid-update-loop")
    assert "--force" in lines[-1]
    assert not is_mounted(home.path)

    m = mount_factory(home.path, "--force", flat=False)
    warnings = m.status()["warnings"]
    assert len(warnings) == 1
    assert f"pid {server} " in warnings[0]
    shown = _zstfs("status", home.path)
    assert shown.returncode == 0
    assert f"warning:     mounted with --force while {home.path}: in use by pid" in shown.stdout
    m.stop()  # the daemon uses the directory underneath, not the mount: nothing busy


@pytest.mark.timeout(180)
@ZSTFS_ONLY
def test_zstfs_umount_advice_stops_codex_daemon(
    codex: Codex, home: Home, daemons_killed: None
) -> None:
    """Codex's daemon started through the mount keeps it busy; the two commands `zstfs umount`
    names (`codex app-server daemon stop`, then `kill` of the pid-update-loop) free it."""
    assert home.mount is not None
    codex.run("app-server", "daemon", "start")
    daemons = _wait_daemons(home.path)
    r = _zstfs("umount", home.path)
    assert r.returncode == 1
    lines = _short_lines(r.stderr)
    at = lines.index(f"  CODEX_HOME={home.path} codex app-server daemon stop")
    assert lines[at + 1].startswith(f"  kill {daemons['pid-update-loop']}  # ")
    assert is_mounted(home.path)
    codex.run("app-server", "daemon", "stop")
    wait_until(lambda: h.process_gone(daemons["app-server"]), 30, "the app-server to exit")
    r = _zstfs("umount", home.path)
    assert r.returncode == 1  # the pid-update-loop still runs from CODEX_HOME/packages
    assert f"pid {daemons['pid-update-loop']} " in r.stderr
    assert f"pid {daemons['app-server']} " not in r.stderr
    os.kill(daemons["pid-update-loop"], signal.SIGTERM)
    wait_until(lambda: all(map(h.process_gone, daemons.values())), 30,
               "the pid-update-loop to stop")
    home.mount.stop()
