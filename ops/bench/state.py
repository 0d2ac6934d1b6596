"""The conversation state on PostgreSQL next to SQLite: ingest throughput and query latency.

Both backends get the same work in one run, on this machine:
- ingest: the dev split's message events through ``Tessera.ingest`` in batches of ``INGEST_BATCH``,
  with the text vectors computed once beforehand, so the figure is the state's and the stores' cost
  (encoding, the same for both, is reported apart and added for the end-to-end figure);
- query: a synthetic corpus of ``--fragments`` fragments (``ops.bench.synthetic``) on each state, then
  ``Tessera.query`` end to end (CPU path), whose state reads (fragments, turns, sender names) go to
  the backend under test. PostgreSQL runs durable (fsync on), like SQLite's ``synchronous=FULL``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ops.runtime.assemble import warm_up

INGEST_BATCH = 256


def _pcts(values) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {p: round(float(np.percentile(a, q)), 3) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}


def _ingest(engine, events, vectors) -> float:
    from tqdm import tqdm

    t = time.perf_counter()
    for start in tqdm(range(0, len(events), INGEST_BATCH), desc="ingest", unit="batch", file=sys.stderr):
        engine.ingest(events[start:start + INGEST_BATCH], vectors)
    return time.perf_counter() - t


def _queries(engine, pool, layout, count: int) -> dict:
    from tqdm import tqdm

    from ops.bench.synthetic import sample_queries
    from schemas import QUERY_SCHEMA, QueryJob

    asks = sample_queries(pool, layout, count + 20)
    jobs = [QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": f"s{i}", "tenant_id": tenant, "user_id": user,
                                     "query": text, "top_k": 5, "reasoning": "fast"})
            for i, (tenant, user, text) in enumerate(asks)]
    warm_up(engine)
    for job in jobs[:20]:
        engine.query(job)
    totals = []
    for job in tqdm(jobs[20:], desc="queries", unit="query", file=sys.stderr):
        t = time.perf_counter()
        engine.query(job)
        totals.append((time.perf_counter() - t) * 1000)
    return _pcts(totals)


def run(locomo_dir: str, fragments: int, queries: int, encoder: str = "torch", work: Path | None = None) -> dict:
    from indexer.encoders.text import open_embedder
    from ops.eval.locomo import load, to_events
    from ops.stack.postgres import LocalPostgres
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine
    from ops.bench.synthetic import Layout, generate, load_pool

    work = work or Path(tempfile.mkdtemp(prefix="tessera-bench-state-"))
    embedder = open_embedder(encoder)
    embedder.warm_up()
    turns, _ = load(locomo_dir)
    events = to_events(turns)
    engine0 = open_engine(Config(data_dir=work / "encode", vector_store="sqlite"), embedder=embedder)
    t = time.perf_counter()
    vectors = engine0.encode_events(events)
    encode_s = time.perf_counter() - t
    engine0.close()
    pool = load_pool(embedder, locomo_dir, cache=work / "cache")
    server = LocalPostgres(durable=True).start()
    rows = {}
    try:
        for backend in ("sqlite", "postgres"):
            def engine_on(name: str):
                url = server.create_database(f"{name}_{backend}") if backend == "postgres" else None
                return open_engine(Config(data_dir=work / f"{name}-{backend}", vector_store="sqlite",
                                            state_url=url), embedder=embedder)

            engine = engine_on("ingest")
            ingest_s = _ingest(engine, events, vectors)
            engine.close()
            engine = engine_on("corpus")
            layout = Layout(fragments)
            t = time.perf_counter()
            generate(engine, pool, layout)
            build_s = time.perf_counter() - t
            latency = _queries(engine, pool, layout, queries)
            engine.close()
            rows[backend] = {"ingest_s": round(ingest_s, 2), "ingest_turns_per_s": round(len(events) / ingest_s, 1),
                             "end_to_end_turns_per_s": round(len(events) / (ingest_s + encode_s), 1),
                             "corpus_build_s": round(build_s, 1), "query_ms": latency}
    finally:
        server.stop()
    return {"events": len(events), "encode_s": round(encode_s, 2), "fragments": fragments, "queries": queries,
            "encoder": encoder, "rows": rows,
            "postgres_over_sqlite_ingest": round(rows["postgres"]["ingest_s"] / rows["sqlite"]["ingest_s"], 3)}


def markdown(report: dict) -> str:
    lines = [f"State backends: {report['events']} dev-split events ingested (vectors precomputed in "
             f"{report['encode_s']} s, {report['encoder']}), then {report['queries']} queries at "
             f"{report['fragments']:,} fragments",
             "", "| state | ingest s | turns/s (state+stores) | turns/s end to end | query p50 ms | p95 | p99 |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        q = row["query_ms"]
        lines.append(f"| {name} | {row['ingest_s']} | {row['ingest_turns_per_s']} | {row['end_to_end_turns_per_s']}"
                     f" | {q['p50']} | {q['p95']} | {q['p99']} |")
    lines += ["", f"PostgreSQL / SQLite ingest time: {report['postgres_over_sqlite_ingest']}x"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.state", description=__doc__)
    parser.add_argument("--locomo", default="../shared/datasets/locomo-dev")
    parser.add_argument("--fragments", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    report = run(args.locomo, args.fragments, args.queries)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "state.json").write_text(json.dumps(report, indent=2))
    (out / "state.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
