"""Which lists hybrid recall asks the stores for, and how fusion weighs them (real edge stores, real encoder)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from indexer import ids
from indexer.ingest.units import fragment_units, keyword_units, vector_units
from indexer.model import EVERYONE, FragmentRecord, SearchFilter, Turn
from indexer.query.hybrid import HybridSearcher
from indexer.stores.edge import EdgeBM25Store, EdgeVectorStore
from indexer.text import render_turn
from tests.conftest import message, query

TEXTS = [("ann", "Did you run the Boston marathon in the end?"), ("bob", "yes!! 4 hours"),
         ("ann", "wow congrats"), ("bob", "my knees still hurt lol")]


@pytest.fixture
def searcher(tmp_path, embedder):
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    turns = [Turn(f"m{i}", sender, start + timedelta(minutes=i), text, sender_name=sender.title())
             for i, (sender, text) in enumerate(TEXTS)]
    vectors = embedder.encode([render_turn(t) for t in turns])
    turns = [dataclasses.replace(t, vector=v) for t, v in zip(turns, vectors)]
    record = FragmentRecord(ids.fragment_id("t1", "c1", "m0"), "t1", "c1", tuple(t.message_id for t in turns),
                            turns[0].sent_at, turns[-1].sent_at)
    units = fragment_units(record, turns, [EVERYONE])
    vectors_store, keywords = EdgeVectorStore(tmp_path / "vectors", embedder.dim), EdgeBM25Store(tmp_path / "bm25")
    vectors_store.upsert(vector_units(units))
    keywords.upsert(keyword_units(units))
    yield HybridSearcher(vectors_store, keywords)
    vectors_store.close()
    keywords.close()


def test_dense_evidence_comes_from_windows_and_turns_are_not_vector_indexed(searcher, embedder):
    query = "how long did the marathon take"
    lists = searcher.recall(query, embedder.encode([query])[0], SearchFilter("t1", "ann"))
    assert set(lists) == {("bm25", "turn"), ("bm25", "window"), ("dense", "window")}
    assert {h.payload["message_ids"][0] for h in lists[("dense", "window")]} == {"m0", "m1", "m2", "m3"}
    assert searcher.vectors.count("t1") == 4, "a window per turn, nothing for the fragment"
    assert searcher.keywords.count("t1") == 4 + 4, "a turn and a window per turn, nothing for the fragment"
    assert searcher.vectors.search(embedder.encode([query])[0], "turn", SearchFilter("t1", "ann"), 10) == []
    candidates = searcher.fuse(lists, set(), "t1")
    assert {c.message_id for c in candidates.values()} == {"m0", "m1", "m2", "m3"}


def test_a_turn_with_an_image_keeps_its_vector_for_the_image_lists():
    image = dataclasses.replace(fragment_units(*_fragment(1))[0], image_vector=np.ones(4, dtype=np.float32))
    kept = vector_units(fragment_units(*_fragment(2)) + [image])
    assert sorted(u.kind for u in kept) == ["turn", "window", "window"]
    assert [u.unit_id for u in kept if u.kind == "turn"] == [image.unit_id]


def _fragment(n: int, dim: int = 4):
    """A fragment of ``n`` turns, two people taking turns, turn ``i`` with the ``i``-th unit vector of ``dim``."""
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    turns = [Turn(f"m{i}", ("ann", "bob")[i % 2], start + timedelta(minutes=i), f"turn {i}",
                  vector=np.eye(dim, dtype=np.float32)[i]) for i in range(n)]
    record = FragmentRecord(ids.fragment_id("t1", "c1", "m0"), "t1", "c1", tuple(t.message_id for t in turns),
                            start, turns[-1].sent_at)
    return record, turns, [EVERYONE]


def test_a_window_reads_the_two_turns_before_and_the_one_after_and_weighs_its_own_most():
    """The answer to "how did she feel watching the meteor shower" is often the speaker's next turn, after the
    other's reaction: its window has to reach back to the turn that named the shower."""
    record, turns, visible_to = _fragment(5, dim=5)
    windows = {u.message_ids[0]: u for u in fragment_units(record, turns, visible_to) if u.kind == "window"}
    assert windows["m2"].text == " ".join(render_turn(t) for t in turns[0:4])
    assert windows["m0"].text == " ".join(render_turn(t) for t in turns[0:2])
    assert windows["m4"].text == " ".join(render_turn(t) for t in turns[2:5])
    expected = np.array([1, 1, 3, 1, 0], dtype=np.float32)
    np.testing.assert_allclose(windows["m2"].vector, expected / np.linalg.norm(expected), rtol=1e-6)


