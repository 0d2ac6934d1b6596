"""The storage interface every backend implements, and the records that cross it.

Three kinds of unit are indexed: a ``turn`` (one message), a ``window`` (a turn read together with
its neighbours inside its fragment) and a ``fragment``. Each unit carries the payload the filters
need, so tenant and visibility filters run inside the store, never after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

UNIT_KINDS = ("turn", "window", "fragment")
#: Named vectors: every unit has a ``text`` vector; turns whose images were embedded also an ``image`` one.
VECTOR_NAMES = ("text", "image")
#: Principal that stands for "everyone in the tenant": conversations without a participants list.
EVERYONE = "*"


@dataclass
class Unit:
    unit_id: str
    kind: str
    tenant_id: str
    conversation_id: str
    fragment_id: str
    message_ids: list[str]
    sender_ids: list[str]
    visible_to: list[str]
    start_ts: float
    end_ts: float
    text: str
    vector: np.ndarray | None = field(default=None, repr=False)
    #: Second named vector, of turns with embedded images (image model space); searched with ``using="image"``.
    image_vector: np.ndarray | None = field(default=None, repr=False)
    #: The state's write sequence when the unit was built (only grows): stores with external
    #: versioning (Elasticsearch) refuse to let an older write replace a newer one.
    version: int = 0

    def payload(self) -> dict:
        return {
            "kind": self.kind,
            "tenant_id": self.tenant_id,
            "conversation_id": self.conversation_id,
            "fragment_id": self.fragment_id,
            "message_ids": self.message_ids,
            "sender_ids": self.sender_ids,
            "visible_to": self.visible_to,
            "start_ts": self.start_ts,
            "end_ts": self.end_ts,
        }


def check_vectors(unit: Unit, dim: int, image_dim: int | None) -> None:
    """The shapes every vector store requires: a text vector of ``dim``, an image vector only on turns."""
    if unit.vector is None or unit.vector.shape != (dim,):
        raise ValueError(f"unit {unit.unit_id}: vector must have shape ({dim},)")
    if unit.image_vector is not None and (unit.kind != "turn" or image_dim is None
                                          or unit.image_vector.shape != (image_dim,)):
        raise ValueError(f"unit {unit.unit_id}: image vectors go on turns, shape ({image_dim},)")


@dataclass(frozen=True)
class SearchFilter:
    """What the asking user may see and what the query narrows to; ``tenant_id`` and ``user_id`` always apply."""

    tenant_id: str
    user_id: str
    conversation_id: str | None = None
    sender_ids: tuple[str, ...] = ()
    sent_after: float | None = None
    sent_before: float | None = None


@dataclass(frozen=True)
class Hit:
    unit_id: str
    score: float
    payload: dict


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
