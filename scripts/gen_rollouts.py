#!/usr/bin/env python3
"""Generate realistic Codex CLI rollout files (``rollout-*.jsonl``) for benchmarks.

The data model is codex's own rollout format: the ``RolloutItem`` lines of openai/codex
(``codex-rs/protocol/src/protocol.rs`` and ``models.rs``), as the real CLI writes them in the
codex tests (tests/harness/codex.py describes what codex does to CODEX_HOME); the sizes are
calibrated on stores users have reported (a 732 MB rollout of 170,415 lines: 46 % ``compacted``,
32 % ``function_call_output``, 7 % reasoning):

* line 1 is ``session_meta`` whose ``base_instructions.text`` (7-25 KB) is byte-identical for
  every session of the same *model*; the developer message and the AGENTS.md /
  environment_context user message are byte-identical for every session of the same *repo*;
* each turn is ``task_started`` -> ``turn_context`` -> user message -> ``user_message`` event, then
  a loop of reasoning (incompressible base64 ``encrypted_content``), ``function_call`` /
  ``function_call_output`` (real Python stdlib source, rg hits, ``ls -la``, pytest logs, diffs,
  truncated at 40 KB, sometimes repeating an earlier read) and ``token_count``, and ends with the
  assistant message, ``agent_message``, ``token_count`` and ``task_complete``;
* files over ~5 MB get recurring base64 images and ``compacted`` lines (0.5-3 MB) whose
  ``replacement_history`` re-embeds a slice of earlier history verbatim -- the long-range
  redundancy that ``zstd --long`` finds and a 2 MB window does not;
* now and then a duplicate ``session_meta`` line (metadata update) is appended.

Everything is derived from ``random.Random(seed)``: the same seed gives the same bytes (on the
same Python installation, since tool outputs are cut from the local stdlib sources).

Usage::

    python scripts/gen_rollouts.py OUT_DIR --small 5000 --big 30M,150M,200M --seed 7
    python scripts/gen_rollouts.py --one FILE --size 150M --seed 1
"""

from __future__ import annotations

import argparse
import base64
import bisect
import calendar
import functools
import itertools
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["generate_rollout", "generate_store", "parse_size", "rollout_name"]

KiB = 1024
MiB = 1024 * KiB

# Tool outputs are truncated by the model's policy at ~10 000 tokens (~40 KB).
TOOL_OUTPUT_CAP = 40_000
# Files bigger than this get compactions and images.
BIG_SESSION = 5 * MiB
# replacement_history only draws on this much recent history (bounds memory on huge files).
HISTORY_KEEP = 96 * MiB

SMALL_MEDIAN = 90_000
SMALL_SIGMA = 0.9
SMALL_MIN = 50_000
SMALL_MAX = 2_000_000

ROLLOUT_RE = re.compile(r"rollout-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-[0-9a-f-]{36}\.jsonl")

# (model slug, base_instructions size); sizes are those of the prompts bundled with codex.
_MODELS: list[tuple[str, int]] = [
    ("gpt-5.2-codex", 7_600),
    ("gpt-5.1", 24_200),
    ("gpt-5.2", 21_700),
    ("gpt-5", 20_900),
]
_REPOS = ["zstfs", "webapp", "infra-terraform", "ml-pipeline", "cli-tools", "docs-site"]
_CLI_VERSIONS = ["0.137.0", "0.139.1", "0.142.0", "0.144.2"]

_dumps_str = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(obj: Any) -> bytes:
    return _dumps_str(obj).encode()


# ---------------------------------------------------------------------------------------------
# Shared, seed-independent material (built once per process)


@dataclass
class _Stdlib:
    """Python stdlib sources: the raw material of tool outputs and of the word model."""

    root: str
    files: list[str]  # paths relative to root, sorted
    sizes: list[int]
    dirs: dict[str, list[int]]  # relative dir -> indices into files
    dir_names: list[str]
    _text: dict[int, str] = field(default_factory=dict)

    def text(self, i: int) -> str:
        t = self._text.get(i)
        if t is None:
            try:
                with open(
                    os.path.join(self.root, self.files[i]), encoding="utf-8", errors="replace"
                ) as f:
                    t = f.read()
            except OSError:
                t = ""
            self._text[i] = t
        return t


