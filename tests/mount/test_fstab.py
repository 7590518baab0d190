"""The mount as users run it: an /etc/fstab line through mount.fuse3, and the systemd user unit.

- `-o` option lists (what mount.fuse3 hands over) map onto the mount's options: generic mount(8)
  flags are ignored, zstfs keys are parsed, unknown keys are refused naming the option (exit 2).
- A real mount through fuse3's helper, started exactly as mount(8) starts it for a `fuse.zstfs`
  fstab line, is live when the helper returns, carries the options, and shows as `fuse.zstfs`.
- `contrib/zstfs-codex.service` passes `systemd-analyze verify`, and its ExecStart/ExecStop,
  run with a NOTIFY_SOCKET as systemd would, report READY=1 only once the mount answers and
  STOPPING=1 when it unmounts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness.codex import codex_daemons, find_codex, kill_codex_daemons, process_gone, run_codex
from harness.mount import STATUS_XATTR, fuse_available, is_mounted, lazy_unmount, wait_until

from zstfs.cli import GENERIC_MOUNT_OPTIONS, UsageError, apply_o_options, fstab_argv
from zstfs.names import DEFAULT_PATTERNS
from zstfs.options import MountOptions, parse_duration

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "zstfs-codex.service"
FSTAB_EXAMPLE = REPO / "contrib" / "fstab.example"
#: The venv's console script: what `zstfs` must resolve to for mount.fuse3's `sh -c`.
BIN_DIR = os.path.dirname(sys.executable)
ZSTFS = os.path.join(BIN_DIR, "zstfs")
MOUNT_FUSE3 = shutil.which("mount.fuse3") or next(
    (p for p in ("/sbin/mount.fuse3", "/usr/sbin/mount.fuse3") if os.path.exists(p)), None)

needs_fuse = pytest.mark.skipif(fuse_available() is not None,
                                reason=f"FUSE unavailable: {fuse_available()}")


def opts(*lists: str) -> MountOptions:
    o = MountOptions(source="/s", mountpoint="/m")
    apply_o_options(o, list(lists))
    return o


# ---------------------------------------------------------------------- -o parsing
def test_fstab_form_becomes_mount() -> None:
    assert fstab_argv(["/s", "/m", "-o", "rw,compress_after=7d"]) == [
        "mount", "/s", "/m", "-o", "rw,compress_after=7d"]
    # Subcommands and options are left alone.
    assert fstab_argv(["status", "/m"]) == ["status", "/m"]
    assert fstab_argv(["umount", "/m"]) == ["umount", "/m"]
    assert fstab_argv(["--version"]) == ["--version"]
    assert fstab_argv([]) == []


def test_generic_mount_options_are_ignored() -> None:
    # What mount(8) and mount.fuse3 actually pass (seen with strace: "rw,...,dev,suid"), plus
    # the usual fstab flags and x-* options meant for other programs.
    generic = ["rw", "dev", "suid", "noauto", "user", "users", "nofail", "_netdev", "noatime",
               "defaults", "x-systemd.automount", "x-systemd.requires-mounts-for=/home/u",
               "x-gvfs-show"]
    assert set(generic) - {"x-systemd.requires-mounts-for=/home/u", "x-gvfs-show"} <= (
        GENERIC_MOUNT_OPTIONS)
    assert opts(",".join(generic)) == MountOptions(source="/s", mountpoint="/m")


def test_zstfs_option_values_are_parsed() -> None:
    o = opts("noauto,user,compress_after=7d,pattern=*.log,level=5",
             "jobs=2,log=/tmp/z.log,fsname=codex,allow_other,allow_root,debug,foreground")
    assert o.compress_after == 7 * 86400
    assert (o.patterns, o.level, o.jobs, o.log_file, o.fsname) == (
        ("*.log",), 5, 2, "/tmp/z.log", "codex")
    assert (o.allow_other, o.allow_root, o.debug, o.foreground) == (True, True, True, True)
    assert opts("").patterns == DEFAULT_PATTERNS  # codex's rollouts
    # pattern= repeats (a comma cannot be inside one); the first replaces the default.
    assert opts("pattern=*.log,pattern=data/**/*.csv").patterns == ("*.log", "data/**/*.csv")
    assert (opts("").force, opts("force").force) == (False, True)
    assert opts("compress_after=90m").compress_after == 5400
    assert opts("compress-after=0").compress_after == 0  # dashes work like in the long options
    assert opts("").compress_after is None  # nothing given: never compress in the background


def test_durations_need_a_unit_except_zero() -> None:
    assert [parse_duration(t) for t in ("7d", "12h", "30m", "45s", "2w", "1.5h", " 90M ")] == [
        7 * 86400, 12 * 3600, 1800, 45, 14 * 86400, 5400, 5400]
    assert [parse_duration(t) for t in ("0", "0.0", "0s", "0d")] == [0, 0, 0, 0]
    for text in ("7", "1.5", "12 ", "90"):
        with pytest.raises(ValueError, match="give a unit") as e:
            parse_duration(text)
        assert str(e.value) == (f"invalid duration {text!r}: give a unit "
                                "(7d, 12h, 30m, 45s; s m h d w), or 0")
    for text in ("soon", "7x", "-1d", "d", ""):
        with pytest.raises(ValueError, match="give a number and a unit"):
            parse_duration(text)


@pytest.mark.parametrize(("item", "why"), [
    ("bogus", "unknown mount option 'bogus'"),
    ("bogus=1", "unknown mount option 'bogus=1'"),
    ("compress_after", "unknown mount option 'compress_after'"),  # a value is required
    ("allow_other=yes", "unknown mount option 'allow_other=yes'"),  # a flag takes none
    ("compress_after=soon", "mount option 'compress_after=soon': invalid duration"),
    ("compress_after=7", "mount option 'compress_after=7': invalid duration '7': give a unit "
                         "(7d, 12h, 30m, 45s; s m h d w), or 0"),
    ("level=0", "mount option 'level=0': level must be between 1 and 19"),
    ("jobs=0", "mount option 'jobs=0': jobs must be at least 1"),
])
def test_bad_options_are_refused(item: str, why: str) -> None:
    with pytest.raises(UsageError) as e:
        opts(f"rw,noauto,{item},compress_after=1h")
    assert why in str(e.value)


def test_cli_refuses_unknown_option_with_status_2(tmp_path: Path) -> None:
    """The way mount.fuse3 runs it: `zstfs SRC MNT -o ...`; nothing is mounted."""
    src = tmp_path / "src"
    src.mkdir()
    r = subprocess.run([ZSTFS, str(src), str(src), "-o", "rw,noauto,compress_after=7d,turbo"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "zstfs: unknown mount option 'turbo'"
    assert not is_mounted(src)


# ---------------------------------------------------------------------- the real helper
def helper_env() -> dict[str, str]:
    """The environment with the venv's `zstfs` first on PATH (mount.fuse3 runs it via sh)."""
    return {**os.environ, "PATH": BIN_DIR + os.pathsep + os.environ.get("PATH", "")}


