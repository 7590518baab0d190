"""The core promise on real mounts: an open file is never swapped out, and a swap never
acts outside the store or on a file it did not compress.

Every test runs real processes against a real `zstfs mount --foreground` (or, for `zstfs
compress`, an unmounted store) and watches the backing directory from below through a descriptor
opened before the mount (`Backing`). Synchronisation is on observable events only (a status
counter, a `.zstfs-tmp.*` appearing below, a holder saying "ready"), never on sleeps. Every test
checks every byte: through the mount, and from the backing files (`zstd -d` for `.zst`).

What is proved, scenario by scenario:

1. A descriptor opened *before* the mount (a shell holding `exec 3>>file` or `exec 4<file`, and
   a process that only keeps a writable shared mapping) stops the compactor: the kernel refuses
   it the write lease, `swaps_busy` counts it, the file stays plain below; the lines appended
   (and the bytes written through the mapping) after the compactor passed over it are all there
   once it is finally compressed. A process working under the mount (its cwd from before it)
   that opens a file while the compactor compresses it breaks the daemon's lease: the swap is
   abandoned and its line kept; one that opens it in the publish itself (the `.zst` is in, the
   plain name about to go) gets the plain file back, with its line.
2. `zstfs compress` beside a writer and no mount: a file held open for append, and one only
   mapped, are left plain and reported as in use (exit 0) while the others are compressed; a
   writer that opens the file *while* it is being compressed (seen by its temp appearing) makes
   compress abandon it, and the writer's bytes are in the plain file.
3. A directory handle opened (listed or not) before a swap, listed after it, with the swapped
   file open for append: the appended line is never lost, whether listed before or after the
   write, for one file or several, and across a dozen swap-promote cycles under one handle.
5. (a) Two store directories exchanged through the mount hundreds of times while the compactor
   works over their files: every file keeps its content, in exactly one form, no temp left.
   (b) A store directory replaced by a symlink to a directory outside the store (through the
   mount, while files are queued and in flight; and a link left where a directory was moved to
   another disk before the mount): nothing outside the store is read into a `.zst`, renamed,
   unlinked or changed. (c) The same attack by an unprivileged user (uid 65534) on a root daemon
   with `--allow-other`, aimed at a root-only 0600 file: untouched.
13. Renaming the directory of a file being promoted (an append to a big compressed file): the
   write succeeds, no temp is left, the emptied directory can be removed. Renaming the directory
   of a file being compressed: the swap completes in the renamed directory, or an open under
   the new path abandons it there; no temp is left.
   Unlinking a file being compressed cancels the work within about one frame, and its emptied
   directory can be removed at once (no ENOTEMPTY from a leftover temp).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness.backing import (
    TEMP_PREFIX,
    Backing,
    backing,
    idle,
    needs_zstd,
    rollout,
    zstd_decode,
    zstfs_cli,
)
from harness.mount import (
    Mount,
    MountFactory,
    is_mounted,
    lazy_unmount,
    reap,
    shared_tmp,
    wait_until,
)

from zstfs import codec

MiB = 1 << 20
FRAME = 32 * MiB  # the codec's frame size: a swap notices a lease break or an abandon per frame
NOBODY = 65534
AT_FDCWD = -100
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): `a` and `b` trade places atomically."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def old_mtime(path: Path, days: float = 8) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t), follow_symlinks=False)


def small_file(path: Path, tag: str, lines: int = 120) -> bytes:
    """A small compressible rollout-like file whose every line names it (cheap to make by the
    hundred); old mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(b'{"file":"%s","line":%d,"payload":"%s"}\n'
                    % (tag.encode(), i, hashlib.sha256(f"{tag}{i}".encode()).hexdigest().encode())
                    for i in range(lines))
    path.write_bytes(data)
    old_mtime(path)
    return data


@functools.cache
def _block() -> bytes:
    """One frame's worth of varied JSON lines (generated once per session)."""
    out = []
    size = i = 0
    while size < FRAME:
        line = b'{"seq":%d,"hex":"%s"}\n' % (i, os.urandom(48).hex().encode())
        out.append(line)
        size += len(line)
        i += 1
    return b"".join(out)[:FRAME - 1] + b"\n"


def big_file(path: Path, frames: int) -> str:
    """A plain file of `frames` full frames plus a short tail (each frame as slow to compress as
    any other); old mtime. Returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    block = _block()
    tail = b'{"tail":"%s"}\n' % (b"t" * 1000)
    with open(path, "wb") as f:
        for _ in range(frames):
            f.write(block)
            h.update(block)
        f.write(tail)
        h.update(tail)
    old_mtime(path)
    return h.hexdigest()


def file_sha(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def temps_in(b: Backing, sub: str) -> list[str]:
    try:
        return [n for n in b.names(sub) if n.startswith(TEMP_PREFIX)]
    except FileNotFoundError:
        return []


def _fingerprint(top: Path) -> dict[str, tuple[object, ...]]:
    """Inode, mode, owner, size, link count, mtime and ctime of everything below `top` (never
    following a symlink), and a regular file's atime, taken before anything is read."""
    out: dict[str, tuple[object, ...]] = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            st = os.lstat(Path(d) / n)
            atime = st.st_atime_ns if stat.S_ISREG(st.st_mode) else None
            out[str((Path(d) / n).relative_to(top))] = (
                st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                st.st_mtime_ns, st.st_ctime_ns, atime)
    return out


def _contents(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): file_sha(p) for p in top.rglob("*")
            if stat.S_ISREG(os.lstat(p).st_mode)}


def freeze(top: Path) -> tuple[dict[str, tuple[object, ...]], dict[str, str]]:
    """What a stray swap could change below `top` (outside the store): the content of every
    file, and the metadata of everything. The regular files' atimes are set back a week after
    hashing, so that any later read of them (a compression) moves their atime (relatime)."""
    digests = _contents(top)
    week = time.time_ns() - 7 * 86400 * 10**9
    for rel in digests:
        p = top / rel
        os.utime(p, ns=(week, os.lstat(p).st_mtime_ns))
    return _fingerprint(top), digests


