"""``tessera bench``: one report (Markdown and PNG plots) of ingest, query latency at scale, memory, encoders.

Sections, each measured in the same run on this machine:

* Ingest on the LoCoMo dev turns: the raw encoder ceiling (the same texts through the encoder alone),
  ``tessera ingest``, the peer baseline that encodes and upserts one message at a time, each with the
  torch encoder and the ONNX int8 encoder; with ``--stack``, the Kafka + Celery pipeline as well.
* Encoders: recall on the dev split with each encoder, from one ``tessera eval`` per encoder.
* Query latency at 10k, 100k (and with ``--sizes`` 1M) fragments of the synthetic corpus
  (``ops.bench.synthetic``), per vector store; each size is measured in a fresh process so its peak RSS is
  its own; the peer baseline is brute-force dense search over all turns, filtered after scoring.
* Memory over a sustained query run (RSS sampled every 50 queries) at the largest size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ops.runtime.assemble import warm_up

PERCENTILES = (50, 95, 99)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _status_mb(field: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` (``VmHWM``, ``RssFile``), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _file_rss_mb() -> float:
    """Resident pages of mapped files (the stores' segments): counted in RSS, but the kernel can drop them."""
    return _status_mb("RssFile") or 0.0


def _peak_mb() -> float:
    """High-water RSS of this process image (``ru_maxrss`` would carry the forking parent's over exec)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """The highest anonymous RSS (``RssAnon``) of this process while the block runs, sampled every ``every`` s
    and once at its end. ``VmHWM`` mixes the process's own memory with pages of the store files the optimizer
    writes through memory maps, which the kernel can drop or write back under pressure; this is what it cannot."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every, self.peak_mb = every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="anon-peak", daemon=True)

    def _take(self) -> None:
        self.peak_mb = max(self.peak_mb, _status_mb("RssAnon") or 0.0)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self._take()

    def __enter__(self) -> "AnonPeak":
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


def _pcts(values) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES} | {"mean": float(a.mean())}


# ---------------------------------------------------------------- scale: corpus and query latency

#: Tenants of a scale corpus unless ``--tenants`` says otherwise (``Layout``).
DEFAULT_TENANTS = 10


def build_corpus(root: Path, store: str, fragments: int, pool_dir: str | None, encoder: str,
                 tenants: int = DEFAULT_TENANTS) -> Path:
    """The synthetic corpus of ``fragments`` on ``store``, built once under ``root``."""
    from indexer.encoders.text import open_embedder
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine
    from ops.bench.synthetic import Layout, generate, load_pool

    data = corpus_dir(root, store, fragments, encoder, tenants)
    done = data / "corpus.json"
    if done.exists():
        return data
    embedder = open_embedder(encoder)
    pool = load_pool(embedder, pool_dir, cache=root / "cache")
    engine = open_engine(Config(data_dir=data, vector_store=store, encoder=encoder), embedder=embedder)
    t = time.perf_counter()
    with AnonPeak() as anon:
        counts = generate(engine, pool, Layout(fragments, tenants=tenants))
        engine.close()
    build_s = time.perf_counter() - t
    done.write_text(json.dumps(counts | {"build_s": build_s, "store": store, "encoder": encoder,
                                         "build_peak_rss_mb": _peak_mb(), "build_peak_anon_mb": anon.peak_mb,
                                         "disk_mb": _disk_mb(data)}))
    return data


def corpus_dir(root: Path, store: str, fragments: int, encoder: str, tenants: int = DEFAULT_TENANTS) -> Path:
    suffix = "" if tenants == DEFAULT_TENANTS else f"-t{tenants}"
    return root / "corpora" / f"{store}-{fragments}-{encoder}{suffix}"


#: A corpus is built only when its projected build peak fits in this share of the machine's memory.
MEMORY_SHARE = 0.9


def projected_build_peak_mb(root: Path, store: str, fragments: int, encoder: str,
                            figure: str = "build_peak_rss_mb") -> tuple[float, int] | None:
    """The build peak ``figure`` of ``fragments``, scaled linearly from the largest smaller corpus of the same
    store and encoder that recorded it (and that corpus's size); None when there is none to scale from."""
    base = None
    for done in (root / "corpora").glob(f"{store}-*-{encoder}/corpus.json"):
        built = json.loads(done.read_text())
        if built.get(figure) and built["fragments"] < fragments and \
                (base is None or built["fragments"] > base["fragments"]):
            base = built
    if base is None:
        return None
    return base[figure] * fragments / base["fragments"], base["fragments"]