def test_feedback_lifts_the_candidates_that_share_the_best_turns_words():
    """The best turns of a question about camping name the places; a turn naming them without the question's
    words rises over one that names neither, and the best turn stays first."""
    from indexer.query.hybrid import SearchConfig

    texts = {"m0": "Mel: we went camping at Lake Tahoe with the kids", "m1": "Mel: camping again, Tahoe in June",
             "m2": "Mel: camping is the best", "m3": "Sam: what a week at work",
             "m4": "Mel: the kids still talk about Tahoe and the pine forest", "m5": "Sam: my pizza was cold lol"}
    scores = {"m0": 1.0, "m1": 0.9, "m2": 0.8, "m3": 0.31, "m4": 0.3, "m5": 0.29}

    def candidates():
        return {m: _candidate("f1", m, score, "mel") for m, score in scores.items()}

    by_key = {("c1", m): text for m, text in texts.items()}
    lifted = candidates()
    searcher = HybridSearcher(None, None)
    searcher.feedback(searcher.leading(lifted), by_key)
    order = sorted(lifted, key=lambda m: -lifted[m].score)
    assert order[0] == "m0" and order.index("m4") < order.index("m3") and order.index("m4") < order.index("m5")
    assert lifted["m5"].score == scores["m5"], "a turn sharing no word of the best turns gains nothing"
    unchanged = candidates()
    HybridSearcher(None, None, SearchConfig(feedback_turns=0)).feedback(searcher.leading(unchanged), by_key)
    assert {m: c.score for m, c in unchanged.items()} == scores


def _hit(fragment_id: str, message_id: str, score: float, sender: str = "ann", start_ts: float = 0.0):
    from indexer.model import Hit

    return Hit(message_id, score, {"conversation_id": "c1", "fragment_id": fragment_id, "message_ids": [message_id],
                                   "sender_ids": [sender], "start_ts": start_ts})


def _candidate(fragment_id: str, message_id: str, score: float, sender: str = "ann", start_ts: float = 0.0):
    """A candidate of tenant t1's conversation c1, as fusion makes it from a store's hit."""
    from indexer.query.hybrid import Candidate

    return Candidate.of(_hit(fragment_id, message_id, score, sender, start_ts), "t1", score)


def test_a_fragment_weighs_as_much_as_its_best_two_turns_in_each_list():
    """Fragments are not searched as a whole: a turn gains its fragment's relevance from the fragment's best two
    hits of each turn-level list, so two turns on the topic outweigh one, and a third weak one adds nothing."""
    from indexer.query.hybrid import SearchConfig

    lists = {("bm25", "turn"): [_hit("f1", "a1", 10.0), _hit("f2", "b1", 10.0), _hit("f2", "b2", 8.0),
                                _hit("f3", "c1", 10.0), _hit("f3", "c2", 8.0), _hit("f3", "c3", 1.0),
                                _hit("f4", "d1", 2.0)],
             ("dense", "window"): [_hit("f1", "a1", 0.9), _hit("f2", "b1", 0.9), _hit("f3", "c1", 0.9),
                                   _hit("f4", "d1", 0.1)]}
    fused = HybridSearcher(None, None).fuse(lists, set(), "t1")
    score = {c.message_id: c.score for c in fused.values()}
    assert score["b1"] > score["a1"], "a second turn on the topic lifts its fragment"
    assert score["c1"] == pytest.approx(score["b1"]), "a third, weaker turn does not"
    assert score["d1"] < score["a1"]
    one = HybridSearcher(None, None, SearchConfig(fragment_turns=1)).fuse(lists, set(), "t1")
    assert one[ids.turn_key("t1", "c1", "b1")].score == pytest.approx(one[ids.turn_key("t1", "c1", "a1")].score), \
        "with one turn, only the best counts"


