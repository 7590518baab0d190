#!/usr/bin/env python3
"""Benchmark zstfs's codec against codex's format, to choose and justify the CodecParams defaults.

Codex compresses a cold rollout as one zstd level-3 frame; zstfs writes the seekable format with
long-distance matching.  This script measures, side by side on rollout-like data:

* stored size and compression speed: ``zstd -3`` CLI, python-zstandard level 3 (one frame), zstfs
  defaults and a few other frame sizes / levels;
* decode speed: ``decompress_file`` vs ``zstd -d``, and sequential 128 KiB reads through ZstReader;
* reading the last 8 KiB of the big file through ZstReader (fresh caches) vs decoding it whole.

Rollout-like data comes from ``scripts/gen_rollouts.py`` (``generate_rollout(path, size, seed)``)
when it exists, else from the small inline generator below, which reproduces what matters for
compression: a large shared first line, repeated real-text tool outputs (Python stdlib sources),
incompressible base64 blobs, and multi-MB ``compacted`` lines that re-embed earlier history.

Usage: ``python scripts/bench_codec.py [--big-mb 150] [--runs 3] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

from zstfs import codec  # the installed zstfs (./install.sh --test installs this checkout)

HERE = Path(__file__).resolve().parent

MB = 1_000_000
MiB = 2**20
SMALL_SIZES = (50_000, 300_000, 2 * MB)


# --------------------------------------------------------------------------------------------
# Data


def _stdlib_texts(limit_bytes: int = 24 * MB) -> list[str]:
    """Real source text to stand in for tool outputs (file reads, diffs, command output)."""
    root = Path(os.__file__).parent
    texts: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total > limit_bytes:
            break
    return texts


def _inline_rollout(path: Path, size: int, seed: int) -> None:
    """Write a rollout-like JSONL file of about ``size`` bytes (see the module docstring)."""
    rng = random.Random(seed)
    texts = _stdlib_texts()
    base = "".join(texts[:3])[:20_000]
    ts = 1_700_000_000.0
    items: list[dict[str, object]] = []  # retained history, re-embedded by compaction
    written = since_compaction = 0
    with path.open("w", encoding="utf-8") as out:

        def emit(obj: dict[str, object]) -> None:
            nonlocal written, since_compaction, ts
            ts += rng.random() * 3
            line = json.dumps({"timestamp": f"{ts:.3f}", **obj}) + "\n"
            out.write(line)
            written += len(line)
            since_compaction += len(line)

        emit({"type": "session_meta", "payload": {"id": f"s{seed}", "base_instructions": base}})
        while written < size:
            turn = rng.randrange(10**6)
            emit(
                {
                    "type": "turn_context",
                    "payload": {
                        "cwd": "/home/u/proj",
                        "model": "gpt-5",
                        "approval": "on-request",
                        "turn": turn,
                    },
                }
            )
            text = rng.choice(texts)
            start = rng.randrange(max(1, len(text) - 2000))
            item: dict[str, object] = {
                "type": "function_call_output",
                "call_id": f"call_{turn}",
                "output": text[start : start + rng.randrange(2000, 40_000)],
            }
            if rng.random() < 0.02:
                blob = base64.b64encode(os.urandom(rng.randrange(5_000, 60_000))).decode()
                item["image_url"] = "data:image/png;base64," + blob
            items.append(item)
            emit({"type": "response_item", "payload": item})
            reasoning = rng.choice(texts)[:600]
            emit({"type": "response_item", "payload": {"type": "reasoning", "text": reasoning}})
            emit(
                {
                    "type": "event_msg",
                    "payload": {"type": "token_count", "info": {"total": written, "last": turn}},
                }
            )
            if since_compaction > 5 * MB:
                kept: list[dict[str, object]] = []
                kept_bytes = 0
                for old in reversed(items):  # keep the most recent ~3 MB of history
                    kept_bytes += len(str(old.get("output", "")))
                    kept_bytes += len(str(old.get("image_url", "")))
                    kept.append(old)
                    if kept_bytes > 3 * MB:
                        break
                items = kept[::-1]
                emit(
                    {
                        "type": "compacted",
                        "payload": {"message": "summary", "replacement_history": items},
                    }
                )
                since_compaction = 0
    _cut_at_line(path, size)


def _cut_at_line(path: Path, size: int) -> None:
    """Trim the file to at most ``size`` bytes at a line end (one turn can overshoot a lot)."""
    with path.open("r+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() <= size:
            return
        f.seek(0)
        head = f.read(size)
        cut = head.rfind(b"\n") + 1
        if cut > 0:
            f.truncate(cut)


def make_rollout(path: Path, size: int, seed: int, *, inline: bool = False) -> str:
    """Create a rollout file, preferring the project's generator; returns which generator ran."""
    if not inline:
        try:
            from gen_rollouts import generate_rollout  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            generate_rollout(path, size, seed=seed)
            return "scripts/gen_rollouts.py"
    _inline_rollout(path, size, seed)
    return "inline generator (scripts/bench_codec.py)"


