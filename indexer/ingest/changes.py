"""Folding a conversation's events into the state, and the change it leaves for indexing.

The result depends on the set of events, not on their order or repetition: each write is decided by
the event's stamp ``(version, event_id)`` against the stored one, a delete leaves a tombstone no
upsert undoes, and a participant list counts only if its stamp is the newest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from indexer.ingest.units import sort_key, turn_of_event
from indexer.model import ConversationKey, IngestReport, SortKey, Stamp
from indexer.state import ConversationState
from schemas import MessageEvent


@dataclass
class PendingChange:
    """What indexing must redo for one conversation: from which turn on, and which messages changed."""

    earliest: SortKey | None = None
    full: bool = False
    removed_messages: set[str] = field(default_factory=set)
    changed_messages: set[str] = field(default_factory=set)

    def touch(self, key: SortKey) -> None:
        if self.earliest is None or key < self.earliest:
            self.earliest = key

    def to_dict(self) -> dict:
        return {"earliest": list(self.earliest) if self.earliest else None, "full": self.full,
                "removed": sorted(self.removed_messages), "changed": sorted(self.changed_messages)}

    @classmethod
    def from_dict(cls, data: dict) -> "PendingChange":
        earliest = tuple(data["earliest"]) if data.get("earliest") else None
        return cls(earliest, bool(data.get("full")), set(data.get("removed", ())), set(data.get("changed", ())))

    @classmethod
    def merge(cls, older: dict, newer: dict) -> dict:
        """Two pending changes of one conversation as one; the newer wins on each message."""
        a, b = cls.from_dict(older), cls.from_dict(newer)
        if b.earliest is not None:
            a.touch(b.earliest)
        a.full = a.full or b.full
        a.changed_messages = (a.changed_messages - b.removed_messages) | b.changed_messages
        a.removed_messages = (a.removed_messages - b.changed_messages) | b.removed_messages
        return a.to_dict()


def fold_conversation(state: ConversationState, conv: ConversationKey, events: list[MessageEvent],
                      report: IngestReport) -> PendingChange:
    """Fold one conversation's events into its stored rows: three reads, then the writes in bulk."""
    change = PendingChange()
    meta = state.conversation(*conv)
    listed, list_stamp = (meta.participants, meta.participants_stamp) if meta else (None, None)
    for e in events:
        if e.participants is not None and (list_stamp is None or (e.version, e.event_id) > list_stamp):
            listed, list_stamp = sorted(set(e.participants)), (e.version, e.event_id)
    if meta is None or list_stamp != meta.participants_stamp:
        state.set_participants(*conv, listed, list_stamp)
        # Visibility is part of every unit's payload: rewrite the whole conversation.
        change.full = meta is not None and listed != meta.participants
    erased = meta.erased_before if meta else None
    message_ids = list(dict.fromkeys(e.message_id for e in events))
    stored = state.stored_turns(*conv, message_ids)
    dead = state.tombstones(*conv, message_ids)
    current = dict(stored)
    new_tombstones: dict[str, Stamp] = {}
    for e in events:
        stamp = (e.version, e.event_id)
        if e.message_id in dead or (erased is not None and e.sent_at.timestamp() <= erased):
            report.unchanged += 1
            continue
        if e.op == "delete":
            dead.add(e.message_id)
            new_tombstones[e.message_id] = stamp
            if current.pop(e.message_id, None) is None:
                report.unchanged += 1
            else:
                report.deleted += 1
            continue
        previous = current.get(e.message_id)
        if previous is not None and previous[0] >= stamp:
            if previous[0] == stamp:
                report.unchanged += 1
            else:
                report.stale += 1
            continue
        turn = turn_of_event(e)
        if previous is not None and previous[1] == turn:
            # The same content under a newer stamp (a re-sent edit): the stamp moves, the vectors stay.
            turn = dataclasses.replace(turn, vector=previous[1].vector, image_vector=previous[1].image_vector)
            report.unchanged += 1
        else:
            report.upserted += 1
        current[e.message_id] = (stamp, turn, e.reply_to)
    removed = [m for m in stored if m not in current]
    written = [m for m in current if m not in stored or current[m][0] != stored[m][0]]
    state.put_tombstones(*conv, sorted(new_tombstones.items()))
    state.delete_turns(*conv, removed)
    state.put_turns(*conv, [(current[m][1], current[m][2], current[m][0]) for m in written])
    for m in removed:
        change.touch(sort_key(stored[m][1]))
        change.removed_messages.add(m)
    for m in written:
        turn = current[m][1]
        if m in stored and stored[m][1] == turn:
            continue
        change.touch(sort_key(turn))
        if m in stored:
            change.touch(sort_key(stored[m][1]))
        change.changed_messages.add(m)
    return change
