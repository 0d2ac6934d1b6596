"""`tessera bench` builds a scale corpus only where its projected build fits in this machine's memory."""

import json

import numpy as np

from ops.bench.report import (
    AnonPeak, MEMORY_SHARE, _plots, corpus_dir, markdown, projected_build_peak_mb, too_big,
)


def _built(root, fragments, peak_mb, store="edge", encoder="onnx-int8", anon_mb=None):
    data = corpus_dir(root, store, fragments, encoder)
    data.mkdir(parents=True)
    figures = {"fragments": fragments, "build_peak_rss_mb": peak_mb}
    if anon_mb is not None:
        figures["build_peak_anon_mb"] = anon_mb
    (data / "corpus.json").write_text(json.dumps(figures))


def test_the_build_peak_is_projected_from_the_largest_smaller_corpus_of_the_same_store(tmp_path):
    assert projected_build_peak_mb(tmp_path, "edge", 1_000_000, "onnx-int8") is None
    _built(tmp_path, 10_000, 1_300)
    _built(tmp_path, 100_000, 7_600)
    _built(tmp_path, 100_000, 900, store="sqlite")
    assert projected_build_peak_mb(tmp_path, "edge", 1_000_000, "onnx-int8") == (76_000, 100_000)
    assert projected_build_peak_mb(tmp_path, "edge", 50_000, "onnx-int8") == (6_500, 10_000)


def test_a_corpus_too_big_for_the_machine_is_not_run_and_the_report_says_why(tmp_path):
    _built(tmp_path, 100_000, 7_600)
    total = 24_000
    reason = too_big(tmp_path, "edge", 1_000_000, "onnx-int8", total)
    assert reason and "76,000 MiB" in reason and "100,000-fragment" in reason
    assert too_big(tmp_path, "edge", 200_000, "onnx-int8", total) is None, "15,200 MiB fits"
    assert too_big(tmp_path, "edge", 100_000, "onnx-int8", 1_000) is None, "built already: measured, not rebuilt"
    assert 76_000 > MEMORY_SHARE * total
    report = {"machine": "x", "command": "tessera bench",
              "scale_not_run": [{"store": "edge", "fragments": 1_000_000, "reason": reason}]}
    assert f"Not run: edge at 1,000,000 fragments: {reason}." in markdown(report, [])


def test_a_build_that_recorded_its_own_memory_is_judged_by_it(tmp_path):
    """Most of a build's RSS is pages of the store files the optimizer writes through maps, which the kernel
    drops under pressure; what decides whether a build fits is the process's own memory."""
    _built(tmp_path, 100_000, 14_460, anon_mb=1_500)
    assert too_big(tmp_path, "edge", 1_000_000, "onnx-int8", 24_000) is None, "15,000 MiB of its own fits"
    reason = too_big(tmp_path, "edge", 2_000_000, "onnx-int8", 24_000)
    assert reason and "of its own memory 30,000 MiB" in reason


def test_a_build_held_to_a_memory_budget_is_not_run_where_its_own_memory_would_not_fit_the_budget(tmp_path):
    _built(tmp_path, 100_000, 3_460, anon_mb=820)
    assert too_big(tmp_path, "edge", 1_000_000, "onnx-int8", 24_000, cap_mb=9_000) is None, "8,200 MiB of its own"
    reason = too_big(tmp_path, "edge", 1_000_000, "onnx-int8", 24_000, cap_mb=6_144)
    assert reason and "of its own memory 8,200 MiB" in reason and "the build's memory budget of 6,144 MiB" in reason
    assert too_big(tmp_path, "edge", 1_000_000, "onnx-int8", 8_000, cap_mb=30_000).endswith(
        "more than 90% of this machine's 8,000 MiB")


