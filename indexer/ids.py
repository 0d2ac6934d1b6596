"""Deterministic identifiers: replaying the same events must address the same records."""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("5b0c3f5e-6a8f-4d55-9a53-7e1f4c9b2a10")


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(parts)))


def fragment_id(tenant_id: str, conversation_id: str, first_message_id: str) -> str:
    """A fragment is named by where it starts, so growing it keeps its id."""
    return _id("fragment", tenant_id, conversation_id, first_message_id)


def turn_unit_id(tenant_id: str, conversation_id: str, message_id: str, kind: str) -> str:
    return _id(kind, tenant_id, conversation_id, message_id)
