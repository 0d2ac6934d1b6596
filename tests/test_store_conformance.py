"""One contract for every store backend: idempotent upsert, delete, filters inside the store."""

import dataclasses
import json
import os
import uuid

import numpy as np
import pytest

from indexer import ids
from indexer.model import EVERYONE, HIT_FIELDS, SearchFilter, Unit
from indexer.stores.fts5 import SqliteBM25Store, match_expression
from indexer.stores.sqlite_vectors import SqliteVectorStore
from indexer.ingest.units import vector_units
from indexer.stores import edge
from indexer.stores.edge import (
    OPTIMIZE_EVERY, SEARCH_THREADS, SEGMENTS, TURN_BM25_VECTOR, EdgeBM25Store, EdgeVectorStore,
)
from indexer.stores.qdrant import QdrantVectorStore
from tests.conftest import sparse_index_types

DIM = 8


def one_hot(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def unit(uid, text, vec, tenant="t1", conv="c1", visible=(EVERYONE,), sender="s1", ts=100.0, kind="turn"):
    """A unit of message ``uid``, with the id the ingestor gives it (``units.fragment_units``)."""
    return Unit(ids.turn_unit_id(tenant, conv, uid, kind), kind, tenant, conv, "f-" + conv, [uid], [sender],
                list(visible), ts, ts, text, one_hot(vec))


def _elasticsearch(tmp_path):
    from indexer.stores.elasticsearch import ElasticsearchBM25Store

    return ElasticsearchBM25Store(os.environ["TESSERA_ES_URL"], prefix=f"tessera-test-{uuid.uuid4().hex[:8]}",
                                  api_key=os.environ.get("TESSERA_ES_API_KEY"))


def _qdrant_server(tmp_path):
    return QdrantVectorStore(url=os.environ["TESSERA_QDRANT_URL"], prefix=f"tessera_test_{uuid.uuid4().hex[:8]}",
                             dim=DIM, api_key=os.environ.get("TESSERA_QDRANT_API_KEY"))


class EdgeWindowsPair:
    """The edge keyword store whose lists live on the vector store's window points (``windows``), written as the
    ingestor writes both (``Ingestor.write_units``), a window with each turn and the two deleted together: the
    keyword suite runs on what it searches. A turn written without its window gets one of the same payload.
    ``batch``: searched as the query path searches it, in a batch with the dense list (``search_batch``)."""

    def __init__(self, path, optimize_every=OPTIMIZE_EVERY, batch=False):
        self.vectors = EdgeVectorStore(path / "e", dim=DIM, window_bm25=True, optimize_every=optimize_every)
        self.keywords = EdgeBM25Store(path / "k", windows=self.vectors, optimize_every=optimize_every)
        self.window_of: dict[str, str] = {}
        self.batch = batch

    def upsert(self, units):
        given = {u.unit_id for u in units}
        windows = []
        for u in units:
            if u.kind == "turn":
                window = ids.turn_unit_id(u.tenant_id, u.conversation_id, u.message_ids[0], "window")
                self.window_of[u.unit_id] = window
                if window not in given:
                    windows.append(dataclasses.replace(u, unit_id=window, kind="window", image_vector=None))
        self.vectors.upsert(vector_units(units) + windows)
        self.keywords.upsert(units)

    def delete(self, unit_ids):
        self.vectors.delete(list(unit_ids) + [self.window_of[i] for i in unit_ids if i in self.window_of])
        self.keywords.delete(unit_ids)

    def search(self, text, kind, flt, limit):
        if self.batch and kind != "fragment":
            return self.keywords.search_batch(text, [(kind, limit)], one_hot(0), limit, flt)[0][0]
        return self.keywords.search(text, kind, flt, limit)

    def count(self, tenant_id=None):
        return self.keywords.count(tenant_id)

    def refresh(self):
        self.vectors.refresh()
        self.keywords.refresh()

    def compact(self):
        self.keywords.compact()
        self.vectors.compact()

    def close(self):
        self.keywords.close()
        self.vectors.close()


BACKENDS = {
    "bm25-sqlite": lambda tmp_path: SqliteBM25Store(tmp_path / "b.sqlite"),
    "qdrant-local": lambda tmp_path: QdrantVectorStore(path=tmp_path / "q", dim=DIM),
    "qdrant-edge": lambda tmp_path: EdgeVectorStore(tmp_path / "e", dim=DIM),
    "bm25-edge": lambda tmp_path: EdgeBM25Store(tmp_path / "k"),
    # Every write runs the optimizer: the same contract on immutable, quantized segments.
    "qdrant-edge-optimized": lambda tmp_path: EdgeVectorStore(tmp_path / "e", dim=DIM, optimize_every=1),
    "bm25-edge-optimized": lambda tmp_path: EdgeBM25Store(tmp_path / "k", optimize_every=1),
    "bm25-edge-windows": lambda tmp_path: EdgeWindowsPair(tmp_path),
    "bm25-edge-windows-optimized": lambda tmp_path: EdgeWindowsPair(tmp_path, optimize_every=1),
    "bm25-edge-windows-batch": lambda tmp_path: EdgeWindowsPair(tmp_path, batch=True),
    "vectors-sqlite": lambda tmp_path: SqliteVectorStore(tmp_path / "v.sqlite", dim=DIM),
    "elasticsearch": _elasticsearch,
    "qdrant-server": _qdrant_server,
}
#: Server backends run when their URL is set (no server can be installed on these machines).
NEEDS = {"elasticsearch": "TESSERA_ES_URL", "qdrant-server": "TESSERA_QDRANT_URL"}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path):
    needed = NEEDS.get(request.param)
    if needed and not os.environ.get(needed):
        pytest.skip(f"{request.param}: set {needed} to run the conformance suite against a server")
    s = BACKENDS[request.param](tmp_path)
    yield s
    _drop(s)
    s.close()


def _drop(s) -> None:
    """Server backends remove what the test created."""
    if hasattr(s, "indexes"):
        for index in s.indexes.values():
            s.client.indices.delete(index=index, ignore_unavailable=True)
        s.client.indices.delete_index_template(name=f"{s.prefix}-units")
    elif getattr(s, "remote", False):
        for name in s.collections.values():
            s.client.delete_collection(name)


def search(store, probe_text, probe_vec, flt, kind="turn", refresh=True):
    """``refresh=False`` searches the segments as written (an edge store's refresh runs its optimizer)."""
    if refresh:
        store.refresh()
    if not hasattr(store, "dim"):  # a keyword store
        hits = store.search(probe_text, kind, flt, 10)
    else:
        hits = store.search(one_hot(probe_vec), kind, flt, 10)
    return [h.payload["message_ids"][0] for h in hits]


def found_alike(stores, probe_text, probe_vec, flt):
    """What two edge stores of the same units find: every visible point (the limit covers them all), with scores
    within the error of what each segment keeps. Keyword stores keep a posting's weight in one byte, scaled per
    posting list and so per segment: within 0.5% (0.1% measured here). Vector stores, where one scores quantized
    copies, within 4 bits a dimension's error: up to 0.18 at these 8 dimensions over repeated runs, against 0.09
    with int8. Ranks are not compared: both errors swap near ties (at 8 dimensions the codes' random rotation does
    from run to run)."""
    if not hasattr(stores[0], "dim"):
        a, b = ({h.unit_id: h.score for h in s.search(probe_text, "turn", flt, 1000)} for s in stores)
        return a.keys() == b.keys() and bool(a) and all(a[k] == pytest.approx(b[k], rel=0.005) for k in a)
    a, b = ({h.unit_id: h.score for h in s.search(one_hot(probe_vec), "turn", flt, 1000)} for s in stores)
    return a.keys() == b.keys() and bool(a) and max(abs(a[k] - b[k]) for k in a) <= 0.25


