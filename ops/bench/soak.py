"""``tessera soak``: a bounded load and soak run against a real local stack on loopback.

Starts Redis, the broker, an ingest worker, a query worker and the consumer (``ops.stack.local``), floods
``tessera.messages`` with ``--events`` message events (copies of the demo chats under new
conversation ids) once one warm-up query has come back end to end, and while they are indexed sends query jobs at ``--query-rate`` per second for
at least ``--query-seconds``. It reports sustained ingest throughput, query round-trip latency
(produced to result read back), errors, dead letters, and the RSS of every stack process over time;
``report.md`` and ``soak.png`` land in ``--out``.

With ``--faults`` (the default of ``tessera soak``) the run is also hostile: an image server on
loopback that trickles one byte every half second, a poison conversation whose images do not decode,
records that are not events at all, Redis killed and restarted at a quarter of the load, the ingest
worker SIGKILLed and restarted at half of it. The report then says whether every job was answered,
every valid event indexed, and lists what was dead-lettered and parked (``tessera dead-letters list``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from ops.runtime.config import export, export_default, overridden


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (Celery prefork children included)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            continue
        todo.extend(_children(p))
    return total


def _events(demo_lines: list[bytes], count: int) -> list[bytes]:
    out: list[bytes] = []
    copy = 0
    while len(out) < count:
        for line in demo_lines:
            record = json.loads(line)
            record["conversation_id"] += f"-soak{copy}"
            record["event_id"] += f"-soak{copy}"
            out.append(json.dumps(record).encode())
            if len(out) == count:
                break
        copy += 1
    return out


#: Records that are not message events, produced among the load with ``faults``: each one is dead-lettered.
NOT_EVENTS = (b"{not json", b"\xff\xfe", b'{"schema": "tessera.message.v1", "event_id": "x"}')


class _HostileImages:
    """An image server on loopback: ``/slow.png`` trickles a byte every 0.5 s, ``/broken.png`` is no image."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "4096")
                self.end_headers()
                try:
                    if self.path.startswith("/slow"):
                        for _ in range(4096):
                            self.wfile.write(b"\x89")
                            self.wfile.flush()
                            time.sleep(0.5)
                    else:
                        self.wfile.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 4088)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="hostile-images", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _hostile(lines: list[bytes], images: str) -> list[bytes]:
    """Every 25th event gets a slow image; one conversation's events all carry an image that does not decode."""
    out = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        if record["conversation_id"].startswith("acme-dm-chloe-dev-soak0"):
            record["conversation_id"] = "soak-poison"
            record["images"] = [{"uri": f"{images}/broken.png", "caption": "a photo that does not decode"}]
        elif i % 25 == 0:
            record["images"] = [{"uri": f"{images}/slow.png", "caption": "a photo from a slow server"}]
        out.append(json.dumps(record).encode())
    return out


def run(events: int, query_seconds: float, query_rate: float, out: Path, timeout_s: float,
        faults: bool = False) -> dict:
    """The soak run; the settings it gives its stack (through the environment its processes inherit)
    do not outlive it in this process."""
    with overridden():
        return _run(events, query_seconds, query_rate, out, timeout_s, faults)