def untouched(top: Path, frozen: tuple[dict[str, tuple[object, ...]], dict[str, str]]) -> None:
    meta = _fingerprint(top)  # before reading anything
    assert meta == frozen[0], {k: (frozen[0].get(k), v) for k, v in meta.items()
                               if frozen[0].get(k) != v} or set(frozen[0]) - set(meta)
    assert _contents(top) == frozen[1]


def settled(m: Mount, **expected: int) -> None:
    """Wait until the status counters have exactly these values (the status document the
    daemon serves may be up to a second old)."""
    wait_until(lambda: all(m.status()[k] == v for k, v in expected.items()), 10,
               f"status {expected}")


def stored(b: Backing, name: str) -> bytes:
    """The logical content of `name` from the backing store: exactly one form must exist."""
    compressed, plain = b.is_compressed(name), b.is_plain(name)
    assert compressed != plain, f"{name}: plain {plain}, compressed {compressed}"
    return zstd_decode(b.read(name + ".zst")) if compressed else b.read(name)


# ---------------------------------------------------------------------------------------------
# 1. a descriptor opened before the mount

SHELL_APPEND_HOLDER = r"""
exec 3>>"$1"
echo ready
read -r _
printf '%s\n' "$2" >&3
printf '%s\n' "$3" >&3
exec 3>&-
echo done
"""

SHELL_READ_HOLDER = r"""
exec 4<"$1"
echo ready
read -r _
head -c 100 <&4 >/dev/null
exec 4<&-
echo done
"""

MMAP_HOLDER = r"""
import ctypes, os, sys
path, patch = sys.argv[1], sys.argv[2].encode()
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
addr = libc.mmap(None, size, 3, 1, fd, 0)  # PROT_READ|PROT_WRITE, MAP_SHARED
assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)  # from now on only the mapping holds the file
print("ready", flush=True)
sys.stdin.readline()
ctypes.memmove(addr + size - len(patch), patch, len(patch))  # overwrite the last line in place
assert libc.msync(addr, size, 4) == 0  # MS_SYNC
assert libc.munmap(addr, size) == 0
print("done", flush=True)
"""


class Holder:
    """A process started with a file open (or mapped), told when to write and let go."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready", f"holder {argv} did not start"

    def finish(self) -> None:
        out, _ = self.proc.communicate("go\n", timeout=30)
        assert self.proc.returncode == 0, out
        assert out.strip() == "done", out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@needs_zstd
@pytest.mark.timeout(120)
def test_descriptor_and_mapping_from_before_the_mount_stop_the_swap(
        store: Path, mount_factory: MountFactory) -> None:
    """A shell holding `exec 3>>held.jsonl`, a shell holding `exec 4<reader.jsonl` and a
    process keeping only a writable shared mapping of mapped.jsonl, all started before the
    mount: `zstfs mount` refuses the store in use; `zstfs mount --force --compress-after 0`
    mounts it (status warns), and the compactor compresses the other cold files and passes over
    these three (`swaps_busy`), which stay plain; the holders then write (two lines; bytes
    through the mapping) and let go; a read through the mount releases the files (the busy
    retry would too, 30 s later), they are compressed, and every byte is there, through the
    mount and in `zstd -d` of the backing files after unmount."""
    cold = {f"sessions/cold{i}.jsonl": rollout(store / f"sessions/cold{i}.jsonl", 150_000,
                                               seed=100 + i) for i in range(3)}
    held = rollout(store / "sessions/held.jsonl", 200_000, seed=110)
    reader = rollout(store / "sessions/reader.jsonl", 100_000, seed=112)
    pad = b'{"pad":"' + b"." * 200 + b'"}\n'
    mapped_path = store / "sessions/mapped.jsonl"
    mapped = rollout(mapped_path, 200_000, seed=111)
    with open(mapped_path, "ab") as f:
        f.write(pad)
    old_mtime(mapped_path)
    mapped += pad
    patch = '{"pad":"' + "written through the mapping".ljust(200, "!") + '"}\n'
    assert len(patch) == len(pad)
    lines = ['{"late":1,"text":"after the compactor passed"}', '{"late":2,"text":"last line"}']

    holders: list[Holder] = []
    with backing(store) as b:
        try:
            holders.append(Holder(["sh", "-c", SHELL_APPEND_HOLDER, "sh",
                                   str(store / "sessions/held.jsonl"), *lines]))
            holders.append(Holder(["sh", "-c", SHELL_READ_HOLDER, "sh",
                                   str(store / "sessions/reader.jsonl")]))
            holders.append(Holder([sys.executable, "-c", MMAP_HOLDER, str(mapped_path), patch]))
            # The mount refuses a store in use; forced (as after a crash, or by a user who
            # insists), the leases must still keep the held files plain.
            r = zstfs_cli("mount", "--compress-after", "0", "--log",
                          str(store.parent / "refused.log"), str(store))
            if is_mounted(store):
                lazy_unmount(store)
            assert r.returncode == 1, r.stderr
            assert "in use by" in r.stderr, r.stderr
            m = mount_factory(store, "--compress-after", "0", "--force")
            assert any("held.jsonl" in w for w in m.status()["warnings"]), m.status()
            held_names = ("sessions/held.jsonl", "sessions/reader.jsonl", "sessions/mapped.jsonl")

            def passed_over() -> bool:
                for name in held_names:
                    assert b.is_plain(name), f"{name} was swapped while held"
                return (all(b.is_compressed(n) for n in cold)
                        and m.status()["swaps_busy"] >= len(held_names))

            wait_until(passed_over, 30,
                       "the cold files to be compressed and the held ones to be found busy")
            wait_until(lambda: idle(m), 20, "the compactor to go idle")
            assert m.status()["open_file_accounting"] == "lease"
            settled(m, swaps_done=len(cold))
            assert all(b.is_plain(name) for name in held_names)
            assert b.read("sessions/held.jsonl") == held
            assert b.read("sessions/reader.jsonl") == reader
            assert b.read("sessions/mapped.jsonl") == mapped
            assert b.temps() == []

            for h in holders:
                h.finish()
        finally:
            for h in holders:
                h.kill()
        expected = {
            "sessions/held.jsonl": held + "".join(f"{x}\n" for x in lines).encode(),
            "sessions/reader.jsonl": reader,
            "sessions/mapped.jsonl": mapped[:-len(pad)] + patch.encode(),
        }
        for name, data in expected.items():
            assert b.is_plain(name), name
            assert b.read(name) == data, name
            # The first look at these files through the mount (after the holders are gone, so
            # no attributes were cached before they wrote): every byte is there, and the
            # release queues the file for the compactor.
            assert (store / name).read_bytes() == data, name
        wait_until(lambda: all(b.is_compressed(n) for n in expected), 30,
                   "the released files to be compressed")
        for name, data in {**cold, **expected}.items():
            assert (store / name).read_bytes() == data, name
        settled(m, swaps_done=len(cold) + len(expected))
        m.stop()
        for name, data in {**cold, **expected}.items():
            assert stored(b, name) == data, name
        assert b.temps() == []


BELOW_THE_MOUNT_WRITER = r"""
import os, sys, time
name, line = sys.argv[1], sys.argv[2].encode()
print("ready", flush=True)  # its working directory is the store *under* the mount from now on
sys.stdin.readline()
deadline = time.monotonic() + 60
while not any(n.startswith(".zstfs-tmp.") for n in os.listdir(".")):
    if time.monotonic() > deadline:
        sys.exit("no temp file appeared")
    time.sleep(0.001)  # a poll interval, not a synchronisation
