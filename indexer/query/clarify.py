"""Clarifying questions (after Mario / ClariMM): ask when the best candidates are too close to call.

When several top candidates score within ``CLOSE_RATIO`` of the best and differ on a facet the user
can recognise, the result asks which one is meant and offers 2-5 options built from that facet,
tried in this order: the people in the conversation, the date, the image shared, a key phrase. Each
option is written so that, sent back as the next history turn, it narrows the search by itself: a
date becomes a time filter ("in May 2023"), a name earns the speaker bonus, a caption or phrase adds
the words that tell the candidates apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Sequence

from indexer.text import STOPWORDS, words

#: Candidates within this share of the best score count as "too close to call" (and give the options).
CLOSE_RATIO = 0.9
#: A question is asked only when the runner-up is within this share of the best: the closer the two,
#: the likelier the first answer is the wrong one and an answer to the question pays for the round.
#: Chosen by ``tessera eval dialogue`` on the default stores: the loosest threshold that asks at most 20%
#: of the dev questions (19.1% for +0.0225 MRR; 0.95 asked 24.0%); leave-one-conversation-out chose 0.96 in
#: each fold, held out 19.1% asked for +0.0225.
ASK_RATIO = 0.96
#: How many of the top candidates are looked at.
CONSIDER = 5
MIN_OPTIONS, MAX_OPTIONS = 2, 5


@dataclass(frozen=True)
class SpanView:
    """What the user could recognise about one candidate."""

    conversation_id: str
    start_at: datetime
    score: float
    people: tuple[str, ...]
    captions: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Clarification:
    facet: str
    text: str
    options: tuple[str, ...]


def _people(view: SpanView, _: Sequence[SpanView], __: set[str]) -> str | None:
    if not view.people:
        return None
    names = sorted(view.people)
    return "with " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])


def _month(view: SpanView, _: Sequence[SpanView], __: set[str]) -> str | None:
    return f"in {view.start_at:%B %Y}"


def _day(view: SpanView, _: Sequence[SpanView], __: set[str]) -> str | None:
    return f"on {view.start_at.day} {view.start_at:%B %Y}"


def _caption(view: SpanView, _: Sequence[SpanView], __: set[str]) -> str | None:
    return f"the photo of {view.captions[0]}" if view.captions else None


def _phrase(view: SpanView, close: Sequence[SpanView], query_words: set[str]) -> str | None:
    """The most frequent content word of this candidate that no other close candidate uses."""
    others: set[str] = set()
    for other in close:
        if other is not view:
            others.update(words(other.text))
    counts = Counter(w for w in words(view.text) if len(w) > 3 and w not in STOPWORDS and w not in query_words
                     and w not in others and not w.isdigit())
    if not counts:
        return None
    return f"about {counts.most_common(1)[0][0]}"


#: (facet, question, label of a candidate), in the order they are tried.
FACETS: tuple[tuple[str, str, Callable], ...] = (
    ("people", "Which conversation do you mean?", _people),
    ("month", "When was it?", _month),
    ("day", "Which day was it?", _day),
    ("image", "Which picture was it?", _caption),
    ("phrase", "Which one is it?", _phrase),
)


def clarify(query: str, views: Sequence[SpanView], ask_ratio: float = ASK_RATIO) -> Clarification | None:
    """A question with options when the top candidates (best first) are ambiguous, else None."""
    if len(views) < MIN_OPTIONS or views[0].score <= 0 or views[1].score < ask_ratio * views[0].score:
        return None
    best = views[0].score
    close = [v for v in views[:CONSIDER] if v.score >= CLOSE_RATIO * best]
    if len(close) < MIN_OPTIONS:
        return None
    query_words = set(words(query))
    for facet, question, label in FACETS:
        labels = [label(v, close, query_words) for v in close]
        if any(lab is None for lab in labels):
            continue
        options = list(dict.fromkeys(labels))
        # An option the query already states tells nothing new ("with Anna" when Anna is named).
        if any(set(words(o)) - {"with", "and", "in", "on", "about", "the", "photo", "of"} <= query_words for o in options):
            continue
        if MIN_OPTIONS <= len(options):
            return Clarification(facet, question, tuple(options[:MAX_OPTIONS]))
    return None


def answered_clarification(history_roles: Sequence[str]) -> bool:
    """True when the job already went through a clarifying round (one round per search)."""
    return "assistant" in history_roles
