"""A random line of a big compressed rollout, cold, in-process: what one lone read in the middle of
a zstfs `.zst` costs, with the next frames fetched and decoded ahead only for sequential readers
(what zstfs does) against ahead for every read (what it did before), interleaved.

Each run drops the page cache (root), makes fresh decoders and a fresh reader, and times two
64 KiB reads at a seeded random offset (the line and its continuation), as a reader of one line
does; it then waits for any decoding ahead to finish before the next run's cache drop.

    sudo .venv/bin/python scripts/bench_random_read.py FILE.zst [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zstfs.codec import Decoders, ZstReader

READ = 64 << 10


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def one_run(path: Path, i: int, always_ahead: bool) -> float:
    drop_caches()
    dec = Decoders()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        reader = ZstReader(fd, dec)
        if always_ahead:
            reader._sequential = lambda run: True  # type: ignore[method-assign]
        offset = random.Random(f"random line {i}").randrange(reader.size - 2 * READ)
        t0 = time.perf_counter()
        reader.read(offset, READ)
        reader.read(offset + READ, READ)
        dt = time.perf_counter() - t0
        deadline = time.monotonic() + 30
        while dec.frames.pending_ahead() and time.monotonic() < deadline:
            time.sleep(0.01)  # the next run starts with nothing decoding
        return dt
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path, help="a big .zst written by zstfs (several frames)")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if os.geteuid() != 0:
        sys.exit("needs root: each run drops the page cache")
    times: dict[str, list[float]] = {"sequential readers only (zstfs)": [],
                                     "every read (before)": []}
    for i in range(args.runs):
        for label, always in (("sequential readers only (zstfs)", False),
                              ("every read (before)", True)):
            times[label].append(one_run(args.file, i, always))
    print(f"{args.file.name}: two {READ >> 10} KiB reads at a random offset, cold, "
          f"{args.runs} interleaved runs")
    for label, ts in times.items():
        ts.sort()
        print(f"  ahead for {label}: median {statistics.median(ts) * 1e3:.1f} ms, "
              f"p90 {ts[int(len(ts) * 0.9)] * 1e3:.1f} ms, max {ts[-1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
