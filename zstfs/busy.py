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
#: No line about a process is longer than this (a terminal's width, not codex's 4 KB argv).
MAX_LINE = 120
#: How much of a command line the line about its process shows.
SHORT_COMMAND = 40
#: Lines about processes and the commands to run are indented under the line they explain.
INDENT = "  "


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

    @property
    def short_command(self) -> str:
        """The start of the command line: enough to recognise the program."""
        text = self.command
        return text if len(text) <= SHORT_COMMAND else text[:SHORT_COMMAND - 3] + "..."

    def describe(self, width: int = MAX_LINE) -> str:
        """`pid N (command): how it uses the tree`, at most `width` characters. To fit, fewer of
        its open files are named and deep paths lose their middle; then the end is cut. The PID
        and the command always stay."""
        # Files before directories, short names (a database) before long ones (a rollout).
        opened = [u.split(" ", 1)[1] for u in sorted(
            (u for u in self.uses if u.startswith(("file ", "dir "))),
            key=lambda u: (u.startswith("dir "), len(u)))]
        others = [u for u in self.uses if not u.startswith(("file ", "dir "))]
        head = f"pid {self.pid} ({self.short_command}): "
        text = ""
        for shown in range(min(3, len(opened)), -1, -1):
            for short in (False, True):
                parts = [_short_use(u) if short else u for u in others]
                if opened:
                    more = len(opened) - shown
                    named = ", ".join(opened[:shown]) + (f" and {more} more" if more else "")
                    parts.insert(0, "has open " + (named if shown else f"{more} files"))
                text = head + "; ".join(parts)
                if len(text) <= width:
                    return text
        return text[:width - 3] + "..."


def _short_use(use: str) -> str:
    """`runs a/b/c/d` → `runs a/.../d` (likewise for each path `maps` names)."""
    verb, _, paths = use.partition(" ")
    if verb not in ("runs", "maps"):
        return use
    short = []
    for path in paths.split(", "):
        parts = path.split("/")
        short.append(f"{parts[0]}/.../{parts[-1]}" if len(parts) > 2 else path)
    return f"{verb} {', '.join(short)}"


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
    runs: set[str] = set()
    for what, name in (("cwd", "cwd"), ("root directory", "root"), ("executable", "exe")):
        try:
            target = os.readlink(f"{proc}/{name}")
        except OSError:
            continue
        rel = _under(target, root)
        if rel is not None and _on_dev(f"{proc}/{name}", dev):
            uses.append(what if name != "exe" else f"runs {rel}")
            if name == "exe":
                runs.add(rel)  # its mapping says nothing more
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
    mapped = _mapped(proc, root, dev) - seen - runs
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


def codex_advice(users: list[User], codex_home: str) -> list[str]:
    """How to stop codex's background app-server among `users`: a line saying so, then each
    command on a line of its own (indented, nothing else on it but a shell comment). Empty if
    it is not among them."""
    servers = [u for u in users if u.codex == CODEX_SERVER]
    updaters = [u for u in users if u.codex == CODEX_UPDATER]
    if not servers and not updaters:
        return []
    home = os.path.realpath(codex_home)
    env = "" if home == os.path.realpath(os.path.expanduser("~/.codex")) else \
        f"CODEX_HOME={shlex.quote(home)} "
    lines = ["codex's background app-server (it outlives interactive codex) is one of them; "
             "stop it with:"]
    if servers:
        lines.append(f"{INDENT}{env}codex app-server daemon stop")
    if updaters:
        pids = " ".join(str(u.pid) for u in updaters)
        lines.append(f"{INDENT}kill {pids}  # its pid-update-loop, which `daemon stop` leaves "
                     "running")
    return lines


def count(users: list[User]) -> str:
    return f"{len(users)} process{'es' if len(users) != 1 else ''}"


def describe_users(users: list[User], limit: int = 5) -> list[str]:
    """One indented line per process (the first `limit`, then how many more), none longer
    than MAX_LINE: `pid N (command): how it uses the tree`."""
    lines = [INDENT + u.describe(MAX_LINE - len(INDENT)) for u in users[:limit]]
    if len(users) > limit:
        lines.append(f"{INDENT}and {len(users) - limit} more processes")
    return lines


def explain(first: str, users: list[User], codex_home: str, last: str) -> str:
    """A message about a refusal that processes cause, on several lines: `first` (what is
    refused), a line per process, codex's stop commands when its app-server is among them,
    then `last` (what to do)."""
    return "\n".join([first, *describe_users(users), *codex_advice(users, codex_home), last])
