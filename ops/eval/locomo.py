"""LoCoMo-format conversations as Tessera message events and "find that conversation" questions."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
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
    #: An image file the turn sends (``into_screenshots``); LoCoMo's own photos are not here, only their captions.
    image_uri: str | None = None


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


#: Casual spellings of the messy-chat stress, whole words or phrases, lower case.
CASUAL = {"you": "u", "are": "r", "because": "bc", "really": "rly", "okay": "ok", "tonight": "tonite",
          "please": "pls", "thanks": "thx", "thank you": "ty", "people": "ppl", "going to": "gonna",
          "want to": "wanna", "great": "gr8", "love": "luv", "to be honest": "tbh", "by the way": "btw",
          "so": "sooo", "yes": "yesss", "see you": "cu"}
#: Replies between turns of the messy-chat stress: words that answer nothing.
REACTIONS = ("lol", "omg", "nice!!", "haha yes", "wow", "ikr", "aww", "ok!", "\U0001F602\U0001F602", "yesss",
             "no way", "\U0001F44D")
#: Joins a turn's id and the number of its piece (``D1:3+0``); a reaction is ``r.D1:3``.
PIECE = "+"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LETTERS = re.compile(r"[a-z]+")


def casual(text: str) -> str:
    """Lower case, no apostrophes, chat spellings (``CASUAL``), phrases before their words."""
    out = text.lower().replace("'", "").replace("\u2019", "")
    for word, spelled in sorted(CASUAL.items(), key=lambda item: -len(item[0])):
        out = re.sub(rf"\b{re.escape(word)}\b", spelled, out)
    return out


def misspell(text: str, share: float, rnd: random.Random) -> str:
    """One slip of the finger (two letters swapped, one dropped or one doubled, never the first) in about
    ``share`` of the words of four letters or more."""
    def slip(match: re.Match) -> str:
        word = match.group(0)
        if len(word) < 4 or rnd.random() >= share:
            return word
        i, op = rnd.randrange(1, len(word) - 1), rnd.randrange(3)
        if op == 0 and word[i] != word[i + 1]:
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if op == 2:
            return word[:i] + word[i] + word[i:]
        return word[:i] + word[i + 1:]
    return _LETTERS.sub(slip, text)


def into_messy_chat(turns: list[LocomoTurn], reaction_share: float = 0.35,
                    seed: int = 5, typo_share: float = 0.0) -> list[LocomoTurn]:
    """The messy-chat stress: each turn sent as one message a sentence (``D1:3+0``, ``D1:3+1``, a second
    apart, the image with the last), in casual spelling, and after about a third of the turns a reaction
    by the other person ("lol", "nice!!": ``r.D1:3``). Questions stay as written; a piece answers for its
    turn (``turn_of``). ``typo_share``: that share of the longer words misspelt (``misspell``), drawn apart
    from the reactions, so the messages are the same with and without typos."""
    rnd = random.Random(seed)
    typos = random.Random(seed + 1)
    speakers: dict[str, list[str]] = {}
    for t in turns:
        people = speakers.setdefault(t.conversation_id, [])
        if t.speaker not in people:
            people.append(t.speaker)
    out = []
    for t in turns:
        pieces = [p for p in _SENTENCE_END.split(t.text) if p.strip()] or [t.text]
        for k, piece in enumerate(pieces):
            out.append(replace(t, message_id=f"{t.message_id}{PIECE}{k}", text=misspell(casual(piece), typo_share, typos),
                               caption=t.caption if k == len(pieces) - 1 else None,
                               sent_at=t.sent_at + timedelta(seconds=k)))
        if rnd.random() < reaction_share:
            other = next((s for s in speakers[t.conversation_id] if s != t.speaker), t.speaker)
            out.append(replace(t, message_id=f"r.{t.message_id}", speaker=other, text=rnd.choice(REACTIONS),
                               caption=None, sent_at=t.sent_at + TURN_SPACING / 2))
    return out


#: What a person types beside a screenshot (``into_screenshots``).
SCREENSHOT_WORDS = ("see this", "look", "screenshot", "this one", "ha", "here")


def into_screenshots(turns: list[LocomoTurn], questions: list[Question], share: float, directory: Path,
                     seed: int = 5) -> tuple[list[LocomoTurn], set[tuple[str, str]]]:
    """The screenshot stress: ``share`` of the turns that are a question's only evidence are sent as a picture of
    their text (a PNG under ``directory``, no caption) with a few words of their own ("see this"), so that only the
    words read off the image (``TESSERA_OCR``) say what the turn said. Returns the turns and the (conversation,
    message) of the screenshots."""
    import textwrap

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    single = sorted({(q.conversation_id, next(iter(q.evidence))) for q in questions if len(q.evidence) == 1})
    chosen = set(rnd.sample(single, round(len(single) * min(max(share, 0.0), 1.0))))
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for t in turns:
        if (t.conversation_id, t.message_id) in chosen:
            lines = textwrap.wrap(t.text, 48) or [""]
            image = Image.new("RGB", (640, 24 + 34 * len(lines)), "white")
            draw = ImageDraw.Draw(image)
            for i, line in enumerate(lines):
                draw.text((16, 12 + 34 * i), line, fill="black", font_size=22)
            path = directory / re.sub(r"[^A-Za-z0-9._-]", "_", f"{t.conversation_id}-{t.message_id}.png")
            image.save(path)
            t = replace(t, text=rnd.choice(SCREENSHOT_WORDS), image_uri=path.resolve().as_uri())
        out.append(t)
    return out, chosen


def turn_of(message_id: str) -> str:
    """The turn a piece of the messy-chat stress came from; any other id unchanged."""
    return message_id.split(PIECE, 1)[0]


def to_events(turns: list[LocomoTurn]) -> list[MessageEvent]:
    events = []
    for t in turns:
        images = [{"uri": f"https://locomo.invalid/{t.conversation_id}/{t.message_id}.jpg", "caption": t.caption}] \
            if t.caption else []
        if t.image_uri:
            images.append({"uri": t.image_uri})
        events.append(MessageEvent.model_validate({
            "schema": MESSAGE_SCHEMA, "event_id": f"{t.conversation_id}:{t.message_id}", "tenant_id": TENANT,
            "conversation_id": t.conversation_id, "message_id": t.message_id,
            "sender_id": t.speaker.lower().replace(" ", "_"), "sender_name": t.speaker,
            "sent_at": t.sent_at.isoformat(), "text": t.text, "images": images,
        }))
    return events
