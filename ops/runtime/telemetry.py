"""Prometheus metrics of every Tessera process, and the wrappers that record them.

The domain core (``indexer/``) stays free of metrics: the wrappers here sit around its embedder and
stores, and callers record what the engine reports. Names follow Prometheus conventions: ``tessera_``
prefix, base units in the name, ``_total`` for counters, small fixed label sets.

Celery's prefork children each count into files under ``PROMETHEUS_MULTIPROC_DIR``; the worker's
main process serves their sum (``serve``).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, multiprocess,
)

from indexer.model import SearchFilter, Unit
from ops.runtime.config import Config

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

EVENTS_CONSUMED = Counter("tessera_events_consumed_total", "Records read from Kafka", ["topic"])
EVENTS_REJECTED = Counter("tessera_events_rejected_total", "Records that failed validation", ["topic", "reason"])
INDEX_FAILURES = Counter("tessera_index_failures_total",
                         "Failed indexing attempts of one conversation (the others of the batch went on)")
PARKED = Counter("tessera_conversations_parked_total",
                 "Conversations set aside after repeated indexing failures (tessera dead-letters)")
UNKNOWN_FIELDS = Counter("tessera_unknown_fields_total", "Fields a newer producer sent that this reader ignores"
                         " (names in the consumer's log; not a label, producers choose them)", ["topic"])
EVENTS_DEAD_LETTERED = Counter("tessera_events_dead_lettered_total", "Records sent to a dead-letter topic", ["topic"])
CONSUMER_LAG = Gauge("tessera_consumer_lag_records", "Records behind the partition end", ["topic", "partition"],
                     multiprocess_mode="max")
CONSUMER_PAUSED = Gauge("tessera_consumer_paused", "1 while backpressure pauses the partitions", ["topic"],
                        multiprocess_mode="max")
CONSUMER_REJOINS = Counter("tessera_consumer_rejoins_total",
                           "Kafka clients a consumer dropped after polling without a group heartbeat", ["topic"])
QUEUE_DEPTH = Gauge("tessera_celery_queue_depth_tasks", "Tasks waiting in a Celery queue", ["queue"],
                    multiprocess_mode="max")
TASK_SECONDS = Histogram("tessera_task_duration_seconds", "Celery task run time", ["task"], buckets=LATENCY_BUCKETS)
TASKS = Counter("tessera_tasks_total", "Celery tasks finished", ["task", "outcome"])
TASKS_DEAD_LETTERED = Counter("tessera_tasks_dead_lettered_total", "Tasks parked after killing workers", ["task"])
FRAGMENTS = Counter("tessera_fragments_total", "Fragments written or removed", ["op"])
MESSAGES = Counter("tessera_messages_total", "Message events applied", ["op"])
EMBED_BATCH = Histogram("tessera_embedding_batch_size_texts", "Texts per encoder call", buckets=BATCH_BUCKETS)
EMBED_SECONDS = Histogram("tessera_embedding_duration_seconds", "Encoder call time", buckets=LATENCY_BUCKETS)
STORE_SECONDS = Histogram("tessera_store_operation_duration_seconds", "Store call time", ["backend", "operation"],
                          buckets=LATENCY_BUCKETS)
STORE_ERRORS = Counter("tessera_store_errors_total", "Store calls that raised", ["backend", "operation"])
QUERY_STAGE_SECONDS = Histogram("tessera_query_stage_duration_seconds", "Query time per stage", ["stage"],
                                buckets=LATENCY_BUCKETS)
QUERY_RESULTS = Counter("tessera_query_results_total", "Query results by status", ["status"])
REASONING_BATCH = Histogram("tessera_reasoning_batch_size_candidates", "Candidates per VLM batch",
                            buckets=BATCH_BUCKETS)
GPU_MEMORY = Gauge("tessera_gpu_memory_bytes", "CUDA memory allocated by the reasoning worker", ["device"],
                   multiprocess_mode="max")
HTTP_REQUESTS = Counter("tessera_http_requests_total", "HTTP API requests by route and status", ["route", "status"])
HTTP_SECONDS = Histogram("tessera_http_request_duration_seconds", "HTTP API request time", ["route"],
                         buckets=LATENCY_BUCKETS)
IMAGES = Counter("tessera_images_total", "Message images by outcome: embedded (image vector), read (words indexed"
                 " with the turn, TESSERA_OCR), or the refusal code", ["outcome"])
BUILD = Info("tessera_build", "Version of the running Tessera")

#: Query stages recorded from a result's ``timings_ms`` (the total is its own stage).
QUERY_STAGES = ("rewrite", "embed", "recall", "fusion", "reasoning", "total")


def record_build() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("tessera")
    except PackageNotFoundError:
        v = "unknown"
    if not Config.from_env().multiproc_dir:
        BUILD.info({"version": v})


def record_ingest(report) -> None:
    INDEX_FAILURES.inc(report.index_failures)
    PARKED.inc(report.parked)
    MESSAGES.labels("upsert").inc(report.upserted)
    MESSAGES.labels("delete").inc(report.deleted)
    MESSAGES.labels("unchanged").inc(report.unchanged)
    FRAGMENTS.labels("written").inc(report.fragments_written)
    FRAGMENTS.labels("deleted").inc(report.fragments_deleted)
    if report.images_embedded:
        IMAGES.labels("embedded").inc(report.images_embedded)
    if report.images_read:
        IMAGES.labels("read").inc(report.images_read)
    for code, n in report.image_failures.items():
        IMAGES.labels(code).inc(n)


def record_result(result) -> None:
    QUERY_RESULTS.labels(result.status).inc()
    for stage in QUERY_STAGES:
        if stage in result.timings_ms:
            QUERY_STAGE_SECONDS.labels(stage).observe(result.timings_ms[stage] / 1000)


class InstrumentedEmbedder:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        start = time.perf_counter()
        vectors = self.inner.encode(texts)
        if len(texts):
            EMBED_SECONDS.observe(time.perf_counter() - start)
            EMBED_BATCH.observe(len(texts))
        return vectors


class InstrumentedReasoner:
    """Records the VLM's batch sizes and the GPU memory it holds after each request."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def answer(self, request):
        result = self.inner.answer(request)
        for size in self.inner.last_batches:
            REASONING_BATCH.observe(size)
        GPU_MEMORY.labels(str(self.inner.device)).set(self.inner.memory_bytes())
        return result