fd = os.open(name, os.O_WRONLY | os.O_APPEND)  # blocks on the daemon's lease
try:
    assert os.write(fd, line) == len(line)
finally:
    os.close(fd)
print("wrote", flush=True)
"""


@pytest.mark.timeout(120)
def test_open_below_the_mount_during_a_swap_abandons_it(store: Path,
                                                        mount_factory: MountFactory) -> None:
    """A process whose working directory is the store from before the mount (so it opens the
    backing files, as a codex started earlier does) waits for the compactor's temp beside
    big.jsonl (97 MiB, level 6), then opens big.jsonl for append and writes a line: the
    daemon's lease breaks, the swap is abandoned (`swaps_busy`), the line is in the plain file;
    released through the mount later, the file is compressed with every byte."""
    digest = big_file(store / "big.jsonl", 3)
    size = os.path.getsize(store / "big.jsonl")
    line = '{"written":"below the mount, during the swap"}\n'
    writer = subprocess.Popen([sys.executable, "-c", BELOW_THE_MOUNT_WRITER, "big.jsonl", line],
                              cwd=store, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        with backing(store) as b:
            # (Its working directory makes the store "in use": the mount must be forced.)
            m = mount_factory(store, "--compress-after", "0", "--level", "6", "--force")
            out, _ = writer.communicate("go\n", timeout=60)
            assert writer.returncode == 0, out
            assert out.strip() == "wrote", out
            wait_until(lambda: m.status()["swaps_busy"] >= 1, 30, "the swap to be found busy")
            wait_until(lambda: idle(m), 20, "the compactor to settle")
            settled(m, swaps_done=0)
            assert sorted(b.names()) == [".zstfs.lock", "big.jsonl"]
            assert os.path.getsize(b.path("big.jsonl")) == size + len(line)
            # Read through the mount (its first lookup, after the write): every byte, and the
            # release queues the file again.
            with open(store / "big.jsonl", "rb") as f:
                assert hashlib.sha256(f.read(size)).hexdigest() == digest
                assert f.read() == line.encode()
            wait_until(lambda: b.is_compressed("big.jsonl"), 60, "the file to be compressed")
            settled(m, swaps_done=1)
            with open(store / "big.jsonl", "rb") as f:
                assert hashlib.sha256(f.read(size)).hexdigest() == digest
                assert f.read() == line.encode()
            m.stop()
            assert b.temps() == []
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


PUBLISH_RACER = r"""
import os, sys, time
line = sys.argv[1].encode()
print("ready", flush=True)  # its working directory is the store *under* the mount from now on
sys.stdin.readline()
done = set()
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    present = set(os.listdir("."))
    if "stop" in present:
        break
    for zname in sorted(present):
        name = zname[:-4]
        if not zname.endswith(".jsonl.zst") or name in done:
            continue
        done.add(name)  # the swap is publishing it (or has just published it)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_APPEND)  # no O_CREAT: codex resuming
        except FileNotFoundError:
            print(name, "gone", flush=True)
            continue
        try:
            assert os.write(fd, line) == len(line)
        finally:
            os.close(fd)
        print(name, "wrote", flush=True)
