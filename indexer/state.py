"""Conversation state: the turns of every conversation, their vectors, and the current fragments.

Segmentation needs the neighbours of a changed turn, and span selection needs turn texts; both are
read here. The state lives in one SQLite file next to the indexes; a batch of events is applied in
one transaction that commits only after the stores have accepted the batch's writes, so a crash
between the two replays the batch instead of losing it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from indexer.segmenter import ImageInfo, Turn
from indexer.stores.sqlite import connect
from indexer.text import name_tokens

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, participants TEXT,
    PRIMARY KEY (tenant_id, conversation_id)
);
CREATE TABLE IF NOT EXISTS messages (
    tenant_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL,
    sender_id TEXT NOT NULL, sender_name TEXT, sent_at TEXT NOT NULL, sent_ts REAL NOT NULL,
    text TEXT NOT NULL, images TEXT NOT NULL, reply_to TEXT, vector BLOB, version REAL NOT NULL DEFAULT 0,
    image_vector BLOB,
    PRIMARY KEY (tenant_id, conversation_id, message_id)
);
CREATE INDEX IF NOT EXISTS messages_order ON messages(tenant_id, conversation_id, sent_ts, message_id);
CREATE INDEX IF NOT EXISTS messages_sender ON messages(tenant_id, sender_id);
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
"""

SortKey = tuple[float, str]
_TURN_COLUMNS = "message_id, sender_id, sender_name, sent_at, text, images, vector, image_vector"


@dataclass(frozen=True)
class FragmentRecord:
    fragment_id: str
    tenant_id: str
    conversation_id: str
    message_ids: tuple[str, ...]
    start_at: datetime
    end_at: datetime

    @property
    def start_key(self) -> SortKey:
        return (self.start_at.timestamp(), self.message_ids[0])


def _turn_from_row(row) -> Turn:
    message_id, sender_id, sender_name, sent_at, text, images, vector, image_vector = row
    return Turn(
        message_id=message_id, sender_id=sender_id, sender_name=sender_name,
        sent_at=datetime.fromisoformat(sent_at), text=text,
        images=tuple(ImageInfo(i["uri"], i.get("caption")) for i in json.loads(images)),
        vector=np.frombuffer(vector, dtype=np.float32) if vector is not None else None,
        image_vector=np.frombuffer(image_vector, dtype=np.float32) if image_vector is not None else None,
    )


def images_json(images: Sequence[ImageInfo]) -> str:
    return json.dumps([{"uri": i.uri, "caption": i.caption} for i in images])


