"""Embedded stores on SQLite: BM25 through FTS5 and exact dense search through NumPy.

Both keep the same unit table, so tenant, visibility, conversation, sender and time filters are one
SQL clause evaluated inside the store. SQLite in WAL mode lets several worker processes share a data
dir (readers never block; writers queue on SQLite's lock), which Qdrant's local mode cannot.

BM25 on FTS5 was chosen over tantivy (``python -m ops.bench_bm25``): on the LoCoMo turns the two are
within 0.02 recall and both answer in under a millisecond, while FTS5 ships with Python, deletes and
updates transactionally, and joins the visibility filter in the same statement as the ranking. One
FTS table per unit kind keeps term statistics of turns, windows and fragments apart.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from indexer.model import EVERYONE, UNIT_KINDS, VECTOR_NAMES, Hit, SearchFilter, Unit
from indexer.stores.base import check_vectors
from indexer.stores.vector_index import IndexRow, VectorIndex
from indexer.text import keywords

#: How long a writer waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 60_000
#: FTS5 removes a deleted document's terms from its index at once (SQLite 3.42 and later).
SECURE_DELETE_FTS = sqlite3.sqlite_version_info >= (3, 42, 0)
#: Change-log entries of the vector store kept before it is emptied (each process then reloads once).
LOG_KEEP = 200_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    rowid INTEGER PRIMARY KEY,
    unit_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    fragment_id TEXT NOT NULL,
    message_ids TEXT NOT NULL,
    sender_ids TEXT NOT NULL,
    visible_to TEXT NOT NULL,
    start_ts REAL NOT NULL,
    end_ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS units_tenant ON units(tenant_id, kind, conversation_id);
CREATE TABLE IF NOT EXISTS unit_principals (rowid INTEGER NOT NULL, principal TEXT NOT NULL, PRIMARY KEY (rowid, principal));
CREATE TABLE IF NOT EXISTS unit_senders (rowid INTEGER NOT NULL, sender_id TEXT NOT NULL, PRIMARY KEY (rowid, sender_id));
"""

_PAYLOAD_COLUMNS = ("u.unit_id, u.kind, u.tenant_id, u.conversation_id, u.fragment_id, u.message_ids, u.sender_ids,"
                    " u.visible_to, u.start_ts, u.end_ts")


def match_expression(text: str) -> str | None:
    """An FTS5 MATCH string that can only OR quoted terms: user text never reaches the query syntax."""
    terms = keywords(text)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms[:64])


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch a new database to WAL. The switch needs an exclusive lock and SQLite answers "locked" at
    once, without its busy handler, while another process creates the same file: wait and retry."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.01
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(0.5, delay * 2)


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection shared by the threads of one process, safe next to other processes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _use_wal(db)
    db.execute("PRAGMA synchronous=NORMAL")
    # Freed pages are zeroed: a deleted message must not linger in the file.
    db.execute("PRAGMA secure_delete=ON")
    return db


def _payload(row: Sequence) -> dict:
    return {
        "kind": row[1], "tenant_id": row[2], "conversation_id": row[3], "fragment_id": row[4],
        "message_ids": json.loads(row[5]), "sender_ids": json.loads(row[6]), "visible_to": json.loads(row[7]),
        "start_ts": row[8], "end_ts": row[9],
    }


def filter_sql(kind: str, flt: SearchFilter) -> tuple[str, list]:
    """The WHERE clause (over alias ``u``) every search of every SQLite store applies."""
    sql = [" u.kind = ? AND u.tenant_id = ?",
           " AND EXISTS (SELECT 1 FROM unit_principals p WHERE p.rowid = u.rowid AND p.principal IN (?, ?))"]
    args: list = [kind, flt.tenant_id, flt.user_id, EVERYONE]
    if flt.conversation_id:
        sql.append(" AND u.conversation_id = ?")
        args.append(flt.conversation_id)
    if flt.sender_ids:
        marks = ",".join("?" * len(flt.sender_ids))
        sql.append(f" AND EXISTS (SELECT 1 FROM unit_senders s WHERE s.rowid = u.rowid AND s.sender_id IN ({marks}))")
        args.extend(flt.sender_ids)
    if flt.sent_after is not None:
        sql.append(" AND u.end_ts >= ?")
        args.append(flt.sent_after)
    if flt.sent_before is not None:
        sql.append(" AND u.start_ts <= ?")
        args.append(flt.sent_before)
    return "".join(sql), args