def test_the_anonymous_peak_is_what_the_block_allocated():
    with AnonPeak(every=60) as peak:
        before = peak.peak_mb
        held = np.ones(64 * 2**20 // 8)  # 64 MiB, still held when the block ends
    assert peak.peak_mb >= before + 60 and held.sum() > 0


def test_the_report_says_how_much_of_the_rss_is_pages_of_mapped_store_files():
    pcts = {"p50": 20.0, "p95": 30.0, "p99": 40.0, "mean": 22.0}
    row = {"store": "edge", "fragments": 100_000, "queries": 500, "latency_ms": pcts, "index_mb": 0,
           "peak_rss_mb": 3466, "index_load_s": 0.7, "corpus": {"units": 1_100_000, "build_s": 791},
           "stages_ms": {s: pcts for s in ("rewrite", "embed", "recall", "fusion", "reasoning")},
           "rss_over_time_mb": [(0, 3436.0), (50, 3437.0), (100, 3438.0)], "rss_file_mb": 2315.0}
    text = markdown({"machine": "x", "command": "tessera bench", "scale": [row]}, [])
    assert "3438 MiB at the end (500 queries), of which 2315 MiB pages of mapped store files" in text
    del row["rss_file_mb"]
    assert "3438 MiB at the end (500 queries)." in markdown({"machine": "x", "command": "b", "scale": [row]}, [])


def test_a_synthetic_corpus_ends_with_every_point_optimized(tmp_path, embedder):
    """A bulk load ends with the stores refreshed: at 100k fragments about a third of the points were otherwise
    left in appendable segments, unquantized, in the process's memory."""
    from ops.bench.synthetic import Layout, Pool, generate
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config

    texts = [f"turn {i} about the glacier trip" for i in range(40)]
    pool = Pool(["ann", "bob"] * 20, texts, embedder.encode(texts).astype(np.float32))
    engine = open_engine(Config(data_dir=tmp_path / "d", vector_store="edge"), embedder=embedder)
    counts = generate(engine, pool, Layout(60, tenants=2, users=5), progress=False)
    for store in (getattr(s, "inner", s) for s in (engine.vectors, engine.keywords)):
        for kind, shard in store.shards.items():
            info = shard.info()
            if info.points_count:
                assert store._pending[kind] == 0 and info.segments_count >= 2, kind
                if hasattr(store, "dim"):
                    # A window also carries its keys and, with ``window_bm25``, its BM25 terms and its turn's.
                    per_point = (4 if store.bm25 is not None else 2) if kind == "window" else 1
                    assert info.indexed_vectors_count == per_point * info.points_count, kind
    windows = getattr(engine.vectors, "inner", engine.vectors).shards["window"].info().points_count
    assert counts["fragments"] == 60 and engine.keywords.count() + windows == counts["units"]
    engine.close()


def test_a_corpus_of_fewer_tenants_is_built_apart_and_the_table_says_what_a_user_sees(tmp_path):
    """``--tenants 1`` at 100k fragments: each user sees what a user of 1M fragments in ten tenants sees."""
    wide = corpus_dir(tmp_path, "edge", 100_000, "onnx-int8", tenants=1)
    assert wide != corpus_dir(tmp_path, "edge", 100_000, "onnx-int8") and wide.name.endswith("-t1")
    _built(tmp_path, 10_000, 760)
    _built(tmp_path, 100_000, 7_600)
    assert too_big(tmp_path, "edge", 100_000, "onnx-int8", 1_000) is None, "built already"
    assert "7,600 MiB" in too_big(tmp_path, "edge", 100_000, "onnx-int8", 1_000, tenants=1), "not built: projected"
    stages = {s: {"p50": 1.0} for s in ("rewrite", "embed", "recall", "fusion", "reasoning")}
    row = {"store": "edge", "fragments": 100_000, "queries": 3, "latency_ms": {"p50": 40.0, "p95": 50.0, "p99": 60.0},
           "index_mb": 0, "peak_rss_mb": 3_000, "index_load_s": 0.3, "stages_ms": stages,
           "rss_over_time_mb": [(0, 3_000), (1, 3_000)],
           "corpus": {"fragments": 100_000, "units": 1_100_000, "tenants": 1, "users_per_tenant": 100}}
    table = markdown({"machine": "x", "command": "tessera bench", "scale": [row]}, [])
    assert "| edge | 100,000 | 1,100,000 | 12,250 | 40.0 |" in table
    ten = dict(row, corpus=dict(row["corpus"], tenants=10))
    assert "| edge | 100,000 | 1,100,000 | 1,220 | 40.0 |" in markdown({"machine": "x", "command": "b", "scale": [ten]}, [])


def test_the_filtered_searches_of_a_measurement_find_only_what_their_filter_names(tmp_path, embedder):
    """``measure`` also times searches narrowed to a conversation, a sender or 91 days (``sample_filtered``), the
    ones that read the payload indexes of those fields; each finds turns, and only turns its filter names."""
    from datetime import datetime

    from ops.bench.synthetic import FILTER_KINDS, Layout, Pool, generate, sample_filtered
    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from schemas import QUERY_SCHEMA, QueryJob

    texts = [f"turn {i} about the glacier trip and the lake" for i in range(40)]
    pool = Pool(["ann", "bob"] * 20, texts, embedder.encode(texts).astype(np.float32))
    layout = Layout(400, tenants=2, users=4)
    engine = open_engine(Config(data_dir=tmp_path / "d", vector_store="edge"), embedder=embedder)
    generate(engine, pool, layout, progress=False)
    asks = sample_filtered(pool, layout, 30)
    assert [kind for _, _, _, kind, _ in asks[:3]] == list(FILTER_KINDS)
    found = dict.fromkeys(FILTER_KINDS, 0)
    for i, (tenant, user, text, kind, filters) in enumerate(asks):
        result = engine.query(QueryJob.model_validate({
            "schema": QUERY_SCHEMA, "job_id": f"f{i}", "tenant_id": tenant, "user_id": user, "query": text,
            "top_k": 5, "reasoning": "fast", "filters": filters}))
        assert result.status != "error", result.error
        for fragment in result.fragments:
            turns = engine.state.turns_by_id(tenant, fragment.conversation_id, fragment.message_ids).values()
            found[kind] += len(turns)
            if kind == "conversation":
                assert fragment.conversation_id == filters["conversation_id"]
            elif kind == "participant":
                assert {t.sender_id for t in turns} <= set(filters["participants"])
            else:
                after, before = (datetime.fromisoformat(filters[k]) for k in ("sent_after", "sent_before"))
                assert all(after <= t.sent_at <= before for t in turns)
    assert all(found.values()), found
    engine.close()


def test_the_report_gives_the_filtered_searches_by_kind(tmp_path):
    pcts = {"p50": 20.0, "p95": 30.0, "p99": 40.0, "mean": 22.0}
    row = {"store": "edge", "fragments": 100_000, "queries": 500, "latency_ms": pcts, "index_mb": 0,
           "peak_rss_mb": 3466, "index_load_s": 0.7, "corpus": {"units": 1_100_000, "build_s": 791},
           "stages_ms": {s: pcts for s in ("rewrite", "embed", "recall", "fusion", "reasoning")},
           "rss_over_time_mb": [(0, 3436.0), (650, 3438.0)],
           "filtered_ms": {"conversation": pcts, "participant": dict(pcts, p50=12.5), "time": pcts}}
    report = {"machine": "x", "command": "tessera bench", "scale": [row]}
    plots = _plots(report, tmp_path)
    assert plots and all((tmp_path / plot).exists() for plot in plots)
    text = markdown(report, plots)
    assert "| store | fragments | conversation | participant | time |" in text
    assert "| edge | 100,000 | 20.0 / 40.0 | 12.5 / 40.0 | 20.0 / 40.0 |" in text


def test_the_report_gives_the_run_held_to_a_memory_budget_and_the_capped_build(tmp_path):
    pcts = {"p50": 20.0, "p95": 30.0, "p99": 40.0, "mean": 22.0}
    measured = {"latency_ms": pcts, "peak_rss_mb": 3466, "rss_over_time_mb": [(0, 3436.0), (650, 3438.0)],
                "rss_file_mb": 2315.0, "filtered_ms": {"conversation": dict(pcts, p50=11.0)}}
    row = {"store": "edge", "fragments": 1_000_000, "queries": 500, "index_mb": 0, "index_load_s": 0.7,
           "corpus": {"units": 10_000_000, "build_s": 2600, "build_peak_rss_mb": 8100, "build_peak_anon_mb": 1500,
                      "build_memory_cap_mb": 8192},
           "stages_ms": {s: pcts for s in ("rewrite", "embed", "recall", "fusion", "reasoning")},
           "capped": measured | {"latency_ms": dict(pcts, p50=24.5), "memory_cap_mb": 3072, "cgroup_peak_mb": 3071.5,
                                 "rss_over_time_mb": [(0, 2900.0), (650, 2950.0)], "rss_file_mb": 2700.0,
                                 "peak_rss_mb": 2990.0}} | measured
    plots = _plots({"machine": "x", "command": "tessera bench", "scale": [row]}, tmp_path)
    assert "latency_vs_size.png" in plots and "memory_vs_size.png" in plots
    text = markdown({"machine": "x", "command": "tessera bench", "scale": [row]}, [])
    assert "| 8100 (1500), held to 8,192 |" in text
    assert ("| edge | 1,000,000 | 3,072 | 24.5 / 30.0 / 40.0 | conversation 11.0 / 40.0 | 2950 (2700) | 2990 |"
            " 3072 |") in text


def test_a_child_held_to_a_memory_budget_keeps_its_rss_within_it(tmp_path):
    """The bench's memory budget is a real cgroup: a child that reads a mapped file twice its budget runs to
    the end with its RSS held to the budget (the kernel drops the pages it read first), and the group is gone
    after."""
    import subprocess
    import sys

    import pytest

    from ops.bench.memcap import MemoryCap, MemoryCapUnavailable, evict

    data = tmp_path / "store.bin"
    data.write_bytes(np.random.default_rng(0).bytes(256 << 20))
    child = ("import mmap, sys\n"
             "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
             "total = sum(m[i] for i in range(0, len(m), 4096))\n"
             "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")
    try:
        cap = MemoryCap(96)
    except MemoryCapUnavailable as e:
        pytest.skip(str(e))
    with cap:
        assert evict(tmp_path) == 1
        done = cap.run([sys.executable, "-c", child, str(data)], check=True, capture_output=True, text=True)
        assert cap.peak_mb() is not None and cap.peak_mb() <= 96
    assert not cap.path.exists()
    held_mb = int(done.stdout) / 1024
    free = subprocess.run([sys.executable, "-c", child, str(data)], check=True, capture_output=True, text=True)
    assert held_mb < 120 < int(free.stdout) / 1024, (held_mb, int(free.stdout) / 1024)
