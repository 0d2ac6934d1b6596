"""Names and keys of the contract, imported by the side that writes and the side that reads.

Kafka topics and their consumer groups and dead-letter topics; Celery queues and task names.

A message event is keyed by its tenant and conversation together (``tenant|conversation``): one
conversation stays on one partition, and a tombstone (null value) under that key erases exactly one
conversation of one tenant. ``|`` cannot occur in an identifier, so the key splits unambiguously.
"""

from __future__ import annotations

import re

from schemas.models import ID_PATTERN
from schemas.parse import SchemaError

KEY_SEPARATOR = "|"
_ID = re.compile(ID_PATTERN)


def message_key(tenant_id: str, conversation_id: str) -> bytes:
    return f"{tenant_id}{KEY_SEPARATOR}{conversation_id}".encode()


def parse_message_key(key: bytes | None) -> tuple[str, str]:
    """(tenant, conversation) of a message key; a key that does not name both is refused, never guessed."""
    text = key.decode("utf-8", "replace") if key else ""
    tenant_id, sep, conversation_id = text.partition(KEY_SEPARATOR)
    if not sep or not _ID.match(tenant_id) or not _ID.match(conversation_id):
        raise SchemaError("tombstone_without_tenant",
                          "a tombstone's key must be 'tenant_id|conversation_id'; nothing was deleted", "key")
    return tenant_id, conversation_id


MESSAGES = "tessera.messages"
QUERIES = "tessera.queries"
RESULTS = "tessera.results"
GROUP = "tessera-consumer"


def group_of(topic: str) -> str:
    """The consumer group of a topic: ``tessera-consumer.tessera.messages`` ..."""
    return f"{GROUP}.{topic}"


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


#: Celery queues: ingest (apply events), embed (index what they changed), query (answer jobs),
#: reason (the GPU VLM stage).
QUEUES = ("ingest", "embed", "query", "reason")
#: Task name -> its queue.
TASKS = {"tessera.ingest": "ingest", "tessera.delete_conversation": "ingest", "tessera.embed": "embed",
         "tessera.query": "query", "tessera.reason": "reason"}