UNITS = [
    unit("a", "glacier hike", 0),
    unit("b", "glacier photo", 1, visible=("ann",)),
    unit("c", "glacier trip", 2, tenant="t2"),
    unit("d", "glacier night", 3, conv="c2", sender="s2", ts=500.0),
]


def test_upsert_is_idempotent_and_delete_removes(store):
    store.upsert(UNITS)
    store.upsert(UNITS)
    assert store.count() == 4 and store.count("t1") == 3
    store.delete([UNITS[0].unit_id, "00000000-0000-0000-0000-000000000000"])
    assert store.count("t1") == 2
    assert "a" not in search(store, "glacier", 0, SearchFilter("t1", "ann"))


def test_tenant_and_visibility_filters(store):
    store.upsert(UNITS)
    assert set(search(store, "glacier", 1, SearchFilter("t1", "bob"))) == {"a", "d"}
    assert set(search(store, "glacier", 1, SearchFilter("t1", "ann"))) == {"a", "b", "d"}
    assert set(search(store, "glacier", 2, SearchFilter("t2", "ann"))) == {"c"}
    assert search(store, "glacier", 0, SearchFilter("t3", "ann")) == []


def test_narrowing_filters(store):
    store.upsert(UNITS)
    assert search(store, "glacier", 0, SearchFilter("t1", "ann", conversation_id="c2")) == ["d"]
    assert search(store, "glacier", 0, SearchFilter("t1", "ann", sender_ids=("s2",))) == ["d"]
    assert search(store, "glacier", 0, SearchFilter("t1", "ann", sent_after=400.0)) == ["d"]
    assert set(search(store, "glacier", 0, SearchFilter("t1", "ann", sent_before=400.0))) == {"a", "b"}
    assert search(store, "glacier", 0, SearchFilter("t1", "ann"), kind="fragment") == []


def test_narrowing_filters_never_widen_visibility(store):
    """A narrowing condition joins the visibility condition; it never stands in for it."""
    store.upsert(UNITS)
    assert set(search(store, "glacier", 1, SearchFilter("t1", "bob", conversation_id="c1", sent_before=400.0))) == {"a"}
    assert set(search(store, "glacier", 1, SearchFilter("t1", "bob", sent_before=400.0))) == {"a"}
    assert search(store, "glacier", 2, SearchFilter("t3", "ann", conversation_id="c1")) == []
    assert search(store, "glacier", 2, SearchFilter("t2", "ann", conversation_id="c2")) == []


def test_hits_carry_the_fields_fusion_reads(store):
    """``HIT_FIELDS``, as written: fusion keys on them, spans name them, dating reads the time."""
    many = Unit(str(uuid.uuid5(uuid.NAMESPACE_OID, "w")), "window", "t1", "c1", "f-c1", ["m1", "m2", "m3"],
                ["s1", "s2"], [EVERYONE], 123.25, 130.0, "glacier hike at dawn", unit("w", "", 0).vector)
    store.upsert([many])
    store.refresh()
    probe = "glacier" if not hasattr(store, "dim") else many.vector
    [hit] = store.search(probe, "window", SearchFilter("t1", "ann"), 10)
    assert {key: hit.payload[key] for key in HIT_FIELDS} == {
        "conversation_id": "c1", "fragment_id": "f-c1", "message_ids": ["m1", "m2", "m3"],
        "sender_ids": ["s1", "s2"], "start_ts": 123.25}


def test_ranking_puts_the_better_match_first(store):
    store.upsert(UNITS)
    assert search(store, "hike", 0, SearchFilter("t1", "ann"))[0] == "a"


@pytest.mark.parametrize("idf_sample_min", [10**9, 1], ids=["all-visible", "sampled"])
@pytest.mark.parametrize("optimize_every", [10**9, 1], ids=["appendable", "optimized"])
def test_edge_bm25_scores_read_nothing_of_what_the_user_cannot_see(tmp_path, monkeypatch, optimize_every,
                                                                   idf_sample_min):
    """IDF is counted over the points the asking user may see: another user's private conversation in the same
    tenant, or another tenant, full of the query's words, changes neither the user's hits nor their scores (a
    tenant-wide IDF told a user how common a word was in conversations they are not part of). The same holds
    when it is counted over the IDF sample (here every point is in it, the others' points too)."""
    monkeypatch.setattr(edge, "IDF_SAMPLE_EVERY", 1)
    store = EdgeBM25Store(tmp_path / "k", optimize_every=optimize_every, idf_sample_min=idf_sample_min)
    store.upsert([unit("a", "glacier hike", 0), unit("b", "river walk", 1, conv="c2", visible=("ann", "bob"))])
    flt = SearchFilter("t1", "ann")

    def found():
        store.refresh()
        return [(h.payload["message_ids"][0], round(h.score, 6)) for h in store.search("glacier river", "turn", flt, 10)]

    before = found()
    assert [m for m, _ in before] and {m for m, _ in before} == {"a", "b"}
    store.upsert([unit(f"p{i}", "glacier glacier", 2, conv="c3", visible=("carl", "dina")) for i in range(20)])
    store.upsert([unit(f"o{i}", "glacier", 3, tenant="t2") for i in range(20)])
    assert found() == before
    store.close()


@pytest.mark.parametrize("optimize_every", [OPTIMIZE_EVERY, 1], ids=["appendable", "optimized"])
def test_a_batch_of_the_lists_finds_what_a_search_of_each_finds(tmp_path, optimize_every):
    """The query path searches the BM25 turn and window lists and the dense window list in one batch: the same
    hits, the same scores, under every filter, as three searches (``search`` of each store)."""
    pair = EdgeWindowsPair(tmp_path, optimize_every=optimize_every)
    words = ["glacier", "hike", "photo", "trip", "night", "lake", "camp", "storm"]
    units = [unit(f"m{i}", f"{words[i % 8]} {words[(i * 3 + 1) % 8]} glacier", i % DIM, tenant=f"t{i % 2}",
                  conv=f"c{i % 3}", visible=("ann",) if i % 4 == 0 else (EVERYONE,), sender=f"s{i % 2}",
                  ts=100.0 + i) for i in range(40)]
    pair.upsert(units)
    pair.refresh()
    filters = [SearchFilter(tenant_id="t0", user_id="bob"), SearchFilter(tenant_id="t0", user_id="ann"),
               SearchFilter(tenant_id="t1", user_id="bob", conversation_id="c1"),
               SearchFilter(tenant_id="t0", user_id="ann", sender_ids=("s0",), sent_after=110.0, sent_before=130.0),
               SearchFilter(tenant_id="t9", user_id="bob")]
    depths = [("turn", 7), ("window", 100)]

    def listed(hits):
        return [(h.unit_id, round(h.score, 6), h.fragment_key, h.sender_keys) for h in hits]

    for flt in filters:
        for text, vector in (("glacier lake storm", one_hot(3)), ("the and of", one_hot(5)), ("camp night", None)):
            found, dense = pair.keywords.search_batch(text, depths, vector, 9, flt)
            assert [listed(hits) for hits in found] == [listed(pair.keywords.search(text, kind, flt, depth))
                                                        for kind, depth in depths]
            assert listed(dense) == (listed(pair.vectors.search(vector, "window", flt, 9)) if vector is not None
                                     else [])
            theirs = {ids.turn_unit_id(u.tenant_id, u.conversation_id, u.message_ids[0], kind)
                      for u in units if u.tenant_id == flt.tenant_id for kind in ("turn", "window")}
            assert {h.unit_id for hits in found + [dense] for h in hits} <= theirs
        assert any(pair.keywords.search_batch("glacier", depths, one_hot(1), 9, flt)[0]) == (flt.tenant_id != "t9")
    with pytest.raises(ValueError, match="turn, window only"):
        pair.keywords.search_batch("glacier", [("fragment", 5)], None, 5, filters[0])
    with pytest.raises(ValueError, match="windows="):
        EdgeBM25Store(tmp_path / "alone").search_batch("glacier", depths, None, 5, filters[0])
    pair.close()