print("end", flush=True)
"""


@needs_zstd
@pytest.mark.timeout(180)
def test_open_below_the_mount_during_the_publish_loses_nothing(
        store: Path, mount_factory: MountFactory) -> None:
    """A process working under the mount watches for each `NAME.zst` to appear (the publish
    step: the `.zst` is renamed in, the plain name is about to go) and opens NAME for append at
    once, without O_CREAT, as a resumed codex would. Either the open comes too late (ENOENT;
    the file is compressed, unchanged) or it lands in the publish, blocks on the lease, and the
    daemon puts the plain file back (the undo): the line is then in the plain file. Rounds of
    twelve files written through the mount go on until at least one open landed in a publish
    (at most six). Nothing written is lost, each file has exactly one form, nothing is set
    aside."""
    line = '{"written":"below the mount, during the publish"}\n'
    racer = subprocess.Popen([sys.executable, "-c", PUBLISH_RACER, line], cwd=store,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    content: dict[str, bytes] = {}
    results: dict[str, str] = {}
    try:
        assert racer.stdout is not None
        assert racer.stdout.readline().strip() == "ready"
        assert racer.stdin is not None
        with backing(store) as b:
            m = mount_factory(store, "--compress-after", "0", "--force")
            racer.stdin.write("go\n")
            racer.stdin.flush()
            for round_ in range(6):
                batch = [f"r{round_}-{i:02d}.jsonl" for i in range(12)]
                for n in batch:  # through the mount: compressed as soon as closed
                    content[n] = small_file(store / n, n, lines=2000)
                while not set(batch) <= set(results):
                    name, result = racer.stdout.readline().split()
                    results[name] = result
                if "wrote" in results.values():
                    break
            (store / "stop").write_bytes(b"")
            assert racer.stdout.readline().strip() == "end"
            assert racer.wait(timeout=30) == 0
            wrote = {n for n, r in results.items() if r == "wrote"}
            print(f"{len(wrote)} of {len(results)} opens landed in a publish")
            assert wrote, "no open ever landed in a publish"
            # Each open that landed in a publish made that swap undo itself and end busy.
            wait_until(lambda: m.status()["swaps_busy"] >= len(wrote) and idle(m), 20,
                       "the undone swaps to end and the compactor to settle")
            for n, data in content.items():
                expected = data + (line.encode() if n in wrote else b"")
                assert stored(b, n) == expected, (n, results[n])
            # The kernel still caches the sizes of the files created through the mount, from
            # before the line was appended below it (README, Limitations). An open and close
            # through the mount queues them again; the swap invalidates the cached attributes.
            for n in wrote:
                os.close(os.open(store / n, os.O_RDONLY))
            wait_until(lambda: all(b.is_compressed(n) for n in content), 30,
                       "the files written below the mount to be compressed")
            for n, data in content.items():
                expected = data + (line.encode() if n in wrote else b"")
                assert (store / n).read_bytes() == expected, n
            m.stop()
            for n, data in content.items():
                expected = data + (line.encode() if n in wrote else b"")
                assert stored(b, n) == expected, (n, results[n])
            assert b.temps() == []
            assert not [n for n in b.names() if n.startswith(".zstfs-kept.")]
    finally:
        reap(racer)


# ---------------------------------------------------------------------------------------------
# 2. zstfs compress beside a writer, no mount

WAIT_FOR_TEMP_THEN_APPEND = r"""
import os, sys, time
d, name, line = sys.argv[1], sys.argv[2], sys.argv[3].encode()
print("ready", flush=True)
deadline = time.monotonic() + 60
while not any(n.startswith(".zstfs-tmp.") for n in os.listdir(d)):
    if time.monotonic() > deadline:
        sys.exit("no temp file appeared")
    time.sleep(0.001)  # a poll interval (the CPU is shared with compress), not a synchronisation
fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_APPEND)  # blocks on the lease
try:
    assert os.write(fd, line) == len(line)
finally:
    os.close(fd)
