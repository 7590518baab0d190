"""Detaching from the terminal, and telling whoever waits that the mount is ready.

`detach()` forks *before* trio starts any thread. The parent blocks on a pipe until the child
reports readiness (exit 0) or an error (its text is printed, exit 1), so `zstfs mount` returns
only once the mount is live, with a meaningful status.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable

Notify = Callable[[str | None], None]


def detach(stderr_fd: int | None) -> Notify:
    """Fork into the background; in the child, return a function to call once with None when
    ready, or with an error message. The parent never returns. The child's stderr becomes
    `stderr_fd` (the log, opened before the mount: a path inside the mount would hang here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        _parent_wait(r)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the session leader goes; the daemon can never reacquire a terminal
    _redirect_stdio(stderr_fd)
    sent = False

    def notify(error: str | None) -> None:
        nonlocal sent
        if sent:
            return
        sent = True
        with contextlib.suppress(OSError):
            os.write(w, b"ok" if error is None else error.encode())
            os.close(w)

    return notify


def _parent_wait(r: int) -> None:
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    message = b"".join(chunks).decode(errors="replace")
    if message == "ok":
        os._exit(0)
    sys.stderr.write((message or "zstfs: the daemon exited before the mount was ready") + "\n")
    sys.stderr.flush()
    os._exit(1)


def _redirect_stdio(stderr_fd: int | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    # Tracebacks and faulthandler dumps of a detached daemon land in its log, not nowhere.
    os.dup2(null if stderr_fd is None else stderr_fd, 2)
    os.close(null)


def sd_notify(message: str) -> None:
    """Send a systemd notification (READY=1, STOPPING=1) if run under a Type=notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())
