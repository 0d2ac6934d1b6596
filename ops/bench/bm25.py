"""Why the embedded BM25 engine is SQLite FTS5: quality and speed next to tantivy and Qdrant edge, one run.

``python -m ops.bench.bm25 DIR`` indexes the LoCoMo turns (the same rendered text) in each engine
and scores single-turn BM25 retrieval with the dataset's rules: FTS5 (porter), tantivy (en_stem,
with the ``bench`` extra) and the edge store's sparse BM25 with IDF (``EdgeBM25Store``, the turn
shard). End to end, ``TESSERA_KEYWORD_STORE=edge tessera eval locomo DIR`` against the default.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time

import numpy as np

from indexer.stores.fts5 import match_expression
from indexer.text import keywords
from ops.eval.retrieval import indexed_texts, score
from ops.eval.locomo import load


def fts5(docs, questions):
    t = time.perf_counter()
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE d USING fts5(t, tokenize='porter unicode61')")
    db.executemany("INSERT INTO d(rowid, t) VALUES (?, ?)", list(enumerate(docs)))
    build = time.perf_counter() - t
    ranked, lat = [], []
    for q in questions:
        t = time.perf_counter()
        ranked.append([r for (r,) in db.execute("SELECT rowid FROM d WHERE d MATCH ? ORDER BY bm25(d) LIMIT 100",
                                                (match_expression(q),))])
        lat.append(time.perf_counter() - t)
    return build, ranked, lat


def tantivy_engine(docs, questions):
    import tantivy

    builder = tantivy.SchemaBuilder()
    builder.add_integer_field("i", stored=True)
    builder.add_text_field("t", stored=False, tokenizer_name="en_stem")
    schema = builder.build()
    t = time.perf_counter()
    index = tantivy.Index(schema, path=tempfile.mkdtemp())
    writer = index.writer()
    for i, doc in enumerate(docs):
        writer.add_document(tantivy.Document(i=i, t=doc))
    writer.commit()
    index.reload()
    build = time.perf_counter() - t
    searcher = index.searcher()
    ranked, lat = [], []
    for q in questions:
        t = time.perf_counter()
        # keywords() leaves only letters and digits, so the query parser sees plain OR-ed terms
        # and analyses them with the field's stemmer.
        query = index.parse_query(" ".join(keywords(q)), ["t"])
        hits = searcher.search(query, 100).hits
        ranked.append([searcher.doc(addr)["i"][0] for _, addr in hits])
        lat.append(time.perf_counter() - t)
    return build, ranked, lat


def edge_engine(docs, questions):
    import uuid

    from indexer.model import EVERYONE, SearchFilter, Unit
    from indexer.stores.edge import EdgeBM25Store

    t = time.perf_counter()
    store = EdgeBM25Store(tempfile.mkdtemp())
    ids = [str(uuid.UUID(int=i + 1)) for i in range(len(docs))]
    store.upsert([Unit(ids[i], "turn", "t", "c", "f", [str(i)], ["s"], [EVERYONE], 0.0, 0.0, doc)
                  for i, doc in enumerate(docs)])
    build = time.perf_counter() - t
    position = {unit_id: i for i, unit_id in enumerate(ids)}
    ranked, lat = [], []
    for q in questions:
        t = time.perf_counter()
        hits = store.search(q, "turn", SearchFilter("t", "u"), 100)
        ranked.append([position[h.unit_id] for h in hits])
        lat.append(time.perf_counter() - t)
    store.close()
    return build, ranked, lat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir")
    args = parser.parse_args()
    turns, questions = load(args.dir)
    docs = indexed_texts(turns)
    keys = [(t.conversation_id, t.message_id) for t in turns]
    print("| engine | recall@5 | recall@10 | MRR | build ms | query p50 ms | query p99 ms |")
    print("|---|---|---|---|---|---|---|")
    engines = [("SQLite FTS5 (porter)", fts5), ("tantivy (en_stem)", tantivy_engine),
               ("Qdrant edge sparse BM25 + IDF", edge_engine)]
    for name, engine in engines:
        try:
            build, ranked, lat = engine(docs, [q.text for q in questions])
        except ImportError:
            print(f"| {name} | not installed | | | | | |")
            continue
        row = score(questions, [[keys[i] for i in r] for r in ranked])
        lat_ms = np.array(lat) * 1000
        print(f"| {name} | {row['recall@5']:.3f} | {row['recall@10']:.3f} | {row['mrr']:.3f} | {build * 1000:.0f}"
              f" | {np.percentile(lat_ms, 50):.2f} | {np.percentile(lat_ms, 99):.2f} |")


if __name__ == "__main__":
    main()