def test_the_answer_to_a_question_in_the_chat_gains_a_share_of_the_questions_score():
    """People ask the way someone asked in the chat; the answer is what the other person sends next, in a row.
    The asker's own follow-up, the turns after the reply run and a turn after a statement gain nothing."""
    from indexer.query.hybrid import SearchConfig

    order = ("m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7")
    senders = {"m0": "ann", "m1": "ann", "m2": "bob", "m3": "bob", "m4": "ann", "m5": "bob", "m6": "ann", "m7": "bob"}
    texts = {"m0": "Ann: have you read anything good lately?", "m1": "Ann: for the flight I mean",
             "m2": "Bob: Charlotte's Web, again", "m3": "Bob: still my favourite", "m4": "Ann: nice",
             "m5": "Bob: I read it on the plane.", "m6": "Ann: cool", "m7": "Bob: what about you?"}
    scores = {"m0": 1.0, "m1": 0.5, "m2": 0.2, "m3": 0.1, "m4": 0.3, "m5": 0.9, "m6": 0.05, "m7": 0.6}

    def candidates(**config):
        cands = {m: _candidate("f1", m, score, senders[m]) for m, score in scores.items()}
        hybrid = HybridSearcher(None, None, SearchConfig(**config))
        asked = hybrid.questions(list(cands.values()), {("c1", m): t for m, t in texts.items()})
        hybrid.replies(cands, asked, lambda fragment_id: order)
        return {m: c.score for m, c in cands.items()}

    lifted = candidates(reply_weight=0.15, reply_turns=3)
    assert lifted["m2"] == pytest.approx(0.2 + 0.15 * 1.0) and lifted["m3"] == pytest.approx(0.1 + 0.15 * 1.0)
    assert lifted["m1"] == scores["m1"], "the asker's own next message is not the answer"
    assert lifted["m4"] == scores["m4"], "the reply run ends where the sender changes"
    assert lifted["m6"] == scores["m6"], "a turn after a statement gains nothing"
    assert lifted["m0"] == scores["m0"] and lifted["m7"] == scores["m7"], "the last question has no reply"
    assert candidates(reply_weight=0.15, reply_turns=1)["m3"] == scores["m3"], "one turn of the run at most"
    assert candidates(reply_weight=0.0) == scores


def test_the_answer_to_a_question_about_what_was_just_said_gains_from_what_was_said():
    """"We saw the Perseids!" - "wow!!" "how did it feel?" - "I felt tiny": the query matches what Ann said best, and
    what it is after is her answer to Bob's question about it, which gains a share of the said turn's score too
    (the best of Ann's run before Bob's, skipping Bob's own lead-up). A question opening the fragment, or after a
    turn that is no candidate, gains from itself alone."""
    from indexer.query.hybrid import SearchConfig

    order = ("m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7")
    senders = {"m0": "ann", "m1": "ann", "m2": "bob", "m3": "bob", "m4": "ann", "m5": "ann", "m6": "bob", "m7": "ann"}
    texts = {"m0": "Ann: we drove out to the lake", "m1": "Ann: and saw the Perseids!", "m2": "Bob: wow!!",
             "m3": "Bob: how did it feel?", "m4": "Ann: I felt tiny, in awe of it all", "m6": "Bob: and then?",
             "m7": "Ann: we drove home"}
    scores = {"m0": 0.25, "m1": 1.0, "m2": 0.1, "m3": 0.3, "m4": 0.2, "m6": 0.05, "m7": 0.1}

    def lifted(given=scores, kind=None, **config):
        cands = {m: _candidate("f1", m, score, senders[m]) for m, score in given.items()}
        hybrid = HybridSearcher(None, None, SearchConfig(**config))
        hybrid.replies(cands, hybrid.questions(list(cands.values()), {("c1", m): t for m, t in texts.items()}),
                       lambda fragment_id: order, kind)
        return {m: c.score for m, c in cands.items()}

    after = lifted(reply_weight=0.15, setup_weight=0.5)
    assert after["m4"] == pytest.approx(0.2 + 0.15 * (0.3 + 0.5 * 1.0)), "the best of Ann's run, past Bob's 'wow!!'"
    assert after["m4"] > scores["m0"], "the answer now ranks above the lead-up"
    assert after["m7"] == pytest.approx(0.1 + 0.15 * 0.05), "m5 is no candidate: Bob's 'and then?' lifts by itself"
    assert lifted(reply_weight=0.15, setup_weight=0.0)["m4"] == pytest.approx(0.2 + 0.15 * 0.3)
    assert lifted(kind="time", reply_weight=0.15, setup_weight=0.5)["m4"] == pytest.approx(0.2 + 0.15 * 0.3), \
        "asked when, the turn that dates it answers: the reply takes nothing from what was said"
    assert lifted(kind="count", reply_weight=0.15, setup_weight=0.5)["m4"] == pytest.approx(after["m4"])
    assert lifted(scores | {"m2": 2.0}, reply_weight=0.15, setup_weight=0.5)["m4"] == pytest.approx(
        0.2 + 0.15 * (0.3 + 0.5 * 1.0)), "the asker's own lead-up is not what was said"


