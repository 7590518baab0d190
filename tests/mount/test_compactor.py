"""The background compactor, tested against real mounts.

Every test builds its store before mounting and then watches the backing directory from below
through a descriptor opened before the mount covered it (`Backing`), so it sees the real files
(`NAME`, `NAME.zst`, temps) while programs use the mount. Other programs are real subprocesses:
holders that keep a file open (read, append, mmap), writers and readers that race the
compactor, the `zstd` CLI that must decode what the compactor wrote, `zstfs status`.

What is proved: cold files are compressed within seconds and decode to the same bytes with the
same metadata; symlinks, hard-linked, fresh and non-matching files stay plain; an open file
(any kind of open, mmaps included) is never swapped; concurrent appends and reads lose or tear
nothing while swaps and promotions happen; SIGKILL at random moments loses nothing and leaves no
temp behind the next mount; ENOSPC during a swap keeps the plain file and the mount working;
`zstfs status` tells the truth, mounted or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.backing import (
    DAY,
    TEMP_PREFIX,
    Backing,
    backing,
    idle,
    needs_zstd,
    old_ns,
    rollout,
    zstd_decode,
    zstfs_cli,
)
from harness.mount import Mount, MountFactory, tmpfs_store, wait_until

MiB = 1 << 20
LOCK = ".zstfs.lock"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. what gets compressed, and what it keeps


@needs_zstd
@pytest.mark.timeout(60)
def test_old_files_are_compressed_with_metadata_and_others_stay_plain(
        store: Path, mount_factory: MountFactory) -> None:
    """Old `.jsonl` files are swapped to `.zst` within seconds of mounting with
    `--compress-after 7d`; the `.zst` decodes with `zstd -d` to the original bytes and keeps
    mtime (ns), mode (0600, 0400) and owner. A fresh file, a non-matching file, symlinks (even
    to a compressible file) and a hard-linked file stay exactly as they are."""
    originals = {
        "a.jsonl": rollout(store / "a.jsonl", 300_000, seed=1),
        "b.jsonl": rollout(store / "b.jsonl", 200_000, seed=2),
        "sub/c.jsonl": rollout(store / "sub" / "c.jsonl", 150_000, seed=3),
    }
    os.chmod(store / "a.jsonl", 0o600)
    os.chmod(store / "b.jsonl", 0o400)
    os.chown(store / "a.jsonl", 65534, 65534)
    os.chown(store / "b.jsonl", 65534, 65534)
    # An ACL (the mount does not show ACLs, but the backing file keeps its own) and a user xattr.
    subprocess.run(["setfacl", "-m", "u:nobody:r", store / "a.jsonl"], check=True)
    os.setxattr(store / "a.jsonl", "user.note", b"kept")
    acl = os.getxattr(store / "a.jsonl", "system.posix_acl_access")
    before = {n: os.stat(store / n) for n in originals}

    fresh = rollout(store / "fresh.jsonl", 100_000, seed=4, mtime_ns=time.time_ns())
    notes = rollout(store / "notes.txt", 100_000, seed=5)
    (store / "link.jsonl").symlink_to("notes.txt")
    (store / "alias.jsonl").symlink_to("a.jsonl")
    for link in ("link.jsonl", "alias.jsonl"):
        os.utime(store / link, ns=(old_ns(), old_ns()), follow_symlinks=False)
    linked = rollout(store / "h1.jsonl", 100_000, seed=6)
    os.link(store / "h1.jsonl", store / "h2.jsonl")
    os.utime(store / "h1.jsonl", ns=(old_ns(), old_ns()))

    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "7d")
        wait_until(lambda: all(b.is_compressed(n) for n in originals), 15,
                   "the old files to be compressed")
        wait_until(lambda: idle(m), 10, "the compactor to go idle")

        for name, data in originals.items():
            zst = b.stat(name + ".zst")
            assert zstd_decode(b.read(name + ".zst")) == data, name
            assert zst.st_mtime_ns == before[name].st_mtime_ns, name
            assert stat.S_IMODE(zst.st_mode) == stat.S_IMODE(before[name].st_mode), name
            assert (zst.st_uid, zst.st_gid) == (before[name].st_uid, before[name].st_gid), name
            assert zst.st_size < len(data) * 0.95, name
            # ... and through the mount nothing changed at all.
            seen = os.stat(store / name)
            assert (seen.st_size, seen.st_mtime_ns, seen.st_mode, seen.st_uid) == (
                len(data), before[name].st_mtime_ns, before[name].st_mode,
                before[name].st_uid), name
            assert (store / name).read_bytes() == data, name

        assert os.getxattr(b.path("a.jsonl.zst"), "system.posix_acl_access") == acl
        assert os.getxattr(b.path("a.jsonl.zst"), "user.note") == b"kept"

        top = b.names()
        assert {"fresh.jsonl", "notes.txt", "h1.jsonl", "h2.jsonl"} <= top
        assert not {"fresh.jsonl.zst", "notes.txt.zst", "link.jsonl.zst", "alias.jsonl.zst",
                    "h1.jsonl.zst", "h2.jsonl.zst"} & top
        assert b.read("fresh.jsonl") == fresh
        assert b.read("notes.txt") == notes
        assert b.stat("h1.jsonl").st_nlink == 2
        assert b.read("h1.jsonl") == linked
        for link, target in (("link.jsonl", "notes.txt"), ("alias.jsonl", "a.jsonl")):
            assert stat.S_ISLNK(b.stat(link).st_mode), link
            assert os.readlink(b.path(link)) == target
        assert (store / "alias.jsonl").read_bytes() == originals["a.jsonl"]
        assert (store / "link.jsonl").read_bytes() == notes
        assert b.temps() == []

        s = m.status()
        assert s["swaps_done"] == 3, s
        assert s["swaps_failed"] == 0, s
        m.stop()


# ---------------------------------------------------------------------------------------------
# 2. an open file is never compressed

HOLDER = r"""
import ctypes, hashlib, os, sys
mode, path = sys.argv[1], sys.argv[2]
fd = None
if mode == "read":
    fd = os.open(path, os.O_RDONLY)
    data = os.read(fd, 1 << 30)
