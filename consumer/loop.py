"""The Kafka consumer: validates records, hands them to Celery, dead-letters the bad ones, commits.

Ordering of effects per poll, per partition: every bad record is produced to ``<topic>.dlq`` and
acknowledged by the broker, the good ones are enqueued to Celery (Redis confirms the push), and only
then is the partition's offset committed, synchronously. A crash anywhere before the commit replays
the records; task ids derive from the records and every step downstream is idempotent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import redis
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from schemas.routing import dlq, group_of, MESSAGES, parse_message_key, QUERIES, QUEUES, RESULTS
from ops.runtime.config import Config
from indexer.errors import is_transient
from ops.runtime.telemetry import (
    CONSUMER_LAG, CONSUMER_PAUSED, CONSUMER_REJOINS, EVENTS_CONSUMED, EVENTS_DEAD_LETTERED, EVENTS_REJECTED, QUEUE_DEPTH, UNKNOWN_FIELDS,
)
from schemas import Result, SchemaError, forward, parse_message, parse_query, unknown_fields
from schemas.parse import loads
from workers.app import PUBLISH_RETRY

log = logging.getLogger("tessera.consumer")

#: Seconds between two measurements of consumer lag and queue depth.
GAUGE_INTERVAL_S = 2.0

#: A member silent this long leaves the group. Kafka's pre-3.0 default, not the client's 45 s: the Tansu
#: broker holds every JoinGroup for half the session timeout (and a follower's SyncGroup for up to 80%),
#: so each rebalance (a restart, a recreated topic) costs seconds instead of half a minute.
SESSION_TIMEOUT_MS = 10_000


@dataclass
class ConsumerStats:
    consumed: int = 0
    enqueued_tasks: int = 0
    dead_lettered: int = 0
    tombstones: int = 0
    commits: int = 0
    paused: bool = False
    committed: dict = field(default_factory=dict)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: "TesseraConsumer"):
        self.owner = owner

    def on_partitions_revoked(self, revoked):
        """``run`` commits after every batch it hands on, so little is uncommitted here; the listener runs on
        the client's IO thread, where a blocking commit is refused. Offsets of partitions that move are
        dropped: the next owner reads those records again, and their events are idempotent."""
        self.owner.forget(revoked)

    def on_partitions_lost(self, lost):
        """Dropped from the group (a broker restart, a long stall): nothing can be committed for these."""
        self.owner.forget(lost)

    def on_partitions_assigned(self, assigned):
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class TesseraConsumer:
    """One consumer group member for one topic.

    Messages and queries get a consumer (and group) each: backpressure pauses ingest without ever
    delaying a query, and pausing every partition of a consumer is what the brokers here handle
    correctly (pausing some partitions of a multi-topic subscription stalled fetching for good).
    """

    def __init__(self, celery_app, topic: str, config: Config, redis_client=None, poll_timeout_ms: int = 500):
        if topic not in (MESSAGES, QUERIES):
            raise ValueError(f"unknown topic {topic!r}")
        self.app = celery_app
        self.topic = topic
        self.redis = redis_client
        self.poll_timeout_ms = poll_timeout_ms
        #: Celery tasks waiting in the ingest and embed queues above which message partitions are paused
        #: (polling goes on: the group keeps the consumer, only fetching stops), and below which they resume.
        self.pause_above, self.resume_below = config.pause_above, config.resume_below
        self.config = config
        self.producer = KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all", linger_ms=0)
        self.consumer = self._connect()
        self.stats = ConsumerStats()
        self._done: dict[TopicPartition, int] = {}
        self._stop = threading.Event()
        self._gauges_at = 0.0
        self.polled_at = self.connected_at = time.monotonic()

    def _connect(self, api_version=None) -> KafkaConsumer:
        """A new group member; given the broker's API version, it does not block to ask for it."""
        config = self.config
        consumer = KafkaConsumer(
            bootstrap_servers=config.kafka_bootstrap, group_id=group_of(self.topic), enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=config.consumer_max_poll, client_id=f"tessera-{self.topic}",
            session_timeout_ms=SESSION_TIMEOUT_MS, **({"api_version": api_version} if api_version else {}),
        )
        consumer.subscribe([self.topic], listener=_Rebalance(self))
        return consumer

    # ---- lifecycle ----------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self, max_seconds: float | None = None) -> ConsumerStats:
        """Poll until stopped; then commit what was handed on and leave the group."""
        deadline = time.monotonic() + max_seconds if max_seconds else None
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                self._rejoin_if_stuck()
                self._measure()
                self._backpressure()
                batches = self.consumer.poll(timeout_ms=self.poll_timeout_ms)
                self.polled_at = time.monotonic()
                for tp, records in batches.items():
                    self._handle(tp, records)
                if batches:
                    self.commit()
        finally:
            self.commit()
            self.consumer.close(autocommit=False)
            self.producer.close()
        return self.stats

    def healthy(self, stall_s: float) -> bool:
        """Polling goes on (no call stuck for ``stall_s``) and the group coordinator hears from us: a
        consumer cut off from the broker polls empty batches quickly, but stops heartbeating. Before
        its first heartbeat (joining the group takes seconds) it has ``stall_s`` from its start."""
        now = time.monotonic()
        if now - self.polled_at > stall_s:
            return False
        return self._heartbeat_age(now) < stall_s

    def _heartbeat_age(self, now: float) -> float:
        """Seconds since this member last heartbeated to its group, or since its client was made."""
        heartbeat = self.consumer.metrics().get("consumer-coordinator-metrics", {}).get("last-heartbeat-seconds-ago")
        if heartbeat is None or heartbeat == float("inf"):
            return now - self.connected_at
        return heartbeat

    def _rejoin_if_stuck(self) -> None:
        """A member that polls but has not heartbeated for ``consumer_rejoin_s`` gets a new client.

        The client heartbeats only while it holds a group generation. A join whose answer never comes
        (a broker restarted under it; JoinGroup waits ``max.poll.interval.ms`` + 5 s, 305 s by default)
        leaves it polling outside the group with nothing assigned: the new client leaves the old
        member behind and joins afresh. Offsets handed on but not committed come again (idempotent).
        """
        now = time.monotonic()
        silent = self._heartbeat_age(now)
        if silent < self.config.consumer_rejoin_s:
            return
        log.warning("%s: no group heartbeat for %.0f s while polling; joining again with a new client", self.topic, silent)
        old = self.consumer
        self.consumer = self._connect(api_version=old.config.get("api_version"))
        self.connected_at = now
        self._done.clear()
        self.stats.paused = False
        CONSUMER_REJOINS.labels(self.topic).inc()
        try:
            old.close(autocommit=False, timeout_ms=5000)
        except Exception as exc:  # the old client is dropped whatever its state; close is best effort
            log.warning("closing the stuck client failed: %s", exc)

    def commit(self) -> None:
        if not self._done:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._done.items()}
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # The group dropped this member (it rejoins at the next poll): the records handed on since the
            # last commit come again, to whichever member gets their partitions; their events are idempotent.
            log.warning("commit refused, no longer in the group (%s); those records will come again", exc)
            self._done.clear()
            return
        except KafkaError as exc:
            if not is_transient(exc):
                raise
            # The broker went away mid-commit: keep the offsets for the next commit. Records handed
            # on since the last commit may be delivered again; their events are idempotent.
            log.warning("commit failed (%s); kept for the next one", exc)
            return
        self.stats.commits += 1
        self.stats.committed.update({f"{tp.topic}/{tp.partition}": o for tp, o in self._done.items()})
        self._done.clear()

    def forget(self, partitions) -> None:
        """Offsets of partitions this consumer no longer owns are not committed by it."""
        for tp in partitions:
            self._done.pop(tp, None)

    # ---- records ------------------------------------------------------------------------------------

    def _handle(self, tp: TopicPartition, records) -> None:
        good: list[dict] = []
        EVENTS_CONSUMED.labels(tp.topic).inc(len(records))
        for record in records:
            self.stats.consumed += 1
            if tp.topic == MESSAGES:
                if record.value is None:
                    self._flush_messages(tp, good)
                    good = []
                    self._tombstone(record)
                    continue
                try:
                    data = loads(record.value)
                    event = parse_message(data)
                except SchemaError as exc:
                    self._dead_letter(record, exc)
                    continue
                self._count_unknown(tp.topic, data, event)
                good.append({"offset": record.offset, "event": forward(event)})
            else:
                try:
                    data = loads(record.value if record.value is not None else b"null")
                    job = parse_query(data)
                except SchemaError as exc:
                    self._dead_letter(record, exc)
                    self._answer_error(record, exc)
                    continue
                self._count_unknown(tp.topic, data, job)
                self._send("tessera.query", [forward(job)], task_id=f"query:{job.job_id}")
        self._flush_messages(tp, good)
        self._done[tp] = records[-1].offset + 1

    @staticmethod
    def _count_unknown(topic: str, data: dict, record) -> None:
        """Fields of a newer producer are ignored, and counted so that a rollout stays visible."""
        names = unknown_fields(data, record)
        if names:
            UNKNOWN_FIELDS.labels(topic).inc(len(names))
            log.debug("%s: ignored fields %s", topic, names[:10])

    def _flush_messages(self, tp: TopicPartition, good: list[dict]) -> None:
        if not good:
            return
        task_id = f"ingest:{tp.topic}:{tp.partition}:{good[0]['offset']}-{good[-1]['offset']}"
        self._send("tessera.ingest", [[g["event"] for g in good]], task_id=task_id)

    def _tombstone(self, record) -> None:
        """A null value erases the one conversation of one tenant its key names; any other key is refused."""
        self.stats.tombstones += 1
        try:
            tenant_id, conversation_id = parse_message_key(record.key)
        except SchemaError as exc:
            self._dead_letter(record, exc)
            return
        self._send("tessera.delete_conversation", [conversation_id, tenant_id],
                   task_id=f"delete:{record.topic}:{record.partition}:{record.offset}")

    def _send(self, name: str, args: list, task_id: str) -> None:
        """Enqueue and return once Redis has the task (kombu publishes synchronously)."""
        self.app.send_task(name, args=args, task_id=task_id, retry=True, retry_policy=PUBLISH_RETRY)
        self.stats.enqueued_tasks += 1

    def _dead_letter(self, record, exc: SchemaError) -> None:
        headers = [
            ("tessera.reason", str(exc).encode()), ("tessera.code", exc.code.encode()),
            ("tessera.field", (exc.field or "").encode()), ("tessera.source.topic", record.topic.encode()),
            ("tessera.source.partition", str(record.partition).encode()),
            ("tessera.source.offset", str(record.offset).encode()),
        ]
        self.producer.send(dlq(record.topic), key=record.key, value=record.value if record.value is not None else b"",
                           headers=headers).get(timeout=30)
        self.stats.dead_lettered += 1
        EVENTS_REJECTED.labels(record.topic, exc.code).inc()
        EVENTS_DEAD_LETTERED.labels(record.topic).inc()
        log.warning("%s/%d@%d dead-lettered: %s", record.topic, record.partition, record.offset, exc)

    def _answer_error(self, record, exc: SchemaError) -> None:
        """A broken query job still gets an answer when it names its job id."""
        try:
            job_id = json.loads(record.value).get("job_id")
        except (TypeError, ValueError, AttributeError):
            return
        if not isinstance(job_id, str) or not job_id:
            return
        result = Result.failure(job_id[:200], exc.code, str(exc))
        self.producer.send(RESULTS, key=result.job_id.encode(), value=result.to_json().encode()).get(timeout=30)

    # ---- backpressure -------------------------------------------------------------------------------

    def _measure(self) -> None:
        """Consumer lag per partition and, from Redis, the depth of every Celery queue."""
        now = time.monotonic()
        if now - self._gauges_at < GAUGE_INTERVAL_S:
            return
        self._gauges_at = now
        assigned = list(self.consumer.assignment())
        if assigned:
            ends = self.consumer.end_offsets(assigned)
            for tp in assigned:
                position = self.consumer.position(tp)
                if position is not None and tp in ends:
                    CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, ends[tp] - position))
        if self.redis is not None:
            depths = self._queue_depths(QUEUES)
            for queue, depth in (depths or {}).items():
                QUEUE_DEPTH.labels(queue).set(depth)
        CONSUMER_PAUSED.labels(self.topic).set(1 if self.stats.paused else 0)

    def _queue_depths(self, queues) -> dict[str, int] | None:
        """Celery queue lengths, or None while Redis is unreachable: gauges and backpressure wait for it,
        the consumer thread does not die of it (publishing waits out the outage on its own)."""
        try:
            return {q: self.redis.llen(q) for q in queues}
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("queue depths unavailable (Redis: %s); backpressure keeps its last decision", exc)
            return None

    def _backpressure(self) -> None:
        if self.redis is None or self.topic != MESSAGES:
            return
        depths = self._queue_depths(("ingest", "embed"))
        if depths is None:
            return
        depth = sum(depths.values())
        partitions = list(self.consumer.assignment())
        if not self.stats.paused and depth > self.pause_above and partitions:
            self.consumer.pause(*partitions)
            self.stats.paused = True
            log.info("paused %d partitions: %d tasks queued", len(partitions), depth)
        elif self.stats.paused and depth < self.resume_below:
            self.consumer.resume(*self.consumer.paused())
            self.stats.paused = False
            log.info("resumed: %d tasks queued", depth)
