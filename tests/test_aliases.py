"""Names said to people inside messages become aliases of the sender they answer."""

from datetime import datetime, timedelta, timezone

import pytest

from indexer.ingest.aliases import fragment_aliases, vocatives
from indexer.model import Turn
from tests.conftest import message, query

T = datetime(2026, 5, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, names", [
    ("Hey Mel! Long time no talk.", ["mel"]),
    ("Wow, Mel, family love and support is the best!", ["mel"]),
    ("Thanks, Melanie. It has changed them.", ["melanie"]),
    ("thx mom!!", ["mom"]),
    ("Mel, you won't believe what happened", []),
    ("Definitely, I will go", []),
    ("see you soon, Bobby!", ["bobby"]),
    ("hey guys, what's up", []),
    ("Hi there!", []),
    ("Yeah, I'm really lucky", []),
    ("thanks so much!", []),
    ("hey, how are you", []),
    ("I went to the market with Mel yesterday", []),
    ("Loud. Thanks Annie!", ["annie"]),
    ("Nice, Bobby! How was it?", ["bobby"]),
    ("yeah, right.", []),
])
def test_vocatives(text, names):
    assert vocatives(text) == names


def _turn(n: int, sender: str, name: str, text: str) -> Turn:
    return Turn(f"m{n}", sender, T + timedelta(minutes=n), text, name)


def test_a_vocative_names_the_person_the_turn_answers_never_the_speaker():
    members = [_turn(1, "bob", "Robert Smith", "Made it to the concert!"),
               _turn(2, "ann", "Ann", "Nice, Bobby! How was it?"),
               _turn(3, "bob", "Robert Smith", "Loud. Thanks Annie!"),
               _turn(4, "ann", "Ann", "Hey Ann, that's me talking to myself")]
    assert fragment_aliases(members) == [("annie", "ann"), ("bobby", "bob")]
    opener = [_turn(1, "ann", "Ann", "Hey Bobby, are you up?"), _turn(2, "bob", "Robert Smith", "yes")]
    assert fragment_aliases(opener) == [("bobby", "bob")], "the first turn speaks to the one who answers"
    assert fragment_aliases([_turn(1, "ann", "Ann", "Hey Bobby!")]) == [], "nobody else in the fragment"


def test_a_nickname_in_the_query_finds_what_that_sender_said(make_engine):
    """Bob's display name is "Robert Smith"; the others call him Bobby. "what did bobby say about the
    concert" must put Bob's concert turn before Ann's, which the words alone rank first."""
    engine = make_engine()
    events = []
    for c in range(3):
        hours = c * 24 * 60
        events += [message(f"c{c}", 1, "ann", f"Hey Bobby, how was your week {c}?", minutes=hours),
                   message(f"c{c}", 2, "bob", "Good, thanks. Busy with work.", minutes=hours + 1)]
    events += [message("c9", 1, "ann", "The concert was so loud, the band played the concert hall till midnight",
                       minutes=10_000),
               message("c9", 2, "bob", "the concert was ok I guess", minutes=10_001)]
    engine.ingest([e.model_copy(update={"sender_name": "Robert Smith"}) if e.sender_id == "bob" else e
                   for e in events])
    assert "bob" in engine.state.senders_named("t1", ["bobby"])
    first = engine.query(query("what did bobby say about the concert")).fragments[0]
    assert first.message_ids[0] == "m002" and first.conversation_id == "c9"
