"""Per-request counters and timers of the FUSE operations, for measuring what a workload costs.

Off by default: `ZSTFS_OPSTATS=1` in the daemon's environment wraps every pyfuse3 handler of the
`Operations` instance; the counts (by request and by errno) and the time spent in each handler
then appear under `requests` in the status document. The time is the handler's own (from the
call to its answer, awaits included), not pyfuse3's dispatch or the kernel round trip; the
daemon's CPU time (`cpu_s`) covers those too. Reads of the status attribute are not counted
(computing the status document takes milliseconds on a big store), but their CPU time is in
`cpu_s`.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pyfuse3

from zstfs.names import STATUS_XATTR

ENV = "ZSTFS_OPSTATS"


class OpStats:
    def __init__(self) -> None:
        self.count: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.ns: collections.Counter[str] = collections.Counter()

    def snapshot(self) -> dict[str, Any]:
        t = os.times()
        return {
            "count": dict(self.count),
            "errors": dict(self.errors),  # "lookup:ENOENT" → n
            "ns": dict(self.ns),
            "cpu_s": t.user + t.system,
        }

    def wrap(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
        count, errors, spent = self.count, self.errors, self.ns
        clock = time.perf_counter_ns

        @functools.wraps(fn)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            if name == "getxattr" and len(args) > 1 and args[1] == STATUS_XATTR:
                return await fn(*args, **kwargs)  # reading these counters is not counted
            t0 = clock()
            try:
                result = await fn(*args, **kwargs)
            except pyfuse3.FUSEError as e:
                errors[f"{name}:{_errname(e.errno)}"] += 1
                raise
            finally:
                count[name] += 1
                spent[name] += clock() - t0
            if name == "lookup" and getattr(result, "st_ino", 1) == 0:
                errors["lookup:negative-entry"] += 1
            return result

        return timed


def _errname(n: int) -> str:
    import errno

    return errno.errorcode.get(n, str(n))


def install(ops: pyfuse3.Operations) -> OpStats | None:
    """Wrap `ops`'s handlers if `ZSTFS_OPSTATS` is set; the OpStats, or None when off."""
    if os.environ.get(ENV, "") in ("", "0"):
        return None
    stats = OpStats()
    for name, member in vars(pyfuse3.Operations).items():
        if inspect.iscoroutinefunction(member):
            setattr(ops, name, stats.wrap(name, getattr(ops, name)))
    return stats
