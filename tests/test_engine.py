"""The embedded engine against the real encoder, Qdrant local mode and the FTS5 store."""

import pytest

from indexer.model import SearchFilter
from tests.conftest import dialogue, message, query


def store_state(engine, tenant="t1"):
    """Everything a store holds for a tenant, so two engines can be compared."""
    frags = []
    for conv in ("c1", "c2"):
        frags += [(f.fragment_id, f.message_ids) for f in engine.state.fragments(tenant, conv)]
    return sorted(frags), engine.vectors.count(tenant), engine.keywords.count(tenant)


def all_message_ids(result):
    return [m for f in result.fragments for m in f.message_ids]


def test_query_finds_the_turns_that_answer(make_engine):
    engine = make_engine()
    engine.ingest(dialogue())
    result = engine.query(query("who fixed the swollen laptop battery"))
    assert result.status == "ok"
    top = result.fragments[0]
    assert set(top.message_ids) <= {"m009", "m010", "m011"}
    assert set(top.message_ids) <= set(top.context_message_ids)
    assert top.context_message_ids == sorted(top.context_message_ids)
    assert result.timings_ms["total"] > 0


def test_segments_by_topic_and_streaming_equals_batch(make_engine):
    batch = make_engine("batch")
    batch.ingest(dialogue())
    stream = make_engine("stream")
    for event in dialogue():
        stream.ingest([event])
    assert store_state(batch) == store_state(stream)
    fragments = [f.message_ids for f in batch.state.fragments("t1", "c1")]
    assert len(fragments) >= 2, "three topics should not be one fragment"
    assert [m for f in fragments for m in f] == [f"m{i:03d}" for i in range(1, 12)]


def test_out_of_order_arrival_gives_the_same_fragments(make_engine):
    ordered = make_engine("ordered")
    ordered.ingest(dialogue())
    shuffled = make_engine("shuffled")
    events = dialogue()
    shuffled.ingest(events[5:])
    shuffled.ingest(events[:5])
    assert store_state(ordered) == store_state(shuffled)


def test_replay_is_idempotent(make_engine):
    engine = make_engine()
    engine.ingest(dialogue())
    before = store_state(engine)
    report = engine.ingest(dialogue())
    assert report.unchanged == len(dialogue()) and report.encoded == 0
    assert store_state(engine) == before


def test_edit_and_delete_update_every_store(make_engine):
    engine = make_engine()
    engine.ingest(dialogue())
    edited = message("c1", 10, "bob", "Take the laptop to the kiosk at the harbour market.", event_suffix="-edit")
    engine.ingest([edited])
    hits = engine.keywords.search("harbour kiosk", "turn", SearchFilter("t1", "u1"), 10)
    assert [h.payload["message_ids"] for h in hits] == [["m010"]]
    assert engine.keywords.search("Elm Street", "turn", SearchFilter("t1", "u1"), 10) == []
    engine.ingest([message("c1", 10, "bob", "", op="delete", event_suffix="-del")])
    assert engine.keywords.search("harbour kiosk", "fragment", SearchFilter("t1", "u1"), 10) == []
    assert all("m010" not in f.message_ids for f in engine.state.fragments("t1", "c1"))
    assert "m010" not in all_message_ids(engine.query(query("laptop kiosk harbour", top_k=20)))


def test_delete_conversation_and_forget_user_leave_no_trace(make_engine):
    engine = make_engine()
    engine.ingest(dialogue("c1") + dialogue("c2"))
    engine.delete_conversation("t1", "c2")
    assert engine.state.fragments("t1", "c2") == []
    assert all(f.conversation_id == "c1" for f in engine.query(query("glacier", top_k=20)).fragments)
    engine.forget_user("t1", "ann")
    assert engine.state.senders_named("t1", ["ann"]) == set()
    assert all(t.sender_id == "bob" for t in engine.state.turns("t1", "c1"))
    flt = SearchFilter("t1", "u1")
    for kind in ("turn", "window"):
        for hit in engine.keywords.search("Ann glacier sourdough laptop", kind, flt, 50):
            assert hit.payload["sender_ids"] == ["bob"]
    texts = engine.keywords.search("Ann", "window", flt, 50)
    assert texts == [], "a window of bob's turns still holds the forgotten user's turns"
    assert engine.vectors.count("t1") == 5, "a window per turn"


