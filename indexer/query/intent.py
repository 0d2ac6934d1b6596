"""What a query asks for, read from its words: one thing, or several things said at different times.

"What books has Melanie read?", "What do Jon and Gina both like?", "How many times did she go to the beach?"
ask for a list whose items were said in different places of the chat; "What did Gina design for her store?"
asks for one. A list is answered by many places (``HybridSearcher.spans``, ``several``) rather than by the
neighbours of the best one.
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
