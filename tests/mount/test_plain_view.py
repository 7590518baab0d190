"""The foundation mount behaves like the directory underneath for every ordinary program.

Each test mounts a real store over itself (the `mounted` fixture) and drives it with real programs
(`cp`, `diff`, `grep`, `find`, `stat`, `du`, `tail`, `mv`, `ln`, `sqlite3`) and with real syscalls,
often from other processes. No background compression runs here: this is the plain view.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import mmap
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mount import Mount, MountFactory, errno_of, reap, wait_until

NOBODY = 65534
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def run(*cmd: str | Path, timeout: float = 60, check: bool = True,
        **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def python(code: str, *args: str | Path, timeout: float = 60,
           **kw: object) -> subprocess.CompletedProcess[str]:
    """Run Python code in another process (never in the one that serves the mount)."""
    return run(sys.executable, "-c", textwrap.dedent(code), *args, timeout=timeout, **kw)


def as_nobody(*cmd: str | Path) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            *map(str, cmd)]


def walk(root: Path) -> dict[str, tuple]:
    """Everything an ordinary copy must preserve, keyed by relative path."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size, digest)
    return out


class Reader:
    """Bounded line reading from a child's stdout (never blocks past a deadline)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def until(self, predicate, timeout: float, what: str) -> bytes:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate(self.buf):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.buf[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    if predicate(self.buf):
                        break
                    raise AssertionError(f"EOF while waiting for {what}; got {self.buf[-500:]!r}")
                self.buf += chunk
        return self.buf


def spawn(code: str, *args: str | Path) -> subprocess.Popen[bytes]:
    """A Python child driven line by line over stdin/stdout."""
    return subprocess.Popen([sys.executable, "-u", "-c", textwrap.dedent(code),
                             *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def tell(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A scratch directory on the same disk, outside the mount."""
    d = tmp_path / "outside"
    d.mkdir()
    return d


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="zstfs-pt-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------- 1. cp -a
MTIME = 1_600_000_000_123_456_789


