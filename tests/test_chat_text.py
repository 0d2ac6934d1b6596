"""Keyword search over chat text as people write it: elongations, shorthand, emoji, British spelling."""

import pytest

from indexer.model import SearchFilter
from indexer.text import chat_text, words
from tests.conftest import message, query


@pytest.mark.parametrize("written, searched", [
    ("sooooo goooood", "so good"),
    ("yessss!!!", "yes"),
    ("happy bday!!", "birthday"),
    ("pls send the pics tmrw", "please pictures tomorrow"),
    ("🎂🎉", "birthday cake"),
    ("that made me 😂", "tears of joy"),
    ("my favourite colour", "favorite color"),
    ("hahahaha", "laughing"),
])
def test_what_was_written_meets_what_is_searched(written, searched):
    indexed = set(words(chat_text(written)))
    assert set(words(chat_text(searched))) & indexed >= set(words(searched)) - {"of"}


def test_variants_are_added_beside_the_words_written():
    out = words(chat_text("Sooo, Ann: pic of the café ☕"))
    assert out[:3] == ["sooo", "so", "soo"] and "ann" in out and "pic" in out and "picture" in out
    assert "café" in out and {"hot", "beverage"} <= set(out)
    assert chat_text("") == "" and chat_text("plain words stay") == "plain words stay"


def test_bm25_finds_a_turn_written_in_chat_shorthand(make_engine):
    """The keyword list alone (the dense ones may guess): "birthday cake" shares no written word with
    the turn, only its shorthand and emoji do; and the turn is the engine's first answer."""
    engine = make_engine()
    engine.ingest([
        message("c1", 1, "ann", "omg happy bday!!! 🎂🎉 sooo proud of u"),
        message("c1", 2, "bob", "Thanks, the party starts at eight."),
        message("c1", 3, "ann", "Did you fix the bike brakes yet?"),
        message("c1", 4, "bob", "Not yet, the shop is closed on Sundays."),
    ])
    hybrid = engine.searcher.hybrid
    lists = hybrid.recall("birthday cake", None, SearchFilter("t1", "u1"))
    assert [h.payload["message_ids"][0] for h in lists[("bm25", "turn")]][:1] == ["m001"]
    assert engine.query(query("birthday cake so proud")).fragments[0].message_ids[0] == "m001"