def daemon_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@needs_fuse
@pytest.mark.skipif(MOUNT_FUSE3 is None, reason="mount.fuse3 not installed (apt-get install fuse3)")
@pytest.mark.parametrize("form", ["mount(8) argv", "type#source"])
@pytest.mark.timeout(60)
def test_mount_through_mount_fuse3(tmp_path: Path, form: str) -> None:
    """fuse3 3.14's helper accepts both `mount.fuse3 SRC MNT -o .. -t fuse.zstfs` (exactly what
    mount(8) runs for an fstab line of type fuse.zstfs) and the old `zstfs#SRC` form. It
    returns only once the mount is live, because `zstfs` (no subcommand: the fstab form)
    detaches only when ready."""
    assert MOUNT_FUSE3 is not None
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "a.jsonl").write_bytes(b'{"type":"session_meta"}\n' * 1000)
    log = tmp_path / "zstfs.log"
    o = f"rw,noauto,user,compress_after=1h,log={log}"
    argv = ([MOUNT_FUSE3, str(src), str(mnt), "-o", o, "-t", "fuse.zstfs"]
            if form == "mount(8) argv" else [MOUNT_FUSE3, f"zstfs#{src}", str(mnt), "-o", o])
    r = subprocess.run(argv, env=helper_env(), capture_output=True, text=True, timeout=30)
    try:
        assert r.returncode == 0, r.stderr
        # Live as soon as the helper returned: no waiting.
        status = json.loads(os.getxattr(mnt, STATUS_XATTR))
        assert status["compress_after"] == 3600
        assert status["source"] == str(src)
        assert (mnt / "a.jsonl").read_bytes() == b'{"type":"session_meta"}\n' * 1000
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", str(mnt)],
                                capture_output=True, text=True, timeout=10).stdout.split()
        assert fstype == ["fuse.zstfs", str(src)]
        pid = status["pid"]
        u = subprocess.run([ZSTFS, "umount", str(mnt)], capture_output=True, text=True,
                           timeout=30)
        assert u.returncode == 0, u.stderr
        assert not is_mounted(mnt)
        assert daemon_gone(pid)  # `zstfs umount` returns after the daemon exited
        assert " ERROR " not in log.read_text()
    finally:
        lazy_unmount(mnt)


