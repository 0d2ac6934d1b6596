"""The conversation state: one protocol, an embedded SQLite backend and a PostgreSQL backend."""

from __future__ import annotations

from pathlib import Path

from indexer.state.base import ConversationState

__all__ = ["ConversationState", "open_state"]


def open_state(url: str | None, data_dir: str | Path) -> ConversationState:
    """PostgreSQL at ``url`` (``postgresql://...``), else the SQLite file of the data dir."""
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"TESSERA_STATE_URL: expected postgresql://..., got {url.split(':', 1)[0]!r}")
        from indexer.state.postgres import PostgresState

        return PostgresState(url)
    from indexer.state.sqlite import SqliteState

    return SqliteState(Path(data_dir) / "state.sqlite")
