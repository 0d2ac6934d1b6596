"""The embedded vector store shared by processes: vectors in SQLite, exact search over an in-memory copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from indexer.model import UNIT_KINDS, VECTOR_NAMES, Hit, SearchFilter, Unit
from indexer.stores.base import check_vectors
from indexer.stores.sqlite import PAYLOAD_COLUMNS, SqliteUnits, payload
from indexer.stores.vector_index import IndexRow, VectorIndex

#: Change-log entries of the vector store kept before it is emptied (each process then reloads once).
LOG_KEEP = 200_000


class SqliteVectorStore(SqliteUnits):
    """Exact cosine search; SQLite keeps the vectors, each process searches its in-memory copy.

    Every write appends to ``vector_log`` in the same transaction, so another process's copy catches
    up by reading the log past the last sequence number it applied. ``compact`` empties the log and
    raises the floor; a copy older than the floor reloads from the tables.
    """

    #: Thread-safe: searches serialise on the store's lock and are short.
    concurrent_search = True

    def __init__(self, path: str | Path, dim: int = 384, image_dim: int | None = None):
        self.dim = dim
        self.image_dim = image_dim
        #: One in-memory index per unit kind (text vectors) and ``turn:image`` for image vectors.
        self._indexes: dict[str, VectorIndex] = {}
        self._seq = 0
        #: Times this process rebuilt its copy from the tables (another process emptied the log).
        self.full_loads = 0
        super().__init__(path)

    def _create_index_tables(self) -> None:
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS unit_vectors (rowid INTEGER PRIMARY KEY, vector BLOB NOT NULL);"
            "CREATE TABLE IF NOT EXISTS unit_image_vectors (rowid INTEGER PRIMARY KEY, vector BLOB NOT NULL);"
            "CREATE TABLE IF NOT EXISTS vector_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
            " rowid INTEGER NOT NULL, live INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS vector_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT OR IGNORE INTO vector_meta VALUES ('log_floor', 0);"
        )

    def _write_index(self, rowid: int, unit: Unit) -> None:
        self._db.execute("INSERT INTO unit_vectors VALUES (?, ?)", (rowid, unit.vector.astype(np.float32).tobytes()))
        if unit.image_vector is not None:
            self._db.execute("INSERT INTO unit_image_vectors VALUES (?, ?)",
                             (rowid, unit.image_vector.astype(np.float32).tobytes()))
        self._db.execute("INSERT INTO vector_log(kind, rowid, live) VALUES (?, ?, 1)", (unit.kind, rowid))

    def _delete_index(self, rowid: int, kind: str) -> None:
        self._db.execute("DELETE FROM unit_vectors WHERE rowid=?", (rowid,))
        self._db.execute("DELETE FROM unit_image_vectors WHERE rowid=?", (rowid,))
        self._db.execute("INSERT INTO vector_log(kind, rowid, live) VALUES (?, ?, 0)", (kind, rowid))

    def upsert(self, units: Sequence[Unit]) -> None:
        for unit in units:
            check_vectors(unit, self.dim, self.image_dim)
        super().upsert(units)

    def compact(self) -> None:
        """Checkpoint, so no erased vector outlives its deletion in the WAL (rows are zeroed in place by
        ``secure_delete``); empty the change log only once it is long.

        The log names rowids, never content, so an erasure does not need it emptied: emptying raises the
        floor and makes every other process reload every vector, a cost in the size of the store
        rather than in what was erased.
        """
        def action() -> None:
            bottom, top = self._db.execute("SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM vector_log").fetchone()
            if top - bottom >= LOG_KEEP:
                self._db.execute("UPDATE vector_meta SET value=max(value, ?) WHERE key='log_floor'", (top,))
                self._db.execute("DELETE FROM vector_log")

        self._write(action)
        super().compact()

    @property
    def memory_bytes(self) -> int:
        return sum(index.nbytes for index in self._indexes.values())

    def _load(self, where: str, args: Sequence) -> None:
        """Apply the rows ``where`` selects (alias ``u``) to the in-memory copies, in chunks."""
        self._load_table("unit_vectors", "", self.dim, where, args)
        if self.image_dim is not None:
            self._load_table("unit_image_vectors", ":image", self.image_dim, where, args)

    def _load_table(self, table: str, suffix: str, dim: int, where: str, args: Sequence) -> None:
        sql = ("SELECT u.rowid, u.kind, u.tenant_id, u.conversation_id, u.sender_ids, u.visible_to, u.start_ts,"
               f" u.end_ts, v.vector FROM units u JOIN {table} v ON v.rowid = u.rowid WHERE {where}")
        cursor = self._db.execute(sql, args)
        while chunk := cursor.fetchmany(8192):
            by_kind: dict[str, tuple[list, list]] = {}
            for rowid, kind, tenant, conversation, senders, visible, start, end, blob in chunk:
                rows, blobs = by_kind.setdefault(kind, ([], []))
                rows.append(IndexRow(rowid, tenant, conversation, tuple(json.loads(senders)),
                                     tuple(json.loads(visible)), start, end))
                blobs.append(blob)
            for kind, (rows, blobs) in by_kind.items():
                matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(rows), dim)
                self._index(kind + suffix, dim).add(rows, matrix)

    def _index(self, key: str, dim: int) -> VectorIndex:
        if key not in self._indexes:
            self._indexes[key] = VectorIndex(dim)
        return self._indexes[key]

    def _sync(self) -> None:
        """Bring the in-memory copies up to the last committed write of any process (caller holds the lock)."""
        self._db.execute("BEGIN")
        try:
            floor = self._db.execute("SELECT value FROM vector_meta WHERE key='log_floor'").fetchone()[0]
            top = self._db.execute("SELECT coalesce(max(seq), 0) FROM vector_log").fetchone()[0]
            if self._seq < floor:
                self._indexes = {}
                self._load("1", ())
                self._seq = max(floor, top)
                self.full_loads += 1
            elif top > self._seq:
                final: dict[int, tuple[str, int]] = {}
                for _, kind, rowid, live in self._db.execute(
                        "SELECT seq, kind, rowid, live FROM vector_log WHERE seq > ? ORDER BY seq", (self._seq,)):
                    final[rowid] = (kind, live)
                for rowid in final:
                    for index in self._indexes.values():
                        index.remove(rowid)
                added = [rowid for rowid, (_, live) in final.items() if live]
                for i in range(0, len(added), 500):
                    chunk = added[i:i + 500]
                    self._load(f"u.rowid IN ({','.join('?' * len(chunk))})", chunk)
                self._seq = top
        finally:
            self._db.execute("COMMIT")

    def warm_up(self) -> None:
        """Load the in-memory copy now rather than on the first search."""
        with self._lock:
            self._sync()

    def search(self, vector: np.ndarray, kind: str, flt: SearchFilter, limit: int, using: str = "text") -> list[Hit]:
        if kind not in UNIT_KINDS or using not in VECTOR_NAMES:
            raise ValueError(f"unknown kind {kind!r} or vector {using!r}")
        key = kind if using == "text" else f"{kind}:image"
        query = vector.astype(np.float32)
        norm = float(np.linalg.norm(query))
        query = query / norm if norm > 0 else query
        with self._lock:
            self._sync()
            index = self._indexes.get(key)
            ranked = index.search(query, flt, limit) if index is not None else []
            if not ranked:
                return []
            marks = ",".join("?" * len(ranked))
            rows = {r[10]: r for r in self._db.execute(
                f"SELECT {PAYLOAD_COLUMNS}, u.rowid FROM units u WHERE u.rowid IN ({marks})", [r for r, _ in ranked])}
        return [Hit(rows[rowid][0], score, payload(rows[rowid])) for rowid, score in ranked if rowid in rows]
