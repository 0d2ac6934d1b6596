"""Which lists hybrid recall asks the stores for, and how fusion weighs them (real edge stores, real encoder)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest

from indexer import ids
from indexer.ingest.units import fragment_units, keyword_units
from indexer.model import EVERYONE, FragmentRecord, SearchFilter, Turn
from indexer.query.hybrid import HybridSearcher, SearchConfig
from indexer.stores.edge import EdgeBM25Store, EdgeVectorStore
from indexer.text import render_turn

TEXTS = [("ann", "Did you run the Boston marathon in the end?"), ("bob", "yes!! 4 hours"),
         ("ann", "wow congrats"), ("bob", "my knees still hurt lol")]


@pytest.fixture
def searcher(tmp_path, embedder):
    start = datetime(2024, 5, 1, tzinfo=timezone.utc)
    turns = [Turn(f"m{i}", sender, start + timedelta(minutes=i), text, sender_name=sender.title())
             for i, (sender, text) in enumerate(TEXTS)]
    vectors = embedder.encode([render_turn(t) for t in turns])
    turns = [dataclasses.replace(t, vector=v) for t, v in zip(turns, vectors)]
    record = FragmentRecord(ids.fragment_id("t1", "c1", "m0"), "t1", "c1", tuple(t.message_id for t in turns), turns[0].sent_at, turns[-1].sent_at)
    units = fragment_units(record, turns, [EVERYONE])
    vectors_store, keywords = EdgeVectorStore(tmp_path / "vectors", embedder.dim), EdgeBM25Store(tmp_path / "bm25")
    vectors_store.upsert(units)
    keywords.upsert(keyword_units(units))
    yield HybridSearcher(vectors_store, keywords)
    vectors_store.close()
    keywords.close()


def test_dense_evidence_comes_from_windows_unless_turns_are_given_a_share(searcher, embedder):
    query = "how long did the marathon take"
    flt = SearchFilter("t1", "ann")
    lists = searcher.recall(query, embedder.encode([query])[0], flt)
    assert lists[("dense", "turn")] == []
    assert {h.payload["message_ids"][0] for h in lists[("dense", "window")]} == {"m0", "m1", "m2", "m3"}
    assert lists[("bm25", "turn")] and lists[("dense", "fragment")]

    searcher.config = dataclasses.replace(SearchConfig(), dense_window_share=0.5)
    lists = searcher.recall(query, embedder.encode([query])[0], flt)
    assert {h.payload["message_ids"][0] for h in lists[("dense", "turn")]} == {"m0", "m1", "m2", "m3"}

