"""Tests for scripts/gen_rollouts.py, the benchmark rollout generator."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import gen_rollouts
import pytest

NAME_RE = re.compile(r"rollout-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-[0-9a-f-]{36}\.jsonl")
TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


def read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def check_rollout(path: Path) -> list[dict]:
    lines = read_lines(path)
    assert lines[0]["type"] == "session_meta"
    meta = lines[0]["payload"]
    for key in ("id", "timestamp", "cwd", "originator", "cli_version", "source", "model_provider"):
        assert key in meta
    assert 7_000 <= len(meta["base_instructions"]["text"]) <= 25_000
    stamps = [line["timestamp"] for line in lines]
    assert all(TS_RE.fullmatch(t) for t in stamps)
    assert all(a < b for a, b in itertools.pairwise(stamps)), "timestamps must increase"
    for line in lines:
        assert list(line) == ["timestamp", "type", "payload"]
    assert any(
        line["type"] == "event_msg" and line["payload"]["type"] == "user_message" for line in lines
    )
    return lines


@pytest.mark.parametrize(
    ("size", "seed", "model"),
    [(50_000, 1, 0), (60_000, 2, 1), (300_000, 3, 2), (1_500_000, 4, 3), (7_000_000, 5, 0)],
)
def test_rollout_valid_and_sized(tmp_path: Path, size: int, seed: int, model: int) -> None:
    path = tmp_path / "r.jsonl"
    written = gen_rollouts.generate_rollout(path, size, seed=seed, model=model)
    assert written == path.stat().st_size
    assert abs(written - size) <= 0.1 * size
    lines = check_rollout(path)
    kinds = {(ln["type"], ln["payload"].get("type")) for ln in lines}
    for kind in [
        ("response_item", "message"),
        ("response_item", "reasoning"),
        ("event_msg", "task_started"),
        ("event_msg", "token_count"),
        ("event_msg", "task_complete"),
        ("turn_context", None),
    ]:
        assert kind in kinds
    if size > gen_rollouts.BIG_SESSION:
        assert ("compacted", None) in kinds
        assert ("event_msg", "context_compacted") in kinds
    # mtime = timestamp of the last line
    last = lines[-1]["timestamp"]
    assert gen_rollouts._iso(round(path.stat().st_mtime * 1000)) == last


def test_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    gen_rollouts.generate_rollout(a, 400_000, seed=11)
    gen_rollouts.generate_rollout(b, 400_000, seed=11)
    gen_rollouts.generate_rollout(c, 400_000, seed=12)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_base_instructions_shared_per_model(tmp_path: Path) -> None:
    texts = {}
    for seed, model in [(1, 0), (2, 0), (3, 1)]:
        path = tmp_path / f"{seed}.jsonl"
        gen_rollouts.generate_rollout(path, 60_000, seed=seed, model=model)
        first = json.loads(path.read_bytes().split(b"\n", 1)[0])
        texts[seed] = first["payload"]["base_instructions"]["text"]
    assert texts[1] == texts[2]
    assert texts[1] != texts[3]


def test_parse_size() -> None:
    assert gen_rollouts.parse_size("150M") == 150 * 1024 * 1024
    assert gen_rollouts.parse_size("64k") == 64 * 1024
    assert gen_rollouts.parse_size("1.5G") == 3 * 512 * 1024 * 1024
    assert gen_rollouts.parse_size("1234") == 1234
    with pytest.raises(ValueError, match="bad size"):
        gen_rollouts.parse_size("12X")


def test_store_layout(tmp_path: Path) -> None:
    root = tmp_path / "codex"
    paths = gen_rollouts.generate_store(
        root, small=30, big_sizes=[3_000_000], seed=7, archived_fraction=0.3, now=1_790_000_000
    )
    assert len(paths) == 31
    assert sorted(paths) == sorted(root.rglob("*.jsonl"))
    archived = 0
    for path in paths:
        rel = path.relative_to(root)
        assert NAME_RE.fullmatch(path.name), path.name
        if rel.parts[0] == "archived_sessions":
            assert len(rel.parts) == 2
            archived += 1
        else:
            assert rel.parts[0] == "sessions"
            assert len(rel.parts) == 5
            # sessions/YYYY/MM/DD matches the date in the file name
            assert "-".join(rel.parts[1:4]) == path.name[8:18]
        meta = json.loads(path.read_bytes().split(b"\n", 1)[0])["payload"]
        assert meta["id"] == path.name[-42:-6]
        assert path.stat().st_mtime <= 1_790_000_000
        assert path.stat().st_mtime >= 1_790_000_000 - 61 * 86_400
    assert 0 < archived < len(paths)
    sizes = sorted(p.stat().st_size for p in paths)
    assert sizes[-1] > 2_500_000
    assert all(45_000 <= s <= 2_200_000 for s in sizes[:-1])
    for path in paths[:5]:
        check_rollout(path)


def test_store_deterministic(tmp_path: Path) -> None:
    def listing(root: Path) -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(root)), os.stat(p).st_size) for p in root.rglob("*.jsonl"))

    gen_rollouts.generate_store(tmp_path / "a", small=8, big_sizes=[], seed=3, now=1_790_000_000)
    gen_rollouts.generate_store(tmp_path / "b", small=8, big_sizes=[], seed=3, now=1_790_000_000)
    assert listing(tmp_path / "a") == listing(tmp_path / "b")


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "one.jsonl"
    assert gen_rollouts.main(["--one", str(out), "--size", "100K", "--seed", "1", "-q"]) == 0
    assert abs(out.stat().st_size - 100 * 1024) <= 10 * 1024
    assert gen_rollouts.main([str(tmp_path / "store"), "--small", "3", "--big", "1M", "-q"]) == 0
    assert len(list((tmp_path / "store").rglob("rollout-*.jsonl"))) == 4
