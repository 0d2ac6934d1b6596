"""Wire contracts, version 1 (see DESIGN.md): message events, query jobs and results.

Additive changes only; a breaking change becomes version 2 with new schema names. Every record
carries ``schema`` so a consumer can reject what it does not understand with that reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MESSAGE_SCHEMA = "tessera.message.v1"
QUERY_SCHEMA = "tessera.query.v1"
RESULT_SCHEMA = "tessera.result.v1"
REASON_SCHEMA = "tessera.reason.v1"

#: Upper bound of a message's text; longer texts are rejected rather than silently truncated.
MAX_TEXT_CHARS = 32_000
#: Upper bound of a query (plus each history turn); a retrieval query is a sentence, not a document.
MAX_QUERY_CHARS = 2_000
MAX_HISTORY_TURNS = 20
MAX_IMAGES = 16
MAX_PARTICIPANTS = 1_000
MAX_TOP_K = 100
#: Largest serialised result: under the Kafka producer's 1 MiB ``max_request_size`` with room for
#: the record's key and headers (``Result.capped``).
MAX_RESULT_BYTES = 900_000
#: Image URIs longer than this (and every ``data:`` URI) travel in results by reference.
MAX_RESULT_URI_CHARS = 2_048

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/+\-]{0,199}$"
Identifier = Annotated[str, Field(pattern=ID_PATTERN, description="opaque identifier, 1-200 characters")]
URI_SCHEMES = ("file", "http", "https", "s3", "data")


def _no_control_chars(value: str) -> str:
    """Control characters have no place in chat text and are a common smuggling vector."""
    for ch in value:
        if ord(ch) < 32 and ch not in "\n\t\r" or ord(ch) == 127:
            raise ValueError(f"contains control character U+{ord(ch):04X}")
    return value


CleanText = Annotated[str, AfterValidator(_no_control_chars)]


class _Record(BaseModel):
    """Readers ignore fields they do not know (a newer producer's additions); ``unknown_fields`` names them."""

    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)


class ImageRef(_Record):
    uri: str = Field(min_length=1, max_length=2_000_000)
    caption: CleanText | None = Field(default=None, max_length=2_000)
    mime: str | None = Field(default=None, max_length=100)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, uri: str) -> str:
        scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
        if scheme not in URI_SCHEMES:
            raise ValueError(f"scheme {scheme or '(none)'!r} not one of {', '.join(URI_SCHEMES)}")
        return uri


class MessageEvent(_Record):
    """One message of a conversation, created, edited (same message_id, later event) or deleted."""

    schema_: Literal["tessera.message.v1"] = Field(alias="schema")
    event_id: Identifier
    op: Literal["upsert", "delete"] = "upsert"
    tenant_id: Identifier
    conversation_id: Identifier
    message_id: Identifier
    sender_id: Identifier
    sender_name: CleanText | None = Field(default=None, max_length=200)
    #: Who may see the conversation. Absent: everyone in the tenant. Never empty (refused: an empty
    #: list must not silently mean "everyone"). The list in effect is the one of the conversation's
    #: highest-versioned event that carries one.
    participants: list[Identifier] | None = Field(default=None, min_length=1, max_length=MAX_PARTICIPANTS)
    sent_at: AwareDatetime
    #: When this version of the message was written (an edit or a delete). A message's version is
    #: ``edited_at``, else ``sent_at``; the highest version wins (ties: the higher ``event_id``), so a
    #: late old edit never overwrites a newer one. A delete wins over every version.
    edited_at: AwareDatetime | None = None
    text: CleanText = Field(default="", max_length=MAX_TEXT_CHARS)
    images: list[ImageRef] = Field(default_factory=list, max_length=MAX_IMAGES)
    reply_to: Identifier | None = None

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    @property
    def version(self) -> float:
        """The message version this event carries: ``edited_at``, else ``sent_at`` (seconds)."""
        return (self.edited_at or self.sent_at).timestamp()


class HistoryTurn(_Record):
    role: Literal["user", "assistant"]
    text: CleanText = Field(max_length=MAX_QUERY_CHARS)


class QueryImage(_Record):
    uri: str = Field(min_length=1, max_length=2_000_000)


class QueryFilters(_Record):
    conversation_id: Identifier | None = None
    participants: list[Identifier] | None = Field(default=None, max_length=100)
    sent_after: AwareDatetime | None = None
    sent_before: AwareDatetime | None = None