# --------------------------------------------------------------------------------------------
# Measurement helpers


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    """Median wall time of ``runs`` calls, and the last call's result."""
    times: list[float] = []
    result: object = None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def zstd_cli(args: list[str], src: Path, dst: Path) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        subprocess.run(["zstd", "-q", "-c", *args], stdin=fin, stdout=fout, check=True)


def zstfs_compress(src: Path, dst: Path, params: codec.CodecParams) -> tuple[int, float]:
    """Stored bytes and the seconds ``compress_file`` took (open/truncate of files not timed:
    for a 50 KB file they cost more than compressing it)."""
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        stored = codec.compress_file(sfd, dfd, params)[1]
        return stored, time.perf_counter() - t0
    finally:
        os.close(sfd)
        os.close(dfd)


def zstfs_decompress(src: Path) -> int:
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(os.devnull, os.O_WRONLY)
    try:
        return codec.decompress_file(sfd, dfd)
    finally:
        os.close(sfd)
        os.close(dfd)


def reader_cat(src: Path) -> int:
    """Sequential 128 KiB reads through ZstReader, as ``cat`` through the mount would do."""
    dec = codec.Decoders()  # cold caches
    fd = os.open(src, os.O_RDONLY)
    try:
        reader = codec.ZstReader(fd, dec)
        pos = 0
        while chunk := reader.read(pos, 128 * 1024):
            pos += len(chunk)
        return pos
    finally:
        os.close(fd)


def reader_head(src: Path) -> bytes:
    """The first line (codex's ``session_meta``) through a fresh ZstReader with cold caches,
    index build included, read the way a line reader does: 64 KiB at a time up to a newline."""
    dec = codec.Decoders()  # cold caches
    fd = os.open(src, os.O_RDONLY)
    try:
        reader = codec.ZstReader(fd, dec)
        line = b""
        while b"\n" not in line:
            chunk = reader.read(len(line), 64 * 1024)
            if not chunk:
                break
            line += chunk
        return line.split(b"\n", 1)[0] + b"\n"
    finally:
        os.close(fd)


def reader_tail(src: Path, end: int | None = None) -> bytes:
    """The 8 KiB before ``end`` (default EOF) through a fresh ZstReader with cold caches, index
    build included.  Ending at a frame end shows the worst case: a whole frame decoded."""
    dec = codec.Decoders()  # cold caches
    fd = os.open(src, os.O_RDONLY)
    try:
        reader = codec.ZstReader(fd, dec)
        end = reader.size if end is None else end
        return reader.read(max(0, end - 8192), 8192)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Benchmark


def python_l3(src: Path, runs: int) -> tuple[int, float]:
    """Stored size and MB/s of one python-zstandard level-3 frame (codex's own writer)."""
    data = src.read_bytes()
    cctx = zstandard.ZstdCompressor(level=3)
    t, comp = median_time(lambda: cctx.compress(data), runs)
    assert isinstance(comp, bytes)
    return len(comp), len(data) / t / MB


