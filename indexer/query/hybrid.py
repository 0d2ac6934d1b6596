"""Hybrid recall and CPU span selection.

Three ranked lists are recalled inside the stores, all under the same tenant and visibility filter:
BM25 over turns, and BM25 and dense over windows (a turn read with its fragment neighbours). A fragment's
own relevance comes from its best turns in the turn-level lists (``fragment_turns``), not from lists over
whole fragments: on the dev split those two lists (BM25 and dense over fragment texts and mean vectors)
gave recall@10 / MRR / span F1 0.813 / 0.636 / 0.487 against 0.813 / 0.640 / 0.489 from the turns' hits
(messy chat 0.792 / 0.630 / 0.483 against 0.793 / 0.627 / 0.480), and they cost two searches of every
visible fragment a query and a unit a fragment at ingest. There is no dense list over turns: a turn's own vector ("yes!!", "lol same") says
little that its window does not say better, and the list lost MRR in each dev conversation, as written
and as messy chat (``make eval-messy``), so turns are not indexed by their text vectors at all
(``units.vector_units``). Scores of each list are min-max normalised and combined linearly: on the
LoCoMo dev split this score fusion beat reciprocal-rank fusion of the same lists by a wide margin,
because RRF throws away how much better the first hit is than the tenth. A turn by a person the query names gets a bonus:
people search by who said it. Then feedback: the best turns' words lift the candidates that share them
(``feedback``), since people ask in other words than they chatted in. Fusion reads three keys of each hit (its
turn's, its fragment's, its sender's: ``Hit.turn_key``, ``fragment_key``, ``sender_keys``), which a store may give
without the payload; the payloads of the few candidates kept are read after (``describe``).

Span selection then walks turns best-first and grows each into a short run of adjacent turns of the
same fragment that score nearly as well, the fine-grained answer; the fragment is its context.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from indexer import ids
from indexer.model import Hit, SearchFilter, Span
from indexer.query.intent import holds_answer, only_asks
from indexer.stores.base import KeywordStore, VectorStore, describe
from indexer.text import chat_text, keywords


@dataclass(frozen=True)
class SearchConfig:
    #: Depth of the dense window list and of each image list.
    dense_depth: int = 200
    #: Depth of the BM25 turn-level and window-level lists. Their tail past 100 changed no dev conversation's
    #: recall@10 (0.791 / 0.804 / 0.803 either way; MRR 0.599) and its hits cost the most time a query
    #: spends (a payload and a Python object each): dev p50 12.8 ms against 18.7 with 200.
    keyword_depth: int = 100
    #: Weights of keyword and dense evidence. Dense evidence counts half as much as keywords since it comes
    #: from the window list alone: giving the window list the weight the dense turn list had lost MRR on the
    #: dev split as written (0.593 against 0.605) and as messy chat (0.604 against 0.612).
    keyword_weight: float = 0.5
    dense_weight: float = 0.25
    #: Share of the BM25 window list in a turn's keyword evidence (the turn list has the rest).
    window_share: float = 0.5
    #: Weight of the enclosing fragment's own relevance.
    fragment_weight: float = 0.3
    #: A fragment's relevance in a list is the sum of its best ``fragment_turns`` hits there (BM25 turns, dense
    #: windows): one strong turn, or two turns on the topic, rather than many weak ones. Recall@10 / MRR on the
    #: dev split with two 0.813 / 0.640, as messy chat 0.793 / 0.627; with one 0.818 / 0.641, messy 0.791 /
    #: 0.620; with three 0.810 / 0.637; never another chosen leave-one-conversation-out (``make eval-cv``).
    fragment_turns: int = 2
    #: Bonus for a turn sent by someone the query names. 0.3 since dense evidence weighs less: chosen
    #: leave-one-conversation-out on two of three folds, held-out MRR 0.554 / 0.640 against 0.545 / 0.626.
    speaker_bonus: float = 0.3
    #: A neighbour joins a span when it scores at least this share of the span's best turn.
    span_ratio: float = 0.9
    #: Longest span, in turns.
    span_max_turns: int = 3
    #: A query asking for several things (``intent.asks_for_several``: "what books has she read?") is answered by
    #: many places: each span after the first from a place (``spread_unit``) ranks ``spread_penalty`` lower per
    #: earlier span of that place, and spans are ``several_span_turns`` long. By fragment, dev split (``make eval``;
    #: 73 of 383 questions ask so, 48 of the 74 multi-hop ones) recall@10 0.816 -> 0.821, multi-hop 0.509 -> 0.536,
    #: MRR 0.660 -> 0.658; every query at 0.2: 0.778 (single-hop evidence sits in one fragment), so only these.
    spread_penalty: float = 0.1
    several_span_turns: int = 1
    #: What counts as one place for ``spread_penalty``: ``session`` (the conversation within ``SESSION_SPAN`` of the
    #: turn: a sitting of the chat, whatever the time zone) or ``fragment``. Several things are said in different
    #: sessions more than in different fragments of one session: by session (a UTC day measured alike), dev split
    #: recall@10 / MRR / span F1 / multi-hop recall@10 0.820 / 0.669 / 0.524 / 0.529 -> 0.824 / 0.669 / 0.524 /
    #: 0.550, long chat multi-hop 0.515 -> 0.525, messy chat 0.792 / 0.636 / 0.489 / 0.536 -> 0.788 / 0.634 /
    #: 0.489 / 0.547.
    spread_unit: str = "session"
    #: Weight of each image list (query image or query words against turn image vectors).
    image_weight: float = 0.5
    #: Feedback (``feedback``): the best turns whose words lift the others, among the best ``feedback_depth``
    #: candidates, by at most ``feedback_weight``; 0 turns: none. Chosen on the dev split as written and as
    #: messy chat (MRR 0.623 -> 0.636 and 0.622 -> 0.630; 2 to 4 turns, 20 to 100 deep, weights 0.2 or 0.3 all
    #: gained 0.001 to 0.015; never beaten by no feedback leave-one-conversation-out). It reads the depth's
    #: turns from the state: 1.0 ms a query at 100k fragments 30 deep, 1.7 ms 50 deep (recall@10 0.816 against
    #: 0.813, MRR 0.635 against 0.636).
    feedback_turns: int = 3
    feedback_depth: int = 30
    feedback_weight: float = 0.2
    #: Replies (``replies``): the turns answering a question among the best ``feedback_depth`` gain ``reply_weight``
    #: of its score, the ``reply_turns`` the next other sender sends in a row (a reply is one turn as written, a few
    #: messages as chat). Dev split recall@10 / MRR / span F1 0.816 / 0.660 / 0.508 against 0.815 / 0.639 / 0.487
    #: without (``make eval``); long chat 0.812 / 0.661 / 0.511 against 0.816 / 0.640 / 0.491; messy chat MRR 0.628
    #: against 0.627 (there 15 questions gain and 16 lose); 0.1 and 0.2 gave MRR 0.656 and 0.660 on the dev split.
    #: 0.2 ms a query at 100k and 1M fragments (paired).
    reply_weight: float = 0.15
    reply_turns: int = 3
    #: A question often asks about what the other person has just said ("we saw the Perseids!" - "how did it
    #: feel?" - "I felt tiny, in awe"): its answer then gains ``reply_weight`` of the question's score plus
    #: ``setup_weight`` of that said turn's (the best of the run the other sender sent just before the question).
    #: The said turn matches the query best, the answer is what the query is after. Dev split recall@10 / MRR /
    #: span F1 0.824 / 0.671 / 0.525 -> 0.822 / 0.675 / 0.538 (``make eval``), messy chat 0.788 / 0.634 / 0.489 ->
    #: 0.790 / 0.637 / 0.495; ``make eval-cv`` never chooses 0. Not for a query asking for a time (``replies``):
    #: dev 0.822 / 0.676 / 0.540 -> 0.822 / 0.677 / 0.544 (temporal span F1 0.778 -> 0.800), long chat 0.817 /
    #: 0.671 / 0.527 -> 0.817 / 0.676 / 0.538.
    setup_weight: float = 0.5
    #: Answers (``answers``): a question whose answer is a time or a count (``intent.answer_kind``) lifts the
    #: candidates among the best ``feedback_depth`` whose words hold one by ``answer_weight``. Dev split
    #: recall@10 / MRR / span F1 0.821 / 0.658 / 0.507 -> 0.820 / 0.669 / 0.524 (0.05: MRR 0.664, 0.2: 0.673); long
    #: chat MRR 0.660 -> 0.671, messy chat 0.629 -> 0.636; ``make eval-cv`` keeps 0.1.
    answer_weight: float = 0.1
    #: A turn among the best ``feedback_depth`` that only asks (``intent.only_asks``: "what kind of books you got
    #: in your library?") ranks this much lower, after ``replies`` took its share for its answer: it says what
    #: someone wanted to know, not what they did or said. Unless the query is about something asked
    #: (``intent.asks_about_asking``). Dev split recall@10 / MRR / span F1 / multi-hop recall@10 0.822 / 0.678 /
    #: 0.545 / 0.550 -> 0.824 / 0.679 / 0.545 / 0.564 (0.1: 0.823 / 0.678 / 0.545 / 0.557; 1.0: 0.824 / 0.680 /
    #: 0.547 / 0.564), messy chat 0.788 / 0.637 / 0.495 / 0.553 -> 0.796 / 0.643 / 0.499 / 0.550 (1.0 the same),
    #: long chat 0.817 / 0.676 / 0.538 / 0.525 -> 0.818 / 0.677 / 0.540 / 0.542.
    asking_penalty: float = 0.3


#: Turns of a conversation sent within this many seconds of each other are one session for ``spread_unit``.
SESSION_SPAN = 12 * 3600.0


@dataclass(eq=False)
class Candidate:
    """A recalled turn: scored by the keys every hit carries; its ids come from the payload of its first hit,
    which a store may read only when asked (``describe``): fusion keeps a few of about 400 candidates."""

    #: The turn's key (``Hit.turn_key``): the same in every list.
    key: int
    hit: Hit
    tenant_id: str
    score: float = 0.0
    #: What ``HybridSearcher.asking`` took off its score: its span still grows by the score it had.
    lowered: float = 0.0

    @classmethod
    def of(cls, hit: Hit, tenant_id: str, score: float = 0.0) -> "Candidate":
        return cls(hit.turn_key(tenant_id), hit, tenant_id, score)

    @property
    def fragment_key(self) -> int:
        return self.hit.fragment_key

    @property
    def sender_keys(self) -> tuple[int, ...]:
        return self.hit.sender_keys

    @property
    def message_id(self) -> str:
        return self.hit.payload["message_ids"][0]

    @property
    def conversation_id(self) -> str:
        return self.hit.payload["conversation_id"]

    @property
    def fragment_id(self) -> str:
        return self.hit.payload["fragment_id"]

    @property
    def sent_ts(self) -> float:
        return self.hit.payload["start_ts"]

    def text_in(self, texts: dict[tuple[str, str], str]) -> str:
        """Its rendered text in ``texts``, keyed by (conversation, message) as the searcher reads the leading
        candidates' turns; "" when the turn is not there (deleted since)."""
        return texts.get((self.conversation_id, self.message_id), "")

    def said_in(self, texts: dict[tuple[str, str], str]) -> str:
        """Its words in ``texts``, without the speaker ``render_turn`` puts first (``answers``, ``asking``)."""
        return self.text_in(texts).partition(": ")[2]

    @property
    def gone(self) -> bool:
        """Its unit was deleted between the search and the read of its payload."""
        return not self.hit.payload

    def key_of(self, message_id: str) -> int:
        """The key of another turn of this candidate's conversation."""
        return ids.turn_key(self.tenant_id, self.conversation_id, message_id)