@functools.cache
def _stdlib() -> _Stdlib:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "idle_test", "lib2to3"}
    files: list[str] = []
    sizes: list[int] = []
    dirs: dict[str, list[int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                size = os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                continue
            if 400 <= size <= 400_000:
                dirs.setdefault(rel, []).append(len(files))
                files.append(os.path.normpath(os.path.join(rel, name)))
                sizes.append(size)
    if not files:
        raise RuntimeError(f"no Python sources under {root!r}")
    return _Stdlib(root, files, sizes, dirs, sorted(dirs))


_WORD_SOURCES = [
    "argparse.py",
    "subprocess.py",
    "typing.py",
    "pathlib.py",
    "logging/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "collections/__init__.py",
    "asyncio/base_events.py",
    "asyncio/tasks.py",
    "unittest/case.py",
    "email/message.py",
    "http/client.py",
    "shutil.py",
    "tarfile.py",
    "zipfile.py",
    "dataclasses.py",
    "functools.py",
    "inspect.py",
    "os.py",
    "socket.py",
    "threading.py",
    "urllib/request.py",
    "tempfile.py",
    "sqlite3/__init__.py",
]
_WORD_RE = re.compile(r"[A-Za-z][a-z]{1,13}")


@dataclass
class _Words:
    vocab: list[str]
    cum: list[float]
    pool: list[str]  # shared sentence pool

    def sentence(self, rng: random.Random) -> str:
        words = rng.choices(self.vocab, cum_weights=self.cum, k=rng.randint(5, 22))
        s = " ".join(words)
        if rng.random() < 0.15:
            s += ", " + " ".join(rng.choices(self.vocab, cum_weights=self.cum, k=rng.randint(3, 9)))
        return s[0].upper() + s[1:] + rng.choice(".....?:")

    def prose(self, rng: random.Random, n: int, shared: float = 0.5) -> str:
        """About ``n`` characters of prose; a ``shared`` fraction of sentences is from the pool."""
        out: list[str] = []
        total = 0
        while total < n:
            s = rng.choice(self.pool) if rng.random() < shared else self.sentence(rng)
            out.append(s)
            total += len(s) + 1
            if rng.random() < 0.12:
                out.append("\n\n")
        return " ".join(out).replace(" \n\n ", "\n\n")[: max(n, 1)]


@functools.cache
def _words() -> _Words:
    lib = _stdlib()
    index = {p: i for i, p in enumerate(lib.files)}
    counts: Counter[str] = Counter()
    sources = [index[p] for p in _WORD_SOURCES if p in index] or list(
        range(min(25, len(lib.files)))
    )
    for i in sources:
        counts.update(w.lower() for w in _WORD_RE.findall(lib.text(i)))
    common = counts.most_common(6000)
    vocab = [w for w, _ in common]
    cum = list(itertools.accumulate(float(c) ** 0.85 for _, c in common))
    words = _Words(vocab, cum, [])
    rng = random.Random("zstfs-gen-prose")
    words.pool = [words.sentence(rng) for _ in range(4000)]
    return words


def _markdown(rng: random.Random, n: int, title: str) -> str:
    """Markdown-ish instructions text of about ``n`` characters."""
    w = _words()
    parts = [f"# {title}\n"]
    total = len(parts[0])
    while total < n:
        r = rng.random()
        if r < 0.15:
            s = "\n## " + w.sentence(rng).rstrip(".?:").title()[:60] + "\n"
        elif r < 0.55:
            s = "".join("- " + w.sentence(rng) + "\n" for _ in range(rng.randint(2, 7)))
        elif r < 0.62:
            s = (
                "```\n"
                + "\n".join(
                    "  ".join(rng.choices(w.vocab[:400], k=rng.randint(2, 6))) for _ in range(4)
                )
                + "\n```\n"
            )
        else:
            s = w.prose(rng, rng.randint(200, 700), shared=0.3) + "\n"
        parts.append(s + "\n")
        total += len(s) + 1
    return "".join(parts)[:n]


@functools.cache
def _base_instructions(model: int) -> str:
    """System prompt for a model number: byte-identical for every session of that model."""
    rng = random.Random(f"zstfs-model-{model}")
    size = _MODELS[model][1] if 0 <= model < len(_MODELS) else rng.randint(12_000, 21_000)
    return _markdown(rng, size, "You are Codex, a coding agent based on GPT-5.")


def _model_slug(model: int) -> str:
    return _MODELS[model % len(_MODELS)][0] if model >= 0 else _MODELS[0][0]


@dataclass(frozen=True)
class _Repo:
    name: str
    cwd: str
    developer: bytes  # response_item payload
    agents: bytes  # response_item payload
    collab: str  # collaboration-mode developer instructions (turn_context)


@functools.cache
def _repo(i: int) -> _Repo:
    rng = random.Random(f"zstfs-repo-{i}")
    name = _REPOS[i % len(_REPOS)] + ("" if i < len(_REPOS) else f"-{i}")
    cwd = f"/home/dev/src/{name}"
    perm_rng = random.Random("zstfs-permissions")  # the permissions block is the same everywhere
    developer = (
        "<permissions instructions>\n"
        + _markdown(perm_rng, 1800, "Filesystem sandboxing")
        + "\n</permissions instructions>\n<collaboration_mode>\n"
        + _markdown(rng, rng.randint(300, 2800), "Collaboration mode: default")
        + "\n</collaboration_mode>"
    )
    agents = (
        f"# AGENTS.md instructions for {cwd}\n\n<INSTRUCTIONS>\n"
        + _markdown(rng, rng.randint(2_000, 6_000), f"{name} contributor guide")
        + "\n</INSTRUCTIONS>"
    )
    env = (
        f"<environment_context>\n  <cwd>{cwd}</cwd>\n"
        "  <approval_policy>on-request</approval_policy>\n"
        "  <sandbox_mode>workspace-write</sandbox_mode>\n"
        "  <network_access>restricted</network_access>\n"
        "  <shell>bash</shell>\n</environment_context>"
    )
    return _Repo(
        name=name,
        cwd=cwd,
        developer=_dumps(_message("developer", [_text_item(developer)])),
        agents=_dumps(_message("user", [_text_item(agents), _text_item(env)])),
        collab=_markdown(rng, rng.randint(600, 1800), "Collaboration Style"),
    )


def _message(role: str, content: list[dict[str, Any]], phase: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "message", "role": role, "content": content}
    if phase is not None:
        msg["phase"] = phase
    return msg


def _text_item(text: str, kind: str = "input_text") -> dict[str, Any]:
    return {"type": kind, "text": text}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _iso(ms: int) -> str:
    s, m = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{m:03d}Z"


def _uuid7(rng: random.Random, ms: int) -> str:
    value = ((ms & (2**48 - 1)) << 80) | (0x7 << 76) | (rng.getrandbits(12) << 64)
    value |= (0b10 << 62) | rng.getrandbits(62)
    return str(uuid.UUID(int=value))


def rollout_name(start_ms: int, session_id: str) -> str:
    """``rollout-YYYY-MM-DDThh-mm-ss-<uuid>.jsonl`` (time taken as UTC)."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(start_ms // 1000))
    return f"rollout-{stamp}-{session_id}.jsonl"


def parse_size(text: str) -> int:
    """``"150M"`` -> 157286400. Suffixes K/M/G (binary, optionally followed by B or iB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size: {text!r}")
    mult = {"": 1, "k": KiB, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}
    return int(float(m.group(1)) * mult[m.group(2).lower()])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_PNG_HEAD = bytes.fromhex("89504e470d0a1a0a0000000d49484452")
_DEFAULT_EPOCH_MS = calendar.timegm((2026, 6, 1, 0, 0, 0)) * 1000


# ---------------------------------------------------------------------------------------------
# One session


@dataclass
class _Spec:
    size: int
    seed: int
    model: int = 0
    repo: int | None = None
    start_ms: int | None = None
    session_id: str | None = None
    parent_id: str | None = None
    cli_version: str | None = None


class _Session:
    """Writes one rollout. Budget-driven: every item is sized against the bytes still wanted."""

    def __init__(self, spec: _Spec) -> None:
        self.rng = rng = random.Random(spec.seed)
        self.size = spec.size
        self.lib = _stdlib()
        self.words = _words()
        self.model = spec.model
        self.repo = _repo(spec.repo if spec.repo is not None else rng.randrange(len(_REPOS)))
        self.now = (
            spec.start_ms
            if spec.start_ms is not None
            else _DEFAULT_EPOCH_MS + rng.randrange(60 * 86_400_000)
        )
        self.start_ms = self.now
        self.id = spec.session_id or _uuid7(rng, self.now)
        self.parent_id = spec.parent_id
        self.cli_version = spec.cli_version or rng.choice(_CLI_VERSIONS)
        # Time runs faster in huge sessions (they are mostly subagents writing flat out).
        self.tscale = min(1.0, 30e6 / max(spec.size, 1))
        self.out: list[bytes] = []
        self.written = 0
        self.big = spec.size > BIG_SESSION
        # History of response_item payloads, for compaction.
        self.hist: list[bytes] = []
        self.hist_end: list[int] = []  # cumulative byte offsets (end of each item)
        self.hist_total = 0
        self.since_compact = 0
        self.next_compact = self._compact_interval()
        # Tokens.
        self.tok_in = self.tok_cached = self.tok_out = self.tok_reason = 0
        self.rate_reset = self.now // 1000 + rng.randint(600, 18_000)
        # Working set of stdlib files this session looks at, and earlier tool outputs.
        n_files = len(self.lib.files)
        self.work = [rng.randrange(n_files) for _ in range(rng.randint(12, 60))]
        self.reads: list[tuple[str, str]] = []  # (command, output) of earlier reads
        self.images: list[str] = []
        if self.big:
            for _ in range(rng.randint(1, 3)):
                self._new_image()
        self.meta = self._meta_payload(git=False)
        self.meta_git: bytes | None = None
        self.turn_id = ""
        self.call_n = 0

    def _new_image(self) -> str:
        """A base64 "screenshot" of 50-300 KB; it recurs for the rest of the session."""
        n = self.rng.randint(37_000, 225_000)
        img = "data:image/png;base64," + _b64(_PNG_HEAD + self.rng.randbytes(n - len(_PNG_HEAD)))
        self.images.append(img)
        return img

    # -- emitting ----------------------------------------------------------------------------

    def emit(self, kind: str, payload: bytes, dt_ms: float) -> None:
        self.now += max(1, int(dt_ms * self.tscale))
        line = b"".join(
            (
                b'{"timestamp":"',
                _iso(self.now).encode(),
                b'","type":"',
                kind.encode(),
                b'","payload":',
                payload,
                b"}\n",
            )
        )
        self.out.append(line)
        self.written += len(line)
        if kind != "compacted":
            self.since_compact += len(line)

    def item(self, payload: bytes, dt_ms: float, keep: bool = True) -> None:
        self.emit("response_item", payload, dt_ms)
        if keep:
            self.hist.append(payload)
            self.hist_total += len(payload) + 1
            self.hist_end.append(self.hist_total)

    def event(self, payload: dict[str, Any], dt_ms: float) -> None:
        self.emit("event_msg", _dumps(payload), dt_ms)

    def left(self) -> int:
        return self.size - self.written

    # -- fixed pieces ------------------------------------------------------------------------

    def _meta_payload(self, git: bool) -> bytes:
        meta: dict[str, Any] = {"id": self.id}
        if self.parent_id:
            meta["parent_thread_id"] = self.parent_id
        meta.update(
            timestamp=_iso(self.start_ms),
            cwd=self.repo.cwd,
            originator="codex_cli_rs",
            cli_version=self.cli_version,
            source=(
                {"subagent": {"thread_spawn": {"parent_thread_id": self.parent_id, "depth": 1}}}
                if self.parent_id
                else "cli"
            ),
            model_provider="openai",
            base_instructions={"text": _base_instructions(self.model)},
        )
        if git:
            meta["git"] = {
                "commit_hash": f"{self.rng.getrandbits(160):040x}",
                "branch": self.rng.choice(
                    ["main", "dev", f"feature/{self.words.vocab[self.rng.randrange(300)]}"]
                ),
                "repository_url": f"git@github.com:example/{self.repo.name}.git",
            }
        return _dumps(meta)

    def turn_context(self) -> None:
        rng = self.rng
        day = time.strftime("%Y-%m-%d", time.gmtime(self.now // 1000))
        ctx = {
            "turn_id": self.turn_id,
            "cwd": self.repo.cwd,
            "workspace_roots": [self.repo.cwd],
            "current_date": day,
            "timezone": "Etc/UTC",
            "approval_policy": "on-request",
            "sandbox_policy": {
                "type": "workspace-write",
                "writable_roots": [self.repo.cwd, "/tmp"],
                "network_access": False,
                "exclude_tmpdir_env_var": False,
                "exclude_slash_tmp": False,
            },
            "model": _model_slug(self.model),
            "personality": "pragmatic",
            "collaboration_mode": {
                "mode": "default",
                "settings": {
                    "model": _model_slug(self.model),
                    "reasoning_effort": "medium",
                    "developer_instructions": self.repo.collab,
                },
            },
            "realtime_active": False,
            "effort": rng.choice(["medium", "medium", "high", "xhigh"]),
            "summary": "auto",
        }
        self.emit("turn_context", _dumps(ctx), rng.uniform(1, 20))

    def token_count(self) -> None:
        rng = self.rng
        last_in = rng.randint(8_000, 200_000)
        last_cached = int(last_in * rng.uniform(0.6, 0.98)) // 256 * 256
        last_out = rng.randint(20, 3_000)
        last_reason = rng.randint(0, last_out)
        self.tok_in += last_in
        self.tok_cached += last_cached
        self.tok_out += last_out
        self.tok_reason += last_reason
        usage = {
            "total_token_usage": {
                "input_tokens": self.tok_in,
                "cached_input_tokens": self.tok_cached,
                "output_tokens": self.tok_out,
                "reasoning_output_tokens": self.tok_reason,
                "total_tokens": self.tok_in + self.tok_out,
            },
            "last_token_usage": {
                "input_tokens": last_in,
                "cached_input_tokens": last_cached,
                "output_tokens": last_out,
                "reasoning_output_tokens": last_reason,
                "total_tokens": last_in + last_out,
            },
            "model_context_window": 258_400,
        }
        pct = min(100.0, (self.tok_in // 40_000) / 10)
        rate = {
            "limit_id": "codex",
            "limit_name": None,
            "primary": {"used_percent": pct, "window_minutes": 300, "resets_at": self.rate_reset},
            "secondary": {
                "used_percent": round(pct / 7, 1),
                "window_minutes": 10_080,
                "resets_at": self.rate_reset + 400_000,
            },
            "credits": {"has_credits": False, "unlimited": False, "balance": None},
            "plan_type": "pro",
        }
        self.event({"type": "token_count", "info": usage, "rate_limits": rate}, rng.uniform(1, 200))

    # -- tool outputs ------------------------------------------------------------------------

    def _chunk(self, fi: int, n: int) -> tuple[str, int, int]:
        """About ``n`` chars of whole lines of stdlib file ``fi``: (text, first, last line no)."""
        t = self.lib.text(fi)
        if len(t) <= n:
            return t, 1, t.count("\n") + 1
        start = self.rng.randrange(len(t) - n)
        start = t.find("\n", start) + 1
        end = t.rfind("\n", start, start + n) + 1
        if end <= start:
            end = start + n
        first = t.count("\n", 0, start) + 1
        return t[start:end], first, first + t.count("\n", start, end) - 1

    def _pick_file(self) -> int:
        rng = self.rng
        n = len(self.lib.files)
        if rng.random() < 0.12:  # the working set drifts as the task moves on
            self.work[rng.randrange(len(self.work))] = rng.randrange(n)
        return rng.choice(self.work) if rng.random() < 0.7 else rng.randrange(n)

    def _path(self, fi: int) -> str:
        return "lib/" + self.lib.files[fi]

    def tool_output(self, cap: int) -> tuple[str, str]:
        """(shell command, output text) of at most ~``cap`` chars."""
        rng = self.rng
        r = rng.random()
        if r < 0.2 and self.reads:
            cmd, out = rng.choice(self.reads)
            if len(out) <= cap:
                return cmd, out
            r = 0.3
        if r < 0.55:
            fi = self._pick_file()
            n = min(cap, int(rng.lognormvariate(math.log(9_000), 0.9)), TOOL_OUTPUT_CAP)
            text, a, b = self._chunk(fi, max(n, 40))
            cmd = (
                f"sed -n '{a},{b}p' {self._path(fi)}"
                if rng.random() < 0.8
                else f"cat {self._path(fi)}"
            )
            out = text
            self.reads.append((cmd, out))
            if len(self.reads) > 400:
                del self.reads[:100]
        elif r < 0.7:
            word = self.words.vocab[rng.randrange(20, 1500)]
            cmd = f"rg -n {word!r} lib" if rng.random() < 0.7 else f"rg -n --hidden {word} ."
            lines: list[str] = []
            total = 0
            limit = min(cap, TOOL_OUTPUT_CAP, int(rng.lognormvariate(math.log(5_000), 1.0)))
            while total < limit:
                fi = self._pick_file()
                t = self.lib.text(fi)
                if not t:
                    total += 1
                    continue
                for _ in range(rng.randint(1, 6)):
                    p = t.find("\n", rng.randrange(len(t))) + 1
                    e = t.find("\n", p)
                    line = t[p : e if e >= 0 else len(t)][:300]
                    s = f"{self._path(fi)}:{rng.randint(1, 3000)}:{line}\n"
                    lines.append(s)
                    total += len(s)
            out = "".join(lines)
        elif r < 0.8:
            d = rng.choice(self.lib.dir_names)
            cmd = f"ls -la lib/{d}" if d != "." else "ls -la lib"
            stamp = time.strftime(
                "%b %d %H:%M", time.gmtime(self.now // 1000 - rng.randint(0, 9_000_000))
            )
            rows = [
                f"total {rng.randint(8, 4000)}",
                f"drwxr-xr-x  {rng.randint(2, 40):2d} dev dev    4096 {stamp} .",
                f"drwxr-xr-x  {rng.randint(2, 40):2d} dev dev    4096 {stamp} ..",
            ]
            for fi in self.lib.dirs[d]:
                rows.append(
                    f"-rw-r--r--   1 dev dev {self.lib.sizes[fi]:7d} {stamp} "
                    f"{os.path.basename(self.lib.files[fi])}"
                )
            out = "\n".join(rows) + "\n"
        elif r < 0.9:
            cmd, out = self._pytest(cap)
        else:
            fi = self._pick_file()
            text, a, b = self._chunk(fi, min(cap, rng.randint(500, 12_000)))
            hunk = []
            for ln in text.splitlines():
                x = rng.random()
                hunk.append(("-" if x < 0.1 else "+" if x < 0.2 else " ") + ln)
            path = self._path(fi)
            cmd = f"git diff -- {path}"
            out = (
                f"diff --git a/{path} b/{path}\n"
                f"index {rng.getrandbits(28):07x}..{rng.getrandbits(28):07x} "
                f"100644\n--- a/{path}\n+++ b/{path}\n@@ -{a},{b - a} +{a},{b - a} @@\n"
                + "\n".join(hunk)
                + "\n"
            )
        if len(out) > min(cap, TOOL_OUTPUT_CAP):
            keep = max(min(cap, TOOL_OUTPUT_CAP) - 40, 0)
            out = out[:keep] + f"\n[... {max(1, (len(out) - keep) // 4)} tokens truncated ...]\n"
        return cmd, out

    def _pytest(self, cap: int) -> tuple[str, str]:
        rng = self.rng
        n_files = rng.randint(1, 12)
        tests = [self.lib.files[self._pick_file()] for _ in range(n_files)]
        rows = [
            "============================= test session starts ==============================",
            "platform linux -- Python 3.11.7, pytest-8.3.4, pluggy-1.5.0",
            f"rootdir: {self.repo.cwd}",
            "configfile: pyproject.toml",
            "plugins: trio-0.8.0, timeout-2.3.1, hypothesis-6.112.0",
            f"collected {rng.randint(n_files, 40 * n_files)} items",
            "",
        ]
        failed: list[str] = []
        for i, t in enumerate(tests):
            marks = "".join(rng.choices(".", k=rng.randint(1, 40)))
            if rng.random() < 0.25:
                marks += "F"
                failed.append(t)
            rows.append(
                f"tests/test_{os.path.basename(t)} {marks:<50} [{100 * (i + 1) // n_files:3d}%]"
            )
        if failed:
            rows += [
                "",
                "=================================== FAILURES ===================================",
            ]
            for t in failed:
                fi = self._pick_file()
                text, a, _ = self._chunk(fi, min(max(cap // (2 * len(failed)), 200), 4_000))
                rows.append(
                    f"___________________ test_{os.path.basename(t)[:-3]} ___________________"
                )
                rows.append("")
                rows += ["    " + ln for ln in text.splitlines()[-25:]]
                rows.append(
                    f"E       AssertionError: assert {rng.randint(0, 99)} == {rng.randint(0, 99)}"
                )
                rows.append(f"\n{self._path(fi)}:{a}: AssertionError")
            rows.append(
                "=========================== short test summary info ============================"
            )
            rows += [
                f"FAILED tests/test_{os.path.basename(t)}::"
                f"test_{self.words.vocab[rng.randrange(800)]}"
                for t in failed
            ]
        rows.append(
            f"==================== {len(failed)} failed, {rng.randint(5, 400)} passed in "
            f"{rng.uniform(0.2, 90):.2f}s ===================="
        )
        cmd = rng.choice(
            [
                "python -m pytest -q",
                "pytest -x tests",
                "python -m pytest tests -q -k " + self.words.vocab[rng.randrange(600)],
            ]
        )
        return cmd, "\n".join(rows) + "\n"

    # -- turn pieces -------------------------------------------------------------------------

    def call_id(self) -> str:
        self.call_n += 1
        return "call_" + _b64(self.rng.randbytes(18)).replace("+", "a").replace("/", "b")

    def reasoning(self, left: int) -> None:
        rng = self.rng
        summary = (
            "**"
            + self.words.sentence(rng)[:60].rstrip(".?:")
            + "**\n\n"
            + self.words.prose(rng, rng.randint(80, 600))
        )
        n = min(rng.randint(600, 3_750), max(48, (left - len(summary) - 300) * 3 // 4))
        payload = _dumps(
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": summary}],
                "content": None,
                "encrypted_content": "gAAAAAB" + _b64(rng.randbytes(n)),
            }
        )
        self.item(payload, rng.uniform(800, 15_000))
        if rng.random() < 0.5:
            self.event({"type": "agent_reasoning", "text": summary}, rng.uniform(1, 20))

    def tool_step(self, left: int) -> None:
        rng = self.rng
        cid = self.call_id()
        if self.images and rng.random() < 0.02 and left > len(self.images[0]) + 4_000:
            img = self.images[0] if rng.random() < 0.5 else rng.choice(self.images)
            args = {"path": f"{self.repo.cwd}/screenshots/{rng.randrange(10)}.png"}
            self.item(
                _dumps(
                    {
                        "type": "function_call",
                        "name": "view_image",
                        "arguments": _dumps_str(args),
                        "call_id": cid,
                    }
                ),
                rng.uniform(1, 50),
            )
            self.item(
                _dumps(
                    {
                        "type": "function_call_output",
                        "call_id": cid,
                        "output": [{"type": "input_image", "image_url": img}],
                    }
                ),
                rng.uniform(20, 500),
            )
            return
        if rng.random() < 0.08:
            fi = self._pick_file()
            text, _, _ = self._chunk(fi, min(max(left // 2 - 600, 40), rng.randint(300, 6_000)))
            lines = text.splitlines()
            patch = (
                f"*** Begin Patch\n*** Update File: {self._path(fi)}\n@@\n"
                + "\n".join(("-" if i % 3 == 0 else "+") + ln for i, ln in enumerate(lines))
                + "\n*** End Patch\n"
            )
            self.item(
                _dumps(
                    {
                        "type": "custom_tool_call",
                        "status": "completed",
                        "call_id": cid,
                        "name": "apply_patch",
                        "input": patch,
                    }
                ),
                rng.uniform(1, 50),
            )
            out = {
                "output": f"Success. Updated the following files:\nM {self._path(fi)}\n",
                "metadata": {"exit_code": 0, "duration_seconds": round(rng.uniform(0, 0.3), 1)},
            }
            self.item(
                _dumps(
                    {"type": "custom_tool_call_output", "call_id": cid, "output": _dumps_str(out)}
                ),
                rng.uniform(5, 300),
            )
            return
        cmd, out = self.tool_output(max(left - 900, 40))
        args = {
            "cmd": cmd,
            "workdir": self.repo.cwd,
            "yield_time_ms": 10_000,
            "max_output_tokens": 10_000,
        }
        self.item(
            _dumps(
                {
                    "type": "function_call",
                    "name": "exec_command",
                    "arguments": _dumps_str(args),
                    "call_id": cid,
                }
            ),
            rng.uniform(1, 50),
        )
        text = (
            f"Chunk ID: {rng.getrandbits(24):06x}\nWall time: {rng.uniform(0, 3):.4f} seconds\n"
            f"Process exited with code {0 if rng.random() < 0.85 else 1}\n"
            f"Original token count: {len(out) // 4}\nOutput:\n{out}"
        )
        self.item(
            _dumps({"type": "function_call_output", "call_id": cid, "output": text}),
            rng.uniform(50, 20_000),
        )

    def compact(self, left: int) -> None:
        rng = self.rng
        # Retained slice of earlier history; anywhere in what we still remember, not just the tail.
        want = min(int(rng.uniform(0.5, 3.0) * MiB), int(self.hist_total * 0.8), left - 64 * KiB)
        if want < 256 * KiB:
            return
        base = self.hist_end[1] if len(self.hist_end) > 1 else 0
        lo = base
        hi = self.hist_total - want
        if hi <= lo:
            start = lo
        else:
            recent = rng.random() < 0.3
            start = (
                int(hi - rng.uniform(0, min(hi - lo, 2 * MiB))) if recent else rng.randint(lo, hi)
            )
        i = bisect.bisect_right(self.hist_end, start)
        j = i
        total = 0
        while j < len(self.hist) and total < want:
            total += len(self.hist[j]) + 1
            j += 1
        items = self.hist[:2] + self.hist[i:j] if i >= 2 else self.hist[:j]
        msg = self.words.prose(rng, rng.randint(1_500, 6_000))
        payload = b"".join(
            (b'{"message":', _dumps(msg), b',"replacement_history":[', b",".join(items), b"]}")
        )
        self.emit("compacted", payload, rng.uniform(5_000, 60_000))
        self.event({"type": "context_compacted"}, rng.uniform(1, 30))
        self.turn_context()
        self.since_compact = 0
        self.next_compact = self._compact_interval()
        self._trim_history()

    def _compact_interval(self) -> int:
        return int(self.rng.uniform(0.8, 2.2) * MiB)

    def _trim_history(self) -> None:
        if self.hist_total - self.hist_end[1] <= HISTORY_KEEP:
            return
        cut = bisect.bisect_right(self.hist_end, self.hist_total - HISTORY_KEEP // 2)
        drop = self.hist_end[cut - 1] - self.hist_end[1]
        del self.hist[2:cut]
        self.hist_end = self.hist_end[:2] + [e - drop for e in self.hist_end[cut:]]
        self.hist_total -= drop

    def dup_meta(self) -> None:
        if self.meta_git is None:
            self.meta_git = self._meta_payload(git=True)
        self.emit("session_meta", self.meta_git, self.rng.uniform(1, 500))

    def turn(self) -> None:
        rng = self.rng
        words = self.words
        self.turn_id = _uuid7(rng, self.now)
        # Small budgets get short messages so that the file lands near its requested size.
        cap = max(self.left() // 16, 120)
        final = words.prose(rng, int(min(rng.lognormvariate(math.log(900), 0.8), 6_000, cap)))
        final_payload = _dumps(
            _message("assistant", [_text_item(final, "output_text")], "final_answer")
        )
        reserve = 3 * len(final_payload) + 1_800
        gap = rng.uniform(5_000, 1_800_000) if self.written > 40_000 else rng.uniform(10, 500)
        self.event(
            {
                "type": "task_started",
                "turn_id": self.turn_id,
                "started_at": self.now // 1000,
                "model_context_window": 258_400,
                "collaboration_mode_kind": "default",
            },
            gap,
        )
        self.turn_context()
        prompt = words.prose(rng, int(min(rng.lognormvariate(math.log(300), 1.0), 8_000, cap)), 0.3)
        content = [_text_item(prompt)]
        images: list[str] = []
        left = self.left() - reserve
        if self.images and rng.random() < 0.12:
            img = self._new_image() if rng.random() < 0.4 else rng.choice(self.images)
            if left > 2 * len(img) + 200 * KiB:
                images.append(img)
                content.append({"type": "input_image", "image_url": img})
        self.item(_dumps(_message("user", content)), rng.uniform(1, 10))
        self.event(
            {
                "type": "user_message",
                "message": prompt,
                "images": images,
                "local_images": [],
                "text_elements": [],
            },
            rng.uniform(1, 10),
        )
        steps = rng.randint(1, 30)
        full_turn = 12 * KiB + 2 * len(final_payload)
        n = 0
        while True:
            left = self.left() - reserve
            if left < 700 or (n >= steps and left > full_turn):
                break
            if self.big and self.since_compact >= self.next_compact and left > 600 * KiB:
                self.compact(left)
                left = self.left() - reserve
            if rng.random() < 0.002 and left > len(self.meta) + 4_000:
                self.dup_meta()
                left = self.left() - reserve
            self.reasoning(left)
            self.tool_step(self.left() - reserve)
            self.token_count()
            n += 1
        self.item(final_payload, rng.uniform(1_000, 20_000))
        self.event(
            {
                "type": "agent_message",
                "message": final,
                "phase": "final_answer",
                "memory_citation": None,
            },
            rng.uniform(1, 20),
        )
        self.token_count()
        self.event(
            {"type": "task_complete", "turn_id": self.turn_id, "last_agent_message": final},
            rng.uniform(1, 50),
        )


def _write_session(path: str | os.PathLike[str], spec: _Spec) -> tuple[int, int]:
    """Write one rollout; returns (bytes written, timestamp in ms of the last line)."""
    s = _Session(spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as f:
        # Generate turn by turn and flush often so huge files do not sit in memory.
        s.emit("session_meta", s.meta, 0)
        s.item(s.repo.developer, s.rng.uniform(1, 5))
        s.item(s.repo.agents, s.rng.uniform(1, 5))
        while True:
            s.turn()
            f.writelines(s.out)
            s.out.clear()
            if s.left() < 6 * KiB:
                break
        written = s.written
    t = s.now / 1000
    os.utime(path, (t, t))
    return written, s.now


# ---------------------------------------------------------------------------------------------
# Public API


def generate_rollout(
    path: str | os.PathLike[str],
    size: int,
    *,
    seed: int,
    model: int = 0,
    repo: int | None = None,
    start_ms: int | None = None,
) -> int:
    """Write one rollout of about ``size`` bytes to ``path``; returns the bytes written.

    ``model`` selects the (byte-identical) base instructions, ``repo`` the shared developer and
    AGENTS.md messages (default: chosen by the seed), ``start_ms`` the first timestamp
    (default: derived from the seed, in June-July 2026). The file's mtime is set to the
    timestamp of its last line. Files smaller than the fixed preamble (~15-40 KB) come out
    at the preamble size.
    """
    written, _ = _write_session(
        path, _Spec(size=size, seed=seed, model=model, repo=repo, start_ms=start_ms)
    )
    return written


def _small_size(rng: random.Random) -> int:
    return int(
        min(max(rng.lognormvariate(math.log(SMALL_MEDIAN), SMALL_SIGMA), SMALL_MIN), SMALL_MAX)
    )


def generate_store(
    root: str | os.PathLike[str],
    *,
    small: int,
    big_sizes: Sequence[int],
    seed: int,
    archived_fraction: float = 0.1,
    now: float | None = None,
    progress: Callable[[Path, int], None] | None = None,
) -> list[Path]:
    """Write a Codex store tree under ``root`` and return the paths written.

    ``small`` rollouts with lognormal sizes (median ~90 KB, clipped to 50 KB-2 MB) plus one
    rollout per entry of ``big_sizes`` go to ``sessions/YYYY/MM/DD/``; about
    ``archived_fraction`` of them go flat into ``archived_sessions/``. Sessions start over the
    ~60 days before ``now`` (default: today's midnight UTC, so a seed gives the same tree all
    day); each file's mtime is its last line's timestamp. About 10 % of the small sessions are
    subagent threads (``parent_thread_id`` set) spawned shortly after an earlier session.
    """
    root = Path(root)
    rng = random.Random(seed)
    if now is None:
        now = (time.time() // 86_400) * 86_400
    now_ms = int(now * 1000)
    day = 86_400_000
    sizes = [_small_size(rng) for _ in range(small)] + list(big_sizes)
    order = list(range(len(sizes)))
    rng.shuffle(order)  # big files land at random points in time
    model_weights = [0.45, 0.2, 0.2, 0.15]
    jobs: list[tuple[Path, _Spec]] = []
    starts: list[tuple[int, str]] = []
    for k in order:
        size = sizes[k]
        spec = _Spec(
            size=size,
            seed=rng.getrandbits(63),
            model=rng.choices(range(len(model_weights)), weights=model_weights)[0],
            repo=min(int(rng.expovariate(0.6)), len(_REPOS) - 1),
        )
        if starts and size <= SMALL_MAX and rng.random() < 0.1:
            parent_start, parent_id = rng.choice(starts)
            spec.parent_id = parent_id
            spec.start_ms = parent_start + rng.randint(1_000, 3_600_000)
        else:
            spec.start_ms = now_ms - rng.randint(int(1.5 * day), 60 * day)
        spec.session_id = _uuid7(rng, spec.start_ms)
        starts.append((spec.start_ms, spec.session_id))
        name = rollout_name(spec.start_ms, spec.session_id)
        if rng.random() < archived_fraction:
            path = root / "archived_sessions" / name
        else:
            path = (
                root
                / "sessions"
                / time.strftime("%Y/%m/%d", time.gmtime(spec.start_ms // 1000))
                / name
            )
        jobs.append((path, spec))
    out: list[Path] = []
    for path, spec in jobs:
        written, _ = _write_session(path, spec)
        out.append(path)
        if progress is not None:
            progress(path, written)
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out_dir", nargs="?", type=Path, help="store root to create (CODEX_HOME-like)")
    ap.add_argument("--small", type=int, default=0, help="number of small rollouts (50 KB-2 MB)")
    ap.add_argument(
        "--big", default="", help="comma-separated sizes of big rollouts, e.g. 30M,150M"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--archived-fraction", type=float, default=0.1)
    ap.add_argument("--one", type=Path, metavar="FILE", help="write a single rollout to FILE")
    ap.add_argument("--size", default="1M", help="size of the --one rollout (K/M/G suffixes)")
    ap.add_argument("--model", type=int, default=0, help="model number for --one")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if args.one is not None:
        if args.out_dir is not None:
            ap.error("give either OUT_DIR or --one FILE")
        total = generate_rollout(args.one, parse_size(args.size), seed=args.seed, model=args.model)
        count = 1
    else:
        if args.out_dir is None:
            ap.error("OUT_DIR or --one FILE is required")
        big = [parse_size(s) for s in args.big.split(",") if s.strip()]
        total = 0

        def progress(path: Path, n: int) -> None:
            nonlocal total
            total += n
            if not args.quiet and n > 20 * MiB:
                print(f"{path}: {n / 1e6:.1f} MB", file=sys.stderr)

        count = len(
            generate_store(
                args.out_dir,
                small=args.small,
                big_sizes=big,
                seed=args.seed,
                archived_fraction=args.archived_fraction,
                progress=progress,
            )
        )
    dt = time.perf_counter() - t0
    if not args.quiet:
        print(
            f"{count} file(s), {total / 1e6:.1f} MB in {dt:.2f} s ({total / 1e6 / dt:.0f} MB/s)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