def compress_rows(
    src: Path, work: Path, runs: int, variants: list[tuple[str, object]]
) -> list[tuple[str, int, float]]:
    """(label, stored bytes, compress MB/s) for codex's formats and each zstfs variant."""
    size = src.stat().st_size
    rows: list[tuple[str, int, float]] = []
    out = work / "out.zst"
    t, _ = median_time(lambda: zstd_cli(["-3"], src, out), runs)
    rows.append(("codex: `zstd -3` CLI, 1 frame", out.stat().st_size, size / t / MB))
    rows.append(("codex: python-zstandard L3, 1 frame", *python_l3(src, runs)))
    for label, params in variants:
        assert isinstance(params, codec.CodecParams)
        results = [zstfs_compress(src, out, params) for _ in range(runs)]
        t = statistics.median(seconds for _stored, seconds in results)
        rows.append((label, results[-1][0], size / t / MB))
    return rows


def variant_label(params: codec.CodecParams, default: bool = False) -> str:
    name = "zstfs defaults" if default else "zstfs"
    ldm = "+LDM" if params.long_distance else ""
    frames = f"{params.frame_size // MiB} MiB frames"
    return f"{name}: L{params.level}{ldm} wlog{params.window_log}, {frames}"


def big_variants() -> list[tuple[str, object]]:
    d = codec.CodecParams()
    others = [
        codec.CodecParams(frame_size=8 * MiB),
        codec.CodecParams(frame_size=16 * MiB),
        codec.CodecParams(frame_size=32 * MiB),
        codec.CodecParams(frame_size=64 * MiB),
        codec.CodecParams(frame_size=d.frame_size, long_distance=False),
        codec.CodecParams(frame_size=d.frame_size, level=1),
        codec.CodecParams(frame_size=d.frame_size, level=6),
        codec.CodecParams(frame_size=2**31 - 1),
    ]
    rows: list[tuple[str, object]] = [(variant_label(d, default=True), d)]
    rows += [(variant_label(p), p) for p in others if p != d]
    return [(label.replace(f"{2**31 - 1 >> 20} MiB frames", "1 frame"), p) for label, p in rows]


def print_compress_table(title: str, logical: int, rows: list[tuple[str, int, float]]) -> None:
    codex_size = rows[0][1]
    print(f"\n### {title}: {logical / MB:.1f} MB logical\n")
    print("| format | stored MB | ratio | x codex `zstd -3` | compress MB/s |")
    print("|---|---:|---:|---:|---:|")
    for label, stored, speed in rows:
        print(
            f"| {label} | {stored / MB:.3f} | {logical / stored:.2f} | "
            f"{stored / codex_size:.3f} | {speed:.0f} |"
        )