def make_tree(root: Path) -> None:
    sizes = {"empty": 0, "one": 1, "page": 4096, "odd": 65537, "big.bin": 3 << 20}
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, (name, size) in enumerate(sizes.items()):
        (root / name).write_bytes(os.urandom(size))
        (root / "sub" / "deeper" / f"{name}.copy").write_bytes(os.urandom(size // 3))
        os.utime(root / name, ns=(MTIME, MTIME + i * 1_000_000_007))
    (root / "with space and ünïcødé 日本.txt").write_text("odd name\n")
    (root / "-leading-dash").write_text("dash\n")
    (root / "rollout-1.jsonl").write_text('{"a": 1}\n' * 1000)
    (root / "secret").write_text("private\n")
    (root / "secret").chmod(0o600)
    (root / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "tool.sh").chmod(0o755)
    os.symlink("sub/deeper/one.copy", root / "link")
    os.symlink("/nonexistent/dangling", root / "dangling")
    os.setxattr(root / "one", "user.note", b"kept by cp -a")
    for p in (root / "sub" / "deeper", root / "sub", root / "tool.sh", root / "secret"):
        os.utime(p, ns=(MTIME, MTIME + 999))
    os.utime(root / "link", ns=(MTIME, MTIME + 5), follow_symlinks=False)


@pytest.mark.timeout(120)
def test_mount_over_source_shows_existing_files(store: Path,
                                                mount_factory: MountFactory) -> None:
    (store / "old.txt").write_text("before\n")
    m = mount_factory(store)
    assert (store / "old.txt").read_text() == "before\n"
    (store / "new.txt").write_text("after\n")
    m.stop()
    assert (store / "new.txt").read_text() == "after\n"


def test_cp_a_round_trip_preserves_everything(mounted: Mount, outside: Path) -> None:
    """cp -a in and out again: content, modes, nanosecond mtimes, symlinks, xattrs, odd names."""
    src = outside / "src"
    src.mkdir()
    make_tree(src)
    inside = mounted.mountpoint / "tree"
    run("cp", "-a", src, inside)
    back = outside / "back"
    run("cp", "-a", inside, back)
    run("diff", "-r", "--no-dereference", src, inside)
    run("diff", "-r", "--no-dereference", src, back)
    expected = walk(src)
    assert len(expected) > 15
    assert walk(inside) == expected
    assert walk(back) == expected
    assert os.getxattr(inside / "one", "user.note") == b"kept by cp -a"
    assert os.getxattr(back / "one", "user.note") == b"kept by cp -a"
    assert (inside / "link").read_bytes() == (src / "sub/deeper/one.copy").read_bytes()
    mounted.stop()
    assert walk(inside) == expected  # the backing directory holds the same


# ------------------------------------------------------------- 2. grep, find, stat, du
def test_grep_find_stat_du(mounted: Mount) -> None:
    root = mounted.mountpoint / "logs"
    counts: dict[str, int] = {}
    old = time.time() - 10 * 86400
    for d in range(5):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(12):
            name = f"d{d}/f{f}.log" if f % 3 else f"d{d}/f{f}.txt"
            n = d * 12 + f
            lines = [f"line {i} {'needle' if i % (f + 2) == 0 else 'hay'}" for i in range(n * 7)]
            (root / name).write_text("\n".join(lines) + ("\n" if lines else ""))
            counts[name] = sum("needle" in line for line in lines)
            if f % 4 == 0:
                os.utime(root / name, (old, old))
    r = run("grep", "-rc", "needle", ".", cwd=root)
    got = {line.rsplit(":", 1)[0].removeprefix("./"): int(line.rsplit(":", 1)[1])
           for line in r.stdout.splitlines()}
    assert got == counts
    r = run("grep", "-r", "needle", ".", cwd=root)
    assert len(r.stdout.splitlines()) == sum(counts.values())
    r = run("find", ".", "-name", "*.txt", cwd=root)
    assert sorted(r.stdout.split()) == sorted(f"./{n}" for n in counts if n.endswith(".txt"))
    r = run("find", ".", "-type", "f", "-mtime", "+5", cwd=root)
    assert sorted(r.stdout.split()) == sorted(
        f"./{d}/f{f}.{'log' if f % 3 else 'txt'}" for d in ("d0", "d1", "d2", "d3", "d4")
        for f in range(0, 12, 4))
    r = run("stat", "-c", "%s %Y %a", root / "d1/f4.log")
    st = os.stat(root / "d1/f4.log")
    assert r.stdout.split() == [str(st.st_size), str(int(st.st_mtime)), "644"]
    assert int(r.stdout.split()[1]) == int(old)
    du_mounted = int(run("du", "-s", "--block-size=1", root).stdout.split()[0])
    du_apparent = int(run("du", "-s", "-b", root).stdout.split()[0])
    assert du_apparent == sum(p.stat().st_size for p in root.rglob("*")) + os.stat(root).st_size
    mounted.stop()
    du_backing = int(run("du", "-s", "--block-size=1", root).stdout.split()[0])
    assert du_backing > 0
    assert abs(du_mounted - du_backing) <= max(64 * 1024, du_backing // 20)


# -------------------------------------------------------------------------- 3. tail
@pytest.mark.timeout(60)
def test_tail_n_and_tail_f_follow_appends_from_another_process(mounted: Mount) -> None:
    big = mounted.mountpoint / "big.log"
    with open(big, "w") as f:
        for i in range(200_000):
            f.write(f"line {i:06d} {'x' * (i % 50)}\n")
    r = run("tail", "-n", "3", big)
    assert r.stdout.splitlines() == [f"line {i:06d} {'x' * (i % 50)}" for i in (199997, 199998,
                                                                                  199999)]
    log = mounted.mountpoint / "follow.log"
    log.write_text("before\n")
    tail = subprocess.Popen(["tail", "-n0", "-f", str(log)], stdout=subprocess.PIPE)
    try:
        out = Reader(tail)
        # tail has opened and positioned at EOF once /proc shows the file among its fds.
        wait_until(lambda: any(os.path.realpath(f"/proc/{tail.pid}/fd/{fd}") == str(log)
                               for fd in os.listdir(f"/proc/{tail.pid}/fd")), 10,
                   "tail to open the file")
        for batch in range(3):
            python("""
                import os, sys
                fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
                for i in range(5):
                    os.write(fd, f"appended {sys.argv[2]}.{i}\\n".encode())
                os.close(fd)
                """, log, str(batch))
            want = b"".join(f"appended {b}.{i}\n".encode() for b in range(batch + 1)
                            for i in range(5))
            out.until(lambda buf, want=want: buf == want or len(buf) > len(want), 15,
                      f"tail -f to show batch {batch}")
            assert out.buf == want
    finally:
        reap(tail)
    assert b"before" not in out.buf


# ------------------------------------------------------- 4. mv, ln, ln -s, inode numbers
def test_mv_ln_symlink_and_stable_inodes(mounted: Mount) -> None:
    m = mounted.mountpoint
    (m / "a").mkdir()
    (m / "b" / "c").mkdir(parents=True)
    f = m / "a" / "file.txt"
    f.write_text("content\n")
    ino = os.stat(f).st_ino
    for i in range(50):  # other activity in between
        (m / "b" / f"noise{i}").write_text(str(i))
    run("ls", "-lR", m)
    assert os.stat(f).st_ino == ino
    run("mv", f, m / "b" / "c" / "moved.txt")
    assert not f.exists()
    moved = m / "b" / "c" / "moved.txt"
    assert moved.read_text() == "content\n"
    assert os.stat(moved).st_ino == ino
    run("mv", m / "b" / "c", m / "a" / "c2")  # a directory across directories
    moved = m / "a" / "c2" / "moved.txt"
    assert os.stat(moved).st_ino == ino
    # hard link
    run("ln", moved, m / "b" / "hard.txt")
    hard = m / "b" / "hard.txt"
    s1, s2 = os.stat(moved), os.stat(hard)
    assert s1.st_ino == s2.st_ino == ino
    assert s1.st_nlink == s2.st_nlink == 2
    with open(hard, "a") as fh:
        fh.write("via hard link\n")
    assert moved.read_text() == "content\nvia hard link\n"
    with open(moved, "r+") as fh:
        fh.write("CONTENT")
    assert hard.read_text() == "CONTENT\nvia hard link\n"
    os.unlink(moved)
    assert os.stat(hard).st_nlink == 1
    assert os.stat(hard).st_ino == ino
    # symbolic link
    run("ln", "-s", "../b/hard.txt", m / "a" / "sym")
    assert run("readlink", m / "a" / "sym").stdout == "../b/hard.txt\n"
    assert os.readlink(m / "a" / "sym") == "../b/hard.txt"
    assert (m / "a" / "sym").read_text() == "CONTENT\nvia hard link\n"
    assert os.lstat(m / "a" / "sym").st_size == len("../b/hard.txt")
    assert stat.S_ISLNK(os.lstat(m / "a" / "sym").st_mode)
    inos = {p: os.lstat(p).st_ino for p in m.rglob("*")}
    assert len(set(inos.values())) == len(inos)  # distinct files, distinct numbers
    run("find", m, "-type", "f")
    assert {p: os.lstat(p).st_ino for p in m.rglob("*")} == inos


# ---------------------------------------------------------------------- 5. errnos
def test_enoent(mounted: Mount) -> None:
    m = mounted.mountpoint
    assert errno_of(open, m / "missing") == errno.ENOENT
    assert errno_of(os.stat, m / "missing") == errno.ENOENT
    assert errno_of(os.unlink, m / "missing") == errno.ENOENT
    assert errno_of(os.rmdir, m / "missing") == errno.ENOENT
    assert errno_of(os.rename, m / "missing", m / "x") == errno.ENOENT
    assert errno_of(os.open, m / "nodir" / "f", os.O_CREAT | os.O_WRONLY) == errno.ENOENT
    assert errno_of(os.readlink, m / "missing") == errno.ENOENT
    assert errno_of(os.getxattr, m / "missing", "user.x") == errno.ENOENT


def test_eexist(mounted: Mount) -> None:
    m = mounted.mountpoint
    (m / "d").mkdir()
    (m / "f").write_text("f")
    (m / "g").write_text("g")
    assert errno_of(os.mkdir, m / "d") == errno.EEXIST
    assert errno_of(os.mkdir, m / "f") == errno.EEXIST
    assert errno_of(os.open, m / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.link, m / "f", m / "g") == errno.EEXIST
    assert errno_of(os.symlink, "x", m / "g") == errno.EEXIST
    assert errno_of(renameat2, m / "f", m / "g", RENAME_NOREPLACE) == errno.EEXIST
    assert (m / "f").read_text() == "f"
    assert (m / "g").read_text() == "g"
    renameat2(m / "f", m / "h", RENAME_NOREPLACE)  # onto a free name it works
    assert (m / "h").read_text() == "f"
    assert not (m / "f").exists()


def test_enotempty_eisdir_enotdir(mounted: Mount) -> None:
    m = mounted.mountpoint
    (m / "d" / "sub").mkdir(parents=True)
    (m / "d" / "f").write_text("x")
    (m / "file").write_text("x")
    (m / "empty").mkdir()
    assert errno_of(os.rmdir, m / "d") == errno.ENOTEMPTY
    assert errno_of(os.rename, m / "empty", m / "d") == errno.ENOTEMPTY
    assert errno_of(os.open, m / "d", os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, m / "d", os.O_RDWR) == errno.EISDIR
    assert errno_of(os.unlink, m / "d") == errno.EISDIR
    assert errno_of(os.rename, m / "file", m / "empty") == errno.EISDIR
    assert errno_of(os.rmdir, m / "file") == errno.ENOTDIR
    assert errno_of(os.listdir, m / "file") == errno.ENOTDIR
    assert errno_of(os.open, m / "file" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.mkdir, m / "file" / "x") == errno.ENOTDIR
    assert errno_of(os.rename, m / "empty", m / "file") == errno.ENOTDIR
    assert errno_of(os.open, m / "file", os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
    os.rmdir(m / "empty")
    assert sorted(os.listdir(m)) == ["d", "file"]


@pytest.mark.timeout(60)
def test_eacces_for_another_user_default_permissions(world_dir: Path, mount_factory) -> None:
    src = world_dir / "store"
    src.mkdir()
    src.chmod(0o755)
    m: Mount = mount_factory(src, "--allow-other")
    (src / "secret").write_text("root only\n")
    (src / "secret").chmod(0o600)
    (src / "public").write_text("everyone\n")
    (src / "public").chmod(0o644)
    (src / "locked").mkdir(mode=0o700)
    (src / "shared").mkdir()
    (src / "shared").chmod(0o777)

    def nobody(code: str, *args: Path) -> subprocess.CompletedProcess[str]:
        return run(*as_nobody(sys.executable, "-c", textwrap.dedent(code), *args))

    r = nobody("""
        import errno, os, sys
        def err(fn, *a):
            try:
                fn(*a)
            except OSError as e:
                return errno.errorcode[e.errno]
            return "ok"
        src = sys.argv[1]
        print(open(os.path.join(src, "public")).read().strip())
        print(err(open, os.path.join(src, "secret")))
        print(err(open, os.path.join(src, "public"), "a"))
        print(err(os.listdir, os.path.join(src, "locked")))
        print(err(os.open, os.path.join(src, "new"), os.O_CREAT | os.O_WRONLY))
        print(err(os.chmod, os.path.join(src, "public"), 0o666))
        print(err(os.unlink, os.path.join(src, "public")))
        with open(os.path.join(src, "shared", "mine"), "w") as f:
            f.write("nobody's\\n")
        st = os.stat(os.path.join(src, "shared", "mine"))
        print(st.st_uid, st.st_gid)
        """, src)
    assert r.stdout.split("\n")[:-1] == ["everyone", "EACCES", "EACCES", "EACCES", "EACCES",
                                         "EPERM", "EACCES", f"{NOBODY} {NOBODY}"]
    m.stop()
    st = os.stat(src / "shared" / "mine")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert (src / "public").read_text() == "everyone\n"


def test_rename_exchange_swaps(mounted: Mount) -> None:
    m = mounted.mountpoint
    (m / "x").write_text("X")
    (m / "d").mkdir()
    (m / "d" / "y").write_text("Y")
    ix, iy = os.stat(m / "x").st_ino, os.stat(m / "d" / "y").st_ino
    renameat2(m / "x", m / "d" / "y", RENAME_EXCHANGE)
    assert (m / "x").read_text() == "Y"
    assert (m / "d" / "y").read_text() == "X"
    assert os.stat(m / "x").st_ino == iy
    assert os.stat(m / "d" / "y").st_ino == ix
    assert errno_of(renameat2, m / "x", m / "nothing", RENAME_EXCHANGE) == errno.ENOENT
    mounted.stop()
    assert (m / "x").read_text() == "Y"
    assert (m / "d" / "y").read_text() == "X"


def test_truncate_ftruncate(mounted: Mount) -> None:
    p = mounted.mountpoint / "t"
    p.write_bytes(b"0123456789")
    os.truncate(p, 4)
    assert p.read_bytes() == b"0123"
    os.truncate(p, 8)
    assert p.read_bytes() == b"0123\0\0\0\0"
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), 2)
        assert os.fstat(f.fileno()).st_size == 2
        f.seek(0, os.SEEK_END)
        f.write(b"ab")
    assert p.read_bytes() == b"01ab"
    run("truncate", "-s", "1M", p)
    assert os.stat(p).st_size == 1 << 20
    assert p.read_bytes() == b"01ab" + b"\0" * ((1 << 20) - 4)
    os.truncate(p, 0)
    assert p.read_bytes() == b""


def test_utimens_chmod_chown(mounted: Mount) -> None:
    p = mounted.mountpoint / "meta"
    p.write_text("x")
    os.utime(p, ns=(1_500_000_000_111_111_111, 1_400_000_000_987_654_321))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_500_000_000_111_111_111,
                                                1_400_000_000_987_654_321)
    run("touch", "-m", "-d", "2001-02-03 04:05:06.123456789", p)
    assert os.stat(p).st_mtime_ns % 1_000_000_000 == 123456789
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chmod(p, 0o640)
    os.chown(p, NOBODY, NOBODY)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    (mounted.mountpoint / "dir").mkdir()
    os.chmod(mounted.mountpoint / "dir", 0o711)
    os.utime(mounted.mountpoint / "dir", ns=(5, 1_000_000_000_000_000_001))
    os.symlink("meta", mounted.mountpoint / "sym")
    os.chown(mounted.mountpoint / "sym", NOBODY, NOBODY, follow_symlinks=False)
    mtime = os.stat(p).st_mtime_ns
    mounted.stop()
    st = os.stat(p)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (
        NOBODY, NOBODY, 0o640, mtime)
    dst = os.stat(mounted.mountpoint / "dir")
    assert (stat.S_IMODE(dst.st_mode), dst.st_mtime_ns) == (0o711, 1_000_000_000_000_000_001)
    assert os.lstat(mounted.mountpoint / "sym").st_uid == NOBODY
    assert os.stat(mounted.mountpoint / "sym").st_uid == NOBODY  # the target kept its owner


def test_xattrs(mounted: Mount) -> None:
    p = mounted.mountpoint / "x"
    p.write_text("x")
    d = mounted.mountpoint / "dir"
    d.mkdir()
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.bin", bytes(range(256)))
    run("setfattr", "-n", "user.tool", "-v", "from-setfattr", p)
    assert os.getxattr(p, "user.tool") == b"from-setfattr"
    r = run("getfattr", "-d", "--absolute-names", p)
    assert 'user.one="1"' in r.stdout
    assert 'user.tool="from-setfattr"' in r.stdout
    assert os.getxattr(p, "user.bin") == bytes(range(256))
    assert set(os.listxattr(p)) >= {"user.one", "user.bin", "user.tool"}
    assert errno_of(os.getxattr, p, "user.absent") == errno.ENODATA
    assert errno_of(os.setxattr, p, "user.one", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, p, "user.new", b"2", os.XATTR_REPLACE) == errno.ENODATA
    os.removexattr(p, "user.one")
    assert errno_of(os.removexattr, p, "user.one") == errno.ENODATA
    assert "user.one" not in os.listxattr(p)
    os.setxattr(d, "user.dir", b"on a dir")
    assert os.getxattr(d, "user.dir") == b"on a dir"
    mounted.stop()
    assert os.getxattr(p, "user.tool") == b"from-setfattr"
    assert os.getxattr(d, "user.dir") == b"on a dir"


def test_acls_and_labels_are_not_supported_through_the_mount(
        store: Path, mount_factory: MountFactory, tmp_path: Path) -> None:
    """POSIX ACLs (and SELinux labels where SELinux is not running) answer EOPNOTSUPP through
    the mount, as on a filesystem without them, since the kernel would not enforce an ACL there:
    `setfacl` refuses, `getfacl` and `cp -a` work from the mode alone, the names are not listed,
    and the backing files keep theirs. `ls -l` then asks the daemon for each name once per run,
    not once per file."""
    labels = not os.path.isdir("/sys/fs/selinux")
    names = ["system.posix_acl_access"] + (["security.selinux"] if labels else [])
    (store / "d").mkdir()
    for i in range(20):
        (store / "d" / f"f{i}.txt").write_text(f"{i}\n")
    (store / "d" / "z.jsonl").write_bytes(b"")
    run("zstd", "-q", "--rm", store / "d" / "z.jsonl")  # shown as z.jsonl
    run("setfacl", "-m", "u:nobody:r", store / "d" / "f0.txt")
    os.setxattr(store / "d" / "f0.txt", "user.kept", b"yes")
    m = mount_factory(store, start=False).start(env={**os.environ, "ZSTFS_OPSTATS": "1"})
    d = m.mountpoint / "d"
    for f in (d / "f0.txt", d / "f1.txt", d / "z.jsonl", d):
        for name in names:
            assert errno_of(os.getxattr, f, name) == errno.EOPNOTSUPP, (f, name)
        assert errno_of(os.getxattr, f, "system.posix_acl_default") == errno.EOPNOTSUPP
        assert not set(os.listxattr(f)) & {*names, "system.posix_acl_default"}
    assert os.listxattr(d / "f0.txt") == ["user.kept"]
    r = run("setfacl", "-m", "u:nobody:rw", d / "f1.txt", check=False)
    assert r.returncode != 0
    assert "not supported" in r.stderr
    assert errno_of(os.removexattr, d / "f0.txt", "system.posix_acl_access") == errno.EOPNOTSUPP
    os.chmod(d / "f1.txt", 0o640)
    assert "user::rw-\ngroup::r--\nother::---" in run("getfacl", "-c", d / "f1.txt").stdout
    run("cp", "-a", d / "f0.txt", tmp_path / "copy")  # exits 0: nothing to copy, nothing failed
    assert (tmp_path / "copy").read_text() == "0\n"

    before = m.status()["requests"]["count"]
    listing = run("ls", "-l", d).stdout
    assert "z.jsonl" in listing
    assert not [line for line in listing.splitlines()[1:] if line[10:11] in ("+", ".")]
    # A request after the listing, to know when the counters include it (answered in order).
    assert not (m.mountpoint / "marker-after-ls").exists()
    after = wait_until(
        lambda: (c := m.status()["requests"]["count"]).get("lookup", 0)
        > before.get("lookup", 0) and c, 10, "the counters to show the marker lookup")
    # GNU ls asked each file for both names while the daemon answered ENODATA (44 here).
    assert after.get("getxattr", 0) - before.get("getxattr", 0) <= len(names)
    m.stop()
    assert "user:nobody:r--" in run("getfacl", "-c", store / "d" / "f0.txt").stdout
    assert run("getfacl", "-c", store / "d" / "f1.txt").stdout.count("user:") == 1  # user::


def test_statfs(mounted: Mount, tmp_path: Path) -> None:
    through = os.statvfs(mounted.mountpoint)
    disk = os.statvfs(tmp_path)  # the same filesystem as the backing directory
    assert through.f_bsize == disk.f_bsize
    assert through.f_frsize == disk.f_frsize
    assert through.f_blocks == disk.f_blocks
    assert abs(through.f_bavail - disk.f_bavail) * disk.f_frsize < 1 << 30
    assert through.f_files == disk.f_files
    assert 0 < through.f_namemax <= disk.f_namemax
    r = run("df", "-P", mounted.mountpoint)
    assert str(mounted.mountpoint) in r.stdout


def test_open_flags(mounted: Mount) -> None:
    p = mounted.mountpoint / "flags"
    old = os.umask(0o022)
    try:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o666)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o644
    os.write(fd, b"hello")
    os.close(fd)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b" world")  # O_APPEND ignores the position
    os.pwrite(fd, b"!", 0)  # ... and so does pwrite on Linux
    os.close(fd)
    assert p.read_bytes() == b"hello world!"
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"ab")
    os.close(fd)
    assert p.read_bytes() == b"ab"
    assert errno_of(os.open, p, os.O_CREAT | os.O_EXCL | os.O_RDWR) == errno.EEXIST
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)  # exists: opened, mode unchanged
    assert os.read(fd, 10) == b"ab"
    os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    fd = os.open(mounted.mountpoint / "excl", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    assert stat.S_IMODE(os.stat(mounted.mountpoint / "excl").st_mode) == 0o600
    fd = os.open(p, os.O_RDONLY)
    assert errno_of(os.write, fd, b"x") == errno.EBADF
    os.close(fd)
    fd = os.open(p, os.O_WRONLY)
    assert errno_of(os.read, fd, 1) == errno.EBADF
    os.close(fd)


# ---------------------------------------------------------- 6. open files outlive names
def test_open_file_survives_unlink(mounted: Mount) -> None:
    p = mounted.mountpoint / "doomed"
    p.write_bytes(b"first\n")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        assert os.fstat(fd).st_nlink == 0
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, b"second\n")
        assert os.pread(fd, 100, 0) == b"first\nsecond\n"
        assert os.fstat(fd).st_size == len(b"first\nsecond\n")
        os.ftruncate(fd, 6)
        os.fchmod(fd, 0o600)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        assert os.pread(fd, 100, 0) == b"first\n"
        p.write_bytes(b"a new file under the old name\n")
        assert os.pread(fd, 100, 0) == b"first\n"
    finally:
        os.close(fd)
    assert p.read_bytes() == b"a new file under the old name\n"
    assert os.listdir(mounted.mountpoint) == ["doomed"]


