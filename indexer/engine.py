"""The whole of Tessera in one process: apply message events, keep fragments indexed, answer queries.

The embedded CLI and every distributed worker call this same object; the workers only move its
inputs and outputs between queues.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Protocol, Sequence

import numpy as np

from indexer import ids, timeparse
from indexer.clarify import CONSIDER, SpanView, answered_clarification, clarify
from indexer.embedder import Embedder
from indexer.errors import is_transient
from indexer.images import ImageError
from indexer.rewrite import Rewriter, RuleRewriter
from indexer.search import HybridSearcher, SearchConfig, Span
from indexer.segmenter import ImageInfo, SegmenterConfig, Turn, segment
from indexer.state import ConversationState, FragmentRecord, SortKey, Stamp
from indexer.stores.base import EVERYONE, KeywordStore, SearchFilter, Unit, VectorStore
from indexer.text import render_turn, snippet, words
from indexer.vision import ImageBatch, ImageIndexer, turn_image_vector
from schemas import (
    CandidateImage, CandidateTurn, ClarifyingQuestion, MessageEvent, QueryJob, ReasonCandidate, ReasonRequest, Result,
    ResultFragment, ResultImage,
)

#: Query vectors kept per process: the same query text is often asked again (paging, retries).
QUERY_CACHE_SIZE = 1024
#: Fragments handed to the VLM reasoning stage, whatever the job's top_k (it reranks them).
REASON_CANDIDATES = 20
#: Failed indexing attempts after which a conversation is parked instead of being picked first again.
MAX_INDEX_ATTEMPTS = 5

log = logging.getLogger("tessera.engine")


class Reasoner(Protocol):
    """The fine-grained reasoning stage over recalled candidates (the VLM worker's model)."""

    def answer(self, request: ReasonRequest) -> Result: ...


@dataclass
class IngestReport:
    upserted: int = 0
    deleted: int = 0
    unchanged: int = 0
    fragments_written: int = 0
    fragments_deleted: int = 0
    encoded: int = 0
    #: Events older than the version already applied (late edits), ignored.
    stale: int = 0
    images_embedded: int = 0
    #: Conversations whose indexing failed for a reason of their own (retried by later tasks) ...
    index_failures: int = 0
    #: ... and those of them set aside after MAX_INDEX_ATTEMPTS (``tessera dead-letters``).
    parked: int = 0
    #: Images that could not be fetched or decoded, by refusal code; their turns index the caption.
    image_failures: dict[str, int] = field(default_factory=dict)

    def add(self, other: "IngestReport") -> None:
        for name in self.__dataclass_fields__:
            if name == "image_failures":
                for code, n in other.image_failures.items():
                    self.image_failures[code] = self.image_failures.get(code, 0) + n
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _ConversationChange:
    earliest: SortKey | None = None
    full: bool = False
    removed_messages: set[str] = field(default_factory=set)
    changed_messages: set[str] = field(default_factory=set)

    def touch(self, key: SortKey) -> None:
        if self.earliest is None or key < self.earliest:
            self.earliest = key

    def to_dict(self) -> dict:
        return {"earliest": list(self.earliest) if self.earliest else None, "full": self.full,
                "removed": sorted(self.removed_messages), "changed": sorted(self.changed_messages)}

    @classmethod
    def from_dict(cls, data: dict) -> "_ConversationChange":
        earliest = tuple(data["earliest"]) if data.get("earliest") else None
        return cls(earliest, bool(data.get("full")), set(data.get("removed", ())), set(data.get("changed", ())))

    @classmethod
    def merge(cls, older: dict, newer: dict) -> dict:
        """Two pending changes of one conversation as one; the newer wins on each message."""
        a, b = cls.from_dict(older), cls.from_dict(newer)
        if b.earliest is not None:
            a.touch(b.earliest)
        a.full = a.full or b.full
        a.changed_messages = (a.changed_messages - b.removed_messages) | b.changed_messages
        a.removed_messages = (a.removed_messages - b.changed_messages) | b.removed_messages
        return a.to_dict()


def _key(turn: Turn) -> SortKey:
    return (turn.sent_at.timestamp(), turn.message_id)


def turn_of_event(event: MessageEvent) -> Turn:
    return Turn(
        message_id=event.message_id, sender_id=event.sender_id, sender_name=event.sender_name,
        sent_at=event.sent_at, text=event.text,
        images=tuple(ImageInfo(i.uri, i.caption) for i in event.images),
    )


def _unit_vector(vectors: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    v = np.average(np.stack(vectors), axis=0, weights=weights).astype(np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class Tessera:
    def __init__(self, state: ConversationState, vectors: VectorStore, keywords: KeywordStore, embedder: Embedder,
                 segmenter_config: SegmenterConfig = SegmenterConfig(), search_config: SearchConfig = SearchConfig(),
                 images: ImageIndexer | None = None, rewriter: Rewriter | None = None,
                 reasoner: Reasoner | None = None, clarify: bool = True, time_filters: bool = True):
        self.state = state
        self.vectors = vectors
        self.keywords = keywords
        self.embedder = embedder
        self.segmenter_config = segmenter_config
        self.searcher = HybridSearcher(vectors, keywords, search_config)
        #: Image fetching and embedding; None: images count through their captions only.
        self.images = images
        self.rewriter = rewriter or RuleRewriter()
        #: In-process reasoning stage (embedded mode); the distributed query task hands off instead.
        self.reasoner = reasoner
        self.clarify = clarify
        #: Time expressions of the query become filters (off: they are searched as words).
        self.time_filters = time_filters
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    # ---- ingest -------------------------------------------------------------------------------------

    def encode_events(self, events: Iterable[MessageEvent]) -> dict[str, np.ndarray]:
        """Vectors of the texts the upserts in ``events`` will index, keyed by that text.

        Pure (reads no state), so a caller can encode the next batch while ``ingest`` writes the
        previous one: the encoder then never waits for the stores.
        """
        return self.encode_texts([render_turn(turn_of_event(e)) for e in events if e.op == "upsert"])

    def encode_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        unique = list(dict.fromkeys(texts))
        return dict(zip(unique, self.embedder.encode(unique))) if unique else {}

    def ingest(self, events: Iterable[MessageEvent], vectors: dict[str, np.ndarray] | None = None) -> IngestReport:
        """Apply a batch of events and index what they changed; idempotent, so a replay changes nothing.

        ``vectors`` may carry encodings from ``encode_events``; whatever is missing is encoded here.
        """
        report = self.apply(events)
        report.add(self.index_pending(vectors))
        return report

    def apply(self, events: Iterable[MessageEvent]) -> IngestReport:
        """Write the events into the conversation state and mark their conversations for indexing.

        The result depends on the set of events, not on their order or repetition: each write is
        decided by the event's stamp ``(version, event_id)`` against the stored one, a delete leaves
        a tombstone no upsert undoes, and a participant list counts only if its stamp is the newest.
        The marks are durable: a crash before ``index_pending`` leaves them for the next call.
        """
        by_conversation: dict[tuple[str, str], list[MessageEvent]] = {}
        for event in events:
            by_conversation.setdefault((event.tenant_id, event.conversation_id), []).append(event)
        report = IngestReport()
        with self.state.transaction():
            self.state.lock_conversations(by_conversation)
            for conv, batch in by_conversation.items():
                change = self._apply_conversation(conv, batch, report)
                if change.earliest is not None or change.full:
                    self.state.merge_pending(*conv, change.to_dict(), _ConversationChange.merge)
        return report

    def _apply_conversation(self, conv: tuple[str, str], events: list[MessageEvent],
                            report: IngestReport) -> _ConversationChange:
        """Fold one conversation's events into its stored rows: three reads, then the writes in bulk."""
        change = _ConversationChange()
        meta = self.state.conversation(*conv)
        listed, list_stamp = (meta.participants, meta.participants_stamp) if meta else (None, None)
        for e in events:
            if e.participants is not None and (list_stamp is None or (e.version, e.event_id) > list_stamp):
                listed, list_stamp = sorted(set(e.participants)), (e.version, e.event_id)
        if meta is None or list_stamp != meta.participants_stamp:
            self.state.set_participants(*conv, listed, list_stamp)
            # Visibility is part of every unit's payload: rewrite the whole conversation.
            change.full = meta is not None and listed != meta.participants
        erased = meta.erased_before if meta else None
        message_ids = list(dict.fromkeys(e.message_id for e in events))
        stored = self.state.stored_turns(*conv, message_ids)
        dead = self.state.tombstones(*conv, message_ids)
        current = dict(stored)
        new_tombstones: dict[str, Stamp] = {}
        for e in events:
            stamp = (e.version, e.event_id)
            if e.message_id in dead or (erased is not None and e.sent_at.timestamp() <= erased):
                report.unchanged += 1
                continue
            if e.op == "delete":
                dead.add(e.message_id)
                new_tombstones[e.message_id] = stamp
                if current.pop(e.message_id, None) is None:
                    report.unchanged += 1
                else:
                    report.deleted += 1
                continue
            previous = current.get(e.message_id)
            if previous is not None and previous[0] >= stamp:
                if previous[0] == stamp:
                    report.unchanged += 1
                else:
                    report.stale += 1
                continue
            turn = turn_of_event(e)
            if previous is not None and previous[1] == turn:
                # The same content under a newer stamp (a re-sent edit): the stamp moves, the vectors stay.
                turn = dataclasses.replace(turn, vector=previous[1].vector, image_vector=previous[1].image_vector)
                report.unchanged += 1
            else:
                report.upserted += 1
            current[e.message_id] = (stamp, turn, e.reply_to)
        removed = [m for m in stored if m not in current]
        written = [m for m in current if m not in stored or current[m][0] != stored[m][0]]
        self.state.put_tombstones(*conv, sorted(new_tombstones.items()))
        self.state.delete_turns(*conv, removed)
        self.state.put_turns(*conv, [(current[m][1], current[m][2], current[m][0]) for m in written])
        for m in removed:
            change.touch(_key(stored[m][1]))
            change.removed_messages.add(m)
        for m in written:
            turn = current[m][1]
            if m in stored and stored[m][1] == turn:
                continue
            change.touch(_key(turn))
            if m in stored:
                change.touch(_key(stored[m][1]))
            change.changed_messages.add(m)
        return change

    def pending_texts(self, max_conversations: int | None = None) -> list[str]:
        """Texts of turns waiting for a vector, for encoding outside the write lock."""
        texts = []
        for tenant_id, conversation_id, _ in self.state.pending(max_conversations):
            texts += [render_turn(t) for t in self.state.turns_without_vector(tenant_id, conversation_id)]
        return list(dict.fromkeys(texts))

    def pending_image_uris(self, max_conversations: int | None = None) -> list[str]:
        """Image URIs of turns waiting for a vector, to fetch and embed outside the write lock."""
        if self.images is None:
            return []
        uris = []
        for tenant_id, conversation_id, _ in self.state.pending(max_conversations):
            uris += [i.uri for t in self.state.turns_without_vector(tenant_id, conversation_id) for i in t.images]
        return list(dict.fromkeys(uris))

    def embed_images(self, uris: Sequence[str]) -> ImageBatch:
        return self.images.embed_uris(uris) if self.images is not None and uris else ImageBatch()

    def index_pending(self, vectors: dict[str, np.ndarray] | None = None,
                      max_conversations: int | None = None, images: ImageBatch | None = None,
                      only: Sequence[tuple[str, str]] | None = None) -> IngestReport:
        """Encode, re-segment and index the conversations marked by ``apply`` (``only``: of these).

        One transaction on the state, holding each conversation it indexes: a conversation another
        worker is indexing (or applying events to) is skipped, its mark left for the next task.
        ``images`` may carry image vectors from ``embed_images``; images still missing are fetched here.
        """
        report = IngestReport()
        known = vectors or {}
        images = images or ImageBatch()
        with self.state.transaction():
            candidates = self.state.pending(max_conversations * 4 if max_conversations else None, only)
            taken: list[tuple[str, str]] = []
            for tenant_id, conversation_id, _ in candidates:
                if max_conversations and len(taken) >= max_conversations:
                    break
                if self.state.try_lock_conversation(tenant_id, conversation_id):
                    taken.append((tenant_id, conversation_id))
            # Read again under the locks: a worker that finished meanwhile has cleared its marks.
            pending = self.state.pending(only=taken)
            waiting = [(tenant_id, conversation_id, turn) for tenant_id, conversation_id, _ in pending
                       for turn in self.state.turns_without_vector(tenant_id, conversation_id)]
            texts = [render_turn(t) for _, _, t in waiting]
            missing = list(dict.fromkeys(t for t in texts if t not in known))
            fresh = dict(zip(missing, self.embedder.encode(missing))) if missing else {}
            if self.images is not None:
                uris = list(dict.fromkeys(i.uri for _, _, t in waiting for i in t.images))
                todo = [u for u in uris if u not in images.vectors and u not in images.failures]
                extra = self.embed_images(todo)
                images = ImageBatch({**images.vectors, **extra.vectors}, {**images.failures, **extra.failures})
                report.images_embedded += sum(1 for u in uris if u in images.vectors)
                for uri in uris:
                    if uri in images.failures:
                        code = images.failures[uri]
                        report.image_failures[code] = report.image_failures.get(code, 0) + 1
            encoded: dict[tuple[str, str], list] = {}
            for (tenant_id, conversation_id, turn), text in zip(waiting, texts):
                vector = known[text] if text in known else fresh[text]
                image_vector = turn_image_vector([i.uri for i in turn.images], images.vectors)
                encoded.setdefault((tenant_id, conversation_id), []).append((turn.message_id, vector, image_vector))
            for conv, rows in encoded.items():
                self.state.set_vectors(*conv, rows)
            report.encoded += len(missing)
            for tenant_id, conversation_id, change in pending:
                try:
                    with self.state.savepoint():
                        report.add(self._resegment(tenant_id, conversation_id, _ConversationChange.from_dict(change)))
                        self.state.clear_pending(tenant_id, conversation_id)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    # This conversation's fault (a document a store refuses): the others go on.
                    reason = f"{type(exc).__name__}: {exc}"
                    attempts = self.state.record_failure(tenant_id, conversation_id, reason, MAX_INDEX_ATTEMPTS)
                    report.index_failures += 1
                    report.parked += attempts >= MAX_INDEX_ATTEMPTS
                    log.warning("indexing %s/%s failed (attempt %d of %d): %s", tenant_id, conversation_id,
                                attempts, MAX_INDEX_ATTEMPTS, reason)
        return report

    def replay_parked(self, tenant_id: str, conversation_id: str) -> bool:
        """Index a parked conversation again (after the cause was fixed); True when it is indexed now."""
        with self.state.transaction():
            if not self.state.unpark(tenant_id, conversation_id):
                return False
        self.index_pending(only=[(tenant_id, conversation_id)])
        return not self.state.pending(only=[(tenant_id, conversation_id)]) and not any(
            (p.tenant_id, p.conversation_id) == (tenant_id, conversation_id) for p in self.state.parked())

    def drop_parked(self, tenant_id: str, conversation_id: str) -> bool:
        with self.state.transaction():
            return self.state.drop_parked(tenant_id, conversation_id)

    def _resegment(self, tenant_id: str, conversation_id: str, change: _ConversationChange) -> IngestReport:
        """Re-run segmentation from the first fragment the change can touch and sync the stores."""
        report = IngestReport()
        old_fragments = self.state.fragments(tenant_id, conversation_id)
        start: SortKey | None = None
        if not change.full and change.earliest is not None:
            for fragment in old_fragments:
                if fragment.start_key <= change.earliest:
                    start = fragment.start_key
        affected_old = [f for f in old_fragments if start is None or f.start_key >= start]
        turns = self.state.turns(tenant_id, conversation_id, start)
        participants = self.state.participants(tenant_id, conversation_id)
        visible_to = participants if participants else [EVERYONE]
        groups = segment(turns, render_turn, self.segmenter_config)
        old_by_id = {f.fragment_id: f for f in affected_old}
        units: list[Unit] = []
        written: list[FragmentRecord] = []
        new_ids = set()
        # One number per rewrite, larger than any before: a store with external versions (Elasticsearch)
        # keeps the newest write of each unit whatever order the writes reach it in.
        version = self.state.next_version()
        for group in groups:
            members = [turns[i] for i in group]
            record = FragmentRecord(
                ids.fragment_id(tenant_id, conversation_id, members[0].message_id), tenant_id, conversation_id,
                tuple(t.message_id for t in members), members[0].sent_at, members[-1].sent_at)
            new_ids.add(record.fragment_id)
            previous = old_by_id.get(record.fragment_id)
            if (not change.full and previous == record
                    and not change.changed_messages.intersection(record.message_ids)):
                continue
            written.append(record)
            units.extend(self.fragment_units(record, members, visible_to, version))
            report.fragments_written += 1
        stale = [f.fragment_id for f in affected_old if f.fragment_id not in new_ids]
        gone = [ids.turn_unit_id(tenant_id, conversation_id, m, kind)
                for m in change.removed_messages for kind in ("turn", "window")]
        self.state.put_fragments(written)
        self.state.delete_fragments(stale)
        removed = stale + gone
        if removed:
            self.vectors.delete(removed)
            self.keywords.delete(removed)
        if units:
            self.vectors.upsert(units)
            self.keywords.upsert(units)
        report.fragments_deleted += len(stale)
        return report

    def fragment_units(self, fragment: FragmentRecord, members: Sequence[Turn], visible_to: list[str],
                       version: int = 0) -> list[Unit]:
        """The units ingest indexes for one fragment: the fragment, and a turn and a window per member."""
        texts = [render_turn(t) for t in members]
        vecs = [t.vector for t in members]
        common = dict(tenant_id=fragment.tenant_id, conversation_id=fragment.conversation_id,
                      fragment_id=fragment.fragment_id, visible_to=list(visible_to), version=version)
        units = [Unit(fragment.fragment_id, "fragment", message_ids=list(fragment.message_ids),
                      sender_ids=sorted({t.sender_id for t in members}), start_ts=fragment.start_at.timestamp(),
                      end_ts=fragment.end_at.timestamp(), text="\n".join(texts), vector=_unit_vector(vecs), **common)]
        for i, turn in enumerate(members):
            ts = turn.sent_at.timestamp()
            base = dict(message_ids=[turn.message_id], sender_ids=[turn.sender_id], start_ts=ts, end_ts=ts, **common)
            units.append(Unit(ids.turn_unit_id(fragment.tenant_id, fragment.conversation_id, turn.message_id, "turn"),
                              "turn", text=texts[i], vector=turn.vector, image_vector=turn.image_vector, **base))
            lo, hi = max(0, i - 1), min(len(members), i + 2)
            # The turn itself counts twice: the window adds context without drowning the turn.
            weights = [2.0 if j == i else 1.0 for j in range(lo, hi)]
            units.append(Unit(ids.turn_unit_id(fragment.tenant_id, fragment.conversation_id, turn.message_id, "window"),
                              "window", text=" ".join(texts[lo:hi]), vector=_unit_vector(vecs[lo:hi], weights), **base))
        return units

    def delete_conversation(self, tenant_id: str, conversation_id: str) -> IngestReport:
        """Erase a conversation of one tenant from every store; its messages stay erased if replayed."""
        report = IngestReport()
        with self.state.transaction():
            self.state.lock_conversations([(tenant_id, conversation_id)])
            fragments = self.state.fragments(tenant_id, conversation_id)
            turns = self.state.turns(tenant_id, conversation_id)
            removed = [f.fragment_id for f in fragments] + [
                ids.turn_unit_id(tenant_id, conversation_id, t.message_id, kind) for t in turns for kind in ("turn", "window")]
            if removed:
                self.vectors.delete(removed)
                self.keywords.delete(removed)
            # Events delivered after the erasure but sent before it stay erased.
            latest = max((t.sent_at.timestamp() for t in turns), default=0.0)
            self.state.erase_conversation(tenant_id, conversation_id, max(time.time(), latest))
            report.deleted += len(turns)
            report.fragments_deleted += len(fragments)
        self._erase_physically()
        return report

    def _erase_physically(self) -> None:
        """After an erasure, no copy of the erased text may remain in any file of any store."""
        self.keywords.compact()
        self.vectors.compact()
        self.state.checkpoint()

    def forget_user(self, tenant_id: str, sender_id: str) -> IngestReport:
        """Delete every message a user sent in a tenant ("forget me"), at any moment of indexing.

        The user's turns get tombstones (a replay never brings them back); every indexed unit that
        holds their text leaves the stores at once; the rest of each conversation is re-segmented
        (and any turn still waiting for its vector encoded) right after.
        """
        report = IngestReport()
        with self.state.transaction():
            conversations = self.state.conversations_of_sender(tenant_id, sender_id)
            self.state.lock_conversations([(tenant_id, c) for c in conversations])
            for conversation_id in conversations:
                message_ids = set(self.state.message_ids_of_sender(tenant_id, conversation_id, sender_id))
                holding = [f for f in self.state.fragments(tenant_id, conversation_id)
                           if message_ids.intersection(f.message_ids)]
                removed = [f.fragment_id for f in holding] + [
                    ids.turn_unit_id(tenant_id, conversation_id, m, kind) for m in sorted(message_ids)
                    for kind in ("turn", "window")]
                # Window units of the neighbours read the erased turns too.
                neighbours = {m for f in holding for m in f.message_ids} - message_ids
                removed += [ids.turn_unit_id(tenant_id, conversation_id, m, "window") for m in sorted(neighbours)]
                self.vectors.delete(removed)
                self.keywords.delete(removed)
                self.state.delete_fragments([f.fragment_id for f in holding])
                now = time.time()
                self.state.put_tombstones(tenant_id, conversation_id, [(m, (now, "forgotten")) for m in sorted(message_ids)])
                self.state.delete_turns(tenant_id, conversation_id, sorted(message_ids))
                report.deleted += len(message_ids)
                report.fragments_deleted += len(holding)
                change = _ConversationChange(full=True, removed_messages=message_ids)
                self.state.merge_pending(tenant_id, conversation_id, change.to_dict(), _ConversationChange.merge)
            self.state.forget_sender_tokens(tenant_id, sender_id)
        report.add(self.index_pending(only=[(tenant_id, c) for c in conversations]))
        self._erase_physically()
        return report

    def reindex(self, reencode: bool = False, batch: int = 50, progress=None) -> IngestReport:
        """Rebuild both indexes from the state (after a lost cluster, a mapping or an encoder change).

        Walks the conversations in order and records how far it got in the state, so a run that
        stops resumes where it was. ``reencode`` drops the stored vectors first (new encoder).
        ``progress(n)`` is told of each conversation done.
        """
        report = IngestReport()
        cursor = self.state.get_cursor("reindex")
        while True:
            with self.state.transaction():
                batch_keys = self.state.conversations(cursor, batch)
                if not batch_keys:
                    self.state.set_cursor("reindex", None)
                    break
                self.state.lock_conversations(batch_keys)
                for key in batch_keys:
                    if reencode:
                        self.state.clear_vectors(*key)
                    self.state.merge_pending(*key, _ConversationChange(full=True).to_dict(), _ConversationChange.merge)
            report.add(self.index_pending(only=batch_keys))
            cursor = batch_keys[-1]
            with self.state.transaction():
                self.state.set_cursor("reindex", cursor)
            if progress is not None:
                progress(len(batch_keys))
        self.vectors.refresh()
        self.keywords.refresh()
        return report

    # ---- query --------------------------------------------------------------------------------------

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

    def query(self, job: QueryJob) -> Result:
        """Answer a job in this process, reasoning stage included."""
        out = self.answer(job, vlm_available=self.reasoner is not None)
        if isinstance(out, ReasonRequest):
            return self.reasoner.answer(out)
        return out

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
        ts = self.searcher.locate(when.anchor, self._embed_query(when.anchor), flt)
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
        lists = self.searcher.recall(search_text, vector, flt, image_queries)
        if not when.empty and not any(lists.values()):
            # The words named a time with nothing in it ("in June" of a year without chats): search
            # without what the words added, keeping the job's own filters.
            flt = self._filter(job, timeparse.TimeConstraint())
            lists = self.searcher.recall(text, self._embed_query(text) if text.strip() else None, flt, image_queries)
        timings["recall"] = (time.perf_counter() - t2) * 1000
        t3 = time.perf_counter()
        named = self.state.senders_named(job.tenant_id, list(dict.fromkeys(words(search_text))))
        candidates = self.searcher.fuse(lists, named)
        timings["fusion"] = (time.perf_counter() - t3) * 1000
        t4 = time.perf_counter()
        reason = vlm_available and job.reasoning != "fast"
        fragment_ids = list(dict.fromkeys(c.fragment_id for c in sorted(candidates.values(), key=lambda c: -c.score)))
        records = self.state.fragments_by_id(fragment_ids)
        depth = max(job.top_k, REASON_CANDIDATES) if reason else job.top_k
        spans = self.searcher.spans(candidates, {fid: r.message_ids for fid, r in records.items()}, depth)
        # Whole fragments are read only for what needs their context (the clarifying check, the VLM);
        # a result fragment needs the turns of its span, or reuses the whole fragment already read.
        whole: dict[str, dict[str, Turn]] = {}

        def context(span: Span) -> dict[str, Turn]:
            if span.fragment_id not in whole:
                whole[span.fragment_id] = self.state.turns_by_id(job.tenant_id, span.conversation_id,
                                                                 records[span.fragment_id].message_ids)
            return whole[span.fragment_id]

        question = None
        if self.clarify and not job.filters.conversation_id and not answered_clarification([t.role for t in job.history]):
            views = [self._view(span, records[span.fragment_id], context(span), job.user_id)
                     for span in spans[:min(job.top_k, CONSIDER)]]
            found = clarify(search_text, views)
            if found is not None:
                question = ClarifyingQuestion(text=found.text, options=list(found.options))
        if reason and question is None:
            timings["fusion"] += (time.perf_counter() - t4) * 1000
            return ReasonRequest(job=job, rewritten_query=text, timings_ms=timings, candidates=[
                self._candidate(span, records[span.fragment_id], context(span)) for span in spans])
        fragments = [self._result_fragment(span, records[span.fragment_id], whole.get(span.fragment_id) or
                                           self.state.turns_by_id(job.tenant_id, span.conversation_id, span.message_ids))
                     for span in spans[:job.top_k]]
        # The CPU span selector is the reasoning stage when no VLM worker takes it.
        timings["reasoning"] = (time.perf_counter() - t4) * 1000
        timings["total"] = (time.perf_counter() - t0) * 1000
        return Result(job_id=job.job_id, status="clarify" if question else "ok", rewritten_query=text,
                      fragments=fragments, clarifying_question=question, reasoned_by="cpu",
                      timings_ms={k: round(v, 3) for k, v in timings.items()})

    @staticmethod
    def _error(job: QueryJob, code: str, message: str) -> Result:
        return Result.failure(job.job_id, code, message)

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

    def warm_up(self) -> None:
        """Load the encoder and the in-memory search copies, then take them out of the collector's scans.

        A serving process holds millions of long-lived objects (the model, the index); without
        ``gc.freeze`` every full collection walks them and stalls a query by hundreds of ms at 10k
        fragments (measured with ``tessera bench``). NumPy's BLAS gets one thread: its threads spin
        after each small search matmul and took the cores from the query encoder (a 10 ms query
        embedding took 75 ms at 100k fragments).
        """
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        for model in (self.embedder, self.images, self.rewriter, self.reasoner):
            if hasattr(model, "warm_up"):
                model.warm_up()
        self.embedder.encode(["warm up"])
        for store in (self.vectors, self.keywords):
            if hasattr(store, "warm_up"):
                store.warm_up()
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        if self.images is not None:
            self.images.close()
        self.vectors.close()
        self.keywords.close()
        self.state.close()