@pytest.mark.parametrize("windows", [False, True], ids=["own-shards", "on-windows"])
def test_edge_bm25_idf_over_the_sample_once_it_is_large_enough(tmp_path, monkeypatch, windows):
    """Counting IDF over every point a user sees cost 2.5 to 3 ms of a BM25 list at 1M fragments; once the user
    sees ``idf_sample_min`` points of the IDF sample it is counted over those. With every point sampled the
    scores are the same either way; with half of them, the words' weights come from that half."""
    def scores(every, sample_min):
        monkeypatch.setattr(edge, "IDF_SAMPLE_EVERY", every)
        path = tmp_path / uuid.uuid4().hex
        store = EdgeWindowsPair(path, optimize_every=1) if windows else EdgeBM25Store(path, optimize_every=1)
        keywords = store.keywords if windows else store
        keywords.idf_sample_min = sample_min
        store.upsert([unit(f"m{i}", "glacier hike" if i % 3 else "river walk glacier", 0) for i in range(40)])
        keywords.refresh()
        shard = next(iter(keywords.windows.shards.values() if windows else keywords.shards.values()))
        corpus = keywords._idf_corpus(shard, SearchFilter("t1", "ann"))
        found = {h.payload["message_ids"][0]: round(h.score, 5)
                 for h in keywords.search("river glacier", "turn", SearchFilter("t1", "ann"), 40)}
        keywords.close()
        if windows:
            store.vectors.close()
        return ("sample" if corpus.should[0].match.value.endswith("\x1f") else "visible"), found

    assert scores(1, 10**9) == ("visible", scores(1, 1)[1])
    assert scores(1, 1)[0] == "sample"
    key, half = scores(2, 1)
    sampled = [m for m in (f"m{i}" for i in range(40))
               if edge.in_idf_sample(ids.turn_unit_id("t1", "c1", m, "window" if windows else "turn"))]
    assert 0 < len(sampled) < 40
    every_point = scores(2, 10**9)[1]
    assert key == "sample" and set(half) == set(every_point) and half != every_point
    assert scores(2, len(sampled) + 1)[0] == "visible"


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p / "e", dim=DIM), lambda p: EdgeBM25Store(p / "k")])
def test_edge_scope_words_cannot_be_forged_with_the_separator(tmp_path, make):
    """The edge stores filter on one scope word per (tenant, principal) alone; an identifier holding the
    separator could spell another pair's word, so it is refused on both paths instead of searched."""
    store = make(tmp_path)
    try:
        store.upsert(UNITS)
        with pytest.raises(ValueError, match="U\\+001F"):
            search(store, "glacier", 1, SearchFilter("t1\x1fbob", "ann"))
        with pytest.raises(ValueError, match="U\\+001F"):
            store.upsert([unit("x", "glacier", 1, visible=("ann\x1f*",))])
        with pytest.raises(ValueError, match="U\\+001E"):  # the separator of a packed hit's ids
            store.upsert([unit("x\x1ey", "glacier", 1)])
    finally:
        store.close()


@pytest.mark.parametrize("make", [lambda p, n: EdgeVectorStore(p, dim=DIM, optimize_every=n),
                                  lambda p, n: EdgeBM25Store(p, optimize_every=n)], ids=["vectors", "bm25"])
def test_edge_shards_are_optimized_as_points_arrive(tmp_path, make):
    """The engine runs no optimizer of its own: a store that never runs it keeps every point in one appendable
    segment, unquantized, its id map and indexes in RAM. Past ``optimize_every`` points written, the points sit
    in an optimized segment, and a search finds what it found before (``found_alike``)."""
    every = 200
    rng = np.random.default_rng(3)
    units = [unit(f"u{i}", "glacier trip " + " ".join(f"x{j}" for j in range(i)), 0, conv=f"c{i % 7}",
                  visible=(EVERYONE,) if i % 5 else ("ann",)) for i in range(every + 50)]
    for u in units:  # distinct vectors and texts of distinct lengths: no ties to order differently
        u.vector = rng.normal(size=DIM).astype(np.float32)
    optimized, plain = make(tmp_path / "o", every), make(tmp_path / "p", 10**9)
    for s in (optimized, plain):
        for start in range(0, len(units), 50):
            s.upsert(units[start:start + 50])
    info = optimized.shards["turn"].info()
    assert info.segments_count >= 2 and plain.shards["turn"].info().segments_count == 1
    if isinstance(optimized, EdgeVectorStore):
        assert info.indexed_vectors_count >= every and plain.shards["turn"].info().indexed_vectors_count == 0
    for flt in (SearchFilter("t1", "ann"), SearchFilter("t1", "bob"), SearchFilter("t1", "ann", conversation_id="c3")):
        for probe in range(DIM):
            assert found_alike((optimized, plain), "glacier trip", probe, flt)
    optimized.close()
    plain.close()


def test_a_growing_shard_never_holds_more_than_max_appendable_points_appendable(tmp_path):
    """Optimizer runs wait for the shard to double, but never past ``max_appendable`` points written: the
    appendable segment keeps its vectors unquantized in the process's own memory, so a bulk load of any size
    holds at most that many there (uncapped, a shard of 400 points held 140). Every point stays searchable."""
    rng = np.random.default_rng(4)
    capped = EdgeVectorStore(tmp_path / "c", dim=DIM, optimize_every=20, max_appendable=60)
    uncapped = EdgeVectorStore(tmp_path / "u", dim=DIM, optimize_every=20, max_appendable=10**9)
    appendable: dict[str, list[int]] = {"capped": [], "uncapped": []}
    for batch in range(20):
        units = [unit(f"u{batch}-{i}", "glacier trip", 0, conv=f"c{i % 7}") for i in range(20)]
        for u in units:
            u.vector = rng.normal(size=DIM).astype(np.float32)
        for name, store in (("capped", capped), ("uncapped", uncapped)):
            store.upsert(units)
            info = store.shards["turn"].info()
            appendable[name].append(info.points_count - info.indexed_vectors_count)
    assert capped.shards["turn"].info().points_count == 400
    assert max(appendable["capped"]) == 40 and max(appendable["uncapped"]) > 60
    in_c3 = {h.unit_id for h in capped.search(one_hot(0), "turn", SearchFilter("t1", "bob", conversation_id="c3"),
                                                1000)}
    assert in_c3 == {h.unit_id for h in uncapped.search(one_hot(0), "turn", SearchFilter("t1", "bob",
                                                                                          conversation_id="c3"), 1000)}
    assert len(in_c3) == sum(1 for i in range(20) if i % 7 == 3) * 20
    capped.close()
    uncapped.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM, optimize_every=1),
                                  lambda p: EdgeBM25Store(p, optimize_every=1)], ids=["vectors", "bm25"])
