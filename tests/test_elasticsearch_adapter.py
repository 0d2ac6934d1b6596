"""The Elasticsearch adapter's own logic (request shape, bulk item handling) without a server.

The adapter's behaviour against a real cluster is the conformance suite's job
(``TESSERA_ES_URL=... make test``); here a recording client checks what no server run can show
deterministically: a bulk answer of 200 with failed items, throttling, and what is sent.
"""

import pytest

from indexer.stores.base import SearchFilter
from indexer.stores.elasticsearch import BulkItemsFailed, ElasticsearchBM25Store, build_query, index_template
from tests.test_store_conformance import unit


class _Indices:
    def __init__(self):
        self.calls = []

    def put_index_template(self, **kw):
        self.calls.append(("template", kw))

    def exists(self, index):
        return False

    def create(self, index):
        self.calls.append(("create", index))

    def refresh(self, index):
        self.calls.append(("refresh", index))


class RecordingClient:
    """Answers bulk requests from a script of per-item statuses."""

    def __init__(self, scripts):
        self.indices = _Indices()
        self.scripts = list(scripts)
        self.bulks = []

    def bulk(self, operations, refresh):
        assert refresh is False, "writes never force a refresh"
        self.bulks.append(operations)
        statuses = self.scripts.pop(0)
        actions = [op for op in operations if set(op) & {"index", "delete"}]
        return {"errors": any(s >= 300 for s in statuses), "items": [
            {next(iter(a)): {"_id": a[next(iter(a))]["_id"], "status": s,
                             **({"error": {"type": "mapper_parsing_exception"}} if s == 400 else {})}}
            for a, s in zip(actions, statuses)]}


def test_throttled_items_are_retried_and_others_reported(monkeypatch):
    monkeypatch.setattr("indexer.stores.elasticsearch.time.sleep", lambda s: None)
    client = RecordingClient([[201, 429, 201], [201]])
    store = ElasticsearchBM25Store("http://unused", client=client)
    store.upsert([unit("a", "x", 0), unit("b", "y", 1), unit("c", "z", 2)])
    assert len(client.bulks) == 2 and len(client.bulks[1]) == 2, "only the throttled item is sent again"

    client = RecordingClient([[201, 400]])
    store = ElasticsearchBM25Store("http://unused", client=client)
    with pytest.raises(BulkItemsFailed) as info:
        store.upsert([unit("a", "x", 0), unit("b", "y", 1)])
    assert info.value.items[0][1] == 400 and len(client.bulks) == 1, "a mapping error is not retried"


def test_deleting_a_missing_document_is_not_an_error():
    client = RecordingClient([[200, 404, 404]])
    ElasticsearchBM25Store("http://unused", client=client).delete(["gone"])


def test_queries_are_structured_and_filtered():
    q = build_query('glacier" OR tenant_id:* )', SearchFilter("t1", "ann", conversation_id="c", sent_after=5.0))
    assert q["bool"]["must"] == [{"match": {"text": {"query": 'glacier" OR tenant_id:* )', "operator": "or"}}}]
    filters = q["bool"]["filter"]
    assert {"term": {"tenant_id": "t1"}} in filters
    assert {"terms": {"visible_to": ["ann", "*"]}} in filters
    assert {"range": {"end_ts": {"gte": 5.0}}} in filters
    mapping = index_template("tessera")["template"]["mappings"]["properties"]
    assert mapping["tenant_id"]["type"] == "keyword" and mapping["text"]["type"] == "text"


def test_writes_carry_external_versions_and_tolerate_newer_ones():
    client = RecordingClient([[201, 409]])
    store = ElasticsearchBM25Store("http://unused", client=client)
    a, b = unit("a", "x", 0), unit("b", "y", 1)
    a.version, b.version = 12.5, 3.0
    store.upsert([a, b])
    actions = [op["index"] for op in client.bulks[0] if "index" in op]
    assert [(x["version"], x["version_type"]) for x in actions] == [(12500, "external_gte"), (3000, "external_gte")]
