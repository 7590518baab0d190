"""`zstfs compress`, `zstfs verify`, `zstfs expand` on real stores.

Each command is run as the real CLI in a subprocess on a store built from realistic rollouts,
and its effect is checked on the files themselves: which ones became `.zst`, that the `zstd`
CLI decodes them to the original bytes, that expanding restores bytes, mode and mtime, that a
damaged `.zst` is named and left alone, that all three refuse a mounted store (naming the
daemon's PID) and change nothing, and the output contract: a progress bar on stderr only when
asked (or on a terminal), a summary line on stdout.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import gen_rollouts
import pytest
from harness.mount import MountFactory, flat_pattern

DAY = 86400
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")


def zstfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI; stdout/stderr are pipes, so progress defaults to off. (Decoded without
    newline translation, so that a progress bar's carriage returns stay visible.)"""
    r = subprocess.run([sys.executable, "-m", "zstfs", *flat_pattern(list(args))],
                       capture_output=True,
                       timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(),
                                       r.stderr.decode())


def rollout(path: Path, size: int, seed: int, age_days: float, mode: int = 0o644) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    gen_rollouts.generate_rollout(path, size, seed=seed)
    os.chmod(path, mode)
    # Odd nanoseconds (a copy that loses them is caught), and never in the future.
    ns = int((time.time() - age_days * DAY) * 1e9) // 10**9 * 10**9 - 12_345_679 + seed
    os.utime(path, ns=(ns, ns))
    return path.read_bytes()