def test_a_reply_rises_over_the_question_it_answers_in_real_stores(searcher, embedder):
    """Recalled from the edge stores: asked as Ann asked, Bob's "yes!! 4 hours" gains from Ann's question,
    and only the questions of the fragment lift anything."""
    from indexer.query.hybrid import SearchConfig

    query = "did you run the Boston marathon in the end"
    lists = searcher.recall(query, embedder.encode([query])[0], SearchFilter("t1", "ann"))
    texts = {("c1", f"m{i}"): f"{sender.title()}: {text}" for i, (sender, text) in enumerate(TEXTS)}
    order = tuple(f"m{i}" for i in range(len(TEXTS)))
    candidates = searcher.fuse(lists, set(), "t1")
    before = {c.message_id: c.score for c in candidates.values()}
    searcher.replies(candidates, searcher.questions(searcher.leading(candidates), texts), lambda fragment_id: order)
    after = {c.message_id: c.score for c in candidates.values()}
    assert after["m1"] == pytest.approx(before["m1"] + SearchConfig().reply_weight * before["m0"])
    assert {m: after[m] for m in ("m0", "m2", "m3")} == {m: before[m] for m in ("m0", "m2", "m3")}


@pytest.mark.parametrize("text, several", [
    ("What books has Melanie read?", True),
    ("what restaurants have we talked about", True),
    ("What do Jon and Gina both like?", True),
    ("How many times did she go to the beach?", True),
    ("Which kinds of places did they visit?", True),
    ("What did Gina design for her store?", False),
    ("What is the name of Maria's second puppy?", False),
    ("What has been the hardest part of the move?", False),
    ("What address did he give?", False),
    ("Where was the party last week?", False),
])
def test_a_query_asking_for_several_things_is_told_from_one_asking_for_one(text, several):
    from indexer.query.intent import asks_for_several

    assert asks_for_several(text) is several


def test_a_query_for_several_things_is_answered_from_several_fragments():
    """Three strong turns of one fragment and a weaker one of another: asked for one thing, the best fragment's
    turns come first as one span; asked for several, single turns, and the other fragment before the best
    fragment's third turn."""
    from indexer.query.hybrid import SearchConfig

    fragments = {"f1": ["a1", "a2", "a3", "a4"], "f2": ["b1", "b2"]}
    scores = {("f1", "a1"): 1.0, ("f1", "a2"): 0.95, ("f1", "a3"): 0.93, ("f2", "b1"): 0.8, ("f2", "b2"): 0.1}
    candidates = {m: _candidate(f, m, score) for (f, m), score in scores.items()}
    hybrid = HybridSearcher(None, None, SearchConfig(spread_penalty=0.1, several_span_turns=1, spread_unit="fragment"))
    one = hybrid.spans(candidates, fragments.get, 3)
    assert [s.message_ids for s in one][:2] == [["a1", "a2", "a3"], ["b1"]]
    several = hybrid.spans(candidates, fragments.get, 3, several=True)
    assert [s.message_ids for s in several] == [["a1"], ["a2"], ["b1"]], "a3 drops below the other fragment's best"
    assert [s.score for s in several] == [1.0, 0.95, 0.8], "spans keep their turns' own scores"
    unchanged = HybridSearcher(None, None, SearchConfig(spread_penalty=0.0, several_span_turns=3))
    assert unchanged.spans(candidates, fragments.get, 3, several=True) == one