def test_tenant_and_participant_isolation(make_engine):
    engine = make_engine()
    engine.ingest(dialogue("c1", participants=["ann", "bob"]))
    engine.ingest(dialogue("c2", tenant="t2"))
    private = engine.query(query("glacier hike", user="mallory", top_k=20))
    assert private.fragments == []
    member = engine.query(query("glacier hike", user="ann", top_k=20))
    assert member.fragments and {f.conversation_id for f in member.fragments} == {"c1"}
    other_tenant = engine.query(query("glacier hike", tenant="t2", user="zed", top_k=20))
    assert other_tenant.fragments and all(f.conversation_id == "c2" for f in other_tenant.fragments)
    engine.ingest([message("c1", 12, "ann", "adding mallory", participants=["ann", "bob", "mallory"])])
    assert engine.query(query("glacier hike", user="mallory", top_k=20)).fragments
    engine.ingest([message("c1", 13, "ann", "removing bob", participants=["ann", "mallory"])])
    assert engine.query(query("glacier hike", user="bob", top_k=20)).fragments == []


def test_filters_narrow_inside_the_stores(make_engine):
    engine = make_engine()
    engine.ingest(dialogue("c1") + dialogue("c2"))
    only_c2 = engine.query(query("glacier", filters={"conversation_id": "c2"}, top_k=20))
    assert only_c2.fragments and {f.conversation_id for f in only_c2.fragments} == {"c2"}
    late = engine.query(query("glacier sourdough laptop", top_k=20,
                              filters={"sent_after": "2026-05-01T10:08:30Z"}))
    assert late.fragments
    assert all(f.end_at.isoformat() >= "2026-05-01T10:08:30" for f in late.fragments)
    by_bob = engine.query(query("glacier", filters={"participants": ["bob"]}, top_k=20))
    assert by_bob.fragments


def test_image_turn_stays_with_its_reply_and_is_found_by_caption(make_engine):
    engine = make_engine()
    events = [
        message("c1", 1, "ann", "Our quarterly numbers are finally in."),
        message("c1", 2, "bob", "Revenue grew twelve percent over the quarter."),
        message("c1", 3, "ann", "The board will be pleased with the quarter."),
        message("c1", 4, "bob", "Look at this!", images=[{"uri": "file:///tmp/cat.png",
                                                           "caption": "a ginger cat asleep in a laundry basket"}]),
        message("c1", 5, "ann", "Haha, what a lazy creature."),
    ]
    engine.ingest(events)
    fragments = [f.message_ids for f in engine.state.fragments("t1", "c1")]
    assert any({"m004", "m005"} <= set(f) for f in fragments)
    result = engine.query(query("photo of the cat sleeping in the basket"))
    top = result.fragments[0]
    assert "m004" in top.message_ids
    assert top.images and top.images[0].caption.startswith("a ginger cat")


def test_vlm_reasoning_without_worker_is_a_clear_error(make_engine):
    engine = make_engine()
    result = engine.query(query("anything", reasoning="vlm"))
    assert result.status == "error" and result.error.code == "reasoning_unavailable"


def test_erased_text_leaves_no_bytes_in_any_file(make_engine, tmp_path):
    engine = make_engine("erase")
    engine.ingest(dialogue() + [message("c1", 20, "ann", "my passphrase is zebraquokka"),
                                message("c2", 1, "bob", "the vault code is lemurnarwhal")])
    assert engine.query(query("zebraquokka")).fragments

    def files_holding(secret: bytes):
        return [p for p in (tmp_path / "erase").rglob("*") if p.is_file() and secret in p.read_bytes()]

    assert files_holding(b"zebraquokka"), "the probe must see the text before erasure"
    engine.forget_user("t1", "ann")
    engine.delete_conversation("t1", "c2")
    assert files_holding(b"zebraquokka") == []
    assert files_holding(b"lemurnarwhal") == []
    remaining = engine.query(query("zebraquokka passphrase", top_k=20)).fragments
    assert remaining and all("zebraquokka" not in f.snippet and not f.snippet.startswith("Ann") for f in remaining)