def _memory_total_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def too_big(root: Path, store: str, fragments: int, encoder: str, total_mb: float,
            tenants: int = DEFAULT_TENANTS, cap_mb: int | None = None) -> str | None:
    """Why a corpus is not built on this machine (a build that runs out of memory takes the machine with it), or
    within the build's memory budget ``cap_mb`` (its cgroup would kill it).

    Judged by the process's own memory where the smaller build recorded it (``AnonPeak``): pages of mapped
    store files count in the RSS too, but the kernel writes them back and drops them under pressure."""
    if (corpus_dir(root, store, fragments, encoder, tenants) / "corpus.json").exists():
        return None
    projected = projected_build_peak_mb(root, store, fragments, encoder, "build_peak_anon_mb")
    what = "of its own memory"
    if projected is None:
        projected, what = projected_build_peak_mb(root, store, fragments, encoder), "RSS"
    if projected is None:
        return None
    limit, of = MEMORY_SHARE * total_mb, f"{MEMORY_SHARE:.0%} of this machine's {total_mb:,.0f} MiB"
    if cap_mb is not None and cap_mb < limit:
        limit, of = cap_mb, f"the build's memory budget of {cap_mb:,} MiB"
    if projected[0] <= limit:
        return None
    return (f"projected build peak {what} {projected[0]:,.0f} MiB (from the {projected[1]:,}-fragment build) is"
            f" more than {of}")


def _build_peak(corpus: dict) -> str:
    """The build's peak RSS, and in parentheses the process's own part of it where recorded (``AnonPeak``)."""
    own = corpus.get("build_peak_anon_mb")
    cap = corpus.get("build_memory_cap_mb")
    return (f"{corpus.get('build_peak_rss_mb', 0):.0f}" + (f" ({own:.0f})" if own else "")
            + (f", held to {cap:,}" if cap else ""))


def _layout(corpus: dict):
    """The ``Layout`` a corpus was built with, from the counts its build recorded (``generate``)."""
    from ops.bench.synthetic import Layout

    return Layout(corpus["fragments"], tenants=corpus["tenants"], users=corpus["users_per_tenant"])


def _seen(corpus: dict) -> str:
    """Fragments a user of the corpus sees (``Layout.seen_by_a_user``); "-" where the row does not say."""
    return f"{_layout(corpus).seen_by_a_user:,}" if "tenants" in corpus else "-"


