"""The SQLite vector store's in-memory copies: several processes, the change log, compaction."""

import numpy as np
import pytest

from indexer.model import EVERYONE, SearchFilter, Unit
from indexer.stores.sqlite_vectors import SqliteVectorStore
from indexer.stores.vector_index import VectorIndex

DIM = 8


def unit(i, vec, tenant="t1", conv="c1", visible=(EVERYONE,), sender="s1", ts=100.0, kind="turn"):
    v = np.zeros(DIM, dtype=np.float32)
    v[vec] = 1.0
    return Unit(f"u{i}", kind, tenant, conv, "f-" + conv, [f"m{i}"], [sender], list(visible), ts, ts, f"text {i}", v)


def ids(hits):
    return [h.unit_id for h in hits]


def q(dim_index):
    v = np.zeros(DIM, dtype=np.float32)
    v[dim_index] = 1.0
    return v


def test_writes_of_one_process_reach_the_copy_of_another(tmp_path):
    writer = SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM)
    reader = SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM)
    flt = SearchFilter("t1", "alice")
    writer.upsert([unit(1, 0), unit(2, 1)])
    assert ids(reader.search(q(0), "turn", flt, 5)) == ["u1", "u2"]
    writer.upsert([unit(1, 1)])
    writer.delete(["u2"])
    writer.upsert([unit(3, 0, kind="window")])
    assert ids(reader.search(q(1), "turn", flt, 5)) == ["u1"]
    assert reader.search(q(1), "turn", flt, 5)[0].score == pytest.approx(1.0)
    assert ids(reader.search(q(0), "window", flt, 5)) == ["u3"]


def test_a_copy_older_than_the_trimmed_log_reloads(tmp_path, monkeypatch):
    monkeypatch.setattr("indexer.stores.sqlite_vectors.LOG_KEEP", 2)
    writer = SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM)
    reader = SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM)
    flt = SearchFilter("t1", "alice")
    writer.upsert([unit(1, 0), unit(2, 1)])
    assert len(reader.search(q(0), "turn", flt, 5)) == 2
    writer.delete(["u1"])
    writer.upsert([unit(4, 2)])
    writer.compact()
    assert writer._db.execute("SELECT count(*) FROM vector_log").fetchone()[0] == 0
    assert sorted(ids(reader.search(q(0), "turn", flt, 5))) == ["u2", "u4"]
    writer.upsert([unit(5, 3)])
    assert sorted(ids(reader.search(q(3), "turn", flt, 5))) == ["u2", "u4", "u5"]
    fresh = SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM)
    assert sorted(ids(fresh.search(q(3), "turn", flt, 5))) == ["u2", "u4", "u5"]
    assert reader.full_loads == 1


def test_an_erasure_costs_other_processes_what_was_erased(tmp_path):
    """Before, every erasure emptied the change log, and every process reloaded every vector."""
    writer = SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM)
    reader = SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM)
    flt = SearchFilter("t1", "alice")
    writer.upsert([unit(i, i % DIM) for i in range(300)])
    assert len(reader.search(q(0), "turn", flt, 500)) == 300
    writer.delete(["u0"])
    writer.compact()
    assert "u0" not in ids(reader.search(q(0), "turn", flt, 500))
    assert reader.full_loads == 0, "the other process caught up from the log"
    assert not [name for name in tmp_path.iterdir() if name.name.endswith("-wal") and name.stat().st_size], \
        "the write-ahead log is checkpointed and truncated"


def test_rewrites_compact_the_copy_and_keep_every_filter():
    from indexer.stores.vector_index import IndexRow

    rng = np.random.default_rng(3)
    index = VectorIndex(DIM)
    rows, truth = {}, {}
    for rnd in range(12):
        batch = []
        for i in range(1000):
            rowid = rnd * 1000 + i
            conv = f"c{i % 7}"
            visible = ("alice", "bob") if i % 7 < 3 else ((EVERYONE,) if i % 7 == 3 else ("carol",))
            batch.append(IndexRow(rowid, "t1" if i % 5 else "t2", conv, (f"s{i % 3}",), visible, float(i), float(i)))
        vectors = rng.normal(size=(1000, DIM)).astype(np.float32)
        index.add(batch, vectors)
        for r, v in zip(batch, vectors):
            rows[r.rowid], truth[r.rowid] = r, v
        # Each round rewrites (removes) most of the previous one, as re-segmentation does.
        for rowid in range((rnd - 1) * 1000, (rnd - 1) * 1000 + 900) if rnd else ():
            index.remove(rowid)
            del rows[rowid], truth[rowid]
    assert index.n < 12 * 1000
    query = rng.normal(size=DIM).astype(np.float32)
    for flt in [SearchFilter("t1", "alice"), SearchFilter("t2", "carol", sent_after=500.0),
                SearchFilter("t1", "bob", conversation_id="c1", sender_ids=("s1",)), SearchFilter("t1", "mallory")]:
        expected = sorted(
            (rid for rid, r in rows.items() if r.tenant_id == flt.tenant_id
             and (flt.user_id in r.visible_to or EVERYONE in r.visible_to)
             and (flt.conversation_id is None or r.conversation_id == flt.conversation_id)
             and (not flt.sender_ids or set(flt.sender_ids) & set(r.sender_ids))
             and (flt.sent_after is None or r.end_ts >= flt.sent_after)),
            key=lambda rid: (-float(truth[rid] @ query), rid))[:20]
        got = index.search(query, flt, 20)
        assert [rid for rid, _ in got] == expected
        assert all(abs(score - float(truth[rid] @ query)) < 1e-4 for rid, score in got)
