"""Run the real Codex CLI offline against a mock Responses API.

Install with scripts/install-codex.sh (npm prefix $ZSTFS_CODEX_DIR, default
<repo>/.cache/codex-npm). The native binary is
node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex
(a 280 MiB static-pie musl binary; the arch package is hoisted, not nested,
with npm 11, and is an npm alias of @openai/codex@0.169.0-linux-x64).

Findings for codex-cli 0.169.0, checked by hand with strace while writing this:

Commands (all need CODEX_HOME and MOCK_API_KEY in the environment):
  codex exec --skip-git-repo-check "PROMPT"
  codex exec --skip-git-repo-check resume --last "PROMPT"   (or: resume SESSION_ID "PROMPT")
  codex archive SESSION_ID        top-level subcommands, not under `sessions`
  codex unarchive SESSION_ID
  codex delete --force SESSION_ID
- `codex delete` without --force refuses when there is no TTY ("cannot confirm
  session deletion without an interactive terminal"), rc=1. --force needs a UUID.
- `resume --last` only considers sessions whose cwd is the current directory
  (`--all` turns that off), so the resume must run from the same cwd as exec.
- `exec` reads stdin when it is not a terminal ("Reading additional input from
  stdin..."): an inherited stdin can hang it. run_codex always feeds "" (EOF).
- No sandbox or approval flag is needed for a turn with no tool calls. The config
  sets approval_policy="never" and sandbox_mode="read-only" anyway. Codex warns
  that bubblewrap is not on PATH and uses a bundled copy. It also warns that
  the model metadata for "mock-model" is unknown. Both warnings are harmless.
- With HOME/CODEX_HOME under /tmp it prints "Refusing to create helper binaries
  under temporary dir" (harmless). stdout holds only the final agent message;
  the banner, including "session id: <uuid>", goes to stderr.
- If the provider is unreachable (connection refused), codex does NOT fail even
  though request_max_retries = stream_max_retries = 0. It loops on "Reconnecting...
  waiting for network" forever, so every run needs a timeout. run_codex
  kills the whole process group.
- A turn takes about 0.25 s. The mock gets exactly one POST /v1/responses per turn
  and no other request (no /models). The resumed request contains the earlier user prompt
  and assistant reply in `input`.

What codex does to CODEX_HOME (first run of exec):
- It creates config-independent state: installation_id (flock SH, then EX),
  .sandbox_migration, skills/.system/** (about 40 files rewritten with O_TRUNC on
  every run), shell_snapshots/ (temp .tmp-N files renamed to <id>.<n>.sh and
  removed at exit), .tmp/plugins.sync.lock (flock EX, blocking) and a
  .tmp/plugins-clone-XXXX dir that is created and then removed.
- SIX SQLite DBs in WAL mode: state_5, logs_2, goals_1, memories_1, queue_1,
  thread_history_1 (.sqlite, -wal, -shm). They use fcntl F_SETLK byte-range locks,
  mmap(MAP_SHARED, PROT_READ|PROT_WRITE) of the -shm files, many fsyncs, and a
  -journal that is created and unlinked during setup. At exit the last connection
  checkpoints and unlinks -wal/-shm.
- thread-writer-locks/.coordination.lock and thread-writer-locks/<id>.lock get
  flock(LOCK_EX|LOCK_NB). The per-thread lock file is unlinked at exit.
- history.jsonl and session_index.jsonl are NOT created by exec/resume/archive.
- Rollout create: open(O_RDWR|O_CREAT|O_APPEND, 0666), then futimens(atime=OMIT,
  mtime=now) right away, then appends. The rollout is never fsynced. Line 1 is
  session_meta (`ordinal` field present; payload.id == payload.session_id == the
  uuid in the file name). New record types: world_state, token_usage_record.
  The file is about 35 KB after one turn (a developer message with the skills text).
- Resume (plain): stat plain then .zst, then readlink on every path component
  (canonicalize), several full O_RDONLY reads, then open(O_RDWR|O_APPEND) without
  O_CREAT. Resume only appends: the old bytes stay an exact prefix.
- Resume of a .zst-only rollout: it decodes a single-frame zstd file and also a
  multi-frame seekable one (seek table skippable frame) correctly. Materialize goes:
  open(sessions/Y/M/D/.rollout-materialize-XXXXXX, O_CREAT|O_EXCL, 0600) (a dot-file
  in the same dir, not `<name>.decompress.<pid>.<n>.tmp` as in the 2026-06 snapshot),
  fchmod to the .zst mode, futimens(mtime = .zst mtime), write, fsync,
  linkat(temp, R.jsonl) (a HARD LINK: the FUSE fs must implement link() or hit the
  fallback), unlink(temp), unlink(R.jsonl.zst), then open(O_RDWR|O_APPEND) and append.
- archive: rename(sessions/Y/M/D/R.jsonl, archived_sessions/R.jsonl) (cross-dir).
- unarchive: rename back, then open(O_WRONLY|O_APPEND) + futimens(mtime=now) with
  no write. The bytes stay identical; only the mtime changes.
- delete --force: unlink(R.jsonl), then unlink(R.jsonl.zst) (ENOENT tolerated). Deleting a
  .zst-only rollout works too.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CODEX_DIR = REPO_ROOT / ".cache" / "codex-npm"
CODEX_VERSION = "0.169.0"

# ---------------------------------------------------------------------------
# Locating the binary


def codex_dir() -> Path:
    """The npm prefix scripts/install-codex.sh installs into."""
    env = os.environ.get("ZSTFS_CODEX_DIR")
    return Path(env) if env else DEFAULT_CODEX_DIR


def find_codex() -> Path | None:
    """Path of the native codex binary installed by scripts/install-codex.sh, or None."""
    nm = codex_dir() / "node_modules" / "@openai"
    patterns = (
        "codex-linux-*/vendor/*/bin/codex",
        "codex/node_modules/@openai/codex-linux-*/vendor/*/bin/codex",
        "codex/vendor/*/bin/codex",
        "codex/vendor/*/codex/codex",
    )
    for pattern in patterns:
        for candidate in sorted(nm.glob(pattern)):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


# ---------------------------------------------------------------------------
# Mock Responses API


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _item_texts(item: Any) -> list[str]:
    out: list[str] = []
    if not isinstance(item, dict):
        return out
    content = item.get("content")
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def last_user_text(body: Any) -> str:
    """Text of the last user message in a Responses API request body."""
    if not isinstance(body, dict):
        return ""
    items = body.get("input")
    if isinstance(items, str):
        return items
    if not isinstance(items, list):
        return ""
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            return "\n".join(_item_texts(item))
    return ""


def default_reply(prompt: str) -> str:
    """The mock's deterministic answer to a prompt (its last user message text)."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    return f"MOCK-REPLY-{digest}"


