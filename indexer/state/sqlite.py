"""The conversation state in one SQLite file of the data dir: the embedded default.

A transaction takes SQLite's write lock (``BEGIN IMMEDIATE``), so it is the only writer of the whole
file, whichever process or thread runs it: the per-conversation locks of the protocol hold already.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from indexer.model import ConversationKey
from indexer.state.sql import SqlState
from indexer.stores.sqlite import connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, participants TEXT,
    PRIMARY KEY (tenant_id, conversation_id)
);
CREATE TABLE IF NOT EXISTS messages (
    tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL,
    sender_id TEXT NOT NULL, sender_name TEXT, sent_at TEXT NOT NULL, sent_ts REAL NOT NULL,
    text TEXT NOT NULL, images TEXT NOT NULL, reply_to TEXT, vector BLOB, version REAL NOT NULL DEFAULT 0,
    image_vector BLOB, event_id TEXT,
    PRIMARY KEY (tenant_id, conversation_id, message_id)
);
CREATE INDEX IF NOT EXISTS messages_order ON messages(tenant_id, conversation_id, sent_ts, message_id);
CREATE INDEX IF NOT EXISTS messages_sender ON messages(tenant_id, sender_id);
CREATE TABLE IF NOT EXISTS tombstones (
    tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL,
    version REAL NOT NULL, event_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id, message_id)
);
CREATE TABLE IF NOT EXISTS fragments (
    fragment_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL,
    start_ts REAL NOT NULL, start_message_id TEXT NOT NULL, message_ids TEXT NOT NULL,
    start_at TEXT NOT NULL, end_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fragments_order ON fragments(tenant_id, conversation_id, start_ts, start_message_id);
CREATE TABLE IF NOT EXISTS pending (
    tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, change TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id)
);
CREATE TABLE IF NOT EXISTS sender_tokens (
    tenant_id TEXT NOT NULL, token TEXT NOT NULL, sender_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, token, sender_id)
);
CREATE TABLE IF NOT EXISTS sender_aliases (
    tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, fragment_id TEXT NOT NULL, token TEXT NOT NULL,
    sender_id TEXT NOT NULL, PRIMARY KEY (fragment_id, token, sender_id)
);
CREATE INDEX IF NOT EXISTS sender_aliases_token ON sender_aliases(tenant_id, token);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('unit_version', 0);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL);
"""

#: Columns added after the first release, with their declarations: old data dirs are migrated.
ADDED_COLUMNS = {
    "messages": {"version": "REAL NOT NULL DEFAULT 0", "image_vector": "BLOB", "event_id": "TEXT"},
    "conversations": {"participants_version": "REAL", "participants_event": "TEXT", "erased_before": "REAL"},
    "pending": {"attempts": "INTEGER NOT NULL DEFAULT 0", "last_error": "TEXT", "parked_at": "REAL"},
}
#: How long a writer retries ``BEGIN IMMEDIATE`` after SQLite's own busy timeout gave up.
WRITE_WAIT_S = 300.0


class SqliteState(SqlState):
    def __init__(self, path: str | Path):
        self._db = connect(path)
        self._db.execute("PRAGMA synchronous=FULL")
        self.lock = threading.RLock()
        with self.lock:
            self._begin()
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                for table, columns in ADDED_COLUMNS.items():
                    present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                    for name, declaration in columns.items():
                        if name not in present:
                            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _execute(self, sql: str, args: Sequence = ()):
        return self._db.execute(sql, args)

    def _executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        self._db.executemany(sql, rows)

    def _begin(self) -> None:
        """Take the write lock; contention makes a writer wait, never fail."""
        deadline = time.monotonic() + WRITE_WAIT_S
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock:
            self._begin()
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def lock_conversations(self, keys: Iterable[ConversationKey]) -> None:
        """The transaction holds the database's write lock: nothing more to take."""

    def try_lock_conversation(self, tenant_id: str, conversation_id: str) -> bool:
        return True

    def next_version(self) -> int:
        return self._db.execute("UPDATE counters SET value = value + 1 WHERE name = 'unit_version'"
                                " RETURNING value").fetchone()[0]

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database so erased rows leave no copy in it."""
        with self.lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self._db.close()
