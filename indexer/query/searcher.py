"""The query path: rewrite, time filters, hybrid recall and fusion, spans, and the result or the VLM's work."""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Sequence

import numpy as np

from indexer.encoders.image import ImageIndexer
from indexer.encoders.text import Embedder
from indexer.images import ImageError
from indexer.model import FragmentRecord, SearchFilter, Span, Turn
from indexer.query import timeparse
from indexer.query.clarify import ASK_RATIO, CONSIDER, SpanView, answered_clarification, clarify
from indexer.query.hybrid import Candidate, HybridSearcher, SearchConfig, describe_candidates
from indexer.query.intent import answer_kind, asks_about_asking, asks_for_several
from indexer.query.rewrite import Rewriter, RuleRewriter
from indexer.state import ConversationState
from indexer.stores.base import KeywordStore, VectorStore
from indexer.text import render_turn, snippet, words
from schemas import (
    CandidateImage, CandidateTurn, ClarifyingQuestion, QueryJob, ReasonCandidate, ReasonRequest, Result,
    ResultFragment, ResultImage,
)

#: Query vectors kept per process: the same query text is often asked again (paging, retries).
QUERY_CACHE_SIZE = 1024
#: Fragments handed to the VLM reasoning stage, whatever the job's top_k (it reranks them).
REASON_CANDIDATES = 20


