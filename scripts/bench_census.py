#!/usr/bin/env python3
"""What a store's census costs cold, with and without the size noted on each `.zst`.

The census (every mount runs one, and `zstfs status` of an unmounted store) learns the decoded
size of every `.zst`. With a note (`user.zstfs.size`, zstfs/sizenote.py) that is one xattr read
per file; without, the file's seek table, from the far end of the file. Two copies of STORE, one
with the notes and one without, each censused in a fresh process after the page cache is dropped
(root only), alternating; reported: time, read system calls and bytes read from the disk
(`/proc/self/io`), medians.

Usage (as root)::

    python scripts/bench_census.py STORE [--reps 5] [--workdir DIR]

STORE: a codex store, plain or compressed (copied, then compressed with `zstfs compress`), e.g.
the one `bench_mount_cost.py` generates: WORKDIR/store-cache/store-s1000-b157286400-seed7.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, os, sys, time
from zstfs import codec
from zstfs.names import NameRules
from zstfs.store import Store
def io():
    d = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(d["syscr"]), int(d["read_bytes"])
s = Store.open(sys.argv[1], NameRules(None), codec.CodecParams())
a = io(); t = time.perf_counter(); c = s.census(); dt = time.perf_counter() - t; b = io()
print(json.dumps({"s": dt, "reads": b[0] - a[0], "bytes": b[1] - a[1],
                  "files": c.compressed_files, "logical": c.compressed_logical_bytes}))
"""


def census(store: Path) -> dict[str, float]:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    out = subprocess.run([sys.executable, "-c", CHILD, str(store)], check=True, text=True,
                         capture_output=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return json.loads(out)


def strip_notes(store: Path) -> int:
    n = 0
    for p in store.rglob("*.zst"):
        try:
            os.removexattr(p, "user.zstfs.size", follow_symlinks=False)
            n += 1
        except OSError:
            pass
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/zstfs-census"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (it drops the page cache)")
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    noted, bare = args.workdir / "noted", args.workdir / "bare"
    subprocess.run(["cp", "-a", str(args.store), str(noted)], check=True)
    # Compressed as a user compresses (what is compressed already stays as it is).
    subprocess.run([sys.executable, "-m", "zstfs", "compress", "--no-progress", "--older-than",
                    "0", str(noted)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    subprocess.run(["cp", "-a", str(noted), str(bare)], check=True)
    strip_notes(bare)
    census(noted)  # writes the notes a copy without them lacks
    runs: dict[str, list[dict[str, float]]] = {"without notes": [], "with notes": []}
    for _ in range(args.reps):
        for label, d in (("without notes", bare), ("with notes", noted)):
            runs[label].append(census(d))
            if label == "without notes":
                strip_notes(bare)  # the census just noted them
    files = runs["with notes"][0]["files"]
    assert all(r["logical"] == runs["with notes"][0]["logical"] for rs in runs.values()
               for r in rs), "the two censuses disagree"
    print(f"census of {files} compressed files, cold, medians of {args.reps}:\n")
    print("| store | time | read calls | read from disk |\n|---|---:|---:|---:|")
    for label, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("s", "reads", "bytes")}
        print(f"| {label} | {med['s']:.3f} s | {med['reads']:.0f} | "
              f"{med['bytes'] / 2**20:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