def _is_responses_path(path: str) -> bool:
    return path.split("?")[0].rstrip("/").endswith("/responses")


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class MockResponsesServer:
    """A stdlib HTTP server on 127.0.0.1 that answers POST /v1/responses with SSE.

    Every POST to a path ending in /responses gets a complete, deterministic
    stream: response.created, response.output_item.done (one assistant message
    whose output_text is ``reply(last user text)``), response.completed with
    usage. Everything else gets a 404 JSON error. All requests are recorded.
    """

    reply: Callable[[str], str] = default_reply
    requests: list[RecordedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: http.server.ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _counter: int = 0

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def response_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and _is_responses_path(r.path)]

    def _next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def start(self) -> MockResponsesServer:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _read_body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    return self.rfile.read(length)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return b""

            def _handle(self) -> None:
                body = self._read_body()
                req = RecordedRequest(self.command, self.path, dict(self.headers.items()), body)
                server._record(req)
                if self.command == "POST" and _is_responses_path(self.path):
                    self._stream(req)
                else:
                    error = {"error": {"message": f"mock: no route {self.path}"}}
                    payload = json.dumps(error).encode()
                    self.send_response(404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def _stream(self, req: RecordedRequest) -> None:
                n = server._next_id()
                try:
                    parsed = req.json()
                except ValueError:
                    parsed = None
                text = server.reply(last_user_text(parsed))
                resp_id, msg_id = f"resp_mock_{n}", f"msg_mock_{n}"
                item = {
                    "type": "message",
                    "role": "assistant",
                    "id": msg_id,
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
                usage = {
                    "input_tokens": 10,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 5,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 15,
                }
                payload = b"".join(
                    [
                        _sse(
                            "response.created",
                            {
                                "type": "response.created",
                                "response": {"id": resp_id, "status": "in_progress"},
                            },
                        ),
                        _sse(
                            "response.output_item.done",
                            {"type": "response.output_item.done", "output_index": 0, "item": item},
                        ),
                        _sse(
                            "response.completed",
                            {
                                "type": "response.completed",
                                "response": {
                                    "id": resp_id,
                                    "status": "completed",
                                    "output": [item],
                                    "usage": usage,
                                },
                            },
                        ),
                    ]
                )
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()

            do_POST = _handle
            do_GET = _handle
            do_PUT = _handle
            do_DELETE = _handle

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="mock-responses",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MockResponsesServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# CODEX_HOME setup and running codex


def write_config(codex_home: Path, base_url: str, *, extra: str = "") -> Path:
    """Write CODEX_HOME/config.toml pointing codex at the mock provider."""
    codex_home.mkdir(parents=True, exist_ok=True)
    text = f"""\
model = "mock-model"
model_provider = "mock"
approval_policy = "never"
sandbox_mode = "read-only"

[model_providers.mock]
name = "mock"
base_url = "{base_url}"
wire_api = "responses"
env_key = "MOCK_API_KEY"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 20000
"""
    if extra:
        text += "\n" + extra.strip() + "\n"
    path = codex_home / "config.toml"
    path.write_text(text)
    return path


def codex_env(codex_home: Path, home: Path) -> dict[str, str]:
    """A minimal, clean environment for codex."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "MOCK_API_KEY": "x",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
    }
    return env


def run_codex(
    codex_home: Path,
    args: Sequence[str],
    *,
    cwd: Path,
    timeout: float = 60,
    home: Path | None = None,
    codex: Path | None = None,
    input: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``codex ARGS`` with a clean environment and a hard timeout.

    HOME defaults to ``cwd.parent / "home"`` (created), so codex never sees the
    real ~/.codex. Raises AssertionError with the output if check and rc != 0.
    """
    binary = codex or find_codex()
    if binary is None:
        raise RuntimeError("codex CLI not installed: run scripts/install-codex.sh")
    if home is None:
        home = Path(cwd).parent / "home"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary), *args]
    # Own session so a timeout kills codex and anything it spawned (bwrap, helpers).
    popen = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=codex_env(codex_home, home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = popen.communicate(input if input is not None else "", timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(popen)
        stdout, stderr = popen.communicate()
        raise AssertionError(
            f"codex {' '.join(args)} timed out after {timeout}s (killed)\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr}"
        ) from None
    except BaseException:
        _kill_group(popen)
        popen.communicate()
        raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"codex {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def _kill_group(popen: subprocess.Popen[str]) -> None:
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    popen.kill()


# ---------------------------------------------------------------------------
# Rollout helpers

_UUID_RE = re.compile(
    r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.jsonl(?:\.zst)?$"
)


def session_id_from_rollout(path: Path) -> str:
    """The thread id: the uuid at the end of the file name, else session_meta.payload.id."""
    m = _UUID_RE.search(Path(path).name)
    if m:
        return m.group(1)
    with open(path, "rb") as f:
        first = f.readline()
    meta = json.loads(first)
    assert meta.get("type") == "session_meta", meta.get("type")
    return meta["payload"]["id"]


def rollouts(codex_home: Path) -> list[Path]:
    """All rollout files (plain and .zst) under sessions/ and archived_sessions/, sorted."""
    home = Path(codex_home)
    found: list[Path] = []
    sessions = home / "sessions"
    if sessions.is_dir():
        found += [p for p in sessions.rglob("rollout-*.jsonl*") if _is_rollout_name(p.name)]
    archived = home / "archived_sessions"
    if archived.is_dir():
        found += [p for p in archived.glob("rollout-*") if _is_rollout_name(p.name)]
    return sorted(found)


def _is_rollout_name(name: str) -> bool:
    return name.startswith("rollout-") and (name.endswith(".jsonl") or name.endswith(".jsonl.zst"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a plain rollout; every non-empty line must be a JSON object."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def iter_texts(records: Sequence[dict[str, Any]]) -> Iterator[str]:
    """Every message text in rollout records (response_item messages and event_msg messages)."""
    for rec in records:
        payload = rec.get("payload")
        if not isinstance(payload, dict):
            continue
        if rec.get("type") == "response_item":
            yield from _item_texts(payload)
        elif rec.get("type") == "event_msg" and isinstance(payload.get("message"), str):
            yield payload["message"]


def zstd_cli() -> str | None:
    return shutil.which("zstd")


# ---------------------------------------------------------------------------
# Compressing a rollout from outside codex

SEEKABLE_MAGIC = 0x8F92EAB1
SKIPPABLE_SEEK_TABLE_MAGIC = 0x184D2A5E


def seekable_zst_bytes(data: bytes, *, frame_size: int = 8192, level: int = 3) -> bytes:
    """Encode data in the zstd seekable format: independent frames + a seek table.

    Each frame holds at most frame_size bytes of input and records its content
    size; the trailing skippable frame is the seek table (no checksums) as in
    contrib/seekable_format/zstd_seekable_compression_format.md.
    """
    import struct

    import zstandard

    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    frames: list[bytes] = []
    entries: list[tuple[int, int]] = []
    for off in range(0, len(data), frame_size) if data else [0]:
        chunk = data[off : off + frame_size]
        frame = cctx.compress(chunk)
        frames.append(frame)
        entries.append((len(frame), len(chunk)))
    table = b"".join(struct.pack("<II", c, d) for c, d in entries)
    footer = struct.pack("<IBI", len(entries), 0, SEEKABLE_MAGIC)
    body = table + footer
    seek_table = struct.pack("<II", SKIPPABLE_SEEK_TABLE_MAGIC, len(body)) + body
    return b"".join(frames) + seek_table


def compress_rollout(path: Path, *, method: str = "seekable") -> Path:
    """Replace plain rollout `path` by `path.zst` the way an external compressor would.

    method "seekable": multi-frame seekable zstd written with python-zstandard;
    method "zstd-cli": `zstd -q --rm` (one frame). The .zst gets the plain
    file's mtime and permission bits; the plain file is removed.
    """
    path = Path(path)
    st = path.stat()
    dst = path.with_name(path.name + ".zst")
    if method == "zstd-cli":
        exe = zstd_cli()
        if exe is None:
            raise RuntimeError("zstd CLI not found")
        subprocess.run([exe, "-q", "-3", "--rm", str(path)], check=True, timeout=30)
    elif method == "seekable":
        tmp = path.with_name(path.name + ".zst.compress.tmp")
        tmp.write_bytes(seekable_zst_bytes(path.read_bytes()))
        os.chmod(tmp, st.st_mode & 0o7777)
        os.rename(tmp, dst)
        path.unlink()
    else:
        raise ValueError(method)
    os.chmod(dst, st.st_mode & 0o7777)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return dst


def decompress_zst(path: Path) -> bytes:
    """Decode every frame of a .zst file (skippable frames ignored)."""
    import io

    import zstandard

    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        reader = dctx.stream_reader(f, read_across_frames=True)
        out = io.BytesIO()
        while chunk := reader.read(1 << 16):
            out.write(chunk)
    return out.getvalue()


# ---------------------------------------------------------------------------
# Interactive codex and its background app-server
#
# Interactive `codex PROMPT` (the TUI) runs offline in a pseudo-terminal: it asks for the cursor
# position (ESC[6n, answered here), submits the prompt, appends it to CODEX_HOME/history.jsonl
# (exec never writes history), and starts codex's background app-server: it installs itself
# into CODEX_HOME/packages/app-server-daemon and runs `codex app-server --listen unix://
# --analytics-default-enabled --managed-daemon` (holding the SQLite databases, -wal and -shm
# open) plus `codex app-server daemon pid-update-loop`, both from CODEX_HOME/packages, both
# outliving the TUI. `codex app-server daemon start` starts the same pair without a TUI;
# `codex app-server daemon stop` SIGTERMs the app-server and leaves the pid-update-loop running
# (SIGTERM stops that one). The TUI sets the terminal title state with OSC 7501
# (`state=done:app=codex` once a turn is over).

TUI_DONE = b"\x1b]7501;state=done:app=codex"


def run_codex_tui(
    codex_home: Path,
    prompt: str,
    *,
    cwd: Path,
    home: Path,
    api: MockResponsesServer,
    codex: Path | None = None,
    timeout: float = 60,
) -> bytes:
    """Run interactive ``codex PROMPT`` in a pseudo-terminal until its turn is done (one more
    request to the mock, then the TUI's "done" state), quit it with Ctrl-C and return what it
    drew. Kills it and fails on timeout."""
    import pty
    import select
    import time

    binary = codex or find_codex()
    if binary is None:
        raise RuntimeError("codex CLI not installed: run scripts/install-codex.sh")
    env = {**codex_env(codex_home, home), "TERM": "xterm-256color"}
    before = len(api.response_requests())
    pid, fd = pty.fork()
    if pid == 0:  # the child: codex in the pty (its own session)
        try:
            os.chdir(cwd)
            os.execve(str(binary), [str(binary), prompt], env)
        finally:
            os._exit(127)
    out = b""
    deadline = time.monotonic() + timeout
    quit_sent = 0.0
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"interactive codex timed out after {timeout}s:\n"
                                     f"{out[-3000:]!r}")
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    break
                out += data
                if b"\x1b[6n" in data:
                    os.write(fd, b"\x1b[1;1R")
            done = len(api.response_requests()) > before and TUI_DONE in out
            if done and now - quit_sent > 1.0:
                os.write(fd, b"\x03")  # Ctrl-C: the first one asks, the second one quits
                quit_sent = now
        _wait_pid(pid, deadline)
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        os.close(fd)
    assert len(api.response_requests()) > before, out[-3000:]
    return out


def _wait_pid(pid: int, deadline: float) -> None:
    import time

    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    raise AssertionError(f"codex (pid {pid}) did not exit")


def codex_daemons(codex_home: Path) -> dict[str, int]:
    """The live background processes running from CODEX_HOME/packages: {"app-server": pid,
    "pid-update-loop": pid} (either may be missing)."""
    prefix = os.fsencode(os.path.realpath(codex_home)) + b"/packages/"
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv[0].startswith(prefix):  # a zombie's cmdline is empty
            continue
        if b"--managed-daemon" in argv:
            found["app-server"] = int(entry)
        elif b"pid-update-loop" in argv:
            found["pid-update-loop"] = int(entry)
    return found


def kill_codex_daemons(codex_home: Path, timeout: float = 10) -> None:
    """SIGKILL codex's background processes of this CODEX_HOME and wait until they are gone."""
    import time

    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    while (pids := codex_daemons(codex_home)) or not all(map(process_gone, killed)):
        for pid in pids.values():
            killed.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"codex's background processes survive SIGKILL: {pids}")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """True once every thread of `pid` has exited (a zombie holds no files; a zombie leader
    whose other threads still run does)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X"):
                    return False
        except OSError:
            continue
    return True