class InstrumentedStore:
    """Times and counts every call of a vector or keyword store, labelled by backend."""

    def __init__(self, inner, backend: str):
        self.inner = inner
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, operation: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception:
            STORE_ERRORS.labels(self.backend, operation).inc()
            raise
        finally:
            STORE_SECONDS.labels(self.backend, operation).observe(time.perf_counter() - start)

    def upsert(self, units: Sequence[Unit]) -> None:
        return self._timed("upsert", self.inner.upsert, units)

    def delete(self, unit_ids: Sequence[str]) -> None:
        return self._timed("delete", self.inner.delete, unit_ids)

    def search(self, query, kind: str, flt: SearchFilter, limit: int, *args):
        return self._timed("search", self.inner.search, query, kind, flt, limit, *args)

    def search_batch(self, *args):
        """A keyword store's lists searched with the dense one in one call (``EdgeBM25Store.search_batch``)."""
        return self._timed("search_batch", self.inner.search_batch, *args)


def registry() -> CollectorRegistry:
    """The registry to expose: the multiprocess sum when children count into files."""
    if Config.from_env().multiproc_dir:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    from prometheus_client import REGISTRY

    return REGISTRY


class _Handler(BaseHTTPRequestHandler):
    health = staticmethod(lambda: True)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/metrics"):
            body, status, kind = generate_latest(registry()), 200, CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz"):
            ok = self.health()
            body, status, kind = (b"ok\n" if ok else b"unhealthy\n"), (200 if ok else 503), "text/plain"
        else:
            body, status, kind = b"not found\n", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(port: int, health=lambda: True, host: str | None = None) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` from a daemon thread, on ``host`` or ``TESSERA_METRICS_HOST`` (loopback)."""
    host = host or Config.from_env().metrics_host
    record_build()
    handler = type("Handler", (_Handler,), {"health": staticmethod(health)})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