def test_edge_segments_lay_out_points_by_tenant_and_conversation(tmp_path, make):
    """The optimizer orders the points of a segment it builds by the keyword indexes marked ``is_tenant``: with
    the conversation among them, a user's points sit in runs, one a conversation, so a search of the few
    conversations a user takes part in reads few pages (at 100k fragments under a 1 GB memory limit, page cache
    included, p99 55 to 61 ms against 178 to 182 ms with the tenant alone)."""
    import json

    store = make(tmp_path / "s")
    store.upsert([unit(f"u{i}", "glacier trip", 0, conv=f"c{i % 3}") for i in range(12)])
    configs = list((tmp_path / "s" / "turn" / "segments").glob("*/payload_index/config.json"))
    assert configs
    for config in configs:
        fields = json.loads(config.read_text())["indexed_fields"]
        assert {k for k, v in fields.items() if v.get("is_tenant")} == {"tenant_id", "conversation_id"}
    store.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM, optimize_every=1),
                                  lambda p: EdgeBM25Store(p, optimize_every=1)], ids=["vectors", "bm25"])
def test_edge_shards_indexed_before_the_conversation_layout_take_it_when_opened(tmp_path, make):
    """A shard whose conversation index was made without ``is_tenant`` (before the layout) gets it again on open,
    and what the optimizer builds after is laid out by conversation; its points stay found."""
    import json

    from qdrant_edge import KeywordIndexParams, UpdateOperation

    store = make(tmp_path / "s")
    store.upsert([unit(f"u{i}", "glacier trip", 0, conv=f"c{i % 3}") for i in range(6)])
    store.shards["turn"].update(UpdateOperation.create_field_index("conversation_id", KeywordIndexParams()))
    assert not store.shards["turn"].info().payload_schema["conversation_id"].params.is_tenant
    store.close()
    store = make(tmp_path / "s")
    assert store.shards["turn"].info().payload_schema["conversation_id"].params.is_tenant
    store.upsert([unit(f"v{i}", "glacier trip", 0, conv=f"c{i % 3}") for i in range(6)])
    newest = max((tmp_path / "s" / "turn" / "segments").glob("*/payload_index/config.json"),
                 key=lambda p: p.stat().st_mtime)
    assert json.loads(newest.read_text())["indexed_fields"]["conversation_id"].get("is_tenant")
    assert len(search(store, "glacier trip", 0, SearchFilter("t1", "bob", conversation_id="c1"))) == 4
    store.close()


@pytest.mark.skipif(not 2 <= SEARCH_THREADS <= 5, reason="one search thread needs one segment; past five, the"
                    " corpus that doubles that often holds ties")
@pytest.mark.parametrize("make", [lambda p, n: EdgeVectorStore(p, dim=DIM, optimize_every=n),
                                  lambda p, n: EdgeBM25Store(p, optimize_every=n)], ids=["vectors", "bm25"])
def test_a_growing_shard_keeps_one_immutable_segment_per_search_thread(tmp_path, make):
    """The optimizer keeps ``SEARCH_THREADS`` immutable segments per shard rather than merging everything into one,
    so that a search of a large shard runs on every core; searches find what a one-segment shard finds."""
    rng = np.random.default_rng(9)
    # Distinct term counts and lengths (i below 13 x 11 x 40): no two scores tie, so both rankings are one order.
    units = [unit(f"u{i}", "glacier " * (1 + i % 13) + "trip " * (1 + i // 13 % 11)
                  + " ".join(f"x{j}" for j in range(i // 143 % 40)), 0, conv=f"c{i % 7}",
                  visible=(EVERYONE,) if i % 5 else ("ann",)) for i in range(100 * 2 ** SEARCH_THREADS + 50)]
    for u in units:
        u.vector = rng.normal(size=DIM).astype(np.float32)
    store, plain = make(tmp_path / "s", 100), make(tmp_path / "p", 10**9)
    for start in range(0, len(units), 50):
        store.upsert(units[start:start + 50])
    plain.upsert(units)
    store.refresh()
    plain.refresh()  # everything was appendable: one immutable segment
    assert store.shards["turn"].info().segments_count == SEGMENTS and plain.shards["turn"].info().segments_count == 2
    for flt in (SearchFilter("t1", "ann"), SearchFilter("t1", "bob", conversation_id="c3")):
        assert all(found_alike((store, plain), "glacier trip x3", probe, flt) for probe in range(DIM))
    store.close()
    plain.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM, optimize_every=10**9),
                                  lambda p: EdgeBM25Store(p, optimize_every=10**9)], ids=["vectors", "bm25"])
def test_a_refresh_optimizes_what_a_bulk_load_left_appendable(tmp_path, make):
    """The end of a bulk load (``refresh``) leaves no point in an appendable segment: each shard's points sit in
    optimized segments (quantized where vectors), searches find what they found before (``found_alike``), and a
    refresh with nothing new written runs nothing."""
    rng = np.random.default_rng(5)
    units = [unit(f"u{i}", "glacier trip " + " ".join(f"x{j}" for j in range(i)), 0, conv=f"c{i % 7}",
                  visible=(EVERYONE,) if i % 5 else ("ann",)) for i in range(120)]
    for u in units:
        u.vector = rng.normal(size=DIM).astype(np.float32)
    store, plain = make(tmp_path / "s"), make(tmp_path / "p")
    for s in (store, plain):
        s.upsert(units)
    flts = (SearchFilter("t1", "ann"), SearchFilter("t1", "bob"), SearchFilter("t1", "ann", conversation_id="c3"))
    assert store.shards["turn"].info().segments_count == 1
    store.refresh()
    info = store.shards["turn"].info()
    assert info.segments_count >= 2 and info.points_count == len(units)
    if isinstance(store, EdgeVectorStore):
        assert info.indexed_vectors_count == len(units)
    assert all(found_alike((store, plain), "glacier trip", probe, flt) for flt in flts for probe in range(DIM))
    segments = sorted(p.name for p in (tmp_path / "s" / "turn" / "segments").iterdir())
    store.refresh()
    assert sorted(p.name for p in (tmp_path / "s" / "turn" / "segments").iterdir()) == segments
    store.close()
    plain.close()


def test_an_optimized_edge_shard_is_searched_on_its_quantized_vectors_alone(tmp_path):
    """Rescoring with the original vectors read them at random for every search (under memory pressure most of a
    dense list's time) and changed no dev-split figure: an optimized shard answers from its quantized copy, so zeroing
    the originals' file changes no result."""
    rng = np.random.default_rng(9)
    units = [unit(f"u{i}", "glacier", 0, conv=f"c{i % 5}", visible=(EVERYONE,) if i % 3 else ("ann",))
             for i in range(150)]
    for u in units:
        u.vector = rng.normal(size=DIM).astype(np.float32)
    store = EdgeVectorStore(tmp_path / "e", dim=DIM, optimize_every=10**9)
    store.upsert(units)
    store.refresh()
    probes = [rng.normal(size=DIM).astype(np.float32) for _ in range(10)]
    flts = (SearchFilter("t1", "ann"), SearchFilter("t1", "bob"))

    def ranked():
        return [[(h.unit_id, round(h.score, 4)) for h in store.search(v, "turn", flt, 20)] for v in probes for flt in flts]

    before = ranked()
    store.close()
    originals = list((tmp_path / "e" / "turn" / "segments").glob("*/vector_storage-text/matrix.dat"))
    assert originals
    for path in originals:
        path.write_bytes(bytes(path.stat().st_size))
    store = EdgeVectorStore(tmp_path / "e", dim=DIM, optimize_every=10**9)
    assert ranked() == before and all(before)
    store.close()