def bench_big(src: Path, work: Path, runs: int) -> None:
    logical = src.stat().st_size
    rows = compress_rows(src, work, runs, big_variants())
    print_compress_table("Big file", logical, rows)

    zst = work / "big.zst"
    zstfs_compress(src, zst, codec.CodecParams())
    codex_zst = work / "big.codex.zst"
    zstd_cli(["-3"], src, codex_zst)
    t_dec, n = median_time(lambda: zstfs_decompress(zst), runs)
    assert n == logical
    t_cli, _ = median_time(lambda: zstd_cli(["-d"], zst, Path(os.devnull)), runs)
    t_cli_codex, _ = median_time(lambda: zstd_cli(["-d"], codex_zst, Path(os.devnull)), runs)
    t_cat, n = median_time(lambda: reader_cat(zst), runs)
    assert n == logical
    t_tail, tail = median_time(lambda: reader_tail(zst), max(runs, 5))
    with src.open("rb") as f:
        f.seek(logical - 8192)
        assert tail == f.read()
    t_head, head = median_time(lambda: reader_head(zst), max(runs, 5))
    with src.open("rb") as f:
        assert head == f.readline()
    frame = codec.CodecParams().frame_size
    last_full_end = codec.HEAD_FRAME + (logical - codec.HEAD_FRAME) // frame * frame
    t_worst, _ = median_time(lambda: reader_tail(zst, last_full_end), max(runs, 5))
    # What the small head frame costs in stored size (the frame plan without it).
    no_head = work / "big.nohead.zst"
    saved_head = codec.writer.HEAD_FRAME
    codec.writer.HEAD_FRAME = 0
    try:
        zstfs_compress(src, no_head, codec.CodecParams())
    finally:
        codec.writer.HEAD_FRAME = saved_head
    with_head_size, no_head_size = zst.stat().st_size, no_head.stat().st_size
    print("\n### Big file: decode (zstfs defaults file unless noted)\n")
    print("| operation | median s | MB/s | vs whole decode |")
    print("|---|---:|---:|---:|")
    for label, t in (
        ("`decompress_file` → /dev/null", t_dec),
        ("`zstd -d` → /dev/null", t_cli),
        ("`zstd -d` of codex's 1-frame file → /dev/null", t_cli_codex),
        ("ZstReader sequential 128 KiB reads (cold caches)", t_cat),
    ):
        print(f"| {label} | {t:.3f} | {logical / t / MB:.0f} | {t / t_dec:.2f} |")
    print(
        f"| ZstReader last 8 KiB (cold caches, index incl.) | {t_tail:.4f} | - | "
        f"{t_tail / t_dec:.3f} |"
    )
    print(
        f"| ZstReader first line, {len(head)} bytes (cold caches, index incl.) | {t_head:.4f} | "
        f"- | {t_head / t_dec:.3f} |"
    )
    print(
        f"| ZstReader 8 KiB ending at the last full frame's end (worst case) | {t_worst:.4f} "
        f"| - | {t_worst / t_dec:.3f} |"
    )
    print(
        f"\nstored size with the {codec.HEAD_FRAME >> 10} KiB head frame: {with_head_size / MB:.3f}"
        f" MB, without: {no_head_size / MB:.3f} MB "
        f"({(with_head_size / no_head_size - 1) * 100:+.2f} %)"
    )


def bench_small(smalls: list[Path], work: Path, runs: int) -> None:
    d = codec.CodecParams()
    for src in smalls:
        logical = src.stat().st_size
        rows = compress_rows(src, work, runs, [(variant_label(d, default=True), d)])
        print_compress_table(f"Small file {src.name}", logical, rows)
        zst = work / "small.zst"
        zstfs_compress(src, zst, d)
        t_dec, _ = median_time(lambda z=zst: zstfs_decompress(z), runs)
        t_cli, _ = median_time(lambda z=zst: zstd_cli(["-d"], z, Path(os.devnull)), runs)
        print(
            f"\ndecode: `decompress_file` {t_dec * 1000:.2f} ms, `zstd -d` (incl. process start) "
            f"{t_cli * 1000:.2f} ms"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=int, default=150, help="size of the big file in MB")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--inline-data", action="store_true", help="use the inline generator, not gen_rollouts.py"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to put data (temp)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="zstfs-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        big = work / "big.jsonl"
        source = make_rollout(big, args.big_mb * MB, seed=1, inline=args.inline_data)
        smalls = []
        for i, size in enumerate(SMALL_SIZES):
            path = work / f"small{size // 1000}k.jsonl"
            make_rollout(path, size, seed=100 + i, inline=args.inline_data)
            smalls.append(path)
        zstd_version = subprocess.run(["zstd", "-V"], capture_output=True, text=True).stdout
        zstd_version = zstd_version.strip().strip("*").strip()
        print(
            f"data: {source}; generated in {time.perf_counter() - t0:.1f} s; "
            f"medians of {args.runs} runs; {os.cpu_count()} CPUs; "
            f"{zstd_version}; "
            f"python-zstandard {zstandard.__version__}"
        )
        bench_big(big, work, args.runs)
        bench_small(smalls, work, max(args.runs, 5))
        print(f"\ntotal bench time {time.perf_counter() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