elif mode == "append":
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    data = b""
elif mode == "mmap":
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    map_fd = os.open(path, os.O_RDONLY)
    size = os.fstat(map_fd).st_size
    addr = libc.mmap(None, size, 1, 1, map_fd, 0)  # PROT_READ, MAP_SHARED
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    os.close(map_fd)  # from now on only the mapping holds the file
    data = ctypes.string_at(addr, size)
print("ready", hashlib.sha256(data).hexdigest(), flush=True)
sys.stdin.readline()  # hold until told to stop
if mode == "append":
    os.write(fd, b'{"late": "line written just before close"}\n')
if mode == "mmap":
    again = ctypes.string_at(addr, size)
    assert again == data
    assert libc.munmap(addr, size) == 0
if fd is not None:
    os.close(fd)
print("done", flush=True)
"""


class Holder:
    """A process holding one file open (read, append or mmap) until told to stop."""

    def __init__(self, mode: str, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, mode, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["ready"], f"holder {mode} failed to start"
        self.digest = line[1]

    def stop(self) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=30)
        assert self.proc.returncode == 0
        assert out.strip() == "done"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


#: How long after the mount the held files come due: they must be opened before that. A try
#: whose holders were not all in place in time (a loaded machine) is started again with more.
HOLD_MARGINS = (5.0, 15.0, 45.0)


def hold_before_due(store: Path, b: Backing, mount_factory: MountFactory,
                    held: dict[str, bytes], margin: float
                    ) -> tuple[Mount, dict[str, Holder], float] | None:
    """Write the held files fresh (due `margin` seconds from now), mount, and open each one
    with its holder. Returns the mount, the holders and the due time; or None, with everything
    stopped, if the holders were not all in place (and seen waiting) before the files came due."""
    now = time.time_ns()
    for mode, data in held.items():
        (store / f"{mode}.jsonl.zst").unlink(missing_ok=True)
        (store / f"{mode}.jsonl").write_bytes(data)
        os.utime(store / f"{mode}.jsonl", ns=(now, now))
    due = now / 1e9 + margin
    m = mount_factory(store, "--compress-after", f"{margin:g}s")
    holders: dict[str, Holder] = {}
    try:
        for mode in held:
            holders[mode] = Holder(mode, store / f"{mode}.jsonl")
            if mode != "append":
                assert holders[mode].digest == sha(held[mode]), mode
        waiting = m.status()["waiting_files"]
        if time.time() < due and all(b.is_plain(f"{mode}.jsonl") for mode in held):
            assert waiting >= len(held)
            return m, holders, due
    except BaseException:
        for holder in holders.values():
            holder.kill()
        raise
    print(f"holders not in place {margin}s after the files were written; trying again")
    for holder in holders.values():
        holder.kill()
    m.stop()
    return None


@needs_zstd
@pytest.mark.timeout(300)
def test_open_files_are_never_compressed_until_closed(store: Path,
                                                      mount_factory: MountFactory) -> None:
    """A file held open read-only, one held open for append, and one only mmapped (its
    descriptor closed) stay plain while the compactor compresses everything else and passes
    over them; once closed, they are compressed (including the line appended at the end)."""
    others = {f"cold{i}.jsonl": rollout(store / f"cold{i}.jsonl", 200_000, seed=10 + i)
              for i in range(4)}
    held = {mode: rollout(store / f"{mode}.jsonl", 300_000, seed=20 + i)
            for i, mode in enumerate(("read", "append", "mmap"))}

    with backing(store) as b:
        for margin in HOLD_MARGINS:
            plain_others = sum(1 for n in others if b.is_plain(n))
            attempt = hold_before_due(store, b, mount_factory, held, margin)
            if attempt is not None:
                break
        else:
            pytest.fail(f"the holders never got in place within {HOLD_MARGINS[-1]}s")
        m, holders, due = attempt
        try:
            wait_until(lambda: all(b.is_compressed(n) for n in others), 60,
                       "the other cold files to be compressed")
            # The held files came due and the compactor passed over them.
            wait_until(lambda: time.time() > due + 0.5 and idle(m)
                       and m.status()["waiting_files"] == 0, margin + 60,
                       "the held files to come due and the compactor to pass over them")
            for mode, data in held.items():
                assert b.is_plain(f"{mode}.jsonl"), mode
                assert b.read(f"{mode}.jsonl") == data, mode
            assert m.status()["open_files"] == len(held)
            assert b.temps() == []

            for holder in holders.values():
                holder.stop()
        finally:
            for holder in holders.values():
                holder.kill()
        held["append"] += b'{"late": "line written just before close"}\n'
        # The appended file's mtime is now, so it comes due `margin` seconds later.
        wait_until(lambda: all(b.is_compressed(f"{mode}.jsonl") for mode in held), margin + 60,
                   "the released files to be compressed")
        for mode, data in held.items():
            assert zstd_decode(b.read(f"{mode}.jsonl.zst")) == data, mode
            assert (store / f"{mode}.jsonl").read_bytes() == data, mode
        assert m.status()["swaps_done"] == plain_others + len(held)
        m.stop()


# ---------------------------------------------------------------------------------------------
# 3. the race: appends and reads while the compactor swaps

#: Each writer and reader does at least this much, and goes on until the test has seen the
#: compactor swap and appends promote this many times during the run.
MIN_LINES, MIN_READS, MIN_SWAPS, MIN_PROMOTIONS = 60, 15, 3, 3

WRITER = r"""
import os, random, sys, time
wid, min_lines, stop, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
rng = random.Random(wid)
seq = 0
while seq < min_lines or not os.path.exists(stop):
    line = f"writer-{wid} seq-{seq} {'x' * rng.randrange(0, 200)}\n".encode()
    fd = os.open(rng.choice(files), os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, line) == len(line)
    finally:
        os.close(fd)
    seq += 1
    # Bursts and pauses: a pause is a chance for the compactor to swap the file.
    time.sleep(rng.choice((0.0, 0.0, 0.002, 0.01, 0.05, 0.2)))