def test_deleting_ids_a_shard_does_not_hold_does_not_run_its_optimizer(tmp_path):
    """Ingest deletes the vector points of every turn without an image, mostly ids no shard holds."""
    store = EdgeVectorStore(tmp_path / "e", dim=DIM, optimize_every=100)
    store.upsert([unit(f"u{i}", "glacier", i % DIM) for i in range(50)])
    store.delete([str(uuid.uuid5(uuid.NAMESPACE_OID, f"gone{i}")) for i in range(300)])
    assert store.shards["turn"].info().segments_count == 1 and store.count() == 50
    store.delete([unit(f"u{i}", "glacier", 0).unit_id for i in range(50)])
    store.upsert([unit(f"v{i}", "glacier", i % DIM) for i in range(50)])
    assert store.shards["turn"].info().segments_count >= 2 and store.count() == 50
    store.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM), lambda p: EdgeBM25Store(p)],
                         ids=["vectors", "bm25"])
def test_an_edge_store_keeps_a_fragment_shard_only_where_fragment_units_were_written(tmp_path, make):
    """Ingest writes no fragment units, and no turn has a text vector: a new store has no shard for what it will
    not hold (an empty shard's log alone maps 17 MB). A data dir written before has one, and deletes must still
    reach it after a restart."""
    store = make(tmp_path / "s")
    assert set(store.shards) == ({"turn", "window"} if isinstance(store, EdgeBM25Store) else {"window"})
    assert store.search(*(("glacier",) if isinstance(store, EdgeBM25Store) else (np.eye(DIM)[0],)),
                        "fragment", SearchFilter("t1", "ann"), 10) == []
    store.upsert([unit("f1", "glacier", 0, kind="fragment"), unit("t1", "glacier", 1)])
    store.close()
    store = make(tmp_path / "s")
    assert set(store.shards) == {"turn", "window", "fragment"} and store.count() == 2
    store.delete([unit("f1", "glacier", 0, kind="fragment").unit_id])
    assert store.count() == 1
    store.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM), lambda p: EdgeBM25Store(p)],
                         ids=["vectors", "bm25"])
def test_each_erasure_turns_the_log_over_though_earlier_ones_did(tmp_path, make):
    """The second erasure meets a log holding the first one's padding in closed segments: no file of the store
    names the erased points afterwards either. (Segment files are told apart by the index they start at, not by
    inode: at 100k fragments the file system gave new segments the inodes of dropped ones.)"""
    store = make(tmp_path / "s")
    units = [unit(f"u{i}", f"glacier {i}", i % DIM) for i in range(6)]
    store.upsert(units)

    def files_naming(ids):
        probes = [p for i in ids for u in [uuid.UUID(i)] for p in (u.bytes, u.bytes_le, str(u).encode())]
        return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "s").rglob("*") if p.is_file()
                      for data in [p.read_bytes().rstrip(b"\0")] if any(probe in data for probe in probes))

    for erased in ([units[0].unit_id], [units[1].unit_id, units[2].unit_id]):
        assert files_naming(erased)
        store.delete(erased)
        store.compact()
        assert files_naming(erased) == []
    assert store.count() == 3
    store.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM), lambda p: EdgeBM25Store(p)],
                         ids=["vectors", "bm25"])
def test_an_erasure_whose_log_does_not_turn_over_fails_loudly(tmp_path, monkeypatch, make):
    """Padding the log has a bound; past it the erasure says the log may still hold erased operations rather
    than report success."""
    from indexer.stores import edge

    store = make(tmp_path / "s")
    store.upsert([unit(f"u{i}", "glacier", i % DIM) for i in range(5)])
    store.delete([unit("u0", "glacier", 0).unit_id])
    monkeypatch.setattr(edge, "_TURN_OVER_LIMIT_MB", 0)
    with pytest.raises(RuntimeError, match="write-ahead log kept its segments"):
        store.compact()
    monkeypatch.undo()
    store.compact()
    assert store.count() == 4
    store.close()


def test_edge_shards_written_with_earlier_optimizer_settings_take_todays(tmp_path):
    import json

    from qdrant_edge import EdgeConfig, EdgeShard, EdgeSparseVectorParams, Modifier

    from indexer.stores.edge import BM25_VECTOR, INDEXING_THRESHOLD_KB

    old = EdgeShard.create(str(tmp_path / "k" / "turn"), EdgeConfig(
        vectors={}, sparse_vectors={BM25_VECTOR: EdgeSparseVectorParams(modifier=Modifier.Idf)}))
    old.close()
    store = EdgeBM25Store(tmp_path / "k")
    store.upsert([unit("a", "glacier hike", 0)])
    assert search(store, "glacier", 0, SearchFilter("t1", "ann")) == ["a"]
    store.close()
    config = json.loads((tmp_path / "k" / "turn" / "edge_config.json").read_text())
    assert config["optimizers"]["indexing_threshold"] == INDEXING_THRESHOLD_KB


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM), lambda p: EdgeBM25Store(p)],
                         ids=["vectors", "bm25"])
def test_edge_tenant_index_stays_on_disk_and_shards_indexed_before_take_it(tmp_path, make):
    """No filter of a search names the tenant (scope words do), so its index is not kept in memory: a shard whose
    tenant index was cached (data dirs written before) has it made again on disk when opened, and counts by
    tenant, which read it, stay right."""
    from qdrant_edge import KeywordIndexParams, Memory, UpdateOperation

    def tenant_memory(store):
        return {str(shard.info().payload_schema["tenant_id"].params.memory) for shard in store.shards.values()}

    store = make(tmp_path / "s")
    assert tenant_memory(store) == {str(Memory.Cold)}
    store.upsert(UNITS)
    for shard in store.shards.values():
        shard.update(UpdateOperation.create_field_index("tenant_id", KeywordIndexParams(is_tenant=True,
                                                                                        memory=Memory.Cached)))
    assert tenant_memory(store) == {str(Memory.Cached)}
    store.close()
    store = make(tmp_path / "s")
    assert tenant_memory(store) == {str(Memory.Cold)}
    assert store.count("t1") == 3 and store.count("t2") == 1
    assert set(search(store, "glacier", 1, SearchFilter("t1", "ann"))) == {"a", "b", "d"}
    store.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM), lambda p: EdgeBM25Store(p)],
                         ids=["vectors", "bm25"])
def test_edge_shards_of_the_earlier_layout_are_migrated(tmp_path, monkeypatch, make):
    """Earlier layouts kept ``HIT_FIELDS`` as five payload fields and their payload indexes in RAM, and had no
    IDF sample; a data dir of theirs is rewritten when opened, and searches find what they found."""
    from qdrant_edge import Memory, PayloadSchemaType, ScrollRequest, UpdateOperation

    from indexer.stores.edge import HIT, INDEX_MEMORY, LAYOUT_MARKER

    def index_memory(store):
        return {(kind, key): info.params and str(info.params.memory) for kind, shard in store.shards.items()
                for key, info in shard.info().payload_schema.items()}

    def todays(store):  # every index where it lives today: the tenant's on disk, the others mapped and cached
        return {(kind, key): str(Memory.Cold if key == "tenant_id" else INDEX_MEMORY)
                for kind, key in index_memory(store)}

    monkeypatch.setattr(edge, "IDF_SAMPLE_EVERY", 2)
    store = make(tmp_path)
    assert index_memory(store) == todays(store)
    store.upsert(UNITS)
    turns = store.shards["turn"]
    for u in UNITS:  # back to the earlier layout: the fields, no packed hit, indexes with default parameters
        turns.update(UpdateOperation.set_payload([u.unit_id], {
            "kind": u.kind, "fragment_id": u.fragment_id, "message_ids": u.message_ids, "visible_to": u.visible_to}))
        turns.update(UpdateOperation.delete_payload([u.unit_id], [HIT]))
        turns.update(UpdateOperation.set_payload([u.unit_id], {"scope": [f"{u.tenant_id}\x1f{p}" for p in u.visible_to]}))
    for key in ("scope", "conversation_id", "sender_ids"):
        turns.update(UpdateOperation.create_field_index(key, PayloadSchemaType.Keyword))
    assert set(index_memory(store).values()) == {str(INDEX_MEMORY), str(Memory.Cold), None}
    store.close()
    (tmp_path / LAYOUT_MARKER).unlink()
    store = make(tmp_path)
    assert set(search(store, "glacier", 1, SearchFilter("t1", "ann"))) == {"a", "b", "d"}
    assert search(store, "glacier", 1, SearchFilter("t1", "bob", conversation_id="c2")) == ["d"]
    records, _ = store.shards["turn"].scroll(ScrollRequest(limit=10, with_payload=True))
    assert len(records) == 4 and all(set(r.payload) == {"tenant_id", "conversation_id", "sender_ids", "start_ts",
                                                         "end_ts", "scope", HIT} for r in records)
    by_id = {u.unit_id: u for u in UNITS}
    sampled = [r for r in records if edge.in_idf_sample(str(r.id))]
    assert 0 < len(sampled) < 4
    for r in records:  # the scope words, then their sample words where the point is in the sample
        words = [f"{by_id[str(r.id)].tenant_id}\x1f{p}" for p in by_id[str(r.id)].visible_to]
        assert r.payload["scope"] == words + ([w + "\x1f" for w in words] if r in sampled else [])
    assert index_memory(store) == todays(store)
    assert (tmp_path / LAYOUT_MARKER).exists()
    store.close()


