"""Which processes use a directory tree, from /proc: open descriptors, working and root
directories, executables and memory mappings (what `fuser -m` and `lsof +D` look at). A normal
user sees only its own processes; root sees all.

`zstfs mount` refuses a store that processes use: they would go on using the directory underneath
the mount while new processes use the mount, and an SQLite database seen through two different
files (separate locks, separate shared memory) is how databases get corrupted. `zstfs umount`
names what keeps a mount busy. Codex's background app-server (`codex app-server
--managed-daemon` and its `pid-update-loop`, which outlive the interactive `codex` that started
them and run from `CODEX_HOME/packages`) is recognised, and the way to stop it is named.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Codex's background processes, by what distinguishes their command lines.
CODEX_SERVER = "app-server"
CODEX_UPDATER = "pid-update-loop"


@dataclass
class User:
    """One process using the tree, and how."""

    pid: int
    argv: list[str]
    uses: list[str] = field(default_factory=list)  # "cwd", "runs X", "file X", "dir X", "maps X"

    @property
    def command(self) -> str:
        """The command line, shortened for one line of a message."""
        if not self.argv:
            return "?"
        text = " ".join([os.path.basename(self.argv[0]), *self.argv[1:]])
        text = " ".join(text.split())  # one line, whatever the arguments hold
        return text if len(text) <= 100 else text[:97] + "..."

    @property
    def codex(self) -> str | None:
        """CODEX_SERVER or CODEX_UPDATER for codex's background processes, else None."""
        if not self.argv or not os.path.basename(self.argv[0]).startswith("codex"):
            return None
        if CODEX_SERVER not in self.argv:
            return None
        if "--managed-daemon" in self.argv:
            return CODEX_SERVER
        if CODEX_UPDATER in self.argv:
            return CODEX_UPDATER
        return None

    @property
    def uses_files(self) -> bool:
        """More than open directories: files, a working directory, mappings, an executable.
        (An open directory alone is `find` walking the tree, or a program that looks at the
        store underneath a mount on purpose.)"""
        return any(not u.startswith("dir ") for u in self.uses)

    def describe(self) -> str:
        opened = [u.split(" ", 1)[1] for u in self.uses if u.startswith(("file ", "dir "))]
        parts = [u for u in self.uses if not u.startswith(("file ", "dir "))]
        if opened:
            more = f" and {len(opened) - 3} more" if len(opened) > 3 else ""
            parts.insert(0, "has open " + ", ".join(opened[:3]) + more)
        return f"pid {self.pid} ({self.command}): {'; '.join(parts)}"


def _under(path: str, root: str) -> str | None:
    """`path` relative to `root` ("." for root itself), or None if it is outside."""
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    if path == root:
        return "."
    if root == "/" or path.startswith(root + "/"):
        return path[len(root):].lstrip("/")
    return None


def _on_dev(link: str, dev: int | None) -> bool:
    """Is the file behind a /proc magic link on device `dev` (any device if None)?"""
    if dev is None:
        return True
    try:
        return os.stat(link).st_dev == dev
    except OSError:
        return False


def _uses(pid: int, root: str, dev: int | None) -> list[str]:
    proc = f"/proc/{pid}"
    uses: list[str] = []
    for what, name in (("cwd", "cwd"), ("root directory", "root"), ("executable", "exe")):
        try:
            target = os.readlink(f"{proc}/{name}")
        except OSError:
            continue
        if _under(target, root) is not None and _on_dev(f"{proc}/{name}", dev):
            uses.append(what if name != "exe" else f"runs {_under(target, root)}")
    try:
        fds = os.listdir(f"{proc}/fd")
    except OSError:
        fds = []
    seen: set[str] = set()
    for fd in fds:
        try:
            target = os.readlink(f"{proc}/fd/{fd}")
        except OSError:
            continue
        rel = _under(target, root)
        if rel is None or rel in seen:
            continue
        try:
            st = os.stat(f"{proc}/fd/{fd}")
        except OSError:
            continue
        if dev is None or st.st_dev == dev:
            seen.add(rel)
            uses.append(f"{'dir' if stat.S_ISDIR(st.st_mode) else 'file'} {rel}")
    mapped = _mapped(proc, root, dev) - seen
    if mapped:
        uses.append("maps " + ", ".join(sorted(mapped)[:3]))
    return uses


def _mapped(proc: str, root: str, dev: int | None) -> set[str]:
    found: set[str] = set()
    want = None if dev is None else f"{os.major(dev):02x}:{os.minor(dev):02x}"
    try:
        with open(f"{proc}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                if want is not None and parts[3] != want:
                    continue
                rel = _under(parts[5].rstrip("\n"), root)
                if rel is not None:
                    found.add(rel)
    except OSError:
        pass
    return found


def users_of(root: str, *, dev: int | None = None, exclude: Iterable[int] = ()) -> list[User]:
    """Every process (that we may inspect) using `root` or anything under it. With `dev`, only
    files on that device count (a mount's own device, not the directory underneath it)."""
    root = os.path.realpath(root)
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        uses = _uses(pid, root, dev)
        if not uses:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        except OSError:
            argv = []
        found.append(User(pid, argv, uses))
    return found


def codex_advice(users: list[User], codex_home: str) -> str | None:
    """How to stop codex's background app-server among `users`, or None if it is not there."""
    servers = [u for u in users if u.codex == CODEX_SERVER]
    updaters = [u for u in users if u.codex == CODEX_UPDATER]
    if not servers and not updaters:
        return None
    home = os.path.realpath(codex_home)
    env = "" if home == os.path.realpath(os.path.expanduser("~/.codex")) else \
        f"CODEX_HOME={shlex.quote(home)} "
    steps = []
    if servers:
        steps.append(f"`{env}codex app-server daemon stop`")
    if updaters:
        pids = " ".join(str(u.pid) for u in updaters)
        steps.append(f"`kill {pids}` (its pid-update-loop, which `daemon stop` leaves running)")
    return ("codex's background app-server (it outlives interactive codex) is one of them; "
            "stop it with " + " and ".join(steps))


def describe_users(users: list[User], limit: int = 5) -> str:
    """The processes for one line of a message: `pid N (cmd): how, pid M (...): ...`."""
    text = ", ".join(u.describe() for u in users[:limit])
    return text + (f" and {len(users) - limit} more processes" if len(users) > limit else "")
