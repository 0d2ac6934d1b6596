"""Builds the engine a configuration describes: state, stores, encoders, rewriter and reasoner, instrumented."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ops.runtime.config import Config
from ops.runtime.telemetry import InstrumentedEmbedder, InstrumentedReasoner, InstrumentedStore


def open_reasoner(config: Config):
    """The VLM reasoning stage the settings name (None without ``TESSERA_VLM_MODEL``), with its metrics."""
    if not config.vlm_model:
        return None
    from indexer.query.reasoning import VlmReasoner

    return InstrumentedReasoner(VlmReasoner(config.vlm_model, device=config.vlm_device,
                                            batch_size=config.vlm_batch, policy=config.image_policy))


def configured_embedder(config: Config):
    """The text encoder the configuration names: encoder, model (``TESSERA_EMBED_MODEL``), batch and cache."""
    from indexer.encoders.text import open_embedder

    return open_embedder(config.encoder, config.embed_model, batch_size=config.embed_batch,
                         cache_dir=config.model_cache)


def open_engine(config: Config, embedder=None, reasoner=None, rebuild: bool = False):
    """Build the engine the settings describe; the embedder can be shared between engines.

    ``reasoner`` makes the engine run the VLM stage in-process (embedded mode); distributed query
    workers leave it out and hand candidates to the ``reason`` queue instead. A data dir indexed
    with another vector store is refused, unless ``rebuild`` (``tessera reindex``), which drops the
    old store's files for the caller to rebuild the index from the state.
    """
    from indexer.engine import Tessera
    from indexer.state import open_state
    from indexer.stores.fts5 import SqliteBM25Store
    from indexer.stores.sqlite_vectors import SqliteVectorStore

    embedder = embedder or configured_embedder(config)
    data = Path(config.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    index = Path(config.index_dir) if config.index_dir else data
    index.mkdir(parents=True, exist_ok=True)
    vector_files = {"qdrant": "qdrant", "sqlite": "vectors.sqlite", "edge": "edge"}
    _claim(index, "vector-store", config.vector_store, "TESSERA_VECTOR_STORE", rebuild, vector_files)
    text_model = f"{getattr(embedder, 'model', embedder.name)} ({embedder.dim})"
    reencode = _claim_text_model(data, index / vector_files[config.vector_store], text_model, rebuild)
    keyword_store = config.keyword_store or ("edge" if config.vector_store == "edge" else "fts5")
    if not config.es_url:
        _claim(index, "keyword-store", keyword_store, "TESSERA_KEYWORD_STORE", rebuild,
               {"fts5": "bm25.sqlite", "edge": "edge-bm25"}, before="fts5")
    images = None
    if config.image_model or config.ocr:
        from indexer.encoders.image import ImageEmbedder, ImageIndexer

        reader = None
        if config.ocr:
            from indexer.encoders.ocr import ImageReader

            reader = ImageReader()
        embedder_of_images = ImageEmbedder(config.image_model) if config.image_model else None
        images = ImageIndexer(embedder_of_images, policy=config.image_policy, reader=reader)
    image_dim = images.dim if images is not None else None
    # Both on the embedded engine: the BM25 terms of a window and of its turn live with the window's dense vector,
    # one point a message.
    windows_in_one = config.vector_store == "edge" and keyword_store == "edge" and not config.es_url
    if config.vector_store == "edge":
        from indexer.stores.edge import EdgeVectorStore

        vectors = EdgeVectorStore(index / "edge", dim=embedder.dim, image_dim=image_dim, window_bm25=windows_in_one)
    elif config.vector_store == "sqlite":
        vectors = SqliteVectorStore(index / "vectors.sqlite", dim=embedder.dim, image_dim=image_dim)
    elif config.vector_store == "qdrant":
        from indexer.stores.qdrant import QdrantVectorStore

        vectors = QdrantVectorStore(path=index / "qdrant", url=config.qdrant_url, api_key=config.qdrant_api_key,
                                    dim=embedder.dim, image_dim=image_dim)
    else:
        raise ValueError(f"TESSERA_VECTOR_STORE: unknown vector store {config.vector_store!r} (edge, sqlite or qdrant)")
    backend = {"qdrant": "qdrant", "edge": "qdrant-edge"}.get(config.vector_store, "sqlite-vectors")
    if config.es_url:
        from indexer.stores.elasticsearch import ElasticsearchBM25Store

        keywords = InstrumentedStore(ElasticsearchBM25Store(config.es_url, api_key=config.es_api_key),
                                     "elasticsearch")
    elif keyword_store == "edge":
        from indexer.stores.edge import EdgeBM25Store

        keywords = InstrumentedStore(EdgeBM25Store(index / "edge-bm25", windows=vectors if windows_in_one else None),
                                     "qdrant-edge-bm25")
    elif keyword_store == "fts5":
        keywords = InstrumentedStore(SqliteBM25Store(index / "bm25.sqlite"), "sqlite-bm25")
    else:
        raise ValueError(f"TESSERA_KEYWORD_STORE: unknown keyword store {keyword_store!r} (edge or fts5)")
    from indexer.query.rewrite import open_rewriter

    engine = Tessera(open_state(config.state_url, data), InstrumentedStore(vectors, backend), keywords,
                     InstrumentedEmbedder(embedder), images=images, rewriter=open_rewriter(config.rewrite_model),
                     reasoner=reasoner, clarify=config.clarify)
    if reencode == "start":
        # The vector index is gone: a reindex stopped earlier must not resume past what it had written.
        with engine.state.transaction():
            engine.state.set_cursor("reindex", None)
    engine.reencode_needed = reencode is not None
    return engine


#: The data dir's record of the text model that made its vectors.
TEXT_MODEL_MARKER = "text-model"
#: Follows the model in the record while a reindex to it has not finished.
_REENCODING = " reencoding"


def _claim_text_model(data: Path, vector_files: Path, model: str, rebuild: bool) -> str | None:
    """Record which text model (and width) made the data dir's vectors; refuse another, or with ``rebuild``
    drop the vector store's files. "start" or "resume" when the stored turn vectors are another model's
    and a reindex must encode them again; None when they are this model's.

    The state keeps each turn's vector, so the record sits beside it; data dirs from before it are taken
    to be the current model's. Until the reindex that encodes again has finished (``text_model_reencoded``)
    the record says so: another process refuses the half-encoded data dir, and a resumed reindex encodes
    the rest without dropping what it already wrote.
    """
    marker = data / TEXT_MODEL_MARKER
    recorded = marker.read_text().strip() if marker.exists() else None
    if recorded is None:
        _write_marker(marker, model)
        return None
    if recorded == model:
        return None
    if recorded == model + _REENCODING:
        if not rebuild:
            raise ValueError(f"{data}: the reindex that encodes every turn with {model} has not finished:"
                             " run `tessera reindex` to finish it")
        return "resume"
    if not rebuild:
        raise ValueError(f"{data} was indexed with the text model {recorded.removesuffix(_REENCODING)}, not {model}"
                         " (TESSERA_EMBED_MODEL): set it back, or run `tessera reindex --reencode` to encode every"
                         " turn with the new one")
    _drop(vector_files)
    _write_marker(marker, model + _REENCODING)
    return "start"


def text_model_reencoded(data_dir: str | Path) -> None:
    """The reindex that encoded every turn with the recorded model has finished (``tessera reindex``)."""
    marker = Path(data_dir) / TEXT_MODEL_MARKER
    _write_marker(marker, marker.read_text().strip().removesuffix(_REENCODING))


def _write_marker(marker: Path, value: str) -> None:
    """Several worker processes open the same data dir at once: readers never see a half-written marker."""
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp.write_text(value + "\n")
    os.replace(tmp, marker)


def _drop(path: Path) -> None:
    """Delete a store's directory, or its database file with the files SQLite keeps beside it."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        # A stale -wal beside a new database of the same name would be replayed into it.
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


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
        _drop(index / files.get(recorded, recorded))
    if recorded != store or not marker.exists():
        _write_marker(marker, store)


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