@needs_fuse
@pytest.mark.skipif(shutil.which("mount") is None or shutil.which("unshare") is None,
                    reason="mount(8) or unshare(1) not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="mount -t as non-root needs an fstab entry")
@pytest.mark.timeout(60)
def test_mount_t_fuse_zstfs_through_mount8(tmp_path: Path) -> None:
    """`mount -t fuse.zstfs SRC MNT -o ...`: mount(8) runs the helper with **no PATH at all**
    (checked with strace), so sh falls back to its default path and `zstfs` must be in
    /usr/local/bin (the README's symlink). Done in a private mount namespace where a bind mount
    puts the venv's zstfs at /usr/local/bin/zstfs, so the host is not touched."""
    src, mnt, fake_bin = tmp_path / "src", tmp_path / "mnt", tmp_path / "bin"
    for d in (src, mnt, fake_bin):
        d.mkdir()
    (fake_bin / "zstfs").symlink_to(ZSTFS)
    (src / "a.jsonl").write_text("x\n")
    log = tmp_path / "zstfs.log"
    q = shlex.quote
    script = f"""
        set -e
        mount --bind {q(str(fake_bin))} /usr/local/bin
        env -u PATH mount -t fuse.zstfs {q(str(src))} {q(str(mnt))} \\
            -o noauto,compress_after=1h,log={q(str(log))}
        findmnt -n -o FSTYPE {q(str(mnt))}
        getfattr --only-values -n {STATUS_XATTR} {q(str(mnt))}; echo
        cat {q(str(mnt / 'a.jsonl'))}
        {q(ZSTFS)} umount {q(str(mnt))}
        echo unmounted
    """
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=45)
    assert r.returncode == 0, r.stderr + r.stdout
    fstype, status, content, done = r.stdout.splitlines()
    assert fstype == "fuse.zstfs"
    assert json.loads(status)["compress_after"] == 3600
    assert (content, done) == ("x", "unmounted")
    assert daemon_gone(json.loads(status)["pid"])


def test_fstab_example_lines_parse() -> None:
    """Every entry of contrib/fstab.example (the active one and the commented-out
    alternatives, `#/home/...`) has six fields, type fuse.zstfs, and options that zstfs accepts
    once mount.fuse3 has consumed its own (setuid=, drop_privileges)."""
    lines = [ln.lstrip("#").split() for ln in FSTAB_EXAMPLE.read_text().splitlines()
             if ln.startswith(("/", "#/"))]
    assert len(lines) == 3
    for fields in lines:
        assert len(fields) == 6, fields
        assert fields[2] == "fuse.zstfs"
        mine = [o for o in fields[3].split(",")
                if not o.startswith("setuid=") and o != "drop_privileges"]
        assert opts(",".join(mine)).compress_after == 7 * 86400
    assert any("user" in f[3].split(",") and "noauto" in f[3].split(",") for f in lines)
    assert any(o.startswith("setuid=") or o == "allow_other"
               for f in lines for o in f[3].split(","))