@pytest.mark.timeout(60)
def test_open_file_in_another_process_survives_rename(mounted: Mount) -> None:
    m = mounted.mountpoint
    (m / "a").mkdir()
    (m / "b").mkdir()
    p = m / "a" / "f.txt"
    p.write_bytes(b"start\n")
    child = spawn("""
        import os, sys
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)
        print("open", flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            os.write(fd, (cmd + "\\n").encode())
            print("read", os.pread(fd, 1 << 20, 0).decode().replace("\\n", "|"), flush=True)
        os.close(fd)
        """, p)
    out = Reader(child)
    try:
        out.until(lambda b: b"open\n" in b, 10, "the child to open the file")
        assert child.stdin is not None

        def say(cmd: str, want: str) -> None:
            n = out.buf.count(b"\n")
            tell(child, cmd)
            out.until(lambda b: b.count(b"\n") > n, 10, f"the child to answer {cmd}")
            assert out.buf.splitlines()[-1].decode() == f"read {want}"

        say("one", "start|one|")
        os.rename(p, m / "b" / "g.txt")
        say("two", "start|one|two|")
        assert (m / "b" / "g.txt").read_bytes() == b"start\none\ntwo\n"
        os.rename(m / "b", m / "c")  # the directory too
        say("three", "start|one|two|three|")
        assert (m / "c" / "g.txt").read_bytes() == b"start\none\ntwo\nthree\n"
        os.unlink(m / "c" / "g.txt")
        say("four", "start|one|two|three|four|")
        tell(child, "quit")
        assert child.wait(timeout=10) == 0
    finally:
        reap(child)
    assert os.listdir(m / "c") == []


