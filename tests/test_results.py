"""A finished query's result is published or the task fails loudly: it is never dropped in silence."""

import pytest

from ops.stack import free_port


def test_publishing_without_an_explicit_bootstrap_uses_the_default_broker_and_fails_loudly(monkeypatch):
    import consumer.topics
    import workers.results

    monkeypatch.delenv("TESSERA_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setattr(consumer.topics, "DEFAULT_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(workers.results, "_producer", None)
    with pytest.raises(Exception) as info:
        workers.results.publish("job-1", '{"job_id": "job-1"}')
    assert type(info.value).__name__ == "KafkaTimeoutError", info.value
