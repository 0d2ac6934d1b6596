"""Faults against the real stack: after each, the index equals the one built in one process.

Every test interrupts ingest while it is under way (asserted), recovers, and compares fragments and
store counts with ``tessera ingest``'s path over the same events: nothing lost, nothing doubled.
"""

from __future__ import annotations

import signal
import time

from consumer.produce import ensure_topics
from schemas.routing import MESSAGES
from tests.integration.conftest import (
    TEST_VISIBILITY_TIMEOUT, committed, copies, index_progress, indexed, open_stack_engine, produce, reference_engine,
    snapshot, stack_report, wait_until,
)

#: Indexing on a busy machine, plus the wait for a killed worker's tasks to become visible again.
INDEX_TIMEOUT = 300 + int(TEST_VISIBILITY_TIMEOUT)


def _under_way(stack) -> dict:
    return wait_until(lambda: (lambda c: c if c["messages"] and c["pending"] else None)(index_progress(stack.data_dir)),
                      120, "indexing under way")


def _same_as_one_process(stack, events, embedder, tmp_path) -> None:
    wait_until(lambda: indexed(stack.data_dir, len(events)), INDEX_TIMEOUT, "recovery",
               report=lambda: stack_report(stack))
    reference = reference_engine(tmp_path, events, embedder)
    distributed = open_stack_engine(stack, embedder)
    try:
        assert snapshot(distributed) == snapshot(reference)
        fragment_ids = [f[2] for f in snapshot(distributed)["fragments"]]
        assert len(fragment_ids) == len(set(fragment_ids))
    finally:
        distributed.close()
        reference.close()


def test_sigkill_of_the_consumer_mid_ingest(stack, demo_events, embedder, tmp_path):
    stack.start()
    events = copies(demo_events, 4)
    produce(events)
    _under_way(stack)
    stack.kill("consumer", signal.SIGKILL)
    # Records handed on but not committed come again: ingest is idempotent, so they change nothing.
    stack.start_consumer()
    _same_as_one_process(stack, events, embedder, tmp_path)
    wait_until(lambda: committed(MESSAGES) == len(events), 60, "offsets committed to the end")


def test_redis_killed_and_restarted_mid_ingest(stack, demo_events, embedder, tmp_path):
    stack.start()
    events = copies(demo_events, 4)
    produce(events)
    _under_way(stack)
    # Redis appends every write to its AOF before answering, so a SIGKILL loses no queued task;
    # the consumer retries its publishes and the workers reconnect.
    stack.kill("redis", signal.SIGKILL)
    assert indexed(stack.data_dir, len(events)) is None
    stack.restart_service("redis")
    _same_as_one_process(stack, events, embedder, tmp_path)


def test_broker_restart_then_platform_replay_changes_nothing(stack, demo_events, embedder, tmp_path):
    stack.start()
    events = copies(demo_events, 4)
    produce(events)
    _under_way(stack)
    # This broker keeps its log in memory: a restart empties it, and whatever the consumer had not
    # read is gone until the platform replays its outbox from the start.
    stack.kill("broker", signal.SIGKILL)
    stack.restart_service("broker")
    # Every process of a fleet creates the topics it misses at once: none of them may fail.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        for created in [pool.submit(ensure_topics) for _ in range(4)]:
            created.result()
    produce(events)
    _same_as_one_process(stack, events, embedder, tmp_path)


def test_graceful_worker_shutdown_mid_ingest_loses_nothing(stack, demo_events, embedder, tmp_path):
    stack.start()
    events = copies(demo_events, 4)
    produce(events)
    _under_way(stack)
    # Warm shutdown: the worker finishes the task in hand and leaves the rest queued.
    stack.kill("worker-0", signal.SIGTERM)
    assert indexed(stack.data_dir, len(events)) is None
    stack.start_worker(0)
    _same_as_one_process(stack, events, embedder, tmp_path)


def test_a_fleet_with_shared_state_and_a_worker_wiped_mid_ingest(stack, demo_events, embedder, tmp_path,
                                                                   postgres_server):
    """Three workers, each with its own empty data dir, the state in PostgreSQL, the stores shared.

    One worker is killed mid-ingest and comes back with its data dir wiped: the final index equals
    the one-process index of the same events, because no worker kept anything the others need.
    """
    import shutil

    state_url = postgres_server.create_database("fleet")
    stack.start(workers=3, state_url=state_url, worker_dirs=True)
    events = copies(demo_events, 4)
    produce(events)
    wait_until(lambda: (lambda c: c if c["messages"] and c["pending"] else None)(
        index_progress(stack.data_dir, state_url)), 120, "indexing under way")
    stack.kill("worker-1", signal.SIGKILL)
    assert indexed(stack.data_dir, len(events), state_url) is None
    shutil.rmtree(stack.worker_data_dir(1), ignore_errors=True)
    stack.start_worker(1)
    wait_until(lambda: indexed(stack.data_dir, len(events), state_url), INDEX_TIMEOUT, "recovery",
               report=lambda: stack_report(stack, state_url))
    assert not (stack.data_dir / "state.sqlite").exists(), "no process kept state in a local file"
    reference = reference_engine(tmp_path, events, embedder)
    fleet = open_stack_engine(stack, embedder, state_url)
    try:
        assert snapshot(fleet) == snapshot(reference)
    finally:
        fleet.close()
        reference.close()


