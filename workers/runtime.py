"""Per-process resources of a worker and the base task: one engine per process, delivery counting.

The engine (and its encoder) is built lazily on first use inside the worker process, never in the
parent before fork. Every delivery of a task is counted in Redis; a task delivered more than
``MAX_DELIVERIES`` times is one that keeps killing its worker, and goes to the dead-letter list
instead of being run again.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time

import psycopg
import redis
from celery import Task
from kafka.errors import KafkaTimeoutError

from workers.app import redis_url

log = logging.getLogger("tessera.workers")

MAX_DELIVERIES = int(os.environ.get("TESSERA_MAX_DELIVERIES", "3"))
#: Redis list holding tasks that exceeded MAX_DELIVERIES, one JSON record each.
DEAD_LETTER_KEY = "tessera:tasks:dead"
_ATTEMPTS_TTL_S = 7 * 24 * 3600

_engine = None
_engine_lock = threading.Lock()
_reasoner = None
_redis = None
#: Set by every worker that serves the ``reason`` queue with a VLM, with this expiry; query workers
#: hand candidates to the VLM only while it exists (``reasoning: auto``).
REASONER_KEY = "tessera:reasoner:alive"
REASONER_TTL_S = 15


def engine():
    global _engine
    with _engine_lock:
        if _engine is None:
            from ops.settings import Settings, open_engine

            _engine = open_engine(Settings.from_env())
            _engine.warm_up()
        return _engine


def reasoner():
    """The VLM of this process, loaded on first use (never in a parent before fork)."""
    global _reasoner
    with _engine_lock:
        if _reasoner is None:
            from ops.settings import Settings, open_reasoner

            model = open_reasoner(Settings.from_env())
            if model is None:
                from indexer.reasoning import ReasoningUnavailable

                raise ReasoningUnavailable("TESSERA_VLM_MODEL is not set on this worker")
            model.warm_up()
            _reasoner = model
        return _reasoner


def reasoner_alive() -> bool:
    return bool(with_redis(lambda r: r.exists(REASONER_KEY)))


def heartbeat(name: str, stop: threading.Event, period_s: float = REASONER_TTL_S / 3) -> None:
    """Say "a VLM serves the reason queue" until ``stop``; the key expires on its own when the worker dies."""
    while not stop.is_set():
        try:
            redis_client().set(REASONER_KEY, name, ex=REASONER_TTL_S)
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        stop.wait(period_s)
    try:
        redis_client().delete(REASONER_KEY)
    except (redis.ConnectionError, redis.TimeoutError):
        pass


#: Seconds between two looks for pending marks that no queued task covers (a worker died between
#: saving the state and queuing ``embed``, an embed task was dead-lettered).
SWEEP_S = float(os.environ.get("TESSERA_SWEEP_S", "30"))


def sweep(stop: threading.Event, period_s: float = SWEEP_S) -> None:
    """Queue an ``embed`` task while pending marks remain; an embed task with nothing to do returns at once."""
    from indexer.state import open_state
    from ops.settings import Settings

    while not stop.wait(period_s):
        try:
            settings = Settings.from_env()
            state = open_state(settings.state_url, settings.data_dir)
            try:
                waiting = bool(state.pending(1))
            finally:
                state.close()
            if waiting:
                from workers.app import PUBLISH_RETRY, app

                app.send_task("tessera.embed", retry=True, retry_policy=PUBLISH_RETRY)
        except Exception:
            log.exception("sweep for pending marks failed; trying again in %.0f s", period_s)


def redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(redis_url())
    return _redis


#: How long a task waits for Redis to come back before giving up (then it is redelivered).
REDIS_WAIT_S = 120.0


def with_redis(call):
    """Run a Redis call, waiting out a restart: failing the task there would lose its work."""
    deadline = time.monotonic() + REDIS_WAIT_S
    delay = 0.2
    while True:
        try:
            return call(redis_client())
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2.0, delay * 2)


class DeadLettered(Exception):
    """Raised in place of running a task that already killed its worker too often."""


class TesseraTask(Task):
    """Counts deliveries; gives up on a task that keeps killing workers; clears the count on success.

    A task that raises (a store busy past its timeout, Redis gone for minutes) is retried with
    backoff; one that still fails is dead-lettered with its arguments, never dropped.
    """

    autoretry_for = (sqlite3.OperationalError, psycopg.OperationalError, redis.ConnectionError, redis.TimeoutError,
                     KafkaTimeoutError)
    retry_backoff = 1
    retry_backoff_max = 60
    max_retries = 8

    def __call__(self, *args, **kwargs):
        from ops.metrics import TASK_SECONDS, TASKS

        start = time.perf_counter()
        outcome = "failure"
        try:
            result = self._deliver(*args, **kwargs)
            outcome = "dead_lettered" if isinstance(result, dict) and result.get("dead_lettered") else "success"
            return result
        finally:
            TASKS.labels(self.name, outcome).inc()
            TASK_SECONDS.labels(self.name).observe(time.perf_counter() - start)

    def _deliver(self, *args, **kwargs):
        task_id = self.request.id
        if task_id and not self.request.called_directly:
            key = f"tessera:tasks:attempts:{task_id}"
            attempts = with_redis(lambda r: r.incr(key))
            with_redis(lambda r: r.expire(key, _ATTEMPTS_TTL_S))
            if attempts > MAX_DELIVERIES:
                self._dead_letter(args, kwargs, "worker lost on every delivery", attempts=attempts - 1)
                with_redis(lambda r: r.delete(key))
                return {"dead_lettered": True}
        try:
            return super().__call__(*args, **kwargs)
        finally:
            # Returned or raised: the worker survived this delivery, so it does not count as a loss.
            if task_id and not self.request.called_directly:
                with_redis(lambda r: r.delete(f"tessera:tasks:attempts:{task_id}"))

    def _dead_letter(self, args, kwargs, reason: str, **extra) -> None:
        from ops.metrics import TASKS_DEAD_LETTERED

        record = {"task_id": self.request.id, "task": self.name,
                  "queue": (self.request.delivery_info or {}).get("routing_key"),
                  "args": args, "kwargs": kwargs, "reason": reason, **extra}
        with_redis(lambda r: r.rpush(DEAD_LETTER_KEY, json.dumps(record, default=str)))
        log.error("task %s (%s) dead-lettered: %s", self.request.id, self.name, reason)
        TASKS_DEAD_LETTERED.labels(self.name).inc()

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Out of retries, or an error no retry helps: keep the task's input where an operator finds it."""
        self._dead_letter(args, kwargs, f"failed: {exc!r}")
