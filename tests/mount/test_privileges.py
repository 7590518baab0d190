"""Set-uid and set-gid bits through the mount behave as on the disk, and writes stop asking for
`security.capability` where FUSE_HANDLE_KILLPRIV_V2 is negotiated.

The same sequence of writes, truncations and mode changes runs on a plain directory (the model)
and through a mount, by a caller with CAP_FSETID (root, who keeps the bits) and by one without
(the file's owner, nobody, who loses them); the modes that result must match. Real mounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
from harness.mount import NOBODY, Mount, as_nobody_in, wait_until, zstfs

#: file name → (mode it starts with, what is done to it). Run by `SEQUENCE` below, as a script,
#: so that it can run as another user.
CASES = {
    "write-suid": (0o4755, "write"),
    "write-sgid": (0o2755, "write"),
    "write-both": (0o6755, "write"),
    "write-sgid-noexec": (0o2644, "write"),
    "append-both": (0o6755, "append"),
    "trunc-open": (0o6755, "trunc-open"),
    "truncate": (0o6755, "truncate"),
    "chmod": (0o6755, "chmod"),
    "chown": (0o6755, "chown"),
    "plain": (0o755, "write"),
}

SEQUENCE = r"""
import json, os, sys
base, cases = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, (mode, action) in cases.items():
    p = os.path.join(base, name)
    if action == "write":
        fd = os.open(p, os.O_WRONLY)
        os.pwrite(fd, b"data\n", 0)
        os.close(fd)
    elif action == "append":
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"more\n")
        os.close(fd)
    elif action == "trunc-open":
        os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    elif action == "truncate":
        os.truncate(p, 1)
    elif action == "chmod":
        os.chmod(p, mode)
    elif action == "chown":
        st = os.stat(p)
        os.chown(p, st.st_uid, st.st_gid)
    out[name] = oct(os.stat(p).st_mode & 0o7777)
print(json.dumps(out))
"""


def prepare(base: Path, owner: int) -> None:
    for name, (mode, _) in CASES.items():
        p = base / name
        p.write_bytes(b"old content\n")
        os.chown(p, owner, owner)
        os.chmod(p, mode)  # after chown, which clears them


def run_sequence(base: Path, user: int | None) -> dict[str, str]:
    cmd = [sys.executable, "-c", SEQUENCE, str(base), json.dumps(CASES)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="zstfs-privileges-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def model(where: Path, user: int | None) -> dict[str, str]:
    plain = where / "model"
    plain.mkdir()
    plain.chmod(0o755)
    prepare(plain, NOBODY if user is not None else 0)
    return run_sequence(plain, user)


def test_suid_sgid_as_on_disk_for_root(tmp_path: Path, store: Path, mount_factory) -> None:
    expected = model(tmp_path, None)
    assert expected["write-both"] == "0o6755"  # CAP_FSETID keeps them
    assert expected["chown"] == "0o755"  # chown clears them for anyone
    prepare(store, 0)
    m = mount_factory(store)
    assert run_sequence(m.mountpoint, None) == expected


def test_suid_sgid_as_on_disk_for_an_owner_without_cap_fsetid(
        public: Path, mount_factory, stock_permissions: None) -> None:
    expected = model(public, NOBODY)
    assert expected["write-both"] == "0o755"
    assert expected["write-sgid-noexec"] == "0o2644"  # the owner is in the file's group
    assert expected["chmod"] == "0o6755"
    store = public / "store"
    store.mkdir()
    store.chmod(0o755)
    prepare(store, NOBODY)
    m = mount_factory(store, "--allow-other")
    assert run_sequence(m.mountpoint, NOBODY) == expected


def test_suid_sgid_as_on_disk_on_an_ordinary_users_mount(
        public: Path, user_dir: Path, detached: list[Path], stock_permissions: None) -> None:
    expected = model(public, NOBODY)
    env, log = as_nobody_in(user_dir, detached)
    prepare(user_dir, NOBODY)
    r = zstfs("mount", user_dir, "--log", log, user=NOBODY, env=env)
    assert r.returncode == 0, r.stderr
    assert run_sequence(user_dir, NOBODY) == expected


# ------------------------------------------------------------ GETXATTR per write(2)
WRITES = 2000

COUNTED = r"""
import os, sys
path, n, stat_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
for i in range(n):
    os.pwrite(fd, b"x" * 100, i * 100)
    if stat_every and i % stat_every == 0:
        os.fstat(fd)
os.close(fd)
"""


def getxattrs_per_write(status: object, path: Path, user: int | None,
                        stat_every: int = 0) -> float:
    """GETXATTR requests per write(2) to `path`, a file written before (through the mount)."""
    def count() -> int:
        return int(status()["requests"]["count"].get("getxattr", 0))  # type: ignore[operator]

    cmd = [sys.executable, "-c", COUNTED, str(path)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    subprocess.run([*cmd, "1", "0"], check=True, timeout=60)
    before = count()
    subprocess.run([*cmd, str(WRITES), str(stat_every)], check=True, timeout=120)
    return (count() - before) / WRITES


killpriv_v2 = pytest.mark.skipif(
    "enable_killpriv_v2" not in getattr(pyfuse3, "ZSTFS_PATCHES", ()),
    reason="this pyfuse3 cannot ask for FUSE_HANDLE_KILLPRIV_V2 (zstfs's patch on libfuse "
           "3.17+ can)")


@killpriv_v2
def test_writes_do_not_ask_for_security_capability(store: Path, mount_factory) -> None:
    m: Mount = mount_factory(store, start=False).start(env={**os.environ, "ZSTFS_OPSTATS": "1"})
    # A name inside the patterns: its writes come to the daemon (never passthrough).
    (m.mountpoint / "log.jsonl").write_bytes(b"")
    assert getxattrs_per_write(m.status, m.mountpoint / "log.jsonl", None) <= 0.01


@killpriv_v2
def test_writes_do_not_ask_for_security_capability_as_an_ordinary_user(
        user_dir: Path, detached: list[Path], stock_permissions: None) -> None:
    env, log = as_nobody_in(user_dir, detached)
    r = zstfs("mount", user_dir, "--log", log, user=NOBODY,
              env={**env, "ZSTFS_OPSTATS": "1"})
    assert r.returncode == 0, r.stderr

    def status() -> dict:
        r = zstfs("status", "--json", user_dir, user=NOBODY, env=env)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    wait_until(lambda: "requests" in status(), 10, "the daemon's request counts")
    assert getxattrs_per_write(status, user_dir / "before.txt", NOBODY) <= 0.01


@killpriv_v2
def test_a_capability_is_dropped_by_a_write(store: Path, mount_factory) -> None:
    """`security.capability` goes at a write, as on the disk (root may set one)."""
    m = mount_factory(store)
    f = m.mountpoint / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    cap = bytes.fromhex("0100000200100000000000000000000000000000")  # cap_net_bind_service+ep
    try:
        os.setxattr(f, "security.capability", cap)
    except OSError as e:
        pytest.skip(f"cannot set security.capability here: {e}")
    assert os.getxattr(f, "security.capability") == cap
    with open(f, "r+b") as w:
        w.write(b"#")
    for where in (store / "tool", f):
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(where, "security.capability")
