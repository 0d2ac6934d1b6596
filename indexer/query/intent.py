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
