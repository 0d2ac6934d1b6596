"""The ingest path: apply events to the conversation state, then re-segment and index what changed.

Applying is durable and cheap (one transaction of state writes); indexing encodes the turns still
without a vector, re-runs segmentation from the first fragment a change can touch and syncs both
stores. The two halves run in different tasks of a fleet, and a crash between them loses nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterable, Sequence

import numpy as np

from indexer import ids
from indexer.encoders.image import ImageBatch, ImageIndexer, turn_image_vector
from indexer.encoders.text import Embedder
from indexer.errors import is_transient
from indexer.ingest.aliases import fragment_aliases
from indexer.ingest.changes import PendingChange, fold_conversation
from indexer.ingest.segmenter import SegmenterConfig, segment
from indexer.ingest.units import fragment_units, keyword_units, turn_of_event, vector_units
from indexer.model import EVERYONE, FragmentRecord, IngestReport, SortKey, Turn, Unit
from indexer.state import ConversationState
from indexer.stores.base import KeywordStore, VectorStore
from indexer.text import render_turn
from schemas import MessageEvent

#: Failed indexing attempts after which a conversation is parked instead of being picked first again.
MAX_INDEX_ATTEMPTS = 5

log = logging.getLogger("tessera.ingest")


class Ingestor:
    def __init__(self, state: ConversationState, vectors: VectorStore, keywords: KeywordStore, embedder: Embedder,
                 segmenter_config: SegmenterConfig = SegmenterConfig(), images: ImageIndexer | None = None):
        self.state = state
        self.vectors = vectors
        self.keywords = keywords
        self.embedder = embedder
        self.segmenter_config = segmenter_config
        #: Image fetching and embedding; None: images count through their captions only.
        self.images = images

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
                change = fold_conversation(self.state, conv, batch, report)
                if change.earliest is not None or change.full:
                    self.state.merge_pending(*conv, change.to_dict(), PendingChange.merge)
        return report

    def pending_work(self, max_conversations: int | None = None,
                     max_texts: int | None = None) -> tuple[list[str], list[str]]:
        """Texts and image URIs of the turns waiting for a vector, read once as ``index_pending`` takes them, for
        encoding and fetching outside the write lock."""
        waiting: list[Turn] = []
        for tenant_id, conversation_id, _ in self.state.pending(max_conversations):
            turns = self.state.turns_without_vector(tenant_id, conversation_id)
            if not _fits(len(waiting), len(turns), max_texts):
                break
            waiting += turns[:max_texts]
        texts = list(dict.fromkeys(render_turn(t) for t in waiting))
        uris = list(dict.fromkeys(i.uri for t in waiting for i in t.images)) if self.images is not None else []
        return texts, uris

    def embed_images(self, uris: Sequence[str]) -> ImageBatch:
        return self.images.embed_uris(uris) if self.images is not None and uris else ImageBatch()

    def index_pending(self, vectors: dict[str, np.ndarray] | None = None,
                      max_conversations: int | None = None, images: ImageBatch | None = None,
                      only: Sequence[tuple[str, str]] | None = None, max_texts: int | None = None) -> IngestReport:
        """Encode, re-segment and index the conversations marked by ``apply`` (``only``: of these).

        One transaction on the state, holding each conversation it indexes: a conversation another
        worker is indexing (or applying events to) is skipped, its mark left for the next task.
        ``images`` may carry image vectors from ``embed_images``; images still missing are fetched here.
        ``max_texts`` bounds the turns one call encodes, so that an embed task ends inside its time limit
        whatever the backlog: conversations are taken, oldest mark first, while their waiting turns fit,
        and a first one with more keeps the vectors of its first ``max_texts`` and stays marked, so that
        every call makes progress.
        """
        report = IngestReport()
        known = vectors or {}
        images = images or ImageBatch()
        with self.state.transaction():
            candidates = self.state.pending(max_conversations * 4 if max_conversations else None, only)
            pending: list[tuple[str, str, dict]] = []
            waiting: list[tuple[str, str, Turn]] = []
            sliced = None
            for tenant_id, conversation_id, _ in candidates:
                if max_conversations and len(pending) >= max_conversations:
                    report.deferred += 1
                    break
                if not self.state.try_lock_conversation(tenant_id, conversation_id):
                    continue
                # Read again under the lock: a worker that finished meanwhile has cleared the mark.
                mark = self.state.pending(only=[(tenant_id, conversation_id)])
                if not mark:
                    continue
                turns = self.state.turns_without_vector(tenant_id, conversation_id)
                if not _fits(len(waiting), len(turns), max_texts):
                    report.deferred += 1
                    break
                if max_texts is not None and len(turns) > max_texts:
                    turns, sliced = turns[:max_texts], (tenant_id, conversation_id)
                pending += mark
                waiting += [(tenant_id, conversation_id, t) for t in turns]
            if self.images is not None:
                uris = list(dict.fromkeys(i.uri for _, _, t in waiting for i in t.images))
                todo = [u for u in uris if u not in images.vectors and u not in images.failures]
                images = images.merged(self.embed_images(todo))
                report.images_embedded += sum(1 for u in uris if u in images.vectors)
                report.images_read += sum(1 for u in uris if u in images.texts)
                for uri in uris:
                    if uri in images.failures:
                        code = images.failures[uri]
                        report.image_failures[code] = report.image_failures.get(code, 0) + 1
                waiting = self._with_image_texts(waiting, images.texts)
            # Rendered after the images were read: the turn's vector encodes the words its images show.
            texts = [render_turn(t) for _, _, t in waiting]
            missing = list(dict.fromkeys(t for t in texts if t not in known))
            fresh = dict(zip(missing, self.embedder.encode(missing))) if missing else {}
            encoded: dict[tuple[str, str], list] = {}
            for (tenant_id, conversation_id, turn), text in zip(waiting, texts):
                vector = known[text] if text in known else fresh[text]
                image_vector = turn_image_vector([i.uri for i in turn.images], images.vectors)
                encoded.setdefault((tenant_id, conversation_id), []).append((turn.message_id, vector, image_vector))
            for conv, rows in encoded.items():
                self.state.set_vectors(*conv, rows)
            report.encoded += len(missing)
            for tenant_id, conversation_id, change in pending:
                if (tenant_id, conversation_id) == sliced:
                    report.deferred += 1  # re-segmented once every turn has its vector
                    continue
                try:
                    with self.state.savepoint():
                        report.add(self._resegment(tenant_id, conversation_id, PendingChange.from_dict(change)))
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

    def _with_image_texts(self, waiting: list, texts: dict[str, str]) -> list:
        """The waiting turns with the words read off their images (``ImageBatch.texts``), kept in the state so that
        a re-segmentation indexes them without reading the images again."""
        if not texts:
            return waiting
        out, read = [], {}
        for tenant_id, conversation_id, turn in waiting:
            images = tuple(dataclasses.replace(i, text=texts[i.uri]) if i.uri in texts else i for i in turn.images)
            if images != turn.images:
                turn = dataclasses.replace(turn, images=images)
                read.setdefault((tenant_id, conversation_id), []).append((turn.message_id, images))
            out.append((tenant_id, conversation_id, turn))
        for conv, turns in read.items():
            self.state.set_images(*conv, turns)
        return out

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

    def _resegment(self, tenant_id: str, conversation_id: str, change: PendingChange) -> IngestReport:
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
        aliases: dict[str, list[tuple[str, str]]] = {}
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
            aliases[record.fragment_id] = fragment_aliases(members)
            units.extend(fragment_units(record, members, visible_to, version))
            report.fragments_written += 1
        stale = [f.fragment_id for f in affected_old if f.fragment_id not in new_ids]
        gone = [ids.turn_unit_id(tenant_id, conversation_id, m, kind)
                for m in change.removed_messages for kind in ("turn", "window")]
        self.state.put_fragments(written)
        self.state.put_sender_aliases(tenant_id, conversation_id, aliases)
        self.state.delete_fragments(stale)
        # A data dir written before fragments stopped being units holds one per fragment (``units``): a rewritten
        # fragment's would keep the text it had, deleted messages included.
        removed = stale + [r.fragment_id for r in written] + gone
        if removed:
            self.vectors.delete(removed)
            self.keywords.delete(removed)
        if units:
            self.write_units(units)
        report.fragments_deleted += len(stale)
        return report

    def write_units(self, units: Sequence[Unit]) -> None:
        """Both indexes: the vector stores what search reads (``vector_units``), the keyword stores the text
        as chat search sees it (``keyword_units``). A turn the vector store does not take now may be there
        from before (its image edited away, or a data dir indexed when every turn was): its point goes, or
        image search would find it by a picture no longer in the chat, under the visibility of then."""
        indexed = vector_units(units)
        if len(indexed) < len(units):
            kept = {u.unit_id for u in indexed}
            self.vectors.delete([u.unit_id for u in units if u.unit_id not in kept])
        self.vectors.upsert(indexed)
        self.keywords.upsert(keyword_units(units))

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
                change = PendingChange(full=True, removed_messages=message_ids)
                self.state.merge_pending(tenant_id, conversation_id, change.to_dict(), PendingChange.merge)
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
                    self.state.merge_pending(*key, PendingChange(full=True).to_dict(), PendingChange.merge)
            report.add(self.index_pending(only=batch_keys))
            cursor = batch_keys[-1]
            with self.state.transaction():
                self.state.set_cursor("reindex", cursor)
            if progress is not None:
                progress(len(batch_keys))
        self.refresh()
        return report

    def refresh(self) -> None:
        """The end of a bulk load: both stores' ``refresh`` (every write visible, nothing left appendable)."""
        self.vectors.refresh()
        self.keywords.refresh()

    def optimize(self, progress=None) -> list[str]:
        """Both stores' ``optimize`` where they have one (the embedded engine's); returns what each optimized."""
        done = []
        for name, store in (("vectors", self.vectors), ("keywords", self.keywords)):
            optimize = getattr(store, "optimize", None)
            if optimize is not None:
                done += [f"{name}:{kind}" for kind in optimize(progress)]
        return done


def _fits(taken: int, more: int, max_texts: int | None) -> bool:
    """Whether a conversation with ``more`` waiting turns joins ``taken`` ones; the first always does."""
    return max_texts is None or taken == 0 or taken + more <= max_texts
