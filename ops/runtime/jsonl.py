"""Message events and query jobs from JSON-lines files: the embedded path of the CLI and the benchmarks."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, TextIO

from tqdm import tqdm

from ops.runtime.telemetry import EVENTS_REJECTED, record_ingest, record_result
from schemas import MessageEvent, Result, SchemaError, parse_message, parse_query

#: Events handed to the engine at once: one encoder pass and one store write per batch.
INGEST_BATCH = 256


def lines(path: str) -> Iterator[tuple[int, bytes]]:
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    with stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line


def ingest_file(engine, path: str, err: TextIO = sys.stderr, progress: bool = True) -> tuple[int, int]:
    """Index every valid line; report each bad line by number and field. Returns (ok, failed). A bulk load:
    it ends with the stores refreshed (``Tessera.refresh``).

    Two stages overlap: this thread parses and encodes batch N+1 while a writer thread applies
    batch N to the state and the stores, so the encoder, the bottleneck, never waits for disk.
    """
    size = os.path.getsize(path) if path != "-" else None
    ok = failed = 0
    batch: list[MessageEvent] = []
    pending: Future | None = None

    def hand_over(events: list[MessageEvent]) -> None:
        nonlocal pending, ok
        vectors = engine.encode_events(events)
        if pending is not None:
            pending.result()
        pending = writer.submit(lambda: record_ingest(engine.ingest(events, vectors)))
        ok += len(events)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-writer") as writer, \
            tqdm(total=size, unit="B", unit_scale=True, desc="ingest", file=err, disable=not progress) as bar:
        for number, raw in lines(path):
            bar.update(len(raw))
            try:
                batch.append(parse_message(raw))
            except SchemaError as exc:
                failed += 1
                EVENTS_REJECTED.labels("file", exc.code).inc()
                tqdm.write(f"{path}:{number}: {exc.code}: {exc}", file=err)
                continue
            if len(batch) >= INGEST_BATCH:
                hand_over(batch)
                batch = []
        if batch:
            hand_over(batch)
        if pending is not None:
            pending.result()
    engine.refresh()
    return ok, failed


def answer_line(engine, raw: bytes | str, number: int) -> Result:
    """One query job in, one result out; a job that breaks the schema gets status ``error``."""
    try:
        job = parse_query(raw)
    except SchemaError as exc:
        job_id = f"line-{number}"
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("job_id"), str):
                job_id = data["job_id"][:200]
        except (ValueError, UnicodeDecodeError):
            pass
        return Result.failure(job_id, exc.code, f"line {number}: {exc}")
    return engine.query(job)


def answer(engine, raw: bytes | str, number: int) -> Result:
    result = answer_line(engine, raw, number)
    record_result(result)
    return result
