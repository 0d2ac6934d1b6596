"""The VLM reasoning worker in the stack: query workers hand candidates to queue ``reason`` while a
VLM worker announces itself, and fall back to the CPU span selector (``auto``) when it is gone."""

from __future__ import annotations

import json
import signal

import redis

from consumer.produce import iter_topic
from schemas.routing import RESULTS
from schemas import QUERY_SCHEMA
from tests.integration.conftest import indexed, produce, produce_queries, wait_until
from workers.runtime import REASONER_KEY

INDEX_TIMEOUT = 240


def job(job_id: str, reasoning: str, conversation_id: str | None = None) -> bytes:
    """A query job; one pinned to a conversation is never answered by a clarifying question."""
    return json.dumps({"schema": QUERY_SCHEMA, "job_id": job_id, "tenant_id": "acme", "user_id": "dev",
                       "query": "chickpea curry recipe", "top_k": 2, "reasoning": reasoning,
                       "filters": {"conversation_id": conversation_id}}).encode()


def results(wanted: set[str]):
    got = {r.key.decode(): json.loads(r.value) for r in iter_topic(RESULTS, 2)}
    return got if wanted <= set(got) else None


def test_reason_worker_in_the_stack(stack, demo_events, tmp_path, monkeypatch):
    from ops.bench import random_models

    monkeypatch.setenv("TESSERA_VLM_MODEL", str(random_models.llava(tmp_path / "vlm")))
    stack.start()
    assert "worker-reason" in stack.load()["pids"]
    r = redis.Redis.from_url(stack.env()["TESSERA_REDIS_URL"])
    wait_until(lambda: r.exists(REASONER_KEY), 60, "the reasoning worker's heartbeat")
    produce(demo_events)
    wait_until(lambda: indexed(stack.data_dir, len(demo_events)), INDEX_TIMEOUT, "demo indexed")

    produce_queries([job("vlm", "vlm"), job("auto", "auto"), job("fast", "fast")])
    got = wait_until(lambda: results({"vlm", "auto", "fast"}), 180, "three results")
    assert got["vlm"]["status"] == "ok" and got["vlm"]["reasoned_by"] == "vlm"
    assert got["auto"]["reasoned_by"] == "vlm"
    assert got["fast"]["reasoned_by"] == "cpu"
    for fragment in got["vlm"]["fragments"]:
        assert set(fragment["message_ids"]) <= set(fragment["context_message_ids"])
    assert got["vlm"]["timings_ms"]["reasoning"] > 0

    # Without a live reasoning worker: vlm jobs are refused with a reason, auto jobs use the CPU.
    stack.kill("worker-reason", signal.SIGTERM)
    wait_until(lambda: not r.exists(REASONER_KEY), 60, "the heartbeat gone")
    produce_queries([job("vlm-down", "vlm"), job("auto-down", "auto")])
    got = wait_until(lambda: results({"vlm-down", "auto-down"}), 120, "two more results")
    assert got["vlm-down"]["status"] == "error" and got["vlm-down"]["error"]["code"] == "reasoning_unavailable"
    assert got["auto-down"]["status"] == "ok" and got["auto-down"]["reasoned_by"] == "cpu"


def test_a_vlm_that_does_not_load_is_not_announced(stack, demo_events, tmp_path, monkeypatch):
    """Before, the heartbeat advertised any model directory with a config.json: ``auto`` jobs were
    handed to a worker that could not answer them, and its /healthz said OK."""
    broken = tmp_path / "broken-vlm"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava"}')
    monkeypatch.setenv("TESSERA_VLM_MODEL", str(broken))
    stack.start()
    wait_until(lambda: stack.status()["health"].get("worker-reason") == "unhealthy", 120,
               "the reasoning worker reports its failed model")
    r = redis.Redis.from_url(stack.env()["TESSERA_REDIS_URL"])
    assert not r.exists(REASONER_KEY)
    produce(demo_events[:40])
    wait_until(lambda: indexed(stack.data_dir, 40), INDEX_TIMEOUT, "indexed")
    # The first 40 events hold no curry: over unrelated turns a clarifying question is as right an answer as
    # any, and this test is about who reasons, so the job names a conversation.
    produce_queries([job("auto-broken", "auto", "acme-team-platform")])
    got = wait_until(lambda: results({"auto-broken"}), 120, "the result")
    assert got["auto-broken"]["status"] == "ok" and got["auto-broken"]["reasoned_by"] == "cpu"