class QueryJob(_Record):
    """A "find that conversation" request on behalf of one user of one tenant."""

    schema_: Literal["tessera.query.v1"] = Field(alias="schema")
    job_id: Identifier
    tenant_id: Identifier
    user_id: Identifier
    #: Declared before ``query``: the query may be blank when an image is given (search by image).
    image: QueryImage | None = None
    query: CleanText = Field(max_length=MAX_QUERY_CHARS)
    history: list[HistoryTurn] = Field(default_factory=list, max_length=MAX_HISTORY_TURNS)
    filters: QueryFilters = Field(default_factory=QueryFilters)
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K)
    reasoning: Literal["auto", "fast", "vlm"] = "auto"
    #: When the user asked (additive to v1): "last week" and "yesterday" count back from it. Default: now.
    asked_at: AwareDatetime | None = None

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str, info: ValidationInfo) -> str:
        """A query needs words or an image to search by."""
        if not query.strip() and info.data.get("image") is None:
            raise ValueError("query is empty and no image is given")
        return query


class ResultImage(_Record):
    message_id: str
    #: The image's own URI, or for inline (``data:``) and overlong URIs a reference
    #: ``tessera://messages/<message_id>/images/<index>``: the platform holds the bytes already.
    uri: str
    caption: str | None = None
    #: Position of the image in its message's ``images`` (additive to v1).
    index: int | None = None

    @classmethod
    def of(cls, message_id: str, index: int, uri: str, caption: str | None) -> "ResultImage":
        """A result image that never carries the image's bytes: results stay small whatever was sent."""
        if uri[:5].lower() == "data:" or len(uri) > MAX_RESULT_URI_CHARS:
            uri = f"tessera://messages/{quote(message_id, safe='')}/images/{index}"
        return cls(message_id=message_id, uri=uri, caption=caption, index=index)


class ResultFragment(_Record):
    fragment_id: str
    conversation_id: str
    message_ids: list[str]
    context_message_ids: list[str]
    start_at: datetime
    end_at: datetime
    score: float
    snippet: str
    images: list[ResultImage] = Field(default_factory=list)


class ClarifyingQuestion(_Record):
    text: str
    options: list[str]


class ResultError(_Record):
    code: str
    message: str


class Result(_Record):
    schema_: Literal["tessera.result.v1"] = Field(default=RESULT_SCHEMA, alias="schema")
    job_id: str
    status: Literal["ok", "clarify", "error"]
    rewritten_query: str | None = None
    #: Which stage chose the turns (additive to v1): the CPU span selector or the VLM reasoning worker.
    reasoned_by: Literal["cpu", "vlm"] | None = None
    fragments: list[ResultFragment] = Field(default_factory=list)
    clarifying_question: ClarifyingQuestion | None = None
    error: ResultError | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    #: True when the lowest-ranked fragments were left out to keep the result under
    #: ``MAX_RESULT_BYTES`` (additive to v1).
    truncated: bool = False

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def failure(cls, job_id: str, code: str, message: str) -> "Result":
        """The ``error`` result of a job: a stable ``code`` for programs, a ``message`` for people."""
        return cls(job_id=job_id, status="error", error=ResultError(code=code, message=message))

    def capped(self, max_bytes: int = MAX_RESULT_BYTES) -> "Result":
        """This result, or the longest prefix of its fragments that fits ``max_bytes`` (``truncated``);
        an ``error`` result (``result_too_large``) when not even the first fragment fits."""
        if len(self.to_json().encode()) <= max_bytes:
            return self
        empty = len(self.model_copy(update={"fragments": [], "truncated": True}).to_json().encode())
        budget, keep = max_bytes - empty, 0
        for fragment in self.fragments:
            budget -= len(fragment.model_dump_json(by_alias=True).encode()) + 1
            if budget < 0:
                break
            keep += 1
        if keep == 0:
            return Result.failure(self.job_id, "result_too_large", f"the best fragment alone exceeds {max_bytes} bytes")
        return self.model_copy(update={"fragments": self.fragments[:keep], "truncated": True})


class CandidateImage(_Record):
    uri: str
    caption: str | None = None


class CandidateTurn(_Record):
    message_id: str
    speaker: str
    sent_at: datetime
    text: str
    images: list[CandidateImage] = Field(default_factory=list)


class ReasonCandidate(_Record):
    """One recalled fragment, carried with its turns so the reasoning worker needs no store access."""

    fragment_id: str
    conversation_id: str
    start_at: datetime
    end_at: datetime
    #: Fused recall score and the CPU span selector's answer, the fallback when the model finds nothing.
    score: float
    span_message_ids: list[str]
    turns: list[CandidateTurn]


class ReasonRequest(_Record):
    """Work for the ``reason`` queue: a query job after recall, with its top candidates."""

    schema_: Literal["tessera.reason.v1"] = Field(default=REASON_SCHEMA, alias="schema")
    job: QueryJob
    rewritten_query: str
    candidates: list[ReasonCandidate] = Field(max_length=MAX_TOP_K)
    timings_ms: dict[str, float] = Field(default_factory=dict)

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