print("wrote", flush=True)
"""


@needs_zstd
@pytest.mark.timeout(120)
def test_offline_compress_leaves_a_file_held_open_plain(store: Path) -> None:
    """`zstfs compress --older-than 0` on an unmounted store while a shell holds held.jsonl
    open for append (`exec 3>>`) and a process keeps only a writable mapping of mapped.jsonl:
    exit 0, both reported in use and left plain, the other files compressed; the holders
    write afterwards (lines; bytes through the mapping) and nothing is lost; a second
    compress, with the holders gone, compresses both with what they wrote."""
    files = {
        "sessions/a.jsonl": rollout(store / "sessions/a.jsonl", 200_000, seed=200),
        "sessions/b.jsonl": rollout(store / "sessions/b.jsonl", 150_000, seed=201),
        "archived_sessions/c.jsonl": rollout(store / "archived_sessions/c.jsonl", 100_000,
                                             seed=202),
    }
    held = rollout(store / "sessions/held.jsonl", 200_000, seed=203)
    lines = ['{"after":"compress finished"}', '{"after":"second line"}']
    pad = b'{"pad":"' + b"." * 100 + b'"}\n'
    patch = '{"pad":"' + "written through the mapping".ljust(100, "!") + '"}\n'
    mapped = rollout(store / "sessions/mapped.jsonl", 100_000, seed=204)
    with open(store / "sessions/mapped.jsonl", "ab") as f:
        f.write(pad)
    old_mtime(store / "sessions/mapped.jsonl")
    holders = [Holder(["sh", "-c", SHELL_APPEND_HOLDER, "sh", str(store / "sessions/held.jsonl"),
                       *lines])]
    try:
        holders.append(Holder([sys.executable, "-c", MMAP_HOLDER,
                               str(store / "sessions/mapped.jsonl"), patch]))
        r = zstfs_cli("compress", "--older-than", "0", "--no-progress", str(store))
        assert r.returncode == 0, r.stderr
        for name in ("held", "mapped"):
            assert (f"zstfs: {store}/sessions/{name}.jsonl: open in another process; left plain"
                    in r.stderr.splitlines()), r.stderr
        assert "3 files compressed" in r.stdout, r.stdout
        assert "2 in use by another process left plain" in r.stdout, r.stdout
        assert "0 failed" in r.stdout, r.stdout
        with backing(store) as b:
            assert b.is_plain("sessions/held.jsonl")
            assert b.read("sessions/held.jsonl") == held
            assert b.is_plain("sessions/mapped.jsonl")
            assert b.read("sessions/mapped.jsonl") == mapped + pad
            for name, data in files.items():
                assert b.is_compressed(name), name
                assert zstd_decode(b.read(name + ".zst")) == data, name
            assert b.temps() == []
        for h in holders:
            h.finish()
    finally:
        for h in holders:
            h.kill()
    held += "".join(f"{x}\n" for x in lines).encode()
    mapped += patch.encode()
    assert (store / "sessions/held.jsonl").read_bytes() == held
    assert (store / "sessions/mapped.jsonl").read_bytes() == mapped

    r = zstfs_cli("compress", "--older-than", "0", "--no-progress", str(store))
    assert r.returncode == 0, r.stderr
    assert "2 files compressed" in r.stdout, r.stdout
    with backing(store) as b:
        for name, data in {**files, "sessions/held.jsonl": held,
                           "sessions/mapped.jsonl": mapped}.items():
            assert stored(b, name) == data, name
        assert b.temps() == []


@pytest.mark.timeout(180)
def test_offline_compress_abandons_a_file_opened_while_it_is_compressed(store: Path) -> None:
    """A writer waits for compress's temp file to appear beside big.jsonl (97 MiB, level 6:
    seconds of work), then opens big.jsonl for append and writes: its open waits on the lease,
    compress abandons the swap (reported in use, exit 0), the writer's line lands in the plain
    file, and no `.zst` or temp is left."""
    digest = big_file(store / "big.jsonl", 3)
    size = os.path.getsize(store / "big.jsonl")
    line = '{"written":"while compress was compressing"}\n'
    writer = subprocess.Popen([sys.executable, "-c", WAIT_FOR_TEMP_THEN_APPEND, str(store),
                               "big.jsonl", line], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        r = zstfs_cli("compress", "--older-than", "0", "--no-progress", "--level", "6",
                      str(store), timeout=120)
        out, _ = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, out
    assert out.strip() == "wrote", out
    assert r.returncode == 0, r.stderr
    assert f"zstfs: {store}/big.jsonl: open in another process; left plain" in r.stderr, r.stderr
    assert "0 files compressed" in r.stdout, r.stdout
    assert "1 in use" in r.stdout, r.stdout
    assert sorted(os.listdir(store)) == [".zstfs.lock", "big.jsonl"]
    assert os.path.getsize(store / "big.jsonl") == size + len(line)
    with open(store / "big.jsonl", "rb") as f:
        h = hashlib.sha256()
        remaining = size
        while remaining:
            chunk = f.read(min(8 * MiB, remaining))
            h.update(chunk)
            remaining -= len(chunk)
        assert h.hexdigest() == digest
        assert f.read() == line.encode()


# ---------------------------------------------------------------------------------------------
# 3. a directory handle opened before a swap


@needs_zstd
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("count", "order"), [(1, "list-then-write"), (1, "write-then-list"),
                                              (1, "unlisted-then-write"), (3, "interleaved")])
def test_directory_handle_from_before_a_swap(store: Path, mount_factory: MountFactory,
                                             count: int, order: str) -> None:
    """`d/` is opened and listed (or only opened) while its files are plain; the compactor
    swaps them; each file is opened for append through the mount, `d/` is listed again
    through the old handle (rewound, re-read through the same open file), a line is written
    (before or after that listing), the file is closed: every line is there, through the mount
    and in the backing store after unmount."""
    names = [f"x{i}.jsonl" for i in range(count)]
    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "0")
        d = store / "d"
        d.mkdir()
        content: dict[str, bytes] = {}
        writers = []
        for i, n in enumerate(names):
            # Created through the mount and kept open: the compactor leaves them alone for now.
            f = open(d / n, "wb")  # noqa: SIM115
            content[n] = b"".join(b'{"d":"%s","i":%d,"pad":"%s"}\n' % (n.encode(), j, b"p" * 80)
                                  for j in range(300 + i))
            f.write(content[n])
            f.flush()
            writers.append(f)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if order != "unlisted-then-write":  # else only opened (the daemon's opendir)
                assert sorted(os.listdir(dfd)) == names
            assert all(b.is_plain(f"d/{n}") for n in names)
            for f in writers:
                f.close()
            wait_until(lambda: all(b.is_compressed(f"d/{n}") for n in names), 20,
                       "the compactor to swap the files")

            fds = {n: os.open(d / n, os.O_WRONLY | os.O_APPEND) for n in names}
            try:
                for i, n in enumerate(names):
                    line = b'{"appended":"%s","after":"the swap"}\n' % n.encode()
                    if order != "write-then-list" and (order != "interleaved" or i % 2 == 0):
                        os.lseek(dfd, 0, os.SEEK_SET)
                        assert sorted(os.listdir(dfd)) == names
                        assert os.write(fds[n], line) == len(line)
                    else:
                        assert os.write(fds[n], line) == len(line)
                        os.lseek(dfd, 0, os.SEEK_SET)
                        assert sorted(os.listdir(dfd)) == names
                    content[n] += line
                os.lseek(dfd, 0, os.SEEK_SET)
                assert sorted(os.listdir(dfd)) == names
            finally:
                for fd in fds.values():
                    os.close(fd)
            os.lseek(dfd, 0, os.SEEK_SET)
            assert sorted(os.listdir(dfd)) == names
        finally:
            os.close(dfd)
        for n in names:
            assert (d / n).read_bytes() == content[n], n
        wait_until(lambda: idle(m), 20, "the compactor to settle")
        m.stop()
        for n in names:
            assert stored(b, f"d/{n}") == content[n], n
        assert b.temps() == []
        assert b.names("d") <= {*names, *(n + ".zst" for n in names)}


@needs_zstd
@pytest.mark.timeout(120)
def test_directory_handle_across_many_swaps(store: Path, mount_factory: MountFactory) -> None:
    """One directory handle kept open across twelve cycles of: the compactor swaps d/x.jsonl
    (seen below), the file is opened for append through the mount, `d/` is listed through the
    old handle, a line is written, the file is closed (which promoted it, and queues it to be
    swapped again). Every line is there, in order, through the mount and below."""
    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "0")
        d = store / "d"
        d.mkdir()
        content = b"".join(b'{"line":%d,"pad":"%s"}\n' % (j, b"q" * 100) for j in range(400))
        (d / "x.jsonl").write_bytes(content)
        (d / "y.txt").write_bytes(b"not compressible by name\n")
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert sorted(os.listdir(dfd)) == ["x.jsonl", "y.txt"]
            for cycle in range(12):
                wait_until(lambda: b.is_compressed("d/x.jsonl"), 20,
                           f"the swap of cycle {cycle}")
                fd = os.open(d / "x.jsonl", os.O_WRONLY | os.O_APPEND)
                try:
                    os.lseek(dfd, 0, os.SEEK_SET)
                    assert sorted(os.listdir(dfd)) == ["x.jsonl", "y.txt"]
                    line = b'{"cycle":%d}\n' % cycle
                    assert os.write(fd, line) == len(line)
                    content += line
                finally:
                    os.close(fd)
                assert (d / "x.jsonl").read_bytes() == content, cycle
        finally:
            os.close(dfd)
        wait_until(lambda: b.is_compressed("d/x.jsonl") and idle(m), 20,
                   "the last swap and the compactor to settle")
        settled(m, promotions=12)
        assert (d / "x.jsonl").read_bytes() == content
        m.stop()
        assert stored(b, "d/x.jsonl") == content
        assert b.temps() == []


# ---------------------------------------------------------------------------------------------
# 5. directory flips and symlink swaps under a running compactor


@needs_zstd
@pytest.mark.timeout(180)
def test_directory_flips_under_the_compactor_lose_nothing(store: Path,
                                                         mount_factory: MountFactory) -> None:
    """sessions/a and sessions/b hold 80 small cold files each under the same names with
    different content; while the compactor (`--compress-after 0`, two jobs) works through
    them, the two directories are exchanged through the mount (renameat2 RENAME_EXCHANGE,
    and every tenth flip as three plain renames) until the compactor is done, then once
    more if needed so that each is back in place. Every file then has exactly one form and
    its own content (through the mount and `zstd -d` below), no temp is left after unmount
    or after the recovery of a remount, and no stray file appeared."""
    names = [f"rollout-{i:03d}.jsonl" for i in range(80)]
    content = {f"sessions/{d}/{n}": small_file(store / "sessions" / d / n, f"{d}/{n}")
               for d in ("a", "b") for n in names}
    a, b_dir, c = store / "sessions/a", store / "sessions/b", store / "sessions/c"
    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "0", "--jobs", "2")

        def compressed() -> int:
            return sum(n.endswith(".zst") for d in ("sessions/a", "sessions/b")
                       for n in b.names(d))

        at_start = compressed()
        flips = 0
        max_flips = 20_000
        while flips < max_flips:
            if flips % 10 == 9:
                os.rename(a, c)
                os.rename(b_dir, a)
                os.rename(c, b_dir)
            else:
                exchange(a, b_dir)
            flips += 1
            if flips % 20 == 0 and compressed() == len(content) and idle(m):
                break
        if flips % 2:
            exchange(a, b_dir)
            flips += 1
        done = compressed()
        print(f"{flips} flips; {at_start} -> {done} of {len(content)} compressed meanwhile")
        assert at_start < len(content), "the compactor was done before the first flip"
        if done <= at_start:
            st = m.status() or {}
            keys = ("scan_done", "waiting_files", "eligible_now", "in_flight", "swaps_done",
                    "swaps_abandoned", "swaps_failed", "swaps_busy", "last_errors")
            pytest.fail("no swap happened while the directories were flipped; the compactor: "
                        + repr({k: st.get(k) for k in keys}))
        wait_until(lambda: idle(m), 30, "the compactor to settle")
        for name, data in content.items():
            assert (store / name).read_bytes() == data, name
        m.stop()
        assert b.temps() == []
        for name, data in content.items():
            assert stored(b, name) == data, name
        expected_names = {*names, *(n + ".zst" for n in names)}
        for d in ("sessions/a", "sessions/b"):
            assert b.names(d) <= expected_names, b.names(d) - expected_names
        assert b.names("sessions") == {"a", "b"}

        m = mount_factory(store)
        assert m.status()["recovery"]["temps_removed"] == 0
        for name, data in content.items():
            assert (store / name).read_bytes() == data, name
        m.stop()
        assert b.temps() == []


@needs_zstd
@pytest.mark.timeout(180)
def test_symlinked_directories_never_lead_the_compactor_outside(
        tmp_path: Path, mount_factory: MountFactory) -> None:
    """With `--compress-after 2s`, cold files outside the store (`outside/`) are reachable
    through symlinks in the store: `sessions/2024`, a link left before the mount where a
    directory was moved to another disk; `sessions/2025`, a store directory that is renamed
    away and replaced by a link (and the link re-aimed between two outside directories)
    through the mount, over and over, while the compactor swaps the files in it; and
    `sessions/2026`, whose file was queued (written and closed through the mount) and then
    removed with its directory, which became a link before the file came due. Nothing outside
    the store changes (names, inodes, modes, mtimes, bytes; no `.zst`, no temp) and every
    file of the store keeps its content."""
    store, outside = tmp_path / "store", tmp_path / "outside"
    inside = {f"sessions/2025/r{i:03d}.jsonl": small_file(store / f"sessions/2025/r{i:03d}.jsonl",
                                                          f"in-{i}") for i in range(120)}
    for sub in ("2024", "2025", "2025b", "2026"):
        for i in range(120 if sub.startswith("2025") else 5):
            small_file(outside / sub / f"r{i:03d}.jsonl", f"out-{sub}-{i}")
    small_file(outside / "2026" / "queued.jsonl", "out-queued")
    (store / "sessions/2024").symlink_to(outside / "2024")
    before = freeze(outside)

    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "2s", "--jobs", "2")
        s = store / "sessions"
        real = s / "2025.real"
        def compressed() -> int:
            return sum(n.endswith(".zst") for n in b.names("sessions/2025"))

        started = compressed()
        # At least 60 flips, and on until the compactor has swapped some file meanwhile (on a
        # loaded machine its first swap may come after 60 flips).
        deadline = time.monotonic() + 90
        i = 0
        while i < 60 or (compressed() == started and time.monotonic() < deadline):
            os.rename(s / "2025", real)  # the directory goes away ...
            os.symlink(outside / "2025", s / "2025")  # ... and a link takes its place
            if i % 2:
                os.symlink(outside / "2025b", s / "2025.new")
                os.rename(s / "2025.new", s / "2025")  # the link re-aimed, atomically
            os.unlink(s / "2025")
            os.rename(real, s / "2025")
            i += 1
        during = compressed() - started
        print(f"{started} of {len(inside)} compressed before the flips, {during} during them")
        assert started < len(inside), "the compactor was done before the first flip"
        assert during > 0, "no swap happened while the directory was flipped"

        # Queued under sessions/2026, then the directory becomes a link before it is due.
        (s / "2026").mkdir()
        (s / "2026/queued.jsonl").write_bytes(b'{"queued":"through the mount"}\n' * 100)
        queued_at = time.time()
        os.unlink(s / "2026/queued.jsonl")
        os.rmdir(s / "2026")
        os.symlink(outside / "2026", s / "2026")
        assert time.time() < queued_at + 1.5, "too slow: the queued file came due before the link"
        wait_until(lambda: time.time() > queued_at + 2.5 and idle(m)
                   and m.status()["waiting_files"] == 0, 30,
                   "the queued file to come due and the compactor to settle")
        wait_until(lambda: all(b.is_compressed(n) for n in inside), 30,
                   "the store's own files to be compressed")
        for name, data in inside.items():
            assert (store / name).read_bytes() == data, name
        m.stop()
        for name, data in inside.items():
            assert stored(b, name) == data, name
        assert b.temps() == []
    untouched(outside, before)


NOBODY_ATTACK = r"""
set -eu
home=$1; s1=$2; s2=$3; n=$4
cd "$home"
i=0
while [ "$i" -lt "$n" ]; do
    mkdir d
    if [ "$i" -eq $((n - 1)) ]; then echo "last write at $(date +%s.%N)"; fi
    printf '{"i":%d}\n' "$i" > d/secret.jsonl   # queued for the compactor when closed
    rm d/secret.jsonl
    rmdir d
    ln -s "$s1" d                              # the queued path now leads outside
    ln -s "$s2" d.new
    mv -T d.new d                              # re-aimed at the other target
    i=$((i + 1))
    if [ "$i" -lt "$n" ]; then rm d; fi
