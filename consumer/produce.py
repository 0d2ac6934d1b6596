"""The platform side: publish message events and query jobs, read results."""

from __future__ import annotations

import json
import sys
import time
from typing import Iterator, TextIO

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import NoError, TopicAlreadyExistsError, for_code

from schemas.routing import dlq, message_key, MESSAGES, QUERIES, RESULTS
from ops.runtime.config import bootstrap

#: Partitions per topic; message partitions bound the parallelism of ingest.
PARTITIONS = {MESSAGES: 4, QUERIES: 2, RESULTS: 2, dlq(MESSAGES): 1, dlq(QUERIES): 1}


def ensure_topics() -> None:
    """Create the topics that are missing. Safe to run from many processes at once (a fleet's first
    start): a topic another process created meanwhile is fine, any other refusal is raised."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap(), client_id="tessera-admin")
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, num_partitions=n, replication_factor=1)
                   for name, n in PARTITIONS.items() if name not in existing]
        if missing:
            answer = admin.create_topics(missing, raise_errors=False)
            for topic in answer.get("topics", []):
                error = for_code(topic.get("error_code", 0))
                if error not in (NoError, TopicAlreadyExistsError):
                    raise error(f"creating topic {topic.get('name')}: {topic.get('error_message')}")
    finally:
        admin.close()


def _key_of(line: bytes, topic: str) -> bytes | None:
    """The partition key of a raw line; a line that is not JSON is still sent (it will be dead-lettered).

    Messages: ``tenant|conversation`` (schemas.routing); queries: the job id.
    """
    try:
        record = json.loads(line)
        if topic == MESSAGES:
            tenant_id, conversation_id = record.get("tenant_id"), record.get("conversation_id")
            if isinstance(tenant_id, str) and isinstance(conversation_id, str):
                return message_key(tenant_id, conversation_id)
            return None
        value = record.get("job_id")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value.encode() if isinstance(value, str) else None


def produce_file(kind: str, path: str) -> int:
    """Send each non-empty line of ``path`` as one record; messages keyed by tenant|conversation, queries by job."""
    topic = MESSAGES if kind == "messages" else QUERIES
    ensure_topics()
    producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all", linger_ms=5)
    sent = 0
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    with stream:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            producer.send(topic, key=_key_of(line, topic), value=line)
            sent += 1
    producer.flush()
    producer.close()
    return sent


def read_results(follow: bool = False, idle_timeout_s: float = 5.0, out: TextIO = sys.stdout) -> int:
    """Print every result on ``tessera.results``; with ``follow``, keep waiting for new ones."""
    ensure_topics()
    count = 0
    try:
        for record in iter_topic(RESULTS, None if follow else idle_timeout_s):
            out.write(record.value.decode() + "\n")
            out.flush()
            count += 1
    except KeyboardInterrupt:
        pass
    return count


def iter_topic(topic: str, timeout_s: float | None) -> Iterator:
    """All records of a topic from the beginning, until ``timeout_s`` passes with nothing new
    (``None``: wait for new records for ever)."""
    idle_ms = float("inf") if timeout_s is None else int(timeout_s * 1000)
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap(), group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=idle_ms)
    try:
        yield from consumer
    finally:
        consumer.close()


def wait_for_broker(timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap(), client_id="tessera-probe")
            admin.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
