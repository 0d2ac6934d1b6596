"""The running stack exports its metrics and the real Prometheus scrapes them."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from ops.runtime.telemetry import QUERY_STAGES
from schemas import QUERY_SCHEMA
from tests.integration.conftest import indexed, produce, produce_queries, wait_until


def prometheus_value(port: int, expr: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.loads(response.read())
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def distinct_texts(lines) -> int:
    from indexer.ingest.units import turn_of_event
    from indexer.text import render_turn
    from schemas import parse_message

    return len({render_turn(turn_of_event(parse_message(line))) for line in lines})


def test_prometheus_scrapes_the_stack(stack, demo_events):
    stack.start()
    info = stack.load()
    assert "prometheus_port" in info, "tessera stack up starts Prometheus"
    port = info["prometheus_port"]
    produce(demo_events[:40] + [b"{broken"])
    wait_until(lambda: indexed(stack.data_dir, 40), 240, "indexing")
    produce_queries([json.dumps({"schema": QUERY_SCHEMA, "job_id": "m1", "tenant_id": "acme", "user_id": "anna",
                                 "query": "glacier"}).encode()])

    expectations = {
        'sum(tessera_events_consumed_total{topic="tessera.messages"})': lambda v: v == 41,
        'sum(tessera_events_dead_lettered_total{topic="tessera.messages"})': lambda v: v == 1,
        'sum(tessera_events_rejected_total{reason="invalid_json"})': lambda v: v == 1,
        'sum(tessera_tasks_total{task="tessera.ingest", outcome="success"})': lambda v: v >= 1,
        'sum(tessera_messages_total{op="upsert"})': lambda v: v == 40,
        'sum(tessera_fragments_total{op="written"})': lambda v: v >= 1,
        # The encoder sees each distinct text of a batch once; repeats across batches are encoded again.
        # Two more: the worker's warm-up text and the query.
        'sum(tessera_embedding_batch_size_texts_sum)': lambda v: distinct_texts(demo_events[:40]) <= v <= 40 + 2,
        'sum(tessera_store_operation_duration_seconds_count{backend="sqlite-vectors", operation="upsert"})':
            lambda v: v >= 1,
        'sum(tessera_query_results_total{status="ok"})': lambda v: v == 1,
        'max(tessera_celery_queue_depth_tasks{queue="ingest"})': lambda v: v >= 0,
        'sum(tessera_consumer_lag_records{topic="tessera.messages"})': lambda v: v == 0,
        'min(up{service="worker"})': lambda v: v == 1,
        'min(up{service="consumer"})': lambda v: v == 1,
    }
    for stage in QUERY_STAGES:
        expectations[f'sum(tessera_query_stage_duration_seconds_count{{stage="{stage}"}})'] = lambda v: v == 1

    missing: dict = {}

    def all_seen():
        values = {expr: prometheus_value(port, expr) for expr in expectations}
        missing.clear()
        missing.update({e: v for e, v in values.items() if v is None or not expectations[e](v)})
        return values if not missing else None

    try:
        wait_until(all_seen, 90, "the expected series in Prometheus")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; not as expected: {missing}") from None
    consumer_port = info["metrics_ports"]["consumer"]
    with urllib.request.urlopen(f"http://127.0.0.1:{consumer_port}/healthz", timeout=5) as response:
        assert response.status == 200 and response.read() == b"ok\n"