def test_erasure_leaves_nothing_derived_from_the_text_in_any_file(make_engine, tmp_path):
    """What the stores derived from erased text goes too: no segment file keeps an erased unit's point (its id,
    and with it the unit's vectors) or, for the edge BM25 store, the hashed term of an erased word, though the
    optimizer's own threshold would leave a segment with a few deleted points as it is. Hashed terms and vectors
    can be turned back into words. The edge shards' write-ahead logs, which keep operations until later writes
    push them out, are turned over too."""
    import uuid

    from indexer import ids

    engine = make_engine("erase")
    engine.ingest(dialogue() + [message("c1", 20, "ann", "my passphrase is zebraquokka"),
                                message("c2", 1, "bob", "the vault code is lemurnarwhal")])
    erased = [("c1", m) for m in engine.state.message_ids_of_sender("t1", "c1", "ann")] + \
        [("c2", t.message_id) for t in engine.state.turns("t1", "c2")]
    probes = [p for c, m in erased for kind in ("turn", "window")
              for u in [uuid.UUID(ids.turn_unit_id("t1", c, m, kind))] for p in (u.bytes, u.bytes_le, str(u).encode())]
    model = getattr(engine.keywords, "model", None)
    if model is not None:  # the edge BM25 store: the words' hashed term ids, as its files write them
        probes += [str(i).encode() for i in model.embed_document("zebraquokka lemurnarwhal").indices]

    def files_holding():  # log segments are allocated ahead, zero-filled: their tails need no search
        return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "erase").rglob("*") if p.is_file()
                      for data in [p.read_bytes().rstrip(b"\0")] if any(probe in data for probe in probes))

    assert files_holding(), "the probes must find the units before erasure"
    engine.forget_user("t1", "ann")
    engine.delete_conversation("t1", "c2")
    assert files_holding() == []
    assert engine.query(query("laptop battery")).fragments


def test_a_late_old_edit_never_overwrites_a_newer_one(make_engine):
    engine = make_engine()
    engine.ingest(dialogue())
    newer = message("c1", 10, "bob", "Take the laptop to the kiosk at the harbour market.", event_suffix="-e2")
    newer = newer.model_copy(update={"edited_at": newer.sent_at.replace(hour=12)})
    older = message("c1", 10, "bob", "Take the laptop to the shop by the railway station.", event_suffix="-e1")
    older = older.model_copy(update={"edited_at": newer.sent_at.replace(hour=11)})
    engine.ingest([newer])
    report = engine.ingest([older])
    assert report.stale == 1 and report.upserted == 0
    assert engine.state.get_turn("t1", "c1", "m010").text.startswith("Take the laptop to the kiosk")
    assert engine.keywords.search("railway station", "turn", SearchFilter("t1", "u1"), 10) == []


def test_spans_read_only_the_fragments_they_need_and_stay_the_same(make_engine):
    """Fragment records are read in chunks as the best-first span walk asks for them: the same spans
    as reading every candidate's fragment, from fewer records."""
    from indexer.query.searcher import FragmentsOnDemand
    from indexer.model import SearchFilter

    engine = make_engine()
    for c in range(6):
        engine.ingest(dialogue(f"c{c}"))
    searcher = engine.searcher
    text = "glacier hike and the laptop battery"
    lists = searcher.hybrid.recall(text, searcher.embedder.encode([text])[0], SearchFilter("t1", "u1"))
    candidates = searcher.hybrid.fuse(lists, set(), "t1")
    best_first = sorted(candidates.values(), key=lambda c: -c.score)
    ranked = [c.fragment_id for c in best_first]
    everything = engine.state.fragments_by_id(list(dict.fromkeys(ranked)))
    expected = searcher.hybrid.spans(candidates, lambda f: everything[f].message_ids if f in everything else None, 2)
    for chunk in (1, 2, 100):
        lazy = FragmentsOnDemand(engine.state, best_first, chunk)
        assert searcher.hybrid.spans(candidates, lazy.message_ids, 2) == expected
        assert all(lazy[s.fragment_id].fragment_id == s.fragment_id for s in expected)
        if chunk == 1:
            assert len(lazy.records) < len(everything)
    prefetched = FragmentsOnDemand(engine.state, best_first, 1)
    last = list(dict.fromkeys(ranked))[-1]
    prefetched.prefetch([last, last])
    assert prefetched.message_ids(last) == everything[last].message_ids and prefetched.read == 0, \
        "a fragment read ahead is not read again, nor are the chunks before it"
    assert searcher.hybrid.spans(candidates, prefetched.message_ids, 2) == expected