def test_a_query_for_several_things_is_answered_from_several_sessions():
    """Several things are said in different sessions: two fragments two hours apart (across midnight UTC: a session
    is not a calendar day) and a weaker turn three days later, asked for several things, the later session's turn
    comes second, before the first session's other fragment; spread by fragment, that fragment comes second."""
    from indexer.query.hybrid import SearchConfig

    day = 86400.0
    fragments = {"f1": ["a1", "a2"], "f2": ["b1", "b2"], "f3": ["c1"]}
    late = day - 3600.0
    turns = {("f1", "a1", late): 1.0, ("f1", "a2", late + 60): 0.5, ("f2", "b1", late + 7200): 0.95,
             ("f2", "b2", late + 7260): 0.1, ("f3", "c1", 3 * day): 0.9}
    candidates = {m: _candidate(f, m, score, start_ts=ts) for (f, m, ts), score in turns.items()}
    by_day = HybridSearcher(None, None, SearchConfig(spread_penalty=0.1, several_span_turns=1))
    assert [s.message_ids for s in by_day.spans(candidates, fragments.get, 3, several=True)] == [["a1"], ["c1"], ["b1"]]
    by_fragment = HybridSearcher(None, None, SearchConfig(spread_penalty=0.1, several_span_turns=1,
                                                          spread_unit="fragment"))
    assert [s.message_ids for s in by_fragment.spans(candidates, fragments.get, 3, several=True)] == \
        [["a1"], ["b1"], ["c1"]]


@pytest.mark.parametrize("text, kind", [
    ("When did Melanie paint a sunrise?", "time"),
    ("what year did they move to Boston", "time"),
    ("How long ago was the trip?", "time"),
    ("How many kids does Jon have?", "count"),
    ("how long has she been practicing yoga", "count"),
    ("How old is her dog?", "count"),
    ("What did Gina design for her store?", None),
    ("Where was the party last week?", None),
    ("the chat about whenever we meet", None),
])
def test_a_question_whose_answer_is_a_time_or_a_count_is_told_from_others(text, kind):
    from indexer.query.intent import answer_kind

    assert answer_kind(text) == kind


@pytest.mark.parametrize("kind, text, holds", [
    ("time", "we got him last weekend!", True),
    ("time", "It was back in May, so fun", True),
    ("time", "two weeks ago lol", True),
    ("time", "I painted it in 2022", True),
    ("time", "I painted a sunrise, the colours were amazing", False),
    ("time", "may I ask what it was like?", False),
    ("time", "it was back in may", True),
    ("count", "I have 3 kids", True),
    ("count", "we have two of them", True),
    ("count", "they are the best kids", False),
    (None, "last week, 3 kids", False),
])
def test_a_turn_holds_an_answer_of_the_kind_asked(kind, text, holds):
    from indexer.query.intent import holds_answer

    assert holds_answer(kind, text) is holds


def test_a_turn_holding_the_time_asked_for_rises_above_the_turn_that_tells_about_it_best():
    """Asked "when did she get the puppy?", the turn that tells about the puppy scores first and the one that dates
    it close behind; the answer is the dated one. Asked what the puppy is like, nothing moves; a speaker whose
    name holds a number or a month gains nothing from it."""
    from indexer.query.hybrid import SearchConfig
    from indexer.query.intent import answer_kind

    texts = {("c1", "m0"): "Mel: we finally got a puppy, he is so fluffy and tiny",
             ("c1", "m1"): "Mel: we picked him up last weekend from a farm",
             ("c1", "m2"): "May: so cute! what breed is he?",
             ("c1", "m3"): "Sam: my pizza was cold lol"}
    scores = {"m0": 1.0, "m1": 0.95, "m2": 0.9, "m3": 0.5}

    def ranked(question: str, config: SearchConfig = SearchConfig()) -> list[str]:
        candidates = [_candidate("f1", m, score) for m, score in scores.items()]
        HybridSearcher(None, None, config).answers(candidates, texts, answer_kind(question))
        return [c.message_id for c in sorted(candidates, key=lambda c: -c.score)]

    assert ranked("When did Mel get the puppy?") == ["m1", "m0", "m2", "m3"]
    assert ranked("What is Mel's puppy like?") == ["m0", "m1", "m2", "m3"]
    assert ranked("When did Mel get the puppy?", SearchConfig(answer_weight=0.0)) == ["m0", "m1", "m2", "m3"]