print(seq)
"""

READER = r"""
import hashlib, os, random, sys, time
rid, min_reads, stop, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
files = sys.argv[5:]
rng = random.Random(100 + rid)
reads = 0
with open(out, "w") as log:
    while reads < min_reads or not os.path.exists(stop):
        reads += 1
        i = rng.randrange(len(files))
        with open(files[i], "rb") as f:
            data = f.read()
        log.write(f"{i} {len(data)} {hashlib.sha256(data).hexdigest()}\n")
        time.sleep(rng.choice((0.0, 0.01, 0.05, 0.1)))
"""


@needs_zstd
@pytest.mark.timeout(300)
def test_concurrent_appends_and_reads_survive_swaps(store: Path, mount_factory: MountFactory,
                                                    tmp_path: Path) -> None:
    """Three writer processes open-append-close numbered lines on three files while the
    compactor runs at `--compress-after 0` and two readers read whole files, until the
    compactor has swapped files and appends have promoted them several times: every line is
    there exactly once and in order, and every read was a whole-line prefix of the final file."""
    names = [f"live{i}.jsonl" for i in range(3)]
    headers = {}
    for i, name in enumerate(names):
        headers[name] = rollout(store / name, 30_000, seed=30 + i)
    stop = tmp_path / "stop"
    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "0")
        wait_until(lambda: all(b.is_compressed(n) for n in names), 30,
                   "the initial compaction of the live files")
        start = m.status()
        paths = [str(store / n) for n in names]
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(w), str(MIN_LINES),
                                     str(stop), *paths], stdout=subprocess.PIPE, text=True)
                   for w in range(3)]
        logs = [tmp_path / f"reader{r}.log" for r in range(2)]
        readers = [subprocess.Popen([sys.executable, "-c", READER, str(r), str(MIN_READS),
                                     str(stop), str(logs[r]), *paths]) for r in range(2)]
        counts = []
        try:
            def raced() -> bool:
                s = m.status()
                return (s["swaps_done"] - start["swaps_done"] >= MIN_SWAPS
                        and s["promotions"] - start["promotions"] >= MIN_PROMOTIONS)

            wait_until(raced, 120, f"{MIN_SWAPS} swaps and {MIN_PROMOTIONS} promotions "
                       "while the writers and readers run", interval=0.2)
            stop.touch()
            for w in writers:
                out, _ = w.communicate(timeout=120)
                assert w.returncode == 0, f"writer failed: {out}"
                counts.append(int(out))
            for r in readers:
                assert r.wait(timeout=120) == 0
        finally:
            for p in writers + readers:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        end = m.status()
        final = {n: (store / n).read_bytes() for n in names}
        wait_until(lambda: idle(m), 20, "the compactor to settle")
        for n in names:
            stored = b.read(n + ".zst") if b.is_compressed(n) else b.read(n)
            if b.is_compressed(n):
                stored = zstd_decode(stored)
            assert stored == final[n], n
        m.stop()

    assert all(c >= MIN_LINES for c in counts), counts
    seen: dict[int, list[int]] = {w: [] for w in range(3)}
    for n in names:
        data = final[n]
        assert data.startswith(headers[n]), n
        last: dict[int, int] = {}
        for line in data[len(headers[n]):].split(b"\n")[:-1]:
            wid_s, seq_s, _pad = line.split(b" ")
            wid, seq = int(wid_s.removeprefix(b"writer-")), int(seq_s.removeprefix(b"seq-"))
            assert seq > last.get(wid, -1), f"{n}: writer {wid} out of order at seq {seq}"
            last[wid] = seq
            seen[wid].append(seq)
        assert data.endswith(b"\n")
    for wid, seqs in seen.items():
        assert sorted(seqs) == list(range(counts[wid])), f"writer {wid} lost or duplicated lines"

    reads = 0
    for log in logs:
        for entry in log.read_text().splitlines():
            i, length, digest = entry.split()
            data = final[names[int(i)]]
            n = int(length)
            assert n <= len(data), f"a read of {names[int(i)]} is longer than the file"
            assert sha(data[:n]) == digest, \
                f"a read of {names[int(i)]} ({n} bytes) is not a prefix of the final file"
            assert n == 0 or data[n - 1:n] == b"\n", f"a read ended mid-line at {n}"
            reads += 1
    assert reads >= 2 * MIN_READS, reads

    swaps = end["swaps_done"] - start["swaps_done"]
    promotions = end["promotions"] - start["promotions"]
    print(f"{sum(counts)} lines, {reads} reads, {swaps} swaps, {promotions} promotions, "
          f"{end['swaps_abandoned'] - start['swaps_abandoned']} swaps abandoned")
    assert swaps >= MIN_SWAPS, ("too few swaps during the run", end)
    assert promotions >= MIN_PROMOTIONS, ("too few appends promoted a compressed file", end)


# ---------------------------------------------------------------------------------------------
# 4. kill -9 during compaction


@needs_zstd
@pytest.mark.timeout(240)
def test_kill_during_compaction_loses_nothing(store: Path, mount_factory: MountFactory) -> None:
    """SIGKILL of the daemon at random moments while it compresses ~30 rollouts of 1-20 MB,
    five times in a row, remounting each time: afterwards every file is byte-identical (read
    through a mount, and decoded from the backing with `zstd -d`), and the next clean mount
    leaves no temp file."""
    seed = int(os.environ.get("ZSTFS_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    digests = {}
    total = 0
    for i in range(30):
        size = int(MiB * 20 ** rng.random())  # log-uniform in 1-20 MiB: mostly small files
        name = f"sessions/2026/{i % 3}/rollout-{i:02d}.jsonl"
        digests[name] = sha(rollout(store / name, size, seed=1000 + i))
        total += size

    print(f"{sum(1 for _ in digests)} files, {total / MiB:.0f} MiB")
    for _ in range(5):
        # Level 15 compresses at ~20 MB/s a job: slow enough that each kill lands mid-swap.
        m = mount_factory(store, "--compress-after", "0", "--jobs", "2", "--level", "15")
        time.sleep(rng.uniform(0.05, 1.5))  # the random moment of the crash (not a sync)
        m.kill()
        assert not [line for line in m.errors() if "Traceback" in line], m.log_text()
        with backing(store) as b:
            names = b.all_names()
        print(f"killed: {sum(n.endswith('.zst') for n in names)} compressed, "
              f"{sum(TEMP_PREFIX in n for n in names)} temps, "
              f"{sum(n + '.zst' in names for n in names)} both forms")

    # The clean mount: recovery, then compaction resumes and finishes the store (when the
    # crashed rounds already compressed everything, there is simply nothing left to swap).
    m = mount_factory(store, "--compress-after", "0", "--jobs", "2", "--level", "15")
    rec = m.status()["recovery"]
    wait_until(lambda: m.status()["plain_files"] == 0, 120, "the compactor to finish the store")
    m.stop()
    with backing(store) as b:
        assert b.temps() == []
        compressed = 0
        for name, digest in digests.items():
            assert not (b.is_plain(name) and b.is_compressed(name))
            if b.is_compressed(name):
                compressed += 1
                assert sha(zstd_decode(b.read(name + ".zst"))) == digest, name
            else:
                assert sha(b.read(name)) == digest, name
        assert compressed > 0, "the compactor never finished a swap"
    print(f"{compressed} of {len(digests)} compressed; recovery of the last mount: {rec}")

    m = mount_factory(store)
    for name, digest in digests.items():
        assert sha((store / name).read_bytes()) == digest, name
    m.stop()


# ---------------------------------------------------------------------------------------------
# 5. ENOSPC during a swap


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a filesystem that fills up during a swap."""
    with tmpfs_store(tmp_path / "small", "size=8m") as store:
        yield store


