"""The HTTP API through a real uvicorn on loopback: keys bind the tenant, users see their conversations only."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import message


class Server:
    """``tessera serve``'s app in a real uvicorn on a free loopback port, with two tenants' keys."""

    def __init__(self, engine, keys, limits):
        import uvicorn

        from ops.serve.app import create_app
        from ops.stack.local import free_port

        self.app = create_app(engine, keys, limits)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def call(self, method: str, path: str, body=None, key: str | None = None, user: str | None = "ann",
             headers: dict | None = None, raw: bytes | None = None):
        """(status, headers, decoded JSON body or bytes)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        if user:
            request.add_header("X-Tessera-User", user)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, got, payload = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, got, payload = error.code, error.headers, error.read()
        kind = got.get("Content-Type", "")
        return status, got, json.loads(payload) if "json" in kind else payload

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def dialogue(tenant: str, conversation: str, people: list[str], topic: str) -> list[dict]:
    lines = [f"did you see the {topic} pictures", f"yes the {topic} was amazing", f"let us go back to the {topic}"]
    return [json.loads(message(conversation, i, people[i % len(people)], text, tenant=tenant, participants=people)
                       .model_dump_json(by_alias=True)) for i, text in enumerate(lines)]


@pytest.fixture
def api(tmp_path, embedder):
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from ops.serve.app import Limits
    from ops.serve.keys import KeyStore

    engine = open_engine(Config(data_dir=tmp_path / "data", vector_store="sqlite"), embedder=embedder)
    keys = KeyStore(None, tmp_path / "data")
    server = Server(engine, keys, Limits(rate_per_s=50, burst=100, max_body=64 * 1024))
    server.keys = keys
    server.engine = engine
    server.key_a = keys.create("acme", "tests")[1]
    server.key_b = keys.create("globex", "tests")[1]
    yield server
    server.stop()
    engine.close()
    keys.close()


def test_a_request_without_a_live_key_is_refused_with_a_problem(api):
    status, headers, body = api.call("POST", "/v1/search", {"query": "glacier"})
    assert status == 401 and headers["Content-Type"] == "application/problem+json"
    assert body["code"] == "unauthorized" and body["status"] == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["request_id"] == headers["X-Request-Id"]
    for wrong in ("tsk_nothere_secret", api.key_a[:-2] + "xx", "not-a-key", ""):
        assert api.call("POST", "/v1/search", {"query": "glacier"}, key=wrong)[0] == 401
    key_id = api.key_a.split("_")[1]
    assert api.call("POST", "/v1/search", {"query": "glacier"}, key=api.key_a)[0] == 200
    assert api.keys.revoke(key_id)
    assert api.call("POST", "/v1/search", {"query": "glacier"}, key=api.key_a)[0] == 401


def test_a_key_reaches_its_own_tenant_only(api):
    status, _, body = api.call("POST", "/v1/messages", {"events": dialogue("acme", "trip", ["ann", "bob"], "glacier")},
                               key=api.key_a)
    assert status == 200 and body["accepted"] == 3 and not body["rejected"]
    # The same conversation id and the same user in another tenant, written with that tenant's key.
    events = [{k: v for k, v in e.items() if k != "tenant_id"} for e in dialogue("x", "trip", ["ann", "bob"], "volcano")]
    assert api.call("POST", "/v1/messages", {"events": events}, key=api.key_b)[2]["accepted"] == 3

    _, _, mine = api.call("POST", "/v1/search", {"query": "glacier pictures"}, key=api.key_a)
    assert mine["fragments"] and all("volcano" not in f["snippet"] for f in mine["fragments"])
    _, _, theirs = api.call("POST", "/v1/search", {"query": "glacier pictures"}, key=api.key_b)
    assert all("glacier" not in f["snippet"] for f in theirs["fragments"])

    status, _, body = api.call("POST", "/v1/search", {"query": "volcano", "tenant_id": "globex"}, key=api.key_a)
    assert status == 403 and body["code"] == "tenant_mismatch"
    status, _, body = api.call("POST", "/v1/messages", {"events": dialogue("globex", "c9", ["ann"], "ski")}, key=api.key_a)
    assert status == 422 and body["accepted"] == 0
    assert {r["code"] for r in body["rejected"]} == {"tenant_mismatch"} and body["rejected"][0]["field"] == "tenant_id"

    # Erasing "trip" with tenant acme's key leaves globex's "trip" whole.
    status, _, body = api.call("DELETE", "/v1/conversations/trip", key=api.key_a)
    assert status == 200 and body["deleted_messages"] == 3
    assert not api.call("POST", "/v1/search", {"query": "glacier pictures"}, key=api.key_a)[2]["fragments"]
    _, _, theirs = api.call("POST", "/v1/search", {"query": "volcano pictures"}, key=api.key_b)
    assert any("volcano" in f["snippet"] for f in theirs["fragments"])