@pytest.mark.parametrize("make", [lambda p: EdgeVectorStore(p, dim=DIM), lambda p: EdgeBM25Store(p)],
                         ids=["vectors", "bm25"])
def test_an_edge_store_is_opened_by_one_owner_at_a_time(tmp_path, make):
    """Two writers of the same shards would corrupt them: a second opener gets a clear error until the first
    closes (the lock is on an open file, so a second process is refused the same way)."""
    first = make(tmp_path)
    with pytest.raises(RuntimeError, match="open in another process"):
        make(tmp_path)
    first.close()
    second = make(tmp_path)
    second.upsert(UNITS)
    assert second.count() == 4
    second.close()


def test_an_edge_store_that_fails_to_open_lets_its_directory_go(tmp_path):
    """Turning on image vectors over a data dir written without them is refused, and the refusal leaves the
    directory free for the store that fits it."""
    EdgeVectorStore(tmp_path, dim=DIM).close()
    with pytest.raises(ValueError, match="without the 'image' vector"):
        EdgeVectorStore(tmp_path, dim=DIM, image_dim=4)
    store = EdgeVectorStore(tmp_path, dim=DIM)
    store.upsert(UNITS)
    assert store.count() == 4
    store.close()


def test_query_syntax_never_reaches_fts():
    assert match_expression('glacier" OR tenant_id:* NEAR(') == '"glacier" OR "tenant" OR "id" OR "near"'
    assert match_expression("  ") is None


def test_qdrant_local_files_use_write_ahead_logging(tmp_path):
    store = QdrantVectorStore(path=tmp_path / "q", dim=DIM)
    try:
        assert store.local_journal == "wal"
    finally:
        store.close()


def test_bm25_data_dirs_from_before_scope_words_are_migrated(tmp_path):
    import json
    import sqlite3

    path = tmp_path / "b.sqlite"
    SqliteBM25Store(path).close()
    db = sqlite3.connect(path)
    for kind in ("turn", "window", "fragment"):
        db.execute(f"DROP TABLE bm25_{kind}")
        db.execute(f"CREATE VIRTUAL TABLE fts_{kind} USING fts5(text, tokenize='porter unicode61')")
    db.execute("INSERT INTO units VALUES (7, 'u7', 'turn', 't1', 'c1', 'f1', '[\"m7\"]', '[\"s1\"]', ?, 1.0, 1.0)",
               (json.dumps(["alice"]),))
    db.execute("INSERT INTO unit_principals VALUES (7, 'alice')")
    db.execute("INSERT INTO fts_turn(rowid, text) VALUES (7, 'the glacier photo')")
    db.commit()
    db.close()
    store = SqliteBM25Store(path)
    assert [h.unit_id for h in store.search("glacier", "turn", SearchFilter("t1", "alice"), 5)] == ["u7"]
    assert store.search("glacier", "turn", SearchFilter("t1", "bob"), 5) == []
    assert store.search("glacier", "turn", SearchFilter("t2", "alice"), 5) == []
    store.close()


def test_qdrant_collections_created_by_another_process_in_between_are_used(tmp_path, monkeypatch):
    """First start of a fleet: every process looks, finds no collection, and creates it; the losers
    of that race get the engine's "already exists" answer and go on with the winner's collection."""
    from qdrant_client import QdrantClient

    QdrantVectorStore(path=tmp_path / "q", dim=DIM).close()
    looked: set[str] = set()
    real = QdrantClient.collection_exists

    def first_look_misses(self, name):
        if name not in looked:
            looked.add(name)
            return False
        return real(self, name)

    monkeypatch.setattr(QdrantClient, "collection_exists", first_look_misses)
    store = QdrantVectorStore(path=tmp_path / "q", dim=DIM)
    assert looked == set(store.collections.values())
    store.close()


def message(uid, turn_text, window_text, vec, **kw):
    """A message's two units as ingest makes them: its turn and its window, with one payload."""
    return [unit(uid, turn_text, vec, **kw), unit(uid, window_text, vec, kind="window", **kw)]


MESSAGES = (message("wa", "glacier hike", "glacier hike at dawn", 0) + message("wb", "river walk",
            "river walk, glacier later", 1) + message("wc", "glacier photo", "glacier photo", 2, visible=("ann",)))


def _both_lists(store, flt):
    return [[(h.unit_id, round(h.score, 5)) for h in store.search("glacier hike", kind, flt, 10)]
            for kind in ("turn", "window")]


def test_a_message_is_one_point_for_every_list_when_the_keyword_store_searches_the_vector_stores_windows(tmp_path):
    """With ``windows``, the keyword store writes no point of its own: the vector store's window points hold the
    terms of the window and of its turn, and both lists find what a keyword store of its own finds, with the same
    unit ids and scores."""
    own = EdgeBM25Store(tmp_path / "own")
    own.upsert(MESSAGES)
    pair = EdgeWindowsPair(tmp_path / "pair")
    pair.upsert(MESSAGES)
    flt = SearchFilter("t1", "bob")
    for store in (own, pair):
        store.refresh()
    expected = _both_lists(own, flt)
    assert [len(found) for found in expected] == [1, 2]
    assert _both_lists(pair, flt) == expected
    assert not any((tmp_path / "pair" / "k" / kind).exists() for kind in ("turn", "window"))
    assert pair.vectors.count() == 3 and pair.keywords.count() == 3 and pair.keywords.count("t2") == 0
    pair.delete([u.unit_id for u in MESSAGES[:2]])
    assert [[unit_id for unit_id, _ in found] for found in _both_lists(pair, flt)] == [[], [MESSAGES[3].unit_id]]
    own.close()
    pair.close()


def test_turn_terms_need_their_window_point(tmp_path):
    """The ingestor writes a fragment's windows before its turns' terms; a turn whose window is not there would be
    in no list, so it is an error rather than a loss."""
    pair = EdgeWindowsPair(tmp_path)
    with pytest.raises(ValueError, match="window points"):
        pair.keywords.upsert(MESSAGES[:1])
    pair.close()


