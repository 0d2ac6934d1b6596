"""Publishes finished query results to ``tessera.results`` (key = job id)."""

from __future__ import annotations

import os
import threading

_producer = None
_lock = threading.Lock()


def publish(job_id: str, value: str) -> None:
    """Send and wait for the broker's acknowledgement; without a configured broker, do nothing
    (the result stays readable by job id in the result backend)."""
    global _producer
    if not os.environ.get("TESSERA_KAFKA_BOOTSTRAP"):
        return
    from consumer.topics import RESULTS, bootstrap

    with _lock:
        if _producer is None:
            from kafka import KafkaProducer

            _producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all", linger_ms=0)
        _producer.send(RESULTS, key=job_id.encode(), value=value.encode()).get(timeout=30)
