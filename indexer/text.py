"""How turns become indexed text, and the tokenisation the search side shares with it."""

from __future__ import annotations

import functools
import re
import unicodedata

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
    """The text indexed for a turn: speaker, words, and each image through its caption and the words it shows.

    The speaker's name is part of the text because people search by who said it ("what did
    Anna say about ..."), and across conversations names are the strongest discriminator.
    """
    speaker = turn.sender_name or turn.sender_id
    parts = [f"{speaker}: {turn.text}".rstrip()]
    for image in turn.images:
        parts.append(f"[image: {image.caption}]" if image.caption else "[image]")
        if image.text:
            parts.append(f"[image text: {image.text}]")
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


#: Chat shorthand and the words people search with. The shorthand stays beside its expansion, so
#: an exact search for it still matches.
SHORTHAND = {
    "pls": "please", "plz": "please", "thx": "thanks", "ty": "thanks", "tmrw": "tomorrow", "tmr": "tomorrow",
    "2moro": "tomorrow", "2day": "today", "tonite": "tonight", "nite": "night", "b4": "before", "gr8": "great",
    "bday": "birthday", "xmas": "christmas", "congrats": "congratulations", "pic": "picture photo",
    "pics": "pictures photos", "vid": "video", "vids": "videos", "msg": "message", "convo": "conversation",
    "ppl": "people", "bc": "because", "cuz": "because", "coz": "because", "bf": "boyfriend", "gf": "girlfriend",
    "bro": "brother", "sis": "sister", "fav": "favorite", "fave": "favorite", "vacay": "vacation",
    "appt": "appointment", "hw": "homework", "luv": "love", "gonna": "going", "wanna": "want", "gotta": "got",
    "u": "you", "ur": "your", "r": "are", "ya": "you", "yep": "yes", "yup": "yes", "yeah": "yes", "nope": "no",
    "kk": "ok", "k": "ok", "omg": "oh my god", "lol": "laughing", "lmao": "laughing", "rofl": "laughing",
    "btw": "by the way", "idk": "i don't know", "imo": "in my opinion", "nvm": "never mind", "bbq": "barbecue",
}
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]", re.UNICODE)
_RUN = re.compile(r"(\w)\1{2,}")
_LAUGH = re.compile(r"^(?:ha|he|hi|ja|xa){2,}h?$|^a?(?:ha){2,}$")
_BRITISH = re.compile(r"^(\w{3,})our(\w*)$")
#: Words of emoji names that say nothing alone ("face with tears of joy").
_NAME_FILLER = frozenset({"with", "of", "and", "sign", "symbol", "variation", "selector", "emoji", "modifier"})


def chat_text(text: str) -> str:
    """Text as keyword search should see it in chats: elongations, shorthand, emoji and British
    spellings also written the way a searcher types them.

    Variants are added beside what was written, never instead ("sooo" keeps its token and gains
    "so" and "soo"; which one is the word depends on the word, and no dictionary is at hand), and
    the same function runs on the indexed text and on the query, so both meet on the same tokens.
    """
    out: list[str] = []
    for token in _TOKEN.findall(text):
        out += _token_words(token)
    return " ".join(out)


@functools.lru_cache(maxsize=1 << 16)
def _token_words(token: str) -> tuple[str, ...]:
    """A token and its variants. Cached: chats repeat a small vocabulary, and a turn's words are seen again
    in its window and fragment (the keyword text of 10k fragments took 13 of 87 s of the build uncached)."""
    if len(token) == 1 and not token.isalnum():
        return tuple(_emoji_words(token))
    out = [token]
    lower = token.lower()
    if _RUN.search(lower):
        out += [_RUN.sub(r"\1", lower), _RUN.sub(r"\1\1", lower)]
    if _LAUGH.match(lower):
        out.append("laughing")
    if lower in SHORTHAND:
        out.append(SHORTHAND[lower])
    british = _BRITISH.match(lower)
    if british:
        out.append(f"{british.group(1)}or{british.group(2)}")
    return tuple(out)


def _emoji_words(char: str) -> list[str]:
    """The words of a pictograph's Unicode name (U+1F382 "birthday cake"); other punctuation says nothing."""
    if unicodedata.category(char) != "So":
        return []
    return [w for w in unicodedata.name(char, "").lower().replace("-", " ").split() if w not in _NAME_FILLER]