# ------------------------------------------------------------ 7. concurrent O_APPEND
APPENDER = """
import os, sys
who, n = sys.argv[2], int(sys.argv[3])
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
for i in range(n):
    size = 200_000 if i % 7 == 3 else 40 + i % 100
    head = f"{who} {i:05d} "
    body = (head + chr(ord("a") + i % 26) * (size - len(head) - 1) + "\\n").encode()
    assert os.write(fd, body) == len(body)
os.close(fd)
"""


@pytest.mark.timeout(120)
def test_concurrent_o_append_lines_stay_whole(mounted: Mount) -> None:
    p = mounted.mountpoint / "shared.log"
    p.write_bytes(b"")
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(p), who, str(n)])
             for who in ("A", "B")]
    for proc in procs:
        assert proc.wait(timeout=90) == 0
    lines = p.read_bytes().split(b"\n")
    assert lines.pop() == b""
    seen: dict[tuple[str, int], int] = {}
    for line in lines:
        who, num, body = line.decode().split(" ", 2)
        i = int(num)
        size = 200_000 if i % 7 == 3 else 40 + i % 100
        assert body == chr(ord("a") + i % 26) * (size - len(who) - 7 - 1), (who, i)
        seen[(who, i)] = seen.get((who, i), 0) + 1
    assert seen == {(who, i): 1 for who in ("A", "B") for i in range(n)}
    assert os.stat(p).st_size == sum(len(line) + 1 for line in lines)


