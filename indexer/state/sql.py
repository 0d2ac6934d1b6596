"""The conversation state in SQL, shared by the SQLite and PostgreSQL backends.

Statements are written once with ``?`` placeholders and the upsert syntax both databases speak
(``INSERT ... ON CONFLICT``); a backend supplies the connection handling, the locks, the version
sequence and its DDL.
"""

from __future__ import annotations

import itertools
import json
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator, Sequence

import numpy as np

from indexer.model import ConversationKey, ConversationMeta, FragmentRecord, ImageInfo, Parked, SortKey, Stamp, Turn
from indexer.text import name_tokens

TURN_COLUMNS = "message_id, sender_id, sender_name, sent_at, text, images, vector, image_vector"
#: Tables of one conversation's derived rows (tombstones and the conversation row stay on erasure).
CONVERSATION_TABLES = ("messages", "fragments", "pending", "sender_aliases")
_SAVEPOINTS = itertools.count()
#: An alias names its sender once heard in this many fragments (``ingest.aliases``): one "congrats Sarah!"
#: about a third person, said in reply to Bob, must not make "sarah" mean Bob.
MIN_ALIAS_FRAGMENTS = 2


def _turn_from_row(row) -> Turn:
    message_id, sender_id, sender_name, sent_at, text, images, vector, image_vector = row
    return Turn(
        message_id=message_id, sender_id=sender_id, sender_name=sender_name,
        sent_at=datetime.fromisoformat(sent_at), text=text,
        images=tuple(ImageInfo(i["uri"], i.get("caption"), i.get("text")) for i in json.loads(images)),
        vector=unblob(vector), image_vector=unblob(image_vector),
    )


def images_json(images: Sequence[ImageInfo]) -> str:
    return json.dumps([{"uri": i.uri, "caption": i.caption} | ({"text": i.text} if i.text else {}) for i in images])


#: Tags a vector kept as float16. A turn's text vector was 1,536 of the about 1,900 bytes of its row (9.8 of the 11 GB
#: state of the 1M-fragment bench corpus), and every read of its text reads the page it shares with them; the float16
#: rounding (a relative 0.0005) is far below what the stores' int8 copies lose. An untagged blob is float32, as data
#: dirs written before kept them: its length is a multiple of four, a tagged one's is odd.
_FLOAT16 = b"h"


def blob(vector: np.ndarray | None) -> bytes | None:
    return _FLOAT16 + vector.astype(np.float16).tobytes() if vector is not None else None


