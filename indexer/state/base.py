"""The conversation state every worker shares: turns, versions, tombstones, fragments, participants.

The state is the truth the stores are derived from (``tessera reindex`` rebuilds them from it). Two
backends implement one protocol: SQLite in the data dir (embedded default) and PostgreSQL (fleet).

Updates commute: the engine applies a set of events to the state in any order, any number of times,
and ends in the same state, because every write is decided by a *stamp* compared with the one stored:
``(version, event_id)``, where a message's version is ``edited_at``, else ``sent_at`` (seconds), and
the event id breaks ties. A delete leaves a tombstone that no upsert of that message id undoes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Iterable, Protocol, Sequence

import numpy as np

from indexer.model import ConversationKey, ConversationMeta, FragmentRecord, ImageInfo, Parked, SortKey, Stamp, Turn

class ConversationState(Protocol):
    """What the engine reads and writes; every write happens inside ``transaction()``."""

    def transaction(self) -> AbstractContextManager[None]:
        """Everything inside commits together or not at all."""

    def lock_conversations(self, keys: Iterable[ConversationKey]) -> None:
        """Wait for exclusive use of these conversations until the transaction ends (sorted: no deadlock)."""

    def try_lock_conversation(self, tenant_id: str, conversation_id: str) -> bool:
        """Take a conversation if no other transaction holds it; never waits."""

    def next_version(self) -> int:
        """A number larger than any returned before, in any process: the version of index writes."""

    def participants(self, tenant_id: str, conversation_id: str) -> list[str] | None: ...

    def conversation(self, tenant_id: str, conversation_id: str) -> ConversationMeta | None:
        """The conversation's participant list with its stamp, and its erasure time; None if unknown."""

    def set_participants(self, tenant_id: str, conversation_id: str, participants: list[str] | None,
                         stamp: Stamp | None) -> None:
        """Record the conversation with this list (None: visible to the tenant) and the stamp that chose it."""

    def stored_turns(self, tenant_id: str, conversation_id: str,
                     message_ids: Sequence[str]) -> dict[str, tuple[Stamp, Turn]]:
        """The stored turns among ``message_ids``, with the stamp of the event that wrote each."""

    def tombstones(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> set[str]:
        """Which of ``message_ids`` were deleted (for good)."""

    def put_tombstones(self, tenant_id: str, conversation_id: str, stamps: Sequence[tuple[str, Stamp]]) -> None: ...

    def get_turn(self, tenant_id: str, conversation_id: str, message_id: str) -> Turn | None: ...

    def put_turns(self, tenant_id: str, conversation_id: str,
                  turns: Sequence[tuple[Turn, str | None, Stamp]]) -> None:
        """Write (turn, reply_to, stamp) rows, vectors included when the turn carries them."""

    def delete_turns(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> None: ...

    def set_vectors(self, tenant_id: str, conversation_id: str,
                    vectors: Sequence[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
        """(message id, text vector, image vector or None) of turns that waited for them."""

    def set_images(self, tenant_id: str, conversation_id: str, turns: Sequence[tuple[str, Sequence[ImageInfo]]]) -> None:
        """(message id, images) of turns whose images were read (``ImageInfo.text``)."""

    def clear_vectors(self, tenant_id: str, conversation_id: str) -> None: ...

    def turns(self, tenant_id: str, conversation_id: str, from_key: SortKey | None = None) -> list[Turn]: ...

    def turns_by_id(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> dict[str, Turn]: ...

    def turns_by_key(self, tenant_id: str, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Turn]:
        """Turns of any conversations by (conversation, message), in one read and without their vectors: what a
        query reads of its best candidates."""

    def turns_without_vector(self, tenant_id: str, conversation_id: str) -> list[Turn]: ...

    def conversations_of_sender(self, tenant_id: str, sender_id: str) -> list[str]: ...

    def message_ids_of_sender(self, tenant_id: str, conversation_id: str, sender_id: str) -> list[str]: ...

    def forget_sender_tokens(self, tenant_id: str, sender_id: str) -> None: ...

    def senders_named(self, tenant_id: str, tokens: Sequence[str]) -> set[str]:
        """Senders whose name holds one of ``tokens``, or whom others call so (``ingest.aliases``)."""

    def put_sender_aliases(self, tenant_id: str, conversation_id: str,
                           aliases: dict[str, Sequence[tuple[str, str]]]) -> None:
        """Replace the (alias, sender_id) pairs heard in each fragment of ``aliases``; they leave with it."""

    def merge_pending(self, tenant_id: str, conversation_id: str, change: dict, merge) -> None: ...

    def pending(self, limit: int | None = None,
                only: Sequence[ConversationKey] | None = None) -> list[tuple[str, str, dict]]: ...

    def clear_pending(self, tenant_id: str, conversation_id: str) -> None: ...

    def record_failure(self, tenant_id: str, conversation_id: str, reason: str, park_after: int) -> int:
        """Count a failed indexing attempt of a pending conversation; park it at ``park_after``."""

    def parked(self) -> list[Parked]: ...

    def unpark(self, tenant_id: str, conversation_id: str) -> bool:
        """Make a parked conversation pending again (replay); False if it was not parked."""

    def drop_parked(self, tenant_id: str, conversation_id: str) -> bool:
        """Forget a parked conversation's mark (its turns stay in the state, unindexed)."""

    def savepoint(self) -> AbstractContextManager[None]:
        """Inside a transaction: undo only what the block wrote if it raises."""

    def fragments(self, tenant_id: str, conversation_id: str) -> list[FragmentRecord]: ...

    def fragments_by_id(self, fragment_ids: Sequence[str]) -> dict[str, FragmentRecord]: ...

    def put_fragments(self, fragments: Sequence[FragmentRecord]) -> None: ...

    def delete_fragments(self, fragment_ids: Sequence[str]) -> None: ...

    def erase_conversation(self, tenant_id: str, conversation_id: str, before: float) -> None:
        """Drop every turn, fragment and mark; keep tombstones of its message ids and ``before``."""

    def conversations(self, after: ConversationKey | None = None, limit: int = 100) -> list[ConversationKey]:
        """Live conversations in (tenant, conversation) order, after ``after``: reindexing walks them."""

    def get_cursor(self, name: str) -> ConversationKey | None: ...

    def set_cursor(self, name: str, key: ConversationKey | None) -> None: ...

    def checkpoint(self) -> None:
        """Make erasures physical in the backend's own files."""

    def counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...