done
echo done
"""


@needs_zstd
@pytest.mark.timeout(180)
def test_unprivileged_user_cannot_aim_a_root_daemon_at_a_root_only_file(
        mount_factory: MountFactory) -> None:
    """A root daemon with `--allow-other --compress-after 3s`; user 65534 owns a directory in
    the store and, through the mount, queues `d/secret.jsonl` (writes and closes it), removes
    it and its directory and puts links to two root-only directories holding a 0600
    `secret.jsonl` in `d`'s place, ten times over, the last link staying past the time the
    queued file comes due. The root-only files stay byte-identical (inode, mode, owner,
    mtime), nothing is added beside them, and the user's own store file is compressed intact
    (the daemon did work for the user meanwhile)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    with shared_tmp() as base:
        store = base / "store"
        home = store / "users/nobody"
        home.mkdir(parents=True)
        os.chown(home, NOBODY, NOBODY)
        own = small_file(home / "own.jsonl", "nobody's own")
        os.chown(home / "own.jsonl", NOBODY, NOBODY)
        secrets = []
        for k in (1, 2):
            d = base / f"secret{k}"
            d.mkdir(mode=0o700)
            small_file(d / "secret.jsonl", f"root only {k}")
            (d / "secret.jsonl").chmod(0o600)
            secrets.append(d)
        before = {d: freeze(d) for d in secrets}
        with backing(store) as b:
            m = mount_factory(store, "--allow-other", "--compress-after", "3s")
            r = subprocess.run(
                ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "sh", "-c", NOBODY_ATTACK, "sh", str(home), str(secrets[0]), str(secrets[1]),
                 "10"], capture_output=True, text=True, timeout=60)
            finished = time.time()
            assert r.returncode == 0, r.stderr
            out = r.stdout.split()
            assert out[-1] == "done", r.stdout
            last_write = float(out[-2])
            assert finished < last_write + 3, "too slow: the last queued file came due early"
            assert os.readlink(home / "d") == str(secrets[1])
            assert stat.S_ISLNK(b.stat("users/nobody/d").st_mode)
            # The last queued path is still waiting: the compactor meets it as a link.
            wait_until(lambda: time.time() > last_write + 3.5 and idle(m)
                       and m.status()["waiting_files"] == 0, 30,
                       "the queued file to come due and the compactor to settle")
            wait_until(lambda: b.is_compressed("users/nobody/own.jsonl"), 20,
                       "the user's own file to be compressed")
            assert (home / "own.jsonl").read_bytes() == own
            m.stop()
            assert stored(b, "users/nobody/own.jsonl") == own
            assert b.temps() == []
        for d in secrets:
            untouched(d, before[d])


