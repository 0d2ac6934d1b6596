"""The whole of Tessera in one object: the ingest path and the query path over one state and two stores.

The embedded CLI and every distributed worker call this same facade; the workers only move its
inputs and outputs between queues. The work itself lives in ``Ingestor`` and ``Searcher``.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import numpy as np

from indexer.encoders.image import ImageBatch, ImageIndexer
from indexer.encoders.text import Embedder
from indexer.ingest.ingestor import Ingestor
from indexer.ingest.segmenter import SegmenterConfig
from indexer.model import ConversationKey, IngestReport
from indexer.query.hybrid import SearchConfig
from indexer.query.rewrite import Rewriter
from indexer.query.searcher import Searcher
from indexer.state import ConversationState
from indexer.stores.base import KeywordStore, VectorStore
from schemas import MessageEvent, QueryJob, ReasonRequest, Result


class Reasoner(Protocol):
    """The fine-grained reasoning stage over recalled candidates (the VLM worker's model)."""

    def answer(self, request: ReasonRequest) -> Result: ...


class Tessera:
    def __init__(self, state: ConversationState, vectors: VectorStore, keywords: KeywordStore, embedder: Embedder,
                 segmenter_config: SegmenterConfig = SegmenterConfig(), search_config: SearchConfig = SearchConfig(),
                 images: ImageIndexer | None = None, rewriter: Rewriter | None = None,
                 reasoner: Reasoner | None = None, clarify: bool = True, time_filters: bool = True):
        self.state = state
        self.vectors = vectors
        self.keywords = keywords
        self.embedder = embedder
        self.images = images
        self.ingestor = Ingestor(state, vectors, keywords, embedder, segmenter_config, images)
        self.searcher = Searcher(state, vectors, keywords, embedder, search_config, images, rewriter, clarify,
                                 time_filters)
        #: In-process reasoning stage (embedded mode); the distributed query task hands off instead.
        self.reasoner = reasoner
        #: The stored turn vectors are another text model's: a reindex must encode again (``open_engine``).
        self.reencode_needed = False

    # ---- ingest (see Ingestor) ------------------------------------------------------------------------

    def encode_events(self, events: Iterable[MessageEvent]) -> dict[str, np.ndarray]:
        return self.ingestor.encode_events(events)

    def ingest(self, events: Iterable[MessageEvent], vectors: dict[str, np.ndarray] | None = None) -> IngestReport:
        return self.ingestor.ingest(events, vectors)

    def apply(self, events: Iterable[MessageEvent]) -> IngestReport:
        return self.ingestor.apply(events)

    def index_pending(self, vectors: dict[str, np.ndarray] | None = None, max_conversations: int | None = None,
                      images: ImageBatch | None = None, only: Sequence[ConversationKey] | None = None,
                      max_texts: int | None = None) -> IngestReport:
        return self.ingestor.index_pending(vectors, max_conversations, images, only, max_texts)

    def delete_conversation(self, tenant_id: str, conversation_id: str) -> IngestReport:
        return self.ingestor.delete_conversation(tenant_id, conversation_id)

    def forget_user(self, tenant_id: str, sender_id: str) -> IngestReport:
        return self.ingestor.forget_user(tenant_id, sender_id)

    def reindex(self, reencode: bool = False, batch: int = 50, progress=None) -> IngestReport:
        return self.ingestor.reindex(reencode, batch, progress)

    def refresh(self) -> None:
        return self.ingestor.refresh()

    def optimize(self, progress=None) -> list[str]:
        return self.ingestor.optimize(progress)

    def replay_parked(self, tenant_id: str, conversation_id: str) -> bool:
        return self.ingestor.replay_parked(tenant_id, conversation_id)

    def drop_parked(self, tenant_id: str, conversation_id: str) -> bool:
        return self.ingestor.drop_parked(tenant_id, conversation_id)

    # ---- query (see Searcher) -------------------------------------------------------------------------

    def answer(self, job: QueryJob, vlm_available: bool = False) -> Result | ReasonRequest:
        return self.searcher.answer(job, vlm_available)

    def query(self, job: QueryJob) -> Result:
        """Answer a job in this process, reasoning stage included."""
        out = self.answer(job, vlm_available=self.reasoner is not None)
        if isinstance(out, ReasonRequest):
            return self.reasoner.answer(out)
        return out

    def warm_up(self) -> None:
        """Load every model and the stores' in-memory copies now, so the first job does not pay for it."""
        for model in (self.embedder, self.images, self.searcher.rewriter, self.reasoner):
            if hasattr(model, "warm_up"):
                model.warm_up()
        self.embedder.encode(["warm up"])
        for store in (self.vectors, self.keywords):
            if hasattr(store, "warm_up"):
                store.warm_up()

    def close(self) -> None:
        if self.images is not None:
            self.images.close()
        self.vectors.close()
        self.keywords.close()
        self.state.close()
