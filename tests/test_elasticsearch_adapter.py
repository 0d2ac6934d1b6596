"""The Elasticsearch adapter's own logic (request shape, bulk item handling) without a server.

The adapter's behaviour against a real cluster is the conformance suite's job
(``TESSERA_ES_URL=... make test``); here a recording client checks what no server run can show
deterministically: a bulk answer of 200 with failed items, throttling, and what is sent.
"""

import pytest

from indexer.model import SearchFilter
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


class VersionedClient:
    """A bulk endpoint that follows Elasticsearch's documented external versioning.

    ``version_type: external`` is refused (409 ``version_conflict_engine_exception``) unless the new
    version is greater than the stored one, ``external_gte`` unless greater or equal; versions must be
    non-negative (400 ``action_request_validation_exception``). A delete removes the document; its
    version is remembered (``index.gc_deletes``) so an older write after it conflicts too. Deleting a
    missing document answers 404.
    """

    def __init__(self):
        self.indices = _Indices()
        self.docs: dict[tuple[str, str], dict] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.actions: list[dict] = []

    def bulk(self, operations, refresh):
        items, i = [], 0
        while i < len(operations):
            (op, meta), = operations[i].items()
            self.actions.append(meta)
            key = (meta["_index"], meta["_id"])
            version, vtype = meta.get("version"), meta.get("version_type")
            status, error = 200, None
            if version is not None and version < 0:
                status, error = 400, {"type": "action_request_validation_exception"}
            elif version is not None and key in self.versions and (
                    self.versions[key] >= version if vtype == "external" else self.versions[key] > version):
                status, error = 409, {"type": "version_conflict_engine_exception"}
            elif op == "index":
                status = 200 if key in self.docs else 201
                self.docs[key] = operations[i + 1]
                if version is not None:
                    self.versions[key] = version
            elif key in self.docs:
                del self.docs[key]
            else:
                status = 404
            items.append({op: {"_id": meta["_id"], "status": status, **({"error": error} if error else {})}})
            i += 2 if op == "index" else 1
        return {"errors": any(x[next(iter(x))]["status"] >= 300 for x in items), "items": items}

    def texts(self) -> list[str]:
        return [doc["text"] for doc in self.docs.values()]


def test_writes_carry_external_versions_and_tolerate_newer_ones():
    client = VersionedClient()
    store = ElasticsearchBM25Store("http://unused", client=client)
    a, b = unit("a", "new text", 0), unit("a", "old text", 0)
    a.version, b.version = 7, 3
    store.upsert([a])
    store.upsert([b])
    assert client.texts() == ["new text"], "the older write loses, and that is not an error"
    assert [(x["version"], x["version_type"]) for x in client.actions] == [(7, "external_gte"), (3, "external_gte")]


def test_a_conflict_that_is_not_about_versions_is_an_error():
    client = RecordingClient([[409]])
    with pytest.raises(BulkItemsFailed):
        ElasticsearchBM25Store("http://unused", client=client).upsert([unit("a", "x", 0)])


def _engine_on(client, tmp_path, embedder):
    from indexer.engine import Tessera
    from indexer.stores.sqlite_vectors import SqliteVectorStore
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    base = open_engine(Config(data_dir=tmp_path, vector_store="sqlite"), embedder=embedder)
    base.keywords.close()
    return Tessera(base.state, SqliteVectorStore(tmp_path / "v2.sqlite", dim=embedder.dim),
                   ElasticsearchBM25Store("http://unused", client=client), embedder)


def test_deleting_the_newest_message_of_a_fragment_leaves_no_deleted_text(tmp_path, embedder):
    from tests.conftest import dialogue, message

    client = VersionedClient()
    engine = _engine_on(client, tmp_path, embedder)
    engine.ingest(dialogue())
    assert any("replaced the laptop battery" in t for t in client.texts())
    engine.ingest([message("c1", 11, "ann", "", op="delete", event_suffix="-del")])
    assert not any("replaced the laptop battery" in t for t in client.texts())


def test_messages_sent_before_1970_index_with_valid_versions(tmp_path, embedder):
    from datetime import datetime, timezone

    from tests.conftest import message

    client = VersionedClient()
    engine = _engine_on(client, tmp_path, embedder)
    old = message("c1", 1, "ann", "the moon landing is next summer")
    engine.ingest([old.model_copy(update={"sent_at": datetime(1968, 7, 1, tzinfo=timezone.utc)})])
    assert any("moon landing" in t for t in client.texts())


def _bad_request(error_type: str, reason: str):
    """Elasticsearch's 400 answer as the official client raises it."""
    from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
    from elasticsearch import BadRequestError

    meta = ApiResponseMeta(status=400, http_version="1.1", headers=HttpHeaders(), duration=0.0,
                           node=NodeConfig("http", "127.0.0.1", 9200))
    body = {"error": {"root_cause": [{"type": error_type, "reason": reason}], "type": error_type, "reason": reason},
            "status": 400}
    return BadRequestError(message=error_type, meta=meta, body=body)


class _RacingIndices(_Indices):
    """Another process creates each index between this one's ``exists`` and ``create``: Elasticsearch
    answers 400 ``resource_already_exists_exception`` (its documented answer to a second create)."""

    def create(self, index):
        self.calls.append(("create", index))
        raise _bad_request("resource_already_exists_exception", f"index [{index}] already exists")


def test_processes_racing_to_create_the_indexes_all_start():
    client = VersionedClient()
    client.indices = _RacingIndices()
    ElasticsearchBM25Store("http://unused", client=client)
    assert [c for c in client.indices.calls if c[0] == "create"], "the race was exercised"


def test_a_refused_index_creation_is_still_an_error():
    from elasticsearch import BadRequestError

    class Refusing(_Indices):
        def create(self, index):
            raise _bad_request("invalid_index_name_exception", f"invalid index name [{index}]")

    client = VersionedClient()
    client.indices = Refusing()
    with pytest.raises(BadRequestError):
        ElasticsearchBM25Store("http://unused", client=client)
