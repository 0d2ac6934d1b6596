"""The distributed path end to end: broker -> consumer -> Celery workers -> stores -> results."""

from __future__ import annotations

import json
import multiprocessing
import random
import re
import signal
import time

from consumer.produce import iter_topic
from schemas.routing import MESSAGES, RESULTS, dlq
from ops.demo.topics import EXAMPLE_QUERIES
from schemas import QUERY_SCHEMA, QueryJob
from tests.integration.conftest import (
    committed, copies, index_progress, indexed, open_stack_engine, produce, produce_queries, reference_engine,
    send_task, snapshot, stack_report, wait_until,
)

INDEX_TIMEOUT = 240


def answers(engine) -> list:
    out = []
    for i, (tenant, user, text) in enumerate(EXAMPLE_QUERIES):
        job = QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": f"q{i}", "tenant_id": tenant,
                                       "user_id": user, "query": text, "top_k": 3})
        out.append([(f.fragment_id, f.message_ids) for f in engine.query(job).fragments])
    return out


def test_kafka_and_concurrent_celery_workers_index_what_one_process_indexes(stack, demo_events, embedder, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("TESSERA_CONSUMER_MAX_POLL", "8")  # many small tasks, racing on the same conversations
    stack.start(workers=2, concurrency=2)
    produce(demo_events)
    wait_until(lambda: indexed(stack.data_dir, len(demo_events)), INDEX_TIMEOUT, "all demo messages indexed")
    reference = reference_engine(tmp_path, demo_events, embedder)
    distributed = open_stack_engine(stack, embedder)
    try:
        assert snapshot(distributed) == snapshot(reference)
        assert answers(distributed) == answers(reference)
    finally:
        distributed.close()
        reference.close()


def test_poison_records_go_to_the_dlq_and_the_rest_is_indexed(stack, demo_events):
    stack.start()
    good = demo_events[:30]
    bad_schema = json.loads(good[5])
    bad_schema["schema"] = "tessera.message.v9"
    poison = [b"{not json", json.dumps(bad_schema).encode(), b"\xff\xfe"]
    produce(good[:10] + poison + good[10:])
    wait_until(lambda: indexed(stack.data_dir, 30), INDEX_TIMEOUT, "the valid messages indexed")
    dead = wait_until(lambda: [r for r in iter_topic(dlq(MESSAGES), 3)] or None, 30, "dead letters")
    assert len(dead) == 3
    by_value = {r.value: dict((k, v.decode()) for k, v in r.headers) for r in dead}
    assert by_value[b"{not json"]["tessera.code"] == "invalid_json"
    assert by_value[json.dumps(bad_schema).encode()]["tessera.code"] == "unknown_schema"
    assert "tessera.message.v9" in by_value[json.dumps(bad_schema).encode()]["tessera.reason"]
    assert by_value[b"\xff\xfe"]["tessera.code"] == "invalid_utf8"
    for headers in by_value.values():
        assert headers["tessera.source.topic"] == MESSAGES
        assert int(headers["tessera.source.offset"]) >= 0


def test_query_jobs_come_back_on_the_results_topic(stack, demo_events):
    stack.start()
    produce(demo_events)
    wait_until(lambda: indexed(stack.data_dir, len(demo_events)), INDEX_TIMEOUT, "demo indexed")
    jobs = [{"schema": QUERY_SCHEMA, "job_id": "job-ok", "tenant_id": "acme", "user_id": "dev",
             "query": "chickpea curry recipe", "top_k": 2},
            {"schema": QUERY_SCHEMA, "job_id": "job-bad", "user_id": "dev", "query": "curry"}]
    produce_queries([json.dumps(j).encode() for j in jobs])

    def results():
        got = {r.key.decode(): json.loads(r.value) for r in iter_topic(RESULTS, 2)}
        return got if {"job-ok", "job-bad"} <= set(got) else None

    got = wait_until(results, 120, "both results")
    assert got["job-ok"]["status"] == "ok"
    assert got["job-ok"]["fragments"][0]["conversation_id"] == "acme-dm-chloe-dev"
    assert got["job-bad"]["status"] == "error" and got["job-bad"]["error"]["code"] == "missing_field"

    # A tombstone keyed by tenant|conversation erases that conversation of that tenant only; one
    # keyed by the conversation alone is dead-lettered, never fanned out over the tenants.
    from kafka import KafkaProducer

    from ops.runtime.config import bootstrap

    producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all")
    producer.send(MESSAGES, key=b"acme-dm-chloe-dev", value=None).get(timeout=30)
    producer.send(MESSAGES, key=b"acme|acme-dm-chloe-dev", value=None).get(timeout=30)
    producer.close()

    def refused_tombstone():
        return [dict((k, v.decode()) for k, v in r.headers) for r in iter_topic(dlq(MESSAGES), 2)
                if r.key == b"acme-dm-chloe-dev"]

    refused = wait_until(refused_tombstone, 60, "the tenant-less tombstone dead-lettered")
    assert refused[0]["tessera.code"] == "tombstone_without_tenant" and refused[0]["tessera.field"] == "key"
    wait_until(lambda: index_progress(stack.data_dir)["messages"] == len(demo_events) - conversation_size(
        demo_events, "acme-dm-chloe-dev"), 120, "the conversation deleted")


def conversation_size(lines, conversation_id):
    return sum(1 for line in lines if json.loads(line)["conversation_id"] == conversation_id)


def test_a_task_that_keeps_killing_workers_is_dead_lettered(stack):
    """Deliveries are counted in Redis: one more than the limit and the task is parked, not run."""
    import redis

    from ops.runtime.config import Config
    from workers.runtime import DEAD_LETTER_KEY

    MAX_DELIVERIES = Config.from_env().max_deliveries

    stack.start()
    client = redis.Redis.from_url(stack.env()["TESSERA_REDIS_URL"])
    task_id = "ingest:poison"
    # As if MAX_DELIVERIES earlier deliveries had each died with their worker.
    client.set(f"tessera:tasks:attempts:{task_id}", MAX_DELIVERIES)
    event = {"schema": "tessera.message.v1", "event_id": "p1", "tenant_id": "t", "conversation_id": "c",
             "message_id": "m1", "sender_id": "s", "sent_at": "2026-05-01T10:00:00Z", "text": "never indexed"}
    send_task(stack, "tessera.ingest", [[event]], task_id=task_id)
    dead = wait_until(lambda: client.lrange(DEAD_LETTER_KEY, 0, -1), 120, "the dead-lettered task")
    record = json.loads(dead[0])
    assert record["task_id"] == task_id and record["attempts"] == MAX_DELIVERIES
    assert record["task"] == "tessera.ingest" and record["args"][0][0]["event_id"] == "p1"
    assert index_progress(stack.data_dir)["messages"] == 0
    # A healthy task runs and leaves no delivery count behind.
    send_task(stack, "tessera.ingest", [[{**event, "event_id": "p2"}]], task_id="ingest:healthy")
    wait_until(lambda: index_progress(stack.data_dir)["messages"] == 1, 120, "the healthy task")
    wait_until(lambda: not client.exists("tessera:tasks:attempts:ingest:healthy"), 30, "the count cleared")
    # A task that fails for good is dead-lettered with its input, not dropped.
    send_task(stack, "tessera.ingest", [[{"schema": "tessera.message.v1", "event_id": "broken"}]],
                  task_id="ingest:broken")
    dead = wait_until(lambda: client.lrange(DEAD_LETTER_KEY, 1, -1), 120, "the failed task dead-lettered")
    record = json.loads(dead[0])
    assert record["task_id"] == "ingest:broken" and "tenant_id" in record["reason"]
    assert record["args"][0][0]["event_id"] == "broken"


def test_sigkill_of_a_worker_mid_ingest_loses_and_doubles_nothing(stack, demo_events, embedder, tmp_path):
    stack.start()
    events = copies(demo_events, 4)
    produce(events)
    at_kill = wait_until(lambda: (lambda c: c if c["messages"] and c["pending"] else None)(index_progress(stack.data_dir)),
                         120, "indexing under way")
    stack.kill("worker-0", signal.SIGKILL)
    assert indexed(stack.data_dir, len(events)) is None, f"the kill came too late to test anything: {at_kill}"
    stack.start_worker(0)
    wait_until(lambda: indexed(stack.data_dir, len(events)), INDEX_TIMEOUT, "recovery")
    reference = reference_engine(tmp_path, events, embedder)
    distributed = open_stack_engine(stack, embedder)
    try:
        assert snapshot(distributed) == snapshot(reference)
        fragment_ids = [f[2] for f in snapshot(distributed)["fragments"]]
        assert len(fragment_ids) == len(set(fragment_ids))
    finally:
        distributed.close()
        reference.close()


def test_consumer_restarted_mid_stream_resumes_from_its_commits(stack, demo_events):
    stack.start()
    first, second = demo_events[:120], demo_events[120:]
    produce(first)
    wait_until(lambda: indexed(stack.data_dir, len(first)), INDEX_TIMEOUT, "first half")
    stack.kill("consumer", signal.SIGTERM)
    assert committed(MESSAGES) == len(first), "a graceful stop commits everything it handed on"
    produce(second)
    stack.start_consumer()
    wait_until(lambda: indexed(stack.data_dir, len(demo_events)), INDEX_TIMEOUT, "second half after restart")
    wait_until(lambda: committed(MESSAGES) == len(demo_events), 30, "offsets committed to the end")


def _ingest_in_process(data_dir, lines, seed):
    from indexer.encoders.text import SentenceTransformerEmbedder
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine
    from schemas import parse_message

    engine = open_engine(Config(data_dir=data_dir, vector_store="sqlite"), embedder=SentenceTransformerEmbedder())
    events = [parse_message(line) for line in lines]
    rng = random.Random(seed)
    for start in range(0, len(events), 7):
        batch = events[start:start + 7]
        rng.shuffle(batch)
        engine.ingest(batch)
    engine.close()


def test_concurrent_writers_on_one_data_dir_equal_one_writer(demo_events, embedder, tmp_path):
    """Three processes ingest interleaved slices of the same conversations at once."""
    data_dir = tmp_path / "shared"
    slices = [demo_events[i::3] for i in range(3)]
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_ingest_in_process, args=(data_dir, s, i)) for i, s in enumerate(slices)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
        assert w.exitcode == 0
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    shared = open_engine(Config(data_dir=data_dir, vector_store="sqlite"), embedder=embedder)
    reference = reference_engine(tmp_path, demo_events, embedder)
    try:
        assert snapshot(shared) == snapshot(reference)
    finally:
        shared.close()
        reference.close()


