"""Every test fails on an ERROR it did not expect, wherever zstfs logged it.

zstfs logs ERROR (and CRITICAL) only for what needs a person: a damaged file, a swap that lost
a race it cannot undo, a full disk. A test that meets one by accident has found a bug even when
its assertions pass. Two places are watched, for every test (the `log_check` fixture is
autouse):

* zstfs running in the test process (store, file table, operations, compactor driven by the
  tests directly): a handler on the `zstfs` logger records its ERROR+ records;
* the daemons the test mounted (`mount_factory`): their log files, read at teardown.

A test that provokes errors on purpose says which, by a regular expression searched in each
line (message, and for daemons the whole log line):

    @pytest.mark.expect_log_errors("cannot decode", "checksum")
    def test_...

or, from inside the test, `expect_log_errors("pattern")` (the fixture). A mount started with
`mount_factory(..., expect_errors="pattern")` expects that pattern of its own log only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: What counts as an error line in a daemon's log (its format: `time pid LEVEL name: message`).
DAEMON_ERROR_MARKS = (" ERROR ", " CRITICAL ", "Traceback")


def daemon_errors(log: Path) -> list[str]:
    """The error lines of a daemon's log file."""
    if not log.exists():
        return []
    return [line for line in log.read_text(errors="replace").splitlines()
            if any(mark in line for mark in DAEMON_ERROR_MARKS)]


class _Recorder(logging.Handler):
    """Keeps the ERROR+ records of the `zstfs` loggers of this process."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is still an error
            self.lines.append(f"{record.levelname} {record.name}: {record.msg!r}")


class LogCheck:
    """The errors one test met, and those it declared."""

    def __init__(self) -> None:
        self.expected: list[re.Pattern[str]] = []
        self.logs: list[tuple[Path, list[re.Pattern[str]]]] = []
        self.recorder = _Recorder()

    def expect(self, *patterns: str) -> None:
        """Error lines matching any of `patterns` (regular expressions) are expected."""
        self.expected += [re.compile(p) for p in patterns]

    def watch(self, log: Path, expect: str = "") -> None:
        """A daemon's log file to check at teardown; its error lines matching `expect` (a
        regular expression), if given, are expected."""
        self.logs.append((log, [re.compile(expect)] if expect else []))

    def unexpected(self) -> list[str]:
        def unmatched(lines: list[str], extra: list[re.Pattern[str]]) -> list[str]:
            pats = self.expected + extra
            return [ln for ln in lines if not any(p.search(ln) for p in pats)]

        problems = [f"in the test process: {ln}"
                    for ln in unmatched(self.recorder.lines, [])]
        for log, own in self.logs:
            problems += [f"{log}: {ln}" for ln in unmatched(daemon_errors(log), own)]
        return problems


@pytest.fixture(autouse=True)
def log_check(request: pytest.FixtureRequest) -> Iterator[LogCheck]:
    """Fails the test, at teardown, on any zstfs ERROR it did not declare (see the module)."""
    check = LogCheck()
    for mark in request.node.iter_markers("expect_log_errors"):
        check.expect(*mark.args)
    logger = logging.getLogger("zstfs")
    logger.addHandler(check.recorder)
    try:
        yield check
    finally:
        logger.removeHandler(check.recorder)
    problems = check.unexpected()
    if problems:
        pytest.fail("zstfs logged errors the test did not expect:\n" + "\n".join(problems[:20]),
                    pytrace=False)


@pytest.fixture
def expect_log_errors(log_check: LogCheck) -> Callable[..., None]:
    """`expect_log_errors(pattern, ...)`: error lines matching any pattern are expected."""
    return log_check.expect


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expect_log_errors(*patterns): zstfs error lines matching any of these "
                   "regular expressions are expected (see tests/harness/logcheck.py)")
