"""Publishes finished query results to ``tessera.results`` (key = job id)."""

from __future__ import annotations

import threading

_producer = None
_lock = threading.Lock()


def publish(job_id: str, value: str) -> None:
    """Send and wait for the broker's acknowledgement; a broker that cannot be reached fails the task
    (retried, then dead-lettered with the job), so a result is never dropped in silence."""
    global _producer
    from schemas.routing import RESULTS
    from ops.runtime.config import bootstrap

    with _lock:
        if _producer is None:
            from kafka import KafkaProducer

            _producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all", linger_ms=0)
        _producer.send(RESULTS, key=job_id.encode(), value=value.encode()).get(timeout=30)
