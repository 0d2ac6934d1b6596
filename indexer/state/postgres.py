"""The conversation state in PostgreSQL: one truth shared by every worker of a fleet.

psycopg 3 with a connection pool. A transaction holds one pooled connection for its thread; the
statements outside a transaction (the query path's reads) borrow one each. Writers of one
conversation are serialised by a transaction-scoped advisory lock on (tenant, conversation), taken in
sorted order so that two batches never wait on each other in a circle; ``index_pending`` only *tries*
the lock and skips a conversation another worker is indexing. Migrations are numbered, applied once
under an advisory lock, so processes starting together do not race on DDL.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np

from indexer.model import ConversationKey
from indexer.state.sql import SqlState, blob

#: Numbered migrations; a database records the ones applied in ``schema_migrations``.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE conversations (
        tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, participants TEXT,
        participants_version DOUBLE PRECISION, participants_event TEXT, erased_before DOUBLE PRECISION,
        PRIMARY KEY (tenant_id, conversation_id)
    );
    CREATE TABLE messages (
        tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL,
        sender_id TEXT NOT NULL, sender_name TEXT, sent_at TEXT NOT NULL, sent_ts DOUBLE PRECISION NOT NULL,
        text TEXT NOT NULL, images TEXT NOT NULL, reply_to TEXT, vector BYTEA,
        version DOUBLE PRECISION NOT NULL DEFAULT 0, image_vector BYTEA, event_id TEXT,
        PRIMARY KEY (tenant_id, conversation_id, message_id)
    );
    CREATE INDEX messages_order ON messages(tenant_id, conversation_id, sent_ts, message_id);
    CREATE INDEX messages_sender ON messages(tenant_id, sender_id);
    CREATE TABLE tombstones (
        tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL,
        version DOUBLE PRECISION NOT NULL, event_id TEXT NOT NULL,
        PRIMARY KEY (tenant_id, conversation_id, message_id)
    );
    CREATE TABLE fragments (
        fragment_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL,
        start_ts DOUBLE PRECISION NOT NULL, start_message_id TEXT NOT NULL, message_ids TEXT NOT NULL,
        start_at TEXT NOT NULL, end_at TEXT NOT NULL
    );
    CREATE INDEX fragments_order ON fragments(tenant_id, conversation_id, start_ts, start_message_id);
    CREATE TABLE pending (
        tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, change TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant_id, conversation_id)
    );
    CREATE INDEX pending_since ON pending(since);
    CREATE TABLE sender_tokens (
        tenant_id TEXT NOT NULL, token TEXT NOT NULL, sender_id TEXT NOT NULL,
        PRIMARY KEY (tenant_id, token, sender_id)
    );
    CREATE SEQUENCE unit_version;
    CREATE TABLE cursors (name TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL);
    """,
    """
    ALTER TABLE pending ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pending ADD COLUMN last_error TEXT;
    ALTER TABLE pending ADD COLUMN parked_at DOUBLE PRECISION;
    """,
    """
    CREATE TABLE sender_aliases (
        tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, fragment_id TEXT NOT NULL, token TEXT NOT NULL,
        sender_id TEXT NOT NULL, PRIMARY KEY (fragment_id, token, sender_id)
    );
    CREATE INDEX sender_aliases_token ON sender_aliases(tenant_id, token);
    """,
]
#: Advisory lock key of the migration step (any constant outside the conversation keys' use).
_MIGRATION_LOCK = 7_215_550_001


def conversation_lock_key(tenant_id: str, conversation_id: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``."""
    digest = hashlib.blake2b(f"{tenant_id}\x1f{conversation_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresState(SqlState):
    def __init__(self, url: str, min_size: int = 1, max_size: int = 8):
        import psycopg_pool

        self.url = url
        self._pool = psycopg_pool.ConnectionPool(url, min_size=min_size, max_size=max_size, open=True,
                                                 kwargs={"autocommit": False})
        self._pool.wait(timeout=60)
        self._local = threading.local()
        self._migrate()

    def _migrate(self) -> None:
        with self._pool.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()}
            for number, ddl in enumerate(MIGRATIONS, start=1):
                if number not in done:
                    conn.execute(ddl)
                    conn.execute("INSERT INTO schema_migrations VALUES (%s)", (number,))

    def _execute(self, sql: str, args: Sequence = ()):
        sql = sql.replace("?", "%s")
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn.execute(sql, args)
        with self._pool.connection() as borrowed:
            cursor = borrowed.execute(sql, args)
            # The rows are read before the connection goes back to the pool.
            return _Rows(cursor.fetchall() if cursor.description else [])

    def _executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        """Pipelined by psycopg: one round trip for the batch, not one per row."""
        if not rows:
            return
        conn = getattr(self._local, "conn", None)
        if conn is None:
            raise RuntimeError("writes to the state happen inside transaction()")
        with conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)

    def set_vectors(self, tenant_id: str, conversation_id: str,
                    vectors: Sequence[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
        """One statement for the whole batch: row-by-row updates cost a round trip and an index pass each."""
        if not vectors:
            return
        self._execute(
            "UPDATE messages m SET vector = d.vector, image_vector = d.image_vector"
            " FROM unnest(?::text[], ?::bytea[], ?::bytea[]) AS d(message_id, vector, image_vector)"
            " WHERE m.tenant_id = ? AND m.conversation_id = ? AND m.message_id = d.message_id",
            ([m for m, _, _ in vectors], [blob(v) for _, v, _ in vectors], [blob(i) for _, _, i in vectors],
             tenant_id, conversation_id))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self._pool.connection() as conn:
            self._local.conn, self._local.tokens = conn, set()
            try:
                with conn.transaction():
                    yield
                    self._insert_sender_tokens(self._local.tokens)
            finally:
                self._local.conn = self._local.tokens = None

    def _add_sender_tokens(self, tokens: set[tuple[str, str, str]]) -> None:
        """Written at commit in one sorted batch: writers of other conversations of one tenant share
        these rows, and inserting them as turns came made two such writers wait for each other
        (DeadlockDetected). Sorted, the second waits for the first to commit, never in a cycle."""
        pending = getattr(self._local, "tokens", None)
        if pending is None:
            self._insert_sender_tokens(tokens)
        else:
            pending.update(tokens)

    def lock_conversations(self, keys: Iterable[ConversationKey]) -> None:
        for key in sorted({conversation_lock_key(*k) for k in keys}):
            self._execute("SELECT pg_advisory_xact_lock(?)", (key,))

    def try_lock_conversation(self, tenant_id: str, conversation_id: str) -> bool:
        row = self._execute("SELECT pg_try_advisory_xact_lock(?)",
                            (conversation_lock_key(tenant_id, conversation_id),)).fetchone()
        return bool(row[0])

    def next_version(self) -> int:
        return self._execute("SELECT nextval('unit_version')").fetchone()[0]

    def checkpoint(self) -> None:
        """Vacuum the tables erasures touch, so their dead rows become free space at once.

        Freed space is overwritten by later rows, not zeroed; WAL archives and backups keep what
        the operator's PostgreSQL retention keeps (README, Erasure).
        """
        with self._pool.connection() as conn:
            conn.autocommit = True
            try:
                conn.execute("VACUUM messages, fragments, pending, sender_tokens")
            finally:
                conn.autocommit = False

    def close(self) -> None:
        self._pool.close()


class _Rows:
    """Rows already fetched, read like a cursor."""

    def __init__(self, rows: list):
        self._rows = rows

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list:
        return self._rows
