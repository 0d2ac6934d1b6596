"""Topic names and the Kafka client settings every Tessera process shares."""

from __future__ import annotations

import os

MESSAGES = "tessera.messages"
QUERIES = "tessera.queries"
RESULTS = "tessera.results"
GROUP = "tessera-consumer"


def group_of(topic: str) -> str:
    """The consumer group of a topic: ``tessera-consumer.tessera.messages`` ..."""
    return f"{GROUP}.{topic}"


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


def bootstrap() -> str:
    return os.environ.get("TESSERA_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