def _run(events: int, query_seconds: float, query_rate: float, out: Path, timeout_s: float, faults: bool) -> dict:
    from kafka import KafkaConsumer, KafkaProducer

    from consumer.produce import _key_of
    from schemas.routing import MESSAGES, QUERIES, RESULTS, dlq
    from ops.runtime.config import bootstrap
    from ops.demo.generate import generate
    from ops.demo.topics import EXAMPLE_QUERIES
    from ops.stack.local import Stack
    from schemas import QUERY_SCHEMA
    from tqdm import tqdm

    work = Path(tempfile.mkdtemp(prefix="tessera-soak-"))
    demo = [line for line in generate(work / "demo").read_bytes().splitlines() if line.strip()]
    lines = _events(demo, events)
    hostile = None
    if faults:
        from ops.bench import random_models

        hostile = _HostileImages()
        lines = _hostile(lines, hostile.base)
        export({"TESSERA_IMAGE_MODEL": str(random_models.clip(work / "clip")),
                "TESSERA_IMAGE_ALLOW_HOSTS": "127.0.0.1", "TESSERA_IMAGE_TIMEOUT_S": "1"})
    stack = Stack(work / "stack")
    export_default("TESSERA_VECTOR_STORE", "sqlite")
    stack.up(workers=0, concurrency=1, prometheus=False)
    stack.start_worker(0, 1, queues="ingest,embed")
    stack.start_worker(1, 1, queues="query")
    samples: list[dict] = []
    sent_at: dict[str, float] = {}
    answered: dict[str, tuple[float, str]] = {}
    stop = threading.Event()
    try:
        def watch_results() -> None:
            consumer = KafkaConsumer(RESULTS, bootstrap_servers=bootstrap(), group_id=None,
                                     auto_offset_reset="earliest", consumer_timeout_ms=500)
            while not stop.is_set():
                for record in consumer:
                    result = json.loads(record.value)
                    answered.setdefault(result["job_id"], (time.perf_counter(), result["status"]))
            consumer.close()

        def ask() -> None:
            producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all")
            started, i = time.perf_counter(), 0
            while not stop.is_set() and (time.perf_counter() - started < query_seconds or not ingest_done.is_set()):
                tenant, user, text = EXAMPLE_QUERIES[i % len(EXAMPLE_QUERIES)]
                job_id = f"soak-{i}"
                job = {"schema": QUERY_SCHEMA, "job_id": job_id, "tenant_id": tenant, "user_id": user,
                       "query": text, "top_k": 5, "reasoning": "fast"}
                sent_at[job_id] = time.perf_counter()
                producer.send(QUERIES, key=job_id.encode(), value=json.dumps(job).encode())
                producer.flush()
                i += 1
                time.sleep(1 / query_rate)
            producer.close()

        ingest_done = threading.Event()
        injected: list[dict] = []
        pids = {name: pid for name, pid in stack.load()["pids"].items()}
        _warm_up(QUERIES, RESULTS, QUERY_SCHEMA)
        t0 = time.perf_counter()
        producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all", linger_ms=20)
        # With faults, the records that are not events go out spread over the load.
        spread = {len(lines) * (k + 1) // (len(NOT_EVENTS) + 1): bad for k, bad in enumerate(NOT_EVENTS)} if faults else {}
        for i, line in enumerate(tqdm(lines, desc="produce", file=sys.stderr)):
            producer.send(MESSAGES, key=_key_of(line, MESSAGES), value=line)
            if i in spread:
                producer.send(MESSAGES, value=spread[i])
        producer.flush()
        producer.close()
        produced_s = time.perf_counter() - t0
        threads = [threading.Thread(target=watch_results, daemon=True), threading.Thread(target=ask, daemon=True)]
        for t in threads:
            t.start()
        bar = tqdm(total=len(lines), desc="indexed", file=sys.stderr)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            progress = index_progress(stack.data_dir)
            now = time.perf_counter() - t0
            samples.append({"t": now, **progress, "rss_mb": {name: _rss_mb(pid) for name, pid in pids.items()
                                                             if name in ("consumer", "worker-0", "worker-1", "redis",
                                                                         "broker")}})
            bar.n = progress["messages"]
            bar.refresh()
            if faults:
                _inject(stack, progress["messages"] / len(lines), now, injected, pids)
            if progress["messages"] >= len(lines) and not progress["pending"]:
                ingest_done.set()
                if not threads[1].is_alive():
                    break
            time.sleep(2)
        bar.close()
        settle = time.monotonic() + 60
        while time.monotonic() < settle and any(job not in answered for job in list(sent_at)):
            time.sleep(0.5)
        stop.set()
        dead = sum(1 for _ in _iter(dlq(MESSAGES))) + sum(1 for _ in _iter(dlq(QUERIES)))
        parked = _parked(stack)
    finally:
        stop.set()
        stack.down()
        if hostile is not None:
            hostile.close()
    indexed_at = next((s["t"] for s in samples if s["messages"] >= len(lines) and not s["pending"]), None)
    latencies = [(answered[j][0] - sent_at[j]) * 1000 for j in sent_at if j in answered]
    errors = sum(1 for j in sent_at if j in answered and answered[j][1] == "error")
    report = {
        "events": len(lines), "produce_s": produced_s, "indexed": samples[-1]["messages"] if samples else 0,
        "indexed_all_s": indexed_at, "ingest_events_per_s": len(lines) / indexed_at if indexed_at else None,
        "queries_sent": len(sent_at), "queries_answered": len(latencies), "query_errors": errors,
        "query_latency_ms": {f"p{p}": float(np.percentile(latencies, p)) for p in (50, 95, 99)} if latencies else {},
        "dead_letters": dead, "dead_letters_expected": len(NOT_EVENTS) if faults else 0, "parked": parked,
        "faults": injected if faults else None, "samples": samples,
        "distinct_texts": len({json.loads(line)["text"] for line in lines}),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "soak.png")
    (out / "report.md").write_text(markdown(report))
    return report


def _inject(stack, done: float, now: float, injected: list[dict], pids: dict) -> None:
    """Redis killed and restarted at a quarter of the load, the ingest worker killed and restarted at half."""
    import signal

    if done >= 0.25 and not any(f["fault"] == "redis" for f in injected):
        stack.kill("redis", signal.SIGKILL)
        time.sleep(3)
        stack.restart_service("redis")
        pids["redis"] = stack.load()["pids"]["redis"]
        injected.append({"fault": "redis", "t": now, "what": "SIGKILL, restarted 3 s later"})
    elif done >= 0.5 and not any(f["fault"] == "worker" for f in injected):
        stack.kill("worker-0", signal.SIGKILL)
        stack.start_worker(0, 1, queues="ingest,embed")
        pids["worker-0"] = stack.load()["pids"]["worker-0"]
        injected.append({"fault": "worker", "t": now, "what": "ingest worker SIGKILLed mid-task, restarted"})


def _parked(stack) -> list[dict]:
    """The conversations set aside after repeated indexing failures, as ``tessera dead-letters list`` shows them."""
    from indexer.state import open_state

    state = open_state(None, stack.data_dir)
    try:
        return [{"tenant_id": p.tenant_id, "conversation_id": p.conversation_id, "attempts": p.attempts, "error": p.reason}
                for p in state.parked()]
    finally:
        state.close()


def _warm_up(queries: str, results: str, schema: str, timeout_s: float = 180.0) -> None:
    """One query answered end to end before the clock starts: consumer groups joined, workers loaded."""
    from kafka import KafkaConsumer, KafkaProducer

    from ops.runtime.config import bootstrap

    job = {"schema": schema, "job_id": "soak-warm-up", "tenant_id": "acme", "user_id": "anna", "query": "warm up"}
    producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all")
    producer.send(queries, key=b"soak-warm-up", value=json.dumps(job).encode()).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(results, bootstrap_servers=bootstrap(), group_id=None, auto_offset_reset="earliest",
                             consumer_timeout_ms=1000)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if any(json.loads(r.value)["job_id"] == "soak-warm-up" for r in consumer):
                return
        raise RuntimeError(f"the stack answered no warm-up query within {timeout_s:.0f} s")
    finally:
        consumer.close()


def _iter(topic: str):
    from consumer.produce import iter_topic

    return iter_topic(topic, 3.0)


def index_progress(data_dir: Path, state_url: str | None = None) -> dict:
    """Messages, fragments and pending marks of a state, read beside the processes writing it."""
    import sqlite3

    empty = {"messages": 0, "fragments": 0, "pending": 0, "parked": 0}
    # Parked conversations wait for an operator, not for a worker: they are not pending work.
    counts = {"messages": "SELECT count(*) FROM messages", "fragments": "SELECT count(*) FROM fragments",
              "pending": "SELECT count(*) FROM pending WHERE parked_at IS NULL",
              "parked": "SELECT count(*) FROM pending WHERE parked_at IS NOT NULL"}
    if state_url:
        import psycopg

        try:
            with psycopg.connect(state_url, connect_timeout=10) as conn:
                return {name: conn.execute(sql).fetchone()[0] for name, sql in counts.items()}
        except psycopg.errors.UndefinedTable:
            return empty
    path = data_dir / "state.sqlite"
    if not path.exists():
        return empty
    db = sqlite3.connect(path, timeout=30)
    try:
        return {name: db.execute(sql).fetchone()[0] for name, sql in counts.items()}
    except sqlite3.OperationalError:
        return empty
    finally:
        db.close()


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [s["messages"] for s in samples])
    top.set_ylabel("messages indexed")
    top.set_title(f"Soak: {report['events']} events, {report['queries_sent']} query jobs")
    for name in samples[0]["rss_mb"] if samples else []:
        bottom.plot(t, [s["rss_mb"].get(name, 0) for s in samples], label=name)
    bottom.set_ylabel("RSS (MiB)")
    bottom.set_xlabel("seconds since the first event was produced")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    lat = report["query_latency_ms"]
    lines = ["# Tessera soak run", "",
             "| figure | value |", "|---|---|",
             f"| message events produced | {report['events']} |",
             f"| messages indexed | {report['indexed']} |",
             f"| time to index all (s) | {report['indexed_all_s'] or 'not reached'} |",
             f"| sustained ingest (events/s) | {report['ingest_events_per_s'] or 0:.1f} |",
             f"| query jobs sent / answered / errors | {report['queries_sent']} / {report['queries_answered']} /"
             f" {report['query_errors']} |",
             f"| query round trip p50 / p95 / p99 (ms) | {lat.get('p50', 0):.0f} / {lat.get('p95', 0):.0f} /"
             f" {lat.get('p99', 0):.0f} |",
             f"| dead letters (records that are not events, sent on purpose) | {report['dead_letters']}"
             f" ({report.get('dead_letters_expected', 0)}) |",
             f"| parked conversations | {len(report.get('parked') or [])} |", "",
             f"The events copy the demo chats: {report['distinct_texts']} distinct texts, and an encoder batch encodes"
             " each distinct text once, so the ingest rate here is bound by the pipeline, not by the encoder"
             " (`tessera bench --stack` measures that on distinct LoCoMo turns).", ""]
    if report.get("faults") is not None:
        lines += ["Faults injected during the load:", "", "| t (s) | fault | what |", "|---|---|---|"]
        lines += [f"| {f['t']:.0f} | {f['fault']} | {f['what']} |" for f in report["faults"]]
        lines += ["", "Besides: every 25th event's image comes from a server that trickles a byte every 0.5 s,"
                  " and conversation `soak-poison` carries images that do not decode.", ""]
        for p in report.get("parked") or []:
            lines.append(f"- parked: {p['tenant_id']}/{p['conversation_id']}: {p['error']}")
    samples = report["samples"]
    if len(samples) >= 4:
        lines += ["RSS per process (MiB): after the first quarter of the run, at most in the last quarter, at the end.",
                  "", "| process | first quarter | last quarter max | end |", "|---|---|---|---|"]
        q = len(samples) // 4
        for name in samples[0]["rss_mb"]:
            series = [s["rss_mb"].get(name, 0) for s in samples]
            lines.append(f"| {name} | {series[q]:.0f} | {max(series[-q:]):.0f} | {series[-1]:.0f} |")
    lines += ["", "![soak](soak.png)", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--query-seconds", type=float, default=60.0)
    parser.add_argument("--query-rate", type=float, default=5.0, help="query jobs per second")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", default="results/soak")
    parser.add_argument("--no-faults", dest="faults", action="store_false",
                        help="a quiet run: no hostile images, no Redis outage, no worker kill")


def main(args) -> int:
    report = run(args.events, args.query_seconds, args.query_rate, Path(args.out), args.timeout, faults=args.faults)
    print((Path(args.out) / "report.md").read_text())
    ok = (report["indexed"] == report["events"] and report["dead_letters"] == report["dead_letters_expected"]
          and report["queries_answered"] == report["queries_sent"])
    return 0 if ok else 1
