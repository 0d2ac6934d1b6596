"""Vector store on Qdrant: local mode on disk by default, a server when a URL is configured."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from indexer.model import EVERYONE, UNIT_KINDS, Hit, SearchFilter, Unit
from indexer.stores.base import check_vectors

TEXT_VECTOR = "text"
IMAGE_VECTOR = "image"
#: Points per upsert request; large enough to amortise a round trip, small enough for gRPC limits.
UPSERT_BATCH = 256
_PAYLOAD_INDEXES = {
    "tenant_id": models.PayloadSchemaType.KEYWORD,
    "conversation_id": models.PayloadSchemaType.KEYWORD,
    "fragment_id": models.PayloadSchemaType.KEYWORD,
    "sender_ids": models.PayloadSchemaType.KEYWORD,
    "visible_to": models.PayloadSchemaType.KEYWORD,
    "start_ts": models.PayloadSchemaType.FLOAT,
    "end_ts": models.PayloadSchemaType.FLOAT,
}


def build_filter(flt: SearchFilter) -> models.Filter:
    must: list = [
        models.FieldCondition(key="tenant_id", match=models.MatchValue(value=flt.tenant_id)),
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
    """One collection per unit kind (``{prefix}_turn`` ...), a named ``text`` vector, deterministic ids.

    Separate collections keep each search to the points of its kind: local mode evaluates payload
    filters point by point in Python, so a shared collection tripled the work of every search.
    """

    def __init__(self, path: str | Path | None = None, url: str | None = None, prefix: str = "tessera",
                 dim: int = 384, api_key: str | None = None, image_dim: int | None = None):
        if url:
            self.client = QdrantClient(url=url, api_key=api_key)
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(path))
        self.remote = bool(url)
        # The HTTP client may be shared by threads; local mode's in-process collections may not.
        self.concurrent_search = self.remote
        self.collections = {kind: f"{prefix}_{kind}" for kind in UNIT_KINDS}
        self.dim = dim
        self.image_dim = image_dim
        for kind, name in self.collections.items():
            self._ensure_collection(name, with_image=kind == "turn" and image_dim is not None)
        self.local_journal = None if self.remote else self._tune_local_persistence()

    def _tune_local_persistence(self) -> str | None:
        """Put local mode's SQLite files in WAL mode with normal sync.

        Local mode commits every point on its own; with the default rollback journal each commit
        waits for two fsyncs, which made the vector store the slowest part of ingest. WAL keeps
        every commit atomic and durable across process crashes, as the engine's own state is.
        Reaches into qdrant-client internals, hence the guard; ``local_journal`` reports the result.
        """
        connections = self._local_connections()
        if len(connections) != len(self.collections):
            return None
        modes = set()
        for connection in connections:
            modes.add(connection.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA secure_delete=ON")
        return modes.pop() if len(modes) == 1 else None

    def _ensure_collection(self, name: str, with_image: bool) -> None:
        if self.client.collection_exists(name):
            if with_image:
                vectors = self.client.get_collection(name).config.params.vectors
                if not isinstance(vectors, dict) or IMAGE_VECTOR not in vectors:
                    raise ValueError(f"collection {name} was created without the {IMAGE_VECTOR!r} vector; index into a"
                                     " new data dir (or Qdrant prefix) to turn on TESSERA_IMAGE_MODEL")
            return
        vectors_config = {TEXT_VECTOR: models.VectorParams(size=self.dim, distance=models.Distance.COSINE)}
        if with_image:
            vectors_config[IMAGE_VECTOR] = models.VectorParams(size=self.image_dim, distance=models.Distance.COSINE)
        try:
            self.client.create_collection(name, vectors_config=vectors_config)
        except (UnexpectedResponse, ValueError):
            # Another process created it since our look (a fleet's first start): the server answers
            # 409 (400 before 1.10), local mode a ValueError. Anything else is still an error.
            if not self.client.collection_exists(name):
                raise
            return self._ensure_collection(name, with_image)
        if self.remote:
            for key, schema in _PAYLOAD_INDEXES.items():
                if key == "tenant_id":
                    schema = models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
                self.client.create_payload_index(name, key, field_schema=schema, wait=True)

    def upsert(self, units: Sequence[Unit]) -> None:
        points: dict[str, list[models.PointStruct]] = {kind: [] for kind in UNIT_KINDS}
        for unit in units:
            check_vectors(unit, self.dim, self.image_dim)
            if unit.kind not in points:
                raise ValueError(f"unit {unit.unit_id}: unknown kind {unit.kind!r}")
            named = {TEXT_VECTOR: unit.vector.tolist()}
            if unit.image_vector is not None:
                named[IMAGE_VECTOR] = unit.image_vector.tolist()
            points[unit.kind].append(models.PointStruct(id=unit.unit_id, vector=named, payload=unit.payload()))
        for kind, batch in points.items():
            for start in range(0, len(batch), UPSERT_BATCH):
                self.client.upsert(self.collections[kind], points=batch[start:start + UPSERT_BATCH], wait=True)

    def delete(self, unit_ids: Sequence[str]) -> None:
        if unit_ids:
            for name in self.collections.values():
                self.client.delete(name, points_selector=models.PointIdsList(points=list(unit_ids)), wait=True)

    def search(self, vector: np.ndarray, kind: str, flt: SearchFilter, limit: int, using: str = TEXT_VECTOR) -> list[Hit]:
        if kind not in self.collections:
            raise ValueError(f"unknown kind {kind!r}")
        if using == IMAGE_VECTOR and (kind != "turn" or self.image_dim is None):
            return []
        response = self.client.query_points(
            self.collections[kind], query=vector.tolist(), using=using, query_filter=build_filter(flt),
            limit=limit, with_payload=True,
        )
        return [Hit(str(p.id), float(p.score), p.payload or {}) for p in response.points]

    def compact(self) -> None:
        """Local mode rewrites nothing lazily (deleted rows are zeroed); a server compacts itself."""
        for connection in self._local_connections():
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _local_connections(self) -> list:
        """The SQLite connections behind local mode's collections (qdrant-client internals)."""
        collections = getattr(getattr(self.client, "_client", None), "collections", None) or {}
        connections = []
        for name in self.collections.values():
            connection = getattr(getattr(collections.get(name), "storage", None), "storage", None)
            if connection is not None:
                connections.append(connection)
        return connections

    def refresh(self) -> None:
        """Upserts wait for acknowledgement; nothing to do."""

    def count(self, tenant_id: str | None = None) -> int:
        flt = None
        if tenant_id is not None:
            flt = models.Filter(must=[models.FieldCondition(key="tenant_id", match=models.MatchValue(value=tenant_id))])
        return sum(self.client.count(name, count_filter=flt, exact=True).count for name in self.collections.values())

    def close(self) -> None:
        self.client.close()