def _fragment_units_as_written_before(engine, conversation_id: str):
    """What ingest wrote for each fragment before fragments stopped being units: the fragment's text and mean vector."""
    from indexer.ingest.units import keyword_units, unit_vector
    from indexer.model import EVERYONE, Unit
    from indexer.text import render_turn

    units = []
    for record in engine.state.fragments("t1", conversation_id):
        turns = engine.state.turns_by_id("t1", conversation_id, record.message_ids)
        members = [turns[m] for m in record.message_ids]
        vectors = engine.embedder.encode([render_turn(t) for t in members])
        units.append(Unit(record.fragment_id, "fragment", tenant_id="t1", conversation_id=conversation_id,
                          fragment_id=record.fragment_id, visible_to=[EVERYONE], message_ids=list(record.message_ids),
                          sender_ids=sorted({t.sender_id for t in members}), start_ts=record.start_at.timestamp(),
                          end_ts=record.end_at.timestamp(), text="\n".join(render_turn(t) for t in members),
                          vector=unit_vector(list(vectors))))
    engine.vectors.upsert(units)
    engine.keywords.upsert(keyword_units(units))
    return units


def test_fragment_units_of_a_data_dir_written_before_go_with_their_fragments_text(make_engine):
    """A data dir written before holds a unit per fragment that search no longer reads: a deleted message's text
    must still leave it, and an erased conversation's units all go."""
    engine = make_engine()
    engine.ingest(dialogue("c1"))
    windows = engine.vectors.count("t1")
    legacy = _fragment_units_as_written_before(engine, "c1")
    assert engine.vectors.count("t1") == windows + len(legacy)
    flt = SearchFilter("t1", "u1")
    assert engine.keywords.search("Elm Street", "fragment", flt, 10)
    engine.ingest([message("c1", 10, "bob", "", op="delete")])
    assert engine.keywords.search("Elm Street", "fragment", flt, 10) == []
    engine.delete_conversation("t1", "c1")
    assert engine.vectors.count("t1") == 0 and engine.keywords.count("t1") == 0


@pytest.mark.parametrize("keyword_store", ["fts5", "edge"])
def test_hits_of_one_turn_meet_in_one_candidate_whichever_stores_found_them(tmp_path, embedder, keyword_store):
    """Fusion keys a turn by its window id, from the point id on the edge stores and from the payload on the others:
    with edge vectors beside FTS5 keywords, a turn both stores found is still one candidate."""
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from indexer.stores.base import describe

    engine = open_engine(Config(data_dir=tmp_path / "d", vector_store="edge", keyword_store=keyword_store),
                         embedder=embedder)
    engine.ingest(dialogue("c1"))
    text = "glacier hike and the laptop battery"
    lists = engine.searcher.hybrid.recall(text, engine.searcher.embedder.encode([text])[0], SearchFilter("t1", "u1"))
    hits = [h for found in lists.values() for h in found]
    describe(hits)
    turns = {(h.payload["conversation_id"], h.payload["message_ids"][0]) for h in hits}
    found_by = {kind for kind, found in lists.items() if found}
    assert {("bm25", "turn"), ("dense", "window")} <= found_by
    candidates = engine.searcher.hybrid.fuse(lists, set(), "t1")
    assert len(candidates) == len(turns)
    assert {(c.conversation_id, c.message_id) for c in candidates.values()} == turns
    engine.close()
