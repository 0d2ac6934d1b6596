"""API keys that bind a caller to one tenant, stored hashed where every `tessera serve` instance reads them.

A key reads ``tsk_<key id>_<secret>``: the id finds the row, the secret is checked against its
SHA-256 in constant time. The secret has 256 random bits, so a fast hash is the right one (a slow
password hash protects guessable secrets, not random ones). Keys live in the conversation state's
database: PostgreSQL when ``TESSERA_STATE_URL`` is set (shared by a fleet of API instances),
else ``keys.sqlite`` in the data dir.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "tsk"

_SCHEMA = """CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
)"""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant_id: str
    name: str
    created_at: float
    revoked_at: float | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, state_url: str | None, data_dir: str | Path):
        self._lock = threading.Lock()
        self._postgres = bool(state_url)
        if self._postgres:
            import psycopg

            self._db = psycopg.connect(state_url, autocommit=True)
        else:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(Path(data_dir) / "keys.sqlite", isolation_level=None, check_same_thread=False,
                                       timeout=60)
        self._execute(_SCHEMA)

    def _execute(self, sql: str, args: tuple = (), fetch: str | None = None):
        """Run one statement; several request threads share the connection, one at a time."""
        if self._postgres:
            sql = sql.replace("?", "%s")
        with self._lock:
            cursor = self._db.execute(sql, args)
            if fetch == "one":
                return cursor.fetchone()
            if fetch == "all":
                return cursor.fetchall()
            return cursor.rowcount

    def create(self, tenant_id: str, name: str = "") -> tuple[ApiKey, str]:
        """A new key of ``tenant_id``: its record and the key itself, which is shown once and never stored."""
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        now = time.time()
        self._execute("INSERT INTO api_keys (key_id, tenant_id, name, secret_sha256, created_at) VALUES (?, ?, ?, ?, ?)",
                      (key_id, tenant_id, name, _digest(secret), now))
        return ApiKey(key_id, tenant_id, name, now, None), f"{PREFIX}_{key_id}_{secret}"

    def verify(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` is, or None (malformed, unknown, wrong secret or revoked)."""
        prefix, _, rest = presented.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != PREFIX or not key_id or not secret:
            return None
        row = self._execute("SELECT key_id, tenant_id, name, created_at, revoked_at, secret_sha256 FROM api_keys"
                            " WHERE key_id = ?", (key_id,), "one")
        if row is None or row[4] is not None or not hmac.compare_digest(row[5], _digest(secret)):
            return None
        return ApiKey(*row[:5])

    def list(self, tenant_id: str | None = None) -> list[ApiKey]:
        sql = "SELECT key_id, tenant_id, name, created_at, revoked_at FROM api_keys"
        rows = (self._execute(sql + " WHERE tenant_id = ? ORDER BY created_at", (tenant_id,), "all") if tenant_id
                else self._execute(sql + " ORDER BY tenant_id, created_at", (), "all"))
        return [ApiKey(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        return self._execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                             (time.time(), key_id)) == 1

    def close(self) -> None:
        self._db.close()
