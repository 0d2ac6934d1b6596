"""What the embedded SQLite stores share: the connection rules and one unit table with its filters.

BM25 through FTS5 (``fts5.py``) and exact dense search through NumPy (``sqlite_vectors.py``) keep the same unit table, so tenant, visibility, conversation, sender and time filters are one
SQL clause evaluated inside the store. SQLite in WAL mode lets several worker processes share a data
dir (readers never block; writers queue on SQLite's lock), which Qdrant's local mode cannot.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Sequence


from indexer.model import EVERYONE, UNIT_KINDS, SearchFilter, Unit

#: How long a writer waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 60_000

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

PAYLOAD_COLUMNS = ("u.unit_id, u.kind, u.tenant_id, u.conversation_id, u.fragment_id, u.message_ids, u.sender_ids,"
                    " u.visible_to, u.start_ts, u.end_ts")


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


def payload(row: Sequence) -> dict:
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


class SqliteUnits:
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