def test_a_user_sees_only_the_conversations_they_take_part_in(api):
    api.call("POST", "/v1/messages", {"events": dialogue("acme", "private", ["bob", "cat"], "glacier")}, key=api.key_a)
    api.call("POST", "/v1/messages", {"events": dialogue("acme", "ours", ["ann", "bob"], "harbour")}, key=api.key_a)
    _, _, seen = api.call("POST", "/v1/search", {"query": "glacier pictures", "top_k": 10}, key=api.key_a, user="ann")
    assert {f["conversation_id"] for f in seen["fragments"]} <= {"ours"}
    _, _, bobs = api.call("POST", "/v1/search", {"query": "glacier pictures"}, key=api.key_a, user="bob")
    assert "private" in {f["conversation_id"] for f in bobs["fragments"]}
    status, _, body = api.call("POST", "/v1/search", {"query": "glacier", "user_id": "bob"}, key=api.key_a, user="ann")
    assert status == 403 and body["code"] == "user_mismatch"
    assert api.call("POST", "/v1/search", {"query": "glacier"}, key=api.key_a, user=None)[2]["code"] == "missing_user"
    # The page's turn reader follows the same rule, and says nothing of conversations one may not see.
    status, _, body = api.call("GET", "/v1/conversations/private/turns?ids=m000,m001", key=api.key_a, user="ann")
    assert status == 404 and body["code"] == "not_found"
    status, _, body = api.call("GET", "/v1/conversations/private/turns?ids=m000,m001", key=api.key_a, user="bob")
    assert status == 200 and [t["message_id"] for t in body["turns"]] == ["m000", "m001"]
    assert api.call("GET", "/v1/conversations/private/turns?ids=m000", key=api.key_b, user="bob")[0] == 404
    # Forget me: everything bob sent in the tenant leaves the index.
    status, _, body = api.call("DELETE", "/v1/users/bob", key=api.key_a)
    assert status == 200 and body["deleted_messages"] == 3
    _, _, after = api.call("GET", "/v1/conversations/private/turns?ids=m000,m001,m002", key=api.key_a, user="cat")
    assert [t["message_id"] for t in after["turns"]] == ["m001"]


def test_bad_bodies_get_problems_that_name_the_field(api):
    status, _, body = api.call("POST", "/v1/search", raw=b"{not json", key=api.key_a)
    assert status == 400 and body["code"] == "invalid_json"
    status, _, body = api.call("POST", "/v1/search", {"query": "x", "top_k": 1000}, key=api.key_a)
    assert status == 422 and body["field"] == "top_k" and body["code"] == "invalid_field"
    status, _, body = api.call("POST", "/v1/search", {"query": "x" * 100_000}, key=api.key_a)
    assert status == 413 and body["code"] == "too_large"
    status, _, body = api.call("POST", "/v1/messages", {"events": "nope"}, key=api.key_a)
    assert status == 422 and body["field"] == "events"
    events = dialogue("acme", "c1", ["ann"], "kayak")
    events[1]["sent_at"] = "yesterday"
    status, _, body = api.call("POST", "/v1/messages", {"events": events}, key=api.key_a)
    assert status == 200 and body["accepted"] == 2
    assert body["rejected"] == [{"index": 1, "code": "invalid_field", "field": "sent_at", "detail": body["rejected"][0]["detail"]}]
    # The same batch again changes nothing: events are idempotent over HTTP as over Kafka.
    again = api.call("POST", "/v1/messages", {"events": events}, key=api.key_a)[2]
    assert again["report"]["upserted"] == 0 and again["report"]["unchanged"] == 2
    assert api.call("GET", "/v1/nothing", key=api.key_a)[2]["code"] == "not_found"