def test_deep_queues_pause_the_consumer_which_stays_in_its_group(stack, demo_events, monkeypatch):
    import redis

    monkeypatch.setenv("TESSERA_CONSUMER_MAX_POLL", "4")
    monkeypatch.setenv("TESSERA_PAUSE_ABOVE", "6")
    monkeypatch.setenv("TESSERA_RESUME_BELOW", "2")
    stack.start(workers=0)
    client = redis.Redis.from_url(stack.env()["TESSERA_REDIS_URL"])
    produce(demo_events)
    wait_until(lambda: "paused" in (stack.dir / "logs" / "consumer.log").read_text(), 120, "the consumer to pause")
    time.sleep(5)
    queued = client.llen("ingest")
    # Paused partitions fetch nothing more: at most one poll's tasks past the threshold.
    assert 6 < queued <= 6 + 4 * 2, queued
    assert committed(MESSAGES) < len(demo_events)
    stack.start_worker(0)
    wait_until(lambda: indexed(stack.data_dir, len(demo_events)), INDEX_TIMEOUT, "indexing after resume")
    assert "resumed" in (stack.dir / "logs" / "consumer.log").read_text()
    wait_until(lambda: committed(MESSAGES) == len(demo_events), 60, "all offsets committed")


def test_a_pending_mark_that_no_task_covers_is_swept(stack, embedder):
    """A worker died after saving the state and before queuing ``embed``: the sweep finds the mark."""
    from tests.conftest import dialogue

    stack.start()
    engine = open_stack_engine(stack, embedder)
    try:
        engine.apply(dialogue("orphan"))
    finally:
        engine.close()
    assert index_progress(stack.data_dir)["pending"] == 1
    wait_until(lambda: indexed(stack.data_dir, len(dialogue("orphan"))), 120, "the orphaned mark indexed")


