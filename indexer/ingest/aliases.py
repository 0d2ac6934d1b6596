"""Names people call each other inside messages ("thanks Mel!", "hey bobby,"), linked to senders.

People search by the name they use ("what did mel say about the trip"), which is often not the
sender's display name ("Melanie Jones"). A vocative (a name said to someone: after a greeting or
thanks, or after a comma at the end of a sentence) names the person the turn answers: the
sender of the nearest earlier turn of the fragment by someone else (or, for the fragment's first
words, the next one). Aliases are derived per fragment from its members alone, so they are the same
whatever order the events came in, and they leave with their fragment (an edit, a delete, "forget
me" re-segments it). The search side trusts an alias heard in several fragments (``state.sql.MIN_ALIAS_FRAGMENTS``).
"""

from __future__ import annotations

import re
from typing import Sequence

from indexer.model import Turn
from indexer.text import STOPWORDS, name_tokens

#: Words said before a name: after these a name may be typed in lower case ("thx mom") ...
_GREETING = (r"hey+|hi+|hello+|hiya|heya|yo|thanks|thank you|thx|ty|congrats|congratulations|sorry|morning|"
             r"good morning|good night|goodnight|night|bye|love you|miss you|welcome|dear")
#: ... after these only a capitalised one counts ("Nice, Bobby!", not "yeah, right").
_INTERJECTION = r"wow|oh|omg|aw+|nice|great|awesome|cool|yeah|yes|yep|ok|okay|haha|lol|so|well|sure"
_NAME = r"([^\W\d_][^\W\d_'’-]{1,19})"
#: "Hey Mel!", "Thanks, Melanie.", "wow, Mel, ..." at the start of a sentence.
_OPENING = re.compile(rf"^\W*((?:(?:{_GREETING}|{_INTERJECTION})[\s,!.]+)+){_NAME}(?=\s*[,!.?;:)]|\s*$)",
                      re.IGNORECASE)
_STRONG = re.compile(rf"\b(?:{_GREETING})\b", re.IGNORECASE)
#: "see you soon, Mel!": a capitalised word after a comma ends the sentence. (One that starts it, "Mel, you
#: won't believe it", is not taken: on the dev chats that form was "Definitely, ...", "Together, ..." 9 times in 10.)
_TRAILING = re.compile(rf",\s*{_NAME}\s*[!.?]*\W*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: Words said to people that are not their names.
_NOT_NAMES = STOPWORDS | frozenset(
    """guys guy man dude bro buddy all everyone everybody folks team friend friends mate pal girl girls boys
    yall y'all there again much lot both too now ok okay yeah yep yes no sure great awesome cool nice good
    well hey hi hello thanks thank congrats wow oh omg lol haha sorry anyway btw though""".split())


def vocatives(text: str) -> list[str]:
    """The names a turn says to someone, lowercased as the name lookup stores them."""
    found = []
    for sentence in _SENTENCE_END.split(text.strip()):
        match = _OPENING.search(sentence)
        if match and (match.group(2)[0].isupper() or _STRONG.search(match.group(1))):
            found.append(match.group(2))
        match = _TRAILING.search(sentence)
        if match and match.group(1)[0].isupper():
            found.append(match.group(1))
    names = []
    for name in found:
        tokens = name_tokens(name)
        if len(tokens) == 1 and not tokens & _NOT_NAMES:
            names.extend(tokens)
    return list(dict.fromkeys(names))


def fragment_aliases(members: Sequence[Turn]) -> list[tuple[str, str]]:
    """(alias, sender_id) pairs the fragment's turns say; never a sender's alias from their own turn."""
    pairs: set[tuple[str, str]] = set()
    for i, turn in enumerate(members):
        names = vocatives(turn.text)
        if not names:
            continue
        addressee = next((t.sender_id for t in reversed(members[:i]) if t.sender_id != turn.sender_id), None) \
            or next((t.sender_id for t in members[i + 1:] if t.sender_id != turn.sender_id), None)
        if addressee is None:
            continue
        own = name_tokens(turn.sender_name)
        pairs.update((name, addressee) for name in names if name not in own)
    return sorted(pairs)
