"""Clarifying questions: ambiguous candidates yield options; the answer narrows the search."""

from datetime import datetime, timezone

from indexer.query.clarify import SpanView, clarify
from tests.conftest import message, query


def view(conv, score, people=("Ann",), month=5, captions=(), text="we hiked"):
    return SpanView(conv, datetime(2023, month, 3, tzinfo=timezone.utc), score, tuple(people), tuple(captions), text)


def test_clear_winner_is_not_questioned():
    assert clarify("hike", [view("c1", 1.0), view("c2", 0.5, people=("Bob",))]) is None


def test_people_then_dates_then_images():
    people = clarify("hike", [view("c1", 1.0, people=("Ann", "Bob")), view("c2", 0.97, people=("Ann", "Cem"))])
    assert people.facet == "people" and people.options == ("with Ann and Bob", "with Ann and Cem")
    months = clarify("hike", [view("c1", 1.0), view("c1", 0.97, month=7), view("c1", 0.96, month=5)])
    assert months.facet == "month" and months.options == ("in May 2023", "in July 2023")
    images = clarify("hike", [view("c1", 1.0, captions=("a lake",)), view("c1", 0.99, captions=("a glacier",))])
    assert images.facet == "image" and set(images.options) == {"the photo of a lake", "the photo of a glacier"}


def test_a_question_is_asked_only_when_the_runner_up_is_within_the_ask_ratio():
    """Candidates within CLOSE_RATIO give the options, but a clear enough lead is answered, not questioned."""
    from indexer.query.clarify import ASK_RATIO, CLOSE_RATIO

    assert CLOSE_RATIO < ASK_RATIO < 1
    behind = (ASK_RATIO + CLOSE_RATIO) / 2
    views = [view("c1", 1.0, people=("Bob",)), view("c2", behind, people=("Cem",))]
    assert clarify("hike", views) is None
    assert clarify("hike", views, ask_ratio=CLOSE_RATIO).options == ("with Bob", "with Cem")
    close = [view("c1", 1.0, people=("Bob",)), view("c2", ASK_RATIO, people=("Cem",)), view("c3", behind, people=("Dan",))]
    assert clarify("hike", close).options == ("with Bob", "with Cem", "with Dan")


def test_at_most_five_options():
    views = [view("c1", 1.0 - i * 0.001, month=1 + i) for i in range(5)] + [view("c1", 0.99, month=9)]
    found = clarify("hike", views)
    assert 2 <= len(found.options) <= 5


#: Unrelated turns around the ambiguous one: min-max fusion needs more than two hits to grade scores.
FILLER = ["my sourdough bread finally rose", "the laptop battery swelled up", "rent is due on friday",
          "did you watch the football match", "the cat knocked over a plant", "new shoes for the wedding"]


def two_hikes():
    events = []
    for conv, sender, day in (("c1", "ann", 0), ("c2", "cem", 45)):
        base = 60 * 24 * day
        events += [message(conv, i + 1, sender, t, minutes=base + i * 90) for i, t in enumerate(FILLER)]
        events.append(message(conv, 9, sender, "we hiked up to the glacier", minutes=base + 900))
    return events


def test_engine_asks_then_the_answer_narrows(make_engine):
    engine = make_engine()
    engine.ingest(two_hikes())
    asked = query("the glacier hike", reasoning="fast")
    first = engine.query(asked)
    assert first.status == "clarify" and first.fragments
    options = first.clarifying_question.options
    assert 2 <= len(options) <= 5
    assert options == ["with Cem", "with Ann"] or options == ["with Ann", "with Cem"]
    wanted = "with Cem"
    second = engine.query(query(wanted, history=[{"role": "user", "text": asked.query},
                                                 {"role": "assistant", "text": first.clarifying_question.text}],
                                reasoning="fast"))
    assert second.status == "ok", "one round of questions per search"
    assert second.fragments[0].conversation_id == "c2"


def test_a_conversation_filter_never_asks(make_engine):
    engine = make_engine()
    engine.ingest(two_hikes())
    result = engine.query(query("the glacier hike", filters={"conversation_id": "c1"}))
    assert result.status == "ok"
