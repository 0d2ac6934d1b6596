"""The Celery application: Redis broker and result backend, four queues, settings for long tasks."""

from __future__ import annotations

from celery import Celery, signals
from kombu import Queue

from ops.runtime.config import Config
from schemas.routing import QUEUES, TASKS

#: Read once, when the worker (or a process that publishes tasks) imports the app.
CONFIG = Config.from_env()

#: Seconds an unacknowledged task stays invisible before Redis hands it to another worker: about how
#: long a dead worker's tasks wait (``broker_transport_options``). Every task is bounded well below it
#: (an embed batch takes seconds, a VLM rerank well under a minute): the soft limit fails it, the hard
#: limit kills it, so a task that is still running is never handed to a second worker.
VISIBILITY_TIMEOUT_S = CONFIG.visibility_timeout_s
TASK_TIME_LIMIT_S = max(1, VISIBILITY_TIMEOUT_S - max(1, VISIBILITY_TIMEOUT_S // 10))
TASK_SOFT_TIME_LIMIT_S = max(1, TASK_TIME_LIMIT_S - max(1, VISIBILITY_TIMEOUT_S // 10))


def broker_transport_options(visibility_timeout_s: int) -> dict:
    """How Redis hands a dead worker's unacknowledged tasks back: within about 1.1 visibility timeouts.

    Every worker looks for tasks past the timeout every tenth of it (kombu's default: every 100 s),
    under a Redis lock that a worker killed while holding it leaves behind until it expires: a tenth
    of the timeout too, not kombu's default five minutes, which stalled a fleet's recovery. The hand-back
    itself is a transaction per task, so two workers that overlap after an expiry hand nothing back twice.
    """
    sweep_s = max(1, visibility_timeout_s // 10)
    return {"visibility_timeout": visibility_timeout_s, "unacked_mutex_key": "unacked_mutex",
            "unacked_mutex_expire": max(5, sweep_s), "unacked_restore_interval": sweep_s,
            "unacked_restore_throttle": 1}


#: Publishing a task waits out a Redis restart instead of failing: a lost publish would lose events.
PUBLISH_RETRY = {"max_retries": None, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}

app = Celery("tessera", include=["workers.tasks"])
app.conf.update(
    broker_url=CONFIG.redis_url,
    result_backend=CONFIG.redis_url,
    broker_transport_options=broker_transport_options(VISIBILITY_TIMEOUT_S),
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    broker_connection_retry_on_startup=True,
    task_time_limit=TASK_TIME_LIMIT_S,
    task_soft_time_limit=TASK_SOFT_TIME_LIMIT_S,
    # A child loads the engine (encoder, stores) before it takes a task, so the limits count work only.
    worker_proc_alive_timeout=300,
    task_queues=[Queue(name) for name in QUEUES],
    task_default_queue="ingest",
    task_routes={name: {"queue": queue} for name, queue in TASKS.items()},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # At-least-once: acknowledge after the work, and hand the task back when its worker dies.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Long tasks: a worker reserves one at a time, so a slow task never holds others hostage.
    worker_prefetch_multiplier=1,
    result_expires=24 * 3600,
    # Answers travel on tessera.results; storing task results would only add Redis writes that can
    # fail a finished task during a Redis restart.
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


@signals.worker_init.connect
def _serve_metrics(**_) -> None:
    """The worker's main process serves /metrics (summed over its children) and /healthz."""
    if CONFIG.metrics_port:
        from ops.runtime.telemetry import serve
        from workers.runtime import healthy

        serve(CONFIG.metrics_port, host=CONFIG.metrics_host, health=healthy)


_heartbeat_stop = None


def _served_queues(argv: list[str]) -> set[str]:
    """The queues of this worker from its command line (``-Q a,b``): a forked child has no other record."""
    for flag in ("-Q", "--queues"):
        if flag in argv[:-1]:
            return set(argv[argv.index(flag) + 1].split(","))
    return set(QUEUES)


@signals.worker_process_init.connect
def _load_engine(**_) -> None:
    """A CPU worker's child loads its engine before its first task, not inside it (time limits)."""
    import sys

    if _served_queues(sys.argv) & {"ingest", "embed", "query"}:
        from workers.runtime import engine, log

        try:
            engine()
        except Exception:
            log.exception("the engine did not load at start; the first task tries again")


@signals.worker_ready.connect
def _announce_reasoner(sender=None, **_) -> None:
    """A worker consuming ``reason`` loads its VLM, then tells the query workers it is up.

    Only a model that loaded is announced: a worker whose model fails to load logs why and stays
    silent, so ``auto`` jobs keep the CPU spans instead of waiting on a stage that cannot answer.
    The reason worker runs ``--pool solo`` (CUDA does not survive fork): this process runs its tasks.
    """
    global _heartbeat_stop
    queues = getattr(getattr(getattr(sender, "app", app), "amqp", None), "queues", None)
    consumed = set(getattr(queues, "consume_from", None) or ())
    if "reason" not in consumed or not CONFIG.vlm_model:
        return
    import threading

    from workers import runtime
    from workers.runtime import heartbeat, log, reasoner

    try:
        reasoner()
    except Exception:
        log.exception("the VLM did not load; this worker does not announce itself (auto jobs stay on the CPU)")
        runtime.vlm_failed = True
        return
    _heartbeat_stop = threading.Event()
    threading.Thread(target=heartbeat, args=(getattr(sender, "hostname", "reasoner"), _heartbeat_stop),
                     name="reasoner-heartbeat", daemon=True).start()


_sweep_stop = None


@signals.worker_ready.connect
def _start_sweep(sender=None, **_) -> None:
    """A worker of the ``embed`` queue makes sure no pending mark waits for a task that will never come."""
    global _sweep_stop
    queues = getattr(getattr(getattr(sender, "app", app), "amqp", None), "queues", None)
    if "embed" not in set(getattr(queues, "consume_from", None) or ()):
        return
    import threading

    from workers.runtime import sweep

    def publish_embed() -> None:
        app.send_task("tessera.embed", retry=True, retry_policy=PUBLISH_RETRY)

    _sweep_stop = threading.Event()
    threading.Thread(target=sweep, args=(_sweep_stop, publish_embed, CONFIG.sweep_s), name="pending-sweep",
                     daemon=True).start()


@signals.worker_shutdown.connect
def _stop_threads(**_) -> None:
    for stop in (_heartbeat_stop, _sweep_stop):
        if stop is not None:
            stop.set()


@signals.worker_process_shutdown.connect
def _child_exit(pid=None, **_) -> None:
    if CONFIG.multiproc_dir and pid:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
