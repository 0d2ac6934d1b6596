"""Fuzzing the wire parsers: whatever arrives, the answer is a valid record or a SchemaError."""

import json

from hypothesis import given, settings, strategies as st

from indexer.stores.fts5 import match_expression
from schemas import SchemaError, parse_message, parse_query

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
FIELDS = ["schema", "event_id", "op", "tenant_id", "conversation_id", "message_id", "sender_id", "sent_at", "text",
          "images", "participants", "job_id", "user_id", "query", "history", "filters", "top_k", "reasoning"]
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=12).map(
    lambda d: {**d, "schema": d.get("schema", "tessera.message.v1")})


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | records.map(lambda d: json.dumps(d).encode()))
def test_parsers_only_ever_raise_schema_errors(raw):
    for parse in (parse_message, parse_query):
        try:
            parse(raw)
        except SchemaError as exc:
            assert exc.code and str(exc)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_fts_match_expressions_are_only_quoted_terms(text):
    import sqlite3

    expression = match_expression(text)
    if expression is None:
        return
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE d USING fts5(t, tokenize='porter unicode61')")
    db.execute("INSERT INTO d VALUES ('glacier hike')")
    db.execute("SELECT rowid FROM d WHERE d MATCH ?", (expression,)).fetchall()
    for term in expression.split(" OR "):
        assert term.startswith('"') and term.endswith('"')
