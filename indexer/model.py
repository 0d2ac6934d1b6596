"""The nouns of Tessera, shared by ingest, query, the state and the stores.

A conversation is a run of ``Turn``s; segmentation groups them into fragments (``FragmentRecord`` in
the state); each fragment is indexed as ``Unit``s (the fragment, and a turn and a window per member)
that the stores return as ``Hit``s under a ``SearchFilter``; the query path answers with ``Span``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from indexer import ids

#: Sort order of turns in a conversation: (sent_at seconds, message id).
SortKey = tuple[float, str]
#: What decides between two writes of one message or one participant list: (version, event_id).
Stamp = tuple[float, str]
ConversationKey = tuple[str, str]


@dataclass(frozen=True)
class FragmentRecord:
    fragment_id: str
    tenant_id: str
    conversation_id: str
    message_ids: tuple[str, ...]
    start_at: datetime
    end_at: datetime

    @property
    def start_key(self) -> SortKey:
        return (self.start_at.timestamp(), self.message_ids[0])


@dataclass(frozen=True)
class ConversationMeta:
    participants: list[str] | None
    #: The stamp of the event whose list is in effect (None while no event carried one).
    participants_stamp: Stamp | None
    #: Messages sent at or before this time belong to an erased conversation and stay erased.
    erased_before: float | None


@dataclass(frozen=True)
class Parked:
    """A conversation whose indexing failed ``attempts`` times in a row: set aside until an operator acts."""

    tenant_id: str
    conversation_id: str
    attempts: int
    reason: str
    parked_at: float


@dataclass(frozen=True)
class ImageInfo:
    uri: str
    caption: str | None = None
    #: Words read off the image (``encoders.ocr``), once it was fetched with the reader on.
    text: str | None = None


@dataclass(frozen=True)
class Turn:
    message_id: str
    sender_id: str
    sent_at: datetime
    text: str
    sender_name: str | None = None
    images: tuple[ImageInfo, ...] = ()
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: Mean vector of the turn's images in the image model's space, when one is configured.
    image_vector: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def has_image(self) -> bool:
        return bool(self.images)


#: The kinds of unit a store holds. Ingest writes turns and windows (``INGESTED_KINDS``); fragment units are in
#: data dirs written before a fragment's relevance came from its turns' hits, and go with their fragments.
UNIT_KINDS = ("turn", "window", "fragment")
INGESTED_KINDS = ("turn", "window")
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


@dataclass(frozen=True)
class SearchFilter:
    """What the asking user may see and what the query narrows to; ``tenant_id`` and ``user_id`` always apply."""

    tenant_id: str
    user_id: str
    conversation_id: str | None = None
    sender_ids: tuple[str, ...] = ()
    sent_after: float | None = None
    sent_before: float | None = None


#: Payload fields a search hit must carry back: what fusion, spans and dating read. A store may return more.
HIT_FIELDS = ("conversation_id", "fragment_id", "message_ids", "sender_ids", "start_ts")


@dataclass(frozen=True)
class Hit:
    """A unit a search found. Fusion reads ``turn_key``, ``fragment_key`` and ``sender_keys`` of every hit and the
    payload of the few it keeps; a store may leave the payload to be read on demand (``stores.base.describe``)."""

    unit_id: str
    score: float
    #: At least ``HIT_FIELDS`` of the unit's payload.
    payload: dict

    #: Whether the payload is at hand; ``stores.base.describe`` reads it for hits that are not.
    described = True

    def turn_key(self, tenant_id: str) -> int:
        """The same for every hit of one turn, whatever its list or store (``ids.turn_key``)."""
        return ids.turn_key(tenant_id, self.payload["conversation_id"], self.payload["message_ids"][0])

    @property
    def fragment_key(self) -> int:
        return ids.fragment_key(self.payload["fragment_id"])

    @property
    def sender_keys(self) -> tuple[int, ...]:
        return tuple(ids.sender_key(s) for s in self.payload["sender_ids"])


@dataclass(frozen=True)
class Span:
    fragment_id: str
    conversation_id: str
    message_ids: list[str]
    score: float


@dataclass
class IngestReport:
    upserted: int = 0
    deleted: int = 0
    unchanged: int = 0
    fragments_written: int = 0
    fragments_deleted: int = 0
    encoded: int = 0
    #: Events older than the version already applied (late edits), ignored.
    stale: int = 0
    images_embedded: int = 0
    #: Images whose words were read and indexed with their turn (``TESSERA_OCR``).
    images_read: int = 0
    #: Marks a bounded call (``max_conversations``, ``max_texts``) left for the next: a conversation that got the
    #: vectors of a slice of its waiting turns, and the first one the call did not take.
    deferred: int = 0
    #: Conversations whose indexing failed for a reason of their own (retried by later tasks) ...
    index_failures: int = 0
    #: ... and those of them set aside after MAX_INDEX_ATTEMPTS (``tessera dead-letters``).
    parked: int = 0
    #: Images that could not be fetched or decoded, by refusal code; their turns index the caption.
    image_failures: dict[str, int] = field(default_factory=dict)

    def add(self, other: "IngestReport") -> None:
        for name in self.__dataclass_fields__:
            if name == "image_failures":
                for code, n in other.image_failures.items():
                    self.image_failures[code] = self.image_failures.get(code, 0) + n
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))