def _disk_mb(path: Path) -> float:
    """Bytes the corpus takes on disk (state, vector store, BM25 index), as allocated."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file()) / 2**20


def _brute_force(vectors_path: Path, dim: int):
    """All turn vectors in one matrix plus who may see each: the search a team writes first."""
    import sqlite3

    from indexer.model import EVERYONE

    db = sqlite3.connect(str(vectors_path))
    rows = db.execute("SELECT u.tenant_id, u.visible_to, u.unit_id, v.vector FROM units u JOIN unit_vectors v"
                      " ON v.rowid = u.rowid WHERE u.kind='turn'").fetchall()
    db.close()
    matrix = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    meta = [(r[0], frozenset(json.loads(r[1])), r[2]) for r in rows]

    def search(vector: np.ndarray, tenant: str, user: str, k: int) -> list[str]:
        scores = matrix @ vector
        out = []
        for i in np.argsort(-scores):
            t, visible, unit_id = meta[i]
            if t == tenant and (user in visible or EVERYONE in visible):
                out.append(unit_id)
                if len(out) == k:
                    break
        return out

    return search, matrix.nbytes


#: Filtered searches a measurement runs after the unfiltered ones, a third of each kind (``synthetic.FILTER_KINDS``).
FILTERED_QUERIES = 150


def measure(data: Path, store: str, fragments: int, queries: int, encoder: str, pool_dir: str | None,
            cache: Path, brute: bool, filtered: int = FILTERED_QUERIES) -> dict:
    """Query latency and memory of one corpus, in this (fresh) process: ``queries`` searches of everything a user
    sees, then ``filtered`` ones narrowed by conversation, sender or time (``synthetic.sample_filtered``), which
    read the payload indexes the others do not; the memory figures are taken after both."""
    from tqdm import tqdm

    from indexer.encoders.text import open_embedder
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine
    from ops.bench.synthetic import load_pool, sample_filtered, sample_queries
    from schemas import QUERY_SCHEMA, QueryJob

    embedder = open_embedder(encoder)
    pool = load_pool(embedder, pool_dir, cache=cache)
    rss_start = _rss_mb()
    engine = open_engine(Config(data_dir=data, vector_store=store, encoder=encoder), embedder=embedder)
    t = time.perf_counter()
    warm_up(engine)
    load_s = time.perf_counter() - t
    rss_loaded = _rss_mb()
    layout = _layout(json.loads((data / "corpus.json").read_text()))
    asks = sample_queries(pool, layout, queries + 20)
    jobs = [QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": f"b{i}", "tenant_id": tenant, "user_id": user,
                                     "query": text, "top_k": 5, "reasoning": "fast"})
            for i, (tenant, user, text) in enumerate(asks)]
    for job in jobs[:20]:
        engine.query(job)
    totals, stages, rss = [], {}, []
    for i, job in enumerate(tqdm(jobs[20:], desc=f"queries {store} {fragments}", file=sys.stderr)):
        t = time.perf_counter()
        result = engine.query(job)
        totals.append((time.perf_counter() - t) * 1000)
        for stage, ms in result.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
        if i % 50 == 0:
            rss.append((i, _rss_mb()))
    by_kind: dict[str, list[float]] = {}
    for i, (tenant, user, text, kind, filters) in enumerate(tqdm(sample_filtered(pool, layout, filtered),
                                                                 desc=f"filtered {store} {fragments}", file=sys.stderr)):
        job = QueryJob.model_validate({"schema": QUERY_SCHEMA, "job_id": f"f{i}", "tenant_id": tenant,
                                       "user_id": user, "query": text, "top_k": 5, "reasoning": "fast",
                                       "filters": filters})
        t = time.perf_counter()
        engine.query(job)
        by_kind.setdefault(kind, []).append((time.perf_counter() - t) * 1000)
    if by_kind:
        rss.append((len(totals) + filtered, _rss_mb()))
    out = {"store": store, "fragments": fragments, "queries": len(totals), "encoder": encoder,
           "latency_ms": _pcts(totals), "stages_ms": {s: _pcts(v) for s, v in stages.items()},
           "filtered_ms": {kind: _pcts(v) for kind, v in by_kind.items()},
           "index_load_s": load_s, "rss_start_mb": rss_start, "rss_loaded_mb": rss_loaded, "rss_over_time_mb": rss,
           "index_mb": getattr(engine.vectors.inner, "memory_bytes", 0) / 2**20, "rss_file_mb": _file_rss_mb()}
    engine.close()
    # Tessera's own high-water mark, before the baseline loads its matrix.
    out["peak_rss_mb"] = _peak_mb()
    if brute and store == "sqlite":
        search, nbytes = _brute_force(data / "vectors.sqlite", embedder.dim)
        lat = []
        for tenant, user, text in asks[20:20 + min(queries, 200)]:
            t = time.perf_counter()
            search(embedder.encode([text + " "])[0], tenant, user, 5)
            lat.append((time.perf_counter() - t) * 1000)
        out["brute_force_ms"] = _pcts(lat)
        out["brute_force_matrix_mb"] = nbytes / 2**20
    return out


def _measure_in_child(root: Path, store: str, fragments: int, queries: int, encoder: str,
                      pool_dir: str | None, tenants: int = DEFAULT_TENANTS, build_cap_mb: int | None = None,
                      query_cap_mb: int | None = None) -> dict:
    """Build the corpus (once) and measure it, each in a fresh process so each peak RSS is its own; with
    ``build_cap_mb`` the build runs held to that memory (``MemoryCap``), with ``query_cap_mb`` the corpus is
    measured a second time held to that memory (``capped`` in the result). Every measurement starts with the
    corpus's files out of the page cache, as after a reboot, so that each starts alike whatever ran before it (a
    build, another measurement): its store files are read from disk as it loads and searches."""
    from ops.bench.memcap import MemoryCap, evict

    data = corpus_dir(root, store, fragments, encoder, tenants)
    if not (data / "corpus.json").exists():
        cmd = [sys.executable, "-m", "ops.bench.report", "build", str(root), "--store", store, "--fragments", str(fragments),
               "--encoder", encoder, "--tenants", str(tenants)] + (["--pool", pool_dir] if pool_dir else [])
        if build_cap_mb:
            with MemoryCap(build_cap_mb) as cap:
                cap.run(cmd, check=True)
                built = json.loads((data / "corpus.json").read_text())
                built |= {"build_memory_cap_mb": build_cap_mb, "build_cgroup_peak_mb": cap.peak_mb()}
                (data / "corpus.json").write_text(json.dumps(built))
        else:
            subprocess.run(cmd, check=True)

    def measured(name: str, cap: MemoryCap | None = None) -> dict:
        out = root / name
        cmd = [sys.executable, "-m", "ops.bench.report", "measure", str(data), "--store", store, "--fragments",
               str(fragments), "--queries", str(queries), "--filtered", str(min(queries, FILTERED_QUERIES)),
               "--encoder", encoder, "--cache", str(root / "cache"), "--out", str(out)]
        if pool_dir:
            cmd += ["--pool", pool_dir]
        evict(data)
        if cap is None:
            subprocess.run(cmd, check=True)
            return json.loads(out.read_text())
        cap.run(cmd + ["--no-brute"], check=True)
        return json.loads(out.read_text()) | {"memory_cap_mb": cap.limit_mb, "cgroup_peak_mb": cap.peak_mb()}

    result = measured(f"measure-{store}-{fragments}.json")
    if query_cap_mb:
        with MemoryCap(query_cap_mb) as cap:
            result["capped"] = measured(f"measure-{store}-{fragments}-capped.json", cap)
    return result | {"corpus": json.loads((data / "corpus.json").read_text())}


# ---------------------------------------------------------------- ingest and encoders

def _ingest(locomo_dir: str, encoders: list[str], baseline_turns: int) -> dict:
    from indexer import ids
    from indexer.encoders.text import open_embedder
    from indexer.ingest.units import turn_of_event
    from indexer.model import EVERYONE, Unit
    from indexer.text import render_turn
    from ops.runtime.jsonl import INGEST_BATCH, ingest_file
    from ops.eval.locomo import load, to_events
    from ops.runtime.config import Config
    from ops.runtime.assemble import open_engine

    turns, _ = load(locomo_dir)
    events = to_events(turns)
    texts = [render_turn(turn_of_event(e)) for e in events]
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-ingest-"))
    events_file = work / "events.jsonl"
    events_file.write_text("\n".join(e.model_dump_json(by_alias=True) for e in events) + "\n")
    rows = {}
    for encoder in encoders:
        embedder = open_embedder(encoder)
        embedder.warm_up()
        embedder.encode(texts[:64])
        t = time.perf_counter()
        for start in range(0, len(texts), INGEST_BATCH):
            embedder.encode(texts[start:start + INGEST_BATCH])
        raw_s = time.perf_counter() - t
        engine = open_engine(Config(data_dir=work / f"data-{encoder}", encoder=encoder), embedder=embedder)
        t = time.perf_counter()
        ok, failed = ingest_file(engine, str(events_file), progress=True)
        ingest_s = time.perf_counter() - t
        engine.close()
        if failed or ok != len(events):
            raise RuntimeError(f"ingest of the dev split failed: {failed} lines")
        rows[encoder] = {"raw_turns_per_s": len(texts) / raw_s, "ingest_turns_per_s": len(events) / ingest_s}
        if encoder == "torch":
            # Peer baseline: every message encoded alone and upserted alone, as a naive consumer does.
            engine = open_engine(Config(data_dir=work / "data-naive", encoder=encoder), embedder=embedder)
            sample = events[:baseline_turns]
            t = time.perf_counter()
            for e in sample:
                turn = turn_of_event(e)
                text = render_turn(turn)
                vector = embedder.encode([text])[0]
                ts = turn.sent_at.timestamp()
                unit = Unit(ids.turn_unit_id(e.tenant_id, e.conversation_id, e.message_id, "turn"), "turn", e.tenant_id, e.conversation_id,
                            e.conversation_id, [e.message_id], [e.sender_id], [EVERYONE], ts, ts, text, vector)
                engine.ingestor.write_units([unit])
            rows["one upsert per message"] = {"ingest_turns_per_s": len(sample) / (time.perf_counter() - t)}
            engine.close()
    return {"turns": len(texts), "batch": INGEST_BATCH, "rows": rows}


def _encoder_recall(locomo_dir: str, encoders: list[str]) -> dict:
    from indexer.encoders.text import open_embedder
    from ops.eval.retrieval import evaluate_locomo

    out = {}
    for encoder in encoders:
        report = evaluate_locomo(locomo_dir, embedder=open_embedder(encoder))
        row = report["rows"]["tessera (hybrid fragments + spans)"]
        out[encoder] = {k: row[k] for k in ("recall@5", "recall@10", "recall@30", "mrr")}
    return out


def _stack(locomo_dir: str) -> dict:
    from ops.bench.pipeline import run

    return run(locomo_dir)


# ---------------------------------------------------------------- report

def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    scale = report.get("scale", [])
    if scale:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for store in sorted({r["store"] for r in scale}):
            rows = sorted((r for r in scale if r["store"] == store), key=lambda r: r["fragments"])
            x = [r["fragments"] for r in rows]
            for p, style in zip(PERCENTILES, ("-", "--", ":")):
                ax.plot(x, [r["latency_ms"][f"p{p}"] for r in rows], style, marker="o", label=f"tessera {store} p{p}")
            capped = [r for r in rows if r.get("capped")]
            if capped:
                for p, style in zip((50, 99), ("-", ":")):
                    ax.plot([r["fragments"] for r in capped], [r["capped"]["latency_ms"][f"p{p}"] for r in capped],
                            style, marker="^", color="tab:purple",
                            label=f"tessera {store} p{p}, held to {capped[0]['capped']['memory_cap_mb']:,} MiB")
            brute = [r for r in rows if "brute_force_ms" in r]
            if brute:
                ax.plot([r["fragments"] for r in brute], [r["brute_force_ms"]["p50"] for r in brute], "-", marker="s",
                        color="grey", label="brute force over turns p50")
        # The goals of the embedded engine (issue 17): p50 15 ms at 100k fragments, p50 25 and p99 80 ms at 1M.
        ax.plot([100_000], [15], "*", color="green", label="goal p50 at 100k")
        ax.axhline(25, color="green", lw=0.8, ls="--", label="goal p50 at 1M")
        ax.axhline(80, color="red", lw=0.8, ls="--", label="goal p99 at 1M")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fragments in the index")
        ax.set_ylabel("query latency (ms)")
        ax.set_title("Query latency vs corpus size (no GPU stage)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "latency_vs_size.png", dpi=120)
        plt.close(fig)
        made.append("latency_vs_size.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        for store in sorted({r["store"] for r in scale}):
            rows = sorted((r for r in scale if r["store"] == store), key=lambda r: r["fragments"])
            ax.plot([r["fragments"] for r in rows], [r["peak_rss_mb"] for r in rows], marker="o", label=f"{store} peak RSS")
            capped = [r for r in rows if r.get("capped")]
            if capped:
                ax.plot([r["fragments"] for r in capped], [r["capped"]["peak_rss_mb"] for r in capped], marker="^",
                        color="tab:purple",
                        label=f"{store} peak RSS, held to {capped[0]['capped']['memory_cap_mb']:,} MiB")
        ax.set_xscale("log")
        ax.set_xlabel("fragments in the index")
        ax.set_ylabel("MiB")
        ax.set_title("Peak memory of a query process")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory_vs_size.png", dpi=120)
        plt.close(fig)
        made.append("memory_vs_size.png")

        largest = max(scale, key=lambda r: (r["fragments"], r["store"] == "sqlite"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        xs, ys = zip(*largest["rss_over_time_mb"])
        ax.plot(xs, ys, marker=".")
        ax.set_xlabel("queries answered")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(0, max(ys) * 1.1)
        ax.set_title(f"RSS over a sustained run, {largest['fragments']} fragments ({largest['store']})")
        fig.tight_layout()
        fig.savefig(out / "rss_over_time.png", dpi=120)
        plt.close(fig)
        made.append("rss_over_time.png")
    ingest = report.get("ingest")
    if ingest:
        names, values, colours = [], [], []
        for name, row in ingest["rows"].items():
            if "raw_turns_per_s" in row:
                names.append(f"{name}\nencoder alone")
                values.append(row["raw_turns_per_s"])
                colours.append("lightgrey")
            names.append(f"{name}\n{'tessera ingest' if 'raw_turns_per_s' in row else ''}".strip())
            values.append(row["ingest_turns_per_s"])
            colours.append("tab:blue" if "raw_turns_per_s" in row else "tab:orange")
        if "stack" in report:
            names.append("Kafka + Celery\n(torch)")
            values.append(report["stack"]["pipeline_turns_per_s"])
            colours.append("tab:green")
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(range(len(values)), values, color=colours)
        ax.set_xticks(range(len(values)), names, fontsize=7)
        ax.set_ylabel("turns per second")
        ax.set_title(f"Ingest throughput, LoCoMo dev ({ingest['turns']} turns)")
        fig.tight_layout()
        fig.savefig(out / "ingest.png", dpi=120)
        plt.close(fig)
        made.append("ingest.png")
    return made


def markdown(report: dict, plots: list[str]) -> str:
    lines = ["# Tessera benchmark report", "", f"Machine: {report['machine']}. Generated by `{report['command']}`.", ""]
    ingest = report.get("ingest")
    if ingest:
        rows = ingest["rows"]
        base = rows["torch"]["raw_turns_per_s"]
        lines += ["## Ingest (LoCoMo dev turns)", "",
                  "| path | turns/s | / torch encoder ceiling |", "|---|---|---|"]
        for name, row in rows.items():
            if "raw_turns_per_s" in row:
                lines.append(f"| {name} encoder alone (ceiling) | {row['raw_turns_per_s']:.1f} |"
                             f" {row['raw_turns_per_s'] / base:.2f} |")
                lines.append(f"| `tessera ingest`, {name} encoder | {row['ingest_turns_per_s']:.1f} |"
                             f" {row['ingest_turns_per_s'] / base:.2f} |")
            else:
                lines.append(f"| baseline: {name} (torch) | {row['ingest_turns_per_s']:.1f} |"
                             f" {row['ingest_turns_per_s'] / base:.2f} |")
        if "stack" in report:
            s = report["stack"]
            lines.append(f"| Kafka + Celery pipeline, torch encoder | {s['pipeline_turns_per_s']:.1f} |"
                         f" {s['pipeline_turns_per_s'] / base:.2f} |")
        for name, row in rows.items():
            if "raw_turns_per_s" in row:
                lines.append(f"\n`tessera ingest` with {name}: {row['ingest_turns_per_s'] / row['raw_turns_per_s']:.2f}"
                             " x its own encoder's ceiling.")
        lines.append("")
    recall = report.get("encoders")
    if recall:
        lines += ["## Encoders: recall on the LoCoMo dev split", "",
                  "| encoder | recall@5 | recall@10 | recall@30 | MRR |", "|---|---|---|---|---|"]
        for name, row in recall.items():
            lines.append(f"| {name} | {row['recall@5']:.3f} | {row['recall@10']:.3f} | {row['recall@30']:.3f} |"
                         f" {row['mrr']:.3f} |")
        lines.append("")
    scale = report.get("scale")
    if scale:
        lines += ["## Query latency at scale (synthetic corpus, `ops/bench/synthetic.py`; no GPU stage)", "",
                  "| store | fragments | units | seen by a user | p50 ms | p95 ms | p99 ms | brute force p50 / p99 ms |"
                  " index MiB | peak RSS MiB | index load s | build s | build peak RSS (own) MiB | disk MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(scale, key=lambda r: (r["store"], r["fragments"])):
            lat = r["latency_ms"]
            brute = r.get("brute_force_ms")
            brute_s = f"{brute['p50']:.1f} / {brute['p99']:.1f}" if brute else "-"
            lines.append(f"| {r['store']} | {r['fragments']:,} | {r['corpus']['units']:,} | {_seen(r['corpus'])} |"
                         f" {lat['p50']:.1f} |"
                         f" {lat['p95']:.1f} | {lat['p99']:.1f} | {brute_s} | {r['index_mb']:.0f} |"
                         f" {r['peak_rss_mb']:.0f} | {r['index_load_s']:.1f} | {r['corpus'].get('build_s', 0):.0f} |"
                         f" {_build_peak(r['corpus'])} | {r['corpus'].get('disk_mb', 0):.0f} |")
        lines += ["", "Median time per stage (ms):", "",
                  "| store | fragments | " + " | ".join(("rewrite", "embed", "recall", "fusion", "reasoning")) + " |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(scale, key=lambda r: (r["store"], r["fragments"])):
            st = r["stages_ms"]
            lines.append(f"| {r['store']} | {r['fragments']:,} | " + " | ".join(
                f"{st[s]['p50']:.2f}" for s in ("rewrite", "embed", "recall", "fusion", "reasoning")) + " |")
        filtered = [r for r in scale if r.get("filtered_ms")]
        if filtered:
            kinds = list(filtered[0]["filtered_ms"])
            lines += ["", "Filtered searches, narrowed to one of the user's conversations, to what one person sent, or to"
                      " 91 days, p50 / p99 ms:", "", "| store | fragments | " + " | ".join(kinds) + " |",
                      "|---|---|" + "---|" * len(kinds)]
            for r in sorted(filtered, key=lambda r: (r["store"], r["fragments"])):
                lines.append(f"| {r['store']} | {r['fragments']:,} | " + " | ".join(
                    f"{r['filtered_ms'][k]['p50']:.1f} / {r['filtered_ms'][k]['p99']:.1f}" if k in r["filtered_ms"]
                    else "-" for k in kinds) + " |")
        largest = max(scale, key=lambda r: (r["fragments"], r["store"] == "sqlite"))
        rss = [v for _, v in largest["rss_over_time_mb"]]
        half = len(rss) // 2
        lines += ["", f"Sustained run at {largest['fragments']:,} fragments ({largest['store']}):"
                  f" RSS {rss[0]:.0f} MiB after the first queries, {max(rss[half:]):.0f} MiB at most in the second half,"
                  f" {rss[-1]:.0f} MiB at the end ({largest['queries']} queries)"
                  + (f", of which {largest['rss_file_mb']:.0f} MiB pages of mapped store files, which the kernel can"
                     " drop" if "rss_file_mb" in largest else "") + ".", ""]
    capped = [r for r in scale or [] if r.get("capped")]
    if capped:
        lines += ["Held to a memory budget (a memory cgroup, page cache included; the corpus's files dropped from"
                  " the page cache first, so every page the searches read is charged to them):", "",
                  "| store | fragments | budget MiB | p50 / p95 / p99 ms | filtered p50 / p99 ms | RSS at the end MiB"
                  " (file pages) | peak RSS MiB | cgroup peak MiB |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(capped, key=lambda r: (r["store"], r["fragments"])):
            c, lat = r["capped"], r["capped"]["latency_ms"]
            narrowed = ", ".join(f"{k} {v['p50']:.1f} / {v['p99']:.1f}" for k, v in c.get("filtered_ms", {}).items())
            peak = c.get("cgroup_peak_mb")
            lines.append(f"| {r['store']} | {r['fragments']:,} | {c['memory_cap_mb']:,} | {lat['p50']:.1f} /"
                         f" {lat['p95']:.1f} / {lat['p99']:.1f} | {narrowed or '-'} |"
                         f" {c['rss_over_time_mb'][-1][1]:.0f} ({c.get('rss_file_mb', 0):.0f}) | {c['peak_rss_mb']:.0f} |"
                         f" {f'{peak:.0f}' if peak else '-'} |")
        lines.append("")
    for skipped in report.get("scale_not_run", []):
        lines += [f"Not run: {skipped['store']} at {skipped['fragments']:,} fragments: {skipped['reason']}.", ""]
    if report.get("state"):
        from ops.bench.state import markdown as state_markdown

        lines += ["## Conversation state: PostgreSQL next to SQLite", "", state_markdown(report["state"])]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def run(args) -> dict:
    import platform

    out = Path(args.out)
    if args.build_memory_mb or args.query_memory_mb:
        from ops.bench.memcap import MemoryCap

        MemoryCap(64, name="tessera-bench-probe").close()  # no writable cgroup: say so now, not after the builds
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}",
                    "command": " ".join(["tessera bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "ops.bench.report"}
    if not args.skip_ingest:
        report["ingest"] = _ingest(args.locomo, args.encoders, args.baseline_turns)
        report["encoders"] = _encoder_recall(args.locomo, args.encoders)
    if args.stack:
        report["stack"] = _stack(args.locomo)
    if args.state_fragments:
        from ops.bench.state import run as state_run

        report["state"] = state_run(args.locomo, args.state_fragments, min(args.queries, 300))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    report["scale"] = []
    for n in args.sizes:
        for store in args.stores:
            if store == "qdrant" and n > args.qdrant_max:
                continue
            queries = args.qdrant_queries if store == "qdrant" else args.queries
            if store == "sqlite" and n > args.sqlite_max:
                continue
            reason = too_big(out, store, n, args.scale_encoder, _memory_total_mb(), args.tenants, args.build_memory_mb)
            if reason:
                print(f"not run: {store} at {n:,} fragments: {reason}", file=sys.stderr)
                report.setdefault("scale_not_run", []).append({"store": store, "fragments": n, "reason": reason})
                continue
            report["scale"].append(_measure_in_child(out, store, n, queries, args.scale_encoder, args.locomo, args.tenants,
                                                     args.build_memory_mb, args.query_memory_mb))
            (out / "report.json").write_text(json.dumps(report, indent=2))
    plots = _plots(report, out)
    (out / "report.md").write_text(markdown(report, plots))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--locomo", default="../shared/datasets/locomo-dev", help="LoCoMo-format dev data")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--stores", nargs="+", default=["edge", "sqlite", "qdrant"])
    parser.add_argument("--qdrant-max", type=int, default=10_000,
                        help="largest corpus for Qdrant local mode (its own docs: for tests, not for scale)")
    parser.add_argument("--sqlite-max", type=int, default=100_000,
                        help="largest corpus for the sqlite store (a float32 copy of every vector per process)")
    parser.add_argument("--scale-encoder", default="onnx-int8",
                        help="encoder of the scale corpora and their queries (the default encoder)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--tenants", type=int, default=DEFAULT_TENANTS,
                        help="tenants of the scale corpora: with 1, a user of the 100k corpus sees what a user of the"
                             " 1M corpus of ten tenants sees (about 12,000 fragments)")
    parser.add_argument("--qdrant-queries", type=int, default=50,
                        help="queries on Qdrant local mode (over a second each at 10k fragments)")
    parser.add_argument("--encoders", nargs="+", default=["torch", "onnx-int8"])
    parser.add_argument("--baseline-turns", type=int, default=300)
    parser.add_argument("--stack", action="store_true", help="also run the Kafka + Celery pipeline")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--build-memory-mb", type=int,
                        help="build the scale corpora held to this memory, page cache included (a memory cgroup)")
    parser.add_argument("--query-memory-mb", type=int,
                        help="measure each scale corpus a second time held to this memory, page cache included")
    parser.add_argument("--state-fragments", type=int, default=100_000,
                        help="corpus size of the PostgreSQL-vs-SQLite state comparison (0: skip it)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("report"))
    m = sub.add_parser("measure", help="(internal) measure one corpus in this process")
    m.add_argument("data")
    m.add_argument("--store", required=True)
    m.add_argument("--fragments", type=int, required=True)
    m.add_argument("--queries", type=int, default=500)
    m.add_argument("--encoder", default="torch")
    m.add_argument("--pool")
    m.add_argument("--cache", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--no-brute", action="store_true")
    m.add_argument("--filtered", type=int, default=FILTERED_QUERIES)
    b = sub.add_parser("build", help="(internal) build one synthetic corpus in this process")
    b.add_argument("root")
    b.add_argument("--store", required=True)
    b.add_argument("--fragments", type=int, required=True)
    b.add_argument("--encoder", default="onnx-int8")
    b.add_argument("--pool")
    b.add_argument("--tenants", type=int, default=DEFAULT_TENANTS)
    r = sub.add_parser("render", help="rewrite report.md and the plots from report.json")
    r.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if args.command == "render":
        out = Path(args.out)
        report = json.loads((out / "report.json").read_text())
        (out / "report.md").write_text(markdown(report, _plots(report, out)))
        return
    if args.command == "build":
        build_corpus(Path(args.root), args.store, args.fragments, args.pool, args.encoder, args.tenants)
        return
    if args.command == "measure":
        result = measure(Path(args.data), args.store, args.fragments, args.queries, args.encoder, args.pool,
                         Path(args.cache), not args.no_brute, args.filtered)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return
    run(args)
    print((Path(args.out) / "report.md").read_text())


if __name__ == "__main__":
    main()
