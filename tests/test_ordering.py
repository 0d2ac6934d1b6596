"""Updates commute: delivery order, repetition and late events never change what is indexed or visible.

Each test reproduces a failure reported against main (issue 14) through the engine's public API.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from indexer.model import SearchFilter
from schemas import SchemaError, parse_message
from tests.conftest import dialogue, message, query


def _found(engine, text: str, user: str = "u1", tenant: str = "t1") -> set[str]:
    result = engine.query(query(text, user=user, tenant=tenant, top_k=50))
    return {m for f in result.fragments for m in f.message_ids}


def test_a_delete_of_an_edited_message_is_applied(make_engine):
    engine = make_engine()
    engine.ingest(dialogue())
    edit = message("c1", 10, "bob", "Take the laptop to the kiosk at the harbour market.", event_suffix="-edit")
    engine.ingest([edit.model_copy(update={"edited_at": edit.sent_at + timedelta(hours=2)})])
    report = engine.ingest([message("c1", 10, "bob", "", op="delete", event_suffix="-del")])
    assert report.deleted == 1
    assert engine.state.get_turn("t1", "c1", "m010") is None
    assert engine.keywords.search("harbour kiosk", "turn", SearchFilter("t1", "u1"), 10) == []


def test_a_delete_delivered_before_its_upsert_sticks(make_engine):
    engine = make_engine()
    engine.ingest([message("c1", 1, "ann", "", op="delete", event_suffix="-del")])
    engine.ingest([message("c1", 1, "ann", "the secret glacier plan"), message("c1", 2, "bob", "sounds good")])
    assert engine.state.get_turn("t1", "c1", "m001") is None
    assert "m001" not in _found(engine, "secret glacier plan")


def test_a_replayed_upsert_never_undoes_a_delete(make_engine):
    engine = make_engine()
    events = dialogue()
    engine.ingest(events)
    engine.ingest([message("c1", 1, "ann", "", op="delete", event_suffix="-del")])
    engine.ingest(events)
    assert engine.state.get_turn("t1", "c1", "m001") is None
    assert "m001" not in _found(engine, "reached the glacier at the end of the hiking trip")


def test_a_duplicate_event_changes_nothing(make_engine):
    engine = make_engine()
    events = dialogue()
    engine.ingest(events)
    before = engine.state.fragments("t1", "c1")
    report = engine.ingest(events)
    assert report.upserted == 0 and report.unchanged == len(events) and report.fragments_written == 0
    assert engine.state.fragments("t1", "c1") == before


def test_a_late_event_with_an_old_participant_list_grants_nothing(make_engine):
    engine = make_engine()
    first = message("c1", 1, "ann", "our glacier trip planning", participants=["ann", "bob", "cid"])
    later = message("c1", 2, "ann", "cid left the group, glacier budget is 900", participants=["ann", "bob"])
    engine.ingest([later])
    engine.ingest([first])
    assert engine.state.participants("t1", "c1") == ["ann", "bob"]
    assert _found(engine, "glacier", user="cid") == set()
    assert _found(engine, "glacier", user="bob") >= {"m001", "m002"}


def test_an_empty_participant_list_is_refused_with_the_field_named():
    record = message("c1", 1, "ann", "hello").model_dump(mode="json", by_alias=True)
    record["participants"] = []
    with pytest.raises(SchemaError) as info:
        parse_message(record)
    assert info.value.field == "participants"


def test_forget_me_works_while_turns_wait_for_their_embedding(make_engine):
    engine = make_engine()
    engine.ingest(dialogue())
    engine.apply([message("c1", 12, "ann", "my new passphrase is zebraquokka"),
                  message("c1", 13, "bob", "noted, the quokka thing")])
    report = engine.forget_user("t1", "ann")
    assert report.deleted == 7
    assert all(t.sender_id == "bob" for t in engine.state.turns("t1", "c1"))
    assert engine.state.pending() == []
    flt = SearchFilter("t1", "u1")
    assert engine.keywords.search("zebraquokka", "window", flt, 10) == []
    assert engine.keywords.search("quokka", "turn", flt, 10), "bob's pending turn is indexed after the erasure"
    for kind in ("turn", "window"):
        assert all(h.payload["sender_ids"] == ["bob"] for h in engine.keywords.search("glacier sourdough", kind, flt, 50))
    engine.ingest(dialogue())
    assert all(t.sender_id == "bob" for t in engine.state.turns("t1", "c1")), "a replay brings nothing back"


def test_a_conversation_delete_names_its_tenant_and_sticks(make_engine):
    engine = make_engine()
    engine.ingest(dialogue("general") + dialogue("general", tenant="t2"))
    engine.delete_conversation("t1", "general")
    assert engine.state.turns("t1", "general") == []
    assert len(engine.state.turns("t2", "general")) == len(dialogue())
    assert _found(engine, "glacier", tenant="t2")
    engine.ingest(dialogue("general"))
    assert engine.state.turns("t1", "general") == [], "a late replay of the erased conversation stays erased"
    assert _found(engine, "glacier") == set()


def test_reindex_rebuilds_lost_indexes_from_the_state_and_resumes(make_engine, tmp_path):
    import shutil

    engine = make_engine("a")
    engine.ingest(dialogue("c1") + dialogue("c2"))
    expected = (engine.vectors.count(), engine.keywords.count())
    state_url = engine.state_url
    if state_url is None:
        engine.state.checkpoint()
        (tmp_path / "b").mkdir()
        shutil.copy(tmp_path / "a" / "state.sqlite", tmp_path / "b" / "state.sqlite")
    rebuilt = make_engine("b", state_url=state_url)
    assert rebuilt.vectors.count() == 0, "the new data dir stands for a lost cluster"

    class Interrupted(Exception):
        pass

    def stop_after_first(n):
        raise Interrupted

    with pytest.raises(Interrupted):
        rebuilt.reindex(batch=1, progress=stop_after_first)
    assert rebuilt.state.get_cursor("reindex") == ("t1", "c1")
    done = []
    report = rebuilt.reindex(batch=1, progress=done.append)
    assert done == [1], "the second run resumes after the conversation the first one finished"
    assert report.fragments_written == len(rebuilt.state.fragments("t1", "c2"))
    assert rebuilt.state.get_cursor("reindex") is None
    rebuilt.reindex()
    assert (rebuilt.vectors.count(), rebuilt.keywords.count()) == expected
    assert _found(rebuilt, "sourdough starter")


def test_a_data_dir_of_another_text_model_is_refused_then_reencoded_by_reindex(tmp_path, embedder):
    """Vectors of two text models do not mix (nor fit, when their widths differ): a clear refusal naming
    the variable, then ``reindex`` on the new model drops the old vectors and encodes every turn again."""
    from ops.bench import random_models
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    from ops.runtime.assemble import text_model_reencoded

    old = open_engine(Config(data_dir=tmp_path / "data"), embedder=embedder)
    old.ingest(dialogue("c1") + dialogue("c2"))
    expected = old.vectors.count()
    with old.state.transaction():
        old.state.set_cursor("reindex", ("t1", "c1"))  # a reindex of the old model, stopped half way
    old.close()
    model = random_models.sentence_encoder(tmp_path / "model", dim=48)
    config = Config(data_dir=tmp_path / "data", embed_model=str(model), encoder="torch")
    with pytest.raises(ValueError, match="TESSERA_EMBED_MODEL.*tessera reindex"):
        open_engine(config)
    open_engine(config, rebuild=True).close()  # `tessera reindex` stopped before its first conversation
    with pytest.raises(ValueError, match="has not finished"):
        open_engine(config)
    moved = open_engine(config, rebuild=True)
    try:
        assert moved.reencode_needed
        assert moved.state.get_cursor("reindex") is None, "the old walk must not skip conversations"
        report = moved.reindex(reencode=moved.reencode_needed)
        assert report.index_failures == 0 and moved.vectors.count() == expected
        assert moved.query(query("sourdough starter")).fragments
    finally:
        moved.close()
    text_model_reencoded(tmp_path / "data")
    again = open_engine(config)
    assert not again.reencode_needed
    again.close()


def test_a_data_dir_of_another_vector_store_is_refused_then_moved_by_reindex(tmp_path, embedder):
    """Data dirs from before the edge store: a clear refusal, then ``tessera reindex`` moves them over."""
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    old = open_engine(Config(data_dir=tmp_path, vector_store="sqlite"), embedder=embedder)
    old.ingest(dialogue("c1") + dialogue("c2"))
    expected = old.vectors.count()
    old.close()
    with pytest.raises(ValueError, match="tessera reindex"):
        open_engine(Config(data_dir=tmp_path, vector_store="edge"), embedder=embedder)
    moved = open_engine(Config(data_dir=tmp_path, vector_store="edge"), embedder=embedder, rebuild=True)
    try:
        assert not (tmp_path / "vectors.sqlite").exists(), "the old store's files are dropped"
        moved.reindex()
        assert moved.vectors.count() == expected
        assert _found(moved, "sourdough starter")
    finally:
        moved.close()
    again = open_engine(Config(data_dir=tmp_path, vector_store="edge"), embedder=embedder)
    again.close()
