"""LoCoMo-format conversations as Tessera message events and "find that conversation" questions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from schemas import MESSAGE_SCHEMA, MessageEvent

TENANT = "locomo"
#: LoCoMo sessions carry one time stamp; turns inside a session are spaced this far apart.
TURN_SPACING = timedelta(seconds=30)
SKIPPED_CATEGORY = 5


@dataclass(frozen=True)
class Question:
    conversation_id: str
    text: str
    evidence: frozenset[str]
    category: int


@dataclass(frozen=True)
class LocomoTurn:
    conversation_id: str
    session: int
    message_id: str
    speaker: str
    text: str
    caption: str | None
    sent_at: datetime


def parse_session_time(value: str) -> datetime:
    return datetime.strptime(value.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=timezone.utc)


def load(directory: str | Path) -> tuple[list[LocomoTurn], list[Question]]:
    turns: list[LocomoTurn] = []
    questions: list[Question] = []
    for path in sorted(Path(directory).glob("*.json")):
        data = json.loads(path.read_text())
        conversation_id = path.stem
        ids = set()
        n = 1
        while f"session_{n}" in data:
            start = parse_session_time(data[f"session_{n}_date_time"])
            for k, t in enumerate(data[f"session_{n}"]):
                caption = t.get("blip_caption") if t.get("img_url") else None
                turns.append(LocomoTurn(conversation_id, n, t["dia_id"], t["speaker"], t.get("text", ""), caption,
                                        start + k * TURN_SPACING))
                ids.add(t["dia_id"])
            n += 1
        for qa in data.get("qa", []):
            if qa.get("category") == SKIPPED_CATEGORY:
                continue
            evidence = {e.strip() for item in qa.get("evidence", []) for e in str(item).split(";")} & ids
            if evidence:
                questions.append(Question(conversation_id, qa["question"], frozenset(evidence), int(qa["category"])))
    return turns, questions


def into_one_conversation(turns: list[LocomoTurn], questions: list[Question],
                          conversation_id: str = "all") -> tuple[list[LocomoTurn], list[Question]]:
    """The long-chat stress: every conversation's sessions as one conversation, in time order.

    The three dev conversations make one chat of 1,451 turns among six people, their sessions
    interleaved by date (as a group chat's threads are); message ids keep their conversation
    (``26:D1:3``) and the questions point at them, so the same questions score the same evidence.
    """
    merged = sorted((LocomoTurn(conversation_id, t.session, f"{t.conversation_id}:{t.message_id}", t.speaker, t.text,
                                t.caption, t.sent_at) for t in turns), key=lambda t: (t.sent_at, t.message_id))
    asked = [Question(conversation_id, q.text, frozenset(f"{q.conversation_id}:{e}" for e in q.evidence), q.category)
             for q in questions]
    return merged, asked


def to_events(turns: list[LocomoTurn]) -> list[MessageEvent]:
    events = []
    for t in turns:
        images = [{"uri": f"https://locomo.invalid/{t.conversation_id}/{t.message_id}.jpg", "caption": t.caption}] \
            if t.caption else []
        events.append(MessageEvent.model_validate({
            "schema": MESSAGE_SCHEMA, "event_id": f"{t.conversation_id}:{t.message_id}", "tenant_id": TENANT,
            "conversation_id": t.conversation_id, "message_id": t.message_id,
            "sender_id": t.speaker.lower().replace(" ", "_"), "sender_name": t.speaker,
            "sent_at": t.sent_at.isoformat(), "text": t.text, "images": images,
        }))
    return events