@pytest.mark.parametrize("optimize_every", [10**9, 1], ids=["appendable", "optimized"])
def test_a_data_dir_with_the_keyword_stores_own_shards_gives_their_terms_to_the_vector_store(tmp_path,
                                                                                           optimize_every):
    """A data dir written before window points held the keyword lists' terms: reopened, the vector store's window
    shard takes the two sparse vectors and the keyword store's window and turn terms, then the keyword store's
    shards go; searches find what they found, with the same unit ids and scores."""
    vectors = EdgeVectorStore(tmp_path / "e", dim=DIM, optimize_every=optimize_every)
    keywords = EdgeBM25Store(tmp_path / "k", optimize_every=optimize_every)
    vectors.upsert(vector_units(MESSAGES))
    keywords.upsert(MESSAGES)
    keywords.refresh()
    flt = SearchFilter("t1", "ann")
    before = _both_lists(keywords, flt)
    assert [len(found) for found in before] == [2, 3]
    keywords.close()
    vectors.close()
    pair = EdgeWindowsPair(tmp_path, optimize_every=optimize_every)
    assert not any((tmp_path / "k" / kind).exists() for kind in ("turn", "window"))
    assert _both_lists(pair, flt) == before
    pair.close()
    reopened = EdgeWindowsPair(tmp_path, optimize_every=optimize_every)
    assert _both_lists(reopened, flt) == before and reopened.keywords.count() == 3
    reopened.close()


def test_a_data_dir_whose_windows_hold_their_own_terms_only_takes_the_turns_terms(tmp_path):
    """The layout between: window points with the window's terms, turns in the keyword store's own shard."""
    from qdrant_edge import EdgeShard, UpdateOperation

    pair = EdgeWindowsPair(tmp_path)
    pair.upsert(MESSAGES)
    pair.refresh()
    flt = SearchFilter("t1", "ann")
    before = _both_lists(pair, flt)
    pair.close()
    window = tmp_path / "e" / "window"
    shard = EdgeShard.load(str(window))
    shard.update(UpdateOperation.delete_vector_name(TURN_BM25_VECTOR))
    shard.flush()
    shard.close()
    keywords = EdgeBM25Store(tmp_path / "k")
    keywords.upsert([u for u in MESSAGES if u.kind == "turn"])
    keywords.close()
    assert TURN_BM25_VECTOR not in json.loads((window / "edge_config.json").read_text())["sparse_vectors"]
    reopened = EdgeWindowsPair(tmp_path)
    assert not (tmp_path / "k" / "turn").exists() and _both_lists(reopened, flt) == before
    reopened.close()


def _keyed(hits, tenant_id="t1"):
    """What fusion reads of each hit: its turn key, fragment key and sender keys, and its score."""
    return [(h.turn_key(tenant_id), h.fragment_key, h.sender_keys, round(h.score, 5)) for h in hits]


@pytest.mark.parametrize("optimize_every", [10**9, 1], ids=["appendable", "optimized"])
def test_window_hits_carry_their_keys_and_read_their_payloads_only_when_asked(tmp_path, optimize_every):
    """A window hit of any of the three lists is scored by the keys kept beside its point, which are the keys of its
    payload (``Hit``'s own, from the fields); the payloads of a list are read in one read when asked, and a point
    deleted since the search reads as an empty payload."""
    from indexer.model import Hit
    from indexer.stores.base import describe

    pair = EdgeWindowsPair(tmp_path, optimize_every=optimize_every)
    pair.upsert(MESSAGES)
    pair.refresh()
    flt = SearchFilter("t1", "ann")
    lists = [pair.keywords.search("glacier hike", kind, flt, 10) for kind in ("turn", "window")]
    lists.append(pair.vectors.search(one_hot(0), "window", flt, 10))
    assert all(lists) and not any(h.described for hits in lists for h in hits)
    keys = [_keyed(hits) for hits in lists]
    describe(h for hits in lists for h in hits)
    assert all(h.described for hits in lists for h in hits)
    from_payloads = [_keyed([Hit(h.unit_id, h.score, h.payload) for h in hits]) for hits in lists]
    assert keys == from_payloads
    assert {h.payload["message_ids"][0] for h in lists[1]} == {"wa", "wb", "wc"}
    again = pair.vectors.search(one_hot(2), "window", flt, 10)
    pair.vectors.delete([ids.turn_unit_id("t1", "c1", "wc", "window")])
    describe(again)
    assert {h.payload.get("message_ids", ["gone"])[0] for h in again} == {"wa", "wb", "gone"}
    pair.close()


@pytest.mark.parametrize("optimize_every", [10**9, 1], ids=["appendable", "optimized"])
def test_window_points_written_before_they_held_keys_are_given_them(tmp_path, optimize_every):
    """A data dir written before window points held their keys: reopened, the shard takes the vector and every
    window point its keys, from its payload; searches find what they found, with the same keys, and the BM25
    lists the same scores (the fill runs the optimizer, which quantizes the dense vectors of the appendable case)."""
    from qdrant_edge import EdgeShard, UpdateOperation

    pair = EdgeWindowsPair(tmp_path, optimize_every=optimize_every)
    pair.upsert(MESSAGES)
    pair.refresh()
    flt = SearchFilter("t1", "ann")

    def lists(store):
        return [_keyed(store.keywords.search("glacier hike", kind, flt, 10)) for kind in ("turn", "window")] + \
            [[keys[:3] for keys in _keyed(store.vectors.search(one_hot(1), "window", flt, 10))]]

    before = lists(pair)
    pair.close()
    window = tmp_path / "e" / "window"
    shard = EdgeShard.load(str(window))
    shard.update(UpdateOperation.delete_vector_name(edge.KEYS_VECTOR))
    shard.flush()
    shard.close()
    (tmp_path / "e" / edge.KEYS_MARKER).unlink()
    assert edge.KEYS_VECTOR not in json.loads((window / "edge_config.json").read_text())["vectors"]
    reopened = EdgeWindowsPair(tmp_path, optimize_every=optimize_every)
    assert (tmp_path / "e" / edge.KEYS_MARKER).exists()
    hits = reopened.vectors.search(one_hot(1), "window", flt, 10)
    assert all(h._keys is not None for h in hits), "every point has its keys"
    assert lists(reopened) == before
    reopened.close()


def test_times_are_one_index_and_the_end_index_of_data_dirs_written_before_goes(tmp_path):
    """Every point searched is one turn's, so a time filter is one range on ``start_ts``, bounds included; a shard
    with an ``end_ts`` index (data dirs written before) loses it when opened."""
    from qdrant_edge import FloatIndexParams, UpdateOperation

    store = EdgeVectorStore(tmp_path, dim=DIM)
    store.upsert([unit(f"m{i}", "glacier", 0, ts=float(t)) for i, t in enumerate((100, 200, 300))])
    store.refresh()
    assert set(store.shards["turn" if "turn" in store.shards else "window"].info().payload_schema) >= {"start_ts"}
    assert set(search(store, "glacier", 0, SearchFilter("t1", "ann", sent_after=200.0, sent_before=300.0))) == \
        {"m1", "m2"}
    assert search(store, "glacier", 0, SearchFilter("t1", "ann", sent_after=250.0, sent_before=260.0)) == []
    for shard in store.shards.values():
        shard.update(UpdateOperation.create_field_index("end_ts", FloatIndexParams()))
    store.close()
    store = EdgeVectorStore(tmp_path, dim=DIM)
    assert all("end_ts" not in shard.info().payload_schema for shard in store.shards.values())
    assert set(search(store, "glacier", 0, SearchFilter("t1", "ann", sent_after=150.0))) == {"m1", "m2"}
    store.close()