# ---------------------------------------------------------------------- systemd
def unit_commands(home: Path) -> dict[str, list[str]]:
    """ExecStartPre/ExecStart/ExecStop of the unit, with %h expanded as systemd would."""
    cmds: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStartPre", "ExecStart", "ExecStop"):
            cmds[key] = shlex.split(value.lstrip("-").replace("%h", str(home)))
    return cmds


def test_unit_file_shape() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "Restart=on-failure", "WantedBy=default.target",
                 "ExecStartPre=-%h/.local/bin/zstfs umount %h/.codex",
                 "ExecStart=%h/.local/bin/zstfs mount --foreground --compress-after 7d %h/.codex",
                 "ExecStop=%h/.local/bin/zstfs umount --stop-codex %h/.codex"):
        assert line in text.splitlines()
    assert any(ln.startswith("TimeoutStopSec=") for ln in text.splitlines())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed")
@pytest.mark.timeout(60)
def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze --user verify` with HOME pointing at a home where %h/.local/bin/zstfs
    exists (verify checks that ExecStart is executable). Unknown keys only warn (exit 0), so
    any output at all fails the test."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "zstfs").symlink_to(ZSTFS)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    r = subprocess.run(["systemd-analyze", "--user", "verify", str(UNIT)], env=env,
                       capture_output=True, text=True, timeout=45)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).strip() == ""


@needs_fuse
@pytest.mark.timeout(60)
def test_unit_commands_notify_ready_and_stopping(tmp_path: Path) -> None:
    """Run ExecStartPre, ExecStart and ExecStop as systemd would for Type=notify: READY=1 comes
    only once the mount answers status, STOPPING=1 when the unmount begins, and the daemon then
    exits 0."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "zstfs").symlink_to(ZSTFS)
    codex = home / ".codex"
    (codex / "sessions").mkdir(parents=True)
    (codex / "sessions" / "r.jsonl").write_text('{"type":"session_meta"}\n')
    cmds = unit_commands(home)
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.02)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "HOME": str(home)}
    # ExecStartPre: fails (nothing mounted) and that is ignored ("-" prefix).
    subprocess.run(cmds["ExecStartPre"], env=env, capture_output=True, timeout=10)
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmds["ExecStart"], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    messages: list[str] = []
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            try:
                msg = sock.recv(4096).decode()
            except TimeoutError:
                return False
            # The moment READY=1 arrives, the mount must already answer.
            status = json.loads(os.getxattr(codex, STATUS_XATTR))
            messages.append(msg)
            return msg == "READY=1" and status["compress_after"] == 7 * 86400

        wait_until(ready, 30, "READY=1 on the notify socket")
        assert messages == ["READY=1"]
        assert (codex / "sessions" / "r.jsonl").read_text() == '{"type":"session_meta"}\n'
        r = subprocess.run(cmds["ExecStop"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=30) == 0
        sock.settimeout(1)
        messages.append(sock.recv(4096).decode())
        assert messages == ["READY=1", "STOPPING=1"]
        assert not is_mounted(codex)
    finally:
        if proc.poll() is None:
            lazy_unmount(codex)
            proc.wait(timeout=30)
        log.close()
        sock.close()
    text = (tmp_path / "daemon.log").read_text()
    assert " ERROR " not in text, text
    assert "Traceback" not in text, text


@needs_fuse
@pytest.mark.timeout(90)
def test_unit_starts_again_after_the_daemon_is_killed(tmp_path: Path) -> None:
    """kill -9 of the daemon (the OOM killer) is a failure to systemd, so Restart=on-failure
    runs ExecStartPre and ExecStart again: the first clears the dead mount, the second mounts,
    and the store reads back as it was."""
    assert "Restart=on-failure" in UNIT.read_text().splitlines()
    assert any(ln.startswith("ExecStartPre=-") for ln in UNIT.read_text().splitlines())
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "zstfs").symlink_to(ZSTFS)
    codex = home / ".codex"
    (codex / "sessions").mkdir(parents=True)
    rollout = b'{"type":"session_meta"}\n' * 2000
    (codex / "sessions" / "r.jsonl").write_bytes(rollout)
    cmds = unit_commands(home)
    env = {**os.environ, "HOME": str(home)}
    env.pop("NOTIFY_SOCKET", None)
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.CompletedProcess[str]:
        """ExecStartPre, then ExecStart until the mount answers; ExecStartPre's result."""
        pre = subprocess.run(cmds["ExecStartPre"], env=env, capture_output=True, text=True,
                             timeout=30)
        proc = subprocess.Popen(cmds["ExecStart"], env=env, stdout=log, stderr=log,
                                start_new_session=True)
        procs.append(proc)

        def mounted() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            return _status_or_none(codex) is not None

        wait_until(mounted, 30, "the mount")
        return pre

    try:
        assert start().returncode != 0  # nothing to clear: ignored ("-")
        (codex / "sessions" / "new.jsonl").write_bytes(b'{"new": 1}\n')
        procs[0].kill()
        assert procs[0].wait(timeout=30) == -signal.SIGKILL  # a failure: systemd restarts it
        assert is_mounted(codex)
        with pytest.raises(OSError, match=r"not connected|connection abort"):
            os.listdir(codex)

        pre = start()
        assert pre.returncode == 0, pre.stderr
        assert "cleared its dead mount" in pre.stderr
        assert _status_or_none(codex)["pid"] == procs[1].pid  # type: ignore[index]
        assert (codex / "sessions" / "r.jsonl").read_bytes() == rollout
        assert (codex / "sessions" / "new.jsonl").read_bytes() == b'{"new": 1}\n'
        r = subprocess.run(cmds["ExecStop"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert procs[1].wait(timeout=30) == 0
        assert not is_mounted(codex)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        lazy_unmount(codex)
        log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert " ERROR " not in text, text
    assert "Traceback" not in text, text


@needs_fuse
@pytest.mark.skipif(find_codex() is None,
                    reason="codex CLI not installed: run scripts/install-codex.sh")
@pytest.mark.timeout(120)
def test_unit_stops_with_codex_daemon_running(tmp_path: Path) -> None:
    """The unit's ExecStop with codex's background app-server running through the mount (as an
    interactive codex leaves it): it stops the app-server and its pid-update-loop, unmounts, and
    the daemon exits 0. Without --stop-codex the same unmount fails as busy."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "zstfs").symlink_to(ZSTFS)
    codex = home / ".codex"
    codex.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    cmds = unit_commands(home)
    env = {**os.environ, "HOME": str(home)}
    env.pop("NOTIFY_SOCKET", None)
    subprocess.run(cmds["ExecStartPre"], env=env, capture_output=True, timeout=10)
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmds["ExecStart"], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    try:
        def mounted() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            return _status_or_none(codex) is not None

        wait_until(mounted, 30, "the mount")
        started = run_codex(codex, ["app-server", "daemon", "start"], cwd=work, home=home)
        assert '"started"' in started.stdout
        daemons = wait_until(lambda: len(d := codex_daemons(codex)) == 2 and d, 30,
                             "codex's app-server and pid-update-loop")
        plain_stop = [c for c in cmds["ExecStop"] if c != "--stop-codex"]
        r = subprocess.run(plain_stop, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert "busy" in r.stderr
        assert is_mounted(codex)

        r = subprocess.run(cmds["ExecStop"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for pid in daemons.values():
            assert f"stopping pid {pid} " in r.stderr
            assert process_gone(pid)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(codex)
    finally:
        kill_codex_daemons(codex)
        if proc.poll() is None:
            lazy_unmount(codex)
            proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "daemon.log").read_text()
    assert " ERROR " not in text, text
    assert "Traceback" not in text, text


def _status_or_none(path: Path) -> dict | None:
    try:
        return json.loads(os.getxattr(path, STATUS_XATTR))
    except OSError:
        return None