class _SqliteUnits:
    """Unit metadata shared by both SQLite stores; subclasses add their index per unit."""

    def __init__(self, path: str | Path):
        self._db = connect(path)
        self._lock = threading.Lock()
        self._db.executescript(_SCHEMA)
        self._create_index_tables()

    def _create_index_tables(self) -> None:
        raise NotImplementedError

    def _write_index(self, rowid: int, unit: Unit) -> None:
        raise NotImplementedError

    def _delete_index(self, rowid: int, kind: str) -> None:
        raise NotImplementedError

    def _delete_rows(self, unit_ids: Sequence[str]) -> None:
        for unit_id in unit_ids:
            row = self._db.execute("SELECT rowid, kind FROM units WHERE unit_id=?", (unit_id,)).fetchone()
            if row is None:
                continue
            rowid, kind = row
            self._delete_index(rowid, kind)
            self._db.execute("DELETE FROM unit_principals WHERE rowid=?", (rowid,))
            self._db.execute("DELETE FROM unit_senders WHERE rowid=?", (rowid,))
            self._db.execute("DELETE FROM units WHERE rowid=?", (rowid,))

    def _write(self, action) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                action()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def upsert(self, units: Sequence[Unit]) -> None:
        for u in units:
            if u.kind not in UNIT_KINDS:
                raise ValueError(f"unit {u.unit_id}: unknown kind {u.kind!r}")

        def action() -> None:
            self._delete_rows([u.unit_id for u in units])
            for u in units:
                cur = self._db.execute(
                    "INSERT INTO units(unit_id, kind, tenant_id, conversation_id, fragment_id, message_ids,"
                    " sender_ids, visible_to, start_ts, end_ts) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (u.unit_id, u.kind, u.tenant_id, u.conversation_id, u.fragment_id, json.dumps(u.message_ids),
                     json.dumps(u.sender_ids), json.dumps(u.visible_to), u.start_ts, u.end_ts),
                )
                rowid = cur.lastrowid
                self._write_index(rowid, u)
                self._db.executemany("INSERT OR IGNORE INTO unit_principals VALUES (?, ?)",
                                     [(rowid, p) for p in u.visible_to])
                self._db.executemany("INSERT OR IGNORE INTO unit_senders VALUES (?, ?)",
                                     [(rowid, s) for s in u.sender_ids])

        self._write(action)

    def delete(self, unit_ids: Sequence[str]) -> None:
        self._write(lambda: self._delete_rows(unit_ids))

    def count(self, tenant_id: str | None = None) -> int:
        with self._lock:
            if tenant_id is None:
                return self._db.execute("SELECT count(*) FROM units").fetchone()[0]
            return self._db.execute("SELECT count(*) FROM units WHERE tenant_id=?", (tenant_id,)).fetchone()[0]

    def compact(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def refresh(self) -> None:
        """Writes are visible when committed; nothing to do."""

    def close(self) -> None:
        with self._lock:
            self._db.close()


def scope_token(tenant_id: str, principal: str) -> str:
    """The indexed word that says "visible to ``principal`` in ``tenant_id``": digits only, so no stemming."""
    return str(int.from_bytes(hashlib.sha256(f"{tenant_id}\x1f{principal}".encode()).digest()[:8], "big"))


class SqliteBM25Store(_SqliteUnits):
    """FTS5 with two columns: the text, and scope words naming who may see the unit.

    The MATCH intersects the query's terms with the asking user's scope words inside the inverted
    index, so the ranking only ever touches units the user may see; the SQL filter still checks every
    row exactly. The scope column has weight 0 in ``bm25()``.
    """

    #: Searches run on per-thread read connections, so the three BM25 lists of a query run at once
    #: (SQLite releases the GIL while it steps).
    concurrent_search = True

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._readers = threading.local()
        self._all_readers: list[sqlite3.Connection] = []
        super().__init__(path)

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._readers, "db", None)
        if db is None:
            db = self._readers.db = connect(self._path)
            with self._lock:
                self._all_readers.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in self._all_readers:
                db.close()
            self._all_readers.clear()
        super().close()

    def _create_index_tables(self) -> None:
        for kind in UNIT_KINDS:
            self._db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS bm25_{kind}"
                             " USING fts5(text, scope, tokenize='porter unicode61')")
            if SECURE_DELETE_FTS:
                self._db.execute(f"INSERT INTO bm25_{kind}(bm25_{kind}, rank) VALUES ('secure-delete', 1)")
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE name=?", (f"fts_{kind}",)).fetchone():
                self._migrate(kind)

    def _migrate(self, kind: str) -> None:
        """Data dirs from before scope words: copy each unit's text over with its scope, drop the old table."""
        self._db.execute("BEGIN IMMEDIATE")
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name=?", (f"fts_{kind}",)).fetchone():
            self._db.execute("COMMIT")
            return
        rows = self._db.execute(f"SELECT f.rowid, f.text, u.tenant_id, u.visible_to FROM fts_{kind} f"
                                " JOIN units u ON u.rowid = f.rowid").fetchall()
        self._db.executemany(f"INSERT INTO bm25_{kind}(rowid, text, scope) VALUES (?, ?, ?)",
                             [(rowid, text, self._scope(tenant, json.loads(visible)))
                              for rowid, text, tenant, visible in rows])
        self._db.execute(f"DROP TABLE fts_{kind}")
        self._db.execute("COMMIT")

    @staticmethod
    def _scope(tenant_id: str, visible_to: Sequence[str]) -> str:
        return " ".join(scope_token(tenant_id, p) for p in visible_to)

    def _write_index(self, rowid: int, unit: Unit) -> None:
        self._db.execute(f"INSERT INTO bm25_{unit.kind}(rowid, text, scope) VALUES (?, ?, ?)",
                         (rowid, unit.text, self._scope(unit.tenant_id, unit.visible_to)))

    def _delete_index(self, rowid: int, kind: str) -> None:
        self._db.execute(f"DELETE FROM bm25_{kind} WHERE rowid=?", (rowid,))

    def compact(self) -> None:
        """Make sure deleted documents left the inverted index physically; called after erasures.

        With SQLite 3.42 or later, FTS5's ``secure-delete`` removes a document's terms when it is
        deleted, so nothing is left to do but the checkpoint. Older FTS5 only marks deletions and keeps
        the terms in old segments until a merge: there the whole index is merged ('optimize'), a cost
        in the size of the index.
        """
        if not SECURE_DELETE_FTS:
            with self._lock:
                for kind in UNIT_KINDS:
                    self._db.execute(f"INSERT INTO bm25_{kind}(bm25_{kind}) VALUES ('optimize')")
        super().compact()

    def search(self, text: str, kind: str, flt: SearchFilter, limit: int) -> list[Hit]:
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        expression = match_expression(text)
        if expression is None:
            return []
        scope = f'"{scope_token(flt.tenant_id, flt.user_id)}" OR "{scope_token(flt.tenant_id, EVERYONE)}"'
        where, args = filter_sql(kind, flt)
        table = f"bm25_{kind}"
        sql = (f"SELECT {_PAYLOAD_COLUMNS}, bm25({table}, 1.0, 0.0) AS rank FROM {table}"
               f" JOIN units u ON u.rowid = {table}.rowid WHERE {table} MATCH ? AND {where}"
               " ORDER BY rank LIMIT ?")
        rows = self._reader().execute(sql, [f"{{scope}} : ({scope}) AND {{text}} : ({expression})", *args,
                                            limit]).fetchall()
        return [Hit(r[0], -float(r[10]), _payload(r)) for r in rows]


class SqliteVectorStore(_SqliteUnits):
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
                f"SELECT {_PAYLOAD_COLUMNS}, u.rowid FROM units u WHERE u.rowid IN ({marks})", [r for r, _ in ranked])}
        return [Hit(rows[rowid][0], score, _payload(rows[rowid])) for rowid, score in ranked if rowid in rows]
