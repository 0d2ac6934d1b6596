"""Real Redis, a real Kafka-protocol broker (Tansu), real Celery workers and the real consumer.

Every test gets a whole stack of its own on free loopback ports (``ops.stack.local``), so processes can be
killed and restarted without touching other tests.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from schemas.routing import MESSAGES, QUERIES
from ops.demo.generate import generate
from ops.runtime.config import Config
from ops.runtime.assemble import open_engine
from ops.bench.soak import index_progress
from ops.stack.local import Stack

#: Seconds before Redis hands an unacknowledged task to another worker, short so that tests see a
#: killed worker's task come back quickly; ``TESSERA_TEST_VISIBILITY_TIMEOUT=300`` runs the fault
#: tests with the production setting.
TEST_VISIBILITY_TIMEOUT = os.environ.get("TESSERA_TEST_VISIBILITY_TIMEOUT", "30")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5, report=None):
    """``report``: a callable whose text joins the timeout's message (what CI shows of a stack's logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{report()}" if report else ""))


def stack_report(stack: Stack, state_url: str | None = None, lines: int = 25) -> str:
    """Index progress, which processes live, and the end of each worker's and the consumer's log."""
    parts = [f"index progress: {index_progress(stack.data_dir, state_url)}",
             f"processes: {stack.status().get('processes')}"]
    for log in sorted((stack.dir / "logs").glob("*.log")):
        if log.name.startswith(("worker", "consumer")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(line[:300] for line in tail))
    return "\n".join(parts)


@pytest.fixture
def stack(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_VISIBILITY_TIMEOUT", TEST_VISIBILITY_TIMEOUT)
    monkeypatch.setenv("TESSERA_SWEEP_S", "2")
    # The reference engines of these tests encode with the torch encoder (the ``embedder`` fixture).
    monkeypatch.setenv("TESSERA_ENCODER", "torch")
    s = Stack(tmp_path / "stack-data")
    s.started = False

    def up(workers: int = 1, concurrency: int = 1, state_url: str | None = None, worker_dirs: bool = False):
        if state_url:
            monkeypatch.setenv("TESSERA_STATE_URL", state_url)
        s.up(workers=workers, concurrency=concurrency, worker_dirs=worker_dirs)
        s.started = True
        for key, value in s.env().items():
            monkeypatch.setenv(key, value)
        return s

    s.start = up
    saved = dict(os.environ)  # Stack.up exports its addresses into this process's environment
    yield s
    if s.started:
        s.down()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def demo_events(tmp_path_factory) -> list[bytes]:
    path = generate(tmp_path_factory.mktemp("demo"))
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def produce(lines: list[bytes], topic: str = MESSAGES) -> None:
    from kafka import KafkaProducer

    from consumer.produce import _key_of, ensure_topics
    from ops.runtime.config import bootstrap

    ensure_topics()
    producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all", linger_ms=5)
    for line in lines:
        producer.send(topic, key=_key_of(line, topic), value=line)
    producer.flush()
    producer.close()


def produce_queries(lines: list[bytes]) -> None:
    produce(lines, QUERIES)


def indexed(data_dir: Path, messages: int, state_url: str | None = None):
    counts = index_progress(data_dir, state_url)
    return counts if counts["messages"] == messages and counts["pending"] == 0 and counts["fragments"] else None


def reference_engine(tmp_path: Path, lines: list[bytes], embedder):
    """The same events through ``tessera ingest``'s path, in this process."""
    from schemas import parse_message

    engine = open_engine(Config(data_dir=tmp_path / "reference", vector_store="sqlite"), embedder=embedder)
    engine.ingest([parse_message(line) for line in lines])
    return engine


def snapshot(engine) -> dict:
    """What the stores hold, comparable across engines: fragments per conversation and unit counts."""
    return {"fragments": engine.state.all_fragments(), "vectors": engine.vectors.count(), "keywords": engine.keywords.count()}


def open_stack_engine(stack: Stack, embedder, state_url: str | None = None):
    return open_engine(Config(data_dir=stack.data_dir, vector_store="sqlite", state_url=state_url),
                       embedder=embedder)


def copies(lines: list[bytes], n: int) -> list[bytes]:
    """``n`` copies of the demo corpus under other conversation ids: more work to interrupt."""
    out = []
    for i in range(n):
        for line in lines:
            record = json.loads(line)
            record["conversation_id"] += f"-copy{i}"
            record["event_id"] += f"-copy{i}"
            out.append(json.dumps(record).encode())
    return out


def committed(topic: str) -> int:
    """Sum over partitions of the consumer group's committed offsets (read without joining the group)."""
    from kafka import KafkaConsumer, TopicPartition

    from ops.runtime.config import bootstrap
    from schemas.routing import group_of

    probe = KafkaConsumer(bootstrap_servers=bootstrap(), group_id=group_of(topic), enable_auto_commit=False)
    try:
        partitions = probe.partitions_for_topic(topic) or set()
        return sum(probe.committed(TopicPartition(topic, p)) or 0 for p in partitions)
    finally:
        probe.close(autocommit=False)


def json_lines(values) -> list[bytes]:
    return [json.dumps(v).encode() for v in values]


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def send_task(stack: Stack, name: str, args: list, task_id: str | None = None) -> None:
    """Queue a task on this stack's Redis, as the consumer would (a Celery client of its own: the
    workers' app reads its broker address once, at import, and a test process sees many stacks)."""
    from celery import Celery

    from workers.app import app

    client = Celery("tessera-test", broker=stack.env()["TESSERA_REDIS_URL"])
    client.conf.update(task_routes=app.conf.task_routes, task_serializer="json")
    try:
        client.send_task(name, args=args, task_id=task_id)
    finally:
        client.close()
