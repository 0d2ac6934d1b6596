"""Embedded BM25 on SQLite FTS5 (Porter stemming, Unicode tokenizer).

Chosen over tantivy because it ships with Python, deletes and updates rows transactionally and
evaluates the tenant and visibility filters in the same SQL statement as the ranking (see the
closing note of the issue for the measurement). One FTS table per unit kind keeps term statistics
of turns, windows and fragments apart, as separate Elasticsearch indexes would.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from indexer.stores.base import EVERYONE, UNIT_KINDS, Hit, SearchFilter, Unit
from indexer.text import keywords

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
CREATE INDEX IF NOT EXISTS units_tenant ON units(tenant_id, conversation_id);
CREATE TABLE IF NOT EXISTS unit_principals (rowid INTEGER NOT NULL, principal TEXT NOT NULL, PRIMARY KEY (rowid, principal));
CREATE TABLE IF NOT EXISTS unit_senders (rowid INTEGER NOT NULL, sender_id TEXT NOT NULL, PRIMARY KEY (rowid, sender_id));
"""


def match_expression(text: str) -> str | None:
    """An FTS5 MATCH string that can only OR quoted terms: user text never reaches the query syntax."""
    terms = keywords(text)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms[:64])


class SqliteBM25Store:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Freed pages are zeroed: a deleted message must not linger in the file.
        self._db.execute("PRAGMA secure_delete=ON")
        self._lock = threading.Lock()
        self._db.executescript(_SCHEMA)
        for kind in UNIT_KINDS:
            self._db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS fts_{kind} USING fts5(text, tokenize='porter unicode61')")

    def _delete_rows(self, unit_ids: Sequence[str]) -> None:
        for unit_id in unit_ids:
            row = self._db.execute("SELECT rowid, kind FROM units WHERE unit_id=?", (unit_id,)).fetchone()
            if row is None:
                continue
            rowid, kind = row
            self._db.execute(f"DELETE FROM fts_{kind} WHERE rowid=?", (rowid,))
            self._db.execute("DELETE FROM unit_principals WHERE rowid=?", (rowid,))
            self._db.execute("DELETE FROM unit_senders WHERE rowid=?", (rowid,))
            self._db.execute("DELETE FROM units WHERE rowid=?", (rowid,))

    def upsert(self, units: Sequence[Unit]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._delete_rows([u.unit_id for u in units])
                for u in units:
                    if u.kind not in UNIT_KINDS:
                        raise ValueError(f"unit {u.unit_id}: unknown kind {u.kind!r}")
                    cur = self._db.execute(
                        "INSERT INTO units(unit_id, kind, tenant_id, conversation_id, fragment_id, message_ids,"
                        " sender_ids, visible_to, start_ts, end_ts) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (u.unit_id, u.kind, u.tenant_id, u.conversation_id, u.fragment_id, json.dumps(u.message_ids),
                         json.dumps(u.sender_ids), json.dumps(u.visible_to), u.start_ts, u.end_ts),
                    )
                    rowid = cur.lastrowid
                    self._db.execute(f"INSERT INTO fts_{u.kind}(rowid, text) VALUES (?, ?)", (rowid, u.text))
                    self._db.executemany("INSERT OR IGNORE INTO unit_principals VALUES (?, ?)",
                                         [(rowid, p) for p in u.visible_to])
                    self._db.executemany("INSERT OR IGNORE INTO unit_senders VALUES (?, ?)",
                                         [(rowid, s) for s in u.sender_ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, unit_ids: Sequence[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._delete_rows(unit_ids)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def compact(self) -> None:
        """Merge the FTS segments so deleted documents leave the inverted index physically.

        FTS5 (before SQLite 3.42's secure-delete) only marks deletions; their terms stay in old
        segments until a merge. Called after erasures ("forget me", conversation deletes).
        """
        with self._lock:
            for kind in UNIT_KINDS:
                self._db.execute(f"INSERT INTO fts_{kind}(fts_{kind}) VALUES ('optimize')")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def search(self, text: str, kind: str, flt: SearchFilter, limit: int) -> list[Hit]:
        if kind not in UNIT_KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        expression = match_expression(text)
        if expression is None:
            return []
        sql = [
            f"SELECT u.unit_id, bm25(fts_{kind}) AS rank, u.kind, u.tenant_id, u.conversation_id, u.fragment_id,",
            " u.message_ids, u.sender_ids, u.visible_to, u.start_ts, u.end_ts",
            f" FROM fts_{kind} JOIN units u ON u.rowid = fts_{kind}.rowid",
            f" WHERE fts_{kind} MATCH ? AND u.tenant_id = ?",
            " AND EXISTS (SELECT 1 FROM unit_principals p WHERE p.rowid = u.rowid AND p.principal IN (?, ?))",
        ]
        args: list = [expression, flt.tenant_id, flt.user_id, EVERYONE]
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
        sql.append(" ORDER BY rank LIMIT ?")
        args.append(limit)
        with self._lock:
            rows = self._db.execute("".join(sql), args).fetchall()
        hits = []
        for r in rows:
            payload = {
                "kind": r[2], "tenant_id": r[3], "conversation_id": r[4], "fragment_id": r[5],
                "message_ids": json.loads(r[6]), "sender_ids": json.loads(r[7]), "visible_to": json.loads(r[8]),
                "start_ts": r[9], "end_ts": r[10],
            }
            hits.append(Hit(r[0], -float(r[1]), payload))
        return hits

    def count(self, tenant_id: str | None = None) -> int:
        with self._lock:
            if tenant_id is None:
                return self._db.execute("SELECT count(*) FROM units").fetchone()[0]
            return self._db.execute("SELECT count(*) FROM units WHERE tenant_id=?", (tenant_id,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