def test_a_keyword_store_can_search_windows_only_in_a_vector_store_that_holds_their_terms(tmp_path):
    with pytest.raises(ValueError, match="window_bm25"):
        EdgeBM25Store(tmp_path / "k", windows=EdgeVectorStore(tmp_path / "e", dim=DIM))


def test_a_window_shard_given_bm25_terms_opens_for_another_keyword_store(tmp_path):
    """Windows written with their terms, then a keyword store of another kind (FTS5, Elasticsearch): the window
    shard keeps its BM25 vector, opens, and its windows are written and found by their dense vectors."""
    pair = EdgeWindowsPair(tmp_path)
    pair.upsert(MESSAGES)
    pair.close()
    vectors = EdgeVectorStore(tmp_path / "e", dim=DIM)
    vectors.upsert([unit("wd", "glacier at noon", 3, kind="window")])
    vectors.refresh()
    found = [h.payload["message_ids"][0] for h in vectors.search(one_hot(3), "window", SearchFilter("t1", "bob"), 1)]
    assert found == ["wd"]
    vectors.close()


def test_segments_quantized_to_int8_before_are_rebuilt_at_four_bits_by_the_next_optimizer_run(tmp_path, monkeypatch):
    """Data dirs written when vectors were int8 codes keep working as they are, and the optimizer's next run
    rebuilds their segments with today's quantization: the engine rebuilds segments whose configuration differs."""
    import indexer.stores.edge as edge
    from qdrant_edge import ScalarQuantizationConfig, ScalarType

    def quantizations():
        return {next(iter(json.loads(path.read_text())["quantization_config"]))
                for path in (tmp_path / "e" / "window" / "segments").glob("*/vector_storage-text/quantized.config.json")}

    rng = np.random.default_rng(11)
    units = [unit(f"w{i}", "glacier", 0, conv=f"c{i % 4}", kind="window") for i in range(60)]
    for u in units:
        u.vector = rng.normal(size=DIM).astype(np.float32)
    monkeypatch.setattr(edge, "QUANTIZATION", ScalarQuantizationConfig(type=ScalarType.Int8, quantile=0.99,
                                                                      memory=edge.INDEX_MEMORY))
    store = EdgeVectorStore(tmp_path / "e", dim=DIM)
    store.upsert(units)
    store.refresh()
    store.close()
    assert quantizations() == {"scalar"}
    monkeypatch.undo()
    store = EdgeVectorStore(tmp_path / "e", dim=DIM)
    flt = SearchFilter("t1", "ann")
    assert len(store.search(one_hot(0), "window", flt, 100)) == len(units)
    store._run_optimizer("window")
    assert quantizations() == {"turbo"}
    assert len(store.search(one_hot(0), "window", flt, 100)) == len(units)
    store.close()


def test_bm25_indexes_held_in_memory_before_are_rebuilt_on_disk_by_the_next_optimizer_run(tmp_path, monkeypatch):
    """The inverted index stays on disk with one-byte weights; segments of data dirs that kept it on the process's
    heap with four-byte weights are searched as they are, then rebuilt by the optimizer's next run, with the same
    hits and scores (a chat word's weight takes few values in a posting list)."""
    import indexer.stores.edge as edge
    from qdrant_edge import EdgeSparseVectorParams, Modifier

    def placements():
        return sparse_index_types(tmp_path / "e" / "window")

    def found(store):
        flt = SearchFilter("t1", "ann")
        return {kind: sorted((h.unit_id, round(h.score, 4)) for h in keywords.search("glacier trip", kind, flt, 100))
                for kind in ("turn", "window")}

    units = [unit(f"m{i}", ("glacier trip" if i % 3 else "lake") + f" day {i}", i % DIM, conv=f"c{i % 4}",
                  kind="window") for i in range(60)]
    monkeypatch.setattr(edge, "_sparse_params", lambda: EdgeSparseVectorParams(
        modifier=Modifier.Idf, full_scan_threshold=edge.FULL_SCAN_THRESHOLD))
    store = EdgeVectorStore(tmp_path / "e", dim=DIM, window_bm25=True)
    keywords = EdgeBM25Store(tmp_path / "k", windows=store)
    store.upsert(units)
    keywords.upsert([dataclasses.replace(u, kind="turn", unit_id=ids.turn_unit_id("t1", u.conversation_id,
                                                                                  u.message_ids[0], "turn"))
                     for u in units])
    store.refresh()
    before = found(keywords)
    keywords.close()
    store.close()
    assert placements() == {("bm25", "ImmutableRam", "float32"), ("turn_bm25", "ImmutableRam", "float32")}
    monkeypatch.undo()
    store = EdgeVectorStore(tmp_path / "e", dim=DIM, window_bm25=True)
    keywords = EdgeBM25Store(tmp_path / "k", windows=store)
    assert found(keywords) == before
    store._run_optimizer("window")
    assert placements() == {("bm25", "Mmap", "uint8"), ("turn_bm25", "Mmap", "uint8")}
    assert found(keywords) == before and all(before.values())
    keywords.close()
    store.close()


def test_a_moved_shard_is_left_in_segments_searched_in_parallel(tmp_path, monkeypatch):
    """Moving terms onto window points moves every point out of its segment, and each run of the optimizer turns
    what moved into one segment: the move runs it after each share of the shard per search thread, so the shard is
    not left in one segment that one search thread reads."""
    rng = np.random.default_rng(4)
    messages = [u for i in range(3000) for u in message(f"m{i}", f"turn {i} about glacier{i % 50}",
                                                         f"window {i} of glacier{i % 50}", 0, conv=f"c{i % 30}")]
    for u in messages:
        u.vector = rng.normal(size=DIM).astype(np.float32)
    vectors, keywords = EdgeVectorStore(tmp_path / "e", dim=DIM), EdgeBM25Store(tmp_path / "k")
    vectors.upsert(vector_units(messages))
    keywords.upsert(messages)
    for store in (keywords, vectors):
        store.refresh()
        store.close()
    runs = []
    real = EdgeVectorStore._run_optimizer

    def counted(self, kind):
        runs.append(self._pending[kind])
        real(self, kind)

    monkeypatch.setattr(EdgeVectorStore, "_run_optimizer", counted)
    pair = EdgeWindowsPair(tmp_path)
    share = -(-3000 // SEARCH_THREADS)
    # The windows' terms, then the turns': each a share at a time (checked a batch of 1,024 points at a time).
    assert sum(runs) == 6000 and len(runs) >= 2 * SEARCH_THREADS and max(runs) < share + 1024
    assert pair.vectors.shards["window"].info().points_count == 3000 and pair.keywords.count() == 3000
    assert [h.payload["message_ids"] for h in pair.search("glacier7", "turn", SearchFilter("t1", "ann"), 3)]
    pair.close()


def test_an_index_made_from_a_schema_type_is_made_again_with_todays_parameters(tmp_path):
    """An index created from a bare schema type carries no parameters: the shard is indexed anew when opened
    rather than failing to open."""
    from qdrant_edge import PayloadSchemaType, UpdateOperation

    from indexer.stores.edge import INDEX_MEMORY

    store = EdgeVectorStore(tmp_path / "s", dim=DIM)
    store.upsert(UNITS)
    store.shards["turn"].update(UpdateOperation.create_field_index("sender_ids", PayloadSchemaType.Keyword))
    store.close()
    store = EdgeVectorStore(tmp_path / "s", dim=DIM)
    params = store.shards["turn"].info().payload_schema["sender_ids"].params
    assert params is not None and str(params.memory) == str(INDEX_MEMORY)
    assert search(store, "glacier", 1, SearchFilter("t1", "bob", sender_ids=("s2",))) == ["d"]
    store.close()