# ---------------------------------------------------------------------------------------------
# 13. renames and unlinks during promotions and compressions

APPEND_ONE_LINE = r"""
import os, sys
path, line = sys.argv[1], sys.argv[2].encode()
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
try:
    assert os.write(fd, line) == len(line)  # promotes the compressed file first
finally:
    os.close(fd)
print("wrote", flush=True)
"""


@pytest.mark.timeout(180)
def test_renaming_the_directory_of_a_file_being_promoted(store: Path,
                                                         mount_factory: MountFactory) -> None:
    """big.jsonl (97 MiB, compressed offline) is appended to through the mount, which promotes
    it; as soon as the promotion's temp appears below, its directory is renamed through the
    mount. The write succeeds, the file under its new path holds every old byte and the new
    line, no temp is left anywhere, and the emptied directory can be removed."""
    digest = big_file(store / "sessions/old/big.jsonl", 3)
    size = os.path.getsize(store / "sessions/old/big.jsonl")
    r = zstfs_cli("compress", "--older-than", "0", "--no-progress", str(store), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 files compressed" in r.stdout, r.stdout
    line = '{"appended":"while the directory was renamed"}\n'
    with backing(store) as b:
        m = mount_factory(store)
        writer = subprocess.Popen([sys.executable, "-c", APPEND_ONE_LINE,
                                   str(store / "sessions/old/big.jsonl"), line],
                                  stdout=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: temps_in(b, "sessions/old"), 60, "the promotion's temp file",
                       interval=0.001)
            os.rename(store / "sessions/old", store / "sessions/new")
            still_promoting = writer.poll() is None and bool(temps_in(b, "sessions/new"))
            out, _ = writer.communicate(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert writer.returncode == 0, out
        assert out.strip() == "wrote", out
        assert still_promoting, "the promotion was over before the rename landed"
        settled(m, promotions=1)
        assert b.temps() == []
        assert b.names("sessions") == {"new"}
        assert b.names("sessions/new") == {"big.jsonl"}
        path = store / "sessions/new/big.jsonl"
        assert os.path.getsize(path) == size + len(line)
        with open(path, "rb") as f:
            h = hashlib.sha256()
            remaining = size
            while remaining:
                chunk = f.read(min(8 * MiB, remaining))
                h.update(chunk)
                remaining -= len(chunk)
            assert h.hexdigest() == digest
            assert f.read() == line.encode()
        os.unlink(path)
        os.rmdir(store / "sessions/new")
        assert b.names("sessions") == set()
        m.stop()
        assert b.all_names() == {"sessions", ".zstfs.lock"}


@needs_zstd
@pytest.mark.timeout(180)
@pytest.mark.parametrize("then", ["finishes", "opened-at-new-path"])
def test_renaming_the_directory_of_a_file_being_compressed(
        store: Path, mount_factory: MountFactory, then: str) -> None:
    """While the compactor compresses big.jsonl (four frames), its directory is renamed
    through the mount as soon as the temp appears. Either the swap finishes in the renamed
    directory (`big.jsonl.zst` there), or the file is opened for append under its new path
    meanwhile, which abandons the swap (its temp removed from the directory it is in now) and
    appends a line. No temp is left in either place, every byte is there (through the mount
    and `zstd -d`), and the directory can be emptied and removed."""
    digest = big_file(store / "sessions/old/big.jsonl", 4)
    size = os.path.getsize(store / "sessions/old/big.jsonl")
    line = b'{"appended":"at the new path, during the swap"}\n' if then != "finishes" else b""
    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "0")
        wait_until(lambda: temps_in(b, "sessions/old"), 30, "the compaction's temp file",
                   interval=0.001)
        os.rename(store / "sessions/old", store / "sessions/new")
        assert temps_in(b, "sessions/new"), "the compaction was over before the rename landed"
        if line:
            fd = os.open(store / "sessions/new/big.jsonl", os.O_WRONLY | os.O_APPEND)
            try:
                assert temps_in(b, "sessions/new") == [], "the open did not abandon the swap"
                assert os.write(fd, line) == len(line)
            finally:
                os.close(fd)
            # (Counted once more if the compactor looks at it again while it is still open.)
            wait_until(lambda: m.status()["swaps_abandoned"] >= 1, 10, "the abandon to count")
        wait_until(lambda: b.is_compressed("sessions/new/big.jsonl"), 60,
                   "the swap to finish in the renamed directory")
        wait_until(lambda: idle(m), 20, "the compactor to settle")
        settled(m, swaps_done=1)
        assert b.temps() == []
        assert b.names("sessions") == {"new"}
        assert b.names("sessions/new") == {"big.jsonl.zst"}
        with open(store / "sessions/new/big.jsonl", "rb") as f:
            assert hashlib.sha256(f.read(size)).hexdigest() == digest
            assert f.read() == line
        m.stop()
        with open(b.path("sessions/new/big.jsonl.zst"), "rb") as f:
            r = subprocess.run(["zstd", "-d", "-q", "-c"], stdin=f, capture_output=True,
                               timeout=60)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout[:size]).hexdigest() == digest
        assert r.stdout[size:] == line
        m = mount_factory(store)
        os.unlink(store / "sessions/new/big.jsonl")
        os.rmdir(store / "sessions/new")
        m.stop()
        assert b.all_names() == {"sessions", ".zstfs.lock"}


