"""The daemon's request loop under a process that never lets it rest.

While requests arrive back to back, zstfs's reader polls for the next one instead of sleeping
(`spin_ns`). Its own work must go on all the same: the compactor's timer fires, compression runs
in a worker thread, its result is taken up and the swap is published, all while a client keeps
sending requests whose handlers never wait for anything. Real mount, a real client process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import pytest
from harness.backing import DAY, backing, rollout, zstd_decode
from harness.mount import MountFactory, wait_until

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
