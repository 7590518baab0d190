"""End-to-end tests: the real Codex CLI (0.169.0) against a mock Responses API.

Every test works on the ``codex_home`` fixture. Here it is a plain directory;
a module that mounts zstfs overrides it (for example
``def codex_home(mounted): return mounted``) and reuses these tests unchanged.
Helpers live in tests/codex_harness.py; its docstring lists what codex really
does to CODEX_HOME.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import codex_harness as h
import pytest

CODEX = h.find_codex()
if CODEX is None:
    pytest.skip("codex CLI not installed: run scripts/install-codex.sh", allow_module_level=True)


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def mock_api():
    with h.MockResponsesServer() as server:
        yield server


@pytest.fixture
def codex_home(tmp_path: Path) -> Path:
    """The CODEX_HOME under test. Override with a zstfs mount point to test zstfs."""
    home = tmp_path / "codex-home"
    home.mkdir()
    return home


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


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(120)
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
