"""BM25 on Elasticsearch, behind the same ``KeywordStore`` interface as the embedded FTS5 store.

One index per unit kind (term statistics apart, as in the embedded store), created from an index
template with explicit mappings and the BM25 parameters in the index settings. Writes go through the
bulk API without refresh; every item of a bulk answer is inspected (an HTTP 200 can hold failed
items): throttled (429) and server-side (5xx) items are retried with backoff, any other failure is
reported per item. Queries are built from the structured DSL only: user text goes into a ``match``
query, never to a query-string parser; tenant and visibility are ``filter`` clauses.
"""

from __future__ import annotations

import time
from typing import Sequence

from indexer.model import EVERYONE, UNIT_KINDS, Hit, SearchFilter, Unit

#: BM25 parameters set in the index settings (Elasticsearch's defaults, stated so they are explicit).
BM25_K1 = 1.2
BM25_B = 0.75
MAX_ATTEMPTS = 5
BULK_CHUNK = 500


class BulkItemsFailed(RuntimeError):
    """Bulk items that failed for a reason a retry cannot fix; ``items`` holds (id, status, error)."""

    def __init__(self, items: list[tuple[str, int, object]]):
        super().__init__(f"{len(items)} bulk items failed: {items[:5]}")
        self.items = items


def _error_type(item: dict) -> str | None:
    error = item.get("error")
    return error.get("type") if isinstance(error, dict) else None


def index_template(prefix: str) -> dict:
    keyword = {"type": "keyword"}
    return {
        "index_patterns": [f"{prefix}-*"],
        "template": {
            "settings": {
                "index": {"similarity": {"default": {"type": "BM25", "k1": BM25_K1, "b": BM25_B}}},
                "analysis": {"analyzer": {"tessera_text": {"type": "english"}}},
            },
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "text": {"type": "text", "analyzer": "tessera_text"},
                    "kind": keyword, "tenant_id": keyword, "conversation_id": keyword, "fragment_id": keyword,
                    "message_ids": keyword, "sender_ids": keyword, "visible_to": keyword,
                    "start_ts": {"type": "double"}, "end_ts": {"type": "double"},
                },
            },
        },
    }


def build_query(text: str, flt: SearchFilter) -> dict:
    filters: list[dict] = [
        {"term": {"tenant_id": flt.tenant_id}},
        {"terms": {"visible_to": [flt.user_id, EVERYONE]}},
    ]
    if flt.conversation_id:
        filters.append({"term": {"conversation_id": flt.conversation_id}})
    if flt.sender_ids:
        filters.append({"terms": {"sender_ids": list(flt.sender_ids)}})
    if flt.sent_after is not None:
        filters.append({"range": {"end_ts": {"gte": flt.sent_after}}})
    if flt.sent_before is not None:
        filters.append({"range": {"start_ts": {"lte": flt.sent_before}}})
    return {"bool": {"must": [{"match": {"text": {"query": text, "operator": "or"}}}], "filter": filters}}


class ElasticsearchBM25Store:
    #: The official client is thread-safe: the keyword lists of a query go out at once.
    concurrent_search = True

    def __init__(self, url: str, prefix: str = "tessera", api_key: str | None = None, client=None):
        from elasticsearch import Elasticsearch

        self.client = client or Elasticsearch(url, api_key=api_key, request_timeout=30)
        self.prefix = prefix
        self.indexes = {kind: f"{prefix}-{kind}" for kind in UNIT_KINDS}
        self.client.indices.put_index_template(name=f"{prefix}-units", **index_template(prefix))
        for index in self.indexes.values():
            if not self.client.indices.exists(index=index):
                self._create(index)

    def _create(self, index: str) -> None:
        """Create an index; one that another process created since our look is fine (a fleet's first start)."""
        from elasticsearch import BadRequestError

        try:
            self.client.indices.create(index=index)
        except BadRequestError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            if _error_type(body) != "resource_already_exists_exception":
                raise

    def _bulk(self, actions: list[tuple[dict, dict | None]]) -> None:
        """Send (action, source) pairs; retry throttled and server-side item failures only."""
        pending = actions
        for attempt in range(MAX_ATTEMPTS):
            retry, failed = [], []
            for start in range(0, len(pending), BULK_CHUNK):
                chunk = pending[start:start + BULK_CHUNK]
                operations: list[dict] = []
                for action, source in chunk:
                    operations.append(action)
                    if source is not None:
                        operations.append(source)
                answer = self.client.bulk(operations=operations, refresh=False)
                for (action, source), item in zip(chunk, answer["items"]):
                    result = next(iter(item.values()))
                    status = result.get("status", 500)
                    if status < 300 or (status == 404 and "delete" in action):
                        continue
                    if status == 409 and "index" in action and _error_type(result) == "version_conflict_engine_exception":
                        # The stored unit carries a higher version: a later rewrite is already indexed.
                        continue
                    if status == 429 or status >= 500:
                        retry.append((action, source))
                    else:
                        failed.append((result.get("_id"), status, result.get("error")))
            if failed:
                raise BulkItemsFailed(failed)
            if not retry:
                return
            pending = retry
            time.sleep(min(8.0, 0.25 * 2 ** attempt))
        raise BulkItemsFailed([(a[next(iter(a))]["_id"], 429, "retries exhausted") for a, _ in pending])

    def upsert(self, units: Sequence[Unit]) -> None:
        actions = []
        for u in units:
            if u.kind not in self.indexes:
                raise ValueError(f"unit {u.unit_id}: unknown kind {u.kind!r}")
            # The version is the state's write sequence (it only grows); external_gte: a retry of the
            # same write is fine, an older one is refused.
            actions.append(({"index": {"_index": self.indexes[u.kind], "_id": u.unit_id,
                                       "version": int(u.version), "version_type": "external_gte"}},
                            {"text": u.text, **u.payload()}))
        if actions:
            self._bulk(actions)

    def delete(self, unit_ids: Sequence[str]) -> None:
        actions = [({"delete": {"_index": index, "_id": unit_id}}, None)
                   for unit_id in unit_ids for index in self.indexes.values()]
        if actions:
            self._bulk(actions)

    def refresh(self) -> None:
        """Make the writes so far visible to searches (a reader that must see its own write)."""
        self.client.indices.refresh(index=",".join(self.indexes.values()))

    def search(self, text: str, kind: str, flt: SearchFilter, limit: int) -> list[Hit]:
        if kind not in self.indexes:
            raise ValueError(f"unknown kind {kind!r}")
        if not text.strip():
            return []
        answer = self.client.search(index=self.indexes[kind], query=build_query(text, flt), size=limit,
                                    source_excludes=["text"])
        return [Hit(h["_id"], float(h["_score"]), h["_source"]) for h in answer["hits"]["hits"]]

    def count(self, tenant_id: str | None = None) -> int:
        query = {"term": {"tenant_id": tenant_id}} if tenant_id else {"match_all": {}}
        self.refresh()
        return sum(self.client.count(index=index, query=query)["count"] for index in self.indexes.values())

    def compact(self) -> None:
        """Expunge deleted documents from the segments (erasures must become physical)."""
        self.client.indices.forcemerge(index=",".join(self.indexes.values()), only_expunge_deletes=True)

    def close(self) -> None:
        self.client.close()