@pytest.mark.timeout(90)
def test_enospc_during_a_swap_keeps_the_plain_file(small_fs: Path,
                                                   mount_factory: MountFactory) -> None:
    """A 5 MiB file that compresses to about half, on a filesystem with less than that free:
    the swap fails with ENOSPC, the plain file is intact, no temp is left, the error is in
    `status`, the mount keeps working; once space is freed the retry succeeds."""
    rng = random.Random(5)
    text = b"".join(b'{"type":"event_msg","payload":"%d"}\n' % i for i in range(100_000))
    data = rng.randbytes(5 * MiB // 2) + text[: 5 * MiB // 2]
    (small_fs / "big.jsonl").write_bytes(data)
    ns = old_ns()
    os.utime(small_fs / "big.jsonl", ns=(ns, ns))
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    (small_fs / "filler.bin").write_bytes(b"\0" * (free - 1 * MiB))  # leave 1 MiB free
    digest = sha(data)

    with backing(small_fs) as b:
        m = mount_factory(small_fs, "--compress-after", "0",
                          expect_errors=r"big\.jsonl: compression failed \(no space left")
        wait_until(lambda: m.status()["swaps_failed"] >= 1, 20, "the swap to fail")
        wait_until(lambda: m.status()["in_flight"] == 0, 10, "the failed swap to clean up")
        s = m.status()
        errors = [e for e in s["last_errors"] if "big.jsonl" in e["path"]]
        assert errors, s["last_errors"]
        assert "no space" in errors[-1]["error"].lower(), errors
        assert s["swaps_done"] == 0
        assert b.is_plain("big.jsonl")
        assert sha(b.read("big.jsonl")) == digest
        assert b.temps() == []
        assert sum(1 for line in m.errors() if "big.jsonl" in line) == 1, m.log_text()

        # The mount keeps working.
        (small_fs / "after.txt").write_bytes(b"still writable\n")
        assert (small_fs / "after.txt").read_bytes() == b"still writable\n"
        assert sha((small_fs / "big.jsonl").read_bytes()) == digest
        # Readers closing the file (grep over the store) do not cut the backoff short: no
        # retry storm while the disk is still full.
        for _ in range(3):
            subprocess.run(["grep", "-c", "event_msg", str(small_fs / "big.jsonl")],
                           capture_output=True, check=True, timeout=30)
        wait_until(lambda: m.status()["open_files"] == 0, 10, "the releases to be processed")
        s = m.status()
        assert s["swaps_failed"] == 1, s
        assert s["eligible_now"] == 0, s
        assert s["in_flight"] == 0, s
        assert s["next_eligible_in"] > 5, s

        # Free the space: the retry (after the first backoff, 10 s) succeeds.
        os.unlink(small_fs / "filler.bin")
        wait_until(lambda: b.is_compressed("big.jsonl"), 30, "the retry to compress the file")
        assert sha(zstd_decode(b.read("big.jsonl.zst"))) == digest
        assert sha((small_fs / "big.jsonl").read_bytes()) == digest
        assert b.temps() == []
        s = m.status()
        assert s["swaps_failed"] == 1, "reads of a failed file cut its backoff short"
        assert s["swaps_done"] == 1, s
        m.stop()


# ---------------------------------------------------------------------------------------------
# 6. zstfs status


def census(b: Backing, pattern_suffix: str = ".jsonl") -> dict[str, int]:
    """What `status` must say, computed from the backing files and the originals."""
    plain = compressed = stored = 0
    for name in b.all_names():
        st = b.stat(name)
        if not stat.S_ISREG(st.st_mode):
            continue
        if name.endswith(pattern_suffix + ".zst"):
            compressed += 1
            stored += st.st_size
        elif name.endswith(pattern_suffix):
            plain += 1
            stored += st.st_size
    return {"plain_files": plain, "compressed_files": compressed, "stored_bytes": stored}


@pytest.mark.timeout(60)
def test_status_mounted_and_unmounted(store: Path, mount_factory: MountFactory) -> None:
    """`zstfs status MNT` (human) and `--json` (stable keys) match the backing store, and so
    does `zstfs status STORE` on the unmounted store."""
    logical = 0
    for i in range(3):
        logical += len(rollout(store / f"old{i}.jsonl", 200_000 + i * 50_000, seed=40 + i))
    logical += len(rollout(store / "sub" / "fresh.jsonl", 100_000, seed=44,
                           mtime_ns=time.time_ns()))
    rollout(store / "notes.txt", 50_000, seed=45)  # not a pattern file: not counted

    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "7d")
        wait_until(lambda: m.status()["compressed_files"] == 3, 15, "the old files to compress")
        wait_until(lambda: idle(m), 10, "the compactor to go idle")
        truth = census(b)
        assert truth["compressed_files"] == 3
        assert truth["plain_files"] == 1

        r = zstfs_cli("status", "--json", str(store))
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        for key, value in truth.items():
            assert info[key] == value, key
        assert info["logical_bytes"] == logical
        assert info["pid"] == m.pid
        assert info["swaps_done"] == 3
        assert info["waiting_files"] == 1  # the fresh file, due in 7 days
        assert 6.9 * DAY < info["next_eligible_in"] <= 7 * DAY

        r = zstfs_cli("status", str(store))
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert "1 plain, 3 compressed" in out, out
        assert f"ratio {logical / truth['stored_bytes']:.2f}x" in out, out
        assert "saved" in out, out
        assert f"pid {m.pid}" in out, out
        assert "3 done" in out, out
        m.stop()

    r = zstfs_cli("status", "--json", str(store))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["mounted"] is False
    with backing(store) as b:
        for key, value in census(b).items():
            assert info[key] == value, key
    assert info["logical_bytes"] == logical
    r = zstfs_cli("status", str(store))
    assert r.returncode == 0, r.stderr
    assert "1 plain, 3 compressed" in r.stdout, r.stdout
    assert "not mounted" in r.stdout, r.stdout
