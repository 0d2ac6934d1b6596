import json

import pytest

from schemas import QUERY_SCHEMA, SchemaError, parse_message, parse_query
from schemas.jsonschema import SCHEMA_DIR, render
from tests.conftest import message

GOOD = {
    "schema": "tessera.message.v1", "event_id": "e1", "op": "upsert", "tenant_id": "t1", "conversation_id": "c1",
    "message_id": "m1", "sender_id": "u1", "sent_at": "2026-05-01T10:00:00Z", "text": "hello",
    "images": [{"uri": "file:///tmp/x.png", "caption": "a cat"}],
}


def test_valid_message_round_trips():
    event = parse_message(json.dumps(GOOD))
    assert event.tenant_id == "t1" and event.images[0].caption == "a cat"
    assert event.model_dump(by_alias=True, mode="json")["schema"] == "tessera.message.v1"


@pytest.mark.parametrize("patch, code, field", [
    ({"schema": "tessera.message.v2"}, "unknown_schema", "schema"),
    ({"tenant_id": None}, "invalid_field", "tenant_id"),
    ({"sent_at": "yesterday"}, "invalid_field", "sent_at"),
    ({"sent_at": "2026-05-01T10:00:00"}, "invalid_field", "sent_at"),
    ({"op": "rename"}, "invalid_field", "op"),
    ({"images": [{"uri": "gopher://x"}]}, "invalid_field", "images.0.uri"),
    ({"text": "x" * 40_000}, "invalid_field", "text"),
    ({"text": "bell \x07"}, "invalid_field", "text"),
    ({"conversation_id": "has space"}, "invalid_field", "conversation_id"),
])
def test_invalid_message_names_the_field(patch, code, field):
    record = {**GOOD, **patch}
    with pytest.raises(SchemaError) as info:
        parse_message(json.dumps(record))
    assert info.value.code == code
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_field_and_bad_bytes():
    record = dict(GOOD)
    del record["message_id"]
    with pytest.raises(SchemaError) as info:
        parse_message(json.dumps(record))
    assert (info.value.code, info.value.field) == ("missing_field", "message_id")
    with pytest.raises(SchemaError) as info:
        parse_message(b'{"schema": "\xff"}')
    assert info.value.code == "invalid_utf8"
    with pytest.raises(SchemaError) as info:
        parse_message("[1, 2]")
    assert info.value.code == "invalid_json"


def test_query_job_rules():
    base = {"schema": "tessera.query.v1", "job_id": "j", "tenant_id": "t", "user_id": "u", "query": "glacier"}
    assert parse_query(json.dumps(base)).top_k == 5
    for patch, field in [({"query": "   "}, "query"), ({"top_k": 0}, "top_k"), ({"reasoning": "slow"}, "reasoning")]:
        with pytest.raises(SchemaError) as info:
            parse_query(json.dumps({**base, **patch}))
        assert info.value.field == field
    missing = {k: v for k, v in base.items() if k != "user_id"}
    with pytest.raises(SchemaError) as info:
        parse_query(json.dumps(missing))
    assert info.value.field == "user_id"


def test_checked_in_json_schemas_match_the_models():
    for name, text in render().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{name} missing: run `make schemas`"
        assert path.read_text() == text, f"{name} drifted from the models: run `make schemas`"


def test_fields_from_a_newer_producer_are_ignored_and_named():
    """A rolling deploy: a newer producer adds optional fields; this reader keeps working."""
    from schemas.parse import unknown_fields

    record = message("c1", 1, "ann", "hello").model_dump(mode="json", by_alias=True)
    record["reactions"] = [{"emoji": "+1"}]
    record["images"] = [{"uri": "https://example.com/a.png", "width": 640}]
    event = parse_message(record)
    assert event.text == "hello" and event.images[0].uri == "https://example.com/a.png"
    assert unknown_fields(record, event) == ["reactions"]
    job = {"schema": QUERY_SCHEMA, "job_id": "j", "tenant_id": "t", "user_id": "u", "query": "q", "locale": "de"}
    assert parse_query(job).query == "q"


def test_writers_send_only_what_is_set():
    from schemas import forward

    event = message("c1", 1, "ann", "hello")
    sent = forward(event)
    assert "edited_at" not in sent and "reply_to" not in sent and "participants" not in sent
    assert parse_message(sent) == event
