"""How turns become indexed text, and the tokenisation the search side shares with it."""

from __future__ import annotations

import re

from indexer.model import Turn

_WORD = re.compile(r"[^\W_]+", re.UNICODE)

#: Function words dropped from keyword queries: they carry no topic and make OR-queries slow.
STOPWORDS = frozenset(
    """a an the of to in on at for and or but is are was were be been being do does did done what
    when where who whom whose which why how i you he she it we they me him her us them his hers its
    our their my your this that these those with from by about as into has have had not no yes
    would could should will shall can may might must than then there here any some all just so
    very too also s t d ll m re ve""".split()
)


def render_turn(turn: Turn) -> str:
    """The text indexed for a turn: speaker, words, and each image through its caption.

    The speaker's name is part of the text because people search by who said it ("what did
    Anna say about ..."), and across conversations names are the strongest discriminator.
    """
    speaker = turn.sender_name or turn.sender_id
    parts = [f"{speaker}: {turn.text}".rstrip()]
    for image in turn.images:
        parts.append(f"[image: {image.caption}]" if image.caption else "[image]")
    return " ".join(parts)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def keywords(text: str) -> list[str]:
    """Distinct content words of a query, in order; falls back to all words for all-stopword text."""
    all_words = words(text)
    content = [w for w in all_words if w not in STOPWORDS] or all_words
    return list(dict.fromkeys(content))


def name_tokens(name: str | None) -> set[str]:
    return {w for w in words(name or "") if len(w) > 1}


def snippet(text: str, limit: int = 280) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
