"""End-to-end ingest through broker, consumer and one Celery worker, next to ``tessera ingest``.

``python -m ops.bench.pipeline DIR`` (LoCoMo-format files): both paths index the same events in one
run on this machine. The distributed run starts a stack on loopback, warms it (group join, model
load) with one event of another tenant, then floods the broker with every event at once and polls
the BM25 store to see when each message becomes searchable (produced -> searchable latency).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from indexer.encoders.text import SentenceTransformerEmbedder
from ops.runtime.jsonl import ingest_file
from ops.eval.locomo import load, to_events
from ops.runtime.config import Config, export
from ops.runtime.assemble import open_engine
from ops.stack.local import Stack

POLL_S = 0.1


def searchable(bm25: Path) -> set[str]:
    if not bm25.exists():
        return set()
    db = sqlite3.connect(bm25, timeout=30)
    try:
        return {r[0] for r in db.execute("SELECT conversation_id || '/' || json_extract(message_ids, '$[0]')"
                                         " FROM units WHERE kind = 'turn'")}
    except sqlite3.OperationalError:
        return set()
    finally:
        db.close()


def run(directory: str, timeout_s: float = 900, rate: float | None = None) -> dict:
    """``rate`` paces production (events per second); None floods the broker at once."""
    turns, _ = load(directory)
    events = to_events(turns)
    lines = [e.model_dump_json(by_alias=True) for e in events]
    work = Path(tempfile.mkdtemp(prefix="tessera-pipeline-"))
    (work / "events.jsonl").write_text("\n".join(lines) + "\n")

    embedder = SentenceTransformerEmbedder()
    embedder.warm_up()
    engine = open_engine(Config(data_dir=work / "embedded"), embedder=embedder)
    t = time.perf_counter()
    ingest_file(engine, str(work / "events.jsonl"))
    embedded_s = time.perf_counter() - t
    engine.close()

    stack = Stack(work / "stack")
    # The workers encode as the embedded run above does (the report's row says torch).
    export({"TESSERA_ENCODER": "torch"})
    stack.up(workers=1, concurrency=1)
    try:
        export(stack.env())
        from kafka import KafkaProducer

        from schemas.routing import MESSAGES
        from ops.runtime.config import bootstrap
        from schemas.routing import message_key

        producer = KafkaProducer(bootstrap_servers=bootstrap(), acks="all", linger_ms=5)
        warm = json.loads(lines[0])
        warm.update(tenant_id="warm-up", event_id="warm-up")
        producer.send(MESSAGES, key=message_key("warm-up", warm["conversation_id"]),
                      value=json.dumps(warm).encode()).get(timeout=60)
        bm25 = stack.data_dir / "bm25.sqlite"
        deadline = time.monotonic() + 300
        while not searchable(bm25):
            if time.monotonic() > deadline:
                raise TimeoutError("stack did not index the warm-up event")
            time.sleep(POLL_S)
        produced_at: dict[str, float] = {}
        t0 = time.perf_counter()

        def produce() -> None:
            """Runs beside the polling loop, so paced production and observation overlap."""
            for i, (e, line) in enumerate(zip(events, lines)):
                if rate:
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                key = f"{e.conversation_id}/{e.message_id}"
                produced_at[key] = time.perf_counter()
                producer.send(MESSAGES, key=message_key(e.tenant_id, e.conversation_id), value=line.encode())
                if rate:
                    producer.flush()
            producer.flush()

        producing = threading.Thread(target=produce, name="producer")
        producing.start()
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        while len(seen) < len(events) and time.monotonic() < deadline:
            now = time.perf_counter()
            for key in searchable(bm25):
                if key not in seen and key in produced_at:
                    seen[key] = now
            time.sleep(POLL_S)
        producing.join()
        pipeline_s = max(seen.values()) - t0 if seen else float("inf")
    finally:
        stack.down()
    latency = np.array([seen[k] - produced_at[k] for k in seen]) * 1000
    return {
        "events": len(events), "indexed_by_pipeline": len(seen), "rate": rate,
        "embedded_turns_per_s": len(events) / embedded_s, "pipeline_turns_per_s": len(seen) / pipeline_s,
        "ratio": embedded_s / pipeline_s,
        "produced_to_searchable_ms": {"p50": float(np.percentile(latency, 50)),
                                      "p99": float(np.percentile(latency, 99))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir")
    parser.add_argument("--out", default="results/pipeline-bench.json")
    parser.add_argument("--rate", type=float, help="events per second (default: all at once)")
    args = parser.parse_args()
    report = run(args.dir, rate=args.rate)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    lat = report["produced_to_searchable_ms"]
    print("| path | turns/s |\n|---|---|")
    print(f"| tessera ingest (one process) | {report['embedded_turns_per_s']:.1f} |")
    print(f"| broker -> consumer -> 1 Celery worker | {report['pipeline_turns_per_s']:.1f} |")
    print(f"production: {'%.0f events/s' % report['rate'] if report['rate'] else 'flood'}")
    print(f"pipeline / in-process: {report['ratio']:.2f}; indexed {report['indexed_by_pipeline']}/{report['events']};"
          f" produced -> searchable p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms")


if __name__ == "__main__":
    main()
