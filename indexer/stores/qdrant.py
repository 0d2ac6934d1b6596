"""Vector store on Qdrant: local mode on disk by default, a server when a URL is configured."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from qdrant_client import QdrantClient, models

from indexer.stores.base import EVERYONE, Hit, SearchFilter, Unit

TEXT_VECTOR = "text"
#: Points per upsert request; large enough to amortise a round trip, small enough for gRPC limits.
UPSERT_BATCH = 256
_PAYLOAD_INDEXES = {
    "tenant_id": models.PayloadSchemaType.KEYWORD,
    "kind": models.PayloadSchemaType.KEYWORD,
    "conversation_id": models.PayloadSchemaType.KEYWORD,
    "fragment_id": models.PayloadSchemaType.KEYWORD,
    "sender_ids": models.PayloadSchemaType.KEYWORD,
    "visible_to": models.PayloadSchemaType.KEYWORD,
    "start_ts": models.PayloadSchemaType.FLOAT,
    "end_ts": models.PayloadSchemaType.FLOAT,
}


def build_filter(kind: str, flt: SearchFilter) -> models.Filter:
    must: list = [
        models.FieldCondition(key="tenant_id", match=models.MatchValue(value=flt.tenant_id)),
        models.FieldCondition(key="kind", match=models.MatchValue(value=kind)),
        models.FieldCondition(key="visible_to", match=models.MatchAny(any=[flt.user_id, EVERYONE])),
    ]
    if flt.conversation_id:
        must.append(models.FieldCondition(key="conversation_id", match=models.MatchValue(value=flt.conversation_id)))
    if flt.sender_ids:
        must.append(models.FieldCondition(key="sender_ids", match=models.MatchAny(any=list(flt.sender_ids))))
    if flt.sent_after is not None:
        must.append(models.FieldCondition(key="end_ts", range=models.Range(gte=flt.sent_after)))
    if flt.sent_before is not None:
        must.append(models.FieldCondition(key="start_ts", range=models.Range(lte=flt.sent_before)))
    return models.Filter(must=must)


class QdrantVectorStore:
    """One collection per data dir, a named ``text`` vector, deterministic point ids."""

    def __init__(self, path: str | Path | None = None, url: str | None = None, collection: str = "tessera",
                 dim: int = 384, api_key: str | None = None):
        if url:
            self.client = QdrantClient(url=url, api_key=api_key)
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(path))
        self.remote = bool(url)
        self.collection = collection
        self.dim = dim
        self._ensure_collection()

    def _ensure_collection(self) -> None:
        if self.client.collection_exists(self.collection):
            return
        self.client.create_collection(
            self.collection,
            vectors_config={TEXT_VECTOR: models.VectorParams(size=self.dim, distance=models.Distance.COSINE)},
        )
        if self.remote:
            for key, schema in _PAYLOAD_INDEXES.items():
                if key == "tenant_id":
                    schema = models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
                self.client.create_payload_index(self.collection, key, field_schema=schema, wait=True)

    def upsert(self, units: Sequence[Unit]) -> None:
        points = []
        for unit in units:
            vector = unit.vector
            if vector is None or vector.shape != (self.dim,):
                raise ValueError(f"unit {unit.unit_id}: vector must have shape ({self.dim},)")
            points.append(models.PointStruct(id=unit.unit_id, vector={TEXT_VECTOR: vector.tolist()},
                                             payload=unit.payload()))
        for start in range(0, len(points), UPSERT_BATCH):
            self.client.upsert(self.collection, points=points[start:start + UPSERT_BATCH], wait=True)

    def delete(self, unit_ids: Sequence[str]) -> None:
        if unit_ids:
            self.client.delete(self.collection, points_selector=models.PointIdsList(points=list(unit_ids)), wait=True)

    def search(self, vector: np.ndarray, kind: str, flt: SearchFilter, limit: int) -> list[Hit]:
        response = self.client.query_points(
            self.collection, query=vector.tolist(), using=TEXT_VECTOR, query_filter=build_filter(kind, flt),
            limit=limit, with_payload=True,
        )
        return [Hit(str(p.id), float(p.score), p.payload or {}) for p in response.points]

    def count(self, tenant_id: str | None = None) -> int:
        flt = None
        if tenant_id is not None:
            flt = models.Filter(must=[models.FieldCondition(key="tenant_id", match=models.MatchValue(value=tenant_id))])
        return self.client.count(self.collection, count_filter=flt, exact=True).count

    def close(self) -> None:
        self.client.close()