@pytest.mark.timeout(180)
def test_unlinking_a_file_being_compressed_cancels_it(store: Path,
                                                      mount_factory: MountFactory) -> None:
    """big.jsonl (eight frames, level 6: seconds of compression) is being compressed by the
    compactor; as soon as its temp appears, the file is unlinked through the mount. The
    compaction gives up within about one frame's compression time (measured here beforehand
    with the same codec), far less than the whole file would take, and removes its temp; the
    emptied directory is then removed through the mount (no ENOTEMPTY); nothing was swapped,
    nothing is left."""
    frames = 8
    big_file(store / "sessions/doomed/big.jsonl", frames)
    sample = store.parent / "one-frame.jsonl"
    sample.write_bytes(_block())
    src = os.open(sample, os.O_RDONLY)
    dst = os.open(store.parent / "one-frame.zst", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t = time.monotonic()
        codec.compress_file(src, dst, codec.CodecParams(level=6))  # the daemon's codec
        one_frame = time.monotonic() - t
    finally:
        os.close(src)
        os.close(dst)
        os.unlink(store.parent / "one-frame.zst")
        os.unlink(sample)
    whole = frames * one_frame
    bound = 3 * one_frame + 1.0
    assert bound < whole / 1.5, f"one frame takes {one_frame:.2f}s: too fast to tell apart"
    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "0", "--level", "6")
        wait_until(lambda: temps_in(b, "sessions/doomed"), 30, "the compaction's temp file",
                   interval=0.001)
        t = time.monotonic()
        os.unlink(store / "sessions/doomed/big.jsonl")
        wait_until(lambda: not temps_in(b, "sessions/doomed"), 60,
                   "the compaction to remove its temp", interval=0.005)
        took = time.monotonic() - t
        print(f"cancelled in {took:.2f}s; one frame takes {one_frame:.2f}s, the file {whole:.2f}s")
        assert took < bound, (took, one_frame, whole)
        os.rmdir(store / "sessions/doomed")
        assert b.names("sessions") == set()
        wait_until(lambda: m.status()["in_flight"] == 0, 20, "the compactor to let go")
        settled(m, swaps_done=0, swaps_failed=0)
        m.stop()
        assert b.all_names() == {"sessions", ".zstfs.lock"}
