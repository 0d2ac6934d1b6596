"""Decoding of wire records with errors that name the offending field."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.models import MESSAGE_SCHEMA, QUERY_SCHEMA, REASON_SCHEMA, MessageEvent, QueryJob, ReasonRequest

MAX_RECORD_BYTES = 4_000_000

_MODELS = {MESSAGE_SCHEMA: MessageEvent, QUERY_SCHEMA: QueryJob, REASON_SCHEMA: ReasonRequest}


class SchemaError(ValueError):
    """A record that does not satisfy its contract; ``code`` is stable and used as a metric label."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.detail = message

    def __reduce__(self):
        """Pickles with its code and field (Celery hands a task's error to ``on_failure`` that way)."""
        return SchemaError, (self.code, self.detail, self.field)


def loads(raw: bytes | str) -> dict[str, Any]:
    if isinstance(raw, bytes):
        if len(raw) > MAX_RECORD_BYTES:
            raise SchemaError("too_large", f"record is {len(raw)} bytes, limit {MAX_RECORD_BYTES}")
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SchemaError("invalid_utf8", f"not UTF-8 at byte {exc.start}") from None
    elif len(raw) > MAX_RECORD_BYTES:
        raise SchemaError("too_large", f"record is {len(raw)} characters, limit {MAX_RECORD_BYTES}")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SchemaError("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(data, dict):
        raise SchemaError("invalid_json", "record is not a JSON object")
    return data


def validate(data: dict[str, Any], expected: str | None = None) -> MessageEvent | QueryJob | ReasonRequest:
    """Validate a decoded record against the model its ``schema`` names."""
    name = data.get("schema")
    if name is None:
        raise SchemaError("missing_field", "field required", "schema")
    model = _MODELS.get(name) if isinstance(name, str) else None
    if model is None or (expected is not None and name != expected):
        want = expected or " or ".join(_MODELS)
        raise SchemaError("unknown_schema", f"unknown schema {name!r}, expected {want}", "schema")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        code = "missing_field" if first["type"] == "missing" else "invalid_field"
        raise SchemaError(code, first["msg"], field) from None


def parse_message(raw: bytes | str | dict[str, Any]) -> MessageEvent:
    data = raw if isinstance(raw, dict) else loads(raw)
    return validate(data, MESSAGE_SCHEMA)  # type: ignore[return-value]


def parse_query(raw: bytes | str | dict[str, Any]) -> QueryJob:
    data = raw if isinstance(raw, dict) else loads(raw)
    return validate(data, QUERY_SCHEMA)  # type: ignore[return-value]


def parse_reason(raw: bytes | str | dict[str, Any]) -> ReasonRequest:
    data = raw if isinstance(raw, dict) else loads(raw)
    return validate(data, REASON_SCHEMA)  # type: ignore[return-value]


def unknown_fields(data: dict[str, Any], record: BaseModel) -> list[str]:
    """Top-level fields of ``data`` the model of ``record`` does not know: counted, then ignored."""
    known = {f.alias or name for name, f in type(record).model_fields.items()} | set(type(record).model_fields)
    return sorted(k for k in data if k not in known)


def forward(record: BaseModel) -> dict[str, Any]:
    """A record as a writer sends it: only the fields that are set, so older readers see no nulls."""
    return record.model_dump(mode="json", by_alias=True, exclude_none=True)
