"""The storage interface every backend implements, and the records that cross it.

Three kinds of unit are indexed: a ``turn`` (one message), a ``window`` (a turn read together with
its neighbours inside its fragment) and a ``fragment``. Each unit carries the payload the filters
need, so tenant and visibility filters run inside the store, never after it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Protocol, Sequence

import numpy as np
from indexer.model import Hit, SearchFilter, Unit


def describe(hits: Iterable[Hit]) -> None:
    """Read the payloads of the hits whose store left them out of the search (``Hit.described``), one read per
    store: fusion scores every hit by its keys and needs the payloads of the few it keeps. A hit whose unit has
    gone since the search gets an empty payload."""
    pending: dict = defaultdict(list)
    for hit in hits:
        if not hit.described:
            pending[hit.reader].append(hit)
    for reader, waiting in pending.items():
        reader(waiting)


def check_vectors(unit: Unit, dim: int, image_dim: int | None) -> None:
    """The shapes every vector store requires: a text vector of ``dim``, an image vector only on turns."""
    if unit.vector is None or unit.vector.shape != (dim,):
        raise ValueError(f"unit {unit.unit_id}: vector must have shape ({dim},)")
    if unit.image_vector is not None and (unit.kind != "turn" or image_dim is None
                                          or unit.image_vector.shape != (image_dim,)):
        raise ValueError(f"unit {unit.unit_id}: image vectors go on turns, shape ({image_dim},)")


class VectorStore(Protocol):
    def upsert(self, units: Sequence[Unit]) -> None: ...

    def delete(self, unit_ids: Sequence[str]) -> None: ...

    def search(self, vector: np.ndarray, kind: str, flt: SearchFilter, limit: int, using: str = "text") -> list[Hit]:
        """Nearest units of ``kind`` by the named vector ``using`` (``image`` needs an image dimension)."""

    def count(self, tenant_id: str | None = None) -> int: ...

    def compact(self) -> None:
        """Make deletions physical (called after erasures)."""

    def refresh(self) -> None:
        """Make every write so far visible to searches."""

    def close(self) -> None: ...


class KeywordStore(Protocol):
    def upsert(self, units: Sequence[Unit]) -> None: ...

    def delete(self, unit_ids: Sequence[str]) -> None: ...

    def search(self, text: str, kind: str, flt: SearchFilter, limit: int) -> list[Hit]: ...

    def count(self, tenant_id: str | None = None) -> int: ...

    def compact(self) -> None:
        """Make deletions physical (called after erasures)."""

    def refresh(self) -> None:
        """Make every write so far visible to searches."""

    def close(self) -> None: ...
