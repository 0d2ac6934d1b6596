"""One conversation whose indexing fails deterministically never blocks the others.

The failing store is the Elasticsearch adapter over a client that follows Elasticsearch's documented
bulk answers and refuses one conversation's documents with a per-item 400 (``mapper_parsing_exception``),
as a cluster does for a document its mapping rejects.
"""

from __future__ import annotations

import pytest

from indexer.ingest.ingestor import MAX_INDEX_ATTEMPTS
from tests.conftest import DIALOGUE, dialogue, message
from tests.test_elasticsearch_adapter import VersionedClient, _engine_on


class RefusingClient(VersionedClient):
    """Refuses every document whose text holds ``marker``, as a mapping error would."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def bulk(self, operations, refresh):
        refused = [i for i, op in enumerate(operations) if isinstance(op, dict) and self.marker
                   and self.marker in op.get("text", "")]
        if not refused:
            return super().bulk(operations, refresh)
        kept, items, i = [], [], 0
        while i < len(operations):
            (op, meta), = operations[i].items()
            step = 2 if op == "index" else 1
            if op == "index" and i + 1 in refused:
                items.append((len(items), {op: {"_id": meta["_id"], "status": 400,
                                                "error": {"type": "mapper_parsing_exception",
                                                          "reason": "failed to parse field [text]"}}}))
            else:
                kept.append(operations[i:i + step])
                items.append((len(items), None))
            i += step
        answer = super().bulk([op for group in kept for op in group], refresh) if kept else {"items": []}
        passed = iter(answer["items"])
        out = [item if item is not None else next(passed) for _, item in items]
        return {"errors": True, "items": out}


def test_a_poison_conversation_is_retried_then_parked_and_never_blocks_the_rest(tmp_path, embedder):
    client = RefusingClient("POISON")
    engine = _engine_on(client, tmp_path, embedder)
    poison = dialogue("c2")[:3] + [message("c2", 4, "bob", "this message is POISON for the index")]
    report = engine.ingest(dialogue("c1") + poison)
    assert report.index_failures == 1
    assert engine.state.fragments("t1", "c1"), "the good conversation of the same batch is indexed"
    assert any("replaced the laptop battery" in t for t in client.texts())
    for _ in range(MAX_INDEX_ATTEMPTS - 1):
        engine.index_pending()
    parked = engine.state.parked()
    assert [(p.tenant_id, p.conversation_id) for p in parked] == [("t1", "c2")]
    assert "mapper_parsing_exception" in parked[0].reason and parked[0].attempts == MAX_INDEX_ATTEMPTS
    assert engine.state.pending() == [], "a parked conversation is no longer picked first"
    engine.ingest(dialogue("c3"))
    assert engine.state.fragments("t1", "c3"), "later conversations index while c2 is parked"

    client.marker = ""
    assert engine.replay_parked("t1", "c2") is True
    assert engine.state.parked() == [] and engine.state.fragments("t1", "c2")
    assert any("POISON" in t for t in client.texts())


def test_a_transient_store_error_fails_the_task_instead_of_parking(tmp_path, embedder):
    class Down(VersionedClient):
        def bulk(self, operations, refresh):
            raise ConnectionError("connection refused")

    engine = _engine_on(Down(), tmp_path, embedder)
    with pytest.raises(ConnectionError):
        engine.ingest(dialogue("c1"))
    assert engine.state.parked() == [] and [p[1] for p in engine.state.pending()] == ["c1"]


class CountingEmbedder:
    """The real encoder, counting the texts each call hands it."""

    def __init__(self, embedder):
        self.embedder, self.calls = embedder, []
        self.dim = embedder.dim

    def encode(self, texts):
        self.calls.append(len(texts))
        return self.embedder.encode(texts)


def test_an_embed_call_encodes_a_bounded_slice_and_a_huge_backlog_still_advances(make_engine, embedder):
    """An embed task must end inside its time limit whatever the backlog: a conversation imported with
    more waiting turns than one call may encode keeps the vectors it got and stays pending, so every
    call makes progress and the index ends as if built in one go (before, the call encoded all of it,
    failed on the limit, and the next took the same oldest conversation again)."""
    budget = 12
    long_chat = [message("big", i + 1, "ann" if i % 2 else "bob", f"{t} (part {i // len(DIALOGUE)})")
                 for i, (_, t) in enumerate(DIALOGUE * 3)]
    events = long_chat + dialogue("c1") + dialogue("c2")
    reference = make_engine("reference")
    reference.ingest(events)

    engine = make_engine("sliced")
    counting = CountingEmbedder(engine.ingestor.embedder)
    engine.ingestor.embedder = counting
    engine.apply(events)
    first, _ = engine.ingestor.pending_work(64, max_texts=budget)
    assert len(first) == budget, "the oldest conversation alone fills the budget"
    report = engine.index_pending(None, 64, max_texts=budget)
    assert sum(counting.calls) == budget and report.encoded == budget
    assert report.deferred == 2, "the sliced conversation and the next, which did not fit"
    assert [k[1] for k in engine.state.pending()][0] == "big", "a slice encoded, the rest still pending"
    assert len(engine.state.turns_without_vector("t1", "big")) == len(long_chat) - budget
    assert engine.state.fragments("t1", "big") == [], "indexed only once every turn has its vector"
    calls = 1
    while engine.state.pending():
        counting.calls.clear()
        texts, _ = engine.ingestor.pending_work(64, max_texts=budget)
        assert 0 < len(texts) <= budget
        report = engine.index_pending(engine.ingestor.encode_texts(texts), 64, max_texts=budget)
        assert sum(counting.calls) <= budget
        assert report.deferred or not engine.state.pending(), "a call that leaves marks says so"
        calls += 1
        assert calls < 10
    assert engine.state.all_fragments() == reference.state.all_fragments()
    assert (engine.vectors.count(), engine.keywords.count()) == (reference.vectors.count(), reference.keywords.count())
