"""The README's quick start as an ordinary user runs it.

An unprivileged user (created here: this test needs root, and skips without it) with the
distribution's `/usr/bin/python3` runs the README's first command from their own copy of the
checkout: `./install.sh && ~/.local/bin/zstfs mount --compress-after 7d ~/.codex`. Then, all as
that user, through the mount of their own `~/.codex`: a real codex session against the loopback
mock provider, its rollout compressed once it is a week old and read back byte for byte, a
resumed session that appends to it, `kill -9` of the daemon, recovery with zstfs's own commands
(`zstfs status` says what to run, `zstfs umount` clears the dead mount, `zstfs mount` again),
and the unmount. A rerun of the install on the installed venv changes nothing.

Where `/dev/fuse` is not open to ordinary users (some containers ship it 0600), it is made
0666 as distributions ship it for the length of the test, and restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import codex as h
from harness.mount import fuse_available, is_mounted, lazy_unmount, wait_until

REPO = Path(__file__).resolve().parents[2]
USER = "zstfs-user"
PROMPT = "hello from an ordinary user"

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it creates an ordinary user and runs the README's install as them"
    if not Path("/usr/bin/python3").exists():
        return "no /usr/bin/python3 (the distribution's Python)"
    for tool in ("setpriv", "useradd", "git"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if h.find_codex() is None:
        return "codex CLI not installed: run scripts/install-codex.sh"
    return fuse_available()


@contextlib.contextmanager
def open_to_everyone(wanted: list[tuple[str, int]]) -> Iterator[None]:
    """Add permission bits (path, bits) where they are missing; put the modes back after."""
    changed: list[tuple[str, int]] = []
    try:
        for path, bits in wanted:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & bits != bits:
                os.chmod(path, mode | bits)
                changed.append((path, mode))
        yield
    finally:
        for path, mode in reversed(changed):
            os.chmod(path, mode)


def reachable(path: Path) -> list[tuple[str, int]]:
    """What an ordinary user needs to run `path`: search on every parent, read+run on it."""
    wanted = [(str(path), 0o005)]
    parent = path.parent
    while parent != parent.parent:
        wanted.append((str(parent), 0o001))
        parent = parent.parent
    return wanted


class User:
    """The ordinary user, and commands run as them with a login-like environment."""

    def __init__(self, name: str) -> None:
        try:
            self.pw = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name],
                           check=True, timeout=60)
            self.pw = pwd.getpwnam(name)
        self.home = Path(self.pw.pw_dir)
        self.codex_home = self.home / ".codex"

    def env(self, **extra: str) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.pw.pw_name, "LOGNAME": self.pw.pw_name,
                "PATH": f"{self.home}/.local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                "TMPDIR": "/tmp", **extra}

    def run(self, script: str, *, timeout: float = 120, cwd: Path | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}",
             "--init-groups", "bash", "-c", script],
            cwd=cwd or self.home, env=self.env(**env), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL)

    def ok(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        r = self.run(script, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, f"{script!r} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def kill_all(self) -> None:
        subprocess.run(["pkill", "-KILL", "-u", self.pw.pw_name], timeout=30)
        wait_until(lambda: subprocess.run(["pgrep", "-u", self.pw.pw_name],
                                          capture_output=True).returncode == 1,
                   30, f"{self.pw.pw_name}'s processes to exit")

    def own(self, path: Path) -> None:
        for p in [path, *path.rglob("*")]:
            os.lchown(p, self.pw.pw_uid, self.pw.pw_gid)

    def fresh_home(self) -> None:
        """An empty home but for pip's download cache (what is tested is the install, not the
        download speed of this machine)."""
        if is_mounted(self.codex_home):
            lazy_unmount(self.codex_home)
        for entry in self.home.iterdir():
            if entry.name != ".cache":
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def copy_checkout(dest: Path) -> None:
    """The files of this checkout (tracked, and new ones not ignored), as a user's clone."""
    names = subprocess.run(["git", "-c", "safe.directory=*", "ls-files", "-z", "-co",
                            "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True, timeout=60).stdout.split(b"\0")
    for name in filter(None, names):
        src = REPO / os.fsdecode(name)
        if not src.exists():
            continue  # deleted in the working tree
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def status(user: User) -> dict[str, object]:
    r = user.ok("zstfs status --json ~/.codex")
    return json.loads(r.stdout)


def backing_rollouts(backing: Path) -> list[Path]:
    return sorted(p for p in (backing / "sessions").rglob("rollout-*") if p.is_file())


def test_readme_install_and_codex_as_an_ordinary_user(tmp_path: Path) -> None:
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    user = User(USER)
    codex = h.find_codex()
    assert codex is not None
    wanted = [("/dev/fuse", 0o006), *reachable(codex)]
    try:
        with open_to_everyone(wanted), h.MockResponsesServer() as mock:
            _scenario(user, codex, mock.base_url)
    finally:
        user.kill_all()
        if is_mounted(user.codex_home):
            lazy_unmount(user.codex_home)


def _scenario(user: User, codex: Path, base_url: str) -> None:
    user.kill_all()
    user.fresh_home()
    checkout = user.home / "zstfs"
    copy_checkout(checkout)
    h.write_config(user.codex_home, base_url)
    (user.home / "work").mkdir()
    user.own(user.home)

    # The backing store, seen through a descriptor of the directory the mount will cover.
    backing_fd = os.open(user.codex_home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _install_and_use(user, codex, Path(f"/proc/self/fd/{backing_fd}"), checkout)
    finally:
        os.close(backing_fd)


def _install_and_use(user: User, codex: Path, backing: Path, checkout: Path) -> None:
    # The README's first command, with the distribution's Python first on PATH.
    assert user.ok("command -v python3").stdout.strip() == "/usr/bin/python3"
    started = time.monotonic()
    r = user.run("./install.sh && ~/.local/bin/zstfs mount --compress-after 7d ~/.codex",
                 cwd=checkout, timeout=600)
    took = time.monotonic() - started
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    print(f"install and mount as {USER}: {took:.1f} s")
    assert "warning" not in r.stderr, r.stderr  # the patched build, no fallback
    assert is_mounted(user.codex_home)
    info = status(user)
    pid = int(info["pid"])  # type: ignore[call-overload]
    assert info["passthrough"] is False  # CAP_SYS_ADMIN only
    assert info["killpriv_v2"] is True  # no security.capability request before each write
    assert info["spin_ns"] > 0  # type: ignore[operator]  # no wake-up per request in a burst
    assert set(info["pyfuse3_patches"]) == {  # type: ignore[call-overload]
        "enable_readdir_cache", "disable_splice_read", "directories_by_inode", "kill_suidgid",
        "spin_ns", "inline_handlers", "enable_passthrough", "enable_killpriv_v2"}
    proc = Path(f"/proc/{pid}")
    assert proc.stat().st_uid == user.pw.pw_uid
    exe = os.readlink(proc / "exe")
    assert exe == os.path.realpath("/usr/bin/python3"), exe

    def run_codex(*args: str) -> str:
        r = user.ok(f"{codex} exec --skip-git-repo-check " + " ".join(args), cwd=user.home /
                    "work", timeout=120, CODEX_HOME=str(user.codex_home), MOCK_API_KEY="x",
                    TERM="dumb", NO_COLOR="1")
        return r.stdout

    def settle() -> None:
        """codex's background processes let go of CODEX_HOME (as its stop would)."""
        h.kill_codex_daemons(user.codex_home)

    assert h.default_reply(PROMPT) in run_codex(f"'{PROMPT}'")
    settle()
    [rollout] = backing_rollouts(backing)
    assert rollout.suffix == ".jsonl"
    relative = rollout.relative_to(backing)
    first = rollout.read_bytes()
    assert h.read_jsonl(rollout)[0]["type"] == "session_meta"

    # A week later: the compactor takes it as soon as it is released.
    user.ok(f"touch -d '8 days ago' ~/.codex/{relative}")
    zst = backing / f"{relative}.zst"
    wait_until(lambda: zst.exists() and not rollout.exists(), 120, "the rollout compressed")
    assert h.decompress_zst(zst) == first  # the standard zstd tools read it
    assert user.ok(f"sha256sum ~/.codex/{relative}").stdout.split()[0] == \
        hashlib.sha256(first).hexdigest()

    # codex resumes the compressed session through the mount: promoted, then appended to.
    assert h.default_reply("second turn") in run_codex("resume --last 'second turn'")
    settle()
    second = rollout.read_bytes()
    assert second.startswith(first)
    assert len(second) > len(first)
    assert not zst.exists()

    # The daemon dies (the OOM killer, a crash): zstfs's own commands recover.
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: h.process_gone(pid), 30, "the daemon to die")
    r = user.run("zstfs status ~/.codex")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "zstfs umount" in r.stderr
    user.ok("zstfs umount ~/.codex")
    assert not is_mounted(user.codex_home)
    user.ok("zstfs mount --compress-after 7d ~/.codex")
    assert int(status(user)["pid"]) != pid  # type: ignore[call-overload]
    assert user.ok(f"sha256sum ~/.codex/{relative}").stdout.split()[0] == \
        hashlib.sha256(second).hexdigest()
    assert h.default_reply("after the crash") in run_codex("'after the crash'")
    settle()
    assert len(backing_rollouts(backing)) == 2

    user.ok("zstfs umount ~/.codex")
    assert not is_mounted(user.codex_home)
    # Unmounted: the store is plain files (and .zst), exactly what was written through it.
    assert (user.codex_home / relative).read_bytes() == second

    # A rerun of the install on the installed venv keeps the build and needs no compiler.
    r = user.ok("./install.sh", cwd=checkout, timeout=600)
    assert "already installed" in r.stderr, r.stderr
    assert "building" not in r.stderr, r.stderr


def test_a_failed_build_never_stays_and_a_rerun_repairs_the_venv() -> None:
    """A pyfuse3 build that fails leaves stock pyfuse3, cleanly installed, and says so; a venv
    whose pyfuse3 does not load is rebuilt by the next `./install.sh`."""
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    user = User(USER)
    try:
        user.kill_all()
        user.fresh_home()
        good, broken = user.home / "zstfs", user.home / "zstfs-broken"
        copy_checkout(good)
        copy_checkout(broken)
        patch = broken / "contrib" / "pyfuse3" / "pyfuse3-3.5.0-zstfs.patch"
        patch.write_text(patch.read_text().replace("ZSTFS_PATCHES = (", "ZSTFS_PATCHES = (("))
        user.own(user.home)
        venv_python = user.home / ".local/share/zstfs/venv/bin/python"
        probe = "import pyfuse3; print(getattr(pyfuse3, 'ZSTFS_PATCHES', 'stock'))"

        r = user.ok("./install.sh", cwd=broken, timeout=600)
        assert "using stock pyfuse3" in r.stderr, r.stderr
        assert user.ok(f"{venv_python} -c \"{probe}\"").stdout.strip() == "stock"
        user.ok("zstfs --version")

        # A pyfuse3 that cannot load (here: its extension overwritten) is rebuilt, patched.
        [so] = (user.home / ".local/share/zstfs/venv/lib").glob(
            "python3*/site-packages/pyfuse3/__init__*.so")
        so.write_bytes(b"not an ELF file")
        assert user.run(f"{venv_python} -c 'import pyfuse3'").returncode != 0
        r = user.ok("./install.sh", cwd=good, timeout=600)
        assert "warning" not in r.stderr, r.stderr
        assert "directories_by_inode" in user.ok(f"{venv_python} -c \"{probe}\"").stdout
    finally:
        user.kill_all()
