"""The daemon's request loop under a process that never lets it rest.

While requests arrive back to back, zstfs's reader polls for the next one instead of sleeping
(`spin_ns`). Its own work must go on all the same: the compactor's timer fires, compression runs
in a worker thread, its result is taken up and the swap is published, all while a client keeps
sending requests whose handlers never wait for anything. Real mount, a real client process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import pytest
from harness.backing import DAY, backing, rollout, zstd_decode
from harness.mount import MountFactory, compress_in_place, reap, wait_until

#: One getxattr after the other on an open file (each one a request whose handler returns at
#: once) until stdin says stop; then the count.
HAMMER = r"""
import os, select, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
n = 0
while True:
    for _ in range(500):
        try:
            os.getxattr(fd, "user.absent")
        except OSError:
            pass
    n += 500
    if n == 500:
        print("started", flush=True)
    if select.select([sys.stdin], [], [], 0)[0]:
        break
print(n, flush=True)
"""


@pytest.mark.timeout(120)
def test_requests_sent_back_to_back_do_not_starve_the_compactor(
        store: Path, mount_factory: MountFactory) -> None:
    """A rollout that becomes due while another process keeps the mount busy is compressed on
    time, and decodes to the same bytes."""
    (store / "hot.txt").write_bytes(b"busy\n")
    data = rollout(store / "a.jsonl", 2_000_000, seed=1)
    due_in = 8.0
    mtime = int((time.time() - 7 * DAY + due_in) * 1e9)
    os.utime(store / "a.jsonl", ns=(mtime, mtime))
    with backing(store) as b:
        m = mount_factory(store, "--compress-after", "7d")
        s = m.status()
        if "spin_ns" in getattr(pyfuse3, "ZSTFS_PATCHES", ()):
            assert s["spin_ns"] > 0, s
        assert s["waiting_files"] == 1, s
        assert s["eligible_now"] == 0, s
        hammer = subprocess.Popen([sys.executable, "-c", HAMMER, str(store / "hot.txt")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert hammer.stdin is not None
        assert hammer.stdout is not None
        try:
            assert hammer.stdout.readline().strip() == "started"
            assert not b.is_compressed("a.jsonl"), "compressed before it was due"
            wait_until(lambda: b.is_compressed("a.jsonl"), 60,
                       "the rollout that became due to be compressed while requests kept coming")
            assert hammer.poll() is None, "the client stopped sending requests"
        finally:
            hammer.stdin.close()
            out = hammer.stdout.read()
            hammer.stdout.close()
            hammer.wait(timeout=30)
        assert int(out.split()[-1]) >= 1000, out
        assert zstd_decode(b.read("a.jsonl.zst")) == data
        assert (store / "a.jsonl").read_bytes() == data
        m.stop()


#: Takes a read lease on a backing file (opened before the mount goes over it), says so, prints
#: "broken" when the kernel asks for it back, and lets go when stdin says so.
LEASE_HOLDER = r"""
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, lambda *_: print("broken", flush=True))
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
print("leased", flush=True)
sys.stdin.readline()
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
os.close(fd)
print("released", flush=True)
"""

#: Opens a file through the mount for append (this waits for the lease) and writes a line.
APPENDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, sys.argv[2].encode())
os.close(fd)
print("wrote", flush=True)
"""

#: Requests of every kind through the mount, some whose handlers wait (decoding a compressed
#: file), most that never do: prints what it read.
BUSY_CLIENT = r"""
import hashlib, os, sys
root = sys.argv[1]
for _ in range(200):
    os.stat(os.path.join(root, "hot.txt"))
    try:
        os.getxattr(os.path.join(root, "hot.txt"), "user.absent")
    except OSError:
        pass
names = sorted(os.listdir(root))
with open(os.path.join(root, "cold.jsonl"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(" ".join(names), digest, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_request_that_waits_does_not_hold_up_the_others(
        store: Path, mount_factory: MountFactory) -> None:
    """An append to a file that another process holds a lease on waits, in the daemon, until the
    lease is given back. Meanwhile other processes' requests are all answered (stats, xattrs, a
    listing, a compressed file read whole), and the append then lands with every byte."""
    # The kernel takes a lease back by force after this long: the requests below must be
    # answered well within it.
    patience = int(Path("/proc/sys/fs/lease-break-time").read_text()) / 2
    if patience < 10:
        pytest.skip(f"fs.lease-break-time is {2 * patience:.0f} s here: too short to tell a "
                    "waiting request from one that went on")
    (store / "hot.txt").write_bytes(b"busy\n")
    held = b'{"line":1}\n'
    (store / "held.jsonl").write_bytes(held)
    cold = rollout(store / "cold.jsonl", 3_000_000, seed=4)
    compress_in_place(store / "cold.jsonl")
    line = '{"line":2}\n'
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(store / "held.jsonl")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    appender = None
    try:
        assert holder.stdin is not None
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "leased"
        with backing(store) as b:
            m = mount_factory(store, "--force")  # (the holder's descriptor is in the store)
            appender = subprocess.Popen([sys.executable, "-c", APPENDER,
                                         str(store / "held.jsonl"), line],
                                        stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "broken"  # the daemon asked for it
            try:
                busy = subprocess.run([sys.executable, "-c", BUSY_CLIENT, str(store)],
                                      capture_output=True, text=True, timeout=patience)
            except subprocess.TimeoutExpired:
                pytest.fail("requests went unanswered while the append waited for the lease")
            assert busy.returncode == 0, busy.stderr
            names, digest = busy.stdout.rsplit(" ", 1)
            assert names.split() == ["cold.jsonl", "held.jsonl", "hot.txt"]
            assert digest.strip() == hashlib.sha256(cold).hexdigest()
            assert appender.poll() is None, "the append did not wait for the lease"
            assert b.read("held.jsonl") == held
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "released"
            out, _ = appender.communicate(timeout=60)
            assert appender.returncode == 0, out
            assert out.strip() == "wrote", out
            assert b.read("held.jsonl") == held + line.encode()
            # and the mount goes on answering afterwards
            again = subprocess.run([sys.executable, "-c", BUSY_CLIENT, str(store)],
                                   capture_output=True, text=True, timeout=60)
            assert again.returncode == 0, again.stderr
            assert again.stdout == busy.stdout
            m.stop()
    finally:
        reap(holder, appender)
