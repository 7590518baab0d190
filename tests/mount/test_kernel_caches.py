"""What the mount does to make everyday tools cheap must not change what they see.

Negative lookups are cached by the kernel (an entry with inode 0 and the positive entries'
timeout): a name created through the mount right after a failed lookup is visible at once, a
compressed file's logical name resolves while its `.zst` name never does, removed names are gone.
`readdir` lists `.` and `..` with the right inode numbers, and the tools that walk trees (`rm -rf`,
`find`, `diff -r`, `tar`) still do the right thing. Real mounts; no timing asserts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness.mount import Mount, compress_in_place, wait_until


def enoent(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    return False


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                       cwd=cwd)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_names_created_after_a_failed_lookup_are_visible_at_once(mounted: Mount) -> None:
    m = mounted.mountpoint
    (m / "d").mkdir()
    (m / "target").write_text("t")
    kinds = {
        "created": lambda p: p.write_text("new"),
        "excl": lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
        "dir": lambda p: p.mkdir(),
        "symlink": lambda p: p.symlink_to("target"),
        "hardlink": lambda p: os.link(m / "target", p),
        "fifo": lambda p: os.mkfifo(p),
        "renamed": lambda p: os.rename(m / "d" / "src", p),
    }
    (m / "d" / "src").write_text("moved")
    for name, make in kinds.items():
        for parent in (m, m / "d"):
            p = parent / f"{name}.x"
            if name == "renamed" and parent == m / "d":
                continue
            # Asked twice: the second answer may come from the kernel's negative entry.
            assert enoent(p), p
            assert enoent(p), p
            make(p)
            assert not enoent(p), f"{p} not visible right after it was made"
            assert p.name in os.listdir(parent)
    assert (m / "renamed.x").read_text() == "moved"
    assert enoent(m / "d" / "src")
    # The same names, once removed, are gone again and can be made again.
    for name in kinds:
        p = m / f"{name}.x"
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink()
        assert enoent(p)
        assert enoent(p)
    (m / "created.x").write_text("again")
    assert (m / "created.x").read_text() == "again"


def test_unlink_then_lookup_and_rename_over(mounted: Mount) -> None:
    m = mounted.mountpoint
    a, b = m / "a.jsonl", m / "b.jsonl"
    a.write_text("A\n")
    b.write_text("B\n")
    os.unlink(a)
    assert enoent(a)
    assert enoent(a)
    with pytest.raises(FileNotFoundError):
        a.read_text()
    a.write_text("A2\n")
    os.rename(a, b)  # over an existing name
    assert enoent(a)
    assert b.read_text() == "A2\n"
    c = m / "c.jsonl"
    assert enoent(c)
    os.rename(b, c)  # onto a name whose lookup just failed
    assert enoent(b)
    assert c.read_text() == "A2\n"
    assert sorted(os.listdir(m)) == ["c.jsonl"]


def test_compressed_names_resolve_and_zst_names_never_do(store: Path, mount_factory) -> None:
    (store / "old.jsonl").write_bytes(b'{"a":1}\n' * 500)
    compress_in_place(store / "old.jsonl")
    m = mount_factory(store, "--compress-after", "0").mountpoint
    assert enoent(m / "old.jsonl.zst")
    assert enoent(m / "old.jsonl.zst")
    assert (m / "old.jsonl").read_bytes() == b'{"a":1}\n' * 500
    # A file the daemon compresses itself keeps its name; its .zst name never shows.
    new = m / "new.jsonl"
    assert enoent(m / "new.jsonl.zst")
    new.write_bytes(b'{"b":2}\n' * 500)
    mm = mounted_status(m)
    wait_until(lambda: mm()["swaps_done"] >= 1, 30, "the daemon to compress new.jsonl")
    assert enoent(m / "new.jsonl.zst")
    assert new.read_bytes() == b'{"b":2}\n' * 500
    assert sorted(os.listdir(m)) == ["new.jsonl", "old.jsonl"]
    # Creating the representation's name is refused, and it stays invisible.
    with pytest.raises(PermissionError):
        (m / "new.jsonl.zst").write_bytes(b"x")
    assert enoent(m / "new.jsonl.zst")
    # Removing the logical name removes it; making it again works at once.
    new.unlink()
    assert enoent(new)
    new.write_text("fresh\n")
    assert new.read_text() == "fresh\n"


def mounted_status(mountpoint: Path):  # type: ignore[no-untyped-def]
    import json

    return lambda: json.loads(os.getxattr(mountpoint, "user.zstfs.status"))


def ls_ai(d: Path) -> dict[str, int]:
    out = run("ls", "-ai", "-1", d)
    entries = {}
    for line in out.splitlines():
        ino, name = line.strip().split(None, 1)
        entries[name] = int(ino)
    return entries


def test_ls_a_shows_dot_and_dotdot_with_their_inodes(mounted: Mount) -> None:
    m = mounted.mountpoint
    (m / "sub" / "deeper").mkdir(parents=True)
    (m / "sub" / "f").write_text("x")
    root = ls_ai(m)
    assert root["."] == os.stat(m).st_ino
    assert ".." in root
    sub = ls_ai(m / "sub")
    assert set(sub) == {".", "..", "deeper", "f"}
    assert sub["."] == os.stat(m / "sub").st_ino
    assert sub[".."] == os.stat(m).st_ino
    assert sub["f"] == os.stat(m / "sub" / "f").st_ino
    deeper = ls_ai(m / "sub" / "deeper")
    assert deeper == {".": os.stat(m / "sub" / "deeper").st_ino,
                      "..": os.stat(m / "sub").st_ino}
    # Listed many times, the dot entries add nothing the kernel will not forget: the directory
    # can still be removed and the daemon logs no error (checked at teardown).
    for _ in range(5):
        ls_ai(m / "sub" / "deeper")
    (m / "sub" / "deeper").rmdir()
    assert "deeper" not in os.listdir(m / "sub")
    # Python's listings never show the dot entries.
    assert sorted(os.listdir(m / "sub")) == ["f"]
    assert sorted(e.name for e in os.scandir(m / "sub")) == ["f"]


def make_tree(root: Path) -> None:
    for i in range(6):
        d = root / f"d{i}" / "inner"
        d.mkdir(parents=True)
        for j in range(30):
            (d.parent / f"f{j}.jsonl").write_text(f"{i} {j}\n" * (j + 1))
            (d / f"g{j}.txt").write_text("g" * j)
        (d / "link").symlink_to("g1.txt")
        (d / "empty").mkdir()


def listing(root: Path) -> list[str]:
    return sorted(run("find", ".", cwd=root).splitlines())


def test_tree_tools_find_tar_diff_rm(mounted: Mount, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    make_tree(disk)
    m = mounted.mountpoint
    tarball = tmp_path / "t.tar"
    run("tar", "-cf", tarball, "-C", disk, ".")
    (m / "x").mkdir()
    run("tar", "-xf", tarball, "-C", m / "x")
    assert listing(m / "x") == listing(disk)
    assert run("find", m / "x", "-type", "d", "-empty").count("empty") == 6
    run("diff", "-r", "--no-dereference", disk, m / "x")
    # A tar written from the mount extracts to the same tree on disk.
    back = tmp_path / "back"
    back.mkdir()
    run("sh", "-c", f"tar -cf - -C '{m / 'x'}' . | tar -xf - -C '{back}'")
    run("diff", "-r", "--no-dereference", disk, back)
    # diff -r reports a difference through the mount.
    (m / "x" / "d3" / "inner" / "g5.txt").write_text("changed")
    r = subprocess.run(["diff", "-rq", str(disk), str(m / "x")], capture_output=True, text=True)
    assert r.returncode == 1
    assert "g5.txt" in r.stdout
    run("rm", "-rf", m / "x")
    assert enoent(m / "x")
    assert os.listdir(m) == []


def test_rm_rf_of_a_compressed_tree(store: Path, mount_factory) -> None:
    d = store / "sessions" / "2026" / "01" / "02"
    d.mkdir(parents=True)
    for i in range(5):
        (d / f"r{i}.jsonl").write_bytes(b'{"i":%d}\n' % i * 100)
        compress_in_place(d / f"r{i}.jsonl")
    m = mount_factory(store).mountpoint
    assert sorted(os.listdir(m / "sessions" / "2026" / "01" / "02")) == [
        f"r{i}.jsonl" for i in range(5)]
    assert len(run("find", m / "sessions", "-type", "f").splitlines()) == 5
    run("rm", "-rf", m / "sessions")
    assert enoent(m / "sessions")
    assert not (store / "sessions").exists()
    # And the name can be made again at once.
    (m / "sessions").mkdir()
    assert os.listdir(m / "sessions") == []


def test_a_missing_name_stays_missing_and_errors_are_unchanged(mounted: Mount) -> None:
    m = mounted.mountpoint
    for _ in range(3):
        assert enoent(m / "nope")
        with pytest.raises(FileNotFoundError):
            os.open(m / "nope", os.O_RDONLY)
        with pytest.raises(FileNotFoundError):
            os.rmdir(m / "nope")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "nope" / "below")
    shutil.rmtree(m / "nope", ignore_errors=True)
    assert enoent(m / ".zstfs.lock")
    with pytest.raises(PermissionError):
        (m / ".zstfs-mine").write_text("x")


def test_xattrs_of_open_files_are_answered_from_the_handle(store: Path, mount_factory) -> None:
    """getxattr of an open file (every write asks for security.capability) reads its held
    descriptor: the same answers as by path, for plain and compressed files, and after unlink."""
    (store / "z.jsonl").write_bytes(b'{"z":1}\n' * 100)
    os.setxattr(store / "z.jsonl", "user.k", b"zv")
    compress_in_place(store / "z.jsonl")
    os.setxattr(store / "z.jsonl.zst", "user.k", b"zv")
    m = mount_factory(store).mountpoint
    p = m / "p.txt"
    p.write_text("x")
    os.setxattr(p, "user.k", b"pv")
    with open(p, "ab") as f, open(m / "z.jsonl", "rb") as z:
        assert os.getxattr(p, "user.k") == b"pv"
        assert os.getxattr(f.fileno(), "user.k") == b"pv"
        assert os.getxattr(m / "z.jsonl", "user.k") == b"zv"
        assert os.getxattr(z.fileno(), "user.k") == b"zv"
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(p, "user.none")
        f.write(b"more")
        f.flush()
        os.setxattr(f.fileno(), "user.k", b"pv2")
        assert os.getxattr(p, "user.k") == b"pv2"
        os.unlink(p)
        assert os.getxattr(f.fileno(), "user.k") == b"pv2"
        # A compressed file promoted by a write through another handle answers from its
        # new form.
        with open(m / "z.jsonl", "ab") as w:
            w.write(b'{"z":2}\n')
            assert os.getxattr(w.fileno(), "user.k") == b"zv"
        assert os.getxattr(z.fileno(), "user.k") == b"zv"


def test_request_counters_are_off_by_default_and_count_when_asked(
        store: Path, mount_factory) -> None:
    plain = mount_factory(store)
    assert "requests" not in plain.status()
    plain.stop()
    m = mount_factory(store, start=False).start(env={**os.environ, "ZSTFS_OPSTATS": "1"})
    mp = m.mountpoint
    before = m.status()["requests"]
    assert enoent(mp / "absent")
    (mp / "f").write_text("x")
    os.getxattr(mp, "user.zstfs.status")  # not counted
    # The status document is recomputed at most once a second.
    after = wait_until(lambda: (r := m.status()["requests"])["count"].get("create") and r, 10,
                       "the counters to show the create")
    assert after["count"]["lookup"] - before["count"].get("lookup", 0) >= 2
    assert after["errors"]["lookup:negative-entry"] >= 1
    assert after["count"]["create"] == 1
    # The write's security.capability probe at most; the status reads are not counted.
    assert after["count"].get("getxattr", 0) <= 1
    assert after["ns"]["create"] > 0
    assert after["cpu_s"] >= before["cpu_s"]


def test_kernel_kept_listings_follow_every_change_made_through_the_mount(
        store: Path, mount_factory) -> None:
    """zstfs's pyfuse3 lets the kernel keep directory listings (`enable_readdir_cache`): listed
    again, a directory costs no READDIR, yet every change made through the mount, by any
    process, shows in the very next listing."""
    m = mount_factory(store, start=False).start(env={**os.environ, "ZSTFS_OPSTATS": "1"})
    assert "enable_readdir_cache" in m.status()["pyfuse3_patches"]  # install.sh built it
    mp = m.mountpoint
    d, other = mp / "d", mp / "other"
    d.mkdir()
    other.mkdir()
    for name in ("a.jsonl", "b.txt"):
        (d / name).write_text(name)
    before = m.status()["requests"]["count"]
    for _ in range(6):
        assert sorted(os.listdir(d)) == ["a.jsonl", "b.txt"]
    # A request after the listings, to know when the counters include them (they are answered
    # in order): the lookup of a name that is not there.
    assert enoent(mp / "marker-after-listings")
    after = wait_until(
        lambda: (c := m.status()["requests"]["count"]).get("lookup", 0)
        > before.get("lookup", 0) and c, 10, "the counters to show the marker lookup")
    assert after.get("readdir", 0) - before.get("readdir", 0) <= 2  # the first listing only
    # And no directory handles at all where the kernel has FUSE_NO_OPENDIR_SUPPORT (6.18 here):
    # one OPENDIR answered ENOSYS, ever.
    if "directories_by_inode" in m.status()["pyfuse3_patches"]:
        assert after.get("opendir", 0) <= 1
        assert after.get("releasedir", 0) == 0

    def ls(path: Path) -> set[str]:
        return set(run("ls", "-a", "-1", path).split()) - {".", ".."}

    expected = {"a.jsonl", "b.txt"}
    steps: list[tuple[list[str], set[str]]] = [
        (["touch", str(d / "c")], expected | {"c"}),
        (["rm", str(d / "c")], expected),
        (["mv", str(d / "b.txt"), str(d / "b2.txt")], {"a.jsonl", "b2.txt"}),
        (["mv", str(d / "b2.txt"), str(other / "b.txt")], {"a.jsonl"}),
        (["mv", str(other / "b.txt"), str(d / "b.txt")], expected),
        (["mkdir", str(d / "sub")], expected | {"sub"}),
        (["rmdir", str(d / "sub")], expected),
        (["ln", "-s", "a.jsonl", str(d / "sym")], expected | {"sym"}),
        (["ln", str(d / "b.txt"), str(d / "hard")], expected | {"sym", "hard"}),
        (["mkfifo", str(d / "fifo")], expected | {"sym", "hard", "fifo"}),
        (["rm", str(d / "sym"), str(d / "hard"), str(d / "fifo")], expected),
    ]
    for cmd, names in steps:
        ls(d)  # listed (and kept by the kernel) before the change
        run(*cmd)
        assert ls(d) == names, cmd
        assert set(os.listdir(d)) == names, cmd
    assert ls(other) == set()
    # A compressed file turned plain by an append keeps its place in the listing.
    m.stop()
    compress_in_place(store / "d" / "a.jsonl")
    m = mount_factory(store)
    assert ls(d) == expected
    with open(d / "a.jsonl", "a") as f:
        f.write("+more")
    assert ls(d) == expected
    assert (d / "a.jsonl").read_text() == "a.jsonl+more"
    assert sorted(os.listdir(store / "d")) == ["a.jsonl", "b.txt"]


def test_directories_list_whole_while_their_files_are_compressed(
        store: Path, mount_factory) -> None:
    """Each swap replaces a file by its `.zst` in the very directory being listed (and a listing
    may be kept by the kernel): every listing meanwhile shows every name, and none fails."""
    d = store / "s"
    d.mkdir()
    names = {f"r{i:02}.jsonl" for i in range(40)}
    old = time.time() - 3600
    for name in names:
        (d / name).write_text('{"k":"v"}\n' * 2000)
        os.utime(d / name, (old, old))
    m = mount_factory(store, "--compress-after", "0")
    listings = 0
    while m.status()["compressed_files"] < len(names):
        assert set(os.listdir(d)) == names
        assert {e.name for e in os.scandir(d)} == names
        listings += 1
        assert listings < 100_000, "compression did not finish"
    assert set(run("ls", "-a", d).split()) == names | {".", ".."}
    assert sorted(os.listdir(store / "s")) == sorted(names)
    assert all((d / n).read_text() == '{"k":"v"}\n' * 2000 for n in names)


def test_a_big_directory_lists_every_name_once(store: Path, mount_factory) -> None:
    """Listed in many pages (the kernel asks for ~128 KiB at a time), by inode and per-name
    cookies or through a handle: every name exactly once, before and after changes."""
    d = store / "big"
    d.mkdir()
    names = {f"rollout-{i:05}-{'x' * 40}.jsonl" for i in range(3000)}
    for name in names:
        (d / name).write_bytes(b"")
    m = mount_factory(store)
    listed = run("ls", "-f", m.mountpoint / "big").split()
    assert len(listed) == len(names) + 2
    assert set(listed) == names | {".", ".."}
    gone = sorted(names)[::3]
    for name in gone:
        (m.mountpoint / "big" / name).unlink()
    new = {f"new-{i:04}.txt" for i in range(500)}
    for name in new:
        (m.mountpoint / "big" / name).write_bytes(b"n")
    listed = run("ls", "-f", m.mountpoint / "big").split()
    want = (names - set(gone)) | new | {".", ".."}
    assert len(listed) == len(want)
    assert set(listed) == want
    assert sorted(os.listdir(m.mountpoint / "big")) == sorted(want - {".", ".."})