def describe_candidates(candidates: Iterable[Candidate]) -> None:
    describe(cand.hit for cand in candidates)


def normalise(hits: list[Hit]) -> list[float]:
    """Min-max scale a list's scores to [0, 1], in the list's order; a single hit scores 1."""
    return normalise_scores([h.score for h in hits])


def normalise_scores(values: Sequence[float]) -> list[float]:
    if not len(values):
        return []
    scores = np.asarray(values, dtype=np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo < 1e-12:
        return [1.0] * len(values)
    return ((scores - lo) / (hi - lo)).tolist()


def _candidate_of(candidates: dict[int, Candidate], hit: Hit, tenant_id: str) -> Candidate:
    """The candidate of the hit's turn, keyed by its turn key so that every list meets there."""
    key = hit.turn_key(tenant_id)
    cand = candidates.get(key)
    if cand is None:
        cand = candidates[key] = Candidate(key, hit, tenant_id)
    return cand


class HybridSearcher:
    def __init__(self, vectors: VectorStore, keywords: KeywordStore, config: SearchConfig = SearchConfig()):
        self.vectors = vectors
        self.keywords = keywords
        self.config = config
        # Stores that say their searches may overlap get the keyword lists recalled in parallel.
        concurrent = getattr(keywords, "concurrent_search", False) and getattr(vectors, "concurrent_search", False)
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="recall") if concurrent else None

    def recall(self, text: str, vector: np.ndarray | None, flt: SearchFilter,
               image_queries: Sequence[np.ndarray] = ()) -> dict[tuple[str, str], list[Hit]]:
        """The ranked lists, each recalled inside its store under the filter, plus one list of
        turns by image vector per query vector in the image model's space (``("image", "q<i>")``).

        No ``vector`` (a query by image alone): no dense text lists.
        """
        c = self.config
        keyword_depths = (("turn", c.keyword_depth), ("window", c.keyword_depth))
        found, dense = self._search(chat_text(text), keyword_depths, vector, flt)
        lists: dict[tuple[str, str], list[Hit]] = {("bm25", kind): hits
                                                   for (kind, _), hits in zip(keyword_depths, found)}
        if dense is not None:
            lists[("dense", "window")] = dense
        for i, query in enumerate(image_queries):
            lists[("image", f"q{i}")] = self.vectors.search(query, "turn", flt, c.dense_depth, "image")
        return lists

    def _search(self, keyword_text: str, keyword_depths: Sequence[tuple[str, int]], vector: np.ndarray | None,
                flt: SearchFilter) -> tuple[list[list[Hit]], list[Hit] | None]:
        """The BM25 lists of ``keyword_depths`` (kind, depth) and the dense window list (None without a vector): one
        batch of the engine where the keyword lists live on the window points with their dense vectors
        (``dense_here``), else a search each, the keyword ones on threads where both stores allow it."""
        c = self.config
        if getattr(self.keywords, "dense_here", False):
            found, dense = self.keywords.search_batch(keyword_text, keyword_depths, vector, c.dense_depth, flt)
            return found, dense if vector is not None else None
        pending = [self._pool.submit(self.keywords.search, keyword_text, kind, flt, depth)
                   for kind, depth in keyword_depths] if self._pool is not None else None
        dense = self.vectors.search(vector, "window", flt, c.dense_depth) if vector is not None else None
        if pending is not None:
            return [future.result() for future in pending], dense
        return [self.keywords.search(keyword_text, kind, flt, depth) for kind, depth in keyword_depths], dense

    def locate(self, text: str, vector: np.ndarray, flt: SearchFilter) -> float | None:
        """When the turn that best matches ``text`` was sent (dates "before the trip")."""
        c = self.config
        scores: dict[tuple[str, str], float] = defaultdict(float)
        times: dict[tuple[str, str], float] = {}
        found, dense = self._search(chat_text(text), [("turn", c.keyword_depth)], vector, flt)
        for hits in (found[0], dense):
            describe(hits)
            for hit, value in zip(hits, normalise(hits)):
                if not hit.payload:
                    continue
                turn = (hit.payload["conversation_id"], hit.payload["message_ids"][0])
                scores[turn] += value
                times[turn] = hit.payload["start_ts"]
        if not scores:
            return None
        return times[max(scores, key=lambda t: (scores[t], t))]

    def fuse(self, lists: dict[tuple[str, str], list[Hit]], named_senders: set[str],
             tenant_id: str) -> dict[int, Candidate]:
        """Score every recalled turn from its hits' keys alone (``Hit.turn_key``, ``fragment_key``,
        ``sender_keys``): turn and window hits meet at the turn's key."""
        c = self.config
        fragment_score: dict[int, float] = defaultdict(float)
        for key in (("bm25", "turn"), ("dense", "window")):
            fragments = self.fragment_scores(lists.get(key, []))
            for fragment_key, value in zip(fragments, normalise_scores(list(fragments.values()))):
                fragment_score[fragment_key] += value / 2
        candidates: dict[int, Candidate] = {}
        for key, weight in ((("bm25", "turn"), c.keyword_weight * (1 - c.window_share)),
                            (("bm25", "window"), c.keyword_weight * c.window_share),
                            (("dense", "window"), c.dense_weight)):
            hits = lists.get(key, [])
            for hit, value in zip(hits, normalise(hits)):
                _candidate_of(candidates, hit, tenant_id).score += weight * value
        for key, hits in lists.items():
            if key[0] != "image":
                continue
            for hit, value in zip(hits, normalise(hits)):
                _candidate_of(candidates, hit, tenant_id).score += c.image_weight * value
        named = {ids.sender_key(s) for s in named_senders}
        for cand in candidates.values():
            cand.score += c.fragment_weight * fragment_score.get(cand.fragment_key, 0.0)
            if named and named.intersection(cand.sender_keys):
                cand.score += c.speaker_bonus
        return candidates

    def fragment_scores(self, hits: list[Hit]) -> dict[int, float]:
        """A fragment's relevance in one list, by its key: the sum of its best ``fragment_turns`` hits' scores."""
        by_fragment: dict[int, list[float]] = defaultdict(list)
        for hit in hits:
            by_fragment[hit.fragment_key].append(hit.score)
        n = self.config.fragment_turns
        return {key: sum(heapq.nlargest(n, scores)) for key, scores in by_fragment.items()}

    def leading(self, candidates: dict[int, Candidate]) -> list[Candidate]:
        """The best ``feedback_depth`` candidates still indexed, best first, their payloads read: the turns
        feedback and replies read the text of."""
        ranked = heapq.nsmallest(self.config.feedback_depth, candidates.values(), key=lambda x: (-x.score, x.key))
        describe_candidates(ranked)
        return [cand for cand in ranked if not cand.gone]

    def feedback(self, leading: Sequence[Candidate], texts: dict[tuple[str, str], str]) -> None:
        """Pseudo-relevance feedback within the candidates: each of the ``leading`` ones (the best
        ``feedback_depth``, best first) gains up to ``feedback_weight`` for the content words it shares with the
        best ``feedback_turns``, a word weighing more the fewer of them hold it (``texts``: their rendered text,
        keyed by (conversation, message)). People ask in other words than they chatted in; the best turns bring the
        chat's own words (names, places, what they called the thing), and the turns that share them rise.
        Searching the turn list again with those words gained as much on the dev split (MRR 0.637) but cost a
        search of every visible turn with 40 terms (10 ms at 12,000 visible fragments); capped at 6 to 16 words
        it gained less (0.626 to 0.629)."""
        c = self.config
        if not c.feedback_turns:
            return
        held = [set(keywords(x.text_in(texts))) for x in leading]
        holding = Counter(w for words in held for w in words)
        weight: Counter = Counter()
        for words in held[:c.feedback_turns]:
            for w in words:
                weight[w] += math.log(1 + len(held) / holding[w])
        total = sum(weight.values())
        if not total:
            return
        for cand, words in zip(leading, held):
            cand.score += c.feedback_weight * sum(weight[w] for w in words) / total

    def answers(self, leading: Sequence[Candidate], texts: dict[tuple[str, str], str], kind: str | None) -> None:
        """Each of the ``leading`` candidates whose words hold an answer of the ``kind`` the question asks for (a
        time, a count: ``intent.answer_kind``) gains ``answer_weight``. The turn that best matches "when did she get
        the puppy?" tells about the puppy; the answer is often the turn that dates it ("we got him last weekend!"),
        next to it and close behind in score. ``texts`` as for ``feedback``; the speaker's name is not searched."""
        if kind is None or not self.config.answer_weight:
            return
        for cand in leading:
            if holds_answer(kind, cand.said_in(texts)):
                cand.score += self.config.answer_weight

    def questions(self, leading: Sequence[Candidate], texts: dict[tuple[str, str], str]) -> list[Candidate]:
        """The ``leading`` candidates whose rendered text in ``texts`` holds a question mark: those ``replies``
        lifts the answers of; none when replies are off."""
        if not self.config.reply_weight:
            return []
        return [cand for cand in leading if "?" in cand.text_in(texts)]

    def asking(self, leading: Sequence[Candidate], texts: dict[tuple[str, str], str]) -> None:
        """Each of the ``leading`` candidates that only asks (``intent.only_asks``) ranks ``asking_penalty`` lower.
        Called after ``replies``, which lifts a question's answer by the question's own score; its span grows by
        the score it had (``Candidate.lowered``), not into a weaker neighbour on another topic."""
        if not self.config.asking_penalty:
            return
        for cand in leading:
            if only_asks(cand.said_in(texts)):
                cand.score -= self.config.asking_penalty
                cand.lowered += self.config.asking_penalty

    def replies(self, candidates: dict[str, Candidate], questions: Sequence[Candidate],
                turns_of: Callable[[str], Sequence[str] | None], kind: str | None = None) -> None:
        """The answer to a question asked in the chat gains ``reply_weight`` of the question's score, and of
        ``setup_weight`` of the turn the question asks about (``_setup``). People ask the way someone asked in the
        chat ("what's a favourite book from your childhood?"), and what they are after is the answer: the turns the
        next other sender sends in a row, up to ``reply_turns``, within the question's fragment (``turns_of`` gives
        its message ids in order) and among the candidates. ``questions`` are what ``questions`` found (the caller
        reads their fragments meanwhile); gains come from the scores before any is added. A query asking for a time
        (``kind``, ``intent.answer_kind``) takes nothing from what a question asks about: its answer is the turn
        that dates the thing (``answers``), which the reply to "how was it?" would pass."""
        c = self.config
        if not c.reply_weight or not questions:
            return
        by_key = {cand.key: cand for cand in candidates.values()}
        gains: dict[int, float] = defaultdict(float)
        for cand in questions:
            order = turns_of(cand.fragment_id)
            if not order or cand.message_id not in order:
                continue
            at = order.index(cand.message_id)
            asked = cand.score + (c.setup_weight * self._setup(cand, order, at, by_key) if kind != "time" else 0.0)
            replier, run = None, 0
            for message_id in order[at + 1:]:
                other = by_key.get(cand.key_of(message_id))
                if other is None:
                    break
                if replier is None and set(other.sender_keys).isdisjoint(cand.sender_keys):
                    replier = set(other.sender_keys)
                if replier is not None:
                    if set(other.sender_keys) != replier or run == c.reply_turns:
                        break
                    gains[other.key] += c.reply_weight * asked
                    run += 1
        for key, gain in gains.items():
            by_key[key].score += gain

    def _setup(self, question: Candidate, order: Sequence[str], at: int, by_key: dict[int, Candidate]) -> float:
        """The best score of the run of turns another sender sent just before the ``question`` (at ``at`` of its
        fragment's ``order``) and the asker's own turns leading up to it, each run up to ``reply_turns`` long and
        among the candidates; 0 when there is none."""
        if not self.config.setup_weight:
            return 0.0
        limit = self.config.reply_turns
        j = at - 1
        while j >= 0 and at - j <= limit:
            own = by_key.get(question.key_of(order[j]))
            if own is None or set(own.sender_keys) != set(question.sender_keys):
                break
            j -= 1
        best, sender = 0.0, None
        for message_id in reversed(order[max(0, j - limit + 1):j + 1]):
            other = by_key.get(question.key_of(message_id))
            if other is None or not set(other.sender_keys).isdisjoint(question.sender_keys) \
                    or (sender is not None and set(other.sender_keys) != sender):
                break
            sender = set(other.sender_keys)
            best = max(best, other.score)
        return best

    def spans(self, candidates: dict[str, Candidate], turns_of: Callable[[str], Sequence[str] | None],
              top_k: int, several: bool = False) -> list[Span]:
        """Best-first spans of adjacent, similarly scored turns of one fragment; ``turns_of`` gives a
        fragment's message ids in order (None for a fragment gone since it was recalled). ``several``: the query
        asks for several things (``spread_penalty``, ``several_span_turns``); a candidate's rank then drops with
        the spans its place (``spread_unit``) already has, re-ranked lazily as it comes up."""
        c = self.config
        penalty = c.spread_penalty if several else 0.0
        longest = c.several_span_turns if several else c.span_max_turns

        spread: list[Candidate] = []

        def earlier(cand: Candidate) -> int:
            """Spans already taken from the candidate's place."""
            if c.spread_unit == "fragment":
                return sum(other.fragment_key == cand.fragment_key for other in spread)
            return sum(other.conversation_id == cand.conversation_id
                       and abs(other.sent_ts - cand.sent_ts) < SESSION_SPAN for other in spread)

        by_key = {cand.key: cand for cand in candidates.values()}
        # Keys are unique per turn, so the heap never compares candidates.
        queue = [(-cand.score, cand.key, 0, cand) for cand in candidates.values()]
        heapq.heapify(queue)
        # The walk reads the payloads of about the best 2 x top_k candidates: read them in one go.
        describe_candidates(entry[-1] for entry in heapq.nsmallest(2 * top_k, queue))
        covered: set[int] = set()
        spans: list[Span] = []
        while queue and len(spans) < top_k:
            _, key, seen, cand = heapq.heappop(queue)
            if key in covered or cand.gone:
                continue
            if penalty and (taken := earlier(cand)) != seen:
                seen = taken
                heapq.heappush(queue, (-(cand.score - penalty * seen), key, seen, cand))
                continue
            order = turns_of(cand.fragment_id)
            if not order or cand.message_id not in order:
                continue
            pos = order.index(cand.message_id)
            lo = hi = pos
            while hi - lo + 1 < longest:
                options = []
                for j in (lo - 1, hi + 1):
                    if 0 <= j < len(order):
                        other = by_key.get(cand.key_of(order[j]))
                        if (other is not None and other.key not in covered
                                and other.score >= c.span_ratio * (cand.score + cand.lowered)):
                            options.append((other.score, j))
                if not options:
                    break
                _, j = max(options)
                lo, hi = min(lo, j), max(hi, j)
            message_ids = list(order[lo:hi + 1])
            covered.update(cand.key_of(m) for m in message_ids)
            spread.append(cand)
            spans.append(Span(cand.fragment_id, cand.conversation_id, message_ids, cand.score))
        return spans