def test_a_backlog_larger_than_one_task_takes_is_indexed_a_slice_per_task(stack, monkeypatch, demo_events, embedder,
                                                                          tmp_path):
    """Each embed task encodes at most ``TESSERA_EMBED_MAX_TEXTS`` turns and queues the next while work is
    left: the tasks alone index the whole backlog (the sweep, which would also find the marks, waits ten
    minutes here), long conversations a slice at a time, and the index equals the one-process index."""
    monkeypatch.setenv("TESSERA_SWEEP_S", "600")
    monkeypatch.setenv("TESSERA_EMBED_MAX_TEXTS", "16")
    stack.start()
    produce(demo_events)
    wait_until(lambda: indexed(stack.data_dir, len(demo_events)), INDEX_TIMEOUT, "the backlog indexed",
               report=lambda: stack_report(stack))
    log = (stack.dir / "logs" / "worker-0.log").read_text()
    assert re.search(r"'deferred': [1-9]", log), "tasks left work for the next, which they queued"
    reference = reference_engine(tmp_path, demo_events, embedder)
    distributed = open_stack_engine(stack, embedder)
    try:
        assert snapshot(distributed) == snapshot(reference)
    finally:
        distributed.close()
        reference.close()


def test_every_query_job_gets_exactly_one_result(stack):
    """Answers with an inline 2 MB image, a job that keeps killing its worker, a job that fails on its
    input: each comes back once on the results topic (before, the first two were dead-lettered
    without an answer and the third was never answered)."""
    import redis

    from ops.runtime.config import Config

    MAX_DELIVERIES = Config.from_env().max_deliveries

    stack.start()
    client = redis.Redis.from_url(stack.env()["TESSERA_REDIS_URL"])
    photo = "data:image/png;base64," + "iVBORw0KGgo" * 180_000
    event = {"schema": "tessera.message.v1", "event_id": "e1", "tenant_id": "t", "conversation_id": "trip",
             "message_id": "m1", "sender_id": "ana", "participants": ["ana", "ben"],
             "sent_at": "2026-05-01T10:00:00Z", "text": "the panorama from the summit, finally",
             "images": [{"uri": photo, "caption": "summit panorama"}]}
    send_task(stack, "tessera.ingest", [[event]])
    wait_until(lambda: index_progress(stack.data_dir)["fragments"] >= 1, INDEX_TIMEOUT, "the photo indexed")

    def job(job_id: str) -> dict:
        return {"schema": QUERY_SCHEMA, "job_id": job_id, "tenant_id": "t", "user_id": "ben",
                "query": "summit panorama photo", "top_k": 3}

    produce_queries([json.dumps(job("photo")).encode()])
    client.set("tessera:tasks:attempts:query:lost", MAX_DELIVERIES)
    send_task(stack, "tessera.query", [job("lost")], task_id="query:lost")
    send_task(stack, "tessera.query", [{"schema": QUERY_SCHEMA, "job_id": "broken", "user_id": "ben"}])

    def results():
        got = [(r.key.decode(), json.loads(r.value)) for r in iter_topic(RESULTS, 2)]
        return got if {"photo", "lost", "broken"} <= {k for k, _ in got} else None

    got = wait_until(results, 180, "three results")
    time.sleep(3)
    got = results()
    assert sorted(k for k, _ in got) == ["broken", "lost", "photo"], "exactly one result per job"
    by_job = dict(got)
    photo_result = by_job["photo"]
    assert photo_result["status"] == "ok" and not photo_result["truncated"]
    image = photo_result["fragments"][0]["images"][0]
    assert image == {"message_id": "m1", "uri": "tessera://messages/m1/images/0", "caption": "summit panorama",
                     "index": 0}
    assert by_job["lost"]["status"] == "error" and by_job["lost"]["error"]["code"] == "worker_lost"
    assert by_job["broken"]["status"] == "error" and by_job["broken"]["error"]["code"] == "missing_field"
