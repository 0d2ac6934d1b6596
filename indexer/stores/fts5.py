"""The embedded keyword store: BM25 through SQLite FTS5, one table per unit kind.

BM25 on FTS5 was chosen over tantivy (``python -m ops.bench.bm25``): on the LoCoMo turns the two are
within 0.02 recall and both answer in under a millisecond, while FTS5 ships with Python, deletes and
updates transactionally, and joins the visibility filter in the same statement as the ranking. One
FTS table per unit kind keeps term statistics of turns, windows and fragments apart.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Sequence


from indexer.model import EVERYONE, UNIT_KINDS, Hit, SearchFilter, Unit
from indexer.stores.sqlite import PAYLOAD_COLUMNS, SqliteUnits, connect, filter_sql, payload
from indexer.text import keywords

#: FTS5 removes a deleted document's terms from its index at once (SQLite 3.42 and later).
SECURE_DELETE_FTS = sqlite3.sqlite_version_info >= (3, 42, 0)


def match_expression(text: str) -> str | None:
    """An FTS5 MATCH string that can only OR quoted terms: user text never reaches the query syntax."""
    terms = keywords(text)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms[:64])


def scope_token(tenant_id: str, principal: str) -> str:
    """The indexed word that says "visible to ``principal`` in ``tenant_id``": digits only, so no stemming."""
    return str(int.from_bytes(hashlib.sha256(f"{tenant_id}\x1f{principal}".encode()).digest()[:8], "big"))


class SqliteBM25Store(SqliteUnits):
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
        sql = (f"SELECT {PAYLOAD_COLUMNS}, bm25({table}, 1.0, 0.0) AS rank FROM {table}"
               f" JOIN units u ON u.rowid = {table}.rowid WHERE {table} MATCH ? AND {where}"
               " ORDER BY rank LIMIT ?")
        rows = self._reader().execute(sql, [f"{{scope}} : ({scope}) AND {{text}} : ({expression})", *args,
                                            limit]).fetchall()
        return [Hit(r[0], -float(r[10]), payload(r)) for r in rows]