def zstd_decode(path: Path) -> bytes:
    r = subprocess.run(["zstd", "-d", "-q", "-c", str(path)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def snapshot(store: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every file below `store` (relative name → mode, size, mtime_ns, bytes), except the lock
    file, which every command and mount rewrites with its PID."""
    out = {}
    for d, _dirs, files in os.walk(store):
        for n in files:
            if n == ".zstfs.lock":
                continue
            p = Path(d) / n
            st = p.lstat()
            out[str(p.relative_to(store))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                              p.read_bytes())
    return out


@pytest.fixture
def built(store: Path) -> dict[str, bytes]:
    """A store with old rollouts (2 days), fresh ones, a subdirectory, a file outside the
    pattern and an incompressible `.jsonl`; returns the originals by relative name."""
    files = {
        "old-a.jsonl": rollout(store / "old-a.jsonl", 400_000, seed=1, age_days=2, mode=0o600),
        "old-b.jsonl": rollout(store / "old-b.jsonl", 3_000_000, seed=2, age_days=3,
                               mode=0o400),
        "sessions/old-c.jsonl": rollout(store / "sessions" / "old-c.jsonl", 200_000, seed=3,
                                        age_days=10),
        "new-d.jsonl": rollout(store / "new-d.jsonl", 200_000, seed=4, age_days=0.1),
        "sessions/new-e.jsonl": rollout(store / "sessions" / "new-e.jsonl", 100_000, seed=5,
                                        age_days=0),
        "notes.txt": rollout(store / "notes.txt", 100_000, seed=6, age_days=5),
    }
    noise = os.urandom(200_000)
    (store / "noise.jsonl").write_bytes(noise)
    ns = int((time.time() - 4 * DAY) * 1e9)
    os.utime(store / "noise.jsonl", ns=(ns, ns))
    files["noise.jsonl"] = noise
    return files


OLD = ("old-a.jsonl", "old-b.jsonl", "sessions/old-c.jsonl")


@needs_zstd
@pytest.mark.timeout(60)
def test_compress_only_old_files(store: Path, built: dict[str, bytes]) -> None:
    """`compress --older-than 1d` swaps exactly the old pattern files to `.zst` (decodable by
    `zstd -d`, same mode and mtime), leaves fresh, non-matching and incompressible files plain,
    prints one summary on stdout and nothing on stderr."""
    before = {n: (store / n).stat() for n in built}
    r = zstfs("compress", str(store), "--older-than", "1d", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "3 files compressed" in r.stdout, r.stdout
    assert "1 left plain" in r.stdout, r.stdout
    assert "0 failed" in r.stdout, r.stdout
    assert len(r.stdout.strip().splitlines()) == 1, r.stdout

    for name in OLD:
        z = store / (name + ".zst")
        assert not (store / name).exists(), name
        assert zstd_decode(z) == built[name], name
        st = z.stat()
        assert st.st_mtime_ns == before[name].st_mtime_ns, name
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(before[name].st_mode), name
        assert st.st_size < len(built[name]) * 0.95, name
    for name in ("new-d.jsonl", "sessions/new-e.jsonl", "notes.txt", "noise.jsonl"):
        assert (store / name).read_bytes() == built[name], name
        assert not (store / (name + ".zst")).exists(), name
    assert not [p for p in store.rglob(".zstfs-tmp.*")]

    # Nothing old and plain is left: a second run compresses nothing (and still succeeds).
    r = zstfs("compress", str(store), "--older-than", "1d")
    assert r.returncode == 0, r.stderr
    assert "0 files compressed" in r.stdout, r.stdout


@needs_zstd
@pytest.mark.timeout(60)
def test_compressed_store_mounts_and_reads_back(store: Path, built: dict[str, bytes],
                                                mount_factory: MountFactory) -> None:
    """What `compress` writes is what the daemon reads: every file reads back through a mount
    (the offline swap and the daemon's swap produce the same store)."""
    r = zstfs("compress", str(store))
    assert r.returncode == 0, r.stderr
    assert "5 files compressed" in r.stdout, r.stdout  # everything but notes.txt and noise
    m = mount_factory(store)
    for name, data in built.items():
        assert (store / name).read_bytes() == data, name
    m.stop()


@needs_zstd
@pytest.mark.timeout(60)
def test_verify_good_and_damaged(store: Path, built: dict[str, bytes]) -> None:
    """`verify` exits 0 on a good store; with bytes flipped inside a frame of one `.zst` it
    exits 1 and names that file (and only that one); it changes nothing in either case."""
    assert zstfs("compress", str(store), "--older-than", "1d").returncode == 0
    state = snapshot(store)
    r = zstfs("verify", str(store))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "3 files checked, 3 good, 0 damaged" in r.stdout, r.stdout
    assert snapshot(store) == state

    bad = store / "old-b.jsonl.zst"
    raw = bytearray(bad.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 8):  # inside the (only) frame
        raw[i] ^= 0xFF
    bad.write_bytes(bytes(raw))
    state = snapshot(store)
    r = zstfs("verify", str(store))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert str(bad) in r.stderr, r.stderr
    assert "damaged" in r.stderr, r.stderr
    assert "old-a" not in r.stderr, r.stderr
    assert "1 damaged" in r.stdout, r.stdout
    assert snapshot(store) == state


@needs_zstd
@pytest.mark.timeout(60)
def test_expand_restores_plain_files(store: Path, built: dict[str, bytes]) -> None:
    """`expand` turns every `.zst` back into the plain file with identical bytes, mode and
    mtime; a damaged `.zst` is reported, left alone, and makes the exit status 1."""
    before = {n: (store / n).stat() for n in built}
    assert zstfs("compress", str(store)).returncode == 0
    packed = sorted(p.name for p in store.rglob("*.zst"))
    assert len(packed) == 5, packed

    # Damage one, expand: the others come back, the damaged one stays as it was.
    bad = store / "old-a.jsonl.zst"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    r = zstfs("expand", str(store))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert str(bad) in r.stderr, r.stderr
    assert "4 files expanded, 1 failed" in r.stdout, r.stdout
    assert bad.read_bytes() == bytes(raw)
    assert not (store / "old-a.jsonl").exists()

    # Repair it (as a user would, from a backup) and expand again: all plain.
    bad.unlink()
    (store / "old-a.jsonl").write_bytes(built["old-a.jsonl"])
    os.chmod(store / "old-a.jsonl", stat.S_IMODE(before["old-a.jsonl"].st_mode))
    os.utime(store / "old-a.jsonl", ns=(before["old-a.jsonl"].st_atime_ns,
                                        before["old-a.jsonl"].st_mtime_ns))
    r = zstfs("expand", str(store))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "0 files expanded, 0 failed" in r.stdout, r.stdout

    assert not list(store.rglob("*.zst"))
    assert not list(store.rglob(".zstfs-tmp.*"))
    for name, data in built.items():
        st = (store / name).stat()
        assert (store / name).read_bytes() == data, name
        assert st.st_mtime_ns == before[name].st_mtime_ns, name
        assert st.st_mode == before[name].st_mode, name
        assert st.st_uid == before[name].st_uid, name


@needs_zstd
@pytest.mark.timeout(60)
def test_expand_round_trip_of_everything(store: Path, built: dict[str, bytes]) -> None:
    """compress then expand gives back exactly the store that was there (bytes, modes,
    mtimes of every file), so a user can stop using zstfs at any time."""
    state = snapshot(store)
    assert zstfs("compress", str(store)).returncode == 0
    r = zstfs("expand", str(store))
    assert r.returncode == 0, r.stderr
    assert "5 files expanded, 0 failed" in r.stdout, r.stdout
    assert snapshot(store) == state


@pytest.mark.timeout(60)
def test_offline_commands_refuse_while_mounted(store: Path, built: dict[str, bytes],
                                               mount_factory: MountFactory,
                                               tmp_path: Path) -> None:
    """compress, expand and verify refuse (exit 1, naming the daemon's PID) while a mount holds
    the store, mounted over itself or elsewhere, and change nothing."""
    assert zstfs("compress", str(store), "--older-than", "1d").returncode == 0
    state = snapshot(store)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for mountpoint in (store, mnt):
        m = mount_factory(store, mountpoint=mountpoint)
        for cmd in ("compress", "expand", "verify"):
            r = zstfs(cmd, str(store))
            assert r.returncode == 1, (cmd, r.stdout, r.stderr)
            assert f"process {m.pid}" in r.stderr, (cmd, r.stderr)
            assert "in use" in r.stderr, (cmd, r.stderr)
            assert r.stdout == "", cmd
        m.stop()
        assert snapshot(store) == state


@pytest.mark.timeout(60)
def test_progress_bar_only_when_asked(store: Path, built: dict[str, bytes]) -> None:
    """`--progress` draws a bar on stderr (redrawn with carriage returns, ending at 100%, with
    bytes, files, rate and ETA) while the summary stays on stdout; without a terminal and
    without `--progress`, stderr stays empty."""
    started = time.monotonic()
    r = zstfs("compress", str(store), "--progress")
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert "\r" in r.stderr
    assert r.stderr.count("\r") <= 10 * elapsed + 2, "redrawn more than ~10 times a second"
    final = r.stderr.rstrip("\n").split("\r")[-1]
    assert "100%" in final, final
    assert "6/6 files" in final, final  # the 5 compressed plus the incompressible one
    assert "/s" in final, final
    assert "ETA" in final, final
    assert "files compressed" in r.stdout
    assert "\r" not in r.stdout

    for cmd in ("verify", "expand"):
        r = zstfs(cmd, str(store), "--progress")
        assert r.returncode == 0, r.stderr
        final = r.stderr.rstrip("\n").split("\r")[-1]
        assert "100%" in final, (cmd, final)
        assert "5/5 files" in final, (cmd, final)

    for cmd in ("compress", "verify", "expand"):
        r = zstfs(cmd, str(store))
        assert r.returncode == 0, r.stderr
        assert r.stderr == "", (cmd, r.stderr)
        assert len(r.stdout.strip().splitlines()) == 1, (cmd, r.stdout)


def test_missing_store_is_one_line_and_status_1(tmp_path: Path) -> None:
    for cmd in ("compress", "expand", "verify"):
        r = zstfs(cmd, str(tmp_path / "nope"))
        assert r.returncode == 1, cmd
        assert r.stderr.strip().splitlines() == [f"zstfs: {tmp_path / 'nope'}: no such directory"]
