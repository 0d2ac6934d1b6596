"""Time expressions become filters; the engine applies them inside the stores."""

from datetime import datetime, timedelta, timezone

import pytest

from indexer.query.timeparse import MAX_GRACE, MIN_GRACE, parse



def told(start, end):
    """The end of a range plus the time people take to talk about it (as long as the range, 7-31 days)."""
    return end + min(MAX_GRACE, max(MIN_GRACE, end - start))
from tests.conftest import T0, message, query

NOW = datetime(2023, 10, 20, 12, 0, tzinfo=timezone.utc)


def d(*args):
    return datetime(*args, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, after, before, rest", [
    ("when did Melanie go camping in June?", d(2023, 6, 1), told(d(2023, 6, 1), d(2023, 7, 1)), "when did Melanie go camping ?"),
    ("the trip in May 2023", d(2023, 5, 1), told(d(2023, 5, 1), d(2023, 6, 1)), "the trip"),
    ("photo of the glacier last week", d(2023, 10, 9), told(d(2023, 10, 9), d(2023, 10, 16)), "photo of the glacier"),
    ("what Anna said yesterday", d(2023, 10, 19), told(d(2023, 10, 19), d(2023, 10, 20)), "what Anna said"),
    ("the party on 8 May 2023", d(2023, 5, 8), told(d(2023, 5, 8), d(2023, 5, 9)), "the party"),
    ("May 8, 2023 at the party", d(2023, 5, 8), told(d(2023, 5, 8), d(2023, 5, 9)), "at the party"),
    ("pride parade during the summer", d(2023, 6, 1), told(d(2023, 6, 1), d(2023, 9, 1)), "pride parade"),
    ("hike between May 2023 and July 2023", d(2023, 5, 1), told(d(2023, 5, 1), d(2023, 8, 1)), "hike"),
    ("the concert before May 2023", None, told(d(2023, 5, 1), d(2023, 6, 1)), "the concert"),
    ("messages since March 2023 about rent", d(2023, 3, 1), None, "messages about rent"),
    ("in December", d(2022, 12, 1), told(d(2022, 12, 1), d(2023, 1, 1)), "in December"),
    # A period before or after a date is that period, not all time before it; counted back, loosely meant.
    ("what did John do the week before August 3, 2023 with his kids", d(2023, 7, 20),
     told(d(2023, 7, 20), d(2023, 8, 3)), "what did John do with his kids"),
    ("the puppy she got two weeks before August 11, 2023", d(2023, 7, 14), told(d(2023, 7, 14), d(2023, 8, 11)),
     "the puppy she got"),
    ("what Maria did last weekend before April 10, 2023", d(2023, 4, 1), told(d(2023, 4, 1), d(2023, 4, 10)),
     "what Maria did"),
    ("the weekend before 9 April 2023 hike", d(2023, 3, 25), told(d(2023, 3, 25), d(2023, 4, 3)), "hike"),
    ("the hike the day after 8 May 2023", d(2023, 5, 9), told(d(2023, 5, 9), d(2023, 5, 10)), "the hike"),
    ("a week after July 4 at the lake", d(2023, 7, 5), told(d(2023, 7, 5), d(2023, 7, 12)), "at the lake"),
    ("plans the weekend after May 2023", d(2023, 6, 3), told(d(2023, 6, 3), d(2023, 6, 5)), "plans"),
])
def test_expressions(text, after, before, rest):
    found = parse(text, NOW)
    assert (found.sent_after, found.sent_before, found.text) == (after, before, rest)


@pytest.mark.parametrize("text", ["it may rain", "I march on", "the 2023 budget spreadsheet", "photo of the glacier",
                                  "what did she paint recently", "plans for the summer"])
def test_words_that_are_not_dates_stay_words(text):
    found = parse(text, NOW)
    assert found.empty and found.text == text


def test_relative_ranges_count_from_the_job_time():
    found = parse("two weeks ago", NOW)
    assert found.sent_after < NOW - timedelta(weeks=2) < found.sent_before


def test_anchor_phrase():
    found = parse("what did she say before the trip to Paris, about money", NOW)
    assert (found.anchor, found.anchor_side) == ("the trip to Paris", "before")
    assert "money" in found.text and "Paris" not in found.text


def test_time_words_filter_inside_the_stores(make_engine):
    engine = make_engine()
    engine.ingest([message("c1", 1, "ann", "the glacier hike was long", minutes=0),
                   message("c1", 2, "ann", "another glacier hike today", minutes=60 * 24 * 70)])
    asked = (T0 + timedelta(days=90)).isoformat()
    early = engine.query(query(f"glacier hike in {T0:%B %Y}", asked_at=asked, reasoning="fast"))
    assert [m for f in early.fragments for m in f.message_ids] == ["m001"]
    late = engine.query(query(f"glacier hike after {T0 + timedelta(days=2):%d %B %Y}", asked_at=asked, reasoning="fast"))
    assert [m for f in late.fragments for m in f.message_ids] == ["m002"]
    assert early.rewritten_query.endswith(f"in {T0:%B %Y}")


def test_anchor_is_dated_by_search(make_engine):
    engine = make_engine()
    engine.ingest([message("c1", 1, "ann", "I paid the rent for the flat", minutes=0),
                   message("c1", 2, "ann", "we booked the sailing trip to Greece", minutes=60 * 24 * 10),
                   message("c1", 3, "ann", "I paid the rent again, ugh", minutes=60 * 24 * 20)])
    before = engine.query(query("rent before the sailing trip", reasoning="fast"))
    ids = [m for f in before.fragments for m in f.message_ids]
    assert "m001" in ids and "m003" not in ids
    after = engine.query(query("rent after the sailing trip", reasoning="fast"))
    ids = [m for f in after.fragments for m in f.message_ids]
    assert "m003" in ids and "m001" not in ids


def test_a_time_with_nothing_in_it_falls_back_to_the_words(make_engine):
    engine = make_engine()
    engine.ingest([message("c1", 1, "ann", "the glacier hike was long")])
    result = engine.query(query("glacier hike in June 1999", reasoning="fast"))
    assert [m for f in result.fragments for m in f.message_ids] == ["m001"]


def test_a_time_beyond_the_calendar_is_words_not_a_crash():
    from datetime import datetime, timezone

    from indexer.query.timeparse import parse

    now = datetime(2026, 5, 1, tzinfo=timezone.utc)
    for text in ("what did we say 3000 years ago", "the plan from 999999 days ago", "200000 weeks ago"):
        got = parse(text, now)
        assert got.sent_after is None and got.sent_before is None
        assert "ago" in got.text