# -------------------------------------------------------------- 8. SQLite, locks
SQLITE_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
who, end, n = sys.argv[2], time.monotonic() + float(sys.argv[3]), 0
while time.monotonic() < end or n < 20:
    db.execute("BEGIN IMMEDIATE")
    for _ in range(5):
        db.execute("INSERT INTO t(who, n, pad) VALUES (?, ?, ?)", (who, n, "x" * (n % 3000)))
        n += 1
    db.execute("COMMIT")
    db.execute("SELECT count(*) FROM t").fetchone()
print(n)
db.close()
"""


@pytest.mark.timeout(120)
def test_sqlite_wal_two_writers(mounted: Mount) -> None:
    db = mounted.mountpoint / "state.sqlite"
    run("sqlite3", db, "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, "
        "who TEXT, n INTEGER, pad TEXT);")
    procs = [subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(db), who, "2"],
                              stdout=subprocess.PIPE, text=True) for who in ("A", "B")]
    written = {}
    for who, proc in zip(("A", "B"), procs, strict=True):
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0
        written[who] = int(out)
    assert min(written.values()) >= 20
    assert run("sqlite3", db, "PRAGMA integrity_check;").stdout.strip() == "ok"
    assert run("sqlite3", db, "PRAGMA journal_mode;").stdout.strip() == "wal"
    for who, n in written.items():
        r = run("sqlite3", db, f"SELECT count(*), count(DISTINCT n), min(n), max(n), "
                f"sum(length(pad)) FROM t WHERE who='{who}';")
        assert r.stdout.strip() == f"{n}|{n}|0|{n - 1}|{sum(i % 3000 for i in range(n))}"
    mounted.stop()
    # The same database read straight from the backing directory.
    assert run("sqlite3", db, "PRAGMA integrity_check;").stdout.strip() == "ok"
    assert int(run("sqlite3", db, "SELECT count(*) FROM t;").stdout) == sum(written.values())


LOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
if sys.argv[2] == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
print("done", flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_locks_exclude_across_processes(mounted: Mount, kind: str) -> None:
    p = mounted.mountpoint / "lockfile"
    p.write_text("")
    holder = spawn(LOCK_HOLDER, p, kind)
    waiter = None
    try:
        Reader(holder).until(lambda b: b"locked" in b, 10, "the holder to lock")
        fd = os.open(p, os.O_RDWR)
        try:
            if kind == "flock":
                assert errno_of(fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB) in (
                    errno.EWOULDBLOCK, errno.EAGAIN)
                assert errno_of(fcntl.flock, fd, fcntl.LOCK_SH | fcntl.LOCK_NB) in (
                    errno.EWOULDBLOCK, errno.EAGAIN)
            else:
                assert errno_of(fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB) in (
                    errno.EACCES, errno.EAGAIN)
        finally:
            os.close(fd)
        waiter = spawn(LOCK_HOLDER, p, kind)
        wout = Reader(waiter)
        with pytest.raises(AssertionError, match="timed out"):
            wout.until(lambda b: b"locked" in b, 1.0, "the waiter (must stay blocked)")
        tell(holder, "go")
        assert holder.wait(timeout=10) == 0
        wout.until(lambda b: b"locked" in b, 10, "the waiter to get the lock")
        tell(waiter, "go")
        assert waiter.wait(timeout=10) == 0
        fd = os.open(p, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
        os.close(fd)
    finally:
        reap(holder, waiter)


# ------------------------------------------------------ 9. mounted over its own source
def test_mount_over_source_shows_and_keeps_files(store: Path, mount_factory) -> None:
    (store / "sub").mkdir()
    data = os.urandom(300_000)
    (store / "sub" / "pre.bin").write_bytes(data)
    (store / "pre.jsonl").write_text('{"pre": true}\n')
    (store / "sub" / "pre.bin").chmod(0o640)
    os.utime(store / "sub" / "pre.bin", ns=(MTIME, MTIME))
    before = walk(store)
    m: Mount = mount_factory(store)
    assert walk(store) == before
    assert not (store / ".zstfs.lock").exists()  # zstfs's own files are hidden
    with open(store / "pre.jsonl", "a") as f:
        f.write('{"during": true}\n')
    (store / "sub" / "new.txt").write_text("written through the mount\n")
    (store / "newdir").mkdir()
    os.unlink(store / "sub" / "pre.bin")
    m.stop()
    assert (store / "pre.jsonl").read_text() == '{"pre": true}\n{"during": true}\n'
    assert (store / "sub" / "new.txt").read_text() == "written through the mount\n"
    assert (store / "newdir").is_dir()
    assert not (store / "sub" / "pre.bin").exists()


# ---------------------------------------------------------------------- 10. mmap
MMAP_WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)  # the mapping keeps the open file
print("mapped", flush=True)
sys.stdin.readline()
for off in (0, 4096 * 3 + 17, len(mm) - 5):
    mm[off:off + 5] = b"MMAP!"
mm.flush()  # msync
mm.close()
print("synced", flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("appender_open", [False, True], ids=["alone", "with-o_append-open"])
def test_shared_mmap_write_is_seen_by_another_process(mounted: Mount,
                                                      appender_open: bool) -> None:
    """A shared writable mapping's pages reach the file at their offsets, even while another
    process opened the file with O_APPEND after the mapping was made (the kernel writes pages
    back through whichever writable handle of the inode it picks)."""
    p = mounted.mountpoint / "mapped.bin"
    original = bytearray(os.urandom(64 * 1024))
    p.write_bytes(original)
    writer = spawn(MMAP_WRITER, p)
    holder = None
    try:
        wout = Reader(writer)
        wout.until(lambda b: b"mapped" in b, 10, "the writer to map the file")
        if appender_open:
            holder = spawn("""
                import os, sys
                fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
                print("open", flush=True)
                sys.stdin.readline()
                """, p)
            Reader(holder).until(lambda b: b"open" in b, 10, "the O_APPEND holder")
        tell(writer, "go")
        wout.until(lambda b: b"synced" in b, 10, "the writer to msync")
        assert writer.wait(timeout=10) == 0
        for off in (0, 4096 * 3 + 17, len(original) - 5):
            original[off:off + 5] = b"MMAP!"
        r = python("""
            import hashlib, sys
            data = open(sys.argv[1], "rb").read()
            print(len(data), hashlib.sha256(data).hexdigest())
            """, p)
        assert r.stdout.split() == [str(len(original)), hashlib.sha256(original).hexdigest()]
    finally:
        reap(writer, holder)
    assert p.read_bytes() == bytes(original)
    mounted.stop()
    assert p.read_bytes() == bytes(original)


def test_mmap_read_sees_writes(mounted: Mount) -> None:
    p = mounted.mountpoint / "ro.bin"
    p.write_bytes(b"a" * 10000)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:3] == b"aaa"
        python("""
            import os, sys
            fd = os.open(sys.argv[1], os.O_WRONLY)
            os.pwrite(fd, b"bbb", 0)
            os.close(fd)
            """, p)
        assert mm[:3] == b"bbb"


# ------------------------------------------------------------------ 11. forgetting
def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def drop_caches() -> str | None:
    """Drop the kernel's dentry and inode caches (so it sends FORGETs); why not, or None."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
    except OSError as e:
        return f"cannot drop kernel caches here: {e}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_daemon_forgets_what_the_kernel_forgets(mounted: Mount) -> None:
    d = mounted.mountpoint / "many"
    d.mkdir()
    n = 20_000
    python("""
        import os, sys
        d = sys.argv[1]
        for i in range(int(sys.argv[2])):
            fd = os.open(os.path.join(d, f"file-{i:05d}.txt"), os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"%d\\n" % i)
            os.close(fd)
        """, d, str(n), timeout=200)
    why = drop_caches()
    if why is not None:
        pytest.skip(why)
    rss = []
    for _ in range(4):
        out = run("ls", "-l", d, timeout=120).stdout
        assert len(out.splitlines()) == n + 1  # "total" + one line per file
        assert int(run("sh", "-c", f"find '{d}' -type f | wc -l", timeout=120).stdout) == n
        assert mounted.status()["known_inodes"] > n  # the kernel holds them all right now
        assert drop_caches() is None
        # The kernel forgot the dentries; the daemon's table must shrink with it.
        wait_until(lambda: mounted.status()["known_inodes"] < n // 10, 30,
                   "the daemon to forget the inodes the kernel forgot")
        rss.append(rss_kib(mounted.pid))
    # Walking again must not add to the daemon's memory (generous: allocator noise).
    assert rss[3] <= rss[1] * 1.25 + 16 * 1024, f"daemon RSS grew across walks: {rss} KiB"
    assert mounted.status()["open_files"] == 0
    assert (d / "file-12345.txt").read_text() == "12345\n"


def test_inode_number_survives_kernel_forgetting(store: Path, mount_factory) -> None:
    """Inode numbers stay the same for the life of the mount: after the kernel forgets an idle
    file, and after a compressed file was promoted to plain form in between."""
    (store / "c.jsonl").write_bytes(b'{"a":1}\n' * 1000)
    subprocess.run(["zstd", "-q", "--rm", str(store / "c.jsonl")], check=True)
    mounted = mount_factory(store)
    p = mounted.mountpoint / "f.txt"
    p.write_text("x")
    c = mounted.mountpoint / "c.jsonl"
    ino, cino = os.stat(p).st_ino, os.stat(c).st_ino
    why = drop_caches()
    if why is not None:
        pytest.skip(why)
    assert os.stat(p).st_ino == ino
    assert os.stat(c).st_ino == cino
    with open(c, "ab") as f:  # promotes: the backing inode changes, the number must not
        f.write(b'{"b":2}\n')
    assert os.stat(c).st_ino == cino
    drop_caches()
    assert os.stat(c).st_ino == cino
    assert os.stat(p).st_ino == ino
    mounted.stop()
    assert sorted(os.listdir(store)) == [".zstfs.lock", "c.jsonl", "f.txt"]
