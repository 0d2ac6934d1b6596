"""One conformance suite for every conversation-state backend: SQLite (embedded) and PostgreSQL.

What the engine relies on: transactions that commit together or not at all, the stamp and tombstone
records, pending marks, a version sequence that only grows across processes, per-conversation locks
that exclude another writer (and a try that never waits), resumable cursors, and erasure.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from indexer.model import FragmentRecord, Turn
from indexer.state import open_state

T = datetime(2026, 5, 1, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgres"])
def make_state(request, tmp_path, new_state_url):
    """``make()`` opens a new state; ``make(same=True)`` another handle on the last one (another process)."""
    opened, where = [], {}

    def make(same: bool = False):
        if not same:
            where["url"] = new_state_url(request.param)
            where["dir"] = tmp_path / f"s{len(opened)}"
        state = open_state(where["url"], where["dir"])
        opened.append(state)
        return state

    yield make
    for state in opened:
        state.close()


def turn(mid: str, text: str, minute: int = 0, vector: bool = False) -> Turn:
    return Turn(mid, "ann", T.replace(minute=minute), text, "Ann",
                vector=np.ones(4, dtype=np.float32) if vector else None)


def test_a_failed_transaction_leaves_nothing(make_state):
    state = make_state()
    with pytest.raises(RuntimeError):
        with state.transaction():
            state.put_turns("t", "c", [(turn("m1", "hello"), None, (1.0, "e1"))])
            raise RuntimeError("boom")
    assert state.get_turn("t", "c", "m1") is None
    with state.transaction():
        state.put_turns("t", "c", [(turn("m1", "hello"), None, (1.0, "e1"))])
    assert make_state(same=True).get_turn("t", "c", "m1").text == "hello", "committed for every reader"


def test_turns_stamps_tombstones_and_vectors(make_state):
    state = make_state()
    with state.transaction():
        state.put_turns("t", "c", [(turn("m1", "one", 1), "m0", (5.0, "e1")), (turn("m2", "two", 2), None, (6.0, "e2"))])
        state.put_tombstones("t", "c", [("m3", (7.0, "e3"))])
        state.put_tombstones("t", "c", [("m3", (9.0, "e4"))])
        state.set_vectors("t", "c", [("m1", np.full(4, 0.5, dtype=np.float32), None)])
    stored = state.stored_turns("t", "c", ["m1", "m2", "m9"])
    assert {m: s for m, (s, _) in stored.items()} == {"m1": (5.0, "e1"), "m2": (6.0, "e2")}
    assert state.tombstones("t", "c", ["m1", "m3"]) == {"m3"}
    assert state.tombstones("t2", "c", ["m3"]) == set(), "tombstones belong to one tenant"
    assert [t.message_id for t in state.turns_without_vector("t", "c")] == ["m2"]
    assert np.allclose(state.turns_by_id("t", "c", ["m1"])["m1"].vector, 0.5)
    assert [t.message_id for t in state.turns("t", "c", (T.replace(minute=2).timestamp(), "m2"))] == ["m2"]
    with state.transaction():
        state.delete_turns("t", "c", ["m1"])
        state.clear_vectors("t", "c")
    assert state.get_turn("t", "c", "m1") is None and state.senders_named("t", ["ann"]) == {"ann"}


def test_the_words_read_off_a_turns_images_are_kept_with_them(make_state):
    from dataclasses import replace

    from indexer.model import ImageInfo

    state = make_state()
    shot, photo = ImageInfo("file:///s.png"), ImageInfo("file:///p.png", "a lake")
    with state.transaction():
        state.put_turns("t", "c", [(replace(turn("m1", "see this"), images=(shot, photo)), None, (1.0, "e1"))])
        state.set_images("t", "c", [("m1", (replace(shot, text="invoice 4471 overdue"), photo))])
    images = make_state(same=True).get_turn("t", "c", "m1").images
    assert images == (ImageInfo("file:///s.png", None, "invoice 4471 overdue"), photo)


def test_vectors_are_kept_in_half_precision_and_earlier_float32_ones_still_read(make_state):
    """A turn's vectors take two bytes a dimension (and a tag) instead of four; vectors an earlier version wrote as
    float32 read as they were."""
    state = make_state()
    rng = np.random.default_rng(2)
    text, image, earlier = (rng.normal(size=384).astype(np.float32) for _ in range(3))
    with state.transaction():
        state.put_turns("t", "c", [(turn("m1", "one", 1), None, (1.0, "e1")), (turn("m2", "two", 2), None, (2.0, "e2"))])
        state.set_vectors("t", "c", [("m1", text, image)])
        state._execute("UPDATE messages SET vector=? WHERE tenant_id=? AND message_id=?", (earlier.tobytes(), "t", "m2"))
    size = state._one("SELECT length(vector), length(image_vector) FROM messages WHERE message_id=?", ("m1",))
    assert tuple(size) == (1 + 2 * 384, 1 + 2 * 384)
    read = state.turns_by_id("t", "c", ["m1", "m2"])
    assert read["m1"].vector.dtype == np.float32 and read["m1"].vector.shape == (384,)
    np.testing.assert_allclose(read["m1"].vector, text, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(read["m1"].image_vector, image, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(read["m2"].vector, earlier)
    assert read["m2"].image_vector is None


def test_turns_are_read_by_key_across_conversations_of_one_tenant(make_state):
    state = make_state()
    with state.transaction():
        state.put_turns("t", "c1", [(turn("m1", "one", 1), None, (1.0, "e1")), (turn("m2", "two", 2), None, (2.0, "e2"))])
        state.put_turns("t", "c2", [(turn("m1", "uno", 1), None, (3.0, "e3"))])
        state.put_turns("t2", "c1", [(turn("m2", "other tenant", 2), None, (4.0, "e4"))])
        state.set_vectors("t", "c1", [("m1", np.full(4, 0.5, dtype=np.float32), None)])
    found = state.turns_by_key("t", [("c1", "m1"), ("c2", "m1"), ("c1", "m9"), ("c3", "m1")])
    assert {key: t.text for key, t in found.items()} == {("c1", "m1"): "one", ("c2", "m1"): "uno"}
    assert found[("c1", "m1")].vector is None, "read without vectors"
    assert {key: t.text for key, t in state.turns_by_key("t2", [("c1", "m2"), ("c1", "m1")]).items()} == \
        {("c1", "m2"): "other tenant"}, "one tenant's turns"
    assert state.turns_by_key("t", []) == {}


def test_participants_and_erasure(make_state):
    state = make_state()
    assert state.conversation("t", "c") is None
    with state.transaction():
        state.set_participants("t", "c", ["bob", "ann", "bob"], (3.0, "e"))
    meta = state.conversation("t", "c")
    assert meta.participants == ["ann", "bob"] and meta.participants_stamp == (3.0, "e") and meta.erased_before is None
    with state.transaction():
        state.put_turns("t", "c", [(turn("m1", "one"), None, (1.0, "e1"))])
        state.put_fragments([FragmentRecord("f1", "t", "c", ("m1",), T, T)])
        state.merge_pending("t", "c", {"full": True}, lambda a, b: b)
        state.erase_conversation("t", "c", 100.0)
    assert state.turns("t", "c") == [] and state.fragments("t", "c") == [] and state.pending() == []
    assert state.tombstones("t", "c", ["m1"]) == {"m1"}
    assert state.conversation("t", "c").erased_before == 100.0


def test_pending_marks_merge_and_come_oldest_first(make_state):
    state = make_state()
    with state.transaction():
        state.merge_pending("t", "b", {"n": [1]}, lambda a, b: {"n": a["n"] + b["n"]})
    time.sleep(0.01)
    with state.transaction():
        state.merge_pending("t", "a", {"n": [2]}, lambda a, b: {"n": a["n"] + b["n"]})
        state.merge_pending("t", "b", {"n": [3]}, lambda a, b: {"n": a["n"] + b["n"]})
    assert state.pending() == [("t", "b", {"n": [1, 3]}), ("t", "a", {"n": [2]})]
    assert state.pending(limit=1) == [("t", "b", {"n": [1, 3]})]
    assert state.pending(only=[("t", "a"), ("t", "zz")]) == [("t", "a", {"n": [2]})]
    with state.transaction():
        state.clear_pending("t", "b")
    assert [p[1] for p in state.pending()] == ["a"]


def test_versions_only_grow_across_handles(make_state):
    first = make_state()
    second = make_state(same=True)
    seen = []
    for state in (first, second, first, second):
        with state.transaction():
            seen.append(state.next_version())
    assert seen == sorted(seen) and len(set(seen)) == 4 and seen[0] >= 1


def test_a_conversation_lock_excludes_other_writers_and_a_try_never_waits(make_state):
    holder = make_state()
    other = make_state(same=True)
    if type(holder).__name__ == "SqliteState":
        pytest.skip("SQLite: a transaction holds the whole file's write lock (covered by the engine tests)")
    locked, release, order = threading.Event(), threading.Event(), []

    def hold():
        with holder.transaction():
            holder.lock_conversations([("t", "c")])
            locked.set()
            release.wait(10)
            order.append("holder done")

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(10)
    with other.transaction():
        assert other.try_lock_conversation("t", "c") is False
        assert other.try_lock_conversation("t", "another") is True
    def wait_for_lock():
        with other.transaction():
            other.lock_conversations([("t", "c")])
            order.append("other locked")

    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    time.sleep(0.3)
    assert order == [], "the second writer waits while the first holds the conversation"
    release.set()
    thread.join(10)
    waiter.join(10)
    assert order == ["holder done", "other locked"]


def test_cursors_and_conversation_walk(make_state):
    state = make_state()
    with state.transaction():
        for conv in ("b", "a", "c"):
            state.put_turns("t", conv, [(turn("m1", "x"), None, (1.0, "e"))])
        state.set_cursor("reindex", ("t", "a"))
    assert state.get_cursor("reindex") == ("t", "a")
    assert state.conversations(("t", "a"), 10) == [("t", "b"), ("t", "c")]
    assert state.conversations(None, 2) == [("t", "a"), ("t", "b")]
    with state.transaction():
        state.set_cursor("reindex", None)
    assert state.get_cursor("reindex") is None


def test_opening_an_existing_state_again_migrates_nothing_and_keeps_everything(make_state):
    state = make_state()
    with state.transaction():
        state.put_turns("t", "c", [(turn("m1", "kept"), None, (1.0, "e"))])
    again = make_state(same=True)
    assert again.get_turn("t", "c", "m1").text == "kept"
    assert again.counts()["messages"] == 1


def test_a_sqlite_state_from_before_stamps_and_tombstones_is_migrated(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "state.sqlite")
    old.executescript("""
        CREATE TABLE conversations (tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, participants TEXT,
            PRIMARY KEY (tenant_id, conversation_id));
        CREATE TABLE messages (tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL,
            sender_id TEXT NOT NULL, sender_name TEXT, sent_at TEXT NOT NULL, sent_ts REAL NOT NULL,
            text TEXT NOT NULL, images TEXT NOT NULL, reply_to TEXT, vector BLOB,
            PRIMARY KEY (tenant_id, conversation_id, message_id));
        INSERT INTO conversations VALUES ('t', 'c', '["ann"]');
        INSERT INTO messages VALUES ('t', 'c', 'm1', 'ann', 'Ann', '2026-05-01T00:00:00+00:00', 0, 'old', '[]',
            NULL, NULL);
    """)
    old.close()
    state = open_state(None, tmp_path)
    try:
        assert state.get_turn("t", "c", "m1").text == "old"
        assert state.stored_turns("t", "c", ["m1"])["m1"][0] == (0.0, "")
        assert state.conversation("t", "c").participants == ["ann"]
        assert state.conversation("t", "c").participants_stamp == (0.0, "")
        with state.transaction():
            state.put_tombstones("t", "c", [("m2", (1.0, "e"))])
            assert state.next_version() == 1
    finally:
        state.close()


def test_writers_of_one_tenant_naming_the_same_senders_in_any_order_never_deadlock(make_state):
    """Two workers, each holding other conversations of one tenant, write turns by the same two people
    in opposite orders. The sender-name lookup rows they share are written at commit, in one sorted
    batch, so neither waits for the other while holding what the other needs (on PostgreSQL, inserting
    them as each turn came raised DeadlockDetected in the order-independence property test)."""
    first = make_state()
    second = make_state(same=True)
    if type(first).__name__ == "SqliteState":
        pytest.skip("SQLite: one writer at a time holds the whole file")

    def by(sender: str, name: str, mid: str) -> list:
        return [(Turn(mid, sender, T, "hello", name), None, (1.0, f"e-{mid}"))]

    first_wrote, second_wrote, errors = threading.Event(), threading.Event(), []

    def run_second():
        try:
            with second.transaction():
                second.put_turns("t", "c2", by("ann", "Ann", "m2"))
                second_wrote.set()
                assert first_wrote.wait(10)
                second.put_turns("t", "c3", by("bob", "Bob", "m3"))
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_second)
    with first.transaction():
        first.put_turns("t", "c1", by("bob", "Bob", "m1"))
        thread.start()
        assert second_wrote.wait(10)
        first_wrote.set()
        time.sleep(0.5)  # the other writer is now at its second turn
        first.put_turns("t", "c4", by("ann", "Ann", "m4"))
    thread.join(30)
    assert not errors, errors
    assert first.senders_named("t", ["ann", "bob"]) == {"ann", "bob"}


def test_aliases_name_a_sender_once_heard_in_enough_fragments_and_leave_with_them(make_state):
    state = make_state()
    with state.transaction():
        state.put_turns("t", "c", [(turn("m1", "one"), None, (1.0, "e1"))])
        state.put_sender_aliases("t", "c", {"f1": [("mel", "melanie"), ("sarah", "bob")]})
    assert state.senders_named("t", ["mel"]) == set(), "heard in one fragment only"
    with state.transaction():
        state.put_sender_aliases("t", "c", {"f2": [("mel", "melanie")], "f3": [("mel", "melanie")]})
    assert state.senders_named("t", ["mel", "sarah"]) == {"melanie"}
    assert state.senders_named("t2", ["mel"]) == set(), "aliases belong to one tenant"
    with state.transaction():
        state.put_sender_aliases("t", "c", {"f2": [("sarah", "bob")], "f3": []})
    assert state.senders_named("t", ["mel", "sarah"]) == {"bob"}, "a fragment's aliases are replaced, not added"
    with state.transaction():
        state.delete_fragments(["f1"])
    assert state.senders_named("t", ["sarah"]) == set()
    with state.transaction():
        state.put_sender_aliases("t", "c", {"f4": [("mel", "melanie")], "f5": [("mel", "melanie")]})
        state.put_sender_aliases("t", "c2", {"f6": [("mel", "melanie")], "f7": [("mel", "melanie")]})
        state.erase_conversation("t", "c", 10.0)
    assert state.senders_named("t", ["mel"]) == {"melanie"}, "the other conversation still says it"
    with state.transaction():
        state.forget_sender_tokens("t", "melanie")
    assert state.senders_named("t", ["mel"]) == set()