def unblob(data: bytes | None) -> np.ndarray | None:
    """A vector as ``blob`` or an earlier data dir wrote it."""
    if data is None:
        return None
    if len(data) % 2 and bytes(data[:1]) == _FLOAT16:
        return np.frombuffer(data, dtype=np.float16, offset=1).astype(np.float32)
    return np.frombuffer(data, dtype=np.float32)


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqlState:
    """Statements over a backend's ``_execute(sql, args) -> cursor`` (``?`` placeholders)."""

    def _execute(self, sql: str, args: Sequence = ()):
        raise NotImplementedError

    def _executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        raise NotImplementedError

    def _one(self, sql: str, args: Sequence = ()):
        return self._execute(sql, args).fetchone()

    def _all(self, sql: str, args: Sequence = ()) -> list:
        return list(self._execute(sql, args).fetchall())

    # ---- conversations ------------------------------------------------------------------------------

    def participants(self, tenant_id: str, conversation_id: str) -> list[str] | None:
        row = self._one("SELECT participants FROM conversations WHERE tenant_id=? AND conversation_id=?",
                        (tenant_id, conversation_id))
        return json.loads(row[0]) if row and row[0] is not None else None

    def conversation(self, tenant_id: str, conversation_id: str) -> ConversationMeta | None:
        row = self._one("SELECT participants, participants_version, participants_event, erased_before"
                        " FROM conversations WHERE tenant_id=? AND conversation_id=?", (tenant_id, conversation_id))
        if row is None:
            return None
        listed = row[0] is not None
        # A list written before stamps existed counts as the oldest possible one.
        stamp = (row[1] or 0.0, row[2] or "") if listed else None
        return ConversationMeta(json.loads(row[0]) if listed else None, stamp, row[3])

    def set_participants(self, tenant_id: str, conversation_id: str, participants: list[str] | None,
                         stamp: Stamp | None) -> None:
        values = (json.dumps(sorted(set(participants))), stamp[0], stamp[1]) if participants is not None \
            else (None, None, None)
        self._execute(
            "INSERT INTO conversations (tenant_id, conversation_id, participants, participants_version,"
            " participants_event) VALUES (?,?,?,?,?) ON CONFLICT (tenant_id, conversation_id) DO UPDATE SET"
            " participants=excluded.participants, participants_version=excluded.participants_version,"
            " participants_event=excluded.participants_event", (tenant_id, conversation_id, *values))

    def conversations(self, after: ConversationKey | None = None, limit: int = 100) -> list[ConversationKey]:
        sql = "SELECT DISTINCT tenant_id, conversation_id FROM messages"
        args: list = []
        if after is not None:
            sql += " WHERE tenant_id > ? OR (tenant_id = ? AND conversation_id > ?)"
            args = [after[0], after[0], after[1]]
        sql += " ORDER BY tenant_id, conversation_id LIMIT ?"
        return [(r[0], r[1]) for r in self._all(sql, [*args, limit])]

    # ---- messages -----------------------------------------------------------------------------------

    def stored_turns(self, tenant_id: str, conversation_id: str,
                     message_ids: Sequence[str]) -> dict[str, tuple[Stamp, Turn]]:
        if not message_ids:
            return {}
        rows = self._all(f"SELECT {TURN_COLUMNS}, version, event_id FROM messages WHERE tenant_id=?"
                         f" AND conversation_id=? AND message_id IN ({_marks(len(message_ids))})",
                         [tenant_id, conversation_id, *message_ids])
        return {r[0]: ((r[8], r[9] or ""), _turn_from_row(r[:8])) for r in rows}

    def tombstones(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> set[str]:
        if not message_ids:
            return set()
        return {r[0] for r in self._all(f"SELECT message_id FROM tombstones WHERE tenant_id=? AND conversation_id=?"
                                        f" AND message_id IN ({_marks(len(message_ids))})",
                                        [tenant_id, conversation_id, *message_ids])}

    def put_tombstones(self, tenant_id: str, conversation_id: str, stamps: Sequence[tuple[str, Stamp]]) -> None:
        self._executemany("INSERT INTO tombstones (tenant_id, conversation_id, message_id, version, event_id)"
                          " VALUES (?,?,?,?,?) ON CONFLICT (tenant_id, conversation_id, message_id) DO NOTHING",
                          [(tenant_id, conversation_id, m, st[0], st[1]) for m, st in stamps])

    def get_turn(self, tenant_id: str, conversation_id: str, message_id: str) -> Turn | None:
        row = self._one(f"SELECT {TURN_COLUMNS} FROM messages WHERE tenant_id=? AND conversation_id=?"
                        " AND message_id=?", (tenant_id, conversation_id, message_id))
        return _turn_from_row(row) if row else None

    def put_turns(self, tenant_id: str, conversation_id: str,
                  turns: Sequence[tuple[Turn, str | None, Stamp]]) -> None:
        self._executemany(
            "INSERT INTO messages (tenant_id, conversation_id, message_id, sender_id, sender_name, sent_at,"
            " sent_ts, text, images, reply_to, vector, version, image_vector, event_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (tenant_id, conversation_id, message_id) DO UPDATE SET"
            " sender_id=excluded.sender_id, sender_name=excluded.sender_name, sent_at=excluded.sent_at,"
            " sent_ts=excluded.sent_ts, text=excluded.text, images=excluded.images, reply_to=excluded.reply_to,"
            " vector=excluded.vector, version=excluded.version, image_vector=excluded.image_vector,"
            " event_id=excluded.event_id",
            [(tenant_id, conversation_id, turn.message_id, turn.sender_id, turn.sender_name,
              turn.sent_at.isoformat(), turn.sent_at.timestamp(), turn.text, images_json(turn.images), reply_to,
              blob(turn.vector), stamp[0], blob(turn.image_vector), stamp[1]) for turn, reply_to, stamp in turns],
        )
        self._add_sender_tokens({(tenant_id, tok, turn.sender_id) for turn, _, _ in turns
                                 for tok in name_tokens(turn.sender_name)})

    def _add_sender_tokens(self, tokens: set[tuple[str, str, str]]) -> None:
        """Rows of the sender-name lookup; a backend with concurrent writers defers them to its commit."""
        self._insert_sender_tokens(tokens)

    def _insert_sender_tokens(self, tokens: set[tuple[str, str, str]]) -> None:
        if tokens:
            self._executemany("INSERT INTO sender_tokens (tenant_id, token, sender_id) VALUES (?,?,?)"
                              " ON CONFLICT DO NOTHING", sorted(tokens))

    def delete_turns(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> None:
        self._executemany("DELETE FROM messages WHERE tenant_id=? AND conversation_id=? AND message_id=?",
                          [(tenant_id, conversation_id, m) for m in message_ids])

    def set_vectors(self, tenant_id: str, conversation_id: str,
                    vectors: Sequence[tuple[str, np.ndarray, np.ndarray | None]]) -> None:
        self._executemany("UPDATE messages SET vector=?, image_vector=? WHERE tenant_id=? AND conversation_id=?"
                          " AND message_id=?", [(blob(v), blob(i), tenant_id, conversation_id, m)
                                                for m, v, i in vectors])

    def set_images(self, tenant_id: str, conversation_id: str, turns: Sequence[tuple[str, Sequence[ImageInfo]]]) -> None:
        """Turns' images as read since they arrived (their words, ``ImageInfo.text``)."""
        self._executemany("UPDATE messages SET images=? WHERE tenant_id=? AND conversation_id=? AND message_id=?",
                          [(images_json(images), tenant_id, conversation_id, m) for m, images in turns])

    def clear_vectors(self, tenant_id: str, conversation_id: str) -> None:
        self._execute("UPDATE messages SET vector=NULL, image_vector=NULL WHERE tenant_id=? AND conversation_id=?",
                      (tenant_id, conversation_id))

    def turns(self, tenant_id: str, conversation_id: str, from_key: SortKey | None = None) -> list[Turn]:
        sql = f"SELECT {TURN_COLUMNS} FROM messages WHERE tenant_id=? AND conversation_id=?"
        args: list = [tenant_id, conversation_id]
        if from_key is not None:
            sql += " AND (sent_ts > ? OR (sent_ts = ? AND message_id >= ?))"
            args += [from_key[0], from_key[0], from_key[1]]
        sql += " ORDER BY sent_ts, message_id"
        return [_turn_from_row(r) for r in self._all(sql, args)]

    def turns_by_id(self, tenant_id: str, conversation_id: str, message_ids: Sequence[str]) -> dict[str, Turn]:
        if not message_ids:
            return {}
        rows = self._all(f"SELECT {TURN_COLUMNS} FROM messages WHERE tenant_id=? AND conversation_id=?"
                         f" AND message_id IN ({_marks(len(message_ids))})",
                         [tenant_id, conversation_id, *message_ids])
        return {r[0]: _turn_from_row(r) for r in rows}

    def turns_by_key(self, tenant_id: str, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Turn]:
        if not keys:
            return {}
        # One primary-key probe per key (an OR of full-key equalities): with the tenant outside the OR, or a
        # row-value IN (VALUES ...), SQLite scanned the tenant's messages (85 to 127 ms at 100k fragments).
        rows = self._all("SELECT message_id, sender_id, sender_name, sent_at, text, images, NULL, NULL, conversation_id"
                         " FROM messages WHERE "
                         + " OR ".join(["(tenant_id=? AND conversation_id=? AND message_id=?)"] * len(keys)),
                         [part for key in keys for part in (tenant_id, *key)])
        return {(r[8], r[0]): _turn_from_row(r[:8]) for r in rows}

    def turns_without_vector(self, tenant_id: str, conversation_id: str) -> list[Turn]:
        rows = self._all(f"SELECT {TURN_COLUMNS} FROM messages WHERE tenant_id=? AND conversation_id=?"
                         " AND vector IS NULL ORDER BY sent_ts, message_id", (tenant_id, conversation_id))
        return [_turn_from_row(r) for r in rows]

    def conversations_of_sender(self, tenant_id: str, sender_id: str) -> list[str]:
        return [r[0] for r in self._all("SELECT DISTINCT conversation_id FROM messages WHERE tenant_id=?"
                                        " AND sender_id=? ORDER BY conversation_id", (tenant_id, sender_id))]

    def message_ids_of_sender(self, tenant_id: str, conversation_id: str, sender_id: str) -> list[str]:
        return [r[0] for r in self._all("SELECT message_id FROM messages WHERE tenant_id=? AND conversation_id=?"
                                        " AND sender_id=?", (tenant_id, conversation_id, sender_id))]

    def forget_sender_tokens(self, tenant_id: str, sender_id: str) -> None:
        self._execute("DELETE FROM sender_tokens WHERE tenant_id=? AND sender_id=?", (tenant_id, sender_id))
        self._execute("DELETE FROM sender_aliases WHERE tenant_id=? AND sender_id=?", (tenant_id, sender_id))

    def senders_named(self, tenant_id: str, tokens: Sequence[str]) -> set[str]:
        """Senders of the tenant whose name contains one of ``tokens``, or whom others call so in at least
        ``MIN_ALIAS_FRAGMENTS`` fragments."""
        if not tokens:
            return set()
        marks = _marks(len(tokens))
        named = {r[0] for r in self._all(f"SELECT sender_id FROM sender_tokens WHERE tenant_id=?"
                                         f" AND token IN ({marks})", [tenant_id, *tokens])}
        named.update(r[0] for r in self._all(
            f"SELECT sender_id FROM sender_aliases WHERE tenant_id=? AND token IN ({marks})"
            " GROUP BY sender_id, token HAVING COUNT(*) >= ?", [tenant_id, *tokens, MIN_ALIAS_FRAGMENTS]))
        return named

    def put_sender_aliases(self, tenant_id: str, conversation_id: str,
                           aliases: dict[str, Sequence[tuple[str, str]]]) -> None:
        self._executemany("DELETE FROM sender_aliases WHERE fragment_id=?", [(f,) for f in sorted(aliases)])
        self._executemany("INSERT INTO sender_aliases (tenant_id, conversation_id, fragment_id, token, sender_id)"
                          " VALUES (?,?,?,?,?)", [(tenant_id, conversation_id, f, token, sender)
                                                  for f in sorted(aliases) for token, sender in aliases[f]])

    # ---- pending marks ------------------------------------------------------------------------------

    def merge_pending(self, tenant_id: str, conversation_id: str, change: dict, merge) -> None:
        """Mark a conversation for indexing, folding ``change`` into a mark already there."""
        row = self._one("SELECT change FROM pending WHERE tenant_id=? AND conversation_id=?",
                        (tenant_id, conversation_id))
        if row is not None:
            change = merge(json.loads(row[0]), change)
        self._execute("INSERT INTO pending (tenant_id, conversation_id, change, since) VALUES (?,?,?,?)"
                      " ON CONFLICT (tenant_id, conversation_id) DO UPDATE SET change=excluded.change",
                      (tenant_id, conversation_id, json.dumps(change), time.time()))

    def pending(self, limit: int | None = None,
                only: Sequence[ConversationKey] | None = None) -> list[tuple[str, str, dict]]:
        """Marked conversations, oldest mark first (``only``: of these conversations); parked ones never."""
        if only is not None:
            found = []
            for tenant_id, conversation_id in only:
                row = self._one("SELECT change FROM pending WHERE tenant_id=? AND conversation_id=?"
                                " AND parked_at IS NULL", (tenant_id, conversation_id))
                if row is not None:
                    found.append((tenant_id, conversation_id, json.loads(row[0])))
            return found
        rows = self._all("SELECT tenant_id, conversation_id, change FROM pending WHERE parked_at IS NULL"
                         " ORDER BY since, tenant_id, conversation_id" + (" LIMIT ?" if limit else ""),
                         (limit,) if limit else ())
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def record_failure(self, tenant_id: str, conversation_id: str, reason: str, park_after: int) -> int:
        """Count a failed indexing attempt; the ``park_after``-th parks the conversation. Returns the count."""
        row = self._one("UPDATE pending SET attempts = attempts + 1, last_error = ?,"
                        " parked_at = CASE WHEN attempts + 1 >= ? THEN ? ELSE NULL END"
                        " WHERE tenant_id = ? AND conversation_id = ? RETURNING attempts",
                        (reason[:2000], park_after, time.time(), tenant_id, conversation_id))
        return row[0] if row else 0

    def parked(self) -> list[Parked]:
        return [Parked(r[0], r[1], r[2], r[3] or "", r[4]) for r in self._all(
            "SELECT tenant_id, conversation_id, attempts, last_error, parked_at FROM pending"
            " WHERE parked_at IS NOT NULL ORDER BY parked_at, tenant_id, conversation_id")]

    def unpark(self, tenant_id: str, conversation_id: str) -> bool:
        row = self._one("UPDATE pending SET parked_at = NULL, attempts = 0 WHERE tenant_id = ? AND conversation_id = ?"
                        " AND parked_at IS NOT NULL RETURNING 1", (tenant_id, conversation_id))
        return row is not None

    def drop_parked(self, tenant_id: str, conversation_id: str) -> bool:
        row = self._one("DELETE FROM pending WHERE tenant_id = ? AND conversation_id = ? AND parked_at IS NOT NULL"
                        " RETURNING 1", (tenant_id, conversation_id))
        return row is not None

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a transaction: what the block wrote is undone if it raises, the rest stays."""
        name = f"sp_{next(_SAVEPOINTS)}"
        self._execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._execute(f"ROLLBACK TO SAVEPOINT {name}")
            self._execute(f"RELEASE SAVEPOINT {name}")
            raise
        self._execute(f"RELEASE SAVEPOINT {name}")

    def clear_pending(self, tenant_id: str, conversation_id: str) -> None:
        self._execute("DELETE FROM pending WHERE tenant_id=? AND conversation_id=?", (tenant_id, conversation_id))

    # ---- fragments ----------------------------------------------------------------------------------

    def fragments(self, tenant_id: str, conversation_id: str) -> list[FragmentRecord]:
        rows = self._all("SELECT fragment_id, message_ids, start_at, end_at FROM fragments WHERE tenant_id=?"
                         " AND conversation_id=? ORDER BY start_ts, start_message_id", (tenant_id, conversation_id))
        return [FragmentRecord(r[0], tenant_id, conversation_id, tuple(json.loads(r[1])),
                               datetime.fromisoformat(r[2]), datetime.fromisoformat(r[3])) for r in rows]

    def fragments_by_id(self, fragment_ids: Sequence[str]) -> dict[str, FragmentRecord]:
        if not fragment_ids:
            return {}
        rows = self._all("SELECT fragment_id, tenant_id, conversation_id, message_ids, start_at, end_at FROM fragments"
                         f" WHERE fragment_id IN ({_marks(len(fragment_ids))})", list(fragment_ids))
        return {r[0]: FragmentRecord(r[0], r[1], r[2], tuple(json.loads(r[3])), datetime.fromisoformat(r[4]),
                                     datetime.fromisoformat(r[5])) for r in rows}

    def all_fragments(self) -> list[tuple[str, str, str, tuple[str, ...]]]:
        """(tenant, conversation, fragment id, message ids) of every fragment, sorted: for comparisons."""
        return sorted((r[0], r[1], r[2], tuple(json.loads(r[3]))) for r in self._all(
            "SELECT tenant_id, conversation_id, fragment_id, message_ids FROM fragments"))

    def put_fragments(self, fragments: Sequence[FragmentRecord]) -> None:
        self._executemany(
            "INSERT INTO fragments (fragment_id, tenant_id, conversation_id, start_ts, start_message_id, message_ids,"
            " start_at, end_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (fragment_id) DO UPDATE SET"
            " start_ts=excluded.start_ts, start_message_id=excluded.start_message_id,"
            " message_ids=excluded.message_ids, start_at=excluded.start_at, end_at=excluded.end_at",
            [(f.fragment_id, f.tenant_id, f.conversation_id, f.start_at.timestamp(), f.message_ids[0],
              json.dumps(list(f.message_ids)), f.start_at.isoformat(), f.end_at.isoformat()) for f in fragments],
        )

    def delete_fragments(self, fragment_ids: Sequence[str]) -> None:
        self._executemany("DELETE FROM fragments WHERE fragment_id=?", [(f,) for f in fragment_ids])
        self._executemany("DELETE FROM sender_aliases WHERE fragment_id=?", [(f,) for f in fragment_ids])

    def erase_conversation(self, tenant_id: str, conversation_id: str, before: float) -> None:
        self.put_tombstones(tenant_id, conversation_id, [(r[0], (before, "erased")) for r in self._all(
            "SELECT message_id FROM messages WHERE tenant_id=? AND conversation_id=?", (tenant_id, conversation_id))])
        for table in CONVERSATION_TABLES:
            self._execute(f"DELETE FROM {table} WHERE tenant_id=? AND conversation_id=?", (tenant_id, conversation_id))
        self._execute(
            "INSERT INTO conversations (tenant_id, conversation_id, erased_before) VALUES (?,?,?)"
            " ON CONFLICT (tenant_id, conversation_id) DO UPDATE SET erased_before=excluded.erased_before",
            (tenant_id, conversation_id, before))

    # ---- bookkeeping --------------------------------------------------------------------------------

    def get_cursor(self, name: str) -> ConversationKey | None:
        row = self._one("SELECT tenant_id, conversation_id FROM cursors WHERE name=?", (name,))
        return (row[0], row[1]) if row else None

    def set_cursor(self, name: str, key: ConversationKey | None) -> None:
        if key is None:
            self._execute("DELETE FROM cursors WHERE name=?", (name,))
        else:
            self._execute("INSERT INTO cursors (name, tenant_id, conversation_id) VALUES (?,?,?) ON CONFLICT (name)"
                          " DO UPDATE SET tenant_id=excluded.tenant_id, conversation_id=excluded.conversation_id",
                          (name, *key))

    def counts(self) -> dict[str, int]:
        return {t: self._one(f"SELECT count(*) FROM {t}")[0]
                for t in ("conversations", "messages", "fragments", "pending", "tombstones")} | {
            "parked": self._one("SELECT count(*) FROM pending WHERE parked_at IS NOT NULL")[0]}
