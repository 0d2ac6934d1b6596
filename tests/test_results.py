"""A finished query's result is published or the task fails loudly: it is never dropped in silence."""

import pytest

from ops.stack.local import free_port


def test_publishing_without_an_explicit_bootstrap_uses_the_default_broker_and_fails_loudly(monkeypatch):
    import ops.runtime.config
    import workers.results

    monkeypatch.delenv("TESSERA_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setattr(ops.runtime.config, "DEFAULT_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(workers.results, "_producer", None)
    with pytest.raises(Exception) as info:
        workers.results.publish("job-1", '{"job_id": "job-1"}')
    assert type(info.value).__name__ == "KafkaTimeoutError", info.value


def _fragment(i: int, ids: int = 3, images=()):
    from schemas import ResultFragment

    return ResultFragment(fragment_id=f"f{i}", conversation_id="c", message_ids=[f"m{i}-0"],
                          context_message_ids=[f"m{i}-{n}" for n in range(ids)], start_at="2026-01-01T00:00:00Z",
                          end_at="2026-01-01T00:05:00Z", score=1.0 / (i + 1), snippet="x" * 200, images=list(images))


def test_inline_and_overlong_image_uris_travel_by_reference():
    from schemas import ResultImage
    from schemas.models import MAX_RESULT_URI_CHARS

    inline = ResultImage.of("m/1", 2, "data:image/png;base64," + "A" * 2_000_000, "a cat")
    assert inline.uri == "tessera://messages/m%2F1/images/2" and inline.index == 2 and inline.caption == "a cat"
    long = ResultImage.of("m1", 0, "https://example.com/" + "a" * MAX_RESULT_URI_CHARS, None)
    assert long.uri == "tessera://messages/m1/images/0"
    kept = ResultImage.of("m1", 1, "https://example.com/cat.png", None)
    assert kept.uri == "https://example.com/cat.png"


def test_a_result_over_the_limit_keeps_its_best_fragments_and_says_so():
    from schemas import Result

    result = Result(job_id="j", status="ok", fragments=[_fragment(i, ids=200) for i in range(100)])
    size = len(result.to_json().encode())
    capped = result.capped(size // 3)
    assert len(capped.to_json().encode()) <= size // 3
    assert capped.truncated and 0 < len(capped.fragments) < 100
    assert [f.fragment_id for f in capped.fragments] == [f"f{i}" for i in range(len(capped.fragments))]
    # One fragment more would not have fitted: the cut is as late as the limit allows.
    longer = result.model_copy(update={"fragments": result.fragments[:len(capped.fragments) + 1], "truncated": True})
    assert len(longer.to_json().encode()) > size // 3
    assert result.capped(size) is result
    too_small = result.capped(200)
    assert too_small.status == "error" and too_small.error.code == "result_too_large" and not too_small.fragments


def test_backend_failures_are_told_from_failures_of_the_data():
    import sqlite3

    import psycopg
    import redis
    from elasticsearch import ApiError, ConnectionError as EsConnectionError
    from kafka.errors import KafkaTimeoutError
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    from indexer.errors import is_transient

    class Meta:
        def __init__(self, status):
            self.status = status

    transient = [sqlite3.OperationalError("database is locked"), psycopg.OperationalError("gone"),
                 redis.ConnectionError(), redis.TimeoutError(), KafkaTimeoutError(),
                 ResponseHandlingException(OSError("refused")),
                 UnexpectedResponse(503, "Service Unavailable", b"", None),
                 EsConnectionError("refused"), ApiError("throttled", Meta(429), {}), TimeoutError()]
    permanent = [ValueError("bad vector"), UnexpectedResponse(400, "Bad Request", b"", None),
                 ApiError("mapper_parsing_exception", Meta(400), {}), KeyError("x")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_a_task_retries_backend_failures_and_dead_letters_data_failures(monkeypatch):
    """Eager runs through Celery's tracer: retries, then on_failure with the dead-letter record."""
    from qdrant_client.http.exceptions import UnexpectedResponse

    import workers.runtime as runtime
    from workers.app import app
    from workers.runtime import TesseraTask

    calls, dead = [], []
    monkeypatch.setattr(TesseraTask, "_dead_letter", lambda self, args, kwargs, reason, **extra: dead.append(reason))
    monkeypatch.setattr(runtime, "get_exponential_backoff_interval", lambda *a: 0)

    @app.task(name="tests.flaky", base=TesseraTask, bind=True)
    def flaky(self, failures: int, permanent: bool = False):
        calls.append(self.request.retries)
        if permanent:
            raise ValueError("field text: not a string")
        if len(calls) <= failures:
            raise UnexpectedResponse(503, "Service Unavailable", b"", None)
        return "done"

    assert flaky.apply(args=[2]).get() == "done"
    assert calls == [0, 1, 2] and dead == []
    calls.clear()
    outcome = flaky.apply(args=[100])
    assert outcome.failed() and len(calls) == TesseraTask.max_retries + 1
    assert len(dead) == 1 and "503" in dead[0]
    calls.clear()
    dead.clear()
    outcome = flaky.apply(args=[0, True])
    assert outcome.failed() and calls == [0] and "not a string" in dead[0]
