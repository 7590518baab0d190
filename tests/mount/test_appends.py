"""Appends through a real mount: one `write(2)` reaches the daemon as one request, so a daemon
killed at any instant leaves whole lines; other openers' cached pages never go stale.

The kernel cuts a buffered write after its first page when that page is only partly written and
not cached whole (every append that does not start on a page boundary), so an appender's handle
is opened for direct I/O where the kernel drops the written range from the page cache
(`attrs.DIRECT_APPENDS`, Linux 6.13+). Request counts come from `ZSTFS_OPSTATS=1`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness.mount import Mount, MountFactory, wait_until

from zstfs.attrs import DIRECT_APPENDS

needs_direct_appends = pytest.mark.skipif(
    not DIRECT_APPENDS, reason="direct-I/O appends need Linux 6.13+ (page cache dropped on write)")


def counting_mount(store: Path, mount_factory: MountFactory) -> Mount:
    return mount_factory(store, start=False).start(env={**os.environ, "ZSTFS_OPSTATS": "1"})


def writes(m: Mount) -> int:
    return int(m.status()["requests"]["count"].get("write", 0))


@needs_direct_appends
@pytest.mark.timeout(60)
def test_one_append_is_one_request(store: Path, mount_factory: MountFactory) -> None:
    m = counting_mount(store, mount_factory)
    path = store / "r.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    expected = bytearray()
    try:
        head = b"x" * (4096 - 814)  # the next line starts 814 bytes before a page boundary
        os.write(fd, head)
        expected += head
        for size in (3507, 3507, 100, 8000, 4096, 65536, 128 * 1024):
            line = json.dumps({"pad": "y" * (size - 12)}).encode() + b"\n"
            before = writes(m)
            assert os.write(fd, line) == len(line)
            assert writes(m) - before == 1, f"a {len(line)}-byte append took several requests"
            expected += line
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(expected)


READER = r"""
import os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
seen = os.pread(fd, 1 << 20, 0)  # caches every page, the partly filled last one too
print(len(seen), flush=True)
sys.stdin.readline()  # the writer appends meanwhile
print(os.pread(fd, 1 << 20, 0).hex(), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_reader_with_cached_pages_sees_every_appended_byte(store: Path,
                                                            mount_factory: MountFactory) -> None:
    mount_factory(store)
    path = store / "r.jsonl"
    path.write_bytes(b'{"first": 1}\n' * 100)  # 1,300 bytes: the last page is partly filled
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None
    assert reader.stdin is not None
    try:
        assert reader.stdout.readline().strip() == "1300"
        appended = b"".join(b'{"n": %d}\n' % i for i in range(500))
        with open(path, "ab") as f:  # a direct-I/O append where the kernel allows it
            for i in range(0, len(appended), 333):
                f.write(appended[i:i + 333])
                f.flush()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        got = bytes.fromhex(reader.stdout.readline().strip())
    finally:
        reader.communicate(timeout=30)
    assert got == b'{"first": 1}\n' * 100 + appended


APPENDER = r"""
import json, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while True:
    line = json.dumps({"i": i, "pad": "z" * (3000 + i % 1500)}).encode() + b"\n"
    try:
        n = os.write(fd, line)
    except OSError:
        break
    if n != len(line):
        break
    i += 1
    if i == 200:
        print("going", flush=True)
print(i, flush=True)
"""


@needs_direct_appends
@pytest.mark.timeout(90)
def test_a_daemon_killed_under_an_appender_leaves_whole_lines(store: Path,
                                                               mount_factory: MountFactory,
                                                               tmp_path: Path) -> None:
    """Lines of 3-4.5 KB appended in a loop (most cross a page boundary) while the daemon is
    killed: the backing file holds only whole lines, each acknowledged one among them."""
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    try:
        m = mount_factory(store)
        writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(store / "r.jsonl")],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "going"
        os.kill(m.pid, signal.SIGKILL)
        acknowledged = int(writer.communicate(timeout=30)[0].split()[-1])
        data = Path(f"/proc/self/fd/{fd}/r.jsonl").read_bytes()
    finally:
        os.close(fd)
        wait_until(lambda: m.proc is not None and m.proc.poll() is not None, 10, "the daemon")
    assert data.endswith(b"\n")
    lines = data.splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(len(lines)))
    assert len(lines) >= acknowledged