def _tasks_in_hand(client) -> list[str]:
    """Names of the tasks workers hold unacknowledged (kombu keeps them in the Redis hash ``unacked``)."""
    import json

    return [json.loads(raw)[0]["headers"]["task"] for raw in client.hvals("unacked")]


def test_a_worker_killed_while_it_hands_back_tasks_holds_no_redelivery_up(stack, demo_events, embedder, tmp_path):
    """kombu hands a dead worker's unacknowledged tasks back under a Redis lock (``unacked_mutex``) that
    every worker takes in turn; one killed while holding it leaves the lock to expire on its own. An
    ingest task the dead worker held must come back within the visibility timeout plus that lifetime,
    not after kombu's default five minutes."""
    import sqlite3

    import redis

    from workers.app import broker_transport_options

    stack.start()
    state = stack.data_dir / "state.sqlite"
    wait_until(state.exists, 120, "the worker's state")
    # Hold the state's write lock: the worker's ingest task waits for it, in hand and unacknowledged.
    blocker = sqlite3.connect(state, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    events = copies(demo_events, 4)
    produce(events)
    client = redis.Redis.from_url(stack.env()["TESSERA_REDIS_URL"])
    wait_until(lambda: "tessera.ingest" in _tasks_in_hand(client), 60, "an ingest task in the worker's hand")
    options = broker_transport_options(int(TEST_VISIBILITY_TIMEOUT))
    # The lock as the worker takes it (redis-py ``Lock``: SET NX with the expiry), then the worker dies.
    wait_until(lambda: client.set(options["unacked_mutex_key"], "held-by-the-killed-worker", nx=True,
                                  ex=options["unacked_mutex_expire"]), 30, "the hand-back lock free to take")
    stack.kill("worker-0", signal.SIGKILL)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert indexed(stack.data_dir, len(events)) is None
    stack.start_worker(0)
    # Less than kombu's default lifetime of the lock (300 s), still ample for a busy machine.
    wait_until(lambda: indexed(stack.data_dir, len(events)), 240 + int(TEST_VISIBILITY_TIMEOUT), "recovery",
               report=lambda: stack_report(stack))
    _same_as_one_process(stack, events, embedder, tmp_path)


def test_the_consumer_rides_out_a_redis_outage_and_health_tells_what_is_down(stack, demo_events, monkeypatch):
    """Redis gone for a few seconds while the consumer idles: it keeps its thread, and later events flow.
    Meanwhile ``/healthz`` tells the truth: a worker without its broker, a consumer cut off from
    Kafka, a dead consumer (``tessera stack status`` exits 1); each heals when its peer is back."""
    import subprocess
    import sys

    monkeypatch.setenv("TESSERA_HEALTH_STALL_S", "6")
    stack.start()
    ensure_topics()
    wait_until(lambda: stack.status()["healthy"], 60, "every process healthy")
    stack.kill("redis", signal.SIGKILL)
    wait_until(lambda: stack.status()["health"]["worker-0"] == "unhealthy", 30, "the worker unhealthy without Redis")
    stack.restart_service("redis")
    assert stack.status()["processes"]["consumer"], "the consumer process is still up"
    wait_until(lambda: stack.status()["healthy"], 60, "healthy again")
    produce(demo_events)
    wait_until(lambda: indexed(stack.data_dir, len(demo_events)), INDEX_TIMEOUT, "events after the outage indexed")

    stack.kill("broker", signal.SIGKILL)
    wait_until(lambda: stack.status()["health"]["consumer"] == "unhealthy", 60, "the consumer unhealthy without Kafka")
    stack.restart_service("broker")
    ensure_topics()
    wait_until(lambda: stack.status()["health"]["consumer"] == "healthy", 300, "the consumer healthy again")

    stack.kill("consumer", signal.SIGKILL)
    assert stack.status()["health"]["consumer"] == "dead"
    status = subprocess.run([sys.executable, "-m", "ops.cli.main", "--data-dir", str(stack.data_dir), "stack", "status"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1, status.stdout + status.stderr


def test_a_consumer_dropped_from_its_group_keeps_consuming(stack, demo_events, monkeypatch):
    """After a broker restart (or a long stall) the group may have dropped this member: its commit then fails
    with CommitFailedError. The consumer lets those records come again (idempotent) and rejoins, instead of
    dying (a clean-clone CI run lost its consumer this way in the broker-restart test)."""
    import redis
    from kafka import KafkaConsumer

    from celery import Celery

    from consumer.loop import TesseraConsumer
    from ops.runtime.config import Config
    from schemas.routing import TASKS

    stack.start(workers=0)
    stack.kill("consumer", signal.SIGKILL)
    # A member that stops polling for longer than this is dropped by its own heartbeat thread.
    monkeypatch.setitem(KafkaConsumer.DEFAULT_CONFIG, "max_poll_interval_ms", 3000)
    config = Config.from_env()
    # This process imported workers.app before the stack existed: a client app on the stack's Redis.
    app = Celery("tessera-test", broker=config.redis_url,
                 task_routes={name: {"queue": queue} for name, queue in TASKS.items()})
    consumer = TesseraConsumer(app, MESSAGES, config, redis.Redis.from_url(config.redis_url))
    try:
        produce(demo_events[:5])
        wait_until(lambda: _polled_without_commit(consumer) and consumer.stats.consumed >= 5, 120, "the first records")
        consumer.commit()
        produce(demo_events[5:10])
        wait_until(lambda: _polled_without_commit(consumer), 60, "records polled, not yet committed")
        time.sleep(8)  # past max_poll_interval_ms: the group drops this member
        consumer.commit()  # CommitFailedError before the fix

        def rejoined() -> bool:
            _polled_without_commit(consumer)
            consumer.commit()
            return committed(MESSAGES) >= 10

        wait_until(rejoined, 120, "offsets committed to the end after rejoining")
    finally:
        consumer.consumer.close(autocommit=False)
        consumer.producer.close()


def test_a_consumer_whose_join_is_never_answered_joins_again_with_a_new_client(stack, demo_events, monkeypatch,
                                                                                tmp_path):
    """A JoinGroup the broker never answers (lost in a restart) holds the client outside its group for
    ``max.poll.interval.ms`` + 5 s, 305 s: it polls, but gets no partitions and sends no heartbeat (CI saw
    the broker-restart test wait 300 s for that). After ``TESSERA_CONSUMER_REJOIN_S`` without a heartbeat,
    the consumer drops that client and joins with a new one."""
    import subprocess
    import threading

    import redis
    from celery import Celery

    from consumer.loop import TesseraConsumer
    from ops.runtime.config import Config
    from ops.stack.local import free_port, tansu_command, wait_port
    from schemas.routing import TASKS
    from tests.integration.kafka_proxy import JOIN_GROUP, LossyKafkaProxy

    stack.start(workers=0)
    stack.kill("consumer", signal.SIGKILL)
    broker_port = free_port()
    proxy = LossyKafkaProxy(broker_port)
    with open(tmp_path / "lossy-broker.log", "wb") as log:
        broker = subprocess.Popen(tansu_command(broker_port, advertised_port=proxy.port), stdout=log,
                                  stderr=subprocess.STDOUT)
    consumer = thread = None
    try:
        wait_port(broker_port)
        monkeypatch.setenv("TESSERA_KAFKA_BOOTSTRAP", f"127.0.0.1:{proxy.port}")
        monkeypatch.setenv("TESSERA_CONSUMER_REJOIN_S", "20")  # a first join and heartbeat take ~7 s
        ensure_topics()
        proxy.lose_next(JOIN_GROUP)
        config = Config.from_env()
        app = Celery("tessera-test", broker=config.redis_url,
                     task_routes={name: {"queue": queue} for name, queue in TASKS.items()})
        consumer = TesseraConsumer(app, MESSAGES, config, redis.Redis.from_url(config.redis_url))
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        produce(demo_events[:5])
        wait_until(lambda: consumer.stats.consumed >= 5, 120, "records consumed by a member that joined again")
        assert proxy.dropped.get(JOIN_GROUP) == 1, "the first JoinGroup was lost"
        assert consumer.healthy(30.0)
        wait_until(lambda: committed(MESSAGES) >= 5, 60, "their offsets committed")
    finally:
        if consumer is not None:
            consumer.stop()
        if thread is not None:
            thread.join(60)
        broker.kill()
        broker.wait()
        proxy.close()


def _polled_without_commit(consumer) -> bool:
    """Poll and hand on one batch, leaving its offsets uncommitted (as between two commits of ``run``)."""
    for tp, records in consumer.consumer.poll(timeout_ms=1000).items():
        consumer._handle(tp, records)
    return bool(consumer._done)
