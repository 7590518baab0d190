"""Logging setup for the daemon and the command-line tools."""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path


def default_log_file(source: str) -> str:
    """Where a detached daemon logs when no --log is given: `$XDG_STATE_HOME/zstfs/`."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "zstfs"
    state.mkdir(parents=True, exist_ok=True)
    name = os.path.abspath(source).strip("/").replace("/", "_") or "root"
    return str(state / f"{name}.log")


def setup_logging(*, debug: bool, log_file: str | None, to_stderr: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if log_file is not None:
        fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=10 << 20, backupCount=2)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if to_stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
