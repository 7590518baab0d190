"""The status document of a store: its schema, how the daemon builds it, the census of an
unmounted store, and how `zstfs status` renders it.

The document is a JSON object with stable keys (`schema` is bumped on incompatible changes). A
mounted store serves it from its control file; `zstfs status` reads it there, or walks the store
itself when nothing serves it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zstfs import __version__, control
from zstfs.names import NameRules, Patterns
from zstfs.stats import Stats, human_bytes

if TYPE_CHECKING:
    from zstfs.compactor import Compactor
    from zstfs.fs import Operations
    from zstfs.opstats import OpStats
    from zstfs.options import MountOptions
    from zstfs.store import Recovery, Store

SCHEMA = 1


@dataclass
class MountStatus:
    """The live document of a mount: what it was started with, and what its parts report now."""

    opts: MountOptions
    store: Store
    stats: Stats
    ops: Operations
    compactor: Compactor
    recovery: Recovery
    warnings: list[str]
    patches: tuple[str, ...]
    opstats: OpStats | None = None

    def __post_init__(self) -> None:
        self.started = time.time()
        self.source = os.path.abspath(self.opts.source)
        self.mountpoint = os.path.abspath(self.opts.mountpoint)

    async def __call__(self) -> dict[str, Any]:
        opts, rules, recovery = self.opts, self.store.rules, self.recovery
        snap: dict[str, Any] = {
            "schema": SCHEMA,
            "version": __version__,
            "pid": os.getpid(),
            "source": self.source,
            "mountpoint": self.mountpoint,
            "started": self.started,
            "pattern": rules.pattern,
            "patterns": list(rules.patterns),
            "warnings": self.warnings,
            "compress_after": opts.compress_after,
            "level": opts.level,
            "jobs": opts.jobs,
            "open_files": sum(1 for n in self.ops.table if n.opens > 0),
            "open_file_accounting": self.store.accounting.mode,
            "pyfuse3_patches": list(self.patches),
            "passthrough": self.ops.enable_passthrough,
            "killpriv_v2": self.ops.enable_killpriv_v2,
            "spin_ns": self.ops.spin_ns if "spin_ns" in self.patches else 0,
            "known_inodes": len(self.ops.table.nodes),
            "recovery": {"temps_removed": recovery.temps_removed,
                         "leftovers_removed": recovery.leftovers_removed,
                         "leftovers_kept": recovery.leftovers_kept},
        }
        copies, copied = self.store.decoders.spills.stats()
        snap["decoded_copies"] = {"files": copies, "bytes": copied}
        snap.update(self.stats.counters())
        if self.opstats is not None:
            snap["requests"] = self.opstats.snapshot()
        snap.update(await self.compactor.status())
        return snap


def command(path: str, *, as_json: bool, pattern: Patterns = None) -> int:
    path = os.path.abspath(os.path.expanduser(path))
    info = control.read_status(path)
    if info is None:
        dead = control.dead_mount(path)
        if dead is not None:
            print(f"zstfs: {control.dead_message(path, dead)}", file=sys.stderr)
            return 1
        if not os.path.isdir(path):
            print(f"zstfs: {path}: no such directory", file=sys.stderr)
            return 1
        from zstfs.store import StoreError

        try:
            info = offline_status(path, pattern)
        except StoreError as e:
            print(f"zstfs: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"zstfs: {path}: {e.strerror or e}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(render(info))
    return 0


def offline_status(source: str, pattern: Patterns = None) -> dict[str, Any]:
    from zstfs.store import Store

    store = Store.open(source, NameRules(pattern))
    try:
        census = store.census().as_dict()
    finally:
        store.close()
    return {"schema": SCHEMA, "mounted": False, "source": source, **census}


def human_duration(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def render(info: dict[str, Any]) -> str:
    mounted = "pid" in info
    lines = [
        f"store:       {info.get('source')}"
        + (f"  (mounted on {info['mountpoint']}, pid {info['pid']})" if mounted else
           "  (not mounted)"),
        f"files:       {info['plain_files']} plain, {info['compressed_files']} compressed"
        + (f", {info['damaged_files']} damaged" if info.get("damaged_files") else ""),
        f"logical:     {human_bytes(info['logical_bytes'])}",
        f"stored:      {human_bytes(info['stored_bytes'])}  "
        f"(ratio {info['ratio']:.2f}x, saved {human_bytes(info['saved_bytes'])})",
    ]
    if mounted:
        after = info.get("compress_after")
        policy = "off" if after is None else f"after {human_duration(after)}"
        nxt = info.get("next_eligible_in")
        queue = f"{info['waiting_files']} waiting"
        if info.get("eligible_now"):
            queue += f", {info['eligible_now']} eligible now"
        if nxt is not None:
            queue += f", next in {human_duration(nxt)}"
        lines += [
            f"compaction:  {policy}; {queue}; {info['in_flight']} in progress",
            f"swaps:       {info['swaps_done']} done, {info['swaps_abandoned']} abandoned, "
            f"{info['swaps_failed']} failed; {info['promotions']} promotions",
        ]
        for warning in info.get("warnings", []):
            lines.append(f"warning:     {warning}")
        for err in info.get("last_errors", [])[-5:]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err["time"]))
            lines.append(f"error:       {when} {err['path']}: {err['error']}")
    return "\n".join(lines)
