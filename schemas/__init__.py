"""Versioned wire contracts of Tessera (pydantic v2) and their JSON Schema files."""

from schemas.models import (
    MESSAGE_SCHEMA,
    QUERY_SCHEMA,
    RESULT_SCHEMA,
    ClarifyingQuestion,
    HistoryTurn,
    ImageRef,
    MessageEvent,
    QueryFilters,
    QueryImage,
    QueryJob,
    Result,
    ResultError,
    ResultFragment,
    ResultImage,
)
from schemas.parse import SchemaError, parse_message, parse_query, validate

__all__ = [
    "MESSAGE_SCHEMA",
    "QUERY_SCHEMA",
    "RESULT_SCHEMA",
    "ClarifyingQuestion",
    "HistoryTurn",
    "ImageRef",
    "MessageEvent",
    "QueryFilters",
    "QueryImage",
    "QueryJob",
    "Result",
    "ResultError",
    "ResultFragment",
    "ResultImage",
    "SchemaError",
    "parse_message",
    "parse_query",
    "validate",
]
