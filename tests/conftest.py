"""Shared fixtures: the real MiniLM encoder (loaded once) and engines on temporary data dirs."""

from __future__ import annotations

import itertools
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from schemas import MESSAGE_SCHEMA, QUERY_SCHEMA, MessageEvent, QueryJob  # noqa: E402

T0 = datetime(2026, 5, 1, 10, 0, tzinfo=timezone.utc)


def sparse_index_types(root) -> set[tuple[str, str, str]]:
    """(sparse vector, index type, weight type) of every immutable segment of the edge shards under ``root``, as
    their ``segment.json`` records them; the appendable segment keeps its index in memory whatever the
    configuration."""
    return {(name, params["index"]["index_type"], params["index"].get("datatype", "float32"))
            for path in Path(root).rglob("segments/*/segment.json")
            for name, params in json.loads(path.read_text())["config"].get("sparse_vector_data", {}).items()
            if params["index"]["index_type"] != "MutableRam"}


@pytest.fixture(scope="session")
def embedder():
    from indexer.encoders.text import SentenceTransformerEmbedder

    e = SentenceTransformerEmbedder()
    e.warm_up()
    return e


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session; each user of it gets databases of its own."""
    from ops.stack.postgres import LocalPostgres

    server = LocalPostgres().start()
    yield server
    server.stop()


_DATABASES = itertools.count()


@pytest.fixture
def new_state_url(request):
    """A function giving the URL of a fresh, empty state: a new PostgreSQL database, or None (SQLite)."""

    def make(backend: str) -> str | None:
        if backend == "sqlite":
            return None
        return request.getfixturevalue("postgres_server").create_database(f"state{next(_DATABASES)}")

    return make


#: (vector store, state backend) pairs every engine test runs on.
ENGINE_BACKENDS = [("edge", "sqlite"), ("sqlite", "sqlite"), ("sqlite", "postgres")]


@pytest.fixture(params=ENGINE_BACKENDS, ids=["-".join(p) for p in ENGINE_BACKENDS])
def make_engine(request, tmp_path, embedder, new_state_url):
    """Engines on both embedded vector stores and both state backends."""
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    vector_store, state = request.param
    engines = []

    def make(name: str = "data", state_url: str | None = "new"):
        if state_url == "new":
            state_url = new_state_url(state)
        engine = open_engine(Config(data_dir=tmp_path / name, vector_store=vector_store, state_url=state_url),
                             embedder=embedder)
        engine.state_url = state_url
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def message(conversation_id: str, n: int, sender: str, text: str, *, tenant: str = "t1",
            participants: list[str] | None = None, minutes: float | None = None, op: str = "upsert",
            images: list[dict] | None = None, event_suffix: str = "") -> MessageEvent:
    record = {
        "schema": MESSAGE_SCHEMA, "event_id": f"{conversation_id}-{n}{event_suffix}", "op": op,
        "tenant_id": tenant, "conversation_id": conversation_id, "message_id": f"m{n:03d}",
        "sender_id": sender, "sender_name": sender.capitalize(),
        "sent_at": (T0 + timedelta(minutes=n if minutes is None else minutes)).isoformat(),
        "text": text, "images": images or [],
    }
    if participants is not None:
        record["participants"] = participants
    return MessageEvent.model_validate(record)


def query(text: str, *, tenant: str = "t1", user: str = "u1", top_k: int = 5, **extra) -> QueryJob:
    return QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": "j1", "tenant_id": tenant, "user_id": user,
                                    "query": text, "top_k": top_k, **extra})


DIALOGUE = [
    ("ann", "We finally reached the glacier at the end of the hiking trip."),
    ("bob", "Amazing, was the ice really as blue as in the pictures?"),
    ("ann", "Even bluer, and the hike up the glacier took four hours."),
    ("bob", "I want to do that glacier hike next summer."),
    ("ann", "By the way, my sourdough bread finally rose this weekend."),
    ("bob", "Great, how long did you feed the sourdough starter?"),
    ("ann", "Ten days of flour and water before the bread worked."),
    ("bob", "Send me the bread recipe please."),
    ("ann", "Also my laptop battery swelled up during the presentation."),
    ("bob", "Take the laptop to the repair shop on Elm Street."),
    ("ann", "The repair shop replaced the laptop battery in a day."),
]


def dialogue(conversation_id: str = "c1", **kw) -> list[MessageEvent]:
    return [message(conversation_id, i + 1, s, t, **kw) for i, (s, t) in enumerate(DIALOGUE)]


def pytest_terminal_summary(terminalreporter):
    """How much the order-independence property covered in this run (reported in closing notes)."""
    import sys

    module = sys.modules.get("tests.test_isolation")
    covered = getattr(module, "COVERED", None)
    if covered and covered["histories"]:
        terminalreporter.write_line(f"order-independence property: {covered['histories']} histories, "
                                    f"{covered['events']} events (each delivered shuffled, half of them twice, "
                                    f"over 3 engines)")
