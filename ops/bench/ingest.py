"""Ingest throughput of ``tessera ingest`` next to the raw MiniLM encoding of the same turns, one run.

``python -m ops.bench.ingest DIR`` (LoCoMo-format files) writes JSON and prints a Markdown table.
Both figures use the same encoder instance, the same texts (what the index stores for each turn:
speaker, words, image captions) and the same batch size, on a fresh data dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from indexer.encoders.text import SentenceTransformerEmbedder
from indexer.ingest.units import turn_of_event
from indexer.text import render_turn
from ops.runtime.jsonl import INGEST_BATCH, ingest_file
from ops.eval.locomo import load, to_events
from ops.runtime.config import Config
from ops.runtime.assemble import open_engine


def run(directory: str, repeats: int = 3) -> dict:
    embedder = SentenceTransformerEmbedder()
    embedder.warm_up()
    turns, _ = load(directory)
    events = to_events(turns)
    texts = [render_turn(turn_of_event(e)) for e in events]
    embedder.encode(texts[:64])
    rows = []
    for attempt in range(repeats):
        t = time.perf_counter()
        for start in range(0, len(texts), INGEST_BATCH):
            embedder.encode(texts[start:start + INGEST_BATCH])
        raw_s = time.perf_counter() - t
        work = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
        events_file = work / "events.jsonl"
        events_file.write_text("\n".join(e.model_dump_json(by_alias=True) for e in events) + "\n")
        engine = open_engine(Config(data_dir=work / "data"), embedder=embedder)
        t = time.perf_counter()
        ok, failed = ingest_file(engine, str(events_file), progress=True)
        ingest_s = time.perf_counter() - t
        engine.close()
        assert ok == len(events) and failed == 0
        rows.append({"attempt": attempt, "turns": len(texts), "raw_encode_turns_per_s": len(texts) / raw_s,
                     "ingest_turns_per_s": len(texts) / ingest_s, "ratio": raw_s / ingest_s})
    ratios = sorted(r["ratio"] for r in rows)
    return {"dataset": directory, "batch": INGEST_BATCH, "rows": rows, "median_ratio": ratios[len(ratios) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir")
    parser.add_argument("--out", default="results/ingest-bench.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = run(args.dir, args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| attempt | turns | raw MiniLM turns/s | tessera ingest turns/s | ingest / raw |")
    print("|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['attempt']} | {r['turns']} | {r['raw_encode_turns_per_s']:.1f} | {r['ingest_turns_per_s']:.1f}"
              f" | {r['ratio']:.2f} |")
    print(f"median ingest / raw: {report['median_ratio']:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