class ConversationState:
    def __init__(self, path: str | Path):
        self._db = connect(path)
        self._db.executescript(_SCHEMA)
        # Data dirs written before edit versions, and before image vectors (the mean vector of a turn's
        # embedded images), lack these columns.
        self._add_column("version", "REAL NOT NULL DEFAULT 0")
        self._add_column("image_vector", "BLOB")
        self.lock = threading.RLock()

    def _add_column(self, name: str, declaration: str) -> None:
        """Migrate an old data dir; several processes may open it at once, and one of them wins."""
        if name in {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}:
            return
        try:
            self._db.execute(f"ALTER TABLE messages ADD COLUMN {name} {declaration}")
        except sqlite3.OperationalError as exc:
            if "duplicate column name" not in str(exc):
                raise

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all."""
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def participants(self, tenant_id: str, conversation_id: str) -> list[str] | None:
        row = self._db.execute("SELECT participants FROM conversations WHERE tenant_id=? AND conversation_id=?",
                               (tenant_id, conversation_id)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None

    def conversation_exists(self, tenant_id: str, conversation_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM conversations WHERE tenant_id=? AND conversation_id=?",
                                (tenant_id, conversation_id)).fetchone() is not None

    def set_participants(self, tenant_id: str, conversation_id: str, participants: list[str] | None) -> None:
        self._db.execute(
            "INSERT INTO conversations VALUES (?,?,?) ON CONFLICT(tenant_id, conversation_id)"
            " DO UPDATE SET participants=excluded.participants",
            (tenant_id, conversation_id, json.dumps(sorted(participants)) if participants is not None else None),
        )

    def ensure_conversation(self, tenant_id: str, conversation_id: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO conversations VALUES (?,?,NULL)", (tenant_id, conversation_id))

    def get_turn(self, tenant_id: str, conversation_id: str, message_id: str) -> Turn | None:
        row = self._db.execute(
            f"SELECT {_TURN_COLUMNS} FROM messages"
            " WHERE tenant_id=? AND conversation_id=? AND message_id=?", (tenant_id, conversation_id, message_id),
        ).fetchone()
        return _turn_from_row(row) if row else None

    def put_turn(self, tenant_id: str, conversation_id: str, turn: Turn, reply_to: str | None,
                 version: float = 0.0) -> None:
        vector = turn.vector.astype(np.float32).tobytes() if turn.vector is not None else None
        image_vector = turn.image_vector.astype(np.float32).tobytes() if turn.image_vector is not None else None
        self._db.execute(
            "INSERT OR REPLACE INTO messages (tenant_id, conversation_id, message_id, sender_id, sender_name, sent_at,"
            " sent_ts, text, images, reply_to, vector, version, image_vector) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (tenant_id, conversation_id, turn.message_id, turn.sender_id, turn.sender_name,
             turn.sent_at.isoformat(), turn.sent_at.timestamp(), turn.text, images_json(turn.images), reply_to,
             vector, version, image_vector),
        )
        self._db.executemany("INSERT OR IGNORE INTO sender_tokens VALUES (?,?,?)",
                             [(tenant_id, tok, turn.sender_id) for tok in name_tokens(turn.sender_name)])

    def version(self, tenant_id: str, conversation_id: str, message_id: str) -> float | None:
        """The version (edit time) of the stored message, None when there is none."""
        row = self._db.execute("SELECT version FROM messages WHERE tenant_id=? AND conversation_id=? AND message_id=?",
                               (tenant_id, conversation_id, message_id)).fetchone()
        return row[0] if row else None

    def max_version(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> float:
        marks = ",".join("?" * len(message_ids))
        row = self._db.execute(f"SELECT max(version) FROM messages WHERE tenant_id=? AND conversation_id=?"
                               f" AND message_id IN ({marks})", [tenant_id, conversation_id, *message_ids]).fetchone()
        return row[0] or 0.0

    def set_vector(self, tenant_id: str, conversation_id: str, message_id: str, vector: np.ndarray,
                   image_vector: np.ndarray | None = None) -> None:
        image = image_vector.astype(np.float32).tobytes() if image_vector is not None else None
        self._db.execute("UPDATE messages SET vector=?, image_vector=? WHERE tenant_id=? AND conversation_id=?"
                         " AND message_id=?",
                         (vector.astype(np.float32).tobytes(), image, tenant_id, conversation_id, message_id))

    def delete_turn(self, tenant_id: str, conversation_id: str, message_id: str) -> None:
        self._db.execute("DELETE FROM messages WHERE tenant_id=? AND conversation_id=? AND message_id=?",
                         (tenant_id, conversation_id, message_id))

    def turns(self, tenant_id: str, conversation_id: str, from_key: SortKey | None = None) -> list[Turn]:
        sql = (f"SELECT {_TURN_COLUMNS} FROM messages"
               " WHERE tenant_id=? AND conversation_id=?")
        args: list = [tenant_id, conversation_id]
        if from_key is not None:
            sql += " AND (sent_ts > ? OR (sent_ts = ? AND message_id >= ?))"
            args += [from_key[0], from_key[0], from_key[1]]
        sql += " ORDER BY sent_ts, message_id"
        return [_turn_from_row(r) for r in self._db.execute(sql, args)]

    def turns_by_id(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> dict[str, Turn]:
        marks = ",".join("?" * len(message_ids))
        rows = self._db.execute(
            f"SELECT {_TURN_COLUMNS} FROM messages"
            f" WHERE tenant_id=? AND conversation_id=? AND message_id IN ({marks})",
            [tenant_id, conversation_id, *message_ids],
        )
        return {r[0]: _turn_from_row(r) for r in rows}

    def tenants_of_conversation(self, conversation_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT tenant_id FROM conversations WHERE conversation_id=? ORDER BY tenant_id", (conversation_id,))]

    def conversations_of_sender(self, tenant_id: str, sender_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT conversation_id FROM messages WHERE tenant_id=? AND sender_id=?", (tenant_id, sender_id))]

    def message_ids_of_sender(self, tenant_id: str, conversation_id: str, sender_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT message_id FROM messages WHERE tenant_id=? AND conversation_id=? AND sender_id=?",
            (tenant_id, conversation_id, sender_id))]

    def forget_sender_tokens(self, tenant_id: str, sender_id: str) -> None:
        self._db.execute("DELETE FROM sender_tokens WHERE tenant_id=? AND sender_id=?", (tenant_id, sender_id))

    def senders_named(self, tenant_id: str, tokens: Sequence[str]) -> set[str]:
        """Senders of the tenant whose name contains one of ``tokens``."""
        if not tokens:
            return set()
        marks = ",".join("?" * len(tokens))
        return {r[0] for r in self._db.execute(
            f"SELECT sender_id FROM sender_tokens WHERE tenant_id=? AND token IN ({marks})", [tenant_id, *tokens])}

    def merge_pending(self, tenant_id: str, conversation_id: str, change: dict, merge) -> None:
        """Mark a conversation for indexing, folding ``change`` into a mark already there."""
        row = self._db.execute("SELECT change FROM pending WHERE tenant_id=? AND conversation_id=?",
                               (tenant_id, conversation_id)).fetchone()
        if row is not None:
            change = merge(json.loads(row[0]), change)
        self._db.execute(
            "INSERT INTO pending VALUES (?,?,?,strftime('%s','now')) ON CONFLICT(tenant_id, conversation_id)"
            " DO UPDATE SET change=excluded.change", (tenant_id, conversation_id, json.dumps(change)))

    def pending(self, limit: int | None = None) -> list[tuple[str, str, dict]]:
        """Marked conversations, oldest mark first."""
        rows = self._db.execute("SELECT tenant_id, conversation_id, change FROM pending ORDER BY since, rowid"
                                + (" LIMIT ?" if limit else ""), (limit,) if limit else ())
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def clear_pending(self, tenant_id: str, conversation_id: str) -> None:
        self._db.execute("DELETE FROM pending WHERE tenant_id=? AND conversation_id=?", (tenant_id, conversation_id))

    def turns_without_vector(self, tenant_id: str, conversation_id: str) -> list[Turn]:
        rows = self._db.execute(
            f"SELECT {_TURN_COLUMNS} FROM messages"
            " WHERE tenant_id=? AND conversation_id=? AND vector IS NULL ORDER BY sent_ts, message_id",
            (tenant_id, conversation_id))
        return [_turn_from_row(r) for r in rows]

    def fragments(self, tenant_id: str, conversation_id: str) -> list[FragmentRecord]:
        rows = self._db.execute(
            "SELECT fragment_id, message_ids, start_at, end_at FROM fragments WHERE tenant_id=? AND conversation_id=?"
            " ORDER BY start_ts, start_message_id", (tenant_id, conversation_id))
        return [FragmentRecord(r[0], tenant_id, conversation_id, tuple(json.loads(r[1])),
                               datetime.fromisoformat(r[2]), datetime.fromisoformat(r[3])) for r in rows]

    def fragments_by_id(self, fragment_ids: Sequence[str]) -> dict[str, FragmentRecord]:
        if not fragment_ids:
            return {}
        marks = ",".join("?" * len(fragment_ids))
        rows = self._db.execute(
            "SELECT fragment_id, tenant_id, conversation_id, message_ids, start_at, end_at FROM fragments"
            f" WHERE fragment_id IN ({marks})", list(fragment_ids))
        return {r[0]: FragmentRecord(r[0], r[1], r[2], tuple(json.loads(r[3])), datetime.fromisoformat(r[4]),
                                     datetime.fromisoformat(r[5])) for r in rows}

    def put_fragment(self, fragment: FragmentRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO fragments VALUES (?,?,?,?,?,?,?,?)",
            (fragment.fragment_id, fragment.tenant_id, fragment.conversation_id, fragment.start_at.timestamp(),
             fragment.message_ids[0], json.dumps(list(fragment.message_ids)), fragment.start_at.isoformat(),
             fragment.end_at.isoformat()),
        )

    def delete_fragment(self, fragment_id: str) -> None:
        self._db.execute("DELETE FROM fragments WHERE fragment_id=?", (fragment_id,))

    def delete_conversation(self, tenant_id: str, conversation_id: str) -> None:
        for table in ("messages", "fragments", "conversations", "pending"):
            self._db.execute(f"DELETE FROM {table} WHERE tenant_id=? AND conversation_id=?",
                             (tenant_id, conversation_id))

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database so erased rows leave no copy in it."""
        with self.lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def counts(self) -> dict[str, int]:
        return {t: self._db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("conversations", "messages", "fragments")}

    def close(self) -> None:
        self._db.close()