class Searcher:
    def __init__(self, state: ConversationState, vectors: VectorStore, keywords: KeywordStore, embedder: Embedder,
                 search_config: SearchConfig = SearchConfig(), images: ImageIndexer | None = None,
                 rewriter: Rewriter | None = None, clarify: bool = True, time_filters: bool = True):
        self.state = state
        self.embedder = embedder
        self.hybrid = HybridSearcher(vectors, keywords, search_config)
        #: Image query encoders; None: a query by image is refused, words search captions only. An indexer without
        #: an image model (it only reads images' words, ``TESSERA_OCR``) adds no list either.
        self.images = images if images is not None and images.embedder is not None else None
        self.rewriter = rewriter or RuleRewriter()
        self.clarify = clarify
        #: Ask only when the runner-up span is within this share of the best (``clarify.ASK_RATIO``).
        self.ask_ratio = ASK_RATIO
        #: Time expressions of the query become filters (off: they are searched as words).
        self.time_filters = time_filters
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _embed_query(self, text: str) -> np.ndarray:
        vector = self._query_cache.get(text)
        if vector is None:
            vector = self.embedder.encode([text])[0]
            self._query_cache[text] = vector
            if len(self._query_cache) > QUERY_CACHE_SIZE:
                self._query_cache.popitem(last=False)
        else:
            self._query_cache.move_to_end(text)
        return vector

    def _filter(self, job: QueryJob, when: timeparse.TimeConstraint) -> SearchFilter:
        """The job's filters, narrowed by the time its words name (both bounds apply)."""
        f = job.filters
        after = [d.timestamp() for d in (f.sent_after, when.sent_after) if d is not None]
        before = [d.timestamp() for d in (f.sent_before, when.sent_before) if d is not None]
        return SearchFilter(
            tenant_id=job.tenant_id, user_id=job.user_id, conversation_id=f.conversation_id,
            sender_ids=tuple(f.participants or ()), sent_after=max(after) if after else None,
            sent_before=min(before) if before else None,
        )

    def _anchor(self, flt: SearchFilter, when: timeparse.TimeConstraint) -> SearchFilter:
        """Date "before the trip": the time of the turn that best matches the anchor bounds the search."""
        ts = self.hybrid.locate(when.anchor, self._embed_query(when.anchor), flt)
        if ts is None:
            return flt
        slack = timeparse.ANCHOR_SLACK.total_seconds()
        if when.anchor_side == "before":
            bound = ts + slack
            return dataclasses.replace(flt, sent_before=min(bound, flt.sent_before) if flt.sent_before else bound)
        bound = ts - slack
        return dataclasses.replace(flt, sent_after=max(bound, flt.sent_after) if flt.sent_after else bound)

    def answer(self, job: QueryJob, vlm_available: bool = False) -> Result | ReasonRequest:
        """Rewrite, recall, fuse and select spans; returns the result, or the reasoning stage's work.

        With ``vlm_available`` and a job that allows it, the top candidates come back as a
        ``ReasonRequest`` for the VLM; an ambiguous query comes back as a ``clarify`` result.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if job.reasoning == "vlm" and not vlm_available:
            return self._error(job, "reasoning_unavailable",
                               "reasoning 'vlm' needs a VLM reasoning worker (TESSERA_VLM_MODEL on a worker of queue 'reason')")
        text = self.rewriter.rewrite(job.query, job.history) if job.query.strip() else ""
        when = timeparse.parse(text, job.asked_at or datetime.now(timezone.utc)) if self.time_filters \
            else timeparse.TimeConstraint(text=text)
        search_text = when.text if not when.empty else text
        flt = self._filter(job, when)
        timings["rewrite"] = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        if when.anchor:
            flt = self._anchor(flt, when)
        vector = self._embed_query(search_text) if search_text.strip() else None
        image_queries: list[np.ndarray] = []
        if job.image is not None or (self.images is not None and search_text.strip()):
            if self.images is None:
                if vector is None:
                    return self._error(job, "image_search_unavailable",
                                       "image: searching by image needs an image model (TESSERA_IMAGE_MODEL)")
            else:
                if job.image is not None:
                    try:
                        image_queries.append(self.images.embed_query_image(job.image.uri))
                    except ImageError as exc:
                        return self._error(job, f"image_{exc.code}", f"image.uri: {exc}")
                if search_text.strip():
                    image_queries.append(self.images.embed_query_text(search_text))
        timings["embed"] = (time.perf_counter() - t1) * 1000
        t2 = time.perf_counter()
        lists = self.hybrid.recall(search_text, vector, flt, image_queries)
        if not when.empty and not any(lists.values()):
            # The words named a time with nothing in it ("in June" of a year without chats): search
            # without what the words added, keeping the job's own filters.
            flt = self._filter(job, timeparse.TimeConstraint())
            lists = self.hybrid.recall(text, self._embed_query(text) if text.strip() else None, flt, image_queries)
        timings["recall"] = (time.perf_counter() - t2) * 1000
        t3 = time.perf_counter()
        named = self.state.senders_named(job.tenant_id, list(dict.fromkeys(words(search_text))))
        candidates = self.hybrid.fuse(lists, named, job.tenant_id)
        # Feedback and replies read the text of the same leading candidates: one read of the state for both.
        leading = self.hybrid.leading(candidates)
        texts = self._texts(job.tenant_id, leading)
        self.hybrid.feedback(leading, texts)
        kind = answer_kind(search_text)
        self.hybrid.answers(leading, texts, kind)
        reason = vlm_available and job.reasoning != "fast"
        depth = max(job.top_k, REASON_CANDIDATES) if reason else job.top_k
        records = FragmentsOnDemand(self.state, sorted(candidates.values(), key=lambda c: -c.score), chunk=2 * depth)
        questions = self.hybrid.questions(leading, texts)
        records.prefetch([c.fragment_id for c in questions])
        self.hybrid.replies(candidates, questions, records.message_ids, kind)
        if not asks_about_asking(search_text):
            self.hybrid.asking(leading, texts)
        timings["fusion"] = (time.perf_counter() - t3) * 1000
        t4 = time.perf_counter()
        spans = self.hybrid.spans(candidates, records.message_ids, depth, several=asks_for_several(search_text))
        # Whole fragments are read only for what needs their context (the clarifying check, the VLM);
        # a result fragment needs the turns of its span, or reuses the whole fragment already read. Each is
        # one read of the state for every span it needs.
        whole: dict[str, dict[str, Turn]] = {}

        def read_whole(chosen: Sequence[Span]) -> None:
            missing = {span.fragment_id: span.conversation_id for span in chosen if span.fragment_id not in whole}
            if missing:
                whole.update(self._turns_of(job.tenant_id, {
                    fragment_id: (conversation_id, records[fragment_id].message_ids)
                    for fragment_id, conversation_id in missing.items()}))

        question = None
        if self.clarify and not job.filters.conversation_id and not answered_clarification([t.role for t in job.history]):
            considered = spans[:min(job.top_k, CONSIDER)]
            read_whole(considered)
            views = [self._view(span, records[span.fragment_id], whole[span.fragment_id], job.user_id)
                     for span in considered]
            found = clarify(search_text, views, self.ask_ratio)
            if found is not None:
                question = ClarifyingQuestion(text=found.text, options=list(found.options))
        if reason and question is None:
            read_whole(spans)
            timings["fusion"] += (time.perf_counter() - t4) * 1000
            return ReasonRequest(job=job, rewritten_query=text, timings_ms=timings, candidates=[
                self._candidate(span, records[span.fragment_id], whole[span.fragment_id]) for span in spans])
        shown = spans[:job.top_k]
        own = self._turns_of(job.tenant_id, {i: (span.conversation_id, span.message_ids)
                                             for i, span in enumerate(shown) if span.fragment_id not in whole})
        fragments = [self._result_fragment(span, records[span.fragment_id],
                                           whole[span.fragment_id] if span.fragment_id in whole else own[i])
                     for i, span in enumerate(shown)]
        # The CPU span selector is the reasoning stage when no VLM worker takes it.
        timings["reasoning"] = (time.perf_counter() - t4) * 1000
        timings["total"] = (time.perf_counter() - t0) * 1000
        return Result(job_id=job.job_id, status="clarify" if question else "ok", rewritten_query=text,
                      fragments=fragments, clarifying_question=question, reasoned_by="cpu",
                      timings_ms={k: round(v, 3) for k, v in timings.items()})

    @staticmethod
    def _error(job: QueryJob, code: str, message: str) -> Result:
        return Result.failure(job.job_id, code, message)

    def _texts(self, tenant_id: str, candidates) -> dict[tuple[str, str], str]:
        """The rendered text of candidate turns (``HybridSearcher.feedback``, ``answers``, ``questions``)."""
        keys = [(cand.conversation_id, cand.message_id) for cand in candidates]
        return {key: render_turn(turn) for key, turn in self.state.turns_by_key(tenant_id, keys).items()}

    def _turns_of(self, tenant_id: str, wanted: dict) -> dict:
        """The turns of several runs of message ids, in one read of the state: ``wanted`` maps a name to a
        (conversation id, message ids); each name gets its turns by message id."""
        turns = self.state.turns_by_key(tenant_id, [(conversation_id, message_id)
                                                    for conversation_id, message_ids in wanted.values()
                                                    for message_id in message_ids]) if wanted else {}
        return {name: {m: turns[(conversation_id, m)] for m in message_ids if (conversation_id, m) in turns}
                for name, (conversation_id, message_ids) in wanted.items()}

    @staticmethod
    def _view(span: Span, record: FragmentRecord, turns: dict[str, Turn], user_id: str) -> SpanView:
        """What the asking user could recognise: the other people, the date, the images, the words."""
        members = [turns[m] for m in record.message_ids if m in turns]
        chosen = [turns[m] for m in span.message_ids if m in turns]
        return SpanView(
            conversation_id=span.conversation_id, start_at=record.start_at, score=span.score,
            people=tuple(sorted({t.sender_name or t.sender_id for t in members if t.sender_id != user_id})),
            captions=tuple(i.caption for t in chosen for i in t.images if i.caption),
            text=" ".join(t.text for t in chosen))

    @staticmethod
    def _candidate(span: Span, record: FragmentRecord, turns: dict[str, Turn]) -> ReasonCandidate:
        return ReasonCandidate(
            fragment_id=span.fragment_id, conversation_id=span.conversation_id, start_at=record.start_at,
            end_at=record.end_at, score=span.score, span_message_ids=span.message_ids,
            turns=[CandidateTurn(message_id=t.message_id, speaker=t.sender_name or t.sender_id, sent_at=t.sent_at,
                                 text=t.text, images=[CandidateImage(uri=i.uri, caption=i.caption) for i in t.images])
                   for t in (turns[m] for m in record.message_ids if m in turns)])

    def _result_fragment(self, span: Span, record: FragmentRecord, turns: dict[str, Turn]) -> ResultFragment:
        ordered = [turns[m] for m in span.message_ids if m in turns]
        images = [ResultImage.of(t.message_id, n, i.uri, i.caption) for t in ordered for n, i in enumerate(t.images)]
        return ResultFragment(
            fragment_id=span.fragment_id, conversation_id=span.conversation_id, message_ids=span.message_ids,
            context_message_ids=list(record.message_ids), start_at=record.start_at, end_at=record.end_at,
            score=round(span.score, 6), snippet=snippet(" ".join(render_turn(t) for t in ordered)), images=images,
        )


class FragmentsOnDemand:
    """Fragment records of the candidates, read a chunk at a time in the order spans ask for them.

    Spans walk the candidates best-first and stop at ``top_k``: the first few fragments usually
    suffice, where reading every candidate's fragment (about 220 at 100k fragments) took 3.3 of a
    query's 46 ms. A fragment asked for out of order reads the chunks up to it, so the spans are
    the same as with every record read up front. The candidates' fragment ids are learnt a chunk at a
    time too (``describe``): a store may read a hit's payload only when asked.
    """

    def __init__(self, state, ranked: Sequence[Candidate], chunk: int):
        self.state = state
        self.ranked = list(ranked)
        self.learnt = 0
        self.order: list[str] = []
        self.position: dict[str, int] = {}
        self.chunk = max(1, chunk)
        self.read = 0
        self.records: dict[str, FragmentRecord] = {}

    def _learn(self, until: str | None) -> None:
        """Learn the fragment ids of the next candidates, ``chunk`` at a time, until ``until`` is among them (None:
        one chunk) or every candidate is known."""
        while self.learnt < len(self.ranked) and (until is None or until not in self.position):
            batch = self.ranked[self.learnt:self.learnt + self.chunk]
            describe_candidates(batch)
            self.learnt += len(batch)
            for cand in batch:
                if not cand.gone and cand.fragment_id not in self.position:
                    self.position[cand.fragment_id] = len(self.order)
                    self.order.append(cand.fragment_id)
            if until is None:
                return

    def message_ids(self, fragment_id: str) -> tuple[str, ...] | None:
        record = self.get(fragment_id)
        return record.message_ids if record is not None else None

    def prefetch(self, fragment_ids: Sequence[str]) -> None:
        """Read these fragments in one go (replies look at a few fragments further down the candidates)."""
        missing = [fid for fid in dict.fromkeys(fragment_ids) if fid not in self.records]
        if missing:
            self.records.update(self.state.fragments_by_id(missing))

    def get(self, fragment_id: str) -> FragmentRecord | None:
        if fragment_id in self.records:
            return self.records[fragment_id]
        self._learn(fragment_id)
        wanted = self.position.get(fragment_id)
        while wanted is not None and self.read <= wanted:
            while len(self.order) < self.read + self.chunk and self.learnt < len(self.ranked):
                self._learn(None)
            batch = self.order[self.read:self.read + self.chunk]
            self.records.update(self.state.fragments_by_id(batch))
            self.read += len(batch)
        return self.records.get(fragment_id)

    def __getitem__(self, fragment_id: str) -> FragmentRecord:
        record = self.get(fragment_id)
        if record is None:
            raise KeyError(fragment_id)
        return record
