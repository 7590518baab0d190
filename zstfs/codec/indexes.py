"""What is known of each ``.zst`` by its identity: its frame index, its logical size, the damage
found in it.  The one owner of these facts in the daemon: readers, listings and the census ask
here, so a file's size is learned once (from its seek table or frame headers) and a damaged file
keeps reading as damaged."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from zstfs.codec.format import BudgetBusyError, CorruptError, Identity
from zstfs.codec.index import Index

#: Frame indexes kept (least recently used go first): the frames of every file being read.
INDEX_CACHE_ENTRIES = 4096
#: Logical sizes kept, and damaged files remembered: a listing or census of a big store.
SIZE_ENTRIES = 200_000
DAMAGE_ENTRIES = 100_000


@dataclass(slots=True)
class _Damage:
    """What was found wrong with a file (kept as type and arguments: a fresh error each time)."""

    error: tuple[type[CorruptError], tuple[object, ...]]  # the first found: what it reads as
    index_error: tuple[type[CorruptError], tuple[object, ...]] | None = None  # no index: why


def _keep(e: CorruptError) -> tuple[type[CorruptError], tuple[object, ...]]:
    return type(e), e.args


def _raise(kept: tuple[type[CorruptError], tuple[object, ...]]) -> None:
    raise kept[0](*kept[1])


class IndexCache:
    """Per identity: the frame index (built once however many readers open the file), the
    logical size, and the damage found (in its index or in a frame read), each bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._indexes: OrderedDict[Identity, Index] = OrderedDict()
        self._sizes: OrderedDict[Identity, int] = OrderedDict()
        #: Sizes taken from a note on the file (`sizenote`), until its index confirms them.
        self._noted: OrderedDict[Identity, int] = OrderedDict()
        self._damage: OrderedDict[Identity, _Damage] = OrderedDict()

    def cached(self, identity: Identity) -> Index | None:
        with self._lock:
            index = self._indexes.get(identity)
            if index is not None:
                self._indexes.move_to_end(identity)
            return index

    def get(self, identity: Identity, build: Callable[[], Index]) -> Index:
        """The index of that file, built (outside the lock) on a miss; a file whose index could
        not be built raises the same error again, without the work."""
        index = self.cached(identity)
        if index is not None:
            return index
        with self._lock:
            damage = self._damage.get(identity)
        if damage is not None and damage.index_error is not None:
            _raise(damage.index_error)
        try:
            index = build()
        except CorruptError as e:
            if not isinstance(e, BudgetBusyError):  # a transient refusal, not damage
                self.note_damaged(identity, e, index=True)
            raise
        with self._lock:
            noted = self._noted.pop(identity, None)
        if noted is not None and noted != index.size:
            # Listed with a size its frames do not have (the file changed, keeping its size and
            # mtime): the kernel may hold that size, so no byte of it is served.
            e = CorruptError(f"decodes to {index.size} bytes, but its size note says {noted} "
                             "(the file changed without a new size or mtime)")
            self.note_damaged(identity, e, index=True)
            raise e
        with self._lock:
            self._indexes[identity] = index
            while len(self._indexes) > INDEX_CACHE_ENTRIES:
                self._indexes.popitem(last=False)
        self.remember_size(identity, index.size)
        return index

    def known_size(self, identity: Identity) -> int | None:
        """The logical size if it is known without any I/O (what a damaged file lists as, once
        remembered), else None."""
        with self._lock:
            return self._size_locked(identity)

    def size(self, identity: Identity) -> int | None:
        """Like :meth:`known_size`, but a file found damaged raises what was found."""
        with self._lock:
            damage = self._damage.get(identity)
            size = self._size_locked(identity)
        if damage is not None:
            _raise(damage.error)
        return size

    def _size_locked(self, identity: Identity) -> int | None:
        size = self._sizes.get(identity)
        if size is None and (index := self._indexes.get(identity)) is not None:
            size = index.size
        return size

    def remember_size(self, identity: Identity, size: int) -> None:
        with self._lock:
            self._sizes[identity] = size
            self._sizes.move_to_end(identity)
            while len(self._sizes) > SIZE_ENTRIES:
                self._sizes.popitem(last=False)

    def remember_noted(self, identity: Identity, size: int) -> None:
        """A size read from the file's note: known like any other, and checked against its
        frames when its index is built."""
        with self._lock:
            self._noted[identity] = size
            self._noted.move_to_end(identity)
            while len(self._noted) > SIZE_ENTRIES:
                self._noted.popitem(last=False)
        self.remember_size(identity, size)

    def note_damaged(self, identity: Identity, why: CorruptError, *, index: bool = False) -> None:
        """Remember a damaged file (from now on its size raises the first damage found);
        ``index``: its index could not be built (readers get the same error)."""
        with self._lock:
            damage = self._damage.get(identity)
            if damage is None:
                damage = self._damage[identity] = _Damage(_keep(why))
                while len(self._damage) > DAMAGE_ENTRIES:
                    self._damage.popitem(last=False)
            if index:
                damage.index_error = _keep(why)

    def clear(self) -> None:
        with self._lock:
            self._indexes.clear()
            self._sizes.clear()
            self._noted.clear()
            self._damage.clear()