def test_a_key_over_its_rate_waits(tmp_path, embedder):
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from ops.serve.app import Limits
    from ops.serve.keys import KeyStore

    engine = open_engine(Config(data_dir=tmp_path / "data", vector_store="sqlite"), embedder=embedder)
    keys = KeyStore(None, tmp_path / "data")
    server = Server(engine, keys, Limits(rate_per_s=0.2, burst=2))
    try:
        key, other = keys.create("acme")[1], keys.create("acme")[1]
        statuses = [server.call("POST", "/v1/search", {"query": "glacier"}, key=key)[0] for _ in range(2)]
        status, headers, body = server.call("POST", "/v1/search", {"query": "glacier"}, key=key)
        assert statuses == [200, 200] and status == 429 and body["code"] == "rate_limited"
        assert 1 <= int(headers["Retry-After"]) <= 5
        assert server.call("POST", "/v1/search", {"query": "glacier"}, key=other)[0] == 200
    finally:
        server.stop()
        engine.close()
        keys.close()


def test_health_readiness_metrics_request_ids_and_the_openapi_document(api):
    from ops.serve.app import warm_in_background

    assert api.call("GET", "/healthz")[0] == 200
    assert api.call("GET", "/readyz")[2]["code"] == "not_ready"
    warm_in_background(api.app, api.engine).join(120)
    assert api.call("GET", "/readyz")[0] == 200
    _, headers, _ = api.call("POST", "/v1/search", {"query": "glacier"}, key=api.key_a, headers={"X-Request-Id": "req-42"})
    assert headers["X-Request-Id"] == "req-42"
    _, _, metrics = api.call("GET", "/metrics")
    assert b'tessera_http_requests_total{route="/v1/search",status="200"}' in metrics
    _, _, spec = api.call("GET", "/openapi.json")
    assert {"/v1/search", "/v1/messages", "/v1/conversations/{conversation_id}", "/v1/users/{user_id}"} <= set(spec["paths"])
    example = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert example["query"]
    status, headers, page = api.call("GET", "/")
    assert status == 200 and b"Tessera" in page and api.call("GET", "/page/app.js")[0] == 200


def test_keys_are_created_listed_and_revoked_from_the_command_line(tmp_path):
    def tessera(*args):
        return subprocess.run([sys.executable, "-m", "ops.cli.main", "--data-dir", str(tmp_path), "keys", *args],
                              capture_output=True, text=True, timeout=120)

    created = tessera("create", "--tenant", "acme", "--name", "support page")
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[-1]
    from ops.serve.keys import KeyStore

    store = KeyStore(None, tmp_path)
    try:
        record = store.verify(key)
        assert record is not None and record.tenant_id == "acme"
        # The secret may hold "_" (URL-safe base64), even first: it is everything after the id.
        assert key.split("_", 2)[2] not in (tmp_path / "keys.sqlite").read_bytes().decode("latin-1")
        listed = tessera("list").stdout
        assert record.key_id in listed and "live" in listed and "support page" in listed
        assert tessera("revoke", record.key_id).returncode == 0
        assert store.verify(key) is None and "revoked" in tessera("list").stdout
        assert tessera("revoke", record.key_id).returncode == 1
    finally:
        store.close()