@pytest.mark.parametrize("text, asks", [
    ("What kind of books you got in your library?", True),
    ("Wow, Caroline! What kinda jobs are you thinkin' of? Anything that stands out?", True),
    ("did u see that??", True),
    ("These figurines I bought yesterday remind me of family love. Tell me, what do you treasure?", False),
    ("I painted it because it was calming.", False),
    ("where was this? [image: a photo of a sunset]", False),
    ("lol", False),
    ("", False),
])
def test_a_turn_that_only_asks_is_told_from_one_that_tells(text, asks):
    from indexer.query.intent import only_asks

    assert only_asks(text) is asks


@pytest.mark.parametrize("text, about", [
    ("what did Anna ask about the flat?", True),
    ("the question Bob had about the tickets", True),
    ("when was she wondering about the move", True),
    ("what books has Melanie read?", False),
    ("the task list for Monday", False),
])
def test_a_query_about_something_asked_is_told_from_others(text, about):
    from indexer.query.intent import asks_about_asking

    assert asks_about_asking(text) is about


def test_a_turn_that_only_asks_ranks_lower_than_what_was_said():
    """Among the leading candidates, the one whose words only ask loses ``asking_penalty``; a question with a
    statement in it, a statement and a picture with a question keep their scores."""
    from indexer.query.hybrid import SearchConfig

    texts = {"m0": "Mel: Wow, Caroline! What kind of books you got in your library?",
             "m1": "Mel: I read Charlotte's Web to the kids. What do you read?",
             "m2": "Mel: my library is tiny", "m3": "Mel: where is this? [image: a photo of a library]"}
    scores = {"m0": 1.0, "m1": 0.9, "m2": 0.8, "m3": 0.7}

    def scored(config: SearchConfig = SearchConfig()) -> dict[str, float]:
        candidates = [_candidate("f1", m, score) for m, score in scores.items()]
        HybridSearcher(None, None, config).asking(candidates, {("c1", m): t for m, t in texts.items()})
        return {c.message_id: c.score for c in candidates}

    assert scored(SearchConfig(asking_penalty=0.3)) == pytest.approx({**scores, "m0": 0.7})
    assert scored(SearchConfig(asking_penalty=0.0)) == scores


def test_the_engine_finds_what_was_said_before_what_was_asked_unless_the_query_is_about_the_asking(make_engine):
    """"lasagna recipe from the cooking class" matches Ann's question best and Bob's answer gains from it; what was
    said comes first. Asked for the question itself, the question does; with no penalty it comes first either way."""
    engine = make_engine()
    engine.ingest([
        message("c1", 1, "ann", "Did you ever try the lasagna recipe from the cooking class?"),
        message("c1", 2, "bob", "Yes, I made the lasagna from the class, the kids loved it."),
        message("c1", 3, "ann", "Great, see you at the park on Sunday."),
        message("c1", 4, "bob", "Sure, I will bring the football."),
    ])

    def first(text: str) -> str:
        return engine.query(query(text)).fragments[0].message_ids[0]

    assert first("lasagna recipe from the cooking class") == "m002"
    assert first("the question about the lasagna recipe from the cooking class") == "m001"
    engine.searcher.hybrid.config = dataclasses.replace(engine.searcher.hybrid.config, asking_penalty=0.0)
    assert first("lasagna recipe from the cooking class") == "m001"


def test_a_turn_that_only_asks_grows_its_span_by_the_score_it_had():
    """Lowered below its answer, a question still joins only neighbours that scored close to what it scored before:
    the turn before it, on another topic, stays out of its span."""
    from indexer.query.hybrid import SearchConfig

    texts = {"m4": "Chloe: yes, from seeds on the kitchen window", "m5": "Dev: Can you send me the curry recipe?",
             "m6": "Chloe: Sure: onions, garlic, chickpeas and cumin."}
    scores = {"m4": 0.75, "m5": 1.1, "m6": 1.08}
    order = ("m4", "m5", "m6")
    candidates = {m: _candidate("f1", m, score) for m, score in scores.items()}
    hybrid = HybridSearcher(None, None, SearchConfig(asking_penalty=0.3, span_ratio=0.9, span_max_turns=3))
    hybrid.asking(list(candidates.values()), {("c1", m): t for m, t in texts.items()})
    spans = hybrid.spans(candidates, lambda fragment_id: order, 3)
    assert [s.message_ids for s in spans] == [["m6"], ["m5"], ["m4"]]
