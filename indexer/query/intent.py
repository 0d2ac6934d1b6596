"""What a query asks for, read from its words: one thing, or several things said at different times; and
whether its answer is a kind of word a turn holds.

"What books has Melanie read?", "What do Jon and Gina both like?", "How many times did she go to the beach?"
ask for a list whose items were said in different places of the chat; "What did Gina design for her store?"
asks for one. A list is answered by many places (``HybridSearcher.spans``, ``several``) rather than by the
neighbours of the best one.

"When did she get the puppy?" is answered by the turn that dates it ("we got him last weekend!"), not by the
one that tells about the puppy best; "how many kids does he have?" by the one with a number
(``HybridSearcher.answers``).
"""

from __future__ import annotations

import re

#: Words that ask for a count, a common part or everything ever said.
_SEVERAL_WORDS = re.compile(r"\b(?:both|how many|in common|ever)\b")
#: The present perfect of a person's doings ("has Melanie read", "have they visited"): a sum over time, not one
#: event; "has to", "has been", "has a" and "has the" are not.
_PERFECT = re.compile(r"\b(?:has|have)\s+(?!(?:to|been|a|an|the)\b)[a-z]+\s+[a-z]+")
#: A plural noun right after the question word ("what books", "which kinds of places", "what items").
_PLURAL_WH = re.compile(r"^(?:what|which)\s+(?:(?:kinds?|types?|sorts?)\s+of\s+)?([a-z]+)\s")
#: Words after "what" that end in s without being a plural noun.
_NOT_PLURAL = frozenset({"is", "was", "does", "has", "this", "his", "its", "kinds", "types", "sorts"})


def asks_for_several(text: str) -> bool:
    """Whether the query asks for several things said at different times (see the module docstring)."""
    t = text.lower().strip()
    if _SEVERAL_WORDS.search(t) or _PERFECT.search(t):
        return True
    m = _PLURAL_WH.match(t)
    return bool(m) and m.group(1).endswith("s") and not m.group(1).endswith("ss") and m.group(1) not in _NOT_PLURAL


#: Questions whose answer is a time ("when did she...", "what year", "how long ago") or a count or length
#: ("how many", "how much", "how long", "how old", "how often").
_ASKS_TIME = re.compile(r"^\s*when\b|\bwhat (?:year|month|day|date|time)\b|\bhow long ago\b")
_ASKS_COUNT = re.compile(r"\bhow (?:many|much|long|old|often)\b")
#: Months, "may" only where it is one ("in may", "may 5"), not the verb ("may I ask").
_MONTHS = ("january|february|march|april|june|july|august|september|october|november|december"
           r"|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|(?:in|since|until|of|early|mid|late|last|next|this) may"
           r"|may \d")
#: A turn that dates something: a month or weekday, a day relative to now ("yesterday", "last week", "two weeks
#: ago", "this morning"), a year, a date written with digits.
_TIME_WORDS = re.compile(
    rf"\b(?:{_MONTHS}|monday|tuesday|wednesday|thursday|friday|saturday|sunday|weekend|yesterday|today|tonight"
    r"|tomorrow|tmrw|ago|(?:last|next|this|past) (?:night|week|month|year|summer|winter|spring|fall|autumn|morning"
    r"|evening|time)|(?:19|20)\d\d|\d{1,2}/\d{1,2}(?:/\d{2,4})?)\b", re.IGNORECASE)
#: A turn that counts or measures: a number in digits or words.
_COUNT_WORDS = re.compile(
    r"\b(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|fifty"
    r"|hundred|thousand|dozen|couple|few|several|once|twice)\b", re.IGNORECASE)


def answer_kind(text: str) -> str | None:
    """``time`` or ``count`` when the question's answer is a word of that kind, else None."""
    t = text.lower()
    if _ASKS_TIME.search(t):
        return "time"
    if _ASKS_COUNT.search(t):
        return "count"
    return None


def holds_answer(kind: str | None, text: str) -> bool:
    """Whether a turn's text holds a word of the kind ``answer_kind`` found: a time or a number."""
    if kind == "time":
        return bool(_TIME_WORDS.search(text))
    if kind == "count":
        return bool(_COUNT_WORDS.search(text))
    return False


#: A sentence of a turn: up to its end mark and the spaces after it.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: Words of a query about something asked in the chat ("when did Bob ask about the tickets?").
_ABOUT_ASKING = re.compile(r"\b(?:ask(?:s|ed|ing)?|questions?|wonder(?:s|ed|ing)?|inquir\w*|enquir\w*)\b")
#: An aside of at most this many words ("Wow, Caroline!") does not make a question a statement.
ASIDE_WORDS = 3


def only_asks(text: str) -> bool:
    """Whether a turn's words (its text without the speaker, as ``render_turn`` writes it) only ask: every sentence
    a question or a short aside (an image's caption ends the rendered text, so a turn with one tells). Such a turn
    is what someone wanted to know, not what was said about it: 2 of the dev split's 335 evidence turns are one, of
    68 such turns among its 1,451."""
    t = text.strip()
    if not t.endswith("?"):
        return False
    return all(s.endswith("?") or len(s.split()) <= ASIDE_WORDS for s in _SENTENCE_END.split(t))


def asks_about_asking(text: str) -> bool:
    """Whether the query looks for something asked ("what did Anna ask about the flat?"): then a turn that only
    asks may be the answer itself."""
    return bool(_ABOUT_ASKING.search(text.lower()))
