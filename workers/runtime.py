"""Per-process resources of a worker and the base task: one engine per process, delivery counting.

The engine (and its encoder) is built lazily on first use inside the worker process, never in the
parent before fork. Every delivery of a task is counted in Redis; a task delivered more than
``TESSERA_MAX_DELIVERIES`` times is one that keeps killing its worker, and goes to the dead-letter list
instead of being run again.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis
from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

from indexer.errors import is_transient

from ops.runtime.config import Config, redis_url
from ops.runtime.assemble import warm_up

log = logging.getLogger("tessera.workers")

#: Redis list holding tasks delivered more than TESSERA_MAX_DELIVERIES times, one JSON record each.
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
            from ops.runtime.assemble import open_engine

            _engine = open_engine(Config.from_env())
            warm_up(_engine)
        return _engine


def reasoner():
    """The VLM of this process, loaded on first use (never in a parent before fork)."""
    global _reasoner
    with _engine_lock:
        if _reasoner is None:
            from ops.runtime.assemble import open_reasoner

            model = open_reasoner(Config.from_env())
            if model is None:
                from indexer.query.reasoning import ReasoningUnavailable

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


def sweep(stop: threading.Event, publish_embed, period_s: float) -> None:
    """Every ``period_s`` (``TESSERA_SWEEP_S``), queue an ``embed`` task while pending marks remain that no
    queued task may cover (a worker died between saving the state and queuing ``embed``, an embed task
    was dead-lettered); an embed task with nothing to do returns at once."""
    from indexer.state import open_state

    while not stop.wait(period_s):
        try:
            config = Config.from_env()
            state = open_state(config.state_url, config.data_dir)
            try:
                waiting = bool(state.pending(1))
            finally:
                state.close()
            if waiting:
                publish_embed()
        except Exception:
            log.exception("sweep for pending marks failed; trying again in %.0f s", period_s)


#: Set when this worker serves ``reason`` with a VLM configured that did not load.
vlm_failed = False
_probe = None


def healthy() -> bool:
    """What ``/healthz`` of a worker says: the broker answers within two seconds, and the VLM this
    worker is configured with did load."""
    global _probe
    if vlm_failed:
        return False
    if _probe is None:
        _probe = redis.Redis.from_url(redis_url(), socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(_probe.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


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


class TesseraTask(Task):
    """Counts deliveries; gives up on a task that keeps killing workers; clears the count on success.

    A task that fails on a backend (a store busy past its timeout, Redis, Kafka, PostgreSQL, Qdrant or
    Elasticsearch unreachable, throttling or answering 5xx: ``indexer.errors.is_transient``) is retried
    with exponential backoff and full jitter, up to ``max_retries``; one that still fails, or fails on
    its input, is dead-lettered with its arguments, never dropped.
    """

    retry_backoff_max = 60
    max_retries = 8

    def __call__(self, *args, **kwargs):
        from ops.runtime.telemetry import TASK_SECONDS, TASKS

        start = time.perf_counter()
        outcome = "failure"
        try:
            result = self._deliver(*args, **kwargs)
            outcome = "dead_lettered" if isinstance(result, dict) and result.get("dead_lettered") else "success"
            return result
        except Retry:
            outcome = "retry"
            raise
        finally:
            TASKS.labels(self.name, outcome).inc()
            TASK_SECONDS.labels(self.name).observe(time.perf_counter() - start)

    def _deliver(self, *args, **kwargs):
        task_id = self.request.id
        counted = bool(task_id) and not self.request.called_directly and not self.request.is_eager
        if counted:
            key = f"tessera:tasks:attempts:{task_id}"
            attempts = with_redis(lambda r: r.incr(key))
            with_redis(lambda r: r.expire(key, _ATTEMPTS_TTL_S))
            if attempts > Config.from_env().max_deliveries:
                self._dead_letter(args, kwargs, "worker lost on every delivery", attempts=attempts - 1)
                with_redis(lambda r: r.delete(key))
                self.gave_up(args, kwargs, "worker_lost")
                return {"dead_lettered": True}
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if is_transient(exc) and not self.request.called_directly and self.request.retries < self.max_retries:
                delay = get_exponential_backoff_interval(1, self.request.retries, self.retry_backoff_max, True)
                log.warning("task %s (%s) retried in %d s: %r", task_id, self.name, delay, exc)
                raise self.retry(exc=exc, countdown=delay)
            raise
        finally:
            # Returned or raised: the worker survived this delivery, so it does not count as a loss.
            if counted:
                with_redis(lambda r: r.delete(f"tessera:tasks:attempts:{task_id}"))

    def _dead_letter(self, args, kwargs, reason: str, **extra) -> None:
        from ops.runtime.telemetry import TASKS_DEAD_LETTERED

        record = {"task_id": self.request.id, "task": self.name,
                  "queue": (self.request.delivery_info or {}).get("routing_key"),
                  "args": args, "kwargs": kwargs, "reason": reason, **extra}
        with_redis(lambda r: r.rpush(DEAD_LETTER_KEY, json.dumps(record, default=str)))
        log.error("task %s (%s) dead-lettered: %s", self.request.id, self.name, reason)
        TASKS_DEAD_LETTERED.labels(self.name).inc()

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Out of retries, or an error no retry helps: keep the task's input where an operator finds it."""
        self._dead_letter(args, kwargs, f"failed: {exc!r}")
        self.gave_up(args, kwargs, failure_code(exc))

    def gave_up(self, args, kwargs, code: str) -> None:
        """Called once when a delivery is given up for good (dead-lettered)."""


def failure_code(exc: BaseException) -> str:
    """The coarse reason a caller may see; the detail stays in the logs and the dead-letter record."""
    from schemas import SchemaError

    if isinstance(exc, SoftTimeLimitExceeded):
        return "timeout"
    if isinstance(exc, SchemaError):
        return exc.code
    return "unavailable" if is_transient(exc) else "internal"


class AnsweringTask(TesseraTask):
    """A task that owes a query job its result: when it gives up, the job gets an ``error`` result.

    Every query job gets exactly one result: the normal answer, or this one (codes ``timeout``,
    ``unavailable`` after the retries, ``worker_lost``, ``internal``, or the input's schema code).
    """

    def gave_up(self, args, kwargs, code: str) -> None:
        from ops.runtime.telemetry import record_result
        from schemas import Result
        from workers.results import publish

        record = args[0] if args else kwargs.get("record")
        job_id = job_id_of(record)
        if job_id is None:
            log.error("task %s (%s) gave up on a record without a job id", self.request.id, self.name)
            return
        result = Result.failure(job_id, code, f"the search could not be completed ({code}); reference {self.request.id}")
        try:
            publish(job_id, result.to_json())
        except Exception:
            log.exception("the error result of job %s was not published; the dead-letter record keeps the job", job_id)
            return
        record_result(result)


def job_id_of(record) -> str | None:
    """The job id of a ``tessera.query.v1`` record or of a ``tessera.reason.v1`` one (under ``job``)."""
    if isinstance(record, dict) and isinstance(record.get("job"), dict):
        record = record["job"]
    job_id = record.get("job_id") if isinstance(record, dict) else None
    return job_id[:200] if isinstance(job_id, str) and job_id else None
