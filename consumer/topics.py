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


#: Where every process looks for Kafka when ``TESSERA_KAFKA_BOOTSTRAP`` is unset: one default for the
#: consumer that reads jobs and the worker that publishes their results.
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def bootstrap() -> str:
    return os.environ.get("TESSERA_KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP)
